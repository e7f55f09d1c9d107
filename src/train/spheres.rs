//! Persistent workers ("spheres") and the step protocol, generic over the sync backend.
//!
//! One step, for `N` workers and `S` micro-batches. The thread calling [`Engine::step`] (the
//! coordinator) is worker 0; workers 1..N are spawned once and parked at the barrier between
//! steps. One barrier of N parties is crossed four times per step:
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
//! Why the invariants hold (and what the loom/shuttle checks verify):
//! - weights are read only in the compute phase and written only after "reduced", so AdamW
//!   never overlaps a read; the tracked cells make a violation a checker failure;
//! - a micro-batch is computed exactly once: segmented assigns `m` to worker `m % N`, the lock
//!   strategies hand out tickets from one atomic counter reset by the coordinator between steps;
//! - no chunk is reduced before "computed", so every slot is final when it is summed;
//! - invalid micro-batches are excluded by every worker from the same slot results, so all
//!   workers agree on `n_valid` and on whether the update happens;
//! - chunk boundaries and the in-chunk sum order do not depend on N, so `segmented` is
//!   bit-identical for every thread count.

use super::barrier::{Barrier, Poisoned};
use super::strategy::{ClipMode, Strategy};
use super::timing::{Clock, WorkerTiming};
use super::workload::{StepBatch, Workload};
use super::{StepReport, TrainerOptions};
use crate::grad::{self, Scan};
use crate::optim::AdamWConfig;
use crate::sync::{AtomicUsizeApi, Backend, CellApi, ChunkedBuf, MutexApi};
use crate::{bail, Error, Result};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;

/// Deliberately broken protocol variants, compiled only for the model checkers so that tests
/// can prove the checkers find each bug.
#[cfg(any(feature = "loom", feature = "shuttle"))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The barrier waits on the arrival count instead of a generation (lost wake-up).
    BarrierWithoutGeneration,
    /// gradient-lock: the accumulator is written outside the gradient mutex.
    UnlockedAccumulation,
    /// segmented: workers start reducing without waiting for every micro-batch ("computed").
    SkipComputedBarrier,
    /// model-lock: odd workers take the gradient mutex before the model mutex.
    LockOrderInversion,
}

/// The per-step control block the coordinator publishes before "start".
#[derive(Clone, Copy, Debug, Default)]
struct Control {
    /// Step number, from 1.
    step: u64,
    /// The AdamW step `t` this step uses if it updates.
    t_next: u64,
    lr: f32,
    shutdown: bool,
    /// Names the weights of this step for [`Workload::compute`]'s caches: a counter private to
    /// the engine, bumped every step, so it never repeats even if `set_step` rewinds `step`.
    weights_version: u64,
}

/// What the worker that computed a micro-batch learned about it.
#[derive(Clone, Debug, Default)]
struct SlotResult {
    loss: f32,
    /// The scan of the gradient; `Scan::default()` (valid, norm 0) while `scanned` is false.
    scan: Scan,
    /// False when the scan was left to the reduction (see [`Shared::fused_scan`]).
    scanned: bool,
    /// Per-sphere clip factor (1.0 in global mode).
    factor: f32,
    /// Set if the workload panicked on this micro-batch.
    panic: Option<String>,
}

impl SlotResult {
    fn valid(&self) -> bool {
        self.panic.is_none() && self.scan.is_valid()
    }
}

/// model-lock: one shared set of activations and one gradient buffer, as in the original design.
struct ModelSlot<S> {
    scratch: Option<S>,
    grad: Vec<f32>,
}

/// State shared by the coordinator and the workers.
struct Shared<B: Backend, W: Workload> {
    workload: W,
    n_workers: usize,
    spheres: usize,
    rows_per_micro: usize,
    seq: usize,
    strategy: Strategy,
    clip_norm: f32,
    clip_mode: ClipMode,
    adamw: AdamWConfig,
    /// (step, micro-batch) pairs whose gradient gets a NaN written into it.
    inject_nan: Vec<(u64, usize)>,

    barrier: Barrier<B>,
    control: B::Cell<Control>,
    batch: B::Cell<StepBatch>,
    weights: ChunkedBuf<B>,
    /// The sum of the valid micro-batch gradients (segmented: written by the reduction; lock
    /// strategies: the accumulator).
    sum: ChunkedBuf<B>,
    adam_m: ChunkedBuf<B>,
    adam_v: ChunkedBuf<B>,
    /// segmented: one gradient per micro-batch.
    slots: Vec<B::Cell<Vec<f32>>>,
    results: Vec<B::Cell<SlotResult>>,
    /// Squared norm of each chunk of `sum`.
    partials: Vec<B::Cell<f64>>,
    /// True when the NaN/Inf scan of the micro-batch gradients is fused into the reduction
    /// (segmented with global clipping): the compute phase then skips the scan, which was a
    /// whole extra pass over every gradient. See `run_step`.
    fused_scan: bool,
    /// Fused scan: squared norm of micro-batch m's part of chunk c, at `c * spheres + m`
    /// (the per-sphere norms of the report).
    slot_partials: Vec<B::Cell<f64>>,
    timings: Vec<B::Cell<WorkerTiming>>,
    /// Lock strategies: the next micro-batch ticket.
    next_mb: B::AtomicUsize,
    model_lock: B::Mutex<ModelSlot<W::Scratch>>,
    /// Guards `sum` during the compute phase of the lock strategies; holds the number of
    /// micro-batches added so far (the first one is copied, not added to stale data).
    grad_lock: B::Mutex<usize>,
    #[cfg(any(feature = "loom", feature = "shuttle"))]
    fault: Option<Fault>,
}

/// A worker's private buffers, reused every step.
struct Local<W: Workload> {
    scratch: Option<W::Scratch>,
    /// gradient-lock: this worker's gradient before it is added into the accumulator.
    grad: Vec<f32>,
    /// (micro-batch, clip factor) of the valid micro-batches of this step, in index order.
    valid: Vec<(usize, f32)>,
}

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

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

/// Poisons both barriers if a worker unwinds outside the workload (a protocol bug), so that no
/// other thread waits for it forever.
struct PoisonOnUnwind<'a, B: Backend, W: Workload>(&'a Shared<B, W>);

impl<B: Backend, W: Workload> Drop for PoisonOnUnwind<'_, B, W> {
    fn drop(&mut self) {
        if std::thread::panicking() && !B::IS_CHECKER {
            self.0.barrier.poison();
        }
    }
}

impl<B: Backend, W: Workload> Shared<B, W> {
    #[cfg(any(feature = "loom", feature = "shuttle"))]
    fn has_fault(&self, f: Fault) -> bool {
        self.fault == Some(f)
    }

    /// A worker's buffers, allocated up front: with ticket-based strategies a worker may get its
    /// first micro-batch at any step, and a step after the first must not allocate.
    fn new_local(&self, k: usize) -> Local<W> {
        let (scratch, grad) = match self.strategy {
            Strategy::Segmented if k < self.spheres => {
                (Some(self.workload.new_scratch(self.rows_per_micro, self.seq)), Vec::new())
            }
            Strategy::GradientLock => {
                (Some(self.workload.new_scratch(self.rows_per_micro, self.seq)), vec![0.0; self.workload.num_params()])
            }
            _ => (None, Vec::new()),
        };
        Local { scratch, grad, valid: Vec::with_capacity(self.spheres) }
    }

    /// The loop of spawned worker k (>= 1).
    fn worker_loop(&self, k: usize) {
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

    fn run_step(&self, k: usize, ctl: &Control, local: &mut Local<W>) -> std::result::Result<(), Poisoned> {
        let mut tm = WorkerTiming::default();
        let clock = Clock::<B>::start();
        match self.strategy {
            Strategy::Segmented => {
                for m in (k..self.spheres).step_by(self.n_workers) {
                    // SAFETY: slot m is written only by worker m % N in the compute phase and read
                    // only after "computed".
                    let res = unsafe { self.slots[m].with_mut(|g| self.compute(m, ctl, &mut local.scratch, g)) };
                    self.publish_result(m, res);
                    tm.micro_batches += 1;
                }
            }
            Strategy::GradientLock | Strategy::ModelLock => loop {
                // Relaxed is enough: the counter only has to hand out each ticket once; the
                // results are ordered by the barriers.
                let m = self.next_mb.fetch_add(1, Ordering::Relaxed);
                if m >= self.spheres {
                    break;
                }
                let res = if self.strategy == Strategy::GradientLock {
                    self.gradient_lock_one(m, ctl, local, &mut tm)
                } else {
                    self.model_lock_one(k, m, ctl, &mut tm)
                };
                self.publish_result(m, res);
                tm.micro_batches += 1;
            },
            Strategy::Rayon => unreachable!("the rayon strategy has no sphere workers"),
        }
        tm.compute = clock.elapsed().saturating_sub(tm.lock_wait + tm.reduce);

        #[cfg(any(feature = "loom", feature = "shuttle"))]
        let skip_computed = self.has_fault(Fault::SkipComputedBarrier);
        #[cfg(not(any(feature = "loom", feature = "shuttle")))]
        let skip_computed = false;
        if !skip_computed {
            self.phase_wait(&mut tm)?;
        }

        let (n_valid, apply) = self.collect_valid(&mut local.valid);
        let mut clock = Clock::<B>::start();
        if apply {
            for c in (k..self.sum.num_chunks()).step_by(self.n_workers) {
                self.reduce_chunk(c, &local.valid);
            }
        }
        tm.reduce += clock.lap();
        self.phase_wait(&mut tm)?;

        let mut total = if apply { self.total_sqnorm() } else { f64::NAN };
        let (mut n_valid, mut apply) = (n_valid, apply);
        if self.fused_scan && apply && !total.is_finite() {
            // The fused scan's slow path. A non-finite sum means that some micro-batch holds a
            // NaN/Inf (a sum of finite values is finite unless it overflows). Every worker sees
            // the same total, so all of them take this branch: scan the slots to find the
            // invalid ones, then reduce again without them. Two more barrier crossings, only
            // in such a step.
            let mut clock = Clock::<B>::start();
            for m in (k..self.spheres).step_by(self.n_workers) {
                // SAFETY: slots are final after "computed" and only read; result m is written
                // only by its owner (m % N) here, between "reduced" and "rescanned", and read by
                // everyone after "rescanned".
                unsafe {
                    let scan = self.slots[m].with(|g| grad::scan(g));
                    self.results[m].with_mut(|r| {
                        r.scan = scan;
                        r.scanned = true;
                    });
                }
            }
            tm.reduce += clock.lap();
            self.phase_wait(&mut tm)?; // "rescanned"
            (n_valid, apply) = self.collect_valid(&mut local.valid);
            let mut clock = Clock::<B>::start();
            if apply {
                for c in (k..self.sum.num_chunks()).step_by(self.n_workers) {
                    self.reduce_chunk(c, &local.valid);
                }
            }
            tm.reduce += clock.lap();
            self.phase_wait(&mut tm)?; // "re-reduced"
            total = if apply { self.total_sqnorm() } else { f64::NAN };
        }

        let mut clock = Clock::<B>::start();
        // A sum of finite gradients can still overflow f32; every worker sees the same total,
        // so all of them skip such an update together.
        if apply && total.is_finite() {
            let s = scaling(total, n_valid, self.clip_norm, self.clip_mode);
            for c in (k..self.weights.num_chunks()).step_by(self.n_workers) {
                self.update_chunk(c, ctl, s.grad_scale);
            }
        }
        tm.optimizer = clock.lap();
        // SAFETY: worker k's timing cell is written only by worker k inside a step and read by
        // the coordinator after "done".
        unsafe { self.timings[k].with_mut(|t| *t = tm) };
        Ok(())
    }

    /// Micro-batch m's gradient norm from the fused scan's chunk parts, added in chunk order.
    /// Meaningful after a step in which the reduction ran with m valid.
    fn fused_sphere_norm(&self, m: usize) -> f64 {
        let mut total = 0.0f64;
        for c in 0..self.partials.len() {
            // SAFETY: written before "reduced"; read by the coordinator after "done".
            total += unsafe { self.slot_partials[c * self.spheres + m].with(|x| *x) };
        }
        total.sqrt()
    }

    /// The squared norm of `sum`: the chunk norms added in chunk order (so independent of N).
    fn total_sqnorm(&self) -> f64 {
        let mut total = 0.0f64;
        for p in &self.partials {
            // SAFETY: chunk norms are written before "reduced" and read only after it (by the
            // workers) or after "done" (by the coordinator).
            total += unsafe { p.with(|x| *x) };
        }
        total
    }

    fn phase_wait(&self, tm: &mut WorkerTiming) -> std::result::Result<(), Poisoned> {
        let clock = Clock::<B>::start();
        self.barrier.wait()?;
        tm.barrier_wait += clock.elapsed();
        Ok(())
    }

    fn publish_result(&self, m: usize, res: SlotResult) {
        // SAFETY: result m is written only by the one worker that computed micro-batch m, in the
        // compute phase; it is read after "computed" and by the coordinator after the step.
        unsafe { self.results[m].with_mut(|r| *r = res) };
    }

    /// Forward + backward of micro-batch `m` into `grad`, then fault injection and the scan.
    fn compute(&self, m: usize, ctl: &Control, scratch: &mut Option<W::Scratch>, grad: &mut [f32]) -> SlotResult {
        let scratch = scratch.get_or_insert_with(|| self.workload.new_scratch(self.rows_per_micro, self.seq));
        // SAFETY: the weights are written only in the update phase (after "reduced") and by the
        // coordinator between steps; the batch only by the coordinator between steps.
        let out = unsafe {
            self.weights.read_all(|w| {
                self.batch.with(|b| {
                    // The workload is pure math (no sync operations), so catching its panic here
                    // cannot swallow a model checker's own failure.
                    catch_unwind(AssertUnwindSafe(|| {
                        self.workload.compute(scratch, w, ctl.weights_version, b, m, self.spheres, grad)
                    }))
                })
            })
        };
        match out {
            Err(p) => SlotResult { panic: Some(panic_message(p.as_ref())), ..SlotResult::default() },
            Ok(loss) => {
                if self.inject_nan.contains(&(ctl.step, m)) {
                    if let Some(g) = grad.first_mut() {
                        *g = f32::NAN;
                    }
                }
                if self.fused_scan {
                    return SlotResult { loss, scan: Scan::default(), scanned: false, factor: 1.0, panic: None };
                }
                let scan = grad::scan(grad);
                let factor = sphere_factor(&scan, self.clip_norm, self.clip_mode);
                SlotResult { loss, scan, scanned: true, factor, panic: None }
            }
        }
    }

    /// Adds one micro-batch into the accumulator; the caller holds the gradient mutex.
    fn accumulate(&self, count: &mut usize, grad: &[f32], factor: f32) {
        // SAFETY: during the compute phase `sum` is written only under the gradient mutex, which
        // the caller holds; it is read only after "computed".
        unsafe {
            self.sum.write_all(|acc| {
                if *count == 0 {
                    grad::copy_scaled(acc, grad, factor)
                } else {
                    grad::add_scaled(acc, grad, factor)
                }
            })
        };
        *count += 1;
    }

    fn gradient_lock_one(&self, m: usize, ctl: &Control, local: &mut Local<W>, tm: &mut WorkerTiming) -> SlotResult {
        let p = self.workload.num_params();
        if local.grad.len() != p {
            local.grad.resize(p, 0.0);
        }
        let res = self.compute(m, ctl, &mut local.scratch, &mut local.grad);
        if !res.valid() {
            return res;
        }
        #[cfg(any(feature = "loom", feature = "shuttle"))]
        if self.has_fault(Fault::UnlockedAccumulation) {
            // BUG (deliberate): the count is claimed under the lock but the data is written
            // after releasing it.
            let mut count = self.grad_lock.with(|c| {
                *c += 1;
                *c - 1
            });
            self.accumulate(&mut count, &local.grad, res.factor);
            return res;
        }
        let wait = Clock::<B>::start();
        self.grad_lock.with(|count| {
            tm.lock_wait += wait.elapsed();
            tm.lock_acquisitions += 1;
            let held = Clock::<B>::start();
            self.accumulate(count, &local.grad, res.factor);
            tm.reduce += held.elapsed();
        });
        res
    }

    fn model_lock_one(&self, k: usize, m: usize, ctl: &Control, tm: &mut WorkerTiming) -> SlotResult {
        let _ = k;
        #[cfg(any(feature = "loom", feature = "shuttle"))]
        if self.has_fault(Fault::LockOrderInversion) && k % 2 == 1 {
            // BUG (deliberate): gradient mutex first, then model mutex.
            return self.grad_lock.with(|count| {
                self.model_lock.with(|ms| {
                    let p = self.workload.num_params();
                    ms.grad.resize(p, 0.0);
                    let res = self.compute(m, ctl, &mut ms.scratch, &mut ms.grad);
                    if res.valid() {
                        self.accumulate(count, &ms.grad, res.factor);
                    }
                    res
                })
            });
        }
        let wait = Clock::<B>::start();
        self.model_lock.with(|ms| {
            tm.lock_wait += wait.elapsed();
            tm.lock_acquisitions += 1;
            let p = self.workload.num_params();
            if ms.grad.len() != p {
                ms.grad.resize(p, 0.0);
            }
            let res = self.compute(m, ctl, &mut ms.scratch, &mut ms.grad);
            if res.valid() {
                // Lock order: model, then gradient (held together, as in the original design).
                let wait = Clock::<B>::start();
                self.grad_lock.with(|count| {
                    tm.lock_wait += wait.elapsed();
                    tm.lock_acquisitions += 1;
                    let held = Clock::<B>::start();
                    self.accumulate(count, &ms.grad, res.factor);
                    tm.reduce += held.elapsed();
                });
            }
            res
        })
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

    fn update_chunk(&self, c: usize, ctl: &Control, grad_scale: f32) {
        // SAFETY: after "reduced" nobody reads the weights until "done", and chunk c of
        // the weights, sum, m and v is touched only by its owner worker (c % N).
        unsafe {
            let start = self.weights.chunk_range(c).start;
            self.weights.write_chunk(c, |p| {
                self.sum.read_chunk(c, |g| {
                    self.adam_m.write_chunk(c, |m| {
                        self.adam_v
                            .write_chunk(c, |v| self.adamw.update_chunk(p, g, m, v, ctl.t_next, ctl.lr, grad_scale))
                    })
                });
                // While this worker still owns the chunk: what the workload derives from it (the
                // shared packing of the weights), from the values just written. Disjoint
                // chunks, and no compute runs before the next step.
                self.workload.weights_written(start, p);
            })
        }
    }
}

/// Default size of the fixed parameter chunks of the reduction, norm and optimizer. Results
/// depend on it (it fixes the summation order), never on the thread count.
pub const DEFAULT_CHUNK: usize = 16 * 1024;

/// The threaded step engine: `threads` persistent workers running the step protocol over a
/// [`Workload`], on sync backend `B`. [`super::Trainer`] is `Engine<Std, GptWorkload>` (or the
/// rayon engine); the model checkers run `Engine<Loom | Shuttle, ScaleWorkload>`.
pub struct Engine<B: Backend, W: Workload> {
    shared: B::Arc<Shared<B, W>>,
    /// Workers 1..N (worker 0 is the caller of `step`).
    handles: Vec<B::JoinHandle<()>>,
    local0: Local<W>,
    shut_down: bool,
    rows: usize,
    seq: usize,
    step: u64,
    /// Steps published by this engine (the `weights_version` of the next is this + 1).
    published: u64,
    /// Whether what the workload derives from the weights through `weights_written` matches
    /// the current weights (true after any step that updated them, until they are replaced).
    derived_valid: bool,
    t: u64,
    consecutive_skipped: usize,
    max_skipped_steps: usize,
    failed: Option<String>,
    /// True between "start" and "done": workers may be touching shared state.
    in_step: bool,
}

/// Resolves `spheres == 0` (automatic) to the largest divisor of `rows` that is at most 8.
pub fn resolve_spheres(spheres: usize, rows: usize) -> usize {
    if spheres != 0 {
        return spheres;
    }
    (1..=rows.clamp(1, 8)).rev().find(|s| rows.is_multiple_of(*s)).unwrap_or(1)
}

/// Checks the options shared by every strategy; returns the resolved sphere count.
pub(crate) fn validate(opts: &TrainerOptions, rows: usize, seq: usize, num_params: usize) -> Result<usize> {
    if !(1..=super::MAX_THREADS).contains(&opts.threads) {
        bail!("threads must be between 1 and {}, got {}", super::MAX_THREADS, opts.threads);
    }
    if rows == 0 || seq == 0 {
        bail!("batch size and sequence length must be positive, got {rows}x{seq}");
    }
    let spheres = resolve_spheres(opts.spheres, rows);
    if !rows.is_multiple_of(spheres) {
        bail!("spheres ({spheres}) must divide the batch size ({rows})");
    }
    if !(opts.clip_norm.is_finite() && opts.clip_norm >= 0.0) {
        bail!("clip norm must be finite and >= 0 (0 disables), got {}", opts.clip_norm);
    }
    if opts.chunk_size == 0 {
        bail!("chunk size must be positive");
    }
    if num_params == 0 {
        bail!("the model has no parameters");
    }
    if let Some(&(s, m)) = opts.inject_nan.iter().find(|(s, m)| *s == 0 || *m >= spheres) {
        bail!("inject-nan ({s}, {m}) is out of range: steps count from 1, micro-batches from 0 to {}", spheres - 1);
    }
    opts.adamw.validate()?;
    Ok(spheres)
}

impl<B: Backend, W: Workload> Engine<B, W> {
    /// Spawns `opts.threads` workers over `params` for batches of `rows` x `seq` tokens.
    pub fn new(workload: W, params: Vec<f32>, rows: usize, seq: usize, opts: &TrainerOptions) -> Result<Self> {
        Self::build(
            workload,
            params,
            rows,
            seq,
            opts,
            #[cfg(any(feature = "loom", feature = "shuttle"))]
            None,
        )
    }

    /// As [`Engine::new`], with a deliberately broken protocol variant (model checkers only).
    #[cfg(any(feature = "loom", feature = "shuttle"))]
    pub fn with_fault(
        workload: W,
        params: Vec<f32>,
        rows: usize,
        seq: usize,
        opts: &TrainerOptions,
        fault: Fault,
    ) -> Result<Self> {
        Self::build(workload, params, rows, seq, opts, Some(fault))
    }

    fn build(
        workload: W,
        params: Vec<f32>,
        rows: usize,
        seq: usize,
        opts: &TrainerOptions,
        #[cfg(any(feature = "loom", feature = "shuttle"))] fault: Option<Fault>,
    ) -> Result<Self> {
        let p = workload.num_params();
        let spheres = validate(opts, rows, seq, p)?;
        if opts.strategy == Strategy::Rayon {
            bail!("the rayon strategy runs on RayonEngine, not on sphere workers");
        }
        if params.len() != p {
            bail!("expected {p} parameters, got {}", params.len());
        }
        let n = opts.threads;
        let chunk = opts.chunk_size;
        let n_chunks = p.div_ceil(chunk);
        #[cfg(any(feature = "loom", feature = "shuttle"))]
        let barrier = if fault == Some(Fault::BarrierWithoutGeneration) {
            Barrier::new_without_generation(n)
        } else {
            Barrier::new(n)
        };
        #[cfg(not(any(feature = "loom", feature = "shuttle")))]
        let barrier = Barrier::new(n);
        let slot_count = if opts.strategy == Strategy::Segmented { spheres } else { 0 };
        let fused_scan = opts.strategy == Strategy::Segmented && opts.clip_mode == ClipMode::Global;
        let model_slot = if opts.strategy == Strategy::ModelLock {
            ModelSlot { scratch: Some(workload.new_scratch(rows / spheres, seq)), grad: vec![0.0; p] }
        } else {
            ModelSlot { scratch: None, grad: Vec::new() }
        };
        let shared = Shared::<B, W> {
            workload,
            n_workers: n,
            spheres,
            rows_per_micro: rows / spheres,
            seq,
            strategy: opts.strategy,
            clip_norm: opts.clip_norm,
            clip_mode: opts.clip_mode,
            adamw: opts.adamw,
            inject_nan: opts.inject_nan.clone(),
            barrier,
            control: B::Cell::new(Control::default()),
            batch: B::Cell::new(StepBatch::zeros(rows, seq)),
            weights: ChunkedBuf::new(params, chunk),
            sum: ChunkedBuf::new(vec![0.0; p], chunk),
            adam_m: ChunkedBuf::new(vec![0.0; p], chunk),
            adam_v: ChunkedBuf::new(vec![0.0; p], chunk),
            slots: (0..slot_count).map(|_| B::Cell::new(vec![0.0; p])).collect(),
            results: (0..spheres).map(|_| B::Cell::new(SlotResult::default())).collect(),
            partials: (0..n_chunks).map(|_| B::Cell::new(0.0)).collect(),
            fused_scan,
            slot_partials: (0..if fused_scan { n_chunks * spheres } else { 0 }).map(|_| B::Cell::new(0.0)).collect(),
            timings: (0..n).map(|_| B::Cell::new(WorkerTiming::default())).collect(),
            next_mb: B::AtomicUsize::new(0),
            model_lock: B::Mutex::new(model_slot),
            grad_lock: B::Mutex::new(0),
            #[cfg(any(feature = "loom", feature = "shuttle"))]
            fault,
        };
        let local0 = shared.new_local(0);
        let shared = B::arc(shared);
        let mut engine = Engine {
            shared,
            handles: Vec::with_capacity(n - 1),
            local0,
            shut_down: false,
            rows,
            seq,
            step: 0,
            published: 0,
            derived_valid: false,
            t: 0,
            consecutive_skipped: 0,
            max_skipped_steps: opts.max_skipped_steps,
            failed: None,
            in_step: false,
        };
        for k in 1..n {
            let sh: B::Arc<Shared<B, W>> = B::Arc::clone(&engine.shared);
            match B::spawn(format!("cllm-sphere-{k}"), move || sh.worker_loop(k)) {
                Ok(h) => engine.handles.push(h),
                Err(e) => {
                    // Drop poisons the barrier, releasing the workers already started.
                    engine.failed = Some(format!("could not start worker thread {k}: {e}"));
                    return Err(Error(format!("could not start worker thread {k}: {e}")));
                }
            }
        }
        Ok(engine)
    }

    pub fn workload(&self) -> &W {
        &self.shared.workload
    }
    pub fn threads(&self) -> usize {
        self.shared.n_workers
    }
    pub fn spheres(&self) -> usize {
        self.shared.spheres
    }
    pub fn strategy(&self) -> Strategy {
        self.shared.strategy
    }
    /// Steps taken so far (including steps whose update was skipped).
    pub fn step_count(&self) -> u64 {
        self.step
    }
    /// Sets the step counter (for resuming); the next step is `n + 1`.
    pub fn set_step(&mut self, n: u64) {
        self.step = n;
    }

    /// The weights (between steps: `&self` excludes a concurrent `step`).
    pub fn params(&self) -> &[f32] {
        // SAFETY: workers write weights only inside `step(&mut self)`, which cannot run while
        // this shared borrow lives.
        unsafe { self.shared.weights.as_slice_unchecked() }
    }

    /// Reads the weights through the tracked cells (what the model checkers use to verify that
    /// the "done" barrier orders the last update before the coordinator's read).
    pub fn with_params<R>(&self, f: impl FnOnce(&[f32]) -> R) -> R {
        // SAFETY: as for `params`.
        unsafe { self.shared.weights.read_all(f) }
    }

    /// Replaces the weights (between steps).
    pub fn set_params(&mut self, params: &[f32]) -> Result<()> {
        if params.len() != self.shared.weights.len() {
            bail!("expected {} parameters, got {}", self.shared.weights.len(), params.len());
        }
        // SAFETY: `&mut self` proves no step is running, so every worker is parked at "start".
        unsafe { self.shared.weights.write_all(|w| w.copy_from_slice(params)) };
        self.derived_valid = false;
        self.shared.workload.derived_valid_for(None);
        Ok(())
    }

    /// The sum of the valid micro-batch gradients of the last step that updated (per-sphere
    /// clipped in per-sphere mode), before the 1/n_valid and global clip scaling.
    pub fn grad_sum(&self) -> &[f32] {
        // SAFETY: as for `params`.
        unsafe { self.shared.sum.as_slice_unchecked() }
    }

    /// AdamW state: (m, v, t), where t counts the updates applied (skipped updates excluded).
    pub fn adam_state(&self) -> (&[f32], &[f32], u64) {
        // SAFETY: as for `params`.
        unsafe { (self.shared.adam_m.as_slice_unchecked(), self.shared.adam_v.as_slice_unchecked(), self.t) }
    }

    /// Restores the AdamW state for an exact resume.
    pub fn set_adam_state(&mut self, m: &[f32], v: &[f32], t: u64) -> Result<()> {
        let p = self.shared.weights.len();
        if m.len() != p || v.len() != p {
            bail!("adam state has {} / {} values, expected {p}", m.len(), v.len());
        }
        // SAFETY: `&mut self` proves no step is running, so every worker is parked at "start".
        unsafe {
            self.shared.adam_m.write_all(|d| d.copy_from_slice(m));
            self.shared.adam_v.write_all(|d| d.copy_from_slice(v));
        }
        self.t = t;
        Ok(())
    }

    /// One training step over the batch (`rows * seq` inputs and targets) at learning rate `lr`.
    pub fn step(&mut self, inputs: &[u32], targets: &[u32], lr: f32) -> Result<StepReport> {
        let mut report = StepReport::default();
        self.step_into(inputs, targets, lr, &mut report)?;
        Ok(report)
    }

    /// As [`Engine::step`], reusing `report`'s buffers (allocation-free after the first step).
    pub fn step_into(&mut self, inputs: &[u32], targets: &[u32], lr: f32, report: &mut StepReport) -> Result<()> {
        if let Some(f) = &self.failed {
            bail!("trainer is unusable after an earlier failure: {f}");
        }
        if self.shut_down {
            bail!("trainer has been shut down");
        }
        let n = self.rows * self.seq;
        if inputs.len() != n || targets.len() != n {
            bail!(
                "batch must have {}x{} = {n} inputs and targets, got {} and {}",
                self.rows,
                self.seq,
                inputs.len(),
                targets.len()
            );
        }
        if !(lr.is_finite() && lr >= 0.0) {
            bail!("learning rate must be finite and >= 0, got {lr}");
        }
        let wall = Clock::<B>::start();
        let sh = &*self.shared;
        let step = self.step + 1;
        self.published += 1;
        let ctl = Control { step, t_next: self.t + 1, lr, shutdown: false, weights_version: self.published };
        // SAFETY: `&mut self` and `in_step == false` mean every worker is parked at "start", so
        // nothing reads the batch or the control block until the wait below.
        unsafe {
            sh.batch.with_mut(|b| {
                b.inputs.copy_from_slice(inputs);
                b.targets.copy_from_slice(targets);
            });
            sh.control.with_mut(|c| *c = ctl);
        }
        if sh.strategy != Strategy::Segmented {
            // Only the lock strategies use the ticket counter and the accumulator count (and
            // skipping them keeps segmented's model-checked state space smaller).
            sh.next_mb.store(0, Ordering::Relaxed);
            sh.grad_lock.with(|c| *c = 0);
        }
        self.in_step = true;
        let ok = {
            let _guard = PoisonOnUnwind(sh);
            sh.barrier.wait().is_ok() && sh.run_step(0, &ctl, &mut self.local0).is_ok() && sh.barrier.wait().is_ok()
        };
        if !ok {
            let msg = "a worker thread died during the step".to_string();
            self.failed = Some(msg.clone());
            return Err(Error(msg));
        }
        self.in_step = false;

        // Collect the report: "done" ordered every worker's writes before this.
        report.step = step;
        report.skipped_spheres.clear();
        report.bad_values.clear();
        let mut loss_sum = 0.0f64;
        let mut n_valid = 0usize;
        let mut max_norm = 0.0f64;
        let mut sphere_clipped = false;
        let mut panic = None;
        for (m, r) in sh.results.iter().enumerate() {
            // SAFETY: read after "done"; workers are parked.
            unsafe {
                r.with(|r| {
                    if let Some(p) = &r.panic {
                        panic.get_or_insert_with(|| format!("worker panicked in micro-batch {m}: {p}"));
                    }
                    if r.valid() {
                        n_valid += 1;
                        loss_sum += r.loss as f64;
                        let norm = if r.scanned { r.scan.norm() } else { sh.fused_sphere_norm(m) };
                        max_norm = max_norm.max(norm);
                        sphere_clipped |= r.factor < 1.0;
                    } else {
                        report.skipped_spheres.push(m);
                        for &(i, v) in r.scan.bad_entries() {
                            if report.bad_values.len() < grad::MAX_BAD {
                                report.bad_values.push((m, i, v));
                            }
                        }
                    }
                })
            };
        }
        if let Some(p) = panic {
            self.failed = Some(p.clone());
            return Err(Error(p));
        }
        report.loss = if n_valid > 0 { (loss_sum / n_valid as f64) as f32 } else { f32::NAN };
        report.max_sphere_norm = max_norm as f32;
        let total = if n_valid > 0 { sh.total_sqnorm() } else { f64::NAN };
        report.update_skipped = !total.is_finite();
        if !report.update_skipped {
            let s = scaling(total, n_valid, sh.clip_norm, sh.clip_mode);
            report.grad_norm = s.grad_norm as f32;
            report.clipped = s.clipped || sphere_clipped;
            self.t += 1;
            self.consecutive_skipped = 0;
        } else {
            report.grad_norm = f32::NAN;
            report.clipped = false;
            self.consecutive_skipped += 1;
        }
        report.adam_t = self.t;
        self.step = step;
        // An applied update wrote every chunk, and with it everything derived from it; a
        // skipped one left both as they were. The next step reads version `published + 1`.
        self.derived_valid |= !report.update_skipped;
        sh.workload.derived_valid_for(self.derived_valid.then_some(self.published + 1));
        report.timings.workers.clear();
        for t in &sh.timings {
            // SAFETY: read after "done"; workers are parked.
            report.timings.workers.push(unsafe { t.with(|t| *t) });
        }
        report.timings.wall = wall.elapsed();
        if self.max_skipped_steps > 0 && self.consecutive_skipped >= self.max_skipped_steps {
            bail!(
                "{} consecutive steps had no valid micro-batch (NaN/Inf gradients in every one; last at step {step}); stopping",
                self.consecutive_skipped
            );
        }
        Ok(())
    }

    /// Stops and joins every worker. Idempotent; also run by `Drop`.
    pub fn shutdown(&mut self) -> Result<()> {
        if self.shut_down {
            return Ok(());
        }
        self.shut_down = true;
        let sh = &*self.shared;
        if self.in_step || self.failed.is_some() {
            // Workers may be anywhere in the protocol: poisoning wakes all of them with Err.
            sh.barrier.poison();
        } else {
            // SAFETY: no step is running, so every worker is parked at "start".
            unsafe { sh.control.with_mut(|c| c.shutdown = true) };
            if sh.barrier.wait().is_err() {
                sh.barrier.poison();
            }
        }
        let mut first_panic = None;
        for (k, h) in self.handles.drain(..).enumerate() {
            if let Err(p) = B::join(h) {
                first_panic.get_or_insert_with(|| format!("worker {k} panicked: {}", panic_message(p.as_ref())));
            }
        }
        match first_panic {
            Some(p) => Err(Error(p)),
            None => Ok(()),
        }
    }
}

impl<B: Backend, W: Workload> Drop for Engine<B, W> {
    fn drop(&mut self) {
        if B::IS_CHECKER && std::thread::panicking() {
            // The checker is unwinding a failed execution; it tears the threads down itself.
            self.handles.clear();
            return;
        }
        let _ = self.shutdown();
    }
}
