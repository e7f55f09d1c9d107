//! Properties of clipping, invalid-gradient skipping and the segmented reduction, for random
//! sizes, values and thread counts.

use cllm::grad;
use cllm::optim::AdamWConfig;
use cllm::sync::Std;
use cllm::train::{Engine, StepBatch, Strategy as TrainStrategy, TrainerOptions, Workload};
use proptest::prelude::*;

/// A workload whose micro-batch gradients are a fixed table (independent of the weights).
struct TableWorkload {
    grads: Vec<Vec<f32>>,
}

impl Workload for TableWorkload {
    type Scratch = ();
    fn num_params(&self) -> usize {
        self.grads[0].len()
    }
    fn new_scratch(&self, _rows: usize, _seq: usize) {}
    fn compute(&self, _: &mut (), _: &[f32], _: u64, _: &StepBatch, mb: usize, _: usize, grad: &mut [f32]) -> f32 {
        grad.copy_from_slice(&self.grads[mb]);
        mb as f32
    }
}

fn table() -> impl Strategy<Value = (usize, Vec<Vec<f32>>)> {
    (1usize..=8, 1usize..=200)
        .prop_flat_map(|(s, p)| (Just(s), prop::collection::vec(prop::collection::vec(-100.0f32..100.0, p), s)))
}

fn engine(grads: Vec<Vec<f32>>, threads: usize, chunk: usize, inject: Vec<(u64, usize)>) -> Engine<Std, TableWorkload> {
    let s = grads.len();
    let p = grads[0].len();
    let opts = TrainerOptions {
        threads,
        spheres: s,
        strategy: TrainStrategy::Segmented,
        clip_norm: 0.0,
        chunk_size: chunk,
        inject_nan: inject,
        max_skipped_steps: 0,
        ..TrainerOptions::default()
    };
    Engine::new(TableWorkload { grads }, vec![0.5; p], s, 1, &opts).unwrap()
}

/// The dyadic tree's sum over `lo..hi` (written out here independently of `cllm::train::tree`):
/// split at the largest power of two below the length; a skipped leaf (None) leaves its
/// sibling's sum unchanged.
fn tree_sum(leaves: &[Option<&Vec<f32>>], lo: usize, hi: usize) -> Option<Vec<f32>> {
    if hi - lo == 1 {
        return leaves[lo].cloned();
    }
    let mut half = 1;
    while half * 2 < hi - lo {
        half *= 2;
    }
    match (tree_sum(leaves, lo, lo + half), tree_sum(leaves, lo + half, hi)) {
        (Some(mut a), Some(b)) => {
            for (x, y) in a.iter_mut().zip(&b) {
                *x += *y;
            }
            Some(a)
        }
        (a, b) => a.or(b),
    }
}

fn run_one_step(e: &mut Engine<Std, TableWorkload>) -> cllm::train::StepReport {
    let s = e.spheres();
    e.step(&vec![0; s], &vec![0; s], 1e-2).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn clipping_never_leaves_a_norm_above_the_bound_and_keeps_direction(
        v in prop::collection::vec(-1e4f32..1e4, 1..300),
        bound in 1e-3f32..1e3,
    ) {
        let norm = grad::sqnorm(&v).sqrt();
        let f = grad::clip_factor(norm, bound);
        let mut c = v.clone();
        grad::scale(&mut c, f);
        let after = grad::sqnorm(&c).sqrt();
        prop_assert!(after <= bound as f64 || f == 1.0, "norm {after} above bound {bound}");
        if norm <= bound as f64 {
            prop_assert_eq!(f, 1.0);
        }
        prop_assert!(f > 0.0 && f <= 1.0);
        if norm > 0.0 && after > 0.0 {
            let dot: f64 = v.iter().zip(&c).map(|(a, b)| *a as f64 * *b as f64).sum();
            prop_assert!(dot / (norm * after) > 1.0 - 1e-6, "direction changed");
        }
    }

    #[test]
    fn segmented_reduction_equals_the_serial_tree_sum(
        (_, grads) in table(),
        threads in 1usize..=8,
        chunk in 1usize..=64,
    ) {
        let leaves: Vec<Option<&Vec<f32>>> = grads.iter().map(Some).collect();
        let want = tree_sum(&leaves, 0, grads.len()).expect("every leaf is valid");
        let mut e = engine(grads, threads, chunk, vec![]);
        run_one_step(&mut e);
        let got: Vec<u32> = e.grad_sum().iter().map(|x| x.to_bits()).collect();
        let want: Vec<u32> = want.iter().map(|x| x.to_bits()).collect();
        prop_assert_eq!(got, want);
    }

    #[test]
    fn skipping_invalid_micro_batches_equals_averaging_only_the_valid_ones(
        (s, grads) in table(),
        threads in 1usize..=8,
        mask in prop::collection::vec(any::<bool>(), 8),
    ) {
        let invalid: Vec<usize> = (0..s).filter(|&m| mask[m]).collect();
        prop_assume!(invalid.len() < s);
        let inject = invalid.iter().map(|&m| (1u64, m)).collect();
        let p = grads[0].len();
        let leaves: Vec<Option<&Vec<f32>>> =
            grads.iter().enumerate().map(|(m, g)| if mask[m] { None } else { Some(g) }).collect();
        let n_valid = s - invalid.len();
        // The mean of the valid gradients, applied by AdamW as sum x (1/n_valid).
        let sum = tree_sum(&leaves, 0, s).expect("some leaf is valid");
        let mut want = vec![0.5f32; p];
        let (mut m, mut v) = (vec![0.0; p], vec![0.0; p]);
        AdamWConfig::default().update_chunk(&mut want, &sum, &mut m, &mut v, 1, 1e-2, 1.0 / n_valid as f32);

        let mut e = engine(grads, threads, 16, inject);
        let rep = run_one_step(&mut e);
        prop_assert_eq!(&rep.skipped_spheres, &invalid);
        prop_assert!(!rep.update_skipped);
        prop_assert_eq!(e.params(), &want[..]);
    }
}
