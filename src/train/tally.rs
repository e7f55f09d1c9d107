//! The step semantics every engine shares once the gradients are known: the update's scaling,
//! the per-sphere clip factor, the step report (`StepTally`) and the counters that outlive a
//! step (`StepCounters`: steps, Adam's t, consecutive skipped updates and their limit).
//!
//! The sphere engine and the rayon engine differ in how they compute and sum the gradients;
//! from the per-micro-batch outcomes on, they fill the report alike, through these types. The
//! arithmetic here (mean loss in f64, the norm and the clip factor) is the one the serial oracle
//! ([`super::Reference`]) uses too.

use super::strategy::ClipMode;
use super::StepReport;
use crate::grad::{self, Scan};
use crate::{bail, Result};

/// The scaling the update applies, a pure function of the chunk norms, so every worker (and
/// the coordinator) derives the same numbers.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Scaling {
    /// Norm of the averaged gradient before global clipping.
    pub grad_norm: f64,
    /// True if global clipping scaled the gradient down.
    pub clipped: bool,
    /// The factor AdamW multiplies the summed gradient by: clip / n_valid.
    pub grad_scale: f32,
}

pub(crate) fn scaling(sum_sq: f64, n_valid: usize, clip_norm: f32, mode: ClipMode) -> Scaling {
    let grad_norm = sum_sq.sqrt() / n_valid as f64;
    let clip = match mode {
        ClipMode::Global => grad::clip_factor(grad_norm, clip_norm),
        ClipMode::PerSphere => 1.0,
    };
    Scaling { grad_norm, clipped: clip < 1.0, grad_scale: (clip as f64 / n_valid as f64) as f32 }
}

/// The per-sphere clip factor of one micro-batch.
pub(crate) fn sphere_factor(scan: &Scan, clip_norm: f32, mode: ClipMode) -> f32 {
    match mode {
        ClipMode::PerSphere if scan.is_valid() => grad::clip_factor(scan.norm(), clip_norm),
        _ => 1.0,
    }
}

/// Fills one step's [`StepReport`] from the micro-batch outcomes, given in index order.
pub(crate) struct StepTally<'r> {
    report: &'r mut StepReport,
    loss_sum: f64,
    n_valid: usize,
    max_norm: f64,
    sphere_clipped: bool,
}

impl<'r> StepTally<'r> {
    /// Starts the report of step `step`, reusing its buffers.
    pub fn begin(report: &'r mut StepReport, step: u64) -> Self {
        report.step = step;
        report.skipped_spheres.clear();
        report.bad_values.clear();
        StepTally { report, loss_sum: 0.0, n_valid: 0, max_norm: 0.0, sphere_clipped: false }
    }

    /// A valid micro-batch: its loss, gradient norm (before clipping) and per-sphere factor.
    pub fn valid(&mut self, loss: f32, norm: f64, factor: f32) {
        self.n_valid += 1;
        self.loss_sum += loss as f64;
        self.max_norm = self.max_norm.max(norm);
        self.sphere_clipped |= factor < 1.0;
    }

    /// Micro-batch `m` was invalid; `bad` are the first bad (index, value) entries of its scan.
    pub fn invalid(&mut self, m: usize, bad: &[(usize, f32)]) {
        self.report.skipped_spheres.push(m);
        for &(i, v) in bad {
            if self.report.bad_values.len() < grad::MAX_BAD {
                self.report.bad_values.push((m, i, v));
            }
        }
    }

    pub fn n_valid(&self) -> usize {
        self.n_valid
    }

    /// Completes the report given `total`, the squared norm of the summed gradient (NaN when no
    /// micro-batch was valid). Returns the update's scaling, or `None` when the update is
    /// skipped (no valid micro-batch, or a sum that overflowed f32).
    pub fn finish(self, total: f64, clip_norm: f32, mode: ClipMode) -> Option<Scaling> {
        let r = self.report;
        r.loss = if self.n_valid > 0 { (self.loss_sum / self.n_valid as f64) as f32 } else { f32::NAN };
        r.max_sphere_norm = self.max_norm as f32;
        r.update_skipped = !total.is_finite();
        if r.update_skipped {
            r.grad_norm = f32::NAN;
            r.clipped = false;
            return None;
        }
        let s = scaling(total, self.n_valid, clip_norm, mode);
        r.grad_norm = s.grad_norm as f32;
        r.clipped = s.clipped || self.sphere_clipped;
        Some(s)
    }
}

/// The counters an engine keeps across steps.
#[derive(Clone, Debug)]
pub(crate) struct StepCounters {
    /// Steps taken (skipped updates included).
    pub step: u64,
    /// Updates applied: Adam's t (skipped updates do not advance it, as in PyTorch).
    pub t: u64,
    consecutive_skipped: usize,
    /// After this many consecutive skipped updates a step fails (0: never).
    max_skipped_steps: usize,
}

impl StepCounters {
    pub fn new(max_skipped_steps: usize) -> Self {
        StepCounters { step: 0, t: 0, consecutive_skipped: 0, max_skipped_steps }
    }

    /// Counts a finished step from its report and sets the report's `adam_t`. Errors once
    /// `max_skipped_steps` consecutive steps have skipped their update.
    pub fn record(&mut self, report: &mut StepReport) -> Result<()> {
        if report.update_skipped {
            self.consecutive_skipped += 1;
        } else {
            self.t += 1;
            self.consecutive_skipped = 0;
        }
        report.adam_t = self.t;
        self.step = report.step;
        if self.max_skipped_steps > 0 && self.consecutive_skipped >= self.max_skipped_steps {
            bail!(
                "{} consecutive steps had no valid micro-batch (NaN/Inf gradients in every one; last at step {}); stopping",
                self.consecutive_skipped,
                report.step
            );
        }
        Ok(())
    }
}
