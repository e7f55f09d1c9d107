//! `--weight-decay`: decoupled AdamW decay where GPT-2 practice applies it (the linear layers'
//! weights; embeddings only when asked), the same bits at any thread count and in every engine
//! that shares the segmented sum, and recorded in checkpoints only when used.

mod common;

use cllm::model::{Model, ParamLayout};
use cllm::optim::{AdamWConfig, DecayMask};
use cllm::train::{Strategy, Trainer, TrainerOptions};
use cllm::ModelConfig;
use common::{assert_fails, assert_ok, cllm, s, train_tiny};

fn batch(rows: usize, seq: usize) -> (Vec<u32>, Vec<u32>) {
    let inputs: Vec<u32> = (0..rows * seq).map(|i| (i * 37 % 256) as u32).collect();
    let targets: Vec<u32> = (0..rows * seq).map(|i| (i * 11 % 256) as u32).collect();
    (inputs, targets)
}

/// The weights after `steps` steps of `tiny` with weight decay `wd` under `mask`.
fn trained(steps: usize, wd: f32, mask: Option<DecayMask>, threads: usize, strategy: Strategy) -> Vec<f32> {
    let cfg = ModelConfig::tiny();
    let adamw = AdamWConfig { weight_decay: wd, ..AdamWConfig::default() };
    let opts = TrainerOptions { threads, spheres: 4, strategy, adamw, decay_mask: mask, ..TrainerOptions::default() };
    let mut t = Trainer::new(Model::new(cfg, 3), 4, 16, opts).unwrap();
    let (x, y) = batch(4, 16);
    for _ in 0..steps {
        assert!(!t.step(&x, &y, 1e-2).unwrap().update_skipped);
    }
    let p = t.params().to_vec();
    t.shutdown().unwrap();
    p
}

#[test]
fn decay_changes_exactly_the_masked_parameters() {
    let layout = ParamLayout::new(&ModelConfig::tiny());
    let mask = DecayMask::gpt2(&layout, false);
    // One step: both runs see the same gradient, so only the decay tells them apart.
    let plain = trained(1, 0.0, Some(mask.clone()), 1, Strategy::Segmented);
    let decayed = trained(1, 0.5, Some(mask.clone()), 1, Strategy::Segmented);
    let all: Vec<usize> = (0..plain.len()).collect();
    let inside: Vec<usize> = mask.pieces(0..plain.len()).into_iter().filter(|p| p.1).flat_map(|p| p.0).collect();
    assert_eq!(inside.len(), mask.len());
    for &i in &all {
        let masked = inside.binary_search(&i).is_ok();
        if !masked {
            assert_eq!(plain[i].to_bits(), decayed[i].to_bits(), "parameter {i} is outside the mask but changed");
        }
    }
    let changed = inside.iter().filter(|&&i| plain[i] != decayed[i]).count();
    assert!(changed * 10 > inside.len() * 9, "only {changed} of {} masked parameters decayed", inside.len());
    for name in ["wte.weight", "wpe.weight", "h.0.ln_1.weight", "h.1.attn.c_attn.bias", "ln_f.bias"] {
        let spec = layout.get(name).unwrap();
        assert!(mask.pieces(spec.range()).iter().all(|p| !p.1), "{name} must not decay");
    }
}

#[test]
fn decayed_training_is_bit_identical_at_any_thread_count() {
    let mask = DecayMask::gpt2(&ParamLayout::new(&ModelConfig::tiny()), true);
    let one = trained(3, 0.1, Some(mask.clone()), 1, Strategy::Segmented);
    for threads in [2, 3] {
        assert_eq!(trained(3, 0.1, Some(mask.clone()), threads, Strategy::Segmented), one, "threads {threads}");
    }
    assert_ne!(trained(3, 0.0, Some(mask), 1, Strategy::Segmented), one, "the decay takes effect");
}

#[test]
fn weight_decay_flags_are_validated_pinned_and_recorded_only_when_used() {
    let err = assert_fails(&cllm(&["train", "--dry-run", "--weight-decay", "-0.1"]), 2);
    assert!(err.contains("--weight-decay"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let (with, without) = (dir.path().join("wd"), dir.path().join("plain"));
    train_tiny(&with, &["--steps", "1", "--weight-decay", "0.1"]);
    train_tiny(&without, &["--steps", "1"]);
    let state = |run: &std::path::Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(run.join("step-000001/state.json")).unwrap()).unwrap()
    };
    assert_eq!(state(&with)["options"]["weight_decay"].as_f64().map(|x| x as f32), Some(0.1));
    assert!(
        state(&without)["options"].get("weight_decay").is_none(),
        "absent when 0: older checkpoints stay byte-identical"
    );
    let err = assert_fails(&cllm(&["train", "--resume", s(&with), "--steps", "2", "--weight-decay", "0.2"]), 2);
    assert!(err.contains("--weight-decay 0.2 contradicts"), "{err}");
    assert_ok(&cllm(&["train", "--resume", s(&with), "--steps", "2", "--quiet"]));
}
