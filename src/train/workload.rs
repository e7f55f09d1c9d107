//! The math of one micro-batch, separated from the protocol that schedules it.
//!
//! The protocol ([`super::protocol`]) only asks a [`Workload`] for the gradient of one
//! micro-batch against read-only weights. [`GptWorkload`] is the real model; [`ScaleWorkload`]
//! is a tiny deterministic fake whose gradients are exact in f32, used by the loom and shuttle
//! checks and the protocol tests so that the checked code is the real protocol.

use crate::config::ModelConfig;
use crate::model::packed::SharedPacking;
use crate::model::{self, Activations, PackedWeights};
use crate::sync::{Backend, CellApi, ChunkedBuf, Std};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// The token batch of one step: `rows` sequences of `seq` tokens, row-major.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepBatch {
    pub rows: usize,
    pub seq: usize,
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
}

impl StepBatch {
    pub fn zeros(rows: usize, seq: usize) -> Self {
        StepBatch { rows, seq, inputs: vec![0; rows * seq], targets: vec![0; rows * seq] }
    }

    /// Rows per micro-batch when the batch is split into `spheres` micro-batches.
    pub fn rows_per_micro(&self, spheres: usize) -> usize {
        self.rows / spheres
    }

    /// The inputs and targets of micro-batch `mb` of `spheres`.
    pub fn micro(&self, mb: usize, spheres: usize) -> (&[u32], &[u32]) {
        let n = self.rows_per_micro(spheres) * self.seq;
        let r = mb * n..(mb + 1) * n;
        (&self.inputs[r.clone()], &self.targets[r])
    }
}

/// One micro-batch's loss and gradient as a pure function of (weights, batch, micro-batch).
pub trait Workload: Send + Sync + 'static {
    /// Per-worker buffers (activations), created once per worker and reused every step.
    type Scratch: Send + 'static;

    fn num_params(&self) -> usize;

    /// Scratch for micro-batches of `rows` sequences of `seq` tokens.
    fn new_scratch(&self, rows: usize, seq: usize) -> Self::Scratch;

    /// Overwrites `grad` with d(mean loss of micro-batch `mb` of `spheres`)/d(weights) and
    /// returns that mean loss. Must not depend on which thread calls it.
    ///
    /// `weights_version` names the weights: callers pass a new version whenever the weights
    /// may have changed (the engines pass a per-engine counter bumped every step) and the same
    /// version only for the same weights, so a workload may cache in `scratch` what it derives
    /// from them (the GPT workload's packed weights).
    #[allow(clippy::too_many_arguments)]
    fn compute(
        &self,
        scratch: &mut Self::Scratch,
        weights: &[f32],
        weights_version: u64,
        batch: &StepBatch,
        mb: usize,
        spheres: usize,
        grad: &mut [f32],
    ) -> f32;

    /// The update phase has just written `values` to `weights[start..start + values.len()]`.
    /// A workload that derives data from the weights may update it here, chunk by chunk and in
    /// parallel (the GPT workload's shared packing of the weights). The default does nothing.
    ///
    /// # Safety
    /// Called only by the owner of that chunk while it holds the chunk for writing in the
    /// update phase: concurrent calls have disjoint ranges, and no `compute` runs until the
    /// next step.
    unsafe fn weights_written(&self, start: usize, values: &[f32]) {
        let _ = (start, values);
    }

    /// Called between steps, with no step running: the data derived through
    /// [`Workload::weights_written`] now matches the weights of `version` (`None`: it may not,
    /// for example after the weights were replaced). The default does nothing.
    fn derived_valid_for(&self, version: Option<u64>) {
        let _ = version;
    }
}

/// The real GPT-2-style model: `model::forward` + `model::backward` on one micro-batch.
#[derive(Debug)]
pub struct GptWorkload {
    pub config: ModelConfig,
    /// Built once: `model::forward` would rebuild (and allocate) it on every call.
    layout: model::ParamLayout,
    /// The weights packed for the GEMM kernel, written by the engine's update phase
    /// ([`Workload::weights_written`]) and shared by all workers; used when it matches the
    /// weights version of a call, else each worker packs for itself.
    shared_packing: SharedPacking,
    /// Training dropout: probability (0: none) and run seed; the masks are keyed by them, the
    /// step and the micro-batch ([`crate::model::dropout`]).
    dropout: f32,
    dropout_seed: u64,
    /// The step being computed (from 1), stored by the [`super::Trainer`] before it publishes
    /// the step (the engine's step synchronization orders the store before every read).
    step: Arc<AtomicU64>,
}

impl GptWorkload {
    pub fn new(config: ModelConfig) -> Self {
        let layout = model::ParamLayout::new(&config);
        let step = Arc::new(AtomicU64::new(0));
        GptWorkload { config, shared_packing: SharedPacking::new(&layout), layout, dropout: 0.0, dropout_seed: 0, step }
    }

    /// With dropout `p` (0: none) keyed by `seed`, the step in `step` and the micro-batch.
    pub fn with_dropout(mut self, p: f32, seed: u64, step: Arc<AtomicU64>) -> Self {
        self.dropout = p;
        self.dropout_seed = seed;
        self.step = step;
        self
    }
}

impl Clone for GptWorkload {
    /// A workload of the same config and dropout with a packing of its own (valid for no
    /// version yet).
    fn clone(&self) -> Self {
        GptWorkload::new(self.config).with_dropout(self.dropout, self.dropout_seed, Arc::clone(&self.step))
    }
}

/// A worker's buffers for [`GptWorkload`]: activations, and (only when the shared packing does
/// not match the weights: the engine packs it before the first step, so only a caller that
/// skips the engine gets here) the weights packed by this worker, once per
/// weights version, then reused by every micro-batch it computes.
pub struct GptScratch {
    pub acts: Activations,
    packed: Option<PackedWeights>,
    packed_version: Option<u64>,
}

impl Workload for GptWorkload {
    type Scratch = GptScratch;

    fn num_params(&self) -> usize {
        self.layout.num_params()
    }

    fn new_scratch(&self, rows: usize, seq: usize) -> GptScratch {
        GptScratch { acts: Activations::new(&self.config, rows, seq), packed: None, packed_version: None }
    }

    fn compute(
        &self,
        scratch: &mut GptScratch,
        weights: &[f32],
        weights_version: u64,
        batch: &StepBatch,
        mb: usize,
        spheres: usize,
        grad: &mut [f32],
    ) -> f32 {
        let (inputs, targets) = batch.micro(mb, spheres);
        let rows = batch.rows_per_micro(spheres);
        // SAFETY: `compute` never runs while the update phase writes the shared packing (the
        // contract of `weights_written`'s callers).
        let packed = match unsafe { self.shared_packing.packed_for(weights_version) } {
            Some(shared) => {
                // A packing of this worker's own is stale once the shared one is valid.
                if scratch.packed.take().is_some() {
                    scratch.packed_version = None;
                }
                shared
            }
            None => {
                let own = scratch.packed.get_or_insert_with(|| PackedWeights::new(&self.layout));
                if scratch.packed_version != Some(weights_version) {
                    own.pack(&self.layout, weights);
                    scratch.packed_version = Some(weights_version);
                }
                &*own
            }
        };
        let acts = &mut scratch.acts;
        let step = self.step.load(Ordering::Relaxed);
        let dropout = model::dropout::Dropout::new(self.dropout, self.dropout_seed, step, mb);
        let loss = model::gpt::forward_dropout(
            &self.layout,
            weights,
            Some(packed),
            acts,
            inputs,
            Some(targets),
            rows,
            batch.seq,
            dropout,
        );
        model::gpt::backward_with_layout(&self.layout, weights, Some(packed), acts, grad);
        loss
    }

    unsafe fn weights_written(&self, start: usize, values: &[f32]) {
        // SAFETY: forwarded contract: disjoint concurrent ranges, no compute meanwhile.
        unsafe { self.shared_packing.write_range(start, values) }
    }

    fn derived_valid_for(&self, version: Option<u64>) {
        self.shared_packing.set_valid_for(version);
    }
}

/// Micro-batch 0's probe value under [`ScaleWorkload::order_probe`]: 2^24, where the spacing
/// of f32 is 2.
pub const ORDER_PROBE: f32 = 16_777_216.0;

/// A fake workload for protocol checks: `grad[i] = weights[i] * (mb + 1) + first input token of
/// the micro-batch`, loss = `mb + first token`. With small integer weights every value is exact
/// in f32, so any lost, doubled or misplaced contribution shows in the result. It counts the
/// calls per micro-batch (a test probe, not part of the protocol's synchronization).
///
/// Like [`GptWorkload`]'s shared packing, it keeps data derived from the weights: a copy of
/// them, written chunk by chunk in [`Workload::weights_written`] by the update phase and read
/// by `compute` (instead of the weights) whenever the engine declares it valid for the step's
/// weights version. The copy lives in `B`'s tracked cells, one per chunk of the engine's
/// reduction, so the model checkers catch a write to it that overlaps a read; a stale copy
/// shows as a gradient that differs from the serial oracle's.
pub struct ScaleWorkload<B: Backend = Std> {
    params: usize,
    calls: Vec<AtomicUsize>,
    /// Panic when computing this micro-batch (to test worker-panic propagation).
    pub panic_on: Option<usize>,
    /// Replace the first entry of every gradient by [`ORDER_PROBE`] (micro-batch 0) or 1.0
    /// (the others): `(2^24 + 1) + 1` rounds to `2^24` while `2^24 + (1 + 1)` is exact, so the
    /// order in which the gradients are added shows in that entry's bits.
    pub order_probe: bool,
    /// The derived copy of the weights.
    derived: ChunkedBuf<B>,
    /// The weights version `derived` matches, if any (written only between steps).
    derived_for: B::Cell<Option<u64>>,
}

impl<B: Backend> std::fmt::Debug for ScaleWorkload<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScaleWorkload").field("params", &self.params).field("panic_on", &self.panic_on).finish()
    }
}

impl ScaleWorkload<Std> {
    /// The fake for the std backend (whose cells track nothing, so the chunking is moot).
    pub fn new(params: usize, spheres: usize) -> Self {
        Self::tracked(params, spheres, params.max(1))
    }
}

impl<B: Backend> ScaleWorkload<B> {
    /// The same fake with [`ScaleWorkload::order_probe`] set.
    pub fn probing_order(mut self) -> Self {
        self.order_probe = true;
        self
    }

    /// The fake for backend `B`, its derived copy tracked in chunks of `chunk` floats: pass the
    /// engine's chunk size, so that each update-phase write holds exactly one tracked chunk.
    pub fn tracked(params: usize, spheres: usize, chunk: usize) -> Self {
        ScaleWorkload {
            params,
            calls: (0..spheres).map(|_| AtomicUsize::new(0)).collect(),
            panic_on: None,
            order_probe: false,
            derived: ChunkedBuf::new(vec![0.0; params], chunk),
            derived_for: B::Cell::new(None),
        }
    }

    /// How many times micro-batch `mb` has been computed since creation.
    pub fn calls(&self, mb: usize) -> usize {
        self.calls[mb].load(Ordering::SeqCst)
    }

    /// The gradient `compute` produces, for building expected results.
    pub fn expected_grad(weights: &[f32], batch: &StepBatch, mb: usize, spheres: usize) -> Vec<f32> {
        let tok = batch.micro(mb, spheres).0.first().copied().unwrap_or(0) as f32;
        weights.iter().map(|w| w * (mb + 1) as f32 + tok).collect()
    }
}

impl<B: Backend> Workload for ScaleWorkload<B> {
    type Scratch = ();

    fn num_params(&self) -> usize {
        self.params
    }

    fn new_scratch(&self, _rows: usize, _seq: usize) {}

    fn compute(
        &self,
        _scratch: &mut (),
        weights: &[f32],
        weights_version: u64,
        batch: &StepBatch,
        mb: usize,
        spheres: usize,
        grad: &mut [f32],
    ) -> f32 {
        if let Some(c) = self.calls.get(mb) {
            c.fetch_add(1, Ordering::SeqCst);
        }
        if self.panic_on == Some(mb) {
            panic!("ScaleWorkload: injected panic in micro-batch {mb}");
        }
        let tok = batch.micro(mb, spheres).0.first().copied().unwrap_or(0) as f32;
        let probe = if mb == 0 { ORDER_PROBE } else { 1.0 };
        let fill = |weights: &[f32], grad: &mut [f32]| {
            for (g, w) in grad.iter_mut().zip(weights) {
                *g = w * (mb + 1) as f32 + tok;
            }
            if let Some(g) = grad.first_mut().filter(|_| self.order_probe) {
                *g = probe;
            }
        };
        // SAFETY: `derived_for` is written only between steps (`derived_valid_for`), and the
        // copy only in the update phase (`weights_written`): neither runs during a compute.
        unsafe {
            if self.derived_for.with(|v| *v == Some(weights_version)) {
                self.derived.read_all(|copy| fill(copy, grad));
            } else {
                fill(weights, grad);
            }
        }
        mb as f32 + tok
    }

    unsafe fn weights_written(&self, start: usize, values: &[f32]) {
        // SAFETY: forwarded contract: concurrent calls have disjoint ranges and no compute runs
        // meanwhile.
        unsafe { self.derived.write_range(start..start + values.len(), |d| d.copy_from_slice(values)) }
    }

    fn derived_valid_for(&self, version: Option<u64>) {
        // SAFETY: called between steps, with no step running (the trait's contract), so nothing
        // reads the cell meanwhile.
        unsafe { self.derived_for.with_mut(|v| *v = version) }
    }
}
