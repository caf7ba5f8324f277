//! AdamW, learning-rate schedules and gradient clipping against PyTorch / transformers
//! (fixtures from tools/gen_optim_fixtures.py), plus state round trips and accumulation.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use klspeech::train::optim::{
    clip_coef, clip_grad_norm, clip_to_norm, grads_finite, lr_factor, no_decay, step_probes, AdamW, AdamWConfig, GradAccumulator,
    Schedule,
};

const NAMES: [&str; 3] =
    ["encoder.layers.0.attention.q_proj.weight", "encoder.layers.0.layer_norm.weight", "lm_head.weight"];
const STEPS: usize = 5;
const WARMUP: usize = 2;

fn fixtures(dev: &Device) -> HashMap<String, Tensor> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/optim/optim.safetensors");
    candle_core::safetensors::load(path, dev).unwrap()
}

fn vec1(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1().unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    vec1(a).iter().zip(vec1(b)).map(|(x, y)| (x - y).abs()).fold(0.0, |m: f64, d| if d.is_nan() { f64::INFINITY } else { m.max(d) }) // (f64::max passes over NaN)
}

fn config(f: &HashMap<String, Tensor>) -> AdamWConfig {
    let c = vec1(&f["config"]);
    AdamWConfig { lr: c[0], beta1: c[1], beta2: c[2], eps: c[3], weight_decay: c[4] }
}

fn params(f: &HashMap<String, Tensor>) -> Vec<(String, Var)> {
    NAMES.iter().map(|n| (n.to_string(), Var::from_tensor(&f[&format!("init.{n}")]).unwrap())).collect()
}

fn grads_at(f: &HashMap<String, Tensor>, vars: &[(String, Var)], k: usize) -> GradStore {
    let mut g = GradStore::default();
    for (n, v) in vars {
        g.insert(v.as_tensor(), f[&format!("grad.{k}.{n}")].clone());
    }
    g
}

fn schedule_of(run: &str) -> Schedule {
    run.parse().unwrap()
}

#[test]
fn adamw_matches_torch() {
    let dev = common::device();
    let f = fixtures(&dev);
    let cfg = config(&f);
    assert_eq!(AdamWConfig { lr: cfg.lr, ..AdamWConfig::default() }, cfg, "fixture uses the default betas/eps/decay");
    for run in ["linear", "cosine", "constant"] {
        let vars = params(&f);
        let mut opt = AdamW::new(vars.clone(), cfg).unwrap();
        let expect_factors = vec1(&f[&format!("{run}.factors")]);
        // "constant" is a run without scheduler: constant with no warmup
        let warmup = if run == "constant" { 0 } else { WARMUP };
        let mut worst = 0.0f64;
        for k in 0..STEPS {
            assert_eq!(opt.steps(), k);
            let factor = lr_factor(schedule_of(run), opt.steps(), warmup, STEPS);
            assert_eq!(factor, expect_factors[k], "{run}: factor of update {k}");
            opt.step(&grads_at(&f, &vars, k), factor).unwrap();
            for (n, v) in &vars {
                let d = max_abs_diff(v.as_tensor(), &f[&format!("{run}.after.{k}.{n}")]);
                worst = worst.max(d);
                assert!(d <= 1e-12, "{run}: {n} after update {k}: max abs diff {d:e}");
            }
        }
        for (n, v) in &vars {
            let d = max_abs_diff(v.as_tensor(), &f[&format!("{run}.final.{n}")]);
            assert!(d <= 1e-12, "{run}: final {n}: max abs diff {d:e}");
        }
        println!("{run}: worst max abs diff vs torch over {STEPS} updates: {worst:e}");
    }
}

#[test]
fn schedules_match_transformers() {
    let f = fixtures(&Device::Cpu);
    let mut checked = 0;
    for (key, t) in &f {
        let Some(rest) = key.strip_prefix("schedule.") else { continue };
        let parts: Vec<&str> = rest.split('.').collect();
        let schedule: Schedule = parts[0].parse().unwrap();
        let warmup: usize = parts[1][1..].parse().unwrap();
        let total: usize = parts[2][1..].parse().unwrap();
        for (step, expect) in vec1(t).into_iter().enumerate() {
            let got = lr_factor(schedule, step, warmup, total);
            assert_eq!(got, expect, "{key} at step {step}");
        }
        checked += 1;
    }
    assert_eq!(checked, 15);
    // after the end: 0, and the cosine does not come back up
    assert_eq!(lr_factor(Schedule::Linear, 12, 2, 10), 0.0);
    assert_eq!(lr_factor(Schedule::Cosine, 15, 2, 10), 0.0);
    assert_eq!(lr_factor(Schedule::Constant, 15, 2, 10), 1.0);
}

#[test]
fn schedule_parses() {
    assert_eq!("linear".parse::<Schedule>().unwrap(), Schedule::Linear);
    assert_eq!("Cosine".parse::<Schedule>().unwrap(), Schedule::Cosine);
    assert_eq!("constant".parse::<Schedule>().unwrap(), Schedule::Constant);
    let e = "step".parse::<Schedule>().unwrap_err().to_string();
    assert!(e.contains("step") && e.contains("cosine"), "{e}");
    assert_eq!(Schedule::Cosine.to_string(), "cosine");
}

#[test]
fn clip_matches_torch() {
    let dev = common::device();
    let f = fixtures(&dev);
    for (case, max_norm) in [("small", 1.0), ("big", 100.0)] {
        let vars: Vec<(String, Var)> = (0..3)
            .map(|i| (format!("p{i}"), Var::from_tensor(&f[&format!("clip.in.{i}")].zeros_like().unwrap()).unwrap()))
            .collect();
        let mut grads = GradStore::default();
        for (i, (_, v)) in vars.iter().enumerate() {
            grads.insert(v.as_tensor(), f[&format!("clip.in.{i}")].clone());
        }
        let norm = clip_grad_norm(&mut grads, &vars, max_norm).unwrap();
        let expect = vec1(&f[&format!("clip.{case}.norm")])[0];
        assert!((norm - expect).abs() <= 1e-12, "{case}: norm {norm} vs {expect}");
        for (i, (_, v)) in vars.iter().enumerate() {
            let d = max_abs_diff(grads.get(v.as_tensor()).unwrap(), &f[&format!("clip.{case}.out.{i}")]);
            assert!(d <= 1e-12, "{case}: grad {i}: max abs diff {d:e}");
        }
    }
}

#[test]
fn clip_f32_and_missing_grads() {
    let dev = common::device();
    let a = Var::from_tensor(&Tensor::zeros(2, DType::F32, &dev).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::zeros(3, DType::F32, &dev).unwrap()).unwrap();
    let vars = vec![("a".to_string(), a.clone()), ("b".to_string(), b.clone())];
    let mut grads = GradStore::default();
    grads.insert(a.as_tensor(), Tensor::new(&[3f32, 4.], &dev).unwrap());
    let norm = clip_grad_norm(&mut grads, &vars, 1.0).unwrap();
    assert!((norm - 5.0).abs() < 1e-6);
    let g: Vec<f32> = grads.get(a.as_tensor()).unwrap().to_vec1().unwrap();
    assert!((g[0] - 0.6).abs() < 1e-6 && (g[1] - 0.8).abs() < 1e-6, "{g:?}");
    assert!(grads.get(b.as_tensor()).is_none());
    // nothing at all: norm 0
    let mut empty = GradStore::default();
    assert_eq!(clip_grad_norm(&mut empty, &vars, 1.0).unwrap(), 0.0);
}

#[test]
fn grads_finite_detects_nan_and_inf() {
    let dev = common::device();
    let a = Var::from_tensor(&Tensor::zeros(3, DType::F32, &dev).unwrap()).unwrap();
    let vars = vec![("a".to_string(), a.clone())];
    for (vals, ok) in [([1f32, -2., 3e38], true), ([1., f32::NAN, 0.], false), ([f32::INFINITY, 0., 0.], false), ([0., 0., f32::NEG_INFINITY], false)] {
        let mut g = GradStore::default();
        g.insert(a.as_tensor(), Tensor::new(&vals, &dev).unwrap());
        assert_eq!(grads_finite(&g, &vars).unwrap(), ok, "{vals:?}");
    }
    assert!(grads_finite(&GradStore::default(), &vars).unwrap());
}

/// Runs updates `from..to` of the linear run.
fn run_steps(opt: &mut AdamW, f: &HashMap<String, Tensor>, vars: &[(String, Var)], from: usize, to: usize) {
    for k in from..to {
        assert_eq!(opt.steps(), k);
        opt.step(&grads_at(f, vars, k), lr_factor(Schedule::Linear, k, WARMUP, STEPS)).unwrap();
    }
}

#[test]
fn state_round_trip_resumes_exactly() {
    let dev = common::device();
    let f = fixtures(&dev);
    let cfg = config(&f);

    // uninterrupted
    let full_vars = params(&f);
    let mut full = AdamW::new(full_vars.clone(), cfg).unwrap();
    run_steps(&mut full, &f, &full_vars, 0, STEPS);

    // 2 updates, checkpoint (parameters + optimizer state through a safetensors file), resume
    let vars = params(&f);
    let mut opt = AdamW::new(vars.clone(), cfg).unwrap();
    run_steps(&mut opt, &f, &vars, 0, 2);
    let mut ckpt: HashMap<String, Tensor> = opt.state().unwrap().into_iter().collect();
    assert_eq!(ckpt.len(), 1 + 3 * NAMES.len());
    assert_eq!(vec1(&ckpt["step"]), vec![2.0]);
    for (n, v) in &vars {
        ckpt.insert(format!("param.{n}"), v.as_tensor().clone());
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ckpt.safetensors");
    candle_core::safetensors::save(&ckpt, &path).unwrap();
    let loaded = candle_core::safetensors::load(&path, &dev).unwrap();

    let vars2: Vec<(String, Var)> =
        NAMES.iter().map(|n| (n.to_string(), Var::from_tensor(&loaded[&format!("param.{n}")]).unwrap())).collect();
    let mut opt2 = AdamW::new(vars2.clone(), cfg).unwrap();
    opt2.load_state(&loaded).unwrap();
    assert_eq!(opt2.steps(), 2);
    run_steps(&mut opt2, &f, &vars2, 2, STEPS);

    for ((n, a), (_, b)) in full_vars.iter().zip(&vars2) {
        assert_eq!(vec1(a.as_tensor()), vec1(b.as_tensor()), "{n}: resumed run differs");
        let d = max_abs_diff(b.as_tensor(), &f[&format!("linear.final.{n}")]);
        assert!(d <= 1e-12, "{n}: {d:e}");
    }
    let s1: HashMap<String, Tensor> = full.state().unwrap().into_iter().collect();
    let s2: HashMap<String, Tensor> = opt2.state().unwrap().into_iter().collect();
    assert_eq!(s1.len(), s2.len());
    for (k, t) in &s1 {
        assert_eq!(vec1(t), vec1(&s2[k]), "state {k}");
    }
}

#[test]
fn load_state_names_missing_key() {
    let dev = common::device();
    let f = fixtures(&dev);
    let vars = params(&f);
    let mut opt = AdamW::new(vars.clone(), config(&f)).unwrap();
    run_steps(&mut opt, &f, &vars, 0, 1);
    let state: HashMap<String, Tensor> = opt.state().unwrap().into_iter().collect();
    for key in ["step", "step.lm_head.weight", "v.lm_head.weight", "m.encoder.layers.0.layer_norm.weight"] {
        let mut s = state.clone();
        s.remove(key);
        let mut fresh = AdamW::new(params(&f), config(&f)).unwrap();
        let e = fresh.load_state(&s).unwrap_err().to_string();
        assert!(e.contains(&format!("`{key}`")), "{key}: {e}");
        assert_eq!(fresh.steps(), 0, "failed load changes nothing");
    }
    // wrong shape
    let mut s = state.clone();
    s.insert("m.lm_head.weight".into(), Tensor::zeros(3, DType::F64, &dev).unwrap());
    let e = AdamW::new(params(&f), config(&f)).unwrap().load_state(&s).unwrap_err().to_string();
    assert!(e.contains("m.lm_head.weight"), "{e}");
}

#[test]
fn params_without_grad_are_frozen() {
    let dev = common::device();
    let f = fixtures(&dev);
    let vars = params(&f);
    let mut opt = AdamW::new(vars.clone(), config(&f)).unwrap();
    let frozen = "encoder.layers.0.layer_norm.weight";
    for k in 0..3 {
        let mut g = grads_at(&f, &vars, k);
        g.remove(vars[1].1.as_tensor());
        opt.step(&g, 1.0).unwrap();
    }
    assert_eq!(vec1(vars[1].1.as_tensor()), vec1(&f[&format!("init.{frozen}")]));
    assert!(max_abs_diff(vars[0].1.as_tensor(), &f[&format!("init.{}", NAMES[0])]) > 1e-3);
    let state: HashMap<String, Tensor> = opt.state().unwrap().into_iter().collect();
    assert_eq!(vec1(&state[&format!("step.{frozen}")]), vec![0.0]);
    assert_eq!(vec1(&state[&format!("step.{}", NAMES[0])]), vec![3.0]);
    assert!(!state.contains_key(&format!("m.{frozen}")) && !state.contains_key(&format!("v.{frozen}")));
    assert_eq!(opt.steps(), 3);
    // and a round trip of a partially frozen state works
    let mut opt2 = AdamW::new(params(&f), config(&f)).unwrap();
    opt2.load_state(&state).unwrap();
    assert_eq!(opt2.steps(), 3);
}

#[test]
fn adamw_rejects_duplicates() {
    let v = Var::zeros(2, DType::F32, &Device::Cpu).unwrap();
    let w = Var::zeros(2, DType::F32, &Device::Cpu).unwrap();
    assert!(AdamW::new(vec![("a".into(), v.clone()), ("a".into(), w.clone())], AdamWConfig::default()).is_err());
    assert!(AdamW::new(vec![("a".into(), v.clone()), ("b".into(), v.clone())], AdamWConfig::default()).is_err());
    assert!(AdamW::new(vec![("a".into(), v), ("b".into(), w)], AdamWConfig::default()).is_ok());
}

#[test]
fn adamw_f32_step_on_device() {
    // a quick f32 check that decay / no-decay groups are applied: zero gradient, lr 1
    let dev = common::device();
    let w = Var::from_tensor(&Tensor::new(&[1f32, -2.], &dev).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::new(&[1f32, -2.], &dev).unwrap()).unwrap();
    let vars = vec![("lm_head.weight".to_string(), w.clone()), ("lm_head.bias".to_string(), b.clone())];
    let cfg = AdamWConfig { lr: 1.0, weight_decay: 0.5, ..AdamWConfig::default() };
    let mut opt = AdamW::new(vars, cfg).unwrap();
    let mut g = GradStore::default();
    g.insert(w.as_tensor(), Tensor::zeros(2, DType::F32, &dev).unwrap());
    g.insert(b.as_tensor(), Tensor::zeros(2, DType::F32, &dev).unwrap());
    opt.step(&g, 1.0).unwrap();
    assert_eq!(w.as_tensor().to_vec1::<f32>().unwrap(), vec![0.5, -1.0]);
    assert_eq!(b.as_tensor().to_vec1::<f32>().unwrap(), vec![1.0, -2.0]);
}

#[test]
fn grad_accumulator_averages_micro_batches() {
    let dev = common::device();
    let w = Var::from_tensor(&Tensor::new(&[1f64, 2., 3.], &dev).unwrap()).unwrap();
    let frozen = Var::from_tensor(&Tensor::new(&[1f64], &dev).unwrap()).unwrap();
    let vars = vec![("w".to_string(), w.clone())];
    let xs = [[1f64, 0., 2.], [3., 4., -2.], [0.5, 0.5, 0.5]];
    let mut acc = GradAccumulator::new();
    for x in &xs {
        let x = Tensor::new(x, &dev).unwrap();
        // loss = sum((w * x)^2 / 2) * frozen ; d/dw = w x² * frozen
        let loss = (w.as_tensor().mul(&x).unwrap().sqr().unwrap().sum_all().unwrap() * 0.5)
            .unwrap()
            .broadcast_mul(frozen.as_tensor())
            .unwrap();
        let grads = loss.backward().unwrap();
        acc.add(grads, &vars, 1.0 / xs.len() as f64).unwrap();
    }
    assert_eq!(acc.micro_batches(), 3);
    // only the vars' gradients are kept, not the intermediates' (nor `frozen`'s, not in vars)
    assert_eq!(acc.grads().get_ids().count(), 1);
    let g = acc.take();
    assert_eq!(acc.micro_batches(), 0);
    let got = vec1(g.get(w.as_tensor()).unwrap());
    let wv = [1f64, 2., 3.];
    for i in 0..3 {
        let expect = xs.iter().map(|x| wv[i] * x[i] * x[i]).sum::<f64>() / 3.0;
        assert!((got[i] - expect).abs() < 1e-12, "{i}: {} vs {expect}", got[i]);
    }
    // the result feeds clip + step like any GradStore
    let mut g = g;
    assert!(grads_finite(&g, &vars).unwrap());
    clip_grad_norm(&mut g, &vars, 1.0).unwrap();
    let mut opt = AdamW::new(vars.clone(), AdamWConfig::default()).unwrap();
    opt.step(&g, 1.0).unwrap();
    assert_eq!(opt.steps(), 1);
}

#[test]
fn no_decay_classification() {
    for n in [
        "lm_head.bias",
        "encoder.layers.0.attention.q_proj.bias",
        "encoder.layers.0.layer_norm.weight",
        "encoder.layers.0.layer_norm.bias",
        "encoder.layers.0.layer_norm.kl_a",
        "encoder.layers.0.layer_norm.kl_b",
        "encoder.layers.11.final_layer_norm.weight",
        "encoder.layer_norm.weight",
        "feature_projection.layer_norm.weight",
        "feature_extractor.conv_layers.0.layer_norm.weight", // GroupNorm, named layer_norm
        "feature_extractor.conv_layers.0.layer_norm.bias",
        "encoder.pos_conv_embed.conv.weight_g",
        "encoder.pos_conv_embed.conv.bias",
        "layer_weights",
        "masked_spec_embed",
        "wav2vec2.masked_spec_embed",
        "encoder.layers.0.kl_norm.kl_a",
        "classifier.bias",
        "projector.bias",
    ] {
        assert!(no_decay(n), "{n} should not decay");
    }
    for n in [
        "encoder.layers.0.attention.q_proj.weight",
        "encoder.layers.0.attention.out_proj.weight",
        "encoder.layers.0.feed_forward.intermediate_dense.weight",
        "encoder.layers.0.feed_forward.output_dense.weight",
        "feature_extractor.conv_layers.3.conv.weight",
        "feature_projection.projection.weight",
        "encoder.pos_conv_embed.conv.weight_v",
        "lm_head.weight",
        "classifier.weight",
        "projector.weight",
    ] {
        assert!(!no_decay(n), "{n} should decay");
    }
}

#[test]
fn fused_in_place_adamw_is_bit_for_bit_the_composite() {
    // f64 (the fixtures) and f32, decay and no-decay parameters, 5 updates.
    for dtype in [DType::F64, DType::F32] {
        let f: HashMap<String, Tensor> = fixtures(&Device::Cpu).into_iter().map(|(k, t)| (k, t.to_dtype(dtype).unwrap())).collect();
        let cfg = config(&f);
        let mut finals = Vec::new();
        for fused in [true, false] {
            let vars = params(&f);
            let mut opt = AdamW::new(vars.clone(), cfg).unwrap();
            opt.set_fused(fused);
            run_steps(&mut opt, &f, &vars, 0, STEPS);
            let state: HashMap<String, Tensor> = opt.state().unwrap().into_iter().collect();
            finals.push((vars.iter().map(|(_, v)| vec1(v.as_tensor())).collect::<Vec<_>>(), state));
        }
        assert_eq!(finals[0].0, finals[1].0, "{dtype:?}: parameters differ");
        for (k, t) in &finals[0].1 {
            assert_eq!(vec1(t), vec1(&finals[1].1[k]), "{dtype:?}: state {k}");
        }
    }
}

/// The grouped update (the default off the CPU: one flat buffer per group of parameters with
/// the same decay, step count and dtype) against the per-parameter composite: the same bits for
/// every parameter and moment, also when parameters sit out steps (their groups split and
/// re-form) and across a checkpoint resume.
#[test]
fn grouped_adamw_is_bit_for_bit_the_composite() {
    for dtype in [DType::F64, DType::F32] {
        let f: HashMap<String, Tensor> = fixtures(&Device::Cpu).into_iter().map(|(k, t)| (k, t.to_dtype(dtype).unwrap())).collect();
        let cfg = config(&f);
        // Parameter 0 sits out step 1, parameter 1 steps 2 and 3.
        let grads = |vars: &[(String, Var)], k: usize| {
            let mut g = grads_at(&f, vars, k);
            if k == 1 {
                g.remove(vars[0].1.as_tensor());
            }
            if k == 2 || k == 3 {
                g.remove(vars[1].1.as_tensor());
            }
            g
        };
        let run = |grouped: bool, resume_at: Option<usize>| {
            let vars = params(&f);
            let mut opt = AdamW::new(vars.clone(), cfg).unwrap();
            opt.set_fused(false);
            opt.set_grouped(grouped);
            for k in 0..STEPS {
                if resume_at == Some(k) {
                    let state: HashMap<String, Tensor> = opt.state().unwrap().into_iter().collect();
                    opt = AdamW::new(vars.clone(), cfg).unwrap();
                    opt.set_fused(false);
                    opt.set_grouped(grouped);
                    opt.load_state(&state).unwrap();
                }
                opt.step(&grads(&vars, k), lr_factor(Schedule::Linear, k, WARMUP, STEPS)).unwrap();
            }
            let state: HashMap<String, Tensor> = opt.state().unwrap().into_iter().collect();
            (vars.iter().map(|(_, v)| vec1(v.as_tensor())).collect::<Vec<_>>(), state)
        };
        let composite = run(false, None);
        for (what, grouped) in [("grouped", run(true, None)), ("grouped, resumed at step 3", run(true, Some(3)))] {
            assert_eq!(grouped.0, composite.0, "{dtype:?} {what}: parameters differ");
            assert_eq!(grouped.1.len(), composite.1.len());
            for (k, t) in &composite.1 {
                assert_eq!(vec1(t), vec1(&grouped.1[k]), "{dtype:?} {what}: state {k}");
            }
        }
    }
}

/// Inference keeps transposed copies of the linear weights; an optimizer step changes the
/// weights in place, and the next inference must see the new values (the copies are rebuilt
/// for the new parameter epoch), exactly as the uncached differentiable path computes them.
#[test]
fn inference_after_an_optimizer_step_sees_the_new_weights() {
    use klspeech::model::{ForwardCtx, HeadKind, KlSites, LoadOptions, SpeechModel};
    let mut cfg = common::tiny_config(false);
    cfg.set_labels(&["a".to_string(), "b".to_string()]);
    let opts = LoadOptions { kl_sites: KlSites::None, head: Some(HeadKind::Classification), seed: 2, ..Default::default() };
    let model = SpeechModel::fresh(cfg, &opts).unwrap();
    let x = common::waves(&[2400, 1900], DType::F32, &Device::Cpu);
    let lengths = [2400usize, 1900];
    let logits = |ctx: &mut ForwardCtx| model.forward(&x, Some(&lengths), ctx).unwrap().logits.unwrap();
    let loss = klspeech::loss::cross_entropy(&logits(&mut ForwardCtx::train_no_dropout(klspeech::rng::Rng::new(0))), &[0, 1], 0.0).unwrap();
    let grads = loss.backward().unwrap();
    // Cached inference (builds the copies after the training pass released them) and the
    // uncached graph path agree...
    let reference_before = logits(&mut ForwardCtx::eval_with_grad());
    let before = logits(&mut ForwardCtx::eval());
    assert!(max_abs_diff(&before, &reference_before) < 1e-5);
    // ...one step with a large learning rate moves every weight in place...
    let mut opt = AdamW::new(model.store.vars(), AdamWConfig { lr: 0.05, ..Default::default() }).unwrap();
    opt.step(&grads, 1.0).unwrap();
    // ...and cached inference follows them.
    let after = logits(&mut ForwardCtx::eval());
    let reference = logits(&mut ForwardCtx::eval_with_grad());
    assert!(max_abs_diff(&after, &before) > 1e-3, "the step changed nothing");
    assert!(max_abs_diff(&after, &reference) < 1e-5, "inference used stale weights: {}", max_abs_diff(&after, &reference));
}

/// Pure half-precision AdamW (bf16 / f16 parameters and moments, as the GPU benchmark's bf16
/// training) through the optimizer on the test device as a GPU runs it (on the CPU: rehearsing
/// the GPU's path): the half-type update per parameter (`ops::kernels::apply_half_adamw`), to
/// the bit `common::adamw_half_reference` with the optimizer's scalars (the schedule's rate,
/// decay except for biases and norms, bias corrections of each step) for parameters and
/// moments. With `KLSPEECH_NO_HALF_KERNELS=1` the half-type composite runs, rounding after each
/// operation: within a few units of the type's rounding of it.
#[test]
fn half_precision_adamw_is_the_f32_arithmetic_rounded() {
    let dev = common::device();
    let switched_off = std::env::var_os("KLSPEECH_NO_HALF_KERNELS").is_some_and(|v| !v.is_empty() && v != "0");
    for dtype in [DType::BF16, DType::F16] {
        let f = fixtures(&Device::Cpu);
        let cfg = config(&f);
        let round = common::round_to(dtype);
        let host = |t: &Tensor| t.flatten_all().unwrap().to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
        let grad = |k: usize, n: &str| f[&format!("grad.{k}.{n}")].to_dtype(dtype).unwrap();
        let vars: Vec<(String, Var)> = NAMES.iter().map(|n| (n.to_string(), Var::from_tensor(&f[&format!("init.{n}")].to_dtype(dtype).unwrap().to_device(&dev).unwrap()).unwrap())).collect();
        let mut opt = AdamW::new(vars.clone(), cfg).unwrap();
        // The reference per parameter: (theta, [m; v]) as f32 values of the type.
        let mut want: Vec<(Vec<f32>, Vec<f32>)> = vars.iter().map(|(_, v)| (host(v.as_tensor()), vec![0f32; 2 * v.elem_count()])).collect();
        // A few units of the type's rounding of the largest value (bf16: 2^-8, f16: 2^-11).
        let tol = if dtype == DType::BF16 { 2e-2 } else { 2e-3 };
        for k in 0..STEPS {
            let lr = cfg.lr * lr_factor(Schedule::Linear, k, WARMUP, STEPS);
            let mut g = GradStore::default();
            for (n, v) in &vars {
                g.insert(v.as_tensor(), grad(k, n).to_device(&dev).unwrap());
            }
            klspeech::ops::with_gpu_path(|| opt.step(&g, lr / cfg.lr)).unwrap();
            let t = (k + 1) as i32;
            let state: HashMap<String, Tensor> = opt.state().unwrap().into_iter().collect();
            for ((n, v), (theta_r, mv_r)) in vars.iter().zip(want.iter_mut()) {
                let p = klspeech::ops::AdamWScalars {
                    beta1: cfg.beta1,
                    beta2: cfg.beta2,
                    eps: cfg.eps,
                    decay: (!no_decay(n) && cfg.weight_decay != 0.0).then_some(1.0 - lr * cfg.weight_decay),
                    bias_correction2_sqrt: (1.0 - cfg.beta2.powi(t)).sqrt(),
                    step_size: lr / (1.0 - cfg.beta1.powi(t)),
                    grad_scale: None,
                };
                common::adamw_half_reference(theta_r, mv_r, &host(&grad(k, n)), &p, &round);
                assert_eq!(v.as_tensor().dtype(), dtype, "{n}");
                let got_mv: Vec<f32> = host(&state[&format!("m.{n}")]).into_iter().chain(host(&state[&format!("v.{n}")])).collect();
                for (what, a, b) in [("parameter", host(v.as_tensor()), theta_r.clone()), ("moments", got_mv, mv_r.clone())] {
                    if switched_off {
                        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
                        let err = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                        assert!(err <= tol * scale, "{dtype:?} step {k}: {n} {what} on {dev:?} off by {err:e} of {scale:e}");
                    } else {
                        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "{dtype:?} step {k}: {n} {what} on {dev:?} is not the half-type update");
                    }
                }
            }
        }
    }
}

/// The update with clipping's scale folded in (`AdamW::step_scaled`, what `klspeech train`
/// runs) is bit for bit the scaled gradients (`clip_to_norm`, candle's affine) then the update,
/// on every path: the CPU's fused update (which reads `g s + 0` as it goes), the composite and
/// the grouped one; f64 and f32, gradients with +0 and -0 among their values, steps with and
/// without a scale. On the test device: on a GPU the fused update is klspeech's one-kernel
/// step, which reads the scale with the gradient (`kl_adam_step_scaled`), against candle's
/// affine on the GPU then the unscaled kernel.
#[test]
fn scaled_update_is_the_clipped_gradients_then_the_update() {
    let dev = common::device();
    for dtype in [DType::F64, DType::F32] {
        let f: HashMap<String, Tensor> = fixtures(&dev).into_iter().map(|(k, t)| (k, t.to_dtype(dtype).unwrap())).collect();
        let cfg = config(&f);
        // Step k's gradients with a +0 and a -0 planted in each.
        let grads = |vars: &[(String, Var)], k: usize| -> GradStore {
            let mut g = GradStore::default();
            for (n, v) in vars {
                let mut x = vec1(&f[&format!("grad.{k}.{n}")]);
                x[0] = 0.0;
                let last = x.len() - 1;
                x[last] = -0.0;
                g.insert(v.as_tensor(), Tensor::from_vec(x, v.as_tensor().shape(), &Device::Cpu).unwrap().to_dtype(dtype).unwrap().to_device(&dev).unwrap());
            }
            g
        };
        let scale = |k: usize| (k != 2).then_some(0.3 + 0.1 * k as f64);
        for (what, fused, grouped) in [("fused", true, false), ("composite", false, false), ("grouped", false, true)] {
            let run = |folded: bool| {
                let vars = params(&f);
                let mut opt = AdamW::new(vars.clone(), cfg).unwrap();
                opt.set_fused(fused);
                opt.set_grouped(grouped);
                for k in 0..STEPS {
                    let mut g = grads(&vars, k);
                    let lr = lr_factor(Schedule::Linear, k, WARMUP, STEPS);
                    if folded {
                        opt.step_scaled(&g, lr, scale(k)).unwrap();
                    } else {
                        if let Some(s) = scale(k) {
                            // clip_to_norm's scale for a norm of 1 / s - 1e-6.
                            let norm = 1.0 / s - 1e-6;
                            clip_to_norm(&mut g, &vars, 1.0, norm).unwrap();
                        }
                        opt.step(&g, lr).unwrap();
                    }
                }
                let state: HashMap<String, Tensor> = opt.state().unwrap().into_iter().collect();
                let bits = |t: &Tensor| vec1(t).iter().map(|x| x.to_bits()).collect::<Vec<u64>>();
                (vars.iter().map(|(_, v)| bits(v.as_tensor())).collect::<Vec<_>>(), state.iter().map(|(k, t)| (k.clone(), bits(t))).collect::<HashMap<_, _>>())
            };
            let (a, b) = (run(false), run(true));
            assert_eq!(a.0, b.0, "{dtype:?} {what} on {dev:?}: parameters differ");
            assert_eq!(a.1, b.1, "{dtype:?} {what} on {dev:?}: optimizer state differs");
        }
    }
    // The scale itself: clip_grad_norm_'s max_norm / (norm + 1e-6) below 1, else none.
    assert_eq!(clip_coef(1.0, 3.0), Some(1.0 / (3.0 + 1e-6)));
    assert_eq!((clip_coef(1.0, 0.5), clip_coef(1.0, f64::INFINITY), clip_coef(1.0, f64::NAN)), (None, None, None));
}

/// The step's probes in one pass on the CPU (`step_probes`: f64 squares and sums) against the
/// separate candle-op probes (a gradient that is a transposed view sends every gradient there)
/// and an f64 sum of squares written out here: the same non-finite verdicts (NaN, +-inf, an
/// f64 value whose square overflows but is finite), sums within 1e-6 of each other and 1e-12
/// of the f64 reference; no gradient at all gives none.
#[test]
fn step_probes_in_one_pass_match_the_separate_probes() {
    let big = 1e200f64;
    for dtype in [DType::F32, DType::F64] {
        for (case, poison) in [None, Some(f64::NAN), Some(f64::INFINITY), Some(f64::NEG_INFINITY), Some(big)].into_iter().enumerate() {
            if dtype == DType::F32 && poison == Some(big) {
                continue;
            }
            let shapes: [&[usize]; 3] = [&[300, 70], &[5], &[40000]];
            let vars: Vec<(String, Var)> = shapes.iter().enumerate().map(|(i, s)| (format!("p{i}"), Var::zeros(*s, dtype, &Device::Cpu).unwrap())).collect();
            let mut values: Vec<Vec<f64>> = shapes.iter().enumerate().map(|(i, s)| klspeech::rng::Rng::new(40 + i as u64).normal_vec(s.iter().product()).into_iter().map(|v| v as f64 * 3.0).collect()).collect();
            if let Some(p) = poison {
                values[2][12345] = p;
            }
            let store = |transposed: bool| {
                let mut g = GradStore::default();
                for (i, (_, v)) in vars.iter().enumerate() {
                    let t = Tensor::from_vec(values[i].clone(), shapes[i], &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
                    // A transposed copy's transpose: the same values, not contiguous.
                    let t = if transposed && i == 0 { t.t().unwrap().contiguous().unwrap().t().unwrap() } else { t };
                    g.insert(v.as_tensor(), t);
                }
                g
            };
            let read = |p: &Option<Tensor>| p.as_ref().unwrap().to_scalar::<f64>().unwrap();
            let [probe, sq] = step_probes(&store(false), &vars, true).unwrap();
            let [probe_s, sq_s] = step_probes(&store(true), &vars, true).unwrap();
            let what = format!("{dtype:?}, case {case}");
            let finite = poison.is_none_or(|p| p.is_finite());
            assert_eq!((read(&probe).is_finite(), read(&probe_s).is_finite()), (finite, finite), "{what}: non-finite verdicts");
            // f64 squares of the stored values, summed in f64.
            let want: f64 = values.iter().flatten().map(|&v| if dtype == DType::F32 { (v as f32) as f64 } else { v }).map(|v| v * v).sum();
            let (got, sep) = (read(&sq), read(&sq_s));
            if want.is_finite() {
                assert!((got - want).abs() <= 1e-12 * want, "{what}: one pass {got} vs f64 {want}");
                assert!((sep - want).abs() <= 1e-6 * want, "{what}: separate probes {sep} vs f64 {want}");
            } else {
                assert!(!got.is_finite() && !sep.is_finite(), "{what}: sums {got}, {sep} where the f64 sum is {want}");
            }
            let [p, q] = step_probes(&store(false), &vars, false).unwrap();
            assert!(p.is_some() && q.is_none(), "{what}: no norm asked");
        }
    }
    let vars = vec![("a".to_string(), Var::zeros(3, DType::F32, &Device::Cpu).unwrap())];
    let [p, q] = step_probes(&GradStore::default(), &vars, true).unwrap();
    assert!(p.is_none() && q.is_none(), "no gradient: no probes");
}

/// The step's probes on the test device (on a GPU one kernel a gradient into one buffer of
/// partial sums, `ops::kernels::sum_sq_of`; on the CPU one parallel pass) against an f64 sum
/// of squares of the same values: within 1e-7, and the non-finite verdict for a NaN and an
/// infinity in one gradient; in f32, and in bf16 where the device runs bf16 training.
#[test]
fn step_probes_on_the_test_device_match_f64() {
    let dev = common::device();
    let dtypes: &[DType] = if dev.is_cpu() { &[DType::F32] } else { &[DType::F32, DType::BF16] };
    for &dtype in dtypes {
        for poison in [None, Some(f64::NAN), Some(f64::INFINITY)] {
            let shapes: [&[usize]; 3] = [&[768, 300], &[7], &[3072 * 50]];
            let vars: Vec<(String, Var)> = shapes.iter().enumerate().map(|(i, s)| (format!("p{i}"), Var::zeros(*s, dtype, &dev).unwrap())).collect();
            let mut g = GradStore::default();
            let mut want = 0f64;
            for (i, (_, v)) in vars.iter().enumerate() {
                let mut x = klspeech::rng::Rng::new(60 + i as u64).normal_vec(shapes[i].iter().product());
                if i == 2 {
                    if let Some(p) = poison {
                        x[777] = p as f32;
                    }
                }
                let t = Tensor::from_vec(x, shapes[i], &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
                want += vec1(&t).iter().map(|v| v * v).sum::<f64>();
                g.insert(v.as_tensor(), t.to_device(&dev).unwrap());
            }
            let [probe, sq] = step_probes(&g, &vars, true).unwrap();
            let read = |p: &Option<Tensor>| p.as_ref().unwrap().to_device(&Device::Cpu).unwrap().to_scalar::<f64>().unwrap();
            let (p, s) = (read(&probe), read(&sq));
            let what = format!("{dtype:?} on {dev:?}, poison {poison:?}");
            assert_eq!(p.is_finite(), poison.is_none(), "{what}: probe {p}");
            if poison.is_none() {
                assert!((s - want).abs() <= 1e-7 * want, "{what}: {s} vs the f64 sum {want}");
                assert!(grads_finite(&g, &vars).unwrap(), "{what}");
            } else {
                assert!(!s.is_finite(), "{what}: sum {s}");
                assert!(!grads_finite(&g, &vars).unwrap(), "{what}");
            }
        }
    }
}
