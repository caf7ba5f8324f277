//! `config.json` of a Hugging Face Wav2Vec2 checkpoint.
//!
//! Field names are the Hugging Face keys. Every key that changes the forward pass is read and
//! honoured; keys klspeech does not know are kept in `extra` and written back on save, so a
//! config survives a round trip through klspeech unchanged.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

fn d_true() -> bool {
    true
}
fn d_hidden() -> usize {
    768
}
fn d_layers() -> usize {
    12
}
fn d_heads() -> usize {
    12
}
fn d_inter() -> usize {
    3072
}
fn d_gelu() -> String {
    "gelu".into()
}
fn d_group() -> String {
    "group".into()
}
fn d_eps() -> f64 {
    1e-5
}
fn d_conv_dim() -> Vec<usize> {
    vec![512; 7]
}
fn d_conv_kernel() -> Vec<usize> {
    vec![10, 3, 3, 3, 3, 2, 2]
}
fn d_conv_stride() -> Vec<usize> {
    vec![5, 2, 2, 2, 2, 2, 2]
}
fn d_pos_k() -> usize {
    128
}
fn d_pos_g() -> usize {
    16
}
fn d_drop() -> f64 {
    0.1
}
fn d_mask_time_prob() -> f64 {
    0.05
}
fn d_mask_len() -> usize {
    10
}
fn d_min_masks() -> usize {
    2
}
fn d_proj() -> usize {
    256
}
fn d_vocab() -> usize {
    32
}
fn d_mean() -> String {
    "sum".into()
}

/// Wav2Vec2 configuration (the keys of Hugging Face's `Wav2Vec2Config`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Wav2Vec2Config {
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_inter")]
    pub intermediate_size: usize,
    #[serde(default = "d_gelu")]
    pub hidden_act: String,
    #[serde(default = "d_drop")]
    pub hidden_dropout: f64,
    #[serde(default = "d_drop")]
    pub activation_dropout: f64,
    #[serde(default = "d_drop")]
    pub attention_dropout: f64,
    #[serde(default = "d_drop")]
    pub feat_proj_dropout: f64,
    #[serde(default)]
    pub feat_quantizer_dropout: f64,
    #[serde(default = "d_drop")]
    pub final_dropout: f64,
    #[serde(default = "d_drop")]
    pub layerdrop: f64,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "d_group")]
    pub feat_extract_norm: String,
    #[serde(default = "d_gelu")]
    pub feat_extract_activation: String,
    #[serde(default = "d_conv_dim")]
    pub conv_dim: Vec<usize>,
    #[serde(default = "d_conv_stride")]
    pub conv_stride: Vec<usize>,
    #[serde(default = "d_conv_kernel")]
    pub conv_kernel: Vec<usize>,
    #[serde(default)]
    pub conv_bias: bool,
    #[serde(default = "d_pos_k")]
    pub num_conv_pos_embeddings: usize,
    #[serde(default = "d_pos_g")]
    pub num_conv_pos_embedding_groups: usize,
    #[serde(default)]
    pub do_stable_layer_norm: bool,
    #[serde(default = "d_true")]
    pub apply_spec_augment: bool,
    #[serde(default = "d_mask_time_prob")]
    pub mask_time_prob: f64,
    #[serde(default = "d_mask_len")]
    pub mask_time_length: usize,
    #[serde(default = "d_min_masks")]
    pub mask_time_min_masks: usize,
    #[serde(default)]
    pub mask_feature_prob: f64,
    #[serde(default = "d_mask_len")]
    pub mask_feature_length: usize,
    #[serde(default)]
    pub mask_feature_min_masks: usize,
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default)]
    pub pad_token_id: Option<i64>,
    #[serde(default)]
    pub use_weighted_layer_sum: bool,
    #[serde(default = "d_proj")]
    pub classifier_proj_size: usize,
    #[serde(default)]
    pub id2label: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub label2id: Option<BTreeMap<String, i64>>,
    #[serde(default)]
    pub num_labels: Option<usize>,
    #[serde(default = "d_mean")]
    pub ctc_loss_reduction: String,
    #[serde(default)]
    pub ctc_zero_infinity: bool,
    #[serde(default)]
    pub add_adapter: bool,
    #[serde(default)]
    pub output_hidden_size: Option<usize>,
    #[serde(default)]
    pub model_type: Option<String>,
    /// Every other key, kept verbatim.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Activations Hugging Face names in `hidden_act` / `feat_extract_activation` that klspeech runs.
pub const SUPPORTED_ACTIVATIONS: &[&str] = &["gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish", "tanh"];

impl Default for Wav2Vec2Config {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every field has a default")
    }
}

impl Wav2Vec2Config {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Open { path: path.into(), source })?;
        let cfg: Wav2Vec2Config =
            serde_json::from_str(&text).map_err(|e| Error::config(path, format!("invalid Wav2Vec2 config: {e}")))?;
        cfg.validate().map_err(|detail| Error::config(path, detail))?;
        Ok(cfg)
    }

    /// Checks that the configuration is one klspeech computes exactly; the message says what to fix.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if let Some(mt) = &self.model_type {
            if mt != "wav2vec2" {
                return Err(format!(
                    "model_type is \"{mt}\"; klspeech runs Wav2Vec2 checkpoints (model_type \"wav2vec2\") only"
                ));
            }
        }
        if self.add_adapter {
            return Err("add_adapter = true: the Wav2Vec2 adapter layers are not supported by klspeech; use a checkpoint without an adapter".into());
        }
        for (k, v) in [("hidden_act", &self.hidden_act), ("feat_extract_activation", &self.feat_extract_activation)] {
            if !SUPPORTED_ACTIVATIONS.contains(&v.as_str()) {
                return Err(format!("{k} = \"{v}\" is not supported (supported: {})", SUPPORTED_ACTIVATIONS.join(", ")));
            }
        }
        if self.feat_extract_norm != "group" && self.feat_extract_norm != "layer" {
            return Err(format!("feat_extract_norm = \"{}\": expected \"group\" or \"layer\"", self.feat_extract_norm));
        }
        let n = self.conv_dim.len();
        if n == 0 || self.conv_kernel.len() != n || self.conv_stride.len() != n {
            return Err(format!(
                "conv_dim, conv_kernel and conv_stride must have the same non-zero length (found {}, {}, {})",
                n,
                self.conv_kernel.len(),
                self.conv_stride.len()
            ));
        }
        if self.conv_kernel.iter().chain(&self.conv_stride).chain(&self.conv_dim).any(|&v| v == 0) {
            return Err("conv_dim, conv_kernel and conv_stride must be positive".into());
        }
        if self.hidden_size == 0 || self.num_attention_heads == 0 || !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "hidden_size ({}) must be a positive multiple of num_attention_heads ({})",
                self.hidden_size, self.num_attention_heads
            ));
        }
        let g = self.num_conv_pos_embedding_groups;
        if g == 0 || !self.hidden_size.is_multiple_of(g) || self.num_conv_pos_embeddings == 0 {
            return Err(format!(
                "hidden_size ({}) must be a multiple of num_conv_pos_embedding_groups ({g}), and num_conv_pos_embeddings positive",
                self.hidden_size
            ));
        }
        if let Some(o) = self.output_hidden_size {
            if o != self.hidden_size {
                return Err(format!("output_hidden_size ({o}) differs from hidden_size: only used with adapters, which are unsupported"));
            }
        }
        if let (Some(ids), Some(n)) = (&self.id2label, self.num_labels) {
            if ids.len() != n {
                return Err(format!("num_labels = {n} but id2label has {} entries", ids.len()));
            }
        }
        Ok(())
    }

    /// Number of classification labels (`id2label` size, else `num_labels`, else 2 as transformers).
    pub fn num_labels(&self) -> usize {
        self.id2label.as_ref().map(|m| m.len()).or(self.num_labels).unwrap_or(2)
    }

    /// Label names in id order (`LABEL_i` where `id2label` lacks one, as transformers names them).
    pub fn labels(&self) -> Vec<String> {
        (0..self.num_labels())
            .map(|i| {
                self.id2label
                    .as_ref()
                    .and_then(|m| m.get(&i.to_string()).cloned())
                    .unwrap_or_else(|| format!("LABEL_{i}"))
            })
            .collect()
    }

    /// Sets the classification labels (`id2label`, `label2id`, `num_labels`) in id order.
    pub fn set_labels(&mut self, labels: &[String]) {
        self.id2label = Some(labels.iter().enumerate().map(|(i, l)| (i.to_string(), l.clone())).collect());
        self.label2id = Some(labels.iter().enumerate().map(|(i, l)| (l.clone(), i as i64)).collect());
        self.num_labels = Some(labels.len());
    }

    /// Sets `vocab_size` and `pad_token_id` (the CTC blank) from a `vocab.json` map.
    pub fn set_vocab(&mut self, vocab: &BTreeMap<String, i64>) {
        self.vocab_size = vocab.len();
        self.pad_token_id = vocab.iter().find(|(t, _)| t.as_str() == "[PAD]" || t.as_str() == "<pad>").map(|(_, &id)| id);
    }

    /// Samples in the receptive field of one output frame.
    pub fn receptive_field(&self) -> usize {
        self.conv_kernel.iter().zip(&self.conv_stride).rev().fold(1usize, |acc, (&k, &s)| (acc - 1) * s + k)
    }

    /// Channels out of the feature encoder.
    pub fn conv_out_dim(&self) -> usize {
        *self.conv_dim.last().unwrap_or(&512)
    }

    /// Frames produced for `n` samples: `floor((L - k) / s) + 1` per conv layer (0 if too short).
    pub fn frames_for_samples(&self, n: usize) -> usize {
        let mut l = n;
        for (&k, &s) in self.conv_kernel.iter().zip(&self.conv_stride) {
            if l < k {
                return 0;
            }
            l = (l - k) / s + 1;
        }
        l
    }

    /// The head an `architectures` entry asks for.
    pub fn architecture(&self) -> Option<&str> {
        self.architectures.as_ref().and_then(|a| a.first()).map(|s| s.as_str())
    }
}
