//! ASR and classification manifests (CSV/TSV) and the LibriSpeech folder layout.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::csv::{parse_csv, parse_tsv, read_text, Record};
use super::{Dataset, Example, Source};
use crate::error::{Error, Result};

/// Accepted names of the audio column, in order of preference.
const AUDIO_COLUMNS: &[&str] = &["path", "file", "audio", "filename"];
/// Accepted names of the transcript column (`sentence` is Common Voice's).
const TEXT_COLUMNS: &[&str] = &["sentence", "text", "transcript", "transcription"];
/// Accepted names of the speaker column (`client_id` is Common Voice's).
const SPEAKER_COLUMNS: &[&str] = &["speaker", "speaker_id", "client_id"];
/// Accepted names of the class column.
const LABEL_COLUMNS: &[&str] = &["label", "class"];

/// A parsed manifest: header and rows (each row as long as the header).
struct Table {
    path: PathBuf,
    header: Vec<String>,
    rows: Vec<Record>,
}

impl Table {
    /// Reads `path`. The separator comes from the extension (`.csv`: comma with RFC 4180
    /// quoting, `.tsv`: tab without quoting, like Common Voice), otherwise from the header
    /// line: a tab in it means TSV.
    fn read(path: &Path) -> Result<Table> {
        let text = read_text(path)?;
        let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
        let tsv = match ext.as_deref() {
            Some("tsv") => true,
            Some("csv") => false,
            _ => text.lines().find(|l| !l.trim().is_empty()).is_some_and(|l| l.contains('\t')),
        };
        let records = if tsv {
            parse_tsv(&text)
        } else {
            parse_csv(&text, ',').map_err(|(line, msg)| Error::config(path, format!("line {line}: {msg}")))?
        };
        let mut records = records.into_iter();
        let Some(header) = records.next() else {
            return Err(Error::config(path, "empty manifest: a header row is required (e.g. `path,sentence`)"));
        };
        let header: Vec<String> = header.fields.iter().map(|h| h.trim().to_string()).collect();
        let rows: Vec<Record> = records.collect();
        for r in &rows {
            if r.fields.len() != header.len() {
                return Err(Error::config(
                    path,
                    format!(
                        "line {}: {} field(s), but the header has {} ({}){}",
                        r.line,
                        r.fields.len(),
                        header.len(),
                        header.join(", "),
                        if tsv { "" } else { "; quote fields that contain commas: \"a, b\"" }
                    ),
                ));
            }
        }
        if rows.is_empty() {
            return Err(Error::config(path, "the manifest has a header but no rows"));
        }
        Ok(Table { path: path.into(), header, rows })
    }

    /// Index of the first of `names` present in the header (case-insensitive).
    fn optional(&self, names: &[&str]) -> Option<usize> {
        names.iter().find_map(|n| self.header.iter().position(|h| h.eq_ignore_ascii_case(n)))
    }

    /// Like [`Table::optional`], but a missing column is an error that lists the columns found.
    fn required(&self, what: &str, names: &[&str]) -> Result<usize> {
        self.optional(names).ok_or_else(|| {
            Error::config(
                &self.path,
                format!(
                    "no {what} column: expected one of {}; found columns: {}",
                    names.join(", "),
                    self.header.join(", ")
                ),
            )
        })
    }

    /// The folder relative audio paths start from.
    fn dir(&self) -> PathBuf {
        self.path.parent().map(Path::to_path_buf).unwrap_or_default()
    }

    /// The audio path of row `r` (column `col`), resolved against the manifest's folder. For
    /// Common Voice, whose `path` column holds bare file names that live in `clips/` beside
    /// the TSV, `clips/NAME` is taken when `NAME` is not beside the manifest but
    /// `clips/NAME` exists. A missing file is not an error here: [`super::validate`] reports
    /// all missing files at once.
    fn audio(&self, dir: &Path, r: &Record, col: usize) -> Result<PathBuf> {
        let field = r.fields[col].trim();
        if field.is_empty() {
            return Err(Error::config(&self.path, format!("line {}: empty `{}` field", r.line, self.header[col])));
        }
        let p = Path::new(field);
        if p.is_absolute() {
            return Ok(p.to_path_buf());
        }
        let beside = dir.join(p);
        if !beside.exists() {
            let clips = dir.join("clips").join(p);
            if clips.exists() {
                return Ok(clips);
            }
        }
        Ok(beside)
    }
}

fn speaker(r: &Record, col: Option<usize>) -> Option<String> {
    col.map(|c| r.fields[c].trim().to_string()).filter(|s| !s.is_empty())
}

/// Reads an ASR manifest: CSV or TSV (see below) with a header row, one clip per row.
///
/// Columns (names case-insensitive; extra columns are ignored):
/// - audio: `path` (also `file`, `audio`, `filename`); a relative path is relative to the
///   manifest's folder, or to `clips/` beside it for Common Voice TSVs;
/// - transcript: `sentence` (Common Voice; also `text`, `transcript`, `transcription`), kept
///   raw: normalize with [`super::normalize_transcript`];
/// - optional speaker: `speaker`, `speaker_id` or `client_id` (Common Voice).
///
/// `.csv` files are RFC 4180 (quoted fields may hold commas, quotes as `""` and line breaks);
/// `.tsv` files are split at tabs with no quoting, as Common Voice and Hugging Face read them;
/// other extensions are TSV when the header line holds a tab, else CSV. Rows keep file order.
/// Errors name the manifest and the line; a missing column lists the columns found.
pub fn asr_manifest(path: &Path) -> Result<Dataset> {
    let t = Table::read(path)?;
    let audio = t.required("audio", AUDIO_COLUMNS)?;
    let text = t.required("transcript", TEXT_COLUMNS)?;
    let spk = t.optional(SPEAKER_COLUMNS);
    let dir = t.dir();
    let examples = t
        .rows
        .iter()
        .map(|r| {
            Ok(Example {
                source: Source::File(t.audio(&dir, r, audio)?),
                label: None,
                text: Some(r.fields[text].clone()),
                speaker: speaker(r, spk),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Dataset { examples, labels: Vec::new() })
}

/// [`classification_manifest_with_labels`] with the labels found, sorted alphabetically (byte
/// order), as class ids.
pub fn classification_manifest(path: &Path) -> Result<Dataset> {
    classification_manifest_with_labels(path, None)
}

/// Reads a classification manifest: the CSV/TSV format of [`asr_manifest`] with a `label`
/// (or `class`) column instead of a transcript.
///
/// With `labels`, class ids are positions in that list (so they match a checkpoint's
/// `id2label`) and a row whose label is not in it is an error naming the line; without,
/// the distinct labels sorted alphabetically are the classes, which makes the ids independent
/// of row order.
pub fn classification_manifest_with_labels(path: &Path, labels: Option<&[String]>) -> Result<Dataset> {
    let t = Table::read(path)?;
    let audio = t.required("audio", AUDIO_COLUMNS)?;
    let label = t.required("label", LABEL_COLUMNS)?;
    let spk = t.optional(SPEAKER_COLUMNS);
    for r in &t.rows {
        if r.fields[label].trim().is_empty() {
            return Err(Error::config(path, format!("line {}: empty `{}` field", r.line, t.header[label])));
        }
    }
    let labels: Vec<String> = match labels {
        Some(l) => l.to_vec(),
        None => t.rows.iter().map(|r| r.fields[label].trim().to_string()).collect::<BTreeSet<_>>().into_iter().collect(),
    };
    let dir = t.dir();
    let examples = t
        .rows
        .iter()
        .map(|r| {
            let name = r.fields[label].trim();
            let id = labels.iter().position(|l| l == name).ok_or_else(|| {
                Error::config(path, format!("line {}: label `{name}` is not one of the labels [{}]", r.line, labels.join(", ")))
            })?;
            Ok(Example { source: Source::File(t.audio(&dir, r, audio)?), label: Some(id), text: None, speaker: speaker(r, spk) })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Dataset { examples, labels })
}

/// Reads the LibriSpeech layout: every `*.trans.txt` under `root` (any depth, e.g.
/// `train-clean-100/19/198/19-198.trans.txt`) holds lines `<utt-id> <TRANSCRIPT>`, and the
/// audio of each line is `<utt-id>.flac` beside it. The speaker is the first `-` component of
/// the id. Transcript files are read in sorted path order, lines in file order.
pub fn librispeech(root: &Path) -> Result<Dataset> {
    std::fs::metadata(root).map_err(|source| Error::Open { path: root.into(), source })?;
    let mut files = Vec::new();
    find_files(root, ".trans.txt", 0, &mut files)?;
    files.sort();
    if files.is_empty() {
        return Err(Error::config(
            root,
            "no *.trans.txt files found (LibriSpeech layout: SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt with SPEAKER-CHAPTER-UTT.flac beside it)",
        ));
    }
    let mut examples = Vec::new();
    for f in &files {
        let dir = f.parent().map(Path::to_path_buf).unwrap_or_default();
        for line in read_text(f)?.lines() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let (id, text) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
            examples.push(Example {
                source: Source::File(dir.join(format!("{id}.flac"))),
                label: None,
                text: Some(text.trim().to_string()),
                speaker: id.split('-').next().map(str::to_string),
            });
        }
    }
    Ok(Dataset { examples, labels: Vec::new() })
}

/// Depth limit of the recursive search (guards against symbolic link loops).
const MAX_DEPTH: usize = 16;

/// Collects files under `dir` whose name ends with `suffix` (following symbolic links).
fn find_files(dir: &Path, suffix: &str, depth: usize, out: &mut Vec<PathBuf>) -> Result<()> {
    if depth > MAX_DEPTH {
        return Ok(());
    }
    let entries = std::fs::read_dir(dir).map_err(|source| Error::Open { path: dir.into(), source })?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, "listing the folder failed", e))?;
        let path = entry.path();
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') {
            continue;
        }
        if path.is_dir() {
            find_files(&path, suffix, depth + 1, out)?;
        } else if name.ends_with(suffix) {
            out.push(path);
        }
    }
    Ok(())
}
