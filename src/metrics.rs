//! Evaluation metrics: edit distance, character / word error rate (CTC), and accuracy, macro-F1
//! and the confusion matrix (sequence classification).
//!
//! Everything here is a pure function of plain Rust values; the trainer collects decoded strings
//! or predicted labels over an evaluation pass and calls these once.
//!
//! The error rates follow Hugging Face `evaluate`'s `cer` / `wer` metrics (jiwer underneath,
//! `concatenate_texts=False`): every reference/hypothesis pair is normalized (runs of two or
//! more whitespace characters become one space, leading and trailing whitespace is stripped),
//! edits are summed over all pairs and divided by the summed reference length.

/// Levenshtein distance between two sequences (unit cost for insertion, deletion and
/// substitution).
///
/// O(`a.len()` * `b.len()`) time, O(`b.len()`) memory.
pub fn edit_distance<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    if a.is_empty() {
        return b.len();
    }
    if b.is_empty() {
        return a.len();
    }
    // row[j] = distance between a[..i] and b[..j] for the current i.
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, x) in a.iter().enumerate() {
        let mut diag = row[0]; // distance(a[..i], b[..0])
        row[0] = i + 1;
        for (j, y) in b.iter().enumerate() {
            let up = row[j + 1]; // distance(a[..i], b[..j+1])
            let sub = diag + usize::from(x != y);
            let best = sub.min(up + 1).min(row[j] + 1);
            diag = up;
            row[j + 1] = best;
        }
    }
    row[b.len()]
}

/// The normalization `evaluate`'s `cer` / `wer` apply before comparing: runs of two or more
/// whitespace characters become a single space, then leading/trailing whitespace is stripped.
fn normalize(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_whitespace() && chars.peek().is_some_and(|n| n.is_whitespace()) {
            while chars.peek().is_some_and(|n| n.is_whitespace()) {
                chars.next();
            }
            out.push(' ');
        } else {
            out.push(c);
        }
    }
    out.trim().to_string()
}

/// `edits / max(ref_total, 1)`, or 0 when there is nothing at all.
fn rate(edits: usize, ref_total: usize) -> f64 {
    if edits == 0 {
        0.0
    } else {
        edits as f64 / ref_total.max(1) as f64
    }
}

/// Character error rate: the sum over pairs of the character edit distance divided by the sum
/// of reference lengths in characters (Unicode scalar values; spaces count as characters).
///
/// Strings are normalized as `evaluate`'s `cer` does (see the module docs). Edge cases: no pairs,
/// or all references and hypotheses empty, give 0. jiwer rejects empty references; here, when
/// the references hold no characters at all but a hypothesis does, the denominator is
/// `max(ref_total, 1)`, so the rate is the number of inserted characters.
///
/// # Panics
/// If `refs` and `hyps` have different lengths.
pub fn char_error_rate(refs: &[&str], hyps: &[&str]) -> f64 {
    assert_eq!(refs.len(), hyps.len(), "char_error_rate: {} references but {} hypotheses", refs.len(), hyps.len());
    let (mut edits, mut total) = (0usize, 0usize);
    for (r, h) in refs.iter().zip(hyps) {
        let r: Vec<char> = normalize(r).chars().collect();
        let h: Vec<char> = normalize(h).chars().collect();
        edits += edit_distance(&r, &h);
        total += r.len();
    }
    rate(edits, total)
}

/// Word error rate: the sum over pairs of the word edit distance divided by the sum of
/// reference lengths in words (words are split on whitespace).
///
/// Same edge cases as [`char_error_rate`]: 0 when there is nothing to compare, and a
/// `max(ref_total, 1)` denominator when all references are empty but a hypothesis is not.
///
/// # Panics
/// If `refs` and `hyps` have different lengths.
pub fn word_error_rate(refs: &[&str], hyps: &[&str]) -> f64 {
    assert_eq!(refs.len(), hyps.len(), "word_error_rate: {} references but {} hypotheses", refs.len(), hyps.len());
    let (mut edits, mut total) = (0usize, 0usize);
    for (r, h) in refs.iter().zip(hyps) {
        let r: Vec<&str> = r.split_whitespace().collect();
        let h: Vec<&str> = h.split_whitespace().collect();
        edits += edit_distance(&r, &h);
        total += r.len();
    }
    rate(edits, total)
}

/// Accuracy, F1 scores and the confusion matrix of a classification run.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ClassificationMetrics {
    /// Fraction of correct predictions (0 when there are no examples).
    pub accuracy: f64,
    /// Unweighted mean of `per_class_f1` over all `num_classes` classes.
    pub macro_f1: f64,
    /// `confusion[truth][pred]`: how many examples of class `truth` were predicted as `pred`.
    pub confusion: Vec<Vec<usize>>,
    /// F1 of each class, `2 tp / (2 tp + fp + fn)`, 0 where that denominator is 0.
    pub per_class_f1: Vec<f64>,
}

/// Accuracy, macro-F1 and confusion matrix over classes `0..num_classes`.
///
/// Macro-F1 equals scikit-learn's
/// `f1_score(truth, pred, labels=range(num_classes), average="macro", zero_division=0)`:
/// every class counts, including classes that occur neither in `truth` nor in `pred` (their F1
/// is 0). With no examples, accuracy and macro-F1 are 0; with `num_classes == 0`, macro-F1 is 0.
///
/// # Panics
/// If `truth` and `pred` have different lengths, or a label is `>= num_classes`.
pub fn classification_metrics(num_classes: usize, truth: &[usize], pred: &[usize]) -> ClassificationMetrics {
    assert_eq!(truth.len(), pred.len(), "classification_metrics: {} labels but {} predictions", truth.len(), pred.len());
    let mut confusion = vec![vec![0usize; num_classes]; num_classes];
    let mut correct = 0usize;
    for (&t, &p) in truth.iter().zip(pred) {
        assert!(t < num_classes && p < num_classes, "classification_metrics: label {t} / prediction {p} out of range 0..{num_classes}");
        confusion[t][p] += 1;
        correct += usize::from(t == p);
    }
    let per_class_f1: Vec<f64> = (0..num_classes)
        .map(|c| {
            let tp = confusion[c][c];
            let true_sum: usize = confusion[c].iter().sum(); // tp + fn
            let pred_sum: usize = confusion.iter().map(|row| row[c]).sum(); // tp + fp
            let denom = true_sum + pred_sum;
            if denom == 0 {
                0.0
            } else {
                (2 * tp) as f64 / denom as f64
            }
        })
        .collect();
    let macro_f1 = if num_classes == 0 { 0.0 } else { per_class_f1.iter().sum::<f64>() / num_classes as f64 };
    let accuracy = if truth.is_empty() { 0.0 } else { correct as f64 / truth.len() as f64 };
    ClassificationMetrics { accuracy, macro_f1, confusion, per_class_f1 }
}
