//! [`Engine`]: the owner of the persistent workers. It builds the shared state and spawns the
//! workers, publishes each step to them and collects its report, and shuts them down; the step
//! itself is the protocol in [`super::protocol`].
//!
//! Between steps (`&mut self` and no step in flight) every worker is parked at the "start"
//! barrier, so the engine may read and write all shared state; that is what the `SAFETY`
//! notes below rely on. A step that fails (a worker panic, a poisoned barrier) leaves the
//! engine unusable: later steps return an error, and shutdown poisons the barrier instead of
//! waiting on it.

use super::barrier::Barrier;
use super::distributed::Dist;
use super::fault::Fault;
use super::lock_strategies::ModelSlot;
use super::protocol::{Control, Shared, SlotResult};
use super::segmented::TreeLocal;
use super::strategy::Strategy;
use super::tally::{StepCounters, StepTally};
use super::timing::{Clock, WorkerTiming};
use super::tree::Plan;
use super::workload::{StepBatch, Workload};
use super::{StepReport, TrainerOptions};
use crate::dist::Comm;
use crate::optim::DecayMask;
use crate::sync::{AtomicUsizeApi, Backend, CellApi, ChunkedBuf, MutexApi};
use crate::{bail, Error, Result};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Default size of the fixed parameter chunks of the reduction, norm and optimizer. Results
/// depend on it (it fixes the summation order), never on the thread count.
pub const DEFAULT_CHUNK: usize = 16 * 1024;

/// The threaded step engine: `threads` persistent workers running the step protocol over a
/// [`Workload`], on sync backend `B`. [`super::Trainer`] is `Engine<Std, GptWorkload>` (or the
/// rayon engine); the model checkers run `Engine<Loom | Shuttle, ScaleWorkload<_>>`.
pub struct Engine<B: Backend, W: Workload> {
    shared: B::Arc<Shared<B, W>>,
    /// Workers 1..N (worker 0 is the caller of `step`).
    handles: Vec<B::JoinHandle<()>>,
    local0: Local<W>,
    shut_down: bool,
    rows: usize,
    seq: usize,
    counters: StepCounters,
    /// Steps published by this engine (the `weights_version` of the next is this + 1).
    published: u64,
    /// Whether what the workload derives from the weights through `weights_written` matches
    /// the current weights (true after any step that updated them, until they are replaced).
    derived_valid: bool,
    failed: Option<String>,
    /// True between "start" and "done": workers may be touching shared state.
    in_step: bool,
}

/// A worker's private buffers, reused every step.
pub(super) struct Local<W: Workload> {
    pub scratch: Option<W::Scratch>,
    /// gradient-lock: this worker's gradient before it is added into the accumulator.
    pub grad: Vec<f32>,
    /// (micro-batch, clip factor) of the valid micro-batches of this step, in index order.
    pub valid: Vec<(usize, f32)>,
    /// segmented: the counter's stack and the reduction's program.
    pub tree: TreeLocal,
}

/// Poisons the barrier if a worker unwinds outside the workload (a protocol bug), so that no
/// other thread waits for it forever.
pub(super) struct PoisonOnUnwind<'a, B: Backend, W: Workload>(pub &'a Shared<B, W>);

impl<B: Backend, W: Workload> Drop for PoisonOnUnwind<'_, B, W> {
    fn drop(&mut self) {
        if std::thread::panicking() && !B::IS_CHECKER {
            self.0.barrier.poison();
        }
    }
}

/// Resolves `spheres == 0` (automatic) to the largest divisor of `rows` that is at most 8.
pub fn resolve_spheres(spheres: usize, rows: usize) -> usize {
    if spheres != 0 {
        return spheres;
    }
    (1..=rows.clamp(1, super::options::MAX_DEFAULT_SPHERES)).rev().find(|s| rows.is_multiple_of(*s)).unwrap_or(1)
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

impl<B: Backend, W: Workload> Shared<B, W> {
    /// The shared state for `opts` (already validated, `spheres` resolved) over `params`.
    fn new(
        workload: W,
        params: Vec<f32>,
        (rows, seq, spheres): (usize, usize, usize),
        opts: &TrainerOptions,
        fault: Option<Fault>,
        comm: Option<Arc<dyn Comm>>,
    ) -> Self {
        let (p, n, chunk) = (params.len(), opts.threads, opts.chunk_size);
        let (rank, ranks) = comm.as_ref().map_or((0, 1), |c| (c.rank(), c.size()));
        let (global_workers, first_worker) = (ranks * n, rank * n);
        let n_chunks = p.div_ceil(chunk);
        let barrier = match fault {
            Some(Fault::BarrierWithoutGeneration) => Barrier::new_without_generation(n),
            _ => Barrier::new(n),
        };
        let plan =
            if opts.strategy == Strategy::Segmented { Plan::new(spheres, global_workers) } else { Plan::default() };
        // This process's workers' buffers only (all of them unless distributed).
        let own_bufs = match plan.first_buf.get(first_worker..=first_worker + n) {
            Some([lo, .., hi]) => *lo..*hi,
            _ => 0..0,
        };
        let dist = comm.map(|c| Dist::new(c, n, &plan, spheres));
        let arrivals = if fault == Some(Fault::ArrivalOrderMerge) { n } else { 0 };
        let model_slot = if opts.strategy == Strategy::ModelLock {
            ModelSlot { scratch: Some(workload.new_scratch(rows / spheres, seq)), grad: vec![0.0; p] }
        } else {
            ModelSlot { scratch: None, grad: Vec::new() }
        };
        let cells = |count: usize| (0..count).map(|_| B::Cell::new(0.0)).collect();
        Shared {
            workload,
            n_workers: n,
            global_workers,
            first_worker,
            buf_base: own_bufs.start,
            dist,
            spheres,
            rows_per_micro: rows / spheres,
            seq,
            strategy: opts.strategy,
            clip_norm: opts.clip_norm,
            clip_mode: opts.clip_mode,
            adamw: opts.adamw,
            decay: opts.decay_mask.clone().unwrap_or_else(|| DecayMask::all(p)),
            inject_nan: opts.inject_nan.clone(),
            barrier,
            control: B::Cell::new(Control::default()),
            batch: B::Cell::new(StepBatch::zeros(rows, seq)),
            weights: ChunkedBuf::new(params, chunk),
            sum: ChunkedBuf::new(vec![0.0; p], chunk),
            adam_m: ChunkedBuf::new(vec![0.0; p], chunk),
            adam_v: ChunkedBuf::new(vec![0.0; p], chunk),
            bufs: own_bufs.map(|_| B::Cell::new(vec![0.0; p])).collect(),
            plan,
            results: (0..spheres).map(|_| B::Cell::new(SlotResult::default())).collect(),
            partials: cells(n_chunks),
            timings: (0..n).map(|_| B::Cell::new(WorkerTiming::default())).collect(),
            next_mb: B::AtomicUsize::new(0),
            model_lock: B::Mutex::new(model_slot),
            grad_lock: B::Mutex::new(0),
            fault,
            arrived: B::AtomicUsize::new(0),
            arrival_order: (0..arrivals).map(|_| B::Cell::new(0)).collect(),
        }
    }

    /// A worker's buffers, allocated up front: with ticket-based strategies a worker may get its
    /// first micro-batch at any step, and a step after the first must not allocate.
    pub(super) fn new_local(&self, k: usize) -> Local<W> {
        let (scratch, grad) = match self.strategy {
            Strategy::Segmented if k < self.spheres => {
                (Some(self.workload.new_scratch(self.rows_per_micro, self.seq)), Vec::new())
            }
            Strategy::GradientLock => {
                (Some(self.workload.new_scratch(self.rows_per_micro, self.seq)), vec![0.0; self.workload.num_params()])
            }
            _ => (None, Vec::new()),
        };
        let tree = match self.strategy {
            Strategy::Segmented => {
                TreeLocal::new(&self.plan, self.spheres, self.first_worker + k, self.sum.chunk_range(0).len())
            }
            _ => TreeLocal::default(),
        };
        Local { scratch, grad, valid: Vec::with_capacity(self.spheres), tree }
    }
}

impl<B: Backend, W: Workload> Engine<B, W> {
    /// Spawns `opts.threads` workers over `params` for batches of `rows` x `seq` tokens.
    pub fn new(workload: W, params: Vec<f32>, rows: usize, seq: usize, opts: &TrainerOptions) -> Result<Self> {
        Self::build(workload, params, rows, seq, opts, None, None)
    }

    /// As [`Engine::new`], as one rank of a distributed run over `comm` ([`crate::dist`]):
    /// this process runs its rank's share of the tree's workers and exchanges the rest.
    pub fn distributed(
        workload: W,
        params: Vec<f32>,
        (rows, seq): (usize, usize),
        opts: &TrainerOptions,
        comm: Arc<dyn Comm>,
    ) -> Result<Self> {
        if opts.strategy != Strategy::Segmented {
            bail!(
                "a distributed run needs the segmented strategy (the one whose sum order is fixed), not {}",
                opts.strategy
            );
        }
        let p = workload.num_params();
        let spheres = resolve_spheres(opts.spheres, rows);
        // The tree's layout depends on every rank's thread count: all must agree (and on the
        // shape), or their exchanges would not match. Every rank sees the same table.
        let mine = [opts.threads, spheres, p, rows, seq, opts.chunk_size].map(|x| x as u64);
        let mut all = vec![0u64; mine.len() * comm.size()];
        comm.all_gather_u64(&mine, &mut all);
        let shape = |v: &[u64]| {
            format!(
                "{} threads, {} micro-batches of {}x{}, {} parameters in chunks of {}",
                v[0], v[1], v[3], v[4], v[2], v[5]
            )
        };
        if let Some((q, v)) = all.chunks(mine.len()).enumerate().find(|(_, v)| *v != &all[..mine.len()]) {
            bail!(
                "rank {q} runs {}, rank 0 {}: every rank needs the same --threads and run shape",
                shape(v),
                shape(&all[..mine.len()])
            );
        }
        let blocks = Plan::new(spheres, comm.size() * opts.threads).blocks.len();
        if blocks.checked_mul(p).is_none_or(|n| n > i32::MAX as usize) {
            bail!("{blocks} blocks of {p} parameters are more floats than one MPI message can count (2^31 - 1)");
        }
        Self::build(workload, params, rows, seq, opts, None, Some(comm))
    }

    /// As [`Engine::new`], with a deliberately broken protocol variant (for the model checkers'
    /// tests that each bug is found).
    #[doc(hidden)]
    pub fn with_fault(
        workload: W,
        params: Vec<f32>,
        rows: usize,
        seq: usize,
        opts: &TrainerOptions,
        fault: Fault,
    ) -> Result<Self> {
        Self::build(workload, params, rows, seq, opts, Some(fault), None)
    }

    fn build(
        workload: W,
        params: Vec<f32>,
        rows: usize,
        seq: usize,
        opts: &TrainerOptions,
        fault: Option<Fault>,
        comm: Option<Arc<dyn Comm>>,
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
        let shared = Shared::<B, W>::new(workload, params, (rows, seq, spheres), opts, fault, comm);
        let local0 = shared.new_local(0);
        let mut engine = Engine {
            shared: B::arc(shared),
            handles: Vec::with_capacity(n - 1),
            local0,
            shut_down: false,
            rows,
            seq,
            counters: StepCounters::new(opts.max_skipped_steps),
            published: 0,
            derived_valid: false,
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
    /// The micro-batch gradient buffers this engine holds (segmented:
    /// [`super::tree::max_live_buffers`]; the lock strategies: none), besides the summed one.
    pub fn gradient_buffers(&self) -> usize {
        self.shared.bufs.len()
    }

    /// Steps taken so far (including steps whose update was skipped).
    pub fn step_count(&self) -> u64 {
        self.counters.step
    }
    /// Sets the step counter (for resuming); the next step is `n + 1`.
    pub fn set_step(&mut self, n: u64) {
        self.counters.step = n;
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
        unsafe { (self.shared.adam_m.as_slice_unchecked(), self.shared.adam_v.as_slice_unchecked(), self.counters.t) }
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
        self.counters.t = t;
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
        self.derive_from_weights();
        let ctl = self.publish(inputs, targets, lr);
        self.in_step = true;
        let ok = {
            let sh = &*self.shared;
            let _guard = PoisonOnUnwind(sh);
            sh.barrier.wait().is_ok() && sh.run_step(0, &ctl, &mut self.local0).is_ok() && sh.barrier.wait().is_ok()
        };
        if !ok {
            let msg = "a worker thread died during the step".to_string();
            self.failed = Some(msg.clone());
            return Err(Error(msg));
        }
        self.in_step = false;
        self.collect(ctl.step, report)?;
        report.timings.wall = wall.elapsed();
        self.counters.record(report)
    }

    /// Makes what the workload derives from the weights (the GPT model's shared packing) match
    /// them before a step that would otherwise find it stale: the first step, and the first
    /// after [`Engine::set_params`]. Serial, between steps; without it each worker would pack
    /// the weights for itself in that step (one packing per worker: 1 GB each at GPT-2 124M).
    fn derive_from_weights(&mut self) {
        if self.derived_valid {
            return;
        }
        let sh = &*self.shared;
        // SAFETY: `&mut self` proves no step is running (every worker is parked at "start"), so
        // the weights are not written and no `compute` reads the derived data; this is the only
        // call, over the whole range: `weights_written`'s contract (disjoint concurrent ranges,
        // no compute meanwhile) holds.
        unsafe { sh.weights.read_all(|w| sh.workload.weights_written(0, w)) };
        self.derived_valid = true;
        sh.workload.derived_valid_for(Some(self.published + 1));
    }

    /// Writes the batch and the control block of the next step (before "start").
    fn publish(&mut self, inputs: &[u32], targets: &[u32], lr: f32) -> Control {
        let sh = &*self.shared;
        self.published += 1;
        let step = self.counters.step + 1;
        let ctl = Control { step, t_next: self.counters.t + 1, lr, shutdown: false, weights_version: self.published };
        // SAFETY: `&mut self` and `in_step == false` mean every worker is parked at "start", so
        // nothing reads the batch or the control block until the coordinator's next wait.
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
        if sh.has_fault(Fault::ArrivalOrderMerge) {
            sh.arrived.store(0, Ordering::Relaxed);
        }
        ctl
    }

    /// Fills the report of step `step` (after "done", which ordered every worker's writes
    /// before this) and declares what the workload derived from the weights valid or not.
    fn collect(&mut self, step: u64, report: &mut StepReport) -> Result<()> {
        let sh = &*self.shared;
        let mut tally = StepTally::begin(report, step);
        let mut panic = None;
        for (m, r) in sh.results.iter().enumerate() {
            // SAFETY: read after "done"; workers are parked.
            unsafe {
                r.with(|r| {
                    if let Some(p) = &r.panic {
                        panic.get_or_insert_with(|| format!("worker panicked in micro-batch {m}: {p}"));
                    }
                    if r.valid() {
                        tally.valid(r.loss, r.scan.norm(), r.factor);
                    } else {
                        tally.invalid(m, r.scan.bad_entries());
                    }
                })
            };
        }
        if let Some(p) = panic {
            self.failed = Some(p.clone());
            return Err(Error(p));
        }
        let total = if tally.n_valid() > 0 { sh.total_sqnorm() } else { f64::NAN };
        let updated = tally.finish(total, sh.clip_norm, sh.clip_mode).is_some();
        // An applied update wrote every chunk, and with it everything derived from it; a
        // skipped one left both as they were. The next step reads version `published + 1`.
        self.derived_valid |= updated;
        sh.workload.derived_valid_for(self.derived_valid.then_some(self.published + 1));
        report.timings.workers.clear();
        for t in &sh.timings {
            // SAFETY: read after "done"; workers are parked.
            report.timings.workers.push(unsafe { t.with(|t| *t) });
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

pub(super) fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}
