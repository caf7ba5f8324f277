//! AdamW over named [`Var`]s, learning-rate schedules, gradient clipping and accumulation.
//!
//! The math follows `torch.optim.AdamW` and the schedules follow `transformers`'
//! `get_{constant,linear,cosine}_schedule_with_warmup`, so a run configured like a Hugging Face
//! `Trainer` run takes the same steps (checked against PyTorch in `tests/optim.rs`).
//!
//! One optimizer step, as the trainer does it:
//!
//! ```no_run
//! # use klspeech::model::{LoadOptions, SpeechModel, Wav2Vec2Config};
//! # use klspeech::train::optim::*;
//! # fn micro_batch_losses() -> Vec<candle_core::Tensor> { vec![] }
//! # let model = SpeechModel::fresh(Wav2Vec2Config::default(), &LoadOptions::default())?;
//! let params = model.store.vars();
//! let mut opt = AdamW::new(params.clone(), AdamWConfig::default())?;
//! let mut acc = GradAccumulator::new();
//! let losses = micro_batch_losses(); // k micro-batches
//! let k = losses.len() as f64;
//! for loss in losses {
//!     acc.add(loss.backward()?, &params, 1.0 / k)?; // keeps only the params' grads
//! }
//! let mut grads = acc.into_grads();
//! if grads_finite(&grads, &params)? {
//!     let _norm = clip_grad_norm(&mut grads, &params, 1.0)?; // pre-clip norm, for logging
//!     opt.step(&grads, lr_factor(Schedule::Linear, opt.steps(), 10, 100))?;
//! } // else: skip the update (and count it)
//! # Ok::<(), klspeech::Error>(())
//! ```

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};
use std::str::FromStr;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

use crate::error::{Error, Result};

/// AdamW hyper-parameters. Defaults are the Hugging Face `Trainer` defaults.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    /// Peak learning rate (multiplied by the schedule's factor each step).
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay, applied to the parameters for which [`no_decay`] is false.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { lr: 1e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

/// Whether a parameter is excluded from weight decay.
///
/// The rule, on the lower-cased Hugging Face parameter name (dot-separated components):
///
/// * it contains `bias` (every bias, as the `Trainer` does);
/// * it contains `layernorm` or `rmsnorm`, or a component is `norm` or ends in `_norm`: every
///   parameter of a normalization module — `layer_norm.*` (LayerNorm, and the GroupNorm of the
///   first feature-encoder conv layer, which Hugging Face also calls `layer_norm`),
///   `final_layer_norm.*`. These are the `Trainer`'s own name patterns;
/// * a component starts with `kl_`: the KL-Norm vectors (`layer_norm.kl_a`, ...);
/// * the last component is `layer_weights` (weighted layer sum of the classification head),
///   `masked_spec_embed` (SpecAugment mask embedding) or `weight_g` (the weight-norm magnitude
///   of the positional convolution).
///
/// The last two rules go beyond the `Trainer`, which decays those three parameters: they are
/// scale/offset-like vectors that, like norm gains, should not be pulled towards zero.
pub fn no_decay(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    if name.contains("bias") || name.contains("layernorm") || name.contains("rmsnorm") {
        return true;
    }
    let mut components = name.split('.');
    let last = name.rsplit('.').next().unwrap_or("");
    if components.any(|c| c == "norm" || c.ends_with("_norm") || c.starts_with("kl_")) {
        return true;
    }
    matches!(last, "layer_weights" | "masked_spec_embed" | "weight_g")
}

/// Learning-rate schedule: linear warmup from 0, then constant, linear decay to 0, or cosine
/// decay to 0 at `total_steps`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// `get_constant_schedule_with_warmup`.
    Constant,
    /// `get_linear_schedule_with_warmup` (the `Trainer` default).
    #[default]
    Linear,
    /// `get_cosine_schedule_with_warmup` with `num_cycles = 0.5`.
    Cosine,
}

impl FromStr for Schedule {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "constant" => Ok(Schedule::Constant),
            "linear" => Ok(Schedule::Linear),
            "cosine" => Ok(Schedule::Cosine),
            other => Err(Error::InvalidInput(format!("unknown learning-rate schedule `{other}` (expected constant, linear or cosine)"))),
        }
    }
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Schedule::Constant => "constant",
            Schedule::Linear => "linear",
            Schedule::Cosine => "cosine",
        })
    }
}

/// The factor the peak learning rate is multiplied by for update number `step` (0-based: the
/// first update uses `lr_factor(.., 0, ..)`, which is 0 when `warmup_steps > 0`, exactly as a
/// `Trainer` whose `LambdaLR` is stepped after each optimizer step).
///
/// Same formulas and the same floating-point operations as `transformers`' lambdas. One
/// deliberate difference: after `total_steps` the cosine factor stays 0 (`transformers`' would
/// rise again); the linear one is 0 there in both.
pub fn lr_factor(schedule: Schedule, step: usize, warmup_steps: usize, total_steps: usize) -> f64 {
    if step < warmup_steps {
        return step as f64 / warmup_steps.max(1) as f64;
    }
    let (s, w, t) = (step as i64, warmup_steps as i64, total_steps as i64);
    match schedule {
        Schedule::Constant => 1.0,
        Schedule::Linear => f64::max(0.0, (t - s) as f64 / (t - w).max(1) as f64),
        Schedule::Cosine => {
            if s > t {
                return 0.0;
            }
            let progress = (s - w) as f64 / (t - w).max(1) as f64;
            f64::max(0.0, 0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos()))
        }
    }
}

/// One parameter and its Adam moments (allocated at its first update, as PyTorch does).
struct ParamState {
    name: String,
    var: Var,
    decay: bool,
    /// Number of updates this parameter took (PyTorch's per-parameter `step`).
    t: u64,
    m: Option<Tensor>,
    v: Option<Tensor>,
    /// Fused CPU path: the moments as one [2, n] buffer updated in place; `m` and `v` are then
    /// views of its two rows.
    mv: Option<Tensor>,
}

impl ParamState {
    /// The gradient must have the parameter's shape.
    fn check_grad(&self, g: &Tensor) -> Result<()> {
        if g.shape() != self.var.shape() {
            return Err(Error::InvalidInput(format!(
                "AdamW: gradient of `{}` has shape {:?}, parameter has {:?}",
                self.name,
                g.dims(),
                self.var.dims()
            )));
        }
        Ok(())
    }
}

/// AdamW (decoupled weight decay) over named parameters, equal to `torch.optim.AdamW` with two
/// parameter groups (decay / [`no_decay`]).
///
/// Parameters without a gradient in the [`GradStore`] passed to [`AdamW::step`] are left alone
/// and do not advance their own step count (as in PyTorch, where `grad is None` skips them);
/// their moments are only allocated once they first get a gradient, so frozen parameters cost
/// no optimizer memory. Moments have the parameter's dtype and device.
pub struct AdamW {
    params: Vec<ParamState>,
    cfg: AdamWConfig,
    steps: usize,
    /// Use the fused in-place update (`crate::ops`) where it applies (CPU, f32/f64).
    fused: bool,
    /// Where the fused update does not apply: update the parameters of each group (same decay,
    /// step count and dtype) as one flat buffer. `None`: off the CPU, with the ops on.
    grouped: Option<bool>,
    /// The grouped path's flat moments from the last step: (members, m, v); each member's
    /// `m` and `v` are views into them.
    group_moments: Vec<(Vec<usize>, Tensor, Tensor)>,
}

impl AdamW {
    /// Errors if two entries share a name or a variable, or a parameter is not floating point.
    pub fn new(params: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let mut names = HashSet::new();
        let mut ids = HashSet::new();
        let mut out = Vec::with_capacity(params.len());
        for (name, var) in params {
            if !names.insert(name.clone()) {
                return Err(Error::InvalidInput(format!("AdamW: parameter `{name}` given twice")));
            }
            if !ids.insert(var.as_tensor().id()) {
                return Err(Error::InvalidInput(format!("AdamW: parameter `{name}` is the same variable as an earlier one")));
            }
            if !var.dtype().is_float() {
                return Err(Error::InvalidInput(format!("AdamW: parameter `{name}` has non-float dtype {:?}", var.dtype())));
            }
            let decay = !no_decay(&name);
            out.push(ParamState { name, var, decay, t: 0, m: None, v: None, mv: None });
        }
        Ok(Self { params: out, cfg, steps: 0, fused: crate::ops::enabled(), grouped: None, group_moments: Vec::new() })
    }

    /// Chooses the fused in-place update (the default on CPU) or the composite one; both give
    /// the same bits.
    pub fn set_fused(&mut self, on: bool) {
        self.fused = on;
    }

    /// Forces the grouped update on or off where the fused one does not apply (by default it
    /// runs off the CPU with the ops on). Same bits as the per-parameter composite.
    pub fn set_grouped(&mut self, on: bool) {
        self.grouped = Some(on);
    }

    /// The configuration.
    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// Changes the hyper-parameters (e.g. the peak learning rate) without touching the state.
    pub fn set_config(&mut self, cfg: AdamWConfig) {
        self.cfg = cfg;
    }

    /// Names of the parameters, in the order given to [`AdamW::new`].
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.params.iter().map(|p| p.name.as_str())
    }

    /// Number of [`AdamW::step`] calls so far (also after [`AdamW::load_state`]): the step
    /// index to pass to [`lr_factor`] for the next update.
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// One update with learning rate `cfg.lr * lr_scale`; params without a gradient in `grads`
    /// are skipped (frozen).
    ///
    /// Per parameter with gradient `g` (PyTorch's single-tensor AdamW, in the same order):
    /// `t += 1; p *= 1 - lr*wd; m += (1-b1) (g - m); v = b2 v + (1-b2) g²;
    /// p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)`.
    pub fn step(&mut self, grads: &GradStore, lr_scale: f64) -> Result<()> {
        self.step_scaled(grads, lr_scale, None)
    }

    /// [`AdamW::step`] on the gradients times `grad_scale` (gradient clipping's coefficient,
    /// [`clip_coef`]), or as they are with `None`: the same update as scaling them first
    /// ([`clip_to_norm`]) then [`AdamW::step`], to the bit, where the CPU's fused update reads
    /// the scaled value as it goes instead of a pass that writes a scaled copy of every
    /// gradient (candle's CPU affine: one thread into a fresh buffer, about 90 ms of a
    /// wav2vec2-base step on 2 cores, and about 1 s while the buffers are first touched).
    pub fn step_scaled(&mut self, grads: &GradStore, lr_scale: f64, grad_scale: Option<f64>) -> Result<()> {
        let AdamWConfig { lr, beta1, beta2, eps, weight_decay } = self.cfg;
        let lr = lr * lr_scale;
        // A GPU, or its path rehearsed on the CPU (crate::ops::with_gpu_path).
        let gpu = crate::ops::gpu_path_active() || self.params.first().is_some_and(|p| !p.var.device().is_cpu());
        // The fused update: on the CPU (f32, f64), and on a GPU with klspeech's kernels (f32,
        // and bf16 / f16 parameters and moments, also when the CPU rehearses the GPU's path):
        // two launches per parameter, in place, the CPU's bits.
        let kernels = self.params.iter().all(|p| crate::ops::kernels::apply(p.var.as_tensor()) || crate::ops::kernels::apply_half_adamw(p.var.as_tensor()));
        let fused_applies = self.fused && ((!gpu && self.params.iter().all(|p| matches!(p.var.dtype(), DType::F32 | DType::F64))) || kernels);
        if !fused_applies && self.grouped.unwrap_or(gpu && crate::ops::enabled()) {
            return self.step_grouped(grads, lr, grad_scale);
        }
        let scaled = |g: Tensor| -> Result<Tensor> {
            Ok(match grad_scale {
                Some(s) => g.affine(s, 0.0)?,
                None => g,
            })
        };
        self.group_moments.clear();
        for p in self.params.iter_mut() {
            let Some(g) = grads.get(p.var.as_tensor()) else { continue };
            // The parameter changes in place below: caches derived from it must rebuild.
            crate::model::params::parameter_changed(p.var.as_tensor());
            p.check_grad(g)?;
            let g = g.to_dtype(p.var.dtype())?;
            p.t += 1;
            if fused_applies {
                let t = p.t as i32;
                let scalars = crate::ops::AdamWScalars {
                    beta1,
                    beta2,
                    eps,
                    decay: (p.decay && weight_decay != 0.0).then_some(1.0 - lr * weight_decay),
                    bias_correction2_sqrt: (1.0 - beta2.powi(t)).sqrt(),
                    step_size: lr / (1.0 - beta1.powi(t)),
                    grad_scale,
                };
                let n = p.var.elem_count();
                let mv = match (p.mv.take(), &p.m, &p.v) {
                    (Some(mv), _, _) => mv,
                    // Resumed moments: packed once.
                    (None, Some(m), Some(v)) => Tensor::stack(&[m.flatten_all()?, v.flatten_all()?], 0)?,
                    // First update: zero moments give exactly the composite's first step.
                    _ => Tensor::zeros((2, n), p.var.dtype(), p.var.device())?,
                };
                if crate::ops::adamw_in_place(p.var.as_tensor(), &g, &mv, scalars)? {
                    p.m = Some(mv.get(0)?.reshape(p.var.shape())?);
                    p.v = Some(mv.get(1)?.reshape(p.var.shape())?);
                    p.mv = Some(mv);
                    continue;
                }
            }
            p.mv = None;
            let g = scaled(g)?;
            // Detached view of the parameter, so no autograd graph is built.
            let mut theta = p.var.as_tensor().detach();
            if p.decay && weight_decay != 0.0 {
                theta = theta.affine(1.0 - lr * weight_decay, 0.0)?;
            }
            let (m, v) = match (&p.m, &p.v) {
                (Some(m), Some(v)) => {
                    // torch: exp_avg.lerp_(grad, 1 - beta1); exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2)
                    let m = ((&g - m)? * (1.0 - beta1))?.add(m)?;
                    let v = (v * beta2)?.add(&(g.sqr()? * (1.0 - beta2))?)?;
                    (m, v)
                }
                _ => ((&g * (1.0 - beta1))?, (g.sqr()? * (1.0 - beta2))?),
            };
            let t = p.t as i32;
            let bias_correction1 = 1.0 - beta1.powi(t);
            let bias_correction2_sqrt = (1.0 - beta2.powi(t)).sqrt();
            let step_size = lr / bias_correction1;
            let denom = ((v.sqrt()? / bias_correction2_sqrt)? + eps)?;
            let next = theta.sub(&(m.div(&denom)? * step_size)?)?;
            p.var.set(&next)?;
            p.m = Some(m);
            p.v = Some(v);
        }
        self.steps += 1;
        Ok(())
    }

    /// [`AdamW::step`] with the parameters of each group (decay or not, step count, dtype)
    /// updated as one flat buffer: on a GPU about 15 kernel launches for the group instead of
    /// 15 per parameter (wav2vec2-base has 211), plus one copy in and out per parameter. The
    /// same elementwise operations as the per-parameter composite, so the same bits.
    fn step_grouped(&mut self, grads: &GradStore, lr: f64, grad_scale: Option<f64>) -> Result<()> {
        let AdamWConfig { beta1, beta2, eps, weight_decay, .. } = self.cfg;
        let mut groups: Vec<((bool, u64, DType), Vec<usize>)> = Vec::new();
        for (i, p) in self.params.iter().enumerate() {
            let Some(g) = grads.get(p.var.as_tensor()) else { continue };
            p.check_grad(g)?;
            let key = (p.decay && weight_decay != 0.0, p.t, p.var.dtype());
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, members)) => members.push(i),
                None => groups.push((key, vec![i])),
            }
        }
        let mut moments = Vec::with_capacity(groups.len());
        for ((decay, t0, dtype), members) in groups {
            let cat = |f: &dyn Fn(&ParamState) -> Result<Tensor>| -> Result<Tensor> {
                let parts = members.iter().map(|&i| Ok(f(&self.params[i])?.flatten_all()?)).collect::<Result<Vec<_>>>()?;
                Ok(Tensor::cat(&parts, 0)?)
            };
            let g = cat(&|p| Ok(grads.get(p.var.as_tensor()).expect("grouped above").to_dtype(dtype)?))?;
            let g = match grad_scale {
                Some(s) => g.affine(s, 0.0)?,
                None => g,
            };
            let mut theta = cat(&|p| Ok(p.var.as_tensor().detach()))?;
            if decay {
                theta = theta.affine(1.0 - lr * weight_decay, 0.0)?;
            }
            let (m, v) = if t0 == 0 {
                ((&g * (1.0 - beta1))?, (g.sqr()? * (1.0 - beta2))?)
            } else {
                let (m, v) = match self.group_moments.iter().find(|(mem, _, _)| *mem == members) {
                    Some((_, m, v)) => (m.clone(), v.clone()),
                    // Zero moments give the first step's values exactly (0 + x = x, 0 b = 0).
                    None => (
                        cat(&|p| Ok(p.m.clone().map_or_else(|| p.var.as_tensor().zeros_like(), Ok)?))?,
                        cat(&|p| Ok(p.v.clone().map_or_else(|| p.var.as_tensor().zeros_like(), Ok)?))?,
                    ),
                };
                (((&g - &m)? * (1.0 - beta1))?.add(&m)?, (&v * beta2)?.add(&(g.sqr()? * (1.0 - beta2))?)?)
            };
            let t = (t0 + 1) as i32;
            let step_size = lr / (1.0 - beta1.powi(t));
            let denom = ((v.sqrt()? / (1.0 - beta2.powi(t)).sqrt())? + eps)?;
            let next = theta.sub(&(m.div(&denom)? * step_size)?)?;
            let mut offset = 0;
            for &i in &members {
                let p = &mut self.params[i];
                crate::model::params::parameter_changed(p.var.as_tensor());
                let n = p.var.elem_count();
                let view = |t: &Tensor| -> Result<Tensor> { Ok(t.narrow(0, offset, n)?.reshape(p.var.shape())?) };
                p.var.set(&view(&next)?)?;
                p.m = Some(view(&m)?);
                p.v = Some(view(&v)?);
                p.mv = None;
                p.t += 1;
                offset += n;
            }
            moments.push((members, m, v));
        }
        self.group_moments = moments;
        self.steps += 1;
        Ok(())
    }

    /// Optimizer state for a checkpoint, for an exact resume:
    ///
    /// * `"step"`: the global step count ([`AdamW::steps`]), shape `[1]`, f64, on the CPU;
    /// * `"step.<name>"`: each parameter's own update count, shape `[1]`, f64, on the CPU;
    /// * `"m.<name>"`, `"v.<name>"`: first and second moments, for parameters that have taken
    ///   at least one update (parameter dtype and device).
    pub fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let scalar = |x: f64| Tensor::from_vec(vec![x], 1, &Device::Cpu);
        let mut out = Vec::with_capacity(1 + 3 * self.params.len());
        out.push(("step".to_string(), scalar(self.steps as f64)?));
        for p in &self.params {
            out.push((format!("step.{}", p.name), scalar(p.t as f64)?));
            if let (Some(m), Some(v)) = (&p.m, &p.v) {
                // Copies: the fused path updates the moments in place.
                out.push((format!("m.{}", p.name), m.copy()?));
                out.push((format!("v.{}", p.name), v.copy()?));
            }
        }
        Ok(out)
    }

    /// Restores what [`AdamW::state`] saved (any device or dtype; converted to each parameter's).
    ///
    /// Requires `"step"` and `"step.<name>"` for every parameter, and `"m.<name>"`/`"v.<name>"`
    /// for every parameter whose step count is non-zero; an absent key is an error naming it,
    /// as is a moment of the wrong shape. Other keys are ignored (the map may hold a whole
    /// checkpoint). Nothing is changed when an error is returned.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        let get = |key: &str| -> Result<&Tensor> {
            tensors.get(key).ok_or_else(|| Error::InvalidInput(format!("optimizer state: missing key `{key}`")))
        };
        let count = |key: &str| -> Result<u64> {
            let x = get(key)?.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
            match x.as_slice() {
                [x] if *x >= 0.0 && x.fract() == 0.0 => Ok(*x as u64),
                _ => Err(Error::InvalidInput(format!("optimizer state: `{key}` must hold one non-negative integer, found {x:?}"))),
            }
        };
        let steps = count("step")?;
        let mut restored = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let t = count(&format!("step.{}", p.name))?;
            if t == 0 {
                restored.push((0, None, None));
                continue;
            }
            let moment = |prefix: &str| -> Result<Tensor> {
                let key = format!("{prefix}.{}", p.name);
                let x = get(&key)?;
                if x.shape() != p.var.shape() {
                    return Err(Error::InvalidInput(format!(
                        "optimizer state: `{key}` has shape {:?}, parameter has {:?}",
                        x.dims(),
                        p.var.dims()
                    )));
                }
                Ok(x.to_device(p.var.device())?.to_dtype(p.var.dtype())?.contiguous()?)
            };
            let m = moment("m")?;
            let v = moment("v")?;
            restored.push((t, Some(m), Some(v)));
        }
        for (p, (t, m, v)) in self.params.iter_mut().zip(restored) {
            p.t = t;
            p.m = m;
            p.v = v;
            p.mv = None;
        }
        self.group_moments.clear();
        self.steps = steps as usize;
        Ok(())
    }
}

/// Sum of squares of `g` as a 0-d tensor, accumulated in f32 (f64 for f64 gradients).
fn sum_sq(g: &Tensor) -> Result<Tensor> {
    let acc = if g.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
    Ok(g.to_dtype(acc)?.sqr()?.sum_all()?.to_dtype(DType::F64)?)
}

/// Sum of the squares of every gradient of `vars` (those that have one) as a 0-d f64 tensor on
/// the gradients' device, each gradient's part accumulated in f32 (f64 for f64 gradients); `None`
/// when no var has a gradient. Nothing is read back: the trainer reads it with the step's other
/// figures in one synchronization. The global norm is its square root.
pub fn grad_sq_sum(grads: &GradStore, vars: &[(String, Var)]) -> Result<Option<Tensor>> {
    if let Some(sums) = cpu_sums(grads, vars)? {
        return sums.map(|(sq, _)| Ok(Tensor::new(sq, &Device::Cpu)?)).transpose();
    }
    if let Some(sq) = gpu_sum_sq(grads, vars)? {
        return Ok(Some(sq));
    }
    let parts: Vec<Tensor> = vars.iter().filter_map(|(_, v)| grads.get(v.as_tensor())).map(sum_sq).collect::<Result<_>>()?;
    stack_sum(parts)
}

/// 0 when every gradient of `vars` present in `grads` is finite, NaN when one is not (a 0-d f64
/// tensor on the gradients' device; `None` without gradients). Read it with the step's other
/// figures; [`grads_finite`] reads it alone.
pub fn nonfinite_probe(grads: &GradStore, vars: &[(String, Var)]) -> Result<Option<Tensor>> {
    if let Some(sums) = cpu_sums(grads, vars)? {
        return sums.map(|(_, finite)| Ok(Tensor::new(if finite { 0f64 } else { f64::NAN }, &Device::Cpu)?)).transpose();
    }
    if let Some(sq) = gpu_sum_sq(grads, vars)? {
        return Ok(Some(probe_of(&sq)?));
    }
    // g - g is 0 where g is finite and NaN where it is not; its sum is 0 or NaN, never a
    // false alarm from overflow.
    let parts: Vec<Tensor> = vars
        .iter()
        .filter_map(|(_, v)| grads.get(v.as_tensor()))
        .map(|g| -> Result<Tensor> { Ok(g.sub(g)?.sum_all()?.to_dtype(DType::F32)?.to_dtype(DType::F64)?) })
        .collect::<Result<_>>()?;
    stack_sum(parts)
}

/// [`nonfinite_probe`] and [`grad_sq_sum`] (with `with_sq`) together: on the CPU one pass over
/// the gradients for both ([`cpu_sums`]), on a GPU one kernel a gradient ([`gpu_sum_sq`]),
/// elsewhere the two.
pub fn step_probes(grads: &GradStore, vars: &[(String, Var)], with_sq: bool) -> Result<[Option<Tensor>; 2]> {
    match cpu_sums(grads, vars)? {
        Some(sums) => {
            let scalar = |x: f64| -> Result<Tensor> { Ok(Tensor::new(x, &Device::Cpu)?) };
            Ok([
                sums.map(|(_, finite)| scalar(if finite { 0.0 } else { f64::NAN })).transpose()?,
                if with_sq { sums.map(|(sq, _)| scalar(sq)).transpose()? } else { None },
            ])
        }
        None => match gpu_sum_sq(grads, vars)? {
            // One pass on the GPU for both: the probe 0 when the sum is finite, NaN when not.
            Some(sq) => Ok([Some(probe_of(&sq)?), with_sq.then_some(sq)]),
            None => Ok([nonfinite_probe(grads, vars)?, if with_sq { grad_sq_sum(grads, vars)? } else { None }]),
        },
    }
}

/// The non-finite probe from a sum of squares that is finite exactly when every value is: 0 for
/// a finite sum, NaN otherwise (inf - inf, NaN - NaN).
fn probe_of(sq: &Tensor) -> Result<Tensor> {
    Ok(sq.sub(sq)?)
}

/// The sum of the squares of every gradient of `vars` in `grads` on their GPU, one kernel a
/// gradient (`ops::kernels::sum_sq_of`: f64 squares and sums; a sum is finite exactly when
/// every value is, short of f32 overflow of a block's sum), a 0-d f64 tensor left there; `None`
/// where that does not apply (then candle's ops).
fn gpu_sum_sq(grads: &GradStore, vars: &[(String, Var)]) -> Result<Option<Tensor>> {
    let gs: Vec<&Tensor> = vars.iter().filter_map(|(_, v)| grads.get(v.as_tensor())).collect();
    Ok(crate::ops::kernels::sum_sq_of(&gs)?)
}

/// The sum of the squares of every gradient of `vars` in `grads` and whether all are finite,
/// each gradient in one parallel pass on the CPU (`ops::sum_sq_finite`: f64 squares and sums;
/// candle's ops sum each gradient's f32 squares in f32): `Some(None)` when no var has a
/// gradient, `None` when a gradient is off the CPU or not f32 / f64 (then candle's ops).
fn cpu_sums(grads: &GradStore, vars: &[(String, Var)]) -> Result<Option<Option<(f64, bool)>>> {
    let mut total: Option<(f64, bool)> = None;
    for g in vars.iter().filter_map(|(_, v)| grads.get(v.as_tensor())) {
        let Some((sq, finite)) = crate::ops::sum_sq_finite(g)? else { return Ok(None) };
        let (s, f) = total.unwrap_or((0.0, true));
        total = Some((s + sq, f && finite));
    }
    Ok(Some(total))
}

/// The sum of 0-d tensors, on the first one's device (partial sums sit on different devices
/// only in exotic setups).
fn stack_sum(parts: Vec<Tensor>) -> Result<Option<Tensor>> {
    let Some(first) = parts.first() else { return Ok(None) };
    let dev = first.device().clone();
    let parts: Vec<Tensor> = parts.into_iter().map(|t| t.to_device(&dev)).collect::<candle_core::Result<_>>()?;
    Ok(Some(Tensor::stack(&parts, 0)?.sum_all()?))
}

/// Global L2 norm of all gradients of `vars` (those with a gradient), then clipping as
/// `torch.nn.utils.clip_grad_norm_`: with `coef = max_norm / (norm + 1e-6)`, every gradient is
/// multiplied by `coef` if `coef < 1` (the entries of `grads` are replaced). Returns the
/// pre-clip norm. `vars` should hold each variable once (a repeated one counts twice). One
/// device sync.
///
/// A non-finite norm leaves the gradients untouched (PyTorch would scale them by 0 or NaN);
/// check [`grads_finite`] first and skip the update instead.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[(String, Var)], max_norm: f64) -> Result<f64> {
    let norm = match grad_sq_sum(grads, vars)? {
        Some(sq) => sq.to_scalar::<f64>()?.sqrt(),
        None => 0.0,
    };
    clip_to_norm(grads, vars, max_norm, norm)?;
    Ok(norm)
}

/// The clipping of [`clip_grad_norm`] for a global norm already read back (the square root of
/// [`grad_sq_sum`]): scales every gradient by `max_norm / (norm + 1e-6)` when that is below 1;
/// a non-finite norm leaves them untouched. Queues the scaling, reads nothing.
pub fn clip_to_norm(grads: &mut GradStore, vars: &[(String, Var)], max_norm: f64, norm: f64) -> Result<()> {
    if let Some(coef) = clip_coef(max_norm, norm) {
        for (_, v) in vars {
            if let Some(g) = grads.remove(v.as_tensor()) {
                grads.insert(v.as_tensor(), g.affine(coef, 0.0)?);
            }
        }
    }
    Ok(())
}

/// The scale [`clip_to_norm`] applies for a global gradient norm: `max_norm / (norm + 1e-6)`
/// when that is below 1; `None` when it is not, or when the norm is not finite (the gradients
/// stay as they are). [`AdamW::step_scaled`] takes it.
pub fn clip_coef(max_norm: f64, norm: f64) -> Option<f64> {
    let coef = max_norm / (norm + 1e-6);
    (norm.is_finite() && coef < 1.0).then_some(coef)
}

/// Whether every gradient of `vars` present in `grads` is finite (no NaN, no ±inf). One device
/// sync in all.
pub fn grads_finite(grads: &GradStore, vars: &[(String, Var)]) -> Result<bool> {
    Ok(match nonfinite_probe(grads, vars)? {
        Some(p) => p.to_scalar::<f64>()?.is_finite(),
        None => true,
    })
}

/// Sums the parameter gradients of several micro-batches (gradient accumulation).
///
/// [`GradAccumulator::add`] keeps only the gradients of the given vars (scaled) from the
/// [`GradStore`] of one `backward()` — which also holds gradients for every intermediate
/// activation; pass it by value to free those right there. After the last
/// micro-batch, [`GradAccumulator::into_grads`] gives a `GradStore` that [`grads_finite`],
/// [`clip_grad_norm`] and [`AdamW::step`] take like any other. A var that got no gradient in
/// any micro-batch has none in the result (and is skipped by `step`).
#[derive(Debug, Default)]
pub struct GradAccumulator {
    grads: GradStore,
    micro_batches: usize,
}

impl GradAccumulator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `scale * grad` of each var in `vars` that has a gradient in `grads`. With `k`
    /// micro-batches of a mean loss, `scale = 1/k` gives the gradient of the mean over all
    /// (or pass 1.0 when the loss was already divided by `k`).
    ///
    /// Takes the store by value (`acc.add(loss.backward()?, ..)`, which frees the
    /// intermediate gradients at once) or by reference (`acc.add(&grads, ..)`).
    pub fn add(&mut self, grads: impl Borrow<GradStore>, vars: &[(String, Var)], scale: f64) -> Result<()> {
        let grads = grads.borrow();
        for (_, v) in vars {
            let Some(g) = grads.get(v.as_tensor()) else { continue };
            let g = if scale == 1.0 { g.detach() } else { g.affine(scale, 0.0)?.detach() };
            let sum = match self.grads.remove(v.as_tensor()) {
                Some(acc) => acc.add(&g)?.detach(),
                None => g,
            };
            self.grads.insert(v.as_tensor(), sum);
        }
        self.micro_batches += 1;
        Ok(())
    }

    /// Number of [`GradAccumulator::add`] calls since creation (or the last take).
    pub fn micro_batches(&self) -> usize {
        self.micro_batches
    }

    /// The accumulated gradients so far.
    pub fn grads(&self) -> &GradStore {
        &self.grads
    }

    /// Takes the accumulated gradients and resets the accumulator for the next update.
    pub fn take(&mut self) -> GradStore {
        self.micro_batches = 0;
        std::mem::take(&mut self.grads)
    }

    /// The accumulated gradients.
    pub fn into_grads(self) -> GradStore {
        self.grads
    }
}
