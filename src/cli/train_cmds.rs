//! `klspeech train` and `klspeech eval`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use klspeech::data;
use klspeech::device::parse_device;
use klspeech::model::{LoadOptions, SpeechModel};
use klspeech::train::augment::AugmentConfig;
use klspeech::train::{self, Task, TrainConfig};
use klspeech::vocab::CharVocab;

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// kws (Speech Commands layout), asr (CTC over characters), classify (manifest with a label column).
    #[arg(long)]
    pub task: String,
    /// Pretrained model folder (Hugging Face layout: config.json, model.safetensors, ...).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Train from a random initialization of the folder's config.json (pre-training), not from weights.
    #[arg(long)]
    pub from_scratch: bool,
    /// Training data: a Speech Commands folder (kws), a CSV/TSV manifest or LibriSpeech folder (asr), a manifest (classify).
    #[arg(long, value_name = "PATH")]
    pub data: PathBuf,
    /// Development data for asr/classify (default: every 10th training clip is held out).
    #[arg(long, value_name = "PATH")]
    pub dev: Option<PathBuf>,
    /// Output folder: the best model (Hugging Face layout), metrics.jsonl, curves.png, run_config.json, checkpoint-last/.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Normalization: `layer` (plain LayerNorm/GroupNorm) or `kl` (KL-Norm).
    #[arg(long, default_value = "kl")]
    pub norm: String,
    /// KL-Norm sites: encoder, all, last:K.
    #[arg(long, default_value = "encoder")]
    pub kl_sites: String,
    /// Final weight of the KL term in the loss (1e-2: chosen by the study in docs/RESULTS.md)
    #[arg(long, default_value_t = 1e-2)]
    pub kl_beta: f64,
    /// Steps over which the KL weight ramps up linearly from 0.
    #[arg(long, default_value_t = 100)]
    pub kl_warmup_steps: usize,
    /// KL prior: standard (N(0,1)) or learned (per-feature mean and scale).
    #[arg(long, default_value = "standard")]
    pub kl_prior: String,
    /// Initial KL-Norm noise scale sigma0.
    #[arg(long, default_value_t = 1e-2)]
    pub kl_sigma0: f64,
    /// VIB on the pooled representation (kws/classify; the baseline of Mahabadi et al. 2021): its KL is weighted by --kl-beta, its initial noise scale is --kl-sigma0. Combine with --norm layer for the plain VIB baseline
    #[arg(long)]
    pub vib: bool,
    /// Passes over the training data.
    #[arg(long, default_value_t = 10)]
    pub epochs: usize,
    /// Optimizer steps (overrides --epochs).
    #[arg(long)]
    pub steps: Option<usize>,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Micro-batches accumulated per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Peak learning rate (AdamW).
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    /// AdamW weight decay (not applied to biases, norms, KL-Norm vectors).
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    /// Warm-up share of all steps.
    #[arg(long, default_value_t = 0.1)]
    pub warmup_ratio: f64,
    /// Learning-rate decay after warm-up: constant, linear or cosine.
    #[arg(long, default_value = "linear")]
    pub schedule: String,
    /// Clip the global gradient norm (0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Also train the convolutional feature encoder (frozen by default).
    #[arg(long)]
    pub train_feature_encoder: bool,
    /// Freeze the whole encoder and train only the head over the weighted layer sum (SUPERB).
    #[arg(long)]
    pub freeze_encoder: bool,
    /// LayerDrop probability (default: the checkpoint's).
    #[arg(long)]
    pub layerdrop: Option<f64>,
    /// Hidden dropout (default: the checkpoint's).
    #[arg(long)]
    pub hidden_dropout: Option<f64>,
    /// Turn SpecAugment masking off.
    #[arg(long)]
    pub no_spec_augment: bool,
    /// SpecAugment time-mask probability (default: the checkpoint's mask_time_prob).
    #[arg(long)]
    pub mask_time_prob: Option<f64>,
    /// Label smoothing for classification.
    #[arg(long, default_value_t = 0.0)]
    pub label_smoothing: f64,
    /// Class-balanced sampling for classification.
    #[arg(long)]
    pub class_balanced: bool,
    /// Random crop length in seconds for classification (0 = whole clips).
    #[arg(long, default_value_t = 0.0)]
    pub crop_s: f64,
    /// Longest clip kept (seconds).
    #[arg(long, default_value_t = 20.0)]
    pub max_duration_s: f64,
    /// With the feature encoder frozen and no waveform augmentation, keep its outputs across
    /// epochs, up to this many MiB (in the model's memory; 0 = recompute every epoch).
    #[arg(long, default_value_t = 2048)]
    pub feature_cache_mib: usize,
    /// Shortest clip kept (seconds).
    #[arg(long, default_value_t = 0.0)]
    pub min_duration_s: f64,
    /// Drop bad clips (with a count) instead of refusing to start.
    #[arg(long)]
    pub skip_bad: bool,
    /// Characters removed from transcripts.
    #[arg(long, default_value = ",?.!-;:\"“%‘”�")]
    pub chars_to_ignore: String,
    /// Letter case of the transcripts (asr): auto (fold them to the model vocabulary's case
    /// when it has one case, else keep), keep, lower or upper.
    #[arg(long, default_value = "auto", value_name = "CASE")]
    pub text_case: String,
    /// Keywords for kws (comma-separated; others become _unknown_).
    #[arg(long, default_value = "yes,no,up,down,left,right,on,off,stop,go")]
    pub words: String,
    /// Random gain in +-dB.
    #[arg(long, default_value_t = 0.0)]
    pub gain_db: f64,
    /// Folder of noise recordings to mix in.
    #[arg(long)]
    pub noise_dir: Option<PathBuf>,
    /// SNR of added noise (dB).
    #[arg(long, default_value_t = 10.0)]
    pub snr_db: f64,
    /// Share of clips that get noise.
    #[arg(long, default_value_t = 0.5)]
    pub noise_prob: f64,
    /// Speed perturbation factors, comma-separated (e.g. 0.9,1.0,1.1).
    #[arg(long)]
    pub speeds: Option<String>,
    /// Evaluate every N steps (0 = once per epoch).
    #[arg(long, default_value_t = 0)]
    pub eval_every: usize,
    /// Early stopping: evaluations without improvement before stopping (0 = off).
    #[arg(long, default_value_t = 0)]
    pub patience: usize,
    /// Stop after this many non-finite steps in a row.
    #[arg(long, default_value_t = 5)]
    pub max_nonfinite: usize,
    /// CTC reduction: mean or sum.
    #[arg(long, default_value = "mean")]
    pub ctc_reduction: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Device: cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Log the training loss every N steps.
    #[arg(long, default_value_t = 10)]
    pub log_every: usize,
    /// Resume from OUT/checkpoint-last (exactly: same weights as an uninterrupted run).
    #[arg(long)]
    pub resume: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Print the outcome as one JSON object (steps, best dev and test metrics, counts) instead
    /// of the summary.
    #[arg(long)]
    pub json: bool,
    /// Stop after N steps as if killed (testing resume).
    #[arg(long, hide = true)]
    pub stop_after: Option<usize>,
}

pub fn train(a: TrainArgs) -> anyhow::Result<()> {
    let task: Task = a.task.parse()?;
    let mut cfg = TrainConfig::new(task, a.model, a.data, a.out);
    cfg.dev = a.dev;
    cfg.from_scratch = a.from_scratch;
    cfg.norm = a.norm;
    cfg.kl_sites = a.kl_sites;
    cfg.kl_beta = a.kl_beta;
    cfg.kl_warmup_steps = a.kl_warmup_steps;
    cfg.kl_prior = a.kl_prior;
    cfg.vib = a.vib;
    cfg.kl_sigma0 = a.kl_sigma0;
    cfg.epochs = a.epochs;
    cfg.steps = a.steps;
    cfg.batch_size = a.batch_size;
    cfg.grad_accum = a.grad_accum;
    cfg.lr = a.lr;
    cfg.weight_decay = a.weight_decay;
    cfg.warmup_ratio = a.warmup_ratio;
    cfg.schedule = a.schedule;
    cfg.max_grad_norm = a.max_grad_norm;
    cfg.freeze_feature_encoder = !a.train_feature_encoder;
    cfg.freeze_encoder = a.freeze_encoder;
    cfg.layerdrop = a.layerdrop;
    cfg.hidden_dropout = a.hidden_dropout;
    cfg.spec_augment = !a.no_spec_augment;
    cfg.mask_time_prob = a.mask_time_prob;
    cfg.label_smoothing = a.label_smoothing;
    cfg.class_balanced = a.class_balanced;
    cfg.crop_s = a.crop_s;
    cfg.max_duration_s = a.max_duration_s;
    cfg.feature_cache_mib = a.feature_cache_mib;
    cfg.min_duration_s = a.min_duration_s;
    cfg.skip_bad = a.skip_bad;
    cfg.chars_to_ignore = a.chars_to_ignore;
    cfg.text_case = a.text_case.parse().context("--text-case")?;
    cfg.words = a.words.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
    let speeds = match a.speeds {
        Some(s) => s.split(',').map(|v| v.trim().parse::<f64>()).collect::<Result<Vec<_>, _>>().context("--speeds: comma-separated numbers")?,
        None => vec![],
    };
    cfg.augment = AugmentConfig { gain_db: a.gain_db, noise_dir: a.noise_dir, snr_db: a.snr_db, noise_prob: a.noise_prob, speeds };
    cfg.eval_every = a.eval_every;
    cfg.patience = a.patience;
    cfg.max_nonfinite = a.max_nonfinite;
    cfg.ctc_reduction = a.ctc_reduction;
    cfg.seed = a.seed;
    cfg.device = a.device;
    cfg.log_every = a.log_every;
    cfg.quiet = a.quiet;
    cfg.stop_after = a.stop_after;
    let out_dir = cfg.out.clone();
    let out = train::train(&cfg, a.resume)?;
    if a.json {
        println!("{}", serde_json::to_string(&out)?);
    } else {
        print_outcome(&out, &out_dir);
    }
    Ok(())
}

/// The end of `klspeech train` for a person: what was trained, the best dev evaluation and
/// the test split's, and anything that was skipped or dropped (`--json` has every field).
fn print_outcome(o: &train::TrainOutcome, out: &std::path::Path) {
    let steps = format!("{} step{}", o.steps, if o.steps == 1 { "" } else { "s" });
    match &o.best {
        Some(best) => {
            println!("trained {steps}; best dev evaluation at step {}, saved to {}", o.best_step, out.display());
            print_eval("dev", best, false);
        }
        None => println!("trained {steps}; no dev evaluation, last weights saved to {}", out.display()),
    }
    if let Some(test) = &o.test {
        print_eval("test", test, true);
    }
    if let Some(loss) = o.last_loss {
        println!("last training loss {loss:.4}");
    }
    if o.stopped_early {
        println!("stopped early: no dev improvement in --patience evaluations");
    }
    if o.nonfinite_skipped > 0 {
        println!("{} steps skipped for a non-finite loss or gradient", o.nonfinite_skipped);
    }
    if o.dropped_bad > 0 {
        println!("{} bad clips dropped (--skip-bad)", o.dropped_bad);
    }
    if o.feature_cache_clips > 0 || o.feature_cache_hits != (0, 0) {
        let (tr, dev) = o.feature_cache_hits;
        println!("feature cache: {} clips, {:.1} MiB; batches served from it: {tr} training, {dev} dev", o.feature_cache_clips, o.feature_cache_mib);
    }
}

/// One evaluation as lines of text: `name`, clip count, accuracy and macro-F1 (with the
/// confusion matrix when `confusion`) or CER and WER.
fn print_eval(name: &str, r: &train::EvalResult, confusion: bool) {
    if let (Some(acc), Some(f1)) = (r.accuracy, r.macro_f1) {
        println!("{name:<5} {:>5} clips   accuracy {acc:.4}   macro-F1 {f1:.4}", r.n);
        if let (true, Some(c), Some(l)) = (confusion, &r.confusion, &r.labels) {
            print_confusion(c, l);
        }
    }
    if let (Some(cer), Some(wer)) = (r.cer, r.wer) {
        println!("{name:<5} {:>5} clips   CER {cer:.4}   WER {wer:.4}", r.n);
    }
}

/// A confusion matrix, rows truth and columns prediction, under the labels' names.
fn print_confusion(c: &[Vec<usize>], labels: &[String]) {
    println!("confusion (rows: truth, columns: prediction; {})", labels.join(" "));
    for row in c {
        println!("  {}", row.iter().map(|v| format!("{v:4}")).collect::<String>());
    }
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Fine-tuned model folder.
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Data: Speech Commands folder (its test split, or every clip of a test-set layout),
    /// or a manifest / LibriSpeech folder.
    #[arg(long, value_name = "PATH")]
    pub data: PathBuf,
    /// One JSON object with the metrics.
    #[arg(long)]
    pub json: bool,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Characters removed from reference transcripts.
    #[arg(long, default_value = ",?.!-;:\"“%‘”�")]
    pub chars_to_ignore: String,
    /// Letter case of the reference transcripts: auto (the model vocabulary's case when it has
    /// one, as training folds them), keep, lower or upper.
    #[arg(long, default_value = "auto", value_name = "CASE")]
    pub text_case: String,
    /// Device: cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[command(flatten)]
    pub decode: super::DecodeArgs,
}

pub fn eval(a: EvalArgs) -> anyhow::Result<()> {
    let text_case: data::TextCase = a.text_case.parse().context("--text-case")?;
    let decoder = a.decode.decoder()?;
    let model = SpeechModel::load(&a.model, &LoadOptions { device: parse_device(&a.device)?, ..Default::default() })
        .context("loading the model")?;
    let result = match model.head_kind {
        klspeech::model::HeadKind::Classification => {
            let labels = model.config.labels();
            let ds = if a.data.is_dir() {
                let opts = data::KwsOptions {
                    words: labels.iter().filter(|l| !l.starts_with('_')).cloned().collect(),
                    ..Default::default()
                };
                data::open_kws(&a.data, &opts)?.test
            } else {
                data::classification_manifest_with_labels(&a.data, Some(&labels))?
            };
            let clips = ds.load_all_16k()?;
            let y: Vec<usize> = ds.examples.iter().map(|e| e.label.unwrap_or(0)).collect();
            if decoder.is_some() {
                anyhow::bail!("--lm and --beam-width decode CTC transcripts; {} is a classifier", a.model.display());
            }
            train::evaluate(&model, &clips, Some(&y), None, None, a.batch_size)?
        }
        klspeech::model::HeadKind::Ctc => {
            let vocab_map = model.vocab.clone().context("the model folder has no vocab.json")?;
            let vocab = CharVocab::from_map(&vocab_map, &a.model.join("vocab.json"))?;
            let ds = if a.data.is_dir() { data::librispeech(&a.data)? } else { data::asr_manifest(&a.data)? };
            let clips = ds.load_all_16k()?;
            let case = text_case.resolve(Some(&vocab_map));
            let texts: Vec<String> = ds.examples.iter().map(|e| data::normalize_transcript(e.text.as_deref().unwrap_or(""), &a.chars_to_ignore, case)).collect();
            match &decoder {
                Some(d) => train::evaluate_decoded(&model, &clips, &texts, &vocab, a.batch_size, d)?,
                None => train::evaluate(&model, &clips, None, Some(&texts), Some(&vocab), a.batch_size)?,
            }
        }
        klspeech::model::HeadKind::None => anyhow::bail!("{}: a bare encoder has nothing to evaluate; fine-tune it first", a.model.display()),
    };
    if a.json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        println!("clips      {}", result.n);
        if let (Some(acc), Some(f1)) = (result.accuracy, result.macro_f1) {
            println!("accuracy   {acc:.4}\nmacro-F1   {f1:.4}");
            if let (Some(c), Some(l)) = (&result.confusion, &result.labels) {
                print_confusion(c, l);
            }
        }
        if let (Some(cer), Some(wer)) = (result.cer, result.wer) {
            println!("CER        {cer:.4}\nWER        {wer:.4}");
        }
    }
    Ok(())
}
