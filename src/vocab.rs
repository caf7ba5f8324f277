//! Character vocabularies for CTC (`vocab.json` as `Wav2Vec2CTCTokenizer` writes it) and
//! greedy CTC decoding.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, Result};

/// A character vocabulary: token <-> id, with the CTC blank (= pad) and word delimiter.
#[derive(Debug, Clone, PartialEq)]
pub struct CharVocab {
    /// Token of each id (ids are dense 0..n).
    pub tokens: Vec<String>,
    /// Id of the padding token, used as the CTC blank.
    pub pad_id: usize,
    /// Id of the unknown token, if any.
    pub unk_id: Option<usize>,
    /// Id of the word delimiter `|`, if any.
    pub word_delimiter_id: Option<usize>,
}

const PAD_NAMES: &[&str] = &["[PAD]", "<pad>"];
const UNK_NAMES: &[&str] = &["[UNK]", "<unk>"];
const SPECIAL: &[&str] = &["<s>", "</s>", "[PAD]", "<pad>"];

impl CharVocab {
    /// Builds a vocabulary from `vocab.json`'s map; `path` is only for error messages.
    pub fn from_map(map: &BTreeMap<String, i64>, path: &Path) -> Result<Self> {
        let n = map.len();
        let mut tokens = vec![None; n];
        for (tok, &id) in map {
            if id < 0 || id as usize >= n || tokens[id as usize].is_some() {
                return Err(Error::config(path, format!("vocab ids must be the dense range 0..{n} without repeats (token {tok:?} has id {id})")));
            }
            tokens[id as usize] = Some(tok.clone());
        }
        let tokens: Vec<String> = tokens.into_iter().map(|t| t.unwrap_or_default()).collect();
        let find = |names: &[&str]| tokens.iter().position(|t| names.contains(&t.as_str()));
        let pad_id = find(PAD_NAMES).ok_or_else(|| {
            Error::config(path, "vocab has no padding token ([PAD] or <pad>), which CTC uses as its blank; add one".to_string())
        })?;
        Ok(CharVocab { pad_id, unk_id: find(UNK_NAMES), word_delimiter_id: find(&["|"]), tokens })
    }

    /// Reads `vocab.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let map = crate::model::read_vocab(path)?
            .ok_or_else(|| Error::Open { path: path.into(), source: std::io::Error::new(std::io::ErrorKind::NotFound, "no vocab.json") })?;
        Self::from_map(&map, path)
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether the vocabulary is empty.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Text of a CTC label sequence (repeats already collapsed, blanks removed): the word
    /// delimiter becomes a space, `<s>`/`</s>`/padding are dropped.
    pub fn decode(&self, ids: &[usize]) -> String {
        let mut s = String::new();
        for &id in ids {
            let Some(tok) = self.tokens.get(id) else { continue };
            if Some(id) == self.word_delimiter_id {
                s.push(' ');
            } else if !SPECIAL.contains(&tok.as_str()) {
                s.push_str(tok);
            }
        }
        s.split_whitespace().collect::<Vec<_>>().join(" ")
    }
}

/// Greedy CTC decoding of per-frame best ids: collapse repeats, then drop blanks.
pub fn ctc_greedy(frame_ids: &[usize], blank: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let mut prev = None;
    for &id in frame_ids {
        if Some(id) != prev && id != blank {
            out.push(id);
        }
        prev = Some(id);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_collapses_repeats_and_drops_blanks() {
        assert_eq!(ctc_greedy(&[0, 3, 3, 0, 3, 4, 4, 0, 0, 5], 0), vec![3, 3, 4, 5]);
        let map: BTreeMap<String, i64> =
            [("<pad>", 0), ("<s>", 1), ("|", 2), ("A", 3), ("B", 4)].iter().map(|(k, v)| (k.to_string(), *v)).collect();
        let v = CharVocab::from_map(&map, Path::new("vocab.json")).unwrap();
        assert_eq!(v.decode(&ctc_greedy(&[0, 3, 3, 0, 3, 2, 1, 4, 0], 0)), "AA B");
        let bad: BTreeMap<String, i64> = [("A".to_string(), 0)].into_iter().collect();
        assert!(CharVocab::from_map(&bad, Path::new("vocab.json")).unwrap_err().to_string().contains("no padding token"));
    }
}
