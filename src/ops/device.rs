//! Differentiable ops for devices without klspeech's CPU kernels (CUDA): the forward is one of
//! candle's fused kernels, which have no backward, and the backward is klspeech's, written with
//! few tensor ops. Against the composites they replace, a training step on a GPU launches far
//! fewer kernels: the composite standardization is 7 graph nodes, each with its own few ops in
//! the backward (and, before the vendored candle-core's patch, a zero fill and an add each).
//!
//! They run on any device: the tests check them on the CPU against the composites and finite
//! differences.

use std::sync::Mutex;

use candle_core::{bail, CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, D};

use crate::error::Result;

/// Copies tensor `$y` (a `Storage::$variant`) into a new storage laid out as `$relayout`
/// (a `Layout` from the `Layout` `$l` of y): how these ops hand out a forward computed before
/// the op was applied.
macro_rules! copy_out {
    ($y:expr, $variant:ident, |$l:ident| $relayout:expr) => {{
        use candle_core::backend::{BackendDevice, BackendStorage};
        let y = $y;
        let (st, $l) = y.storage_and_layout();
        let candle_core::Storage::$variant(st) = &*st else { candle_core::bail!("klspeech device op: output on another device") };
        let lt: candle_core::Layout = $relayout;
        // SAFETY: the strided copy below writes every element.
        let mut dst = unsafe { st.device().alloc_uninit(lt.shape(), st.dtype())? };
        st.copy_strided_src(&mut dst, 0, &lt)?;
        Ok((dst, lt.shape().clone()))
    }};
}

/// A [`Pending`] output handed out as a CPU op's forward (`transpose`: [B, C, T] -> [B, T, C]).
pub(crate) fn handout_cpu(y: &Pending, transpose: bool) -> candle_core::Result<(CpuStorage, Shape)> {
    copy_out!(y.take()?, Cpu, |l| if transpose { l.transpose(1, 2)? } else { l.clone() })
}

/// [`handout_cpu`] for a CUDA op's forward.
pub(crate) fn handout_cuda(y: &Pending, transpose: bool) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
    #[cfg(feature = "cuda")]
    {
        copy_out!(y.take()?, Cuda, |l| if transpose { l.transpose(1, 2)? } else { l.clone() })
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (y, transpose);
        bail!("klspeech device op: built without CUDA")
    }
}

/// Which forward a [`Precomputed`] op holds, and so which backward it has.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// (x - mean) / sqrt(var + eps) over the last dimension.
    Standardize { eps: f64 },
    /// Softmax over the last dimension.
    Softmax,
}

/// A forward output computed by candle before its op is applied, taken (not kept: the graph
/// holds the op until the backward, which needs only the op's own output) when the op's
/// forward runs.
pub(crate) struct Pending(Mutex<Option<Tensor>>);

impl Pending {
    pub(crate) fn new(y: Tensor) -> Self {
        Pending(Mutex::new(Some(y)))
    }
    pub(crate) fn take(&self) -> candle_core::Result<Tensor> {
        match self.0.lock().ok().and_then(|mut y| y.take()) {
            Some(y) => Ok(y),
            None => bail!("klspeech device op: the forward ran twice"),
        }
    }
}

/// The pending output of an op built for its forward (not the forward-only helper instance).
fn pending(p: &Option<Pending>) -> candle_core::Result<&Pending> {
    match p {
        Some(p) => Ok(p),
        None => bail!("klspeech device op: no forward output"),
    }
}

/// An op whose forward is a [`Pending`] output.
struct Precomputed {
    kind: Kind,
    y: Pending,
}

impl Precomputed {
    fn apply(x: &Tensor, y: Tensor, kind: Kind) -> Result<Tensor> {
        Ok(x.apply_op1(Precomputed { kind, y: Pending::new(y) })?)
    }
}

impl CustomOp1 for Precomputed {
    fn name(&self) -> &'static str {
        match self.kind {
            Kind::Standardize { .. } => "klspeech-standardize-device",
            Kind::Softmax => "klspeech-softmax-device",
        }
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        handout_cpu(&self.y, false)
    }

    fn cuda_fwd(&self, _: &candle_core::CudaStorage, _: &Layout) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        handout_cuda(&self.y, false)
    }

    /// With y the op's output and g the gradient of y, over the last dimension:
    /// softmax: dx = y (g - sum(g y));
    /// standardize: dx = (g - mean(g) - y mean(g y)) / sqrt(var(x) + eps).
    fn bwd(&self, x: &Tensor, y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let y = y.detach();
        Ok(Some(match self.kind {
            Kind::Softmax if super::kernels::apply(g) => super::kernels::softmax_bwd_of(&y, g, None, 1.0)?,
            Kind::Softmax if super::kernels::apply_half(g) && y.dtype() == g.dtype() => super::kernels::softmax_bwd_of(&y, g, None, 1.0)?,
            Kind::Softmax => y.mul(&g.broadcast_sub(&g.mul(&y)?.sum_keepdim(D::Minus1)?)?)?,
            Kind::Standardize { eps } => {
                let x = x.detach();
                let xc = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
                let rstd = (xc.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
                let centered = g.broadcast_sub(&g.mean_keepdim(D::Minus1)?)?;
                centered.sub(&y.broadcast_mul(&g.mul(&y)?.mean_keepdim(D::Minus1)?)?)?.broadcast_mul(&rstd)?
            }
        }))
    }
}

/// [`super::standardize_last`] off the CPU: the rows centred first (two kernels), then candle's
/// fused LayerNorm kernel (weight 1, bias 0); one op in the graph, the backward above.
///
/// candle's kernel takes the variance as E[x^2] - E[x]^2 in f32 sums, which cancels for rows
/// whose mean is large against their spread (a mean of 1e3 and a spread of 1 leave nothing of
/// the variance); on centred rows it is exact to rounding, as the two-pass composite is.
/// Its f64 instance also sums and scales in f32 (a finite-difference gradient check in f64 on
/// the GPU came out 1.3 % off through it), so f64 rows take the two-pass composite instead.
///
/// For f32 on a GPU, klspeech's kernel instead (`ops::kernels`): one launch each way, where
/// this is five (centring, the fused kernel, its hand-out) forward and about fourteen backward.
pub fn standardize_last_device(x: &Tensor, eps: f64) -> Result<Tensor> {
    if super::kernels::apply(x) {
        return Ok(super::kernels::standardize(x, eps)?);
    }
    if super::kernels::apply_half(x) && x.track_op() {
        // bf16 / f16 training: the kernel's half-type instance (its backward reads the output
        // as stored).
        return Ok(super::kernels::standardize(x, eps)?);
    }
    let d = x.dim(D::Minus1)?;
    let xd = x.detach();
    let xc = xd.broadcast_sub(&xd.mean_keepdim(D::Minus1)?)?;
    let y = if x.dtype() == DType::F64 {
        // candle's layernorm_f64 sums and scales in f32: f64 takes the two-pass composite.
        xc.broadcast_div(&(xc.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?)?
    } else {
        let ones = Tensor::ones(d, x.dtype(), x.device())?;
        let zeros = Tensor::zeros(d, x.dtype(), x.device())?;
        candle_nn::ops::layer_norm(&xc, &ones, &zeros, eps as f32)?
    };
    Precomputed::apply(x, y, Kind::Standardize { eps })
}

/// [`super::softmax_last`] off the CPU: candle's fused softmax kernel forward, one op in the
/// graph, the backward above.
pub fn softmax_last_device(x: &Tensor) -> Result<Tensor> {
    let y = candle_nn::ops::softmax_last_dim(&x.detach().contiguous()?)?;
    Precomputed::apply(x, y, Kind::Softmax)
}

/// [`super::linear`] off the CPU: y = x W^T (+ b) by candle (cuBLAS), one graph node whose
/// backward is dx = g W, dW = g^T x, db = sum of g's rows, the parameters' gradients handed to
/// `ops::backward`'s store as computed. The composite is 3-4 nodes (transpose, matmul,
/// broadcast, add), whose backward hands the weight a transposed gradient that candle's store
/// copies to make it contiguous.
pub fn linear_device(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = x.detach().matmul(&w.detach().t()?)?;
    let y = match b {
        Some(b) => super::kernels::add_bias_fresh(y, &b.detach(), false)?,
        None => y,
    };
    let op = LinearDevice(Pending::new(y));
    Ok(match b {
        Some(b) => x.apply_op3(w, b, op)?,
        None => x.apply_op2(w, op)?,
    })
}

struct LinearDevice(Pending);

/// The sum over rows of g [rows, out] as one product with a row of ones ([1, rows] x g: a
/// cuBLAS product on a GPU, summed in f32 for every type; with TF32 on, g's values rounded to
/// TF32 as in the weight gradient's product). candle's sum over the first axis
/// took 25 µs a call on the H200 (55 calls, 1.4 ms of a base f32 training step: the linear
/// layers' bias gradients), about 200 GB/s.
fn row_sum(g: &Tensor) -> candle_core::Result<Tensor> {
    let rows = g.dim(0)?;
    Tensor::ones((1, rows), g.dtype(), g.device())?.matmul(&g.contiguous()?)?.squeeze(0)
}

impl LinearDevice {
    /// (dx, dW, db) for x [rows, in], w [out, in] and g [rows, out]; each only where its input
    /// takes a gradient.
    fn grads(x: &Tensor, w: &Tensor, b: Option<&Tensor>, g: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = if x.track_op() { Some(g.matmul(&w.detach())?) } else { None };
        let dw = if w.track_op() { Some(g.t()?.matmul(&x.detach())?) } else { None };
        let db = match b {
            Some(b) if b.track_op() => Some(row_sum(g)?),
            _ => None,
        };
        let dw = super::grads::route(w, dw)?;
        let db = match b {
            Some(b) => super::grads::route(b, db)?,
            None => None,
        };
        Ok((dx, dw, db))
    }
}

impl CustomOp2 for LinearDevice {
    fn name(&self) -> &'static str {
        "klspeech-linear-device"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        handout_cpu(&self.0, false)
    }
    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout, _: &CudaStorage, _: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        handout_cuda(&self.0, false)
    }
    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = Self::grads(x, w, None, g)?;
        Ok((dx, dw))
    }
}

impl CustomOp3 for LinearDevice {
    fn name(&self) -> &'static str {
        "klspeech-linear-bias-device"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        handout_cpu(&self.0, false)
    }
    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout, _: &CudaStorage, _: &Layout, _: &CudaStorage, _: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        handout_cuda(&self.0, false)
    }
    fn bwd(&self, x: &Tensor, w: &Tensor, b: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Self::grads(x, w, Some(b), g)
    }
}

static KEY_PAD: super::EnvSwitch = super::EnvSwitch::new("KLSPEECH_NO_KEY_PAD");

/// Zero keys (and values) added after the T real ones so that the attention's [T, T] products
/// have rows of a multiple of 8 (16 bytes of bf16 / f16, 32 of f32): with T = 199 (4 s) or 499
/// (10 s) cuBLAS can only take its unaligned kernels for the scores and the products with the
/// probabilities (on the H200, Turing-era `align1` kernels for bf16). The padded keys get
/// probability 0 (a bias of -inf, or the [`super::kernels::attn_softmax_of`] kernel), so every
/// result is the unpadded attention's. 0 when T is a multiple of 8, or with
/// `KLSPEECH_NO_KEY_PAD=1` (before/after benchmarks).
pub fn key_padding(t: usize) -> usize {
    if KEY_PAD.on() {
        t.next_multiple_of(8) - t
    } else {
        0
    }
}

/// Turns [`key_padding`] on or off for the whole process (tests, before/after benchmarks).
pub fn set_key_padding(on: bool) {
    KEY_PAD.set(on);
}

/// The heads of a packed projection qkv [B, T, 3H]: q [B, nh, T, hd] and the keys and values
/// [B, nh, T + pad, hd] with `pad` zero rows after the T real ones, all three views of one
/// [3, B, nh, T + pad, hd] copy (on a GPU one `kl_copy_rows` pass writing the padding too,
/// where the head split and then a zero fill and a concatenation for each of k and v read
/// and wrote them three times; q's padding rows are written and never read).
fn split_heads(qkv: &Tensor, heads: usize, pad: usize) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let (b, t, h3) = qkv.dims3()?;
    let hd = h3 / 3 / heads;
    // [B, T, 3, nh, hd] -> [3, B, nh, T + pad, hd]
    let all = super::kernels::contiguous_rows_padded(&qkv.reshape((b, t, 3, heads, hd))?.permute((2, 0, 3, 1, 4))?, pad)?;
    Ok((all.get(0)?.narrow(2, 0, t)?, all.get(1)?, all.get(2)?))
}

/// A [B, nh, T, T] tensor with `pad` zero columns after its T.
fn pad_keys_last(x: Tensor, pad: usize) -> candle_core::Result<Tensor> {
    if pad == 0 {
        Ok(x)
    } else {
        x.pad_with_zeros(3, 0, pad)
    }
}

/// The probabilities [B, nh, T, T + pad] of scores s = q k^T over T real keys and `pad` zero
/// ones: softmax(scale s + key bias) over the real keys, 0 for the padding. On a GPU one kernel
/// (scale, bias, softmax and padding together: [`super::kernels::attn_softmax_of`]); elsewhere
/// the scale, a bias of -inf on the padding and candle's softmax. No gradient.
fn probabilities(s: &Tensor, key_bias: Option<&Tensor>, t: usize, scale: f64) -> candle_core::Result<Tensor> {
    let (b, _, _, tp) = s.dims4()?;
    let kernel = (super::kernels::apply(s) || super::kernels::apply_half(s)) && super::kernels::kernel_on("attn_softmax");
    if kernel && key_bias.is_none_or(|kb| kb.dtype() == s.dtype()) {
        return super::kernels::attn_softmax_of(s, key_bias.map(|kb| kb.reshape((b, t))).transpose()?.as_ref(), t, scale);
    }
    let s = (s * scale)?;
    let bias = match (key_bias, tp - t) {
        (kb, 0) => kb.map(|kb| kb.reshape((b, t))).transpose()?,
        (kb, pad) => {
            let real = match kb {
                Some(kb) => kb.reshape((b, t))?,
                None => Tensor::zeros((b, t), s.dtype(), s.device())?,
            };
            let hidden = Tensor::full(f32::NEG_INFINITY, (b, pad), s.device())?.to_dtype(s.dtype())?;
            Some(Tensor::cat(&[real, hidden], 1)?)
        }
    };
    let s = match bias {
        Some(bias) => s.broadcast_add(&bias.reshape((b, 1, 1, tp))?)?,
        None => s,
    };
    super::softmax_last_dim_infer(&s).map_err(|e| candle_core::Error::Msg(e.to_string()))
}

/// [`super::attention_infer`] off the CPU's fused path: the composite's products over keys
/// padded to a multiple of 8 ([`key_padding`]) and the probabilities of [`probabilities`] (on a
/// GPU one kernel for the scale, the key bias and the softmax, where the composite ran the
/// scale on q and candle's softmax), qkv [B, T, 3H] -> o [B, T, H]. No gradient.
pub fn attention_infer_device(qkv: &Tensor, heads: usize, scale: f64, key_bias: Option<&Tensor>) -> Result<Tensor> {
    let (b, t, h3) = qkv.dims3()?;
    let (q, k, v) = split_heads(&qkv.detach(), heads, key_padding(t))?;
    // (cuBLAS reads k^T in place.)
    let p = probabilities(&q.matmul(&k.transpose(2, 3)?)?, key_bias, t, scale)?; // [B, nh, T, T + pad]
    Ok(super::kernels::contiguous_rows(&p.matmul(&v)?.transpose(1, 2)?)?.reshape((b, t, h3 / 3))?)
}

/// [`super::attention`] off the CPU: one graph node for the whole attention of a layer, from
/// the packed projection qkv [B, T, 3H] (q | k | v, heads of `hd` features) to o [B, T, H].
/// The forward is candle's (cuBLAS products, the fused softmax kernel, the keyed dropout mask
/// of [`super::dropout_mask`]); the op keeps q, k, v, the probabilities and the mask for its
/// backward (on a GPU about 45 MB per layer of a base 8 x 4 s step, as PyTorch keeps them;
/// recomputing them cost ten launches per layer), which runs the product rule in about ten
/// tensor ops. The composite is about 20 graph nodes per layer.
pub fn attention_device(qkv: &Tensor, heads: usize, scale: f64, key_bias: Option<&Tensor>, dropout: Option<(f64, u64)>) -> Result<Tensor> {
    let op = AttentionDevice { heads, scale, key_bias: key_bias.map(Tensor::detach), dropout: dropout.filter(|d| d.0 > 0.0), o: None, saved: Mutex::new(None) };
    let (parts, o) = op.forward(&qkv.detach())?;
    Ok(qkv.apply_op1(AttentionDevice { o: Some(Pending::new(o)), saved: Mutex::new(Some(parts)), ..op })?)
}

struct AttentionDevice {
    heads: usize,
    scale: f64,
    /// [B, T], added to every query's scores (a large negative value hides a key).
    key_bias: Option<Tensor>,
    dropout: Option<(f64, u64)>,
    o: Option<Pending>,
    /// The forward's q, k, v, probabilities and mask, taken by the backward.
    saved: Mutex<Option<AttentionParts>>,
}

/// What the forward computes and the backward needs again.
struct AttentionParts {
    /// [B, nh, T, hd] (a view of [`split_heads`]' padded copy)
    q: Tensor,
    /// Keys and values [B, nh, T + pad, hd] ([`key_padding`]: zero rows after the T).
    k: Tensor,
    v: Tensor,
    /// Softmax probabilities [B, nh, T, T + pad] (0 over the padding) and, with dropout, the
    /// mask factors.
    p: Tensor,
    mask: Option<Tensor>,
}

impl AttentionDevice {
    /// The parts and the output o [B, T, H].
    fn forward(&self, qkv: &Tensor) -> candle_core::Result<(AttentionParts, Tensor)> {
        let (b, t, h3) = qkv.dims3()?;
        // Keys and values padded to a multiple of 8 ([`key_padding`]): [B, nh, T + pad, hd].
        let pad = key_padding(t);
        let (q, k, v) = split_heads(qkv, self.heads, pad)?;
        // (cuBLAS reads k^T, like the transposes below, in place.)
        let s = q.matmul(&k.transpose(2, 3)?)?; // [B, nh, T, T + pad]
        let p = probabilities(&s, self.key_bias.as_ref(), t, self.scale)?;
        // The mask of the unpadded [B, nh, T, T] probabilities (the keyed stream's indices, as
        // the CPU's), zeros over the padding.
        let mask = match self.dropout {
            Some((rate, key)) => Some(pad_keys_last(super::dropout_mask(&p.narrow(3, 0, t)?, rate, key).map_err(|e| candle_core::Error::Msg(e.to_string()))?, pad)?),
            None => None,
        };
        let pd = match &mask {
            Some(m) => p.mul(m)?,
            None => p.clone(),
        };
        let o = super::kernels::contiguous_rows(&pd.matmul(&v)?.transpose(1, 2)?)?.reshape((b, t, h3 / 3))?;
        Ok((AttentionParts { q, k, v, p, mask }, o))
    }
}

impl CustomOp1 for AttentionDevice {
    fn name(&self) -> &'static str {
        "klspeech-attention-device"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        handout_cpu(pending(&self.o)?, false)
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        handout_cuda(pending(&self.o)?, false)
    }

    /// With P the probabilities, P' = P m after dropout, O = P' V and G the gradient of O:
    /// dV = P'^T G, dP = (G V^T) m, dS = P (dP - rowsum(dP P)) scale, dQ = dS K, dK = dS^T Q.
    fn bwd(&self, qkv: &Tensor, _o: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (b, t, h3) = qkv.dims3()?;
        let hd = h3 / 3 / self.heads;
        // The forward's values (recomputed only if the backward runs twice).
        let saved = self.saved.lock().ok().and_then(|mut s| s.take());
        let AttentionParts { q, k, v, p, mask } = match saved {
            Some(parts) => parts,
            None => self.forward(&qkv.detach())?.0,
        };
        let g = super::kernels::contiguous_rows(&g.reshape((b, t, self.heads, hd))?.transpose(1, 2)?)?; // [B, nh, T, hd]
        let pd = match &mask {
            Some(m) => p.mul(m)?,
            None => p.clone(),
        };
        // (With padded keys: dv and dk have the padding's rows, dropped below; dp and dS its
        // columns, where P is 0.)
        let dv = pd.transpose(2, 3)?.matmul(&g)?;
        let dp = g.matmul(&v.transpose(2, 3)?)?;
        let ds = if super::kernels::apply(&dp) {
            // One kernel: the mask, the row sums and the scale.
            super::kernels::softmax_bwd_of(&p, &dp, mask.as_ref(), self.scale)?
        } else if super::kernels::apply_half(&dp) && p.dtype() == dp.dtype() && mask.as_ref().is_none_or(|m| m.dtype() == dp.dtype()) {
            // bf16 / f16: the kernel's half-type instance.
            super::kernels::softmax_bwd_of(&p, &dp, mask.as_ref(), self.scale)?
        } else {
            let dp = match &mask {
                Some(m) => dp.mul(m)?,
                None => dp,
            };
            (p.mul(&dp.broadcast_sub(&dp.mul(&p)?.sum_keepdim(D::Minus1)?)?)? * self.scale)?
        };
        let dq = ds.matmul(&k)?;
        let dk = ds.transpose(2, 3)?.matmul(&q)?;
        // [B, T, 3H], the padded keys' rows of dk and dv dropped.
        let dqkv = super::kernels::merge_head_grads(&dq, &dk, &dv)?;
        if dqkv.dims() != [b, t, h3] {
            bail!("klspeech attention backward: merged gradient {:?} for [{b}, {t}, {h3}]", dqkv.dims());
        }
        Ok(Some(dqkv))
    }
}

/// [`super::kl_norm_last`] off the CPU: the standardization ([`standardize_last_device`]) and
/// then the rest of the site as one graph node: from x̂ and the packed parameters p = [w; b; a;
/// c] (+ [m_p; s_raw] with a learned prior), mu = x̂ w + b, sigma = softplus(x̂ a + c),
/// y = mu + sigma noise and the KL per position summed over features, packed as
/// [y (n values); kl (rows values)] as the CPU op packs them. The composite is about 20 nodes.
#[allow(clippy::too_many_arguments)]
pub fn kl_norm_last_device(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    a: &Tensor,
    c: &Tensor,
    prior: Option<(&Tensor, &Tensor)>,
    noise: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    let same_type = [w, b, a, c, noise].iter().all(|t| t.dtype() == x.dtype()) && prior.is_none_or(|(m, s)| m.dtype() == x.dtype() && s.dtype() == x.dtype());
    let x_hat = standardize_last_device(x, eps)?;
    let mut parts = vec![w.clone(), b.clone(), a.clone(), c.clone()];
    if let Some((m, s)) = prior {
        parts.push(m.clone());
        parts.push(s.clone());
    }
    let d = x.dim(D::Minus1)?;
    let p = Tensor::stack(&parts, 0)?; // [4 or 6, D]
    let n = x.elem_count();
    let rows = n / d.max(1);
    let noise = noise.reshape((rows, d))?.detach();
    if (super::kernels::apply(&x_hat) || super::kernels::apply_half(&x_hat)) && same_type {
        // f32, bf16 or f16 on a GPU: klspeech's kernels, one launch forward, two backward (the
        // half types: f32 arithmetic on the stored x̂, y and the KL rounded once, the
        // parameters' gradients summed in f32).
        let packed = super::kernels::kl_norm_site(&x_hat, &p, &noise)?;
        let y = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let mut kl_shape = x.dims().to_vec();
        kl_shape.pop();
        return Ok((y, packed.narrow(0, n, rows)?.reshape(kl_shape)?));
    }
    let op = KlNormDevice { noise, out: None };
    let fwd = op.parts(&x_hat.detach().reshape((rows, d))?, &p.detach())?;
    let out = Tensor::cat(&[fwd.y.flatten_all()?, fwd.kl.flatten_all()?], 0)?;
    let packed = x_hat.apply_op2(&p, KlNormDevice { out: Some(Pending::new(out)), ..op })?;
    let y = packed.narrow(0, 0, n)?.reshape(x.shape())?;
    let mut kl_shape = x.dims().to_vec();
    kl_shape.pop();
    let kl = packed.narrow(0, n, rows)?.reshape(kl_shape)?;
    Ok((y, kl))
}

struct KlNormDevice {
    /// [rows, D]
    noise: Tensor,
    out: Option<Pending>,
}

/// The forward's values, for the output and again for the backward.
struct KlParts {
    mu: Tensor,
    z: Tensor,
    sigma: Tensor,
    y: Tensor,
    /// [rows]
    kl: Tensor,
    /// With a learned prior: (m_p, 1 / s_p^2, s_p, s_raw), each [D].
    prior: Option<(Tensor, Tensor, Tensor, Tensor)>,
}

/// softplus(z) = max(z, 0) + ln(1 + e^-|z|), as `model::norm::softplus`.
fn softplus(z: &Tensor) -> candle_core::Result<Tensor> {
    z.relu()? + (z.abs()?.neg()?.exp()? + 1.0)?.log()?
}

/// 1 / (1 + e^-z): softplus' derivative.
fn sigmoid(z: &Tensor) -> candle_core::Result<Tensor> {
    (z.neg()?.exp()? + 1.0)?.recip()
}

impl KlNormDevice {
    /// x̂ [rows, D], p [4 or 6, D], both without a graph.
    fn parts(&self, xh: &Tensor, p: &Tensor) -> candle_core::Result<KlParts> {
        let row = |i: usize| p.get(i);
        let mu = xh.broadcast_mul(&row(0)?)?.broadcast_add(&row(1)?)?;
        let z = xh.broadcast_mul(&row(2)?)?.broadcast_add(&row(3)?)?;
        let sigma = softplus(&z)?;
        let y = (&mu + sigma.mul(&self.noise)?)?;
        let ln_sigma = sigma.log()?;
        let (per_elem, prior) = if p.dim(0)? == 6 {
            let (m, s_raw) = (row(4)?, row(5)?);
            let s = softplus(&s_raw)?;
            let inv_var = s.sqr()?.recip()?;
            let t1 = sigma.sqr()?.broadcast_mul(&inv_var)?;
            let t2 = mu.broadcast_sub(&m)?.sqr()?.broadcast_mul(&inv_var)?;
            let t3 = s.log()?.affine(2.0, -1.0)?; // 2 ln s_p - 1
            let per = ((t1 + t2)?.broadcast_add(&t3)? - ln_sigma.affine(2.0, 0.0)?)?.affine(0.5, 0.0)?;
            (per, Some((m, inv_var, s, s_raw)))
        } else {
            (((mu.sqr()? + sigma.sqr()?)? - ln_sigma.affine(2.0, 1.0)?)?.affine(0.5, 0.0)?, None)
        };
        let kl = per_elem.sum(D::Minus1)?;
        Ok(KlParts { mu, z, sigma, y, kl, prior })
    }
}

impl CustomOp2 for KlNormDevice {
    fn name(&self) -> &'static str {
        "klspeech-kl-norm-device"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        handout_cpu(pending(&self.out)?, false)
    }
    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout, _: &CudaStorage, _: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        handout_cuda(pending(&self.out)?, false)
    }
    /// With gy the gradient of y and gk of the per-position KL, per element:
    /// dmu = gy + gk (mu - m_p) / s_p^2, dsigma = gy noise + gk (sigma / s_p^2 - 1 / sigma),
    /// dz = dsigma sigmoid(z), dx̂ = dmu w + dz a; the parameters' gradients are the row sums
    /// of dmu x̂, dmu, dz x̂, dz (and -gk (mu - m_p) / s_p^2, gk (1 / s_p - (sigma^2 + (mu -
    /// m_p)^2) / s_p^3) sigmoid(s_raw) for a learned prior; m_p = 0, s_p = 1 otherwise).
    fn bwd(&self, x_hat: &Tensor, p: &Tensor, _out: &Tensor, g: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (rows, d) = self.noise.dims2()?;
        let xh = x_hat.detach().reshape((rows, d))?;
        let p = p.detach();
        let KlParts { mu, z, sigma, prior, .. } = self.parts(&xh, &p)?;
        let gy = g.narrow(0, 0, rows * d)?.reshape((rows, d))?;
        let gk = g.narrow(0, rows * d, rows)?.reshape((rows, 1))?;
        let (dmu, dsigma) = match &prior {
            Some((m, inv_var, _, _)) => (
                (&gy + mu.broadcast_sub(m)?.broadcast_mul(inv_var)?.broadcast_mul(&gk)?)?,
                (gy.mul(&self.noise)? + sigma.broadcast_mul(inv_var)?.sub(&sigma.recip()?)?.broadcast_mul(&gk)?)?,
            ),
            None => ((&gy + mu.broadcast_mul(&gk)?)?, (gy.mul(&self.noise)? + sigma.sub(&sigma.recip()?)?.broadcast_mul(&gk)?)?),
        };
        let dz = dsigma.mul(&sigmoid(&z)?)?;
        let dx = (dmu.broadcast_mul(&p.get(0)?)? + dz.broadcast_mul(&p.get(2)?)?)?.reshape(x_hat.shape())?;
        let mut dp = vec![dmu.mul(&xh)?.sum(0)?, dmu.sum(0)?, dz.mul(&xh)?.sum(0)?, dz.sum(0)?];
        if let Some((m, inv_var, s, s_raw)) = &prior {
            let diff = mu.broadcast_sub(m)?;
            dp.push(diff.broadcast_mul(inv_var)?.broadcast_mul(&gk)?.sum(0)?.neg()?);
            // d/ds_p of the KL per element: 1 / s_p - (sigma^2 + (mu - m_p)^2) / s_p^3
            let s3 = s.powf(3.0)?;
            let dkl_ds = (sigma.sqr()? + diff.sqr()?)?.broadcast_div(&s3)?.neg()?.broadcast_add(&s.recip()?)?;
            dp.push(dkl_ds.broadcast_mul(&gk)?.sum(0)?.mul(&sigmoid(s_raw)?)?);
        }
        Ok((Some(dx), Some(Tensor::stack(&dp, 0)?)))
    }
}
