#!/usr/bin/env python3
"""Generate tiny random Wav2Vec2 checkpoints + reference outputs for the Rust tests.

Writes, under ``tests/fixtures/w2v2/``:

* ``<variant>/config.json``               - transformers ``save_pretrained`` config
* ``<variant>/model.safetensors``         - weights (post-processed per variant, see below)
* ``<variant>/preprocessor_config.json``  - ``Wav2Vec2FeatureExtractor.save_pretrained``
* ``<variant>/vocab.json``                - CTC vocabulary (``stable-ctc-f16`` only)
* ``<variant>/reference.safetensors``     - float32 reference activations (masks int64)
* ``README.md``                           - description of the fixtures

Variants:

* ``base-group-oldwn``  Wav2Vec2Model, group-norm feature encoder, post-norm encoder, no conv bias;
  the positional-conv weight-norm tensors are renamed to the OLD
  ``encoder.pos_conv_embed.conv.weight_g`` / ``weight_v`` names after saving.
* ``stable-ctc-f16``    Wav2Vec2ForCTC, layer-norm feature encoder, stable (pre-norm) encoder,
  conv bias, odd ``num_conv_pos_embeddings=15``; weights saved as float16.
* ``cls-weighted``      Wav2Vec2ForSequenceClassification with ``use_weighted_layer_sum``.
* ``pretraining-bf16``  Wav2Vec2ForPreTraining (quantizer, project_q, project_hid), gelu_new,
  weights saved as bfloat16; references are the base ``model.wav2vec2`` outputs.

References for the f16/bf16 variants are computed from the saved (rounded) checkpoint loaded back
with ``dtype=torch.float32``.  All references use ``attn_implementation="eager"`` on CPU with one
thread, fixed seeds, ``model.eval()``.

Run from the repository root (CPU only, a few seconds):

    /work/venv/bin/python tools/gen_wav2vec2_fixtures.py
    # or, after `python -m venv .venv && .venv/bin/pip install -r tools/requirements.txt`:
    .venv/bin/python tools/gen_wav2vec2_fixtures.py

The script is deterministic: re-running it rewrites byte-identical weights and references
(given the pinned versions in tools/requirements.txt).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import transformers
from transformers import (
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2ForCTC,
    Wav2Vec2ForPreTraining,
    Wav2Vec2ForSequenceClassification,
    Wav2Vec2Model,
)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "w2v2"

SAMPLE_RATE = 16000
SINGLE_LEN = 4000
PADDED_LENS = [4000, 3100, 2222]

TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    conv_dim=[16, 16, 16],
    conv_kernel=[10, 3, 2],
    conv_stride=[5, 2, 2],
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=4,
    vocab_size=12,
    hidden_act="gelu",
    feat_extract_activation="gelu",
    layer_norm_eps=1e-5,
    # dropouts are inactive in eval() anyway; set to 0 so the config says so too
    hidden_dropout=0.0,
    activation_dropout=0.0,
    attention_dropout=0.0,
    feat_proj_dropout=0.0,
    feat_quantizer_dropout=0.0,
    final_dropout=0.0,
    layerdrop=0.0,
    # mask_time_prob stays at the default 0.05 so that `masked_spec_embed` exists in the checkpoint
)

VOCAB = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4,
         "A": 5, "B": 6, "C": 7, "D": 8, "E": 9, "F": 10, "G": 11}

ID2LABEL = {0: "yes", 1: "no", 2: "up", 3: "down"}

VARIANTS = {
    "base-group-oldwn": dict(
        cls=Wav2Vec2Model,
        seed=1001,
        config=dict(feat_extract_norm="group", do_stable_layer_norm=False, conv_bias=False),
        save_dtype=torch.float32,
        old_weight_norm_names=True,
        return_attention_mask=False,
        head="none",
    ),
    "stable-ctc-f16": dict(
        cls=Wav2Vec2ForCTC,
        seed=1002,
        config=dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True,
                    num_conv_pos_embeddings=15, pad_token_id=0),
        save_dtype=torch.float16,
        old_weight_norm_names=False,
        return_attention_mask=True,
        head="ctc",
    ),
    "cls-weighted": dict(
        cls=Wav2Vec2ForSequenceClassification,
        seed=1003,
        config=dict(feat_extract_norm="group", do_stable_layer_norm=False, conv_bias=False,
                    use_weighted_layer_sum=True, classifier_proj_size=16, num_labels=4,
                    id2label=dict(ID2LABEL), label2id={v: k for k, v in ID2LABEL.items()}),
        save_dtype=torch.float32,
        old_weight_norm_names=False,
        return_attention_mask=False,
        head="cls",
    ),
    "pretraining-bf16": dict(
        cls=Wav2Vec2ForPreTraining,
        seed=1004,
        config=dict(feat_extract_norm="group", do_stable_layer_norm=False, conv_bias=False,
                    hidden_act="gelu_new", codevector_dim=16, proj_codevector_dim=16,
                    num_codevectors_per_group=8, num_codevector_groups=2),
        save_dtype=torch.bfloat16,
        old_weight_norm_names=False,
        return_attention_mask=False,
        head="none",
    ),
}

NEW_G = "encoder.pos_conv_embed.conv.parametrizations.weight.original0"
NEW_V = "encoder.pos_conv_embed.conv.parametrizations.weight.original1"
OLD_G = "encoder.pos_conv_embed.conv.weight_g"
OLD_V = "encoder.pos_conv_embed.conv.weight_v"


# ----------------------------------------------------------------------------- inputs

def normalize(x: np.ndarray) -> np.ndarray:
    """Zero-mean unit-variance, same formula as Wav2Vec2FeatureExtractor (float32 math)."""
    x = x.astype(np.float32)
    return ((x - x.mean()) / np.sqrt(x.var() + 1e-7)).astype(np.float32)


def make_wave(n: int, freqs, rng: np.random.RandomState) -> np.ndarray:
    t = np.arange(n, dtype=np.float64) / SAMPLE_RATE
    x = np.zeros(n, dtype=np.float64)
    for i, f in enumerate(freqs):
        x += (0.5 / (i + 1)) * np.sin(2 * np.pi * f * t + 0.3 * i)
    x += 0.1 * rng.randn(n)
    return x.astype(np.float32)


def make_inputs():
    rng = np.random.RandomState(1234)
    raw0 = make_wave(PADDED_LENS[0], [220.0, 445.0, 1330.0], rng)
    raw1 = make_wave(PADDED_LENS[1], [180.0, 910.0, 2500.0], rng)
    raw2 = make_wave(PADDED_LENS[2], [310.0, 620.0, 3700.0, 95.0], rng)
    single = normalize(raw0)[None, :]  # [1, 4000]; identical to padded row 0
    clips = [normalize(r) for r in (raw0, raw1, raw2)]
    T = max(PADDED_LENS)
    padded = np.zeros((len(clips), T), dtype=np.float32)
    mask = np.zeros((len(clips), T), dtype=np.int64)
    for i, c in enumerate(clips):
        padded[i, : len(c)] = c
        mask[i, : len(c)] = 1
    return torch.from_numpy(single), torch.from_numpy(padded), torch.from_numpy(mask), clips


# ----------------------------------------------------------------------------- model

def make_config(spec) -> Wav2Vec2Config:
    kw = dict(TINY)
    kw.update(spec["config"])
    return Wav2Vec2Config(**kw)


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)

    def randn(shape):
        return torch.randn(shape, generator=g, dtype=torch.float32)

    for _, module in model.named_modules():
        if isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)) and module.weight is not None:
            module.weight.copy_(1.0 + 0.1 * randn(module.weight.shape))
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.copy_(0.1 * randn(p.shape))
        elif name.endswith("masked_spec_embed"):
            p.copy_(torch.rand(p.shape, generator=g))
        elif name.endswith("parametrizations.weight.original0") or name.endswith("weight_g"):
            p.mul_(1.0 + 0.1 * randn(p.shape))
        elif name == "layer_weights":
            p.copy_(randn(p.shape))


def base_of(model):
    return model if isinstance(model, Wav2Vec2Model) else model.wav2vec2


@torch.no_grad()
def run_all(model, head: str, single, padded, mask, clips) -> dict[str, torch.Tensor]:
    model.eval()
    base = base_of(model)
    n_layers = model.config.num_hidden_layers
    ref: dict[str, torch.Tensor] = {}

    def record(prefix, x, m):
        out = base(x, attention_mask=m, output_hidden_states=True)
        ref[f"{prefix}.last_hidden_state"] = out.last_hidden_state
        ref[f"{prefix}.extract_features"] = out.extract_features
        assert len(out.hidden_states) == n_layers + 1
        for i, h in enumerate(out.hidden_states):
            ref[f"{prefix}.hidden_states.{i}"] = h
        if head != "none":
            ref[f"{prefix}.logits"] = model(x, attention_mask=m).logits

    ref["single.input_values"] = single
    record("single", single, None)
    ref["padded.input_values"] = padded
    ref["padded.attention_mask"] = mask
    record("padded", padded, mask)
    if head == "cls":
        for k, c in enumerate(clips):
            ref[f"unpadded.{k}.logits"] = model(torch.from_numpy(c)[None, :]).logits
    out = {}
    for k, v in ref.items():
        v = v.detach().clone().contiguous()  # clone: hidden_states[-1] may alias last_hidden_state
        out[k] = v.to(torch.int64) if k.endswith("attention_mask") else v.to(torch.float32)
    return out


def load(spec, path, attn="eager"):
    model, info = spec["cls"].from_pretrained(
        path, dtype=torch.float32, attn_implementation=attn, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in
                ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")}
    if problems:
        raise RuntimeError(f"{path}: loading problems {problems}")
    model.eval()
    return model


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b), set(a) ^ set(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def rename_weight_norm_to_old(path: Path) -> None:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    sd = load_file(str(path))
    if NEW_G in sd:
        sd[OLD_G] = sd.pop(NEW_G)
        sd[OLD_V] = sd.pop(NEW_V)
    assert OLD_G in sd and OLD_V in sd, sorted(sd)
    save_file(sd, str(path), metadata=meta or {"format": "pt"})


# ----------------------------------------------------------------------------- main

def gen_variant(name, spec, inputs) -> dict:
    single, padded, mask, clips = inputs
    d = OUT / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)

    torch.manual_seed(spec["seed"])
    np.random.seed(spec["seed"])
    config = make_config(spec)
    model = spec["cls"](config)
    perturb(model, spec["seed"] + 7)
    model.eval()
    model.set_attn_implementation("eager")  # reference path is eager attention

    with tempfile.TemporaryDirectory() as tmp:
        copy.deepcopy(model).to(spec["save_dtype"]).save_pretrained(tmp, safe_serialization=True)
        shutil.copy(Path(tmp) / "config.json", d / "config.json")
        shutil.copy(Path(tmp) / "model.safetensors", d / "model.safetensors")
        leftovers = sorted(set(os.listdir(tmp)) - {"config.json", "model.safetensors"})
    if leftovers:
        print(f"  note: save_pretrained also wrote {leftovers} (not copied)")

    if spec["old_weight_norm_names"]:
        rename_weight_norm_to_old(d / "model.safetensors")

    fe = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0,
                                  do_normalize=True, return_attention_mask=spec["return_attention_mask"])
    fe.save_pretrained(str(d))
    if spec["head"] == "ctc":
        (d / "vocab.json").write_text(json.dumps(VOCAB, indent=2, ensure_ascii=False) + "\n")

    stats = {}
    if spec["save_dtype"] == torch.float32:
        ref = run_all(model, spec["head"], single, padded, mask, clips)
    else:
        # reference = rounded checkpoint upcast to f32
        inmem = run_all(model, spec["head"], single, padded, mask, clips)
        model = load(spec, d)
        ref = run_all(model, spec["head"], single, padded, mask, clips)
        stats["f32_vs_rounded_ckpt"] = max_diff(inmem, ref)

    # a single metadata key: safetensors writes the metadata map in hash order, so several keys would
    # make the file bytes non-reproducible
    save_file(ref, str(d / "reference.safetensors"), metadata={"info": json.dumps({
        "variant": name, "transformers": transformers.__version__,
        "torch": torch.__version__, "attn_implementation": "eager"}, sort_keys=True)})

    # ---- sanity: reload the folder with transformers and compare
    stats["reload_eager"] = max_diff(ref, run_all(load(spec, d, "eager"), spec["head"], single, padded, mask, clips))
    stats["reload_sdpa"] = max_diff(ref, run_all(load(spec, d, "sdpa"), spec["head"], single, padded, mask, clips))

    # informational: padding invariance of the padded batch vs. each clip alone
    m2 = load(spec, d)
    with torch.no_grad():
        worst = 0.0
        for k, c in enumerate(clips):
            alone = base_of(m2)(torch.from_numpy(c)[None, :]).last_hidden_state[0]
            n = alone.shape[0]
            worst = max(worst, float((alone - ref["padded.last_hidden_state"][k, :n]).abs().max()))
        stats["padded_vs_alone_last_hidden_valid_frames"] = worst
        if spec["head"] == "cls":
            stats["padded_vs_unpadded_logits"] = float(
                (ref["padded.logits"] - torch.cat([ref[f"unpadded.{k}.logits"] for k in range(3)])).abs().max())
        # v5 semantics check for hidden_states[-1]
        stats["hidden_states[-1]_minus_last_hidden_state"] = float(
            (ref[f"single.hidden_states.{config.num_hidden_layers}"] - ref["single.last_hidden_state"]).abs().max())

    with safe_open(str(d / "model.safetensors"), "pt") as f:
        keys = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    stats["keys"] = keys
    stats["ref_shapes"] = {k: tuple(v.shape) for k, v in ref.items()}
    return stats


def write_readme(all_stats) -> None:
    tiny = json.dumps(TINY, indent=2)
    lines = [
        "# Wav2Vec2 test fixtures",
        "",
        "Tiny random Wav2Vec2 checkpoints and float32 reference activations produced by Hugging Face",
        f"transformers {transformers.__version__} with torch {torch.__version__} (CPU, 1 thread,",
        "`attn_implementation=\"eager\"`, `model.eval()`).",
        "",
        "Regenerate (from the repository root):",
        "",
        "```",
        "python -m venv .venv && .venv/bin/pip install -r tools/requirements.txt",
        ".venv/bin/python tools/gen_wav2vec2_fixtures.py",
        "```",
        "",
        "## Shared tiny config",
        "",
        "```json",
        tiny,
        "```",
        "",
        "Everything else is the `Wav2Vec2Config` default (e.g. `mask_time_prob=0.05`, so `masked_spec_embed`",
        "exists; `num_feat_extract_layers=3`). After construction the parameters are perturbed so loading",
        "mistakes show: every LayerNorm/GroupNorm weight = 1 + 0.1*randn, every parameter named `*bias`",
        "(linear, conv, norm) = 0.1*randn, `masked_spec_embed` ~ U(0,1), pos-conv weight-norm `g` multiplied",
        "by (1 + 0.1*randn), `layer_weights` (cls-weighted) = randn. Other weights keep the HF init.",
        "",
        "## Variants",
        "",
        "| folder | class | feat_extract_norm | encoder | conv_bias | other | weights dtype |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        "| `base-group-oldwn` | Wav2Vec2Model | group | post-norm | no | pos-conv weight norm stored as OLD `encoder.pos_conv_embed.conv.weight_g`/`weight_v` | f32 |",
        "| `stable-ctc-f16` | Wav2Vec2ForCTC | layer | stable (pre-norm) | yes | `num_conv_pos_embeddings=15` (odd: no SamePad trim), `pad_token_id=0`, `vocab.json` | f16 |",
        "| `cls-weighted` | Wav2Vec2ForSequenceClassification | group | post-norm | no | `use_weighted_layer_sum`, `classifier_proj_size=16`, 4 labels yes/no/up/down | f32 |",
        "| `pretraining-bf16` | Wav2Vec2ForPreTraining | group | post-norm | no | `hidden_act=gelu_new`, codevector_dim=16, proj_codevector_dim=16, 2 groups x 8 codevectors | bf16 |",
        "",
        "Keys: `base-group-oldwn` is a bare Wav2Vec2Model (no `wav2vec2.` prefix); the other three carry",
        "the `wav2vec2.` prefix as transformers writes them and keep the new",
        "`...pos_conv_embed.conv.parametrizations.weight.original0` (g, shape [1,1,K]: weight norm over",
        "dim=2) / `original1` (v, shape [32, 32/groups, K]) names.",
        "",
        "For the f16/bf16 variants the references were computed from the saved checkpoint loaded back with",
        "`dtype=torch.float32` (i.e. rounded weights upcast to f32). For `pretraining-bf16` the reference is",
        "the base encoder `model.wav2vec2(...)` only.",
        "",
        "`preprocessor_config.json` is `Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000,",
        "padding_value=0.0, do_normalize=True, return_attention_mask=...)` (True for `stable-ctc-f16`, False",
        "otherwise).",
        "",
        "## reference.safetensors",
        "",
        "All float32 except `padded.attention_mask` (int64). F = frames after the conv feature encoder",
        "(199 for 4000 samples; 154 for 3100; 110 for 2222).",
        "",
        "* `single.input_values` [1, 4000]: sum of sines + 0.1*noise, normalised (x-mean)/sqrt(var+1e-7).",
        "* `single.last_hidden_state` [1, F, 32], `single.extract_features` [1, F, 16] (the feature-projection",
        "  LayerNorm output, as returned by the base model), `single.hidden_states.{0,1,2}` [1, F, 32].",
        "* `single.logits`: CTC [1, F, 12] (`stable-ctc-f16`), classification [1, 4] (`cls-weighted`).",
        "* `padded.input_values` [3, 4000], `padded.attention_mask` [3, 4000]: clips of 4000, 3100, 2222",
        "  samples, each normalised on its own valid part, zero padded. Row 0 equals `single.input_values`.",
        "  `padded.last_hidden_state`, `padded.extract_features`, `padded.hidden_states.{i}`, `padded.logits`",
        "  computed with `attention_mask=padded.attention_mask`. Values at padded frames are whatever",
        "  transformers produces there (not zero); compare valid frames if your implementation differs there.",
        "* `unpadded.{0,1,2}.logits` [1, 4] (`cls-weighted` only): each clip run alone, no padding, no mask.",
        "",
        "### hidden_states semantics (transformers 5.x)",
        "",
        "`hidden_states.0` is the input to encoder layer 0: for post-norm encoders",
        "`LayerNorm(x + pos_conv(x))`, for the stable encoder `x + pos_conv(x)` (no norm). `hidden_states.i`",
        "(i >= 1) is the raw output of layer i-1. For the stable (pre-norm) encoder the final",
        "`encoder.layer_norm` is applied only to `last_hidden_state`, NOT to `hidden_states.2`",
        "(transformers 4.x appended the normed state as the last hidden state instead). For post-norm",
        "encoders `hidden_states.2 == last_hidden_state`.",
        "",
        "### Padding / attention mask (what transformers derives from `attention_mask`)",
        "",
        "1. Frame lengths: `L = attention_mask.sum(-1)`, then for each conv layer",
        "   `L = (L - kernel) // stride + 1` -> 199 / 154 / 110 frames.",
        "2. Frame mask: `frame_mask[b, t] = t < L[b]`.",
        "3. Encoder input: the feature-projection output is set to 0 at masked frames (before pos-conv).",
        "4. Attention (eager): additive bias of `finfo(float32).min` on masked KEY positions, 0 elsewhere,",
        "   shape [B, 1, T, T]; padded query rows are still computed (so padded-frame outputs are not 0).",
        "5. Sequence classification: after `projector`, masked frames are zeroed and the pooled output is",
        "   `sum / L` (plain mean over all frames when no mask is given).",
        "6. The conv feature encoder itself ignores the mask: with `feat_extract_norm=\"group\"` the",
        "   GroupNorm statistics include the zero padding, hence the group variants are not padding",
        "   invariant (`cls-weighted`: max |padded.logits - unpadded.k.logits| = "
        + f"{all_stats['cls-weighted']['padded_vs_unpadded_logits']:.3g}).",
        "",
        "Batched vs. single runs of the same clip differ by ~2e-6 (float32 matmul blocking), so use an",
        "absolute tolerance around 1e-5 (f32 weights) when comparing.",
        "",
        "## Sanity checks at generation time (max |diff| vs. the saved reference)",
        "",
        "| variant | reload eager | reload sdpa | padded vs clip-alone (valid frames of last_hidden_state) |",
        "| --- | --- | --- | --- |",
    ]
    for name, s in all_stats.items():
        lines.append(f"| `{name}` | {s['reload_eager']:.3g} | {s['reload_sdpa']:.3g} | "
                     f"{s['padded_vs_alone_last_hidden_valid_frames']:.3g} |")
    lines += [
        "",
        "Group-norm feature encoders (`feat_extract_norm=\"group\"`) normalise each channel over the whole",
        "padded time axis, so they are not padding invariant; the stable/layer-norm variant is.",
        "",
    ]
    (OUT / "README.md").write_text("\n".join(lines))


def main() -> int:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    OUT.mkdir(parents=True, exist_ok=True)
    inputs = make_inputs()
    all_stats = {}
    for name, spec in VARIANTS.items():
        print(f"== {name} ({spec['cls'].__name__}, weights {spec['save_dtype']})")
        s = gen_variant(name, spec, inputs)
        all_stats[name] = s
        for k, v in s.items():
            if k in ("keys", "ref_shapes"):
                continue
            print(f"  {k}: {v:.3g}")
        print(f"  {len(s['keys'])} tensors in model.safetensors, {len(s['ref_shapes'])} in reference.safetensors")
        if s["reload_eager"] > 1e-6 or s["reload_sdpa"] > 1e-5:
            print("  ERROR: reload mismatch", file=sys.stderr)
            return 1
    write_readme(all_stats)
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT.relative_to(ROOT)} ({total / 1024:.1f} KiB total)")
    for p in sorted(OUT.rglob("*")):
        if p.is_file():
            print(f"  {p.relative_to(ROOT)}  {p.stat().st_size} B")
    return 0


if __name__ == "__main__":
    sys.exit(main())
