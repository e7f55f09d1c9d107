//! The step protocol of the persistent workers ("spheres"), generic over the sync backend.
//!
//! One step, for `N` workers and `S` micro-batches. The thread calling [`super::Engine::step`]
//! (the coordinator) is worker 0; workers 1..N are spawned once and parked at the barrier
//! between steps. One barrier of N parties is crossed four times per step:
//! ```text
//! coordinator (worker 0)             worker k = 1..N-1
//! publish batch + control
//! ──────────────── barrier "start" ───────────────── (workers read the control block)
//! compute micro-batches (segmented: m = k, k+N, ...; lock strategies: ticket counter),
//! scan each gradient (segmented with global clipping: left to the reduction, see below)
//! ──────────────── barrier "computed" ────────────── (every micro-batch is done)
//! reduce chunks c = k, k+N, ... (segmented: sum the valid slots in index order; all:
//! squared norm of the chunk)
//! ──────────────── barrier "reduced" ─────────────── (every chunk norm is known)
//! global norm = chunk norms in chunk order -> grad scale; AdamW on the same chunks (the
//! only weight writes)
//! ──────────────── barrier "done" ──────────────────
//! read the report                    wait for the next "start"
//! ```
//! The fused scan (segmented, global clipping): rather than a separate NaN/Inf pass over every
//! gradient, the reduction sums all slots and the finiteness of the total decides. A sum of
//! finite values is finite unless it overflows, so a finite total proves every slot valid.
//! When the total is not finite, which every worker sees alike, all of them scan their own
//! slots, cross a barrier "rescanned", reduce again over the valid slots only and cross a
//! barrier "re-reduced" before the update: six crossings instead of four, only in such a step.
//! Both paths sum the same slots in the same order as a scan-first step would, so the weights
//! are the same bits.
//! Between "done" and the next "start", workers 1..N touch nothing shared, so the coordinator
//! may read and write everything (batch, control block, weights, Adam state). Running worker 0
//! on the caller's thread saves a thread and a hand-off per step, and with one thread the step
//! runs entirely on the caller.
//!
//! This file is the shared state, the worker loop and the step as its phases (`compute`,
//! `reduce`, `rescan`, `update`); the lock strategies' compute phase is in
//! [`super::lock_strategies`]; construction, publish/collect and shutdown in [`super::engine`].
//!
//! Why the invariants hold (and what the loom/shuttle checks verify):
//! - weights are read only in the compute phase and written only after "reduced", so AdamW
//!   never overlaps a read; the tracked cells make a violation a checker failure. The same
//!   holds for what the workload derives from the weights ([`Workload::weights_written`], the
//!   GPT model's shared packing): written by each chunk's owner in the update phase, read in
//!   the compute phase; the checkers' fake workload keeps such a copy in tracked cells;
//! - a micro-batch is computed exactly once: segmented assigns `m` to worker `m % N`, the lock
//!   strategies hand out tickets from one atomic counter reset by the coordinator between steps;
//! - no chunk is reduced before "computed", so every slot is final when it is summed;
//! - invalid micro-batches are excluded by every worker from the same slot results, so all
//!   workers agree on `n_valid` and on whether the update happens;
//! - chunk boundaries and the in-chunk sum order do not depend on N, so `segmented` is
//!   bit-identical for every thread count.

use super::barrier::{Barrier, Poisoned};
use super::engine::{panic_message, Local, PoisonOnUnwind};
use super::fault::Fault;
use super::lock_strategies::ModelSlot;
use super::strategy::{ClipMode, Strategy};
use super::tally::{scaling, sphere_factor};
use super::timing::{Clock, WorkerTiming};
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
    /// The scan of the gradient; `Scan::default()` (valid, norm 0) while `scanned` is false.
    pub scan: Scan,
    /// False when the scan was left to the reduction (see [`Shared::fused_scan`]).
    pub scanned: bool,
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
    /// segmented: one gradient per micro-batch.
    pub slots: Vec<B::Cell<Vec<f32>>>,
    pub results: Vec<B::Cell<SlotResult>>,
    /// Squared norm of each chunk of `sum`.
    pub partials: Vec<B::Cell<f64>>,
    /// True when the NaN/Inf scan of the micro-batch gradients is fused into the reduction
    /// (segmented with global clipping): the compute phase then skips the scan, which was a
    /// whole extra pass over every gradient. See the module doc.
    pub fused_scan: bool,
    /// Fused scan: squared norm of micro-batch m's part of chunk c, at `c * spheres + m`
    /// (the per-sphere norms of the report).
    pub slot_partials: Vec<B::Cell<f64>>,
    pub timings: Vec<B::Cell<WorkerTiming>>,
    /// Lock strategies: the next micro-batch ticket.
    pub next_mb: B::AtomicUsize,
    pub model_lock: B::Mutex<ModelSlot<W::Scratch>>,
    /// Guards `sum` during the compute phase of the lock strategies; holds the number of
    /// micro-batches added so far (the first one is copied, not added to stale data).
    pub grad_lock: B::Mutex<usize>,
    pub fault: Option<Fault>,
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
        let mut reduced = self.reduce(k, &mut local.valid, &mut tm)?; // ends at "reduced"
        if self.fused_scan && reduced.apply && !reduced.total.is_finite() {
            // The fused scan's slow path: every worker sees the same total, so all come here.
            self.rescan(k, &mut tm)?; // ends at "rescanned"
            reduced = self.reduce(k, &mut local.valid, &mut tm)?; // ends at "re-reduced"
        }
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
            Strategy::Segmented => {
                for m in (k..self.spheres).step_by(self.n_workers) {
                    // SAFETY: slot m is written only by worker m % N in the compute phase and read
                    // only after "computed".
                    let res = unsafe { self.slots[m].with_mut(|g| self.compute_one(m, ctl, &mut local.scratch, g)) };
                    self.publish_result(m, res);
                    tm.micro_batches += 1;
                }
            }
            Strategy::GradientLock | Strategy::ModelLock => self.compute_by_ticket(k, ctl, local, tm),
            Strategy::Rayon => unreachable!("the rayon strategy has no sphere workers"),
        }
        tm.compute = clock.elapsed().saturating_sub(tm.lock_wait + tm.reduce);
    }

    /// Forward + backward of micro-batch `m` into `grad`, then fault injection and the scan.
    pub fn compute_one(&self, m: usize, ctl: &Control, scr: &mut Option<W::Scratch>, grad: &mut [f32]) -> SlotResult {
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
        if self.fused_scan {
            return SlotResult { loss, scan: Scan::default(), scanned: false, factor: 1.0, panic: None };
        }
        let scan = grad::scan(grad);
        let factor = sphere_factor(&scan, self.clip_norm, self.clip_mode);
        SlotResult { loss, scan, scanned: true, factor, panic: None }
    }

    pub fn publish_result(&self, m: usize, res: SlotResult) {
        // SAFETY: result m is written only by the one worker that computed micro-batch m, in the
        // compute phase; it is read after "computed" and by the coordinator after the step.
        unsafe { self.results[m].with_mut(|r| *r = res) };
    }

    /// Phase 2: sum this worker's chunks over the valid slots (segmented) and take their squared
    /// norms, then wait for every chunk ("reduced") and add the norms up in chunk order.
    fn reduce(&self, k: usize, valid: &mut Vec<(usize, f32)>, tm: &mut WorkerTiming) -> Result<Reduced, Poisoned> {
        let (n_valid, apply) = self.collect_valid(valid);
        let mut clock = Clock::<B>::start();
        if apply {
            for c in (k..self.sum.num_chunks()).step_by(self.n_workers) {
                self.reduce_chunk(c, valid);
            }
        }
        tm.reduce += clock.lap();
        self.phase_wait(tm)?;
        let total = if apply { self.total_sqnorm() } else { f64::NAN };
        Ok(Reduced { n_valid, apply, total })
    }

    /// Reads every slot result (after "computed"): fills `valid` in index order and returns
    /// (n_valid, whether the step updates the weights).
    fn collect_valid(&self, valid: &mut Vec<(usize, f32)>) -> (usize, bool) {
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

    /// Chunk `c` of the reduction: segmented sums the valid slots in index order; the lock
    /// strategies already hold the sum. Both record the chunk's squared norm.
    fn reduce_chunk(&self, c: usize, valid: &[(usize, f32)]) {
        let sq = if self.strategy == Strategy::Segmented {
            let r = self.sum.chunk_range(c);
            // SAFETY: chunk c of `sum` is written only by its owner worker (c % N) in the reduce
            // phase; slots are final after "computed" and only read here.
            unsafe {
                self.sum.write_chunk(c, |dst| {
                    for (i, &(m, f)) in valid.iter().enumerate() {
                        self.slots[m].with(|g| {
                            let src = &g[r.clone()];
                            if self.fused_scan {
                                // The fused scan's per-sphere norm, in the same pass as the sum.
                                // SAFETY: this cell is written only by chunk c's owner before
                                // "reduced", read by the coordinator after "done".
                                let sq = grad::accumulate_with_sqnorm(dst, src, f, i == 0);
                                self.slot_partials[c * self.spheres + m].with_mut(|x| *x = sq);
                            } else if i == 0 {
                                grad::copy_scaled(dst, src, f)
                            } else {
                                grad::add_scaled(dst, src, f)
                            }
                        });
                    }
                    grad::sqnorm(dst)
                })
            }
        } else {
            // SAFETY: the accumulator is final after "computed" and read-only until the next step.
            unsafe { self.sum.read_chunk(c, grad::sqnorm) }
        };
        // SAFETY: chunk norm c is written only by chunk c's owner before "reduced".
        unsafe { self.partials[c].with_mut(|x| *x = sq) };
    }

    /// Phase 2b, the fused scan's slow path: a non-finite sum means that some micro-batch holds
    /// a NaN/Inf (a sum of finite values is finite unless it overflows). Scan this worker's
    /// slots to find the invalid ones, then wait for everyone ("rescanned").
    fn rescan(&self, k: usize, tm: &mut WorkerTiming) -> Result<(), Poisoned> {
        let mut clock = Clock::<B>::start();
        for m in (k..self.spheres).step_by(self.n_workers) {
            // SAFETY: slots are final after "computed" and only read; result m is written only
            // by its owner (m % N) here, between "reduced" and "rescanned", and read by everyone
            // after "rescanned".
            unsafe {
                let scan = self.slots[m].with(|g| grad::scan(g));
                self.results[m].with_mut(|r| {
                    r.scan = scan;
                    r.scanned = true;
                });
            }
        }
        tm.reduce += clock.lap();
        self.phase_wait(tm)
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

    fn phase_wait(&self, tm: &mut WorkerTiming) -> Result<(), Poisoned> {
        let clock = Clock::<B>::start();
        self.barrier.wait()?;
        tm.barrier_wait += clock.elapsed();
        Ok(())
    }
}
