//! The phases of `segmented`: the summation tree ([`super::tree`]) evaluated by the workers.
//!
//! Compute: worker `k` computes its contiguous micro-batches in order, each into the next free
//! buffer of its own pool (buffers `plan.first_buf[k]..plan.first_buf[k + 1]`), scans it and
//! applies its per-sphere clip factor; then it pushes the leaf on its [`tree::Counter`] and
//! merges while the top two entries are siblings, each result into the left one's buffer,
//! which frees the right one. The merges one leaf sets off form a cascade, folded in one pass
//! over L1-sized tiles with the same additions ([`Shared::fold_cascade`]). A skipped
//! micro-batch keeps its buffer but is marked absent, and a merge leaves the other side's sum
//! unchanged; so the buffers a worker uses, and the one holding each block's sum at the end
//! (`plan.block_buf`), never depend on which micro-batches are valid.
//!
//! Reduce (after "computed"): every worker builds the same [`Program`] from the results (a
//! block is present when one of its micro-batches is valid), and each chunk's owner folds the
//! blocks' chunks into that chunk of `sum`, in tree order.
//!
//! Why it holds:
//! - every leaf is merged exactly once: the counter pushes each micro-batch of the range once
//!   and a merge turns entries into one, so the blocks partition the range (unit-tested in
//!   [`super::tree`]), and the program names every present block once;
//! - no buffer is reused while it is read: within a worker, a buffer is freed only after the
//!   fold that read it returned, and the next leaf is computed after that; the reduction reads
//!   the blocks only between "computed" and "reduced", and the next write to any buffer comes
//!   after the next "start";
//! - the top combine starts only after "computed", when every worker's blocks are final;
//! - a worker never needs more buffers than it has: it holds one per stack entry, and its
//!   pool is the counter's peak over its range ([`super::tree::peak_buffers`]).

use super::engine::Local;
use super::fault::Fault;
use super::protocol::{Control, Shared};
use super::timing::{Clock, WorkerTiming};
use super::tree::{self, Op, Program};
use super::workload::Workload;
use crate::grad;
use crate::sync::{AtomicUsizeApi, Backend, CellApi};
use std::sync::atomic::Ordering;

/// Floats per tile of a merge cascade (16 KiB: stays in L1 beside the streamed buffers).
const CASCADE_TILE: usize = 4096;

/// A worker's state for the tree, allocated once.
#[derive(Debug, Default)]
pub(super) struct TreeLocal {
    counter: tree::Counter,
    /// The present buffers of one merge cascade, and the tile it is folded through.
    cascade: Vec<usize>,
    tile: Vec<f32>,
    /// The reduction's program, and how many valid micro-batches each block has.
    pub(super) program: Program,
    pub(super) valid_in_block: Vec<usize>,
    /// The fold's stack levels above level 0.
    pub(super) tmp: Vec<f32>,
}

impl TreeLocal {
    /// Buffers sized for global worker `k`'s part in the tree over `chunk`-float chunks.
    pub fn new(plan: &tree::Plan, spheres: usize, k: usize, chunk: usize) -> Self {
        let own = plan.first_buf.get(k + 1).copied().unwrap_or(0) - plan.first_buf.get(k).copied().unwrap_or(0);
        let mut program = Program::default();
        program.build(spheres, &plan.blocks, |_| true);
        let levels = program.depth().saturating_sub(1);
        TreeLocal {
            counter: tree::Counter::with_capacity(own),
            cascade: Vec::with_capacity(own + 1),
            tile: vec![0.0; CASCADE_TILE],
            valid_in_block: Vec::with_capacity(plan.blocks.len()),
            tmp: vec![0.0; levels * chunk],
            program,
        }
    }
}

impl<B: Backend, W: Workload> Shared<B, W> {
    /// Phase 1 under segmented: worker k's micro-batches, evaluated into its blocks.
    pub(super) fn compute_tree(&self, k: usize, ctl: &Control, local: &mut Local<W>, tm: &mut WorkerTiming) {
        let t = &mut local.tree;
        let g = self.first_worker + k;
        t.counter.reset(self.plan.first_buf[g]..self.plan.first_buf[g + 1]);
        for m in tree::worker_range(self.spheres, self.global_workers, g) {
            let b = t.counter.next_buffer().expect("a worker's pool holds its counter's peak (tree::peak_buffers)");
            // SAFETY: buffer b belongs to worker k, which alone writes its buffers, in the
            // compute phase; the others read them only between "computed" and "reduced".
            let res = unsafe {
                self.buf(b).with_mut(|g| {
                    let res = self.compute_one(m, ctl, &mut local.scratch, g);
                    if res.valid() && res.factor != 1.0 {
                        grad::scale(g, res.factor);
                    }
                    res
                })
            };
            let valid = res.valid();
            self.publish_result(m, res);
            tm.micro_batches += 1;
            let clock = Clock::<B>::start();
            if let Some(j) = t.counter.push(self.spheres, m, valid) {
                self.fold_cascade(&t.counter.stack[j..], &mut t.cascade, &mut t.tile);
                t.counter.collapse(j);
            }
            tm.merge += clock.elapsed();
        }
        if self.has_fault(Fault::ArrivalOrderMerge) {
            let slot = self.arrived.fetch_add(1, Ordering::Relaxed);
            // SAFETY: slot `slot` is drawn once per step from the counter; read after "computed".
            unsafe { self.arrival_order[slot].with_mut(|w| *w = k) };
        }
    }

    /// The merges of one cascade `entries` (left to right; each entry's right neighbour is its
    /// right sibling once the entries after it are merged): the first entry's buffer gets
    /// `e0 + (e1 + (... + e_last))` over the present entries, the additions of merging the
    /// last pair first, then each result into its left sibling. Over tiles held in `tile`, so
    /// each buffer is read once and the first written once (j + 2 passes for j merges, not
    /// 3j). An absent first entry gets the others' sum copied in; nothing present, nothing done.
    fn fold_cascade(&self, entries: &[tree::Entry], present: &mut Vec<usize>, tile: &mut [f32]) {
        present.clear();
        present.extend(entries[1..].iter().filter(|e| e.present).map(|e| e.buf));
        let (first, p) = (&entries[0], self.workload.num_params());
        let Some((&last, mid)) = present.split_last() else { return };
        for start in (0..p).step_by(tile.len()) {
            let r = start..(start + tile.len()).min(p);
            let acc = &mut tile[..r.len()];
            // SAFETY: the cascade's buffers are this worker's, distinct (one per stack entry),
            // and written only by it in the compute phase; one cell is accessed at a time.
            unsafe {
                self.buf(last).with(|g| acc.copy_from_slice(&g[r.clone()]));
                for &b in mid.iter().rev() {
                    self.buf(b).with(|g| tree::add(acc, &g[r.clone()]));
                }
                self.buf(first.buf).with_mut(|g| {
                    if first.present {
                        tree::add(&mut g[r.clone()], acc)
                    } else {
                        g[r.clone()].copy_from_slice(acc)
                    }
                });
            }
        }
    }

    /// Phase 2 under segmented, after "computed": this worker's program over every block,
    /// from `valid` (the valid micro-batches in index order, read from the results).
    pub(super) fn build_program(&self, t: &mut TreeLocal, valid: &[(usize, f32)]) {
        t.valid_in_block.clear();
        t.valid_in_block.resize(self.plan.blocks.len(), 0);
        let mut i = 0;
        for &(m, _) in valid {
            while self.plan.blocks[i].end <= m {
                i += 1;
            }
            t.valid_in_block[i] += 1;
        }
        if self.has_fault(Fault::ArrivalOrderMerge) {
            return self.arrival_order_program(t);
        }
        let counts = &t.valid_in_block;
        t.program.build(self.spheres, &self.plan.blocks, |i| counts[i] > 0);
    }

    /// BUG (deliberate, [`Fault::ArrivalOrderMerge`]): the blocks are added in the order their
    /// workers finished computing, not in tree order.
    fn arrival_order_program(&self, t: &mut TreeLocal) {
        t.program.ops.clear();
        for slot in 0..self.n_workers {
            // SAFETY: written once per step before "computed", read after it.
            let k = unsafe { self.arrival_order[slot].with(|w| *w) };
            for i in self.plan.first_block[k]..self.plan.first_block[k + 1] {
                if t.valid_in_block[i] > 0 {
                    let op = if t.program.ops.is_empty() { Op::Push(i) } else { Op::AddFrom(i) };
                    t.program.ops.push(op);
                }
            }
        }
    }

    /// Gradient buffer `b` of the plan (this process holds only its own workers' buffers,
    /// from `buf_base` on).
    pub(super) fn buf(&self, b: usize) -> &B::Cell<Vec<f32>> {
        &self.bufs[b - self.buf_base]
    }

    /// Chunk `c` of `sum` = the tree over the blocks' chunks (the program must not be empty).
    pub(super) fn fold_chunk(&self, c: usize, t: &mut TreeLocal) {
        let r = self.sum.chunk_range(c);
        let (program, tmp) = (&t.program, &mut t.tmp);
        // SAFETY: chunk c of `sum` is written only by its owner in the reduce phase; the blocks
        // are final after "computed" and only read until "reduced".
        unsafe {
            self.sum.write_chunk(c, |dst| {
                program.fold(dst, tmp, |i, f| self.buf(self.plan.block_buf[i]).with(|g| f(&g[r.clone()])))
            })
        }
    }
}
