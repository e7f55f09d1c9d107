//! Hostile files given to `eval`, `generate` and `train --resume`: declared sizes the file does
//! not back, absurd shapes and counters, invalid optimizer moments, ambiguous tensor names,
//! non-regular files, diverged weights. Each must end in one `error: …` line, fast.
//!
//! Every command runs under an address-space limit ([`MEMORY_LIMIT`], set with `setrlimit` in
//! the child before `exec`), so a regression that allocates from a declared size fails the test
//! with an allocation failure instead of eating the machine's memory, and under a timeout, so a
//! read that blocks fails it too.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use safetensors::tensor::Dtype;

mod common;
use common::{assert_fails, cllm_with_memory_limit, s, step_dirs, text, train_tiny};

/// The address space a command under test may use: a tiny model needs well under this, and
/// every bomb asks for far more.
const MEMORY_LIMIT: u64 = 2 << 30;
/// A hostile input is refused within this; a blocking read would hang forever.
const TIMEOUT: Duration = Duration::from_secs(60);

/// Runs the binary with `args` under [`MEMORY_LIMIT`] and [`TIMEOUT`].
fn limited(args: &[&str]) -> Output {
    let mut cmd = cllm_with_memory_limit(args, MEMORY_LIMIT);
    let mut child = cmd.spawn().expect("the cllm binary starts");
    let start = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if start.elapsed() > TIMEOUT {
            let _ = child.kill();
            panic!("cllm {args:?} still running after {TIMEOUT:?}: it hangs");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One error line containing every one of `needles`.
fn refused(out: &Output, needles: &[&str]) {
    let err = assert_fails(out, 1);
    for n in needles {
        assert!(err.contains(n), "expected {n:?} in: {err}");
    }
}

/// A trained tiny checkpoint (2 steps) in a fresh directory: (tempdir, run dir, step dir).
fn checkpoint() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    train_tiny(&out, &["--steps", "2", "--threads", "1"]);
    let step = out.join(&step_dirs(&out)[0]);
    (dir, out, step)
}

/// A safetensors file's tensors and metadata, to be changed and written back.
struct Tensors {
    list: common::TensorList,
    meta: HashMap<String, String>,
}

impl Tensors {
    fn read(path: &Path) -> Tensors {
        let (list, meta) = common::tensor_parts(&std::fs::read(path).unwrap());
        Tensors { list, meta }
    }

    fn write(&self, path: &Path) {
        std::fs::write(path, common::tensor_bytes(&self.list, &self.meta)).unwrap();
    }

    fn data_mut(&mut self, name: &str) -> &mut Vec<u8> {
        &mut self.list.iter_mut().find(|t| t.0 == name).unwrap().3
    }

    /// Sets one field of the config JSON in the metadata.
    fn set_config(&mut self, field: &str, value: serde_json::Value) {
        let mut c: serde_json::Value = serde_json::from_str(&self.meta["cllm.config"]).unwrap();
        c[field] = value;
        self.meta.insert("cllm.config".into(), c.to_string());
    }
}

/// Rewrites `state.json` of `step` after `edit`, with every checksum recomputed the way
/// `checkpoint::save` computes them (file hashes, then `self_sha256` over the file with that
/// field zeroed), so only the validation of the values can catch the change.
fn resign(step: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = step.join("state.json");
    let files: Vec<(&str, String)> = ["model.safetensors", "state.safetensors"]
        .into_iter()
        .map(|f| (f, cllm::data::sha256_hex(&std::fs::read(step.join(f)).unwrap())))
        .collect();
    let json = common::resign_state_json(&std::fs::read(&path).unwrap(), |st| {
        edit(st);
        for (f, h) in files {
            st["files"][f] = h.into();
        }
    });
    std::fs::write(&path, json).unwrap();
}

fn eval(ckpt: &Path) -> Output {
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/data/tinyshakespeare.txt");
    limited(&["eval", "--checkpoint", s(ckpt), "--data", data, "--max-windows", "2", "--threads", "1"])
}

fn generate(ckpt: &Path) -> Output {
    limited(&["generate", "--checkpoint", s(ckpt), "--prompt", "ab", "--tokens", "4"])
}

fn resume(step: &Path, out: &Path) -> Output {
    limited(&["train", "--resume", s(step), "--out", s(out), "--steps", "4", "--threads", "1", "--quiet"])
}

#[test]
fn an_intact_checkpoint_evaluates_generates_and_resumes_under_the_memory_limit() {
    let (_d, out, step) = checkpoint();
    assert!(eval(&step).status.success(), "{}", text(&eval(&step).stderr));
    assert!(generate(&step).status.success());
    let r = resume(&step, &out);
    assert!(r.status.success(), "{}", text(&r.stderr));
}

#[test]
fn absurd_shapes_in_the_model_metadata_are_refused_before_allocating() {
    let cases: [(&str, serde_json::Value, &str); 5] = [
        ("layers", 100_000_000u64.into(), "layers 100000000 exceeds"),
        ("context", 1_000_000_000u64.into(), "context 1000000000 exceeds"),
        ("embed", (1u64 << 31).into(), "embed 2147483648 exceeds"),
        ("vocab", 1_000_000_000_000u64.into(), "vocab 1000000000000 exceeds"),
        // Within every bound, but the tensors in the file do not back it: the parameter buffer
        // is allocated only once every tensor of the layout is found.
        ("layers", 64u64.into(), "missing tensor \"h.2.ln_1.weight\""),
    ];
    for (field, value, needle) in cases {
        let (_d, out, step) = checkpoint();
        // The metadata alone lies here (a config.json that disagrees is refused for that).
        std::fs::remove_file(step.join("config.json")).unwrap();
        let model = step.join("model.safetensors");
        let mut t = Tensors::read(&model);
        t.set_config(field, value.clone());
        t.write(&model);
        refused(&eval(&model), &["model.safetensors", needle]);
        refused(&generate(&model), &[needle]);
        resign(&step, |st| st["model_config"][field] = value.clone());
        refused(&eval(&step), &[needle]);
        refused(&resume(&step, &out), &[needle]);
    }
}

#[test]
fn a_model_file_larger_than_its_config_allows_is_not_read() {
    let (_d, _out, step) = checkpoint();
    let model = step.join("model.safetensors");
    let mut t = Tensors::read(&model);
    // An ignored buffer far larger than any a tiny model's export carries (2 × 16² per layer).
    t.list.push(("h.0.attn.bias".into(), Dtype::F32, vec![1 << 22], vec![0; 4 << 22]));
    t.write(&model);
    refused(&eval(&model), &["model.safetensors", "bytes, more than the", "allowed for a model file of config"]);
}

#[test]
fn hostile_counters_and_options_in_state_json_are_refused_on_resume() {
    let cases: [(&str, &str, serde_json::Value, &str); 9] = [
        ("options", "batch", 1_000_000_000u64.into(), "options.batch is 1000000000"),
        ("options", "context", 1_000_000_000u64.into(), "options.context is 1000000000"),
        ("options", "spheres", 1_000_000_000u64.into(), "options.spheres is 1000000000"),
        ("options", "threads", 1_000_000_000u64.into(), "options.threads is 1000000000"),
        ("options", "steps", u64::MAX.into(), "options.steps is 18446744073709551615"),
        ("options", "eval_windows", u64::MAX.into(), "options.eval_windows"),
        ("", "adam_t", u64::MAX.into(), "adam_t 18446744073709551615 exceeds step 2"),
        ("", "step", 1_000_000u64.into(), "past the run's total"),
        ("sampler", "seq_len", 1_000_000_000u64.into(), "sampler state"),
    ];
    for (obj, field, value, needle) in cases {
        let (_d, out, step) = checkpoint();
        resign(&step, |st| match obj {
            "" => st[field] = value,
            o => st[o][field] = value,
        });
        refused(&resume(&step, &out), &["state.json", needle]);
    }
}

#[test]
fn invalid_adam_moments_are_refused_with_the_first_bad_index() {
    let bad: [(&str, f32, &str); 4] = [
        ("adam.m", f32::NAN, "\"adam.m\": invalid value NaN at index 7"),
        ("adam.m", f32::INFINITY, "\"adam.m\": invalid value inf at index 7"),
        ("adam.v", -1.0, "\"adam.v\": invalid value -1 at index 7"),
        ("adam.v", f32::NAN, "\"adam.v\": invalid value NaN at index 7"),
    ];
    for (name, x, needle) in bad {
        let (_d, out, step) = checkpoint();
        let f = step.join("state.safetensors");
        let mut t = Tensors::read(&f);
        t.data_mut(name)[28..32].copy_from_slice(&x.to_le_bytes());
        t.write(&f);
        resign(&step, |_| {});
        refused(&resume(&step, &out), &["state.safetensors", needle]);
    }
}

#[test]
fn non_finite_weights_are_refused_naming_the_tensor_and_index() {
    let (_d, out, step) = checkpoint();
    let f = step.join("model.safetensors");
    let mut t = Tensors::read(&f);
    t.data_mut("wte.weight")[12..16].copy_from_slice(&f32::NAN.to_le_bytes());
    t.write(&f);
    resign(&step, |_| {});
    for o in [eval(&step), generate(&step), resume(&step, &out)] {
        refused(&o, &["model.safetensors", "tensor \"wte.weight\": non-finite value NaN at flat index 3"]);
    }
}

#[test]
fn a_tensor_given_twice_under_the_two_accepted_names_is_ambiguous() {
    let (_d, _out, step) = checkpoint();
    let f = step.join("model.safetensors");
    let mut t = Tensors::read(&f);
    let mut copy = t.list.iter().find(|x| x.0 == "wte.weight").unwrap().clone();
    copy.0 = "transformer.wte.weight".into();
    copy.3.iter_mut().for_each(|b| *b = 0);
    t.list.push(copy);
    t.write(&f);
    refused(&eval(&f), &["\"transformer.wte.weight\" and \"wte.weight\" both give \"wte.weight\"", "ambiguous"]);
}

#[test]
fn fifos_devices_and_huge_files_are_refused_as_data_and_checkpoints() {
    let (d, _out, step) = checkpoint();
    let fifo = d.path().join("fifo");
    let c = std::ffi::CString::new(s(&fifo)).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let sparse = d.path().join("sparse.txt");
    std::fs::File::create(&sparse).unwrap().set_len(100 << 30).unwrap();
    let model = step.join("model.safetensors");
    for data in [s(&fifo), "/dev/zero"] {
        let o = limited(&["eval", "--checkpoint", s(&model), "--data", data]);
        refused(&o, &[data, "not a regular file"]);
        let o =
            limited(&["train", "--config", "tiny", "--data", data, "--out", s(&d.path().join("x")), "--steps", "1"]);
        refused(&o, &["not a regular file"]);
    }
    let o = limited(&["eval", "--checkpoint", s(&model), "--data", s(&sparse)]);
    refused(&o, &["sparse.txt", "107374182400 bytes, more than"]);
    refused(&limited(&["eval", "--checkpoint", s(&fifo), "--data", s(&sparse)]), &["not a regular file"]);
    std::fs::remove_file(&model).unwrap();
    std::os::unix::fs::symlink(&fifo, &model).unwrap();
    refused(&generate(&step), &["model.safetensors", "not a regular file"]);
}

#[test]
fn diverged_weights_fail_eval_and_generate_instead_of_printing_nan() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    // lr 1e10 blows the weights up at the first update; the next steps skip (NaN gradients)
    // until the run stops, but step 1's checkpoint is finite and loads.
    let o = common::cllm(&[
        "train",
        "--config",
        "tiny",
        "--out",
        s(&out),
        "--quiet",
        "--lr",
        "1e10",
        "--save-every",
        "1",
        "--steps",
        "20",
        "--threads",
        "1",
    ]);
    assert!(!o.status.success(), "the run stops after 3 skipped updates");
    let step = out.join("step-000001");
    refused(&eval(&step), &["step-000001/model.safetensors", "loss", "is NaN"]);
    refused(&generate(&step), &["step-000001/model.safetensors", "not finite"]);
}
