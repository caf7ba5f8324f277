//! klspeech's CUDA kernels (src/ops/cuda/kernels.cu) run on the CPU through tests/cuda_emu (one
//! host thread per CUDA thread, block barriers, blocks in turn), with the launch plans of
//! `klspeech::ops::kernels` that the GPU launcher uses, against f64 references: candle's
//! composites on the CPU and their autograd gradients. Needs g++ (C++20), as the machine's
//! Rust toolchain does for crates that build C. On a GPU, tests/ops.rs checks the same kernels
//! through the device ops (KLSPEECH_TEST_DEVICE=cuda).

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor, Var, D};
use klspeech::ops::kernels::{self, Arg, Launch};
use klspeech::rng::Rng;

mod common;

/// The emulator, built once per test run.
fn emulator() -> &'static PathBuf {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let exe = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("klspeech_cuda_emu");
        // -fno-strict-aliasing: the half-type backwards store their f32 column sums inside
        // their 16-bit output buffer (`kl_tail`), as the GPU kernels do.
        let out = Command::new("g++")
            .args(["-std=c++20", "-O2", "-pthread", "-Wall", "-Wextra", "-Werror", "-fno-strict-aliasing"])
            .arg(root.join("tests/cuda_emu/main.cpp"))
            .arg("-o")
            .arg(&exe)
            .output()
            .unwrap_or_else(|e| panic!("running g++ to build tests/cuda_emu/main.cpp: {e} (install g++ 10 or newer)"));
        assert!(out.status.success(), "g++ tests/cuda_emu/main.cpp:\n{}", String::from_utf8_lossy(&out.stderr));
        exe
    })
}

/// A buffer of a launch: f32, or the 16-bit bits of bf16 / f16 values.
#[derive(Debug, Clone, PartialEq)]
enum Buf {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
    F16(Vec<u16>),
}

/// f32 values as a bf16 / f16 buffer (each rounded to nearest even: exact for values of the
/// type).
fn half_buf(dtype: DType, v: &[f32]) -> Buf {
    match dtype {
        DType::BF16 => Buf::Bf16(v.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect()),
        DType::F16 => Buf::F16(v.iter().map(|&x| half::f16::from_f32(x).to_bits()).collect()),
        other => panic!("half_buf: {other:?} is not a 16-bit type"),
    }
}

/// An output buffer of `n` bf16 / f16 values not yet written (all bits set: NaN).
fn half_empty(dtype: DType, n: usize) -> Buf {
    match dtype {
        DType::BF16 => Buf::Bf16(vec![0xffff; n]),
        DType::F16 => Buf::F16(vec![0xffff; n]),
        other => panic!("half_empty: {other:?} is not a 16-bit type"),
    }
}

/// Runs `plan` on the emulator with `bufs` (outputs as NaN-filled buffers); returns every
/// buffer after the launch.
fn run(plan: &Launch, bufs: &[Vec<f32>]) -> Vec<Vec<f32>> {
    let bufs: Vec<Buf> = bufs.iter().map(|v| Buf::F32(v.clone())).collect();
    run_bufs(plan, &bufs)
        .into_iter()
        .map(|b| match b {
            Buf::F32(v) => v,
            other => panic!("plan {}: an f32 buffer came back as {other:?}", plan.name),
        })
        .collect()
}

/// [`run`] with buffers of any type.
fn run_bufs(plan: &Launch, bufs: &[Buf]) -> Vec<Buf> {
    let mut input = Vec::new();
    input.extend((plan.name.len() as u32).to_le_bytes());
    input.extend(plan.name.as_bytes());
    for v in [plan.grid, plan.block, plan.args.len() as u32] {
        input.extend(v.to_le_bytes());
    }
    let mut used = 0;
    for a in &plan.args {
        match *a {
            Arg::Buf(k) => {
                assert_eq!(k, used, "plan {}: buffers in order", plan.name);
                used += 1;
                let (tag, n) = match &bufs[k] {
                    Buf::F32(v) => (b'b', v.len()),
                    Buf::Bf16(v) => (b'h', v.len()),
                    Buf::F16(v) => (b'e', v.len()),
                };
                input.push(tag);
                input.extend((n as u32).to_le_bytes());
                match &bufs[k] {
                    Buf::F32(v) => v.iter().for_each(|v| input.extend(v.to_le_bytes())),
                    Buf::Bf16(v) | Buf::F16(v) => v.iter().for_each(|v| input.extend(v.to_le_bytes())),
                }
            }
            Arg::Null => input.push(b'n'),
            Arg::I32(v) => {
                input.push(b'i');
                input.extend(v.to_le_bytes());
            }
            Arg::F32(v) => {
                input.push(b'f');
                input.extend(v.to_le_bytes());
            }
            Arg::U64(v) => {
                input.push(b'u');
                input.extend(v.to_le_bytes());
            }
        }
    }
    assert_eq!(used, bufs.len(), "plan {}: every buffer passed", plan.name);
    let mut child = Command::new(emulator()).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(&input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "emulator: {}", String::from_utf8_lossy(&out.stderr));
    let (mut res, mut at, o) = (Vec::new(), 0, &out.stdout);
    while at < o.len() {
        let tag = o[at];
        let n = u32::from_le_bytes(o[at + 1..at + 5].try_into().unwrap()) as usize;
        at += 5;
        let width = if tag == b'b' { 4 } else { 2 };
        let bytes = &o[at..at + width * n];
        at += width * n;
        let u16s = || bytes.chunks(2).map(|c| u16::from_le_bytes(c.try_into().unwrap())).collect();
        res.push(match tag {
            b'b' => Buf::F32(bytes.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()),
            b'h' => Buf::Bf16(u16s()),
            b'e' => Buf::F16(u16s()),
            t => panic!("emulator: buffer tag {t}"),
        });
    }
    res
}

fn normal(n: usize, seed: u64, scale: f32, shift: f32) -> Vec<f32> {
    Rng::new(seed).normal_vec(n).into_iter().map(|v| v * scale + shift).collect()
}

fn f64_var(v: &[f32], shape: (usize, usize)) -> Var {
    Var::from_tensor(&Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap().to_dtype(DType::F64).unwrap()).unwrap()
}

fn as_f64(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1().unwrap()
}

/// max |got - want| / max(1, max |want|); infinite where a value is NaN (an element the
/// kernel never wrote stays NaN, and `f64::max` would pass over it).
fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    let diff = |(g, w): (&f32, &f64)| {
        let d = (*g as f64 - w).abs();
        if d.is_nan() { f64::INFINITY } else { d }
    };
    got.iter().zip(want).map(diff).fold(0.0, f64::max) / scale
}

/// Rows of d with mean `shift`; some shapes leave threads idle (d < block), some give each
/// thread several elements (d > block), one is wider than a block of 256.
const SHAPES: [(usize, usize); 4] = [(3, 1), (5, 37), (4, 256), (2, 770)];

#[test]
fn standardization_forward_and_backward_match_the_f64_composite() {
    let eps = 1e-5;
    for (i, &(rows, d)) in SHAPES.iter().enumerate() {
        // The last case: rows whose mean is 1000 times their spread (the two-pass variance).
        let shift = if i == SHAPES.len() - 1 { 1000.0 } else { 0.3 };
        let x = normal(rows * d, 11 + i as u64, 1.0, shift);
        let g = normal(rows * d, 31 + i as u64, 1.0, 0.0);
        // Reference: (x - mean) / sqrt(var + eps) in f64, its gradient by candle's autograd.
        let xv = f64_var(&x, (rows, d));
        let xc = xv.as_tensor().broadcast_sub(&xv.as_tensor().mean_keepdim(D::Minus1).unwrap()).unwrap();
        let var = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let y_ref = xc.broadcast_div(&(var + eps).unwrap().sqrt().unwrap()).unwrap();
        let gt = Tensor::from_vec(g.iter().map(|&v| v as f64).collect::<Vec<_>>(), (rows, d), &Device::Cpu).unwrap();
        let dx_ref = y_ref.mul(&gt).unwrap().sum_all().unwrap().backward().unwrap().get(xv.as_tensor()).unwrap().clone();

        let fwd = run(&kernels::standardize_fwd(rows, d, eps, DType::F32), &[x.clone(), vec![f32::NAN; rows * d]]);
        let e = rel_err(&fwd[1], &as_f64(&y_ref));
        assert!(e < 2e-5, "standardize forward {rows}x{d}: {e}");
        let bwd = run(&kernels::standardize_bwd(rows, d, eps, DType::F32), &[x.clone(), fwd[1].clone(), g.clone(), vec![f32::NAN; rows * d]]);
        let e = rel_err(&bwd[3], &as_f64(&dx_ref));
        assert!(e < 5e-5, "standardize backward {rows}x{d}: {e}");
        // Inputs are read only.
        assert_eq!(bwd[0], x);
        assert_eq!(bwd[2], g);
    }
}

#[test]
fn softmax_backward_with_and_without_dropout_mask_and_scale_matches_the_f64_composite() {
    for (i, &(rows, d)) in SHAPES.iter().enumerate() {
        let s = normal(rows * d, 41 + i as u64, 2.0, 0.0);
        let g = normal(rows * d, 51 + i as u64, 1.0, 0.0);
        // Dropout at 0.25: factors 0 or 1 / 0.75.
        let mask: Vec<f32> = Rng::new(61 + i as u64).normal_vec(rows * d).iter().map(|v| if *v > -0.674 { 1.0 / 0.75 } else { 0.0 }).collect();
        for (masked, scale) in [(false, 1.0), (true, 0.125)] {
            // Reference: d/ds of sum(softmax(s) * m * g) * scale, in f64.
            let sv = f64_var(&s, (rows, d));
            let p = candle_nn::ops::softmax(sv.as_tensor(), D::Minus1).unwrap();
            let p_f32: Vec<f32> = as_f64(&p).iter().map(|&v| v as f32).collect();
            let mut w = Tensor::from_vec(g.iter().map(|&v| v as f64 * scale).collect::<Vec<_>>(), (rows, d), &Device::Cpu).unwrap();
            if masked {
                w = w.mul(&Tensor::from_vec(mask.iter().map(|&v| v as f64).collect::<Vec<_>>(), (rows, d), &Device::Cpu).unwrap()).unwrap();
            }
            let ds_ref = p.mul(&w).unwrap().sum_all().unwrap().backward().unwrap().get(sv.as_tensor()).unwrap().clone();
            let mut bufs = vec![p_f32, g.clone()];
            if masked {
                bufs.push(mask.clone());
            }
            bufs.push(vec![f32::NAN; rows * d]);
            let out = run(&kernels::softmax_bwd(rows, d, scale, masked, DType::F32), &bufs);
            let e = rel_err(out.last().unwrap(), &as_f64(&ds_ref));
            assert!(e < 2e-5, "softmax backward {rows}x{d} masked {masked}: {e}");
        }
    }
}

#[test]
fn gelu_forward_and_backward_match_the_f64_erf_gelu() {
    // More elements than one launch's threads (4096 blocks of 256 would cover 1 M; use a
    // small grid check too): 70 001 elements, values over [-6, 6].
    let n = 70_001;
    let x: Vec<f32> = normal(n, 71, 2.5, 0.0).into_iter().map(|v| v.clamp(-6.0, 6.0)).collect();
    let g = normal(n, 81, 1.0, 0.0);
    let xv = f64_var(&x, (1, n));
    let y_ref = xv.as_tensor().gelu_erf().unwrap();
    let gt = Tensor::from_vec(g.iter().map(|&v| v as f64).collect::<Vec<_>>(), (1, n), &Device::Cpu).unwrap();
    let dx_ref = y_ref.mul(&gt).unwrap().sum_all().unwrap().backward().unwrap().get(xv.as_tensor()).unwrap().clone();
    let fwd = run(&kernels::gelu_fwd(n, DType::F32), &[x.clone(), vec![f32::NAN; n]]);
    let e = rel_err(&fwd[1], &as_f64(&y_ref));
    assert!(e < 1e-6, "gelu forward: {e}");
    let bwd = run(&kernels::gelu_bwd(n, DType::F32), &[x.clone(), g.clone(), vec![f32::NAN; n]]);
    let e = rel_err(&bwd[2], &as_f64(&dx_ref));
    assert!(e < 1e-6, "gelu backward: {e}");
    // A grid smaller than the elements: the kernels stride over the rest.
    let mut plan = kernels::gelu_fwd(n, DType::F32);
    plan.grid = 3;
    let strided = run(&plan, &[x, vec![f32::NAN; n]]);
    assert_eq!(strided[1], fwd[1]);
}

#[test]
fn launch_plans_cover_their_shapes() {
    assert_eq!(kernels::row_block(1), 32);
    assert_eq!(kernels::row_block(37), 64);
    assert_eq!(kernels::row_block(768), 256);
    let p = kernels::softmax_bwd(10, 199, 0.125, false, DType::F32);
    assert_eq!((p.grid, p.block), (10, 256));
    assert_eq!(p.args[2], Arg::Null);
    let g = kernels::gelu_bwd(70_001, DType::F32);
    assert_eq!((g.grid, g.block), (274, 256));
}

/// A KL-Norm site's packed parameters [w; b; a; c] (+ [m_p; s_raw] when `learned`), each of d
/// (seeds `seed + 1` on): w near 1, b small, a and c so that sigma spans softplus' bend, a
/// prior not N(0, 1).
fn klnorm_params(d: usize, seed: u64, learned: bool) -> Vec<f32> {
    let mut p = normal(d, seed + 1, 0.2, 1.0);
    p.extend(normal(d, seed + 2, 0.1, 0.0));
    p.extend(normal(d, seed + 3, 0.5, 0.0));
    p.extend(normal(d, seed + 4, 1.0, -1.0));
    if learned {
        p.extend(normal(d, seed + 5, 0.3, 0.0));
        p.extend(normal(d, seed + 6, 0.5, 0.5));
    }
    p
}

/// The KL-Norm site's forward (y and the KL per row) and backward (the gradient of x̂ and of
/// every parameter, through the per-block column sums and kl_colsum), with the standard and the
/// learned prior, against the f64 composite of `model::norm` (the same formulas as
/// ops::kl_norm_last's references) and its autograd gradients.
#[test]
fn kl_norm_site_forward_and_backward_match_the_f64_composite() {
    let softplus = |z: &Tensor| (z.relu().unwrap() + (z.abs().unwrap().neg().unwrap().exp().unwrap() + 1.0).unwrap().log().unwrap()).unwrap();
    // (rows, d): rows over several blocks of the backward (chunk > 1), a short row, one row.
    for (case, &(rows, d, learned)) in [(600usize, 37usize, false), (600, 37, true), (3, 300, true), (1, 5, false)].iter().enumerate() {
        let np = if learned { 6 } else { 4 };
        let seed = 100 + 10 * case as u64;
        let xh = normal(rows * d, seed, 1.0, 0.0);
        let p = klnorm_params(d, seed, learned);
        let noise = normal(rows * d, seed + 7, 1.0, 0.0);
        let gy = normal(rows * d, seed + 8, 1.0, 0.0);
        let gk = normal(rows, seed + 9, 1.0, 0.0);

        // Reference in f64: y and kl, then d/d(xh, p) of sum(y gy) + sum(kl gk).
        let xv = f64_var(&xh, (rows, d));
        let pv = f64_var(&p, (np, d));
        let nz = Tensor::from_vec(noise.iter().map(|&v| v as f64).collect::<Vec<_>>(), (rows, d), &Device::Cpu).unwrap();
        let (x, pt) = (xv.as_tensor(), pv.as_tensor());
        let row = |i: usize| pt.get(i).unwrap();
        let mu = x.broadcast_mul(&row(0)).unwrap().broadcast_add(&row(1)).unwrap();
        let sigma = softplus(&x.broadcast_mul(&row(2)).unwrap().broadcast_add(&row(3)).unwrap());
        let y = (&mu + sigma.mul(&nz).unwrap()).unwrap();
        let per = if learned {
            let s = softplus(&row(5));
            let inv_var = s.sqr().unwrap().recip().unwrap();
            let t1 = sigma.sqr().unwrap().broadcast_mul(&inv_var).unwrap();
            let t2 = mu.broadcast_sub(&row(4)).unwrap().sqr().unwrap().broadcast_mul(&inv_var).unwrap();
            let t3 = s.log().unwrap().affine(2.0, -1.0).unwrap();
            ((t1 + t2).unwrap().broadcast_add(&t3).unwrap() - sigma.log().unwrap().affine(2.0, 0.0).unwrap()).unwrap().affine(0.5, 0.0).unwrap()
        } else {
            ((mu.sqr().unwrap() + sigma.sqr().unwrap()).unwrap() - sigma.log().unwrap().affine(2.0, 1.0).unwrap()).unwrap().affine(0.5, 0.0).unwrap()
        };
        let kl = per.sum(1).unwrap();
        let gyt = Tensor::from_vec(gy.iter().map(|&v| v as f64).collect::<Vec<_>>(), (rows, d), &Device::Cpu).unwrap();
        let gkt = Tensor::from_vec(gk.iter().map(|&v| v as f64).collect::<Vec<_>>(), rows, &Device::Cpu).unwrap();
        let loss = (y.mul(&gyt).unwrap().sum_all().unwrap() + kl.mul(&gkt).unwrap().sum_all().unwrap()).unwrap();
        let grads = loss.backward().unwrap();

        let fwd = run(&kernels::klnorm_fwd(rows, d, learned, DType::F32), &[xh.clone(), p.clone(), noise.clone(), vec![f32::NAN; rows * d + rows]]);
        let out = &fwd[3];
        let e = rel_err(&out[..rows * d], &as_f64(&y));
        assert!(e < 2e-6, "KL-Norm y {rows}x{d} learned {learned}: {e}");
        let e = rel_err(&out[rows * d..], &as_f64(&kl));
        assert!(e < 2e-5, "KL-Norm kl {rows}x{d} learned {learned}: {e}");

        let plan = kernels::klnorm_bwd(rows, d, learned, DType::F32);
        let blocks = plan.grid as usize;
        assert!(rows < 256 || kernels::klnorm_bwd_chunk(rows) > 1, "several rows per block");
        let mut g = gy.clone();
        g.extend(&gk);
        let bwd = run(&plan, &[xh.clone(), p.clone(), noise.clone(), g, vec![f32::NAN; rows * d + blocks * np * d]]);
        let e = rel_err(&bwd[4][..rows * d], &as_f64(grads.get(x).unwrap()));
        assert!(e < 2e-5, "KL-Norm dxh {rows}x{d} learned {learned}: {e}");
        let sums = run(&kernels::colsum(blocks, np * d), &[bwd[4][rows * d..].to_vec(), vec![f32::NAN; np * d]]);
        let want = as_f64(grads.get(pt).unwrap());
        for k in 0..np {
            let e = rel_err(&sums[1][k * d..(k + 1) * d], &want[k * d..(k + 1) * d]);
            assert!(e < 5e-5, "KL-Norm parameter row {k} {rows}x{d} learned {learned}: {e}");
        }
    }
}

/// LayerNorm forward and backward (the gradient of x, and of w and b through the per-block
/// column sums and kl_colsum) against the f64 composite (x - mean) / sqrt(var + eps) w + b.
#[test]
fn layer_norm_forward_and_backward_match_the_f64_composite() {
    let eps = 1e-5;
    for (case, &(rows, d, shift)) in [(600usize, 37usize, 0.3f32), (5, 768, 1000.0), (1, 1, 0.0), (300, 256, 2.0)].iter().enumerate() {
        let seed = 400 + 10 * case as u64;
        let x = normal(rows * d, seed, 1.5, shift);
        let w = normal(d, seed + 1, 0.3, 1.0);
        let b = normal(d, seed + 2, 0.2, 0.0);
        let g = normal(rows * d, seed + 3, 1.0, 0.0);
        let (xv, wv, bv) = (f64_var(&x, (rows, d)), f64_var(&w, (1, d)), f64_var(&b, (1, d)));
        let xt = xv.as_tensor();
        let xc = xt.broadcast_sub(&xt.mean_keepdim(D::Minus1).unwrap()).unwrap();
        let var = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let y_ref = xc.broadcast_div(&(var + eps).unwrap().sqrt().unwrap()).unwrap().broadcast_mul(wv.as_tensor()).unwrap().broadcast_add(bv.as_tensor()).unwrap();
        let gt = Tensor::from_vec(g.iter().map(|&v| v as f64).collect::<Vec<_>>(), (rows, d), &Device::Cpu).unwrap();
        let grads = y_ref.mul(&gt).unwrap().sum_all().unwrap().backward().unwrap();

        let fwd = run(&kernels::layer_norm_fwd(rows, d, eps, DType::F32), &[x.clone(), w.clone(), b.clone(), vec![f32::NAN; rows * d]]);
        let e = rel_err(&fwd[3], &as_f64(&y_ref));
        assert!(e < 2e-5, "layer norm forward {rows}x{d}: {e}");
        let plan = kernels::layer_norm_bwd(rows, d, eps, DType::F32);
        let blocks = plan.grid as usize;
        let bwd = run(&plan, &[x.clone(), w.clone(), g.clone(), vec![f32::NAN; rows * d + blocks * 2 * d]]);
        let e = rel_err(&bwd[3][..rows * d], &as_f64(grads.get(xt).unwrap()));
        // d = 1: x̂ = 0 and dx = 0 exactly.
        assert!(e < 5e-5, "layer norm dx {rows}x{d}: {e}");
        let sums = run(&kernels::colsum(blocks, 2 * d), &[bwd[3][rows * d..].to_vec(), vec![f32::NAN; 2 * d]]);
        let e = rel_err(&sums[1][..d], &as_f64(grads.get(wv.as_tensor()).unwrap()));
        assert!(e < 5e-5, "layer norm dw {rows}x{d}: {e}");
        let e = rel_err(&sums[1][d..], &as_f64(grads.get(bv.as_tensor()).unwrap()));
        assert!(e < 5e-5, "layer norm db {rows}x{d}: {e}");
    }
}

/// Per-channel GroupNorm on channels-last [B, T, C] (wav2vec2's first conv layer): forward with
/// and without the fused GELU, backward (dx, and dw / db through the per-clip sums and
/// kl_colsum), against the f64 composite (`ops::group_norm_cl_composite`) and its autograd.
/// Shapes: channels not a multiple of the 32-channel tile (idle threads), frames not a multiple
/// of the 32 time lanes, one frame (x̂ = 0), clips whose mean is 1000 and 10^7 times their
/// spread (one-pass sums need the shift; the mean rounded to f32 would be off by the spread).
#[test]
fn channels_last_group_norm_forward_and_backward_match_the_f64_composite() {
    let eps = 1e-5;
    for (case, &(b, t, c, shift)) in [(2usize, 37usize, 40usize, 0.3f32), (3, 300, 64, 1000.0), (1, 1, 7, 0.0), (2, 1001, 96, 2.0), (2, 64, 33, 1e7)].iter().enumerate() {
        let seed = 700 + 10 * case as u64;
        let x = normal(b * t * c, seed, 1.5, shift);
        let w = normal(c, seed + 1, 0.3, 1.0);
        let bias = normal(c, seed + 2, 0.2, 0.0);
        let g = normal(b * t * c, seed + 3, 1.0, 0.0);
        let f64_t = |v: &[f32], shape: &[usize]| Tensor::from_vec(v.iter().map(|&v| v as f64).collect::<Vec<_>>(), shape, &Device::Cpu).unwrap();
        let (xv, wv, bv) = (Var::from_tensor(&f64_t(&x, &[b, t, c])).unwrap(), Var::from_tensor(&f64_t(&w, &[c])).unwrap(), Var::from_tensor(&f64_t(&bias, &[c])).unwrap());
        let y_ref = klspeech::ops::group_norm_cl_composite(xv.as_tensor(), wv.as_tensor(), bv.as_tensor(), eps).unwrap();
        let grads = y_ref.mul(&f64_t(&g, &[b, t, c])).unwrap().sum_all().unwrap().backward().unwrap();
        let gelu_ref = y_ref.gelu_erf().unwrap();

        let what = format!("[{b}, {t}, {c}]");
        for (gelu, want) in [(false, &y_ref), (true, &gelu_ref)] {
            let fwd = run(&kernels::group_norm_cl_fwd(b, t, c, eps, gelu, candle_core::DType::F32), &[x.clone(), w.clone(), bias.clone(), vec![f32::NAN; b * t * c]]);
            let e = rel_err(&fwd[3], &as_f64(want));
            assert!(e < 2e-5, "group norm forward {what} (GELU {gelu}): {e}");
        }
        let plan = kernels::group_norm_cl_bwd(b, t, c, eps, DType::F32);
        let bwd = run(&plan, &[x.clone(), w.clone(), g.clone(), vec![f32::NAN; b * t * c + b * 2 * c]]);
        let e = rel_err(&bwd[3][..b * t * c], &as_f64(grads.get(xv.as_tensor()).unwrap()));
        assert!(e < 5e-5, "group norm dx {what}: {e}");
        let sums = run(&kernels::colsum(b, 2 * c), &[bwd[3][b * t * c..].to_vec(), vec![f32::NAN; 2 * c]]);
        let e = rel_err(&sums[1][..c], &as_f64(grads.get(wv.as_tensor()).unwrap()));
        assert!(e < 5e-5, "group norm dw {what}: {e}");
        let e = rel_err(&sums[1][c..], &as_f64(grads.get(bv.as_tensor()).unwrap()));
        assert!(e < 5e-5, "group norm db {what}: {e}");
        assert_eq!(bwd[0], x);
        assert_eq!(bwd[2], g);
    }
}

/// A [b, t] mask per case: leading ones of `Some(n)` frames, or (`None`) a mask with holes (frame
/// i valid when (7 i) % 5 < 3: not a prefix, and frame 0 valid).
fn frame_mask(t: usize, valid: &[Option<usize>]) -> Vec<f32> {
    valid.iter().flat_map(|v| (0..t).map(move |i| f32::from(u8::from(v.map_or((7 * i) % 5 < 3, |n| i < n))))).collect()
}

/// The padding-aware GroupNorm kernels (`kl_group_norm_cl_masked_fwd` / `_bwd`, a padded
/// batch's first feature-encoder layer on a GPU): each (clip, channel)'s statistics over the
/// frames whose mask is not 0, every frame normalized with them; forward with and without the
/// GELU, backward (dx, and dw / db through the per-clip sums and kl_colsum) against the f64
/// masked composite (`model::Norm`'s) and its autograd. The padded frames hold values far from
/// the valid ones (statistics over every frame would be off by them). Masks: leading ones of one
/// frame, of every frame, across the 32 time lanes, and one with holes (the kernels read the
/// mask; they do not assume lengths); channels over and under the 32-channel tile, a mean 1000
/// times the spread. With every frame valid: the unmasked kernels' bits.
#[test]
fn padding_aware_group_norm_kernels_match_the_masked_f64_composite() {
    let eps = 1e-5;
    let cases: [(usize, usize, Vec<Option<usize>>, f32); 4] = [
        (37, 40, vec![Some(37), Some(1), Some(20)], 0.3),
        (300, 33, vec![Some(129), Some(300)], 1000.0),
        (64, 7, vec![None, Some(33)], 2.0),
        (5, 64, vec![Some(5), Some(5)], 0.0),
    ];
    for (case, (t, c, valid, shift)) in cases.iter().enumerate() {
        let (b, t, c, shift) = (valid.len(), *t, *c, *shift);
        let n = b * t * c;
        let seed = 760 + 10 * case as u64;
        let mask = frame_mask(t, valid);
        let mut x = normal(n, seed, 1.5, shift);
        for (i, v) in x.iter_mut().enumerate() {
            if mask[i / c] == 0.0 {
                *v = *v * 4.0 + 50.0;
            }
        }
        let w = normal(c, seed + 1, 0.3, 1.0);
        let bias = normal(c, seed + 2, 0.2, 0.0);
        let g = normal(n, seed + 3, 1.0, 0.0);
        let f64_t = |v: &[f32], shape: &[usize]| Tensor::from_vec(v.iter().map(|&v| v as f64).collect::<Vec<_>>(), shape, &Device::Cpu).unwrap();
        let (xv, wv, bv) = (Var::from_tensor(&f64_t(&x, &[b, t, c])).unwrap(), Var::from_tensor(&f64_t(&w, &[c])).unwrap(), Var::from_tensor(&f64_t(&bias, &[c])).unwrap());
        let m = f64_t(&mask, &[b, t, 1]);
        let count = m.sum_keepdim(1).unwrap();
        let mean = xv.as_tensor().broadcast_mul(&m).unwrap().sum_keepdim(1).unwrap().broadcast_div(&count).unwrap();
        let xc = xv.as_tensor().broadcast_sub(&mean).unwrap();
        let var = xc.broadcast_mul(&m).unwrap().sqr().unwrap().sum_keepdim(1).unwrap().broadcast_div(&count).unwrap();
        let y_ref = xc.broadcast_div(&(var + eps).unwrap().sqrt().unwrap()).unwrap().broadcast_mul(wv.as_tensor()).unwrap().broadcast_add(bv.as_tensor()).unwrap();
        let grads = y_ref.mul(&f64_t(&g, &[b, t, c])).unwrap().sum_all().unwrap().backward().unwrap();
        let gelu_ref = y_ref.gelu_erf().unwrap();

        let what = format!("masked group norm [{b}, {t}, {c}] valid {valid:?}");
        let all_valid = mask.iter().all(|&v| v == 1.0);
        for (gelu, want) in [(false, &y_ref), (true, &gelu_ref)] {
            let fwd = run(&kernels::group_norm_cl_masked_fwd(b, t, c, eps, gelu, DType::F32), &[x.clone(), w.clone(), bias.clone(), mask.clone(), vec![f32::NAN; n]]);
            let e = rel_err(&fwd[4], &as_f64(want));
            assert!(e < 2e-5, "{what} forward (GELU {gelu}): {e}");
            assert_eq!(fwd[3], mask);
            if all_valid {
                let plain = run(&kernels::group_norm_cl_fwd(b, t, c, eps, gelu, DType::F32), &[x.clone(), w.clone(), bias.clone(), vec![f32::NAN; n]]);
                assert_eq!(fwd[4], plain[3], "{what}: the unmasked kernel's bits (GELU {gelu})");
            }
        }
        let bwd = run(&kernels::group_norm_cl_masked_bwd(b, t, c, eps, DType::F32), &[x.clone(), w.clone(), mask.clone(), g.clone(), vec![f32::NAN; n + b * 2 * c]]);
        let e = rel_err(&bwd[4][..n], &as_f64(grads.get(xv.as_tensor()).unwrap()));
        assert!(e < 5e-5, "{what} dx: {e}");
        let sums = run(&kernels::colsum(b, 2 * c), &[bwd[4][n..].to_vec(), vec![f32::NAN; 2 * c]]);
        let e = rel_err(&sums[1][..c], &as_f64(grads.get(wv.as_tensor()).unwrap()));
        assert!(e < 5e-5, "{what} dw: {e}");
        let e = rel_err(&sums[1][c..], &as_f64(grads.get(bv.as_tensor()).unwrap()));
        assert!(e < 5e-5, "{what} db: {e}");
        assert_eq!((&bwd[0], &bwd[2], &bwd[3]), (&x, &mask, &g));
        if all_valid {
            let plain = run(&kernels::group_norm_cl_bwd(b, t, c, eps, DType::F32), &[x.clone(), w.clone(), g.clone(), vec![f32::NAN; n + b * 2 * c]]);
            assert_eq!(bwd[4], plain[3], "{what}: the unmasked backward's bits");
        }
    }
}

/// The GroupNorm forward in bf16 and f16 (inference in those types): each output is the f32
/// kernel's result on the same (exactly representable) inputs, rounded to the type to nearest
/// even, bit for bit; with and without the GELU. (The f32 kernel is checked against f64 above.)
#[test]
fn channels_last_group_norm_in_bf16_and_f16_is_the_f32_kernel_rounded() {
    use candle_core::DType;
    let eps = 1e-5;
    for (case, &(b, t, c, shift)) in [(2usize, 37usize, 40usize, 0.3f32), (3, 300, 64, 1000.0), (1, 1, 7, 0.0)].iter().enumerate() {
        let seed = 900 + 10 * case as u64;
        for dtype in [DType::BF16, DType::F16] {
            // Values of the type, as f32 and as its bits.
            let of = |v: Vec<f32>| -> (Vec<f32>, Buf) {
                match dtype {
                    DType::BF16 => {
                        let h: Vec<half::bf16> = v.iter().map(|&x| half::bf16::from_f32(x)).collect();
                        (h.iter().map(|x| x.to_f32()).collect(), Buf::Bf16(h.iter().map(|x| x.to_bits()).collect()))
                    }
                    _ => {
                        let h: Vec<half::f16> = v.iter().map(|&x| half::f16::from_f32(x)).collect();
                        (h.iter().map(|x| x.to_f32()).collect(), Buf::F16(h.iter().map(|x| x.to_bits()).collect()))
                    }
                }
            };
            let (x, xh) = of(normal(b * t * c, seed, 1.5, shift));
            let (w, wh) = of(normal(c, seed + 1, 0.3, 1.0));
            let (bias, bh) = of(normal(c, seed + 2, 0.2, 0.0));
            let empty = half_empty(dtype, b * t * c);
            // The padding-aware kernel: clip 0 of one valid frame (or all of them), the rest
            // with holes.
            let valid: Vec<Option<usize>> = (0..b).map(|i| if i == 0 { Some(if t > 40 { 41 } else { 1 }) } else { None }).collect();
            let (mask, mh) = of(frame_mask(t, &valid));
            for gelu in [false, true] {
                let y32 = run(&kernels::group_norm_cl_fwd(b, t, c, eps, gelu, DType::F32), &[x.clone(), w.clone(), bias.clone(), vec![f32::NAN; b * t * c]]);
                let (_, want) = of(y32[3].clone());
                let got = run_bufs(&kernels::group_norm_cl_fwd(b, t, c, eps, gelu, dtype), &[xh.clone(), wh.clone(), bh.clone(), empty.clone()]);
                assert_eq!(got[3], want, "group norm forward [{b}, {t}, {c}] in {dtype:?} (GELU {gelu})");
                assert_eq!(got[0], xh);
                let y32 = run(&kernels::group_norm_cl_masked_fwd(b, t, c, eps, gelu, DType::F32), &[x.clone(), w.clone(), bias.clone(), mask.clone(), vec![f32::NAN; b * t * c]]);
                let (_, want) = of(y32[4].clone());
                let got = run_bufs(&kernels::group_norm_cl_masked_fwd(b, t, c, eps, gelu, dtype), &[xh.clone(), wh.clone(), bh.clone(), mh.clone(), empty.clone()]);
                assert_eq!(got[4], want, "masked group norm forward [{b}, {t}, {c}] in {dtype:?} (GELU {gelu})");
            }
        }
    }
}

/// The linear layers' in-place bias add: y + b in f32 to the bit, and in bf16 / f16 the f32
/// sum rounded once to nearest-even; with the GELU after it (inference's feed-forward), the
/// bits of the two kernels one after the other (`kl_gelu_fwd` on the sum, in f32, rounded to
/// the type). For widths below, at and over one 256-column tile, one row and more rows than
/// the grid's row groups (each thread walks its column down several rows). The bias buffer is
/// left as it was.
#[test]
fn bias_add_in_place_matches_the_host_sum() {
    use candle_core::DType;
    // f32 values as bf16 / f16 bits and back (nearest even), by type.
    let to_bits = half_buf;
    let to_f32 = |b: &Buf| -> Vec<f32> {
        match b {
            Buf::Bf16(v) => v.iter().map(|&x| half::bf16::from_bits(x).to_f32()).collect(),
            Buf::F16(v) => v.iter().map(|&x| half::f16::from_bits(x).to_f32()).collect(),
            Buf::F32(v) => v.clone(),
        }
    };
    for (case, &(rows, d)) in [(1usize, 3usize), (5, 256), (37, 300), (3, 769), (300, 1024)].iter().enumerate() {
        let plan = kernels::bias_add(rows, d, DType::F32, false);
        // Every (row, column) is reached exactly once: tiles x row groups blocks of 256.
        let tiles = d.div_ceil(256);
        assert_eq!(plan.grid as usize % tiles, 0, "[{rows}, {d}]");
        assert!(plan.grid as usize / tiles <= rows && plan.grid <= 1024 + tiles as u32, "[{rows}, {d}]: grid {}", plan.grid);
        let seed = 1300 + 10 * case as u64;
        let y = normal(rows * d, seed, 2.0, 0.5);
        let b = normal(d, seed + 1, 1.0, -0.25);
        let got = run(&plan, &[y.clone(), b.clone()]);
        let want: Vec<f32> = y.iter().enumerate().map(|(i, &v)| v + b[i % d]).collect();
        assert!(got[0].iter().zip(&want).all(|(a, w)| a.to_bits() == w.to_bits()), "bias add [{rows}, {d}] in f32");
        assert_eq!(got[1], b);
        let gelu_of = |v: &[f32]| run(&kernels::gelu_fwd(v.len(), DType::F32), &[v.to_vec(), vec![f32::NAN; v.len()]])[1].clone();
        let fused = run(&kernels::bias_add(rows, d, DType::F32, true), &[y.clone(), b.clone()]);
        assert!(fused[0].iter().zip(&gelu_of(&want)).all(|(a, w)| a.to_bits() == w.to_bits()), "bias add + GELU [{rows}, {d}] in f32");
        for dtype in [DType::BF16, DType::F16] {
            let (yh, bh) = (to_bits(dtype, &y), to_bits(dtype, &b));
            let (yr, br) = (to_f32(&yh), to_f32(&bh));
            let sum: Vec<f32> = yr.iter().enumerate().map(|(i, &v)| v + br[i % d]).collect();
            let want = to_bits(dtype, &sum);
            let got = run_bufs(&kernels::bias_add(rows, d, dtype, false), &[yh.clone(), bh.clone()]);
            assert_eq!(got[0], want, "bias add [{rows}, {d}] in {dtype:?}");
            assert_eq!(got[1], bh);
            let got = run_bufs(&kernels::bias_add(rows, d, dtype, true), &[yh, bh]);
            assert_eq!(got[0], to_bits(dtype, &gelu_of(&to_f32(&want))), "bias add + GELU [{rows}, {d}] in {dtype:?}");
        }
    }
}

/// The keyed normal stream on the emulator gives the host's bits (rng::keyed_normal_vec, with
/// its own ln, sin and cos polynomials): same key, same values, for an odd count, counts over
/// several blocks and a grid smaller than the pairs (the kernel strides).
#[test]
fn keyed_normal_stream_matches_the_host_bit_for_bit() {
    for (key, n) in [(11u64, 1usize), (3, 4097), (0xDEAD_BEEF_u64, 100_001), (u64::MAX, 513)] {
        let want = klspeech::rng::keyed_normal_vec(key, n);
        let mut plans = vec![kernels::keyed_normal(n, key)];
        let mut small = kernels::keyed_normal(n, key);
        small.grid = 2;
        plans.push(small);
        for plan in plans {
            let got = run(&plan, &[vec![f32::NAN; n]]);
            let differ = got[0].iter().zip(&want).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
            assert_eq!(differ, 0, "key {key}, n {n}, grid {}: {differ} values differ (first {:?} vs {:?})", plan.grid, &got[0][..n.min(4)], &want[..n.min(4)]);
        }
    }
}

/// The dropout mask on the emulator is the host's (`ops::dropout_mask`) bit for bit, for rates
/// whose threshold ceil(p 2^53) is exact and not, p = 0 (keep all) and a strided grid.
#[test]
fn dropout_mask_matches_the_host_bit_for_bit() {
    for (key, n, p) in [(7u64, 1000usize, 0.1f64), (99, 70_001, 0.5), (1, 257, 0.0), (u64::MAX, 4099, 0.3333333333333333)] {
        let x = Tensor::zeros(n, DType::F32, &Device::Cpu).unwrap();
        let want: Vec<f32> = klspeech::ops::dropout_mask(&x, p, key).unwrap().to_vec1().unwrap();
        let mut small = kernels::dropout_mask(n, p, key);
        small.grid = 3;
        for plan in [kernels::dropout_mask(n, p, key), small] {
            let got = run(&plan, &[vec![f32::NAN; n]]);
            let differ = got[0].iter().zip(&want).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
            assert_eq!(differ, 0, "key {key}, n {n}, p {p}, grid {}: {differ} values differ", plan.grid);
        }
        let kept = want.iter().filter(|v| **v != 0.0).count() as f64 / n as f64;
        assert!((kept - (1.0 - p)).abs() < 0.06, "kept {kept} at p {p}");
    }
}

/// AdamW's two in-place kernels give the CPU's fused update (`ops::adamw_in_place`) bit for
/// bit, over three steps from zero moments, with and without weight decay, and with gradients
/// that hold zeros of both signs.
#[test]
fn adamw_kernels_match_the_cpu_update_bit_for_bit() {
    let n = 5_003;
    for decay in [None, Some(1.0 - 1e-3 * 0.01)] {
        let mut theta = normal(n, 601, 0.5, 0.0);
        let mut mv = vec![0f32; 2 * n];
        let theta_t = Tensor::from_vec(theta.clone(), n, &Device::Cpu).unwrap();
        let mv_t = Tensor::zeros((2, n), DType::F32, &Device::Cpu).unwrap();
        for t in 1..=3 {
            let mut g = normal(n, 610 + t as u64, 0.1, 0.0);
            g[0] = 0.0;
            g[1] = -0.0;
            let p = common::adamw_scalars(t, decay);
            let gt = Tensor::from_vec(g.clone(), n, &Device::Cpu).unwrap();
            assert!(klspeech::ops::adamw_in_place(&theta_t, &gt, &mv_t, p).unwrap());
            mv = run(&kernels::adam_moments(n, &p, DType::F32), &[mv, g])[0].clone();
            theta = run(&kernels::adam_apply(n, &p, DType::F32), &[theta, mv.clone()])[0].clone();
            let want_theta: Vec<f32> = theta_t.to_vec1().unwrap();
            let want_mv: Vec<f32> = mv_t.flatten_all().unwrap().to_vec1().unwrap();
            let bits = |a: &[f32], b: &[f32]| a.iter().zip(b).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
            assert_eq!(bits(&mv, &want_mv), 0, "moments differ at step {t}, decay {decay:?}");
            assert_eq!(bits(&theta, &want_theta), 0, "parameters differ at step {t}, decay {decay:?}");
        }
    }
}

/// The bf16 / f16 AdamW kernels (pure half-precision training): f32 arithmetic on the stored
/// values, each result rounded once, the update reading the stored moments; bit for bit the
/// test's own reference (`common::adamw_half_reference`) and the CPU's rehearsal of the GPU
/// path (`ops::adamw_in_place` under `ops::with_gpu_path`), over three steps from zero moments,
/// with and without weight decay, gradients with zeros of both signs.
#[test]
fn half_precision_adamw_kernels_match_the_reference_bit_for_bit() {
    let n = 5_003;
    for dtype in [DType::BF16, DType::F16] {
        let round = common::round_to(dtype);
        let bits = |v: &[f32]| half_buf(dtype, v);
        let on_cpu = |v: &[f32]| Tensor::from_vec(v.to_vec(), v.len(), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
        for decay in [None, Some(1.0 - 1e-3 * 0.01)] {
            let mut theta: Vec<f32> = normal(n, 621, 0.5, 0.0).into_iter().map(&round).collect();
            let mut mv = vec![0f32; 2 * n];
            let (mut theta_k, mut mv_k) = (bits(&theta), bits(&mv));
            let (theta_t, mv_t) = (on_cpu(&theta), on_cpu(&mv).reshape((2, n)).unwrap());
            for t in 1..=3 {
                let mut g: Vec<f32> = normal(n, 630 + t as u64, 0.1, 0.0).into_iter().map(&round).collect();
                g[0] = 0.0;
                g[1] = -0.0;
                let p = common::adamw_scalars(t, decay);
                common::adamw_half_reference(&mut theta, &mut mv, &g, &p, &round);
                mv_k = run_bufs(&kernels::adam_moments(n, &p, dtype), &[mv_k, bits(&g)])[0].clone();
                theta_k = run_bufs(&kernels::adam_apply(n, &p, dtype), &[theta_k, mv_k.clone()])[0].clone();
                let what = format!("{dtype:?} step {t}, decay {decay:?}");
                assert_eq!(mv_k, bits(&mv), "kernel moments, {what}");
                assert_eq!(theta_k, bits(&theta), "kernel parameters, {what}");
                assert!(klspeech::ops::with_gpu_path(|| klspeech::ops::adamw_in_place(&theta_t, &on_cpu(&g), &mv_t, p)).unwrap(), "the CPU's rehearsal applies");
                let host = |t: &Tensor| t.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
                assert_eq!(bits(&host(&mv_t)), bits(&mv), "CPU rehearsal moments, {what}");
                assert_eq!(bits(&host(&theta_t)), bits(&theta), "CPU rehearsal parameters, {what}");
            }
        }
    }
}

/// The convolution columns' gather kernel (`ops::conv_gemm` on a GPU) copies, bit for bit, what
/// `index_select` along time gives on the CPU with the frame indices `(j / kc) stride + k0 +
/// j % kc`, in f32, bf16 and f16: channel widths under and over a warp, strides 1-5, chunks that
/// start past tap 0, frames up to the clip's end, more rows than one launch's warps (the
/// grid-stride loop), and the shared columns of a stride-1 convolution (16 taps of 48
/// channels at stride 1 over a whole group's sequence).
#[test]
fn gather_taps_is_index_select_bit_for_bit() {
    // (n, lp, t, kc, cg, stride, k0)
    for &(n, lp, t, kc, cg, stride, k0) in &[(2usize, 20usize, 9usize, 3usize, 5usize, 2usize, 0usize), (3, 40, 6, 2, 48, 5, 3), (1, 130, 3, 128, 7, 1, 0), (2, 33, 4, 2, 33, 4, 19), (3, 12_004, 4_000, 3, 3, 3, 2), (2, 120, 105, 16, 48, 1, 0)] {
        let plan = kernels::gather_taps(n, lp, t, kc, cg, stride, k0, DType::F32);
        assert!((t - 1) * stride + k0 + kc <= lp);
        let x = normal(n * lp * cg, 1400 + lp as u64, 1.0, 0.0);
        let idx: Vec<u32> = (0..t).flat_map(|f| (k0..k0 + kc).map(move |k| (f * stride + k) as u32)).collect();
        let want_t = Tensor::from_vec(x.clone(), (n, lp, cg), &Device::Cpu).unwrap().index_select(&Tensor::from_vec(idx, t * kc, &Device::Cpu).unwrap(), 1).unwrap();
        let want: Vec<f32> = want_t.flatten_all().unwrap().to_vec1().unwrap();
        let got = run(&plan, &[x.clone(), vec![f32::NAN; n * t * kc * cg]]);
        assert_eq!(got[0], x, "the input is untouched");
        assert!(got[1].iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "gather {:?} in f32", (n, lp, t, kc, cg, stride, k0));
        for dtype in [DType::BF16, DType::F16] {
            let bits = |v: &[f32]| half_buf(dtype, v);
            let out = half_empty(dtype, n * t * kc * cg);
            let got = run_bufs(&kernels::gather_taps(n, lp, t, kc, cg, stride, k0, dtype), &[bits(&x), out]);
            assert_eq!(got[1], bits(&want), "gather {:?} in {dtype:?}", (n, lp, t, kc, cg, stride, k0));
        }
    }
}

/// The half-type instances of the standardization, softmax-backward and GELU kernels (bf16 /
/// f16 training) give, bit for bit, the f32 kernel's output on the same (representable) values
/// rounded once to the type: rows under and over a block, a dropout mask, more elements than
/// one launch's threads.
#[test]
fn half_type_row_and_gelu_kernels_are_the_f32_kernels_rounded() {
    for dtype in [DType::BF16, DType::F16] {
        let bits = |v: &[f32]| half_buf(dtype, v);
        let round = common::round_to(dtype);
        let of = |v: Vec<f32>| v.into_iter().map(&round).collect::<Vec<f32>>();
        let empty = |n: usize| half_empty(dtype, n);
        for &(rows, d) in &[(3usize, 7usize), (5, 300), (2, 768)] {
            let what = format!("[{rows}, {d}] in {dtype:?}");
            let n = rows * d;
            let x = of(normal(n, 1500 + d as u64, 2.0, 0.3));
            let g = of(normal(n, 1501 + d as u64, 1.0, 0.0));
            let eps = 1e-5;
            // The standardization, its backward fed the forward's stored (rounded) output.
            let y32 = run(&kernels::standardize_fwd(rows, d, eps, DType::F32), &[x.clone(), vec![f32::NAN; n]])[1].clone();
            let yh = run_bufs(&kernels::standardize_fwd(rows, d, eps, dtype), &[bits(&x), empty(n)])[1].clone();
            assert_eq!(yh, bits(&y32), "standardize {what}");
            let y = of(y32);
            let dx32 = run(&kernels::standardize_bwd(rows, d, eps, DType::F32), &[x.clone(), y.clone(), g.clone(), vec![f32::NAN; n]])[3].clone();
            let dxh = run_bufs(&kernels::standardize_bwd(rows, d, eps, dtype), &[bits(&x), bits(&y), bits(&g), empty(n)])[3].clone();
            assert_eq!(dxh, bits(&dx32), "standardize backward {what}");
            // The softmax backward with and without a dropout mask (probabilities in [0, 1]).
            let p = of(normal(n, 1502 + d as u64, 0.2, 0.5));
            let mask = of((0..n).map(|i| if i % 3 == 0 { 0.0 } else { 1.0 / 0.9 }).collect());
            let dx32 = run(&kernels::softmax_bwd(rows, d, 0.125, true, DType::F32), &[p.clone(), g.clone(), mask.clone(), vec![f32::NAN; n]])[3].clone();
            let dxh = run_bufs(&kernels::softmax_bwd(rows, d, 0.125, true, dtype), &[bits(&p), bits(&g), bits(&mask), empty(n)])[3].clone();
            assert_eq!(dxh, bits(&dx32), "masked softmax backward {what}");
            let dx32 = run(&kernels::softmax_bwd(rows, d, 1.0, false, DType::F32), &[p.clone(), g.clone(), vec![f32::NAN; n]])[2].clone();
            let dxh = run_bufs(&kernels::softmax_bwd(rows, d, 1.0, false, dtype), &[bits(&p), bits(&g), empty(n)])[2].clone();
            assert_eq!(dxh, bits(&dx32), "softmax backward {what}");
        }
        // GELU both ways over more elements than 4096 blocks of 256 threads.
        let n = 1_100_003;
        let x = of(normal(n, 1510, 3.0, 0.0));
        let g = of(normal(n, 1511, 1.0, 0.0));
        let y32 = run(&kernels::gelu_fwd(n, DType::F32), &[x.clone(), vec![f32::NAN; n]])[1].clone();
        assert_eq!(run_bufs(&kernels::gelu_fwd(n, dtype), &[bits(&x), empty(n)])[1], bits(&y32), "GELU in {dtype:?}");
        let dx32 = run(&kernels::gelu_bwd(n, DType::F32), &[x.clone(), g.clone(), vec![f32::NAN; n]])[2].clone();
        assert_eq!(run_bufs(&kernels::gelu_bwd(n, dtype), &[bits(&x), bits(&g), empty(n)])[2], bits(&dx32), "GELU backward in {dtype:?}");
    }
}

/// Inference's bias + residual + LayerNorm kernel (`ops::residual_layer_norm_infer` on a GPU)
/// is, bit for bit, the LayerNorm kernel on the sum `(y + bias) + r` with each add rounded to
/// the type (in f32 the plain f32 adds; bf16 / f16 rounded after each, as the separate bias add
/// and residual add store them): rows wider than a block, a short row, one value; and the
/// LayerNorm within 2e-5 of f64.
#[test]
fn residual_layer_norm_is_the_layer_norm_of_the_rounded_sums() {
    let eps = 1e-5;
    for &(rows, d) in &[(5usize, 768usize), (600, 37), (3, 7), (1, 1)] {
        let seed = 1900 + d as u64;
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let what = format!("[{rows}, {d}] in {dtype:?}");
            let round = common::round_to(dtype);
            let n = rows * d;
            let of = |v: Vec<f32>| v.into_iter().map(&round).collect::<Vec<f32>>();
            let (y, r) = (of(normal(n, seed, 2.0, 0.5)), of(normal(n, seed + 1, 1.0, -0.3)));
            let p = of([normal(d, seed + 2, 0.3, 0.0), normal(d, seed + 3, 0.3, 1.0), normal(d, seed + 4, 0.2, 0.0)].concat());
            // The sums as the separate adds store them.
            let z: Vec<f32> = (0..n).map(|i| round(round(y[i] + p[i % d]) + r[i])).collect();
            let (w, b) = (p[d..2 * d].to_vec(), p[2 * d..].to_vec());
            if dtype == DType::F32 {
                let got = run(&kernels::residual_layer_norm(rows, d, eps, dtype), &[y.clone(), r.clone(), p.clone(), vec![f32::NAN; n]])[3].clone();
                let want = run(&kernels::layer_norm_fwd(rows, d, eps, dtype), &[z.clone(), w.clone(), b.clone(), vec![f32::NAN; n]])[3].clone();
                let diff = got.iter().zip(&want).position(|(g, w)| g.to_bits() != w.to_bits());
                assert!(diff.is_none(), "{what}: value {} is {} where the LayerNorm of the sum gives {}", diff.unwrap(), got[diff.unwrap()], want[diff.unwrap()]);
                // And the LayerNorm of the sum in f64.
                let zt = Tensor::from_vec(z.iter().map(|&v| v as f64).collect::<Vec<_>>(), (rows, d), &Device::Cpu).unwrap();
                let zc = zt.broadcast_sub(&zt.mean_keepdim(D::Minus1).unwrap()).unwrap();
                let var = zc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
                let f64v = |v: &[f32]| Tensor::from_vec(v.iter().map(|&x| x as f64).collect::<Vec<_>>(), (1, d), &Device::Cpu).unwrap();
                let y_ref = zc.broadcast_div(&(var + eps).unwrap().sqrt().unwrap()).unwrap().broadcast_mul(&f64v(&w)).unwrap().broadcast_add(&f64v(&b)).unwrap();
                let e = rel_err(&got, &as_f64(&y_ref));
                assert!(e < 2e-5, "{what}: {e} of f64");
            } else {
                let bits = |v: &[f32]| half_buf(dtype, v);
                let got = run_bufs(&kernels::residual_layer_norm(rows, d, eps, dtype), &[bits(&y), bits(&r), bits(&p), half_empty(dtype, n)])[3].clone();
                let want = run_bufs(&kernels::layer_norm_fwd(rows, d, eps, dtype), &[bits(&z), bits(&w), bits(&b), half_empty(dtype, n)])[3].clone();
                let (Buf::Bf16(g) | Buf::F16(g), Buf::Bf16(w) | Buf::F16(w)) = (&got, &want) else { panic!("{what}: an f32 buffer") };
                let diff = g.iter().zip(w).position(|(a, b)| a != b);
                assert!(diff.is_none(), "{what}: value {} has bits {:#06x} where the LayerNorm of the sum gives {:#06x}", diff.unwrap(), g[diff.unwrap()], w[diff.unwrap()]);
            }
        }
    }
}

/// The half-type instances of the column-summing kernels (LayerNorm, the KL-Norm site, the
/// channels-last GroupNorm backward; bf16 / f16 training) give, bit for bit, the f32 kernel's
/// outputs on the same (representable) values rounded once to the type, and the f32 kernel's
/// per-block column sums themselves, stored as f32 inside the 16-bit output from
/// `kernels::tail_offset` (an odd count of gradient values moves them to the next even one).
#[test]
fn half_type_norm_kernels_are_the_f32_kernels_rounded() {
    assert_eq!((kernels::tail_offset(21, DType::BF16), kernels::tail_offset(21, DType::F32), kernels::tail_offset(22, DType::F16)), (22, 21, 22));
    assert_eq!((kernels::packed_len(21, 10, DType::F16), kernels::packed_len(21, 10, DType::F32)), (42, 31));
    for dtype in [DType::BF16, DType::F16] {
        let bits = |v: &[f32]| half_buf(dtype, v);
        let round = common::round_to(dtype);
        let of = |v: Vec<f32>| v.into_iter().map(&round).collect::<Vec<f32>>();
        let empty = |n: usize| half_empty(dtype, n);
        // A half-type backward's output: its first n values (as bits) and its f32 sums.
        let split = |out: &Buf, n: usize, sums: usize| -> (Buf, Vec<f32>) {
            let (Buf::Bf16(v) | Buf::F16(v)) = out else { panic!("an f32 buffer from a {dtype:?} kernel") };
            assert_eq!(v.len(), kernels::packed_len(n, sums, dtype));
            let head = match dtype {
                DType::BF16 => Buf::Bf16(v[..n].to_vec()),
                _ => Buf::F16(v[..n].to_vec()),
            };
            let tail = v[kernels::tail_offset(n, dtype)..].chunks(2).map(|c| f32::from_bits(c[0] as u32 | (c[1] as u32) << 16)).collect();
            (head, tail)
        };
        let same_bits = |got: &[f32], want: &[f32], what: &str| {
            assert_eq!(got.len(), want.len(), "{what}");
            let diff = got.iter().zip(want).position(|(g, w)| g.to_bits() != w.to_bits());
            assert!(diff.is_none(), "{what}: sum {} is {} where the f32 kernel gives {}", diff.unwrap(), got[diff.unwrap()], want[diff.unwrap()]);
        };
        let eps = 1e-5;

        // LayerNorm: several rows per block of the backward, a row wider than a block, an odd n.
        for &(rows, d) in &[(600usize, 37usize), (5, 768), (3, 7)] {
            let what = format!("layer norm [{rows}, {d}] in {dtype:?}");
            let n = rows * d;
            let seed = 1600 + d as u64;
            let x = of(normal(n, seed, 1.5, 0.3));
            let w = of(normal(d, seed + 1, 0.3, 1.0));
            let b = of(normal(d, seed + 2, 0.2, 0.0));
            let g = of(normal(n, seed + 3, 1.0, 0.0));
            let y32 = run(&kernels::layer_norm_fwd(rows, d, eps, DType::F32), &[x.clone(), w.clone(), b.clone(), vec![f32::NAN; n]])[3].clone();
            let yh = run_bufs(&kernels::layer_norm_fwd(rows, d, eps, dtype), &[bits(&x), bits(&w), bits(&b), empty(n)])[3].clone();
            assert_eq!(yh, bits(&y32), "{what}");
            let plan32 = kernels::layer_norm_bwd(rows, d, eps, DType::F32);
            let sums = plan32.grid as usize * 2 * d;
            let out32 = run(&plan32, &[x.clone(), w.clone(), g.clone(), vec![f32::NAN; n + sums]])[3].clone();
            let outh = run_bufs(&kernels::layer_norm_bwd(rows, d, eps, dtype), &[bits(&x), bits(&w), bits(&g), empty(kernels::packed_len(n, sums, dtype))])[3].clone();
            let (dx, tail) = split(&outh, n, sums);
            assert_eq!(dx, bits(&out32[..n]), "{what}: dx");
            same_bits(&tail, &out32[n..], &what);
        }

        // The KL-Norm site with the standard and a learned prior.
        for &(rows, d, learned) in &[(600usize, 37usize, false), (600, 37, true), (3, 301, true)] {
            let what = format!("KL-Norm [{rows}, {d}] learned {learned} in {dtype:?}");
            let (n, np) = (rows * d, if learned { 6 } else { 4 });
            let seed = 1700 + d as u64 + learned as u64;
            let xh = of(normal(n, seed, 1.0, 0.0));
            let p = of(klnorm_params(d, seed, learned));
            let noise = of(normal(n, seed + 7, 1.0, 0.0));
            let mut g = of(normal(n, seed + 8, 1.0, 0.0));
            g.extend(of(normal(rows, seed + 9, 1.0, 0.0)));
            let y32 = run(&kernels::klnorm_fwd(rows, d, learned, DType::F32), &[xh.clone(), p.clone(), noise.clone(), vec![f32::NAN; n + rows]])[3].clone();
            let yh = run_bufs(&kernels::klnorm_fwd(rows, d, learned, dtype), &[bits(&xh), bits(&p), bits(&noise), empty(n + rows)])[3].clone();
            assert_eq!(yh, bits(&y32), "{what}: y and the KL");
            let plan32 = kernels::klnorm_bwd(rows, d, learned, DType::F32);
            let sums = plan32.grid as usize * np * d;
            let out32 = run(&plan32, &[xh.clone(), p.clone(), noise.clone(), g.clone(), vec![f32::NAN; n + sums]])[4].clone();
            let outh = run_bufs(&kernels::klnorm_bwd(rows, d, learned, dtype), &[bits(&xh), bits(&p), bits(&noise), bits(&g), empty(kernels::packed_len(n, sums, dtype))])[4].clone();
            let (dx, tail) = split(&outh, n, sums);
            assert_eq!(dx, bits(&out32[..n]), "{what}: dx̂");
            same_bits(&tail, &out32[n..], &what);
        }

        // The channels-last GroupNorm backward: idle channel threads, one frame, an odd n.
        for &(b, t, c) in &[(2usize, 37usize, 40usize), (1, 1, 7), (3, 301, 33)] {
            let what = format!("group norm [{b}, {t}, {c}] in {dtype:?}");
            let n = b * t * c;
            let seed = 1800 + t as u64;
            let x = of(normal(n, seed, 1.5, 2.0));
            let w = of(normal(c, seed + 1, 0.3, 1.0));
            let g = of(normal(n, seed + 2, 1.0, 0.0));
            let sums = b * 2 * c;
            let out32 = run(&kernels::group_norm_cl_bwd(b, t, c, eps, DType::F32), &[x.clone(), w.clone(), g.clone(), vec![f32::NAN; n + sums]])[3].clone();
            let outh = run_bufs(&kernels::group_norm_cl_bwd(b, t, c, eps, dtype), &[bits(&x), bits(&w), bits(&g), empty(kernels::packed_len(n, sums, dtype))])[3].clone();
            let (dx, tail) = split(&outh, n, sums);
            assert_eq!(dx, bits(&out32[..n]), "{what}: dx");
            same_bits(&tail, &out32[n..], &what);
            // The padding-aware backward: the last clip's frames after the first 1 + t / 2 padding.
            let valid: Vec<Option<usize>> = (0..b).map(|i| Some(if i + 1 == b { 1 + t / 2 } else { t })).collect();
            let mask = frame_mask(t, &valid);
            let out32 = run(&kernels::group_norm_cl_masked_bwd(b, t, c, eps, DType::F32), &[x.clone(), w.clone(), mask.clone(), g.clone(), vec![f32::NAN; n + sums]])[4].clone();
            let outh = run_bufs(&kernels::group_norm_cl_masked_bwd(b, t, c, eps, dtype), &[bits(&x), bits(&w), bits(&mask), bits(&g), empty(kernels::packed_len(n, sums, dtype))])[4].clone();
            let (dx, tail) = split(&outh, n, sums);
            assert_eq!(dx, bits(&out32[..n]), "{what} masked: dx");
            same_bits(&tail, &out32[n..], &format!("{what} masked"));
        }
    }
}

/// The attention's probabilities from padded scores (`kl_attn_softmax`): softmax(scale s + kb)
/// over the first d of each row of ld, with and without a key bias (some keys hidden by a large
/// negative bias, each clip its own), exactly 0 in the padding, against f64; the bf16 / f16
/// instances bit for bit the f32 kernel's output rounded. Rows under and over a block.
#[test]
fn attention_softmax_over_padded_keys_matches_f64() {
    for &(clips, rows_per_clip, d, ld) in &[(2usize, 6usize, 7usize, 8usize), (3, 4, 499, 504), (1, 3, 256, 256)] {
        let rows = clips * rows_per_clip;
        let seed = 1900 + d as u64;
        let s: Vec<f32> = normal(rows * ld, seed, 3.0, 0.5);
        let mut kb: Vec<f32> = normal(clips * d, seed + 1, 0.5, 0.0);
        // The last keys of clip 0 hidden, as the model's key bias hides padded frames.
        for v in kb.iter_mut().take(d).skip(d - d / 3) {
            *v = -1e4;
        }
        let scale = 0.125;
        for biased in [false, true] {
            let what = format!("[{rows}, {ld}] of {d} keys, key bias {biased}");
            let mut want = vec![0.0f64; rows * ld];
            for r in 0..rows {
                let y: Vec<f64> = (0..d).map(|j| scale * s[r * ld + j] as f64 + if biased { kb[(r / rows_per_clip) * d + j] as f64 } else { 0.0 }).collect();
                let m = y.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = y.iter().map(|v| (v - m).exp()).sum();
                for j in 0..d {
                    want[r * ld + j] = (y[j] - m).exp() / z;
                }
            }
            let plan = kernels::attn_softmax(rows, ld, d, rows_per_clip, scale, biased, DType::F32);
            let mut bufs = vec![s.clone()];
            if biased {
                bufs.push(kb.clone());
            }
            bufs.push(vec![f32::NAN; rows * ld]);
            let out = run(&plan, &bufs);
            let p = out.last().unwrap();
            let e = rel_err(p, &want);
            assert!(e < 1e-6, "{what}: {e}");
            assert!((0..rows).all(|r| p[r * ld + d..(r + 1) * ld].iter().all(|&v| v.to_bits() == 0)), "{what}: the padding is +0");
            for dtype in [DType::BF16, DType::F16] {
                let round = common::round_to(dtype);
                let bits = |v: &[f32]| half_buf(dtype, v);
                // Representable inputs (f16 holds -1e4), the f32 kernel on the same values.
                let sh: Vec<f32> = s.iter().map(|&v| round(v)).collect();
                let kh: Vec<f32> = kb.iter().map(|&v| round(v)).collect();
                let mut b32 = vec![sh.clone()];
                let mut bh = vec![bits(&sh)];
                if biased {
                    b32.push(kh.clone());
                    bh.push(bits(&kh));
                }
                b32.push(vec![f32::NAN; rows * ld]);
                bh.push(bits(&vec![f32::NAN; rows * ld]));
                let p32 = run(&plan, &b32).pop().unwrap();
                let ph = run_bufs(&kernels::attn_softmax(rows, ld, d, rows_per_clip, scale, biased, dtype), &bh).pop().unwrap();
                assert_eq!(ph, bits(&p32), "{what} in {dtype:?}");
            }
        }
    }
}

/// `kl_col2im` (a strided convolution's column gradient added back onto its input frames, in
/// one pass) gives `ops::conv_gemm::col2im_phases`' f32 values bit for bit (the same sums in
/// the same order), and in bf16 / f16 the f32 kernel's output on the same values rounded once:
/// wav2vec2's feature-encoder geometries (K 10 stride 5, K 3 stride 2, K 2 stride 2, frames
/// left over that no tap reads), padding, fewer output frames than the input holds, channels
/// under and over a warp, more rows than one launch's warps.
#[test]
fn col2im_is_the_phase_sum_bit_for_bit() {
    let full = |l: usize, k: usize, s: usize, p: usize| (l + 2 * p - k) / s + 1;
    for &(n, l, k, s, p, c, short) in &[
        (2usize, 101usize, 10usize, 5usize, 0usize, 7usize, 0usize),
        (3, 64, 3, 2, 0, 40, 0),
        (2, 37, 2, 2, 0, 33, 0),
        (2, 30, 3, 2, 1, 5, 0),
        (1, 50, 3, 2, 0, 16, 4),
        (2, 20_001, 3, 2, 0, 3, 0),
    ] {
        let t = full(l, k, s, p) - short;
        let what = format!("[{n}, {t}, {k}, {c}] -> {l} frames, stride {s}, padding {p}");
        let dcols = normal(n * t * k * c, 2000 + (l + k + c) as u64, 1.0, 0.0);
        let dt = Tensor::from_vec(dcols.clone(), (n, t, k, c), &Device::Cpu).unwrap();
        let want: Vec<f32> = klspeech::ops::conv_gemm::col2im_phases(&dt, (l, s, p)).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let got = run(&kernels::col2im(n, l, t, k, c, s, p, DType::F32), &[dcols.clone(), vec![f32::NAN; n * l * c]])[1].clone();
        assert_eq!(got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{what}");
        for dtype in [DType::BF16, DType::F16] {
            let round = common::round_to(dtype);
            let bits = |v: &[f32]| half_buf(dtype, v);
            let dh: Vec<f32> = dcols.iter().map(|&v| round(v)).collect();
            let g32 = run(&kernels::col2im(n, l, t, k, c, s, p, DType::F32), &[dh.clone(), vec![f32::NAN; n * l * c]])[1].clone();
            let gh = run_bufs(&kernels::col2im(n, l, t, k, c, s, p, dtype), &[bits(&dh), bits(&vec![f32::NAN; n * l * c])])[1].clone();
            assert_eq!(gh, bits(&g32), "{what} in {dtype:?}");
        }
    }
}

/// `kl_copy_rows` (a strided view whose last axis is contiguous, copied out row by row) gives
/// candle's `contiguous()` bit for bit, in f32, bf16 and f16: the attention's head split
/// ([B, T, 3, nh, hd] -> [3, B, nh, T, hd]) and merge, a narrowed view (start offset and
/// padded rows), the grouped convolution's group-major block, rows shorter than a warp, more
/// rows than one launch's warps; and with `pad` zero rows after the second-to-last axis
/// (the attention's padded keys) `contiguous()` then `pad_with_zeros`, the padding +0 exactly
/// (the output buffer starts as NaN).
#[test]
fn copy_rows_is_candles_contiguous_copy() {
    type View = Box<dyn Fn(&Tensor) -> Tensor>;
    let cases: Vec<(Vec<usize>, View)> = vec![
        (vec![2, 7, 3, 4, 16], Box::new(|x| x.permute((2, 0, 3, 1, 4)).unwrap())),
        (vec![2, 4, 7, 16], Box::new(|x| x.transpose(1, 2).unwrap())),
        (vec![3, 2, 4, 8, 5], Box::new(|x| x.narrow(3, 1, 6).unwrap().narrow(0, 1, 2).unwrap().permute((0, 2, 1, 3, 4)).unwrap())),
        (vec![3, 9, 4, 48], Box::new(|x| x.permute((2, 0, 1, 3)).unwrap())),
        (vec![40_000, 2, 3], Box::new(|x| x.transpose(0, 1).unwrap())),
    ];
    for (shape, view) in cases {
        let n: usize = shape.iter().product();
        let data = normal(n, 2100 + n as u64, 1.0, 0.0);
        let base = Tensor::from_vec(data.clone(), shape.as_slice(), &Device::Cpu).unwrap();
        let v = view(&base);
        let (dims, strides, start) = (v.dims().to_vec(), v.stride().to_vec(), v.layout().start_offset());
        // (A view of the base's storage: candle copies on some ops, `get` of a view among them.)
        assert!(!v.is_contiguous() && strides.last() == Some(&1));
        let r = dims.len() - 1;
        for pad in [0, 1, 5] {
            let want = v.contiguous().unwrap().pad_with_zeros(r - 1, 0, pad).unwrap();
            let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
            let what = format!("view {dims:?} / {strides:?} at {start} of {shape:?}, {pad} zero rows");
            let plan = if pad == 0 { kernels::copy_rows(dims[r], &dims[..r], &strides[..r], DType::F32) } else { kernels::copy_rows_padded(dims[r], &dims[..r], &strides[..r], pad, DType::F32) };
            let got = run(&plan, &[data[start..].to_vec(), vec![f32::NAN; want.len()]])[1].clone();
            assert_eq!(got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{what}");
            for dtype in [DType::BF16, DType::F16] {
                let plan = kernels::copy_rows_padded(dims[r], &dims[..r], &strides[..r], pad, dtype);
                let got = run_bufs(&plan, &[half_buf(dtype, &data[start..]), half_empty(dtype, want.len())])[1].clone();
                assert_eq!(got, half_buf(dtype, &want), "{what} in {dtype:?}");
            }
        }
    }
}

/// `kl_cat3` (three buffers one after another: the attention's packed q / k / v weights and
/// biases) is `Tensor::cat` bit for bit in f32, bf16 and f16 (the output starts as NaN):
/// small and uneven parts, and more elements than one launch's threads (grid-stride).
#[test]
fn cat3_is_candles_concatenation() {
    for &(na, nb, nc) in &[(5, 7, 3), (1, 1, 40), (400_000, 500_000, 300_000)] {
        let parts = [normal(na, 3400, 1.0, 0.0), normal(nb, 3401, 1.0, 0.0), normal(nc, 3402, 1.0, 0.0)];
        let t: Vec<Tensor> = parts.iter().map(|p| Tensor::from_vec(p.clone(), p.len(), &Device::Cpu).unwrap()).collect();
        let want: Vec<f32> = Tensor::cat(&t, 0).unwrap().to_vec1().unwrap();
        let got = run(&kernels::cat3(na, nb, nc, DType::F32), &[parts[0].clone(), parts[1].clone(), parts[2].clone(), vec![f32::NAN; want.len()]])[3].clone();
        assert_eq!(got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{na} + {nb} + {nc}");
        for dtype in [DType::BF16, DType::F16] {
            let bufs = [half_buf(dtype, &parts[0]), half_buf(dtype, &parts[1]), half_buf(dtype, &parts[2]), half_empty(dtype, want.len())];
            let got = run_bufs(&kernels::cat3(na, nb, nc, dtype), &bufs)[3].clone();
            assert_eq!(got, half_buf(dtype, &want), "{na} + {nb} + {nc} in {dtype:?}");
        }
    }
}

/// `kl_merge_qkv` (the attention backward's three head gradients into the packed projection's
/// layout, each head's padded key rows of dk and dv dropped) is the stack and transposed copy
/// it replaces, bit for bit in f32, bf16 and f16 (the output starts as NaN): padded and
/// unpadded keys, heads wider than a warp.
#[test]
fn merge_qkv_is_the_stack_and_transposed_copy() {
    for &(b, t, nh, hd, pad) in &[(2, 7, 3, 16, 1), (1, 5, 2, 40, 0), (3, 13, 4, 8, 3)] {
        let tk = t + pad;
        let dq = normal(b * nh * t * hd, 3100 + t as u64, 1.0, 0.0);
        let dk = normal(b * nh * tk * hd, 3200 + t as u64, 1.0, 0.0);
        let dv = normal(b * nh * tk * hd, 3300 + t as u64, 1.0, 0.0);
        let q = Tensor::from_vec(dq.clone(), (b, nh, t, hd), &Device::Cpu).unwrap();
        let k = Tensor::from_vec(dk.clone(), (b, nh, tk, hd), &Device::Cpu).unwrap();
        let v = Tensor::from_vec(dv.clone(), (b, nh, tk, hd), &Device::Cpu).unwrap();
        let stacked = Tensor::stack(&[q, k.narrow(2, 0, t).unwrap(), v.narrow(2, 0, t).unwrap()], 0).unwrap();
        let want: Vec<f32> = stacked.permute((1, 3, 0, 2, 4)).unwrap().contiguous().unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let what = format!("b {b}, t {t}, {nh} heads of {hd}, {pad} padded keys");
        let got = run(&kernels::merge_qkv(b, t, nh, hd, tk, DType::F32), &[dq.clone(), dk.clone(), dv.clone(), vec![f32::NAN; want.len()]])[3].clone();
        assert_eq!(got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{what}");
        for dtype in [DType::BF16, DType::F16] {
            let bufs = [half_buf(dtype, &dq), half_buf(dtype, &dk), half_buf(dtype, &dv), half_empty(dtype, want.len())];
            let got = run_bufs(&kernels::merge_qkv(b, t, nh, hd, tk, dtype), &bufs)[3].clone();
            assert_eq!(got, half_buf(dtype, &want), "{what} in {dtype:?}");
        }
    }
}

/// `kl_adam_step` (AdamW's moments and update in one pass) is, bit for bit, `kl_adam_moments`
/// then `kl_adam_apply` (themselves checked against the CPU's update and an independent
/// half-type reference above): f32, bf16 and f16, with and without weight decay, three steps
/// from zero moments, gradients with zeros of both signs.
#[test]
fn fused_adamw_step_is_the_two_kernels_in_turn() {
    let n = 5_003;
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let buf = |v: &[f32]| if dtype == DType::F32 { Buf::F32(v.to_vec()) } else { half_buf(dtype, v) };
        for decay in [None, Some(1.0 - 1e-3 * 0.01)] {
            let (mut theta2, mut mv2) = (buf(&normal(n, 2201, 0.5, 0.0)), buf(&vec![0f32; 2 * n]));
            let (mut theta1, mut mv1) = (theta2.clone(), mv2.clone());
            for t in 1..=3 {
                let mut g = normal(n, 2210 + t as u64, 0.1, 0.0);
                g[0] = 0.0;
                g[1] = -0.0;
                let (g, p) = (buf(&g), common::adamw_scalars(t, decay));
                mv2 = run_bufs(&kernels::adam_moments(n, &p, dtype), &[mv2, g.clone()])[0].clone();
                theta2 = run_bufs(&kernels::adam_apply(n, &p, dtype), &[theta2, mv2.clone()])[0].clone();
                let out = run_bufs(&kernels::adam_step(n, &p, dtype), &[theta1, mv1, g]);
                (theta1, mv1) = (out[0].clone(), out[1].clone());
                assert_eq!(mv1, mv2, "moments at step {t}, {dtype:?}, decay {decay:?}");
                assert_eq!(theta1, theta2, "parameters at step {t}, {dtype:?}, decay {decay:?}");
            }
        }
    }
}

/// `kl_adam_step_scaled` (the step with gradient clipping's coefficient read with the
/// gradient) is, bit for bit, candle's `g.affine(s, 0.)` in the type then `kl_adam_step`: f32,
/// bf16 and f16, with and without weight decay, three steps, scales below 1 that bf16 / f16
/// round (the plan passes the scale as the affine rounds it from f64), gradients with zeros
/// of both signs and a product that underflows.
#[test]
fn scaled_adamw_step_is_the_affine_then_the_step() {
    let n = 4_097;
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let buf = |v: &[f32]| if dtype == DType::F32 { Buf::F32(v.to_vec()) } else { half_buf(dtype, v) };
        for decay in [None, Some(1.0 - 1e-3 * 0.01)] {
            let (mut theta2, mut mv2) = (buf(&normal(n, 2301, 0.5, 0.0)), buf(&vec![0f32; 2 * n]));
            let (mut theta1, mut mv1) = (theta2.clone(), mv2.clone());
            for (t, scale) in [(1i32, 0.3137254901960784f64), (2, 0.012345678901), (3, 0.999)] {
                let mut g = normal(n, 2310 + t as u64, 0.1, 0.0);
                g[0] = 0.0;
                g[1] = -0.0;
                g[2] = -1e-38;
                let g = Tensor::from_vec(g, n, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
                // The gradient as candle's affine stores it, as bits of the type.
                let affine = g.affine(scale, 0.0).unwrap();
                let bits = |t: &Tensor| match dtype {
                    DType::F32 => Buf::F32(t.to_vec1::<f32>().unwrap()),
                    DType::BF16 => Buf::Bf16(t.to_vec1::<half::bf16>().unwrap().iter().map(|v| v.to_bits()).collect()),
                    _ => Buf::F16(t.to_vec1::<half::f16>().unwrap().iter().map(|v| v.to_bits()).collect()),
                };
                let p = common::adamw_scalars(t, decay);
                let out = run_bufs(&kernels::adam_step(n, &p, dtype), &[theta2, mv2, bits(&affine)]);
                (theta2, mv2) = (out[0].clone(), out[1].clone());
                let scaled = klspeech::ops::AdamWScalars { grad_scale: Some(scale), ..p };
                let plan = kernels::adam_step(n, &scaled, dtype);
                assert!(plan.name.starts_with("kl_adam_step_scaled"), "{}", plan.name);
                let out = run_bufs(&plan, &[theta1, mv1, bits(&g)]);
                (theta1, mv1) = (out[0].clone(), out[1].clone());
                // (Not assert_eq: a failure would print 12 000 values.)
                assert!(mv1 == mv2, "moments differ at step {t} (scale {scale}), {dtype:?}, decay {decay:?}");
                assert!(theta1 == theta2, "parameters differ at step {t} (scale {scale}), {dtype:?}, decay {decay:?}");
                assert!(out[2] == bits(&g), "the gradient is read only");
            }
        }
    }
}

/// Inference through wav2vec2-base's first feature-encoder layer in one kernel
/// (`kl_conv1_group_norm_gelu`): bit for bit the GroupNorm + GELU kernel (checked against f64
/// above) on the convolution's values as the separate conv stores them (the f32 fused
/// multiply-add sum in tap order, rounded to the type), in f32, bf16 and f16; and in f32
/// within 2e-5 of candle's f64 conv1d, GroupNorm and GELU. Shapes: wav2vec2's K 10 / stride 5
/// with fewer channels than a 32-channel tile, a K 3 / stride 2 layer over two tiles (idle
/// threads), the most taps with one frame (x̂ = 0), one tap on clips with a mean 100 times
/// their spread, and 499 frames (each time lane several).
#[test]
fn conv1_group_norm_gelu_is_the_convolution_then_the_group_norm_kernel() {
    let eps = 1e-5;
    let k_max = kernels::CONV1_MAX_K;
    for (case, &(b, l, c, k, stride, shift)) in [(2usize, 203usize, 16usize, 10usize, 5usize, 0.0f32), (3, 150, 40, 3, 2, 0.5), (1, k_max, 7, k_max, 1, 0.0), (2, 400, 33, 1, 1, 100.0), (1, 2500, 64, 10, 5, 0.0)].iter().enumerate() {
        let t = (l - k) / stride + 1;
        let n = b * t * c;
        let seed = 2100 + 10 * case as u64;
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let what = format!("x [{b}, {l}], w [{c}, {k}], stride {stride} in {dtype:?}");
            let round = common::round_to(dtype);
            let of = |v: Vec<f32>| v.into_iter().map(&round).collect::<Vec<f32>>();
            let x = of(normal(b * l, seed, 1.5, shift));
            let w = of(normal(c * k, seed + 1, 0.4, 0.0));
            let p = of([normal(c, seed + 2, 0.3, 1.0), normal(c, seed + 3, 0.2, 0.0)].concat());
            // The convolution as its own op stores it: [b, t, c].
            let mut conv = vec![0f32; n];
            for bi in 0..b {
                for i in 0..t {
                    for j in 0..c {
                        let s = (0..k).fold(0f32, |s, kk| w[j * k + kk].mul_add(x[bi * l + i * stride + kk], s));
                        conv[(bi * t + i) * c + j] = round(s);
                    }
                }
            }
            let buf = |v: &[f32]| if dtype == DType::F32 { Buf::F32(v.to_vec()) } else { half_buf(dtype, v) };
            let empty = if dtype == DType::F32 { Buf::F32(vec![f32::NAN; n]) } else { half_empty(dtype, n) };
            let got = run_bufs(&kernels::conv1_group_norm_gelu(b, l, t, c, k, stride, eps, dtype), &[buf(&x), buf(&w), buf(&p), empty.clone()]);
            let want = run_bufs(&kernels::group_norm_cl_fwd(b, t, c, eps, true, dtype), &[buf(&conv), buf(&p[..c]), buf(&p[c..]), empty]);
            let bits = |v: &Buf| -> Vec<u32> {
                match v {
                    Buf::F32(v) => v.iter().map(|x| x.to_bits()).collect(),
                    Buf::Bf16(v) | Buf::F16(v) => v.iter().map(|&x| x as u32).collect(),
                }
            };
            let (g, e) = (bits(&got[3]), bits(&want[3]));
            let diff = g.iter().zip(&e).position(|(a, b)| a != b);
            assert!(diff.is_none(), "{what}: value {} has bits {:#x} where the conv, then the GroupNorm kernel give {:#x}", diff.unwrap(), g[diff.unwrap()], e[diff.unwrap()]);
            assert_eq!((&got[0], &got[1], &got[2]), (&buf(&x), &buf(&w), &buf(&p)), "{what}: inputs left as they were");
            if dtype == DType::F32 {
                let f64_t = |v: &[f32], shape: &[usize]| Tensor::from_vec(v.iter().map(|&v| v as f64).collect::<Vec<_>>(), shape, &Device::Cpu).unwrap();
                let y = f64_t(&x, &[b, 1, l]).conv1d(&f64_t(&w, &[c, 1, k]), 0, stride, 1, 1).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
                let y = klspeech::ops::group_norm_cl_composite(&y, &f64_t(&p[..c], &[c]), &f64_t(&p[c..], &[c]), eps).unwrap().gelu_erf().unwrap();
                let Buf::F32(v) = &got[3] else { unreachable!() };
                let e = rel_err(v, &as_f64(&y));
                assert!(e < 2e-5, "{what}: {e} of f64");
            }
        }
    }
}

/// The training step's gradient probe (`kl_sum_sq_partial`): each block's partial is the f64
/// sum of the squares of its grid-stride values, stored as f32 (within 6e-8 of the f64 sum
/// over the same indices), in f32, bf16 and f16; the partials' f64 sum within 1e-7 of the f64
/// sum of all squares; a NaN or an infinity reaches the partial of its block and no other.
/// Sizes: one value, under a block, several blocks, and more than the 256-block grid holds
/// (grid-stride).
#[test]
fn sum_sq_partials_are_each_blocks_f64_sum() {
    for (case, &n) in [1usize, 255, 3 * 4096 + 7, 1_200_001].iter().enumerate() {
        let seed = 2300 + case as u64;
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let round = common::round_to(dtype);
            let plan = kernels::sum_sq_partial(n, dtype);
            let blocks = plan.grid as usize;
            assert_eq!(blocks, kernels::sum_sq_blocks(n));
            // (The grid-stride size without poison: 256 blocks of 256 emulated threads a run.)
            let poisons: &[Option<f32>] = if n > 1_000_000 { &[None] } else { &[None, Some(f32::NAN), Some(f32::INFINITY)] };
            for &poison in poisons {
                let what = format!("n {n} in {dtype:?}, poison {poison:?}");
                let mut g: Vec<f32> = normal(n, seed, 3.0, 0.2).into_iter().map(&round).collect();
                let at = n / 2;
                if let Some(p) = poison {
                    g[at] = p;
                }
                let gbuf = if dtype == DType::F32 { Buf::F32(g.clone()) } else { half_buf(dtype, &g) };
                let out = run_bufs(&plan, &[Buf::F32(vec![f32::NAN; blocks]), gbuf]);
                let Buf::F32(partial) = &out[0] else { panic!("{what}: partials not f32") };
                // Block b's values: b * 256 + thread, then every 256 * blocks on.
                let mut want = vec![0f64; blocks];
                for (i, &v) in g.iter().enumerate() {
                    want[(i / 256) % blocks] += v as f64 * v as f64;
                }
                let poisoned = (at / 256) % blocks;
                for (b, (&p, &w)) in partial.iter().zip(&want).enumerate() {
                    if poison.is_some() && b == poisoned {
                        assert!(!p.is_finite(), "{what}: block {b} gives {p}, its values hold {poison:?}");
                    } else {
                        assert!(((p as f64) - w).abs() <= 6e-8 * w, "{what}: block {b} gives {p} for the f64 sum {w}");
                    }
                }
                if poison.is_none() {
                    let (got, all): (f64, f64) = (partial.iter().map(|&p| p as f64).sum(), g.iter().map(|&v| v as f64 * v as f64).sum());
                    assert!((got - all).abs() <= 1e-7 * all, "{what}: partials add to {got}, the squares to {all}");
                }
            }
        }
    }
}
