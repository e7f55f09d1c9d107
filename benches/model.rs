//! One forward+backward of the `small` and `seed` configs on one thread, as tokens/s and model
//! GFLOP/s, beside the GFLOP/s of cllm's kernel and both GEMM crates (called directly, see
//! `support/gemm_crates.rs`) on a large square product and on the model's own shapes, all
//! measured in the same run.
//!
//! `cargo bench --bench model` (criterion report), then a one-screen summary with the model's
//! GFLOP/s as a fraction of the GEMM peak.
//!
//! cllm's rows carry the SIMD path they ran on (`cllm-kernel/avx2`, `small/portable`), so one
//! binary compares the paths run by run: `CLLM_SIMD=avx2 cargo bench --bench model`, then
//! `CLLM_SIMD=portable cargo bench --bench model` (see docs/performance.md#simd-paths).

use cllm::model::kernel::Mat;
use cllm::model::{backward, forward, Activations, Model};
use cllm::ModelConfig;
use criterion::{black_box, criterion_group, BenchmarkId, Criterion, Throughput};
use std::time::{Duration, Instant};

#[path = "support/gemm_crates.rs"]
mod gemm_crates;
use gemm_crates::{product, Impl, ALL};

const SQUARE: usize = 1024;

/// A benchmark row's name: the crates' as they are, cllm's with the SIMD path it runs on.
fn row_name(name: &str, which: Impl) -> String {
    if which == Impl::Cllm {
        format!("{name}/{}", cllm::simd::path::current())
    } else {
        name.to_string()
    }
}

fn fill(len: usize) -> Vec<f32> {
    (0..len).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect()
}

fn square_gemm(which: Impl, a: &[f32], b: &[f32], c: &mut [f32]) {
    product(which, SQUARE, SQUARE, SQUARE, c, SQUARE, Mat::rows(a, SQUARE), Mat::rows(b, SQUARE), false);
}

struct StepCase {
    model: Model,
    acts: Activations,
    grads: Vec<f32>,
    inputs: Vec<u32>,
    targets: Vec<u32>,
    b: usize,
    t: usize,
}

impl StepCase {
    fn new(name: &str, b: usize) -> Self {
        let cfg = ModelConfig::preset(name).expect("preset");
        let t = cfg.context;
        let model = Model::new(cfg, 1);
        let text = include_bytes!("../data/tinyshakespeare.txt");
        let inputs: Vec<u32> = text[..b * t].iter().map(|&x| x as u32).collect();
        let targets: Vec<u32> = text[1..b * t + 1].iter().map(|&x| x as u32).collect();
        StepCase {
            acts: Activations::new(&cfg, b, t),
            grads: vec![0.0; model.params.len()],
            model,
            inputs,
            targets,
            b,
            t,
        }
    }
    fn run(&mut self) -> f32 {
        let cfg = self.model.config;
        let loss = forward(&cfg, &self.model.params, &mut self.acts, &self.inputs, Some(&self.targets), self.b, self.t);
        backward(&cfg, &self.model.params, &mut self.acts, &mut self.grads);
        loss
    }
    fn tokens(&self) -> usize {
        self.b * self.t
    }
}

fn bench_gemm(c: &mut Criterion) {
    let (a, b) = (fill(SQUARE * SQUARE), fill(SQUARE * SQUARE));
    let mut out = vec![0.0f32; SQUARE * SQUARE];
    let mut g = c.benchmark_group("gemm_square_1024");
    g.throughput(Throughput::Elements((2 * SQUARE * SQUARE * SQUARE) as u64));
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    for (name, which) in ALL {
        g.bench_function(row_name(name, which), |bch| bch.iter(|| square_gemm(which, &a, &b, &mut out)));
    }
    g.finish();

    // The model's typical shapes: one sequence of T=128 through the seed config's layers.
    let shapes = [(128, 768, 256), (128, 256, 1024), (128, 1024, 256), (256, 768, 128)];
    let mut g = c.benchmark_group("gemm_model_shapes");
    g.sample_size(20).measurement_time(Duration::from_secs(2));
    for &(m, n, k) in &shapes {
        let (a, b) = (fill(m * k), fill(k * n));
        let mut out = vec![0.0f32; m * n];
        g.throughput(Throughput::Elements((2 * m * n * k) as u64));
        for (name, which) in ALL {
            g.bench_with_input(BenchmarkId::new(row_name(name, which), format!("{m}x{n}x{k}")), &(), |bch, _| {
                bch.iter(|| product(which, m, n, k, &mut out, n, Mat::rows(&a, k), Mat::rows(&b, n), false))
            });
        }
    }
    g.finish();
}

fn bench_model(c: &mut Criterion) {
    let mut g = c.benchmark_group("model_forward_backward");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    for name in ["small", "seed"] {
        let mut case = StepCase::new(name, 8);
        g.throughput(Throughput::Elements(case.tokens() as u64));
        let id = format!("{name}/{}", cllm::simd::path::current());
        g.bench_function(BenchmarkId::from_parameter(id), |bch| bch.iter(|| black_box(case.run())));
    }
    g.finish();
}

/// Median seconds of `f` over `reps` runs after one warm-up.
fn median_secs(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut v: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The summary the issue asks for: model GFLOP/s vs GEMM GFLOP/s, same run, one thread.
fn summary() {
    let (a, b) = (fill(SQUARE * SQUARE), fill(SQUARE * SQUARE));
    let mut out = vec![0.0f32; SQUARE * SQUARE];
    let flops = 2.0 * (SQUARE as f64).powi(3);
    let mut peak = 0.0f64;
    println!("\n== summary (1 thread, cllm on the {} path) ==", cllm::simd::path::current());
    for (name, which) in ALL {
        let s = median_secs(7, || square_gemm(which, &a, &b, &mut out));
        let gf = flops / s / 1e9;
        println!("{name:>15} {SQUARE}^3: {gf:7.1} GFLOP/s");
        if which == Impl::Cllm {
            peak = gf;
        }
    }
    for name in ["small", "seed"] {
        let mut case = StepCase::new(name, 8);
        let s = median_secs(7, || {
            black_box(case.run());
        });
        let cfg = case.model.config;
        let gf = cfg.flops_per_token() * case.tokens() as f64 / s / 1e9;
        println!(
            "{name:>15} fwd+bwd B=8 T={}: {:7.1} ms, {:8.0} tokens/s, {gf:6.1} GFLOP/s = {:4.1}% of the GEMM peak",
            case.t,
            s * 1e3,
            case.tokens() as f64 / s,
            100.0 * gf / peak
        );
    }
}

criterion_group!(benches, bench_gemm, bench_model);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    summary();
}
