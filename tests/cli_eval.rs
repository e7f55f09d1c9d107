//! `cllm eval` through the real binary.

use std::path::Path;

mod common;
use common::*;
// Named explicitly: a glob import cannot shadow the `cllm` crate name.
use common::cllm;

/// A tiny model trained for a few steps, shared shape for the tests below.
fn trained(dir: &Path) -> std::path::PathBuf {
    let out = dir.join("run");
    train_tiny(&out, &["--steps", "3"]);
    out.join("step-000003")
}

fn eval_json(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["eval", "--json"];
    all.extend_from_slice(args);
    let o = cllm(&all);
    assert_ok(&o);
    assert_eq!(text(&o.stdout).lines().count(), 1);
    serde_json::from_slice(&o.stdout).expect("one JSON object")
}

fn write_text(dir: &Path, name: &str, len: usize) -> std::path::PathBuf {
    let p = dir.join(name);
    let body: Vec<u8> = b"To be, or not to be, that is the question.\n".iter().copied().cycle().take(len).collect();
    std::fs::write(&p, body).unwrap();
    p
}

#[test]
fn json_reports_loss_bits_per_byte_windows_and_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = trained(dir.path());
    let data = write_text(dir.path(), "d.txt", 1000);
    let v = eval_json(&["--checkpoint", s(&ckpt), "--data", s(&data), "--max-windows", "5"]);
    assert_eq!(v["windows"], 5);
    assert_eq!(v["tokens"], 5 * 16);
    let loss = v["loss"].as_f64().unwrap();
    assert!(loss > 0.0 && loss.is_finite());
    assert!((v["bits_per_byte"].as_f64().unwrap() - loss / std::f64::consts::LN_2).abs() < 1e-12);
}

#[test]
fn all_windows_that_fit_are_used_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = trained(dir.path());
    // 16·10 + 1 bytes hold exactly ten windows of 16 with their shifted targets; one byte less, nine.
    let ten = write_text(dir.path(), "ten.txt", 161);
    let nine = write_text(dir.path(), "nine.txt", 160);
    assert_eq!(eval_json(&["--checkpoint", s(&ckpt), "--data", s(&ten)])["windows"], 10);
    assert_eq!(eval_json(&["--checkpoint", s(&ckpt), "--data", s(&nine)])["windows"], 9);
}

#[test]
fn checkpoint_directory_run_directory_and_model_file_give_the_same_loss() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = trained(dir.path());
    let data = write_text(dir.path(), "d.txt", 500);
    let a = eval_json(&["--checkpoint", s(&ckpt), "--data", s(&data)]);
    let b = eval_json(&["--checkpoint", s(&ckpt.join("model.safetensors")), "--data", s(&data)]);
    let c = eval_json(&["--checkpoint", s(&dir.path().join("run")), "--data", s(&data)]);
    assert_eq!(a, b);
    assert_eq!(a, c);
}

#[test]
fn result_is_identical_at_one_and_two_threads() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = trained(dir.path());
    let data = write_text(dir.path(), "d.txt", 3000);
    let a = eval_json(&["--checkpoint", s(&ckpt), "--data", s(&data), "--threads", "1"]);
    let b = eval_json(&["--checkpoint", s(&ckpt), "--data", s(&data), "--threads", "2"]);
    assert_eq!(a, b);
}

#[test]
fn matches_the_validation_loss_recorded_by_training() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_text(dir.path(), "d.txt", 2000);
    let out = dir.path().join("run");
    train_tiny(&out, &["--steps", "3", "--data", s(&data), "--val-fraction", "0.5", "--eval-windows", "8"]);
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("step-000003/state.json")).unwrap()).unwrap();
    let bytes = std::fs::read(&data).unwrap();
    let tail = dir.path().join("val.txt");
    std::fs::write(&tail, &bytes[1000..]).unwrap();
    let v = eval_json(&["--checkpoint", s(&out), "--data", s(&tail), "--max-windows", "8"]);
    let recorded = state["val_loss"].as_f64().unwrap();
    assert!((v["loss"].as_f64().unwrap() - recorded).abs() < 1e-5, "eval {} vs training {recorded}", v["loss"]);
}

#[test]
fn human_output_names_loss_bits_windows_and_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = trained(dir.path());
    let data = write_text(dir.path(), "d.txt", 200);
    let o = cllm(&["eval", "--checkpoint", s(&ckpt), "--data", s(&data)]);
    assert_ok(&o);
    let out = text(&o.stdout);
    for w in ["loss", "bits/byte", "windows", "tokens"] {
        assert!(out.contains(w), "missing {w:?}: {out}");
    }
}

#[test]
fn file_shorter_than_one_window_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = trained(dir.path());
    let data = write_text(dir.path(), "short.txt", 16);
    let err = assert_fails(&cllm(&["eval", "--checkpoint", s(&ckpt), "--data", s(&data)]), 1);
    assert!(err.contains("short.txt") && err.contains("window"), "{err}");
}

#[test]
fn missing_checkpoint_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_text(dir.path(), "d.txt", 200);
    let missing = dir.path().join("nothing-here");
    let err = assert_fails(&cllm(&["eval", "--checkpoint", s(&missing), "--data", s(&data)]), 1);
    assert!(err.contains("nothing-here"), "{err}");
}

#[test]
fn empty_directory_as_checkpoint_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_text(dir.path(), "d.txt", 200);
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert_fails(&cllm(&["eval", "--checkpoint", s(&empty), "--data", s(&data)]), 1);
}

#[test]
fn text_file_as_checkpoint_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_text(dir.path(), "d.txt", 200);
    assert_fails(&cllm(&["eval", "--checkpoint", s(&data), "--data", s(&data)]), 1);
}

#[test]
fn missing_data_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = trained(dir.path());
    assert_fails(&cllm(&["eval", "--checkpoint", s(&ckpt), "--data", s(&dir.path().join("none.txt"))]), 1);
}

#[test]
fn empty_data_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = trained(dir.path());
    let data = write_text(dir.path(), "empty.txt", 0);
    assert_fails(&cllm(&["eval", "--checkpoint", s(&ckpt), "--data", s(&data)]), 1);
}

#[test]
fn zero_max_windows_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = trained(dir.path());
    let data = write_text(dir.path(), "d.txt", 200);
    assert_fails(&cllm(&["eval", "--checkpoint", s(&ckpt), "--data", s(&data), "--max-windows", "0"]), 2);
}

#[test]
fn missing_required_flags_are_named_in_one_line() {
    let err = assert_fails(&cllm(&["eval"]), 2);
    assert!(err.contains("--checkpoint") && err.contains("--data"), "{err}");
}
