//! How the workers of one step combine their gradients, and how gradients are clipped.
//!
//! Both are options of a run, so they derive clap's `ValueEnum` and serde with one kebab-case
//! spelling (`gradient-lock`, `per-sphere`), and get `Display`/`FromStr` from it
//! (`crate::names`).

use serde::{Deserialize, Serialize};

/// The synchronization strategy of a training step.
///
/// | strategy        | hot-path locks            | sum order               | bit-deterministic |
/// |-----------------|---------------------------|-------------------------|-------------------|
/// | `model-lock`    | model mutex + grad mutex  | arrival order           | only with 1 thread|
/// | `gradient-lock` | grad mutex                | arrival order           | only with 1 thread|
/// | `segmented`     | none                      | micro-batch index order | yes, any N        |
/// | `rayon`         | (rayon's work stealing)   | rayon's reduction tree  | no                |
///
/// All four run the norm and AdamW over the same fixed chunks, so only the gradient sum order
/// differs; with one thread the two lock strategies add in index order and equal `segmented`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// The original design, kept as the baseline: forward/backward under one model mutex (one
    /// shared set of activations), then accumulation under a gradient mutex, taken while the
    /// model mutex is still held (lock order: model, then gradient).
    #[value(help = "mutexes around the model and the gradient sum, the baseline (deterministic only with 1 thread)")]
    ModelLock,
    /// Forward/backward in parallel against read-only weights; each finished micro-batch is
    /// added into one shared accumulator under a mutex, in arrival order.
    #[value(help = "a mutex around the gradient sum (deterministic only with 1 thread)")]
    GradientLock,
    /// Forward/backward in parallel into per-micro-batch buffers; after a barrier, workers
    /// reduce disjoint parameter chunks, each summing the micro-batches in index order. No lock
    /// on the hot path.
    #[default]
    #[value(help = "lock-free, bit-deterministic at any thread count")]
    Segmented,
    /// What a typical Rust developer would write: micro-batches as a rayon parallel iterator
    /// with a parallel reduction of their gradients on a rayon pool of `threads` threads. Not
    /// model-checked (rayon's threads are outside the sync backend).
    #[value(help = "a rayon parallel iterator and reduction, for comparison (not deterministic)")]
    Rayon,
}

impl Strategy {
    pub const ALL: [Strategy; 4] = [Strategy::ModelLock, Strategy::GradientLock, Strategy::Segmented, Strategy::Rayon];

    /// True if the final weights are bit-identical for every thread count and every run.
    pub fn is_deterministic(self) -> bool {
        self == Strategy::Segmented
    }
}

crate::names::value_names!(Strategy, "strategy");

/// Where the gradient is clipped to `clip_norm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClipMode {
    /// Clip the averaged gradient to the global norm bound.
    #[default]
    #[value(help = "the averaged gradient")]
    Global,
    /// Clip each micro-batch's gradient before accumulation, as the original C system did.
    #[value(help = "each microbatch's gradient, before they are combined")]
    PerSphere,
}

crate::names::value_names!(ClipMode, "clip mode");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strategy_names_round_trip() {
        for s in Strategy::ALL {
            assert_eq!(s.to_string().parse::<Strategy>().unwrap(), s);
        }
        assert!("fast".parse::<Strategy>().is_err());
        assert_eq!(Strategy::default(), Strategy::Segmented);
        assert_eq!(<Strategy as clap::ValueEnum>::value_variants(), Strategy::ALL, "ALL lists every variant");
    }

    #[test]
    fn clip_mode_names_round_trip() {
        for c in [ClipMode::Global, ClipMode::PerSphere] {
            assert_eq!(c.to_string().parse::<ClipMode>().unwrap(), c);
        }
        assert!("none".parse::<ClipMode>().is_err());
    }
}
