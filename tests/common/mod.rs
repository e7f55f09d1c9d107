//! Helpers shared by the tests that drive the real `cllm` binary.
#![allow(dead_code)] // each test crate uses its own subset

use std::path::Path;
use std::process::{Command, Output};

/// The binary with `args`, stdin closed and output captured, run under an address-space limit
/// of `limit` bytes (`setrlimit(RLIMIT_AS)` in the child before `exec`): a regression that
/// allocates from a declared size or an unchecked count fails with an allocation error instead
/// of eating the machine's memory.
pub fn cllm_with_memory_limit(args: &[&str], limit: u64) -> std::process::Command {
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cllm"));
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // SAFETY: the closure runs in the forked child before exec and calls only setrlimit, which
    // is async-signal-safe; it touches no memory shared with the parent.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit { rlim_cur: limit, rlim_max: limit };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

pub fn cllm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cllm")).args(args).output().expect("the cllm binary runs")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

pub fn assert_no_panic(out: &Output) {
    let err = text(&out.stderr);
    assert!(!err.contains("panicked") && !err.contains("internal error"), "panic in stderr: {err}");
    assert_ne!(out.status.code(), Some(101), "exit code of a panic; stderr: {err}");
}

pub fn assert_ok(out: &Output) {
    assert_no_panic(out);
    assert!(out.status.success(), "cllm failed ({:?}): {}", out.status.code(), text(&out.stderr));
}

/// A failure is exactly one `error: …` line on stderr with the given exit code.
pub fn assert_fails(out: &Output, code: i32) -> String {
    assert_no_panic(out);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr, got: {err}");
    assert!(lines[0].starts_with("error: "), "stderr: {err}");
    err
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// Trains the tiny model quietly into `out`.
pub fn train_tiny(out: &Path, extra: &[&str]) {
    let mut args = vec!["train", "--config", "tiny", "--out", s(out), "--quiet"];
    args.extend_from_slice(extra);
    assert_ok(&cllm(&args));
}

pub fn step_dirs(out: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(out)
        .expect("out dir exists")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect();
    v.sort();
    v
}

/// `state.json` bytes after `edit`, with `self_sha256` recomputed the way `checkpoint::save`
/// computes it (the SHA-256 of the file with that field set to 64 zeros), so that only the
/// validation of the values can catch the change.
pub fn resign_state_json(raw: &[u8], edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let mut st: serde_json::Value = serde_json::from_slice(raw).expect("state.json is JSON");
    edit(&mut st);
    let zeros = "0".repeat(64);
    st["self_sha256"] = zeros.clone().into();
    let mut json = serde_json::to_vec_pretty(&st).expect("serializes");
    json.push(b'\n');
    let hash = cllm::data::sha256_hex(&json);
    String::from_utf8(json).expect("JSON is UTF-8").replacen(&zeros, &hash, 1).into_bytes()
}

/// A safetensors file's tensors (name, dtype, shape, bytes), in name order, and its metadata.
pub type TensorList = Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>;

pub fn tensor_parts(bytes: &[u8]) -> (TensorList, std::collections::HashMap<String, String>) {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).expect("valid safetensors");
    let st = safetensors::SafeTensors::deserialize(bytes).expect("valid safetensors");
    let mut list: TensorList =
        st.tensors().into_iter().map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec())).collect();
    list.sort_by(|a, b| a.0.cmp(&b.0));
    (list, meta.metadata().clone().unwrap_or_default())
}

/// The safetensors bytes of `list` with `meta`.
pub fn tensor_bytes(list: &TensorList, meta: &std::collections::HashMap<String, String>) -> Vec<u8> {
    let views: Vec<(String, safetensors::tensor::TensorView)> = list
        .iter()
        .map(|(n, d, sh, data)| (n.clone(), safetensors::tensor::TensorView::new(*d, sh.clone(), data).expect("view")))
        .collect();
    safetensors::tensor::serialize(views, &Some(meta.clone())).expect("serializes")
}
