//! CTC fine-tuning of the bundled pretrained model on the bundled low-resource ASR set, with
//! plain LayerNorm and with KL-Norm: CER and WER in-domain (unseen espeak speakers) and
//! out-of-domain (flite voices), decoded greedily and with the bundled word 3-gram (built from
//! the training sentences that no dev or test clip says; `tools/make_arpa.py`).
//!
//!     cargo run --release --example low_resource_asr
//!
//! Metrics, curves and both fine-tuned models go to `--out` (default runs/low_resource_asr).

// The binary's caching allocator (see src/main.rs): 2-4x faster training steps on CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use klspeech::decode::{BeamSearch, LmFusion};
use klspeech::lm::NgramLm;
use klspeech::model::{LoadOptions, SpeechModel};
use klspeech::train::{evaluate_asr_manifest, train, Task, TrainConfig};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "models/klspeech-small")]
    model: PathBuf,
    /// Folder with train.csv, dev.csv, test.csv, test-ood.csv.
    #[arg(long, default_value = "audio_fixtures/asr")]
    data: PathBuf,
    #[arg(long, default_value = "runs/low_resource_asr")]
    out: PathBuf,
    /// 6 epochs keep both runs under 10 minutes on 2 cores (4 epochs: 5.6 min).
    #[arg(long, default_value_t = 6)]
    epochs: usize,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[arg(long, default_value_t = 3e-4)]
    lr: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Word language model for the "+ LM" rows (ARPA).
    #[arg(long, default_value = "audio_fixtures/asr/lm/train-unseen-3gram.arpa")]
    lm: PathBuf,
    /// Greedy decoding only (no "+ LM" rows).
    #[arg(long)]
    no_lm: bool,
    /// CPU threads (default: RAYON_NUM_THREADS, else the physical cores).
    #[arg(long)]
    threads: Option<usize>,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    klspeech::device::set_threads(a.threads)?;
    klspeech::device::tune_cpu_runtime();
    let decoder = if a.no_lm {
        None
    } else {
        let lm = NgramLm::from_arpa(&a.lm).context("reading the language model (--no-lm to go without)")?;
        Some(BeamSearch { lm: Some(LmFusion::new(Arc::new(lm))), ..BeamSearch::default() })
    };
    let mut rows = Vec::new();
    for norm in ["layer", "kl"] {
        let out = a.out.join(norm);
        let mut c = TrainConfig::new(Task::Asr, a.model.clone(), a.data.join("train.csv"), out.clone());
        c.dev = Some(a.data.join("dev.csv"));
        c.norm = norm.into();
        c.epochs = a.epochs;
        c.batch_size = a.batch_size;
        c.lr = a.lr;
        c.seed = a.seed;
        c.device = a.device.clone();
        // The bundled model's vocabulary (from its pre-training corpus) has no apostrophe; the
        // data's "you're" becomes "youre" rather than a validation error.
        c.chars_to_ignore.push('\'');
        eprintln!("== fine-tuning with {}", if norm == "kl" { "KL-Norm" } else { "LayerNorm" });
        train(&c, false).with_context(|| format!("training into {}", out.display()))?;
        let model = SpeechModel::load(&out, &LoadOptions { device: klspeech::device::parse_device(&a.device)?, ..Default::default() })?;
        let name = if norm == "kl" { "KL-Norm" } else { "LayerNorm" };
        // Greedy, then (unless --no-lm) the LM's beam search.
        for d in std::iter::once(None).chain(decoder.as_ref().map(Some)) {
            let key = if d.is_some() { format!("{norm}+lm") } else { norm.to_string() };
            let mut r = Vec::new();
            for set in ["test.csv", "test-ood.csv"] {
                let e = evaluate_asr_manifest(&model, &a.data.join(set), &c.chars_to_ignore, c.text_case, 16, d)?;
                r.push((e.cer.unwrap_or(f64::NAN), e.wer.unwrap_or(f64::NAN)));
            }
            let label = if d.is_some() { format!("{name} + 3-gram LM") } else { name.to_string() };
            rows.push((key, label, r));
        }
    }
    println!("\n| normalization | in-domain CER | in-domain WER | out-of-domain CER | out-of-domain WER |");
    println!("|---|---|---|---|---|");
    for (_, name, r) in &rows {
        println!("| {name} | {:.1} % | {:.1} % | {:.1} % | {:.1} % |", 100.0 * r[0].0, 100.0 * r[0].1, 100.0 * r[1].0, 100.0 * r[1].1);
    }
    let json: serde_json::Value = rows
        .iter()
        .map(|(n, _, r)| (n.clone(), serde_json::json!({"cer": r[0].0, "wer": r[0].1, "ood_cer": r[1].0, "ood_wer": r[1].1})))
        .collect::<serde_json::Map<_, _>>()
        .into();
    std::fs::write(a.out.join("results.json"), serde_json::to_string_pretty(&json)? + "\n")?;
    Ok(())
}
