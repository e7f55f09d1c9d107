//! loom model checks of the real step protocol (`cllm::train::Engine` on the `Loom` backend).
//!
//! The workload is `ScaleWorkload` (4 parameters in 2 chunks, exact fake gradients); the
//! engine, barrier, strategies, worker loop and shutdown are the production code. The main loom
//! thread is the coordinator, which is also worker 0, so "N workers" means N loom threads.
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
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

const PARAMS: usize = 4;
/// Two chunks of two floats: enough to have several reducers and optimizer writers.
const CHUNK: usize = 2;

fn options(threads: usize, spheres: usize, strategy: Strategy) -> TrainerOptions {
    TrainerOptions {
        threads,
        spheres,
        strategy,
        clip_norm: 10.0,
        chunk_size: CHUNK,
        max_skipped_steps: 0,
        ..TrainerOptions::default()
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

/// Runs `steps` steps on the loom backend and checks every step against the serial reference:
/// bitwise for segmented (and for any strategy while every sum is exact), within rounding for
/// the arrival-order strategies; each micro-batch computed exactly once per step.
fn protocol(opts: &TrainerOptions, rows: usize, steps: u64) {
    let s = opts.spheres;
    let mut eng = Engine::<Loom, _>::new(ScaleWorkload::new(PARAMS, s), initial_params(), rows, 1, opts).unwrap();
    let mut reference = Reference::new(ScaleWorkload::new(PARAMS, s), initial_params(), rows, 1, opts);
    for step in 1..=steps {
        let b = batch(step, rows);
        let rep = eng.step(&b.inputs, &b.targets, 0.1).unwrap();
        let want = reference.step(&b, 0.1);
        assert_eq!(rep.skipped_spheres, want.skipped_spheres);
        assert_eq!(rep.update_skipped, want.update_skipped);
        for m in 0..s {
            assert_eq!(eng.workload().calls(m), step as usize, "micro-batch {m} computed once per step");
        }
        if opts.strategy == Strategy::Segmented || step == 1 {
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
    // The tracked read proves the closing gate orders the last AdamW writes before this read.
    eng.with_params(|p| assert!(p.iter().all(|x| x.is_finite())));
    eng.shutdown().unwrap();
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

/// Passes only if loom finds a failure (deadlock, data race or assertion) in `f`.
fn expect_bug(name: &str, bound: Option<usize>, f: impl Fn() + Sync + Send + 'static) {
    let t = Instant::now();
    let r = catch_unwind(AssertUnwindSafe(|| {
        let mut b = loom::model::Builder::new();
        b.preemption_bound = bound;
        b.check(f);
    }));
    eprintln!("loom {name} (broken variant): preemption bound {bound:?}, {:.1?}", t.elapsed());
    assert!(r.is_err(), "loom did not find the bug in the broken variant {name}");
}

// 1. Barrier and step protocol --------------------------------------------------------------

#[test]
fn segmented_two_workers_two_steps_then_shutdown() {
    check("segmented 2 workers 2 steps", Some(5), || protocol(&options(2, 3, Strategy::Segmented), 3, 2));
}

#[test]
fn segmented_three_workers_two_steps_then_shutdown() {
    check("segmented 3 workers 2 steps", Some(1), || protocol(&options(3, 3, Strategy::Segmented), 3, 2));
}

#[test]
fn segmented_three_workers_one_step_then_shutdown() {
    check("segmented 3 workers 1 step", Some(2), || protocol(&options(3, 3, Strategy::Segmented), 3, 1));
}

/// The barrier on its own: `parties` threads (the main one included) cross it `rounds` times;
/// nobody leaves a round before everybody has arrived in it.
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
fn barrier_two_parties_three_rounds_exhaustive() {
    check("barrier 2 parties x3", None, || barrier_rounds(2, 3));
}

#[test]
fn barrier_three_parties_two_rounds() {
    check("barrier 3 parties x2", Some(3), || barrier_rounds(3, 2));
}

// 2. Lock strategies ------------------------------------------------------------------------

#[test]
fn gradient_lock_two_workers_two_steps() {
    check("gradient-lock 2 workers 2 steps", Some(4), || protocol(&options(2, 3, Strategy::GradientLock), 3, 2));
}

#[test]
fn model_lock_two_workers_two_steps() {
    check("model-lock 2 workers 2 steps", Some(4), || protocol(&options(2, 3, Strategy::ModelLock), 3, 2));
}

#[test]
fn gradient_lock_three_workers_two_steps() {
    check("gradient-lock 3 workers 2 steps", Some(1), || protocol(&options(3, 3, Strategy::GradientLock), 3, 2));
}

#[test]
fn model_lock_three_workers_two_steps() {
    check("model-lock 3 workers 2 steps", Some(1), || protocol(&options(3, 3, Strategy::ModelLock), 3, 2));
}

// 3. Segmented reduction waits for every micro-batch ----------------------------------------

#[test]
fn segmented_reduces_only_after_every_micro_batch_uneven_split() {
    // 2 workers, 4 micro-batches: each worker computes two, so a reducer that ran early would
    // read a slot still being written (loom: causality violation) or a stale gradient (the
    // comparison with the reference fails).
    check("segmented uneven split", Some(4), || protocol(&options(2, 4, Strategy::Segmented), 4, 1));
}

// 4. Invalid micro-batches -------------------------------------------------------------------

#[test]
fn invalid_micro_batch_is_skipped_under_every_interleaving() {
    for strategy in [Strategy::Segmented, Strategy::GradientLock] {
        check("one invalid micro-batch", Some(4), move || {
            let opts = TrainerOptions { inject_nan: vec![(1, 1)], ..options(2, 3, strategy) };
            protocol(&opts, 3, 2)
        });
    }
}

#[test]
fn all_invalid_step_skips_the_update_then_errors_after_the_limit() {
    check("all invalid", Some(4), || {
        let opts = TrainerOptions {
            inject_nan: vec![(1, 0), (1, 1), (2, 0), (2, 1)],
            max_skipped_steps: 2,
            ..options(2, 2, Strategy::Segmented)
        };
        let mut eng = Engine::<Loom, _>::new(ScaleWorkload::new(PARAMS, 2), initial_params(), 2, 1, &opts).unwrap();
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

// 5. Broken variants: each test passes only because loom finds the bug ---------------------

#[test]
fn broken_barrier_without_generation_is_caught() {
    expect_bug("barrier without generation", Some(2), || {
        let opts = options(2, 2, Strategy::Segmented);
        let mut eng = Engine::<Loom, _>::with_fault(
            ScaleWorkload::new(PARAMS, 2),
            initial_params(),
            2,
            1,
            &opts,
            Fault::BarrierWithoutGeneration,
        )
        .unwrap();
        for step in 1..=2 {
            let b = batch(step, 2);
            eng.step(&b.inputs, &b.targets, 0.1).unwrap();
        }
        eng.shutdown().unwrap();
    });
}

#[test]
fn broken_unlocked_accumulation_is_caught() {
    expect_bug("accumulation without the gradient lock", Some(2), || {
        let opts = options(2, 2, Strategy::GradientLock);
        let mut eng = Engine::<Loom, _>::with_fault(
            ScaleWorkload::new(PARAMS, 2),
            initial_params(),
            2,
            1,
            &opts,
            Fault::UnlockedAccumulation,
        )
        .unwrap();
        let b = batch(1, 2);
        eng.step(&b.inputs, &b.targets, 0.1).unwrap();
        eng.shutdown().unwrap();
    });
}

#[test]
fn broken_reduce_before_computed_is_caught() {
    expect_bug("reduce before every micro-batch is computed", Some(2), || {
        let opts = options(2, 2, Strategy::Segmented);
        let mut eng = Engine::<Loom, _>::with_fault(
            ScaleWorkload::new(PARAMS, 2),
            initial_params(),
            2,
            1,
            &opts,
            Fault::SkipComputedBarrier,
        )
        .unwrap();
        let b = batch(1, 2);
        eng.step(&b.inputs, &b.targets, 0.1).unwrap();
        eng.shutdown().unwrap();
    });
}

#[test]
fn broken_lock_order_inversion_is_caught() {
    expect_bug("model-lock with inverted lock order", Some(2), || {
        let opts = options(2, 2, Strategy::ModelLock);
        let mut eng = Engine::<Loom, _>::with_fault(
            ScaleWorkload::new(PARAMS, 2),
            initial_params(),
            2,
            1,
            &opts,
            Fault::LockOrderInversion,
        )
        .unwrap();
        let b = batch(1, 2);
        eng.step(&b.inputs, &b.targets, 0.1).unwrap();
        eng.shutdown().unwrap();
    });
}
