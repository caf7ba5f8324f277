//! Evaluation of a model on a data set: accuracy, macro-F1 and confusion for classification;
//! CER and WER for ASR, with greedy CTC decoding or a beam search ([`crate::decode`]).

use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

use super::feature_cache::FeatureCache;
use crate::error::{Error, Result};
use crate::features::FeatureExtractor;
use crate::metrics;
use crate::model::{ForwardCtx, HeadKind, SpeechModel};
use crate::decode::{log_softmax_rows, BeamSearch};
use crate::vocab::{ctc_greedy, CharVocab};

/// Metrics of one evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct EvalResult {
    /// Clips evaluated.
    pub n: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub macro_f1: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confusion: Option<Vec<Vec<usize>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub labels: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cer: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wer: Option<f64>,
    /// Predicted transcripts / labels, in data order.
    #[serde(skip)]
    pub predictions: Vec<String>,
}

impl EvalResult {
    /// The early-stopping metric, oriented so that larger is better (accuracy, or -CER).
    pub fn score(&self) -> f64 {
        match (self.accuracy, self.cer) {
            (Some(a), _) => a,
            (None, Some(c)) => -c,
            _ => f64::NEG_INFINITY,
        }
    }
}

/// Padded input batch [B, L] and lengths from clips, normalized padding-aware.
pub fn batch_tensor(fe: &FeatureExtractor, clips: &[&[f32]], model: &SpeechModel) -> Result<(Tensor, Vec<usize>)> {
    let b = fe.clone().with_padding_aware(true).batch(clips)?;
    let t = b.input_tensor(&model.store.device)?.to_dtype(model.store.dtype)?;
    Ok((t, b.lengths))
}

/// Evaluates `model` on clips (16 kHz) with labels (classification) or transcripts (ASR).
pub fn evaluate(
    model: &SpeechModel,
    clips: &[Vec<f32>],
    labels: Option<&[usize]>,
    texts: Option<&[String]>,
    vocab: Option<&CharVocab>,
    batch_size: usize,
) -> Result<EvalResult> {
    evaluate_cached(model, clips, labels, texts, vocab, batch_size, None)
}

/// [`evaluate`] for a CTC model with transcripts decoded by `decoder`'s beam search (a word
/// language model, a beam width) instead of greedily.
pub fn evaluate_decoded(
    model: &SpeechModel,
    clips: &[Vec<f32>],
    texts: &[String],
    vocab: &CharVocab,
    batch_size: usize,
    decoder: &BeamSearch,
) -> Result<EvalResult> {
    evaluate_with(model, clips, None, Some(texts), Some(vocab), batch_size, None, Some(decoder))
}

/// [`evaluate`] with the feature encoder's outputs of each batch taken from `cache` when it
/// has them, else computed and kept there (a trainer's repeated evaluations of one split with
/// the feature encoder frozen: `train::feature_cache`). The batches are the same every call.
pub fn evaluate_cached(
    model: &SpeechModel,
    clips: &[Vec<f32>],
    labels: Option<&[usize]>,
    texts: Option<&[String]>,
    vocab: Option<&CharVocab>,
    batch_size: usize,
    cache: Option<&mut FeatureCache>,
) -> Result<EvalResult> {
    evaluate_with(model, clips, labels, texts, vocab, batch_size, cache, None)
}

#[allow(clippy::too_many_arguments)]
fn evaluate_with(
    model: &SpeechModel,
    clips: &[Vec<f32>],
    labels: Option<&[usize]>,
    texts: Option<&[String]>,
    vocab: Option<&CharVocab>,
    batch_size: usize,
    mut cache: Option<&mut FeatureCache>,
    decoder: Option<&BeamSearch>,
) -> Result<EvalResult> {
    if let (Some(d), Some(v)) = (decoder, vocab) {
        d.check_vocabulary(v)?;
    }
    let mut preds_cls = Vec::with_capacity(clips.len());
    let mut preds_txt = Vec::with_capacity(clips.len());
    // Sort by length so batches pad little; restore order afterwards.
    let mut order: Vec<usize> = (0..clips.len()).collect();
    order.sort_by_key(|&i| clips[i].len());
    let mut out_cls = vec![0usize; clips.len()];
    let mut out_txt = vec![String::new(); clips.len()];
    for (bi, chunk) in order.chunks(batch_size.max(1)).enumerate() {
        let refs: Vec<&[f32]> = chunk.iter().map(|&i| clips[i].as_slice()).collect();
        let mut ctx = ForwardCtx::eval().with_padding_aware(true);
        let (feats, lengths) = match cache.as_mut().and_then(|c| c.eval_batch(bi)) {
            // (The batch's sample counts: what the feature extractor's batch reports.)
            Some(f) => (f, refs.iter().map(|c| c.len()).collect::<Vec<_>>()),
            None => {
                let (x, lengths) = batch_tensor(&model.feature_extractor, &refs, model)?;
                let f = model.encoder.extract(&x, Some(&lengths), &mut ctx)?;
                if let Some(c) = cache.as_mut() {
                    c.keep_eval_batch(bi, &f);
                }
                (f, lengths)
            }
        };
        let out = model.forward_features(&feats, Some(&lengths), &mut ctx)?;
        let logits = out.logits.ok_or_else(|| Error::InvalidInput("evaluation needs a model with a head".into()))?;
        match model.head_kind {
            HeadKind::Classification => {
                let ids: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
                for (&i, id) in chunk.iter().zip(ids) {
                    out_cls[i] = id as usize;
                }
            }
            HeadKind::Ctc => {
                let vocab = vocab.ok_or_else(|| Error::InvalidInput("CTC evaluation needs a vocabulary".into()))?;
                if let Some(d) = decoder {
                    // Each clip's valid frames [n, V] through the beam search.
                    let all: Vec<Vec<Vec<f32>>> = logits.to_dtype(DType::F32)?.to_vec3()?;
                    for (k, &i) in chunk.iter().enumerate() {
                        let n = out.encoder.frame_lengths[k];
                        let rows: Vec<f32> = all[k][..n].concat();
                        out_txt[i] = d.decode(vocab, &log_softmax_rows(&rows, vocab.len()), vocab.len())?;
                    }
                    continue;
                }
                let ids: Vec<Vec<u32>> = logits.to_dtype(DType::F32)?.argmax(D::Minus1)?.to_vec2()?;
                for (k, &i) in chunk.iter().enumerate() {
                    let n = out.encoder.frame_lengths[k];
                    let frame_ids: Vec<usize> = ids[k][..n].iter().map(|&v| v as usize).collect();
                    out_txt[i] = vocab.decode(&ctc_greedy(&frame_ids, vocab.pad_id));
                }
            }
            HeadKind::None => return Err(Error::InvalidInput("evaluation needs a model with a head".into())),
        }
    }
    preds_cls.extend(out_cls);
    preds_txt.extend(out_txt);
    let mut r = EvalResult { n: clips.len(), ..Default::default() };
    match model.head_kind {
        HeadKind::Classification => {
            let truth = labels.ok_or_else(|| Error::InvalidInput("classification evaluation needs labels".into()))?;
            let m = metrics::classification_metrics(model.config.num_labels(), truth, &preds_cls);
            let names = model.config.labels();
            r.accuracy = Some(m.accuracy);
            r.macro_f1 = Some(m.macro_f1);
            r.confusion = Some(m.confusion);
            r.predictions = preds_cls.iter().map(|&i| names.get(i).cloned().unwrap_or_default()).collect();
            r.labels = Some(names);
        }
        _ => {
            let texts = texts.ok_or_else(|| Error::InvalidInput("ASR evaluation needs transcripts".into()))?;
            let refs: Vec<&str> = texts.iter().map(|s| s.as_str()).collect();
            let hyps: Vec<&str> = preds_txt.iter().map(|s| s.as_str()).collect();
            r.cer = Some(metrics::char_error_rate(&refs, &hyps));
            r.wer = Some(metrics::word_error_rate(&refs, &hyps));
            r.predictions = preds_txt;
        }
    }
    Ok(r)
}

/// Evaluates a keyword-spotting model on a folder in the Speech Commands test layout (one
/// sub-folder per label), with the model's own labels: the words are its labels that do not
/// start with `_`, other folders count as `_unknown_`.
pub fn evaluate_kws_folder(model: &SpeechModel, dir: &std::path::Path, batch: usize) -> Result<EvalResult> {
    let words: Vec<String> = model.config.labels().into_iter().filter(|l| !l.starts_with('_')).collect();
    let ds = crate::data::open_kws(dir, &crate::data::KwsOptions { words, ..Default::default() })?.test;
    let clips = ds.load_all_16k()?;
    let y: Vec<usize> = ds.examples.iter().map(|e| e.label.unwrap_or(0)).collect();
    evaluate(model, &clips, Some(&y), None, None, batch)
}

/// Evaluates a CTC model on an ASR manifest: transcripts normalized as for training
/// (`chars_to_ignore` removed, letter case by `case` against the model's vocabulary), decoding
/// with the model's `vocab.json`, greedily or with `decoder`'s beam search.
pub fn evaluate_asr_manifest(
    model: &SpeechModel,
    manifest: &std::path::Path,
    chars_to_ignore: &str,
    case: crate::data::TextCase,
    batch: usize,
    decoder: Option<&BeamSearch>,
) -> Result<EvalResult> {
    let map = model.vocab.as_ref().ok_or_else(|| Error::InvalidInput("evaluating ASR needs a model with vocab.json".into()))?;
    let vocab = CharVocab::from_map(map, std::path::Path::new("vocab.json"))?;
    let case = case.resolve(Some(map));
    let ds = crate::data::asr_manifest(manifest)?;
    let clips = ds.load_all_16k()?;
    let texts: Vec<String> =
        ds.examples.iter().map(|e| crate::data::normalize_transcript(e.text.as_deref().unwrap_or(""), chars_to_ignore, case)).collect();
    evaluate_with(model, &clips, None, Some(&texts), Some(&vocab), batch, None, decoder)
}
