//! The one place the model's matrix products happen. Every GEMM in the model goes through
//! these functions, which take arbitrary row/column strides so transposed operands are views,
//! never copies, and optionally a B operand packed ahead of time ([`PackedB`], a weight packed
//! once per step and reused by every micro-batch).
//!
//! There is one implementation, cllm's own single-threaded kernel ([`super::kernel`]):
//! parallelism comes from the trainer's workers, and a single-threaded product is a pure
//! function of its inputs, which is what makes training bit-identical at every thread count.
//! On a whole forward+backward of the `seed` config on an idle core it ties the `gemm` crate
//! (65 ms each, best of 40) and beats `matrixmultiply` (69-71 ms), and unlike the `gemm` crate
//! it never allocates (it packs into a per-thread scratch buffer), so a training step
//! allocates nothing. `benches/model.rs` measures the two crates beside it.
//!
//! Prepacked or not, a product gives the same bits: the kernel reads the same panels in the
//! same order either way.

use super::kernel::{self, Mat, PackedB};

/// `c[m,n] = a[m,k] · b[k,n]` (or `c += a·b` when `accumulate`), with `c` row stride `c_rs`.
#[allow(clippy::too_many_arguments)]
#[inline]
pub fn gemm(m: usize, n: usize, k: usize, c: &mut [f32], c_rs: usize, a: Mat, b: Mat, accumulate: bool) {
    kernel::sgemm(m, n, k, c, c_rs, a, b, accumulate)
}

/// [`gemm`] where `packed`, when given, holds `b` already packed.
#[allow(clippy::too_many_arguments)]
#[inline]
pub fn gemm_prepacked(
    m: usize,
    n: usize,
    k: usize,
    c: &mut [f32],
    c_rs: usize,
    a: Mat,
    b: Mat,
    packed: Option<&PackedB>,
    accumulate: bool,
) {
    match checked(packed, k, n) {
        Some(p) => kernel::gemm_packed(m, c, c_rs, a, p, accumulate),
        None => kernel::sgemm(m, n, k, c, c_rs, a, b, accumulate),
    }
}

/// `packed`, after checking that it is `k x n`.
fn checked(packed: Option<&PackedB>, k: usize, n: usize) -> Option<&PackedB> {
    let p = packed?;
    assert!(p.k() == k && p.n() == n, "gemm: packed B is {}x{}, the product needs {k}x{n}", p.k(), p.n());
    Some(p)
}

/// `c[i, j] = bias[j] + (a·b)[i, j]` (a linear layer's forward), with `b` optionally
/// prepacked as in [`gemm_prepacked`]. The kernel adds the bias as it stores each tile: the
/// same bits as copying the bias into `c` and accumulating.
#[allow(clippy::too_many_arguments)]
pub fn gemm_bias_prepacked(
    m: usize,
    n: usize,
    k: usize,
    c: &mut [f32],
    c_rs: usize,
    a: Mat,
    b: Mat,
    packed: Option<&PackedB>,
    bias: &[f32],
) {
    assert!(bias.len() >= n, "gemm: bias of {} values for {n} columns", bias.len());
    match checked(packed, k, n) {
        Some(p) => kernel::gemm_packed_bias(m, c, c_rs, a, p, &bias[..n]),
        None => kernel::sgemm_bias(m, n, k, c, c_rs, a, b, &bias[..n]),
    }
}

/// `c[m,n] = a[m,k] · b[k,n]` (overwriting) and `colsum[j] += Σ_p b[p, j]` (p in order): a
/// linear layer's weight gradient and bias gradient from `b = dY`. The kernel sums the columns
/// while it packs `b`, so `dY` is read once; the sums are the same bits as a row-by-row loop.
#[allow(clippy::too_many_arguments)]
pub fn gemm_colsum(m: usize, n: usize, k: usize, c: &mut [f32], c_rs: usize, a: Mat, b: Mat, colsum: &mut [f32]) {
    assert!(colsum.len() >= n, "gemm: {} column sums for {n} columns", colsum.len());
    kernel::sgemm_colsum(m, n, k, c, c_rs, a, b, colsum)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn products_match_a_naive_product_for_all_transpose_combinations_packed_or_not() {
        let (m, n, k) = (7, 5, 9);
        let a_rm = filled(m * k, 1);
        let a_cm = filled(m * k, 2);
        let b_rm = filled(k * n, 3);
        let b_cm = filled(k * n, 4);
        for a in [Mat::rows(&a_rm, k), Mat::transposed(&a_cm, m)] {
            for b in [Mat::rows(&b_rm, n), Mat::transposed(&b_cm, k)] {
                let want = naive(m, n, k, a, b);
                let packed = PackedB::pack(k, n, b);
                for p in [None, Some(&packed)] {
                    let mut c = vec![1.0f32; m * n];
                    gemm_prepacked(m, n, k, &mut c, n, a, b, p, false);
                    for (x, y) in c.iter().zip(&want) {
                        assert!((x - y).abs() < 1e-5, "packed {}: {x} vs {y}", p.is_some());
                    }
                    let mut c2 = vec![1.0f32; m * n];
                    gemm_prepacked(m, n, k, &mut c2, n, a, b, p, true);
                    for (x, y) in c2.iter().zip(&want) {
                        assert!((x - (y + 1.0)).abs() < 1e-5, "packed {}: accumulate", p.is_some());
                    }
                }
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
        assert!(c.iter().zip(&c2).all(|(x, y)| x.to_bits() == y.to_bits()));
    }

    #[test]
    #[should_panic(expected = "packed B is 4x3")]
    fn a_packing_of_the_wrong_shape_is_rejected() {
        let (a, b) = (vec![0.0f32; 8], vec![0.0f32; 12]);
        let packed = PackedB::pack(4, 3, Mat::rows(&b, 3));
        let mut c = vec![0.0f32; 4];
        gemm_prepacked(2, 2, 4, &mut c, 2, Mat::rows(&a, 4), Mat::rows(&b, 2), Some(&packed), false);
    }

    #[test]
    #[should_panic(expected = "overruns")]
    fn out_of_bounds_view_is_rejected() {
        let a = vec![0.0f32; 6];
        let b = vec![0.0f32; 6];
        let mut c = vec![0.0f32; 4];
        gemm(2, 2, 4, &mut c, 2, Mat::rows(&a, 4), Mat::rows(&b, 2), false);
    }
}
