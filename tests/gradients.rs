//! Every trainable variable receives a finite, non-zero gradient through the whole model, for
//! each head and each normalization kind (candle silently drops gradients through some fused
//! ops; this test fails if any of them creeps in).

mod common;

use candle_core::{DType, Tensor};
use klspeech::model::{ForwardCtx, HeadKind, KlSites, LoadOptions, SpecAugment, SpeechModel};
use klspeech::rng::Rng;

fn check(stable: bool, head: HeadKind, sites: KlSites) {
    check_vib(stable, head, sites, None);
}

fn check_vib(stable: bool, head: HeadKind, sites: KlSites, vib_sigma0: Option<f64>) -> Vec<(String, Vec<f32>)> {
    check_on(&common::device(), stable, head, sites, vib_sigma0)
}

/// The checks below on `dev`; returns every variable's gradient.
fn check_on(dev: &candle_core::Device, stable: bool, head: HeadKind, sites: KlSites, vib_sigma0: Option<f64>) -> Vec<(String, Vec<f32>)> {
    let dev = dev.clone();
    let mut cfg = common::tiny_config(stable);
    // With the weighted layer sum, a stable (pre-norm) model never uses `encoder.layer_norm`
    // (transformers 5.x hands the un-normed last layer to the sum), so only post-norm uses it.
    cfg.use_weighted_layer_sum = !stable;
    let opts = LoadOptions { device: dev.clone(), kl_sites: sites, head: Some(head), seed: 3, vib_sigma0, ..Default::default() };
    let model = SpeechModel::fresh(cfg, &opts).unwrap();
    let lengths = [1200usize, 900];
    let x = common::waves(&lengths, DType::F32, &dev);
    let mut ctx = ForwardCtx::train_no_dropout(Rng::new(5));
    // SpecAugment puts `masked_spec_embed` into the graph.
    ctx.spec_augment = Some(SpecAugment {
        mask_time_prob: 0.3,
        mask_time_length: 2,
        mask_time_min_masks: 1,
        mask_feature_prob: 0.0,
        mask_feature_length: 1,
        mask_feature_min_masks: 0,
    });
    let out = model.forward(&x, Some(&lengths), &mut ctx).unwrap();
    let target = match head {
        HeadKind::None => out.encoder.last_hidden_state.clone(),
        _ => out.logits.clone().unwrap(),
    };
    // A loss that depends on every output element with distinct weights.
    let w = Tensor::from_vec(Rng::new(9).normal_vec(target.elem_count()), target.shape(), &dev).unwrap();
    let mut loss = (target * w).unwrap().sum_all().unwrap();
    if let Some(kl) = ctx.kl_total().unwrap() {
        loss = (loss + kl).unwrap();
    }
    // The trainer's backward (parameter gradients stored as the fused ops compute them)
    // against candle's own: the same bits for every variable.
    let (grads, routed) = klspeech::ops::grads::backward_counted(&loss).unwrap();
    let plain = loss.backward().unwrap();
    let mut checked = 0;
    let mut all = Vec::new();
    for (name, var) in model.store.vars() {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient (stable={stable}, {head:?}, {sites})"));
        let v: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
        let reference: Vec<f32> = plain.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no plain gradient")).flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(v, reference, "{name}: ops::backward differs from backward() (stable={stable}, {head:?}, {sites})");
        assert!(v.iter().all(|x| x.is_finite()), "{name}: non-finite gradient");
        let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!(norm > 0.0, "{name}: zero gradient (stable={stable}, {head:?}, {sites})");
        checked += 1;
        all.push((name, v));
    }
    assert!(checked > 30, "only {checked} variables");
    // The big ones came through the sink: every linear layer's weight the op takes directly
    // (all but q, k, v, which train as one concatenated weight) and every feature-encoder
    // convolution's. Off the CPU the device ops (ops::device's linear layer, ops::conv1d_cl_recompute) route
    // the same weights; with the ops switched off nothing routes.
    if !klspeech::ops::fused_applies(&x) && !klspeech::ops::device_op_applies(&x) {
        assert!(routed.is_empty(), "gradients routed with the ops switched off");
        return all;
    }
    let direct = |name: &str| {
        name.ends_with("out_proj.weight") || name.ends_with("dense.weight") || name.ends_with("projection.weight") || (name.contains("conv_layers") && name.ends_with("conv.weight"))
    };
    let mut big = 0;
    for (name, var) in model.store.vars() {
        if direct(&name) {
            assert!(routed.contains(&var.as_tensor().id()), "{name}: gradient not stored through ops::grads");
            big += 1;
        }
    }
    assert!(big >= 8, "only {big} direct weights");
    all
}

/// The GPU's training path (`ops::device`, `ops::conv1d_cl_recompute`, the composites where a
/// GPU has no op), run on the CPU with `ops::with_gpu_path`: every variable gets the gradient
/// the CPU's fused path gives it (and the checks above hold on that path too).
#[test]
fn gpu_training_path_matches_the_cpu_path() {
    let cpu = candle_core::Device::Cpu;
    for (stable, head, sites) in [(false, HeadKind::Ctc, KlSites::All), (true, HeadKind::Classification, KlSites::Encoder)] {
        let fused = check_on(&cpu, stable, head, sites, None);
        let gpu_path = klspeech::ops::with_gpu_path(|| check_on(&cpu, stable, head, sites, None));
        // And with every convolution (feature encoder, positional conv) on the gathered-column
        // gemms (`KLSPEECH_CONV_GEMM=all`), which must have run for every feature-encoder layer
        // and the positional conv: their forwards, weight gradients and (but for the first
        // layer, whose input is the waveform) input gradients, in each of check_on's two
        // backward passes.
        // The positional conv (stride 1) on shared columns of the default taps a row (one
        // chunk for the tiny model's K = 4), of 3 (two chunks, the second padded with zero
        // taps) and on per-chunk columns (0): its forward, two weight and two input gradients.
        use klspeech::ops::conv_gemm::{calls, with_mode, with_shift_taps, Mode, SHIFT_TAPS};
        let convs = common::tiny_config(stable).conv_dim.len() + 1;
        let mut paths = vec![("GPU path".to_string(), gpu_path)];
        for taps in [SHIFT_TAPS, 3, 0] {
            let before = calls();
            let gemm_path = with_shift_taps(taps, || with_mode(Mode::All, || klspeech::ops::with_gpu_path(|| check_on(&cpu, stable, head, sites, None))));
            let ran = calls().since(&before);
            assert!(ran.forward == convs && ran.weight_grad == 2 * convs && ran.input_grad == 2 * (convs - 1), "column gemms: {ran:?}");
            assert_eq!(ran.shifted, if taps > 0 { 5 } else { 0 }, "shared columns of {taps} taps: {ran:?}");
            paths.push((format!("GPU path with column-gemm convolutions, shared columns of {taps} taps"), gemm_path));
        }
        for (what, path) in &paths {
            assert_eq!(fused.len(), path.len());
            // Relative to each gradient's size, with a floor for the gradients that are zero in
            // exact arithmetic (the key projection's bias: softmax ignores a shift common to all
            // keys) and rounding noise in both paths.
            let largest = fused.iter().flat_map(|(_, g)| g.iter()).fold(0f32, |m, v| m.max(v.abs()));
            for ((name, a), (_, b)) in path.iter().zip(&fused) {
                let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                let err = a.iter().zip(b).fold(0f32, |m, (x, y)| if (x - y).is_nan() { f32::INFINITY } else { m.max((x - y).abs()) });
                assert!(err <= 1e-4 * scale + 1e-6 * largest, "{name} (stable={stable}, {head:?}, {sites}): {what} differs by {err:e} of {scale:e}");
            }
        }
    }
}

#[test]
fn every_variable_gets_a_gradient_ctc_layer_norm() {
    check(false, HeadKind::Ctc, KlSites::None);
    check(true, HeadKind::Ctc, KlSites::None);
}

#[test]
fn every_variable_gets_a_gradient_ctc_kl_norm() {
    check(false, HeadKind::Ctc, KlSites::All);
    check(true, HeadKind::Ctc, KlSites::All);
}

#[test]
fn every_variable_gets_a_gradient_classification() {
    for sites in [KlSites::None, KlSites::Encoder, KlSites::All, KlSites::Last(1)] {
        check(false, HeadKind::Classification, sites);
        check(true, HeadKind::Classification, sites);
    }
}

#[test]
fn every_variable_gets_a_gradient_with_vib() {
    // VIB alone (the baseline) and VIB over KL-Norm: the VIB vectors included.
    check_vib(false, HeadKind::Classification, KlSites::None, Some(0.1));
    check_vib(true, HeadKind::Classification, KlSites::Encoder, Some(0.1));
}
