//! Task heads with Hugging Face's tensor names: CTC (`lm_head`) and sequence classification
//! (`layer_weights`, `projector`, `classifier`).

use candle_core::{Tensor, D};

use super::config::Wav2Vec2Config;
use super::layers::{softmax_last, Linear};
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
}

impl ClassificationHead {
    /// Loads the head (initialized where the checkpoint has none).
    pub fn load(cfg: &Wav2Vec2Config, vb: &Vb) -> Result<Self> {
        let layer_weights = if cfg.use_weighted_layer_sum {
            let n = cfg.num_hidden_layers + 1;
            Some(vb.get_or_init(&[n], "layer_weights", Init::Const(1.0 / n as f64))?)
        } else {
            None
        };
        Ok(ClassificationHead {
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
        match &out.frame_mask {
            Some(m) => {
                let summed = h.broadcast_mul(&m.unsqueeze(2)?)?.sum(1)?; // [B, P]
                let n = m.sum_keepdim(1)?; // [B, 1]
                Ok(summed.broadcast_div(&n)?)
            }
            None => Ok(h.mean(1)?),
        }
    }

    /// Logits [B, num_labels].
    pub fn forward(&self, out: &EncoderOutput) -> Result<Tensor> {
        self.classifier.forward(&self.pooled(out)?)
    }
}

/// Probabilities from logits over the last dimension.
pub fn probabilities(logits: &Tensor) -> Result<Tensor> {
    let _ = D::Minus1;
    softmax_last(logits)
}
