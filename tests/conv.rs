//! klspeech's differentiable conv1d: outputs equal candle's conv1d, gradients equal finite
//! differences (candle 0.11's own conv1d backward does not), for strides, padding and groups,
//! kernels up to four strides long (input gradient by tap blocks) and longer (column scatter).

mod common;

use candle_core::{DType, Device, Tensor, Var};
use klspeech::model::layers::conv1d;
use klspeech::rng::Rng;

#[test]
fn conv1d_values_and_gradients() {
    let dev = Device::Cpu;
    for (stride, pad, groups, k, l) in [(1usize, 0usize, 1usize, 3usize, 23usize), (2, 0, 1, 3, 23), (5, 0, 1, 10, 57), (1, 2, 1, 4, 17), (1, 2, 2, 4, 17), (1, 0, 2, 3, 9), (3, 1, 4, 5, 31), (1, 4, 2, 8, 19)] {
        let (b, cin, cout) = (2usize, 4usize, 8usize);
        let mut r = Rng::new(1);
        let mk = |r: &mut Rng, shape: &[usize]| {
            Tensor::from_vec(r.normal_vec(shape.iter().product()), shape, &dev).unwrap().to_dtype(DType::F64).unwrap()
        };
        let x = Var::from_tensor(&mk(&mut r, &[b, cin, l])).unwrap();
        let w = Var::from_tensor(&mk(&mut r, &[cout, cin / groups, k])).unwrap();
        let y = conv1d(x.as_tensor(), w.as_tensor(), stride, pad, groups).unwrap();
        let reference = x.as_tensor().conv1d(w.as_tensor(), pad, stride, 1, groups).unwrap();
        assert!(common::max_abs_diff(&y, &reference) < 1e-12, "values (stride {stride} pad {pad} groups {groups})");
        let gw = mk(&mut r, y.dims());
        let f = |xt: &Tensor, wt: &Tensor| -> f64 {
            (conv1d(xt, wt, stride, pad, groups).unwrap() * &gw).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
        };
        let grads = (y * &gw).unwrap().sum_all().unwrap().backward().unwrap();
        assert_finite_differences(&f, &x, &w, &grads, &format!("stride {stride} pad {pad} groups {groups}"));
    }
}

/// (stride, padding, groups, K, L, max_t) of the training-convolution tests: strides 1 to 5,
/// kernels shorter than, as long as and much longer than their stride, padding, groups, and
/// outputs cut short.
const CASES: [(usize, usize, usize, usize, usize, Option<usize>); 11] = [
    (1, 0, 1, 3, 23, None),
    (2, 0, 1, 3, 23, Some(9)),
    (2, 0, 1, 2, 16, None),
    (5, 0, 1, 10, 57, None),
    (1, 2, 2, 4, 17, None),
    (3, 1, 4, 5, 31, Some(4)),
    (1, 4, 2, 8, 19, None),
    (1, 4, 2, 8, 19, Some(19)),
    (2, 3, 2, 7, 16, None),
    (1, 3, 2, 6, 15, Some(12)),
    (1, 1, 4, 6, 20, None),
];

/// The GPU's training convolution (`conv1d_cl_recompute`: candle's forward, klspeech's backward
/// from recomputed columns, a flipped-kernel convolution (stride 1, K > 3) or the column
/// gradient added back tap by tap), run here on the CPU: values equal
/// candle's conv1d, both gradients equal finite differences, also with fewer output frames
/// than the convolution yields (`max_t`) and with an input that takes no gradient. In f64, so
/// finite differences resolve 1e-6.
#[test]
fn recompute_conv_values_and_gradients() {
    // KLSPEECH_TEST_DEVICE=cuda runs it on the GPU (tools/gpu_check.sh): cuDNN's forward there.
    let dev = common::device();
    for case in CASES {
        recompute_case(&dev, case);
    }
}

/// The same claims for the gathered-column gemm convolution (`ops::conv_gemm`, the GPU's
/// `KLSPEECH_CONV_GEMM` path, run here on the CPU): whole batches, blocks of one clip (a budget
/// below two clips' columns) and chunks of taps within a clip (a budget below one clip's: the
/// partial gemms accumulate, and so do the weight gradient's blocks); stride-1 convolutions
/// also on shared columns (`KLSPEECH_CONV_SHIFT`) of 2 and 3 taps a row (chunks of the columns
/// as shifted views, a last chunk padded with zero taps when K is not a multiple) and of the
/// default (one chunk here: K <= 16), and with shared columns off.
#[test]
fn gemm_conv_values_and_gradients() {
    use klspeech::ops::conv_gemm::{with_budget, with_mode, with_shift_taps, Mode, SHIFT_TAPS};
    let dev = common::device();
    for case in CASES {
        let (stride, pad, _groups, k, l, _) = case;
        // Columns of one tap of one clip (f64, 4 input channels).
        let per_tap = ((l + 2 * pad - k) / stride + 1) * 4 * 8;
        let shifts: &[usize] = if stride == 1 { &[0, 2, 3, SHIFT_TAPS] } else { &[SHIFT_TAPS] };
        for &taps in shifts {
            for budget in [usize::MAX, per_tap * k, 2 * per_tap] {
                let calls = with_mode(Mode::All, || with_shift_taps(taps, || with_budget(budget, || {
                    let before = klspeech::ops::conv_gemm::calls();
                    recompute_case(&dev, case);
                    klspeech::ops::conv_gemm::calls().since(&before)
                })));
                // It ran the gemm path (forward, both gradients), in blocks and chunks as budgeted.
                assert!(calls.forward > 0 && calls.weight_grad > 0 && calls.input_grad > 0, "{case:?}: {calls:?}");
                let chunked = k.div_ceil(taps.max(1)) > 1;
                if budget == 2 * per_tap && (stride > 1 || taps == 0 || chunked) {
                    assert!(calls.gemms > calls.forward + calls.weight_grad, "{case:?}, budget {budget}, shift {taps}: no tap chunks ({calls:?})");
                }
                // Shared columns for every stride-1 forward, input and weight gradient when on.
                let want = if stride == 1 && taps > 0 { calls.forward + calls.weight_grad + calls.input_grad } else { 0 };
                assert_eq!(calls.shifted, want, "{case:?}, shift {taps}: {calls:?}");
            }
        }
    }
    // The modes choose by stride: `pos` only stride 1, `fe` only strided, `0` none, on any
    // device, in training or not.
    let x = Tensor::zeros((1, 8, 2), DType::F32, &dev).unwrap();
    let applies = |stride, training| klspeech::ops::conv_gemm::applies(&x, stride, training);
    for (mode, s1, s2) in [(Mode::All, true, true), (Mode::Stride1, true, false), (Mode::Strided, false, true), (Mode::Off, false, false)] {
        for training in [false, true] {
            with_mode(mode, || assert_eq!((applies(1, training), applies(2, training)), (s1, s2), "{mode:?}, training {training}"));
        }
    }
    // `auto` (the default): on CUDA the feature encoder's strided convolutions unless f32 runs
    // with TF32 on, the positional conv always on shared columns, and with those off
    // (`KLSPEECH_CONV_SHIFT=off`) as the H200 measured the per-chunk columns: only in training,
    // not in f32 with TF32 on (half types are not TF32's concern); never off CUDA.
    for (stride, training, dtype, tf32, shifted, on_cuda) in [
        (2, false, DType::F32, false, true, true),
        (5, true, DType::F32, false, false, true),
        (2, false, DType::F32, true, true, false),
        (2, false, DType::BF16, true, true, true),
        (1, false, DType::F32, false, true, true),
        (1, false, DType::F32, true, true, true),
        (1, false, DType::F16, false, true, true),
        (1, false, DType::F32, false, false, false),
        (1, true, DType::F32, false, false, true),
        (1, true, DType::F32, true, false, false),
        (1, false, DType::F16, false, false, false),
        (1, true, DType::BF16, true, false, true),
    ] {
        let case = format!("stride {stride}, training {training}, {dtype:?}, TF32 {tf32}, shared columns {shifted}");
        assert_eq!(Mode::Auto.covers(stride, training, dtype, true, tf32, shifted), on_cuda, "auto on CUDA: {case}");
        assert!(!Mode::Auto.covers(stride, training, dtype, false, tf32, shifted), "auto off CUDA: {case}");
    }
    with_mode(Mode::Auto, || assert_eq!(applies(2, false), dev.is_cuda(), "auto on {dev:?}"));
    assert_eq!(Mode::parse(""), Some(Mode::Auto));
    assert_eq!(Mode::parse("auto"), Some(Mode::Auto));
    assert_eq!(Mode::parse("off"), Some(Mode::Off));
    assert_eq!(Mode::parse("0"), Some(Mode::Off));
    assert_eq!(Mode::parse("pos"), Some(Mode::Stride1));
    assert_eq!(Mode::parse("1"), Some(Mode::All));
    assert_eq!(Mode::parse("all"), Some(Mode::All));
    assert_eq!(Mode::parse("fe"), Some(Mode::Strided));
    assert_eq!(Mode::parse("cudnn"), None);
}

fn recompute_case(dev: &Device, (stride, pad, groups, k, l, max_t): (usize, usize, usize, usize, usize, Option<usize>)) {
    let (b, cin, cout) = (2usize, 4usize, 8usize);
    let mut r = Rng::new(7);
    let mk = |r: &mut Rng, shape: &[usize]| {
        Tensor::from_vec(r.normal_vec(shape.iter().product()), shape, dev).unwrap().to_dtype(DType::F64).unwrap()
    };
    let x = Var::from_tensor(&mk(&mut r, &[b, l, cin])).unwrap(); // channels-last
    let w = Var::from_tensor(&mk(&mut r, &[cout, cin / groups, k])).unwrap();
    let conv = |xt: &Tensor, wt: &Tensor| klspeech::ops::conv1d_cl_recompute(xt, wt, stride, pad, groups, max_t).unwrap();
    let y = conv(x.as_tensor(), w.as_tensor());
    let full = x.as_tensor().transpose(1, 2).unwrap().conv1d(w.as_tensor(), pad, stride, 1, groups).unwrap().transpose(1, 2).unwrap();
    let t = max_t.map_or(full.dim(1).unwrap(), |m| m.min(full.dim(1).unwrap()));
    assert_eq!(y.dims(), &[b, t, cout]);
    assert!(common::max_abs_diff(&y, &full.narrow(1, 0, t).unwrap()) < 1e-12, "values (stride {stride} pad {pad} groups {groups})");
    let gw = mk(&mut r, y.dims());
    let f = |xt: &Tensor, wt: &Tensor| -> f64 { (conv(xt, wt) * &gw).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap() };
    let grads = (y * &gw).unwrap().sum_all().unwrap().backward().unwrap();
    assert_finite_differences(&f, &x, &w, &grads, &format!("stride {stride} pad {pad} groups {groups} max_t {max_t:?}"));
    // An input that takes no gradient (the waveform into the first layer): only w's.
    let y = conv(&x.as_tensor().detach(), w.as_tensor());
    let grads = (y * &gw).unwrap().sum_all().unwrap().backward().unwrap();
    let want = grads_w_of(&(conv(x.as_tensor(), w.as_tensor()) * &gw).unwrap(), &w);
    assert!(common::max_abs_diff(grads.get(w.as_tensor()).unwrap(), &want) < 1e-12);
    assert!(grads.get(x.as_tensor()).is_none());
    // The trainer's backward takes w's gradient as the op computes it (routed, not added
    // onto zeros by candle): the same bits as plain backward.
    let loss = (conv(x.as_tensor(), w.as_tensor()) * &gw).unwrap().sum_all().unwrap();
    let (stored, routed) = klspeech::ops::grads::backward_counted(&loss).unwrap();
    let plain = loss.backward().unwrap();
    assert_eq!(routed, vec![w.as_tensor().id()]);
    for v in [&x, &w] {
        let a: Vec<f64> = stored.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f64> = plain.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a, b);
    }
}

/// Every element of both gradients against a central difference of `f(x, w)` (step 1e-6, f64).
fn assert_finite_differences(f: &dyn Fn(&Tensor, &Tensor) -> f64, x: &Var, w: &Var, grads: &candle_core::backprop::GradStore, case: &str) {
    for (var, other_is_x) in [(x, false), (w, true)] {
        let g: Vec<f64> = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let v: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        for i in 0..v.len() {
            let at = |d: f64| {
                let mut p = v.clone();
                p[i] += d;
                let t = Tensor::from_vec(p, var.shape(), var.device()).unwrap();
                if other_is_x { f(x.as_tensor(), &t) } else { f(&t, w.as_tensor()) }
            };
            let fd = (at(1e-6) - at(-1e-6)) / 2e-6;
            assert!((fd - g[i]).abs() < 1e-6, "{case}: grad[{i}] {} vs {fd}", g[i]);
        }
    }
}

fn grads_w_of(loss_terms: &Tensor, w: &Var) -> Tensor {
    loss_terms.sum_all().unwrap().backward().unwrap().get(w.as_tensor()).unwrap().clone()
}
