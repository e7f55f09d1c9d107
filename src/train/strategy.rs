//! How the workers of one step combine their gradients, and how gradients are clipped.

use std::fmt;
use std::str::FromStr;

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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Strategy {
    /// The original design, kept as the baseline: forward/backward under one model mutex (one
    /// shared set of activations), then accumulation under a gradient mutex, taken while the
    /// model mutex is still held (lock order: model, then gradient).
    ModelLock,
    /// Forward/backward in parallel against read-only weights; each finished micro-batch is
    /// added into one shared accumulator under a mutex, in arrival order.
    GradientLock,
    /// Forward/backward in parallel into per-micro-batch buffers; after a barrier, workers
    /// reduce disjoint parameter chunks, each summing the micro-batches in index order. No lock
    /// on the hot path.
    #[default]
    Segmented,
    /// What a typical Rust developer would write: micro-batches as a rayon parallel iterator
    /// with a parallel reduction of their gradients on a rayon pool of `threads` threads. Not
    /// model-checked (rayon's threads are outside the sync backend).
    Rayon,
}

impl Strategy {
    pub const ALL: [Strategy; 4] = [Strategy::ModelLock, Strategy::GradientLock, Strategy::Segmented, Strategy::Rayon];

    pub fn name(self) -> &'static str {
        match self {
            Strategy::ModelLock => "model-lock",
            Strategy::GradientLock => "gradient-lock",
            Strategy::Segmented => "segmented",
            Strategy::Rayon => "rayon",
        }
    }

    /// True if the final weights are bit-identical for every thread count and every run.
    pub fn is_deterministic(self) -> bool {
        self == Strategy::Segmented
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Strategy {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        Strategy::ALL.into_iter().find(|x| x.name() == s).ok_or_else(|| {
            crate::err!("unknown strategy '{s}' (expected model-lock, gradient-lock, segmented or rayon)")
        })
    }
}

/// Where the gradient is clipped to `clip_norm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum ClipMode {
    /// Clip the averaged gradient to the global norm bound.
    #[default]
    Global,
    /// Clip each micro-batch's gradient before accumulation, as the original C system did.
    PerSphere,
}

impl ClipMode {
    pub fn name(self) -> &'static str {
        match self {
            ClipMode::Global => "global",
            ClipMode::PerSphere => "per-sphere",
        }
    }
}

impl fmt::Display for ClipMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ClipMode {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "global" => Ok(ClipMode::Global),
            "per-sphere" => Ok(ClipMode::PerSphere),
            _ => Err(crate::err!("unknown clip mode '{s}' (expected global or per-sphere)")),
        }
    }
}

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
    }

    #[test]
    fn clip_mode_names_round_trip() {
        for c in [ClipMode::Global, ClipMode::PerSphere] {
            assert_eq!(c.to_string().parse::<ClipMode>().unwrap(), c);
        }
        assert!("none".parse::<ClipMode>().is_err());
    }
}
