//! The commands end to end: embed, predict, inspect-model, and train / eval's flags and output.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn klspeech(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_klspeech")).current_dir(root()).args(args).output().unwrap()
}

fn ok(out: &std::process::Output) -> String {
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout.clone()).unwrap()
}

const A: &str = "audio_fixtures/speech-16k-mono-s16.flac";
const B: &str = "audio_fixtures/speech-44k1-stereo-vorbis.ogg";

#[test]
fn embed_writes_one_tensor_per_input_keyed_by_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("emb.safetensors");
    let o = out.to_str().unwrap();
    ok(&klspeech(&["embed", "--model", "tests/fixtures/w2v2/base-group-oldwn", "--out", o, A, B]));
    let t = candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap();
    assert_eq!(t.len(), 2);
    // 1.2 s at 16 kHz -> frames of the tiny conv stack (kernels 10,3,2 / strides 5,2,2).
    let cfg = klspeech::model::Wav2Vec2Config::from_file(Path::new("tests/fixtures/w2v2/base-group-oldwn/config.json")).unwrap();
    let n = klspeech::audio::load(&root().join(A)).unwrap().samples.len();
    assert_eq!(t[A].dims(), &[cfg.frames_for_samples(n), 32]);
    assert_eq!(t[B].dim(1).unwrap(), 32);

    ok(&klspeech(&["embed", "--model", "tests/fixtures/w2v2/base-group-oldwn", "--layer", "all", "--out", o, A]));
    let all = candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap();
    assert_eq!(all[A].dims()[0], 3);
    // The last stacked state of a post-norm model is the last hidden state.
    let flat = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(flat(&all[A].get(2).unwrap()), flat(&t[A])); // (NaN would differ)

    let bad = klspeech(&["embed", "--model", "tests/fixtures/w2v2/base-group-oldwn", "--layer", "7", "--out", o, A]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("hidden states 0..=2"));
}

#[test]
fn predict_classification_and_ctc() {
    let s = ok(&klspeech(&["predict", "--json", "--model", "tests/fixtures/w2v2/cls-weighted", A, B]));
    let lines: Vec<serde_json::Value> = s.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["path"], A);
    let scores = lines[0]["scores"].as_object().unwrap();
    assert_eq!(scores.len(), 4);
    let sum: f64 = scores.values().map(|v| v.as_f64().unwrap()).sum();
    assert!((sum - 1.0).abs() < 1e-5);
    let label = lines[0]["label"].as_str().unwrap();
    let best = scores.iter().max_by(|a, b| a.1.as_f64().partial_cmp(&b.1.as_f64()).unwrap()).unwrap().0;
    assert_eq!(label, best);

    let s = ok(&klspeech(&["predict", "--json", "--model", "tests/fixtures/w2v2/stable-ctc-f16", A]));
    let v: serde_json::Value = serde_json::from_str(s.trim()).unwrap();
    let text = v["text"].as_str().unwrap();
    assert!(text.replace("<unk>", "").chars().all(|c| "ABCDEFG ".contains(c)), "{text}");

    let bad = klspeech(&["predict", "--model", "tests/fixtures/w2v2/base-group-oldwn", A]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("bare encoder"));
}

#[test]
fn inspect_model_reports_the_kl_norm_share() {
    let s = ok(&klspeech(&["inspect-model", "--model", "docs/configs/wav2vec2-base"]));
    assert!(s.contains("parameters       94371712 total"), "{s}");
    assert!(s.contains("KL-Norm adds     39424 parameters = 0.0418% of the model"), "{s}");
    let s = ok(&klspeech(&["inspect-model", "--model", "tests/fixtures/w2v2/stable-ctc-f16", "--kl-sites", "all"]));
    assert!(s.contains("pre-norm") && s.contains("Wav2Vec2ForCTC"), "{s}");
}

#[test]
fn threads_flag_is_global_and_checked() {
    // --threads works before or after the subcommand; 0 is refused with the flag named.
    let a = ok(&klspeech(&["--threads", "1", "predict", "--json", "--model", "tests/fixtures/w2v2/cls-weighted", A]));
    let b = ok(&klspeech(&["predict", "--json", "--threads", "2", "--model", "tests/fixtures/w2v2/cls-weighted", A]));
    assert_eq!(a, b, "the thread count must not change results");
    let o = klspeech(&["--threads", "0", "predict", "--model", "tests/fixtures/w2v2/cls-weighted", A]);
    assert!(!o.status.success());
    assert_eq!(String::from_utf8_lossy(&o.stderr).trim(), "error: invalid input: --threads must be at least 1");
    // --tf32 is global too, and changes nothing on the CPU (f32 matrix products stay f32).
    let c = ok(&klspeech(&["predict", "--json", "--tf32", "--threads", "1", "--model", "tests/fixtures/w2v2/cls-weighted", A]));
    assert_eq!(a, c, "--tf32 must not change CPU results");
}

#[test]
fn vib_is_refused_for_asr_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let o = klspeech(&[
        "train", "--task", "asr", "--vib", "--model", "tests/fixtures/w2v2/base-group-oldwn",
        "--data", "audio_fixtures/asr/train.csv", "--out", dir.path().to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--vib regularizes the pooled representation of a classification head: use it with --task kws or classify, not asr"),
        "{err}"
    );
}

#[test]
fn kl_norm_where_it_would_silently_do_nothing_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let base = ["train", "--task", "kws", "--model", "tests/fixtures/w2v2/base-group-oldwn", "--data", "audio_fixtures/kws/train", "--out", out];
    let run = |extra: &[&str]| {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        let o = klspeech(&args);
        assert!(!o.status.success(), "{extra:?} must be refused");
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let e = run(&["--kl-sites", "all"]);
    assert!(e.contains("--kl-sites all puts KL-Norm into the feature encoder, which is frozen (the default)"), "{e}");
    assert!(e.contains("add --train-feature-encoder, or use --kl-sites encoder"), "{e}");
    let e = run(&["--freeze-encoder"]);
    assert!(e.contains("--norm kl with --freeze-encoder"), "{e}");
    assert!(e.contains("use --norm layer (optionally with --vib), or drop --freeze-encoder"), "{e}");
}

/// `predict --chunk-s`: a chunk longer than the recording gives the unchunked transcript; the
/// flags are checked with messages that name the fix (the chunked arithmetic itself is
/// `tests/parity.rs::chunked_ctc_transcription_matches_transformers_pipeline`).
#[test]
fn chunked_prediction_flags() {
    let m = "models/klspeech-small";
    let clip = "audio_fixtures/asr/clips/test-1b4ae5a6-0003.flac";
    let whole = ok(&klspeech(&["predict", "--model", m, clip]));
    let chunked = ok(&klspeech(&["predict", "--model", m, "--chunk-s", "30", clip]));
    assert_eq!(chunked, whole);
    let err = |args: &[&str]| {
        let o = klspeech(args);
        assert!(!o.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let e = err(&["predict", "--model", m, "--stride-s", "1", clip]);
    assert!(e.contains("--stride-s needs --chunk-s"), "{e}");
    let e = err(&["predict", "--model", m, "--chunk-s", "1", "--stride-s", "0.5", clip]);
    assert!(e.contains("--chunk-s 1 is 16000 samples, not longer than its strides (8000 + 8000)"), "{e}");
    let e = err(&["predict", "--model", m, "--chunk-s", "2", "--stride-s", "0.2,x", clip]);
    assert!(e.contains("--stride-s `0.2,x`: expected SECONDS or LEFT,RIGHT"), "{e}");
    let e = err(&["predict", "--model", m, "--chunk-s", "2", "--batch-size", "0", clip]);
    assert!(e.contains("--batch-size must be at least 1"), "{e}");
    let batched = ok(&klspeech(&["predict", "--model", m, "--chunk-s", "0.5", "--batch-size", "4", clip]));
    assert_eq!(batched, ok(&klspeech(&["predict", "--model", m, "--chunk-s", "0.5", clip])));
    let e = err(&["predict", "--model", m, "--chunk-s", "0", clip]);
    assert!(e.contains("expected a positive chunk and non-negative strides"), "{e}");
    let e = err(&["predict", "--model", "tests/fixtures/w2v2/cls-weighted", "--chunk-s", "2", A]);
    assert!(e.contains("--chunk-s on a model without a CTC head"), "{e}");
}

/// `predict --timestamps`: with --json, "chunks" of {"text", "timestamp"} whose words spell the
/// transcript, in order, inside the recording, on 20 ms frames; in plain text, one indented line
/// per word after the transcript; chunked, the same flag; errors for a bad level and a
/// classifier (the values themselves are `tests/parity.rs`, against transformers' pipeline).
#[test]
fn predict_timestamps() {
    let m = "models/klspeech-small";
    let clip = "audio_fixtures/asr/clips/test-1b4ae5a6-0003.flac";
    let secs = klspeech::audio::load_resampled(&root().join(clip), 16000).unwrap().samples.len() as f64 / 16000.0;
    let line = ok(&klspeech(&["predict", "--json", "--timestamps", "word", "--model", m, clip]));
    let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    let words = v["chunks"].as_array().unwrap();
    let text = v["text"].as_str().unwrap();
    assert!(words.len() >= 3, "{line}");
    let spelled: Vec<&str> = words.iter().map(|w| w["text"].as_str().unwrap()).collect();
    assert_eq!(spelled.join(" "), text);
    let mut last_end = 0.0;
    for w in words {
        let (s, e) = (w["timestamp"][0].as_f64().unwrap(), w["timestamp"][1].as_f64().unwrap());
        assert!(last_end <= s && s < e && e <= secs + 0.02, "{w} after {last_end} in {secs} s");
        for t in [s, e] {
            assert!(((t / 0.02).round() * 0.02 - t).abs() < 1e-9, "{t} is not on a 20 ms frame");
        }
        last_end = e;
    }
    // Without --timestamps no "chunks" key; the text is the same.
    let plain: serde_json::Value = serde_json::from_str(ok(&klspeech(&["predict", "--json", "--model", m, clip])).trim()).unwrap();
    assert_eq!(plain["text"], v["text"]);
    assert!(plain.get("chunks").is_none());
    // Plain text: the transcript line, then "  start end  word" per word.
    let out = ok(&klspeech(&["predict", "--timestamps", "word", "--model", m, clip]));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], format!("{clip}\t{text}"));
    assert_eq!(lines.len(), 1 + words.len());
    for (l, w) in lines[1..].iter().zip(words) {
        let f = |i: usize| format!("{:>9.3}", w["timestamp"][i].as_f64().unwrap());
        assert_eq!(*l, format!("  {} {}  {}", f(0), f(1), w["text"].as_str().unwrap()));
    }
    // Characters: spaces between words are chunks of their own.
    let c: serde_json::Value =
        serde_json::from_str(ok(&klspeech(&["predict", "--json", "--timestamps", "char", "--model", m, clip])).trim()).unwrap();
    let chars: String = c["chunks"].as_array().unwrap().iter().map(|x| x["text"].as_str().unwrap()).collect();
    assert_eq!(chars.split_whitespace().collect::<Vec<_>>().join(" "), text);
    // Chunked with one chunk longer than the clip: the same words and times.
    let chunked = ok(&klspeech(&["predict", "--json", "--timestamps", "word", "--chunk-s", "30", "--model", m, clip]));
    assert_eq!(chunked, line);
    let err = |args: &[&str]| {
        let o = klspeech(args);
        assert!(!o.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let e = err(&["predict", "--timestamps", "words", "--model", m, clip]);
    assert!(e.starts_with("error: invalid value 'words' for '--timestamps <LEVEL>'\n  [possible values: char, word]"), "{e}");
    let e = err(&["predict", "--timestamps", "word", "--model", "tests/fixtures/w2v2/cls-weighted", A]);
    assert!(e.contains("--timestamps on a model without a CTC head"), "{e}");
}

/// `eval` / `predict` with `--lm` (the bundled 3-gram from training sentences the test set does
/// not share) on the bundled CTC model: in-domain WER well below greedy decoding's; `predict`
/// gives another transcript than greedy, of LM words, whole or chunked; `--beam-width` alone
/// runs the beam search without an LM; `--n-best` lists hypotheses; `--hotwords` brings its
/// words out; the flags are checked with messages that name the fix.
#[test]
fn language_model_decoding() {
    let m = "models/klspeech-small";
    let lm = "audio_fixtures/asr/lm/train-unseen-3gram.arpa";
    let test = "audio_fixtures/asr/test.csv";
    let eval = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec!["eval", "--json", "--chars-to-ignore", ",?.!-;:\"'", "--model", m, "--data", test];
        args.extend_from_slice(extra);
        serde_json::from_str(ok(&klspeech(&args)).trim()).unwrap()
    };
    let greedy = eval(&[]);
    let with_lm = eval(&["--lm", lm]);
    let (g, l) = (greedy["wer"].as_f64().unwrap(), with_lm["wer"].as_f64().unwrap());
    assert!(l < g - 0.1, "WER with the LM {l}, greedy {g}");
    assert!(with_lm["cer"].as_f64().unwrap() < greedy["cer"].as_f64().unwrap());
    // A heavier LM weight changes the result: the flags reach the decoder.
    assert_ne!(eval(&["--lm", lm, "--lm-alpha", "2", "--lm-beta", "0"])["wer"], with_lm["wer"]);
    let beam = eval(&["--beam-width", "8"]);
    assert!(beam["wer"].as_f64().unwrap() <= g + 0.05, "{beam}");

    let clip = "audio_fixtures/asr/clips/test-1b4ae5a6-0003.flac";
    let plain = ok(&klspeech(&["predict", "--model", m, clip]));
    let decoded = ok(&klspeech(&["predict", "--model", m, "--lm", lm, clip]));
    assert!(decoded.starts_with(&format!("{clip}\t")) && decoded != plain, "{decoded} / {plain}");
    // The LM's words: every word of the LM transcript is in the LM or the greedy one.
    let lm_text = std::fs::read_to_string(root().join(lm)).unwrap();
    for w in decoded.trim().split('\t').nth(1).unwrap().split(' ') {
        assert!(lm_text.contains(&format!("\t{w}\t")) || plain.contains(w), "{w} in {decoded}");
    }
    let chunked = ok(&klspeech(&["predict", "--model", m, "--lm", lm, "--chunk-s", "30", clip]));
    assert_eq!(chunked, decoded);
    // --n-best: the best K hypotheses, best first, the first one the transcript; score =
    // acoustic + LM (the order and values themselves: tests/decode.rs against pyctcdecode).
    let j: serde_json::Value = serde_json::from_str(ok(&klspeech(&["predict", "--json", "--model", m, "--lm", lm, "--n-best", "4", clip])).trim()).unwrap();
    let n = j["n_best"].as_array().unwrap();
    assert_eq!(n.len(), 4);
    assert_eq!(n[0]["text"], j["text"]);
    assert_eq!(format!("{clip}\t{}\n", j["text"].as_str().unwrap()), decoded);
    for (i, h) in n.iter().enumerate() {
        let (a, l, t) = (h["acoustic_score"].as_f64().unwrap(), h["lm_score"].as_f64().unwrap(), h["score"].as_f64().unwrap());
        assert!((a + l - t).abs() < 1e-9, "{h}");
        if i > 0 {
            assert!(t <= n[i - 1]["score"].as_f64().unwrap(), "{j}");
            assert_ne!(h["text"], n[i - 1]["text"]);
        }
    }
    let plain = ok(&klspeech(&["predict", "--model", m, "--lm", lm, "--n-best", "2", clip]));
    let lines: Vec<&str> = plain.lines().collect();
    assert_eq!(lines.len(), 3, "{plain}");
    assert_eq!(lines[1], format!("  {:>3} {:>11.3}  {}", 1, n[0]["score"].as_f64().unwrap(), n[0]["text"].as_str().unwrap()));

    let err = |args: &[&str]| {
        let o = klspeech(args);
        assert!(!o.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    assert_eq!(
        err(&["predict", "--model", m, "--lm-alpha", "1", clip]),
        "error: --lm-alpha, --lm-beta and --unk-score-offset weigh a language model: add --lm FILE.arpa\n"
    );
    assert_eq!(err(&["predict", "--model", m, "--beam-width", "0", clip]), "error: --beam-width must be at least 1\n");
    assert_eq!(
        err(&["predict", "--model", m, "--n-best", "3", clip]),
        "error: --n-best lists a beam search's hypotheses: add --lm FILE.arpa or --beam-width N\n"
    );
    assert_eq!(err(&["predict", "--model", m, "--lm", lm, "--n-best", "0", clip]), "error: --n-best must be at least 1\n");
    let e = err(&["predict", "--model", m, "--lm", lm, "--timestamps", "word", clip]);
    assert!(e.contains("--timestamps with a beam search (--lm / --beam-width)") && e.contains("drop --lm and --beam-width"), "{e}");
    let e = err(&["predict", "--model", "tests/fixtures/w2v2/cls-weighted", "--lm", lm, A]);
    assert!(e.contains("--lm / --beam-width on a model without a CTC head"), "{e}");
    let e = err(&["eval", "--model", m, "--data", test, "--lm", "README.md"]);
    assert_eq!(e, "error: reading the language model: README.md: no `\\data\\` header before the first entries: not an ARPA language model\n");
    // Hotwords (no LM): "bird" and "tall" come out where greedy decoding misspells them.
    let hot = ok(&klspeech(&["predict", "--model", m, "--hotwords", "bird, tall", clip]));
    let words: Vec<&str> = hot.trim().split('\t').nth(1).unwrap().split(' ').collect();
    assert!(words.contains(&"bird") && words.contains(&"tall"), "{hot}");
    assert!(!plain.contains("bird") && !plain.contains("tall"), "{plain}");
    assert_eq!(err(&["predict", "--model", m, "--hotword-weight", "3", clip]), "error: --hotword-weight weighs hotwords: add --hotwords WORDS\n");
    assert_eq!(
        err(&["predict", "--model", m, "--hotwords", " , ", clip]),
        "error: --hotwords ` , `: no words (expected comma-separated words or phrases)\n"
    );
    // An LM in capitals for a lowercase model: refused by both commands before decoding.
    let d = tempfile::tempdir().unwrap();
    let upper = d.path().join("upper.arpa");
    let text = std::fs::read_to_string(root().join(lm)).unwrap();
    let caps: String = text
        .lines()
        .map(|l| if l.contains('\t') { l.to_uppercase().replace("<S>", "<s>").replace("</S>", "</s>").replace("<UNK>", "<unk>") } else { l.to_string() } + "\n")
        .collect();
    std::fs::write(&upper, caps).unwrap();
    let u = upper.to_str().unwrap();
    for args in [vec!["predict", "--model", m, "--lm", u, clip], vec!["eval", "--model", m, "--data", test, "--lm", u]] {
        let e = err(&args);
        assert!(e.contains(&format!("{u}: 261 of its 261 words cannot be spelled with the model's vocab.json")), "{e}");
        assert!(e.contains("write the LM's text as the model's transcripts are"), "{e}");
    }
    let e = err(&["eval", "--model", m, "--data", test, "--lm", "no-such.arpa"]);
    assert!(e.starts_with("error: reading the language model: no-such.arpa: cannot open file"), "{e}");
}

/// `train` and `eval` with a model whose CTC vocabulary is uppercase (as
/// `facebook/wav2vec2-base-960h`'s) and lowercase transcripts: `--text-case auto`, the
/// default, folds them to the vocabulary's case and trains; `keep` refuses before the first
/// step, naming the fix. The outcome reads as text, or as one JSON object with `--json`, and
/// `eval` of the saved model gives the trainer's dev CER.
#[test]
fn transcripts_follow_the_vocabularys_case_and_the_outcome_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let model = t.join("upper");
    std::fs::create_dir(&model).unwrap();
    let small = root().join("models/klspeech-small");
    for f in ["config.json", "model.safetensors", "preprocessor_config.json"] {
        std::fs::copy(small.join(f), model.join(f)).unwrap();
    }
    let vocab: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(small.join("vocab.json")).unwrap()).unwrap();
    assert!(vocab.contains_key("a") && !vocab.contains_key("A"), "the bundled vocabulary is lowercase");
    let upper: serde_json::Map<String, serde_json::Value> =
        vocab.into_iter().map(|(k, v)| (if k.chars().count() == 1 { k.to_uppercase() } else { k }, v)).collect();
    std::fs::write(model.join("vocab.json"), serde_json::to_string(&upper).unwrap()).unwrap();
    let clips = root().join("audio_fixtures/asr/clips");
    let manifest = |name: &str, rows: &[(&str, &str)]| {
        let body: String = rows.iter().map(|(f, s)| format!("{},{s}\n", clips.join(f).display())).collect();
        let p = t.join(name);
        std::fs::write(&p, format!("path,sentence\n{body}")).unwrap();
        p.display().to_string()
    };
    let train = manifest(
        "train.csv",
        &[
            ("train-153c2cde-0020.flac", "the teacher wrote a word on the board"),
            ("train-153c2cde-0044.flac", "please put the milk in the fridge"),
            ("train-153c2cde-0068.flac", "the wall around the garden is very old"),
            ("train-153c2cde-0092.flac", "the children ran to the beach"),
        ],
    );
    let dev = manifest("dev.csv", &[("dev-18fb3856-0004.flac", "they ate lunch under a big tree"), ("dev-18fb3856-0009.flac", "the moon is bright tonight")]);
    let (model, out_json, out_text) = (model.display().to_string(), t.join("json").display().to_string(), t.join("text").display().to_string());
    let args = |out: &str, extra: &[&str]| -> Vec<String> {
        let base = ["train", "--task", "asr", "--model", &model, "--data", &train, "--dev", &dev, "--out", out, "--steps", "1", "--batch-size", "2", "--quiet"];
        base.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let run = |a: Vec<String>| klspeech(&a.iter().map(String::as_str).collect::<Vec<_>>());

    let refused = run(args(&out_json, &["--text-case", "keep"]));
    assert!(!refused.status.success());
    let e = String::from_utf8_lossy(&refused.stderr);
    assert!(e.contains("characters outside the vocabulary (4 clips):"), "{e}");
    assert!(e.contains("fold letters to the vocabulary's case with --text-case lower or upper"), "{e}");

    let json: serde_json::Value = serde_json::from_str(ok(&run(args(&out_json, &["--json"]))).trim()).unwrap();
    assert_eq!(json["steps"], 1);
    assert_eq!(json["best"]["n"], 2);
    let cer = json["best"]["cer"].as_f64().unwrap();
    assert!(cer.is_finite() && cer > 0.0, "{json}");

    let text = ok(&run(args(&out_text, &[])));
    assert!(text.starts_with(&format!("trained 1 step; best dev evaluation at step 1, saved to {out_text}\n")), "{text}");
    assert!(text.contains(&format!("dev       2 clips   CER {cer:.4}   WER ")), "{text}");
    assert!(text.contains("last training loss "), "{text}");

    // eval folds the references as training did (the saved vocab.json is the model's).
    let eval = |extra: &[&str]| -> serde_json::Value {
        let a: Vec<&str> = ["eval", "--json", "--model", out_json.as_str(), "--data", dev.as_str()].iter().chain(extra).copied().collect();
        serde_json::from_str(ok(&klspeech(&a)).trim()).unwrap()
    };
    assert_eq!(eval(&[])["cer"].as_f64().unwrap(), cer);
    let kept = eval(&["--text-case", "keep"])["cer"].as_f64().unwrap();
    assert!(kept > cer + 0.3, "uppercase predictions against lowercase references: CER {kept} against {cer}");
}

/// Errors print once, on one line, with the file and the fix: the binary's report drops a
/// cause whose text the message already holds (each I/O error names its cause itself).
#[test]
fn error_lines_name_the_file_once() {
    let stderr = |args: &[&str]| {
        let o = klspeech(args);
        assert!(!o.status.success(), "{args:?} succeeded");
        String::from_utf8(o.stderr).unwrap()
    };
    let layout = "a model is a folder in the Hugging Face layout (config.json, model.safetensors, optional preprocessor_config.json and vocab.json)";
    assert_eq!(
        stderr(&["eval", "--model", "no/such/model", "--data", "audio_fixtures/kws/test-ood"]),
        format!("error: loading the model: no/such/model: no such folder: {layout}\n")
    );
    assert_eq!(stderr(&["predict", "--model", "README.md", A]), format!("error: loading the model: README.md: a file, not a model folder: {layout}\n"));
    assert_eq!(
        stderr(&["inspect", "no/such.wav"]),
        "error: no/such.wav: cannot open file: No such file or directory (os error 2)\nerror: 1 of 1 file(s) could not be read\n"
    );
    assert_eq!(
        stderr(&["eval", "--model", "models/klspeech-small", "--data", "no/such/data"]),
        "error: no/such/data: cannot open file: No such file or directory (os error 2)\n"
    );
}
