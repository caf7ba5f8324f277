//! Front-end parity: the Wav2Vec2 feature extractor against transformers, and the log-mel
//! filterbank against torchaudio's Kaldi `fbank` (fixtures from tools/gen_feature_fixtures.py).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use klspeech::features::{FbankComputer, FbankOptions, FeatureExtractor, FeatureExtractorConfig};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/features")
}

fn load(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir().join(name), &Device::Cpu).unwrap()
}

fn vec1(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_dtype(candle_core::DType::F32).unwrap().to_vec1().unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, |m: f32, d| if d.is_nan() { f32::INFINITY } else { m.max(d) }) // (f32::max passes over NaN)
}

#[test]
fn feature_extractor_matches_transformers() {
    let t = load("feature_extractor.safetensors");
    let waves: Vec<Vec<f32>> = (0..3).map(|i| vec1(&t[&format!("wave.{i}")])).collect();
    for setting in ["A", "B", "D"] {
        let cfg = FeatureExtractorConfig::from_file(&dir().join(format!("preprocessor_{setting}.json"))).unwrap();
        let batch = FeatureExtractor::new(cfg.clone()).batch(&waves).unwrap();
        let expect = vec1(&t[&format!("{setting}.input_values")]);
        let d = max_abs_diff(&batch.input_values, &expect);
        println!("setting {setting}: max abs diff {d:e}");
        assert!(d <= 1e-5, "setting {setting}: max abs diff {d}");
        if let Some(m) = t.get(&format!("{setting}.attention_mask")) {
            let m: Vec<u8> = vec1(m).iter().map(|&v| v as u8).collect();
            assert_eq!(batch.attention_mask, m, "setting {setting}");
        }
        assert_eq!(batch.lengths, vec![1600, 2345, 999]);
    }
    // A zero-variance clip: transformers divides by sqrt(1e-7) and gets zeros.
    let cfg = FeatureExtractorConfig::from_file(&dir().join("preprocessor_A.json")).unwrap();
    let c = FeatureExtractor::new(cfg).batch(&[vec1(&t["wave.3"])]).unwrap();
    assert!(max_abs_diff(&c.input_values, &vec1(&t["C.input_values"])) <= 1e-5);
}

#[test]
fn padding_aware_extraction_does_not_depend_on_the_batch() {
    let t = load("feature_extractor.safetensors");
    let waves: Vec<Vec<f32>> = (0..3).map(|i| vec1(&t[&format!("wave.{i}")])).collect();
    let cfg = FeatureExtractorConfig::from_file(&dir().join("preprocessor_D.json")).unwrap();
    let fe = FeatureExtractor::new(cfg).with_padding_aware(true);
    let batch = fe.batch(&waves).unwrap();
    for (i, w) in waves.iter().enumerate() {
        let alone = fe.batch(std::slice::from_ref(w)).unwrap();
        let row = &batch.input_values[i * batch.max_len..i * batch.max_len + w.len()];
        assert_eq!(row, &alone.input_values[..], "clip {i}");
    }
}

#[test]
fn fbank_matches_torchaudio_kaldi() {
    let t = load("fbank.safetensors");
    let settings: HashMap<String, FbankOptions> =
        serde_json::from_str(&std::fs::read_to_string(dir().join("fbank_settings.json")).unwrap()).unwrap();
    let mut worst = 0f32;
    let mut compared = 0;
    for (name, opts) in &settings {
        let c = FbankComputer::new(opts.clone()).unwrap();
        for i in 0..3 {
            let wave = vec1(&t[&format!("wave.{i}")]);
            let fb = c.compute(&wave);
            match t.get(&format!("{name}.{i}")) {
                Some(r) => {
                    let dims = r.dims2().unwrap();
                    assert_eq!((fb.n_frames, fb.n_bins), dims, "{name}.{i}");
                    let d = max_abs_diff(&fb.data, &vec1(r));
                    worst = worst.max(d);
                    compared += 1;
                }
                // torchaudio raises for a clip shorter than one frame; Kaldi gives no frames.
                None => assert_eq!(fb.n_frames, 0, "{name}.{i}"),
            }
        }
    }
    println!("fbank: max abs diff of log-mel energies {worst:e} over {compared} tensors");
    assert_eq!(compared, 5);
    assert!(worst <= 5e-4, "max abs diff {worst}");
}

#[test]
fn fbank_rejects_impossible_options() {
    let bad = FbankOptions { high_freq: 9000.0, ..Default::default() };
    assert!(FbankComputer::new(bad).is_err());
    let bad = FbankOptions { frame_length: 0.0, ..Default::default() };
    assert!(FbankComputer::new(bad).is_err());
}
