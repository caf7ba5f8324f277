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
        for (var, other_is_x) in [(&x, false), (&w, true)] {
            let g: Vec<f64> = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let v: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            for i in 0..v.len() {
                let at = |d: f64| {
                    let mut p = v.clone();
                    p[i] += d;
                    let t = Tensor::from_vec(p, var.shape(), &dev).unwrap();
                    if other_is_x { f(x.as_tensor(), &t) } else { f(&t, w.as_tensor()) }
                };
                let fd = (at(1e-6) - at(-1e-6)) / 2e-6;
                assert!((fd - g[i]).abs() < 1e-6, "stride {stride} pad {pad} groups {groups}: grad[{i}] {} vs {fd}", g[i]);
            }
        }
    }
}
