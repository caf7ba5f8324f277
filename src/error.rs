//! The one error type of the library.
//!
//! Every variant that concerns a file carries its path, so that a message printed by the
//! binary tells the user which file is wrong and what to do about it. Binaries wrap this in
//! `anyhow`; the library never does.

use std::path::PathBuf;

/// Result alias used throughout klspeech.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in klspeech.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The file does not exist or cannot be opened.
    #[error("{path}: cannot open file: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Reading or writing a file failed after it was opened.
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },

    /// The file is empty (zero bytes).
    #[error("{path}: the file is empty (0 bytes)")]
    EmptyFile { path: PathBuf },

    /// The container is not a format klspeech can read (or not audio at all).
    #[error("{path}: not a supported audio file ({detail}); supported: WAV, FLAC, MP3, OGG Vorbis")]
    UnsupportedFormat { path: PathBuf, detail: String },

    /// The container is readable but its codec is not.
    #[error("{path}: unsupported codec {codec}; convert it first, e.g. `sox {path} -b 16 out.wav`")]
    UnsupportedCodec { path: PathBuf, codec: String },

    /// The header is damaged or inconsistent.
    #[error("{path}: malformed audio header: {detail}")]
    MalformedHeader { path: PathBuf, detail: String },

    /// The sample rate in the header cannot be right.
    #[error("{path}: invalid sample rate {rate} Hz (expected 1 Hz to 1 MHz)")]
    InvalidSampleRate { path: PathBuf, rate: u64 },

    /// The stream decoded to no samples at all.
    #[error("{path}: no audio samples could be decoded{detail}")]
    NoSamples { path: PathBuf, detail: String },

    /// The header announces more audio than the file holds.
    #[error("{path}: truncated: the header announces {expected_frames} frames but the file holds {found_frames}; re-encode what is there with `sox {path} fixed.wav` if the clip is still wanted")]
    Truncated { path: PathBuf, expected_frames: u64, found_frames: u64 },

    /// Float samples that are NaN or infinite.
    #[error("{path}: {count} sample(s) are NaN or infinite (first at sample {first}); the file is corrupt")]
    NonFiniteSamples { path: PathBuf, count: usize, first: usize },

    /// Resampler construction or processing failed.
    #[error("resampling {from} Hz -> {to} Hz failed: {detail}")]
    Resample { from: u32, to: u32, detail: String },

    /// A JSON configuration file (config.json, preprocessor_config.json, vocab.json) is bad.
    #[error("{path}: {detail}")]
    Config { path: PathBuf, detail: String },

    /// An ARPA language model file is bad.
    #[error("{path}: {detail}")]
    LanguageModel { path: PathBuf, detail: String },

    /// A checkpoint tensor is absent.
    #[error("{path}: missing tensor `{key}`{hint}")]
    MissingTensor { path: PathBuf, key: String, hint: String },

    /// A checkpoint tensor has the wrong shape.
    #[error("{path}: tensor `{key}` has shape {found:?}, expected {expected:?}")]
    TensorShape { path: PathBuf, key: String, expected: Vec<usize>, found: Vec<usize> },

    /// A configuration value klspeech does not support.
    #[error("{what} is not supported: {detail}")]
    Unsupported { what: String, detail: String },

    /// Inputs of an API call do not fit together (caller error).
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// Writing a PNG image failed.
    #[error("{path}: cannot write PNG: {detail}")]
    Png { path: PathBuf, detail: String },

    /// Training cannot go on (non-finite losses, bad data); the message says what to change.
    #[error("training stopped: {0}")]
    Training(String),

    /// The data set has problems; the report lists every one (see `data::validate`).
    #[error("{0}")]
    Data(String),

    /// An error from candle (tensor shapes, devices, kernels).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// An error reading a safetensors file.
    #[error("{path}: not a valid safetensors file: {detail}")]
    SafeTensors { path: PathBuf, detail: String },
}

impl Error {
    /// Shorthand for an [`Error::Io`].
    pub fn io(path: impl Into<PathBuf>, what: &'static str, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), what, source }
    }

    /// Shorthand for an [`Error::Config`].
    pub fn config(path: impl Into<PathBuf>, detail: impl Into<String>) -> Self {
        Error::Config { path: path.into(), detail: detail.into() }
    }
}
