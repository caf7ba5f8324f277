"""Kernel profiles of PyTorch + transformers for klspeech's bench rows (tools/gpu_check.sh).

For each row (klspeech's names: base-infer-16x10-f32, base-train-8x4-bf16, ...-tf32) the same
model, batch and settings as tools/bench_pytorch.py's side of that row, two warm-up steps, then
torch.profiler over --iters steps; prints, per row, a "== kernel profile pytorch <row>" section
with the table klspeech's CUPTI profile prints (src/gpu_profile.rs), so that
tools/gpu_log_summary.py lists both sides' top kernels. On a GPU the rows are the device's
kernels and copies; on the CPU (a rehearsal) the ops' self times.

    python3 tools/profile_pytorch.py --device cuda --rows base-infer-16x10-f32,base-train-8x4-f32
    .venv/bin/python tools/profile_pytorch.py --device cpu --rows tiny-infer-2x1-f32 --top 5
"""
import argparse
import gc
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_pytorch  # noqa: E402

ROW = re.compile(r"^(tiny|base)-(infer|train)-(\d+)x(\d+(?:\.\d+)?)-(f32|bf16|f16)(-tf32)?$")


def row_args(row: str, device: str, threads: int):
    """bench_pytorch's arguments for a klspeech row name (an error naming the row otherwise)."""
    m = ROW.match(row)
    if not m:
        raise SystemExit(f"profile_pytorch: row {row!r} is not <tiny|base>-<infer|train>-<B>x<S>-<f32|bf16|f16>[-tf32]")
    config, kind, batch, seconds, dtype, tf32 = m.groups()
    argv = ["--config", config, "--batch", batch, "--seconds", seconds, "--dtype", dtype,
            "--device", device, "--threads", str(threads)]
    argv += ["--train"] if kind == "train" else []
    argv += ["--tf32"] if tf32 else []
    return bench_pytorch.parser().parse_args(argv)


def kernel_times(events, device: str):
    """{name: [microseconds, calls]}: on a GPU each kernel / copy event's duration, on the CPU
    each op's self time (its children's time counted under them)."""
    acc = defaultdict(lambda: [0.0, 0])
    for e in events:
        if device != "cpu":
            if e.device_type != DeviceType.CUDA:
                continue
            us = e.time_range.elapsed_us()
        else:
            if e.device_type != DeviceType.CPU:
                continue
            us = e.self_cpu_time_total
        acc[e.name][0] += us
        acc[e.name][1] += 1
    return acc


def table(row: str, acc, steps: int, top: int, device: str) -> None:
    total = sum(v[0] for v in acc.values())
    what = "GPU" if device != "cpu" else "CPU self"
    print(f"{row}: {what} profile of {steps} steps ({total / 1000 / steps:.1f} ms of {what} time per step)")
    print(f"| {what} time ms | share | calls | µs / call | what |")
    print("|---|---|---|---|---|")
    items = sorted(acc.items(), key=lambda kv: -kv[1][0])
    for name, (us, n) in items[:top]:
        short = name if len(name) <= 100 else name[:99] + "…"
        print(f"| {us / 1000:.2f} | {100 * us / max(total, 1e-9):.1f} % | {n} | {us / n:.1f} | {short} |")
    rest = items[top:]
    if rest:
        us = sum(v[0] for _, v in rest)
        n = sum(v[1] for _, v in rest)
        print(f"| {us / 1000:.2f} | {100 * us / max(total, 1e-9):.1f} % | {n} | | {len(rest)} others |")
    print(f"| {total / 1000:.2f} | 100 % | {sum(v[1] for v in acc.values())} | | total |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", required=True, help="comma-separated klspeech bench rows")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if a.device != "cpu" else [])
    print(f"torch {torch.__version__}, device {a.device}" + (f" ({torch.cuda.get_device_name()})" if a.device != "cpu" else ""))
    for row in a.rows.split(","):
        print(f"== kernel profile pytorch {row}", flush=True)
        try:
            step, sync, attention = bench_pytorch.setup(row_args(row, a.device, a.threads))
            print(f"{row}: transformers attention implementation {attention!r}")
            for _ in range(2):
                step()
            sync()
            with profile(activities=activities) as prof:
                for _ in range(a.iters):
                    step()
                sync()
            table(row, kernel_times(prof.events(), a.device), a.iters, a.top, a.device)
            del step, prof
        except Exception as e:  # one row's failure (say, out of memory) does not cost the others
            print(f"{row}: profile failed: {type(e).__name__}: {e}")
        gc.collect()
        if a.device != "cpu":
            torch.cuda.empty_cache()
        sys.stdout.flush()


if __name__ == "__main__":
    main()
