//! Fused CPU ops with a backward pass, for the hot spots of `../shared/PERF.md`.
//!
//! candle composes GELU, softmax, normalization, im2col and bias addition from many small,
//! allocating, mostly single-threaded ops, and their backward passes from more of them. Each
//! function here runs one parallel pass forward and one backward (a candle `CustomOp` whose
//! `bwd` is another custom op), on the CPU in f32 and f64. On any other device or dtype it
//! falls back to the plain composite, which `tests/ops.rs` also uses as the reference: values
//! and gradients agree to 1e-5 relative (max-norm) on odd shapes.
//!
//! Every kernel is deterministic: parallel work is split into fixed chunks that do not depend
//! on the thread count, and partial sums are combined in chunk order, so a seeded training run
//! gives the same weights with any number of threads.
//!
//! Off the CPU, [`device`] has training ops made of candle's fused forward kernels and a
//! backward of a few tensor ops (standardization, softmax), and [`conv1d_cl_recompute`] the
//! training convolution; they replace composites of many graph nodes.
//!
//! `KLSPEECH_NO_CUSTOM_OPS=1` (or [`set_enabled`]) switches back to the composites, for
//! before/after benchmarks.

use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, WithDType, D};
use candle_core::backend::BackendStorage;
use num_traits::{Float, One, Zero};
use rayon::prelude::*;

use crate::error::Result;

/// Rows (or elements / ROW_GRAIN) handled by one parallel task: small enough to spread a
/// [B*T, D] activation over the cores, large enough that rayon's overhead stays negligible.
const ROW_GRAIN: usize = 64;
const ELEM_GRAIN: usize = 1 << 14;

/// A process-wide on/off switch, on unless its environment variable (read at the first use)
/// is set to something other than "" or "0"; [`EnvSwitch::set`] overrides it.
pub(crate) struct EnvSwitch {
    /// 0 = not read yet, 1 = on, 2 = off.
    state: AtomicU8,
    var: &'static str,
}

impl EnvSwitch {
    pub(crate) const fn new(var: &'static str) -> Self {
        EnvSwitch { state: AtomicU8::new(0), var }
    }

    pub(crate) fn on(&self) -> bool {
        match self.state.load(Ordering::Relaxed) {
            1 => true,
            2 => false,
            _ => {
                let on = std::env::var_os(self.var).is_none_or(|v| v.is_empty() || v == "0");
                self.set(on);
                on
            }
        }
    }

    pub(crate) fn set(&self, on: bool) {
        self.state.store(if on { 1 } else { 2 }, Ordering::Relaxed);
    }
}

static ENABLED: EnvSwitch = EnvSwitch::new("KLSPEECH_NO_CUSTOM_OPS");

/// Whether the fused ops are used (default: yes, unless `KLSPEECH_NO_CUSTOM_OPS` is set).
pub fn enabled() -> bool {
    ENABLED.on()
}

/// Turns the fused ops on or off for the whole process.
pub fn set_enabled(on: bool) {
    ENABLED.set(on);
}

/// The fused path applies: CPU, f32/f64, switched on (and this thread not running the GPU's
/// path, see [`with_gpu_path`]).
fn fused(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) && enabled() && !GPU_PATH.with(|g| g.get())
}

thread_local! {
    static GPU_PATH: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with this thread taking the GPU's path on the CPU: no fused CPU kernel, the
/// [`device`] ops and [`conv1d_cl_recompute`] where a GPU would run them, and AdamW's grouped
/// update. For tests: the
/// training path of a CUDA device, checked on a machine without one. (The GPU's inference
/// path, candle's fused kernels without a backward, is not switched.)
pub fn with_gpu_path<R>(f: impl FnOnce() -> R) -> R {
    with_gpu_path_if(true, f)
}

/// Whether the fused CPU ops run for a tensor like `x` (CPU, f32/f64, switched on).
pub fn fused_applies(x: &Tensor) -> bool {
    fused(x)
}

/// bf16 / f16 on the CPU: candle's CPU reductions (sums, means, softmax's denominator) add in
/// the storage type, so a sum of 36 864 small bf16 values comes out 98 % low. The ops with a
/// reduction compute such tensors in f32 and round the result back, as PyTorch's CPU kernels
/// accumulate half types in f32. (candle's GPU kernels sum bf16 in f32 already.)
pub fn half_on_cpu(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::BF16 | DType::F16)
}

/// `f` applied to `xs` converted to f32, its result converted back to the first input's type.
pub(crate) fn in_f32(xs: &[&Tensor], f: impl FnOnce(&[Tensor]) -> Result<Tensor>) -> Result<Tensor> {
    let dtype = xs.first().map_or(DType::F32, |x| x.dtype());
    let up = xs.iter().map(|x| x.to_dtype(DType::F32)).collect::<candle_core::Result<Vec<_>>>()?;
    Ok(f(&up)?.to_dtype(dtype)?)
}

/// candle's fused softmax over the last dimension (no backward), in f32 for bf16 / f16 on the
/// CPU ([`half_on_cpu`]).
pub fn softmax_last_dim_infer(x: &Tensor) -> Result<Tensor> {
    if half_on_cpu(x) {
        return in_f32(&[x], |v| Ok(candle_nn::ops::softmax_last_dim(&v[0])?));
    }
    Ok(candle_nn::ops::softmax_last_dim(x)?)
}

/// Runs `f` with this thread on the GPU's path exactly when `on` (see [`with_gpu_path`]), and
/// restores the thread's setting afterwards: to carry the setting onto a pool thread.
///
/// Both ways, not only `on`: a rayon worker that waits inside one job runs other jobs queued
/// on its pool, so a training installed on candle's pool by a CPU-path caller can start on a
/// worker that is in the middle of a GPU-path training and would inherit its setting.
pub fn with_gpu_path_if<R>(on: bool, f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            GPU_PATH.with(|g| g.set(self.0));
        }
    }
    let _restore = Restore(GPU_PATH.with(|g| g.replace(on)));
    f()
}

/// Whether this thread runs the GPU's path on the CPU ([`with_gpu_path`]).
pub fn gpu_path_active() -> bool {
    GPU_PATH.with(|g| g.get())
}

/// Whether the ops of [`device`] (candle's fused forward kernels with klspeech's backward) run
/// for `x` instead of the composites: off the CPU (or under [`with_gpu_path`]), switched on.
pub fn device_op_applies(x: &Tensor) -> bool {
    (!x.device().is_cpu() || GPU_PATH.with(|g| g.get())) && enabled()
}

/// What the ops return.
pub type OpResult = Result<Tensor>;

/// The contiguous data of a CPU storage.
fn data<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [T]> {
    let d = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&d[a..b]),
        None => bail!("klspeech op: non-contiguous input (call .contiguous() first)"),
    }
}

/// Runs `$body` with `$t` bound to f32 or f64 after the storage's dtype.
macro_rules! by_dtype {
    ($s:expr, $t:ident => $body:expr) => {
        match $s {
            CpuStorage::F32(_) => {
                type $t = f32;
                $body
            }
            CpuStorage::F64(_) => {
                type $t = f64;
                $body
            }
            other => bail!("klspeech op: dtype {:?} not supported", other.dtype()),
        }
    };
}

fn c<T: Float>(v: f64) -> T {
    T::from(v).expect("constant fits")
}

/// A raw pointer that parallel tasks share; each task writes a region no other task touches.
#[derive(Clone, Copy)]
pub(crate) struct Ptr<T>(*mut T);
unsafe impl<T> Send for Ptr<T> {}
unsafe impl<T> Sync for Ptr<T> {}

impl<T> Ptr<T> {
    /// (A method, so that closures capture the Sync wrapper, not the raw field.)
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}

/// An output buffer of `head + tail` elements: the kernel overwrites the first `head` in full
/// before anything reads them (no `vec![0; n]`, a serial memset pass over every output, which
/// cost a few percent of an inference step); the last `tail` start at zero (reduction targets).
/// candle's own `alloc_uninit` does the same for its outputs.
///
/// Safety: the caller writes every one of the first `head` elements before reading any of
/// them, and before the buffer leaves the kernel.
#[allow(clippy::uninit_vec)]
pub(crate) unsafe fn output_buf<T: Copy + Zero>(head: usize, tail: usize) -> Vec<T> {
    let mut v = Vec::with_capacity(head + tail);
    // Safety: the capacity covers head + tail; the head is written by the caller (above), and
    // f32 / f64 have no invalid bit patterns.
    unsafe { v.set_len(head) };
    v.resize(head + tail, T::zero());
    v
}

/// a [rows, cols] -> a^T [cols, rows], both contiguous: parallel over bands of 64 output rows,
/// each walked in 8 x 8 tiles (contiguous reads and writes of 8 elements).
pub(crate) fn transpose<T: Copy + Zero + Send + Sync>(a: &[T], rows: usize, cols: usize) -> Vec<T> {
    const BAND: usize = 64;
    const TILE: usize = 8;
    // Safety: the bands cover every output row and each band writes all of its elements
    // (full tiles, then the ragged edges element by element).
    let mut out = unsafe { output_buf::<T>(rows * cols, 0) };
    if rows == 0 || cols == 0 {
        return out;
    }
    out.par_chunks_mut(BAND * rows).enumerate().for_each(|(band, dst)| {
        let c0 = band * BAND;
        let cw = BAND.min(cols - c0);
        let mut tile = [[T::zero(); TILE]; TILE];
        for r0 in (0..rows).step_by(TILE) {
            let rw = TILE.min(rows - r0);
            for j0 in (0..cw).step_by(TILE) {
                let jw = TILE.min(cw - j0);
                if rw == TILE && jw == TILE {
                    for (i, t) in tile.iter_mut().enumerate() {
                        t.copy_from_slice(&a[(r0 + i) * cols + c0 + j0..][..TILE]);
                    }
                    for j in 0..TILE {
                        let d = &mut dst[(j0 + j) * rows + r0..][..TILE];
                        for (i, d) in d.iter_mut().enumerate() {
                            *d = tile[i][j];
                        }
                    }
                } else {
                    for i in 0..rw {
                        for j in 0..jw {
                            dst[(j0 + j) * rows + r0 + i] = a[(r0 + i) * cols + c0 + j0 + j];
                        }
                    }
                }
            }
        }
    });
    out
}

/// dst [m, n] (row stride `dst_rs`) = (accumulate ? dst : 0) + lhs [m, k] rhs [k, n], every
/// operand addressed by (row stride, column stride).
///
/// Safety: every address the strides reach must lie inside the operand's allocation.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn mm<T: 'static + Float>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const T,
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: *const T,
    (rhs_rs, rhs_cs): (usize, usize),
    par: gemm::Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        T::one(),
        T::one(),
        false,
        false,
        false,
        par,
    )
}

mod attention;
mod conv;
pub mod conv_gemm;
pub mod cudnn;
pub mod device;
pub mod grads;
pub mod kernels;
mod group_norm;
mod linear;
mod weight_norm;
pub use attention::{attention, attention_composite, attention_infer, attention_train_composite};
pub use grads::backward;
pub use conv::{conv1d_cl, conv1d_cl_composite, conv1d_cl_gelu, conv1d_cl_recompute};
pub use group_norm::{conv1_group_norm_gelu, group_norm_cl, group_norm_cl_composite, group_norm_cl_gelu, group_norm_cl_masked, group_norm_cl_valid};
pub use linear::{linear, linear_gelu_infer, linear_transposed, transpose_weight};
pub use weight_norm::{weight_norm_last, weight_norm_last_composite};

pub use crate::fastmath::FastExp;

/// Deterministic column sums of a [rows, d] matrix: fixed row chunks summed in parallel, the
/// partial sums added in chunk order.
fn column_sums<T: WithDType + Float>(g: &[T], d: usize) -> Vec<T> {
    let chunk = (ROW_GRAIN * 4).max(1);
    let partial: Vec<Vec<T>> = g
        .par_chunks(chunk * d)
        .map(|block| {
            let mut acc = vec![T::zero(); d];
            for row in block.chunks_exact(d) {
                for (a, &v) in acc.iter_mut().zip(row) {
                    *a += v;
                }
            }
            acc
        })
        .collect();
    let mut out = vec![T::zero(); d];
    for p in partial {
        for (o, v) in out.iter_mut().zip(p) {
            *o += v;
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// GELU (erf)
// ---------------------------------------------------------------------------------------------

/// Standard normal CDF Phi(x) = (1 + erf(x / sqrt 2)) / 2.
///
/// f32: the Abramowitz-Stegun 7.1.26 erf (absolute error <= 1.5e-7) that PyTorch's vectorized
/// CPU erf uses, written as erfc on |z| so that the left tail does not cancel (1 + erf(z) in
/// f32 loses every digit below x = -5): GELU's relative error stays under 6e-4 down to x = -4
/// and its absolute error under 2e-7 max(1, |x|) everywhere (tests/ops.rs);
/// f64: candle's double-precision erf.
pub(crate) trait Phi: FastExp {
    fn phi(x: Self) -> Self;

    /// y = x Phi(x), elementwise.
    #[inline(always)]
    fn gelu_slice(y: &mut [Self], x: &[Self]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = x * Self::phi(x);
        }
    }

    /// y = y Phi(y) in place (through a stack buffer, so the slice kernels keep separate
    /// input and output).
    fn gelu_in_place(y: &mut [Self]) {
        let mut tmp = [Self::zero(); 256];
        for chunk in y.chunks_mut(256) {
            let t = &mut tmp[..chunk.len()];
            t.copy_from_slice(chunk);
            Self::gelu_slice(chunk, t);
        }
    }

    /// dx = g (Phi(x) + x phi(x)), elementwise.
    #[inline(always)]
    fn gelu_grad_slice(dx: &mut [Self], x: &[Self], g: &[Self]) {
        let inv_sqrt_2pi: Self = c(0.398_942_280_401_432_7);
        let half: Self = c(0.5);
        for ((d, &x), &g) in dx.iter_mut().zip(x).zip(g) {
            let pdf = inv_sqrt_2pi * (-(x * x) * half).fexp();
            *d = g * (Self::phi(x) + x * pdf);
        }
    }
}

// The crate targets baseline x86-64 (SSE2); these hot loops are also compiled for AVX2 + FMA
// and chosen at run time. The FMA forms below round once per multiply-add, so their results
// differ from the portable path's in the last bits (both within the accuracy tests/ops.rs
// checks); on one machine every caller takes the same path.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_slice_avx2(y: &mut [f32], x: &[f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = x * phi_pdf_f32_fma(x).0;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_grad_slice_avx2(dx: &mut [f32], x: &[f32], g: &[f32]) {
    for ((d, &x), &g) in dx.iter_mut().zip(x).zip(g) {
        let (phi, pdf) = phi_pdf_f32_fma(x);
        *d = g * x.mul_add(pdf, phi);
    }
}

// The same two kernels 16 lanes wide where the CPU has AVX-512 (the same operations per
// element, so the same bits as the AVX2 + FMA kernels): GELU was 12 % of tiny inference.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn gelu_slice_avx512(y: &mut [f32], x: &[f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = x * phi_pdf_f32_fma(x).0;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn gelu_grad_slice_avx512(dx: &mut [f32], x: &[f32], g: &[f32]) {
    for ((d, &x), &g) in dx.iter_mut().zip(x).zip(g) {
        let (phi, pdf) = phi_pdf_f32_fma(x);
        *d = g * x.mul_add(pdf, phi);
    }
}

/// Whether the AVX-512 kernels apply (checked once; `is_x86_feature_detected` caches too).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// [`phi_pdf_f32`] with fused multiply-adds (only inlined into the AVX2 + FMA kernels, where
/// `mul_add` is one instruction; elsewhere it would be a libm call).
#[inline(always)]
fn phi_pdf_f32_fma(x: f32) -> (f32, f32) {
    const INV_SQRT_2PI: f32 = 0.398_942_280_401_432_7_f64 as f32;
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0;
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    // e = exp(-z^2) as in FastExp::fexp (Cody-Waite, degree-7 Taylor), with FMAs.
    let a = (-z * z).max(-87.0);
    let shifted = a.mul_add(LOG2E, ROUND);
    let n = shifted - ROUND;
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, a));
    let mut p = 1.0 / 5040.0;
    for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = p.mul_add(r, c);
    }
    let e = p * f32::from_bits(shifted.to_bits().wrapping_sub(0x4b40_0000 - 127) << 23);
    // erfc(z) = poly(t) t exp(-z^2), t = 1 / (1 + 0.3275911 z) (Abramowitz-Stegun 7.1.26).
    let t = 1.0 / 0.327_591_1f32.mul_add(z, 1.0);
    let mut q = 1.061_405_4f32;
    for c in [-1.453_152, 1.421_413_8, -0.284_496_74, 0.254_829_6] {
        q = q.mul_add(t, c);
    }
    let half_erfc = 0.5 * (q * t) * e; // (1 - erf(|z|)) / 2
    let phi = if x >= 0.0 { 1.0 - half_erfc } else { half_erfc };
    (phi, INV_SQRT_2PI * e)
}

/// Phi(x) and the normal density phi'(x) = exp(-x^2 / 2) / sqrt(2 pi) with one exponential:
/// the erfc form of Phi already computes exp(-z^2) = exp(-x^2 / 2).
#[inline(always)]
fn phi_pdf_f32(x: f32) -> (f32, f32) {
    const INV_SQRT_2PI: f32 = 0.398_942_280_401_432_7_f64 as f32;
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let e = (-z * z).fexp();
    let half_erfc = 0.5 * erfc_poly_f32(z) * e; // (1 - erf(|z|)) / 2
    let phi = if x >= 0.0 { 1.0 - half_erfc } else { half_erfc };
    (phi, INV_SQRT_2PI * e)
}

/// The Abramowitz-Stegun 7.1.26 polynomial: erfc(z) = poly(z) exp(-z^2) for z >= 0.
#[inline(always)]
fn erfc_poly_f32(z: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.327_591_1 * z);
    t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152 + t * 1.061_405_4))))
}

impl Phi for f32 {
    #[inline(always)]
    fn phi(x: f32) -> f32 {
        let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
        let half_erfc = 0.5 * erfc_poly_f32(z) * (-z * z).fexp(); // (1 - erf(|z|)) / 2
        if x >= 0.0 {
            1.0 - half_erfc
        } else {
            half_erfc
        }
    }

    fn gelu_slice(y: &mut [f32], x: &[f32]) {
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            // SAFETY: the CPU has AVX-512F, AVX2 and FMA (checked above).
            return unsafe { gelu_slice_avx512(y, x) };
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            return unsafe { gelu_slice_avx2(y, x) };
        }
        for (y, &x) in y.iter_mut().zip(x) {
            *y = x * f32::phi(x);
        }
    }

    fn gelu_grad_slice(dx: &mut [f32], x: &[f32], g: &[f32]) {
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            // SAFETY: the CPU has AVX-512F, AVX2 and FMA (checked above).
            return unsafe { gelu_grad_slice_avx512(dx, x, g) };
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            return unsafe { gelu_grad_slice_avx2(dx, x, g) };
        }
        for ((d, &x), &g) in dx.iter_mut().zip(x).zip(g) {
            let (phi, pdf) = phi_pdf_f32(x);
            *d = g * (phi + x * pdf);
        }
    }
}

impl Phi for f64 {
    #[inline(always)]
    fn phi(x: f64) -> f64 {
        0.5 * (1.0 + candle_core::cpu::erf::erf_f64(x * std::f64::consts::FRAC_1_SQRT_2))
    }
}

struct GeluErf;
struct GeluErfBwd;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "klspeech-gelu-erf"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        by_dtype!(s, T => {
            let x = data::<T>(s, l)?;
            // Safety: gelu_slice writes every element.
            let mut y = unsafe { output_buf::<T>(x.len(), 0) };
            y.par_chunks_mut(ELEM_GRAIN).zip(x.par_chunks(ELEM_GRAIN)).for_each(|(y, x)| T::gelu_slice(y, x));
            Ok((T::to_cpu_storage_owned(y), l.shape().clone()))
        })
    }
    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&g.contiguous()?, &GeluErfBwd)?))
    }
}

impl CustomOp2 for GeluErfBwd {
    fn name(&self) -> &'static str {
        "klspeech-gelu-erf-bwd"
    }
    /// d/dx x Phi(x) = Phi(x) + x phi(x).
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        by_dtype!(s1, T => {
            let x = data::<T>(s1, l1)?;
            let g = data::<T>(s2, l2)?;
            // Safety: gelu_grad_slice writes every element.
            let mut dx = unsafe { output_buf::<T>(x.len(), 0) };
            dx.par_chunks_mut(ELEM_GRAIN)
                .zip(x.par_chunks(ELEM_GRAIN).zip(g.par_chunks(ELEM_GRAIN)))
                .for_each(|(dx, (x, g))| T::gelu_grad_slice(dx, x, g));
            Ok((T::to_cpu_storage_owned(dx), l1.shape().clone()))
        })
    }
}

/// The exact (erf) GELU, Hugging Face's `"gelu"`.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if kernels::apply(x) {
        // f32 on a GPU: one kernel each way (candle's backward of gelu_erf is about ten).
        return Ok(kernels::gelu(x)?);
    }
    if kernels::apply_half(x) {
        // bf16 / f16 on a GPU, training or not: the kernel's half-type instance (f32
        // arithmetic, each result rounded once; candle's bf16 GELU took 222 µs a call, 1.3 ms
        // of a bf16 inference batch of 16 x 10 s on the H200, for the feature encoder's six).
        return Ok(kernels::gelu(x)?);
    }
    if !fused(x) {
        return Ok(x.gelu_erf()?);
    }
    Ok(x.contiguous()?.apply_op1(GeluErf)?)
}

// ---------------------------------------------------------------------------------------------
// Softmax over the last dimension
// ---------------------------------------------------------------------------------------------

struct Softmax;
struct SoftmaxBwd;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "klspeech-softmax"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = l.dims().last().copied().unwrap_or(1).max(1);
        by_dtype!(s, T => {
            let x = data::<T>(s, l)?;
            // Safety: every row is written (exponentials, then scaled).
            let mut y = unsafe { output_buf::<T>(x.len(), 0) };
            y.par_chunks_mut(d * ROW_GRAIN).zip(x.par_chunks(d * ROW_GRAIN)).for_each(|(y, x)| {
                for (y, x) in y.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                    let m = x.iter().fold(T::neg_infinity(), |a, &b| a.max(b));
                    let mut sum = T::zero();
                    for (y, &x) in y.iter_mut().zip(x) {
                        *y = (x - m).fexp();
                        sum += *y;
                    }
                    let inv = T::one() / sum;
                    y.iter_mut().for_each(|y| *y *= inv);
                }
            });
            Ok((T::to_cpu_storage_owned(y), l.shape().clone()))
        })
    }
    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(y.contiguous()?.apply_op2_no_bwd(&g.contiguous()?, &SoftmaxBwd)?))
    }
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "klspeech-softmax-bwd"
    }
    /// dx = y (g - sum(g y)) per row.
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = l1.dims().last().copied().unwrap_or(1).max(1);
        by_dtype!(s1, T => {
            let y = data::<T>(s1, l1)?;
            let g = data::<T>(s2, l2)?;
            // Safety: every element of every row is written.
            let mut dx = unsafe { output_buf::<T>(y.len(), 0) };
            dx.par_chunks_mut(d * ROW_GRAIN).zip(y.par_chunks(d * ROW_GRAIN).zip(g.par_chunks(d * ROW_GRAIN))).for_each(|(dx, (y, g))| {
                for (dx, (y, g)) in dx.chunks_exact_mut(d).zip(y.chunks_exact(d).zip(g.chunks_exact(d))) {
                    let dot = y.iter().zip(g).fold(T::zero(), |a, (&y, &g)| a + y * g);
                    for ((dx, &y), &g) in dx.iter_mut().zip(y).zip(g) {
                        *dx = y * (g - dot);
                    }
                }
            });
            Ok((T::to_cpu_storage_owned(dx), l1.shape().clone()))
        })
    }
}

/// Softmax over the last dimension (max-subtracted), differentiable.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if device_op_applies(x) {
        return device::softmax_last_device(x);
    }
    if !fused(x) {
        return softmax_last_composite(x);
    }
    Ok(x.contiguous()?.apply_op1(Softmax)?)
}

/// The composite softmax (candle's fused `softmax_last_dim` has no backward); bf16 / f16 on the
/// CPU in f32 ([`half_on_cpu`]).
pub fn softmax_last_composite(x: &Tensor) -> Result<Tensor> {
    if half_on_cpu(x) {
        return in_f32(&[x], |v| softmax_last_composite(&v[0]));
    }
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&s)?)
}

// ---------------------------------------------------------------------------------------------
// Standardization and LayerNorm over the last dimension
// ---------------------------------------------------------------------------------------------

/// Mean and 1/sqrt(var + eps) of one row, accumulated in f64.
#[inline]
fn row_stats<T: WithDType + Float>(x: &[T], eps: f64) -> (T, T) {
    let n = x.len() as f64;
    let mean = x.iter().map(|v| v.to_f64().unwrap_or(0.0)).sum::<f64>() / n;
    let var = x.iter().map(|v| (v.to_f64().unwrap_or(0.0) - mean).powi(2)).sum::<f64>() / n;
    (c(mean), c(1.0 / (var + eps).sqrt()))
}

struct Standardize {
    eps: f64,
}
struct StandardizeBwd {
    eps: f64,
}

impl CustomOp1 for Standardize {
    fn name(&self) -> &'static str {
        "klspeech-standardize"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = l.dims().last().copied().unwrap_or(1).max(1);
        by_dtype!(s, T => {
            let x = data::<T>(s, l)?;
            // Safety: every element of every row is written.
            let mut y = unsafe { output_buf::<T>(x.len(), 0) };
            y.par_chunks_mut(d * ROW_GRAIN).zip(x.par_chunks(d * ROW_GRAIN)).for_each(|(y, x)| {
                for (y, x) in y.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                    let (m, r) = row_stats(x, self.eps);
                    for (y, &x) in y.iter_mut().zip(x) {
                        *y = (x - m) * r;
                    }
                }
            });
            Ok((T::to_cpu_storage_owned(y), l.shape().clone()))
        })
    }
    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&g.contiguous()?, &StandardizeBwd { eps: self.eps })?))
    }
}

/// dx = r (g - mean(g) - x_hat mean(g x_hat)) for one row; `g` may already include gamma.
#[inline]
fn standardize_row_bwd<T: WithDType + Float>(x: &[T], g: impl Fn(usize) -> T, dx: &mut [T], eps: f64) {
    let (m, r) = row_stats(x, eps);
    let n: T = c(x.len() as f64);
    let (mut sg, mut sgx) = (T::zero(), T::zero());
    for (i, &x) in x.iter().enumerate() {
        let gi = g(i);
        sg += gi;
        sgx += gi * (x - m) * r;
    }
    let (mg, mgx) = (sg / n, sgx / n);
    for (i, (d, &x)) in dx.iter_mut().zip(x).enumerate() {
        *d = r * (g(i) - mg - (x - m) * r * mgx);
    }
}

impl CustomOp2 for StandardizeBwd {
    fn name(&self) -> &'static str {
        "klspeech-standardize-bwd"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = l1.dims().last().copied().unwrap_or(1).max(1);
        by_dtype!(s1, T => {
            let x = data::<T>(s1, l1)?;
            let g = data::<T>(s2, l2)?;
            // Safety: standardize_row_bwd writes every element of its row.
            let mut dx = unsafe { output_buf::<T>(x.len(), 0) };
            dx.par_chunks_mut(d * ROW_GRAIN).zip(x.par_chunks(d * ROW_GRAIN).zip(g.par_chunks(d * ROW_GRAIN))).for_each(|(dx, (x, g))| {
                for (dx, (x, g)) in dx.chunks_exact_mut(d).zip(x.chunks_exact(d).zip(g.chunks_exact(d))) {
                    standardize_row_bwd(x, |i| g[i], dx, self.eps);
                }
            });
            Ok((T::to_cpu_storage_owned(dx), l1.shape().clone()))
        })
    }
}

/// `(x - mean) / sqrt(var + eps)` over the last dimension (biased variance), differentiable.
pub fn standardize_last(x: &Tensor, eps: f64) -> Result<Tensor> {
    if device_op_applies(x) {
        return device::standardize_last_device(x, eps);
    }
    if half_on_cpu(x) {
        return in_f32(&[x], |v| standardize_last(&v[0], eps));
    }
    if !fused(x) {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        return Ok(xc.broadcast_div(&(var + eps)?.sqrt()?)?);
    }
    Ok(x.contiguous()?.apply_op1(Standardize { eps })?)
}

struct LayerNorm {
    eps: f64,
}
struct LayerNormBwd {
    eps: f64,
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "klspeech-layer-norm"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = l1.dims().last().copied().unwrap_or(1).max(1);
        by_dtype!(s1, T => {
            let x = data::<T>(s1, l1)?;
            let (w, b) = (data::<T>(s2, l2)?, data::<T>(s3, l3)?);
            // Safety: every element of every row is written.
            let mut y = unsafe { output_buf::<T>(x.len(), 0) };
            y.par_chunks_mut(d * ROW_GRAIN).zip(x.par_chunks(d * ROW_GRAIN)).for_each(|(y, x)| {
                for (y, x) in y.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                    let (m, r) = row_stats(x, self.eps);
                    for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(w).zip(b) {
                        *y = (x - m) * r * w + b;
                    }
                }
            });
            Ok((T::to_cpu_storage_owned(y), l1.shape().clone()))
        })
    }
    fn bwd(&self, x: &Tensor, w: &Tensor, b: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // One pass computes dx [rows, D] and the column sums for dw, db: packed as
        // [rows + 2, D] and split here.
        let d = x.dim(D::Minus1)?;
        let rows = x.elem_count() / d.max(1);
        let packed = x.apply_op3_no_bwd(w, &g.contiguous()?, &LayerNormBwd { eps: self.eps })?;
        let dx = packed.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dw = packed.narrow(0, rows, 1)?.reshape(d)?;
        let db = packed.narrow(0, rows + 1, 1)?.reshape(d)?;
        Ok((Some(dx), grads::route(w, Some(dw))?, grads::route(b, Some(db))?))
    }
}

impl CustomOp3 for LayerNormBwd {
    fn name(&self) -> &'static str {
        "klspeech-layer-norm-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = l1.dims().last().copied().unwrap_or(1).max(1);
        by_dtype!(s1, T => {
            let x = data::<T>(s1, l1)?;
            let w = data::<T>(s2, l2)?;
            let g = data::<T>(s3, l3)?;
            let rows = x.len() / d;
            // Safety: standardize_row_bwd writes every dx row; the dw, db rows start at zero.
            let mut out = unsafe { output_buf::<T>(rows * d, 2 * d) };
            let (dx, tail) = out.split_at_mut(rows * d);
            let chunk = d * ROW_GRAIN;
            // dx per row; per chunk the partial sums of g * x_hat (dw) and g (db).
            let partial: Vec<(Vec<T>, Vec<T>)> = dx
                .par_chunks_mut(chunk)
                .zip(x.par_chunks(chunk).zip(g.par_chunks(chunk)))
                .map(|(dx, (x, g))| {
                    let (mut dw, mut db) = (vec![T::zero(); d], vec![T::zero(); d]);
                    for (dx, (x, g)) in dx.chunks_exact_mut(d).zip(x.chunks_exact(d).zip(g.chunks_exact(d))) {
                        let (m, r) = row_stats(x, self.eps);
                        for i in 0..d {
                            dw[i] += g[i] * (x[i] - m) * r;
                            db[i] += g[i];
                        }
                        standardize_row_bwd(x, |i| g[i] * w[i], dx, self.eps);
                    }
                    (dw, db)
                })
                .collect();
            let (dw, db) = tail.split_at_mut(d);
            for (pw, pb) in partial {
                for i in 0..d {
                    dw[i] += pw[i];
                    db[i] += pb[i];
                }
            }
            Ok((T::to_cpu_storage_owned(out), Shape::from((rows + 2, d))))
        })
    }
}

thread_local! {
    /// [`residual_layer_norm_infer`] calls that ran the kernel (or, rehearsing, would have).
    static RESIDUAL_LN_CALLS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// This thread's [`residual_layer_norm_infer`] calls on the one-pass path so far (tests).
pub fn residual_layer_norm_calls() -> usize {
    RESIDUAL_LN_CALLS.with(|c| c.get())
}

/// Whether a post-norm transformer layer's inference fuses its output projections' bias, the
/// residual and the LayerNorm ([`residual_layer_norm_infer`]) for activations like `x`: on a
/// GPU with klspeech's kernels (f32, bf16, f16), or on the CPU rehearsing the GPU's path
/// ([`with_gpu_path`], where the op runs as three ops); `KLSPEECH_NO_KERNEL=residual_layer_norm`
/// switches it off.
pub fn residual_layer_norm_applies(x: &Tensor) -> bool {
    (kernels::apply_any_float(x) || (gpu_path_active() && enabled() && x.device().is_cpu())) && kernels::kernel_on("residual_layer_norm")
}

/// A linear layer's bias and the next LayerNorm's weight and bias packed as one [3 d] tensor
/// for [`residual_layer_norm_infer`] (its kernel takes three inputs; a caller that runs many
/// batches keeps the packed copy).
pub fn pack_residual_layer_norm(bias: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(Tensor::cat(&[bias.detach().flatten_all()?, w.detach().flatten_all()?, b.detach().flatten_all()?], 0)?)
}

/// Inference: `LayerNorm((y + bias) + r)` over the last axis, where y is a linear layer's
/// product without its bias, r the residual and p = [bias; w; b] ([`pack_residual_layer_norm`])
/// (a post-norm transformer layer: the attention's and the feed-forward's output projections).
/// On a GPU one kernel (`kl_residual_layer_norm`: one pass over y and r, where the bias add,
/// the residual add and candle's LayerNorm made three, about 100 µs a site for an f32 batch of
/// 16 x 10 s on the H200); elsewhere those three ops. No gradient.
pub fn residual_layer_norm_infer(y: &Tensor, r: &Tensor, p: &Tensor, eps: f64) -> Result<Tensor> {
    let d = y.dim(D::Minus1)?;
    if p.elem_count() != 3 * d {
        return Err(crate::Error::InvalidInput(format!("residual_layer_norm_infer: {} packed parameters for rows of {d} (want bias, weight and bias: {})", p.elem_count(), 3 * d)));
    }
    let same = r.dtype() == y.dtype() && p.dtype() == y.dtype();
    if kernels::apply_any_float(y) && same && kernels::kernel_on("residual_layer_norm") {
        RESIDUAL_LN_CALLS.with(|c| c.set(c.get() + 1));
        return Ok(kernels::residual_layer_norm_of(y, r, p, eps)?);
    }
    if gpu_path_active() {
        RESIDUAL_LN_CALLS.with(|c| c.set(c.get() + 1));
    }
    let p = p.detach().flatten_all()?;
    let x = (y.detach().broadcast_add(&p.narrow(0, 0, d)?)? + r.detach())?.contiguous()?;
    Ok(candle_nn::ops::layer_norm(&x, &p.narrow(0, d, d)?, &p.narrow(0, 2 * d, d)?, eps as f32)?)
}

/// LayerNorm over the last dimension with weight and bias, differentiable in all three
/// (candle's fused `layer_norm` passes no gradient).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if kernels::apply(x) && kernels::apply(w) && kernels::apply(b) && x.dim(D::Minus1)? <= kernels::LAYER_NORM_MAX_D && w.elem_count() == x.dim(D::Minus1)? {
        // f32 on a GPU: one kernel forward, two backward (the composite: 3 and about 7).
        return Ok(kernels::layer_norm(x, w, b, eps)?);
    }
    let same_type = w.dtype() == x.dtype() && b.dtype() == x.dtype();
    if kernels::apply_half(x) && same_type && (x.track_op() || w.track_op() || b.track_op()) && x.dim(D::Minus1)? <= kernels::LAYER_NORM_MAX_D && w.elem_count() == x.dim(D::Minus1)? {
        // bf16 / f16 training on a GPU: the kernels' half-type instances (f32 arithmetic, each
        // output rounded once; the weight and bias gradients summed in f32).
        return Ok(kernels::layer_norm(x, w, b, eps)?);
    }
    if half_on_cpu(x) && same_type {
        // The weight and bias gradients sum over every row ([`half_on_cpu`]): the f32 op.
        return in_f32(&[x, w, b], |t| layer_norm(&t[0], &t[1], &t[2], eps));
    }
    if !fused(x) {
        return Ok(standardize_last(x, eps)?.broadcast_mul(w)?.broadcast_add(b)?);
    }
    Ok(x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, LayerNorm { eps })?)
}

// ---------------------------------------------------------------------------------------------
// Bias addition over the last dimension
// ---------------------------------------------------------------------------------------------

struct AddBias;
struct ColumnSums;

impl CustomOp2 for AddBias {
    fn name(&self) -> &'static str {
        "klspeech-add-bias"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = l1.dims().last().copied().unwrap_or(1).max(1);
        by_dtype!(s1, T => {
            let x = data::<T>(s1, l1)?;
            let b = data::<T>(s2, l2)?;
            let mut y = x.to_vec();
            y.par_chunks_mut(d * ROW_GRAIN).for_each(|y| {
                for row in y.chunks_exact_mut(d) {
                    row.iter_mut().zip(b).for_each(|(y, &b)| *y += b);
                }
            });
            Ok((T::to_cpu_storage_owned(y), l1.shape().clone()))
        })
    }
    fn bwd(&self, _x: &Tensor, b: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let db = g.contiguous()?.apply_op1_no_bwd(&ColumnSums)?;
        Ok((Some(g.clone()), grads::route(b, Some(db))?))
    }
}

impl CustomOp1 for ColumnSums {
    fn name(&self) -> &'static str {
        "klspeech-column-sums"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = l.dims().last().copied().unwrap_or(1).max(1);
        by_dtype!(s, T => {
            let g = data::<T>(s, l)?;
            Ok((T::to_cpu_storage_owned(column_sums(g, d)), Shape::from(d)))
        })
    }
}

/// `x + b` with b [D] broadcast over the leading dimensions of x [..., D]; its backward sums
/// the bias gradient in parallel (candle reduces over leading dimensions one element at a time).
pub fn add_bias(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !fused(x) {
        return Ok(x.broadcast_add(b)?);
    }
    Ok(x.contiguous()?.apply_op2(&b.contiguous()?, AddBias)?)
}

// ---------------------------------------------------------------------------------------------
// im2col for 1-D convolutions
// ---------------------------------------------------------------------------------------------

/// The columns of a grouped 1-D convolution, x [B, C, L] -> [G, B, T, (C / G) K] with
/// `T = (L + 2 padding - K) / stride + 1`, from strided narrows: the differentiable path of
/// [`conv1d_cl`] off the CPU and its reference in the tests.
pub fn im2col1d_composite(x: &Tensor, k: usize, stride: usize, padding: usize, groups: usize) -> Result<Tensor> {
    let (b, c, l) = x.dims3()?;
    let t = (l + 2 * padding - k) / stride + 1;
    // Pad so that the input reshapes to [B, C, Tq, stride] with Tq >= T + (K - 1) / stride.
    let tq = t + (k - 1) / stride + 1;
    let right = tq * stride - l - padding;
    let xp = if padding > 0 || right > 0 { x.pad_with_zeros(2, padding, right)? } else { x.clone() };
    let xq = xp.reshape((b, c, tq, stride))?;
    // Column j reads x[t * stride + j] = xq[t + j / stride, j % stride].
    let mut cols = Vec::with_capacity(k);
    for j in 0..k {
        cols.push(xq.narrow(2, j / stride, t)?.narrow(3, j % stride, 1)?);
    }
    let cols = Tensor::cat(&cols, 3)?; // [B, C, T, K]
    let cg = c / groups;
    // [B, G, C_g, T, K] -> [G, B, T, C_g * K]
    Ok(cols.reshape((b, groups, cg, t, k))?.permute((1, 0, 3, 2, 4))?.reshape((groups, b, t, cg * k))?)
}

// ---------------------------------------------------------------------------------------------
// Seeded dropout
// ---------------------------------------------------------------------------------------------

/// Inverted dropout whose mask is element i's draw of the keyed stream
/// ([`crate::rng::keyed_uniform`]): nothing is stored, the backward recomputes it.
#[derive(Debug, Clone, Copy)]
struct Dropout {
    p: f64,
    key: u64,
}

impl Dropout {
    /// The mask value of element i: 1 / (1 - p) when kept, else 0.
    #[inline]
    fn factor(&self, i: usize) -> f64 {
        if crate::rng::keyed_uniform(self.key, i as u64) >= self.p {
            1.0 / (1.0 - self.p)
        } else {
            0.0
        }
    }
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "klspeech-dropout"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        by_dtype!(s, T => {
            let x = data::<T>(s, l)?;
            // Safety: every element is written.
            let mut y = unsafe { output_buf::<T>(x.len(), 0) };
            y.par_chunks_mut(ELEM_GRAIN).zip(x.par_chunks(ELEM_GRAIN)).enumerate().for_each(|(ci, (y, x))| {
                for (j, (y, &x)) in y.iter_mut().zip(x).enumerate() {
                    *y = x * c::<T>(self.factor(ci * ELEM_GRAIN + j));
                }
            });
            Ok((T::to_cpu_storage_owned(y), l.shape().clone()))
        })
    }
    /// d(x m)/dx = m: the same op on the gradient.
    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(g.contiguous()?.apply_op1_no_bwd(self)?))
    }
}

/// The dropout mask of [`dropout`] as a tensor of x's shape, dtype and device: built on the CPU
/// in parallel (element i depends only on the key and i), in f32 for f32 tensors (what the f64
/// factor rounds to) and else in f64, converted on the device; for f32 on a GPU, built there
/// by klspeech's kernel (`ops::kernels::dropout_mask`, the same bits).
pub fn dropout_mask(x: &Tensor, p: f64, key: u64) -> Result<Tensor> {
    if kernels::apply(x) {
        // f32 on a GPU: built there by klspeech's kernel, the same bits.
        return Ok(kernels::dropout_mask_like(x, p, key)?);
    }
    let d = Dropout { p, key };
    fn build<T: WithDType>(d: &Dropout, n: usize, f: impl Fn(f64) -> T + Sync) -> Vec<T> {
        let mut m = vec![T::zero(); n];
        m.par_chunks_mut(ELEM_GRAIN).enumerate().for_each(|(ci, chunk)| {
            for (j, v) in chunk.iter_mut().enumerate() {
                *v = f(d.factor(ci * ELEM_GRAIN + j));
            }
        });
        m
    }
    let cpu = &candle_core::Device::Cpu;
    let n = x.elem_count();
    let m = if x.dtype() == DType::F32 {
        Tensor::from_vec(build(&d, n, |v| v as f32), x.shape(), cpu)?
    } else {
        Tensor::from_vec(build(&d, n, |v| v), x.shape(), cpu)?.to_dtype(x.dtype())?
    };
    Ok(m.to_device(x.device())?)
}

/// Inverted dropout with rate `p` (0 <= p < 1): element i is kept, scaled by 1 / (1 - p), when
/// the i-th uniform of the stream keyed by `key` is >= p. On the CPU one parallel pass each way
/// with no stored mask; elsewhere `x * dropout_mask(..)`, the same mask.
pub fn dropout(x: &Tensor, p: f64, key: u64) -> Result<Tensor> {
    if !(0.0..1.0).contains(&p) {
        return Err(crate::Error::InvalidInput(format!("dropout rate {p} is outside [0, 1)")));
    }
    if !fused(x) {
        return Ok(x.mul(&dropout_mask(x, p, key)?)?);
    }
    Ok(x.contiguous()?.apply_op1(Dropout { p, key })?)
}

// ---------------------------------------------------------------------------------------------
// AdamW, in place
// ---------------------------------------------------------------------------------------------

/// The scalars of one AdamW update of one parameter (see `train::optim::AdamW::step`).
#[derive(Debug, Clone, Copy)]
pub struct AdamWScalars {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// `1 - lr * weight_decay`, or `None` for parameters without decay.
    pub decay: Option<f64>,
    /// `sqrt(1 - beta2^t)`.
    pub bias_correction2_sqrt: f64,
    /// `lr / (1 - beta1^t)`.
    pub step_size: f64,
    /// The gradient's scale (gradient clipping's coefficient), or `None`: the update reads
    /// `g s + 0` in the parameter's type, the bits of candle's `g.affine(s, 0.)` before the
    /// update, without that pass over the gradient (on the CPU's fused path and the GPU's
    /// one-kernel step; the GPU's two-kernel update gets the gradient scaled by that affine
    /// first).
    pub grad_scale: Option<f64>,
}

/// Updates the moments `mv` = [m; v] ([2, n]) in place from the gradient.
struct AdamMoments(AdamWScalars);
/// Updates the parameter in place from the new moments.
struct AdamApply(AdamWScalars);

/// Runs an in-place kernel on the contiguous f32 or f64 data of `s1`, reading `s2`. bf16 /
/// f16 data (AdamW when the CPU rehearses the GPU's path) goes through the f32 kernel on its
/// values, each result rounded once to the type, as the GPU's half-type kernels do.
fn in_place(
    s1: &mut CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    f32_kernel: impl Fn(&mut [f32], &[f32]),
    f64_kernel: impl Fn(&mut [f64], &[f64]),
) -> candle_core::Result<()> {
    fn through_f32<T: WithDType>(d: &mut [T], src: &[T], f32_kernel: impl Fn(&mut [f32], &[f32]), round: impl Fn(f32) -> T) {
        let up = |v: &[T]| v.iter().map(|x| x.to_f64() as f32).collect::<Vec<f32>>();
        let (mut t, s) = (up(d), up(src));
        f32_kernel(&mut t, &s);
        d.iter_mut().zip(t).for_each(|(o, v)| *o = round(v));
    }
    let (a, b) = l1.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("klspeech op: non-contiguous in-place target".into()))?;
    match s1 {
        CpuStorage::F32(d) => f32_kernel(&mut d[a..b], data(s2, l2)?),
        CpuStorage::F64(d) => f64_kernel(&mut d[a..b], data(s2, l2)?),
        CpuStorage::BF16(d) => through_f32(&mut d[a..b], data(s2, l2)?, f32_kernel, half::bf16::from_f32),
        CpuStorage::F16(d) => through_f32(&mut d[a..b], data(s2, l2)?, f32_kernel, half::f16::from_f32),
        other => bail!("klspeech op: dtype {:?} not supported", other.dtype()),
    }
    Ok(())
}

impl candle_core::InplaceOp2 for AdamMoments {
    fn name(&self) -> &'static str {
        "klspeech-adamw-moments"
    }
    /// f32, bf16, f16 on a GPU: klspeech's kernel, the same float operations (`ops::kernels`).
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    fn cuda_fwd(&self, s1: &mut candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout) -> candle_core::Result<()> {
        #[cfg(feature = "cuda")]
        {
            kernels::launch_in_place(&kernels::adam_moments(l2.shape().elem_count(), &self.0, s1.dtype()), s1, l1, &[(s2, l2)])
        }
        #[cfg(not(feature = "cuda"))]
        {
            bail!("klspeech-adamw-moments: built without CUDA")
        }
    }
    /// The composite's exact float operations (candle's `x * c` is `x * c + 0`):
    /// m' = ((g - m) (1 - b1) + 0) + m; v' = (v b2 + 0) + (g g (1 - b2) + 0).
    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        let p = self.0;
        in_place(s1, l1, s2, l2, |d: &mut [f32], g: &[f32]| moments(d, g, p), |d: &mut [f64], g: &[f64]| moments(d, g, p))
    }
}

fn moments<T: WithDType + Float>(mv: &mut [T], g: &[T], p: AdamWScalars) {
    let n = g.len();
    let (m, v) = mv.split_at_mut(n);
    m.par_chunks_mut(ELEM_GRAIN).zip(v.par_chunks_mut(ELEM_GRAIN).zip(g.par_chunks(ELEM_GRAIN))).for_each(|(m, (v, g))| moments_chunk(m, v, g, p));
}

#[inline(always)]
fn moments_chunk<T: WithDType + Float>(m: &mut [T], v: &mut [T], g: &[T], p: AdamWScalars) {
    let (c1, b2, c2, zero) = (T::from_f64(1.0 - p.beta1), T::from_f64(p.beta2), T::from_f64(1.0 - p.beta2), T::zero());
    let moment = |m: &mut T, v: &mut T, g: T| {
        *m = ((g - *m) * c1 + zero) + *m;
        *v = (*v * b2 + zero) + (g * g * c2 + zero);
    };
    match p.grad_scale.map(T::from_f64) {
        // (Two loops: the common case keeps its plain body.)
        Some(s) => m.iter_mut().zip(v.iter_mut()).zip(g).for_each(|((m, v), &g)| moment(m, v, g * s + zero)),
        None => m.iter_mut().zip(v.iter_mut()).zip(g).for_each(|((m, v), &g)| moment(m, v, g)),
    }
}

impl candle_core::InplaceOp2 for AdamApply {
    fn name(&self) -> &'static str {
        "klspeech-adamw-apply"
    }
    /// f32, bf16, f16 on a GPU: klspeech's kernel, the same float operations (`ops::kernels`).
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    fn cuda_fwd(&self, s1: &mut candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout) -> candle_core::Result<()> {
        #[cfg(feature = "cuda")]
        {
            kernels::launch_in_place(&kernels::adam_apply(l1.shape().elem_count(), &self.0, s1.dtype()), s1, l1, &[(s2, l2)])
        }
        #[cfg(not(feature = "cuda"))]
        {
            bail!("klspeech-adamw-apply: built without CUDA")
        }
    }
    /// theta' = (theta (1 - lr wd) + 0) - ((m / ((sqrt(v) (1 / bc2) + 0) 1 + eps)) step + 0).
    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        let p = self.0;
        in_place(s1, l1, s2, l2, |d: &mut [f32], mv: &[f32]| apply(d, mv, p), |d: &mut [f64], mv: &[f64]| apply(d, mv, p))
    }
}

fn apply<T: WithDType + Float>(theta: &mut [T], mv: &[T], p: AdamWScalars) {
    let n = theta.len();
    let (m, v) = mv.split_at(n);
    theta.par_chunks_mut(ELEM_GRAIN).zip(m.par_chunks(ELEM_GRAIN).zip(v.par_chunks(ELEM_GRAIN))).for_each(|(th, (m, v))| apply_chunk(th, m, v, p));
}

#[inline(always)]
fn apply_chunk<T: WithDType + Float>(theta: &mut [T], m: &[T], v: &[T], p: AdamWScalars) {
    let zero = T::zero();
    let decay = p.decay.map(T::from_f64);
    let (inv_bc2, eps, step) = (T::from_f64(1.0 / p.bias_correction2_sqrt), T::from_f64(p.eps), T::from_f64(p.step_size));
    for ((th, &m), &v) in theta.iter_mut().zip(m).zip(v) {
        let t = match decay {
            Some(d) => *th * d + zero,
            None => *th,
        };
        let denom = (v.sqrt() * inv_bc2 + zero) * T::one() + eps;
        *th = t - ((m / denom) * step + zero);
    }
}

/// The sum of the squares of a gradient's values and whether each is finite, in one parallel
/// pass on the CPU (f32 or f64, contiguous; `None` elsewhere, then `train::optim` uses
/// candle's ops): the squares and their sum in f64 (an f32 square is exact in f64, and no sum
/// of f32 squares overflows it, so the sum is finite exactly when every value is), eight
/// running sums per chunk of `ELEM_GRAIN` values and the chunks added in order, so the result
/// does not depend on the thread count. Where candle's ops took four passes and a new tensor
/// of the gradient's size for the probe (`g - g` summed) and three more for the norm (wav2vec2-
/// base: about 120 ms a training step on 2 cores).
pub fn sum_sq_finite(g: &Tensor) -> Result<Option<(f64, bool)>> {
    if !fused(g) {
        return Ok(None);
    }
    fn sum_sq<T: WithDType>(d: &[T]) -> f64 {
        let chunk = |c: &[T]| -> f64 {
            let mut acc = [0f64; 8];
            let mut it = c.chunks_exact(8);
            for v in &mut it {
                for (a, x) in acc.iter_mut().zip(v) {
                    let x = x.to_f64();
                    *a += x * x;
                }
            }
            let tail: f64 = it.remainder().iter().map(|x| x.to_f64() * x.to_f64()).sum();
            acc.iter().sum::<f64>() + tail
        };
        let parts: Vec<f64> = d.par_chunks(ELEM_GRAIN).map(chunk).collect();
        parts.into_iter().sum()
    }
    let (storage, layout) = g.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else { return Ok(None) };
    let Some((a, b)) = layout.contiguous_offsets() else { return Ok(None) };
    Ok(match cpu {
        CpuStorage::F32(d) => {
            let s = sum_sq(&d[a..b]);
            Some((s, s.is_finite()))
        }
        CpuStorage::F64(d) => {
            let d = &d[a..b];
            let s = sum_sq(d);
            // (f64 squares can overflow: then look at the values themselves.)
            Some((s, s.is_finite() || d.par_iter().all(|x| x.is_finite())))
        }
        _ => None,
    })
}

/// One fused AdamW update in place: `mv` ([2, n], m then v) and `theta` ([n] elements,
/// contiguous). Bit-for-bit the composite update in `train::optim` (same float operations in
/// the same order), one parallel pass over the moments and one over the parameter.
/// Returns `false` (and changes nothing) where the fused path does not apply.
pub fn adamw_in_place(theta: &Tensor, grad: &Tensor, mv: &Tensor, p: AdamWScalars) -> Result<bool> {
    let same = grad.dtype() == theta.dtype() && mv.dtype() == theta.dtype() && grad.device().same_device(theta.device()) && mv.device().same_device(theta.device());
    if (kernels::apply(theta) || kernels::apply_half_adamw(theta)) && same && theta.is_contiguous() && mv.is_contiguous() {
        // On a GPU two kernels, the moments then the parameter: in f32 the same bits as here;
        // bf16 / f16 parameters and moments (also on the CPU rehearsing the GPU's path) through
        // their half-type instances, f32 arithmetic on the stored values, each result rounded
        // once, the moments as stored feeding the update (candle's half-type composite was
        // about 15 passes).
        if theta.device().is_cuda() && kernels::kernel_on("adam_step") {
            let g = grad.contiguous()?;
            if distinct_storages(&[theta, mv, &g]) {
                // One kernel for both steps (`kl_adam_step`, the same bits): a launch a
                // parameter instead of two, the moments read once; a gradient scale read with
                // the gradient (`kl_adam_step_scaled`: candle's affine's bits, without its
                // launch and its copy of the gradient).
                theta.inplace_op1(&AdamStep { mv, g: &g, p })?;
                return Ok(true);
            }
        }
        // The two kernels take no scale: candle's affine first.
        let g = match p.grad_scale {
            Some(s) => grad.affine(s, 0.0)?.contiguous()?,
            None => grad.contiguous()?,
        };
        let p = AdamWScalars { grad_scale: None, ..p };
        mv.inplace_op2(&g, &AdamMoments(p))?;
        theta.inplace_op2(mv, &AdamApply(p))?;
        return Ok(true);
    }
    if !fused(theta) || grad.dtype() != theta.dtype() || mv.dtype() != theta.dtype() || !theta.is_contiguous() || !mv.is_contiguous() {
        return Ok(false);
    }
    let g = grad.contiguous()?;
    if !distinct_storages(&[theta, mv, &g]) {
        // Two passes (the chunked form needs three distinct buffers).
        mv.inplace_op2(&g, &AdamMoments(p))?;
        theta.inplace_op2(mv, &AdamApply(p))?;
        return Ok(true);
    }
    // Both steps chunk by chunk, the chunk's moments still in cache for the second (the
    // update is memory-bound). The parameter's in-place op runs the moments' in-place op
    // inside it, lending it the parameter's slice: each buffer is locked once.
    theta.inplace_op1(&AdamChunked { mv, g: &g, p })?;
    Ok(true)
}

/// Whether the tensors have storages of their own (an in-place op on one can lock another
/// inside it without waiting on itself).
fn distinct_storages(ts: &[&Tensor]) -> bool {
    // The address of a tensor's storage (the lock is released at once).
    let storage = |t: &Tensor| &*t.storage_and_layout().0 as *const candle_core::Storage as usize;
    let s: Vec<usize> = ts.iter().map(|t| storage(t)).collect();
    s.iter().enumerate().all(|(i, a)| !s[..i].contains(a))
}

/// Both AdamW steps as one kernel on a GPU (`ops::kernels::adam_step`): the parameter's
/// in-place op runs the moments' in-place op inside it, lending it the parameter's device
/// address, so each buffer is locked once.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct AdamStep<'a> {
    mv: &'a Tensor,
    g: &'a Tensor,
    p: AdamWScalars,
}

/// The moments' side of [`AdamStep`], with the parameter's device address.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct AdamStepMoments {
    theta: u64,
    p: AdamWScalars,
}

impl candle_core::InplaceOp1 for AdamStep<'_> {
    fn name(&self) -> &'static str {
        "klspeech-adamw-step"
    }
    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
        bail!("klspeech-adamw-step: a CUDA kernel (the CPU runs the chunked update)")
    }
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    fn cuda_fwd(&self, s: &mut candle_core::CudaStorage, l: &Layout) -> candle_core::Result<()> {
        #[cfg(feature = "cuda")]
        {
            if self.mv.elem_count() != 2 * l.shape().elem_count() || self.g.elem_count() != l.shape().elem_count() {
                bail!("klspeech-adamw-step: {} moments and {} gradients for {} parameters", self.mv.elem_count(), self.g.elem_count(), l.shape().elem_count());
            }
            kernels::with_address_mut(s, l, |theta| self.mv.inplace_op2(self.g, &AdamStepMoments { theta, p: self.p }))
        }
        #[cfg(not(feature = "cuda"))]
        {
            bail!("klspeech-adamw-step: built without CUDA")
        }
    }
}

impl candle_core::InplaceOp2 for AdamStepMoments {
    fn name(&self) -> &'static str {
        "klspeech-adamw-step-moments"
    }
    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> candle_core::Result<()> {
        bail!("klspeech-adamw-step: a CUDA kernel (the CPU runs the chunked update)")
    }
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    fn cuda_fwd(&self, s1: &mut candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout) -> candle_core::Result<()> {
        #[cfg(feature = "cuda")]
        {
            let plan = kernels::adam_step(l2.shape().elem_count(), &self.p, s1.dtype());
            kernels::launch_in_place_after(&plan, Some(self.theta), s1, l1, &[(s2, l2)])
        }
        #[cfg(not(feature = "cuda"))]
        {
            bail!("klspeech-adamw-step: built without CUDA")
        }
    }
}

/// The parameter's side of the chunked update (see [`adamw_in_place`]).
struct AdamChunked<'a> {
    mv: &'a Tensor,
    g: &'a Tensor,
    p: AdamWScalars,
}

/// The parameter's slice, lent to the moments' op.
enum ThetaSlice<'a> {
    F32(&'a mut [f32]),
    F64(&'a mut [f64]),
}

/// The moments' side: [`moments`] then [`apply`] on each chunk.
struct AdamChunkedMoments<'a> {
    theta: std::sync::Mutex<ThetaSlice<'a>>,
    p: AdamWScalars,
}

impl candle_core::InplaceOp1 for AdamChunked<'_> {
    fn name(&self) -> &'static str {
        "klspeech-adamw"
    }
    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let (a, b) = l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("klspeech adamw: non-contiguous parameter".into()))?;
        let theta = match s {
            CpuStorage::F32(d) => ThetaSlice::F32(&mut d[a..b]),
            CpuStorage::F64(d) => ThetaSlice::F64(&mut d[a..b]),
            other => bail!("klspeech op: dtype {:?} not supported", other.dtype()),
        };
        self.mv.inplace_op2(self.g, &AdamChunkedMoments { theta: std::sync::Mutex::new(theta), p: self.p })
    }
}

impl candle_core::InplaceOp2 for AdamChunkedMoments<'_> {
    fn name(&self) -> &'static str {
        "klspeech-adamw-chunked"
    }
    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        let (a, b) = l1.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("klspeech adamw: non-contiguous moments".into()))?;
        let mut theta = self.theta.lock().unwrap_or_else(|e| e.into_inner());
        match (s1, &mut *theta) {
            (CpuStorage::F32(mv), ThetaSlice::F32(th)) => adamw_chunked(th, &mut mv[a..b], data(s2, l2)?, self.p),
            (CpuStorage::F64(mv), ThetaSlice::F64(th)) => adamw_chunked(th, &mut mv[a..b], data(s2, l2)?, self.p),
            (other, _) => bail!("klspeech adamw: moments of dtype {:?} for another parameter dtype", other.dtype()),
        }
        Ok(())
    }
}

/// [`moments`] then [`apply`] on each chunk of `ELEM_GRAIN` elements (the same float
/// operations, so the same bits as the two passes and as the composite).
fn adamw_chunked<T: WithDType + Float>(theta: &mut [T], mv: &mut [T], g: &[T], p: AdamWScalars) {
    let n = theta.len();
    let (m, v) = mv.split_at_mut(n);
    theta.par_chunks_mut(ELEM_GRAIN).zip(m.par_chunks_mut(ELEM_GRAIN).zip(v.par_chunks_mut(ELEM_GRAIN).zip(g.par_chunks(ELEM_GRAIN)))).for_each(
        |(th, (m, (v, g)))| {
            moments_chunk(m, v, g, p);
            apply_chunk(th, m, v, p);
        },
    );
}

// ---------------------------------------------------------------------------------------------
// KL-Norm over the last dimension (training mode)
// ---------------------------------------------------------------------------------------------

/// One KL-Norm site in training mode, fused (`../shared/KLNORM.md`): for x [rows, D], the
/// parameters `p` = [w; b; a; b2] ([4, D], standard prior) or [w; b; a; b2; m_p; s_raw]
/// ([6, D], learned prior) and the noise [rows, D] (held by the op, no gradient):
///
///   x_hat = standardize(x); mu = w x_hat + b; sigma = softplus(a x_hat + b2);
///   y = mu + sigma noise; kl_row = sum_i KL(N(mu_i, sigma_i^2) || prior_i)
///
/// Output: one flat buffer [rows D + rows]: y (row-major) then the per-row KL, so both are
/// contiguous views.
struct KlNormOp {
    eps: f64,
    learned: bool,
    noise: Tensor,
}

struct KlNormBwd {
    eps: f64,
    learned: bool,
    noise: Tensor,
}

#[inline]
fn softplus_t<T: FastExp>(z: T) -> T {
    z.max(T::zero()) + (-z.abs()).fexp().fln_1p()
}

#[inline]
fn sigmoid_t<T: FastExp>(z: T) -> T {
    T::one() / (T::one() + (-z).fexp())
}

/// Runs `f` on the CPU data of the op's noise tensor.
fn with_noise<T: WithDType, R>(noise: &Tensor, f: impl FnOnce(&[T]) -> candle_core::Result<R>) -> candle_core::Result<R> {
    let (guard, layout) = noise.storage_and_layout();
    match &*guard {
        candle_core::Storage::Cpu(s) => f(data::<T>(s, layout)?),
        _ => bail!("klspeech op: KL-Norm noise must be on the CPU"),
    }
}

/// One row of KL-Norm with the standard prior, forward: y = mu + sigma noise, returns the
/// row's KL sum. Branch-free elementwise loops (the KL terms go through `tmp` and are summed
/// after), so they vectorize; f32 additionally runs them compiled for AVX2 ([`KlRows`]).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn kl_fwd_row_std<T: FastExp>(x: &[T], p: [&[T]; 4], nz: &[T], y: &mut [T], tmp: &mut [T], m: T, r: T) -> T {
    let [w, b, a, b2] = p;
    let (half, one, two): (T, T, T) = (c(0.5), T::one(), c(2.0));
    for (((((((yi, ki), &xi), &wi), &bi), &ai), &b2i), &ni) in
        y.iter_mut().zip(tmp.iter_mut()).zip(x).zip(w).zip(b).zip(a).zip(b2).zip(nz)
    {
        let xh = (xi - m) * r;
        let mu = xh * wi + bi;
        let sigma = softplus_t(xh * ai + b2i);
        *yi = mu + sigma * ni;
        *ki = half * (mu * mu + sigma * sigma - one - two * sigma.fln());
    }
    tmp.iter().fold(T::zero(), |s, &v| s + v)
}

/// One row of KL-Norm with the standard prior, backward: accumulates the row's contribution to
/// the gradients of w, b, a, b2 (`dp`) and writes dx. `dxh` and `xh` are scratch rows.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn kl_bwd_row_std<T: FastExp>(
    x: &[T],
    p: [&[T]; 4],
    nz: &[T],
    gy: &[T],
    gk: T,
    dp: [&mut [T]; 4],
    dx: &mut [T],
    dxh: &mut [T],
    xh_row: &mut [T],
    m: T,
    r: T,
) {
    let [w, b, a, b2] = p;
    let [dw, db, da, db2] = dp;
    let one = T::one();
    for ((((((((((&xi, &wi), &bi), &ai), &b2i), &ni), &gi), dwi), dbi), dai), (db2i, (dxhi, xhi))) in x
        .iter()
        .zip(w)
        .zip(b)
        .zip(a)
        .zip(b2)
        .zip(nz)
        .zip(gy)
        .zip(dw.iter_mut())
        .zip(db.iter_mut())
        .zip(da.iter_mut())
        .zip(db2.iter_mut().zip(dxh.iter_mut().zip(xh_row.iter_mut())))
    {
        let xh = (xi - m) * r;
        *xhi = xh;
        let mu = xh * wi + bi;
        let z = xh * ai + b2i;
        let sigma = softplus_t(z);
        let dmu = gi + gk * mu;
        let dz = (gi * ni + gk * (sigma - one / sigma)) * sigmoid_t(z);
        *dwi = *dwi + dmu * xh;
        *dbi = *dbi + dmu;
        *dai = *dai + dz * xh;
        *db2i = *db2i + dz;
        *dxhi = dmu * wi + dz * ai;
    }
    // Standardization backward: r (dxh - mean(dxh) - x_hat mean(dxh x_hat)).
    let n: T = c(x.len() as f64);
    let (s1, s2) = dxh.iter().zip(xh_row.iter()).fold((T::zero(), T::zero()), |(s1, s2), (&d, &h)| (s1 + d, s2 + d * h));
    let (m1, m2) = (s1 / n, s2 / n);
    for ((d, &g), &h) in dx.iter_mut().zip(dxh.iter()).zip(xh_row.iter()) {
        *d = r * (g - m1 - h * m2);
    }
}

/// The KL-Norm row kernels by dtype: f32 runs them compiled for AVX2 where the CPU has it
/// (no FMA, so the same bits either way), f64 as they are.
trait KlRows: FastExp {
    #[allow(clippy::too_many_arguments)]
    fn fwd_row(x: &[Self], p: [&[Self]; 4], nz: &[Self], y: &mut [Self], tmp: &mut [Self], m: Self, r: Self) -> Self {
        kl_fwd_row_std(x, p, nz, y, tmp, m, r)
    }
    #[allow(clippy::too_many_arguments)]
    fn bwd_row(x: &[Self], p: [&[Self]; 4], nz: &[Self], gy: &[Self], gk: Self, dp: [&mut [Self]; 4], dx: &mut [Self], dxh: &mut [Self], xh: &mut [Self], m: Self, r: Self) {
        kl_bwd_row_std(x, p, nz, gy, gk, dp, dx, dxh, xh, m, r)
    }
}

impl KlRows for f64 {}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn kl_fwd_row_avx2(x: &[f32], p: [&[f32]; 4], nz: &[f32], y: &mut [f32], tmp: &mut [f32], m: f32, r: f32) -> f32 {
    kl_fwd_row_std(x, p, nz, y, tmp, m, r)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn kl_fwd_row_avx512(x: &[f32], p: [&[f32]; 4], nz: &[f32], y: &mut [f32], tmp: &mut [f32], m: f32, r: f32) -> f32 {
    kl_fwd_row_std(x, p, nz, y, tmp, m, r)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn kl_bwd_row_avx512(x: &[f32], p: [&[f32]; 4], nz: &[f32], gy: &[f32], gk: f32, dp: [&mut [f32]; 4], dx: &mut [f32], dxh: &mut [f32], xh: &mut [f32], m: f32, r: f32) {
    kl_bwd_row_std(x, p, nz, gy, gk, dp, dx, dxh, xh, m, r)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn kl_bwd_row_avx2(x: &[f32], p: [&[f32]; 4], nz: &[f32], gy: &[f32], gk: f32, dp: [&mut [f32]; 4], dx: &mut [f32], dxh: &mut [f32], xh: &mut [f32], m: f32, r: f32) {
    kl_bwd_row_std(x, p, nz, gy, gk, dp, dx, dxh, xh, m, r)
}

impl KlRows for f32 {
    fn fwd_row(x: &[f32], p: [&[f32]; 4], nz: &[f32], y: &mut [f32], tmp: &mut [f32], m: f32, r: f32) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            // SAFETY: the CPU has AVX-512F and AVX2 (checked above).
            return unsafe { kl_fwd_row_avx512(x, p, nz, y, tmp, m, r) };
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked above).
            return unsafe { kl_fwd_row_avx2(x, p, nz, y, tmp, m, r) };
        }
        kl_fwd_row_std(x, p, nz, y, tmp, m, r)
    }
    fn bwd_row(x: &[f32], p: [&[f32]; 4], nz: &[f32], gy: &[f32], gk: f32, dp: [&mut [f32]; 4], dx: &mut [f32], dxh: &mut [f32], xh: &mut [f32], m: f32, r: f32) {
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            // SAFETY: the CPU has AVX-512F and AVX2 (checked above).
            return unsafe { kl_bwd_row_avx512(x, p, nz, gy, gk, dp, dx, dxh, xh, m, r) };
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked above).
            return unsafe { kl_bwd_row_avx2(x, p, nz, gy, gk, dp, dx, dxh, xh, m, r) };
        }
        kl_bwd_row_std(x, p, nz, gy, gk, dp, dx, dxh, xh, m, r)
    }
}

impl CustomOp2 for KlNormOp {
    fn name(&self) -> &'static str {
        "klspeech-kl-norm"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = l1.dims().last().copied().unwrap_or(1).max(1);
        by_dtype!(s1, T => {
            let x = data::<T>(s1, l1)?;
            let p = data::<T>(s2, l2)?;
            let rows = x.len() / d;
            with_noise::<T, _>(&self.noise, |noise| {
                // Safety: every row writes its d outputs and its KL term.
                let mut out = unsafe { output_buf::<T>(rows * d + rows, 0) };
                let (y, kl) = out.split_at_mut(rows * d);
                let (w, b, a, b2) = (&p[..d], &p[d..2 * d], &p[2 * d..3 * d], &p[3 * d..4 * d]);
                let prior = self.learned.then(|| (&p[4 * d..5 * d], &p[5 * d..6 * d]));
                let (half, one, two): (T, T, T) = (c(0.5), T::one(), c(2.0));
                y.par_chunks_mut(d * ROW_GRAIN)
                    .zip(kl.par_chunks_mut(ROW_GRAIN))
                    .zip(x.par_chunks(d * ROW_GRAIN).zip(noise.par_chunks(d * ROW_GRAIN)))
                    .for_each(|((y, kl), (x, nz))| {
                        let mut tmp = vec![T::zero(); d];
                        for (((y, kl), x), nz) in y.chunks_exact_mut(d).zip(kl.iter_mut()).zip(x.chunks_exact(d)).zip(nz.chunks_exact(d)) {
                            let (m, r) = row_stats(x, self.eps);
                            if prior.is_none() {
                                *kl = T::fwd_row(x, [w, b, a, b2], nz, y, &mut tmp, m, r);
                                continue;
                            }
                            let mut acc = T::zero();
                            for i in 0..d {
                                let xh = (x[i] - m) * r;
                                let mu = xh * w[i] + b[i];
                                let sigma = softplus_t(xh * a[i] + b2[i]);
                                y[i] = mu + sigma * nz[i];
                                acc += match prior {
                                        None => half * (mu * mu + sigma * sigma - one - two * sigma.fln()),
                                        Some((mp, sr)) => {
                                            let s = softplus_t(sr[i]);
                                            let iv = one / (s * s);
                                            let dm = mu - mp[i];
                                            half * (sigma * sigma * iv + dm * dm * iv - one + two * s.fln() - two * sigma.fln())
                                        }
                                    };
                            }
                            *kl = acc;
                        }
                    });
                Ok((T::to_cpu_storage_owned(out), Shape::from(rows * d + rows)))
            })
        })
    }
    fn bwd(&self, x: &Tensor, p: &Tensor, _out: &Tensor, g: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let d = x.dim(D::Minus1)?;
        let n = x.elem_count();
        let packed = x.apply_op3_no_bwd(p, &g.contiguous()?, &KlNormBwd { eps: self.eps, learned: self.learned, noise: self.noise.clone() })?;
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let dp = packed.narrow(0, n, p.elem_count())?.reshape((p.elem_count() / d, d))?;
        Ok((Some(dx), Some(dp)))
    }
}

impl CustomOp3 for KlNormBwd {
    fn name(&self) -> &'static str {
        "klspeech-kl-norm-bwd"
    }
    /// From the output gradient [rows D + rows] (g_y then g_kl): dx [rows, D] then dp [P, D],
    /// flat. Per element, with s = prior scale, m_p = prior mean (standard: 1, 0):
    /// dmu = g_y + g_kl (mu - m_p) / s^2; dsigma = g_y noise + g_kl (sigma / s^2 - 1 / sigma);
    /// dz = dsigma sigmoid(z); dx_hat = dmu w + dz a; dx = standardize backward of dx_hat.
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = l1.dims().last().copied().unwrap_or(1).max(1);
        by_dtype!(s1, T => {
            let x = data::<T>(s1, l1)?;
            let p = data::<T>(s2, l2)?;
            let g = data::<T>(s3, l3)?;
            let rows = x.len() / d;
            let np = p.len();
            let (gy, gk) = g.split_at(rows * d);
            with_noise::<T, _>(&self.noise, |noise| {
                // Safety: every row writes its dx; the parameter gradients start at zero.
                let mut out = unsafe { output_buf::<T>(rows * d, np) };
                let (dx, dp_out) = out.split_at_mut(rows * d);
                let (w, b, a, b2) = (&p[..d], &p[d..2 * d], &p[2 * d..3 * d], &p[3 * d..4 * d]);
                let prior = self.learned.then(|| (&p[4 * d..5 * d], &p[5 * d..6 * d]));
                let one = T::one();
                let partial: Vec<Vec<T>> = dx
                    .par_chunks_mut(d * ROW_GRAIN)
                    .zip(gk.par_chunks(ROW_GRAIN))
                    .zip(x.par_chunks(d * ROW_GRAIN).zip(gy.par_chunks(d * ROW_GRAIN).zip(noise.par_chunks(d * ROW_GRAIN))))
                    .map(|((dx, gk), (x, (gy, nz)))| {
                        let mut dp = vec![T::zero(); np];
                        let mut dxh = vec![T::zero(); d];
                        let mut xh_row = vec![T::zero(); d];
                        for ((((dx, &gk), x), gy), nz) in
                            dx.chunks_exact_mut(d).zip(gk).zip(x.chunks_exact(d)).zip(gy.chunks_exact(d)).zip(nz.chunks_exact(d))
                        {
                            let (m, r) = row_stats(x, self.eps);
                            if prior.is_none() {
                                let (dw, rest) = dp.split_at_mut(d);
                                let (db, rest) = rest.split_at_mut(d);
                                let (da, rest) = rest.split_at_mut(d);
                                T::bwd_row(x, [w, b, a, b2], nz, gy, gk, [dw, db, da, &mut rest[..d]], dx, &mut dxh, &mut xh_row, m, r);
                                continue;
                            }
                            for i in 0..d {
                                let xh = (x[i] - m) * r;
                                xh_row[i] = xh;
                                let mu = xh * w[i] + b[i];
                                let z = xh * a[i] + b2[i];
                                let sigma = softplus_t(z);
                                let (dmu, dsigma) = match prior {
                                    None => (gy[i] + gk * mu, gy[i] * nz[i] + gk * (sigma - one / sigma)),
                                    Some((mp, sr)) => {
                                        let s = softplus_t(sr[i]);
                                        let iv = one / (s * s);
                                        let dm = mu - mp[i];
                                        // d/dm_p and d/ds of the KL, into the prior rows.
                                        dp[4 * d + i] -= gk * dm * iv;
                                        let ds = gk * (one / s - (sigma * sigma + dm * dm) * iv / s);
                                        dp[5 * d + i] += ds * sigmoid_t(sr[i]);
                                        (gy[i] + gk * dm * iv, gy[i] * nz[i] + gk * (sigma * iv - one / sigma))
                                    }
                                };
                                let dz = dsigma * sigmoid_t(z);
                                dp[i] += dmu * xh; // w
                                dp[d + i] += dmu; // b
                                dp[2 * d + i] += dz * xh; // a
                                dp[3 * d + i] += dz; // b2
                                dxh[i] = dmu * w[i] + dz * a[i];
                            }
                            // Standardization backward: r (dxh - mean(dxh) - x_hat mean(dxh x_hat)).
                            let n: T = c(d as f64);
                            let (mut s1, mut s2) = (T::zero(), T::zero());
                            for i in 0..d {
                                s1 += dxh[i];
                                s2 += dxh[i] * xh_row[i];
                            }
                            let (m1, m2) = (s1 / n, s2 / n);
                            for i in 0..d {
                                dx[i] = r * (dxh[i] - m1 - xh_row[i] * m2);
                            }
                        }
                        dp
                    })
                    .collect();
                for part in partial {
                    for (o, v) in dp_out.iter_mut().zip(part) {
                        *o += v;
                    }
                }
                Ok((T::to_cpu_storage_owned(out), Shape::from(rows * d + np)))
            })
        })
    }
}

/// A KL-Norm site over the last dimension in training mode, fused on the CPU: returns the
/// sample `y` (shaped like x) and the per-position KL summed over features (x's shape without
/// its last dimension). `prior` = (m_p, s_raw) for the learned prior. Off the CPU,
/// [`device::kl_norm_last_device`]. `None` where neither applies (the caller then runs the
/// composite).
#[allow(clippy::too_many_arguments)]
pub fn kl_norm_last(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    a: &Tensor,
    b2: &Tensor,
    prior: Option<(&Tensor, &Tensor)>,
    noise: &Tensor,
    eps: f64,
) -> Result<Option<(Tensor, Tensor)>> {
    if device_op_applies(x) && noise.dtype() == x.dtype() && noise.device().same_device(x.device()) {
        return Ok(Some(device::kl_norm_last_device(x, w, b, a, b2, prior, noise, eps)?));
    }
    if !fused(x) || noise.dtype() != x.dtype() || !noise.device().is_cpu() {
        return Ok(None);
    }
    let mut parts = vec![w.clone(), b.clone(), a.clone(), b2.clone()];
    if let Some((m, s)) = prior {
        parts.push(m.clone());
        parts.push(s.clone());
    }
    let d = x.dim(D::Minus1)?;
    let p = Tensor::cat(&parts, 0)?.reshape((parts.len(), d))?;
    let x = x.contiguous()?;
    let n = x.elem_count();
    let rows = n / d.max(1);
    let op = KlNormOp { eps, learned: prior.is_some(), noise: noise.contiguous()? };
    let packed = x.apply_op2(&p, op)?;
    let y = packed.narrow(0, 0, n)?.reshape(x.shape())?;
    let mut kl_shape = x.dims().to_vec();
    kl_shape.pop();
    let kl = packed.narrow(0, n, rows)?.reshape(kl_shape)?;
    Ok(Some((y, kl)))
}

// ---------------------------------------------------------------------------------------------
// Per-channel affine on [B, C, T] (GroupNorm's weight and bias)
// ---------------------------------------------------------------------------------------------

struct ChannelAffine;
struct ChannelAffineBwd;

/// (B, C, T) of a [B, C, T] layout.
fn bct(l: &Layout) -> candle_core::Result<(usize, usize, usize)> {
    match l.dims() {
        &[b, c, t] => Ok((b, c, t)),
        d => bail!("klspeech op: expected [B, C, T], got {d:?}"),
    }
}

impl CustomOp3 for ChannelAffine {
    fn name(&self) -> &'static str {
        "klspeech-channel-affine"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, c, t) = bct(l1)?;
        by_dtype!(s1, T => {
            let x = data::<T>(s1, l1)?;
            let (w, b) = (data::<T>(s2, l2)?, data::<T>(s3, l3)?);
            // Safety: every (clip, channel) row is written.
            let mut y = unsafe { output_buf::<T>(x.len(), 0) };
            y.par_chunks_mut(t.max(1)).zip(x.par_chunks(t.max(1))).enumerate().for_each(|(row, (y, x))| {
                let (w, b) = (w[row % c], b[row % c]);
                y.iter_mut().zip(x).for_each(|(y, &x)| *y = x * w + b);
            });
            Ok((T::to_cpu_storage_owned(y), l1.shape().clone()))
        })
    }
    fn bwd(&self, x: &Tensor, w: &Tensor, b: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let packed = x.apply_op3_no_bwd(w, &g.contiguous()?, &ChannelAffineBwd)?;
        split_affine_grads(&packed, x, w, b)
    }
}

/// (dx, dw, db) from a flat [dx (x's elements), dw (c), db (c)] backward output (dw and db
/// through [`grads::route`]).
#[allow(clippy::type_complexity)]
fn split_affine_grads(packed: &Tensor, x: &Tensor, w: &Tensor, b: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let (n, c) = (x.elem_count(), w.elem_count());
    let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
    Ok((Some(dx), grads::route(w, Some(packed.narrow(0, n, c)?))?, grads::route(b, Some(packed.narrow(0, n + c, c)?))?))
}

impl CustomOp3 for ChannelAffineBwd {
    fn name(&self) -> &'static str {
        "klspeech-channel-affine-bwd"
    }
    /// dx = g w[c]; dw[c] = sum over b, t of g x; db[c] = sum of g: per-(b, c) row sums in
    /// parallel, then added over b in order. Output [B C T + 2 C], flat.
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (bsz, c, t) = bct(l1)?;
        by_dtype!(s1, T => {
            let x = data::<T>(s1, l1)?;
            let w = data::<T>(s2, l2)?;
            let g = data::<T>(s3, l3)?;
            let n = x.len();
            // Safety: every dx row is written; dw, db start at zero.
            let mut out = unsafe { output_buf::<T>(n, 2 * c) };
            let (dx, tail) = out.split_at_mut(n);
            let sums: Vec<(T, T)> = dx
                .par_chunks_mut(t.max(1))
                .zip(x.par_chunks(t.max(1)).zip(g.par_chunks(t.max(1))))
                .enumerate()
                .map(|(row, (dx, (x, g)))| {
                    let w = w[row % c];
                    let (mut sw, mut sb) = (T::zero(), T::zero());
                    for ((d, &x), &g) in dx.iter_mut().zip(x).zip(g) {
                        *d = g * w;
                        sw += g * x;
                        sb += g;
                    }
                    (sw, sb)
                })
                .collect();
            let (dw, db) = tail.split_at_mut(c);
            for bi in 0..bsz {
                for ci in 0..c {
                    let (sw, sb) = sums[bi * c + ci];
                    dw[ci] += sw;
                    db[ci] += sb;
                }
            }
            Ok((T::to_cpu_storage_owned(out), Shape::from(n + 2 * c)))
        })
    }
}

/// `x * w[c] + b[c]` for x [B, C, T] and per-channel w, b [C], differentiable in all three (the
/// composite's weight and bias gradients are candle reductions over two non-adjacent dims).
pub fn channel_affine(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (_, c, _) = x.dims3()?;
    if !fused(x) {
        let (w, b) = (w.reshape((1, c, 1))?, b.reshape((1, c, 1))?);
        return Ok(x.broadcast_mul(&w)?.broadcast_add(&b)?);
    }
    Ok(x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, ChannelAffine)?)
}

#[cfg(all(test, target_arch = "x86_64"))]
mod simd_tests {
    use super::*;

    #[test]
    fn avx512_gelu_kernels_give_the_avx2_bits() {
        if !has_avx512() {
            return; // nothing to compare on this CPU: only the AVX2 kernels run
        }
        let x: Vec<f32> = (0..5000).map(|i| (i as f32 - 2500.0) * 0.004 + if i % 7 == 0 { 1e-3 } else { 0.0 }).chain([0.0, -0.0, 40.0, -40.0, 1e-30, f32::MIN_POSITIVE]).collect();
        let g: Vec<f32> = x.iter().map(|v| 1.0 - 0.1 * v).collect();
        let (mut a, mut b) = (vec![0f32; x.len()], vec![0f32; x.len()]);
        // SAFETY: has_avx512 implies AVX2 and FMA.
        unsafe {
            gelu_slice_avx512(&mut a, &x);
            gelu_slice_avx2(&mut b, &x);
        }
        assert!(a.iter().zip(&b).all(|(a, b)| a.to_bits() == b.to_bits()));
        unsafe {
            gelu_grad_slice_avx512(&mut a, &x, &g);
            gelu_grad_slice_avx2(&mut b, &x, &g);
        }
        assert!(a.iter().zip(&b).all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}
