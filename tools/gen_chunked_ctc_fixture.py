"""Reference for `klspeech predict --chunk-s` (long recordings transcribed in overlapping chunks):
transformers' AutomaticSpeechRecognitionPipeline with `chunk_length_s` / `stride_length_s` on
the bundled CTC model, for the four test clips below joined end to end (9.4 s).

    .venv/bin/python tools/gen_chunked_ctc_fixture.py   # writes tests/fixtures/chunked_ctc.json

For each case it records the pipeline's own chunk plan (each chunk's sample count and its
left / right strides in samples, and the same rescaled to logit frames), each chunk's greedy
token ids, the final text, and the pipeline's `return_timestamps="char"` and `"word"` chunks
(text and (start, stop) in seconds); the same for the whole recording in one pass; plus the
waveform's length and sums, so that the Rust test can first check that it decoded the same
samples. The FLAC clips are lossless 16-bit, so soundfile
and klspeech's decoder give the same values (x / 32768).
"""
import json
import os
import re

import numpy as np
import soundfile as sf
import torch
from transformers import (AutomaticSpeechRecognitionPipeline, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor,
                          Wav2Vec2ForCTC)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "models", "klspeech-small")
CLIPS = [
    "audio_fixtures/asr/clips/test-1b4ae5a6-0003.flac",
    "audio_fixtures/asr/clips/test-1b4ae5a6-0009.flac",
    "audio_fixtures/asr/clips/test-1b4ae5a6-0015.flac",
    "audio_fixtures/asr/clips/test-1b4ae5a6-0021.flac",
]
# (chunk_length_s, stride_length_s: None = the pipeline's default chunk / 6, a number, or [left, right])
CASES = [(2.0, None), (2.5, 0.4), (3.0, [0.6, 0.2]), (20.0, None)]


def timestamps(pipe, x, kwargs, text):
    """The pipeline's timestamped chunks, both levels, as {"char_chunks", "word_chunks"}."""
    out = {}
    for level in ("char", "word"):
        r = pipe(x.copy(), return_timestamps=level, **kwargs)
        assert r["text"] == text, (r["text"], text)
        out[f"{level}_chunks"] = [{"text": c["text"], "timestamp": [float(c["timestamp"][0]), float(c["timestamp"][1])]} for c in r["chunks"]]
    return out


def main() -> None:
    torch.manual_seed(0)
    x = np.concatenate([sf.read(os.path.join(ROOT, c), dtype="float32")[0] for c in CLIPS]).astype(np.float32)
    model = Wav2Vec2ForCTC.from_pretrained(MODEL, attn_implementation="eager").eval()
    fe = Wav2Vec2FeatureExtractor.from_pretrained(MODEL)
    tok = Wav2Vec2CTCTokenizer(os.path.join(MODEL, "vocab.json"), unk_token="[UNK]", pad_token="[PAD]", word_delimiter_token="|")
    pipe = AutomaticSpeechRecognitionPipeline(model=model, tokenizer=tok, feature_extractor=fe, device=-1)
    cases = []
    for chunk_s, stride_s in CASES:
        kwargs = {"chunk_length_s": chunk_s}
        if stride_s is not None:
            kwargs["stride_length_s"] = stride_s
        chunks = []
        with torch.no_grad():
            for item in pipe.preprocess(x.copy(), **kwargs):
                n, left, right = item["stride"]
                out = pipe.forward(dict(item))
                tn, tl, tr = out["stride"]
                chunks.append({"samples": int(n), "left": int(left), "right": int(right),
                               "token_n": int(tn), "token_left": int(tl), "token_right": int(tr),
                               "ids": out["tokens"][0].tolist()})
        text = pipe(x.copy(), **kwargs)["text"]
        cases.append({"chunk_s": chunk_s, "stride_s": stride_s, "chunks": chunks, "text": text, **timestamps(pipe, x, kwargs, text)})
        print(f"chunk {chunk_s} s, stride {stride_s}: {len(chunks)} chunks: {text!r}")
    with torch.no_grad():
        whole = fe(x, sampling_rate=16000, return_tensors="pt")
        ids = model(whole.input_values).logits.argmax(-1)[0].tolist()
    out = {
        "model": "models/klspeech-small",
        "unchunked": timestamps(pipe, x, {}, tok.decode(ids)),
        "clips": CLIPS,
        "samples": int(x.shape[0]),
        "sum": float(x.astype(np.float64).sum()),
        "sum_sq": float((x.astype(np.float64) ** 2).sum()),
        "unchunked_text": tok.decode(ids),
        "cases": cases,
    }
    path = os.path.join(ROOT, "tests", "fixtures", "chunked_ctc.json")
    text = json.dumps(out, indent=1)
    # Each timestamped chunk on one line: {"text": "the", "timestamp": [0.14, 0.24]}.
    text = re.sub(r'\{\s*"text": ("(?:[^"\\]|\\.)*"),\s*"timestamp": \[\s*([^\s,]+),\s*([^\s\]]+)\s*\]\s*\}',
                  r'{"text": \1, "timestamp": [\2, \3]}', text)
    assert json.loads(text) == json.loads(json.dumps(out))
    with open(path, "w") as f:
        f.write(text + "\n")
    print(f"unchunked: {out['unchunked_text']!r}; wrote {path}")


if __name__ == "__main__":
    main()
