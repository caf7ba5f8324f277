//! `klspeech embed`, `klspeech predict`, `klspeech inspect-model`.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use klspeech::device::parse_device;
use klspeech::infer::{self, Chunking, LayerChoice, PredictOptions, Prediction, Timestamps};
use klspeech::model::{HeadKind, KlSites, LoadOptions, SpeechModel, Wav2Vec2Config};
use klspeech::vocab::CharVocab;

#[derive(Debug, Args)]
pub struct EmbedArgs {
    /// Model folder (Hugging Face layout: config.json, model.safetensors, ...).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Which hidden state: `last` (the encoder output), a number N (hidden_states[N], 0 = input
    /// of the first transformer layer), or `all` (stacked as [layers+1, frames, hidden]).
    #[arg(long, default_value = "last")]
    pub layer: String,
    /// Output safetensors file: one tensor per input, keyed by the path exactly as given.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Device: cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Audio files.
    #[arg(required = true)]
    pub audio: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct PredictArgs {
    /// Model folder with a classification or CTC head.
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// One JSON object per line: {"path", "label", "scores"} or {"path", "text"} (with
    /// --timestamps also "chunks": [{"text", "timestamp": [START, END]}], as transformers' pipeline).
    #[arg(long)]
    pub json: bool,
    /// CTC: the time of every word or character of the transcript, in seconds (transformers'
    /// ASR pipeline `return_timestamps`): word or char.
    #[arg(long, value_name = "LEVEL", value_parser = ["char", "word"])]
    pub timestamps: Option<String>,
    #[command(flatten)]
    pub decode: super::DecodeArgs,
    /// With --lm, --beam-width or --hotwords: the best K hypotheses with their scores
    /// ("n_best" with --json: {"text", "acoustic_score", "lm_score", "score"}).
    #[arg(long, value_name = "K")]
    pub n_best: Option<usize>,
    /// Device: cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// CTC: transcribe in overlapping chunks of this many seconds, for long recordings
    /// (transformers' ASR pipeline `chunk_length_s`; attention then costs chunk², not length²).
    #[arg(long, value_name = "SECONDS")]
    pub chunk_s: Option<f64>,
    /// With --chunk-s: context on each side of a chunk whose output is dropped (`stride_length_s`):
    /// SECONDS for both sides or LEFT,RIGHT [default: chunk / 6].
    #[arg(long, value_name = "SECONDS")]
    pub stride_s: Option<String>,
    /// With --chunk-s: chunks per forward pass (equal-length chunks batch without padding, so
    /// the transcript does not change; larger is faster on a GPU and takes more memory).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub batch_size: usize,
    /// Audio files.
    #[arg(required = true)]
    pub audio: Vec<PathBuf>,
}

/// `--chunk-s` / `--stride-s` as a [`Chunking`], or None without `--chunk-s`.
fn chunking(chunk_s: Option<f64>, stride_s: Option<&str>) -> anyhow::Result<Option<Chunking>> {
    let stride = match stride_s {
        None => None,
        Some(s) => {
            let parse = |v: &str| v.trim().parse::<f64>().map_err(|_| anyhow::anyhow!("--stride-s `{s}`: expected SECONDS or LEFT,RIGHT"));
            Some(match s.split_once(',') {
                Some((l, r)) => (parse(l)?, parse(r)?),
                None => (parse(s)?, parse(s)?),
            })
        }
    };
    match chunk_s {
        Some(c) => Ok(Some(Chunking::new(c, stride)?)),
        None if stride.is_some() => bail!("--stride-s needs --chunk-s (the chunk length it applies to)"),
        None => Ok(None),
    }
}

#[derive(Debug, Args)]
pub struct InspectModelArgs {
    /// Model folder; config.json is enough (without model.safetensors, parameters are counted
    /// on a randomly initialized model of that config).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// KL-Norm sites to count the added parameters for: none, encoder, all, last:K.
    #[arg(long, default_value = "encoder")]
    pub kl_sites: String,
}

fn load(dir: &std::path::Path, device: &str) -> anyhow::Result<SpeechModel> {
    let opts = LoadOptions { device: parse_device(device)?, ..Default::default() };
    SpeechModel::load(dir, &opts).context("loading the model")
}

pub fn embed(a: EmbedArgs) -> anyhow::Result<()> {
    let layer: LayerChoice = a.layer.parse()?;
    let model = load(&a.model, &a.device)?;
    let mut out = HashMap::new();
    for p in &a.audio {
        let key = p.to_string_lossy().to_string();
        if out.contains_key(&key) {
            bail!("{key} is given twice");
        }
        let t = infer::embed_file(&model, p, layer)?.to_device(&candle_core::Device::Cpu)?;
        eprintln!("{key}: {:?}", t.dims());
        out.insert(key, t);
    }
    let tmp = a.out.with_extension("safetensors.tmp");
    candle_core::safetensors::save(&out, &tmp).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &a.out).with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!("wrote {} embedding(s) to {}", out.len(), a.out.display());
    Ok(())
}

pub fn predict(a: PredictArgs) -> anyhow::Result<()> {
    let chunks = chunking(a.chunk_s, a.stride_s.as_deref())?;
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let timestamps = a.timestamps.as_deref().map(str::parse::<Timestamps>).transpose()?;
    let decoder = a.decode.decoder()?;
    match a.n_best {
        Some(0) => bail!("--n-best must be at least 1"),
        Some(_) if decoder.is_none() => bail!("--n-best lists a beam search's hypotheses: add --lm FILE.arpa or --beam-width N"),
        _ => {}
    }
    let opts = PredictOptions { chunking: chunks, batch: a.batch_size, timestamps, decoder, n_best: a.n_best.unwrap_or(1) };
    let model = load(&a.model, &a.device)?;
    let vocab = match &model.vocab {
        Some(map) => Some(CharVocab::from_map(map, &a.model.join("vocab.json"))?),
        None => None,
    };
    if let (Some(d), Some(v)) = (&opts.decoder, &vocab) {
        d.check_vocabulary(v)?;
    }
    let mut failures = 0;
    for p in &a.audio {
        let pred = match infer::predict_file(&model, p, vocab.as_ref(), &opts) {
            Ok(x) => x,
            Err(e @ klspeech::Error::Unsupported { .. }) => return Err(e.into()),
            Err(e) => {
                eprintln!("error: {e}");
                failures += 1;
                continue;
            }
        };
        let path = p.to_string_lossy();
        match (&pred, a.json) {
            (Prediction::Label { label, scores, .. }, true) => {
                let scores: serde_json::Map<String, serde_json::Value> =
                    scores.iter().map(|(l, v)| (l.clone(), serde_json::json!(v))).collect();
                println!("{}", serde_json::json!({ "path": path, "label": label, "scores": scores }));
            }
            (Prediction::Label { label, probability, .. }, false) => println!("{path}\t{label}\t{probability:.4}"),
            (Prediction::Text { text, timestamps, hypotheses }, true) => {
                let mut o = serde_json::json!({ "path": path, "text": text });
                if a.n_best.is_some() {
                    let n: Vec<serde_json::Value> = hypotheses
                        .iter()
                        .map(|h| serde_json::json!({ "text": h.text, "acoustic_score": h.acoustic, "lm_score": h.lm, "score": h.score }))
                        .collect();
                    o["n_best"] = n.into();
                }
                if opts.timestamps.is_some() {
                    let chunks: Vec<serde_json::Value> =
                        timestamps.iter().map(|t| serde_json::json!({ "text": t.text, "timestamp": [t.start_s, t.end_s] })).collect();
                    o["chunks"] = chunks.into();
                }
                println!("{o}");
            }
            (Prediction::Text { text, timestamps, hypotheses }, false) => {
                println!("{path}\t{text}");
                // --n-best: "  rank  score  text" per hypothesis.
                if a.n_best.is_some() {
                    for (i, h) in hypotheses.iter().enumerate() {
                        println!("  {:>3} {:>11.3}  {}", i + 1, h.score, h.text);
                    }
                }
                // One line per word or character: start and end in seconds, then the text
                // (a space shows as `' '`).
                for t in timestamps {
                    let shown = if t.text == " " { "' '" } else { t.text.as_str() };
                    println!("  {:>9.3} {:>9.3}  {shown}", t.start_s, t.end_s);
                }
            }
        }
    }
    if failures > 0 {
        bail!("{failures} of {} file(s) failed", a.audio.len());
    }
    Ok(())
}

pub fn inspect_model(a: InspectModelArgs) -> anyhow::Result<()> {
    let sites: KlSites = a.kl_sites.parse()?;
    let cfg_path = a.model.join("config.json");
    let cfg = Wav2Vec2Config::from_file(&cfg_path)?;
    let has_weights = a.model.join("model.safetensors").exists();
    let opts = LoadOptions { kl_sites: sites, ..Default::default() };
    let model = if has_weights {
        SpeechModel::load(&a.model, &opts)?
    } else {
        SpeechModel::fresh(cfg.clone(), &LoadOptions { head: Some(HeadKind::from_config(&cfg)), ..opts })?
    };
    let variant = if cfg.do_stable_layer_norm { "pre-norm (stable layer norm; large-lv60 / XLS-R style)" } else { "post-norm (wav2vec2-base style)" };
    let rf = cfg.receptive_field();
    let hop: usize = cfg.conv_stride.iter().product();
    let rate = model.feature_extractor.config.sampling_rate;
    println!("{}", a.model.display());
    println!("  variant          {variant}");
    println!("  head             {} ({})", model.head_kind.architecture(), match model.head_kind {
        HeadKind::Ctc => format!("vocabulary {}", cfg.vocab_size),
        HeadKind::Classification => format!("{} labels: {}", cfg.num_labels(), cfg.labels().join(", ")),
        HeadKind::None => "no head".into(),
    });
    println!("  weights          {}", if has_weights { "model.safetensors" } else { "none (counted on a random initialization)" });
    println!("  transformer      {} layers, hidden {}, {} heads, feed-forward {}, {}", cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, cfg.hidden_act);
    println!("  feature encoder  {} conv layers {:?} kernels {:?} strides {:?}, {} norm", cfg.conv_dim.len(), cfg.conv_dim, cfg.conv_kernel, cfg.conv_stride, cfg.feat_extract_norm);
    println!("  frames           one per {hop} samples ({:.1} ms at {rate} Hz), receptive field {rf} samples", 1000.0 * hop as f64 / rate as f64);
    println!("  positional conv  kernel {}, {} groups", cfg.num_conv_pos_embeddings, cfg.num_conv_pos_embedding_groups);
    let total = model.num_parameters();
    let kl = model.num_kl_parameters();
    let fe = model.store.count(|k| k.starts_with("feature_extractor."));
    let head = model.store.count(|k| klspeech::model::params::HEAD_KEYS.iter().any(|h| k.starts_with(h)));
    println!("  parameters       {} total: feature encoder {}, transformer {}, head {}", total - kl, fe, total - kl - fe - head, head);
    let sites_list = model.encoder.norm_sites();
    println!("  norm sites       {} ({} KL-Norm with --kl-sites {sites})", sites_list.len(), sites_list.iter().filter(|(_, k)| *k).count());
    for (name, is_kl) in &sites_list {
        println!("    {:<48} {}", name, if *is_kl { "KL-Norm" } else { "plain" });
    }
    println!("  KL-Norm adds     {kl} parameters = {:.4}% of the model", 100.0 * kl as f64 / (total - kl) as f64);
    Ok(())
}
