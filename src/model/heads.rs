//! Task heads with Hugging Face's tensor names: CTC (`lm_head`) and sequence classification
//! (`layer_weights`, `projector`, `classifier`).

use candle_core::{Tensor, D};

use super::config::Wav2Vec2Config;
use super::layers::{softmax_last, Linear};
use super::norm::{inv_softplus, softplus};
use super::params::{Init, Vb};
use super::wav2vec2::EncoderOutput;
use super::ForwardCtx;
use crate::error::Result;

/// `Wav2Vec2ForCTC`'s head: dropout, then `lm_head` to vocabulary logits per frame.
pub struct CtcHead {
    pub lm_head: Linear,
}

impl CtcHead {
    /// Loads `lm_head` (initialized when the checkpoint has none).
    pub fn load(cfg: &Wav2Vec2Config, vb: &Vb) -> Result<Self> {
        Ok(CtcHead { lm_head: Linear::load_or_init(&vb.pp("lm_head"), cfg.hidden_size, cfg.vocab_size)? })
    }

    /// [B, T, H] -> logits [B, T, vocab].
    pub fn forward(&self, out: &EncoderOutput, final_dropout: f64, ctx: &mut ForwardCtx) -> Result<Tensor> {
        let h = ctx.dropout(&out.last_hidden_state, final_dropout)?;
        self.lm_head.forward(&h)
    }
}

/// `Wav2Vec2ForSequenceClassification`'s head: optional softmax-weighted sum of every hidden
/// state, `projector`, mean pooling over valid frames, `classifier`.
pub struct ClassificationHead {
    pub layer_weights: Option<Tensor>,
    pub projector: Linear,
    pub classifier: Linear,
    /// Variational information bottleneck on the pooled representation (training only).
    pub vib: Option<Vib>,
}

/// VIB on the pooled representation (Mahabadi et al., ICLR 2021), the baseline KLNORM.md asks
/// for beside KL-Norm. The pooled vector `mu` [B, P] (what transformers feeds `classifier`) is
/// the code's mean; `sigma = softplus(mu W^T + b)` its scale. Training feeds `classifier` one
/// sample `mu + sigma * noise` and adds `KL(N(mu, sigma^2) || N(0, I))` (summed over P,
/// averaged over the batch) to the KL term; evaluation feeds `mu`, exactly transformers'
/// function. `W` [P, P] starts at 0 and `b` at `softplus^-1(sigma0)`, so step 0 is the
/// deterministic head plus noise of scale sigma0. Stored as `classifier.kl_vib_sigma_weight`
/// and `classifier.kl_vib_sigma_bias`: extra keys that transformers and plain loads ignore.
pub struct Vib {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl ClassificationHead {
    /// Loads the head (initialized where the checkpoint has none); `vib_sigma0` adds the VIB
    /// bottleneck with that initial noise scale.
    pub fn load(cfg: &Wav2Vec2Config, vb: &Vb, vib_sigma0: Option<f64>) -> Result<Self> {
        let layer_weights = if cfg.use_weighted_layer_sum {
            let n = cfg.num_hidden_layers + 1;
            Some(vb.get_or_init(&[n], "layer_weights", Init::Const(1.0 / n as f64))?)
        } else {
            None
        };
        let p = cfg.classifier_proj_size;
        let vib = match vib_sigma0 {
            None => None,
            Some(s0) if !(s0 > 0.0 && s0.is_finite()) => {
                return Err(crate::Error::InvalidInput(format!("VIB sigma0 must be positive, got {s0}")))
            }
            Some(s0) => Some(Vib {
                weight: vb.pp("classifier").get_or_init(&[p, p], "kl_vib_sigma_weight", Init::Const(0.0))?,
                bias: vb.pp("classifier").get_or_init(&[p], "kl_vib_sigma_bias", Init::Const(inv_softplus(s0)))?,
            }),
        };
        Ok(ClassificationHead {
            vib,
            layer_weights,
            projector: Linear::load_or_init(&vb.pp("projector"), cfg.hidden_size, cfg.classifier_proj_size)?,
            classifier: Linear::load_or_init(&vb.pp("classifier"), cfg.classifier_proj_size, cfg.num_labels())?,
        })
    }

    /// The pooled representation [B, proj] (input of `classifier`).
    pub fn pooled(&self, out: &EncoderOutput) -> Result<Tensor> {
        let h = match &self.layer_weights {
            Some(w) => {
                let w = softmax_last(w)?;
                let mut acc: Option<Tensor> = None;
                for (i, hs) in out.hidden_states.iter().enumerate() {
                    let term = hs.broadcast_mul(&w.narrow(0, i, 1)?)?;
                    acc = Some(match acc {
                        None => term,
                        Some(a) => (a + term)?,
                    });
                }
                acc.ok_or_else(|| crate::Error::InvalidInput("no hidden states".into()))?
            }
            None => out.last_hidden_state.clone(),
        };
        let h = self.projector.forward(&h)?; // [B, T, P]
        let pool = |h: &Tensor, m: Option<&Tensor>| -> Result<Tensor> {
            match m {
                Some(m) => {
                    let m = m.to_dtype(h.dtype())?;
                    let summed = h.broadcast_mul(&m.unsqueeze(2)?)?.sum(1)?; // [B, P]
                    let n = m.sum_keepdim(1)?; // [B, 1]
                    Ok(summed.broadcast_div(&n)?)
                }
                None => Ok(h.mean(1)?),
            }
        };
        if crate::ops::half_on_cpu(&h) {
            // bf16 / f16 on the CPU: the sums over frames in f32 (see ops::half_on_cpu).
            return crate::ops::in_f32(&[&h], |v| pool(&v[0], out.frame_mask.as_ref()));
        }
        pool(&h, out.frame_mask.as_ref())
    }

    /// Logits [B, num_labels]. With VIB in training mode, `classifier` sees a sample of the
    /// bottleneck and the KL is pushed into `ctx` as site `vib`.
    pub fn forward(&self, out: &EncoderOutput, ctx: &mut ForwardCtx) -> Result<Tensor> {
        let mu = self.pooled(out)?; // [B, P]
        let vib = match (&self.vib, ctx.train) {
            (Some(v), true) => v,
            _ => return self.classifier.forward(&mu),
        };
        let sigma = softplus(&mu.matmul(&vib.weight.t()?)?.broadcast_add(&vib.bias)?)?; // [B, P]
        let z = (&mu + sigma.mul(&ctx.normal_like(&mu)?)?)?;
        // 0.5 (mu^2 + sigma^2 - 1 - 2 ln sigma), summed over P, averaged over the batch.
        let kl = ((mu.sqr()? + sigma.sqr()?)? - sigma.log()?.affine(2.0, 1.0)?)?.affine(0.5, 0.0)?.sum(1)?.mean_all()?;
        ctx.kl_terms.push(("vib".into(), kl));
        self.classifier.forward(&z)
    }
}

/// Probabilities from logits over the last dimension.
pub fn probabilities(logits: &Tensor) -> Result<Tensor> {
    let _ = D::Minus1;
    softmax_last(logits)
}
