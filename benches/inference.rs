//! Throughput of Wav2Vec2 inference and training steps against PyTorch + transformers: same
//! configuration, same thread count (CPU) or the same GPU, same run.
//!
//!     cargo bench --bench inference                       # CPU rows (issue 6's table)
//!     KLSPEECH_PYTHON=/work/venv/bin/python cargo bench --bench inference
//!     KLSPEECH_BENCH_DEVICE=cuda target/cuda-dist/inference-*   # GPU rows (cuda build)
//!
//! CPU rows: the tiny configuration of shared/PERF.md (inference 8 x 1 s, training step
//! 8 x 1 s) and wav2vec2-base (inference 1 x 5 s, training step 4 x 1 s), random weights.
//! Training steps are forward, cross-entropy (+ beta * KL), backward and AdamW over every
//! parameter, dropout and SpecAugment off, as the PyTorch side; they run with KL-Norm at its
//! default sites (what users train) and, in an extra row, plain LayerNorm. In evaluation mode
//! KL-Norm is exactly LayerNorm (the same code path), so inference has one row.
//!
//! Each klspeech row runs twice in a fresh child process: with the fused ops of `src/ops`
//! ("after") and with `KLSPEECH_NO_CUSTOM_OPS=1`, candle's composites ("before"); the child
//! reports the median time, the per-stage medians and its peak RSS. For the base training
//! step the achieved GFLOP/s are printed beside the machine's gemm throughput.
//! `KLSPEECH_BENCH_ITERS` sets the steps per child (for profiling). `KLSPEECH_BENCH_PROFILE=1`
//! prints a kernel-level GPU profile of the timed steps (CUPTI, `src/gpu_profile.rs`) to
//! stderr. `KLSPEECH_PYTHON=none` leaves the PyTorch side out. `KLSPEECH_BENCH_GPU_PATH=1` runs
//! a child row on the CPU through the GPU's training path (`ops::with_gpu_path`), to rehearse
//! it; training rows print their graph size (nodes candle's backward walks).
//! On a GPU, steps synchronize once, at their end, as PyTorch's side does;
//! `KLSPEECH_BENCH_STAGES=1` synchronizes after each stage too and prints the stage split.
//! `KLSPEECH_GPU_POOL_RELEASE=1` runs with the driver's memory-pool default (free memory handed
//! back at every synchronization; `device::gpu_pool_release_threshold`).
//! `KLSPEECH_BENCH_ROWS` (comma-separated row names) selects rows; klspeech ("after") and PyTorch
//! alternate `KLSPEECH_BENCH_ROUNDS` times per row (default 3), and the table reports the
//! medians and the median of the per-round ratios, so a slow spell of a shared machine does
//! not fall on one side only.

// The binary's caching allocator (see src/main.rs): 2-4x faster training steps on CPU,
// counting buffers of 1 KiB or more: each tensor op allocates its output, so on the GPU's
// path run on the CPU (KLSPEECH_BENCH_GPU_PATH=1) the count per stage approximates the
// kernel launches a GPU step would make.
#[global_allocator]
static GLOBAL: Counting = Counting;

struct Counting;

static BUFFERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
        if l.size() >= 1024 {
            BUFFERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        unsafe { mimalloc::MiMalloc.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
        unsafe { mimalloc::MiMalloc.dealloc(p, l) }
    }
    unsafe fn alloc_zeroed(&self, l: std::alloc::Layout) -> *mut u8 {
        if l.size() >= 1024 {
            BUFFERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        unsafe { mimalloc::MiMalloc.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: std::alloc::Layout, new: usize) -> *mut u8 {
        unsafe { mimalloc::MiMalloc.realloc(p, l, new) }
    }
}

use std::process::Command;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use klspeech::model::{ForwardCtx, Head, HeadKind, KlSites, LoadOptions, SpeechModel, Wav2Vec2Config};
use klspeech::rng::Rng;

fn tiny() -> Wav2Vec2Config {
    Wav2Vec2Config {
        hidden_size: 192,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        intermediate_size: 768,
        conv_dim: vec![128; 7],
        num_conv_pos_embeddings: 64,
        num_conv_pos_embedding_groups: 16,
        ..Wav2Vec2Config::default()
    }
}

#[derive(Clone, Copy)]
struct Row {
    name: &'static str,
    /// Inference through the differentiable path (the training convolution and composed
    /// norms) instead of candle's conv1d and fused kernels: shows which is faster on a device.
    unfold: bool,
    config: &'static str,
    batch: usize,
    seconds: f64,
    dtype: DType,
    train: bool,
    /// KL-Norm at its default sites (training rows).
    kl: bool,
    /// Training rows: the step as `klspeech train` runs it, with the non-finite probe and the
    /// gradients' global norm read back once and clipping at 1.0 (its default) folded into
    /// AdamW (`optim::step_probes`, `AdamW::step_scaled`); on PyTorch's side
    /// `clip_grad_norm_(.., 1.0)` and `isfinite` of the norm read back, as the Hugging Face
    /// Trainer's default `max_grad_norm` 1.0.
    clip: bool,
    /// GPU: TF32 tensor cores for f32 matrix products and convolutions, on both sides
    /// (`klspeech --tf32`; `torch.backends.cuda.matmul.allow_tf32` and
    /// `torch.backends.cudnn.allow_tf32`, the latter on by default in PyTorch and set off here
    /// for the f32 rows).
    tf32: bool,
    iters: usize,
}

fn sync(dev: &Device) {
    let _ = dev.synchronize();
}

/// `KLSPEECH_BENCH_STAGES=1`: per-stage times on a GPU (a synchronization after each stage).
fn stages_asked() -> bool {
    std::env::var_os("KLSPEECH_BENCH_STAGES").is_some_and(|v| v != "0")
}

fn config_of(row: &Row) -> Wav2Vec2Config {
    let mut cfg = if row.config == "tiny" { tiny() } else { Wav2Vec2Config::default() };
    cfg.num_labels = Some(12);
    cfg.layerdrop = 0.0;
    cfg
}

/// Median seconds of one step and the per-stage medians (name, seconds).
fn bench_klspeech(row: &Row, dev: &Device) -> klspeech::Result<(f64, Vec<(&'static str, f64)>)> {
    let cfg = config_of(row);
    let head = if row.train { HeadKind::Classification } else { HeadKind::None };
    let sites = if row.kl { KlSites::Encoder } else { KlSites::None };
    let model =
        SpeechModel::fresh(cfg, &LoadOptions { head: Some(head), device: dev.clone(), dtype: row.dtype, kl_sites: sites, ..Default::default() })?;
    let n = (row.seconds * 16000.0) as usize;
    let x = Tensor::from_vec(Rng::new(1).normal_vec(row.batch * n), (row.batch, n), &Device::Cpu)?.to_dtype(row.dtype)?.to_device(dev)?;
    let vars = model.store.vars();
    let mut opt = klspeech::train::optim::AdamW::new(vars.clone(), Default::default())?;
    let y: Vec<usize> = (0..row.batch).map(|i| i % 12).collect();
    let mut times = Vec::new();
    let mut stages: Vec<Vec<(&'static str, f64)>> = Vec::new();
    // KLSPEECH_BENCH_ITERS overrides the row's step count (long runs under a profiler).
    let iters = std::env::var("KLSPEECH_BENCH_ITERS").ok().and_then(|s| s.parse().ok()).unwrap_or(row.iters);
    // KLSPEECH_BENCH_PROFILE=1: a kernel-level GPU profile of the timed steps, on stderr.
    let profile = std::env::var_os("KLSPEECH_BENCH_PROFILE").is_some_and(|v| v != "0") && !dev.is_cpu();
    let mut profiler = None;
    // Stage marks synchronize; on a GPU that drains the queue five times a step (PyTorch's
    // side synchronizes once), so only with KLSPEECH_BENCH_STAGES=1 there. (A no-op on the CPU.)
    let stage_sync = dev.is_cpu() || stages_asked();
    for i in 0..iters + 2 {
        sync(dev);
        if i == 2 && profile {
            profiler = klspeech::gpu_profile::Profiler::start().map_err(|e| eprintln!("{}: {e}", row.name)).ok();
        }
        let t = Instant::now();
        let mut marks: Vec<(&'static str, f64)> = Vec::new();
        let mut buffers = Vec::new();
        let buffers0 = BUFFERS.load(std::sync::atomic::Ordering::Relaxed);
        let mut mark = |name: &'static str, marks: &mut Vec<(&'static str, f64)>| {
            if stage_sync {
                sync(dev);
            }
            let b = BUFFERS.load(std::sync::atomic::Ordering::Relaxed) - buffers0;
            buffers.push(b); // cumulative
            let now = t.elapsed().as_secs_f64();
            let before: f64 = marks.iter().map(|m| m.1).sum();
            marks.push((name, now - before));
        };
        if row.train {
            let mut ctx = ForwardCtx::train_no_dropout(Rng::new(i as u64));
            let feats = model.encoder.extract(&x, None, &mut ctx)?;
            mark("feature encoder fwd", &mut marks);
            let out = model.encoder.forward_features(&feats, None, &mut ctx)?;
            mark("transformer fwd", &mut marks);
            let Head::Classification(h) = &model.head else { unreachable!() };
            let mut loss = klspeech::loss::cross_entropy(&h.forward(&out, &mut ctx)?.to_dtype(DType::F32)?, &y, 0.0)?;
            if let Some(kl) = ctx.kl_total()? {
                loss = (loss + (kl.to_dtype(DType::F32)? * 1e-3)?)?;
            }
            mark("head + loss", &mut marks);
            if i == 2 {
                // Graph size of one step: what candle's backward walks (and, on a GPU, roughly
                // what launches kernels).
                eprintln!("{}: {} graph nodes", row.name, loss.sorted_nodes().len());
            }
            let grads = klspeech::ops::backward(&loss)?;
            mark("backward", &mut marks);
            if row.clip {
                let [probe, sq] = klspeech::train::optim::step_probes(&grads, &vars, true)?;
                let figures = Tensor::stack(&[probe.expect("gradients"), sq.expect("gradients")], 0)?.to_device(&Device::Cpu)?.to_vec1::<f64>()?;
                assert!(figures[0].is_finite(), "{}: a non-finite gradient", row.name);
                opt.step_scaled(&grads, 1.0, klspeech::train::optim::clip_coef(1.0, figures[1].sqrt()))?;
            } else {
                opt.step(&grads, 1.0)?;
            }
            mark("AdamW", &mut marks);
        } else {
            let mut ctx = if row.unfold { ForwardCtx::eval_with_grad() } else { ForwardCtx::eval() };
            let feats = model.encoder.extract(&x, None, &mut ctx)?;
            mark("feature encoder", &mut marks);
            // (The output is left as is, as PyTorch's side leaves it: the step's sync below
            // waits for it. A reduction here cost candle's fast_sum 0.33 ms an f32 batch on the
            // H200, counted against klspeech only.)
            let out = model.encoder.forward_features(&feats, None, &mut ctx)?;
            mark("transformer", &mut marks);
            drop(out);
        }
        sync(dev);
        if i == 2 {
            let named: Vec<String> =
                marks.iter().enumerate().map(|(k, m)| format!("{} {}", m.0, buffers[k] - if k > 0 { buffers[k - 1] } else { 0 })).collect();
            eprintln!("{}: buffers of >= 1 KiB allocated in one step: {}", row.name, named.join(", "));
        }
        if i >= 2 {
            times.push(t.elapsed().as_secs_f64());
            stages.push(marks);
        }
    }
    if let Some(p) = profiler {
        let p = p.stop(dev)?;
        eprintln!("\n{}: GPU profile of {iters} steps ({:.1} ms of GPU time per step)\n{}", row.name, p.total_ns() as f64 / 1e6 / iters as f64, p.table(40));
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let names: Vec<&'static str> = stages[0].iter().map(|s| s.0).collect();
    let per_stage = names.iter().enumerate().map(|(k, n)| (*n, median(stages.iter().map(|s| s[k].1).collect()))).collect();
    Ok((median(times), per_stage))
}

/// Multiply-adds x 2 of one forward pass (convolutions, linear layers, attention), from the
/// config: the count PyTorch's profilers use. A training step is counted as 3 forward passes.
fn forward_flops(cfg: &Wav2Vec2Config, batch: usize, samples: usize) -> f64 {
    let b = batch as f64;
    let mut len = samples;
    let mut c_in = 1usize;
    let mut flops = 0.0;
    for ((&c, &k), &s) in cfg.conv_dim.iter().zip(&cfg.conv_kernel).zip(&cfg.conv_stride) {
        len = (len - k) / s + 1;
        flops += 2.0 * b * len as f64 * c as f64 * (c_in * k) as f64;
        c_in = c;
    }
    let (t, h, i) = (len as f64, cfg.hidden_size as f64, cfg.intermediate_size as f64);
    flops += 2.0 * b * t * c_in as f64 * h; // feature projection
    let g = cfg.num_conv_pos_embedding_groups as f64;
    flops += 2.0 * b * t * h * (h / g) * cfg.num_conv_pos_embeddings as f64; // positional conv
    let per_layer = 2.0 * b * t * h * h * 4.0 + 2.0 * b * t * t * h * 2.0 + 2.0 * b * t * h * i * 2.0;
    flops + per_layer * cfg.num_hidden_layers as f64
}

/// The machine's f32 gemm throughput (candle's gemm = MKL's on this CPU, PERF.md), GFLOP/s.
fn gemm_gflops() -> f64 {
    let n = 1536;
    let a = Tensor::from_vec(Rng::new(2).normal_vec(n * n), (n, n), &Device::Cpu).unwrap();
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        let _ = a.matmul(&a).unwrap();
        best = best.min(t.elapsed().as_secs_f64());
    }
    2.0 * (n as f64).powi(3) / best / 1e9
}

fn python() -> Option<String> {
    if let Ok(p) = std::env::var("KLSPEECH_PYTHON") {
        // `none`: klspeech rows only.
        return (p != "none").then_some(p);
    }
    [".venv/bin/python", "../venv/bin/python", "/work/venv/bin/python", "python3"]
        .iter()
        .find(|p| Command::new(p).args(["-c", "import torch, transformers"]).output().map(|o| o.status.success()).unwrap_or(false))
        .map(|s| s.to_string())
}

/// (median seconds, peak GPU MiB, peak RSS MiB) of the PyTorch side.
fn bench_pytorch(py: &str, row: &Row, threads: usize, device: &str) -> Option<(f64, Option<f64>, Option<f64>)> {
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
    if row.clip {
        args.push("--clip".into());
    }
    if row.tf32 {
        args.push("--tf32".into());
    }
    let out = Command::new(py).args(&args).output().ok()?;
    if !out.status.success() {
        eprintln!("pytorch bench failed: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some((v["median_ms"].as_f64()? / 1000.0, v["peak_gpu_mb"].as_f64(), v["peak_rss_mb"].as_f64()))
}

/// Peak resident memory of this process (VmHWM), MiB.
fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()))
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn rows(gpu: bool) -> Vec<Row> {
    let r = |name, config, batch, seconds, train, kl, iters| Row { name, unfold: false, config, batch, seconds, dtype: DType::F32, train, kl, clip: false, tf32: false, iters };
    if gpu {
        vec![
            Row { unfold: true, ..r("base-infer-16x10-f32-unfold", "base", 16, 10.0, false, false, 5) },
            r("base-infer-16x10-f32", "base", 16, 10.0, false, false, 5),
            Row { tf32: true, ..r("base-infer-16x10-f32-tf32", "base", 16, 10.0, false, false, 5) },
            Row { dtype: DType::BF16, ..r("base-infer-16x10-bf16", "base", 16, 10.0, false, false, 5) },
            Row { dtype: DType::F16, ..r("base-infer-16x10-f16", "base", 16, 10.0, false, false, 5) },
            r("base-train-8x4-f32", "base", 8, 4.0, true, false, 5),
            Row { tf32: true, ..r("base-train-8x4-f32-tf32", "base", 8, 4.0, true, false, 5) },
            // Pure bf16 (parameters, AdamW moments, activations), as the PyTorch side's
            // `model.to(bfloat16)`.
            Row { dtype: DType::BF16, ..r("base-train-8x4-bf16", "base", 8, 4.0, true, false, 5) },
            r("base-train-8x4-f32-klnorm", "base", 8, 4.0, true, true, 5),
            Row { clip: true, ..r("base-train-8x4-f32-clip", "base", 8, 4.0, true, false, 5) },
        ]
    } else {
        vec![
            r("tiny-infer-8x1", "tiny", 8, 1.0, false, false, 10),
            r("tiny-train-8x1", "tiny", 8, 1.0, true, true, 6),
            r("tiny-train-8x1-layernorm", "tiny", 8, 1.0, true, false, 6),
            r("base-infer-1x5", "base", 1, 5.0, false, false, 5),
            r("base-train-4x1", "base", 4, 1.0, true, true, 4),
            r("base-train-4x1-layernorm", "base", 4, 1.0, true, false, 4),
            Row { clip: true, ..r("base-train-4x1-clip", "base", 4, 1.0, true, true, 4) },
        ]
    }
}

/// Child mode: one row, one setting, JSON on stdout.
fn child(name: &str, dev: &Device) {
    // Any row on any device (a GPU row on the CPU rehearses tools/gpu_check.sh).
    let row = rows(!dev.is_cpu()).into_iter().chain(rows(dev.is_cpu())).find(|r| r.name == name).expect("known row");
    // A `-tf32` row's switch, as the GPU table sets it (the 2026-11-27 e log's TF32 profile ran
    // without it: exact f32).
    klspeech::device::set_tf32(row.tf32);
    // KLSPEECH_BENCH_GPU_PATH=1: on the CPU, the GPU's training path (ops::with_gpu_path).
    let gpu_path = std::env::var_os("KLSPEECH_BENCH_GPU_PATH").is_some_and(|v| v != "0");
    // (candle's CPU context runs the closure on a pool thread: the per-thread setting goes in.)
    let (t, stages) = Device::Cpu.with_context(|| klspeech::ops::with_gpu_path_if(gpu_path, || bench_klspeech(&row, dev))).expect("bench");
    let stages: serde_json::Map<String, serde_json::Value> = stages.into_iter().map(|(k, v)| (k.to_string(), (v * 1e3).into())).collect();
    println!("{}", serde_json::json!({"median_ms": t * 1e3, "stages_ms": stages, "peak_rss_mb": peak_rss_mb()}));
}

/// Runs one row in a fresh process (so that its peak RSS is its own).
fn run_child(name: &str, fused: bool) -> Option<serde_json::Value> {
    let exe = std::env::current_exe().ok()?;
    let mut cmd = Command::new(exe);
    cmd.env("KLSPEECH_BENCH_CHILD", name);
    if fused {
        cmd.env_remove("KLSPEECH_NO_CUSTOM_OPS");
    } else {
        cmd.env("KLSPEECH_NO_CUSTOM_OPS", "1");
    }
    let out = cmd.output().ok()?;
    if !out.status.success() {
        eprintln!("{name}: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

fn main() {
    klspeech::device::tune_cpu_runtime();
    let device_name = std::env::var("KLSPEECH_BENCH_DEVICE").unwrap_or_else(|_| "cpu".into());
    let dev = klspeech::device::parse_device(&device_name).expect("device");
    if let Ok(name) = std::env::var("KLSPEECH_BENCH_CHILD") {
        child(&name, &dev);
        return;
    }
    let gpu = !dev.is_cpu();
    let wanted: Option<Vec<String>> = std::env::var("KLSPEECH_BENCH_ROWS").ok().map(|s| s.split(',').map(String::from).collect());
    let threads = klspeech_threads();
    let py = python();
    println!("device: {device_name}; threads: {threads}; PyTorch: {}", py.as_deref().unwrap_or("not found (set KLSPEECH_PYTHON)"));
    if gpu {
        // Which convolutions the rows run (the device ones; the CPU has its own).
        println!(
            "convolutions off the CPU: column gemms {:?} (KLSPEECH_CONV_GEMM), stride 1 on shared columns of {} taps (KLSPEECH_CONV_SHIFT; 0: per chunk), cuDNN channels-last elsewhere where built",
            klspeech::ops::conv_gemm::mode(),
            klspeech::ops::conv_gemm::shift_taps()
        );
        gpu_table(&dev, &wanted, threads, py.as_deref());
        return;
    }
    let peak = gemm_gflops();
    println!("gemm throughput (f32, 1536^3, best of 5): {peak:.1} GFLOP/s");
    println!();
    // klspeech and PyTorch alternate, `rounds` times each, so that a slow spell of a shared
    // machine hits both: the ratio reported is the median of the per-round ratios.
    let rounds: usize = std::env::var("KLSPEECH_BENCH_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3).max(1);
    println!("klspeech and PyTorch alternate {rounds} times per row; medians over the rounds (ratio: median of per-round ratios, range in brackets)");
    println!();
    println!("| workload | klspeech before (composites) ms | klspeech after (fused ops) ms | PyTorch ms | after / PyTorch throughput | klspeech peak RSS MiB | PyTorch peak RSS MiB |");
    println!("|---|---|---|---|---|---|---|");
    let mut stage_rows = Vec::new();
    for row in rows(false).iter().filter(|r| wanted.as_ref().is_none_or(|w| w.iter().any(|n| n == r.name))) {
        let before = run_child(row.name, false);
        let ms = |v: &Option<serde_json::Value>| v.as_ref().and_then(|v| v["median_ms"].as_f64());
        let mut afters: Vec<serde_json::Value> = Vec::new();
        let mut pts: Vec<(f64, Option<f64>, Option<f64>)> = Vec::new();
        let mut ratios = Vec::new();
        for _ in 0..rounds {
            let a = run_child(row.name, true);
            let p = py.as_deref().and_then(|py| bench_pytorch(py, row, threads, "cpu"));
            if let (Some(am), Some(p)) = (ms(&a), p) {
                ratios.push(p.0 * 1e3 / am);
            }
            afters.extend(a);
            pts.extend(p);
        }
        let median = |mut v: Vec<f64>| -> Option<f64> {
            v.sort_by(f64::total_cmp);
            (!v.is_empty()).then(|| if v.len() % 2 == 1 { v[v.len() / 2] } else { (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0 })
        };
        // The "after" run whose time is the median (its stages go in the stage table).
        afters.sort_by(|a, b| a["median_ms"].as_f64().unwrap_or(f64::NAN).total_cmp(&b["median_ms"].as_f64().unwrap_or(f64::NAN)));
        let after = afters.get(afters.len().saturating_sub(1) / 2).cloned();
        let after_ms = median(afters.iter().filter_map(|v| v["median_ms"].as_f64()).collect());
        let pt_ms = median(pts.iter().map(|p| p.0 * 1e3).collect());
        let rss = afters.iter().filter_map(|v| v["peak_rss_mb"].as_f64()).fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
        let pt_rss = pts.iter().filter_map(|p| p.2).fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
        let f = |x: Option<f64>, d: usize| x.map(|x| format!("{x:.d$}")).unwrap_or_else(|| "-".into());
        let range = match (ratios.iter().copied().reduce(f64::min), ratios.iter().copied().reduce(f64::max)) {
            (Some(lo), Some(hi)) if ratios.len() > 1 => format!(" ({lo:.2}-{hi:.2})"),
            _ => String::new(),
        };
        println!(
            "| {} | {} | {} | {} | **{}**{range} | {} | {} |",
            row.name,
            f(ms(&before), 1),
            f(after_ms, 1),
            f(pt_ms, 1),
            f(median(ratios.clone()), 2),
            f(rss, 0),
            f(pt_rss, 0),
        );
        if row.name == "base-train-4x1" {
            let flops = 3.0 * forward_flops(&config_of(row), row.batch, (row.seconds * 16000.0) as usize);
            let g = |ms: Option<f64>| ms.map(|m| format!("{:.1}", flops / (m / 1e3) / 1e9)).unwrap_or_else(|| "-".into());
            eprintln!(
                "base training step: {:.1} GFLOP; klspeech {} GFLOP/s, PyTorch {} GFLOP/s, gemm {peak:.1} GFLOP/s",
                flops / 1e9,
                g(after_ms),
                g(pt_ms)
            );
        }
        stage_rows.push((row.name, before, after));
    }
    println!();
    println!("| workload | stage | before ms | after ms |");
    println!("|---|---|---|---|");
    for (name, before, after) in stage_rows {
        let (Some(b), Some(a)) = (before, after) else { continue };
        if let Some(stages) = a["stages_ms"].as_object() {
            for (stage, v) in stages {
                println!("| {name} | {stage} | {:.1} | {:.1} |", b["stages_ms"][stage].as_f64().unwrap_or(f64::NAN), v.as_f64().unwrap_or(f64::NAN));
            }
        }
    }
}

/// GPU rows run in this process, one after the other: each starts a new peak of the device's
/// memory pool (model, optimizer state, activations; what `torch.cuda.max_memory_allocated`
/// counts on the PyTorch side).
fn gpu_table(dev: &Device, wanted: &Option<Vec<String>>, threads: usize, py: Option<&str>) {
    println!("| workload | klspeech ms | klspeech audio-s/s | PyTorch ms | PyTorch audio-s/s | klspeech peak GPU MiB | PyTorch peak GPU MiB | klspeech / PyTorch throughput |");
    println!("|---|---|---|---|---|---|---|---|");
    for row in rows(true).iter().filter(|r| wanted.as_ref().is_none_or(|w| w.iter().any(|n| n == r.name))) {
        let audio = row.batch as f64 * row.seconds;
        klspeech::device::set_tf32(row.tf32);
        sync(dev);
        klspeech::device::reset_gpu_peak_memory(dev);
        let result = bench_klspeech(row, dev);
        let kmem = klspeech::device::gpu_peak_memory(dev).map(|b| format!("{:.0}", b as f64 / 1048576.0)).unwrap_or_else(|| "-".into());
        klspeech::device::set_tf32(false);
        let k = match result {
            Ok((k, stages)) => {
                if stages_asked() {
                    eprintln!("{}: {stages:?}", row.name);
                }
                if let Some(r) = klspeech::device::gpu_reserved_memory(dev) {
                    eprintln!("{}: the memory pool holds {:.0} MiB (release threshold {:?})", row.name, r as f64 / 1048576.0,
                        klspeech::device::gpu_pool_release_threshold(dev));
                }
                k
            }
            Err(e) => {
                println!("| {} | failed: {e} | | | | | | |", row.name);
                continue;
            }
        };
        let p = py.and_then(|py| bench_pytorch(py, row, threads, "cuda"));
        let (pms, pthr, pmem, ratio) = match p {
            Some((p, mem, _)) => (
                format!("{:.1}", p * 1000.0),
                format!("{:.1}", audio / p),
                mem.map(|m| format!("{m:.0}")).unwrap_or_else(|| "-".into()),
                format!("{:.2}", p / k),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        println!("| {} | {:.1} | {:.1} | {pms} | {pthr} | {kmem} | {pmem} | {ratio} |", row.name, k * 1000.0, audio / k);
    }
}

fn klspeech_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}
