//! Checkpoint files on disk: layout, checksums, damage detection, atomicity under kill.

use std::path::Path;
use std::process::{Command, Output};

mod common;
use common::*;
// Named explicitly: a glob import cannot shadow the `cllm` crate name.
use common::cllm;

fn state_json(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("state.json")).unwrap()).unwrap()
}

fn resume(from: &Path, out: &Path, steps: &str) -> Output {
    cllm(&["train", "--resume", s(from), "--out", s(out), "--steps", steps, "--quiet"])
}

#[test]
fn checkpoint_holds_weights_optimizer_state_and_a_described_state_json() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    train_tiny(&out, &["--steps", "3"]);
    let ckpt = out.join("step-000003");
    let st = state_json(&ckpt);
    assert_eq!(st["step"], 3);
    assert_eq!(st["adam_t"], 3);
    assert!(st["sampler"]["words"].is_array());
    assert_eq!(st["model_config"]["context"], 16);
    for key in [
        "strategy",
        "threads",
        "spheres",
        "clip_norm",
        "clip_mode",
        "lr",
        "lr_schedule",
        "steps",
        "batch",
        "context",
        "seed",
        "val_fraction",
    ] {
        assert!(st["options"].get(key).is_some(), "options.{key} missing: {st}");
    }
    assert_eq!(st["data"]["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(st["cllm_version"], env!("CARGO_PKG_VERSION"));
    assert!(st["git_commit"].is_string());
    assert!(st["command_line"].as_array().unwrap().iter().any(|a| a == "--steps"));
    for f in ["model.safetensors", "state.safetensors"] {
        let bytes = std::fs::read(ckpt.join(f)).unwrap();
        assert_eq!(st["files"][f].as_str().unwrap(), cllm::data::sha256_hex(&bytes), "{f} checksum");
    }
}

#[test]
fn model_file_alone_loads_with_the_model_loader() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    train_tiny(&out, &["--steps", "2"]);
    let copy = dir.path().join("alone.safetensors");
    std::fs::copy(out.join("step-000002/model.safetensors"), &copy).unwrap();
    let model = cllm::model::load_safetensors(&copy).unwrap();
    assert_eq!(model.config, cllm::ModelConfig::tiny());
}

#[test]
fn library_load_returns_the_saved_step_and_moments() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    train_tiny(&out, &["--steps", "2"]);
    let c = cllm::checkpoint::load(&out).unwrap();
    assert_eq!(c.state.step, 2);
    assert_eq!(c.adam_m.len(), c.model.params.len());
    assert!(c.adam_v.iter().any(|&x| x > 0.0));
}

#[test]
fn truncated_weights_fail_the_resume_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    train_tiny(&out, &["--steps", "2", "--save-every", "1"]);
    let file = out.join("step-000002/model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 100]).unwrap();
    let err = assert_fails(&resume(&out, &out, "4"), 1);
    assert!(err.contains("step-000002/model.safetensors"), "{err}");
    assert_eq!(step_dirs(&out), ["step-000001", "step-000002"], "no checkpoint may be lost");
}

#[test]
fn bit_flipped_optimizer_state_fails_the_resume_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    train_tiny(&out, &["--steps", "2"]);
    let file = out.join("step-000002/state.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&file, &bytes).unwrap();
    let err = assert_fails(&resume(&out, &out, "4"), 1);
    assert!(err.contains("state.safetensors") && err.contains("checksum"), "{err}");
}

#[test]
fn edited_state_json_fails_the_resume_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    train_tiny(&out, &["--steps", "2"]);
    let file = out.join("step-000002/state.json");
    let body = std::fs::read_to_string(&file).unwrap().replace("\"adam_t\": 2", "\"adam_t\": 7");
    std::fs::write(&file, body).unwrap();
    let err = assert_fails(&resume(&out, &out, "4"), 1);
    assert!(err.contains("state.json"), "{err}");
}

#[test]
fn truncated_state_json_fails_the_resume_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    train_tiny(&out, &["--steps", "2"]);
    let file = out.join("step-000002/state.json");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let err = assert_fails(&resume(&out, &out, "4"), 1);
    assert!(err.contains("state.json"), "{err}");
}

#[test]
fn missing_weights_file_fails_the_resume_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    train_tiny(&out, &["--steps", "2"]);
    std::fs::remove_file(out.join("step-000002/model.safetensors")).unwrap();
    let err = assert_fails(&resume(&out, &out, "4"), 1);
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn temporary_directories_are_never_taken_for_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    train_tiny(&out, &["--steps", "2"]);
    // What a run killed while writing step 9 leaves behind.
    let tmp = out.join(".tmp-step-000009-4194304");
    std::fs::create_dir(&tmp).unwrap();
    std::fs::write(tmp.join("model.safetensors"), b"partial").unwrap();
    let c = cllm::checkpoint::load(&out).unwrap();
    assert_eq!(c.state.step, 2);
    assert_eq!(step_dirs(&out), ["step-000002"]);
}

#[test]
fn resume_from_an_empty_directory_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = assert_fails(&resume(dir.path(), &dir.path().join("o"), "4"), 1);
    assert!(err.contains("no checkpoint"), "{err}");
}

#[test]
fn killed_run_leaves_every_checkpoint_loadable() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut child = Command::new(env!("CARGO_BIN_EXE_cllm"))
        .args(["train", "--config", "tiny", "--steps", "100000", "--save-every", "1", "--keep", "4", "--quiet"])
        .args(["--eval-every", "0", "--out", s(&out)])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while (!out.exists() || step_dirs(&out).len() < 3) && start.elapsed().as_secs() < 60 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // Let it get well into its save/prune cycle, then kill it at an arbitrary moment.
    std::thread::sleep(std::time::Duration::from_millis(137));
    child.kill().unwrap();
    child.wait().unwrap();
    let dirs = step_dirs(&out);
    assert!(dirs.len() >= 3, "{dirs:?}");
    for d in &dirs {
        let c = cllm::checkpoint::load(&out.join(d)).unwrap_or_else(|e| panic!("{d}: {e}"));
        assert_eq!(cllm::checkpoint::step_dir_name(c.state.step), *d);
    }
}
