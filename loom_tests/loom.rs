//! loom model checks of the real step protocol (`cllm::train::Engine` on the `Loom` backend).
//!
//! The workload is `ScaleWorkload` (4 parameters in 2 chunks, exact fake gradients, and a
//! derived copy of the weights in tracked cells, written by the update phase like the GPT
//! model's shared packing); the engine, barrier, strategies, worker loop and shutdown are the
//! production code. The main loom thread is the coordinator, which is also worker 0, so "N
//! workers" means N loom threads.
//!
//! Tests are named after the invariant they check, as `invariant::configuration`. Every
//! execution of the protocol ([`run_steps`]) checks all the invariants at once; a module holds
//! the configurations chosen to stress its invariant. Under segmented the fake workload's order
//! probe is on, so the summed gradient's bits show the order of the tree's additions. The broken variants
//! (`broken_variants_are_caught`) must each fail with the one kind of failure their bug causes
//! ([`Failure`]), matched on loom's panic message.
//!
//! Exhaustive vs bounded: the standalone 2-party barrier check is exhaustive. The rest use a
//! preemption bound (every interleaving with at most that many preemptions; blocking switches
//! are unbounded): the full protocol has four barrier crossings per step, and an unbounded
//! search of even 2 workers x 2 steps does not finish in minutes, while each extra preemption
//! multiplies the count by about 3. Bounds: 2 workers: 4-5 preemptions; 3 workers: 1 over two
//! steps and 2 over one step. Broken variants: a test passes only if loom finds the bug within
//! its bound. `LOOM_MAX_PREEMPTIONS` overrides the bound of the protocol checks. Run with
//! `cargo test --release --features loom --test loom`.

use cllm::sync::Loom;
use cllm::train::{Engine, Fault, Reference, ScaleWorkload, StepBatch, Strategy, TrainerOptions};
use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

const PARAMS: usize = 4;
/// Two chunks of two floats: enough to have several reducers and optimizer writers.
const CHUNK: usize = 2;

/// One model-checked configuration of the protocol.
#[derive(Clone, Copy, Debug)]
struct Case {
    strategy: Strategy,
    workers: usize,
    /// Micro-batches per step (one row each).
    spheres: usize,
    steps: u64,
    /// (step, micro-batch) pairs whose gradient gets a NaN.
    inject_nan: &'static [(u64, usize)],
    preemption_bound: Option<usize>,
}

impl Case {
    fn new(strategy: Strategy, workers: usize, spheres: usize, steps: u64, bound: usize) -> Self {
        Case { strategy, workers, spheres, steps, inject_nan: &[], preemption_bound: Some(bound) }
    }

    fn with_nan(self, inject_nan: &'static [(u64, usize)]) -> Self {
        Case { inject_nan, ..self }
    }

    fn options(&self) -> TrainerOptions {
        TrainerOptions {
            threads: self.workers,
            spheres: self.spheres,
            strategy: self.strategy,
            clip_norm: 10.0,
            chunk_size: CHUNK,
            max_skipped_steps: 0,
            inject_nan: self.inject_nan.to_vec(),
            ..TrainerOptions::default()
        }
    }

    /// The fake workload; under segmented with the order probe, so that the bits of the sum
    /// show the order of its additions (the summation tree's).
    fn workload<B: cllm::sync::Backend>(&self, w: ScaleWorkload<B>) -> ScaleWorkload<B> {
        if self.strategy == Strategy::Segmented {
            w.probing_order()
        } else {
            w
        }
    }

    fn reference(&self, opts: &TrainerOptions) -> Reference<ScaleWorkload> {
        let w = self.workload(ScaleWorkload::new(PARAMS, self.spheres));
        Reference::new(w, initial_params(), self.spheres, 1, opts)
    }

    fn engine(&self, opts: &TrainerOptions, fault: Option<Fault>) -> Engine<Loom, ScaleWorkload<Loom>> {
        let w = self.workload(ScaleWorkload::tracked(PARAMS, self.spheres, CHUNK));
        match fault {
            None => Engine::new(w, initial_params(), self.spheres, 1, opts),
            Some(f) => Engine::with_fault(w, initial_params(), self.spheres, 1, opts, f),
        }
        .unwrap()
    }
}

fn initial_params() -> Vec<f32> {
    vec![1.0, -2.0, 0.5, 3.0]
}

/// One row per micro-batch, one token per row; the tokens change every step so a stale batch
/// shows in the gradients.
fn batch(step: u64, rows: usize) -> StepBatch {
    let inputs: Vec<u32> = (0..rows).map(|r| ((step as usize * 3 + r) % 5) as u32).collect();
    StepBatch { rows, seq: 1, targets: inputs.clone(), inputs }
}

fn close(a: &[f32], b: &[f32]) -> bool {
    a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-5 * (1.0 + y.abs()))
}

/// Runs `case.steps` steps on the loom backend and checks, after each, every invariant:
/// - each micro-batch is computed exactly once per step (the workload's call counters);
/// - the weights equal the serial oracle's: bitwise for segmented (and for any strategy while
///   every sum is exact, in step 1), within rounding for the arrival-order lock strategies; the
///   skip decisions and Adam's t agree;
/// - segmented: the summed gradient equals the serial tree oracle's bit for bit, with the order
///   probe on, so every leaf was merged exactly once and in tree order;
/// - no access overlaps a conflicting one: AdamW against a read of the weights, a reduction
///   against a slot being written, the update phase's write of the derived copy against a
///   compute reading it; the tracked cells make any of them a causality violation, including
///   the coordinator's final tracked read of the weights after the closing barrier;
/// - no lost wake-up: every barrier crossing completes, and shutdown joins every worker (a
///   deadlock fails the check).
fn run_steps(case: &Case) {
    let opts = case.options();
    let mut eng = case.engine(&opts, None);
    let mut reference = case.reference(&opts);
    for step in 1..=case.steps {
        let b = batch(step, case.spheres);
        let rep = eng.step(&b.inputs, &b.targets, 0.1).unwrap();
        let want = reference.step(&b, 0.1);
        assert_eq!(rep.skipped_spheres, want.skipped_spheres);
        assert_eq!(rep.update_skipped, want.update_skipped);
        for m in 0..case.spheres {
            assert_eq!(eng.workload().calls(m), step as usize, "micro-batch {m} computed once per step");
        }
        if case.strategy == Strategy::Segmented && !want.update_skipped {
            assert_sum_is_the_oracles(&eng, &reference);
        }
        if case.strategy == Strategy::Segmented || step == 1 {
            assert_eq!(eng.params(), &reference.params[..], "step {step}: weights differ from the serial reference");
        } else {
            assert!(
                close(eng.params(), &reference.params),
                "step {step}: {:?} vs {:?}",
                eng.params(),
                reference.params
            );
        }
        assert_eq!(eng.adam_state().2, reference.t);
    }
    eng.with_params(|p| assert!(p.iter().all(|x| x.is_finite())));
    eng.shutdown().unwrap();
}

/// The message [`Failure::WrongSum`] is matched on.
const WRONG_SUM: &str = "summed gradient differs from the serial tree oracle";

fn assert_sum_is_the_oracles(eng: &Engine<Loom, ScaleWorkload<Loom>>, reference: &Reference<ScaleWorkload>) {
    let same = eng.grad_sum().iter().zip(&reference.sum).all(|(a, b)| a.to_bits() == b.to_bits());
    assert!(same, "{WRONG_SUM}: {:?} vs {:?}", eng.grad_sum(), reference.sum);
}

fn check(name: &str, bound: Option<usize>, f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    if std::env::var("LOOM_MAX_PREEMPTIONS").is_err() {
        b.preemption_bound = bound;
    }
    let t = Instant::now();
    b.check(f);
    eprintln!("loom {name}: preemption bound {bound:?}, {:.1?}", t.elapsed());
}

/// Model-checks [`run_steps`] over `case`.
fn explore(case: Case) {
    check(&format!("{case:?}"), case.preemption_bound, move || run_steps(&case));
}

mod no_lost_wake_up {
    //! The barrier on its own: `parties` threads (the main one included) cross it `rounds`
    //! times; nobody leaves a round before everybody has arrived in it, exactly one leader per
    //! round, and nobody sleeps through the last arrival (loom reports that as a deadlock).
    use super::*;

    fn barrier_rounds(parties: usize, rounds: usize) {
        use cllm::train::barrier::Barrier;
        use loom::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        let b = loom::sync::Arc::new(Barrier::<Loom>::new(parties));
        let hits = loom::sync::Arc::new(AtomicUsize::new(0));
        let body = move |b: &Barrier<Loom>, hits: &AtomicUsize| {
            let mut leaders = 0;
            for round in 0..rounds {
                hits.fetch_add(1, SeqCst);
                leaders += b.wait().unwrap() as usize;
                assert!(hits.load(SeqCst) >= parties * (round + 1), "left round {round} early");
            }
            leaders
        };
        let hs: Vec<_> = (1..parties)
            .map(|_| {
                let (b, hits) = (b.clone(), hits.clone());
                loom::thread::spawn(move || body(&b, &hits))
            })
            .collect();
        let mut leaders = body(&b, &hits);
        for h in hs {
            leaders += h.join().unwrap();
        }
        assert_eq!(leaders, rounds, "exactly one leader per round");
    }

    #[test]
    fn barrier_2_parties_3_rounds_exhaustive() {
        check("barrier 2 parties x3", None, || barrier_rounds(2, 3));
    }

    #[test]
    fn barrier_3_parties_2_rounds() {
        check("barrier 3 parties x2", Some(3), || barrier_rounds(3, 2));
    }
}

mod final_weights_equal_the_serial_oracle {
    //! segmented at 2 and 3 workers: bit for bit the serial oracle's weights.
    use super::*;

    #[test]
    fn segmented_2_workers_2_steps() {
        explore(Case::new(Strategy::Segmented, 2, 3, 2, 5));
    }

    #[test]
    fn segmented_3_workers_1_step() {
        explore(Case::new(Strategy::Segmented, 3, 3, 1, 2));
    }
}

mod adamw_never_overlaps_a_read {
    //! 3 workers over 2 steps: a fast worker's compute of step 2 (reading the weights and the
    //! derived copy) against a slow worker's AdamW of step 1 (writing both), unless "done" and
    //! "start" order them.
    use super::*;

    #[test]
    fn segmented_3_workers_2_steps() {
        explore(Case::new(Strategy::Segmented, 3, 3, 2, 1));
    }
}

mod each_micro_batch_is_computed_exactly_once {
    //! The lock strategies, whose micro-batches are tickets drawn from one atomic counter; the
    //! accumulator under the gradient mutex loses none of them.
    use super::*;

    #[test]
    fn gradient_lock_2_workers_2_steps() {
        explore(Case::new(Strategy::GradientLock, 2, 3, 2, 4));
    }

    #[test]
    fn model_lock_2_workers_2_steps() {
        explore(Case::new(Strategy::ModelLock, 2, 3, 2, 4));
    }

    #[test]
    fn gradient_lock_3_workers_2_steps() {
        explore(Case::new(Strategy::GradientLock, 3, 3, 2, 1));
    }

    #[test]
    fn model_lock_3_workers_2_steps() {
        explore(Case::new(Strategy::ModelLock, 3, 3, 2, 1));
    }
}

mod no_sub_tree_is_combined_before_it_is_final {
    //! 2 workers, 4 micro-batches: each worker merges two leaves into one sub-tree in place, so
    //! a top combine that ran early would read a buffer still being written (a causality
    //! violation) or a stale gradient (the comparison with the oracle fails).
    use super::*;

    #[test]
    fn segmented_2_workers_4_micro_batches() {
        explore(Case::new(Strategy::Segmented, 2, 4, 1, 4));
    }
}

mod every_leaf_is_merged_once_in_tree_order {
    //! Ranges that do not align with the tree: 2 workers over 5 micro-batches (worker 1 holds
    //! two blocks, [2, 4) merged in place and [4, 5)), and 3 over 5. A buffer reused while
    //! still read is a causality violation; a leaf lost, doubled or added out of tree order
    //! changes the summed gradient's bits (the order probe).
    use super::*;

    #[test]
    fn segmented_2_workers_5_micro_batches() {
        explore(Case::new(Strategy::Segmented, 2, 5, 1, 3));
    }

    #[test]
    fn segmented_3_workers_5_micro_batches() {
        explore(Case::new(Strategy::Segmented, 3, 5, 1, 1));
    }
}

mod invalid_micro_batches_are_skipped_by_every_worker_alike {
    //! A NaN gradient is excluded by every worker from the same results (segmented: through
    //! the fused scan's slow path), so all agree on the valid count and on the update.
    use super::*;

    #[test]
    fn segmented_one_invalid_in_step_1() {
        explore(Case::new(Strategy::Segmented, 2, 3, 2, 4).with_nan(&[(1, 1)]));
    }

    #[test]
    fn gradient_lock_one_invalid_in_step_1() {
        explore(Case::new(Strategy::GradientLock, 2, 3, 2, 4).with_nan(&[(1, 1)]));
    }

    #[test]
    fn all_invalid_steps_skip_the_update_and_stop_at_the_limit() {
        check("all invalid", Some(4), || {
            let case = Case::new(Strategy::Segmented, 2, 2, 2, 4).with_nan(&[(1, 0), (1, 1), (2, 0), (2, 1)]);
            let opts = TrainerOptions { max_skipped_steps: 2, ..case.options() };
            let mut eng = case.engine(&opts, None);
            let b = batch(1, 2);
            let rep = eng.step(&b.inputs, &b.targets, 0.1).unwrap();
            assert!(rep.update_skipped);
            assert_eq!(rep.skipped_spheres, vec![0, 1]);
            assert_eq!(eng.params(), &initial_params()[..]);
            assert_eq!(eng.adam_state().2, 0);
            let b = batch(2, 2);
            assert!(eng.step(&b.inputs, &b.targets, 0.1).is_err());
            eng.with_params(|p| assert_eq!(p, &initial_params()[..]));
            eng.shutdown().unwrap();
        });
    }
}

/// The kinds of failure loom reports, told apart by its panic message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    /// Every thread blocked: "deadlock; threads = [...]".
    Deadlock,
    /// A tracked cell written by two threads unordered: "Causality violation: Concurrent write
    /// accesses to `UnsafeCell`."
    WriteWriteRace,
    /// A tracked cell read and written unordered: "Causality violation: Concurrent read and
    /// write accesses ...".
    ReadWriteRace,
    /// The summed gradient is not the serial tree oracle's (the run's own assertion, with the
    /// order probe on): an addition out of tree order.
    WrongSum,
}

fn panic_text(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("")
}

fn failure_of(text: &str) -> Option<Failure> {
    if text.starts_with("deadlock; threads = ") {
        Some(Failure::Deadlock)
    } else if text.starts_with("Causality violation: Concurrent write accesses to `UnsafeCell`") {
        Some(Failure::WriteWriteRace)
    } else if text.starts_with("Causality violation: Concurrent read and write accesses") {
        Some(Failure::ReadWriteRace)
    } else if text.starts_with(WRONG_SUM) {
        Some(Failure::WrongSum)
    } else {
        None
    }
}

/// Passes only if loom, within `case`'s bound, finds `expected` in the broken variant `fault`:
/// `case.steps` steps, then shutdown; when `expected` is [`Failure::WrongSum`], each step's
/// summed gradient is compared with the serial tree oracle's. Any other failure (another kind,
/// a failed assertion or step) fails the test with loom's message.
fn expect_bug(fault: Fault, case: Case, expected: Failure) {
    let t = Instant::now();
    let r = catch_unwind(AssertUnwindSafe(|| {
        let mut b = loom::model::Builder::new();
        b.preemption_bound = case.preemption_bound;
        b.check(move || {
            let mut eng = case.engine(&case.options(), Some(fault));
            let mut reference = case.reference(&case.options());
            for step in 1..=case.steps {
                let b = batch(step, case.spheres);
                eng.step(&b.inputs, &b.targets, 0.1).unwrap();
                if expected == Failure::WrongSum {
                    reference.step(&b, 0.1);
                    assert_sum_is_the_oracles(&eng, &reference);
                }
            }
            eng.shutdown().unwrap();
        });
    }));
    eprintln!("loom broken {fault:?}: preemption bound {:?}, {:.1?}", case.preemption_bound, t.elapsed());
    let payload = r.err().unwrap_or_else(|| panic!("loom did not find the bug in the broken variant {fault:?}"));
    let text = panic_text(payload.as_ref());
    assert_eq!(failure_of(text), Some(expected), "loom found another failure in {fault:?} than expected: {text}");
}

mod broken_variants_are_caught {
    use super::*;

    #[test]
    fn barrier_without_generation_loses_a_wake_up() {
        expect_bug(Fault::BarrierWithoutGeneration, Case::new(Strategy::Segmented, 2, 2, 2, 2), Failure::Deadlock);
    }

    #[test]
    fn unlocked_accumulation_writes_the_sum_concurrently() {
        let case = Case::new(Strategy::GradientLock, 2, 2, 1, 2);
        expect_bug(Fault::UnlockedAccumulation, case, Failure::WriteWriteRace);
    }

    #[test]
    fn reducing_before_computed_reads_a_slot_being_written() {
        let case = Case::new(Strategy::Segmented, 2, 2, 1, 2);
        expect_bug(Fault::SkipComputedBarrier, case, Failure::ReadWriteRace);
    }

    #[test]
    fn inverted_lock_order_deadlocks() {
        expect_bug(Fault::LockOrderInversion, Case::new(Strategy::ModelLock, 2, 2, 1, 2), Failure::Deadlock);
    }

    #[test]
    fn repacking_during_compute_writes_the_derived_copy_under_a_read() {
        let case = Case::new(Strategy::Segmented, 2, 2, 2, 2);
        expect_bug(Fault::RepackDuringCompute, case, Failure::ReadWriteRace);
    }

    #[test]
    fn merging_in_arrival_order_breaks_the_tree_order() {
        // Worker 0 holds block [0, 1), worker 1 blocks [1, 2) and [2, 3): when worker 1
        // finishes first the sum is (g1 + g2) + g0 instead of (g0 + g1) + g2.
        let case = Case::new(Strategy::Segmented, 2, 3, 1, 2);
        expect_bug(Fault::ArrivalOrderMerge, case, Failure::WrongSum);
    }
}
