//! `cllm bench` and `cllm profile`: how training scales with threads on this machine.
//!
//! `cllm bench` trains a preset for a few steps under every (strategy, threads) cell of a
//! matrix in one process and writes `scaling.json`, `scaling.md` and `scaling.svg`. Beside
//! the cells it measures the machine's own ceiling: N independent single-threaded GEMMs of
//! the model's shape running at once against one alone. No synchronization protocol can beat
//! that ratio here (it includes frequency scaling and shared caches), so each strategy's
//! speed-up is reported against it rather than against an ideal the hardware cannot reach.
//!
//! `cllm profile` writes a flamegraph of training steps, sampled with pprof.

pub mod distributed;
pub mod machine;
pub mod profile;
pub mod report;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;

pub use machine::{load_average, measure_ceiling, Ceiling, Machine, SystemCpu, Usage};
pub use profile::{check_profile_args, run_profile, ProfileArgs, ProfileSummary};
pub use report::{Cell, ModelInfo, Report};

use crate::config::{ModelConfig, PRESETS};
use crate::data::{BatchSampler, Corpus};
use crate::error::Result;
use crate::memory::{Available, MemoryPlan, RunShape};
use crate::model::Model;
use crate::train::options::{DEFAULT_CONFIG, DEFAULT_SEED, MAX_BATCH, MAX_DEFAULT_SPHERES, MAX_TOKENS_PER_STEP};
use crate::train::{StepReport, Strategy, Trainer, TrainerOptions, WorkerTiming};

/// Seed of the model and of the batches: every cell trains the same model on the same data
/// (`cllm train`'s default seed).
pub(crate) const SEED: u64 = DEFAULT_SEED;
/// Learning rate of the timed steps (the value does not change the cost of a step).
pub(crate) const LR: f32 = 1e-3;
use crate::train::MAX_THREADS;

/// Measure training throughput for each strategy and thread count, against the machine's
/// ceiling, and write DIR/scaling.{json,md,svg}.
///
/// Without --out the report goes to a new runs/bench-NNN, never over the committed reports in
/// results/ (scripts/bench.sh regenerates those, passing --out).
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Model preset: tiny, small, seed, gpt2, gpt2-medium.
    #[arg(long, value_name = "NAME", default_value = DEFAULT_CONFIG)]
    pub config: String,
    /// Thread counts, comma-separated. 1 is always measured: it is the speed-up baseline.
    #[arg(long, value_name = "LIST", value_delimiter = ',', default_value = "1,2,4,8")]
    pub threads: Vec<usize>,
    /// Strategies, comma-separated: model-lock, gradient-lock, segmented, rayon.
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "model-lock,gradient-lock,segmented,rayon"
    )]
    pub strategies: Vec<String>,
    /// Timed steps per cell (the median step time is reported).
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub steps: usize,
    /// Untimed steps per cell before the timed ones.
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub warmup: usize,
    /// Sequences per step. [default: the preset's]
    #[arg(long, value_name = "B")]
    pub batch: Option<usize>,
    /// Tokens per sequence, at most the preset's context (the model keeps the preset's
    /// position table, as `train --context` does). [default: the preset's context]
    #[arg(long, value_name = "T")]
    pub context: Option<usize>,
    #[arg(long, value_name = "N", help = format!(
        "Spheres (microbatches per step). [default: the largest divisor of the batch up to {MAX_DEFAULT_SPHERES}]"
    ))]
    pub spheres: Option<usize>,
    /// Directory for scaling.json, scaling.md and scaling.svg (use one per config). [default: a
    /// new runs/bench-NNN]
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Also print scaling.json to stdout.
    #[arg(long)]
    pub json: bool,
    /// Wall time of each machine-ceiling measurement, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 250)]
    pub ceiling_ms: u64,
    /// No progress lines on stderr.
    #[arg(long)]
    pub quiet: bool,
    /// Measure one rank of a run under `mpirun` instead (segmented only): per-step exchange
    /// time and bytes of every rank beside the compute split, in DIR/distributed.json (needs a
    /// build with --features mpi; see docs/distributed.md).
    #[arg(long, value_name = "BACKEND", value_enum)]
    pub distributed: Option<crate::dist::Distributed>,
}

impl Default for BenchArgs {
    /// `cllm bench` with no flags: the defaults its help shows, by construction.
    fn default() -> Self {
        defaults_of()
    }
}

/// The arguments of an empty command line: every field's clap default (or `None`/`false`), so
/// a `Default` built from it cannot drift from what `--help` shows.
pub(crate) fn defaults_of<A: clap::Args + clap::FromArgMatches>() -> A {
    let matches = A::augment_args(clap::Command::new("defaults"))
        .try_get_matches_from(["defaults"])
        .unwrap_or_else(|e| panic!("an argument without a default is required: {e}"));
    A::from_arg_matches(&matches).unwrap_or_else(|e| panic!("a default does not parse: {e}"))
}

/// A validated bench plan.
pub(crate) struct Plan {
    name: String,
    cfg: ModelConfig,
    batch: usize,
    seq: usize,
    threads: Vec<usize>,
    strategies: Vec<(String, Strategy)>,
}

/// Resolves a preset name, batch and sequence length (`context`, at most the preset's), with
/// errors naming the flag: (config, batch, sequence length).
pub(crate) fn resolve_config(
    name: &str,
    batch: Option<usize>,
    context: Option<usize>,
) -> Result<(ModelConfig, usize, usize)> {
    let cfg = ModelConfig::preset(name)
        .ok_or_else(|| crate::err!("--config: unknown preset {name:?} (expected one of {})", PRESETS.join(", ")))?;
    let seq = context.unwrap_or(cfg.context);
    if seq == 0 || seq > cfg.context {
        crate::bail!("--context: {seq} is outside 1..={} (the context of {name})", cfg.context);
    }
    let batch = match batch {
        Some(0) => crate::bail!("--batch: must be at least 1"),
        Some(b) => b,
        None => ModelConfig::preset_batch(name).unwrap_or(8),
    };
    let max_batch = MAX_BATCH.min(MAX_TOKENS_PER_STEP / seq);
    if batch > max_batch {
        crate::bail!(
            "--batch: {batch} is too large for {name} at context {seq} (at most {max_batch}: {MAX_TOKENS_PER_STEP} tokens a step)"
        );
    }
    Ok((cfg, batch, seq))
}

/// Most timed (and, separately, warmup) steps of a bench cell or a profile run: the batches of
/// all of them are made before the first step, so they are bounded, and their memory is part
/// of [`check_memory`].
pub const MAX_BENCH_STEPS: usize = 100_000;

/// Bounds `--steps` (at least 1) and `--warmup`.
pub(crate) fn check_steps(steps: usize, warmup: usize) -> Result<()> {
    if steps == 0 {
        crate::bail!("--steps: must be at least 1");
    }
    for (flag, n) in [("--steps", steps), ("--warmup", warmup)] {
        if n > MAX_BENCH_STEPS {
            crate::bail!("{flag}: {n} is too large (at most {MAX_BENCH_STEPS})");
        }
    }
    Ok(())
}

/// Refuses, with the numbers, a bench or profile run whose largest trainer (over `threads` and
/// `strategies`) and `batches` pre-made batches do not fit in the memory available
/// ([`crate::memory`]).
pub(crate) fn check_memory(
    cfg: &ModelConfig,
    batch: usize,
    seq: usize,
    spheres: Option<usize>,
    threads: &[usize],
    strategies: &[Strategy],
    batches: usize,
) -> Result<()> {
    let spheres = crate::train::resolve_spheres(spheres.unwrap_or(0), batch);
    // Inputs and targets, u32 each, of every pre-made batch.
    let data = batches.checked_mul(batch).and_then(|n| n.checked_mul(seq)).and_then(|n| n.checked_mul(8));
    let data_bytes = data.ok_or_else(|| crate::err!("memory plan: the size of the batches overflows"))?;
    let mut largest: Option<MemoryPlan> = None;
    for &strategy in strategies {
        for &t in threads {
            let shape = RunShape {
                batch,
                context: seq,
                spheres,
                threads: t,
                strategy,
                data_bytes,
                loaded: crate::memory::Loaded::Nothing,
                saves: false,
            };
            let plan = MemoryPlan::for_run(cfg, &shape)?;
            if largest.is_none_or(|l| plan.total > l.total) {
                largest = Some(plan);
            }
        }
    }
    match largest {
        Some(plan) => plan.check_fits("the run", &Available::now()),
        None => Ok(()),
    }
}

/// Parses a strategy name, with an error naming the flag and the choices.
pub(crate) fn parse_strategy(flag: &str, name: &str) -> Result<Strategy> {
    name.parse::<Strategy>().map_err(|e| e.context(flag))
}

pub(crate) fn check_threads(flag: &str, t: usize) -> Result<()> {
    if t == 0 || t > MAX_THREADS {
        crate::bail!("{flag}: {t} is not a usable thread count (1 to {MAX_THREADS})");
    }
    Ok(())
}

pub(crate) fn plan(args: &BenchArgs) -> Result<Plan> {
    let (cfg, batch, seq) = resolve_config(&args.config, args.batch, args.context)?;
    check_steps(args.steps, args.warmup)?;
    if args.threads.is_empty() {
        crate::bail!("--threads: give at least one thread count");
    }
    let mut threads = vec![1];
    for &t in &args.threads {
        check_threads("--threads", t)?;
        if !threads.contains(&t) {
            threads.push(t);
        }
    }
    threads.sort_unstable();
    if args.strategies.is_empty() {
        crate::bail!("--strategies: give at least one strategy");
    }
    let mut strategies: Vec<(String, Strategy)> = Vec::new();
    for name in &args.strategies {
        let s = parse_strategy("--strategies", name)?;
        let shown = s.to_string();
        if !strategies.iter().any(|(n, _)| *n == shown) {
            strategies.push((shown, s));
        }
    }
    let chosen: Vec<Strategy> = strategies.iter().map(|(_, s)| *s).collect();
    check_memory(&cfg, batch, seq, args.spheres, &threads, &chosen, args.warmup + args.steps)?;
    Ok(Plan { name: args.config.clone(), cfg, batch, seq, threads, strategies })
}

/// The inputs and targets of every step of a cell: the same for every cell, so the cells do
/// the same arithmetic and their final losses must agree (training is deterministic).
pub(crate) fn batches(batch: usize, seq: usize, n: usize) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
    let corpus = Corpus::tiny_shakespeare();
    let data: &[u8] = &corpus.bytes;
    if data.len() <= seq + 1 {
        crate::bail!("the built-in corpus is shorter than one sequence of {seq}");
    }
    let mut sampler = BatchSampler::new(SEED, data.len(), seq);
    Ok((0..n)
        .map(|_| {
            let (mut x, mut y) = (Vec::new(), Vec::new());
            sampler.next_batch(data, batch, seq, &mut x, &mut y);
            (x, y)
        })
        .collect())
}

/// The trainer's settings for one cell.
pub(crate) fn trainer_options(strategy: Strategy, threads: usize, spheres: Option<usize>) -> TrainerOptions {
    let mut o = TrainerOptions { threads, strategy, ..TrainerOptions::default() };
    if let Some(s) = spheres {
        o.spheres = s;
    }
    o
}

/// Seconds each phase took in one step, averaged over the workers, and the lock
/// acquisitions of all workers together.
#[derive(Clone, Copy, Debug, Default)]
pub struct PhaseTimes {
    pub compute: f64,
    pub merge: f64,
    pub barrier: f64,
    pub lock_wait: f64,
    pub reduce: f64,
    pub optimizer: f64,
    pub lock_acquisitions: f64,
}

impl PhaseTimes {
    /// Reads the trainer's per-worker timings (the rayon strategy reports one entry holding
    /// its phase wall times, which averages to the same thing).
    pub fn of(r: &StepReport) -> Self {
        let w = &r.timings.workers;
        let n = w.len().max(1) as f64;
        let avg = |f: fn(&WorkerTiming) -> Duration| w.iter().map(|x| f(x).as_secs_f64()).sum::<f64>() / n;
        PhaseTimes {
            compute: avg(|x| x.compute),
            merge: avg(|x| x.merge),
            barrier: avg(|x| x.barrier_wait),
            lock_wait: avg(|x| x.lock_wait),
            reduce: avg(|x| x.reduce),
            optimizer: avg(|x| x.optimizer),
            lock_acquisitions: w.iter().map(|x| f64::from(x.lock_acquisitions)).sum(),
        }
    }

    fn add(&mut self, o: &PhaseTimes) {
        self.compute += o.compute;
        self.merge += o.merge;
        self.barrier += o.barrier;
        self.lock_wait += o.lock_wait;
        self.reduce += o.reduce;
        self.optimizer += o.optimizer;
        self.lock_acquisitions += o.lock_acquisitions;
    }
}

/// Raw measurements of one cell.
struct Measured {
    step_s: Vec<f64>,
    wall_s: f64,
    cpu_s: f64,
    phases: PhaseTimes,
    final_loss: f32,
    max_rss_mb: f64,
    background_cores: f64,
}

fn measure_cell(
    model: &Model,
    plan: &Plan,
    strategy: Strategy,
    threads: usize,
    args: &BenchArgs,
    data: &[(Vec<u32>, Vec<u32>)],
) -> Result<Measured> {
    let opts = trainer_options(strategy, threads, args.spheres);
    // The previous cell's trainer is gone: its peak must not count for this one.
    let per_cell_peak = machine::reset_peak_rss();
    let mut trainer = Trainer::new(model.clone(), plan.batch, plan.seq, opts)?;
    for (x, y) in &data[..args.warmup] {
        trainer.step(x, y, LR)?;
    }
    let mut step_s = Vec::with_capacity(args.steps);
    let mut phases = PhaseTimes::default();
    let mut final_loss = f32::NAN;
    let sys0 = SystemCpu::now();
    let u0 = Usage::now();
    let t0 = Instant::now();
    for (x, y) in &data[args.warmup..] {
        let s0 = Instant::now();
        let r = trainer.step(x, y, LR)?;
        step_s.push(s0.elapsed().as_secs_f64());
        phases.add(&PhaseTimes::of(&r));
        final_loss = r.loss;
    }
    let wall_s = t0.elapsed().as_secs_f64();
    let u1 = Usage::now();
    let cpu_s = u1.cpu_s - u0.cpu_s;
    let background_cores = match (sys0, SystemCpu::now()) {
        (Some(a), Some(b)) => a.background_cores(&b, cpu_s, wall_s),
        _ => 0.0,
    };
    let max_rss_mb = if per_cell_peak { machine::peak_rss_mb().unwrap_or(u1.max_rss_mb) } else { u1.max_rss_mb };
    Ok(Measured { step_s, wall_s, cpu_s, phases, final_loss, max_rss_mb, background_cores })
}

pub(crate) fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => v[n / 2],
        _ => 0.5 * (v[n / 2 - 1] + v[n / 2]),
    }
}

/// One cell of the report from its measurements: `base_ms` is the strategy's median step time
/// at 1 thread, `usable` the cores the threads can use, `ceil` the machine's ceiling at this
/// thread count, `tokens` the tokens of a step.
fn to_cell(name: &str, threads: usize, m: &Measured, base_ms: f64, usable: f64, ceil: f64, tokens: f64) -> Cell {
    let steps = m.step_s.len() as f64;
    let med_ms = median(&m.step_s) * 1e3;
    let speedup = base_ms / med_ms;
    let step_mean_s = m.wall_s / steps;
    let frac = |x: f64| x / steps / step_mean_s;
    let p = &m.phases;
    let known =
        frac(p.compute) + frac(p.merge) + frac(p.barrier) + frac(p.lock_wait) + frac(p.reduce) + frac(p.optimizer);
    Cell {
        strategy: name.to_string(),
        threads,
        median_step_ms: med_ms,
        min_step_ms: m.step_s.iter().copied().fold(f64::INFINITY, f64::min) * 1e3,
        max_step_ms: m.step_s.iter().copied().fold(0.0, f64::max) * 1e3,
        tokens_per_s: tokens / (med_ms / 1e3),
        speedup,
        efficiency: speedup / usable,
        cpu_utilization: m.cpu_s / (m.wall_s * usable),
        ceiling_speedup: ceil,
        speedup_vs_ceiling: speedup / ceil,
        compute_frac: frac(p.compute),
        merge_frac: frac(p.merge),
        barrier_frac: frac(p.barrier),
        lock_wait_frac: frac(p.lock_wait),
        reduce_frac: frac(p.reduce),
        optimizer_frac: frac(p.optimizer),
        other_frac: (1.0 - known).max(0.0),
        lock_acquisitions_per_step: p.lock_acquisitions / steps,
        lock_wait_ms_per_step: p.lock_wait / steps * 1e3,
        peak_rss_mb: m.max_rss_mb,
        background_cores: m.background_cores,
        final_loss: m.final_loss,
    }
}

/// Runs the whole matrix and returns the report without writing it.
pub fn measure(args: &BenchArgs) -> Result<Report> {
    let plan = plan(args)?;
    let machine = Machine::detect();
    let cores = machine.logical_cores;
    let say = |msg: String| {
        if !args.quiet {
            eprintln!("[bench] {msg}");
        }
    };
    say(format!(
        "{}: batch {} x {} tokens, threads {:?}, strategies {}, {} cores",
        plan.name,
        plan.batch,
        plan.seq,
        plan.threads,
        plan.strategies.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(","),
        cores
    ));
    let ceiling = measure_ceiling(&plan.cfg, &plan.threads, Duration::from_millis(args.ceiling_ms.max(1)));
    say(format!(
        "machine ceiling: {}",
        ceiling.ratios.iter().map(|(t, r)| format!("{t}: {r:.2}x")).collect::<Vec<_>>().join(", ")
    ));

    let load_before = load_average();
    let model = Model::new(plan.cfg, SEED);
    let data = batches(plan.batch, plan.seq, args.warmup + args.steps)?;
    let tokens = (plan.batch * plan.seq) as f64;
    let mut cells = Vec::new();
    for (name, strategy) in &plan.strategies {
        let mut base_ms = f64::NAN;
        for &threads in &plan.threads {
            let m = measure_cell(&model, &plan, *strategy, threads, args, &data)
                .map_err(|e| e.context(format!("{name} x{threads}")))?;
            if threads == 1 {
                base_ms = median(&m.step_s) * 1e3;
            }
            let usable = threads.min(cores) as f64;
            let ceil = ceiling.ratio(threads).unwrap_or(usable);
            let cell = to_cell(name, threads, &m, base_ms, usable, ceil, tokens);
            let (med_ms, speedup) = (cell.median_step_ms, cell.speedup);
            say(format!(
                "{name} x{threads}: {med_ms:.2} ms/step, {:.0} tok/s, {speedup:.2}x (ceiling {ceil:.2}x), cpu {:.0}%, \
                 compute {:.0}% barrier {:.0}% lock {:.0}% reduce {:.0}% optim {:.0}%, other processes {:.1} cores",
                cell.tokens_per_s,
                100.0 * cell.cpu_utilization,
                100.0 * cell.compute_frac,
                100.0 * cell.barrier_frac,
                100.0 * cell.lock_wait_frac,
                100.0 * cell.reduce_frac,
                100.0 * cell.optimizer_frac,
                cell.background_cores,
            ));
            cells.push(cell);
        }
    }

    let c = &plan.cfg;
    Ok(Report {
        machine,
        config: plan.name.clone(),
        model: ModelInfo {
            vocab: c.vocab,
            layers: c.layers,
            heads: c.heads,
            embed: c.embed,
            context: c.context,
            params: c.num_params(),
            batch: plan.batch,
            seq: plan.seq,
            tokens_per_step: plan.batch * plan.seq,
        },
        steps: args.steps,
        warmup: args.warmup,
        load_average_before: load_before,
        load_average_after: load_average(),
        ceiling: ceiling.ratios.iter().map(|&(t, r)| (t.to_string(), serde_json::json!(r))).collect(),
        ceiling_gemm: ceiling,
        cells,
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    })
}

/// Checks the options without measuring anything (for the CLI to tell usage errors, exit
/// code 2, from failures while measuring).
pub fn check_bench_args(args: &BenchArgs) -> Result<()> {
    plan(args).map(|_| ())
}

/// The directory a bench run writes to: `--out`, or the first free `runs/bench-NNN`.
pub fn bench_out(args: &BenchArgs) -> Result<PathBuf> {
    match &args.out {
        Some(dir) => Ok(dir.clone()),
        None => crate::cli::next_numbered(std::path::Path::new(crate::cli::train::RUNS_DIR), "bench", ""),
    }
}

/// `cllm bench`: measures the matrix and writes the report into [`bench_out`] (chosen after
/// measuring, so two runs started together still get a directory each).
pub fn run_bench(args: &BenchArgs) -> Result<()> {
    if let Some(kind) = args.distributed {
        return distributed::run(args, crate::dist::init(kind)?);
    }
    let report = measure(args)?;
    let dir = bench_out(args)?;
    report::write_all(&dir, &report)?;
    if args.json {
        let text = report::to_json(&report)?;
        let mut out = std::io::stdout().lock();
        std::io::Write::write_all(&mut out, text.as_bytes()).map_err(|e| crate::err!("cannot write to stdout: {e}"))?;
    }
    if !args.quiet {
        let [j, m, s] = report::paths(&dir);
        eprintln!("[bench] wrote {}, {}, {}", j.display(), m.display(), s.display());
    }
    Ok(())
}
