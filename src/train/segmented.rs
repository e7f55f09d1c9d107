//! The phases of `segmented`: the summation tree ([`super::tree`]) evaluated by the workers.
//!
//! Compute: worker `k` computes its contiguous micro-batches in order, each into the next free
//! buffer of its own pool (buffers `plan.first_buf[k]..plan.first_buf[k + 1]`), and pushes the
//! leaf on its lazy [`tree::Counter`] unmerged. When the pool is empty, before the next leaf,
//! the counter names a group of entries that forms one tree node; [`Shared`]'s `fold_group`
//! sums it tile by tile in tree order ([`Program`] over the entries), reading each buffer once
//! and writing the group's last one (a leaf's), and takes the NaN/Inf scan of every leaf it
//! reads on the way (the same bits as a scan of its own: [`grad::SqnormAcc`]). At the end of
//! the range every group is folded and a leaf no fold read is scanned in place, so each
//! micro-batch is validated alone before its result is published and its sum used.
//!
//! A fold can only find a leaf invalid after it has overwritten the destination leaf: it then
//! recomputes that one leaf (a micro-batch's gradient is a function of the step and its index)
//! and folds the group again without the invalid leaves, which it only read. This costs a
//! forward and backward in a step with a NaN/Inf micro-batch, never otherwise. Per-sphere
//! clipping scales a leaf by a factor of its own norm before it is added, so there each leaf
//! is scanned (and scaled) right after it is computed and a fold never finds one invalid.
//!
//! A skipped micro-batch keeps its buffer but is marked absent, and a fold leaves it out (the
//! other side's sum stands for the parent); so the buffers a worker uses, and the one holding
//! each block's sum at the end (`plan.block_buf`), never depend on which micro-batches are
//! valid.
//!
//! Reduce (after "computed"): every worker builds the same [`Program`] from the results (a
//! block is present when one of its micro-batches is valid), and each chunk's owner folds the
//! blocks' chunks into that chunk of `sum`, in tree order.
//!
//! Why it holds:
//! - every leaf is merged exactly once: the counter pushes each micro-batch of the range once
//!   and a fold turns a group of entries into one, so the blocks partition the range
//!   (unit-tested in [`super::tree`]), and the program names every present block once;
//! - no buffer is reused while it is read: within a worker, a buffer is freed only after the
//!   fold that read it returned, and the next leaf is computed after that; the reduction reads
//!   the blocks only between "computed" and "reduced", and the next write to any buffer comes
//!   after the next "start";
//! - the top combine starts only after "computed", when every worker's blocks are final;
//! - a worker never needs more buffers than it has: its pool is the eager counter's peak over
//!   its range ([`super::tree::peak_buffers`]), and the lazy counter folds before it would run
//!   out (the [`tree::Counter`] doc says why that is always possible).

use super::engine::Local;
use super::fault::Fault;
use super::protocol::{Control, Shared, SlotResult};
use super::strategy::ClipMode;
use super::timing::{Clock, WorkerTiming};
use super::tree::{self, Op, Program};
use super::workload::Workload;
use crate::grad::{self, SqnormAcc};
use crate::sync::{AtomicUsizeApi, Backend, CellApi};
use std::ops::Range;
use std::sync::atomic::Ordering;

/// Floats per tile of a fold (16 KiB: stays in L1 beside the streamed buffers).
const FOLD_TILE: usize = 4096;

/// `dst += src` (the tree's addition) or `dst = src`.
fn put(dst: &mut [f32], src: &[f32], plus: bool) {
    if plus {
        tree::add(dst, src)
    } else {
        dst.copy_from_slice(src)
    }
}

/// A worker's state for the tree, allocated once.
#[derive(Debug, Default)]
pub(super) struct TreeLocal {
    counter: tree::Counter,
    /// This step's results of the worker's micro-batches, from its range's start; published
    /// once every one is scanned.
    pending: Vec<SlotResult>,
    /// The fold under way: its entries' nodes, its program, the scans it takes on the way, a
    /// copy of the destination's own tile (read before it is written), and its levels.
    group: Vec<Range<usize>>,
    group_program: Program,
    accs: Vec<Option<SqnormAcc>>,
    own: Vec<f32>,
    levels: Vec<f32>,
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
            pending: Vec::with_capacity(spheres),
            group: Vec::with_capacity(own),
            accs: Vec::with_capacity(own),
            own: vec![0.0; FOLD_TILE],
            levels: vec![0.0; own.saturating_sub(1) * FOLD_TILE],
            valid_in_block: Vec::with_capacity(plan.blocks.len()),
            tmp: vec![0.0; levels * chunk],
            program,
            group_program: Program::default(),
        }
    }
}

impl<B: Backend, W: Workload> Shared<B, W> {
    /// Phase 1 under segmented: worker k's micro-batches, evaluated into its blocks.
    pub(super) fn compute_tree(&self, k: usize, ctl: &Control, local: &mut Local<W>, tm: &mut WorkerTiming) {
        let Local { tree: t, scratch, .. } = local;
        let g = self.first_worker + k;
        let range = tree::worker_range(self.spheres, self.global_workers, g);
        t.counter.reset(self.plan.first_buf[g]..self.plan.first_buf[g + 1]);
        t.pending.clear();
        // Per-sphere clipping needs a leaf's norm before the leaf is added anywhere.
        let scan_now = self.clip_mode == ClipMode::PerSphere && self.clip_norm > 0.0;
        for m in range.clone() {
            while let Some(r) = t.counter.next_fold(self.spheres, false) {
                self.fold_group(t, r, range.start, ctl, scratch, tm);
            }
            let b = t.counter.next_buffer().expect("a worker's pool holds its counter's peak (tree::Counter)");
            // SAFETY: buffer b belongs to worker k, which alone writes its buffers, in the
            // compute phase; the others read them only between "computed" and "reduced".
            let res = unsafe {
                self.buf(b).with_mut(|g| {
                    if scan_now {
                        let res = self.compute_one(m, ctl, scratch, g);
                        if res.valid() && res.factor != 1.0 {
                            grad::scale(g, res.factor);
                        }
                        res
                    } else {
                        self.compute_unscanned(m, ctl, scratch, g)
                    }
                })
            };
            // A panicked micro-batch is known absent; the others are present until a scan
            // says otherwise.
            let (present, scanned) =
                if scan_now { (res.valid(), true) } else { (res.panic.is_none(), res.panic.is_some()) };
            t.counter.push(m, present, scanned);
            t.pending.push(res);
            tm.micro_batches += 1;
        }
        while let Some(r) = t.counter.next_fold(self.spheres, true) {
            self.fold_group(t, r, range.start, ctl, scratch, tm);
        }
        let clock = Clock::<B>::start();
        for e in t.counter.stack.iter_mut().filter(|e| !e.scanned) {
            // SAFETY: as above; a leaf no fold read, still this worker's, in the compute phase.
            let scan = unsafe { self.buf(e.buf).with(|g| grad::scan(g)) };
            let res = &mut t.pending[e.node.start - range.start];
            self.set_scan(res, scan);
            (e.present, e.scanned) = (res.valid(), true);
        }
        tm.merge += clock.elapsed();
        for (i, res) in t.pending.drain(..).enumerate() {
            self.publish_result(range.start + i, res);
        }
        if self.has_fault(Fault::ArrivalOrderMerge) {
            let slot = self.arrived.fetch_add(1, Ordering::Relaxed);
            // SAFETY: slot `slot` is drawn once per step from the counter; read after "computed".
            unsafe { self.arrival_order[slot].with_mut(|w| *w = k) };
        }
    }

    /// Folds the counter's entries `r` (one tree node) into the last one's buffer and collapses
    /// them, taking the scans of the leaves not scanned yet (results `pending`, from `base`).
    /// If one of those is invalid, recomputes the destination leaf (its values were overwritten)
    /// and folds again without the invalid ones.
    fn fold_group(
        &self,
        t: &mut TreeLocal,
        r: Range<usize>,
        base: usize,
        ctl: &Control,
        scratch: &mut Option<W::Scratch>,
        tm: &mut WorkerTiming,
    ) {
        let clock = Clock::<B>::start();
        let entries = &mut t.counter.stack[r.clone()];
        let last = entries.len() - 1;
        let (dst, dst_leaf) = (entries[last].buf, entries[last].node.start);
        t.group.clear();
        t.group.extend(entries.iter().map(|e| e.node.clone()));
        t.accs.clear();
        t.accs.extend(entries.iter().map(|e| (!e.scanned).then(SqnormAcc::default)));
        let node = t.group[0].start..t.group[last].end;
        t.group_program.build_node(node.clone(), &t.group, |i| entries[i].present);
        let dst_present = entries[last].present;
        let mut fresh_invalid = false;
        if !t.group_program.ops.is_empty() {
            self.fold_tiles(entries, &t.group_program, &mut t.accs, &mut t.own, &mut t.levels);
            for (i, acc) in t.accs.iter().enumerate() {
                let Some(acc) = acc else { continue };
                let (sq, e) = (acc.finish(), &mut entries[i]);
                let res = &mut t.pending[e.node.start - base];
                if i == last && !sq.is_finite() {
                    // Its bad entries are located once it is recomputed, below.
                    res.scan = grad::Scan { sqnorm: sq, bad: 1, ..grad::Scan::default() };
                } else {
                    // SAFETY: an entry other than the last was only read by the fold.
                    let scan = unsafe { self.buf(e.buf).with(|g| grad::scan_with(sq, g)) };
                    self.set_scan(res, scan);
                }
                e.scanned = true;
                e.present = res.valid();
                fresh_invalid |= !e.present;
            }
        }
        tm.merge += clock.elapsed();
        if fresh_invalid {
            if dst_present {
                // SAFETY: the destination is this worker's buffer, in the compute phase.
                let res = unsafe { self.buf(dst).with_mut(|g| self.compute_unscanned(dst_leaf, ctl, scratch, g)) };
                let scan = unsafe { self.buf(dst).with(|g| grad::scan(g)) };
                let slot = &mut t.pending[dst_leaf - base];
                slot.loss = res.loss;
                self.set_scan(slot, scan);
                entries[last].present = slot.valid();
            }
            let clock = Clock::<B>::start();
            t.group_program.build_node(node, &t.group, |i| entries[i].present);
            if !t.group_program.ops.is_empty() {
                t.accs.iter_mut().for_each(|a| *a = None);
                self.fold_tiles(entries, &t.group_program, &mut t.accs, &mut t.own, &mut t.levels);
            }
            tm.merge += clock.elapsed();
        }
        let present = entries.iter().any(|e| e.present);
        t.counter.collapse(r, present);
    }

    /// The group `entries`' sum by `program` into the last entry's buffer, tile by tile, each
    /// entry's tile read once (the last one's copied to `own` first) and fed to its scan in
    /// `accs` if it has one.
    fn fold_tiles(
        &self,
        entries: &[tree::Entry],
        program: &Program,
        accs: &mut [Option<SqnormAcc>],
        own: &mut [f32],
        levels: &mut Vec<f32>,
    ) {
        let last = entries.len() - 1;
        let dst = entries[last].buf;
        let p = self.workload.num_params();
        for start in (0..p).step_by(own.len()) {
            let r = start..(start + own.len()).min(p);
            let own = &mut own[..r.len()];
            // SAFETY: the group's buffers are this worker's, distinct (one per stack entry), and
            // written only by it in the compute phase; the destination's tile is copied out
            // before it is written, and every other cell is only read.
            unsafe {
                self.buf(dst).with(|g| match &mut accs[last] {
                    Some(a) => a.put(own, &g[r.clone()], false),
                    None => own.copy_from_slice(&g[r.clone()]),
                });
                self.buf(dst).with_mut(|d| {
                    program.fold_into(&mut d[r.clone()], levels, |i, lv, plus| {
                        if i == last {
                            return put(lv, own, plus);
                        }
                        self.buf(entries[i].buf).with(|g| match &mut accs[i] {
                            Some(a) => a.put(lv, &g[r.clone()], plus),
                            None => put(lv, &g[r.clone()], plus),
                        })
                    })
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
