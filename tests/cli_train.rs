//! `cllm train` through the real binary: outputs, files, validation of flags.

use std::path::Path;
use std::process::Output;

mod common;
use common::*;
// Named explicitly: a glob import cannot shadow the `cllm` crate name.
use common::cllm;

fn train_tiny(out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["train", "--config", "tiny", "--out", s(out)];
    args.extend_from_slice(extra);
    cllm(&args)
}

#[test]
fn train_writes_final_checkpoint_and_prints_summary_and_sample() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = train_tiny(&out, &["--steps", "5"]);
    assert_ok(&o);
    assert_eq!(step_dirs(&out), ["step-000005"]);
    for f in ["model.safetensors", "state.safetensors", "state.json"] {
        assert!(out.join("step-000005").join(f).is_file(), "{f} missing");
    }
    let stdout = text(&o.stdout);
    assert!(stdout.contains("trained to step 5"), "stdout: {stdout}");
    assert!(stdout.contains("step-000005"), "stdout: {stdout}");
    assert!(stdout.contains("sample"), "stdout: {stdout}");
}

#[test]
fn json_prints_the_summary_as_one_object() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = train_tiny(&out, &["--steps", "4", "--json"]);
    assert_ok(&o);
    let stdout = text(&o.stdout);
    assert_eq!(stdout.lines().count(), 1, "stdout: {stdout}");
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("valid JSON");
    for key in ["final_loss", "val_loss", "steps", "tokens_per_s", "checkpoint", "elapsed_s"] {
        assert!(v.get(key).is_some(), "missing {key} in {v}");
    }
    assert_eq!(v["steps"], 4);
    assert!(v["checkpoint"].as_str().unwrap().ends_with("step-000004"));
}

#[test]
fn quiet_prints_only_the_summary() {
    let dir = tempfile::tempdir().unwrap();
    let o = train_tiny(&dir.path().join("run"), &["--steps", "3", "--quiet"]);
    assert_ok(&o);
    assert!(o.stderr.is_empty(), "stderr: {}", text(&o.stderr));
    let stdout = text(&o.stdout);
    assert!(stdout.contains("trained to step 3") && !stdout.contains("sample"), "stdout: {stdout}");
}

#[test]
fn progress_lines_go_to_stderr_when_it_is_not_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let o = train_tiny(&dir.path().join("run"), &["--steps", "10"]);
    assert_ok(&o);
    let err = text(&o.stderr);
    assert!(err.contains("step 10/10") && err.contains("loss"), "stderr: {err}");
}

#[test]
fn metrics_file_has_one_json_object_per_step_with_the_required_keys() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("m.jsonl");
    let o = train_tiny(&dir.path().join("run"), &["--steps", "6", "--eval-every", "3", "--metrics", s(&metrics)]);
    assert_ok(&o);
    let body = std::fs::read_to_string(&metrics).unwrap();
    let lines: Vec<serde_json::Value> = body.lines().map(|l| serde_json::from_str(l).expect("JSON line")).collect();
    assert_eq!(lines.len(), 6);
    for (i, v) in lines.iter().enumerate() {
        assert_eq!(v["step"], (i + 1) as u64);
        for key in ["loss", "val_loss", "grad_norm", "clipped", "skipped_spheres", "tokens_per_s", "step_ms", "lr"] {
            assert!(v.get(key).is_some(), "step {}: missing {key} in {v}", i + 1);
        }
        assert!(v["skipped_spheres"].is_array());
    }
    assert!(lines[2]["val_loss"].is_number() && lines[5]["val_loss"].is_number());
    assert!(lines[0]["val_loss"].is_null());
}

#[test]
fn keep_two_retains_the_two_newest_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    assert_ok(&train_tiny(&out, &["--steps", "5", "--save-every", "1", "--keep", "2"]));
    assert_eq!(step_dirs(&out), ["step-000004", "step-000005"]);
}

#[test]
fn inject_nan_shows_the_skipped_sphere_at_that_step() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("m.jsonl");
    let o = train_tiny(&dir.path().join("run"), &["--steps", "3", "--inject-nan", "2:0", "--metrics", s(&metrics)]);
    assert_ok(&o);
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(&metrics).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines[1]["skipped_spheres"], serde_json::json!([0]));
    assert_eq!(lines[0]["skipped_spheres"], serde_json::json!([]));
    assert_eq!(lines[2]["skipped_spheres"], serde_json::json!([]));
}

#[test]
fn inject_nan_without_microbatch_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = assert_fails(&train_tiny(&dir.path().join("run"), &["--steps", "3", "--inject-nan", "3"]), 2);
    assert!(err.contains("STEP:MICROBATCH"), "{err}");
}

#[test]
fn inject_nan_into_a_missing_microbatch_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let o =
        train_tiny(&dir.path().join("run"), &["--steps", "3", "--batch", "4", "--spheres", "2", "--inject-nan", "1:2"]);
    assert_fails(&o, 2);
}

#[test]
fn dry_run_prints_the_plan_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = train_tiny(&out, &["--steps", "5", "--dry-run"]);
    assert_ok(&o);
    let stdout = text(&o.stdout);
    for word in ["parameters", "tokens/step", "train", "validation"] {
        assert!(stdout.contains(word), "missing {word:?} in {stdout}");
    }
    assert!(!out.exists(), "dry run created the output directory");
}

#[test]
fn dry_run_json_reports_params_and_data_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let o = train_tiny(&dir.path().join("run"), &["--dry-run", "--json"]);
    assert_ok(&o);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["params"].as_u64().unwrap() > 0);
    assert_eq!(v["tokens_per_step"], 4 * 16);
    assert_eq!(
        v["data_bytes"].as_u64().unwrap(),
        v["train_bytes"].as_u64().unwrap() + v["val_bytes"].as_u64().unwrap()
    );
}

#[test]
fn zero_threads_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = assert_fails(&train_tiny(&dir.path().join("run"), &["--threads", "0"]), 2);
    assert!(err.contains("--threads"), "{err}");
}

#[test]
fn batch_not_divisible_by_spheres_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = assert_fails(&train_tiny(&dir.path().join("run"), &["--batch", "6", "--spheres", "4"]), 2);
    assert!(err.contains("divisible"), "{err}");
}

#[test]
fn context_longer_than_the_model_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = assert_fails(&train_tiny(&dir.path().join("run"), &["--context", "17"]), 2);
    assert!(err.contains("--context"), "{err}");
}

#[test]
fn zero_steps_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    assert_fails(&train_tiny(&dir.path().join("run"), &["--steps", "0"]), 2);
}

#[test]
fn unknown_config_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let o = cllm(&["train", "--config", "huge", "--out", s(&dir.path().join("run"))]);
    assert!(assert_fails(&o, 2).contains("tiny"));
}

#[test]
fn non_numeric_flag_value_is_a_one_line_usage_error() {
    assert_fails(&cllm(&["train", "--steps", "many"]), 2);
}

#[test]
fn unknown_flag_is_a_one_line_usage_error() {
    assert_fails(&cllm(&["train", "--stepz", "3"]), 2);
}

#[test]
fn out_dir_holding_checkpoints_needs_resume() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    assert_ok(&train_tiny(&out, &["--steps", "2"]));
    let err = assert_fails(&train_tiny(&out, &["--steps", "2"]), 2);
    assert!(err.contains("--resume"), "{err}");
    assert_eq!(step_dirs(&out), ["step-000002"], "the existing checkpoint must survive");
}

#[test]
fn weights_are_identical_at_one_and_two_threads() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    assert_ok(&train_tiny(&a, &["--steps", "4", "--threads", "1", "--quiet"]));
    assert_ok(&train_tiny(&b, &["--steps", "4", "--threads", "2", "--quiet"]));
    let wa = std::fs::read(a.join("step-000004/model.safetensors")).unwrap();
    let wb = std::fs::read(b.join("step-000004/model.safetensors")).unwrap();
    assert!(wa == wb, "weights differ between 1 and 2 threads");
}

#[test]
fn non_utf8_text_data_trains() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("bytes.bin");
    let bytes: Vec<u8> = (0..4000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    std::fs::write(&data, &bytes).unwrap();
    assert_ok(&train_tiny(&dir.path().join("run"), &["--steps", "2", "--data", s(&data), "--quiet"]));
}

#[test]
fn squad_json_is_converted_and_trained_on() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/squad/v11_pretty.json");
    let o = train_tiny(&dir.path().join("run"), &["--steps", "2", "--data", s(&fixture), "--dry-run", "--json"]);
    assert_ok(&o);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["data_format"], "squad");
}

#[test]
fn missing_data_file_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.txt");
    let err = assert_fails(&train_tiny(&dir.path().join("run"), &["--data", s(&missing)]), 1);
    assert!(err.contains("nope.txt"), "{err}");
}

#[test]
fn directory_as_data_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = assert_fails(&train_tiny(&dir.path().join("run"), &["--data", s(dir.path())]), 1);
    assert!(err.contains("directory"), "{err}");
}

#[test]
fn empty_data_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("empty.txt");
    std::fs::write(&data, b"").unwrap();
    assert!(assert_fails(&train_tiny(&dir.path().join("run"), &["--data", s(&data)]), 1).contains("empty"));
}

#[test]
fn data_shorter_than_one_window_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("short.txt");
    std::fs::write(&data, b"too short").unwrap();
    assert_fails(&train_tiny(&dir.path().join("run"), &["--data", s(&data)]), 1);
}

#[test]
fn invalid_json_as_squad_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("bad.json");
    std::fs::write(&data, b"{\"data\": [ {\"title\": ").unwrap();
    let err = assert_fails(&train_tiny(&dir.path().join("run"), &["--data", s(&data), "--format", "squad"]), 1);
    assert!(err.contains("bad.json"), "{err}");
}

#[test]
fn json_that_is_not_squad_is_an_error_with_format_squad() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("other.json");
    std::fs::write(&data, br#"{"rows": [1, 2, 3], "name": "not squad at all, but long enough to train on"}"#).unwrap();
    assert_fails(&train_tiny(&dir.path().join("run"), &["--data", s(&data), "--format", "squad"]), 1);
}

#[test]
fn unknown_format_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    assert_fails(&train_tiny(&dir.path().join("run"), &["--format", "csv"]), 2);
}

#[test]
fn version_prints_version_and_commit() {
    let o = cllm(&["--version"]);
    assert_ok(&o);
    let v = text(&o.stdout);
    assert!(v.contains(env!("CARGO_PKG_VERSION")) && v.contains("commit"), "{v}");
}

#[test]
fn help_lists_every_subcommand() {
    let o = cllm(&["--help"]);
    assert_ok(&o);
    let h = text(&o.stdout);
    for sub in ["train", "eval", "generate", "prep"] {
        assert!(h.contains(sub), "{sub} missing from help: {h}");
    }
}

#[test]
fn no_subcommand_shows_help_and_exits_2() {
    let o = cllm(&[]);
    assert_no_panic(&o);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn metrics_in_a_missing_directory_is_an_error_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let metrics = dir.path().join("no/such/dir/m.jsonl");
    assert_fails(&train_tiny(&out, &["--steps", "2", "--metrics", s(&metrics)]), 1);
    assert!(!out.exists());
}

#[test]
fn default_spheres_divide_any_batch() {
    let dir = tempfile::tempdir().unwrap();
    let o = train_tiny(&dir.path().join("run"), &["--batch", "12", "--dry-run", "--json"]);
    assert_ok(&o);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["spheres"], 6);
}
