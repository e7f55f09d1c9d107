//! Deliberately broken variants of the step protocol, for the tests that prove the model
//! checkers (`loom_tests/loom.rs`, `tests/shuttle_protocol.rs`) find each bug.
//!
//! They are compiled into every build, so that enabling a checker feature never changes the
//! binary; an engine runs one only when built with the hidden [`super::Engine::with_fault`].
//! Each variant's broken code sits where the correct code is, marked `BUG (deliberate)`: in the
//! barrier ([`super::barrier`]), the protocol ([`super::protocol`]), the lock strategies
//! ([`super::lock_strategies`]), the tree's phases ([`super::segmented`]) and below.

use super::protocol::Shared;
use super::workload::Workload;
use crate::sync::Backend;

/// A deliberately broken protocol variant.
#[doc(hidden)]
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
    /// The workload's derived data is written lazily in the next compute phase, right before
    /// each micro-batch, instead of in the update phase: other workers may be reading it.
    RepackDuringCompute,
    /// segmented: the reduction adds the workers' blocks in the order the workers finished
    /// computing instead of in tree order (what an in-place accumulator as they arrive does).
    ArrivalOrderMerge,
}

impl<B: Backend, W: Workload> Shared<B, W> {
    pub(super) fn has_fault(&self, f: Fault) -> bool {
        self.fault == Some(f)
    }

    /// BUG (deliberate, [`Fault::RepackDuringCompute`]): right before computing micro-batch
    /// `m`, the derived data of chunks `m % N, m % N + N, ...` is written from `weights` (under
    /// segmented: the computing worker's own chunks), while the other workers may be reading it.
    pub(super) fn repack_lazily(&self, m: usize, weights: &[f32]) {
        for c in (m % self.n_workers..self.weights.num_chunks()).step_by(self.n_workers) {
            let r = self.weights.chunk_range(c);
            // SAFETY: none: this call breaks `weights_written`'s contract (no compute may run
            // meanwhile), which is the bug the checkers must find.
            unsafe { self.workload.weights_written(r.start, &weights[r]) };
        }
    }
}
