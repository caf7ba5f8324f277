//! Checking a data set before training, so that every broken clip is reported at once
//! instead of one per failed run.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use super::text::CharIndex;
use super::{normalize_transcript, Case, Dataset, Source, SAMPLE_RATE};
use crate::error::Error;
use crate::model::Wav2Vec2Config;
use crate::vocab::CharVocab;

/// What [`validate`] checks against. The text settings must be the ones the trainer uses.
#[derive(Debug, Clone)]
pub struct ValidateOptions {
    /// The CTC vocabulary: transcripts with characters outside it are reported (even when it
    /// has `[UNK]`: training towards `[UNK]` is almost always a normalization mistake).
    pub vocab: Option<CharVocab>,
    /// Characters removed from transcripts before the checks, as
    /// [`super::normalize_transcript`] removes them.
    pub chars_to_ignore: String,
    /// The letter case the run gives its transcripts ([`super::TextCase::resolve`]).
    pub case: Case,
    /// The model: its feature encoder's frame count ([`Wav2Vec2Config::frames_for_samples`])
    /// enables the CTC length check and, for labelled clips, the zero-frames check.
    pub config: Option<Wav2Vec2Config>,
    /// Shortest clip accepted, in seconds (default 0).
    pub min_duration_s: f64,
    /// Longest clip accepted, in seconds (default infinite). Long clips cost quadratic
    /// attention memory; Hugging Face recipes cap them around 10-20 s.
    pub max_duration_s: f64,
}

impl Default for ValidateOptions {
    fn default() -> Self {
        ValidateOptions {
            vocab: None,
            chars_to_ignore: String::new(),
            case: Case::Keep,
            config: None,
            min_duration_s: 0.0,
            max_duration_s: f64::INFINITY,
        }
    }
}

/// The kinds of problem, in the order the report lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProblemKind {
    /// The audio file does not exist.
    MissingAudio,
    /// The audio file exists but cannot be decoded (or a segment lies beyond its end).
    UnreadableAudio,
    /// The class id is not an index into the label list.
    InvalidLabel,
    /// The transcript is empty after normalization.
    EmptyTranscript,
    /// The transcript has characters the vocabulary lacks.
    OutOfVocabulary,
    /// Fewer model frames than the CTC target needs (target length + adjacent repeats, since
    /// CTC must put a blank between two equal tokens): the CTC loss would be infinite.
    TooShortForCtc,
    /// Shorter than `min_duration_s`, or no model frames at all.
    TooShort,
    /// Longer than `max_duration_s`.
    TooLong,
}

impl ProblemKind {
    /// What is wrong, for the report.
    pub fn describe(self) -> &'static str {
        match self {
            ProblemKind::MissingAudio => "missing audio file",
            ProblemKind::UnreadableAudio => "unreadable audio",
            ProblemKind::InvalidLabel => "invalid class id",
            ProblemKind::EmptyTranscript => "empty transcript",
            ProblemKind::OutOfVocabulary => "characters outside the vocabulary",
            ProblemKind::TooShortForCtc => "too short for its CTC transcript",
            ProblemKind::TooShort => "too short",
            ProblemKind::TooLong => "too long",
        }
    }

    /// How to fix it, for the report.
    pub fn fix(self) -> &'static str {
        match self {
            ProblemKind::MissingAudio => "correct the paths in the manifest (relative paths start at the manifest's folder) or restore the files",
            ProblemKind::UnreadableAudio => "re-encode the files (e.g. `sox IN -r 16000 -c 1 -b 16 OUT.wav`) or remove them",
            ProblemKind::InvalidLabel => "the label list does not match the class ids; rebuild the data set",
            ProblemKind::EmptyTranscript => "write the transcripts, or remove the rows",
            ProblemKind::OutOfVocabulary => "remove punctuation with --chars-to-ignore (its value replaces the default list), fold letters to the vocabulary's case with --text-case lower or upper, or fine-tune from a copy of the model folder without vocab.json to build the vocabulary from the training text",
            ProblemKind::TooShortForCtc => "the audio is too short for its transcript: check that transcript and audio belong together",
            ProblemKind::TooShort => "remove the clips or lower --min-duration-s",
            ProblemKind::TooLong => "split the recordings into shorter clips or raise --max-duration-s",
        }
    }
}

/// One problem of one clip.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// Index of the clip in [`Dataset::examples`].
    pub index: usize,
    /// Its audio file.
    pub path: PathBuf,
    /// What is wrong.
    pub kind: ProblemKind,
    /// Details (the decoder's error text, the missing characters, the frame counts, ...).
    pub detail: String,
}

/// The result of [`validate`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ValidationReport {
    /// Every problem found, by clip index, a clip may have several.
    pub problems: Vec<Problem>,
    /// Number of clips checked.
    pub checked: usize,
    /// Duration in seconds of each clip (same indices as the data set), measured while
    /// checking so that length-bucketed batching needs no second decode; `NaN` where the audio
    /// could not be read (sort with `f64::total_cmp`).
    pub durations: Vec<f64>,
}

impl ValidationReport {
    /// Whether no problem was found.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// Indices of the clips with at least one problem, sorted.
    pub fn bad_indices(&self) -> BTreeSet<usize> {
        self.problems.iter().map(|p| p.index).collect()
    }

    /// Number of problems of `kind`.
    pub fn count(&self, kind: ProblemKind) -> usize {
        self.problems.iter().filter(|p| p.kind == kind).count()
    }

    /// The data set without the clips that have problems, and how many were dropped. Use it
    /// only on the data set that was validated (the indices refer to it).
    pub fn drop_bad(&self, ds: &Dataset) -> (Dataset, usize) {
        let bad = self.bad_indices();
        let examples: Vec<_> =
            ds.examples.iter().enumerate().filter(|(i, _)| !bad.contains(i)).map(|(_, e)| e.clone()).collect();
        let dropped = ds.examples.len() - examples.len();
        (Dataset { examples, labels: ds.labels.clone() }, dropped)
    }

    /// [`ValidationReport::durations`] of the clips [`ValidationReport::drop_bad`] keeps, in order.
    pub fn kept_durations(&self) -> Vec<f64> {
        let bad = self.bad_indices();
        self.durations.iter().enumerate().filter(|(i, _)| !bad.contains(i)).map(|(_, &d)| d).collect()
    }
}

/// How many paths of each kind the report shows.
const SHOWN: usize = 5;

impl fmt::Display for ValidationReport {
    /// All problems at once: per kind, the count, the first five clips with details and the fix.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let known: Vec<f64> = self.durations.iter().copied().filter(|d| d.is_finite()).collect();
        let total: f64 = known.iter().sum();
        let stats = if known.is_empty() {
            String::new()
        } else {
            let min = known.iter().copied().fold(f64::INFINITY, f64::min);
            let max = known.iter().copied().fold(0.0, f64::max);
            format!(" ({:.2} h of audio, clips {min:.2}-{max:.2} s)", total / 3600.0)
        };
        if self.problems.is_empty() {
            return write!(f, "checked {} clips{stats}: no problems", self.checked);
        }
        let bad = self.bad_indices().len();
        writeln!(f, "checked {} clips{stats}: {bad} with problems", self.checked)?;
        let mut by_kind: BTreeMap<ProblemKind, Vec<&Problem>> = BTreeMap::new();
        for p in &self.problems {
            by_kind.entry(p.kind).or_default().push(p);
        }
        for (kind, list) in &by_kind {
            writeln!(f, "{} ({} clip{}):", kind.describe(), list.len(), if list.len() == 1 { "" } else { "s" })?;
            for p in list.iter().take(SHOWN) {
                writeln!(f, "  {}: {}", p.path.display(), p.detail)?;
            }
            if list.len() > SHOWN {
                writeln!(f, "  ... and {} more", list.len() - SHOWN)?;
            }
            writeln!(f, "  fix: {}", kind.fix())?;
        }
        write!(f, "fix the clips above, or pass --skip-bad to drop the {bad} bad clip{} (nothing is dropped otherwise)", if bad == 1 { "" } else { "s" })
    }
}

/// The decoded length of one audio file: 16 kHz samples and duration, or the problem.
type Probe = std::result::Result<(usize, f64), (ProblemKind, String)>;

fn probe(path: &Path) -> Probe {
    match crate::audio::load(path) {
        Ok(a) => Ok((crate::audio::output_len(a.samples.len(), a.sample_rate, SAMPLE_RATE), a.info.duration_s)),
        Err(e) => {
            let kind = match &e {
                Error::Open { source, .. } if source.kind() == std::io::ErrorKind::NotFound => ProblemKind::MissingAudio,
                _ => ProblemKind::UnreadableAudio,
            };
            // The report prints the path already.
            let text = e.to_string();
            let prefix = format!("{}: ", path.display());
            Err((kind, text.strip_prefix(&prefix).map(str::to_string).unwrap_or(text)))
        }
    }
}

/// A transcript for messages: quoted, cut after 60 characters.
fn short(text: &str) -> String {
    if text.chars().count() <= 60 {
        format!("{text:?}")
    } else {
        format!("{:?}...", text.chars().take(60).collect::<String>())
    }
}

/// Checks every clip of `ds` and reports all problems at once; drops nothing (see
/// [`ValidationReport::drop_bad`]).
///
/// Each audio file is decoded once (a noise recording that many `_silence_` segments cut from,
/// too) and its duration kept in [`ValidationReport::durations`]. Checks: the audio exists and
/// decodes (the decoder's message is kept); a segment lies inside its file; the class id is in
/// range; the transcript is not empty after normalization; its characters are in the
/// vocabulary (all missing ones listed); the model has at least `target length + adjacent
/// repeats` output frames for it (CTC), or at least one frame for a labelled clip; the
/// duration lies within the limits.
pub fn validate(ds: &Dataset, opts: &ValidateOptions) -> ValidationReport {
    let index = opts.vocab.as_ref().map(CharIndex::new);
    let mut cache: HashMap<&Path, Probe> = HashMap::new();
    let mut report = ValidationReport { checked: ds.examples.len(), ..Default::default() };
    for (i, ex) in ds.examples.iter().enumerate() {
        let path = ex.source.path();
        let mut problem = |kind, detail: String| {
            report.problems.push(Problem { index: i, path: path.to_path_buf(), kind, detail });
        };
        let probed = cache.entry(path).or_insert_with(|| probe(path)).clone();
        let audio = match (probed, &ex.source) {
            (Err((kind, detail)), _) => {
                problem(kind, detail);
                None
            }
            (Ok(len), Source::File(_)) => Some(len),
            (Ok((n, _)), &Source::Segment { start, len, .. }) => {
                if start.checked_add(len).is_some_and(|end| end <= n) {
                    Some((len, len as f64 / f64::from(SAMPLE_RATE)))
                } else {
                    problem(
                        ProblemKind::UnreadableAudio,
                        format!("segment of {len} samples at sample {start} lies beyond the end of the file ({n} samples at 16 kHz)"),
                    );
                    None
                }
            }
        };
        if let Some(l) = ex.label {
            if l >= ds.labels.len() {
                problem(ProblemKind::InvalidLabel, format!("class id {l}, but there are {} labels", ds.labels.len()));
            }
        }
        let frames = audio.and_then(|(n, _)| opts.config.as_ref().map(|c| (n, c.frames_for_samples(n))));
        if let Some(text) = &ex.text {
            let norm = normalize_transcript(text, &opts.chars_to_ignore, opts.case);
            if norm.is_empty() {
                let detail = if text.trim().is_empty() {
                    "the transcript is empty".to_string()
                } else {
                    format!("the transcript {} is empty after normalization", short(text))
                };
                problem(ProblemKind::EmptyTranscript, detail);
            } else {
                // Target tokens; an unknown character is its own token (a distinct id per char).
                let tokens: Vec<usize> = match &index {
                    Some(ix) => norm.chars().map(|c| ix.get(c).unwrap_or(usize::MAX - c as usize)).collect(),
                    None => norm.chars().map(|c| if c.is_whitespace() { usize::MAX } else { c as usize }).collect(),
                };
                if let Some(ix) = &index {
                    let oov: BTreeSet<char> = norm.chars().filter(|&c| ix.get(c).is_none()).collect();
                    if !oov.is_empty() {
                        let list: Vec<String> = oov.iter().map(|c| format!("{c:?}")).collect();
                        problem(ProblemKind::OutOfVocabulary, format!("{} in {}", list.join(", "), short(&norm)));
                    }
                }
                if let Some((n, frames)) = frames {
                    let repeats = tokens.windows(2).filter(|w| w[0] == w[1]).count();
                    let needed = tokens.len() + repeats;
                    if frames < needed {
                        problem(
                            ProblemKind::TooShortForCtc,
                            format!(
                                "{frames} model frames ({n} samples) for {} target tokens + {repeats} repeats = {needed} needed",
                                tokens.len()
                            ),
                        );
                    }
                }
            }
        } else if let Some((n, 0)) = frames {
            problem(ProblemKind::TooShort, format!("{n} samples give the model no output frame"));
        }
        if let Some((_, d)) = audio {
            if d < opts.min_duration_s {
                problem(ProblemKind::TooShort, format!("{d:.3} s, below the minimum of {} s", opts.min_duration_s));
            }
            if d > opts.max_duration_s {
                problem(ProblemKind::TooLong, format!("{d:.3} s, above the maximum of {} s", opts.max_duration_s));
            }
        }
        report.durations.push(audio.map_or(f64::NAN, |(_, d)| d));
    }
    report
}
