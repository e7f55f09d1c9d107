//! `cllm train`: arguments, their validation and resolution against a resumed checkpoint, the
//! `--dry-run` plan, and the final summary. The loop itself is [`crate::train::run`].

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use clap::Args;
use serde::Serialize;

use super::{default_threads, usage, write_stdout, CliResult, Failure};
use crate::checkpoint::{self, Checkpoint, RunOptions, STATE_FILE};
use crate::config::{ModelConfig, PRESETS};
use crate::data::{load_corpus, Corpus, DataFormat, DEFAULT_VAL_FRACTION, TINY_SHAKESPEARE_NAME};
use crate::generate::{generate, SampleOptions};
use crate::train::run::{self as runner, LrSchedule, Progress, RunSpec, RunSummary};

/// Default total steps: about three minutes of the `small` config on two cores (~80 ms a step
/// with 2 threads, plus periodic validation and checkpoints).
pub const DEFAULT_STEPS: u64 = 2000;
/// Default peak learning rate. Measured on the default run (small, 1000 steps, batch 8): validation
/// loss 1.90 nats at 3e-3 against 2.10 at 1e-3, with visibly more real words in the sample.
pub const DEFAULT_LR: f64 = 3e-3;
/// Default seed (model initialisation and batch sampling).
pub const DEFAULT_SEED: u64 = 1337;
/// Default global gradient-norm clip (the contract; 0 disables).
pub const DEFAULT_CLIP_NORM: f32 = 10.0;
/// Validation windows evaluated each time (fixed, so losses are comparable across a run).
pub const DEFAULT_EVAL_WINDOWS: usize = 32;
/// Bytes in the sample printed after training.
pub const SAMPLE_BYTES: usize = 300;
pub use crate::train::MAX_THREADS;
/// Where runs go when --out is not given: a fresh numbered directory per run.
pub const RUNS_DIR: &str = "runs";

/// Train a model and save checkpoints.
///
/// With no flags: the `small` model on built-in tiny Shakespeare, about three minutes on two
/// cores, checkpoints in a new runs/run-NNN directory, then a generated sample.
///
/// Runs are deterministic: the same flags give bit-identical weights at any --threads, and an
/// interrupted run continued with --resume ends exactly where an uninterrupted one would.
#[derive(Debug, Args, Default)]
pub struct TrainArgs {
    /// Training data: a text file (any bytes) or SQuAD JSON. Default: built-in tiny Shakespeare.
    #[arg(long, value_name = "FILE", help_heading = "Data")]
    pub data: Option<PathBuf>,
    /// How to read --data: auto (SQuAD if the file is SQuAD-shaped JSON, else text), text, squad.
    #[arg(long, value_name = "FORMAT", help_heading = "Data")]
    pub format: Option<String>,
    /// Fraction of the data (its tail) held out for validation; 0 for none. [default: 0.1]
    #[arg(long, value_name = "F", help_heading = "Data")]
    pub val_fraction: Option<f64>,

    /// Model preset: tiny (tests), small (default), seed (benchmarks).
    #[arg(long, value_name = "NAME", help_heading = "Model")]
    pub config: Option<String>,
    /// Training sequence length, at most the model's context. [default: the model's context]
    #[arg(long, value_name = "T", help_heading = "Model")]
    pub context: Option<usize>,

    /// Total optimizer steps of the run (a resumed run continues up to this). [default: 1000]
    #[arg(long, value_name = "N", help_heading = "Optimization")]
    pub steps: Option<u64>,
    /// Sequences per step. [default: the preset's, 8 for small]
    #[arg(long, value_name = "B", help_heading = "Optimization")]
    pub batch: Option<usize>,
    /// Peak learning rate (AdamW). [default: 0.003]
    #[arg(long, value_name = "LR", help_heading = "Optimization")]
    pub lr: Option<f64>,
    /// Learning-rate schedule after warmup: constant, or cosine decay to lr/10 at the last step.
    /// [default: cosine]
    #[arg(long, value_name = "SCHEDULE", value_enum, help_heading = "Optimization")]
    pub lr_schedule: Option<LrSchedule>,
    /// Steps of linear warmup from 0 to --lr. [default: steps/10, at most 100]
    #[arg(long, value_name = "N", help_heading = "Optimization")]
    pub warmup_steps: Option<u64>,
    /// Clip the gradient to this global norm (0: no clipping). [default: 1.0]
    #[arg(long, value_name = "X", help_heading = "Optimization")]
    pub clip_norm: Option<f32>,
    /// Where the gradient is clipped: global (the averaged gradient) or per-sphere (each
    /// microbatch's gradient before they are combined). [default: global]
    #[arg(long, value_name = "MODE", help_heading = "Optimization")]
    pub clip_mode: Option<String>,
    /// Seed of the model initialisation and of batch sampling. [default: 1337]
    #[arg(long, value_name = "S", help_heading = "Optimization")]
    pub seed: Option<u64>,

    /// Worker threads. Results do not depend on it. [default: number of cores]
    #[arg(long, value_name = "N", help_heading = "Parallelism")]
    pub threads: Option<usize>,
    /// Spheres: the batch is split into this many equal microbatches whose gradients are
    /// combined in a fixed order. Must divide --batch. [default: min(8, batch), or the largest divisor of
    /// the batch below it]
    #[arg(long, value_name = "N", help_heading = "Parallelism")]
    pub spheres: Option<usize>,
    /// How workers combine gradients: segmented (lock-free, bit-deterministic at any thread
    /// count), model-lock, gradient-lock (mutexes; deterministic only with 1 thread) or rayon.
    /// [default: segmented]
    #[arg(long, value_name = "NAME", help_heading = "Parallelism")]
    pub strategy: Option<String>,

    /// Run directory receiving step-NNNNNN checkpoints. [default: a new runs/run-NNN, or the
    /// resumed run's directory]
    #[arg(long, value_name = "DIR", help_heading = "Checkpoints")]
    pub out: Option<PathBuf>,
    /// Also save a checkpoint every N steps (0: only at the end). [default: 200]
    #[arg(long, value_name = "N", help_heading = "Checkpoints")]
    pub save_every: Option<u64>,
    /// Keep only the newest K checkpoints (0: keep all). [default: 3]
    #[arg(long, value_name = "K", help_heading = "Checkpoints")]
    pub keep: Option<usize>,
    /// Continue from a checkpoint: a step-NNNNNN directory, or a run directory (its newest).
    /// Model, data and optimization settings come from it; flags that contradict it are errors.
    #[arg(long, value_name = "DIR", help_heading = "Checkpoints")]
    pub resume: Option<PathBuf>,

    /// Compute the validation loss every N steps (0: only at the end). [default: 100]
    #[arg(long, value_name = "N", help_heading = "Output")]
    pub eval_every: Option<u64>,
    /// Validation windows per evaluation (the first ones of the validation split). [default: 32]
    #[arg(long, value_name = "N", help_heading = "Output")]
    pub eval_windows: Option<usize>,
    /// Write one JSON object per step to FILE (appended to when resuming).
    #[arg(long, value_name = "FILE", help_heading = "Output")]
    pub metrics: Option<PathBuf>,
    /// Print the final summary as one JSON object on stdout (no sample).
    #[arg(long, help_heading = "Output")]
    pub json: bool,
    /// Print only the final summary and errors.
    #[arg(long, help_heading = "Output")]
    pub quiet: bool,
    /// Validate everything and print the plan without training or writing anything.
    #[arg(long, help_heading = "Output")]
    pub dry_run: bool,

    /// Fault injection for testing: poison microbatch MICROBATCH's gradient with NaN at step
    /// STEP, e.g. 3:0. Repeatable.
    #[arg(long, value_name = "STEP:MICROBATCH", help_heading = "Testing")]
    pub inject_nan: Vec<String>,
}

/// Everything a run needs, resolved and validated, plus what `--dry-run` prints.
struct Plan {
    spec: RunSpec,
    /// The run directory is created only when training starts.
    out_is_new: bool,
}

pub fn run(args: TrainArgs) -> CliResult {
    let plan = resolve(&args)?;
    if args.dry_run {
        return print_plan(&plan, args.json);
    }
    if plan.out_is_new {
        std::fs::create_dir_all(&plan.spec.out)
            .map_err(|e| crate::err!("cannot create {}: {e}", plan.spec.out.display()))?;
    }
    let summary = runner::train(&plan.spec)?;
    print_summary(&plan, &summary, &args)
}

/// Resolves every option: a flag given on the command line, else the resumed checkpoint's
/// value, else the default; and checks they make sense together.
fn resolve(args: &TrainArgs) -> CliResult<Plan> {
    // Numbers that are wrong whatever else is given: checked before touching any file.
    if let Some(t) = args.threads {
        if !(1..=MAX_THREADS).contains(&t) {
            usage!("--threads must be between 1 and {MAX_THREADS}, got {t}");
        }
    }
    if args.steps == Some(0) {
        usage!("--steps must be at least 1");
    }
    if args.batch == Some(0) {
        usage!("--batch must be at least 1");
    }
    if args.spheres == Some(0) {
        usage!("--spheres must be at least 1");
    }
    if args.context == Some(0) {
        usage!("--context must be at least 1");
    }
    if args.eval_windows == Some(0) {
        usage!("--eval-windows must be at least 1");
    }
    if let Some(lr) = args.lr {
        if !lr.is_finite() || lr <= 0.0 {
            usage!("--lr must be a positive number, got {lr}");
        }
    }
    if let Some(c) = args.clip_norm {
        if !c.is_finite() || c < 0.0 {
            usage!("--clip-norm must be a number >= 0 (0 disables clipping), got {c}");
        }
    }
    if let Some(f) = args.val_fraction {
        if !(0.0..1.0).contains(&f) {
            usage!("--val-fraction must be in [0, 1), got {f}");
        }
    }
    if let Some(name) = &args.config {
        if ModelConfig::preset(name).is_none() {
            usage!("unknown --config {name:?} (expected one of: {})", PRESETS.join(", "));
        }
    }
    let format: Option<DataFormat> = match &args.format {
        Some(f) => Some(f.parse().map_err(|e: crate::Error| Failure::usage(format!("--format: {e}")))?),
        None => None,
    };
    if let Some(s) = &args.strategy {
        runner::parse_strategy(s).map_err(|e| Failure::usage(format!("--strategy: {e}")))?;
    }
    if let Some(m) = &args.clip_mode {
        runner::parse_clip_mode(m).map_err(|e| Failure::usage(format!("--clip-mode: {e}")))?;
    }
    let mut inject_nan = Vec::new();
    for s in &args.inject_nan {
        inject_nan.push(parse_inject(s)?);
    }

    let resumed: Option<Checkpoint> = match &args.resume {
        Some(p) => Some(checkpoint::load(p)?),
        None => None,
    };
    let prev = resumed.as_ref().map(|c| &c.state.options);
    let state_file = resumed.as_ref().map(|c| c.dir.join(STATE_FILE).display().to_string()).unwrap_or_default();

    // Settings that fix the math of the run must agree with a resumed checkpoint.
    macro_rules! pick {
        ($flag:literal, $arg:expr, $field:ident, $default:expr) => {
            match (&$arg, prev) {
                (Some(v), Some(p)) if *v != p.$field => usage!(
                    "{} {} contradicts the checkpoint's {} ({state_file}); drop the flag to resume, or start a new run",
                    $flag,
                    v,
                    p.$field
                ),
                (Some(v), _) => v.clone(),
                (None, Some(p)) => p.$field.clone(),
                (None, None) => $default,
            }
        };
    }
    let config_name: String = pick!("--config", args.config, config_name, "small".to_string());
    let model_config = ModelConfig::preset(&config_name)
        .ok_or_else(|| Failure::from(crate::err!("{state_file}: unknown model config {config_name:?}")))?;
    if let Some(c) = &resumed {
        if c.model.config != model_config {
            usage!("{state_file}: the checkpoint's model {:?} is not the preset {config_name:?}", c.model.config);
        }
    }
    let context: usize = pick!("--context", args.context, context, model_config.context);
    if context > model_config.context {
        usage!("--context {context} is longer than the {config_name} model's context of {}", model_config.context);
    }
    let batch: usize = pick!("--batch", args.batch, batch, ModelConfig::preset_batch(&config_name).unwrap_or(8));
    // min(8, batch) when that divides the batch, else the largest divisor below it, so a default
    // can never make a batch size invalid.
    let default_spheres = (1..=batch.min(8)).rev().find(|s| batch.is_multiple_of(*s)).unwrap_or(1);
    let spheres: usize = pick!("--spheres", args.spheres, spheres, default_spheres);
    if spheres > batch || !batch.is_multiple_of(spheres) {
        usage!(
            "--batch {batch} is not divisible by --spheres {spheres} (each sphere takes an equal share of the batch)"
        );
    }
    let seed: u64 = pick!("--seed", args.seed, seed, DEFAULT_SEED);
    let lr: f64 = pick!("--lr", args.lr, lr, DEFAULT_LR);
    let schedule_arg = args.lr_schedule.map(|s| s.as_str().to_string());
    let lr_schedule: String =
        pick!("--lr-schedule", schedule_arg, lr_schedule, LrSchedule::Cosine.as_str().to_string());
    let clip_norm: f32 = pick!("--clip-norm", args.clip_norm, clip_norm, DEFAULT_CLIP_NORM);
    let clip_mode: String = pick!("--clip-mode", args.clip_mode, clip_mode, runner::default_clip_mode().to_string());
    let val_fraction: f64 = pick!("--val-fraction", args.val_fraction, val_fraction, DEFAULT_VAL_FRACTION);
    // The total may grow on resume (training further); the schedule then follows the new total.
    let steps: u64 = args.steps.or(prev.map(|p| p.steps)).unwrap_or(DEFAULT_STEPS);
    let warmup_default = (steps / 10).min(100);
    let warmup_steps: u64 = pick!("--warmup-steps", args.warmup_steps, warmup_steps, warmup_default);
    if warmup_steps > steps {
        usage!("--warmup-steps {warmup_steps} exceeds --steps {steps}");
    }
    let min_lr_ratio = prev.map(|p| p.min_lr_ratio).unwrap_or(runner::MIN_LR_RATIO);
    // Free to change between resumes: they do not change what is computed.
    let threads = args.threads.unwrap_or_else(|| default_threads().min(MAX_THREADS));
    let strategy = match &args.strategy {
        Some(s) => s.clone(),
        None => prev.map(|p| p.strategy.clone()).unwrap_or_else(|| runner::default_strategy().to_string()),
    };
    let eval_every = args.eval_every.or(prev.map(|p| p.eval_every)).unwrap_or(100);
    let eval_windows = args.eval_windows.or(prev.map(|p| p.eval_windows)).unwrap_or(DEFAULT_EVAL_WINDOWS);
    let save_every = args.save_every.or(prev.map(|p| p.save_every)).unwrap_or(200);
    let keep = args.keep.or(prev.map(|p| p.keep)).unwrap_or(3);

    if let Some(c) = &resumed {
        if c.state.step >= steps {
            usage!(
                "{} is already at step {} of {steps}: nothing to do (pass a larger --steps to train further)",
                c.dir.display(),
                c.state.step
            );
        }
        runner::check_adam_state(c).map_err(Failure::from)?;
    }
    for &(step, micro) in &inject_nan {
        if micro >= spheres {
            usage!("--inject-nan {step}:{micro}: microbatch {micro} does not exist (there are {spheres} spheres, 0..{spheres})");
        }
    }

    // Data: the flag, else the data the checkpoint was trained on, read the same way; a resumed
    // run must see the same bytes, or its batches would silently differ.
    let data_path: Option<PathBuf> = match (&args.data, &resumed) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(c)) if c.state.data.name != TINY_SHAKESPEARE_NAME => {
            Some(PathBuf::from(c.state.data.path.as_deref().unwrap_or(&c.state.data.name)))
        }
        _ => None,
    };
    let format = match (format, &resumed) {
        (Some(f), _) => Some(f),
        (None, Some(c)) if args.data.is_none() => c.state.data.format.parse().ok(),
        _ => None,
    };
    let corpus: Corpus = load_corpus(data_path.as_deref(), format.unwrap_or_default())?;
    if let Some(c) = &resumed {
        if corpus.hash != c.state.data.sha256 {
            return Err(Failure::from(crate::err!(
                "{}: the data differs from what the checkpoint was trained on ({state_file} records {} bytes with \
                 sha256 {}, this data has {} bytes with sha256 {})",
                corpus.name,
                c.state.data.bytes,
                c.state.data.sha256,
                corpus.len(),
                corpus.hash
            )));
        }
    }
    corpus.split(val_fraction, context)?;

    let (out, out_is_new) = match (&args.out, &resumed) {
        (Some(o), _) => (o.clone(), !o.exists()),
        (None, Some(c)) => (c.dir.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from(".")), false),
        (None, None) => (next_run_dir(Path::new(RUNS_DIR))?, true),
    };
    if out.exists() && !out.is_dir() {
        usage!("--out {}: exists and is not a directory", out.display());
    }
    if let Some(c) = &resumed {
        // Later checkpoints of another history in the same directory would be overwritten,
        // interleaved with this run's, or pruned in its place.
        if let Some((_, newer)) = checkpoint::list(&out)?.into_iter().find(|(step, _)| *step > c.state.step) {
            usage!(
                "--out {} already holds {}, newer than the resumed step {}; resume into another --out",
                out.display(),
                newer.display(),
                c.state.step
            );
        }
        if !args.quiet && args.steps.is_some_and(|n| n != c.state.options.steps) {
            eprintln!(
                "note: --steps {steps} differs from the checkpoint's total of {}; the learning-rate schedule follows the \
                 new total from here on",
                c.state.options.steps
            );
        }
    }
    if resumed.is_none() {
        if let Some((_, newest)) = checkpoint::list(&out)?.pop() {
            usage!(
                "--out {} already holds checkpoints (newest {}); pass --resume {} to continue that run, or choose \
                 another --out",
                out.display(),
                newest.display(),
                out.display()
            );
        }
    }

    if let Some(m) = &args.metrics {
        // Checked before the run directory is created, so a typo leaves nothing behind.
        let parent = m.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        if m.is_dir() || !parent.is_dir() {
            return Err(Failure::from(crate::err!(
                "--metrics {}: {}",
                m.display(),
                if m.is_dir() { "is a directory" } else { "its directory does not exist" }
            )));
        }
    }
    let progress = if args.quiet {
        Progress::Silent
    } else if std::io::stderr().is_terminal() {
        Progress::Bar
    } else {
        Progress::Lines
    };
    let options = RunOptions {
        config_name,
        context,
        batch,
        steps,
        lr,
        lr_schedule,
        warmup_steps,
        min_lr_ratio,
        seed,
        threads,
        spheres,
        strategy,
        clip_norm,
        clip_mode,
        val_fraction,
        eval_every,
        eval_windows,
        save_every,
        keep,
    };
    let spec = RunSpec {
        model_config,
        options,
        data_path: data_path.map(|p| std::fs::canonicalize(&p).unwrap_or(p)),
        corpus,
        out,
        resume: resumed,
        metrics: args.metrics.clone(),
        inject_nan,
        progress,
        command_line: std::env::args().collect(),
    };
    Ok(Plan { spec, out_is_new })
}

/// `STEP:MICROBATCH`, both whole numbers, the step counted from 1.
fn parse_inject(s: &str) -> CliResult<(u64, usize)> {
    let bad = || Failure::usage(format!("--inject-nan {s:?}: expected STEP:MICROBATCH, e.g. 3:0"));
    let (a, b) = s.split_once(':').ok_or_else(bad)?;
    let step: u64 = a.trim().parse().map_err(|_| bad())?;
    let micro: usize = b.trim().parse().map_err(|_| bad())?;
    if step == 0 {
        usage!("--inject-nan {s:?}: steps are counted from 1");
    }
    Ok((step, micro))
}

/// The first free `runs/run-NNN` (not created here: a dry run must not write anything).
fn next_run_dir(root: &Path) -> CliResult<PathBuf> {
    for i in 1..100_000u32 {
        let p = root.join(format!("run-{i:03}"));
        if !p.exists() {
            return Ok(p);
        }
    }
    usage!("{}: no free run-NNN name; pass --out", root.display())
}

fn print_plan(plan: &Plan, json: bool) -> CliResult {
    let s = &plan.spec;
    let o = &s.options;
    let (train, val) = s.corpus.split(o.val_fraction, o.context)?;
    let params = s.model_config.num_params();
    let tokens_per_step = o.batch * o.context;
    let start = s.resume.as_ref().map(|c| c.state.step).unwrap_or(0);
    if json {
        let obj = serde_json::json!({
            "config": o.config_name,
            "model": s.model_config,
            "params": params,
            "context": o.context,
            "batch": o.batch,
            "spheres": o.spheres,
            "threads": o.threads,
            "strategy": o.strategy,
            "tokens_per_step": tokens_per_step,
            "start_step": start,
            "steps": o.steps,
            "lr": o.lr,
            "lr_schedule": o.lr_schedule,
            "warmup_steps": o.warmup_steps,
            "seed": o.seed,
            "data": s.corpus.name,
            "data_format": s.corpus.format.as_str(),
            "data_bytes": s.corpus.len(),
            "train_bytes": train.len(),
            "val_bytes": val.len(),
            "out": s.out.display().to_string(),
            "resume": s.resume.as_ref().map(|c| c.dir.display().to_string()),
        });
        return write_stdout(format!("{obj}\n").as_bytes());
    }
    let c = &s.model_config;
    let mut text = String::new();
    text.push_str("dry run: nothing trained, nothing written\n");
    text.push_str(&format!(
        "model     {} (layers {}, heads {}, embed {}, context {}), {} parameters\n",
        o.config_name, c.layers, c.heads, c.embed, c.context, params
    ));
    text.push_str(&format!(
        "data      {} ({}), {} bytes: {} train, {} validation\n",
        s.corpus.name,
        s.corpus.format,
        s.corpus.len(),
        train.len(),
        val.len()
    ));
    text.push_str(&format!(
        "batch     {} x {} = {} tokens/step, {} spheres, {} threads, strategy {}\n",
        o.batch, o.context, tokens_per_step, o.spheres, o.threads, o.strategy
    ));
    text.push_str(&format!(
        "schedule  steps {}..={} of {}, lr {} {} with {} warmup steps, clip {} ({}), seed {}\n",
        start + 1,
        o.steps,
        o.steps,
        o.lr,
        o.lr_schedule,
        o.warmup_steps,
        o.clip_norm,
        o.clip_mode,
        o.seed
    ));
    text.push_str(&format!(
        "output    {} (save every {}, keep {}), validation every {} steps on {} windows\n",
        s.out.display(),
        o.save_every,
        o.keep,
        o.eval_every,
        o.eval_windows
    ));
    if let Some(r) = &s.resume {
        text.push_str(&format!("resume    from {} (step {})\n", r.dir.display(), r.state.step));
    }
    write_stdout(text.as_bytes())
}

/// `train --json` output, keys in this order.
#[derive(Serialize)]
struct SummaryJson {
    steps: u64,
    steps_run: u64,
    final_loss: Option<f32>,
    val_loss: Option<f64>,
    val_bits_per_byte: Option<f64>,
    tokens_per_s: f64,
    elapsed_s: f64,
    skipped_updates: u64,
    checkpoint: String,
}

fn print_summary(plan: &Plan, sum: &RunSummary, args: &TrainArgs) -> CliResult {
    let o = &plan.spec.options;
    if args.json {
        let obj = SummaryJson {
            steps: sum.last_step,
            steps_run: sum.steps_run,
            final_loss: sum.final_loss,
            val_loss: sum.val_loss,
            val_bits_per_byte: sum.val_loss.map(|l| l / std::f64::consts::LN_2),
            tokens_per_s: sum.tokens_per_s,
            elapsed_s: sum.elapsed_s,
            skipped_updates: sum.skipped_updates,
            checkpoint: sum.checkpoint.display().to_string(),
        };
        let obj = serde_json::to_string(&obj).map_err(crate::Error::from)?;
        return write_stdout(format!("{obj}\n").as_bytes());
    }
    let val = match sum.val_loss {
        Some(v) => format!(", val loss {v:.4} ({:.3} bits/byte)", v / std::f64::consts::LN_2),
        None => String::new(),
    };
    let loss = sum.final_loss.map(|l| format!("{l:.4}")).unwrap_or_else(|| "n/a".into());
    let mut text = format!(
        "trained to step {} ({} steps in {:.1}s): loss {loss}{val}, {:.0} tokens/s\ncheckpoint: {}\n",
        sum.last_step,
        sum.steps_run,
        sum.elapsed_s,
        sum.tokens_per_s,
        sum.checkpoint.display()
    );
    if sum.skipped_updates > 0 {
        text.push_str(&format!("note: {} updates were skipped for non-finite gradients\n", sum.skipped_updates));
    }
    if args.quiet {
        return write_stdout(text.as_bytes());
    }
    let opts = SampleOptions { tokens: SAMPLE_BYTES, temperature: 0.8, top_k: 0, seed: o.seed };
    text.push_str(&format!(
        "sample ({SAMPLE_BYTES} bytes, temperature {}, seed {}; more with: cllm generate --checkpoint {} --prompt TEXT):\n",
        opts.temperature,
        opts.seed,
        sum.checkpoint.display()
    ));
    write_stdout(text.as_bytes())?;
    let prompt = b"\n";
    let sample = generate(&sum.model, prompt, opts, |_| Ok(()))?;
    let mut bytes = sample;
    bytes.push(b'\n');
    write_stdout(&bytes)
}
