//! The losses against PyTorch (`tests/fixtures/loss/`, from `tools/gen_loss_fixtures.py`):
//! values and gradients of CTC (w.r.t. log_probs as a leaf and w.r.t. logits through our
//! log_softmax) and of label-smoothed cross-entropy, in F64 (1e-6) and F32 (1e-4); plus input
//! validation, finite differences and a brute-force alignment sum.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use klspeech::loss::{ctc_loss, cross_entropy, log_softmax, Reduction};
use klspeech::Error;

const TOL_F64: f64 = 1e-6;
const TOL_F32: f64 = 1e-4;

/// The device tests run on: `KLSPEECH_TEST_DEVICE=cuda` selects the first GPU (in a `cuda`
/// build); CPU otherwise (same convention as `tests/common`).
fn device() -> Device {
    match std::env::var("KLSPEECH_TEST_DEVICE").as_deref() {
        Ok("cuda") => klspeech::device::new_cuda(0).expect("KLSPEECH_TEST_DEVICE=cuda but no CUDA device"),
        _ => Device::Cpu,
    }
}

fn fixture(name: &str) -> HashMap<String, Tensor> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/loss").join(name);
    candle_core::safetensors::load(&path, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn get<'a>(f: &'a HashMap<String, Tensor>, key: &str) -> &'a Tensor {
    f.get(key).unwrap_or_else(|| panic!("fixture tensor `{key}` missing"))
}

fn vec_f64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().to_device(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn ids(t: &Tensor) -> Vec<usize> {
    t.to_vec1::<i64>().unwrap().into_iter().map(|v| v as usize).collect()
}

/// Max |a - b|; equal infinities and NaN against NaN count as 0, any other non-finite mismatch
/// as infinity.
fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(&x, &y)| {
            if (x.is_nan() && y.is_nan()) || (x.is_infinite() && x == y) {
                0.0
            } else if !x.is_finite() || !y.is_finite() {
                f64::INFINITY
            } else {
                (x - y).abs()
            }
        })
        .fold(0.0, f64::max)
}

fn check(what: &str, ours: &Tensor, want: &Tensor, tol: f64) -> f64 {
    let d = max_diff(&vec_f64(ours), &vec_f64(want));
    eprintln!("{what}: max abs diff {d:.3e}");
    assert!(d <= tol, "{what}: max abs diff {d:e} > {tol:e}\nours {:?}\nwant {:?}", vec_f64(ours), vec_f64(want));
    d
}

struct CtcCase {
    logits: Tensor,
    log_probs: Tensor,
    targets: Vec<Vec<usize>>,
    input_lengths: Vec<usize>,
    blank: usize,
}

fn ctc_case(f: &HashMap<String, Tensor>, name: &str) -> CtcCase {
    let padded = get(f, &format!("{name}.targets")).to_vec2::<i64>().unwrap();
    let lens = ids(get(f, &format!("{name}.target_lengths")));
    let targets = padded.iter().zip(&lens).map(|(row, &l)| row[..l].iter().map(|&v| v as usize).collect()).collect();
    CtcCase {
        logits: get(f, &format!("{name}.logits")).clone(),
        log_probs: get(f, &format!("{name}.log_probs")).clone(),
        targets,
        input_lengths: ids(get(f, &format!("{name}.input_lengths"))),
        blank: ids(get(f, &format!("{name}.blank")))[0],
    }
}

/// Our loss and its gradients (w.r.t. log_probs as a leaf, and w.r.t. logits through our
/// log_softmax) against the stored run `prefix`; returns the largest diff seen.
fn check_ctc_run(c: &CtcCase, prefix: &str, f: &HashMap<String, Tensor>, reduction: Reduction, zero_inf: bool, dtype: DType, tol: f64) -> f64 {
    let dev = device();
    let tag = format!("{prefix} {dtype:?}");
    let scalar = |l: &Tensor| if reduction == Reduction::None { l.sum_all().unwrap() } else { l.clone() };
    let mut worst: f64 = 0.0;

    let lp = Var::from_tensor(&c.log_probs.to_dtype(dtype).unwrap().to_device(&dev).unwrap()).unwrap();
    let loss = ctc_loss(lp.as_tensor(), &c.targets, &c.input_lengths, c.blank, reduction, zero_inf).unwrap();
    assert_eq!(loss.dtype(), dtype);
    let want_shape: &[usize] = if reduction == Reduction::None { &[c.targets.len()] } else { &[] };
    assert_eq!(loss.dims(), want_shape, "{tag}: loss shape");
    worst = worst.max(check(&format!("{tag} loss"), &loss, get(f, &format!("{prefix}.loss")), tol));
    let grads = scalar(&loss).backward().unwrap();
    let g = grads.get(lp.as_tensor()).expect("no gradient w.r.t. log_probs");
    worst = worst.max(check(&format!("{tag} grad_log_probs"), g, get(f, &format!("{prefix}.grad_log_probs")), tol));

    let x = Var::from_tensor(&c.logits.to_dtype(dtype).unwrap().to_device(&dev).unwrap()).unwrap();
    let lp2 = log_softmax(x.as_tensor()).unwrap();
    worst = worst.max(check(&format!("{tag} log_softmax"), &lp2, &c.log_probs, tol));
    let loss2 = ctc_loss(&lp2, &c.targets, &c.input_lengths, c.blank, reduction, zero_inf).unwrap();
    let grads = scalar(&loss2).backward().unwrap();
    let g = grads.get(x.as_tensor()).expect("no gradient w.r.t. logits");
    worst = worst.max(check(&format!("{tag} grad_logits"), g, get(f, &format!("{prefix}.grad_logits")), tol));
    worst
}

fn ctc_against_torch(dtype: DType, tol: f64) {
    let f = fixture("ctc.safetensors");
    let a = ctc_case(&f, "a");
    let mut worst: f64 = 0.0;
    for (prefix, r) in [("a.mean", Reduction::Mean), ("a.sum", Reduction::Sum), ("a.none", Reduction::None)] {
        worst = worst.max(check_ctc_run(&a, prefix, &f, r, false, dtype, tol));
    }
    let b = ctc_case(&f, "b");
    assert_eq!(b.blank, 4);
    for (prefix, r, zi) in [
        ("b.noinf.none", Reduction::None, false),
        ("b.noinf.mean", Reduction::Mean, false),
        ("b.zeroinf.none", Reduction::None, true),
        ("b.zeroinf.mean", Reduction::Mean, true),
        ("b.zeroinf.sum", Reduction::Sum, true),
    ] {
        worst = worst.max(check_ctc_run(&b, prefix, &f, r, zi, dtype, tol));
    }
    eprintln!("CTC {dtype:?}: worst max abs diff {worst:.3e}");
}

#[test]
fn ctc_matches_torch_f64() {
    ctc_against_torch(DType::F64, TOL_F64);
}

#[test]
fn ctc_matches_torch_f32() {
    ctc_against_torch(DType::F32, TOL_F32);
}

#[test]
fn ctc_impossible_target_is_inf_with_nan_gradient_on_valid_frames_only() {
    let f = fixture("ctc.safetensors");
    let none = vec_f64(get(&f, "b.noinf.none.loss"));
    assert_eq!(none[0], f64::INFINITY);
    assert!(none[1].is_finite());

    // An impossible utterance with padding: NaN on its valid frames, 0 on padded ones (torch).
    let lp = log_softmax(&Tensor::arange(0f64, 24.0, &Device::Cpu).unwrap().reshape((1, 6, 4)).unwrap().cos().unwrap()).unwrap();
    let lp = Var::from_tensor(&lp).unwrap();
    let loss = ctc_loss(lp.as_tensor(), &[vec![1, 1, 1]], &[4], 0, Reduction::Sum, false).unwrap();
    assert_eq!(loss.to_scalar::<f64>().unwrap(), f64::INFINITY);
    let g = vec_f64(loss.backward().unwrap().get(lp.as_tensor()).unwrap());
    assert!(g[..16].iter().all(|v| v.is_nan()), "{g:?}");
    assert!(g[16..].iter().all(|&v| v == 0.0), "{g:?}");

    // zero_infinity: loss 0, gradient 0.
    let loss = ctc_loss(lp.as_tensor(), &[vec![1, 1, 1]], &[4], 0, Reduction::Mean, true).unwrap();
    assert_eq!(loss.to_scalar::<f64>().unwrap(), 0.0);
    let g = vec_f64(loss.backward().unwrap().get(lp.as_tensor()).unwrap());
    assert!(g.iter().all(|&v| v == 0.0));

    // Zero frames: an empty target has loss 0, a non-empty one inf.
    let loss = ctc_loss(lp.as_tensor(), &[vec![]], &[0], 0, Reduction::None, false).unwrap();
    assert_eq!(vec_f64(&loss), vec![0.0]);
    let loss = ctc_loss(lp.as_tensor(), &[vec![2]], &[0], 0, Reduction::None, false).unwrap();
    assert_eq!(vec_f64(&loss), vec![f64::INFINITY]);
}

/// -log of the sum over all frame-level paths that collapse to `target`.
fn brute_force_nll(lp: &[f64], t_size: usize, c_size: usize, target: &[usize], blank: usize) -> f64 {
    let mut total = 0.0;
    let n = c_size.pow(t_size as u32);
    for code in 0..n {
        let mut path = Vec::with_capacity(t_size);
        let mut k = code;
        for _ in 0..t_size {
            path.push(k % c_size);
            k /= c_size;
        }
        let mut collapsed = Vec::new();
        let mut prev = None;
        for &p in &path {
            if Some(p) != prev && p != blank {
                collapsed.push(p);
            }
            prev = Some(p);
        }
        if collapsed == target {
            total += path.iter().enumerate().map(|(t, &p)| lp[t * c_size + p]).sum::<f64>().exp();
        }
    }
    -total.ln()
}

#[test]
fn ctc_value_matches_brute_force_alignment_sum() {
    let (t_size, c_size) = (6, 4);
    let x = Tensor::arange(0f64, (t_size * c_size) as f64, &Device::Cpu).unwrap().affine(0.37, 0.1).unwrap().sin().unwrap().affine(2.0, 0.0).unwrap();
    let lp = log_softmax(&x.reshape((1, t_size, c_size)).unwrap()).unwrap();
    let lpv = vec_f64(&lp);
    for (target, blank) in [(vec![], 0), (vec![1], 0), (vec![1, 1], 0), (vec![2, 1, 2], 0), (vec![0, 0, 0], 3), (vec![1, 2], 3)] {
        for len in [3usize, 6] {
            let want = brute_force_nll(&lpv[..len * c_size], len, c_size, &target, blank);
            let got = ctc_loss(&lp, std::slice::from_ref(&target), &[len], blank, Reduction::None, false).unwrap();
            let got = vec_f64(&got)[0];
            let d = max_diff(&[got], &[want]);
            assert!(d < 1e-12, "target {target:?} blank {blank} len {len}: {got} vs brute force {want}");
        }
    }
}

#[test]
fn ctc_mean_gradient_matches_finite_differences() {
    let (b_size, t_size, c_size) = (2, 5, 4);
    let n = b_size * t_size * c_size;
    let base: Vec<f64> = (0..n).map(|i| ((i as f64) * 0.731 + 0.3).sin() * 1.7).collect();
    let targets = vec![vec![1, 2, 2], vec![3]];
    let input_lengths = [5usize, 3];
    let f = |v: &[f64]| -> f64 {
        let x = Tensor::from_vec(v.to_vec(), (b_size, t_size, c_size), &Device::Cpu).unwrap();
        let l = ctc_loss(&log_softmax(&x).unwrap(), &targets, &input_lengths, 0, Reduction::Mean, false).unwrap();
        l.to_scalar::<f64>().unwrap()
    };
    let x = Var::from_vec(base.clone(), (b_size, t_size, c_size), &Device::Cpu).unwrap();
    let loss = ctc_loss(&log_softmax(x.as_tensor()).unwrap(), &targets, &input_lengths, 0, Reduction::Mean, false).unwrap();
    let g = vec_f64(loss.backward().unwrap().get(x.as_tensor()).unwrap());
    let h = 1e-5;
    let mut fd = vec![0.0; n];
    for i in 0..n {
        let mut p = base.clone();
        p[i] += h;
        let mut m = base.clone();
        m[i] -= h;
        fd[i] = (f(&p) - f(&m)) / (2.0 * h);
    }
    let d = max_diff(&g, &fd);
    eprintln!("finite differences: max abs diff {d:.3e}");
    assert!(d < 1e-8, "autograd vs finite differences: {d:e}\n{g:?}\n{fd:?}");
    // Padded frames (utterance 1, frames 3..5) get no gradient.
    assert!(g[t_size * c_size + 3 * c_size..].iter().all(|&v| v == 0.0));
}

#[test]
fn ctc_rejects_bad_inputs() {
    let lp = log_softmax(&Tensor::zeros((2, 4, 3), DType::F32, &Device::Cpu).unwrap()).unwrap();
    let t = vec![vec![1], vec![2, 1]];
    let bad = |r: klspeech::Result<Tensor>, needle: &str| match r {
        Err(Error::InvalidInput(msg)) => assert!(msg.contains(needle), "message `{msg}` lacks `{needle}`"),
        Err(e) => panic!("expected InvalidInput containing `{needle}`, got {e}"),
        Ok(_) => panic!("expected InvalidInput containing `{needle}`, got Ok"),
    };
    assert!(ctc_loss(&lp, &t, &[4, 3], 0, Reduction::Mean, false).is_ok());
    bad(ctc_loss(&lp, &t[..1], &[4, 3], 0, Reduction::Mean, false), "1 target sequences for a batch of 2");
    bad(ctc_loss(&lp, &t, &[4], 0, Reduction::Mean, false), "1 input lengths for a batch of 2");
    bad(ctc_loss(&lp, &t, &[4, 5], 0, Reduction::Mean, false), "input_lengths[1] = 5 exceeds");
    bad(ctc_loss(&lp, &t, &[4, 3], 3, Reduction::Mean, false), "blank id 3");
    bad(ctc_loss(&lp, &[vec![1], vec![3]], &[4, 3], 0, Reduction::Mean, false), "targets[1][0] = 3 is out of range");
    bad(ctc_loss(&lp, &[vec![1, 0], vec![2]], &[4, 3], 0, Reduction::Mean, false), "targets[0][1] = 0 is the blank");
    bad(ctc_loss(&lp.flatten_all().unwrap(), &t, &[4, 3], 0, Reduction::Mean, false), "must be [B, T, C]");
    bad(ctc_loss(&lp.to_dtype(DType::U32).unwrap(), &t, &[4, 3], 0, Reduction::Mean, false), "float");
    let empty = Tensor::zeros((0, 4, 3), DType::F32, &Device::Cpu).unwrap();
    bad(ctc_loss(&empty, &[], &[], 0, Reduction::Mean, false), "empty batch");
}

fn ce_against_torch(dtype: DType, tol: f64) {
    let f = fixture("ce.safetensors");
    let dev = device();
    let targets = ids(get(&f, "targets"));
    for tag in ["plain", "smooth"] {
        let eps = vec_f64(get(&f, &format!("{tag}.label_smoothing")))[0];
        let x = Var::from_tensor(&get(&f, "logits").to_dtype(dtype).unwrap().to_device(&dev).unwrap()).unwrap();
        let loss = cross_entropy(x.as_tensor(), &targets, eps).unwrap();
        assert_eq!(loss.dims(), &[] as &[usize]);
        assert_eq!(loss.dtype(), dtype);
        check(&format!("ce {tag} {dtype:?} loss"), &loss, get(&f, &format!("{tag}.loss")), tol);
        let g = loss.backward().unwrap();
        check(&format!("ce {tag} {dtype:?} grad_logits"), g.get(x.as_tensor()).unwrap(), get(&f, &format!("{tag}.grad_logits")), tol);
    }
}

#[test]
fn cross_entropy_matches_torch_f64() {
    ce_against_torch(DType::F64, TOL_F64);
}

#[test]
fn cross_entropy_matches_torch_f32() {
    ce_against_torch(DType::F32, TOL_F32);
}

#[test]
fn cross_entropy_rejects_bad_inputs() {
    let x = Tensor::zeros((3, 4), DType::F64, &Device::Cpu).unwrap();
    let is_invalid = |r: klspeech::Result<Tensor>| matches!(r, Err(Error::InvalidInput(_)));
    assert!(cross_entropy(&x, &[0, 1, 3], 0.2).is_ok());
    assert!(is_invalid(cross_entropy(&x, &[0, 1], 0.0)));
    assert!(is_invalid(cross_entropy(&x, &[0, 1, 4], 0.0)));
    assert!(is_invalid(cross_entropy(&x, &[0, 1, 2], -0.1)));
    assert!(is_invalid(cross_entropy(&x, &[0, 1, 2], 1.5)));
    assert!(is_invalid(cross_entropy(&x, &[0, 1, 2], f64::NAN)));
    assert!(is_invalid(cross_entropy(&x.flatten_all().unwrap(), &[0], 0.0)));
}

#[test]
fn log_softmax_is_stable_and_differentiable() {
    let x = Var::from_vec(vec![1000.0f64, 1001.0, 999.0, -5.0, 0.0, 5.0], (2, 3), &Device::Cpu).unwrap();
    let lp = log_softmax(x.as_tensor()).unwrap();
    let v = vec_f64(&lp);
    assert!(v.iter().all(|x| x.is_finite()));
    for row in v.chunks(3) {
        assert!((row.iter().map(|x| x.exp()).sum::<f64>() - 1.0).abs() < 1e-12);
    }
    // d/dx of sum(w * log_softmax(x)) = w - softmax * sum(w).
    let w = Tensor::new(&[[1.0f64, 0.0, 2.0], [0.5, -1.0, 0.0]], &Device::Cpu).unwrap();
    let g = vec_f64(lp.mul(&w).unwrap().sum_all().unwrap().backward().unwrap().get(x.as_tensor()).unwrap());
    let wv = vec_f64(&w);
    for r in 0..2 {
        let sw: f64 = wv[r * 3..r * 3 + 3].iter().sum();
        for c in 0..3 {
            let want = wv[r * 3 + c] - v[r * 3 + c].exp() * sw;
            assert!((g[r * 3 + c] - want).abs() < 1e-12);
        }
    }
}

#[test]
fn reduction_parses_and_serializes_lowercase() {
    for (s, r) in [("mean", Reduction::Mean), ("sum", Reduction::Sum), ("none", Reduction::None)] {
        assert_eq!(s.parse::<Reduction>().unwrap(), r);
        assert_eq!(r.to_string(), s);
        assert_eq!(serde_json::to_string(&r).unwrap(), format!("\"{s}\""));
        assert_eq!(serde_json::from_str::<Reduction>(&format!("\"{s}\"")).unwrap(), r);
    }
    assert!(matches!("Mean".parse::<Reduction>(), Err(Error::InvalidInput(_))));
    assert!(serde_json::from_str::<Reduction>("\"avg\"").is_err());
}
