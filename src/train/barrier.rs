//! The step barrier: a Mutex + Condvar with a generation counter (loom has no `Barrier`).
//!
//! The generation counter is what makes the barrier reusable: a waiter sleeps until the
//! generation it arrived in has ended, not until a count reaches some value. Waiting on the count
//! instead loses wake-ups: a fast thread that leaves and re-arrives at the next use bumps the
//! count before a slow waiter has re-checked it, and the slow waiter sleeps forever (the
//! `BarrierWithoutGeneration` fault variant reproduces exactly that for the model checkers).
//!
//! The barrier can be poisoned: a worker that dies (or a coordinator that gives up) poisons it,
//! which wakes every waiter with `Err`, so no thread is left hanging.

use crate::sync::{Backend, MutexApi};

/// Returned by [`Barrier::wait`] once the barrier is poisoned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Poisoned;

#[derive(Debug)]
struct State {
    arrived: usize,
    generation: u64,
    poisoned: bool,
}

/// A reusable barrier for a fixed number of parties.
pub struct Barrier<B: Backend> {
    parties: usize,
    state: B::Mutex<State>,
    cv: B::Condvar,
    /// The deliberately broken variant (see [`Barrier::new_without_generation`]).
    broken: bool,
}

impl<B: Backend> Barrier<B> {
    pub fn new(parties: usize) -> Self {
        assert!(parties > 0, "a barrier needs at least one party");
        Barrier {
            parties,
            state: B::Mutex::new(State { arrived: 0, generation: 0, poisoned: false }),
            cv: B::condvar(),
            broken: false,
        }
    }

    /// The deliberately broken variant that waits on the arrival count instead of the
    /// generation; only for the model checkers' "the checker finds this bug" tests. Compiled
    /// into every build, so that enabling a checker feature never changes the binary.
    #[doc(hidden)]
    pub fn new_without_generation(parties: usize) -> Self {
        Barrier { broken: true, ..Self::new(parties) }
    }

    pub fn parties(&self) -> usize {
        self.parties
    }

    /// Blocks until all parties have arrived in the current generation. Returns `Ok(true)` for
    /// exactly one party (the last to arrive), `Err` if the barrier is or becomes poisoned.
    pub fn wait(&self) -> Result<bool, Poisoned> {
        if self.broken {
            return self.wait_without_generation();
        }
        let parties = self.parties;
        // One critical section per arrival: the first evaluation of the wait condition is the
        // arrival itself (fewer lock round trips, and fewer interleavings for the checkers).
        let arrival: std::cell::Cell<Option<Result<Option<u64>, Poisoned>>> = std::cell::Cell::new(None);
        B::wait_while(
            &self.state,
            &self.cv,
            |s| {
                let a = arrival.get().unwrap_or_else(|| {
                    if s.poisoned {
                        return Err(Poisoned);
                    }
                    s.arrived += 1;
                    if s.arrived == parties {
                        s.arrived = 0;
                        s.generation = s.generation.wrapping_add(1);
                        Ok(None)
                    } else {
                        Ok(Some(s.generation))
                    }
                });
                arrival.set(Some(a));
                matches!(a, Ok(Some(gen)) if s.generation == gen && !s.poisoned)
            },
            |s| match arrival.get().expect("the condition ran") {
                Err(Poisoned) => Err(Poisoned),
                Ok(None) => {
                    B::notify_all(&self.cv);
                    Ok(true)
                }
                Ok(Some(gen)) if s.generation != gen => Ok(false),
                Ok(Some(_)) => Err(Poisoned),
            },
        )
    }

    fn wait_without_generation(&self) -> Result<bool, Poisoned> {
        let parties = self.parties;
        let last = self.state.with(|s| {
            s.arrived += 1;
            if s.arrived == parties {
                s.arrived = 0;
                true
            } else {
                false
            }
        });
        if last {
            B::notify_all(&self.cv);
            return Ok(true);
        }
        // BUG (deliberate): "the barrier is open once the count has been reset" cannot tell this
        // use of the barrier from the next one.
        B::wait_while(&self.state, &self.cv, |s| s.arrived != 0 && !s.poisoned, |_| Ok(false))
    }

    /// Wakes every waiter with `Err` and makes every later `wait` fail.
    pub fn poison(&self) {
        self.state.with(|s| s.poisoned = true);
        B::notify_all(&self.cv);
    }

    pub fn is_poisoned(&self) -> bool {
        self.state.with(|s| s.poisoned)
    }
}
