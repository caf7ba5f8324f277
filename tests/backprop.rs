//! The vendored candle-core's backward pass (vendor/README.md): the first gradient reaching a
//! tensor is stored as is (no zero tensor and add), a tensor's gradient is the same value as
//! before, and every stored gradient is contiguous.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use candle_core::{Device, Tensor, Var};

/// Counts this thread's allocations of 1 KiB or more: each tensor op on a CPU tensor of 256
/// f32 or more allocates its output once (small ops run on the calling thread).
struct Counting;

thread_local! {
    static BUFFERS: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if l.size() >= 1024 {
            let _ = BUFFERS.try_with(|b| b.set(b.get() + 1));
        }
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if l.size() >= 1024 {
            let _ = BUFFERS.try_with(|b| b.set(b.get() + 1));
        }
        unsafe { System.alloc_zeroed(l) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn buffers() -> usize {
    BUFFERS.with(|b| b.get())
}

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_dtype(candle_core::DType::F64).unwrap().to_vec1().unwrap()
}

#[test]
fn a_chain_of_n_ops_allocates_one_buffer_per_op_in_the_backward() {
    let n = 1024;
    let x = Var::from_vec((0..n).map(|i| (i as f32 / n as f32) - 0.5).collect::<Vec<f32>>(), n, &Device::Cpu).unwrap();
    // Twelve steps y = exp(-y): each op's backward is one tensor op (grad * exp, -grad).
    let mut y = x.as_tensor().clone();
    for _ in 0..12 {
        y = y.affine(-1.0, 0.0).unwrap().exp().unwrap();
    }
    let loss = y.sum_all().unwrap();
    let before = buffers();
    let grads = loss.backward().unwrap();
    let used = buffers() - before;
    // Per step: exp's product and affine's scaling (2 ops); the sum's broadcast gradient made
    // contiguous once, the ones of the start. candle 0.11.1 unpatched adds a zero tensor and an
    // add per edge: 4 more per step (about 74 here).
    assert!(used <= 2 * 12 + 4, "the backward allocated {used} buffers of 1 KiB or more for 24 ops: is the [patch] of vendor/candle-core in effect?");
    // d/dx of the chain against the same chain's derivative by the product rule, in f64.
    let mut want = Vec::new();
    for xv in values(x.as_tensor()) {
        let (mut v, mut d) = (xv, 1.0f64);
        for _ in 0..12 {
            let e = (-v).exp();
            d *= -e;
            v = e;
        }
        want.push(d);
    }
    let got = values(grads.get(x.as_tensor()).unwrap());
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "gradient {g} against {w}");
    }
}

#[test]
fn gradients_that_meet_are_summed_and_subtractions_negate() {
    let dev = Device::Cpu;
    let x = Var::from_vec(vec![1.0f64, -2.0, 3.0, 0.5], (2, 2), &dev).unwrap();
    let w = Var::from_vec(vec![0.25f64, 4.0], 2, &dev).unwrap();
    // loss = sum(x + x) - sum(x * w) - sum(-x^T) : dx = 2 - w + 1 (x^T's gradient transposed
    // back), dw = -(column sums of x).
    let xt = x.as_tensor();
    let a = (xt + xt).unwrap().sum_all().unwrap();
    let b = xt.broadcast_mul(w.as_tensor()).unwrap().sum_all().unwrap();
    let c = xt.t().unwrap().neg().unwrap().sum_all().unwrap();
    let loss = ((a - b).unwrap() - c).unwrap();
    let grads = loss.backward().unwrap();
    let dx = grads.get(xt).unwrap();
    assert_eq!(values(dx), vec![2.0 - 0.25 + 1.0, 2.0 - 4.0 + 1.0, 2.0 - 0.25 + 1.0, 2.0 - 4.0 + 1.0]);
    assert_eq!(values(grads.get(w.as_tensor()).unwrap()), vec![-(1.0 + 3.0), -(-2.0 + 0.5)]);
    // A gradient that reached its tensor as a view (a transpose, a broadcast) is stored
    // contiguous, as the sums were before the patch.
    let only_t = xt.t().unwrap().sum_all().unwrap().backward().unwrap();
    let g = only_t.get(xt).unwrap();
    assert!(g.is_contiguous() && dx.is_contiguous());
    assert_eq!(values(g), vec![1.0; 4]);
}

/// Under cargo (`.cargo/config.toml`) every CPU matmul refuses what the CUDA backend's
/// `gemm_config` refuses (vendor/README.md): rows with a leading dimension other than k
/// (lhs) or n (rhs). A head's slice of a [T, 24] projection, [T, 6] with stride 24, is such a
/// view (the CPU's gemm would take it); made contiguous, or as a whole transposed view, it
/// passes.
#[test]
fn cpu_matmuls_refuse_what_cuda_refuses() {
    assert_eq!(
        std::env::var("KLSPEECH_CUDA_MATMUL_CHECK").as_deref(),
        Ok("1"),
        "cargo sets KLSPEECH_CUDA_MATMUL_CHECK=1 (.cargo/config.toml); run the tests through cargo"
    );
    let x = Tensor::arange(0f32, 49.0 * 24.0, &Device::Cpu).unwrap().reshape((49, 24)).unwrap();
    let head = x.narrow(1, 6, 6).unwrap();
    let err = head.matmul(&head.t().unwrap()).unwrap_err().to_string();
    assert!(err.contains("a layout the CUDA backend refuses (KLSPEECH_CUDA_MATMUL_CHECK)"), "{err}");
    let head = head.contiguous().unwrap();
    let s = head.matmul(&head.t().unwrap()).unwrap();
    // Row 0 of the contiguous slice is 6..12: its square sum.
    let want: f32 = (6..12).map(|v| (v * v) as f32).sum();
    assert_eq!(s.get(0).unwrap().get(0).unwrap().to_scalar::<f32>().unwrap(), want);
    // A whole matrix transposed is a layout cuBLAS reads (CUBLAS_OP_T).
    assert_eq!(x.t().unwrap().matmul(&x).unwrap().dims(), &[24, 24]);
}

/// A tensor split by narrows (a packed output read as two parts, as a KL-Norm site's [y; kl]):
/// the vendored backward writes each part's gradient into one zero-filled gradient of the
/// whole in place, one fill and one copy a part, where candle made a padded copy of the whole
/// per narrow and added them. Values: each part's gradient where it is, zeros elsewhere, sums
/// where narrows overlap or another consumer also reads the tensor, on any axis, from strided
/// gradients too.
#[test]
fn narrowed_gradients_are_written_in_place() {
    let dev = Device::Cpu;
    let n = 4096;
    let x = Var::from_vec((0..n).map(|i| i as f32 / n as f32).collect::<Vec<f32>>(), n, &dev).unwrap();
    let xt = x.as_tensor();
    // A packed [y (4000); kl (96)] read as two parts, each scaled: y by 3, kl by -2.
    let packed = xt.exp().unwrap();
    let y = packed.narrow(0, 0, 4000).unwrap();
    let kl = packed.narrow(0, 4000, 96).unwrap();
    let loss = ((y * 3.0).unwrap().sum_all().unwrap() + (kl * -2.0).unwrap().sum_all().unwrap()).unwrap();
    let before = buffers();
    let grads = loss.backward().unwrap();
    let used = buffers() - before;
    // Buffers of 1 KiB or more: the y part's broadcast gradient made contiguous and scaled (2),
    // the whole gradient's fill (the parts are copied into it), exp's product: 4. (The kl part,
    // 384 bytes, is under the count.) candle's narrows: 7, a padded copy per narrow and an add.
    assert!(used <= 4, "the backward allocated {used} buffers of 1 KiB or more: is the narrow part of the [patch] in effect?");
    let want: Vec<f64> = values(xt).iter().enumerate().map(|(i, v)| v.exp() * if i < 4000 { 3.0 } else { -2.0 }).collect();
    for (g, w) in values(grads.get(xt).unwrap()).iter().zip(&want) {
        assert!((g - w).abs() <= 1e-6 * w.abs().max(1.0), "gradient {g} against {w}");
    }

    // Overlapping narrows, a part left out, another consumer of the same tensor, the second
    // axis, a transposed (strided) gradient, a leaf read through narrows only.
    let a = Var::from_vec((0..24).map(|i| i as f64).collect::<Vec<f64>>(), (4, 6), &dev).unwrap();
    let at = a.as_tensor();
    let p = (at * 1.0).unwrap(); // an intermediate, so that its gradient is the backward's own
    let l1 = p.narrow(1, 0, 3).unwrap().sum_all().unwrap(); // columns 0..3: 1
    let l2 = (p.narrow(1, 2, 2).unwrap() * 10.0).unwrap().sum_all().unwrap(); // columns 2..4: +10
    let l3 = p.narrow(0, 1, 2).unwrap().t().unwrap().affine(100.0, 0.0).unwrap().sum_all().unwrap(); // rows 1..3: +100
    let l4 = (&p * 1000.0).unwrap().sum_all().unwrap(); // everywhere, another consumer of p: +1000
    let g = (((l1 + l2).unwrap() + l3).unwrap() + l4).unwrap().backward().unwrap();
    let want: Vec<f64> = (0..24)
        .map(|i| {
            let (r, c) = (i / 6, i % 6);
            1000.0 + if c < 3 { 1.0 } else { 0.0 } + if (2..4).contains(&c) { 10.0 } else { 0.0 } + if (1..3).contains(&r) { 100.0 } else { 0.0 }
        })
        .collect();
    assert_eq!(values(g.get(at).unwrap()), want);
    let leaf = a.as_tensor().narrow(0, 3, 1).unwrap().sum_all().unwrap().backward().unwrap();
    assert_eq!(values(leaf.get(at).unwrap()), (0..24).map(|i| if i >= 18 { 1.0 } else { 0.0 }).collect::<Vec<_>>());
}
