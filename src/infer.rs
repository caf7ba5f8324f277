//! Inference on audio files: embeddings, class labels, transcripts.

use std::path::Path;

use candle_core::{DType, Tensor, D};

use crate::audio;
use crate::error::{Error, Result};
use crate::model::{ForwardCtx, Head, ModelOutput, SpeechModel};
use crate::decode::{log_softmax_rows, BeamSearch, Hypothesis};
use crate::vocab::{ctc_greedy, word_spans, CharVocab};

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
    /// CTC: the transcript, its characters or words with their times when asked
    /// ([`PredictOptions::timestamps`]; empty otherwise), and with a beam search the best
    /// [`PredictOptions::n_best`] hypotheses, best first (empty for greedy decoding).
    Text { text: String, timestamps: Vec<TimedText>, hypotheses: Vec<Hypothesis> },
}

/// Which timestamps a transcript carries (transformers' ASR pipeline `return_timestamps`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timestamps {
    /// Every character, the word delimiter as `" "` (`return_timestamps="char"`).
    Char,
    /// Every word (`return_timestamps="word"`).
    Word,
}

impl std::str::FromStr for Timestamps {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "char" => Ok(Timestamps::Char),
            "word" => Ok(Timestamps::Word),
            _ => Err(Error::InvalidInput(format!("--timestamps `{s}`: expected char or word"))),
        }
    }
}

/// A character or word of a transcript and when it is spoken, in seconds from the start of the
/// recording: its first logit frame's start and the end of its last frame, a frame being
/// `inputs_to_logits_ratio` samples (the product of the conv strides: 20 ms at 16 kHz for every
/// Wav2Vec2). The pipeline's `{"text", "timestamp": (start, stop)}`, the same values.
#[derive(Debug, Clone, PartialEq)]
pub struct TimedText {
    pub text: String,
    pub start_s: f64,
    pub end_s: f64,
}

/// How `predict` runs: whole files or chunks, and timestamps.
#[derive(Debug, Clone, Default)]
pub struct PredictOptions {
    /// Long recordings in overlapping chunks (CTC only); None = the whole file in one pass.
    pub chunking: Option<Chunking>,
    /// With `chunking`: chunks per forward pass (0 is taken as 1).
    pub batch: usize,
    /// Character or word times for transcripts (CTC only; greedy decoding only).
    pub timestamps: Option<Timestamps>,
    /// CTC: a beam search (with a word language model, or not) instead of greedy decoding
    /// (check its LM against the model's vocabulary once first:
    /// [`BeamSearch::check_vocabulary`]).
    pub decoder: Option<BeamSearch>,
    /// With `decoder`: how many of its best hypotheses [`Prediction::Text`] lists (0 is taken
    /// as 1).
    pub n_best: usize,
}

/// The spans of `frame_ids` at the chosen level, in seconds: frame `f` starts at
/// `f * align / rate` (`align` samples per frame), computed as transformers does (an exact
/// integer product, then one division).
pub fn timed_text(vocab: &CharVocab, frame_ids: &[usize], level: Timestamps, align: usize, rate: u32) -> Vec<TimedText> {
    let chars = vocab.char_spans(frame_ids);
    let spans = match level {
        Timestamps::Char => chars,
        Timestamps::Word => word_spans(&chars),
    };
    let secs = |f: usize| (f * align) as f64 / rate as f64;
    spans.into_iter().map(|s| TimedText { start_s: secs(s.start), end_s: secs(s.end), text: s.text }).collect()
}

/// Long recordings transcribed in overlapping chunks, as transformers'
/// `AutomaticSpeechRecognitionPipeline` does for CTC models (`chunk_length_s`,
/// `stride_length_s`): each chunk is normalized and run alone, the logit frames of its strides
/// (context on each side, shared with the neighbouring chunk) are dropped, the rest are joined
/// and decoded as one. Attention then costs chunk², not length²: a 30-minute file in one piece
/// needs a [90 000, 90 000] score matrix per head.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Chunking {
    /// Chunk length in seconds (`chunk_length_s`).
    pub chunk_s: f64,
    /// Context dropped from the left and the right of each chunk's output, in seconds
    /// (`stride_length_s`; transformers' default is chunk / 6 on both sides).
    pub stride_s: (f64, f64),
}

impl Chunking {
    /// `stride_s`: None for transformers' default (chunk / 6 each side).
    pub fn new(chunk_s: f64, stride_s: Option<(f64, f64)>) -> Result<Self> {
        let stride_s = stride_s.unwrap_or((chunk_s / 6.0, chunk_s / 6.0));
        if !(chunk_s.is_finite() && chunk_s > 0.0 && stride_s.0.is_finite() && stride_s.1.is_finite() && stride_s.0 >= 0.0 && stride_s.1 >= 0.0) {
            return Err(Error::InvalidInput(format!("--chunk-s {chunk_s} --stride-s {},{}: expected a positive chunk and non-negative strides (seconds)", stride_s.0, stride_s.1)));
        }
        Ok(Chunking { chunk_s, stride_s })
    }
}

/// One chunk of [`chunk_plan`]: samples `start..end` of the recording, its strides in samples
/// (0 at the recording's ends), and the logit frames kept: `token_left..token_n - token_right`
/// of the chunk's frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkPlan {
    pub start: usize,
    pub end: usize,
    pub left: usize,
    pub right: usize,
    pub token_n: usize,
    pub token_left: usize,
    pub token_right: usize,
}

/// The chunks of a recording of `n` samples at `rate` Hz for a model with `align` samples per
/// logit frame (the product of the conv strides), with transformers' arithmetic (chunk and
/// strides rounded to whole frames, half to even as Python's `round`; a chunk no longer than
/// its left stride is skipped; the chunk that reaches the end is the last).
pub fn chunk_plan(n: usize, rate: u32, align: usize, c: &Chunking) -> Result<Vec<ChunkPlan>> {
    let frames = |s: f64| (s * rate as f64 / align as f64).round_ties_even() as usize * align;
    let (chunk_len, sl, sr) = (frames(c.chunk_s), frames(c.stride_s.0), frames(c.stride_s.1));
    if chunk_len <= sl + sr {
        return Err(Error::InvalidInput(format!(
            "--chunk-s {} is {chunk_len} samples, not longer than its strides ({sl} + {sr}): lengthen the chunk or shorten --stride-s",
            c.chunk_s
        )));
    }
    let ratio = 1.0 / align as f64;
    let mut plan = Vec::new();
    for start in (0..n).step_by(chunk_len - sl - sr) {
        let end = (start + chunk_len).min(n);
        let is_last = start + chunk_len >= n;
        let left = if start == 0 { 0 } else { sl };
        let right = if is_last { 0 } else { sr };
        let len = end - start;
        if len > left {
            // transformers' rescale_stride, in its order of operations.
            let token_n = (len as f64 * ratio).round_ties_even() as usize;
            let token_left = (left as f64 / len as f64 * token_n as f64).round_ties_even() as usize;
            let token_right = (right as f64 / len as f64 * token_n as f64).round_ties_even() as usize;
            plan.push(ChunkPlan { start, end, left, right, token_n, token_left, token_right });
        }
        if is_last {
            break;
        }
    }
    Ok(plan)
}

/// The CTC logits of `path` transcribed in chunks ([`Chunking`]): each chunk's kept frames (its
/// strides' frames dropped), joined: [frames, vocab]. Up to `batch` chunks of the same length
/// run as one batch (no padding, so each chunk's frames are what it gives alone; only the last
/// chunk is shorter). A chunk shorter than one model frame (possible only at the end, with
/// strides under a frame) is skipped; transformers fails on it.
pub fn ctc_logits_chunked(model: &SpeechModel, path: &Path, chunking: &Chunking, batch: usize) -> Result<Tensor> {
    if !matches!(model.head, Head::Ctc(_)) {
        return Err(Error::Unsupported {
            what: "--chunk-s on a model without a CTC head".into(),
            detail: "chunked prediction joins CTC frames (transcription); classify a long recording by cutting it into clips".into(),
        });
    }
    let rate = model.feature_extractor.config.sampling_rate;
    let a = audio::load_resampled(path, rate)?;
    let align: usize = model.config.conv_stride.iter().product();
    let min = model.config.receptive_field();
    let plan: Vec<ChunkPlan> = chunk_plan(a.samples.len(), rate, align, chunking)?.into_iter().filter(|c| c.end - c.start >= min).collect();
    let mut kept = Vec::new();
    for group in plan.chunk_by(|p, q| p.end - p.start == q.end - q.start).flat_map(|g| g.chunks(batch.max(1))) {
        let clips: Vec<&[f32]> = group.iter().map(|c| &a.samples[c.start..c.end]).collect();
        let x = model.feature_extractor.batch(&clips)?.input_tensor(&model.store.device)?.to_dtype(model.store.dtype)?;
        let logits = model.forward(&x, None, &mut ForwardCtx::eval())?.logits.ok_or_else(|| Error::InvalidInput("a CTC head gives logits".into()))?;
        let frames = logits.dim(1)?;
        for (j, c) in group.iter().enumerate() {
            // Python's items[left : token_n - right], clipped to the frames there are.
            let stop = c.token_n.saturating_sub(c.token_right).min(frames);
            let start = c.token_left.min(stop);
            if stop > start {
                kept.push(logits.get(j)?.narrow(0, start, stop - start)?);
            }
        }
    }
    if kept.is_empty() {
        return Err(Error::InvalidInput(format!("{}: no chunk is one model frame long", path.display())));
    }
    Ok(Tensor::cat(&kept, 0)?)
}

/// The greedy CTC frame ids of `path` transcribed in chunks: the best token of each frame of
/// [`ctc_logits_chunked`], what [`predict_file`] decodes with [`PredictOptions::chunking`].
pub fn ctc_ids_chunked(model: &SpeechModel, path: &Path, chunking: &Chunking, batch: usize) -> Result<Vec<usize>> {
    let ids: Vec<u32> = ctc_logits_chunked(model, path, chunking, batch)?.argmax(D::Minus1)?.to_vec1()?;
    Ok(ids.into_iter().map(|i| i as usize).collect())
}

fn no_vocab() -> Error {
    Error::Unsupported { what: "transcribing without vocab.json".into(), detail: "a CTC model folder needs vocab.json to turn ids into text".into() }
}

/// Classifies or transcribes one file ([`PredictOptions`]: whole or in chunks, with or without
/// timestamps). `vocab` is needed for CTC models.
pub fn predict_file(model: &SpeechModel, path: &Path, vocab: Option<&CharVocab>, opts: &PredictOptions) -> Result<Prediction> {
    if opts.timestamps.is_some() && !matches!(model.head, Head::Ctc(_)) {
        return Err(Error::Unsupported {
            what: "--timestamps on a model without a CTC head".into(),
            detail: "timestamps place a transcript's characters or words in time; a classifier gives one label per file".into(),
        });
    }
    if opts.decoder.is_some() && !matches!(model.head, Head::Ctc(_)) {
        return Err(Error::Unsupported {
            what: "--lm / --beam-width on a model without a CTC head".into(),
            detail: "a beam search decodes CTC transcripts; a classifier gives one label per file".into(),
        });
    }
    if opts.timestamps.is_some() && opts.decoder.is_some() {
        return Err(Error::Unsupported {
            what: "--timestamps with a beam search (--lm / --beam-width)".into(),
            detail: "timestamps come from the greedy path's frames; drop --lm and --beam-width for them".into(),
        });
    }
    // The CTC logits [frames, vocab].
    let logits = match &opts.chunking {
        Some(c) => ctc_logits_chunked(model, path, c, opts.batch)?,
        None => {
            let out = run_file(model, path)?;
            let logits = out.logits.ok_or_else(|| Error::Unsupported {
                what: "predict on a model without a head".into(),
                detail: "this checkpoint is a bare encoder (Wav2Vec2Model / ForPreTraining); fine-tune it with `klspeech train` or use `klspeech embed`".into(),
            })?;
            if let Head::Classification(_) = &model.head {
                let p: Vec<f32> = crate::model::heads::probabilities(&logits.to_dtype(DType::F32)?)?.squeeze(0)?.to_vec1()?;
                let labels = model.config.labels();
                let scores: Vec<(String, f32)> = labels.into_iter().zip(p.iter().copied()).collect();
                let (label, probability) =
                    scores.iter().cloned().fold((String::new(), f32::MIN), |best, (l, v)| if v > best.1 { (l, v) } else { best });
                return Ok(Prediction::Label { label, probability, scores });
            }
            logits.squeeze(0)?
        }
    };
    let vocab = vocab.ok_or_else(no_vocab)?;
    if let Some(d) = &opts.decoder {
        let rows: Vec<f32> = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let mut hypotheses = d.search(vocab, &log_softmax_rows(&rows, vocab.len()), vocab.len())?;
        hypotheses.truncate(opts.n_best.max(1));
        let text = hypotheses.first().map(|h| h.text.clone()).unwrap_or_default();
        return Ok(Prediction::Text { text, timestamps: Vec::new(), hypotheses });
    }
    let ids: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
    let ids: Vec<usize> = ids.into_iter().map(|i| i as usize).collect();
    let text = vocab.decode(&ctc_greedy(&ids, vocab.pad_id));
    let timestamps = match opts.timestamps {
        Some(level) => {
            let align: usize = model.config.conv_stride.iter().product();
            timed_text(vocab, &ids, level, align, model.feature_extractor.config.sampling_rate)
        }
        None => Vec::new(),
    };
    Ok(Prediction::Text { text, timestamps, hypotheses: Vec::new() })
}
