//! Loading errors name the file, the key and the fix; a config klspeech cannot run exactly is
//! refused instead of silently computing something else.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use klspeech::model::{LoadOptions, SpeechModel};
use klspeech::Error;

fn fixture(v: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/w2v2").join(v)
}

/// A copy of a fixture model folder whose tensors and config can be edited.
fn copy_model(v: &str) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors", "preprocessor_config.json"] {
        std::fs::copy(fixture(v).join(f), d.path().join(f)).unwrap();
    }
    d
}

fn edit_tensors(dir: &Path, f: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let p = dir.join("model.safetensors");
    let mut t = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
    f(&mut t);
    candle_core::safetensors::save(&t, &p).unwrap();
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn load_err(dir: &Path) -> Error {
    match SpeechModel::load(dir, &LoadOptions::default()) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e,
    }
}

#[test]
fn a_missing_tensor_names_its_key() {
    let d = copy_model("base-group-oldwn");
    edit_tensors(d.path(), |t| {
        t.remove("encoder.layers.1.attention.k_proj.weight");
    });
    let e = load_err(d.path());
    assert!(matches!(&e, Error::MissingTensor { key, .. } if key == "encoder.layers.1.attention.k_proj.weight"), "{e:?}");
    let msg = e.to_string();
    assert!(msg.starts_with(&d.path().join("model.safetensors").display().to_string()), "{msg}");
    assert!(msg.contains("missing tensor `encoder.layers.1.attention.k_proj.weight`"), "{msg}");
}

#[test]
fn a_wrong_shape_names_key_expected_and_found() {
    let d = copy_model("cls-weighted");
    edit_tensors(d.path(), |t| {
        let k = "wav2vec2.encoder.layers.0.feed_forward.intermediate_dense.weight";
        let w = t[k].narrow(0, 0, 30).unwrap();
        t.insert(k.into(), w);
    });
    let e = load_err(d.path());
    assert_eq!(
        e.to_string(),
        format!(
            "{}: tensor `encoder.layers.0.feed_forward.intermediate_dense.weight` has shape [30, 32], expected [37, 32]",
            d.path().join("model.safetensors").display()
        )
    );
}

#[test]
fn both_weight_norm_namings_and_missing_weight_norm() {
    // The old naming is covered by the parity fixture; removing the new naming's g fails with a hint.
    let d = copy_model("cls-weighted");
    edit_tensors(d.path(), |t| {
        t.remove("wav2vec2.encoder.pos_conv_embed.conv.parametrizations.weight.original0");
    });
    let msg = load_err(d.path()).to_string();
    assert!(msg.contains("missing tensor `encoder.pos_conv_embed.conv.weight_g` (also looked for parametrizations.weight.original0/1)"), "{msg}");
}

#[test]
fn unsupported_configs_are_refused_with_the_reason() {
    let d = copy_model("base-group-oldwn");
    edit_config(d.path(), |v| v["add_adapter"] = true.into());
    let msg = load_err(d.path()).to_string();
    assert!(msg.contains("config.json") && msg.contains("add_adapter = true"), "{msg}");

    let d = copy_model("base-group-oldwn");
    edit_config(d.path(), |v| v["hidden_act"] = "mish".into());
    let msg = load_err(d.path()).to_string();
    assert!(msg.contains("hidden_act = \"mish\" is not supported"), "{msg}");

    let d = copy_model("base-group-oldwn");
    edit_config(d.path(), |v| v["feat_extract_norm"] = "batch".into());
    assert!(load_err(d.path()).to_string().contains("feat_extract_norm = \"batch\""));

    let d = copy_model("base-group-oldwn");
    edit_config(d.path(), |v| v["model_type"] = "hubert".into());
    assert!(load_err(d.path()).to_string().contains("model_type is \"hubert\""));
}

#[test]
fn unknown_tensors_are_refused_and_missing_files_named() {
    let d = copy_model("base-group-oldwn");
    edit_tensors(d.path(), |t| {
        t.insert("adapter.layers.0.conv.weight".into(), Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap());
    });
    let msg = load_err(d.path()).to_string();
    assert!(msg.contains("adapter.layers.0.conv.weight"), "{msg}");

    let d = copy_model("base-group-oldwn");
    std::fs::remove_file(d.path().join("model.safetensors")).unwrap();
    let msg = load_err(d.path()).to_string();
    assert!(msg.contains("model.safetensors") && msg.contains("save_pretrained"), "{msg}");

    let d = copy_model("base-group-oldwn");
    std::fs::write(d.path().join("config.json"), "{ not json").unwrap();
    let msg = load_err(d.path()).to_string();
    assert!(msg.contains("config.json: invalid Wav2Vec2 config"), "{msg}");
}

#[test]
fn unknown_config_keys_survive_in_extra() {
    let d = copy_model("cls-weighted");
    edit_config(d.path(), |v| v["my_project_note"] = "keep me".into());
    let m = SpeechModel::load(d.path(), &LoadOptions::default()).unwrap();
    assert_eq!(m.config.extra["my_project_note"], "keep me");
    assert_eq!(m.config.labels(), vec!["yes", "no", "up", "down"]);
}
