//! Loading a corpus (built-in, text, SQuAD), the data format flag, and the train/validation split.

use std::path::Path;

use cllm::data::{load_corpus, sha256_hex, split_bytes, Corpus, DataFormat, TINY_SHAKESPEARE, TINY_SHAKESPEARE_NAME};

const SQUAD: &str = r#"{"data": [{"paragraphs": [{"context": "c", "qas": [{"question": "q", "answers": [{"text": "c", "answer_start": 0}]}]}]}]}"#;

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write");
    path
}

fn load_err(path: &Path, format: DataFormat) -> String {
    load_corpus(Some(path), format).expect_err("should fail").to_string()
}

#[test]
fn no_path_loads_embedded_tiny_shakespeare() {
    let c = load_corpus(None, DataFormat::Auto).expect("built-in");
    assert_eq!(c.bytes, TINY_SHAKESPEARE);
    assert_eq!(c.len(), 1_115_394);
    assert_eq!(c.name, TINY_SHAKESPEARE_NAME);
    assert_eq!(c.format, DataFormat::Text);
    assert_eq!(c.hash, "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed");
    assert!(c.bytes.starts_with(b"First Citizen:\n"));
}

#[test]
fn text_file_is_read_as_raw_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bytes = [0xff, 0xfe, b'a', 0x00, 0x80, b'\n'];
    let path = write(dir.path(), "latin.bin", &bytes);
    let c = load_corpus(Some(&path), DataFormat::Auto).expect("loads");
    assert_eq!(c.bytes, bytes);
    assert_eq!(c.format, DataFormat::Text);
    assert_eq!(c.name, path.display().to_string());
    assert!(c.squad_stats.is_none());
}

#[test]
fn empty_file_is_an_error_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), "empty.txt", b"");
    assert_eq!(load_err(&path, DataFormat::Auto), format!("{}: file is empty", path.display()));
}

#[test]
fn missing_file_is_an_error_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("missing.txt");
    assert_eq!(load_err(&path, DataFormat::Text), format!("{}: no such file", path.display()));
}

#[test]
fn directory_is_an_error_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = load_err(dir.path(), DataFormat::Auto);
    assert_eq!(e, format!("{}: is a directory, expected a data file", dir.path().display()));
}

#[test]
fn auto_detects_squad() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), "train.json", SQUAD.as_bytes());
    let c = load_corpus(Some(&path), DataFormat::Auto).expect("loads");
    assert_eq!(c.format, DataFormat::Squad);
    assert_eq!(c.bytes, b"Context: c\nQuestion: q\nAnswer: c\n\n");
    assert_eq!(c.hash, sha256_hex(&c.bytes));
    assert_eq!(c.squad_stats.map(|s| s.questions), Some(1));
}

#[test]
fn auto_treats_other_json_as_text() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = br#"{"data": [1, 2], "name": "not squad"}"#;
    let path = write(dir.path(), "other.json", json);
    let c = load_corpus(Some(&path), DataFormat::Auto).expect("loads");
    assert_eq!(c.format, DataFormat::Text);
    assert_eq!(c.bytes, json);
}

#[test]
fn auto_treats_invalid_json_as_text() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = b"{ this is a code listing, not JSON }\n";
    let path = write(dir.path(), "code.txt", text);
    let c = load_corpus(Some(&path), DataFormat::Auto).expect("loads");
    assert_eq!(c.format, DataFormat::Text);
    assert_eq!(c.bytes, text);
}

#[test]
fn auto_reports_malformed_squad_instead_of_training_on_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path =
        write(dir.path(), "bad.json", br#"{"data": [{"paragraphs": [{"context": "c", "qas": [{"id": "1"}]}]}]}"#);
    let e = load_err(&path, DataFormat::Auto);
    assert!(e.starts_with(&format!("{}: data[0].paragraphs[0].qas[0]: missing \"question\"", path.display())), "{e}");
}

#[test]
fn auto_reports_truncated_squad() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), "cut.json", &SQUAD.as_bytes()[..SQUAD.len() - 4]);
    let e = load_err(&path, DataFormat::Auto);
    assert!(e.starts_with(&format!("{}: invalid JSON: EOF", path.display())), "{e}");
}

#[test]
fn squad_format_rejects_plain_text() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), "plain.txt", b"hello\n");
    let e = load_err(&path, DataFormat::Squad);
    assert!(e.starts_with(&format!("{}: invalid JSON: expected value at line 1", path.display())), "{e}");
}

#[test]
fn squad_format_rejects_other_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), "x.json", br#"{"rows": []}"#);
    assert_eq!(
        load_err(&path, DataFormat::Squad),
        format!("{}: not a SQuAD file: top-level \"data\" array missing", path.display())
    );
}

#[test]
fn text_format_keeps_squad_json_as_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), "train.json", SQUAD.as_bytes());
    let c = load_corpus(Some(&path), DataFormat::Text).expect("loads");
    assert_eq!(c.format, DataFormat::Text);
    assert_eq!(c.bytes, SQUAD.as_bytes());
}

#[test]
fn data_format_parses_and_displays() {
    for (s, f) in [
        ("auto", DataFormat::Auto),
        ("text", DataFormat::Text),
        ("squad", DataFormat::Squad),
        ("SQuAD", DataFormat::Squad),
    ] {
        assert_eq!(s.parse::<DataFormat>().expect("parses"), f);
    }
    for f in [DataFormat::Auto, DataFormat::Text, DataFormat::Squad] {
        assert_eq!(f.to_string().parse::<DataFormat>().expect("round trip"), f);
    }
    assert_eq!(DataFormat::default(), DataFormat::Auto);
}

#[test]
fn data_format_rejects_unknown_name() {
    let e = "csv".parse::<DataFormat>().expect_err("unknown");
    assert_eq!(e.to_string(), "unknown data format \"csv\" (expected auto, text or squad)");
}

#[test]
fn corpus_hash_is_sha256_hex() {
    let c = Corpus::from_bytes("abc", b"abc".to_vec(), DataFormat::Text);
    assert_eq!(c.hash, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

// ---------------------------------------------------------------------------------------------
// Split

#[test]
fn split_puts_last_fraction_in_validation() {
    let data: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
    let (train, val) = split_bytes(&data, 0.1, 16).expect("splits");
    assert_eq!(train.len(), 900);
    assert_eq!(val.len(), 100);
    assert_eq!(train, &data[..900]);
    assert_eq!(val, &data[900..]);
}

#[test]
fn split_rounds_validation_length_to_nearest_byte() {
    // 0.29 * 100 is 28.999... in f64.
    let data = vec![0u8; 100];
    let (train, val) = split_bytes(&data, 0.29, 16).expect("splits");
    assert_eq!((train.len(), val.len()), (71, 29));
}

#[test]
fn split_with_zero_fraction_has_no_validation() {
    let data = vec![7u8; 20];
    let (train, val) = split_bytes(&data, 0.0, 16).expect("splits");
    assert_eq!(train.len(), 20);
    assert!(val.is_empty());
}

#[test]
fn split_accepts_parts_of_exactly_one_window() {
    // 17 bytes hold one window of 16 (inputs 0..16, targets 1..17).
    let data = vec![0u8; 34];
    let (train, val) = split_bytes(&data, 0.5, 16).expect("splits");
    assert_eq!((train.len(), val.len()), (17, 17));
}

#[test]
fn split_rejects_validation_shorter_than_one_window() {
    let data = vec![0u8; 40];
    let e = split_bytes(&data, 0.4, 16).expect_err("too short").to_string();
    assert!(e.starts_with("validation split has 16 bytes"), "{e}");
    assert!(e.contains("at least 17"), "{e}");
}

#[test]
fn split_rejects_training_shorter_than_one_window() {
    let data = vec![0u8; 100];
    let e = split_bytes(&data, 0.9, 16).expect_err("too short").to_string();
    assert!(e.starts_with("training split has 10 bytes"), "{e}");
}

#[test]
fn split_rejects_fraction_out_of_range() {
    let data = vec![0u8; 100];
    for f in [-0.1, 1.0, 1.5, f64::NAN] {
        let e = split_bytes(&data, f, 4).expect_err("bad fraction").to_string();
        assert!(e.starts_with("validation fraction must be in [0, 1)"), "{e}");
    }
}

#[test]
fn split_rejects_zero_window() {
    assert!(split_bytes(&[0u8; 10], 0.1, 0).is_err());
}

#[test]
fn corpus_split_error_names_the_corpus() {
    let c = Corpus::from_bytes("small.txt", vec![1u8; 10], DataFormat::Text);
    let e = c.split(0.1, 16).expect_err("too short").to_string();
    assert!(e.starts_with("small.txt: training split has"), "{e}");
}

#[test]
fn tiny_shakespeare_splits_for_the_default_context() {
    let c = Corpus::tiny_shakespeare();
    let (train, val) = c.split(0.1, 128).expect("splits");
    assert_eq!(train.len() + val.len(), c.len());
    assert_eq!(val.len(), 111_539);
}
