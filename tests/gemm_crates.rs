//! The GEMM crates `benches/model.rs` measures beside cllm's kernel compute the same product
//! as a naive loop, for every transpose combination (so each comparison row is a fair one).

use cllm::model::kernel::Mat;

#[path = "../benches/support/gemm_crates.rs"]
mod gemm_crates;
use gemm_crates::{product, ALL};

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

#[test]
fn every_compared_gemm_matches_a_naive_product_for_all_transpose_combinations() {
    let (m, n, k) = (7, 5, 9);
    let a_rm = filled(m * k, 1);
    let a_cm = filled(m * k, 2);
    let b_rm = filled(k * n, 3);
    let b_cm = filled(k * n, 4);
    for (name, which) in ALL {
        for a in [Mat::rows(&a_rm, k), Mat::transposed(&a_cm, m)] {
            for b in [Mat::rows(&b_rm, n), Mat::transposed(&b_cm, k)] {
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
}

#[test]
#[should_panic(expected = "overruns")]
fn a_comparison_product_with_an_out_of_bounds_view_is_rejected() {
    let (a, b) = (vec![0.0f32; 6], vec![0.0f32; 6]);
    let mut c = vec![0.0f32; 4];
    product(gemm_crates::Impl::GemmCrate, 2, 2, 4, &mut c, 2, Mat::rows(&a, 4), Mat::rows(&b, 2), false);
}
