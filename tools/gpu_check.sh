#!/usr/bin/env bash
# The GPU proof, run on a GPU machine from the repo root with target/cuda-dist.tar.xz present
# (built here by tools/cuda_build.sh; the GPU machines have no Rust toolchain):
#   - parity, gradient, KL-Norm, optimizer, loss, convolution and op tests with KLSPEECH_TEST_DEVICE=cuda
#     (tests/ops.rs: klspeech's CUDA kernels against f64 composites);
#     the ops suite runs first: a failing suite is rerun with each kernel built since the last
#     GPU run switched off in turn (KLSPEECH_NO_KERNEL=gather_taps|col2im|copy_rows|adam_step|
#     attn_softmax|group_norm_masked|group_norm|residual_layer_norm|conv1_group_norm|grad_norm, then all ten), and the first setting that passes holds for the
#     rest; if none does and
#     the ops suite passes without klspeech's CUDA kernels, the rest runs without them
#     (KLSPEECH_NO_CUDA_KERNELS=1); each said in the log with "!!";
#   - the keyword-spotting fine-tuning test on CUDA and on CPU (loss curves printed side by side),
#     and, last, the keyword_spotting example on CUDA (its figures and wall time against the README's);
#   - benches/inference rows on the GPU beside PyTorch + transformers (python3 with torch), with
#     peak GPU memory on both sides; training rows again without klspeech's CUDA kernels and
#     bf16 training without its half-type kernels (before/after in one binary);
#   - the bench rows without the attention's key padding (KLSPEECH_NO_KEY_PAD=1), without the
#     stride-1 convolutions' shared columns (KLSPEECH_CONV_SHIFT=off; their test failing sets it
#     for everything, "!!" in the log), with shared columns of 8 and 32 taps a row instead of
#     16, and a per-stage split;
#     cuDNN's channels-last convolutions are tested first too (KLSPEECH_NO_CUDNN_NHWC=1 after
#     a failure, "!!" in the log);
#   - the bench rows again with each other choice of convolutions as gathered columns and gemms
#     (KLSPEECH_CONV_GEMM=off|all|pos|fe, src/ops/conv_gemm.rs, default auto; tested in the ops
#     and conv suites);
#   - CUPTI kernel profiles of a training step (LayerNorm, KL-Norm) and of an inference batch.
#   - PyTorch's kernel profiles of the same rows (torch.profiler, tools/profile_pytorch.py).
# Output goes to stdout and, when $OUT is set, to $OUT/gpu_check.log.
#
# Build the archive it needs here (cuDNN build, only the executables used below, ~40 MiB):
#   KL_FEATURES=cudnn KL_DIST_ONLY='^(klspeech|parity|gradients|klnorm|optim|loss|conv|ops|train|inference|keyword_spotting)$' \
#     bash tools/cuda_build.sh
# and run it with the device tool: carry ["target/cuda-dist.tar.xz"], command
# `bash tools/gpu_check.sh`, timeout ~540 s (estimated 6-9 minutes on an H200; the steps run in order
# of importance, tests and the PyTorch comparison first, so a run cut off still has them, and the
# log under $OUT comes back either way).
set -u
LOG=${OUT:-/tmp}/gpu_check.log
exec > >(tee "$LOG") 2>&1
# Tests have CARGO_MANIFEST_DIR=/work/main compiled in.
[ -e /work/main ] || { mkdir -p /work && ln -s "$PWD" /work/main; }
mkdir -p target
tar -xJf target/cuda-dist.tar.xz -C target 2>/dev/null || python3 -c "import tarfile; tarfile.open('target/cuda-dist.tar.xz').extractall('target')"
mkdir -p target/cuda/release && cp target/cuda-dist/klspeech target/cuda/release/klspeech
CU13=$(python3 -c 'import nvidia,os;print(next(p for d in nvidia.__path__ for p in [os.path.join(d,"cu13","lib")] if os.path.isdir(p)))' 2>/dev/null \
  || dirname "$(find / -name 'libcublas.so.13*' -not -path '/proc/*' 2>/dev/null | head -1)")
export LD_LIBRARY_PATH="$CU13${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# cuDNN (a `--features cudnn` build links libcudnn.so.9): PyTorch's copy.
CUDNN_LIB=$(python3 -c 'import nvidia.cudnn,os;print(os.path.join(list(nvidia.cudnn.__path__)[0],"lib"))' 2>/dev/null \
  || dirname "$(find / -name 'libcudnn.so.9' -not -path '/proc/*' 2>/dev/null | head -1)")
[ -n "$CUDNN_LIB" ] && [ -d "$CUDNN_LIB" ] && export LD_LIBRARY_PATH="$CUDNN_LIB:$LD_LIBRARY_PATH"
echo "== machine"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
head -3 target/cuda-dist/MANIFEST.txt
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.version.cuda)"
ldd target/cuda-dist/klspeech | grep 'not found' && echo "MISSING LIBRARIES"
D=target/cuda-dist
# t NAME CMD...: runs CMD with a timeout (T seconds, default 90: every test suite took at most
# 6 s on the H200, so a hang, say a lock, costs little of the device time), prints its tail and
# exit status; RC = that status (124 for a timeout).
t() { local name=$1; shift; echo "== $name"; local s=$(date +%s); timeout "${T:-90}" "$@" 2>&1 | grep -vE "^test .* \.\.\. ok$" | tail -"${TAIL:-30}"; RC=${PIPESTATUS[0]}; echo "($name: exit $RC, $(( $(date +%s) - s )) s)"; }
export KLSPEECH_TEST_DEVICE=cuda
# The convolutions as gathered columns and cuBLAS gemms (src/ops/conv_gemm.rs): its default
# (`auto`: on CUDA the feature encoder unless f32 runs with TF32, the positional conv always on
# shared columns; with KLSPEECH_CONV_SHIFT=off the positional conv only in training and not
# with TF32) is what every other row runs; here each other choice: `off` (cuDNN's
# channels-last kernels everywhere, the default before 2026-11-27), `all`, `pos` (only the
# positional conv), `fe` (only the feature encoder). (1 GiB column blocks instead of 256 MiB moved no row by more
# than 1.5 % on 2026-11-27: KLSPEECH_CONV_GEMM_MIB=1024 by hand.)
GEMM_ROWS=base-infer-16x10-f32,base-train-8x4-f32,base-train-8x4-f32-klnorm,base-infer-16x10-f32-tf32,base-train-8x4-f32-tf32,base-infer-16x10-bf16,base-train-8x4-bf16
conv_gemm_rows() {
  for m in off all pos fe; do
    KLSPEECH_CONV_GEMM=$m KLSPEECH_BENCH_ROWS=$GEMM_ROWS KLSPEECH_BENCH_DEVICE=cuda KLSPEECH_PYTHON=none T=150 \
      t "bench rows, KLSPEECH_CONV_GEMM=$m" $D/inference-*
  done
}
if [ -n "${KL_GPU_QUICK:-}" ]; then
  # A short second call (KL_GPU_QUICK=1): the convolution tests (cuDNN's heuristic and timed
  # algorithms, the column gemms), the op suite, and klspeech's side of every bench row with
  # cuDNN's heuristic (half-precision backward on the fallback), with the column-gemm
  # convolutions, and with timed algorithms (KLSPEECH_CUDNN_BENCHMARK=1), for rows whose
  # PyTorch side the full check measured.
  T=200 TAIL=60 t "convolutions on cuda (heuristic, then timed algorithms)" $D/ops-* channels_last_convolutions --nocapture
  t "ops on cuda" $D/ops-* --test-threads 1 --skip channels_last_convolutions
  t "conv on cuda" $D/conv-*
  KLSPEECH_BENCH_DEVICE=cuda KLSPEECH_PYTHON=none T=150 t "bench rows, cuDNN's heuristic" $D/inference-*
  conv_gemm_rows
  KLSPEECH_CUDNN_BENCHMARK=1 KLSPEECH_BENCH_DEVICE=cuda KLSPEECH_PYTHON=none T=150 t "bench rows, timed cuDNN algorithms (KLSPEECH_CUDNN_BENCHMARK=1)" $D/inference-*
  for row in base-train-8x4-f32 base-train-8x4-bf16; do
    KLSPEECH_CUDNN_BENCHMARK=1 KLSPEECH_BENCH_CHILD=$row KLSPEECH_BENCH_ITERS=3 KLSPEECH_BENCH_PROFILE=1 KLSPEECH_BENCH_DEVICE=cuda T=120 TAIL=25 \
      t "kernel profile $row, timed cuDNN algorithms" $D/inference-*
  done
  echo "== gpu_check (quick) done in $SECONDS s"
  exit 0
fi
# klspeech's own CUDA kernels first (they have only run on the CPU's emulator): if their tests
# fail with them and pass without them, everything after runs without them
# (KLSPEECH_NO_CUDA_KERNELS=1, candle's kernels), so that one run still gives every figure.
# cuDNN's channels-last (NHWC) grouped convolutions (src/ops/cudnn.rs) likewise: if their
# values are wrong, everything after runs with candle's convolutions (KLSPEECH_NO_CUDNN_NHWC=1);
# if cuDNN only refused a pass, each process falls back for that pass by itself (a warning).
# kernel_fallback NAME CMD...: after CMD failed, reruns it with each of the klspeech kernels
# built since the last GPU run switched off in turn (KLSPEECH_NO_KERNEL, src/ops/kernels.rs:
# SWITCHABLE), then all of them; the first setting that passes holds for everything after
# ("!!" in the log). Returns 1 if none does.
kernel_fallback() {
  local name=$1; shift
  local k off
  # (group_norm_masked before group_norm: switching group_norm off also stops the masked
  # kernels, and the unmasked ones have run on a GPU.)
  for k in gather_taps col2im copy_rows adam_step attn_softmax group_norm_masked group_norm residual_layer_norm conv1_group_norm grad_norm gather_taps,col2im,copy_rows,adam_step,attn_softmax,group_norm_masked,group_norm,residual_layer_norm,conv1_group_norm,grad_norm; do
    off=${KLSPEECH_NO_KERNEL:+$KLSPEECH_NO_KERNEL,}$k
    KLSPEECH_NO_KERNEL=$off T=60 t "$name with KLSPEECH_NO_KERNEL=$off" "$@"
    if [ "$RC" = 0 ]; then
      export KLSPEECH_NO_KERNEL=$off
      echo "!! $name failed with klspeech's kernel(s) $k and passed without: everything below runs with KLSPEECH_NO_KERNEL=$off"
      return 0
    fi
  done
  return 1
}
echo "== cuDNN channels-last convolutions on cuda"
conv_test() {
  timeout 120 $D/ops-* channels_last_convolutions --nocapture > /tmp/nhwc.log 2>&1; RC=$?
  grep -vE "^test .* \.\.\. ok$" /tmp/nhwc.log | tail -"${1:-30}"; echo "(exit $RC)"
}
conv_test
if [ "$RC" != 0 ]; then
  # Perhaps the stride-1 convolutions on shared columns (src/ops/conv_gemm.rs, new since the
  # last GPU run): the test again without them.
  echo "== cuDNN channels-last convolutions on cuda without shared columns (KLSPEECH_CONV_SHIFT=off)"
  KLSPEECH_CONV_SHIFT=off conv_test 8
  if [ "$RC" = 0 ]; then
    export KLSPEECH_CONV_SHIFT=off
    echo "!! stride-1 convolutions on shared columns failed their test (and passed without): everything below runs with KLSPEECH_CONV_SHIFT=off"
  fi
fi
if [ "$RC" != 0 ] && ! grep -q "cuDNN refused" /tmp/nhwc.log; then
  # The column gemms' kernels (kl_gather_taps, kl_col2im, kl_copy_rows) one by one, then cuDNN.
  if ! kernel_fallback "cuDNN channels-last convolutions" $D/ops-* channels_last_convolutions --nocapture; then
    export KLSPEECH_NO_CUDNN_NHWC=1
    echo "!! cuDNN's channels-last convolutions failed their test: everything below runs with KLSPEECH_NO_CUDNN_NHWC=1"
  fi
elif [ "$RC" != 0 ]; then
  echo "!! cuDNN refused some convolution passes: they fall back to candle's / klspeech's in every run below"
fi
# Half-precision training through klspeech's bf16 / f16 kernels (ops::kernels::apply_half):
# if its tests fail, everything below runs with candle's half-type composites instead
# (KLSPEECH_NO_HALF_KERNELS=1, "!!" in the log).
t "half-precision training ops on cuda" $D/ops-* half_precision --nocapture --test-threads 1
if [ "$RC" != 0 ]; then
  export KLSPEECH_NO_HALF_KERNELS=1
  echo "!! half-precision training through klspeech's half-type kernels failed its tests: everything below runs with KLSPEECH_NO_HALF_KERNELS=1"
fi
# The attention with its keys padded to a multiple of 8 and kl_attn_softmax (training and
# inference): if its tests fail, everything below runs without the padding
# (KLSPEECH_NO_KEY_PAD=1, "!!" in the log).
t "attention on cuda" $D/ops-* attention --nocapture --test-threads 1
if [ "$RC" != 0 ]; then
  KLSPEECH_NO_KEY_PAD=1 t "attention on cuda without key padding" $D/ops-* attention --nocapture --test-threads 1
  if [ "$RC" = 0 ]; then
    export KLSPEECH_NO_KEY_PAD=1
    echo "!! the attention with padded keys failed its tests (and passed without): everything below runs with KLSPEECH_NO_KEY_PAD=1"
  else
    kernel_fallback "attention on cuda" $D/ops-* attention --nocapture --test-threads 1
  fi
fi
# (the convolution test above is skipped here: its outcome is settled)
t "ops on cuda" $D/ops-* --nocapture --test-threads 1 --skip channels_last_convolutions
if [ "$RC" != 0 ] && ! kernel_fallback "ops on cuda" $D/ops-* --nocapture --test-threads 1 --skip channels_last_convolutions; then
  KLSPEECH_NO_CUDA_KERNELS=1 t "ops on cuda without klspeech's CUDA kernels" $D/ops-* --nocapture --test-threads 1 --skip channels_last_convolutions
  if [ "$RC" = 0 ]; then
    export KLSPEECH_NO_CUDA_KERNELS=1
    echo "!! klspeech's CUDA kernels failed their tests: everything below runs with KLSPEECH_NO_CUDA_KERNELS=1"
  fi
fi
for name in parity gradients klnorm optim loss conv; do
  t "$name on cuda" $D/$name-* --nocapture --test-threads 1
  [ "$RC" != 0 ] && kernel_fallback "$name on cuda" $D/$name-* --nocapture --test-threads 1
done
TAIL=8 t "kws fine-tuning on cuda" $D/train-* keyword_spotting --nocapture
KLSPEECH_TEST_DEVICE=cpu TAIL=8 t "kws fine-tuning on cpu" $D/train-* keyword_spotting --nocapture
KLSPEECH_BENCH_DEVICE=cuda KLSPEECH_PYTHON=python3 T=300 t "benchmarks on cuda" $D/inference-*
conv_gemm_rows
# bf16 training with candle's half-type composites (KLSPEECH_NO_HALF_KERNELS=1) instead of
# klspeech's half-type kernels: before/after in one binary.
KLSPEECH_NO_HALF_KERNELS=1 KLSPEECH_BENCH_ROWS=base-train-8x4-bf16 KLSPEECH_BENCH_DEVICE=cuda KLSPEECH_PYTHON=none T=120 \
  t "bf16 training with candle's half-type composites (KLSPEECH_NO_HALF_KERNELS=1)" $D/inference-*
# The attention without its key padding (and kl_attn_softmax's fused scale and key bias in
# inference): before/after in one binary.
KLSPEECH_NO_KEY_PAD=1 KLSPEECH_BENCH_ROWS=base-infer-16x10-f32,base-infer-16x10-bf16,base-train-8x4-f32,base-train-8x4-bf16,base-infer-16x10-f32-tf32 KLSPEECH_BENCH_DEVICE=cuda KLSPEECH_PYTHON=none T=150 \
  t "bench rows without key padding (KLSPEECH_NO_KEY_PAD=1)" $D/inference-*
# The positional conv on per-chunk columns (and, by `auto`, on cuDNN in inference and in f32
# with TF32, as before 2026-11-27's shared columns): before/after in one binary.
KLSPEECH_CONV_SHIFT=off KLSPEECH_BENCH_ROWS=base-infer-16x10-f32,base-infer-16x10-f32-tf32,base-infer-16x10-bf16,base-infer-16x10-f16,base-train-8x4-f32,base-train-8x4-f32-tf32,base-train-8x4-bf16 KLSPEECH_BENCH_DEVICE=cuda KLSPEECH_PYTHON=none T=150 \
  t "bench rows without shared columns (KLSPEECH_CONV_SHIFT=off)" $D/inference-*
# Session 17's two kernels against their switches, before/after in one binary: the first
# feature-encoder layer as conv + GroupNorm + GELU (three ops) instead of
# kl_conv1_group_norm_gelu, and the trainer's gradient probes as candle's ops instead of
# kl_sum_sq_partial (the -clip row).
KLSPEECH_NO_KERNEL=${KLSPEECH_NO_KERNEL:+$KLSPEECH_NO_KERNEL,}conv1_group_norm,grad_norm KLSPEECH_BENCH_ROWS=base-infer-16x10-f32,base-infer-16x10-bf16,base-train-8x4-f32-clip KLSPEECH_BENCH_DEVICE=cuda KLSPEECH_PYTHON=none T=90 \
  t "bench rows without kl_conv1_group_norm_gelu and kl_sum_sq_partial (KLSPEECH_NO_KERNEL=conv1_group_norm,grad_norm)" $D/inference-*
# Shared columns of 8 and 32 taps a row instead of 16 (more gemms of a shorter reduction and
# a smaller gather, or fewer and larger): which the default should be.
if [ "${KLSPEECH_CONV_SHIFT:-}" != off ]; then
  for taps in 8 32; do
    KLSPEECH_CONV_SHIFT=$taps KLSPEECH_BENCH_ROWS=base-infer-16x10-f32,base-infer-16x10-bf16,base-train-8x4-f32,base-train-8x4-bf16 KLSPEECH_BENCH_DEVICE=cuda KLSPEECH_PYTHON=none T=120 \
      t "bench rows with shared columns of $taps taps (KLSPEECH_CONV_SHIFT=$taps)" $D/inference-*
  done
fi
# Kernel-level profiles (CUPTI from PyTorch's wheels, src/gpu_profile.rs): where the GPU time goes.
profile() {
  KLSPEECH_BENCH_CHILD=$1 KLSPEECH_BENCH_ITERS=3 KLSPEECH_BENCH_PROFILE=1 KLSPEECH_BENCH_DEVICE=cuda T=60 TAIL=60 \
    t "kernel profile $1" $D/inference-*
}
profile base-train-8x4-f32
profile base-infer-16x10-f32
# bf16 training ran at 0.06x PyTorch on the H200 (526.6 ms a step against f32's 79.3): where it goes.
profile base-train-8x4-bf16
# Training without klspeech's CUDA kernels (src/ops/cuda/kernels.cu: standardization, softmax
# backward, GELU): candle's kernels with the device ops' composed backward, as before them.
KLSPEECH_NO_CUDA_KERNELS=1 KLSPEECH_BENCH_ROWS=base-train-8x4-f32,base-train-8x4-f32-klnorm KLSPEECH_BENCH_DEVICE=cuda KLSPEECH_PYTHON=none T=150 \
  t "benchmarks on cuda, without klspeech's CUDA kernels (KLSPEECH_NO_CUDA_KERNELS=1)" $D/inference-*
# (Settled by earlier logs and no longer rerun: the composites without klspeech's ops
# (KLSPEECH_NO_CUSTOM_OPS=1), the memory pool released at every sync
# (KLSPEECH_GPU_POOL_RELEASE=1), candle's convolutions (KLSPEECH_NO_CUDNN_NHWC=1).)
# Where a step's time goes: a synchronization after each stage (the rows above synchronize once
# a step, as PyTorch's side).
KLSPEECH_BENCH_STAGES=1 KLSPEECH_BENCH_ROWS=base-train-8x4-f32,base-infer-16x10-f32,base-train-8x4-bf16 KLSPEECH_BENCH_DEVICE=cuda KLSPEECH_PYTHON=none T=120 \
  t "stage split on cuda (KLSPEECH_BENCH_STAGES=1)" $D/inference-*
profile base-train-8x4-f32-klnorm
profile base-infer-16x10-bf16
profile base-infer-16x10-f32-tf32
# PyTorch's side of the main rows under torch.profiler (tools/profile_pytorch.py): its kernels
# beside klspeech's profiles above (which cuDNN algorithms, whether its attention runs fused
# SDPA kernels, what its convolutions cost), so the next changes aim at measured gaps.
T=150 TAIL=200 t "pytorch kernel profiles" python3 tools/profile_pytorch.py --device cuda \
  --rows base-infer-16x10-f32,base-infer-16x10-f32-tf32,base-infer-16x10-bf16,base-train-8x4-f32,base-train-8x4-bf16
# Last (the rows above come first if time runs short): the keyword-spotting example end to end
# on the GPU (dropout, SpecAugment, KL-Norm noise: the real fine-tuning path), to compare with
# its CPU figures in the README (1.2 min on 2 cores).
T=180 TAIL=12 t "keyword_spotting example on cuda" $D/keyword_spotting --device cuda --out /tmp/kws-cuda
# Its padded batches' first-layer GroupNorm as the masked composite in [B, C, T] instead of
# kl_group_norm_cl_masked_fwd / _bwd (session 18): before/after in one binary, same figures.
KLSPEECH_NO_KERNEL=${KLSPEECH_NO_KERNEL:+$KLSPEECH_NO_KERNEL,}group_norm_masked T=60 TAIL=12 \
  t "keyword_spotting example on cuda without the masked GroupNorm kernels (KLSPEECH_NO_KERNEL=group_norm_masked)" $D/keyword_spotting --device cuda --out /tmp/kws-cuda-nomask
echo "== gpu_check done in $SECONDS s"
