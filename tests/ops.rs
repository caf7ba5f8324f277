//! The fused CPU ops (src/ops) against the plain composites they replace: values and every
//! input's gradient, in f32 and f64, on odd shapes (batch 1 and > 1, lengths that are
//! multiples of nothing, more rows than one parallel chunk, convolution padding and groups).
//! Tolerance: max |fused - composite| / max |composite| <= 1e-5 in f32 (1e-10 in f64).

use candle_core::{DType, Device, Tensor, Var};
use klspeech::ops;
use klspeech::rng::Rng;

mod common;

fn rand(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::from_vec(Rng::new(seed).normal_vec(n), shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
}

fn rel(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    // (candle's max passes over NaN: an unwritten or blown-up element must not.)
    let max_abs = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap().into_iter().fold(0.0, |m, x: f64| if x.is_nan() { f64::INFINITY } else { m.max(x.abs()) });
    let num = max_abs(&(&a - &b).unwrap());
    let den = max_abs(&b);
    num / den.max(1e-30)
}

fn tol(dtype: DType) -> f64 {
    if dtype == DType::F64 {
        1e-10
    } else {
        1e-5
    }
}

/// Runs `fused` and `composite` on fresh variables made from `inputs`, with the loss
/// sum(out * w) for a fixed random w, and compares outputs and gradients.
fn compare(what: &str, inputs: &[Tensor], fused: impl Fn(&[Tensor]) -> Tensor, composite: impl Fn(&[Tensor]) -> Tensor) {
    compare_within(what, inputs, tol(inputs[0].dtype()), fused, composite)
}

/// [`compare`] with a given tolerance.
fn compare_within(what: &str, inputs: &[Tensor], tol: f64, fused: impl Fn(&[Tensor]) -> Tensor, composite: impl Fn(&[Tensor]) -> Tensor) {
    let dtype = inputs[0].dtype();
    let run = |f: &dyn Fn(&[Tensor]) -> Tensor| {
        let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = f(&ts);
        let w = rand(out.dims(), 99, dtype);
        let grads = (&out * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g: Vec<Tensor> = vars.iter().map(|v| grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{what}: no gradient")).clone()).collect();
        (out, g)
    };
    let (yf, gf) = run(&fused);
    let (yc, gc) = run(&composite);
    let r = rel(&yf, &yc);
    assert!(r <= tol, "{what} {dtype:?}: value rel. error {r:e}");
    for (i, (a, b)) in gf.iter().zip(&gc).enumerate() {
        let r = rel(a, b);
        assert!(r <= tol, "{what} {dtype:?}: gradient of input {i}: rel. error {r:e}");
    }
}

const SHAPES: &[&[usize]] = &[&[1, 7, 13], &[3, 5, 131], &[2, 77, 33], &[1, 1, 1]];

#[test]
fn gelu_matches_the_composite() {
    for dtype in [DType::F32, DType::F64] {
        for (i, s) in SHAPES.iter().enumerate() {
            let x = (rand(s, i as u64, dtype) * 3.0).unwrap();
            // x Phi(x) from candle's erf (whose backward is exact; candle's own gelu_erf backward
            // rounds 1/sqrt(2 pi) to 0.398942, a 1.4e-7 relative error).
            let composite = |t: &[Tensor]| {
                let phi = ((&t[0] * std::f64::consts::FRAC_1_SQRT_2).unwrap().erf().unwrap() + 1.0).unwrap() * 0.5;
                (&t[0] * phi.unwrap()).unwrap()
            };
            compare("gelu", &[x], |t| ops::gelu_erf(&t[0]).unwrap(), composite);
        }
    }
}

/// The GELU without a gradient in bf16 and f16 on the test device (on a GPU klspeech's
/// half-type kernel, also in inference): within one rounding of the type of the f64 GELU of the
/// same values.
#[test]
fn half_type_gelu_on_the_test_device_matches_f64() {
    let dev = test_device();
    for (dtype, tol) in [(DType::BF16, 4e-3), (DType::F16, 5e-4)] {
        let x = (rand(&[3, 77, 131], 5, DType::F64) * 3.0).unwrap().to_dtype(dtype).unwrap();
        let y = ops::gelu_erf(&x.to_device(&dev).unwrap()).unwrap();
        assert_eq!(y.dtype(), dtype);
        let want = ops::gelu_erf(&x.to_dtype(DType::F64).unwrap()).unwrap();
        let e = rel(&y.to_device(&Device::Cpu).unwrap().to_dtype(DType::F64).unwrap(), &want);
        println!("gelu in {dtype:?} on {dev:?}: {e:e}");
        assert!(e <= tol, "gelu in {dtype:?} on {dev:?}: rel. error {e:e}");
    }
}

/// Inference's bias + residual + LayerNorm (`ops::residual_layer_norm_infer`, one kernel on a
/// GPU) on the test device in f32, bf16 and f16: within the type's rounding of the f64
/// LayerNorm of `(y + bias) + r` on the same values (rows of the base model's 768 and a short
/// odd width).
#[test]
fn residual_layer_norm_on_the_test_device_matches_f64() {
    let dev = test_device();
    for (case, &(rows, d)) in [(37usize, 768usize), (5, 37)].iter().enumerate() {
        let seed = 700 + 10 * case as u64;
        let (y, r) = (rand(&[rows, d], seed, DType::F64), (rand(&[rows, d], seed + 1, DType::F64) * 2.0).unwrap());
        let (bias, w, b) = (rand(&[d], seed + 2, DType::F64), rand(&[d], seed + 3, DType::F64).affine(0.3, 1.0).unwrap(), rand(&[d], seed + 4, DType::F64));
        for (dtype, tol) in [(DType::F32, 2e-6), (DType::BF16, 2e-2), (DType::F16, 3e-3)] {
            let of = |t: &Tensor| t.to_dtype(dtype).unwrap().to_dtype(DType::F64).unwrap();
            let on = |t: &Tensor| t.to_dtype(dtype).unwrap().to_device(&dev).unwrap();
            let got = ops::residual_layer_norm_infer(&on(&y), &on(&r), &ops::pack_residual_layer_norm(&on(&bias), &on(&w), &on(&b)).unwrap(), 1e-5).unwrap();
            assert_eq!((got.dtype(), got.dims()), (dtype, &[rows, d][..]));
            let z = (of(&y).broadcast_add(&of(&bias)).unwrap() + of(&r)).unwrap();
            let want = ops::standardize_last(&z, 1e-5).unwrap().broadcast_mul(&of(&w)).unwrap().broadcast_add(&of(&b)).unwrap();
            let e = rel(&got.to_device(&Device::Cpu).unwrap().to_dtype(DType::F64).unwrap(), &want);
            println!("residual layer norm [{rows}, {d}] in {dtype:?} on {dev:?}: {e:e}");
            assert!(e <= tol, "residual layer norm [{rows}, {d}] in {dtype:?} on {dev:?}: rel. error {e:e}");
        }
    }
    // Packed parameters of the wrong length: an error that says what it wants.
    let y = rand(&[2, 8], 1, DType::F32).to_device(&dev).unwrap();
    let err = ops::residual_layer_norm_infer(&y, &y, &rand(&[16], 2, DType::F32).to_device(&dev).unwrap(), 1e-5).unwrap_err().to_string();
    assert!(err.contains("16 packed parameters for rows of 8") && err.contains("24"), "{err}");
}

#[test]
fn gelu_f32_is_accurate_in_both_tails() {
    // Against the f64 GELU: |error| <= 2e-7 max(1, |x|) everywhere, and relative error under
    // 6e-4 down to x = -4 where the output is tiny (Phi comes from erfc(|z|), not 1 + erf(z),
    // which would cancel to nothing in f32).
    let xs: Vec<f64> = (0..4001).map(|i| -10.0 + i as f64 * 0.005).collect();
    let x64 = Tensor::new(xs.as_slice(), &Device::Cpu).unwrap();
    let y64: Vec<f64> = ops::gelu_erf(&x64).unwrap().to_vec1().unwrap();
    let y32: Vec<f32> = ops::gelu_erf(&x64.to_dtype(DType::F32).unwrap()).unwrap().to_vec1().unwrap();
    for ((x, a), b) in xs.iter().zip(&y32).zip(&y64) {
        let x32 = *x as f32 as f64;
        let err = (*a as f64 - b).abs();
        assert!(err <= 2e-7 * x32.abs().max(1.0), "gelu({x}): {a} vs {b}");
        if (-4.0..0.0).contains(x) {
            assert!(err / b.abs() < 6e-4, "gelu({x}): relative error {} in the left tail", err / b.abs());
        }
    }
}

#[test]
fn softmax_matches_the_composite() {
    for dtype in [DType::F32, DType::F64] {
        for (i, s) in SHAPES.iter().enumerate() {
            let x = (rand(s, 10 + i as u64, dtype) * 4.0).unwrap();
            compare("softmax", &[x], |t| ops::softmax_last(&t[0]).unwrap(), |t| ops::softmax_last_composite(&t[0]).unwrap());
        }
    }
}

#[test]
fn standardize_and_layer_norm_match_the_composite() {
    for dtype in [DType::F32, DType::F64] {
        for (i, s) in SHAPES.iter().enumerate() {
            if s[2] == 1 {
                continue; // a single feature has zero variance: nothing to compare
            }
            // Offset and scale so the statistics matter.
            let x = ((rand(s, 20 + i as u64, dtype) * 2.5).unwrap() + 0.7).unwrap();
            let d = s[2];
            let w = (rand(&[d], 30, dtype) + 1.0).unwrap();
            let b = rand(&[d], 31, dtype);
            let composite_std = |x: &Tensor| {
                let mean = x.mean_keepdim(2).unwrap();
                let xc = x.broadcast_sub(&mean).unwrap();
                let var = xc.sqr().unwrap().mean_keepdim(2).unwrap();
                xc.broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap()).unwrap()
            };
            compare("standardize", std::slice::from_ref(&x), |t| ops::standardize_last(&t[0], 1e-5).unwrap(), |t| composite_std(&t[0]));
            compare(
                "layer_norm",
                &[x, w, b],
                |t| ops::layer_norm(&t[0], &t[1], &t[2], 1e-5).unwrap(),
                |t| composite_std(&t[0]).broadcast_mul(&t[1]).unwrap().broadcast_add(&t[2]).unwrap(),
            );
        }
    }
}

/// The GPU's training standardization and softmax (`ops::device`: candle's fused forward
/// kernels, klspeech's backward), run here on the CPU in f32 against two-pass f64 composites:
/// values and gradients, also for rows whose mean is 1000 times their spread (where candle's
/// one-pass variance alone would lose everything), and rows of 12 799 values (the first
/// GroupNorm's rows over time).
#[test]
fn device_ops_match_f64_composites() {
    let f64_standardize = |x: &Tensor| {
        let x = x.to_dtype(DType::F64).unwrap();
        let xc = x.broadcast_sub(&x.mean_keepdim(2).unwrap()).unwrap();
        let var = xc.sqr().unwrap().mean_keepdim(2).unwrap();
        xc.broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap()).unwrap().to_dtype(DType::F32).unwrap()
    };
    let f64_softmax = |x: &Tensor| ops::softmax_last_composite(&x.to_dtype(DType::F64).unwrap()).unwrap().to_dtype(DType::F32).unwrap();
    let shapes: &[&[usize]] = &[&[1, 7, 13], &[3, 5, 131], &[2, 77, 33], &[2, 3, 12_799]];
    for (i, s) in shapes.iter().enumerate() {
        for offset in [0.7, 1000.0] {
            let x = ((rand(s, 40 + i as u64, DType::F32) * 2.5).unwrap() + offset).unwrap();
            let tol = if offset > 1.0 { 1e-4 } else { 2e-5 };
            compare_within("device standardize", std::slice::from_ref(&x), tol, |t| ops::device::standardize_last_device(&t[0], 1e-5).unwrap(), |t| f64_standardize(&t[0]));
        }
        let x = (rand(s, 50 + i as u64, DType::F32) * 4.0).unwrap();
        compare_within("device softmax", &[x], 2e-5, |t| ops::device::softmax_last_device(&t[0]).unwrap(), |t| f64_softmax(&t[0]));
    }
    // One node in the graph each (the composites: 5 for softmax, 7 for standardize).
    let x = Var::from_tensor(&rand(&[2, 3, 8], 60, DType::F32)).unwrap();
    let y = ops::device::standardize_last_device(&ops::device::softmax_last_device(x.as_tensor()).unwrap(), 1e-5).unwrap();
    let bare = x.as_tensor().sum_all().unwrap().sorted_nodes().len();
    assert_eq!(y.sum_all().unwrap().sorted_nodes().len(), bare + 2);
}

#[test]
fn add_bias_matches_the_composite() {
    for dtype in [DType::F32, DType::F64] {
        for (i, s) in [&[1usize, 3][..], &[301, 17], &[2, 129, 5]].iter().enumerate() {
            let x = rand(s, 40 + i as u64, dtype);
            let b = rand(&[*s.last().unwrap()], 41, dtype);
            compare("add_bias", &[x, b], |t| ops::add_bias(&t[0], &t[1]).unwrap(), |t| t[0].broadcast_add(&t[1]).unwrap());
        }
    }
}

#[test]
fn channels_last_conv_matches_the_composite() {
    // (batch, length, c_in, c_out, kernel, stride, padding, groups, max frames): the feature
    // encoder's first layer (one input channel, K = 2 s), K = 3 / s = 2, kernel == stride, the
    // positional conv (even kernel, padding K/2, groups, last frame dropped; K > 4 s takes the
    // column scatter), a padded grouped kernel of exactly four strides, and enough clips that
    // the (group, clip) tasks run in parallel instead of gemm.
    let cases = [
        (1, 977, 1, 8, 10, 5, 0, 1, None),
        (3, 203, 6, 10, 3, 2, 0, 1, None),
        (2, 64, 5, 7, 2, 2, 0, 1, None),
        (2, 71, 8, 8, 16, 1, 8, 4, Some(71)),
        (1, 9, 6, 4, 4, 1, 2, 2, None),
        (3, 130, 4, 6, 5, 3, 1, 2, None),
        (9, 33, 3, 5, 3, 2, 0, 1, None),
    ];
    for dtype in [DType::F32, DType::F64] {
        for (i, &(b, l, ci, co, k, s, p, g, max_t)) in cases.iter().enumerate() {
            let x = rand(&[b, l, ci], 90 + i as u64, dtype);
            let w = rand(&[co, ci / g, k], 95 + i as u64, dtype);
            // The inference variant with GELU fused: the same bits as the two ops.
            let fused_gelu = ops::conv1d_cl_gelu(&x, &w, s, p, g, max_t).unwrap();
            let separate = ops::gelu_erf(&ops::conv1d_cl(&x, &w, s, p, g, max_t).unwrap()).unwrap();
            assert_eq!(
                fused_gelu.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap(),
                separate.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap()
            );
            compare(
                &format!("conv1d_cl {:?}", (b, l, ci, co, k, s, p, g, max_t)),
                &[x, w],
                |t| ops::conv1d_cl(&t[0], &t[1], s, p, g, max_t).unwrap(),
                |t| {
                    let y = ops::conv1d_cl_composite(&t[0], &t[1], s, p, g).unwrap();
                    match max_t {
                        Some(m) => y.narrow(1, 0, m).unwrap(),
                        None => y,
                    }
                },
            );
        }
    }
}

#[test]
fn channels_last_group_norm_matches_the_composite() {
    // [B, T, C] with T below, at and above one 32-frame block (ragged last blocks), C odd,
    // T = 1 (zero variance).
    for dtype in [DType::F32, DType::F64] {
        for (i, &(b, t, c)) in [(1usize, 7usize, 13usize), (3, 131, 5), (2, 33, 77), (2, 50, 64), (1, 1, 3)].iter().enumerate() {
            // A mean 1e6 spreads from zero in one case (the one-pass variance
            // shifts by the first frame; without the shift it cancels). candle's f32
            // composite itself loses digits there, so f32 is checked against f64 below.
            let offset = if i == 1 && dtype == DType::F64 { 1.0e6 } else { 1.0 };
            let x = rand(&[b, t, c], 100 + i as u64, dtype).affine(3.0, offset).unwrap();
            let w = rand(&[c], 101, dtype);
            let bias = rand(&[c], 102, dtype);
            // The inference variant with GELU fused: the same bits as the two ops.
            let fused_gelu = ops::group_norm_cl_gelu(&x, &w, &bias, 1e-5).unwrap();
            let separate = ops::gelu_erf(&ops::group_norm_cl(&x, &w, &bias, 1e-5).unwrap()).unwrap();
            assert_eq!(
                fused_gelu.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap(),
                separate.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap()
            );
            compare(
                &format!("group_norm_cl {:?}", (b, t, c)),
                &[x, w, bias],
                |v| ops::group_norm_cl(&v[0], &v[1], &v[2], 1e-5).unwrap(),
                |v| ops::group_norm_cl_composite(&v[0], &v[1], &v[2], 1e-5).unwrap(),
            );
        }
    }
    // f32 with the mean 1e3 spreads away from zero: the op's f64 statistics against the f64
    // composite of the same values.
    let x = rand(&[3, 131, 5], 110, DType::F32).affine(3.0, 1.0e3).unwrap();
    let (w, bias) = (rand(&[5], 111, DType::F32), rand(&[5], 112, DType::F32));
    let y = ops::group_norm_cl(&x, &w, &bias, 1e-5).unwrap();
    let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    let reference = ops::group_norm_cl_composite(&f64s(&x), &f64s(&w), &f64s(&bias), 1e-5).unwrap();
    let r = rel(&y, &reference);
    assert!(r <= 1e-5, "group_norm_cl f32, mean 1e3: rel. error {r:e}");
}

/// The padding-aware channels-last GroupNorm (`ops::group_norm_cl_valid`: statistics over each
/// clip's valid frames, every frame normalized; the trainer's padded batches) against the
/// masked composite `model::Norm` ran in [B, C, T] (mask-weighted mean and variance over the
/// valid count, then the affine), values and the gradients of x, w and b: valid lengths of one
/// frame, of every frame, across and inside 32-frame blocks; a refused length list gives None.
#[test]
fn padding_aware_channels_last_group_norm_matches_the_masked_composite() {
    for dtype in [DType::F32, DType::F64] {
        for (i, &(t, c, ref valid)) in [(45usize, 13usize, vec![45usize, 1, 33]), (131, 5, vec![64, 100, 131]), (7, 40, vec![3, 7, 6])].iter().enumerate() {
            let b = valid.len();
            let x = rand(&[b, t, c], 140 + i as u64, dtype).affine(3.0, 0.5).unwrap();
            let (w, bias) = (rand(&[c], 141, dtype), rand(&[c], 142, dtype));
            let mut m = vec![0f64; b * t];
            for (bi, &n) in valid.iter().enumerate() {
                m[bi * t..bi * t + n].fill(1.0);
            }
            let mask = Tensor::from_vec(m, (b, 1, t), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            let composite = |v: &[Tensor]| {
                let xt = v[0].transpose(1, 2).unwrap(); // [B, C, T]
                let n = mask.sum_keepdim(2).unwrap();
                let mean = xt.broadcast_mul(&mask).unwrap().sum_keepdim(2).unwrap().broadcast_div(&n).unwrap();
                let xc = xt.broadcast_sub(&mean).unwrap();
                let var = xc.broadcast_mul(&mask).unwrap().sqr().unwrap().sum_keepdim(2).unwrap().broadcast_div(&n).unwrap();
                let xh = xc.broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap()).unwrap().transpose(1, 2).unwrap();
                xh.broadcast_mul(&v[1]).unwrap().broadcast_add(&v[2]).unwrap()
            };
            compare(
                &format!("group_norm_cl_valid {:?} {valid:?}", (b, t, c)),
                &[x, w, bias],
                |v| ops::group_norm_cl_valid(&v[0], &v[1], &v[2], 1e-5, valid).unwrap().expect("fused on the CPU"),
                composite,
            );
        }
    }
    let x = rand(&[2, 5, 3], 1, DType::F32);
    let (w, b) = (rand(&[3], 2, DType::F32), rand(&[3], 3, DType::F32));
    for bad in [vec![5, 0], vec![5, 6], vec![5]] {
        assert!(ops::group_norm_cl_valid(&x, &w, &b, 1e-5, &bad).unwrap().is_none(), "{bad:?}");
    }
}

/// The masked composite `model::Norm` runs for a padded batch's GroupNorm, in channels-last
/// [B, T, C] with mask [B, T]: mean and variance over each clip's frames whose mask is 1, every
/// frame normalized, then the affine.
fn masked_group_norm_composite(x: &Tensor, w: &Tensor, b: &Tensor, mask: &Tensor) -> Tensor {
    let m = mask.unsqueeze(2).unwrap(); // [B, T, 1]
    let n = m.sum_keepdim(1).unwrap();
    let mean = x.broadcast_mul(&m).unwrap().sum_keepdim(1).unwrap().broadcast_div(&n).unwrap();
    let xc = x.broadcast_sub(&mean).unwrap();
    let var = xc.broadcast_mul(&m).unwrap().sqr().unwrap().sum_keepdim(1).unwrap().broadcast_div(&n).unwrap();
    xc.broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap()).unwrap().broadcast_mul(w).unwrap().broadcast_add(b).unwrap()
}

/// `ops::group_norm_cl_masked` (the padding-aware GroupNorm of a padded batch's first
/// feature-encoder layer) on the test device against the masked composite in f64: values and the
/// gradients of x, w and b in f32 (on a GPU klspeech's masked kernels, on the CPU the fused op
/// of leading-ones masks); the inference variant with the GELU in f32, bf16 and f16 (on a GPU the
/// kernels; the CPU has no fused half-type op: `None`, the caller's composite); a mask with
/// holes (a GPU's kernels read the mask; the CPU's op takes lengths: `None`). Padded frames hold
/// values far from the valid ones.
#[test]
fn padding_aware_group_norm_on_the_test_device_matches_f64() {
    let dev = test_device();
    let (b, t, c) = (3usize, 45usize, 40usize);
    let lengths = [45usize, 1, 30];
    let prefix: Vec<f64> = lengths.iter().flat_map(|&n| (0..t).map(move |i| f64::from(u8::from(i < n)))).collect();
    let holes: Vec<f64> = (0..b * t).map(|i| f64::from(u8::from((7 * (i % t)) % 5 < 3))).collect();
    let x0 = rand(&[b, t, c], 150, DType::F64).affine(1.5, 0.3).unwrap();
    let w = rand(&[c], 151, DType::F64).affine(0.3, 1.0).unwrap();
    let bias = rand(&[c], 152, DType::F64).affine(0.2, 0.0).unwrap();
    for (name, m) in [("leading ones", prefix), ("holes", holes)] {
        let mask = Tensor::from_vec(m, (b, t), &Device::Cpu).unwrap();
        // Padding far from the valid frames: statistics over every frame would be off by it.
        let pad = (mask.affine(-1.0, 1.0).unwrap().unsqueeze(2).unwrap() * 40.0).unwrap();
        let x = x0.broadcast_add(&pad).unwrap();
        let kernel_or_fused = dev.is_cuda() || name == "leading ones";
        let on = |t: &Tensor, dtype: DType| t.to_dtype(dtype).unwrap().to_device(&dev).unwrap();

        // f32 with gradients.
        let vars: Vec<Var> = [&x, &w, &bias].iter().map(|t| Var::from_tensor(&on(t, DType::F32)).unwrap()).collect();
        let got = ops::group_norm_cl_masked(vars[0].as_tensor(), vars[1].as_tensor(), vars[2].as_tensor(), 1e-5, &on(&mask, DType::F32), false).unwrap();
        assert_eq!(got.is_some(), kernel_or_fused, "{name} on {dev:?}: fused / kernel path");
        let Some(got) = got else { continue };
        let ref_vars: Vec<Var> = [&x, &w, &bias].iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let want = masked_group_norm_composite(ref_vars[0].as_tensor(), ref_vars[1].as_tensor(), ref_vars[2].as_tensor(), &mask);
        let r = rand(&[b, t, c], 153, DType::F64);
        let g = (&got * &on(&r, DType::F32)).unwrap().sum_all().unwrap().backward().unwrap();
        let gr = (&want * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let cpu = |t: &Tensor| t.to_device(&Device::Cpu).unwrap().to_dtype(DType::F64).unwrap();
        let e = rel(&cpu(&got), &want);
        println!("masked group norm ({name}) in F32 on {dev:?}: {e:e}");
        assert!(e <= 2e-5, "masked group norm ({name}) on {dev:?}: value rel. error {e:e}");
        for (i, (v, rv)) in vars.iter().zip(&ref_vars).enumerate() {
            let e = rel(&cpu(g.get(v.as_tensor()).expect("a gradient")), gr.get(rv.as_tensor()).unwrap());
            println!("masked group norm ({name}) gradient {i} on {dev:?}: {e:e}");
            assert!(e <= 5e-5, "masked group norm ({name}) on {dev:?}: gradient of input {i}: rel. error {e:e}");
        }

        // Inference with the GELU, in each type: the f64 GELU of the composite on the same values.
        for (dtype, tol) in [(DType::F32, 2e-5), (DType::BF16, 2e-2), (DType::F16, 3e-3)] {
            let of = |t: &Tensor| t.to_dtype(dtype).unwrap().to_dtype(DType::F64).unwrap();
            let got = ops::group_norm_cl_masked(&on(&x, dtype), &on(&w, dtype), &on(&bias, dtype), 1e-5, &on(&mask, dtype), true).unwrap();
            if !dev.is_cuda() && dtype != DType::F32 {
                assert!(got.is_none(), "{name} in {dtype:?} on the CPU: no fused half-type op");
                continue;
            }
            let got = got.expect("a kernel or fused path");
            assert_eq!((got.dtype(), got.dims()), (dtype, &[b, t, c][..]));
            let want = masked_group_norm_composite(&of(&x), &of(&w), &of(&bias), &mask).gelu_erf().unwrap();
            let e = rel(&cpu(&got), &want);
            println!("masked group norm + GELU ({name}) in {dtype:?} on {dev:?}: {e:e}");
            assert!(e <= tol, "masked group norm + GELU ({name}) in {dtype:?} on {dev:?}: rel. error {e:e}");
        }
    }
    // A mask of another shape: not this op's (the caller's composite).
    let x = rand(&[2, 5, 3], 1, DType::F32).to_device(&dev).unwrap();
    let (w, b) = (rand(&[3], 2, DType::F32).to_device(&dev).unwrap(), rand(&[3], 3, DType::F32).to_device(&dev).unwrap());
    assert!(ops::group_norm_cl_masked(&x, &w, &b, 1e-5, &Tensor::ones((2, 4), DType::F32, &dev).unwrap(), false).unwrap().is_none());
}

#[test]
fn first_layer_conv_group_norm_gelu_matches_the_three_ops() {
    // wav2vec2-base's first layer (one input channel, K = 10, stride 5) and odd variants:
    // channels below, across and off the 16-lane blocks, frames across 32-frame blocks,
    // batch 1 and 3, a large input offset (the statistics' shift is the first frame).
    for dtype in [DType::F32, DType::F64] {
        for (i, &(b, l, c, k, s, offset)) in [(1usize, 1003usize, 40usize, 10usize, 5usize, 0.0), (3, 400, 13, 10, 5, 0.0), (2, 97, 16, 3, 2, 50.0), (1, 10, 5, 10, 5, 0.0)].iter().enumerate() {
            let x = rand(&[b, l, 1], 130 + i as u64, dtype).affine(1.0, offset).unwrap();
            let w = rand(&[c, 1, k], 131, dtype);
            let (gw, gb) = (rand(&[c], 132, dtype), rand(&[c], 133, dtype));
            let fused = ops::conv1_group_norm_gelu(&x, &w, s, &gw, &gb, 1e-5).unwrap();
            let separate = ops::group_norm_cl_gelu(&ops::conv1d_cl(&x, &w, s, 0, 1, None).unwrap(), &gw, &gb, 1e-5).unwrap();
            let r = rel(&fused, &separate);
            assert!(r <= tol(dtype), "conv1_group_norm_gelu {:?} {dtype:?}: rel. error {r:e}", (b, l, c, k, s));
        }
    }
}

/// The first feature-encoder layer's inference op on the test device (on a GPU the one kernel
/// `kl_conv1_group_norm_gelu`) in f32, bf16 and f16 against f64's conv, GroupNorm and GELU
/// of the same (rounded) values: wav2vec2-base's K 10 / stride 5 over 20 channels (fewer than a
/// tile), and 40 channels of K 3 / stride 2 on clips with a mean 4 times their spread (in bf16 the
/// convolution's rounding, relative to its mean, is the error after the normalization).
#[test]
fn first_layer_conv_group_norm_gelu_on_the_test_device_matches_f64() {
    let dev = test_device();
    for (case, &(b, l, c, k, s, offset)) in [(2usize, 1603usize, 20usize, 10usize, 5usize, 0.0), (3, 301, 40, 3, 2, 4.0)].iter().enumerate() {
        let seed = 730 + 10 * case as u64;
        let x = rand(&[b, l, 1], seed, DType::F64).affine(1.0, offset).unwrap();
        let w = rand(&[c, 1, k], seed + 1, DType::F64).affine(0.3, 0.0).unwrap();
        let (gw, gb) = (rand(&[c], seed + 2, DType::F64).affine(0.3, 1.0).unwrap(), rand(&[c], seed + 3, DType::F64).affine(0.2, 0.0).unwrap());
        for (dtype, tol) in [(DType::F32, 5e-6), (DType::BF16, 2e-2), (DType::F16, 3e-3)] {
            let of = |t: &Tensor| t.to_dtype(dtype).unwrap().to_dtype(DType::F64).unwrap();
            let on = |t: &Tensor| t.to_dtype(dtype).unwrap().to_device(&dev).unwrap();
            let got = ops::conv1_group_norm_gelu(&on(&x), &on(&w), s, &on(&gw), &on(&gb), 1e-5).unwrap();
            let t = (l - k) / s + 1;
            assert_eq!((got.dtype(), got.dims()), (dtype, &[b, t, c][..]));
            let conv = of(&x).transpose(1, 2).unwrap().conv1d(&of(&w), 0, s, 1, 1).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
            let want = ops::group_norm_cl_composite(&conv, &of(&gw), &of(&gb), 1e-5).unwrap().gelu_erf().unwrap();
            let e = rel(&got.to_device(&Device::Cpu).unwrap().to_dtype(DType::F64).unwrap(), &want);
            println!("conv1_group_norm_gelu {:?} in {dtype:?} on {dev:?}: {e:e}", (b, l, c, k, s));
            assert!(e <= tol, "conv1_group_norm_gelu {:?} in {dtype:?} on {dev:?}: rel. error {e:e}", (b, l, c, k, s));
        }
    }
}

#[test]
fn weight_norm_matches_the_composite() {
    // v [O, C, K] with g [1, 1, K] (the positional conv's layout): one kernel tap, fewer
    // rows than one task, several tasks with a ragged last one.
    for dtype in [DType::F32, DType::F64] {
        for (i, s) in [&[5usize, 3, 7][..], &[1, 1, 1], &[300, 2, 5], &[40, 6, 9]].iter().enumerate() {
            let v = rand(s, 140 + i as u64, dtype);
            let g = rand(&[1, 1, s[2]], 141, dtype).affine(0.5, 1.0).unwrap();
            compare(
                &format!("weight_norm_last {s:?}"),
                &[v, g],
                |t| ops::weight_norm_last(&t[0], &t[1]).unwrap(),
                |t| ops::weight_norm_last_composite(&t[0], &t[1]).unwrap(),
            );
        }
    }
}

/// The keys the GPU's attention pads to (none with `KLSPEECH_NO_KEY_PAD=1`, as
/// tools/gpu_check.sh sets it after a failure).
#[test]
fn attention_keys_are_padded_to_a_multiple_of_8() {
    let off = std::env::var_os("KLSPEECH_NO_KEY_PAD").is_some_and(|v| !v.is_empty() && v != "0");
    let pads: Vec<usize> = [1usize, 7, 8, 13, 40, 199, 499].iter().map(|&t| ops::device::key_padding(t)).collect();
    assert_eq!(pads, if off { [0; 7] } else { [7, 1, 0, 3, 0, 1, 5] });
}

#[test]
fn training_attention_matches_the_composite() {
    // Values and the gradient of the packed projection: batch 1 and 3, one frame, a key mask
    // hiding the tail of two clips, dropout on the probabilities (the same keyed mask).
    for dtype in [DType::F32, DType::F64] {
        for &(b, t, heads, hd, masked, drop) in &[(1usize, 7usize, 2usize, 3usize, false, None), (3, 13, 4, 5, true, Some((0.2, 77u64))), (2, 1, 3, 4, false, Some((0.5, 5))), (3, 40, 2, 8, true, None)] {
            let qkv = rand(&[b, t, 3 * heads * hd], 150 + t as u64, dtype);
            let kb = masked.then(|| {
                let mut m = vec![0f64; b * t];
                for (i, v) in m.iter_mut().enumerate() {
                    if (i / t) > 0 && i % t >= t - 1 - (i / t) * 2 {
                        *v = -1e9;
                    }
                }
                Tensor::from_vec(m, (b, t), &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
            });
            let scale = 1.0 / (hd as f64).sqrt();
            compare(
                &format!("attention {:?}", (b, t, heads, hd, masked, drop)),
                &[qkv],
                |v| ops::attention(&v[0], heads, scale, kb.as_ref(), drop).unwrap(),
                |v| ops::attention_train_composite(&v[0], heads, scale, kb.as_ref(), drop).unwrap(),
            );
            // The GPU's training attention (ops::device: one node per layer), here on the CPU.
            compare(
                &format!("device attention {:?}", (b, t, heads, hd, masked, drop)),
                &[rand(&[b, t, 3 * heads * hd], 150 + t as u64, dtype)],
                |v| ops::device::attention_device(&v[0], heads, scale, kb.as_ref(), drop).unwrap(),
                |v| ops::attention_train_composite(&v[0], heads, scale, kb.as_ref(), drop).unwrap(),
            );
        }
    }
}

#[test]
fn seeded_dropout_matches_the_mask_composite() {
    for dtype in [DType::F32, DType::F64] {
        for (i, s) in SHAPES.iter().enumerate() {
            let x = rand(s, 110 + i as u64, dtype);
            compare(
                "dropout",
                &[x],
                |t| ops::dropout(&t[0], 0.3, 42).unwrap(),
                |t| t[0].mul(&ops::dropout_mask(&t[0], 0.3, 42).unwrap()).unwrap(),
            );
        }
    }
    // About p of 100 000 elements are dropped, the rest scaled by 1 / (1 - p); another key
    // gives another mask; p = 0 is the identity.
    let ones = Tensor::ones(100_000, DType::F32, &Device::Cpu).unwrap();
    let y: Vec<f32> = ops::dropout(&ones, 0.3, 42).unwrap().to_vec1().unwrap();
    let dropped = y.iter().filter(|&&v| v == 0.0).count() as f64 / y.len() as f64;
    assert!((dropped - 0.3).abs() < 0.005, "dropped fraction {dropped}");
    assert!(y.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.7).abs() < 1e-6));
    let other: Vec<f32> = ops::dropout(&ones, 0.3, 43).unwrap().to_vec1().unwrap();
    assert_ne!(y, other);
    let same: Vec<f32> = ops::dropout(&ones, 0.0, 42).unwrap().to_vec1().unwrap();
    assert!(same.iter().all(|&v| v == 1.0));
    assert!(ops::dropout(&ones, 1.0, 42).is_err());
}

#[test]
fn linear_matches_the_composite() {
    // (rows, in, out): one row, odd sizes, more rows than columns and the reverse; in > out
    // (the weight is transposed first) with several ragged 64-row bands and 8 x 8 tiles.
    for dtype in [DType::F32, DType::F64] {
        for (i, &(rows, d_in, d_out)) in [(1usize, 7usize, 5usize), (131, 33, 13), (17, 64, 200), (392, 192, 576), (49, 203, 70)].iter().enumerate() {
            let x = rand(&[rows, d_in], 120 + i as u64, dtype);
            let w = rand(&[d_out, d_in], 121 + i as u64, dtype);
            let b = rand(&[d_out], 122 + i as u64, dtype);
            compare(
                &format!("linear {:?}", (rows, d_in, d_out)),
                &[x.clone(), w.clone(), b],
                |t| ops::linear(&t[0], &t[1], Some(&t[2])).unwrap(),
                |t| t[0].matmul(&t[1].t().unwrap()).unwrap().broadcast_add(&t[2]).unwrap(),
            );
            compare(
                &format!("linear without bias {:?}", (rows, d_in, d_out)),
                &[x.clone(), w.clone()],
                |t| ops::linear(&t[0], &t[1], None).unwrap(),
                |t| t[0].matmul(&t[1].t().unwrap()).unwrap(),
            );
            // The GPU's training linear layer (ops::device), here on the CPU.
            compare(
                &format!("device linear {:?}", (rows, d_in, d_out)),
                &[x.clone(), w.clone(), rand(&[d_out], 122 + i as u64, dtype)],
                |t| ops::device::linear_device(&t[0], &t[1], Some(&t[2])).unwrap(),
                |t| t[0].matmul(&t[1].t().unwrap()).unwrap().broadcast_add(&t[2]).unwrap(),
            );
            compare(
                &format!("device linear without bias {:?}", (rows, d_in, d_out)),
                &[x, w],
                |t| ops::device::linear_device(&t[0], &t[1], None).unwrap(),
                |t| t[0].matmul(&t[1].t().unwrap()).unwrap(),
            );
        }
    }
}

/// Linear layers on the test device against f64 on the CPU: without gradient (inference) in
/// f32, bf16 and f16, with the erf GELU after it too (`ops::linear_gelu_infer`), and the training op (`ops::device::linear_device`) with all three
/// gradients in f32. On a GPU both add the bias with klspeech's in-place kernel
/// (`ops::kernels::bias_add`, widths below, at and over one 256-column tile).
#[test]
fn linear_on_the_test_device_matches_f64() {
    let dev = test_device();
    for (i, &(rows, d_in, d_out)) in [(1usize, 7usize, 5usize), (37, 64, 256), (130, 96, 769)].iter().enumerate() {
        let seed = 1400 + 10 * i as u64;
        let (x, w, b) = (rand(&[rows, d_in], seed, DType::F64), rand(&[d_out, d_in], seed + 1, DType::F64), rand(&[d_out], seed + 2, DType::F64));
        let reference = |t: &[Tensor]| t[0].matmul(&t[1].t().unwrap()).unwrap().broadcast_add(&t[2]).unwrap();
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 1e-2), (DType::F16, 2e-3)] {
            let of = |t: &Tensor| t.to_dtype(dtype).unwrap().to_dtype(DType::F64).unwrap();
            let on = |t: &Tensor| t.to_dtype(dtype).unwrap().to_device(&dev).unwrap();
            let y = ops::linear(&on(&x), &on(&w), Some(&on(&b))).unwrap();
            assert_eq!(y.dtype(), dtype);
            let e = rel(&y.to_device(&Device::Cpu).unwrap(), &reference(&[of(&x), of(&w), of(&b)]));
            assert!(e <= tol, "linear [{rows}, {d_in}] -> {d_out} on {dev:?} in {dtype:?}: {e:e}");
            // Inference's feed-forward: the bias and the erf GELU in one pass on a GPU.
            let y = ops::linear_gelu_infer(&on(&x), &on(&w), &on(&b)).unwrap();
            assert_eq!(y.dtype(), dtype);
            let e = rel(&y.to_device(&Device::Cpu).unwrap(), &reference(&[of(&x), of(&w), of(&b)]).gelu_erf().unwrap());
            assert!(e <= tol, "linear + GELU [{rows}, {d_in}] -> {d_out} on {dev:?} in {dtype:?}: {e:e}");
        }
        let run = |t: &[Tensor], f: &dyn Fn(&[Tensor]) -> Tensor| {
            let vars: Vec<Var> = t.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
            let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let y = f(&ts);
            let r = rand(y.dims(), seed + 3, DType::F64).to_dtype(y.dtype()).unwrap().to_device(y.device()).unwrap();
            let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let cpu = |t: &Tensor| t.to_device(&Device::Cpu).unwrap().to_dtype(DType::F64).unwrap();
            let mut out = vec![cpu(&y)];
            out.extend(vars.iter().map(|v| cpu(grads.get(v.as_tensor()).unwrap())));
            out
        };
        let on = |t: &Tensor| t.to_dtype(DType::F32).unwrap().to_device(&dev).unwrap();
        let of = |t: &Tensor| t.to_dtype(DType::F32).unwrap().to_dtype(DType::F64).unwrap();
        let got = run(&[on(&x), on(&w), on(&b)], &|t| ops::device::linear_device(&t[0], &t[1], Some(&t[2])).unwrap());
        let want = run(&[of(&x), of(&w), of(&b)], &reference);
        for (name, a, r) in ["value", "dx", "dw", "db"].iter().zip(&got).zip(&want).map(|((n, a), r)| (n, a, r)) {
            let e = rel(a, r);
            assert!(e <= 1e-5, "training linear [{rows}, {d_in}] -> {d_out} on {dev:?}: {name} {e:e}");
        }
    }
}

/// The device linear layer hands its weight and bias gradients to ops::backward's store (the
/// same bits as plain backward), and takes none for inputs that need none.
#[test]
fn device_linear_routes_parameter_gradients() {
    let x = Var::from_tensor(&rand(&[9, 6], 130, DType::F32)).unwrap();
    let w = Var::from_tensor(&rand(&[4, 6], 131, DType::F32)).unwrap();
    let b = Var::from_tensor(&rand(&[4], 132, DType::F32)).unwrap();
    let g = rand(&[9, 4], 133, DType::F32);
    let loss = (ops::device::linear_device(x.as_tensor(), w.as_tensor(), Some(b.as_tensor())).unwrap() * &g).unwrap().sum_all().unwrap();
    let (stored, routed) = ops::grads::backward_counted(&loss).unwrap();
    let plain = loss.backward().unwrap();
    let mut ids: Vec<String> = routed.iter().map(|id| format!("{id:?}")).collect();
    let mut want: Vec<String> = [w.as_tensor().id(), b.as_tensor().id()].iter().map(|id| format!("{id:?}")).collect();
    ids.sort();
    want.sort();
    assert_eq!(ids, want);
    for v in [&x, &w, &b] {
        let a: Vec<f32> = stored.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let p: Vec<f32> = plain.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a, p);
    }
    // A constant input: no gradient for it.
    let loss = (ops::device::linear_device(&x.as_tensor().detach(), w.as_tensor(), None).unwrap() * &g).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    assert!(grads.get(x.as_tensor()).is_none() && grads.get(w.as_tensor()).is_some());
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    // The column sums of the bias / LayerNorm gradients are combined in chunk order.
    let x = rand(&[3, 200, 40], 60, DType::F32);
    let b = rand(&[40], 61, DType::F32);
    let go = || {
        let v = Var::from_tensor(&b).unwrap();
        let y = ops::add_bias(&x, v.as_tensor()).unwrap();
        let g = (y.sqr().unwrap()).sum_all().unwrap().backward().unwrap();
        g.get(v.as_tensor()).unwrap().to_vec1::<f32>().unwrap()
    };
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap().install(go);
    let three = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap().install(go);
    assert_eq!(one, three);

    // The convolution: (group, clip) tasks in parallel or gemm in parallel, by thread count.
    let x = rand(&[3, 101, 8], 62, DType::F32);
    let w = rand(&[8, 2, 6], 63, DType::F32);
    let conv = || {
        let (xv, wv) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&w).unwrap());
        let y = ops::conv1d_cl(xv.as_tensor(), wv.as_tensor(), 1, 3, 4, None).unwrap();
        let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        (flat(&y), flat(g.get(xv.as_tensor()).unwrap()), flat(g.get(wv.as_tensor()).unwrap()))
    };
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap().install(conv);
    let three = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap().install(conv);
    assert_eq!(one, three);
}

/// A training installed on candle's pool takes its caller's path even when a worker that is
/// in the middle of a GPU-path job runs it (a waiting rayon worker runs other queued jobs):
/// the cause of a once-seen mismatch in train::same_seed_same_run_and_resume_is_exact, whose
/// runs could be picked up by the worker of the concurrent GPU-path test. Before the fix,
/// the second thread saw the GPU path about once per job of the first.
#[test]
fn a_pool_job_keeps_its_callers_path_when_a_gpu_path_worker_runs_it() {
    use rayon::prelude::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    // What the trainer and the bench do: read the caller's setting, carry it into the pool.
    let in_pool = |f: &(dyn Fn() -> bool + Sync)| {
        let on = ops::gpu_path_active();
        Device::Cpu.with_context(|| ops::with_gpu_path_if(on, f))
    };
    let (done, runs, leaked) = (AtomicBool::new(false), AtomicUsize::new(0), AtomicUsize::new(0));
    std::thread::scope(|s| {
        s.spawn(|| {
            for _ in 0..100 {
                ops::with_gpu_path(|| {
                    in_pool(&|| {
                        let v: Vec<f64> = (0..1_000_000).into_par_iter().map(|i| (i as f64).sqrt()).collect();
                        std::hint::black_box(v);
                        ops::gpu_path_active()
                    })
                });
            }
            done.store(true, Ordering::Relaxed);
        });
        s.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                runs.fetch_add(1, Ordering::Relaxed);
                if in_pool(&ops::gpu_path_active) {
                    leaked.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    });
    let (runs, leaked) = (runs.into_inner(), leaked.into_inner());
    println!("{runs} CPU-path jobs beside 100 GPU-path jobs, {leaked} ran on the GPU path");
    assert!(runs > 100, "the two threads did not overlap ({runs} jobs)");
    assert_eq!(leaked, 0);
    // And the setting is restored both ways.
    assert!(ops::with_gpu_path(|| !ops::with_gpu_path_if(false, ops::gpu_path_active) && ops::gpu_path_active()));
    assert!(!ops::gpu_path_active());
}

fn softplus(z: &Tensor) -> Tensor {
    (z.relu().unwrap() + (z.abs().unwrap().neg().unwrap().exp().unwrap() + 1.0).unwrap().log().unwrap()).unwrap()
}

#[test]
fn kl_norm_matches_the_composite() {
    // Output and per-position KL together (so the loss weights both), both priors.
    for dtype in [DType::F32, DType::F64] {
        for (i, s) in [&[1usize, 7, 13][..], &[3, 5, 131], &[2, 77, 33]].iter().enumerate() {
            let d = s[2];
            let x = ((rand(s, 70 + i as u64, dtype) * 2.0).unwrap() + 0.3).unwrap();
            let noise = rand(s, 71, dtype);
            let w = (rand(&[d], 72, dtype) * 0.3).unwrap().affine(1.0, 1.0).unwrap();
            let b = (rand(&[d], 73, dtype) * 0.2).unwrap();
            let a = (rand(&[d], 74, dtype) * 0.5).unwrap();
            let b2 = (rand(&[d], 75, dtype) * 0.5).unwrap().affine(1.0, -2.0).unwrap();
            let m = (rand(&[d], 76, dtype) * 0.2).unwrap();
            let sr = (rand(&[d], 77, dtype) * 0.3).unwrap();
            for learned in [false, true] {
                let mut inputs = vec![x.clone(), w.clone(), b.clone(), a.clone(), b2.clone()];
                if learned {
                    inputs.push(m.clone());
                    inputs.push(sr.clone());
                }
                let nz = noise.clone();
                let fused = |t: &[Tensor]| {
                    let prior = if learned { Some((&t[5], &t[6])) } else { None };
                    let (y, kl) = ops::kl_norm_last(&t[0], &t[1], &t[2], &t[3], &t[4], prior, &nz, 1e-5).unwrap().expect("fused on CPU");
                    Tensor::cat(&[y.flatten_all().unwrap(), kl.flatten_all().unwrap()], 0).unwrap()
                };
                let nz2 = noise.clone();
                let composite = |t: &[Tensor]| {
                    let xh = ops::standardize_last(&t[0], 1e-5).unwrap();
                    let mu = xh.broadcast_mul(&t[1]).unwrap().broadcast_add(&t[2]).unwrap();
                    let sigma = softplus(&xh.broadcast_mul(&t[3]).unwrap().broadcast_add(&t[4]).unwrap());
                    let y = (&mu + (&sigma * &nz2).unwrap()).unwrap();
                    let ln_s = sigma.log().unwrap();
                    let per = if learned {
                        let sp = softplus(&t[6]);
                        let iv = sp.sqr().unwrap().recip().unwrap();
                        let t1 = sigma.sqr().unwrap().broadcast_mul(&iv).unwrap();
                        let t2 = mu.broadcast_sub(&t[5]).unwrap().sqr().unwrap().broadcast_mul(&iv).unwrap();
                        let t3 = sp.log().unwrap().affine(2.0, -1.0).unwrap();
                        ((t1 + t2).unwrap().broadcast_add(&t3).unwrap() - ln_s.affine(2.0, 0.0).unwrap()).unwrap().affine(0.5, 0.0).unwrap()
                    } else {
                        ((mu.sqr().unwrap() + sigma.sqr().unwrap()).unwrap() - ln_s.affine(2.0, 1.0).unwrap()).unwrap().affine(0.5, 0.0).unwrap()
                    };
                    let kl = per.sum(2).unwrap();
                    Tensor::cat(&[y.flatten_all().unwrap(), kl.flatten_all().unwrap()], 0).unwrap()
                };
                compare(&format!("kl_norm {s:?} learned={learned}"), &inputs, fused, composite);
                // The GPU's KL-Norm site (ops::device), here on the CPU (f32: candle's fused
                // LayerNorm kernel on the CPU has no f64).
                if dtype == DType::F32 {
                    let nz3 = noise.clone();
                    let device = |t: &[Tensor]| {
                        let prior = if learned { Some((&t[5], &t[6])) } else { None };
                        let (y, kl) = ops::device::kl_norm_last_device(&t[0], &t[1], &t[2], &t[3], &t[4], prior, &nz3, 1e-5).unwrap();
                        Tensor::cat(&[y.flatten_all().unwrap(), kl.flatten_all().unwrap()], 0).unwrap()
                    };
                    compare_within(&format!("device kl_norm {s:?} learned={learned}"), &inputs, 2e-5, device, composite);
                }
            }
        }
    }
}

#[test]
fn fast_f32_exp_is_within_two_ulp() {
    use klspeech::ops::FastExp;
    let mut worst = 0.0f64;
    // [-80, 87.9]: below about -87.3 the true result is subnormal; above 88 the input is clamped.
    for i in 0..=167_900 {
        let x = -80.0f32 + i as f32 * 0.001;
        let got = x.fexp() as f64;
        let want = (x as f64).exp();
        let rel = ((got - want) / want).abs();
        worst = if rel.is_nan() { f64::INFINITY } else { worst.max(rel) }; // (max passes over NaN)
    }
    // 2 ulp of f32 = 2.4e-7 relative.
    assert!(worst < 2.4e-7, "worst relative error {worst:e}");
    assert_eq!(0.0f32.fexp(), 1.0);
}

#[test]
fn fast_f32_logarithms_are_within_a_few_ulp() {
    use klspeech::ops::FastExp;
    // ln over positive normal floats from 1.2e-38 to 3e38 (geometric steps, every binade and
    // both sides of the sqrt(2) split), ln_1p over [1e-30, 1] (the range softplus feeds it),
    // both against f64. Relative error below 4 ulp of f32 (4.8e-7), and ln(1) = 0 exactly.
    let mut worst = 0.0f64;
    let mut x = 1.2e-38f64;
    while x < 3e38 {
        let got = (x as f32).fln() as f64;
        let want = ((x as f32) as f64).ln();
        let rel = if want == 0.0 { got.abs() } else { ((got - want) / want).abs() };
        worst = if rel.is_nan() { f64::INFINITY } else { worst.max(rel) }; // (max passes over NaN)
        x *= 1.000_37;
    }
    assert!(worst < 4.8e-7, "ln: worst relative error {worst:e}");
    assert_eq!(1.0f32.fln(), 0.0);
    let mut worst = 0.0f64;
    let mut u = 1e-30f64;
    while u <= 1.0 {
        let uf = u as f32;
        let got = uf.fln_1p() as f64;
        let want = (uf as f64).ln_1p();
        worst = worst.max(((got - want) / want).abs());
        u *= 1.000_37;
    }
    assert!(worst < 4.8e-7, "ln_1p: worst relative error {worst:e}");
}

#[test]
fn channel_affine_matches_the_composite() {
    for dtype in [DType::F32, DType::F64] {
        for (i, &(b, c, t)) in [(1usize, 3usize, 17usize), (3, 5, 131), (2, 7, 1)].iter().enumerate() {
            let x = rand(&[b, c, t], 80 + i as u64, dtype);
            let w = rand(&[c], 81, dtype);
            let bias = rand(&[c], 82, dtype);
            compare(
                "channel_affine",
                &[x, w, bias],
                |v| ops::channel_affine(&v[0], &v[1], &v[2]).unwrap(),
                |v| v[0].broadcast_mul(&v[1].reshape((1, c, 1)).unwrap()).unwrap().broadcast_add(&v[2].reshape((1, c, 1)).unwrap()).unwrap(),
            );
        }
    }
}

#[test]
fn inference_attention_matches_the_composite() {
    // The packed [q | k | v] projection. (batch, frames, hidden, heads, masked frames per
    // clip): batch 1 with fewer (clip, head)
    // tasks than threads (gemm parallel inside), many tasks (parallel over tasks), odd frame
    // counts, a key mask that hides the tail of some clips, one frame.
    let cases: [(usize, usize, usize, usize, &[usize]); 5] =
        [(1, 37, 12, 1, &[]), (1, 49, 24, 4, &[]), (3, 29, 20, 5, &[0, 7, 28]), (8, 13, 16, 4, &[3, 0, 0, 12, 1, 0, 5, 9]), (2, 1, 6, 2, &[])];
    for dtype in [DType::F32, DType::F64] {
        for (i, &(b, t, h, heads, masked)) in cases.iter().enumerate() {
            let q = rand(&[b, t, h], 130 + i as u64, dtype);
            let k = rand(&[b, t, h], 131 + i as u64, dtype);
            let v = rand(&[b, t, h], 132 + i as u64, dtype);
            let scale = 1.0 / ((h / heads) as f64).sqrt();
            let bias = (!masked.is_empty()).then(|| {
                let mut m = vec![0f32; b * t];
                for (bi, &n) in masked.iter().enumerate() {
                    m[bi * t + t - n..(bi + 1) * t].fill(f32::MIN);
                }
                Tensor::from_vec(m, (b, t), &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
            });
            let qkv = Tensor::cat(&[&q, &k, &v], 2).unwrap();
            let fused = ops::attention_infer(&qkv, heads, scale, bias.as_ref()).unwrap();
            let composite = ops::attention_composite(&qkv, heads, scale, bias.as_ref()).unwrap();
            // The composite itself against attention written out head by head.
            let hd = h / heads;
            for bi in 0..b {
                for hi in 0..heads {
                    let pick = |x: &Tensor| x.get(bi).unwrap().narrow(1, hi * hd, hd).unwrap().contiguous().unwrap();
                    let mut s = (pick(&q).matmul(&pick(&k).t().unwrap()).unwrap() * scale).unwrap();
                    if let Some(bias) = &bias {
                        s = s.broadcast_add(&bias.get(bi).unwrap().unsqueeze(0).unwrap()).unwrap();
                    }
                    let want = ops::softmax_last_composite(&s).unwrap().matmul(&pick(&v)).unwrap();
                    let r = rel(&composite.get(bi).unwrap().narrow(1, hi * hd, hd).unwrap(), &want);
                    assert!(r <= tol(dtype), "composite attention, clip {bi} head {hi}: rel. error {r:e}");
                }
            }
            let r = rel(&fused, &composite);
            assert!(r <= tol(dtype), "attention {:?} {dtype:?}: rel. error {r:e}", (b, t, h, heads));
            // The GPU's inference attention (keys padded to a multiple of 8 where T is not),
            // here on the CPU.
            let device = ops::device::attention_infer_device(&qkv, heads, scale, bias.as_ref()).unwrap();
            let r = rel(&device, &composite);
            assert!(r <= tol(dtype), "device attention {:?} {dtype:?} ({} padding keys): rel. error {r:e}", (b, t, h, heads), ops::device::key_padding(t));
        }
    }
}

/// The device the suite runs on: `KLSPEECH_TEST_DEVICE=cuda` selects the first GPU (in a `cuda`
/// build), the CPU otherwise (as tests/common).
fn test_device() -> Device {
    match std::env::var("KLSPEECH_TEST_DEVICE").as_deref() {
        Ok("cuda") => klspeech::device::new_cuda(0).expect("KLSPEECH_TEST_DEVICE=cuda but no CUDA device"),
        _ => Device::Cpu,
    }
}

/// `op` on the test device in f32 (on a GPU: klspeech's CUDA kernels, `ops::kernels`; on the
/// CPU: the same ops' CPU paths) against `reference` on the CPU in f64: values and the input's
/// gradient for the loss sum(out * w), max-norm relative error within `tol`.
fn on_device_against_f64(what: &str, x: &Tensor, tol: f64, op: impl Fn(&Tensor) -> Tensor, reference: impl Fn(&Tensor) -> Tensor) {
    let dev = test_device();
    let run = |x: &Tensor, f: &dyn Fn(&Tensor) -> Tensor| {
        let v = Var::from_tensor(x).unwrap();
        let out = f(v.as_tensor());
        let w = rand(out.dims(), 98, DType::F64).to_dtype(out.dtype()).unwrap().to_device(out.device()).unwrap();
        let g = (&out * &w).unwrap().sum_all().unwrap().backward().unwrap().get(v.as_tensor()).expect("a gradient").clone();
        (out.to_device(&Device::Cpu).unwrap(), g.to_device(&Device::Cpu).unwrap())
    };
    let (y, g) = run(&x.to_dtype(DType::F32).unwrap().to_device(&dev).unwrap(), &op);
    let (yr, gr) = run(&x.to_dtype(DType::F64).unwrap(), &reference);
    let (ev, eg) = (rel(&y, &yr), rel(&g, &gr));
    assert!(ev <= tol && eg <= tol, "{what} on {dev:?}: value rel. error {ev:e}, gradient {eg:e}");
}

/// Inference attention as a GPU runs it (`ops::device::attention_infer_device`: keys padded to
/// a multiple of 8, one kernel for the scale, the key bias and the softmax), through
/// `ops::attention_infer` and directly, on the test device in f32, bf16 and f16 against the
/// composite in f64 on the CPU: 4 s and 10 s of frames (199, 499: 1 and 5 padding keys) and a
/// multiple of 8, a key bias hiding the tail of one clip.
#[test]
fn inference_attention_on_the_test_device_matches_f64() {
    let dev = test_device();
    for &(b, t, heads, hd) in &[(2usize, 199usize, 4usize, 16usize), (2, 40, 2, 8), (1, 499, 2, 64)] {
        let qkv = (rand(&[b, t, 3 * heads * hd], 270 + t as u64, DType::F64) * 2.0).unwrap();
        let mut m = vec![0f64; b * t];
        m[(b - 1) * t + t / 2..].fill(-1e9);
        let kb = Tensor::from_vec(m, (b, t), &Device::Cpu).unwrap();
        let scale = 1.0 / (hd as f64).sqrt();
        for (dtype, tol) in [(DType::F32, 2e-5), (DType::BF16, 3e-2), (DType::F16, 6e-3)] {
            // (bf16 / f16: the scores are rounded to the type, about 2^-9 / 2^-12 of logits near 8.)
            // Inputs of the type, the reference in f64 on the same values.
            let x = qkv.to_dtype(dtype).unwrap();
            let want = ops::attention_composite(&x.to_dtype(DType::F64).unwrap(), heads, scale, Some(&kb)).unwrap();
            let (xd, kbd) = (x.to_device(&dev).unwrap(), kb.to_dtype(dtype).unwrap().to_device(&dev).unwrap());
            for (how, got) in [
                ("attention_infer", ops::attention_infer(&xd, heads, scale, Some(&kbd)).unwrap()),
                ("attention_infer_device", ops::device::attention_infer_device(&xd, heads, scale, Some(&kbd)).unwrap()),
            ] {
                assert_eq!(got.dtype(), dtype);
                let r = rel(&got.to_device(&Device::Cpu).unwrap().to_dtype(DType::F64).unwrap(), &want);
                println!("{how} {:?} in {dtype:?} on {dev:?}: rel. error {r:.1e}", (b, t, heads, hd));
                assert!(r <= tol, "{how} {:?} in {dtype:?} on {dev:?}: rel. error {r:e}", (b, t, heads, hd));
            }
        }
    }
}

/// The training path's ops as a GPU runs them (standardization, softmax, GELU, attention with
/// dropout: klspeech's CUDA kernels for f32 there) against f64 composites on the CPU. On the
/// CPU the same ops run their CPU paths, against the same references.
#[test]
fn device_ops_on_the_test_device_match_f64_composites() {
    let f64_standardize = |x: &Tensor| {
        let xc = x.broadcast_sub(&x.mean_keepdim(2).unwrap()).unwrap();
        let var = xc.sqr().unwrap().mean_keepdim(2).unwrap();
        xc.broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap()).unwrap()
    };
    // Rows shorter than a block, longer than a block, the first GroupNorm's 12 799 frames.
    for (i, s) in [&[1usize, 7, 13][..], &[3, 5, 131], &[2, 77, 768], &[2, 3, 12_799]].iter().enumerate() {
        for offset in [0.7, 1000.0] {
            let x = ((rand(s, 240 + i as u64, DType::F64) * 2.5).unwrap() + offset).unwrap();
            let tol = if offset > 1.0 { 1e-4 } else { 2e-5 };
            on_device_against_f64("standardize", &x, tol, |t| ops::device::standardize_last_device(t, 1e-5).unwrap(), f64_standardize);
        }
        let x = (rand(s, 250 + i as u64, DType::F64) * 4.0).unwrap();
        on_device_against_f64("softmax", &x, 2e-5, |t| ops::device::softmax_last_device(t).unwrap(), |t| ops::softmax_last_composite(t).unwrap());
        on_device_against_f64("gelu", &x, 2e-6, |t| ops::gelu_erf(t).unwrap(), |t| t.gelu_erf().unwrap());
    }
    // Attention: the packed projection's gradient, a key mask, keyed dropout (the same mask
    // on both devices), against the same op in f64 on the CPU.
    for &(b, t, heads, hd, drop) in &[(2usize, 13usize, 4usize, 5usize, Some((0.2, 77u64))), (3, 40, 2, 8, None), (1, 199, 12, 64, Some((0.1, 5)))] {
        let qkv = rand(&[b, t, 3 * heads * hd], 260 + t as u64, DType::F64);
        let mut m = vec![0f64; b * t];
        m[b * t - 1] = -1e9;
        let kb = Tensor::from_vec(m, (b, t), &Device::Cpu).unwrap();
        let scale = 1.0 / (hd as f64).sqrt();
        on_device_against_f64(
            &format!("attention {:?}", (b, t, heads, hd, drop)),
            &qkv,
            2e-5,
            |v| ops::device::attention_device(v, heads, scale, Some(&kb.to_dtype(v.dtype()).unwrap().to_device(v.device()).unwrap()), drop).unwrap(),
            |v| ops::device::attention_device(v, heads, scale, Some(&kb), drop).unwrap(),
        );
    }
}

/// A KL-Norm site as a GPU trains it (`ops::device::kl_norm_last_device`: klspeech's CUDA
/// kernels for f32 there), with the standard and a learned prior, on the test device in f32
/// against the site in f64 on the CPU (whose composite backward tests/klnorm.rs and the
/// gradient suites check; the fused CPU op there): y, the KL per row, and the gradients of x
/// and every parameter.
#[test]
fn kl_norm_site_on_the_test_device_matches_f64() {
    let dev = test_device();
    for (case, &(b, t, d, learned)) in [(2usize, 9usize, 37usize, false), (3, 50, 64, true), (1, 1, 768, true)].iter().enumerate() {
        let seed = 300 + 20 * case as u64;
        let x = ((rand(&[b, t, d], seed, DType::F64) * 2.0).unwrap() + 0.5).unwrap();
        let mut params = vec![
            rand(&[d], seed + 1, DType::F64).affine(0.2, 1.0).unwrap(),
            (rand(&[d], seed + 2, DType::F64) * 0.1).unwrap(),
            (rand(&[d], seed + 3, DType::F64) * 0.5).unwrap(),
            (rand(&[d], seed + 4, DType::F64) - 1.0).unwrap(),
        ];
        if learned {
            params.push((rand(&[d], seed + 5, DType::F64) * 0.3).unwrap());
            params.push(rand(&[d], seed + 6, DType::F64).affine(0.5, 0.5).unwrap());
        }
        let noise = rand(&[b, t, d], seed + 7, DType::F64);
        let wy = rand(&[b, t, d], seed + 8, DType::F64);
        let wk = rand(&[b, t], seed + 9, DType::F64);
        let run = |dtype: DType, dev: &Device| {
            let on = |t: &Tensor| t.to_dtype(dtype).unwrap().to_device(dev).unwrap();
            let vars: Vec<Var> = std::iter::once(&x).chain(params.iter()).map(|t| Var::from_tensor(&on(t)).unwrap()).collect();
            let v: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
            let prior = learned.then(|| (v[5], v[6]));
            let (y, kl) = if dev.is_cpu() && dtype == DType::F64 {
                // The reference: the fused CPU op in f64 (candle's LayerNorm kernel, which the
                // device op's CPU path uses, has no f64).
                ops::kl_norm_last(v[0], v[1], v[2], v[3], v[4], prior, &on(&noise), 1e-5).unwrap().expect("fused on the CPU")
            } else {
                ops::device::kl_norm_last_device(v[0], v[1], v[2], v[3], v[4], prior, &on(&noise), 1e-5).unwrap()
            };
            let loss = (y.mul(&on(&wy)).unwrap().sum_all().unwrap() + kl.mul(&on(&wk)).unwrap().sum_all().unwrap()).unwrap();
            let grads = loss.backward().unwrap();
            let cpu = |t: &Tensor| t.to_device(&Device::Cpu).unwrap().to_dtype(DType::F64).unwrap();
            let g: Vec<Tensor> = v.iter().map(|t| cpu(grads.get(t).expect("every input gets a gradient"))).collect();
            (cpu(&y), cpu(&kl), g)
        };
        let (y, kl, g) = run(DType::F32, &dev);
        let (yr, klr, gr) = run(DType::F64, &Device::Cpu);
        let what = format!("KL-Norm site {:?} on {dev:?}", (b, t, d, learned));
        assert!(rel(&y, &yr) <= 2e-5, "{what}: y {:e}", rel(&y, &yr));
        assert!(rel(&kl, &klr) <= 2e-5, "{what}: kl {:e}", rel(&kl, &klr));
        for (i, (a, r)) in g.iter().zip(&gr).enumerate() {
            assert!(rel(a, r) <= 1e-4, "{what}: gradient of input {i}: {:e}", rel(a, r));
        }
    }
}

/// A normalization with weight and bias, `op(x, w, b)` with x of `shape` (the weights over
/// its last axis), on the test device in f32 against the CPU's f64 op: y and the gradients of
/// x, w and b (which go through klspeech's per-block column sums on a GPU).
fn affine_norm_on_the_test_device(what: &str, shape: &[usize], offset: f64, seed: u64, op: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Tensor) {
    let dev = test_device();
    let d = *shape.last().unwrap();
    let x = (rand(shape, seed, DType::F64) * 1.5).unwrap().affine(1.0, offset).unwrap();
    let w = rand(&[d], seed + 1, DType::F64).affine(0.3, 1.0).unwrap();
    let b = rand(&[d], seed + 2, DType::F64).affine(0.2, 0.0).unwrap();
    let wy = rand(shape, seed + 3, DType::F64);
    let run = |dtype: DType, dev: &Device| {
        let on = |t: &Tensor| t.to_dtype(dtype).unwrap().to_device(dev).unwrap();
        let vars: Vec<Var> = [&x, &w, &b].iter().map(|t| Var::from_tensor(&on(t)).unwrap()).collect();
        let v: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
        let y = op(v[0], v[1], v[2]);
        let grads = y.mul(&on(&wy)).unwrap().sum_all().unwrap().backward().unwrap();
        let cpu = |t: &Tensor| t.to_device(&Device::Cpu).unwrap().to_dtype(DType::F64).unwrap();
        (cpu(&y), v.iter().map(|t| cpu(grads.get(t).expect("every input gets a gradient"))).collect::<Vec<_>>())
    };
    let (y, g) = run(DType::F32, &dev);
    let (yr, gr) = run(DType::F64, &Device::Cpu);
    let tol = if offset > 1.0 { 1e-4 } else { 2e-5 };
    assert!(rel(&y, &yr) <= tol, "{what} {shape:?} on {dev:?}: y {:e}", rel(&y, &yr));
    for (i, (a, r)) in g.iter().zip(&gr).enumerate() {
        assert!(rel(a, r) <= 1e-4, "{what} {shape:?} on {dev:?}: gradient of input {i}: {:e}", rel(a, r));
    }
}

/// LayerNorm with a gradient as a GPU trains it (`ops::layer_norm`: klspeech's CUDA kernels
/// for f32 there; its CPU path here).
#[test]
fn layer_norm_on_the_test_device_matches_f64() {
    for (case, &(rows, d, offset)) in [(600usize, 37usize, 0.5f64), (3, 768, 1000.0), (2, 1, 0.0)].iter().enumerate() {
        affine_norm_on_the_test_device("layer norm", &[1, rows, d], offset, 500 + 10 * case as u64, &|x, w, b| ops::layer_norm(x, w, b, 1e-5).unwrap());
    }
}

/// The first conv layer's per-channel GroupNorm on channels-last [B, T, C] (`ops::group_norm_cl`:
/// klspeech's CUDA kernels for f32 on a GPU; the fused CPU op here), with a gradient as in
/// training, and with the GELU fused as in inference (value only).
#[test]
fn channels_last_group_norm_on_the_test_device_matches_f64() {
    for (case, &(b, t, c, offset)) in [(2usize, 37usize, 40usize, 0.5f64), (3, 300, 64, 1000.0), (1, 1, 7, 0.0)].iter().enumerate() {
        let seed = 800 + 10 * case as u64;
        affine_norm_on_the_test_device("group norm", &[b, t, c], offset, seed, &|x, w, b| ops::group_norm_cl(x, w, b, 1e-5).unwrap());
        let dev = test_device();
        let x = (rand(&[b, t, c], seed, DType::F64) * 1.5).unwrap().affine(1.0, offset).unwrap();
        let (w, bias) = (rand(&[c], seed + 1, DType::F64).affine(0.3, 1.0).unwrap(), rand(&[c], seed + 2, DType::F64).affine(0.2, 0.0).unwrap());
        let on = |t: &Tensor| t.to_dtype(DType::F32).unwrap().to_device(&dev).unwrap();
        let y = ops::group_norm_cl_gelu(&on(&x), &on(&w), &on(&bias), 1e-5).unwrap().to_device(&Device::Cpu).unwrap().to_dtype(DType::F64).unwrap();
        let yr = ops::group_norm_cl_composite(&x, &w, &bias, 1e-5).unwrap().gelu_erf().unwrap();
        let tol = if offset > 1.0 { 1e-4 } else { 2e-5 };
        assert!(rel(&y, &yr) <= tol, "group norm + GELU [{b}, {t}, {c}] on {dev:?}: {:e}", rel(&y, &yr));
    }
}

/// Inference in bf16 and f16 through the first layer's GroupNorm + GELU
/// (`ops::group_norm_cl_gelu`: on a GPU klspeech's kernel, statistics in f64 whatever the
/// type) against the f64 op on the same (representable) values: within a few units of the
/// type's rounding. [2, 3000, 40] gives each (clip, channel) 3 000 frames to average. And
/// training through it (`ops::group_norm_cl` with a gradient: on a GPU klspeech's f32 kernels
/// between casts, on the CPU the f32 composite): y and the gradients of x, w and b, which come
/// back in the type, likewise.
#[test]
fn channels_last_group_norm_in_bf16_and_f16_on_the_test_device_matches_f64() {
    let dev = test_device();
    for (dtype, tol) in [(DType::BF16, 8e-3), (DType::F16, 1e-3)] {
        for (case, &(b, t, c, offset)) in [(2usize, 37usize, 40usize, 0.5f64), (2, 3000, 40, 20.0)].iter().enumerate() {
            let seed = 860 + 10 * case as u64;
            // Values of the type, in f64 for the reference.
            let of = |t: Tensor| t.to_dtype(dtype).unwrap().to_dtype(DType::F64).unwrap();
            let x = of((rand(&[b, t, c], seed, DType::F64) * 1.5).unwrap().affine(1.0, offset).unwrap());
            let w = of(rand(&[c], seed + 1, DType::F64).affine(0.3, 1.0).unwrap());
            let bias = of(rand(&[c], seed + 2, DType::F64).affine(0.2, 0.0).unwrap());
            let on = |t: &Tensor| t.to_dtype(dtype).unwrap().to_device(&dev).unwrap();
            let y = ops::group_norm_cl_gelu(&on(&x), &on(&w), &on(&bias), 1e-5).unwrap();
            assert_eq!(y.dtype(), dtype);
            let y = y.to_device(&Device::Cpu).unwrap().to_dtype(DType::F64).unwrap();
            let yr = ops::group_norm_cl_composite(&x, &w, &bias, 1e-5).unwrap().gelu_erf().unwrap();
            let e = rel(&y, &yr);
            println!("group norm + GELU [{b}, {t}, {c}] in {dtype:?} on {dev:?}: {e:e}");
            assert!(e <= tol, "group norm + GELU [{b}, {t}, {c}] in {dtype:?} on {dev:?}: {e:e}");
            let wy = of(rand(&[b, t, c], seed + 3, DType::F64));
            let train = |dtype: DType, dev: &Device| {
                let on = |t: &Tensor| t.to_dtype(dtype).unwrap().to_device(dev).unwrap();
                let vars: Vec<Var> = [&x, &w, &bias].iter().map(|t| Var::from_tensor(&on(t)).unwrap()).collect();
                let v: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
                let y = ops::group_norm_cl(v[0], v[1], v[2], 1e-5).unwrap();
                assert_eq!(y.dtype(), dtype);
                let grads = y.mul(&on(&wy)).unwrap().sum_all().unwrap().backward().unwrap();
                let g: Vec<&Tensor> = v.iter().map(|t| grads.get(t).expect("every input gets a gradient")).collect();
                assert!(g.iter().all(|g| g.dtype() == dtype));
                let cpu = |t: &Tensor| t.to_device(&Device::Cpu).unwrap().to_dtype(DType::F64).unwrap();
                (cpu(&y), g.into_iter().map(cpu).collect::<Vec<_>>())
            };
            let ((y, g), (yr, gr)) = (train(dtype, &dev), train(DType::F64, &Device::Cpu));
            let what = format!("group norm training [{b}, {t}, {c}] in {dtype:?} on {dev:?}");
            println!("{what}: y {:e}, gradients {:e} {:e} {:e}", rel(&y, &yr), rel(&g[0], &gr[0]), rel(&g[1], &gr[1]), rel(&g[2], &gr[2]));
            assert!(rel(&y, &yr) <= tol, "{what}: y {:e}", rel(&y, &yr));
            for (i, (a, r)) in g.iter().zip(&gr).enumerate() {
                assert!(rel(a, r) <= tol, "{what}: gradient of input {i}: {:e}", rel(a, r));
            }
        }
    }
}

/// Half-precision training through the ops a bf16 / f16 training step runs (on a GPU:
/// klspeech's kernels' half-type instances, `ops::kernels::apply_half`; on the CPU its
/// half-type paths, in f32 where they reduce): GELU, LayerNorm, the standardization, softmax,
/// the channels-last GroupNorm of the first conv layer, and on a
/// GPU also the device ops for attention (its softmax backward) and a KL-Norm site with a
/// learned prior (the CPU builds those two from the ops before them), on the test device
/// against the same op in f64 on the same (representable) values: the output and every
/// input's gradient for the loss sum(out * r), within `tol` of the largest value (a few units
/// of the type's rounding).
#[test]
fn half_precision_training_ops_on_the_test_device_match_f64() {
    let dev = test_device();
    let half_switched_off = std::env::var_os("KLSPEECH_NO_HALF_KERNELS").is_some_and(|v| !v.is_empty() && v != "0");
    type Op = Box<dyn Fn(&[&Tensor]) -> Vec<Tensor>>;
    let one = |f: fn(&Tensor) -> Tensor| -> Op { Box::new(move |v: &[&Tensor]| vec![f(v[0])]) };
    let heads = 2;
    let mut cases: Vec<(&str, Vec<Vec<usize>>, Op)> = vec![
        ("gelu", vec![vec![3, 50, 64]], one(|x| ops::gelu_erf(x).unwrap())),
        ("softmax", vec![vec![4, 37, 101]], one(|x| ops::softmax_last(x).unwrap())),
        ("standardization", vec![vec![3, 40, 768]], one(|x| ops::standardize_last(x, 1e-5).unwrap())),
        ("layer norm", vec![vec![3, 40, 768], vec![768], vec![768]], Box::new(|v: &[&Tensor]| vec![ops::layer_norm(v[0], v[1], v[2], 1e-5).unwrap()])),
        ("group norm", vec![vec![2, 300, 64], vec![64], vec![64]], Box::new(|v: &[&Tensor]| vec![ops::group_norm_cl(v[0], v[1], v[2], 1e-5).unwrap()])),
    ];
    let device_ops: Vec<(&str, Vec<Vec<usize>>, Op)> = vec![
        ("attention", vec![vec![2, 45, 3 * heads * 16]], Box::new(move |v: &[&Tensor]| vec![ops::device::attention_device(v[0], heads, 0.25, None, None).unwrap()])),
        (
            "KL-Norm site",
            vec![vec![2, 30, 64], vec![64], vec![64], vec![64], vec![64], vec![64], vec![64], vec![2, 30, 64]],
            Box::new(|v: &[&Tensor]| {
                let (y, kl) = ops::device::kl_norm_last_device(v[0], v[1], v[2], v[3], v[4], Some((v[5], v[6])), &v[7].detach(), 1e-5).unwrap();
                vec![y, kl]
            }),
        ),
    ];
    if dev.is_cuda() {
        cases.extend(device_ops);
    }
    for (dtype, tol) in [(DType::BF16, 8e-3), (DType::F16, 1e-3)] {
        for (case, (name, shapes, op)) in cases.iter().enumerate() {
            let seed = 1200 + 20 * case as u64;
            // Values of the type, in f64; KL-Norm's scales (inputs 1 and 4-6) kept positive-ish.
            let of = |t: Tensor| t.to_dtype(dtype).unwrap().to_dtype(DType::F64).unwrap();
            let inputs: Vec<Tensor> = shapes.iter().enumerate().map(|(i, s)| {
                let r = rand(s, seed + i as u64, DType::F64);
                of(if *name == "KL-Norm site" && matches!(i, 1 | 6) { r.affine(0.2, 1.0).unwrap() } else if matches!(*name, "layer norm" | "group norm") && i == 1 { r.affine(0.3, 1.0).unwrap() } else { (r * 1.5).unwrap() })
            }).collect();
            let run = |dtype: DType, dev: &Device| {
                let on = |t: &Tensor| t.to_dtype(dtype).unwrap().to_device(dev).unwrap();
                let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(&on(t)).unwrap()).collect();
                let v: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
                let outs = op(&v);
                let mut loss: Option<Tensor> = None;
                for (j, o) in outs.iter().enumerate() {
                    assert_eq!(o.dtype(), dtype, "{name}");
                    let r = on(&of(rand(o.dims(), seed + 10 + j as u64, DType::F64)));
                    let l = o.mul(&r).unwrap().sum_all().unwrap().to_dtype(DType::F32).unwrap();
                    loss = Some(match loss {
                        Some(a) => (a + l).unwrap(),
                        None => l,
                    });
                }
                let grads = loss.unwrap().backward().unwrap();
                let cpu = |t: &Tensor| t.to_device(&Device::Cpu).unwrap().to_dtype(DType::F64).unwrap();
                // The noise (the site's last input) is not trained.
                let trained = if *name == "KL-Norm site" { &v[..7] } else { &v[..] };
                let g: Vec<Tensor> = trained.iter().map(|t| cpu(grads.get(t).expect("every trained input gets a gradient"))).collect();
                (outs.iter().map(cpu).collect::<Vec<_>>(), g)
            };
            if dev.is_cuda() && !half_switched_off {
                assert!(ops::kernels::apply_half(&inputs[0].to_dtype(dtype).unwrap().to_device(&dev).unwrap()), "{name}: the half-type kernels apply");
            }
            let ((y, g), (yr, gr)) = (run(dtype, &dev), run(DType::F64, &Device::Cpu));
            let what = format!("{name} training in {dtype:?} on {dev:?}");
            let errs: Vec<String> = y.iter().zip(&yr).chain(g.iter().zip(&gr)).map(|(a, r)| format!("{:.1e}", rel(a, r))).collect();
            println!("{what}: outputs then gradients {}", errs.join(" "));
            for (i, (a, r)) in y.iter().zip(&yr).chain(g.iter().zip(&gr)).enumerate() {
                assert!(rel(a, r) <= tol, "{what}: item {i} (outputs then gradients) {:e}; all: {}", rel(a, r), errs.join(" "));
            }
        }
    }
}

/// bf16 and f16 through the ops with a reduction, at wav2vec2-base's sizes: the positional
/// conv's weight norm (36 864 values per tap), the attention's softmax over 499 keys (10 s),
/// a standardization over 768 channels, on the test device against f64 on the same values,
/// within about a unit of the type's rounding of the largest value. candle's CPU reductions sum
/// in the storage type: before klspeech computed these in f32 there, the weight norm was 225 %
/// (bf16) and 51 % (f16) off, the standardization 44 % and 1.1 %, the softmax 3 % and 0.6 %.
#[test]
fn half_precision_reductions_at_base_sizes_match_f64() {
    let dev = test_device();
    for (dtype, tol) in [(DType::BF16, 8e-3), (DType::F16, 1e-3)] {
        // Values of the type, in f64 for the reference.
        let of = |t: Tensor| t.to_dtype(dtype).unwrap().to_dtype(DType::F64).unwrap();
        let on = |t: &Tensor| t.to_dtype(dtype).unwrap().to_device(&dev).unwrap();
        let check = |what: &str, got: Tensor, want: Tensor| {
            assert_eq!(got.dtype(), dtype, "{what}");
            let e = rel(&got.to_device(&Device::Cpu).unwrap().to_dtype(DType::F64).unwrap(), &want);
            println!("{what} in {dtype:?} on {dev:?}: {e:e}");
            assert!(e <= tol, "{what} in {dtype:?} on {dev:?}: {e:e}");
        };
        let v = of((rand(&[768, 48, 8], 870, DType::F64) * 0.02).unwrap());
        let g = of(rand(&[8], 871, DType::F64).abs().unwrap());
        check("weight norm", ops::weight_norm_last(&on(&v), &on(&g)).unwrap(), ops::weight_norm_last(&v, &g).unwrap());
        let s = of((rand(&[12, 499], 872, DType::F64) * 3.0).unwrap());
        let want = ops::softmax_last(&s).unwrap();
        check("softmax", ops::softmax_last(&on(&s)).unwrap(), want.clone());
        check("softmax (inference)", ops::softmax_last_dim_infer(&on(&s)).unwrap(), want);
        let x = of(rand(&[4, 100, 768], 873, DType::F64).affine(1.0, 3.0).unwrap());
        check("standardization", ops::standardize_last(&on(&x), 1e-5).unwrap(), ops::standardize_last(&x, 1e-5).unwrap());
    }
}

/// KL-Norm's noise on the test device (`ForwardCtx::normal_like`: on a GPU, drawn there by
/// klspeech's kernel, for bf16 / f16 rounded there) is the host's keyed stream to the bit (in
/// f32, or the host's f32 draw rounded once to the type), at the same position of the run's
/// random stream, so a seeded run draws the same noise on either device.
#[test]
fn noise_on_the_test_device_is_the_hosts_to_the_bit() {
    let dev = test_device();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let x = Tensor::zeros((3, 7, 33), dtype, &dev).unwrap();
        let mut ctx = klspeech::model::ForwardCtx::train_no_dropout(Rng::new(42));
        let a = ctx.normal_like(&x).unwrap();
        let b = ctx.normal_like(&x).unwrap();
        let mut host = Rng::new(42);
        for t in [a, b] {
            assert_eq!((t.dims(), t.dtype()), (x.dims(), dtype));
            let got: Vec<f32> = t.flatten_all().unwrap().to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap().to_vec1().unwrap();
            // The host's f32 draw rounded once to the type.
            let want: Vec<f32> = Tensor::new(host.normal_vec(x.elem_count()), &Device::Cpu).unwrap().to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap().to_vec1().unwrap();
            assert!(got.iter().zip(&want).all(|(g, w)| g.to_bits() == w.to_bits()), "{dtype:?} noise on {dev:?} differs from the host's");
        }
    }
}

/// Dropout masks on the test device (on a GPU: built there by klspeech's kernel) are the
/// host's, bit for bit.
#[test]
fn dropout_masks_on_the_test_device_are_the_hosts_to_the_bit() {
    let dev = test_device();
    for (p, key) in [(0.1, 5u64), (0.5, 77)] {
        let x = Tensor::zeros((2, 3, 41, 41), DType::F32, &dev).unwrap();
        let got: Vec<f32> = ops::dropout_mask(&x, p, key).unwrap().flatten_all().unwrap().to_device(&Device::Cpu).unwrap().to_vec1().unwrap();
        let host: Vec<f32> = ops::dropout_mask(&x.to_device(&Device::Cpu).unwrap(), p, key).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert!(got.iter().zip(&host).all(|(g, h)| g.to_bits() == h.to_bits()), "dropout mask on {dev:?} differs from the host's");
    }
}

/// The fused AdamW update on the test device (on a GPU: klspeech's two in-place kernels) gives
/// the CPU's bits over three steps, parameters and moments. With klspeech's CUDA kernels
/// switched off (`KLSPEECH_NO_CUDA_KERNELS=1`) a GPU has no fused update: `adamw_in_place`
/// must then say so (the optimizer falls back to its composite) and leave the tensors alone.
#[test]
fn adamw_on_the_test_device_is_the_cpus_to_the_bit() {
    let dev = test_device();
    if !dev.is_cpu() && !ops::kernels::enabled() {
        let theta = rand(&[64], 700, DType::F32).to_device(&dev).unwrap();
        let before: Vec<f32> = theta.to_device(&Device::Cpu).unwrap().to_vec1().unwrap();
        let g = rand(&[64], 701, DType::F32).to_device(&dev).unwrap();
        let mv = Tensor::zeros((2, 64), DType::F32, &dev).unwrap();
        let p = ops::AdamWScalars { beta1: 0.9, beta2: 0.999, eps: 1e-8, decay: None, bias_correction2_sqrt: 1.0, step_size: 1e-3, grad_scale: None };
        assert!(!ops::adamw_in_place(&theta, &g, &mv, p).unwrap(), "no fused update on {dev:?} without klspeech's kernels");
        let after: Vec<f32> = theta.to_device(&Device::Cpu).unwrap().to_vec1().unwrap();
        assert_eq!(before, after, "a refused update must not touch the parameter");
        return;
    }
    let n = 4_099;
    let theta0 = rand(&[n], 700, DType::F32);
    let run = |dev: &Device| {
        // A copy: the update is in place (to_device on the same device would share storage).
        let theta = theta0.copy().unwrap().to_device(dev).unwrap();
        let mv = Tensor::zeros((2, n), DType::F32, dev).unwrap();
        for t in 1..=3 {
            let g = (rand(&[n], 710 + t as u64, DType::F32) * 0.1).unwrap().to_device(dev).unwrap();
            let p = common::adamw_scalars(t, Some(1.0 - 1e-3 * 0.01));
            assert!(ops::adamw_in_place(&theta, &g, &mv, p).unwrap(), "the fused update applies on {dev:?}");
        }
        let v = |t: &Tensor| t.flatten_all().unwrap().to_device(&Device::Cpu).unwrap().to_vec1::<f32>().unwrap();
        (v(&theta), v(&mv))
    };
    let (th, mv) = run(&dev);
    let (th_cpu, mv_cpu) = run(&Device::Cpu);
    let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
    assert!(same(&th, &th_cpu) && same(&mv, &mv_cpu), "AdamW on {dev:?} differs from the CPU's");
}

/// AdamW on bf16 / f16 parameters and moments (pure half-precision training) on the test
/// device: on a GPU klspeech's half-type kernels, on the CPU rehearsing the GPU's path
/// (`ops::with_gpu_path`) the same arithmetic; step after step, to the bit, f32 arithmetic on
/// the stored values rounded once, the update reading the stored moments
/// (`common::adamw_half_reference`). Outside the rehearsal the CPU's fused update does not take
/// half types (the optimizer's composite runs) and must leave the parameter alone.
#[test]
fn half_precision_adamw_on_the_test_device_is_the_f32_arithmetic_rounded() {
    let dev = test_device();
    let n = 4_099;
    let scalars = |t: i32| common::adamw_scalars(t, Some(1.0 - 1e-3 * 0.01));
    let switched_off = std::env::var_os("KLSPEECH_NO_HALF_KERNELS").is_some_and(|v| !v.is_empty() && v != "0");
    for dtype in [DType::BF16, DType::F16] {
        let round = common::round_to(dtype);
        let host = |t: &Tensor| t.flatten_all().unwrap().to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
        let theta0 = rand(&[n], 720, DType::F32).to_dtype(dtype).unwrap();
        let grad = |t: i32| (rand(&[n], 730 + t as u64, DType::F32) * 0.1).unwrap().to_dtype(dtype).unwrap();
        if dev.is_cpu() {
            let theta = theta0.copy().unwrap();
            let mv = Tensor::zeros((2, n), dtype, &dev).unwrap();
            assert!(!ops::adamw_in_place(&theta, &grad(1), &mv, scalars(1)).unwrap(), "no fused {dtype:?} update on the CPU's own path");
            assert_eq!(host(&theta), host(&theta0), "a refused update must not touch the parameter");
        }
        let theta = theta0.copy().unwrap().to_device(&dev).unwrap();
        let mv = Tensor::zeros((2, n), dtype, &dev).unwrap();
        let (mut theta_r, mut mv_r) = (host(&theta0), vec![0f32; 2 * n]);
        for t in 1..=3 {
            let applied = ops::with_gpu_path(|| ops::adamw_in_place(&theta, &grad(t).to_device(&dev).unwrap(), &mv, scalars(t))).unwrap();
            assert_eq!(applied, !switched_off, "{dtype:?} on {dev:?}: the half-type update applies unless switched off");
            if !applied {
                break;
            }
            common::adamw_half_reference(&mut theta_r, &mut mv_r, &host(&grad(t)), &scalars(t), &round);
            assert_eq!(theta.dtype(), dtype);
            let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same(&host(&theta), &theta_r) && same(&host(&mv), &mv_r), "{dtype:?} AdamW step {t} on {dev:?} differs from the reference");
        }
        assert!(switched_off || host(&theta) != host(&theta0), "the update moved the parameter");
    }
}

/// Convolutions on the test device against the f64 composite on the CPU, channels-last
/// throughout: the kinds the model has (the positional conv's grouped "same" convolution with
/// its dropped frame, the first feature-encoder layer, K = 3 and K = 2 with stride 2). Without
/// gradient (`ops::conv1d_cl`) in f32, bf16 and f16; with gradients (`ops::conv1d_cl_recompute`,
/// the training op) in f32. On a GPU in a `cudnn` build these run cuDNN on channels-last data
/// (`ops::cudnn`), and the test insists that cuDNN took every call (a refused pass falls back,
/// which the values alone would not show); on the CPU the CPU paths.
#[test]
fn channels_last_convolutions_on_the_test_device_match_f64() {
    let dev = test_device();
    let nhwc_switched_off = std::env::var_os("KLSPEECH_NO_CUDNN_NHWC").is_some_and(|v| !v.is_empty() && v != "0");
    let cases = [
        // (b, l, c_in, c_out, k, stride, padding, groups, max_t)
        (2usize, 50usize, 32usize, 32usize, 16usize, 1usize, 8usize, 4usize, Some(50usize)),
        (2, 400, 1, 16, 10, 5, 0, 1, None),
        (3, 101, 24, 20, 3, 2, 0, 1, None),
        (2, 64, 16, 16, 2, 2, 0, 1, None),
        // the positional conv's shape, smaller: two chunks of shared columns by default
        (2, 45, 32, 32, 32, 1, 16, 4, Some(45)),
    ];
    // cuDNN's heuristic choice of algorithm, then each geometry's fastest by timing
    // (`ops::cudnn::set_benchmark`, PyTorch's cudnn.benchmark; no effect off cuDNN), then the
    // gathered-column gemms (`ops::conv_gemm`, `KLSPEECH_CONV_GEMM=all`) on any device, stride-1
    // ones on shared columns of the default taps a row, of 5 (chunks and a last one padded with
    // zero taps) and on per-chunk columns (`KLSPEECH_CONV_SHIFT=off`: then every gemm run is).
    use ops::conv_gemm::{with_mode, with_shift_taps, Mode, SHIFT_TAPS};
    let shift_on = ops::conv_gemm::shift_taps() > 0;
    for (timed, gemm, taps) in [(false, false, 0), (true, false, 0), (false, true, SHIFT_TAPS), (false, true, 5), (false, true, 0)] {
        ops::cudnn::set_benchmark(timed);
        let taps = if shift_on { taps } else { 0 };
        with_mode(if gemm { Mode::All } else { Mode::Off }, || with_shift_taps(taps, || for (case, &(b, l, ci, co, k, s, p, g, max_t)) in cases.iter().enumerate() {
            let what = format!(
                "conv [{b}, {l}, {ci}] -> {co}, K {k}, stride {s}, padding {p}, {g} groups, max_t {max_t:?} on {dev:?}{}",
                if timed { ", timed algorithms".to_string() } else if gemm { format!(", column gemms, shared columns of {taps} taps") } else { String::new() }
            );
            let gemm_calls = ops::conv_gemm::calls();
            let seed = 900 + 10 * case as u64;
            let x = rand(&[b, l, ci], seed, DType::F64);
            let w = rand(&[co, ci / g, k], seed + 1, DType::F64).affine(1.0 / ((ci / g * k) as f64).sqrt(), 0.0).unwrap();
            let reference = |x: &Tensor, w: &Tensor| {
                let y = ops::conv1d_cl_composite(x, w, s, p, g).unwrap();
                let t = max_t.map_or(y.dim(1).unwrap(), |m| m.min(y.dim(1).unwrap()));
                y.narrow(1, 0, t).unwrap()
            };
            for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 8e-3), (DType::F16, 1e-3)] {
                // Values of the type, in f64 for the reference.
                let of = |t: &Tensor| t.to_dtype(dtype).unwrap().to_dtype(DType::F64).unwrap();
                let on = |t: &Tensor| t.to_dtype(dtype).unwrap().to_device(&dev).unwrap();
                let (xd, wd) = (on(&x), on(&w));
                let cudnn = ops::cudnn::applies(&xd);
                assert_eq!(cudnn, dev.is_cuda() && cfg!(feature = "cudnn") && ops::enabled() && !nhwc_switched_off, "{what}: where cuDNN applies");
                let y = ops::conv1d_cl(&xd, &wd, s, p, g, max_t).unwrap();
                assert_eq!(y.dtype(), dtype);
                let y = y.to_device(&Device::Cpu).unwrap().to_dtype(DType::F64).unwrap();
                let e = rel(&y, &reference(&of(&x), &of(&w)));
                println!("{what} in {dtype:?}: {e:e}");
                assert!(e <= tol, "{what} in {dtype:?}: {e:e}");
            }
            // The training op in f32: values and both gradients for the loss sum(y * r).
            let run = |x: &Tensor, w: &Tensor, f: &dyn Fn(&Tensor, &Tensor) -> Tensor| {
                let (xv, wv) = (Var::from_tensor(x).unwrap(), Var::from_tensor(w).unwrap());
                let y = f(xv.as_tensor(), wv.as_tensor());
                let r = rand(y.dims(), seed + 2, DType::F64).to_dtype(y.dtype()).unwrap().to_device(y.device()).unwrap();
                let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let cpu = |t: &Tensor| t.to_device(&Device::Cpu).unwrap().to_dtype(DType::F64).unwrap();
                (cpu(&y), cpu(grads.get(xv.as_tensor()).unwrap()), cpu(grads.get(wv.as_tensor()).unwrap()))
            };
            let on = |t: &Tensor| t.to_dtype(DType::F32).unwrap().to_device(&dev).unwrap();
            let got = run(&on(&x), &on(&w), &|x, w| ops::conv1d_cl_recompute(x, w, s, p, g, max_t).unwrap());
            let want = run(&x, &w, &|x, w| reference(x, w));
            for (name, a, r) in [("value", &got.0, &want.0), ("input gradient", &got.1, &want.1), ("weight gradient", &got.2, &want.2)] {
                let e = rel(a, r);
                assert!(e <= 1e-5, "{what}, training op: {name} rel. error {e:e}");
            }
            if gemm || ops::cudnn::applies(&on(&x).to_dtype(DType::BF16).unwrap()) {
                // bf16 training where cuDNN applies (its forward on cuDNN, its backward on
                // klspeech's fallback: cuDNN's bf16 input gradient is 60x slower, see
                // ops::cudnn::conv1d_cl_backward) or on the column gemms: gradients within
                // bf16's rounding of the f64 ones on the same (bf16) values.
                let of = |t: &Tensor| t.to_dtype(DType::BF16).unwrap().to_dtype(DType::F64).unwrap();
                let got = run(&on(&x).to_dtype(DType::BF16).unwrap(), &on(&w).to_dtype(DType::BF16).unwrap(), &|x, w| ops::conv1d_cl_recompute(x, w, s, p, g, max_t).unwrap());
                let want = run(&of(&x), &of(&w), &|x, w| reference(x, w));
                for (name, a, r) in [("value", &got.0, &want.0), ("input gradient", &got.1, &want.1), ("weight gradient", &got.2, &want.2)] {
                    let e = rel(a, r);
                    println!("{what}, training op in BF16: {name} {e:e}");
                    assert!(e <= 2e-2, "{what}, training op in BF16: {name} rel. error {e:e}");
                }
            }
            // The gemm runs took that path: the half-type forwards (and on a GPU the f32 one),
            // the training op's forward and both gradients.
            let ran = ops::conv_gemm::calls().since(&gemm_calls);
            if gemm {
                assert!(ran.forward >= 2 + 2 && ran.weight_grad >= 2 && ran.input_grad >= 2, "{what}: {ran:?}");
                // Stride 1: every forward, input and weight gradient on shared columns if on.
                let shifted = if s == 1 && taps > 0 { ran.forward + ran.input_grad + ran.weight_grad } else { 0 };
                assert_eq!(ran.shifted, shifted, "{what}: {ran:?}");
            } else {
                assert_eq!(ran, ops::conv_gemm::Calls::default(), "{what}");
            }
        }));
    }
    ops::cudnn::set_benchmark(false);
    // Where cuDNN applies it took every call (a refused pass falls back, right but slower).
    assert!(ops::cudnn::refused().is_empty(), "cuDNN refused: {:?} (see the warnings above)", ops::cudnn::refused());
}
