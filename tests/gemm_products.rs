//! The model's GEMM entry points, and the crates `benches/model.rs` measures beside them,
//! compute the product a naive loop computes, for every transpose combination (so each
//! benchmark comparison row is a fair one); a prepacked B gives the same bits as packing per
//! call; and every SIMD path computes the same bits.

use cllm::model::gemm::{gemm_bias_prepacked, gemm_colsum, gemm_prepacked};
use cllm::model::kernel::{Mat, PackedB};

#[path = "../benches/support/gemm_crates.rs"]
mod gemm_crates;
use gemm_crates::{product, Impl, ALL};

fn naive(m: usize, n: usize, k: usize, a: Mat, b: Mat) -> Vec<f32> {
    let mut c = vec![0.0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0f64;
            for p in 0..k {
                s += a.data[i * a.rs + p * a.cs] as f64 * b.data[p * b.rs + j * b.cs] as f64;
            }
            c[i * n + j] = s as f32;
        }
    }
    c
}

fn filled(len: usize, seed: u32) -> Vec<f32> {
    (0..len).map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0).collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// (m, n, k) and A, B in both storage orders.
struct Operands {
    m: usize,
    n: usize,
    k: usize,
    a: [Vec<f32>; 2],
    b: [Vec<f32>; 2],
}

impl Operands {
    fn new() -> Self {
        let (m, n, k) = (7, 5, 9);
        Operands { m, n, k, a: [filled(m * k, 1), filled(m * k, 2)], b: [filled(k * n, 3), filled(k * n, 4)] }
    }

    /// Every (A, B) pair of views: row-major or transposed, each.
    fn views(&self) -> Vec<(Mat<'_>, Mat<'_>)> {
        let (m, n, k) = (self.m, self.n, self.k);
        let avs = [Mat::rows(&self.a[0], k), Mat::transposed(&self.a[1], m)];
        let bvs = [Mat::rows(&self.b[0], n), Mat::transposed(&self.b[1], k)];
        avs.iter().flat_map(|&a| bvs.iter().map(move |&b| (a, b))).collect()
    }
}

#[test]
fn every_compared_gemm_matches_a_naive_product_for_all_transpose_combinations() {
    let ops = Operands::new();
    let (m, n, k) = (ops.m, ops.n, ops.k);
    for (name, which) in ALL {
        for (a, b) in ops.views() {
            let want = naive(m, n, k, a, b);
            let mut c = vec![1.0f32; m * n];
            product(which, m, n, k, &mut c, n, a, b, false);
            for (x, y) in c.iter().zip(&want) {
                assert!((x - y).abs() < 1e-5, "{name}: {x} vs {y}");
            }
            let mut c2 = vec![1.0f32; m * n];
            product(which, m, n, k, &mut c2, n, a, b, true);
            for (x, y) in c2.iter().zip(&want) {
                assert!((x - (y + 1.0)).abs() < 1e-5, "{name} accumulate");
            }
        }
    }
}

#[test]
fn a_prepacked_b_gives_the_same_bits_as_packing_per_call_for_all_transpose_combinations() {
    let ops = Operands::new();
    let (m, n, k) = (ops.m, ops.n, ops.k);
    for (a, b) in ops.views() {
        let packed = PackedB::pack(k, n, b);
        for accumulate in [false, true] {
            let (mut per_call, mut prepacked) = (vec![1.0f32; m * n], vec![1.0f32; m * n]);
            gemm_prepacked(m, n, k, &mut per_call, n, a, b, None, accumulate);
            gemm_prepacked(m, n, k, &mut prepacked, n, a, b, Some(&packed), accumulate);
            assert_eq!(bits(&per_call), bits(&prepacked), "accumulate {accumulate}");
        }
    }
}

#[test]
fn bias_product_adds_the_bias_to_every_row_packed_or_not() {
    let (m, n, k) = (9, 21, 13);
    let (a, b, bias) = (filled(m * k, 5), filled(k * n, 6), filled(n, 7));
    let (am, bm) = (Mat::rows(&a, k), Mat::rows(&b, n));
    let want = naive(m, n, k, am, bm);
    let mut c = vec![f32::NAN; m * n];
    gemm_bias_prepacked(m, n, k, &mut c, n, am, bm, None, &bias);
    for (i, (x, y)) in c.iter().zip(&want).enumerate() {
        assert!((x - (y + bias[i % n])).abs() < 1e-5, "{x} vs {y} + bias");
    }
    let packed = PackedB::pack(k, n, bm);
    let mut c2 = vec![f32::NAN; m * n];
    gemm_bias_prepacked(m, n, k, &mut c2, n, am, bm, Some(&packed), &bias);
    assert_eq!(bits(&c), bits(&c2));
}

#[test]
#[should_panic(expected = "overruns")]
fn a_comparison_product_with_an_out_of_bounds_view_is_rejected() {
    let (a, b) = (vec![0.0f32; 6], vec![0.0f32; 6]);
    let mut c = vec![0.0f32; 4];
    product(Impl::GemmCrate, 2, 2, 4, &mut c, 2, Mat::rows(&a, 4), Mat::rows(&b, 2), false);
}

/// The model's GEMM entry points on odd and model-sized shapes, every transpose combination,
/// strided and padded views, accumulate off and on, the bias epilogue and the column sums, on
/// this process's SIMD path: each checked against the naive product, and all their output
/// bits hashed into one digest.
fn products_digest() -> String {
    let mut all_bits = Vec::new();
    let shapes = [(1, 1, 1), (7, 5, 9), (13, 31, 300), (6, 16, 256), (37, 70, 513), (128, 96, 64)];
    for (si, &(m, n, k)) in shapes.iter().enumerate() {
        let seed = 10 * si as u32;
        let (a0, a1) = (filled(m * k, seed + 1), filled(m * k, seed + 2));
        let (b0, b1) = (filled(k * n, seed + 3), filled(k * n, seed + 4));
        // Every other element of a buffer twice the size: no unit stride at all.
        let (a2, b2) = (filled(2 * m * k, seed + 5), filled(2 * k * n, seed + 6));
        let avs = [Mat::rows(&a0, k), Mat::transposed(&a1, m), Mat::strided(&a2, 2 * k, 2)];
        let bvs = [Mat::rows(&b0, n), Mat::transposed(&b1, k), Mat::strided(&b2, 2, 2 * k)];
        let bias = filled(n, seed + 7);
        for &a in &avs {
            for &b in &bvs {
                let want = naive(m, n, k, a, b);
                let tol = 1e-5 * (k as f32).sqrt() * 4.0 + 1e-6 * k as f32;
                let packed = PackedB::pack(k, n, b);
                for accumulate in [false, true] {
                    let mut c = vec![0.5f32; m * n];
                    gemm_prepacked(m, n, k, &mut c, n, a, b, Some(&packed), accumulate);
                    let shift = if accumulate { 0.5 } else { 0.0 };
                    for (x, y) in c.iter().zip(&want) {
                        assert!((x - (y + shift)).abs() <= tol, "m={m} n={n} k={k}: {x} vs {y}");
                    }
                    all_bits.extend(bits(&c));
                }
                let mut c = vec![0.0f32; m * n];
                gemm_bias_prepacked(m, n, k, &mut c, n, a, b, None, &bias);
                all_bits.extend(bits(&c));
                let mut sums = bias.clone();
                gemm_colsum(m, n, k, &mut c, n, a, b, &mut sums);
                all_bits.extend(bits(&c));
                all_bits.extend(bits(&sums));
            }
        }
    }
    let bytes: Vec<u8> = all_bits.iter().flat_map(|w| w.to_le_bytes()).collect();
    cllm::data::sha256_hex(&bytes)
}

/// Prints this process's digest for [`every_simd_path_computes_the_same_product_bits`], which
/// runs it once per path (`CLLM_SIMD` is read once per process, so each path needs its own).
#[test]
#[ignore = "a helper: every_simd_path_computes_the_same_product_bits runs it once per path"]
fn print_products_digest() {
    println!("products digest: {}", products_digest());
}

#[test]
fn every_simd_path_computes_the_same_product_bits() {
    let exe = std::env::current_exe().expect("the test binary's path");
    let digests: Vec<(&str, String)> = cllm::simd::Path::available_paths()
        .into_iter()
        .map(|p| {
            let out = std::process::Command::new(&exe)
                .args(["--exact", "print_products_digest", "--ignored", "--nocapture", "--test-threads", "1"])
                .env("CLLM_SIMD", p.name())
                .output()
                .expect("the test binary runs");
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(out.status.success(), "CLLM_SIMD={p}: {stdout}{}", String::from_utf8_lossy(&out.stderr));
            // The harness prints its "test NAME ... " on the same line, before the digest.
            let digest = stdout.split("products digest: ").nth(1).and_then(|r| r.split_whitespace().next());
            let digest = digest.map(str::to_string);
            (p.name(), digest.unwrap_or_else(|| panic!("CLLM_SIMD={p}: no digest in {stdout}")))
        })
        .collect();
    for (p, d) in &digests[1..] {
        assert_eq!(d, &digests[0].1, "the {p} path's products differ from the {} path's", digests[0].0);
    }
}
