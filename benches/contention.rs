//! The synchronization cost of each strategy alone: the trainer's real step protocol
//! (accumulation or chunked reduction, global norm, AdamW over the same chunks) driven by a
//! workload whose "forward/backward" only writes a constant gradient. What is left of the
//! step time is what the protocol costs, per strategy, thread count and gradient size
//! (1e5 and 5e6 floats, the `small` model's order and well beyond `seed`'s).
//!
//! `cargo bench --bench contention`, or filtered: `cargo bench --bench contention -- 5000000`.

use std::time::Duration;

use cllm::sync::Std;
use cllm::train::{Engine, RayonEngine, StepBatch, Strategy, TrainerOptions, Workload};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pprof::criterion::{Output, PProfProfiler};

/// Micro-batches per step (one row of one token each: the batch only feeds the workload).
const SPHERES: usize = 8;
const SIZES: [usize; 2] = [100_000, 5_000_000];
const THREADS: [usize; 4] = [1, 2, 4, 8];

/// Writes a constant gradient: the cheapest compute that still hands the protocol a full
/// gradient buffer per micro-batch, as the model does.
struct ConstGrad {
    params: usize,
}

impl Workload for ConstGrad {
    type Scratch = ();

    fn num_params(&self) -> usize {
        self.params
    }

    fn new_scratch(&self, _rows: usize, _seq: usize) {}

    fn compute(&self, _: &mut (), _: &[f32], _: u64, _: &StepBatch, mb: usize, _: usize, grad: &mut [f32]) -> f32 {
        grad.fill(1e-3 * (mb + 1) as f32);
        0.0
    }
}

enum AnyEngine {
    Spheres(Engine<Std, ConstGrad>),
    Rayon(RayonEngine<ConstGrad>),
}

impl AnyEngine {
    fn new(strategy: Strategy, threads: usize, params: usize) -> Self {
        let opts = TrainerOptions { threads, strategy, spheres: SPHERES, ..TrainerOptions::default() };
        let w = ConstGrad { params };
        let p = vec![0.0f32; params];
        match strategy {
            Strategy::Rayon => AnyEngine::Rayon(RayonEngine::new(w, p, SPHERES, 1, &opts).expect("engine")),
            _ => AnyEngine::Spheres(Engine::new(w, p, SPHERES, 1, &opts).expect("engine")),
        }
    }

    fn step(&mut self, tokens: &[u32]) {
        let r = match self {
            AnyEngine::Spheres(e) => e.step(tokens, tokens, 1e-3),
            AnyEngine::Rayon(e) => e.step(tokens, tokens, 1e-3),
        };
        std::hint::black_box(r.expect("step"));
    }
}

fn contention(c: &mut Criterion) {
    let tokens = vec![0u32; SPHERES];
    for size in SIZES {
        for strategy in Strategy::ALL {
            let mut g = c.benchmark_group(format!("contention/{size}/{strategy}"));
            // Floats of gradient combined per step: the work the protocol exists to do.
            g.throughput(Throughput::Elements((size * SPHERES) as u64));
            g.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
            for threads in THREADS {
                let mut engine = AnyEngine::new(strategy, threads, size);
                g.bench_with_input(BenchmarkId::from_parameter(threads), &threads, |b, _| {
                    b.iter(|| engine.step(&tokens))
                });
            }
            g.finish();
        }
    }
}

fn profiled() -> Criterion {
    Criterion::default().with_profiler(PProfProfiler::new(100, Output::Flamegraph(None)))
}

criterion_group! {
    name = benches;
    config = profiled();
    targets = contention
}
criterion_main!(benches);
