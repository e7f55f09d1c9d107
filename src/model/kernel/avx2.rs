//! The AVX2+FMA microkernel: a 6x16 tile of C in twelve 256-bit accumulators.

use super::NR;
use core::arch::x86_64::*;

/// `C[M x nr] (+)= A[M x kc] · B[kc x 16]` (columns past `nr` dropped).
///
/// A(i, p) is at `a + i*rs + p*cs`; `ROWS` says `cs == 1` (else `rs == 1`), which only
/// picks the addressing, the values read are the same.
///
/// # Safety
/// AVX2 and FMA must be available. For `i < M`, `p < kc`: `a + i*rs + p*cs` is readable;
/// for `p < kc`: `b + p*b_ks .. + 16` is readable; for `i < M`, `j < nr <= 16`: `c + i*c_rs + j` is
/// writable and aliases neither input. `bias` is null or `nr` readable values, added to each
/// row as it is stored (`add` must then be false).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn kernel<const M: usize, const ROWS: bool>(
    kc: usize,
    a: *const f32,
    rs: usize,
    cs: usize,
    b: *const f32,
    b_ks: usize,
    c: *mut f32,
    c_rs: usize,
    nr: usize,
    add: bool,
    bias: *const f32,
) {
    // Start pulling this tile's C rows in now; they are needed after the K loop. A
    // prefetch never faults, and `wrapping_add` keeps the address computation defined even
    // where `nr < 16` puts the second one past the tile.
    for i in 0..M {
        _mm_prefetch::<_MM_HINT_T0>(c.wrapping_add(i * c_rs) as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(c.wrapping_add(i * c_rs + NR - 1) as *const i8);
    }
    // SAFETY (for the whole body): every dereference below is of A(i, p) with i < M, p < kc,
    // of B row p < kc (16 values at `b + p*b_ks`), or of C(i, j) with i < M, j < nr: the
    // ranges the caller guarantees. Pointer bumps use `wrapping_add`, since the pointer
    // after the last K step may lie past its slice; it is never dereferenced there.
    let mut acc0 = [_mm256_setzero_ps(); M];
    let mut acc1 = [_mm256_setzero_ps(); M];
    // Row pointers for the row-major case; for the column case, one pointer walks down K.
    let mut arow = [a; M];
    for (i, r) in arow.iter_mut().enumerate() {
        *r = a.wrapping_add(i * rs);
    }
    let mut acol = a;
    let mut bp = b;
    macro_rules! step {
        ($p:expr) => {{
            let b0 = load8(bp.add($p * b_ks));
            let b1 = load8(bp.add($p * b_ks + 8));
            for i in 0..M {
                let av = if ROWS {
                    _mm256_broadcast_ss(&*arow[i].add($p))
                } else {
                    _mm256_broadcast_ss(&*acol.add($p * cs + i))
                };
                acc0[i] = _mm256_fmadd_ps(av, b0, acc0[i]);
                acc1[i] = _mm256_fmadd_ps(av, b1, acc1[i]);
            }
        }};
    }
    let mut left = kc;
    while left >= 4 {
        step!(0);
        step!(1);
        step!(2);
        step!(3);
        bp = bp.wrapping_add(4 * b_ks);
        if ROWS {
            for r in arow.iter_mut() {
                *r = r.wrapping_add(4);
            }
        } else {
            acol = acol.wrapping_add(4 * cs);
        }
        left -= 4;
    }
    while left > 0 {
        step!(0);
        bp = bp.wrapping_add(b_ks);
        if ROWS {
            for r in arow.iter_mut() {
                *r = r.wrapping_add(1);
            }
        } else {
            acol = acol.wrapping_add(cs);
        }
        left -= 1;
    }
    if nr == NR {
        let bias_v = (!bias.is_null()).then(|| (_mm256_loadu_ps(bias), _mm256_loadu_ps(bias.add(8))));
        for i in 0..M {
            let cr = c.add(i * c_rs);
            let (mut v0, mut v1) = (acc0[i], acc1[i]);
            if add {
                v0 = _mm256_add_ps(_mm256_loadu_ps(cr), v0);
                v1 = _mm256_add_ps(_mm256_loadu_ps(cr.add(8)), v1);
            } else if let Some((b0, b1)) = bias_v {
                v0 = _mm256_add_ps(b0, v0);
                v1 = _mm256_add_ps(b1, v1);
            }
            _mm256_storeu_ps(cr, v0);
            _mm256_storeu_ps(cr.add(8), v1);
        }
    } else {
        let mut tmp = [0.0f32; NR];
        for i in 0..M {
            _mm256_storeu_ps(tmp.as_mut_ptr(), acc0[i]);
            _mm256_storeu_ps(tmp.as_mut_ptr().add(8), acc1[i]);
            let cr = c.add(i * c_rs);
            for (j, &v) in tmp.iter().enumerate().take(nr) {
                let x = cr.add(j);
                *x = if add {
                    *x + v
                } else if !bias.is_null() {
                    *bias.add(j) + v
                } else {
                    v
                };
            }
        }
    }
}

/// Every row tile of rows `0..mc`: tile `q` of rows `i0..i0+mr` (from `row_tiles`) reads A
/// at `a + q*ts` when `ts > 0` (packed panels) else at `a + i0*rs`, and writes C at
/// `c + i0*c_rs`; see [`kernel`] for the rest.
///
/// # Safety
/// As [`kernel`], for every tile of the block.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn panel<const ROWS: bool>(
    mc: usize,
    kc: usize,
    a: *const f32,
    rs: usize,
    cs: usize,
    ts: usize,
    b: *const f32,
    b_ks: usize,
    c: *mut f32,
    c_rs: usize,
    nr: usize,
    add: bool,
    bias: *const f32,
) {
    for (q, (i0, mr)) in super::row_tiles(0, mc).enumerate() {
        let at = if ts > 0 { a.wrapping_add(q * ts) } else { a.wrapping_add(i0 * rs) };
        let ct = c.wrapping_add(i0 * c_rs);
        // SAFETY: the caller guarantees the ranges of every tile.
        unsafe {
            match mr {
                6 => kernel::<6, ROWS>(kc, at, rs, cs, b, b_ks, ct, c_rs, nr, add, bias),
                5 => kernel::<5, ROWS>(kc, at, rs, cs, b, b_ks, ct, c_rs, nr, add, bias),
                4 => kernel::<4, ROWS>(kc, at, rs, cs, b, b_ks, ct, c_rs, nr, add, bias),
                3 => kernel::<3, ROWS>(kc, at, rs, cs, b, b_ks, ct, c_rs, nr, add, bias),
                2 => kernel::<2, ROWS>(kc, at, rs, cs, b, b_ks, ct, c_rs, nr, add, bias),
                _ => kernel::<1, ROWS>(kc, at, rs, cs, b, b_ks, ct, c_rs, nr, add, bias),
            }
        }
    }
}

/// An unaligned-tolerant load (packed panels are 64-byte aligned when they come from
/// [`super::AlignedBuf`], but correctness must not depend on it).
#[inline(always)]
unsafe fn load8(p: *const f32) -> __m256 {
    // SAFETY: the caller guarantees 8 readable f32 at `p`; `loadu` has no alignment need.
    unsafe { _mm256_loadu_ps(p) }
}
