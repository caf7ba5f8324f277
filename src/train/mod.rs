//! Fine-tuning: configuration, augmentation, optimizer, the training loop, evaluation.

pub mod optim;
pub mod augment;
pub mod config;
pub mod eval;
pub mod trainer;

pub use config::{Task, TrainConfig};
pub use eval::{evaluate, EvalResult};
pub use trainer::{train, TrainOutcome};
