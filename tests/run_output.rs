//! Output problems found early (issue 15, item 5) and the small leaks (item 9): a run directory
//! that cannot be written fails before the first step; a failing `--metrics` warns once and
//! training goes on; a failing checkpoint write (a file-size limit: SIGXFSZ is caught) keeps
//! the previous checkpoint, leaves no temporary directory and exits non-zero; a resume keeps
//! every step once in `--metrics`; `prep` removes what a killed `prep` left; a resume through
//! a symbolic link writes into the real run.

mod common;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{assert_fails, assert_ok, cllm, s, step_dirs, text, train_tiny};

/// `cllm ARGS` with the file-size limit `RLIMIT_FSIZE` set to `bytes` in the child.
fn with_file_limit(bytes: u64, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cllm"));
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // SAFETY: the closure runs in the forked child before exec and calls only setrlimit, which
    // is async-signal-safe; it touches no memory shared with the parent.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit { rlim_cur: bytes, rlim_max: libc::RLIM_INFINITY };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.output().expect("cllm runs")
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn an_unwritable_run_directory_fails_before_the_first_step() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    // Files of at most 8 bytes: the lock's PID fits, the probe does not. Without the probe
    // this run would train all its steps (printing progress lines) before failing to save:
    // one error line and nothing else shows it stopped before step 1.
    let args = ["train", "--config", "tiny", "--steps", "3000", "--save-every", "0", "--out", s(&out)];
    let err = assert_fails(&with_file_limit(8, &args), 1);
    assert!(err.contains(s(&out)) && err.contains("not writable"), "{err}");
    assert!(step_dirs(&out).is_empty());
    assert!(!names(&out).iter().any(|n| n.starts_with(".probe-")), "{:?}", names(&out));
}

#[test]
fn a_failing_checkpoint_write_keeps_the_previous_one_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    train_tiny(&out, &["--steps", "4", "--save-every", "2", "--keep", "0", "--eval-every", "0"]);
    std::fs::remove_dir_all(out.join("step-000004")).unwrap();
    // 100 KiB: the probe and state.json fit, the 139 KB model file does not (SIGXFSZ would kill
    // the process with no message; caught, the write fails with EFBIG).
    let done = with_file_limit(100 << 10, &["train", "--resume", s(&out), "--quiet"]);
    let err = assert_fails(&done, 1);
    assert!(err.contains("step-000004") || err.contains(".tmp-step-000004"), "{err}");
    assert_eq!(step_dirs(&out), ["step-000002"]);
    cllm::checkpoint::load(&out.join("step-000002")).expect("the previous checkpoint still loads");
    assert!(!names(&out).iter().any(|n| n.starts_with(".tmp-")), "{:?}", names(&out));
}

#[test]
fn a_failing_metrics_file_warns_once_and_training_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let done =
        cllm(&["train", "--config", "tiny", "--steps", "20", "--out", s(&out), "--quiet", "--metrics", "/dev/full"]);
    assert_ok(&done);
    let err = text(&done.stderr);
    assert_eq!(err.matches("warning:").count(), 1, "{err}");
    assert!(err.contains("/dev/full") && err.contains("training goes on"), "{err}");
    assert_eq!(step_dirs(&out), ["step-000020"]);
}

fn metric_steps(path: &Path) -> Vec<u64> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect()
}

#[test]
fn resuming_keeps_every_step_once_in_the_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let (out, metrics) = (dir.path().join("run"), dir.path().join("m.jsonl"));
    let m = s(&metrics);
    train_tiny(&out, &["--steps", "30", "--save-every", "10", "--keep", "0", "--eval-every", "0", "--metrics", m]);
    // As if killed after logging steps 21..=30 (the last one torn) with step 20 the newest
    // checkpoint.
    std::fs::remove_dir_all(out.join("step-000030")).unwrap();
    let mut torn = std::fs::read(&metrics).unwrap();
    torn.extend_from_slice(b"{\"step\":31,\"lo");
    std::fs::write(&metrics, torn).unwrap();
    assert_ok(&cllm(&["train", "--resume", s(&out), "--quiet", "--metrics", m]));
    assert_eq!(metric_steps(&metrics), (1..=30).collect::<Vec<_>>());
}

#[test]
fn prep_removes_the_temporary_file_a_killed_prep_left() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.txt");
    // No process has this pid (above any pid_max); a live process's file stays.
    let stale = dir.path().join("out.txt.999999999.tmp");
    let live = dir.path().join(format!("out.txt.{}.tmp", std::process::id()));
    let other = dir.path().join("other.txt.999999999.tmp");
    for f in [&stale, &live, &other] {
        std::fs::write(f, b"partial").unwrap();
    }
    let input = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/squad/v11_pretty.json");
    assert_ok(&cllm(&["prep", "squad", input, s(&out)]));
    assert!(out.is_file());
    assert!(!stale.exists(), "the stale temporary file is still there");
    assert!(live.exists() && other.exists(), "a live writer's or another output's file was removed");
}

#[test]
fn resuming_through_a_symlinked_step_directory_writes_into_the_real_run() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    train_tiny(&out, &["--steps", "4", "--eval-every", "0"]);
    let links = dir.path().join("links");
    std::fs::create_dir(&links).unwrap();
    let link = links.join("latest");
    std::os::unix::fs::symlink(out.join("step-000004"), &link).unwrap();
    assert_ok(&cllm(&["train", "--resume", s(&link), "--steps", "6", "--quiet"]));
    assert_eq!(step_dirs(&out), ["step-000004", "step-000006"]);
    assert_eq!(names(&links), ["latest"], "a checkpoint was written next to the link");
}
