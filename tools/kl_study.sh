#!/usr/bin/env bash
# Reproduces the KL-Norm study of docs/RESULTS.md: every variant x seed of examples/kl_study.rs,
# run by WORKERS single-threaded workers side by side (on 2 cores: twice the throughput of one
# two-threaded run; results do not depend on the thread count), then the table and curves.
#
#   bash tools/kl_study.sh                    # 5 seeds, 2 workers, into runs/kl_study
#   SEEDS=10 WORKERS=4 OUT=/tmp/study bash tools/kl_study.sh --variants layer,kl
#
# About 110 minutes on 2 cores for the default 5 seeds when first run (before issue 6's CPU
# ops; keyword runs are now 3.6x faster). Finished runs are kept: re-running
# resumes (delete a run's folder to redo it).
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-5}
WORKERS=${WORKERS:-2}
OUT=${OUT:-runs/kl_study}
cargo build --release --example kl_study
mkdir -p "$OUT"
# A private copy: rebuilding klspeech while the study runs must not change its binary.
bin="$OUT/kl_study.bin"
cp target/release/examples/kl_study "$bin"
for i in $(seq 1 "$WORKERS"); do
  RAYON_NUM_THREADS=1 "$bin" --seeds "$SEEDS" --out "$OUT" "$@" >"$OUT/worker$i.log" 2>&1 &
done
wait
"$bin" --seeds "$SEEDS" --out "$OUT" --report "$@"
