//! Normalization layers: LayerNorm, per-channel GroupNorm and KL-Norm (`../shared/KLNORM.md`).
//!
//! Every operation is a differentiable candle composition (candle's fused `layer_norm` passes no
//! gradient). KL-Norm shares the statistics code with the layer it replaces, and in evaluation
//! it returns `gamma * x_hat + beta` through the very same operations, so it equals the replaced
//! layer bit for bit.

use candle_core::{DType, Tensor, D};

use super::params::{Init, Vb};
use super::ForwardCtx;
use crate::error::{Error, Result};

/// Which statistics a normalization computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormAxis {
    /// LayerNorm over the last dimension: x [..., D], per position over features.
    LastDim,
    /// GroupNorm with one group per channel: x [B, C, T], per channel over time
    /// (wav2vec2-base's first feature-encoder layer).
    Time,
}

/// Prior of the KL term.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KlPrior {
    /// N(0, 1).
    Standard,
    /// N(m_p, s_p^2) with learned per-feature m_p and s_p = softplus(raw).
    Learned,
}

impl std::str::FromStr for KlPrior {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "standard" => Ok(KlPrior::Standard),
            "learned" => Ok(KlPrior::Learned),
            _ => Err(Error::InvalidInput(format!("KL prior `{s}`: expected `standard` or `learned`"))),
        }
    }
}

/// KL-Norm settings of one site.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KlSettings {
    /// Initial noise scale: `b = softplus^-1(sigma0)`, `a = 0`.
    pub sigma0: f64,
    /// Prior of the KL term.
    pub prior: KlPrior,
}

impl Default for KlSettings {
    fn default() -> Self {
        KlSettings { sigma0: 1e-2, prior: KlPrior::Standard }
    }
}

/// `softplus^-1(y) = ln(e^y - 1)`, stable for small y.
pub fn inv_softplus(y: f64) -> f64 {
    if y > 20.0 {
        y
    } else {
        y.exp_m1().ln()
    }
}

/// Numerically stable softplus `max(z, 0) + ln(1 + e^-|z|)`, differentiable.
pub fn softplus(z: &Tensor) -> Result<Tensor> {
    Ok((z.relu()? + (z.abs()?.neg()?.exp()? + 1.0)?.log()?)?)
}

struct KlParams {
    a: Tensor,
    b: Tensor,
    prior_mean: Option<Tensor>,
    prior_std_raw: Option<Tensor>,
}

/// A normalization layer, optionally KL-regularized.
pub struct Norm {
    axis: NormAxis,
    weight: Tensor,
    bias: Tensor,
    eps: f64,
    kl: Option<KlParams>,
    /// Checkpoint key prefix of this layer (its site name).
    pub site: String,
}

impl Norm {
    /// Loads `weight`/`bias` of width `dim` under `vb`, and the KL-Norm vectors `kl_a`, `kl_b`
    /// (and `kl_prior_mean`, `kl_prior_std` for a learned prior) when `kl` is given.
    pub fn load(vb: &Vb, dim: usize, axis: NormAxis, eps: f64, kl: Option<KlSettings>) -> Result<Self> {
        let weight = vb.get(&[dim], "weight", Init::Const(1.0))?;
        let bias = vb.get(&[dim], "bias", Init::Const(0.0))?;
        let kl = match kl {
            None => None,
            Some(s) => {
                if !(s.sigma0 > 0.0 && s.sigma0.is_finite()) {
                    return Err(Error::InvalidInput(format!("KL-Norm sigma0 must be positive, got {}", s.sigma0)));
                }
                let a = vb.get_or_init(&[dim], "kl_a", Init::Const(0.0))?;
                let b = vb.get_or_init(&[dim], "kl_b", Init::Const(inv_softplus(s.sigma0)))?;
                let (prior_mean, prior_std_raw) = match s.prior {
                    KlPrior::Standard => (None, None),
                    KlPrior::Learned => (
                        Some(vb.get_or_init(&[dim], "kl_prior_mean", Init::Const(0.0))?),
                        Some(vb.get_or_init(&[dim], "kl_prior_std", Init::Const(inv_softplus(1.0)))?),
                    ),
                };
                Some(KlParams { a, b, prior_mean, prior_std_raw })
            }
        };
        Ok(Norm { axis, weight, bias, eps, kl, site: vb.full_key("").trim_end_matches('.').to_string() })
    }

    /// The statistics this layer computes.
    pub fn axis(&self) -> NormAxis {
        self.axis
    }

    /// Whether this site is KL-Norm.
    pub fn is_kl(&self) -> bool {
        self.kl.is_some()
    }

    /// Broadcast shape of a per-feature vector for this axis.
    fn per_feature(&self, v: &Tensor, x: &Tensor) -> Result<Tensor> {
        Ok(match self.axis {
            NormAxis::LastDim => v.clone(),
            NormAxis::Time => v.reshape((1, x.dim(1)?, 1))?,
        })
    }

    /// `(x - mean) / sqrt(var + eps)` with the replaced layer's statistics.
    ///
    /// `time_mask` ([B, T], 1 for valid frames) only matters for [`NormAxis::Time`] in
    /// padding-aware mode: statistics then cover each clip's valid frames only.
    fn normalize(&self, x: &Tensor, time_mask: Option<&Tensor>) -> Result<Tensor> {
        match (self.axis, time_mask) {
            // One fused pass forward and backward on CPU (crate::ops).
            (NormAxis::LastDim, _) => crate::ops::standardize_last(x, self.eps),
            // Per-channel GroupNorm on [B, C, T]: each (b, c) row over time is the last
            // dimension, so it is the same fused op.
            (NormAxis::Time, None) => crate::ops::standardize_last(x, self.eps),
            (NormAxis::Time, Some(m)) => {
                let m = m.unsqueeze(1)?; // [B, 1, T]
                let n = m.sum_keepdim(2)?; // [B, 1, 1]
                let mean = x.broadcast_mul(&m)?.sum_keepdim(2)?.broadcast_div(&n)?;
                let xc = x.broadcast_sub(&mean)?;
                let var = xc.broadcast_mul(&m)?.sqr()?.sum_keepdim(2)?.broadcast_div(&n)?;
                Ok(xc.broadcast_div(&(var + self.eps)?.sqrt()?)?)
            }
        }
    }

    /// Normalizes `x` ([B, T, D] for LayerNorm sites, [B, C, T] for GroupNorm sites).
    ///
    /// `time_mask` is [B, T] (1 = valid frame) at this site's time resolution, or `None` when
    /// every frame is valid. In training, a KL-Norm site samples `mu + sigma * noise` and pushes
    /// its KL (summed over features, averaged over valid positions) into `ctx`.
    pub fn forward(&self, x: &Tensor, time_mask: Option<&Tensor>, ctx: &mut ForwardCtx) -> Result<Tensor> {
        if !ctx.grad && self.axis == NormAxis::LastDim && x.dtype() != DType::F64 && (self.kl.is_none() || !ctx.train) {
            // No gradient will be taken: candle's fused kernel (it has no backward, which is
            // why training never comes here).
            let x = x.contiguous()?;
            return Ok(candle_nn::ops::layer_norm(&x, &self.weight, &self.bias, self.eps as f32)?);
        }
        if self.axis == NormAxis::LastDim && (self.kl.is_none() || !ctx.train) {
            // Plain LayerNorm with a gradient: fused forward and backward on CPU (crate::ops).
            return crate::ops::layer_norm(x, &self.weight, &self.bias, self.eps);
        }
        let stats_mask = if ctx.padding_aware { time_mask } else { None };
        let kl = match (&self.kl, ctx.train) {
            (Some(kl), true) => kl,
            _ => {
                let x_hat = self.normalize(x, stats_mask)?;
                // (LastDim sites returned above through the fused LayerNorm.)
                return crate::ops::channel_affine(&x_hat, &self.weight, &self.bias);
            }
        };
        // Drawn first, so that the fused and the composite paths see the same noise.
        let noise = ctx.normal_like(x)?;
        let prior = kl.prior_mean.as_ref().zip(kl.prior_std_raw.as_ref());
        let fused = match self.axis {
            // One fused pass forward and one backward on CPU (crate::ops), else the composite.
            NormAxis::LastDim => crate::ops::kl_norm_last(x, &self.weight, &self.bias, &kl.a, &kl.b, prior, &noise, self.eps)?,
            NormAxis::Time => None,
        };
        let (y, per_pos) = match fused {
            Some(r) => r,
            None => self.kl_composite(x, stats_mask, kl, &noise)?,
        };
        let per_pos = per_pos.reshape((per_pos.dim(0)?, ()))?;
        let site_kl = match time_mask {
            Some(m) => {
                // On the device: no host round trip (which would stall a GPU's queue per site).
                let m = m.to_dtype(per_pos.dtype())?;
                // Times the reciprocal count, as the scalar affine it replaces did.
                per_pos.mul(&m)?.sum_all()?.mul(&m.sum_all()?.maximum(1.0)?.recip()?)?
            }
            None => per_pos.mean_all()?,
        };
        ctx.kl_terms.push((self.site.clone(), site_kl));
        Ok(y)
    }

    /// A [`NormAxis::Time`] site (per-channel GroupNorm) on channels-last x [B, T, C]: the fused
    /// channels-last op where it applies (plain GroupNorm, or KL-Norm in evaluation, with
    /// statistics over every frame, or over each clip's valid frames for a padding-aware length
    /// mask: `ops::group_norm_cl_masked`), else [`Norm::forward`] on the transposed input.
    pub fn forward_time_channels_last(&self, x: &Tensor, time_mask: Option<&Tensor>, ctx: &mut ForwardCtx) -> Result<Tensor> {
        let stats_mask = if ctx.padding_aware { time_mask } else { None };
        if self.kl.is_none() || !ctx.train {
            match stats_mask {
                None => return crate::ops::group_norm_cl(x, &self.weight, &self.bias, self.eps),
                Some(m) => {
                    if let Some(y) = crate::ops::group_norm_cl_masked(x, &self.weight, &self.bias, self.eps, m, false)? {
                        return Ok(y);
                    }
                }
            }
        }
        Ok(self.forward(&x.transpose(1, 2)?, time_mask, ctx)?.transpose(1, 2)?)
    }

    /// Inference only: [`Self::forward_time_channels_last`] then the erf GELU, fused into the
    /// normalization's output pass, where the fused op applies (else `None`): statistics over
    /// every frame, or with padding-aware statistics over a padded batch (evaluation during
    /// fine-tuning) `ops::group_norm_cl_masked`.
    pub fn forward_time_channels_last_gelu(&self, x: &Tensor, time_mask: Option<&Tensor>, ctx: &ForwardCtx) -> Result<Option<Tensor>> {
        if let Some((w, b, eps)) = self.plain_inference(time_mask.is_some(), ctx) {
            return Ok(Some(crate::ops::group_norm_cl_gelu(x, w, b, eps)?));
        }
        match time_mask {
            Some(m) if ctx.padding_aware && !ctx.grad && (self.kl.is_none() || !ctx.train) => crate::ops::group_norm_cl_masked(x, &self.weight, &self.bias, self.eps, m, true),
            _ => Ok(None),
        }
    }

    /// (weight, bias, eps) when [`Self::forward`] on x is a plain LayerNorm over the last axis
    /// (no gradient, no KL-Norm sampling, not f64): what its first branch runs.
    pub fn last_dim_inference(&self, x: &Tensor, ctx: &ForwardCtx) -> Option<(&Tensor, &Tensor, f64)> {
        (!ctx.grad && self.axis == NormAxis::LastDim && x.dtype() != DType::F64 && (self.kl.is_none() || !ctx.train)).then_some((&self.weight, &self.bias, self.eps))
    }

    /// (weight, bias, eps) when this forward pass is a plain deterministic normalization with
    /// statistics over every position: no gradient, no padding-aware statistics over a
    /// `padded` batch, no KL-Norm sampling. Fused inference ops take it from there.
    pub fn plain_inference(&self, padded: bool, ctx: &ForwardCtx) -> Option<(&Tensor, &Tensor, f64)> {
        let masked_stats = padded && ctx.padding_aware;
        if ctx.grad || masked_stats || (self.kl.is_some() && ctx.train) {
            return None;
        }
        Some((&self.weight, &self.bias, self.eps))
    }

    /// The KL-Norm training-mode composite: the sample y and the KL summed over features per
    /// position ([B, T]).
    fn kl_composite(&self, x: &Tensor, stats_mask: Option<&Tensor>, kl: &KlParams, noise: &Tensor) -> Result<(Tensor, Tensor)> {
        let x_hat = self.normalize(x, stats_mask)?;
        let mu = x_hat.broadcast_mul(&self.per_feature(&self.weight, x)?)?.broadcast_add(&self.per_feature(&self.bias, x)?)?;
        let z = x_hat.broadcast_mul(&self.per_feature(&kl.a, x)?)?.broadcast_add(&self.per_feature(&kl.b, x)?)?;
        let sigma = softplus(&z)?;
        let y = (&mu + sigma.mul(noise)?)?;

        // Per-element KL against the prior.
        let ln_sigma = sigma.log()?;
        let per_elem = match (&kl.prior_mean, &kl.prior_std_raw) {
            (Some(m), Some(s_raw)) => {
                let s = softplus(s_raw)?;
                let s = self.per_feature(&s, x)?;
                let m = self.per_feature(m, x)?;
                let inv_var = s.sqr()?.recip()?;
                let t1 = sigma.sqr()?.broadcast_mul(&inv_var)?;
                let t2 = mu.broadcast_sub(&m)?.sqr()?.broadcast_mul(&inv_var)?;
                let t3 = s.log()?.affine(2.0, -1.0)?; // 2 ln s_p - 1
                ((t1 + t2)?.broadcast_add(&t3)? - ln_sigma.affine(2.0, 0.0)?)?.affine(0.5, 0.0)?
            }
            _ => ((mu.sqr()? + sigma.sqr()?)? - ln_sigma.affine(2.0, 1.0)?)?.affine(0.5, 0.0)?,
        };
        // Sum over features -> [B, T].
        let per_pos = match self.axis {
            NormAxis::LastDim => per_elem.sum(D::Minus1)?,
            NormAxis::Time => per_elem.sum(1)?,
        };
        Ok((y, per_pos))
    }
}

