//! `--device cpu|cuda[:N]|auto`.

use candle_core::Device;

use crate::error::{Error, Result};

/// Sets the number of CPU threads for everything that follows (candle's thread pools, gemm and
/// klspeech's fused ops all read `RAYON_NUM_THREADS` when they first start, which this sets).
/// `None` keeps the environment's choice (`RAYON_NUM_THREADS`, else the physical core count).
/// Call it before any tensor work; a pool that already runs keeps its size.
pub fn set_threads(n: Option<usize>) -> Result<()> {
    match n {
        None => Ok(()),
        Some(0) => Err(Error::InvalidInput("--threads must be at least 1".into())),
        Some(n) => {
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
            Ok(())
        }
    }
}

/// CPU runtime settings every klspeech binary applies at start (before any tensor work):
///
/// - mimalloc (the binaries' allocator) keeps freed memory mapped instead of returning it to
///   the OS. candle allocates every tensor afresh, so each step frees and re-allocates the same
///   large buffers; returned memory comes back as page faults that zero 2 MiB huge pages
///   (7 900 faults per tiny training benchmark against 400 with this). Peak memory is
///   unchanged: freed blocks are reused, not added to.
/// - candle's elementwise thread pool spins 200 times instead of 25 000 before parking its
///   workers (`CANDLE_BARRIER_POOL_SPIN_LIMIT`, unless set): between two candle ops the
///   spinning workers otherwise take the cores from gemm and klspeech's ops (10 % of a tiny
///   training step, 5-10 % of inference; docs/PERFORMANCE.md).
///
/// Harmless where mimalloc is not the allocator.
pub fn tune_cpu_runtime() {
    // mi_option_purge_delay in mimalloc v3's `mi_option_e` (libmimalloc-sys 0.1.49); -1 = never.
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: sets one integer option; mimalloc reads it each time it considers a purge.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "200");
    }
}

/// Parses a device name: `cpu`, `cuda`, `cuda:N`, or `auto` (the first GPU when this build has
/// CUDA and one is present, else the CPU).
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            if candle_core::utils::cuda_is_available() {
                if let Ok(d) = Device::new_cuda(0) {
                    return Ok(d);
                }
            }
            Ok(Device::Cpu)
        }
        _ => {
            let ordinal = match s.strip_prefix("cuda") {
                Some("") => 0,
                Some(rest) => rest
                    .strip_prefix(':')
                    .and_then(|n| n.parse::<usize>().ok())
                    .ok_or_else(|| Error::InvalidInput(format!("device `{s}`: expected cpu, cuda, cuda:N or auto")))?,
                None => return Err(Error::InvalidInput(format!("device `{s}`: expected cpu, cuda, cuda:N or auto"))),
            };
            if !candle_core::utils::cuda_is_available() {
                return Err(Error::Unsupported {
                    what: format!("device `{s}`"),
                    detail: "this klspeech was built without CUDA; rebuild with `cargo build --release --features cuda` (see docs/CUDA.md)".into(),
                });
            }
            Device::new_cuda(ordinal).map_err(|e| Error::Unsupported { what: format!("device `{s}`"), detail: e.to_string() })
        }
    }
}
