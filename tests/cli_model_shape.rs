//! `cllm train` with a shape of the user's own (`--n-layer --n-head --n-embd --n-positions
//! --vocab-size`, `--model-config`), the GPT-2 presets, and `--init-from` existing weights.

mod common;

use common::{assert_fails, assert_ok, cllm, s, train_tiny};
use std::path::Path;

fn hf_fixture() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/tiny-gpt2")
}

fn dry_run_model(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["train", "--dry-run", "--json"];
    all.extend_from_slice(args);
    let out = cllm(&all);
    assert_ok(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v
}

#[test]
fn shape_flags_override_the_preset_and_reach_the_checkpoint_config() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let flags = ["--n-layer", "1", "--n-head", "4", "--n-embd", "64", "--n-positions", "32", "--vocab-size", "300"];
    let mut args = vec!["--steps", "2"];
    args.extend_from_slice(&flags);
    train_tiny(&run, &args);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("step-000002/config.json")).unwrap()).unwrap();
    for (key, want) in [("n_layer", 1), ("n_head", 4), ("n_embd", 64), ("n_positions", 32), ("vocab_size", 300)] {
        assert_eq!(config[key], want, "{key}");
    }
    // A byte-level model with more ids than bytes generates bytes (drawn among the 256).
    let out = cllm(&["generate", "--checkpoint", s(&run), "--prompt", "RO", "--tokens", "20", "--no-prompt"]);
    assert_ok(&out);
    assert_eq!(out.stdout.len(), 20);
    // The shape is the checkpoint's: resuming needs no flags, and contradicting it is an error.
    assert_ok(&cllm(&["train", "--resume", s(&run), "--steps", "3", "--quiet"]));
    let err = assert_fails(&cllm(&["train", "--resume", s(&run), "--steps", "4", "--n-layer", "2"]), 2);
    assert!(err.contains("contradicts the checkpoint"), "{err}");
}

#[test]
fn gpt2_presets_have_the_gpt2_shapes() {
    // Planned, not trained (a dry run of these would need more memory than CI has).
    let gpt2 = cllm::ModelConfig::preset("gpt2").unwrap();
    assert_eq!((gpt2.layers, gpt2.heads, gpt2.embed, gpt2.context, gpt2.vocab), (12, 12, 768, 1024, 50257));
    assert_eq!(gpt2.num_params(), 124_439_808, "GPT-2 small's parameter count (tied head)");
    let medium = cllm::ModelConfig::preset("gpt2-medium").unwrap();
    assert_eq!((medium.layers, medium.heads, medium.embed), (24, 16, 1024));
    assert_eq!(medium.num_params(), 354_823_168, "GPT-2 medium's parameter count (tied head)");
    // The CLI knows them: an impossible --context for gpt2 is refused naming its context.
    let err = assert_fails(&cllm(&["train", "--dry-run", "--config", "gpt2", "--context", "2048"]), 2);
    assert!(err.contains("1024"), "{err}");
}

#[test]
fn model_config_file_takes_cllm_keys_or_a_gpt2_config() {
    let dir = tempfile::tempdir().unwrap();
    let cllm_keys = dir.path().join("shape.json");
    std::fs::write(&cllm_keys, r#"{"vocab": 256, "layers": 3, "heads": 2, "embed": 48, "context": 24}"#).unwrap();
    let v = dry_run_model(&["--model-config", s(&cllm_keys)]);
    assert_eq!(v["model"]["layers"], 3);
    assert_eq!(v["config"], "custom");
    let v = dry_run_model(&["--model-config", s(&hf_fixture().join("config.json"))]);
    assert_eq!(v["model"]["embed"], 32);
    assert_eq!(v["context"], 16);
    let typo = dir.path().join("typo.json");
    std::fs::write(&typo, r#"{"vocab": 256, "layer": 3, "heads": 2, "embed": 48, "context": 24}"#).unwrap();
    let err = assert_fails(&cllm(&["train", "--dry-run", "--model-config", s(&typo)]), 1);
    assert!(err.contains("unknown key \"layer\""), "{err}");
}

#[test]
fn impossible_shapes_are_usage_errors_naming_the_problem() {
    for (args, named) in [
        (vec!["--vocab-size", "100"], "--vocab-size"),
        (vec!["--n-head", "3"], "heads"),
        (vec!["--n-layer", "0"], "zero"),
        (vec!["--n-layer", "1000"], "layers"),
        (vec!["--n-positions", "64", "--context", "128"], "--context 128"),
        (vec!["--config", "tiny", "--model-config", "x.json"], "--model-config"),
    ] {
        let mut all = vec!["train", "--dry-run"];
        all.extend_from_slice(&args);
        let err = assert_fails(&cllm(&all), 2);
        assert!(err.contains(named), "{args:?}: {err}");
    }
}

#[test]
fn init_from_starts_at_step_zero_from_the_given_weights_with_a_fresh_optimizer() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("fine");
    let data = hf_fixture().join("sample.txt");
    let init = hf_fixture();
    let args = ["--init-from", s(&init), "--data", s(&data), "--val-fraction", "0.2", "--steps", "1", "--lr", "1e-4"];
    let mut all = vec!["train", "--out", s(&run), "--quiet"];
    all.extend_from_slice(&args);
    assert_ok(&cllm(&all));
    let start = cllm::model::load_safetensors(&init.join("model.safetensors")).unwrap();
    let after = cllm::model::load_safetensors(&run.join("step-000001/model.safetensors")).unwrap();
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("step-000001/state.json")).unwrap()).unwrap();
    assert_eq!(state["step"], 1);
    assert_eq!(state["adam_t"], 1);
    // One AdamW step moves each weight by about lr: the run started from these weights.
    let moved = start.params.iter().zip(&after.params).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(moved > 0.0 && moved < 3e-4, "largest change {moved}");
}

#[test]
fn init_from_conflicts_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    train_tiny(&run, &["--steps", "1"]);
    let init = hf_fixture();
    for (extra, named) in [
        (vec!["--resume", s(&run)], "--resume"),
        (vec!["--n-layer", "3"], "--n-layer 3"),
        (vec!["--config", "small"], "--config small"),
    ] {
        let mut all = vec!["train", "--dry-run", "--init-from", s(&init)];
        all.extend_from_slice(&extra);
        let err = assert_fails(&cllm(&all), 2);
        assert!(err.contains(named), "{extra:?}: {err}");
    }
}
