//! `cllm train` as a user meets it: validation figures that say what they cover, the `best/`
//! checkpoint, `--sample-every`, the hint that ends a run, and small input checks.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;
use common::*;
// Named explicitly: a glob import cannot shadow the `cllm` crate name.
use common::cllm;

/// `n` bytes of varied text.
fn write_text(dir: &Path, name: &str, n: usize) -> PathBuf {
    let words = ["the ", "quick ", "brown ", "fox ", "jumps\n", "over ", "a ", "lazy ", "dog. "];
    let mut text = String::new();
    let mut i = 0usize;
    while text.len() < n {
        text.push_str(words[(i * 7 + i / 3) % words.len()]);
        i += 1;
    }
    text.truncate(n);
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn json_lines(path: &Path) -> Vec<serde_json::Value> {
    let body = std::fs::read_to_string(path).unwrap();
    body.lines().map(|l| serde_json::from_str(l).expect("JSON line")).collect()
}

fn train(args: &[&str]) -> Output {
    let mut all = vec!["train", "--config", "tiny"];
    all.extend_from_slice(args);
    let o = cllm(&all);
    assert_ok(&o);
    o
}

#[test]
fn the_final_validation_covers_the_whole_split_and_every_figure_names_its_windows() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_text(dir.path(), "d.txt", 4000);
    let out = dir.path().join("run");
    let common =
        ["--data", s(&data), "--val-fraction", "0.5", "--steps", "6", "--eval-every", "3", "--eval-windows", "4"];
    let metrics = dir.path().join("m.jsonl");
    let mut args = vec!["--out", s(&out), "--json", "--metrics", s(&metrics)];
    args.extend_from_slice(&common);
    let v: serde_json::Value = serde_json::from_slice(&train(&args).stdout).unwrap();
    // 2000 validation bytes hold (2000 - 1) / 16 = 124 windows of the tiny context 16.
    assert_eq!(v["val_windows"], 124, "{v}");
    assert_eq!(v["val_tokens"], 124 * 16, "{v}");
    let tail = dir.path().join("val.txt");
    std::fs::write(&tail, &std::fs::read(&data).unwrap()[2000..]).unwrap();
    let e = cllm(&["eval", "--checkpoint", s(&out), "--data", s(&tail), "--json"]);
    assert_ok(&e);
    let e: serde_json::Value = serde_json::from_slice(&e.stdout).unwrap();
    assert_eq!(e["windows"], 124);
    assert!((e["loss"].as_f64().unwrap() - v["val_loss"].as_f64().unwrap()).abs() < 1e-5, "eval {e} vs train {v}");
    let lines = json_lines(&metrics);
    assert_eq!((lines[2]["val_windows"].clone(), lines[2]["val_tokens"].clone()), (4.into(), 64.into()));
    assert!(lines[0]["val_windows"].is_null() && lines[0]["val_tokens"].is_null());

    let o = train(&[&["--out", s(&dir.path().join("run2"))], &common[..]].concat());
    let (err, stdout) = (text(&o.stderr), text(&o.stdout));
    assert!(err.contains("(4 windows)") && err.contains("step 3/6"), "stderr: {err}");
    assert!(stdout.contains(&format!("val loss {:.4} (124 windows)", e["loss"].as_f64().unwrap())), "{stdout}");
}

#[test]
fn best_holds_the_lowest_periodic_validation_survives_keep_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let metrics = dir.path().join("m.jsonl");
    let o = train(&[
        "--out",
        s(&out),
        "--steps",
        "40",
        "--eval-every",
        "5",
        "--save-every",
        "5",
        "--keep",
        "1",
        "--metrics",
        s(&metrics),
    ]);
    assert_eq!(step_dirs(&out), ["step-000040"]);
    let best = out.join("best");
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(best.join("state.json")).unwrap()).unwrap();
    let vals: Vec<(u64, f64)> = json_lines(&metrics)
        .iter()
        .filter(|l| l["val_loss"].is_number())
        .map(|l| (l["step"].as_u64().unwrap(), l["val_loss"].as_f64().unwrap()))
        .collect();
    let lowest = vals.iter().copied().fold((0, f64::INFINITY), |a, b| if b.1 < a.1 { b } else { a });
    assert_eq!(state["step"], lowest.0, "best/ is the step of the lowest periodic validation {vals:?}");
    assert!((state["val_loss"].as_f64().unwrap() - lowest.1).abs() < 1e-6);
    let stdout = text(&o.stdout);
    assert!(stdout.contains(&format!("best: {} (lowest periodic val loss", best.display())), "{stdout}");
    // No hidden leftovers of replacing best/ (the run directory's lock file is meant to stay).
    let hidden = |e: std::fs::DirEntry| {
        let name = e.file_name().to_string_lossy().into_owned();
        name.starts_with('.') && name != cllm::checkpoint::LOCK_FILE
    };
    assert!(!std::fs::read_dir(&out).unwrap().any(|e| hidden(e.unwrap())));

    // A full checkpoint: eval and generate read it, and a run resumes from it.
    assert_ok(&cllm(&["generate", "--checkpoint", s(&best), "--tokens", "5"]));
    let other = dir.path().join("from-best");
    let r = train(&["--resume", s(&best), "--out", s(&other), "--steps", "45", "--json"]);
    let r: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!((r["steps"].clone(), r["steps_run"].clone()), (45.into(), (45 - lowest.0).into()), "{r}");
}

#[test]
fn a_step_checkpoint_that_is_also_best_shares_its_files_and_outlives_best() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    assert_ok(&train(&["--out", s(&out), "--steps", "6", "--eval-every", "3", "--save-every", "3"]));
    let best = out.join("best");
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(best.join("state.json")).unwrap()).unwrap();
    let step = out.join(format!("step-{:06}", state["step"].as_u64().unwrap()));
    // Written once: the step directory's files are best/'s, linked (the same inodes).
    for file in ["model.safetensors", "state.safetensors", "state.json", "config.json"] {
        let (a, b) = (std::fs::metadata(best.join(file)).unwrap(), std::fs::metadata(step.join(file)).unwrap());
        assert_eq!((a.ino(), a.nlink()), (b.ino(), 2), "{file} of {} is not best/'s", step.display());
    }
    // best/ gone (as when a lower validation replaces it), the step checkpoint is whole.
    std::fs::remove_dir_all(&best).unwrap();
    assert_ok(&cllm(&["generate", "--checkpoint", s(&step), "--tokens", "5"]));
    let r = train(&["--resume", s(&step), "--out", s(&dir.path().join("again")), "--steps", "7", "--json"]);
    let r: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(r["steps"], 7, "{r}");
}

#[test]
fn the_hint_after_training_is_a_command_that_runs_as_printed() {
    let dir = tempfile::tempdir().unwrap();
    // Installed: `cllm` found on the PATH; not installed: the path it was run by.
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_cllm"), bin.join("cllm")).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    for (program, expect) in
        [(bin.join("cllm"), bin.join("cllm").display().to_string()), ("cllm".into(), "cllm".into())]
    {
        let o = Command::new(&program)
            .args(["train", "--config", "tiny", "--steps", "2", "--out", "run"])
            .current_dir(dir.path())
            .env("PATH", &path)
            .output()
            .unwrap();
        assert_ok(&o);
        std::fs::remove_dir_all(dir.path().join("run")).unwrap();
        let stdout = text(&o.stdout);
        let hint = stdout.split("more with: ").nth(1).and_then(|h| h.split(" --prompt TEXT").next()).expect(&stdout);
        assert!(hint.starts_with(&format!("{expect} generate ")), "hint {hint:?}");
        // Runs again after the run directory is recreated at the same place.
        let o = Command::new(&program)
            .args(["train", "--config", "tiny", "--steps", "2", "--out", "run", "--quiet"])
            .current_dir(dir.path())
            .env("PATH", &path)
            .output()
            .unwrap();
        assert_ok(&o);
        let g = Command::new("sh")
            .arg("-c")
            .arg(format!("{hint} --prompt ROMEO --tokens 4"))
            .current_dir(dir.path())
            .env("PATH", &path)
            .output()
            .unwrap();
        assert_ok(&g);
        assert!(g.stdout.starts_with(b"ROMEO"), "{}", text(&g.stdout));
        std::fs::remove_dir_all(dir.path().join("run")).unwrap();
    }
}

#[test]
fn samples_during_training_repeat_for_a_seed_and_leave_the_weights_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let metrics = dir.path().join(format!("{name}.jsonl"));
        let o = train(&[&["--out", s(&out), "--steps", "12", "--metrics", s(&metrics)], extra].concat());
        let samples: Vec<serde_json::Value> =
            json_lines(&metrics).into_iter().filter(|l| l.get("sample").is_some()).collect();
        (std::fs::read(out.join("step-000012/model.safetensors")).unwrap(), samples, text(&o.stderr))
    };
    let (plain, none, _) = run("plain", &[]);
    let (a, sa, err) = run("a", &["--sample-every", "5"]);
    let (b, sb, _) = run("b", &["--sample-every", "5"]);
    assert!(none.is_empty());
    assert_eq!(sa.iter().map(|l| l["step"].as_u64().unwrap()).collect::<Vec<_>>(), [5, 10]);
    // 64 bytes; bytes that are not UTF-8 become U+FFFD, one character each.
    assert!(sa.iter().all(|l| (1..=64).contains(&l["sample"].as_str().unwrap().chars().count())), "{sa:?}");
    assert_eq!(sa, sb, "the same seed gives the same samples");
    assert!(err.contains("step 5 sample: \"") && err.contains("step 10 sample: \""), "stderr: {err}");
    assert!(a == plain && b == plain, "sampling must not change the trained weights");
    let (_, sc, _) = run("c", &["--sample-every", "5", "--seed", "7"]);
    assert_ne!(sa, sc, "another seed, other samples");
}

#[test]
fn negative_numbers_are_rejected_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    train_tiny(&out, &["--steps", "1"]);
    let err = assert_fails(&cllm(&["generate", "--checkpoint", s(&out), "--temperature", "-1"]), 2);
    assert!(err.contains("--temperature must be a number >= 0") && err.contains("-1"), "{err}");
    for (flag, reason) in
        [("--lr", "--lr must be a positive number"), ("--clip-norm", "--clip-norm must be a number >= 0")]
    {
        let err = assert_fails(&cllm(&["train", "--config", "tiny", flag, "-1", "--dry-run"]), 2);
        assert!(err.contains(reason), "{err}");
    }
    let err = assert_fails(&cllm(&["train", "--val-fraction", "-0.5", "--dry-run"]), 2);
    assert!(err.contains("--val-fraction must be in [0, 1), got -0.5"), "{err}");
    let err = assert_fails(&cllm(&["generate", "--checkpoint", s(&out), "--top-k", "-3"]), 2);
    assert!(err.contains("'-3'") && !err.contains("unexpected argument"), "{err}");
}

#[test]
fn many_passes_over_a_small_file_draw_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_text(dir.path(), "small.txt", 3000);
    // 300 steps of 4 x 16 bytes over the 2700 training bytes: 7.1 passes.
    let o = cllm(&["train", "--config", "tiny", "--data", s(&data), "--steps", "300", "--dry-run"]);
    assert_ok(&o);
    let err = text(&o.stderr);
    assert!(err.starts_with("warning: 7.1 epochs over 2.7 KB of training text (more than 5"), "stderr: {err}");
    let o = cllm(&["train", "--config", "tiny", "--data", s(&data), "--steps", "200", "--dry-run"]);
    assert_ok(&o);
    assert!(o.stderr.is_empty(), "4.7 passes: no warning: {}", text(&o.stderr));
}

#[test]
fn generate_ends_with_a_newline_on_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    train_tiny(&out, &["--steps", "1"]);
    let cmd = format!("{} generate --checkpoint {} --tokens 7 --no-prompt", env!("CARGO_BIN_EXE_cllm"), s(&out));
    // `script` runs the command on a pseudo-terminal; without it there is nothing to check.
    let Ok(o) = Command::new("script").args(["-qec", &cmd, "/dev/null"]).output() else { return };
    assert_ok(&o);
    assert!(o.stdout.ends_with(b"\r\n"), "{:?}", text(&o.stdout));
    // Not on a terminal: the bytes alone.
    let o = cllm(&["generate", "--checkpoint", s(&out), "--tokens", "7", "--no-prompt"]);
    assert_eq!(o.stdout.len(), 7);
}
