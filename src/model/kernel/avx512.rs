//! The AVX-512 microkernel: a 6x64 tile of C, four adjacent 16-column B panels side by side,
//! in twenty-four 512-bit accumulators (of the 32 zmm registers; four more hold one k step's
//! B vectors and one the broadcast A value).
//!
//! The B packing is the AVX2 kernel's (16-column panels), read four panels at a time, so a
//! [`super::PackedB`] serves every path. Per element of C the operations are those of the
//! other kernels: the K block's products accumulated in order from zero with one FMA each,
//! then one addition to C or the bias; only the register width and the tile differ.

use super::NR;
use core::arch::x86_64::*;

/// `C[M x cols] (+)= A[M x kc] · B[kc x 16*P]` (columns past `cols` dropped), where B's
/// columns `16q..16q+16` at K index `p` are the 16 values at `b + q*b_ps + p*b_ks`.
///
/// A(i, p) is at `a + i*rs + p*cs`; `ROWS` says `cs == 1` (else `rs == 1`), which only picks
/// the addressing, the values read are the same.
///
/// # Safety
/// AVX-512F must be available. For `i < M`, `p < kc`: `a + i*rs + p*cs` is readable; for
/// `q < P`, `p < kc`: `b + q*b_ps + p*b_ks .. + 16` is readable; `16*(P-1) < cols <= 16*P`;
/// for `i < M`, `j < cols`: `c + i*c_rs + j` is writable and aliases neither input. `bias`
/// is null or `cols` readable values, added to each row as it is stored (`add` must then be
/// false).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx2,fma")]
pub unsafe fn kernel<const M: usize, const P: usize, const ROWS: bool>(
    kc: usize,
    a: *const f32,
    rs: usize,
    cs: usize,
    b: *const f32,
    b_ks: usize,
    b_ps: usize,
    c: *mut f32,
    c_rs: usize,
    cols: usize,
    add: bool,
    bias: *const f32,
) {
    // Start pulling this tile's C rows in now; they are needed after the K loop. A prefetch
    // never faults, and `wrapping_add` keeps the address computation defined where it lies
    // past the tile.
    for i in 0..M {
        for q in 0..P {
            _mm_prefetch::<_MM_HINT_T0>(c.wrapping_add(i * c_rs + q * NR) as *const i8);
        }
    }
    // SAFETY (for the whole body): every dereference below is of A(i, p) with i < M, p < kc,
    // of B panel q < P at row p < kc (16 values), or of C(i, j) with i < M, j < cols (masked
    // loads and stores touch no lane at or past `cols`): the ranges the caller guarantees.
    // Pointer bumps use `wrapping_add`, since the pointer after the last K step may lie past
    // its slice; it is never dereferenced there.
    let mut acc = [[_mm512_setzero_ps(); P]; M];
    let mut arow = [a; M];
    for (i, r) in arow.iter_mut().enumerate() {
        *r = a.wrapping_add(i * rs);
    }
    let mut acol = a;
    let mut bp = b;
    macro_rules! step {
        ($p:expr) => {{
            let mut bv = [_mm512_setzero_ps(); P];
            for (q, v) in bv.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(bp.add(q * b_ps + $p * b_ks));
            }
            for i in 0..M {
                let av = if ROWS { _mm512_set1_ps(*arow[i].add($p)) } else { _mm512_set1_ps(*acol.add($p * cs + i)) };
                for q in 0..P {
                    acc[i][q] = _mm512_fmadd_ps(av, bv[q], acc[i][q]);
                }
            }
        }};
    }
    let mut left = kc;
    // Unrolled by two where A walks down a column; one step at a time where it walks along
    // six rows (unrolled, LLVM hoists the second step's broadcasts and spills accumulators).
    let unroll = if ROWS { 1 } else { 2 };
    while left >= unroll {
        step!(0);
        if !ROWS {
            step!(1);
        }
        bp = bp.wrapping_add(unroll * b_ks);
        if ROWS {
            for r in arow.iter_mut() {
                *r = r.wrapping_add(1);
            }
        } else {
            acol = acol.wrapping_add(2 * cs);
        }
        left -= unroll;
    }
    if left > 0 {
        step!(0);
    }
    for q in 0..P {
        // Lanes of panel q that are columns of C: all 16 except in the last, ragged one.
        let valid = (cols - q * NR).min(NR);
        let mask: __mmask16 = if valid == NR { !0 } else { (1u16 << valid) - 1 };
        let bias_v = (!bias.is_null()).then(|| _mm512_maskz_loadu_ps(mask, bias.add(q * NR)));
        for (i, row) in acc.iter().enumerate() {
            let cr = c.add(i * c_rs + q * NR);
            let mut v = row[q];
            if add {
                v = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, cr), v);
            } else if let Some(bv) = bias_v {
                v = _mm512_add_ps(bv, v);
            }
            _mm512_mask_storeu_ps(cr, mask, v);
        }
    }
}

/// Every row tile of rows `0..mc` against `panels` (1..=4) adjacent B panels: tile `q` of rows
/// `i0..i0+mr` (from `row_tiles`) reads A at `a + q*ts` when `ts > 0` (packed panels) else at
/// `a + i0*rs`, and writes C at `c + i0*c_rs`; see [`kernel`] for the rest.
///
/// # Safety
/// As [`kernel`] with `P = panels`, for every tile of the block.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx2,fma")]
pub unsafe fn panel<const ROWS: bool>(
    mc: usize,
    kc: usize,
    a: *const f32,
    rs: usize,
    cs: usize,
    ts: usize,
    b: *const f32,
    b_ks: usize,
    b_ps: usize,
    panels: usize,
    c: *mut f32,
    c_rs: usize,
    cols: usize,
    add: bool,
    bias: *const f32,
) {
    // SAFETY: the caller guarantees the ranges for `P = panels`.
    unsafe {
        match panels {
            4 => tiles::<4, ROWS>(mc, kc, a, rs, cs, ts, b, b_ks, b_ps, c, c_rs, cols, add, bias),
            3 => tiles::<3, ROWS>(mc, kc, a, rs, cs, ts, b, b_ks, b_ps, c, c_rs, cols, add, bias),
            2 => tiles::<2, ROWS>(mc, kc, a, rs, cs, ts, b, b_ks, b_ps, c, c_rs, cols, add, bias),
            _ => tiles::<1, ROWS>(mc, kc, a, rs, cs, ts, b, b_ks, b_ps, c, c_rs, cols, add, bias),
        }
    }
}

/// [`panel`] for a fixed number of panels `P`.
///
/// # Safety
/// As [`panel`].
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn tiles<const P: usize, const ROWS: bool>(
    mc: usize,
    kc: usize,
    a: *const f32,
    rs: usize,
    cs: usize,
    ts: usize,
    b: *const f32,
    b_ks: usize,
    b_ps: usize,
    c: *mut f32,
    c_rs: usize,
    cols: usize,
    add: bool,
    bias: *const f32,
) {
    for (q, (i0, mr)) in super::row_tiles(0, mc).enumerate() {
        let at = if ts > 0 { a.wrapping_add(q * ts) } else { a.wrapping_add(i0 * rs) };
        let ct = c.wrapping_add(i0 * c_rs);
        // SAFETY: the caller guarantees the ranges of every tile.
        unsafe {
            match mr {
                6 => kernel::<6, P, ROWS>(kc, at, rs, cs, b, b_ks, b_ps, ct, c_rs, cols, add, bias),
                5 => kernel::<5, P, ROWS>(kc, at, rs, cs, b, b_ks, b_ps, ct, c_rs, cols, add, bias),
                4 => kernel::<4, P, ROWS>(kc, at, rs, cs, b, b_ks, b_ps, ct, c_rs, cols, add, bias),
                3 => kernel::<3, P, ROWS>(kc, at, rs, cs, b, b_ks, b_ps, ct, c_rs, cols, add, bias),
                2 => kernel::<2, P, ROWS>(kc, at, rs, cs, b, b_ks, b_ps, ct, c_rs, cols, add, bias),
                _ => kernel::<1, P, ROWS>(kc, at, rs, cs, b, b_ks, b_ps, ct, c_rs, cols, add, bias),
            }
        }
    }
}
