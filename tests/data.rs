//! Data set loaders, validation and CTC text preparation, on tiny layouts built in temp dirs.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use klspeech::data::{self, Case, Dataset, Example, KwsOptions, ProblemKind, SilenceCount, Source, TextCase, ValidateOptions};
use klspeech::model::Wav2Vec2Config;
use klspeech::vocab::CharVocab;

/// Writes a 16 kHz mono 16-bit WAV of `secs` seconds (a sine with a little deterministic noise).
fn wav(path: &Path, secs: f64) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let spec = hound::WavSpec { channels: 1, sample_rate: 16_000, bits_per_sample: 16, sample_format: hound::SampleFormat::Int };
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    let n = (secs * 16_000.0).round() as usize;
    let mut x: u32 = 12345;
    for i in 0..n {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        let noise = ((x >> 16) as f64 / 65536.0 - 0.5) * 0.1;
        let s = 0.3 * (i as f64 * 440.0 * std::f64::consts::TAU / 16_000.0).sin() + noise;
        w.write_sample((s * 32767.0) as i16).unwrap();
    }
    w.finalize().unwrap();
}

fn write(path: &Path, text: &str) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, text).unwrap();
}

fn words(w: &[&str]) -> Vec<String> {
    w.iter().map(|s| s.to_string()).collect()
}

/// A Speech Commands training layout: yes (4), no (3), cat (2), dog (1), two 10 s noise files.
fn kws_layout(dir: &Path) {
    for f in ["yes/aa_nohash_0.wav", "yes/aa_nohash_1.wav", "yes/bb_nohash_0.wav", "yes/cc_nohash_0.wav"] {
        wav(&dir.join(f), 0.2);
    }
    for f in ["no/aa_nohash_0.wav", "no/bb_nohash_0.wav", "no/dd_nohash_0.wav"] {
        wav(&dir.join(f), 0.2);
    }
    for f in ["cat/ee_nohash_0.wav", "cat/ff_nohash_0.wav", "dog/ee_nohash_0.wav"] {
        wav(&dir.join(f), 0.2);
    }
    write(&dir.join("README.md"), "not a clip");
    write(&dir.join("yes/notes.txt"), "not a clip");
    write(&dir.join("validation_list.txt"), "yes/bb_nohash_0.wav\r\nno/bb_nohash_0.wav\n\n");
    write(&dir.join("testing_list.txt"), "yes/cc_nohash_0.wav\ncat/ff_nohash_0.wav\n");
    wav(&dir.join("_background_noise_/pink.wav"), 10.0);
    wav(&dir.join("_background_noise_/white.wav"), 10.0);
}

fn names(ds: &Dataset) -> Vec<String> {
    ds.examples
        .iter()
        .filter(|e| matches!(e.source, Source::File(_)))
        .map(|e| {
            let p = e.source.path();
            let folder = p.parent().unwrap().file_name().unwrap().to_str().unwrap();
            format!("{folder}/{}={}", p.file_name().unwrap().to_str().unwrap(), ds.labels[e.label.unwrap()])
        })
        .collect()
}

fn segments(ds: &Dataset) -> Vec<(PathBuf, usize, usize)> {
    ds.examples
        .iter()
        .filter_map(|e| match &e.source {
            Source::Segment { path, start, len } => Some((path.clone(), *start, *len)),
            Source::File(_) => None,
        })
        .collect()
}

#[test]
fn speech_commands_splits_unknown_and_speakers() {
    let tmp = tempfile::tempdir().unwrap();
    kws_layout(tmp.path());
    let opts = KwsOptions { words: words(&["yes", "no"]), silence_clips: SilenceCount::None, ..Default::default() };
    let s = data::speech_commands(tmp.path(), &opts).unwrap();
    assert_eq!(s.train.labels, words(&["yes", "no", "_unknown_"]));
    assert_eq!(s.dev.labels, s.train.labels);
    assert_eq!(names(&s.train), ["cat/ee_nohash_0.wav=_unknown_", "dog/ee_nohash_0.wav=_unknown_", "no/aa_nohash_0.wav=no", "no/dd_nohash_0.wav=no", "yes/aa_nohash_0.wav=yes", "yes/aa_nohash_1.wav=yes"]);
    assert_eq!(names(&s.dev), ["no/bb_nohash_0.wav=no", "yes/bb_nohash_0.wav=yes"]);
    assert_eq!(names(&s.test), ["cat/ff_nohash_0.wav=_unknown_", "yes/cc_nohash_0.wav=yes"]);
    assert_eq!(s.train.examples[0].speaker.as_deref(), Some("ee"));
    assert_eq!(s.train.class_counts(), vec![2, 2, 2]);
    assert!(s.train.examples.iter().all(|e| e.text.is_none()));

    // Without _unknown_: other words are skipped and the class is gone.
    let opts = KwsOptions { unknown: false, ..opts };
    let s = data::speech_commands(tmp.path(), &opts).unwrap();
    assert_eq!(s.train.labels, words(&["yes", "no"]));
    assert_eq!(names(&s.test), ["yes/cc_nohash_0.wav=yes"]);

    // Default options: SUPERB's words, which this layout lacks.
    let e = data::speech_commands(tmp.path(), &KwsOptions::default()).unwrap_err().to_string();
    assert!(e.starts_with(&tmp.path().display().to_string()) && e.contains("keyword `up` has no folder"), "{e}");
    assert_eq!(KwsOptions::default().labels().len(), 12);
    assert_eq!(KwsOptions::default().labels()[10..], ["_unknown_", "_silence_"]);
}

#[test]
fn speech_commands_list_errors_name_the_list() {
    let tmp = tempfile::tempdir().unwrap();
    kws_layout(tmp.path());
    let opts = KwsOptions { words: words(&["yes", "no"]), silence_clips: SilenceCount::None, ..Default::default() };
    write(&tmp.path().join("testing_list.txt"), "yes/cc_nohash_0.wav\nyes/zz_nohash_0.wav\n");
    let e = data::speech_commands(tmp.path(), &opts).unwrap_err().to_string();
    assert!(e.contains("testing_list.txt: line 2: `yes/zz_nohash_0.wav` is not an audio file in a word folder"), "{e}");
    write(&tmp.path().join("testing_list.txt"), "no/bb_nohash_0.wav\n");
    let e = data::speech_commands(tmp.path(), &opts).unwrap_err().to_string();
    assert!(e.contains("testing_list.txt: line 1: `no/bb_nohash_0.wav` is also in validation_list.txt (line 2)"), "{e}");
}

#[test]
fn silence_segments_count_length_regions_and_determinism() {
    let tmp = tempfile::tempdir().unwrap();
    kws_layout(tmp.path());
    let opts = KwsOptions { words: words(&["yes", "no"]), seed: 7, ..Default::default() };
    let s = data::speech_commands(tmp.path(), &opts).unwrap();
    assert_eq!(s.train.labels, words(&["yes", "no", "_unknown_", "_silence_"]));
    // Average keyword class: train (2 + 2) / 2 = 2, dev (1 + 1) / 2 = 1, test (1 + 0) / 2 = 0.5 -> 1.
    let (tr, dv, te) = (segments(&s.train), segments(&s.dev), segments(&s.test));
    assert_eq!((tr.len(), dv.len(), te.len()), (2, 1, 1));
    let n = 160_000; // 10 s
    for (set, lo, hi) in [(&tr, 0, n * 8 / 10), (&dv, n * 8 / 10, n * 9 / 10), (&te, n * 9 / 10, n)] {
        for (_, start, len) in set {
            assert_eq!(*len, 16_000);
            assert!(*start >= lo && start + len <= hi, "{start} outside {lo}..{hi}");
        }
    }
    // Round-robin over the sorted noise files.
    assert!(tr[0].0.ends_with("pink.wav") && tr[1].0.ends_with("white.wav"));
    // Silence follows the word clips and has the silence label, no speaker.
    let last = s.train.examples.last().unwrap();
    assert_eq!((last.label, last.speaker.as_deref()), (Some(3), None));
    assert_eq!(s.train.examples[s.train.len() - 1].source.load_16k().unwrap().len(), 16_000);

    // Same seed: same cuts; other seed: other cuts.
    assert_eq!(data::speech_commands(tmp.path(), &opts).unwrap(), s);
    let counts = SilenceCount::Counts { train: 20, dev: 5, test: 5 };
    let a = data::speech_commands(tmp.path(), &KwsOptions { silence_clips: counts, ..opts.clone() }).unwrap();
    let b = data::speech_commands(tmp.path(), &KwsOptions { silence_clips: counts, seed: 8, ..opts.clone() }).unwrap();
    assert_eq!((segments(&a.train).len(), segments(&a.dev).len(), segments(&a.test).len()), (20, 5, 5));
    assert_ne!(segments(&a.train), segments(&b.train));
    // A split's cuts do not depend on the other splits' counts.
    let c = data::speech_commands(tmp.path(), &KwsOptions { silence_clips: SilenceCount::Counts { train: 3, dev: 5, test: 0 }, ..opts.clone() }).unwrap();
    assert_eq!(segments(&c.dev), segments(&a.dev));
    assert_eq!(segments(&c.train)[..], segments(&a.train)[..3]);

    // Fraction of the split's other clips: 6 train clips * 0.5 = 3.
    let f = data::speech_commands(tmp.path(), &KwsOptions { silence_clips: SilenceCount::Fraction(0.5), ..opts.clone() }).unwrap();
    assert_eq!(segments(&f.train).len(), 3);
    let e = data::speech_commands(tmp.path(), &KwsOptions { silence_clips: SilenceCount::Fraction(f64::NAN), ..opts.clone() });
    assert!(e.unwrap_err().to_string().contains("silence fraction must be between 0 and 10"));

    // All silence of a data set decodes, each noise file once.
    let clips = a.dev.load_all_16k().unwrap();
    assert!(clips.iter().all(|c| !c.is_empty()));

    // Too short noise for dev cuts: an error naming the noise folder.
    wav(&tmp.path().join("_background_noise_/pink.wav"), 5.0);
    wav(&tmp.path().join("_background_noise_/white.wav"), 5.0);
    let e = data::speech_commands(tmp.path(), &opts).unwrap_err().to_string();
    assert!(e.contains("_background_noise_") && e.contains("dev region"), "{e}");
}

/// The official test set layout: a folder per label, silence included.
fn test_layout(dir: &Path) {
    for f in ["yes/aa_nohash_0.wav", "no/bb_nohash_0.wav", "_unknown_/cc_nohash_0.wav", "_silence_/noise_0.wav", "_silence_/noise_1.wav"] {
        wav(&dir.join(f), 1.0);
    }
}

#[test]
fn test_set_layout_and_detection() {
    let tmp = tempfile::tempdir().unwrap();
    test_layout(tmp.path());
    let labels = words(&["yes", "no", "_unknown_", "_silence_"]);
    let ds = data::speech_commands_test(tmp.path(), &labels).unwrap();
    assert_eq!(names(&ds), ["_silence_/noise_0.wav=_silence_", "_silence_/noise_1.wav=_silence_", "_unknown_/cc_nohash_0.wav=_unknown_", "no/bb_nohash_0.wav=no", "yes/aa_nohash_0.wav=yes"]);
    assert_eq!(ds.examples[0].speaker, None);
    assert_eq!(ds.examples[4].speaker.as_deref(), Some("aa"));

    // Detection: no list files -> test layout; train and dev are empty.
    let opts = KwsOptions { words: words(&["yes", "no"]), ..Default::default() };
    let s = data::open_kws(tmp.path(), &opts).unwrap();
    assert_eq!(s.test, ds);
    assert!(s.train.is_empty() && s.dev.is_empty());
    assert_eq!(s.train.labels, labels);

    // A folder that is not a label is an error naming it.
    let e = data::speech_commands_test(tmp.path(), &words(&["yes", "no", "_unknown_"])).unwrap_err().to_string();
    assert!(e.contains("_silence_: folder `_silence_` is not one of the labels [yes, no, _unknown_]"), "{e}");

    // With list files it is the training layout.
    let tmp2 = tempfile::tempdir().unwrap();
    kws_layout(tmp2.path());
    let s = data::open_kws(tmp2.path(), &KwsOptions { silence_clips: SilenceCount::None, ..opts.clone() }).unwrap();
    assert_eq!((s.train.len(), s.dev.len(), s.test.len()), (6, 2, 2));

    let e = data::open_kws(&tmp.path().join("nope"), &opts).unwrap_err().to_string();
    assert!(e.contains("nope: cannot open file"), "{e}");
}

#[test]
fn csv_manifest_quotes_relative_paths_and_speakers() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("corpus");
    write(
        &d.join("train.csv"),
        "file,transcript,speaker\r\na.wav,\"hello, world\",s1\n\"sub/b c.wav\",\"she said \"\"hi\"\"\",\n/abs/c.wav,\"two\nlines\",s3\n",
    );
    let ds = data::asr_manifest(&d.join("train.csv")).unwrap();
    assert!(ds.labels.is_empty());
    let got: Vec<(PathBuf, &str, Option<&str>)> =
        ds.examples.iter().map(|e| (e.source.path().to_path_buf(), e.text.as_deref().unwrap(), e.speaker.as_deref())).collect();
    assert_eq!(
        got,
        vec![
            (d.join("a.wav"), "hello, world", Some("s1")),
            (d.join("sub/b c.wav"), "she said \"hi\"", None),
            (PathBuf::from("/abs/c.wav"), "two\nlines", Some("s3")),
        ]
    );

    // Errors name the manifest and the line.
    let bad = d.join("bad.csv");
    write(&bad, "path,text\na.wav,one\nb.wav,two, three\n");
    let e = data::asr_manifest(&bad).unwrap_err().to_string();
    assert!(e.starts_with(&format!("{}: line 3: 3 field(s), but the header has 2", bad.display())), "{e}");
    write(&bad, "path,text\na.wav,\"unterminated\n");
    let e = data::asr_manifest(&bad).unwrap_err().to_string();
    assert!(e.contains("line 2: unterminated quoted field"), "{e}");
    write(&bad, "path,text\n");
    assert!(data::asr_manifest(&bad).unwrap_err().to_string().contains("no rows"));
    let e = data::asr_manifest(&d.join("absent.csv")).unwrap_err().to_string();
    assert!(e.contains("absent.csv: cannot open file"), "{e}");
}

#[test]
fn common_voice_tsv() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // Common Voice: bare file names that live in clips/, sentences with bare quotes.
    wav(&d.join("clips/cv_1.wav"), 0.2);
    write(
        &d.join("train.tsv"),
        "client_id\tpath\tsentence\tup_votes\n\
         abc\tcv_1.wav\tHe said \"yes\", then left.\t2\n\
         def\tcv_2.wav\tMissing clip.\t0\n",
    );
    let ds = data::asr_manifest(&d.join("train.tsv")).unwrap();
    assert_eq!(ds.examples[0].source, Source::File(d.join("clips/cv_1.wav")));
    assert_eq!(ds.examples[0].text.as_deref(), Some("He said \"yes\", then left."));
    assert_eq!(ds.examples[0].speaker.as_deref(), Some("abc"));
    // Not found anywhere: resolved beside the manifest (validation reports it).
    assert_eq!(ds.examples[1].source, Source::File(d.join("cv_2.wav")));

    // Sniffed from the header when the extension says nothing.
    write(&d.join("list.txt"), "audio\ttext\nx.wav\ta, b\n");
    assert_eq!(data::asr_manifest(&d.join("list.txt")).unwrap().examples[0].text.as_deref(), Some("a, b"));
}

#[test]
fn missing_column_error_lists_the_columns() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m.csv");
    write(&m, "wav,words\na.wav,hi\n");
    let e = data::asr_manifest(&m).unwrap_err().to_string();
    assert_eq!(e, format!("{}: no audio column: expected one of path, file, audio, filename; found columns: wav, words", m.display()));
    write(&m, "Path,words\na.wav,hi\n");
    let e = data::asr_manifest(&m).unwrap_err().to_string();
    assert_eq!(e, format!("{}: no transcript column: expected one of sentence, text, transcript, transcription; found columns: Path, words", m.display()));
}

#[test]
fn librispeech_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let r = tmp.path();
    write(&r.join("dev-clean/84/121123/84-121123.trans.txt"), "84-121123-0000 GO DO YOU HEAR\n84-121123-0001 BUT IN LESS THAN FIVE MINUTES\n");
    write(&r.join("dev-clean/174/50561/174-50561.trans.txt"), "174-50561-0000 FORGOTTEN TOO\n\n");
    let ds = data::librispeech(r).unwrap();
    let got: Vec<(PathBuf, &str, &str)> =
        ds.examples.iter().map(|e| (e.source.path().to_path_buf(), e.text.as_deref().unwrap(), e.speaker.as_deref().unwrap())).collect();
    assert_eq!(
        got,
        vec![
            (r.join("dev-clean/174/50561/174-50561-0000.flac"), "FORGOTTEN TOO", "174"),
            (r.join("dev-clean/84/121123/84-121123-0000.flac"), "GO DO YOU HEAR", "84"),
            (r.join("dev-clean/84/121123/84-121123-0001.flac"), "BUT IN LESS THAN FIVE MINUTES", "84"),
        ]
    );
    let empty = tempfile::tempdir().unwrap();
    assert!(data::librispeech(empty.path()).unwrap_err().to_string().contains("no *.trans.txt files"));
}

#[test]
fn classification_manifest_labels() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("cls.csv");
    write(&m, "path,label\nx.wav,dog\ny.wav,cat\nz.wav,dog\nw.wav,bird\n");
    let ds = data::classification_manifest(&m).unwrap();
    assert_eq!(ds.labels, words(&["bird", "cat", "dog"]));
    assert_eq!(ds.examples.iter().map(|e| e.label.unwrap()).collect::<Vec<_>>(), [2, 1, 2, 0]);
    assert_eq!(ds.class_counts(), [1, 1, 2]);

    let given = words(&["dog", "cat", "bird", "fish"]);
    let ds = data::classification_manifest_with_labels(&m, Some(&given)).unwrap();
    assert_eq!(ds.labels, given);
    assert_eq!(ds.examples.iter().map(|e| e.label.unwrap()).collect::<Vec<_>>(), [0, 1, 0, 2]);
    let e = data::classification_manifest_with_labels(&m, Some(&words(&["dog", "cat"]))).unwrap_err().to_string();
    assert_eq!(e, format!("{}: line 5: label `bird` is not one of the labels [dog, cat]", m.display()));
}

fn hf_vocab(texts: &[&str]) -> CharVocab {
    CharVocab::from_map(&data::build_char_vocab(texts.iter().copied()), Path::new("vocab.json")).unwrap()
}

#[test]
fn validation_reports_every_problem_kind_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    wav(&d.join("ok.wav"), 1.0);
    wav(&d.join("short.wav"), 0.2);
    wav(&d.join("long.wav"), 3.0);
    write(&d.join("garbage.wav"), "this is not audio at all, just text");
    let text = |path: &str, t: &str| Example { source: Source::File(d.join(path)), label: None, text: Some(t.into()), speaker: None };
    let ds = Dataset {
        examples: vec![
            text("ok.wav", "hello, world!"),         // 0 fine (punctuation ignored)
            text("missing.wav", "hello"),           // 1 missing
            text("garbage.wav", "hello"),           // 2 unreadable
            text("ok.wav", " ?! "),                 // 3 empty after normalization
            text("ok.wav", "héllo wörld"),          // 4 OOV: é, ö
            text("short.wav", "hello world hello"), // 5 0.2 s = 9 frames < 17 + 2 repeats
            text("long.wav", "hello"),              // 6 too long
            text("ok.wav", "hello"),                // 7 fine
        ],
        labels: vec![],
    };
    let vocab = hf_vocab(&["hello world"]);
    let opts = ValidateOptions {
        vocab: Some(vocab),
        chars_to_ignore: data::HF_CHARS_TO_IGNORE.into(),
        config: Some(Wav2Vec2Config::default()),
        max_duration_s: 2.0,
        ..Default::default()
    };
    let report = data::validate(&ds, &opts);
    let kinds: Vec<(usize, ProblemKind)> = report.problems.iter().map(|p| (p.index, p.kind)).collect();
    assert_eq!(
        kinds,
        vec![
            (1, ProblemKind::MissingAudio),
            (2, ProblemKind::UnreadableAudio),
            (3, ProblemKind::EmptyTranscript),
            (4, ProblemKind::OutOfVocabulary),
            (5, ProblemKind::TooShortForCtc),
            (6, ProblemKind::TooLong),
        ]
    );
    assert_eq!(report.checked, 8);
    assert_eq!(report.durations.len(), 8);
    assert!(report.durations[1].is_nan() && report.durations[2].is_nan());
    assert!((report.durations[0] - 1.0).abs() < 1e-9 && (report.durations[6] - 3.0).abs() < 1e-9);
    assert_eq!(report.problems[3].detail, "'é', 'ö' in \"héllo wörld\"");
    assert_eq!(report.problems[4].detail, "9 model frames (3200 samples) for 17 target tokens + 2 repeats = 19 needed");
    assert!(report.problems[0].detail.starts_with("cannot open file"), "{}", report.problems[0].detail);

    let shown = report.to_string();
    let p = |f: &str| d.join(f).display().to_string();
    for line in [
        "checked 8 clips (0.00 h of audio, clips 0.20-3.00 s): 6 with problems".to_string(),
        "missing audio file (1 clip):".into(),
        format!("  {}: cannot open file", p("missing.wav")),
        "unreadable audio (1 clip):".into(),
        "empty transcript (1 clip):".into(),
        format!("  {}: the transcript \" ?! \" is empty after normalization", p("ok.wav")),
        "characters outside the vocabulary (1 clip):".into(),
        "too short for its CTC transcript (1 clip):".into(),
        "too long (1 clip):".into(),
        format!("  {}: 3.000 s, above the maximum of 2 s", p("long.wav")),
        "  fix: split the recordings into shorter clips or raise --max-duration-s".into(),
        "  fix: remove punctuation with --chars-to-ignore (its value replaces the default list), fold letters to the vocabulary's case with --text-case lower or upper, or fine-tune from a copy of the model folder without vocab.json to build the vocabulary from the training text".into(),
        "fix the clips above, or pass --skip-bad to drop the 6 bad clips (nothing is dropped otherwise)".into(),
    ] {
        assert!(shown.contains(&line), "missing {line:?} in:\n{shown}");
    }

    let (kept, dropped) = report.drop_bad(&ds);
    assert_eq!(dropped, 6);
    assert_eq!(kept.examples, vec![ds.examples[0].clone(), ds.examples[7].clone()]);
    assert_eq!(report.kept_durations().len(), 2);
    let clean = data::validate(&kept, &opts);
    assert!(clean.is_ok());
    assert_eq!(clean.to_string(), "checked 2 clips (0.00 h of audio, clips 1.00-1.00 s): no problems");
}

#[test]
fn validation_of_many_bad_clips_shows_five_and_segments() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    wav(&d.join("noise.wav"), 2.0);
    let mut examples: Vec<Example> = (0..7)
        .map(|i| Example { source: Source::File(d.join(format!("gone{i}.wav"))), label: Some(0), text: None, speaker: None })
        .collect();
    let seg = |start| Example { source: Source::Segment { path: d.join("noise.wav"), start, len: 16_000 }, label: Some(1), text: None, speaker: None };
    examples.push(seg(0));
    examples.push(seg(20_000)); // beyond the 32 000 samples
    examples.push(Example { label: Some(5), ..seg(0) });
    let ds = Dataset { examples, labels: words(&["a", "_silence_"]) };
    let report = data::validate(&ds, &ValidateOptions { min_duration_s: 0.5, ..Default::default() });
    assert_eq!(report.count(ProblemKind::MissingAudio), 7);
    assert_eq!(report.count(ProblemKind::UnreadableAudio), 1);
    assert_eq!(report.count(ProblemKind::InvalidLabel), 1);
    assert_eq!(report.durations[7], 1.0);
    let shown = report.to_string();
    assert!(shown.contains("missing audio file (7 clips):") && shown.contains("  ... and 2 more"), "{shown}");
    assert!(shown.contains("gone4.wav") && !shown.contains("gone5.wav"), "{shown}");
    assert!(shown.contains("segment of 16000 samples at sample 20000 lies beyond the end of the file (32000 samples at 16 kHz)"), "{shown}");
    assert_eq!(report.drop_bad(&ds).1, 9);
    // The segment check of loading agrees.
    let e = ds.examples[8].source.load_16k().unwrap_err().to_string();
    assert!(e.contains(&format!("{}: segment of 16000 samples at sample 20000", d.join("noise.wav").display())), "{e}");
}

#[test]
fn char_vocab_like_hugging_face() {
    let map = data::build_char_vocab(["ab c", "b a"]);
    let expected: BTreeMap<String, i64> =
        [("|", 0), ("a", 1), ("b", 2), ("c", 3), ("[UNK]", 4), ("[PAD]", 5)].iter().map(|(k, v)| (k.to_string(), *v)).collect();
    assert_eq!(map, expected);
    // Without any space, `|` still exists (after the characters).
    let map = data::build_char_vocab(["yes", "no"]);
    assert_eq!(map["|"], 5);
    assert_eq!(map["[PAD]"], 7);
    let v = CharVocab::from_map(&map, Path::new("vocab.json")).unwrap();
    assert_eq!((v.pad_id, v.unk_id, v.word_delimiter_id), (7, Some(6), Some(5)));
}

#[test]
fn normalize_and_encode() {
    assert_eq!(data::normalize_transcript("  Hello,  World! It's “e-mail”. ", data::HF_CHARS_TO_IGNORE, Case::Keep), "Hello World It's email");
    assert_eq!(data::normalize_transcript("ÀB\tc", "", Case::Lower), "àb c");
    assert_eq!(data::normalize_transcript("ÀB\tc ß", "", Case::Upper), "ÀB C SS");
    let v = hf_vocab(&["ab c"]);
    assert_eq!(data::encode_transcript(&v, "ab c").unwrap(), vec![1, 2, 0, 3]);
    assert_eq!(data::encode_transcript(&v, "ax").unwrap(), vec![1, 4]); // x -> [UNK]
    assert_eq!(v.decode(&data::encode_transcript(&v, "cab ba").unwrap()), "cab ba");
    let no_unk: BTreeMap<String, i64> = [("[PAD]", 0), ("|", 1), ("a", 2)].iter().map(|(k, v)| (k.to_string(), *v)).collect();
    let v = CharVocab::from_map(&no_unk, Path::new("vocab.json")).unwrap();
    let e = data::encode_transcript(&v, "a xy").unwrap_err().to_string();
    assert_eq!(e, "invalid input: transcript \"a xy\" has characters that are not in the vocabulary, which has no [UNK] token: 'x', 'y'");
}

/// `--text-case auto` folds transcripts to the vocabulary's letter case (lowercase for the
/// Hugging Face recipe's vocabularies, uppercase for `wav2vec2-base-960h`'s), keeps them when
/// the vocabulary has both cases or is still to be built; the explicit settings do what they say.
#[test]
fn transcripts_take_the_vocabularys_letter_case() {
    let lower = data::build_char_vocab(["hello world"]);
    let upper = data::build_char_vocab(["HELLO WORLD"]);
    let mixed = data::build_char_vocab(["Hello world"]);
    let digits = data::build_char_vocab(["123 4"]);
    // Special tokens ([PAD], [UNK], |) have letters but are not characters.
    assert_eq!(data::vocab_case(&lower), Some(Case::Lower));
    assert_eq!(data::vocab_case(&upper), Some(Case::Upper));
    assert_eq!(data::vocab_case(&mixed), None);
    assert_eq!(data::vocab_case(&digits), None);
    let resolve = |c: &str, v: Option<&BTreeMap<String, i64>>| c.parse::<TextCase>().unwrap().resolve(v);
    assert_eq!(resolve("auto", Some(&upper)), Case::Upper);
    assert_eq!(resolve("auto", Some(&lower)), Case::Lower);
    assert_eq!(resolve("auto", Some(&mixed)), Case::Keep);
    assert_eq!(resolve("auto", None), Case::Keep);
    assert_eq!(resolve("keep", Some(&upper)), Case::Keep);
    assert_eq!(resolve("lower", Some(&upper)), Case::Lower);
    assert_eq!(resolve("upper", None), Case::Upper);
    assert_eq!(TextCase::default(), TextCase::Auto);
    let e = "Upper".parse::<TextCase>().unwrap_err().to_string();
    assert!(e.contains("text case `Upper`: expected auto, keep, lower or upper"), "{e}");

    // Validation with an uppercase vocabulary: lowercase transcripts are out of vocabulary as
    // written, in vocabulary once folded.
    let tmp = tempfile::tempdir().unwrap();
    wav(&tmp.path().join("a.wav"), 1.0);
    let ds = Dataset {
        examples: vec![Example { source: Source::File(tmp.path().join("a.wav")), label: None, text: Some("Hello, world".into()), speaker: None }],
        labels: vec![],
    };
    let opts = |case: Case| ValidateOptions {
        vocab: Some(CharVocab::from_map(&upper, Path::new("vocab.json")).unwrap()),
        chars_to_ignore: data::HF_CHARS_TO_IGNORE.into(),
        case,
        ..Default::default()
    };
    let kept = data::validate(&ds, &opts(Case::Keep));
    assert_eq!(kept.problems.iter().map(|p| p.kind).collect::<Vec<_>>(), vec![ProblemKind::OutOfVocabulary]);
    assert_eq!(kept.problems[0].detail, "'d', 'e', 'l', 'o', 'r', 'w' in \"Hello world\"");
    assert!(data::validate(&ds, &opts(TextCase::Auto.resolve(Some(&upper)))).is_ok());
}
