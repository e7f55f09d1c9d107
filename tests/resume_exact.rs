//! Resuming: an interrupted run continued with --resume ends bit-identical to an uninterrupted one,
//! and resuming against anything else is refused.

use std::path::Path;
use std::process::{Command, Output};

mod common;
use common::*;
// Named explicitly: a glob import cannot shadow the `cllm` crate name.
use common::cllm;

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Model and optimizer bytes of a checkpoint (state.json differs legitimately: time, command line).
fn weights_and_moments(ckpt: &Path) -> (Vec<u8>, Vec<u8>) {
    (read(&ckpt.join("model.safetensors")), read(&ckpt.join("state.safetensors")))
}

fn resume(from: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["train", "--resume", s(from), "--out", s(out), "--quiet"];
    args.extend_from_slice(extra);
    cllm(&args)
}

#[test]
fn three_steps_plus_resume_to_six_equals_six_straight() {
    let dir = tempfile::tempdir().unwrap();
    let straight = dir.path().join("straight");
    train_tiny(&straight, &["--steps", "6", "--save-every", "3", "--keep", "0"]);
    let resumed = dir.path().join("resumed");
    assert_ok(&resume(&straight.join("step-000003"), &resumed, &[]));
    assert_eq!(step_dirs(&resumed), ["step-000006"]);
    let a = weights_and_moments(&straight.join("step-000006"));
    let b = weights_and_moments(&resumed.join("step-000006"));
    assert!(a.0 == b.0, "model.safetensors differs");
    assert!(a.1 == b.1, "state.safetensors differs");
}

#[test]
fn killed_and_resumed_run_equals_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let steps = "400";
    let straight = dir.path().join("straight");
    train_tiny(&straight, &["--steps", steps, "--save-every", "0", "--eval-every", "0"]);

    let out = dir.path().join("killed");
    let mut child = Command::new(env!("CARGO_BIN_EXE_cllm"))
        .args(["train", "--config", "tiny", "--steps", steps, "--save-every", "1", "--keep", "2", "--quiet"])
        .args(["--eval-every", "0", "--out", s(&out)])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while (!out.exists() || step_dirs(&out).is_empty()) && start.elapsed().as_secs() < 60 {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    std::thread::sleep(std::time::Duration::from_millis(30));
    child.kill().unwrap();
    child.wait().unwrap();
    let newest = step_dirs(&out).pop().expect("a checkpoint before the kill");
    if newest == "step-000400" {
        // The machine finished the run before the kill: nothing left to resume, and nothing to test.
        eprintln!("run finished before it could be killed; resume not exercised");
        return;
    }
    assert_ok(&resume(&out, &out, &["--save-every", "0"]));
    let a = weights_and_moments(&straight.join("step-000400"));
    let b = weights_and_moments(&out.join("step-000400"));
    assert!(a.0 == b.0, "model.safetensors differs after resuming from {newest}");
    assert!(a.1 == b.1, "state.safetensors differs after resuming from {newest}");
}

#[test]
fn resuming_at_another_thread_count_is_still_exact() {
    let dir = tempfile::tempdir().unwrap();
    let straight = dir.path().join("straight");
    train_tiny(&straight, &["--steps", "4", "--save-every", "2", "--keep", "0", "--threads", "2"]);
    let resumed = dir.path().join("resumed");
    assert_ok(&resume(&straight.join("step-000002"), &resumed, &["--threads", "1"]));
    assert!(weights_and_moments(&straight.join("step-000004")) == weights_and_moments(&resumed.join("step-000004")));
}

#[test]
fn resume_from_a_run_directory_continues_from_its_newest_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    train_tiny(&out, &["--steps", "3", "--save-every", "1", "--keep", "0"]);
    assert_ok(&resume(&out, &out, &["--steps", "5"]));
    let st: serde_json::Value = serde_json::from_slice(&read(&out.join("step-000005/state.json"))).unwrap();
    assert_eq!(st["adam_t"], 5);
    assert_eq!(step_dirs(&out), ["step-000001", "step-000002", "step-000003", "step-000004", "step-000005"]);
}

#[test]
fn resume_appends_to_the_metrics_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let metrics = dir.path().join("m.jsonl");
    train_tiny(&out, &["--steps", "4", "--save-every", "2", "--keep", "0", "--metrics", s(&metrics)]);
    // Pretend the run died after step 2: its metrics file holds steps 1-2.
    let body = std::fs::read_to_string(&metrics).unwrap();
    let first_two: String = body.lines().take(2).map(|l| format!("{l}\n")).collect();
    std::fs::write(&metrics, first_two).unwrap();
    let resumed = dir.path().join("resumed");
    assert_ok(&resume(&out.join("step-000002"), &resumed, &["--metrics", s(&metrics)]));
    let steps: Vec<u64> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [1, 2, 3, 4]);
}

#[test]
fn resume_with_another_config_is_an_error_naming_the_state_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    train_tiny(&out, &["--steps", "2"]);
    let err = assert_fails(&resume(&out, &out, &["--steps", "4", "--config", "small"]), 2);
    assert!(err.contains("--config") && err.contains("state.json"), "{err}");
}

#[test]
fn resume_with_another_batch_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    train_tiny(&out, &["--steps", "2"]);
    assert!(assert_fails(&resume(&out, &out, &["--steps", "4", "--batch", "8"]), 2).contains("--batch"));
}

#[test]
fn resume_with_other_data_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    train_tiny(&out, &["--steps", "2"]);
    let other = dir.path().join("other.txt");
    std::fs::write(&other, "other words entirely ".repeat(100)).unwrap();
    let err = assert_fails(&resume(&out, &out, &["--steps", "4", "--data", s(&other)]), 1);
    assert!(err.contains("differs"), "{err}");
}

#[test]
fn resume_with_the_data_file_changed_on_disk_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d.txt");
    std::fs::write(&data, "some training words ".repeat(100)).unwrap();
    let out = dir.path().join("run");
    train_tiny(&out, &["--steps", "2", "--data", s(&data)]);
    std::fs::write(&data, "some training words!".repeat(100)).unwrap();
    assert_fails(&resume(&out, &out, &["--steps", "4"]), 1);
}

#[test]
fn resume_of_a_finished_run_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    train_tiny(&out, &["--steps", "2"]);
    let err = assert_fails(&resume(&out, &out, &[]), 2);
    assert!(err.contains("nothing to do"), "{err}");
}

#[test]
fn resume_from_another_working_directory_finds_a_relative_data_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("d.txt"), "relative data, relative paths ".repeat(50)).unwrap();
    let out = dir.path().join("run");
    let o = Command::new(env!("CARGO_BIN_EXE_cllm"))
        .current_dir(dir.path())
        .args(["train", "--config", "tiny", "--steps", "2", "--data", "d.txt", "--out", "run", "--quiet"])
        .output()
        .unwrap();
    assert_ok(&o);
    let elsewhere = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_cllm"))
        .current_dir(elsewhere.path())
        .args(["train", "--resume", s(&out), "--steps", "3", "--quiet"])
        .output()
        .unwrap();
    assert_ok(&o);
    assert!(out.join("step-000003").is_dir());
}

#[test]
fn resume_into_a_directory_with_newer_checkpoints_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    train_tiny(&out, &["--steps", "4", "--save-every", "2", "--keep", "0"]);
    let err = assert_fails(&resume(&out.join("step-000002"), &out, &[]), 2);
    assert!(err.contains("step-000004"), "{err}");
    assert_eq!(step_dirs(&out), ["step-000002", "step-000004"]);
}
