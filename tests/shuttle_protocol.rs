//! shuttle checks of the real step protocol (`Engine` on the `Shuttle` backend) with 8 workers
//! (and 5 over 8 micro-batches) over several steps: randomized schedules (`check_random`) and PCT (`check_pct`). On a
//! failure shuttle prints the schedule, which `shuttle::replay` reproduces.
//!
//! Tests are named after the invariant they check, as `invariant::configuration`; every run of
//! the protocol ([`run_steps`]) checks all the invariants at once. The workload's derived copy
//! of the weights (what the GPT model's shared packing is) lives in the backend's cells too.
//!
//! The broken protocol variants must be caught here too, each with the one kind of failure
//! its bug causes ([`Failure`]): shuttle reports deadlocks itself, and the `Shuttle` backend's
//! cells panic on overlapping conflicting accesses, naming the two kinds of access.
#![cfg(feature = "shuttle")]

use cllm::sync::Shuttle;
use cllm::train::{Engine, Fault, Reference, ScaleWorkload, StepBatch, Strategy, TrainerOptions};
use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

const PARAMS: usize = 12;
const CHUNK: usize = 4;

/// One checked configuration: `workers` workers, `spheres` micro-batches, `steps` steps.
#[derive(Clone, Copy, Debug)]
struct Case {
    strategy: Strategy,
    workers: usize,
    spheres: usize,
    steps: u64,
    /// Whether micro-batch 3 of step 2 gets a NaN gradient.
    invalid_micro_batch: bool,
}

impl Case {
    fn new(strategy: Strategy, workers: usize, steps: u64) -> Self {
        Case { strategy, workers, spheres: workers, steps, invalid_micro_batch: true }
    }

    fn options(&self) -> TrainerOptions {
        TrainerOptions {
            threads: self.workers,
            spheres: self.spheres,
            strategy: self.strategy,
            clip_norm: 50.0,
            chunk_size: CHUNK,
            max_skipped_steps: 0,
            inject_nan: if self.invalid_micro_batch { vec![(2, 3)] } else { vec![] },
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

    fn reference(&self) -> Reference<ScaleWorkload> {
        let w = self.workload(ScaleWorkload::new(PARAMS, self.spheres));
        Reference::new(w, initial_params(), self.spheres, 1, &self.options())
    }

    fn engine(&self, fault: Option<Fault>) -> Engine<Shuttle, ScaleWorkload<Shuttle>> {
        let (opts, s) = (self.options(), self.spheres);
        let w = self.workload(ScaleWorkload::tracked(PARAMS, s, CHUNK));
        match fault {
            None => Engine::new(w, initial_params(), s, 1, &opts),
            Some(f) => Engine::with_fault(w, initial_params(), s, 1, &opts, f),
        }
        .expect("engine starts")
    }

    fn batch(&self, step: u64) -> StepBatch {
        let inputs: Vec<u32> = (0..self.spheres).map(|r| ((step as usize * 7 + r) % 11) as u32).collect();
        StepBatch { rows: self.spheres, seq: 1, targets: inputs.clone(), inputs }
    }
}

fn initial_params() -> Vec<f32> {
    (0..PARAMS).map(|i| i as f32 - 5.0).collect()
}

/// `case.steps` steps, each compared with the serial oracle: every micro-batch computed exactly
/// once, the skip decisions alike, the weights equal (bitwise for segmented, within rounding
/// for the lock strategies), segmented's summed gradient bitwise the tree oracle's (with the
/// order probe: every leaf merged once, in tree order); no conflicting accesses overlap (the
/// cells panic), no deadlock (shuttle reports it), then a tracked read of the weights and a
/// clean shutdown.
fn run_steps(case: Case) {
    let s = case.spheres;
    let mut eng = case.engine(None);
    let mut reference = case.reference();
    for step in 1..=case.steps {
        let b = case.batch(step);
        let rep = eng.step(&b.inputs, &b.targets, 0.05).expect("step succeeds");
        let want = reference.step(&b, 0.05);
        assert_eq!(rep.skipped_spheres, want.skipped_spheres);
        for m in 0..s {
            assert_eq!(eng.workload().calls(m), step as usize, "micro-batch {m} computed once per step");
        }
        if case.strategy == Strategy::Segmented {
            assert_sum_is_the_oracles(&eng, &reference);
            assert_eq!(eng.params(), &reference.params[..], "segmented must equal the serial reference bit for bit");
        } else {
            for (a, b) in eng.params().iter().zip(&reference.params) {
                assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "step {step}: {a} vs {b}");
            }
        }
    }
    eng.with_params(|p| assert!(p.iter().all(|x| x.is_finite())));
    eng.shutdown().expect("clean shutdown");
}

/// The message [`Failure::WrongSum`] is matched on.
const WRONG_SUM: &str = "summed gradient differs from the serial tree oracle";

fn assert_sum_is_the_oracles(eng: &Engine<Shuttle, ScaleWorkload<Shuttle>>, reference: &Reference<ScaleWorkload>) {
    let same = eng.grad_sum().iter().zip(&reference.sum).all(|(a, b)| a.to_bits() == b.to_bits());
    assert!(same, "{WRONG_SUM}: {:?} vs {:?}", eng.grad_sum(), reference.sum);
}

fn timed(name: &str, f: impl FnOnce()) {
    let t = Instant::now();
    f();
    eprintln!("shuttle {name}: {:.1?}", t.elapsed());
}

const RANDOM_ITERS: usize = 10_000;
const PCT_ITERS: usize = 5_000;
const PCT_DEPTH: usize = 3;
/// The standard configuration: 8 workers, 3 steps, one invalid micro-batch in step 2.
const WORKERS: usize = 8;
const STEPS: u64 = 3;

fn random(case: Case) {
    timed(&format!("{case:?} random"), || shuttle::check_random(move || run_steps(case), RANDOM_ITERS));
}

fn pct(case: Case) {
    timed(&format!("{case:?} pct"), || shuttle::check_pct(move || run_steps(case), PCT_ITERS, PCT_DEPTH));
}

mod final_weights_equal_the_serial_oracle {
    use super::*;

    #[test]
    fn segmented_8_workers_3_steps_random_schedules() {
        random(Case::new(Strategy::Segmented, WORKERS, STEPS));
    }

    #[test]
    fn segmented_8_workers_3_steps_pct_schedules() {
        pct(Case::new(Strategy::Segmented, WORKERS, STEPS));
    }
}

mod every_leaf_is_merged_once_in_tree_order {
    //! 5 workers over 8 micro-batches: ranges that do not align with the tree (the workers'
    //! blocks: [0, 1) | [1, 2) [2, 3) | [3, 4) | [4, 6) | [6, 8)), merged in place and combined
    //! in tree order, with micro-batch 3 of step 2 skipped.
    use super::*;

    #[test]
    fn segmented_5_workers_8_micro_batches_random_and_pct_schedules() {
        let case = Case { spheres: 8, ..Case::new(Strategy::Segmented, 5, STEPS) };
        random(case);
        pct(case);
    }
}

mod each_micro_batch_is_computed_exactly_once {
    //! The lock strategies, whose micro-batches are tickets drawn from one atomic counter.
    use super::*;

    #[test]
    fn gradient_lock_8_workers_3_steps_random_and_pct_schedules() {
        random(Case::new(Strategy::GradientLock, WORKERS, STEPS));
        pct(Case::new(Strategy::GradientLock, WORKERS, STEPS));
    }

    #[test]
    fn model_lock_8_workers_3_steps_random_and_pct_schedules() {
        random(Case::new(Strategy::ModelLock, WORKERS, STEPS));
        pct(Case::new(Strategy::ModelLock, WORKERS, STEPS));
    }
}

/// The kinds of failure a shuttle check reports, told apart by the panic message (shuttle
/// prefixes a task's own message with the failing schedule and "original panic: ").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    /// shuttle's "deadlock! blocked tasks: [...]".
    Deadlock,
    /// A `ShuttleCell` written during another write: "data race: cell written while it is
    /// being written".
    WriteWriteRace,
    /// A `ShuttleCell` read during a write or written during a read: "data race: cell read
    /// while it is being written" or "... written while it is being read".
    ReadWriteRace,
    /// The summed gradient is not the serial tree oracle's (the run's own assertion, with the
    /// order probe on): an addition out of tree order.
    WrongSum,
}

fn panic_text(payload: &(dyn Any + Send)) -> &str {
    let text = payload.downcast_ref::<String>().map(String::as_str).or_else(|| payload.downcast_ref::<&str>().copied());
    let text = text.unwrap_or("");
    text.rsplit_once("original panic: ").map_or(text, |(_, original)| original)
}

fn failure_of(text: &str) -> Option<Failure> {
    if text.starts_with("deadlock! blocked tasks: ") {
        Some(Failure::Deadlock)
    } else if text == "data race: cell written while it is being written" {
        Some(Failure::WriteWriteRace)
    } else if text == "data race: cell read while it is being written"
        || text == "data race: cell written while it is being read"
    {
        Some(Failure::ReadWriteRace)
    } else if text.starts_with(WRONG_SUM) {
        Some(Failure::WrongSum)
    } else {
        None
    }
}

/// Runs the broken variant `fault` (two steps of `case`, no invalid micro-batch, then shutdown;
/// for [`Failure::WrongSum`], each step's summed gradient compared with the tree oracle's)
/// under random and PCT schedules; passes only if each finds `expected`. Any other failure (a
/// failed assertion or step, another kind) fails the test with shuttle's message.
fn expect_bug(fault: Fault, strategy: Strategy, expected: Failure) {
    const ITERS: usize = 1000;
    let case = Case { steps: 2, invalid_micro_batch: false, ..Case::new(strategy, WORKERS, 2) };
    let run = move || {
        let mut eng = case.engine(Some(fault));
        let mut reference = case.reference();
        for step in 1..=case.steps {
            let b = case.batch(step);
            eng.step(&b.inputs, &b.targets, 0.05).expect("step succeeds");
            if expected == Failure::WrongSum {
                reference.step(&b, 0.05);
                assert_sum_is_the_oracles(&eng, &reference);
            }
        }
        eng.shutdown().expect("clean shutdown");
    };
    let t = Instant::now();
    let random = catch_unwind(AssertUnwindSafe(|| shuttle::check_random(run, ITERS)));
    let pct = catch_unwind(AssertUnwindSafe(|| shuttle::check_pct(run, ITERS, PCT_DEPTH)));
    eprintln!("shuttle broken {fault:?}: {:.1?}", t.elapsed());
    for (scheduler, result) in [("check_random", random), ("check_pct", pct)] {
        let payload = result.err().unwrap_or_else(|| panic!("{scheduler} did not find {fault:?}"));
        let text = panic_text(payload.as_ref());
        assert_eq!(
            failure_of(text),
            Some(expected),
            "{scheduler} found another failure in {fault:?} than expected: {text}"
        );
    }
}

mod broken_variants_are_caught {
    use super::*;

    #[test]
    fn barrier_without_generation_loses_a_wake_up() {
        expect_bug(Fault::BarrierWithoutGeneration, Strategy::Segmented, Failure::Deadlock);
    }

    #[test]
    fn unlocked_accumulation_writes_the_sum_concurrently() {
        expect_bug(Fault::UnlockedAccumulation, Strategy::GradientLock, Failure::WriteWriteRace);
    }

    #[test]
    fn reducing_before_computed_reads_a_slot_being_written() {
        expect_bug(Fault::SkipComputedBarrier, Strategy::Segmented, Failure::ReadWriteRace);
    }

    #[test]
    fn inverted_lock_order_deadlocks() {
        expect_bug(Fault::LockOrderInversion, Strategy::ModelLock, Failure::Deadlock);
    }

    #[test]
    fn repacking_during_compute_writes_the_derived_copy_under_a_read() {
        expect_bug(Fault::RepackDuringCompute, Strategy::Segmented, Failure::ReadWriteRace);
    }

    #[test]
    fn merging_in_arrival_order_breaks_the_tree_order() {
        expect_bug(Fault::ArrivalOrderMerge, Strategy::Segmented, Failure::WrongSum);
    }
}
