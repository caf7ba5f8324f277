//! Subcommands of the `klspeech` binary: thin wrappers over the library.

mod inspect;

use clap::{Parser, Subcommand};

/// Fine-tune pretrained Wav2Vec2 models on small data sets, with KL-Norm.
#[derive(Debug, Parser)]
#[command(name = "klspeech", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Describe audio files: format, codec, rate, channels, duration, levels; optionally draw a
    /// log-mel spectrogram.
    Inspect(inspect::InspectArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Inspect(a) => inspect::run(a),
    }
}
