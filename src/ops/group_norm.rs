//! Per-channel GroupNorm (one group per channel, wav2vec2-base's first conv layer) on
//! channels-last activations x [B, T, C]: statistics over time for each (clip, channel), then
//! the per-channel affine, forward in two passes and backward in two, no transposes.
//!
//! Work is split into (clip, block of `CBLOCK` channels) tasks: each walks its clip's frames
//! reading one contiguous strip of the block per frame, and owns that strip of the output.

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Shape, Tensor, WithDType};
use num_traits::{Float, Zero};
use candle_core::backend::BackendStorage;
use rayon::prelude::*;

use super::{c, data, fused, output_buf, Phi, Ptr};
use crate::error::Result;

/// Channels per task (a 256-byte strip of each f32 frame).
const CBLOCK: usize = 64;

fn btc(l: &Layout) -> candle_core::Result<(usize, usize, usize)> {
    match l.dims() {
        &[b, t, c] => Ok((b, t, c)),
        d => bail!("klspeech group norm: expected [B, T, C], got {d:?}"),
    }
}

/// Mean and 1/sqrt(var + eps) over time of channels c0 .. c0 + w of one clip x [T, C]
/// (accumulated in f64, two passes like the row statistics of LayerNorm).
fn strip_stats<T: WithDType + Float>(x: &[T], t: usize, ch: usize, c0: usize, w: usize, eps: f64) -> Vec<(T, T)> {
    let mut sum = vec![0f64; w];
    for ti in 0..t {
        for (s, v) in sum.iter_mut().zip(&x[ti * ch + c0..][..w]) {
            *s += v.to_f64().unwrap_or(0.0);
        }
    }
    let mean: Vec<f64> = sum.iter().map(|s| s / t as f64).collect();
    let mut ss = vec![0f64; w];
    for ti in 0..t {
        for ((s, v), m) in ss.iter_mut().zip(&x[ti * ch + c0..][..w]).zip(&mean) {
            let d = v.to_f64().unwrap_or(0.0) - m;
            *s += d * d;
        }
    }
    mean.iter().zip(&ss).map(|(&m, &s)| (c(m), c(1.0 / (s / t as f64 + eps).sqrt()))).collect()
}

struct GroupNormCl {
    eps: f64,
    /// GELU (erf) on each output strip while it is in cache (inference: no backward).
    gelu: bool,
}
struct GroupNormClBwd {
    eps: f64,
}

impl CustomOp3 for GroupNormCl {
    fn name(&self) -> &'static str {
        "klspeech-group-norm-cl"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (bsz, t, ch) = btc(l1)?;
        let blocks = ch.div_ceil(CBLOCK);
        by_dtype!(s1, T => {
            let x = data::<T>(s1, l1)?;
            let (w, b) = (data::<T>(s2, l2)?, data::<T>(s3, l3)?);
            // Safety: the tasks' strips cover every (clip, frame, channel).
            let mut y = unsafe { output_buf::<T>(x.len(), 0) };
            let yp = Ptr(y.as_mut_ptr());
            (0..bsz * blocks).into_par_iter().for_each(|task| {
                let (bi, c0) = (task / blocks, (task % blocks) * CBLOCK);
                let wd = CBLOCK.min(ch - c0);
                let xb = &x[bi * t * ch..][..t * ch];
                // y = (x - m) scale + b with scale = r w (not x scale + (b - m scale), which
                // cancels when the mean is large against the spread).
                let stats = strip_stats(xb, t, ch, c0, wd, self.eps);
                let mean: Vec<T> = stats.iter().map(|s| s.0).collect();
                let scale: Vec<T> = stats.iter().enumerate().map(|(i, s)| s.1 * w[c0 + i]).collect();
                let shift = &b[c0..c0 + wd];
                for ti in 0..t {
                    let off = (bi * t + ti) * ch + c0;
                    // Safety: the strip (clip bi, frame ti, channels c0 .. c0 + wd) is this task's.
                    let dst = unsafe { std::slice::from_raw_parts_mut(yp.get().add(off), wd) };
                    for ((((d, &v), &m), &s), &h) in dst.iter_mut().zip(&x[off..off + wd]).zip(&mean).zip(&scale).zip(shift) {
                        *d = (v - m) * s + h;
                    }
                    if self.gelu {
                        T::gelu_in_place(dst);
                    }
                }
            });
            Ok((T::to_cpu_storage_owned(y), l1.shape().clone()))
        })
    }
    fn bwd(&self, x: &Tensor, w: &Tensor, _b: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if self.gelu {
            bail!("klspeech group norm + GELU is an inference op (no backward)");
        }
        let packed = x.apply_op3_no_bwd(w, &g.contiguous()?, &GroupNormClBwd { eps: self.eps })?;
        super::split_affine_grads(&packed, x, w.elem_count())
    }
}

impl CustomOp3 for GroupNormClBwd {
    fn name(&self) -> &'static str {
        "klspeech-group-norm-cl-bwd"
    }
    /// (x, w, dy) -> [dx (B T C), dw (C), db (C)] flat. Per (clip, channel), with x_hat the
    /// normalized input: sg = sum_t dy, sgx = sum_t dy x_hat; dx = r w (dy - sg / T - x_hat sgx / T);
    /// dw = sum over clips (in order) of sgx, db = of sg.
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (bsz, t, ch) = btc(l1)?;
        let blocks = ch.div_ceil(CBLOCK);
        by_dtype!(s1, T => {
            let x = data::<T>(s1, l1)?;
            let w = data::<T>(s2, l2)?;
            let g = data::<T>(s3, l3)?;
            let n = x.len();
            // Safety: the tasks' strips cover every dx element; dw, db start at zero.
            let mut out = unsafe { output_buf::<T>(n, 2 * ch) };
            let op = Ptr(out.as_mut_ptr());
            let tn: T = c(t as f64);
            // Per task: (sgx, sg) of its strip.
            let sums: Vec<Vec<(T, T)>> = (0..bsz * blocks)
                .into_par_iter()
                .map(|task| {
                    let (bi, c0) = (task / blocks, (task % blocks) * CBLOCK);
                    let wd = CBLOCK.min(ch - c0);
                    let xb = &x[bi * t * ch..][..t * ch];
                    let stats = strip_stats(xb, t, ch, c0, wd, self.eps);
                    let mut acc = vec![(T::zero(), T::zero()); wd];
                    for ti in 0..t {
                        let off = (bi * t + ti) * ch + c0;
                        for (((a, &v), &gv), &(m, r)) in acc.iter_mut().zip(&x[off..off + wd]).zip(&g[off..off + wd]).zip(&stats) {
                            a.0 = a.0 + gv * (v - m) * r;
                            a.1 = a.1 + gv;
                        }
                    }
                    for ti in 0..t {
                        let off = (bi * t + ti) * ch + c0;
                        // Safety: the strip (clip bi, frame ti, channels c0 .. c0 + wd) is this task's.
                        let dst = unsafe { std::slice::from_raw_parts_mut(op.get().add(off), wd) };
                        for (i, d) in dst.iter_mut().enumerate() {
                            let (m, r) = stats[i];
                            let xh = (x[off + i] - m) * r;
                            let (sgx, sg) = acc[i];
                            *d = r * w[c0 + i] * (g[off + i] - sg / tn - xh * sgx / tn);
                        }
                    }
                    acc
                })
                .collect();
            let (_, tail) = out.split_at_mut(n);
            let (dw, db) = tail.split_at_mut(ch);
            for (task, acc) in sums.iter().enumerate() {
                let c0 = (task % blocks) * CBLOCK;
                for (i, &(sgx, sg)) in acc.iter().enumerate() {
                    dw[c0 + i] = dw[c0 + i] + sgx;
                    db[c0 + i] = db[c0 + i] + sg;
                }
            }
            Ok((T::to_cpu_storage_owned(out), Shape::from(n + 2 * ch)))
        })
    }
}

/// Per-channel GroupNorm on channels-last x [B, T, C]: `(x - mean) / sqrt(var + eps) * w + b`
/// with mean and (biased) variance over T per clip and channel; differentiable in x, w and b.
/// Fused on the CPU, else [`group_norm_cl_composite`].
pub fn group_norm_cl(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    x.dims3()?;
    if !fused(x) {
        return group_norm_cl_composite(x, w, b, eps);
    }
    Ok(x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, GroupNormCl { eps, gelu: false })?)
}

/// Inference: [`group_norm_cl`] followed by the erf GELU, applied to each output strip while
/// it is in cache (one pass over the activation instead of two; the same values as the two
/// ops). No gradient flows through it. Fused on the CPU, else the two ops.
pub fn group_norm_cl_gelu(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    x.dims3()?;
    if !fused(x) {
        return super::gelu_erf(&group_norm_cl_composite(x, w, b, eps)?);
    }
    Ok(x.contiguous()?.apply_op3_no_bwd(&w.contiguous()?, &b.contiguous()?, &GroupNormCl { eps, gelu: true })?)
}

/// [`group_norm_cl`] from candle ops (the reference, and the path off the CPU).
pub fn group_norm_cl_composite(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(1)?;
    let x_hat = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(x_hat.broadcast_mul(w)?.broadcast_add(b)?)
}
