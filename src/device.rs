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
                if let Ok(d) = new_cuda(0) {
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
            new_cuda(ordinal).map_err(|e| Error::Unsupported { what: format!("device `{s}`"), detail: e.to_string() })
        }
    }
}

/// GPU `ordinal` as klspeech runs it: candle's device (one stream, the calling thread's default
/// stream) without cudarc's per-buffer event tracking, and with a memory pool that keeps what
/// it has (see [`gpu_pool_release_threshold`]).
///
/// cudarc creates two CUDA events with every buffer it allocates and destroys them when the
/// buffer is freed, so that it can order a buffer's uses across streams; it records and waits
/// on them only once a second stream exists in the context ("multi-stream mode"), which candle
/// never creates. On candle's single stream the events are four driver calls per tensor op
/// that order nothing; they are switched off here (while the context has one stream).
pub fn new_cuda(ordinal: usize) -> Result<Device> {
    let d = Device::new_cuda(ordinal)?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(c) = &d {
        if !c.cuda_stream().context().is_in_multi_stream_mode() {
            // SAFETY: with a single stream in the context, every use of every buffer is ordered
            // by that stream; cudarc's events only order uses across streams (see above).
            unsafe { c.disable_event_tracking() };
        }
        // KLSPEECH_GPU_POOL_RELEASE=1: the driver's default (for before/after measurements).
        let release = std::env::var_os("KLSPEECH_GPU_POOL_RELEASE").is_some_and(|v| !v.is_empty() && v != "0");
        if !release && c.cuda_stream().context().has_async_alloc() {
            // Only speed depends on it: a driver that refuses it leaves the default, and says so.
            if let Err(e) = cuda_pool::set_release_threshold(c, u64::MAX) {
                eprintln!("klspeech: GPU {ordinal} keeps the driver's memory-pool release threshold ({e}); steps may re-map memory after each synchronization");
            }
        }
    }
    Ok(d)
}

/// The release threshold of the memory pool that candle (through cudarc's `cuMemAllocAsync`)
/// allocates every tensor of `dev` from: how many bytes of freed memory the pool keeps when the
/// host synchronizes with the GPU. `None` off the GPU or where the pool cannot be queried.
///
/// The driver's default is 0: at every synchronization (reading a loss, a norm or a result back
/// is one) the pool hands all its free memory back to the driver, and the next step's
/// allocations map it again, page by page (NVIDIA's CUDA guide, "Physical Page Caching
/// Behavior"; RAPIDS' pool and llama.cpp raise the threshold for the same reason: stalls of
/// hundreds of milliseconds when large buffers come back). [`new_cuda`] sets it to
/// `u64::MAX`: freed memory stays in the pool for the next allocation, as in PyTorch's caching
/// allocator (nvidia-smi then shows the peak, as it does for PyTorch; other processes cannot
/// use it until klspeech exits). `KLSPEECH_GPU_POOL_RELEASE=1` keeps the driver's default.
pub fn gpu_pool_release_threshold(dev: &Device) -> Option<u64> {
    pool_figure(dev, PoolFigure::ReleaseThreshold)
}

/// Bytes of the memory pool of `dev` that tensors use now (PyTorch's
/// `torch.cuda.memory_allocated()`). `None` off the GPU.
pub fn gpu_memory_in_use(dev: &Device) -> Option<u64> {
    pool_figure(dev, PoolFigure::InUse)
}

/// Bytes the memory pool of `dev` holds from the driver now, in use or free for reuse
/// (PyTorch's `torch.cuda.memory_reserved()`). `None` off the GPU.
pub fn gpu_reserved_memory(dev: &Device) -> Option<u64> {
    pool_figure(dev, PoolFigure::Reserved)
}

/// The pool attributes the three functions above read.
#[derive(Clone, Copy)]
enum PoolFigure {
    ReleaseThreshold,
    InUse,
    Reserved,
}

fn pool_figure(dev: &Device, which: PoolFigure) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = dev {
        let attr = match which {
            PoolFigure::ReleaseThreshold => cuda_pool::RELEASE_THRESHOLD,
            PoolFigure::InUse => cuda_pool::USED_MEM_CURRENT,
            PoolFigure::Reserved => cuda_pool::RESERVED_MEM_CURRENT,
        };
        return cuda_pool::attribute(d, attr).ok();
    }
    let _ = (dev, which);
    None
}

/// Whether cudarc tracks buffer uses with events on `dev` (see [`new_cuda`]): `Some(false)` for
/// a GPU from [`parse_device`], `None` off the GPU.
pub fn cuda_event_tracking(dev: &Device) -> Option<bool> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(c) = dev {
        return Some(c.is_event_tracking());
    }
    let _ = dev;
    None
}

/// Peak bytes of GPU memory held by this process's tensors on `dev` since the last
/// [`reset_gpu_peak_memory`] (or the start): the high-water mark of the device's default
/// stream-ordered memory pool, which candle (through cudarc) allocates every tensor from on GPUs
/// that support memory pools (all since Pascal). The counterpart of PyTorch's
/// `torch.cuda.max_memory_allocated()`; cuBLAS's and cuDNN's own handles are not included.
/// `None` on the CPU, in a build without CUDA, or where the pool cannot be queried.
pub fn gpu_peak_memory(dev: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = dev {
        return cuda_pool::used_high(d, false).ok();
    }
    let _ = dev;
    None
}

/// Starts a new peak for [`gpu_peak_memory`]: the driver zeroes the mark, and the next
/// allocation sets it to all the memory then in use (model weights included). No-op off the GPU.
pub fn reset_gpu_peak_memory(dev: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = dev {
        let _ = cuda_pool::used_high(d, true);
    }
    let _ = dev;
}

/// TF32 tensor-core matrix products for f32 on the GPU (10-bit mantissa products, f32 sums),
/// PyTorch's `torch.backends.cuda.matmul.allow_tf32`. Off by default, as in PyTorch: f32 stays
/// f32 unless asked. klspeech's cuDNN convolutions (the `cudnn` feature, `ops::cudnn`) follow
/// this switch too (PyTorch's `torch.backends.cudnn.allow_tf32` is on by default; candle's own
/// cuDNN path, left for f64, uses cuDNN's default). No effect on the CPU.
pub fn set_tf32(on: bool) {
    #[cfg(feature = "cuda")]
    candle_core::cuda_backend::set_gemm_reduced_precision_f32(on);
    let _ = on;
}

#[cfg(feature = "cuda")]
mod cuda_pool {
    use candle_core::backend::BackendDevice;
    use candle_core::cuda_backend::cudarc::driver::{result, sys, DriverError};
    use candle_core::cuda_backend::CudaDevice;

    pub(super) const RELEASE_THRESHOLD: sys::CUmemPool_attribute = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD;
    pub(super) const RESERVED_MEM_CURRENT: sys::CUmemPool_attribute = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT;
    pub(super) const USED_MEM_CURRENT: sys::CUmemPool_attribute = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT;

    /// The device's default pool (the one `cuMemAllocAsync` draws from: klspeech never sets
    /// another), with the context bound to this thread.
    fn default_pool(d: &CudaDevice) -> Result<sys::CUmemoryPool, DriverError> {
        let ctx = d.cuda_stream().context().clone();
        ctx.bind_to_thread()?;
        // SAFETY: the device comes from a live context.
        unsafe { result::device::get_default_mem_pool(ctx.cu_device()) }
    }

    /// Sets the default pool's `RELEASE_THRESHOLD` (bytes; see `gpu_pool_release_threshold`).
    pub(super) fn set_release_threshold(d: &CudaDevice, bytes: u64) -> Result<(), DriverError> {
        let pool = default_pool(d)?;
        let mut v = bytes;
        // SAFETY: RELEASE_THRESHOLD is a cuuint64_t attribute; the driver reads `v` during the call.
        unsafe { result::mem_pool::set_attribute(pool, RELEASE_THRESHOLD, (&mut v as *mut u64).cast()) }
    }

    /// One cuuint64_t attribute of the default pool (the three constants above).
    pub(super) fn attribute(d: &CudaDevice, attr: sys::CUmemPool_attribute) -> Result<u64, DriverError> {
        let pool = default_pool(d)?;
        let mut v: u64 = 0;
        // SAFETY: the attributes callers pass are cuuint64_t; the driver writes one into `v`.
        unsafe { result::mem_pool::get_attribute(pool, attr, (&mut v as *mut u64).cast())? };
        Ok(v)
    }

    /// The default pool's `USED_MEM_HIGH` (bytes); with `reset`, zeroes it first (the only value
    /// the driver accepts for it).
    pub(super) fn used_high(d: &CudaDevice, reset: bool) -> Result<u64, DriverError> {
        let pool = default_pool(d)?;
        let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
        // SAFETY: USED_MEM_HIGH is a cuuint64_t attribute.
        unsafe {
            let mut v: u64 = 0;
            if reset {
                d.synchronize().ok();
                result::mem_pool::set_attribute(pool, attr, (&mut v as *mut u64).cast())?;
            }
            result::mem_pool::get_attribute(pool, attr, (&mut v as *mut u64).cast())?;
            Ok(v)
        }
    }
}
