//! The step protocol of the persistent workers ("spheres"), generic over the sync backend.
//!
//! One step, for `N` workers and `S` micro-batches. The thread calling [`super::Engine::step`]
//! (the coordinator) is worker 0; workers 1..N are spawned once and parked at the barrier
//! between steps. One barrier of N parties is crossed four times per step:
//! ```text
//! coordinator (worker 0)             worker k = 1..N-1
//! publish batch + control
//! ──────────────── barrier "start" ───────────────── (workers read the control block)
//! compute micro-batches (segmented: the contiguous range k*S/N..(k+1)*S/N, merged into
//! sub-trees as they come, see [`super::segmented`]; lock strategies: ticket counter), scan
//! each gradient
//! ──────────────── barrier "computed" ────────────── (every sub-tree is final)
//! reduce chunks c = k, k+N, ... (segmented: the summation tree above the workers' sub-trees,
//! in tree order; all: squared norm of the chunk)
//! ──────────────── barrier "reduced" ─────────────── (every chunk norm is known)
//! global norm = chunk norms in chunk order -> grad scale; AdamW on the same chunks (the
//! only weight writes)
//! ──────────────── barrier "done" ──────────────────
//! read the report                    wait for the next "start"
//! ```
//! Each micro-batch is scanned for NaN/Inf on its own right after it is computed, before it is
//! merged: an invalid one is a skipped leaf of the tree (and with per-sphere clipping, the scan
//! gives the clip factor). A sum of finite gradients can still overflow; every worker sees the
//! same total, so all of them skip such an update together.
//! Between "done" and the next "start", workers 1..N touch nothing shared, so the coordinator
//! may read and write everything (batch, control block, weights, Adam state). Running worker 0
//! on the caller's thread saves a thread and a hand-off per step, and with one thread the step
//! runs entirely on the caller.
//!
//! This file is the shared state, the worker loop and the step as its phases (`compute`,
//! `reduce`, `update`); segmented's tree phases are in [`super::segmented`], the lock
//! strategies' compute phase in [`super::lock_strategies`]; construction, publish/collect and
//! shutdown in [`super::engine`].
//!
//! Why the invariants hold (and what the loom/shuttle checks verify):
//! - weights are read only in the compute phase and written only after "reduced", so AdamW
//!   never overlaps a read; the tracked cells make a violation a checker failure. The same
//!   holds for what the workload derives from the weights ([`Workload::weights_written`], the
//!   GPT model's shared packing): written by each chunk's owner in the update phase, read in
//!   the compute phase; the checkers' fake workload keeps such a copy in tracked cells;
//! - a micro-batch is computed exactly once: segmented partitions `0..S` into the workers'
//!   ranges, the lock strategies hand out tickets from one atomic counter reset by the
//!   coordinator between steps;
//! - no chunk is reduced before "computed", so every sub-tree is final when it is combined, and
//!   no buffer is written again before the next "start" (the tree's own invariants, every leaf
//!   merged once and no buffer reused while read, are in [`super::segmented`]);
//! - invalid micro-batches are excluded by every worker from the same results, so all workers
//!   agree on `n_valid` and on whether the update happens;
//! - chunk boundaries, the in-chunk sum order and the summation tree depend on S, never on N,
//!   so `segmented` is bit-identical for every thread count.

use super::barrier::{Barrier, Poisoned};
use super::engine::{panic_message, Local, PoisonOnUnwind};
use super::fault::Fault;
use super::lock_strategies::ModelSlot;
use super::strategy::{ClipMode, Strategy};
use super::tally::{scaling, sphere_factor};
use super::timing::{Clock, WorkerTiming};
use super::tree::Plan;
use super::workload::{StepBatch, Workload};
use crate::grad::{self, Scan};
use crate::optim::{AdamWConfig, DecayMask};
use crate::sync::{Backend, CellApi, ChunkedBuf};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// The per-step control block the coordinator publishes before "start".
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Control {
    /// Step number, from 1.
    pub step: u64,
    /// The AdamW step `t` this step uses if it updates.
    pub t_next: u64,
    pub lr: f32,
    pub shutdown: bool,
    /// Names the weights of this step for [`Workload::compute`]'s caches: a counter private to
    /// the engine, bumped every step, so it never repeats even if `set_step` rewinds `step`.
    pub weights_version: u64,
}

/// What the worker that computed a micro-batch learned about it.
#[derive(Clone, Debug, Default)]
pub(super) struct SlotResult {
    pub loss: f32,
    /// The scan of the gradient.
    pub scan: Scan,
    /// Per-sphere clip factor (1.0 in global mode).
    pub factor: f32,
    /// Set if the workload panicked on this micro-batch.
    pub panic: Option<String>,
}

impl SlotResult {
    pub fn valid(&self) -> bool {
        self.panic.is_none() && self.scan.is_valid()
    }
}

/// State shared by the coordinator and the workers (built by [`super::engine`]).
pub(super) struct Shared<B: Backend, W: Workload> {
    pub workload: W,
    pub n_workers: usize,
    /// The tree's workers over every process: `n_workers` unless distributed
    /// ([`crate::dist`]: ranks x threads); this process runs global workers
    /// `first_worker..first_worker + n_workers`.
    pub global_workers: usize,
    pub first_worker: usize,
    /// The plan's index of `bufs[0]` (the first buffer of global worker `first_worker`).
    pub buf_base: usize,
    /// The exchange with the other ranks of a distributed run.
    pub dist: Option<super::distributed::Dist<B>>,
    pub spheres: usize,
    pub rows_per_micro: usize,
    pub seq: usize,
    pub strategy: Strategy,
    pub clip_norm: f32,
    pub clip_mode: ClipMode,
    pub adamw: AdamWConfig,
    /// The parameters the weight decay applies to.
    pub decay: DecayMask,
    /// (step, micro-batch) pairs whose gradient gets a NaN written into it.
    pub inject_nan: Vec<(u64, usize)>,
    pub barrier: Barrier<B>,
    pub control: B::Cell<Control>,
    pub batch: B::Cell<StepBatch>,
    pub weights: ChunkedBuf<B>,
    /// The sum of the valid micro-batch gradients (segmented: written by the reduction; lock
    /// strategies: the accumulator).
    pub sum: ChunkedBuf<B>,
    pub adam_m: ChunkedBuf<B>,
    pub adam_v: ChunkedBuf<B>,
    /// segmented: the summation tree's layout ([`super::tree`]).
    pub plan: Plan,
    /// segmented: the gradient buffers, worker k's at `plan.first_buf[k]..plan.first_buf[k+1]`.
    pub bufs: Vec<B::Cell<Vec<f32>>>,
    pub results: Vec<B::Cell<SlotResult>>,
    /// Squared norm of each chunk of `sum`.
    pub partials: Vec<B::Cell<f64>>,
    pub timings: Vec<B::Cell<WorkerTiming>>,
    /// Lock strategies: the next micro-batch ticket.
    pub next_mb: B::AtomicUsize,
    pub model_lock: B::Mutex<ModelSlot<W::Scratch>>,
    /// Guards `sum` during the compute phase of the lock strategies; holds the number of
    /// micro-batches added so far (the first one is copied, not added to stale data).
    pub grad_lock: B::Mutex<usize>,
    pub fault: Option<Fault>,
    /// [`Fault::ArrivalOrderMerge`] only: how many workers finished computing, and who, in
    /// that order.
    pub arrived: B::AtomicUsize,
    pub arrival_order: Vec<B::Cell<usize>>,
}

/// What the reduction established, alike in every worker.
struct Reduced {
    n_valid: usize,
    /// Whether the step updates: some micro-batch is valid and no workload panicked.
    apply: bool,
    /// The squared norm of the summed gradient (NaN when not `apply`).
    total: f64,
}

impl<B: Backend, W: Workload> Shared<B, W> {
    /// The loop of spawned worker k (>= 1).
    pub fn worker_loop(&self, k: usize) {
        let _guard = PoisonOnUnwind(self);
        let mut local = self.new_local(k);
        loop {
            if self.barrier.wait().is_err() {
                return;
            }
            // SAFETY: the coordinator writes the control block only between "done" and
            // "start"; we are past "start".
            let ctl = unsafe { self.control.with(|c| *c) };
            if ctl.shutdown {
                return;
            }
            if self.run_step(k, &ctl, &mut local).is_err() || self.barrier.wait().is_err() {
                return;
            }
        }
    }

    /// Worker k's part of one step, from "start" to just before "done".
    pub fn run_step(&self, k: usize, ctl: &Control, local: &mut Local<W>) -> Result<(), Poisoned> {
        let mut tm = WorkerTiming::default();
        self.compute(k, ctl, local, &mut tm);
        if !self.has_fault(Fault::SkipComputedBarrier) {
            self.phase_wait(&mut tm)?; // "computed"
        }
        let reduced = self.reduce(k, local, &mut tm)?; // ends at "reduced"
        self.update(k, ctl, &reduced, &mut tm);
        // SAFETY: worker k's timing cell is written only by worker k inside a step and read by
        // the coordinator after "done".
        unsafe { self.timings[k].with_mut(|t| *t = tm) };
        Ok(())
    }

    /// Phase 1: compute this worker's micro-batches (and, unless fused, scan each gradient).
    fn compute(&self, k: usize, ctl: &Control, local: &mut Local<W>, tm: &mut WorkerTiming) {
        let clock = Clock::<B>::start();
        match self.strategy {
            Strategy::Segmented => self.compute_tree(k, ctl, local, tm),
            Strategy::GradientLock | Strategy::ModelLock => self.compute_by_ticket(k, ctl, local, tm),
            Strategy::Rayon => unreachable!("the rayon strategy has no sphere workers"),
        }
        tm.compute = clock.elapsed().saturating_sub(tm.lock_wait + tm.reduce + tm.merge);
    }

    /// Forward + backward of micro-batch `m` into `grad`, then fault injection and the scan.
    pub fn compute_one(&self, m: usize, ctl: &Control, scr: &mut Option<W::Scratch>, grad: &mut [f32]) -> SlotResult {
        let mut res = self.compute_unscanned(m, ctl, scr, grad);
        if res.panic.is_none() {
            self.set_scan(&mut res, grad::scan(grad));
        }
        res
    }

    /// Forward + backward of micro-batch `m` into `grad`, then fault injection; the result's
    /// scan is still to be taken ([`Shared::set_scan`]). The same bits every time it is called
    /// for the same step and micro-batch (a fold that lost a leaf recomputes it).
    pub fn compute_unscanned(
        &self,
        m: usize,
        ctl: &Control,
        scr: &mut Option<W::Scratch>,
        grad: &mut [f32],
    ) -> SlotResult {
        let scratch = scr.get_or_insert_with(|| self.workload.new_scratch(self.rows_per_micro, self.seq));
        // SAFETY: the weights are written only in the update phase (after "reduced") and by the
        // coordinator between steps; the batch only by the coordinator between steps.
        let out = unsafe {
            self.weights.read_all(|w| {
                self.batch.with(|b| {
                    if self.has_fault(Fault::RepackDuringCompute) {
                        self.repack_lazily(m, w);
                    }
                    let mut run = || self.workload.compute(scratch, w, ctl.weights_version, b, m, self.spheres, grad);
                    // Under a model checker a panic is not caught: the fake workload reads
                    // tracked cells, so it may be the checker's own failure report.
                    if B::IS_CHECKER {
                        Ok(run())
                    } else {
                        catch_unwind(AssertUnwindSafe(run))
                    }
                })
            })
        };
        let loss = match out {
            Err(p) => return SlotResult { panic: Some(panic_message(p.as_ref())), ..SlotResult::default() },
            Ok(loss) => loss,
        };
        if let Some(g) = grad.first_mut().filter(|_| self.inject_nan.contains(&(ctl.step, m))) {
            *g = f32::NAN;
        }
        SlotResult { loss, factor: 1.0, ..SlotResult::default() }
    }

    /// Records a micro-batch's scan in its result, with its per-sphere clip factor.
    pub fn set_scan(&self, res: &mut SlotResult, scan: grad::Scan) {
        res.factor = sphere_factor(&scan, self.clip_norm, self.clip_mode);
        res.scan = scan;
    }

    pub fn publish_result(&self, m: usize, res: SlotResult) {
        // SAFETY: result m is written only by the one worker that computed micro-batch m, in the
        // compute phase; it is read after "computed" and by the coordinator after the step.
        unsafe { self.results[m].with_mut(|r| *r = res) };
    }

    /// Phase 2: sum this worker's chunks over the blocks (segmented) and take their squared
    /// norms, then wait for every chunk ("reduced") and add the norms up in chunk order.
    fn reduce(&self, k: usize, local: &mut Local<W>, tm: &mut WorkerTiming) -> Result<Reduced, Poisoned> {
        if let Some(d) = &self.dist {
            // Distributed (super::distributed): the coordinator exchanges with the other ranks,
            // all workers fold this rank's chunks; every chunk of `sum`, its norm and the other
            // ranks' results are known at "reduced".
            self.reduce_distributed(d, k, local, tm)?;
            self.phase_wait(tm)?;
            let (n_valid, apply) = self.collect_valid(&mut local.valid);
            let total = if apply { self.total_sqnorm() } else { f64::NAN };
            return Ok(Reduced { n_valid, apply, total });
        }
        let (n_valid, apply) = self.collect_valid(&mut local.valid);
        let mut clock = Clock::<B>::start();
        if apply {
            let segmented = self.strategy == Strategy::Segmented;
            if segmented {
                self.build_program(&mut local.tree, &local.valid);
            }
            for c in (k..self.sum.num_chunks()).step_by(self.n_workers) {
                if segmented {
                    self.fold_chunk(c, &mut local.tree);
                }
                // SAFETY: chunk c of `sum` is written only by its owner (c % N): segmented in the
                // line above, the lock strategies before "computed"; read-only until the update.
                let sq = unsafe { self.sum.read_chunk(c, grad::sqnorm) };
                // SAFETY: chunk norm c is written only by chunk c's owner before "reduced".
                unsafe { self.partials[c].with_mut(|x| *x = sq) };
            }
        }
        tm.reduce += clock.lap();
        self.phase_wait(tm)?;
        let total = if apply { self.total_sqnorm() } else { f64::NAN };
        Ok(Reduced { n_valid, apply, total })
    }

    /// Reads every slot result (after "computed"): fills `valid` in index order and returns
    /// (n_valid, whether the step updates the weights).
    pub(super) fn collect_valid(&self, valid: &mut Vec<(usize, f32)>) -> (usize, bool) {
        valid.clear();
        let mut panicked = false;
        for (m, r) in self.results.iter().enumerate() {
            // SAFETY: results are written in the compute phase and read only after "computed".
            unsafe {
                r.with(|r| {
                    panicked |= r.panic.is_some();
                    if r.valid() {
                        valid.push((m, r.factor));
                    }
                })
            };
        }
        (valid.len(), !valid.is_empty() && !panicked)
    }

    /// Phase 3: AdamW on this worker's chunks. A sum of finite gradients can still overflow
    /// f32; every worker sees the same total, so all of them skip such an update together.
    fn update(&self, k: usize, ctl: &Control, reduced: &Reduced, tm: &mut WorkerTiming) {
        let mut clock = Clock::<B>::start();
        if reduced.apply && reduced.total.is_finite() {
            let s = scaling(reduced.total, reduced.n_valid, self.clip_norm, self.clip_mode);
            for c in (k..self.weights.num_chunks()).step_by(self.n_workers) {
                self.update_chunk(c, ctl, s.grad_scale);
            }
        }
        tm.optimizer = clock.lap();
    }

    fn update_chunk(&self, c: usize, ctl: &Control, grad_scale: f32) {
        // SAFETY: after "reduced" nobody reads the weights until "done", and chunk c of
        // the weights, sum, m and v is touched only by its owner worker (c % N).
        unsafe {
            let start = self.weights.chunk_range(c).start;
            self.weights.write_chunk(c, |p| {
                self.sum.read_chunk(c, |g| {
                    self.adam_m.write_chunk(c, |m| {
                        self.adam_v.write_chunk(c, |v| {
                            let (t, lr) = (ctl.t_next, ctl.lr);
                            self.adamw.update_masked(start, &self.decay, p, g, m, v, t, lr, grad_scale)
                        })
                    })
                });
                // While this worker still owns the chunk: what the workload derives from it (the
                // shared packing of the weights), from the values just written. Disjoint
                // chunks, and no compute runs before the next step.
                if !self.has_fault(Fault::RepackDuringCompute) {
                    self.workload.weights_written(start, p);
                }
            })
        }
    }

    /// The squared norm of `sum`: the chunk norms added in chunk order (so independent of N).
    pub fn total_sqnorm(&self) -> f64 {
        // SAFETY: chunk norms are written before "reduced" and read only after it (by the
        // workers) or after "done" (by the coordinator).
        self.partials.iter().fold(0.0f64, |total, p| total + unsafe { p.with(|x| *x) })
    }

    pub(super) fn phase_wait(&self, tm: &mut WorkerTiming) -> Result<(), Poisoned> {
        let clock = Clock::<B>::start();
        self.barrier.wait()?;
        tm.barrier_wait += clock.elapsed();
        Ok(())
    }
}
