//! Shared helpers for the integration tests.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use klspeech::model::Wav2Vec2Config;

/// The device tests run on: `KLSPEECH_TEST_DEVICE=cuda` selects the first GPU (in a `cuda`
/// build); CPU otherwise.
pub fn device() -> Device {
    match std::env::var("KLSPEECH_TEST_DEVICE").as_deref() {
        Ok("cuda") => Device::new_cuda(0).expect("KLSPEECH_TEST_DEVICE=cuda but no CUDA device"),
        _ => Device::Cpu,
    }
}

/// A tiny Wav2Vec2 config (post-norm, group norm) for fast tests.
pub fn tiny_config(stable: bool) -> Wav2Vec2Config {
    let mut c = Wav2Vec2Config::default();
    c.hidden_size = 16;
    c.num_hidden_layers = 2;
    c.num_attention_heads = 2;
    c.intermediate_size = 24;
    c.conv_dim = vec![8, 8];
    c.conv_kernel = vec![10, 3];
    c.conv_stride = vec![5, 2];
    c.num_conv_pos_embeddings = 4;
    c.num_conv_pos_embedding_groups = 2;
    c.classifier_proj_size = 6;
    c.vocab_size = 5;
    c.do_stable_layer_norm = stable;
    c.feat_extract_norm = if stable { "layer".into() } else { "group".into() };
    c.conv_bias = stable;
    c.hidden_dropout = 0.0;
    c.activation_dropout = 0.0;
    c.attention_dropout = 0.0;
    c.feat_proj_dropout = 0.0;
    c.final_dropout = 0.0;
    c.layerdrop = 0.0;
    c
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
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
}
