//! Small building blocks: linear layers, activations, 1-D convolutions with weight norm.

use std::sync::Mutex;

use candle_core::Tensor;

use super::params::{Init, Vb};
use super::ForwardCtx;
use crate::error::{Error, Result};

/// `y = x W^T + b` over the last dimension, computed as one 2-D gemm ([`crate::ops::linear`]).
///
/// In inference on the CPU the layer keeps W^T [in, out] beside W (built on first use, rebuilt
/// when W's [`super::params::parameter_version`] moves, dropped by the next forward that takes
/// a gradient): gemm then packs the weight with contiguous copies instead of a transposing
/// gather (about 1.3x on wav2vec2-base's layers), for the memory of one more copy of the
/// weights while inference runs.
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// (W's parameter version, W^T) for inference.
    transposed: Mutex<Option<((u64, u64), Tensor)>>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear { weight, bias, transposed: Mutex::new(None) }
    }

    /// Loads `weight` [out, in] and `bias` [out] (a checkpoint must hold them).
    pub fn load(vb: &Vb, d_in: usize, d_out: usize, bias: bool) -> Result<Self> {
        // PyTorch's nn.Linear init: U(-1/sqrt(in), 1/sqrt(in)).
        let bound = 1.0 / (d_in as f64).sqrt();
        let weight = vb.get(&[d_out, d_in], "weight", Init::Uniform(bound))?;
        let bias = if bias { Some(vb.get(&[d_out], "bias", Init::Uniform(bound))?) } else { None };
        Ok(Linear::new(weight, bias))
    }

    /// A head layer: taken from the checkpoint when present, else freshly initialized.
    pub fn load_or_init(vb: &Vb, d_in: usize, d_out: usize) -> Result<Self> {
        let bound = 1.0 / (d_in as f64).sqrt();
        let weight = vb.get_or_init(&[d_out, d_in], "weight", Init::Uniform(bound))?;
        let bias = Some(vb.get_or_init(&[d_out], "bias", Init::Uniform(bound))?);
        Ok(Linear::new(weight, bias))
    }

    /// x [..., in] -> [..., out].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, |x2| crate::ops::linear(x2, &self.weight, self.bias.as_ref()))
    }

    /// [`Self::forward`] in a pass with context: without a gradient (on the CPU) through the
    /// cached W^T; with one, the differentiable op (and the cache is released).
    pub fn forward_ctx(&self, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        if ctx.grad {
            self.release();
            return self.forward(x);
        }
        if !crate::ops::fused_applies(&self.weight) {
            // Off the CPU with no gradient: candle's matmul, nothing recorded for a backward.
            self.release();
            let (w, b) = (self.weight.detach(), self.bias.as_ref().map(Tensor::detach));
            return self.apply(&x.detach(), |x2| crate::ops::linear(x2, &w, b.as_ref()));
        }
        let wt = self.transposed_weight()?;
        self.apply(x, |x2| crate::ops::linear_transposed(x2, &wt, self.bias.as_ref()))
    }

    /// `act(self.forward_ctx(x, ctx))`; off the CPU's fused path without a gradient, with the
    /// erf GELU and a bias, the bias and the GELU in one pass (`ops::linear_gelu_infer`).
    pub fn forward_ctx_act(&self, x: &Tensor, ctx: &ForwardCtx, act: Activation) -> Result<Tensor> {
        if let (false, Activation::GeluErf, Some(b)) = (ctx.grad, act, self.bias.as_ref()) {
            if !crate::ops::fused_applies(&self.weight) && b.dtype() == self.weight.dtype() {
                self.release();
                return self.apply(&x.detach(), |x2| crate::ops::linear_gelu_infer(x2, &self.weight, b));
            }
        }
        act.forward(&self.forward_ctx(x, ctx)?)
    }

    /// x W^T without the bias and without a gradient, for inference off the CPU's fused path
    /// (candle's matmul): the bias is added by the next op (`ops::residual_layer_norm_infer`).
    pub fn product_infer(&self, x: &Tensor) -> Result<Tensor> {
        self.release();
        let w = self.weight.detach();
        self.apply(&x.detach(), |x2| crate::ops::linear(x2, &w, None))
    }

    /// W^T [in, out] for W's current values (cached).
    pub fn transposed_weight(&self) -> Result<Tensor> {
        let epoch = super::params::parameter_version(&[&self.weight]);
        let mut cache = self.transposed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((e, wt)) = cache.as_ref() {
            if *e == epoch {
                return Ok(wt.clone());
            }
        }
        let wt = crate::ops::transpose_weight(&self.weight)?;
        *cache = Some((epoch, wt.clone()));
        Ok(wt)
    }

    /// Drops the inference copy of the weight (training does not use it).
    pub fn release(&self) {
        let mut cache = self.transposed.lock().unwrap_or_else(|e| e.into_inner());
        *cache = None;
    }

    /// Runs `f` on x reshaped to [rows, in] and restores the leading dimensions.
    fn apply(&self, x: &Tensor, f: impl FnOnce(&Tensor) -> crate::ops::OpResult) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let d_in = *dims.last().ok_or_else(|| Error::InvalidInput("linear on a scalar".into()))?;
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let y = f(&x.reshape((rows, d_in))?)?;
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
