//! The phases of `segmented`: the summation tree ([`super::tree`]) evaluated by the workers.
//!
//! Compute: worker `k` computes its contiguous micro-batches in order, each into a free buffer
//! of its own (buffers `plan.first_buf[k]..plan.first_buf[k + 1]`), scans it and applies its
//! per-sphere clip factor; then it pushes the leaf on its stack and merges while the top two
//! entries are siblings: the right one is added into the left one's buffer and freed (the
//! merges one leaf sets off are folded in one pass over tiles, the same additions). A
//! skipped micro-batch is an entry without a buffer, and a merge with it keeps the other side
//! unchanged. At the end the stack is the worker's blocks, published in `tops` (the buffer of
//! each block, if any).
//!
//! Reduce (after "computed"): every worker builds the same [`Program`] from `tops`, and each
//! chunk's owner folds the blocks' chunks into that chunk of `sum`, in tree order.
//!
//! Why it holds:
//! - every leaf is merged exactly once: the counter pushes each micro-batch of the range once
//!   and a merge consumes two entries into one, so the blocks partition the range (unit-tested
//!   in [`super::tree`]), and the program names every present block once;
//! - no buffer is reused while it is read: within a worker, a buffer is freed only after the
//!   merge that read it returned, and the next leaf is computed after that; the reduction reads
//!   the blocks only between "computed" and "reduced", and the next write to any buffer comes
//!   after the next "start";
//! - the top combine starts only after "computed", when every worker's blocks are final;
//! - a worker never needs more buffers than it has: it holds one per stack entry at most, and
//!   its pool is the counter's peak over its range ([`super::tree::peak_buffers`]).

use super::engine::Local;
use super::fault::Fault;
use super::protocol::{Control, Shared};
use super::timing::{Clock, WorkerTiming};
use super::tree::{self, Op, Program};
use super::workload::Workload;
use crate::grad;
use crate::sync::{AtomicUsizeApi, Backend, CellApi};
use std::ops::Range;
use std::sync::atomic::Ordering;

/// Floats per tile of a merge cascade (16 KiB: stays in L1 beside the streamed buffers).
const CASCADE_TILE: usize = 4096;

/// A worker's state for the tree, allocated once.
#[derive(Debug, Default)]
pub(super) struct TreeLocal {
    /// The counter's stack: (tree node, the buffer holding its sum; None if every leaf was
    /// skipped).
    stack: Vec<(Range<usize>, Option<usize>)>,
    /// This worker's free buffers.
    free: Vec<usize>,
    /// The present buffers of one merge cascade, and the tile it is folded through.
    cascade: Vec<usize>,
    tile: Vec<f32>,
    /// The reduction's program and the buffer of each block.
    program: Program,
    tops: Vec<Option<usize>>,
    /// The fold's stack levels above level 0.
    tmp: Vec<f32>,
}

impl TreeLocal {
    /// Buffers sized for worker `k`'s part in the tree over `chunk`-float chunks.
    pub fn new(plan: &tree::Plan, spheres: usize, k: usize, chunk: usize) -> Self {
        let own = plan.first_buf.get(k + 1).copied().unwrap_or(0) - plan.first_buf.get(k).copied().unwrap_or(0);
        let mut program = Program::default();
        program.build(spheres, &plan.blocks, |_| true);
        let levels = program.depth().saturating_sub(1);
        TreeLocal {
            stack: Vec::with_capacity(own + 1),
            free: Vec::with_capacity(own),
            cascade: Vec::with_capacity(own + 1),
            tile: vec![0.0; CASCADE_TILE],
            tops: Vec::with_capacity(plan.blocks.len()),
            tmp: vec![0.0; levels * chunk],
            program,
        }
    }
}

impl<B: Backend, W: Workload> Shared<B, W> {
    /// Phase 1 under segmented: worker k's micro-batches, evaluated into its blocks.
    pub(super) fn compute_tree(&self, k: usize, ctl: &Control, local: &mut Local<W>, tm: &mut WorkerTiming) {
        let t = &mut local.tree;
        t.stack.clear();
        t.free.clear();
        t.free.extend((self.plan.first_buf[k]..self.plan.first_buf[k + 1]).rev());
        for m in tree::worker_range(self.spheres, self.n_workers, k) {
            let b = t.free.pop().expect("a worker's pool holds its counter's peak (tree::peak_buffers)");
            // SAFETY: buffer b belongs to worker k, which alone writes its buffers, in the
            // compute phase; the others read them only between "computed" and "reduced".
            let res = unsafe {
                self.bufs[b].with_mut(|g| {
                    let res = self.compute_one(m, ctl, &mut local.scratch, g);
                    if res.valid() && res.factor != 1.0 {
                        grad::scale(g, res.factor);
                    }
                    res
                })
            };
            let buf = if res.valid() { Some(b) } else { None };
            if buf.is_none() {
                t.free.push(b);
            }
            self.publish_result(m, res);
            tm.micro_batches += 1;
            t.stack.push((m..m + 1, buf));
            let clock = Clock::<B>::start();
            self.merge_siblings(t);
            tm.merge += clock.elapsed();
        }
        for (i, (_, buf)) in t.stack.iter().enumerate() {
            // SAFETY: top i of worker k is written only by worker k in the compute phase and
            // read only between "computed" and "reduced".
            unsafe { self.tops[self.plan.first_block[k] + i].with_mut(|top| *top = *buf) };
        }
        if self.has_fault(Fault::ArrivalOrderMerge) {
            let slot = self.arrived.fetch_add(1, Ordering::Relaxed);
            // SAFETY: slot `slot` is drawn once per step from the counter; read after "computed".
            unsafe { self.arrival_order[slot].with_mut(|w| *w = k) };
        }
    }

    /// The binary counter: while the top two stack entries are siblings, merge them. The
    /// merges a new leaf sets off form one cascade (each merge's result is the right sibling
    /// of the next), so they are done in one pass: [`Self::fold_cascade`].
    fn merge_siblings(&self, t: &mut TreeLocal) {
        let n = t.stack.len();
        let (mut j, mut node) = (n - 1, t.stack[n - 1].0.clone());
        while j > 0 && tree::siblings(self.spheres, &t.stack[j - 1].0, &node) {
            node = t.stack[j - 1].0.start..node.end;
            j -= 1;
        }
        if j == n - 1 {
            return;
        }
        t.cascade.clear();
        t.cascade.extend(t.stack[j..].iter().filter_map(|e| e.1));
        let buf = t.cascade.first().copied();
        if t.cascade.len() > 1 {
            self.fold_cascade(&t.cascade, &mut t.tile);
            t.free.extend(&t.cascade[1..]);
        }
        t.stack.truncate(j);
        t.stack.push((node, buf));
    }

    /// `bufs[c0] = c0 + (c1 + (... + c_last))` for the buffers `cascade` (left to right): the
    /// additions of merging the right pair first, then each result into the next one to its
    /// left, element by element, but over tiles held in `tile` (L1-sized), so each buffer is
    /// read once and `c0` written once (j + 2 passes for j merges instead of 3j).
    fn fold_cascade(&self, cascade: &[usize], tile: &mut [f32]) {
        let (Some((&left, rest)), p) = (cascade.split_first(), self.workload.num_params()) else { return };
        let Some((&last, mid)) = rest.split_last() else { return };
        for start in (0..p).step_by(tile.len()) {
            let r = start..(start + tile.len()).min(p);
            let acc = &mut tile[..r.len()];
            // SAFETY: the cascade's buffers are this worker's, distinct (one per stack entry),
            // and written only by it in the compute phase; one cell is accessed at a time.
            unsafe {
                self.bufs[last].with(|g| acc.copy_from_slice(&g[r.clone()]));
                for &b in mid.iter().rev() {
                    self.bufs[b].with(|g| tree::add(acc, &g[r.clone()]));
                }
                self.bufs[left].with_mut(|g| tree::add(&mut g[r.clone()], acc));
            }
        }
    }

    /// Phase 2 under segmented, after "computed": this worker's program over every block.
    pub(super) fn build_program(&self, t: &mut TreeLocal) {
        t.tops.clear();
        for top in &self.tops {
            // SAFETY: tops are written in the compute phase and read only after "computed".
            t.tops.push(unsafe { top.with(|b| *b) });
        }
        if self.has_fault(Fault::ArrivalOrderMerge) {
            return self.arrival_order_program(t);
        }
        let tops = &t.tops;
        t.program.build(self.spheres, &self.plan.blocks, |i| tops[i].is_some());
    }

    /// BUG (deliberate, [`Fault::ArrivalOrderMerge`]): the blocks are added in the order their
    /// workers finished computing, not in tree order.
    fn arrival_order_program(&self, t: &mut TreeLocal) {
        t.program.ops.clear();
        for slot in 0..self.n_workers {
            // SAFETY: written once per step before "computed", read after it.
            let k = unsafe { self.arrival_order[slot].with(|w| *w) };
            for i in self.plan.first_block[k]..self.plan.first_block[k + 1] {
                if t.tops[i].is_some() {
                    let op = if t.program.ops.is_empty() { Op::Push(i) } else { Op::AddFrom(i) };
                    t.program.ops.push(op);
                }
            }
        }
    }

    /// Chunk `c` of `sum` = the tree over the blocks' chunks (the program must not be empty).
    pub(super) fn fold_chunk(&self, c: usize, t: &mut TreeLocal) {
        let r = self.sum.chunk_range(c);
        let (program, tops, tmp) = (&t.program, &t.tops, &mut t.tmp);
        // SAFETY: chunk c of `sum` is written only by its owner in the reduce phase; the blocks
        // are final after "computed" and only read until "reduced".
        unsafe {
            self.sum.write_chunk(c, |dst| {
                program.fold(dst, tmp, |i, f| {
                    let b = tops[i].expect("the program names present blocks only");
                    self.bufs[b].with(|g| f(&g[r.clone()]))
                })
            })
        }
    }
}
