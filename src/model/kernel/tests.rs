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
fn check(m: usize, n: usize, k: usize, a: Mat, b: Mat, c0: &[f32], got: &[f32], c_rs: usize, acc: bool, what: &str) {
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

/// Every path this CPU has, widest first (the first is the reference the others must match
/// bit for bit).
fn paths() -> Vec<Path> {
    Path::available_paths()
}

/// The results of one product on every path: checked against the f64 reference, and equal to
/// the first path's bits.
struct SamePaths<'a> {
    what: &'a str,
    first: Option<(Path, Vec<f32>)>,
}

impl<'a> SamePaths<'a> {
    fn new(what: &'a str) -> Self {
        SamePaths { what, first: None }
    }
    fn push(&mut self, path: Path, got: Vec<f32>) {
        match &self.first {
            None => self.first = Some((path, got)),
            Some((p0, want)) => assert!(bits_eq(&got, want), "{}: the {path} path differs from {p0}", self.what),
        }
    }
}

/// Runs every entry point on one shape, all transpose combinations, both accumulate modes and
/// the bias, padded C, on every path the CPU has: each against the f64 reference, and every
/// path bit-equal to the widest.
fn exercise(rng: &mut Rng, m: usize, n: usize, k: usize) {
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
            let what = format!("m={m} n={n} k={k} at={at} bt={bt}");
            let mut same = [SamePaths::new(&what), SamePaths::new(&what), SamePaths::new(&what)];
            for path in paths() {
                // The bias epilogue gives exactly what copying the bias into C and
                // accumulating gives.
                let mut want = c0.clone();
                for i in 0..m {
                    want[i * c_rs..i * c_rs + n].copy_from_slice(&bias);
                }
                sgemm_with(m, n, k, &mut want, c_rs, a, b, Init::C, None, path);
                let mut got = c0.clone();
                sgemm_with(m, n, k, &mut got, c_rs, a, b, Init::Bias(&bias), None, path);
                assert!(bits_eq(&got, &want), "sgemm bias {path} {what}");
                let mut got = c0.clone();
                gemm_packed_with(m, &mut got, c_rs, a, &pb, Init::Bias(&bias), path);
                assert!(bits_eq(&got, &want), "packed bias {path} {what}");
                same[0].push(path, got);
                for (&acc, same) in [false, true].iter().zip(&mut same[1..]) {
                    let mut c = c0.clone();
                    sgemm_with(m, n, k, &mut c, c_rs, a, b, Init::new(acc), None, path);
                    check(m, n, k, a, b, &c0, &c, c_rs, acc, &format!("sgemm {path} at={at} bt={bt}"));
                    let mut c2 = c0.clone();
                    gemm_packed_with(m, &mut c2, c_rs, a, &pb, Init::new(acc), path);
                    check(m, n, k, a, b, &c0, &c2, c_rs, acc, &format!("packed {path} at={at} bt={bt}"));
                    assert!(bits_eq(&c, &c2), "sgemm and packed differ: {path} {what}");
                    same.push(path, c);
                }
            }
        }
    }
}

/// Views with no unit stride (every other element, both ways) take the packed-A path.
#[test]
fn views_without_a_unit_stride() {
    let mut rng = Rng(31337);
    for (m, n, k) in [(1, 1, 1), (7, 5, 9), (13, 40, 33), (200, 20, 17), (9, 70, 300)] {
        let ad = rng.vec(2 * m * k * 2);
        let bd = rng.vec(2 * k * n * 2);
        let a = Mat::strided(&ad, 2 * k, 2);
        let b = Mat::strided(&bd, 2, 2 * k);
        let c0 = rng.vec(m * n);
        let pb = PackedB::pack(k, n, b);
        for acc in [false, true] {
            let what = format!("strided m={m} n={n} k={k} acc={acc}");
            let mut same = SamePaths::new(&what);
            for path in paths() {
                let mut c = c0.clone();
                sgemm_with(m, n, k, &mut c, n, a, b, Init::new(acc), None, path);
                check(m, n, k, a, b, &c0, &c, n, acc, &format!("strided sgemm {path}"));
                let mut c2 = c0.clone();
                gemm_packed_with(m, &mut c2, n, a, &pb, Init::new(acc), path);
                check(m, n, k, a, b, &c0, &c2, n, acc, &format!("strided packed {path}"));
                assert!(bits_eq(&c, &c2), "{what}: sgemm and packed differ on {path}");
                same.push(path, c);
            }
        }
    }
}

#[test]
fn tiny_and_odd_shapes() {
    let mut rng = Rng(0x9e3779b97f4a7c15);
    for &(m, n, k) in &[(1, 1, 1), (7, 13, 5), (2, 3, 1), (6, 16, 4), (5, 17, 3), (13, 31, 9), (8, 8, 8), (1, 40, 7)] {
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
    assert_eq!(name(), name_of(path::current()));
    let names: Vec<_> = Path::ALL.into_iter().map(name_of).collect();
    assert_eq!(names, ["cllm (avx512)", "cllm (avx2)", "cllm (portable)"]);
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

/// The seed model's products, each in the layout the model uses, on every path (bit-equal),
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
    for &(m, n, k, at, bt) in &shapes {
        let (ad, ars, acs) = make(&mut rng, m, k, at, 0);
        let (bd, brs, bcs) = make(&mut rng, k, n, bt, 0);
        let (a, b) = (Mat::strided(&ad, ars, acs), Mat::strided(&bd, brs, bcs));
        let c0 = rng.vec(m * n);
        let pb = PackedB::pack(k, n, b);
        for acc in [false, true] {
            let what = format!("m={m} n={n} k={k} at={at} bt={bt} acc={acc}");
            let mut same = SamePaths::new(&what);
            for path in paths() {
                let mut c = c0.clone();
                gemm_packed_with(m, &mut c, n, a, &pb, Init::new(acc), path);
                check(m, n, k, a, b, &c0, &c, n, acc, &format!("packed {path}"));
                let mut c2 = c0.clone();
                sgemm_with(m, n, k, &mut c2, n, a, b, Init::new(acc), None, path);
                assert!(bits_eq(&c, &c2), "{what}: sgemm and packed differ on {path}");
                same.push(path, c);
            }
        }
    }
}

/// The module doc's summation order, one element at a time: per K block of [`blocking`], a sum
/// from zero of the block's products in order with one fused multiply-add each, then one
/// addition to C (or a store, for the first block when not accumulating).
fn defined_order(m: usize, n: usize, k: usize, a: Mat, b: Mat, c: &mut [f32], acc: bool) {
    let (nkb, kc_full, _) = blocking(m, k);
    for i in 0..m {
        for j in 0..n {
            for kb in 0..nkb {
                let mut s = 0.0f32;
                for p in kb * kc_full..k.min((kb + 1) * kc_full) {
                    s = a.data[i * a.rs + p * a.cs].mul_add(b.data[p * b.rs + j * b.cs], s);
                }
                c[i * n + j] = if kb == 0 && !acc { s } else { c[i * n + j] + s };
            }
        }
    }
}

/// Column chunks (B wider than [`NC`] panels, A small) and the unchunked loop (A too large to
/// read once per chunk) both give the bits of the defined order: the loop nest's order over
/// chunks, K blocks and M blocks changes which element is computed when, never how.
#[test]
fn column_chunks_keep_the_defined_summation_order() {
    let mut rng = Rng(2718);
    // (m, n, k): chunked with several M and K blocks and a ragged last chunk; chunked with one
    // K block; A over A_CHUNKED_MAX, one chunk.
    for (m, n, k, at) in [(150usize, 300usize, 600, false), (300, 530, 256, true), (1100, 270, 1000, false)] {
        assert_eq!(column_chunk(m, k, n.div_ceil(NR)) < n.div_ceil(NR), m * k <= A_CHUNKED_MAX);
        let (ad, ars, acs) = make(&mut rng, m, k, at, 0);
        let b = rng.vec(k * n);
        let (a, bv) = (Mat::strided(&ad, ars, acs), Mat::rows(&b, n));
        let pb = PackedB::pack(k, n, bv);
        let c0 = rng.vec(m * n);
        for acc in [false, true] {
            let mut want = c0.clone();
            defined_order(m, n, k, a, bv, &mut want, acc);
            for path in paths() {
                let mut got = c0.clone();
                gemm_packed_with(m, &mut got, n, a, &pb, Init::new(acc), path);
                assert!(bits_eq(&got, &want), "m={m} n={n} k={k} acc={acc}: {path} differs from the defined order");
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

/// Every path packs A into the same panels (the AVX-512 path transposes full tiles of a
/// row-major A in registers): checked value for value on row-major (padded or not) and
/// column-major views, with ragged tiles and K tails.
#[test]
fn a_packing_is_the_same_on_every_path() {
    let mut rng = Rng(99);
    for (m, k) in [(6, 16), (7, 17), (150, 300), (13, 5), (300, 64), (40, 33)] {
        for (t, pad) in [(false, 0), (false, 3), (true, 1)] {
            let (ad, ars, acs) = make(&mut rng, m, k, t, pad);
            let a = Mat::strided(&ad, ars, acs);
            let mc = blocking(m, k).2;
            let len = m.div_ceil(MR) * k * MR;
            let panels = |path: Path| {
                let mut dst = AlignedBuf::default();
                dst.resize(len).fill(f32::NAN);
                pack_a_into(dst.resize(len), m, k, a, mc, path);
                dst.as_slice().to_vec()
            };
            let want = panels(Path::Portable);
            // Slots past a ragged tile's height are never read; compare the rest.
            let tiles: Vec<_> = (0..m).step_by(mc).flat_map(|i| row_tiles(i, mc.min(m - i))).collect();
            for path in paths() {
                let got = panels(path);
                for (q, &(_, mr)) in tiles.iter().enumerate() {
                    for p in 0..k {
                        let at = q * k * MR + p * MR;
                        assert_eq!(
                            got[at..at + mr],
                            want[at..at + mr],
                            "m={m} k={k} t={t} {path}: tile {q} column {p}"
                        );
                    }
                }
            }
        }
    }
}
