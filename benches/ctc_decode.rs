//! CTC beam search with and without the word 3-gram, beside pyctcdecode (+ KenLM) decoding the
//! same logits in the same run.
//!
//!     cargo bench --bench ctc_decode            # KLSPEECH_PYTHON=... to name the interpreter
//!
//! Input: the bundled CTC model's logits for 40 test clips (tests/fixtures/lm/ctc_logits.safetensors,
//! 4 416 frames x 28 tokens in all) and `audio_fixtures/asr/lm/train-unseen-3gram.arpa`. Each
//! side decodes all 40 with pyctcdecode's defaults (beam width 100, token_min_logp -5,
//! beam_prune_logp -10; alpha 0.5, beta 1.5 with the LM), best of 5 passes, one thread (both
//! decoders are single-threaded); the LM is loaded once, outside the timing. pyctcdecode takes
//! f64 copies of the logits, as in tools/gen_lm_decode_fixture.py; the bench also counts the
//! clips whose best text is the same on both sides. Python is `KLSPEECH_PYTHON`, else the first
//! of `.venv/bin/python`, `python3` that imports pyctcdecode and kenlm (`none`: klspeech only).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use klspeech::decode::{log_softmax_rows, BeamSearch, LmFusion};
use klspeech::lm::NgramLm;
use klspeech::vocab::CharVocab;

const LOGITS: &str = "tests/fixtures/lm/ctc_logits.safetensors";
const LM: &str = "audio_fixtures/asr/lm/train-unseen-3gram.arpa";

const PY: &str = r#"
import json, sys, time, logging
import numpy as np
from safetensors.numpy import load_file
from pyctcdecode import build_ctcdecoder
logging.disable(logging.WARNING)
lg = load_file(sys.argv[1])
vocab = json.load(open("models/klspeech-small/vocab.json"))
labels = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
clips = sorted(lg)
out = {}
for name, lm, bw in [("lm", sys.argv[2], 100), ("no-lm", None, 100)]:
    dec = build_ctcdecoder(labels, kenlm_model_path=lm)
    xs = [lg[c].astype(np.float64) for c in clips]
    best, texts = float("inf"), None
    for _ in range(5):
        t = time.perf_counter()
        texts = [dec.decode_beams(x, beam_width=bw)[0][0] for x in xs]
        best = min(best, time.perf_counter() - t)
    out[name] = {"seconds": best, "texts": texts}
print(json.dumps(out))
"#;

fn python() -> Option<String> {
    if let Ok(p) = std::env::var("KLSPEECH_PYTHON") {
        return (p != "none").then_some(p);
    }
    [".venv/bin/python", "python3"]
        .iter()
        .find(|p| Command::new(p).args(["-c", "import pyctcdecode, kenlm"]).output().map(|o| o.status.success()).unwrap_or(false))
        .map(|s| s.to_string())
}

fn main() {
    let logits = candle_core::safetensors::load(LOGITS, &candle_core::Device::Cpu).expect("the fixture logits");
    let map: BTreeMap<String, i64> = serde_json::from_str(&std::fs::read_to_string("models/klspeech-small/vocab.json").unwrap()).unwrap();
    let vocab = CharVocab::from_map(&map, Path::new("vocab.json")).unwrap();
    let v = vocab.len();
    // BTreeMap order = Python's sorted(clips).
    let clips: BTreeMap<String, Vec<f64>> = logits
        .iter()
        .map(|(k, t)| (k.clone(), log_softmax_rows(&t.flatten_all().unwrap().to_vec1::<f32>().unwrap(), v)))
        .collect();
    let frames: usize = clips.values().map(|x| x.len() / v).sum();
    let lm = Arc::new(NgramLm::from_arpa(Path::new(LM)).expect("the bundled LM"));
    let settings = [
        ("3-gram LM, 100 beams", BeamSearch { lm: Some(LmFusion::new(lm)), ..BeamSearch::default() }, "lm"),
        ("no LM, 100 beams", BeamSearch::default(), "no-lm"),
    ];
    let py = python();
    let reference: Option<serde_json::Value> = py.as_ref().and_then(|p| {
        let o = Command::new(p).args(["-c", PY, LOGITS, LM]).output().ok()?;
        if !o.status.success() {
            eprintln!("pyctcdecode failed: {}", String::from_utf8_lossy(&o.stderr));
            return None;
        }
        serde_json::from_slice(&o.stdout).ok()
    });
    println!("{} clips, {frames} frames x {v} tokens; pyctcdecode: {}", clips.len(), py.as_deref().unwrap_or("not found (set KLSPEECH_PYTHON)"));
    println!("| decoding | klspeech s | pyctcdecode s | pyctcdecode / klspeech | same best text |");
    println!("|---|---|---|---|---|");
    for (name, search, key) in &settings {
        let mut best = f64::INFINITY;
        let mut texts = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            texts = clips.values().map(|x| search.decode(&vocab, x, v).unwrap()).collect::<Vec<String>>();
            best = best.min(t.elapsed().as_secs_f64());
        }
        match reference.as_ref().map(|r| &r[key]) {
            Some(r) => {
                let theirs = r["seconds"].as_f64().unwrap();
                let same = r["texts"].as_array().unwrap().iter().zip(&texts).filter(|(a, b)| a.as_str() == Some(b.as_str())).count();
                println!("| {name} | {best:.4} | {theirs:.4} | {:.1}x | {same} / {} |", theirs / best, texts.len());
            }
            None => println!("| {name} | {best:.4} | - | - | - |"),
        }
    }
}
