//! `cllm eval`: a model's loss on a data file.

use std::path::PathBuf;

use clap::Args;
use serde::Serialize;

use super::{default_threads, usage, write_stdout, CliResult};
use crate::checkpoint::{load_model, load_tokenizer};
use crate::data::tokens::{TokenSlice, Tokenized};
use crate::data::{load_corpus, DataFormat};
use crate::train::eval::evaluate;

/// Mean next-token cross-entropy of a model on a file, over consecutive non-overlapping windows
/// of the model's context T (window i predicts tokens i·T+1 … i·T+T from tokens i·T … i·T+T-1).
/// Prints the loss in nats per token and in bits per byte (total bits over the bytes the
/// predicted tokens stand for), with the number of windows and tokens. Tokens are bytes, or
/// with a tokenizer.json in the checkpoint directory, its ids.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// A model.safetensors file, a checkpoint directory (step-NNNNNN, or RUN/best for the
    /// best-validation one), or a run's --out directory (its newest step-NNNNNN).
    #[arg(long, value_name = "PATH")]
    pub checkpoint: PathBuf,
    /// Text file to evaluate on (any bytes), or SQuAD JSON (converted as for training).
    #[arg(long, value_name = "FILE")]
    pub data: PathBuf,
    /// How to read --data.
    #[arg(long, value_name = "FORMAT", value_enum, ignore_case = true, default_value_t = DataFormat::default())]
    pub format: DataFormat,
    /// Evaluate only the first N windows. [default: every window that fits]
    #[arg(long, value_name = "N")]
    pub max_windows: Option<usize>,
    /// Worker threads. The result does not depend on it. [default: number of cores]
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Print one JSON object {loss, bits_per_byte, windows, tokens} instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `--json` output, keys in this order.
#[derive(Serialize)]
struct EvalJson {
    loss: f64,
    bits_per_byte: f64,
    windows: usize,
    tokens: usize,
}

pub fn run(args: EvalArgs) -> CliResult {
    if args.max_windows == Some(0) {
        usage!("--max-windows must be at least 1");
    }
    let threads = args.threads.unwrap_or_else(default_threads);
    if threads == 0 {
        usage!("--threads must be at least 1");
    }
    let (model, model_path) = load_model(&args.checkpoint)?;
    let tokenizer = load_tokenizer(&args.checkpoint, &model)?;
    let corpus = load_corpus(Some(&args.data), args.format)?;
    let t = model.config.context;
    let tokens = match tokenizer {
        Some(tok) => Some(Tokenized::new(tok, &corpus)?),
        None => None,
    };
    let (slice, lens) = match &tokens {
        None => (TokenSlice::Bytes(&corpus.bytes), None),
        Some(tk) => (tk.ids.slice(), Some(tk.byte_lens.as_slice())),
    };
    let max = args.max_windows.unwrap_or(usize::MAX);
    let result = crate::with_tokens!(slice, d => evaluate(&model.config, &model.params, d, lens, t, max, threads))
        .map_err(|e| e.context(args.data.display()))?;
    if !result.loss.is_finite() {
        return Err(crate::err!(
            "{}: the loss on {} is {} (the weights have diverged)",
            model_path.display(),
            args.data.display(),
            result.loss
        )
        .into());
    }
    let text = if args.json {
        let obj = EvalJson {
            loss: result.loss,
            bits_per_byte: result.bits_per_byte(),
            windows: result.windows,
            tokens: result.tokens,
        };
        let obj = serde_json::to_string(&obj).map_err(crate::Error::from)?;
        format!("{obj}\n")
    } else {
        format!(
            "{}: loss {:.4} nats/{}, {:.4} bits/byte over {} windows of {t} ({} tokens) [model {}]\n",
            args.data.display(),
            result.loss,
            if tokens.is_some() { "token" } else { "byte" },
            result.bits_per_byte(),
            result.windows,
            result.tokens,
            model_path.display()
        )
    };
    write_stdout(text.as_bytes())
}
