//! Transcripts for CTC, as the Hugging Face Wav2Vec2 fine-tuning recipe prepares them
//! ("Fine-tune XLSR-Wav2Vec2 for low-resource ASR"): strip punctuation, build a character
//! vocabulary with `|` as the word delimiter and `[UNK]`/`[PAD]` at the end, encode.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::error::{Error, Result};
use crate::vocab::CharVocab;

/// The punctuation the Hugging Face recipe removes (`chars_to_ignore_regex =
/// '[\,\?\.\!\-\;\:\"\“\%\‘\”\�]'`). The apostrophe is kept: it is part of words ("don't").
pub const HF_CHARS_TO_IGNORE: &str = ",?.!-;:\"“%‘”�";

/// How [`normalize_transcript`] treats letter case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Case {
    /// Leave every character as written.
    Keep,
    /// Lowercase (the Hugging Face recipe's `.lower()`).
    Lower,
    /// Uppercase (for uppercase vocabularies such as `wav2vec2-base-960h`'s).
    Upper,
}

/// The letter case a run gives its transcripts (`--text-case`): `auto` (the default) folds
/// them to the CTC vocabulary's case when every cased letter of the vocabulary has one case
/// ([`vocab_case`]: lowercase vocabularies as the Hugging Face recipe builds them, uppercase ones
/// such as `facebook/wav2vec2-base-960h`'s), and keeps them otherwise (a vocabulary with
/// both cases, or one still to be built from the transcripts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TextCase {
    #[default]
    Auto,
    Keep,
    Lower,
    Upper,
}

impl std::str::FromStr for TextCase {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(TextCase::Auto),
            "keep" => Ok(TextCase::Keep),
            "lower" => Ok(TextCase::Lower),
            "upper" => Ok(TextCase::Upper),
            _ => Err(Error::InvalidInput(format!("text case `{s}`: expected auto, keep, lower or upper"))),
        }
    }
}

impl TextCase {
    /// The case to apply with this vocabulary (`None`: none yet, it will be built from the
    /// transcripts, so `auto` keeps them).
    pub fn resolve(self, vocab: Option<&BTreeMap<String, i64>>) -> Case {
        match self {
            TextCase::Auto => vocab.and_then(vocab_case).unwrap_or(Case::Keep),
            TextCase::Keep => Case::Keep,
            TextCase::Lower => Case::Lower,
            TextCase::Upper => Case::Upper,
        }
    }
}

/// The case of a vocabulary's letters: `Lower` or `Upper` when its one-character tokens have
/// cased letters of that case only, `None` when they have both or none (special tokens such
/// as `[PAD]` and `<s>` are not characters and do not count).
pub fn vocab_case(vocab: &BTreeMap<String, i64>) -> Option<Case> {
    let (mut lower, mut upper) = (false, false);
    for tok in vocab.keys() {
        let mut chars = tok.chars();
        if let (Some(c), None) = (chars.next(), chars.next()) {
            lower |= c.is_lowercase();
            upper |= c.is_uppercase();
        }
    }
    match (lower, upper) {
        (true, false) => Some(Case::Lower),
        (false, true) => Some(Case::Upper),
        _ => None,
    }
}

/// Normalizes a transcript: removes every character of `chars_to_ignore` (without leaving a
/// space: "e-mail" becomes "email", as the recipe's `re.sub(.., '', ..)` does), applies `case`,
/// collapses runs of whitespace to one space and trims.
///
/// Case: the Hugging Face blog lowercases (its TIMIT/Common Voice vocabularies are lowercase),
/// but the English CTC checkpoints (`wav2vec2-base-960h`) have an uppercase vocabulary. The
/// case must match the vocabulary: runs resolve their [`TextCase`] against it.
pub fn normalize_transcript(text: &str, chars_to_ignore: &str, case: Case) -> String {
    let mut s = String::with_capacity(text.len());
    for c in text.chars().filter(|c| !chars_to_ignore.contains(*c)) {
        match case {
            Case::Keep => s.push(c),
            Case::Lower => s.extend(c.to_lowercase()),
            Case::Upper => s.extend(c.to_uppercase()),
        }
    }
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Builds a character vocabulary (`vocab.json`'s map) as the Hugging Face XLSR recipe does:
/// the distinct characters sorted by code point get ids 0.., then the space's entry is renamed
/// `|` (the word delimiter, keeping the space's id, which is 0 for ordinary text since space
/// sorts first), then `[UNK]` and `[PAD]` (the CTC blank) are appended.
///
/// So `["ab c", "b a"]` gives `{"|": 0, "a": 1, "b": 2, "c": 3, "[UNK]": 4, "[PAD]": 5}`.
///
/// Differences from the recipe, where it would break: any whitespace counts as a space, a
/// literal `|` in the text is treated as a space too (the delimiter cannot also be a
/// character), and texts without any space still get `|` (appended after the characters),
/// where the recipe fails with a `KeyError`. Normalize texts first ([`normalize_transcript`]).
pub fn build_char_vocab<'a>(texts: impl IntoIterator<Item = &'a str>) -> BTreeMap<String, i64> {
    let chars: BTreeSet<char> = texts
        .into_iter()
        .flat_map(str::chars)
        .map(|c| if c.is_whitespace() || c == '|' { ' ' } else { c })
        .collect();
    let mut map = BTreeMap::new();
    for (id, &c) in chars.iter().enumerate() {
        let tok = if c == ' ' { "|".to_string() } else { c.to_string() };
        map.insert(tok, id as i64);
    }
    let mut next = chars.len() as i64;
    if !chars.contains(&' ') {
        map.insert("|".to_string(), next);
        next += 1;
    }
    map.insert("[UNK]".to_string(), next);
    map.insert("[PAD]".to_string(), next + 1);
    map
}

/// Token lookup of a [`CharVocab`], built once and used for many transcripts.
pub(super) struct CharIndex<'v> {
    vocab: &'v CharVocab,
    ids: HashMap<&'v str, usize>,
}

impl<'v> CharIndex<'v> {
    pub(super) fn new(vocab: &'v CharVocab) -> Self {
        CharIndex { vocab, ids: vocab.tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect() }
    }

    /// The id of a character; whitespace maps to the word delimiter `|` (or a literal `" "`
    /// token where the vocabulary has no delimiter). `None` when not in the vocabulary.
    pub(super) fn get(&self, c: char) -> Option<usize> {
        if c.is_whitespace() {
            return self.vocab.word_delimiter_id.or_else(|| self.ids.get(" ").copied());
        }
        let mut buf = [0u8; 4];
        self.ids.get(&*c.encode_utf8(&mut buf)).copied()
    }
}

/// Encodes a (normalized) transcript as CTC targets: each character to its id, spaces to the
/// word delimiter `|`. A character outside the vocabulary becomes `[UNK]` when the vocabulary
/// has one (as `Wav2Vec2CTCTokenizer` does); otherwise the transcript is an error listing the
/// missing characters.
pub fn encode_transcript(vocab: &CharVocab, text: &str) -> Result<Vec<usize>> {
    let index = CharIndex::new(vocab);
    let mut out = Vec::with_capacity(text.len());
    let mut missing = BTreeSet::new();
    for c in text.chars() {
        match index.get(c).or(vocab.unk_id) {
            Some(id) => out.push(id),
            None => {
                missing.insert(c);
            }
        }
    }
    if !missing.is_empty() {
        let list: Vec<String> = missing.iter().map(|c| format!("{c:?}")).collect();
        return Err(Error::InvalidInput(format!(
            "transcript {text:?} has characters that are not in the vocabulary, which has no [UNK] token: {}",
            list.join(", ")
        )));
    }
    Ok(out)
}
