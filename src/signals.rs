//! Signals during training: SIGINT, SIGTERM and SIGHUP become a stop request; SIGXFSZ is
//! caught so that a file-size limit (`ulimit -f`) fails the write instead of killing the process.
//!
//! The handlers (installed with `signal-hook`, which does only async-signal-safe work in them)
//! store the signal number in an atomic; nothing else happens in the handler. The training loop
//! asks [`StopRequest::requested`] between steps (never inside the step protocol), so a step in
//! flight always completes, every worker joins when the trainer drops, and the loop can write a
//! final checkpoint. The request is a value the loop is handed, not a global it reads, so a
//! multi-process run can combine the ranks' requests before deciding to stop.
//!
//! A second signal while a request is pending exits at once with the signal's code
//! (128 + signal: 130, 143, 129), through `signal-hook`'s conditional shutdown, which calls
//! `_exit` from the handler. Checkpoints are published by rename ([`crate::checkpoint`]), so the
//! last complete one stays intact whatever the moment; a half-written temporary directory is
//! removed by the next run in that directory.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::{err, Result};

/// The signals that request a stop.
pub const STOP_SIGNALS: [i32; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// A stop request: the first stop signal received, if any.
#[derive(Clone, Debug, Default)]
pub struct StopRequest {
    signal: Arc<AtomicUsize>,
}

impl StopRequest {
    /// A request no signal sets (library use, tests): only [`StopRequest::request`] does.
    pub fn none() -> StopRequest {
        StopRequest::default()
    }

    /// Installs the handlers of [`STOP_SIGNALS`] (and catches SIGXFSZ) for this process; the
    /// returned request is set by the first of them.
    pub fn install() -> Result<StopRequest> {
        let stop = StopRequest::default();
        let pending = Arc::new(AtomicBool::new(false));
        for sig in STOP_SIGNALS {
            // Registered first, so it runs first: it exits only when an earlier signal already
            // set `pending`.
            signal_hook::flag::register_conditional_shutdown(sig, exit_code(sig), Arc::clone(&pending))
                .and_then(|_| signal_hook::flag::register(sig, Arc::clone(&pending)))
                .and_then(|_| signal_hook::flag::register_usize(sig, Arc::clone(&stop.signal), sig as usize))
                .map_err(|e| err!("cannot install the handler of {}: {e}", signal_name(sig)))?;
        }
        catch_file_size_signal()?;
        Ok(stop)
    }

    /// The signal that asked to stop, if one did.
    pub fn requested(&self) -> Option<i32> {
        match self.signal.load(Ordering::SeqCst) {
            0 => None,
            s => Some(s as i32),
        }
    }

    /// Asks to stop as if `signal` had arrived (tests, embedders).
    pub fn request(&self, signal: i32) {
        self.signal.store(signal as usize, Ordering::SeqCst);
    }
}

/// Replaces SIGXFSZ's default action (terminate, with a core) by a handler that does nothing,
/// so a write past `RLIMIT_FSIZE` returns `EFBIG` and is reported like any other write error.
pub fn catch_file_size_signal() -> Result<()> {
    signal_hook::flag::register(libc::SIGXFSZ, Arc::new(AtomicBool::new(false)))
        .map(|_| ())
        .map_err(|e| err!("cannot install the handler of SIGXFSZ: {e}"))
}

/// The exit status of a process stopped by `signal`: 128 + its number, as a shell reports it.
pub fn exit_code(signal: i32) -> i32 {
    128 + signal
}

/// `SIGINT`, `SIGTERM`, `SIGHUP`, else `signal N`.
pub fn signal_name(signal: i32) -> String {
    match signal {
        libc::SIGINT => "SIGINT".into(),
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGHUP => "SIGHUP".into(),
        libc::SIGXFSZ => "SIGXFSZ".into(),
        s => format!("signal {s}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_128_plus_the_signal() {
        assert_eq!(STOP_SIGNALS.map(exit_code), [130, 143, 129]);
    }

    #[test]
    fn a_request_is_seen_by_every_clone() {
        let stop = StopRequest::none();
        let seen = stop.clone();
        assert_eq!(seen.requested(), None);
        stop.request(libc::SIGTERM);
        assert_eq!(seen.requested(), Some(libc::SIGTERM));
    }
}
