//! Transcripts for CTC, as the Hugging Face Wav2Vec2 fine-tuning recipe prepares them
//! ("Fine-tune XLSR-Wav2Vec2 for low-resource ASR"): strip punctuation, build a character
//! vocabulary with `|` as the word delimiter and `[UNK]`/`[PAD]` at the end, encode.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::error::{Error, Result};
use crate::vocab::CharVocab;

/// The punctuation the Hugging Face recipe removes (`chars_to_ignore_regex =
/// '[\,\?\.\!\-\;\:\"\“\%\‘\”\�]'`). The apostrophe is kept: it is part of words ("don't").
pub const HF_CHARS_TO_IGNORE: &str = ",?.!-;:\"“%‘”�";

/// Normalizes a transcript: removes every character of `chars_to_ignore` (without leaving a
/// space: "e-mail" becomes "email", as the recipe's `re.sub(.., '', ..)` does), lowercases when
/// `lowercase`, collapses runs of whitespace to one space and trims.
///
/// Case: the Hugging Face blog lowercases (its TIMIT/Common Voice vocabularies are lowercase),
/// but the English CTC checkpoints (`wav2vec2-base-960h`) have an uppercase vocabulary. The
/// case must match the vocabulary, so nothing here changes it unless asked: the default
/// everywhere in klspeech is `lowercase = false`.
pub fn normalize_transcript(text: &str, chars_to_ignore: &str, lowercase: bool) -> String {
    let mut s = String::with_capacity(text.len());
    for c in text.chars().filter(|c| !chars_to_ignore.contains(*c)) {
        if lowercase {
            s.extend(c.to_lowercase());
        } else {
            s.push(c);
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
