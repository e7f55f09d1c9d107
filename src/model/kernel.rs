//! A single-threaded f32 GEMM tuned for the model's shapes (M = 128 rows per sequence, K and N
//! in 32..=1024), with the option to pack a constant B operand (a weight) once and reuse the
//! packed panels across many products.
//!
//! Operands are [`Mat`] views (any row and column strides, so a transpose is a view), checked
//! against their buffers once per product ([`check_bounds`]) before any unchecked access.
//!
//! Design (BLIS-style):
//! - Microkernel: a 6x16 tile of C held in twelve 256-bit accumulators; every k step loads
//!   16 packed B values (two vectors) and broadcasts 6 A values, 12 FMAs. Edge rows use the same
//!   kernel instantiated for 1..=5 rows; edge columns run on zero-padded B panels and store
//!   only the valid columns.
//! - B is packed into panels of [`NR`] = 16 columns: panel `j` holds `B[p, 16j..16j+16]` for
//!   `p` in `0..k`, contiguous, zero-padded past `n`. Any K block of a panel is contiguous,
//!   so one packing serves every K blocking. [`PackedB`] keeps such a packing for reuse.
//! - A is read in place when it is row-major (`cs == 1`) or column-major (`rs == 1`) and small
//!   enough that its rows stay in L2, so such a product with a prepacked B copies nothing at
//!   all; otherwise (larger, or no unit stride) A is packed into 6-row panels first.
//! - Loops: K blocks of at most [`KC`] (the 16 x KC B micro-panel stays in L1), then M blocks
//!   of at most [`MC`] rows (the A block stays in L2), then column panels; one kernel call
//!   runs all the row tiles of a column panel.
//!
//! Determinism: every element of C is the sum over K blocks, in order, of a sequential
//! per-block dot product, with the blocking a function of (m, n, k) only; no threads. The
//! same inputs therefore give the same bits on every call. The AVX2 path (fused multiply-add)
//! and the portable path (separate multiply and add) round differently from each other, but
//! the path is fixed per machine.

use std::cell::RefCell;

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

/// Rows of the C tile computed by one microkernel call.
pub const MR: usize = 6;
/// Columns of the C tile computed by one microkernel call (the packed B panel width).
pub const NR: usize = 16;
/// Largest K block: the 16 x KC packed B micro-panel is 16 KiB, half of L1.
pub const KC: usize = 256;
/// Largest M block: an MC x KC block of A (144 KiB) stays in L2.
pub const MC: usize = 144;

/// Panics unless every element of a `rows x cols` view with strides `rs`, `cs` lies inside a
/// buffer of `len` values (`what` names the operand in the message). Empty views always fit.
pub fn check_bounds(what: &str, len: usize, rows: usize, cols: usize, rs: usize, cs: usize) {
    if rows == 0 || cols == 0 {
        return;
    }
    let last = (rows - 1)
        .checked_mul(rs)
        .and_then(|r| (cols - 1).checked_mul(cs).and_then(|c| r.checked_add(c)))
        .unwrap_or(usize::MAX);
    assert!(last < len, "kernel: {what} view [{rows}x{cols}] rs={rs} cs={cs} overruns its buffer of {len}");
}

/// Whether the AVX2+FMA microkernel can run on this CPU (checked once, then cached by std).
#[inline]
fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The kernel and the code path it takes on this CPU, as benchmark reports name it:
/// `"cllm (avx2+fma)"` or `"cllm (portable)"` (the run-time detection the products use).
pub fn name() -> &'static str {
    if simd_available() {
        "cllm (avx2+fma)"
    } else {
        "cllm (portable)"
    }
}

/// A vector of f32 whose usable part starts on a 64-byte boundary (so packed B vectors never
/// straddle cache lines). Grows, never shrinks.
#[derive(Default)]
struct AlignedBuf {
    buf: Vec<f32>,
    off: usize,
    len: usize,
}

impl AlignedBuf {
    /// Makes `len` usable elements available (contents unspecified) and returns them.
    fn resize(&mut self, len: usize) -> &mut [f32] {
        if self.buf.len() < len + 16 {
            self.buf = vec![0.0; len + 16];
        }
        let addr = self.buf.as_ptr() as usize;
        self.off = ((64 - addr % 64) % 64) / 4;
        self.len = len;
        &mut self.buf[self.off..self.off + len]
    }
    fn as_slice(&self) -> &[f32] {
        &self.buf[self.off..self.off + self.len]
    }
}

/// Packs the `k x n` view `b` into `dst` (length `panels(n) * k * NR`) as 16-column panels.
/// With `colsum`, also adds each column's values to `colsum[j]`, row by row in order (the
/// bias gradient of a linear layer, from the `dY` its weight gradient packs anyway).
fn pack_b_into(dst: &mut [f32], k: usize, n: usize, b: Mat, colsum: Option<&mut [f32]>) {
    #[cfg(target_arch = "x86_64")]
    if simd_available() {
        #[target_feature(enable = "avx2,fma")]
        fn avx2(dst: &mut [f32], k: usize, n: usize, b: Mat, colsum: Option<&mut [f32]>) {
            pack_b_body(dst, k, n, b, colsum)
        }
        // SAFETY: AVX2 and FMA are present (checked just above), all `avx2` requires.
        return unsafe { avx2(dst, k, n, b, colsum) };
    }
    pack_b_body(dst, k, n, b, colsum)
}

/// [`pack_b_into`]'s loops, inlined into a copy compiled for AVX2 (the copies move 32 bytes at
/// a time) and a baseline copy.
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

/// A B operand (`k x n`) packed once into 16-column panels, for reuse across products.
pub struct PackedB {
    k: usize,
    n: usize,
    buf: AlignedBuf,
}

impl PackedB {
    /// Packs the `k x n` view `b` (row-major weights `[k, n]`, or a transposed view of a
    /// row-major `[n, k]` weight, or any strided view).
    pub fn pack(k: usize, n: usize, b: Mat) -> PackedB {
        let mut p = PackedB { k, n, buf: AlignedBuf::default() };
        p.repack(b);
        p
    }

    /// A `k x n` packing of zeros, to be filled by [`PackedB::repack`].
    pub fn zeros(k: usize, n: usize) -> PackedB {
        let mut p = PackedB { k, n, buf: AlignedBuf::default() };
        p.buf.resize(n.div_ceil(NR) * k * NR).fill(0.0);
        p
    }

    /// Packs new values of the same shape into the existing allocation.
    pub fn repack(&mut self, b: Mat) {
        let (k, n) = (self.k, self.n);
        check_bounds("b", b.data.len(), k, n, b.rs, b.cs);
        let dst = self.buf.resize(n.div_ceil(NR) * k * NR);
        pack_b_into(dst, k, n, b, None);
    }

    /// Packs the `k x n` view `b`, reshaping (and growing, never shrinking) the buffer first.
    pub fn repack_as(&mut self, k: usize, n: usize, b: Mat) {
        self.k = k;
        self.n = n;
        self.repack(b);
    }

    /// The packed panels (zero-padded past `n`).
    pub fn panels(&self) -> &[f32] {
        self.buf.as_slice()
    }

    /// The index of `B[p, j]` in a packing of `k` rows (`p < k`): the panel layout above.
    #[inline]
    pub fn panel_index(k: usize, p: usize, j: usize) -> usize {
        (j / NR) * k * NR + p * NR + j % NR
    }

    /// The packed buffer's first element and length, for a writer that stores new values into
    /// elements it alone owns while nothing reads the packing (see `packed::SharedPacking`).
    pub fn raw_parts(&mut self) -> (*mut f32, usize) {
        let len = self.n.div_ceil(NR) * self.k * NR;
        let s = self.buf.resize(len);
        (s.as_mut_ptr(), len)
    }

    /// Rows of the packed operand (the product's K).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Columns of the packed operand (the product's N).
    pub fn n(&self) -> usize {
        self.n
    }
}

/// The blocking of an `m x k` A: (number of K blocks, K block size, M block size). K blocks are
/// balanced (at most [`KC`]); M blocks are balanced and rounded up to a multiple of [`MR`].
fn blocking(m: usize, k: usize) -> (usize, usize, usize) {
    let nkb = k.div_ceil(KC);
    let nmb = m.div_ceil(MC);
    (nkb, k.div_ceil(nkb), m.div_ceil(nmb).div_ceil(MR) * MR)
}

/// The row tiles of an M block of `mc` rows starting at `i_blk`: tiles of [`MR`] rows, except
/// that a remainder of 1 or 2 rows is merged with the last full tile and split 4 + 3 or 4 + 4
/// (a 1- or 2-row tile is FMA-latency-bound: it would cost two thirds of a full tile).
fn row_tiles(i_blk: usize, mc: usize) -> impl Iterator<Item = (usize, usize)> + Clone {
    let (full, r) = (mc / MR, mc % MR);
    let (nfull, tail) = if (r == 1 || r == 2) && full > 0 { (full - 1, [4, MR + r - 4]) } else { (full, [r, 0]) };
    let t0 = i_blk + nfull * MR;
    (0..nfull)
        .map(move |t| (i_blk + t * MR, MR))
        .chain([(t0, tail[0]), (t0 + tail[0], tail[1])].into_iter().filter(|&(_, mr)| mr > 0))
}

/// Where the tile loop reads B: the 16 columns of panel `jp` at K index `p` are
/// `data[jp*ps + p*ks ..][..16]`. Packed panels have `ks = NR`, `ps = k*NR`.
#[derive(Clone, Copy)]
struct BSrc<'a> {
    data: &'a [f32],
    ks: usize,
    ps: usize,
}

/// What a product's C starts from before `A·B` is added (per K block, the first block's
/// choice; later K blocks always add to C).
#[derive(Clone, Copy)]
enum Init<'a> {
    /// `C = A·B`.
    Zero,
    /// `C += A·B`.
    C,
    /// `C[i, j] = bias[j] + (A·B)[i, j]`: a linear layer's bias added as the tile is stored,
    /// instead of copied into C and read back (same bits: the same single addition).
    Bias(&'a [f32]),
}

impl<'a> Init<'a> {
    fn new(accumulate: bool) -> Self {
        if accumulate {
            Init::C
        } else {
            Init::Zero
        }
    }

    /// The mode of K block `kb` (only the first starts from zero or the bias).
    fn for_block(self, kb: usize) -> Self {
        if kb > 0 {
            Init::C
        } else {
            self
        }
    }

    /// This mode restricted to the columns `j0..j0 + nr` of a tile.
    fn cols(self, j0: usize, nr: usize) -> Self {
        match self {
            Init::Bias(b) => Init::Bias(&b[j0..j0 + nr]),
            other => other,
        }
    }
}

/// Where the blocked loop reads A: in place (a view with a unit stride), or packed into 6-row
/// panels by [`pack_a_into`].
#[derive(Clone, Copy)]
enum AIn<'a> {
    InPlace(Mat<'a>),
    Packed(&'a [f32]),
}

/// The blocked loop nest: K blocks, then M blocks, then B micro-panels, each micro-panel
/// against every row tile of the M block ([`panel`]). `b` holds `n.div_ceil(NR)` packed panels.
///
/// The caller has bounds-checked C (`m x n`, row stride `c_rs`) and A (`m x k`); `k > 0`,
/// `m > 0`, `n > 0`.
#[allow(clippy::too_many_arguments)]
fn blocked(m: usize, n: usize, k: usize, c: &mut [f32], c_rs: usize, a: AIn, b: BSrc, init: Init, simd: bool) {
    let (nkb, kc_full, mc_full) = blocking(m, k);
    let npanels = n.div_ceil(NR);
    for kb in 0..nkb {
        let p0 = kb * kc_full;
        let kc = kc_full.min(k - p0);
        let init_kb = init.for_block(kb);
        for i_blk in (0..m).step_by(mc_full) {
            let mc = mc_full.min(m - i_blk);
            let a_src = match a {
                AIn::InPlace(a) => {
                    ASrc { data: &a.data[i_blk * a.rs + p0 * a.cs..], rs: a.rs, cs: a.cs, tile_stride: None }
                }
                // This M block's tiles are panels i_blk/MR.. of the packing, k*MR apart.
                AIn::Packed(ap) => {
                    ASrc { data: &ap[(i_blk / MR) * k * MR + p0 * MR..], rs: 1, cs: MR, tile_stride: Some(k * MR) }
                }
            };
            for jp in 0..npanels {
                let j0 = jp * NR;
                let nr = NR.min(n - j0);
                let b_off = jp * b.ps + p0 * b.ks;
                let b_tile = &b.data[b_off..b_off + (kc - 1) * b.ks + NR];
                let c_blk = &mut c[i_blk * c_rs + j0..];
                panel(mc, nr, kc, a_src, b_tile, b.ks, c_blk, c_rs, init_kb.cols(j0, nr), simd);
            }
        }
    }
}

/// The A block of a [`panel`] call: tile `q` of rows `i0..` starts at `data[q * ts]` when
/// `tile_stride` is `Some(ts)` (packed 6-row panels), else at `data[i0 * rs]` (read in place);
/// within a tile A(i, p) is at `i * rs + p * cs`.
#[derive(Clone, Copy)]
struct ASrc<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
    tile_stride: Option<usize>,
}

/// Every row tile of an `mc`-row M block against one B micro-panel (`kc x 16`, `nr` valid
/// columns): `c (+)= a · b_tile`. One call per micro-panel instead of one per 6-row tile, so
/// the bounds checks and the dispatch happen once per panel; `c` starts at the block's C(0, 0).
#[allow(clippy::too_many_arguments)]
fn panel(
    mc: usize,
    nr: usize,
    kc: usize,
    a: ASrc,
    b: &[f32],
    b_ks: usize,
    c: &mut [f32],
    c_rs: usize,
    init: Init,
    simd: bool,
) {
    assert!(mc >= 1 && (1..=NR).contains(&nr) && kc >= 1);
    assert!(a.rs == 1 || a.cs == 1, "kernel: A must have a unit stride");
    // The last A element any tile reads: in place, row mc-1 at column kc-1; packed, the last
    // tile's panel holds MR slots per column.
    let a_last = match a.tile_stride {
        None => (mc - 1) * a.rs + (kc - 1) * a.cs,
        Some(ts) => {
            assert!(a.rs == 1 && a.cs == MR, "kernel: packed A panels are column-major 6-row tiles");
            (mc.div_ceil(MR) - 1) * ts + (kc - 1) * MR + MR - 1
        }
    };
    assert!(a_last < a.data.len(), "kernel: A block out of bounds");
    assert!(b_ks >= NR && b.len() >= (kc - 1) * b_ks + NR, "kernel: B tile out of bounds");
    assert!((mc - 1) * c_rs + nr <= c.len(), "kernel: C block out of bounds");
    if let Init::Bias(bias) = init {
        assert!(bias.len() == nr, "kernel: bias tile has the wrong length");
    }
    #[cfg(target_arch = "x86_64")]
    if simd {
        let add = matches!(init, Init::C);
        let bias = if let Init::Bias(b) = init { b.as_ptr() } else { std::ptr::null() };
        let (ap, bp, cp) = (a.data.as_ptr(), b.as_ptr(), c.as_mut_ptr());
        let ts = a.tile_stride.unwrap_or(0);
        // SAFETY: `simd` is only true when `simd_available()` returned true (checked by the
        // public entry points), so AVX2 and FMA are present. The asserts above bound every A
        // element a tile reads (tiles cover rows 0..mc, each at most MR rows, kc columns), the
        // 16 B values of every k step, every C element (i < mc, j < nr) and the bias.
        unsafe {
            if a.cs == 1 {
                avx2::panel::<true>(mc, kc, ap, a.rs, a.cs, ts, bp, b_ks, cp, c_rs, nr, add, bias)
            } else {
                avx2::panel::<false>(mc, kc, ap, a.rs, a.cs, ts, bp, b_ks, cp, c_rs, nr, add, bias)
            }
        }
        return;
    }
    for (q, (i0, mr)) in row_tiles(0, mc).enumerate() {
        let a_off = match a.tile_stride {
            Some(ts) => q * ts,
            None => i0 * a.rs,
        };
        let c_tile = &mut c[i0 * c_rs..i0 * c_rs + (mr - 1) * c_rs + nr];
        portable_tile(mr, nr, kc, &a.data[a_off..], a.rs, a.cs, b, b_ks, c_tile, c_rs, init);
    }
}

/// The portable microkernel: same blocking and summation order as the SIMD one, with separate
/// multiply and add.
#[allow(clippy::too_many_arguments)]
fn portable_tile(
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
                *x += av * bv;
            }
        }
    }
    for (i, acc_row) in acc.iter().enumerate().take(mr) {
        let crow = &mut c[i * c_rs..i * c_rs + nr];
        match init {
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

#[cfg(target_arch = "x86_64")]
mod avx2 {
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
}

thread_local! {
    /// Per-thread scratch for [`sgemm`]: packed B panels, then packed A panels.
    static SCRATCH: RefCell<(AlignedBuf, AlignedBuf)> = RefCell::new((AlignedBuf::default(), AlignedBuf::default()));
}

/// Checks C (and the bias), handles the degenerate shapes; returns false when there is
/// nothing left to do.
fn prologue(m: usize, n: usize, k: usize, c: &mut [f32], c_rs: usize, a: &Mat, init: Init) -> bool {
    if m == 0 || n == 0 {
        return false;
    }
    check_bounds("c", c.len(), m, n, c_rs, 1);
    if let Init::Bias(b) = init {
        assert!(b.len() >= n, "kernel: bias of {} values for {n} columns", b.len());
    }
    if k == 0 {
        for i in 0..m {
            let row = &mut c[i * c_rs..i * c_rs + n];
            match init {
                Init::Zero => row.fill(0.0),
                Init::Bias(b) => row.copy_from_slice(&b[..n]),
                Init::C => {}
            }
        }
        return false;
    }
    check_bounds("a", a.data.len(), m, k, a.rs, a.cs);
    true
}

/// `C[m, n] = A[m, k] · B` (or `C += A·B` when `accumulate`), B prepacked (`k = b.k()`,
/// `n = b.n()`), C row-major with row stride `c_rs`. Gives the same bits as [`sgemm`] on the
/// unpacked B. Copies only A, and only when it is large (into the per-thread scratch).
pub fn gemm_packed(m: usize, c: &mut [f32], c_rs: usize, a: Mat, b: &PackedB, accumulate: bool) {
    gemm_packed_with(m, c, c_rs, a, b, Init::new(accumulate), simd_available());
}

/// `C[i, j] = bias[j] + (A·B)[i, j]` with B prepacked: a linear layer's forward in one pass.
/// The same bits as copying the bias into C and calling [`gemm_packed`] with `accumulate`.
pub fn gemm_packed_bias(m: usize, c: &mut [f32], c_rs: usize, a: Mat, b: &PackedB, bias: &[f32]) {
    gemm_packed_with(m, c, c_rs, a, b, Init::Bias(bias), simd_available());
}

fn gemm_packed_with(m: usize, c: &mut [f32], c_rs: usize, a: Mat, b: &PackedB, init: Init, simd: bool) {
    packed_block_with(m, c, c_rs, a, b, 0..b.k, b.n, init, simd)
}

/// The product with rows `rows` and the first `cols` columns of a packed B.
#[allow(clippy::too_many_arguments)]
fn packed_block_with(
    m: usize,
    c: &mut [f32],
    c_rs: usize,
    a: Mat,
    b: &PackedB,
    rows: std::ops::Range<usize>,
    cols: usize,
    init: Init,
    simd: bool,
) {
    assert!(rows.start <= rows.end && rows.end <= b.k, "kernel: rows {rows:?} of a packed B with {} rows", b.k);
    assert!(cols <= b.n, "kernel: {cols} columns of a packed B with {}", b.n);
    let (k, n) = (rows.len(), cols);
    if prologue(m, n, k, c, c_rs, &a, init) {
        // Panel jp's rows start at jp * (b.k * NR); a row range is an offset within each.
        let bsrc = BSrc { data: &b.buf.as_slice()[rows.start * NR..], ks: NR, ps: b.k * NR };
        SCRATCH.with(|s| run_a(m, n, k, c, c_rs, a, bsrc, &mut s.borrow_mut().1, init, simd));
    }
}

/// `C[m, cols] = A[m, rows.len()] · B[rows, ..cols]` (or `C += ...` when `accumulate`): the
/// product with a block of a packed B, a range of its rows and a prefix of its columns, so one
/// packing serves every block (the causal attention's row blocks). The same bits as
/// [`sgemm`] on that block of the unpacked B.
#[allow(clippy::too_many_arguments)]
pub fn gemm_packed_block(
    m: usize,
    c: &mut [f32],
    c_rs: usize,
    a: Mat,
    b: &PackedB,
    rows: std::ops::Range<usize>,
    cols: usize,
    accumulate: bool,
) {
    packed_block_with(m, c, c_rs, a, b, rows, cols, Init::new(accumulate), simd_available())
}

/// `C[m, n] = A[m, k] · B[k, n]` (or `C += A·B` when `accumulate`), C row-major with row
/// stride `c_rs`. Packs B (and A when worthwhile) into a per-thread scratch buffer that is
/// reused, so after the first calls of a given size this allocates nothing.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(m: usize, n: usize, k: usize, c: &mut [f32], c_rs: usize, a: Mat, b: Mat, accumulate: bool) {
    sgemm_with(m, n, k, c, c_rs, a, b, Init::new(accumulate), None, simd_available());
}

/// `C[i, j] = bias[j] + (A·B)[i, j]` (see [`gemm_packed_bias`]), packing B per call.
#[allow(clippy::too_many_arguments)]
pub fn sgemm_bias(m: usize, n: usize, k: usize, c: &mut [f32], c_rs: usize, a: Mat, b: Mat, bias: &[f32]) {
    sgemm_with(m, n, k, c, c_rs, a, b, Init::Bias(bias), None, simd_available());
}

/// [`sgemm`] (overwriting C) that also adds B's column sums to `colsum` (`colsum[j] +=
/// Σ_p B[p, j]`, p in order) while it packs B: a linear layer's weight and bias gradients from
/// one read of `dY`. The sums are the same bits as a separate row-by-row loop.
#[allow(clippy::too_many_arguments)]
pub fn sgemm_colsum(m: usize, n: usize, k: usize, c: &mut [f32], c_rs: usize, a: Mat, b: Mat, colsum: &mut [f32]) {
    sgemm_with(m, n, k, c, c_rs, a, b, Init::Zero, Some(colsum), simd_available());
}

/// `sums[j] += Σ_p B[p, j]` for the `k x n` view `b`, row by row in order: the column sums
/// [`sgemm_colsum`] takes while packing, where there is no packing to ride on.
fn add_column_sums(k: usize, n: usize, b: Mat, sums: &mut [f32]) {
    if n == 0 {
        return;
    }
    check_bounds("b", b.data.len(), k, n, b.rs, b.cs);
    for p in 0..k {
        for (j, acc) in sums[..n].iter_mut().enumerate() {
            *acc += b.data[p * b.rs + j * b.cs];
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn sgemm_with(
    m: usize,
    n: usize,
    k: usize,
    c: &mut [f32],
    c_rs: usize,
    a: Mat,
    b: Mat,
    init: Init,
    colsum: Option<&mut [f32]>,
    simd: bool,
) {
    if !prologue(m, n, k, c, c_rs, &a, init) {
        if let Some(sums) = colsum {
            // No product to pack B for, but its column sums are still wanted.
            add_column_sums(k, n, b, sums);
        }
        return;
    }
    check_bounds("b", b.data.len(), k, n, b.rs, b.cs);
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        let (bbuf, abuf) = &mut *s;
        let bp = bbuf.resize(n.div_ceil(NR) * k * NR);
        pack_b_into(bp, k, n, b, colsum);
        // B is always packed: read in place, its rows' power-of-two strides would map a
        // micro-panel onto a few L1 sets.
        let bsrc = BSrc { data: bbuf.as_slice(), ks: NR, ps: k * NR };
        run_a(m, n, k, c, c_rs, a, bsrc, abuf, init, simd);
    });
}

/// The product with B packed: decides whether A is packed (into `abuf`) or read in place.
/// Either way the arithmetic is the same, so this choice never changes the result's bits.
#[allow(clippy::too_many_arguments)]
fn run_a(
    m: usize,
    n: usize,
    k: usize,
    c: &mut [f32],
    c_rs: usize,
    a: Mat,
    bsrc: BSrc,
    abuf: &mut AlignedBuf,
    init: Init,
    simd: bool,
) {
    // A is read in place when it fits one M block (row-major) or two (column-major: the
    // transposed activations of dW = X^T·dY); beyond that its strided rows thrash L2, so it
    // is packed into 6-row panels. A view without a unit stride is always packed.
    let pack_a = if a.cs == 1 {
        m > MC
    } else if a.rs == 1 {
        m > 2 * MC
    } else {
        true
    };
    if pack_a {
        let panels = m.div_ceil(MR);
        let ap = abuf.resize(panels * k * MR);
        pack_a_into(ap, m, k, a, blocking(m, k).2);
        blocked(m, n, k, c, c_rs, AIn::Packed(ap), bsrc, init, simd);
    } else {
        blocked(m, n, k, c, c_rs, AIn::InPlace(a), bsrc, init, simd);
    }
}

/// Packs `a` (`m x k`) into panels of `k * MR`, one per row tile of [`row_tiles`] over the
/// M blocks of `mc_full` rows: panel `q` holds that tile's rows of column `p` at
/// `q*k*MR + p*MR ..`, contiguous (slots past the tile's height are never read).
fn pack_a_into(dst: &mut [f32], m: usize, k: usize, a: Mat, mc_full: usize) {
    #[cfg(target_arch = "x86_64")]
    if simd_available() {
        #[target_feature(enable = "avx2,fma")]
        fn avx2(dst: &mut [f32], m: usize, k: usize, a: Mat, mc_full: usize) {
            pack_a_body(dst, m, k, a, mc_full)
        }
        // SAFETY: AVX2 and FMA are present (checked just above), all `avx2` requires.
        return unsafe { avx2(dst, m, k, a, mc_full) };
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (xorshift), values in [-1, 1).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn f32(&mut self) -> f32 {
            (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn vec(&mut self, len: usize) -> Vec<f32> {
            (0..len).map(|_| self.f32()).collect()
        }
    }

    /// A `rows x cols` matrix stored row-major (`t = false`) or column-major (`t = true`) in a
    /// buffer with padded leading dimension, returned with the view's strides.
    fn make(rng: &mut Rng, rows: usize, cols: usize, t: bool, pad: usize) -> (Vec<f32>, usize, usize) {
        if t {
            let ld = rows + pad;
            (rng.vec(ld * cols.max(1)), 1, ld)
        } else {
            let ld = cols + pad;
            (rng.vec(ld * rows.max(1)), ld, 1)
        }
    }

    /// `C (+)= A·B` in f64, then checked against `got` with a tolerance scaled by k.
    #[allow(clippy::too_many_arguments)]
    fn check(
        m: usize,
        n: usize,
        k: usize,
        a: Mat,
        b: Mat,
        c0: &[f32],
        got: &[f32],
        c_rs: usize,
        acc: bool,
        what: &str,
    ) {
        // Large products: check every 9th row (plus the last), all columns, so the f64
        // reference stays cheap in debug builds; every row tile kind is still covered.
        let step = if m * n * k > 1 << 22 { 9 } else { 1 };
        for i in (0..m).filter(|&i| i % step == 0 || i >= m - 7) {
            for j in 0..n {
                let mut s = if acc { c0[i * c_rs + j] as f64 } else { 0.0 };
                for p in 0..k {
                    s += a.data[i * a.rs + p * a.cs] as f64 * b.data[p * b.rs + j * b.cs] as f64;
                }
                let g = got[i * c_rs + j] as f64;
                let tol = 1e-5 * (k as f64 + 1.0).sqrt() * 4.0 + 1e-6 * k as f64;
                assert!((g - s).abs() <= tol, "{what} m={m} n={n} k={k} acc={acc} at ({i},{j}): {g} vs {s}");
            }
            // Padding between rows of C is untouched.
            for j in n..c_rs.min(got.len() - i * c_rs) {
                if i + 1 < m {
                    assert_eq!(got[i * c_rs + j], c0[i * c_rs + j], "{what}: wrote C padding");
                }
            }
        }
    }

    fn bits_eq(x: &[f32], y: &[f32]) -> bool {
        x.len() == y.len() && x.iter().zip(y).all(|(a, b)| a.to_bits() == b.to_bits())
    }

    /// Runs every entry point on one shape, all transpose combinations, both accumulate modes,
    /// padded C, and both the SIMD (when present) and portable paths.
    fn exercise(rng: &mut Rng, m: usize, n: usize, k: usize) {
        let paths: &[bool] = if simd_available() { &[true, false] } else { &[false] };
        for &at in &[false, true] {
            for &bt in &[false, true] {
                let pad = rng.below(3);
                let (ad, ars, acs) = make(rng, m, k, at, pad);
                let bpad = rng.below(3);
                let (bd, brs, bcs) = make(rng, k, n, bt, bpad);
                let a = Mat::strided(&ad, ars, acs);
                let b = Mat::strided(&bd, brs, bcs);
                let c_rs = n + rng.below(4);
                let c0 = rng.vec(m * c_rs);
                let pb = PackedB::pack(k, n, b);
                let bias = rng.vec(n);
                for &simd in paths {
                    // The bias epilogue gives exactly what copying the bias into C and
                    // accumulating gives.
                    let mut want = c0.clone();
                    for i in 0..m {
                        want[i * c_rs..i * c_rs + n].copy_from_slice(&bias);
                    }
                    sgemm_with(m, n, k, &mut want, c_rs, a, b, Init::C, None, simd);
                    let mut got = c0.clone();
                    sgemm_with(m, n, k, &mut got, c_rs, a, b, Init::Bias(&bias), None, simd);
                    assert!(bits_eq(&got, &want), "sgemm bias simd={simd} at={at} bt={bt}");
                    let mut got = c0.clone();
                    gemm_packed_with(m, &mut got, c_rs, a, &pb, Init::Bias(&bias), simd);
                    assert!(bits_eq(&got, &want), "packed bias simd={simd} at={at} bt={bt}");
                    for &acc in &[false, true] {
                        let mut c = c0.clone();
                        sgemm_with(m, n, k, &mut c, c_rs, a, b, Init::new(acc), None, simd);
                        check(m, n, k, a, b, &c0, &c, c_rs, acc, &format!("sgemm simd={simd} at={at} bt={bt}"));
                        let mut c2 = c0.clone();
                        gemm_packed_with(m, &mut c2, c_rs, a, &pb, Init::new(acc), simd);
                        check(m, n, k, a, b, &c0, &c2, c_rs, acc, &format!("packed simd={simd} at={at} bt={bt}"));
                    }
                }
            }
        }
    }

    /// Views with no unit stride (every other element, both ways) take the packed-A path.
    #[test]
    fn views_without_a_unit_stride() {
        let mut rng = Rng(31337);
        for (m, n, k) in [(1, 1, 1), (7, 5, 9), (13, 40, 33), (200, 20, 17)] {
            let ad = rng.vec(2 * m * k * 2);
            let bd = rng.vec(2 * k * n * 2);
            let a = Mat::strided(&ad, 2 * k, 2);
            let b = Mat::strided(&bd, 2, 2 * k);
            let c0 = rng.vec(m * n);
            let pb = PackedB::pack(k, n, b);
            let paths: &[bool] = if simd_available() { &[true, false] } else { &[false] };
            for &simd in paths {
                for acc in [false, true] {
                    let mut c = c0.clone();
                    sgemm_with(m, n, k, &mut c, n, a, b, Init::new(acc), None, simd);
                    check(m, n, k, a, b, &c0, &c, n, acc, &format!("strided sgemm simd={simd}"));
                    let mut c2 = c0.clone();
                    gemm_packed_with(m, &mut c2, n, a, &pb, Init::new(acc), simd);
                    check(m, n, k, a, b, &c0, &c2, n, acc, &format!("strided packed simd={simd}"));
                }
            }
        }
    }

    #[test]
    fn tiny_and_odd_shapes() {
        let mut rng = Rng(0x9e3779b97f4a7c15);
        for &(m, n, k) in
            &[(1, 1, 1), (7, 13, 5), (2, 3, 1), (6, 16, 4), (5, 17, 3), (13, 31, 9), (8, 8, 8), (1, 40, 7)]
        {
            exercise(&mut rng, m, n, k);
        }
    }

    #[test]
    fn random_shapes() {
        let mut rng = Rng(12345);
        for _ in 0..40 {
            let (m, n, k) = (1 + rng.below(40), 1 + rng.below(70), 1 + rng.below(300));
            exercise(&mut rng, m, n, k);
        }
    }

    #[test]
    fn the_kernels_name_says_which_path_the_products_take() {
        let want = if simd_available() { "cllm (avx2+fma)" } else { "cllm (portable)" };
        assert_eq!(name(), want);
    }

    #[test]
    fn row_tiles_cover_every_row_once() {
        for mc in 1..40 {
            let tiles: Vec<_> = row_tiles(10, mc).collect();
            let mut next = 10;
            for &(i0, mr) in &tiles {
                assert_eq!(i0, next);
                assert!((1..=MR).contains(&mr));
                next += mr;
            }
            assert_eq!(next, 10 + mc);
            assert_eq!(tiles.len(), mc.div_ceil(MR));
        }
    }

    /// The seed model's products, each in the layout the model uses, SIMD and portable paths,
    /// accumulate off and on.
    #[test]
    fn model_shapes() {
        let mut rng = Rng(777);
        // (m, n, k, A transposed, B transposed)
        let shapes = [
            (128, 1024, 256, false, false),
            (128, 256, 1024, false, false),
            (128, 256, 256, false, true),
            (256, 768, 128, true, false),
            (1024, 256, 128, true, false),
            (128, 128, 32, false, true),
            (128, 32, 128, false, false),
        ];
        let paths: &[bool] = if simd_available() { &[true, false] } else { &[false] };
        for &(m, n, k, at, bt) in &shapes {
            let (ad, ars, acs) = make(&mut rng, m, k, at, 0);
            let (bd, brs, bcs) = make(&mut rng, k, n, bt, 0);
            let (a, b) = (Mat::strided(&ad, ars, acs), Mat::strided(&bd, brs, bcs));
            let c0 = rng.vec(m * n);
            let pb = PackedB::pack(k, n, b);
            for &simd in paths {
                // The portable path is slow in debug builds: one accumulating product per shape.
                let accs: &[bool] = if simd { &[false, true] } else { &[true] };
                for &acc in accs {
                    let mut c = c0.clone();
                    gemm_packed_with(m, &mut c, n, a, &pb, Init::new(acc), simd);
                    check(m, n, k, a, b, &c0, &c, n, acc, &format!("packed simd={simd}"));
                    if !simd {
                        continue;
                    }
                    let mut c2 = c0.clone();
                    sgemm_with(m, n, k, &mut c2, n, a, b, Init::new(acc), None, simd);
                    check(m, n, k, a, b, &c0, &c2, n, acc, &format!("sgemm simd={simd}"));
                }
            }
        }
    }

    /// Same inputs, same bits: repeated calls, and the prepacked and pack-per-call entry points
    /// (same blocking, same summation order) agree exactly.
    #[test]
    fn deterministic_and_entry_points_agree() {
        let mut rng = Rng(4242);
        // m = 128 reads A in place; m = 300 spans three M blocks, so A is packed first.
        for (m, n, k) in [(128, 272, 600), (300, 100, 70)] {
            let a = rng.vec(m * k);
            let b = rng.vec(k * n);
            let pb = PackedB::pack(k, n, Mat::rows(&b, n));
            let mut first = vec![0.0f32; m * n];
            gemm_packed(m, &mut first, n, Mat::rows(&a, k), &pb, false);
            for _ in 0..3 {
                let mut c = vec![1.0f32; m * n];
                gemm_packed(m, &mut c, n, Mat::rows(&a, k), &pb, false);
                assert!(c.iter().zip(&first).all(|(x, y)| x.to_bits() == y.to_bits()));
                let mut c2 = vec![2.0f32; m * n];
                sgemm(m, n, k, &mut c2, n, Mat::rows(&a, k), Mat::rows(&b, n), false);
                assert!(c2.iter().zip(&first).all(|(x, y)| x.to_bits() == y.to_bits()));
            }
        }
    }

    #[test]
    fn column_sums_while_packing_match_a_row_by_row_loop_and_leave_the_product_alone() {
        let mut rng = Rng(77);
        // Row-major B with full and ragged panels, a transposed B, a strided B; and m = 0.
        for (m, n, k) in [(20, 37, 13), (7, 16, 5), (9, 5, 11), (0, 21, 4), (6, 40, 0)] {
            for layout in 0..3 {
                let (bd, rs, cs) = match layout {
                    0 => (rng.vec(k * n), n, 1),
                    1 => (rng.vec(k * n), 1, k.max(1)),
                    _ => (rng.vec(2 * k * n + 1), 2 * n, 2),
                };
                let b = Mat::strided(&bd, rs, cs);
                let a = rng.vec(m * k);
                let start = rng.vec(n);
                let mut want_sums = start.clone();
                for p in 0..k {
                    for (j, acc) in want_sums.iter_mut().enumerate() {
                        *acc += bd[p * rs + j * cs];
                    }
                }
                let mut want = vec![0.0f32; m * n];
                sgemm(m, n, k, &mut want, n, Mat::rows(&a, k), b, false);
                let (mut got, mut sums) = (vec![3.0f32; m * n], start.clone());
                sgemm_colsum(m, n, k, &mut got, n, Mat::rows(&a, k), b, &mut sums);
                assert!(bits_eq(&sums, &want_sums), "sums m={m} n={n} k={k} layout {layout}");
                assert!(bits_eq(&got, &want), "product m={m} n={n} k={k} layout {layout}");
            }
        }
    }

    #[test]
    fn blocks_of_a_packed_b_match_products_with_the_same_block() {
        let mut rng = Rng(2024);
        let (k, n) = (70, 45);
        let bd = rng.vec(k * n);
        let b = Mat::rows(&bd, n);
        let mut pb = PackedB::zeros(1, 1);
        pb.repack_as(k, n, b);
        for (rows, cols, m) in [(0..70, 45, 7), (10..70, 32, 13), (0..33, 16, 6), (69..70, 1, 1), (5..5, 9, 3)] {
            let a = rng.vec(m * rows.len().max(1));
            let am = Mat::rows(&a, rows.len().max(1));
            let sub = Mat::strided(&bd[rows.start * n..], n, 1);
            let c0 = rng.vec(m * cols);
            for acc in [false, true] {
                let mut want = c0.clone();
                sgemm(m, cols, rows.len(), &mut want, cols, am, sub, acc);
                let mut got = c0.clone();
                gemm_packed_block(m, &mut got, cols, am, &pb, rows.clone(), cols, acc);
                assert!(bits_eq(&got, &want), "rows {rows:?} cols {cols} acc {acc}");
            }
        }
    }

    #[test]
    fn repack_reuses_and_updates() {
        let mut rng = Rng(99);
        let (m, n, k) = (9, 40, 33);
        let a = rng.vec(m * k);
        let w1 = rng.vec(n * k);
        let w2 = rng.vec(n * k);
        // A transposed weight view (rs = 1), as in dX = dY·W^T.
        let mut pb = PackedB::pack(k, n, Mat::transposed(&w1, k));
        assert_eq!((pb.k(), pb.n()), (k, n));
        let ptr = pb.buf.buf.as_ptr();
        pb.repack(Mat::transposed(&w2, k));
        assert_eq!(ptr, pb.buf.buf.as_ptr(), "repack reallocated");
        let mut c = vec![0.0f32; m * n];
        gemm_packed(m, &mut c, n, Mat::rows(&a, k), &pb, false);
        check(m, n, k, Mat::rows(&a, k), Mat::transposed(&w2, k), &c.clone(), &c, n, false, "repack");
    }

    #[test]
    fn zero_k_clears_or_keeps_c() {
        let mut c = vec![3.0f32; 6];
        sgemm(2, 3, 0, &mut c, 3, Mat::rows(&[], 0), Mat::rows(&[], 3), true);
        assert_eq!(c, vec![3.0; 6]);
        sgemm(2, 3, 0, &mut c, 3, Mat::rows(&[], 0), Mat::rows(&[], 3), false);
        assert_eq!(c, vec![0.0; 6]);
    }

    #[test]
    #[should_panic(expected = "overruns")]
    fn out_of_bounds_a_is_rejected() {
        let (a, b) = (vec![0.0f32; 7], vec![0.0f32; 8]);
        let mut c = vec![0.0f32; 4];
        sgemm(2, 2, 4, &mut c, 2, Mat::rows(&a, 4), Mat::rows(&b, 2), false);
    }

    #[test]
    #[should_panic(expected = "overruns")]
    fn out_of_bounds_c_is_rejected() {
        let (a, b) = (vec![0.0f32; 8], vec![0.0f32; 8]);
        let pb = PackedB::pack(4, 2, Mat::rows(&b, 2));
        let mut c = vec![0.0f32; 4];
        gemm_packed(2, &mut c, 3, Mat::rows(&a, 4), &pb, false);
    }

    #[test]
    #[should_panic(expected = "overruns")]
    fn out_of_bounds_packed_b_is_rejected() {
        let b = vec![0.0f32; 10];
        let _ = PackedB::pack(4, 3, Mat::transposed(&b, 4));
    }
}
