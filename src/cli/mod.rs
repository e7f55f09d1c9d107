//! The `cllm` command line.
//!
//! Each subcommand lives in its own module with its clap arguments and its `run` function;
//! adding one means a variant in [`Command`], a module, and an arm in [`dispatch`].
//!
//! Errors reach the user as one line on stderr, `error: …`. Exit codes: 0 success, 2 a
//! usage or validation error (bad flag, bad number, inconsistent options: nothing was done),
//! 1 a runtime error (missing or malformed file, failed checkpoint, failed training).

pub mod eval;
pub mod generate;
pub mod plot;
pub mod prep;
pub mod shape;
pub mod tokenizer;
pub mod train;

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::checkpoint::{GIT_COMMIT, VERSION};
use crate::error::Error;

/// The crate version and the commit it was built from; `cllm --version` adds the SIMD path
/// ([`version_line`]).
pub const LONG_VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("CLLM_GIT_COMMIT"), ")");

/// What `cllm --version` prints after the name: [`LONG_VERSION`] and the SIMD path this
/// process runs, e.g. `0.1.0 (commit 1234abc) simd avx2`.
pub fn version_line(path: crate::simd::Path) -> String {
    format!("{LONG_VERSION} simd {path}")
}

/// Train small GPT-2-style byte-level language models on the CPU, deterministically at any
/// thread count.
#[derive(Debug, Parser)]
#[command(
    name = "cllm",
    version = LONG_VERSION,
    about,
    long_about = "Train small GPT-2-style byte-level language models on the CPU with many worker \
                  threads, bit-for-bit deterministic at any thread count.\n\n\
                  Quick start:\n  \
                  cllm train                       train the default model on built-in Shakespeare\n  \
                  cllm generate --checkpoint runs/run-001 --prompt 'ROMEO:'\n  \
                  cllm eval --checkpoint runs/run-001 --data some.txt",
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train a model (on built-in tiny Shakespeare unless --data is given), saving checkpoints.
    Train(Box<train::TrainArgs>),
    /// Measure a model's loss (nats and bits per byte) on a text file.
    Eval(eval::EvalArgs),
    /// Continue a prompt with a trained model; writes raw bytes to stdout.
    Generate(generate::GenerateArgs),
    /// Convert data files for training (e.g. SQuAD JSON to text).
    #[command(subcommand)]
    Prep(prep::PrepCommand),
    /// Measure training throughput per strategy and thread count against the machine's ceiling.
    Bench(crate::bench::BenchArgs),
    /// Write a flamegraph of training steps (pprof).
    Profile(crate::bench::ProfileArgs),
    /// Draw a --metrics file as an SVG: losses, tokens/s, gradient norm, skipped micro-batches.
    Plot(plot::PlotArgs),
    /// Train a BPE tokenizer (tokenizer.json), or show the ids a tokenizer gives a text.
    #[command(subcommand)]
    Tokenizer(tokenizer::TokenizerCommand),
}

/// An error with its exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// 2 for usage/validation errors, 1 for runtime errors.
    pub code: u8,
    pub message: String,
}

impl Failure {
    /// A usage or validation error (exit code 2).
    pub fn usage(message: impl Into<String>) -> Self {
        Failure { code: 2, message: message.into() }
    }
}

impl Failure {
    /// An exit status whose message was already printed (an interrupted run's own line).
    pub fn silent(code: u8) -> Self {
        Failure { code, message: String::new() }
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure { code: 1, message: e.0 }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Result of a subcommand.
pub type CliResult<T = ()> = std::result::Result<T, Failure>;

/// Shorthand for returning a usage error.
macro_rules! usage {
    ($($arg:tt)*) => { return Err($crate::cli::Failure::usage(format!($($arg)*))) };
}
pub(crate) use usage;

/// Parses the process arguments, runs the subcommand, and turns any failure into one line on
/// stderr and an exit code.
pub fn main() -> ExitCode {
    install_panic_hook();
    // CLLM_SIMD is read once, here, before anything runs: a bad value stops every command.
    let path = match crate::simd::path::selected() {
        Ok(p) => p,
        Err(e) => {
            print_error(e);
            return ExitCode::from(2);
        }
    };
    // clap wants a 'static version string: made once per process.
    static VERSION: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let version = VERSION.get_or_init(|| version_line(path)).as_str();
    let cli = match Cli::command().version(version).try_get_matches().and_then(|m| Cli::from_arg_matches(&m)) {
        Ok(cli) => cli,
        Err(e) => return report_clap_error(e),
    };
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            if !f.message.is_empty() {
                print_error(&f.message);
            }
            ExitCode::from(f.code)
        }
    }
}

/// Runs one parsed command line.
pub fn dispatch(cli: Cli) -> CliResult {
    match cli.command {
        Command::Train(args) => train::run(*args),
        Command::Eval(args) => eval::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Prep(cmd) => prep::run(cmd),
        Command::Bench(args) => {
            crate::bench::check_bench_args(&args).map_err(|e| Failure::usage(e.0))?;
            crate::bench::run_bench(&args).map_err(Failure::from)
        }
        Command::Profile(args) => {
            crate::bench::check_profile_args(&args).map_err(|e| Failure::usage(e.0))?;
            crate::bench::run_profile(&args).map(|_| ()).map_err(Failure::from)
        }
        Command::Plot(args) => plot::run(args),
        Command::Tokenizer(cmd) => tokenizer::run(cmd),
    }
}

/// The first free `ROOT/PREFIX-NNN[SUFFIX]`, numbered from 001: where `cllm train`
/// (`runs/run-NNN`), `cllm bench` (`runs/bench-NNN`) and `cllm profile` (`runs/profile-NNN.svg`)
/// write when not given `--out`, so no run overwrites another's output or a committed report.
/// Nothing is created here (a dry run must not write anything); the caller creates it.
pub fn next_numbered(root: &Path, prefix: &str, suffix: &str) -> crate::Result<PathBuf> {
    for i in 1..100_000u32 {
        let p = root.join(format!("{prefix}-{i:03}{suffix}"));
        if !p.exists() {
            return Ok(p);
        }
    }
    crate::bail!("{}: no free {prefix}-NNN{suffix} name; pass --out", root.display())
}

/// Prints `error: <message>` as a single line: any newline inside the message (from a
/// dependency's error text, say) is folded into the line.
pub fn print_error(message: &str) {
    let one_line = message.split(['\n', '\r']).map(str::trim).filter(|s| !s.is_empty()).collect::<Vec<_>>().join("; ");
    let _ = writeln!(std::io::stderr(), "error: {one_line}");
}

/// clap's help and version go to stdout with exit 0; its errors are multi-line (message,
/// usage, tip), which we reduce to the message line plus a pointer to `--help`.
fn report_clap_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            ExitCode::SUCCESS
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand | ErrorKind::MissingSubcommand => {
            // `cllm` alone: show the help, as most tools do, but it is still a usage error.
            let _ = e.print();
            ExitCode::from(2)
        }
        _ => {
            // The message is the first paragraph (a list of missing arguments or the possible
            // values continues on indented lines); usage and tips follow a blank line.
            let rendered = e.render().to_string();
            let paragraph: Vec<&str> = rendered.lines().map(str::trim).take_while(|l| !l.is_empty()).collect();
            let joined = paragraph.join(" ");
            let msg = joined.strip_prefix("error: ").unwrap_or(&joined);
            let sub = std::env::args()
                .nth(1)
                .filter(|a| Cli::command().get_subcommands().any(|c| c.get_name() == a))
                .map(|a| format!("cllm {a} --help"))
                .unwrap_or_else(|| "cllm --help".to_string());
            print_error(&format!("{msg} (see '{sub}')"));
            ExitCode::from(2)
        }
    }
}

/// A panic is a bug, but the user should still see one line rather than a backtrace.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown cause".to_string());
        let place = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        print_error(&format!("internal error: {msg}{place} (this is a bug in cllm {VERSION} {GIT_COMMIT})"));
    }));
}

/// Writes bytes to stdout; a closed pipe (`cllm generate | head`) ends output quietly.
pub(crate) fn write_stdout(bytes: &[u8]) -> CliResult {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Failure::from(Error(format!("cannot write to stdout: {e}")))),
    }
}

/// Number of threads to use when not told: all cores.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}
