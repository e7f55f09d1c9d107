//! shuttle checks of the real step protocol (`Engine` on the `Shuttle` backend) with 8 workers
//! over several steps: randomized schedules (`check_random`) and PCT (`check_pct`). On a
//! failure shuttle prints the schedule, which `shuttle::replay` reproduces.
//!
//! The broken protocol variants must be caught here too: shuttle reports the deadlocks itself,
//! and the `Shuttle` backend's cells panic on overlapping conflicting accesses.
#![cfg(feature = "shuttle")]

use cllm::sync::Shuttle;
use cllm::train::{Engine, Fault, Reference, ScaleWorkload, StepBatch, Strategy, TrainerOptions};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

const PARAMS: usize = 12;
const CHUNK: usize = 4;
const WORKERS: usize = 8;
const SPHERES: usize = 8;
const STEPS: u64 = 3;

fn options(strategy: Strategy) -> TrainerOptions {
    TrainerOptions {
        threads: WORKERS,
        spheres: SPHERES,
        strategy,
        clip_norm: 50.0,
        chunk_size: CHUNK,
        max_skipped_steps: 0,
        inject_nan: vec![(2, 3)],
        ..TrainerOptions::default()
    }
}

fn initial_params() -> Vec<f32> {
    (0..PARAMS).map(|i| i as f32 - 5.0).collect()
}

fn batch(step: u64) -> StepBatch {
    let inputs: Vec<u32> = (0..SPHERES).map(|r| ((step as usize * 7 + r) % 11) as u32).collect();
    StepBatch { rows: SPHERES, seq: 1, targets: inputs.clone(), inputs }
}

/// Three steps (one with an invalid micro-batch), compared with the serial reference, then
/// shutdown.
fn protocol(strategy: Strategy) {
    let opts = options(strategy);
    let mut eng = Engine::<Shuttle, _>::new(ScaleWorkload::new(PARAMS, SPHERES), initial_params(), SPHERES, 1, &opts)
        .expect("engine starts");
    let mut reference = Reference::new(ScaleWorkload::new(PARAMS, SPHERES), initial_params(), SPHERES, 1, &opts);
    for step in 1..=STEPS {
        let b = batch(step);
        let rep = eng.step(&b.inputs, &b.targets, 0.05).expect("step succeeds");
        let want = reference.step(&b, 0.05);
        assert_eq!(rep.skipped_spheres, want.skipped_spheres);
        for m in 0..SPHERES {
            assert_eq!(eng.workload().calls(m), step as usize, "micro-batch {m} computed once per step");
        }
        if strategy == Strategy::Segmented {
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

fn timed(name: &str, f: impl FnOnce()) {
    let t = Instant::now();
    f();
    eprintln!("shuttle {name}: {:.1?}", t.elapsed());
}

const RANDOM_ITERS: usize = 10_000;
const PCT_ITERS: usize = 5_000;
const PCT_DEPTH: usize = 3;

#[test]
fn segmented_random_schedules() {
    timed("segmented random", || shuttle::check_random(|| protocol(Strategy::Segmented), RANDOM_ITERS));
}

#[test]
fn segmented_pct_schedules() {
    timed("segmented pct", || shuttle::check_pct(|| protocol(Strategy::Segmented), PCT_ITERS, PCT_DEPTH));
}

#[test]
fn gradient_lock_random_and_pct_schedules() {
    timed("gradient-lock random", || shuttle::check_random(|| protocol(Strategy::GradientLock), RANDOM_ITERS));
    timed("gradient-lock pct", || shuttle::check_pct(|| protocol(Strategy::GradientLock), PCT_ITERS, PCT_DEPTH));
}

#[test]
fn model_lock_random_and_pct_schedules() {
    timed("model-lock random", || shuttle::check_random(|| protocol(Strategy::ModelLock), RANDOM_ITERS));
    timed("model-lock pct", || shuttle::check_pct(|| protocol(Strategy::ModelLock), PCT_ITERS, PCT_DEPTH));
}

/// Runs the broken variant under random and PCT schedules; passes only if shuttle fails it.
fn expect_bug(fault: Fault, strategy: Strategy, iters: usize) {
    let run = move || {
        let opts = TrainerOptions { inject_nan: vec![], ..options(strategy) };
        let mut eng = Engine::<Shuttle, _>::with_fault(
            ScaleWorkload::new(PARAMS, SPHERES),
            initial_params(),
            SPHERES,
            1,
            &opts,
            fault,
        )
        .expect("engine starts");
        for step in 1..=2 {
            let b = batch(step);
            eng.step(&b.inputs, &b.targets, 0.05).expect("step succeeds");
        }
        eng.shutdown().expect("clean shutdown");
    };
    let t = Instant::now();
    let random = catch_unwind(AssertUnwindSafe(|| shuttle::check_random(run, iters)));
    let pct = catch_unwind(AssertUnwindSafe(|| shuttle::check_pct(run, iters, PCT_DEPTH)));
    eprintln!("shuttle broken {fault:?}: {:.1?}", t.elapsed());
    assert!(random.is_err(), "check_random did not find {fault:?}");
    assert!(pct.is_err(), "check_pct did not find {fault:?}");
}

#[test]
fn broken_barrier_without_generation_is_caught() {
    expect_bug(Fault::BarrierWithoutGeneration, Strategy::Segmented, 1000);
}

#[test]
fn broken_unlocked_accumulation_is_caught() {
    expect_bug(Fault::UnlockedAccumulation, Strategy::GradientLock, 1000);
}

#[test]
fn broken_reduce_before_computed_is_caught() {
    expect_bug(Fault::SkipComputedBarrier, Strategy::Segmented, 1000);
}

#[test]
fn broken_lock_order_inversion_is_caught() {
    expect_bug(Fault::LockOrderInversion, Strategy::ModelLock, 1000);
}
