//! Waveform augmentation for training: gain, additive noise at a chosen SNR, speed
//! perturbation, random crop. All randomness comes from the caller's seeded [`Rng`].

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::audio;
use crate::error::{Error, Result};
use crate::rng::Rng;

/// Waveform augmentation settings (all off by default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct AugmentConfig {
    /// Random gain, uniform in +-`gain_db` dB (0 = off).
    pub gain_db: f64,
    /// Folder of noise recordings mixed in (any format `audio::load` reads).
    pub noise_dir: Option<PathBuf>,
    /// SNR of the added noise in dB.
    pub snr_db: f64,
    /// Share of clips that get noise (0..1).
    pub noise_prob: f64,
    /// Speed factors picked uniformly (e.g. [0.9, 1.0, 1.1]); empty = off.
    pub speeds: Vec<f64>,
}

/// Noise clips loaded once.
pub struct NoiseBank {
    clips: Vec<Vec<f32>>,
}

impl NoiseBank {
    /// Loads every audio file in `dir` at 16 kHz.
    pub fn load(dir: &Path) -> Result<Self> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|source| Error::Open { path: dir.into(), source })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && !p.extension().is_some_and(|e| e == "md" || e == "txt"))
            .collect();
        paths.sort();
        let mut clips = Vec::new();
        for p in &paths {
            clips.push(audio::load_resampled(p, 16_000)?.samples);
        }
        if clips.iter().all(|c| c.is_empty()) {
            return Err(Error::InvalidInput(format!("{}: no noise recordings found", dir.display())));
        }
        Ok(NoiseBank { clips })
    }
}

fn rms(x: &[f32]) -> f64 {
    (x.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / x.len().max(1) as f64).sqrt()
}

/// Applies the configured augmentations to one clip (16 kHz, mono).
pub fn augment(x: &[f32], cfg: &AugmentConfig, noise: Option<&NoiseBank>, rng: &mut Rng) -> Result<Vec<f32>> {
    let mut y = x.to_vec();
    if !cfg.speeds.is_empty() {
        let f = cfg.speeds[rng.below(cfg.speeds.len())];
        if (f - 1.0).abs() > 1e-9 {
            // Playing 16 kHz audio as if it were recorded at 16 kHz * f: faster and higher for f > 1.
            y = audio::resample(&y, (16_000.0 * f).round() as u32, 16_000)?;
        }
    }
    if cfg.gain_db > 0.0 {
        let g = 10f64.powf((rng.uniform() * 2.0 - 1.0) * cfg.gain_db / 20.0) as f32;
        y.iter_mut().for_each(|v| *v *= g);
    }
    if let Some(bank) = noise {
        if rng.uniform() < cfg.noise_prob {
            let clip = &bank.clips[rng.below(bank.clips.len())];
            if !clip.is_empty() {
                let start = if clip.len() > y.len() { rng.below(clip.len() - y.len()) } else { 0 };
                let seg: Vec<f32> = (0..y.len()).map(|i| clip[(start + i) % clip.len()]).collect();
                let (ps, pn) = (rms(&y), rms(&seg));
                if ps > 0.0 && pn > 0.0 {
                    let scale = (ps / pn / 10f64.powf(cfg.snr_db / 20.0)) as f32;
                    y.iter_mut().zip(&seg).for_each(|(v, n)| *v += scale * n);
                }
            }
        }
    }
    Ok(y)
}

/// A random window of `len` samples (the whole clip, zero-padded, when shorter).
pub fn random_crop(x: &[f32], len: usize, rng: &mut Rng) -> Vec<f32> {
    if x.len() <= len {
        return x.to_vec();
    }
    let start = rng.below(x.len() - len + 1);
    x[start..start + len].to_vec()
}

/// Mixes `noise` into `x` at `snr_db` (deterministic; for building noisy test sets).
pub fn mix_at_snr(x: &[f32], noise: &[f32], snr_db: f64) -> Vec<f32> {
    let seg: Vec<f32> = (0..x.len()).map(|i| noise[i % noise.len().max(1)]).collect();
    let (ps, pn) = (rms(x), rms(&seg));
    if ps == 0.0 || pn == 0.0 {
        return x.to_vec();
    }
    let scale = (ps / pn / 10f64.powf(snr_db / 20.0)) as f32;
    x.iter().zip(&seg).map(|(v, n)| v + scale * n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noise_lands_at_the_requested_snr() {
        let x: Vec<f32> = (0..16000).map(|i| (i as f32 * 0.05).sin()).collect();
        let mut r = Rng::new(3);
        let n: Vec<f32> = (0..8000).map(|_| r.normal() as f32).collect();
        let y = mix_at_snr(&x, &n, 10.0);
        let added: Vec<f32> = y.iter().zip(&x).map(|(a, b)| a - b).collect();
        let snr = 20.0 * (rms(&x) / rms(&added)).log10();
        assert!((snr - 10.0).abs() < 1e-4, "{snr}");
    }

    #[test]
    fn speed_perturbation_changes_length() {
        let x = vec![0.1f32; 16000];
        let cfg = AugmentConfig { speeds: vec![1.1], ..Default::default() };
        let y = augment(&x, &cfg, None, &mut Rng::new(1)).unwrap();
        assert_eq!(y.len(), (16000.0f64 / 1.1).round() as usize);
    }
}
