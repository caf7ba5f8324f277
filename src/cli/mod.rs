//! Subcommands of the `klspeech` binary: thin wrappers over the library.

mod inspect;
mod model_cmds;
mod train_cmds;

use clap::{Parser, Subcommand};

/// Fine-tune pretrained Wav2Vec2 models on small data sets, with KL-Norm.
#[derive(Debug, Parser)]
#[command(name = "klspeech", version, about, long_about = None)]
pub struct Cli {
    /// CPU threads (default: RAYON_NUM_THREADS, else the number of physical cores)
    #[arg(long, global = true)]
    pub threads: Option<usize>,
    /// GPU only: TF32 tensor cores for f32 matrix products and cuDNN convolutions (PyTorch's
    /// `torch.backends.cuda.matmul.allow_tf32`, off by default as here; PyTorch's
    /// `cudnn.allow_tf32` is on by default, klspeech keeps f32 convolutions exact unless asked)
    #[arg(long, global = true)]
    pub tf32: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Describe audio files: format, codec, rate, channels, duration, levels; optionally draw a
    /// log-mel spectrogram.
    Inspect(inspect::InspectArgs),
    /// Hidden states of a Wav2Vec2 model for audio files, saved as safetensors.
    Embed(model_cmds::EmbedArgs),
    /// Classify (classification head) or transcribe (CTC head) audio files.
    Predict(model_cmds::PredictArgs),
    /// Describe a model: variant, sizes, parameter counts, normalization sites.
    InspectModel(model_cmds::InspectModelArgs),
    /// Fine-tune a pretrained Wav2Vec2 (keyword spotting, ASR with CTC, or classification).
    Train(Box<train_cmds::TrainArgs>),
    /// Evaluate a fine-tuned model: accuracy / macro-F1 / confusion, or CER / WER.
    Eval(train_cmds::EvalArgs),
}

/// An error and its causes on one line, as `{:#}` prints them but without a cause whose text
/// the message already holds (klspeech's errors name their I/O cause in their own message and
/// also expose it as their source, which `{:#}` would print twice).
pub fn report(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg.push_str(": ");
            msg.push_str(&c);
        }
    }
    msg
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    klspeech::device::set_threads(cli.threads)?;
    klspeech::device::tune_cpu_runtime();
    klspeech::device::set_tf32(cli.tf32);
    match cli.command {
        Command::Inspect(a) => inspect::run(a),
        Command::Embed(a) => model_cmds::embed(a),
        Command::Predict(a) => model_cmds::predict(a),
        Command::InspectModel(a) => model_cmds::inspect_model(a),
        Command::Train(a) => train_cmds::train(*a),
        Command::Eval(a) => train_cmds::eval(a),
    }
}
