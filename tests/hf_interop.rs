//! Hugging Face in and out: a `GPT2LMHeadModel.save_pretrained` export (fixture made by
//! `scripts/make_hf_fixture.py` with transformers, with transformers' own loss and greedy
//! continuation) loads and computes what transformers computes; what cllm does not implement is
//! an error naming it; every cllm checkpoint carries a `config.json` that is a GPT2Config.

mod common;

use common::{assert_fails, assert_ok, cllm, s, tensor_bytes, tensor_parts, text, train_tiny};
use std::path::{Path, PathBuf};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/tiny-gpt2")
}

fn expected() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(fixture().join("expected.json")).unwrap()).unwrap()
}

fn eval_loss(checkpoint: &Path) -> f64 {
    let out = cllm(&["eval", "--checkpoint", s(checkpoint), "--data", s(&fixture().join("sample.txt")), "--json"]);
    assert_ok(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["windows"], expected()["windows"]);
    v["loss"].as_f64().unwrap()
}

/// A copy of the fixture directory with `config.json` edited.
fn fixture_with_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let copy = dir.join("export");
    std::fs::create_dir_all(&copy).unwrap();
    std::fs::copy(fixture().join("model.safetensors"), copy.join("model.safetensors")).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture().join("config.json")).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(copy.join("config.json"), serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    copy
}

#[test]
fn huggingface_export_loads_with_its_config_json_and_matches_transformers_loss() {
    let loss = eval_loss(&fixture());
    let want = expected()["loss"].as_f64().unwrap();
    assert!(((loss - want) / want).abs() < 1e-5, "cllm {loss} vs transformers {want}");
}

#[test]
fn huggingface_export_greedy_continuation_equals_transformers_byte_for_byte() {
    let e = expected();
    let out = cllm(&[
        "generate",
        "--checkpoint",
        s(&fixture()),
        "--prompt",
        e["prompt"].as_str().unwrap(),
        "--tokens",
        "40",
        "--temperature",
        "0",
        "--no-prompt",
    ]);
    assert_ok(&out);
    let want: Vec<u8> = e["greedy"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8).collect();
    assert_eq!(out.stdout.strip_suffix(b"\n").unwrap_or(&out.stdout), want.as_slice());
}

#[test]
fn export_given_cllm_metadata_loads_without_config_json_and_gives_the_same_loss() {
    let dir = tempfile::tempdir().unwrap();
    let model = cllm::model::load_safetensors(&fixture().join("model.safetensors")).unwrap();
    let file = dir.path().join("model.safetensors");
    cllm::model::save_safetensors(&file, &model).unwrap();
    assert!(!dir.path().join("config.json").exists());
    assert_eq!(eval_loss(&file).to_bits(), eval_loss(&fixture()).to_bits());
}

#[test]
fn export_without_metadata_or_config_json_is_an_error_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.safetensors");
    std::fs::copy(fixture().join("model.safetensors"), &file).unwrap();
    let out = cllm(&["eval", "--checkpoint", s(&file), "--data", s(&fixture().join("sample.txt"))]);
    let err = assert_fails(&out, 1);
    assert!(err.contains("cllm.config") && err.contains("config.json"), "{err}");
}

#[test]
fn settings_cllm_does_not_compute_are_errors_naming_the_setting() {
    for (key, value) in [
        ("activation_function", serde_json::json!("gelu")),
        ("tie_word_embeddings", serde_json::json!(false)),
        ("layer_norm_epsilon", serde_json::json!(1e-6)),
        ("n_inner", serde_json::json!(64)),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let copy = fixture_with_config(dir.path(), |c| c[key] = value.clone());
        let out = cllm(&["eval", "--checkpoint", s(&copy), "--data", s(&fixture().join("sample.txt"))]);
        let err = assert_fails(&out, 1);
        assert!(err.contains(key) && err.contains("config.json"), "{key}: {err}");
    }
}

#[test]
fn output_head_that_differs_from_the_embedding_is_an_error_and_a_copy_of_it_loads() {
    let bytes = std::fs::read(fixture().join("model.safetensors")).unwrap();
    let (list, meta) = tensor_parts(&bytes);
    let wte = list.iter().find(|t| t.0 == "transformer.wte.weight").unwrap().clone();
    for (untied, name) in [(false, "tied"), (true, "untied")] {
        let dir = tempfile::tempdir().unwrap();
        let copy = fixture_with_config(dir.path(), |_| {});
        let mut head = (String::from("lm_head.weight"), wte.1, wte.2.clone(), wte.3.clone());
        if untied {
            head.3[5] ^= 0x40;
        }
        let mut with_head = list.clone();
        with_head.push(head);
        std::fs::write(copy.join("model.safetensors"), tensor_bytes(&with_head, &meta)).unwrap();
        let out = cllm(&["eval", "--checkpoint", s(&copy), "--data", s(&fixture().join("sample.txt"))]);
        if untied {
            let err = assert_fails(&out, 1);
            assert!(err.contains("lm_head.weight") && err.contains("untied"), "{err}");
        } else {
            assert_ok(&out);
            assert!(text(&out.stdout).contains("loss"), "{name}");
        }
    }
}

#[test]
fn config_json_that_disagrees_with_the_metadata_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    train_tiny(&run, &["--steps", "1"]);
    let step = run.join("step-000001");
    let path = step.join("config.json");
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    config["n_layer"] = 3.into();
    std::fs::write(&path, serde_json::to_vec(&config).unwrap()).unwrap();
    let out = cllm(&["eval", "--checkpoint", s(&step), "--data", s(&fixture().join("sample.txt"))]);
    let err = assert_fails(&out, 1);
    assert!(err.contains("config.json") && err.contains("cllm.config"), "{err}");
}

#[test]
fn every_checkpoint_holds_a_gpt2_config_json_with_the_run_shape() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    train_tiny(&run, &["--steps", "1"]);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("step-000001/config.json")).unwrap()).unwrap();
    for (key, want) in [
        ("model_type", serde_json::json!("gpt2")),
        ("vocab_size", 256.into()),
        ("n_positions", 16.into()),
        ("n_embd", 32.into()),
        ("n_layer", 2.into()),
        ("n_head", 2.into()),
        ("activation_function", "gelu_new".into()),
        ("tie_word_embeddings", true.into()),
        ("resid_pdrop", 0.0.into()),
        ("embd_pdrop", 0.0.into()),
        ("attn_pdrop", 0.0.into()),
    ] {
        assert_eq!(config[key], want, "{key}");
    }
    assert_eq!(config["layer_norm_epsilon"].as_f64().map(|e| e as f32), Some(1e-5));
}
