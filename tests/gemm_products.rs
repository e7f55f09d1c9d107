//! The model's GEMM entry points, and the crates `benches/model.rs` measures beside them,
//! compute the product a naive loop computes, for every transpose combination (so each
//! benchmark comparison row is a fair one); a prepacked B gives the same bits as packing per
//! call.

use cllm::model::gemm::{gemm_bias_prepacked, gemm_prepacked};
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
