//! What `--help` says a default is, is what the command uses: the `[default: …]` notes of
//! `cllm train --help` are parsed and compared with the plan `cllm train --dry-run --json`
//! reports, flag by flag, so the help text and the code cannot drift apart again (they did:
//! the help said `--steps [default: 1000]` and `--clip-norm [default: 1.0]` while a run used
//! 2000 and 10).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

mod common;
use common::*;
// Named explicitly: a glob import cannot shadow the `cllm` crate name.
use common::cllm;

/// `--flag` → the text inside its `[default: …]`, read from `cllm SUB --help`.
fn help_defaults(sub: &str) -> BTreeMap<String, String> {
    let o = cllm(&[sub, "--help"]);
    assert_ok(&o);
    let mut defaults = BTreeMap::new();
    let mut flag: Option<String> = None;
    for line in text(&o.stdout).lines() {
        // The long help puts each flag on its own line, its description on the next ones.
        if let Some(name) = line.trim_start().strip_prefix("--") {
            flag = name.split([' ', '<']).next().map(|n| format!("--{n}"));
        }
        if let Some(start) = line.find("[default: ") {
            let rest = &line[start + "[default: ".len()..];
            let value = &rest[..rest.find(']').expect("a [default: …] note is closed on its line")];
            let flag = flag.clone().expect("a default belongs to a flag");
            assert!(defaults.insert(flag.clone(), value.to_string()).is_none(), "{flag} has two defaults");
        }
    }
    defaults
}

/// `cllm train --dry-run --json EXTRA` in `dir` (so the default `--out` is `dir/runs/run-001`).
fn dry_run(dir: &Path, extra: &[&str]) -> Value {
    let o = Command::new(env!("CARGO_BIN_EXE_cllm"))
        .current_dir(dir)
        .args(["train", "--dry-run", "--json"])
        .args(extra)
        .output()
        .expect("the cllm binary runs");
    assert_ok(&o);
    serde_json::from_slice(&o.stdout).expect("one JSON object")
}

/// True if the help's text names the value the run used (numbers compared as numbers, so
/// `10` and `10.0` agree).
fn same(help: &str, used: &Value) -> bool {
    match used {
        Value::String(s) => s == help,
        Value::Number(n) => help.parse::<f64>().ok() == n.as_f64(),
        _ => false,
    }
}

/// The whole numbers in a help note, in order.
fn numbers(note: &str) -> Vec<u64> {
    note.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).map(|s| s.parse().unwrap()).collect()
}

/// Flags whose default is a plain value, by the key the dry run reports it under.
const LITERAL: [(&str, &str); 15] = [
    ("--config", "config"),
    ("--steps", "steps"),
    ("--lr", "lr"),
    ("--lr-schedule", "lr_schedule"),
    ("--clip-norm", "clip_norm"),
    ("--clip-mode", "clip_mode"),
    ("--weight-decay", "weight_decay"),
    ("--seed", "seed"),
    ("--strategy", "strategy"),
    ("--val-fraction", "val_fraction"),
    ("--save-every", "save_every"),
    ("--keep", "keep"),
    ("--eval-every", "eval_every"),
    ("--eval-windows", "eval_windows"),
    ("--sample-every", "sample_every"),
];

/// Flags whose default is a rule, checked one by one below.
const RULES: [&str; 8] =
    ["--data", "--format", "--context", "--batch", "--warmup-steps", "--threads", "--spheres", "--out"];

/// Model-shape flags (their default: the preset's), by the dry run's `model` key.
const SHAPE: [(&str, &str); 5] = [
    ("--n-layer", "layers"),
    ("--n-head", "heads"),
    ("--n-embd", "embed"),
    ("--n-positions", "context"),
    ("--vocab-size", "vocab"),
];

#[test]
fn every_default_in_train_help_is_checked_here() {
    let shown: Vec<String> = help_defaults("train").into_keys().collect();
    let mut checked: Vec<String> = LITERAL
        .iter()
        .map(|(f, _)| f.to_string())
        .chain(RULES.map(String::from))
        .chain(SHAPE.map(|(f, _)| f.to_string()))
        .collect();
    checked.sort();
    assert_eq!(shown, checked, "a flag's default is shown in --help but not compared with --dry-run here (or gone)");
}

#[test]
fn plain_defaults_in_train_help_are_what_a_dry_run_uses() {
    let dir = tempfile::tempdir().unwrap();
    let help = help_defaults("train");
    let plan = dry_run(dir.path(), &[]);
    for (flag, key) in LITERAL {
        assert!(same(&help[flag], &plan[key]), "{flag}: --help says {}, a run uses {}", help[flag], plan[key]);
    }
    // Giving every default explicitly plans exactly the same run.
    let mut explicit: Vec<&str> = Vec::new();
    for (flag, _) in LITERAL {
        explicit.extend([flag, help[flag].as_str()]);
    }
    explicit.extend(["--format", help["--format"].as_str()]);
    assert_eq!(dry_run(dir.path(), &explicit), plan);
}

#[test]
fn rule_defaults_in_train_help_are_what_a_dry_run_uses() {
    let dir = tempfile::tempdir().unwrap();
    let help = help_defaults("train");
    let plan = dry_run(dir.path(), &[]);
    let n = |key: &str| plan[key].as_u64().unwrap_or_else(|| panic!("{key} in {plan}"));

    assert_eq!(plan["data"], help["--data"].as_str(), "--data");
    assert_eq!(help["--context"], "the model's context");
    assert_eq!(plan["context"], plan["model"]["context"], "--context");
    assert_eq!(help["--batch"], format!("the preset's, {} for {}", n("batch"), help["--config"]), "--batch");

    let [divisor, max] = numbers(&help["--warmup-steps"])[..] else {
        panic!("--warmup-steps: {}", help["--warmup-steps"])
    };
    assert_eq!(help["--warmup-steps"], format!("steps/{divisor}, at most {max}"));
    assert_eq!(n("warmup_steps"), (n("steps") / divisor).min(max), "--warmup-steps at the default --steps");
    let short = dry_run(dir.path(), &["--steps", "50"]);
    assert_eq!(short["warmup_steps"], (50 / divisor).min(max), "--warmup-steps with --steps 50");

    let [max_threads] = numbers(&help["--threads"])[..] else { panic!("--threads: {}", help["--threads"]) };
    assert_eq!(help["--threads"], format!("number of cores, at most {max_threads}"));
    let cores = std::thread::available_parallelism().map(|c| c.get() as u64).unwrap_or(1);
    assert_eq!(n("threads"), cores.min(max_threads), "--threads");

    let [up_to] = numbers(&help["--spheres"])[..] else { panic!("--spheres: {}", help["--spheres"]) };
    assert_eq!(help["--spheres"], format!("the largest divisor of the batch up to {up_to}"));
    let rule = |batch: u64| (1..=batch.min(up_to)).rev().find(|s| batch.is_multiple_of(*s)).unwrap();
    assert_eq!(n("spheres"), rule(n("batch")), "--spheres at the default batch");
    for batch in [12u64, 7, 3] {
        let p = dry_run(dir.path(), &["--batch", &batch.to_string()]);
        assert_eq!(p["spheres"], rule(batch), "--spheres with --batch {batch}");
    }

    let mut explicit_shape: Vec<String> = Vec::new();
    for (flag, key) in SHAPE {
        assert_eq!(help[flag], "the preset's", "{flag}");
        explicit_shape.extend([flag.to_string(), plan["model"][key].to_string()]);
    }
    let explicit_shape: Vec<&str> = explicit_shape.iter().map(String::as_str).collect();
    assert_eq!(dry_run(dir.path(), &explicit_shape), plan, "the shape flags at the preset's values");

    let runs = help["--out"].strip_prefix("a new ").and_then(|s| s.split_once("/run-NNN")).map(|(d, _)| d);
    assert_eq!(plan["out"], format!("{}/run-001", runs.expect("--out names the runs directory")), "--out");
}

#[test]
fn the_format_help_calls_default_detects_squad_and_text() {
    let dir = tempfile::tempdir().unwrap();
    let help = help_defaults("train");
    assert_eq!(help["--format"], "auto");
    let squad = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/squad/v11_pretty.json");
    let text_file = dir.path().join("t.txt");
    std::fs::write(&text_file, "plain text, long enough for a window of the tiny model. ".repeat(20)).unwrap();
    let tiny = ["--config", "tiny"];
    let format_of = |data: &Path, extra: &[&str]| {
        let mut args = vec!["--data", s(data)];
        args.extend_from_slice(&tiny);
        args.extend_from_slice(extra);
        dry_run(dir.path(), &args)["data_format"].clone()
    };
    assert_eq!(format_of(&squad, &[]), "squad", "the default reads SQuAD-shaped JSON as SQuAD");
    assert_eq!(format_of(&text_file, &[]), "text", "the default reads anything else as text");
    assert_eq!(format_of(&squad, &["--format", "auto"]), format_of(&squad, &[]));
}

#[test]
fn the_sample_after_training_uses_generate_s_default_temperature() {
    let dir = tempfile::tempdir().unwrap();
    let help = help_defaults("generate");
    let o = cllm(&["train", "--config", "tiny", "--steps", "1", "--out", s(&dir.path().join("run"))]);
    assert_ok(&o);
    let stdout = text(&o.stdout);
    let expected = format!("temperature {},", help["--temperature"]);
    assert!(stdout.contains(&expected), "train's sample line should say {expected:?}: {stdout}");
}

#[test]
fn other_subcommands_show_the_defaults_they_use() {
    use cllm::cli::generate::{DEFAULT_SEED, DEFAULT_TEMPERATURE, DEFAULT_TOKENS, DEFAULT_TOP_K};
    use cllm::train::Strategy;
    let generate = help_defaults("generate");
    let expected = [
        ("--seed", DEFAULT_SEED.to_string()),
        ("--temperature", DEFAULT_TEMPERATURE.to_string()),
        ("--tokens", DEFAULT_TOKENS.to_string()),
        ("--top-k", DEFAULT_TOP_K.to_string()),
    ];
    assert_eq!(generate, expected.map(|(f, v)| (f.to_string(), v)).into_iter().collect(), "generate");
    assert_eq!(help_defaults("eval")["--format"], "auto", "eval");
    assert_eq!(help_defaults("profile")["--strategy"], Strategy::default().to_string(), "profile");
    let every = Strategy::ALL.map(|s| s.to_string()).join(",");
    assert_eq!(help_defaults("bench")["--strategies"], every, "bench measures every strategy by default");
}
