//! `cllm train --tokenizer FILE` through the real binary: a BPE trained here round-trips the
//! text, training with it lowers the loss, every checkpoint holds its `tokenizer.json`, eval and
//! generate use it, the token cache is reused and re-made (saying so), a vocabulary that does
//! not cover the tokenizer is an error, and bits per byte come out exactly on a constructed
//! tokenizer.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_fails, assert_ok, cllm, s, text};

/// The first 60 kB of tiny Shakespeare, written to `dir/data.txt`.
fn data(dir: &Path) -> PathBuf {
    let path = dir.join("data.txt");
    std::fs::write(&path, &cllm::data::TINY_SHAKESPEARE[..60_000]).unwrap();
    path
}

/// A byte-level BPE of `vocab` tokens trained on `data`, written to `dir/NAME`.
fn tokenizer(dir: &Path, data: &Path, vocab: usize, name: &str) -> PathBuf {
    let tok = dir.join(name);
    let v = vocab.to_string();
    assert_ok(&cllm(&["tokenizer", "train", "--data", s(data), "--vocab-size", &v, "--out", s(&tok)]));
    tok
}

fn json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out.stdout)))
}

#[test]
fn training_with_a_bpe_lowers_the_loss_and_checkpoints_eval_and_generate_use_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = data(dir.path());
    let tok = tokenizer(dir.path(), &data, 400, "tok.json");
    let sample = "ROMEO:\nWhat, art thou hurt? ünïcödé 🎭\n";
    let enc = cllm(&["tokenizer", "encode", "--tokenizer", s(&tok), "--json", sample]);
    let ids: Vec<String> = json(&enc)["ids"].as_array().unwrap().iter().map(|i| i.to_string()).collect();
    let mut args = vec!["tokenizer", "decode", "--tokenizer", s(&tok)];
    args.extend(ids.iter().map(String::as_str));
    assert_eq!(text(&cllm(&args).stdout), sample, "the text round-trips exactly");

    let out = dir.path().join("run");
    let train = |steps: &str, extra: &[&str]| {
        let mut a = vec!["train", "--config", "tiny", "--data", s(&data), "--out", s(&out), "--steps", steps];
        a.extend_from_slice(&["--eval-every", "0", "--lr", "3e-3", "--threads", "2", "--json"]);
        a.extend_from_slice(extra);
        cllm(&a)
    };
    let first = train("300", &["--tokenizer", s(&tok)]);
    assert_ok(&first);
    assert!(text(&first.stderr).contains("tokenized: "), "{}", text(&first.stderr));
    let v = json(&first);
    let (loss, val) = (v["final_loss"].as_f64().unwrap(), v["val_loss"].as_f64().unwrap());
    let start = 400f64.ln();
    assert!(loss < 0.8 * start && val < 0.8 * start, "loss {loss}, val {val} from ln 400 = {start}");
    let bpb = v["val_bits_per_byte"].as_f64().unwrap();
    assert!(bpb < val / std::f64::consts::LN_2 / 1.5, "tokens cover several bytes: {bpb} bits/byte, {val} nats");

    let step = out.join("step-000300");
    assert_eq!(std::fs::read(step.join("tokenizer.json")).unwrap(), std::fs::read(&tok).unwrap());
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(step.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["vocab_size"], 400, "the vocabulary comes from the tokenizer");
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(step.join("state.json")).unwrap()).unwrap();
    assert!(state["files"]["tokenizer.json"].is_string(), "{state}");
    assert!(out.join("tokens.bin").is_file());

    let eval = cllm(&["eval", "--checkpoint", s(&out), "--data", s(&data), "--json", "--threads", "2"]);
    assert_ok(&eval);
    let e = json(&eval);
    let (eloss, ebpb) = (e["loss"].as_f64().unwrap(), e["bits_per_byte"].as_f64().unwrap());
    assert!(eloss.is_finite() && ebpb < eloss / std::f64::consts::LN_2, "{e}");
    let plain = cllm(&["eval", "--checkpoint", s(&step), "--data", s(&data), "--max-windows", "3"]);
    assert!(text(&plain.stdout).contains("nats/token"), "{}", text(&plain.stdout));

    let gen = |seed: &str| {
        let g = cllm(&["generate", "--checkpoint", s(&out), "--prompt", "ROMEO:", "--tokens", "30", "--seed", seed]);
        assert_ok(&g);
        String::from_utf8(g.stdout).expect("byte-level BPE tokens are whole text here")
    };
    let (a, b) = (gen("3"), gen("3"));
    assert_eq!(a, b);
    assert!(a.starts_with("ROMEO:") && a.len() > "ROMEO:".len() + 30, "30 tokens of text: {a:?}");

    // Resuming uses the checkpoint's tokenizer and the cached tokens.
    let resumed = cllm(&["train", "--resume", s(&out), "--steps", "310", "--json"]);
    assert_ok(&resumed);
    assert!(text(&resumed.stderr).contains("read from the cache"), "{}", text(&resumed.stderr));
    let other = tokenizer(dir.path(), &data, 300, "other.json");
    let err = assert_fails(&cllm(&["train", "--resume", s(&out), "--steps", "320", "--tokenizer", s(&other)]), 2);
    assert!(err.contains("not the checkpoint's tokenizer"), "{err}");
}

#[test]
fn the_token_cache_is_reused_and_re_made_for_another_tokenizer_saying_so() {
    let dir = tempfile::tempdir().unwrap();
    let data = data(dir.path());
    let (a, b) = (tokenizer(dir.path(), &data, 300, "a.json"), tokenizer(dir.path(), &data, 320, "b.json"));
    let out = dir.path().join("run");
    let run = |tok: &Path, quiet: bool| {
        // A new run may start in a directory without checkpoints; the cache stays.
        for d in ["step-000002", "best"] {
            let _ = std::fs::remove_dir_all(out.join(d));
        }
        let mut args = vec!["train", "--config", "tiny", "--data", s(&data), "--out", s(&out), "--steps", "2"];
        args.extend_from_slice(&["--tokenizer", s(tok), "--eval-every", "0", "--json"]);
        if quiet {
            args.push("--quiet");
        }
        let o = cllm(&args);
        assert_ok(&o);
        text(&o.stderr)
    };
    assert!(run(&a, false).contains("tokenized: "));
    let cached = std::fs::read(out.join("tokens.bin")).unwrap();
    assert!(run(&a, false).contains("read from the cache"));
    let err = run(&b, true);
    assert!(err.contains("re-tokenizing: ") && err.contains("made with tokenizer"), "even with --quiet: {err}");
    assert_ne!(std::fs::read(out.join("tokens.bin")).unwrap(), cached, "re-made for b");
    assert!(run(&b, false).contains("read from the cache"));
    std::fs::write(out.join("tokens.bin"), b"CLLMTOK\ngarbage").unwrap();
    assert!(run(&b, false).contains("re-tokenizing: "));
}

#[test]
fn vocabulary_errors_non_utf8_data_and_squad_through_a_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let data = data(dir.path());
    let tok = tokenizer(dir.path(), &data, 400, "tok.json");
    let out = dir.path().join("run");
    let base = ["train", "--config", "tiny", "--data", s(&data), "--out", s(&out), "--tokenizer", s(&tok)];
    let mut args = base.to_vec();
    args.extend_from_slice(&["--vocab-size", "300"]);
    let err = assert_fails(&cllm(&args), 2);
    assert!(err.contains("300") && err.contains("400"), "{err}");
    let mut args = base.to_vec();
    args.extend_from_slice(&["--vocab-size", "512", "--dry-run", "--json"]);
    let plan = cllm(&args);
    assert_ok(&plan);
    assert_eq!(json(&plan)["model"]["vocab"], 512, "a larger vocabulary is allowed");
    // SQuAD goes through the tokenizer as its formatted text.
    let squad = "tests/fixtures/squad/v11_pretty.json";
    let mut args = vec!["train", "--config", "tiny", "--data", squad, "--tokenizer", s(&tok), "--steps", "2"];
    args.extend_from_slice(&["--val-fraction", "0", "--out", s(&out), "--quiet", "--json"]);
    let run = cllm(&args);
    assert_ok(&run);
    let state = std::fs::read(out.join("step-000002").join("state.json")).unwrap();
    let state: serde_json::Value = serde_json::from_slice(&state).unwrap();
    assert_eq!(state["data"]["format"], "squad");
    let tokens = state["data"]["tokens"]["tokens"].as_u64().unwrap();
    assert!(tokens > 17 && tokens < state["data"]["bytes"].as_u64().unwrap(), "{state}");
    let binary = dir.path().join("binary.txt");
    std::fs::write(&binary, [b'a'; 100].iter().chain(&[0xff]).chain(&[b'b'; 100]).copied().collect::<Vec<u8>>())
        .unwrap();
    let err = assert_fails(&cllm(&["train", "--data", s(&binary), "--tokenizer", s(&tok), "--dry-run"]), 1);
    assert!(err.contains("not UTF-8") && err.contains("offset 100"), "{err}");
}

/// A hand-written byte-level BPE: the 256 byte symbols (id = byte), then `ab` (256) and `abab`
/// (257). "abab abab\n" is exactly 257 32 257 10 (`abab`, `Ġ`, `abab`, `Ċ`): 4, 1, 4, 1 bytes.
fn constructed_tokenizer(path: &Path) {
    let mut vocab = serde_json::Map::new();
    for b in 0..=255u8 {
        vocab.insert(cllm::tokenizer::byte_symbol(b).to_string(), b.into());
    }
    vocab.insert("ab".into(), 256.into());
    vocab.insert("abab".into(), 257.into());
    let byte_level =
        serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": byte_level, "post_processor": null, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": ["a b", "ab ab"]},
    });
    std::fs::write(path, serde_json::to_vec(&json).unwrap()).unwrap();
}

/// A model whose token embedding is zero predicts every one of its 512 tokens with probability
/// 1/512: ln 512 nats, 9 bits, per token. "abab abab\n" ten times is 40 tokens; with context 16,
/// eval reads 2 windows predicting tokens 1..=32, which cover 8 · (4+1+4+1) = 80 bytes: bits per
/// byte = 32 · 9 / 80 = 3.6 exactly.
#[test]
fn bits_per_byte_are_the_total_bits_over_the_bytes_the_predicted_tokens_cover() {
    let dir = tempfile::tempdir().unwrap();
    let tok = dir.path().join("tokenizer.json");
    constructed_tokenizer(&tok);
    let enc = cllm(&["tokenizer", "encode", "--tokenizer", s(&tok), "abab abab\n"]);
    assert_ok(&enc);
    assert_eq!(text(&enc.stdout).trim(), "257 32 257 10", "the known tokenization");

    let config = cllm::config::ModelConfig { vocab: 512, ..cllm::config::ModelConfig::tiny() };
    let mut model = cllm::model::Model::new(config, 1);
    let wte = model.layout.wte.clone();
    model.params[wte].fill(0.0);
    let bytes = cllm::model::weights::serialize_safetensors(&model).unwrap();
    std::fs::write(dir.path().join("model.safetensors"), bytes).unwrap();
    let data = dir.path().join("abab.txt");
    std::fs::write(&data, "abab abab\n".repeat(10)).unwrap();

    let out = cllm(&["eval", "--checkpoint", s(dir.path()), "--data", s(&data), "--json"]);
    assert_ok(&out);
    let v = json(&out);
    assert_eq!((v["windows"].as_u64(), v["tokens"].as_u64()), (Some(2), Some(32)), "{v}");
    let loss = v["loss"].as_f64().unwrap();
    assert!((loss - 512f64.ln()).abs() < 1e-6, "{loss}");
    let bpb = v["bits_per_byte"].as_f64().unwrap();
    assert!((bpb - 3.6).abs() < 1e-6, "{bpb}");

    // The same model without the tokenizer reads bytes: 9 bits per byte.
    std::fs::remove_file(&tok).unwrap();
    let v = json(&cllm(&["eval", "--checkpoint", s(dir.path()), "--data", s(&data), "--json"]));
    assert!((v["bits_per_byte"].as_f64().unwrap() - 9.0).abs() < 1e-6, "{v}");
}

/// A tokenized run stopped at step 3 and resumed to step 6 ends with the bytes of one that ran
/// 6 steps straight, at another thread count.
#[test]
fn a_resumed_tokenized_run_ends_with_the_bytes_of_an_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = data(dir.path());
    let tok = tokenizer(dir.path(), &data, 300, "tok.json");
    let train = |out: &Path, steps: &str, threads: &str| {
        let mut a = vec!["train", "--config", "tiny", "--data", s(&data), "--tokenizer", s(&tok), "--out", s(out)];
        a.extend_from_slice(&["--steps", "6", "--save-every", steps, "--threads", threads, "--quiet", "--json"]);
        assert_ok(&cllm(&a));
    };
    let (straight, split) = (dir.path().join("straight"), dir.path().join("split"));
    train(&straight, "0", "1");
    train(&split, "3", "2");
    let model = |d: &Path| std::fs::read(d.join("step-000006").join("model.safetensors")).unwrap();
    assert_eq!(model(&straight), model(&split), "same run, saved midway or not");
    std::fs::remove_dir_all(split.join("step-000006")).unwrap();
    let _ = std::fs::remove_dir_all(split.join("best"));
    let resumed = cllm(&["train", "--resume", s(&split.join("step-000003")), "--threads", "3", "--quiet", "--json"]);
    assert_ok(&resumed);
    assert_eq!(model(&straight), model(&split), "resumed at step 3");
}
