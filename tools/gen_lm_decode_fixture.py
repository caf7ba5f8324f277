"""Reference for `klspeech::decode` (CTC beam search with a word n-gram LM): pyctcdecode + KenLM,
what transformers' Wav2Vec2ProcessorWithLM runs (deprecated in transformers 5 in favour of
calling pyctcdecode directly, as here: `decode_beams` with the processor's defaults), on the
bundled CTC model's logits.

    .venv/bin/pip install -r tools/requirements.txt   # (pyctcdecode and kenlm are in it)
    .venv/bin/python tools/gen_lm_decode_fixture.py

Writes tests/fixtures/lm/ctc_logits.safetensors (the model's logits [frames, 28] for the 30
in-domain and the first 10 out-of-domain test clips, f32, keyed by clip path) and
tests/fixtures/lm/pyctcdecode.json: for each decoding setting and clip, the best beam's text,
its logit score and its combined (acoustic + LM) score, and the first five beams as [text,
logit score, combined score]. The decoder sees f64 copies of
the f32 logits, so that both sides take the log-softmax of the same numbers in the same
precision.
"""
import csv
import json
import os

import numpy as np
import soundfile as sf
import torch
from pyctcdecode import build_ctcdecoder
from safetensors.numpy import save_file
from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "models", "klspeech-small")
ASR = os.path.join(ROOT, "audio_fixtures", "asr")
LM_UNSEEN = "audio_fixtures/asr/lm/train-unseen-3gram.arpa"
LM_ALL = "audio_fixtures/asr/lm/train-3gram.arpa"
# (name, LM or None, build_ctcdecoder keyword arguments, decode_beams keyword arguments)
SETTINGS = [
    ("defaults", LM_UNSEEN, {}, {}),
    ("all sentences, alpha 2, beta 0, 8 beams", LM_ALL, {"alpha": 2.0, "beta": 0.0}, {"beam_width": 8}),
    ("alpha 0.8, beta 0.5, unk -3, token_min_logp -8, beam_prune_logp -4, 30 beams", LM_UNSEEN,
     {"alpha": 0.8, "beta": 0.5, "unk_score_offset": -3.0}, {"token_min_logp": -8.0, "beam_prune_logp": -4.0, "beam_width": 30}),
    ("no LM, 16 beams", None, {}, {"beam_width": 16}),
    ("hotwords, 3-gram", LM_UNSEEN, {}, {"hotwords": ["bird", "tall tree", "mill", "zebra"]}),
    ("hotwords weight 4, no LM, 32 beams", None, {}, {"hotwords": ["bird", "tall tree", "river"], "hotword_weight": 4.0, "beam_width": 32}),
]


def main() -> None:
    torch.manual_seed(0)
    model = Wav2Vec2ForCTC.from_pretrained(MODEL, attn_implementation="eager").eval()
    fe = Wav2Vec2FeatureExtractor.from_pretrained(MODEL)
    clips = [r["path"] for r in csv.DictReader(open(os.path.join(ASR, "test.csv")))]
    clips += [r["path"] for r in csv.DictReader(open(os.path.join(ASR, "test-ood.csv")))][:10]
    logits = {}
    for c in clips:
        x, rate = sf.read(os.path.join(ASR, c), dtype="float32")
        assert rate == 16000
        with torch.no_grad():
            inp = fe(x, sampling_rate=16000, return_tensors="pt")
            logits[f"audio_fixtures/asr/{c}"] = model(inp.input_values).logits[0].numpy().astype(np.float32)
    # The alphabet as transformers' LM recipe builds it: the vocabulary's tokens in id order.
    vocab = json.load(open(os.path.join(MODEL, "vocab.json")))
    labels = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    out = {"model": "models/klspeech-small", "labels": labels, "settings": []}
    for name, lm, build, kwargs in SETTINGS:
        decoder = build_ctcdecoder(labels, kenlm_model_path=None if lm is None else os.path.join(ROOT, lm), **build)
        results = {}
        for key, lg in logits.items():
            beams = decoder.decode_beams(lg.astype(np.float64), **kwargs)
            text, _, _, logit_score, combined = beams[0]
            results[key] = {"text": text, "logit_score": float(logit_score), "combined_score": float(combined),
                            "n_best": [[b[0], float(b[3]), float(b[4])] for b in beams[:5]]}
        out["settings"].append({"name": name, "lm": lm, "params": {**build, **kwargs}, "results": results})
        print(f"{name}: {sum(len(r['text']) for r in results.values())} characters, e.g. {next(iter(results.values()))}")
    d = os.path.join(ROOT, "tests", "fixtures", "lm")
    save_file(logits, os.path.join(d, "ctc_logits.safetensors"))
    with open(os.path.join(d, "pyctcdecode.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(f"wrote {d}")


if __name__ == "__main__":
    main()
