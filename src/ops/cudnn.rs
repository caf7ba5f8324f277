//! Channels-last grouped 1-D convolution through cuDNN, in one call (the `cudnn` feature).
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
//! ops and klspeech's GPU kernels on, unless `KLSPEECH_NO_CUDNN_NHWC=1`. f64 keeps candle's
//! path (NHWC double convolutions are not among cuDNN's supported configurations). Should
//! cuDNN refuse a call (a configuration this cuDNN does not support), the convolution falls
//! back to candle's for the rest of the process, with one warning on stderr;
//! `tests/ops.rs` fails in that case, so a GPU check shows it.

use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::Tensor;

use crate::error::Result;

// 0 = not read yet, 1 = on, 2 = off (KLSPEECH_NO_CUDNN_NHWC, or cuDNN refused a call).
static STATE: AtomicU8 = AtomicU8::new(0);

fn on() -> bool {
    match STATE.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let on = std::env::var_os("KLSPEECH_NO_CUDNN_NHWC").is_none_or(|v| v.is_empty() || v == "0");
            STATE.store(if on { 1 } else { 2 }, Ordering::Relaxed);
            on
        }
    }
}

/// Whether [`conv1d_cl`] runs for `x`: see the module documentation.
pub fn applies(x: &Tensor) -> bool {
    cfg!(feature = "cudnn") && super::kernels::apply_any_float(x) && on()
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
        // [C_out, C_g, K] -> [C_out, K, C_g]: the NHWC (KRSC) filter.
        let w = w.detach().transpose(1, 2)?.contiguous()?;
        let x = x.detach().contiguous()?;
        match x.apply_op2_no_bwd(&w, &ConvNhwc { stride, padding, groups }) {
            Ok(y) => Ok(Some(y)),
            Err(e) => {
                if STATE.swap(2, Ordering::Relaxed) == 1 {
                    eprintln!("klspeech: {e}; convolutions use candle's from now on (KLSPEECH_NO_CUDNN_NHWC=1 skips this attempt)");
                }
                Ok(None)
            }
        }
    }
    #[cfg(not(feature = "cudnn"))]
    {
        let _ = (stride, padding, groups);
        Ok(None)
    }
}

/// The op: inputs x [B, L, C_in] and w [C_out, K, C_g], both contiguous.
#[cfg(feature = "cudnn")]
struct ConvNhwc {
    stride: usize,
    padding: usize,
    groups: usize,
}

#[cfg(feature = "cudnn")]
impl candle_core::CustomOp2 for ConvNhwc {
    fn name(&self) -> &'static str {
        "conv1d-nhwc-cudnn"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        candle_core::bail!("{}: a cuDNN convolution (GPU only)", self.name())
    }

    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &candle_core::Layout,
        ws: &candle_core::CudaStorage,
        wl: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::DType;
        match xs.dtype() {
            DType::F32 => gpu::run::<f32>(self, xs, xl, ws, wl),
            DType::BF16 => gpu::run::<half::bf16>(self, xs, xl, ws, wl),
            DType::F16 => gpu::run::<half::f16>(self, xs, xl, ws, wl),
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
    use candle_core::cuda_backend::cudarc::cudnn::{sys, ConvForward, Cudnn, CudnnDataType};
    use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
    use candle_core::cuda_backend::{CudaDType, CudaStorage, DeviceId};
    use candle_core::{bail, CustomOp2, Layout, Shape, WithDType};

    use super::ConvNhwc;

    thread_local! {
        /// One cuDNN handle per device and thread (creating one takes milliseconds), bound to
        /// the device's stream, as candle keeps its own.
        static HANDLES: RefCell<HashMap<DeviceId, Arc<Cudnn>>> = RefCell::new(HashMap::new());
    }

    fn err(op: &ConvNhwc, e: impl std::fmt::Debug) -> candle_core::Error {
        candle_core::Error::Msg(format!("{}: cuDNN: {e:?}", op.name()))
    }

    pub(super) fn run<T: CudaDType + CudnnDataType + DeviceRepr + WithDType>(
        op: &ConvNhwc,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (b, l, c_in) = xl.shape().dims3()?;
        let (c_out, k, c_g) = wl.shape().dims3()?;
        let (s, p, g) = (op.stride, op.padding, op.groups);
        if !xl.is_contiguous() || !wl.is_contiguous() || g == 0 || c_in != c_g * g || c_out % g != 0 || s == 0 || l + 2 * p < k {
            bail!("{}: input {:?}, filter {:?} (KRSC), {g} groups, stride {s}, padding {p}", op.name(), xl.shape(), wl.shape());
        }
        let t = (l + 2 * p - k) / s + 1;
        let i = |v: usize| -> candle_core::Result<i32> { i32::try_from(v).map_err(|_| err(op, format!("dimension {v} exceeds i32"))) };
        let dev = xs.device().clone();
        let cudnn = HANDLES.with(|h| -> candle_core::Result<Arc<Cudnn>> {
            if let Some(c) = h.borrow().get(&dev.id()) {
                return Ok(c.clone());
            }
            let c = Cudnn::new(dev.cuda_stream()).map_err(|e| err(op, e))?;
            h.borrow_mut().insert(dev.id(), c.clone());
            Ok(c)
        })?;
        let x = xs.as_cuda_slice::<T>()?.slice(xl.start_offset()..);
        let w = ws.as_cuda_slice::<T>()?.slice(wl.start_offset()..);
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
        // Logical dims are always [N, C, H, W]; the format says the memory is [N, H, W, C].
        let xd = cudnn.create_4d_tensor::<T>(nhwc, [i(b)?, i(c_in)?, i(l)?, 1]).map_err(|e| err(op, e))?;
        let wd = cudnn.create_4d_filter::<T>(nhwc, [i(c_out)?, i(c_g)?, i(k)?, 1]).map_err(|e| err(op, e))?;
        let yd = cudnn.create_4d_tensor::<T>(nhwc, [i(b)?, i(c_out)?, i(t)?, 1]).map_err(|e| err(op, e))?;
        let fwd = ConvForward { conv: &conv, x: &xd, w: &wd, y: &yd };
        let algo = fwd.pick_algorithm().map_err(|e| err(op, e))?;
        let bytes = fwd.get_workspace_size(algo).map_err(|e| err(op, e))?;
        // SAFETY: cuDNN writes every output element (beta = 0); the workspace is scratch.
        let mut y = unsafe { dev.alloc::<T>(b * t * c_out)? };
        let mut scratch = unsafe { dev.alloc::<u8>(bytes.max(1))? };
        // SAFETY: the descriptors above describe exactly these buffers: x [B, L, C_in] and
        // y [B, T, C_out] contiguous of type T, w [C_out, K, C_g] contiguous of type T.
        unsafe { fwd.launch(algo, Some(&mut scratch), (T::from_f64(1.0), T::from_f64(0.0)), &x, &w, &mut y) }.map_err(|e| err(op, e))?;
        Ok((CudaStorage::wrap_cuda_slice(y, dev), Shape::from((b, t, c_out))))
    }
}
