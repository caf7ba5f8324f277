//! Audio in: decode any WAV/FLAC/MP3/OGG Vorbis file, mix to mono, resample, measure.
//!
//! ```no_run
//! let clip = klspeech::audio::load_resampled("speech.flac".as_ref(), 16_000)?;
//! assert_eq!(clip.sample_rate, 16_000);
//! # Ok::<(), klspeech::Error>(())
//! ```

mod decode;
mod resample;

use std::path::Path;

pub use decode::MAX_SAMPLE_RATE;
pub use resample::{output_len, resample, MAX_EXACT_PHASES, SINC_LEN};

use crate::error::Result;

/// What the file is, as decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct AudioInfo {
    /// Container told by the file's signature: "WAV", "FLAC", "OGG", "MP3", ...
    pub container: String,
    /// symphonia's short codec name: "pcm_s16le", "flac", "mp3", "vorbis", ...
    pub codec: String,
    /// Source sample rate in Hz.
    pub sample_rate: u32,
    /// Source channel count (all mixed to mono).
    pub channels: usize,
    /// Frames decoded (samples per channel).
    pub frames: usize,
    /// `frames / sample_rate`.
    pub duration_s: f64,
    /// Bits per sample where the codec has them (PCM, FLAC).
    pub bits_per_sample: Option<u32>,
    /// Packets that failed to decode and were skipped (a corrupt stretch of the file).
    pub skipped_packets: usize,
}

/// Level statistics over every channel's samples, full scale = 1.0.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SignalStats {
    /// Largest absolute sample value.
    pub peak: f32,
    /// Root mean square.
    pub rms: f32,
    /// Mean sample value.
    pub dc_offset: f32,
    /// Share of samples at full scale (|x| >= 32767/32768).
    pub clipped_share: f64,
}

impl SignalStats {
    /// Peak level in dBFS (-inf for digital silence).
    pub fn peak_dbfs(&self) -> f64 {
        20.0 * f64::from(self.peak).log10()
    }
    /// RMS level in dBFS, where a full-scale square wave is 0 dBFS.
    pub fn rms_dbfs(&self) -> f64 {
        20.0 * f64::from(self.rms).log10()
    }
}

/// A decoded clip: mono samples in [-1, 1] at `sample_rate`.
#[derive(Debug, Clone)]
pub struct Audio {
    /// Mono samples (channel mean).
    pub samples: Vec<f32>,
    /// Sample rate of `samples` in Hz (the source rate after [`load`], the target after
    /// [`load_resampled`]).
    pub sample_rate: u32,
    /// The source file's properties.
    pub info: AudioInfo,
    /// Levels of the source file, all channels.
    pub stats: SignalStats,
}

impl Audio {
    /// Duration of `samples` in seconds.
    pub fn duration_s(&self) -> f64 {
        self.samples.len() as f64 / f64::from(self.sample_rate)
    }
}

/// Decodes `path` (WAV, FLAC, MP3, OGG Vorbis) and mixes all channels to mono by their mean.
///
/// Corrupt packets in the middle of a stream are skipped and counted in
/// [`AudioInfo::skipped_packets`]; a file with nothing decodable is an error naming the file.
pub fn load(path: &Path) -> Result<Audio> {
    decode::load(path)
}

/// [`load`], then [`resample`] to `rate` Hz (a no-op when the file already has that rate).
pub fn load_resampled(path: &Path, rate: u32) -> Result<Audio> {
    let mut audio = decode::load(path)?;
    if audio.sample_rate != rate {
        audio.samples = resample(&audio.samples, audio.sample_rate, rate)?;
        audio.sample_rate = rate;
    }
    Ok(audio)
}
