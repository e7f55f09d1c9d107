//! `cllm generate`: continue a prompt.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use clap::Args;

use super::{usage, write_stdout, CliResult, Failure};
use crate::checkpoint::{load_model, load_tokenizer};
use crate::error::Error;
use crate::generate::{generate_text, SampleOptions};

/// Bytes generated when --tokens is not given.
pub const DEFAULT_TOKENS: usize = 200;
/// Sampling temperature of `cllm generate`, and of the sample `cllm train` prints.
pub const DEFAULT_TEMPERATURE: f32 = 0.8;
/// Top-k of `cllm generate` (0: all bytes), and of the sample `cllm train` prints.
pub const DEFAULT_TOP_K: usize = 0;
/// Seed of the sampler when --seed is not given.
pub const DEFAULT_SEED: u64 = 1;

/// Print the prompt and a sampled continuation as raw bytes (a byte-level model works on bytes,
/// so the output need not be valid UTF-8). With a tokenizer.json in the checkpoint directory,
/// the prompt is encoded with it and --tokens counts its tokens, printed as the text they stand
/// for. The same checkpoint, prompt and seed always give the same bytes.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// A model.safetensors file, a checkpoint directory (step-NNNNNN, or RUN/best for the
    /// best-validation one), or a run's --out directory (its newest step-NNNNNN).
    #[arg(long, value_name = "PATH")]
    pub checkpoint: PathBuf,
    /// Text to continue (only its last `context` bytes are seen by the model).
    #[arg(long, value_name = "TEXT", default_value = "\n", hide_default_value = true)]
    pub prompt: String,
    /// Number of bytes to generate (tokens, with a tokenizer).
    #[arg(long, value_name = "N", allow_negative_numbers = true, default_value_t = DEFAULT_TOKENS)]
    pub tokens: usize,
    /// Sampling temperature; 0 always picks the most likely byte (greedy).
    #[arg(long, value_name = "X", allow_negative_numbers = true, default_value_t = DEFAULT_TEMPERATURE)]
    pub temperature: f32,
    /// Sample only among the K most likely bytes (0: all).
    #[arg(long, value_name = "K", allow_negative_numbers = true, default_value_t = DEFAULT_TOP_K)]
    pub top_k: usize,
    /// Seed of the sampler.
    #[arg(long, value_name = "S", default_value_t = DEFAULT_SEED)]
    pub seed: u64,
    /// Do not echo the prompt before the continuation.
    #[arg(long)]
    pub no_prompt: bool,
}

pub fn run(args: GenerateArgs) -> CliResult {
    if !args.temperature.is_finite() || args.temperature < 0.0 {
        usage!("--temperature must be a number >= 0 (0 is greedy), got {}", args.temperature);
    }
    if args.prompt.is_empty() {
        usage!("--prompt must not be empty (the model needs at least one byte to continue from)");
    }
    let (model, model_path) = load_model(&args.checkpoint)?;
    let tokenizer = load_tokenizer(&args.checkpoint, &model)?;
    let table = tokenizer.as_ref().map(|t| t.token_bytes());
    let opts = SampleOptions { tokens: args.tokens, temperature: args.temperature, top_k: args.top_k, seed: args.seed };
    if !args.no_prompt {
        write_stdout(args.prompt.as_bytes())?;
    }
    let mut out = std::io::stdout().lock();
    let mut closed = false;
    let tok = tokenizer.as_ref().zip(table.as_deref());
    let result = generate_text(&model, tok, args.prompt.as_bytes(), opts, |b| {
        // Streamed token by token so a slow generation shows progress.
        out.write_all(b).and_then(|()| out.flush()).map_err(|e| {
            closed = e.kind() == std::io::ErrorKind::BrokenPipe;
            Error(format!("cannot write to stdout: {e}"))
        })
    });
    match result {
        // A closed pipe (`cllm generate | head -c 50`) is the reader saying it has enough.
        Err(_) if closed => return Ok(()),
        Err(e) => return Err(Failure::from(e.context(model_path.display()))),
        Ok(()) => {}
    }
    // The bytes are the output; a newline is added only for a person at a terminal.
    if out.is_terminal() {
        let _ = out.write_all(b"\n");
        let _ = out.flush();
    }
    Ok(())
}
