//! Inference attention in one op: per (clip, head), the scores, their softmax and the weighted
//! sum of the values, with the [T, T] scores of one head living in a task-local buffer.
//!
//! The composite (what training runs, with its gradient) splits q, k and v into heads with
//! transposing copies, writes the [B, heads, T, T] scores, adds the key mask, runs the softmax
//! as another pass and copies the heads back together. Here gemm reads each head of q, k and v
//! in place from the packed projection [B, T, 3H] (a head is a column block, row stride 3H),
//! the softmax runs on the scores while they are in cache, and the output of each head is
//! written straight into its column block of [B, T, H].

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Shape, Tensor, WithDType};
use candle_core::backend::BackendStorage;
use num_traits::Float;

use super::conv::run_tasks;
use super::{data, fused, mm, output_buf, FastExp, Ptr};
use crate::error::Result;

/// softmax(q k^T scale + key_bias) v for qkv [B, T, 3H] = [q | k | v], each split into `heads`
/// column blocks;
/// `key_bias` [B, T] is added to every row of clip b's scores (0, or a large negative number
/// for padded frames). No gradient flows through it (inference only).
struct AttentionInfer {
    heads: usize,
    scale: f64,
    key_bias: Option<Vec<f64>>,
}

impl AttentionInfer {
    /// The scale and the key bias in the kernel's dtype.
    fn constants<T: Float>(&self) -> (T, Option<Vec<T>>) {
        let scale = T::from(self.scale).expect("scale fits");
        (scale, self.key_bias.as_ref().map(|kb| kb.iter().map(|&x| T::from(x).expect("bias fits")).collect()))
    }

    /// The heads divide H and the key bias has one value per (clip, frame).
    fn check(&self, dims: (usize, usize, usize), l: &Layout) -> candle_core::Result<()> {
        if self.heads == 0 || !dims.2.is_multiple_of(3 * self.heads) {
            bail!("klspeech attention: qkv {:?} with {} heads", l.dims(), self.heads);
        }
        if let Some(kb) = &self.key_bias {
            if kb.len() != dims.0 * dims.1 {
                bail!("klspeech attention: key bias of {} values for [B, T] = {:?}", kb.len(), (dims.0, dims.1));
            }
        }
        Ok(())
    }
}

fn btc(l: &Layout) -> candle_core::Result<(usize, usize, usize)> {
    match l.dims() {
        &[b, t, c] => Ok((b, t, c)),
        d => bail!("klspeech attention: expected [B, T, 3H], got {d:?}"),
    }
}

/// One row of scores -> probabilities in place: s = s scale + bias, then softmax.
#[inline(always)]
fn softmax_row<T: FastExp>(row: &mut [T], scale: T, bias: Option<&[T]>) {
    match bias {
        Some(b) => row.iter_mut().zip(b).for_each(|(s, &b)| *s = *s * scale + b),
        None => row.iter_mut().for_each(|s| *s = *s * scale),
    }
    let m = row.iter().fold(T::neg_infinity(), |a, &b| a.max(b));
    row.iter_mut().for_each(|s| *s = (*s - m).fexp());
    // Eight partial sums: a vectorizable reduction (the order is fixed, so results are too).
    let mut acc = [T::zero(); 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = *a + v;
        }
    }
    let tail = chunks.remainder().iter().fold(T::zero(), |a, &v| a + v);
    let sum = acc.iter().fold(T::zero(), |a, &v| a + v) + tail;
    let inv = T::one() / sum;
    row.iter_mut().for_each(|s| *s = *s * inv);
}

/// o [B, T, H] from qkv [B, T, 3H], with inverted dropout on the probabilities when
/// `dropout = Some((p, key))` (training; see [`AttentionTrain`]).
fn forward<T: WithDType + Float + FastExp>(qkv: &[T], (b, t, h3): (usize, usize, usize), op: &AttentionInfer, dropout: Option<(f64, u64)>) -> Vec<T> {
    let (h, nh) = (h3 / 3, op.heads);
    let hd = h / nh;
    // Safety: every (clip, head) task writes its whole [T, hd] column block of o.
    let mut o = unsafe { output_buf::<T>(b * t * h, 0) };
    let op_ptr = Ptr(o.as_mut_ptr());
    let (scale, bias) = op.constants::<T>();
    let src = qkv.as_ptr() as usize;
    run_tasks(b * nh, |task, par| {
        let (bi, hi) = (task / nh, task % nh);
        // Head hi of clip bi: q, k, v at column offsets hi hd, H + hi hd, 2H + hi hd of the
        // clip's rows (stride 3H); its output block in o at hi hd (stride H).
        let (q, k, v) = unsafe {
            let base = (src as *const T).add(bi * t * h3 + hi * hd);
            (base, base.add(h), base.add(2 * h))
        };
        // Safety: the scores buffer is written in full by the first gemm.
        let mut s = unsafe { output_buf::<T>(t * t, 0) };
        // Safety: every view stays inside clip bi's [T, 3H] rows; o's block is this task's.
        unsafe {
            // s [T, T] = q_h [T, hd] k_h^T (k read transposed in place).
            mm((t, t, hd), s.as_mut_ptr(), t, false, q, (h3, 1), k, (1, h3), par);
        }
        probabilities(&mut s, t, scale, bias.as_ref().map(|b| &b[bi * t..(bi + 1) * t]));
        if let Some((p, key)) = dropout {
            dropout_row(p, key, task * t * t, &mut s);
        }
        unsafe {
            // o_h [T, hd] = p [T, T] v_h [T, hd].
            mm((t, hd, t), op_ptr.get().add(bi * t * h + hi * hd), h, false, s.as_ptr(), (t, 1), v, (h3, 1), par);
        }
    });
    o
}

impl CustomOp1 for AttentionInfer {
    fn name(&self) -> &'static str {
        "klspeech-attention-infer"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = btc(l1)?;
        self.check(dims, l1)?;
        by_dtype!(s1, T => {
            let o = forward(data::<T>(s1, l1)?, dims, self, None);
            Ok((T::to_cpu_storage_owned(o), Shape::from((dims.0, dims.1, dims.2 / 3))))
        })
    }
}

/// Multi-head attention for inference: softmax(q k^T scale + key_bias) v per head, for the
/// packed projection qkv [B, T, 3H] = [q | k | v] (heads = column blocks of H / heads) and an
/// optional additive key mask `key_bias` [B, T]; returns [B, T, H]. No gradient flows through
/// it. Fused on the CPU; off it (and on the CPU under `ops::with_gpu_path`)
/// [`super::device::attention_infer_device`] (keys padded to a multiple of 8 for aligned
/// gemms, one softmax kernel on a GPU); with the fused ops off [`attention_composite`].
pub fn attention_infer(qkv: &Tensor, heads: usize, scale: f64, key_bias: Option<&Tensor>) -> Result<Tensor> {
    if super::device_op_applies(qkv) {
        return super::device::attention_infer_device(qkv, heads, scale, key_bias);
    }
    if !fused(qkv) {
        return attention_composite(qkv, heads, scale, key_bias);
    }
    let key_bias = match key_bias {
        Some(kb) => Some(kb.flatten_all()?.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?),
        None => None,
    };
    Ok(qkv.contiguous()?.apply_op1_no_bwd(&AttentionInfer { heads, scale, key_bias })?)
}

/// [`attention_infer`] from candle ops (the reference, and the path off the CPU).
pub fn attention_composite(qkv: &Tensor, heads: usize, scale: f64, key_bias: Option<&Tensor>) -> Result<Tensor> {
    let (b, t, h3) = qkv.dims3()?;
    let (h, hd) = (h3 / 3, h3 / 3 / heads);
    // [B, T, 3, nh, hd] -> [3, B, nh, T, hd]: one copy for q, k and v.
    let qkv = qkv.reshape((b, t, 3, heads, hd))?.permute((2, 0, 3, 1, 4))?.contiguous()?;
    // The scale on q ([B, nh, T, hd], T / hd times smaller than the scores; the same values
    // when it is a power of two, as 1 / sqrt(64)), and k^T read transposed in place by gemm.
    let q = (qkv.get(0)? * scale)?;
    let mut scores = q.matmul(&qkv.get(1)?.transpose(2, 3)?)?; // [B, nh, T, T]
    if let Some(kb) = key_bias {
        scores = scores.broadcast_add(&kb.reshape((b, 1, 1, t))?)?;
    }
    // candle's fused softmax (no gradient is taken here; on a GPU it is one kernel).
    let p = super::softmax_last_dim_infer(&scores)?;
    Ok(p.matmul(&qkv.get(2)?)?.transpose(1, 2)?.reshape((b, t, h))?)
}

// ---------------------------------------------------------------------------------------------
// Training: the same per-(clip, head) tasks with a backward pass
// ---------------------------------------------------------------------------------------------

/// Attention with a gradient: [`AttentionInfer`]'s forward plus inverted dropout on the
/// probabilities (element (b, head, i, j) of the [B, heads, T, T] probabilities kept when the
/// uniform at that flat index of the stream keyed by `key` is >= p, as `ops::dropout` over the
/// composite's probability tensor), and a backward that recomputes each head's probabilities
/// instead of storing [B, heads, T, T] of them.
struct AttentionTrain {
    infer: AttentionInfer,
    dropout: Option<(f64, u64)>,
}

/// Inverted-dropout factors for one head's rows `[T, T]` starting at flat index `first`.
fn dropout_row<T: Float>(p: f64, key: u64, first: usize, row: &mut [T]) {
    let keep = T::from(1.0 / (1.0 - p)).expect("factor fits");
    for (j, v) in row.iter_mut().enumerate() {
        if crate::rng::keyed_uniform(key, (first + j) as u64) < p {
            *v = T::zero();
        } else {
            *v = *v * keep;
        }
    }
}

/// Scale, key bias and softmax of one head's [T, T] scores, in place.
fn probabilities<T: Float + FastExp>(s: &mut [T], t: usize, scale: T, kb: Option<&[T]>) {
    for row in s.chunks_exact_mut(t) {
        softmax_row(row, scale, kb);
    }
}

/// dqkv [B, T, 3H] from qkv and do [B, T, H]. Per (clip, head), with P the probabilities and
/// D the dropout factors: dv = (P D)^T do; dP = (do v^T) D; dz = P (dP - rowsum(dP P));
/// dq = dz k scale, dk = dz^T q scale.
fn train_backward<T: WithDType + Float + FastExp>(qkv: &[T], d_o: &[T], (b, t, h3): (usize, usize, usize), op: &AttentionTrain) -> Vec<T> {
    let (h, nh) = (h3 / 3, op.infer.heads);
    let hd = h / nh;
    // Safety: every (clip, head) task writes its q, k and v column blocks of dqkv in full.
    let mut dqkv = unsafe { output_buf::<T>(b * t * h3, 0) };
    let dp_ = Ptr(dqkv.as_mut_ptr());
    let (scale, bias) = op.infer.constants::<T>();
    let (src, gsrc) = (qkv.as_ptr() as usize, d_o.as_ptr() as usize);
    run_tasks(b * nh, |task, par| {
        let (bi, hi) = (task / nh, task % nh);
        // Safety: the views stay inside clip bi's rows of qkv [T, 3H] and do [T, H]; the dqkv
        // blocks (clip bi, head hi of q, k and v) are this task's alone.
        unsafe {
            let base = (src as *const T).add(bi * t * h3 + hi * hd);
            let (q, k, v) = (base, base.add(h), base.add(2 * h));
            let g = (gsrc as *const T).add(bi * t * h + hi * hd);
            let dbase = dp_.get().add(bi * t * h3 + hi * hd);
            let (dq, dk, dv) = (dbase, dbase.add(h), dbase.add(2 * h));
            let mut p = output_buf::<T>(t * t, 0);
            mm((t, t, hd), p.as_mut_ptr(), t, false, q, (h3, 1), k, (1, h3), par);
            probabilities(&mut p, t, scale, bias.as_ref().map(|b| &b[bi * t..(bi + 1) * t]));
            // dv = (P D)^T do
            let pd = match op.dropout {
                Some((pr, key)) => {
                    let mut pd = p.clone();
                    dropout_row(pr, key, task * t * t, &mut pd);
                    Some(pd)
                }
                None => None,
            };
            let pdp = pd.as_ref().unwrap_or(&p).as_ptr();
            mm((t, hd, t), dv, h3, false, pdp, (1, t), g, (h, 1), par);
            // dP = (do v^T) D
            let mut dpr = output_buf::<T>(t * t, 0);
            mm((t, t, hd), dpr.as_mut_ptr(), t, false, g, (h, 1), v, (1, h3), par);
            if let Some((pr, key)) = op.dropout {
                dropout_row(pr, key, task * t * t, &mut dpr);
            }
            // dz = P (dP - rowsum(dP P)), times the scale of the scores
            for (dr, pr) in dpr.chunks_exact_mut(t).zip(p.chunks_exact(t)) {
                let dot = dr.iter().zip(pr).fold(T::zero(), |a, (&d, &p)| a + d * p);
                dr.iter_mut().zip(pr).for_each(|(d, &p)| *d = p * (*d - dot) * scale);
            }
            // dq = dz k, dk = dz^T q
            mm((t, hd, t), dq, h3, false, dpr.as_ptr(), (t, 1), k, (h3, 1), par);
            mm((t, hd, t), dk, h3, false, dpr.as_ptr(), (1, t), q, (h3, 1), par);
        }
    });
    dqkv
}

struct AttentionTrainBwd<'a>(&'a AttentionTrain);

impl CustomOp1 for AttentionTrain {
    fn name(&self) -> &'static str {
        "klspeech-attention"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = btc(l1)?;
        self.infer.check(dims, l1)?;
        by_dtype!(s1, T => {
            let o = forward(data::<T>(s1, l1)?, dims, &self.infer, self.dropout);
            Ok((T::to_cpu_storage_owned(o), Shape::from((dims.0, dims.1, dims.2 / 3))))
        })
    }
    fn bwd(&self, qkv: &Tensor, _o: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(qkv.apply_op2_no_bwd(&g.contiguous()?, &AttentionTrainBwd(self))?))
    }
}

impl candle_core::CustomOp2 for AttentionTrainBwd<'_> {
    fn name(&self) -> &'static str {
        "klspeech-attention-bwd"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = btc(l1)?;
        if l2.dims() != [dims.0, dims.1, dims.2 / 3] {
            bail!("klspeech attention backward: gradient {:?} for qkv {:?}", l2.dims(), l1.dims());
        }
        by_dtype!(s1, T => {
            let d = train_backward(data::<T>(s1, l1)?, data::<T>(s2, l2)?, dims, self.0);
            Ok((T::to_cpu_storage_owned(d), l1.shape().clone()))
        })
    }
}

/// Multi-head attention with a gradient: softmax(q k^T scale + key_bias) v per head, for the
/// packed projection qkv [B, T, 3H] = [q | k | v] and an optional key mask `key_bias` [B, T],
/// with inverted dropout on the probabilities when `dropout = Some((p, key))`; returns
/// [B, T, H], differentiable in qkv. One op per (clip, head) forward and backward (the
/// backward recomputes the probabilities). Fused on the CPU, else [`attention_train_composite`].
pub fn attention(qkv: &Tensor, heads: usize, scale: f64, key_bias: Option<&Tensor>, dropout: Option<(f64, u64)>) -> Result<Tensor> {
    if let Some((p, _)) = dropout {
        if !(0.0..1.0).contains(&p) {
            return Err(crate::Error::InvalidInput(format!("attention dropout rate {p} is outside [0, 1)")));
        }
    }
    if super::device_op_applies(qkv) {
        return super::device::attention_device(qkv, heads, scale, key_bias, dropout);
    }
    if !fused(qkv) {
        return attention_train_composite(qkv, heads, scale, key_bias, dropout);
    }
    let key_bias = match key_bias {
        Some(kb) => Some(kb.flatten_all()?.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?),
        None => None,
    };
    let op = AttentionTrain { infer: AttentionInfer { heads, scale, key_bias }, dropout: dropout.filter(|d| d.0 > 0.0) };
    Ok(qkv.contiguous()?.apply_op1(op)?)
}

/// [`attention`] from candle ops and the differentiable softmax and dropout ops (the
/// reference, and the path off the CPU).
pub fn attention_train_composite(qkv: &Tensor, heads: usize, scale: f64, key_bias: Option<&Tensor>, dropout: Option<(f64, u64)>) -> Result<Tensor> {
    let (b, t, h3) = qkv.dims3()?;
    let (h, hd) = (h3 / 3, h3 / 3 / heads);
    let split = |i: usize| -> Result<Tensor> { Ok(qkv.narrow(2, i * h, h)?.reshape((b, t, heads, hd))?.transpose(1, 2)?.contiguous()?) };
    let mut scores = (split(0)?.matmul(&split(1)?.transpose(2, 3)?.contiguous()?)? * scale)?; // [B, nh, T, T]
    if let Some(kb) = key_bias {
        scores = scores.broadcast_add(&kb.reshape((b, 1, 1, t))?)?;
    }
    let mut p = super::softmax_last(&scores)?;
    if let Some((rate, key)) = dropout.filter(|d| d.0 > 0.0) {
        p = super::dropout(&p, rate, key)?;
    }
    Ok(p.matmul(&split(2)?)?.transpose(1, 2)?.reshape((b, t, h))?)
}
