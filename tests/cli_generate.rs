//! `cllm generate` through the real binary.

use std::path::Path;

mod common;
use common::*;
// Named explicitly: a glob import cannot shadow the `cllm` crate name.
use common::cllm;

fn trained(dir: &Path) -> std::path::PathBuf {
    let out = dir.join("run");
    train_tiny(&out, &["--steps", "2"]);
    out.join("step-000002")
}

fn generate(ckpt: &Path, extra: &[&str]) -> Vec<u8> {
    let mut args = vec!["generate", "--checkpoint", s(ckpt)];
    args.extend_from_slice(extra);
    let o = cllm(&args);
    assert_ok(&o);
    o.stdout
}

#[test]
fn same_seed_gives_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = trained(dir.path());
    let a = generate(&ckpt, &["--prompt", "ROMEO:", "--tokens", "64", "--seed", "7"]);
    let b = generate(&ckpt, &["--prompt", "ROMEO:", "--tokens", "64", "--seed", "7"]);
    assert_eq!(a, b);
}

#[test]
fn different_seeds_give_different_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = trained(dir.path());
    let a = generate(&ckpt, &["--prompt", "ROMEO:", "--tokens", "64", "--seed", "1"]);
    let b = generate(&ckpt, &["--prompt", "ROMEO:", "--tokens", "64", "--seed", "2"]);
    assert_ne!(a, b);
}

#[test]
fn prints_the_prompt_then_exactly_n_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = trained(dir.path());
    let out = generate(&ckpt, &["--prompt", "ROMEO:", "--tokens", "40"]);
    assert!(out.starts_with(b"ROMEO:"));
    assert_eq!(out.len(), "ROMEO:".len() + 40);
}

#[test]
fn invalid_utf8_output_is_written_as_raw_bytes() {
    // A barely trained byte model at a high temperature emits bytes of every value.
    let dir = tempfile::tempdir().unwrap();
    let ckpt = trained(dir.path());
    let out = generate(&ckpt, &["--prompt", "x", "--tokens", "300", "--temperature", "2.0", "--seed", "3"]);
    assert_eq!(out.len(), 301);
    assert!(std::str::from_utf8(&out).is_err(), "expected invalid UTF-8 in the sample");
}

#[test]
fn greedy_output_does_not_depend_on_the_seed() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = trained(dir.path());
    let a = generate(&ckpt, &["--prompt", "the ", "--tokens", "30", "--temperature", "0", "--seed", "1"]);
    let b = generate(&ckpt, &["--prompt", "the ", "--tokens", "30", "--temperature", "0", "--seed", "99"]);
    assert_eq!(a, b);
}

#[test]
fn prompt_longer_than_the_context_slides() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = trained(dir.path());
    let prompt = "a long prompt, much longer than the sixteen bytes of the tiny model's context";
    let out = generate(&ckpt, &["--prompt", prompt, "--tokens", "20"]);
    assert_eq!(out.len(), prompt.len() + 20);
}

#[test]
fn top_k_one_equals_greedy() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = trained(dir.path());
    let a = generate(&ckpt, &["--prompt", "and ", "--tokens", "30", "--top-k", "1", "--temperature", "1.5"]);
    let b = generate(&ckpt, &["--prompt", "and ", "--tokens", "30", "--temperature", "0"]);
    assert_eq!(a, b);
}

#[test]
fn negative_temperature_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = trained(dir.path());
    assert_fails(&cllm(&["generate", "--checkpoint", s(&ckpt), "--temperature=-1"]), 2);
}

#[test]
fn empty_prompt_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = trained(dir.path());
    assert_fails(&cllm(&["generate", "--checkpoint", s(&ckpt), "--prompt", ""]), 2);
}

#[test]
fn truncated_model_file_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = trained(dir.path());
    let model = ckpt.join("model.safetensors");
    let bytes = std::fs::read(&model).unwrap();
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = assert_fails(&cllm(&["generate", "--checkpoint", s(&cut)]), 1);
    assert!(err.contains("cut.safetensors"), "{err}");
}

#[test]
fn bit_flipped_weights_in_a_checkpoint_directory_are_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = trained(dir.path());
    let model = ckpt.join("model.safetensors");
    let mut bytes = std::fs::read(&model).unwrap();
    let last = bytes.len() - 3;
    bytes[last] ^= 0x10;
    std::fs::write(&model, &bytes).unwrap();
    let err = assert_fails(&cllm(&["generate", "--checkpoint", s(&ckpt)]), 1);
    assert!(err.contains("model.safetensors") && err.contains("checksum"), "{err}");
}
