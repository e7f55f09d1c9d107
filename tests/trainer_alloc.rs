//! The sphere engine's step loop allocates nothing after the first step (counted by a global
//! allocator over every thread of the process).

use cllm::model::Model;
use cllm::sync::Std;
use cllm::train::{
    Engine, GptWorkload, ScaleWorkload, StepBatch, StepReport, Strategy, Trainer, TrainerOptions, Workload,
};
use cllm::ModelConfig;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;

static ALLOCS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts them.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The counter is process-wide (and the test harness allocates when it starts a test), so
/// there is exactly one #[test] here and it runs the measurements in sequence.
#[test]
fn steps_after_the_first_allocate_nothing() {
    engine_steps_after_the_first_allocate_nothing();
    gpt_trainer_steps_allocate_nothing_after_the_first();
}

fn allocations_during(f: impl FnOnce()) -> usize {
    let before = ALLOCS.load(Ordering::SeqCst);
    f();
    ALLOCS.load(Ordering::SeqCst) - before
}

fn engine_steps_after_the_first_allocate_nothing() {
    for strategy in [Strategy::Segmented, Strategy::GradientLock, Strategy::ModelLock] {
        let opts = TrainerOptions { threads: 3, spheres: 4, strategy, chunk_size: 8, ..Default::default() };
        let mut e = Engine::<Std, _>::new(ScaleWorkload::new(40, 4), vec![0.25; 40], 4, 1, &opts).unwrap();
        let mut report = StepReport::default();
        e.step_into(&[1; 4], &[1; 4], 1e-3, &mut report).unwrap();
        let n = allocations_during(|| {
            for _ in 0..5 {
                e.step_into(&[1; 4], &[1; 4], 1e-3, &mut report).unwrap();
            }
        });
        assert_eq!(n, 0, "{strategy}: allocations in steps 2..6");
    }
}

/// With the real model the protocol adds no allocation of its own: a step allocates exactly
/// what the model's forward+backward of its micro-batches allocate when called directly.
fn gpt_trainer_steps_allocate_nothing_after_the_first() {
    let cfg = ModelConfig::tiny();
    let tokens: Vec<u32> = (0..64).map(|i| (i * 7 % 256) as u32).collect();
    let batch = StepBatch { rows: 4, seq: 16, inputs: tokens.clone(), targets: tokens.clone() };
    let w = GptWorkload::new(cfg);
    let params = Model::new(cfg, 1).params;
    let mut acts = w.new_scratch(1, 16);
    let mut grad = vec![0.0; params.len()];
    // A new weights version per round, as in training, so the repacking of the weights is
    // part of what is counted.
    let compute_all = |acts: &mut _, grad: &mut [f32], version: u64| {
        for mb in 0..4 {
            w.compute(acts, &params, version, &batch, mb, 4, grad);
        }
    };
    compute_all(&mut acts, &mut grad, 1);
    let model_allocs = allocations_during(|| compute_all(&mut acts, &mut grad, 2));

    let opts = TrainerOptions { threads: 1, spheres: 4, ..Default::default() };
    let mut t = Trainer::new(Model::new(cfg, 1), 4, 16, opts).unwrap();
    let mut report = StepReport::default();
    t.step_into(&tokens, &tokens, 1e-3, &mut report).unwrap();
    let step_allocs = allocations_during(|| t.step_into(&tokens, &tokens, 1e-3, &mut report).unwrap());
    eprintln!("allocations per step: model forward+backward {model_allocs}, whole trainer step {step_allocs}");
    assert_eq!(step_allocs, model_allocs, "the trainer allocates beyond the model's own allocations");
    // And the model itself allocates nothing once warm: activations are preallocated and the
    // default GEMM kernel packs into a reused per-thread buffer.
    assert_eq!(model_allocs, 0, "forward+backward allocate after warm-up");
}
