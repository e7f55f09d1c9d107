//! Crash safety of `cllm train`: SIGKILL at many moments (inside checkpoint writes too) leaves
//! every checkpoint loadable and a resume from the newest ends bit-exactly where an
//! uninterrupted run does; SIGINT, SIGTERM and SIGHUP finish the step, write a final
//! checkpoint, print one line naming it and the command that resumes it, and exit 130, 143,
//! 129; a second signal exits at once.
//!
//! Runs the tiny model (about 1 ms a step) with the test-only delay knobs of
//! `cllm::checkpoint` (`CLLM_TEST_CHECKPOINT_DELAY_MS` inside each checkpoint write,
//! `CLLM_TEST_STEP_DELAY_MS` after each step), which widen the windows without changing what is
//! computed. About 20 s on 2 cores in release.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use cllm::checkpoint::{self, CHECKPOINT_DELAY_VAR, STEP_DELAY_VAR};
use common::{assert_ok, cllm, s, step_dirs, text};

/// Steps of every run here; the reference run trains them uninterrupted.
const STEPS: u64 = 60;
const STEPS_ARG: &str = "60";
/// Flags shared by every run (the resumes take them from the checkpoint).
const FLAGS: [&str; 6] = ["--config", "tiny", "--threads", "2", "--eval-every", "0"];

fn spawn(out: &Path, extra: &[&str], env: &[(&str, &str)]) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cllm"));
    cmd.args(["train", "--out", s(out), "--quiet", "--steps", STEPS_ARG]).args(FLAGS).args(extra);
    cmd.envs(env.iter().copied()).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.spawn().expect("cllm starts")
}

/// Waits for `child`, failing the test if it runs past 60 s.
fn wait(mut child: Child) -> Output {
    let start = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("cllm train still running after 60 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.wait_with_output().expect("output")
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on the pid of a child this test spawned and has not yet reaped.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, sig) }, 0);
}

/// The weights and moments of a checkpoint: what a bit-exact resume must reproduce.
fn trained_bytes(step_dir: &Path) -> (Vec<u8>, Vec<u8>) {
    let read = |f: &str| std::fs::read(step_dir.join(f)).expect("checkpoint file");
    (read(checkpoint::MODEL_FILE), read(checkpoint::OPTIM_FILE))
}

fn final_dir(out: &Path) -> PathBuf {
    out.join(checkpoint::step_dir_name(STEPS))
}

/// The uninterrupted run's final weights and moments.
fn reference(root: &Path) -> (Vec<u8>, Vec<u8>) {
    let out = root.join("reference");
    assert_ok(&cllm(&[&["train", "--out", s(&out), "--quiet", "--steps", STEPS_ARG][..], &FLAGS].concat()));
    trained_bytes(&final_dir(&out))
}

/// Every `step-*` left in `out` loads; returns the newest step, if any.
fn all_load(out: &Path) -> Option<u64> {
    let mut newest = None;
    for (step, dir) in checkpoint::list(out).expect("list") {
        if let Err(e) = checkpoint::load(&dir) {
            panic!("{} does not load after a kill: {e}", dir.display());
        }
        newest = Some(step);
    }
    newest
}

/// Resumes `out` to the end and checks the result against the reference.
fn resume_matches(out: &Path, want: &(Vec<u8>, Vec<u8>), what: &str) {
    let resumed = cllm(&["train", "--resume", s(out), "--quiet", "--threads", "2"]);
    assert_ok(&resumed);
    assert!(trained_bytes(&final_dir(out)) == *want, "{what}: the resumed run's weights differ from the reference");
}

#[test]
fn sigkill_at_any_moment_leaves_loadable_checkpoints_and_an_exact_resume() {
    let root = tempfile::tempdir().unwrap();
    let want = reference(root.path());
    let (mut inside_writes, mut fresh) = (0, 0);
    // Each write sleeps 4 ms between the model and the moments, so most moments of these
    // runs are inside a checkpoint write; the kill times sweep the whole run.
    for (k, ms) in [0u64, 5, 15, 30, 45, 60, 80, 100, 130, 160, 200, 250, 300, 350].into_iter().enumerate() {
        let out = root.path().join(format!("kill-{k}"));
        let child = spawn(&out, &["--save-every", "1", "--keep", "3"], &[(CHECKPOINT_DELAY_VAR, "4")]);
        std::thread::sleep(Duration::from_millis(ms));
        signal(&child, libc::SIGKILL);
        let done = wait(child);
        if done.status.success() {
            continue; // finished before the kill: nothing to check that the reference does not
        }
        let left: Vec<String> = std::fs::read_dir(&out)
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        inside_writes += usize::from(left.iter().any(|n| n.starts_with(".tmp-step-")));
        match all_load(&out) {
            Some(_) => resume_matches(&out, &want, &format!("kill after {ms} ms")),
            None => fresh += 1, // killed before the first checkpoint
        }
    }
    assert!(inside_writes >= 3, "only {inside_writes} kills landed inside a checkpoint write");
    assert!(fresh < 14, "no kill left a checkpoint");
}

/// Starts a run slowed to about 3 ms a step, waits for its checkpoint of step 10 and then
/// `after_ms`, and sends `sig`.
fn interrupted(out: &Path, sig: i32, extra: &[&str], after_ms: u64) -> Output {
    let mut flags = vec!["--save-every", "10"];
    flags.extend_from_slice(extra);
    let child = spawn(out, &flags, &[(STEP_DELAY_VAR, "3")]);
    let start = Instant::now();
    while !out.join(checkpoint::step_dir_name(10)).exists() {
        assert!(start.elapsed() < Duration::from_secs(30), "no checkpoint of step 10 after 30 s");
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::sleep(Duration::from_millis(after_ms));
    signal(&child, sig);
    wait(child)
}

#[test]
fn sigint_sigterm_and_sighup_save_a_final_checkpoint_that_resumes_exactly() {
    let root = tempfile::tempdir().unwrap();
    let want = reference(root.path());
    for (sig, name, code) in
        [(libc::SIGINT, "SIGINT", 130), (libc::SIGTERM, "SIGTERM", 143), (libc::SIGHUP, "SIGHUP", 129)]
    {
        let out = root.path().join(name);
        let done = interrupted(&out, sig, &[], 0);
        let err = text(&done.stderr);
        assert_eq!(done.status.code(), Some(code), "{name}: {err}");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{name}: one line expected: {err}");
        let newest = all_load(&out).expect("a checkpoint");
        assert!((10..STEPS).contains(&newest), "{name}: stopped at step {newest}");
        let dir = out.join(checkpoint::step_dir_name(newest));
        let line = lines[0];
        assert!(line.starts_with(&format!("interrupted by {name} at step {newest} of {STEPS}: checkpoint ")), "{line}");
        assert!(line.contains(s(&dir)) && line.contains(&format!("train --resume {}", s(&dir))), "{line}");
        assert!(!err.contains("error"), "{err}");
        resume_matches(&out, &want, name);
    }
}

#[test]
fn no_save_on_interrupt_keeps_only_the_periodic_checkpoints() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("run");
    // 15 ms after the checkpoint of step 10: some steps later, before the one of step 20.
    let done = interrupted(&out, libc::SIGINT, &["--no-save-on-interrupt"], 15);
    let err = text(&done.stderr);
    assert_eq!(done.status.code(), Some(130), "{err}");
    for d in step_dirs(&out) {
        assert!(d.ends_with('0'), "{d} is not a periodic checkpoint of --save-every 10");
    }
    let newest = checkpoint::list(&out).unwrap().pop().unwrap().1;
    assert!(err.contains(&format!("--resume {}", s(&newest))), "{err}");
    assert!(err.contains("not saved (--no-save-on-interrupt)"), "{err}");
}

#[test]
fn a_second_signal_exits_at_once_leaving_the_last_checkpoint_intact() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("run");
    // Each checkpoint write takes over 2 s: the save of step 2 is still running when both
    // signals arrive, and waiting for it would take far longer than exiting at once.
    let child = spawn(&out, &["--save-every", "1"], &[(CHECKPOINT_DELAY_VAR, "2000")]);
    let start = Instant::now();
    // `list` treats a directory the run has not created yet as empty.
    while checkpoint::list(&out).unwrap().is_empty() {
        assert!(start.elapsed() < Duration::from_secs(30), "no checkpoint after 30 s");
        std::thread::sleep(Duration::from_millis(2));
    }
    signal(&child, libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(50));
    let t0 = Instant::now();
    signal(&child, libc::SIGTERM);
    let done = wait(child);
    assert!(t0.elapsed() < Duration::from_millis(1500), "the second signal took {:?}", t0.elapsed());
    assert_eq!(done.status.code(), Some(143), "{}", text(&done.stderr));
    let newest = all_load(&out).expect("the checkpoint written before the signals");
    assert!(newest < STEPS);
}
