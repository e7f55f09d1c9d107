//! The learning-rate schedule: linear warmup, then constant or cosine decay.
//!
//! The rate of a step is a function of the step number and the run's settings alone
//! ([`lr_at`]), never of what happened before it, so a resumed run follows exactly the schedule
//! an uninterrupted one would.

use serde::{Deserialize, Serialize};

/// The smallest learning rate of the cosine schedule, as a fraction of the peak.
pub const MIN_LR_RATIO: f64 = 0.1;
/// The default warmup is a tenth of the run ([`default_warmup`]) ...
pub const DEFAULT_WARMUP_DIVISOR: u64 = 10;
/// ... but at most this many steps.
pub const MAX_DEFAULT_WARMUP: u64 = 100;

/// How the learning rate evolves after warmup (`--lr-schedule`, spelled the same in
/// `state.json`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LrSchedule {
    /// The peak rate until the end
    Constant,
    /// Half a cosine from the peak down to a tenth of it at the last step
    #[default]
    Cosine,
}

crate::names::value_names!(LrSchedule, "learning-rate schedule");

/// Warmup steps of a run of `steps` steps when not given: `steps / 10`, at most 100.
pub fn default_warmup(steps: u64) -> u64 {
    (steps / DEFAULT_WARMUP_DIVISOR).min(MAX_DEFAULT_WARMUP)
}

/// The learning rate of `step` (counted from 1) in a run of `total` steps: a function of
/// nothing else, so a resumed run follows the same schedule as an uninterrupted one.
pub fn lr_at(schedule: LrSchedule, peak: f64, min_ratio: f64, warmup: u64, step: u64, total: u64) -> f64 {
    if warmup > 0 && step <= warmup {
        return peak * step as f64 / warmup as f64;
    }
    match schedule {
        LrSchedule::Constant => peak,
        LrSchedule::Cosine => {
            let span = total.saturating_sub(warmup).max(1) as f64;
            let progress = ((step - warmup.min(step)) as f64 / span).clamp(0.0, 1.0);
            let min = peak * min_ratio;
            min + (peak - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_rises_linearly_to_the_peak() {
        let lr = |s| lr_at(LrSchedule::Cosine, 1.0, 0.1, 4, s, 10);
        assert_eq!([lr(1), lr(2), lr(4)], [0.25, 0.5, 1.0]);
    }

    #[test]
    fn cosine_ends_at_the_minimum_on_the_last_step() {
        assert!((lr_at(LrSchedule::Cosine, 2.0, 0.1, 2, 10, 10) - 0.2).abs() < 1e-12);
    }

    #[test]
    fn cosine_is_halfway_at_the_middle_of_the_decay() {
        assert!((lr_at(LrSchedule::Cosine, 1.0, 0.0, 0, 5, 10) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn constant_stays_at_the_peak_after_warmup() {
        assert_eq!(lr_at(LrSchedule::Constant, 0.3, 0.1, 2, 9, 10), 0.3);
    }

    #[test]
    fn default_warmup_is_a_tenth_of_the_run_capped_at_100_steps() {
        assert_eq!([default_warmup(5), default_warmup(50), default_warmup(2000)], [0, 5, 100]);
    }
}
