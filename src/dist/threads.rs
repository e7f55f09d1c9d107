//! [`ThreadComm`]: the collectives of [`super::Comm`] between threads of one process, each
//! thread a rank. For tests: the exchange and the training loop run their real code at any
//! rank count without MPI.

use super::Comm;
use std::sync::{Arc, Barrier, Mutex};

/// What the ranks of one [`ThreadComm`] group share: one slot per rank, and a barrier.
struct Board {
    slots: Mutex<Vec<Vec<u64>>>,
    barrier: Barrier,
}

/// One rank of a group of threads.
pub struct ThreadComm {
    rank: usize,
    board: Arc<Board>,
}

impl ThreadComm {
    /// The `ranks` communicators of one group, rank 0 first.
    pub fn group(ranks: usize) -> Vec<ThreadComm> {
        let board = Arc::new(Board { slots: Mutex::new(vec![Vec::new(); ranks]), barrier: Barrier::new(ranks) });
        (0..ranks).map(|rank| ThreadComm { rank, board: Arc::clone(&board) }).collect()
    }

    /// Posts `mine`, waits for every rank's, and returns them all in rank order.
    fn exchange(&self, mine: Vec<u64>) -> Vec<Vec<u64>> {
        let lock = || self.board.slots.lock().unwrap_or_else(|p| p.into_inner());
        lock()[self.rank] = mine;
        self.board.barrier.wait();
        let all = lock().clone();
        self.board.barrier.wait();
        all
    }
}

fn floats(x: &[f32]) -> impl Iterator<Item = u64> + '_ {
    x.iter().map(|f| u64::from(f.to_bits()))
}

impl Comm for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.board.barrier_size()
    }
    fn all_gather_u64(&self, send: &[u64], recv: &mut [u64]) {
        for (q, v) in self.exchange(send.to_vec()).iter().enumerate() {
            recv[q * send.len()..(q + 1) * send.len()].copy_from_slice(v);
        }
    }
    fn all_to_all_v(&self, send: &[f32], send_counts: &[usize], recv: &mut [f32], recv_counts: &[usize]) {
        let mine = send_counts.iter().map(|&c| c as u64).chain(floats(send)).collect();
        let all = self.exchange(mine);
        let r = all.len();
        let mut at = 0;
        for (p, v) in all.iter().enumerate() {
            let counts = &v[..r];
            let off: u64 = r as u64 + counts[..self.rank].iter().sum::<u64>();
            let n = counts[self.rank] as usize;
            assert_eq!(
                n, recv_counts[p],
                "rank {p} sends {n} floats to rank {}, expected {}",
                self.rank, recv_counts[p]
            );
            for (d, s) in recv[at..at + n].iter_mut().zip(&v[off as usize..]) {
                *d = f32::from_bits(*s as u32);
            }
            at += n;
        }
    }
    fn all_gather_v(&self, send: &[f32], recv: &mut [f32], counts: &[usize]) {
        assert_eq!(send.len(), counts[self.rank]);
        let mut at = 0;
        for (q, v) in self.exchange(floats(send).collect()).iter().enumerate() {
            assert_eq!(v.len(), counts[q]);
            for (d, s) in recv[at..at + v.len()].iter_mut().zip(v) {
                *d = f32::from_bits(*s as u32);
            }
            at += v.len();
        }
    }
    fn max_u64(&self, x: u64) -> u64 {
        self.exchange(vec![x]).iter().map(|v| v[0]).max().unwrap_or(x)
    }
    fn abort(&self, code: i32) -> ! {
        panic!("rank {} aborted the run with status {code}", self.rank)
    }
}

impl Board {
    fn barrier_size(&self) -> usize {
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// Runs `f` on `ranks` threads, each with its rank's communicator; returns their results in
/// rank order.
pub fn run_ranks<T: Send>(ranks: usize, f: impl Fn(Arc<dyn Comm>) -> T + Sync) -> Vec<T> {
    let comms = ThreadComm::group(ranks);
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = comms.into_iter().map(|c| s.spawn(move || f(Arc::new(c)))).collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
    })
}
