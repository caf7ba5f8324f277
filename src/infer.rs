//! Inference on audio files: embeddings, class labels, transcripts.

use std::path::Path;

use candle_core::{DType, Tensor, D};

use crate::audio;
use crate::error::{Error, Result};
use crate::model::{ForwardCtx, Head, ModelOutput, SpeechModel};
use crate::vocab::{ctc_greedy, CharVocab};

/// Reads `path`, resamples it to the model's rate and normalizes it as the model's
/// preprocessor does: input_values [1, L].
pub fn prepare(model: &SpeechModel, path: &Path) -> Result<Tensor> {
    let rate = model.feature_extractor.config.sampling_rate;
    let a = audio::load_resampled(path, rate)?;
    let min = model.config.receptive_field();
    if a.samples.len() < min {
        return Err(Error::InvalidInput(format!(
            "{}: {} samples at {rate} Hz is shorter than one model frame ({min} samples)",
            path.display(),
            a.samples.len()
        )));
    }
    let batch = model.feature_extractor.batch(&[a.samples])?;
    batch.input_tensor(&model.store.device)?.to_dtype(model.store.dtype).map_err(Into::into)
}

/// Runs the model on one file in evaluation mode.
pub fn run_file(model: &SpeechModel, path: &Path) -> Result<ModelOutput> {
    let x = prepare(model, path)?;
    model.forward(&x, None, &mut ForwardCtx::eval())
}

/// Which hidden state `embed` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerChoice {
    /// The encoder's final output (`last_hidden_state`).
    Last,
    /// `hidden_states[n]` (0 = input of the first transformer layer).
    Index(usize),
    /// Every hidden state stacked: [layers + 1, frames, hidden].
    All,
}

impl std::str::FromStr for LayerChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "last" => Ok(LayerChoice::Last),
            "all" => Ok(LayerChoice::All),
            n => n.parse().map(LayerChoice::Index).map_err(|_| Error::InvalidInput(format!("--layer `{s}`: expected last, all or a layer number"))),
        }
    }
}

/// The embedding of one file: [frames, hidden], or [layers + 1, frames, hidden] for `All`.
pub fn embed_file(model: &SpeechModel, path: &Path, layer: LayerChoice) -> Result<Tensor> {
    let out = run_file(model, path)?.encoder;
    let n = out.hidden_states.len();
    let t = match layer {
        LayerChoice::Last => out.last_hidden_state.squeeze(0)?,
        LayerChoice::Index(i) if i < n => out.hidden_states[i].squeeze(0)?,
        LayerChoice::Index(i) => {
            return Err(Error::InvalidInput(format!("--layer {i}: this model has hidden states 0..={}", n - 1)));
        }
        LayerChoice::All => Tensor::stack(&out.hidden_states, 0)?.squeeze(1)?,
    };
    Ok(t.to_dtype(DType::F32)?)
}

/// What `predict` says about one file.
#[derive(Debug, Clone, PartialEq)]
pub enum Prediction {
    /// Classification: best label, its probability, and every label's probability.
    Label { label: String, probability: f32, scores: Vec<(String, f32)> },
    /// CTC: the greedy transcript.
    Text(String),
}

/// Classifies or transcribes one file.
pub fn predict_file(model: &SpeechModel, path: &Path, vocab: Option<&CharVocab>) -> Result<Prediction> {
    let out = run_file(model, path)?;
    let logits = out.logits.ok_or_else(|| Error::Unsupported {
        what: "predict on a model without a head".into(),
        detail: "this checkpoint is a bare encoder (Wav2Vec2Model / ForPreTraining); fine-tune it with `klspeech train` or use `klspeech embed`".into(),
    })?;
    match &model.head {
        Head::Classification(_) => {
            let p: Vec<f32> = crate::model::heads::probabilities(&logits.to_dtype(DType::F32)?)?.squeeze(0)?.to_vec1()?;
            let labels = model.config.labels();
            let scores: Vec<(String, f32)> = labels.into_iter().zip(p.iter().copied()).collect();
            let (label, probability) = scores
                .iter()
                .cloned()
                .fold((String::new(), f32::MIN), |best, (l, v)| if v > best.1 { (l, v) } else { best });
            Ok(Prediction::Label { label, probability, scores })
        }
        Head::Ctc(_) => {
            let vocab = vocab.ok_or_else(|| Error::Unsupported {
                what: "transcribing without vocab.json".into(),
                detail: "a CTC model folder needs vocab.json to turn ids into text".into(),
            })?;
            let ids: Vec<u32> = logits.squeeze(0)?.argmax(D::Minus1)?.to_vec1()?;
            let ids: Vec<usize> = ids.into_iter().map(|i| i as usize).collect();
            Ok(Prediction::Text(vocab.decode(&ctc_greedy(&ids, vocab.pad_id))))
        }
        Head::None => unreachable!("logits imply a head"),
    }
}
