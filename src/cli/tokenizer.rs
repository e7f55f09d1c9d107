//! `cllm tokenizer`: train a byte-level BPE tokenizer, and show what a tokenizer makes of a
//! text (`encode`) or of ids (`decode`), so a user can see what the model sees.

use std::path::PathBuf;

use clap::Subcommand;

use super::{usage, write_stdout, CliResult};
use crate::data::text::{data_file_limit, read_nonempty};
use crate::tokenizer::Tokenizer;

/// What to do with a tokenizer.
#[derive(Debug, Subcommand)]
pub enum TokenizerCommand {
    /// Train a GPT-2-style byte-level BPE on a UTF-8 text file and write its tokenizer.json.
    Train {
        /// UTF-8 text to learn the merges from.
        #[arg(long, value_name = "FILE")]
        data: PathBuf,
        /// Tokens in the vocabulary: the 256 byte symbols, <|endoftext|> and the merges.
        #[arg(long, value_name = "N")]
        vocab_size: usize,
        /// The tokenizer.json to write (replaced atomically if it exists).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Print the token ids of TEXT, space-separated (with --json: {"ids", "tokens"}).
    Encode {
        /// A Hugging Face tokenizer.json.
        #[arg(long, value_name = "FILE")]
        tokenizer: PathBuf,
        /// Print one JSON object {"ids": [...], "tokens": [...]}.
        #[arg(long)]
        json: bool,
        /// The text to tokenize.
        text: String,
    },
    /// Print the text of token IDS (decimal, space- or comma-separated).
    Decode {
        /// A Hugging Face tokenizer.json.
        #[arg(long, value_name = "FILE")]
        tokenizer: PathBuf,
        /// The ids, e.g. `15496 11 995` or `15496,11,995`.
        #[arg(required = true, num_args = 1..)]
        ids: Vec<String>,
    },
}

pub fn run(cmd: TokenizerCommand) -> CliResult {
    match cmd {
        TokenizerCommand::Train { data, vocab_size, out } => {
            crate::tokenizer::check_vocab_size(vocab_size).map_err(|e| super::Failure::usage(e.0))?;
            let bytes = read_nonempty(&data)?;
            let text = String::from_utf8(bytes).map_err(|e| {
                crate::err!(
                    "{}: not UTF-8 text (invalid byte at offset {})",
                    data.display(),
                    e.utf8_error().valid_up_to()
                )
            })?;
            let t = Tokenizer::train_bpe(&text, vocab_size)?;
            t.save(&out)?;
            let line = format!(
                "{}: {} tokens, sha256 {}, trained on {} bytes\n",
                out.display(),
                t.vocab_size(),
                t.sha256(),
                text.len()
            );
            write_stdout(line.as_bytes())
        }
        TokenizerCommand::Encode { tokenizer, json, text } => {
            let t = Tokenizer::load(&tokenizer)?;
            let ids = t.encode(&text)?;
            let line = if json {
                format!("{}\n", serde_json::json!({ "ids": ids, "tokens": t.tokens(&ids) }))
            } else {
                format!("{}\n", ids.iter().map(u32::to_string).collect::<Vec<_>>().join(" "))
            };
            write_stdout(line.as_bytes())
        }
        TokenizerCommand::Decode { tokenizer, ids } => {
            let ids = parse_ids(&ids)?;
            let t = Tokenizer::load(&tokenizer)?;
            write_stdout(t.decode(&ids)?.as_bytes())
        }
    }
}

/// The ids of the `decode` arguments (each may hold several, comma- or space-separated).
fn parse_ids(args: &[String]) -> CliResult<Vec<u32>> {
    let mut ids = Vec::new();
    for part in args.iter().flat_map(|a| a.split([',', ' '])).filter(|p| !p.is_empty()) {
        match part.parse::<u32>() {
            Ok(id) => ids.push(id),
            Err(_) => usage!("token id '{part}' is not a non-negative integer below 2^32"),
        }
    }
    if ids.len() as u64 > data_file_limit() {
        usage!("too many ids");
    }
    Ok(ids)
}
