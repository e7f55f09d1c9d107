//! The one decision of which SIMD code path the process runs: made once, on first use, from
//! the CPU and the `CLLM_SIMD` environment variable, then never changed.
//!
//! Every dispatch site asks [`current`]: the GEMM kernel ([`crate::model::kernel`]), the
//! element-wise loops of [`super::multiversion!`] and the lane reductions of
//! [`super::simd_dispatch!`]. So forcing `CLLM_SIMD=portable` runs portable code everywhere,
//! and one machine can run every path it has. Every path computes the same IEEE operations in
//! the same order (see `docs/performance.md#simd-paths`), so the path changes speed, never bits.
//!
//! Why the choice is fixed: a path chosen per call could change between two calls only if the
//! environment changed, and a reader of `CLLM_SIMD` after start-up would see a value the user
//! did not run with; a [`OnceLock`] makes the first answer the only one.

use std::fmt;
use std::sync::OnceLock;

/// The environment variable that forces a path.
pub const ENV: &str = "CLLM_SIMD";

/// A SIMD code path, from the widest to the plainest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// 512-bit AVX-512F registers (with AVX2 and FMA, which every AVX-512F CPU has).
    Avx512,
    /// 256-bit AVX2 registers with FMA.
    Avx2,
    /// Plain Rust for any CPU (fused multiply-adds through `f32::mul_add`).
    Portable,
}

impl Path {
    /// Every path, widest first (the order [`Path::best`] tries them).
    pub const ALL: [Path; 3] = [Path::Avx512, Path::Avx2, Path::Portable];

    /// The spelling `CLLM_SIMD` takes and reports use.
    pub fn name(self) -> &'static str {
        match self {
            Path::Avx512 => "avx512",
            Path::Avx2 => "avx2",
            Path::Portable => "portable",
        }
    }

    /// Whether this CPU (and its operating system, which must save the wide registers) can run
    /// the path; the standard library detects it once and caches the answer.
    pub fn available(self) -> bool {
        match self {
            Path::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Path::Avx2 => std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Path::Avx512 => Path::Avx2.available() && std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The widest path this CPU has.
    pub fn best() -> Path {
        Path::ALL.into_iter().find(|p| p.available()).unwrap_or(Path::Portable)
    }

    /// The paths this CPU has, widest first.
    pub fn available_paths() -> Vec<Path> {
        Path::ALL.into_iter().filter(|p| p.available()).collect()
    }

    /// The path a `CLLM_SIMD` value names, if this CPU has it. Unset or empty means
    /// [`Path::best`]; anything else must be exactly one of the names.
    pub fn from_env_value(value: Option<&str>) -> Result<Path, String> {
        let Some(v) = value.filter(|v| !v.is_empty()) else {
            return Ok(Path::best());
        };
        let names = || Path::ALL.map(Path::name).join(", ");
        let Some(p) = Path::ALL.into_iter().find(|p| p.name() == v) else {
            return Err(format!("{ENV}={v:?} is not a SIMD path; valid choices: {}", names()));
        };
        if !p.available() {
            let have = Path::available_paths().into_iter().map(Path::name).collect::<Vec<_>>().join(", ");
            return Err(format!("{ENV}={v}: this CPU lacks that path; valid choices here: {have}"));
        }
        Ok(p)
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

static SELECTED: OnceLock<Result<Path, String>> = OnceLock::new();

/// The process's path, or why `CLLM_SIMD` names none: read from the environment on the first
/// call and fixed from then on. The command line calls this first, so a bad value is a clean
/// one-line error before any work.
pub fn selected() -> Result<Path, &'static str> {
    let r = SELECTED.get_or_init(|| {
        let raw = std::env::var_os(ENV);
        match raw.as_deref().map(|v| v.to_str()) {
            None => Path::from_env_value(None),
            Some(Some(v)) => Path::from_env_value(Some(v)),
            Some(None) => Err(format!("{ENV} is not valid UTF-8; valid choices: avx512, avx2, portable")),
        }
    });
    r.as_ref().map(|&p| p).map_err(String::as_str)
}

/// The process's path, for the dispatch sites. A `CLLM_SIMD` that names no usable path stops
/// the process with its message (the command line has already reported it cleanly by then;
/// this is for library users who skipped [`selected`]).
#[inline]
pub fn current() -> Path {
    match SELECTED.get() {
        Some(Ok(p)) => *p,
        _ => selected().unwrap_or_else(|e| panic!("{e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_or_empty_picks_the_best_path_the_cpu_has() {
        assert_eq!(Path::from_env_value(None), Ok(Path::best()));
        assert_eq!(Path::from_env_value(Some("")), Ok(Path::best()));
        assert!(Path::best().available());
    }

    #[test]
    fn each_available_name_selects_its_path() {
        for p in Path::available_paths() {
            assert_eq!(Path::from_env_value(Some(p.name())), Ok(p));
        }
        assert!(Path::Portable.available());
    }

    #[test]
    fn an_unknown_value_is_an_error_naming_the_valid_choices() {
        for bad in ["AVX2", "sse", "avx512 ", "neon"] {
            let e = Path::from_env_value(Some(bad)).unwrap_err();
            assert!(e.contains("CLLM_SIMD") && e.contains("avx512, avx2, portable"), "{e}");
        }
    }

    #[test]
    fn a_path_the_cpu_lacks_is_an_error_naming_those_it_has() {
        for p in Path::ALL.into_iter().filter(|p| !p.available()) {
            let e = Path::from_env_value(Some(p.name())).unwrap_err();
            assert!(e.contains("lacks") && e.contains("portable"), "{e}");
        }
    }

    #[test]
    fn wider_paths_imply_the_narrower_ones() {
        assert!(!Path::Avx512.available() || Path::Avx2.available());
    }
}
