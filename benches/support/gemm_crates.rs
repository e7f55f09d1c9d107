//! The GEMMs `benches/model.rs` compares: cllm's own kernel (what the model uses) and, called
//! directly, the `gemm` and `matrixmultiply` crates (dev-dependencies only; the model never
//! calls them). Shared with `tests/gemm_products.rs`, which checks all three compute the same
//! product, so a comparison row always measures the right thing.

use cllm::model::kernel::{check_bounds, Mat};

/// One of the compared implementations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Impl {
    /// cllm's kernel, through the model's entry point.
    Cllm,
    /// The `gemm` crate, single-threaded.
    GemmCrate,
    /// The `matrixmultiply` crate.
    MatrixMultiply,
}

/// Every implementation with the name its benchmark rows carry.
pub const ALL: [(&str, Impl); 3] =
    [("cllm-kernel", Impl::Cllm), ("gemm", Impl::GemmCrate), ("matrixmultiply", Impl::MatrixMultiply)];

/// `c[m,n] = a[m,k] · b[k,n]` (or `c += a·b` when `accumulate`), `c` with row stride `c_rs`,
/// by `which`. All sizes must be non-zero.
#[allow(clippy::too_many_arguments)]
pub fn product(
    which: Impl,
    m: usize,
    n: usize,
    k: usize,
    c: &mut [f32],
    c_rs: usize,
    a: Mat,
    b: Mat,
    accumulate: bool,
) {
    assert!(m > 0 && n > 0 && k > 0, "comparison products need non-zero sizes");
    check_bounds("c", c.len(), m, n, c_rs, 1);
    check_bounds("a", a.data.len(), m, k, a.rs, a.cs);
    check_bounds("b", b.data.len(), k, n, b.rs, b.cs);
    match which {
        Impl::Cllm => cllm::model::gemm::gemm(m, n, k, c, c_rs, a, b, accumulate),
        // SAFETY: check_bounds proved that every element the product reads through `a` and
        // `b` and writes through `c` lies inside the respective slice; `c` is a unique borrow,
        // so it cannot alias `a` or `b`. Strides fit in isize because the slices' lengths do.
        Impl::GemmCrate => unsafe {
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
        Impl::MatrixMultiply => unsafe {
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
