//! The frozen feature encoder's outputs, kept across epochs.
//!
//! With the feature encoder frozen (`klspeech train`'s default) and the waveforms the same
//! every epoch (no gain, noise, speed or crop augmentation), each clip's features are the same
//! every epoch: padding-aware statistics and convolutions make a clip's valid frames depend on
//! its own samples only, whatever batch it is in. For the bundled small model the frozen
//! feature encoder is about a quarter of a training step's arithmetic and half of an
//! evaluation's; the cache computes it once per clip.
//!
//! Training clips are kept one by one (their valid frames, [frames, C]): batches are drawn
//! anew every epoch, and a batch whose clips are all cached is assembled with zero frames
//! after each clip's own. Everything after the feature encoder zeroes or ignores a padded
//! frame (the encoder multiplies the projected features by the length mask before the
//! positional convolution; the projection's LayerNorm is per frame), so the run is the one
//! without the cache (`tests/train.rs` compares them bit for bit). Evaluation batches are the
//! same every time: they are kept whole.
//!
//! The cache holds at most `cap` bytes (`--feature-cache-mib`, in the model's memory: the GPU's
//! for a GPU run); past that, batches run the feature encoder as before.

use std::collections::HashMap;

use candle_core::Tensor;

use super::TrainConfig;
use crate::error::Result;

/// Features of training clips (by index) and of evaluation batches (by batch index).
pub struct FeatureCache {
    /// Whether training clips are kept (else only evaluation batches).
    keeps_clips: bool,
    clips: HashMap<usize, Tensor>,
    batches: HashMap<usize, Tensor>,
    bytes: usize,
    cap: usize,
    /// Training batches assembled from kept clips, and evaluation batches taken from the cache.
    hits: (usize, usize),
}

impl FeatureCache {
    /// A cache of at most `cap_mib` MiB, keeping training clips' features or not.
    pub fn new(cap_mib: usize, keeps_clips: bool) -> Self {
        FeatureCache { keeps_clips, clips: HashMap::new(), batches: HashMap::new(), bytes: 0, cap: cap_mib << 20, hits: (0, 0) }
    }

    /// The cache a run with `cfg` can use: with the feature encoder frozen (also as part of a
    /// frozen encoder) and a size above 0, for its evaluation batches; and for its training
    /// clips when the rest of the encoder trains (a frozen encoder runs whole, in evaluation
    /// mode) and the clips are the same every epoch (no speed, gain or noise augmentation, no
    /// random crops).
    pub fn for_run(cfg: &TrainConfig) -> Option<Self> {
        if cfg.feature_cache_mib == 0 || !(cfg.freeze_feature_encoder || cfg.freeze_encoder) {
            return None;
        }
        let a = &cfg.augment;
        let same_waveforms = a.speeds.iter().all(|&s| (s - 1.0).abs() <= 1e-9) && a.gain_db <= 0.0 && a.noise_dir.is_none();
        let uncropped = cfg.task == super::Task::Asr || cfg.crop_s <= 0.0;
        let keeps_clips = cfg.freeze_feature_encoder && !cfg.freeze_encoder && same_waveforms && uncropped;
        Some(FeatureCache::new(cfg.feature_cache_mib, keeps_clips))
    }

    /// Whether training clips' features are kept.
    pub fn keeps_clips(&self) -> bool {
        self.keeps_clips
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Training clips held.
    pub fn clips(&self) -> usize {
        self.clips.len()
    }

    /// Training batches assembled from kept clips, and evaluation batches taken from the cache.
    pub fn hits(&self) -> (usize, usize) {
        self.hits
    }

    /// [B, t, C] features of the training clips `idx` when every one is cached: each clip's
    /// frames, then zeros up to `t`. `None` when one is missing.
    pub fn batch_of_clips(&mut self, idx: &[usize], t: usize) -> Result<Option<Tensor>> {
        if !self.keeps_clips {
            return Ok(None);
        }
        let mut rows = Vec::with_capacity(idx.len());
        for i in idx {
            let Some(f) = self.clips.get(i) else { return Ok(None) };
            let (frames, c) = f.dims2()?;
            rows.push(if frames < t { Tensor::cat(&[f, &Tensor::zeros((t - frames, c), f.dtype(), f.device())?], 0)? } else { f.narrow(0, 0, t)? });
        }
        self.hits.0 += 1;
        Ok(Some(Tensor::stack(&rows, 0)?))
    }

    /// Keeps the valid frames (`frames[k]` of row k) of a batch's features [B, T, C] for the
    /// training clips `idx` not cached yet, while the cache has room.
    pub fn keep_clips(&mut self, idx: &[usize], feats: &Tensor, frames: &[usize]) -> Result<()> {
        if !self.keeps_clips {
            return Ok(());
        }
        let (_, t, c) = feats.dims3()?;
        for (k, &i) in idx.iter().enumerate() {
            if self.clips.contains_key(&i) {
                continue;
            }
            let n = frames[k].min(t);
            let size = n * c * feats.dtype().size_in_bytes();
            if self.bytes + size > self.cap {
                return Ok(());
            }
            // (A copy of the rows: a view would keep the whole batch's storage alive.)
            let f = feats.get(k)?.narrow(0, 0, n)?.force_contiguous()?;
            self.clips.insert(i, f);
            self.bytes += size;
        }
        Ok(())
    }

    /// The features of evaluation batch `b`, when cached.
    pub fn eval_batch(&mut self, b: usize) -> Option<Tensor> {
        let f = self.batches.get(&b).cloned();
        self.hits.1 += usize::from(f.is_some());
        f
    }

    /// Keeps the features of evaluation batch `b`, while the cache has room.
    pub fn keep_eval_batch(&mut self, b: usize, feats: &Tensor) {
        let size = feats.elem_count() * feats.dtype().size_in_bytes();
        if self.bytes + size <= self.cap && !self.batches.contains_key(&b) {
            self.batches.insert(b, feats.clone());
            self.bytes += size;
        }
    }
}
