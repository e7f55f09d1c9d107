//! One training step of the `small` and `seed` presets (batch 8, context 128) for each
//! strategy at 1, 2, 4 and 8 threads.
//!
//! One criterion group per (config, strategy) with the thread count as the parameter, so
//! criterion's report draws throughput against threads. pprof is attached as the profiler:
//! `cargo bench --bench scaling -- --profile-time 10 seed/segmented` writes a flamegraph per
//! benchmark under target/criterion/.../profile/. Filter as usual, e.g.
//! `cargo bench --bench scaling -- small/segmented`. Override the thread counts with
//! `CLLM_BENCH_THREADS=1,2`.

use std::time::Duration;

use cllm::data::{BatchSampler, Corpus};
use cllm::model::Model;
use cllm::train::{Strategy, Trainer, TrainerOptions};
use cllm::ModelConfig;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pprof::criterion::{Output, PProfProfiler};

const BATCH: usize = 8;
const STEPS_OF_DATA: usize = 16;

fn thread_counts() -> Vec<usize> {
    std::env::var("CLLM_BENCH_THREADS")
        .ok()
        .map(|s| s.split(',').filter_map(|t| t.trim().parse().ok()).filter(|&t| t > 0).collect::<Vec<usize>>())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| vec![1, 2, 4, 8])
}

/// A few different batches, cycled, so the steps are not all on identical data.
fn batches(seq: usize) -> Vec<(Vec<u32>, Vec<u32>)> {
    let corpus = Corpus::tiny_shakespeare();
    let mut sampler = BatchSampler::new(1337, corpus.bytes.len(), seq);
    (0..STEPS_OF_DATA)
        .map(|_| {
            let (mut x, mut y) = (Vec::new(), Vec::new());
            sampler.next_batch(&corpus.bytes, BATCH, seq, &mut x, &mut y);
            (x, y)
        })
        .collect()
}

fn scaling(c: &mut Criterion) {
    for name in ["small", "seed"] {
        let cfg = ModelConfig::preset(name).expect("built-in preset");
        let seq = cfg.context;
        let data = batches(seq);
        let model = Model::new(cfg, 1337);
        for strategy in Strategy::ALL {
            let mut g = c.benchmark_group(format!("{name}/{strategy}"));
            g.throughput(Throughput::Elements((BATCH * seq) as u64));
            g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
            for threads in thread_counts() {
                let opts = TrainerOptions { threads, strategy, ..TrainerOptions::default() };
                let mut trainer = Trainer::new(model.clone(), BATCH, seq, opts).expect("trainer");
                let mut i = 0;
                g.bench_with_input(BenchmarkId::from_parameter(threads), &threads, |b, _| {
                    b.iter(|| {
                        let (x, y) = &data[i % data.len()];
                        i += 1;
                        trainer.step(x, y, 1e-3).expect("step")
                    })
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
    targets = scaling
}
criterion_main!(benches);
