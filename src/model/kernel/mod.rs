//! A single-threaded f32 GEMM tuned for the model's shapes (M = 128 rows per sequence, K and N
//! in 32..=1024), with the option to pack a constant B operand (a weight) once and reuse the
//! packed panels across many products.
//!
//! Operands are [`Mat`] views (any row and column strides, so a transpose is a view), checked
//! against their buffers once per product ([`check_bounds`]) before any unchecked access.
//!
//! Design (BLIS-style), one microkernel per SIMD path ([`crate::simd::path::current`]):
//! - AVX2 ([`avx2`]): a 6x16 tile of C held in twelve 256-bit accumulators; every k step loads
//!   16 packed B values (two vectors) and broadcasts 6 A values, 12 FMAs.
//! - AVX-512 ([`avx512`]): a 6x64 tile, four adjacent B panels at once, in twenty-four 512-bit
//!   accumulators (of 32 registers; four more hold the B vectors, one the broadcast A value);
//!   every k step loads 64 packed B values and broadcasts 6 A values, 24 FMAs.
//! - Portable ([`portable`]): the 6x16 tile in plain Rust with `f32::mul_add`.
//!
//!   Edge rows use the same kernel instantiated for 1..=5 rows; edge columns run on
//!   zero-padded B panels and store only the valid columns.
//! - B is packed into panels of [`NR`] = 16 columns, the same on every path: panel `j` holds
//!   `B[p, 16j..16j+16]` for `p` in `0..k`, contiguous, zero-padded past `n`. Any K block of a
//!   panel is contiguous, so one packing serves every K blocking. [`PackedB`] keeps such a
//!   packing for reuse.
//! - A is read in place when it is row-major (`cs == 1`) or column-major (`rs == 1`) and small
//!   enough that its rows stay in L2, so such a product with a prepacked B copies nothing at
//!   all; otherwise (larger, or no unit stride) A is packed into 6-row panels first (on the
//!   AVX-512 path a row-major A by a register transpose), except a row-major A too large for
//!   the caches, which packing would only copy through memory once more.
//! - Loops: column chunks of [`NC`] panels where A is small (a chunk's B block and C columns
//!   stay in L2), then K blocks of at most [`KC`] (the B micro-panel stays near L1), then M
//!   blocks of at most [`MC`] rows (the A block stays in L2), then the chunk's column panels;
//!   one kernel call runs all the row tiles of a column panel (four panels on the AVX-512 path).
//!
//! Determinism, the same bits on every path: every element of C is the sum over K blocks, in
//! order, of a per-block dot product that starts from zero and takes the block's k products in
//! order, each with one fused multiply-add; the block's sum is then added to C (or to the
//! bias, or stored) with one addition. The blocking is a function of (m, n, k) only, never of
//! the path or the tile, and there are no threads. Which register tile computes an element, and
//! how wide the registers are, changes nothing in that sequence of IEEE operations, so every
//! path gives the same bits (tests/gemm_products.rs and the unit tests check it).

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod pack;
mod portable;
#[cfg(test)]
mod tests;

use crate::simd::path::{self, Path};
use pack::{pack_a_into, pack_b_into, AlignedBuf};
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
/// B panels one AVX-512 kernel call reads side by side (its tile is `MR x 4*NR` = 6 x 64).
const AVX512_PANELS: usize = 4;
/// Largest M block: an MC x KC block of A (144 KiB) stays in L2.
pub const MC: usize = 144;
/// Panels of B in a column chunk (256 columns): a chunk's K block of B (256 KiB at `KC`) stays
/// in L2 while every M block passes over it, and the chunk's columns of C (256 KiB for 256
/// rows) stay there from one K block to the next.
const NC: usize = 16;
/// The largest A (`m * k` values, 4 MiB) that is cut into column chunks: A is read once per
/// chunk, which costs more than it saves when A does not stay in L2/L3 (GPT-2's head backward,
/// 50257 x 256 and 256 x 50257).
const A_CHUNKED_MAX: usize = 1 << 20;

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

/// The kernel and the SIMD path its products take in this process, as benchmark reports
/// (machine.gemm_backend) name it: `"cllm (avx512)"`, `"cllm (avx2)"` or `"cllm (portable)"`.
pub fn name() -> &'static str {
    name_of(path::current())
}

fn name_of(p: Path) -> &'static str {
    match p {
        Path::Avx512 => "cllm (avx512)",
        Path::Avx2 => "cllm (avx2)",
        Path::Portable => "cllm (portable)",
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
        pack_b_into(dst, k, n, b, None, path::current());
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

/// The blocked loop nest: column chunks ([`column_chunk`]), then K blocks, then M blocks, then
/// the chunk's B micro-panels, each micro-panel against every row tile of the M block
/// ([`panel`]). `b` holds `n.div_ceil(NR)` packed panels. Every element of C still takes its K
/// blocks in order, so the chunking changes no bits.
///
/// The caller has bounds-checked C (`m x n`, row stride `c_rs`) and A (`m x k`); `k > 0`,
/// `m > 0`, `n > 0`.
#[allow(clippy::too_many_arguments)]
fn blocked(m: usize, n: usize, k: usize, c: &mut [f32], c_rs: usize, a: AIn, b: BSrc, init: Init, path: Path) {
    let (nkb, kc_full, mc_full) = blocking(m, k);
    let npanels = n.div_ceil(NR);
    // The AVX-512 kernel takes four adjacent panels per call, the others one.
    let group = if path == Path::Avx512 { AVX512_PANELS } else { 1 };
    let chunk = column_chunk(m, k, npanels);
    for jc in (0..npanels).step_by(chunk) {
        let jc_end = npanels.min(jc + chunk);
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
                for jp in (jc..jc_end).step_by(group) {
                    let np = group.min(npanels - jp);
                    let j0 = jp * NR;
                    let cols = (np * NR).min(n - j0);
                    let b_off = jp * b.ps + p0 * b.ks;
                    let b_tile = &b.data[b_off..b_off + (np - 1) * b.ps + (kc - 1) * b.ks + NR];
                    let bt = BTile { data: b_tile, ks: b.ks, ps: b.ps, panels: np };
                    let c_blk = &mut c[i_blk * c_rs + j0..];
                    panel(mc, cols, kc, a_src, bt, c_blk, c_rs, init_kb.cols(j0, cols), path);
                }
            }
        }
    }
}

/// The panels of B a column chunk of [`blocked`] spans: [`NC`] when A is small enough
/// ([`A_CHUNKED_MAX`]) to be read again for every chunk, else all of them (one chunk).
fn column_chunk(m: usize, k: usize, npanels: usize) -> usize {
    if m.saturating_mul(k) <= A_CHUNKED_MAX {
        NC.min(npanels)
    } else {
        npanels
    }
}

/// The B operand of a [`panel`] call: `panels` adjacent packed panels, panel `q`'s 16 values
/// at K index `p` at `data[q*ps + p*ks ..][..16]`.
#[derive(Clone, Copy)]
struct BTile<'a> {
    data: &'a [f32],
    ks: usize,
    ps: usize,
    panels: usize,
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

/// Every row tile of an `mc`-row M block against the B micro-panels of `b` (`kc x 16` each,
/// `cols` valid columns in all): `c (+)= a · b`. One call per micro-panel group instead of
/// one per 6-row tile, so the bounds checks and the dispatch happen once per group; `c`
/// starts at the block's C(0, 0). `path` is one [`Path::available`] says this CPU has.
#[allow(clippy::too_many_arguments)]
fn panel(mc: usize, cols: usize, kc: usize, a: ASrc, b: BTile, c: &mut [f32], c_rs: usize, init: Init, path: Path) {
    let max_panels = if path == Path::Avx512 { AVX512_PANELS } else { 1 };
    assert!(mc >= 1 && kc >= 1 && (1..=max_panels).contains(&b.panels));
    assert!(cols > (b.panels - 1) * NR && cols <= b.panels * NR, "kernel: {cols} columns for {} panels", b.panels);
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
    let b_last = (b.panels - 1) * b.ps + (kc - 1) * b.ks + NR;
    assert!(b.ks >= NR && b.data.len() >= b_last, "kernel: B tile out of bounds");
    assert!((mc - 1) * c_rs + cols <= c.len(), "kernel: C block out of bounds");
    if let Init::Bias(bias) = init {
        assert!(bias.len() == cols, "kernel: bias tile has the wrong length");
    }
    #[cfg(target_arch = "x86_64")]
    if path != Path::Portable {
        let add = matches!(init, Init::C);
        let bias = if let Init::Bias(b) = init { b.as_ptr() } else { std::ptr::null() };
        let (ap, bp, cp) = (a.data.as_ptr(), b.data.as_ptr(), c.as_mut_ptr());
        let ts = a.tile_stride.unwrap_or(0);
        let (rs, cs, ks) = (a.rs, a.cs, b.ks);
        // SAFETY: every product entry point asserts `path.available()` (`check_path`), so the
        // CPU has the kernel's features: AVX2 and FMA, and AVX-512F on the AVX-512 path. The
        // asserts above bound every A element a tile reads (tiles cover rows 0..mc, each at
        // most MR rows, kc columns), the 16 B values of every k step of every panel, every C
        // element (i < mc, j < cols) and the bias.
        unsafe {
            match (path, a.cs == 1) {
                (Path::Avx512, true) => {
                    avx512::panel::<true>(mc, kc, ap, rs, cs, ts, bp, ks, b.ps, b.panels, cp, c_rs, cols, add, bias)
                }
                (Path::Avx512, false) => {
                    avx512::panel::<false>(mc, kc, ap, rs, cs, ts, bp, ks, b.ps, b.panels, cp, c_rs, cols, add, bias)
                }
                (_, true) => avx2::panel::<true>(mc, kc, ap, rs, cs, ts, bp, ks, cp, c_rs, cols, add, bias),
                (_, false) => avx2::panel::<false>(mc, kc, ap, rs, cs, ts, bp, ks, cp, c_rs, cols, add, bias),
            }
        }
        return;
    }
    for (q, (i0, mr)) in row_tiles(0, mc).enumerate() {
        let a_off = match a.tile_stride {
            Some(ts) => q * ts,
            None => i0 * a.rs,
        };
        let c_tile = &mut c[i0 * c_rs..i0 * c_rs + (mr - 1) * c_rs + cols];
        portable::tile(mr, cols, kc, &a.data[a_off..], a.rs, a.cs, b.data, b.ks, c_tile, c_rs, init);
    }
}

/// Stops a product asked to run on a path this CPU lacks (only a test can ask for one: the
/// public entry points pass [`path::current`]), before any unsafe kernel runs.
#[inline]
fn check_path(path: Path) {
    assert!(path.available(), "kernel: the {path} path needs CPU features this machine lacks");
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
    gemm_packed_with(m, c, c_rs, a, b, Init::new(accumulate), path::current());
}

/// `C[i, j] = bias[j] + (A·B)[i, j]` with B prepacked: a linear layer's forward in one pass.
/// The same bits as copying the bias into C and calling [`gemm_packed`] with `accumulate`.
pub fn gemm_packed_bias(m: usize, c: &mut [f32], c_rs: usize, a: Mat, b: &PackedB, bias: &[f32]) {
    gemm_packed_with(m, c, c_rs, a, b, Init::Bias(bias), path::current());
}

fn gemm_packed_with(m: usize, c: &mut [f32], c_rs: usize, a: Mat, b: &PackedB, init: Init, path: Path) {
    packed_block_with(m, c, c_rs, a, b, 0..b.k, b.n, init, path)
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
    path: Path,
) {
    check_path(path);
    assert!(rows.start <= rows.end && rows.end <= b.k, "kernel: rows {rows:?} of a packed B with {} rows", b.k);
    assert!(cols <= b.n, "kernel: {cols} columns of a packed B with {}", b.n);
    let (k, n) = (rows.len(), cols);
    if prologue(m, n, k, c, c_rs, &a, init) {
        // Panel jp's rows start at jp * (b.k * NR); a row range is an offset within each.
        let bsrc = BSrc { data: &b.buf.as_slice()[rows.start * NR..], ks: NR, ps: b.k * NR };
        SCRATCH.with(|s| run_a(m, n, k, c, c_rs, a, bsrc, &mut s.borrow_mut().1, init, path));
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
    packed_block_with(m, c, c_rs, a, b, rows, cols, Init::new(accumulate), path::current())
}

/// `C[m, n] = A[m, k] · B[k, n]` (or `C += A·B` when `accumulate`), C row-major with row
/// stride `c_rs`. Packs B (and A when worthwhile) into a per-thread scratch buffer that is
/// reused, so after the first calls of a given size this allocates nothing.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(m: usize, n: usize, k: usize, c: &mut [f32], c_rs: usize, a: Mat, b: Mat, accumulate: bool) {
    sgemm_with(m, n, k, c, c_rs, a, b, Init::new(accumulate), None, path::current());
}

/// `C[i, j] = bias[j] + (A·B)[i, j]` (see [`gemm_packed_bias`]), packing B per call.
#[allow(clippy::too_many_arguments)]
pub fn sgemm_bias(m: usize, n: usize, k: usize, c: &mut [f32], c_rs: usize, a: Mat, b: Mat, bias: &[f32]) {
    sgemm_with(m, n, k, c, c_rs, a, b, Init::Bias(bias), None, path::current());
}

/// [`sgemm`] (overwriting C) that also adds B's column sums to `colsum` (`colsum[j] +=
/// Σ_p B[p, j]`, p in order) while it packs B: a linear layer's weight and bias gradients from
/// one read of `dY`. The sums are the same bits as a separate row-by-row loop.
#[allow(clippy::too_many_arguments)]
pub fn sgemm_colsum(m: usize, n: usize, k: usize, c: &mut [f32], c_rs: usize, a: Mat, b: Mat, colsum: &mut [f32]) {
    sgemm_with(m, n, k, c, c_rs, a, b, Init::Zero, Some(colsum), path::current());
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
    path: Path,
) {
    check_path(path);
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
        pack_b_into(bp, k, n, b, colsum, path);
        // B is always packed: read in place, its rows' power-of-two strides would map a
        // micro-panel onto a few L1 sets.
        let bsrc = BSrc { data: bbuf.as_slice(), ks: NR, ps: k * NR };
        run_a(m, n, k, c, c_rs, a, bsrc, abuf, init, path);
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
    path: Path,
) {
    // A is read in place when it fits one M block (row-major) or two (column-major: the
    // transposed activations of dW = X^T·dY); beyond that its strided rows thrash L2, so it
    // is packed into 6-row panels. A row-major A too large to stay in cache (GPT-2's
    // `dlogits`, 256 x 50257) is read in place all the same: packing it would copy it through
    // memory once more than the product reads it. A view without a unit stride is always
    // packed.
    let pack_a = if a.cs == 1 {
        m > MC && m * k <= A_CHUNKED_MAX
    } else if a.rs == 1 {
        m > 2 * MC
    } else {
        true
    };
    if pack_a {
        let panels = m.div_ceil(MR);
        let ap = abuf.resize(panels * k * MR);
        pack_a_into(ap, m, k, a, blocking(m, k).2, path);
        blocked(m, n, k, c, c_rs, AIn::Packed(ap), bsrc, init, path);
    } else {
        blocked(m, n, k, c, c_rs, AIn::InPlace(a), bsrc, init, path);
    }
}
