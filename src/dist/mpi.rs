//! [`MpiComm`]: [`super::Comm`] over MPI, through rsmpi (cargo feature `mpi`).
//!
//! MPI is initialised with funneled threading: only the thread that initialised it (the main
//! thread, which is the engine's coordinator, worker 0) calls MPI; every call checks it. Errors
//! use MPI's default handler on `MPI_COMM_WORLD`, `MPI_ERRORS_ARE_FATAL`: a failed call aborts
//! the whole job. A rank that dies (a signal, a crash) is noticed by `mpirun`, which then kills
//! the other ranks and exits non-zero; a rank whose run fails calls [`Comm::abort`]
//! (`MPI_Abort`), which ends every rank.

use super::Comm;
use crate::{err, Result};
use mpi::datatype::{Partition, PartitionMut};
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Threading;
use std::thread::ThreadId;

/// `MPI_COMM_WORLD` of this process, and the MPI environment it lives in (finalised on drop).
pub struct MpiComm {
    world: SimpleCommunicator,
    /// The thread that initialised MPI, the only one that may call it.
    main: ThreadId,
    rank: usize,
    size: usize,
    _universe: Universe,
}

// SAFETY: the communicator is a handle MPI lets any thread hold; every method that calls MPI
// first checks it runs on `main`, the thread that initialised MPI with `MPI_THREAD_FUNNELED`,
// so no two threads call MPI and none but the main one does.
unsafe impl Send for MpiComm {}
// SAFETY: as for Send: shared references lead to MPI calls only on `main`.
unsafe impl Sync for MpiComm {}

impl MpiComm {
    /// Initialises MPI (once per process) with funneled threading.
    pub fn init() -> Result<MpiComm> {
        let (universe, threading) = mpi::initialize_with_threading(Threading::Funneled)
            .ok_or_else(|| err!("MPI is already initialised in this process"))?;
        if threading < Threading::Funneled {
            return Err(err!("this MPI library does not support threads (MPI_THREAD_FUNNELED); cllm needs it"));
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        Ok(MpiComm { world, main: std::thread::current().id(), rank, size, _universe: universe })
    }

    fn on_main(&self) {
        assert_eq!(std::thread::current().id(), self.main, "MPI called off the thread that initialised it");
    }
}

/// MPI counts and displacements (C `int`) of `counts`; a count past `i32::MAX` is refused
/// when the engine is built, so this never truncates.
fn counts_displs(counts: &[usize]) -> (Vec<i32>, Vec<i32>) {
    let c: Vec<i32> = counts.iter().map(|&n| i32::try_from(n).expect("MPI counts fit an int")).collect();
    let d = c
        .iter()
        .scan(0i32, |at, &n| {
            let here = *at;
            *at += n;
            Some(here)
        })
        .collect();
    (c, d)
}

impl Comm for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_gather_u64(&self, send: &[u64], recv: &mut [u64]) {
        self.on_main();
        self.world.all_gather_into(send, recv);
    }
    fn all_to_all_v(&self, send: &[f32], send_counts: &[usize], recv: &mut [f32], recv_counts: &[usize]) {
        self.on_main();
        let (sc, sd) = counts_displs(send_counts);
        let (rc, rd) = counts_displs(recv_counts);
        let s = Partition::new(send, &sc[..], &sd[..]);
        let mut r = PartitionMut::new(recv, &rc[..], &rd[..]);
        self.world.all_to_all_varcount_into(&s, &mut r);
    }
    fn all_gather_v(&self, send: &[f32], recv: &mut [f32], counts: &[usize]) {
        self.on_main();
        let (c, d) = counts_displs(counts);
        let mut r = PartitionMut::new(recv, &c[..], &d[..]);
        self.world.all_gather_varcount_into(send, &mut r);
    }
    fn max_u64(&self, x: u64) -> u64 {
        self.on_main();
        let mut out = 0u64;
        self.world.all_reduce_into(&x, &mut out, mpi::collective::SystemOperation::max());
        out
    }
    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}
