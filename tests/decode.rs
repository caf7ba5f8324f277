//! CTC prefix beam search (`klspeech::decode`) and ARPA language models (`klspeech::lm`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use klspeech::decode::{log_softmax_rows, BeamSearch, Hotwords, LmFusion};
use klspeech::lm::NgramLm;
use klspeech::vocab::{ctc_greedy, CharVocab};

fn vocab(tokens: &[&str]) -> CharVocab {
    let map: BTreeMap<String, i64> = tokens.iter().enumerate().map(|(i, t)| (t.to_string(), i as i64)).collect();
    CharVocab::from_map(&map, Path::new("vocab.json")).unwrap()
}

fn tiny_lm() -> NgramLm {
    NgramLm::from_arpa(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lm/tiny.arpa")).unwrap()
}

/// With no pruning, every final beam's acoustic score is the log CTC probability of its text:
/// the sum over all 4^6 frame paths that print it (collapsed, blanks and repeated or edge
/// delimiters dropped), enumerated; every text some path prints is among the beams; the best
/// beam is the most probable text.
#[test]
fn unpruned_beams_hold_the_exact_ctc_probability_of_their_labels() {
    let v = vocab(&["[PAD]", "|", "a", "b"]);
    let (frames, tokens) = (6usize, 4usize);
    // Logits from a fixed LCG, spread enough that many sequences matter.
    let mut state = 12345u64;
    let logits: Vec<f32> = (0..frames * tokens)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 33) as f64 / (1u64 << 31) as f64 * 4.0 - 2.0) as f32
        })
        .collect();
    let lp = log_softmax_rows(&logits, tokens);
    let mut exact: HashMap<String, f64> = HashMap::new();
    for path in 0..tokens.pow(frames as u32) {
        let ids: Vec<usize> = (0..frames).map(|t| path / tokens.pow(t as u32) % tokens).collect();
        let p: f64 = ids.iter().enumerate().map(|(t, &k)| lp[t * tokens + k]).sum::<f64>().exp();
        *exact.entry(v.decode(&ctc_greedy(&ids, v.pad_id))).or_default() += p;
    }
    let search = BeamSearch { beam_width: 100_000, token_min_logp: f64::NEG_INFINITY, beam_prune_logp: f64::NEG_INFINITY, ..BeamSearch::default() };
    let hyps = search.search(&v, &lp, tokens).unwrap();
    assert_eq!(hyps.len(), exact.len(), "every text a path prints is a beam");
    let total: f64 = hyps.iter().map(|h| h.acoustic.exp()).sum();
    assert!((total - 1.0).abs() < 1e-12, "the beams' probabilities sum to {total}");
    for h in &hyps {
        let want = exact[&h.text];
        assert!((h.acoustic.exp() - want).abs() < 1e-14 * want.max(1e-3), "{:?}: {} against {want}", h.text, h.acoustic.exp());
        assert_eq!(h.score, h.acoustic);
    }
    let best = exact.iter().max_by(|a, b| a.1.total_cmp(b.1)).unwrap();
    assert_eq!(&hyps[0].text, best.0);
    // Pruned to 3 beams a frame: the best is still found here, and at most 3 remain.
    let narrow = BeamSearch { beam_width: 3, ..search };
    let few = narrow.search(&v, &lp, tokens).unwrap();
    assert!(few.len() <= 3);
    assert_eq!(few[0].text, hyps[0].text);
}

/// Back-off scores of the tiny trigram model, worked by hand from the file.
#[test]
fn arpa_backoff_scores() {
    let lm = tiny_lm();
    assert_eq!(lm.order, 3);
    let id = |w: &str| lm.id(w).unwrap();
    let bos = lm.start();
    assert_eq!(bos, vec![id("<unk>") + 1]); // <s> is the second 1-gram
    let close = |a: f32, b: f32| (a - b).abs() < 1e-6;
    // A bigram and a trigram as they are.
    assert!(close(lm.score(&bos, "the").log10, -0.2));
    let h = lm.push(&bos, "the");
    assert!(close(lm.score(&h, "ball").log10, -0.05));
    // No trigram "<s> the bal": backoff(<s> the) + P(bal | the) = -0.25 - 1.5.
    assert!(close(lm.score(&h, "bal").log10, -1.75));
    // No bigram "<s> ball": backoff(<s>) + P(ball) = -0.5 - 0.9.
    assert!(close(lm.score(&bos, "ball").log10, -1.4));
    // "</s>" after "the ball": backoff(the ball) + P(</s> | ball) = -0.15 - 0.1.
    let h2 = lm.push(&h, "ball");
    assert_eq!(h2, vec![id("the"), id("ball")], "the history keeps order - 1 words");
    assert!(close(lm.score_end(&h2), -0.25));
    // After "the bal": "the bal" has no back-off weight (0), backoff(bal) + P(</s>) = -0.1 - 0.7.
    assert!(close(lm.score_end(&lm.push(&h, "bal")), -0.8));
    // An unknown word after "<s> the": backoff(<s> the) + backoff(the) + P(<unk>)
    // = -0.25 - 0.3 - 1.0, flagged.
    let s = lm.score(&h, "dog");
    assert!(close(s.log10, -1.55) && s.oov, "{s:?}");
    assert!(!lm.score(&bos, "the").oov);
    assert!(lm.is_prefix("ba") && lm.is_prefix("bal") && lm.is_prefix("") && !lm.is_prefix("bx") && !lm.is_prefix("<s"));
}

/// Frames spelling "the bal" with a weak second `l`: acoustically "the bal" (0.6 against 0.4 on
/// the last frame), but the LM prefers "the ball" by far, so with it the search says "the ball";
/// the LM part of the score is the hand-computed sum.
#[test]
fn the_language_model_overrules_a_weak_acoustic_choice() {
    let v = vocab(&["[PAD]", "|", "t", "h", "e", "b", "a", "l"]);
    let tokens = v.len();
    let frame = |probs: &[(usize, f64)]| -> Vec<f64> {
        let rest = 1e-4;
        let mut p = vec![rest; tokens];
        for &(k, x) in probs {
            p[k] = x;
        }
        let z: f64 = p.iter().sum();
        p.iter().map(|x| (x / z).ln()).collect()
    };
    let (t, h, e, bar, b, a, l, blank) = (2, 3, 4, 1, 5, 6, 7, 0);
    let mut lp = Vec::new();
    for &k in &[t, h, e, bar, b, a, l] {
        lp.extend(frame(&[(k, 0.99)]));
    }
    lp.extend(frame(&[(blank, 0.99)]));
    lp.extend(frame(&[(l, 0.4), (blank, 0.6)]));
    let plain = BeamSearch::default();
    assert_eq!(plain.decode(&v, &lp, tokens).unwrap(), "the bal");
    let fusion = LmFusion::new(Arc::new(tiny_lm()));
    let with_lm = BeamSearch { lm: Some(fusion.clone()), ..BeamSearch::default() };
    let hyps = with_lm.search(&v, &lp, tokens).unwrap();
    assert_eq!(hyps[0].text, "the ball");
    // alpha ln(10) (log10 P(the | <s>) + log10 P(ball | <s> the) + log10 P(</s> | the ball)) + 2 beta.
    let ln10 = std::f64::consts::LN_10;
    let want = 0.5 * ln10 * -0.2f32 as f64 + 1.5 + 0.5 * ln10 * (-0.05f32 as f64 + (-0.15f32 + -0.1f32) as f64) + 1.5;
    assert!((hyps[0].lm - want).abs() < 1e-6, "{} against {want}", hyps[0].lm);
    let bal = hyps.iter().find(|x| x.text == "the bal").expect("the other reading is still a beam");
    assert!(bal.acoustic > hyps[0].acoustic, "acoustically \"the bal\" wins");
    // An unknown word: alpha ln(10) (its <unk> score + unk_score_offset + </s>) + beta.
    let strict = BeamSearch { lm: Some(LmFusion { unk_score_offset: -100.0, ..fusion }), ..BeamSearch::default() };
    let mut lp2 = Vec::new();
    for &k in &[t, h, e, bar, b, e, e] {
        lp2.extend(frame(&[(k, 0.99)]));
    }
    let only = strict.search(&v, &lp2, tokens).unwrap();
    assert_eq!(only[0].text, "the be");
    // "the" after <s>, then "be" as <unk> after "<s> the": backoff(<s> the) + backoff(the) +
    // P(<unk>) = -1.55, then </s> after "the <unk>": backoff(the) is not it ("the <unk>" is no
    // bigram), P(</s>) alone = -0.7.
    let want = 0.5 * ln10 * -0.2f32 as f64 + 1.5 + 0.5 * ln10 * ((-0.25f32 + -0.3f32 + -1.0f32) as f64 + -100.0 + -0.7f32 as f64) + 1.5;
    assert!((only[0].lm - want).abs() < 1e-5, "{} against {want}", only[0].lm);
}

/// A bad ARPA file fails with the path, the line and what is wrong.
#[test]
fn arpa_errors_name_the_file_line_and_fix() {
    let d = tempfile::tempdir().unwrap();
    let good = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lm/tiny.arpa")).unwrap();
    let case = |name: &str, bytes: &[u8]| {
        let p = d.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        (NgramLm::from_arpa(&p).unwrap_err().to_string(), p.display().to_string())
    };
    let (e, p) = case("lm.bin", b"mmap lm http://kheafield.com/code format version 5\n\0\0");
    assert_eq!(e, format!("{p}: a KenLM binary file, which klspeech cannot read; point at the ARPA file it was built from (lmplz's output, `.arpa`)"));
    let (e, p) = case("words.txt", b"the ball\n");
    assert_eq!(e, format!("{p}: no `\\data\\` header before the first entries: not an ARPA language model"));
    let (e, p) = case("cut.arpa", good.replace("\\end\\\n", "").as_bytes());
    assert_eq!(e, format!("{p}: no `\\end\\` line: the file is truncated"));
    let (e, p) = case("count.arpa", good.replace("ngram 2=4", "ngram 2=5").as_bytes());
    assert_eq!(e, format!("{p}: the header announces 5 2-grams, the 2-gram section holds 4 distinct ones"));
    let (e, p) = case("word.arpa", good.replace("-1.5\tthe bal", "-1.5\tthe dog").as_bytes());
    assert_eq!(e, format!("{p}: line 18: `dog` is in a 2-gram but not among the 1-grams"));
    let (e, p) = case("num.arpa", good.replace("-0.4\tthe ball", "x\tthe ball").as_bytes());
    assert_eq!(e, format!("{p}: line 16: `x` is not a number"));
    let (e, p) = case("fields.arpa", good.replace("-0.05\t<s> the ball", "-0.05\t<s> the").as_bytes());
    assert_eq!(e, format!("{p}: line 21: `-0.05\t<s> the`: expected a log10 probability, 3 word(s) and an optional back-off weight"));
    let (e, p) = case("gz.arpa", &[0x1f, 0x8b, 0x08, 0x00, 0xff, 0xfe]);
    assert_eq!(e, format!("{p}: line 1: not UTF-8 text; an ARPA file is text (a KenLM binary or compressed file must be given as its ARPA source, uncompressed)"));
    let missing = d.path().join("none.arpa");
    assert!(NgramLm::from_arpa(&missing).unwrap_err().to_string().starts_with(&format!("{}: cannot open file", missing.display())));
}

/// The bundled demo LM (tools/make_arpa.py, interpolated in back-off form) read through
/// klspeech's back-off: after every context the file holds (each 1- and 2-gram but `</s>`, and
/// sentence starts), the probabilities of every word, `</s>` and `<unk>` sum to one. A back-off
/// weight applied to the wrong context, or not at all, breaks the sums.
#[test]
fn the_demo_language_model_sums_to_one_after_every_context() {
    for name in ["train-3gram.arpa", "train-unseen-3gram.arpa"] {
        let lm = NgramLm::from_arpa(&Path::new(env!("CARGO_MANIFEST_DIR")).join("audio_fixtures/asr/lm").join(name)).unwrap();
        assert_eq!(lm.order, 3);
        let words: Vec<&str> = lm.words.iter().map(|w| w.as_str()).filter(|w| *w != "<s>").collect();
        let mut contexts: Vec<Vec<u32>> = vec![vec![], lm.start()];
        for w in &words {
            if !matches!(*w, "</s>" | "<unk>") {
                contexts.push(lm.push(&[], w));
                contexts.push(lm.push(&lm.start(), w));
                contexts.push(lm.push(&lm.push(&[], "the"), w));
            }
        }
        for h in &contexts {
            let total: f64 = words
                .iter()
                .map(|w| match *w {
                    "</s>" => lm.score_end(h),
                    "<unk>" => lm.score(h, "qqqq-not-a-word").log10,
                    w => lm.score(h, w).log10,
                })
                .map(|l| 10f64.powf(l as f64))
                .sum();
            assert!((total - 1.0).abs() < 1e-4, "{name}: after {:?}: {total}", h.iter().map(|&i| lm.words[i as usize].as_str()).collect::<Vec<_>>());
        }
        assert!(contexts.len() > 500);
    }
}

/// Against pyctcdecode 0.5 + KenLM (what transformers' Wav2Vec2ProcessorWithLM runs;
/// tools/gen_lm_decode_fixture.py): on the bundled CTC model's logits for 40 test clips, four
/// six settings (pyctcdecode's defaults with the unseen-sentence 3-gram; alpha 2, beta 0, 8
/// beams with the all-sentence 3-gram; other alpha, beta, unk_score_offset, token_min_logp,
/// beam_prune_logp and 30 beams; no LM, 16 beams; hotwords with the LM and without, one a
/// phrase, one outside the LM): the same best text, and its logit and
/// combined scores within 1e-4 (KenLM sums back-offs in f32 in its own order); and the same
/// first five beams in the same order with their scores (`predict --n-best`).
#[test]
fn beam_search_matches_pyctcdecode() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(root.join("tests/fixtures/lm/pyctcdecode.json")).unwrap()).unwrap();
    let logits = candle_core::safetensors::load(root.join("tests/fixtures/lm/ctc_logits.safetensors"), &candle_core::Device::Cpu).unwrap();
    let map: BTreeMap<String, i64> = serde_json::from_str(&std::fs::read_to_string(root.join("models/klspeech-small/vocab.json")).unwrap()).unwrap();
    let v = CharVocab::from_map(&map, Path::new("vocab.json")).unwrap();
    let labels: Vec<String> = r["labels"].as_array().unwrap().iter().map(|l| l.as_str().unwrap().to_string()).collect();
    assert_eq!(labels, v.tokens, "the decoder's alphabet is the vocabulary in id order");
    let mut lms: HashMap<String, Arc<NgramLm>> = HashMap::new();
    let (mut compared, mut wrong) = (0, Vec::new());
    for setting in r["settings"].as_array().unwrap() {
        let name = setting["name"].as_str().unwrap();
        let p = &setting["params"];
        let get = |k: &str, d: f64| p.get(k).and_then(|x| x.as_f64()).unwrap_or(d);
        let lm = setting["lm"].as_str().map(|path| {
            lms.entry(path.to_string()).or_insert_with(|| Arc::new(NgramLm::from_arpa(&root.join(path)).unwrap())).clone()
        });
        let search = BeamSearch {
            beam_width: get("beam_width", 100.0) as usize,
            token_min_logp: get("token_min_logp", -5.0),
            beam_prune_logp: get("beam_prune_logp", -10.0),
            lm: lm.map(|lm| LmFusion { lm, alpha: get("alpha", 0.5), beta: get("beta", 1.5), unk_score_offset: get("unk_score_offset", -10.0) }),
            hotwords: p.get("hotwords").map(|h| {
                let words: Vec<&str> = h.as_array().unwrap().iter().map(|w| w.as_str().unwrap()).collect();
                Hotwords::new(&words, get("hotword_weight", 10.0))
            }),
        };
        for (clip, want) in setting["results"].as_object().unwrap() {
            let t = &logits[clip];
            let rows: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            let hyps = search.search(&v, &log_softmax_rows(&rows, v.len()), v.len()).unwrap();
            let best = &hyps[0];
            let (a, c) = (want["logit_score"].as_f64().unwrap(), want["combined_score"].as_f64().unwrap());
            if best.text != want["text"].as_str().unwrap() || (best.acoustic - a).abs() >= 1e-4 || (best.score - c).abs() >= 1e-4 {
                wrong.push(format!("{name}: {clip}: {:?} {} / {} against {:?} {a} / {c}", best.text, best.acoustic, best.score, want["text"].as_str().unwrap()));
            }
            // The first five beams, in order.
            let n_best = want["n_best"].as_array().unwrap();
            let got: Vec<(&str, f64, f64)> = hyps.iter().take(5).map(|h| (h.text.as_str(), h.acoustic, h.score)).collect();
            let exp: Vec<(&str, f64, f64)> = n_best.iter().map(|b| (b[0].as_str().unwrap(), b[1].as_f64().unwrap(), b[2].as_f64().unwrap())).collect();
            let same = got.len() == exp.len() && got.iter().zip(&exp).all(|(g, e)| g.0 == e.0 && (g.1 - e.1).abs() < 1e-4 && (g.2 - e.2).abs() < 1e-4);
            if !same {
                wrong.push(format!("{name}: {clip}: n-best {got:?} against {exp:?}"));
            }
            compared += 1;
        }
    }
    assert_eq!(compared, 6 * 40);
    assert!(wrong.is_empty(), "{} of {compared} differ:\n{}", wrong.len(), wrong.join("\n"));
}

/// An LM whose words the model cannot spell (another letter case) is refused with the file,
/// examples and the fix; one it can spell, or a word-piece vocabulary, passes.
#[test]
fn a_language_model_in_another_letter_case_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let good = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lm/tiny.arpa")).unwrap();
    let upper = d.path().join("upper.arpa");
    // "ball" becomes "BALl": three of three words unspellable all the same.
    std::fs::write(&upper, good.replace("the", "THE").replace("bal", "BAL")).unwrap();
    let v = vocab(&["[PAD]", "|", "t", "h", "e", "b", "a", "l", "[UNK]"]);
    let with = |lm: NgramLm| BeamSearch { lm: Some(LmFusion::new(Arc::new(lm))), ..BeamSearch::default() };
    assert!(with(tiny_lm()).check_vocabulary(&v).is_ok());
    let e = with(NgramLm::from_arpa(&upper).unwrap()).check_vocabulary(&v).unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "{}: 3 of its 3 words cannot be spelled with the model's vocab.json (e.g. \"THE\", \"BALl\", \"BAL\"; characters not in it: \"ABEHLT\"): \
             write the LM's text as the model's transcripts are (letter case, dropped characters) and rebuild it",
            upper.display()
        )
    );
    // Word pieces: no letter-level check.
    let pieces = vocab(&["[PAD]", "|", "th", "he", "ba", "ll", "al", "t", "h"]);
    assert!(with(NgramLm::from_arpa(&upper).unwrap()).check_vocabulary(&pieces).is_ok());
    // No LM, nothing to check.
    assert!(BeamSearch::default().check_vocabulary(&v).is_ok());
}
