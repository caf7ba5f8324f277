//! Small building blocks: linear layers, activations, 1-D convolutions with weight norm.

use candle_core::Tensor;

use super::params::{Init, Vb};
use crate::error::{Error, Result};

/// `y = x W^T + b` over the last dimension, computed as one 2-D gemm ([`crate::ops::linear`]).
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
        // One gemm from the bias rows; the weight gradient comes out in [out, in] (crate::ops).
        let y = crate::ops::linear(&x2, &self.weight, self.bias.as_ref())?;
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
/// `T = (L + 2 padding - K) / stride + 1`, differentiable: [`crate::ops::conv1d_cl`] on the
/// transposed input (the model itself keeps activations channels-last and calls that directly).
///
/// candle 0.11's own `conv1d` computes correct outputs but wrong gradients (the kernel gradient
/// always, the input gradient for stride 1; `tests/conv.rs` checks ours against finite
/// differences), so every trained convolution goes through `crate::ops::conv1d_cl`.
pub fn conv1d(x: &Tensor, w: &Tensor, stride: usize, padding: usize, groups: usize) -> Result<Tensor> {
    Ok(crate::ops::conv1d_cl(&x.transpose(1, 2)?, w, stride, padding, groups, None)?.transpose(1, 2)?)
}

/// Channels-last convolution x [B, L, C_in] -> [B, T, C_out] (at most `max_t` frames); with
/// `grad == false` nothing is recorded for a backward pass, so off the CPU candle's faster
/// `conv1d` kernel runs.
pub fn conv1d_channels_last(x: &Tensor, w: &Tensor, stride: usize, padding: usize, groups: usize, max_t: Option<usize>, grad: bool) -> Result<Tensor> {
    if grad {
        crate::ops::conv1d_cl(x, w, stride, padding, groups, max_t)
    } else {
        crate::ops::conv1d_cl(&x.detach(), &w.detach(), stride, padding, groups, max_t)
    }
}
