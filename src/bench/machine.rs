//! What the machine can give: its description, process CPU time and peak memory, and the
//! concurrency ceiling measured with independent single-threaded GEMMs.

use std::sync::Barrier;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::model::gemm::gemm;
use crate::model::kernel::{self, Mat};

/// The machine a report was measured on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    pub logical_cores: usize,
    pub cpu_model: String,
    pub rustc: String,
    pub git_commit: String,
    pub os: String,
    /// The GEMM kernel the model used and its code path on this CPU ([`kernel::name`]).
    pub gemm_backend: String,
}

impl Machine {
    pub fn detect() -> Self {
        Machine {
            logical_cores: logical_cores(),
            cpu_model: cpu_model(),
            rustc: rustc_version(),
            git_commit: option_env!("CLLM_GIT_COMMIT").unwrap_or("unknown").to_string(),
            os: format!("{} {}", std::env::consts::OS, std::env::consts::ARCH),
            gemm_backend: kernel::name().to_string(),
        }
    }
}

/// Cores this process may run on (respects affinity masks and cgroup quotas).
pub fn logical_cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_string())
}

/// The compiler that built this binary, captured by build.rs.
fn rustc_version() -> String {
    env!("CLLM_RUSTC_VERSION").to_string()
}

/// Process-wide CPU time and memory high-water mark at one instant.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    /// User + system CPU seconds of all threads of the process.
    pub cpu_s: f64,
    /// Peak resident set size so far, in MiB.
    pub max_rss_mb: f64,
}

impl Usage {
    pub fn now() -> Self {
        let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: getrusage writes a complete `rusage` into the pointer, which is valid, aligned
        // and exclusively ours; RUSAGE_SELF cannot fail with a valid pointer, and on a failure
        // the zeroed struct is still a valid value to read.
        let ru = unsafe {
            libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr());
            ru.assume_init()
        };
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
        Usage {
            cpu_s: tv(ru.ru_utime) + tv(ru.ru_stime),
            // Linux reports kilobytes.
            max_rss_mb: ru.ru_maxrss as f64 / 1024.0,
        }
    }
}

/// Resets the process's resident-set high-water mark (`VmHWM`) to its current resident set,
/// by writing "5" to `/proc/self/clear_refs` (Linux 4.0+), so that [`peak_rss_mb`] measures
/// from here on. `getrusage`'s maxrss is not reset (it keeps exited threads' peaks), hence
/// the separate reading. False where that is not possible.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// `VmHWM` of `/proc/self/status` in MiB: the peak resident set since the process started or
/// since the last [`reset_peak_rss`]. None where it cannot be read.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?;
    let kb: f64 = line.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb / 1024.0)
}

/// The best speed-up N workers can get on this machine for this model's arithmetic.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ceiling {
    /// GEMM shape `[m x k] · [k x n]`.
    pub m: usize,
    pub k: usize,
    pub n: usize,
    /// One GEMM alone on one thread, in milliseconds.
    pub single_ms: f64,
    /// `(threads, ratio)`: aggregate GEMM throughput of `threads` concurrent threads over one
    /// thread alone.
    pub ratios: Vec<(usize, f64)>,
}

impl Ceiling {
    pub fn ratio(&self, threads: usize) -> Option<f64> {
        self.ratios.iter().find(|&&(t, _)| t == threads).map(|&(_, r)| r)
    }
}

/// Rounds of (one alone, N together) per thread count; the median ratio is kept, and each
/// round pairs the two measurements in time so slow drifts in background load cancel.
const CEILING_ROUNDS: usize = 3;

/// Measures the ceiling for each thread count with GEMMs of the model's MLP shape
/// `[T x C] · [C x 4C]`, about `budget` of wall time per measurement.
pub fn measure_ceiling(cfg: &ModelConfig, threads: &[usize], budget: Duration) -> Ceiling {
    let (m, k, n) = (cfg.context, cfg.embed, 4 * cfg.embed);
    // Calibrate on this thread: a few products, at least 20 ms, cap the count so a bad
    // reading cannot turn the budget into minutes.
    let (a, b, mut c) = (fill(m * k, 1), fill(k * n, 2), vec![0.0f32; m * n]);
    let t0 = Instant::now();
    let mut calls = 0usize;
    while calls < 3 || (t0.elapsed() < Duration::from_millis(20) && calls < 10_000) {
        gemm(m, n, k, &mut c, n, Mat::rows(&a, k), Mat::rows(&b, n), false);
        calls += 1;
    }
    let single = t0.elapsed().as_secs_f64() / calls as f64;
    let reps = ((budget.as_secs_f64() / single.max(1e-7)) as usize).clamp(3, 10_000);
    let mut ratios = Vec::new();
    for &t in threads {
        if t <= 1 {
            ratios.push((t, 1.0));
            continue;
        }
        let mut r: Vec<f64> = (0..CEILING_ROUNDS)
            .map(|_| {
                let alone = time_gemms(m, k, n, 1, reps);
                let together = time_gemms(m, k, n, t, reps);
                t as f64 * alone / together
            })
            .collect();
        r.sort_by(f64::total_cmp);
        ratios.push((t, r[r.len() / 2]));
    }
    Ceiling { m, k, n, single_ms: single * 1e3, ratios }
}

/// Wall seconds for `threads` threads to each run `reps` independent GEMMs on their own data,
/// all released together: from the first thread's start to the last one's end, both read by
/// the workers themselves (on a loaded machine the coordinating thread may be descheduled
/// for the whole run, so its own clock readings would mean nothing).
fn time_gemms(m: usize, k: usize, n: usize, threads: usize, reps: usize) -> f64 {
    let start = Barrier::new(threads);
    let spans: Vec<(Instant, Instant)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let start = &start;
                s.spawn(move || {
                    // Allocated and touched before the start, so page faults are not timed.
                    let a = fill(m * k, i);
                    let b = fill(k * n, i + 7);
                    let mut c = vec![0.0f32; m * n];
                    start.wait();
                    let t0 = Instant::now();
                    for _ in 0..reps {
                        gemm(m, n, k, &mut c, n, Mat::rows(&a, k), Mat::rows(&b, n), false);
                    }
                    std::hint::black_box(&c);
                    (t0, Instant::now())
                })
            })
            .collect();
        handles.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    let first = spans.iter().map(|s| s.0).min();
    let last = spans.iter().map(|s| s.1).max();
    match (first, last) {
        (Some(a), Some(b)) => b.duration_since(a).as_secs_f64(),
        _ => f64::NAN,
    }
}

fn fill(len: usize, seed: usize) -> Vec<f32> {
    (0..len).map(|i| ((i.wrapping_mul(7919) ^ seed) % 1000) as f32 / 1000.0 - 0.5).collect()
}

/// Machine-wide CPU counters from `/proc/stat`, to tell how much of the machine other
/// processes took while we measured (the benchmark's numbers are only as good as that).
#[derive(Clone, Copy, Debug)]
pub struct SystemCpu {
    busy: u64,
    total: u64,
    cpus: usize,
}

impl SystemCpu {
    /// `None` where `/proc/stat` is unavailable (not Linux).
    pub fn now() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let mut lines = stat.lines();
        let first = lines.next()?;
        let v: Vec<u64> = first.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
        if v.len() < 5 || !first.starts_with("cpu ") {
            return None;
        }
        let total: u64 = v.iter().take(8).sum();
        let idle = v[3] + v[4];
        let cpus = stat
            .lines()
            .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
            .count();
        Some(SystemCpu { busy: total - idle, total, cpus: cpus.max(1) })
    }

    /// Cores kept busy by everything else between `self` and `later`, given our own CPU
    /// seconds over `wall_s` in that span.
    pub fn background_cores(&self, later: &SystemCpu, own_cpu_s: f64, wall_s: f64) -> f64 {
        let dt = later.total.saturating_sub(self.total) as f64;
        if dt <= 0.0 || wall_s <= 0.0 {
            return 0.0;
        }
        let busy_cores = later.busy.saturating_sub(self.busy) as f64 / dt * self.cpus as f64;
        (busy_cores - own_cpu_s / wall_s).max(0.0)
    }
}

/// The 1-minute load average, if the system reports one.
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg").ok()?.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_rss_reset_forgets_an_earlier_peak() {
        if !reset_peak_rss() {
            return; // not Linux (or no /proc): the bench falls back to getrusage
        }
        const MB: usize = 128;
        let before = peak_rss_mb().expect("VmHWM");
        {
            let v = vec![1u8; MB << 20];
            std::hint::black_box(&v);
        }
        let high = peak_rss_mb().expect("VmHWM");
        assert!(high >= before + MB as f64 * 0.9, "the allocation raised the peak: {before} -> {high}");
        assert!(reset_peak_rss());
        let after = peak_rss_mb().expect("VmHWM");
        assert!(after < high - MB as f64 * 0.5, "the reset forgot it: {high} -> {after}");
    }
}
