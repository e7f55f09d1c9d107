//! Packing of the operands into the panels the microkernels read, and the aligned buffers
//! that hold them. The panel layouts are the same on every SIMD path; the path only picks
//! which compiled copy of the copying loops runs.

use super::{row_tiles, Mat, MR, NR};
use crate::simd::Path;

/// A vector of f32 whose usable part starts on a 64-byte boundary (so packed B vectors never
/// straddle cache lines). Grows, never shrinks.
#[derive(Default)]
pub(super) struct AlignedBuf {
    pub(super) buf: Vec<f32>,
    off: usize,
    len: usize,
}

impl AlignedBuf {
    /// Makes `len` usable elements available (contents unspecified) and returns them.
    pub(super) fn resize(&mut self, len: usize) -> &mut [f32] {
        if self.buf.len() < len + 16 {
            self.buf = vec![0.0; len + 16];
        }
        let addr = self.buf.as_ptr() as usize;
        self.off = ((64 - addr % 64) % 64) / 4;
        self.len = len;
        &mut self.buf[self.off..self.off + len]
    }
    pub(super) fn as_slice(&self) -> &[f32] {
        &self.buf[self.off..self.off + self.len]
    }
}

/// Packs the `k x n` view `b` into `dst` (length `panels(n) * k * NR`) as 16-column panels.
/// With `colsum`, also adds each column's values to `colsum[j]`, row by row in order (the
/// bias gradient of a linear layer, from the `dY` its weight gradient packs anyway).
pub(super) fn pack_b_into(dst: &mut [f32], k: usize, n: usize, b: Mat, colsum: Option<&mut [f32]>, path: Path) {
    #[cfg(target_arch = "x86_64")]
    match path {
        Path::Avx512 => {
            #[target_feature(enable = "avx512f,avx2,fma")]
            fn avx512(dst: &mut [f32], k: usize, n: usize, b: Mat, colsum: Option<&mut [f32]>) {
                pack_b_body(dst, k, n, b, colsum)
            }
            // SAFETY: the kernel's entry points pass only a path the CPU has (`check_path`),
            // here AVX-512F, AVX2 and FMA: all `avx512` requires.
            return unsafe { avx512(dst, k, n, b, colsum) };
        }
        Path::Avx2 => {
            #[target_feature(enable = "avx2,fma")]
            fn avx2(dst: &mut [f32], k: usize, n: usize, b: Mat, colsum: Option<&mut [f32]>) {
                pack_b_body(dst, k, n, b, colsum)
            }
            // SAFETY: as above, AVX2 and FMA: all `avx2` requires.
            return unsafe { avx2(dst, k, n, b, colsum) };
        }
        Path::Portable => {}
    }
    pack_b_body(dst, k, n, b, colsum)
}

/// [`pack_b_into`]'s loops, inlined into copies compiled for AVX-512 and AVX2 (the copies move
/// 64 or 32 bytes at a time) and a baseline copy.
#[inline(always)]
fn pack_b_body(dst: &mut [f32], k: usize, n: usize, b: Mat, mut colsum: Option<&mut [f32]>) {
    debug_assert_eq!(dst.len(), n.div_ceil(NR) * k * NR);
    assert!(colsum.as_ref().is_none_or(|s| s.len() >= n), "kernel: column sums shorter than B's {n} columns");
    let full = n / NR;
    if b.cs == 1 && full > 0 {
        // Row-major B: walk each row once, front to back (one sequential read stream), and
        // deal its 16-wide pieces out to the full panels; the ragged last panel follows below.
        for p in 0..k {
            let row = &b.data[p * b.rs..p * b.rs + full * NR];
            for (jp, src) in row.chunks_exact(NR).enumerate() {
                let d = jp * k * NR + p * NR;
                dst[d..d + NR].copy_from_slice(src);
            }
            if let Some(sums) = colsum.as_deref_mut() {
                for (acc, &v) in sums[..full * NR].iter_mut().zip(row) {
                    *acc += v;
                }
            }
        }
    }
    let skip = if b.cs == 1 { full } else { 0 };
    for (jp, panel) in dst.chunks_exact_mut((k * NR).max(1)).enumerate().take(n.div_ceil(NR)).skip(skip) {
        let j0 = jp * NR;
        let nr = NR.min(n - j0);
        if nr < NR {
            panel.fill(0.0);
        }
        if b.cs == 1 {
            // Row-major B: each k step is a contiguous run of nr values.
            for (p, row) in panel.chunks_exact_mut(NR).enumerate() {
                let s = p * b.rs + j0;
                if nr == NR {
                    // Fixed length: compiles to two vector moves instead of a memcpy call.
                    let src: &[f32; NR] = b.data[s..s + NR].try_into().unwrap();
                    row.copy_from_slice(src);
                } else {
                    row[..nr].copy_from_slice(&b.data[s..s + nr]);
                }
                if let Some(sums) = colsum.as_deref_mut() {
                    for (acc, &v) in sums[j0..j0 + nr].iter_mut().zip(&row[..nr]) {
                        *acc += v;
                    }
                }
            }
        } else if b.rs == 1 {
            // Column-major B (a transposed row-major weight): each column is contiguous. Go
            // through K in blocks of 32 so the destination block stays in L1.
            for (pb, block) in panel.chunks_mut(32 * NR).enumerate() {
                let p0 = pb * 32;
                let kb = block.len() / NR;
                for j in 0..nr {
                    let s = (j0 + j) * b.cs + p0;
                    for (row, &v) in block.chunks_exact_mut(NR).zip(&b.data[s..s + kb]) {
                        row[j] = v;
                    }
                }
            }
        } else {
            for (p, row) in panel.chunks_exact_mut(NR).enumerate() {
                for (j, x) in row[..nr].iter_mut().enumerate() {
                    *x = b.data[p * b.rs + (j0 + j) * b.cs];
                }
            }
        }
        if b.cs != 1 {
            if let Some(sums) = colsum.as_deref_mut() {
                // Row by row in order, as above (the packed panel holds the same values).
                for row in panel.chunks_exact(NR) {
                    for (acc, &v) in sums[j0..j0 + nr].iter_mut().zip(&row[..nr]) {
                        *acc += v;
                    }
                }
            }
        }
    }
}

/// Packs `a` (`m x k`) into panels of `k * MR`, one per row tile of [`row_tiles`] over the
/// M blocks of `mc_full` rows: panel `q` holds that tile's rows of column `p` at
/// `q*k*MR + p*MR ..`, contiguous (slots past the tile's height are never read).
pub(super) fn pack_a_into(dst: &mut [f32], m: usize, k: usize, a: Mat, mc_full: usize, path: Path) {
    #[cfg(target_arch = "x86_64")]
    match path {
        Path::Avx512 => {
            #[target_feature(enable = "avx512f,avx2,fma")]
            fn avx512(dst: &mut [f32], m: usize, k: usize, a: Mat, mc_full: usize) {
                if a.cs == 1 && a.rs != 1 {
                    pack_a_rows_avx512(dst, m, k, a, mc_full)
                } else {
                    pack_a_body(dst, m, k, a, mc_full)
                }
            }
            // SAFETY: as in `pack_b_into`.
            return unsafe { avx512(dst, m, k, a, mc_full) };
        }
        Path::Avx2 => {
            #[target_feature(enable = "avx2,fma")]
            fn avx2(dst: &mut [f32], m: usize, k: usize, a: Mat, mc_full: usize) {
                pack_a_body(dst, m, k, a, mc_full)
            }
            // SAFETY: as in `pack_b_into`.
            return unsafe { avx2(dst, m, k, a, mc_full) };
        }
        Path::Portable => {}
    }
    pack_a_body(dst, m, k, a, mc_full)
}

/// [`pack_a_into`]'s loops (see [`pack_b_body`]).
#[inline(always)]
fn pack_a_body(dst: &mut [f32], m: usize, k: usize, a: Mat, mc_full: usize) {
    let tiles = (0..m).step_by(mc_full).flat_map(|i_blk| row_tiles(i_blk, mc_full.min(m - i_blk)));
    if a.rs == 1 {
        // Column-major A (a transposed activation): each column is contiguous. Fill one panel
        // at a time, so the writes are sequential; its reads walk down K, one line per column,
        // and the next tiles reuse the same lines from L1.
        for (q, (i0, mr)) in tiles.enumerate() {
            let panel = &mut dst[q * k * MR..(q + 1) * k * MR];
            for (p, col) in panel.chunks_exact_mut(MR).enumerate() {
                let s = i0 + p * a.cs;
                if mr == MR {
                    let src: &[f32; MR] = a.data[s..s + MR].try_into().unwrap();
                    col.copy_from_slice(src);
                } else {
                    col[..mr].copy_from_slice(&a.data[s..s + mr]);
                }
            }
        }
    } else if a.cs == 1 {
        for (q, (i0, mr)) in tiles.enumerate() {
            let panel = &mut dst[q * k * MR..(q + 1) * k * MR];
            for (pb, block) in panel.chunks_mut(64 * MR).enumerate() {
                let p0 = pb * 64;
                let kb = block.len() / MR;
                for i in 0..mr {
                    let s = (i0 + i) * a.rs + p0;
                    for (col, &v) in block.chunks_exact_mut(MR).zip(&a.data[s..s + kb]) {
                        col[i] = v;
                    }
                }
            }
        }
    } else {
        for (q, (i0, mr)) in tiles.enumerate() {
            let panel = &mut dst[q * k * MR..(q + 1) * k * MR];
            for (p, col) in panel.chunks_exact_mut(MR).enumerate() {
                for (i, x) in col[..mr].iter_mut().enumerate() {
                    *x = a.data[(i0 + i) * a.rs + p * a.cs];
                }
            }
        }
    }
}

/// Where lane `l` of the `j`-th vector of a transposed 6 x 16 block comes from: row
/// `(16j + l) % 6`, column `(16j + l) / 6` (the 96 values `col * 6 + row`).
#[cfg(target_arch = "x86_64")]
const fn transpose6_source(j: usize, l: usize) -> (usize, usize) {
    ((16 * j + l) % MR, (16 * j + l) / MR)
}

/// [`pack_a_body`] for a row-major A on the AVX-512 path: each full 6-row tile is transposed
/// 16 columns at a time in registers (six row loads, 36 masked permutes, six stores) instead
/// of one value at a time; partial tiles and the last `k % 16` columns take the scalar loop.
/// The values placed are the same, so the product's bits are too.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn pack_a_rows_avx512(dst: &mut [f32], m: usize, k: usize, a: Mat, mc_full: usize) {
    use core::arch::x86_64::*;
    // Per output vector j: the source column of each lane, and per source row the lanes it fills.
    let mut idx = [[0i32; 16]; MR];
    let mut masks = [[0u16; MR]; MR];
    for (j, (ix, mk)) in idx.iter_mut().zip(masks.iter_mut()).enumerate() {
        for (l, x) in ix.iter_mut().enumerate() {
            let (row, col) = transpose6_source(j, l);
            *x = col as i32;
            mk[row] |= 1 << l;
        }
    }
    let tiles = (0..m).step_by(mc_full).flat_map(|i_blk| row_tiles(i_blk, mc_full.min(m - i_blk)));
    let full_cols = k / 16 * 16;
    for (q, (i0, mr)) in tiles.enumerate() {
        let panel = &mut dst[q * k * MR..(q + 1) * k * MR];
        let rows: [&[f32]; MR] = std::array::from_fn(|i| {
            let r = (i0 + i.min(mr - 1)) * a.rs;
            &a.data[r..r + k]
        });
        let simd_cols = if mr == MR { full_cols } else { 0 };
        for p0 in (0..simd_cols).step_by(16) {
            let out = &mut panel[p0 * MR..(p0 + 16) * MR];
            // SAFETY: AVX-512F is enabled for this function (the caller's path check); every
            // load reads 16 values of a row slice at p0 + 16 <= k, every store writes 16 of the
            // 96 values of `out`; the unaligned load/store forms need no alignment.
            unsafe {
                let src: [__m512; MR] = std::array::from_fn(|i| _mm512_loadu_ps(rows[i].as_ptr().add(p0)));
                for j in 0..MR {
                    let ix = _mm512_loadu_si512(idx[j].as_ptr().cast());
                    let mut v = _mm512_setzero_ps();
                    for i in 0..MR {
                        v = _mm512_mask_permutexvar_ps(v, masks[j][i], ix, src[i]);
                    }
                    _mm512_storeu_ps(out.as_mut_ptr().add(16 * j), v);
                }
            }
        }
        for p in simd_cols..k {
            for (i, row) in rows.iter().enumerate().take(mr) {
                panel[p * MR + i] = row[p];
            }
        }
    }
}
