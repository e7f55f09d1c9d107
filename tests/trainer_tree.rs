//! `segmented`'s summation tree on the std backend: the buffers it holds, and its sums against
//! the serial tree oracle for micro-batch and worker counts whose ranges do not align with the
//! tree (3 and 5 workers), with skipped micro-batches and per-sphere clipping. The fake
//! workload's order probe makes any change in the association order show in the bits.

use cllm::sync::Std;
use cllm::train::tree::max_live_buffers;
use cllm::train::{ClipMode, Engine, Reference, ScaleWorkload, StepBatch, Strategy, Summation, TrainerOptions};

const PARAMS: usize = 10;

fn batch(step: u64, rows: usize) -> StepBatch {
    let inputs: Vec<u32> = (0..rows).map(|r| ((step as usize * 5 + r * 3) % 7) as u32).collect();
    StepBatch { rows, seq: 1, targets: inputs.clone(), inputs }
}

fn params() -> Vec<f32> {
    (0..PARAMS).map(|i| (i as f32 - 4.5) * 0.25).collect()
}

fn opts(threads: usize, spheres: usize, strategy: Strategy) -> TrainerOptions {
    TrainerOptions { threads, spheres, strategy, chunk_size: 3, clip_norm: 0.0, ..TrainerOptions::default() }
}

/// Runs `steps` steps of the engine and of `oracle`, asserting equal bits after each.
fn assert_matches(o: &TrainerOptions, oracle: Summation, steps: u64) {
    let s = o.spheres;
    let w = ScaleWorkload::new(PARAMS, s).probing_order();
    let mut eng = Engine::<Std, _>::new(w, params(), s, 1, o).unwrap();
    let mut reference =
        Reference::new(ScaleWorkload::new(PARAMS, s).probing_order(), params(), s, 1, o).with_summation(oracle);
    for step in 1..=steps {
        let b = batch(step, s);
        let rep = eng.step(&b.inputs, &b.targets, 0.01).unwrap();
        let want = reference.step(&b, 0.01);
        assert_eq!(rep.skipped_spheres, want.skipped_spheres, "{o:?} step {step}");
        // What each micro-batch's own scan found (a fold takes it on the way, and recomputes a
        // leaf it overwrote before finding another invalid): the same report, bit for bit.
        let bits = |v: &[(usize, usize, f32)]| v.iter().map(|&(m, i, x)| (m, i, x.to_bits())).collect::<Vec<_>>();
        let mut injected: Vec<(usize, usize, u32)> =
            o.inject_nan.iter().filter(|p| p.0 == step).map(|&(_, m)| (m, 0, f32::NAN.to_bits())).collect();
        injected.sort_unstable();
        assert_eq!(bits(&rep.bad_values), injected, "{o:?} step {step}");
        assert_eq!(rep.loss.to_bits(), want.loss.to_bits(), "{o:?} step {step}: loss");
        assert_eq!(rep.grad_norm.to_bits(), want.grad_norm.to_bits(), "{o:?} step {step}: norm");
        let same = eng.params().iter().zip(&reference.params).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "S={s} N={} step {step}: {:?} vs {:?}", o.threads, eng.params(), reference.params);
        let sum_same = eng.grad_sum().iter().zip(&reference.sum).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(sum_same || want.update_skipped, "S={s} N={} step {step}: summed gradient differs", o.threads);
    }
    eng.shutdown().unwrap();
}

const SHAPES: [(usize, usize); 14] = [
    (1, 1),
    (3, 2),
    (5, 3),
    (6, 4),
    (7, 5),
    (8, 1),
    (8, 2),
    (8, 3),
    (8, 5),
    (8, 16),
    (12, 5),
    (13, 3),
    (32, 2),
    (32, 5),
];

#[test]
fn segmented_holds_exactly_the_tree_bound_of_gradient_buffers() {
    for (s, n) in SHAPES {
        let eng =
            Engine::<Std, _>::new(ScaleWorkload::new(PARAMS, s), params(), s, 1, &opts(n, s, Strategy::Segmented))
                .unwrap();
        assert_eq!(eng.gradient_buffers(), max_live_buffers(s, n), "S={s} N={n}");
        // The memory plan (--dry-run, the refusal of runs too large) counts them, plus the sum.
        let planned = cllm::memory::gradient_buffers(Strategy::Segmented, s, n);
        assert_eq!(planned, eng.gradient_buffers() + 1, "memory plan, S={s} N={n}");
    }
    assert_eq!(max_live_buffers(32, 2), 10);
    assert_eq!(max_live_buffers(8, 2), 6);
    let lock =
        Engine::<Std, _>::new(ScaleWorkload::new(PARAMS, 4), params(), 4, 1, &opts(2, 4, Strategy::GradientLock));
    assert_eq!(lock.unwrap().gradient_buffers(), 0);
}

#[test]
fn segmented_equals_the_tree_oracle_for_unaligned_ranges() {
    for (s, n) in SHAPES {
        assert_matches(&opts(n, s, Strategy::Segmented), Summation::Tree, 3);
    }
}

#[test]
fn skipped_micro_batch_is_a_zero_leaf() {
    for (s, n) in [(5usize, 3usize), (8, 2), (8, 3), (8, 5), (13, 3), (32, 5)] {
        // Step 2: one leaf skipped (the first of a worker's range or inside it); step 3: a whole
        // block of micro-batches 0..4 skipped; step 4: a left sibling skipped, its right one
        // valid (the merge copies into the skipped leaf's buffer).
        let mut o = opts(n, s, Strategy::Segmented);
        o.inject_nan = vec![(2, 1), (2, s - 1), (3, 0), (3, 1), (3, 2), (3, 3.min(s - 1)), (4, 0), (4, 2)];
        assert_matches(&o, Summation::Tree, 5);
    }
}

#[test]
fn per_sphere_clipping_scales_each_leaf_before_the_tree() {
    for (s, n) in [(8usize, 3usize), (7, 5), (32, 2)] {
        let o = TrainerOptions { clip_mode: ClipMode::PerSphere, clip_norm: 5.0, ..opts(n, s, Strategy::Segmented) };
        assert_matches(&o, Summation::Tree, 3);
    }
}

#[test]
fn lock_strategies_with_one_thread_equal_the_left_fold_oracle() {
    for strategy in [Strategy::GradientLock, Strategy::ModelLock] {
        let mut o = opts(1, 8, strategy);
        o.inject_nan = vec![(2, 3)];
        assert_matches(&o, Summation::LeftFold, 3);
    }
}

/// The probe is what makes the tests above able to fail: on it, the tree and a left fold differ.
#[test]
fn order_probe_tells_the_tree_from_a_left_fold() {
    let o = opts(1, 8, Strategy::Segmented);
    let run = |summation| {
        let mut r =
            Reference::new(ScaleWorkload::new(PARAMS, 8).probing_order(), params(), 8, 1, &o).with_summation(summation);
        r.step(&batch(1, 8), 0.01);
        r.sum
    };
    let (tree, fold) = (run(Summation::Tree), run(Summation::LeftFold));
    assert!(tree.iter().zip(&fold).any(|(a, b)| a.to_bits() != b.to_bits()), "the order does not show");
}
