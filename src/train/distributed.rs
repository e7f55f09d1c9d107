//! The reduce phase of a distributed step ([`crate::dist`]), between "computed" and
//! "reduced": each rank's coordinator (worker 0, the only thread that calls MPI) exchanges
//! with the other ranks, and all of the rank's workers fold the chunks it owns.
//!
//! 1. Results: every rank all-gathers the results (loss, scan, clip factor) of the
//!    micro-batches it computed, so every rank holds all S results and derives the same valid
//!    set, the same [`tree::Program`] and the same skip decision.
//! 2. Gradients: chunk `c` of the sum is owned by one rank ([`owned_chunks`], contiguous).
//!    One `alltoallv` sends every rank's present blocks' slices of each chunk to its owner
//!    (rank order, then owned chunk order, then block order); the owner folds them, and its
//!    own blocks' slices read in place, into that chunk of `sum` with the program, in tree
//!    order: the additions of a single process. After the inner barrier "sent", the rank's
//!    workers fold every N-th owned chunk each, and take its squared norm.
//! 3. After the inner barrier "folded", an `allgatherv` of the owned ranges gives every rank
//!    the whole sum, and an all-gather of the owned chunks' norms (f64 bits) all of them;
//!    every rank then adds the norms in chunk order, as the local reduction does.
//!
//! Every rank calls the same collectives in the same order (the valid set decides whether
//! steps 2 and 3 run, and it is the same everywhere), so none waits for a call that never comes.

use super::barrier::Poisoned;
use super::engine::Local;
use super::protocol::{Shared, SlotResult};
use super::timing::{Clock, WorkerTiming};
use super::tree::{self, Plan};
use super::workload::Workload;
use crate::dist::{owned_chunks, Comm};
use crate::grad::{self, MAX_BAD};
use crate::sync::{Backend, CellApi};
use std::ops::Range;
use std::sync::Arc;

/// u64 words per micro-batch result: flags, loss, factor, squared norm, bad count, and the
/// first bad entries as (index, value).
const RECORD: usize = 5 + 2 * MAX_BAD;

/// A rank's side of the exchange.
pub(crate) struct Dist<B: Backend> {
    pub comm: Arc<dyn Comm>,
    rank: usize,
    ranks: usize,
    /// The rank that computes each micro-batch, and that holds each block of the plan.
    micro_rank: Vec<usize>,
    block_rank: Vec<usize>,
    /// This rank's micro-batches.
    mine: Range<usize>,
    /// The coordinator's buffers; the workers read the received blocks from them.
    scratch: B::Cell<Scratch>,
}

/// The coordinator's buffers, grown on the first steps and reused.
#[derive(Default)]
struct Scratch {
    records: Vec<u64>,
    gathered: Vec<u64>,
    send: Vec<f32>,
    recv: Vec<f32>,
    send_counts: Vec<usize>,
    recv_counts: Vec<usize>,
    /// Where the floats from each rank start in `recv`.
    recv_at: Vec<usize>,
    /// How many present blocks each rank holds, and each block's place among its rank's.
    present: Vec<usize>,
    slot: Vec<usize>,
    /// This rank's owned range of the sum, as sent to the allgatherv, and every rank's length.
    mine: Vec<f32>,
    gather_counts: Vec<usize>,
}

impl<B: Backend> Dist<B> {
    /// The exchange of rank `comm.rank()` of `comm.size()`, each running `threads` workers of
    /// `plan` over `spheres` micro-batches.
    pub fn new(comm: Arc<dyn Comm>, threads: usize, plan: &Plan, spheres: usize) -> Self {
        let (rank, ranks) = (comm.rank(), comm.size());
        let workers = ranks * threads;
        let mut micro_rank = vec![0; spheres];
        let mut block_rank = vec![0; plan.blocks.len()];
        for g in 0..workers {
            for m in tree::worker_range(spheres, workers, g) {
                micro_rank[m] = g / threads;
            }
            if let (Some(&lo), Some(&hi)) = (plan.first_block.get(g), plan.first_block.get(g + 1)) {
                block_rank[lo..hi].iter_mut().for_each(|r| *r = g / threads);
            }
        }
        let lo = tree::worker_range(spheres, workers, rank * threads).start;
        let hi = tree::worker_range(spheres, workers, rank * threads + threads - 1).end;
        Dist { comm, rank, ranks, micro_rank, block_rank, mine: lo..hi, scratch: B::Cell::new(Scratch::default()) }
    }
}

/// Writes `r` as a record.
fn encode(r: &SlotResult, out: &mut [u64]) {
    out[0] = u64::from(r.panic.is_some());
    out[1] = u64::from(r.loss.to_bits());
    out[2] = u64::from(r.factor.to_bits());
    out[3] = r.scan.sqnorm.to_bits();
    out[4] = r.scan.bad as u64;
    for (i, &(at, v)) in r.scan.first_bad.iter().enumerate() {
        out[5 + 2 * i] = at as u64;
        out[6 + 2 * i] = u64::from(v.to_bits());
    }
}

/// Reads the record of a micro-batch computed by rank `q` into `r`.
fn decode(rec: &[u64], q: usize, r: &mut SlotResult) {
    r.panic = (rec[0] != 0).then(|| format!("(on rank {q}, which reports it)"));
    r.loss = f32::from_bits(rec[1] as u32);
    r.factor = f32::from_bits(rec[2] as u32);
    r.scan.sqnorm = f64::from_bits(rec[3]);
    r.scan.bad = rec[4] as usize;
    for (i, e) in r.scan.first_bad.iter_mut().enumerate() {
        *e = (rec[5 + 2 * i] as usize, f32::from_bits(rec[6 + 2 * i] as u32));
    }
}

impl<B: Backend, W: Workload> Shared<B, W> {
    /// The floats of `sum` that rank `q` owns.
    fn owned_floats(&self, ranks: usize, q: usize) -> Range<usize> {
        let c = owned_chunks(self.sum.num_chunks(), ranks, q);
        if c.is_empty() {
            return 0..0;
        }
        self.sum.chunk_range(c.start).start..self.sum.chunk_range(c.end - 1).end
    }

    /// Worker k's part of the distributed reduce phase (module doc), from "computed" to
    /// "reduced"; returns whether the step updates. Two inner barriers: "sent" (the owned
    /// chunks' blocks have arrived) and "folded" (every owned chunk is summed).
    pub(super) fn reduce_distributed(
        &self,
        d: &Dist<B>,
        k: usize,
        local: &mut Local<W>,
        tm: &mut WorkerTiming,
    ) -> Result<(), Poisoned> {
        let mut clock = Clock::<B>::start();
        if k == 0 {
            // SAFETY: the scratch is written by worker 0 alone between "computed" and "sent"
            // and between "folded" and "reduced", and read by the workers between "sent" and
            // "folded".
            unsafe { d.scratch.with_mut(|s| self.exchange_send(d, s, local, tm)) };
            tm.exchange += clock.lap();
        }
        self.phase_wait(tm)?; // "sent": every result and every remote block is here
        let (_, apply) = self.collect_valid(&mut local.valid);
        if apply {
            if k != 0 {
                self.build_program(&mut local.tree, &local.valid);
            }
            // SAFETY: read-only between "sent" and "folded" (above).
            unsafe { d.scratch.with(|s| self.fold_owned(d, s, k, local)) };
        }
        tm.reduce += clock.lap();
        self.phase_wait(tm)?; // "folded"
        clock.lap();
        if k == 0 && apply {
            // SAFETY: as above.
            unsafe { d.scratch.with_mut(|s| self.exchange_gather(d, s, tm)) };
            tm.exchange += clock.lap();
        }
        Ok(())
    }

    /// Worker 0, before "sent": step 1 and the `alltoallv` of step 2.
    fn exchange_send(&self, d: &Dist<B>, s: &mut Scratch, local: &mut Local<W>, tm: &mut WorkerTiming) {
        let (spheres, ranks, comm) = (self.spheres, d.ranks, &*d.comm);
        s.records.clear();
        s.records.resize(spheres * RECORD, 0);
        for m in d.mine.clone() {
            // SAFETY: this rank's results were written in the compute phase, before "computed".
            unsafe { self.results[m].with(|r| encode(r, &mut s.records[m * RECORD..(m + 1) * RECORD])) };
        }
        s.gathered.resize(ranks * spheres * RECORD, 0);
        comm.all_gather_u64(&s.records, &mut s.gathered);
        tm.exchange_bytes = ((ranks - 1) * spheres * RECORD * 8) as u64;
        for m in (0..spheres).filter(|m| !d.mine.contains(m)) {
            let q = d.micro_rank[m];
            let rec = &s.gathered[(q * spheres + m) * RECORD..(q * spheres + m + 1) * RECORD];
            // SAFETY: another rank's micro-batch: no worker of this rank writes its result, and
            // the others read the results only after "sent".
            unsafe { self.results[m].with_mut(|r| decode(rec, q, r)) };
        }
        let (_, apply) = self.collect_valid(&mut local.valid);
        if !apply {
            return;
        }
        self.build_program(&mut local.tree, &local.valid);
        let (me, t, n_blocks) = (d.rank, &local.tree, self.plan.blocks.len());
        s.present.clear();
        s.present.resize(ranks, 0);
        s.slot.resize(n_blocks, 0);
        for i in (0..n_blocks).filter(|&i| t.valid_in_block[i] > 0) {
            let q = d.block_rank[i];
            s.slot[i] = s.present[q];
            s.present[q] += 1;
        }
        // The other ranks' owned chunks, from this rank's present blocks (its own chunks it
        // reads in place).
        s.send.clear();
        s.send_counts.clear();
        for q in 0..ranks {
            let before = s.send.len();
            for c in owned_chunks(self.sum.num_chunks(), ranks, q).filter(|_| q != me) {
                let r = self.sum.chunk_range(c);
                for i in (0..n_blocks).filter(|&i| d.block_rank[i] == me && t.valid_in_block[i] > 0) {
                    // SAFETY: this rank's blocks are final after "computed" and only read
                    // until "reduced"; the next write comes after the next "start".
                    unsafe { self.buf(self.plan.block_buf[i]).with(|g| s.send.extend_from_slice(&g[r.clone()])) };
                }
            }
            s.send_counts.push(s.send.len() - before);
        }
        let own = self.owned_floats(ranks, me);
        s.recv_counts.clear();
        s.recv_at.clear();
        let mut at = 0;
        for p in 0..ranks {
            let n = if p == me { 0 } else { own.len() * s.present[p] };
            s.recv_at.push(at);
            s.recv_counts.push(n);
            at += n;
        }
        s.recv.resize(at, 0.0);
        comm.all_to_all_v(&s.send, &s.send_counts, &mut s.recv, &s.recv_counts);
        tm.exchange_bytes += (s.send.len() * 4) as u64;
    }

    /// Every worker, between "sent" and "folded": the top of the tree over its share of this
    /// rank's chunks (every N-th, from the k-th), in tree order, and their squared norms.
    fn fold_owned(&self, d: &Dist<B>, s: &Scratch, k: usize, local: &mut Local<W>) {
        let (ranks, me) = (d.ranks, d.rank);
        let own = self.owned_floats(ranks, me);
        let t = &mut local.tree;
        let (program, tmp) = (&t.program, &mut t.tmp);
        let owned = owned_chunks(self.sum.num_chunks(), ranks, me);
        for c in (owned.start + k..owned.end).step_by(self.n_workers) {
            let r = self.sum.chunk_range(c);
            let off = r.start - own.start;
            let src = |i: usize, f: &mut dyn FnMut(&[f32])| {
                let p = d.block_rank[i];
                if p == me {
                    // SAFETY: this rank's blocks are final after "computed" and only read
                    // until "reduced".
                    return unsafe { self.buf(self.plan.block_buf[i]).with(|g| f(&g[r.clone()])) };
                }
                let at = s.recv_at[p] + off * s.present[p] + s.slot[i] * r.len();
                f(&s.recv[at..at + r.len()])
            };
            // SAFETY: chunk c of `sum` and its norm are written only by this worker between
            // "sent" and "folded", and read by worker 0 after "folded".
            unsafe {
                self.sum.write_chunk(c, |dst| program.fold(dst, tmp, src));
                let sq = self.sum.read_chunk(c, grad::sqnorm);
                self.partials[c].with_mut(|x| *x = sq);
            }
        }
    }

    /// Worker 0, between "folded" and "reduced": step 3, the owned ranges of the sum and their
    /// chunk norms gathered from every rank.
    fn exchange_gather(&self, d: &Dist<B>, s: &mut Scratch, tm: &mut WorkerTiming) {
        let (ranks, me, comm, chunks) = (d.ranks, d.rank, &*d.comm, self.sum.num_chunks());
        let own = self.owned_floats(ranks, me);
        s.mine.clear();
        // SAFETY: between "folded" and "reduced" only worker 0 touches `sum` and the norms.
        unsafe { self.sum.read_all(|g| s.mine.extend_from_slice(&g[own.clone()])) };
        s.gather_counts.clear();
        s.gather_counts.extend((0..ranks).map(|q| self.owned_floats(ranks, q).len()));
        // SAFETY: as above.
        unsafe { self.sum.write_all(|g| comm.all_gather_v(&s.mine, g, &s.gather_counts)) };
        // The norms as f64 bits, padded to the most chunks a rank owns.
        let width = chunks.div_ceil(ranks);
        s.records.clear();
        s.records.resize(width, 0);
        for (j, c) in owned_chunks(chunks, ranks, me).enumerate() {
            // SAFETY: as above.
            s.records[j] = unsafe { self.partials[c].with(|x| x.to_bits()) };
        }
        s.gathered.resize(ranks * width, 0);
        comm.all_gather_u64(&s.records, &mut s.gathered);
        for q in (0..ranks).filter(|&q| q != me) {
            for (j, c) in owned_chunks(chunks, ranks, q).enumerate() {
                // SAFETY: as above; the norms are read after "reduced".
                unsafe { self.partials[c].with_mut(|x| *x = f64::from_bits(s.gathered[q * width + j])) };
            }
        }
        tm.exchange_bytes += ((ranks - 1) * (own.len() * 4 + width * 8)) as u64;
    }
}

#[cfg(test)]
mod tests {
    use crate::config::ModelConfig;
    use crate::dist::threads::run_ranks;
    use crate::model::Model;
    use crate::train::{ClipMode, Trainer, TrainerOptions};

    /// Trains `steps` steps of the tiny model on `ranks` thread-ranks of `threads` threads;
    /// returns every rank's final weights and losses.
    fn train(ranks: usize, threads: usize, opts: &TrainerOptions, steps: u64) -> Vec<(Vec<f32>, Vec<f32>)> {
        let config = ModelConfig::preset("tiny").expect("tiny preset");
        let (batch, seq) = (8, 16);
        run_ranks(ranks, |comm| {
            let opts = TrainerOptions { threads, ..opts.clone() };
            let mut t = Trainer::new_distributed(Model::new(config, 3), batch, seq, opts, comm).expect("trainer");
            let mut losses = Vec::new();
            for step in 0..steps {
                let tok = |i: usize| ((i as u64 * 31 + step * 7) % config.vocab as u64) as u32;
                let inputs: Vec<u32> = (0..batch * seq).map(tok).collect();
                let targets: Vec<u32> = (1..=batch * seq).map(tok).collect();
                losses.push(t.step(&inputs, &targets, 1e-3).expect("step").loss);
            }
            (t.params().to_vec(), losses)
        })
    }

    #[test]
    fn ranks_times_threads_give_the_single_process_bits() {
        let base = TrainerOptions {
            spheres: 8,
            chunk_size: 1000,
            clip_norm: 0.5,
            inject_nan: vec![(2, 5)],
            ..TrainerOptions::default()
        };
        for opts in [base.clone(), TrainerOptions { clip_mode: ClipMode::PerSphere, ..base }] {
            let want = train(1, 1, &opts, 3).remove(0);
            for (ranks, threads) in [(1, 3), (2, 1), (3, 1), (2, 2), (4, 1), (3, 2), (2, 3)] {
                for (r, got) in train(ranks, threads, &opts, 3).into_iter().enumerate() {
                    let same = got.0.iter().zip(&want.0).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same,
                        "{ranks} ranks x {threads} threads: rank {r}'s weights differ ({:?})",
                        opts.clip_mode
                    );
                    assert_eq!(got.1, want.1, "{ranks} x {threads}: rank {r}'s losses");
                }
            }
        }
    }

    #[test]
    fn ranks_with_other_thread_counts_are_refused_by_every_rank() {
        let config = ModelConfig::preset("tiny").expect("tiny preset");
        let errs = run_ranks(3, |comm| {
            let threads = if comm.rank() == 1 { 2 } else { 1 };
            let opts = TrainerOptions { threads, spheres: 4, ..TrainerOptions::default() };
            Trainer::new_distributed(Model::new(config, 3), 4, 16, opts, comm).err().map(|e| e.0)
        });
        for e in errs {
            let e = e.unwrap_or_default();
            assert!(e.contains("rank 1 runs 2 threads") && e.contains("rank 0 1 threads"), "{e}");
        }
    }

    #[test]
    fn a_step_with_no_valid_micro_batch_is_skipped_on_every_rank() {
        let opts = TrainerOptions { spheres: 2, inject_nan: vec![(1, 0), (1, 1)], ..TrainerOptions::default() };
        let want = train(1, 1, &opts, 2).remove(0);
        for got in train(2, 1, &opts, 2) {
            assert_eq!(got.0, want.0);
        }
    }
}
