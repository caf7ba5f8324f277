//! Inference throughput of the Wav2Vec2 encoder against PyTorch + transformers, same
//! configuration, same thread count, same run.
//!
//!     cargo bench --bench inference                      # klspeech + PyTorch (if found)
//!     KLSPEECH_PYTHON=.venv/bin/python cargo bench --bench inference
//!
//! Rows: wav2vec2-base (random weights) 1 x 5 s; the tiny configuration of shared/PERF.md,
//! 8 x 1 s. Reports audio-seconds per wall-second and the ratio klspeech / PyTorch.

use std::process::Command;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use klspeech::model::{ForwardCtx, HeadKind, LoadOptions, SpeechModel, Wav2Vec2Config};
use klspeech::rng::Rng;

fn tiny() -> Wav2Vec2Config {
    let mut c = Wav2Vec2Config::default();
    c.hidden_size = 192;
    c.num_hidden_layers = 4;
    c.num_attention_heads = 4;
    c.intermediate_size = 768;
    c.conv_dim = vec![128; 7];
    c.num_conv_pos_embeddings = 64;
    c.num_conv_pos_embedding_groups = 16;
    c
}

fn bench_klspeech(cfg: &Wav2Vec2Config, batch: usize, seconds: f64, iters: usize) -> f64 {
    let model = SpeechModel::fresh(cfg.clone(), &LoadOptions { head: Some(HeadKind::None), ..Default::default() }).unwrap();
    let n = (seconds * 16000.0) as usize;
    let x = Tensor::from_vec(Rng::new(1).normal_vec(batch * n), (batch, n), &Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
    let mut times = Vec::new();
    for i in 0..iters + 2 {
        let t = Instant::now();
        let out = model.forward(&x, None, &mut ForwardCtx::eval()).unwrap();
        let _ = out.encoder.last_hidden_state.sum_all().unwrap().to_scalar::<f32>().unwrap();
        if i >= 2 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    times[times.len() / 2]
}

fn python() -> Option<String> {
    if let Ok(p) = std::env::var("KLSPEECH_PYTHON") {
        return Some(p);
    }
    [".venv/bin/python", "../venv/bin/python", "python3"].iter().find(|p| {
        Command::new(p).args(["-c", "import torch, transformers"]).output().map(|o| o.status.success()).unwrap_or(false)
    }).map(|s| s.to_string())
}

fn bench_pytorch(py: &str, name: &str, batch: usize, seconds: f64, threads: usize, iters: usize) -> Option<f64> {
    let out = Command::new(py)
        .args(["tools/bench_pytorch.py", "--config", name, "--batch", &batch.to_string(), "--seconds", &seconds.to_string(), "--threads", &threads.to_string(), "--iters", &iters.to_string()])
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!("pytorch bench failed: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["median_ms"].as_f64().map(|ms| ms / 1000.0)
}

fn main() {
    let threads = std::env::var("RAYON_NUM_THREADS").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    let py = python();
    println!("threads: {threads}; PyTorch: {}", py.as_deref().unwrap_or("not found (set KLSPEECH_PYTHON)"));
    println!("| workload | klspeech ms | klspeech audio-s/s | PyTorch ms | PyTorch audio-s/s | klspeech / PyTorch throughput |");
    println!("|---|---|---|---|---|---|");
    for (name, cfg, batch, secs, iters) in [("tiny", tiny(), 8usize, 1.0f64, 10usize), ("base", Wav2Vec2Config::default(), 1, 5.0, 5)] {
        let k = bench_klspeech(&cfg, batch, secs, iters);
        let p = py.as_deref().and_then(|py| bench_pytorch(py, name, batch, secs, threads, iters));
        let audio = batch as f64 * secs;
        let (pms, pthr, ratio) = match p {
            Some(p) => (format!("{:.1}", p * 1000.0), format!("{:.1}", audio / p), format!("{:.2}", p / k)),
            None => ("-".into(), "-".into(), "-".into()),
        };
        println!("| {name} inference, {batch} x {secs} s | {:.1} | {:.1} | {pms} | {pthr} | {ratio} |", k * 1000.0, audio / k);
    }
}
