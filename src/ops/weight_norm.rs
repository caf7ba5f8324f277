//! Weight normalization over every axis but the last, `torch.nn.utils.weight_norm(.., dim=2)`
//! of wav2vec2's positional convolution: w = g v / ||v|| with ||v|| [K] over the [O, C]
//! entries of each kernel tap. One op forward and two backward, where candle ran five
//! passes forward and about ten backward over the 4.7 M weights of wav2vec2-base, its
//! broadcast reductions one element at a time (2-3 % of a base training step).

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor, WithDType};
use candle_core::backend::BackendStorage;
use num_traits::Float;
use rayon::prelude::*;

use super::{c, data, fused, grads, output_buf};
use crate::error::{Error, Result};

/// Rows of [rows, K] per parallel task.
const ROWS: usize = 256;

fn f64_of<T: Float>(v: T) -> f64 {
    v.to_f64().unwrap_or(0.0)
}

/// Per column k of a, b [rows, K]: sum over rows of a b, in f64 (task partials added in task
/// order, so the sums do not depend on the thread count).
fn column_dots<T: Float + Send + Sync>(a: &[T], b: &[T], k: usize) -> Vec<f64> {
    let parts: Vec<Vec<f64>> = a
        .par_chunks(ROWS * k)
        .zip(b.par_chunks(ROWS * k))
        .map(|(a, b)| {
            let mut s = vec![0f64; k];
            for (ra, rb) in a.chunks_exact(k).zip(b.chunks_exact(k)) {
                for ((s, &x), &y) in s.iter_mut().zip(ra).zip(rb) {
                    *s += f64_of(x) * f64_of(y);
                }
            }
            s
        })
        .collect();
    let mut out = vec![0f64; k];
    for p in parts {
        out.iter_mut().zip(p).for_each(|(o, v)| *o += v);
    }
    out
}

/// y = a x + b z per column (a, b [K]; x, z [rows, K]; z optional).
fn combine<T: WithDType + Float>(x: &[T], z: Option<&[T]>, a: &[T], b: &[T]) -> Vec<T> {
    let k = a.len();
    // Safety: every row chunk is written in full.
    let mut y = unsafe { output_buf::<T>(x.len(), 0) };
    y.par_chunks_mut(ROWS * k).enumerate().for_each(|(i, y)| {
        let x = &x[i * ROWS * k..][..y.len()];
        for (r, (yr, xr)) in y.chunks_exact_mut(k).zip(x.chunks_exact(k)).enumerate() {
            match z {
                Some(z) => {
                    let zr = &z[(i * ROWS + r) * k..][..k];
                    for ((((y, &x), &z), &a), &b) in yr.iter_mut().zip(xr).zip(zr).zip(a).zip(b) {
                        *y = a * x - b * z;
                    }
                }
                None => {
                    for ((y, &x), &a) in yr.iter_mut().zip(xr).zip(a) {
                        *y = a * x;
                    }
                }
            }
        }
    });
    y
}

/// (v [.., K], g (K values)) -> w = v g / ||v|| per column.
struct WeightNorm;
/// (v, dw) -> [2, K]: sum v^2 and sum dw v per column.
struct WeightNormStats;
/// (dw, v, [a | b] [2 K]) -> dv = a dw - b v per column.
struct WeightNormDv;

impl CustomOp2 for WeightNorm {
    fn name(&self) -> &'static str {
        "klspeech-weight-norm"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let k = l1.dims().last().copied().unwrap_or(1).max(1);
        if l2.shape().elem_count() != k {
            bail!("klspeech weight norm: g has {} values for {k} columns", l2.shape().elem_count());
        }
        by_dtype!(s1, T => {
            let v = data::<T>(s1, l1)?;
            let g = data::<T>(s2, l2)?;
            let sq = column_dots(v, v, k);
            let scale: Vec<T> = g.iter().zip(&sq).map(|(&g, &s)| c(f64_of(g) / s.sqrt())).collect();
            Ok((T::to_cpu_storage_owned(combine(v, None, &scale, &scale)), l1.shape().clone()))
        })
    }
    fn bwd(&self, v: &Tensor, g: &Tensor, _w: &Tensor, dw: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // With n = ||v|| and s = sum dw v per column: dg = s / n, dv = (g / n) dw - (g s / n^3) v.
        let (v_, dw) = (v.detach(), dw.contiguous()?);
        let k = g.elem_count();
        let st = v_.apply_op2_no_bwd(&dw, &WeightNormStats)?; // [2, K]
        let (sq, s) = (st.get(0)?, st.get(1)?);
        let n = sq.sqrt()?;
        let g1 = g.detach().reshape(k)?;
        let a = (&g1 / &n)?;
        let b = ((&g1 * &s)? / (&n * &sq)?)?;
        let dv = dw.apply_op3_no_bwd(&v_, &Tensor::cat(&[a, b], 0)?, &WeightNormDv)?;
        let dg = (s / n)?.reshape(g.shape())?;
        Ok((grads::route(v, Some(dv))?, grads::route(g, Some(dg))?))
    }
}

impl CustomOp2 for WeightNormStats {
    fn name(&self) -> &'static str {
        "klspeech-weight-norm-stats"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let k = l1.dims().last().copied().unwrap_or(1).max(1);
        by_dtype!(s1, T => {
            let v = data::<T>(s1, l1)?;
            let dw = data::<T>(s2, l2)?;
            let (sq, s) = rayon::join(|| column_dots(v, v, k), || column_dots(dw, v, k));
            let out: Vec<T> = sq.iter().chain(&s).map(|&x| c(x)).collect();
            Ok((T::to_cpu_storage_owned(out), Shape::from((2, k))))
        })
    }
}

impl CustomOp3 for WeightNormDv {
    fn name(&self) -> &'static str {
        "klspeech-weight-norm-dv"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        by_dtype!(s1, T => {
            let dw = data::<T>(s1, l1)?;
            let v = data::<T>(s2, l2)?;
            let ab = data::<T>(s3, l3)?;
            let (a, b) = ab.split_at(ab.len() / 2);
            Ok((T::to_cpu_storage_owned(combine(dw, Some(v), a, b)), l1.shape().clone()))
        })
    }
}

/// w = g v / ||v|| with the norm over every axis of v but the last (v [.., K], g with K
/// values, e.g. [1, 1, K]): `weight_norm(.., dim=2)` of a convolution weight [O, C, K].
/// Differentiable in v and g. Fused on the CPU, else [`weight_norm_last_composite`].
pub fn weight_norm_last(v: &Tensor, g: &Tensor) -> Result<Tensor> {
    let k = v.dims().last().copied().unwrap_or(0);
    if g.elem_count() != k || k == 0 {
        return Err(Error::InvalidInput(format!("weight norm: v {:?} and g {:?} (g needs one value per last-axis column)", v.dims(), g.dims())));
    }
    if !fused(v) || g.dtype() != v.dtype() {
        return weight_norm_last_composite(v, g);
    }
    Ok(v.contiguous()?.apply_op2(&g.contiguous()?, WeightNorm)?)
}

/// [`weight_norm_last`] from candle ops (the reference, and the path off the CPU); bf16 / f16
/// on the CPU in f32 (the norm sums C_out C_g values per tap: 36 864 in wav2vec2-base).
pub fn weight_norm_last_composite(v: &Tensor, g: &Tensor) -> Result<Tensor> {
    if super::half_on_cpu(v) {
        return super::in_f32(&[v, g], |t| weight_norm_last_composite(&t[0], &t[1]));
    }
    let k = v.dims().last().copied().unwrap_or(0);
    let rows = v.elem_count() / k.max(1);
    let v2 = v.reshape((rows, k))?;
    let norm = v2.sqr()?.sum_keepdim(0)?.sqrt()?; // [1, K]
    Ok(v2.broadcast_mul(&g.reshape((1, k))?.broadcast_div(&norm)?)?.reshape(v.shape())?)
}
