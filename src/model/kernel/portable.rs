//! The portable microkernel, for any CPU: the 6x16 tile in plain Rust.
//!
//! It performs exactly the SIMD kernels' IEEE operations per element of C: the block's k
//! products accumulated in order from zero, each with one fused multiply-add
//! ([`f32::mul_add`], a single rounding even where the CPU has no FMA instruction: then the
//! C library computes it exactly, only more slowly), then one addition to C or the bias.

use super::{Init, MR, NR};

/// `C[mr x nr] (+)= A[mr x kc] · B[kc x 16]` (columns past `nr` dropped): A(i, p) is
/// `a[i*rs + p*cs]`, B's row p is `b[p*b_ks..][..16]`, C(i, j) is `c[i*c_rs + j]`.
#[allow(clippy::too_many_arguments)]
pub(super) fn tile(
    mr: usize,
    nr: usize,
    kc: usize,
    a: &[f32],
    rs: usize,
    cs: usize,
    b: &[f32],
    b_ks: usize,
    c: &mut [f32],
    c_rs: usize,
    init: Init,
) {
    let mut acc = [[0.0f32; NR]; MR];
    for p in 0..kc {
        let brow = &b[p * b_ks..p * b_ks + NR];
        for (i, acc_row) in acc.iter_mut().enumerate().take(mr) {
            let av = a[i * rs + p * cs];
            for (x, &bv) in acc_row.iter_mut().zip(brow) {
                *x = av.mul_add(bv, *x);
            }
        }
    }
    for (i, acc_row) in acc.iter().enumerate().take(mr) {
        let crow = &mut c[i * c_rs..i * c_rs + nr];
        match init {
            // `C + acc` and `bias + acc`, the operand order of the SIMD kernels' adds.
            Init::C => {
                for (x, &v) in crow.iter_mut().zip(acc_row) {
                    *x += v;
                }
            }
            Init::Bias(b) => {
                for ((x, &v), &bj) in crow.iter_mut().zip(acc_row).zip(b) {
                    *x = bj + v;
                }
            }
            Init::Zero => crow.copy_from_slice(&acc_row[..nr]),
        }
    }
}
