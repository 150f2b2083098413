//! The transition protocol's shared state, on its own so that `loom` can
//! model-check exactly this code (`tests/loom.rs` includes this file with
//! `--cfg hotpatch_loom`, which swaps in loom's atomics).
//!
//! # The protocol
//!
//! Every registered thread is in a *universe* (a number). A transition
//! from an old set of implementations to a new one gets a fresh universe
//! `t`:
//!
//! 1. the patcher stores, per function, a [`Choice`] `{t, old, new}` and
//!    points the function's slot at its dispatcher;
//! 2. it publishes `t` as the [`Epoch`] target;
//! 3. each registered thread adopts the target at its next safepoint (or
//!    at once when it is offline, or when it comes back online);
//! 4. a dispatcher runs `new` for a thread in universe `t` (or an
//!    unregistered thread), `old` for any other: a thread's universe only
//!    changes at safepoints, so between two safepoints every function of
//!    the transition is old, or every one is new;
//! 5. once every online registered thread is in `t`, the slots point
//!    straight at `new` again.
//!
//! Reversal (deadline passed) publishes a fresh target `r`: threads that
//! reached `t` leave it at their next safepoint, and once none is in `t`
//! the slots point straight at `old`.
//!
//! Orderings: the target is stored `SeqCst` and a thread's `online` flag
//! is stored and loaded `SeqCst`, so a thread coming online and a patcher
//! publishing a target cannot both miss each other (the patcher sees the
//! thread online and waits for it, or the thread sees the new target and
//! adopts it before running anything). A thread reads the target with
//! `Acquire`, which pairs with that store: having adopted `t`, it sees the
//! dispatchers installed before `t` was published.
//!
//! Adoption is revalidated ([`ThreadState::adopt_latest`]): a thread stores its
//! universe, issues a `SeqCst` fence and reads the target again, adopting
//! until it stays the same; [`Epoch::publish`] issues a `SeqCst` fence
//! after its store. Without this, a thread that read target `t` at a
//! safepoint but had not yet stored it could be counted as having *left*
//! `t` by a reversal (its universe still read as older), which then points
//! slots back at the old code while the thread enters `t` and calls a
//! dispatcher: a mixed request (found by the loom model, reproduced by a
//! stress run with a zero deadline). With the two fences one side sees the
//! other's store: the patcher waits for the thread, or the thread adopts
//! the reversal's target before its next call.
//!
//! # Where a choice lives
//!
//! A slot's choice is stored in the slot itself ([`Dispatch`]), not in a
//! record of its own: nothing is allocated per transition, so nothing has
//! to be freed, and no grace period has to cover the threads that might
//! still read a record (unregistered threads run dispatchers too, and no
//! grace period waits for them). The price is that a dispatcher may read
//! a *later* transition's choice than the one whose dispatcher it
//! entered: it loaded `current` (the dispatcher) during transition `t`,
//! was descheduled while `t` finished and `t'` began, and reads `t'`'s
//! choice. That answer is still right, because transitions of one slot
//! are serialised and `t'` began from the state `t` left: its `old` is
//! what a thread outside `t'`'s universe runs, and a registered online
//! thread is outside it (it is inside a call, so it has not adopted
//! `t'`). What must not happen is a *torn* read, the universe of one
//! choice with the implementations of another (a thread in `t` would
//! then run `t'`'s `new`, which is `t`'s `old`, next to `t`'s `new`
//! elsewhere). [`Dispatch`] rules that out with a sequence number and two
//! buffers: a reader retries if a writer began overwriting the buffer it
//! read, and never waits for a writer.

#[cfg(hotpatch_loom)]
use loom::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering, fence};
#[cfg(not(hotpatch_loom))]
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering, fence};

/// The universe of a thread that is not registered: it always runs the
/// newest implementation.
pub const UNREGISTERED: u64 = u64::MAX;

/// The universe registered threads move to at their next safepoint.
#[derive(Debug)]
pub struct Epoch {
    target: AtomicU64,
}

impl Epoch {
    #[cfg(not(hotpatch_loom))]
    pub const fn new(initial: u64) -> Self {
        Epoch {
            target: AtomicU64::new(initial),
        }
    }

    #[cfg(hotpatch_loom)]
    pub fn new(initial: u64) -> Self {
        Epoch {
            target: AtomicU64::new(initial),
        }
    }

    /// What a safepoint compares its universe with.
    #[inline(always)]
    pub fn target(&self) -> u64 {
        // Acquire: pairs with the SeqCst store in `publish`; a thread that
        // adopts the target sees the dispatchers installed before it.
        self.target.load(Ordering::Acquire)
    }

    /// Starts moving registered threads to `universe`.
    pub fn publish(&self, universe: u64) {
        // SeqCst: totally ordered with `ThreadState::go_online`'s SeqCst store
        // and load (see the module docs).
        self.target.store(universe, Ordering::SeqCst);
        // SeqCst fence before the patcher reads any record: pairs with the
        // fence in `ThreadState::adopt_latest`.
        fence(Ordering::SeqCst);
    }
}

/// The part of a registered thread's state the patcher reads.
#[derive(Debug)]
pub struct ThreadState {
    universe: AtomicU64,
    online: AtomicBool,
}

impl ThreadState {
    /// A record for a thread that registers now, in universe `universe`.
    pub fn new(universe: u64) -> Self {
        ThreadState {
            universe: AtomicU64::new(universe),
            online: AtomicBool::new(true),
        }
    }

    /// Called by the thread itself at a safepoint.
    pub fn adopt(&self, universe: u64) {
        // Release: the patcher's Acquire in `arrived`/`left` sees that the
        // thread finished everything it ran in the previous universe.
        self.universe.store(universe, Ordering::Release);
    }

    /// Called by the thread itself at a safepoint, having read `target`:
    /// adopts it, then makes sure no newer target was published meanwhile
    /// (see the module docs). Returns the universe adopted.
    pub fn adopt_latest(&self, epoch: &Epoch, mut target: u64) -> u64 {
        loop {
            self.adopt(target);
            // SeqCst fence between our store and the re-read: pairs with the
            // one in `Epoch::publish`.
            fence(Ordering::SeqCst);
            let again = epoch.target();
            if again == target {
                return target;
            }
            target = again;
        }
    }

    /// Called by the thread itself before blocking work.
    pub fn go_offline(&self) {
        // SeqCst: see `go_online`.
        self.online.store(false, Ordering::SeqCst);
    }

    /// Called by the thread itself after blocking work: it is at a
    /// safepoint, so it adopts the current target. Returns it.
    pub fn go_online(&self, epoch: &Epoch) -> u64 {
        // SeqCst store then SeqCst load, against the patcher's SeqCst
        // publish then SeqCst load of `online`: one of the two sees the
        // other.
        self.online.store(true, Ordering::SeqCst);
        let target = epoch.target.load(Ordering::SeqCst);
        self.adopt_latest(epoch, target)
    }

    pub fn is_online(&self) -> bool {
        // SeqCst: see `go_online`.
        self.online.load(Ordering::SeqCst)
    }

    pub fn universe(&self) -> u64 {
        // Acquire: pairs with the Release in `adopt`.
        self.universe.load(Ordering::Acquire)
    }

    /// Patcher: is the thread done with everything before `target`?
    pub fn arrived(&self, target: u64) -> bool {
        !self.is_online() || self.universe() == target
    }

    /// Patcher: has the thread left universe `universe` (reversal)?
    pub fn left(&self, universe: u64) -> bool {
        !self.is_online() || self.universe() != universe
    }
}

/// One function's two implementations during a transition to `universe`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Choice<P> {
    pub universe: u64,
    pub old: P,
    pub new: P,
}

impl<P: Copy> Choice<P> {
    /// The implementation a thread in `local` runs.
    #[inline(always)]
    pub fn pick(&self, local: u64) -> P {
        if local == UNREGISTERED || local == self.universe {
            self.new
        } else {
            self.old
        }
    }
}

/// A slot's current [`Choice`], stored in place (see the module docs).
///
/// Two buffers and a sequence number: the choice stored by the `n`th
/// [`store`](Dispatch::store) is in buffer `n % 2`, and `seq` is `n`. One
/// writer at a time (the patcher, holding the transition turn); any number
/// of readers, which never wait for the writer and retry only when a
/// store into the buffer they read began meanwhile. Nothing here is on the
/// ordinary call path: only dispatchers read it.
#[derive(Debug)]
pub struct Dispatch {
    seq: AtomicU64,
    buffers: [Buffer; 2],
}

#[derive(Debug)]
struct Buffer {
    universe: AtomicU64,
    old: AtomicPtr<()>,
    new: AtomicPtr<()>,
}

impl Buffer {
    #[cfg(not(hotpatch_loom))]
    const fn new() -> Self {
        Buffer {
            universe: AtomicU64::new(0),
            old: AtomicPtr::new(std::ptr::null_mut()),
            new: AtomicPtr::new(std::ptr::null_mut()),
        }
    }

    #[cfg(hotpatch_loom)]
    fn new() -> Self {
        Buffer {
            universe: AtomicU64::new(0),
            old: AtomicPtr::new(std::ptr::null_mut()),
            new: AtomicPtr::new(std::ptr::null_mut()),
        }
    }
}

impl Default for Dispatch {
    fn default() -> Self {
        Dispatch::new()
    }
}

impl Dispatch {
    /// No choice yet: [`load`](Dispatch::load) is only called once one was
    /// stored.
    #[cfg(not(hotpatch_loom))]
    pub const fn new() -> Self {
        Dispatch {
            seq: AtomicU64::new(0),
            buffers: [Buffer::new(), Buffer::new()],
        }
    }

    #[cfg(hotpatch_loom)]
    pub fn new() -> Self {
        Dispatch {
            seq: AtomicU64::new(0),
            buffers: [Buffer::new(), Buffer::new()],
        }
    }

    /// Patcher: makes `choice` the current one. Only one thread stores at
    /// a time (the transition turn serialises them).
    pub fn store(&self, choice: Choice<*mut ()>) {
        // Relaxed: only the patcher writes `seq`, under the turn, whose
        // lock orders this load after the previous store.
        let next = self.seq.load(Ordering::Relaxed) + 1;
        let buffer = &self.buffers[(next % 2) as usize];
        // Release fence before overwriting the buffer: a reader whose
        // loads below see any of the new values has its Acquire fence in
        // `load` synchronise with this one, so it then sees `seq` at
        // `next - 1` at least and retries if it read `seq` older than that
        // (it was reading this buffer's previous contents).
        fence(Ordering::Release);
        // Relaxed (three stores): published by the Release store of `seq`
        // and fenced against readers by the fence above.
        buffer.universe.store(choice.universe, Ordering::Relaxed);
        buffer.old.store(choice.old, Ordering::Relaxed);
        buffer.new.store(choice.new, Ordering::Relaxed);
        // Release: pairs with the Acquire load of `seq` in `load`; a reader
        // that sees `next` sees the buffer's new contents.
        self.seq.store(next, Ordering::Release);
    }

    /// Dispatcher: the current choice, never torn (all three fields from
    /// the same `store`).
    #[inline]
    pub fn load(&self) -> Choice<*mut ()> {
        loop {
            // Acquire: pairs with the Release store of `seq` in `store`.
            let seq = self.seq.load(Ordering::Acquire);
            let buffer = &self.buffers[(seq % 2) as usize];
            let choice = Choice {
                // Relaxed (three loads): ordered by the Acquire above and
                // the fence below.
                universe: buffer.universe.load(Ordering::Relaxed),
                old: buffer.old.load(Ordering::Relaxed),
                new: buffer.new.load(Ordering::Relaxed),
            };
            // Acquire fence: pairs with the Release fence in `store`, so if
            // a store into this buffer has begun, the re-read below sees
            // `seq` moved on.
            fence(Ordering::Acquire);
            // Relaxed: ordered after the buffer's loads by the fence above.
            if self.seq.load(Ordering::Relaxed) == seq {
                return choice;
            }
        }
    }
}
