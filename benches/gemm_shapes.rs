//! cllm's side of `scripts/gemm_vs_torch.sh`: times the model's GEMM entry point
//! (`cllm::model::gemm::gemm`, which packs B per call as `torch.mm` does) on the products listed
//! in `scripts/gemm_shapes.txt`, one thread, and prints one JSON line per product:
//! `{"name", "m", "n", "k", "gflops", "simd"}`.
//!
//! `cargo bench --bench gemm_shapes` (set `CLLM_SIMD` to time another path). Each product is
//! repeated until a batch lasts about `BATCH_SECS`; the figure is the median of `BATCHES`
//! batches, the same protocol as `scripts/torch_gemm.py`.
//!
//! `GEMM_ONLY=PREFIX` times only the products whose name starts with PREFIX (e.g. `gpt2`).
//!
//! `GEMM_PREPACKED=1` packs B once, outside the timing, and times `gemm_prepacked`: what training
//! does with a weight (packed once per step, reused by every micro-batch).
//!
//! `GEMM_CLOCK=cpu` times with this thread's CPU time instead of the wall clock: for comparing
//! kernel variants on a busy machine, where time slicing inflates wall time but not CPU time.

use cllm::model::gemm::{gemm, gemm_prepacked};
use cllm::model::kernel::{Mat, PackedB};
use std::hint::black_box;
use std::time::Instant;

const BATCH_SECS: f64 = 0.15;
const BATCHES: usize = 5;

struct Shape {
    name: String,
    m: usize,
    n: usize,
    k: usize,
    at: bool,
    bt: bool,
}

fn shapes() -> Vec<Shape> {
    let text = include_str!("../scripts/gemm_shapes.txt");
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 6, "scripts/gemm_shapes.txt: bad line {l:?}");
            let num = |s: &str| s.parse::<usize>().unwrap_or_else(|_| panic!("bad size in {l:?}"));
            Shape { name: f[0].into(), m: num(f[1]), n: num(f[2]), k: num(f[3]), at: f[4] == "t", bt: f[5] == "t" }
        })
        .collect()
}

fn fill(len: usize, salt: usize) -> Vec<f32> {
    (0..len).map(|i| ((i * 7919 + salt) % 1000) as f32 / 1000.0 - 0.5).collect()
}

/// Seconds on the chosen clock: the wall clock, or with `GEMM_CLOCK=cpu` this thread's CPU time.
fn now(cpu: bool) -> f64 {
    if !cpu {
        static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        return START.get_or_init(Instant::now).elapsed().as_secs_f64();
    }
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Seconds per product: the median over [`BATCHES`] batches sized to [`BATCH_SECS`].
fn time_product(mut f: impl FnMut()) -> f64 {
    let cpu = std::env::var("GEMM_CLOCK").is_ok_and(|v| v == "cpu");
    let t = now(cpu);
    f();
    let once = (now(cpu) - t).max(1e-7);
    let reps = ((BATCH_SECS / once) as usize).max(1);
    let mut per: Vec<f64> = (0..BATCHES)
        .map(|_| {
            let t = now(cpu);
            for _ in 0..reps {
                f();
            }
            (now(cpu) - t) / reps as f64
        })
        .collect();
    per.sort_by(f64::total_cmp);
    per[BATCHES / 2]
}

fn main() {
    let simd = cllm::simd::path::current();
    let only = std::env::var("GEMM_ONLY").unwrap_or_default();
    let prepacked = std::env::var("GEMM_PREPACKED").is_ok_and(|v| v == "1");
    for s in shapes().into_iter().filter(|s| s.name.starts_with(&only)) {
        let (m, n, k) = (s.m, s.n, s.k);
        let (a, b) = (fill(m * k, 1), fill(k * n, 2));
        // op(A) is m x k: stored [m, k] row-major, or [k, m] when transposed.
        let av = if s.at { Mat::transposed(&a, m) } else { Mat::rows(&a, k) };
        let bv = if s.bt { Mat::transposed(&b, k) } else { Mat::rows(&b, n) };
        let mut c = vec![0.0f32; m * n];
        let packed = prepacked.then(|| PackedB::pack(k, n, bv));
        let secs = time_product(|| {
            match &packed {
                Some(p) => gemm_prepacked(m, n, k, &mut c, n, av, bv, Some(p), false),
                None => gemm(m, n, k, &mut c, n, av, bv, false),
            }
            black_box(&mut c);
        });
        let gflops = 2.0 * (m * n * k) as f64 / secs / 1e9;
        println!(
            "{{\"name\": \"{}\", \"m\": {m}, \"n\": {n}, \"k\": {k}, \"gflops\": {gflops:.2}, \"simd\": \"{simd}\", \"prepacked\": {prepacked}}}",
            s.name
        );
    }
}
