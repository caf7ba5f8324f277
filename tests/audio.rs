//! Audio in: every fixture format decodes, channels are mixed by their mean, resampling keeps
//! frequency, amplitude and timing, and every broken file is an error that names the file.

use std::path::{Path, PathBuf};

use klspeech::audio::{self, load, load_resampled, output_len, resample};
use klspeech::Error;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("audio_fixtures").join(name)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, |m: f32, d| if d.is_nan() { f32::INFINITY } else { m.max(d) }) // (f32::max passes over NaN)
}

/// (file, container, codec prefix, rate, channels, bits, min duration, max duration)
type Good = (&'static str, &'static str, &'static str, u32, usize, Option<u32>, f64, f64);
const GOOD: &[Good] = &[
    ("speech-8k-mono-u8.wav", "WAV", "pcm_u8", 8000, 1, Some(8), 1.1, 1.2),
    ("speech-16k-mono-s16.wav", "WAV", "pcm_s16le", 16000, 1, Some(16), 1.19, 1.21),
    ("speech-22k05-mono-s24.wav", "WAV", "pcm_s24le", 22050, 1, Some(24), 1.1, 1.2),
    ("speech-48k-stereo-s32.wav", "WAV", "pcm_s32le", 48000, 2, Some(32), 0.34, 0.36),
    ("speech-16k-mono-f32.wav", "WAV", "pcm_f32le", 16000, 1, Some(32), 1.19, 1.21),
    ("speech-16k-mono-f64.wav", "WAV", "pcm_f64le", 16000, 1, Some(64), 1.19, 1.21),
    ("speech-48k-stereo-s24-extensible.wav", "WAV", "pcm_s24le", 48000, 2, Some(24), 0.39, 0.41),
    ("speech-44k1-quad-s16-extensible.wav", "WAV", "pcm_s16le", 44100, 4, Some(16), 0.34, 0.36),
    ("speech-16k-mono-s16.flac", "FLAC", "flac", 16000, 1, Some(16), 1.19, 1.21),
    ("speech-22k05-mono-s16.flac", "FLAC", "flac", 22050, 1, Some(16), 1.1, 1.2),
    ("speech-44k1-stereo-s16.flac", "FLAC", "flac", 44100, 2, Some(16), 1.1, 1.2),
    ("speech-48k-stereo-s24.flac", "FLAC", "flac", 48000, 2, Some(24), 0.99, 1.01),
    ("speech-16k-mono.mp3", "MP3", "mp3", 16000, 1, None, 1.1, 1.3),
    ("speech-44k1-stereo.mp3", "MP3", "mp3", 44100, 2, None, 1.1, 1.2),
    ("speech-16k-mono-vorbis.ogg", "OGG", "vorbis", 16000, 1, None, 1.15, 1.25),
    ("speech-44k1-stereo-vorbis.ogg", "OGG", "vorbis", 44100, 2, None, 1.1, 1.2),
    ("sine1k-8k-mono-s16.wav", "WAV", "pcm_s16le", 8000, 1, Some(16), 1.0, 1.0),
    ("sine1k-22k05-mono-f32.wav", "WAV", "pcm_f32le", 22050, 1, Some(32), 1.0, 1.0),
    ("sine1k-44k1-mono-s16.flac", "FLAC", "flac", 44100, 1, Some(16), 1.0, 1.0),
    ("sine1k-48k-stereo-s16.wav", "WAV", "pcm_s16le", 48000, 2, Some(16), 1.0, 1.0),
];

#[test]
fn every_good_fixture_decodes_with_its_declared_format() {
    for &(name, container, codec, rate, ch, bits, dmin, dmax) in GOOD {
        let a = load(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(a.info.container, container, "{name}");
        assert!(a.info.codec.starts_with(codec), "{name}: codec {}", a.info.codec);
        assert_eq!(a.sample_rate, rate, "{name}");
        assert_eq!(a.info.channels, ch, "{name}");
        if bits.is_some() {
            assert_eq!(a.info.bits_per_sample, bits, "{name}");
        }
        let d = a.duration_s();
        assert!(d >= dmin - 1e-9 && d <= dmax + 1e-9, "{name}: duration {d}");
        assert_eq!(a.info.skipped_packets, 0, "{name}");
        assert!(a.stats.peak > 0.1 && a.stats.peak <= 1.0, "{name}: peak {}", a.stats.peak);
        assert!(a.samples.iter().all(|x| x.is_finite()));
    }
}

#[test]
fn pcm_float_and_flac_encodings_of_one_clip_decode_identically() {
    let s16 = load(&fixture("speech-16k-mono-s16.wav")).unwrap().samples;
    for other in ["speech-16k-mono-f32.wav", "speech-16k-mono-f64.wav", "speech-16k-mono-s16.flac"] {
        let o = load(&fixture(other)).unwrap().samples;
        assert_eq!(max_abs_diff(&s16, &o), 0.0, "{other}");
    }
}

#[test]
fn stereo_is_mixed_by_the_channel_mean_not_channel_zero() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lr.wav");
    let spec = hound::WavSpec { channels: 2, sample_rate: 16000, bits_per_sample: 16, sample_format: hound::SampleFormat::Int };
    let mut w = hound::WavWriter::create(&path, spec).unwrap();
    for i in 0..1600i32 {
        w.write_sample(((i % 100) * 100) as i16).unwrap(); // left: ramp
        w.write_sample(-8000i16).unwrap(); // right: constant
    }
    w.finalize().unwrap();
    let a = load(&path).unwrap();
    assert_eq!(a.info.channels, 2);
    for (i, &m) in a.samples.iter().enumerate() {
        let expect = (((i as i32 % 100) * 100) as f32 / 32768.0 + (-8000.0 / 32768.0)) / 2.0;
        assert!((m - expect).abs() < 1e-7, "frame {i}: {m} vs {expect}");
    }
    // Fixture: right = left / 2, so the mix is 0.75 x left and its peak is 0.75 x the left peak.
    let st = load(&fixture("speech-44k1-stereo-s16.flac")).unwrap();
    let mono_peak = st.samples.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!((mono_peak / st.stats.peak - 0.75).abs() < 2e-3, "mix peak {mono_peak} vs channel peak {}", st.stats.peak);
}

#[test]
fn integer_widths_are_scaled_to_unit_full_scale() {
    let dir = tempfile::tempdir().unwrap();
    for bits in [8u16, 16, 24, 32] {
        let path = dir.path().join(format!("b{bits}.wav"));
        let spec = hound::WavSpec { channels: 1, sample_rate: 16000, bits_per_sample: bits, sample_format: hound::SampleFormat::Int };
        let mut w = hound::WavWriter::create(&path, spec).unwrap();
        let full = 1i64 << (bits - 1);
        for v in [full / 2, -full / 4, 0, full - 1] {
            w.write_sample(v as i32).unwrap();
        }
        w.finalize().unwrap();
        let a = load(&path).unwrap();
        let expect = [0.5f32, -0.25, 0.0, 1.0 - 1.0 / full as f32];
        assert!(max_abs_diff(&a.samples, &expect) < 1e-6, "{bits}-bit: {:?}", a.samples);
    }
}

#[test]
fn a_corrupt_stretch_is_skipped_and_counted() {
    let good = load(&fixture("speech-44k1-stereo.mp3")).unwrap();
    let bad = load(&fixture("speech-44k1-stereo-corrupt-middle.mp3")).unwrap();
    assert!(bad.info.skipped_packets >= 1, "skipped {}", bad.info.skipped_packets);
    assert!(bad.duration_s() > 1.0, "decoded {} s", bad.duration_s());
    assert!(bad.samples.len() < good.samples.len());
}

/// Goertzel-free frequency estimate: interpolated zero crossings over the clip.
fn zero_crossing_freq(x: &[f32], rate: f64) -> f64 {
    let mut crossings = Vec::new();
    for i in 1..x.len() {
        if x[i - 1] < 0.0 && x[i] >= 0.0 {
            let t = (i - 1) as f64 + f64::from(-x[i - 1]) / f64::from(x[i] - x[i - 1]);
            crossings.push(t);
        }
    }
    let n = crossings.len() - 1;
    rate * n as f64 / (crossings[n] - crossings[0])
}

fn check_sine_1k(y: &[f32], label: &str) {
    // Skip the edges, where the band-limited signal starts and stops.
    let mid = &y[800..y.len() - 800];
    let f = zero_crossing_freq(mid, 16000.0);
    assert!((f - 1000.0).abs() < 1.0, "{label}: frequency {f}");
    let rms = (mid.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / mid.len() as f64).sqrt();
    let amp = rms * std::f64::consts::SQRT_2;
    assert!((amp / 0.5 - 1.0).abs() < 0.01, "{label}: amplitude {amp}");
    // Lag: cross-correlate with the ideal 16 kHz sine of phase 0 at t = 0.
    let ideal: Vec<f64> = (0..y.len()).map(|j| 0.5 * (2.0 * std::f64::consts::PI * 1000.0 * j as f64 / 16000.0).sin()).collect();
    let mut best = (i64::MIN, f64::MIN);
    for lag in -8i64..=8 {
        let mut acc = 0.0;
        for j in 800..y.len() - 800 {
            acc += f64::from(y[j]) * ideal[(j as i64 + lag) as usize];
        }
        if acc > best.1 {
            best = (lag, acc);
        }
    }
    assert!(best.0.abs() <= 1, "{label}: cross-correlation peak at lag {}", best.0);
}

#[test]
fn resampled_sines_keep_frequency_amplitude_and_timing() {
    for rate in [8000u32, 22050, 44100, 48000] {
        let x: Vec<f32> = (0..rate as usize)
            .map(|i| (0.5 * (2.0 * std::f64::consts::PI * 1000.0 * i as f64 / f64::from(rate)).sin()) as f32)
            .collect();
        let y = resample(&x, rate, 16000).unwrap();
        assert_eq!(y.len(), output_len(x.len(), rate, 16000));
        assert_eq!(y.len(), 16000, "{rate}");
        check_sine_1k(&y, &format!("synthetic {rate} Hz"));
    }
    for name in ["sine1k-8k-mono-s16.wav", "sine1k-22k05-mono-f32.wav", "sine1k-44k1-mono-s16.flac", "sine1k-48k-stereo-s16.wav"] {
        let a = load_resampled(&fixture(name), 16000).unwrap();
        assert_eq!(a.samples.len(), 16000, "{name}");
        check_sine_1k(&a.samples, name);
    }
}

#[test]
fn output_length_is_rounded_for_odd_lengths_and_rates() {
    for (n, from) in [(1usize, 44100u32), (7, 22050), (12345, 44100), (999, 48000), (1001, 11025), (4410, 44099)] {
        let x = vec![0.1f32; n];
        let y = resample(&x, from, 16000).unwrap();
        let expect = ((n as f64) * 16000.0 / f64::from(from)).round() as usize;
        assert_eq!(y.len(), expect, "n={n} from={from}");
    }
    assert!(resample(&[], 44100, 16000).unwrap().is_empty());
    assert!(matches!(resample(&[0.0], 0, 16000), Err(Error::Resample { .. })));
}

/// Each broken fixture, and the error it must give.
fn expected_error(name: &str, e: &Error) -> bool {
    match name {
        "empty.wav" => matches!(e, Error::EmptyFile { .. }),
        "random-bytes.wav" | "png-named.wav" | "text-named.flac" => matches!(e, Error::UnsupportedFormat { .. }),
        "truncated-header.wav" => matches!(e, Error::MalformedHeader { .. }),
        "data-overpromise.wav" | "data-overpromise-empty.wav" => matches!(e, Error::Truncated { .. }),
        "zero-samples.wav" => matches!(e, Error::NoSamples { .. }),
        "nan-f32.wav" | "inf-f32.wav" => matches!(e, Error::NonFiniteSamples { .. }),
        "rate-0.wav" | "rate-2mhz.wav" => matches!(e, Error::InvalidSampleRate { .. }),
        "unsupported-codec-opus.ogg" | "unsupported-codec-gsm.wav" => matches!(e, Error::UnsupportedCodec { .. }),
        other => panic!("broken fixture {other} has no expected error in this test"),
    }
}

#[test]
fn every_broken_file_is_a_specific_error_naming_the_file() {
    let dir = fixture("broken");
    let mut seen = 0;
    let mut entries: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for path in entries {
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        if name.ends_with(".md") {
            continue;
        }
        let err = load(&path).expect_err(&name);
        assert!(expected_error(&name, &err), "{name}: unexpected error {err:?}");
        let msg = err.to_string();
        assert!(msg.starts_with(&path.display().to_string()), "{name}: message does not name the file: {msg}");
        seen += 1;
    }
    assert_eq!(seen, 14, "number of broken fixtures");
    let missing = dir.join("does-not-exist.wav");
    let err = load(&missing).unwrap_err();
    assert!(matches!(err, Error::Open { .. }), "{err:?}");
    assert!(err.to_string().contains("does-not-exist.wav"));
}

#[test]
fn exact_messages_for_common_mistakes() {
    let p = fixture("broken/png-named.wav");
    assert_eq!(
        load(&p).unwrap_err().to_string(),
        format!("{}: not a supported audio file (the file is a PNG image); supported: WAV, FLAC, MP3, OGG Vorbis", p.display())
    );
    let p = fixture("broken/rate-0.wav");
    assert_eq!(load(&p).unwrap_err().to_string(), format!("{}: invalid sample rate 0 Hz (expected 1 Hz to 1 MHz)", p.display()));
    let p = fixture("broken/empty.wav");
    assert_eq!(load(&p).unwrap_err().to_string(), format!("{}: the file is empty (0 bytes)", p.display()));
}

#[test]
fn the_cli_exits_non_zero_with_the_message() {
    let bin = env!("CARGO_BIN_EXE_klspeech");
    let bad = fixture("broken/nan-f32.wav");
    let out = std::process::Command::new(bin).arg("inspect").arg(&bad).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&bad.display().to_string()) && err.contains("NaN or infinite"), "{err}");

    let good = fixture("speech-44k1-stereo-s16.flac");
    let out = std::process::Command::new(bin).args(["inspect", "--json"]).arg(&good).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["sample_rate"], 44100);
    assert_eq!(v["channels"], 2);
    assert_eq!(v["container"], "FLAC");
    assert!(v["peak_dbfs"].as_f64().unwrap() < 0.0);
}

#[test]
fn stats_report_levels_and_dc() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dc.wav");
    let spec = hound::WavSpec { channels: 1, sample_rate: 16000, bits_per_sample: 32, sample_format: hound::SampleFormat::Float };
    let mut w = hound::WavWriter::create(&path, spec).unwrap();
    // 0.25 DC + a full-scale sample every 10th frame.
    for i in 0..1000 {
        w.write_sample(if i % 10 == 0 { 1.0f32 } else { 0.25 }).unwrap();
    }
    w.finalize().unwrap();
    let a = audio::load(&path).unwrap();
    assert!((a.stats.clipped_share - 0.1).abs() < 1e-12);
    assert!((a.stats.dc_offset - 0.325).abs() < 1e-6);
    assert!((a.stats.peak_dbfs() - 0.0).abs() < 1e-9);
    let rms = (0.1f64 + 0.9 * 0.0625).sqrt();
    assert!((f64::from(a.stats.rms) - rms).abs() < 1e-6);
}

#[test]
fn an_impulse_lands_exactly_where_its_time_maps() {
    // Sub-sample peak position of a resampled impulse: exact-phase ratios are aligned to a
    // small fraction of a sample, interpolated ones within one sample.
    for (rate, tol) in [(8000u32, 0.02f64), (22050, 0.02), (44100, 0.02), (48000, 0.02), (11025, 0.02), (44099, 1.0)] {
        for p in [rate as usize / 2, rate as usize / 3 + 7] {
            let mut x = vec![0f32; rate as usize];
            x[p] = 1.0;
            let y = resample(&x, rate, 16000).unwrap();
            let i = y.iter().enumerate().fold((0, f32::MIN), |m, (i, &v)| if v > m.1 { (i, v) } else { m }).0;
            let (a, b, c) = (f64::from(y[i - 1]), f64::from(y[i]), f64::from(y[i + 1]));
            let peak = i as f64 + 0.5 * (a - c) / (a - 2.0 * b + c);
            let expect = p as f64 * 16000.0 / f64::from(rate);
            // Off the output grid a parabola through three samples of a sinc is itself biased
            // by up to ~0.1 sample.
            let tol = if expect.fract() == 0.0 { tol } else { tol.max(0.15) };
            assert!((peak - expect).abs() <= tol, "{rate} Hz, impulse at {p}: peak {peak:.3} vs {expect:.3}");
        }
    }
}
