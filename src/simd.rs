//! Run-time dispatch of element-wise loops to AVX2+FMA: the loops are written once as plain
//! scalar Rust, and [`multiversion!`] compiles them twice, for the baseline target and with
//! AVX2+FMA enabled (where the compiler vectorizes them 8-wide), choosing per call from what the
//! CPU has, without building the whole binary for one CPU. Rust never contracts a multiply and
//! an add into an FMA on its own, so both copies compute the same IEEE operations and give the
//! same bits.

/// Defines `$vis fn $name(...) [-> T]` that runs its body compiled for AVX2+FMA when the CPU
/// has them (detected at run time; the standard library caches the answer) and for the baseline
/// target otherwise.
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
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports AVX2 and FMA (checked just above), which is all
                    // `avx2`'s target_feature attribute requires.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

pub(crate) use multiversion;
