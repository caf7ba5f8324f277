//! Channels-last grouped 1-D convolution as gathered columns and batched gemms, on any device:
//! the GPU's alternative to cuDNN's channels-last kernels (`KLSPEECH_CONV_GEMM`; where it runs
//! by default: see below).
//!
//! Why: on the H200 (docs/PERFORMANCE.md, 2026-11-27) cuDNN ran wav2vec2's exact-f32
//! convolutions far from the gemm rate. The positional conv (K = 128, 16 groups of 48 channels)
//! became 16 per-group kernels, 19.6 ms an inference batch of 16 x 10 s for 75 GFLOP (about 1.5
//! ms at cuBLAS's f32 rate), and its input gradient 12.7 ms a training step; the feature
//! encoder's FMA implicit gemms took 29.6 ms for 0.78 TFLOP behind layout conversions. A
//! convolution is a gemm over gathered columns: with x [B, L, C_in] channels-last (padded by
//! p), frame t of group g reads the K runs `x[b, t s + k, g]` of C_g values, so one gather
//! (on a GPU klspeech's `kl_gather_taps`, a warp per row; elsewhere `index_select` along time)
//! writes the column matrix [G, B T, K C_g] and one strided batched gemm (cuBLAS on a GPU)
//! against the weight reordered to [G, K C_g, og] gives [G, B T, og].
//!
//! Memory: the columns are K / s times the input (the positional conv's 128 times), so they are
//! built for blocks of clips of at most [`COLUMN_BUDGET`] bytes (`KLSPEECH_CONV_GEMM_MIB`), and
//! within one clip for chunks of taps whose gemms accumulate, when a single clip's columns
//! exceed it (long clips).
//!
//! Backward (the training op [`super::conv1d_cl_recompute`]): the weight gradient is
//! dy_g^T [G, og, B T] x columns, rebuilt block by block; the input gradient of a stride-1
//! convolution is itself a stride-1 convolution of dy with the kernel flipped in time and its
//! channel axes swapped per group (so it runs [`forward`] too), and a strided one's is the
//! column gradient dy_g w_g [B, T, K, C_in] (one gemm) added back onto the input frames
//! ([`col2im`]: on a GPU one kernel, elsewhere by stride phase, [`col2im_phases`]).
//!
//! Stride-1 convolutions (the positional conv) gather their columns once per block for all
//! chunks of taps ([`Shift`], `KLSPEECH_CONV_SHIFT`): with the clips laid end to end, the
//! columns of taps `j n .. (j + 1) n` are those of taps `0 .. n`, `j n` rows on, so `K / n`
//! gemms read one matrix of n taps a row in place (n = [`SHIFT_TAPS`] = 16: 16 times the input
//! instead of 128).
//!
//! Where it runs: unset (or `auto`), on a CUDA device, strided convolutions (the feature
//! encoder) unless f32 runs with TF32 on (`--tf32`: cuDNN's tensor-core convolutions won on the
//! H200 of 2026-11-27, docs/PERFORMANCE.md), and stride-1 ones always on shared columns
//! (cuDNN's per-group kernels were 19.6 ms of an f32 inference batch of 16 x 10 s and ran f32
//! FMA kernels in bf16; not yet timed on a GPU: `KLSPEECH_CONV_SHIFT=off` restores the choice
//! that run measured for per-chunk columns, only when a gradient is taken and not in f32 with
//! TF32). Elsewhere `auto` means never (the CPU keeps its fused kernels).
//! `KLSPEECH_CONV_GEMM` = `all` (or `1`) for every convolution off the CPU's fused path, `pos`
//! for stride-1 convolutions, `fe` for strided ones, `0` (or `off`) for none (cuDNN or
//! candle's convolution). [`with_mode`] overrides it for one thread (the tests). Arithmetic is
//! cuBLAS's: f32 exact unless TF32 is on, bf16 / f16 with f32 accumulation.

use std::cell::Cell;
use std::sync::OnceLock;

use candle_core::{DType, Tensor};

use super::conv::Geom;

/// Upper bound on one gathered column block (bytes) unless `KLSPEECH_CONV_GEMM_MIB` sets
/// another: 256 MiB keeps the positional conv's columns (a 10 s clip: 196 MB in f32) to one
/// clip at a time and adds little to the peak.
pub const COLUMN_BUDGET: usize = 256 << 20;

/// [`COLUMN_BUDGET`], or `KLSPEECH_CONV_GEMM_MIB` MiB (read once; at least 1).
fn default_budget() -> usize {
    static BYTES: OnceLock<usize> = OnceLock::new();
    *BYTES.get_or_init(|| match std::env::var("KLSPEECH_CONV_GEMM_MIB") {
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(mib) if mib > 0 => mib << 20,
            _ => {
                eprintln!("klspeech: KLSPEECH_CONV_GEMM_MIB={v:?} is not a positive number of MiB: using {}", COLUMN_BUDGET >> 20);
                COLUMN_BUDGET
            }
        },
        Err(_) => COLUMN_BUDGET,
    })
}

/// Which convolutions run as gathered-column gemms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The default: on a CUDA device, strided convolutions unless f32 runs with TF32 on, and
    /// stride-1 ones always on shared columns ([`shift_taps`]; with those off, only when a
    /// gradient is taken and not in f32 with TF32 on); never on other devices ([`Mode::covers`]).
    Auto,
    /// None (cuDNN's or candle's convolutions).
    Off,
    /// Stride-1 convolutions (wav2vec2's positional conv).
    Stride1,
    /// Strided convolutions (wav2vec2's feature encoder).
    Strided,
    /// Every convolution.
    All,
}

impl Mode {
    /// `KLSPEECH_CONV_GEMM`'s value: `auto` (or unset, ""), `all` / `1`, `pos`, `fe`, or
    /// `0` / `off`.
    pub fn parse(v: &str) -> Option<Mode> {
        match v {
            "" | "auto" => Some(Mode::Auto),
            "0" | "off" => Some(Mode::Off),
            "1" | "all" => Some(Mode::All),
            "pos" => Some(Mode::Stride1),
            "fe" => Some(Mode::Strided),
            _ => None,
        }
    }

    /// Whether a convolution of `stride` runs as gemms in this mode: on a CUDA device
    /// (`cuda`) or not, in `dtype`, with TF32 on for f32 or not, taking a gradient (`training`)
    /// or not, with stride-1 convolutions on shared columns (`shifted`, [`shift_taps`]) or not.
    pub fn covers(self, stride: usize, training: bool, dtype: DType, cuda: bool, tf32: bool, shifted: bool) -> bool {
        let tf32_f32 = tf32 && dtype == DType::F32;
        match self {
            Mode::Auto => cuda && if stride > 1 { !tf32_f32 } else { shifted || (training && !tf32_f32) },
            Mode::Off => false,
            Mode::All => true,
            Mode::Stride1 => stride == 1,
            Mode::Strided => stride > 1,
        }
    }
}

/// Whether f32 products may use TF32 (`device::set_tf32`; candle's switch, also read by
/// cuDNN's channels-last path).
fn tf32_on() -> bool {
    #[cfg(feature = "cuda")]
    return candle_core::cuda_backend::gemm_reduced_precision_f32();
    #[cfg(not(feature = "cuda"))]
    false
}

thread_local! {
    static OVERRIDE: Cell<Option<Mode>> = const { Cell::new(None) };
    /// 0: the default ([`default_budget`]).
    static BUDGET: Cell<usize> = const { Cell::new(0) };
    static CALLS: Cell<Calls> = const { Cell::new(Calls { forward: 0, weight_grad: 0, input_grad: 0, gemms: 0, shifted: 0 }) };
    /// None: the default ([`env_shift`]).
    static SHIFT: Cell<Option<usize>> = const { Cell::new(None) };
}

/// What this thread ran here so far (for tests: proof that a path was taken).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Calls {
    /// [`forward`] calls.
    pub forward: usize,
    /// [`weight_grad`] calls.
    pub weight_grad: usize,
    /// [`input_grad`] calls.
    pub input_grad: usize,
    /// Partial products (one per block of clips and chunk of taps) in all of them.
    pub gemms: usize,
    /// [`forward`] / [`input_grad`] / [`weight_grad`] calls that ran shared columns (stride 1,
    /// [`shift_taps`]).
    pub shifted: usize,
}

impl Calls {
    /// The calls made after `before` was taken.
    pub fn since(&self, before: &Calls) -> Calls {
        Calls {
            forward: self.forward - before.forward,
            weight_grad: self.weight_grad - before.weight_grad,
            input_grad: self.input_grad - before.input_grad,
            gemms: self.gemms - before.gemms,
            shifted: self.shifted - before.shifted,
        }
    }
}

/// This thread's [`Calls`] so far.
pub fn calls() -> Calls {
    CALLS.with(|c| c.get())
}

fn count(f: impl FnOnce(&mut Calls)) {
    CALLS.with(|c| {
        let mut v = c.get();
        f(&mut v);
        c.set(v);
    });
}

/// The process's mode from `KLSPEECH_CONV_GEMM` (read once; an unknown value is reported on
/// stderr and taken as `auto`).
fn env_mode() -> Mode {
    static MODE: OnceLock<Mode> = OnceLock::new();
    *MODE.get_or_init(|| {
        let v = std::env::var("KLSPEECH_CONV_GEMM").unwrap_or_default();
        Mode::parse(&v).unwrap_or_else(|| {
            eprintln!("klspeech: KLSPEECH_CONV_GEMM={v:?} is not one of auto, all, 1, pos, fe, 0, off: using auto");
            Mode::Auto
        })
    })
}

/// The mode in force on this thread ([`with_mode`], else `KLSPEECH_CONV_GEMM`).
pub fn mode() -> Mode {
    OVERRIDE.with(|m| m.get()).unwrap_or_else(env_mode)
}

/// Runs `f` with this thread's convolutions in `mode`, then restores the thread's setting
/// (a thread-local override, so that tests running side by side do not switch each other).
pub fn with_mode<R>(mode: Mode, f: impl FnOnce() -> R) -> R {
    with_local(&OVERRIDE, Some(mode), f)
}

/// Runs `f` with the thread-local `key` set to `value`, then restores its value (also when `f`
/// panics: a failed test's setting does not leak into the next test on the thread).
fn with_local<T: Copy + 'static, R>(key: &'static std::thread::LocalKey<Cell<T>>, value: T, f: impl FnOnce() -> R) -> R {
    struct Restore<T: Copy + 'static>(&'static std::thread::LocalKey<Cell<T>>, T);
    impl<T: Copy + 'static> Drop for Restore<T> {
        fn drop(&mut self) {
            self.0.with(|c| c.set(self.1));
        }
    }
    let _restore = Restore(key, key.with(|c| c.replace(value)));
    f()
}

/// Runs `f` with this thread's column blocks limited to `bytes` (at least 1) instead of the
/// default (the tests: blocks of clips and chunks of taps on tiny shapes), then restores the
/// setting.
pub fn with_budget<R>(bytes: usize, f: impl FnOnce() -> R) -> R {
    with_local(&BUDGET, bytes.max(1), f)
}

/// Taps per row of a stride-1 convolution's shared columns ([`forward_shifted`]) unless
/// `KLSPEECH_CONV_SHIFT` sets another number (`0` or `off`: a column block per chunk of taps,
/// as strided convolutions). 16 taps of the positional conv's 48 channels a group make gemms
/// with a reduction of 768 and a column matrix 16 times the input (the per-chunk columns: 128
/// times), read by 8 gemms.
pub const SHIFT_TAPS: usize = 16;

/// [`SHIFT_TAPS`], or `KLSPEECH_CONV_SHIFT` (read once; an unknown value is reported on stderr
/// and taken as the default).
fn env_shift() -> usize {
    static TAPS: OnceLock<usize> = OnceLock::new();
    *TAPS.get_or_init(|| match std::env::var("KLSPEECH_CONV_SHIFT") {
        Err(_) => SHIFT_TAPS,
        Ok(v) => match v.trim() {
            "" => SHIFT_TAPS,
            "off" => 0,
            n => n.parse::<usize>().unwrap_or_else(|_| {
                eprintln!("klspeech: KLSPEECH_CONV_SHIFT={v:?} is not a number of taps or off: using {SHIFT_TAPS}");
                SHIFT_TAPS
            }),
        },
    })
}

/// Taps per row of the shared columns of stride-1 convolutions on this thread
/// ([`with_shift_taps`], else `KLSPEECH_CONV_SHIFT`, else [`SHIFT_TAPS`]); 0: none (per-chunk
/// columns).
pub fn shift_taps() -> usize {
    SHIFT.with(|t| t.get()).unwrap_or_else(env_shift)
}

/// Runs `f` with this thread's stride-1 convolutions on shared columns of `taps` taps a row
/// (0: per-chunk columns), then restores the setting.
pub fn with_shift_taps<R>(taps: usize, f: impl FnOnce() -> R) -> R {
    with_local(&SHIFT, Some(taps), f)
}

/// Whether a convolution of `stride` on `x` runs here, in the forward pass of a training step
/// (`training`, [`super::conv1d_cl_recompute`]) or without a gradient: the mode covers it and `x`
/// has a float type. (`ops::conv1d_cl` takes the CPU's fused kernels first, where they apply.)
pub fn applies(x: &Tensor, stride: usize, training: bool) -> bool {
    matches!(x.dtype(), DType::F32 | DType::F64 | DType::BF16 | DType::F16)
        && x.elem_count() > 0
        && mode().covers(stride, training, x.dtype(), x.device().is_cuda(), tf32_on(), shift_taps() > 0)
}

/// The geometry of x [B, L, C_in] * w [C_out, C_g, K] (checked), T the full output length.
fn sizes((b, l, c_in): (usize, usize, usize), (c_out, c_g, k): (usize, usize, usize), stride: usize, padding: usize, groups: usize) -> candle_core::Result<Geom> {
    let lp = l + 2 * padding;
    if groups == 0 || c_in != c_g * groups || c_out % groups != 0 || stride == 0 || lp < k {
        candle_core::bail!("klspeech conv (gemm): input [{b}, {l}, {c_in}] and kernel [{c_out}, {c_g}, {k}], {groups} groups, stride {stride}, padding {padding}")
    }
    Ok(Geom { b, l, c_in, c_out, k, stride, padding, groups, t: (lp - k) / stride + 1 })
}

/// (clips per block, taps per chunk): whole clips while their columns fit the budget,
/// else one clip at a time and as many taps as fit (at least one). candle's gather indexes
/// with 32-bit integers and `kl_gather_taps` takes 32-bit sizes, so a block's input and
/// columns also stay under 2^31 elements (an error if one clip's padded input or one tap of
/// its columns does not).
fn blocking(s: &Geom, dtype: DType) -> candle_core::Result<(usize, usize)> {
    const MAX_ELEMS: usize = (1 << 31) - 1;
    let elt = dtype.size_in_bytes();
    let (tap_elems, input_elems) = (s.t * s.c_in, s.lp() * s.c_in);
    if tap_elems > MAX_ELEMS || input_elems > MAX_ELEMS {
        candle_core::bail!(
            "klspeech conv (gemm): one clip of {} frames x {} channels is over 2^31 values; split the audio or set KLSPEECH_CONV_GEMM=off",
            s.lp(),
            s.c_in
        )
    }
    let budget = match BUDGET.with(|b| b.get()) {
        0 => default_budget(),
        b => b,
    }
    .min(MAX_ELEMS * elt);
    let (per_tap, per_clip) = (tap_elems * elt, tap_elems * elt * s.k);
    let by_input = (MAX_ELEMS / input_elems.max(1)).max(1);
    Ok(if per_clip <= budget {
        ((budget / per_clip.max(1)).clamp(1, s.b).min(by_input), s.k)
    } else {
        (1, (budget / per_tap.max(1)).clamp(1, s.k))
    })
}

/// The time indices of taps `k0 .. k0 + kc` of every output frame, frame-major: entry
/// t kc + j is `t s + k0 + j` (into the padded input).
fn tap_indices(s: &Geom, k0: usize, kc: usize, dev: &candle_core::Device) -> candle_core::Result<Tensor> {
    let idx: Vec<u32> = (0..s.t).flat_map(|t| (k0..k0 + kc).map(move |k| (t * s.stride + k) as u32)).collect();
    Tensor::from_vec(idx, s.t * kc, dev)
}

/// Clips `b0 .. b0 + bc` of x [B, L, C_in] as the group-major padded block [G bc, Lp, C_g].
fn padded_block(x: &Tensor, s: &Geom, b0: usize, bc: usize) -> candle_core::Result<Tensor> {
    let xb = x.narrow(0, b0, bc)?;
    let xb = if s.groups == 1 { xb } else { super::kernels::contiguous_rows(&xb.reshape((bc, s.l, s.groups, s.cg()))?.permute((2, 0, 1, 3))?)?.reshape((s.groups * bc, s.l, s.cg()))? };
    if s.padding > 0 {
        xb.pad_with_zeros(1, s.padding, s.padding)
    } else {
        Ok(xb)
    }
}

/// A tap chunk of a convolution: its first tap, its number of taps, and where the columns are
/// gathered by candle's `index_select`, its [`tap_indices`] (built once per call, not per
/// block: each is a host-to-device copy).
type Chunk = (usize, usize, Option<Tensor>);

/// The tap chunks of a convolution on x's device and type: on a GPU klspeech's gather kernel
/// computes the frames itself (`ops::kernels::gather_taps`), elsewhere `index_select` reads the
/// indices.
fn tap_chunks(s: &Geom, kc_max: usize, x: &Tensor) -> candle_core::Result<Vec<Chunk>> {
    let kernel = super::kernels::apply_any_float(x) && super::kernels::kernel_on("gather_taps");
    (0..s.k).step_by(kc_max).map(|k0| {
        let kc = kc_max.min(s.k - k0);
        Ok((k0, kc, if kernel { None } else { Some(tap_indices(s, k0, kc, x.device())?) }))
    }).collect()
}

/// The columns of a tap chunk of a padded block [G bc, Lp, C_g]: [G, bc T, kc C_g].
fn columns(xb: &Tensor, s: &Geom, bc: usize, (k0, kc, idx): &Chunk) -> candle_core::Result<Tensor> {
    let cols = match idx {
        Some(idx) => xb.index_select(idx, 1)?,
        None => super::kernels::gather_taps_of(xb, s.t, *k0, *kc, s.stride)?,
    };
    cols.reshape((s.groups, bc * s.t, kc * s.cg()))
}

/// A PyTorch weight [C_out, C_g, K] reordered to the columns' tap-major rows: [G, K C_g, og].
fn weight_rows(w: &Tensor, s: &Geom) -> candle_core::Result<Tensor> {
    w.reshape((s.groups, s.og(), s.cg(), s.k))?.permute((0, 3, 2, 1))?.contiguous()?.reshape((s.groups, s.k * s.cg(), s.og()))
}

/// Rows `k0 C_g ..` of the reordered weight for a tap chunk: [G, kc C_g, og] (a strided view
/// that cuBLAS takes as is: batch stride K C_g og, rows contiguous).
fn weight_chunk(wr: &Tensor, s: &Geom, k0: usize, kc: usize) -> candle_core::Result<Tensor> {
    if kc == s.k {
        Ok(wr.clone())
    } else {
        wr.narrow(1, k0 * s.cg(), kc * s.cg())
    }
}

/// y [B, T, C_out] (every output frame) = conv1d(x [B, L, C_in], w [C_out, C_in / groups, K]),
/// channels-last, without recording a gradient.
pub fn forward(x: &Tensor, w: &Tensor, stride: usize, padding: usize, groups: usize) -> candle_core::Result<Tensor> {
    let (x, w) = (x.detach().contiguous()?, w.detach());
    let s = sizes(x.dims3()?, w.dims3()?, stride, padding, groups)?;
    count(|c| c.forward += 1);
    forward_rows(&x, &weight_rows(&w, &s)?, &s)
}

/// [`forward`] with the weight already reordered ([`weight_rows`]).
fn forward_rows(x: &Tensor, wr: &Tensor, s: &Geom) -> candle_core::Result<Tensor> {
    if let Some(plan) = Shift::of(s) {
        return forward_shifted(x, wr, s, &plan);
    }
    let (bc_max, kc_max) = blocking(s, x.dtype())?;
    let chunks = tap_chunks(s, kc_max, x)?;
    let mut blocks = Vec::with_capacity(s.b.div_ceil(bc_max));
    let mut b0 = 0;
    while b0 < s.b {
        let bc = bc_max.min(s.b - b0);
        let xb = padded_block(x, s, b0, bc)?;
        let mut y: Option<Tensor> = None;
        for chunk in &chunks {
            // [G, bc T, kc C_g] x [G, kc C_g, og] -> [G, bc T, og]
            let part = columns(&xb, s, bc, chunk)?.matmul(&weight_chunk(wr, s, chunk.0, chunk.1)?)?;
            count(|c| c.gemms += 1);
            accumulate(&mut y, part)?;
        }
        let y = y.expect("a kernel has at least one tap");
        // [G, bc T, og] -> [bc, T, C_out] (for one group a plain reshape)
        blocks.push(if s.groups == 1 { y.reshape((bc, s.t, s.c_out))? } else { super::kernels::contiguous_rows(&y.reshape((s.groups, bc, s.t, s.og()))?.permute((1, 2, 0, 3))?)?.reshape((bc, s.t, s.c_out))? });
        b0 += bc;
    }
    if blocks.len() == 1 {
        Ok(blocks.remove(0))
    } else {
        Tensor::cat(&blocks, 0)
    }
}

/// dy [B, T, C_out] as group-major rows [G, B T, og].
fn dy_groups(dy: &Tensor, s: &Geom) -> candle_core::Result<Tensor> {
    if s.groups == 1 {
        dy.reshape((1, s.b * s.t, s.c_out))
    } else {
        super::kernels::contiguous_rows(&dy.reshape((s.b * s.t, s.groups, s.og()))?.transpose(0, 1)?)
    }
}

/// The weight gradient [C_out, C_in / groups, K] of `forward(x, w)` for the output gradient
/// dy [B, T, C_out] over every output frame (zeros for frames a caller dropped).
pub fn weight_grad(x: &Tensor, dy: &Tensor, w_dims: (usize, usize, usize), stride: usize, padding: usize, groups: usize) -> candle_core::Result<Tensor> {
    let x = x.detach().contiguous()?;
    let s = sizes(x.dims3()?, w_dims, stride, padding, groups)?;
    count(|c| c.weight_grad += 1);
    if let Some(plan) = Shift::of(&s) {
        return weight_grad_shifted(&x, &dy.contiguous()?, &s, &plan);
    }
    let dyg = dy_groups(&dy.contiguous()?, &s)?; // [G, B T, og]
    let (bc_max, kc_max) = blocking(&s, x.dtype())?;
    // One accumulator per tap chunk: [G, og, kc C_g].
    let chunks = tap_chunks(&s, kc_max, &x)?;
    let mut acc: Vec<Option<Tensor>> = vec![None; chunks.len()];
    let mut b0 = 0;
    while b0 < s.b {
        let bc = bc_max.min(s.b - b0);
        let xb = padded_block(&x, &s, b0, bc)?;
        // [G, og, bc T] (a transposed view that cuBLAS reads in place)
        let dyt = dyg.narrow(1, b0 * s.t, bc * s.t)?.transpose(1, 2)?;
        for (a, chunk) in acc.iter_mut().zip(&chunks) {
            let part = dyt.matmul(&columns(&xb, &s, bc, chunk)?)?;
            count(|c| c.gemms += 1);
            accumulate(a, part)?;
        }
        b0 += bc;
    }
    weight_of_chunks(acc, &s)
}

/// `acc + part`, or `part` for the first.
fn accumulate(acc: &mut Option<Tensor>, part: Tensor) -> candle_core::Result<()> {
    *acc = Some(match acc.take() {
        Some(a) => (a + part)?,
        None => part,
    });
    Ok(())
}

/// The weight gradient from its tap chunks' parts [G, og, kc C_g] side by side (taps past K,
/// a shared-columns chunk's zero padding, dropped): [C_out, C_g, K].
fn weight_of_chunks(acc: Vec<Option<Tensor>>, s: &Geom) -> candle_core::Result<Tensor> {
    let parts: Vec<Tensor> = acc.into_iter().map(|a| a.expect("every chunk saw a block")).collect();
    let dw = if parts.len() == 1 { parts.into_iter().next().expect("one part") } else { Tensor::cat(&parts, 2)? };
    // [G, og, K C_g] -> [G, og, K, C_g] -> [C_out, C_g, K]
    dw.narrow(2, 0, s.k * s.cg())?.reshape((s.groups, s.og(), s.k, s.cg()))?.permute((0, 1, 3, 2))?.contiguous()?.reshape((s.c_out, s.cg(), s.k))
}

/// The input gradient dx [B, L, C_in] of `forward(x, w)` for dy [B, T, C_out] over every output
/// frame. Stride 1: the flipped-kernel convolution of dy (padding K - 1 - p) through
/// [`forward`]'s gemms; strided: the column gradient added back by phase.
pub fn input_grad(dy: &Tensor, w: &Tensor, l: usize, stride: usize, padding: usize, groups: usize) -> candle_core::Result<Tensor> {
    let (dy, w) = (dy.contiguous()?, w.detach());
    let (b, _t, _c_out) = dy.dims3()?;
    let (c_out, c_g, k) = w.dims3()?;
    let s = sizes((b, l, c_g * groups), (c_out, c_g, k), stride, padding, groups)?;
    count(|c| c.input_grad += 1);
    if stride == 1 && padding < k {
        // The transposed convolution: input channels C_out (og per group), output C_in (C_g per
        // group), taps reversed: rows [G, K og, C_g] with row (k, o) = w[g og + o, :, K - 1 - k].
        let wt = flip_taps(&w.reshape((groups, c_out / groups, c_g, k))?)?.permute((0, 3, 1, 2))?.contiguous()?.reshape((groups, k * (c_out / groups), c_g))?;
        let st = Geom { b, l: s.t, c_in: c_out, c_out: c_g * groups, k, stride: 1, padding: k - 1 - padding, groups, t: l };
        debug_assert_eq!(st.lp() - k + 1, l);
        return forward_rows(&dy, &wt, &st);
    }
    // Column gradient [G, B T, og] x [G, og, K C_g] -> [G, B T, K C_g], laid out as
    // [B, T, K, C_in] (a permute for grouped strided convolutions, which wav2vec2 has none of).
    let wr = weight_rows(&w, &s)?; // [G, K C_g, og]
    let dcols = dy_groups(&dy, &s)?.matmul(&wr.transpose(1, 2)?)?;
    let dcols = if groups == 1 {
        dcols.reshape((s.b, s.t, s.k, s.c_in))?
    } else {
        dcols.reshape((groups, s.b, s.t, s.k, s.cg()))?.permute((1, 2, 3, 0, 4))?.contiguous()?.reshape((s.b, s.t, s.k, s.c_in))?
    };
    col2im(&dcols, (l, stride, padding))
}

/// A stride-1 convolution on shared columns. With the clips of a block laid end to end in one
/// group-major sequence, each followed by P zero frames after P leading ones (so clip b's
/// padded input is frames `b (L + P) ..` and its output frame t is sequence position
/// `b (L + P) + t`), row n of the columns holds the `taps` frames `n .. n + taps` (on a GPU one
/// `kl_gather_taps`, a column matrix `taps` times the input), and the columns of taps
/// `j taps .. (j + 1) taps` of position n are row `n + j taps`: chunk j's columns are the same
/// matrix `j taps` rows on, a view that cuBLAS reads in place. So one gather serves every
/// chunk, where per-chunk columns gather K times the input (the positional conv: 128 times,
/// 3.1 GB an f32 inference batch of 16 x 10 s). The positions between clips (P - K + 1 + P
/// of every L + P; 11 % of the positional conv's at 10 s) are computed and dropped. Needs
/// P < K (else a clip's outputs overrun its slot).
struct Shift {
    /// Taps per column row.
    taps: usize,
    /// Chunks of `taps` taps covering K (the last one padded with zero taps in the weight).
    chunks: usize,
    /// Frames per clip in the sequence, L + P.
    slot: usize,
}

impl Shift {
    /// The plan for `s` if shared columns apply: stride 1, P < K, [`shift_taps`] not 0.
    fn of(s: &Geom) -> Option<Shift> {
        let taps = shift_taps().min(s.k);
        (s.stride == 1 && taps > 0 && s.padding < s.k).then(|| Shift { taps, chunks: s.k.div_ceil(taps), slot: s.l + s.padding })
    }

    /// Output positions of a block of `bc` clips (bc slots) and the column rows they read.
    fn rows(&self, bc: usize) -> (usize, usize) {
        let n_out = bc * self.slot;
        (n_out, n_out + (self.chunks - 1) * self.taps)
    }

    /// Clips per block: as many as keep the columns within the budget and 2^31 values
    /// (`kl_gather_taps`' 32-bit sizes), at least one (an error if one clip is too long).
    fn clips_per_block(&self, s: &Geom, dtype: DType) -> candle_core::Result<usize> {
        const MAX_ELEMS: usize = (1 << 31) - 1;
        let cols = |bc: usize| self.rows(bc).1 * self.taps * s.c_in;
        if cols(1) > MAX_ELEMS {
            candle_core::bail!(
                "klspeech conv (gemm): one clip of {} frames x {} channels makes over 2^31 column values; split the audio or set KLSPEECH_CONV_SHIFT=off",
                s.l,
                s.c_in
            )
        }
        let budget = match BUDGET.with(|b| b.get()) {
            0 => default_budget(),
            b => b,
        };
        let per_clip = self.slot * self.taps * s.c_in * dtype.size_in_bytes();
        let mut bc = (budget / per_clip.max(1)).clamp(1, s.b);
        while bc > 1 && cols(bc) > MAX_ELEMS {
            bc -= 1;
        }
        Ok(bc)
    }

    /// Clips `b0 .. b0 + bc` of x [B, L, C_in] as the group-major sequence [G, F, C_g]:
    /// P zero frames, each clip followed by P zero frames, zero frames up to
    /// F = bc (L + P) + chunks taps - 1 (the last row's last frame; at least P + bc (L + P)
    /// since chunks taps >= K > P).
    fn sequence(&self, x: &Tensor, s: &Geom, b0: usize, bc: usize) -> candle_core::Result<Tensor> {
        // [bc, L, G, C_g] -> [G, bc, L, C_g]
        let xg = super::kernels::contiguous_rows(&x.narrow(0, b0, bc)?.reshape((bc, s.l, s.groups, s.cg()))?.permute((2, 0, 1, 3))?)?;
        let xg = xg.pad_with_zeros(2, 0, s.padding)?.reshape((s.groups, bc * self.slot, s.cg()))?;
        let frames = bc * self.slot + self.chunks * self.taps - 1;
        xg.pad_with_zeros(1, s.padding, frames - s.padding - bc * self.slot)
    }

    /// The shared columns of a sequence [G, F, C_g]: [G, rows, taps C_g], row n the frames
    /// `n .. n + taps`.
    fn columns(&self, seq: &Tensor, rows: usize) -> candle_core::Result<Tensor> {
        let (g, _, cg) = seq.dims3()?;
        let cols = if super::kernels::apply_any_float(seq) && super::kernels::kernel_on("gather_taps") {
            super::kernels::gather_taps_of(seq, rows, 0, self.taps, 1)?
        } else {
            let idx: Vec<u32> = (0..rows).flat_map(|n| (n..n + self.taps).map(|f| f as u32)).collect();
            seq.index_select(&Tensor::from_vec(idx, rows * self.taps, seq.device())?, 1)?
        };
        cols.reshape((g, rows, self.taps * cg))
    }

    /// Chunk j of the shared columns of a block: [G, N, taps C_g] (rows `j taps ..`).
    fn chunk(&self, cols: &Tensor, j: usize, n_out: usize) -> candle_core::Result<Tensor> {
        cols.narrow(1, j * self.taps, n_out)
    }
}

/// [`forward_rows`] on shared columns ([`Shift`]): per block of clips one gather, then one
/// gemm per chunk of taps, [G, N, taps C_g] x [G, taps C_g, og], summed (in f32 for half
/// types: each partial product is rounded once, the sum not again per chunk).
fn forward_shifted(x: &Tensor, wr: &Tensor, s: &Geom, plan: &Shift) -> candle_core::Result<Tensor> {
    count(|c| c.shifted += 1);
    let (cg, og) = (s.cg(), s.og());
    // [G, K C_g, og] -> [G, chunks taps C_g, og] (zero taps after K)
    let pad = (plan.chunks * plan.taps - s.k) * cg;
    let wp = if pad > 0 { wr.pad_with_zeros(1, 0, pad)? } else { wr.clone() };
    let half = matches!(x.dtype(), DType::BF16 | DType::F16) && plan.chunks > 1;
    let bc_max = plan.clips_per_block(s, x.dtype())?;
    let mut blocks = Vec::with_capacity(s.b.div_ceil(bc_max));
    let mut b0 = 0;
    while b0 < s.b {
        let bc = bc_max.min(s.b - b0);
        let (n_out, rows) = plan.rows(bc);
        let cols = plan.columns(&plan.sequence(x, s, b0, bc)?, rows)?;
        let mut y: Option<Tensor> = None;
        for j in 0..plan.chunks {
            let part = plan.chunk(&cols, j, n_out)?.matmul(&wp.narrow(1, j * plan.taps * cg, plan.taps * cg)?)?;
            count(|c| c.gemms += 1);
            let part = if half { part.to_dtype(DType::F32)? } else { part };
            accumulate(&mut y, part)?;
        }
        let y = y.expect("a kernel has at least one tap").to_dtype(x.dtype())?;
        // [G, bc slot, og] -> the first T positions of each slot -> [bc, T, C_out]
        let y = y.reshape((s.groups, bc, plan.slot, og))?.narrow(2, 0, s.t)?;
        blocks.push(super::kernels::contiguous_rows(&y.permute((1, 2, 0, 3))?)?.reshape((bc, s.t, s.c_out))?);
        b0 += bc;
    }
    if blocks.len() == 1 {
        Ok(blocks.remove(0))
    } else {
        Tensor::cat(&blocks, 0)
    }
}

/// [`weight_grad`] on shared columns ([`Shift`]): dy laid out as the output positions (zeros
/// between clips), and per block and chunk j one gemm dy^T [G, og, N] x chunk j
/// [G, N, taps C_g], the chunks side by side giving [G, og, K C_g].
fn weight_grad_shifted(x: &Tensor, dy: &Tensor, s: &Geom, plan: &Shift) -> candle_core::Result<Tensor> {
    count(|c| c.shifted += 1);
    let og = s.og();
    // dy [B, T, C_out] -> [G, B, slot, og], zero frames after each clip's T
    let dyg = super::kernels::contiguous_rows(&dy.reshape((s.b, s.t, s.groups, og))?.permute((2, 0, 1, 3))?)?;
    let dyg = dyg.pad_with_zeros(2, 0, plan.slot - s.t)?;
    let bc_max = plan.clips_per_block(s, x.dtype())?;
    let mut acc: Vec<Option<Tensor>> = vec![None; plan.chunks];
    let mut b0 = 0;
    while b0 < s.b {
        let bc = bc_max.min(s.b - b0);
        let (n_out, rows) = plan.rows(bc);
        let cols = plan.columns(&plan.sequence(x, s, b0, bc)?, rows)?;
        // [G, og, bc slot] (a transposed view that cuBLAS reads in place)
        let dyt = dyg.narrow(1, b0, bc)?.reshape((s.groups, n_out, og))?.transpose(1, 2)?;
        for (j, a) in acc.iter_mut().enumerate() {
            let part = dyt.matmul(&plan.chunk(&cols, j, n_out)?)?;
            count(|c| c.gemms += 1);
            accumulate(a, part)?;
        }
        b0 += bc;
    }
    weight_of_chunks(acc, s)
}

/// [`col2im_phases`] on a GPU as one kernel (`ops::kernels::col2im`: the same sums in the
/// same order, each input frame written once, where the phases cost a tensor op per tap and
/// several strided copies of the input's size), elsewhere the phases.
pub(crate) fn col2im(dcols: &Tensor, (l, s, padding): (usize, usize, usize)) -> candle_core::Result<Tensor> {
    if super::kernels::apply_any_float(dcols) && super::kernels::kernel_on("col2im") {
        return super::kernels::col2im_of(dcols, l, s, padding);
    }
    col2im_phases(dcols, (l, s, padding))
}

/// Adds a column gradient dcols [B, T, K, C] back onto the input frames it read: dx [B, L, C]
/// for a convolution of `stride` with `padding` over L frames. Tap j = q s + r of frame t lands
/// on padded input frame (t + q) s + r, so with the padded input viewed as [B, Lq, s, C], phase
/// r is the sum of its taps' [B, T, C] blocks shifted by q frames.
pub fn col2im_phases(dcols: &Tensor, (l, s, padding): (usize, usize, usize)) -> candle_core::Result<Tensor> {
    let (b, t, k, c) = dcols.dims4()?;
    let lq = (t + (k - 1) / s).max((l + 2 * padding).div_ceil(s));
    let mut phases = Vec::with_capacity(s);
    for r in 0..s {
        let mut acc: Option<Tensor> = None;
        for q in (0..).take_while(|q| q * s + r < k) {
            let tap = dcols.narrow(2, q * s + r, 1)?.squeeze(2)?.pad_with_zeros(1, q, lq - t - q)?;
            acc = Some(match acc {
                Some(a) => (a + tap)?,
                None => tap,
            });
        }
        let acc = match acc {
            Some(a) => a,
            None => Tensor::zeros((b, lq, c), dcols.dtype(), dcols.device())?,
        };
        phases.push(acc.unsqueeze(2)?);
    }
    // [B, Lq, s, C] -> [B, Lq s, C] -> the unpadded frames
    Tensor::cat(&phases, 2)?.reshape((b, lq * s, c))?.narrow(1, padding, l)
}

/// A kernel with its taps (last axis) reversed.
fn flip_taps(w: &Tensor) -> candle_core::Result<Tensor> {
    let k = w.dim(candle_core::D::Minus1)?;
    let rev = Tensor::from_vec((0..k as u32).rev().collect::<Vec<u32>>(), k, w.device())?;
    w.index_select(&rev, w.rank() - 1)
}
