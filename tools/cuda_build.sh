#!/usr/bin/env bash
# Build klspeech with --features cuda on a machine without GPU/CUDA toolkit, and collect the
# executables into target/cuda-dist/ (flat) with a MANIFEST.txt, ready to ship to a GPU machine.
#
#   bash tools/cuda_build.sh
#
# Env knobs: CARGO_TARGET_DIR (default target/cuda), CUDA_COMPUTE_CAP (default 90),
#            CUDAFORGE_THREADS (nvcc jobs, default nproc), KL_DIST_STRIP=0 to keep debug info
#            in the dist copies (default: strip --strip-debug), KL_CARGO_NICE (default 10),
#            KL_DIST_ONLY=REGEX: only copy targets whose name matches (e.g. '^(klspeech|parity)$'),
#            KL_DIST_PACK=0: skip target/cuda-dist.tar.xz,
#            KL_FEATURES (default `cuda`; `cudnn` adds cuDNN convolutions and installs cuDNN here,
#            see tools/cuda_env.sh).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
FEATURES="${KL_FEATURES:-cuda}"
case ",$FEATURES," in *,cudnn,*) export KL_CUDNN=1 ;; esac
# shellcheck source=tools/cuda_env.sh
source tools/cuda_env.sh

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target/cuda}"
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$(nproc)}"
DIST="$ROOT/target/cuda-dist"
NICE="${KL_CARGO_NICE:-10}"

targets=(--bins --tests --examples)
ls benches/*.rs >/dev/null 2>&1 && targets+=(--benches)

start=$(date +%s)
echo "cuda_build: cargo build --release --features $FEATURES ${targets[*]} (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)" >&2
json="$(mktemp)"; json2="$(mktemp)"
trap 'rm -f "$json" "$json2"' EXIT
# executables from cargo's JSON messages, as TSV: kind  target-name  path  (python3: no jq needed)
artifacts() {
    python3 -c '
import json, sys
for fn in sys.argv[1:]:
    for line in open(fn):
        try: m = json.loads(line)
        except ValueError: continue
        if m.get("reason") != "compiler-artifact" or not m.get("executable"): continue
        k = m["target"]["kind"][0]
        kind = "bench" if k == "bench" else ("test" if m["profile"]["test"] else k)
        print(kind, m["target"]["name"], m["executable"], sep="\t")
' "$@"
}
nice -n "$NICE" cargo build --release --features "$FEATURES" "${targets[@]}" \
    --message-format=json-render-diagnostics >"$json"
echo "cuda_build: build finished in $(( $(date +%s) - start ))s" >&2

# Test executables, as `cargo test --no-run` reports them (normally no rebuild: same artifacts).
nice -n "$NICE" cargo test --release --features "$FEATURES" --no-run \
    --message-format=json-render-diagnostics >"$json2"
echo "== test executables (cargo test --release --features $FEATURES --no-run)"
artifacts "$json2" | awk -F'\t' '$1=="test" || $1=="bench" {print $2 ": " $3}'

# Collect every executable artifact of both runs (bins, examples, test + bench harnesses), flat.
rm -rf "$DIST" "$DIST.tar.xz"
mkdir -p "$DIST"
artifacts "$json" "$json2" | sort -u -t$'\t' -k3,3 \
    | awk -F'\t' -v re="${KL_DIST_ONLY:-.}" '$2 ~ re' >"$DIST/.artifacts.tsv"

{
    echo "# klspeech CUDA build (--features $FEATURES), $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "# commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo ' (dirty tree)')"
    echo "# nvcc: $(nvcc --version | grep -o 'release [^,]*, V[0-9.]*'); CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP (kernels built for sm_${CUDA_COMPUTE_CAP}a: H100/H200 only)"
    echo "# baked-in paths: CARGO_MANIFEST_DIR=$ROOT, CARGO_BIN_EXE_klspeech=$CARGO_TARGET_DIR/release/klspeech"
    echo "# runtime libs (DT_NEEDED of klspeech): $(readelf -d "$CARGO_TARGET_DIR/release/klspeech" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | tr '\n' ' ')"
    echo "# kind	file	bytes	sha256"
} >"$DIST/MANIFEST.txt"

while IFS=$'\t' read -r kind name exe; do
    file="$(basename "$exe")"
    if [[ "$kind" == example && -e "$DIST/$file" ]]; then file="example-$file"; fi
    cp "$exe" "$DIST/$file"
    if [[ "${KL_DIST_STRIP:-1}" != 0 ]]; then strip --strip-debug "$DIST/$file"; fi
    printf '%s\t%s\t%s\t%s\n' "$kind" "$file" "$(stat -c %s "$DIST/$file")" \
        "$(sha256sum "$DIST/$file" | cut -d' ' -f1)" >>"$DIST/MANIFEST.txt"
done <"$DIST/.artifacts.tsv"
rm -f "$DIST/.artifacts.tsv"

# One solid archive to ship: the binaries share most of their bytes (candle, cudarc, the
# .nv_fatbin kernels), which one LZMA block with a window over the whole tar folds away
# (651 MB -> 17.4 MB at preset 1 in ~50 s, 15.3 MB at KL_DIST_XZ_PRESET=6 in ~7 min).
# Multi-threaded xz (-T2) cuts the stream into blocks and lost the sharing (42.5 MB), too much
# beside the ~45 MB of tracked files under the device tool's 64 MiB limit. KL_DIST_PACK=0 skips it.
if [[ "${KL_DIST_PACK:-1}" != 0 ]]; then
    tar -C "$ROOT/target" -cf - cuda-dist \
        | nice -n "$NICE" xz -T1 --lzma2=preset="${KL_DIST_XZ_PRESET:-1}",dict=768MiB >"$DIST.tar.xz"
fi

echo "== target/cuda-dist ($(du -sh "$DIST" | cut -f1) total)"
cat "$DIST/MANIFEST.txt"
[[ -f "$DIST.tar.xz" ]] && echo "== archive: $DIST.tar.xz ($(stat -c %s "$DIST.tar.xz") bytes)"
echo "cuda_build: done in $(( $(date +%s) - start ))s" >&2
