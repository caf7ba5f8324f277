"""Loads a model folder written by `klspeech train` in transformers and compares its outputs with
`klspeech predict` on the same audio (shows that the Hugging Face export is faithful; KL-Norm
vectors are extra keys transformers ignores).

    .venv/bin/python tools/check_hf_export.py MODEL_DIR AUDIO... [--klspeech target/release/klspeech]

Audio is read with klspeech's own decoder via `klspeech embed`-independent path: the script uses
soundfile for WAV/FLAC at 16 kHz (resample elsewhere first), so pass 16 kHz WAV/FLAC files.
Prints the max abs difference of class probabilities (classification) or whether the greedy
transcripts agree (CTC).
"""
import argparse
import json
import subprocess
import sys

import numpy as np
import soundfile as sf
import torch
from transformers import AutoConfig, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC, Wav2Vec2ForSequenceClassification


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("audio", nargs="+")
    ap.add_argument("--klspeech", default="target/release/klspeech")
    a = ap.parse_args()
    cfg = AutoConfig.from_pretrained(a.model)
    arch = (cfg.architectures or [""])[0]
    cls = Wav2Vec2ForCTC if arch.endswith("ForCTC") else Wav2Vec2ForSequenceClassification
    model, info = cls.from_pretrained(a.model, output_loading_info=True, attn_implementation="eager")
    model.eval()
    missing = [k for k in info["missing_keys"]]
    unexpected = sorted(info["unexpected_keys"])
    print(f"{arch}: missing keys {missing}; ignored extra keys {len(unexpected)} (e.g. {unexpected[:3]})")
    if missing:
        print("FAIL: transformers is missing tensors")
        return 1
    fe = Wav2Vec2FeatureExtractor.from_pretrained(a.model)
    ours = subprocess.run([a.klspeech, "predict", "--json", "--model", a.model, *a.audio], capture_output=True, text=True, check=True)
    ours = [json.loads(l) for l in ours.stdout.splitlines()]
    worst = 0.0
    agree = True
    for path, o in zip(a.audio, ours):
        x, sr = sf.read(path, dtype="float32")
        if x.ndim > 1:
            x = x.mean(axis=1)
        assert sr == fe.sampling_rate, f"{path}: {sr} Hz; pass {fe.sampling_rate} Hz files"
        inp = fe(x, sampling_rate=sr, return_tensors="pt")
        with torch.no_grad():
            logits = model(inp.input_values).logits[0]
        if cls is Wav2Vec2ForSequenceClassification:
            p = torch.softmax(logits, -1).numpy()
            q = np.array([o["scores"][cfg.id2label[i]] for i in range(len(p))])
            d = float(np.abs(p - q).max())
            worst = max(worst, d)
            print(f"{path}: transformers {cfg.id2label[int(p.argmax())]} / klspeech {o['label']}, max |dp| = {d:.2e}")
        else:
            ids = logits.argmax(-1).tolist()
            vocab = json.load(open(f"{a.model}/vocab.json"))
            inv = {v: k for k, v in vocab.items()}
            pad = cfg.pad_token_id
            out, prev = [], None
            for i in ids:
                if i != prev and i != pad:
                    out.append(inv[i])
                prev = i
            text = " ".join("".join(" " if t == "|" else t for t in out).split())
            agree &= text == o["text"]
            print(f"{path}: transformers {text!r} / klspeech {o['text']!r}")
    if cls is Wav2Vec2ForSequenceClassification:
        print(f"max abs difference of probabilities: {worst:.2e}")
        return 0 if worst < 1e-4 else 1
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
