//! With `--features cuda`: compiles klspeech's CUDA kernels (src/ops/cuda/kernels.cu) to PTX
//! for `ops::kernels`, with the nvcc that candle's own kernels use (tools/cuda_env.sh sets it
//! up on a machine without a CUDA toolkit). Without the feature it does nothing.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/ops/cuda/kernels.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("klspeech_kernels.ptx");
    let nvcc = std::env::var("NVCC").ok().or_else(|| std::env::var("CUDA_ROOT").ok().map(|r| format!("{r}/bin/nvcc"))).unwrap_or_else(|| "nvcc".into());
    // The GPU generation to target (90: H100 / H200), as for candle's kernels; the PTX is
    // JIT-compiled for newer GPUs by the driver.
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let cap: String = cap.chars().filter(char::is_ascii_alphanumeric).collect();
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17"])
        .arg(format!("--gpu-architecture=compute_{cap}"))
        .arg("src/ops/cuda/kernels.cu")
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap_or_else(|e| {
            panic!("klspeech: --features cuda needs nvcc to compile src/ops/cuda/kernels.cu ({nvcc}: {e}); run `source tools/cuda_env.sh` first (docs/CUDA.md) or set NVCC")
        });
    assert!(status.success(), "klspeech: {nvcc} failed on src/ops/cuda/kernels.cu ({status})");
}
