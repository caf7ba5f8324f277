//! Channels-last grouped 1-D convolution through cuDNN, in one call each for the forward pass,
//! the input gradient and the weight gradient (the `cudnn` feature).
//!
//! klspeech keeps activations channels-last, [B, L, C], from the waveform to the projection.
//! candle's `conv1d` takes channels-first input: on a GPU every convolution ran on a transposed
//! (strided) view and handed back [B, C, T], which the next op copied back to [B, T, C]; and a
//! grouped convolution (the positional conv: 16 groups, K = 128) ran as one candle convolution
//! per group on strided chunks, then concatenated the 16 outputs.
//!
//! Here cuDNN reads [B, L, C] in place as an NHWC tensor [N = B, C, H = L, W = 1] and writes
//! [B, T, C_out] the same way, with the group count set on the convolution descriptor: one
//! cuDNN call per convolution, no transposes, no per-group copies. The filter is NHWC too
//! (KRSC: [C_out, K, 1, C_in / groups]), a transposed copy of PyTorch's [C_out, C_in / g, K]
//! (the positional conv's 4.7 M weights: 19 MB per call, small next to the activations).
//! Arithmetic in f32 for f32, bf16 and f16 data (PyTorch's choice for half types). f32 data
//! takes cuDNN's FMA kernels (exact f32 products) unless TF32 is on (`--tf32`,
//! `device::set_tf32`, as for matrix products); PyTorch's `cudnn.allow_tf32` is on by default,
//! so the bench's plain f32 rows give PyTorch TF32 convolutions and klspeech f32 ones.
//!
//! Used where [`applies`]: a CUDA tensor in f32, bf16 or f16 in a `cudnn` build, with the fused
//! ops on (not `KLSPEECH_NO_CUSTOM_OPS=1`), unless `KLSPEECH_NO_CUDNN_NHWC=1` (independent of
//! `KLSPEECH_NO_CUDA_KERNELS`, so that `tools/gpu_check.sh` can switch either off alone). f64
//! (the finite-difference tests) keeps candle's path, whose NCHW double convolutions cuDNN
//! supports everywhere. Should
//! cuDNN refuse a call (a configuration this cuDNN does not support), that pass (forward,
//! backward data or backward filter) falls back to candle's convolution or klspeech's backward
//! for the rest of the process, with one warning on stderr ([`refused`] names them);
//! `tests/ops.rs` fails in that case ("cuDNN refused"), so a GPU check shows it.
//!
//! Each call's algorithm is cuDNN's heuristic choice, or with `KLSPEECH_CUDNN_BENCHMARK=1`
//! ([`set_benchmark`]) the fastest by timing, per geometry, as PyTorch's `cudnn.benchmark`
//! (on the H200 it changed no row by more than the run-to-run noise). bf16 / f16 backward
//! passes stay on the fallback: cuDNN's input gradient of those types ran 60x slower there.

use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::Tensor;

use crate::error::Result;

static SWITCH: super::EnvSwitch = super::EnvSwitch::new("KLSPEECH_NO_CUDNN_NHWC");
// On unless KLSPEECH_CUDNN_BENCHMARK is set: cuDNN's heuristic picks each call's algorithm.
static HEURISTIC: super::EnvSwitch = super::EnvSwitch::new("KLSPEECH_CUDNN_BENCHMARK");

/// Whether each convolution's algorithm is chosen by timing every algorithm cuDNN offers on
/// the first call of each geometry (PyTorch's `torch.backends.cudnn.benchmark`), instead of
/// cuDNN's heuristic: `KLSPEECH_CUDNN_BENCHMARK=1` or [`set_benchmark`].
pub fn benchmark() -> bool {
    !HEURISTIC.on()
}

/// Turns [`benchmark`] on or off for the whole process.
pub fn set_benchmark(on: bool) {
    HEURISTIC.set(!on);
}
// The passes cuDNN refused (bits: 1 forward, 2 backward data, 4 backward filter).
static REFUSED: AtomicU8 = AtomicU8::new(0);

const PASS_NAMES: [&str; 3] = ["forward", "backward data", "backward filter"];

/// The passes cuDNN refused in this process (each then runs the fallback).
pub fn refused() -> Vec<&'static str> {
    let bits = REFUSED.load(Ordering::Relaxed);
    (0..3).filter(|i| bits & (1 << i) != 0).map(|i| PASS_NAMES[i]).collect()
}

/// Whether [`conv1d_cl`] runs for `x`: see the module documentation.
pub fn applies(x: &Tensor) -> bool {
    use candle_core::DType;
    cfg!(feature = "cudnn")
        && x.device().is_cuda()
        && matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16)
        && x.elem_count() > 0
        && super::enabled()
        && SWITCH.on()
}

/// y [B, T_full, C_out] = conv1d(x [B, L, C_in], w [C_out, C_in / groups, K]) with `stride` and
/// `padding`, all channels-last, through cuDNN (see the module documentation). No gradient is
/// recorded (callers wrap it: the inference path takes it as is, the training convolution's op
/// hands it out as its forward and has its own backward). `None` where it does not apply.
pub fn conv1d_cl(x: &Tensor, w: &Tensor, stride: usize, padding: usize, groups: usize) -> Result<Option<Tensor>> {
    if !applies(x) || x.dtype() != w.dtype() {
        return Ok(None);
    }
    #[cfg(feature = "cudnn")]
    {
        let geom = Geom { stride, padding, groups, pass: Pass::Forward };
        if !geom.pass.allowed() {
            return Ok(None);
        }
        let w = krsc(w)?;
        let x = x.detach().contiguous()?;
        Ok(geom.attempt(x.apply_op2_no_bwd(&w, &geom)))
    }
    #[cfg(not(feature = "cudnn"))]
    {
        let _ = (stride, padding, groups);
        Ok(None)
    }
}

/// The gradients of [`conv1d_cl`] for dy [B, T_full, C_out] (every output frame the
/// convolution yields; zero frames where fewer were used): dx [B, L, C_in] (cuDNN's backward
/// data: the transposed convolution) when `want_dx`, and dw [C_out, C_in / groups, K] (backward
/// filter, straight from x and dy: no im2col columns) when `want_dw`, each a new tensor without
/// gradient; `conv` is (stride, padding, groups). `None` where cuDNN does not apply (or
/// refused: see the module documentation).
pub fn conv1d_cl_backward(x: &Tensor, w: &Tensor, dy: &Tensor, conv: (usize, usize, usize), (want_dx, want_dw): (bool, bool)) -> Result<Option<(Option<Tensor>, Option<Tensor>)>> {
    let (stride, padding, groups) = conv;
    if !applies(dy) || x.dtype() != dy.dtype() || w.dtype() != dy.dtype() {
        return Ok(None);
    }
    if matches!(dy.dtype(), candle_core::DType::BF16 | candle_core::DType::F16) {
        // cuDNN 9 runs the input gradient of every bf16 NHWC convolution here as
        // `dgrad2d_grouped_direct_kernel`: 63 ms a call on an H200, 443 ms of a 522 ms
        // wav2vec2-base step (PyTorch's whole step: 29 ms), with the heuristic's algorithm and
        // with the fastest by timing ([`benchmark`]: 516 ms) alike. The fallback's backward
        // (forward still on cuDNN) takes the step to 108 ms.
        return Ok(None);
    }
    #[cfg(feature = "cudnn")]
    {
        let (_, l, _) = x.dims3()?;
        let k = w.dim(2)?;
        let data = Geom { stride, padding, groups, pass: Pass::BackwardData { l } };
        let filter = Geom { stride, padding, groups, pass: Pass::BackwardFilter { k } };
        // Both from cuDNN or both from the fallback.
        if (want_dx && !data.pass.allowed()) || (want_dw && !filter.pass.allowed()) {
            return Ok(None);
        }
        let dy = dy.detach().contiguous()?;
        let dx = if want_dx {
            match data.attempt(dy.apply_op2_no_bwd(&krsc(w)?, &data)) {
                Some(dx) => Some(dx),
                None => return Ok(None),
            }
        } else {
            None
        };
        let dw = if want_dw {
            // [C_out, K, C_g] (KRSC) -> [C_out, C_g, K]
            match filter.attempt(x.detach().contiguous()?.apply_op2_no_bwd(&dy, &filter)) {
                Some(dw) => Some(dw.transpose(1, 2)?.contiguous()?),
                None => return Ok(None),
            }
        } else {
            None
        };
        Ok(Some((dx, dw)))
    }
    #[cfg(not(feature = "cudnn"))]
    {
        let _ = (x, w, stride, padding, groups, want_dx, want_dw);
        Ok(None)
    }
}

/// [C_out, C_g, K] (PyTorch's layout) -> [C_out, K, C_g]: the NHWC (KRSC) filter.
#[cfg(feature = "cudnn")]
fn krsc(w: &Tensor) -> Result<Tensor> {
    Ok(w.detach().transpose(1, 2)?.contiguous()?)
}

#[cfg(feature = "cudnn")]
impl Pass {
    fn bit(self) -> u8 {
        match self {
            Pass::Forward => 1,
            Pass::BackwardData { .. } => 2,
            Pass::BackwardFilter { .. } => 4,
        }
    }

    /// Not refused by cuDNN so far.
    fn allowed(self) -> bool {
        REFUSED.load(Ordering::Relaxed) & self.bit() == 0
    }
}

#[cfg(feature = "cudnn")]
impl Geom {
    /// A cuDNN call's result; an error marks this pass refused for the rest of the process
    /// (one warning), and the caller falls back.
    fn attempt(&self, r: candle_core::Result<Tensor>) -> Option<Tensor> {
        match r {
            Ok(t) => Some(t),
            Err(e) => {
                let bit = self.pass.bit();
                if REFUSED.fetch_or(bit, Ordering::Relaxed) & bit == 0 {
                    eprintln!("klspeech: {e}; this pass uses the fallback from now on (KLSPEECH_NO_CUDNN_NHWC=1 skips cuDNN)");
                }
                None
            }
        }
    }
}

/// Which cuDNN call, and the sizes its two inputs do not give.
#[cfg(feature = "cudnn")]
#[derive(Clone, Copy, Debug)]
enum Pass {
    /// inputs x [B, L, C_in], w [C_out, K, C_g] -> y [B, T, C_out]
    Forward,
    /// inputs dy [B, T, C_out], w [C_out, K, C_g] -> dx [B, L, C_in]
    BackwardData { l: usize },
    /// inputs x [B, L, C_in], dy [B, T, C_out] -> dw [C_out, K, C_g]
    BackwardFilter { k: usize },
}

/// The op: a convolution's geometry and the pass; inputs contiguous.
#[cfg(feature = "cudnn")]
struct Geom {
    stride: usize,
    padding: usize,
    groups: usize,
    pass: Pass,
}

#[cfg(feature = "cudnn")]
impl candle_core::CustomOp2 for Geom {
    fn name(&self) -> &'static str {
        match self.pass {
            Pass::Forward => "conv1d-nhwc-cudnn",
            Pass::BackwardData { .. } => "conv1d-nhwc-cudnn-backward-data",
            Pass::BackwardFilter { .. } => "conv1d-nhwc-cudnn-backward-filter",
        }
    }

    super::kernels::cuda_only!(2);

    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CudaStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::DType;
        match s1.dtype() {
            DType::F32 => gpu::run::<f32>(self, s1, l1, s2, l2),
            DType::BF16 => gpu::run::<half::bf16>(self, s1, l1, s2, l2),
            DType::F16 => gpu::run::<half::f16>(self, s1, l1, s2, l2),
            other => candle_core::bail!("{}: no {other:?} version", self.name()),
        }
    }
}

#[cfg(feature = "cudnn")]
mod gpu {
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::sync::Arc;

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::cudnn::{sys, ConvBackwardData, ConvBackwardFilter, ConvForward, Cudnn, CudnnDataType};
    use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
    use candle_core::cuda_backend::{CudaDType, CudaStorage, DeviceId};
    use candle_core::{bail, CustomOp2, Layout, Shape, WithDType};

    use super::{Geom, Pass};

    thread_local! {
        /// One cuDNN handle per device and thread (creating one takes milliseconds), bound to
        /// the device's stream, as candle keeps its own.
        static HANDLES: RefCell<HashMap<DeviceId, Arc<Cudnn>>> = RefCell::new(HashMap::new());
    }

    fn err(op: &Geom, e: impl std::fmt::Debug) -> candle_core::Error {
        candle_core::Error::Msg(format!("{}: cuDNN: {e:?}", op.name()))
    }

    /// A geometry: pass bit, type, (b, l, c_in, c_out, k, t, stride, padding, groups), TF32.
    type Key = (u8, &'static str, [usize; 9], bool);

    /// The index (in the pass's algorithm list) that [`super::benchmark`] chose per geometry.
    static CHOSEN: std::sync::Mutex<Option<HashMap<Key, usize>>> = std::sync::Mutex::new(None);

    /// Workspaces above this are not tried (FFT algorithms can ask for gigabytes).
    const MAX_WORKSPACE: usize = 1 << 30;

    const FWD: [sys::cudnnConvolutionFwdAlgo_t; 8] = {
        use sys::cudnnConvolutionFwdAlgo_t::*;
        [
            CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
            CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
            CUDNN_CONVOLUTION_FWD_ALGO_GEMM,
            CUDNN_CONVOLUTION_FWD_ALGO_DIRECT,
            CUDNN_CONVOLUTION_FWD_ALGO_FFT,
            CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING,
            CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD,
            CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED,
        ]
    };
    const BWD_DATA: [sys::cudnnConvolutionBwdDataAlgo_t; 6] = {
        use sys::cudnnConvolutionBwdDataAlgo_t::*;
        [
            CUDNN_CONVOLUTION_BWD_DATA_ALGO_0,
            CUDNN_CONVOLUTION_BWD_DATA_ALGO_1,
            CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT,
            CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT_TILING,
            CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD,
            CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD_NONFUSED,
        ]
    };
    const BWD_FILTER: [sys::cudnnConvolutionBwdFilterAlgo_t; 7] = {
        use sys::cudnnConvolutionBwdFilterAlgo_t::*;
        [
            CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0,
            CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1,
            CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT,
            CUDNN_CONVOLUTION_BWD_FILTER_ALGO_3,
            CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD,
            CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD_NONFUSED,
            CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT_TILING,
        ]
    };

    /// The algorithm for `key`: cuDNN's heuristic (`heuristic`), or, in benchmark mode, the
    /// fastest of `algos` by wall time on this stream, each run twice (the first run loads its
    /// kernels) by `run` (which returns `None` where the algorithm does not apply), the choice
    /// kept for the process. Runs write the pass's output buffer, which the caller then
    /// overwrites with the chosen algorithm's result.
    fn choose<A: Copy>(
        key: Key,
        algos: &[A],
        stream: &candle_core::cuda_backend::cudarc::driver::CudaStream,
        heuristic: impl FnOnce() -> candle_core::Result<A>,
        mut run: impl FnMut(A) -> Option<()>,
    ) -> candle_core::Result<A> {
        if !super::benchmark() {
            return heuristic();
        }
        if let Some(&i) = CHOSEN.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(HashMap::new).get(&key) {
            return Ok(algos[i]);
        }
        let sync = || stream.synchronize().map_err(|e| candle_core::Error::Msg(format!("cuDNN benchmark: {e:?}")));
        let mut best: Option<(f64, usize)> = None;
        for (i, &algo) in algos.iter().enumerate() {
            sync()?;
            if run(algo).is_none() {
                continue;
            }
            sync()?;
            let t0 = std::time::Instant::now();
            if run(algo).is_none() {
                continue;
            }
            sync()?;
            let dt = t0.elapsed().as_secs_f64();
            if best.is_none_or(|(b, _)| dt < b) {
                best = Some((dt, i));
            }
        }
        let Some((_, i)) = best else {
            return heuristic();
        };
        CHOSEN.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(HashMap::new).insert(key, i);
        Ok(algos[i])
    }

    pub(super) fn run<T: CudaDType + CudnnDataType + DeviceRepr + WithDType>(
        op: &Geom,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (s, p, g) = (op.stride, op.padding, op.groups);
        // Every size of the convolution from the two inputs and the pass.
        let (b, l, c_in, c_out, k, t) = match op.pass {
            Pass::Forward => {
                let (b, l, c_in) = l1.shape().dims3()?;
                let (c_out, k, _) = l2.shape().dims3()?;
                (b, l, c_in, c_out, k, if s > 0 && l + 2 * p >= k { (l + 2 * p - k) / s + 1 } else { 0 })
            }
            Pass::BackwardData { l } => {
                let (b, t, c_out) = l1.shape().dims3()?;
                let (_, k, c_g) = l2.shape().dims3()?;
                (b, l, c_g * g, c_out, k, t)
            }
            Pass::BackwardFilter { k } => {
                let (b, l, c_in) = l1.shape().dims3()?;
                let (_, t, c_out) = l2.shape().dims3()?;
                (b, l, c_in, c_out, k, t)
            }
        };
        let c_g = c_in.checked_div(g).unwrap_or(0);
        let consistent = g > 0 && s > 0 && c_in == c_g * g && c_out % g == 0 && l + 2 * p >= k && t == (l + 2 * p - k) / s + 1;
        let dims = |pass: Pass, a: &Layout, bl: &Layout| -> bool {
            let (x_or_dy, w_or_dy) = (a.dims(), bl.dims());
            match pass {
                Pass::Forward => x_or_dy == [b, l, c_in] && w_or_dy == [c_out, k, c_g],
                Pass::BackwardData { .. } => x_or_dy == [b, t, c_out] && w_or_dy == [c_out, k, c_g],
                Pass::BackwardFilter { .. } => x_or_dy == [b, l, c_in] && w_or_dy == [b, t, c_out],
            }
        };
        if !consistent || !l1.is_contiguous() || !l2.is_contiguous() || !dims(op.pass, l1, l2) {
            bail!("{}: inputs {:?} and {:?}, {g} groups, stride {s}, padding {p}", op.name(), l1.shape(), l2.shape());
        }
        let i = |v: usize| -> candle_core::Result<i32> { i32::try_from(v).map_err(|_| err(op, format!("dimension {v} exceeds i32"))) };
        let dev = s1.device().clone();
        let cudnn = HANDLES.with(|h| -> candle_core::Result<Arc<Cudnn>> {
            if let Some(c) = h.borrow().get(&dev.id()) {
                return Ok(c.clone());
            }
            let c = Cudnn::new(dev.cuda_stream()).map_err(|e| err(op, e))?;
            h.borrow_mut().insert(dev.id(), c.clone());
            Ok(c)
        })?;
        let nhwc = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC;
        let mut conv = cudnn
            .create_conv2d::<f32>([i(p)?, 0], [i(s)?, 1], [1, 1], sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION)
            .map_err(|e| err(op, e))?;
        conv.set_group_count(i(g)?).map_err(|e| err(op, e))?;
        if T::DTYPE == candle_core::DType::F32 {
            let math = if candle_core::cuda_backend::gemm_reduced_precision_f32() {
                sys::cudnnMathType_t::CUDNN_DEFAULT_MATH
            } else {
                sys::cudnnMathType_t::CUDNN_FMA_MATH
            };
            conv.set_math_type(math).map_err(|e| err(op, e))?;
        }
        // Logical dims are always [N, C, H, W]; the format says the memory is [N, H, W, C]
        // (for the filter [K, R, S, C]).
        let xd = cudnn.create_4d_tensor::<T>(nhwc, [i(b)?, i(c_in)?, i(l)?, 1]).map_err(|e| err(op, e))?;
        let wd = cudnn.create_4d_filter::<T>(nhwc, [i(c_out)?, i(c_g)?, i(k)?, 1]).map_err(|e| err(op, e))?;
        let yd = cudnn.create_4d_tensor::<T>(nhwc, [i(b)?, i(c_out)?, i(t)?, 1]).map_err(|e| err(op, e))?;
        let a = s1.as_cuda_slice::<T>()?.slice(l1.start_offset()..);
        let c = s2.as_cuda_slice::<T>()?.slice(l2.start_offset()..);
        let (one, zero) = (T::from_f64(1.0), T::from_f64(0.0));
        // SAFETY (every launch below): the descriptors describe exactly these buffers, all
        // contiguous of type T: x [B, L, C_in], y / dy [B, T, C_out], w / dw [C_out, K, C_g]
        // (checked above); cuDNN writes every output element (beta = 0); the workspace is scratch.
        let key: Key = (op.pass.bit(), T::DTYPE.as_str(), [b, l, c_in, c_out, k, t, s, p, g], candle_core::cuda_backend::gemm_reduced_precision_f32());
        let stream = dev.cuda_stream();
        // One benchmark run of `algo` (see `choose`): its workspace, then the launch.
        macro_rules! trial {
            ($call:ident, $algo:ident, |$scratch:ident| $launch:expr) => {{
                let bytes = $call.get_workspace_size($algo).ok().filter(|&n| n <= MAX_WORKSPACE)?;
                let mut $scratch = unsafe { dev.alloc::<u8>(bytes.max(1)) }.ok()?;
                unsafe { $launch }.ok()
            }};
        }
        let (out, shape) = match op.pass {
            Pass::Forward => {
                let call = ConvForward { conv: &conv, x: &xd, w: &wd, y: &yd };
                let mut out = unsafe { dev.alloc::<T>(b * t * c_out)? };
                let algo = choose(key, &FWD, &stream, || call.pick_algorithm().map_err(|e| err(op, e)), |algo| {
                    trial!(call, algo, |scratch| call.launch(algo, Some(&mut scratch), (one, zero), &a, &c, &mut out))
                })?;
                let bytes = call.get_workspace_size(algo).map_err(|e| err(op, e))?;
                let mut scratch = unsafe { dev.alloc::<u8>(bytes.max(1))? };
                unsafe { call.launch(algo, Some(&mut scratch), (one, zero), &a, &c, &mut out) }.map_err(|e| err(op, e))?;
                (out, Shape::from((b, t, c_out)))
            }
            Pass::BackwardData { .. } => {
                let call = ConvBackwardData { conv: &conv, dx: &xd, w: &wd, dy: &yd };
                let mut out = unsafe { dev.alloc::<T>(b * l * c_in)? };
                let algo = choose(key, &BWD_DATA, &stream, || call.pick_algorithm().map_err(|e| err(op, e)), |algo| {
                    trial!(call, algo, |scratch| call.launch(algo, Some(&mut scratch), (one, zero), &mut out, &c, &a))
                })?;
                let bytes = call.get_workspace_size(algo).map_err(|e| err(op, e))?;
                let mut scratch = unsafe { dev.alloc::<u8>(bytes.max(1))? };
                unsafe { call.launch(algo, Some(&mut scratch), (one, zero), &mut out, &c, &a) }.map_err(|e| err(op, e))?;
                (out, Shape::from((b, l, c_in)))
            }
            Pass::BackwardFilter { .. } => {
                let call = ConvBackwardFilter { conv: &conv, x: &xd, dw: &wd, dy: &yd };
                let mut out = unsafe { dev.alloc::<T>(c_out * k * c_g)? };
                let algo = choose(key, &BWD_FILTER, &stream, || call.pick_algorithm().map_err(|e| err(op, e)), |algo| {
                    trial!(call, algo, |scratch| call.launch(algo, Some(&mut scratch), (one, zero), &a, &mut out, &c))
                })?;
                let bytes = call.get_workspace_size(algo).map_err(|e| err(op, e))?;
                let mut scratch = unsafe { dev.alloc::<u8>(bytes.max(1))? };
                unsafe { call.launch(algo, Some(&mut scratch), (one, zero), &a, &mut out, &c) }.map_err(|e| err(op, e))?;
                (out, Shape::from((c_out, k, c_g)))
            }
        };
        Ok((CudaStorage::wrap_cuda_slice(out, dev), shape))
    }
}
