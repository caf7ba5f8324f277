//! Keyword spotting on Google Speech Commands, with SUPERB's task definition.
//!
//! Training layout (`speech_commands_v0.0x`): a folder per word with 1 s 16 kHz WAVs named
//! `SPEAKER_nohash_N.wav`, `validation_list.txt` and `testing_list.txt` naming the dev and test
//! clips (paths relative to the root, one per line), and `_background_noise_/` with a few long
//! noise recordings. Official test set layout (`speech_commands_test_set_v0.0x`): a folder per
//! label, `_unknown_/` and `_silence_/` included, and no list files.
//!
//! SUPERB's KS task has 12 classes: the 10 words `yes no up down left right on off stop go`, then
//! `_unknown_` (every other word) and `_silence_` (1 s of background noise).

/// File extensions taken as clips.
pub const AUDIO_EXTENSIONS: &[&str] = &["wav", "flac", "mp3", "ogg"];

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use super::csv::read_text;
use super::{Dataset, Example, Source, Splits, SAMPLE_RATE};
use crate::error::{Error, Result};
use crate::rng::Rng;

/// SUPERB's 10 keywords, in SUPERB's class order.
pub const SUPERB_WORDS: [&str; 10] = ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"];
/// The class of every word that is not a keyword.
pub const UNKNOWN_LABEL: &str = "_unknown_";
/// The class of background noise without speech.
pub const SILENCE_LABEL: &str = "_silence_";
/// The folder of long noise recordings that `_silence_` clips are cut from.
pub const BACKGROUND_NOISE_DIR: &str = "_background_noise_";
/// The list of dev clips in the training layout.
pub const VALIDATION_LIST: &str = "validation_list.txt";
/// The list of test clips in the training layout.
pub const TESTING_LIST: &str = "testing_list.txt";

/// Bounds of [`SilenceCount`] (guards against absurd values exhausting memory).
const MAX_SILENCE_FRACTION: f64 = 10.0;
const MAX_SILENCE_CLIPS: usize = 10_000_000;

/// Length of a `_silence_` clip: 1 s, like every Speech Commands clip.
const SILENCE_LEN: usize = SAMPLE_RATE as usize;

/// How many 1 s `_silence_` clips each split gets.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum SilenceCount {
    /// No `_silence_` class at all (it is left out of the labels).
    None,
    /// Per split, as many as the average keyword class of that split has clips (rounded):
    /// silence is then as frequent as a typical keyword. `_unknown_` is not part of the
    /// average (it is several times larger than any word). The default.
    #[default]
    AverageClass,
    /// Per split, this fraction (0 to 10) of the split's other clips, rounded (TensorFlow's
    /// `silence_percentage` = 10 % is `Fraction(0.1)`).
    Fraction(f64),
    /// Fixed counts per split (at most 10 million each).
    Counts { train: usize, dev: usize, test: usize },
}

/// What [`speech_commands`] builds.
#[derive(Debug, Clone, PartialEq)]
pub struct KwsOptions {
    /// The keywords, in class order (default: SUPERB's 10). Each must have a folder.
    pub words: Vec<String>,
    /// `_silence_` clips per split (default [`SilenceCount::AverageClass`]).
    pub silence_clips: SilenceCount,
    /// Map every other word folder to `_unknown_` (default true, as SUPERB). When false, other
    /// folders are skipped and there is no `_unknown_` class.
    pub unknown: bool,
    /// Seed of the `_silence_` cuts.
    pub seed: u64,
}

impl Default for KwsOptions {
    fn default() -> Self {
        KwsOptions {
            words: SUPERB_WORDS.iter().map(|w| w.to_string()).collect(),
            silence_clips: SilenceCount::default(),
            unknown: true,
            seed: 0,
        }
    }
}

impl KwsOptions {
    /// The class names in id order: the words, then `_unknown_` (if `unknown`), then
    /// `_silence_` (unless [`SilenceCount::None`]). With the defaults: SUPERB's 12 classes.
    pub fn labels(&self) -> Vec<String> {
        let mut labels = self.words.clone();
        if self.unknown {
            labels.push(UNKNOWN_LABEL.into());
        }
        if self.silence_clips != SilenceCount::None {
            labels.push(SILENCE_LABEL.into());
        }
        labels
    }

    fn check(&self) -> Result<()> {
        if self.words.is_empty() {
            return Err(Error::InvalidInput("keyword spotting needs at least one word".into()));
        }
        for (i, w) in self.words.iter().enumerate() {
            if w.is_empty() || [UNKNOWN_LABEL, SILENCE_LABEL, BACKGROUND_NOISE_DIR].contains(&w.as_str()) {
                return Err(Error::InvalidInput(format!("`{w}` cannot be a keyword")));
            }
            if self.words[..i].contains(w) {
                return Err(Error::InvalidInput(format!("keyword `{w}` is listed twice")));
            }
        }
        match self.silence_clips {
            SilenceCount::Fraction(f) if !(0.0..=MAX_SILENCE_FRACTION).contains(&f) => {
                return Err(Error::InvalidInput(format!(
                    "the silence fraction must be between 0 and {MAX_SILENCE_FRACTION}, not {f}"
                )));
            }
            SilenceCount::Counts { train, dev, test } if train.max(dev).max(test) > MAX_SILENCE_CLIPS => {
                return Err(Error::InvalidInput(format!("at most {MAX_SILENCE_CLIPS} silence clips per split")));
            }
            _ => {}
        }
        Ok(())
    }
}

/// The speaker of a Speech Commands clip: the file name before `_nohash_`.
fn speaker_of(file_name: &str) -> Option<String> {
    file_name.find("_nohash_").map(|i| file_name[..i].to_string()).filter(|s| !s.is_empty())
}

fn is_audio(name: &str) -> bool {
    // Any container `audio::load` reads: Speech Commands ships WAV, klspeech's demo set FLAC.
    std::path::Path::new(name)
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| AUDIO_EXTENSIONS.iter().any(|a| e.eq_ignore_ascii_case(a)))
}

/// Sorted names of the sub-folders (`want_dirs`) or `.wav` files of `dir`; hidden entries skipped.
fn list_dir(dir: &Path, want_dirs: bool) -> Result<Vec<String>> {
    let entries = std::fs::read_dir(dir).map_err(|source| Error::Open { path: dir.into(), source })?;
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, "listing the folder failed", e))?;
        let Ok(name) = entry.file_name().into_string() else { continue };
        if name.starts_with('.') {
            continue;
        }
        let is_dir = entry.path().is_dir();
        if is_dir == want_dirs && (want_dirs || is_audio(&name)) {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// A clip found in a label/word folder.
struct Clip {
    /// `folder/file.wav`, with `/`, as the list files write it.
    rel: String,
    folder: String,
    file: String,
}

/// Every `.wav` in every sub-folder of `root` except `_background_noise_`, sorted by path.
fn scan(root: &Path) -> Result<(Vec<String>, Vec<Clip>)> {
    let mut folders = list_dir(root, true)?;
    folders.retain(|f| f != BACKGROUND_NOISE_DIR);
    let mut clips = Vec::new();
    for folder in &folders {
        for file in list_dir(&root.join(folder), false)? {
            clips.push(Clip { rel: format!("{folder}/{file}"), folder: folder.clone(), file });
        }
    }
    Ok((folders, clips))
}

fn clip_example(root: &Path, clip: &Clip, label: usize) -> Example {
    Example {
        source: Source::File(root.join(&clip.folder).join(&clip.file)),
        label: Some(label),
        text: None,
        speaker: speaker_of(&clip.file),
    }
}

/// Reads a list file: `(line number, relative path)` per non-blank line, or `None` if absent.
fn read_list(path: &Path) -> Result<Option<Vec<(usize, String)>>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = read_text(path)?;
    Ok(Some(
        text.lines()
            .enumerate()
            .map(|(i, l)| (i + 1, l.trim().replace('\\', "/")))
            .filter(|(_, l)| !l.is_empty())
            .map(|(i, l)| (i, l.strip_prefix("./").map(str::to_string).unwrap_or(l)))
            .collect(),
    ))
}

/// Loads the Speech Commands training layout into train/dev/test splits, with the labels of
/// [`KwsOptions::labels`] (SUPERB's 12 classes by default).
///
/// - A clip listed in `validation_list.txt` is dev, in `testing_list.txt` test, else train. A
///   missing list file means an empty split (at least one must exist); a listed path that is
///   not a `.wav` under a word folder, or one in both lists, is an error naming the list and line.
/// - A folder of a keyword is that class; every other folder (except `_background_noise_`)
///   is `_unknown_`, or skipped when `opts.unknown` is false. A keyword without a folder is
///   an error (a typo would otherwise give an empty class). All unknown clips are kept, as in
///   SUPERB: `_unknown_` is by far the largest class, so balance classes when sampling
///   ([`Dataset::class_counts`]).
/// - Speakers come from the file names (`SPEAKER_nohash_N.wav`).
/// - Each split lists its clips sorted by path, then its `_silence_` clips.
///
/// `_silence_` clips are 1 s [`Source::Segment`]s of the `_background_noise_/*.wav` files
/// (sorted by name), as many per split as `opts.silence_clips` says. So that dev/test silence
/// never shares audio with train silence, every noise file is split into three disjoint
/// regions in the proportions of Speech Commands' own split (80/10/10 %): train cuts come
/// from the first 80 % of each file, dev from the next 10 %, test from the last 10 %. The
/// cuts go round-robin over the files (equal numbers of each noise type) at offsets drawn
/// uniformly inside the region from `Rng::new(seed)` (one forked stream per split, so a
/// split's cuts don't depend on the other splits' counts). Cuts of one split may overlap each
/// other. A region needs at least 1 s, so noise files need 10 s for dev/test cuts (the
/// corpus' are ~60 s); if no file has room for a split that needs silence, that is an error.
pub fn speech_commands(root: &Path, opts: &KwsOptions) -> Result<Splits> {
    opts.check()?;
    let labels = opts.labels();
    let (folders, clips) = scan(root)?;
    for w in &opts.words {
        if !folders.contains(w) {
            return Err(Error::config(
                root,
                format!("keyword `{w}` has no folder (word folders found: {})", folders.join(", ")),
            ));
        }
    }
    let dev_list = read_list(&root.join(VALIDATION_LIST))?;
    let test_list = read_list(&root.join(TESTING_LIST))?;
    if dev_list.is_none() && test_list.is_none() {
        return Err(Error::config(
            root,
            format!("neither {VALIDATION_LIST} nor {TESTING_LIST} exists, so this is not the Speech Commands training layout (for the test-set layout with a folder per label, use open_kws or speech_commands_test)"),
        ));
    }
    // 0 train, 1 dev, 2 test
    let known: HashMap<&str, usize> = clips.iter().enumerate().map(|(i, c)| (c.rel.as_str(), i)).collect();
    let mut split_of: HashMap<usize, (usize, usize)> = HashMap::new(); // clip -> (split, list line)
    for (split, name, list) in [(1, VALIDATION_LIST, &dev_list), (2, TESTING_LIST, &test_list)] {
        let list_path = root.join(name);
        for (line, entry) in list.iter().flatten() {
            let Some(&clip) = known.get(entry.as_str()) else {
                return Err(Error::config(
                    &list_path,
                    format!("line {line}: `{entry}` is not an audio file in a word folder under {}", root.display()),
                ));
            };
            match split_of.get(&clip) {
                Some(&(s, other_line)) if s != split => {
                    return Err(Error::config(
                        &list_path,
                        format!("line {line}: `{entry}` is also in {VALIDATION_LIST} (line {other_line}); a clip belongs to one split"),
                    ));
                }
                Some(_) => {}
                None => {
                    split_of.insert(clip, (split, *line));
                }
            }
        }
    }
    let unknown_id = labels.iter().position(|l| l == UNKNOWN_LABEL);
    let mut sets: [Vec<Example>; 3] = Default::default();
    for (i, clip) in clips.iter().enumerate() {
        let label = match labels.iter().position(|l| *l == clip.folder) {
            Some(l) => l,
            None => match unknown_id {
                Some(u) => u,
                None => continue,
            },
        };
        let split = split_of.get(&i).map_or(0, |&(s, _)| s);
        sets[split].push(clip_example(root, clip, label));
    }
    if sets.iter().all(Vec::is_empty) {
        return Err(Error::config(root, "no audio clips (.wav, .flac, .mp3, .ogg) found in the word folders"));
    }
    add_silence(root, opts, &labels, &mut sets)?;
    let [train, dev, test] = sets;
    let ds = |examples| Dataset { examples, labels: labels.clone() };
    Ok(Splits { train: ds(train), dev: ds(dev), test: ds(test) })
}

/// Appends the `_silence_` segments to each split (see [`speech_commands`]).
fn add_silence(root: &Path, opts: &KwsOptions, labels: &[String], sets: &mut [Vec<Example>; 3]) -> Result<()> {
    let Some(silence_id) = labels.iter().position(|l| l == SILENCE_LABEL) else { return Ok(()) };
    let counts: Vec<usize> = sets
        .iter()
        .enumerate()
        .map(|(split, set)| match opts.silence_clips {
            SilenceCount::None => 0,
            SilenceCount::AverageClass => {
                let n = opts.words.len();
                let words = set.iter().filter(|e| e.label.is_some_and(|l| l < n)).count();
                (words + n / 2) / n
            }
            SilenceCount::Fraction(f) => (f * set.len() as f64).round() as usize,
            SilenceCount::Counts { train, dev, test } => [train, dev, test][split],
        })
        .collect();
    // One stream per split, forked in a fixed order whatever the counts.
    let mut base = Rng::new(opts.seed);
    let mut rngs: Vec<Rng> = (0..3).map(|_| base.fork()).collect();
    if counts.iter().all(|&c| c == 0) {
        return Ok(());
    }
    let noise_dir = root.join(BACKGROUND_NOISE_DIR);
    let no_noise = || {
        Error::config(
            &noise_dir,
            format!("no noise recordings (.wav, .flac, .mp3, .ogg) to cut {SILENCE_LABEL} clips from; add them, or build the data set without a silence class (SilenceCount::None)"),
        )
    };
    if !noise_dir.is_dir() {
        return Err(no_noise());
    }
    let names = list_dir(&noise_dir, false)?;
    if names.is_empty() {
        return Err(no_noise());
    }
    let mut lengths = BTreeMap::new();
    for name in &names {
        let path = noise_dir.join(name);
        let n = crate::audio::load_resampled(&path, SAMPLE_RATE)?.samples.len();
        lengths.insert(path, n);
    }
    const SPLITS: [&str; 3] = ["train", "dev", "test"];
    for split in 0..3 {
        if counts[split] == 0 {
            continue;
        }
        let regions: Vec<(&PathBuf, usize, usize)> = lengths
            .iter()
            .map(|(p, &n)| {
                let (a, b) = silence_region(n, split);
                (p, a, b)
            })
            .filter(|&(_, a, b)| b - a >= SILENCE_LEN)
            .collect();
        if regions.is_empty() {
            return Err(Error::config(
                &noise_dir,
                format!(
                    "no noise recording is long enough to cut {} {SILENCE_LABEL} clips from its {} region (each file is split 80/10/10 % into train/dev/test regions and a region needs 1 s, so files need 10 s); add longer recordings or change the silence count",
                    counts[split], SPLITS[split]
                ),
            ));
        }
        let rng = &mut rngs[split];
        for i in 0..counts[split] {
            let (path, a, b) = regions[i % regions.len()];
            let start = a + rng.below(b - a - SILENCE_LEN + 1);
            sets[split].push(Example {
                source: Source::Segment { path: path.clone(), start, len: SILENCE_LEN },
                label: Some(silence_id),
                text: None,
                speaker: None,
            });
        }
    }
    Ok(())
}

/// The sample range `[a, b)` of a noise file of `n` samples that `split` (0 train, 1 dev,
/// 2 test) cuts silence from: 0-80 %, 80-90 %, 90-100 %.
fn silence_region(n: usize, split: usize) -> (usize, usize) {
    let at = |tenths: usize| (n as u128 * tenths as u128 / 10) as usize;
    match split {
        0 => (0, at(8)),
        1 => (at(8), at(9)),
        _ => (at(9), n),
    }
}

/// Loads the official Speech Commands test set layout: a folder per label (`_unknown_/` and
/// `_silence_/` included), every `.wav` a test clip of its folder's class, sorted by path.
///
/// `labels` are the class names in id order (a trained model's, e.g. [`KwsOptions::labels`]);
/// a label without a folder just has no clips. A folder whose name is not a label is an error
/// naming it rather than being mapped to `_unknown_`: in this layout the folders *are* the
/// labels, so a stray folder means a label set mismatch (e.g. a 35-word v2 test set against a
/// 12-class model) or a training layout without its list files, and scoring it silently as
/// `_unknown_` would distort the accuracy. `_background_noise_` and hidden folders are ignored.
pub fn speech_commands_test(root: &Path, labels: &[String]) -> Result<Dataset> {
    if labels.is_empty() {
        return Err(Error::InvalidInput("the Speech Commands test set needs a non-empty label list".into()));
    }
    let (_, clips) = scan(root)?;
    let mut examples = Vec::with_capacity(clips.len());
    for clip in &clips {
        let Some(label) = labels.iter().position(|l| *l == clip.folder) else {
            return Err(Error::config(
                root.join(&clip.folder),
                format!(
                    "folder `{}` is not one of the labels [{}]; rename or remove it, or, for the training layout, add {VALIDATION_LIST} and {TESTING_LIST}",
                    clip.folder,
                    labels.join(", ")
                ),
            ));
        };
        examples.push(clip_example(root, clip, label));
    }
    if examples.is_empty() {
        return Err(Error::config(root, "no audio clips (.wav, .flac, .mp3, .ogg) found in the label folders"));
    }
    Ok(Dataset { examples, labels: labels.to_vec() })
}

/// Opens a keyword spotting folder of either layout: with `validation_list.txt` or
/// `testing_list.txt` it is the training layout ([`speech_commands`]); otherwise it is the
/// test-set layout ([`speech_commands_test`] with [`KwsOptions::labels`]), returned as the test
/// split with empty train and dev sets (same labels).
pub fn open_kws(path: &Path, opts: &KwsOptions) -> Result<Splits> {
    std::fs::metadata(path).map_err(|source| Error::Open { path: path.into(), source })?;
    if path.join(VALIDATION_LIST).exists() || path.join(TESTING_LIST).exists() {
        return speech_commands(path, opts);
    }
    opts.check()?;
    let test = speech_commands_test(path, &opts.labels())?;
    let empty = Dataset { examples: Vec::new(), labels: test.labels.clone() };
    Ok(Splits { train: empty.clone(), dev: empty, test })
}
