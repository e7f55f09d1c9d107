//! `cllm bench` end to end on the tiny preset: the report files exist and hold what the
//! contract promises; bad options are refused before any work. No timing is asserted: the
//! numbers depend on the machine and its load.

use cllm::bench::{check_bench_args, check_profile_args, run_bench, run_profile, BenchArgs, ProfileArgs};
use serde_json::Value;

fn tiny_args(out: &std::path::Path) -> BenchArgs {
    BenchArgs {
        config: "tiny".into(),
        threads: vec![1, 2],
        steps: 2,
        warmup: 1,
        out: Some(out.to_path_buf()),
        ceiling_ms: 5,
        quiet: true,
        ..BenchArgs::default()
    }
}

const CELL_KEYS: [&str; 17] = [
    "strategy",
    "threads",
    "median_step_ms",
    "tokens_per_s",
    "speedup",
    "efficiency",
    "cpu_utilization",
    "ceiling_speedup",
    "compute_frac",
    "merge_frac",
    "barrier_frac",
    "lock_wait_frac",
    "reduce_frac",
    "optimizer_frac",
    "lock_acquisitions_per_step",
    "lock_wait_ms_per_step",
    "peak_rss_mb",
];

#[test]
fn tiny_bench_writes_json_markdown_and_svg() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("tiny");
    run_bench(&tiny_args(&out)).expect("bench runs");

    let text = std::fs::read_to_string(out.join("scaling.json")).expect("scaling.json");
    let v: Value = serde_json::from_str(&text).expect("valid JSON");
    let machine = &v["machine"];
    assert!(machine["logical_cores"].as_u64().is_some_and(|n| n >= 1));
    for key in ["cpu_model", "rustc", "git_commit"] {
        assert!(machine[key].as_str().is_some_and(|s| !s.is_empty()), "machine.{key}");
    }
    assert_eq!(machine["gemm_backend"].as_str(), Some(cllm::model::kernel::name()), "machine.gemm_backend");
    assert_eq!(v["config"], "tiny");
    let ceiling = v["ceiling"].as_object().expect("ceiling object");
    for t in ["1", "2"] {
        assert!(ceiling[t].as_f64().is_some_and(|r| r > 0.0), "ceiling {t}");
    }
    let cells = v["cells"].as_array().expect("cells");
    assert_eq!(cells.len(), 4 * 2, "every strategy at 1 and 2 threads");
    for cell in cells {
        for key in CELL_KEYS {
            assert!(!cell[key].is_null(), "cell lacks {key}: {cell}");
        }
        assert!(cell["median_step_ms"].as_f64().is_some_and(|x| x > 0.0));
        assert!(cell["tokens_per_s"].as_f64().is_some_and(|x| x > 0.0));
        for key in ["compute_frac", "merge_frac", "barrier_frac", "lock_wait_frac", "reduce_frac", "optimizer_frac"] {
            assert!(cell[key].as_f64().is_some_and(|x| x >= 0.0), "{key} is a non-negative number");
        }
        if cell["threads"] == 1 {
            assert_eq!(cell["speedup"].as_f64(), Some(1.0), "1 thread is the baseline");
        }
    }
    let strategies: Vec<&str> = cells.iter().filter_map(|c| c["strategy"].as_str()).collect();
    for s in ["model-lock", "gradient-lock", "segmented", "rayon"] {
        assert!(strategies.contains(&s), "{s} measured");
    }

    let md = std::fs::read_to_string(out.join("scaling.md")).expect("scaling.md");
    assert!(md.contains("| strategy | threads |"), "markdown table header:\n{md}");
    assert!(md.contains("|---|"), "markdown table rule");
    assert!(md.contains("**segmented**"), "a paragraph per strategy");

    let svg = std::fs::read_to_string(out.join("scaling.svg")).expect("scaling.svg");
    let head = svg.trim_start();
    assert!(head.starts_with("<svg") || head.starts_with("<?xml"), "SVG: {}", &head[..head.len().min(80)]);
    assert!(svg.len() > 500, "non-empty chart");
    assert!(svg.contains("segmented"), "legend names the strategies");

    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .expect("out dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "no temporary files left: {leftovers:?}");
}

#[test]
fn bench_and_profile_train_at_a_shorter_context_than_the_presets() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("short");
    let args =
        BenchArgs { threads: vec![1], strategies: vec!["segmented".into()], context: Some(8), ..tiny_args(&out) };
    run_bench(&args).expect("bench runs");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(out.join("scaling.json")).unwrap()).unwrap();
    let model = &v["model"];
    // The model keeps tiny's position table (16); each sequence is 8 tokens.
    assert_eq!((model["context"].clone(), model["seq"].clone()), (16.into(), 8.into()), "{model}");
    assert_eq!(model["tokens_per_step"], model["batch"].as_u64().unwrap() * 8);
    let svg = dir.path().join("p.svg");
    let profile = ProfileArgs {
        config: "tiny".into(),
        threads: Some(1),
        steps: 2,
        context: Some(8),
        out: Some(svg.clone()),
        quiet: true,
        ..ProfileArgs::default()
    };
    assert!(run_profile(&profile).expect("profile runs").samples > 0);
    assert!(svg.exists());
}

#[test]
fn bad_bench_options_are_errors() {
    let dir = tempfile::tempdir().expect("temp dir");
    let base = tiny_args(dir.path());
    check_bench_args(&base).expect("the base options are fine");
    let cases: Vec<(BenchArgs, &str)> = vec![
        (BenchArgs { threads: vec![1, 0], ..base.clone() }, "--threads"),
        (BenchArgs { threads: vec![], ..base.clone() }, "--threads"),
        (BenchArgs { strategies: vec!["spinlock".into()], ..base.clone() }, "--strategies"),
        (BenchArgs { strategies: vec![], ..base.clone() }, "--strategies"),
        (BenchArgs { config: "huge".into(), ..base.clone() }, "--config"),
        (BenchArgs { steps: 0, ..base.clone() }, "--steps"),
        (BenchArgs { batch: Some(0), ..base.clone() }, "--batch"),
        (BenchArgs { context: Some(0), ..base.clone() }, "--context"),
        (BenchArgs { context: Some(17), ..base.clone() }, "--context"),
    ];
    for (args, flag) in cases {
        assert!(check_bench_args(&args).is_err(), "{flag} checked up front");
        let e = run_bench(&args).expect_err(flag);
        assert!(e.0.contains(flag), "error names {flag}: {}", e.0);
        assert!(!e.0.contains('\n'), "one line: {}", e.0);
    }
    assert!(!dir.path().join("scaling.json").exists(), "nothing written on a bad option");
}

#[test]
fn bad_profile_options_are_errors() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = Some(dir.path().join("p.svg"));
    let base = ProfileArgs { config: "tiny".into(), out, quiet: true, ..ProfileArgs::default() };
    for (args, flag) in [
        (ProfileArgs { threads: Some(0), ..base.clone() }, "--threads"),
        (ProfileArgs { strategy: Some("spinlock".into()), ..base.clone() }, "--strategy"),
        (ProfileArgs { config: "huge".into(), ..base.clone() }, "--config"),
        (ProfileArgs { steps: 0, ..base.clone() }, "--steps"),
        (ProfileArgs { min_seconds: -1.0, ..base.clone() }, "--min-seconds"),
        (ProfileArgs { min_seconds: f64::NAN, ..base.clone() }, "--min-seconds"),
        (ProfileArgs { context: Some(17), ..base.clone() }, "--context"),
    ] {
        assert!(check_profile_args(&args).is_err(), "{flag} checked up front");
        let e = run_profile(&args).expect_err(flag);
        assert!(e.0.contains(flag), "error names {flag}: {}", e.0);
    }
}

#[test]
fn tiny_profile_writes_a_flamegraph() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("sub").join("flame.svg");
    let args = ProfileArgs {
        config: "tiny".into(),
        threads: Some(2),
        steps: 30,
        warmup: 1,
        out: Some(out.clone()),
        quiet: true,
        ..ProfileArgs::default()
    };
    let summary = run_profile(&args).expect("profile runs");
    let svg = std::fs::read_to_string(&out).expect("flamegraph written");
    let head = svg.trim_start();
    assert!(head.starts_with("<svg") || head.starts_with("<?xml"), "SVG");
    assert!(summary.steps >= 30, "at least --steps steps: {summary:?}");
    assert!(summary.samples > 0, "{summary:?}");
}

#[test]
fn fast_profiles_keep_sampling_until_min_seconds() {
    // 5 tiny steps take a few milliseconds: too short for a 997 Hz sampler to draw anything.
    let dir = tempfile::tempdir().expect("temp dir");
    let args = ProfileArgs {
        config: "tiny".into(),
        threads: Some(1),
        steps: 5,
        warmup: 1,
        min_seconds: 0.5,
        out: Some(dir.path().join("flame.svg")),
        quiet: true,
        ..ProfileArgs::default()
    };
    let summary = run_profile(&args).expect("profile runs");
    assert!(summary.seconds >= 0.5, "{summary:?}");
    assert!(summary.steps > 5, "kept stepping past --steps: {summary:?}");
    assert!(summary.samples >= 10, "enough samples to draw: {summary:?}");
}

#[test]
fn bench_and_profile_without_out_write_new_numbered_runs_and_leave_results_alone() {
    let dir = tempfile::tempdir().expect("temp dir");
    let results = dir.path().join("results");
    std::fs::create_dir(&results).expect("results dir");
    std::fs::write(results.join("scaling.json"), "committed").expect("committed report");
    let run = |args: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_cllm"))
            .current_dir(dir.path())
            .args(args)
            .output()
            .expect("the cllm binary runs");
        assert!(o.status.success(), "cllm {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    };
    let bench = ["bench", "--config", "tiny", "--threads", "1", "--strategies", "segmented", "--steps", "1"];
    let quick = ["--warmup", "0", "--ceiling-ms", "5", "--quiet"];
    run(&[&bench[..], &quick[..]].concat());
    run(&[&bench[..], &quick[..]].concat());
    let profile = ["profile", "--config", "tiny", "--threads", "1", "--steps", "1", "--warmup", "0"];
    run(&[&profile[..], &["--min-seconds", "0.2", "--quiet"]].concat());

    let runs = dir.path().join("runs");
    for d in ["bench-001", "bench-002"] {
        for f in ["scaling.json", "scaling.md", "scaling.svg"] {
            assert!(runs.join(d).join(f).is_file(), "runs/{d}/{f} written");
        }
    }
    let svg = std::fs::read_to_string(runs.join("profile-001.svg")).expect("runs/profile-001.svg written");
    // .ci/run's check of a release-build flamegraph (no debug info): an SVG over 1000 bytes.
    assert!(svg.contains("<svg") && svg.len() > 1000, "a flamegraph of {} bytes", svg.len());
    let left: Vec<_> =
        std::fs::read_dir(&results).expect("results").filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
    assert_eq!(left, ["scaling.json"], "results/ untouched");
    assert_eq!(std::fs::read_to_string(results.join("scaling.json")).expect("read"), "committed");
}
