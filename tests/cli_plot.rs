//! `cllm plot` through the real binary: the SVG drawn from a real `--metrics` file has one
//! polyline point per step for every per-step series and one per validation for the
//! validation loss, with its titles and axis labels; bad metrics files are one-line errors.

use std::path::Path;

mod common;
use common::*;
// Named explicitly: a glob import cannot shadow the `cllm` crate name.
use common::cllm;

/// `(stroke colour, number of points)` of every `<polyline>` in the SVG.
fn polylines(svg: &str) -> Vec<(String, usize)> {
    let attr = |tag: &str, name: &str| -> Option<String> {
        let start = tag.find(&format!(" {name}=\""))? + name.len() + 3;
        let len = tag[start..].find('"')?;
        Some(tag[start..start + len].to_string())
    };
    svg.split("<polyline")
        .skip(1)
        .filter_map(|rest| {
            let tag = &rest[..rest.find("/>")?];
            let points = attr(tag, "points")?;
            Some((attr(tag, "stroke")?.to_uppercase(), points.split_whitespace().count()))
        })
        .collect()
}

/// The trimmed text of every `<text>` element in the SVG.
fn texts(svg: &str) -> Vec<String> {
    svg.split("<text")
        .skip(1)
        .filter_map(|rest| {
            let body = &rest[rest.find('>')? + 1..];
            Some(body[..body.find("</text>")?].trim().to_string())
        })
        .collect()
}

/// Trains the tiny model with a metrics file and returns (metrics path, step lines, lines
/// with a validation loss).
fn metrics_of_a_short_run(dir: &Path) -> (std::path::PathBuf, usize, usize) {
    let metrics = dir.join("metrics.jsonl");
    let out = dir.join("run");
    let args = ["--steps", "12", "--eval-every", "4", "--metrics", s(&metrics)];
    train_tiny(&out, &args);
    let text = std::fs::read_to_string(&metrics).expect("metrics written");
    let lines: Vec<serde_json::Value> =
        text.lines().map(|l| serde_json::from_str(l).expect("metrics lines are JSON")).collect();
    let steps = lines.iter().filter(|v| v["step"].is_u64() && v["loss"].is_f64()).count();
    let vals = lines.iter().filter(|v| v["step"].is_u64() && v["val_loss"].is_f64()).count();
    (metrics, steps, vals)
}

#[test]
fn plot_draws_every_step_of_every_series_with_titles_and_axes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (metrics, steps, vals) = metrics_of_a_short_run(dir.path());
    assert_eq!(steps, 12, "one line per step");
    assert!(vals >= 3, "validation at steps 4, 8, 12: {vals}");

    let svg_path = dir.path().join("pictures").join("loss.svg");
    let o = cllm(&["plot", "--metrics", s(&metrics), "--out", s(&svg_path)]);
    assert_ok(&o);
    let svg = std::fs::read_to_string(&svg_path).expect("SVG written");
    assert!(svg.trim_start().starts_with("<svg"), "an SVG document");

    // Legend samples are 2-point polylines; the series have more points than that.
    let series: Vec<(String, usize)> = polylines(&svg).into_iter().filter(|(_, n)| *n > 2).collect();
    let count = |color: &str| series.iter().filter(|(c, _)| c == color).map(|(_, n)| *n).collect::<Vec<_>>();
    assert_eq!(count("#1F77B4"), [steps], "train loss: one point per step ({series:?})");
    assert_eq!(count("#D62728"), [vals], "validation loss: one point per validation ({series:?})");
    assert_eq!(count("#2CA02C"), [steps; 3], "tokens/s, grad norm, skipped: one point per step ({series:?})");

    let texts = texts(&svg);
    for label in [
        "cllm training: metrics.jsonl",
        "loss",
        "train loss",
        "validation loss",
        "loss (nats/byte)",
        "throughput",
        "tokens/s",
        "gradient norm",
        "grad norm",
        "skipped micro-batches",
        "micro-batches",
    ] {
        assert!(texts.iter().any(|t| t == label), "the SVG shows {label:?}: {texts:?}");
    }
    assert_eq!(texts.iter().filter(|t| *t == "step").count(), 4, "every panel's x axis is the step: {texts:?}");
}

#[test]
fn missing_empty_or_broken_metrics_files_are_one_line_errors() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("loss.svg");
    let missing = dir.path().join("nope.jsonl");
    let err = assert_fails(&cllm(&["plot", "--metrics", s(&missing), "--out", s(&out)]), 1);
    assert!(err.contains("nope.jsonl") && err.contains("cannot read"), "{err}");

    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "").expect("write");
    let err = assert_fails(&cllm(&["plot", "--metrics", s(&empty), "--out", s(&out)]), 1);
    assert!(err.contains("empty.jsonl") && err.contains("no training steps"), "{err}");

    let broken = dir.path().join("broken.jsonl");
    std::fs::write(&broken, "{\"step\":1,\"loss\":2.0}\nnot json\n").expect("write");
    let err = assert_fails(&cllm(&["plot", "--metrics", s(&broken), "--out", s(&out)]), 1);
    assert!(err.contains("broken.jsonl line 2"), "{err}");

    let err = assert_fails(&cllm(&["plot", "--metrics", s(&broken), "--out", s(dir.path())]), 2);
    assert!(err.contains("is a directory"), "{err}");
    assert!(!out.exists(), "nothing written on an error");
}
