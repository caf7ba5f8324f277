//! Channels-last grouped 1-D convolution on gemm, with no column matrix.
//!
//! With activations laid out [B, L, C], the receptive field of output frame t in group g is the
//! contiguous run `x[b, t s .. t s + K, g]` of K * C_g values, and the run of frame t + 1 starts
//! s * C_g values later. So the column matrix of an im2col is a *strided view* of the input
//! (rows s C_g apart, overlapping when K > s), and gemm reads it in place: the forward pass is
//! one gemm per (group, clip) straight from the input, and so is the weight gradient. Only a
//! padded or grouped input is first copied once into a group-major [G, B, L + 2p, C_g] buffer
//! (the positional conv: that copy is the size of the input, where im2col's columns were K
//! times it). The input gradient writes each kernel tap block `q` (taps q s .. q s + s) with
//! one gemm into the rows it touches (disjoint within the block, so gemm accumulates in place);
//! kernels much longer than their stride (the positional conv) go through a per-task column
//! buffer and a scatter-add instead.
//!
//! Weights stay in PyTorch's [C_out, C_g, K] layout outside; inside, each call reorders them to
//! [G, K C_g, C_out / G] (tap-major rows, matching the input runs).

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Shape, Tensor, WithDType};
use gemm::Parallelism;
use num_traits::Float;
use candle_core::backend::BackendStorage;
use rayon::prelude::*;

use super::{data, fused, mm, output_buf, Ptr};
use crate::error::{Error, Result};

/// Geometry of one convolution: x [B, L, C_in] -> y [B, T, C_out] (also `super::conv_gemm`'s).
#[derive(Debug, Clone, Copy)]
pub(super) struct Geom {
    pub(super) b: usize,
    pub(super) l: usize,
    pub(super) c_in: usize,
    pub(super) c_out: usize,
    pub(super) k: usize,
    pub(super) stride: usize,
    pub(super) padding: usize,
    pub(super) groups: usize,
    /// Output frames (possibly fewer than the convolution yields, see `max_t`).
    pub(super) t: usize,
}

impl Geom {
    pub(super) fn cg(&self) -> usize {
        self.c_in / self.groups
    }
    pub(super) fn og(&self) -> usize {
        self.c_out / self.groups
    }
    pub(super) fn lp(&self) -> usize {
        self.l + 2 * self.padding
    }
    /// K * C_g: one output frame's receptive field.
    fn kc(&self) -> usize {
        self.k * self.cg()
    }
    /// The input is read in place (no padding, one group); else through the packed copy.
    fn direct(&self) -> bool {
        self.padding == 0 && self.groups == 1
    }
    /// Offset of (group, clip) in the input as gemm reads it (x itself or the packed copy).
    fn base(&self, gi: usize, bi: usize) -> usize {
        (gi * self.b + bi) * self.lp() * self.cg()
    }
}

/// Whether [`run_tasks`] runs this many tasks in parallel (else one by one, gemm parallel).
fn tasks_in_parallel(tasks: usize) -> bool {
    let n = rayon::current_num_threads();
    n > 1 && tasks >= 2 * n
}

/// Runs `f(task, parallelism)` for every task: in parallel over tasks when there are enough of
/// them to keep every thread busy, else one after the other with gemm itself parallel. Each
/// task's result does not depend on the choice (gemm splits its output, never its sum).
pub(super) fn run_tasks(tasks: usize, f: impl Fn(usize, Parallelism) + Sync) {
    let n = rayon::current_num_threads();
    if tasks_in_parallel(tasks) {
        (0..tasks).into_par_iter().for_each(|i| f(i, Parallelism::None));
    } else {
        let par = if n > 1 { Parallelism::Rayon(n) } else { Parallelism::None };
        (0..tasks).for_each(|i| f(i, par));
    }
}

/// x [B, L, C_in] -> group-major, zero-padded [G, B, L + 2p, C_g].
fn pack<T: WithDType + Float>(x: &[T], g: &Geom) -> Vec<T> {
    let (cg, lp) = (g.cg(), g.lp());
    let mut xp = vec![T::zero(); g.groups * g.b * lp * cg];
    xp.par_chunks_mut(lp * cg).enumerate().for_each(|(gb, dst)| {
        let (gi, bi) = (gb / g.b, gb % g.b);
        for l in 0..g.l {
            let src = &x[(bi * g.l + l) * g.c_in + gi * cg..][..cg];
            dst[(l + g.padding) * cg..][..cg].copy_from_slice(src);
        }
    });
    xp
}

/// The inverse of [`pack`] for gradients: [G, B, L + 2p, C_g] -> [B, L, C_in] (padding dropped).
fn unpack<T: WithDType + Float>(xp: &[T], g: &Geom) -> Vec<T> {
    let (cg, lp) = (g.cg(), g.lp());
    // Safety: every (clip, frame, group) strip is copied.
    let mut x = unsafe { output_buf::<T>(g.b * g.l * g.c_in, 0) };
    x.par_chunks_mut(g.l * g.c_in).enumerate().for_each(|(bi, dst)| {
        for gi in 0..g.groups {
            let src = &xp[(gi * g.b + bi) * lp * cg..][..lp * cg];
            for l in 0..g.l {
                dst[l * g.c_in + gi * cg..][..cg].copy_from_slice(&src[(l + g.padding) * cg..][..cg]);
            }
        }
    });
    x
}

/// w [C_out, C_g, K] -> wr [G, K C_g, C_out / G] with wr[g, k C_g + c, o] = w[g og + o, c, k]:
/// per group a tiled transpose of [og, C_g K] (rows c K + k), then its rows copied into tap-major
/// order (element by element, the scatter wrote each value to a different cache line: 2.6 %
/// of a base inference step).
fn reorder_weight<T: WithDType + Float>(w: &[T], g: &Geom) -> Vec<T> {
    let (cg, og, k) = (g.cg(), g.og(), g.k);
    let blk = og * cg * k;
    // Safety: every row of every group is copied below.
    let mut wr = unsafe { output_buf::<T>(g.c_out * cg * k, 0) };
    for (gi, dst) in wr.chunks_mut(blk).enumerate() {
        let at = super::transpose(&w[gi * blk..][..blk], og, cg * k);
        dst.par_chunks_mut(og).enumerate().for_each(|(row, d)| {
            let (kk, c) = (row / cg, row % cg);
            d.copy_from_slice(&at[(c * k + kk) * og..][..og]);
        });
    }
    wr
}

/// The inverse of [`reorder_weight`] (for the weight gradient): rows back to (c, k) order, then
/// the transpose.
fn restore_weight<T: WithDType + Float>(wr: &[T], g: &Geom) -> Vec<T> {
    let (cg, og, k) = (g.cg(), g.og(), g.k);
    let blk = og * cg * k;
    // Safety: every group's block is written in full.
    let mut w = unsafe { output_buf::<T>(g.c_out * cg * k, 0) };
    let mut rows = unsafe { output_buf::<T>(blk, 0) };
    for (gi, dst) in w.chunks_mut(blk).enumerate() {
        let src = &wr[gi * blk..][..blk];
        // Safety (rows): every row is copied before the transpose reads it.
        rows.par_chunks_mut(og).enumerate().for_each(|(row, d)| {
            let (c, kk) = (row / k, row % k);
            d.copy_from_slice(&src[(kk * cg + c) * og..][..og]);
        });
        dst.copy_from_slice(&super::transpose(&rows, cg * k, og));
    }
    w
}

/// The input as gemm reads it: x itself, or its padded group-major copy ([`Geom::direct`]).
fn gemm_input<'a, T: WithDType + Float>(x: &'a [T], g: &Geom) -> std::borrow::Cow<'a, [T]> {
    if g.direct() {
        std::borrow::Cow::Borrowed(x)
    } else {
        std::borrow::Cow::Owned(pack(x, g))
    }
}

/// y [B, T, C_out]: per (group, clip) y_gb [T, og] = X_gb (strided view [T, K C_g]) wr_g,
/// then GELU in place when `gelu` (inference only): inside each task while its block is in
/// cache when the tasks run in parallel, else as one parallel pass after.
fn forward<T: WithDType + super::Phi>(x: &[T], w: &[T], g: &Geom, gelu: bool) -> Vec<T> {
    let wr = reorder_weight(w, g);
    let src = gemm_input(x, g);
    let (og, kc, cg) = (g.og(), g.kc(), g.cg());
    // Safety: each (group, clip) gemm writes its whole [T, og] block.
    let mut y = unsafe { output_buf::<T>(g.b * g.t * g.c_out, 0) };
    let yp = Ptr(y.as_mut_ptr());
    let (sp, wp) = (src.as_ptr() as usize, wr.as_ptr() as usize);
    // GELU inside a task needs its block contiguous: one group.
    let epilogue = gelu && g.groups == 1 && tasks_in_parallel(g.groups * g.b);
    run_tasks(g.groups * g.b, |task, par| {
        let (gi, bi) = (task / g.b, task % g.b);
        // Safety: row t of the view ends at base + t s C_g + K C_g <= base + L_p C_g (T frames
        // fit the padded input); the destination block (clip bi, group gi) is this task's alone.
        unsafe {
            mm(
                (g.t, og, kc),
                yp.get().add(bi * g.t * g.c_out + gi * og),
                g.c_out,
                false,
                (sp as *const T).add(g.base(gi, bi)),
                (g.stride * cg, 1),
                (wp as *const T).add(gi * kc * og),
                (og, 1),
                par,
            );
            if epilogue {
                T::gelu_in_place(std::slice::from_raw_parts_mut(yp.get().add(bi * g.t * g.c_out), g.t * g.c_out));
            }
        }
    });
    if gelu && !epilogue {
        y.par_chunks_mut(1 << 14).for_each(T::gelu_in_place);
    }
    y
}

/// dw [C_out, C_g, K]: per group, sum over clips (in clip order) of X_gb^T dy_gb.
fn weight_grad<T: WithDType + Float>(x: &[T], dy: &[T], g: &Geom) -> Vec<T> {
    let src = gemm_input(x, g);
    let (og, kc, cg) = (g.og(), g.kc(), g.cg());
    // Safety: clip 0's gemm (not accumulating) writes every group's block; b >= 1.
    let mut dwr = unsafe { output_buf::<T>(g.groups * kc * og, 0) };
    let dp = Ptr(dwr.as_mut_ptr());
    let (sp, gp) = (src.as_ptr() as usize, dy.as_ptr() as usize);
    run_tasks(g.groups, |gi, par| {
        for bi in 0..g.b {
            // Safety: as in `forward`; the destination (group gi) is this task's alone.
            unsafe {
                mm(
                    (kc, og, g.t),
                    dp.get().add(gi * kc * og),
                    og,
                    bi > 0,
                    (sp as *const T).add(g.base(gi, bi)),
                    (1, g.stride * cg),
                    (gp as *const T).add(bi * g.t * g.c_out + gi * og),
                    (g.c_out, 1),
                    par,
                )
            }
        }
    });
    restore_weight(&dwr, g)
}

/// dx [B, L, C_in] from dy [B, T, C_out] and the weight.
fn input_grad<T: WithDType + Float>(dy: &[T], w: &[T], g: &Geom) -> Vec<T> {
    let wr = reorder_weight(w, g);
    let (og, kc, cg, s) = (g.og(), g.kc(), g.cg(), g.stride);
    let lp = g.lp();
    let mut dxp = vec![T::zero(); g.groups * g.b * lp * cg];
    let dp = Ptr(dxp.as_mut_ptr());
    let (gp, wp) = (dy.as_ptr() as usize, wr.as_ptr() as usize);
    let blocks = g.k.div_ceil(s);
    run_tasks(g.groups * g.b, |task, par| {
        let (gi, bi) = (task / g.b, task % g.b);
        let lhs = unsafe { (gp as *const T).add(bi * g.t * g.c_out + gi * og) };
        let w_g = unsafe { (wp as *const T).add(gi * kc * og) };
        let dst = unsafe { dp.get().add(g.base(gi, bi)) };
        if blocks <= 4 {
            // Taps q s .. q s + s of every frame land on disjoint rows s C_g apart: one gemm per
            // block q writes them, accumulating onto the blocks before it.
            for q in 0..blocks {
                let k0 = q * s;
                let width = s.min(g.k - k0) * cg;
                // Safety: frame t's block ends at t s C_g + k0 C_g + width <= L_p C_g.
                unsafe {
                    mm((g.t, width, og), dst.add(k0 * cg), s * cg, q > 0, lhs, (g.c_out, 1), w_g.add(k0 * cg * og), (1, og), par)
                }
            }
        } else {
            // Long kernels: the gradient of this task's columns [T, K C_g], then a scatter-add.
            // Safety: the gemm (not accumulating) writes every column.
            let mut cols = unsafe { output_buf::<T>(g.t * kc, 0) };
            unsafe { mm((g.t, kc, og), cols.as_mut_ptr(), kc, false, lhs, (g.c_out, 1), w_g, (1, og), par) };
            // Safety: this task owns dst[0 .. L_p C_g].
            let out = unsafe { std::slice::from_raw_parts_mut(dst, lp * cg) };
            for (t, row) in cols.chunks_exact(kc).enumerate() {
                let o = &mut out[t * s * cg..][..kc];
                o.iter_mut().zip(row).for_each(|(a, &v)| *a += v);
            }
        }
    });
    if g.direct() {
        dxp
    } else {
        unpack(&dxp, g)
    }
}

/// The convolution, and whether GELU follows it (forward only).
struct ConvCl(Geom, bool);
/// Which gradient a [`ConvClGrad`] computes.
#[derive(Clone, Copy)]
enum Wrt {
    Input,
    Weight,
}
struct ConvClGrad(Geom, Wrt);

impl CustomOp2 for ConvCl {
    fn name(&self) -> &'static str {
        "klspeech-conv1d-cl"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.0;
        by_dtype!(s1, T => {
            let y = forward(data::<T>(s1, l1)?, data::<T>(s2, l2)?, &g, self.1);
            Ok((T::to_cpu_storage_owned(y), Shape::from((g.b, g.t, g.c_out))))
        })
    }
    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        if self.1 {
            bail!("klspeech conv1d: the fused GELU variant has no backward");
        }
        let dy = dy.contiguous()?;
        // The first layer's input (the waveform) needs no gradient: skip its gemms.
        let dx = if x.track_op() { Some(dy.apply_op2_no_bwd(w, &ConvClGrad(self.0, Wrt::Input))?) } else { None };
        let dw = if w.track_op() { Some(x.apply_op2_no_bwd(&dy, &ConvClGrad(self.0, Wrt::Weight))?) } else { None };
        Ok((dx, super::grads::route(w, dw)?))
    }
}

impl CustomOp2 for ConvClGrad {
    fn name(&self) -> &'static str {
        match self.1 {
            Wrt::Input => "klspeech-conv1d-cl-dx",
            Wrt::Weight => "klspeech-conv1d-cl-dw",
        }
    }
    /// Input: (dy [B, T, C_out], w) -> dx [B, L, C_in]; weight: (x [B, L, C_in], dy) -> dw
    /// [C_out, C_g, K].
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.0;
        by_dtype!(s1, T => {
            let (a, b) = (data::<T>(s1, l1)?, data::<T>(s2, l2)?);
            let (v, shape) = match self.1 {
                Wrt::Input => (input_grad(a, b, &g), Shape::from((g.b, g.l, g.c_in))),
                Wrt::Weight => (weight_grad(a, b, &g), Shape::from((g.c_out, g.cg(), g.k))),
            };
            Ok((T::to_cpu_storage_owned(v), shape))
        })
    }
}

/// Output frames of a convolution over `l` samples: `(l + 2 padding - k) / stride + 1`.
fn out_len(l: usize, k: usize, stride: usize, padding: usize) -> Option<usize> {
    let lp = l + 2 * padding;
    (stride > 0 && lp >= k).then(|| (lp - k) / stride + 1)
}

/// The geometry of x [B, L, C_in] * w [C_out, C_in / groups, K] (checked) and the number of
/// frames the convolution yields before `max_t`.
fn geometry(x: &Tensor, w: &Tensor, stride: usize, padding: usize, groups: usize, max_t: Option<usize>) -> Result<(Geom, usize)> {
    let (b, l, c_in) = x.dims3()?;
    let (c_out, c_g, k) = w.dims3()?;
    if groups == 0 || c_in != c_g * groups || c_out % groups != 0 || stride == 0 {
        return Err(Error::InvalidInput(format!(
            "conv1d: input [{b}, {l}, {c_in}] (channels last) and kernel [{c_out}, {c_g}, {k}] with {groups} groups, stride {stride}"
        )));
    }
    let Some(full_t) = out_len(l, k, stride, padding) else {
        return Err(Error::InvalidInput(format!("conv1d: input of {l} samples is shorter than the kernel ({k})")));
    };
    let t = max_t.map_or(full_t, |m| m.min(full_t));
    Ok((Geom { b, l, c_in, c_out, k, stride, padding, groups, t }, full_t))
}

/// Grouped 1-D convolution on channels-last activations: x [B, L, C_in] with a PyTorch weight
/// w [C_out, C_in / groups, K] -> y [B, T, C_out], `T = (L + 2 padding - K) / stride + 1`, or
/// only its first `max_t` frames (the positional conv's "same" padding drops the last frame).
///
/// Differentiable in x and w. On the CPU in f32/f64 the gemm-direct op above; elsewhere (and
/// with the fused ops off) the im2col composite, or candle's `conv1d` when no gradient is taken.
pub fn conv1d_cl(x: &Tensor, w: &Tensor, stride: usize, padding: usize, groups: usize, max_t: Option<usize>) -> Result<Tensor> {
    let (geom, full_t) = geometry(x, w, stride, padding, groups, max_t)?;
    let t = geom.t;
    if fused(x) && x.dtype() == w.dtype() {
        return Ok(x.contiguous()?.apply_op2(&w.contiguous()?, ConvCl(geom, false))?);
    }
    if x.track_op() || w.track_op() {
        if super::device_op_applies(x) {
            return conv1d_cl_recompute(x, w, stride, padding, groups, max_t);
        }
        let y = conv1d_cl_composite(x, w, stride, padding, groups)?;
        return Ok(if t < full_t { y.narrow(1, 0, t)? } else { y });
    }
    // No gradient: gathered columns and gemm where `conv_gemm::mode` says so, cuDNN on
    // channels-last data where it applies, else candle's own kernel (its forward is right; its
    // backward is not).
    if super::conv_gemm::applies(x, stride, false) {
        let y = super::conv_gemm::forward(x, w, stride, padding, groups)?;
        return Ok(if t < full_t { y.narrow(1, 0, t)? } else { y });
    }
    let y = match super::cudnn::conv1d_cl(x, w, stride, padding, groups)? {
        Some(y) => y,
        None => x.transpose(1, 2)?.conv1d(w, padding, stride, 1, groups)?.transpose(1, 2)?,
    };
    Ok(if t < full_t { y.narrow(1, 0, t)? } else { y })
}

/// Differentiable [`conv1d_cl`] for devices without klspeech's CPU kernels, keeping nothing of
/// the forward but x and w. On a GPU in a `cudnn` build (f32, bf16, f16) cuDNN's forward,
/// backward-data and backward-filter convolutions on the channels-last tensors
/// ([`super::cudnn`]). Otherwise the forward is candle's `conv1d` (im2col + cuBLAS, or candle's
/// cuDNN call) and the backward klspeech's below. The backward rebuilds the
/// im2col columns of this one layer for the weight gradient (one batched gemm over the groups)
/// and gets the input gradient from a transposed convolution or the column gradient
/// ([`recompute_input_grad`]). The composite ([`conv1d_cl_composite`]) instead keeps every layer's columns,
/// K times its input, from the forward to the backward.
///
/// Runs on any device (the tests check it on the CPU against the composite's gradients).
pub fn conv1d_cl_recompute(x: &Tensor, w: &Tensor, stride: usize, padding: usize, groups: usize, max_t: Option<usize>) -> Result<Tensor> {
    let (geom, full_t) = geometry(x, w, stride, padding, groups, max_t)?;
    // [B, T, C_out] from the column gemms or cuDNN on channels-last data, or [B, C_out, T] from
    // candle; the op hands it out channels-last (one copy, strided in the last case).
    let gemm = super::conv_gemm::applies(x, stride, true);
    let channels_last = match gemm {
        true => Some(super::conv_gemm::forward(x, w, stride, padding, groups)?),
        false => super::cudnn::conv1d_cl(x, w, stride, padding, groups)?,
    };
    let (y, channels_first) = match channels_last {
        Some(y) => (if geom.t < full_t { y.narrow(1, 0, geom.t)? } else { y }, false),
        None => {
            let y = x.detach().transpose(1, 2)?.conv1d(&w.detach(), padding, stride, 1, groups)?;
            (if geom.t < full_t { y.narrow(2, 0, geom.t)? } else { y }, true)
        }
    };
    Ok(x.apply_op2(w, ConvRecompute { geom, y: super::device::Pending::new(y), channels_first, gemm })?)
}

/// The input gradient dx [B, L, C_in] of [`conv1d_cl_recompute`] from dy [B, T, C_out], in
/// few large device ops (candle's `index_add` would loop over all T K column rows in each of only
/// B C_in GPU threads):
///
/// - stride 1 with a long kernel (the positional conv, K = 128): the transposed convolution is
///   itself a stride-1 convolution of dy with the kernel flipped in time and its channel axes
///   swapped per group, padded by K - 1 - p (cuDNN in a `cudnn` build);
/// - otherwise (the feature encoder: K <= 10, a few taps per stride): the column gradient
///   dy_g w_g (one batched gemm) added back tap by tap. Tap j = q s + r of frame t lands on padded
///   input frame (t + q) s + r, so with the padded input viewed as [B, Lq, s, C], phase r sums
///   the taps' [B, T, C] blocks shifted by q frames.
fn recompute_input_grad(dy: &Tensor, w: &Tensor, g: &Geom) -> candle_core::Result<Tensor> {
    let (groups, og, cg, k, s) = (g.groups, g.og(), g.cg(), g.k, g.stride);
    let w = w.detach();
    let full_t = (g.lp() - k) / s + 1;
    if s == 1 && k > 3 && g.padding < k {
        // [B, T, C_out] (zero frames up to the full length) -> [B, C_out, T_full]
        let dy = if g.t < full_t { dy.pad_with_zeros(1, 0, full_t - g.t)? } else { dy.clone() };
        // [C_out, C_g, K] -> [G, C_g, og, K] -> [C_in, og, K], flipped in time
        let wt = w.reshape((groups, og, cg, k))?.transpose(1, 2)?.reshape((g.c_in, og, k))?;
        let rev = Tensor::from_vec((0..k as u32).rev().collect::<Vec<u32>>(), k, w.device())?;
        let wt = wt.index_select(&rev, 2)?.contiguous()?;
        let dx = dy.transpose(1, 2)?.conv1d(&wt, k - 1 - g.padding, 1, 1, groups)?; // [B, C_in, Lp - 2p]
        return dx.transpose(1, 2)?.contiguous();
    }
    // column gradient [G, B T, og] x [G, og, C_g K] -> [G, B, T, C_g, K] -> [B, T, K, C_in]
    let dy_g = dy.reshape((g.b * g.t, groups, og))?.transpose(0, 1)?.contiguous()?;
    let dcols = dy_g.matmul(&w.reshape((groups, og, g.kc()))?)?.reshape((groups, g.b, g.t, cg, k))?;
    let dcols = dcols.permute((1, 2, 4, 0, 3))?.reshape((g.b, g.t, k, g.c_in))?;
    super::conv_gemm::col2im(&dcols, (g.l, s, g.padding))
}

/// [`conv1d_cl_recompute`]'s op: `y` [B, C_out, T], computed before the op is applied, is taken
/// (not kept: the graph holds the op until the backward) and copied out as [B, T, C_out].
struct ConvRecompute {
    geom: Geom,
    y: super::device::Pending,
    /// `y` is [B, C_out, T] (candle's convolution), else [B, T, C_out] (cuDNN's NHWC one or
    /// the column gemms).
    channels_first: bool,
    /// The forward ran [`super::conv_gemm`]: so does the backward.
    gemm: bool,
}

impl CustomOp2 for ConvRecompute {
    fn name(&self) -> &'static str {
        "conv1d-recompute"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        super::device::handout_cpu(&self.y, self.channels_first)
    }

    fn cuda_fwd(&self, _: &candle_core::CudaStorage, _: &Layout, _: &candle_core::CudaStorage, _: &Layout) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::device::handout_cuda(&self.y, self.channels_first)
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, dy: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = self.geom;
        let full_t = (g.lp() - g.k) / g.stride + 1;
        if self.gemm {
            // The column gemms' backward (dy with zero frames up to the full output length).
            let dy_full = if g.t < full_t { dy.pad_with_zeros(1, 0, full_t - g.t)? } else { dy.clone() };
            let conv = (g.stride, g.padding, g.groups);
            let dw = if w.track_op() { Some(super::conv_gemm::weight_grad(x, &dy_full, w.dims3()?, conv.0, conv.1, conv.2)?) } else { None };
            let dx = if x.track_op() { Some(super::conv_gemm::input_grad(&dy_full, w, g.l, conv.0, conv.1, conv.2)?) } else { None };
            return Ok((dx, super::grads::route(w, dw)?));
        }
        // cuDNN's backward data and filter on channels-last data where they apply (dy with
        // zero frames up to the full output length when fewer were used).
        if super::cudnn::applies(dy) {
            let dy_full = if g.t < full_t { dy.pad_with_zeros(1, 0, full_t - g.t)? } else { dy.clone() };
            let want = (x.track_op(), w.track_op());
            let r = super::cudnn::conv1d_cl_backward(x, w, &dy_full, (g.stride, g.padding, g.groups), want);
            if let Some((dx, dw)) = r.map_err(|e| candle_core::Error::Msg(e.to_string()))? {
                return Ok((dx, super::grads::route(w, dw)?));
            }
        }
        let (groups, og, kc, bt) = (g.groups, g.og(), g.kc(), g.b * g.t);
        // dy [B, T, C_out] -> [G, B T, og]
        let dy_g = dy.reshape((bt, groups, og))?.transpose(0, 1)?.contiguous()?;
        // weight gradient: dy_g^T [G, og, B T] x columns [G, B T, C_g K] -> [C_out, C_g, K]
        let dw = if w.track_op() {
            let cols = super::im2col1d_composite(&x.detach().transpose(1, 2)?, g.k, g.stride, g.padding, groups)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?; // [G, B, T_full, C_g K]
            let cols = cols.narrow(2, 0, g.t)?.reshape((groups, bt, kc))?;
            Some(dy_g.transpose(1, 2)?.contiguous()?.matmul(&cols)?.reshape((g.c_out, g.cg(), g.k))?)
        } else {
            None
        };
        let dx = if x.track_op() { Some(recompute_input_grad(dy, w, &g)?) } else { None };
        // The weight's gradient goes to ops::backward's store as computed (on a GPU that saves
        // a memset and an add kernel per trained convolution).
        Ok((dx, super::grads::route(w, dw)?))
    }
}

/// `gelu_erf(conv1d_cl(x, w, ..))` for inference: nothing is recorded for a backward pass. On
/// the CPU the GELU runs on each clip's output block right after its gemm, while it is in cache
/// (the same bits as the two ops one after the other).
pub fn conv1d_cl_gelu(x: &Tensor, w: &Tensor, stride: usize, padding: usize, groups: usize, max_t: Option<usize>) -> Result<Tensor> {
    let (x, w) = (x.detach(), w.detach());
    if fused(&x) && x.dtype() == w.dtype() {
        let (b, l, c_in) = x.dims3()?;
        let (c_out, c_g, k) = w.dims3()?;
        if groups > 0 && c_in == c_g * groups && c_out % groups == 0 && stride > 0 {
            if let Some(full_t) = out_len(l, k, stride, padding) {
                let t = max_t.map_or(full_t, |m| m.min(full_t));
                let geom = Geom { b, l, c_in, c_out, k, stride, padding, groups, t };
                return Ok(x.contiguous()?.apply_op2_no_bwd(&w.contiguous()?, &ConvCl(geom, true))?);
            }
        }
    }
    super::gelu_erf(&conv1d_cl(&x, &w, stride, padding, groups, max_t)?)
}

/// [`conv1d_cl`] from im2col columns and one batched gemm per group (the reference for the
/// tests and the differentiable path off the CPU).
pub fn conv1d_cl_composite(x: &Tensor, w: &Tensor, stride: usize, padding: usize, groups: usize) -> Result<Tensor> {
    let (b, _l, _c_in) = x.dims3()?;
    let (c_out, c_g, k) = w.dims3()?;
    let cols = super::im2col1d_composite(&x.transpose(1, 2)?, k, stride, padding, groups)?; // [G, B, T, C_g K]
    let t = cols.dim(2)?;
    let og = c_out / groups;
    // [C_out, C_g, K] -> [G, C_g K, og]
    let wg = w.reshape((groups, og, c_g * k))?.transpose(1, 2)?;
    let y = cols.reshape((groups, b * t, c_g * k))?.matmul(&wg)?; // [G, B T, og]
    // [G, B, T, og] -> [B, T, G, og] -> [B, T, C_out]
    Ok(y.reshape((groups, b, t, og))?.permute((1, 2, 0, 3))?.reshape((b, t, c_out))?)
}
