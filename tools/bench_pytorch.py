"""PyTorch + transformers side of klspeech's benchmarks (benches/inference.rs runs it).

Measures Wav2Vec2 inference (Wav2Vec2Model forward, eval, no grad) or, with --train, one training
step of Wav2Vec2ForSequenceClassification (forward, cross-entropy, backward, AdamW; dropout and
SpecAugment off, every parameter trained) on random weights, and prints one JSON line:
{"config", "batch", "seconds", "threads", "median_ms", "audio_s_per_s", "peak_rss_mb", "peak_gpu_mb"}.

    .venv/bin/python tools/bench_pytorch.py --config tiny --batch 8 --seconds 1 --threads 2
"""
import argparse
import json
import resource
import statistics
import time

import torch
from transformers import Wav2Vec2Config, Wav2Vec2ForSequenceClassification, Wav2Vec2Model

TINY = dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=4, intermediate_size=768,
            conv_dim=[128] * 7, num_conv_pos_embeddings=64, num_conv_pos_embedding_groups=16)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", choices=["tiny", "base"], required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"])
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--clip", action="store_true",
                    help="training: clip_grad_norm_(.., 1.0) and isfinite of the norm read back (the HF Trainer's default max_grad_norm; klspeech train's probes and clipping)")
    ap.add_argument("--tf32", action="store_true", help="TF32 tensor cores for f32 matmuls and convolutions (klspeech --tf32)")
    return ap


def setup(a):
    """(step, sync, attention): one timed unit of the row (a training step, or an inference
    batch under inference_mode), a device synchronization, and the attention implementation
    transformers chose ("sdpa", "eager", ...)."""
    # Both switches, as klspeech's: PyTorch's default lets cuDNN run f32 convolutions in TF32
    # (torch.backends.cudnn.allow_tf32 = True) while its matmuls stay f32, so its "f32" rows
    # were a mix; without --tf32 both sides now compute f32 convolutions in f32.
    torch.backends.cuda.matmul.allow_tf32 = a.tf32
    torch.backends.cudnn.allow_tf32 = a.tf32
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[a.dtype]
    extra = dict(hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
                 final_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0, num_labels=12)
    cfg = Wav2Vec2Config(**(TINY if a.config == "tiny" else {}), **extra)
    x = torch.randn(a.batch, int(a.seconds * 16000), device=a.device, dtype=dtype)

    def sync():
        if a.device != "cpu":
            torch.cuda.synchronize()

    if a.train:
        model = Wav2Vec2ForSequenceClassification(cfg).to(a.device, dtype).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        y = torch.randint(0, 12, (a.batch,), device=a.device)

        def step():
            loss = model(x, labels=y).loss
            loss.backward()
            if a.clip:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                assert torch.isfinite(norm).item(), "a non-finite gradient"
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        model = Wav2Vec2Model(cfg).eval().to(a.device, dtype)

        def step():
            with torch.inference_mode():
                model(x)
    return step, sync, getattr(model.config, "_attn_implementation", None)


def main() -> None:
    a = parser().parse_args()
    step, sync, attention = setup(a)
    times = []
    for i in range(a.iters + 2):
        sync()
        t = time.perf_counter()
        step()
        sync()
        if i >= 2:  # warm-up
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    print(json.dumps({
        "config": a.config, "batch": a.batch, "seconds": a.seconds, "threads": a.threads,
        "median_ms": med * 1000, "audio_s_per_s": a.batch * a.seconds / med,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if a.device != "cpu" else None,
        "dtype": a.dtype, "train": a.train, "clip": a.clip, "tf32_matmul": a.tf32, "attention": attention,
    }))


if __name__ == "__main__":
    main()
