//! The fixed summation tree of `segmented`: which micro-batch gradients are added to which, and
//! in what order, as a function of the micro-batch count `S` alone.
//!
//! The gradient of a step is the sum over the dyadic tree on `0..S`: the sum over `[a, b)` is
//! the sum over `[a, m)` plus the sum over `[m, b)`, split at `m = a +` the largest power of two
//! below `b - a` ([`split`]); a leaf `[m, m + 1)` is micro-batch `m`'s gradient, or nothing if it
//! was skipped (NaN/Inf): a node with one skipped side is its other side unchanged, as if the
//! skipped leaf were an exact zero. Every float addition is then fixed by `S`, whatever the
//! thread count, so the weights are bit-identical for every `--threads`.
//!
//! How the workers evaluate it (see [`super::protocol`]):
//! - worker `k` of `N` owns the contiguous micro-batches [`worker_range`]`(S, N, k)`;
//! - it keeps a stack of tree nodes, each in its own gradient buffer, pushing each micro-batch's
//!   leaf unmerged; when its pool is empty it folds a group of entries that forms one node (a
//!   lazy binary counter, [`Counter`]: the merges of the eager one, where the top two entries
//!   are merged as soon as they are [`siblings`], done several at a time in one pass), and at
//!   the end every group: the stack ends as the worker's [`blocks`], the maximal tree nodes
//!   inside its range;
//! - after every worker's blocks are final, each chunk's owner evaluates the tree above the
//!   blocks over that chunk with a [`Program`] (postfix, in tree order), writing the sum into
//!   the chunk: each block's chunk is read once, the sum written once ([`Program::fold`]).
//!
//! The buffer bound, [`max_live_buffers`]: a worker's stack holds at most `i - 1` finished
//! blocks while it evaluates its `i`-th block `b_i`, and the counter inside a node of `n`
//! leaves holds at most `bitlen(n) = floor(log2 n) + 1` entries, so the worker needs
//! `max_i (i - 1 + bitlen(|b_i|))` buffers, and the engine the sum of that over the workers.
//! When `S / N` is a power of two every range is one block of `S / N` leaves:
//! `N * (log2(S / N) + 1)`.

use std::ops::Range;

/// The split point of tree node `[lo, hi)` (`hi - lo >= 2`): `lo +` the largest power of two
/// strictly below `hi - lo`.
pub fn split(lo: usize, hi: usize) -> usize {
    debug_assert!(hi >= lo + 2, "split of a leaf");
    lo + (1usize << (usize::BITS - 1 - (hi - lo - 1).leading_zeros()))
}

/// True when `[a, b)` is a node of the tree on `0..spheres`.
pub fn is_node(spheres: usize, a: usize, b: usize) -> bool {
    let (mut lo, mut hi) = (0, spheres);
    loop {
        if (lo, hi) == (a, b) {
            return true;
        }
        if hi - lo < 2 || a < lo || b > hi {
            return false;
        }
        let m = split(lo, hi);
        if b <= m {
            hi = m;
        } else if a >= m {
            lo = m;
        } else {
            return false;
        }
    }
}

/// True when the adjacent nodes `x` and `y` are the left and right children of one node.
pub fn siblings(spheres: usize, x: &Range<usize>, y: &Range<usize>) -> bool {
    x.end == y.start && is_node(spheres, x.start, y.end) && split(x.start, y.end) == x.end
}

/// The micro-batches worker `k` of `workers` computes: `k*S/N .. (k+1)*S/N` (empty when there
/// are more workers than micro-batches).
pub fn worker_range(spheres: usize, workers: usize, k: usize) -> Range<usize> {
    k * spheres / workers..(k + 1) * spheres / workers
}

/// Runs the binary counter over `range`: `on_push(depth)` after each leaf is pushed (the
/// stack then holds `depth` entries), and returns the final stack (the maximal tree nodes
/// inside `range`, in order).
fn counter(spheres: usize, range: Range<usize>, mut on_push: impl FnMut(usize)) -> Vec<Range<usize>> {
    let mut stack: Vec<Range<usize>> = Vec::new();
    for m in range {
        stack.push(m..m + 1);
        on_push(stack.len());
        while let [.., x, y] = &stack[..] {
            if !siblings(spheres, x, y) {
                break;
            }
            let parent = x.start..y.end;
            stack.truncate(stack.len() - 2);
            stack.push(parent);
        }
    }
    stack
}

/// The maximal tree nodes inside `range`, in order (what a worker's stack ends as).
pub fn blocks(spheres: usize, range: Range<usize>) -> Vec<Range<usize>> {
    counter(spheres, range, |_| {})
}

/// The most gradient buffers the counter over `range` holds at once (each stack entry, the leaf
/// being computed included, is one buffer).
pub fn peak_buffers(spheres: usize, range: Range<usize>) -> usize {
    let mut peak = 0;
    counter(spheres, range, |depth| peak = peak.max(depth));
    peak
}

/// The exact number of micro-batch gradient buffers `segmented` allocates for `spheres`
/// micro-batches on `workers` threads, and uses at once in a step where every micro-batch is
/// valid: the sum over the workers of `max_i (i - 1 + bitlen(|b_i|))` over each worker's
/// blocks `b_1, b_2, ...` (module doc). `N * (log2(S / N) + 1)` when `S / N` is a power of
/// two; never more than `S`. It excludes the one summed gradient every strategy keeps.
pub fn max_live_buffers(spheres: usize, workers: usize) -> usize {
    (0..workers).map(|k| peak_buffers(spheres, worker_range(spheres, workers, k))).sum()
}

/// The tree's layout for `S` micro-batches on `N` workers, fixed when the engine is built.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    /// Every worker's blocks, worker 0's first: a partition of `0..S` into tree nodes, in order.
    pub blocks: Vec<Range<usize>>,
    /// Worker `k`'s blocks are `blocks[first_block[k]..first_block[k + 1]]`.
    pub first_block: Vec<usize>,
    /// Worker `k`'s gradient buffers are `first_buf[k]..first_buf[k + 1]` (its peak).
    pub first_buf: Vec<usize>,
    /// The buffer that holds each block's sum after the compute phase: fixed, because the
    /// [`Counter`] gives out and frees buffers alike whichever micro-batches are skipped.
    pub block_buf: Vec<usize>,
}

/// One entry of a [`Counter`]'s stack: a tree node whose sum is held in one buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub node: Range<usize>,
    /// The buffer that holds the node's sum (if `present`).
    pub buf: usize,
    /// False when every leaf below was skipped: the buffer then holds nothing of use.
    pub present: bool,
    /// False for a leaf whose NaN/Inf scan is still to be taken (in the first fold that reads it).
    pub scanned: bool,
}

/// A worker's lazy binary counter over its pool of buffers: the merge schedule, shared by the
/// protocol and [`Plan`], so that both name the same buffers.
///
/// Leaves are pushed unmerged; only when the pool is empty, before the next leaf, is a group
/// folded (the entries that together form one tree node, the logical counter's top entries),
/// and at the end of the range every group is: each fold reads its entries once and writes
/// one buffer, so delaying merges folds more leaves per pass. A fold's result goes into its
/// group's last entry's buffer, always a leaf's (the leaf that completed the node), and frees
/// the others. The schedule depends on the pushes alone, never on which leaves are valid, so
/// which buffer holds what is fixed by (S, N).
///
/// Why a pool of [`peak_buffers`] is enough: before a leaf is pushed the logical (eager)
/// counter holds at most `peak - 1` nodes, so a full pool of `peak` entries has a group of at
/// least two entries to fold, which frees a buffer.
#[derive(Clone, Debug, Default)]
pub struct Counter {
    pub stack: Vec<Entry>,
    free: Vec<usize>,
    /// The groups of `stack`: (first entry, node) of each, left to right (scratch).
    groups: Vec<(usize, Range<usize>)>,
}

impl Counter {
    pub fn with_capacity(n: usize) -> Self {
        Counter { stack: Vec::with_capacity(n), free: Vec::with_capacity(n), groups: Vec::with_capacity(n) }
    }

    /// Starts a step over the pool `bufs` (handed out lowest first).
    pub fn reset(&mut self, bufs: Range<usize>) {
        self.stack.clear();
        self.free.clear();
        self.free.extend(bufs.rev());
    }

    /// The buffer the next leaf is computed into (None once the pool is exhausted: call
    /// [`Counter::next_fold`] first, which a pool of [`peak_buffers`] makes enough).
    pub fn next_buffer(&self) -> Option<usize> {
        self.free.last().copied()
    }

    /// Pushes leaf `m` in [`Counter::next_buffer`] (returned; None if the pool is empty).
    pub fn push(&mut self, m: usize, present: bool, scanned: bool) -> Option<usize> {
        let buf = self.free.pop()?;
        self.stack.push(Entry { node: m..m + 1, buf, present, scanned });
        Some(buf)
    }

    /// The next fold: the entries `stack[r]` that form one tree node, to be summed into the
    /// last one's buffer. Before a leaf (`end` false) only when the pool is empty, the group
    /// with the most entries (the leftmost of those); at the end of the range (`end`) each
    /// group of two or more entries, left to right. None when nothing is to be folded.
    pub fn next_fold(&mut self, spheres: usize, end: bool) -> Option<Range<usize>> {
        if !end && !self.free.is_empty() {
            return None;
        }
        self.groups.clear();
        for (i, e) in self.stack.iter().enumerate() {
            self.groups.push((i, e.node.clone()));
            while let [.., (_, x), (_, y)] = &self.groups[..] {
                if !siblings(spheres, x, y) {
                    break;
                }
                let node = x.start..y.end;
                self.groups.pop();
                if let Some(g) = self.groups.last_mut() {
                    g.1 = node;
                }
            }
        }
        let n = self.stack.len();
        let ranges = (0..self.groups.len())
            .map(|g| self.groups[g].0..self.groups.get(g + 1).map_or(n, |x| x.0))
            .filter(|r| r.len() >= 2);
        if end {
            ranges.min_by_key(|r| r.start)
        } else {
            ranges.rev().max_by_key(|r| r.len())
        }
    }

    /// Replaces `stack[r]` by their parent node, in the last one's buffer; frees the others.
    pub fn collapse(&mut self, r: Range<usize>, present: bool) {
        let node = self.stack[r.start].node.start..self.stack[r.end - 1].node.end;
        let buf = self.stack[r.end - 1].buf;
        for e in self.stack.drain(r.start..r.end - 1) {
            self.free.push(e.buf);
        }
        self.stack[r.start] = Entry { node, buf, present, scanned: true };
    }
}

impl Plan {
    pub fn new(spheres: usize, workers: usize) -> Self {
        let mut plan = Plan { first_block: vec![0], first_buf: vec![0], ..Plan::default() };
        let mut counter = Counter::default();
        for k in 0..workers {
            let r = worker_range(spheres, workers, k);
            plan.first_buf.push(plan.first_buf[k] + peak_buffers(spheres, r.clone()));
            counter.reset(plan.first_buf[k]..plan.first_buf[k + 1]);
            for m in r {
                while let Some(g) = counter.next_fold(spheres, false) {
                    counter.collapse(g, true);
                }
                counter.push(m, true, true).expect("a pool of the counter's peak (the Counter's doc)");
            }
            while let Some(g) = counter.next_fold(spheres, true) {
                counter.collapse(g, true);
            }
            plan.blocks.extend(counter.stack.iter().map(|e| e.node.clone()));
            plan.block_buf.extend(counter.stack.iter().map(|e| e.buf));
            plan.first_block.push(plan.blocks.len());
        }
        plan
    }

    /// The number of gradient buffers: [`max_live_buffers`].
    pub fn buffers(&self) -> usize {
        self.first_buf.last().copied().unwrap_or(0)
    }
}

/// One instruction of a [`Program`], over the blocks' values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Push block `i`'s value.
    Push(usize),
    /// Add block `i`'s value into the top of the stack.
    AddFrom(usize),
    /// Pop the top and add it into the new top.
    Add,
}

/// The tree above a set of blocks, as a postfix program in tree order (reused every step).
#[derive(Clone, Debug, Default)]
pub struct Program {
    pub ops: Vec<Op>,
}

impl Program {
    /// Rebuilds the program for the tree on `0..spheres` over `blocks` (a partition of it into
    /// tree nodes, in order); blocks for which `present` is false (every leaf skipped) are left
    /// out, the other side of their parent standing for the parent. Empty if none is present.
    pub fn build(&mut self, spheres: usize, blocks: &[Range<usize>], present: impl Fn(usize) -> bool) {
        self.ops.clear();
        if spheres > 0 {
            self.emit(0..spheres, blocks, &present);
        }
    }

    /// As [`Program::build`], for the subtree of tree node `node` over `blocks` (a partition of
    /// it into tree nodes, in order).
    pub fn build_node(&mut self, node: Range<usize>, blocks: &[Range<usize>], present: impl Fn(usize) -> bool) {
        self.ops.clear();
        if !node.is_empty() {
            self.emit(node, blocks, &present);
        }
    }

    /// Emits node `node`'s program; returns whether it emitted anything.
    fn emit(&mut self, node: Range<usize>, blocks: &[Range<usize>], present: &impl Fn(usize) -> bool) -> bool {
        if let Ok(i) = blocks.binary_search_by_key(&node.start, |b| b.start) {
            if blocks[i] == node {
                if present(i) {
                    self.ops.push(Op::Push(i));
                }
                return present(i);
            }
        }
        let m = split(node.start, node.end);
        let left = self.emit(node.start..m, blocks, present);
        let at = self.ops.len();
        let right = self.emit(m..node.end, blocks, present);
        if left && right {
            match self.ops[at..] {
                [Op::Push(i)] => self.ops[at] = Op::AddFrom(i),
                _ => self.ops.push(Op::Add),
            }
        }
        left || right
    }

    /// The stack depth the program needs.
    pub fn depth(&self) -> usize {
        let (mut d, mut peak) = (0usize, 0usize);
        for op in &self.ops {
            match op {
                Op::Push(_) => d += 1,
                Op::Add => d -= 1,
                Op::AddFrom(_) => {}
            }
            peak = peak.max(d);
        }
        peak
    }

    /// `dst =` the program's value, element by element, where `src(i, f)` calls `f` with block
    /// `i`'s values (each as long as `dst`). The ops run one at a time over the whole slice, on
    /// a stack whose level 0 is `dst` itself and levels 1.. live in `tmp` (grown to
    /// `(depth() - 1) * dst.len()` if shorter): each block is read once, `dst` written once,
    /// and each element's additions are the program's, in its order. The program must not be
    /// empty.
    pub fn fold(&self, dst: &mut [f32], tmp: &mut Vec<f32>, mut src: impl FnMut(usize, &mut dyn FnMut(&[f32]))) {
        self.fold_into(dst, tmp, |i, lv, plus| src(i, &mut |s| if plus { add(lv, s) } else { lv.copy_from_slice(s) }))
    }

    /// As [`Program::fold`], where `put(i, level, plus)` itself writes block `i`'s values into
    /// `level`: added to it (`plus`, with [`add`]'s additions) or copied (so a caller can do
    /// more in the same pass over the block, such as taking its scan).
    pub fn fold_into(&self, dst: &mut [f32], tmp: &mut Vec<f32>, mut put: impl FnMut(usize, &mut [f32], bool)) {
        let len = dst.len();
        let need = self.depth().saturating_sub(1) * len;
        if tmp.len() < need {
            tmp.resize(need, 0.0);
        }
        let mut d = 0usize;
        for op in &self.ops {
            match *op {
                Op::Push(i) => {
                    let lv = if d == 0 { &mut *dst } else { &mut tmp[(d - 1) * len..d * len] };
                    put(i, lv, false);
                    d += 1;
                }
                Op::AddFrom(i) => {
                    let lv = if d == 1 { &mut *dst } else { &mut tmp[(d - 2) * len..(d - 1) * len] };
                    put(i, lv, true);
                }
                Op::Add => {
                    d -= 1;
                    if d == 1 {
                        add(dst, &tmp[..len]);
                    } else {
                        let (lo, hi) = tmp.split_at_mut((d - 1) * len);
                        add(&mut lo[(d - 2) * len..], &hi[..len]);
                    }
                }
            }
        }
    }
}

crate::simd::multiversion! {
    /// `dst += src`, element by element (the tree's one addition).
    pub fn add(dst: &mut [f32], src: &[f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d += *s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bitlen(n: usize) -> usize {
        (usize::BITS - n.leading_zeros()) as usize
    }

    /// The bound by the module doc's formula, from the blocks.
    fn formula(spheres: usize, workers: usize) -> usize {
        (0..workers)
            .map(|k| {
                let bs = blocks(spheres, worker_range(spheres, workers, k));
                bs.iter().enumerate().map(|(i, b)| i + bitlen(b.len())).max().unwrap_or(0)
            })
            .sum()
    }

    #[test]
    fn split_is_at_the_largest_power_of_two_below_the_length() {
        assert_eq!(split(0, 2), 1);
        assert_eq!(split(0, 3), 2);
        assert_eq!(split(0, 4), 2);
        assert_eq!(split(0, 5), 4);
        assert_eq!(split(0, 8), 4);
        assert_eq!(split(8, 13), 12);
        assert_eq!(split(0, 32), 16);
    }

    #[test]
    fn worker_ranges_partition_the_micro_batches_in_order() {
        for s in 1..40 {
            for n in 1..20 {
                let mut next = 0;
                for k in 0..n {
                    let r = worker_range(s, n, k);
                    assert_eq!(r.start, next);
                    next = r.end;
                }
                assert_eq!(next, s);
            }
        }
    }

    #[test]
    fn blocks_are_the_maximal_tree_nodes_of_a_range() {
        assert_eq!(blocks(3, 1..3), vec![1..2, 2..3]);
        assert_eq!(blocks(8, 0..8), vec![0..8]);
        assert_eq!(blocks(8, 2..5), vec![2..4, 4..5]);
        assert_eq!(blocks(8, 5..8), vec![5..6, 6..8]);
        for s in 1..33 {
            for n in 1..9 {
                for k in 0..n {
                    let r = worker_range(s, n, k);
                    let bs = blocks(s, r.clone());
                    assert_eq!(bs.iter().map(|b| b.len()).sum::<usize>(), r.len());
                    for b in &bs {
                        assert!(is_node(s, b.start, b.end), "{b:?} of S={s}");
                    }
                    for w in bs.windows(2) {
                        assert!(!siblings(s, &w[0], &w[1]), "{w:?} could still merge");
                    }
                }
            }
        }
    }

    #[test]
    fn buffer_bound_matches_the_issue_for_aligned_ranges() {
        assert_eq!(max_live_buffers(32, 2), 10);
        assert_eq!(max_live_buffers(8, 2), 6);
        assert_eq!(max_live_buffers(8, 1), 4);
        assert_eq!(max_live_buffers(32, 4), 16);
        assert_eq!(max_live_buffers(8, 8), 8);
        for (s, n) in [(4usize, 1usize), (16, 2), (32, 8), (64, 4)] {
            assert_eq!(max_live_buffers(s, n), n * ((s / n).trailing_zeros() as usize + 1), "S={s} N={n}");
        }
    }

    #[test]
    fn buffer_bound_for_unaligned_ranges_follows_the_formula() {
        // 3 and 5 workers: ranges that do not align with the tree.
        assert_eq!(max_live_buffers(8, 3), 2 + 2 + 3);
        assert_eq!(max_live_buffers(8, 5), 1 + 2 + 1 + 2 + 2);
        assert_eq!(max_live_buffers(32, 3), formula(32, 3));
        for s in 1..65 {
            for n in 1..17 {
                let b = max_live_buffers(s, n);
                assert_eq!(b, formula(s, n), "S={s} N={n}");
                assert!(b <= s, "S={s} N={n}: {b} buffers");
                let plan = Plan::new(s, n);
                assert_eq!(plan.buffers(), b);
                let want: Vec<Range<usize>> = (0..n).flat_map(|k| blocks(s, worker_range(s, n, k))).collect();
                assert_eq!(plan.blocks, want, "S={s} N={n}");
                for k in 0..n {
                    for &buf in &plan.block_buf[plan.first_block[k]..plan.first_block[k + 1]] {
                        assert!((plan.first_buf[k]..plan.first_buf[k + 1]).contains(&buf), "worker {k}'s own");
                    }
                }
            }
        }
    }

    #[test]
    fn lazy_counter_fits_its_pool_folds_nodes_into_a_leafs_buffer_and_ends_as_the_blocks() {
        for s in 1..65 {
            for n in 1..17 {
                let plan = Plan::new(s, n);
                for k in 0..n {
                    let r = worker_range(s, n, k);
                    let pool = plan.first_buf[k]..plan.first_buf[k + 1];
                    let mut c = Counter::with_capacity(pool.len());
                    c.reset(pool.clone());
                    let (mut used, mut folds) = (0, 0);
                    let mut fold = |c: &mut Counter, g: Range<usize>| {
                        let node = c.stack[g.start].node.start..c.stack[g.end - 1].node.end;
                        assert!(is_node(s, node.start, node.end), "S={s} N={n}: fold over {node:?}");
                        assert_eq!(c.stack[g.end - 1].node.len(), 1, "S={s} N={n}: a fold ends in a leaf");
                        c.collapse(g, true);
                        folds += 1;
                    };
                    for m in r.clone() {
                        while let Some(g) = c.next_fold(s, false) {
                            fold(&mut c, g);
                        }
                        assert!(c.push(m, true, true).is_some(), "S={s} N={n} k={k}: pool exhausted at {m}");
                        used = used.max(c.stack.len());
                    }
                    while let Some(g) = c.next_fold(s, true) {
                        fold(&mut c, g);
                    }
                    assert_eq!(used, pool.len(), "S={s} N={n} k={k}: the whole pool is used");
                    let nodes: Vec<Range<usize>> = c.stack.iter().map(|e| e.node.clone()).collect();
                    assert_eq!(nodes, blocks(s, r.clone()), "S={s} N={n} k={k}");
                    assert!(folds <= r.len().saturating_sub(1));
                }
            }
        }
    }

    #[test]
    fn lazy_counter_folds_a_full_pool_of_four_in_one_pass() {
        // S = 8 on one worker: a pool of 4; leaves 0..4 fill it, [0, 4) is folded in one pass
        // into leaf 3's buffer, then [4, 6) to make room for leaf 7, then [0, 8) at the end.
        let mut c = Counter::with_capacity(4);
        c.reset(0..4);
        let mut log = Vec::new();
        for m in 0..8 {
            while let Some(g) = c.next_fold(8, false) {
                log.push((c.stack[g.start].node.start, c.stack[g.end - 1].node.end, g.len()));
                c.collapse(g, true);
            }
            c.push(m, true, false);
        }
        while let Some(g) = c.next_fold(8, true) {
            log.push((c.stack[g.start].node.start, c.stack[g.end - 1].node.end, g.len()));
            c.collapse(g, true);
        }
        assert_eq!(log, vec![(0, 4, 4), (4, 6, 2), (0, 8, 4)]);
        assert_eq!(c.stack, vec![Entry { node: 0..8, buf: 2, present: true, scanned: true }]);
    }

    /// The serial recursive evaluation the program must reproduce.
    fn tree_sum(node: Range<usize>, leaf: &impl Fn(usize) -> Option<f32>) -> Option<f32> {
        if node.len() == 1 {
            return leaf(node.start);
        }
        let m = split(node.start, node.end);
        match (tree_sum(node.start..m, leaf), tree_sum(m..node.end, leaf)) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        }
    }

    #[test]
    fn program_over_blocks_adds_in_tree_order_and_drops_absent_blocks() {
        // Values whose sum depends on the association order: 2^24 + 1 + 1.
        let leaf =
            |m: usize| if m % 5 == 3 { None } else { Some(if m == 0 { 16_777_216.0f32 } else { 1.0 + m as f32 }) };
        let mut prog = Program::default();
        let mut tmp = Vec::new();
        for s in 1..20 {
            for n in 1..7 {
                let bs: Vec<Range<usize>> = (0..n).flat_map(|k| blocks(s, worker_range(s, n, k))).collect();
                let vals: Vec<Option<f32>> = bs.iter().map(|b| tree_sum(b.clone(), &leaf)).collect();
                prog.build(s, &bs, |i| vals[i].is_some());
                let want = tree_sum(0..s, &leaf);
                if want.is_none() {
                    assert!(prog.ops.is_empty());
                    continue;
                }
                let len = 37;
                let cols: Vec<Vec<f32>> = vals.iter().map(|v| vec![v.unwrap_or(f32::NAN); len]).collect();
                let mut dst = vec![0.0; len];
                prog.fold(&mut dst, &mut tmp, |i, f| f(&cols[i]));
                let w = want.unwrap_or(0.0);
                assert!(dst.iter().all(|x| x.to_bits() == w.to_bits()), "S={s} N={n}: {} vs {w}", dst[0]);
            }
        }
    }

    #[test]
    fn program_uses_add_from_for_single_block_right_sides() {
        let mut prog = Program::default();
        prog.build(4, &[0..1, 1..2, 2..4], |_| true);
        assert_eq!(prog.ops, vec![Op::Push(0), Op::AddFrom(1), Op::AddFrom(2)]);
        prog.build(4, &[0..1, 1..2, 2..3, 3..4], |_| true);
        assert_eq!(prog.ops, vec![Op::Push(0), Op::AddFrom(1), Op::Push(2), Op::AddFrom(3), Op::Add]);
        assert_eq!(prog.depth(), 2);
        prog.build(4, &[0..1, 1..2, 2..4], |i| i != 1);
        assert_eq!(prog.ops, vec![Op::Push(0), Op::AddFrom(2)]);
    }
}
