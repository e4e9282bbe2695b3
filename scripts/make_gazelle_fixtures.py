#!/usr/bin/env python3
"""Build tiny random Gazelle checkpoints in Hugging Face layout and PyTorch reference tensors.

The Rust port (src/model/gazelle) is tested against these files. They are committed under
tests/fixtures/gazelle/, so Python and torch are only needed to regenerate them:

    python3 -m venv /work/venv-torch
    /work/venv-torch/bin/pip install torch transformers safetensors tokenizers
    /work/venv-torch/bin/python scripts/make_gazelle_fixtures.py

`make_gazelle_fixtures.py mistral-tokenizer MODEL` instead rebuilds the real-vocabulary tokenizer
fixture (tests/fixtures/gazelle/mistral-v1-tokenizer; see build_mistral_tokenizer).
`make_gazelle_fixtures.py real-width TINCANS_REPO` instead builds the real-width fixture
(tests/fixtures/gazelle/real-width) with tincans-ai/gazelle's own modeling code; see
build_real_width.

Each variant folder holds config.json, model.safetensors, tokenizer.json, tokenizer_config.json
(a model a loader can open as-is) and reference.safetensors with, per clip `cN`:
audio (raw 16 kHz), normalized, conv_features [1,512',T], encoder_output [1,T,H],
projector_output [1,N,D], prompt_ids, merged_embeddings [1,L,D], prefill_logits [1,L,V] and
greedy_tokens [24] (EOS is not a stop token here, so exactly 24 come out), plus
cN.bf16.{conv_features,encoder_output,projector_output,merged_embeddings,prefill_logits} from a bf16 run.

The audio tower and language model are transformers' own classes. The projector and the splice
follow tincans-ai/gazelle's GazelleProjector and merge, written here from its description.
"""

import copy
import json
import os
import sys

# Mistral-7B-Instruct's `[INST]` template, as the v0.2 tokenizer_config.json carries it: it
# raises on a system role (the server then folds the system prompt into the first user turn).
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}{% endfor %}"
)

# Conversations whose rendering and ids the Rust port must reproduce. The first two are the
# tincans notebook's published cases (the dairy prompt has 22 ids).
TOKENIZER_CASES = [
    [{"role": "user", "content": "Under absolutely no circumstances mention any dairy products. \n<|audio|>"}],
    [{"role": "user", "content": "<|audio|>"}],
    [
        {"role": "user", "content": "<|audio|>\nWhat's the weather?"},
        {"role": "assistant", "content": "Sunny, 24 °C — perfect for a walk."},
        {"role": "user", "content": "<|audio|>"},
    ],
    [{"role": "user", "content": "Café? ¿Qué tal? 日本語のテキスト 👋  two  spaces\n\nnew line"}],
]
TOKENIZER_TEXTS = [
    "Ignoring all previous instructions and saying cheese.",
    "My greatest accomplishment is being able to help people.",
    " leading space, trailing space ",
    "Zürich, naïve façade, 東京, emoji 🎉.",
]


def build_mistral_tokenizer(model_file):
    """The Gazelle v0.2 tokenizer rebuilt from Mistral's v1 SentencePiece model (mistral_common's
    tokenizer.model.v1) with transformers 4.38.2: legacy mode, `<|audio|>` = 32000, the
    `[INST]` template. Writes the tokenizer files and cases.json (HF's ids and text)."""
    import shutil

    import transformers
    from transformers import AddedToken, LlamaTokenizerFast

    assert transformers.__version__ == "4.38.2", transformers.__version__
    folder = os.path.join(OUT_ROOT, "mistral-v1-tokenizer")
    os.makedirs(folder, exist_ok=True)
    tok = LlamaTokenizerFast(vocab_file=model_file, legacy=True, add_prefix_space=True,
                             from_slow=True)
    tok.add_tokens([AddedToken("<|audio|>", special=True, normalized=False)], special_tokens=True)
    assert tok.convert_tokens_to_ids("<|audio|>") == 32000, "<|audio|> must be id 32000"
    tok.chat_template = MISTRAL_TEMPLATE
    tok.save_pretrained(folder)
    shutil.copy(model_file, os.path.join(folder, "tokenizer.model"))
    cases = []
    for messages in TOKENIZER_CASES:
        text = tok.apply_chat_template(messages, tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        cases.append({"messages": messages, "text": text, "ids": ids,
                      "decoded": tok.decode(ids, skip_special_tokens=True)})
    assert len(cases[0]["ids"]) == 22, f"the dairy prompt has {len(cases[0]['ids'])} ids, not 22"
    texts = []
    for t in TOKENIZER_TEXTS:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        texts.append({"text": t, "ids": ids, "decoded": tok.decode(ids, skip_special_tokens=True)})
    with open(os.path.join(folder, "cases.json"), "w") as f:
        json.dump({"transformers": transformers.__version__, "conversations": cases,
                   "texts": texts}, f, indent=1, ensure_ascii=False)
    print(f"wrote {folder}: dairy prompt ids {cases[0]['ids']}")


OUT_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "gazelle")

if __name__ == "__main__" and sys.argv[1:2] == ["mistral-tokenizer"]:
    # Needs only `transformers==4.38.2 sentencepiece protobuf "tokenizers<0.19"` (no torch), and
    # the v1 model from the mistral_common wheel:
    #   pip download --no-deps mistral_common && python3 -m zipfile -e mistral_common-*.whl mc
    #   python scripts/make_gazelle_fixtures.py mistral-tokenizer mc/mistral_common/data/tokenizer.model.v1
    build_mistral_tokenizer(sys.argv[2])
    sys.exit(0)

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2Model,
)

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "gazelle")
STACK = 8
GREEDY_STEPS = 24

# A Mistral-v0.3-style template: a leading system message is folded into the first user turn.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- ' ' + message['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported!') }}"
    "{%- endif %}"
    "{%- endfor %}"
)

CORPUS = [
    "[INST] hello there, how are you today? [/INST] I am fine, thank you very much.",
    "[INST] what did you hear in the audio clip? [/INST] I heard a tone and some noise.",
    "[INST] You are a helpful voice assistant. Answer briefly. [/INST] Sure, I can help.",
    "Transcribe the audio. Describe the sound. What is the weather like in the city?",
    "the quick brown fox jumps over the lazy dog while the band plays a song",
    "please tell me a story about a gazelle running across the open plains at dawn",
]


def build_tokenizer(folder):
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=["\n"],
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    audio_index = tok.get_vocab_size()
    tok.add_special_tokens([AddedToken("<|audio|>", special=True, normalized=False)])
    assert tok.token_to_id("<|audio|>") == audio_index
    tok.save(os.path.join(folder, "tokenizer.json"))
    tok_cfg = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 512,
        "tokenizer_class": "LlamaTokenizer",
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(tok_cfg, f, indent=2)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(folder, "tokenizer.json"),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok, audio_index


def randomize(module, gen):
    """Give every parameter a spread that keeps activations O(1) and logits well separated."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1 or name.endswith("original0"):
                base = 1.0 if ("norm" in name or name.endswith("original0")) and "bias" not in name else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)


class Projector(torch.nn.Module):
    """GazelleProjector: stack 8 frames, RMSNorm, Linear, SwiGLU(silu of 2nd half), Linear, RMSNorm."""

    def __init__(self, audio_hidden, proj_hidden, text_hidden):
        super().__init__()
        self.ln_pre = torch.nn.Parameter(torch.ones(audio_hidden * STACK))
        self.linear_1 = torch.nn.Linear(audio_hidden * STACK, proj_hidden, bias=False)
        self.linear_2 = torch.nn.Linear(proj_hidden // 2, text_hidden, bias=False)
        self.ln_post = torch.nn.Parameter(torch.ones(text_hidden))

    @staticmethod
    def rms(x, w, eps=1e-6):
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return w * x.to(dtype)

    def forward(self, x):
        b, t, c = x.shape
        # The reference pads `STACK - t % STACK` frames: a whole extra group when t % 8 == 0.
        x = torch.nn.functional.pad(x, (0, 0, 0, STACK - t % STACK))
        x = x.view(b, x.shape[1] // STACK, c * STACK)
        x = self.rms(x, self.ln_pre)
        x = self.linear_1(x)
        first, gate = x.chunk(2, dim=-1)
        x = torch.nn.functional.silu(gate) * first
        x = self.linear_2(x)
        return self.rms(x, self.ln_post)


def make_audio(n, seed):
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000.0
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 1.5 * t)
    x = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.2 * env * np.sin(2 * np.pi * 557 * t)
    x = x + 0.05 * rng.standard_normal(n) + 0.02  # a DC offset so normalization matters
    return x.astype(np.float32)


VARIANTS = {
    # GQA: 4 query heads share 2 key/value heads, like Mistral-7B's 32/8.
    "mistral": dict(
        cls=MistralForCausalLM,
        cfg_cls=MistralConfig,
        text=dict(
            model_type="mistral",
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            rms_norm_eps=1e-5,
            rope_theta=1000000.0,
            sliding_window=None,
        ),
        pos_conv_names="parametrizations",
    ),
    # MHA, Llama-2 style (gazelle v0.1).
    "llama": dict(
        cls=LlamaForCausalLM,
        cfg_cls=LlamaConfig,
        text=dict(
            model_type="llama",
            hidden_size=64,
            intermediate_size=112,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=512,
            rms_norm_eps=1e-5,
        ),
        pos_conv_names="weight_g",
    ),
}

AUDIO = dict(
    model_type="wav2vec2",
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    conv_dim=[32] * 7,
)

# (samples, messages). 15600 samples -> 48 frames, a multiple of 8 (the extra-group quirk).
CLIPS = [
    (
        15600,
        [
            {"role": "system", "content": "You are a helpful voice assistant."},
            {"role": "user", "content": "Transcribe the audio. <|audio|>"},
        ],
    ),
    (23456, [{"role": "user", "content": "<|audio|>\nWhat did you hear?"}]),
]


def build_variant(name, spec):
    folder = os.path.join(OUT, name)
    os.makedirs(folder, exist_ok=True)
    gen = torch.Generator().manual_seed(1234 if name == "mistral" else 5678)
    hf_tok, audio_index = build_tokenizer(folder)
    vocab = audio_index + 1
    text_cfg = dict(spec["text"], vocab_size=vocab)
    proj_hidden = 128

    audio_tower = Wav2Vec2Model(Wav2Vec2Config(**{k: v for k, v in AUDIO.items() if k != "model_type"}))
    lm = spec["cls"](spec["cfg_cls"](**{k: v for k, v in text_cfg.items() if k != "model_type"}))
    proj = Projector(AUDIO["hidden_size"], proj_hidden, text_cfg["hidden_size"])
    for m in (audio_tower, lm, proj):
        randomize(m, gen)
        m.eval()

    config = {
        "architectures": ["GazelleForConditionalGeneration"],
        "model_type": "gazelle",
        "audio_config": AUDIO,
        "text_config": text_cfg,
        "audio_token_index": audio_index,
        "vocab_size": vocab,
        "hidden_size": proj_hidden,
        "stack_factor": STACK,
        "projector_type": "mlp",
        "torch_dtype": "float32",
    }
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)

    weights = {}
    for k, v in audio_tower.state_dict().items():
        if spec["pos_conv_names"] == "weight_g":
            k = k.replace("parametrizations.weight.original0", "weight_g")
            k = k.replace("parametrizations.weight.original1", "weight_v")
        weights["audio_tower." + k] = v
    for k in ("ln_pre", "ln_post"):
        weights[f"multi_modal_projector.{k}.weight"] = getattr(proj, k).data
    weights["multi_modal_projector.linear_1.weight"] = proj.linear_1.weight.data
    weights["multi_modal_projector.linear_2.weight"] = proj.linear_2.weight.data
    for k, v in lm.state_dict().items():
        weights["language_model." + k] = v
    save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(folder, "model.safetensors"),
              metadata={"format": "pt"})

    fe = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, do_normalize=True,
                                  return_attention_mask=False)
    embed = lm.get_input_embeddings()
    refs = {}
    for ci, (n, messages) in enumerate(CLIPS):
        audio = make_audio(n, seed=100 + ci)
        norm = fe(audio, sampling_rate=16000, return_tensors="pt").input_values.float()
        conv = {}
        hook = audio_tower.feature_extractor.register_forward_hook(
            lambda _m, _i, out: conv.__setitem__("x", out))
        with torch.no_grad():
            enc = audio_tower(norm).last_hidden_state
            hook.remove()
            feats = proj(enc)
            ids = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            ids = torch.tensor([ids], dtype=torch.long)
            pos = (ids[0] == audio_index).nonzero().flatten().tolist()
            assert len(pos) == 1, pos
            p = pos[0]
            text = embed(ids)
            merged = torch.cat([text[:, :p], feats, text[:, p + 1:]], dim=1)
            out = lm(inputs_embeds=merged, use_cache=True)
            logits = out.logits
            past = out.past_key_values
            tokens = []
            last = logits[:, -1]
            gaps = []
            for _ in range(GREEDY_STEPS):
                top2 = last[0].topk(2).values
                gaps.append(float(top2[0] - top2[1]))
                nxt = int(last.argmax(-1)[0])
                tokens.append(nxt)
                o = lm(input_ids=torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
                past = o.past_key_values
                last = o.logits[:, -1]
        c = f"c{ci}"
        # The same model run in bf16 by PyTorch: the reference for our bf16 path.
        with torch.no_grad():
            at, pj, lmb = (copy.deepcopy(m).to(torch.bfloat16) for m in (audio_tower, proj, lm))
            hook = at.feature_extractor.register_forward_hook(
                lambda _m, _i, out: conv.__setitem__("x16", out))
            enc16 = at(norm.to(torch.bfloat16)).last_hidden_state
            hook.remove()
            feats16 = pj(enc16)
            text16 = lmb.get_input_embeddings()(ids)
            merged16 = torch.cat([text16[:, :p], feats16, text16[:, p + 1:]], dim=1)
            logits16 = lmb(inputs_embeds=merged16).logits
        refs[f"{c}.bf16.conv_features"] = conv["x16"].float()
        refs[f"{c}.bf16.encoder_output"] = enc16.float()
        refs[f"{c}.bf16.projector_output"] = feats16.float()
        refs[f"{c}.bf16.merged_embeddings"] = merged16.float()
        refs[f"{c}.bf16.prefill_logits"] = logits16.float()
        err = float((logits16.float() - logits).abs().max() / logits.abs().max())
        print(f"{name} clip {ci}: torch bf16 vs f32 prefill logits rel err {err:.4f}")
        refs[f"{c}.audio"] = torch.from_numpy(audio)
        refs[f"{c}.normalized"] = norm[0]
        refs[f"{c}.conv_features"] = conv["x"]
        refs[f"{c}.encoder_output"] = enc
        refs[f"{c}.projector_output"] = feats
        refs[f"{c}.prompt_ids"] = ids[0].to(torch.int64)
        refs[f"{c}.merged_embeddings"] = merged
        refs[f"{c}.prefill_logits"] = logits
        refs[f"{c}.greedy_tokens"] = torch.tensor(tokens, dtype=torch.int64)
        print(f"{name} clip {ci}: samples {n} frames {enc.shape[1]} audio tokens {feats.shape[1]} "
              f"prompt {ids.shape[1]} merged {merged.shape[1]} min top-2 gap {min(gaps):.4f} "
              f"tokens {tokens}")
    save_file({k: v.contiguous() for k, v in refs.items()}, os.path.join(folder, "reference.safetensors"))
    prompts = {f"c{i}": {"samples": n, "messages": m} for i, (n, m) in enumerate(CLIPS)}
    with open(os.path.join(folder, "clips.json"), "w") as f:
        json.dump(prompts, f, indent=2)


# ---------------------------------------------------------------------------------------------
# The real-width fixture (tests/fixtures/gazelle/real-width). Every per-head and per-group shape
# of gazelle-v0.2 at few layers: the whole wav2vec2-base-960h width (768 hidden, 12 heads, 512-wide
# convolutions, a K=128 positional convolution in 16 groups of 48 channels) with 2 layers, the
# real 4096-wide projector, and a Mistral decoder with head_dim 128, 4:1 GQA, vocab 32001 and
# hidden 512 with 2 layers. tincans' own GazelleForConditionalGeneration saves it with
# `save_pretrained` in bf16 shards, the way the published checkpoint was saved, so config.json
# carries the same diff-form audio and text configs.
#
# Its ~180 MB of weights are not committed. Every value comes from a counter-based generator
# (`generated` below, recipe per tensor in shards.json) that the Rust test runs again; the test
# rebuilds each shard from its committed safetensors header and proves, by SHA-256, that the
# files it loads are byte for byte the ones save_pretrained wrote. Every generated value is exact
# in bf16, so the f32 reference runs the very weights the bf16 files hold.
#
#   /work/venv-tok/bin/pip install torch          # next to transformers 4.38.2
#   apt-get install sox                           # resamples the tincans clips to 16 kHz
#   python scripts/make_gazelle_fixtures.py real-width PATH/TO/tincans-ai/gazelle

REAL_WIDTH_SALT = "gazelle-real-width-1"
REAL_WIDTH_STEPS = 16
SLIDING_WINDOW = 256
SHARD_SIZE = "50MB"
# Our own words: long enough that the prompt plus the clip's audio tokens pass 512 positions, so
# the sliding-window variant masks in prefill and in every decode step.
LONG_INSTRUCTIONS = " ".join([
    "You are the voice of a small bakery that answers the telephone when the staff are busy.",
    "Callers ask about opening hours, the bread of the day, birthday cakes, allergies, deliveries",
    "and the price of a dozen rolls. Speak in short sentences, because every word you write is read",
    "aloud by a speech synthesizer and the caller cannot scroll back. Never read out lists longer",
    "than three items; offer to continue instead. When a caller sounds unsure, repeat the key fact",
    "once, plainly, and ask whether that helps. If the caller interrupts you, stop, listen, and",
    "answer the new question rather than finishing the old one. The bakery opens at seven in the",
    "morning on weekdays and at eight on Saturdays, and it closes at six in the evening, except on",
    "Sundays, when it stays closed all day. Rye, spelt and a plain white loaf are baked every day;",
    "the seeded sourdough comes out on Tuesdays and Fridays only, and it is usually gone by noon.",
    "Birthday cakes need two full days of notice, a name to write on top, and a deposit that the",
    "caller pays in the shop. Deliveries go to addresses within five kilometres, cost four euros,",
    "and leave at eleven and at three. Every product may contain traces of nuts, sesame, milk and",
    "eggs, because they share one kitchen, and you must say so whenever anyone mentions an",
    "allergy, even if they only ask in passing. Do not promise anything the staff cannot keep: no",
    "discounts, no special recipes, no delivery times other than the two above. If you do not know",
    "an answer, say that a baker will call back within the hour, and ask for a name and a number.",
    "Numbers must be spoken the way people say them, so write seven thirty rather than digits,",
    "and spell out units. Keep a friendly, calm tone; the callers are often in a hurry, and some",
    "of them are calling from a noisy street or a moving car. Now listen to the caller's message",
    "and answer it in one or two sentences.",
])


def fnv1a64(text):
    h = 0xCBF29CE484222325
    for b in text.encode("utf-8"):
        h = ((h ^ b) * 0x100000001B3) & ((1 << 64) - 1)
    return h


def generated(name, n, base, bits, shift):
    """Element i of tensor `name` is base + k * 2^-shift, where k is the top `bits` bits of
    splitmix64(fnv1a64(salt/name) + (i+1) * golden), centred on zero: exact in bf16."""
    seed = np.uint64(fnv1a64(REAL_WIDTH_SALT + "/" + name))
    i = np.arange(1, n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = seed + i * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    k = (z >> np.uint64(64 - bits)).astype(np.int64) - (1 << (bits - 1))
    return (base + k.astype(np.float64) * 2.0 ** -shift).astype(np.float32)


def recipe(name, shape):
    """(base, bits, shift) for one tensor: norm gains near 1, weight-norm gains near 2, biases
    within +-1/8, matrices uniform with std about 1/sqrt(fan_in)."""
    if name.endswith(("original0", "weight_g")):
        return (2.0, 5, 6)
    if len(shape) == 1:
        if name.endswith("weight") and any(s in name for s in ("norm", "ln_pre", "ln_post")):
            return (1.0, 5, 7)
        return (0.0, 8, 10)
    fan_in = int(np.prod(shape[1:]))
    return (0.0, 8, int(round(np.log2(73.9 * fan_in**0.5))))


def long_clip(folder):
    """test16 + 0.4 s silence + test6 + 0.4 s silence + test16, resampled to 16 kHz by sox."""
    import subprocess
    import tempfile
    import wave

    src = os.path.join(OUT, "..", "audio", "tincans")
    out = os.path.join(folder, "long.wav")
    with tempfile.TemporaryDirectory() as tmp:
        parts = []
        for i, name in enumerate(["test16", "test6", "test16"]):
            p = os.path.join(tmp, f"{i}.wav")
            pad = [] if i == 2 else ["pad", "0", "0.4"]
            subprocess.run(["sox", os.path.join(src, name + ".wav"), "-r", "16000", "-c", "1",
                            "-b", "16", p] + pad, check=True)
            parts.append(p)
        subprocess.run(["sox"] + parts + [out], check=True)
    with wave.open(out) as w:
        assert w.getframerate() == 16000 and w.getsampwidth() == 2 and w.getnchannels() == 1
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    return pcm.astype(np.float32) / 32768.0


def real_width_model(GazelleConfig, GazelleForConditionalGeneration, sliding_window):
    from transformers import MistralConfig, Wav2Vec2Config

    audio = Wav2Vec2Config(num_hidden_layers=2)  # everything else is wav2vec2-base-960h's
    text = MistralConfig(
        vocab_size=32001, hidden_size=512, intermediate_size=1792, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=32768,
        rms_norm_eps=1e-5, rope_theta=1000000.0, sliding_window=sliding_window,
    )
    cfg = GazelleConfig(audio_config=audio, text_config=text, audio_token_index=32000,
                        vocab_size=32001, stack_factor=8, attn_implementation="eager")
    model = GazelleForConditionalGeneration(cfg).eval()
    params = dict(model.named_parameters())
    assert set(params) == set(model.state_dict()), "every saved tensor must be a parameter"
    recipes = {}
    with torch.no_grad():
        for name, p in params.items():
            r = recipe(name, tuple(p.shape))
            recipes[name] = r
            p.copy_(torch.from_numpy(generated(name, p.numel(), *r)).view(p.shape))
    return model, recipes


def greedy(model, ids, audio_values, steps):
    """The tincans forward (its own splice) for the prompt, then the language model with the
    cache. Returns the prompt's last logits, the tokens and the smallest top-2 gap."""
    with torch.no_grad():
        out = model(input_ids=ids, audio_values=audio_values,
                    attention_mask=torch.ones_like(ids), use_cache=True)
        first = out.logits[0, -1].float()
        last, past, tokens, gaps = out.logits[:, -1], out.past_key_values, [], []
        for _ in range(steps):
            top2 = last[0].float().topk(2).values
            gaps.append(float(top2[0] - top2[1]))
            nxt = int(last.argmax(-1)[0])
            tokens.append(nxt)
            o = model.language_model(input_ids=torch.tensor([[nxt]]), past_key_values=past,
                                     use_cache=True)
            past, last = o.past_key_values, o.logits[:, -1]
    return first, tokens, min(gaps)


def build_real_width(tincans_dir):
    import hashlib
    import shutil
    import tempfile

    from safetensors import safe_open
    from transformers import AutoTokenizer

    sys.path.insert(0, tincans_dir)
    from gazelle import GazelleConfig, GazelleForConditionalGeneration

    folder = os.path.join(OUT, "real-width")
    os.makedirs(folder, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(os.path.join(OUT, "mistral-v1-tokenizer"))
    messages = [{"role": "user", "content": LONG_INSTRUCTIONS + "\n<|audio|>"}]
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = torch.tensor([list(ids)], dtype=torch.long)
    audio = long_clip(folder)
    fe = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, do_normalize=True,
                                  return_attention_mask=False)
    audio_values = fe(audio, sampling_rate=16000, return_tensors="pt").input_values.float()

    refs, shard_hashes, tmp = {}, None, tempfile.mkdtemp()
    for variant, window in (("full", None), ("sliding", SLIDING_WINDOW)):
        model, recipes = real_width_model(GazelleConfig, GazelleForConditionalGeneration, window)
        saved = os.path.join(tmp, variant)
        copy.deepcopy(model).to(torch.bfloat16).save_pretrained(
            saved, max_shard_size=SHARD_SIZE, safe_serialization=True)
        shards = sorted(f for f in os.listdir(saved) if f.endswith(".safetensors"))
        hashes = {}
        for f in shards:
            data = open(os.path.join(saved, f), "rb").read()
            hashes[f] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            with safe_open(os.path.join(saved, f), "pt") as st:
                for k in st.keys():
                    t = st.get_tensor(k)
                    assert t.dtype == torch.bfloat16, (k, t.dtype)
                    want = torch.from_numpy(generated(k, t.numel(), *recipes[k])).view(t.shape)
                    assert torch.equal(t.float(), want), f"{k} is not exact in bf16"
        if shard_hashes is None:
            shard_hashes = hashes
            for f in shards:
                data = open(os.path.join(saved, f), "rb").read()
                n = int.from_bytes(data[:8], "little")
                with open(os.path.join(folder, f + ".header"), "wb") as h:
                    h.write(data[: 8 + n])
            shutil.copy(os.path.join(saved, "model.safetensors.index.json"), folder)
            shutil.copy(os.path.join(saved, "config.json"), os.path.join(folder, "config.json"))
            with open(os.path.join(folder, "shards.json"), "w") as f:
                json.dump({"salt": REAL_WIDTH_SALT, "shards": hashes,
                           "tensors": {k: list(v) for k, v in sorted(recipes.items())}},
                          f, indent=1)
            with torch.no_grad():
                enc = model.audio_tower(audio_values).last_hidden_state
                proj = model.multi_modal_projector(enc)
            frames = enc.shape[1]
            refs["encoder_rows"] = enc[0, [0, frames // 2, frames - 1]].contiguous()
            refs["projector_output"] = proj[0].contiguous()
            refs["prompt_ids"] = ids[0]
            refs["frames"] = torch.tensor([frames])
        else:
            assert hashes == shard_hashes, "the two variants must share their shards"
            shutil.copy(os.path.join(saved, "config.json"),
                        os.path.join(folder, "config.sliding-window.json"))
        logits, tokens, gap = greedy(model, ids, audio_values, REAL_WIDTH_STEPS)
        bf = copy.deepcopy(model).to(torch.bfloat16)
        logits16, tokens16, _ = greedy(bf, ids, audio_values.to(torch.bfloat16), REAL_WIDTH_STEPS)
        refs[f"{variant}.last_logits"] = logits
        refs[f"{variant}.greedy_tokens"] = torch.tensor(tokens)
        refs[f"{variant}.bf16.last_logits"] = logits16
        refs[f"{variant}.bf16.greedy_tokens"] = torch.tensor(tokens16)
        err = float((logits16 - logits).abs().max() / logits.abs().max())
        same = next((i for i, (a, b) in enumerate(zip(tokens, tokens16)) if a != b), len(tokens))
        positions = ids.shape[1] - 1 + proj.shape[1]
        print(f"{variant}: samples {len(audio)} frames {frames} audio tokens {proj.shape[1]} "
              f"prompt ids {ids.shape[1]} positions {positions} min top-2 gap {gap:.4f}\n"
              f"  tokens {tokens}\n  torch bf16 vs f32 last logits max-rel {err:.4f}, "
              f"first {same} of {len(tokens)} greedy tokens equal")
    d = float((refs["full.last_logits"] - refs["sliding.last_logits"]).abs().max())
    print(f"sliding vs full last logits: max |diff| {d:.4f}")
    save_file({k: v.contiguous() for k, v in refs.items()},
              os.path.join(folder, "reference.safetensors"))
    with open(os.path.join(folder, "prompt.json"), "w") as f:
        json.dump({"messages": messages, "steps": REAL_WIDTH_STEPS}, f, indent=1)
    shutil.rmtree(tmp)


def main():
    if sys.argv[1:2] == ["real-width"]:
        build_real_width(sys.argv[2])
        return
    torch.manual_seed(0)
    only = sys.argv[1:]
    for name, spec in VARIANTS.items():
        if not only or name in only:
            build_variant(name, spec)


if __name__ == "__main__":
    main()
