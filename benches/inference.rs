//! Throughput of the Wav2Vec2 encoder against PyTorch + transformers: same configuration,
//! same thread count (CPU) or the same GPU, same run.
//!
//!     cargo bench --bench inference                       # CPU rows
//!     KLSPEECH_PYTHON=.venv/bin/python cargo bench --bench inference
//!     KLSPEECH_BENCH_DEVICE=cuda target/cuda-dist/inference-*   # GPU rows (cuda build)
//!
//! CPU rows: wav2vec2-base (random weights) inference 1 x 5 s; the tiny configuration of
//! shared/PERF.md, inference 8 x 1 s. GPU rows: wav2vec2-base inference 16 x 10 s (f32 and
//! bf16) and a training step 8 x 4 s (classification head, cross-entropy, backward, AdamW;
//! dropout and SpecAugment off, everything trained, as the PyTorch side).
//! `KLSPEECH_BENCH_ROWS` (comma-separated row names) selects rows.

// The binary's caching allocator (see src/main.rs): 2-4x faster training steps on CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::Command;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use klspeech::model::{ForwardCtx, Head, HeadKind, LoadOptions, SpeechModel, Wav2Vec2Config};
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

struct Row {
    name: &'static str,
    /// Inference through the differentiable path (im2col conv, composed norms) instead of
    /// candle's conv1d and fused kernels: shows which is faster on a device.
    unfold: bool,
    config: &'static str,
    batch: usize,
    seconds: f64,
    dtype: DType,
    train: bool,
    iters: usize,
}

fn sync(dev: &Device) {
    let _ = dev.synchronize();
}

fn bench_klspeech(row: &Row, dev: &Device) -> klspeech::Result<f64> {
    let mut cfg = if row.config == "tiny" { tiny() } else { Wav2Vec2Config::default() };
    cfg.num_labels = Some(12);
    cfg.layerdrop = 0.0;
    let head = if row.train { HeadKind::Classification } else { HeadKind::None };
    let model = SpeechModel::fresh(cfg, &LoadOptions { head: Some(head), device: dev.clone(), dtype: row.dtype, ..Default::default() })?;
    let n = (row.seconds * 16000.0) as usize;
    let x = Tensor::from_vec(Rng::new(1).normal_vec(row.batch * n), (row.batch, n), &Device::Cpu)?.to_dtype(row.dtype)?.to_device(dev)?;
    let vars = model.store.vars();
    let mut opt = klspeech::train::optim::AdamW::new(vars.clone(), Default::default())?;
    let y: Vec<usize> = (0..row.batch).map(|i| i % 12).collect();
    let mut times = Vec::new();
    for i in 0..row.iters + 2 {
        sync(dev);
        let t = Instant::now();
        if row.train {
            let mut ctx = ForwardCtx::train_no_dropout(Rng::new(i as u64));
            let out = model.encoder.forward(&x, None, &mut ctx)?;
            let Head::Classification(h) = &model.head else { unreachable!() };
            let loss = klspeech::loss::cross_entropy(&h.forward(&out)?.to_dtype(DType::F32)?, &y, 0.0)?;
            let grads = loss.backward()?;
            opt.step(&grads, 1.0)?;
        } else if std::env::var("KLSPEECH_BENCH_STAGES").is_ok() {
            let mut ctx = if row.unfold { ForwardCtx::eval_with_grad() } else { ForwardCtx::eval() };
            let feats = model.encoder.extract(&x, None, &mut ctx)?;
            sync(dev);
            let t_fe = t.elapsed().as_secs_f64();
            let out = model.encoder.forward_features(&feats, None, &mut ctx)?;
            let _ = out.last_hidden_state.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
            if i >= 2 {
                eprintln!("{}: feature encoder {:.1} ms, rest {:.1} ms", row.name, t_fe * 1e3, (t.elapsed().as_secs_f64() - t_fe) * 1e3);
            }
        } else {
            let mut ctx = if row.unfold { ForwardCtx::eval_with_grad() } else { ForwardCtx::eval() };
            let out = model.forward(&x, None, &mut ctx)?;
            let _ = out.encoder.last_hidden_state.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        }
        sync(dev);
        if i >= 2 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[times.len() / 2])
}

fn python() -> Option<String> {
    if let Ok(p) = std::env::var("KLSPEECH_PYTHON") {
        return Some(p);
    }
    [".venv/bin/python", "../venv/bin/python", "python3"]
        .iter()
        .find(|p| Command::new(p).args(["-c", "import torch, transformers"]).output().map(|o| o.status.success()).unwrap_or(false))
        .map(|s| s.to_string())
}

fn bench_pytorch(py: &str, row: &Row, threads: usize, device: &str) -> Option<(f64, Option<f64>)> {
    let dtype = match row.dtype {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "f32",
    };
    let mut args = vec![
        "tools/bench_pytorch.py".to_string(),
        "--config".into(), row.config.into(),
        "--batch".into(), row.batch.to_string(),
        "--seconds".into(), row.seconds.to_string(),
        "--threads".into(), threads.to_string(),
        "--iters".into(), row.iters.to_string(),
        "--device".into(), device.into(),
        "--dtype".into(), dtype.into(),
    ];
    if row.train {
        args.push("--train".into());
    }
    let out = Command::new(py).args(&args).output().ok()?;
    if !out.status.success() {
        eprintln!("pytorch bench failed: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some((v["median_ms"].as_f64()? / 1000.0, v["peak_gpu_mb"].as_f64()))
}

fn main() {
    let device_name = std::env::var("KLSPEECH_BENCH_DEVICE").unwrap_or_else(|_| "cpu".into());
    let dev = klspeech::device::parse_device(&device_name).expect("device");
    let gpu = !dev.is_cpu();
    let rows: Vec<Row> = if gpu {
        vec![
            Row { name: "base-infer-16x10-f32-unfold", unfold: true, config: "base", batch: 16, seconds: 10.0, dtype: DType::F32, train: false, iters: 5 },
            Row { name: "base-infer-16x10-f32", unfold: false, config: "base", batch: 16, seconds: 10.0, dtype: DType::F32, train: false, iters: 5 },
            Row { name: "base-infer-16x10-bf16", unfold: false, config: "base", batch: 16, seconds: 10.0, dtype: DType::BF16, train: false, iters: 5 },
            Row { name: "base-train-8x4-f32", unfold: true, config: "base", batch: 8, seconds: 4.0, dtype: DType::F32, train: true, iters: 5 },
        ]
    } else {
        vec![
            Row { name: "tiny-infer-8x1", unfold: false, config: "tiny", batch: 8, seconds: 1.0, dtype: DType::F32, train: false, iters: 10 },
            Row { name: "base-infer-1x5", unfold: false, config: "base", batch: 1, seconds: 5.0, dtype: DType::F32, train: false, iters: 5 },
        ]
    };
    let wanted: Option<Vec<String>> = std::env::var("KLSPEECH_BENCH_ROWS").ok().map(|s| s.split(',').map(String::from).collect());
    let threads = klspeech_threads();
    let py = python();
    println!("device: {device_name}; threads: {threads}; PyTorch: {}", py.as_deref().unwrap_or("not found (set KLSPEECH_PYTHON)"));
    println!("| workload | klspeech ms | klspeech audio-s/s | PyTorch ms | PyTorch audio-s/s | PyTorch peak GPU MiB | klspeech / PyTorch throughput |");
    println!("|---|---|---|---|---|---|---|");
    for row in rows.iter().filter(|r| wanted.as_ref().is_none_or(|w| w.iter().any(|n| n == r.name))) {
        let audio = row.batch as f64 * row.seconds;
        let k = match bench_klspeech(row, &dev) {
            Ok(k) => k,
            Err(e) => {
                println!("| {} | failed: {e} | | | | | |", row.name);
                continue;
            }
        };
        let p = py.as_deref().and_then(|py| bench_pytorch(py, row, threads, if gpu { "cuda" } else { "cpu" }));
        let (pms, pthr, pmem, ratio) = match p {
            Some((p, mem)) => (
                format!("{:.1}", p * 1000.0),
                format!("{:.1}", audio / p),
                mem.map(|m| format!("{m:.0}")).unwrap_or_else(|| "-".into()),
                format!("{:.2}", p / k),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        println!("| {} | {:.1} | {:.1} | {pms} | {pthr} | {pmem} | {ratio} |", row.name, k * 1000.0, audio / k);
    }
}

fn klspeech_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}
