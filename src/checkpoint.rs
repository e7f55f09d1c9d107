//! Checkpoints: everything needed to continue a training run bit-for-bit, written atomically.
//!
//! # Layout
//!
//! A run's output directory `OUT` holds one directory per checkpoint, named `step-NNNNNN`
//! (the number of completed steps, at least six digits):
//!
//! ```text
//! OUT/step-000100/
//!     model.safetensors   the weights alone (HF GPT-2 names, F32, config in the metadata):
//!                         what `cllm eval` and `cllm generate` read
//!     state.safetensors   the AdamW moments `adam.m` and `adam.v`, flat in parameter order
//!     state.json          step, Adam t, sampler state, model config, training options, data
//!                         hash, version, command line, and the SHA-256 of the other files
//!     config.json         the same shape as a Hugging Face GPT2Config, so that
//!                         `GPT2LMHeadModel.from_pretrained(step_dir)` loads the directory
//! ```
//!
//! A run with a tokenizer (`--tokenizer`) also writes its `tokenizer.json` there, checksummed
//! in `state.json` (so `AutoTokenizer.from_pretrained(step_dir)` works too).
//!
//! `state.json` also carries `self_sha256`: the SHA-256 of the file itself with that value
//! replaced by 64 zeros, so a damaged `state.json` is caught like a damaged weight file.
//!
//! # Atomicity
//!
//! [`save`] writes every file into `OUT/.tmp-step-NNNNNN-<pid>` (a name that never matches
//! `step-*`), fsyncs each file and the temporary directory, renames it to `step-NNNNNN` and
//! fsyncs `OUT`. Readers only ever look at `step-*` names, so a crash or kill at any moment
//! leaves every earlier checkpoint intact and the new one either complete or invisible.
//! [`prune`] deletes old checkpoints only after the new one is in place, and first renames each
//! to `.pruned-step-NNNNNN-<pid>`: deleting a directory takes one call per file, and a run
//! killed in the middle of that would otherwise leave a `step-*` directory with only some of
//! its files (seen in CI: `state.json` gone, the weights still there).
//!
//! # The best checkpoint
//!
//! [`save_best`] keeps `OUT/best/`, a full checkpoint (same files, resumable) of the step with
//! the lowest periodic validation loss so far. It is written like a step checkpoint, into
//! `.tmp-best-<pid>`; an existing `best/` is renamed to `.replaced-best-<pid>` before the new
//! one is renamed into place and deleted only after, so there is always a whole `best/` (or,
//! before the first, none). [`list`] and [`prune`] see only `step-*` names, so `--keep` never
//! deletes `best/`, and a run directory given to eval, generate or `--resume` still means its
//! newest `step-*`; `OUT/best` is accepted explicitly like any checkpoint directory. When a
//! step checkpoint is due at the step `best/` was just written for, [`save_linked`] publishes
//! it from hard links to `best/`'s files (the same bytes, written once); files are never
//! rewritten in place, so replacing `best/` later unlinks its names and leaves the step's.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::data::text::{read_regular_file, MAX_DATA_BYTES};
use crate::data::{sha256_hex, DataFormat, SamplerState};
use crate::error::{Error, Result};
use crate::model::hf;
use crate::model::weights::{read_model_file, serialize_safetensors};
use crate::model::Model;
use crate::tokenizer::{Tokenizer, MAX_TOKENIZER_BYTES, TOKENIZER_FILE};
use crate::train::RunOptions;
use crate::{bail, err};

/// The weights file of a checkpoint.
pub const MODEL_FILE: &str = "model.safetensors";
/// The optimizer-moments file of a checkpoint.
pub const OPTIM_FILE: &str = "state.safetensors";
/// The JSON training state of a checkpoint.
pub const STATE_FILE: &str = "state.json";
/// Version of the checkpoint layout; bumped when an old reader could misread a new one.
pub const FORMAT_VERSION: u32 = 1;
/// The best-validation checkpoint's directory in a run directory.
pub const BEST_DIR: &str = "best";
/// The version string recorded in checkpoints and printed by `--version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git commit the binary was built from ("unknown" outside a git checkout).
pub const GIT_COMMIT: &str = env!("CLLM_GIT_COMMIT");

/// Largest `state.json` read (a real one is about 2 KB, its command line included).
const MAX_STATE_BYTES: u64 = 16 << 20;
/// Room for the header of `state.safetensors` beyond its two F32 tensors.
const MOMENTS_HEADER_BYTES: u64 = 1 << 20;

const ZERO_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What the run trained on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataRecord {
    /// The data path as given, or the built-in corpus name.
    pub name: String,
    /// The data file's absolute path (`None` for the built-in corpus), so a resume from another
    /// directory finds it.
    #[serde(default)]
    pub path: Option<String>,
    /// The format the file was read as: `text` or `squad` (never `auto`).
    pub format: DataFormat,
    /// SHA-256 (hex) of the corpus bytes the model saw (after any SQuAD conversion).
    pub sha256: String,
    pub bytes: u64,
    /// With a tokenizer: the bytes the training tokens stand for (the rest are validation's).
    pub train_bytes: u64,
    pub val_bytes: u64,
    /// With a tokenizer: its hash and the token counts (absent for byte-level runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<TokensRecord>,
}

/// What a run with a tokenizer records about its tokens; the sampler draws from `train_tokens`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokensRecord {
    /// SHA-256 of the checkpoint's `tokenizer.json`.
    pub tokenizer_sha256: String,
    pub tokens: u64,
    pub train_tokens: u64,
    pub val_tokens: u64,
}

/// The contents of `state.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    pub format_version: u32,
    /// Completed optimizer steps (the `NNNNNN` of the directory name).
    pub step: u64,
    /// AdamW's step counter t (differs from `step` when updates were skipped).
    pub adam_t: u64,
    /// The batch sampler's state after drawing the batch of `step`.
    pub sampler: SamplerState,
    pub model_config: ModelConfig,
    /// The run's settings (defined with the training loop, [`RunOptions`]).
    pub options: RunOptions,
    pub data: DataRecord,
    /// Training loss of the last step, and the last validation loss, for humans and tools.
    pub loss: Option<f32>,
    pub val_loss: Option<f32>,
    pub cllm_version: String,
    pub git_commit: String,
    /// The command line of the process that wrote the checkpoint.
    pub command_line: Vec<String>,
    /// Seconds since the Unix epoch when written.
    pub created_unix: u64,
    /// SHA-256 (hex) of every other file in the directory, by file name.
    #[serde(default)]
    pub files: BTreeMap<String, String>,
    /// SHA-256 of this file with this value replaced by 64 zeros.
    #[serde(default)]
    pub self_sha256: String,
}

/// A checkpoint read back from disk, checksums verified.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub state: TrainState,
    pub model: Model,
    pub adam_m: Vec<f32>,
    pub adam_v: Vec<f32>,
    /// The run's tokenizer (`None`: byte-level).
    pub tokenizer: Option<Tokenizer>,
}

impl Checkpoint {
    /// Checks that the optimizer state fits the model before any work starts.
    pub fn check_adam_state(&self) -> Result<()> {
        let n = self.model.params.len();
        if self.adam_m.len() != n || self.adam_v.len() != n {
            bail!(
                "{}: optimizer state has {} values, the model {n}",
                self.dir.join(OPTIM_FILE).display(),
                self.adam_m.len()
            );
        }
        Ok(())
    }
}

/// `step-NNNNNN`.
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:06}")
}

/// The step of a `step-NNNNNN` name, `None` for anything else (temporary directories included).
pub fn parse_step_dir_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The checkpoints in `out`, oldest first. A missing directory holds none.
pub fn list(out: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let entries = match fs::read_dir(out) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(out, &e)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| io_err(out, &e))?;
        let Some(step) = entry.file_name().to_str().and_then(parse_step_dir_name) else { continue };
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            found.push((step, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// Resolves what a user passed to `--resume` or `--checkpoint`: a `step-NNNNNN` directory is
/// itself; any other directory means its newest checkpoint.
pub fn resolve_dir(path: &Path) -> Result<PathBuf> {
    let meta = fs::metadata(path).map_err(|e| io_err(path, &e))?;
    if !meta.is_dir() {
        bail!("{}: not a directory (expected a step-NNNNNN checkpoint or a run's --out directory)", path.display());
    }
    if path.join(STATE_FILE).exists() || path.join(MODEL_FILE).exists() {
        return Ok(path.to_path_buf());
    }
    match list(path)?.pop() {
        Some((_, dir)) => Ok(dir),
        None => bail!("{}: no checkpoint here (no step-NNNNNN directory and no {STATE_FILE})", path.display()),
    }
}

/// Loads only the weights, for eval and generate: `path` is a `.safetensors` file, a
/// checkpoint directory or a run directory (its newest checkpoint). In a directory with a
/// `state.json`, the weights' checksum is verified too.
pub fn load_model(path: &Path) -> Result<(Model, PathBuf)> {
    let meta = fs::metadata(path).map_err(|e| io_err(path, &e))?;
    if !meta.is_dir() {
        let model = read_model_file(path)?.parse().map_err(|e| e.context(path.display()))?;
        return Ok((model, path.to_path_buf()));
    }
    let dir = resolve_dir(path)?;
    let file = dir.join(MODEL_FILE);
    let read = read_model_file(&file)?;
    if dir.join(STATE_FILE).exists() {
        let state = read_state(&dir)?;
        verify_checksum(&file, &read.bytes, &state)?;
    }
    let model = read.parse().map_err(|e| e.context(file.display()))?;
    Ok((model, file))
}

/// The tokenizer that goes with the model `load_model(path)` reads: the `tokenizer.json` of
/// its directory (beside a `.safetensors` file given directly), checksummed when the
/// directory's `state.json` records it; `None` when there is none (a byte-level model). Its
/// vocabulary must fit the model's.
pub fn load_tokenizer(path: &Path, model: &Model) -> Result<Option<Tokenizer>> {
    let dir = if fs::metadata(path).map_err(|e| io_err(path, &e))?.is_dir() {
        resolve_dir(path)?
    } else {
        path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf()
    };
    let file = dir.join(TOKENIZER_FILE);
    if !file.exists() {
        return Ok(None);
    }
    let bytes = read_regular_file(&file, MAX_TOKENIZER_BYTES, "tokenizer.json")?;
    if dir.join(STATE_FILE).exists() {
        let state = read_state(&dir)?;
        if state.files.contains_key(TOKENIZER_FILE) {
            verify_checksum(&file, &bytes, &state)?;
        }
    }
    let tok = Tokenizer::from_json(bytes).map_err(|e| e.context(file.display()))?;
    check_vocab(&tok, model.config.vocab).map_err(|e| e.context(file.display()))?;
    Ok(Some(tok))
}

/// A model of vocabulary `vocab` can embed every id of `tok`.
pub fn check_vocab(tok: &Tokenizer, vocab: usize) -> Result<()> {
    if vocab < tok.vocab_size() {
        bail!("the model's vocabulary of {vocab} does not cover the tokenizer's {} tokens", tok.vocab_size());
    }
    Ok(())
}

/// Loads a whole checkpoint directory (see [`resolve_dir`] for what `path` may be), verifying
/// every checksum and that the pieces agree with each other, and validating what is loaded
/// before anything is sized from it: `state.json`'s counters and options within their bounds
/// and consistent ([`check_state`]), each file no larger than its content can be, the weights
/// finite, the moments finite with `v` ≥ 0. Errors name the file and the first bad value.
pub fn load(path: &Path) -> Result<Checkpoint> {
    let dir = resolve_dir(path)?;
    let state = read_state(&dir)?;
    if state.format_version != FORMAT_VERSION {
        bail!(
            "{}: checkpoint format version {} is not supported (this cllm reads version {FORMAT_VERSION})",
            dir.join(STATE_FILE).display(),
            state.format_version
        );
    }
    for name in [MODEL_FILE, OPTIM_FILE] {
        if !state.files.contains_key(name) {
            bail!("{}: no checksum recorded for {name}", dir.join(STATE_FILE).display());
        }
    }
    check_state(&state).map_err(|e| err!("{}: {e}", dir.join(STATE_FILE).display()))?;
    let model_path = dir.join(MODEL_FILE);
    let read = read_model_file(&model_path)?;
    verify_checksum(&model_path, &read.bytes, &state)?;
    let model = read.parse().map_err(|e| e.context(model_path.display()))?;
    if model.config != state.model_config {
        bail!(
            "{}: model config {:?} differs from {STATE_FILE}'s {:?}",
            model_path.display(),
            model.config,
            state.model_config
        );
    }
    let optim_path = dir.join(OPTIM_FILE);
    let n = model.params.len() as u64;
    let optim_bytes = read_regular_file(&optim_path, n * 8 + MOMENTS_HEADER_BYTES, "optimizer-state file")?;
    verify_checksum(&optim_path, &optim_bytes, &state)?;
    let (adam_m, adam_v) =
        deserialize_moments(&optim_bytes, model.params.len()).map_err(|e| e.context(optim_path.display()))?;
    let tokenizer = match &state.data.tokens {
        None => None,
        Some(rec) => {
            let file = dir.join(TOKENIZER_FILE);
            let bytes = read_regular_file(&file, MAX_TOKENIZER_BYTES, "tokenizer.json")?;
            verify_checksum(&file, &bytes, &state)?;
            let tok = Tokenizer::from_json(bytes).map_err(|e| e.context(file.display()))?;
            if tok.sha256() != rec.tokenizer_sha256 {
                bail!("{}: not the tokenizer {STATE_FILE} records (sha256 {})", file.display(), rec.tokenizer_sha256);
            }
            check_vocab(&tok, model.config.vocab).map_err(|e| e.context(file.display()))?;
            Some(tok)
        }
    };
    Ok(Checkpoint { dir, state, model, adam_m, adam_v, tokenizer })
}

/// Writes a checkpoint of `state.step` into `out` atomically (see the module docs) and returns
/// its directory. `state.files` and `state.self_sha256` are filled in here. A checkpoint of the
/// same step already in `out` is replaced.
pub fn save(out: &Path, state: TrainState, files: Files<'_>) -> Result<PathBuf> {
    let name = step_dir_name(state.step);
    save_as(out, &name, state, files)
}

/// What a checkpoint holds besides `state.json`: the weights, the AdamW moments, and the
/// run's tokenizer (`None`: byte-level).
#[derive(Clone, Copy)]
pub struct Files<'a> {
    pub model: &'a Model,
    pub adam_m: &'a [f32],
    pub adam_v: &'a [f32],
    pub tokenizer: Option<&'a Tokenizer>,
}

/// Publishes the checkpoint directory `from` (one just written, `OUT/best/` of the same step)
/// also as `OUT/step-NNNNNN` for `step`, hard-linking its files into the temporary directory
/// instead of serializing and writing them again: the same bytes, published as atomically as
/// [`save`] (files are never written in place, so the two names cannot drift apart; replacing
/// `best/` or pruning the step later unlinks one name only). Returns `Ok(None)`, leaving
/// nothing behind, where the filesystem refuses a hard link: the caller then saves in full.
pub fn save_linked(out: &Path, from: &Path, step: u64) -> Result<Option<PathBuf>> {
    let state = read_state(from)?;
    if state.step != step {
        bail!("internal error: {} holds step {}, not {step}", from.display(), state.step);
    }
    let name = step_dir_name(step);
    let tmp = tmp_dir(out, &name)?;
    fs::create_dir(&tmp).map_err(|e| io_err(&tmp, &e))?;
    let mut linked = true;
    for file in [MODEL_FILE, OPTIM_FILE, STATE_FILE, hf::CONFIG_FILE, TOKENIZER_FILE] {
        let src = from.join(file);
        if file == TOKENIZER_FILE && !src.exists() {
            continue;
        }
        if fs::hard_link(&src, tmp.join(file)).is_err() {
            linked = false;
            break;
        }
    }
    let result = if linked { sync_dir(&tmp).and_then(|()| publish(out, &tmp, &name)).map(Some) } else { Ok(None) };
    if !matches!(result, Ok(Some(_))) {
        let _ = fs::remove_dir_all(&tmp);
    }
    result
}

/// Writes the checkpoint of `state.step` as `OUT/best/`, replacing the one there atomically
/// (see the module docs), and returns its directory.
pub fn save_best(out: &Path, state: TrainState, files: Files<'_>) -> Result<PathBuf> {
    save_as(out, BEST_DIR, state, files)
}

/// The periodic validation loss recorded in `OUT/best/state.json` and the `--eval-windows` it
/// was measured with, if there is a readable one.
pub fn best_val_loss(out: &Path) -> Option<(f32, usize)> {
    let state = read_state(&out.join(BEST_DIR)).ok()?;
    Some((state.val_loss?, state.options.eval_windows))
}

fn save_as(out: &Path, name: &str, mut state: TrainState, files: Files<'_>) -> Result<PathBuf> {
    fs::create_dir_all(out).map_err(|e| io_err(out, &e))?;
    let tmp = tmp_dir(out, name)?;
    let result = write_into(&tmp, &mut state, files).and_then(|()| publish(out, &tmp, name));
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result
}

/// The temporary directory `OUT/.tmp-NAME-<pid>` a checkpoint called `name` is assembled in
/// (the name [`remove_stale_temps`] and the module docs expect), with a stale one of
/// this process removed first. Not created.
fn tmp_dir(out: &Path, name: &str) -> Result<PathBuf> {
    let tmp = out.join(format!(".tmp-{name}-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| io_err(&tmp, &e))?;
    }
    Ok(tmp)
}

fn write_into(tmp: &Path, state: &mut TrainState, files: Files<'_>) -> Result<()> {
    fs::create_dir(tmp).map_err(|e| io_err(tmp, &e))?;
    let model = files.model;
    let model_bytes = serialize_safetensors(model)?;
    let optim_bytes = serialize_moments(files.adam_m, files.adam_v)?;
    state.files.clear();
    state.files.insert(MODEL_FILE.to_string(), sha256_hex(&model_bytes));
    state.files.insert(OPTIM_FILE.to_string(), sha256_hex(&optim_bytes));
    if let Some(tok) = files.tokenizer {
        state.files.insert(TOKENIZER_FILE.to_string(), tok.sha256().to_string());
    }
    state.self_sha256 = ZERO_HASH.to_string();
    let mut json = serde_json::to_vec_pretty(&state)?;
    json.push(b'\n');
    let self_hash = sha256_hex(&json);
    let json = replace_once(&json, ZERO_HASH.as_bytes(), self_hash.as_bytes())
        .ok_or_else(|| err!("internal error: state.json has no self_sha256 placeholder"))?;
    state.self_sha256 = self_hash;
    write_synced(&tmp.join(MODEL_FILE), &model_bytes)?;
    test_delay(CHECKPOINT_DELAY_VAR);
    write_synced(&tmp.join(OPTIM_FILE), &optim_bytes)?;
    write_synced(&tmp.join(STATE_FILE), &json)?;
    // For Hugging Face (`GPT2LMHeadModel.from_pretrained(dir)`); derived from the model's
    // checksummed metadata, which the loader checks it against, so it needs no checksum.
    write_synced(&tmp.join(hf::CONFIG_FILE), &hf::config_bytes(&model.config)?)?;
    if let Some(tok) = files.tokenizer {
        write_synced(&tmp.join(TOKENIZER_FILE), tok.json().as_bytes())?;
    }
    sync_dir(tmp)
}

/// Moves the finished temporary directory to its `step-*` name. An existing checkpoint of the
/// same step (a run resumed from an older checkpoint into the same directory) is first moved
/// aside, so there is never a moment when neither copy exists on disk.
fn publish(out: &Path, tmp: &Path, name: &str) -> Result<PathBuf> {
    let dest = out.join(name);
    let aside = out.join(format!(".replaced-{name}-{}", std::process::id()));
    let replaced = dest.exists();
    if replaced {
        if aside.exists() {
            fs::remove_dir_all(&aside).map_err(|e| io_err(&aside, &e))?;
        }
        fs::rename(&dest, &aside).map_err(|e| io_err(&dest, &e))?;
    }
    fs::rename(tmp, &dest).map_err(|e| io_err(&dest, &e))?;
    sync_dir(out)?;
    if replaced {
        fs::remove_dir_all(&aside).map_err(|e| io_err(&aside, &e))?;
    }
    Ok(dest)
}

/// Deletes all but the newest `keep` checkpoints in `out` (0 keeps all); returns what it
/// deleted. Called after [`save`], so the newest is always the one just written.
pub fn prune(out: &Path, keep: usize) -> Result<Vec<PathBuf>> {
    if keep == 0 {
        return Ok(Vec::new());
    }
    let all = list(out)?;
    let excess = all.len().saturating_sub(keep);
    let mut removed = Vec::new();
    let mut doomed = Vec::new();
    for (_, dir) in all.into_iter().take(excess) {
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("step");
        let aside = out.join(format!(".pruned-{name}-{}", std::process::id()));
        if aside.exists() {
            fs::remove_dir_all(&aside).map_err(|e| io_err(&aside, &e))?;
        }
        fs::rename(&dir, &aside).map_err(|e| io_err(&dir, &e))?;
        doomed.push(aside);
        removed.push(dir);
    }
    if !removed.is_empty() {
        // The renames are on disk before any file goes: a crash from here on leaves only
        // hidden directories, which `remove_stale_temps` clears on the next run.
        sync_dir(out)?;
    }
    for aside in doomed {
        fs::remove_dir_all(&aside).map_err(|e| io_err(&aside, &e))?;
    }
    Ok(removed)
}

/// Test-only: milliseconds to sleep in the middle of every checkpoint write (after the model
/// file, before the moments), so that `tests/crash_safety.rs` can kill a run inside a write.
/// Unset in normal use; never changes what is written.
#[doc(hidden)]
pub const CHECKPOINT_DELAY_VAR: &str = "CLLM_TEST_CHECKPOINT_DELAY_MS";
/// Test-only: milliseconds to sleep after every training step (`tests/crash_safety.rs` uses
/// it to signal a run at a known point). Unset in normal use; never changes what is computed.
#[doc(hidden)]
pub const STEP_DELAY_VAR: &str = "CLLM_TEST_STEP_DELAY_MS";

/// The delay the test-only variable `var` asks for (at most 10 s); `None` when it is unset or
/// not a number.
#[doc(hidden)]
pub fn test_delay_of(var: &str) -> Option<std::time::Duration> {
    let ms = std::env::var(var).ok()?.parse::<u64>().ok()?;
    Some(std::time::Duration::from_millis(ms.min(10_000)))
}

/// Sleeps for [`test_delay_of`] `var`, if set.
#[doc(hidden)]
pub fn test_delay(var: &str) {
    if let Some(d) = test_delay_of(var) {
        std::thread::sleep(d);
    }
}

/// Checks before the first step that checkpoints can be written into `out`: creates, writes,
/// fsyncs and removes the file `.probe-PID`, so a read-only or full directory fails the run at
/// once instead of after its last step. The error names the directory.
pub fn probe_writable(out: &Path) -> Result<()> {
    let probe = out.join(format!(".probe-{}", std::process::id()));
    let written = write_synced(&probe, b"cllm write probe\n");
    let removed = fs::remove_file(&probe);
    written.map_err(|e| err!("{}: the run directory is not writable ({e})", out.display()))?;
    removed.map_err(|e| err!("{}: cannot remove the write probe: {e}", out.display()))
}

/// Removes temporary directories that killed runs left in `out` (`.tmp-step-*-PID`,
/// `.replaced-step-*-PID`, `.pruned-step-*-PID`, `.tmp-best-PID` and `.replaced-best-PID`,
/// and the write probe `.probe-PID`, whose process is gone). Only done where
/// `/proc` tells whether a process lives; elsewhere they are left alone, which is harmless.
pub fn remove_stale_temps(out: &Path) {
    let proc_root = Path::new("/proc/self");
    if !proc_root.exists() {
        return;
    }
    let Ok(entries) = fs::read_dir(out) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if ![".tmp-step-", ".replaced-step-", ".pruned-step-", ".tmp-best-", ".replaced-best-", ".probe-"]
            .iter()
            .any(|p| name.starts_with(p))
        {
            continue;
        }
        let Some(pid) = name.rsplit('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if pid != std::process::id() && !Path::new("/proc").join(pid.to_string()).exists() {
            let path = entry.path();
            let _ = if path.is_dir() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
        }
    }
}

/// Checks what `state.json` says before anything is sized from it: the model config and the
/// options within their bounds, and the counters consistent (`adam_t` ≤ `step` ≤ the total,
/// the sampler drawing windows of the run's context from its training bytes).
pub fn check_state(s: &TrainState) -> std::result::Result<(), String> {
    s.model_config.validate()?;
    s.options.check_bounds(&s.model_config)?;
    if s.step > s.options.steps {
        return Err(format!("step {} is past the run's total of {} steps", s.step, s.options.steps));
    }
    if s.adam_t > s.step {
        return Err(format!(
            "adam_t {} exceeds step {} (Adam cannot have taken more updates than steps)",
            s.adam_t, s.step
        ));
    }
    let d = &s.data;
    if d.bytes > MAX_DATA_BYTES || d.train_bytes.checked_add(d.val_bytes) != Some(d.bytes) {
        return Err(format!(
            "data records {} bytes split {} + {} (at most {MAX_DATA_BYTES}, and the parts must add up)",
            d.bytes, d.train_bytes, d.val_bytes
        ));
    }
    let (train_len, unit) = match &d.tokens {
        None => (d.train_bytes, "bytes"),
        Some(t) => {
            if t.train_tokens.checked_add(t.val_tokens) != Some(t.tokens) || t.tokens > MAX_DATA_BYTES {
                return Err(format!(
                    "data records {} tokens split {} + {} (at most {MAX_DATA_BYTES}, and the parts must add up)",
                    t.tokens, t.train_tokens, t.val_tokens
                ));
            }
            if s.files.get(TOKENIZER_FILE) != Some(&t.tokenizer_sha256) {
                return Err(format!(
                    "data.tokens names tokenizer {}, files has no such {TOKENIZER_FILE}",
                    t.tokenizer_sha256
                ));
            }
            (t.train_tokens, "tokens")
        }
    };
    let sm = &s.sampler;
    if sm.words == [0; 4] || sm.seq_len != s.options.context as u64 || sm.data_len != train_len {
        return Err(format!(
            "sampler state (windows of {} over {} {unit}) does not match options.context {} and {train_len} training \
             {unit}, or its words are all zero",
            sm.seq_len, sm.data_len, s.options.context
        ));
    }
    Ok(())
}

fn read_state(dir: &Path) -> Result<TrainState> {
    let path = dir.join(STATE_FILE);
    let bytes = read_regular_file(&path, MAX_STATE_BYTES, "checkpoint state file")?;
    parse_state(&bytes).map_err(|e| e.context(path.display()))
}

/// Parses `state.json` bytes and verifies their `self_sha256` (the values are checked by
/// [`check_state`], which [`load`] calls next).
pub fn parse_state(bytes: &[u8]) -> Result<TrainState> {
    let state: TrainState =
        serde_json::from_slice(bytes).map_err(|e| err!("not a valid checkpoint state (truncated or damaged?): {e}"))?;
    if state.self_sha256.len() != 64 {
        bail!("missing self_sha256 checksum");
    }
    let zeroed = replace_once(bytes, state.self_sha256.as_bytes(), ZERO_HASH.as_bytes())
        .ok_or_else(|| err!("checksum field not found"))?;
    if sha256_hex(&zeroed) != state.self_sha256 {
        bail!("checksum mismatch (the file is damaged)");
    }
    Ok(state)
}

fn verify_checksum(path: &Path, bytes: &[u8], state: &TrainState) -> Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let Some(expected) = state.files.get(name) else {
        bail!("{}: no checksum recorded in {STATE_FILE}", path.display());
    };
    if &sha256_hex(bytes) != expected {
        bail!("{}: checksum mismatch (the file is truncated or damaged; {} bytes)", path.display(), bytes.len());
    }
    Ok(())
}

fn serialize_moments(m: &[f32], v: &[f32]) -> Result<Vec<u8>> {
    if m.len() != v.len() {
        bail!("internal error: Adam moments have different lengths ({} and {})", m.len(), v.len());
    }
    let mb: Vec<u8> = m.iter().flat_map(|x| x.to_le_bytes()).collect();
    let vb: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    let views = vec![
        ("adam.m".to_string(), TensorView::new(Dtype::F32, vec![m.len()], &mb).map_err(|e| err!("adam.m: {e}"))?),
        ("adam.v".to_string(), TensorView::new(Dtype::F32, vec![v.len()], &vb).map_err(|e| err!("adam.v: {e}"))?),
    ];
    safetensors::tensor::serialize(views, &None).map_err(|e| err!("cannot serialize optimizer state: {e}"))
}

/// The AdamW moments `adam.m` and `adam.v` of a model of `n` parameters: exactly those two
/// tensors, F32 `[n]` each (so the buffers are as large as the input backs), every value
/// finite and every `v` ≥ 0 (a second moment is a running mean of squares).
pub fn deserialize_moments(bytes: &[u8], n: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| err!("not a valid safetensors file: {e:?}"))?;
    let mut names = st.names();
    names.sort();
    if names != ["adam.m", "adam.v"] {
        bail!("expected exactly the tensors \"adam.m\" and \"adam.v\", found {names:?}");
    }
    let read = |name: &str, nonnegative: bool| -> Result<Vec<f32>> {
        let view = st.tensor(name).map_err(|_| err!("missing tensor \"{name}\""))?;
        if view.dtype() != Dtype::F32 || view.shape() != [n] {
            bail!("tensor \"{name}\": {:?} {:?}, expected F32 [{n}]", view.dtype(), view.shape());
        }
        let values: Vec<f32> =
            view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        if let Some((i, x)) = values.iter().enumerate().find(|(_, x)| !x.is_finite() || (nonnegative && **x < 0.0)) {
            bail!(
                "tensor \"{name}\": invalid value {x} at index {i} (must be finite{})",
                if nonnegative { " and >= 0" } else { "" }
            );
        }
        Ok(values)
    };
    Ok((read("adam.m", false)?, read("adam.v", true)?))
}

fn replace_once(haystack: &[u8], needle: &[u8], with: &[u8]) -> Option<Vec<u8>> {
    let pos = haystack.windows(needle.len()).position(|w| w == needle)?;
    let mut out = haystack.to_vec();
    out[pos..pos + needle.len()].copy_from_slice(with);
    Some(out)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(|e| io_err(path, &e))?;
    f.write_all(bytes).map_err(|e| io_err(path, &e))?;
    f.sync_all().map_err(|e| io_err(path, &e))
}

/// Makes renames and creations inside `dir` durable. Some filesystems cannot fsync a
/// directory at all (EINVAL); there, the rename is as durable as the filesystem allows.
fn sync_dir(dir: &Path) -> Result<()> {
    let f = File::open(dir).map_err(|e| io_err(dir, &e))?;
    match f.sync_all() {
        Ok(()) => Ok(()),
        Err(e) if matches!(e.kind(), io::ErrorKind::InvalidInput | io::ErrorKind::Unsupported) => Ok(()),
        Err(e) => Err(io_err(dir, &e)),
    }
}

/// The lock file of a run directory: `OUT/.lock`, holding the PID of the run that holds it.
pub const LOCK_FILE: &str = ".lock";

/// An exclusive claim on a run directory, held for as long as the value lives.
///
/// The claim is an advisory `flock` on [`LOCK_FILE`] (through `File::try_lock`): the kernel
/// releases it when the process exits, however it exits, so a SIGKILL never leaves a stale lock,
/// and the file's content (the holder's PID) is only a hint for the error message.
pub struct RunLock {
    _file: File,
}

/// Claims `out` for one writer. A second `cllm train` on the same directory fails at once,
/// naming the directory and the holder's PID; readers (`eval`, `generate`) take no lock.
pub fn lock_run_dir(out: &Path) -> Result<RunLock> {
    let path = out.join(LOCK_FILE);
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| io_err(&path, &e))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            // The holder writes its PID right after locking; a few bytes are all there is to read.
            let _ = (&mut file).take(32).read_to_string(&mut holder);
            let holder = holder.trim();
            bail!(
                "run directory {} is in use by another cllm train (pid {}); wait for it to finish or choose another --out",
                out.display(),
                if holder.is_empty() { "unknown" } else { holder }
            );
        }
        Err(fs::TryLockError::Error(e)) => return Err(io_err(&path, &e)),
    }
    file.set_len(0).map_err(|e| io_err(&path, &e))?;
    file.write_all(format!("{}\n", std::process::id()).as_bytes()).map_err(|e| io_err(&path, &e))?;
    Ok(RunLock { _file: file })
}

fn io_err(path: &Path, e: &io::Error) -> Error {
    match e.kind() {
        io::ErrorKind::NotFound => err!("{}: no such file or directory", path.display()),
        io::ErrorKind::PermissionDenied => err!("{}: permission denied", path.display()),
        _ => err!("{}: {e}", path.display()),
    }
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_names_round_trip_with_six_digits() {
        assert_eq!(step_dir_name(42), "step-000042");
        assert_eq!(parse_step_dir_name("step-000042"), Some(42));
        assert_eq!(parse_step_dir_name("step-1234567"), Some(1_234_567));
    }

    #[test]
    fn temporary_names_are_not_checkpoints() {
        for name in [
            ".tmp-step-000042-123",
            ".replaced-step-000042-9",
            ".pruned-step-000042-9",
            "step-",
            "step-12a",
            "steps-000001",
        ] {
            assert_eq!(parse_step_dir_name(name), None, "{name}");
        }
    }

    #[test]
    fn prune_leaves_no_partial_step_directory_and_stale_leftovers_are_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        for step in 1..=3 {
            let d = out.join(step_dir_name(step));
            fs::create_dir(&d).unwrap();
            fs::write(d.join(STATE_FILE), b"{}").unwrap();
        }
        let removed = prune(out, 1).unwrap();
        assert_eq!(removed.len(), 2);
        let names: Vec<String> =
            fs::read_dir(out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert_eq!(names, [step_dir_name(3)], "only the newest is left, nothing half-deleted or hidden");

        // What a prune killed between its rename and its delete leaves behind: hidden, so never
        // listed, and cleared once its process is gone.
        let leftover = out.join(".pruned-step-000002-4000000000");
        fs::create_dir(&leftover).unwrap();
        fs::write(leftover.join(MODEL_FILE), b"partial").unwrap();
        assert_eq!(list(out).unwrap().len(), 1);
        remove_stale_temps(out);
        assert!(!leftover.exists() || !Path::new("/proc/self").exists());
    }

    #[test]
    fn prune_never_deletes_best_and_stale_best_temps_are_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        for name in [step_dir_name(1), step_dir_name(2), BEST_DIR.to_string()] {
            fs::create_dir(out.join(&name)).unwrap();
        }
        prune(out, 1).unwrap();
        assert!(out.join(BEST_DIR).is_dir(), "--keep must not delete best/");
        assert_eq!(list(out).unwrap(), [(2, out.join(step_dir_name(2)))], "best/ is not a step checkpoint");
        let leftovers = [out.join(".tmp-best-4000000000"), out.join(".replaced-best-4000000000")];
        for l in &leftovers {
            fs::create_dir(l).unwrap();
        }
        remove_stale_temps(out);
        if Path::new("/proc/self").exists() {
            assert!(leftovers.iter().all(|l| !l.exists()));
        }
        assert!(out.join(BEST_DIR).is_dir());
    }
}
