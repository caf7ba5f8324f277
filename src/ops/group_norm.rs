//! Per-channel GroupNorm (one group per channel, wav2vec2-base's first conv layer) on
//! channels-last activations x [B, T, C]: statistics over time for each (clip, channel), then
//! the per-channel affine, no transposes.
//!
//! Work is split into (clip, block of `ROWS` frames) tasks that read whole contiguous frames
//! (a block of the base model's 512 channels is 64 KiB, so a task's passes over it stay in
//! cache; the earlier (clip, 64-channel strip) tasks walked 256-byte pieces of every frame,
//! three times, and took 45 ms of a 5 s clip's 160 ms feature encoder). The statistics are
//! per-block sums in f64, added in block order (so they do not depend on the thread count),
//! of d = x - x[clip, frame 0]: shifting by a sample of the data keeps the one-pass variance
//! E[d^2] - E[d]^2 from cancelling when the mean is large against the spread. Forward: one
//! pass for the statistics, one for the output (GELU fused for inference); backward: one for
//! the gradient sums, one for dx.

use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, WithDType};
use num_traits::{Float, Zero};
use candle_core::backend::BackendStorage;
use rayon::prelude::*;

use super::{c, data, fused, output_buf, Phi, Ptr};
use crate::error::Result;

/// Frames per task.
const ROWS: usize = 32;

fn btc(l: &Layout) -> candle_core::Result<(usize, usize, usize)> {
    match l.dims() {
        &[b, t, c] => Ok((b, t, c)),
        d => bail!("klspeech group norm: expected [B, T, C], got {d:?}"),
    }
}

fn f64_of<T: Float>(v: T) -> f64 {
    v.to_f64().unwrap_or(0.0)
}

/// `fn $name<T>(args)`: runs `$body(args)` compiled for AVX-512 or AVX2 when the CPU has it
/// (the same operations, so the same bits: Rust does not contract multiply-adds), else as
/// built.
macro_rules! simd_dispatch {
    ($name:ident => $body:ident($($arg:ident: $ty:ty),*)) => {
        fn $name<T: Float>($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            if super::has_avx512() {
                #[target_feature(enable = "avx512f,avx2")]
                unsafe fn inner512<T: Float>($($arg: $ty),*) {
                    $body($($arg),*)
                }
                // SAFETY: the CPU has AVX-512F and AVX2 (checked above).
                return unsafe { inner512($($arg),*) };
            }
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                #[target_feature(enable = "avx2")]
                unsafe fn inner<T: Float>($($arg: $ty),*) {
                    $body($($arg),*)
                }
                // SAFETY: the CPU has AVX2 (checked above).
                return unsafe { inner($($arg),*) };
            }
            $body($($arg),*)
        }
    };
}

/// For rows x [n, C]: s[c] += sum of d, s[C + c] += sum of d^2, d = x - k[c], in f64.
#[inline(always)]
fn sum_rows_body<T: Float>(x: &[T], k: &[f64], s: &mut [f64]) {
    let ch = k.len();
    let (s1, s2) = s.split_at_mut(ch);
    for row in x.chunks_exact(ch) {
        for (((a, b), &v), &kk) in s1.iter_mut().zip(s2.iter_mut()).zip(row).zip(k) {
            let d = f64_of(v) - kk;
            *a += d;
            *b += d * d;
        }
    }
}
simd_dispatch!(sum_rows => sum_rows_body(x: &[T], k: &[f64], s: &mut [f64]));

/// For rows x, dy [n, C]: s[c] += sum of dy, s[C + c] += sum of dy (x - m[c]), in f64.
#[inline(always)]
fn grad_sum_rows_body<T: Float>(x: &[T], dy: &[T], m: &[T], s: &mut [f64]) {
    let ch = m.len();
    let (s1, s2) = s.split_at_mut(ch);
    for (row, grow) in x.chunks_exact(ch).zip(dy.chunks_exact(ch)) {
        for ((((a, b), &v), &g), &mm) in s1.iter_mut().zip(s2.iter_mut()).zip(row).zip(grow).zip(m) {
            let g = f64_of(g);
            *a += g;
            *b += g * f64_of(v - mm);
        }
    }
}
simd_dispatch!(grad_sum_rows => grad_sum_rows_body(x: &[T], dy: &[T], m: &[T], s: &mut [f64]));

/// y = (x - m) s + h per row (not x s + (h - m s), which cancels when the mean is large
/// against the spread).
#[inline(always)]
fn affine_rows_body<T: Float>(x: &[T], y: &mut [T], m: &[T], s: &[T], h: &[T]) {
    let ch = m.len();
    for (row, out) in x.chunks_exact(ch).zip(y.chunks_exact_mut(ch)) {
        for ((((o, &v), &mm), &ss), &hh) in out.iter_mut().zip(row).zip(m).zip(s).zip(h) {
            *o = (v - mm) * ss + hh;
        }
    }
}
simd_dispatch!(affine_rows => affine_rows_body(x: &[T], y: &mut [T], m: &[T], s: &[T], h: &[T]));

/// dx = rw (dy - a - (x - m) b) per row, with rw = r w, a = sg / T and b = r^2 sgx / T.
#[inline(always)]
fn dx_rows_body<T: Float>(x: &[T], dy: &[T], dx: &mut [T], p: [&[T]; 4]) {
    let [m, rw, a, b] = p;
    let ch = m.len();
    for ((row, grow), out) in x.chunks_exact(ch).zip(dy.chunks_exact(ch)).zip(dx.chunks_exact_mut(ch)) {
        for (i, o) in out.iter_mut().enumerate() {
            *o = rw[i] * (grow[i] - a[i] - (row[i] - m[i]) * b[i]);
        }
    }
}
simd_dispatch!(dx_rows => dx_rows_body(x: &[T], dy: &[T], dx: &mut [T], p: [&[T]; 4]));

/// Per (clip, block) tasks: (clip, first frame, frames).
fn blocks(bsz: usize, t: usize) -> impl IndexedParallelIterator<Item = (usize, usize, usize)> {
    let per = t.div_ceil(ROWS);
    (0..bsz * per).into_par_iter().map(move |task| {
        let (bi, t0) = (task / per, (task % per) * ROWS);
        (bi, t0, ROWS.min(t - t0))
    })
}

/// Adds the per-block partial sums [2 C] of each clip in block order: [B][2 C].
fn merge(partial: Vec<Vec<f64>>, bsz: usize, t: usize, ch: usize) -> Vec<Vec<f64>> {
    let per = t.div_ceil(ROWS).max(1);
    let mut it = partial.into_iter();
    (0..bsz)
        .map(|_| {
            let mut acc = vec![0f64; 2 * ch];
            for p in it.by_ref().take(per) {
                acc.iter_mut().zip(&p).for_each(|(a, v)| *a += v);
            }
            acc
        })
        .collect()
}

/// Mean and 1 / sqrt(var + eps) per (clip, channel): two [B C] vectors, from the per-block
/// sums of d = x - shift[clip] that `block_sums(clip, first frame, frames, s)` adds into s.
/// (`scratch` is a per-thread buffer the callback may use.)
/// With `valid`, clip b's statistics are over its first `valid[b]` frames only (padding-aware
/// normalization of a padded batch): blocks past them add nothing, a block across the boundary
/// only its valid frames.
fn stats_with<T: Float + Send>(
    bsz: usize,
    t: usize,
    eps: f64,
    shifts: &[Vec<f64>],
    valid: Option<&[usize]>,
    block_sums: impl Fn(usize, usize, usize, &mut [f64], &mut Vec<T>) + Sync,
) -> (Vec<T>, Vec<T>) {
    let ch = shifts.first().map_or(0, |s| s.len());
    let frames = |bi: usize| valid.map_or(t, |v| v[bi]);
    let partial: Vec<Vec<f64>> = blocks(bsz, t)
        .map_init(Vec::new, |scratch, (bi, t0, n)| {
            let mut s = vec![0f64; 2 * ch];
            let n = n.min(frames(bi).saturating_sub(t0));
            if n > 0 {
                block_sums(bi, t0, n, &mut s, scratch);
            }
            s
        })
        .collect();
    let (mut mean, mut rstd) = (Vec::with_capacity(bsz * ch), Vec::with_capacity(bsz * ch));
    for (bi, (s, shift)) in merge(partial, bsz, t, ch).iter().zip(shifts).enumerate() {
        let tn = frames(bi) as f64;
        for (ci, &k) in shift.iter().enumerate() {
            let m = s[ci] / tn;
            let var = (s[ch + ci] / tn - m * m).max(0.0);
            mean.push(c(k + m));
            rstd.push(c(1.0 / (var + eps).sqrt()));
        }
    }
    (mean, rstd)
}

/// [`stats_with`] of x [B, T, C], shifted by each clip's first frame (over the `valid` frames
/// of each clip where given).
fn stats<T: WithDType + Float>(x: &[T], bsz: usize, t: usize, ch: usize, eps: f64, valid: Option<&[usize]>) -> (Vec<T>, Vec<T>) {
    let shifts: Vec<Vec<f64>> = (0..bsz).map(|bi| x[bi * t * ch..][..ch].iter().map(|&v| f64_of(v)).collect()).collect();
    stats_with(bsz, t, eps, &shifts, valid, |bi, t0, n, s, _: &mut Vec<T>| sum_rows(&x[(bi * t + t0) * ch..][..n * ch], &shifts[bi], s))
}

struct GroupNormCl {
    eps: f64,
    /// GELU (erf) on each output block while it is in cache (inference: no backward).
    gelu: bool,
    /// Padding-aware statistics: clip b's over its first `valid[b]` frames (every frame is
    /// normalized with them).
    valid: Option<Vec<usize>>,
}
struct GroupNormClBwd {
    eps: f64,
    valid: Option<Vec<usize>>,
}

impl CustomOp3 for GroupNormCl {
    fn name(&self) -> &'static str {
        "klspeech-group-norm-cl"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (bsz, t, ch) = btc(l1)?;
        by_dtype!(s1, T => {
            let x = data::<T>(s1, l1)?;
            let (w, b) = (data::<T>(s2, l2)?, data::<T>(s3, l3)?);
            let (mean, rstd) = stats(x, bsz, t, ch, self.eps, self.valid.as_deref());
            let scale: Vec<T> = rstd.iter().enumerate().map(|(i, &r)| r * w[i % ch]).collect();
            // Safety: the blocks cover every (clip, frame).
            let mut y = unsafe { output_buf::<T>(x.len(), 0) };
            let yp = Ptr(y.as_mut_ptr());
            blocks(bsz, t).for_each(|(bi, t0, n)| {
                let off = (bi * t + t0) * ch;
                // Safety: frames t0 .. t0 + n of clip bi are this task's.
                let dst = unsafe { std::slice::from_raw_parts_mut(yp.get().add(off), n * ch) };
                affine_rows(&x[off..off + n * ch], dst, &mean[bi * ch..][..ch], &scale[bi * ch..][..ch], b);
                if self.gelu {
                    T::gelu_in_place(dst);
                }
            });
            Ok((T::to_cpu_storage_owned(y), l1.shape().clone()))
        })
    }
    fn bwd(&self, x: &Tensor, w: &Tensor, b: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if self.gelu {
            bail!("klspeech group norm + GELU is an inference op (no backward)");
        }
        let packed = x.apply_op3_no_bwd(w, &g.contiguous()?, &GroupNormClBwd { eps: self.eps, valid: self.valid.clone() })?;
        super::split_affine_grads(&packed, x, w, b)
    }
}

impl CustomOp3 for GroupNormClBwd {
    fn name(&self) -> &'static str {
        "klspeech-group-norm-cl-bwd"
    }
    /// (x, w, dy) -> [dx (B T C), dw (C), db (C)] flat. Per (clip, channel), with r = 1 /
    /// sqrt(var + eps) and x_hat = (x - m) r: sg = sum_t dy, sgx = sum_t dy x_hat;
    /// dx = r w (dy - sg / T - x_hat sgx / T); dw = sum over clips (in order) of sgx, db = of sg.
    /// With padding-aware statistics over a clip's first n frames: the same sums over every
    /// frame, divided by n, and the two correction terms only on the n valid frames (a padded
    /// frame's input moves no statistic).
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (bsz, t, ch) = btc(l1)?;
        by_dtype!(s1, T => {
            let x = data::<T>(s1, l1)?;
            let w = data::<T>(s2, l2)?;
            let g = data::<T>(s3, l3)?;
            let n = x.len();
            let (mean, rstd) = stats(x, bsz, t, ch, self.eps, self.valid.as_deref());
            let frames = |bi: usize| self.valid.as_ref().map_or(t, |v| v[bi]);
            let partial: Vec<Vec<f64>> = blocks(bsz, t)
                .map(|(bi, t0, rows)| {
                    let mut s = vec![0f64; 2 * ch];
                    let off = (bi * t + t0) * ch;
                    grad_sum_rows(&x[off..][..rows * ch], &g[off..][..rows * ch], &mean[bi * ch..][..ch], &mut s);
                    s
                })
                .collect();
            let sums = merge(partial, bsz, t, ch);
            // Safety: the blocks cover every dx element; dw, db start at zero.
            let mut out = unsafe { output_buf::<T>(n, 2 * ch) };
            // Per clip: r w, sg / T and r^2 sgx / T ([B C] each; sgx here is sum dy (x - m)).
            let (mut rw, mut a, mut bcoef) = (Vec::with_capacity(bsz * ch), Vec::with_capacity(bsz * ch), Vec::with_capacity(bsz * ch));
            for (bi, s) in sums.iter().enumerate() {
                let tn = frames(bi) as f64;
                for ci in 0..ch {
                    let r = f64_of(rstd[bi * ch + ci]);
                    rw.push(c::<T>(r) * w[ci]);
                    a.push(c::<T>(s[ci] / tn));
                    bcoef.push(c::<T>(r * r * s[ch + ci] / tn));
                }
            }
            let op = Ptr(out.as_mut_ptr());
            let zeros = vec![T::zero(); ch];
            blocks(bsz, t).for_each(|(bi, t0, rows)| {
                let off = (bi * t + t0) * ch;
                // Safety: frames t0 .. t0 + rows of clip bi are this task's.
                let dst = unsafe { std::slice::from_raw_parts_mut(op.get().add(off), rows * ch) };
                let r = bi * ch..(bi + 1) * ch;
                // Valid frames take both corrections, padded ones none (dx = r w dy).
                let nv = rows.min(frames(bi).saturating_sub(t0));
                let (dv, dp) = dst.split_at_mut(nv * ch);
                let (xv, xp) = x[off..][..rows * ch].split_at(nv * ch);
                let (gv, gp) = g[off..][..rows * ch].split_at(nv * ch);
                dx_rows(xv, gv, dv, [&mean[r.clone()], &rw[r.clone()], &a[r.clone()], &bcoef[r.clone()]]);
                if nv < rows {
                    dx_rows(xp, gp, dp, [&mean[r.clone()], &rw[r], &zeros, &zeros]);
                }
            });
            let (_, tail) = out.split_at_mut(n);
            let (dw, db) = tail.split_at_mut(ch);
            for (bi, s) in sums.iter().enumerate() {
                for ci in 0..ch {
                    let r = f64_of(rstd[bi * ch + ci]);
                    dw[ci] += c::<T>(r * s[ch + ci]);
                    db[ci] += c::<T>(s[ci]);
                }
            }
            Ok((T::to_cpu_storage_owned(out), Shape::from(n + 2 * ch)))
        })
    }
}

/// Channels per register block of the one-channel convolution (two AVX2 registers of f32).
const LANES: usize = 16;

/// Frames t0 .. t0 + n of a one-channel convolution: y [n, C] with y[i, o] = sum over taps j
/// (in order) of x[(t0 + i) s + j] wt[j, o], for one clip's samples x and the weight
/// wt [K, C]. Each 16-channel block is summed over the taps in registers and stored once.
#[inline(always)]
fn conv1_rows_body<T: Float>(x: &[T], wt: &[T], k: usize, stride: usize, t0: usize, y: &mut [T]) {
    let ch = wt.len() / k;
    let full = ch - ch % LANES;
    for (i, row) in y.chunks_exact_mut(ch).enumerate() {
        let taps = &x[(t0 + i) * stride..][..k];
        for c0 in (0..full).step_by(LANES) {
            let mut acc = [T::zero(); LANES];
            for (j, &xv) in taps.iter().enumerate() {
                let w: &[T; LANES] = wt[j * ch + c0..][..LANES].try_into().expect("LANES");
                for (a, &wv) in acc.iter_mut().zip(w) {
                    *a = *a + xv * wv;
                }
            }
            row[c0..c0 + LANES].copy_from_slice(&acc);
        }
        for (o, v) in row.iter_mut().enumerate().skip(full) {
            *v = taps.iter().enumerate().fold(T::zero(), |a, (j, &xv)| a + xv * wt[j * ch + o]);
        }
    }
}
simd_dispatch!(conv1_rows => conv1_rows_body(x: &[T], wt: &[T], k: usize, stride: usize, t0: usize, y: &mut [T]));

/// Inference: the first layer of wav2vec2-base's feature encoder, one-channel convolution +
/// GroupNorm + GELU, as one op over frame blocks in cache. The convolution is cheap (K
/// multiply-adds per output) next to the memory traffic of its output, so it runs twice: once
/// for the statistics, once for the output, which is written once (the separate ops wrote
/// it, read it for the statistics, read it again and wrote the result).
struct ConvGroupNormGelu {
    stride: usize,
    eps: f64,
}

impl CustomOp3 for ConvGroupNormGelu {
    fn name(&self) -> &'static str {
        "klspeech-conv1-group-norm-gelu"
    }
    /// (x [B, L, 1], w [C, 1, K], [GroupNorm weight | bias] [2 C]) -> [B, T, C].
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (bsz, l, _) = btc(l1)?;
        let (ch, k) = match l2.dims() {
            &[ch, 1, k] if k <= l => (ch, k),
            d => bail!("klspeech conv + group norm: kernel {d:?} for {l} samples"),
        };
        let t = (l - k) / self.stride + 1;
        let stride = self.stride;
        by_dtype!(s1, T => {
            let x = data::<T>(s1, l1)?;
            let wt = super::transpose(data::<T>(s2, l2)?, ch, k); // [K, C]
            let gn = data::<T>(s3, l3)?;
            let (gw, gb) = gn.split_at(ch);
            let clip = |bi: usize| &x[bi * l..][..l];
            let shifts: Vec<Vec<f64>> = (0..bsz)
                .map(|bi| {
                    let mut row = vec![T::zero(); ch];
                    conv1_rows(clip(bi), &wt, k, stride, 0, &mut row);
                    row.iter().map(|&v| f64_of(v)).collect()
                })
                .collect();
            let (mean, rstd) = stats_with::<T>(bsz, t, self.eps, &shifts, None, |bi, t0, n, s, buf| {
                buf.resize(ROWS * ch, T::zero());
                let buf = &mut buf[..n * ch];
                conv1_rows(clip(bi), &wt, k, stride, t0, buf);
                sum_rows(buf, &shifts[bi], s);
            });
            let scale: Vec<T> = rstd.iter().enumerate().map(|(i, &r)| r * gw[i % ch]).collect();
            // Safety: the blocks cover every (clip, frame).
            let mut y = unsafe { output_buf::<T>(bsz * t * ch, 0) };
            let yp = Ptr(y.as_mut_ptr());
            blocks(bsz, t).for_each_init(
                || vec![T::zero(); ROWS * ch],
                |buf, (bi, t0, n)| {
                    let buf = &mut buf[..n * ch];
                    conv1_rows(clip(bi), &wt, k, stride, t0, buf);
                    // Safety: frames t0 .. t0 + n of clip bi are this task's.
                    let dst = unsafe { std::slice::from_raw_parts_mut(yp.get().add((bi * t + t0) * ch), n * ch) };
                    affine_rows(buf, dst, &mean[bi * ch..][..ch], &scale[bi * ch..][..ch], gb);
                    T::gelu_in_place(dst);
                },
            );
            Ok((T::to_cpu_storage_owned(y), Shape::from((bsz, t, ch))))
        })
    }
}

/// Inference: `gelu_erf(group_norm_cl(conv1d_cl(x, w, stride), gn_w, gn_b))` for a
/// one-channel input x [B, L, 1] and w [C, 1, K] (wav2vec2-base's first feature-encoder
/// layer) as one pass over frame blocks (see [`ConvGroupNormGelu`]); no gradient flows
/// through it. Fused on the CPU; on a GPU one kernel (`kl_conv1_group_norm_gelu`, f32, bf16 or
/// f16, at most `kernels::CONV1_MAX_K` taps), which writes only the result where the three
/// ops write the convolution's output, read it twice and write the result (the output of a
/// 16 x 10 s batch is 1 GiB in f32; `KLSPEECH_NO_KERNEL=conv1_group_norm` for the three ops);
/// else the three ops.
pub fn conv1_group_norm_gelu(x: &Tensor, w: &Tensor, stride: usize, gn_w: &Tensor, gn_b: &Tensor, eps: f64) -> Result<Tensor> {
    let (x, w) = (x.detach(), w.detach());
    let (_, l, c_in) = x.dims3()?;
    let (_, c_g, k) = w.dims3()?;
    let one_channel = x.dtype() == w.dtype() && c_in == 1 && c_g == 1 && stride > 0 && k <= l;
    if fused(&x) && one_channel {
        let gn = Tensor::cat(&[gn_w.detach(), gn_b.detach()], 0)?.to_dtype(x.dtype())?;
        return Ok(x.contiguous()?.apply_op3_no_bwd(&w.contiguous()?, &gn, &ConvGroupNormGelu { stride, eps })?);
    }
    if one_channel && k <= super::kernels::CONV1_MAX_K && super::kernels::apply_any_float(&x) && super::kernels::kernel_on("conv1_group_norm") {
        let gn = Tensor::cat(&[gn_w.detach(), gn_b.detach()], 0)?.to_dtype(x.dtype())?;
        return Ok(super::kernels::conv1_group_norm_gelu_of(&x, &w, &gn, stride, eps)?);
    }
    group_norm_cl_gelu(&super::conv1d_cl(&x, &w, stride, 0, 1, None)?, gn_w, gn_b, eps)
}

/// Per-channel GroupNorm on channels-last x [B, T, C]: `(x - mean) / sqrt(var + eps) * w + b`
/// with mean and (biased) variance over T per clip and channel; differentiable in x, w and b.
/// Fused on the CPU, klspeech's CUDA kernels for f32 on a GPU (one launch forward, two
/// backward), else [`group_norm_cl_composite`].
pub fn group_norm_cl(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    x.dims3()?;
    if super::kernels::apply(x) && super::kernels::apply(w) && super::kernels::apply(b) && super::kernels::kernel_on("group_norm") {
        return Ok(super::kernels::group_norm_cl(x, w, b, eps, false)?);
    }
    if super::kernels::apply_half(x) && w.dtype() == x.dtype() && b.dtype() == x.dtype() && super::kernels::kernel_on("group_norm") {
        // Half-precision training on a GPU: the kernels' half-type instances (f32 arithmetic,
        // f64 statistics, each output rounded once, the weight and bias gradients summed in
        // f32), where the composite ran some 20 passes over the first layer's output (about
        // 13 ms of a bf16 8 x 4 s step on the H200).
        return Ok(super::kernels::group_norm_cl(x, w, b, eps, false)?);
    }
    if !fused(x) {
        return group_norm_cl_composite(x, w, b, eps);
    }
    Ok(x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, GroupNormCl { eps, gelu: false, valid: None })?)
}

/// [`group_norm_cl`] with padding-aware statistics: clip b's mean and variance over its first
/// `valid[b]` frames (1 ..= T), every frame normalized with them (`model::Norm`'s masked
/// GroupNorm, the trainer's padded batches); differentiable in x, w and b. Fused on the CPU
/// (where the masked composite in [B, C, T] and the copy of its transposed result back to
/// channels-last took about a fifth of a keyword-spotting fine-tuning run), else `None`: the
/// caller's composite.
pub fn group_norm_cl_valid(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64, valid: &[usize]) -> Result<Option<Tensor>> {
    let (bsz, t, _) = x.dims3()?;
    if !fused(x) || valid.len() != bsz || valid.iter().any(|&n| n == 0 || n > t) {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, GroupNormCl { eps, gelu: false, valid: Some(valid.to_vec()) })?))
}

/// Padding-aware [`group_norm_cl`] over a padded batch: `mask` [B, T] is 1 for each clip's
/// valid frames and 0 for its padding (`model::Norm`'s length mask); each clip's statistics
/// cover the frames whose mask is not 0 (for a 0 / 1 mask the masked composite's), every frame
/// normalized with them; then the erf GELU when `gelu` (no gradient through that). On a GPU
/// klspeech's kernels read the mask (f32, or bf16 / f16; one launch forward, two backward),
/// where the masked composite in [B, C, T] ran some fifteen candle ops and a transposed copy;
/// on the CPU the fused op when every clip's mask is leading ones ([`group_norm_cl_valid`]).
/// Else `None`: the caller's composite.
pub fn group_norm_cl_masked(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64, mask: &Tensor, gelu: bool) -> Result<Option<Tensor>> {
    let (bsz, t, _) = x.dims3()?;
    if mask.dims() != [bsz, t] {
        return Ok(None);
    }
    let kernels = super::kernels::kernel_on("group_norm") && super::kernels::kernel_on("group_norm_masked");
    let typed = w.dtype() == x.dtype() && b.dtype() == x.dtype() && mask.device().same_device(x.device());
    let runs = if gelu { super::kernels::apply_any_float(x) } else { super::kernels::apply(x) || super::kernels::apply_half(x) };
    if kernels && typed && runs {
        return Ok(Some(super::kernels::group_norm_cl_masked(x, w, b, Some(mask), eps, gelu)?));
    }
    let Some(valid) = prefix_lengths(mask)? else { return Ok(None) };
    match group_norm_cl_valid(x, w, b, eps, &valid)? {
        Some(y) if gelu => Ok(Some(super::gelu_erf(&y.detach())?)),
        y => Ok(y),
    }
}

/// Each clip's count of valid frames when the mask [B, T] (on the CPU) is leading ones then
/// zeros with at least one frame valid, else `None`.
fn prefix_lengths(mask: &Tensor) -> Result<Option<Vec<usize>>> {
    if !mask.device().is_cpu() || mask.rank() != 2 {
        return Ok(None);
    }
    let rows: Vec<Vec<f64>> = mask.to_dtype(DType::F64)?.to_vec2()?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let n = r.iter().take_while(|&&v| v == 1.0).count();
        if n == 0 || r[n..].iter().any(|&v| v != 0.0) {
            return Ok(None);
        }
        out.push(n);
    }
    Ok(Some(out))
}

/// Inference: [`group_norm_cl`] followed by the erf GELU, applied to each output strip while
/// it is in cache (one pass over the activation instead of two; the same values as the two
/// ops). No gradient flows through it. Fused on the CPU, one CUDA kernel on a GPU (f32, bf16
/// or f16), else the two ops.
pub fn group_norm_cl_gelu(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    x.dims3()?;
    if super::kernels::apply_any_float(x) && w.dtype() == x.dtype() && b.dtype() == x.dtype() && super::kernels::kernel_on("group_norm") {
        // f32, bf16 or f16 (inference in those types): f64 statistics whatever the type,
        // where candle's f16 reduction sums in f16.
        return Ok(super::kernels::group_norm_cl(x, w, b, eps, true)?);
    }
    if !fused(x) {
        return super::gelu_erf(&group_norm_cl_composite(x, w, b, eps)?);
    }
    Ok(x.contiguous()?.apply_op3_no_bwd(&w.contiguous()?, &b.contiguous()?, &GroupNormCl { eps, gelu: true, valid: None })?)
}

/// [`group_norm_cl`] from candle ops (the reference, and the path off the CPU); bf16 / f16 in
/// f32 on every device, as PyTorch's GroupNorm: on the CPU a mean over thousands of frames
/// summed in bf16 was off by tens of percent, and on a GPU (whose reductions add in f32) the
/// mean rounded back to bf16 before the centring left 2.5 % errors at [2, 3000, 40] with a
/// mean of 20 (the H200 run with klspeech's kernels switched off).
pub fn group_norm_cl_composite(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if matches!(x.dtype(), DType::BF16 | DType::F16) {
        return super::in_f32(&[x, w, b], |t| group_norm_cl_composite(&t[0], &t[1], &t[2], eps));
    }
    let mean = x.mean_keepdim(1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(1)?;
    let x_hat = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(x_hat.broadcast_mul(w)?.broadcast_add(b)?)
}
