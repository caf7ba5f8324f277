//! Log-mel filterbank features with the semantics of Kaldi's `compute-fbank-feats`, as
//! implemented by `torchaudio.compliance.kaldi.fbank` (the reference the tests compare with).
//!
//! Per frame: optional DC removal, pre-emphasis (`x[i] -= k * x[i-1]`, `x[0] -= k * x[0]`),
//! window, zero padding to a power of two, |FFT|^2, triangular mel filters on Kaldi's mel scale
//! (`1127 ln(1 + f / 700)`), natural log floored at f32 epsilon. Dither is not implemented
//! (it is random; torchaudio's reference is computed with `dither=0`).

use std::sync::Arc;

use rustfft::num_complex::Complex;
use rustfft::{Fft, FftPlanner};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Analysis window, as Kaldi names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WindowType {
    /// Hann raised to the power 0.85 (Kaldi's default).
    Povey,
    /// Hamming (0.54 - 0.46 cos).
    Hamming,
    /// Hann.
    Hanning,
    /// Blackman with `blackman_coeff`.
    Blackman,
    /// No window.
    Rectangular,
}

/// Filterbank options; field names and defaults follow `torchaudio.compliance.kaldi.fbank`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FbankOptions {
    /// Number of mel bins.
    pub num_mel_bins: usize,
    /// Sample rate of the input in Hz.
    pub sample_frequency: f64,
    /// Frame length in milliseconds.
    pub frame_length: f64,
    /// Frame shift in milliseconds.
    pub frame_shift: f64,
    /// Window type.
    pub window_type: WindowType,
    /// Blackman window coefficient.
    pub blackman_coeff: f64,
    /// Pre-emphasis coefficient (0 disables it).
    pub preemphasis_coefficient: f64,
    /// Subtract each frame's mean before pre-emphasis.
    pub remove_dc_offset: bool,
    /// Zero-pad frames to the next power of two before the FFT.
    pub round_to_power_of_two: bool,
    /// Only frames that fit entirely in the signal (otherwise Kaldi's reflected edges).
    pub snip_edges: bool,
    /// Lowest mel filter edge in Hz.
    pub low_freq: f64,
    /// Highest mel filter edge in Hz; `<= 0` means Nyquist plus this value.
    pub high_freq: f64,
    /// Power spectrum (true) or magnitude (false).
    pub use_power: bool,
    /// Natural log of the mel energies (floored at f32 epsilon).
    pub use_log_fbank: bool,
    /// Multiply [-1, 1] input by 32768 first (Kaldi works on 16-bit integer scale).
    pub scale_to_int16: bool,
}

impl Default for FbankOptions {
    fn default() -> Self {
        FbankOptions {
            num_mel_bins: 80,
            sample_frequency: 16_000.0,
            frame_length: 25.0,
            frame_shift: 10.0,
            window_type: WindowType::Povey,
            blackman_coeff: 0.42,
            preemphasis_coefficient: 0.97,
            remove_dc_offset: true,
            round_to_power_of_two: true,
            snip_edges: true,
            low_freq: 20.0,
            high_freq: 0.0,
            use_power: true,
            use_log_fbank: true,
            scale_to_int16: true,
        }
    }
}

/// Log-mel energies of a clip, row-major [n_frames, n_bins].
#[derive(Debug, Clone, PartialEq)]
pub struct Fbank {
    /// [n_frames, n_bins] values.
    pub data: Vec<f32>,
    /// Frames (rows).
    pub n_frames: usize,
    /// Mel bins (columns).
    pub n_bins: usize,
    /// Seconds between frame starts.
    pub frame_shift_s: f64,
}

/// A reusable filterbank computer (window, mel matrix and FFT plan built once).
pub struct FbankComputer {
    opts: FbankOptions,
    window_size: usize,
    window_shift: usize,
    padded: usize,
    window: Vec<f64>,
    /// Per bin: first FFT index and the filter weights from there (sparse rows).
    mel: Vec<(usize, Vec<f64>)>,
    fft: Arc<dyn Fft<f64>>,
}

fn mel_scale(f: f64) -> f64 {
    1127.0 * (1.0 + f / 700.0).ln()
}

impl FbankComputer {
    /// Validates `opts` and precomputes the window, the mel filters and the FFT plan.
    pub fn new(opts: FbankOptions) -> Result<Self> {
        let bad = |m: String| Err(Error::InvalidInput(format!("fbank options: {m}")));
        if opts.sample_frequency <= 0.0 || opts.frame_length <= 0.0 || opts.frame_shift <= 0.0 {
            return bad("sample_frequency, frame_length and frame_shift must be positive".into());
        }
        let window_size = (opts.sample_frequency * opts.frame_length * 0.001) as usize;
        let window_shift = (opts.sample_frequency * opts.frame_shift * 0.001) as usize;
        if window_size < 2 || window_shift == 0 {
            return bad(format!("window of {window_size} samples / shift {window_shift} is too small"));
        }
        let padded = if opts.round_to_power_of_two { window_size.next_power_of_two() } else { window_size };
        let nyquist = 0.5 * opts.sample_frequency;
        let high = if opts.high_freq <= 0.0 { opts.high_freq + nyquist } else { opts.high_freq };
        if !(0.0 <= opts.low_freq && opts.low_freq < nyquist && 0.0 < high && high <= nyquist && opts.low_freq < high) {
            return bad(format!("need 0 <= low_freq < high_freq <= {nyquist}; got {} and {high}", opts.low_freq));
        }
        if opts.num_mel_bins < 3 {
            return bad("num_mel_bins must be at least 3".into());
        }

        // The window, computed in f64 (torch computes it in the input dtype; the difference is
        // far below the parity tolerance).
        let n = window_size;
        let a = 2.0 * std::f64::consts::PI / (n - 1) as f64;
        let window: Vec<f64> = (0..n)
            .map(|i| {
                let i = i as f64;
                match opts.window_type {
                    WindowType::Hanning => 0.5 - 0.5 * (a * i).cos(),
                    WindowType::Povey => (0.5 - 0.5 * (a * i).cos()).powf(0.85),
                    WindowType::Hamming => 0.54 - 0.46 * (a * i).cos(),
                    WindowType::Rectangular => 1.0,
                    WindowType::Blackman => {
                        opts.blackman_coeff - 0.5 * (a * i).cos() + (0.5 - opts.blackman_coeff) * (2.0 * a * i).cos()
                    }
                }
            })
            .collect();

        // Triangular filters on the mel scale over FFT bins 0..padded/2 (the Nyquist bin gets
        // weight 0, as in Kaldi).
        let num_fft_bins = padded / 2;
        let fft_bin_width = opts.sample_frequency / padded as f64;
        let mel_low = mel_scale(opts.low_freq);
        let mel_high = mel_scale(high);
        let delta = (mel_high - mel_low) / (opts.num_mel_bins + 1) as f64;
        let mut mel = Vec::with_capacity(opts.num_mel_bins);
        for b in 0..opts.num_mel_bins {
            let left = mel_low + b as f64 * delta;
            let center = left + delta;
            let right = center + delta;
            let mut first = None;
            let mut weights = Vec::new();
            for k in 0..num_fft_bins {
                let m = mel_scale(fft_bin_width * k as f64);
                let up = (m - left) / (center - left);
                let down = (right - m) / (right - center);
                let w = up.min(down).max(0.0);
                if w > 0.0 {
                    let start = *first.get_or_insert(k);
                    weights.resize(k - start, 0.0);
                    weights.push(w);
                }
            }
            mel.push((first.unwrap_or(0), weights));
        }
        let fft = FftPlanner::<f64>::new().plan_fft_forward(padded);
        Ok(FbankComputer { opts, window_size, window_shift, padded, window, mel, fft })
    }

    /// Options in use.
    pub fn options(&self) -> &FbankOptions {
        &self.opts
    }

    /// Number of frames for `n` samples.
    pub fn num_frames(&self, n: usize) -> usize {
        if self.opts.snip_edges {
            if n < self.window_size {
                0
            } else {
                1 + (n - self.window_size) / self.window_shift
            }
        } else {
            (n + self.window_shift / 2) / self.window_shift
        }
    }

    /// Computes the filterbank of mono `samples` (at `sample_frequency`, [-1, 1] scale when
    /// `scale_to_int16`). A clip shorter than one frame gives zero frames, as Kaldi does.
    pub fn compute(&self, samples: &[f32]) -> Fbank {
        let o = &self.opts;
        let scale = if o.scale_to_int16 { 32768.0 } else { 1.0 };
        let n_frames = self.num_frames(samples.len());
        let n_bins = o.num_mel_bins;
        let mut data = vec![0f32; n_frames * n_bins];
        let mut frame = vec![0f64; self.window_size];
        let mut buf = vec![Complex::new(0.0, 0.0); self.padded];
        let mut scratch = vec![Complex::new(0.0, 0.0); self.fft.get_inplace_scratch_len()];
        let mut power = vec![0f64; self.padded / 2 + 1];
        let n = samples.len() as isize;
        for f in 0..n_frames {
            // Kaldi's frame start; without snip_edges frames are centred and edges reflected.
            let start = if o.snip_edges {
                (f * self.window_shift) as isize
            } else {
                (f * self.window_shift) as isize + (self.window_shift as isize) / 2 - (self.window_size as isize) / 2
            };
            for (j, x) in frame.iter_mut().enumerate() {
                let mut s = start + j as isize;
                // Kaldi's reflection: -1 -> 0, -2 -> 1, n -> n-1, ...
                while s < 0 || s >= n {
                    s = if s < 0 { -s - 1 } else { 2 * n - 1 - s };
                }
                *x = f64::from(samples[s as usize]) * scale;
            }
            if o.remove_dc_offset {
                let mean = frame.iter().sum::<f64>() / frame.len() as f64;
                frame.iter_mut().for_each(|x| *x -= mean);
            }
            if o.preemphasis_coefficient != 0.0 {
                let k = o.preemphasis_coefficient;
                for j in (1..frame.len()).rev() {
                    frame[j] -= k * frame[j - 1];
                }
                frame[0] -= k * frame[0];
            }
            for (j, c) in buf.iter_mut().enumerate() {
                *c = Complex::new(if j < frame.len() { frame[j] * self.window[j] } else { 0.0 }, 0.0);
            }
            self.fft.process_with_scratch(&mut buf, &mut scratch);
            for (p, c) in power.iter_mut().zip(&buf) {
                let m2 = c.norm_sqr();
                *p = if o.use_power { m2 } else { m2.sqrt() };
            }
            let row = &mut data[f * n_bins..(f + 1) * n_bins];
            for (out, (first, w)) in row.iter_mut().zip(&self.mel) {
                let e: f64 = w.iter().zip(&power[*first..]).map(|(a, b)| a * b).sum();
                *out = if o.use_log_fbank { e.max(f64::from(f32::EPSILON)).ln() as f32 } else { e as f32 };
            }
        }
        Fbank { data, n_frames, n_bins, frame_shift_s: self.window_shift as f64 / o.sample_frequency }
    }
}

/// One-shot [`FbankComputer::compute`].
pub fn fbank(samples: &[f32], opts: &FbankOptions) -> Result<Fbank> {
    Ok(FbankComputer::new(opts.clone())?.compute(samples))
}
