//! Helpers shared by the tests that drive the real `cllm` binary.
#![allow(dead_code)] // each test crate uses its own subset

use std::path::Path;
use std::process::{Command, Output};

pub fn cllm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cllm")).args(args).output().expect("the cllm binary runs")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

pub fn assert_no_panic(out: &Output) {
    let err = text(&out.stderr);
    assert!(!err.contains("panicked") && !err.contains("internal error"), "panic in stderr: {err}");
    assert_ne!(out.status.code(), Some(101), "exit code of a panic; stderr: {err}");
}

pub fn assert_ok(out: &Output) {
    assert_no_panic(out);
    assert!(out.status.success(), "cllm failed ({:?}): {}", out.status.code(), text(&out.stderr));
}

/// A failure is exactly one `error: …` line on stderr with the given exit code.
pub fn assert_fails(out: &Output, code: i32) -> String {
    assert_no_panic(out);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr, got: {err}");
    assert!(lines[0].starts_with("error: "), "stderr: {err}");
    err
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// Trains the tiny model quietly into `out`.
pub fn train_tiny(out: &Path, extra: &[&str]) {
    let mut args = vec!["train", "--config", "tiny", "--out", s(out), "--quiet"];
    args.extend_from_slice(extra);
    assert_ok(&cllm(&args));
}

pub fn step_dirs(out: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(out)
        .expect("out dir exists")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect();
    v.sort();
    v
}
