//! From waveforms to model inputs: the Wav2Vec2 feature extractor and log-mel filterbanks.

mod extractor;
mod fbank;

pub use extractor::{normalize_clip, FeatureExtractor, FeatureExtractorConfig, WaveBatch};
pub use fbank::{fbank, Fbank, FbankComputer, FbankOptions, WindowType};
