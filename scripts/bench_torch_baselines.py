#!/usr/bin/env python3
"""PyTorch baselines for `gazelle bench-model --suite`, on the same GPU, at the same shape
(Mistral-7B decoder, bf16, random weights). NEEDS A CUDA GPU with torch and transformers (the lent
GPU machines have both). Prints a markdown table and writes JSON.

  hf_eager   transformers MistralForCausalLM.generate, greedy, no compile (its default attention).
             decode tok/s = (N - 1) / (time(N new tokens) - time(1 new token)), so prefill cancels.
  compiled   a gpt-fast style decoder written here in plain torch: static KV cache, one token per
             step, the step torch.compile'd with mode="reduce-overhead" (CUDA graphs). Plain torch
             keeps it independent of transformers' cache API, which moves between versions.

  python3 scripts/bench_torch_baselines.py --json out.json [--layers 32] [--contexts 128,1024,4096]
"""
import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

MISTRAL_7B = dict(hidden=4096, inter=14336, layers=32, heads=32, kv_heads=8, head_dim=128,
                  vocab=32000, theta=10000.0, eps=1e-5)


def sync_time(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t, out


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def copy_bandwidth():
    src = torch.ones(1 << 29, dtype=torch.bfloat16, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    times = []
    for i in range(21):
        t, _ = sync_time(lambda: dst.copy_(src))
        if i:
            times.append(t)
    return 2 * src.numel() * 2 / median(times) / 1e9


# ---- gpt-fast style decoder (static cache) ----
class Layer(torch.nn.Module):
    def __init__(s, c):
        super().__init__()
        h, hd = c["hidden"], c["head_dim"]
        s.wqkv = torch.nn.Linear(h, (c["heads"] + 2 * c["kv_heads"]) * hd, bias=False)
        s.wo = torch.nn.Linear(c["heads"] * hd, h, bias=False)
        s.w13 = torch.nn.Linear(h, 2 * c["inter"], bias=False)
        s.w2 = torch.nn.Linear(c["inter"], h, bias=False)
        s.n1 = torch.nn.Parameter(torch.ones(h))
        s.n2 = torch.nn.Parameter(torch.ones(h))
        s.c = c


def rms(x, w, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def rope(x, cos, sin):  # x [B, h, L, hd]; rotate_half form
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Decoder(torch.nn.Module):
    def __init__(s, c, max_len):
        super().__init__()
        s.c = c
        s.emb = torch.nn.Embedding(c["vocab"], c["hidden"])
        s.layers = torch.nn.ModuleList(Layer(c) for _ in range(c["layers"]))
        s.norm = torch.nn.Parameter(torch.ones(c["hidden"]))
        s.head = torch.nn.Linear(c["hidden"], c["vocab"], bias=False)
        shape = (c["layers"], 1, c["kv_heads"], max_len, c["head_dim"])
        s.register_buffer("kc", torch.zeros(shape), persistent=False)
        s.register_buffer("vc", torch.zeros(shape), persistent=False)
        inv = 1.0 / c["theta"] ** (torch.arange(0, c["head_dim"], 2).float() / c["head_dim"])
        f = torch.outer(torch.arange(max_len).float(), inv)
        f = torch.cat((f, f), dim=-1)
        s.register_buffer("cos", f.cos(), persistent=False)
        s.register_buffer("sin", f.sin(), persistent=False)
        s.max_len = max_len

    def forward(s, ids, pos):  # ids [1, L], pos [L] -> logits [1, L, V]
        c = s.c
        nh, nkv, hd = c["heads"], c["kv_heads"], c["head_dim"]
        x = s.emb(ids)
        L = ids.shape[1]
        cos, sin = s.cos[pos].to(x.dtype), s.sin[pos].to(x.dtype)
        mask = torch.arange(s.max_len, device=ids.device)[None, :] <= pos[:, None]  # [L, S]
        for i, l in enumerate(s.layers):
            h = rms(x, l.n1, c["eps"])
            q, k, v = l.wqkv(h).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
            q = rope(q.view(1, L, nh, hd).transpose(1, 2), cos, sin)
            k = rope(k.view(1, L, nkv, hd).transpose(1, 2), cos, sin)
            v = v.view(1, L, nkv, hd).transpose(1, 2)
            s.kc[i][:, :, pos] = k
            s.vc[i][:, :, pos] = v
            y = F.scaled_dot_product_attention(q, s.kc[i], s.vc[i], attn_mask=mask,
                                               enable_gqa=True)
            x = x + l.wo(y.transpose(1, 2).reshape(1, L, nh * hd))
            g, u = l.w13(rms(x, l.n2, c["eps"])).chunk(2, dim=-1)
            x = x + l.w2(F.silu(g) * u)
        return s.head(rms(x, s.norm, c["eps"]))


def bench_compiled(c, contexts, prefill_lengths, n_new, reps):
    max_len = max(contexts + prefill_lengths) + n_new + 8
    with torch.device("cuda"):
        m = Decoder(c, max_len).to(torch.bfloat16).eval()
    step = torch.compile(lambda ids, pos: m(ids, pos).argmax(-1), mode="reduce-overhead",
                         fullgraph=True)
    out = {"decode": [], "prefill": []}
    with torch.no_grad():
        for ctx in contexts:
            times = []
            for r in range(reps + 1):
                ids = torch.randint(100, 30000, (1, ctx), device="cuda")
                tok = m(ids, torch.arange(ctx, device="cuda"))[:, -1:].argmax(-1)

                def run():
                    t = tok
                    for p in range(ctx, ctx + n_new):
                        t = step(t, torch.tensor([p], device="cuda")).clone()
                    return t
                if r == 0:
                    run()  # compile + graph capture
                times.append(sync_time(run)[0])
            tps = n_new / median(times[1:])
            out["decode"].append({"context": ctx, "tokens_per_s": tps})
            print(f"compiled decode ctx {ctx}: {tps:.1f} tok/s", flush=True)
        for n in prefill_lengths:
            ids = torch.randint(100, 30000, (1, n), device="cuda")
            pos = torch.arange(n, device="cuda")
            times = [sync_time(lambda: m(ids, pos)[:, -1].argmax(-1).item())[0] for _ in range(reps + 1)]
            out["prefill"].append({"tokens": n, "ms": 1e3 * median(times[1:])})
    del m
    torch.cuda.empty_cache()
    return out


def bench_hf(c, contexts, prefill_lengths, n_new, reps):
    from transformers import MistralConfig, MistralForCausalLM
    cfg = MistralConfig(hidden_size=c["hidden"], intermediate_size=c["inter"],
                        num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
                        num_key_value_heads=c["kv_heads"], vocab_size=c["vocab"],
                        rope_theta=c["theta"], rms_norm_eps=c["eps"], sliding_window=4096,
                        max_position_embeddings=32768)
    with torch.device("cuda"):
        m = MistralForCausalLM(cfg).to(torch.bfloat16).eval()
    out = {"decode": [], "prefill": []}

    def gen(ids, n):
        return m.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        for ctx in contexts:
            ids = torch.randint(100, 30000, (1, ctx), device="cuda")
            gen(ids, 2)
            t1 = median([sync_time(lambda: gen(ids, 1))[0] for _ in range(reps)])
            tn = median([sync_time(lambda: gen(ids, n_new))[0] for _ in range(reps)])
            tps = (n_new - 1) / (tn - t1)
            out["decode"].append({"context": ctx, "tokens_per_s": tps})
            print(f"hf eager decode ctx {ctx}: {tps:.1f} tok/s", flush=True)
        for n in prefill_lengths:
            ids = torch.randint(100, 30000, (1, n), device="cuda")
            times = [sync_time(lambda: m(ids).logits[:, -1].argmax(-1).item())[0] for _ in range(reps + 1)]
            out["prefill"].append({"tokens": n, "ms": 1e3 * median(times[1:])})
    del m
    torch.cuda.empty_cache()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--contexts", default="128,1024,4096")
    ap.add_argument("--prefill-lengths", default="64,512")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", choices=["hf", "compiled"], default=None)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.manual_seed(0)
    c = dict(MISTRAL_7B, layers=a.layers)
    contexts = [int(x) for x in a.contexts.split(",")]
    prefill = [int(x) for x in a.prefill_lengths.split(",")]
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": a.layers,
           "copy_gb_per_s": copy_bandwidth()}
    if a.only in (None, "hf"):
        import transformers
        res["transformers"] = transformers.__version__
        res["hf_eager"] = bench_hf(c, contexts, prefill, a.decode_tokens, a.repeats)
    if a.only in (None, "compiled"):
        res["compiled"] = bench_compiled(c, contexts, prefill, a.decode_tokens, a.repeats)
    res["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    print(f"| {res['device']} torch {res['torch']} | " + " | ".join(f"ctx {x}" for x in contexts) + " |")
    print("|---|" + "---|" * len(contexts))
    for name in ("hf_eager", "compiled"):
        if name in res:
            cells = " | ".join(f"{d['tokens_per_s']:.1f}" for d in res[name]["decode"])
            print(f"| {name} decode tok/s | {cells} |")
    print(f"| copy bandwidth | {res['copy_gb_per_s']:.0f} GB/s |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
