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

    /// Whether a token is spelled in the text ([`CharVocab::decode`] drops `<s>`, `</s>` and the
    /// padding token; the word delimiter is a space).
    pub fn is_text(&self, tok: &str) -> bool {
        !SPECIAL.contains(&tok)
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

/// One token of a greedy CTC path and the logit frames it spans: `start..end` (end exclusive),
/// the token's run of equal frame ids. Words span from their first character's start to their
/// last character's end. The same offsets as transformers' `Wav2Vec2CTCTokenizer.decode(...,
/// output_char_offsets=True)` / `_get_word_offsets` (what its ASR pipeline's
/// `return_timestamps="char"` / `"word"` scale to seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSpan {
    /// The character (the word delimiter as a space) or the word.
    pub text: String,
    /// First frame.
    pub start: usize,
    /// One past the last frame.
    pub end: usize,
}

impl CharVocab {
    /// Character spans of per-frame best ids: runs of equal ids, blanks dropped, the word
    /// delimiter as `" "`. Tokens that [`CharVocab::decode`] leaves out of the text (`<s>`,
    /// `</s>`, ids beyond the vocabulary) are left out here too, so the spans spell the text;
    /// transformers keeps `<s>` / `</s>` as characters (fine-tuned models do not emit them).
    pub fn char_spans(&self, frame_ids: &[usize]) -> Vec<TokenSpan> {
        let mut spans = Vec::new();
        let mut start = 0;
        for run in frame_ids.chunk_by(|a, b| a == b) {
            let (id, end) = (run[0], start + run.len());
            if id != self.pad_id {
                if let Some(tok) = self.tokens.get(id) {
                    if Some(id) == self.word_delimiter_id {
                        spans.push(TokenSpan { text: " ".into(), start, end });
                    } else if !SPECIAL.contains(&tok.as_str()) {
                        spans.push(TokenSpan { text: tok.clone(), start, end });
                    }
                }
            }
            start = end;
        }
        spans
    }
}

/// Word spans from character spans ([`CharVocab::char_spans`]): maximal runs of characters other
/// than `" "`, each from its first character's start to its last one's end.
pub fn word_spans(chars: &[TokenSpan]) -> Vec<TokenSpan> {
    chars
        .split(|c| c.text == " ")
        .filter(|w| !w.is_empty())
        .map(|w| TokenSpan { text: w.iter().map(|c| c.text.as_str()).collect(), start: w[0].start, end: w[w.len() - 1].end })
        .collect()
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
        // Spans: runs of equal frame ids, blanks and <s> dropped, `|` as a space.
        let frames = [0, 3, 3, 0, 3, 2, 1, 4, 0, 2, 2, 3, 4, 4];
        let chars = v.char_spans(&frames);
        let span = |t: &str, start, end| TokenSpan { text: t.into(), start, end };
        assert_eq!(chars, vec![span("A", 1, 3), span("A", 4, 5), span(" ", 5, 6), span("B", 7, 8), span(" ", 9, 11), span("A", 11, 12), span("B", 12, 14)]);
        assert_eq!(word_spans(&chars), vec![span("AA", 1, 5), span("B", 7, 8), span("AB", 11, 14)]);
        let text: Vec<String> = word_spans(&chars).into_iter().map(|w| w.text).collect();
        assert_eq!(text.join(" "), v.decode(&ctc_greedy(&frames, 0)));
        let bad: BTreeMap<String, i64> = [("A".to_string(), 0)].into_iter().collect();
        assert!(CharVocab::from_map(&bad, Path::new("vocab.json")).unwrap_err().to_string().contains("no padding token"));
    }
}
