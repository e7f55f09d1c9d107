//! Finite-difference check of the hand-written backward pass on the `tiny` config, covering
//! every parameter tensor. The model is f32, so each check uses central differences along a
//! direction (the gradient itself and a random one), which keeps the signal far above f32
//! rounding noise, plus element-wise checks of each tensor's largest entries.

use cllm::model::{backward, forward, init::SplitMix64, Activations, Model};
use cllm::ModelConfig;

struct Case {
    model: Model,
    inputs: Vec<u32>,
    targets: Vec<u32>,
    b: usize,
    t: usize,
}

fn case() -> Case {
    let cfg = ModelConfig::tiny();
    let mut model = Model::new(cfg, 7);
    // Perturb biases and LayerNorm parameters so their gradients are exercised away from
    // the trivial init (LN weight 1, bias 0).
    // Weights are also scaled up from GPT-2's std 0.02, so every tensor's gradient is large
    // enough to stand well above f32 rounding noise in a central difference.
    let mut rng = SplitMix64::new(99);
    for x in &mut model.params {
        *x *= 4.0;
    }
    for spec in model.layout.tensors.clone() {
        if spec.name.ends_with(".bias") || spec.name.contains("ln_") {
            for x in &mut model.params[spec.range()] {
                *x += (rng.next_normal() * 0.3) as f32;
            }
        }
    }
    let (b, t) = (3, cfg.context);
    let text = b"First Citizen: Before we proceed any further, hear me speak. All: Speak, speak.";
    let inputs: Vec<u32> = (0..b * t).map(|i| text[(i * 7) % text.len()] as u32).collect();
    let targets: Vec<u32> = (0..b * t).map(|i| text[(i * 7 + 1) % text.len()] as u32).collect();
    Case { model, inputs, targets, b, t }
}

fn loss_at(c: &Case, acts: &mut Activations, params: &[f32]) -> f64 {
    forward(&c.model.config, params, acts, &c.inputs, Some(&c.targets), c.b, c.t) as f64
}

#[test]
fn backward_matches_finite_differences_for_every_tensor() {
    let c = case();
    let cfg = c.model.config;
    let mut acts = Activations::new(&cfg, c.b, c.t);
    let mut grads = vec![0.0f32; c.model.params.len()];
    loss_at(&c, &mut acts, &c.model.params);
    backward(&cfg, &c.model.params, &mut acts, &mut grads);

    let mut rng = SplitMix64::new(5);
    let mut failures = Vec::new();
    let mut worst = 0.0f64;
    let mut worst_elem = 0.0f64;
    for spec in &c.model.layout.tensors {
        let g = &grads[spec.range()];
        let gnorm = g.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        assert!(gnorm > 0.0, "{}: gradient is identically zero", spec.name);
        let random: Vec<f64> = (0..g.len()).map(|_| rng.next_normal()).collect();
        let rnorm = random.iter().map(|x| x * x).sum::<f64>().sqrt();
        let directions: [(&str, Vec<f64>); 2] = [
            ("gradient", g.iter().map(|&x| x as f64 / gnorm).collect()),
            ("random", random.iter().map(|x| x / rnorm).collect()),
        ];
        for (dname, u) in directions {
            let analytic: f64 = g.iter().zip(&u).map(|(&gi, &ui)| gi as f64 * ui).sum();
            let eps = 3e-3;
            let mut plus = c.model.params.clone();
            let mut minus = c.model.params.clone();
            for (k, &ui) in spec.range().zip(&u) {
                plus[k] += (eps * ui) as f32;
                minus[k] -= (eps * ui) as f32;
            }
            let numeric = (loss_at(&c, &mut acts, &plus) - loss_at(&c, &mut acts, &minus)) / (2.0 * eps);
            // Tolerance: relative to the tensor's gradient norm (the largest directional
            // derivative), so a near-zero random projection is judged fairly.
            let err = (numeric - analytic).abs();
            worst = worst.max(err / gnorm);
            if err > 6e-3 * gnorm {
                failures.push(format!(
                    "{} [{dname}]: analytic {analytic:.6e} numeric {numeric:.6e} |g| {gnorm:.3e}",
                    spec.name
                ));
            }
        }
        // Element-wise on the tensor's largest-magnitude entry.
        let (imax, _) =
            g.iter().enumerate().fold((0, 0.0f32), |m, (i, &x)| if x.abs() > m.1 { (i, x.abs()) } else { m });
        let k = spec.offset + imax;
        let eps = 3e-3f32;
        let mut p = c.model.params.clone();
        p[k] += eps;
        let lp = loss_at(&c, &mut acts, &p);
        p[k] -= 2.0 * eps;
        let lm = loss_at(&c, &mut acts, &p);
        let numeric = (lp - lm) / (2.0 * eps as f64);
        let analytic = grads[k] as f64;
        worst_elem = worst_elem.max((numeric - analytic).abs() / analytic.abs());
        if (numeric - analytic).abs() > 6e-3 * analytic.abs() + 1e-5 {
            failures.push(format!("{}[{imax}]: analytic {analytic:.6e} numeric {numeric:.6e}", spec.name));
        }
    }
    println!("worst directional error / |g|: {worst:.3e}; worst element relative error: {worst_elem:.3e}");
    assert!(failures.is_empty(), "finite-difference mismatches:\n{}", failures.join("\n"));
}

#[test]
fn backward_is_bit_identical_across_repeated_calls() {
    let c = case();
    let cfg = c.model.config;
    let mut acts = Activations::new(&cfg, c.b, c.t);
    let mut g1 = vec![0.0f32; c.model.params.len()];
    // Garbage in the buffer must not leak into the result: backward overwrites.
    let mut g2 = vec![f32::NAN; c.model.params.len()];
    loss_at(&c, &mut acts, &c.model.params);
    backward(&cfg, &c.model.params, &mut acts, &mut g1);
    let mut acts2 = Activations::new(&cfg, c.b, c.t);
    loss_at(&c, &mut acts2, &c.model.params);
    backward(&cfg, &c.model.params, &mut acts2, &mut g2);
    assert!(g1.iter().zip(&g2).all(|(a, b)| a.to_bits() == b.to_bits()));
}

#[test]
fn initial_loss_is_near_uniform_cross_entropy() {
    let cfg = ModelConfig::tiny();
    let model = Model::new(cfg, 1);
    let mut acts = Activations::new(&cfg, 2, cfg.context);
    let inputs: Vec<u32> = (0..2 * cfg.context as u32).map(|i| (i * 37) % 256).collect();
    let targets: Vec<u32> = inputs.iter().map(|x| (x + 1) % 256).collect();
    let loss = forward(&cfg, &model.params, &mut acts, &inputs, Some(&targets), 2, cfg.context);
    assert!((loss - (256f32).ln()).abs() < 0.1, "loss {loss} should be close to ln 256");
}
