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
    // Products against a naive loop, and prepacked against packed per call: tests/gemm_products.rs.
    use super::*;

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
