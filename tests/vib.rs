//! VIB on the pooled representation (the baseline KLNORM.md asks for beside KL-Norm):
//! evaluation is exactly transformers' head, training feeds the classifier one sample of
//! N(mu, sigma^2) and its KL is the closed form, the VIB vectors start as documented and are
//! saved under extra keys that a plain load ignores.

mod common;

use candle_core::{DType, Device, Tensor};
use klspeech::model::norm::inv_softplus;
use klspeech::model::{ForwardCtx, Head, HeadKind, KlSites, LoadOptions, SpeechModel};
use klspeech::rng::Rng;

fn softplus(z: f64) -> f64 {
    z.max(0.0) + (-z.abs()).exp().ln_1p()
}

fn model(vib: Option<f64>, sites: KlSites) -> SpeechModel {
    let mut cfg = common::tiny_config(false);
    cfg.set_labels(&["a".to_string(), "b".to_string(), "c".to_string()]);
    let opts = LoadOptions { kl_sites: sites, head: Some(HeadKind::Classification), seed: 4, vib_sigma0: vib, ..Default::default() };
    SpeechModel::fresh(cfg, &opts).unwrap()
}

fn vec2(t: &Tensor) -> Vec<Vec<f64>> {
    t.to_dtype(DType::F64).unwrap().to_vec2().unwrap()
}

#[test]
fn evaluation_is_the_plain_head_and_vectors_start_as_documented() {
    let with = model(Some(0.05), KlSites::None);
    let without = model(None, KlSites::None);
    let x = common::waves(&[3000, 2200], DType::F32, &Device::Cpu);
    let lengths = [3000usize, 2200];
    let a = with.forward(&x, Some(&lengths), &mut ForwardCtx::eval()).unwrap().logits.unwrap();
    let b = without.forward(&x, Some(&lengths), &mut ForwardCtx::eval()).unwrap().logits.unwrap();
    assert_eq!(common::max_abs_diff(&a, &b), 0.0);
    let Head::Classification(h) = &with.head else { panic!("classification head expected") };
    let vib = h.vib.as_ref().expect("VIB built");
    let p = with.config.classifier_proj_size;
    assert_eq!(vib.weight.dims(), &[p, p]);
    assert_eq!(vib.weight.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    let b0: Vec<f32> = vib.bias.to_vec1().unwrap();
    assert!(b0.iter().all(|&v| (softplus(v as f64) - 0.05).abs() < 1e-7), "bias = softplus^-1(sigma0)");
    assert!((inv_softplus(0.05) - b0[0] as f64).abs() < 1e-6);
    assert_eq!(with.num_kl_parameters(), p * p + p);
    // A bad sigma0 is refused with the value named.
    let mut cfg = common::tiny_config(false);
    cfg.set_labels(&["a".to_string(), "b".to_string()]);
    let opts = LoadOptions { head: Some(HeadKind::Classification), vib_sigma0: Some(0.0), ..Default::default() };
    let e = SpeechModel::fresh(cfg, &opts).err().expect("sigma0 = 0 must be refused");
    assert_eq!(e.to_string(), "invalid input: VIB sigma0 must be positive, got 0");
}

#[test]
fn training_samples_the_code_and_adds_the_closed_form_kl() {
    let m = model(Some(0.3), KlSites::None);
    // Give W a non-zero value so sigma depends on mu.
    let Head::Classification(h) = &m.head else { panic!() };
    let vib = h.vib.as_ref().unwrap();
    let p = m.config.classifier_proj_size;
    let w0 = Tensor::from_vec(Rng::new(11).normal_vec(p * p).iter().map(|v| 0.3 * v).collect::<Vec<f32>>(), (p, p), &Device::Cpu).unwrap();
    m.store.vars().into_iter().find(|(k, _)| k == "classifier.kl_vib_sigma_weight").unwrap().1.set(&w0).unwrap();

    let x = common::waves(&[2600, 2600, 1900], DType::F32, &Device::Cpu);
    let lengths = [2600usize, 2600, 1900];
    // No dropout, no KL-Norm, no SpecAugment: the VIB noise is the only draw of this pass.
    let mut ctx = ForwardCtx::train_no_dropout(Rng::new(21));
    let out = m.forward(&x, Some(&lengths), &mut ctx).unwrap();
    assert_eq!(ctx.kl_terms.len(), 1);
    assert_eq!(ctx.kl_terms[0].0, "vib");
    let kl = ctx.kl_terms[0].1.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();

    // The same pass by hand in f64.
    let mu = vec2(&h.pooled(&out.encoder).unwrap());
    let noise = vec2(&ForwardCtx::train_no_dropout(Rng::new(21)).normal_like(&h.pooled(&out.encoder).unwrap()).unwrap());
    let w = vec2(&vib.weight);
    let bias: Vec<f32> = vib.bias.to_vec1().unwrap();
    let cw = vec2(&h.classifier.weight);
    let cb: Vec<f32> = h.classifier.bias.as_ref().unwrap().to_vec1().unwrap();
    let logits = vec2(out.logits.as_ref().unwrap());
    let mut kl_ref = 0.0;
    for i in 0..mu.len() {
        let sigma: Vec<f64> = (0..p).map(|j| softplus((0..p).map(|k| mu[i][k] * w[j][k]).sum::<f64>() + bias[j] as f64)).collect();
        let z: Vec<f64> = (0..p).map(|j| mu[i][j] + sigma[j] * noise[i][j]).collect();
        kl_ref += (0..p).map(|j| 0.5 * (mu[i][j].powi(2) + sigma[j].powi(2) - 1.0 - 2.0 * sigma[j].ln())).sum::<f64>() / mu.len() as f64;
        for c in 0..cw.len() {
            let want = (0..p).map(|j| z[j] * cw[c][j]).sum::<f64>() + cb[c] as f64;
            assert!((logits[i][c] - want).abs() < 1e-4 * (1.0 + want.abs()), "logit [{i},{c}]: {} vs {want}", logits[i][c]);
        }
    }
    assert!((kl - kl_ref).abs() < 1e-5 * kl_ref.abs(), "KL {kl} vs closed form {kl_ref}");
    assert!(kl > 0.0);
}

#[test]
fn saved_vib_vectors_are_extra_keys_a_plain_load_ignores() {
    let m = model(Some(0.1), KlSites::Encoder);
    let dir = tempfile::tempdir().unwrap();
    m.save_pretrained(dir.path()).unwrap();
    let plain = SpeechModel::load(dir.path(), &LoadOptions::default()).unwrap();
    let x = common::waves(&[2500], DType::F32, &Device::Cpu);
    let a = m.forward(&x, None, &mut ForwardCtx::eval()).unwrap().logits.unwrap();
    let b = plain.forward(&x, None, &mut ForwardCtx::eval()).unwrap().logits.unwrap();
    assert_eq!(common::max_abs_diff(&a, &b), 0.0);
    let bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    let names: Vec<String> = safetensors::SafeTensors::deserialize(&bytes).unwrap().names().into_iter().map(String::from).collect();
    assert!(names.iter().any(|n| n == "classifier.kl_vib_sigma_weight"), "{names:?}");
    assert!(names.iter().any(|n| n == "classifier.kl_vib_sigma_bias"));
}
