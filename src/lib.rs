//! klspeech: fine-tune pretrained Wav2Vec2 speech models on small data sets, with KL-Norm.
//!
//! Dependencies flow one way: [`audio`] -> [`features`] -> [`model`] -> [`loss`] / [`metrics`] /
//! [`vocab`] -> [`lm`] / [`decode`] ->
//! [`data`] -> [`train`] -> CLI.

pub mod audio;
pub mod data;
pub mod decode;
pub mod device;
pub mod error;
pub mod fastmath;
pub mod gpu_profile;
pub mod features;
pub mod infer;
pub mod lm;
pub mod loss;
pub mod metrics;
pub mod model;
pub mod ops;
pub mod plot;
pub mod rng;
pub mod train;
pub mod vocab;

pub use error::{Error, Result};
