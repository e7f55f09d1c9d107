//! The synchronization backend the training protocol is generic over.
//!
//! The step protocol in [`crate::train`] (barrier, strategies, worker loop, shutdown) never names
//! `std::sync` directly: it goes through [`Backend`]. [`Std`] is the backend the binary and the
//! ordinary tests use. With the `loom` feature, [`Loom`] runs the same protocol code under the
//! loom model checker; with `shuttle`, [`Shuttle`] runs it under shuttle's randomized and PCT
//! schedulers. Enabling a feature only adds a backend: nothing in the [`Std`] path is
//! cfg-switched, so `--all-features` builds and runs every test in one invocation.
//!
//! Shared mutable data that is protected by the protocol's phases rather than by a lock (the
//! weights, the per-micro-batch gradient slots, the published batch) lives in a
//! [`Backend::Cell`], whose access is scoped like loom's `UnsafeCell::with`/`with_mut`: under
//! loom a write that is not ordered against a read by the protocol is reported as a causality
//! violation, and under shuttle an access that overlaps a conflicting one panics. Buffers that
//! are written in parallel over disjoint chunks use [`ChunkedBuf`], which tracks each chunk
//! separately so that disjoint writes are allowed and a whole-buffer read conflicts with every
//! chunk write.

use std::ops::{Deref, Range};
use std::sync::atomic::Ordering;
use std::time::Instant;

/// A mutex whose critical section is a closure, so every backend can keep its guard private.
pub trait MutexApi<T>: Send + Sync {
    fn new(value: T) -> Self;
    /// Runs `f` with the lock held. A lock poisoned by a panicking holder is still entered: the
    /// protocol reports worker panics itself and never leaves shared state half-written.
    fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R;
}

/// The one atomic type the protocol needs (micro-batch ticket counter).
pub trait AtomicUsizeApi: Send + Sync {
    fn new(value: usize) -> Self;
    fn load(&self, order: Ordering) -> usize;
    fn store(&self, value: usize, order: Ordering);
    fn fetch_add(&self, value: usize, order: Ordering) -> usize;
}

/// Interior mutability whose exclusion is guaranteed by the protocol, not by a lock.
pub trait CellApi<T>: Send + Sync {
    fn new(value: T) -> Self;
    /// Reads the value for the duration of `f`.
    ///
    /// # Safety
    /// No `with_mut` on the same cell may run concurrently (the protocol phases guarantee it;
    /// the loom and shuttle backends check it).
    unsafe fn with<R>(&self, f: impl FnOnce(&T) -> R) -> R;
    /// Writes the value for the duration of `f`.
    ///
    /// # Safety
    /// No other access to the same cell may run concurrently.
    unsafe fn with_mut<R>(&self, f: impl FnOnce(&mut T) -> R) -> R;
}

/// Everything the protocol needs from a threading library.
pub trait Backend: Sized + Send + Sync + 'static {
    /// True for the model checkers. When a checker reports a bug it unwinds the checked
    /// threads; cleanup code must then not touch the checker's primitives again (a second
    /// panic during unwinding would abort the test process instead of failing the test).
    ///
    /// False promises that [`Backend::Cell`] tracks nothing (it is a plain `UnsafeCell`), so
    /// that [`ChunkedBuf`] may skip its per-chunk tracking cells.
    const IS_CHECKER: bool;
    type Mutex<T: Send>: MutexApi<T>;
    type Condvar: Send + Sync;
    type AtomicUsize: AtomicUsizeApi;
    type Cell<T: Send + Sync>: CellApi<T>;
    type Arc<T: Send + Sync + 'static>: Deref<Target = T> + Clone + Send + Sync;
    type JoinHandle<T: Send + 'static>: Send;

    fn arc<T: Send + Sync + 'static>(value: T) -> Self::Arc<T>;
    fn condvar() -> Self::Condvar;
    /// Locks `m`, waits on `cv` while `cond` holds, then runs `then` with the lock still held.
    fn wait_while<T: Send, R>(
        m: &Self::Mutex<T>,
        cv: &Self::Condvar,
        cond: impl FnMut(&mut T) -> bool,
        then: impl FnOnce(&mut T) -> R,
    ) -> R;
    fn notify_all(cv: &Self::Condvar);
    fn spawn<F, T>(name: String, f: F) -> std::io::Result<Self::JoinHandle<T>>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static;
    fn join<T: Send + 'static>(handle: Self::JoinHandle<T>) -> std::thread::Result<T>;
    /// A clock for the instrumentation; `None` under the model checkers, whose executions must
    /// not depend on (or pay for) wall time.
    fn now() -> Option<Instant>;
}

// ---------------------------------------------------------------------------------------------
// std
// ---------------------------------------------------------------------------------------------

/// The production backend: `std::sync` and `std::thread`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Std;

/// `std::sync::Mutex` behind the closure interface.
#[derive(Debug, Default)]
pub struct StdMutex<T>(std::sync::Mutex<T>);

impl<T: Send> MutexApi<T> for StdMutex<T> {
    fn new(value: T) -> Self {
        StdMutex(std::sync::Mutex::new(value))
    }
    fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut g)
    }
}

impl AtomicUsizeApi for std::sync::atomic::AtomicUsize {
    fn new(value: usize) -> Self {
        std::sync::atomic::AtomicUsize::new(value)
    }
    fn load(&self, order: Ordering) -> usize {
        std::sync::atomic::AtomicUsize::load(self, order)
    }
    fn store(&self, value: usize, order: Ordering) {
        std::sync::atomic::AtomicUsize::store(self, value, order)
    }
    fn fetch_add(&self, value: usize, order: Ordering) -> usize {
        std::sync::atomic::AtomicUsize::fetch_add(self, value, order)
    }
}

/// A plain `UnsafeCell`: under std the protocol's phases are the only guard.
#[derive(Debug, Default)]
pub struct StdCell<T>(std::cell::UnsafeCell<T>);

// SAFETY: every access goes through the `unsafe` `with`/`with_mut`, whose callers promise that a
// write never overlaps another access; with that promise, sharing the cell is like sharing a
// `RwLock<T>`, which is Sync for `T: Send + Sync`.
unsafe impl<T: Send + Sync> Sync for StdCell<T> {}

impl<T: Send + Sync> CellApi<T> for StdCell<T> {
    fn new(value: T) -> Self {
        StdCell(std::cell::UnsafeCell::new(value))
    }
    unsafe fn with<R>(&self, f: impl FnOnce(&T) -> R) -> R {
        // SAFETY: the caller guarantees no concurrent writer (see the trait's contract).
        f(unsafe { &*self.0.get() })
    }
    unsafe fn with_mut<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        // SAFETY: the caller guarantees no concurrent access at all.
        f(unsafe { &mut *self.0.get() })
    }
}

impl Backend for Std {
    const IS_CHECKER: bool = false;
    type Mutex<T: Send> = StdMutex<T>;
    type Condvar = std::sync::Condvar;
    type AtomicUsize = std::sync::atomic::AtomicUsize;
    type Cell<T: Send + Sync> = StdCell<T>;
    type Arc<T: Send + Sync + 'static> = std::sync::Arc<T>;
    type JoinHandle<T: Send + 'static> = std::thread::JoinHandle<T>;

    fn arc<T: Send + Sync + 'static>(value: T) -> Self::Arc<T> {
        std::sync::Arc::new(value)
    }
    fn condvar() -> Self::Condvar {
        std::sync::Condvar::new()
    }
    fn wait_while<T: Send, R>(
        m: &Self::Mutex<T>,
        cv: &Self::Condvar,
        cond: impl FnMut(&mut T) -> bool,
        then: impl FnOnce(&mut T) -> R,
    ) -> R {
        let g = m.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut g = cv.wait_while(g, cond).unwrap_or_else(|e| e.into_inner());
        then(&mut g)
    }
    fn notify_all(cv: &Self::Condvar) {
        cv.notify_all()
    }
    fn spawn<F, T>(name: String, f: F) -> std::io::Result<Self::JoinHandle<T>>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        std::thread::Builder::new().name(name).spawn(f)
    }
    fn join<T: Send + 'static>(handle: Self::JoinHandle<T>) -> std::thread::Result<T> {
        handle.join()
    }
    fn now() -> Option<Instant> {
        Some(Instant::now())
    }
}

// ---------------------------------------------------------------------------------------------
// The model checkers: loom and shuttle
// ---------------------------------------------------------------------------------------------

/// Defines a checker backend from a crate with std-like `sync` and `thread` modules: its mutex
/// wrapper, its atomic, and the [`Backend`] impl. Only the cell, which the two checkers track
/// differently, is written out by hand for each (passed in as `cell`, with its items).
macro_rules! checker_backend {
    (
        feature: $feature:literal, module: $module:ident, krate: $krate:ident,
        $(#[$doc:meta])* backend: $backend:ident, mutex: $mutex:ident, cell: $cell:ident,
        $($cell_items:item)*
    ) => {
        #[cfg(feature = $feature)]
        pub use self::$module::$backend;

        #[cfg(feature = $feature)]
        mod $module {
            use super::*;

            $(#[$doc])*
            #[derive(Debug, Clone, Copy, Default)]
            pub struct $backend;

            #[derive(Debug)]
            pub struct $mutex<T>($krate::sync::Mutex<T>);

            impl<T: Send> MutexApi<T> for $mutex<T> {
                fn new(value: T) -> Self {
                    $mutex($krate::sync::Mutex::new(value))
                }
                fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
                    let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
                    f(&mut g)
                }
            }

            impl AtomicUsizeApi for $krate::sync::atomic::AtomicUsize {
                fn new(value: usize) -> Self {
                    $krate::sync::atomic::AtomicUsize::new(value)
                }
                fn load(&self, order: Ordering) -> usize {
                    $krate::sync::atomic::AtomicUsize::load(self, order)
                }
                fn store(&self, value: usize, order: Ordering) {
                    $krate::sync::atomic::AtomicUsize::store(self, value, order)
                }
                fn fetch_add(&self, value: usize, order: Ordering) -> usize {
                    $krate::sync::atomic::AtomicUsize::fetch_add(self, value, order)
                }
            }

            $($cell_items)*

            impl Backend for $backend {
                const IS_CHECKER: bool = true;
                type Mutex<T: Send> = $mutex<T>;
                type Condvar = $krate::sync::Condvar;
                type AtomicUsize = $krate::sync::atomic::AtomicUsize;
                type Cell<T: Send + Sync> = $cell<T>;
                // std's Arc: its reference counting is correct by construction, and the
                // checker's would add a branch point to every clone and drop without checking
                // anything about the protocol.
                type Arc<T: Send + Sync + 'static> = std::sync::Arc<T>;
                type JoinHandle<T: Send + 'static> = $krate::thread::JoinHandle<T>;

                fn arc<T: Send + Sync + 'static>(value: T) -> Self::Arc<T> {
                    std::sync::Arc::new(value)
                }
                fn condvar() -> Self::Condvar {
                    $krate::sync::Condvar::new()
                }
                fn wait_while<T: Send, R>(
                    m: &Self::Mutex<T>,
                    cv: &Self::Condvar,
                    mut cond: impl FnMut(&mut T) -> bool,
                    then: impl FnOnce(&mut T) -> R,
                ) -> R {
                    let mut g = m.0.lock().unwrap_or_else(|e| e.into_inner());
                    while cond(&mut g) {
                        g = cv.wait(g).unwrap_or_else(|e| e.into_inner());
                    }
                    then(&mut g)
                }
                fn notify_all(cv: &Self::Condvar) {
                    cv.notify_all()
                }
                fn spawn<F, T>(name: String, f: F) -> std::io::Result<Self::JoinHandle<T>>
                where
                    F: FnOnce() -> T + Send + 'static,
                    T: Send + 'static,
                {
                    $krate::thread::Builder::new().name(name).spawn(f)
                }
                fn join<T: Send + 'static>(handle: Self::JoinHandle<T>) -> std::thread::Result<T> {
                    handle.join()
                }
                fn now() -> Option<Instant> {
                    None
                }
            }
        }
    };
}

checker_backend! {
    feature: "loom", module: loom_backend, krate: loom,
    /// The loom model checker's primitives. Everything must be created inside `loom::model`.
    backend: Loom, mutex: LoomMutex, cell: LoomCell,

    /// loom's tracked `UnsafeCell`: an access not ordered after a conflicting one panics.
    #[derive(Debug)]
    pub struct LoomCell<T>(loom::cell::UnsafeCell<T>);

    // SAFETY: as for `StdCell`; in addition loom verifies the callers' exclusion promise on
    // every explored execution.
    unsafe impl<T: Send + Sync> Sync for LoomCell<T> {}

    impl<T: Send + Sync> CellApi<T> for LoomCell<T> {
        fn new(value: T) -> Self {
            LoomCell(loom::cell::UnsafeCell::new(value))
        }
        unsafe fn with<R>(&self, f: impl FnOnce(&T) -> R) -> R {
            // SAFETY: loom checks that no write is concurrent with this read.
            self.0.with(|p| f(unsafe { &*p }))
        }
        unsafe fn with_mut<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
            // SAFETY: loom checks that no other access is concurrent with this write.
            self.0.with_mut(|p| f(unsafe { &mut *p }))
        }
    }
}

checker_backend! {
    feature: "shuttle", module: shuttle_backend, krate: shuttle,
    /// shuttle's controlled primitives. Everything must be created inside a shuttle check.
    backend: Shuttle, mutex: ShuttleMutex, cell: ShuttleCell,

    /// shuttle has no tracked cell, so this one is its own small race detector: it records the
    /// readers/writer of the access in progress and yields to the scheduler inside the access,
    /// so any schedule that lets a conflicting access start during it panics, with a message
    /// naming the two kinds of access ("data race: cell <this> while it is being <that>").
    #[derive(Debug)]
    pub struct ShuttleCell<T> {
        data: std::cell::UnsafeCell<T>,
        /// Readers in progress, or -1 while written. Plain std atomic: shuttle runs one thread at
        /// a time, so it needs no scheduling point of its own.
        state: std::sync::atomic::AtomicIsize,
    }

    // SAFETY: as for `StdCell`; the access state turns a broken exclusion promise into a panic
    // before the conflicting reference is created.
    unsafe impl<T: Send + Sync> Sync for ShuttleCell<T> {}

    impl<T: Send + Sync> CellApi<T> for ShuttleCell<T> {
        fn new(value: T) -> Self {
            ShuttleCell { data: std::cell::UnsafeCell::new(value), state: std::sync::atomic::AtomicIsize::new(0) }
        }
        unsafe fn with<R>(&self, f: impl FnOnce(&T) -> R) -> R {
            let prev = self.state.fetch_add(1, Ordering::SeqCst);
            assert!(prev >= 0, "data race: cell read while it is being written");
            shuttle::thread::yield_now();
            // SAFETY: the state check above proves no writer is active, and a writer that starts
            // later panics instead of creating its reference.
            let r = f(unsafe { &*self.data.get() });
            self.state.fetch_sub(1, Ordering::SeqCst);
            r
        }
        unsafe fn with_mut<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
            match self.state.compare_exchange(0, -1, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => {}
                Err(-1) => panic!("data race: cell written while it is being written"),
                Err(_) => panic!("data race: cell written while it is being read"),
            }
            shuttle::thread::yield_now();
            // SAFETY: the state is -1, so any other access started now panics before touching
            // the data.
            let r = f(unsafe { &mut *self.data.get() });
            self.state.store(0, Ordering::SeqCst);
            r
        }
    }
}

// ---------------------------------------------------------------------------------------------
// ChunkedBuf
// ---------------------------------------------------------------------------------------------

/// A flat `f32` buffer shared by the workers, split into fixed-size chunks that are written in
/// parallel. Each chunk has its own access-tracking cell, so writes to disjoint chunks do not
/// conflict while a whole-buffer read conflicts with every chunk write.
pub struct ChunkedBuf<B: Backend> {
    data: Box<[std::cell::UnsafeCell<f32>]>,
    chunk: usize,
    track: Box<[B::Cell<()>]>,
}

// SAFETY: the data is only reached through the `unsafe` accessors below, whose callers promise
// (and the checker backends verify through `track`) that writes never overlap other accesses to
// the same chunk; `f32` is Send + Sync.
unsafe impl<B: Backend> Sync for ChunkedBuf<B> {}

impl<B: Backend> ChunkedBuf<B> {
    /// Takes ownership of `values`, split into chunks of `chunk` floats (the last may be short).
    pub fn new(values: Vec<f32>, chunk: usize) -> Self {
        assert!(chunk > 0, "chunk size must be positive");
        let n_chunks = values.len().div_ceil(chunk);
        let data: Box<[std::cell::UnsafeCell<f32>]> = values.into_iter().map(std::cell::UnsafeCell::new).collect();
        let track = (0..n_chunks).map(|_| B::Cell::new(())).collect();
        ChunkedBuf { data, chunk, track }
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn num_chunks(&self) -> usize {
        self.track.len()
    }

    /// The element range of chunk `c`.
    pub fn chunk_range(&self, c: usize) -> Range<usize> {
        let start = c * self.chunk;
        start..(start + self.chunk).min(self.data.len())
    }

    fn base(&self) -> *mut f32 {
        // `UnsafeCell<f32>` is `repr(transparent)`, so the cells are laid out as plain floats.
        std::cell::UnsafeCell::raw_get(self.data.as_ptr())
    }

    /// Reads the whole buffer.
    ///
    /// # Safety
    /// No chunk of the buffer may be written concurrently.
    pub unsafe fn read_all<R>(&self, f: impl FnOnce(&[f32]) -> R) -> R {
        // SAFETY: forwarded from this function's contract; the range is the whole buffer.
        unsafe { self.read_range(0..self.data.len(), f) }
    }

    /// Writes the whole buffer.
    ///
    /// # Safety
    /// No other access to any chunk may run concurrently.
    pub unsafe fn write_all<R>(&self, f: impl FnOnce(&mut [f32]) -> R) -> R {
        // SAFETY: forwarded from this function's contract; the range is the whole buffer.
        unsafe { self.write_range(0..self.data.len(), f) }
    }

    /// Reads `range`, holding the tracking access of every chunk it overlaps.
    ///
    /// # Safety
    /// No chunk that `range` overlaps may be written concurrently.
    pub unsafe fn read_range<R>(&self, range: Range<usize>, f: impl FnOnce(&[f32]) -> R) -> R {
        // SAFETY: forwarded from this function's contract; `with_range` passes a pointer to
        // `len` initialised floats of the buffer that no one writes meanwhile.
        unsafe { self.with_range(range, false, |p, len| f(std::slice::from_raw_parts(p as *const f32, len))) }
    }

    /// Writes `range`, holding the tracking access of every chunk it overlaps.
    ///
    /// # Safety
    /// No other access to a chunk that `range` overlaps may run concurrently.
    pub unsafe fn write_range<R>(&self, range: Range<usize>, f: impl FnOnce(&mut [f32]) -> R) -> R {
        // SAFETY: forwarded from this function's contract; `with_range` passes a pointer to
        // `len` initialised floats of the buffer that nothing else accesses meanwhile.
        unsafe { self.with_range(range, true, |p, len| f(std::slice::from_raw_parts_mut(p, len))) }
    }

    /// Runs `f` on the start and length of `range` (panics unless it lies in the buffer) while
    /// holding the tracking access (`write` or read) of every chunk it overlaps.
    ///
    /// # Safety
    /// As for `write_range` (`write`) or `read_range`.
    unsafe fn with_range<R>(&self, range: Range<usize>, write: bool, f: impl FnOnce(*mut f32, usize) -> R) -> R {
        assert!(range.start <= range.end && range.end <= self.data.len(), "range outside the buffer");
        // SAFETY: the range lies inside the buffer (checked above).
        let start = unsafe { self.base().add(range.start) };
        if !B::IS_CHECKER {
            // A non-checker's cells track nothing (see `Backend::IS_CHECKER`), so holding them
            // would only nest one stack frame per chunk (thousands for a large model).
            return f(start, range.len());
        }
        let (mut f, mut out) = (Some(f), None);
        // SAFETY: forwarded from this function's contract.
        unsafe {
            self.nest(self.chunks_of(&range), write, &mut || {
                out = Some((f.take().expect("called once"))(start, range.len()))
            })
        };
        out.expect("closure ran")
    }

    /// The chunks an element range overlaps.
    fn chunks_of(&self, range: &Range<usize>) -> Range<usize> {
        if range.is_empty() {
            return 0..0;
        }
        range.start / self.chunk..range.end.div_ceil(self.chunk)
    }

    /// Holds the tracking access of chunks `chunks` (nested, so all are held while `f` runs).
    /// Only the checker backends come here: their buffers have a handful of chunks.
    unsafe fn nest(&self, chunks: Range<usize>, write: bool, f: &mut dyn FnMut()) {
        let Some(c) = chunks.clone().next() else {
            return f();
        };
        let rest = c + 1..chunks.end;
        if write {
            // SAFETY: forwarded from the caller's contract.
            unsafe { self.track[c].with_mut(|_| self.nest(rest, write, f)) }
        } else {
            // SAFETY: forwarded from the caller's contract.
            unsafe { self.track[c].with(|_| self.nest(rest, write, f)) }
        }
    }

    /// Reads chunk `c`.
    ///
    /// # Safety
    /// Chunk `c` may not be written concurrently.
    pub unsafe fn read_chunk<R>(&self, c: usize, f: impl FnOnce(&[f32]) -> R) -> R {
        let r = self.chunk_range(c);
        // SAFETY: forwarded from this function's contract; the range lies inside the buffer.
        unsafe {
            self.track[c].with(|_| f(std::slice::from_raw_parts(self.base().add(r.start) as *const f32, r.len())))
        }
    }

    /// Writes chunk `c`.
    ///
    /// # Safety
    /// No other access to chunk `c` may run concurrently.
    pub unsafe fn write_chunk<R>(&self, c: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
        let r = self.chunk_range(c);
        // SAFETY: forwarded from this function's contract; chunks are disjoint, so the mutable
        // slice aliases no other chunk's slice.
        unsafe { self.track[c].with_mut(|_| f(std::slice::from_raw_parts_mut(self.base().add(r.start), r.len()))) }
    }

    /// Unchecked shared view, for the owner while it knows no worker is inside a step.
    ///
    /// # Safety
    /// No write may happen while the returned slice is alive.
    pub unsafe fn as_slice_unchecked(&self) -> &[f32] {
        // SAFETY: forwarded from this function's contract.
        unsafe { std::slice::from_raw_parts(self.base() as *const f32, self.data.len()) }
    }

    /// Exclusive access through `&mut self`: no tracking needed, the borrow checker proves it.
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        // SAFETY: `&mut self` excludes every other access to the buffer.
        unsafe { std::slice::from_raw_parts_mut(self.base(), self.data.len()) }
    }
}
