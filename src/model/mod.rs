//! Wav2Vec2 on candle, with KL-Norm and the two fine-tuning heads.
//!
//! ```no_run
//! use klspeech::model::{LoadOptions, SpeechModel};
//! let model = SpeechModel::load("models/klspeech-tiny".as_ref(), &LoadOptions::default())?;
//! println!("{} parameters", model.num_parameters());
//! # Ok::<(), klspeech::Error>(())
//! ```

pub mod config;
pub mod heads;
pub mod layers;
pub mod norm;
pub mod params;
pub mod wav2vec2;

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

pub use config::Wav2Vec2Config;
pub use heads::{ClassificationHead, CtcHead, Vib};
pub use norm::{KlPrior, KlSettings, Norm, NormAxis};
pub use params::{ParamStore, Vb};
pub use wav2vec2::{EncoderOutput, Wav2Vec2Model};


use crate::error::{Error, Result};
use crate::features::FeatureExtractor;
use crate::rng::Rng;

/// Where KL-Norm replaces the normalization layers (`../shared/KLNORM.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[derive(Default)]
pub enum KlSites {
    /// Plain LayerNorm/GroupNorm everywhere (the baseline).
    None,
    /// Every transformer LayerNorm, the encoder's LayerNorm and `feature_projection.layer_norm`.
    #[default]
    Encoder,
    /// `Encoder` plus the feature encoder's GroupNorm/LayerNorm sites.
    All,
    /// The norms of the last K transformer layers plus the encoder's LayerNorm.
    Last(usize),
}


impl FromStr for KlSites {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(KlSites::None),
            "encoder" => Ok(KlSites::Encoder),
            "all" => Ok(KlSites::All),
            _ => match s.strip_prefix("last:").map(|k| k.parse::<usize>()) {
                Some(Ok(k)) if k > 0 => Ok(KlSites::Last(k)),
                _ => Err(Error::InvalidInput(format!("KL-Norm sites `{s}`: expected none, encoder, all or last:K (K >= 1)"))),
            },
        }
    }
}

impl std::fmt::Display for KlSites {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KlSites::None => write!(f, "none"),
            KlSites::Encoder => write!(f, "encoder"),
            KlSites::All => write!(f, "all"),
            KlSites::Last(k) => write!(f, "last:{k}"),
        }
    }
}

impl KlSites {
    /// Whether a site is KL-Norm: `layer` = Some(i) for the two norms of transformer layer i,
    /// `None` for the encoder's and the projection's norms; `in_conv` for feature-encoder norms.
    pub fn applies(&self, layer: Option<usize>, in_conv: bool, n_layers: usize) -> bool {
        match self {
            KlSites::None => false,
            KlSites::Encoder => !in_conv,
            KlSites::All => true,
            KlSites::Last(k) => !in_conv && layer.is_none_or(|i| i + k >= n_layers),
        }
    }

    /// Whether `feature_projection.layer_norm` is a site.
    pub fn includes_projection(&self) -> bool {
        matches!(self, KlSites::Encoder | KlSites::All)
    }
}

/// Per-call state of a forward pass: train/eval, randomness, padding mode, collected KL terms.
pub struct ForwardCtx {
    /// Training mode: dropout, layerdrop and KL-Norm sampling are active.
    pub train: bool,
    /// Whether gradients will be taken. Without, convolutions record nothing for a backward
    /// pass (off the CPU that selects candle's conv1d kernel, whose backward is wrong) and
    /// LayerNorm / softmax may use candle's gradient-less fused kernels.
    pub grad: bool,
    /// Padding-aware mode (beyond transformers): GroupNorm statistics ignore padded frames, so
    /// a clip's output does not depend on the batch it is in.
    pub padding_aware: bool,
    /// The seeded generator every random draw comes from.
    pub rng: Rng,
    /// KL of each KL-Norm site visited in this pass (site name, scalar).
    pub kl_terms: Vec<(String, Tensor)>,
    pub hidden_dropout: f64,
    pub activation_dropout: f64,
    pub attention_dropout: f64,
    pub feat_proj_dropout: f64,
    pub layerdrop: f64,
    /// SpecAugment-style masking of the projected features (training only).
    pub spec_augment: Option<SpecAugment>,
}

/// SpecAugment as Wav2Vec2 fine-tuning does it (`_compute_mask_indices`): spans of frames are
/// replaced by the learned `masked_spec_embed`, spans of channels are zeroed.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SpecAugment {
    pub mask_time_prob: f64,
    pub mask_time_length: usize,
    pub mask_time_min_masks: usize,
    pub mask_feature_prob: f64,
    pub mask_feature_length: usize,
    pub mask_feature_min_masks: usize,
}

impl SpecAugment {
    /// The checkpoint's `mask_*` settings, or `None` when `apply_spec_augment` is off.
    pub fn from_config(cfg: &Wav2Vec2Config) -> Option<Self> {
        cfg.apply_spec_augment.then_some(SpecAugment {
            mask_time_prob: cfg.mask_time_prob,
            mask_time_length: cfg.mask_time_length,
            mask_time_min_masks: cfg.mask_time_min_masks,
            mask_feature_prob: cfg.mask_feature_prob,
            mask_feature_length: cfg.mask_feature_length,
            mask_feature_min_masks: cfg.mask_feature_min_masks,
        })
    }

    /// Span starts over `len` positions: `floor(prob * len / span + u)` spans (u uniform, as
    /// transformers' epsilon), at least `min_masks`, at most what fits; distinct starts.
    pub fn spans(rng: &mut Rng, len: usize, prob: f64, span: usize, min_masks: usize) -> Vec<bool> {
        let mut mask = vec![false; len];
        if prob <= 0.0 || span == 0 || len < span {
            return mask;
        }
        let n = ((prob * len as f64 / span as f64 + rng.uniform()) as usize).max(min_masks).min(len / span);
        let mut starts: Vec<usize> = (0..=len - span).collect();
        rng.shuffle(&mut starts);
        for &s in starts.iter().take(n) {
            mask[s..s + span].fill(true);
        }
        mask
    }
}

impl ForwardCtx {
    /// Evaluation: deterministic, no dropout, KL-Norm returns its mean.
    pub fn eval() -> Self {
        ForwardCtx {
            train: false,
            grad: false,
            padding_aware: false,
            rng: Rng::new(0),
            kl_terms: Vec::new(),
            hidden_dropout: 0.0,
            activation_dropout: 0.0,
            attention_dropout: 0.0,
            feat_proj_dropout: 0.0,
            layerdrop: 0.0,
            spec_augment: None,
        }
    }

    /// Training with the config's dropout and layerdrop rates.
    pub fn train(cfg: &Wav2Vec2Config, rng: Rng) -> Self {
        ForwardCtx {
            train: true,
            grad: true,
            padding_aware: true,
            rng,
            kl_terms: Vec::new(),
            hidden_dropout: cfg.hidden_dropout,
            activation_dropout: cfg.activation_dropout,
            attention_dropout: cfg.attention_dropout,
            feat_proj_dropout: cfg.feat_proj_dropout,
            layerdrop: cfg.layerdrop,
            spec_augment: SpecAugment::from_config(cfg),
        }
    }

    /// Training without dropout or layerdrop (KL-Norm sampling only): for tests and ablations.
    pub fn train_no_dropout(rng: Rng) -> Self {
        ForwardCtx { train: true, grad: true, padding_aware: true, rng, ..ForwardCtx::eval() }
    }

    /// Evaluation-mode forward that still builds a differentiable graph (for gradient checks
    /// and frozen-statistics training).
    pub fn eval_with_grad() -> Self {
        ForwardCtx { grad: true, ..ForwardCtx::eval() }
    }

    /// Sets the padding-aware mode.
    pub fn with_padding_aware(mut self, on: bool) -> Self {
        self.padding_aware = on;
        self
    }

    /// Standard normal noise shaped like `x`, from the seeded generator.
    pub fn normal_like(&mut self, x: &Tensor) -> Result<Tensor> {
        if crate::ops::kernels::apply_any_float(x) {
            // On a GPU: the same values, drawn there in f32 (no host draw and copy per site),
            // bf16 / f16 rounded there from them as the host path rounds its f32 draw.
            let n = crate::ops::kernels::keyed_normal_like(x, self.rng.next_u64())?;
            return Ok(if x.dtype() == DType::F32 { n } else { n.to_dtype(x.dtype())? });
        }
        let v = self.rng.normal_vec(x.elem_count());
        Ok(Tensor::from_vec(v, x.shape(), &Device::Cpu)?.to_dtype(x.dtype())?.to_device(x.device())?)
    }

    /// Inverted dropout with rate `p` (identity in evaluation or for p = 0).
    pub fn dropout(&mut self, x: &Tensor, p: f64) -> Result<Tensor> {
        match self.dropout_key(p) {
            // One draw keys the mask (crate::ops::dropout): parallel, nothing stored for backward.
            Some((p, key)) => crate::ops::dropout(x, p, key),
            None => Ok(x.clone()),
        }
    }

    /// (p, key) of a dropout with rate `p` in this pass (one draw of the pass's stream, as
    /// [`Self::dropout`] makes), or `None` when nothing is dropped (evaluation, p = 0).
    pub fn dropout_key(&mut self, p: f64) -> Option<(f64, u64)> {
        if !self.train || p <= 0.0 {
            return None;
        }
        Some((p, self.rng.next_u64()))
    }

    /// LayerDrop: whether transformer layer `i` is skipped in this training pass.
    pub fn skip_layer(&mut self, _i: usize) -> bool {
        self.train && self.layerdrop > 0.0 && self.rng.uniform() < self.layerdrop
    }

    /// Sum of the KL terms collected so far (`None` without KL-Norm sites or in evaluation).
    pub fn kl_total(&self) -> Result<Option<Tensor>> {
        let mut acc: Option<Tensor> = None;
        for (_, t) in &self.kl_terms {
            acc = Some(match acc {
                None => t.clone(),
                Some(a) => (a + t)?,
            });
        }
        Ok(acc)
    }
}

/// The task head on top of the encoder.
pub enum Head {
    /// No head (`Wav2Vec2Model`, `Wav2Vec2ForPreTraining`): embeddings only.
    None,
    /// `Wav2Vec2ForCTC`.
    Ctc(CtcHead),
    /// `Wav2Vec2ForSequenceClassification`.
    Classification(ClassificationHead),
}

/// Which head to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadKind {
    None,
    Ctc,
    Classification,
}

impl HeadKind {
    /// The head a config's `architectures` names.
    pub fn from_config(cfg: &Wav2Vec2Config) -> HeadKind {
        match cfg.architecture() {
            Some(a) if a.ends_with("ForCTC") => HeadKind::Ctc,
            Some(a) if a.ends_with("ForSequenceClassification") => HeadKind::Classification,
            _ => HeadKind::None,
        }
    }

    /// The transformers class name for this head.
    pub fn architecture(&self) -> &'static str {
        match self {
            HeadKind::None => "Wav2Vec2Model",
            HeadKind::Ctc => "Wav2Vec2ForCTC",
            HeadKind::Classification => "Wav2Vec2ForSequenceClassification",
        }
    }
}

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Parameter dtype (F32 by default; F64 for gradient checks).
    pub dtype: DType,
    /// Device.
    pub device: Device,
    /// KL-Norm sites (`None` = plain normalization).
    pub kl_sites: KlSites,
    /// KL-Norm initialization and prior.
    pub kl: KlSettings,
    /// Head to build instead of the config's `architectures`.
    pub head: Option<HeadKind>,
    /// Seed for every parameter the checkpoint lacks.
    pub seed: u64,
    /// VIB on the pooled representation of a classification head, with this initial noise
    /// scale (`None` = off; see [`heads::Vib`]).
    pub vib_sigma0: Option<f64>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            dtype: DType::F32,
            device: Device::Cpu,
            kl_sites: KlSites::None,
            kl: KlSettings::default(),
            head: None,
            seed: 0,
            vib_sigma0: None,
        }
    }
}

/// Everything one forward pass computes.
pub struct ModelOutput {
    /// The encoder's outputs.
    pub encoder: EncoderOutput,
    /// [B, T, vocab] for CTC, [B, labels] for classification.
    pub logits: Option<Tensor>,
}

/// A Wav2Vec2 encoder with its head, parameters and preprocessing.
pub struct SpeechModel {
    pub config: Wav2Vec2Config,
    pub encoder: Wav2Vec2Model,
    pub head: Head,
    pub head_kind: HeadKind,
    pub store: Arc<ParamStore>,
    pub feature_extractor: FeatureExtractor,
    /// `vocab.json` (token -> id) for CTC models.
    pub vocab: Option<BTreeMap<String, i64>>,
    pub kl_sites: KlSites,
}

impl SpeechModel {
    /// Loads a model folder in the Hugging Face layout: `config.json`, `model.safetensors`,
    /// `preprocessor_config.json` (optional), `vocab.json` (optional).
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        if !dir.is_dir() {
            let what = if dir.exists() { "a file, not a model folder" } else { "no such folder" };
            return Err(Error::config(dir, format!("{what}: a model is a folder in the Hugging Face layout (config.json, model.safetensors, optional preprocessor_config.json and vocab.json)")));
        }
        let config = Wav2Vec2Config::from_file(&dir.join("config.json"))?;
        let store = ParamStore::from_safetensors(&dir.join("model.safetensors"), opts.dtype, &opts.device, opts.seed)?;
        let feature_extractor = FeatureExtractor::from_model_dir(dir)?;
        let vocab = read_vocab(&dir.join("vocab.json"))?;
        let m = Self::build(config, store, feature_extractor, vocab, opts)?;
        // Anything left over from a known head means the head kind was overridden; anything
        // else is a tensor this implementation would silently ignore: refuse it.
        let unused: Vec<String> = m
            .store
            .unused_checkpoint_keys()
            .into_iter()
            .filter(|k| !params::HEAD_KEYS.iter().any(|h| k.starts_with(h)) && !k.starts_with("masked_spec_embed"))
            // KL-Norm vectors of a model fine-tuned with KL-Norm: loaded with plain norms it
            // computes exactly the evaluation-mode function, so they are simply not needed.
            .filter(|k| !k.rsplit('.').next().is_some_and(|n| n.starts_with("kl_")))
            .collect();
        if let Some(k) = unused.first() {
            return Err(Error::Unsupported {
                what: format!("{}: tensor `{k}`", dir.join("model.safetensors").display()),
                detail: format!("{} checkpoint tensor(s) are not part of the Wav2Vec2 architecture klspeech runs (adapter or another model?)", unused.len()),
            });
        }
        Ok(m)
    }

    /// Loads a checkpoint to fine-tune it with `head`: the config gets the head's
    /// `architectures`, the labels (`id2label`, `label2id`) or the CTC vocabulary size and pad
    /// id; head tensors whose shape no longer fits are dropped and re-initialized (as
    /// transformers' `ignore_mismatched_sizes`), and returned so the caller can report them.
    pub fn load_for_finetuning(
        dir: &Path,
        opts: &LoadOptions,
        head: HeadKind,
        labels: Option<&[String]>,
        vocab: Option<&BTreeMap<String, i64>>,
    ) -> Result<(Self, Vec<String>)> {
        let mut config = Wav2Vec2Config::from_file(&dir.join("config.json"))?;
        config.architectures = Some(vec![head.architecture().to_string()]);
        if let Some(labels) = labels {
            config.set_labels(labels);
        }
        if let Some(v) = vocab {
            config.set_vocab(v);
        }
        config.validate().map_err(|d| Error::config(dir.join("config.json"), d))?;
        let store = ParamStore::from_safetensors(&dir.join("model.safetensors"), opts.dtype, &opts.device, opts.seed)?;
        // Expected head shapes for the new config.
        let h = config.hidden_size;
        let expect: Vec<(&str, Vec<usize>)> = match head {
            HeadKind::Ctc => vec![("lm_head.weight", vec![config.vocab_size, h]), ("lm_head.bias", vec![config.vocab_size])],
            HeadKind::Classification => vec![
                ("projector.weight", vec![config.classifier_proj_size, h]),
                ("projector.bias", vec![config.classifier_proj_size]),
                ("classifier.weight", vec![config.num_labels(), config.classifier_proj_size]),
                ("classifier.bias", vec![config.num_labels()]),
                ("layer_weights", vec![config.num_hidden_layers + 1]),
            ],
            HeadKind::None => vec![],
        };
        let mismatched: Vec<String> =
            expect.iter().filter(|(k, shape)| store.checkpoint_dims(k).is_some_and(|d| &d != shape)).map(|(k, _)| k.to_string()).collect();
        let mut dropped = store.drop_checkpoint_keys(|k| mismatched.iter().any(|m| m == k));
        // A head of the other kind is not used: drop it so it is not saved again.
        let other: &[&str] = match head {
            HeadKind::Ctc => &["projector.", "classifier.", "layer_weights"],
            HeadKind::Classification => &["lm_head."],
            HeadKind::None => &[],
        };
        dropped.extend(store.drop_checkpoint_keys(|k| other.iter().any(|o| k.starts_with(o))));
        let fe = FeatureExtractor::from_model_dir(dir)?;
        let m = Self::build(config, store, fe, vocab.cloned(), &LoadOptions { head: Some(head), ..opts.clone() })?;
        Ok((m, dropped))
    }

    /// Writes the model in the Hugging Face layout: `config.json`, `model.safetensors` (with
    /// KL-Norm vectors as extra keys transformers ignores), `preprocessor_config.json` and, for
    /// CTC, `vocab.json`. Each file is written to a temporary name and renamed.
    pub fn save_pretrained(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, "cannot create the model folder", e))?;
        let mut config = self.config.clone();
        config.architectures = Some(vec![self.head_kind.architecture().to_string()]);
        config.model_type = Some("wav2vec2".into());
        let mut cv = serde_json::to_value(&config).map_err(|e| Error::InvalidInput(e.to_string()))?;
        if let serde_json::Value::Object(m) = &mut cv {
            // transformers derives num_labels from id2label and rejects explicit nulls.
            m.retain(|_, v| !v.is_null());
        }
        write_json_atomic(&dir.join("config.json"), &cv)?;
        self.store.save_safetensors(&dir.join("model.safetensors"), self.head_kind != HeadKind::None)?;
        let fe = serde_json::to_value(&self.feature_extractor.config).map_err(|e| Error::InvalidInput(e.to_string()))?;
        write_json_atomic(&dir.join("preprocessor_config.json"), &fe)?;
        if let Some(v) = &self.vocab {
            write_json_atomic(&dir.join("vocab.json"), &serde_json::to_value(v).map_err(|e| Error::InvalidInput(e.to_string()))?)?;
        }
        Ok(())
    }

    /// A freshly initialized model for `config` (no checkpoint).
    pub fn fresh(config: Wav2Vec2Config, opts: &LoadOptions) -> Result<Self> {
        config.validate().map_err(|d| Error::Unsupported { what: "this config".into(), detail: d })?;
        let store = ParamStore::fresh(opts.dtype, &opts.device, opts.seed);
        Self::build(config, store, FeatureExtractor::default(), None, opts)
    }

    fn build(
        config: Wav2Vec2Config,
        store: Arc<ParamStore>,
        feature_extractor: FeatureExtractor,
        vocab: Option<BTreeMap<String, i64>>,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let vb = store.root();
        let encoder = Wav2Vec2Model::load(&config, &vb, &opts.kl_sites, opts.kl)?;
        let head_kind = opts.head.unwrap_or_else(|| HeadKind::from_config(&config));
        let head = match head_kind {
            HeadKind::None => Head::None,
            HeadKind::Ctc => Head::Ctc(CtcHead::load(&config, &vb)?),
            HeadKind::Classification => Head::Classification(ClassificationHead::load(&config, &vb, opts.vib_sigma0)?),
        };
        Ok(SpeechModel { config, encoder, head, head_kind, store, feature_extractor, vocab, kl_sites: opts.kl_sites })
    }

    /// input_values [B, L] with optional per-clip sample counts -> encoder outputs and logits.
    pub fn forward(&self, input_values: &Tensor, lengths: Option<&[usize]>, ctx: &mut ForwardCtx) -> Result<ModelOutput> {
        let feats = self.encoder.extract(input_values, lengths, ctx)?; // [B, T, C]
        self.forward_features(&feats, lengths, ctx)
    }

    /// [`Self::forward`] from the feature encoder's output [B, T, C] (`lengths`: the clips'
    /// sample counts, as for `forward`).
    pub fn forward_features(&self, feats: &Tensor, lengths: Option<&[usize]>, ctx: &mut ForwardCtx) -> Result<ModelOutput> {
        let encoder = self.encoder.forward_features(feats, lengths, ctx)?;
        let logits = match &self.head {
            Head::None => None,
            Head::Ctc(h) => Some(h.forward(&encoder, self.config.final_dropout, ctx)?),
            Head::Classification(h) => Some(h.forward(&encoder, ctx)?),
        };
        Ok(ModelOutput { encoder, logits })
    }

    /// Number of scalar parameters.
    pub fn num_parameters(&self) -> usize {
        self.store.count(|_| true)
    }

    /// Number of KL-Norm parameters (the `kl_*` vectors).
    pub fn num_kl_parameters(&self) -> usize {
        self.store.count(|k| k.rsplit('.').next().is_some_and(|n| n.starts_with("kl_")))
    }
}

/// Writes pretty JSON to `path` through a temporary file and a rename.
pub fn write_json_atomic(path: &Path, v: &serde_json::Value) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_string_pretty(v).map_err(|e| Error::InvalidInput(e.to_string()))? + "\n";
    std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, "cannot write", e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, "cannot move into place", e))
}

/// Reads `vocab.json` (token -> id) if present.
pub fn read_vocab(path: &Path) -> Result<Option<BTreeMap<String, i64>>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|source| Error::Open { path: path.into(), source })?;
    let v: BTreeMap<String, i64> =
        serde_json::from_str(&text).map_err(|e| Error::config(path, format!("invalid vocab.json (expected {{\"token\": id, ...}}): {e}")))?;
    Ok(Some(v))
}
