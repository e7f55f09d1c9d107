//! The Rust model against a PyTorch oracle.
//!
//! `scripts/reference.py` (see `tests/fixtures/README.md`) wrote two files:
//! `tiny_reference.safetensors`, a cllm model file of the `tiny` config (parameters under their
//! HF GPT-2 names, loaded here with cllm's own loader), and `tiny_reference_oracle.safetensors`:
//! one batch of real text, the loss and every gradient at those parameters, and the losses of
//! ten AdamW steps on that batch — all computed by PyTorch in float32 (and checked there against
//! float64 to ~5e-7 relative).

use std::path::{Path, PathBuf};

/// Largest allowed max|Δ| / max|g| per gradient tensor.
const GRADIENT_TOLERANCE: f64 = 1e-5;

use cllm::model::{backward, forward, load_safetensors, Activations, Model};
use safetensors::{Dtype, SafeTensors};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn model_path() -> PathBuf {
    fixture("tiny_reference.safetensors")
}

/// A fixture file read with the `safetensors` crate, independently of cllm's loader.
struct Fixture {
    bytes: Vec<u8>,
}

impl Fixture {
    fn load(name: &str) -> Fixture {
        let path = fixture(name);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        Fixture { bytes }
    }

    fn tensors(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("fixture is valid safetensors")
    }

    fn f32s(&self, name: &str) -> Vec<f32> {
        let st = self.tensors();
        let t = st.tensor(name).unwrap_or_else(|e| panic!("fixture tensor {name}: {e:?}"));
        assert_eq!(t.dtype(), Dtype::F32, "{name} dtype");
        t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    }

    fn tokens(&self, name: &str) -> (Vec<u32>, Vec<usize>) {
        let st = self.tensors();
        let t = st.tensor(name).unwrap_or_else(|e| panic!("fixture tensor {name}: {e:?}"));
        assert_eq!(t.dtype(), Dtype::I32, "{name} dtype");
        let v = t
            .data()
            .chunks_exact(4)
            .map(|c| {
                let x = i32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                assert!((0..256).contains(&x), "{name}: token {x} is not a byte");
                x as u32
            })
            .collect();
        (v, t.shape().to_vec())
    }
}

/// The fixture's model (loaded by cllm) and batch.
struct Case {
    fx: Fixture,
    model: Model,
    inputs: Vec<u32>,
    targets: Vec<u32>,
    b: usize,
    t: usize,
}

fn case() -> Case {
    let fx = Fixture::load("tiny_reference_oracle.safetensors");
    let model = load_safetensors(&model_path()).expect("cllm loads the PyTorch-written model file");
    let (inputs, shape) = fx.tokens("batch.inputs");
    let (targets, tshape) = fx.tokens("batch.targets");
    assert_eq!(shape, tshape);
    let (b, t) = (shape[0], shape[1]);
    Case { fx, model, inputs, targets, b, t }
}

fn loss_and_grads(c: &Case, params: &[f32]) -> (f32, Vec<f32>) {
    let cfg = c.model.config;
    let mut acts = Activations::new(&cfg, c.b, c.t);
    let loss = forward(&cfg, params, &mut acts, &c.inputs, Some(&c.targets), c.b, c.t);
    let mut grads = vec![f32::NAN; params.len()];
    backward(&cfg, params, &mut acts, &mut grads);
    (loss, grads)
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs()
}

#[test]
fn oracle_fixture_loads_as_the_tiny_model_with_pytorchs_weights() {
    let c = case();
    let raw = Fixture::load("tiny_reference.safetensors");
    assert_eq!(c.model.config, cllm::ModelConfig::tiny());
    assert_eq!(c.model.params.len(), c.model.layout.num_params());
    for spec in &c.model.layout.tensors {
        let want = raw.f32s(&spec.name);
        let got = &c.model.params[spec.range()];
        assert_eq!(want.len(), got.len(), "{}", spec.name);
        assert!(
            want.iter().zip(got).all(|(w, g)| w.to_bits() == g.to_bits()),
            "{}: loaded values differ from the file",
            spec.name
        );
    }
    assert_eq!((c.b, c.t), (4, 16));
    for row in 0..c.b {
        let r = row * c.t..(row + 1) * c.t;
        assert_eq!(
            &c.inputs[r.start + 1..r.end],
            &c.targets[r.start..r.end - 1],
            "row {row}: targets are inputs shifted by one"
        );
    }
}

#[test]
fn oracle_loss_matches_pytorch() {
    let c = case();
    let want = c.fx.f32s("loss")[0];
    let (got, _) = loss_and_grads(&c, &c.model.params);
    let r = rel(got as f64, want as f64);
    println!("loss: cllm {got:.7} pytorch {want:.7} rel {r:.2e}");
    assert!(r <= 1e-5, "loss {got} vs PyTorch {want}: rel error {r:.2e} > 1e-5");
}

#[test]
fn oracle_gradients_match_pytorch() {
    let c = case();
    let (_, grads) = loss_and_grads(&c, &c.model.params);
    let mut failures = Vec::new();
    let mut worst_overall = 0.0f64;
    for spec in &c.model.layout.tensors {
        let want = c.fx.f32s(&format!("grad.{}", spec.name));
        let got = &grads[spec.range()];
        let scale = want.iter().fold(0.0f64, |m, &g| m.max((g as f64).abs()));
        let (mut max_diff, mut at) = (0.0f64, 0usize);
        for (i, (&w, &g)) in want.iter().zip(got).enumerate() {
            let d = if g.is_finite() { (w as f64 - g as f64).abs() } else { f64::INFINITY };
            if d > max_diff || (d.is_nan() && !max_diff.is_nan()) {
                max_diff = d;
                at = i;
            }
        }
        let ratio = max_diff / scale;
        worst_overall = worst_overall.max(ratio);
        println!(
            "{:<24} max|g| {scale:.3e}  max|Δ| {max_diff:.3e}  ratio {ratio:.2e}  (at {at}: cllm {} pytorch {})",
            spec.name, got[at], want[at]
        );
        // The bound is 1e-4; measured agreement is ~7e-7, and 1e-5 is still 14x above
        // it while catching an erf-instead-of-tanh GELU (2.9e-5), which 1e-4 would let through.
        if ratio.is_nan() || ratio > GRADIENT_TOLERANCE {
            failures.push(format!("{} (ratio {ratio:.2e})", spec.name));
        }
    }
    println!("worst ratio over all tensors: {worst_overall:.2e}");
    assert!(
        failures.is_empty(),
        "gradients differ from PyTorch by > {GRADIENT_TOLERANCE:e}·max|g| in: {}",
        failures.join(", ")
    );
}

#[test]
fn oracle_ten_adamw_steps_match_pytorch() {
    let c = case();
    let want = c.fx.f32s("adam.losses");
    let n = c.model.layout.num_params();
    let mut params = c.model.params.clone();
    let (mut m, mut v) = (vec![0.0f32; n], vec![0.0f32; n]);
    let mut worst = 0.0f64;
    for (i, &w) in want.iter().enumerate() {
        let (loss, grads) = loss_and_grads(&c, &params);
        let r = rel(loss as f64, w as f64);
        worst = worst.max(r);
        println!("step {:>2}: cllm {loss:.7} pytorch {w:.7} rel {r:.2e}", i + 1);
        assert!(r <= 1e-4, "loss before AdamW update {}: {loss} vs PyTorch {w} (rel {r:.2e} > 1e-4)", i + 1);
        cllm::optim::AdamWConfig::default().update_range(
            0..n,
            &mut params,
            &grads,
            &mut m,
            &mut v,
            (i + 1) as u64,
            1e-3,
            1.0,
        );
    }
    println!("worst rel error over {} steps: {worst:.2e}", want.len());
}
