//! Band-limited resampling with rubato's windowed-sinc resampler.
//!
//! Quality (documented in the README and measured by `tests/audio.rs`):
//! - 256-tap windowed sinc (Blackman-Harris squared window), cutoff at rubato's
//!   `calculate_cutoff(256, BlackmanHarris2)` (about 0.95 of the lower Nyquist frequency);
//! - for rational ratios whose reduced numerator is at most [`MAX_EXACT_PHASES`] (every common
//!   rate: 8, 11.025, 22.05, 24, 32, 44.1, 48, 96 kHz to 16 kHz), the filter table holds every
//!   needed phase and `Nearest` picks it exactly: a true polyphase (synchronous) resampler, one
//!   dot product per output sample;
//! - other ratios use 256 table phases with cubic interpolation between them.
//!
//! The filter delay is trimmed, so output sample `j` is aligned with input time `j * from / to`,
//! and the output has exactly `round(n * to / from)` samples.

use rubato::{
    calculate_cutoff, Resampler, SincFixedIn, SincInterpolationParameters, SincInterpolationType,
    WindowFunction,
};

use crate::error::{Error, Result};

/// Sinc filter length in taps.
pub const SINC_LEN: usize = 256;
/// Largest reduced upsampling factor served by an exact polyphase table.
pub const MAX_EXACT_PHASES: usize = 1024;
/// Input frames per rubato call.
const CHUNK: usize = 4096;

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Leading zeros to insert and output samples to drop for zero lag.
///
/// rubato 0.16's `SincFixedIn` advances its read position before each output and reads
/// `sinc_len` taps whose centre is one input sample minus one table phase behind: output `n`
/// lands at input time `n / r + D` with `r = to / from` and `D = 1 / r - 1 + 1 / phases`
/// (input samples). Padding `P` zeros and dropping `k` outputs moves that to
/// `n / r + D - P + k / r`; the smallest `k` that makes `P` a whole number zeroes the lag.
/// (Its `output_delay()` reports `sinc_len * r / 2`, which its own start-up already absorbed.)
/// `tests/audio.rs` checks the result with cross-correlation.
fn alignment(from: u32, to: u32, up: usize, phases: usize) -> (usize, usize) {
    let g = gcd(u64::from(from), u64::from(to));
    let (f, t) = (u64::from(from) / g, u64::from(to) / g);
    if up == phases {
        // Exact phases: D = (F - T + 1) / T with from = gF, to = gT.
        for k in 0..=t {
            let num = f * (k + 1) + 1;
            if num >= t && (num - t) % t == 0 {
                return (((num - t) / t) as usize, k as usize);
            }
        }
    }
    // Interpolated phases: round the lead to the nearest input sample (lag under one sample).
    let d = f64::from(from) / f64::from(to) - 1.0 + 1.0 / phases as f64;
    (d.max(0.0).round() as usize, 0)
}

/// Number of output samples for `n` input samples: `round(n * to / from)`.
pub fn output_len(n: usize, from: u32, to: u32) -> usize {
    // Integer rounding avoids float error on long files: (2 n to + from) / (2 from).
    ((2 * n as u128 * to as u128 + from as u128) / (2 * from as u128)) as usize
}

/// Resamples mono `input` from `from` Hz to `to` Hz (see the module docs for the filter).
pub fn resample(input: &[f32], from: u32, to: u32) -> Result<Vec<f32>> {
    let err = |detail: String| Error::Resample { from, to, detail };
    if from == 0 || to == 0 {
        return Err(err("sample rates must be positive".into()));
    }
    if from == to {
        return Ok(input.to_vec());
    }
    let target = output_len(input.len(), from, to);
    if input.is_empty() {
        return Ok(Vec::new());
    }
    let up = (u64::from(to) / gcd(u64::from(from), u64::from(to))) as usize;
    let (interpolation, oversampling_factor) = if up <= MAX_EXACT_PHASES {
        (SincInterpolationType::Nearest, up)
    } else {
        (SincInterpolationType::Cubic, 256)
    };
    let window = WindowFunction::BlackmanHarris2;
    let params = SincInterpolationParameters {
        sinc_len: SINC_LEN,
        f_cutoff: calculate_cutoff(SINC_LEN, window),
        oversampling_factor,
        interpolation,
        window,
    };
    let ratio = f64::from(to) / f64::from(from);
    let chunk = CHUNK;
    let mut rs = SincFixedIn::<f32>::new(ratio, 1.0, params, chunk, 1).map_err(|e| err(e.to_string()))?;
    let (lead, delay) = alignment(from, to, up, oversampling_factor);
    let mut out: Vec<f32> = Vec::with_capacity(target + delay + 2 * chunk);
    let mut buf = rs.output_buffer_allocate(true);

    // `lead` zeros go in first so that, after dropping `delay` outputs, output j sits exactly at
    // input time j * from / to.
    let padded: Vec<f32>;
    let input = if lead > 0 {
        padded = std::iter::repeat_n(0.0, lead).chain(input.iter().copied()).collect();
        &padded[..]
    } else {
        input
    };
    let mut pos = 0;
    while input.len() - pos >= chunk {
        let (used, n_out) =
            rs.process_into_buffer(&[&input[pos..pos + chunk]], &mut buf, None).map_err(|e| err(e.to_string()))?;
        pos += used;
        out.extend_from_slice(&buf[0][..n_out]);
    }
    if pos < input.len() {
        let (_, n_out) = rs
            .process_partial_into_buffer(Some(&[&input[pos..]]), &mut buf, None)
            .map_err(|e| err(e.to_string()))?;
        out.extend_from_slice(&buf[0][..n_out]);
    }
    // Flush the filter's tail until the delayed signal is complete.
    let mut guard = 0;
    while out.len() < delay + target {
        let (_, n_out) =
            rs.process_partial_into_buffer(None::<&[&[f32]]>, &mut buf, None).map_err(|e| err(e.to_string()))?;
        out.extend_from_slice(&buf[0][..n_out]);
        guard += 1;
        if guard > 64 || n_out == 0 {
            return Err(err("resampler did not flush its delay".into()));
        }
    }
    out.drain(..delay);
    out.truncate(target);
    Ok(out)
}
