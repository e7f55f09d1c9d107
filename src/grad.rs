//! Gradient checks and arithmetic: the NaN/Inf scan fused with the squared norm, clipping, and
//! the accumulation kernels the reduction uses.
//!
//! Every sum here has a fixed association order that depends only on the slice length, never on
//! the thread count, so the trainer's `segmented` strategy stays bit-deterministic (the order
//! in which micro-batch gradients are added is the summation tree's, [`crate::train::tree`]).

/// How many bad entries a scan keeps for the report.
pub const MAX_BAD: usize = 5;

/// Lanes of the partial sums: wide enough for the compiler to vectorise the loop.
const LANES: usize = 8;

/// The result of scanning one gradient.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scan {
    /// Sum of squares in f64 (NaN or infinite exactly when some entry is not finite).
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
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            let v = c[l] as f64;
            acc[l] += v * v;
        }
    }
    let mut s = 0.0f64;
    for v in tail {
        let v = *v as f64;
        s += v * v;
    }
    for a in acc {
        s += a;
    }
    s
}

/// Scans a gradient for NaN/Inf and computes its squared norm in the same pass.
///
/// The squares are summed in f64, where the square of any finite f32 and any realistic sum of
/// them stay finite, so the sum is non-finite exactly when an entry is NaN or infinite: the hot
/// path is a single vectorised pass, and only an invalid gradient pays for a second pass that
/// locates the bad entries.
pub fn scan(grad: &[f32]) -> Scan {
    let sq = sqnorm(grad);
    if sq.is_finite() {
        return Scan { sqnorm: sq, ..Scan::default() };
    }
    let mut s = Scan { sqnorm: sq, ..Scan::default() };
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
    fn clip_factor_is_one_below_the_bound_and_when_disabled() {
        assert_eq!(clip_factor(5.0, 10.0), 1.0);
        assert_eq!(clip_factor(50.0, 0.0), 1.0);
        assert!(clip_factor(20.0, 10.0) < 0.5);
    }
}
