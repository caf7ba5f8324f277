//! `klspeech inspect AUDIO... [--png FILE] [--json]`

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use klspeech::audio;
use klspeech::features::{FbankComputer, FbankOptions};
use klspeech::plot;

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Audio files (WAV, FLAC, MP3, OGG Vorbis).
    #[arg(required = true)]
    pub audio: Vec<PathBuf>,
    /// Write a log-mel spectrogram (80 Kaldi fbank bins at 16 kHz) to this PNG. With several
    /// inputs, `-N-<stem>` is inserted before `.png` for the N-th file.
    #[arg(long, value_name = "FILE")]
    pub png: Option<PathBuf>,
    /// One JSON object per file instead of the table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: InspectArgs) -> anyhow::Result<()> {
    let mut failures = 0usize;
    let many = args.audio.len() > 1;
    for (i, path) in args.audio.iter().enumerate() {
        match inspect_one(path, &args, i, many) {
            Ok(()) => {}
            Err(e) => {
                failures += 1;
                eprintln!("error: {}", super::report(&e));
            }
        }
    }
    if failures > 0 {
        bail!("{failures} of {} file(s) could not be read", args.audio.len());
    }
    Ok(())
}

fn png_path(base: &Path, index: usize, input: &Path, many: bool) -> PathBuf {
    if !many {
        return base.to_path_buf();
    }
    let stem = base.file_stem().and_then(|s| s.to_str()).unwrap_or("spectrogram");
    let input_stem = input.file_stem().and_then(|s| s.to_str()).unwrap_or("audio");
    base.with_file_name(format!("{stem}-{}-{input_stem}.png", index + 1))
}

fn inspect_one(path: &Path, args: &InspectArgs, index: usize, many: bool) -> anyhow::Result<()> {
    let a = audio::load(path)?;
    let info = &a.info;
    let s = &a.stats;
    if args.json {
        let v = serde_json::json!({
            "path": path.display().to_string(),
            "container": info.container,
            "codec": info.codec,
            "bits_per_sample": info.bits_per_sample,
            "sample_rate": info.sample_rate,
            "channels": info.channels,
            "frames": info.frames,
            "duration_s": info.duration_s,
            "peak_dbfs": finite_or_null(s.peak_dbfs()),
            "rms_dbfs": finite_or_null(s.rms_dbfs()),
            "clipped_share": s.clipped_share,
            "dc_offset": s.dc_offset,
            "skipped_packets": info.skipped_packets,
        });
        println!("{v}");
    } else {
        let bits = info.bits_per_sample.map(|b| format!(", {b}-bit")).unwrap_or_default();
        println!("{}", path.display());
        println!("  format     {} / {}{}", info.container, info.codec, bits);
        println!("  rate       {} Hz", info.sample_rate);
        println!("  channels   {}", info.channels);
        println!("  duration   {:.3} s ({} frames)", info.duration_s, info.frames);
        println!("  peak       {:.1} dBFS", s.peak_dbfs());
        println!("  rms        {:.1} dBFS", s.rms_dbfs());
        println!("  clipped    {:.3} %", 100.0 * s.clipped_share);
        println!("  dc offset  {:+.5}", s.dc_offset);
        if info.skipped_packets > 0 {
            println!("  damaged    {} packet(s) could not be decoded and were skipped", info.skipped_packets);
        }
    }
    if let Some(base) = &args.png {
        let out = png_path(base, index, path, many);
        let samples = audio::resample(&a.samples, a.sample_rate, 16_000)?;
        let fb = FbankComputer::new(FbankOptions::default())?.compute(&samples);
        if fb.n_frames == 0 {
            bail!("{}: too short for a spectrogram (under 25 ms)", path.display());
        }
        let title = format!("{} - log-mel (80 bins, 16 kHz)", path.file_name().and_then(|f| f.to_str()).unwrap_or(""));
        plot::spectrogram_png(&out, &fb.data, fb.n_frames, fb.n_bins, fb.frame_shift_s as f32, &title)
            .with_context(|| format!("drawing the spectrogram of {}", path.display()))?;
        if !args.json {
            println!("  spectrogram {}", out.display());
        }
    }
    Ok(())
}

fn finite_or_null(x: f64) -> serde_json::Value {
    if x.is_finite() {
        serde_json::json!(x)
    } else {
        serde_json::Value::Null
    }
}
