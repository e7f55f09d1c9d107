//! Data-parallel training over several processes ("ranks"), bit-identical at any rank count.
//!
//! `mpirun -np R cllm train --distributed mpi …` runs R ranks of N threads each. The S
//! micro-batches of a step are divided over the R × N global workers of the summation tree
//! ([`crate::train::tree`]): rank `r` runs global workers `r*N..r*N+N`, so its micro-batches
//! and its blocks are those of a single process with R × N threads. After each rank has its
//! blocks ("computed"), the coordinator thread of every rank runs the exchange
//! ([`crate::train::distributed`]): the per-micro-batch results (loss, scan, clip factor) are
//! all-gathered so every rank sees the same valid set; every rank sends each parameter chunk's
//! block sums to that chunk's owner rank (one `alltoallv`), the owner folds them with the same
//! [`crate::train::tree::Program`] the local reduction uses, in tree order, and an `allgatherv`
//! gives every rank the whole sum. The chunk norms are then taken by every rank in chunk order,
//! and every rank applies the same AdamW update to its full copy of the weights. No reduction
//! whose order MPI chooses (`MPI_Allreduce` with `MPI_SUM`) touches a float.
//!
//! [`Comm`] is what the exchange and the training loop need from MPI: a handful of collectives
//! whose result does not depend on MPI's internal order (gathers, an all-to-all, and a max over
//! integers). [`mpi`] implements it over rsmpi (cargo feature `mpi`); [`threads`] over threads
//! of one process, so the exchange is tested without MPI.

#[cfg(feature = "mpi")]
pub mod mpi;
pub mod threads;

use crate::{bail, Result};

/// `--check-every` when not given: ranks compare their weights' hash every 100 steps.
pub const DEFAULT_CHECK_EVERY: u64 = 100;

/// The command that builds a cllm with MPI support (named in the error of a build without it).
pub const BUILD_WITH_MPI: &str = "cargo build --release --features mpi";

/// How `cllm train` and `cllm bench` spread a run over processes (`--distributed`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Distributed {
    /// Ranks started by `mpirun` (or `srun --mpi=pmix`), exchanging gradients over MPI.
    #[value(help = "ranks started by mpirun, exchanging gradients over MPI")]
    Mpi,
}

/// The collectives of a distributed run. Every call is collective: all ranks make the same
/// calls in the same order, and only the thread that created the communicator makes them.
pub trait Comm: Send + Sync {
    /// This process's rank, `0..size()`.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// `recv[q * send.len()..][..send.len()]` = rank q's `send` (all ranks send as many).
    fn all_gather_u64(&self, send: &[u64], recv: &mut [u64]);
    /// `send` holds one block per rank in rank order, `send_counts[q]` floats for rank q;
    /// `recv` gets one block from each rank in rank order, `recv_counts[p]` floats from rank p.
    fn all_to_all_v(&self, send: &[f32], send_counts: &[usize], recv: &mut [f32], recv_counts: &[usize]);
    /// `recv` = every rank's `send` in rank order, rank q's being `counts[q]` floats.
    fn all_gather_v(&self, send: &[f32], recv: &mut [f32], counts: &[usize]);
    /// The largest of every rank's `x` (an integer max: exact whatever the order).
    fn max_u64(&self, x: u64) -> u64;
    /// Ends every rank of the run with exit status `code` (MPI_Abort), after an error on this
    /// one, so that no rank waits forever for it in a collective.
    fn abort(&self, code: i32) -> !;
}

/// Starts the `--distributed` backend: with MPI, initialises it (funneled threading: only the
/// main thread, the engine's coordinator, calls MPI).
pub fn init(kind: Distributed) -> Result<std::sync::Arc<dyn Comm>> {
    match kind {
        #[cfg(feature = "mpi")]
        Distributed::Mpi => Ok(std::sync::Arc::new(mpi::MpiComm::init()?)),
        #[cfg(not(feature = "mpi"))]
        Distributed::Mpi => bail!("--distributed mpi needs a cllm built with MPI support: {BUILD_WITH_MPI}"),
    }
}

/// A 64-bit FNV-1a hash of the weights' bits (what ranks compare every `--check-every` steps).
pub fn weights_hash(params: &[f32]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for x in params {
        for b in x.to_bits().to_le_bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Compares every rank's weights after `step`: an error naming the ranks whose weights differ
/// from rank 0's (every rank gets the same answer, so all of them stop together).
pub fn check_weights(comm: &dyn Comm, step: u64, params: &[f32]) -> Result<()> {
    let mut all = vec![0u64; comm.size()];
    comm.all_gather_u64(&[weights_hash(params)], &mut all);
    let diverged: Vec<String> = (1..all.len()).filter(|&q| all[q] != all[0]).map(|q| q.to_string()).collect();
    if !diverged.is_empty() {
        bail!(
            "after step {step}: the weights of rank {} differ from rank 0's (hash {:016x} vs {:016x}); the ranks \
             diverged (different flags, data or binaries?)",
            diverged.join(", rank "),
            all[diverged[0].parse::<usize>().unwrap_or(1)],
            all[0]
        );
    }
    Ok(())
}

/// The chunks rank `q` of `ranks` owns in the exchange: a contiguous range of `0..chunks`.
pub fn owned_chunks(chunks: usize, ranks: usize, q: usize) -> std::ops::Range<usize> {
    q * chunks / ranks..(q + 1) * chunks / ranks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_chunks_partition_in_rank_order() {
        for chunks in 0..20 {
            for ranks in 1..6 {
                let mut next = 0;
                for q in 0..ranks {
                    let r = owned_chunks(chunks, ranks, q);
                    assert_eq!(r.start, next);
                    next = r.end;
                }
                assert_eq!(next, chunks);
            }
        }
    }

    #[test]
    fn the_hash_sees_every_bit() {
        let a = [1.0f32, 2.0, 3.0];
        let mut b = a;
        b[2] = f32::from_bits(b[2].to_bits() ^ 1);
        assert_ne!(weights_hash(&a), weights_hash(&b));
        assert_eq!(weights_hash(&a), weights_hash(&a.clone()));
    }

    #[test]
    fn a_diverged_rank_is_named() {
        let errs = threads::run_ranks(3, |comm| {
            let w = if comm.rank() == 2 { [1.0f32, 2.5] } else { [1.0, 2.0] };
            check_weights(&*comm, 7, &w).err().map(|e| e.0)
        });
        for e in errs {
            let e = e.expect("every rank reports the divergence");
            assert!(e.contains("after step 7") && e.contains("rank 2 differ"), "{e}");
        }
    }

    #[cfg(not(feature = "mpi"))]
    #[test]
    fn without_the_feature_init_says_how_to_build() {
        let e = init(Distributed::Mpi).err().map(|e| e.0).unwrap_or_default();
        assert!(e.contains(BUILD_WITH_MPI), "{e}");
        assert!(!e.contains('\n'));
    }
}
