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
