//! Fine-tuning: configuration, augmentation, optimizer, the training loop, evaluation.

pub mod optim;
pub mod augment;
pub mod config;
pub mod eval;
pub mod feature_cache;
pub mod trainer;

pub use config::{Task, TrainConfig};
pub use eval::{evaluate, evaluate_asr_manifest, evaluate_decoded, evaluate_kws_folder, EvalResult};
pub use trainer::{train, TrainOutcome};
