//! Parameters: loading Hugging Face safetensors into trainable candle `Var`s, and saving them back.
//!
//! Keys are kept in Hugging Face's naming relative to the encoder root
//! (`feature_extractor.conv_layers.0.conv.weight`, `encoder.layers.3.attention.q_proj.bias`, ...)
//! and heads at the top (`lm_head.weight`, `projector.weight`, `classifier.weight`,
//! `layer_weights`). On load the `wav2vec2.` prefix is stripped and the positional conv's weight
//! norm is read under both namings; on save the prefix is restored where transformers expects it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor, Var};

use crate::error::{Error, Result};
use crate::rng::Rng;

/// Checkpoint tensors that belong to pre-training only and are ignored.
/// Bumped whenever parameters may have changed in place wholesale (a checkpoint restored into
/// the variables); see [`parameter_version`].
static PARAMETER_EPOCH: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// In-place updates per parameter tensor (by id): the optimizer counts the ones it updates.
static UPDATES: std::sync::LazyLock<Mutex<HashMap<candle_core::TensorId, u64>>> = std::sync::LazyLock::new(|| Mutex::new(HashMap::new()));

/// Declares that any parameter's values may have changed in place (checkpoint restore).
/// Caches derived from weights (the inference layouts of [`super::layers::Linear`], the
/// attention's packed projection, the positional conv's normalized weight) compare
/// [`parameter_version`] and rebuild when it moved.
pub fn parameters_changed() {
    PARAMETER_EPOCH.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
}

/// Declares that this parameter's values changed in place (an optimizer update). Every
/// in-place write of a variable must call it, or [`parameters_changed`].
pub fn parameter_changed(t: &Tensor) {
    *UPDATES.lock().unwrap_or_else(|e| e.into_inner()).entry(t.id()).or_insert(0) += 1;
}

/// A version of these tensors' values: it changes whenever one of them was declared changed
/// ([`parameter_changed`]) or everything was ([`parameters_changed`]). A frozen parameter
/// keeps its version while others train, so caches derived from it stay valid.
pub fn parameter_version(ts: &[&Tensor]) -> (u64, u64) {
    let updates = UPDATES.lock().unwrap_or_else(|e| e.into_inner());
    // Counts only grow, so their sum moves whenever any of them does.
    let sum = ts.iter().map(|t| updates.get(&t.id()).copied().unwrap_or(0)).sum();
    (PARAMETER_EPOCH.load(std::sync::atomic::Ordering::SeqCst), sum)
}

const PRETRAINING_ONLY: &[&str] = &["quantizer.", "project_q.", "project_hid."];
/// Keys of the task heads (never prefixed with `wav2vec2.`).
pub const HEAD_KEYS: &[&str] = &["lm_head.", "projector.", "classifier.", "layer_weights"];

/// How a parameter missing from the checkpoint is initialized.
#[derive(Debug, Clone, Copy)]
pub enum Init {
    /// Every element equal.
    Const(f64),
    /// Normal(0, std).
    Normal(f64),
    /// Uniform(-bound, bound).
    Uniform(f64),
}

/// Canonical key of a checkpoint key: no `wav2vec2.` prefix, old weight-norm names.
pub fn canonical_key(key: &str) -> String {
    let k = key.strip_prefix("wav2vec2.").unwrap_or(key);
    k.replace("parametrizations.weight.original0", "weight_g")
        .replace("parametrizations.weight.original1", "weight_v")
}

struct Inner {
    vars: BTreeMap<String, Var>,
    checkpoint: HashMap<String, Tensor>,
    rng: Rng,
}

/// All parameters of a model, each a trainable [`Var`].
pub struct ParamStore {
    inner: Mutex<Inner>,
    /// The safetensors file the parameters came from (for error messages); `None` for a fresh model.
    pub source: Option<PathBuf>,
    /// Device of every parameter.
    pub device: Device,
    /// Floating point type of every parameter.
    pub dtype: DType,
}

impl ParamStore {
    /// A store with no checkpoint: every parameter is initialized from `seed`.
    pub fn fresh(dtype: DType, device: &Device, seed: u64) -> Arc<Self> {
        Arc::new(ParamStore {
            inner: Mutex::new(Inner { vars: BTreeMap::new(), checkpoint: HashMap::new(), rng: Rng::new(seed) }),
            source: None,
            device: device.clone(),
            dtype,
        })
    }

    /// Reads `model.safetensors` (f32, f16 or bf16) and converts every tensor to `dtype`.
    pub fn from_safetensors(path: &Path, dtype: DType, device: &Device, seed: u64) -> Result<Arc<Self>> {
        if !path.exists() {
            return Err(Error::Open {
                path: path.into(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file (a model folder needs model.safetensors; convert a pytorch_model.bin with `model.save_pretrained(dir, safe_serialization=True)`)"),
            });
        }
        let raw = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| Error::SafeTensors { path: path.into(), detail: e.to_string() })?;
        let mut checkpoint = HashMap::new();
        for (k, t) in raw {
            if PRETRAINING_ONLY.iter().any(|p| k.starts_with(p) || k.starts_with(&format!("wav2vec2.{p}"))) {
                continue;
            }
            if !matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16 | DType::F64) {
                continue; // integer buffers are not parameters
            }
            let t = t.to_dtype(dtype)?.to_device(device)?;
            checkpoint.insert(canonical_key(&k), t);
        }
        Ok(Arc::new(ParamStore {
            inner: Mutex::new(Inner { vars: BTreeMap::new(), checkpoint, rng: Rng::new(seed) }),
            source: Some(path.to_path_buf()),
            device: device.clone(),
            dtype,
        }))
    }

    /// The root builder.
    pub fn root(self: &Arc<Self>) -> Vb {
        Vb { store: self.clone(), prefix: String::new() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A poisoned lock only means another thread panicked mid-insert; the map is still valid.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets checkpoint tensors whose key satisfies `pred` (a head being re-initialized);
    /// returns the keys dropped.
    pub fn drop_checkpoint_keys(&self, pred: impl Fn(&str) -> bool) -> Vec<String> {
        let mut inner = self.lock();
        let mut dropped: Vec<String> = inner.checkpoint.keys().filter(|k| pred(k)).cloned().collect();
        dropped.sort();
        for k in &dropped {
            inner.checkpoint.remove(k);
        }
        dropped
    }

    /// Shape of a checkpoint tensor.
    pub fn checkpoint_dims(&self, key: &str) -> Option<Vec<usize>> {
        self.lock().checkpoint.get(key).map(|t| t.dims().to_vec())
    }

    /// Whether the checkpoint holds `key` (canonical naming).
    pub fn has_checkpoint_key(&self, key: &str) -> bool {
        self.lock().checkpoint.contains_key(key)
    }

    /// Every parameter created so far, by key, in key order.
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.lock().vars.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// Checkpoint keys no module asked for (besides ignored pre-training tensors).
    pub fn unused_checkpoint_keys(&self) -> Vec<String> {
        let inner = self.lock();
        let used: HashSet<&String> = inner.vars.keys().collect();
        let mut v: Vec<String> = inner.checkpoint.keys().filter(|k| !used.contains(k)).cloned().collect();
        v.sort();
        v
    }

    /// Number of scalar parameters whose key satisfies `filter`.
    pub fn count(&self, filter: impl Fn(&str) -> bool) -> usize {
        self.lock().vars.iter().filter(|(k, _)| filter(k)).map(|(_, v)| v.elem_count()).sum()
    }

    fn get(&self, key: &str, shape: &[usize], init: Init, required: bool) -> Result<Tensor> {
        let mut inner = self.lock();
        if let Some(v) = inner.vars.get(key) {
            if v.dims() != shape {
                return Err(Error::InvalidInput(format!("parameter {key} requested with two shapes")));
            }
            return Ok(v.as_tensor().clone());
        }
        let t = match inner.checkpoint.get(key) {
            Some(t) => {
                if t.dims() != shape {
                    return Err(Error::TensorShape {
                        path: self.source.clone().unwrap_or_default(),
                        key: key.to_string(),
                        expected: shape.to_vec(),
                        found: t.dims().to_vec(),
                    });
                }
                t.clone()
            }
            None if required && self.source.is_some() => {
                let hint = if key.contains("weight_g") || key.contains("weight_v") {
                    " (also looked for parametrizations.weight.original0/1)".to_string()
                } else {
                    " (is this a Wav2Vec2 checkpoint with the same config.json?)".to_string()
                };
                return Err(Error::MissingTensor {
                    path: self.source.clone().unwrap_or_default(),
                    key: key.to_string(),
                    hint,
                });
            }
            None => {
                let n: usize = shape.iter().product();
                let data: Vec<f32> = match init {
                    Init::Const(c) => vec![c as f32; n],
                    Init::Normal(std) => (0..n).map(|_| (inner.rng.normal() * std) as f32).collect(),
                    Init::Uniform(b) => (0..n).map(|_| ((inner.rng.uniform() * 2.0 - 1.0) * b) as f32).collect(),
                };
                Tensor::from_vec(data, shape, &self.device)?.to_dtype(self.dtype)?
            }
        };
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        inner.vars.insert(key.to_string(), var);
        Ok(out)
    }

    /// Writes every parameter to `path` as safetensors in Hugging Face naming.
    ///
    /// `prefix_encoder` puts encoder keys under `wav2vec2.` (as `Wav2Vec2ForCTC` and
    /// `Wav2Vec2ForSequenceClassification` expect); the positional conv's weight norm is written
    /// as `parametrizations.weight.original0/1`, which every transformers release since 4.32 reads.
    /// The file is written to a temporary name and renamed, so a crash never leaves half a file.
    pub fn save_safetensors(&self, path: &Path, prefix_encoder: bool) -> Result<()> {
        let inner = self.lock();
        let mut out: Vec<(String, Tensor)> = Vec::with_capacity(inner.vars.len());
        for (k, v) in &inner.vars {
            let mut name = k.replace("conv.weight_g", "conv.parametrizations.weight.original0");
            name = name.replace("conv.weight_v", "conv.parametrizations.weight.original1");
            if prefix_encoder && !HEAD_KEYS.iter().any(|h| k.starts_with(h)) {
                name = format!("wav2vec2.{name}");
            }
            out.push((name, v.as_tensor().to_dtype(DType::F32)?.to_device(&Device::Cpu)?));
        }
        drop(inner);
        let tmp = path.with_extension("safetensors.tmp");
        let map: HashMap<String, Tensor> = out.into_iter().collect();
        candle_core::safetensors::save(&map, &tmp).map_err(|e| Error::SafeTensors { path: tmp.clone(), detail: e.to_string() })?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, "cannot move the saved weights into place", e))
    }
}

/// A view of the store under a key prefix (`vb.pp("encoder").pp(3)` = `encoder.3.`).
#[derive(Clone)]
pub struct Vb {
    store: Arc<ParamStore>,
    prefix: String,
}

impl Vb {
    /// Descends one key segment.
    pub fn pp(&self, seg: impl std::fmt::Display) -> Vb {
        let prefix = if self.prefix.is_empty() { seg.to_string() } else { format!("{}.{seg}", self.prefix) };
        Vb { store: self.store.clone(), prefix }
    }

    fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// The full key of `name` here.
    pub fn full_key(&self, name: &str) -> String {
        self.key(name)
    }

    /// A tensor the checkpoint must hold (initialized with `init` only for a fresh model).
    pub fn get(&self, shape: &[usize], name: &str, init: Init) -> Result<Tensor> {
        self.store.get(&self.key(name), shape, init, true)
    }

    /// A tensor taken from the checkpoint when present, else initialized (new heads, KL-Norm vectors).
    pub fn get_or_init(&self, shape: &[usize], name: &str, init: Init) -> Result<Tensor> {
        self.store.get(&self.key(name), shape, init, false)
    }

    /// Whether the checkpoint holds `name` here.
    pub fn contains(&self, name: &str) -> bool {
        self.store.has_checkpoint_key(&self.key(name))
    }

    /// The store.
    pub fn store(&self) -> &Arc<ParamStore> {
        &self.store
    }

    /// Device of the parameters.
    pub fn device(&self) -> &Device {
        &self.store.device
    }

    /// dtype of the parameters.
    pub fn dtype(&self) -> DType {
        self.store.dtype
    }
}
