//! Parity with transformers: tiny random checkpoints written by transformers
//! (tools/gen_wav2vec2_fixtures.py) give the same hidden states and logits in klspeech.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use klspeech::model::{ForwardCtx, HeadKind, LoadOptions, ModelOutput, SpeechModel};
use klspeech::infer::{PredictOptions, Prediction, Timestamps};

const TOL: f32 = 1e-4;

fn dir(variant: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/w2v2").join(variant)
}

/// Reference tensors, on the test device (`KLSPEECH_TEST_DEVICE`).
fn reference(variant: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir(variant).join("reference.safetensors"), &common::device()).unwrap()
}

fn opts() -> LoadOptions {
    LoadOptions { device: common::device(), ..Default::default() }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape");
    let a = a.to_dtype(DType::F32).unwrap().to_device(&Device::Cpu).unwrap();
    let b = b.to_dtype(DType::F32).unwrap().to_device(&Device::Cpu).unwrap();
    common::nan_aware_max_abs(&(a - b).unwrap()) as f32
}

fn lengths_of(mask: &Tensor) -> Vec<usize> {
    mask.to_dtype(DType::F32).unwrap().sum(1).unwrap().to_vec1::<f32>().unwrap().iter().map(|&v| v as usize).collect()
}

fn run(model: &SpeechModel, input: &Tensor, lengths: Option<&[usize]>, padding_aware: bool) -> ModelOutput {
    let mut ctx = ForwardCtx::eval().with_padding_aware(padding_aware);
    model.forward(input, lengths, &mut ctx).unwrap()
}

/// Compares every output of one case; returns the worst difference.
fn compare(variant: &str, case: &str, r: &HashMap<String, Tensor>, out: &ModelOutput) -> f32 {
    let mut worst = 0f32;
    let mut check = |name: &str, t: &Tensor| {
        let key = format!("{case}.{name}");
        let d = max_abs_diff(t, &r[&key]);
        assert!(d <= TOL, "{variant} {key}: max abs diff {d:e}");
        worst = worst.max(d);
    };
    check("last_hidden_state", &out.encoder.last_hidden_state);
    check("extract_features", &out.encoder.extract_features);
    let n = out.encoder.hidden_states.len();
    assert!(r.contains_key(&format!("{case}.hidden_states.{}", n - 1)) && !r.contains_key(&format!("{case}.hidden_states.{n}")));
    for (i, h) in out.encoder.hidden_states.iter().enumerate() {
        check(&format!("hidden_states.{i}"), h);
    }
    match (&out.logits, r.get(&format!("{case}.logits"))) {
        (Some(l), Some(_)) => check("logits", l),
        (None, None) => {}
        (a, b) => panic!("{variant} {case}: logits present in klspeech {} / reference {}", a.is_some(), b.is_some()),
    }
    worst
}

fn check_variant(variant: &str, head: HeadKind) {
    let model = SpeechModel::load(&dir(variant), &opts()).unwrap();
    assert_eq!(model.head_kind, head, "{variant}");
    let r = reference(variant);
    let single = run(&model, &r["single.input_values"], None, false);
    let w1 = compare(variant, "single", &r, &single);
    let lengths = lengths_of(&r["padded.attention_mask"]);
    let padded = run(&model, &r["padded.input_values"], Some(&lengths), false);
    let w2 = compare(variant, "padded", &r, &padded);
    println!("{variant}: max abs diff single {w1:e}, padded batch {w2:e}");
}

/// The GPU's inference path, rehearsed on the CPU (`ops::with_gpu_path`; on a GPU with
/// `KLSPEECH_TEST_DEVICE=cuda` the same code with its kernels): the same parity with
/// transformers, and post-norm layers ran their output projections' bias, the residual and
/// the LayerNorm as one op (`ops::residual_layer_norm_infer`: two a layer, each of the
/// single and padded runs), pre-norm ones never.
#[test]
fn the_gpu_inference_path_matches_transformers_too() {
    for (variant, head, fused_sites) in [("base-group-oldwn", HeadKind::None, true), ("cls-weighted", HeadKind::Classification, true), ("stable-ctc-f16", HeadKind::Ctc, false)] {
        let layers = SpeechModel::load(&dir(variant), &opts()).unwrap().config.num_hidden_layers;
        let before = klspeech::ops::residual_layer_norm_calls();
        klspeech::ops::with_gpu_path(|| check_variant(variant, head));
        let ran = klspeech::ops::residual_layer_norm_calls() - before;
        let cuda_kernels = common::device().is_cuda() && std::env::var_os("KLSPEECH_NO_CUDA_KERNELS").is_none_or(|v| v.is_empty() || v == "0");
        let on = (common::device().is_cpu() || cuda_kernels) && klspeech::ops::kernels::kernel_on("residual_layer_norm");
        assert_eq!(ran, if fused_sites && on { 2 * 2 * layers } else { 0 }, "{variant}: one-pass bias, residual and LayerNorm");
    }
}

#[test]
fn base_group_norm_post_norm_with_old_weight_norm_names() {
    check_variant("base-group-oldwn", HeadKind::None);
}

#[test]
fn stable_layer_norm_ctc_from_f16_weights() {
    check_variant("stable-ctc-f16", HeadKind::Ctc);
}

#[test]
fn classification_with_weighted_layer_sum() {
    check_variant("cls-weighted", HeadKind::Classification);
}

#[test]
fn pretraining_checkpoint_in_bf16_loads_as_an_encoder() {
    check_variant("pretraining-bf16", HeadKind::None);
}

/// A model run in bf16 or f16 (parameters and activations, `LoadOptions::dtype`) stays within
/// the rounding of its type of transformers' f32 output: within 3 % (bf16) and 0.5 % (f16) of
/// its largest value, the last hidden state of a group-norm and a layer-norm checkpoint and the
/// logits of a classification one (measured at most 1.7 % and 0.3 %). The first layer's GroupNorm over 12 799 frames once summed in the storage
/// type, candle's reductions' way: 13 % and 1.4 % off.
#[test]
fn bf16_and_f16_models_stay_within_their_rounding_of_transformers() {
    for (variant, output) in [("base-group-oldwn", "last_hidden_state"), ("stable-ctc-f16", "last_hidden_state"), ("cls-weighted", "logits")] {
        let r = reference(variant);
        let want = &r[&format!("single.{output}")];
        let scale = common::nan_aware_max_abs(want);
        for (dtype, tol) in [(DType::BF16, 0.03), (DType::F16, 0.005)] {
            let model = SpeechModel::load(&dir(variant), &LoadOptions { dtype, ..opts() }).unwrap();
            let out = run(&model, &r["single.input_values"].to_dtype(dtype).unwrap(), None, false);
            let got = if output == "logits" { out.logits.unwrap() } else { out.encoder.last_hidden_state };
            assert_eq!(got.dtype(), dtype);
            let e = max_abs_diff(&got, want) as f64 / scale;
            println!("{variant} {output} in {dtype:?}: max abs diff {:.2} % of the largest value", 100.0 * e);
            assert!(e <= tol, "{variant} {output} in {dtype:?}: {:.2} % off transformers' f32 output", 100.0 * e);
        }
    }
}

#[test]
fn padding_aware_mode_gives_each_clip_its_solo_output() {
    let model = SpeechModel::load(&dir("cls-weighted"), &opts()).unwrap();
    let r = reference("cls-weighted");
    let lengths = lengths_of(&r["padded.attention_mask"]);
    let out = run(&model, &r["padded.input_values"], Some(&lengths), true);
    let logits = out.logits.unwrap();
    let mut worst = 0f32;
    for k in 0..3 {
        // transformers' own output for the clip run alone, unpadded.
        let d = max_abs_diff(&logits.narrow(0, k, 1).unwrap(), &r[&format!("unpadded.{k}.logits")]);
        worst = worst.max(d);
        // And klspeech's own solo run, frame by frame.
        let solo_in = r["padded.input_values"].narrow(0, k, 1).unwrap().narrow(1, 0, lengths[k]).unwrap();
        let solo = run(&model, &solo_in, None, true);
        let t = solo.encoder.last_hidden_state.dim(1).unwrap();
        let batch_frames = out.encoder.last_hidden_state.narrow(0, k, 1).unwrap().narrow(1, 0, t).unwrap();
        let d2 = max_abs_diff(&batch_frames, &solo.encoder.last_hidden_state);
        assert!(d2 <= 1e-5, "clip {k}: hidden states in batch vs alone differ by {d2:e}");
    }
    println!("padding-aware: max abs diff of batch logits vs transformers solo runs {worst:e}");
    assert!(worst <= 1e-5, "{worst:e}");
    // Without the mode, group-norm statistics include padding (transformers' behaviour).
    let plain = run(&model, &r["padded.input_values"], Some(&lengths), false).logits.unwrap();
    assert!(max_abs_diff(&plain.narrow(0, 2, 1).unwrap(), &r["unpadded.2.logits"]) > 1e-5);
}

#[test]
fn the_differentiable_path_matches_transformers_too() {
    // Training builds the graph through klspeech's im2col convolutions; same numbers required.
    for variant in ["base-group-oldwn", "stable-ctc-f16"] {
        let model = SpeechModel::load(&dir(variant), &opts()).unwrap();
        let r = reference(variant);
        let lengths = lengths_of(&r["padded.attention_mask"]);
        let out = model.forward(&r["padded.input_values"], Some(&lengths), &mut ForwardCtx::eval_with_grad().with_padding_aware(false)).unwrap();
        let w = compare(variant, "padded", &r, &out);
        println!("{variant} (differentiable path): max abs diff {w:e}");
    }
}

/// The device the suites run on is made as the CLI makes it (`device::parse_device`): on a GPU
/// (KLSPEECH_TEST_DEVICE=cuda) without cudarc's per-buffer CUDA events (`device::new_cuda`),
/// so every parity figure above is taken on that setting; on the CPU there is nothing to track.
#[test]
fn gpu_devices_run_without_cudarcs_per_buffer_events() {
    let dev = common::device();
    let want = if dev.is_cpu() { None } else { Some(false) };
    assert_eq!(klspeech::device::cuda_event_tracking(&dev), want);
    let name = if dev.is_cpu() { "cpu" } else { "cuda" };
    assert_eq!(klspeech::device::cuda_event_tracking(&klspeech::device::parse_device(name).unwrap()), want);
}

/// A GPU device from `device::new_cuda` keeps freed memory in its pool across synchronizations
/// (release threshold u64::MAX; the driver's default 0 hands it all back at every sync, and the
/// next step maps it again). Checked by effect too: 256 MiB freed and synchronized stay in the
/// pool, reserved but unused. Off the GPU there is no pool.
#[test]
fn gpu_memory_pool_keeps_freed_memory_across_synchronizations() {
    let dev = common::device();
    let threshold = klspeech::device::gpu_pool_release_threshold(&dev);
    if dev.is_cpu() {
        assert_eq!((threshold, klspeech::device::gpu_reserved_memory(&dev), klspeech::device::gpu_memory_in_use(&dev)), (None, None, None));
        return;
    }
    assert_eq!(threshold, Some(u64::MAX));
    let bytes = 256u64 << 20;
    let t = candle_core::Tensor::zeros((bytes / 4) as usize, candle_core::DType::F32, &dev).unwrap();
    dev.synchronize().unwrap();
    drop(t);
    dev.synchronize().unwrap();
    let reserved = klspeech::device::gpu_reserved_memory(&dev).expect("the pool's reserved memory");
    let used = klspeech::device::gpu_memory_in_use(&dev).expect("the pool's memory in use");
    assert!(reserved >= used + bytes, "the pool kept {reserved} bytes ({used} in use) after freeing {bytes} and synchronizing");
}

/// `predict --chunk-s` (`infer::chunk_plan`, `infer::ctc_ids_chunked`) against transformers'
/// ASR pipeline with `chunk_length_s` / `stride_length_s` (tools/gen_chunked_ctc_fixture.py): on
/// the bundled CTC model and four test clips joined (9.4 s), the same chunks, strides and kept
/// frames, the same joined frame ids (chunks one by one and three to a batch) and the same
/// text, for the default stride (chunk / 6), one stride, unequal left / right strides, and one
/// chunk longer than the recording; and the same character and word timestamps
/// (`return_timestamps="char"` / `"word"`: text and seconds) there and for the whole recording
/// in one pass (`predict --timestamps`).
#[test]
fn chunked_ctc_transcription_matches_transformers_pipeline() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(root.join("tests/fixtures/chunked_ctc.json")).unwrap()).unwrap();
    let mut x: Vec<f32> = Vec::new();
    for c in r["clips"].as_array().unwrap() {
        x.extend(klspeech::audio::load_resampled(&root.join(c.as_str().unwrap()), 16000).unwrap().samples);
    }
    // The same samples as soundfile's (lossless 16-bit FLAC).
    assert_eq!(x.len() as u64, r["samples"].as_u64().unwrap());
    let sum: f64 = x.iter().map(|&v| v as f64).sum();
    let sum_sq: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
    assert!((sum - r["sum"].as_f64().unwrap()).abs() < 1e-9 && (sum_sq - r["sum_sq"].as_f64().unwrap()).abs() < 1e-6, "{sum} {sum_sq}");
    let d = tempfile::tempdir().unwrap();
    let wav = d.path().join("joined.wav");
    let spec = hound::WavSpec { channels: 1, sample_rate: 16000, bits_per_sample: 32, sample_format: hound::SampleFormat::Float };
    let mut w = hound::WavWriter::create(&wav, spec).unwrap();
    x.iter().for_each(|&v| w.write_sample(v).unwrap());
    w.finalize().unwrap();

    let model = SpeechModel::load(&root.join(r["model"].as_str().unwrap()), &opts()).unwrap();
    let vocab = klspeech::vocab::CharVocab::from_map(model.vocab.as_ref().unwrap(), Path::new("vocab.json")).unwrap();
    let align: usize = model.config.conv_stride.iter().product();
    for case in r["cases"].as_array().unwrap() {
        let chunk_s = case["chunk_s"].as_f64().unwrap();
        let stride = match &case["stride_s"] {
            serde_json::Value::Null => None,
            serde_json::Value::Array(v) => Some((v[0].as_f64().unwrap(), v[1].as_f64().unwrap())),
            v => Some((v.as_f64().unwrap(), v.as_f64().unwrap())),
        };
        let chunking = klspeech::infer::Chunking::new(chunk_s, stride).unwrap();
        let plan = klspeech::infer::chunk_plan(x.len(), 16000, align, &chunking).unwrap();
        let want = case["chunks"].as_array().unwrap();
        assert_eq!(plan.len(), want.len(), "chunk {chunk_s} s: number of chunks");
        let mut want_ids: Vec<usize> = Vec::new();
        for (p, w) in plan.iter().zip(want) {
            let got = [p.end - p.start, p.left, p.right, p.token_n, p.token_left, p.token_right];
            let exp = ["samples", "left", "right", "token_n", "token_left", "token_right"].map(|k| w[k].as_u64().unwrap() as usize);
            assert_eq!(got, exp, "chunk {chunk_s} s, stride {stride:?}: chunk at sample {}", p.start);
            let ids: Vec<usize> = w["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
            let stop = (p.token_n - p.token_right).min(ids.len());
            want_ids.extend_from_slice(&ids[p.token_left.min(stop)..stop]);
        }
        let ids = klspeech::infer::ctc_ids_chunked(&model, &wav, &chunking, 1).unwrap();
        assert_eq!(ids, want_ids, "chunk {chunk_s} s, stride {stride:?}: joined frame ids");
        // Equal-length chunks batched (no padding): the same frames.
        let batched = klspeech::infer::ctc_ids_chunked(&model, &wav, &chunking, 3).unwrap();
        assert_eq!(batched, want_ids, "chunk {chunk_s} s, stride {stride:?}, 3 chunks a batch: joined frame ids");
        let text = vocab.decode(&klspeech::vocab::ctc_greedy(&ids, vocab.pad_id));
        assert_eq!(text, case["text"].as_str().unwrap(), "chunk {chunk_s} s, stride {stride:?}");
        for level in [Timestamps::Char, Timestamps::Word] {
            let got = klspeech::infer::timed_text(&vocab, &ids, level, align, 16000);
            assert_timestamps(&got, case, level, &format!("chunk {chunk_s} s, stride {stride:?}"));
        }
    }
    // The whole recording in one pass, through `predict_file` as the CLI calls it.
    for level in [Timestamps::Char, Timestamps::Word] {
        let opts = PredictOptions { timestamps: Some(level), ..Default::default() };
        let Prediction::Text { text, timestamps, .. } = klspeech::infer::predict_file(&model, &wav, Some(&vocab), &opts).unwrap() else {
            panic!("a CTC model transcribes")
        };
        assert_eq!(text, r["unchunked_text"].as_str().unwrap());
        assert_timestamps(&timestamps, &r["unchunked"], level, "one pass");
    }
}

/// `got` against the pipeline's `{level}_chunks` in `want`: the same texts in order and the same
/// start and stop in seconds (both `frame * 320 / 16000` in f64; 1e-12 allows for JSON's
/// decimal round trip).
fn assert_timestamps(got: &[klspeech::infer::TimedText], want: &serde_json::Value, level: Timestamps, what: &str) {
    let key = match level {
        Timestamps::Char => "char_chunks",
        Timestamps::Word => "word_chunks",
    };
    let want = want[key].as_array().unwrap();
    assert!(!want.is_empty(), "{what}: the fixture has {key}");
    assert_eq!(got.len(), want.len(), "{what}: number of {key}");
    for (g, w) in got.iter().zip(want) {
        let (s, e) = (w["timestamp"][0].as_f64().unwrap(), w["timestamp"][1].as_f64().unwrap());
        assert_eq!(g.text, w["text"].as_str().unwrap(), "{what}: {key} at {s} s");
        assert!((g.start_s - s).abs() < 1e-12 && (g.end_s - e).abs() < 1e-12, "{what}: {key} {:?}: {} .. {} s, want {s} .. {e}", g.text, g.start_s, g.end_s);
    }
}
