//! `cllm prep`: converting data files for training.

use std::path::PathBuf;

use clap::Subcommand;

use super::{write_stdout, CliResult};
use crate::data::convert_squad_file;

/// What to convert.
#[derive(Debug, Subcommand)]
pub enum PrepCommand {
    /// Convert a SQuAD v1.1/v2.0 JSON file to training text, one
    /// "Context: …\nQuestion: …\nAnswer: …\n\n" segment per question.
    ///
    /// The output is written atomically (a failed conversion leaves no partial file) and can be
    /// passed to `cllm train --data OUT.txt`. `cllm train --data IN.json` also converts on the
    /// fly; prep is for inspecting the text or reusing it.
    Squad {
        /// SQuAD JSON file (e.g. train-v2.0.json).
        #[arg(value_name = "IN.json")]
        input: PathBuf,
        /// Text file to write (replaced if it exists).
        #[arg(value_name = "OUT.txt")]
        output: PathBuf,
    },
}

pub fn run(cmd: PrepCommand) -> CliResult {
    match cmd {
        PrepCommand::Squad { input, output } => {
            if input == output {
                super::usage!("IN and OUT are the same file ({}); the input would be overwritten", input.display());
            }
            let stats = convert_squad_file(&input, &output)?;
            let line = format!(
                "{} -> {}: {} articles, {} paragraphs, {} questions ({} unanswerable), {} bytes\n",
                input.display(),
                output.display(),
                stats.articles,
                stats.paragraphs,
                stats.questions,
                stats.unanswerable + stats.blank_answers,
                stats.bytes
            );
            write_stdout(line.as_bytes())?;
            if stats.offset_mismatches > 0 {
                eprintln!(
                    "note: {} answer offsets do not point at the answer text in the context (kept; the text is what is \
                     trained on)",
                    stats.offset_mismatches
                );
            }
            Ok(())
        }
    }
}
