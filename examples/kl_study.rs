//! The KL-Norm study behind `docs/RESULTS.md`: every variant (LayerNorm, KL-Norm at its default,
//! KL-Norm ablations of sites, beta and prior, higher dropout, VIB on the pooled representation)
//! fine-tuned from the bundled model with several seeds (sites = all is not a row: with the
//! feature encoder frozen, as in every run here, it computes exactly sites = encoder), on the bundled keyword set (in-domain,
//! out-of-domain and noisy accuracy) and ASR set (CER/WER in-domain and out-of-domain).
//!
//!     cargo run --release --example kl_study -- --seeds 5            # every run, then the table
//!     cargo run --release --example kl_study -- --report             # the table from what is done
//!
//! `tools/kl_study.sh` runs two single-threaded workers side by side (on 2 cores that is twice
//! the throughput of one two-threaded run) and then the report. Each run writes
//! `OUT/<variant>/seed<k>/result.json`; runs already done are skipped and a worker claims a run
//! by creating its folder, so workers can be started, stopped and restarted at will. The report
//! writes `OUT/table.md` (mean ± sample standard deviation over seeds) and mean training curves
//! as PNG.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use klspeech::model::{LoadOptions, SpeechModel};
use klspeech::plot::{line_chart_png, Series};
use klspeech::train::{evaluate_asr_manifest, evaluate_kws_folder, train, Task, TrainConfig};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "models/klspeech-small")]
    model: PathBuf,
    /// Keyword data (as examples/keyword_spotting.rs).
    #[arg(long, default_value = "audio_fixtures/kws")]
    kws: PathBuf,
    /// ASR data (as examples/low_resource_asr.rs).
    #[arg(long, default_value = "audio_fixtures/asr")]
    asr: PathBuf,
    #[arg(long, default_value = "runs/kl_study")]
    out: PathBuf,
    /// Seeds 0..N for every variant.
    #[arg(long, default_value_t = 5)]
    seeds: u64,
    /// Only these variants (comma-separated names; default: all).
    #[arg(long)]
    variants: Option<String>,
    /// Keyword-spotting epochs (examples/keyword_spotting.rs's default).
    #[arg(long, default_value_t = 8)]
    kws_epochs: usize,
    /// ASR epochs (examples/low_resource_asr.rs's default).
    #[arg(long, default_value_t = 6)]
    asr_epochs: usize,
    /// Only aggregate finished runs into the table and curves.
    #[arg(long)]
    report: bool,
    /// List the variants and exit.
    #[arg(long)]
    list: bool,
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// One row of the study: a task and the settings that differ from the examples' baseline.
struct Variant {
    name: &'static str,
    task: Task,
    what: &'static str,
    apply: fn(&mut TrainConfig),
}

/// `kl` is the study's reference KL-Norm (the defaults when it ran: sites encoder, beta 1e-3,
/// standard prior, sigma0 1e-2, 100 warm-up steps, pinned in [`config`] so the table stays
/// reproducible whatever the defaults become); every ablation changes one knob.
fn variants() -> Vec<Variant> {
    vec![
        Variant { name: "layer", task: Task::Kws, what: "LayerNorm (plain fine-tuning)", apply: |c| c.norm = "layer".into() },
        Variant { name: "kl", task: Task::Kws, what: "KL-Norm: sites encoder, beta 1e-3, standard prior", apply: |c| c.norm = "kl".into() },
        Variant { name: "kl-sites-last1", task: Task::Kws, what: "KL-Norm, sites = last:1", apply: |c| {
            c.norm = "kl".into();
            c.kl_sites = "last:1".into();
        } },
        Variant { name: "kl-beta-1e-2", task: Task::Kws, what: "KL-Norm, beta 1e-2", apply: |c| {
            c.norm = "kl".into();
            c.kl_beta = 1e-2;
        } },
        Variant { name: "kl-beta-1e-4", task: Task::Kws, what: "KL-Norm, beta 1e-4", apply: |c| {
            c.norm = "kl".into();
            c.kl_beta = 1e-4;
        } },
        Variant { name: "kl-prior-learned", task: Task::Kws, what: "KL-Norm, learned prior", apply: |c| {
            c.norm = "kl".into();
            c.kl_prior = "learned".into();
        } },
        Variant { name: "dropout-0.2", task: Task::Kws, what: "LayerNorm, hidden dropout 0.2 (checkpoint: 0.1)", apply: |c| {
            c.norm = "layer".into();
            c.hidden_dropout = Some(0.2);
        } },
        Variant { name: "vib", task: Task::Kws, what: "LayerNorm + VIB on the pooled representation", apply: |c| {
            c.norm = "layer".into();
            c.vib = true;
        } },
        Variant { name: "asr-layer", task: Task::Asr, what: "LayerNorm (plain fine-tuning)", apply: |c| c.norm = "layer".into() },
        Variant { name: "asr-kl", task: Task::Asr, what: "KL-Norm: sites encoder, beta 1e-3, standard prior", apply: |c| c.norm = "kl".into() },
    ]
}

/// The run's configuration: the examples' settings, then the variant's change.
fn config(a: &Args, v: &Variant, seed: u64, out: &Path) -> TrainConfig {
    let mut c = match v.task {
        Task::Asr => {
            let mut c = TrainConfig::new(Task::Asr, a.model.clone(), a.asr.join("train.csv"), out.to_path_buf());
            c.dev = Some(a.asr.join("dev.csv"));
            c.epochs = a.asr_epochs;
            c.batch_size = 8;
            c.lr = 3e-4;
            c.chars_to_ignore.push('\'');
            c
        }
        _ => {
            let mut c = TrainConfig::new(Task::Kws, a.model.clone(), a.kws.join("train"), out.to_path_buf());
            c.epochs = a.kws_epochs;
            c.batch_size = 16;
            c.lr = 5e-4;
            c
        }
    };
    c.seed = seed;
    c.device = a.device.clone();
    c.quiet = true;
    // The reference KL-Norm settings (also the VIB's beta and sigma0).
    c.kl_sites = "encoder".into();
    c.kl_beta = 1e-3;
    c.kl_prior = "standard".into();
    c.kl_sigma0 = 1e-2;
    c.kl_warmup_steps = 100;
    (v.apply)(&mut c);
    c
}

/// Trains one run and evaluates it on every test set; returns the metrics.
fn run_one(a: &Args, v: &Variant, seed: u64, out: &Path) -> anyhow::Result<serde_json::Value> {
    let c = config(a, v, seed, out);
    let t0 = Instant::now();
    let o = train(&c, false).with_context(|| format!("training into {}", out.display()))?;
    let train_s = t0.elapsed().as_secs_f64();
    let model = SpeechModel::load(out, &LoadOptions { device: klspeech::device::parse_device(&a.device)?, ..Default::default() })?;
    let mut m = serde_json::Map::new();
    m.insert("variant".into(), v.name.into());
    m.insert("seed".into(), seed.into());
    m.insert("train_s".into(), train_s.into());
    match v.task {
        Task::Asr => {
            for (set, key) in [("test.csv", ""), ("test-ood.csv", "ood_")] {
                let e = evaluate_asr_manifest(&model, &a.asr.join(set), &c.chars_to_ignore, c.text_case, 16, None)?;
                m.insert(format!("{key}cer"), e.cer.unwrap_or(f64::NAN).into());
                m.insert(format!("{key}wer"), e.wer.unwrap_or(f64::NAN).into());
            }
        }
        _ => {
            m.insert("in_domain".into(), o.test.as_ref().and_then(|t| t.accuracy).unwrap_or(f64::NAN).into());
            for (set, key) in [("test-ood", "out_of_domain"), ("test-noisy", "noisy")] {
                let acc = evaluate_kws_folder(&model, &a.kws.join(set), 32)?.accuracy.unwrap_or(f64::NAN);
                m.insert(key.into(), acc.into());
            }
        }
    }
    Ok(serde_json::Value::Object(m))
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    klspeech::device::tune_cpu_runtime();
    let all = variants();
    let chosen: Vec<&Variant> = match &a.variants {
        None => all.iter().collect(),
        Some(list) => {
            let names: Vec<&str> = list.split(',').map(str::trim).collect();
            if let Some(bad) = names.iter().find(|n| !all.iter().any(|v| v.name == **n)) {
                anyhow::bail!("unknown variant `{bad}`; run with --list to see them");
            }
            all.iter().filter(|v| names.contains(&v.name)).collect()
        }
    };
    if a.list {
        for v in &chosen {
            println!("{:<18} {:?}  {}", v.name, v.task, v.what);
        }
        return Ok(());
    }
    if !a.report {
        // Seed-major order: an interrupted study still has every variant at equal seed counts.
        for seed in 0..a.seeds {
            for v in &chosen {
                let dir = a.out.join(v.name).join(format!("seed{seed}"));
                std::fs::create_dir_all(dir.parent().expect("has a parent"))?;
                // Claim the run: creating the folder fails if another worker has it.
                if std::fs::create_dir(&dir).is_err() {
                    continue;
                }
                eprintln!("== {} seed {seed}", v.name);
                match run_one(&a, v, seed, &dir.join("model")) {
                    Ok(r) => {
                        eprintln!("   {r}");
                        std::fs::write(dir.join("result.json"), serde_json::to_string_pretty(&r)? + "\n")?;
                    }
                    // Keep going with the other runs; the report counts seeds per variant.
                    Err(e) => {
                        eprintln!("   FAILED: {e:#}");
                        std::fs::write(dir.join("error.txt"), format!("{e:#}\n"))?;
                    }
                }
            }
        }
    }
    report(&a, &chosen)
}

/// Mean and sample standard deviation.
fn mean_sd(x: &[f64]) -> (f64, f64) {
    let n = x.len() as f64;
    let m = x.iter().sum::<f64>() / n;
    let sd = if x.len() > 1 { (x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (n - 1.0)).sqrt() } else { f64::NAN };
    (m, sd)
}

/// (x, y) points of one curve.
type Curve = Vec<(f64, f64)>;

/// Reads `metrics.jsonl` of one run: (step, train task loss) and (step, dev metric).
fn curves(path: &Path, task: Task) -> anyhow::Result<(Curve, Curve)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let (mut loss, mut dev) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let step = v["step"].as_f64().unwrap_or(f64::NAN);
        if let Some(l) = v["task_loss"].as_f64() {
            loss.push((step, l));
        }
        let key = if task == Task::Asr { "cer" } else { "accuracy" };
        if let Some(d) = v["dev"][key].as_f64() {
            dev.push((step, d));
        }
    }
    Ok((loss, dev))
}

/// Point-wise mean over runs of curves logged at the same steps.
fn mean_curve(runs: &[Vec<(f64, f64)>]) -> Vec<(f64, f64)> {
    let mut by_step: BTreeMap<i64, Vec<f64>> = BTreeMap::new();
    for r in runs {
        for &(s, y) in r {
            by_step.entry(s as i64).or_default().push(y);
        }
    }
    by_step.into_iter().filter(|(_, v)| v.len() == runs.len()).map(|(s, v)| (s as f64, v.iter().sum::<f64>() / v.len() as f64)).collect()
}

fn report(a: &Args, chosen: &[&Variant]) -> anyhow::Result<()> {
    let mut md = String::new();
    for task in [Task::Kws, Task::Asr] {
        let (cols, title): (&[(&str, &str)], &str) = match task {
            Task::Asr => (
                &[("cer", "CER in-domain"), ("wer", "WER in-domain"), ("ood_cer", "CER flite"), ("ood_wer", "WER flite")],
                "Low-resource ASR (%, lower is better)",
            ),
            _ => (
                &[("in_domain", "in-domain"), ("out_of_domain", "out-of-domain (flite)"), ("noisy", "noisy (10 dB)")],
                "Keyword spotting, test accuracy (%, higher is better)",
            ),
        };
        let vs: Vec<&&Variant> = chosen.iter().filter(|v| v.task == task).collect();
        if vs.is_empty() {
            continue;
        }
        md += &format!("### {title}\n\n| variant | what | seeds |");
        for (_, h) in cols {
            md += &format!(" {h} |");
        }
        md += " train time (s) |\n|---|---|---|";
        md += &"---|".repeat(cols.len() + 1);
        md += "\n";
        let (mut loss_series, mut dev_series) = (Vec::new(), Vec::new());
        for v in vs {
            let mut results = Vec::new();
            let (mut losses, mut devs) = (Vec::new(), Vec::new());
            for seed in 0..a.seeds {
                let dir = a.out.join(v.name).join(format!("seed{seed}"));
                let Ok(text) = std::fs::read_to_string(dir.join("result.json")) else { continue };
                results.push(serde_json::from_str::<serde_json::Value>(&text)?);
                let (l, d) = curves(&dir.join("model").join("metrics.jsonl"), task)?;
                losses.push(l);
                devs.push(d);
            }
            if results.is_empty() {
                continue;
            }
            md += &format!("| `{}` | {} | {} |", v.name, v.what, results.len());
            for (k, _) in cols {
                let x: Vec<f64> = results.iter().filter_map(|r| r[*k].as_f64()).map(|x| 100.0 * x).collect();
                let (m, sd) = mean_sd(&x);
                md += &format!(" {m:.1} ± {sd:.1} |");
            }
            let t: Vec<f64> = results.iter().filter_map(|r| r["train_s"].as_f64()).collect();
            md += &format!(" {:.0} |\n", mean_sd(&t).0);
            loss_series.push((v.name, mean_curve(&losses)));
            dev_series.push((v.name, mean_curve(&devs)));
        }
        md += "\n";
        // Paired by seed against the LayerNorm baseline: same seed = same head initialization,
        // batch order and SpecAugment draws, so the seed-to-seed spread largely cancels.
        let base = if task == Task::Asr { "asr-layer" } else { "layer" };
        let load = |name: &str, seed: u64| -> Option<serde_json::Value> {
            let text = std::fs::read_to_string(a.out.join(name).join(format!("seed{seed}")).join("result.json")).ok()?;
            serde_json::from_str(&text).ok()
        };
        md += &format!("Difference to `{base}`, paired by seed (percentage points, mean ± sd):\n\n| variant | pairs |");
        for (_, h) in cols {
            md += &format!(" Δ {h} |");
        }
        md += "\n|---|---|";
        md += &"---|".repeat(cols.len());
        md += "\n";
        for v in chosen.iter().filter(|v| v.task == task && v.name != base) {
            let pairs: Vec<(serde_json::Value, serde_json::Value)> =
                (0..a.seeds).filter_map(|s| Some((load(v.name, s)?, load(base, s)?))).collect();
            if pairs.is_empty() {
                continue;
            }
            md += &format!("| `{}` | {} |", v.name, pairs.len());
            for (k, _) in cols {
                let d: Vec<f64> = pairs.iter().filter_map(|(x, y)| Some(100.0 * (x[*k].as_f64()? - y[*k].as_f64()?))).collect();
                let (m, sd) = mean_sd(&d);
                md += &format!(" {m:+.1} ± {sd:.1} |");
            }
            md += "\n";
        }
        md += "\n";
        let tag = if task == Task::Asr { "asr" } else { "kws" };
        if loss_series.is_empty() {
            continue;
        }
        let s: Vec<Series> = loss_series.iter().map(|(n, p)| Series { name: n, points: p }).collect();
        line_chart_png(&a.out.join(format!("{tag}_train_loss.png")), &s, "step", "task loss", &format!("{tag}: training task loss, mean over seeds"))?;
        let s: Vec<Series> = dev_series.iter().map(|(n, p)| Series { name: n, points: p }).collect();
        let metric = if task == Task::Asr { "dev CER" } else { "dev accuracy" };
        line_chart_png(&a.out.join(format!("{tag}_dev.png")), &s, "step", metric, &format!("{tag}: {metric}, mean over seeds"))?;
    }
    std::fs::write(a.out.join("table.md"), &md)?;
    print!("{md}");
    eprintln!("table: {}  curves: {}/*.png", a.out.join("table.md").display(), a.out.display());
    Ok(())
}
