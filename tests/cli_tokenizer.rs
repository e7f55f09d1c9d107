//! `cllm tokenizer train | encode | decode` through the real binary: a byte-level BPE trained
//! here round-trips text exactly, `--json` is one object with `ids`, bad input is one line.

mod common;

use common::{assert_fails, assert_ok, cllm, s, text};

const SAMPLE: &str = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n";

fn trained(dir: &std::path::Path) -> std::path::PathBuf {
    let data = dir.join("data.txt");
    std::fs::write(&data, SAMPLE.repeat(50)).unwrap();
    let tok = dir.join("tokenizer.json");
    let out = cllm(&["tokenizer", "train", "--data", s(&data), "--vocab-size", "300", "--out", s(&tok)]);
    assert_ok(&out);
    assert!(text(&out.stdout).contains("tokens, sha256"), "{}", text(&out.stdout));
    tok
}

#[test]
fn trained_tokenizer_encodes_and_decodes_text_back_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let tok = trained(dir.path());
    for sample in ["Speak, speak.\n\nAll:", "  unseen: ünïcödé 🎭\ttabs\r\n"] {
        let out = cllm(&["tokenizer", "encode", "--tokenizer", s(&tok), "--json", sample]);
        assert_ok(&out);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let ids: Vec<String> = v["ids"].as_array().unwrap().iter().map(|i| i.to_string()).collect();
        assert_eq!(v["tokens"].as_array().unwrap().len(), ids.len());
        let mut args = vec!["tokenizer", "decode", "--tokenizer", s(&tok)];
        args.extend(ids.iter().map(String::as_str));
        let back = cllm(&args);
        assert_ok(&back);
        assert_eq!(text(&back.stdout), sample);
    }
    let plain = cllm(&["tokenizer", "encode", "--tokenizer", s(&tok), "Speak, speak."]);
    assert_ok(&plain);
    assert!(text(&plain.stdout).trim().split(' ').all(|id| id.parse::<u32>().is_ok()), "{}", text(&plain.stdout));
}

#[test]
fn bad_tokenizer_input_is_one_line_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let tok = trained(dir.path());
    let err = assert_fails(&cllm(&["tokenizer", "decode", "--tokenizer", s(&tok), "1", "999999"]), 1);
    assert!(err.contains("999999"), "{err}");
    let err = assert_fails(&cllm(&["tokenizer", "decode", "--tokenizer", s(&tok), "-4"]), 2);
    assert!(err.contains("-4"), "{err}");
    let junk = dir.path().join("junk.json");
    std::fs::write(&junk, b"{\"not\": \"a tokenizer\"}").unwrap();
    let err = assert_fails(&cllm(&["tokenizer", "encode", "--tokenizer", s(&junk), "x"]), 1);
    assert!(err.contains("junk.json"), "{err}");
    let binary = dir.path().join("binary.txt");
    std::fs::write(&binary, [b'a', 0xff, b'b']).unwrap();
    let out = cllm(&["tokenizer", "train", "--data", s(&binary), "--vocab-size", "300", "--out", s(&junk)]);
    let err = assert_fails(&out, 1);
    assert!(err.contains("not UTF-8") && err.contains("offset 1"), "{err}");
    let out = cllm(&["tokenizer", "train", "--data", s(&binary), "--vocab-size", "10", "--out", s(&junk)]);
    let err = assert_fails(&out, 2);
    assert!(err.contains("--vocab-size 10"), "{err}");
}
