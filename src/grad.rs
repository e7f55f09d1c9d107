//! Gradient checks and arithmetic: the NaN/Inf scan fused with the squared norm, clipping, and
//! the accumulation kernels the reduction uses.
//!
//! Every sum here has a fixed association order that depends only on the slice length, never on
//! the thread count, so the trainer's `segmented` strategy stays bit-deterministic (the order
//! in which micro-batch gradients are added is the summation tree's, [`crate::train::tree`]).

use crate::simd::multiversion;

/// How many bad entries a scan keeps for the report.
pub const MAX_BAD: usize = 5;

/// Lanes of the partial sums of [`sqnorm`] (the norm of the summed gradient, which global
/// clipping scales by): wide enough for the compiler to vectorise the loop.
const LANES: usize = 8;

/// Lanes of a micro-batch's scan ([`SqnormAcc`]): 32 independent f64 chains, so the scan runs
/// at the speed the gradient streams in (8 lanes are one addition's latency per 8 elements,
/// which a fold that takes the scan on the way would wait for).
pub const SCAN_LANES: usize = 32;

/// The result of scanning one gradient.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scan {
    /// Sum of squares in f64 in [`SCAN_LANES`] lanes (NaN or infinite exactly when some entry
    /// is not finite).
    pub sqnorm: f64,
    /// Number of NaN/Inf entries.
    pub bad: usize,
    /// The first `min(bad, MAX_BAD)` bad entries as (index, value).
    pub first_bad: [(usize, f32); MAX_BAD],
}

impl Default for Scan {
    fn default() -> Self {
        Scan { sqnorm: 0.0, bad: 0, first_bad: [(0, 0.0); MAX_BAD] }
    }
}

impl Scan {
    /// True if every entry is finite.
    pub fn is_valid(&self) -> bool {
        self.bad == 0
    }
    /// The Euclidean norm (meaningful only when valid).
    pub fn norm(&self) -> f64 {
        self.sqnorm.sqrt()
    }
    /// The recorded bad entries.
    pub fn bad_entries(&self) -> &[(usize, f32)] {
        &self.first_bad[..self.bad.min(MAX_BAD)]
    }
}

/// Sum of squares in f64 with a fixed lane structure (vectorisable, order fixed by the length).
pub fn sqnorm(x: &[f32]) -> f64 {
    let mut acc = [0.0f64; LANES];
    let mut s = 0.0f64;
    feed_lanes(&mut acc, &mut s, x);
    for a in acc {
        s += a;
    }
    s
}

/// A micro-batch gradient's sum of squares, fed in consecutive parts: lane `l` of
/// [`SCAN_LANES`] adds the squares of the elements at `l` modulo 32, the elements past the
/// last full group go into a tail, and the sum is the tail plus the lanes in order. Fed in
/// parts whose lengths (all but the last) are multiples of 32, it is the same sum bit for bit
/// as fed whole, so a fold that reads a gradient tile by tile takes its scan on the way.
#[derive(Clone, Copy, Debug)]
pub struct SqnormAcc {
    lanes: [f64; SCAN_LANES],
    tail: f64,
}

impl Default for SqnormAcc {
    fn default() -> Self {
        SqnormAcc { lanes: [0.0; SCAN_LANES], tail: 0.0 }
    }
}

impl SqnormAcc {
    /// Adds the squares of the next part.
    pub fn feed(&mut self, x: &[f32]) {
        feed_scan_lanes(&mut self.lanes, &mut self.tail, x);
    }

    /// `dst += src` (`plus`, the tree's addition) or `dst = src`, feeding `src` in the same
    /// pass (one read of it, where a separate [`SqnormAcc::feed`] would read it twice).
    pub fn put(&mut self, dst: &mut [f32], src: &[f32], plus: bool) {
        put_and_feed(dst, src, plus, &mut self.lanes, &mut self.tail);
    }

    /// The sum: the tail's squares, then the lanes in order.
    pub fn finish(&self) -> f64 {
        let mut s = self.tail;
        for a in self.lanes {
            s += a;
        }
        s
    }
}

/// Lane `l` of `acc` adds the square of every element at `l` modulo `L`; the remainder past the
/// last full group of `L` goes into `tail`, in order (each lane its own chain: the vector width
/// changes nothing).
#[inline(always)]
fn feed_squares<const L: usize>(acc: &mut [f64; L], tail: &mut f64, x: &[f32]) {
    let chunks = x.chunks_exact(L);
    for v in chunks.remainder() {
        let v = *v as f64;
        *tail += v * v;
    }
    for c in chunks {
        for l in 0..L {
            let v = c[l] as f64;
            acc[l] += v * v;
        }
    }
}

multiversion! {
    /// [`feed_squares`] over [`LANES`] lanes (the summed gradient's norm).
    fn feed_lanes(acc: &mut [f64; LANES], tail: &mut f64, x: &[f32]) {
        feed_squares(acc, tail, x)
    }
}

multiversion! {
    /// [`feed_squares`] over [`SCAN_LANES`] lanes (a micro-batch's scan).
    fn feed_scan_lanes(acc: &mut [f64; SCAN_LANES], tail: &mut f64, x: &[f32]) {
        feed_squares(acc, tail, x)
    }
}

multiversion! {
    /// [`feed_scan_lanes`] of `src`, fused with `dst += src` (`plus`) or `dst = src`.
    fn put_and_feed(dst: &mut [f32], src: &[f32], plus: bool, acc: &mut [f64; SCAN_LANES], tail: &mut f64) {
        let n = src.len() / SCAN_LANES * SCAN_LANES;
        let (d8, dt) = dst[..src.len()].split_at_mut(n);
        let (s8, st) = src.split_at(n);
        for (d, s) in dt.iter_mut().zip(st) {
            *d = if plus { *d + *s } else { *s };
            let v = *s as f64;
            *tail += v * v;
        }
        if plus {
            for (d, s) in d8.chunks_exact_mut(SCAN_LANES).zip(s8.chunks_exact(SCAN_LANES)) {
                for l in 0..SCAN_LANES {
                    d[l] += s[l];
                    let v = s[l] as f64;
                    acc[l] += v * v;
                }
            }
        } else {
            for (d, s) in d8.chunks_exact_mut(SCAN_LANES).zip(s8.chunks_exact(SCAN_LANES)) {
                d.copy_from_slice(s);
                for l in 0..SCAN_LANES {
                    let v = s[l] as f64;
                    acc[l] += v * v;
                }
            }
        }
    }
}

/// Scans a gradient for NaN/Inf and computes its squared norm in the same pass.
///
/// The squares are summed in f64, where the square of any finite f32 and any realistic sum of
/// them stay finite, so the sum is non-finite exactly when an entry is NaN or infinite: the hot
/// path is a single vectorised pass, and only an invalid gradient pays for a second pass that
/// locates the bad entries.
pub fn scan(grad: &[f32]) -> Scan {
    let mut acc = SqnormAcc::default();
    acc.feed(grad);
    scan_with(acc.finish(), grad)
}

/// The scan of `grad` whose sum of squares ([`SqnormAcc`]) is `sq` (taken already, e.g. by a fold through a
/// [`SqnormAcc`]): only a non-finite `sq` reads `grad` again, to locate the bad entries.
pub fn scan_with(sq: f64, grad: &[f32]) -> Scan {
    let mut s = Scan { sqnorm: sq, ..Scan::default() };
    if sq.is_finite() {
        return s;
    }
    for (i, &v) in grad.iter().enumerate() {
        if !v.is_finite() {
            if s.bad < MAX_BAD {
                s.first_bad[s.bad] = (i, v);
            }
            s.bad += 1;
        }
    }
    s
}

/// The factor that brings a gradient of norm `norm` to at most `max_norm` (1.0 when it already
/// is, or when `max_norm <= 0` disables clipping).
///
/// The factor is shrunk by a few ulps so that the scaled f32 vector, with its own rounding, still
/// has a norm at or below the bound.
pub fn clip_factor(norm: f64, max_norm: f32) -> f32 {
    // NaN norms never reach here (invalid gradients are skipped), so `<=` is the full test.
    if max_norm <= 0.0 || norm <= max_norm as f64 {
        return 1.0;
    }
    ((max_norm as f64 / norm) * (1.0 - 4.0 * f32::EPSILON as f64)) as f32
}

/// `x *= f`.
pub fn scale(x: &mut [f32], f: f32) {
    for v in x {
        *v *= f;
    }
}

/// `dst = f * src` (`f == 1.0` is an exact copy).
pub fn copy_scaled(dst: &mut [f32], src: &[f32], f: f32) {
    if f == 1.0 {
        dst.copy_from_slice(src);
    } else {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = *s * f;
        }
    }
}

/// `dst += f * src` (`f == 1.0` adds exactly `src`).
pub fn add_scaled(dst: &mut [f32], src: &[f32], f: f32) {
    if f == 1.0 {
        for (d, s) in dst.iter_mut().zip(src) {
            *d += *s;
        }
    } else {
        for (d, s) in dst.iter_mut().zip(src) {
            *d += *s * f;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_finds_nan_and_inf_in_index_order() {
        let mut g = vec![1.0f32; 100];
        g[3] = f32::NAN;
        g[50] = f32::INFINITY;
        g[99] = f32::NEG_INFINITY;
        let s = scan(&g);
        assert!(!s.is_valid());
        assert_eq!(s.bad, 3);
        assert_eq!(s.bad_entries().iter().map(|e| e.0).collect::<Vec<_>>(), vec![3, 50, 99]);
    }

    #[test]
    fn scan_of_finite_gradient_is_valid_with_exact_small_norm() {
        let g = [3.0f32, 4.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 12.0];
        let s = scan(&g);
        assert!(s.is_valid());
        assert_eq!(s.norm(), 13.0);
    }

    #[test]
    fn scan_of_huge_finite_values_stays_valid() {
        let g = vec![f32::MAX; 1000];
        assert!(scan(&g).is_valid());
    }

    #[test]
    fn scan_sum_fed_in_parts_of_multiples_of_32_is_the_whole_sum_bit_for_bit() {
        let x: Vec<f32> = (0..10_007).map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.4 + 1e-7 * i as f32).collect();
        let whole = scan(&x).sqnorm;
        for part in [32usize, 64, 4096] {
            let mut acc = SqnormAcc::default();
            for c in x.chunks(part) {
                acc.feed(c);
            }
            assert_eq!(acc.finish().to_bits(), whole.to_bits(), "parts of {part}");
        }
        // Fused with an addition or a copy: the same sum, and the same sums and copies.
        for plus in [false, true] {
            let mut acc = SqnormAcc::default();
            let mut d: Vec<f32> = (0..x.len()).map(|i| i as f32 * 0.5).collect();
            let want: Vec<f32> = d.iter().zip(&x).map(|(a, b)| if plus { a + b } else { *b }).collect();
            for (dc, xc) in d.chunks_mut(4096).zip(x.chunks(4096)) {
                acc.put(dc, xc, plus);
            }
            assert_eq!(acc.finish().to_bits(), whole.to_bits(), "fused, plus {plus}");
            assert!(d.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "plus {plus}");
        }
        // The order is the lanes': a plain left fold differs on this input.
        let serial = x.iter().fold(0.0f64, |a, &v| a + (v as f64) * (v as f64));
        assert_ne!(serial.to_bits(), whole.to_bits());
    }

    #[test]
    fn clip_factor_is_one_below_the_bound_and_when_disabled() {
        assert_eq!(clip_factor(5.0, 10.0), 1.0);
        assert_eq!(clip_factor(50.0, 0.0), 1.0);
        assert!(clip_factor(20.0, 10.0) < 0.5);
    }
}
