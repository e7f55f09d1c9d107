//! `cllm train`: arguments, their validation and resolution against a resumed checkpoint, the
//! `--dry-run` plan, and the final summary. The loop itself is [`crate::train::run`].
//!
//! Every flag is an `Option`: `None` means "not given", so a resumed run can tell a flag that
//! repeats or contradicts its checkpoint from one left out. The defaults are therefore not
//! clap's; the `[default: …]` of each help line is built from the same constant that
//! `merge_options` uses (mostly [`crate::train::options`]), and `tests/cli_help.rs` compares
//! them with what `--dry-run` reports. What a run prints is in `report`.

mod report;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use clap::Args;

use super::generate::{DEFAULT_TEMPERATURE, DEFAULT_TOP_K};
use super::{default_threads, usage, CliResult, Failure};
use crate::checkpoint::{self, Checkpoint, STATE_FILE};
use crate::config::{ModelConfig, PRESETS};
use crate::data::tokens::{CacheUse, Tokenized, TOKEN_CACHE_FILE};
use crate::data::{load_corpus, Corpus, DataFormat, DEFAULT_VAL_FRACTION, TINY_SHAKESPEARE_NAME};
use crate::dist::{Comm, Distributed, BUILD_WITH_MPI, DEFAULT_CHECK_EVERY};
use crate::generate::SampleOptions;
use crate::memory::{Available, Loaded, MemoryPlan, RunShape};
use crate::model::Model;
use crate::signals::StopRequest;
use crate::tokenizer::{Tokenizer, TOKENIZER_FILE};
use crate::train::options::{
    RunOptions, DEFAULT_CLIP_NORM, DEFAULT_CONFIG, DEFAULT_EVAL_EVERY, DEFAULT_EVAL_WINDOWS, DEFAULT_KEEP, DEFAULT_LR,
    DEFAULT_SAVE_EVERY, DEFAULT_SEED, DEFAULT_STEPS, MAX_BATCH, MAX_DEFAULT_SPHERES, MAX_EVAL_WINDOWS, MAX_STEPS,
    MAX_TOKENS_PER_STEP,
};
use crate::train::progress::Progress;
use crate::train::run::{self as runner, RunSpec, SampleSpec};
use crate::train::schedule::{default_warmup, DEFAULT_WARMUP_DIVISOR, MAX_DEFAULT_WARMUP, MIN_LR_RATIO};
use crate::train::{resolve_spheres, ClipMode, LrSchedule, Strategy};
use std::sync::Arc;

/// Bytes in the sample printed after training.
pub const SAMPLE_BYTES: usize = 300;
/// `--sample-every` when not given: no samples during training.
pub const DEFAULT_SAMPLE_EVERY: u64 = 0;
/// Bytes in each `--sample-every` sample.
pub const TRAIN_SAMPLE_BYTES: usize = 64;
/// More passes than this over the training text draw a warning (a small model starts to learn
/// the text by heart; the default run makes about two).
pub const MAX_QUIET_EPOCHS: f64 = 5.0;
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
    #[arg(long, value_name = "FILE", help_heading = "Data", help = format!(
        "Training data: a text file (any bytes) or SQuAD JSON. [default: {TINY_SHAKESPEARE_NAME}]"
    ))]
    pub data: Option<PathBuf>,
    #[arg(long, value_name = "FORMAT", value_enum, ignore_case = true, help_heading = "Data", help = format!(
        "How to read --data. [default: {}]", DataFormat::default()
    ))]
    pub format: Option<DataFormat>,
    #[arg(long, value_name = "F", allow_negative_numbers = true, help_heading = "Data", help = format!(
        "Fraction of the data (its tail) held out for validation; 0 for none. [default: {DEFAULT_VAL_FRACTION}]"
    ))]
    pub val_fraction: Option<f64>,
    /// A Hugging Face tokenizer.json: the data is tokenized with it (once, cached as tokens.bin
    /// in the run directory), the model's vocabulary is its size unless given, and every
    /// checkpoint holds it. A resumed run uses its checkpoint's. Without it: byte-level, no file.
    #[arg(long, value_name = "FILE", help_heading = "Data")]
    pub tokenizer: Option<PathBuf>,

    #[arg(long, value_name = "NAME", help_heading = "Model", help = format!(
        "Model preset: tiny (tests), small, seed (benchmarks), gpt2 (GPT-2 124M), gpt2-medium (355M). \
         [default: {DEFAULT_CONFIG}]"
    ))]
    pub config: Option<String>,
    /// Training sequence length, at most the model's context. [default: the model's context]
    #[arg(long, value_name = "T", help_heading = "Model")]
    pub context: Option<usize>,
    #[command(flatten)]
    pub shape: super::shape::ShapeArgs,

    #[arg(long, value_name = "N", help_heading = "Optimization", help = format!(
        "Total optimizer steps of the run (a resumed run continues up to this). [default: {DEFAULT_STEPS}]"
    ))]
    pub steps: Option<u64>,
    #[arg(long, value_name = "B", help_heading = "Optimization", help = format!(
        "Sequences per step. [default: the preset's, {} for {DEFAULT_CONFIG}]",
        ModelConfig::preset_batch(DEFAULT_CONFIG).unwrap_or_default()
    ))]
    pub batch: Option<usize>,
    #[arg(long, value_name = "LR", allow_negative_numbers = true, help_heading = "Optimization", help = format!(
        "Peak learning rate (AdamW). [default: {DEFAULT_LR}]"
    ))]
    pub lr: Option<f64>,
    #[arg(long, value_name = "SCHEDULE", value_enum, help_heading = "Optimization", help = format!(
        "Learning-rate schedule after warmup (cosine decays to lr/{} at the last step). [default: {}]",
        1.0 / MIN_LR_RATIO,
        LrSchedule::default()
    ))]
    pub lr_schedule: Option<LrSchedule>,
    #[arg(long, value_name = "N", help_heading = "Optimization", help = format!(
        "Steps of linear warmup from 0 to --lr. [default: steps/{DEFAULT_WARMUP_DIVISOR}, at most {MAX_DEFAULT_WARMUP}]"
    ))]
    pub warmup_steps: Option<u64>,
    #[arg(long, value_name = "X", allow_negative_numbers = true, help_heading = "Optimization", help = format!(
        "Clip the gradient to this global norm (0: no clipping). [default: {DEFAULT_CLIP_NORM}]"
    ))]
    pub clip_norm: Option<f32>,
    #[arg(long, value_name = "MODE", value_enum, help_heading = "Optimization", help = format!(
        "Which gradient is clipped to --clip-norm. [default: {}]", ClipMode::default()
    ))]
    pub clip_mode: Option<ClipMode>,
    #[arg(
        long,
        value_name = "WD",
        allow_negative_numbers = true,
        help_heading = "Optimization",
        help = "Decoupled AdamW weight decay of the linear layers' weights (GPT-2 practice: not biases, LayerNorm \
         parameters or, unless --decay-embeddings, the embeddings). [default: 0]"
    )]
    pub weight_decay: Option<f32>,
    /// Dropout probability in [0, 1) on the attention probabilities, the attention's output
    /// projection and the MLP's output, as GPT-2 trains; never in evaluation or sampling. Masks
    /// depend on the seed, step and micro-batch only, so runs stay bit-identical at any --threads.
    #[arg(long, value_name = "P", allow_negative_numbers = true, help_heading = "Optimization")]
    pub dropout: Option<f32>,
    /// Apply --weight-decay to the token and position embeddings too.
    #[arg(long, help_heading = "Optimization")]
    pub decay_embeddings: bool,
    #[arg(long, value_name = "S", help_heading = "Optimization", help = format!(
        "Seed of the model initialisation and of batch sampling. [default: {DEFAULT_SEED}]"
    ))]
    pub seed: Option<u64>,

    #[arg(long, value_name = "N", help_heading = "Parallelism", help = format!(
        "Worker threads. Results do not depend on it. [default: number of cores, at most {MAX_THREADS}]"
    ))]
    pub threads: Option<usize>,
    #[arg(long, value_name = "N", help_heading = "Parallelism", help = format!(
        "Spheres: the batch is split into this many equal microbatches whose gradients are combined in a fixed \
         order. Must divide --batch. [default: the largest divisor of the batch up to {MAX_DEFAULT_SPHERES}]"
    ))]
    pub spheres: Option<usize>,
    #[arg(long, value_name = "NAME", value_enum, help_heading = "Parallelism", help = format!(
        "How workers combine gradients. [default: {}]", Strategy::default()
    ))]
    pub strategy: Option<Strategy>,

    #[arg(long, value_name = "BACKEND", value_enum, help_heading = "Parallelism", help = format!(
        "Run as one rank of a multi-process run: `mpirun -np R cllm train --distributed mpi ...` (needs a cllm \
         built with `{BUILD_WITH_MPI}`; see docs/distributed.md). The weights are those of one process."
    ))]
    pub distributed: Option<Distributed>,
    #[arg(long, value_name = "N", help_heading = "Parallelism", help = format!(
        "With --distributed: the ranks compare a hash of their weights every N steps, and at the start and the \
         end (0: only then); {DEFAULT_CHECK_EVERY} when not given."
    ))]
    pub check_every: Option<u64>,

    #[arg(long, value_name = "DIR", help_heading = "Checkpoints", help = format!(
        "Run directory receiving step-NNNNNN checkpoints. [default: a new {RUNS_DIR}/run-NNN, or the resumed \
         run's directory]"
    ))]
    pub out: Option<PathBuf>,
    #[arg(long, value_name = "N", help_heading = "Checkpoints", help = format!(
        "Also save a checkpoint every N steps (0: only at the end). [default: {DEFAULT_SAVE_EVERY}]"
    ))]
    pub save_every: Option<u64>,
    #[arg(long, value_name = "K", help_heading = "Checkpoints", help = format!(
        "Keep only the newest K checkpoints (0: keep all). [default: {DEFAULT_KEEP}]"
    ))]
    pub keep: Option<usize>,
    /// Continue from a checkpoint: a step-NNNNNN directory, RUN/best, or a run directory (its
    /// newest step-NNNNNN). Model, data and optimization settings come from it; flags that
    /// contradict it are errors.
    #[arg(long, value_name = "DIR", help_heading = "Checkpoints")]
    pub resume: Option<PathBuf>,

    #[arg(long, value_name = "N", help_heading = "Output", help = format!(
        "Compute the validation loss every N steps (0: only at the end). [default: {DEFAULT_EVAL_EVERY}]"
    ))]
    pub eval_every: Option<u64>,
    #[arg(long, value_name = "N", help_heading = "Output", help = format!(
        "Validation windows per periodic evaluation (the first ones of the validation split; the lowest picks \
         the best/ checkpoint). The run ends with one over the whole split. [default: {DEFAULT_EVAL_WINDOWS}]"
    ))]
    pub eval_windows: Option<usize>,
    #[arg(long, value_name = "N", help_heading = "Output", help = format!(
        "Every N steps, print a {TRAIN_SAMPLE_BYTES}-byte sample from a newline prompt (seeded with --seed; \
         also written to --metrics). 0: never. [default: {DEFAULT_SAMPLE_EVERY}]"
    ))]
    pub sample_every: Option<u64>,
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

    /// On SIGINT, SIGTERM or SIGHUP, stop after the current step without writing a final
    /// checkpoint (the last periodic one stays; a second signal always exits at once).
    #[arg(long, help_heading = "Checkpoints")]
    pub no_save_on_interrupt: bool,

    /// Fault injection for testing: poison microbatch MICROBATCH's gradient with NaN at step
    /// STEP, e.g. 3:0. Repeatable.
    #[arg(long, value_name = "STEP:MICROBATCH", help_heading = "Testing")]
    pub inject_nan: Vec<String>,
}

/// Everything a run needs, resolved and validated, plus what `--dry-run` prints.
struct Plan {
    spec: RunSpec,
    /// What the run will allocate (checked against the memory available in [`resolve`]).
    memory: MemoryPlan,
    /// The run directory is created only when training starts.
    out_is_new: bool,
    /// The token cache to write once the run holds its directory (tokenized now, not read).
    write_cache: Option<PathBuf>,
}

pub fn run(args: TrainArgs) -> CliResult {
    let Some(kind) = args.distributed else { return run_as(&args, None) };
    if args.strategy.is_some_and(|s| s != Strategy::Segmented) {
        usage!("--distributed needs --strategy segmented (the strategy whose sum order is fixed)");
    }
    let comm = crate::dist::init(kind).map_err(|e| Failure::usage(e.0))?;
    match run_as(&args, Some(Arc::clone(&comm))) {
        // An error on one rank ends them all (MPI_Abort), so none waits for it in a collective.
        // A plain exit status (an interrupted run) is reached by every rank alike.
        Err(f) if !f.message.is_empty() && comm.size() > 1 => {
            super::print_error(&format!("rank {}: {}", comm.rank(), f.message));
            comm.abort(i32::from(f.code))
        }
        other => other,
    }
}

/// `cllm train`, alone or as one rank of `dist`.
fn run_as(args: &TrainArgs, dist: Option<Arc<dyn Comm>>) -> CliResult {
    // Only rank 0 (or the only process) prints notes and warnings.
    let mut plan = resolve(args, dist.as_ref().is_none_or(|d| d.rank() == 0))?;
    plan.spec.dist = dist;
    let writes = plan.spec.writes();
    if args.dry_run {
        return if writes { report::print_plan(&plan, args.json) } else { Ok(()) };
    }
    // Before anything is written: a signal from here on is a stop request, never a kill.
    let stop = StopRequest::install()?;
    if !writes {
        // Rank 0 owns the run directory; the others only train.
        let summary = runner::train(&plan.spec, &stop)?;
        return match summary.interrupted {
            Some(sig) => Err(Failure::silent(crate::signals::exit_code(sig) as u8)),
            None => Ok(()),
        };
    }
    if plan.out_is_new {
        std::fs::create_dir_all(&plan.spec.out)
            .map_err(|e| crate::err!("cannot create {}: {e}", plan.spec.out.display()))?;
    }
    // Held until the run ends. Taken after resolving, so the directory checks run again under
    // the lock: another run may have written a checkpoint here since they first ran.
    let _lock = checkpoint::lock_run_dir(&plan.spec.out)?;
    check_out_history(&plan.spec.out, plan.spec.resume.as_ref())?;
    checkpoint::probe_writable(&plan.spec.out)?;
    if let (Some(path), Some(t)) = (&plan.write_cache, &plan.spec.tokens) {
        t.write_cache(&plan.spec.corpus, path)?;
    }
    let summary = runner::train(&plan.spec, &stop)?;
    match summary.interrupted {
        Some(sig) => report::report_interrupt(&plan, &summary, sig, args),
        None => report::print_summary(&plan, &summary, args),
    }
}

/// Resolves every option: a flag given on the command line, else the resumed checkpoint's
/// value, else the default; and checks they make sense together.
/// `rank0`: this process is rank 0 of a distributed run, or the only process; only it prints
/// notes (warnings only without `--quiet`).
fn resolve(args: &TrainArgs, rank0: bool) -> CliResult<Plan> {
    let loud = rank0 && !args.quiet;
    let inject_nan = check_flags(args)?;
    let resumed: Option<Checkpoint> = match &args.resume {
        Some(p) => Some(checkpoint::load(p)?),
        None => None,
    };
    let tokenizer = resolve_tokenizer(args, resumed.as_ref())?;
    let (model_config, options, init) =
        merge_options(args, resumed.as_ref(), tokenizer.as_ref().map(|(t, _)| t.vocab_size()))?;
    check_counts(&options)?;
    check_run(&options, resumed.as_ref(), &inject_nan)?;
    let (data_path, corpus) = resolve_data(args, resumed.as_ref())?;
    let (out, out_is_new) = resolve_out(args, resumed.as_ref())?;
    let (tokens, write_cache, token_note) = match tokenizer {
        None => (None, None, None),
        Some((tok, shown)) => {
            let (t, cache, note) = tokenize(tok, &shown, &corpus, &out, args)?;
            (Some(t), cache, note)
        }
    };
    let (train_len, _) = runner::split_lens(&corpus, tokens.as_ref(), &options)?;
    let token_bytes = tokens.as_ref().map_or(0, |t| t.ids.len() * t.ids.id_bytes());
    let loaded = match (&resumed, &init) {
        (Some(_), _) => Loaded::WeightsAndMoments,
        (None, Some(_)) => Loaded::Weights,
        (None, None) => Loaded::Nothing,
    };
    let memory = memory_plan(&model_config, &options, corpus.len() + token_bytes, loaded)?;
    if let Some(c) = resumed.as_ref().filter(|_| loud) {
        note_new_total(args, c, options.steps);
    }
    check_metrics(args)?;
    let samples = Some(args.sample_every.unwrap_or(DEFAULT_SAMPLE_EVERY)).filter(|&n| n > 0).map(|every| SampleSpec {
        every,
        prompt: b"\n".to_vec(),
        opts: SampleOptions {
            tokens: TRAIN_SAMPLE_BYTES,
            temperature: DEFAULT_TEMPERATURE,
            top_k: DEFAULT_TOP_K,
            seed: options.seed,
        },
    });
    let progress = if args.quiet {
        Progress::Silent
    } else if std::io::stderr().is_terminal() {
        Progress::Bar
    } else {
        Progress::Lines
    };
    let spec = RunSpec {
        model_config,
        options,
        data_path: data_path.map(|p| std::fs::canonicalize(&p).unwrap_or(p)),
        corpus,
        tokens,
        out,
        resume: resumed,
        init,
        metrics: args.metrics.clone(),
        inject_nan,
        progress,
        command_line: std::env::args().collect(),
        samples,
        save_on_interrupt: !args.no_save_on_interrupt,
        dist: None,
        check_every: args.check_every.unwrap_or(DEFAULT_CHECK_EVERY),
    };
    // Said once everything is checked, so that an error stays the only line.
    // The tokenizer's note even under --quiet: re-tokenizing is never silent.
    if let Some(note) = token_note.filter(|_| rank0) {
        eprintln!("{note}");
    }
    if loud {
        warn_epochs(train_len, spec.tokens.is_some(), &spec.options);
    }
    Ok(Plan { spec, memory, out_is_new, write_cache })
}

/// The run's tokenizer and how to name it: `--tokenizer`, else the resumed checkpoint's; both
/// given, they must be the same file (by SHA-256). `None`: byte-level.
fn resolve_tokenizer(args: &TrainArgs, resumed: Option<&Checkpoint>) -> CliResult<Option<(Tokenizer, String)>> {
    let given = match &args.tokenizer {
        Some(p) => Some((Tokenizer::load(p)?, p.display().to_string())),
        None => None,
    };
    let recorded = resumed.and_then(|c| c.tokenizer.clone().map(|t| (t, c.dir.join(TOKENIZER_FILE))));
    match (given, recorded, resumed) {
        (Some((t, shown)), Some((r, file)), _) if t.sha256() != r.sha256() => usage!(
            "--tokenizer {shown} (sha256 {}) is not the checkpoint's tokenizer {} (sha256 {}); drop the flag to resume",
            t.sha256(),
            file.display(),
            r.sha256()
        ),
        (Some((_, shown)), None, Some(c)) => usage!(
            "--tokenizer {shown}: the checkpoint {} was trained byte-level, without a tokenizer; drop the flag to resume",
            c.dir.display()
        ),
        (Some(g), _, _) => Ok(Some(g)),
        (None, Some((r, file)), _) => Ok(Some((r, file.display().to_string()))),
        (None, None, _) => Ok(None),
    }
}

/// Tokenizes the corpus, through the run directory's cache ([`TOKEN_CACHE_FILE`]). Returns the
/// tokens, the cache to write when the run starts (`None`: reused, or a dry run), and the line
/// to print about it: a cache that does not match is re-made, and that is said even with
/// `--quiet`.
fn tokenize(
    tok: Tokenizer,
    shown: &str,
    corpus: &Corpus,
    out: &Path,
    args: &TrainArgs,
) -> CliResult<(Tokenized, Option<PathBuf>, Option<String>)> {
    let path = out.join(TOKEN_CACHE_FILE);
    let (t, how) = Tokenized::cached(tok, corpus, &path)?;
    let what = format!("{} tokens for {} bytes of {} ({shown})", t.ids.len(), corpus.len(), corpus.name);
    let write = if args.dry_run { "dry run: not written" } else { "written" };
    let note = match &how {
        CacheUse::Remade(why) => Some(format!("re-tokenizing: {why}; {what}; cache re-made ({write})")),
        _ if args.quiet => None,
        CacheUse::Reused => Some(format!("tokens: {what}, read from the cache {}", path.display())),
        CacheUse::Made => Some(format!("tokenized: {what}; cache {} ({write})", path.display())),
    };
    let cache = (!args.dry_run && how != CacheUse::Reused).then_some(path);
    Ok((t, cache, note))
}

/// Checks the numbers and names that are wrong whatever else is given, before touching any
/// file, and parses `--inject-nan`.
fn check_flags(args: &TrainArgs) -> CliResult<Vec<(u64, usize)>> {
    if let Some(t) = args.threads {
        if !(1..=MAX_THREADS).contains(&t) {
            usage!("--threads must be between 1 and {MAX_THREADS}, got {t}");
        }
    }
    for (flag, zero) in [
        ("--steps", args.steps == Some(0)),
        ("--batch", args.batch == Some(0)),
        ("--spheres", args.spheres == Some(0)),
        ("--context", args.context == Some(0)),
        ("--eval-windows", args.eval_windows == Some(0)),
    ] {
        if zero {
            usage!("{flag} must be at least 1");
        }
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
    if let Some(wd) = args.weight_decay {
        if !wd.is_finite() || wd < 0.0 {
            usage!("--weight-decay must be a number >= 0, got {wd}");
        }
    }
    if let Some(p) = args.dropout {
        if !(0.0..1.0).contains(&p) {
            usage!("--dropout must be in [0, 1), got {p}");
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
    if args.format == Some(DataFormat::Squad) && args.data.is_none() {
        usage!("--format squad needs --data FILE (the built-in corpus is text)");
    }
    args.inject_nan.iter().map(|s| parse_inject(s)).collect()
}

/// Bounds the counts a run loops or allocates from (the bounds a checkpoint's `state.json` is
/// held to, [`crate::train::options`]), naming the flag; memory is checked by [`memory_plan`].
fn check_counts(o: &RunOptions) -> CliResult {
    let counts: [(&str, u64, u64); 3] = [
        ("--batch", o.batch as u64, MAX_BATCH as u64),
        ("--steps", o.steps, MAX_STEPS),
        ("--eval-windows", o.eval_windows as u64, MAX_EVAL_WINDOWS as u64),
    ];
    for (flag, value, max) in counts {
        if value > max {
            usage!("{flag} {value} is too large (at most {max})");
        }
    }
    if o.batch.checked_mul(o.context).is_none_or(|n| n > MAX_TOKENS_PER_STEP) {
        usage!(
            "--batch {} x --context {} is {} tokens a step, more than {MAX_TOKENS_PER_STEP}",
            o.batch,
            o.context,
            o.batch.saturating_mul(o.context)
        );
    }
    Ok(())
}

/// The run's memory plan, refused (exit 2, nothing allocated) when it exceeds what this process
/// may allocate.
fn memory_plan(config: &ModelConfig, o: &RunOptions, data_bytes: usize, loaded: Loaded) -> CliResult<MemoryPlan> {
    let shape = RunShape {
        batch: o.batch,
        context: o.context,
        spheres: o.spheres,
        threads: o.threads,
        strategy: o.strategy,
        data_bytes,
        loaded,
        saves: true,
    };
    let plan = MemoryPlan::for_run(config, &shape).map_err(|e| Failure::usage(e.0))?;
    plan.check_fits("the run", &Available::now()).map_err(|e| Failure::usage(e.0))?;
    Ok(plan)
}

/// The resumed checkpoint's settings, for merging flags with them.
struct Resumed<'a> {
    options: Option<&'a RunOptions>,
    /// The checkpoint's `state.json`, named in messages ("" when not resuming).
    state_file: String,
}

impl<'a> Resumed<'a> {
    fn new(c: Option<&'a Checkpoint>) -> Self {
        Resumed {
            options: c.map(|c| &c.state.options),
            state_file: c.map(|c| c.dir.join(STATE_FILE).display().to_string()).unwrap_or_default(),
        }
    }

    /// A setting that fixes the math of the run: the flag, else the checkpoint's value, else
    /// the default. A flag that contradicts the checkpoint is an error.
    fn pinned<T>(&self, flag: &str, given: Option<T>, recorded: fn(&RunOptions) -> T, default: T) -> CliResult<T>
    where
        T: PartialEq + std::fmt::Display,
    {
        match (given, self.options.map(recorded)) {
            (Some(v), Some(p)) if v != p => usage!(
                "{flag} {v} contradicts the checkpoint's {p} ({}); drop the flag to resume, or start a new run",
                self.state_file
            ),
            (Some(v), _) => Ok(v),
            (None, Some(p)) => Ok(p),
            (None, None) => Ok(default),
        }
    }

    /// A setting free to change between resumes: the flag, else the checkpoint's, else the
    /// default.
    fn free<T>(&self, given: Option<T>, recorded: fn(&RunOptions) -> T, default: T) -> T {
        given.or(self.options.map(recorded)).unwrap_or(default)
    }
}

/// Merges the flags with the resumed checkpoint's options and the defaults; checks the shape
/// of the run (context, batch, spheres, warmup) on the way.
fn merge_options(
    args: &TrainArgs,
    resumed: Option<&Checkpoint>,
    tokenizer_vocab: Option<usize>,
) -> CliResult<(ModelConfig, RunOptions, Option<Model>)> {
    let r = Resumed::new(resumed);
    let shape = super::shape::resolve(args.config.as_deref(), &args.shape, resumed, DEFAULT_CONFIG, tokenizer_vocab)?;
    let (config_name, model_config) = (shape.name, shape.config);
    let context = r.pinned("--context", args.context, |p| p.context, model_config.context)?;
    if context > model_config.context {
        usage!("--context {context} is longer than the {config_name} model's context of {}", model_config.context);
    }
    let preset_batch = ModelConfig::preset_batch(&config_name).unwrap_or(8);
    let batch = r.pinned("--batch", args.batch, |p| p.batch, preset_batch)?;
    let spheres = r.pinned("--spheres", args.spheres, |p| p.spheres, resolve_spheres(0, batch))?;
    if spheres > batch || !batch.is_multiple_of(spheres) {
        usage!(
            "--batch {batch} is not divisible by --spheres {spheres} (each sphere takes an equal share of the batch)"
        );
    }
    let seed = r.pinned("--seed", args.seed, |p| p.seed, DEFAULT_SEED)?;
    let lr = r.pinned("--lr", args.lr, |p| p.lr, DEFAULT_LR)?;
    let lr_schedule = r.pinned("--lr-schedule", args.lr_schedule, |p| p.lr_schedule, LrSchedule::default())?;
    let clip_norm = r.pinned("--clip-norm", args.clip_norm, |p| p.clip_norm, DEFAULT_CLIP_NORM)?;
    let clip_mode = r.pinned("--clip-mode", args.clip_mode, |p| p.clip_mode, ClipMode::default())?;
    let weight_decay = r.pinned("--weight-decay", args.weight_decay, |p| p.weight_decay, 0.0)?;
    let decay_embeddings =
        r.pinned("--decay-embeddings", args.decay_embeddings.then_some(true), |p| p.decay_embeddings, false)?;
    let dropout = r.pinned("--dropout", args.dropout, |p| p.dropout, 0.0)?;
    let val_fraction = r.pinned("--val-fraction", args.val_fraction, |p| p.val_fraction, DEFAULT_VAL_FRACTION)?;
    // The total may grow on resume (training further); the schedule then follows the new total.
    let steps = r.free(args.steps, |p| p.steps, DEFAULT_STEPS);
    let warmup_steps = r.pinned("--warmup-steps", args.warmup_steps, |p| p.warmup_steps, default_warmup(steps))?;
    if warmup_steps > steps {
        usage!("--warmup-steps {warmup_steps} exceeds --steps {steps}");
    }
    let options = RunOptions {
        config_name,
        context,
        batch,
        steps,
        lr,
        lr_schedule,
        warmup_steps,
        min_lr_ratio: r.free(None, |p| p.min_lr_ratio, MIN_LR_RATIO),
        seed,
        // Free to change between resumes: they do not change what is computed. The thread
        // count is this machine's, never the checkpoint's.
        threads: args.threads.unwrap_or_else(|| default_threads().min(MAX_THREADS)),
        spheres,
        strategy: r.free(args.strategy, |p| p.strategy, Strategy::default()),
        clip_norm,
        clip_mode,
        weight_decay,
        decay_embeddings,
        dropout,
        val_fraction,
        eval_every: r.free(args.eval_every, |p| p.eval_every, DEFAULT_EVAL_EVERY),
        eval_windows: r.free(args.eval_windows, |p| p.eval_windows, DEFAULT_EVAL_WINDOWS),
        save_every: r.free(args.save_every, |p| p.save_every, DEFAULT_SAVE_EVERY),
        keep: r.free(args.keep, |p| p.keep, DEFAULT_KEEP),
    };
    Ok((model_config, options, shape.init))
}

/// Checks what depends on the merged options: that a resumed run has steps left and a usable
/// optimizer state, and that every `--inject-nan` microbatch exists.
fn check_run(o: &RunOptions, resumed: Option<&Checkpoint>, inject_nan: &[(u64, usize)]) -> CliResult {
    if let Some(c) = resumed {
        if c.state.step >= o.steps {
            usage!(
                "{} is already at step {} of {}: nothing to do (pass a larger --steps to train further)",
                c.dir.display(),
                c.state.step,
                o.steps
            );
        }
        c.check_adam_state()?;
    }
    let spheres = o.spheres;
    for &(step, micro) in inject_nan {
        if micro >= spheres {
            usage!("--inject-nan {step}:{micro}: microbatch {micro} does not exist (there are {spheres} spheres, 0..{spheres})");
        }
    }
    Ok(())
}

/// The data of the run: the flag, else the data the checkpoint was trained on, read the same
/// way; a resumed run must see the same bytes, or its batches would silently differ. Returns
/// the data file (`None`: the built-in corpus) and the corpus (its split is checked on the
/// run's tokens, [`RunSpec::split_lens`]).
fn resolve_data(args: &TrainArgs, resumed: Option<&Checkpoint>) -> CliResult<(Option<PathBuf>, Corpus)> {
    let data_path: Option<PathBuf> = match (&args.data, resumed) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(c)) if c.state.data.name != TINY_SHAKESPEARE_NAME => {
            Some(PathBuf::from(c.state.data.path.as_deref().unwrap_or(&c.state.data.name)))
        }
        _ => None,
    };
    let format = match (args.format, resumed) {
        (Some(f), _) => f,
        (None, Some(c)) if args.data.is_none() => c.state.data.format,
        _ => DataFormat::default(),
    };
    let corpus: Corpus = load_corpus(data_path.as_deref(), format)?;
    if let Some(c) = resumed {
        if corpus.hash != c.state.data.sha256 {
            return Err(Failure::from(crate::err!(
                "{}: the data differs from what the checkpoint was trained on ({} records {} bytes with \
                 sha256 {}, this data has {} bytes with sha256 {})",
                corpus.name,
                c.dir.join(STATE_FILE).display(),
                c.state.data.bytes,
                c.state.data.sha256,
                corpus.len(),
                corpus.hash
            )));
        }
    }
    Ok((data_path, corpus))
}

/// The run directory, and whether it is new (created only when training starts). It may hold
/// no checkpoint of another history: none at all for a new run, none newer than the resumed
/// step when resuming.
fn resolve_out(args: &TrainArgs, resumed: Option<&Checkpoint>) -> CliResult<(PathBuf, bool)> {
    let (out, out_is_new) = match (&args.out, resumed) {
        (Some(o), _) => (o.clone(), !o.exists()),
        (None, Some(c)) => (run_dir_of(&c.dir), false),
        (None, None) => (next_run_dir(Path::new(RUNS_DIR))?, true),
    };
    if out.exists() && !out.is_dir() {
        usage!("--out {}: exists and is not a directory", out.display());
    }
    check_out_history(&out, resumed)?;
    Ok((out, out_is_new))
}

/// The run directory a checkpoint directory belongs to: its parent, or, when the checkpoint was
/// reached through a symbolic link (`--resume latest` with `latest -> run/step-000500`), the
/// real directory's parent, so new checkpoints go into the run and not next to the link. Kept
/// as given when no link is involved, so messages show the path the user typed.
fn run_dir_of(dir: &Path) -> PathBuf {
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    let real_parent = std::fs::canonicalize(dir).ok().and_then(|d| d.parent().map(Path::to_path_buf));
    match (real_parent, std::fs::canonicalize(&parent).ok()) {
        (Some(real), Some(given)) if real != given => real,
        _ => parent,
    }
}

/// Refuses a run directory whose checkpoints belong to another history.
fn check_out_history(out: &Path, resumed: Option<&Checkpoint>) -> CliResult {
    match resumed {
        Some(c) => {
            // Later checkpoints of another history in the same directory would be overwritten,
            // interleaved with this run's, or pruned in its place.
            if let Some((_, newer)) = checkpoint::list(out)?.into_iter().find(|(step, _)| *step > c.state.step) {
                usage!(
                    "--out {} already holds {}, newer than the resumed step {}; resume into another --out",
                    out.display(),
                    newer.display(),
                    c.state.step
                );
            }
        }
        None => {
            if let Some((_, newest)) = checkpoint::list(out)?.pop() {
                usage!(
                    "--out {} already holds checkpoints (newest {}); pass --resume {} to continue that run, or \
                     choose another --out",
                    out.display(),
                    newest.display(),
                    out.display()
                );
            }
        }
    }
    Ok(())
}

/// Warns when the run passes over its `train_len` training tokens more than
/// [`MAX_QUIET_EPOCHS`] times.
fn warn_epochs(train_len: usize, tokenized: bool, o: &RunOptions) {
    let epochs = (o.steps as f64 * (o.batch * o.context) as f64) / (train_len.max(1) as f64);
    if epochs > MAX_QUIET_EPOCHS {
        let size = if tokenized { format!("{train_len} tokens") } else { format_size(train_len) };
        eprintln!(
            "warning: {epochs:.1} epochs over {size} of training text (more than {MAX_QUIET_EPOCHS}: the model may learn \
             it by heart; watch the validation loss, or give more data or fewer --steps)"
        );
    }
}

/// `1.0 MB`, `12.3 KB`, `512 bytes` (decimal units).
fn format_size(bytes: usize) -> String {
    match bytes {
        b if b >= 1_000_000 => format!("{:.1} MB", b as f64 / 1e6),
        b if b >= 1_000 => format!("{:.1} KB", b as f64 / 1e3),
        b => format!("{b} bytes"),
    }
}

/// Tells the user when `--steps` moves a resumed run's total (the schedule follows it).
fn note_new_total(args: &TrainArgs, c: &Checkpoint, steps: u64) {
    if !args.quiet && args.steps.is_some_and(|n| n != c.state.options.steps) {
        eprintln!(
            "note: --steps {steps} differs from the checkpoint's total of {}; the learning-rate schedule follows the \
             new total from here on",
            c.state.options.steps
        );
    }
}

/// `--metrics` must be creatable: checked before the run directory is created, so a typo
/// leaves nothing behind.
fn check_metrics(args: &TrainArgs) -> CliResult {
    if let Some(m) = &args.metrics {
        let parent = m.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        if m.is_dir() || !parent.is_dir() {
            return Err(Failure::from(crate::err!(
                "--metrics {}: {}",
                m.display(),
                if m.is_dir() { "is a directory" } else { "its directory does not exist" }
            )));
        }
    }
    Ok(())
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
    super::next_numbered(root, "run", "").map_err(|e| Failure::usage(e.0))
}
