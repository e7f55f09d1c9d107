//! `cllm profile`: a flamegraph of training steps, sampled with pprof.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;

use super::{batches, check_threads, parse_strategy, resolve_config, trainer_options, LR, SEED};
use crate::error::Result;
use crate::model::Model;
use crate::train::options::MAX_DEFAULT_SPHERES;
use crate::train::{Strategy, Trainer};

/// Sample training steps with pprof and write a flamegraph SVG.
#[derive(Debug, Clone, Args)]
pub struct ProfileArgs {
    /// Model preset: tiny, small, seed, gpt2, gpt2-medium.
    #[arg(long, value_name = "NAME", default_value = "seed")]
    pub config: String,
    /// Worker threads. [default: number of cores]
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Profiled steps (at least; see --min-seconds).
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub steps: usize,
    /// Keep stepping until the sampler has run this long, so a fast model (tiny) still yields
    /// enough samples to draw: 20 tiny steps take ~10 ms, about 10 samples at 997 Hz.
    #[arg(long, value_name = "SECS", default_value_t = 1.0)]
    pub min_seconds: f64,
    /// Unprofiled steps first, so start-up is not in the picture.
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub warmup: usize,
    #[arg(long, value_name = "NAME", help = format!(
        "Synchronization strategy: {}. [default: {}]",
        Strategy::ALL.map(|s| s.to_string()).join(", "),
        Strategy::default()
    ))]
    pub strategy: Option<String>,
    /// Sequences per step. [default: the preset's]
    #[arg(long, value_name = "B")]
    pub batch: Option<usize>,
    /// Tokens per sequence, at most the preset's context. [default: the preset's context]
    #[arg(long, value_name = "T")]
    pub context: Option<usize>,
    #[arg(long, value_name = "N", help = format!(
        "Spheres (microbatches per step). [default: the largest divisor of the batch up to {MAX_DEFAULT_SPHERES}]"
    ))]
    pub spheres: Option<usize>,
    /// Samples per second per thread (a prime avoids beating with periodic work).
    #[arg(long, value_name = "HZ", default_value_t = 997)]
    pub frequency: i32,
    /// The flamegraph SVG. [default: a new runs/profile-NNN.svg]
    #[arg(long, value_name = "FILE.svg")]
    pub out: Option<PathBuf>,
    /// No summary line on stderr.
    #[arg(long)]
    pub quiet: bool,
}

impl Default for ProfileArgs {
    /// `cllm profile` with no flags: the defaults its help shows, by construction.
    fn default() -> Self {
        super::defaults_of()
    }
}

/// The output path a profile run writes to: `--out`, or the first free `runs/profile-NNN.svg`
/// (never the committed `results/`, which `scripts/bench.sh` regenerates with `--out`).
pub fn profile_out(args: &ProfileArgs) -> Result<PathBuf> {
    match &args.out {
        Some(out) => Ok(out.clone()),
        None => crate::cli::next_numbered(std::path::Path::new(crate::cli::train::RUNS_DIR), "profile", ".svg"),
    }
}

/// The validated settings of a profile run.
struct Resolved {
    cfg: crate::config::ModelConfig,
    /// Tokens per sequence.
    seq: usize,
    batch: usize,
    threads: usize,
    strategy: Strategy,
    out: PathBuf,
}

fn resolve(args: &ProfileArgs) -> Result<Resolved> {
    let (cfg, batch, seq) = resolve_config(&args.config, args.batch, args.context)?;
    let threads = args.threads.unwrap_or_else(super::machine::logical_cores);
    check_threads("--threads", threads)?;
    super::check_steps(args.steps, args.warmup)?;
    if !(args.min_seconds.is_finite() && (0.0..=3600.0).contains(&args.min_seconds)) {
        crate::bail!("--min-seconds: {} is outside 0..=3600", args.min_seconds);
    }
    if !(1..=10_000).contains(&args.frequency) {
        crate::bail!("--frequency: {} is outside 1..=10000 Hz", args.frequency);
    }
    let strategy = match &args.strategy {
        Some(s) => parse_strategy("--strategy", s)?,
        None => Strategy::default(),
    };
    super::check_memory(&cfg, batch, seq, args.spheres, &[threads], &[strategy], args.warmup + args.steps)?;
    let out = profile_out(args)?;
    if out.is_dir() {
        crate::bail!("--out {}: is a directory", out.display());
    }
    Ok(Resolved { cfg, batch, seq, threads, strategy, out })
}

/// Checks the options without running anything (usage errors for the CLI).
pub fn check_profile_args(args: &ProfileArgs) -> Result<()> {
    resolve(args).map(|_| ())
}

/// What a profile run did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProfileSummary {
    /// Steps trained under the sampler (at least `--steps`).
    pub steps: usize,
    /// Wall time of those steps.
    pub seconds: f64,
    /// Stack samples in the flamegraph.
    pub samples: u64,
}

/// `cllm profile`: trains at least `steps` steps, and for at least `min_seconds`, under the
/// sampler, and writes the flamegraph atomically. A run that collected no samples is an error
/// (an empty flamegraph would look like a result).
pub fn run_profile(args: &ProfileArgs) -> Result<ProfileSummary> {
    let Resolved { cfg, batch, seq, threads, strategy, out } = resolve(args)?;
    if let Some(dir) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| crate::err!("cannot create {}: {e}", dir.display()))?;
    }

    let data = batches(batch, seq, args.warmup + args.steps)?;
    let mut trainer =
        Trainer::new(Model::new(cfg, SEED), batch, seq, trainer_options(strategy, threads, args.spheres))?;
    for (x, y) in &data[..args.warmup] {
        trainer.step(x, y, LR)?;
    }
    // pprof's sampler is one per process: a second run in the same process (tests, an embedder)
    // waits here rather than failing to start it.
    static SAMPLER: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _sampler = SAMPLER.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    // Frames of the C runtime and the kernel-entry trampolines would only add noise at the
    // top of every stack (and unwinding through vdso can fault).
    let guard = pprof::ProfilerGuardBuilder::default()
        .frequency(args.frequency)
        .blocklist(&["libc", "libgcc", "pthread", "vdso"])
        .build()
        .map_err(|e| crate::err!("cannot start the profiler: {e}"))?;
    // Past `steps`, the profiled batches are reused in order: they are already in memory, and
    // the cost of a step does not depend on which tokens it sees.
    let profiled = &data[args.warmup..];
    let t0 = Instant::now();
    let mut steps = 0;
    while steps < args.steps || t0.elapsed().as_secs_f64() < args.min_seconds {
        let (x, y) = &profiled[steps % profiled.len()];
        trainer.step(x, y, LR)?;
        steps += 1;
    }
    let elapsed = t0.elapsed();
    let report = guard.report().build().map_err(|e| crate::err!("cannot build the profile: {e}"))?;
    drop(guard);
    drop(trainer);

    let samples: u64 = report.data.values().map(|&n| n.max(0) as u64).sum();
    if samples == 0 {
        crate::bail!(
            "no stack samples in {steps} steps ({:.2} s at {} Hz): raise --min-seconds or --steps",
            elapsed.as_secs_f64(),
            args.frequency
        );
    }
    let mut svg = Vec::new();
    report.flamegraph(&mut svg).map_err(|e| crate::err!("cannot draw the flamegraph: {e}"))?;
    super::report::write_file(&out, &svg)?;
    let summary = ProfileSummary { steps, seconds: elapsed.as_secs_f64(), samples };
    if !args.quiet {
        eprintln!(
            "[profile] {} x{threads} {strategy}: {steps} steps in {:.2} s, {samples} samples -> {}",
            args.config,
            summary.seconds,
            out.display()
        );
    }
    Ok(summary)
}
