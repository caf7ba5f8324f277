//! CTC prefix beam search, with an optional word n-gram language model fused in (shallow
//! fusion, as pyctcdecode does for transformers' `Wav2Vec2ProcessorWithLM`).
//!
//! Each beam is a label prefix (the CTC output after collapsing repeats and dropping blanks)
//! with two log probabilities: of all frame paths so far that give the prefix and end in a blank
//! (`p_b`), and that end in its last label (`p_nb`). A frame extends a prefix `l` ending in `c`
//! with token `k` at log probability `x`:
//! - blank: `p_b(l) += (p_b + p_nb)(l) x`;
//! - `k == c`: `p_nb(l) += p_nb(l) x` (the repeat collapses) and `p_nb(l k) += p_b(l) x` (a blank
//!   in between makes it a new label);
//! - any other `k`: `p_nb(l k) += (p_b + p_nb)(l) x`
//!
//! (sums in probability, computed in log space). With no pruning, `p_b + p_nb` of a prefix after
//! the last frame is exactly the probability CTC gives that label sequence: the sum over every
//! frame path that collapses to it (`tests/decode.rs` checks it against enumerating all paths).
//!
//! With a language model the beams are ranked by `ln(p_b + p_nb) + lm`, where `lm` sums, for
//! each word the prefix completes (a word delimiter `|` after letters), `alpha * ln P(word |
//! previous words) + beta`, plus `unk_score_offset` for a word outside the model's vocabulary;
//! a prefix whose unfinished last word starts no vocabulary word also gets `unk_score_offset`
//! while it is unfinished. At the end the last word is scored as complete and the end of the
//! sentence (`</s>`) is added. `alpha`, `beta`, `unk_score_offset`, the beam width and the two
//! pruning thresholds have pyctcdecode's names and defaults.

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::lm::NgramLm;
use crate::vocab::CharVocab;

/// ln(10): ARPA files hold base-10 logs, the acoustic scores are natural logs.
const LN_10: f64 = std::f64::consts::LN_10;

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

    /// The fused score of `word` after `history`.
    fn word(&self, history: &[u32], word: &str) -> f64 {
        let s = self.lm.score(history, word);
        self.alpha * LN_10 * s.log10 as f64 + self.beta + if s.oov { self.unk_score_offset } else { 0.0 }
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
}

impl Default for BeamSearch {
    /// pyctcdecode's defaults: beam width 100, token_min_logp -5, beam_prune_logp -10, no LM.
    fn default() -> Self {
        BeamSearch { beam_width: 100, token_min_logp: -5.0, beam_prune_logp: -10.0, lm: None }
    }
}

/// One result of [`BeamSearch::search`].
#[derive(Debug, Clone, PartialEq)]
pub struct Hypothesis {
    /// The label sequence (token ids, repeats collapsed, no blanks).
    pub labels: Vec<usize>,
    /// Its text ([`CharVocab::decode`]).
    pub text: String,
    /// ln of its CTC probability over the beam's paths (`p_b + p_nb`).
    pub acoustic: f64,
    /// Its language-model score, last word and `</s>` included (0 without a model).
    pub lm: f64,
    /// `acoustic + lm`: what the results are sorted by.
    pub score: f64,
}

/// A prefix in the tree of prefixes: its parent, its last token, and the LM's view of it.
struct Node {
    parent: u32,
    /// Last label (u32::MAX for the empty prefix).
    token: u32,
    /// Sum of the fused scores of the words completed so far.
    lm: f64,
    /// LM ids of the words so far (the last `order - 1`).
    history: Vec<u32>,
    /// The unfinished word.
    partial: String,
    /// `unk_score_offset` while `partial` starts no vocabulary word, else 0.
    partial_penalty: f64,
}

const ROOT: u32 = 0;

fn log_add(a: f64, b: f64) -> f64 {
    if a == f64::NEG_INFINITY {
        return b;
    }
    if b == f64::NEG_INFINITY {
        return a;
    }
    let (hi, lo) = if a > b { (a, b) } else { (b, a) };
    hi + (lo - hi).exp().ln_1p()
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
    /// Every final beam, best first, for log probabilities [frames, tokens] (row-major, natural
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
        let blank = vocab.pad_id;
        let delim = vocab.word_delimiter_id;
        let start = self.lm.as_ref().map(|f| f.lm.start()).unwrap_or_default();
        let mut nodes = vec![Node { parent: u32::MAX, token: u32::MAX, lm: 0.0, history: start, partial: String::new(), partial_penalty: 0.0 }];
        let mut children: HashMap<(u32, u32), u32> = HashMap::new();
        // Beams: node -> (p_b, p_nb).
        let mut beams: Vec<(u32, f64, f64)> = vec![(ROOT, 0.0, f64::NEG_INFINITY)];
        let mut next: HashMap<u32, (f64, f64)> = HashMap::new();
        let mut cand: Vec<(usize, f64)> = Vec::with_capacity(tokens);
        for row in log_probs.chunks(tokens) {
            // The tokens tried at this frame.
            let best = row.iter().enumerate().fold(0, |b, (i, &v)| if v > row[b] { i } else { b });
            cand.clear();
            cand.extend(row.iter().enumerate().filter(|&(i, &v)| i == best || v >= self.token_min_logp).map(|(i, &v)| (i, v)));
            next.clear();
            for &(n, pb, pnb) in &beams {
                let total = log_add(pb, pnb);
                let last = nodes[n as usize].token;
                for &(k, x) in &cand {
                    if k == blank {
                        let e = next.entry(n).or_insert((f64::NEG_INFINITY, f64::NEG_INFINITY));
                        e.0 = log_add(e.0, total + x);
                        continue;
                    }
                    let from = if k as u32 == last {
                        let e = next.entry(n).or_insert((f64::NEG_INFINITY, f64::NEG_INFINITY));
                        e.1 = log_add(e.1, pnb + x);
                        pb
                    } else {
                        total
                    };
                    if from == f64::NEG_INFINITY {
                        continue;
                    }
                    let c = match children.get(&(n, k as u32)) {
                        Some(&c) => c,
                        None => {
                            let node = self.child(&nodes[n as usize], n, k, vocab, delim);
                            nodes.push(node);
                            let c = (nodes.len() - 1) as u32;
                            children.insert((n, k as u32), c);
                            c
                        }
                    };
                    let e = next.entry(c).or_insert((f64::NEG_INFINITY, f64::NEG_INFINITY));
                    e.1 = log_add(e.1, from + x);
                }
            }
            // Rank, prune by distance to the best, keep the best `beam_width` (ties: older
            // prefix first, so the result does not depend on hash order).
            let score = |n: u32, pb: f64, pnb: f64| {
                let node = &nodes[n as usize];
                log_add(pb, pnb) + node.lm + node.partial_penalty
            };
            let mut ranked: Vec<(f64, u32, f64, f64)> = next.iter().map(|(&n, &(pb, pnb))| (score(n, pb, pnb), n, pb, pnb)).collect();
            ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            let floor = ranked.first().map_or(f64::NEG_INFINITY, |r| r.0 + self.beam_prune_logp);
            beams = ranked.into_iter().take_while(|r| r.0 >= floor).take(self.beam_width.max(1)).map(|(_, n, pb, pnb)| (n, pb, pnb)).collect();
        }
        let mut out: Vec<Hypothesis> = beams
            .into_iter()
            .map(|(n, pb, pnb)| {
                let node = &nodes[n as usize];
                let lm = match &self.lm {
                    None => 0.0,
                    Some(f) => {
                        let (mut lm, mut history) = (node.lm, node.history.clone());
                        if !node.partial.is_empty() {
                            lm += f.word(&history, &node.partial);
                            history = f.lm.push(&history, &node.partial);
                        }
                        lm + f.alpha * LN_10 * f.lm.score_end(&history) as f64
                    }
                };
                let mut labels = Vec::new();
                let mut m = n;
                while m != ROOT {
                    labels.push(nodes[m as usize].token as usize);
                    m = nodes[m as usize].parent;
                }
                labels.reverse();
                let acoustic = log_add(pb, pnb);
                Hypothesis { text: vocab.decode(&labels), labels, acoustic, lm, score: acoustic + lm }
            })
            .collect();
        out.sort_by(|a, b| b.score.total_cmp(&a.score));
        Ok(out)
    }

    /// The best hypothesis's text ("" for no frames).
    pub fn decode(&self, vocab: &CharVocab, log_probs: &[f64], tokens: usize) -> Result<String> {
        Ok(self.search(vocab, log_probs, tokens)?.into_iter().next().map(|h| h.text).unwrap_or_default())
    }

    /// The prefix `parent` + token `k`, with its LM state.
    fn child(&self, parent: &Node, n: u32, k: usize, vocab: &CharVocab, delim: Option<usize>) -> Node {
        let mut node = Node {
            parent: n,
            token: k as u32,
            lm: parent.lm,
            history: parent.history.clone(),
            partial: parent.partial.clone(),
            partial_penalty: parent.partial_penalty,
        };
        let Some(f) = &self.lm else { return node };
        if Some(k) == delim {
            if !parent.partial.is_empty() {
                node.lm += f.word(&parent.history, &parent.partial);
                node.history = f.lm.push(&parent.history, &parent.partial);
                node.partial.clear();
                node.partial_penalty = 0.0;
            }
        } else if let Some(tok) = vocab.tokens.get(k).filter(|t| vocab.is_text(t)) {
            node.partial.push_str(tok);
            node.partial_penalty = if f.lm.is_prefix(&node.partial) { 0.0 } else { f.unk_score_offset };
        }
        node
    }
}
