//! A serial oracle of the step semantics: one thread, micro-batches in index order, the same
//! kernels, chunks and scaling as the threaded engines.
//!
//! `segmented` must match it bit for bit at every thread count; the other strategies match it
//! up to the summation order. Tests (and the model checks) compare against it.

use super::tally::{scaling, sphere_factor};
use super::workload::{StepBatch, Workload};
use super::TrainerOptions;
use crate::grad;
use crate::optim::DecayMask;

/// What a reference step decided.
#[derive(Clone, Debug, PartialEq)]
pub struct ReferenceStep {
    pub loss: f32,
    pub skipped_spheres: Vec<usize>,
    pub update_skipped: bool,
    pub grad_norm: f32,
    pub clipped: bool,
}

/// The serial reference trainer.
pub struct Reference<W: Workload> {
    pub workload: W,
    pub params: Vec<f32>,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    pub t: u64,
    pub step: u64,
    /// The sum of the valid micro-batch gradients of the last applied step.
    pub sum: Vec<f32>,
    opts: TrainerOptions,
    spheres: usize,
    scratch: W::Scratch,
    grad: Vec<f32>,
    published: u64,
}

impl<W: Workload> Reference<W> {
    pub fn new(workload: W, params: Vec<f32>, rows: usize, seq: usize, opts: &TrainerOptions) -> Self {
        let spheres = super::resolve_spheres(opts.spheres, rows);
        let p = params.len();
        let scratch = workload.new_scratch(rows / spheres, seq);
        Reference {
            workload,
            params,
            m: vec![0.0; p],
            v: vec![0.0; p],
            t: 0,
            step: 0,
            sum: vec![0.0; p],
            opts: opts.clone(),
            spheres,
            scratch,
            grad: vec![0.0; p],
            published: 0,
        }
    }

    pub fn step(&mut self, batch: &StepBatch, lr: f32) -> ReferenceStep {
        self.step += 1;
        // The weights version for the workload's caches: `step` is public and may be rewound.
        self.published += 1;
        let (s, o) = (self.spheres, &self.opts);
        let mut n_valid = 0usize;
        let mut skipped = Vec::new();
        let mut loss = 0.0f64;
        let mut sphere_clipped = false;
        for mb in 0..s {
            let l =
                self.workload.compute(&mut self.scratch, &self.params, self.published, batch, mb, s, &mut self.grad);
            if o.inject_nan.contains(&(self.step, mb)) {
                self.grad[0] = f32::NAN;
            }
            let scan = grad::scan(&self.grad);
            if !scan.is_valid() {
                skipped.push(mb);
                continue;
            }
            let f = sphere_factor(&scan, o.clip_norm, o.clip_mode);
            sphere_clipped |= f < 1.0;
            if n_valid == 0 {
                grad::copy_scaled(&mut self.sum, &self.grad, f);
            } else {
                grad::add_scaled(&mut self.sum, &self.grad, f);
            }
            n_valid += 1;
            loss += l as f64;
        }
        if n_valid == 0 {
            return ReferenceStep {
                loss: f32::NAN,
                skipped_spheres: skipped,
                update_skipped: true,
                grad_norm: f32::NAN,
                clipped: false,
            };
        }
        let total = self.sum.chunks(o.chunk_size).map(grad::sqnorm).fold(0.0f64, |a, x| a + x);
        let sc = scaling(total, n_valid, o.clip_norm, o.clip_mode);
        self.t += 1;
        let all = DecayMask::all(self.params.len());
        let decay = o.decay_mask.as_ref().unwrap_or(&all);
        let (p, g, m, v) = (&mut self.params, &self.sum, &mut self.m, &mut self.v);
        o.adamw.update_masked(0, decay, p, g, m, v, self.t, lr, sc.grad_scale);
        ReferenceStep {
            loss: (loss / n_valid as f64) as f32,
            skipped_spheres: skipped,
            update_skipped: false,
            grad_norm: sc.grad_norm as f32,
            clipped: sc.clipped || sphere_clipped,
        }
    }
}
