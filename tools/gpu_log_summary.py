#!/usr/bin/env python3
"""Summarize a tools/gpu_check.sh log (docs/gpu_check_*.log) for docs/PERFORMANCE.md and the README.

Prints, in this order:
  1. every "!!" line (a fallback the run took) and every step that did not exit 0;
  2. the main comparison ("== benchmarks on cuda"): klspeech ms, PyTorch ms, the throughput
     ratio and peak memory per row, as a Markdown table;
  3. every other bench section's klspeech ms, each with the main run's ms over it (below 1:
     the section's setting is slower than the default, above 1: faster);
  4. per main row, the fastest setting among the log's bench sections and the ratio against
     PyTorch it would give as the default (the material for re-deciding defaults; left out:
     the per-stage split, and for exact-f32 rows candle's convolutions, whose cuDNN call
     allows TF32);
  5. the keyword-spotting example's runs (with and without the masked GroupNorm kernels):
     wall time and figures;
  6. the top kernels of each profile, klspeech's (CUPTI) and PyTorch's (torch.profiler,
     "kernel profile pytorch <row>") (--top N, default 8), with the launches a step and, for
     klspeech's rows, the profiled GPU time over the median step (a row far under 100 % is
     bound by the host's launches, not the GPU).

Usage: python3 tools/gpu_log_summary.py docs/gpu_check_h200_<date>.log [--top N]
Reads text only; needs nothing beyond the Python standard library.
"""

import re
import sys

EXIT = re.compile(r"^\((.*): exit (\d+), (\d+) s\)$")


def cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def parse(lines):
    """Sections: [(title, [lines])] split at "== " headers."""
    sections, title, body = [], "(start)", []
    for line in lines:
        if line.startswith("== "):
            sections.append((title, body))
            title, body = line[3:].strip(), []
        else:
            body.append(line.rstrip("\n"))
    sections.append((title, body))
    return sections


def bench_rows(body):
    """{row: (klspeech ms, PyTorch ms or None, klspeech MiB, PyTorch MiB or None, ratio or None)}."""
    rows = {}
    for line in body:
        if not line.startswith("| base-") and not line.startswith("| tiny-"):
            continue
        c = cells(line)
        if len(c) < 8:
            continue
        num = lambda s: None if s in ("-", "") else float(s)
        rows[c[0]] = (num(c[1]), num(c[3]), num(c[5]), num(c[6]), num(c[7]))
    return rows


def main(argv):
    if len(argv) < 2:
        print(__doc__)
        return 2
    top = 8
    if "--top" in argv:
        top = int(argv[argv.index("--top") + 1])
    with open(argv[1], encoding="utf-8", errors="replace") as f:
        lines = f.readlines()
    sections = parse(lines)

    print("## Fallbacks and failures")
    bad = [l.rstrip() for l in lines if l.startswith("!!")]
    for l in lines:
        m = EXIT.match(l.strip())
        if m and m.group(2) != "0":
            bad.append(f"step '{m.group(1)}' exited {m.group(2)} after {m.group(3)} s")
    print("\n".join(f"- {b}" for b in bad) if bad else "- none")

    main_rows = {}
    for title, body in sections:
        if title == "benchmarks on cuda":
            main_rows = bench_rows(body)
    print("\n## klspeech against PyTorch (\"benchmarks on cuda\")")
    if main_rows:
        print("| row | klspeech ms | PyTorch ms | klspeech / PyTorch | peak MiB klspeech / PyTorch |")
        print("|---|---|---|---|---|")
        for name, (ms, pt, mib, pt_mib, ratio) in main_rows.items():
            f = lambda v, d=1: "-" if v is None else f"{v:.{d}f}"
            print(f"| {name} | {f(ms)} | {f(pt)} | {f(ratio, 2)} | {f(mib, 0)} / {f(pt_mib, 0)} |")
    else:
        print("(no such section: the run stopped before it)")

    print("\n## Other bench sections (klspeech ms; in brackets the main run's ms over it: below 1, slower than the default)")
    for title, body in sections:
        rows = bench_rows(body)
        if not rows or title == "benchmarks on cuda":
            continue
        parts = []
        for name, (ms, *_rest) in rows.items():
            base = main_rows.get(name, (None,))[0]
            rel = f" ({base / ms:.2f})" if base and ms else ""
            parts.append(f"{name} {ms}{rel}")
        print(f"- {title}: " + "; ".join(parts))

    print("\n## The fastest setting per row (what each row's ratio would be with it as the default)")
    if main_rows:
        print("| row | default ms | ratio | fastest setting in this log | its ms | its ratio |")
        print("|---|---|---|---|---|---|")
        for name, (ms, pt, *_rest) in main_rows.items():
            best = ("(the default)", ms)
            exact_f32 = "-f32" in name and "tf32" not in name
            for title, body in sections:
                if title == "benchmarks on cuda" or "KLSPEECH_BENCH_STAGES" in title:
                    continue
                if exact_f32 and "NO_CUDNN_NHWC" in title:
                    # candle's own cuDNN call runs with CUDNN_DEFAULT_MATH: TF32, not f32.
                    continue
                alt = bench_rows(body).get(name, (None,))[0]
                if alt and best[1] and alt < best[1]:
                    best = (title, alt)
            f = lambda v, d=1: "-" if v is None else f"{v:.{d}f}"
            ratio = lambda t: pt / t if pt and t else None
            print(f"| {name} | {f(ms)} | {f(ratio(ms), 2)} | {best[0]} | {f(best[1])} | {f(ratio(best[1]), 2)} |")
    else:
        print("(no main bench section)")

    print("\n## The keyword-spotting example on the GPU (wall time, figures)")
    # (The example prints "== " lines of its own: each run goes from its header to its exit line.)
    runs = [i for i, l in enumerate(lines) if l.startswith("== keyword_spotting example")]
    for i in runs:
        title, wall, figures = lines[i][3:].strip(), "?", []
        for l in lines[i + 1:]:
            m = EXIT.match(l.strip())
            if m and m.group(1) == title:
                wall = m.group(3)
                break
            if l.startswith("| LayerNorm") or l.startswith("| KL-Norm"):
                figures.append(l.strip())
        print(f"- {title}: {wall} s; " + (" ".join(figures) if figures else "no figures"))
    if not runs:
        print("(no such section: the run stopped before it)")

    print(f"\n## Profiles (top {top} kernels)")
    for title, body in sections:
        if not title.startswith("kernel profile"):
            continue
        per_step = next((l for l in body if " profile of " in l and "steps (" in l), "")
        table = [l for l in body if l.startswith("| ") and not l.startswith("|---") and cells(l)[1:2] != ["share"]]
        # Launches a step and, for klspeech's rows, the profiled GPU time over the row's median
        # step: well under 100 %, the host's launches set the pace; over 100 %, the profiler's
        # own cost (log e's inference rows: 118-140 %) or a setting the profile did not share.
        extra = ""
        m = re.search(r"of (\d+) steps \(([\d.]+) ms of GPU time per step\)", per_step)
        total = next((cells(l) for l in table if cells(l)[-1:] == ["total"]), None)
        if m and total and total[2].isdigit():
            steps, gpu_ms = int(m.group(1)), float(m.group(2))
            extra = f"; {int(total[2]) // max(steps, 1)} kernels and copies a step"
            row = title.split()[-1]
            median = main_rows.get(row, (None,))[0]
            if median and not title.startswith("kernel profile pytorch"):
                extra += f"; profiled GPU time {100 * gpu_ms / median:.0f} % of the {median} ms median step"
        print(f"- {title}: {per_step.split(': ', 1)[-1].strip()}{extra}")
        for l in table[:top]:
            c = cells(l)
            if len(c) >= 5:
                print(f"    {c[0]:>8} ms {c[1]:>7} {c[2]:>5} calls {c[3]:>8} us  {c[4][:90]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
