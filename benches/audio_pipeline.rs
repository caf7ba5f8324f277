//! Decode + mix + resample of 44.1 kHz stereo FLAC speech to 16 kHz mono, one core, beside
//! `sox` doing the same conversion in the same run.
//!
//!     cargo bench --bench audio_pipeline
//!
//! The input is 60 s of the bundled speech fixture (`sox` concatenates it into a temporary
//! FLAC). sox runs `sox IN.flac -e floating-point -b 32 -c 1 -r 16000 OUT.wav` (its default
//! `rate -h` high-quality resampler, float output so no dither), writing to a temporary file;
//! klspeech runs `audio::load_resampled` and keeps the samples in memory. Both are timed as
//! wall time over the whole conversion, best of 7, on one thread (rubato and symphonia are
//! single-threaded; sox is run with `--single-threaded`).

use std::path::Path;
use std::process::Command;
use std::time::Instant;

fn best_of<F: FnMut()>(n: usize, mut f: F) -> f64 {
    let mut best = f64::INFINITY;
    for _ in 0..n {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    best
}

fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    let src = Path::new("audio_fixtures/speech-44k1-stereo-s16.flac");
    let long = dir.path().join("speech-60s-44k1-stereo.flac");
    // 1.143 s x 53 ~= 60 s.
    let mut args: Vec<String> = vec!["--combine".into(), "concatenate".into()];
    args.extend(std::iter::repeat_n(src.display().to_string(), 53));
    args.push(long.display().to_string());
    let ok = Command::new("sox").args(&args).status().map(|s| s.success()).unwrap_or(false);
    if !ok {
        eprintln!("this benchmark needs sox (apt-get install sox libsox-fmt-all)");
        std::process::exit(2);
    }
    let audio_s = klspeech::audio::load(&long).expect("decode").duration_s();

    let ours = best_of(7, || {
        let a = klspeech::audio::load_resampled(&long, 16_000).expect("load");
        assert_eq!(a.sample_rate, 16_000);
    });
    let out = dir.path().join("out.wav");
    let sox = best_of(7, || {
        let st = Command::new("sox")
            .arg("--single-threaded")
            .arg(&long)
            .args(["-e", "floating-point", "-b", "32", "-c", "1", "-r", "16000"])
            .arg(&out)
            .status()
            .expect("sox");
        assert!(st.success());
    });
    println!("input: {audio_s:.1} s of 44.1 kHz stereo FLAC speech -> 16 kHz mono f32");
    println!("| tool | wall s | audio-seconds per second |");
    println!("|---|---|---|");
    println!("| klspeech (symphonia + rubato) | {ours:.4} | {:.0} |", audio_s / ours);
    println!("| sox 14.4 (rate -h) | {sox:.4} | {:.0} |", audio_s / sox);
    println!("klspeech / sox throughput ratio: {:.2}", sox / ours);
}
