//! Small building blocks: linear layers, activations, 1-D convolutions with weight norm.

use candle_core::Tensor;

use super::params::{Init, Vb};
use crate::error::{Error, Result};

/// `y = x W^T + b` over the last dimension, computed as one 2-D gemm.
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    /// Loads `weight` [out, in] and `bias` [out] (a checkpoint must hold them).
    pub fn load(vb: &Vb, d_in: usize, d_out: usize, bias: bool) -> Result<Self> {
        // PyTorch's nn.Linear init: U(-1/sqrt(in), 1/sqrt(in)).
        let bound = 1.0 / (d_in as f64).sqrt();
        let weight = vb.get(&[d_out, d_in], "weight", Init::Uniform(bound))?;
        let bias = if bias { Some(vb.get(&[d_out], "bias", Init::Uniform(bound))?) } else { None };
        Ok(Linear { weight, bias })
    }

    /// A head layer: taken from the checkpoint when present, else freshly initialized.
    pub fn load_or_init(vb: &Vb, d_in: usize, d_out: usize) -> Result<Self> {
        let bound = 1.0 / (d_in as f64).sqrt();
        let weight = vb.get_or_init(&[d_out, d_in], "weight", Init::Uniform(bound))?;
        let bias = Some(vb.get_or_init(&[d_out], "bias", Init::Uniform(bound))?);
        Ok(Linear { weight, bias })
    }

    /// x [..., in] -> [..., out].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let d_in = *dims.last().ok_or_else(|| Error::InvalidInput("linear on a scalar".into()))?;
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((rows, d_in))?;
        let mut y = x2.matmul(&self.weight.t()?)?;
        if let Some(b) = &self.bias {
            y = crate::ops::add_bias(&y, b)?;
        }
        let mut out = dims;
        *out.last_mut().expect("non-empty") = self.weight.dim(0)?;
        Ok(y.reshape(out)?)
    }
}

/// Activation functions by their Hugging Face names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `"gelu"`: the exact erf GELU.
    GeluErf,
    /// `"gelu_new"`, `"gelu_pytorch_tanh"`: the tanh approximation.
    GeluTanh,
    Relu,
    Silu,
    Tanh,
}

impl Activation {
    /// Parses a Hugging Face activation name.
    pub fn from_hf(name: &str) -> Result<Self> {
        Ok(match name {
            "gelu" => Activation::GeluErf,
            "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            "silu" | "swish" => Activation::Silu,
            "tanh" => Activation::Tanh,
            other => {
                return Err(Error::Unsupported { what: format!("activation `{other}`"), detail: "use gelu, gelu_new, relu, silu or tanh".into() })
            }
        })
    }

    /// Applies the activation elementwise (all have candle backward passes).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::GeluErf => crate::ops::gelu_erf(x)?,
            Activation::GeluTanh => x.gelu()?,
            Activation::Relu => x.relu()?,
            Activation::Silu => x.silu()?,
            Activation::Tanh => x.tanh()?,
        })
    }
}

/// Numerically safe softmax over the last dimension, differentiable (candle's fused
/// `softmax_last_dim` has no backward): the fused op on CPU, the composite elsewhere.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    crate::ops::softmax_last(x)
}

/// 1-D convolution x [B, C_in, L] * w [C_out, C_in / groups, K] -> [B, C_out, T] with
/// `T = (L + 2 padding - K) / stride + 1`, built from differentiable ops (im2col by strided
/// narrows, then one batched gemm per group).
///
/// candle 0.11's own `conv1d` computes correct outputs but wrong gradients (the kernel gradient
/// always, the input gradient for stride 1; `tests/conv.rs` checks ours against finite
/// differences), so every trained convolution goes through this function.
pub fn conv1d(x: &Tensor, w: &Tensor, stride: usize, padding: usize, groups: usize) -> Result<Tensor> {
    conv1d_unfold(x, w, stride, padding, groups)
}

/// [`conv1d`] when no gradient will flow through it. On the CPU, the fused im2col and one gemm
/// per group (faster than candle's conv1d, whose im2col runs on one thread); elsewhere
/// candle's own forward (correct; only its backward is wrong).
pub fn conv1d_no_grad(x: &Tensor, w: &Tensor, stride: usize, padding: usize, groups: usize) -> Result<Tensor> {
    if x.device().is_cpu() && crate::ops::enabled() {
        return conv1d_unfold(&x.detach(), &w.detach(), stride, padding, groups);
    }
    Ok(x.conv1d(w, padding, stride, 1, groups)?)
}

fn conv1d_unfold(x: &Tensor, w: &Tensor, stride: usize, padding: usize, groups: usize) -> Result<Tensor> {
    let (b, c_in, l) = x.dims3()?;
    let (c_out, c_g, k) = w.dims3()?;
    if c_in != c_g * groups || c_out % groups != 0 || stride == 0 {
        return Err(Error::InvalidInput(format!(
            "conv1d: input [{b}, {c_in}, {l}] and kernel [{c_out}, {c_g}, {k}] with {groups} groups, stride {stride}"
        )));
    }
    let lp = l + 2 * padding;
    if lp < k {
        return Err(Error::InvalidInput(format!("conv1d: input of {l} samples is shorter than the kernel ({k})")));
    }
    let t = (lp - k) / stride + 1;
    // Columns [G, B, T, C_g * K]: one parallel pass on CPU (backward: a parallel col2im).
    let cols = crate::ops::im2col1d(x, k, stride, padding, groups)?;
    let co_g = c_out / groups;
    debug_assert_eq!(cols.dims(), &[groups, b, t, c_g * k]);
    // [C_out, C_g, K] -> [G, C_g * K, C_out / G]: one gemm per group over all B * T frames, so
    // the weight gradient is one gemm too (no broadcast, no reduction over the batch).
    let wg = w.reshape((groups, co_g, c_g * k))?.transpose(1, 2)?;
    let y = cols.reshape((groups, b * t, c_g * k))?.matmul(&wg)?; // [G, B T, co_g]
    // -> [B, G, co_g, T] -> [B, C_out, T]
    Ok(y.reshape((groups, b, t, co_g))?.permute((1, 0, 3, 2))?.reshape((b, c_out, t))?)
}
