//! Threaded training: persistent workers ("spheres"), the step barrier, the four strategies.
//!
//! [`Trainer`] runs one training step of a GPT model over a global batch with `threads` worker
//! threads. The batch is split into `spheres` micro-batches (fixed, independent of the thread
//! count); each gradient is checked on its own and invalid (NaN/Inf) ones are skipped; the
//! average is clipped and applied with AdamW. With the default `segmented` strategy the
//! gradients are added in a fixed summation tree over the micro-batches, so the weights after
//! any number of steps are bit-identical for every thread count, in memory that grows with
//! log S per worker.
//!
//! - [`barrier`]: the generation-counting step barrier.
//! - [`strategy`]: [`Strategy`] and [`ClipMode`].
//! - [`protocol`]: the step protocol of the persistent workers, its phases and invariants,
//!   generic over the sync backend ([`crate::sync`]) and the [`Workload`], so loom and shuttle
//!   check the real code; [`lock_strategies`]: the compute phase of the two lock strategies.
//! - [`tree`]: `segmented`'s summation tree (ranges, blocks, the counter, the buffer bound
//!   [`tree::max_live_buffers`]); [`segmented`]: its compute and reduce phases.
//! - [`engine`]: [`Engine`], which builds the workers, publishes each step, collects its
//!   report and shuts the workers down.
//! - [`tally`]: the step report and skip bookkeeping every engine shares.
//! - [`fault`]: the deliberately broken protocol variants the model checks must catch.
//! - [`rayon_engine`]: the `rayon` strategy (not model-checked).
//! - [`workload`]: the [`Workload`] trait, the real [`GptWorkload`], the fake [`ScaleWorkload`].
//! - [`reference`]: a serial oracle of the step semantics, for tests.
//! - [`timing`]: per-worker phase timings in every [`StepReport`].
//! - [`trainer`]: [`Trainer`], the GPT-facing API.
//! - `run`: the training loop driven by `cllm train`; [`options`]: its settings ([`RunOptions`]);
//!   [`schedule`]: the learning rate; [`eval`]: the validation loss (shared with `cllm eval`);
//!   [`progress`]: stderr progress and the metrics file.

pub mod barrier;
pub mod distributed;
pub mod engine;
pub mod eval;
pub mod fault;
pub mod lock_strategies;
pub mod options;
pub mod progress;
pub mod protocol;
pub mod rayon_engine;
pub mod reference;
pub mod run;
pub mod schedule;
pub mod segmented;
pub mod strategy;
pub mod tally;
pub mod timing;
pub mod trainer;
pub mod tree;
pub mod workload;

pub use engine::{resolve_spheres, Engine, DEFAULT_CHUNK};
#[doc(hidden)]
pub use fault::Fault;
pub use options::RunOptions;
pub use rayon_engine::RayonEngine;
pub use reference::{Reference, Summation};
pub use schedule::LrSchedule;
pub use strategy::{ClipMode, Strategy};
pub use timing::{StepTimings, WorkerTiming};
pub use trainer::Trainer;
pub use workload::{GptWorkload, ScaleWorkload, StepBatch, Workload};

use crate::optim::{AdamWConfig, DecayMask};
use serde::Serialize;

/// Most worker threads an engine accepts (the CLI, `bench` and the engines share this bound).
pub const MAX_THREADS: usize = 256;

/// Options of a [`Trainer`] (and of the engines behind it).
#[derive(Clone, Debug, PartialEq)]
pub struct TrainerOptions {
    /// Worker threads, 1..=[`MAX_THREADS`]. Default: the machine's available parallelism.
    pub threads: usize,
    /// Micro-batches per step ("logical spheres"); must divide the batch size. 0 picks the
    /// largest divisor of the batch size that is at most 8 (that is, min(8, batch) whenever
    /// that divides it). Results depend on this, never on `threads`.
    pub spheres: usize,
    pub strategy: Strategy,
    /// Global-norm bound of the gradient (0 disables clipping). Default 10.
    pub clip_norm: f32,
    pub clip_mode: ClipMode,
    pub adamw: AdamWConfig,
    /// The parameters `adamw.weight_decay` applies to (`None`: all of them).
    pub decay_mask: Option<DecayMask>,
    /// After this many consecutive steps without a valid micro-batch, `step` returns an error
    /// (0: never). Default 3.
    pub max_skipped_steps: usize,
    /// Fault injection: (step from 1, micro-batch from 0) pairs whose gradient gets a NaN
    /// written into it after it is computed and before it is scanned.
    pub inject_nan: Vec<(u64, usize)>,
    /// Floats per chunk of the parallel reduction, norm and optimizer. Fixes the summation
    /// order, so results depend on it (never on `threads`). Default 16 Ki.
    pub chunk_size: usize,
    /// Dropout probability in [0, 1) on the attention probabilities and both residual
    /// branches, training only; 0 (the default) is none. Its masks are keyed by
    /// `dropout_seed`, the step and the micro-batch, so they do not depend on `threads`.
    pub dropout: f32,
    pub dropout_seed: u64,
}

impl Default for TrainerOptions {
    fn default() -> Self {
        TrainerOptions {
            threads: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(MAX_THREADS),
            spheres: 0,
            strategy: Strategy::default(),
            clip_norm: options::DEFAULT_CLIP_NORM,
            clip_mode: ClipMode::default(),
            adamw: AdamWConfig::default(),
            decay_mask: None,
            max_skipped_steps: 3,
            inject_nan: Vec::new(),
            chunk_size: DEFAULT_CHUNK,
            dropout: 0.0,
            dropout_seed: 0,
        }
    }
}

/// What one step did.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct StepReport {
    /// Step number, from 1 (skipped updates count as steps).
    pub step: u64,
    /// Mean loss of the valid micro-batches (NaN if none).
    pub loss: f32,
    /// Norm of the averaged gradient before global clipping (per-sphere mode: of the average
    /// of the per-sphere-clipped gradients). NaN if the update was skipped.
    pub grad_norm: f32,
    /// Largest pre-clip norm of a valid micro-batch gradient.
    pub max_sphere_norm: f32,
    /// True if clipping scaled the gradient (any sphere, in per-sphere mode).
    pub clipped: bool,
    /// Micro-batches whose gradient had NaN/Inf, in index order; they did not contribute.
    pub skipped_spheres: Vec<usize>,
    /// The first five bad entries of the step as (micro-batch, index, value).
    pub bad_values: Vec<(usize, usize, f32)>,
    /// True if no micro-batch was valid: weights and Adam state untouched, Adam's t not
    /// advanced (PyTorch's behaviour for a skipped update).
    pub update_skipped: bool,
    /// Adam's t after this step (the number of updates applied so far).
    pub adam_t: u64,
    pub timings: StepTimings,
}
