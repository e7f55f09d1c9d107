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
use crate::model::ParamLayout;
use crate::optim::{AdamWConfig, DecayMask};

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

/// Upper bounds on the counts a run sizes memory or loops from, checked by
/// [`RunOptions::check_bounds`] whenever options are read from a checkpoint's `state.json`, so
/// a damaged or hostile file is refused before anything is allocated from it. They are far
/// above any run on one machine (the presets use batch 4 to 8, 2000 steps, 32 windows).
pub const MAX_BATCH: usize = 1 << 16;
/// See [`MAX_BATCH`]: batch × context, the tokens of one step.
pub const MAX_TOKENS_PER_STEP: usize = 1 << 20;
/// See [`MAX_BATCH`].
pub const MAX_STEPS: u64 = 1 << 40;
/// See [`MAX_BATCH`].
pub const MAX_EVAL_WINDOWS: usize = 1 << 20;

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
    /// Decoupled AdamW weight decay of the linear layers' weights (GPT-2 practice: never
    /// biases or LayerNorm parameters; see [`crate::optim::DecayMask::gpt2`]). Absent from
    /// `state.json` when 0, so runs without it record the same bytes as before it existed.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub weight_decay: f32,
    /// Weight decay applies to the token and position embeddings too.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub decay_embeddings: bool,
    /// Training dropout (GPT-2's sites; [`crate::model::dropout`]). Absent from `state.json`
    /// when 0, so runs without it record the same bytes as before it existed.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dropout: f32,
    pub val_fraction: f64,
    pub eval_every: u64,
    pub eval_windows: usize,
    pub save_every: u64,
    pub keep: usize,
}

impl RunOptions {
    /// Checks every count against its bound and the options against each other and the model
    /// (`context` ≤ the model's context, `spheres` divides `batch`, `warmup_steps` ≤ `steps`,
    /// finite rates); the error names the first bad field.
    pub fn check_bounds(&self, model: &crate::config::ModelConfig) -> Result<(), String> {
        let counts: [(&str, u64, u64); 6] = [
            ("context", self.context as u64, model.context as u64),
            ("batch", self.batch as u64, MAX_BATCH as u64),
            ("spheres", self.spheres as u64, self.batch as u64),
            ("threads", self.threads as u64, super::MAX_THREADS as u64),
            ("steps", self.steps, MAX_STEPS),
            ("eval_windows", self.eval_windows as u64, MAX_EVAL_WINDOWS as u64),
        ];
        for (field, value, max) in counts {
            if !(1..=max).contains(&value) {
                return Err(format!("options.{field} is {value}, must be between 1 and {max}"));
            }
        }
        if self.batch.checked_mul(self.context).is_none_or(|n| n > MAX_TOKENS_PER_STEP) {
            return Err(format!(
                "options.batch {} × context {} exceeds {MAX_TOKENS_PER_STEP} tokens a step",
                self.batch, self.context
            ));
        }
        if !self.batch.is_multiple_of(self.spheres) {
            return Err(format!("options.spheres {} does not divide batch {}", self.spheres, self.batch));
        }
        if self.warmup_steps > self.steps {
            return Err(format!("options.warmup_steps {} exceeds steps {}", self.warmup_steps, self.steps));
        }
        let finite = [
            ("lr", self.lr > 0.0 && self.lr.is_finite()),
            ("min_lr_ratio", (0.0..=1.0).contains(&self.min_lr_ratio)),
            ("clip_norm", self.clip_norm >= 0.0 && self.clip_norm.is_finite()),
            ("weight_decay", self.weight_decay >= 0.0 && self.weight_decay.is_finite()),
            ("val_fraction", (0.0..1.0).contains(&self.val_fraction)),
            ("dropout", (0.0..1.0).contains(&self.dropout)),
        ];
        match finite.iter().find(|(_, ok)| !ok) {
            Some((field, _)) => Err(format!("options.{field} is out of range")),
            None => Ok(()),
        }
    }

    /// The engine's options for this run over `layout` (which the weight-decay mask covers);
    /// `inject_nan` (fault injection, never recorded in a checkpoint) comes from the command
    /// line.
    pub fn trainer_options(&self, inject_nan: Vec<(u64, usize)>, layout: &ParamLayout) -> TrainerOptions {
        TrainerOptions {
            adamw: AdamWConfig { weight_decay: self.weight_decay, ..AdamWConfig::default() },
            decay_mask: Some(DecayMask::gpt2(layout, self.decay_embeddings)),
            threads: self.threads,
            spheres: self.spheres,
            strategy: self.strategy,
            clip_norm: self.clip_norm,
            clip_mode: self.clip_mode,
            inject_nan,
            dropout: self.dropout,
            dropout_seed: self.seed,
            ..TrainerOptions::default()
        }
    }
}

/// For serde: a weight decay of 0 is left out of `state.json`.
fn is_zero(x: &f32) -> bool {
    *x == 0.0
}
