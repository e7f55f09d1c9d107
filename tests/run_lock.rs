//! A run holds an exclusive lock on its run directory: a second `cllm train` on the same
//! directory fails at once naming the directory and the holder's PID, and a killed holder never
//! leaves a stale lock behind.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::*;
// Named explicitly: a glob import cannot shadow the `cllm` crate name.
use common::cllm;

#[test]
fn a_second_run_on_the_same_directory_fails_at_once_and_a_killed_holder_leaves_no_stale_lock() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("R");
    let mut first = Command::new(env!("CARGO_BIN_EXE_cllm"))
        .args(["train", "--config", "tiny", "--steps", "100000000", "--save-every", "0", "--eval-every", "0"])
        .args(["--quiet", "--out", s(&out)])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = first.id().to_string();
    let lock = out.join(".lock");
    let start = Instant::now();
    while std::fs::read_to_string(&lock).map(|t| t.trim() != pid).unwrap_or(true) {
        assert!(start.elapsed() < Duration::from_secs(60), "the first run never took its lock");
        std::thread::sleep(Duration::from_millis(5));
    }

    let t = Instant::now();
    let second = cllm(&["train", "--config", "tiny", "--steps", "2", "--quiet", "--out", s(&out), "--seed", "2"]);
    let err = assert_fails(&second, 1);
    assert!(t.elapsed() < Duration::from_secs(30), "the second run waited instead of failing");
    assert!(err.contains(s(&out)) && err.contains("in use"), "error does not name the directory: {err}");
    assert!(err.contains(&format!("pid {pid}")), "error does not name the holder's pid {pid}: {err}");
    assert!(first.try_wait().unwrap().is_none(), "the first run stopped");

    first.kill().unwrap();
    first.wait().unwrap();
    // The kernel released the lock with the process: a new run on the directory proceeds.
    let third = cllm(&["train", "--config", "tiny", "--steps", "2", "--quiet", "--out", s(&out)]);
    assert_ok(&third);
    assert_eq!(step_dirs(&out), ["step-000002"]);
}
