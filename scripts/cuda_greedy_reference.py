#!/usr/bin/env python3
"""PyTorch-CUDA bf16 greedy tokens for `scripts/check-cuda`. NEEDS A CUDA GPU (torch, transformers).

For each case it writes OUT/<case>/case.json (config and weights paths) and case.safetensors:
`embeds` [1, L, D] bf16 (the decoder input), `tokens` [N] (greedy, transformers' decoder in bf16 on
CUDA with its KV cache) and `gaps` [N] (top-1 minus top-2 logit at each step, to tell a logit tie
from a bug). The Rust test `cuda_tests::greedy_tokens_match_pytorch_cuda` replays them.
Cases: the tiny mistral and llama fixtures (their PyTorch-bf16 merged embeddings, both clips) and a
random real-shape Mistral-7B decoder (64 random prompt tokens).

  python3 scripts/cuda_greedy_reference.py OUT [--tokens 32] [--layers 32] [--no-real-shape]
"""
import argparse
import json
import os

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures", "gazelle")
CLASSES = {"mistral": (MistralConfig, MistralForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}


@torch.no_grad()
def greedy(lm, embeds, n):
    out = lm(inputs_embeds=embeds, use_cache=True)
    past, last = out.past_key_values, out.logits[:, -1].float()
    tokens, gaps = [], []
    for _ in range(n):
        top2 = last[0].topk(2).values
        gaps.append(float(top2[0] - top2[1]))
        nxt = int(last.argmax(-1)[0])
        tokens.append(nxt)
        o = lm(input_ids=torch.tensor([[nxt]], device="cuda"), past_key_values=past, use_cache=True)
        past, last = o.past_key_values, o.logits[:, -1].float()
    return tokens, gaps


def write_case(out, name, config_path, weights_path, embeds, tokens, gaps):
    d = os.path.join(out, name)
    os.makedirs(d, exist_ok=True)
    save_file({"embeds": embeds.contiguous().cpu(), "tokens": torch.tensor(tokens),
               "gaps": torch.tensor(gaps)}, os.path.join(d, "case.safetensors"))
    with open(os.path.join(d, "case.json"), "w") as f:
        json.dump({"config": config_path, "weights": weights_path}, f)
    print(f"{name}: tokens {tokens} min gap {min(gaps):.4f}", flush=True)


def lm_from(kind, text_cfg, state=None):
    cfg_cls, cls = CLASSES[kind]
    cfg = cfg_cls(**{k: v for k, v in text_cfg.items() if k != "model_type"})
    with torch.device("cuda"):
        lm = cls(cfg).to(torch.bfloat16).eval()
    if state is not None:
        lm.load_state_dict(state)
    return lm


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--no-real-shape", action="store_true")
    a = ap.parse_args()
    torch.manual_seed(0)
    for kind in ("mistral", "llama"):
        d = os.path.join(FIX, kind)
        cfg_path, w_path = os.path.join(d, "config.json"), os.path.join(d, "model.safetensors")
        text_cfg = json.load(open(cfg_path))["text_config"]
        w = load_file(w_path)
        state = {k[len("language_model."):]: v.to(torch.bfloat16)
                 for k, v in w.items() if k.startswith("language_model.")}
        lm = lm_from(kind, text_cfg, state)
        refs = load_file(os.path.join(d, "reference.safetensors"))
        for c in ("c0", "c1"):
            embeds = refs[f"{c}.bf16.merged_embeddings"].to(torch.bfloat16).cuda()
            tokens, gaps = greedy(lm, embeds, a.tokens)
            write_case(a.out, f"{kind}-{c}", cfg_path, w_path, embeds, tokens, gaps)
        del lm
    if a.no_real_shape:
        return
    fixture_cfg = json.load(open(os.path.join(FIX, "mistral", "config.json")))
    text_cfg = dict(model_type="mistral", hidden_size=4096, intermediate_size=14336,
                    num_hidden_layers=a.layers, num_attention_heads=32, num_key_value_heads=8,
                    head_dim=128, vocab_size=32000, rms_norm_eps=1e-5, rope_theta=10000.0,
                    sliding_window=4096, max_position_embeddings=32768, tie_word_embeddings=False)
    lm = lm_from("mistral", text_cfg)
    # transformers' default init (normal, std 0.02) gives nearly uniform logits; a wider spread
    # makes greedy decoding decisive, so equality means something.
    for name, p in lm.named_parameters():
        if p.dim() == 2:
            p.data.normal_(0.0, 1.0 / p.shape[1] ** 0.5)
    d = os.path.join(a.out, "real-shape")
    os.makedirs(d, exist_ok=True)
    w_path, cfg_path = os.path.join(d, "model.safetensors"), os.path.join(d, "config.json")
    save_file({"language_model." + k: v.contiguous().cpu() for k, v in lm.state_dict().items()},
              w_path)
    json.dump(dict(fixture_cfg, text_config=text_cfg, vocab_size=32000), open(cfg_path, "w"))
    ids = torch.randint(100, 30000, (1, 64), device="cuda")
    embeds = lm.get_input_embeddings()(ids)
    tokens, gaps = greedy(lm, embeds, a.tokens)
    write_case(a.out, "real-shape", cfg_path, w_path, embeds, tokens, gaps)


if __name__ == "__main__":
    main()
