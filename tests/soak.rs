//! Soak: the tiny model with 8 worker threads under every strategy, with NaN injected into
//! micro-batch gradients at a fixed rate (the trainer's `inject_nan` hook), for many steps.
//! Checked: no deadlock (each strategy's run has a watchdog), no thread leak (the threads of
//! this process, counted in /proc/self/task, are the same before and after), finite weights,
//! and every skip accounted (the skipped micro-batches reported are exactly the ones poisoned,
//! and a step whose every micro-batch was poisoned skips its update).
//!
//! `soak_every_strategy` runs in CI (about 10 s on 2 cores in release);
//! `soak_every_strategy_20000_steps` is the long variant:
//! `cargo test --release --test soak -- --ignored`.

use std::sync::mpsc;
use std::sync::Mutex;
use std::time::Duration;

use cllm::model::Model;
use cllm::train::{Strategy, Trainer, TrainerOptions};
use cllm::ModelConfig;

const THREADS: usize = 8;
const SPHERES: usize = 4;
const BATCH: usize = 8;
const SEQ: usize = 16;
/// No step of the tiny model takes anywhere near this; a deadlock exceeds it.
const WATCHDOG: Duration = Duration::from_secs(300);

/// The two tests share the process's thread count: one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The poisoned micro-batches: one of every 7 steps loses one micro-batch, one of every 97
/// loses all of them (never two such steps in a row, so the all-invalid limit is not reached).
fn poisoned(steps: u64) -> Vec<(u64, usize)> {
    let mut v = Vec::new();
    for s in 1..=steps {
        if s % 97 == 0 {
            v.extend((0..SPHERES).map(|m| (s, m)));
        } else if s % 7 == 0 {
            v.push((s, (s as usize / 7) % SPHERES));
        }
    }
    v
}

fn threads_of_this_process() -> usize {
    std::fs::read_dir("/proc/self/task").expect("/proc/self/task").count()
}

fn tokens(step: u64, salt: u64) -> Vec<u32> {
    (0..BATCH * SEQ).map(|i| ((i as u64 * 31 + step * 17 + salt) % 256) as u32).collect()
}

/// What one strategy's soak saw.
#[derive(Debug, Default, PartialEq)]
struct Tally {
    skipped_spheres: usize,
    skipped_updates: usize,
}

fn soak(strategy: Strategy, steps: u64) -> Tally {
    let inject = poisoned(steps);
    let opts = TrainerOptions {
        threads: THREADS,
        spheres: SPHERES,
        strategy,
        inject_nan: inject.clone(),
        ..Default::default()
    };
    let mut trainer = Trainer::new(Model::new(ModelConfig::tiny(), 7), BATCH, SEQ, opts).expect("trainer");
    let mut tally = Tally::default();
    for s in 1..=steps {
        let r =
            trainer.step(&tokens(s, 0), &tokens(s, 1000), 1e-3).unwrap_or_else(|e| panic!("{strategy} step {s}: {e}"));
        let want: Vec<usize> = inject.iter().filter(|(is, _)| *is == s).map(|&(_, m)| m).collect();
        assert_eq!(r.skipped_spheres, want, "{strategy} step {s}: skipped micro-batches");
        assert_eq!(r.update_skipped, want.len() == SPHERES, "{strategy} step {s}");
        assert!(r.update_skipped || r.loss.is_finite(), "{strategy} step {s}: loss {}", r.loss);
        tally.skipped_spheres += r.skipped_spheres.len();
        tally.skipped_updates += usize::from(r.update_skipped);
    }
    assert!(trainer.params().iter().all(|x| x.is_finite()), "{strategy}: non-finite weights");
    let (m, v, t) = trainer.adam_state();
    assert!(m.iter().chain(v).all(|x| x.is_finite()), "{strategy}: non-finite moments");
    assert_eq!(t, steps - tally.skipped_updates as u64, "{strategy}: Adam's t counts the applied updates");
    trainer.shutdown().expect("shutdown");
    tally
}

/// Runs every strategy for `steps` steps, each under the watchdog, and checks the accounting
/// and the thread count.
fn soak_all(steps: u64) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let before = threads_of_this_process();
    let inject = poisoned(steps);
    let want = Tally { skipped_spheres: inject.len(), skipped_updates: (1..=steps).filter(|s| s % 97 == 0).count() };
    for strategy in Strategy::ALL {
        let (tx, rx) = mpsc::channel();
        let worker = std::thread::spawn(move || {
            let t = soak(strategy, steps);
            let _ = tx.send(t);
        });
        match rx.recv_timeout(WATCHDOG) {
            Ok(t) => assert_eq!(t, want, "{strategy}: every skip accounted"),
            Err(_) => panic!("{strategy}: no result after {WATCHDOG:?} (deadlock?) or the run panicked"),
        }
        worker.join().expect("soak thread");
    }
    // Joined threads leave /proc/self/task at once, rayon's pool threads when it is dropped;
    // give the kernel a moment to reap them.
    let mut after = threads_of_this_process();
    for _ in 0..100 {
        if after <= before {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        after = threads_of_this_process();
    }
    assert_eq!(after, before, "threads before and after the soak");
}

#[test]
fn soak_every_strategy() {
    soak_all(1500);
}

#[test]
#[ignore = "long: 20,000 steps per strategy (cargo test --release --test soak -- --ignored)"]
fn soak_every_strategy_20000_steps() {
    soak_all(20_000);
}
