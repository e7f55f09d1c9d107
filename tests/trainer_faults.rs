//! Fault injection, errors, panics and shutdown of the threaded trainer (std backend).

use cllm::model::Model;
use cllm::sync::Std;
use cllm::train::{Engine, ScaleWorkload, Strategy, Trainer, TrainerOptions};
use cllm::ModelConfig;

fn tokens(step: u64, n: usize) -> Vec<u32> {
    (0..n).map(|i| ((i as u64 * 31 + step * 17) % 256) as u32).collect()
}

fn tiny(opts: TrainerOptions) -> cllm::Result<Trainer> {
    Trainer::new(Model::new(ModelConfig::tiny(), 3), 4, 16, opts)
}

fn step(t: &mut Trainer, s: u64) -> cllm::Result<cllm::train::StepReport> {
    t.step(&tokens(s, 64), &tokens(s + 1000, 64), 1e-3)
}

#[test]
fn injected_nan_skips_that_micro_batch_and_training_continues() {
    for strategy in [Strategy::Segmented, Strategy::GradientLock, Strategy::ModelLock, Strategy::Rayon] {
        let opts = TrainerOptions { threads: 2, spheres: 4, strategy, inject_nan: vec![(2, 1)], ..Default::default() };
        let mut t = tiny(opts).unwrap();
        let r1 = step(&mut t, 1).unwrap();
        assert!(r1.skipped_spheres.is_empty());
        let r2 = step(&mut t, 2).unwrap();
        assert_eq!(r2.skipped_spheres, vec![1], "{strategy}");
        assert_eq!(r2.bad_values.len(), 1);
        assert_eq!((r2.bad_values[0].0, r2.bad_values[0].1), (1, 0));
        assert!(r2.bad_values[0].2.is_nan());
        assert!(!r2.update_skipped && r2.loss.is_finite());
        assert_eq!(r2.adam_t, 2);
        let r3 = step(&mut t, 3).unwrap();
        assert!(r3.skipped_spheres.is_empty());
        assert!(t.params().iter().all(|x| x.is_finite()));
    }
}

#[test]
fn all_invalid_steps_skip_the_update_and_error_after_the_limit() {
    let all: Vec<(u64, usize)> = (1..=3).flat_map(|s| (0..4).map(move |m| (s, m))).collect();
    let opts = TrainerOptions { threads: 3, spheres: 4, max_skipped_steps: 3, inject_nan: all, ..Default::default() };
    let mut t = tiny(opts).unwrap();
    let before = t.params().to_vec();
    for s in 1..=2 {
        let r = step(&mut t, s).unwrap();
        assert!(r.update_skipped);
        assert_eq!(r.skipped_spheres, vec![0, 1, 2, 3]);
        assert_eq!(r.adam_t, 0, "a skipped update does not advance Adam's t");
    }
    assert_eq!(t.params(), &before[..]);
    assert!(t.adam_state().0.iter().all(|&m| m == 0.0));
    let e = step(&mut t, 3).unwrap_err();
    assert!(e.0.contains("3 consecutive steps"), "{e}");
    assert_eq!(t.params(), &before[..]);
    t.shutdown().unwrap();
}

#[test]
fn invalid_options_are_rejected_with_one_line_errors() {
    for (opts, what) in [
        (TrainerOptions { threads: 0, ..Default::default() }, "threads"),
        (TrainerOptions { threads: 257, ..Default::default() }, "threads"),
        (TrainerOptions { threads: 2, spheres: 3, ..Default::default() }, "divide"),
        (TrainerOptions { threads: 2, clip_norm: -1.0, ..Default::default() }, "clip"),
        (TrainerOptions { threads: 2, spheres: 4, inject_nan: vec![(1, 4)], ..Default::default() }, "inject"),
        (TrainerOptions { threads: 2, strategy: Strategy::Rayon, spheres: 3, ..Default::default() }, "divide"),
    ] {
        let e = tiny(opts).err().expect("rejected");
        assert!(e.0.contains(what) && !e.0.contains('\n'), "{e}");
    }
    let e = Trainer::new(Model::new(ModelConfig::tiny(), 3), 4, 17, TrainerOptions::default()).err().unwrap();
    assert!(e.0.contains("context"), "{e}");
}

#[test]
fn bad_batches_are_errors_not_panics() {
    let mut t = tiny(TrainerOptions { threads: 2, ..Default::default() }).unwrap();
    assert!(t.step(&[0; 63], &[0; 64], 1e-3).is_err());
    let mut bad = tokens(1, 64);
    bad[5] = 256;
    assert!(t.step(&bad, &tokens(2, 64), 1e-3).unwrap_err().0.contains("vocabulary"));
    assert!(t.step(&tokens(1, 64), &tokens(2, 64), f32::NAN).is_err());
    // The trainer is still usable.
    step(&mut t, 1).unwrap();
}

#[test]
fn worker_panic_becomes_an_error_and_shutdown_still_joins() {
    for (threads, strategy) in
        [(1, Strategy::Segmented), (3, Strategy::Segmented), (3, Strategy::GradientLock), (2, Strategy::ModelLock)]
    {
        let mut w = ScaleWorkload::new(8, 4);
        w.panic_on = Some(2);
        let opts = TrainerOptions { threads, spheres: 4, strategy, chunk_size: 4, ..Default::default() };
        let mut e = Engine::<Std, _>::new(w, vec![1.0; 8], 4, 1, &opts).unwrap();
        let err = e.step(&[0; 4], &[0; 4], 1e-3).unwrap_err();
        assert!(err.0.contains("micro-batch 2") && err.0.contains("injected panic"), "{err}");
        assert_eq!(e.params(), &[1.0; 8], "weights untouched by the failed step");
        assert!(e.step(&[0; 4], &[0; 4], 1e-3).is_err(), "a failed trainer stays failed");
        e.shutdown().unwrap();
    }
}

#[test]
fn drop_without_shutdown_joins_the_workers_and_step_after_shutdown_errors() {
    let mut e = Engine::<Std, _>::new(
        ScaleWorkload::new(8, 4),
        vec![1.0; 8],
        4,
        1,
        &TrainerOptions { threads: 4, spheres: 4, ..Default::default() },
    )
    .unwrap();
    e.step(&[0; 4], &[0; 4], 1e-3).unwrap();
    drop(e);
    let mut e = Engine::<Std, _>::new(
        ScaleWorkload::new(8, 4),
        vec![1.0; 8],
        4,
        1,
        &TrainerOptions { threads: 256, spheres: 4, ..Default::default() },
    )
    .unwrap();
    e.shutdown().unwrap();
    e.shutdown().unwrap();
    assert!(e.step(&[0; 4], &[0; 4], 1e-3).unwrap_err().0.contains("shut down"));
}

#[test]
fn report_has_one_timing_per_worker_and_counts_every_micro_batch() {
    for strategy in [Strategy::Segmented, Strategy::GradientLock, Strategy::ModelLock] {
        let mut t = tiny(TrainerOptions { threads: 3, spheres: 4, strategy, ..Default::default() }).unwrap();
        let r = step(&mut t, 1).unwrap();
        assert_eq!(r.timings.workers.len(), 3);
        assert_eq!(r.timings.workers.iter().map(|w| w.micro_batches).sum::<u32>(), 4);
        assert!(r.timings.wall > std::time::Duration::ZERO);
        assert!(r.timings.workers.iter().map(|w| w.compute).sum::<std::time::Duration>() > std::time::Duration::ZERO);
        if strategy != Strategy::Segmented {
            assert!(r.timings.workers.iter().map(|w| w.lock_acquisitions).sum::<u32>() >= 4);
        }
    }
}

#[test]
fn adam_state_and_step_round_trip_for_exact_resume() {
    let opts = TrainerOptions { threads: 2, spheres: 4, ..Default::default() };
    let mut a = tiny(opts.clone()).unwrap();
    for s in 1..=2 {
        step(&mut a, s).unwrap();
    }
    let (m, v, t) = a.adam_state();
    let mut b =
        Trainer::new(Model::from_params(ModelConfig::tiny(), a.params().to_vec()).unwrap(), 4, 16, opts).unwrap();
    b.set_adam_state(m, v, t).unwrap();
    b.set_step(a.step_count());
    let ra = step(&mut a, 3).unwrap();
    let rb = step(&mut b, 3).unwrap();
    assert_eq!(ra.step, 3);
    assert_eq!(rb.step, 3);
    assert_eq!(a.params(), b.params());
    assert_eq!(a.model().params, b.params());
}

#[test]
fn clipping_is_reported_in_both_modes() {
    for mode in [cllm::train::ClipMode::Global, cllm::train::ClipMode::PerSphere] {
        let opts = TrainerOptions { threads: 2, spheres: 4, clip_norm: 1e-3, clip_mode: mode, ..Default::default() };
        let mut t = tiny(opts).unwrap();
        let r = step(&mut t, 1).unwrap();
        assert!(r.clipped, "{mode}");
        assert!(r.max_sphere_norm > 1e-3);
    }
}
