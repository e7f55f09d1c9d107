//! The compute phase of the lock strategies, `gradient-lock` and `model-lock`.
//!
//! Both hand out micro-batches as tickets from one atomic counter (reset by the coordinator
//! between steps, so each ticket is drawn once per step) and add each valid gradient into one
//! shared accumulator, the protocol's `sum`, under the gradient mutex. The reduction then only
//! takes the chunk norms of that sum (see [`super::protocol`]). The sum follows the order in
//! which workers take the mutex, so these strategies match the serial oracle only up to
//! rounding; they are kept as comparison points for the segmented protocol.
//!
//! - `gradient-lock`: each worker computes into its own gradient buffer, then adds it under
//!   the gradient mutex;
//! - `model-lock` (the original design): one shared set of activations and one gradient
//!   buffer behind a model mutex; the gradient mutex is taken while holding it (lock order:
//!   model, then gradient, everywhere, so the two cannot deadlock).

use super::engine::Local;
use super::fault::Fault;
use super::protocol::{Control, Shared, SlotResult};
use super::timing::{Clock, WorkerTiming};
use super::workload::Workload;
use crate::grad;
use crate::sync::{AtomicUsizeApi, Backend, ChunkedBuf, MutexApi};
use std::sync::atomic::Ordering;

/// model-lock: one shared set of activations and one gradient buffer, as in the original design.
pub(super) struct ModelSlot<S> {
    pub scratch: Option<S>,
    pub grad: Vec<f32>,
}

impl<B: Backend, W: Workload> Shared<B, W> {
    /// The compute phase of worker k under a lock strategy: draw tickets until none is left.
    pub(super) fn compute_by_ticket(&self, k: usize, ctl: &Control, local: &mut Local<W>, tm: &mut WorkerTiming) {
        loop {
            // Relaxed is enough: the counter only has to hand out each ticket once; the
            // results are ordered by the barriers.
            let m = self.next_mb.fetch_add(1, Ordering::Relaxed);
            if m >= self.spheres {
                break;
            }
            let res = if self.strategy == super::Strategy::GradientLock {
                self.gradient_lock_one(m, ctl, local, tm)
            } else {
                self.model_lock_one(k, m, ctl, tm)
            };
            self.publish_result(m, res);
            tm.micro_batches += 1;
        }
    }

    fn gradient_lock_one(&self, m: usize, ctl: &Control, local: &mut Local<W>, tm: &mut WorkerTiming) -> SlotResult {
        let p = self.workload.num_params();
        if local.grad.len() != p {
            local.grad.resize(p, 0.0);
        }
        let res = self.compute_one(m, ctl, &mut local.scratch, &mut local.grad);
        if !res.valid() {
            return res;
        }
        if self.has_fault(Fault::UnlockedAccumulation) {
            // BUG (deliberate): the count is claimed under the lock but the data is written
            // after releasing it.
            let mut count = self.grad_lock.with(|c| {
                *c += 1;
                *c - 1
            });
            accumulate(&self.sum, &mut count, &local.grad, res.factor);
            return res;
        }
        self.accumulate_locked(&local.grad, res.factor, tm);
        res
    }

    fn model_lock_one(&self, k: usize, m: usize, ctl: &Control, tm: &mut WorkerTiming) -> SlotResult {
        if self.has_fault(Fault::LockOrderInversion) && k % 2 == 1 {
            // BUG (deliberate): gradient mutex first, then model mutex.
            return self.grad_lock.with(|count| {
                self.model_lock.with(|ms| {
                    let p = self.workload.num_params();
                    ms.grad.resize(p, 0.0);
                    let res = self.compute_one(m, ctl, &mut ms.scratch, &mut ms.grad);
                    if res.valid() {
                        accumulate(&self.sum, count, &ms.grad, res.factor);
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
            let res = self.compute_one(m, ctl, &mut ms.scratch, &mut ms.grad);
            if res.valid() {
                // Lock order: model, then gradient (held together, as in the original design).
                self.accumulate_locked(&ms.grad, res.factor, tm);
            }
            res
        })
    }

    /// Takes the gradient mutex and adds `grad` (scaled by `factor`) into the accumulator.
    fn accumulate_locked(&self, grad: &[f32], factor: f32, tm: &mut WorkerTiming) {
        let wait = Clock::<B>::start();
        self.grad_lock.with(|count| {
            tm.lock_wait += wait.elapsed();
            tm.lock_acquisitions += 1;
            let held = Clock::<B>::start();
            accumulate(&self.sum, count, grad, factor);
            tm.reduce += held.elapsed();
        });
    }
}

/// Adds one micro-batch into the accumulator `sum`; the caller holds the gradient mutex, whose
/// value is `count`, the number of micro-batches added so far (the first one is copied).
fn accumulate<B: Backend>(sum: &ChunkedBuf<B>, count: &mut usize, grad: &[f32], factor: f32) {
    // SAFETY: during the compute phase `sum` is written only under the gradient mutex, which
    // the caller holds; it is read only after "computed".
    unsafe {
        sum.write_all(|acc| {
            if *count == 0 {
                grad::copy_scaled(acc, grad, factor)
            } else {
                grad::add_scaled(acc, grad, factor)
            }
        })
    };
    *count += 1;
}
