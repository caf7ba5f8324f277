#!/usr/bin/env python3
"""Generate reference fixtures for the audio front-ends (Wav2Vec2FeatureExtractor, Kaldi fbank).

Writes, under ``tests/fixtures/features/``:

* ``feature_extractor.safetensors`` - raw waves ``wave.0..3`` and the outputs of
  ``transformers.Wav2Vec2FeatureExtractor`` for settings A, B and C
* ``preprocessor_A.json``, ``preprocessor_B.json`` - exactly what ``save_pretrained`` writes
* ``fbank.safetensors`` - waves ``wave.0..2`` and ``torchaudio.compliance.kaldi.fbank`` outputs
  for the settings ``default`` and ``hamming40``
* ``fbank_settings.json`` - the exact keyword arguments passed to ``kaldi.fbank``
* ``README.md``

Run from the repository root (CPU only, about a second):

    /work/venv/bin/python tools/gen_feature_fixtures.py
    # or, after `python -m venv .venv && .venv/bin/pip install -r tools/requirements.txt`:
    .venv/bin/python tools/gen_feature_fixtures.py

Deterministic (fixed numpy / torch seeds).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file as save_np

import transformers
from transformers import Wav2Vec2FeatureExtractor

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "features"
SR = 16000

# ----------------------------------------------------------------------------- feature extractor

FE_SETTINGS = {
    "A": dict(feature_size=1, sampling_rate=SR, padding_value=0.0, do_normalize=True, return_attention_mask=True),
    "B": dict(feature_size=1, sampling_rate=SR, padding_value=0.5, do_normalize=False, return_attention_mask=False),
    # the wav2vec2-base preprocessor: transformers normalizes each padded row, padding included
    "D": dict(feature_size=1, sampling_rate=SR, padding_value=0.0, do_normalize=True, return_attention_mask=False),
}


def gen_feature_extractor() -> dict:
    rng = np.random.RandomState(2024)
    waves = [(rng.randn(n) * 0.3 + 0.05).astype(np.float32) for n in (1600, 2345, 999)]
    wave3 = np.full(500, 0.25, dtype=np.float32)

    tensors: dict[str, np.ndarray] = {f"wave.{i}": w for i, w in enumerate(waves)}
    tensors["wave.3"] = wave3
    extractors = {}
    for name, kw in FE_SETTINGS.items():
        with tempfile.TemporaryDirectory() as tmp:
            Wav2Vec2FeatureExtractor(**kw).save_pretrained(tmp)
            shutil.copy(Path(tmp) / "preprocessor_config.json", OUT / f"preprocessor_{name}.json")
        # construct the extractor from the JSON exactly as a user would
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(OUT / f"preprocessor_{name}.json", Path(tmp) / "preprocessor_config.json")
            extractors[name] = Wav2Vec2FeatureExtractor.from_pretrained(tmp)

    def call(fe, ws):
        return fe(ws, padding="longest", sampling_rate=SR, return_tensors="np")

    for name in ("A", "B", "D"):
        out = call(extractors[name], waves)
        tensors[f"{name}.input_values"] = np.ascontiguousarray(out["input_values"], dtype=np.float32)
        if "attention_mask" in out:
            tensors[f"{name}.attention_mask"] = np.ascontiguousarray(out["attention_mask"], dtype=np.int64)
    out = call(extractors["A"], [wave3])
    tensors["C.input_values"] = np.ascontiguousarray(out["input_values"], dtype=np.float32)
    if "attention_mask" in out:
        tensors["C.attention_mask"] = np.ascontiguousarray(out["attention_mask"], dtype=np.int64)

    # single metadata key: safetensors writes the metadata map in hash order (non-reproducible bytes otherwise)
    save_np(tensors, str(OUT / "feature_extractor.safetensors"), metadata={
        "info": json.dumps({"transformers": transformers.__version__}, sort_keys=True)})

    # sanity: A row i == (w - mean) / sqrt(var + 1e-7) on the valid part, 0 elsewhere
    worst = 0.0
    for i, w in enumerate(waves):
        exp = (w - w.mean()) / np.sqrt(w.var() + 1e-7)
        row = tensors["A.input_values"][i]
        worst = max(worst, float(np.abs(row[: len(w)] - exp).max()), float(np.abs(row[len(w):]).max(initial=0)))
    return {k: (v.shape, v.dtype) for k, v in tensors.items()} | {"_A_recompute_maxdiff": worst}


# ----------------------------------------------------------------------------- fbank

FBANK_DEFAULTS = dict(
    blackman_coeff=0.42, channel=-1, dither=0.0, energy_floor=1.0, frame_length=25.0, frame_shift=10.0,
    high_freq=0.0, htk_compat=False, low_freq=20.0, min_duration=0.0, num_mel_bins=23,
    preemphasis_coefficient=0.97, raw_energy=True, remove_dc_offset=True, round_to_power_of_two=True,
    sample_frequency=16000.0, snip_edges=True, subtract_mean=False, use_energy=False, use_log_fbank=True,
    use_power=True, vtln_high=-500.0, vtln_low=100.0, vtln_warp=1.0, window_type="povey",
)

FBANK_SETTINGS = {
    "default": dict(FBANK_DEFAULTS, num_mel_bins=80, sample_frequency=16000.0, dither=0.0),
    "hamming40": dict(FBANK_DEFAULTS, num_mel_bins=40, window_type="hamming", preemphasis_coefficient=0.0,
                      remove_dc_offset=False, low_freq=60.0, high_freq=7600.0, dither=0.0,
                      frame_length=32.0, frame_shift=16.0, round_to_power_of_two=True, snip_edges=True),
}
INPUT_SCALE = 32768.0


def gen_fbank() -> dict:
    try:
        import torchaudio.compliance.kaldi as kaldi
    except Exception as e:  # pragma: no cover - environment problem, reported loudly
        print(f"ERROR: torchaudio unavailable ({e}); install the pinned tools/requirements.txt", file=sys.stderr)
        raise

    import inspect
    params = set(inspect.signature(kaldi.fbank).parameters) - {"waveform"}
    for name, kw in FBANK_SETTINGS.items():
        assert set(kw) == params, (name, set(kw) ^ params)

    rng = np.random.RandomState(77)
    # wave.0: 1 s linear chirp 200 -> 4000 Hz + 0.01 noise
    t = np.arange(SR, dtype=np.float64) / SR
    f0, f1, dur = 200.0, 4000.0, 1.0
    phase = 2 * np.pi * (f0 * t + 0.5 * (f1 - f0) / dur * t * t)
    w0 = 0.8 * np.sin(phase) + 0.01 * rng.randn(SR)
    # wave.1: 7777 samples of noise + sines
    t1 = np.arange(7777, dtype=np.float64) / SR
    w1 = 0.3 * np.sin(2 * np.pi * 330 * t1) + 0.2 * np.sin(2 * np.pi * 1870 * t1 + 1.0) + 0.15 * rng.randn(7777)
    # wave.2: exactly one 25 ms frame
    t2 = np.arange(400, dtype=np.float64) / SR
    w2 = 0.5 * np.sin(2 * np.pi * 1000 * t2) + 0.05 * rng.randn(400)
    waves = [np.clip(w, -1.0, 1.0).astype(np.float32) for w in (w0, w1, w2)]

    tensors: dict[str, np.ndarray] = {f"wave.{i}": w for i, w in enumerate(waves)}
    info = {}
    f32_vs_f64 = 0.0
    for name, kw in FBANK_SETTINGS.items():
        for i, w in enumerate(waves):
            x64 = torch.from_numpy(w.astype(np.float64)).unsqueeze(0) * INPUT_SCALE
            try:
                feats64 = kaldi.fbank(x64, **kw)
            except Exception as e:  # wave shorter than one frame for this setting
                info[f"{name}.{i}"] = f"not written: {e}"
                continue
            feats32 = kaldi.fbank(torch.from_numpy(w).unsqueeze(0) * INPUT_SCALE, **kw)
            assert feats64.dtype == torch.float64
            f32_vs_f64 = max(f32_vs_f64, float((feats64 - feats32.double()).abs().max()))
            tensors[f"{name}.{i}"] = np.ascontiguousarray(feats64.numpy().astype(np.float32))
            info[f"{name}.{i}"] = tuple(feats64.shape)

    save_np(tensors, str(OUT / "fbank.safetensors"), metadata={"info": json.dumps({
        "torch": torch.__version__, "input_scale": INPUT_SCALE, "compute_dtype": "float64"}, sort_keys=True)})
    (OUT / "fbank_settings.json").write_text(json.dumps(FBANK_SETTINGS, indent=2) + "\n")
    info["_f32_vs_f64_maxdiff"] = f32_vs_f64
    return info


def write_readme(fe_info, fb_info) -> None:
    import torchaudio
    missing = {k: v for k, v in fb_info.items() if isinstance(v, str)}
    lines = [
        "# Audio front-end fixtures",
        "",
        f"Generated with transformers {transformers.__version__}, torch {torch.__version__},",
        f"torchaudio {torchaudio.__version__}, numpy {np.__version__} (CPU):",
        "",
        "```",
        "python -m venv .venv && .venv/bin/pip install -r tools/requirements.txt",
        ".venv/bin/python tools/gen_feature_fixtures.py",
        "```",
        "",
        "## feature_extractor.safetensors (Wav2Vec2FeatureExtractor)",
        "",
        "* `wave.0` [1600], `wave.1` [2345], `wave.2` [999]: float32, `randn*0.3 + 0.05` (different noise per clip).",
        "* `wave.3` [500]: constant 0.25 (zero-variance case).",
        "* Setting A = `preprocessor_A.json` (do_normalize=true, padding_value=0.0, return_attention_mask=true).",
        "  Setting B = `preprocessor_B.json` (do_normalize=false, padding_value=0.5, return_attention_mask=false).",
        "  Both JSON files are verbatim `save_pretrained` output; the extractor used was `from_pretrained` of them.",
        "* Call: `fe([wave.0, wave.1, wave.2], padding=\"longest\", sampling_rate=16000, return_tensors=\"np\")`.",
        "  - `A.input_values` [3, 2345] f32, `A.attention_mask` [3, 2345] int64 (transformers returns int32;",
        "    cast). Each row is `(x - mean) / sqrt(var + 1e-7)` over its valid part (population variance,",
        "    float32 numpy), padded positions = padding_value (0.0).",
        "  - `B.input_values` [3, 2345] f32: raw waves padded with 0.5. No `B.attention_mask` (B returns none).",
        "* Setting C: `fe([wave.3])` with setting A -> `C.input_values` [1, 500] (all zeros: 0/sqrt(1e-7))",
        "  and `C.attention_mask` [1, 500] int64 (all ones).",
        "",
        "## fbank.safetensors (torchaudio.compliance.kaldi.fbank)",
        "",
        "* `wave.0` [16000]: 1.0 s linear chirp 200 -> 4000 Hz (amplitude 0.8) + 0.01*noise, float32 in [-1, 1].",
        "* `wave.1` [7777]: two sines + 0.15*noise. `wave.2` [400]: exactly one 25 ms frame.",
        "* `default.{i}` / `hamming40.{i}` [frames, bins] float32 =",
        "  `kaldi.fbank(wave.unsqueeze(0).double() * 32768, **fbank_settings[setting])`, computed with a",
        "  float64 waveform (torchaudio then computes window, FFT and log in float64; its mel filterbank",
        "  matrix itself is built in float32 and cast), then cast to float32. The same input scale 32768",
        "  is used for both settings. `fbank_settings.json` holds every keyword argument of `kaldi.fbank`",
        "  used (all of them, defaults written out).",
        "",
        "| tensor | shape |",
        "| --- | --- |",
    ]
    for k, v in fb_info.items():
        if not k.startswith("_") and not isinstance(v, str):
            lines.append(f"| `{k}` | {list(v)} |")
    if missing:
        lines += ["", "Not written (torchaudio raises for these, so there is no reference):", ""]
        for k, v in missing.items():
            lines.append(f"* `{k}`: {v}")
        lines.append("  (wave.2 has 400 samples, shorter than one 32 ms = 512-sample hamming40 frame.)")
    lines += [
        "",
        "Notes for re-implementers (torchaudio's Kaldi port):",
        "",
        "* povey window = `hann(periodic=False)^0.85`; hamming = `0.54 - 0.46 cos(2 pi n / (N-1))`.",
        "* per frame: (remove DC) -> pre-emphasis `x[n] -= c*x[n-1]` with `x[-1] = x[0]` -> window -> zero-pad",
        "  to the next power of two -> |rfft|^2 -> mel filterbank (num_fft_bins = padded/2, Nyquist bin",
        "  weight 0, mel = 1127 ln(1 + f/700), triangles in mel space) -> `log(max(x, f32::EPSILON))`.",
        "* frames with snip_edges=true: `1 + (len - frame_len) / frame_shift` (integer division), 0 if",
        "  len < frame_len (torchaudio raises instead).",
        f"* max |fbank(float64) - fbank(float32)| over all tensors: {fb_info['_f32_vs_f64_maxdiff']:.3g}",
        "",
    ]
    (OUT / "README.md").write_text("\n".join(lines))


def main() -> int:
    torch.manual_seed(0)
    np.random.seed(0)
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    OUT.mkdir(parents=True, exist_ok=True)
    fe_info = gen_feature_extractor()
    fb_info = gen_fbank()
    write_readme(fe_info, fb_info)
    print("feature_extractor.safetensors:")
    for k, v in fe_info.items():
        print(f"  {k}: {v}")
    print("fbank.safetensors:")
    for k, v in fb_info.items():
        print(f"  {k}: {v}")
    total = 0
    for p in sorted(OUT.iterdir()):
        total += p.stat().st_size
        print(f"  {p.relative_to(ROOT)}  {p.stat().st_size} B")
    print(f"wrote {OUT.relative_to(ROOT)} ({total / 1024:.1f} KiB total)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
