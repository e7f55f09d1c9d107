//! Per-step, per-worker timing. Two `Instant::now()` per phase, cheap enough to stay on.
//!
//! The clock comes from the sync backend ([`Backend::now`]), which is `None` under the model
//! checkers, so the checked code paths never read wall time.

use crate::sync::Backend;
use serde::Serialize;
use std::marker::PhantomData;
use std::time::{Duration, Instant};

/// Where one worker spent one step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct WorkerTiming {
    /// Forward + backward + gradient scan (and per-sphere clip scaling) of its micro-batches.
    pub compute: Duration,
    /// segmented: merging sibling sub-trees in its buffers during the compute phase (the
    /// summation tree's pairwise merges; the top combine is in `reduce`).
    pub merge: Duration,
    /// Waiting at the in-step barriers ("computed" and "reduced").
    pub barrier_wait: Duration,
    /// Waiting to acquire the model / gradient mutexes (lock strategies).
    pub lock_wait: Duration,
    /// Mutex acquisitions (lock strategies).
    pub lock_acquisitions: u32,
    /// Combining the workers' sub-trees into the sum (segmented) or adding into the accumulator
    /// (lock strategies, measured while holding the lock), plus the chunk norms.
    pub reduce: Duration,
    /// AdamW on its chunks.
    pub optimizer: Duration,
    /// Distributed runs, worker 0: the exchange with the other ranks (results, the top of the
    /// tree over each owned chunk, the gathered sum and its chunk norms), and the bytes this
    /// rank sent to the others in it.
    pub exchange: Duration,
    pub exchange_bytes: u64,
    /// Micro-batches it computed.
    pub micro_batches: u32,
}

/// Timings of one step.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct StepTimings {
    /// Wall time of `step()`, from publishing the batch to the report.
    pub wall: Duration,
    /// One entry per worker thread (empty for the rayon strategy, which has no fixed workers;
    /// there `compute`, `reduce` and `optimizer` of the single entry are the phase wall times).
    pub workers: Vec<WorkerTiming>,
}

impl StepTimings {
    /// Sum of a field over the workers.
    pub fn total(&self, f: impl Fn(&WorkerTiming) -> Duration) -> Duration {
        self.workers.iter().map(f).sum()
    }
}

/// A stopwatch on the backend's clock (a no-op under the model checkers).
pub struct Clock<B: Backend> {
    start: Option<Instant>,
    _b: PhantomData<B>,
}

impl<B: Backend> Clock<B> {
    pub fn start() -> Self {
        Clock { start: B::now(), _b: PhantomData }
    }
    /// Time since the start (zero without a clock).
    pub fn elapsed(&self) -> Duration {
        match (self.start, B::now()) {
            (Some(a), Some(b)) => b.duration_since(a),
            _ => Duration::ZERO,
        }
    }
    /// Time since the start, then restarts.
    pub fn lap(&mut self) -> Duration {
        let now = B::now();
        let d = match (self.start, now) {
            (Some(a), Some(b)) => b.duration_since(a),
            _ => Duration::ZERO,
        };
        self.start = now;
        d
    }
}
