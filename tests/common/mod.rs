//! Shared helpers for the integration tests.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};

// Tests allocate like the binary does (src/main.rs): mimalloc keeps candle's per-op buffers.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use klspeech::model::Wav2Vec2Config;

/// The device tests run on: `KLSPEECH_TEST_DEVICE=cuda` selects the first GPU (in a `cuda`
/// build); CPU otherwise.
pub fn device() -> Device {
    match std::env::var("KLSPEECH_TEST_DEVICE").as_deref() {
        Ok("cuda") => klspeech::device::new_cuda(0).expect("KLSPEECH_TEST_DEVICE=cuda but no CUDA device"),
        _ => Device::Cpu,
    }
}

/// A tiny Wav2Vec2 config (post-norm, group norm) for fast tests.
pub fn tiny_config(stable: bool) -> Wav2Vec2Config {
    Wav2Vec2Config {
        hidden_size: 16,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        intermediate_size: 24,
        conv_dim: vec![8, 8],
        conv_kernel: vec![10, 3],
        conv_stride: vec![5, 2],
        num_conv_pos_embeddings: 4,
        num_conv_pos_embedding_groups: 2,
        classifier_proj_size: 6,
        vocab_size: 5,
        do_stable_layer_norm: stable,
        feat_extract_norm: if stable { "layer".into() } else { "group".into() },
        conv_bias: stable,
        hidden_dropout: 0.0,
        activation_dropout: 0.0,
        attention_dropout: 0.0,
        feat_proj_dropout: 0.0,
        final_dropout: 0.0,
        layerdrop: 0.0,
        ..Wav2Vec2Config::default()
    }
}

/// A deterministic waveform batch [b, n] with per-row lengths (rows padded with zeros).
pub fn waves(lengths: &[usize], dtype: DType, dev: &Device) -> Tensor {
    let n = *lengths.iter().max().unwrap();
    let mut v = vec![0f32; lengths.len() * n];
    for (r, &l) in lengths.iter().enumerate() {
        for i in 0..l {
            let t = i as f32 / 16000.0;
            v[r * n + i] = (2.0 * std::f32::consts::PI * (220.0 + 40.0 * r as f32) * t).sin()
                + 0.3 * ((i * 7919 + r * 104729) % 1000) as f32 / 1000.0
                - 0.15;
        }
    }
    Tensor::from_vec(v, (lengths.len(), n), &Device::Cpu).unwrap().to_dtype(dtype).unwrap().to_device(dev).unwrap()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    nan_aware_max_abs(&(a - b).unwrap())
}

/// The largest |element| of `t` (any device, any float type), infinite when an element is NaN:
/// candle's `max` passes over a NaN that is not the first element, so a comparison through it
/// could not fail on NaN.
pub fn nan_aware_max_abs(t: &Tensor) -> f64 {
    let v = t.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
    v.into_iter().fold(0.0, |m, x| if x.is_nan() { f64::INFINITY } else { m.max(x.abs()) })
}

/// Writes a mono 16 kHz 16-bit WAV.
pub fn write_wav(path: &std::path::Path, x: &[f32]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let spec = hound::WavSpec { channels: 1, sample_rate: 16000, bits_per_sample: 16, sample_format: hound::SampleFormat::Int };
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    for &v in x {
        w.write_sample((v.clamp(-1.0, 1.0) * 32767.0) as i16).unwrap();
    }
    w.finalize().unwrap();
}

/// A tone of `f0 -> f1` Hz (linear sweep) lasting `n` samples at amplitude `a`.
pub fn sweep(f0: f32, f1: f32, n: usize, a: f32) -> Vec<f32> {
    let mut phase = 0f32;
    (0..n)
        .map(|i| {
            let f = f0 + (f1 - f0) * i as f32 / n as f32;
            phase += 2.0 * std::f32::consts::PI * f / 16000.0;
            a * phase.sin()
        })
        .collect()
}

/// A synthetic keyword-spotting set in the Speech Commands layout: "yes" (rising sweep),
/// "no" (steady high tone), an unknown word "cat" (two-tone), background noise; 0.5 s clips;
/// speakers 0..`speakers`, the last 3 in testing_list, the 2 before in validation_list.
pub fn synthetic_kws(root: &std::path::Path, per_class: usize, speakers: usize) {
    let mut r = klspeech::rng::Rng::new(11);
    let mut val = String::new();
    let mut test = String::new();
    let n = 8000;
    for (word, make) in [
        ("yes", 0usize),
        ("no", 1),
        ("cat", 2),
    ] {
        for k in 0..per_class {
            let spk = k % speakers;
            let jitter = 1.0 + 0.08 * (r.uniform() as f32 - 0.5);
            let a = 0.3 + 0.4 * r.uniform() as f32;
            let mut x = match make {
                0 => sweep(300.0 * jitter, 900.0 * jitter, n, a),
                1 => sweep(1200.0 * jitter, 1200.0 * jitter, n, a),
                _ => {
                    let mut v = sweep(600.0 * jitter, 600.0 * jitter, n / 2, a);
                    v.extend(sweep(1800.0 * jitter, 1800.0 * jitter, n / 2, a));
                    v
                }
            };
            x.iter_mut().for_each(|v| *v += 0.02 * r.normal() as f32);
            let name = format!("{word}/{spk:04x}_nohash_{k}.wav");
            write_wav(&root.join(&name), &x);
            if spk >= speakers - 3 {
                test.push_str(&name);
                test.push('\n');
            } else if spk >= speakers - 5 {
                val.push_str(&name);
                val.push('\n');
            }
        }
    }
    std::fs::write(root.join("validation_list.txt"), val).unwrap();
    std::fs::write(root.join("testing_list.txt"), test).unwrap();
    let noise: Vec<f32> = (0..16000 * 12).map(|_| 0.1 * r.normal() as f32).collect();
    write_wav(&root.join("_background_noise_/white_noise.wav"), &noise);
}

/// A synthetic "language" for CTC: letters a, b, c are tones (400, 1000, 2200 Hz, 0.1 s with
/// 0.04 s gaps), words are separated by 0.12 s of silence. Writes `n` clips and a manifest.
pub fn synthetic_asr(root: &std::path::Path, n: usize, seed: u64) -> std::path::PathBuf {
    let mut r = klspeech::rng::Rng::new(seed);
    let mut csv = String::from("path,sentence\n");
    for i in 0..n {
        let words = 1 + r.below(2);
        let mut text = Vec::new();
        let mut x: Vec<f32> = vec![0.0; 800];
        for _ in 0..words {
            let len = 1 + r.below(3);
            let mut w = String::new();
            for _ in 0..len {
                let c = r.below(3);
                w.push(['a', 'b', 'c'][c]);
                let f = [400.0, 1000.0, 2200.0][c] * (1.0 + 0.04 * (r.uniform() as f32 - 0.5));
                x.extend(sweep(f, f, 1600, 0.5));
                x.extend(vec![0.0; 640]);
            }
            x.extend(vec![0.0; 1920]);
            text.push(w);
        }
        x.iter_mut().for_each(|v| *v += 0.01 * r.normal() as f32);
        let name = format!("clips/{i:03}.wav");
        write_wav(&root.join(&name), &x);
        csv.push_str(&format!("{name},{}\n", text.join(" ")));
    }
    let p = root.join("train.csv");
    std::fs::write(&p, csv).unwrap();
    p
}

/// A small randomly initialized "pretrained" model with wav2vec2's 320x downsampling (50 frames
/// per second), written by klspeech in the Hugging Face layout: fast to fine-tune in tests.
pub fn tiny_pretrained(dir: &std::path::Path) -> std::path::PathBuf {
    let mut c = tiny_config(false);
    c.hidden_size = 32;
    c.num_attention_heads = 4;
    c.intermediate_size = 64;
    c.conv_dim = vec![32, 32, 32, 32];
    c.conv_kernel = vec![10, 8, 4, 4];
    c.conv_stride = vec![5, 4, 4, 4];
    c.num_conv_pos_embeddings = 8;
    c.num_conv_pos_embedding_groups = 4;
    c.mask_time_length = 2;
    c.architectures = Some(vec!["Wav2Vec2Model".into()]);
    let opts = klspeech::model::LoadOptions { head: Some(klspeech::model::HeadKind::None), seed: 17, ..Default::default() };
    let m = klspeech::model::SpeechModel::fresh(c, &opts).unwrap();
    let out = dir.join("tiny-pretrained");
    m.save_pretrained(&out).unwrap();
    out
}

/// The AdamW scalars of the op tests' updates: step `t` (from 1) at learning rate 1e-3, betas
/// 0.9 / 0.999, eps 1e-8, and `decay` (`1 - lr wd`, or none).
pub fn adamw_scalars(t: i32, decay: Option<f64>) -> klspeech::ops::AdamWScalars {
    klspeech::ops::AdamWScalars {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        decay,
        bias_correction2_sqrt: (1.0f64 - 0.999f64.powi(t)).sqrt(),
        step_size: 1e-3 / (1.0 - 0.9f64.powi(t)),
        grad_scale: None,
    }
}

/// AdamW on bf16 / f16 storage as klspeech's half-type kernels compute it
/// (`kl_adam_moments_bf16` and the rest, and the CPU's rehearsal of them), written out here
/// independently of the library: f32 arithmetic in the CPU kernel's order on the stored values
/// (given as f32; `mv` = [m; v]), each result rounded to the type by `round`; the parameter's
/// update reads the moments as stored.
pub fn adamw_half_reference(theta: &mut [f32], mv: &mut [f32], g: &[f32], p: &klspeech::ops::AdamWScalars, round: impl Fn(f32) -> f32) {
    let n = theta.len();
    let (c1, b2, c2) = ((1.0 - p.beta1) as f32, p.beta2 as f32, (1.0 - p.beta2) as f32);
    let (inv_bc2, eps, step) = ((1.0 / p.bias_correction2_sqrt) as f32, p.eps as f32, p.step_size as f32);
    for i in 0..n {
        let (m, v, gi) = (mv[i], mv[n + i], g[i]);
        mv[i] = round(((gi - m) * c1 + 0.0) + m);
        mv[n + i] = round((v * b2 + 0.0) + (gi * gi * c2 + 0.0));
        let t = match p.decay {
            Some(d) => theta[i] * d as f32 + 0.0,
            None => theta[i],
        };
        let denom = (mv[n + i].sqrt() * inv_bc2 + 0.0) * 1.0 + eps;
        theta[i] = round(t - ((mv[i] / denom) * step + 0.0));
    }
}

/// `round` for [`adamw_half_reference`]: an f32 to the nearest bf16 / f16 (ties to even), as f32.
pub fn round_to(dtype: DType) -> impl Fn(f32) -> f32 {
    move |x| match dtype {
        DType::BF16 => half::bf16::from_f32(x).to_f32(),
        DType::F16 => half::f16::from_f32(x).to_f32(),
        _ => x,
    }
}
