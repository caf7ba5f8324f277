//! The Wav2Vec2 encoder, mirroring `transformers/models/wav2vec2/modeling_wav2vec2.py`
//! (transformers 5.x): feature encoder, feature projection, positional conv embedding,
//! post-norm (`Wav2Vec2Encoder`) and pre-norm (`Wav2Vec2EncoderStableLayerNorm`) stacks.
//!
//! The struct tree is the checkpoint tree: `FeatureEncoder` loads
//! `feature_extractor.conv_layers.{i}.*`, `Encoder` loads `encoder.*`, and so on.

use std::sync::Mutex;

use candle_core::{DType, Tensor};

use super::config::Wav2Vec2Config;
use super::layers::{conv1d_channels_last, softmax_last, Activation, Linear};
use super::norm::{KlSettings, Norm, NormAxis};
use super::params::{Init, Vb};
use super::{ForwardCtx, KlSites};
use crate::error::Result;

/// Per-sample frame counts after each conv layer: `floor((L - k) / s) + 1`.
pub fn conv_lengths(cfg: &Wav2Vec2Config, samples: usize) -> Vec<usize> {
    let mut out = Vec::with_capacity(cfg.conv_kernel.len());
    let mut l = samples;
    for (&k, &s) in cfg.conv_kernel.iter().zip(&cfg.conv_stride) {
        l = if l < k { 0 } else { (l - k) / s + 1 };
        out.push(l);
    }
    out
}

/// A [B, T] 0/1 mask of `dtype` with `lengths[b]` leading ones.
pub fn length_mask(lengths: &[usize], t: usize, dtype: DType, device: &candle_core::Device) -> Result<Tensor> {
    let mut m = vec![0f32; lengths.len() * t];
    for (b, &l) in lengths.iter().enumerate() {
        m[b * t..b * t + l.min(t)].fill(1.0);
    }
    Ok(Tensor::from_vec(m, (lengths.len(), t), device)?.to_dtype(dtype)?)
}

struct ConvLayer {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    /// GroupNorm (axis Time) or LayerNorm over channels (axis LastDim, applied transposed).
    norm: Option<Norm>,
    act: Activation,
}

impl ConvLayer {
    /// x [B, L, C_in] -> [B, L', C_out], channels last (each conv is then gemm on the input
    /// in place, and LayerNorm over channels is over the last dimension).
    fn forward(&self, x: &Tensor, lengths: Option<&[usize]>, ctx: &mut ForwardCtx) -> Result<Tensor> {
        if !ctx.grad && self.bias.is_none() && self.norm.is_none() && self.act == Activation::GeluErf {
            // Inference through a plain conv layer: GELU fused into the convolution.
            return crate::ops::conv1d_cl_gelu(x, &self.weight, self.stride, 0, 1, None);
        }
        if self.bias.is_none() && self.act == Activation::GeluErf && self.weight.dim(1)? == 1 {
            // Inference through a one-channel conv + GroupNorm + GELU (wav2vec2-base's first
            // layer): one op over frame blocks in cache.
            if let Some((w, b, eps)) = self.norm.as_ref().filter(|n| n.axis() == NormAxis::Time).and_then(|n| n.plain_inference(lengths.is_some(), ctx)) {
                return crate::ops::conv1_group_norm_gelu(x, &self.weight, self.stride, w, b, eps);
            }
        }
        let mut y = conv1d_channels_last(x, &self.weight, self.stride, 0, 1, None, ctx.grad)?;
        if let Some(b) = &self.bias {
            y = crate::ops::add_bias(&y, b)?;
        }
        if let Some(norm) = &self.norm {
            let t = y.dim(1)?;
            let mask = match lengths {
                Some(l) => Some(length_mask(l, t, y.dtype(), y.device())?),
                None => None,
            };
            y = match norm_axis(norm) {
                NormAxis::Time if self.act == Activation::GeluErf => {
                    if let Some(y) = norm.forward_time_channels_last_gelu(&y, mask.as_ref(), ctx)? {
                        return Ok(y); // inference: GroupNorm and GELU in one pass
                    }
                    norm.forward_time_channels_last(&y, mask.as_ref(), ctx)?
                }
                NormAxis::Time => norm.forward_time_channels_last(&y, mask.as_ref(), ctx)?,
                NormAxis::LastDim => norm.forward(&y, mask.as_ref(), ctx)?,
            };
        }
        self.act.forward(&y)
    }
}

fn norm_axis(n: &Norm) -> NormAxis {
    n.axis()
}

/// The convolutional feature encoder (`feature_extractor`).
pub struct FeatureEncoder {
    layers: Vec<ConvLayer>,
    kernels: Vec<usize>,
    strides: Vec<usize>,
}

impl FeatureEncoder {
    fn load(cfg: &Wav2Vec2Config, vb: &Vb, kl: Option<KlSettings>) -> Result<Self> {
        let act = Activation::from_hf(&cfg.feat_extract_activation)?;
        let mut layers = Vec::new();
        let mut c_in = 1;
        for i in 0..cfg.conv_dim.len() {
            let lvb = vb.pp("conv_layers").pp(i);
            let (c_out, k) = (cfg.conv_dim[i], cfg.conv_kernel[i]);
            // PyTorch's default conv init (kaiming uniform, a = sqrt(5)): U(-1/sqrt(fan_in), ..).
            let bound = 1.0 / ((c_in * k) as f64).sqrt();
            let weight = lvb.pp("conv").get(&[c_out, c_in, k], "weight", Init::Uniform(bound))?;
            let bias = if cfg.conv_bias { Some(lvb.pp("conv").get(&[c_out], "bias", Init::Uniform(bound))?) } else { None };
            // nn.GroupNorm / nn.LayerNorm inside the conv layers use PyTorch's default eps 1e-5.
            let norm = match (cfg.feat_extract_norm.as_str(), i) {
                ("group", 0) => Some(Norm::load(&lvb.pp("layer_norm"), c_out, NormAxis::Time, 1e-5, kl)?),
                ("layer", _) => Some(Norm::load(&lvb.pp("layer_norm"), c_out, NormAxis::LastDim, 1e-5, kl)?),
                _ => None,
            };
            layers.push(ConvLayer { weight, bias, stride: cfg.conv_stride[i], norm, act });
            c_in = c_out;
        }
        Ok(FeatureEncoder { layers, kernels: cfg.conv_kernel.clone(), strides: cfg.conv_stride.clone() })
    }

    /// input_values [B, L] -> features [B, T, C] (channels last); `lengths` (samples per clip)
    /// drive the padding-aware statistics.
    pub fn forward(&self, input: &Tensor, lengths: Option<&[usize]>, ctx: &mut ForwardCtx) -> Result<Tensor> {
        let mut x = input.unsqueeze(2)?; // [B, L, 1]
        let mut lens: Option<Vec<usize>> = lengths.map(|l| l.to_vec());
        for (i, layer) in self.layers.iter().enumerate() {
            if let Some(l) = lens.as_mut() {
                for v in l.iter_mut() {
                    *v = if *v < self.kernels[i] { 0 } else { (*v - self.kernels[i]) / self.strides[i] + 1 };
                }
            }
            x = layer.forward(&x, lens.as_deref(), ctx)?;
        }
        Ok(x)
    }
}

/// `feature_projection`: LayerNorm over conv channels, then a linear map to `hidden_size`.
struct FeatureProjection {
    layer_norm: Norm,
    projection: Linear,
}

/// The positional convolution (`encoder.pos_conv_embed`) with its weight norm over `dim=2`.
struct PositionalConvEmbedding {
    weight_g: Tensor,
    weight_v: Tensor,
    bias: Tensor,
    kernel: usize,
    groups: usize,
    act: Activation,
    /// Inference: (version of g and v, g v / ||v||).
    cached: std::sync::Mutex<Option<((u64, u64), Tensor)>>,
}

impl PositionalConvEmbedding {
    fn load(cfg: &Wav2Vec2Config, vb: &Vb) -> Result<Self> {
        let (h, k, g) = (cfg.hidden_size, cfg.num_conv_pos_embeddings, cfg.num_conv_pos_embedding_groups);
        let vb = vb.pp("conv");
        let std = (2.0 / (k * h / g) as f64).sqrt();
        let weight_v = vb.get(&[h, h / g, k], "weight_v", Init::Normal(std))?;
        // A fresh weight norm starts at g = ||v|| per tap (as torch's weight_norm does); an
        // all-ones g is close enough for a fresh model and is overwritten by any checkpoint.
        let weight_g = vb.get(&[1, 1, k], "weight_g", Init::Const((std * std * (h * h / g) as f64).sqrt()))?;
        let bias = vb.get(&[h], "bias", Init::Const(0.0))?;
        Ok(PositionalConvEmbedding {
            weight_g,
            weight_v,
            bias,
            kernel: k,
            groups: g,
            act: Activation::from_hf(&cfg.feat_extract_activation)?,
            cached: std::sync::Mutex::new(None),
        })
    }

    /// The weight g v / ||v|| (||v|| over every dim except 2: [1, 1, K]).
    fn weight(&self) -> Result<Tensor> {
        crate::ops::weight_norm_last(&self.weight_v, &self.weight_g)
    }

    /// h [B, T, H] -> [B, T, H]. With a gradient the weight is recomputed from g and v on every
    /// call (both train); without, it is kept while g and v keep their values.
    fn forward(&self, h: &Tensor, grad: bool) -> Result<Tensor> {
        let mut cache = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        let w = if grad {
            *cache = None;
            self.weight()?
        } else {
            let epoch = super::params::parameter_version(&[&self.weight_g, &self.weight_v]);
            match cache.as_ref().filter(|c| c.0 == epoch) {
                Some(c) => c.1.clone(),
                None => {
                    let w = self.weight()?.detach();
                    *cache = Some((epoch, w.clone()));
                    w
                }
            }
        };
        drop(cache);
        // Channels last, padding K/2; an even kernel yields one extra frame, which
        // Wav2Vec2SamePadLayer drops: keep the first T.
        let t = h.dim(1)?;
        let y = conv1d_channels_last(h, &w, 1, self.kernel / 2, self.groups, Some(t), grad)?;
        self.act.forward(&crate::ops::add_bias(&y, &self.bias)?)
    }
}

/// The inference copy of an attention layer's q, k, v projections as one.
#[derive(Clone)]
struct PackedQkv {
    /// The parameter version of the six tensors it was built from.
    epoch: (u64, u64),
    /// [H, 3H]
    wt: Tensor,
    /// [3H]
    bias: Option<Tensor>,
}

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    /// Inference: the packed projection [q | k | v] as W^T [H, 3H] and bias [3H] (see
    /// [`Linear::forward_ctx`]), for the parameter version it was built from.
    qkv: std::sync::Mutex<Option<PackedQkv>>,
}

impl Attention {
    fn load(cfg: &Wav2Vec2Config, vb: &Vb) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Attention {
            q_proj: Linear::load(&vb.pp("q_proj"), h, h, true)?,
            k_proj: Linear::load(&vb.pp("k_proj"), h, h, true)?,
            v_proj: Linear::load(&vb.pp("v_proj"), h, h, true)?,
            out_proj: Linear::load(&vb.pp("out_proj"), h, h, true)?,
            heads: cfg.num_attention_heads,
            qkv: std::sync::Mutex::new(None),
        })
    }

    /// q, k and v as one layer: weight [3H, H], bias [3H].
    fn packed_qkv(&self) -> Result<Linear> {
        // (Off the CPU one kernel for the three: ops::kernels::concat3.)
        let w = crate::ops::kernels::concat3([&self.q_proj.weight, &self.k_proj.weight, &self.v_proj.weight])?; // [3H, H]
        Ok(Linear::new(w, self.packed_bias()?))
    }

    /// The q, k, v biases as one [3H] (when all three have one).
    fn packed_bias(&self) -> Result<Option<Tensor>> {
        Ok(match (&self.q_proj.bias, &self.k_proj.bias, &self.v_proj.bias) {
            (Some(q), Some(k), Some(v)) => Some(crate::ops::kernels::concat3([q, k, v])?),
            _ => None,
        })
    }

    /// The packed projection for inference, rebuilt when the parameters changed since.
    fn inference_qkv(&self) -> Result<PackedQkv> {
        let mut sources = vec![&self.q_proj.weight, &self.k_proj.weight, &self.v_proj.weight];
        sources.extend([&self.q_proj.bias, &self.k_proj.bias, &self.v_proj.bias].into_iter().flatten());
        let epoch = super::params::parameter_version(&sources);
        let mut cache = self.qkv.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = cache.as_ref().filter(|p| p.epoch == epoch) {
            return Ok(p.clone());
        }
        // [H, 3H] = [wq^T | wk^T | wv^T], built from the three transposed copies.
        let parts = [&self.q_proj, &self.k_proj, &self.v_proj].map(|l| l.transposed_weight());
        let parts = parts.into_iter().collect::<Result<Vec<_>>>()?;
        [&self.q_proj, &self.k_proj, &self.v_proj].iter().for_each(|l| l.release());
        let p = PackedQkv { epoch, wt: Tensor::cat(&parts, 1)?, bias: self.packed_bias()? };
        *cache = Some(p.clone());
        Ok(p)
    }

    /// Inference: the attention's output before its output projection, [B, T, H]: the packed
    /// projection (on the CPU through its cached transposed weight), then one op per (clip,
    /// head) reading it in place (ops::attention_infer); `bias` [B, 1, 1, T] is a per-key mask.
    fn context_infer(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let scale = 1.0 / ((h / self.heads) as f64).sqrt();
        let qkv = if crate::ops::fused_applies(&self.q_proj.weight) {
            let p = self.inference_qkv()?;
            crate::ops::linear_transposed(&x.reshape((b * t, h))?, &p.wt, p.bias.as_ref())?.reshape((b, t, 3 * h))?
        } else {
            // Off the CPU: no inference copies (device memory), one projection per call.
            self.packed_qkv()?.forward(x)?
        };
        let key_bias = match bias {
            Some(bias) => Some(bias.reshape((b, t))?),
            None => None,
        };
        crate::ops::attention_infer(&qkv, self.heads, scale, key_bias.as_ref())
    }

    /// Whether [`Self::forward`] runs the inference path ([`Self::context_infer`]).
    fn infers(ctx: &ForwardCtx) -> bool {
        !ctx.grad && (!ctx.train || ctx.attention_dropout <= 0.0)
    }

    /// x [B, T, H]; `bias` [B, 1, 1, T] additive key mask (0 or a huge negative).
    fn forward(&self, x: &Tensor, bias: Option<&Tensor>, ctx: &mut ForwardCtx) -> Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let hd = h / self.heads;
        let scale = 1.0 / (hd as f64).sqrt();
        if Self::infers(ctx) {
            return self.out_proj.forward_ctx(&self.context_infer(x, bias)?, ctx);
        }
        // Training: the inference copies are not needed.
        *self.qkv.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.out_proj.release();
        let heads = |y: &Tensor| -> Result<Tensor> {
            // [B, T, H] -> [B, nh, T, hd]
            Ok(y.reshape((b, t, self.heads, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let (mut scores, v) = if ctx.grad {
            // q, k, v as one projection: one gemm instead of three, and in the backward one
            // gradient into x instead of three accumulated ones.
            let qkv = self.packed_qkv()?.forward(x)?; // [B, T, 3H]
            if crate::ops::fused_applies(&qkv) || crate::ops::device_op_applies(&qkv) {
                // One op per (clip, head) forward and backward, reading the heads in place (on
                // the CPU), or one op for the layer (ops::device, elsewhere).
                let key_bias = match bias {
                    Some(bias) => Some(bias.reshape((b, t))?),
                    None => None,
                };
                let drop = ctx.dropout_key(ctx.attention_dropout);
                let o = crate::ops::attention(&qkv, self.heads, scale, key_bias.as_ref(), drop)?;
                return self.out_proj.forward(&o);
            }
            // [B, T, 3, nh, hd] -> [3, B, nh, T, hd], one copy for all three.
            let qkv = qkv.reshape((b, t, 3, self.heads, hd))?.permute((2, 0, 3, 1, 4))?.contiguous()?;
            let (q, k, v) = (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?);
            ((q.matmul(&k.transpose(2, 3)?.contiguous()?)? * scale)?, v) // scores [B, nh, T, T]
        } else {
            // Inference: no weight concatenation (a copy of 3 H^2 per call), the scale on q
            // (T hd per head instead of T^2), k^T read in place by gemm.
            let q = (heads(&self.q_proj.forward(x)?)? * scale)?;
            let k = heads(&self.k_proj.forward(x)?)?;
            (q.matmul(&k.transpose(2, 3)?)?, heads(&self.v_proj.forward(x)?)?)
        };
        if let Some(bias) = bias {
            scores = scores.broadcast_add(bias)?;
        }
        // candle's fused softmax has no backward: only when no gradient is taken.
        let probs = if ctx.grad { softmax_last(&scores)? } else { crate::ops::softmax_last_dim_infer(&scores)? };
        let p = ctx.dropout(&probs, ctx.attention_dropout)?;
        let o = p.matmul(&v)?.transpose(1, 2)?.reshape((b, t, h))?;
        self.out_proj.forward(&o)
    }
}

struct FeedForward {
    intermediate_dense: Linear,
    output_dense: Linear,
    act: Activation,
}

impl FeedForward {
    fn load(cfg: &Wav2Vec2Config, vb: &Vb) -> Result<Self> {
        Ok(FeedForward {
            intermediate_dense: Linear::load(&vb.pp("intermediate_dense"), cfg.hidden_size, cfg.intermediate_size, true)?,
            output_dense: Linear::load(&vb.pp("output_dense"), cfg.intermediate_size, cfg.hidden_size, true)?,
            act: Activation::from_hf(&cfg.hidden_act)?,
        })
    }

    fn forward(&self, x: &Tensor, ctx: &mut ForwardCtx) -> Result<Tensor> {
        let y = self.intermediate_dense.forward_ctx_act(x, ctx, self.act)?;
        let y = ctx.dropout(&y, ctx.activation_dropout)?;
        let y = self.output_dense.forward_ctx(&y, ctx)?;
        ctx.dropout(&y, ctx.hidden_dropout)
    }
}

/// One transformer layer (post-norm, or pre-norm when `stable`).
struct EncoderLayer {
    attention: Attention,
    layer_norm: Norm,
    feed_forward: FeedForward,
    final_layer_norm: Norm,
    stable: bool,
    /// Post-norm inference off the CPU: the packed parameters of its two one-pass sites.
    packed_norms: Mutex<Option<PackedNorms>>,
}

/// An [`EncoderLayer`]'s parameters packed for `ops::residual_layer_norm_infer`.
#[derive(Clone)]
struct PackedNorms {
    /// The parameter version of the six tensors they were built from.
    epoch: (u64, u64),
    /// [out_proj bias; layer_norm weight; layer_norm bias]
    attention: Tensor,
    /// [output_dense bias; final_layer_norm weight; final_layer_norm bias]
    feed_forward: Tensor,
}

impl EncoderLayer {
    fn forward(&self, x: &Tensor, bias: Option<&Tensor>, mask: Option<&Tensor>, ctx: &mut ForwardCtx) -> Result<Tensor> {
        if self.stable {
            // Wav2Vec2EncoderLayerStableLayerNorm
            let h = self.layer_norm.forward(x, mask, ctx)?;
            let h = self.attention.forward(&h, bias, ctx)?;
            let x = (x + ctx.dropout(&h, ctx.hidden_dropout)?)?;
            let f = self.feed_forward.forward(&self.final_layer_norm.forward(&x, mask, ctx)?, ctx)?;
            Ok((x + f)?)
        } else {
            // Wav2Vec2EncoderLayer
            if let Some(y) = self.post_norm_infer(x, bias, ctx)? {
                return Ok(y);
            }
            let h = self.attention.forward(x, bias, ctx)?;
            let x = (x + ctx.dropout(&h, ctx.hidden_dropout)?)?;
            let x = self.layer_norm.forward(&x, mask, ctx)?;
            let x = (&x + self.feed_forward.forward(&x, ctx)?)?;
            self.final_layer_norm.forward(&x, mask, ctx)
        }
    }
}

impl EncoderLayer {
    /// The post-norm layer in inference off the CPU's fused path (`ops::residual_layer_norm_applies`:
    /// on a GPU): each output projection without its bias, then its bias, the residual and the
    /// LayerNorm in one pass (`ops::residual_layer_norm_infer`), where the bias add, the
    /// residual add and the LayerNorm were three. `None` where that does not apply (training,
    /// dropout, KL-Norm sampling, no bias, the CPU).
    fn post_norm_infer(&self, x: &Tensor, bias: Option<&Tensor>, ctx: &mut ForwardCtx) -> Result<Option<Tensor>> {
        let (out, ff_out) = (&self.attention.out_proj, &self.feed_forward.output_dense);
        let (Some(ob), Some(fb)) = (out.bias.as_ref(), ff_out.bias.as_ref()) else { return Ok(None) };
        let plain = ctx.train && (ctx.hidden_dropout > 0.0 || ctx.activation_dropout > 0.0);
        if plain || !Attention::infers(ctx) || !crate::ops::residual_layer_norm_applies(x) {
            return Ok(None);
        }
        let (Some((w1, b1, eps1)), Some((w2, b2, eps2))) = (self.layer_norm.last_dim_inference(x, ctx), self.final_layer_norm.last_dim_inference(x, ctx)) else {
            return Ok(None);
        };
        // The packed parameters, rebuilt when any of the six changed since (a training run's
        // validation passes).
        let epoch = super::params::parameter_version(&[ob, w1, b1, fb, w2, b2]);
        let p = {
            let mut cache = self.packed_norms.lock().unwrap_or_else(|e| e.into_inner());
            match cache.as_ref().filter(|c| c.epoch == epoch) {
                Some(p) => p.clone(),
                None => {
                    let p = PackedNorms {
                        epoch,
                        attention: crate::ops::pack_residual_layer_norm(ob, w1, b1)?,
                        feed_forward: crate::ops::pack_residual_layer_norm(fb, w2, b2)?,
                    };
                    *cache = Some(p.clone());
                    p
                }
            }
        };
        let h = crate::ops::residual_layer_norm_infer(&out.product_infer(&self.attention.context_infer(x, bias)?)?, x, &p.attention, eps1)?;
        let f = self.feed_forward.intermediate_dense.forward_ctx_act(&h, ctx, self.feed_forward.act)?;
        Ok(Some(crate::ops::residual_layer_norm_infer(&ff_out.product_infer(&f)?, &h, &p.feed_forward, eps2)?))
    }
}

/// The transformer encoder with its positional conv.
struct Encoder {
    pos_conv_embed: PositionalConvEmbedding,
    layer_norm: Norm,
    layers: Vec<EncoderLayer>,
    stable: bool,
}

/// Everything the encoder computes for one batch.
pub struct EncoderOutput {
    /// [B, T, H] final hidden states (after the encoder's LayerNorm in the stable variant).
    pub last_hidden_state: Tensor,
    /// L + 1 tensors [B, T, H]: the input of each layer, then the last layer's raw output
    /// (transformers 5.x semantics).
    pub hidden_states: Vec<Tensor>,
    /// [B, T, C] layer-normed conv features (transformers' `extract_features`).
    pub extract_features: Tensor,
    /// Valid frames per clip (all `T` without lengths).
    pub frame_lengths: Vec<usize>,
    /// [B, T] 0/1 frame mask when lengths were given.
    pub frame_mask: Option<Tensor>,
}

/// The Wav2Vec2 encoder (`Wav2Vec2Model`).
pub struct Wav2Vec2Model {
    pub config: Wav2Vec2Config,
    pub feature_extractor: FeatureEncoder,
    feature_projection: FeatureProjection,
    /// Learned vector that replaces masked frames in SpecAugment (`masked_spec_embed`).
    pub masked_spec_embed: Option<Tensor>,
    encoder: Encoder,
}

impl Wav2Vec2Model {
    /// Builds the encoder under `vb` (encoder keys without the `wav2vec2.` prefix).
    pub fn load(cfg: &Wav2Vec2Config, vb: &Vb, sites: &KlSites, kl: KlSettings) -> Result<Self> {
        cfg.validate().map_err(|d| crate::Error::Unsupported { what: "this config".into(), detail: d })?;
        let n_layers = cfg.num_hidden_layers;
        let site = |layer: Option<usize>, in_conv: bool| sites.applies(layer, in_conv, n_layers).then_some(kl);
        let feature_extractor = FeatureEncoder::load(cfg, &vb.pp("feature_extractor"), site(None, true))?;
        let c = cfg.conv_out_dim();
        let fp = vb.pp("feature_projection");
        let feature_projection = FeatureProjection {
            layer_norm: Norm::load(&fp.pp("layer_norm"), c, NormAxis::LastDim, cfg.layer_norm_eps, site(None, false).filter(|_| sites.includes_projection()))?,
            projection: Linear::load(&fp.pp("projection"), c, cfg.hidden_size, true)?,
        };
        let masked_spec_embed = if vb.contains("masked_spec_embed") || vb.store().source.is_none() {
            Some(vb.get_or_init(&[cfg.hidden_size], "masked_spec_embed", Init::Uniform(1.0))?)
        } else {
            None
        };
        let evb = vb.pp("encoder");
        let h = cfg.hidden_size;
        let eps = cfg.layer_norm_eps;
        let mut layers = Vec::with_capacity(n_layers);
        for i in 0..n_layers {
            let lvb = evb.pp("layers").pp(i);
            layers.push(EncoderLayer {
                attention: Attention::load(cfg, &lvb.pp("attention"))?,
                layer_norm: Norm::load(&lvb.pp("layer_norm"), h, NormAxis::LastDim, eps, site(Some(i), false))?,
                feed_forward: FeedForward::load(cfg, &lvb.pp("feed_forward"))?,
                final_layer_norm: Norm::load(&lvb.pp("final_layer_norm"), h, NormAxis::LastDim, eps, site(Some(i), false))?,
                stable: cfg.do_stable_layer_norm,
                packed_norms: Mutex::new(None),
            });
        }
        let encoder = Encoder {
            pos_conv_embed: PositionalConvEmbedding::load(cfg, &evb.pp("pos_conv_embed"))?,
            layer_norm: Norm::load(&evb.pp("layer_norm"), h, NormAxis::LastDim, eps, site(None, false))?,
            layers,
            stable: cfg.do_stable_layer_norm,
        };
        Ok(Wav2Vec2Model { config: cfg.clone(), feature_extractor, feature_projection, masked_spec_embed, encoder })
    }

    /// Every normalization site, in forward order (name, is KL-Norm).
    pub fn norm_sites(&self) -> Vec<(String, bool)> {
        let mut v: Vec<(String, bool)> = Vec::new();
        for l in &self.feature_extractor.layers {
            if let Some(n) = &l.norm {
                v.push((n.site.clone(), n.is_kl()));
            }
        }
        v.push((self.feature_projection.layer_norm.site.clone(), self.feature_projection.layer_norm.is_kl()));
        for l in &self.encoder.layers {
            v.push((l.layer_norm.site.clone(), l.layer_norm.is_kl()));
            v.push((l.final_layer_norm.site.clone(), l.final_layer_norm.is_kl()));
        }
        v.push((self.encoder.layer_norm.site.clone(), self.encoder.layer_norm.is_kl()));
        v
    }

    /// Masks spans of valid frames with `masked_spec_embed` and spans of channels with 0.
    fn spec_augment(&self, h: &Tensor, frame_lengths: &[usize], sa: &super::SpecAugment, ctx: &mut ForwardCtx) -> Result<Tensor> {
        let (b, t, d) = h.dims3()?;
        let mut time = vec![0f32; b * t];
        let mut feat = vec![1f32; b * d];
        let mut any = false;
        for (i, &len) in frame_lengths.iter().enumerate() {
            let m = super::SpecAugment::spans(&mut ctx.rng, len.min(t), sa.mask_time_prob, sa.mask_time_length, sa.mask_time_min_masks);
            for (j, &on) in m.iter().enumerate() {
                if on {
                    time[i * t + j] = 1.0;
                    any = true;
                }
            }
            let f = super::SpecAugment::spans(&mut ctx.rng, d, sa.mask_feature_prob, sa.mask_feature_length, sa.mask_feature_min_masks);
            for (j, &on) in f.iter().enumerate() {
                if on {
                    feat[i * d + j] = 0.0;
                    any = true;
                }
            }
        }
        if !any {
            return Ok(h.clone());
        }
        let dev = h.device();
        let tm = Tensor::from_vec(time, (b, t, 1), &candle_core::Device::Cpu)?.to_dtype(h.dtype())?.to_device(dev)?;
        let fm = Tensor::from_vec(feat, (b, 1, d), &candle_core::Device::Cpu)?.to_dtype(h.dtype())?.to_device(dev)?;
        let mut out = h.clone();
        if let Some(embed) = &self.masked_spec_embed {
            // h * (1 - m) + m * embed
            let keep = tm.affine(-1.0, 1.0)?;
            out = (out.broadcast_mul(&keep)? + tm.broadcast_mul(&embed.reshape((1, 1, d))?)?)?;
        }
        Ok(out.broadcast_mul(&fm)?)
    }

    /// Conv features [B, T, C] (before projection) and frame lengths.
    pub fn extract(&self, input_values: &Tensor, lengths: Option<&[usize]>, ctx: &mut ForwardCtx) -> Result<Tensor> {
        self.feature_extractor.forward(input_values, lengths, ctx)
    }

    /// input_values [B, L] (and per-clip sample counts for a padded batch) -> encoder output.
    ///
    /// With `lengths`, frames past each clip's end are masked exactly as transformers masks
    /// them from an `attention_mask`; without, every frame is valid.
    pub fn forward(&self, input_values: &Tensor, lengths: Option<&[usize]>, ctx: &mut ForwardCtx) -> Result<EncoderOutput> {
        let feats = self.extract(input_values, lengths, ctx)?; // [B, T, C]
        self.forward_features(&feats, lengths, ctx)
    }

    /// Everything after the feature encoder, from conv features [B, T, C].
    pub fn forward_features(&self, feats: &Tensor, lengths: Option<&[usize]>, ctx: &mut ForwardCtx) -> Result<EncoderOutput> {
        let (b, t, _) = feats.dims3()?;
        let dtype = feats.dtype();
        let dev = feats.device().clone();
        let frame_lengths: Vec<usize> = match lengths {
            Some(l) => l.iter().map(|&n| self.config.frames_for_samples(n).min(t)).collect(),
            None => vec![t; b],
        };
        let frame_mask = match lengths {
            Some(_) => Some(length_mask(&frame_lengths, t, dtype, &dev)?),
            None => None,
        };
        let extract_features = self.feature_projection.layer_norm.forward(feats, frame_mask.as_ref(), ctx)?;
        let mut h = self.feature_projection.projection.forward_ctx(&extract_features, ctx)?;
        h = ctx.dropout(&h, ctx.feat_proj_dropout)?;
        if ctx.train {
            if let Some(sa) = ctx.spec_augment {
                h = self.spec_augment(&h, &frame_lengths, &sa, ctx)?;
            }
        }

        // Encoder: zero padded frames, add positional conv, (post-norm) LayerNorm.
        let bias = match &frame_mask {
            Some(m) => {
                h = h.broadcast_mul(&m.unsqueeze(2)?)?;
                // (1 - mask) * dtype_min, as transformers' _prepare_4d_attention_mask.
                let min = match dtype {
                    DType::F64 => f64::MIN,
                    DType::F16 => -65504.0,
                    _ => f64::from(f32::MIN),
                };
                Some(m.affine(-min, min)?.reshape((b, 1, 1, t))?)
            }
            None => None,
        };
        let pos = self.encoder.pos_conv_embed.forward(&h, ctx.grad)?;
        h = (h + pos)?;
        if !self.encoder.stable {
            h = self.encoder.layer_norm.forward(&h, frame_mask.as_ref(), ctx)?;
        }
        h = ctx.dropout(&h, ctx.hidden_dropout)?;
        let mut hidden_states = Vec::with_capacity(self.encoder.layers.len() + 1);
        for (i, layer) in self.encoder.layers.iter().enumerate() {
            hidden_states.push(h.clone());
            if ctx.skip_layer(i) {
                continue;
            }
            h = layer.forward(&h, bias.as_ref(), frame_mask.as_ref(), ctx)?;
        }
        hidden_states.push(h.clone());
        let last_hidden_state =
            if self.encoder.stable { self.encoder.layer_norm.forward(&h, frame_mask.as_ref(), ctx)? } else { h };
        Ok(EncoderOutput { last_hidden_state, hidden_states, extract_features, frame_lengths, frame_mask })
    }
}
