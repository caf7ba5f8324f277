//! KL-Norm (../shared/KLNORM.md): evaluation equals the replaced norm bit for bit, the KL is
//! the closed form, gradients match finite differences, sites and prior are configurable, and
//! the added parameters stay under 0.1% of wav2vec2-base.

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use klspeech::model::norm::{inv_softplus, KlPrior, KlSettings, Norm, NormAxis};
use klspeech::model::{ForwardCtx, HeadKind, KlSites, LoadOptions, ParamStore, SpeechModel, Wav2Vec2Config};
use klspeech::rng::Rng;

fn fixture(v: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/w2v2").join(v)
}

#[test]
fn evaluation_is_bit_for_bit_the_replaced_normalization() {
    for variant in ["base-group-oldwn", "stable-ctc-f16", "cls-weighted"] {
        let plain = SpeechModel::load(&fixture(variant), &LoadOptions::default()).unwrap();
        let kl = SpeechModel::load(&fixture(variant), &LoadOptions { kl_sites: KlSites::All, ..Default::default() }).unwrap();
        assert!(kl.encoder.norm_sites().iter().all(|(_, is_kl)| *is_kl));
        let x = common::waves(&[4000, 3000], DType::F32, &Device::Cpu);
        for lengths in [None, Some(&[4000usize, 3000][..])] {
            let a = plain.forward(&x, lengths, &mut ForwardCtx::eval()).unwrap();
            let b = kl.forward(&x, lengths, &mut ForwardCtx::eval()).unwrap();
            assert_eq!(common::max_abs_diff(&a.encoder.last_hidden_state, &b.encoder.last_hidden_state), 0.0, "{variant}");
            for (ha, hb) in a.encoder.hidden_states.iter().zip(&b.encoder.hidden_states) {
                assert_eq!(common::max_abs_diff(ha, hb), 0.0, "{variant}");
            }
            if let (Some(la), Some(lb)) = (&a.logits, &b.logits) {
                assert_eq!(common::max_abs_diff(la, lb), 0.0, "{variant}");
            }
        }
    }
}

fn softplus(z: f64) -> f64 {
    z.max(0.0) + (-z.abs()).exp().ln_1p()
}

/// Builds one KL-Norm site with hand-set parameters and checks output and KL against a scalar
/// re-implementation of the definition.
fn closed_form_case(axis: NormAxis, prior: KlPrior) {
    let dev = Device::Cpu;
    let store = ParamStore::fresh(DType::F64, &dev, 0);
    let d = 5;
    let settings = KlSettings { sigma0: 0.3, prior };
    let norm = Norm::load(&store.root().pp("site"), d, axis, 1e-5, Some(settings)).unwrap();
    let mut r = Rng::new(42);
    let set = |name: &str, f: &mut dyn FnMut() -> f64| {
        let (_, var) = store.vars().into_iter().find(|(k, _)| k == name).unwrap();
        let v: Vec<f64> = (0..d).map(|_| f()).collect();
        var.set(&Tensor::from_vec(v, d, &dev).unwrap()).unwrap();
    };
    set("site.weight", &mut || 1.0 + 0.3 * r.normal());
    set("site.bias", &mut || 0.2 * r.normal());
    set("site.kl_a", &mut || 0.5 * r.normal());
    set("site.kl_b", &mut || -1.0 + 0.3 * r.normal());
    if prior == KlPrior::Learned {
        set("site.kl_prior_mean", &mut || 0.3 * r.normal());
        set("site.kl_prior_std", &mut || 0.5 * r.normal());
    }
    let get = |name: &str| -> Vec<f64> {
        store.vars().into_iter().find(|(k, _)| k == name).unwrap().1.as_tensor().to_vec1::<f64>().unwrap()
    };
    let (gamma, beta, a, b) = (get("site.weight"), get("site.bias"), get("site.kl_a"), get("site.kl_b"));

    // x: LastDim [B=2, T=3, D]; Time [B=2, C=D, T=3]. Clip 1 has 2 valid frames.
    let (bsz, t) = (2, 3);
    let xv: Vec<f64> = (0..bsz * t * d).map(|_| r.normal() * 2.0 + 0.5).collect();
    let shape: Vec<usize> = match axis {
        NormAxis::LastDim => vec![bsz, t, d],
        NormAxis::Time => vec![bsz, d, t],
    };
    let x = Tensor::from_vec(xv.clone(), shape.as_slice(), &dev).unwrap();
    let lens = [3usize, 2];
    let mask = Tensor::from_vec(vec![1.0, 1.0, 1.0, 1.0, 1.0, 0.0], (2, 3), &dev).unwrap();
    let mut ctx = ForwardCtx::train_no_dropout(Rng::new(7));
    let y = norm.forward(&x, Some(&mask), &mut ctx).unwrap();
    let y: Vec<f64> = y.flatten_all().unwrap().to_vec1().unwrap();
    let noise: Vec<f64> = Rng::new(7).normal_vec(xv.len()).into_iter().map(f64::from).collect();
    assert_eq!(ctx.kl_terms.len(), 1);
    let kl_got = ctx.kl_terms[0].1.to_scalar::<f64>().unwrap();

    // Scalar reference.
    let idx = |bi: usize, ti: usize, f: usize| match axis {
        NormAxis::LastDim => (bi * t + ti) * d + f,
        NormAxis::Time => (bi * d + f) * t + ti,
    };
    let (m_p, s_p): (Vec<f64>, Vec<f64>) = if prior == KlPrior::Learned {
        (get("site.kl_prior_mean"), get("site.kl_prior_std").into_iter().map(softplus).collect())
    } else {
        (vec![0.0; d], vec![1.0; d])
    };
    let mut kl_sum = 0.0;
    let mut n_pos = 0.0;
    for bi in 0..bsz {
        for ti in 0..t {
            for f in 0..d {
                // statistics of the replaced layer; GroupNorm over the clip's valid frames
                // (training is padding-aware).
                let group: Vec<f64> = match axis {
                    NormAxis::LastDim => (0..d).map(|g| xv[idx(bi, ti, g)]).collect(),
                    NormAxis::Time => (0..lens[bi]).map(|u| xv[idx(bi, u, f)]).collect(),
                };
                let mean = group.iter().sum::<f64>() / group.len() as f64;
                let var = group.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / group.len() as f64;
                let xh = (xv[idx(bi, ti, f)] - mean) / (var + 1e-5).sqrt();
                let mu = gamma[f] * xh + beta[f];
                let sigma = softplus(a[f] * xh + b[f]);
                let want = mu + sigma * noise[idx(bi, ti, f)];
                assert!((y[idx(bi, ti, f)] - want).abs() < 1e-10, "{axis:?} y[{bi},{ti},{f}]");
                if ti < lens[bi] {
                    kl_sum += 0.5
                        * ((sigma / s_p[f]).powi(2) + ((mu - m_p[f]) / s_p[f]).powi(2) - 1.0 + 2.0 * s_p[f].ln()
                            - 2.0 * sigma.ln());
                }
            }
            if ti < lens[bi] {
                n_pos += 1.0;
            }
        }
    }
    let kl_want = kl_sum / n_pos;
    assert!((kl_got - kl_want).abs() < 1e-10 * kl_want.abs().max(1.0), "{axis:?} {prior:?}: KL {kl_got} vs {kl_want}");
}

#[test]
fn kl_and_output_equal_the_closed_form() {
    for axis in [NormAxis::LastDim, NormAxis::Time] {
        for prior in [KlPrior::Standard, KlPrior::Learned] {
            closed_form_case(axis, prior);
        }
    }
}

/// Loss of a tiny f64 model with KL-Norm at every site; the same seed gives the same noise.
fn loss(model: &SpeechModel, x: &Tensor, lengths: &[usize], w: &Tensor) -> (Tensor, f64) {
    let mut ctx = ForwardCtx::train_no_dropout(Rng::new(123));
    let out = model.forward(x, Some(lengths), &mut ctx).unwrap();
    let task = (out.logits.unwrap() * w).unwrap().sum_all().unwrap();
    let l = (task + (ctx.kl_total().unwrap().unwrap() * 0.7).unwrap()).unwrap();
    let v = l.to_scalar::<f64>().unwrap();
    (l, v)
}

#[test]
fn gradients_match_finite_differences() {
    gradients_match_finite_differences_on(&common::device());
}

/// The same through the GPU's training path (device ops, channels-last recompute convolution),
/// taken on the CPU (`ops::with_gpu_path`), so that a machine without a GPU checks it too.
#[test]
fn gpu_path_gradients_match_finite_differences() {
    klspeech::ops::with_gpu_path(|| gradients_match_finite_differences_on(&candle_core::Device::Cpu));
}

fn gradients_match_finite_differences_on(dev: &candle_core::Device) {
    let dev = dev.clone();
    for (stable, prior) in [(false, KlPrior::Standard), (true, KlPrior::Learned)] {
        let cfg = common::tiny_config(stable);
        let opts = LoadOptions {
            dtype: DType::F64,
            kl_sites: KlSites::All,
            kl: KlSettings { sigma0: 0.2, prior },
            head: Some(HeadKind::Ctc),
            seed: 1,
            device: dev.clone(),
            vib_sigma0: None,
        };
        let model = SpeechModel::fresh(cfg, &opts).unwrap();
        let lengths = [700usize, 520];
        let x = common::waves(&lengths, DType::F64, &dev);
        let probe = model.forward(&x, Some(&lengths), &mut ForwardCtx::eval()).unwrap().logits.unwrap();
        let w = Tensor::from_vec(Rng::new(4).normal_vec(probe.elem_count()), probe.shape(), &dev).unwrap().to_dtype(DType::F64).unwrap();
        let (l, _) = loss(&model, &x, &lengths, &w);
        let grads = l.backward().unwrap();
        let mut names = vec![
            "feature_extractor.conv_layers.0.layer_norm.kl_a",
            "feature_extractor.conv_layers.0.layer_norm.weight",
            "feature_extractor.conv_layers.0.conv.weight",
            "feature_projection.layer_norm.kl_b",
            "encoder.pos_conv_embed.conv.weight_g",
            "encoder.pos_conv_embed.conv.weight_v",
            "encoder.layers.0.layer_norm.kl_a",
            "encoder.layers.0.layer_norm.kl_b",
            "encoder.layers.1.final_layer_norm.weight",
            "encoder.layers.1.final_layer_norm.bias",
            "encoder.layers.1.attention.q_proj.weight",
            "encoder.layer_norm.kl_a",
            "lm_head.weight",
        ];
        if prior == KlPrior::Learned {
            names.extend(["encoder.layers.1.layer_norm.kl_prior_mean", "encoder.layers.1.layer_norm.kl_prior_std"]);
        }
        let vars = model.store.vars();
        let mut worst = 0f64;
        for name in names {
            let var = &vars.iter().find(|(k, _)| k == name).unwrap_or_else(|| panic!("no {name}")).1;
            let g: Vec<f64> = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let orig = var.as_tensor().copy().unwrap();
            let flat: Vec<f64> = orig.flatten_all().unwrap().to_vec1().unwrap();
            for &i in &[0usize, flat.len() / 2, flat.len() - 1] {
                let h = 1e-5;
                let eval_at = |delta: f64| {
                    let mut v = flat.clone();
                    v[i] += delta;
                    var.set(&Tensor::from_vec(v, orig.shape(), &dev).unwrap()).unwrap();
                    loss(&model, &x, &lengths, &w).1
                };
                let fd = (eval_at(h) - eval_at(-h)) / (2.0 * h);
                var.set(&orig).unwrap();
                let err = (fd - g[i]).abs() / fd.abs().max(g[i].abs()).max(1e-3);
                worst = worst.max(err);
                // Central differences with h = 1e-5 through the group-normed first layer carry
                // ~1e-6 truncation error; wrong gradients are off by O(1).
                assert!(err < 5e-5, "{name}[{i}] (stable={stable}): analytic {} vs finite difference {fd}", g[i]);
            }
        }
        println!("stable={stable} prior={prior:?}: worst relative gradient error {worst:e}");
    }
}

#[test]
fn a_converted_model_starts_as_the_pretrained_function() {
    // Training-mode outputs of a freshly converted model stay within noise of sigma0 of the
    // pretrained outputs (evaluation is exact, see above).
    let plain = SpeechModel::load(&fixture("stable-ctc-f16"), &LoadOptions::default()).unwrap();
    let x = common::waves(&[4000], DType::F32, &Device::Cpu);
    let base = plain.forward(&x, None, &mut ForwardCtx::eval()).unwrap().logits.unwrap();
    let scale = base.abs().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    let mut prev = f64::INFINITY;
    for sigma0 in [1e-1, 1e-2, 1e-3] {
        let opts = LoadOptions { kl_sites: KlSites::Encoder, kl: KlSettings { sigma0, prior: KlPrior::Standard }, ..Default::default() };
        let kl = SpeechModel::load(&fixture("stable-ctc-f16"), &opts).unwrap();
        let mut ctx = ForwardCtx::train_no_dropout(Rng::new(1));
        let out = kl.forward(&x, None, &mut ctx).unwrap().logits.unwrap();
        let d = common::max_abs_diff(&out, &base);
        println!("sigma0 {sigma0}: max |train - pretrained| = {d:.2e} (mean |logit| {scale:.2})");
        assert!(d < prev, "deviation must shrink with sigma0");
        prev = d;
    }
    assert!(prev < 0.02 * scale, "sigma0 = 1e-3 deviates by {prev}");
}

#[test]
fn sites_are_configurable() {
    let cfg = common::tiny_config(true); // 2 layers, LayerNorm in both conv layers
    let count = |sites: KlSites| {
        let m = SpeechModel::fresh(cfg.clone(), &LoadOptions { kl_sites: sites, ..Default::default() }).unwrap();
        let kl: Vec<String> = m.encoder.norm_sites().into_iter().filter(|(_, k)| *k).map(|(n, _)| n).collect();
        kl
    };
    assert!(count(KlSites::None).is_empty());
    let enc = count(KlSites::Encoder);
    assert_eq!(enc.len(), 2 * 2 + 1 + 1, "{enc:?}");
    assert!(enc.contains(&"feature_projection.layer_norm".to_string()));
    assert_eq!(count(KlSites::All).len(), 2 * 2 + 1 + 1 + 2);
    let last = count(KlSites::Last(1));
    assert_eq!(last, vec!["encoder.layers.1.layer_norm", "encoder.layers.1.final_layer_norm", "encoder.layer_norm"]);
    for (s, want) in [("none", KlSites::None), ("encoder", KlSites::Encoder), ("all", KlSites::All), ("last:3", KlSites::Last(3))] {
        assert_eq!(s.parse::<KlSites>().unwrap(), want);
        assert_eq!(want.to_string(), s);
    }
    assert!("last:0".parse::<KlSites>().is_err());
    assert!("everything".parse::<KlSites>().is_err());
}

#[test]
fn kl_norm_adds_under_a_tenth_of_a_percent_to_wav2vec2_base() {
    let base = Wav2Vec2Config::default(); // transformers' defaults are wav2vec2-base
    let m = SpeechModel::fresh(base, &LoadOptions { kl_sites: KlSites::Encoder, ..Default::default() }).unwrap();
    let total = m.num_parameters();
    let kl = m.num_kl_parameters();
    // 12 layers x 2 LayerNorms x 2 x 768 + encoder LN 2 x 768 + projection LN 2 x 512
    assert_eq!(kl, 12 * 2 * 2 * 768 + 2 * 768 + 2 * 512);
    let share = kl as f64 / (total - kl) as f64;
    println!("wav2vec2-base: {kl} KL-Norm parameters on {} = {:.4}%", total - kl, 100.0 * share);
    assert!(share < 1e-3);
    let _ = inv_softplus(0.01);
}
