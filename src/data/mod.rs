//! Training data: a corpus of bytes, its train/validation split, and seeded batch sampling.
//!
//! Every corpus is first a flat `Vec<u8>`: for byte-level models (the default) token `i` is byte
//! `i`; with a tokenizer (`cllm train --tokenizer`), [`tokens`] turns the text into ids and
//! caches them next to the run. Plain text files are used as they are (any bytes, UTF-8 or not). SQuAD v1.1/v2.0 JSON
//! files are converted to text first, one segment per question (see [`squad`] for the layout
//! and the quirks of real files that are accepted).
//!
//! The split is positional rather than random ([`split_bytes`]): the validation set is the tail
//! of the corpus, so it never overlaps a training window and is the same on every machine.
//! Training batches come from [`BatchSampler`], whose PRNG is written here so that a seed names
//! the same batch stream on every platform and across dependency upgrades, and whose state can
//! be checkpointed for an exact resume. Evaluation walks fixed windows ([`windows`]), so a
//! validation loss is comparable between runs.

pub mod sampler;
pub mod squad;
pub mod text;
pub mod tokens;

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::Result;

pub use sampler::{windows, BatchSampler, SamplerState, Windows};
pub use squad::{convert_squad_file, squad_to_text, SquadStats};

/// The corpus used when no data file is given, built into the binary so that `cllm train` works
/// out of the box and its default runs are reproducible without any download.
pub static TINY_SHAKESPEARE: &[u8] = include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/data/tinyshakespeare.txt"));

/// The name a [`Corpus`] built from [`TINY_SHAKESPEARE`] carries.
pub const TINY_SHAKESPEARE_NAME: &str = "tinyshakespeare (built-in)";

/// Default fraction of the corpus (its tail) held out for validation.
pub const DEFAULT_VAL_FRACTION: f64 = 0.1;

/// How a data file is interpreted (`--format auto|text|squad`); spelled the same on the command
/// line, in `state.json` and in messages, any capitalisation accepted (`crate::names`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DataFormat {
    /// SQuAD if the file is SQuAD-shaped JSON, otherwise plain text.
    #[default]
    Auto,
    /// The file's bytes, as they are.
    Text,
    /// A SQuAD v1.1/v2.0 JSON file, converted to text.
    Squad,
}

crate::names::value_names!(DataFormat, "data format", ignore_case);

/// A training corpus: the bytes the model sees, plus what a run records about them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Corpus {
    /// The training text (for SQuAD input, the converted text, not the JSON).
    pub bytes: Vec<u8>,
    /// The file path as given, or [`TINY_SHAKESPEARE_NAME`].
    pub name: String,
    /// The format actually used ([`DataFormat::Auto`] is resolved to `Text` or `Squad`).
    pub format: DataFormat,
    /// Hex SHA-256 of `bytes`, so a run or checkpoint can tell whether it sees the same data.
    pub hash: String,
    /// Conversion counts when the input was SQuAD.
    pub squad_stats: Option<SquadStats>,
}

impl Corpus {
    /// Wraps bytes already in memory (tests, generated data).
    pub fn from_bytes(name: impl Into<String>, bytes: Vec<u8>, format: DataFormat) -> Corpus {
        let hash = sha256_hex(&bytes);
        Corpus { bytes, name: name.into(), format, hash, squad_stats: None }
    }

    /// The built-in tiny Shakespeare corpus.
    pub fn tiny_shakespeare() -> Corpus {
        Corpus::from_bytes(TINY_SHAKESPEARE_NAME, TINY_SHAKESPEARE.to_vec(), DataFormat::Text)
    }

    /// Number of bytes (= tokens).
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Splits into (train, validation); see [`split_bytes`].
    pub fn split(&self, val_fraction: f64, window: usize) -> Result<(&[u8], &[u8])> {
        split_bytes(&self.bytes, val_fraction, window).map_err(|e| e.context(&self.name))
    }
}

/// Loads the corpus for a run: `None` is the built-in tiny Shakespeare.
///
/// Errors (missing file, a directory, an empty file, malformed SQuAD) are one line naming the
/// path, because they are printed straight to the user.
pub fn load_corpus(path: Option<&Path>, format: DataFormat) -> Result<Corpus> {
    let Some(path) = path else {
        return Ok(Corpus::tiny_shakespeare());
    };
    let name = path.display().to_string();
    let raw = text::read_nonempty(path)?;
    let squad = match format {
        DataFormat::Text => None,
        DataFormat::Squad => Some(squad_to_text(&raw).map_err(|e| e.context(&name))?),
        DataFormat::Auto => squad::convert_if_squad(&raw).map_err(|e| e.context(&name))?,
    };
    match squad {
        Some((bytes, stats)) => {
            drop(raw);
            let mut corpus = Corpus::from_bytes(name, bytes, DataFormat::Squad);
            corpus.squad_stats = Some(stats);
            Ok(corpus)
        }
        None => Ok(Corpus::from_bytes(name, raw, DataFormat::Text)),
    }
}

/// Splits `data` into (train, validation): the last `val_fraction` of the bytes (rounded to the
/// nearest byte) is validation.
///
/// Positional, not random, so the two sets never share a window and the split is identical
/// everywhere. `window` is the context length T: each non-empty part must hold at least one
/// window, i.e. `T + 1` bytes (inputs plus the shifted targets), otherwise training or
/// evaluation could not draw a single example. `val_fraction == 0` means no validation set
/// (the second slice is empty).
pub fn split_bytes(data: &[u8], val_fraction: f64, window: usize) -> Result<(&[u8], &[u8])> {
    split_tokens(data, val_fraction, window, "bytes")
}

/// [`split_bytes`] for any token type; `unit` names the tokens in messages (`"bytes"`,
/// `"tokens"`).
pub fn split_tokens<'a, T>(data: &'a [T], val_fraction: f64, window: usize, unit: &str) -> Result<(&'a [T], &'a [T])> {
    if !(0.0..1.0).contains(&val_fraction) {
        crate::bail!("validation fraction must be in [0, 1), got {val_fraction}");
    }
    if window == 0 {
        crate::bail!("window (context length) must be at least 1");
    }
    let need = window + 1;
    // Rounding, not truncation: 0.29 * 100 is 28.999… in f64 and should still give 29.
    let val_len = ((data.len() as f64 * val_fraction).round() as usize).min(data.len());
    let (train, val) = data.split_at(data.len() - val_len);
    if train.len() < need {
        crate::bail!(
            "training split has {} {unit}, needs at least {need} for one window of {window} \
             (use a larger corpus or a smaller context)",
            train.len()
        );
    }
    if val_fraction > 0.0 && val.len() < need {
        crate::bail!(
            "validation split has {} {unit} ({} of {}), needs at least {need} for one window of \
             {window} (raise the validation fraction, or set it to 0 for no validation)",
            val.len(),
            val_fraction,
            data.len()
        );
    }
    Ok((train, val))
}

/// Lower-case hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut s = String::with_capacity(64);
    for b in digest {
        // Writing into a String cannot fail.
        let _ = write!(s, "{b:02x}");
    }
    s
}
