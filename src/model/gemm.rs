//! The one place matrix products happen. Every GEMM in the model goes through [`gemm`], which
//! takes arbitrary row/column strides so transposed operands are views, never copies.
//!
//! Backends, all single-threaded: parallelism comes from the trainer's workers, and a
//! single-threaded product is a pure function of its inputs, which is what makes training
//! bit-identical at every thread count. The default is cllm's own AVX2/FMA kernel
//! ([`super::kernel`]): on a whole forward+backward of the `seed` config on an idle core it
//! ties the `gemm` crate (65 ms each, best of 40) and beats `matrixmultiply` (69-71 ms), and
//! unlike the `gemm` crate it never allocates (it packs into a per-thread scratch buffer), so a
//! training step allocates nothing. The crates stay selectable so `benches/model.rs` can
//! compare all three in one run.

/// A strided read-only matrix view: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// Row-major `[rows, cols]` view.
    pub fn rows(data: &'a [f32], cols: usize) -> Self {
        Mat { data, rs: cols, cs: 1 }
    }
    /// The transpose of a row-major `[rows, cols]` buffer, as a `[cols, rows]` view.
    pub fn transposed(data: &'a [f32], cols: usize) -> Self {
        Mat { data, rs: 1, cs: cols }
    }
    /// A strided view.
    pub fn strided(data: &'a [f32], rs: usize, cs: usize) -> Self {
        Mat { data, rs, cs }
    }
}

use std::sync::atomic::{AtomicU8, Ordering};

/// Which GEMM implementation to call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Backend {
    /// cllm's own 6x16 AVX2+FMA kernel with a portable fallback ([`super::kernel`]).
    Native,
    /// The `gemm` crate.
    Gemm,
    /// The `matrixmultiply` crate.
    MatrixMultiply,
}

/// The backend the model uses unless [`set_backend`] says otherwise.
pub const DEFAULT_BACKEND: Backend = Backend::Native;

static BACKEND: AtomicU8 = AtomicU8::new(DEFAULT_BACKEND as u8);

/// Chooses the GEMM crate for every later product in this process (for benchmarks that
/// compare the two on the whole model).
pub fn set_backend(backend: Backend) {
    BACKEND.store(backend as u8, Ordering::Relaxed);
}

/// The GEMM crate in use.
pub fn backend() -> Backend {
    match BACKEND.load(Ordering::Relaxed) {
        x if x == Backend::Gemm as u8 => Backend::Gemm,
        x if x == Backend::MatrixMultiply as u8 => Backend::MatrixMultiply,
        _ => Backend::Native,
    }
}

fn check_bounds(what: &str, len: usize, rows: usize, cols: usize, rs: usize, cs: usize) {
    if rows == 0 || cols == 0 {
        return;
    }
    let last = (rows - 1) * rs + (cols - 1) * cs;
    assert!(last < len, "gemm: {what} view [{rows}x{cols}] rs={rs} cs={cs} overruns its buffer of {len}");
}

/// `c[m,n] = a[m,k] · b[k,n]` (or `c += a·b` when `accumulate`), with `c` row stride `c_rs`.
#[allow(clippy::too_many_arguments)]
#[inline]
pub fn gemm(m: usize, n: usize, k: usize, c: &mut [f32], c_rs: usize, a: Mat, b: Mat, accumulate: bool) {
    gemm_with(backend(), m, n, k, c, c_rs, a, b, accumulate)
}

/// [`gemm`] where `packed`, when given, holds `b` already packed for the native kernel (a
/// weight packed once per step and reused by every micro-batch). The result is the same bits
/// either way: the native kernel reads the same panels in the same order; other backends
/// ignore `packed`.
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
    packed: Option<&super::kernel::PackedB>,
    accumulate: bool,
) {
    match native_packed(packed, k, n) {
        Some(p) => super::kernel::gemm_packed(m, c, c_rs, a, p, accumulate),
        None => gemm(m, n, k, c, c_rs, a, b, accumulate),
    }
}

/// `packed` when the native kernel is in use (after checking it is `k x n`); the crate
/// backends pack per call.
fn native_packed(packed: Option<&super::kernel::PackedB>, k: usize, n: usize) -> Option<&super::kernel::PackedB> {
    let p = packed.filter(|_| backend() == Backend::Native)?;
    assert!(p.k() == k && p.n() == n, "gemm: packed B is {}x{}, the product needs {k}x{n}", p.k(), p.n());
    Some(p)
}

/// `c[i, j] = bias[j] + (a·b)[i, j]` (a linear layer's forward), with `b` optionally
/// prepacked as in [`gemm_prepacked`]. The native kernel adds the bias as it stores each tile;
/// the crate backends get the bias copied into `c` first. Same bits either way.
#[allow(clippy::too_many_arguments)]
pub fn gemm_bias_prepacked(
    m: usize,
    n: usize,
    k: usize,
    c: &mut [f32],
    c_rs: usize,
    a: Mat,
    b: Mat,
    packed: Option<&super::kernel::PackedB>,
    bias: &[f32],
) {
    assert!(bias.len() >= n, "gemm: bias of {} values for {n} columns", bias.len());
    match (backend(), native_packed(packed, k, n)) {
        (_, Some(p)) => super::kernel::gemm_packed_bias(m, c, c_rs, a, p, &bias[..n]),
        (Backend::Native, None) => {
            check_bounds("b", b.data.len(), k, n, b.rs, b.cs);
            super::kernel::sgemm_bias(m, n, k, c, c_rs, a, b, &bias[..n])
        }
        _ => {
            if m > 0 && n > 0 {
                check_bounds("c", c.len(), m, n, c_rs, 1);
            }
            for i in 0..m {
                c[i * c_rs..i * c_rs + n].copy_from_slice(&bias[..n]);
            }
            gemm(m, n, k, c, c_rs, a, b, true)
        }
    }
}

/// `c[m,n] = a[m,k] · b[k,n]` (overwriting) and `colsum[j] += Σ_p b[p, j]` (p in order): a
/// linear layer's weight gradient and bias gradient from `b = dY`. The native kernel sums the
/// columns while it packs `b`, so `dY` is read once; the other backends sum in a separate
/// loop. Same bits either way.
#[allow(clippy::too_many_arguments)]
pub fn gemm_colsum(m: usize, n: usize, k: usize, c: &mut [f32], c_rs: usize, a: Mat, b: Mat, colsum: &mut [f32]) {
    assert!(colsum.len() >= n, "gemm: {} column sums for {n} columns", colsum.len());
    if backend() == Backend::Native {
        return super::kernel::sgemm_colsum(m, n, k, c, c_rs, a, b, colsum);
    }
    gemm(m, n, k, c, c_rs, a, b, false);
    super::kernel::add_column_sums(k, n, b, colsum);
}

/// [`gemm`] with an explicit backend.
#[allow(clippy::too_many_arguments)]
#[inline]
pub fn gemm_with(
    backend: Backend,
    m: usize,
    n: usize,
    k: usize,
    c: &mut [f32],
    c_rs: usize,
    a: Mat,
    b: Mat,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    check_bounds("c", c.len(), m, n, c_rs, 1);
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                c[i * c_rs..i * c_rs + n].fill(0.0);
            }
        }
        return;
    }
    check_bounds("a", a.data.len(), m, k, a.rs, a.cs);
    check_bounds("b", b.data.len(), k, n, b.rs, b.cs);
    match backend {
        Backend::Native => super::kernel::sgemm(m, n, k, c, c_rs, a, b, accumulate),
        // SAFETY: check_bounds proved that every element the product reads through `a` and
        // `b` and writes through `c` lies inside the respective slice; `c` is a unique borrow,
        // so it cannot alias `a` or `b`. Strides fit in isize because the slices' lengths do.
        Backend::Gemm => unsafe {
            gemm::gemm(
                m,
                n,
                k,
                c.as_mut_ptr(),
                1,
                c_rs as isize,
                accumulate,
                a.data.as_ptr(),
                a.cs as isize,
                a.rs as isize,
                b.data.as_ptr(),
                b.cs as isize,
                b.rs as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        },
        // SAFETY: as above: all accessed elements are in bounds (check_bounds) and `c` does
        // not alias the inputs.
        Backend::MatrixMultiply => unsafe {
            matrixmultiply::sgemm(
                m,
                k,
                n,
                1.0,
                a.data.as_ptr(),
                a.rs as isize,
                a.cs as isize,
                b.data.as_ptr(),
                b.rs as isize,
                b.cs as isize,
                if accumulate { 1.0 } else { 0.0 },
                c.as_mut_ptr(),
                c_rs as isize,
                1,
            )
        },
    }
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
    fn both_backends_match_naive_product_for_all_transpose_combinations() {
        let (m, n, k) = (7, 5, 9);
        let a_rm = filled(m * k, 1);
        let a_cm = filled(m * k, 2);
        let b_rm = filled(k * n, 3);
        let b_cm = filled(k * n, 4);
        for backend in [Backend::Native, Backend::Gemm, Backend::MatrixMultiply] {
            for a in [Mat::rows(&a_rm, k), Mat::transposed(&a_cm, m)] {
                for b in [Mat::rows(&b_rm, n), Mat::transposed(&b_cm, k)] {
                    let want = naive(m, n, k, a, b);
                    let mut c = vec![1.0f32; m * n];
                    gemm_with(backend, m, n, k, &mut c, n, a, b, false);
                    for (x, y) in c.iter().zip(&want) {
                        assert!((x - y).abs() < 1e-5, "{backend:?}: {x} vs {y}");
                    }
                    let mut c2 = vec![1.0f32; m * n];
                    gemm_with(backend, m, n, k, &mut c2, n, a, b, true);
                    for (x, y) in c2.iter().zip(&want) {
                        assert!((x - (y + 1.0)).abs() < 1e-5, "{backend:?} accumulate");
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
        let packed = super::super::kernel::PackedB::pack(k, n, bm);
        let mut c2 = vec![f32::NAN; m * n];
        gemm_bias_prepacked(m, n, k, &mut c2, n, am, bm, Some(&packed), &bias);
        assert!(c.iter().zip(&c2).all(|(x, y)| x.to_bits() == y.to_bits()));
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
