//! Data sets: what clips a fine-tuning run sees, with which labels, in which split.
//!
//! Every loader returns plain lists of [`Example`]s; audio is decoded later, on demand
//! ([`Source::load_16k`], [`Dataset::load_all_16k`]), so opening a data set is cheap and a
//! broken clip is reported by [`validate`] together with every other broken clip instead of
//! aborting a run half-way through an epoch.
//!
//! Layouts read:
//! - keyword spotting in the Speech Commands layout ([`speech_commands`]), its official test
//!   set layout ([`speech_commands_test`]) and detection of the two ([`open_kws`]), with the
//!   SUPERB label set (10 words, `_unknown_`, `_silence_`);
//! - ASR manifests (CSV/TSV with `path` + `sentence`/`text`, Common Voice's TSVs included:
//!   [`asr_manifest`]) and the LibriSpeech folder layout ([`librispeech`]);
//! - classification manifests (CSV/TSV with `path` + `label`: [`classification_manifest`]).
//!
//! Text for CTC follows the Hugging Face fine-tuning recipe: [`normalize_transcript`] (letter
//! case folded to the vocabulary's: [`TextCase`]), [`build_char_vocab`], [`encode_transcript`].
//!
//! Determinism: every loader returns examples in a fixed order (sorted paths, or manifest row
//! order) and everything random (the `_silence_` cuts) is drawn from a seeded [`crate::rng::Rng`],
//! so the same files and seed give the same data set on every machine.

mod csv;
mod kws;
mod manifest;
mod text;
mod validate;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub use kws::{
    open_kws, speech_commands, speech_commands_test, KwsOptions, SilenceCount, BACKGROUND_NOISE_DIR, SILENCE_LABEL,
    SUPERB_WORDS, TESTING_LIST, UNKNOWN_LABEL, VALIDATION_LIST,
};
pub use manifest::{asr_manifest, classification_manifest, classification_manifest_with_labels, librispeech};
pub use text::{build_char_vocab, encode_transcript, normalize_transcript, vocab_case, Case, TextCase, HF_CHARS_TO_IGNORE};
pub use validate::{validate, Problem, ProblemKind, ValidateOptions, ValidationReport};

/// The sample rate every model input has (Wav2Vec2 is pretrained on 16 kHz audio).
pub const SAMPLE_RATE: u32 = 16_000;

/// Where a clip's audio comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Source {
    /// A whole audio file (any rate and channel count; resampled to 16 kHz mono on load).
    File(PathBuf),
    /// `len` samples from sample `start` of the file after it is decoded, mixed to mono and
    /// resampled to 16 kHz. Used for the 1 s `_silence_` clips cut from Speech Commands'
    /// `_background_noise_` recordings, which are a minute or more long.
    Segment {
        /// The long recording.
        path: PathBuf,
        /// First sample, at 16 kHz.
        start: usize,
        /// Number of samples, at 16 kHz.
        len: usize,
    },
}

impl Source {
    /// The audio file.
    pub fn path(&self) -> &Path {
        match self {
            Source::File(p) => p,
            Source::Segment { path, .. } => path,
        }
    }

    /// Decodes the clip: mono f32 samples at 16 kHz. Errors name the file.
    pub fn load_16k(&self) -> Result<Vec<f32>> {
        let audio = crate::audio::load_resampled(self.path(), SAMPLE_RATE)?;
        match self {
            Source::File(_) => Ok(audio.samples),
            Source::Segment { path, start, len } => cut(path, &audio.samples, *start, *len),
        }
    }
}

/// `samples[start..start + len]`, or an error naming `path` when the segment does not fit.
fn cut(path: &Path, samples: &[f32], start: usize, len: usize) -> Result<Vec<f32>> {
    match start.checked_add(len) {
        Some(end) if end <= samples.len() => Ok(samples[start..end].to_vec()),
        _ => Err(Error::InvalidInput(format!(
            "{}: segment of {len} samples at sample {start} lies beyond the end of the file ({} samples at 16 kHz)",
            path.display(),
            samples.len()
        ))),
    }
}

/// One clip with its annotation.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// The audio.
    pub source: Source,
    /// Class index into [`Dataset::labels`] (keyword spotting, classification).
    pub label: Option<usize>,
    /// Raw transcript (ASR), not normalized: normalization depends on the vocabulary, which
    /// the trainer picks ([`normalize_transcript`]).
    pub text: Option<String>,
    /// Speaker id where the layout has one (for speaker-disjoint checks and statistics).
    pub speaker: Option<String>,
}

/// A list of clips and, for classification, the class names.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Dataset {
    /// The clips, in a deterministic order (see each loader).
    pub examples: Vec<Example>,
    /// Class names, indexed by [`Example::label`]; empty for ASR.
    pub labels: Vec<String>,
}

impl Dataset {
    /// Number of clips.
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// Whether there are no clips.
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// Clips per class (index = label id); clips without a label or with an out-of-range one
    /// are not counted. Class-balanced sampling (SUPERB weights each clip by
    /// `1 / count[label]`) starts from this.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.labels.len()];
        for l in self.examples.iter().filter_map(|e| e.label) {
            if let Some(c) = counts.get_mut(l) {
                *c += 1;
            }
        }
        counts
    }

    /// Decodes every clip (16 kHz mono), in order. A long recording that several
    /// [`Source::Segment`]s cut from is decoded only once. Stops at the first error (run
    /// [`validate`] first to see all of them).
    pub fn load_all_16k(&self) -> Result<Vec<Vec<f32>>> {
        let mut long: HashMap<&Path, Vec<f32>> = HashMap::new();
        let mut out = Vec::with_capacity(self.examples.len());
        for ex in &self.examples {
            match &ex.source {
                Source::File(_) => out.push(ex.source.load_16k()?),
                Source::Segment { path, start, len } => {
                    if !long.contains_key(path.as_path()) {
                        let samples = crate::audio::load_resampled(path, SAMPLE_RATE)?.samples;
                        long.insert(path.as_path(), samples);
                    }
                    out.push(cut(path, &long[path.as_path()], *start, *len)?);
                }
            }
        }
        Ok(out)
    }
}

/// Train, dev (validation) and test sets of one corpus, sharing one label list.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Splits {
    /// Training clips.
    pub train: Dataset,
    /// Validation clips (model selection, early stopping).
    pub dev: Dataset,
    /// Held-out test clips.
    pub test: Dataset,
}
