//! Parameter gradients handed straight from the fused ops' backward passes to the store.
//!
//! candle 0.11.1's backward added every gradient it received onto a fresh zero tensor
//! (`zeros_like`, then `add`); the vendored candle-core (vendor/README.md) stores a first
//! gradient as is, for activations and parameters alike. What this sink still adds: a fused
//! op whose input is a variable (a parameter, a leaf nothing else differentiates through)
//! hands that input's gradient here instead of returning it (see [`route`]), in a buffer of
//! its own, so that a view into a larger backward buffer does not keep all of that buffer
//! alive until the optimizer step; [`backward`] runs candle's backward with the sink installed
//! on this thread, and the sink's gradients join the store at the end. The values are the
//! same bits (tests/gradients.rs compares every parameter's gradient with plain `backward()`).
//!
//! Without the sink (plain `loss.backward()`, other threads) the ops return their gradients
//! as before. The sink belongs to the thread, not to the loss: a plain `backward()` that a
//! thread runs while it is inside [`backward`] (possible for jobs on one rayon pool, whose
//! waiting workers run other queued jobs) would hand its parameter gradients to that sink;
//! run concurrent backward passes through [`backward`], which installs a sink of its own.
//!
//! Off the CPU the ops that route are the training convolution (`conv1d_cl_recompute`) and the
//! linear layer (`ops::device::linear_device`).

use std::cell::RefCell;
use std::collections::hash_map::Entry;
use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, Storage, Tensor, TensorId};

use crate::error::Result;

/// Per variable: (the variable, its gradient so far).
type Sink = HashMap<TensorId, (Tensor, Tensor)>;

thread_local! {
    static SINK: RefCell<Option<Sink>> = const { RefCell::new(None) };
}

/// Restores the previous sink of this thread when dropped (also when the backward fails or
/// panics).
struct Installed(Option<Option<Sink>>);

impl Installed {
    fn new() -> Self {
        Installed(Some(SINK.with(|s| s.borrow_mut().replace(Sink::new()))))
    }
    fn finish(mut self) -> Sink {
        let prev = self.0.take().unwrap_or_default();
        SINK.with(|s| std::mem::replace(&mut *s.borrow_mut(), prev)).unwrap_or_default()
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        if let Some(prev) = self.0.take() {
            SINK.with(|s| *s.borrow_mut() = prev);
        }
    }
}

/// `loss.backward()` with the parameter gradients of the fused ops stored as computed (see
/// the module docs): the same [`GradStore`], each routed parameter gradient in its own buffer.
pub fn backward(loss: &Tensor) -> Result<GradStore> {
    Ok(backward_counted(loss)?.0)
}

/// [`backward`], and the parameters whose gradients came through the sink.
pub fn backward_counted(loss: &Tensor) -> Result<(GradStore, Vec<TensorId>)> {
    let installed = Installed::new();
    let grads = loss.backward();
    let sink = installed.finish();
    let mut grads = grads?;
    let routed: Vec<TensorId> = sink.keys().copied().collect();
    for (_, (var, g)) in sink {
        // A parameter that also reached candle's own ops (none in the model today) sums both.
        let g = match grads.remove(&var) {
            Some(other) => (other + g)?,
            None => g,
        };
        grads.insert(&var, g);
    }
    Ok((grads, routed))
}

/// For a fused op's backward: the gradient `grad` of its input `arg`, returned as is unless
/// [`backward`] runs on this thread and `arg` is a variable; then it goes into the sink (in a
/// buffer of its own: a view into a larger backward buffer would keep all of it alive until
/// the optimizer step) and candle gets `None`.
pub(crate) fn route(arg: &Tensor, grad: Option<Tensor>) -> candle_core::Result<Option<Tensor>> {
    let Some(g) = grad else { return Ok(None) };
    if !arg.is_variable() {
        return Ok(Some(g));
    }
    SINK.with(|s| {
        let mut s = s.borrow_mut();
        let Some(sink) = s.as_mut() else { return Ok(Some(g)) };
        let g = if owns_its_storage(&g) { g } else { g.force_contiguous()? };
        match sink.entry(arg.id()) {
            Entry::Occupied(mut e) => {
                let sum = (&e.get().1 + &g)?;
                e.get_mut().1 = sum;
            }
            Entry::Vacant(e) => {
                e.insert((arg.clone(), g));
            }
        }
        Ok(None)
    })
}

/// Whether `t` is the whole of its storage, contiguous from the start.
fn owns_its_storage(t: &Tensor) -> bool {
    let (storage, layout) = t.storage_and_layout();
    let len = match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => v.len(),
        Storage::Cpu(CpuStorage::F64(v)) => v.len(),
        #[cfg(feature = "cuda")]
        Storage::Cuda(c) => {
            use candle_core::cuda_backend::CudaStorageSlice as S;
            match &c.slice {
                S::F32(v) => v.len(),
                S::F64(v) => v.len(),
                S::BF16(v) => v.len(),
                S::F16(v) => v.len(),
                _ => return false,
            }
        }
        _ => return false,
    };
    layout.is_contiguous() && layout.start_offset() == 0 && len == t.elem_count()
}
