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

/// CTC decoding flags shared by `predict` and `eval`: greedy by default; a prefix beam search
/// with `--beam-width`, with a word n-gram model fused in with `--lm`.
#[derive(Debug, clap::Args)]
pub struct DecodeArgs {
    /// CTC: a word n-gram language model in the ARPA format (KenLM's lmplz output), fused into a
    /// prefix beam search as pyctcdecode does (transformers' Wav2Vec2ProcessorWithLM).
    #[arg(long, value_name = "FILE.arpa")]
    pub lm: Option<std::path::PathBuf>,
    /// CTC: beam search with this many beams instead of greedy decoding [default with --lm or
    /// --hotwords: 100].
    #[arg(long, value_name = "N")]
    pub beam_width: Option<usize>,
    /// With --lm: weight of the LM's log probability (pyctcdecode's alpha).
    #[arg(long, default_value_t = 0.5, value_name = "ALPHA")]
    pub lm_alpha: f64,
    /// With --lm: score added per word (pyctcdecode's beta).
    #[arg(long, default_value_t = 1.5, value_name = "BETA")]
    pub lm_beta: f64,
    /// With --lm: score added for a word outside the LM's vocabulary (pyctcdecode's
    /// unk_score_offset).
    #[arg(long, default_value_t = -10.0, value_name = "SCORE", allow_hyphen_values = true)]
    pub unk_score_offset: f64,
    /// CTC: words to favour in a beam search (names, terms the LM lacks): comma-separated
    /// words or phrases, spelled as the transcripts are (pyctcdecode's hotwords).
    #[arg(long, value_name = "WORDS")]
    pub hotwords: Option<String>,
    /// With --hotwords: score added per hotword (pyctcdecode's hotword_weight).
    #[arg(long, default_value_t = 10.0, value_name = "W")]
    pub hotword_weight: f64,
}

impl DecodeArgs {
    /// The beam search the flags ask for, or None for greedy decoding.
    pub fn decoder(&self) -> anyhow::Result<Option<klspeech::decode::BeamSearch>> {
        use anyhow::Context;
        let default_flags = self.lm_alpha == 0.5 && self.lm_beta == 1.5 && self.unk_score_offset == -10.0;
        if self.lm.is_none() && !default_flags {
            anyhow::bail!("--lm-alpha, --lm-beta and --unk-score-offset weigh a language model: add --lm FILE.arpa");
        }
        if self.beam_width == Some(0) {
            anyhow::bail!("--beam-width must be at least 1");
        }
        if self.hotwords.is_none() && self.hotword_weight != 10.0 {
            anyhow::bail!("--hotword-weight weighs hotwords: add --hotwords WORDS");
        }
        let hotwords = match &self.hotwords {
            Some(h) => {
                let phrases: Vec<&str> = h.split(',').map(str::trim).filter(|p| !p.is_empty()).collect();
                if phrases.is_empty() {
                    anyhow::bail!("--hotwords `{h}`: no words (expected comma-separated words or phrases)");
                }
                Some(klspeech::decode::Hotwords::new(&phrases, self.hotword_weight))
            }
            None => None,
        };
        if self.lm.is_none() && self.beam_width.is_none() && hotwords.is_none() {
            return Ok(None);
        }
        let lm = match &self.lm {
            Some(p) => {
                let lm = klspeech::lm::NgramLm::from_arpa(p).context("reading the language model")?;
                let f = klspeech::decode::LmFusion::new(std::sync::Arc::new(lm));
                Some(klspeech::decode::LmFusion { alpha: self.lm_alpha, beta: self.lm_beta, unk_score_offset: self.unk_score_offset, ..f })
            }
            None => None,
        };
        let d = klspeech::decode::BeamSearch::default();
        Ok(Some(klspeech::decode::BeamSearch { beam_width: self.beam_width.unwrap_or(d.beam_width), lm, hotwords, ..d }))
    }
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
