"""PyTorch + transformers side of klspeech's benchmarks (benches/inference.rs runs it).

Measures Wav2Vec2 inference (Wav2Vec2Model forward, eval, no grad) on random weights and prints one
JSON line: {"config", "batch", "seconds", "threads", "median_ms", "audio_s_per_s", "peak_rss_mb"}.

    .venv/bin/python tools/bench_pytorch.py --config tiny --batch 8 --seconds 1 --threads 2
"""
import argparse
import json
import resource
import statistics
import time

import torch
from transformers import Wav2Vec2Config, Wav2Vec2Model

TINY = dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=4, intermediate_size=768,
            conv_dim=[128] * 7, num_conv_pos_embeddings=64, num_conv_pos_embedding_groups=16)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", choices=["tiny", "base"], required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = Wav2Vec2Config(**(TINY if a.config == "tiny" else {}))
    model = Wav2Vec2Model(cfg).eval().to(a.device)
    x = torch.randn(a.batch, int(a.seconds * 16000), device=a.device)
    times = []
    with torch.inference_mode():
        for i in range(a.iters + 2):
            if a.device != "cpu":
                torch.cuda.synchronize()
            t = time.perf_counter()
            model(x)
            if a.device != "cpu":
                torch.cuda.synchronize()
            if i >= 2:  # warm-up
                times.append(time.perf_counter() - t)
    med = statistics.median(times)
    print(json.dumps({
        "config": a.config, "batch": a.batch, "seconds": a.seconds, "threads": a.threads,
        "median_ms": med * 1000, "audio_s_per_s": a.batch * a.seconds / med,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


if __name__ == "__main__":
    main()
