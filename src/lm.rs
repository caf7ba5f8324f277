//! Word n-gram language models in the ARPA format (what KenLM's `lmplz` writes, and what the
//! Hugging Face "boosting Wav2Vec2 with n-grams" recipe builds), for CTC beam search
//! ([`crate::decode`]).
//!
//! Scores are the ARPA file's base-10 log probabilities with the usual back-off: for history
//! `h = (h_1 .. h_k)` and word `w`, `log10 P(w | h)` is the n-gram's own value if `(h, w)` is in
//! the file, else `backoff(h) + log10 P(w | h_2 .. h_k)` (`backoff(h)` = 0 when `h` is not in the
//! file), down to the unigram. A word outside the vocabulary is scored as `<unk>` (KenLM's
//! behaviour; -100 if the file has no `<unk>`). Only the last `order - 1` words of a history
//! matter; [`NgramLm::score`] takes the whole history and looks at what it needs.
//!
//! The vocabulary is every 1-gram but `<s>`, `</s>` and `<unk>`. (pyctcdecode reads its word
//! list from the 1-grams that carry a back-off weight, which in lmplz's files is every one;
//! `tools/make_arpa.py` writes them the same way.)

use std::collections::{HashMap, HashSet};
use std::path::Path;

use crate::error::{Error, Result};

/// What a word costs when the model has no `<unk>` entry (KenLM's value for a missing `<unk>`).
const NO_UNK_LOG10: f32 = -100.0;

/// The n-grams of one order: word ids -> (log10 probability, log10 back-off weight).
type NgramTable = HashMap<Box<[u32]>, (f32, f32)>;

/// A back-off n-gram model read from an ARPA file.
#[derive(Debug, Clone)]
pub struct NgramLm {
    /// The file it was read from (for messages).
    pub source: std::path::PathBuf,
    /// Highest n-gram order in the file.
    pub order: usize,
    /// Word -> id; ids index [`NgramLm::words`].
    ids: HashMap<String, u32>,
    /// Id -> word.
    pub words: Vec<String>,
    /// `tables[n - 1]`: n-grams of order n (word ids) -> (log10 probability, log10 back-off).
    tables: Vec<NgramTable>,
    /// Every prefix of every word but `<s>`, `</s>`, `<unk>` (the empty prefix included): a
    /// partial word outside it can only become an unknown word.
    prefixes: HashSet<String>,
    unk: Option<u32>,
    bos: Option<u32>,
    eos: Option<u32>,
}

/// A word's score from [`NgramLm::score`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WordScore {
    /// log10 P(word | history).
    pub log10: f32,
    /// The word is not in the model's vocabulary (scored as `<unk>`).
    pub oov: bool,
}

impl NgramLm {
    /// Reads an ARPA file. Errors name the file, the line and the fix; a KenLM binary file
    /// (`build_binary`'s output) is refused with a pointer to the ARPA file it was built from.
    pub fn from_arpa(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| Error::Open { path: path.into(), source })?;
        if bytes.starts_with(b"mmap lm ") {
            return Err(lm_err(path, "a KenLM binary file, which klspeech cannot read; point at the ARPA file it was built from (lmplz's output, `.arpa`)"));
        }
        let text = String::from_utf8(bytes).map_err(|e| {
            let line = 1 + e.as_bytes()[..e.utf8_error().valid_up_to()].iter().filter(|&&b| b == b'\n').count();
            lm_err(path, format!("line {line}: not UTF-8 text; an ARPA file is text (a KenLM binary or compressed file must be given as its ARPA source, uncompressed)"))
        })?;
        Self::parse(&text, path)
    }

    /// Parses ARPA text; `path` names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l.trim()));
        // Header: "\data\" then "ngram N=COUNT" lines.
        let mut counts: Vec<usize> = Vec::new();
        loop {
            let Some((_, l)) = lines.next() else {
                return Err(lm_err(path, "no `\\data\\` header: not an ARPA language model"));
            };
            if l == "\\data\\" {
                break;
            }
            if !l.is_empty() {
                return Err(lm_err(path, "no `\\data\\` header before the first entries: not an ARPA language model"));
            }
        }
        let mut section: Option<(usize, usize)> = None; // (line, order)
        for (n, l) in lines.by_ref() {
            if l.is_empty() {
                continue;
            }
            if let Some(rest) = l.strip_prefix("ngram ") {
                let parsed = rest.split_once('=').and_then(|(o, c)| Some((o.trim().parse::<usize>().ok()?, c.trim().parse::<usize>().ok()?)));
                match parsed {
                    Some((o, c)) if o == counts.len() + 1 => counts.push(c),
                    _ => return Err(lm_err(path, format!("line {n}: `{l}`: expected `ngram {}=COUNT`", counts.len() + 1))),
                }
                continue;
            }
            section = Some((n, section_order(l, path, n)?));
            break;
        }
        if counts.is_empty() {
            return Err(lm_err(path, "the `\\data\\` header lists no `ngram N=COUNT` lines"));
        }
        let order = counts.len();
        let mut ids: HashMap<String, u32> = HashMap::new();
        let mut words: Vec<String> = Vec::new();
        let mut tables: Vec<NgramTable> = counts.iter().map(|&c| HashMap::with_capacity(c)).collect();
        let mut ended = false;
        while let Some((start, o)) = section.take() {
            if o != tables.iter().position(|t| t.is_empty()).map_or(0, |i| i + 1) || o > order {
                return Err(lm_err(path, format!("line {start}: a {o}-gram section out of order (the header lists orders 1..={order})")));
            }
            for (n, l) in lines.by_ref() {
                if l.is_empty() {
                    continue;
                }
                if l.starts_with('\\') {
                    if l == "\\end\\" {
                        ended = true;
                    } else {
                        section = Some((n, section_order(l, path, n)?));
                    }
                    break;
                }
                // "log10p w_1 .. w_o [backoff]", separated by tabs or spaces.
                let fields: Vec<&str> = l.split_whitespace().collect();
                if fields.len() != o + 1 && fields.len() != o + 2 {
                    return Err(lm_err(path, format!("line {n}: `{l}`: expected a log10 probability, {o} word(s) and an optional back-off weight")));
                }
                let num = |s: &str| s.parse::<f32>().map_err(|_| lm_err(path, format!("line {n}: `{s}` is not a number")));
                let logp = num(fields[0])?;
                let backoff = if fields.len() == o + 2 { num(fields[o + 1])? } else { 0.0 };
                let mut key = Vec::with_capacity(o);
                for w in &fields[1..=o] {
                    let id = match ids.get(*w) {
                        Some(&id) => id,
                        None if o == 1 => {
                            words.push(w.to_string());
                            ids.insert(w.to_string(), (words.len() - 1) as u32);
                            (words.len() - 1) as u32
                        }
                        None => return Err(lm_err(path, format!("line {n}: `{w}` is in a {o}-gram but not among the 1-grams"))),
                    };
                    key.push(id);
                }
                tables[o - 1].insert(key.into_boxed_slice(), (logp, backoff));
            }
            let got = tables[o - 1].len();
            if got != counts[o - 1] {
                return Err(lm_err(path, format!("the header announces {} {o}-grams, the {o}-gram section holds {got} distinct ones", counts[o - 1])));
            }
        }
        if !ended {
            return Err(lm_err(path, "no `\\end\\` line: the file is truncated"));
        }
        if let Some(o) = tables.iter().position(|t| t.is_empty()) {
            return Err(lm_err(path, format!("no {}-gram section, though the header announces {}", o + 1, counts[o])));
        }
        let mut prefixes = HashSet::new();
        for w in words.iter().filter(|w| !matches!(w.as_str(), "<s>" | "</s>" | "<unk>")) {
            for (i, _) in w.char_indices() {
                prefixes.insert(w[..i].to_string());
            }
            prefixes.insert(w.clone());
        }
        let unk = ids.get("<unk>").copied();
        let bos = ids.get("<s>").copied();
        let eos = ids.get("</s>").copied();
        Ok(NgramLm { source: path.into(), order, ids, words, tables, prefixes, unk, bos, eos })
    }

    /// The vocabulary words (every 1-gram but `<s>`, `</s>`, `<unk>`).
    pub fn vocabulary(&self) -> impl Iterator<Item = &str> {
        self.words.iter().map(|w| w.as_str()).filter(|w| self.contains(w))
    }

    /// The id a word is scored with: its own, or `<unk>`'s (None without one).
    pub fn id(&self, word: &str) -> Option<u32> {
        self.ids.get(word).copied().filter(|&i| Some(i) != self.bos && Some(i) != self.eos).or(self.unk)
    }

    /// Whether `word` is in the vocabulary (`<s>`, `</s>`, `<unk>` are not words).
    pub fn contains(&self, word: &str) -> bool {
        self.ids.get(word).is_some_and(|&i| Some(i) != self.unk && Some(i) != self.bos && Some(i) != self.eos)
    }

    /// Whether some vocabulary word starts with `partial`.
    pub fn is_prefix(&self, partial: &str) -> bool {
        self.prefixes.contains(partial)
    }

    /// The history a sentence starts with: `<s>` (empty if the model has no `<s>`).
    pub fn start(&self) -> Vec<u32> {
        self.bos.into_iter().collect()
    }

    /// log10 P(`word` | `history`), history given as ids (oldest first; only the last
    /// `order - 1` count). `word` None is an unknown word without `<unk>` in the model.
    pub fn score_id(&self, history: &[u32], word: Option<u32>) -> f32 {
        let Some(w) = word else { return NO_UNK_LOG10 };
        let h = &history[history.len().saturating_sub(self.order - 1)..];
        let mut backoff = 0.0f32;
        let mut key: Vec<u32> = Vec::with_capacity(h.len() + 1);
        for k in (0..=h.len()).rev() {
            // Context h[len-k..], word w.
            key.clear();
            key.extend_from_slice(&h[h.len() - k..]);
            key.push(w);
            if let Some(&(p, _)) = self.tables[k].get(key.as_slice()) {
                return backoff + p;
            }
            if k > 0 {
                if let Some(&(_, b)) = self.tables[k - 1].get(&h[h.len() - k..]) {
                    backoff += b;
                }
            }
        }
        // Not even a unigram: only an id outside the tables can get here.
        backoff + NO_UNK_LOG10
    }

    /// log10 P(`word` | `history`) and whether the word is unknown.
    pub fn score(&self, history: &[u32], word: &str) -> WordScore {
        WordScore { log10: self.score_id(history, self.id(word)), oov: !self.contains(word) }
    }

    /// log10 P(`</s>` | `history`): the end of the sentence (0 without `</s>`).
    pub fn score_end(&self, history: &[u32]) -> f32 {
        match self.eos {
            Some(e) => self.score_id(history, Some(e)),
            None => 0.0,
        }
    }

    /// `history` followed by `word`, cut to the last `order - 1` words (all the model reads).
    pub fn push(&self, history: &[u32], word: &str) -> Vec<u32> {
        let mut h: Vec<u32> = history.to_vec();
        // An unknown word without `<unk>` in the model: no id; u32::MAX is in no table.
        h.push(self.id(word).unwrap_or(u32::MAX));
        let keep = self.order.saturating_sub(1);
        h.drain(..h.len().saturating_sub(keep));
        h
    }
}

fn section_order(l: &str, path: &Path, n: usize) -> Result<usize> {
    l.strip_prefix('\\')
        .and_then(|r| r.strip_suffix("-grams:"))
        .and_then(|o| o.parse::<usize>().ok())
        .filter(|&o| o >= 1)
        .ok_or_else(|| lm_err(path, format!("line {n}: `{l}`: expected a section header `\\N-grams:` or `\\end\\`")))
}

fn lm_err(path: &Path, detail: impl Into<String>) -> Error {
    Error::LanguageModel { path: path.into(), detail: detail.into() }
}
