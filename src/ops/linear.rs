//! `y = x W^T + b` as one gemm that starts from the bias, with a backward of two gemms and a
//! column sum.
//!
//! candle composes a linear layer as `matmul(x, w.t())` plus a broadcast bias add: its backward
//! hands the weight a *transposed* gradient view [in, out], which the gradient store then copies
//! strided into the weight's layout; the bias gradient is a reduction over every leading
//! dimension. Here the weight gradient comes out of gemm already in the weight's [out, in]
//! layout (dW = g^T x, gemm reading g transposed in place), and the forward writes the bias
//! rows first and lets gemm accumulate onto them (one pass over y instead of two).

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor, WithDType};
use gemm::Parallelism;
use num_traits::Float;

use rayon::prelude::*;

use super::{data, fused, output_buf};
use crate::error::{Error, Result};

fn parallelism() -> Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

/// [`super::mm`] with a contiguous [m, n] destination and gemm parallel over the threads.
///
/// Safety: as for [`super::mm`].
unsafe fn mm<T: 'static + Float>((m, n, k): (usize, usize, usize), dst: *mut T, accumulate: bool, lhs: *const T, l: (usize, usize), rhs: *const T, r: (usize, usize)) {
    super::mm((m, n, k), dst, n, accumulate, lhs, l, rhs, r, parallelism())
}

/// (rows, in, out) of x [rows, in] and w [out, in].
fn dims(lx: &Layout, lw: &Layout) -> candle_core::Result<(usize, usize, usize)> {
    match (lx.dims(), lw.dims()) {
        (&[rows, d_in], &[d_out, w_in]) if d_in == w_in => Ok((rows, d_in, d_out)),
        (a, b) => bail!("klspeech linear: x {a:?} and w {b:?} do not match"),
    }
}

/// The output buffer [rows, out]: the bias in every row, or (no bias) uninitialized for a
/// gemm that does not read it.
fn output_from_bias<T: WithDType + Float>(rows: usize, d_out: usize, b: Option<&[T]>) -> Vec<T> {
    // Safety: the bias rows are copied in below, or (no bias) the gemm does not read y.
    let mut y = unsafe { output_buf::<T>(rows * d_out, 0) };
    if let Some(b) = b {
        y.par_chunks_mut(d_out * 64).for_each(|block| block.chunks_exact_mut(d_out).for_each(|row| row.copy_from_slice(b)));
    }
    y
}

/// y [rows, out] = x w^T (+ b).
fn forward<T: WithDType + Float>(x: &[T], w: &[T], b: Option<&[T]>, (rows, d_in, d_out): (usize, usize, usize)) -> Vec<T> {
    if d_in > d_out {
        // x and w are both contiguous along `in`, so gemm packs w through a transposing
        // gather of rows `in` apart, which thrashes the L1 sets when the row length is a
        // multiple of 1 KiB; when `in` is the longer side (the feed-forward's output layer)
        // that costs more than the product itself (wav2vec2-base, 249 x 3072 -> 768: 12.3 ms
        // against 7.2 ms with this one-pass transposition first).
        return forward_transposed(x, &super::transpose(w, d_out, d_in), b, (rows, d_in, d_out));
    }
    let mut y = output_from_bias(rows, d_out, b);
    // Safety: x is [rows, in], w [out, in] read transposed, y [rows, out]; all contiguous.
    unsafe { mm((rows, d_out, d_in), y.as_mut_ptr(), b.is_some(), x.as_ptr(), (d_in, 1), w.as_ptr(), (1, d_in)) };
    y
}

/// y [rows, out] = x wt (+ b) with the weight transposed, wt [in, out].
fn forward_transposed<T: WithDType + Float>(x: &[T], wt: &[T], b: Option<&[T]>, (rows, d_in, d_out): (usize, usize, usize)) -> Vec<T> {
    let mut y = output_from_bias(rows, d_out, b);
    // Safety: x is [rows, in], wt [in, out], y [rows, out]; all contiguous.
    unsafe { mm((rows, d_out, d_in), y.as_mut_ptr(), b.is_some(), x.as_ptr(), (d_in, 1), wt.as_ptr(), (d_out, 1)) };
    y
}

/// Packed [dx (rows in), dw (out in)] from g [rows, out]; a part not `wanted` (dx, dw) is
/// not computed (left zero; the caller does not return it).
fn backward<T: WithDType + Float>(x: &[T], w: &[T], g: &[T], (rows, d_in, d_out): (usize, usize, usize), wrt: LinearBwd) -> Vec<T> {
    // Safety: gemm writes every element of the output (beta = 0) and reads only x, w and g.
    unsafe {
        match wrt {
            LinearBwd::Input => {
                // dx [rows, in] = g w
                let mut dx = output_buf::<T>(rows * d_in, 0);
                mm((rows, d_in, d_out), dx.as_mut_ptr(), false, g.as_ptr(), (d_out, 1), w.as_ptr(), (d_in, 1));
                dx
            }
            LinearBwd::Weight => {
                // dw [out, in] = g^T x (g read transposed in place)
                let mut dw = output_buf::<T>(d_out * d_in, 0);
                mm((d_out, d_in, rows), dw.as_mut_ptr(), false, g.as_ptr(), (1, d_out), x.as_ptr(), (d_in, 1));
                dw
            }
        }
    }
}

struct LinearBias;
struct LinearNoBias;
/// (x, w, g) -> dx [rows, in] or dw [out, in]: one op per gradient, each in a buffer of its
/// own (the weight's gradient can then be stored as computed, see `grads::route`).
#[derive(Clone, Copy)]
enum LinearBwd {
    Input,
    Weight,
}

impl CustomOp3 for LinearBias {
    fn name(&self) -> &'static str {
        "klspeech-linear"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = dims(l1, l2)?;
        by_dtype!(s1, T => {
            let y = forward(data::<T>(s1, l1)?, data::<T>(s2, l2)?, Some(data::<T>(s3, l3)?), d);
            Ok((T::to_cpu_storage_owned(y), Shape::from((d.0, d.2))))
        })
    }
    fn bwd(&self, x: &Tensor, w: &Tensor, b: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let (dx, dw) = split(x, w, &g)?;
        let db = g.apply_op1_no_bwd(&super::ColumnSums)?;
        Ok((dx, dw, super::grads::route(b, Some(db))?))
    }
}

impl CustomOp2 for LinearNoBias {
    fn name(&self) -> &'static str {
        "klspeech-linear-no-bias"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = dims(l1, l2)?;
        by_dtype!(s1, T => {
            let y = forward(data::<T>(s1, l1)?, data::<T>(s2, l2)?, None, d);
            Ok((T::to_cpu_storage_owned(y), Shape::from((d.0, d.2))))
        })
    }
    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        split(x, w, &g.contiguous()?)
    }
}

/// dx and dw (the latter through `grads::route`); a gradient nothing needs is not computed
/// (dx of the feature projection and of a head over a frozen encoder, dw of a frozen layer).
fn split(x: &Tensor, w: &Tensor, g: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
    let dx = if x.track_op() { Some(x.apply_op3_no_bwd(w, g, &LinearBwd::Input)?) } else { None };
    let dw = if w.track_op() { Some(x.apply_op3_no_bwd(w, g, &LinearBwd::Weight)?) } else { None };
    Ok((dx, super::grads::route(w, dw)?))
}

impl CustomOp3 for LinearBwd {
    fn name(&self) -> &'static str {
        "klspeech-linear-bwd"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = dims(l1, l2)?;
        by_dtype!(s1, T => {
            let out = backward(data::<T>(s1, l1)?, data::<T>(s2, l2)?, data::<T>(s3, l3)?, d, *self);
            let shape = match self {
                LinearBwd::Input => Shape::from((d.0, d.1)),
                LinearBwd::Weight => Shape::from((d.2, d.1)),
            };
            Ok((T::to_cpu_storage_owned(out), shape))
        })
    }
}

/// `x w^T + b` for x [rows, in], w [out, in] (PyTorch's layout), b [out]: differentiable in all
/// three. On the CPU in f32/f64 the gemm-direct op above; elsewhere candle's matmul and add
/// (on a GPU without gradient klspeech's in-place bias kernel, `kernels::add_bias_fresh`).
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let (rows, d_in) = x.dims2()?;
    let (d_out, w_in) = w.dims2()?;
    if d_in != w_in || b.is_some_and(|b| b.dims() != [d_out]) {
        return Err(Error::InvalidInput(format!("linear: x [{rows}, {d_in}], weight [{d_out}, {w_in}], bias {:?}", b.map(|b| b.dims().to_vec()))));
    }
    if super::device_op_applies(x) && w.dtype() == x.dtype() && (x.track_op() || w.track_op() || b.is_some_and(|b| b.track_op())) {
        return super::device::linear_device(x, w, b);
    }
    if !fused(x) || w.dtype() != x.dtype() {
        let y = x.matmul(&w.t()?)?;
        return Ok(match b {
            Some(b) => super::kernels::add_bias_fresh(y, b, false)?,
            None => y,
        });
    }
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    Ok(match b {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, LinearBias)?,
        None => x.apply_op2(&w, LinearNoBias)?,
    })
}

/// Inference off the CPU's fused path: `gelu_erf(x w^T + b)` for x [rows, in], w [out, in],
/// b [out], with nothing recorded for a backward. On a GPU the bias and the GELU are one pass
/// after cuBLAS's product (`kernels::add_bias_fresh`), where they were two; elsewhere the ops
/// one after the other.
pub fn linear_gelu_infer(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (x, w) = (x.detach(), w.detach());
    let y = x.matmul(&w.t()?)?;
    super::kernels::add_bias_fresh(y, &b.detach(), true)
}

/// y [rows, out] = x wt (+ b) with the weight already transposed (wt [in, out]): gemm packs
/// it with plain contiguous copies. Inference only (no backward).
struct LinearT {
    bias: bool,
}

impl CustomOp3 for LinearT {
    fn name(&self) -> &'static str {
        "klspeech-linear-t"
    }
    /// (x, wt, b); without a bias the third input is ignored.
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, d_in, d_out) = match (l1.dims(), l2.dims()) {
            (&[rows, d_in], &[w_in, d_out]) if d_in == w_in => (rows, d_in, d_out),
            (a, b) => bail!("klspeech linear: x {a:?} and wt {b:?} do not match"),
        };
        by_dtype!(s1, T => {
            let b = if self.bias { Some(data::<T>(s3, l3)?) } else { None };
            if b.is_some_and(|b| b.len() != d_out) {
                bail!("klspeech linear: bias of {} values for {d_out} outputs", b.map_or(0, |b| b.len()));
            }
            let y = forward_transposed(data::<T>(s1, l1)?, data::<T>(s2, l2)?, b, (rows, d_in, d_out));
            Ok((T::to_cpu_storage_owned(y), Shape::from((rows, d_out))))
        })
    }
}

/// Inference: `x wt + b` for x [rows, in] and a weight stored transposed, wt [in, out] (see
/// [`transpose_weight`]); no gradient flows through it. Fused on the CPU in f32/f64, else
/// candle's matmul.
pub fn linear_transposed(x: &Tensor, wt: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    if !fused(x) || wt.dtype() != x.dtype() {
        let y = x.matmul(wt)?;
        return Ok(match b {
            Some(b) => super::kernels::add_bias_fresh(y, b, false)?,
            None => y,
        });
    }
    let x = x.contiguous()?;
    let wt = wt.contiguous()?;
    let op = LinearT { bias: b.is_some() };
    let b = match b {
        Some(b) => b.contiguous()?,
        None => wt.clone(), // a placeholder the op does not read
    };
    Ok(x.apply_op3_no_bwd(&wt, &b, &op)?)
}

/// w [out, in] -> w^T [in, out], contiguous (one parallel tiled pass on the CPU), detached.
pub fn transpose_weight(w: &Tensor) -> Result<Tensor> {
    let (d_out, d_in) = w.dims2()?;
    if !fused(w) {
        return Ok(w.detach().t()?.contiguous()?);
    }
    let w = w.detach();
    let out = match w.dtype() {
        candle_core::DType::F64 => Tensor::from_vec(super::transpose(&w.flatten_all()?.to_vec1::<f64>()?, d_out, d_in), (d_in, d_out), w.device())?,
        _ => Tensor::from_vec(super::transpose(&w.flatten_all()?.to_vec1::<f32>()?, d_out, d_in), (d_in, d_out), w.device())?,
    };
    Ok(out)
}
