//! The full configuration of a training run; saved as `run_config.json` in the output folder
//! so that a run can be reproduced (and resumed) from its output alone.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::augment::AugmentConfig;
use crate::error::{Error, Result};

/// What is trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Keyword spotting on the Speech Commands layout (classification head).
    Kws,
    /// Speech recognition with CTC over characters.
    Asr,
    /// Utterance classification from a manifest with a `label` column.
    Classify,
}

impl std::str::FromStr for Task {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "kws" => Ok(Task::Kws),
            "asr" => Ok(Task::Asr),
            "classify" => Ok(Task::Classify),
            _ => Err(Error::InvalidInput(format!("task `{s}`: expected kws, asr or classify"))),
        }
    }
}

/// Every setting of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub task: Task,
    /// Pretrained model folder (Hugging Face layout).
    pub model: PathBuf,
    /// Initialize every weight randomly from `model/config.json` (pre-training from scratch).
    #[serde(default)]
    pub from_scratch: bool,
    /// Training data (a Speech Commands folder, a manifest, or a LibriSpeech folder).
    pub data: PathBuf,
    /// Development data (manifests); for Speech Commands the list files define it.
    pub dev: Option<PathBuf>,
    /// Output folder.
    pub out: PathBuf,
    /// `layer` (plain normalization) or `kl` (KL-Norm).
    pub norm: String,
    /// KL-Norm sites: encoder, all, last:K.
    pub kl_sites: String,
    /// Final weight of the KL term (default 1e-2, chosen by the study in docs/RESULTS.md).
    pub kl_beta: f64,
    /// Steps over which the KL weight ramps linearly from 0.
    pub kl_warmup_steps: usize,
    /// KL prior: standard or learned.
    pub kl_prior: String,
    /// VIB on the pooled representation (classification only); its KL joins the KL term,
    /// weighted by `kl_beta`, and its initial noise scale is `kl_sigma0`.
    #[serde(default)]
    pub vib: bool,
    /// Initial noise scale of KL-Norm.
    pub kl_sigma0: f64,
    /// Optimizer steps (overrides epochs when set).
    pub steps: Option<usize>,
    /// Passes over the training data.
    pub epochs: usize,
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    pub lr: f64,
    pub weight_decay: f64,
    /// Warm-up as a share of all steps.
    pub warmup_ratio: f64,
    /// constant, linear or cosine decay after warm-up.
    pub schedule: String,
    /// Clip the global gradient norm to this (0 = off).
    pub max_grad_norm: f64,
    /// Keep the convolutional feature encoder frozen (the usual Wav2Vec2 recipe).
    pub freeze_feature_encoder: bool,
    /// Freeze the whole encoder and train only the head (SUPERB protocol).
    pub freeze_encoder: bool,
    /// LayerDrop probability (None: the checkpoint's `layerdrop`).
    pub layerdrop: Option<f64>,
    /// Dropout overrides (None: the checkpoint's).
    pub hidden_dropout: Option<f64>,
    /// SpecAugment with the checkpoint's `mask_*` settings.
    pub spec_augment: bool,
    pub mask_time_prob: Option<f64>,
    /// Label smoothing for classification.
    pub label_smoothing: f64,
    /// Sample training clips with probability inversely proportional to their class size.
    pub class_balanced: bool,
    /// Random crop length in seconds for classification (0 = whole clips).
    pub crop_s: f64,
    /// Drop clips longer than this (seconds).
    pub max_duration_s: f64,
    /// Keep the frozen feature encoder's outputs across epochs, up to this many MiB (0 = off;
    /// `train::feature_cache`).
    #[serde(default = "default_feature_cache_mib")]
    pub feature_cache_mib: usize,
    /// Drop clips shorter than this (seconds).
    pub min_duration_s: f64,
    /// Drop bad clips (with a count) instead of refusing to start.
    pub skip_bad: bool,
    /// Characters removed from transcripts before building the vocabulary.
    pub chars_to_ignore: String,
    /// The transcripts' letter case (ASR): `auto` folds them to the model vocabulary's case.
    #[serde(default)]
    pub text_case: crate::data::TextCase,
    /// Keyword set for `kws` (SUPERB's ten words by default).
    pub words: Vec<String>,
    /// Waveform augmentation.
    pub augment: AugmentConfig,
    /// Evaluate on the dev set every N optimizer steps (0 = once per epoch).
    pub eval_every: usize,
    /// Stop after this many evaluations without improvement (0 = never).
    pub patience: usize,
    /// Stop after this many non-finite steps in a row.
    pub max_nonfinite: usize,
    /// CTC reduction: mean or sum.
    pub ctc_reduction: String,
    pub ctc_zero_infinity: bool,
    pub seed: u64,
    /// cpu, cuda, cuda:N, auto.
    pub device: String,
    /// Log training loss every N steps.
    pub log_every: usize,
    /// No progress bar.
    pub quiet: bool,
    /// Stop (as if killed) after this many optimizer steps; for resume tests.
    pub stop_after: Option<usize>,
}

/// `--feature-cache-mib`'s default: 2 GiB.
fn default_feature_cache_mib() -> usize {
    2048
}

impl TrainConfig {
    /// Defaults for a task (the values `klspeech train --help` shows).
    pub fn new(task: Task, model: PathBuf, data: PathBuf, out: PathBuf) -> Self {
        TrainConfig {
            task,
            model,
            from_scratch: false,
            data,
            dev: None,
            out,
            norm: "kl".into(),
            kl_sites: "encoder".into(),
            kl_beta: 1e-2,
            kl_warmup_steps: 100,
            kl_prior: "standard".into(),
            kl_sigma0: 1e-2,
            steps: None,
            epochs: 10,
            batch_size: 8,
            grad_accum: 1,
            lr: 1e-4,
            weight_decay: 0.01,
            warmup_ratio: 0.1,
            schedule: "linear".into(),
            max_grad_norm: 1.0,
            freeze_feature_encoder: true,
            freeze_encoder: false,
            layerdrop: None,
            hidden_dropout: None,
            vib: false,
            spec_augment: true,
            mask_time_prob: None,
            label_smoothing: 0.0,
            class_balanced: false,
            crop_s: 0.0,
            max_duration_s: 20.0,
            feature_cache_mib: default_feature_cache_mib(),
            min_duration_s: 0.0,
            skip_bad: false,
            chars_to_ignore: ",?.!-;:\"“%‘”�".into(),
            text_case: crate::data::TextCase::Auto,
            words: "yes no up down left right on off stop go".split(' ').map(String::from).collect(),
            augment: AugmentConfig::default(),
            eval_every: 0,
            patience: 0,
            max_nonfinite: 5,
            ctc_reduction: "mean".into(),
            ctc_zero_infinity: true,
            seed: 0,
            device: "cpu".into(),
            log_every: 10,
            quiet: false,
            stop_after: None,
        }
    }
}
