//! Run-time dispatch to the SIMD path the process runs ([`path::current`]: AVX-512, AVX2 or
//! portable, chosen once from the CPU and `CLLM_SIMD`).
//!
//! Element-wise loops are written once as plain scalar Rust, and [`multiversion!`] compiles
//! them three times, for the baseline target, with AVX2+FMA and with AVX-512F enabled (where
//! the compiler vectorizes them 8- or 16-wide), without building the whole binary for one CPU.
//! Rust never contracts a multiply and an add into an FMA, nor reassociates, on its own, so
//! every copy computes the same IEEE operations on each element and gives the same bits at
//! any vector width.
//!
//! Reductions are different: their bits depend on how partial sums are grouped. They are
//! written against [`Simd`], eight lanes combined in one fixed tree on every path (the AVX-512
//! path runs them in 256-bit registers), so their bits do not depend on the path either.

pub mod path;

pub use path::Path;

/// Defines `$vis fn $name(...) [-> T]` that runs its body compiled for AVX-512F, for AVX2+FMA
/// or for the baseline target, as [`path::current`] says.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[allow(clippy::too_many_arguments)]
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx512f,avx2,fma")]
                fn avx512($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                match $crate::simd::path::current() {
                    // SAFETY: `current` names a path only where `Path::available` found its
                    // features (AVX-512F, AVX2 and FMA), all `avx512`'s attribute requires.
                    $crate::simd::Path::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above, AVX2 and FMA, all `avx2`'s attribute requires.
                    $crate::simd::Path::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::simd::Path::Portable => {}
                }
            }
            body($($arg),*)
        }
    };
}

pub(crate) use multiversion;

/// Eight-lane f32 arithmetic for the loops the compiler does not vectorize by itself (lane-wise
/// partial sums, whose lanes it pairs up the wrong way, and long dependency chains such as
/// [`Simd::exp`]). A loop is written once, generic over `S: Simd`, and run with [`Avx2`] (one
/// 256-bit register per vector) where the CPU has AVX2 and FMA, else with [`Portable`] (an
/// array, lane by lane). The AVX-512 path uses [`Avx2`] too: the lanes' grouping is part of
/// the result's bits, so it is eight lanes everywhere. Every operation is the same IEEE operation in both, fused
/// multiply-adds included, so both give the same bits.
pub(crate) trait Simd: Copy {
    type V: Copy;
    /// All lanes `x`.
    fn splat(self, x: f32) -> Self::V;
    fn load(self, x: &[f32; 8]) -> Self::V;
    fn store(self, v: Self::V, out: &mut [f32; 8]);
    fn add(self, a: Self::V, b: Self::V) -> Self::V;
    fn sub(self, a: Self::V, b: Self::V) -> Self::V;
    fn mul(self, a: Self::V, b: Self::V) -> Self::V;
    fn div(self, a: Self::V, b: Self::V) -> Self::V;
    /// `a·b + c` rounded once.
    fn mul_add(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// Per lane `if a > b { a } else { b }`: `b` when either is NaN.
    fn max(self, a: Self::V, b: Self::V) -> Self::V;
    /// Per lane `if a < b { a } else { b }`: `b` when either is NaN.
    fn min(self, a: Self::V, b: Self::V) -> Self::V;
    /// Per lane `from_bits((to_bits(a) - to_bits(b) + add) << 23)` in wrapping integer
    /// arithmetic: builds 2^k in the exponent bits from `a = k + b` (see [`Simd::exp`]).
    fn pow2_bits(self, a: Self::V, b: Self::V, add: u32) -> Self::V;

    /// The lanes combined in the fixed tree ((0+4)+(1+5))+((2+6)+(3+7)).
    fn sum(self, v: Self::V) -> f32 {
        let mut a = [0.0; 8];
        self.store(v, &mut a);
        ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
    }

    /// The largest lane (NaN lanes are skipped unless lane 0 is NaN; callers that must see a
    /// NaN get it through the arithmetic that follows).
    fn max_lane(self, v: Self::V) -> f32 {
        let mut a = [0.0; 8];
        self.store(v, &mut a);
        a.iter().fold(a[0], |m, &x| if x > m { x } else { m })
    }

    /// The first `x.len()` (< 8) lanes from `x`, the rest `fill`.
    fn load_partial(self, x: &[f32], fill: f32) -> Self::V {
        let mut a = [fill; 8];
        a[..x.len()].copy_from_slice(x);
        self.load(&a)
    }

    /// Stores the first `out.len()` (< 8) lanes.
    fn store_partial(self, v: Self::V, out: &mut [f32]) {
        let mut a = [0.0; 8];
        self.store(v, &mut a);
        let n = out.len();
        out.copy_from_slice(&a[..n]);
    }

    /// e^x per lane, branch-free: range reduction to x = k·ln2 + r with |r| ≤ ln2/2, a
    /// degree-6 polynomial for e^r in Estrin's scheme (a short dependency chain: the loops
    /// calling this are bound by its latency, not by its operation count), relative error
    /// under 3e-7, and 2^k built in the exponent bits. Inputs are clamped to [-87, 88], where
    /// e^x stays a normal f32; a NaN stays NaN.
    #[inline(always)]
    fn exp(self, x: Self::V) -> Self::V {
        const LOG2E: f32 = std::f32::consts::LOG2_E;
        const LN2_HI: f32 = 0.693_145_75;
        const LN2_LO: f32 = 1.428_606_8e-6;
        // Adding 1.5·2^23 rounds to the nearest integer and leaves that integer in the low
        // mantissa bits, so no float-to-int conversion is needed.
        const ROUND: f32 = 12_582_912.0;
        let s = self;
        let x = s.max(s.splat(-87.0), s.min(s.splat(88.0), x));
        let round = s.splat(ROUND);
        let shifted = s.mul_add(x, s.splat(LOG2E), round);
        let k = s.sub(shifted, round);
        let r = s.mul_add(k, s.splat(-LN2_HI), x);
        let r = s.mul_add(k, s.splat(-LN2_LO), r);
        // 1 + r + r²/2 + ... + r⁶/720 as (1 + r) + r²·((1/2 + r/6) + r²·((1/24 + r/120) + r²/720)).
        let r2 = s.mul(r, r);
        let p01 = s.add(s.splat(1.0), r);
        let p23 = s.mul_add(r, s.splat(1.0 / 6.0), s.splat(0.5));
        let p45 = s.mul_add(r, s.splat(1.0 / 120.0), s.splat(1.0 / 24.0));
        let p456 = s.mul_add(r2, s.splat(1.0 / 720.0), p45);
        let p23456 = s.mul_add(r2, p456, p23);
        let p = s.mul_add(r2, p23456, p01);
        s.mul(p, s.pow2_bits(shifted, round, 127))
    }
}

/// [`Simd`] lane by lane, for any CPU.
#[derive(Clone, Copy)]
pub(crate) struct Portable;

impl Simd for Portable {
    type V = [f32; 8];
    #[inline(always)]
    fn splat(self, x: f32) -> [f32; 8] {
        [x; 8]
    }
    #[inline(always)]
    fn load(self, x: &[f32; 8]) -> [f32; 8] {
        *x
    }
    #[inline(always)]
    fn store(self, v: [f32; 8], out: &mut [f32; 8]) {
        *out = v;
    }
    #[inline(always)]
    fn add(self, a: [f32; 8], b: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| a[i] + b[i])
    }
    #[inline(always)]
    fn sub(self, a: [f32; 8], b: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| a[i] - b[i])
    }
    #[inline(always)]
    fn mul(self, a: [f32; 8], b: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| a[i] * b[i])
    }
    #[inline(always)]
    fn div(self, a: [f32; 8], b: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| a[i] / b[i])
    }
    #[inline(always)]
    fn mul_add(self, a: [f32; 8], b: [f32; 8], c: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| a[i].mul_add(b[i], c[i]))
    }
    #[inline(always)]
    fn max(self, a: [f32; 8], b: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| if a[i] > b[i] { a[i] } else { b[i] })
    }
    #[inline(always)]
    fn min(self, a: [f32; 8], b: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| if a[i] < b[i] { a[i] } else { b[i] })
    }
    #[inline(always)]
    fn pow2_bits(self, a: [f32; 8], b: [f32; 8], add: u32) -> [f32; 8] {
        std::array::from_fn(|i| f32::from_bits(a[i].to_bits().wrapping_sub(b[i].to_bits()).wrapping_add(add) << 23))
    }
}

/// [`Simd`] in AVX2/FMA registers. Only [`Avx2::detect`] and [`Avx2::for_path`] make one, so
/// holding one proves the CPU has both; loops over it must still be compiled with those
/// features enabled to be fast (see [`simd_dispatch!`]).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(crate) struct Avx2(());

#[cfg(target_arch = "x86_64")]
impl Avx2 {
    /// `Some` exactly when the CPU has AVX2 and FMA (the standard library caches the answer).
    #[cfg(test)]
    #[inline(always)]
    pub(crate) fn detect() -> Option<Avx2> {
        Path::Avx2.available().then_some(Avx2(()))
    }

    /// `Some` when the process's path ([`path::current`]) runs reductions in AVX2 registers:
    /// the AVX2 and AVX-512 paths (each implies AVX2 and FMA).
    #[inline(always)]
    pub(crate) fn for_path() -> Option<Avx2> {
        match path::current() {
            Path::Avx512 | Path::Avx2 => Some(Avx2(())),
            Path::Portable => None,
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2_impl {
    use super::{Avx2, Simd};
    use std::arch::x86_64::*;

    /// Lanes `0..n` set (all bits), the rest clear.
    #[inline(always)]
    unsafe fn tail_mask(n: usize) -> __m256i {
        unsafe { _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)) }
    }

    // SAFETY (every `unsafe` block below): an `Avx2` value exists only after `Avx2::detect`
    // found AVX2 and FMA, which is all these intrinsics need; `load`/`store` go through
    // references to exactly eight f32, so the unaligned 256-bit accesses stay in bounds, and
    // the masked accesses of `load_partial`/`store_partial` touch only lanes `0..n` with
    // `n <= len`, inside the slice.
    impl Simd for Avx2 {
        type V = __m256;
        #[inline(always)]
        fn splat(self, x: f32) -> __m256 {
            unsafe { _mm256_set1_ps(x) }
        }
        #[inline(always)]
        fn load(self, x: &[f32; 8]) -> __m256 {
            unsafe { _mm256_loadu_ps(x.as_ptr()) }
        }
        #[inline(always)]
        fn store(self, v: __m256, out: &mut [f32; 8]) {
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), v) }
        }
        #[inline(always)]
        fn add(self, a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_add_ps(a, b) }
        }
        #[inline(always)]
        fn sub(self, a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_sub_ps(a, b) }
        }
        #[inline(always)]
        fn mul(self, a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_mul_ps(a, b) }
        }
        #[inline(always)]
        fn div(self, a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_div_ps(a, b) }
        }
        #[inline(always)]
        fn mul_add(self, a: __m256, b: __m256, c: __m256) -> __m256 {
            unsafe { _mm256_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        fn max(self, a: __m256, b: __m256) -> __m256 {
            // vmaxps returns its second operand unless the first is greater: `if a > b { a } else { b }`.
            unsafe { _mm256_max_ps(a, b) }
        }
        #[inline(always)]
        fn min(self, a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_min_ps(a, b) }
        }
        #[inline(always)]
        fn pow2_bits(self, a: __m256, b: __m256, add: u32) -> __m256 {
            unsafe {
                let k = _mm256_sub_epi32(_mm256_castps_si256(a), _mm256_castps_si256(b));
                let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(k, _mm256_set1_epi32(add as i32)));
                _mm256_castsi256_ps(e)
            }
        }
        #[inline(always)]
        fn max_lane(self, v: __m256) -> f32 {
            // Maximum is exact, so the order does not matter for non-NaN lanes.
            unsafe {
                let t = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                let u = _mm_max_ps(t, _mm_movehl_ps(t, t));
                _mm_cvtss_f32(_mm_max_ss(u, _mm_movehdup_ps(u)))
            }
        }
        #[inline(always)]
        fn load_partial(self, x: &[f32], fill: f32) -> __m256 {
            let n = x.len().min(8);
            unsafe {
                let mask = tail_mask(n);
                // Lanes past `n` are not read (masked), then replaced by `fill`.
                let v = _mm256_maskload_ps(x.as_ptr(), mask);
                _mm256_blendv_ps(_mm256_set1_ps(fill), v, _mm256_castsi256_ps(mask))
            }
        }
        #[inline(always)]
        fn store_partial(self, v: __m256, out: &mut [f32]) {
            let n = out.len().min(8);
            unsafe { _mm256_maskstore_ps(out.as_mut_ptr(), tail_mask(n), v) }
        }
        #[inline(always)]
        fn sum(self, v: __m256) -> f32 {
            unsafe {
                // [0+4, 1+5, 2+6, 3+7], then (t0+t1) and (t2+t3), then their sum: the order of
                // the portable fold.
                let t = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                let u = _mm_add_ps(t, _mm_movehdup_ps(t));
                _mm_cvtss_f32(_mm_add_ss(u, _mm_movehl_ps(u, u)))
            }
        }
    }
}

/// Defines `$vis fn $name(...) [-> T]` whose body is generic over a [`Simd`] value named by the
/// first parameter (`simd: S` below): it runs with [`Avx2`], compiled with AVX2+FMA enabled, on
/// the AVX2 and AVX-512 paths, and with [`Portable`] on the portable path ([`path::current`]).
macro_rules! simd_dispatch {
    ($(#[$meta:meta])* $vis:vis fn $name:ident<$s:ident>($simd:ident $(, $arg:ident: $ty:ty)* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[allow(clippy::too_many_arguments)]
            #[inline(always)]
            fn body<$s: $crate::simd::Simd>($simd: $s $(, $arg: $ty)*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx2,fma")]
                fn avx2(simd: $crate::simd::Avx2 $(, $arg: $ty)*) $(-> $ret)? {
                    body(simd $(, $arg)*)
                }
                if let Some(simd) = $crate::simd::Avx2::for_path() {
                    // SAFETY: `for_path` returned a token, so the CPU has AVX2 and FMA, which is
                    // all `avx2`'s target_feature attribute requires.
                    return unsafe { avx2(simd $(, $arg)*) };
                }
            }
            body($crate::simd::Portable $(, $arg)*)
        }
    };
}

pub(crate) use simd_dispatch;
