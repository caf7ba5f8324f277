//! Training losses: CTC (speech recognition head) and label-smoothed cross-entropy
//! (classification head), with PyTorch's semantics and gradients.
//!
//! Everything here is differentiable through candle's autograd and works for any float dtype
//! on any device. The CTC forward-backward recursions run on the CPU in `f64` (they are
//! sequential and tiny next to the model); their exact gradient is then attached to the graph
//! with a surrogate term, so no custom op or device kernel is involved.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device, Tensor, D};

use crate::error::{Error, Result};

/// How per-utterance losses are combined (PyTorch's `reduction` argument).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reduction {
    /// Batch mean (for CTC: of each loss divided by its target length, clamped to >= 1).
    #[default]
    Mean,
    /// Sum over the batch.
    Sum,
    /// No reduction: one loss per utterance, shape [B].
    None,
}

impl FromStr for Reduction {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "mean" => Ok(Reduction::Mean),
            "sum" => Ok(Reduction::Sum),
            "none" => Ok(Reduction::None),
            _ => Err(Error::InvalidInput(format!("reduction `{s}`: expected `mean`, `sum` or `none`"))),
        }
    }
}

impl fmt::Display for Reduction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reduction::Mean => "mean",
            Reduction::Sum => "sum",
            Reduction::None => "none",
        })
    }
}

/// Log-softmax over the last dim, differentiable.
///
/// `x` [..., C] -> [..., C]: `x - max - log(sum(exp(x - max)))`, built from basic ops (the max is
/// detached; it cancels out of the value and of the gradient), so gradients flow on every
/// device, unlike some fused candle kernels.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// Connectionist temporal classification loss with PyTorch's semantics
/// (torch.nn.functional.ctc_loss), but batch-first log_probs [B, T, C] (our model's layout).
/// targets[b] are label ids (no blanks); input_lengths[b] <= T frames are valid.
/// Mean: each utterance's loss divided by its target length (clamped to >= 1), then batch mean;
/// Sum: sum over the batch; None: [B] per-utterance losses.
/// zero_infinity: infinite losses (impossible alignments) and their gradients become 0.
/// The gradient w.r.t. log_probs equals PyTorch's: for frames t < input_length,
/// exp(lp[t,c]) - exp(log(sum over s with l'_s = c of alpha_t(s) beta_t(s)) + nll - lp[t,c]), times the
/// upstream gradient (and the reduction's scale); 0 for padded frames.
///
/// Shapes: `log_probs` [B, T, C] (any float dtype, any device; normally the output of
/// [`log_softmax`]), `targets.len() == input_lengths.len() == B`. Returns a scalar (0-d) tensor
/// for `Mean` / `Sum` and [B] for `None`, in the dtype and on the device of `log_probs`.
///
/// Like PyTorch, this gradient is the one that is exact *through a log-softmax*: with a
/// log-softmax in front, the gradient w.r.t. the logits is `softmax - occupancy`. W.r.t.
/// `log_probs` as a leaf it differs from the true partial derivative by `exp(lp)`.
///
/// An utterance whose target cannot be aligned (it needs `len + repeats` frames and has fewer;
/// or it has no frames and a non-empty target) has loss `inf`, and, as in PyTorch, a NaN gradient
/// on its valid frames, unless `zero_infinity` makes both 0. An empty target with zero frames
/// has loss 0.
///
/// Errors ([`Error::InvalidInput`]): `log_probs` not rank 3 or not a float dtype, an empty
/// batch, `targets` / `input_lengths` of the wrong length, `input_lengths[b] > T`,
/// `blank >= C`, or a target id `>= C` or equal to `blank`.
pub fn ctc_loss(
    log_probs: &Tensor,
    targets: &[Vec<usize>],
    input_lengths: &[usize],
    blank: usize,
    reduction: Reduction,
    zero_infinity: bool,
) -> Result<Tensor> {
    let (b_size, t_size, c_size) = validate_ctc(log_probs, targets, input_lengths, blank)?;
    let dtype = log_probs.dtype();
    let device = log_probs.device().clone();

    let lp: Vec<f64> = log_probs.detach().to_dtype(DType::F64)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?;
    let frame = t_size * c_size;

    // Per-utterance values, the gradient constant G and, for inf losses without
    // zero_infinity, the mask of frames whose gradient must come out NaN.
    let mut values = Vec::with_capacity(b_size);
    let mut grad = vec![0f64; b_size * frame];
    let mut nan_mask: Option<Vec<f64>> = None;
    for b in 0..b_size {
        let tb = input_lengths[b];
        let lp_b = &lp[b * frame..b * frame + tb * c_size];
        let grad_b = &mut grad[b * frame..b * frame + tb * c_size];
        let nll = ctc_single(lp_b, c_size, &targets[b], blank, grad_b);
        let scale = match reduction {
            Reduction::Mean => 1.0 / (targets[b].len().max(1) as f64 * b_size as f64),
            Reduction::Sum | Reduction::None => 1.0,
        };
        if nll == f64::INFINITY {
            grad_b.fill(0.0);
            if zero_infinity {
                values.push(0.0);
                continue;
            }
            let mask = nan_mask.get_or_insert_with(|| vec![0f64; b_size * frame]);
            mask[b * frame..b * frame + tb * c_size].fill(1.0);
        } else {
            grad_b.iter_mut().for_each(|g| *g *= scale);
        }
        values.push(nll);
    }

    let to_dev = |v: Vec<f64>, shape: &[usize]| -> Result<Tensor> {
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)?.to_device(&device)?)
    };
    let g = to_dev(grad, &[b_size, t_size, c_size])?;
    // `s - s.detach()` is exactly 0 in value and has gradient G w.r.t. log_probs.
    let weighted = log_probs.mul(&g)?;
    let (surrogate, value) = match reduction {
        Reduction::None => (weighted.sum((1, 2))?, to_dev(values, &[b_size])?),
        Reduction::Sum => (weighted.sum_all()?, to_dev(vec![values.iter().sum()], &[])?),
        Reduction::Mean => {
            let mean = values.iter().zip(targets).map(|(v, t)| v / t.len().max(1) as f64).sum::<f64>() / b_size as f64;
            (weighted.sum_all()?, to_dev(vec![mean], &[])?)
        }
    };
    let mut loss = surrogate.sub(&surrogate.detach())?.add(&value)?;

    if let Some(mask) = nan_mask {
        // PyTorch's gradient of an infinite loss is NaN on the utterance's valid frames. A NaN
        // constant in G would make the value NaN too, so inject it with a term whose value is 0
        // and whose gradient is 0 * inf = NaN exactly where mask = 1:
        // sqrt(lp * 0 + (1 - mask)) * mask. (The 0 is a tensor: candle prunes `affine(0, _)`
        // from the backward graph.)
        let m = to_dev(mask, &[b_size, t_size, c_size])?;
        let inject = log_probs.mul(&m.zeros_like()?)?.add(&m.affine(-1.0, 1.0)?)?.sqrt()?.mul(&m)?;
        let inject = match reduction {
            Reduction::None => inject.sum((1, 2))?,
            Reduction::Sum | Reduction::Mean => inject.sum_all()?,
        };
        loss = loss.add(&inject)?;
    }
    Ok(loss)
}

/// Checks the arguments of [`ctc_loss`]; returns (B, T, C).
fn validate_ctc(log_probs: &Tensor, targets: &[Vec<usize>], input_lengths: &[usize], blank: usize) -> Result<(usize, usize, usize)> {
    let (b_size, t_size, c_size) = log_probs.dims3().map_err(|_| {
        Error::InvalidInput(format!("ctc_loss: log_probs must be [B, T, C], got shape {:?}", log_probs.dims()))
    })?;
    if !log_probs.dtype().is_float() {
        return Err(Error::InvalidInput(format!("ctc_loss: log_probs must be a float tensor, got {:?}", log_probs.dtype())));
    }
    if b_size == 0 {
        return Err(Error::InvalidInput("ctc_loss: empty batch (B = 0)".into()));
    }
    if targets.len() != b_size {
        return Err(Error::InvalidInput(format!("ctc_loss: {} target sequences for a batch of {b_size}", targets.len())));
    }
    if input_lengths.len() != b_size {
        return Err(Error::InvalidInput(format!("ctc_loss: {} input lengths for a batch of {b_size}", input_lengths.len())));
    }
    if blank >= c_size {
        return Err(Error::InvalidInput(format!("ctc_loss: blank id {blank} is out of range for {c_size} classes")));
    }
    for (b, (&len, target)) in input_lengths.iter().zip(targets).enumerate() {
        if len > t_size {
            return Err(Error::InvalidInput(format!("ctc_loss: input_lengths[{b}] = {len} exceeds the {t_size} frames of log_probs")));
        }
        if let Some((i, &id)) = target.iter().enumerate().find(|&(_, &id)| id >= c_size || id == blank) {
            let why = if id == blank { "is the blank id".to_string() } else { format!("is out of range for {c_size} classes") };
            return Err(Error::InvalidInput(format!("ctc_loss: targets[{b}][{i}] = {id} {why}")));
        }
    }
    Ok((b_size, t_size, c_size))
}

/// `log(exp(a) + exp(b))`, with `-inf` absorbing.
fn log_add(a: f64, b: f64) -> f64 {
    let m = a.max(b);
    if m == f64::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    m + ((a - m).exp() + (b - m).exp()).ln()
}

/// CTC of one utterance: `lp` holds its valid frames, [T_b, C] row-major. Returns the negative
/// log-likelihood and writes PyTorch's unscaled gradient w.r.t. `lp` into `grad` ([T_b, C]);
/// when the nll is infinite the gradient written is meaningless (the caller replaces it).
fn ctc_single(lp: &[f64], c_size: usize, target: &[usize], blank: usize, grad: &mut [f64]) -> f64 {
    let tb = lp.len() / c_size;
    let s_size = 2 * target.len() + 1;
    if tb == 0 {
        return if target.is_empty() { 0.0 } else { f64::INFINITY };
    }
    // Extended label sequence: blank, l1, blank, l2, ..., blank.
    let ext: Vec<usize> = (0..s_size).map(|s| if s % 2 == 0 { blank } else { target[s / 2] }).collect();
    // A label position may be reached from two positions back (skipping the blank between) unless
    // it repeats the previous label.
    let skip: Vec<bool> = (0..s_size).map(|s| s % 2 == 1 && s >= 2 && ext[s] != ext[s - 2]).collect();
    let ninf = f64::NEG_INFINITY;

    // alpha_t(s): log-prob of l'_{0..=s} over frames 0..=t, ending in s at t.
    let mut alpha = vec![ninf; tb * s_size];
    alpha[0] = lp[blank];
    if s_size > 1 {
        alpha[1] = lp[ext[1]];
    }
    for t in 1..tb {
        let (prev, cur) = alpha.split_at_mut(t * s_size);
        let prev = &prev[(t - 1) * s_size..];
        let row = &lp[t * c_size..(t + 1) * c_size];
        for s in 0..s_size {
            let mut a = prev[s];
            if s >= 1 {
                a = log_add(a, prev[s - 1]);
            }
            if skip[s] {
                a = log_add(a, prev[s - 2]);
            }
            cur[s] = a + row[ext[s]];
        }
    }
    let last = &alpha[(tb - 1) * s_size..];
    let ll = if s_size > 1 { log_add(last[s_size - 1], last[s_size - 2]) } else { last[0] };
    let nll = -ll;
    if nll == f64::INFINITY {
        return nll;
    }

    // beta_t(s): log-prob of l'_{s..} over frames t..T_b, starting in s at t (lp[t] included,
    // as in PyTorch, so alpha_t(s) + beta_t(s) counts lp[t, l'_s] twice).
    let mut beta = vec![ninf; tb * s_size];
    beta[(tb - 1) * s_size + s_size - 1] = lp[(tb - 1) * c_size + blank];
    if s_size > 1 {
        beta[(tb - 1) * s_size + s_size - 2] = lp[(tb - 1) * c_size + ext[s_size - 2]];
    }
    for t in (0..tb - 1).rev() {
        let (cur, next) = beta.split_at_mut((t + 1) * s_size);
        let cur = &mut cur[t * s_size..];
        let row = &lp[t * c_size..(t + 1) * c_size];
        for s in 0..s_size {
            let mut b = next[s];
            if s + 1 < s_size {
                b = log_add(b, next[s + 1]);
            }
            if s + 2 < s_size && skip[s + 2] {
                b = log_add(b, next[s + 2]);
            }
            cur[s] = b + row[ext[s]];
        }
    }

    // grad[t, c] = exp(lp) - exp(log sum_{s: l'_s = c} alpha_t(s) beta_t(s) + nll - lp).
    let mut lcab = vec![ninf; c_size];
    for t in 0..tb {
        lcab.fill(ninf);
        for s in 0..s_size {
            let ab = alpha[t * s_size + s] + beta[t * s_size + s];
            lcab[ext[s]] = log_add(lcab[ext[s]], ab);
        }
        let row = &lp[t * c_size..(t + 1) * c_size];
        let g = &mut grad[t * c_size..(t + 1) * c_size];
        for c in 0..c_size {
            g[c] = row[c].exp() - (lcab[c] + nll - row[c]).exp();
        }
    }
    nll
}

/// Mean cross-entropy of logits [B, C] against class ids, with label smoothing eps
/// (PyTorch's definition: (1-eps) * nll + eps * mean over classes of -log p).
///
/// `logits` [B, C] (any float dtype and device), `targets.len() == B`, each `< C`;
/// `label_smoothing` in [0, 1]. Returns a scalar (0-d) tensor, differentiable w.r.t. `logits`
/// (through [`log_softmax`]); equals `torch.nn.functional.cross_entropy(logits, targets,
/// label_smoothing=eps)`.
///
/// Errors ([`Error::InvalidInput`]): logits not rank 2 or not float, an empty batch, a target
/// count other than B, a target id `>= C`, or `label_smoothing` outside [0, 1].
pub fn cross_entropy(logits: &Tensor, targets: &[usize], label_smoothing: f64) -> Result<Tensor> {
    let (b_size, c_size) = logits.dims2().map_err(|_| {
        Error::InvalidInput(format!("cross_entropy: logits must be [B, C], got shape {:?}", logits.dims()))
    })?;
    if !logits.dtype().is_float() {
        return Err(Error::InvalidInput(format!("cross_entropy: logits must be a float tensor, got {:?}", logits.dtype())));
    }
    if b_size == 0 {
        return Err(Error::InvalidInput("cross_entropy: empty batch (B = 0)".into()));
    }
    if targets.len() != b_size {
        return Err(Error::InvalidInput(format!("cross_entropy: {} targets for a batch of {b_size}", targets.len())));
    }
    if let Some((i, &id)) = targets.iter().enumerate().find(|&(_, &id)| id >= c_size) {
        return Err(Error::InvalidInput(format!("cross_entropy: targets[{i}] = {id} is out of range for {c_size} classes")));
    }
    if !(0.0..=1.0).contains(&label_smoothing) {
        return Err(Error::InvalidInput(format!("cross_entropy: label_smoothing {label_smoothing} is not in [0, 1]")));
    }
    // loss = -(1/B) sum_{b,c} w[b,c] lp[b,c], w = (1-eps) onehot + eps/C.
    let eps = label_smoothing;
    let mut w = vec![eps / c_size as f64; b_size * c_size];
    for (b, &t) in targets.iter().enumerate() {
        w[b * c_size + t] += 1.0 - eps;
    }
    let w = Tensor::from_vec(w, (b_size, c_size), &Device::Cpu)?.to_dtype(logits.dtype())?.to_device(logits.device())?;
    let lp = log_softmax(logits)?;
    Ok(lp.mul(&w)?.sum_all()?.affine(-1.0 / b_size as f64, 0.0)?)
}
