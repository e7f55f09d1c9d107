//! `cllm train --distributed mpi` under `mpirun` (compiled only with the `mpi` feature; needs
//! Open MPI's `mpirun` on the PATH): the weights after 20 steps are bit-identical to the single
//! process's at 1 to 4 ranks x 1 or 2 threads, a resumed run continues at any rank count, a
//! diverged rank is named, and a killed rank ends the run instead of hanging it.
//!
//! `CLLM_MPI_RANKS` (comma-separated, default `1,2,3,4`) picks the rank counts; `.ci/run` runs
//! this file once per count of 2, 3 and 4.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::*;

/// The rank counts to test.
fn rank_counts() -> Vec<usize> {
    let v = std::env::var("CLLM_MPI_RANKS").unwrap_or_else(|_| "1,2,3,4".into());
    v.split(',').map(|r| r.trim().parse().expect("CLLM_MPI_RANKS: comma-separated rank counts")).collect()
}

/// `mpirun -np R` (as root, oversubscribed on this machine's cores) running `cllm ARGS`.
fn mpirun(ranks: usize, args: &[&str]) -> Command {
    let mut cmd = Command::new("mpirun");
    cmd.args(["--allow-run-as-root", "--oversubscribe", "-np", &ranks.to_string(), env!("CARGO_BIN_EXE_cllm")]);
    cmd.args(args).stdin(Stdio::null());
    cmd
}

/// The flags of the runs compared here, `--out out` and `extra` added.
fn train_args<'a>(config: &'a str, steps: &'a str, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["train", "--config", config, "--steps", steps, "--seed", "7", "--val-fraction", "0", "--quiet"];
    args.extend_from_slice(&["--out", s(out)]);
    args.extend_from_slice(extra);
    args
}

/// SHA-256 of the model and optimizer state of `out`'s checkpoint of `step`.
fn hashes(out: &Path, step: u32) -> (String, String) {
    let dir = out.join(format!("step-{step:06}"));
    let hash = |f: &str| {
        let p = dir.join(f);
        cllm::data::sha256_hex(&std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
    };
    (hash("model.safetensors"), hash("state.safetensors"))
}

fn assert_run_ok(out: &Output) {
    assert!(
        out.status.success(),
        "mpirun failed ({:?}): {}{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    );
}

fn same_bits_at_every_rank_count(config: &str) {
    let dir = tempfile::tempdir().unwrap();
    let single = dir.path().join("single");
    assert_ok(&cllm(&train_args(config, "20", &single, &["--threads", "2"])));
    let want = hashes(&single, 20);
    for ranks in rank_counts() {
        for threads in ["1", "2"] {
            let out = dir.path().join(format!("r{ranks}-t{threads}"));
            let extra = ["--threads", threads, "--distributed", "mpi", "--check-every", "5"];
            assert_run_ok(&mpirun(ranks, &train_args(config, "20", &out, &extra)).output().unwrap());
            assert_eq!(hashes(&out, 20), want, "{config}: {ranks} ranks x {threads} threads differ from one process");
            let steps = step_dirs(&out);
            assert_eq!(steps.last().map(String::as_str), Some("step-000020"), "rank 0 wrote {steps:?}");
        }
    }
}

#[test]
fn tiny_is_bit_identical_at_every_rank_count() {
    same_bits_at_every_rank_count("tiny");
}

#[test]
fn small_is_bit_identical_at_every_rank_count() {
    same_bits_at_every_rank_count("small");
}

/// 10 steps of a run of total `--steps 10`, then resumed to 20 (the schedule follows the new
/// total, so this is compared with the same two parts in one process).
fn ten_then_twenty(out: &Path, first: &dyn Fn(&[&str]) -> Output, then: &dyn Fn(&[&str]) -> Output) {
    assert_run_ok(&first(&train_args("tiny", "10", out, &[])));
    let resume = out.join("step-000010");
    assert_run_ok(&then(&["train", "--resume", s(&resume), "--steps", "20", "--quiet"]));
}

#[test]
fn a_run_resumes_at_another_rank_count() {
    let dir = tempfile::tempdir().unwrap();
    let single = dir.path().join("single");
    let alone = |a: &[&str]| cllm(&[a, &["--threads", "1"]].concat());
    ten_then_twenty(&single, &alone, &alone);
    let want = hashes(&single, 20);
    let ranks = rank_counts();
    let (first, then) = (ranks[0], ranks.last().copied().unwrap_or(1) + 1);
    let out = dir.path().join("resumed");
    let on = |r: usize, t: &'static str| {
        move |a: &[&str]| mpirun(r, &[a, &["--distributed", "mpi", "--threads", t]].concat()).output().unwrap()
    };
    ten_then_twenty(&out, &on(first, "1"), &on(then, "2"));
    assert_eq!(hashes(&out, 20), want, "10 steps on {first} ranks, then 10 on {then} ranks x 2 threads");
}

#[test]
fn a_diverged_rank_is_named_and_every_rank_stops() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let bin = env!("CARGO_BIN_EXE_cllm");
    let common =
        ["train", "--config", "tiny", "--steps", "5", "--val-fraction", "0", "--quiet", "--distributed", "mpi"];
    // MPMD: rank 0 and rank 1 get different seeds, so different initial weights.
    let o = Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe", "-np", "1", bin])
        .args(common)
        .args(["--seed", "1", "--out", s(&out), ":", "-np", "1", bin])
        .args(common)
        .args(["--seed", "2", "--out", s(&out)])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!o.status.success(), "diverged ranks must fail");
    let err = text(&o.stderr);
    assert!(err.contains("after step 0: the weights of rank 1 differ from rank 0's"), "stderr: {err}");
    assert!(!err.contains("panicked"), "stderr: {err}");
}

/// The pids of `parent`'s children (from /proc).
fn children(parent: u32) -> Vec<u32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        // pid (comm) state ppid ...: the fields after the last ')'.
        let ppid = stat.rsplit(')').next().and_then(|r| r.split_whitespace().nth(1)).and_then(|p| p.parse().ok());
        if ppid == Some(parent) {
            pids.push(pid);
        }
    }
    pids
}

/// The rank Open MPI gave process `pid` (its OMPI_COMM_WORLD_RANK).
fn rank_of(pid: u32) -> Option<usize> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let var = env.split(|&b| b == 0).find_map(|v| v.strip_prefix(b"OMPI_COMM_WORLD_RANK="))?;
    std::str::from_utf8(var).ok()?.parse().ok()
}

/// Starts a long 2-rank tiny run with metrics into `dir`, waits until rank 0 has reported a step,
/// sends `signal` to rank 1 and returns mpirun's exit status (failing after 60 s).
fn signal_rank_1(dir: &Path, signal: i32) -> std::process::ExitStatus {
    let (out, metrics) = (dir.join("run"), dir.join("metrics.jsonl"));
    let mut args = train_args("tiny", "1000000", &out, &["--distributed", "mpi", "--threads", "1"]);
    args.extend_from_slice(&["--metrics", s(&metrics), "--save-every", "0", "--warmup-steps", "1"]);
    let mut child = mpirun(2, &args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let t0 = Instant::now();
    while std::fs::metadata(&metrics).map_or(true, |m| m.len() == 0) {
        assert!(t0.elapsed() < Duration::from_secs(60), "the run did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let victim = children(child.id()).into_iter().find(|&p| rank_of(p) == Some(1)).expect("rank 1's process");
    // SAFETY: kill(2) on a pid this test started (mpirun's child).
    assert_eq!(unsafe { libc::kill(victim as i32, signal) }, 0);
    let t1 = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if t1.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("mpirun still runs 60 s after rank 1 got signal {signal}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_killed_rank_ends_the_others_instead_of_hanging_them() {
    let dir = tempfile::tempdir().unwrap();
    let status = signal_rank_1(dir.path(), libc::SIGKILL);
    assert!(!status.success(), "mpirun must report the failure");
}

#[test]
fn a_stop_signal_on_one_rank_stops_every_rank_after_the_same_step() {
    let dir = tempfile::tempdir().unwrap();
    let status = signal_rank_1(dir.path(), libc::SIGTERM);
    assert!(!status.success(), "an interrupted run exits non-zero");
    // Rank 0 wrote the final checkpoint of the step every rank stopped after; it resumes.
    let run = dir.path().join("run");
    let last = step_dirs(&run).pop().expect("rank 0 saved the step the ranks stopped after");
    let step: u32 = last.trim_start_matches("step-").parse().unwrap();
    let total = (step + 2).to_string();
    let resume = run.join(&last);
    let args = ["train", "--resume", s(&resume), "--steps", &total, "--quiet", "--distributed", "mpi"];
    assert_run_ok(&mpirun(2, &args).output().unwrap());
}

#[test]
fn bench_reports_every_rank_s_exchange() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bench");
    let args = ["bench", "--distributed", "mpi", "--config", "tiny", "--threads", "1", "--steps", "2", "--warmup", "1"];
    let o = mpirun(2, &[&args[..], &["--quiet", "--out", s(&out)]].concat()).output().unwrap();
    assert_run_ok(&o);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("distributed.json")).unwrap()).unwrap();
    assert_eq!(report["ranks"], 2);
    let ranks = report["cells"][0]["ranks"].as_array().expect("per-rank figures");
    assert_eq!(ranks.len(), 2);
    for r in ranks {
        for key in ["median_step_ms", "compute_ms", "exchange_ms", "exchange_bytes"] {
            assert!(r[key].as_f64().is_some_and(|x| x > 0.0), "{key} of {r}");
        }
    }
}
