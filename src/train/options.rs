//! The settings of a training run ([`RunOptions`]), their defaults, and the engine options they
//! give ([`RunOptions::trainer_options`]).
//!
//! A setting has one type from the command line to the engine: `cllm train` parses a flag into
//! the type used here (clap's `ValueEnum` for the enumerations), merges it with a resumed
//! checkpoint's value or the default below, and the result is both recorded in `state.json`
//! (this struct, serialized; field order and enum spellings are those of every earlier
//! checkpoint) and handed to the engine. The `[default: …]` notes of `cllm train --help` are
//! built from the constants here, and `tests/cli_help.rs` checks them against what a run uses.

use serde::{Deserialize, Serialize};

use super::schedule::LrSchedule;
use super::{ClipMode, Strategy, TrainerOptions};

/// Default model preset.
pub const DEFAULT_CONFIG: &str = "small";
/// Default total steps: about three minutes of the `small` config on two cores (~80 ms a step
/// with 2 threads, plus periodic validation and checkpoints).
pub const DEFAULT_STEPS: u64 = 2000;
/// Default peak learning rate. Measured on the default run (small, 1000 steps, batch 8): validation
/// loss 1.90 nats at 3e-3 against 2.10 at 1e-3, with visibly more real words in the sample.
pub const DEFAULT_LR: f64 = 3e-3;
/// Default seed (model initialisation and batch sampling).
pub const DEFAULT_SEED: u64 = 1337;
/// Default global gradient-norm clip (the contract; 0 disables). Also the engine's
/// default ([`TrainerOptions::default`]).
pub const DEFAULT_CLIP_NORM: f32 = 10.0;
/// The default sphere count is the largest divisor of the batch up to this (the rule of
/// [`crate::train::resolve_spheres`], which `cllm train` applies; `--spheres --help` quotes it).
pub const MAX_DEFAULT_SPHERES: usize = 8;
/// Default validation interval in steps (0: only at the end).
pub const DEFAULT_EVAL_EVERY: u64 = 100;
/// Validation windows evaluated each time (fixed, so losses are comparable across a run).
pub const DEFAULT_EVAL_WINDOWS: usize = 32;
/// Default checkpoint interval in steps (0: only at the end).
pub const DEFAULT_SAVE_EVERY: u64 = 200;
/// Checkpoints kept by default (0: all).
pub const DEFAULT_KEEP: usize = 3;

/// The training options of a run, as recorded in `state.json`. Enumerations are stored by
/// their command-line spelling (`"segmented"`, `"per-sphere"`, `"cosine"`), so the file reads
/// the same as the command that made it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunOptions {
    /// Preset name (`tiny`, `small`, `seed`).
    pub config_name: String,
    /// Training sequence length (≤ the model's context).
    pub context: usize,
    pub batch: usize,
    /// Total steps of the run (a resumed run continues up to it).
    pub steps: u64,
    pub lr: f64,
    pub lr_schedule: LrSchedule,
    pub warmup_steps: u64,
    /// The cosine schedule ends at `lr * min_lr_ratio`.
    pub min_lr_ratio: f64,
    pub seed: u64,
    pub threads: usize,
    /// Micro-batches per step, resolved (never 0 here).
    pub spheres: usize,
    pub strategy: Strategy,
    pub clip_norm: f32,
    pub clip_mode: ClipMode,
    pub val_fraction: f64,
    pub eval_every: u64,
    pub eval_windows: usize,
    pub save_every: u64,
    pub keep: usize,
}

impl RunOptions {
    /// The engine's options for this run; `inject_nan` (fault injection, never recorded in a
    /// checkpoint) comes from the command line.
    pub fn trainer_options(&self, inject_nan: Vec<(u64, usize)>) -> TrainerOptions {
        TrainerOptions {
            threads: self.threads,
            spheres: self.spheres,
            strategy: self.strategy,
            clip_norm: self.clip_norm,
            clip_mode: self.clip_mode,
            inject_nan,
            ..TrainerOptions::default()
        }
    }
}
