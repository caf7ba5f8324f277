//! Hugging Face `Wav2Vec2FeatureExtractor`, read from a model's `preprocessor_config.json`.
//!
//! Mirrors `transformers.Wav2Vec2FeatureExtractor.__call__` with `padding="longest"`:
//! each clip is normalized to zero mean and unit variance over its own samples
//! (`(x - mean) / sqrt(var + 1e-7)`), clips are right-padded with `padding_value` to the longest,
//! and the attention mask marks real samples.

use std::path::Path;

use candle_core::{Device, Tensor};
use serde::Deserialize;

use crate::error::{Error, Result};

/// The fields of `preprocessor_config.json` that change the output.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
pub struct FeatureExtractorConfig {
    /// Zero-mean unit-variance normalization per clip.
    #[serde(default = "default_true")]
    pub do_normalize: bool,
    /// Rate the model was trained at; audio is resampled to it.
    #[serde(default = "default_rate")]
    pub sampling_rate: u32,
    /// Value written into padded positions.
    #[serde(default)]
    pub padding_value: f32,
    /// Whether the model expects an attention mask (false for wav2vec2-base: it was trained
    /// without one, and Hugging Face then pads with zeros and passes no mask).
    #[serde(default)]
    pub return_attention_mask: bool,
    /// Always 1 for raw-waveform models.
    #[serde(default = "default_one")]
    pub feature_size: usize,
    /// Every other key (`feature_extractor_type`, `processor_class`, ...), kept verbatim.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn default_true() -> bool {
    true
}
fn default_rate() -> u32 {
    16_000
}
fn default_one() -> usize {
    1
}

impl Default for FeatureExtractorConfig {
    fn default() -> Self {
        FeatureExtractorConfig {
            do_normalize: true,
            sampling_rate: 16_000,
            padding_value: 0.0,
            return_attention_mask: false,
            feature_size: 1,
            extra: serde_json::Map::from_iter([(
                "feature_extractor_type".to_string(),
                serde_json::Value::from("Wav2Vec2FeatureExtractor"),
            )]),
        }
    }
}

impl FeatureExtractorConfig {
    /// Reads `preprocessor_config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Open { path: path.into(), source })?;
        let cfg: FeatureExtractorConfig = serde_json::from_str(&text)
            .map_err(|e| Error::config(path, format!("invalid preprocessor config: {e}")))?;
        if cfg.feature_size != 1 {
            return Err(Error::config(
                path,
                format!("feature_size is {}, expected 1 (Wav2Vec2 reads the raw waveform)", cfg.feature_size),
            ));
        }
        if cfg.sampling_rate == 0 {
            return Err(Error::config(path, "sampling_rate is 0"));
        }
        Ok(cfg)
    }
}

/// A padded batch of raw waveforms ready for the model.
#[derive(Debug, Clone, PartialEq)]
pub struct WaveBatch {
    /// Row-major [batch, max_len] input values.
    pub input_values: Vec<f32>,
    /// Row-major [batch, max_len], 1 for real samples, 0 for padding (always computed; whether the
    /// model receives it is [`FeatureExtractorConfig::return_attention_mask`]'s business).
    pub attention_mask: Vec<u8>,
    /// Valid samples per clip.
    pub lengths: Vec<usize>,
    /// Longest clip = row length.
    pub max_len: usize,
}

impl WaveBatch {
    /// Number of clips.
    pub fn batch_size(&self) -> usize {
        self.lengths.len()
    }
    /// `input_values` as an f32 tensor [batch, max_len].
    pub fn input_tensor(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_slice(&self.input_values, (self.batch_size(), self.max_len), device)?)
    }
    /// The attention mask as a u8 tensor [batch, max_len].
    pub fn mask_tensor(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_slice(&self.attention_mask, (self.batch_size(), self.max_len), device)?)
    }
}

/// Zero-mean unit-variance normalization of one clip, as Hugging Face computes it
/// (population variance, epsilon 1e-7 inside the square root). Statistics in f64.
pub fn normalize_clip(x: &[f32], out: &mut [f32]) {
    let n = x.len().max(1) as f64;
    let mean = x.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let var = x.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / n;
    let inv = 1.0 / (var + 1e-7).sqrt();
    for (o, &v) in out.iter_mut().zip(x) {
        *o = ((f64::from(v) - mean) * inv) as f32;
    }
}

/// The Wav2Vec2 feature extractor.
#[derive(Debug, Clone, Default)]
pub struct FeatureExtractor {
    /// Its configuration.
    pub config: FeatureExtractorConfig,
    /// Normalize over each clip's own samples even when transformers would include padding.
    pub padding_aware: bool,
}

impl FeatureExtractor {
    /// Builds one from a config.
    pub fn new(config: FeatureExtractorConfig) -> Self {
        FeatureExtractor { config, padding_aware: false }
    }

    /// Same extractor, with per-clip statistics whatever the config says.
    pub fn with_padding_aware(mut self, on: bool) -> Self {
        self.padding_aware = on;
        self
    }

    /// Reads `preprocessor_config.json` from a model folder (defaults if it is absent,
    /// as transformers' own defaults).
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("preprocessor_config.json");
        if path.exists() {
            Ok(Self::new(FeatureExtractorConfig::from_file(&path)?))
        } else {
            Ok(Self::default())
        }
    }

    /// Normalizes and pads `clips` (already at `config.sampling_rate`) into one batch.
    pub fn batch<S: AsRef<[f32]>>(&self, clips: &[S]) -> Result<WaveBatch> {
        if clips.is_empty() {
            return Err(Error::InvalidInput("feature extractor: empty batch".into()));
        }
        let lengths: Vec<usize> = clips.iter().map(|c| c.as_ref().len()).collect();
        let max_len = lengths.iter().copied().max().unwrap_or(0);
        if max_len == 0 {
            return Err(Error::InvalidInput("feature extractor: every clip is empty".into()));
        }
        let pad = self.config.padding_value;
        let mut input_values = vec![pad; clips.len() * max_len];
        let mut attention_mask = vec![0u8; clips.len() * max_len];
        // transformers passes no mask to its normalization when it returns none.
        let whole_row = self.config.do_normalize && !self.config.return_attention_mask && !self.padding_aware;
        for (i, clip) in clips.iter().enumerate() {
            let clip = clip.as_ref();
            let row = &mut input_values[i * max_len..(i + 1) * max_len];
            if whole_row {
                row[..clip.len()].copy_from_slice(clip);
                let padded_row = row.to_vec();
                normalize_clip(&padded_row, row);
            } else if self.config.do_normalize {
                normalize_clip(clip, &mut row[..clip.len()]);
            } else {
                row[..clip.len()].copy_from_slice(clip);
            }
            attention_mask[i * max_len..i * max_len + clip.len()].fill(1);
        }
        Ok(WaveBatch { input_values, attention_mask, lengths, max_len })
    }
}
