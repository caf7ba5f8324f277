//! The fine-tuning loop: data, model, optimizer, evaluation, checkpoints, exact resume.
//!
//! Determinism: every random draw of optimizer step `s` (batch order, augmentation, dropout,
//! KL-Norm noise, SpecAugment) comes from generators derived from `(seed, s)` and the epoch,
//! so a run resumed from its last checkpoint at step `s` replays exactly what an uninterrupted
//! run does from `s` on.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::augment::{augment, random_crop, NoiseBank};
use super::config::{Task, TrainConfig};
use super::eval::{batch_tensor, evaluate, evaluate_cached, EvalResult};
use super::feature_cache::FeatureCache;
use super::optim::{self, AdamW, AdamWConfig, Schedule};
use crate::data::{self, Dataset};
use crate::device::parse_device;
use crate::error::{Error, Result};
use crate::loss::{self, Reduction};
use crate::model::{ForwardCtx, HeadKind, KlPrior, KlSettings, KlSites, LoadOptions, SpecAugment, SpeechModel};
use crate::rng::Rng;
use crate::vocab::CharVocab;

/// What a finished run reports.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainOutcome {
    /// Optimizer steps taken (in total, across resumes).
    pub steps: usize,
    /// Best dev evaluation and its step.
    pub best: Option<EvalResult>,
    pub best_step: usize,
    /// Test-split evaluation of the best model (when the data has a test split).
    pub test: Option<EvalResult>,
    /// Steps skipped because the loss or a gradient was not finite.
    pub nonfinite_skipped: usize,
    pub stopped_early: bool,
    /// Clips dropped by `--skip-bad`.
    pub dropped_bad: usize,
    /// Last training loss logged.
    pub last_loss: Option<f64>,
    /// Training clips whose frozen feature-encoder outputs were kept across epochs, the MiB
    /// the cache held at the end (training clips and dev batches), and the training and dev
    /// batches whose features came from it (`train::feature_cache`).
    pub feature_cache_clips: usize,
    pub feature_cache_mib: f64,
    pub feature_cache_hits: (usize, usize),
}

/// Progress kept in `checkpoint-last/trainer_state.json`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
struct TrainerState {
    step: usize,
    best_score: Option<f64>,
    best: Option<EvalResult>,
    best_step: usize,
    evals_without_improvement: usize,
    nonfinite_skipped: usize,
    consecutive_nonfinite: usize,
    last_loss: Option<f64>,
}

fn mix(seed: u64, a: u64, b: u64) -> u64 {
    let mut r = Rng::new(seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.rotate_left(29));
    r.next_u64()
}

struct Split {
    clips: Vec<Vec<f32>>,
    labels: Vec<usize>,
    texts: Vec<String>,
}

impl Split {
    fn from(ds: &Dataset, task: Task, chars_to_ignore: &str, case: data::Case) -> Result<Self> {
        let clips = ds.load_all_16k()?;
        let labels = ds.examples.iter().map(|e| e.label.unwrap_or(0)).collect();
        let texts = ds
            .examples
            .iter()
            .map(|e| match task {
                Task::Asr => data::normalize_transcript(e.text.as_deref().unwrap_or(""), chars_to_ignore, case),
                _ => String::new(),
            })
            .collect();
        Ok(Split { clips, labels, texts })
    }
    fn len(&self) -> usize {
        self.clips.len()
    }
}

fn load_asr(path: &Path) -> Result<Dataset> {
    if path.is_dir() {
        data::librispeech(path)
    } else {
        data::asr_manifest(path)
    }
}

/// Every 10th clip (by index) held out as dev data when no dev set is given.
fn hold_out(ds: Dataset) -> (Dataset, Dataset) {
    let (mut train, mut dev) = (Vec::new(), Vec::new());
    for (i, e) in ds.examples.into_iter().enumerate() {
        if i % 10 == 9 {
            dev.push(e)
        } else {
            train.push(e)
        }
    }
    (Dataset { examples: train, labels: ds.labels.clone() }, Dataset { examples: dev, labels: ds.labels })
}

/// Loads train / dev / test data for the task.
fn load_data(cfg: &TrainConfig) -> Result<(Dataset, Dataset, Dataset)> {
    Ok(match cfg.task {
        Task::Kws => {
            let opts = data::KwsOptions { words: cfg.words.clone(), seed: cfg.seed, ..Default::default() };
            let s = data::open_kws(&cfg.data, &opts)?;
            (s.train, s.dev, s.test)
        }
        Task::Asr => {
            let train = load_asr(&cfg.data)?;
            match &cfg.dev {
                Some(d) => (train, load_asr(d)?, Dataset { examples: vec![], labels: vec![] }),
                None => {
                    let (t, d) = hold_out(train);
                    (t, d, Dataset { examples: vec![], labels: vec![] })
                }
            }
        }
        Task::Classify => {
            let train = data::classification_manifest(&cfg.data)?;
            match &cfg.dev {
                Some(d) => {
                    let dev = data::classification_manifest_with_labels(d, Some(&train.labels))?;
                    (train, dev, Dataset { examples: vec![], labels: vec![] })
                }
                None => {
                    let (t, d) = hold_out(train);
                    (t, d, Dataset { examples: vec![], labels: vec![] })
                }
            }
        }
    })
}

/// The run's model: `--norm kl` puts KL-Norm at `--kl-sites`.
fn load_model(cfg: &TrainConfig, labels: Option<&[String]>, vocab: Option<&BTreeMap<String, i64>>) -> Result<(SpeechModel, Vec<String>)> {
    let sites = match cfg.norm.as_str() {
        "layer" | "none" => KlSites::None,
        "kl" => KlSites::from_str(&cfg.kl_sites)?,
        other => return Err(Error::InvalidInput(format!("--norm `{other}`: expected layer or kl"))),
    };
    if sites != KlSites::None && cfg.freeze_encoder {
        return Err(Error::InvalidInput(
            "--norm kl with --freeze-encoder: the frozen encoder runs in evaluation mode, where KL-Norm is exactly LayerNorm, so nothing would be regularized: use --norm layer (optionally with --vib), or drop --freeze-encoder".into(),
        ));
    }
    if sites == KlSites::All && cfg.freeze_feature_encoder {
        // A frozen feature encoder runs in evaluation mode, where KL-Norm is its plain norm:
        // `all` would silently train exactly what `encoder` trains.
        return Err(Error::InvalidInput(
            "--kl-sites all puts KL-Norm into the feature encoder, which is frozen (the default), so those sites would stay deterministic and the run would equal --kl-sites encoder: add --train-feature-encoder, or use --kl-sites encoder".into(),
        ));
    }
    if cfg.vib && cfg.task == Task::Asr {
        return Err(Error::InvalidInput("--vib regularizes the pooled representation of a classification head: use it with --task kws or classify, not asr".into()));
    }
    let opts = LoadOptions {
        dtype: DType::F32,
        device: parse_device(&cfg.device)?,
        kl_sites: sites,
        kl: KlSettings { sigma0: cfg.kl_sigma0, prior: KlPrior::from_str(&cfg.kl_prior)? },
        head: None,
        seed: cfg.seed,
        vib_sigma0: if cfg.vib { Some(cfg.kl_sigma0) } else { None },
    };
    let head = if cfg.task == Task::Asr { HeadKind::Ctc } else { HeadKind::Classification };
    let (mut model, dropped) = if cfg.from_scratch {
        // Pre-training from nothing: only config.json (and optionally preprocessor_config.json).
        let mut config = crate::model::Wav2Vec2Config::from_file(&cfg.model.join("config.json"))?;
        if let Some(v) = vocab {
            config.set_vocab(v);
        }
        if let Some(l) = labels {
            config.set_labels(l);
        }
        let mut m = SpeechModel::fresh(config, &LoadOptions { head: Some(head), ..opts })?;
        m.feature_extractor = crate::features::FeatureExtractor::from_model_dir(&cfg.model)?;
        m.vocab = vocab.cloned();
        (m, vec![])
    } else {
        SpeechModel::load_for_finetuning(&cfg.model, &opts, head, labels, vocab)?
    };
    if let Some(p) = cfg.layerdrop {
        model.config.layerdrop = p;
    }
    if let Some(p) = cfg.hidden_dropout {
        model.config.hidden_dropout = p;
    }
    if let Some(p) = cfg.mask_time_prob {
        model.config.mask_time_prob = p;
    }
    model.config.apply_spec_augment = cfg.spec_augment;
    model.config.ctc_loss_reduction = cfg.ctc_reduction.clone();
    model.config.ctc_zero_infinity = cfg.ctc_zero_infinity;
    Ok((model, dropped))
}

/// Which variables the optimizer updates.
fn trainable(model: &SpeechModel, cfg: &TrainConfig) -> Vec<(String, Var)> {
    let head = crate::model::params::HEAD_KEYS;
    model
        .store
        .vars()
        .into_iter()
        .filter(|(k, _)| {
            if cfg.freeze_encoder {
                return head.iter().any(|h| k.starts_with(h));
            }
            !(cfg.freeze_feature_encoder && k.starts_with("feature_extractor."))
        })
        .collect()
}

/// Batches of one epoch (indices into the training split).
fn epoch_batches(split: &Split, cfg: &TrainConfig, epoch: usize) -> Vec<Vec<usize>> {
    let n = split.len();
    let mut rng = Rng::new(mix(cfg.seed, 0xE90C, epoch as u64));
    let mut idx: Vec<usize> = if cfg.class_balanced && cfg.task != Task::Asr {
        // Inverse-frequency sampling with replacement, as many draws as clips.
        let k = split.labels.iter().copied().max().unwrap_or(0) + 1;
        let mut counts = vec![0usize; k];
        split.labels.iter().for_each(|&l| counts[l] += 1);
        let w: Vec<f64> = split.labels.iter().map(|&l| 1.0 / counts[l] as f64).collect();
        let total: f64 = w.iter().sum();
        (0..n)
            .map(|_| {
                let mut u = rng.uniform() * total;
                let mut i = 0;
                while i + 1 < n && u >= w[i] {
                    u -= w[i];
                    i += 1;
                }
                i
            })
            .collect()
    } else {
        let mut v: Vec<usize> = (0..n).collect();
        rng.shuffle(&mut v);
        v
    };
    if cfg.task == Task::Asr {
        // Length-grouped: sort windows of 50 batches by length, then shuffle the batches.
        let w = 50 * cfg.batch_size;
        for chunk in idx.chunks_mut(w) {
            chunk.sort_by_key(|&i| split.clips[i].len());
        }
    }
    let mut batches: Vec<Vec<usize>> = idx.chunks(cfg.batch_size).map(|c| c.to_vec()).collect();
    if cfg.task == Task::Asr {
        rng.shuffle(&mut batches);
    }
    batches
}

/// A training batch as the model takes it: waveforms [B, L], or the frozen feature encoder's
/// outputs [B, T, C] from the [`FeatureCache`].
enum BatchInput {
    Waves(Tensor),
    Features(Tensor),
}

struct Run<'a> {
    cfg: &'a TrainConfig,
    model: SpeechModel,
    vocab: Option<CharVocab>,
    train: Split,
    dev: Split,
    noise: Option<NoiseBank>,
    batches_per_epoch: usize,
    epoch_cache: HashMap<usize, Vec<Vec<usize>>>,
    /// The frozen feature encoder's outputs of dev batches and training clips, where they are
    /// the same every epoch ([`FeatureCache::for_run`]).
    features: Option<FeatureCache>,
}

impl Run<'_> {
    fn batch(&mut self, micro: usize) -> Vec<usize> {
        let epoch = micro / self.batches_per_epoch;
        let pos = micro % self.batches_per_epoch;
        let split = &self.train;
        let cfg = self.cfg;
        self.epoch_cache.retain(|&e, _| e + 1 >= epoch);
        self.epoch_cache.entry(epoch).or_insert_with(|| epoch_batches(split, cfg, epoch))[pos].clone()
    }

    /// Loss of one micro-batch (task + beta * KL) and its parts, the task loss and the KL term
    /// (0-d f64, detached, on the model's device; no KL term: 0). Nothing is read back here: the
    /// step reads all its figures in one synchronization (see the training loop).
    fn micro_loss(&mut self, micro: usize, step: usize, total_steps: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let cfg = self.cfg;
        let idx = self.batch(micro);
        let mut rng = Rng::new(mix(cfg.seed, 0xBA7C, micro as u64));
        let mut clips = Vec::with_capacity(idx.len());
        for &i in &idx {
            let mut x = augment(&self.train.clips[i], &cfg.augment, self.noise.as_ref(), &mut rng)?;
            if cfg.task != Task::Asr && cfg.crop_s > 0.0 {
                x = random_crop(&x, (cfg.crop_s * 16000.0) as usize, &mut rng);
            }
            clips.push(x);
        }
        let refs: Vec<&[f32]> = clips.iter().map(|c| c.as_slice()).collect();
        // With every clip's features cached (the feature encoder frozen, the clips as loaded),
        // no waveform batch: its sample counts are the clips' lengths, as the batch reports.
        let lengths: Vec<usize> = refs.iter().map(|c| c.len()).collect();
        let t = lengths.iter().map(|&n| self.model.config.frames_for_samples(n)).max().unwrap_or(0);
        let cached = match self.features.as_mut() {
            Some(cache) => cache.batch_of_clips(&idx, t)?,
            None => None,
        };
        let (input, lengths) = match cached {
            Some(feats) => (BatchInput::Features(feats), lengths),
            None => {
                let (x, l) = batch_tensor(&self.model.feature_extractor, &refs, &self.model)?;
                (BatchInput::Waves(x), l)
            }
        };
        let mut ctx = ForwardCtx::train(&self.model.config, rng.fork());
        if !cfg.spec_augment {
            ctx.spec_augment = None;
        } else if ctx.spec_augment.is_none() {
            ctx.spec_augment = SpecAugment::from_config(&self.model.config);
        }
        let model = &self.model;
        let out = match input {
            BatchInput::Features(feats) => model.encoder.forward_features(&feats, Some(&lengths), &mut ctx)?,
            BatchInput::Waves(x) if cfg.freeze_encoder => {
                let mut frozen = ForwardCtx::eval().with_padding_aware(true);
                let mut enc = model.encoder.forward(&x, Some(&lengths), &mut frozen)?;
                enc.last_hidden_state = enc.last_hidden_state.detach();
                enc.hidden_states = enc.hidden_states.iter().map(|h| h.detach()).collect();
                enc
            }
            BatchInput::Waves(x) if cfg.freeze_feature_encoder => {
                let mut fe_ctx = ForwardCtx::eval().with_padding_aware(true);
                let feats = model.encoder.extract(&x, Some(&lengths), &mut fe_ctx)?.detach();
                if let Some(cache) = self.features.as_mut() {
                    let frames: Vec<usize> = lengths.iter().map(|&n| model.config.frames_for_samples(n)).collect();
                    cache.keep_clips(&idx, &feats, &frames)?;
                }
                model.encoder.forward_features(&feats, Some(&lengths), &mut ctx)?
            }
            BatchInput::Waves(x) => model.encoder.forward(&x, Some(&lengths), &mut ctx)?,
        };
        let task_loss = match &model.head {
            crate::model::Head::Classification(h) => {
                let logits = h.forward(&out, &mut ctx)?;
                let y: Vec<usize> = idx.iter().map(|&i| self.train.labels[i]).collect();
                loss::cross_entropy(&logits, &y, cfg.label_smoothing)?
            }
            crate::model::Head::Ctc(h) => {
                let logits = h.forward(&out, model.config.final_dropout, &mut ctx)?;
                let lp = loss::log_softmax(&logits.to_dtype(DType::F32)?)?;
                let vocab = self.vocab.as_ref().ok_or_else(|| Error::InvalidInput("no vocabulary".into()))?;
                let targets: Vec<Vec<usize>> =
                    idx.iter().map(|&i| data::encode_transcript(vocab, &self.train.texts[i])).collect::<Result<_>>()?;
                let red = Reduction::from_str(&cfg.ctc_reduction)?;
                loss::ctc_loss(&lp, &targets, &out.frame_lengths, vocab.pad_id, red, cfg.ctc_zero_infinity)?
            }
            crate::model::Head::None => return Err(Error::InvalidInput("training needs a head".into())),
        };
        let task_v = task_loss.detach().to_dtype(DType::F64)?;
        let beta = if cfg.kl_warmup_steps == 0 { cfg.kl_beta } else { cfg.kl_beta * (step as f64 / cfg.kl_warmup_steps as f64).min(1.0) };
        let _ = total_steps;
        let (loss, kl_v) = match ctx.kl_total()? {
            // A frozen encoder runs in evaluation mode and adds no KL-Norm terms; VIB's may be here.
            Some(kl) => {
                let kl_v = kl.detach().to_dtype(DType::F64)?;
                ((task_loss + (kl * beta)?)?, kl_v)
            }
            _ => (task_loss, task_v.zeros_like()?),
        };
        Ok((loss, task_v, kl_v))
    }
}

fn write_line(path: &Path, v: &serde_json::Value) -> Result<()> {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|source| Error::Open { path: path.into(), source })?;
    writeln!(f, "{v}").map_err(|e| Error::io(path, "cannot append", e))
}

fn save_checkpoint(dir: &Path, model: &SpeechModel, opt: &AdamW, state: &TrainerState) -> Result<()> {
    // Write into a fresh folder, then swap it in: a kill at any moment leaves either the old
    // or the new checkpoint complete.
    let tmp = dir.with_extension("tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, "cannot clear", e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, "cannot create", e))?;
    model.store.save_safetensors(&tmp.join("model.safetensors"), false)?;
    let ost: HashMap<String, Tensor> = opt.state()?.into_iter().map(|(k, t)| Ok((k, t.to_device(&candle_core::Device::Cpu)?))).collect::<Result<_>>()?;
    candle_core::safetensors::save(&ost, tmp.join("optimizer.safetensors"))?;
    let sv = serde_json::to_value(state).map_err(|e| Error::InvalidInput(e.to_string()))?;
    crate::model::write_json_atomic(&tmp.join("trainer_state.json"), &sv)?;
    let old = dir.with_extension("old");
    if dir.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, "cannot clear", e))?;
        }
        std::fs::rename(dir, &old).map_err(|e| Error::io(dir, "cannot rotate checkpoint", e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, "cannot move checkpoint into place", e))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, "cannot remove", e))?;
    }
    Ok(())
}

fn load_checkpoint(dir: &Path, model: &SpeechModel, opt: &mut AdamW) -> Result<TrainerState> {
    // A kill between the two renames of save_checkpoint leaves only `.old`.
    let dir: PathBuf = if dir.exists() { dir.to_path_buf() } else { dir.with_extension("old") };
    let p = dir.join("model.safetensors");
    let saved = candle_core::safetensors::load(&p, &model.store.device)?;
    for (k, var) in model.store.vars() {
        let t = saved.get(&k.replace("conv.weight_g", "conv.parametrizations.weight.original0").replace("conv.weight_v", "conv.parametrizations.weight.original1"))
            .ok_or_else(|| Error::MissingTensor { path: p.clone(), key: k.clone(), hint: " (checkpoint from another run?)".into() })?;
        var.set(&t.to_dtype(var.dtype())?)?;
    }
    crate::model::params::parameters_changed();
    let ost = candle_core::safetensors::load(dir.join("optimizer.safetensors"), &model.store.device)?;
    opt.load_state(&ost)?;
    let sp = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&sp).map_err(|source| Error::Open { path: sp.clone(), source })?;
    serde_json::from_str(&text).map_err(|e| Error::config(&sp, e.to_string()))
}

/// Trains as `cfg` says; writes the best model (Hugging Face layout), `metrics.jsonl`,
/// `curves.png`, `run_config.json` and `checkpoint-last/` into `cfg.out`.
pub fn train(cfg: &TrainConfig, resume: bool) -> Result<TrainOutcome> {
    // On the CPU, candle's own thread pool stays installed for the whole run: its workers stay
    // warm across the many short parallel sections of each step (shared/PERF.md: about -11 %).
    // (The pool runs the closure on one of its threads: a rehearsal of the GPU's path on the
    // CPU, a per-thread setting, goes along.)
    let gpu_path = crate::ops::gpu_path_active();
    candle_core::Device::Cpu.with_context(|| crate::ops::with_gpu_path_if(gpu_path, || train_in_context(cfg, resume)))
}

fn train_in_context(cfg: &TrainConfig, resume: bool) -> Result<TrainOutcome> {
    std::fs::create_dir_all(&cfg.out).map_err(|e| Error::io(&cfg.out, "cannot create the output folder", e))?;
    let (train_ds, dev_ds, test_ds) = load_data(cfg)?;
    if train_ds.is_empty() {
        return Err(Error::Data(format!("{}: no training clips found", cfg.data.display())));
    }

    // Vocabulary (ASR): the model's own vocab.json if it has one, else built from transcripts;
    // the transcripts' letter case follows --text-case (by default the model vocabulary's).
    let model_vocab = if cfg.task == Task::Asr { crate::model::read_vocab(&cfg.model.join("vocab.json"))? } else { None };
    let case = cfg.text_case.resolve(model_vocab.as_ref());
    let vocab_map = match (cfg.task, model_vocab) {
        (Task::Asr, Some(v)) => Some(v),
        (Task::Asr, None) => {
            let texts: Vec<String> = train_ds
                .examples
                .iter()
                .chain(&dev_ds.examples)
                .map(|e| data::normalize_transcript(e.text.as_deref().unwrap_or(""), &cfg.chars_to_ignore, case))
                .collect();
            Some(data::build_char_vocab(texts.iter().map(|s| s.as_str())))
        }
        _ => None,
    };
    let labels = (cfg.task != Task::Asr).then(|| train_ds.labels.clone());
    let (model, dropped_head) = load_model(cfg, labels.as_deref(), vocab_map.as_ref())?;
    let vocab = match &vocab_map {
        Some(m) => Some(CharVocab::from_map(m, &cfg.out.join("vocab.json"))?),
        None => None,
    };

    // Validate everything before the first step; report all problems at once.
    let mut dropped_bad = 0;
    let mut checked = Vec::new();
    for (name, ds) in [("train", train_ds), ("dev", dev_ds), ("test", test_ds)] {
        let opts = data::ValidateOptions {
            vocab: vocab.clone(),
            chars_to_ignore: cfg.chars_to_ignore.clone(),
            case,
            config: Some(model.config.clone()),
            min_duration_s: cfg.min_duration_s,
            max_duration_s: cfg.max_duration_s,
        };
        let report = data::validate(&ds, &opts);
        let ds = if report.problems.is_empty() {
            ds
        } else if cfg.skip_bad {
            let (kept, n) = report.drop_bad(&ds);
            eprintln!("{name}: dropped {n} bad clip(s) (--skip-bad):\n{report}");
            dropped_bad += n;
            kept
        } else {
            return Err(Error::Data(format!("{name} data has problems; training did not start.\n{report}")));
        };
        checked.push(ds);
    }
    let test_ds = checked.pop().expect("three splits");
    let dev_ds = checked.pop().expect("three splits");
    let train_ds = checked.pop().expect("three splits");
    if train_ds.is_empty() {
        return Err(Error::Data("no training clips left after validation".into()));
    }

    let run_cfg = serde_json::to_value(cfg).map_err(|e| Error::InvalidInput(e.to_string()))?;
    crate::model::write_json_atomic(&cfg.out.join("run_config.json"), &run_cfg)?;

    let train = Split::from(&train_ds, cfg.task, &cfg.chars_to_ignore, case)?;
    let dev = Split::from(&dev_ds, cfg.task, &cfg.chars_to_ignore, case)?;
    let test = Split::from(&test_ds, cfg.task, &cfg.chars_to_ignore, case)?;
    let noise = match &cfg.augment.noise_dir {
        Some(d) => Some(NoiseBank::load(d)?),
        None => None,
    };
    let bs = cfg.batch_size.max(1);
    let batches_per_epoch = train.len().div_ceil(bs);
    let accum = cfg.grad_accum.max(1);
    let total_steps = cfg.steps.unwrap_or((cfg.epochs * batches_per_epoch).div_ceil(accum)).max(1);
    let warmup = (cfg.warmup_ratio * total_steps as f64).round() as usize;
    let schedule = Schedule::from_str(&cfg.schedule)?;
    let eval_every = if cfg.eval_every == 0 { batches_per_epoch.div_ceil(accum).max(1) } else { cfg.eval_every };

    let vars = trainable(&model, cfg);
    let mut opt = AdamW::new(vars.clone(), AdamWConfig { lr: cfg.lr, weight_decay: cfg.weight_decay, ..Default::default() })?;
    let ckpt_dir = cfg.out.join("checkpoint-last");
    let metrics_path = cfg.out.join("metrics.jsonl");
    let mut state = if resume && (ckpt_dir.exists() || ckpt_dir.with_extension("old").exists()) {
        let s = load_checkpoint(&ckpt_dir, &model, &mut opt)?;
        eprintln!("resuming from step {} ({})", s.step, ckpt_dir.display());
        s
    } else {
        if metrics_path.exists() {
            std::fs::remove_file(&metrics_path).map_err(|e| Error::io(&metrics_path, "cannot reset", e))?;
        }
        if !dropped_head.is_empty() {
            eprintln!("re-initialized head tensors that did not fit the new task: {}", dropped_head.join(", "));
        }
        TrainerState::default()
    };

    let features = FeatureCache::for_run(cfg);
    let mut run = Run { cfg, model, vocab, train, dev, noise, batches_per_epoch, epoch_cache: HashMap::new(), features };
    let pb = if cfg.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        let pb = indicatif::ProgressBar::new(total_steps as u64);
        pb.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}] {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb
    };
    pb.set_position(state.step as u64);
    let started = Instant::now();
    let mut stopped_early = false;
    let mut loss_points: Vec<(f64, f64)> = Vec::new();
    let mut metric_points: Vec<(f64, f64)> = Vec::new();

    while state.step < total_steps {
        if cfg.stop_after.is_some_and(|s| state.step >= s) {
            break;
        }
        let step = state.step;
        let mut acc = optim::GradAccumulator::new();
        // The step's figures stay on the device until one read after the last backward: the
        // task loss, KL term and loss of each micro-batch, then a probe that is NaN if a
        // gradient is not finite and the gradients' sum of squares (for clipping). On a GPU
        // every read is a synchronization: the queue drains and the host waits on it.
        let mut figures: Vec<Tensor> = Vec::with_capacity(3 * accum + 2);
        for k in 0..accum {
            let micro = step * accum + k;
            let (loss, task_v, kl_v) = run.micro_loss(micro, step, total_steps)?;
            figures.extend([task_v, kl_v, loss.detach().to_dtype(DType::F64)?]);
            // Parameter gradients stored as the fused ops compute them (ops::grads).
            let grads = crate::ops::backward(&(loss / accum as f64)?)?;
            acc.add(grads, &vars, 1.0)?;
        }
        let grads = acc.into_grads();
        let probes = optim::step_probes(&grads, &vars, cfg.max_grad_norm > 0.0)?;
        let n_micro = figures.len();
        figures.extend(probes.iter().map(|p| p.clone().map_or_else(|| Tensor::zeros((), DType::F64, &run.model.store.device), Ok)).collect::<candle_core::Result<Vec<_>>>()?);
        let values: Vec<f64> = Tensor::stack(&figures, 0)?.to_device(&candle_core::Device::Cpu)?.to_vec1()?;
        let (mut task_sum, mut kl_sum) = (0.0, 0.0);
        for m in values[..n_micro].chunks(3) {
            task_sum += m[0] / accum as f64;
            kl_sum += m[1] / accum as f64;
        }
        // Skipped: a non-finite loss in any micro-batch, or a non-finite gradient.
        let finite = values[..n_micro].chunks(3).all(|m| m[2].is_finite()) && values[n_micro].is_finite();
        state.step += 1;
        if !finite {
            state.nonfinite_skipped += 1;
            state.consecutive_nonfinite += 1;
            write_line(&metrics_path, &serde_json::json!({"step": state.step, "skipped": "non-finite loss or gradient"}))?;
            if state.consecutive_nonfinite >= cfg.max_nonfinite.max(1) {
                pb.abandon();
                return Err(Error::Training(format!(
                    "{} steps in a row had a non-finite loss or gradient (last at step {}); the last good checkpoint in {} is intact. Lower --lr, raise --max-grad-norm clipping, or check the data",
                    state.consecutive_nonfinite,
                    state.step,
                    ckpt_dir.display()
                )));
            }
            continue;
        }
        state.consecutive_nonfinite = 0;
        let grad_norm = match &probes[1] {
            Some(_) => values[n_micro + 1].sqrt(),
            // No gradient at all (nothing trainable got one): clip_grad_norm's 0.
            None if cfg.max_grad_norm > 0.0 => 0.0,
            None => f64::NAN,
        };
        // Clipping (clip_grad_norm_'s scale) applied by the update as it reads each gradient.
        let clip = if probes[1].is_some() { optim::clip_coef(cfg.max_grad_norm, grad_norm) } else { None };
        let lr_scale = optim::lr_factor(schedule, step, warmup, total_steps);
        opt.step_scaled(&grads, lr_scale, clip)?;
        let total = task_sum + kl_sum * cfg.kl_beta * if cfg.kl_warmup_steps == 0 { 1.0 } else { (step as f64 / cfg.kl_warmup_steps as f64).min(1.0) };
        state.last_loss = Some(total);
        loss_points.push((state.step as f64, task_sum));
        if state.step % cfg.log_every.max(1) == 0 || state.step == total_steps {
            let mut line = serde_json::json!({"step": state.step, "loss": total, "task_loss": task_sum, "kl": kl_sum,
                "lr": cfg.lr * lr_scale, "grad_norm": if grad_norm.is_finite() { serde_json::json!(grad_norm) } else { serde_json::Value::Null },
                "elapsed_s": started.elapsed().as_secs_f64()});
            // On a GPU: the memory pool's high-water mark so far (PyTorch's max_memory_allocated).
            if let Some(bytes) = crate::device::gpu_peak_memory(&run.model.store.device) {
                line["gpu_peak_mib"] = serde_json::json!((bytes as f64 / 104857.6).round() / 10.0);
            }
            write_line(&metrics_path, &line)?;
        }
        pb.set_position(state.step as u64);
        let best_txt = state.best.as_ref().map(|b| b.accuracy.map(|a| format!("acc {a:.3}")).or(b.cer.map(|c| format!("cer {c:.3}"))).unwrap_or_default()).unwrap_or_default();
        pb.set_message(format!("loss {task_sum:.4} {best_txt}"));

        if state.step % eval_every == 0 || state.step == total_steps {
            if run.dev.len() > 0 {
                // (The feature encoder is frozen when the cache exists: its dev batches' outputs
                // are kept.)
                let r = evaluate_cached(&run.model, &run.dev.clips, Some(&run.dev.labels), Some(&run.dev.texts), run.vocab.as_ref(), bs, run.features.as_mut())?;
                write_line(&metrics_path, &serde_json::json!({"step": state.step, "dev": r}))?;
                metric_points.push((state.step as f64, r.accuracy.or(r.cer).unwrap_or(f64::NAN)));
                if state.best_score.is_none_or(|b| r.score() > b) {
                    state.best_score = Some(r.score());
                    state.best = Some(r);
                    state.best_step = state.step;
                    state.evals_without_improvement = 0;
                    run.model.save_pretrained(&cfg.out)?;
                } else {
                    state.evals_without_improvement += 1;
                }
            } else {
                run.model.save_pretrained(&cfg.out)?;
                state.best_step = state.step;
            }
            save_checkpoint(&ckpt_dir, &run.model, &opt, &state)?;
            if cfg.patience > 0 && state.evals_without_improvement >= cfg.patience {
                stopped_early = true;
                break;
            }
        }
    }
    pb.finish_and_clear();
    if !cfg.out.join("model.safetensors").exists() {
        run.model.save_pretrained(&cfg.out)?;
    }
    if loss_points.len() > 1 {
        let series = [crate::plot::Series { name: "train loss", points: &loss_points }];
        crate::plot::line_chart_png(&cfg.out.join("curves.png"), &series, "step", "loss", "training loss")?;
        if metric_points.len() > 1 {
            let name = if cfg.task == Task::Asr { "dev CER" } else { "dev accuracy" };
            let s = [crate::plot::Series { name, points: &metric_points }];
            crate::plot::line_chart_png(&cfg.out.join("dev_curve.png"), &s, "step", name, name)?;
        }
    }
    // Test split with the best model.
    let test_result = if test.len() > 0 && cfg.stop_after.is_none() {
        let best = SpeechModel::load(&cfg.out, &LoadOptions { device: parse_device(&cfg.device)?, ..Default::default() })?;
        let r = evaluate(&best, &test.clips, Some(&test.labels), Some(&test.texts), run.vocab.as_ref(), bs)?;
        write_line(&metrics_path, &serde_json::json!({"step": state.best_step, "test": r}))?;
        Some(r)
    } else {
        None
    };
    Ok(TrainOutcome {
        steps: state.step,
        best: state.best,
        best_step: state.best_step,
        test: test_result,
        nonfinite_skipped: state.nonfinite_skipped,
        stopped_early,
        dropped_bad,
        last_loss: state.last_loss,
        feature_cache_clips: run.features.as_ref().map_or(0, FeatureCache::clips),
        feature_cache_mib: run.features.as_ref().map_or(0.0, |c| c.bytes() as f64 / (1 << 20) as f64),
        feature_cache_hits: run.features.as_ref().map_or((0, 0), FeatureCache::hits),
    })
}
