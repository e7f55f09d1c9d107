//! A serial oracle of the step semantics: one thread, micro-batches in index order, the same
//! kernels, chunks and scaling as the threaded engines.
//!
//! It sums the micro-batch gradients in one of two orders ([`Summation`]): `segmented`'s
//! summation tree, evaluated recursively as defined in [`super::tree`] (a skipped micro-batch
//! leaves its sibling unchanged), which `segmented` must match bit for bit at every thread
//! count; or a left fold in index order, which the lock strategies match bit for bit at one
//! thread (their arrival order is then the index order) and up to rounding otherwise. Tests
//! (and the model checks) compare against it.

use super::tally::{scaling, sphere_factor};
use super::tree;
use super::workload::{StepBatch, Workload};
use super::{Strategy, TrainerOptions};
use crate::grad;
use crate::optim::DecayMask;

/// The order in which the oracle adds the micro-batch gradients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Summation {
    /// `segmented`'s dyadic tree over the micro-batch indices.
    Tree,
    /// `((g0 + g1) + g2) + ...` over the valid micro-batches.
    LeftFold,
}

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
    summation: Summation,
}

impl<W: Workload> Reference<W> {
    /// The oracle of `opts.strategy`: the tree for `segmented`, a left fold for the others.
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
            summation: if opts.strategy == Strategy::Segmented { Summation::Tree } else { Summation::LeftFold },
        }
    }

    /// The same oracle summing in order `summation`.
    pub fn with_summation(mut self, summation: Summation) -> Self {
        self.summation = summation;
        self
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
        // The valid micro-batches' (per-sphere clipped) gradients, for the tree.
        let mut leaves: Vec<Option<Vec<f32>>> = vec![None; s];
        for (mb, leaf) in leaves.iter_mut().enumerate() {
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
            match self.summation {
                Summation::Tree => {
                    let mut g = self.grad.clone();
                    if f != 1.0 {
                        grad::scale(&mut g, f);
                    }
                    *leaf = Some(g);
                }
                Summation::LeftFold if n_valid == 0 => grad::copy_scaled(&mut self.sum, &self.grad, f),
                Summation::LeftFold => grad::add_scaled(&mut self.sum, &self.grad, f),
            }
            n_valid += 1;
            loss += l as f64;
        }
        if let Some(total) = tree_sum(0..s, &mut leaves).filter(|_| self.summation == Summation::Tree) {
            self.sum = total;
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

/// The tree's sum over `node`, recursively: a leaf is its gradient (None if skipped); a node is
/// its left sum plus its right sum, or the one side that has a sum.
fn tree_sum(node: std::ops::Range<usize>, leaves: &mut [Option<Vec<f32>>]) -> Option<Vec<f32>> {
    if node.len() <= 1 {
        return leaves.get_mut(node.start).and_then(Option::take);
    }
    let m = tree::split(node.start, node.end);
    match (tree_sum(node.start..m, leaves), tree_sum(m..node.end, leaves)) {
        (Some(mut a), Some(b)) => {
            tree::add(&mut a, &b);
            Some(a)
        }
        (a, b) => a.or(b),
    }
}
