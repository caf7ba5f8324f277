//! CTC prefix beam search, with an optional word n-gram language model fused in (shallow
//! fusion): the algorithm of pyctcdecode, which transformers' `Wav2Vec2ProcessorWithLM` runs,
//! with its defaults and its scores (`tests/decode.rs` compares both on the bundled model's
//! logits).
//!
//! A beam is a transcript prefix (completed words and the unfinished word) with the token of
//! its paths' last frame: blank, the word delimiter, or a letter; paths ending in a blank and
//! in a letter are separate beams, each with one log score, the log-sum of its paths'
//! probabilities. A frame with token `k` at log probability `x` takes a beam ending in `c` to:
//! - the same prefix, ending in `k`, when `k` is blank or `k == c` (a repeat collapses);
//! - the prefix with its unfinished word completed, when `k` is the delimiter (the same prefix
//!   if no word is unfinished: repeated delimiters print one space);
//! - the prefix with `k` appended to the unfinished word, otherwise (after a blank, `k == c`
//!   is a new letter);
//!
//! beams that arrive at the same state are merged (scores log-summed). With no pruning, the
//! final score of a text is the log of the sum of the probabilities of every frame path that
//! prints it (`tests/decode.rs` checks it against enumerating all paths).
//!
//! Beams are ranked by acoustic score plus, with a language model: for each completed word
//! `alpha * ln 10 * (log10 P(word | previous words) + unk_score_offset if it is unknown) + beta`,
//! and `unk_score_offset` (scaled by length / 6 beyond 6 letters) while the unfinished word
//! starts no LM word. Each frame tries the tokens with log probability of at least
//! `token_min_logp` (and the best one), drops beams more than `beam_prune_logp` below the best
//! and keeps the best `beam_width`. At the end the beams that print the same text merge, the
//! last word is scored with `</s>`, and the results are ranked again. `alpha`, `beta`,
//! `unk_score_offset` and the three pruning settings have pyctcdecode's names and defaults;
//! so do its hotwords ([`Hotwords`]), with or without an LM.

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::lm::NgramLm;
use crate::vocab::CharVocab;

/// ln(10) as pyctcdecode computes it (`1 / log10(e)`): ARPA files hold base-10 logs, the
/// acoustic scores are natural logs.
fn ln_10() -> f64 {
    1.0 / std::f64::consts::E.log10()
}

/// A word n-gram model and how much it counts (pyctcdecode's `alpha`, `beta`,
/// `unk_score_offset`).
#[derive(Debug, Clone)]
pub struct LmFusion {
    pub lm: Arc<NgramLm>,
    /// Weight of the LM's log probability (natural log) against the acoustic one.
    pub alpha: f64,
    /// Bonus per word (counters the LM's preference for few words).
    pub beta: f64,
    /// Added for a word outside the LM's vocabulary, and for an unfinished word no vocabulary
    /// word starts with.
    pub unk_score_offset: f64,
}

impl LmFusion {
    /// pyctcdecode's defaults: alpha 0.5, beta 1.5, unk_score_offset -10.
    pub fn new(lm: Arc<NgramLm>) -> Self {
        LmFusion { lm, alpha: 0.5, beta: 1.5, unk_score_offset: -10.0 }
    }

    /// The fused score of `word` after `history`: `alpha * ln(10) * (log10 P(word | history) +
    /// unk_score_offset if the word is unknown) + beta` (pyctcdecode adds the offset to the
    /// base-10 score, so alpha and ln 10 scale it too).
    fn word(&self, history: &[u32], word: &str) -> f64 {
        let s = self.lm.score(history, word);
        let log10 = s.log10 as f64 + if s.oov { self.unk_score_offset } else { 0.0 };
        self.alpha * log10 * ln_10() + self.beta
    }

    /// The fused score of the last word and the end of the sentence: as [`LmFusion::word`] with
    /// log10 P(`</s>` | history, word) inside the scaled sum. An empty last word (the
    /// transcript ended on a delimiter) is scored as an unknown word, as pyctcdecode does.
    fn last_word(&self, history: &[u32], word: &str) -> f64 {
        let s = self.lm.score(history, word);
        let after = self.lm.push(history, word);
        let log10 = s.log10 as f64 + if s.oov { self.unk_score_offset } else { 0.0 } + self.lm.score_end(&after) as f64;
        self.alpha * log10 * ln_10() + self.beta
    }

    /// The running score of an unfinished word: `unk_score_offset` if no LM word starts with
    /// it (scaled by its length / 6 beyond 6 characters), else 0; not scaled by alpha.
    fn partial(&self, partial: &str) -> f64 {
        if partial.is_empty() || self.lm.is_prefix(partial) {
            return 0.0;
        }
        let n = partial.chars().count();
        if n > 6 {
            self.unk_score_offset * n as f64 / 6.0
        } else {
            self.unk_score_offset
        }
    }
}

/// Words to favour (pyctcdecode's hotwords, for names and terms the LM does not know): each
/// word of the transcript that is one adds `weight`; an unfinished word that starts one adds
/// `weight * its length / the length of the shortest hotword it starts`, in place of the LM's
/// unknown-prefix penalty. Not scaled by alpha.
#[derive(Debug, Clone)]
pub struct Hotwords {
    words: std::collections::HashSet<String>,
    /// Every non-empty prefix of a hotword -> the length (characters) of the shortest hotword
    /// with that prefix.
    prefixes: HashMap<String, usize>,
    /// Score per hotword (pyctcdecode's `hotword_weight`, default 10).
    pub weight: f64,
}

impl Hotwords {
    /// Hotwords from phrases (each split on whitespace into words; empty ones ignored).
    pub fn new<S: AsRef<str>>(phrases: &[S], weight: f64) -> Self {
        let words: std::collections::HashSet<String> = phrases.iter().flat_map(|p| p.as_ref().split_whitespace().map(str::to_string)).collect();
        let mut prefixes: HashMap<String, usize> = HashMap::new();
        for w in &words {
            let n = w.chars().count();
            for (i, c) in w.char_indices() {
                let e = prefixes.entry(w[..i + c.len_utf8()].to_string()).or_insert(n);
                *e = (*e).min(n);
            }
        }
        Hotwords { words, prefixes, weight }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    fn word(&self, w: &str) -> f64 {
        if self.words.contains(w) {
            self.weight
        } else {
            0.0
        }
    }

    fn partial(&self, p: &str) -> Option<f64> {
        self.prefixes.get(p).map(|&min| self.weight * p.chars().count() as f64 / min as f64)
    }
}

/// CTC prefix beam search settings.
#[derive(Debug, Clone)]
pub struct BeamSearch {
    /// Beams kept after each frame.
    pub beam_width: usize,
    /// A token whose log probability at a frame is below this is not tried there (the frame's
    /// best token always is). `f64::NEG_INFINITY`: every token.
    pub token_min_logp: f64,
    /// Beams scoring more than this below the frame's best are dropped. `f64::NEG_INFINITY`:
    /// none.
    pub beam_prune_logp: f64,
    /// Word language model, if any.
    pub lm: Option<LmFusion>,
    /// Words to favour, if any.
    pub hotwords: Option<Hotwords>,
}

impl Default for BeamSearch {
    /// pyctcdecode's defaults: beam width 100, token_min_logp -5, beam_prune_logp -10, no LM,
    /// no hotwords.
    fn default() -> Self {
        BeamSearch { beam_width: 100, token_min_logp: -5.0, beam_prune_logp: -10.0, lm: None, hotwords: None }
    }
}

/// One result of [`BeamSearch::search`].
#[derive(Debug, Clone, PartialEq)]
pub struct Hypothesis {
    /// The transcript (words separated by single spaces).
    pub text: String,
    /// ln of its CTC probability over the beam's paths: of every kept frame path that prints
    /// this text.
    pub acoustic: f64,
    /// Its language-model score, last word and `</s>` included (0 without a model).
    pub lm: f64,
    /// `acoustic + lm`: what the results are sorted by.
    pub score: f64,
}

/// A transcript prefix: completed words and the unfinished word, with the LM's view of it.
/// Label sequences that print the same (repeated or leading word delimiters) share a node.
struct Node {
    /// The completed words, joined by single spaces.
    text: String,
    /// The unfinished word.
    partial: String,
    /// Sum of the fused LM scores of the completed words and their hotword scores.
    lm: f64,
    /// LM ids of the completed words (the last `order - 1`).
    history: Vec<u32>,
    /// The unfinished word's score: its hotword prefix score if it starts a hotword, else
    /// `unk_score_offset` (times its length / 6 past 6 characters) while no LM word starts with
    /// it, else 0.
    partial_score: f64,
}

const ROOT: u32 = 0;
/// `last` of the start state: no token yet (differs from every token and from blank).
const START: u32 = u32::MAX;

/// Completed words (single-spaced) followed by one more word, if any.
fn words_then(text: &str, word: &str) -> String {
    match (text.is_empty(), word.is_empty()) {
        (_, true) => text.to_string(),
        (true, false) => word.to_string(),
        (false, false) => format!("{text} {word}"),
    }
}

/// ln(e^a + e^b), as pyctcdecode's `_sum_log_scores` computes it (`hi + ln(1 + e^(lo - hi))`).
fn log_add(a: f64, b: f64) -> f64 {
    if a == f64::NEG_INFINITY {
        return b;
    }
    if b == f64::NEG_INFINITY {
        return a;
    }
    let (hi, lo) = if a >= b { (a, b) } else { (b, a) };
    hi + (1.0 + (lo - hi).exp()).ln()
}

/// Row-wise natural log-softmax of logits [frames, tokens] (row-major), in f64.
pub fn log_softmax_rows(logits: &[f32], tokens: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(logits.len());
    for row in logits.chunks(tokens) {
        let m = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
        let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
        out.extend(row.iter().map(|&v| v as f64 - lse));
    }
    out
}

impl BeamSearch {
    /// The final beams, best first, for log probabilities [frames, tokens] (row-major, natural
    /// log, e.g. [`log_softmax_rows`] of the CTC head's logits; blank = `vocab.pad_id`).
    pub fn search(&self, vocab: &CharVocab, log_probs: &[f64], tokens: usize) -> Result<Vec<Hypothesis>> {
        if tokens != vocab.len() || !log_probs.len().is_multiple_of(tokens.max(1)) {
            return Err(Error::InvalidInput(format!(
                "beam search: {} log probabilities for a vocabulary of {} tokens (expected frames x {})",
                log_probs.len(),
                vocab.len(),
                vocab.len()
            )));
        }
        if self.lm.is_some() && vocab.word_delimiter_id.is_none() {
            return Err(Error::Unsupported {
                what: "a word language model with a vocabulary without the word delimiter `|`".into(),
                detail: "the LM scores words, and this vocab.json has no `|` to end them; decode without --lm".into(),
            });
        }
        let blank = vocab.pad_id as u32;
        let delim = vocab.word_delimiter_id.map(|d| d as u32);
        let start = self.lm.as_ref().map(|f| f.lm.start()).unwrap_or_default();
        let mut nodes = vec![Node { text: String::new(), partial: String::new(), lm: 0.0, history: start, partial_score: 0.0 }];
        let mut children: HashMap<(u32, u32), u32> = HashMap::new();
        // A beam is a state (node, last): `last` the token of the path's last frame (blank, the
        // word delimiter or a letter). Paths ending in a blank and in a letter stay apart, each
        // with one log score (the log-sum of its paths), as pyctcdecode keeps them.
        let mut beams: Vec<(u32, u32, f64)> = vec![(ROOT, START, 0.0)];
        let mut next: HashMap<(u32, u32), usize> = HashMap::new();
        let mut merged: Vec<(u32, u32, f64)> = Vec::new();
        let mut cand: Vec<(u32, f64)> = Vec::with_capacity(tokens);
        for row in log_probs.chunks(tokens) {
            // The tokens tried at this frame.
            let best = row.iter().enumerate().fold(0, |b, (i, &v)| if v > row[b] { i } else { b });
            cand.clear();
            cand.extend(row.iter().enumerate().filter(|&(i, &v)| i == best || v >= self.token_min_logp).map(|(i, &v)| (i as u32, v)));
            next.clear();
            merged.clear();
            for &(k, x) in &cand {
                for &(n, last, s) in &beams {
                    let to = if k == blank || k == last {
                        // A blank, or the last token again (collapses): the same prefix.
                        n
                    } else if Some(k) == delim {
                        // The delimiter ends the unfinished word; with none, nothing changes.
                        if nodes[n as usize].partial.is_empty() {
                            n
                        } else {
                            self.child(&mut nodes, &mut children, n, k, vocab, true)
                        }
                    } else {
                        self.child(&mut nodes, &mut children, n, k, vocab, false)
                    };
                    match next.entry((to, k)) {
                        std::collections::hash_map::Entry::Occupied(e) => {
                            let m = &mut merged[*e.get()];
                            m.2 = log_add(m.2, s + x);
                        }
                        std::collections::hash_map::Entry::Vacant(e) => {
                            e.insert(merged.len());
                            merged.push((to, k, s + x));
                        }
                    }
                }
            }
            // Rank by acoustic + LM, drop beams more than beam_prune_logp below the best, keep the
            // best beam_width (a stable sort: ties keep their order of arrival).
            let mut ranked: Vec<(f64, (u32, u32, f64))> = merged
                .iter()
                .map(|&(n, k, s)| {
                    let node = &nodes[n as usize];
                    (s + node.lm + node.partial_score, (n, k, s))
                })
                .collect();
            let top = ranked.iter().fold(f64::NEG_INFINITY, |m, r| m.max(r.0));
            ranked.retain(|r| r.0 >= top + self.beam_prune_logp);
            ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
            ranked.truncate(self.beam_width.max(1));
            beams = ranked.into_iter().map(|r| r.1).collect();
        }
        // The end: states that print the same text merge (their scores log-summed, in rank
        // order), the unfinished word is scored as the last word with `</s>`. As pyctcdecode
        // (whose merge keeps the fields of the last state merged in), the lowest-ranked state of
        // a text decides how: one whose last word is unfinished scores that word; one that ended
        // on a delimiter scores an empty last word (an unknown word) after its completed words.
        let mut groups: Vec<(String, u32, f64)> = Vec::new();
        let mut by_text: HashMap<String, usize> = HashMap::new();
        for &(n, _, s) in &beams {
            let node = &nodes[n as usize];
            let text = words_then(&node.text, &node.partial);
            match by_text.get(&text) {
                Some(&g) => {
                    groups[g].1 = n;
                    groups[g].2 = log_add(groups[g].2, s);
                }
                None => {
                    by_text.insert(text.clone(), groups.len());
                    groups.push((text, n, s));
                }
            }
        }
        let mut out: Vec<Hypothesis> = groups
            .into_iter()
            .map(|(text, n, acoustic)| {
                let node = &nodes[n as usize];
                let lm = match &self.lm {
                    None => node.lm,
                    Some(f) => node.lm + f.last_word(&node.history, &node.partial),
                } + self.hotwords.as_ref().map_or(0.0, |h| h.word(&node.partial));
                // (Single spaces, as pyctcdecode's output: a vocabulary may hold a space token.)
                Hypothesis { text: text.split_whitespace().collect::<Vec<_>>().join(" "), acoustic, lm, score: acoustic + lm }
            })
            .collect();
        let top = out.iter().fold(f64::NEG_INFINITY, |m, h| m.max(h.score));
        out.retain(|h| h.score >= top + self.beam_prune_logp);
        out.sort_by(|a, b| b.score.total_cmp(&a.score));
        out.truncate(self.beam_width.max(1));
        Ok(out)
    }

    /// Checks that the language model's words can be spelled with `vocab`'s letters: an LM
    /// written in another letter case or with other characters than the transcripts makes
    /// almost every word unknown and decodes badly without failing. Refused when fewer than
    /// half its words can be spelled (the error names the file, examples and the fix); no
    /// check without an LM or for a vocabulary with multi-character tokens.
    pub fn check_vocabulary(&self, vocab: &CharVocab) -> Result<()> {
        let Some(f) = &self.lm else { return Ok(()) };
        let letters: std::collections::HashSet<char> = vocab
            .tokens
            .iter()
            .enumerate()
            .filter(|&(i, t)| i != vocab.pad_id && Some(i) != vocab.word_delimiter_id && vocab.is_text(t))
            .filter_map(|(_, t)| {
                let mut c = t.chars();
                match (c.next(), c.next()) {
                    (Some(ch), None) => Some(ch),
                    _ => None,
                }
            })
            .collect();
        // Text tokens of several characters other than the unknown token: word pieces, for
        // which a letter-level check says nothing.
        let pieces = vocab
            .tokens
            .iter()
            .enumerate()
            .filter(|&(i, t)| i != vocab.pad_id && Some(i) != vocab.unk_id && vocab.is_text(t) && t.chars().count() > 1)
            .count();
        if letters.is_empty() || pieces * 10 > vocab.len() {
            return Ok(());
        }
        let words: Vec<&str> = f.lm.vocabulary().collect();
        let bad: Vec<&str> = words.iter().copied().filter(|w| !w.chars().all(|c| letters.contains(&c))).collect();
        if words.is_empty() || bad.len() * 2 <= words.len() {
            return Ok(());
        }
        let mut missing: Vec<char> = bad.iter().flat_map(|w| w.chars()).filter(|c| !letters.contains(c)).collect();
        missing.sort_unstable();
        missing.dedup();
        let examples: Vec<String> = bad.iter().take(3).map(|w| format!("{w:?}")).collect();
        let shown: String = missing.iter().take(12).collect();
        Err(Error::LanguageModel {
            path: f.lm.source.clone(),
            detail: format!(
                "{} of its {} words cannot be spelled with the model's vocab.json (e.g. {}; characters not in it: {shown:?}): \
                 write the LM's text as the model's transcripts are (letter case, dropped characters) and rebuild it",
                bad.len(),
                words.len(),
                examples.join(", ")
            ),
        })
    }

    /// The best hypothesis's text ("" for no frames).
    pub fn decode(&self, vocab: &CharVocab, log_probs: &[f64], tokens: usize) -> Result<String> {
        Ok(self.search(vocab, log_probs, tokens)?.into_iter().next().map(|h| h.text).unwrap_or_default())
    }

    /// The node after `n` and token `k` (a letter, or the delimiter ending a word: `ends_word`).
    fn child(&self, nodes: &mut Vec<Node>, children: &mut HashMap<(u32, u32), u32>, n: u32, k: u32, vocab: &CharVocab, ends_word: bool) -> u32 {
        if let Some(&c) = children.get(&(n, k)) {
            return c;
        }
        let parent = &nodes[n as usize];
        let node = if ends_word {
            let text = words_then(&parent.text, &parent.partial);
            let (mut lm, history) = match &self.lm {
                Some(f) => (parent.lm + f.word(&parent.history, &parent.partial), f.lm.push(&parent.history, &parent.partial)),
                None => (parent.lm, Vec::new()),
            };
            lm += self.hotwords.as_ref().map_or(0.0, |h| h.word(&parent.partial));
            Node { text, partial: String::new(), lm, history, partial_score: 0.0 }
        } else {
            let mut partial = parent.partial.clone();
            if let Some(tok) = vocab.tokens.get(k as usize).filter(|t| vocab.is_text(t)) {
                partial.push_str(tok);
            }
            let hot = self.hotwords.as_ref().and_then(|h| h.partial(&partial));
            let partial_score = hot.unwrap_or_else(|| self.lm.as_ref().map_or(0.0, |f| f.partial(&partial)));
            Node { text: parent.text.clone(), partial, lm: parent.lm, history: parent.history.clone(), partial_score }
        };
        nodes.push(node);
        let c = (nodes.len() - 1) as u32;
        children.insert((n, k), c);
        c
    }
}
