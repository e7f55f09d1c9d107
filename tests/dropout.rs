//! `--dropout P`: GPT-2's dropout sites with counter-based masks. The backward pass matches
//! finite differences under a fixed mask; runs are bit-identical at any thread count and after
//! a resume; `--dropout 0` is exactly no flag.

mod common;

use std::path::Path;

use cllm::model::dropout::Dropout;
use cllm::model::gpt::{backward_with_layout, forward_dropout};
use cllm::model::{init::SplitMix64, Activations, Model};
use cllm::ModelConfig;
use common::{assert_fails, assert_ok, cllm, s};

fn loss(m: &Model, acts: &mut Activations, params: &[f32], x: &[u32], y: &[u32], d: Option<Dropout>) -> f64 {
    forward_dropout(&m.layout, params, None, acts, x, Some(y), 2, 16, d) as f64
}

#[test]
fn backward_matches_finite_differences_under_a_fixed_mask() {
    let cfg = ModelConfig::tiny();
    let mut model = Model::new(cfg, 3);
    for p in &mut model.params {
        *p *= 4.0; // gradients well above f32 rounding noise (as tests/gradcheck.rs)
    }
    let text = b"First Citizen: Before we proceed any further, hear me speak.";
    let x: Vec<u32> = (0..32).map(|i| u32::from(text[(i * 5) % text.len()])).collect();
    let y: Vec<u32> = (0..32).map(|i| u32::from(text[(i * 5 + 1) % text.len()])).collect();
    let drop = Dropout::new(0.2, 11, 5, 1);
    let mut acts = Activations::new(&cfg, 2, 16);
    let mut grads = vec![0.0f32; model.params.len()];
    let with = loss(&model, &mut acts, &model.params, &x, &y, drop);
    backward_with_layout(&model.layout, &model.params, None, &mut acts, &mut grads);
    let without = loss(&model, &mut acts, &model.params, &x, &y, None);
    assert_ne!(with, without, "the mask changes the loss");

    let mut rng = SplitMix64::new(2);
    for spec in &model.layout.tensors {
        let g = &grads[spec.range()];
        let norm = g.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>().sqrt();
        assert!(norm > 0.0, "{}", spec.name);
        let u: Vec<f64> = (0..g.len()).map(|_| rng.next_normal()).collect();
        let un = u.iter().map(|v| v * v).sum::<f64>().sqrt();
        for dir in [g.iter().map(|&v| f64::from(v) / norm).collect::<Vec<_>>(), u.iter().map(|v| v / un).collect()] {
            let analytic: f64 = g.iter().zip(&dir).map(|(&a, &b)| f64::from(a) * b).sum();
            let eps = 3e-3;
            let (mut plus, mut minus) = (model.params.clone(), model.params.clone());
            for (k, &d) in spec.range().zip(&dir) {
                plus[k] += (eps * d) as f32;
                minus[k] -= (eps * d) as f32;
            }
            let numeric = (loss(&model, &mut acts, &plus, &x, &y, drop)
                - loss(&model, &mut acts, &minus, &x, &y, drop))
                / (2.0 * eps);
            assert!(
                (numeric - analytic).abs() <= 2e-2 * norm + 1e-4,
                "{}: {numeric} vs {analytic} (|g| {norm})",
                spec.name
            );
        }
    }
}

/// `cllm train` of the tiny model for 6 steps into `out`, with `extra` flags.
fn train(out: &Path, extra: &[&str]) {
    let mut args = vec!["train", "--config", "tiny", "--steps", "6", "--out", s(out), "--quiet", "--json"];
    args.extend_from_slice(extra);
    assert_ok(&cllm(&args));
}

fn files(out: &Path) -> (Vec<u8>, Vec<u8>) {
    let d = out.join("step-000006");
    (std::fs::read(d.join("model.safetensors")).unwrap(), std::fs::read(d.join("state.safetensors")).unwrap())
}

#[test]
fn dropout_runs_are_bit_identical_at_any_thread_count_and_after_a_resume() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        train(&out, extra);
        out
    };
    let one = run("one", &["--dropout", "0.1", "--threads", "1"]);
    let three = run("three", &["--dropout", "0.1", "--threads", "3", "--save-every", "3"]);
    assert_eq!(files(&one), files(&three), "1 and 3 threads");
    let none = run("none", &["--threads", "2"]);
    let zero = run("zero", &["--dropout", "0", "--threads", "2"]);
    assert_eq!(files(&none), files(&zero), "--dropout 0 is no dropout");
    assert_ne!(files(&none).0, files(&one).0, "dropout changes the training");
    let state = std::fs::read(zero.join("step-000006").join("state.json")).unwrap();
    let state: serde_json::Value = serde_json::from_slice(&state).unwrap();
    assert!(state["options"].get("dropout").is_none(), "0 is not recorded: {state}");
    let state = std::fs::read(one.join("step-000006").join("state.json")).unwrap();
    let state: serde_json::Value = serde_json::from_slice(&state).unwrap();
    assert!((state["options"]["dropout"].as_f64().unwrap() - 0.1).abs() < 1e-7, "{state}");

    std::fs::remove_dir_all(three.join("step-000006")).unwrap();
    let _ = std::fs::remove_dir_all(three.join("best"));
    let resumed = cllm(&["train", "--resume", s(&three.join("step-000003")), "--threads", "2", "--quiet", "--json"]);
    assert_ok(&resumed);
    assert_eq!(files(&one), files(&three), "resumed at step 3");
    let err = assert_fails(&cllm(&["train", "--resume", s(&three), "--steps", "8", "--dropout", "0.2"]), 2);
    assert!(err.contains("--dropout 0.2 contradicts"), "{err}");
    for bad in ["1", "-0.1", "NaN"] {
        let err = assert_fails(&cllm(&["train", "--config", "tiny", "--dropout", bad, "--dry-run"]), 2);
        assert!(err.contains("--dropout"), "{err}");
    }
}
