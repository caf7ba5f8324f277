//! klspeech's CUDA kernels (`src/ops/cuda/kernels.cu`, f32): a standardization's forward and
//! backward, the softmax's backward (with the attention's dropout mask and scale) and the exact
//! GELU's forward and backward, each one launch where candle's composition is 5 to 15 kernels.
//!
//! A [`Launch`] is a kernel's launch plan (name, grid, block, arguments in the kernel's
//! order); the GPU launcher (`launch`, `--features cuda`) and the CPU emulator that tests the
//! kernels (`tests/cuda_kernels.rs`, `tests/cuda_emu`) both run these plans, so the argument
//! order and the launch shapes are tested where there is no GPU. The ops in [`super::device`]
//! use them on a CUDA device for f32 tensors, unless `KLSPEECH_NO_CUDA_KERNELS=1` (then
//! candle's kernels, as before).


use candle_core::{DType, Tensor};

/// One argument of a kernel launch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arg {
    /// The k-th buffer handed to the launch (inputs and outputs, in the kernel's order).
    Buf(usize),
    /// A null pointer (an optional input left out).
    Null,
    I32(i32),
    F32(f32),
    U64(u64),
}

/// A kernel's launch: `name<<<grid, block>>>(args)`, 1-D.
#[derive(Debug, Clone, PartialEq)]
pub struct Launch {
    pub name: &'static str,
    pub grid: u32,
    pub block: u32,
    pub args: Vec<Arg>,
}

/// Threads per block for a row kernel over rows of `d`: a power of two from 32 to 256, about
/// one element per thread for short rows (attention rows of T, channels of 768 take 256).
pub fn row_block(d: usize) -> u32 {
    d.next_power_of_two().clamp(32, 256) as u32
}

fn i32_of(n: usize) -> i32 {
    i32::try_from(n).expect("klspeech kernels: a dimension over 2^31")
}

/// A row kernel's plan: one block per row of `d`, buffers 0..`buffers`, then rows, d and
/// `extra`.
fn row_plan(name: &'static str, rows: usize, d: usize, buffers: usize, extra: &[Arg]) -> Launch {
    let mut args: Vec<Arg> = (0..buffers).map(Arg::Buf).collect();
    args.extend([Arg::I32(i32_of(rows)), Arg::I32(i32_of(d))]);
    args.extend_from_slice(extra);
    Launch { name, grid: rows as u32, block: row_block(d), args }
}

/// A column-summing backward's plan: [`klnorm_bwd_chunk`] rows per block, buffers
/// 0..`buffers`, then rows, d, `extra` and the chunk.
fn chunked_plan(name: &'static str, rows: usize, d: usize, buffers: usize, extra: &[Arg]) -> Launch {
    let chunk = klnorm_bwd_chunk(rows);
    let mut plan = row_plan(name, rows, d, buffers, extra);
    plan.grid = rows.div_ceil(chunk).max(1) as u32;
    plan.args.push(Arg::I32(i32_of(chunk)));
    plan
}

/// An elementwise plan over `n` items (the kernels stride): 256 threads a block, at most 4096
/// blocks; buffers 0..`buffers`, then n and `extra`.
fn elementwise(name: &'static str, n: usize, buffers: usize, extra: &[Arg]) -> Launch {
    let mut args: Vec<Arg> = (0..buffers).map(Arg::Buf).collect();
    args.push(Arg::I32(i32_of(n)));
    args.extend_from_slice(extra);
    Launch { name, grid: n.div_ceil(256).clamp(1, 4096) as u32, block: 256, args }
}

/// A kernel's name for `dtype`: the f32 instance, or its `_bf16` / `_f16` one (the kernels
/// that have them: loads converted to f32, each store rounded once).
fn typed(f32_name: &'static str, bf16_name: &'static str, f16_name: &'static str, dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => bf16_name,
        DType::F16 => f16_name,
        _ => f32_name,
    }
}

/// y = (x - mean) / sqrt(var + eps) per row: buffers [x, y], each [rows, d], of `dtype` (f32,
/// bf16, f16).
pub fn standardize_fwd(rows: usize, d: usize, eps: f64, dtype: DType) -> Launch {
    row_plan(typed("kl_standardize_fwd", "kl_standardize_fwd_bf16", "kl_standardize_fwd_f16", dtype), rows, d, 2, &[Arg::F32(eps as f32)])
}

/// The standardization's backward: buffers [x, y, g, dx], each [rows, d], of `dtype`.
pub fn standardize_bwd(rows: usize, d: usize, eps: f64, dtype: DType) -> Launch {
    row_plan(typed("kl_standardize_bwd", "kl_standardize_bwd_bf16", "kl_standardize_bwd_f16", dtype), rows, d, 4, &[Arg::F32(eps as f32)])
}

/// The softmax's backward, dx = scale y (g m - sum(g m y)) per row: buffers [y, g, mask, dx]
/// with a dropout mask m, [y, g, dx] without (the mask argument is then a null pointer), of
/// `dtype`.
pub fn softmax_bwd(rows: usize, d: usize, scale: f64, masked: bool, dtype: DType) -> Launch {
    let name = typed("kl_softmax_bwd", "kl_softmax_bwd_bf16", "kl_softmax_bwd_f16", dtype);
    let mut plan = row_plan(name, rows, d, if masked { 4 } else { 3 }, &[Arg::F32(scale as f32)]);
    if !masked {
        plan.args.insert(2, Arg::Null);
    }
    plan
}

/// The exact GELU: buffers [x, y] of n, of `dtype`.
pub fn gelu_fwd(n: usize, dtype: DType) -> Launch {
    elementwise(typed("kl_gelu_fwd", "kl_gelu_fwd_bf16", "kl_gelu_fwd_f16", dtype), n, 2, &[])
}

/// The GELU's backward: buffers [x, g, dx] of n, of `dtype`.
pub fn gelu_bwd(n: usize, dtype: DType) -> Launch {
    elementwise(typed("kl_gelu_bwd", "kl_gelu_bwd_bf16", "kl_gelu_bwd_f16", dtype), n, 3, &[])
}

/// The attention's probabilities from its scores: buffers [s, kb, p] with a key bias, [s, p]
/// without (the kb argument then a null pointer), of `dtype`; s and p [rows, ld], kb
/// [rows / rows_per_clip, d]. p = softmax(scale s + kb) over the first d of each row, zeros in
/// the other ld - d (keys padded for aligned gemms).
pub fn attn_softmax(rows: usize, ld: usize, d: usize, rows_per_clip: usize, scale: f64, biased: bool, dtype: DType) -> Launch {
    let name = typed("kl_attn_softmax", "kl_attn_softmax_bf16", "kl_attn_softmax_f16", dtype);
    let mut plan = row_plan(name, rows, ld, if biased { 3 } else { 2 }, &[Arg::I32(i32_of(d)), Arg::I32(i32_of(rows_per_clip.max(1))), Arg::F32(scale as f32)]);
    if !biased {
        plan.args.insert(1, Arg::Null);
    }
    // (row_plan sized the block by ld; the columns past d only get zeros.)
    plan
}

/// A KL-Norm site after its standardization: buffers [xh, p, noise, out] of `dtype` (f32,
/// bf16, f16), xh and noise [rows, d], p [4, d] ([6, d] with a `learned` prior), out
/// [rows * d + rows] (y, then the KL per row, each rounded once to the type).
pub fn klnorm_fwd(rows: usize, d: usize, learned: bool, dtype: DType) -> Launch {
    row_plan(typed("kl_klnorm_fwd", "kl_klnorm_fwd_bf16", "kl_klnorm_fwd_f16", dtype), rows, d, 4, &[Arg::I32(learned as i32)])
}

/// Rows per block of the column-summing backwards: about 256 blocks over the rows.
pub fn klnorm_bwd_chunk(rows: usize) -> usize {
    rows.div_ceil(256).max(1)
}

/// Its backward: buffers [xh, p, noise, g, out] of `dtype`, g [rows * d + rows] (the output's
/// gradient), out [`packed_len`]`(rows * d, blocks * np * d)`: the gradient of xh, then each
/// block's column sums of the parameters' gradients (np = 4 or 6) in f32 from
/// [`tail_offset`], for [`colsum`] over the blocks.
pub fn klnorm_bwd(rows: usize, d: usize, learned: bool, dtype: DType) -> Launch {
    chunked_plan(typed("kl_klnorm_bwd", "kl_klnorm_bwd_bf16", "kl_klnorm_bwd_f16", dtype), rows, d, 5, &[Arg::I32(learned as i32)])
}

/// Where the f32 partial sums of a column-summing backward (KL-Norm, LayerNorm, GroupNorm)
/// start in its output of `dtype`, counted in elements of that type, after its `n` gradient
/// values: at `n` for f32; for bf16 / f16 at `n` rounded up to even, so that the sums, stored
/// as f32 inside the 16-bit buffer (two elements each), are 4-byte aligned. (The half-type
/// backwards round each gradient once and keep the sums in f32: a sum over 256 rows rounded
/// to bf16 would lose the eight bits the f32 path keeps.)
pub fn tail_offset(n: usize, dtype: DType) -> usize {
    match dtype {
        DType::BF16 | DType::F16 => n.next_multiple_of(2),
        _ => n,
    }
}

/// The length, in elements of `dtype`, of a column-summing backward's output: `n` gradient
/// values, then `sums` f32 partial sums from [`tail_offset`].
pub fn packed_len(n: usize, sums: usize, dtype: DType) -> usize {
    tail_offset(n, dtype) + sums * (4 / dtype.size_in_bytes().clamp(1, 4))
}

/// Column sums over `blocks` partial rows of `width`: buffers [partial, out], both f32 (the
/// partial sums of a half-type backward are f32 values inside its 16-bit output).
pub fn colsum(blocks: usize, width: usize) -> Launch {
    elementwise("kl_colsum", width, 2, &[Arg::I32(i32_of(blocks))])
}

/// Inference's bias, residual and LayerNorm in one pass (a post-norm transformer's output
/// projections): buffers [y, r, p [3 d] = [bias; w; b], out] of `dtype`, y, r and out
/// [rows, d]; out = LayerNorm((y + bias) + r), the sums rounded as the separate adds round them.
pub fn residual_layer_norm(rows: usize, d: usize, eps: f64, dtype: DType) -> Launch {
    row_plan(typed("kl_residual_layer_norm", "kl_residual_layer_norm_bf16", "kl_residual_layer_norm_f16", dtype), rows, d, 4, &[Arg::F32(eps as f32)])
}

/// The widest rows the LayerNorm backward takes (its column sums live in shared memory).
pub const LAYER_NORM_MAX_D: usize = 4096;

/// LayerNorm: buffers [x, w, b, y] of `dtype` (f32, bf16, f16), x and y [rows, d], w and b [d].
pub fn layer_norm_fwd(rows: usize, d: usize, eps: f64, dtype: DType) -> Launch {
    row_plan(typed("kl_layer_norm_fwd", "kl_layer_norm_fwd_bf16", "kl_layer_norm_fwd_f16", dtype), rows, d, 4, &[Arg::F32(eps as f32)])
}

/// Its backward: buffers [x, w, g, out] of `dtype`, out [`packed_len`]`(rows * d,
/// blocks * 2 * d)`: dx, then each block's f32 column sums [g x̂; g] from [`tail_offset`] for
/// [`colsum`] (dw, db).
pub fn layer_norm_bwd(rows: usize, d: usize, eps: f64, dtype: DType) -> Launch {
    chunked_plan(typed("kl_layer_norm_bwd", "kl_layer_norm_bwd_bf16", "kl_layer_norm_bwd_f16", dtype), rows, d, 4, &[Arg::F32(eps as f32)])
}

/// Channels per block of the channels-last GroupNorm kernels (threads: 32 time lanes of these,
/// `KL_GN_LANES` in the kernels).
const GROUP_NORM_TILE: usize = 32;

/// A channels-last GroupNorm plan: one block of 1024 threads per (clip, tile of 32 channels).
fn group_norm_plan(name: &'static str, b: usize, t: usize, c: usize, buffers: usize, extra: &[Arg]) -> Launch {
    let mut args: Vec<Arg> = (0..buffers).map(Arg::Buf).collect();
    args.extend([Arg::I32(i32_of(b)), Arg::I32(i32_of(t)), Arg::I32(i32_of(c))]);
    args.extend_from_slice(extra);
    Launch { name, grid: group_norm_grid(b, c), block: 1024, args }
}

/// One block per (clip, tile of 32 channels).
fn group_norm_grid(b: usize, c: usize) -> u32 {
    u32::try_from(b * c.div_ceil(GROUP_NORM_TILE)).expect("klspeech kernels: grid over 2^32")
}

/// Per-channel GroupNorm over the frames of channels-last x [b, t, c], then the exact GELU when
/// `gelu`: buffers [x, w, b, y], w and b [c], all of `dtype`: f32, or bf16 / f16 (inference in
/// those types; the kernel computes in f32 with f64 statistics all the same).
pub fn group_norm_cl_fwd(b: usize, t: usize, c: usize, eps: f64, gelu: bool, dtype: DType) -> Launch {
    let name = match dtype {
        DType::BF16 => "kl_group_norm_cl_fwd_bf16",
        DType::F16 => "kl_group_norm_cl_fwd_f16",
        _ => "kl_group_norm_cl_fwd",
    };
    group_norm_plan(name, b, t, c, 4, &[Arg::F32(eps as f32), Arg::I32(gelu as i32)])
}

/// [`group_norm_cl_fwd`] with padding-aware statistics: buffers [x, w, b, mask, y], mask
/// [b, t] of `dtype` (1 for a clip's valid frames, 0 for its padding): each (clip, channel)'s
/// mean and variance over the frames whose mask is not 0, every frame normalized with them.
pub fn group_norm_cl_masked_fwd(b: usize, t: usize, c: usize, eps: f64, gelu: bool, dtype: DType) -> Launch {
    let name = typed("kl_group_norm_cl_masked_fwd", "kl_group_norm_cl_masked_fwd_bf16", "kl_group_norm_cl_masked_fwd_f16", dtype);
    group_norm_plan(name, b, t, c, 5, &[Arg::F32(eps as f32), Arg::I32(gelu as i32)])
}

/// The most taps [`conv1_group_norm_gelu`] takes (`KL_C1_MAX_K` in the kernel: each thread
/// keeps its channel's taps in registers).
pub const CONV1_MAX_K: usize = 12;

/// Inference through a one-channel convolution, per-channel GroupNorm and the exact GELU in
/// one kernel (wav2vec2-base's first feature-encoder layer): buffers [x [b, l], w [c, k],
/// p [GroupNorm weight; bias] [2 c], y [b, t, c]] of `dtype` (f32, bf16, f16), t = (l - k) /
/// stride + 1, k at most [`CONV1_MAX_K`]; launched as [`group_norm_cl_fwd`].
#[allow(clippy::too_many_arguments)]
pub fn conv1_group_norm_gelu(b: usize, l: usize, t: usize, c: usize, k: usize, stride: usize, eps: f64, dtype: DType) -> Launch {
    assert!(k <= CONV1_MAX_K, "klspeech conv1_group_norm_gelu: {k} taps, at most {CONV1_MAX_K}");
    let name = typed("kl_conv1_group_norm_gelu", "kl_conv1_group_norm_gelu_bf16", "kl_conv1_group_norm_gelu_f16", dtype);
    let mut args: Vec<Arg> = (0..4).map(Arg::Buf).collect();
    args.extend([b, l, t, c, k, stride].map(|v| Arg::I32(i32_of(v))));
    args.push(Arg::F32(eps as f32));
    Launch { name, grid: group_norm_grid(b, c), block: 1024, args }
}

/// y += b over y's rows in place, then with `gelu` the exact GELU: buffers [y [rows, d], b [d]],
/// both of `dtype` (f32, bf16 or f16; the sum in f32 rounded once, the GELU of that in f32
/// rounded once). 256 columns a block, blocks over (row groups x column tiles), about 1024 of
/// them at most (an H100 / H200 holds some 270 000 threads at once: one wave), each thread
/// walking its column down every `row_groups`-th row.
pub fn bias_add(rows: usize, d: usize, dtype: DType, gelu: bool) -> Launch {
    let name = match dtype {
        DType::BF16 => "kl_bias_add_bf16",
        DType::F16 => "kl_bias_add_f16",
        _ => "kl_bias_add",
    };
    let tiles = d.div_ceil(256).max(1);
    let row_groups = (1024 / tiles).clamp(1, rows.max(1));
    let grid = u32::try_from(tiles * row_groups).expect("klspeech kernels: grid over 2^32");
    let args = vec![Arg::Buf(0), Arg::Buf(1), Arg::I32(i32_of(rows)), Arg::I32(i32_of(d)), Arg::I32(i32_of(row_groups)), Arg::I32(gelu as i32)];
    Launch { name, grid, block: 256, args }
}

/// Its backward (without GELU): buffers [x, w, g, out] of `dtype`, out
/// [`packed_len`]`(b t c, b 2 c)`: dx, then each clip's f32 sums [g x̂; g] over its frames from
/// [`tail_offset`], for [`colsum`] over the clips (dw, db).
pub fn group_norm_cl_bwd(b: usize, t: usize, c: usize, eps: f64, dtype: DType) -> Launch {
    group_norm_plan(typed("kl_group_norm_cl_bwd", "kl_group_norm_cl_bwd_bf16", "kl_group_norm_cl_bwd_f16", dtype), b, t, c, 4, &[Arg::F32(eps as f32)])
}

/// Its padding-aware backward ([`group_norm_cl_masked_fwd`]'s gradient): buffers [x, w, mask,
/// g, out], out as [`group_norm_cl_bwd`]'s (the per-clip sums run over every frame: each
/// output depends on w and b, and on the statistics).
pub fn group_norm_cl_masked_bwd(b: usize, t: usize, c: usize, eps: f64, dtype: DType) -> Launch {
    group_norm_plan(typed("kl_group_norm_cl_masked_bwd", "kl_group_norm_cl_masked_bwd_bf16", "kl_group_norm_cl_masked_bwd_f16", dtype), b, t, c, 5, &[Arg::F32(eps as f32)])
}

/// `n` values of klspeech's keyed standard normal stream (`rng::keyed_normal_vec`, the same
/// bits): buffers [out]; one thread per Box-Muller pair.
pub fn keyed_normal(n: usize, key: u64) -> Launch {
    let mut plan = elementwise("kl_keyed_normal", n, 1, &[Arg::U64(key)]);
    plan.grid = n.div_ceil(2).div_ceil(256).clamp(1, 4096) as u32;
    plan
}

/// The f32 dropout mask of `ops::dropout_mask` (rate `p`, keyed stream `key`), bit for bit:
/// buffers [out] of n. The kernel compares the uniform's 53-bit integer with ceil(p 2^53).
pub fn dropout_mask(n: usize, p: f64, key: u64) -> Launch {
    let threshold = (p * (1u64 << 53) as f64).ceil() as u64;
    elementwise("kl_dropout_mask", n, 1, &[Arg::U64(key), Arg::U64(threshold), Arg::F32((1.0 / (1.0 - p)) as f32)])
}

/// The columns of a convolution's tap chunk (`ops::conv_gemm`): buffers [x [n, lp, cg],
/// out [n, t kc, cg]] of `dtype` (f32, bf16, f16), out row (clip, j) = frame
/// `(j / kc) stride + k0 + j % kc` of the clip. One warp per row, 8 rows a block, about 4096
/// blocks at most (grid-stride beyond).
#[allow(clippy::too_many_arguments)]
pub fn gather_taps(n: usize, lp: usize, t: usize, kc: usize, cg: usize, stride: usize, k0: usize, dtype: DType) -> Launch {
    let name = match dtype {
        DType::BF16 => "kl_gather_taps_bf16",
        DType::F16 => "kl_gather_taps_f16",
        _ => "kl_gather_taps",
    };
    let rows = n * t * kc;
    let args = [Arg::Buf(0), Arg::Buf(1)].into_iter().chain([n, lp, t, kc, cg, stride, k0].map(|v| Arg::I32(i32_of(v)))).collect();
    Launch { name, grid: rows.div_ceil(8).clamp(1, 4096) as u32, block: 256, args }
}

/// The blocks (partial sums) [`sum_sq_partial`] gives a gradient of `n` values: about 16
/// values a thread, at most 256.
pub fn sum_sq_blocks(n: usize) -> usize {
    n.div_ceil(256 * 16).clamp(1, 256)
}

/// The training step's probe of one gradient of `n` values: buffers [partial [`sum_sq_blocks`]
/// f32 (written in place: this gradient's slots of the step's buffer), g [n] of `dtype` (f32,
/// bf16, f16)], each partial the sum of one block's grid-stride squares in f64 stored as f32.
pub fn sum_sq_partial(n: usize, dtype: DType) -> Launch {
    let name = typed("kl_sum_sq_partial", "kl_sum_sq_partial_bf16", "kl_sum_sq_partial_f16", dtype);
    Launch { name, grid: sum_sq_blocks(n) as u32, block: 256, args: vec![Arg::Buf(0), Arg::Buf(1), Arg::I32(i32_of(n))] }
}

/// The most row axes [`copy_rows`] takes (a view of rank 6 at most: these and the row).
pub const COPY_ROWS_MAX_AXES: usize = 5;

/// A contiguous copy of a strided view whose last axis is contiguous: buffers [x (the view's
/// storage from its first element), out [rows, len]] of `dtype`; `dims` and `strides` (in
/// elements) of the row axes, at most [`COPY_ROWS_MAX_AXES`], each stride and dim under 2^31.
/// One warp per row, 8 rows a block, about 4096 blocks at most (grid-stride beyond).
pub fn copy_rows(len: usize, dims: &[usize], strides: &[usize], dtype: DType) -> Launch {
    copy_rows_padded(len, dims, strides, 0, dtype)
}

/// [`copy_rows`] with `pad` zero rows after the last row axis: out [.., d_last + pad, len].
pub fn copy_rows_padded(len: usize, dims: &[usize], strides: &[usize], pad: usize, dtype: DType) -> Launch {
    assert!(dims.len() == strides.len() && !dims.is_empty() && dims.len() <= COPY_ROWS_MAX_AXES, "klspeech copy_rows: {} dims, {} strides", dims.len(), strides.len());
    let lead = COPY_ROWS_MAX_AXES - dims.len();
    let d: Vec<usize> = std::iter::repeat_n(1, lead).chain(dims.iter().copied()).collect();
    let st: Vec<usize> = std::iter::repeat_n(0, lead).chain(strides.iter().copied()).collect();
    let last = dims[dims.len() - 1];
    let rows: usize = dims.iter().product::<usize>() / last.max(1) * (last + pad);
    let mut args = vec![Arg::Buf(0), Arg::Buf(1), Arg::I32(i32_of(len))];
    args.extend(d.iter().chain(&st).map(|&v| Arg::I32(i32_of(v))));
    args.push(Arg::I32(i32_of(pad)));
    Launch { name: typed("kl_copy_rows", "kl_copy_rows_bf16", "kl_copy_rows_f16", dtype), grid: rows.div_ceil(8).clamp(1, 4096) as u32, block: 256, args }
}

/// Three buffers one after another: buffers [a (na), b (nb), c (nc), out (na + nb + nc)] of
/// `dtype`, a thread per element, 256 a block, at most 4096 blocks.
pub fn cat3(na: usize, nb: usize, nc: usize, dtype: DType) -> Launch {
    let mut args: Vec<Arg> = (0..4).map(Arg::Buf).collect();
    args.extend([na, nb, nc].map(|v| Arg::I32(i32_of(v))));
    Launch { name: typed("kl_cat3", "kl_cat3_bf16", "kl_cat3_f16", dtype), grid: (na + nb + nc).div_ceil(256).clamp(1, 4096) as u32, block: 256, args }
}

/// The attention backward's merge: buffers [dq [b, nh, t, hd], dk [b, nh, tk, hd],
/// dv [b, nh, tk, hd], out [b, t, 3, nh, hd]] of `dtype` (each head's first t rows of dk and
/// dv; tk >= t). One warp per output row, 8 rows a block, about 4096 blocks at most.
pub fn merge_qkv(b: usize, t: usize, nh: usize, hd: usize, tk: usize, dtype: DType) -> Launch {
    let args = vec![Arg::Buf(0), Arg::Buf(1), Arg::Buf(2), Arg::Buf(3), Arg::I32(i32_of(b)), Arg::I32(i32_of(t)), Arg::I32(i32_of(nh)), Arg::I32(i32_of(hd)), Arg::I32(i32_of(tk))];
    Launch { name: typed("kl_merge_qkv", "kl_merge_qkv_bf16", "kl_merge_qkv_f16", dtype), grid: (b * t * 3 * nh).div_ceil(8).clamp(1, 4096) as u32, block: 256, args }
}

/// A strided convolution's column gradient added back onto its input frames: buffers
/// [dcols [n, t, k, c], dx [n, l, c]] of `dtype` (f32, bf16, f16); dx frame f sums, in f32 in
/// increasing tap j, dcols[u, j] for every output frame u with u stride + j = f + padding. One
/// warp per dx row, 8 rows a block, about 4096 blocks at most (grid-stride beyond).
#[allow(clippy::too_many_arguments)]
pub fn col2im(n: usize, l: usize, t: usize, k: usize, c: usize, stride: usize, padding: usize, dtype: DType) -> Launch {
    let name = typed("kl_col2im", "kl_col2im_bf16", "kl_col2im_f16", dtype);
    let args = [Arg::Buf(0), Arg::Buf(1)].into_iter().chain([n, l, t, k, c, stride, padding].map(|v| Arg::I32(i32_of(v)))).collect();
    Launch { name, grid: (n * l).div_ceil(8).clamp(1, 4096) as u32, block: 256, args }
}

/// AdamW's moments in place: buffers [mv, g] of `dtype` (f32, bf16 or f16: f32 arithmetic,
/// each result rounded once to the type), mv = [m; v] of 2n, g of n (`ops::AdamWScalars`
/// rounded to f32 as the CPU kernel rounds them).
pub fn adam_moments(n: usize, p: &super::AdamWScalars, dtype: DType) -> Launch {
    assert!(p.grad_scale.is_none(), "klspeech AdamW kernels take no gradient scale: scale the gradient first (ops::adamw_in_place)");
    let name = match dtype {
        DType::BF16 => "kl_adam_moments_bf16",
        DType::F16 => "kl_adam_moments_f16",
        _ => "kl_adam_moments",
    };
    elementwise(name, n, 2, &[Arg::F32((1.0 - p.beta1) as f32), Arg::F32(p.beta2 as f32), Arg::F32((1.0 - p.beta2) as f32)])
}

/// AdamW's parameter update in place: buffers [theta (n), mv (2n)] of `dtype` (as
/// [`adam_moments`]: the stored moments feed the update).
pub fn adam_apply(n: usize, p: &super::AdamWScalars, dtype: DType) -> Launch {
    let name = match dtype {
        DType::BF16 => "kl_adam_apply_bf16",
        DType::F16 => "kl_adam_apply_f16",
        _ => "kl_adam_apply",
    };
    let decay = [Arg::I32(p.decay.is_some() as i32), Arg::F32(p.decay.unwrap_or(1.0) as f32)];
    let rest = [Arg::F32((1.0 / p.bias_correction2_sqrt) as f32), Arg::F32(p.eps as f32), Arg::F32(p.step_size as f32)];
    elementwise(name, n, 2, &[decay.as_slice(), rest.as_slice()].concat())
}

/// Both AdamW steps in one pass ([`adam_moments`] then [`adam_apply`], the same bits): buffers
/// [theta (n), mv (2n), g (n)] of `dtype`, theta and mv in place. With a gradient scale
/// (`p.grad_scale`, clipping's coefficient) the kernel reads each gradient as candle's
/// `g.affine(s, 0.)` in `dtype` would store it (`kl_adam_step_scaled`), bit for bit that affine
/// then the unscaled kernel.
pub fn adam_step(n: usize, p: &super::AdamWScalars, dtype: DType) -> Launch {
    let moments = [Arg::F32((1.0 - p.beta1) as f32), Arg::F32(p.beta2 as f32), Arg::F32((1.0 - p.beta2) as f32)];
    let decay = [Arg::I32(p.decay.is_some() as i32), Arg::F32(p.decay.unwrap_or(1.0) as f32)];
    let rest = [Arg::F32((1.0 / p.bias_correction2_sqrt) as f32), Arg::F32(p.eps as f32), Arg::F32(p.step_size as f32)];
    // (The scale in `dtype` as candle's affine rounds it from f64, exactly an f32.)
    let in_type = |s: f64| match dtype {
        DType::BF16 => half::bf16::from_f64(s).to_f32(),
        DType::F16 => half::f16::from_f64(s).to_f32(),
        _ => s as f32,
    };
    let scale: Vec<Arg> = p.grad_scale.map(|s| Arg::F32(in_type(s))).into_iter().collect();
    let name = match p.grad_scale {
        Some(_) => typed("kl_adam_step_scaled", "kl_adam_step_scaled_bf16", "kl_adam_step_scaled_f16", dtype),
        None => typed("kl_adam_step", "kl_adam_step_bf16", "kl_adam_step_f16", dtype),
    };
    elementwise(name, n, 3, &[moments.as_slice(), decay.as_slice(), rest.as_slice(), scale.as_slice()].concat())
}

static KERNELS: super::EnvSwitch = super::EnvSwitch::new("KLSPEECH_NO_CUDA_KERNELS");

/// Whether the device ops use these kernels on a GPU (default: yes, unless
/// `KLSPEECH_NO_CUDA_KERNELS` is set; they also need `ops::enabled()`).
pub fn enabled() -> bool {
    KERNELS.on()
}

/// Turns the kernels on or off for the whole process (before/after benchmarks).
pub fn set_enabled(on: bool) {
    KERNELS.set(on);
}

/// Whether a kernel runs for `x`: a non-empty f32 tensor on a CUDA device, kernels and fused
/// ops on.
pub fn apply(x: &Tensor) -> bool {
    x.dtype() == DType::F32 && apply_any_float(x)
}

static HALF: super::EnvSwitch = super::EnvSwitch::new("KLSPEECH_NO_HALF_KERNELS");

/// Whether a bf16 / f16 tensor with a gradient runs through klspeech's kernels' half-type
/// instances (standardization, GELU, the softmax backward, LayerNorm, KL-Norm sites, the
/// channels-last GroupNorm; AdamW, [`apply_half_adamw`]) in half-precision training on a GPU,
/// where candle's half-type composites ran some ten passes per op (about 45 ms of a bf16
/// 8 x 4 s step on the H200). The values are the f32 arithmetic on the half-type inputs, each
/// result rounded once, as PyTorch's half-type kernels compute; column sums (weight and bias
/// gradients) stay f32 until the total is rounded.
/// Off with `KLSPEECH_NO_HALF_KERNELS=1` (or with the kernels).
pub fn apply_half(x: &Tensor) -> bool {
    matches!(x.dtype(), DType::BF16 | DType::F16) && apply_any_float(x) && HALF.on()
}

/// [`apply_half`] for AdamW (`ops::adamw_in_place`): its half-type kernels have a CPU
/// instance with the same arithmetic, which runs when the CPU rehearses the GPU's path
/// (`ops::with_gpu_path`), so that the tests check it everywhere.
pub fn apply_half_adamw(x: &Tensor) -> bool {
    apply_half(x) || (matches!(x.dtype(), DType::BF16 | DType::F16) && x.device().is_cpu() && super::gpu_path_active() && HALF.on() && super::enabled() && x.elem_count() > 0)
}

/// Turns [`apply_half`] on or off for the whole process (before/after benchmarks, tests).
pub fn set_half_enabled(on: bool) {
    HALF.set(on);
}

/// The kernels [`kernel_on`] can switch off one by one (those built or changed after the last
/// GPU run, so that a fault in one costs the next run only that one: `tools/gpu_check.sh`).
pub const SWITCHABLE: [&str; 10] = ["gather_taps", "col2im", "copy_rows", "adam_step", "attn_softmax", "group_norm", "residual_layer_norm", "conv1_group_norm", "grad_norm", "group_norm_masked"];

/// Whether the kernel `name` (one of [`SWITCHABLE`]) runs where it applies: yes unless
/// `KLSPEECH_NO_KERNEL` names it (comma-separated, read once; unknown names are reported on
/// stderr). Off, each falls back to what ran before it (or the composite): candle's
/// `index_select` for the column gathers, the stride phases for col2im, candle's strided copy
/// for row copies (`copy_rows` also covers the padded head split, then `pad_with_zeros`, and
/// `kl_merge_qkv`, then copies, a stack and candle's strided copy, and `kl_cat3`, then
/// `Tensor::cat`), the two AdamW kernels for the fused step, the scale, a -inf key bias and
/// candle's softmax for the attention's probabilities, the composite for the channels-last
/// GroupNorm (whose kernels now run 1024-thread blocks), the output projections' bias and
/// the residual added before candle's LayerNorm (`ops::residual_layer_norm_infer`), the first
/// feature-encoder layer's convolution, GroupNorm and GELU as three ops
/// (`ops::conv1_group_norm_gelu`), candle's ops for the training step's gradient probes
/// (`train::optim::step_probes`, [`sum_sq_of`]), the masked composite in [B, C, T] for the
/// padding-aware channels-last GroupNorm over a padded batch (`ops::group_norm_cl_masked`).
pub fn kernel_on(name: &str) -> bool {
    static OFF: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let off = OFF.get_or_init(|| {
        let (off, unknown) = kernel_list(&std::env::var("KLSPEECH_NO_KERNEL").unwrap_or_default());
        for n in unknown {
            eprintln!("klspeech: KLSPEECH_NO_KERNEL names {n:?}, not one of {}: ignored", SWITCHABLE.join(", "));
        }
        off
    });
    debug_assert!(SWITCHABLE.contains(&name), "{name} is not a switchable kernel");
    !off.iter().any(|n| n == name)
}

/// `KLSPEECH_NO_KERNEL`'s value as (names of [`SWITCHABLE`], other names).
fn kernel_list(v: &str) -> (Vec<String>, Vec<String>) {
    v.split(',').map(str::trim).filter(|n| !n.is_empty()).map(String::from).partition(|n| SWITCHABLE.contains(&n.as_str()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn kernel_list_takes_known_names_and_sets_aside_others() {
        let (off, unknown) = super::kernel_list(" copy_rows, adam_step,,gather ,col2im,group_norm");
        assert_eq!(off, ["copy_rows", "adam_step", "col2im", "group_norm"]);
        assert_eq!(unknown, ["gather"]);
        assert_eq!(super::kernel_list(""), (vec![], vec![]));
    }
}

/// [`apply`] for the kernels that also have bf16 and f16 versions (the channels-last GroupNorm
/// forward): a non-empty f32, bf16 or f16 tensor on a CUDA device.
pub fn apply_any_float(x: &Tensor) -> bool {
    x.device().is_cuda() && matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16) && x.elem_count() > 0 && enabled() && super::enabled()
}

/// The CPU side of a CUDA-only candle op (`cpu_fwd` for 1, 2 or 3 inputs): an error naming
/// the op; the CPU runs klspeech's fused ops or draws on the host instead.
macro_rules! cuda_only {
    (1) => {
        fn cpu_fwd(&self, _: &candle_core::CpuStorage, _: &candle_core::Layout) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            candle_core::bail!("{}: a CUDA kernel", <Self as candle_core::CustomOp1>::name(self))
        }
    };
    (2) => {
        fn cpu_fwd(&self, _: &candle_core::CpuStorage, _: &candle_core::Layout, _: &candle_core::CpuStorage, _: &candle_core::Layout) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            candle_core::bail!("{}: a CUDA kernel", <Self as candle_core::CustomOp2>::name(self))
        }
    };
    (3) => {
        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            candle_core::bail!("{}: a CUDA kernel", <Self as candle_core::CustomOp3>::name(self))
        }
    };
}
#[allow(unused_imports)] // (ops::cudnn uses it in a `cudnn` build)
pub(crate) use cuda_only;

/// What a [`KernelOp`] computes.
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
enum Kind {
    /// Rows of `d`: y = standardize(x); backward through `StandardizeBwd`.
    Standardize { d: usize, eps: f64 },
    /// (x, y, g) -> dx of the standardization.
    StandardizeBwd { d: usize, eps: f64 },
    /// (y, g[, mask]) -> dx of a softmax over rows of `d`, times `scale`.
    SoftmaxBwd { d: usize, scale: f64 },
    /// y = x Phi(x); backward through `GeluBwd`.
    Gelu,
    /// (x, g) -> dx of the GELU.
    GeluBwd,
}

/// A candle op running one of the kernels (CUDA only: the CPU has its own fused ops).
struct KernelOp(Kind);

impl KernelOp {
    /// The launch plan for `n` elements (the inputs' common size) and whether a mask is given.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn plan(&self, n: usize, masked: bool, dtype: DType) -> Launch {
        let rows = |d: usize| n / d.max(1);
        match self.0 {
            Kind::Standardize { d, eps } => standardize_fwd(rows(d), d, eps, dtype),
            Kind::StandardizeBwd { d, eps } => standardize_bwd(rows(d), d, eps, dtype),
            Kind::SoftmaxBwd { d, scale } => softmax_bwd(rows(d), d, scale, masked, dtype),
            Kind::Gelu => gelu_fwd(n, dtype),
            Kind::GeluBwd => gelu_bwd(n, dtype),
        }
    }

    fn name(&self) -> &'static str {
        match self.0 {
            Kind::Standardize { .. } => "klspeech-kernel-standardize",
            Kind::StandardizeBwd { .. } => "klspeech-kernel-standardize-bwd",
            Kind::SoftmaxBwd { .. } => "klspeech-kernel-softmax-bwd",
            Kind::Gelu => "klspeech-kernel-gelu",
            Kind::GeluBwd => "klspeech-kernel-gelu-bwd",
        }
    }

    fn run(&self, inputs: &[(&candle_core::CudaStorage, &candle_core::Layout)], masked: bool) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        let shape = inputs[0].1.shape().clone();
        for (_, l) in inputs {
            if l.shape() != &shape {
                candle_core::bail!("{}: inputs of shapes {:?} and {:?}", self.name(), shape, l.shape());
            }
        }
        #[cfg(feature = "cuda")]
        {
            let dtype = candle_core::backend::BackendStorage::dtype(inputs[0].0);
            gpu::launch_op(&self.plan(shape.elem_count(), masked, dtype), inputs, &shape)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = masked;
            candle_core::bail!("{}: built without CUDA", self.name())
        }
    }
}

impl candle_core::CustomOp1 for KernelOp {
    fn name(&self) -> &'static str {
        KernelOp::name(self)
    }
    cuda_only!(1);
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &candle_core::Layout) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        self.run(&[(s, l)], false)
    }
    fn bwd(&self, x: &Tensor, y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = g.contiguous()?;
        Ok(Some(match self.0 {
            Kind::Standardize { d, eps } => x.apply_op3_no_bwd(&y.detach(), &g, &KernelOp(Kind::StandardizeBwd { d, eps }))?,
            Kind::Gelu => x.apply_op2_no_bwd(&g, &KernelOp(Kind::GeluBwd))?,
            _ => candle_core::bail!("{}: no backward", self.name()),
        }))
    }
}

impl candle_core::CustomOp2 for KernelOp {
    fn name(&self) -> &'static str {
        KernelOp::name(self)
    }
    cuda_only!(2);
    fn cuda_fwd(&self, s1: &candle_core::CudaStorage, l1: &candle_core::Layout, s2: &candle_core::CudaStorage, l2: &candle_core::Layout) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        self.run(&[(s1, l1), (s2, l2)], false)
    }
}

impl candle_core::CustomOp3 for KernelOp {
    fn name(&self) -> &'static str {
        KernelOp::name(self)
    }
    cuda_only!(3);
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CudaStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CudaStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        // Three inputs: the standardization's backward (x, y, g), or a masked softmax backward.
        self.run(&[(s1, l1), (s2, l2), (s3, l3)], true)
    }
}

/// (x - mean) / sqrt(var + eps) over the last dimension, one kernel each way ([`apply`] or
/// [`apply_half`] must hold for `x`).
pub(crate) fn standardize(x: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let d = x.dim(candle_core::D::Minus1)?;
    x.contiguous()?.apply_op1(KernelOp(Kind::Standardize { d, eps }))
}

/// The exact GELU, one kernel each way ([`apply`] or [`apply_half`] must hold for `x`).
pub(crate) fn gelu(x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(KernelOp(Kind::Gelu))
}

/// The gradient of the scores of a softmax over the last dimension, y its output and g the
/// gradient of its (dropped-out, with `mask`) output: scale y (g m - sum(g m y)), all of one
/// type (f32, bf16, f16).
pub(crate) fn softmax_bwd_of(y: &Tensor, g: &Tensor, mask: Option<&Tensor>, scale: f64) -> candle_core::Result<Tensor> {
    let d = y.dim(candle_core::D::Minus1)?;
    let op = KernelOp(Kind::SoftmaxBwd { d, scale });
    let (y, g) = (y.detach().contiguous()?, g.detach().contiguous()?);
    match mask {
        Some(m) => y.apply_op3_no_bwd(&g, &m.detach().contiguous()?, &op),
        None => y.apply_op2_no_bwd(&g, &op),
    }
}

/// The kernels of a KL-Norm site (after its standardization), as candle ops.
#[derive(Clone)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
enum KlStage {
    /// (x̂, p) -> [y; kl]; the noise is a field (no gradient).
    Forward,
    /// (x̂, p, g) -> [dx̂; per-block parameter sums].
    Backward,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct KlNormKernel {
    stage: KlStage,
    /// [rows, d], contiguous, of x̂'s type on the same GPU.
    noise: Tensor,
    d: usize,
    learned: bool,
}

impl KlNormKernel {
    fn rows(&self) -> usize {
        self.noise.elem_count() / self.d.max(1)
    }

    /// Runs the stage's kernel on `inputs` (x̂, p[, g]) with the noise as third buffer.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    fn run(&self, inputs: &[(&candle_core::CudaStorage, &candle_core::Layout)]) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        #[cfg(feature = "cuda")]
        {
            let (rows, d) = (self.rows(), self.d);
            let dtype = candle_core::backend::BackendStorage::dtype(inputs[0].0);
            let (plan, len) = match self.stage {
                KlStage::Forward => (klnorm_fwd(rows, d, self.learned, dtype), rows * d + rows),
                KlStage::Backward => {
                    let plan = klnorm_bwd(rows, d, self.learned, dtype);
                    let len = packed_len(rows * d, plan.grid as usize * if self.learned { 6 } else { 4 } * d, dtype);
                    (plan, len)
                }
            };
            let (guard, nl) = self.noise.storage_and_layout();
            let candle_core::Storage::Cuda(ns) = &*guard else { candle_core::bail!("klspeech KL-Norm kernel: noise not on the GPU") };
            let mut all = vec![inputs[0], inputs[1], (ns, nl)];
            all.extend_from_slice(&inputs[2..]);
            gpu::launch_op(&plan, &all, &candle_core::Shape::from(len))
        }
        #[cfg(not(feature = "cuda"))]
        {
            candle_core::bail!("klspeech KL-Norm kernel: built without CUDA")
        }
    }
}

impl candle_core::CustomOp2 for KlNormKernel {
    fn name(&self) -> &'static str {
        "klspeech-kernel-kl-norm"
    }
    cuda_only!(2);
    fn cuda_fwd(&self, s1: &candle_core::CudaStorage, l1: &candle_core::Layout, s2: &candle_core::CudaStorage, l2: &candle_core::Layout) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        self.run(&[(s1, l1), (s2, l2)])
    }
    fn bwd(&self, x_hat: &Tensor, p: &Tensor, _out: &Tensor, g: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (rows, d) = (self.rows(), self.d);
        let np = p.dim(0)?;
        let op = KlNormKernel { stage: KlStage::Backward, noise: self.noise.clone(), d, learned: self.learned };
        let packed = x_hat.detach().apply_op3_no_bwd(&p.detach(), &g.contiguous()?, &op)?;
        let dx = packed.narrow(0, 0, rows * d)?.reshape(x_hat.shape())?;
        let dp = tail_sums(&packed, rows * d, np * d)?.to_dtype(p.dtype())?.reshape((np, d))?;
        Ok((Some(dx), Some(dp)))
    }
}

impl candle_core::CustomOp3 for KlNormKernel {
    fn name(&self) -> &'static str {
        "klspeech-kernel-kl-norm-bwd"
    }
    cuda_only!(3);
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CudaStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CudaStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        self.run(&[(s1, l1), (s2, l2), (s3, l3)])
    }
}

/// Sums `blocks` rows of `width` f32 values (a column-summing backward's per-block sums: the
/// tail of its output from [`tail_offset`], f32 whatever the output's type); the result is f32.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct ColSum {
    blocks: usize,
    width: usize,
}

/// The column sums of a column-summing backward's output `packed` (`n` gradient values, then
/// per-block f32 sums of `width` from [`tail_offset`]): [width], f32.
fn tail_sums(packed: &Tensor, n: usize, width: usize) -> candle_core::Result<Tensor> {
    let dtype = packed.dtype();
    let (start, per) = (tail_offset(n, dtype), packed_len(0, 1, dtype));
    let blocks = (packed.elem_count() - start) / (width * per).max(1);
    packed.narrow(0, start, blocks * width * per)?.apply_op1_no_bwd(&ColSum { blocks, width })
}

impl candle_core::CustomOp1 for ColSum {
    fn name(&self) -> &'static str {
        "klspeech-kernel-colsum"
    }
    cuda_only!(1);
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &candle_core::Layout) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        #[cfg(feature = "cuda")]
        {
            let dtype = candle_core::backend::BackendStorage::dtype(s);
            if l.shape().elem_count() != packed_len(0, self.blocks * self.width, dtype) {
                candle_core::bail!("klspeech-kernel-colsum: {} {dtype:?} values for {} blocks of {}", l.shape().elem_count(), self.blocks, self.width);
            }
            gpu::launch_op_f32_out(&colsum(self.blocks, self.width), &[(s, l)], &candle_core::Shape::from(self.width))
        }
        #[cfg(not(feature = "cuda"))]
        {
            candle_core::bail!("klspeech-kernel-colsum: built without CUDA")
        }
    }
}

/// A KL-Norm site after its standardization as one kernel each way: x̂ [.., d] and the packed
/// parameters p [4 or 6, d] (see `ops::device::kl_norm_last_device`), noise [rows, d];
/// returns [y (n values); kl (rows values)]. [`apply`] must hold for x̂, p and the noise.
pub(crate) fn kl_norm_site(x_hat: &Tensor, p: &Tensor, noise: &Tensor) -> candle_core::Result<Tensor> {
    let d = x_hat.dim(candle_core::D::Minus1)?;
    let learned = p.dim(0)? == 6;
    let op = KlNormKernel { stage: KlStage::Forward, noise: noise.contiguous()?, d, learned };
    x_hat.contiguous()?.apply_op2(&p.contiguous()?, op)
}

/// The attention's probabilities ([`attn_softmax`]) as a candle op without a backward: (s) or
/// (s, kb) -> p shaped like s.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct AttnSoftmax {
    d: usize,
    rows_per_clip: usize,
    scale: f64,
}

impl AttnSoftmax {
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    fn run(&self, inputs: &[(&candle_core::CudaStorage, &candle_core::Layout)]) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        #[cfg(feature = "cuda")]
        {
            let shape = inputs[0].1.shape();
            let ld = shape.dims().last().copied().unwrap_or(1).max(1);
            let rows = shape.elem_count() / ld;
            if self.d > ld || !rows.is_multiple_of(self.rows_per_clip.max(1)) {
                candle_core::bail!("klspeech-kernel-attn-softmax: scores {shape:?} for {} keys, {} rows a clip", self.d, self.rows_per_clip);
            }
            if let Some((_, kl)) = inputs.get(1) {
                if kl.shape().elem_count() != rows / self.rows_per_clip.max(1) * self.d {
                    candle_core::bail!("klspeech-kernel-attn-softmax: key bias {:?} for {} clips of {} keys", kl.shape(), rows / self.rows_per_clip.max(1), self.d);
                }
            }
            let dtype = candle_core::backend::BackendStorage::dtype(inputs[0].0);
            let plan = attn_softmax(rows, ld, self.d, self.rows_per_clip, self.scale, inputs.len() == 2, dtype);
            gpu::launch_op(&plan, inputs, shape)
        }
        #[cfg(not(feature = "cuda"))]
        {
            candle_core::bail!("klspeech-kernel-attn-softmax: built without CUDA")
        }
    }
}

impl candle_core::CustomOp1 for AttnSoftmax {
    fn name(&self) -> &'static str {
        "klspeech-kernel-attn-softmax"
    }
    cuda_only!(1);
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &candle_core::Layout) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        self.run(&[(s, l)])
    }
}

impl candle_core::CustomOp2 for AttnSoftmax {
    fn name(&self) -> &'static str {
        "klspeech-kernel-attn-softmax"
    }
    cuda_only!(2);
    fn cuda_fwd(&self, s1: &candle_core::CudaStorage, l1: &candle_core::Layout, s2: &candle_core::CudaStorage, l2: &candle_core::Layout) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        self.run(&[(s1, l1), (s2, l2)])
    }
}

/// The attention's probabilities from scores s [B, nh, T, ld] whose first `d` keys are real
/// (the rest padding): softmax(scale s + kb) over them, zeros in the padding, one kernel, no
/// gradient (the attention ops take their own backward). kb [B, d] or none; [`apply`] or
/// [`apply_half`] must hold for s, kb of s's type.
pub(crate) fn attn_softmax_of(s: &Tensor, kb: Option<&Tensor>, d: usize, scale: f64) -> candle_core::Result<Tensor> {
    let (b, _, _, _) = s.dims4()?;
    let rows = s.elem_count() / s.dim(3)?.max(1);
    let op = AttnSoftmax { d, rows_per_clip: rows / b.max(1), scale };
    let s = s.detach().contiguous()?;
    match kb {
        Some(kb) => s.apply_op2_no_bwd(&kb.detach().contiguous()?, &op),
        None => s.apply_op1_no_bwd(&op),
    }
}

/// Which normalization with weight and bias an [`AffineNormKernel`] runs.
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
enum AffineNorm {
    /// LayerNorm over rows of `d` (the last dimension).
    Layer { d: usize },
    /// Per-channel GroupNorm over the frames of channels-last [b, t, c], the exact GELU after
    /// it when `gelu` (inference only: no backward then).
    GroupCl { b: usize, t: usize, c: usize, gelu: bool },
    /// Inference only: LayerNorm((y + bias) + r) over rows of `d`, the inputs (y, r, [bias; w;
    /// b]) ([`residual_layer_norm`]).
    ResidualLayer { d: usize },
}

/// A normalization with weight and bias as klspeech's kernels: (x, w, b) -> y forward;
/// (x, w, g) -> [dx; partial column sums [g x̂; g]] backward (`backward`), then [`ColSum`]
/// for dw and db.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct AffineNormKernel {
    norm: AffineNorm,
    eps: f64,
    backward: bool,
    /// GroupCl only: padding-aware statistics over the frames whose mask [b, t] (x's type,
    /// contiguous, on x's GPU) is not 0; the masked kernels take it after (x, w, b) forward,
    /// after (x, w) backward.
    mask: Option<Tensor>,
}

impl AffineNormKernel {
    /// The launch plan, and the backward's number of partial-sum blocks.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn plan(&self, n: usize, dtype: DType) -> (Launch, usize) {
        match (self.norm, self.backward) {
            (AffineNorm::Layer { d }, false) => (layer_norm_fwd(n / d.max(1), d, self.eps, dtype), 0),
            (AffineNorm::Layer { d }, true) => {
                let plan = layer_norm_bwd(n / d.max(1), d, self.eps, dtype);
                let blocks = plan.grid as usize;
                (plan, blocks)
            }
            (AffineNorm::GroupCl { b, t, c, gelu }, false) => match self.mask {
                Some(_) => (group_norm_cl_masked_fwd(b, t, c, self.eps, gelu, dtype), 0),
                None => (group_norm_cl_fwd(b, t, c, self.eps, gelu, dtype), 0),
            },
            (AffineNorm::GroupCl { b, t, c, .. }, true) => match self.mask {
                Some(_) => (group_norm_cl_masked_bwd(b, t, c, self.eps, dtype), b),
                None => (group_norm_cl_bwd(b, t, c, self.eps, dtype), b),
            },
            (AffineNorm::ResidualLayer { d }, _) => (residual_layer_norm(n / d.max(1), d, self.eps, dtype), 0),
        }
    }

    /// Width of the normalized axis (the weight's length).
    fn width(&self) -> usize {
        match self.norm {
            AffineNorm::Layer { d } | AffineNorm::ResidualLayer { d } => d,
            AffineNorm::GroupCl { c, .. } => c,
        }
    }
}

impl candle_core::CustomOp3 for AffineNormKernel {
    fn name(&self) -> &'static str {
        match (self.norm, self.backward) {
            (AffineNorm::Layer { .. }, false) => "klspeech-kernel-layer-norm",
            (AffineNorm::Layer { .. }, true) => "klspeech-kernel-layer-norm-bwd",
            (AffineNorm::GroupCl { .. }, false) => "klspeech-kernel-group-norm-cl",
            (AffineNorm::GroupCl { .. }, true) => "klspeech-kernel-group-norm-cl-bwd",
            (AffineNorm::ResidualLayer { .. }, _) => "klspeech-kernel-residual-layer-norm",
        }
    }
    cuda_only!(3);
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CudaStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CudaStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        #[cfg(feature = "cuda")]
        {
            let n = l1.shape().elem_count();
            let dtype = candle_core::backend::BackendStorage::dtype(s1);
            let (plan, blocks) = self.plan(n, dtype);
            let mask = self.mask.as_ref().map(|m| m.storage_and_layout());
            let mut inputs = vec![(s1, l1), (s2, l2), (s3, l3)];
            if let Some((guard, ml)) = &mask {
                let candle_core::Storage::Cuda(ms) = &**guard else { candle_core::bail!("klspeech GroupNorm kernel: the length mask is not on the GPU") };
                inputs.insert(if self.backward { 2 } else { 3 }, (ms, ml));
            }
            if self.backward {
                gpu::launch_op(&plan, &inputs, &candle_core::Shape::from(packed_len(n, blocks * 2 * self.width(), dtype)))
            } else {
                gpu::launch_op(&plan, &inputs, l1.shape())
            }
        }
        #[cfg(not(feature = "cuda"))]
        {
            candle_core::bail!("{}: built without CUDA", <Self as candle_core::CustomOp3>::name(self))
        }
    }
    fn bwd(&self, x: &Tensor, w: &Tensor, b: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if matches!(self.norm, AffineNorm::GroupCl { gelu: true, .. } | AffineNorm::ResidualLayer { .. }) {
            candle_core::bail!("{}: inference only, no backward", <Self as candle_core::CustomOp3>::name(self));
        }
        let (n, d) = (x.elem_count(), self.width());
        let op = AffineNormKernel { norm: self.norm, eps: self.eps, backward: true, mask: self.mask.clone() };
        let packed = x.detach().apply_op3_no_bwd(&w.detach(), &g.contiguous()?, &op)?;
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        // (f32 sums: the half-type weights' gradients rounded once.)
        let sums = tail_sums(&packed, n, 2 * d)?.to_dtype(w.dtype())?;
        let dw = super::grads::route(w, Some(sums.narrow(0, 0, d)?.reshape(w.shape())?))?;
        let db = super::grads::route(b, Some(sums.narrow(0, d, d)?.reshape(b.shape())?))?;
        Ok((Some(dx), dw, db))
    }
}

/// LayerNorm over the last dimension in one kernel forward and two backward ([`apply`] or
/// [`apply_half`] must hold for x, w and b, all of one type; rows of at most
/// [`LAYER_NORM_MAX_D`]).
pub(crate) fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let d = x.dim(candle_core::D::Minus1)?;
    if d > LAYER_NORM_MAX_D || w.elem_count() != d || b.elem_count() != d {
        candle_core::bail!("klspeech LayerNorm kernel: rows of {d} with weights of {} and {}", w.elem_count(), b.elem_count());
    }
    if w.dtype() != x.dtype() || b.dtype() != x.dtype() {
        candle_core::bail!("klspeech LayerNorm kernel: x of {:?} with weights of {:?} and {:?}", x.dtype(), w.dtype(), b.dtype());
    }
    x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, AffineNormKernel { norm: AffineNorm::Layer { d }, eps, backward: false, mask: None })
}

/// Per-channel GroupNorm over the frames of channels-last x [B, T, C] (w, b [C]), the exact
/// GELU after it when `gelu` (then without a backward): one kernel forward, two backward
/// ([`apply_any_float`] must hold for x, w and b, all three of one type).
pub(crate) fn group_norm_cl(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64, gelu: bool) -> candle_core::Result<Tensor> {
    group_norm_cl_masked(x, w, b, None, eps, gelu)
}

/// [`group_norm_cl`], with `mask` ([B, T], 1 for a clip's valid frames, 0 for its padding, on
/// x's device) padding-aware: each clip's statistics over the frames whose mask is not 0 (the
/// masked composite's for a 0 / 1 mask), every frame normalized with them.
pub(crate) fn group_norm_cl_masked(x: &Tensor, w: &Tensor, b: &Tensor, mask: Option<&Tensor>, eps: f64, gelu: bool) -> candle_core::Result<Tensor> {
    let (nb, t, c) = x.dims3()?;
    if let Some(m) = mask {
        if m.dims() != [nb, t] {
            candle_core::bail!("klspeech GroupNorm kernel: [{nb}, {t}, {c}] with a mask of {:?}", m.dims());
        }
    }
    let mask = mask.map(|m| m.detach().to_dtype(x.dtype())?.contiguous()).transpose()?;
    if w.elem_count() != c || b.elem_count() != c || t == 0 {
        candle_core::bail!("klspeech GroupNorm kernel: [{nb}, {t}, {c}] with weights of {} and {}", w.elem_count(), b.elem_count());
    }
    if w.dtype() != x.dtype() || b.dtype() != x.dtype() {
        candle_core::bail!("klspeech GroupNorm kernel: x of {:?} with weights of {:?} and {:?}", x.dtype(), w.dtype(), b.dtype());
    }
    let op = AffineNormKernel { norm: AffineNorm::GroupCl { b: nb, t, c, gelu }, eps, backward: false, mask };
    let (x, w, b) = (x.contiguous()?, w.contiguous()?, b.contiguous()?);
    if gelu {
        x.detach().apply_op3_no_bwd(&w.detach(), &b.detach(), &op)
    } else {
        x.apply_op3(&w, &b, op)
    }
}

/// Fills a tensor shaped like its input (only its shape and device are read) with a keyed
/// stream: the normal stream at the key, or a dropout mask (rate, key).
#[derive(Clone, Copy)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
enum KeyedFill {
    Normal(u64),
    DropoutMask(f64, u64),
}

impl candle_core::CustomOp1 for KeyedFill {
    fn name(&self) -> &'static str {
        "klspeech-kernel-keyed-fill"
    }
    cuda_only!(1);
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &candle_core::Layout) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        #[cfg(feature = "cuda")]
        {
            let n = l.shape().elem_count();
            let plan = match *self {
                KeyedFill::Normal(key) => keyed_normal(n, key),
                KeyedFill::DropoutMask(p, key) => dropout_mask(n, p, key),
            };
            gpu::launch_fill(s, &plan, l.shape())
        }
        #[cfg(not(feature = "cuda"))]
        {
            candle_core::bail!("klspeech keyed normal kernel: built without CUDA")
        }
    }
}

/// Standard normal f32 values shaped like `like`, on its GPU: `rng::keyed_normal_vec(key, n)`
/// to the bit, generated on the device instead of on the host and copied
/// ([`apply_any_float`] must hold for `like`; the values are f32 whatever its type).
pub fn keyed_normal_like(like: &Tensor, key: u64) -> candle_core::Result<Tensor> {
    like.detach().apply_op1_no_bwd(&KeyedFill::Normal(key))
}

/// `ops::dropout_mask(like, p, key)` for f32 on a GPU, built there to the bit ([`apply`] must
/// hold for `like`).
pub fn dropout_mask_like(like: &Tensor, p: f64, key: u64) -> candle_core::Result<Tensor> {
    like.detach().apply_op1_no_bwd(&KeyedFill::DropoutMask(p, key))
}

/// [`bias_add`] as an in-place candle op on (y, b); `.0`: the GELU after it.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct BiasAdd(bool);

impl candle_core::InplaceOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "klspeech-kernel-bias-add"
    }
    fn cpu_fwd(&self, _: &mut candle_core::CpuStorage, _: &candle_core::Layout, _: &candle_core::CpuStorage, _: &candle_core::Layout) -> candle_core::Result<()> {
        candle_core::bail!("klspeech-kernel-bias-add: a CUDA kernel")
    }
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    fn cuda_fwd(&self, y: &mut candle_core::CudaStorage, ly: &candle_core::Layout, b: &candle_core::CudaStorage, lb: &candle_core::Layout) -> candle_core::Result<()> {
        #[cfg(feature = "cuda")]
        {
            let d = lb.shape().elem_count();
            let rows = ly.shape().elem_count() / d.max(1);
            let dtype = candle_core::backend::BackendStorage::dtype(y);
            gpu::launch_in_place(&bias_add(rows, d, dtype, self.0), y, ly, &[(b, lb)])
        }
        #[cfg(not(feature = "cuda"))]
        {
            candle_core::bail!("klspeech-kernel-bias-add: built without CUDA")
        }
    }
}

/// `y + b` over y's last axis (b [d], y [.., d]), then with `gelu` the exact GELU, where
/// [`apply_any_float`] holds for y, b is of y's type and y is contiguous and outside any graph
/// (a product just made by the caller, which nothing else holds): [`bias_add`] in place, one
/// pass over y. Otherwise candle's broadcast add (and `ops::gelu_erf`).
pub(crate) fn add_bias_fresh(y: Tensor, b: &Tensor, gelu: bool) -> crate::error::Result<Tensor> {
    let d = y.dim(candle_core::D::Minus1)?;
    if apply_any_float(&y) && !y.track_op() && y.is_contiguous() && b.dtype() == y.dtype() && b.dims() == [d] {
        y.inplace_op2(&b.detach().contiguous()?, &BiasAdd(gelu))?;
        return Ok(y);
    }
    let y = y.broadcast_add(b)?;
    if gelu {
        super::gelu_erf(&y)
    } else {
        Ok(y)
    }
}

/// [`gather_taps`] as an op without gradient: the columns [n, t kc, cg] of taps
/// `k0 .. k0 + kc` of every output frame of a convolution of `stride` over x [n, lp, cg].
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct GatherTaps {
    t: usize,
    kc: usize,
    stride: usize,
    k0: usize,
}

impl candle_core::CustomOp1 for GatherTaps {
    fn name(&self) -> &'static str {
        "klspeech-kernel-gather-taps"
    }
    cuda_only!(1);
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    fn cuda_fwd(&self, x: &candle_core::CudaStorage, l: &candle_core::Layout) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        #[cfg(feature = "cuda")]
        {
            let (n, lp, cg) = l.shape().dims3()?;
            let dtype = candle_core::backend::BackendStorage::dtype(x);
            let plan = gather_taps(n, lp, self.t, self.kc, cg, self.stride, self.k0, dtype);
            gpu::launch_op(&plan, &[(x, l)], &candle_core::Shape::from((n, self.t * self.kc, cg)))
        }
        #[cfg(not(feature = "cuda"))]
        {
            candle_core::bail!("klspeech-kernel-gather-taps: built without CUDA")
        }
    }
}

/// The columns of taps `k0 .. k0 + kc` of the `t` output frames of a convolution of `stride`
/// over the padded clips x [n, lp, cg]: [n, t kc, cg] ([`apply_any_float`] must hold for x;
/// the frames must lie in the clips, `(t - 1) stride + k0 + kc <= lp`).
pub(crate) fn gather_taps_of(x: &Tensor, t: usize, k0: usize, kc: usize, stride: usize) -> candle_core::Result<Tensor> {
    let (_, lp, _) = x.dims3()?;
    if t == 0 || kc == 0 || (t - 1) * stride + k0 + kc > lp {
        candle_core::bail!("klspeech gather_taps: {t} frames of taps {k0}..{} at stride {stride} over {lp} frames", k0 + kc)
    }
    x.contiguous()?.apply_op1_no_bwd(&GatherTaps { t, kc, stride, k0 })
}

/// LayerNorm((y + bias) + r) over the last axis by [`residual_layer_norm`] (no gradient):
/// y and r of one shape [.., d], p = [bias; w; b] [3 d], all of one type, on a GPU.
pub(crate) fn residual_layer_norm_of(y: &Tensor, r: &Tensor, p: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let d = y.dim(candle_core::D::Minus1)?;
    if y.dims() != r.dims() || p.elem_count() != 3 * d || d == 0 {
        candle_core::bail!("klspeech residual_layer_norm: y {:?}, r {:?}, parameters {:?}", y.dims(), r.dims(), p.dims())
    }
    let op = AffineNormKernel { norm: AffineNorm::ResidualLayer { d }, eps, backward: false, mask: None };
    y.detach().contiguous()?.apply_op3_no_bwd(&r.detach().contiguous()?, &p.detach().contiguous()?, &op)
}

/// [`conv1_group_norm_gelu`] as a candle op without a backward: (x [b, l, 1], w [c, 1, k],
/// p [2 c]) -> [b, t, c].
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct Conv1GroupNormGelu {
    stride: usize,
    eps: f64,
}

impl candle_core::CustomOp3 for Conv1GroupNormGelu {
    fn name(&self) -> &'static str {
        "klspeech-kernel-conv1-group-norm-gelu"
    }
    cuda_only!(3);
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CudaStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CudaStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        #[cfg(feature = "cuda")]
        {
            let (b, l, _) = l1.shape().dims3()?;
            let (c, _, k) = l2.shape().dims3()?;
            let t = (l - k) / self.stride + 1;
            let dtype = candle_core::backend::BackendStorage::dtype(s1);
            let plan = conv1_group_norm_gelu(b, l, t, c, k, self.stride, self.eps, dtype);
            gpu::launch_op(&plan, &[(s1, l1), (s2, l2), (s3, l3)], &candle_core::Shape::from((b, t, c)))
        }
        #[cfg(not(feature = "cuda"))]
        {
            candle_core::bail!("klspeech-kernel-conv1-group-norm-gelu: built without CUDA")
        }
    }
}

/// `gelu_erf(group_norm_cl(conv1d_cl(x, w, stride), p[..c], p[c..]))` for one-channel clips
/// x [b, l, 1] and w [c, 1, k] by [`conv1_group_norm_gelu`] (no gradient; [`apply_any_float`]
/// must hold for x; x, w and p = [weight; bias] [2 c] of one type).
pub(crate) fn conv1_group_norm_gelu_of(x: &Tensor, w: &Tensor, p: &Tensor, stride: usize, eps: f64) -> candle_core::Result<Tensor> {
    let (_, l, c_in) = x.dims3()?;
    let (c, c_g, k) = w.dims3()?;
    if c_in != 1 || c_g != 1 || k == 0 || k > CONV1_MAX_K || k > l || stride == 0 || p.elem_count() != 2 * c {
        candle_core::bail!("klspeech conv1_group_norm_gelu: x {:?}, w {:?}, stride {stride}, GroupNorm parameters {:?}", x.dims(), w.dims(), p.dims())
    }
    if w.dtype() != x.dtype() || p.dtype() != x.dtype() {
        candle_core::bail!("klspeech conv1_group_norm_gelu: x of {:?} with w of {:?} and GroupNorm parameters of {:?}", x.dtype(), w.dtype(), p.dtype())
    }
    x.detach().contiguous()?.apply_op3_no_bwd(&w.detach().contiguous()?, &p.detach().contiguous()?, &Conv1GroupNormGelu { stride, eps })
}

/// [`sum_sq_partial`] on one gradient into its slots of the step's partial sums (the in-place
/// target, f32), the gradient (f32, bf16 or f16) its input.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct SumSqPartial;

impl candle_core::InplaceOp2 for SumSqPartial {
    fn name(&self) -> &'static str {
        "klspeech-kernel-sum-sq-partial"
    }
    fn cpu_fwd(&self, _: &mut candle_core::CpuStorage, _: &candle_core::Layout, _: &candle_core::CpuStorage, _: &candle_core::Layout) -> candle_core::Result<()> {
        candle_core::bail!("klspeech-kernel-sum-sq-partial: a CUDA kernel")
    }
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    fn cuda_fwd(&self, s1: &mut candle_core::CudaStorage, l1: &candle_core::Layout, s2: &candle_core::CudaStorage, l2: &candle_core::Layout) -> candle_core::Result<()> {
        #[cfg(feature = "cuda")]
        {
            let n = l2.shape().elem_count();
            let plan = sum_sq_partial(n, candle_core::backend::BackendStorage::dtype(s2));
            if l1.shape().elem_count() != plan.grid as usize {
                candle_core::bail!("klspeech-kernel-sum-sq-partial: {} slots for {} blocks", l1.shape().elem_count(), plan.grid)
            }
            gpu::launch_in_place_f32(&plan, s1, l1, &[(s2, l2)])
        }
        #[cfg(not(feature = "cuda"))]
        {
            candle_core::bail!("klspeech-kernel-sum-sq-partial: built without CUDA")
        }
    }
}

/// The sum of the squares of every value of `grads` as a 0-d f64 tensor on their GPU, for the
/// training step's non-finite probe and global norm (`train::optim::step_probes`): one
/// [`sum_sq_partial`] launch a gradient into one buffer of partial sums, then one cast and one
/// sum, where candle's ops took some six launches a gradient (about 1 300 a wav2vec2-base
/// step) and a copy of each. `None` where it does not apply (no gradient; one off the GPU, not
/// f32 / bf16 / f16, or on another device; kernels off or `KLSPEECH_NO_KERNEL=grad_norm`):
/// then candle's ops.
pub(crate) fn sum_sq_of(grads: &[&Tensor]) -> candle_core::Result<Option<Tensor>> {
    let Some(first) = grads.first() else { return Ok(None) };
    if !grads.iter().all(|g| apply_any_float(g) && g.device().same_device(first.device())) || !kernel_on("grad_norm") {
        return Ok(None);
    }
    let blocks: Vec<usize> = grads.iter().map(|g| sum_sq_blocks(g.elem_count())).collect();
    let partials = Tensor::zeros(blocks.iter().sum::<usize>(), DType::F32, first.device())?;
    let mut at = 0;
    for (g, &b) in grads.iter().zip(&blocks) {
        partials.narrow(0, at, b)?.inplace_op2(&g.contiguous()?, &SumSqPartial)?;
        at += b;
    }
    Ok(Some(partials.to_dtype(DType::F64)?.sum_all()?))
}

/// [`col2im`] as a candle op without a backward: dcols [n, t, k, c] -> dx [n, l, c].
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct Col2Im {
    l: usize,
    stride: usize,
    padding: usize,
}

impl candle_core::CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "klspeech-kernel-col2im"
    }
    cuda_only!(1);
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    fn cuda_fwd(&self, x: &candle_core::CudaStorage, l: &candle_core::Layout) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        #[cfg(feature = "cuda")]
        {
            let (n, t, k, c) = l.shape().dims4()?;
            let dtype = candle_core::backend::BackendStorage::dtype(x);
            let plan = col2im(n, self.l, t, k, c, self.stride, self.padding, dtype);
            gpu::launch_op(&plan, &[(x, l)], &candle_core::Shape::from((n, self.l, c)))
        }
        #[cfg(not(feature = "cuda"))]
        {
            candle_core::bail!("klspeech-kernel-col2im: built without CUDA")
        }
    }
}

/// The input gradient dx [n, l, c] of a convolution of `stride` and `padding` from its column
/// gradient dcols [n, t, k, c] (`ops::conv_gemm::col2im_phases`' values in one kernel; no
/// gradient; [`apply_any_float`] must hold for dcols; the taps must cover the frames they
/// read, `(t - 1) stride + k <= l + 2 padding`).
pub(crate) fn col2im_of(dcols: &Tensor, l: usize, stride: usize, padding: usize) -> candle_core::Result<Tensor> {
    let (_, t, k, _) = dcols.dims4()?;
    if t == 0 || stride == 0 || (t - 1) * stride + k > l + 2 * padding {
        candle_core::bail!("klspeech col2im: {t} frames of {k} taps at stride {stride} over {l} frames padded by {padding}")
    }
    dcols.detach().contiguous()?.apply_op1_no_bwd(&Col2Im { l, stride, padding })
}

/// [`copy_rows_padded`] as a candle op without a backward: a view -> its contiguous copy, with
/// `pad` zero rows after its second-to-last axis.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct CopyRows {
    pad: usize,
}

impl candle_core::CustomOp1 for CopyRows {
    fn name(&self) -> &'static str {
        "klspeech-kernel-copy-rows"
    }
    cuda_only!(1);
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    fn cuda_fwd(&self, x: &candle_core::CudaStorage, l: &candle_core::Layout) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        #[cfg(feature = "cuda")]
        {
            let (dims, strides) = (l.dims(), l.stride());
            let r = dims.len() - 1;
            if strides[r] != 1 || r == 0 {
                candle_core::bail!("klspeech-kernel-copy-rows: a view of {dims:?} whose last axis has stride {}", strides[r]);
            }
            let dtype = candle_core::backend::BackendStorage::dtype(x);
            let plan = copy_rows_padded(dims[r], &dims[..r], &strides[..r], self.pad, dtype);
            let mut out = dims.to_vec();
            out[r - 1] += self.pad;
            gpu::launch_op_view(&plan, (x, l), &candle_core::Shape::from(out))
        }
        #[cfg(not(feature = "cuda"))]
        {
            candle_core::bail!("klspeech-kernel-copy-rows: built without CUDA")
        }
    }
}

/// `x.contiguous()` (no gradient), on a GPU as one [`copy_rows`] kernel where x is a view whose
/// last axis is contiguous and has at most [`COPY_ROWS_MAX_AXES`] others (candle's strided
/// copy works out a multi-axis index per element: 0.4-1.3 TB/s on the H200 for the attention's
/// head split); elsewhere candle's copy.
pub(crate) fn contiguous_rows(x: &Tensor) -> candle_core::Result<Tensor> {
    contiguous_rows_padded(x, 0)
}

/// [`contiguous_rows`] with `pad` zero rows after the second-to-last axis (x [.., n, len] ->
/// [.., n + pad, len]): on a GPU the same one kernel, where a copy and then
/// `pad_with_zeros` (a zero fill and a concatenation) read and write the result twice more;
/// elsewhere exactly those.
pub(crate) fn contiguous_rows_padded(x: &Tensor, pad: usize) -> candle_core::Result<Tensor> {
    let x = x.detach();
    let (dims, strides) = (x.dims(), x.stride());
    let fits = |v: &usize| *v < (1 << 31);
    let rank = dims.len();
    let kernel = apply_any_float(&x)
        && kernel_on("copy_rows")
        && (2..=COPY_ROWS_MAX_AXES + 1).contains(&rank)
        && strides.last() == Some(&1)
        && dims.iter().chain(strides.iter()).chain([&(dims[rank - 2] + pad)]).all(fits)
        && !(x.is_contiguous() && pad == 0);
    if kernel {
        return x.apply_op1_no_bwd(&CopyRows { pad });
    }
    let y = x.contiguous()?;
    if pad == 0 || rank < 2 {
        Ok(y)
    } else {
        y.pad_with_zeros(rank - 2, 0, pad)
    }
}

/// [`cat3`] as a candle op along the first axis, with a backward (each input's gradient a
/// contiguous view of the output's). On the CPU (the GPU path rehearsed, `ops::with_gpu_path`)
/// the same concatenation on the host, so that the rehearsal runs this op and its backward.
struct Cat3;

impl Cat3 {
    fn shape(l: [&candle_core::Layout; 3]) -> candle_core::Result<candle_core::Shape> {
        let d = l[0].dims();
        if d.is_empty() || l.iter().any(|x| x.dims().len() != d.len() || x.dims()[1..] != d[1..] || !x.is_contiguous()) {
            candle_core::bail!("klspeech-kernel-cat3: inputs {:?}, {:?}, {:?}", l[0].dims(), l[1].dims(), l[2].dims());
        }
        let mut out = d.to_vec();
        out[0] = l.iter().map(|x| x.dims()[0]).sum();
        Ok(candle_core::Shape::from(out))
    }
}

impl candle_core::CustomOp3 for Cat3 {
    fn name(&self) -> &'static str {
        "klspeech-kernel-cat3"
    }
    fn cpu_fwd(
        &self,
        a: &candle_core::CpuStorage,
        la: &candle_core::Layout,
        b: &candle_core::CpuStorage,
        lb: &candle_core::Layout,
        c: &candle_core::CpuStorage,
        lc: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage as S;
        let shape = Self::shape([la, lb, lc])?;
        fn join<T: Copy>(parts: [(&[T], &candle_core::Layout); 3]) -> Vec<T> {
            parts.iter().flat_map(|(s, l)| l.contiguous_offsets().map(|(x, y)| &s[x..y]).unwrap_or(&[]).iter().copied()).collect()
        }
        let out = match (a, b, c) {
            (S::F32(a), S::F32(b), S::F32(c)) => S::F32(join([(a, la), (b, lb), (c, lc)])),
            (S::F64(a), S::F64(b), S::F64(c)) => S::F64(join([(a, la), (b, lb), (c, lc)])),
            (S::BF16(a), S::BF16(b), S::BF16(c)) => S::BF16(join([(a, la), (b, lb), (c, lc)])),
            (S::F16(a), S::F16(b), S::F16(c)) => S::F16(join([(a, la), (b, lb), (c, lc)])),
            _ => {
                use candle_core::backend::BackendStorage;
                candle_core::bail!("klspeech-kernel-cat3: inputs of {:?}, {:?}, {:?}", a.dtype(), b.dtype(), c.dtype())
            }
        };
        Ok((out, shape))
    }
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    fn cuda_fwd(
        &self,
        a: &candle_core::CudaStorage,
        la: &candle_core::Layout,
        b: &candle_core::CudaStorage,
        lb: &candle_core::Layout,
        c: &candle_core::CudaStorage,
        lc: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        #[cfg(feature = "cuda")]
        {
            let shape = Self::shape([la, lb, lc])?;
            let dtype = candle_core::backend::BackendStorage::dtype(a);
            let plan = cat3(la.shape().elem_count(), lb.shape().elem_count(), lc.shape().elem_count(), dtype);
            gpu::launch_op(&plan, &[(a, la), (b, lb), (c, lc)], &shape)
        }
        #[cfg(not(feature = "cuda"))]
        {
            candle_core::bail!("klspeech-kernel-cat3: built without CUDA")
        }
    }
    fn bwd(&self, a: &Tensor, b: &Tensor, _c: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (na, nb) = (a.dim(0)?, b.dim(0)?);
        let n = g.dim(0)?;
        Ok((Some(g.narrow(0, 0, na)?), Some(g.narrow(0, na, nb)?), Some(g.narrow(0, na + nb, n - na - nb)?)))
    }
}

/// Three tensors of one type and trailing shape concatenated along their first axis, with a
/// gradient: off the CPU (and on the CPU rehearsing the GPU's path) one [`cat3`] pass, where
/// candle's concatenation runs a 2-D copy per input (about 14 µs a call in the H200's
/// profiles); elsewhere, with `KLSPEECH_NO_KERNEL=copy_rows`, or for other inputs,
/// `Tensor::cat`. The attention's packed q / k / v weights and biases (two a layer, every
/// training step and inference batch off the CPU).
pub(crate) fn concat3(parts: [&Tensor; 3]) -> candle_core::Result<Tensor> {
    let [a, b, c] = parts;
    let float = matches!(a.dtype(), DType::F32 | DType::BF16 | DType::F16) || (a.device().is_cpu() && a.dtype() == DType::F64);
    let same = [b, c].iter().all(|x| x.dtype() == a.dtype() && x.rank() == a.rank() && x.rank() > 0 && x.dims()[1..] == a.dims()[1..]);
    let small = a.elem_count() + b.elem_count() + c.elem_count() < (1 << 31);
    if super::device_op_applies(a) && kernel_on("copy_rows") && float && same && small && [a, b, c].iter().all(|x| x.elem_count() > 0) {
        return a.contiguous()?.apply_op3(&b.contiguous()?, &c.contiguous()?, Cat3);
    }
    Tensor::cat(&[a, b, c], 0)
}

/// [`merge_qkv`] as a candle op without a backward: (dq, dk, dv) -> [b, t, 3 nh hd].
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct MergeQkv {
    t: usize,
}

impl candle_core::CustomOp3 for MergeQkv {
    fn name(&self) -> &'static str {
        "klspeech-kernel-merge-qkv"
    }
    cuda_only!(3);
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        lq: &candle_core::Layout,
        k: &candle_core::CudaStorage,
        lk: &candle_core::Layout,
        v: &candle_core::CudaStorage,
        lv: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        #[cfg(feature = "cuda")]
        {
            let (b, nh, t, hd) = lq.shape().dims4()?;
            let (kb, knh, tk, khd) = lk.shape().dims4()?;
            if t != self.t || (kb, knh, khd) != (b, nh, hd) || lv.shape() != lk.shape() || tk < t {
                candle_core::bail!("klspeech-kernel-merge-qkv: dq {:?}, dk {:?}, dv {:?} for {} frames", lq.shape(), lk.shape(), lv.shape(), self.t);
            }
            let dtype = candle_core::backend::BackendStorage::dtype(q);
            gpu::launch_op(&merge_qkv(b, t, nh, hd, tk, dtype), &[(q, lq), (k, lk), (v, lv)], &candle_core::Shape::from((b, t, 3 * nh * hd)))
        }
        #[cfg(not(feature = "cuda"))]
        {
            candle_core::bail!("klspeech-kernel-merge-qkv: built without CUDA")
        }
    }
}

/// The attention backward's head gradients as the packed projection's gradient: dq
/// [B, nh, T, hd] and dk, dv [B, nh, T + pad, hd] (the padded keys' rows dropped) ->
/// [B, T, 3 nh hd]. On a GPU one [`merge_qkv`] pass (under the `copy_rows` switch), elsewhere
/// a copy of dk's and dv's first T rows, a stack and a transposed copy.
pub(crate) fn merge_head_grads(dq: &Tensor, dk: &Tensor, dv: &Tensor) -> candle_core::Result<Tensor> {
    let (b, nh, t, hd) = dq.dims4()?;
    let (dq, dk, dv) = (dq.detach(), dk.detach(), dv.detach());
    let small = [b * t * 3 * nh, dk.elem_count(), dq.elem_count()].iter().all(|v| *v < (1 << 31));
    if apply_any_float(&dq) && kernel_on("copy_rows") && small && dk.dtype() == dq.dtype() && dv.dtype() == dq.dtype() {
        return dq.contiguous()?.apply_op3_no_bwd(&dk.contiguous()?, &dv.contiguous()?, &MergeQkv { t });
    }
    let rows = |x: &Tensor| contiguous_rows(&x.narrow(2, 0, t)?);
    // [3, B, nh, T, hd] -> [B, T, 3, nh, hd] -> [B, T, 3H]
    let all = Tensor::stack(&[dq, rows(&dk)?, rows(&dv)?], 0)?.permute((1, 3, 0, 2, 4))?;
    contiguous_rows(&all)?.reshape((b, t, 3 * nh * hd))
}

#[cfg(feature = "cuda")]
pub(crate) use gpu::{launch_in_place, launch_in_place_after, with_address_mut};

#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
    use candle_core::{bail, DType, Layout, Shape};

    use super::{Arg, Launch};

    /// The kernels, compiled to PTX by build.rs.
    pub(crate) const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/klspeech_kernels.ptx"));

    /// Runs `plan` on `target` in place (its first buffer, contiguous f32; bf16 or f16 for the
    /// kernels that take them) with `inputs` of the same type after it.
    pub(crate) fn launch_in_place(plan: &Launch, target: &mut CudaStorage, tl: &Layout, inputs: &[(&CudaStorage, &Layout)]) -> candle_core::Result<()> {
        launch_in_place_after(plan, None, target, tl, inputs)
    }

    /// [`launch_in_place`] with a `lead` buffer before the target: the device address of
    /// another in-place target of the same type, which the caller holds locked
    /// ([`with_address_mut`]).
    pub(crate) fn launch_in_place_after(plan: &Launch, lead: Option<u64>, target: &mut CudaStorage, tl: &Layout, inputs: &[(&CudaStorage, &Layout)]) -> candle_core::Result<()> {
        match target.dtype() {
            DType::F32 => launch_in_place_as::<f32>(plan, lead, target, tl, inputs),
            DType::BF16 => launch_in_place_as::<half::bf16>(plan, lead, target, tl, inputs),
            DType::F16 => launch_in_place_as::<half::f16>(plan, lead, target, tl, inputs),
            other => bail!("klspeech kernel {}: no {other:?} version", plan.name),
        }
    }

    /// [`launch_in_place`] for an f32 target whose inputs are each of their own type (f32, bf16
    /// or f16).
    pub(crate) fn launch_in_place_f32(plan: &Launch, target: &mut CudaStorage, tl: &Layout, inputs: &[(&CudaStorage, &Layout)]) -> candle_core::Result<()> {
        let Some((a, _)) = tl.contiguous_offsets() else { bail!("klspeech kernel {}: non-contiguous in-place target", plan.name) };
        let dev = target.device().clone();
        let stream = dev.cuda_stream();
        let t = target.as_cuda_slice_mut::<f32>()?;
        let (p, tg) = t.device_ptr_mut(&stream);
        let mut ptrs: Vec<u64> = vec![p + 4 * a as u64];
        let mut guards = Vec::with_capacity(inputs.len());
        for (s, l) in inputs {
            let Some((a, _)) = l.contiguous_offsets() else { bail!("klspeech kernel {}: non-contiguous input", plan.name) };
            let (p, g, size) = match s.dtype() {
                DType::F32 => {
                    let (p, g) = s.as_cuda_slice::<f32>()?.device_ptr(&stream);
                    (p, g, 4u64)
                }
                DType::BF16 => {
                    let (p, g) = s.as_cuda_slice::<half::bf16>()?.device_ptr(&stream);
                    (p, g, 2)
                }
                DType::F16 => {
                    let (p, g) = s.as_cuda_slice::<half::f16>()?.device_ptr(&stream);
                    (p, g, 2)
                }
                other => bail!("klspeech kernel {}: no {other:?} version", plan.name),
            };
            ptrs.push(p + size * a as u64);
            guards.push(g);
        }
        run_plan(&dev, plan, &ptrs)?;
        drop(guards);
        drop(tg);
        Ok(())
    }

    /// Runs `f` with the device address of `s`'s contiguous data (f32, bf16 or f16), `s` held
    /// for writing meanwhile.
    pub(crate) fn with_address_mut<R>(s: &mut CudaStorage, l: &Layout, f: impl FnOnce(u64) -> candle_core::Result<R>) -> candle_core::Result<R> {
        fn of<T: CudaDType + DeviceRepr, R>(s: &mut CudaStorage, l: &Layout, f: impl FnOnce(u64) -> candle_core::Result<R>) -> candle_core::Result<R> {
            let Some((a, _)) = l.contiguous_offsets() else { bail!("klspeech kernel: non-contiguous in-place target") };
            let stream = s.device().cuda_stream();
            let (p, guard) = s.as_cuda_slice_mut::<T>()?.device_ptr_mut(&stream);
            let r = f(p + std::mem::size_of::<T>() as u64 * a as u64);
            drop(guard);
            r
        }
        match s.dtype() {
            DType::F32 => of::<f32, R>(s, l, f),
            DType::BF16 => of::<half::bf16, R>(s, l, f),
            DType::F16 => of::<half::f16, R>(s, l, f),
            other => bail!("klspeech kernel: no {other:?} version"),
        }
    }

    fn launch_in_place_as<T: CudaDType + DeviceRepr>(plan: &Launch, lead: Option<u64>, target: &mut CudaStorage, tl: &Layout, inputs: &[(&CudaStorage, &Layout)]) -> candle_core::Result<()> {
        let Some((a, _)) = tl.contiguous_offsets() else { bail!("klspeech kernel {}: non-contiguous in-place target", plan.name) };
        let size = std::mem::size_of::<T>() as u64;
        let dev = target.device().clone();
        let stream = dev.cuda_stream();
        let mut ptrs: Vec<u64> = Vec::with_capacity(inputs.len() + 2);
        ptrs.extend(lead);
        let t = target.as_cuda_slice_mut::<T>()?;
        let (p, tg) = t.device_ptr_mut(&stream);
        ptrs.push(p + size * a as u64);
        let mut guards = Vec::with_capacity(inputs.len());
        for (s, l) in inputs {
            let Some((a, _)) = l.contiguous_offsets() else { bail!("klspeech kernel {}: non-contiguous input", plan.name) };
            // (An input of another type is an error here, not a misread buffer.)
            let (p, g) = s.as_cuda_slice::<T>()?.device_ptr(&stream);
            ptrs.push(p + size * a as u64);
            guards.push(g);
        }
        run_plan(&dev, plan, &ptrs)?;
        drop(guards);
        drop(tg);
        Ok(())
    }

    /// Runs `plan` whose only buffer is a new output of `shape` (f32) on `like`'s device.
    pub(crate) fn launch_fill(like: &CudaStorage, plan: &Launch, shape: &Shape) -> candle_core::Result<(CudaStorage, Shape)> {
        launch::<f32, f32>(like.device().clone(), plan, &[], shape)
    }

    /// Runs `plan` with `inputs` (each with its layout, contiguous) as its first buffers and one
    /// new output of `out` elements as its last, all of the first input's type (f32; bf16 or
    /// f16 for the kernels that take them); returns the output as a storage of shape `shape`.
    pub(crate) fn launch_op(plan: &Launch, inputs: &[(&CudaStorage, &Layout)], shape: &Shape) -> candle_core::Result<(CudaStorage, Shape)> {
        let Some((first, _)) = inputs.first() else { bail!("klspeech kernel {}: no inputs", plan.name) };
        let dev = first.device().clone();
        match first.dtype() {
            DType::F32 => launch::<f32, f32>(dev, plan, inputs, shape),
            DType::BF16 => launch::<half::bf16, half::bf16>(dev, plan, inputs, shape),
            DType::F16 => launch::<half::f16, half::f16>(dev, plan, inputs, shape),
            other => bail!("klspeech kernel {}: no {other:?} version", plan.name),
        }
    }

    /// [`launch_op`] with an f32 output whatever the inputs' type (`kl_colsum` over the f32
    /// sums stored in a half-type backward's output).
    pub(crate) fn launch_op_f32_out(plan: &Launch, inputs: &[(&CudaStorage, &Layout)], shape: &Shape) -> candle_core::Result<(CudaStorage, Shape)> {
        let Some((first, _)) = inputs.first() else { bail!("klspeech kernel {}: no inputs", plan.name) };
        let dev = first.device().clone();
        match first.dtype() {
            DType::F32 => launch::<f32, f32>(dev, plan, inputs, shape),
            DType::BF16 => launch::<half::bf16, f32>(dev, plan, inputs, shape),
            DType::F16 => launch::<half::f16, f32>(dev, plan, inputs, shape),
            other => bail!("klspeech kernel {}: no {other:?} version", plan.name),
        }
    }

    /// Runs `plan` with one input view (any strides: its buffer starts at the view's first
    /// element, the kernel walks the strides) and one new output of `shape`, both of the view's
    /// type.
    pub(crate) fn launch_op_view(plan: &Launch, (s, l): (&CudaStorage, &Layout), shape: &Shape) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = s.device().clone();
        match s.dtype() {
            DType::F32 => launch_view::<f32>(dev, plan, (s, l), shape),
            DType::BF16 => launch_view::<half::bf16>(dev, plan, (s, l), shape),
            DType::F16 => launch_view::<half::f16>(dev, plan, (s, l), shape),
            other => bail!("klspeech kernel {}: no {other:?} version", plan.name),
        }
    }

    fn launch_view<T: CudaDType + DeviceRepr>(dev: CudaDevice, plan: &Launch, (s, l): (&CudaStorage, &Layout), shape: &Shape) -> candle_core::Result<(CudaStorage, Shape)> {
        let stream = dev.cuda_stream();
        let size = std::mem::size_of::<T>() as u64;
        // SAFETY: the kernel writes every element of its output (the plan covers the shape).
        let out = unsafe { dev.alloc::<T>(shape.elem_count())? };
        let (p, g) = s.as_cuda_slice::<T>()?.device_ptr(&stream);
        let (po, go) = out.device_ptr(&stream);
        run_plan(&dev, plan, &[p + size * l.start_offset() as u64, po])?;
        drop((g, go));
        Ok((CudaStorage::wrap_cuda_slice(out, dev), shape.clone()))
    }

    /// Inputs of type T (their addresses: the element offset of their layout in T), a new
    /// output of O.
    fn launch<T: CudaDType + DeviceRepr, O: CudaDType + DeviceRepr>(dev: CudaDevice, plan: &Launch, inputs: &[(&CudaStorage, &Layout)], shape: &Shape) -> candle_core::Result<(CudaStorage, Shape)> {
        let stream = dev.cuda_stream();
        let size = std::mem::size_of::<T>() as u64;
        // SAFETY: the kernel writes every element of its output (each plan covers the shape).
        let out = unsafe { dev.alloc::<O>(shape.elem_count())? };
        let mut ptrs: Vec<u64> = Vec::with_capacity(inputs.len() + 1);
        let mut guards = Vec::with_capacity(inputs.len() + 1);
        for (s, l) in inputs {
            let Some((a, _)) = l.contiguous_offsets() else { bail!("klspeech kernel {}: non-contiguous input", plan.name) };
            // (An input of another type is an error here, not a misread buffer.)
            let slice = s.as_cuda_slice::<T>()?;
            let (p, g) = slice.device_ptr(&stream);
            ptrs.push(p + size * a as u64);
            guards.push(g);
        }
        let (p, g) = out.device_ptr(&stream);
        ptrs.push(p);
        guards.push(g);
        run_plan(&dev, plan, &ptrs)?;
        drop(guards);
        Ok((CudaStorage::wrap_cuda_slice(out, dev), shape.clone()))
    }

    /// Launches `plan` with `ptrs` as its buffers (device addresses, in order).
    fn run_plan(dev: &CudaDevice, plan: &Launch, ptrs: &[u64]) -> candle_core::Result<()> {
        let f = dev.get_or_load_custom_func(plan.name, "klspeech_kernels", PTX)?;
        let mut b = f.builder();
        let (mut ints, mut floats, mut longs) = (Vec::new(), Vec::new(), Vec::new());
        for a in &plan.args {
            match *a {
                Arg::I32(v) => ints.push(v),
                Arg::F32(v) => floats.push(v),
                Arg::U64(v) => longs.push(v),
                _ => {}
            }
        }
        let null = 0u64;
        let (mut i, mut fl, mut lo) = (0, 0, 0);
        for a in &plan.args {
            match *a {
                Arg::Buf(k) => match ptrs.get(k) {
                    Some(p) => {
                        b.arg(p);
                    }
                    None => bail!("klspeech kernel {}: buffer {k} of {}", plan.name, ptrs.len()),
                },
                Arg::Null => {
                    b.arg(&null);
                }
                Arg::I32(_) => {
                    b.arg(&ints[i]);
                    i += 1;
                }
                Arg::F32(_) => {
                    b.arg(&floats[fl]);
                    fl += 1;
                }
                Arg::U64(_) => {
                    b.arg(&longs[lo]);
                    lo += 1;
                }
            }
        }
        let cfg = LaunchConfig { grid_dim: (plan.grid, 1, 1), block_dim: (plan.block, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the arguments follow the kernel's signature (the plan; tests/cuda_kernels.rs
        // runs the same plans against the same source), pointers are live device buffers of
        // the sizes the plan covers.
        unsafe { b.launch(cfg) }.map_err(|e| candle_core::Error::Cuda(Box::new(e)))?;
        Ok(())
    }
}
