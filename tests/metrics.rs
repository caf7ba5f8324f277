//! Edit distance, CER/WER and classification metrics. Expected F1 values were computed with
//! scikit-learn 1.9 (`f1_score(..., labels=range(n), average=None / "macro", zero_division=0)`).

use klspeech::metrics::{char_error_rate, classification_metrics, edit_distance, word_error_rate};

fn close(a: f64, b: f64) {
    assert!((a - b).abs() <= 1e-15, "{a} != {b}");
}

#[test]
fn edit_distance_cases() {
    let c = |s: &str| s.chars().collect::<Vec<_>>();
    assert_eq!(edit_distance::<char>(&[], &[]), 0);
    assert_eq!(edit_distance(&c(""), &c("abc")), 3);
    assert_eq!(edit_distance(&c("abc"), &c("")), 3);
    assert_eq!(edit_distance(&c("abc"), &c("abc")), 0);
    assert_eq!(edit_distance(&c("kitten"), &c("sitting")), 3);
    assert_eq!(edit_distance(&c("sitting"), &c("kitten")), 3);
    assert_eq!(edit_distance(&c("flaw"), &c("lawn")), 2);
    assert_eq!(edit_distance(&c("intention"), &c("execution")), 5);
    assert_eq!(edit_distance(&c("ab"), &c("ba")), 2); // no transpositions
    assert_eq!(edit_distance(&c("a"), &c("b")), 1);
    assert_eq!(edit_distance(&c("héllo"), &c("hello")), 1); // chars, not bytes
    assert_eq!(edit_distance(&[1, 2, 3, 4], &[2, 3, 4, 5]), 2);
    assert_eq!(edit_distance(&["the", "cat", "sat"], &["the", "bat", "sat", "down"]), 2);
}

#[test]
fn word_error_rate_cases() {
    close(word_error_rate(&["the cat sat"], &["the bat sat down"]), 2.0 / 3.0);
    close(word_error_rate(&["the cat sat"], &["the cat sat"]), 0.0);
    // summed over pairs: (2 + 1) edits / (3 + 2) words
    close(word_error_rate(&["the cat sat", "hello world"], &["the bat sat down", "hello"]), 3.0 / 5.0);
    // whitespace runs and ends do not matter
    close(word_error_rate(&["  the  cat "], &["the cat"]), 0.0);
    // more edits than words: above 1
    close(word_error_rate(&["a"], &["b c d"]), 3.0);
    // edge cases
    close(word_error_rate(&[], &[]), 0.0);
    close(word_error_rate(&[""], &[""]), 0.0);
    close(word_error_rate(&[""], &["two words"]), 2.0); // max(ref total, 1) denominator
}

#[test]
fn char_error_rate_cases() {
    // "the cat sat" (11 chars) -> "the bat sat down": 1 substitution + 5 insertions (" down")
    close(char_error_rate(&["the cat sat"], &["the bat sat down"]), 6.0 / 11.0);
    close(char_error_rate(&["abc"], &["abc"]), 0.0);
    close(char_error_rate(&["kitten", "ab"], &["sitting", "ab"]), 3.0 / 8.0);
    // spaces are characters
    close(char_error_rate(&["ab"], &["a b"]), 0.5);
    // normalization as evaluate's `cer`: runs of spaces collapse, ends are stripped
    close(char_error_rate(&["a b"], &["  a   b "]), 0.0);
    close(char_error_rate(&[], &[]), 0.0);
    close(char_error_rate(&[""], &[""]), 0.0);
    close(char_error_rate(&[""], &["xy"]), 2.0);
}

#[test]
#[should_panic]
fn error_rate_length_mismatch_panics() {
    word_error_rate(&["a", "b"], &["a"]);
}

#[test]
fn classification_three_classes() {
    let m = classification_metrics(3, &[0, 0, 1, 1, 2, 2, 2, 0], &[0, 1, 1, 1, 2, 0, 2, 2]);
    close(m.accuracy, 0.625);
    assert_eq!(m.confusion, vec![vec![1, 1, 1], vec![0, 2, 0], vec![1, 0, 2]]); // [truth][pred]
    close(m.per_class_f1[0], 0.4);
    close(m.per_class_f1[1], 0.8);
    close(m.per_class_f1[2], 0.6666666666666666);
    close(m.macro_f1, 0.6222222222222222);
}

#[test]
fn classification_absent_classes_count_as_zero() {
    // class 1 never predicted right, class 3 absent from truth and predictions
    let m = classification_metrics(4, &[0, 1, 2, 0, 1], &[0, 2, 2, 0, 0]);
    close(m.accuracy, 0.6);
    assert_eq!(m.confusion, vec![vec![2, 0, 0, 0], vec![1, 0, 1, 0], vec![0, 0, 1, 0], vec![0, 0, 0, 0]]);
    assert_eq!(m.per_class_f1.len(), 4);
    close(m.per_class_f1[0], 0.8);
    close(m.per_class_f1[1], 0.0);
    close(m.per_class_f1[2], 0.6666666666666666);
    close(m.per_class_f1[3], 0.0);
    close(m.macro_f1, 0.3666666666666667);

    let m = classification_metrics(2, &[1, 1, 1], &[1, 1, 1]);
    close(m.accuracy, 1.0);
    close(m.macro_f1, 0.5);
    assert_eq!(m.confusion, vec![vec![0, 0], vec![0, 3]]);
}

#[test]
fn classification_confusion_is_truth_by_pred() {
    let m = classification_metrics(2, &[0], &[1]);
    assert_eq!(m.confusion[0][1], 1);
    assert_eq!(m.confusion[1][0], 0);
}

#[test]
fn classification_empty() {
    let m = classification_metrics(3, &[], &[]);
    close(m.accuracy, 0.0);
    close(m.macro_f1, 0.0);
    assert_eq!(m.confusion, vec![vec![0; 3]; 3]);
    let m = classification_metrics(0, &[], &[]);
    assert!(m.confusion.is_empty() && m.per_class_f1.is_empty());
    close(m.macro_f1, 0.0);
}

#[test]
#[should_panic]
fn classification_label_out_of_range_panics() {
    classification_metrics(2, &[2], &[0]);
}

#[test]
fn classification_serializes() {
    let m = classification_metrics(2, &[0, 1], &[0, 0]);
    let j = serde_json::to_value(&m).unwrap();
    assert_eq!(j["confusion"], serde_json::json!([[1, 0], [1, 0]]));
    assert!(j["macro_f1"].is_f64());
}
