//! Small building blocks: linear layers, activations, 1-D convolutions with weight norm.

use candle_core::{Tensor, D};

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
            y = y.broadcast_add(b)?;
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
            Activation::GeluErf => x.gelu_erf()?,
            Activation::GeluTanh => x.gelu()?,
            Activation::Relu => x.relu()?,
            Activation::Silu => x.silu()?,
            Activation::Tanh => x.tanh()?,
        })
    }
}

/// Numerically safe softmax over the last dimension, differentiable (candle's fused
/// `softmax_last_dim` has no backward).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&s)?)
}
