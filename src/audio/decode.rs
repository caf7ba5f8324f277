//! Decoding any supported container/codec to mono f32 through symphonia.
//!
//! Every channel is mixed to mono by the mean (not channel 0), and signal statistics over all
//! channels are gathered in the same pass so that `klspeech inspect` costs one decode.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use symphonia::core::audio::SampleBuffer;
use symphonia::core::codecs::{DecoderOptions, CODEC_TYPE_NULL};
use symphonia::core::errors::Error as SymError;
use symphonia::core::formats::FormatOptions;
use symphonia::core::io::{MediaSourceStream, MediaSourceStreamOptions};
use symphonia::core::meta::MetadataOptions;
use symphonia::core::probe::Hint;

use super::{Audio, AudioInfo, SignalStats};
use crate::error::{Error, Result};

/// Highest sample rate accepted from a header; anything above is a corrupt header, not audio.
pub const MAX_SAMPLE_RATE: u32 = 1_000_000;

/// After this many packets in a row fail to decode, the stream is declared undecodable.
/// It bounds the work on garbage input (never hang) while riding over local corruption.
const MAX_CONSECUTIVE_ERRORS: usize = 256;

/// A container as told by its first bytes (independent of the file name).
fn sniff_container(head: &[u8]) -> Option<&'static str> {
    if head.len() >= 12 && &head[0..4] == b"RIFF" && &head[8..12] == b"WAVE" {
        Some("WAV")
    } else if head.len() >= 12 && &head[0..4] == b"RF64" && &head[8..12] == b"WAVE" {
        Some("WAV (RF64)")
    } else if head.starts_with(b"fLaC") {
        Some("FLAC")
    } else if head.starts_with(b"OggS") {
        Some("OGG")
    } else if head.starts_with(b"ID3")
        || (head.len() >= 2 && head[0] == 0xFF && (head[1] & 0xE0) == 0xE0)
    {
        Some("MP3")
    } else if head.len() >= 12 && &head[0..4] == b"FORM" && (&head[8..12] == b"AIFF" || &head[8..12] == b"AIFC") {
        Some("AIFF")
    } else if head.len() >= 8 && &head[4..8] == b"ftyp" {
        Some("MP4")
    } else if head.starts_with(b"caff") {
        Some("CAF")
    } else if head.starts_with(&[0x1A, 0x45, 0xDF, 0xA3]) {
        Some("MKV/WebM")
    } else {
        None
    }
}

/// A short description of non-audio content, for error messages.
fn describe_non_audio(head: &[u8]) -> String {
    if head.starts_with(b"\x89PNG\r\n\x1a\n") {
        "the file is a PNG image".into()
    } else if head.starts_with(b"\xFF\xD8\xFF") {
        "the file is a JPEG image".into()
    } else if head.starts_with(b"%PDF") {
        "the file is a PDF document".into()
    } else if head.starts_with(b"PK\x03\x04") {
        "the file is a ZIP archive".into()
    } else if !head.is_empty()
        && head.iter().all(|&b| b == b'\n' || b == b'\r' || b == b'\t' || (0x20..0x7F).contains(&b))
    {
        "the file is plain text".into()
    } else {
        "no known audio signature in the first bytes".into()
    }
}

/// Reads the sample rate of a RIFF/WAVE `fmt ` chunk without symphonia, which divides by it
/// while opening the file (a rate of 0 would panic there). `None` if no `fmt ` chunk is found
/// in the first 64 KiB.
fn wav_header_rate(file: &mut File) -> std::io::Result<Option<u32>> {
    let mut buf = vec![0u8; 1 << 16];
    let n = read_up_to(file, &mut buf)?;
    let buf = &buf[..n];
    let mut pos = 12;
    while pos + 8 <= buf.len() {
        let id = &buf[pos..pos + 4];
        let size = u32::from_le_bytes([buf[pos + 4], buf[pos + 5], buf[pos + 6], buf[pos + 7]]) as usize;
        if id == b"fmt " {
            if pos + 16 <= buf.len() {
                return Ok(Some(u32::from_le_bytes([buf[pos + 12], buf[pos + 13], buf[pos + 14], buf[pos + 15]])));
            }
            return Ok(None);
        }
        // Chunks are padded to even sizes.
        pos = pos.saturating_add(8).saturating_add(size + (size & 1));
    }
    Ok(None)
}

/// Decodes `path` to mono f32 at its own sample rate.
///
/// symphonia is called behind `catch_unwind`: a decoder bug triggered by a hostile file must
/// become an error naming the file, never a crash of a training run.
pub fn load(path: &Path) -> Result<Audio> {
    match std::panic::catch_unwind(|| load_inner(path)) {
        Ok(r) => r,
        Err(_) => Err(Error::MalformedHeader {
            path: path.into(),
            detail: "the decoder failed on this file (internal panic); the file is corrupt or unusual: re-encode it, e.g. `sox IN -b 16 OUT.wav`".into(),
        }),
    }
}

fn load_inner(path: &Path) -> Result<Audio> {
    let mut file = File::open(path).map_err(|source| Error::Open { path: path.into(), source })?;
    let len = file.metadata().map_err(|e| Error::io(path, "cannot stat file", e))?.len();
    if len == 0 {
        return Err(Error::EmptyFile { path: path.into() });
    }
    let mut head = [0u8; 16];
    let n_head = read_up_to(&mut file, &mut head).map_err(|e| Error::io(path, "cannot read", e))?;
    let head = &head[..n_head];
    let container = sniff_container(head);
    if container == Some("WAV") {
        let mut f = File::open(path).map_err(|source| Error::Open { path: path.into(), source })?;
        if let Some(rate) = wav_header_rate(&mut f).map_err(|e| Error::io(path, "cannot read", e))? {
            check_rate(path, rate)?;
        }
    }
    let file = File::open(path).map_err(|source| Error::Open { path: path.into(), source })?;

    let mss = MediaSourceStream::new(Box::new(file), MediaSourceStreamOptions::default());
    let mut hint = Hint::new();
    if let Some(ext) = path.extension().and_then(|e| e.to_str()) {
        hint.with_extension(ext);
    }
    let probed = symphonia::default::get_probe()
        .format(
            &hint,
            mss,
            // Gapless: trim MP3/Vorbis encoder delay and padding so durations are the real ones.
            &FormatOptions { enable_gapless: true, ..Default::default() },
            &MetadataOptions::default(),
        )
        .map_err(|e| probe_error(path, container, head, e))?;
    let mut format = probed.format;

    let track = format
        .tracks()
        .iter()
        .find(|t| t.codec_params.codec != CODEC_TYPE_NULL)
        .ok_or_else(|| Error::NoSamples { path: path.into(), detail: ": the file has no audio track".into() })?;
    let track_id = track.id;
    let params = track.codec_params.clone();
    let codec_name = symphonia::default::get_codecs()
        .get_codec(params.codec)
        .map(|d| d.short_name.to_string())
        .unwrap_or_else(|| format!("{:?}", params.codec));

    let header_rate = params.sample_rate;
    if let Some(rate) = header_rate {
        check_rate(path, rate)?;
    }
    let mut decoder = symphonia::default::get_codecs()
        .make(&params, &DecoderOptions { verify: false })
        .map_err(|e| match e {
            SymError::Unsupported(_) => Error::UnsupportedCodec { path: path.into(), codec: codec_name.clone() },
            other => Error::MalformedHeader { path: path.into(), detail: other.to_string() },
        })?;

    let mut mono: Vec<f32> = Vec::new();
    if let Some(n) = params.n_frames {
        // Reserve for the announced length, but never trust a header with gigabytes.
        mono.reserve(n.min(1 << 26) as usize);
    }
    let mut stats = StatsAcc::default();
    let mut sample_buf: Option<SampleBuffer<f32>> = None;
    let mut channels = params.channels.map(|c| c.count()).unwrap_or(0);
    let mut rate = header_rate.unwrap_or(0);
    let mut skipped = 0usize;
    let mut consecutive = 0usize;
    let mut last_error = String::new();

    loop {
        let packet = match format.next_packet() {
            Ok(p) => p,
            Err(SymError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(SymError::ResetRequired) => break,
            Err(SymError::DecodeError(msg)) => {
                // A damaged page/frame header: the reader resyncs on the next call.
                skipped += 1;
                consecutive += 1;
                last_error = msg.to_string();
                if consecutive > MAX_CONSECUTIVE_ERRORS {
                    break;
                }
                continue;
            }
            Err(e) => {
                last_error = e.to_string();
                break;
            }
        };
        if packet.track_id() != track_id {
            continue;
        }
        match decoder.decode(&packet) {
            Ok(decoded) => {
                consecutive = 0;
                let spec = *decoded.spec();
                if spec.rate != rate {
                    check_rate(path, spec.rate)?;
                    if rate != 0 && !mono.is_empty() {
                        return Err(Error::MalformedHeader {
                            path: path.into(),
                            detail: format!("sample rate changes mid-stream ({rate} Hz -> {} Hz)", spec.rate),
                        });
                    }
                    rate = spec.rate;
                }
                let ch = spec.channels.count();
                if ch == 0 {
                    return Err(Error::MalformedHeader { path: path.into(), detail: "zero channels".into() });
                }
                if channels != 0 && ch != channels && !mono.is_empty() {
                    return Err(Error::MalformedHeader {
                        path: path.into(),
                        detail: format!("channel count changes mid-stream ({channels} -> {ch})"),
                    });
                }
                channels = ch;
                let frames = decoded.frames();
                if frames == 0 {
                    continue;
                }
                let buf = match &mut sample_buf {
                    Some(b) if b.capacity() >= frames * ch => b,
                    slot => {
                        *slot = Some(SampleBuffer::<f32>::new(decoded.capacity() as u64, spec));
                        slot.as_mut().expect("just set")
                    }
                };
                buf.copy_interleaved_ref(decoded);
                let interleaved = &buf.samples()[..frames * ch];
                mix_into(&mut mono, &mut stats, interleaved, ch);
            }
            Err(SymError::DecodeError(msg)) => {
                skipped += 1;
                consecutive += 1;
                last_error = msg.to_string();
                if consecutive > MAX_CONSECUTIVE_ERRORS {
                    break;
                }
            }
            Err(SymError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => {
                last_error = e.to_string();
                break;
            }
        }
    }

    if stats.non_finite > 0 {
        return Err(Error::NonFiniteSamples {
            path: path.into(),
            count: stats.non_finite,
            first: stats.first_non_finite,
        });
    }
    // A PCM header that announces more frames than the file holds is a truncated file (an
    // interrupted recording or copy). Refusing it is safer than silently training on a cut clip.
    if let (Some(n_frames), Some(bytes)) = (params.n_frames, params.bits_per_coded_sample.or(params.bits_per_sample)) {
        let is_pcm = codec_name.starts_with("pcm");
        let claimed_bytes = n_frames.saturating_mul(channels as u64).saturating_mul(u64::from(bytes) / 8);
        // 0xFFFFFFFF-ish data sizes are "unknown length" markers written by streaming tools.
        let plausible = claimed_bytes < 0xFFFF_0000;
        if is_pcm && plausible && (mono.len() as u64) < n_frames {
            return Err(Error::Truncated {
                path: path.into(),
                expected_frames: n_frames,
                found_frames: mono.len() as u64,
            });
        }
    }
    if mono.is_empty() {
        let detail = if skipped > 0 || !last_error.is_empty() {
            format!(" ({skipped} packet(s) failed; last error: {last_error})")
        } else {
            " (the audio stream is empty)".into()
        };
        return Err(Error::NoSamples { path: path.into(), detail });
    }
    // Readers that resync over garbage (MP3) drop damaged frames without an error; the
    // announced length (LAME/Xing header, FLAC STREAMINFO) tells how much went missing.
    if let Some(n_frames) = params.n_frames {
        let decoded = mono.len() as u64;
        if !codec_name.starts_with("pcm") && decoded < n_frames && n_frames < (1 << 40) {
            let per_packet = params.max_frames_per_packet.unwrap_or(1152).max(1);
            let missing = (n_frames - decoded).div_ceil(per_packet) as usize;
            skipped = skipped.max(missing);
        }
    }
    if skipped > 0 {
        tracing::warn!("{}: {skipped} damaged packet(s) skipped", path.display());
    }
    if rate == 0 {
        return Err(Error::InvalidSampleRate { path: path.into(), rate: 0 });
    }

    let frames = mono.len();
    let info = AudioInfo {
        container: container.unwrap_or("unknown").to_string(),
        codec: codec_name.clone(),
        sample_rate: rate,
        channels,
        frames,
        duration_s: frames as f64 / f64::from(rate),
        bits_per_sample: params.bits_per_sample.or(if codec_name.starts_with("pcm_f32") {
            Some(32)
        } else if codec_name.starts_with("pcm_f64") {
            Some(64)
        } else {
            None
        }),
        skipped_packets: skipped,
    };
    Ok(Audio { samples: mono, sample_rate: rate, info, stats: stats.finish() })
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn check_rate(path: &Path, rate: u32) -> Result<()> {
    if rate == 0 || rate > MAX_SAMPLE_RATE {
        return Err(Error::InvalidSampleRate { path: path.into(), rate: u64::from(rate) });
    }
    Ok(())
}

/// Maps a probe failure to the variant that tells the user what is wrong.
fn probe_error(path: &Path, container: Option<&str>, head: &[u8], e: SymError) -> Error {
    match (container, e) {
        (None, _) => Error::UnsupportedFormat { path: path.into(), detail: describe_non_audio(head) },
        (Some(c), SymError::Unsupported(what)) => {
            if what.contains("format") || what.contains("codec") || what.contains("sub-type") {
                Error::UnsupportedCodec { path: path.into(), codec: format!("{c}: {what}") }
            } else {
                Error::MalformedHeader { path: path.into(), detail: format!("{c}: {what}") }
            }
        }
        (Some(c), SymError::IoError(io)) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            Error::MalformedHeader { path: path.into(), detail: format!("{c} header is truncated (end of file inside the header)") }
        }
        (Some(c), other) => Error::MalformedHeader { path: path.into(), detail: format!("{c}: {other}") },
    }
}

/// Running statistics over every channel's samples (before mixing).
#[derive(Default)]
struct StatsAcc {
    n: u64,
    sum: f64,
    sum_sq: f64,
    peak: f32,
    clipped: u64,
    non_finite: usize,
    first_non_finite: usize,
    frames_seen: usize,
}

impl StatsAcc {
    fn finish(self) -> SignalStats {
        let n = self.n.max(1) as f64;
        SignalStats {
            peak: self.peak,
            rms: (self.sum_sq / n).sqrt() as f32,
            dc_offset: (self.sum / n) as f32,
            clipped_share: self.clipped as f64 / n,
        }
    }
}

/// Samples at or beyond this magnitude count as clipped (full scale of 16-bit PCM minus 1 LSB).
const CLIP_LEVEL: f32 = 32767.0 / 32768.0;

/// Appends the channel mean of `interleaved` ([frames, ch]) to `mono` and updates `stats`.
fn mix_into(mono: &mut Vec<f32>, stats: &mut StatsAcc, interleaved: &[f32], ch: usize) {
    let inv = 1.0 / ch as f32;
    mono.reserve(interleaved.len() / ch);
    for (f, frame) in interleaved.chunks_exact(ch).enumerate() {
        let mut acc = 0.0f32;
        for &x in frame {
            if !x.is_finite() {
                if stats.non_finite == 0 {
                    stats.first_non_finite = stats.frames_seen + f;
                }
                stats.non_finite += 1;
                continue;
            }
            acc += x;
            let a = x.abs();
            stats.peak = stats.peak.max(a);
            stats.clipped += u64::from(a >= CLIP_LEVEL);
            stats.sum += f64::from(x);
            stats.sum_sq += f64::from(x) * f64::from(x);
        }
        stats.n += ch as u64;
        mono.push(acc * inv);
    }
    stats.frames_seen += interleaved.len() / ch;
}
