//! SQuAD conversion: the quirks of real files are accepted, malformed input is rejected with the
//! JSON path, and the real (Portuguese, machine-translated) dev set converts with known counts.

use std::path::{Path, PathBuf};

use cllm::data::{convert_squad_file, squad_to_text, SquadStats};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/squad").join(name)
}

fn convert(json: &str) -> (String, SquadStats) {
    match squad_to_text(json.as_bytes()) {
        Ok((text, stats)) => (String::from_utf8(text).expect("output is UTF-8"), stats),
        Err(e) => panic!("conversion failed: {e}"),
    }
}

fn convert_err(json: &str) -> String {
    match squad_to_text(json.as_bytes()) {
        Ok((text, _)) => panic!("expected an error, got text: {}", String::from_utf8_lossy(&text)),
        Err(e) => e.to_string(),
    }
}

/// One article, one paragraph with `context`, and the given `qas` JSON.
fn one_paragraph(context: &str, qas: &str) -> String {
    format!(r#"{{"data": [{{"title": "T", "paragraphs": [{{"context": {context:?}, "qas": {qas}}}]}}]}}"#)
}

fn segment(context: &str, question: &str, answer: &str) -> String {
    format!("Context: {context}\nQuestion: {question}\nAnswer: {answer}\n\n")
}

#[test]
fn segment_layout_is_context_question_answer() {
    let json = one_paragraph(
        "The sky is blue.",
        r#"[{"question": "What colour is the sky?", "answers": [{"text": "blue", "answer_start": 11}]},
            {"question": "Why?", "answers": [{"text": "Rayleigh scattering", "answer_start": 0}], "is_impossible": false}]"#,
    );
    let (text, stats) = convert(&json);
    let expected = segment("The sky is blue.", "What colour is the sky?", "blue")
        + &segment("The sky is blue.", "Why?", "Rayleigh scattering");
    assert_eq!(text, expected);
    assert_eq!(stats.bytes, expected.len() as u64);
    assert_eq!((stats.articles, stats.paragraphs, stats.questions), (1, 1, 2));
}

#[test]
fn uses_first_answer_text() {
    let json = one_paragraph(
        "abc def",
        r#"[{"question": "q", "answers": [{"text": "abc", "answer_start": 0}, {"text": "abc def", "answer_start": 0}]}]"#,
    );
    assert_eq!(convert(&json).0, segment("abc def", "q", "abc"));
}

#[test]
fn accepts_unanswerable_question_without_answers_key() {
    let json = one_paragraph(
        "ctx",
        r#"[{"question": "q", "id": "x", "is_impossible": true,
             "plausible_answers": [{"text": "ctx", "answer_start": 0}]}]"#,
    );
    let (text, stats) = convert(&json);
    assert_eq!(text, segment("ctx", "q", "(none)"));
    assert_eq!(stats.unanswerable, 1);
    assert_eq!(stats.offset_mismatches, 0);
}

#[test]
fn accepts_missing_answers_key_without_is_impossible() {
    let (text, stats) = convert(&one_paragraph("ctx", r#"[{"question": "q"}]"#));
    assert_eq!(text, segment("ctx", "q", "(none)"));
    assert_eq!(stats.unanswerable, 1);
}

#[test]
fn empty_answer_list_writes_none() {
    let (text, stats) = convert(&one_paragraph("ctx", r#"[{"question": "q", "answers": [], "is_impossible": false}]"#));
    assert_eq!(text, segment("ctx", "q", "(none)"));
    assert_eq!(stats.unanswerable, 1);
}

#[test]
fn is_impossible_writes_none_even_with_answers() {
    let (text, stats) = convert(&one_paragraph(
        "ctx",
        r#"[{"question": "q", "answers": [{"text": "ctx", "answer_start": 0}], "is_impossible": true}]"#,
    ));
    assert_eq!(text, segment("ctx", "q", "(none)"));
    assert_eq!(stats.unanswerable, 1);
}

#[test]
fn missing_is_impossible_means_answerable() {
    let (text, stats) =
        convert(&one_paragraph("ctx", r#"[{"question": "q", "answers": [{"text": "ctx", "answer_start": 0}]}]"#));
    assert_eq!(text, segment("ctx", "q", "ctx"));
    assert_eq!(stats.unanswerable, 0);
}

#[test]
fn null_answers_and_is_impossible_count_as_absent() {
    let (text, stats) = convert(&one_paragraph(
        "ctx",
        r#"[{"question": "q", "answers": null, "is_impossible": null, "plausible_answers": null}]"#,
    ));
    assert_eq!(text, segment("ctx", "q", "(none)"));
    assert_eq!(stats.unanswerable, 1);
}

#[test]
fn accepts_missing_version_key() {
    // `one_paragraph` never writes a version; this pins that a version is also not required
    // when other top-level keys are present.
    let json = r#"{"data": [{"paragraphs": [{"context": "c", "qas": [{"question": "q"}]}]}], "lang": "pt"}"#;
    assert_eq!(convert(json).1.questions, 1);
}

#[test]
fn accepts_float_answer_start() {
    let (text, stats) = convert(&one_paragraph(
        "hello world",
        r#"[{"question": "q", "answers": [{"text": "world", "answer_start": 6.0}]}]"#,
    ));
    assert_eq!(text, segment("hello world", "q", "world"));
    assert_eq!(stats.offset_mismatches, 0);
}

#[test]
fn accepts_offset_mismatch_and_counts_it() {
    let (text, stats) = convert(&one_paragraph(
        "hello world",
        r#"[{"question": "q", "answers": [{"text": "world", "answer_start": 3}]}]"#,
    ));
    assert_eq!(text, segment("hello world", "q", "world"));
    assert_eq!(stats.offset_mismatches, 1);
}

#[test]
fn negative_or_missing_answer_start_counts_as_mismatch() {
    let (text, stats) = convert(&one_paragraph(
        "hello world",
        r#"[{"question": "q1", "answers": [{"text": "world", "answer_start": -1}]},
            {"question": "q2", "answers": [{"text": "hello"}]},
            {"question": "q3", "answers": [{"text": "hello", "answer_start": 99999999999999999999}]}]"#,
    ));
    assert!(text.ends_with("Answer: hello\n\n"));
    assert_eq!(stats.offset_mismatches, 3);
}

#[test]
fn plausible_answer_offsets_are_counted() {
    let (_, stats) = convert(&one_paragraph(
        "hello world",
        r#"[{"question": "q", "is_impossible": true, "answers": [],
             "plausible_answers": [{"text": "world", "answer_start": -1}]}]"#,
    ));
    assert_eq!(stats.offset_mismatches, 1);
}

#[test]
fn offsets_count_characters_not_bytes() {
    // "ção" is 3 characters but 5 bytes: a byte offset would not match.
    let (_, stats) = convert(&one_paragraph(
        "ção mundo",
        r#"[{"question": "q", "answers": [{"text": "mundo", "answer_start": 4}]}]"#,
    ));
    assert_eq!(stats.offset_mismatches, 0);
}

#[test]
fn blank_answer_text_falls_back_to_next_answer() {
    let (text, stats) = convert(&one_paragraph(
        "abc",
        r#"[{"question": "q", "answers": [{"text": " ", "answer_start": -1}, {"text": "abc", "answer_start": 0}]}]"#,
    ));
    assert_eq!(text, segment("abc", "q", "abc"));
    assert_eq!(stats.blank_answers, 0);
}

#[test]
fn only_blank_answers_write_none_and_are_counted() {
    let (text, stats) =
        convert(&one_paragraph("abc", r#"[{"question": "q", "answers": [{"text": "", "answer_start": -1}]}]"#));
    assert_eq!(text, segment("abc", "q", "(none)"));
    assert_eq!(stats.blank_answers, 1);
    assert_eq!(stats.unanswerable, 0);
    // Empty text cannot miss the context.
    assert_eq!(stats.offset_mismatches, 0);
}

#[test]
fn surrounding_whitespace_is_trimmed() {
    let (text, _) = convert(&one_paragraph(
        "  ctx\n",
        r#"[{"question": " q? ", "answers": [{"text": " ctx ", "answer_start": 1}]}]"#,
    ));
    assert_eq!(text, segment("ctx", "q?", "ctx"));
}

#[test]
fn keys_may_come_in_any_order() {
    let json = r#"{"data": [{"paragraphs": [{"qas": [{"answers": [{"answer_start": 0, "text": "c"}], "question": "q"}], "context": "c"}], "title": "t"}], "version": "v2.0"}"#;
    assert_eq!(convert(json).0, segment("c", "q", "c"));
}

#[test]
fn accepts_pretty_printed_v11_with_trailing_whitespace() {
    let json = std::fs::read_to_string(fixture("v11_pretty.json")).expect("fixture");
    assert!(json.ends_with("   \n\n"), "fixture keeps its trailing whitespace");
    let (text, stats) = convert(&json);
    let ctx = "Rust is a systems programming language. Its compiler is written in Rust.";
    let expected = segment(ctx, "What kind of language is Rust?", "systems programming language")
        + &segment(ctx, "What is the compiler written in?", "Rust")
        + &segment("A byte has eight bits.", "How many bits are in a byte?", "eight");
    assert_eq!(text, expected);
    assert_eq!(
        stats,
        SquadStats {
            articles: 2,
            paragraphs: 2,
            questions: 3,
            unanswerable: 0,
            blank_answers: 0,
            offset_mismatches: 1,
            bytes: expected.len() as u64,
        }
    );
}

#[test]
fn accepts_utf8_byte_order_mark() {
    let json = format!("\u{feff}{}", one_paragraph("c", r#"[{"question": "q"}]"#));
    assert_eq!(convert(&json).1.questions, 1);
}

#[test]
fn real_excerpt_converts_with_expected_counts() {
    // First 9 paragraphs of the shared squad-v2.0-dev-pt.json, unchanged. The expected values
    // come from an independent Python implementation of the documented layout.
    let json = std::fs::read(fixture("pt_excerpt.json")).expect("fixture");
    let (text, stats) = squad_to_text(&json).expect("converts");
    assert_eq!(
        stats,
        SquadStats {
            articles: 1,
            paragraphs: 9,
            questions: 52,
            unanswerable: 31,
            blank_answers: 1,
            offset_mismatches: 1,
            bytes: 46541,
        }
    );
    assert_eq!(cllm::data::sha256_hex(&text), "b46b5cef799b4a910eda08c50ed7f901d20727aef7e93e525425818fc2789609");
    let text = String::from_utf8(text).expect("UTF-8");
    assert!(text.starts_with("Context: Os normandos (normandos: nourmands; francês: normandos;"));
    assert!(text.contains("\nQuestion: Em que país a Normandia está localizada?\nAnswer: França.\n\n"));
}

// ---------------------------------------------------------------------------------------------
// Malformed input: rejected, with the JSON path.

/// Three articles; the last has two paragraphs with three questions, so paths have non-zero
/// indices at every level. `last_qa` is the third question of the second paragraph.
fn nested(second_context: &str, last_qa: &str) -> String {
    let ok_para = r#"{"context": "c", "qas": [{"question": "q", "answers": [{"text": "c", "answer_start": 0}]}]}"#;
    format!(
        r#"{{"data": [{{"paragraphs": [{ok_para}]}}, {{"paragraphs": [{ok_para}]}},
            {{"paragraphs": [{ok_para}, {{"context": {second_context}, "qas": [{{"question": "a"}}, {{"question": "b"}}, {last_qa}]}}]}}]}}"#
    )
}

#[test]
fn rejects_missing_question_with_path() {
    let e = convert_err(&nested(r#""c""#, r#"{"id": "x", "answers": []}"#));
    assert!(e.starts_with(r#"data[2].paragraphs[1].qas[2]: missing "question""#), "{e}");
}

#[test]
fn rejects_context_of_wrong_type_with_path() {
    let e = convert_err(&nested("42", r#"{"question": "c"}"#));
    assert!(e.starts_with("data[2].paragraphs[1].context: expected a string"), "{e}");
}

#[test]
fn rejects_question_of_wrong_type_with_path() {
    let e = convert_err(&nested(r#""c""#, r#"{"question": ["c"]}"#));
    assert!(e.starts_with("data[2].paragraphs[1].qas[2].question: expected a string"), "{e}");
}

#[test]
fn malformed_error_gives_line_and_column() {
    let json = "{\"data\": [{\"paragraphs\": [\n  {\"context\": \"c\",\n   \"qas\": [{\"id\": 1}]}]}]}";
    let e = convert_err(json);
    assert!(e.starts_with(r#"data[0].paragraphs[0].qas[0]: missing "question""#), "{e}");
    assert!(e.contains("(line 3,"), "{e}");
}

#[test]
fn rejects_missing_context_with_path() {
    let e = convert_err(r#"{"data": [{"paragraphs": [{"qas": []}]}]}"#);
    assert!(e.starts_with(r#"data[0].paragraphs[0]: missing "context""#), "{e}");
}

#[test]
fn rejects_missing_qas_with_path() {
    let e = convert_err(r#"{"data": [{"paragraphs": [{"context": "c", "qas": []}, {"context": "c"}]}]}"#);
    assert!(e.starts_with(r#"data[0].paragraphs[1]: missing "qas""#), "{e}");
}

#[test]
fn rejects_qas_of_wrong_type_with_path() {
    let e = convert_err(r#"{"data": [{"paragraphs": [{"context": "c", "qas": {}}]}]}"#);
    assert!(e.starts_with("data[0].paragraphs[0].qas: expected an array"), "{e}");
}

#[test]
fn rejects_later_article_without_paragraphs_with_path() {
    let e =
        convert_err(r#"{"data": [{"paragraphs": [{"context": "c", "qas": [{"question": "q"}]}]}, {"title": "x"}]}"#);
    assert!(e.starts_with(r#"data[1]: missing "paragraphs""#), "{e}");
}

#[test]
fn rejects_paragraph_that_is_not_an_object_with_path() {
    let e = convert_err(r#"{"data": [{"paragraphs": ["text"]}]}"#);
    assert!(e.starts_with("data[0].paragraphs[0]: expected a paragraph object"), "{e}");
}

#[test]
fn rejects_question_that_is_not_an_object_with_path() {
    let e = convert_err(&one_paragraph("c", r#"["what?"]"#));
    assert!(e.starts_with("data[0].paragraphs[0].qas[0]: expected a question object"), "{e}");
}

#[test]
fn rejects_answer_without_text_with_path() {
    let e =
        convert_err(&one_paragraph("c", r#"[{"question": "q"}, {"question": "q", "answers": [{"answer_start": 0}]}]"#));
    assert!(e.starts_with(r#"data[0].paragraphs[0].qas[1].answers[0]: missing "text""#), "{e}");
}

#[test]
fn rejects_answers_that_are_not_an_array_with_path() {
    // The Hugging Face `datasets` layout, not SQuAD's.
    let e = convert_err(&one_paragraph("c", r#"[{"question": "q", "answers": {"text": ["c"], "answer_start": [0]}}]"#));
    assert!(e.starts_with("data[0].paragraphs[0].qas[0].answers: expected an array"), "{e}");
}

#[test]
fn rejects_string_answer_start_with_path() {
    let e = convert_err(&one_paragraph("c", r#"[{"question": "q", "answers": [{"text": "c", "answer_start": "0"}]}]"#));
    assert!(e.starts_with("data[0].paragraphs[0].qas[0].answers[0].answer_start: expected an integer"), "{e}");
}

#[test]
fn rejects_fractional_answer_start_with_path() {
    let e = convert_err(&one_paragraph(
        "c",
        r#"[{"question": "q", "plausible_answers": [{"text": "c", "answer_start": 0.5}]}]"#,
    ));
    assert!(
        e.starts_with("data[0].paragraphs[0].qas[0].plausible_answers[0].answer_start: expected an integer"),
        "{e}"
    );
}

#[test]
fn rejects_is_impossible_of_wrong_type_with_path() {
    let e = convert_err(&one_paragraph("c", r#"[{"question": "q", "is_impossible": "yes"}]"#));
    assert!(e.starts_with("data[0].paragraphs[0].qas[0].is_impossible: expected true or false"), "{e}");
}

#[test]
fn rejects_json_without_data_array() {
    let e = convert_err(r#"{"version": "1.1", "articles": []}"#);
    assert_eq!(e, r#"not a SQuAD file: top-level "data" array missing"#);
}

#[test]
fn rejects_json_whose_data_is_not_an_array() {
    let e = convert_err(r#"{"data": {"paragraphs": []}}"#);
    assert!(e.starts_with("not a SQuAD file:"), "{e}");
}

#[test]
fn rejects_top_level_array() {
    let e = convert_err(r#"[1, 2, 3]"#);
    assert!(e.starts_with("not a SQuAD file:"), "{e}");
}

#[test]
fn rejects_articles_without_paragraphs() {
    let e = convert_err(r#"{"data": [{"title": "x", "text": "y"}]}"#);
    assert!(e.starts_with("not a SQuAD file:"), "{e}");
}

#[test]
fn rejects_invalid_json_with_line_and_column() {
    let e = convert_err("{\"data\": [\n  {\"paragraphs\": [}\n]}");
    assert!(e.starts_with("invalid JSON: "), "{e}");
    assert!(e.contains("line 2 column"), "{e}");
}

#[test]
fn rejects_truncated_json() {
    let json = one_paragraph("c", r#"[{"question": "q"}]"#);
    let e = convert_err(&json[..json.len() - 3]);
    assert!(e.starts_with("invalid JSON: EOF"), "{e}");
}

#[test]
fn rejects_trailing_garbage() {
    let json = one_paragraph("c", r#"[{"question": "q"}]"#) + " x";
    assert!(convert_err(&json).starts_with("invalid JSON: trailing characters"));
}

#[test]
fn rejects_file_without_questions() {
    let e = convert_err(r#"{"data": [{"paragraphs": [{"context": "c", "qas": []}]}]}"#);
    assert_eq!(e, "SQuAD file has no questions");
}

#[test]
fn errors_are_one_line() {
    for json in
        ["{\"data\": [\n{\"paragraphs\": [\n{\"context\": 1, \"qas\": []}]}]}", "{\n\"x\": 1\n}", "{\n\"data\": [\n"]
    {
        let e = convert_err(json);
        assert!(!e.contains('\n'), "{e:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Files

#[test]
fn convert_squad_file_writes_text_and_returns_stats() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out.txt");
    std::fs::write(&out, "old contents").expect("write");
    let stats = convert_squad_file(&fixture("pt_excerpt.json"), &out).expect("converts");
    let text = std::fs::read(&out).expect("read");
    assert_eq!(stats.questions, 52);
    assert_eq!(text.len() as u64, stats.bytes);
    let expected = squad_to_text(&std::fs::read(fixture("pt_excerpt.json")).expect("fixture")).expect("converts").0;
    assert_eq!(text, expected);
    let names: Vec<_> =
        std::fs::read_dir(dir.path()).expect("read_dir").map(|e| e.expect("entry").file_name()).collect();
    assert_eq!(names, ["out.txt"], "no temporary file left behind");
}

#[test]
fn convert_squad_file_failure_keeps_old_output_and_names_input() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("bad.json");
    std::fs::write(&input, r#"{"data": [{"paragraphs": [{"context": 3, "qas": []}]}]}"#).expect("write");
    let out = dir.path().join("out.txt");
    std::fs::write(&out, "old contents").expect("write");
    let e = convert_squad_file(&input, &out).expect_err("malformed").to_string();
    assert!(e.starts_with(&format!("{}: data[0].paragraphs[0].context: expected a string", input.display())), "{e}");
    assert_eq!(std::fs::read(&out).expect("read"), b"old contents");
    assert_eq!(std::fs::read_dir(dir.path()).expect("read_dir").count(), 2);
}

#[test]
fn convert_squad_file_names_missing_input() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("nope.json");
    let e = convert_squad_file(&input, &dir.path().join("out.txt")).expect_err("missing");
    assert_eq!(e.to_string(), format!("{}: no such file", input.display()));
}

#[test]
fn convert_squad_file_names_unwritable_output() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("no/such/dir/out.txt");
    let e = convert_squad_file(&fixture("pt_excerpt.json"), &out).expect_err("unwritable");
    assert!(e.to_string().contains("no/such/dir/out.txt"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// The full shared file and the 40 MB budget (need /work/shared; skipped elsewhere).

const SHARED_PT: &str = "/work/shared/data/squad-v2.0-dev-pt.json";

#[test]
fn shared_pt_dev_set_counts() {
    let Ok(json) = std::fs::read(SHARED_PT) else {
        eprintln!("skipped: {SHARED_PT} not present");
        return;
    };
    let (_, stats) = squad_to_text(&json).expect("converts");
    assert_eq!(
        stats,
        SquadStats {
            articles: 35,
            paragraphs: 1204,
            questions: 11873,
            unanswerable: 5945,
            blank_answers: 113,
            offset_mismatches: 300,
            bytes: 11_686_170,
        }
    );
}

/// The performance budget (40 MB in under 10 s, under 600 MB peak) is measured, not asserted:
/// `cargo test --release --test data_squad -- --ignored --nocapture squad_40mb_budget`, or
/// `/usr/bin/time -v` on a binary calling `convert_squad_file` for peak memory.
#[test]
#[ignore = "measurement; run by hand in release mode"]
fn squad_40mb_budget() {
    let Ok(json) = std::fs::read(SHARED_PT) else {
        eprintln!("skipped: {SHARED_PT} not present");
        return;
    };
    // Splice the articles 11 times into one `data` array (~42 MB).
    let text = String::from_utf8(json).expect("UTF-8");
    let open = text.find('[').expect("data array") + 1;
    let close = text.rfind(']').expect("data array");
    let articles = &text[open..close];
    let mut big = String::with_capacity(articles.len() * 11 + 32);
    big.push_str(&text[..open]);
    for i in 0..11 {
        if i > 0 {
            big.push_str(", ");
        }
        big.push_str(articles);
    }
    big.push_str(&text[close..]);
    let start = std::time::Instant::now();
    let (out, stats) = squad_to_text(big.as_bytes()).expect("converts");
    eprintln!(
        "{:.1} MB of JSON -> {:.1} MB of text in {:.3} s: {stats}",
        big.len() as f64 / 1e6,
        out.len() as f64 / 1e6,
        start.elapsed().as_secs_f64()
    );
    assert_eq!(stats.questions, 11 * 11873);
}
