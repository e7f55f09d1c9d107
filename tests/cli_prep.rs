//! `cllm prep` through the real binary.

use std::path::Path;

mod common;
use common::*;
// Named explicitly: a glob import cannot shadow the `cllm` crate name.
use common::cllm;

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/squad").join(name)
}

#[test]
fn squad_conversion_writes_text_and_prints_counts() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("squad.txt");
    let o = cllm(&["prep", "squad", s(&fixture("v11_pretty.json")), s(&out)]);
    assert_ok(&o);
    let stdout = text(&o.stdout);
    for w in ["articles", "paragraphs", "questions", "bytes"] {
        assert!(stdout.contains(w), "missing {w:?}: {stdout}");
    }
    let body = std::fs::read(&out).unwrap();
    assert!(body.starts_with(b"Context: "), "{}", text(&body[..body.len().min(80)]));
    assert!(stdout.contains(&format!("{} bytes", body.len())), "byte count not printed: {stdout}");
}

#[test]
fn converted_text_trains() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("squad.txt");
    assert_ok(&cllm(&["prep", "squad", s(&fixture("v11_pretty.json")), s(&out)]));
    let o = cllm(&[
        "train",
        "--config",
        "tiny",
        "--steps",
        "1",
        "--data",
        s(&out),
        "--out",
        s(&dir.path().join("r")),
        "--quiet",
    ]);
    assert_ok(&o);
}

#[test]
fn invalid_json_is_an_error_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("bad.json");
    std::fs::write(&input, b"{\"data\": [").unwrap();
    let out = dir.path().join("out.txt");
    let err = assert_fails(&cllm(&["prep", "squad", s(&input), s(&out)]), 1);
    assert!(err.contains("bad.json"), "{err}");
    assert!(!out.exists());
}

#[test]
fn json_that_is_not_squad_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("other.json");
    std::fs::write(&input, br#"{"rows": [1, 2, 3]}"#).unwrap();
    assert_fails(&cllm(&["prep", "squad", s(&input), s(&dir.path().join("out.txt"))]), 1);
}

#[test]
fn missing_input_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = assert_fails(&cllm(&["prep", "squad", s(&dir.path().join("no.json")), s(&dir.path().join("o.txt"))]), 1);
    assert!(err.contains("no.json"), "{err}");
}

#[test]
fn directory_as_input_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    assert_fails(&cllm(&["prep", "squad", s(dir.path()), s(&dir.path().join("o.txt"))]), 1);
}

#[test]
fn empty_input_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("empty.json");
    std::fs::write(&input, b"").unwrap();
    assert_fails(&cllm(&["prep", "squad", s(&input), s(&dir.path().join("o.txt"))]), 1);
}

#[test]
fn same_input_and_output_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.json");
    std::fs::copy(fixture("v11_pretty.json"), &input).unwrap();
    assert_fails(&cllm(&["prep", "squad", s(&input), s(&input)]), 2);
    assert_eq!(std::fs::read(&input).unwrap(), std::fs::read(fixture("v11_pretty.json")).unwrap());
}

#[test]
fn unknown_prep_kind_is_a_usage_error() {
    assert_fails(&cllm(&["prep", "csv", "a", "b"]), 2);
}
