//! The thread side of quiescence: registration, safepoints, going
//! offline, and the request scope a thread is in. Everything here runs on
//! the thread it is about, and never waits for another thread.

use std::cell::{Cell, RefCell};
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::in_flight::Ticket;
use super::protocol::{ThreadState, UNREGISTERED};
use super::{EPOCH, NO_REQUEST, REQUESTS, RegisteredThread, THREAD_IDS, THREADS};

thread_local! {
    /// This thread's universe; `UNREGISTERED` if it is not registered.
    /// Const-initialised and without a destructor, so reading it is one
    /// `fs`-relative load.
    static UNIVERSE: Cell<u64> = const { Cell::new(UNREGISTERED) };

    /// Keeps this thread's record and unregisters it when the thread
    /// exits without dropping its guard.
    static REGISTRATION: RefCell<Option<Registration>> = const { RefCell::new(None) };

    /// The universe of the request scope this thread is polling, or
    /// `NO_REQUEST`: dispatchers pick by it before the thread's own.
    /// Const-initialised, no destructor: entering a scoped poll is one
    /// `fs`-relative load and store, leaving it one store.
    static REQUEST: Cell<u64> = const { Cell::new(NO_REQUEST) };

    /// The shard of `REQUESTS` this thread starts requests in; 0 until
    /// assigned, then the shard plus one.
    static SHARD: Cell<usize> = const { Cell::new(0) };
}

struct Registration {
    record: Arc<RegisteredThread>,
    /// Nesting: `register_thread` called again on a registered thread.
    depth: usize,
    /// Nesting of `offline`.
    offline: usize,
}

impl Drop for Registration {
    fn drop(&mut self) {
        unregister(&self.record);
        // The thread-local may already be destroyed at thread exit.
        let _ = UNIVERSE.try_with(|u| u.set(UNREGISTERED));
    }
}

fn unregister(record: &Arc<RegisteredThread>) {
    THREADS.lock().retain(|r| !Arc::ptr_eq(r, record));
}

/// The universe a dispatcher picks by on this thread: the request
/// scope's being polled, if any, else the thread's own.
#[inline(always)]
pub(crate) fn local_universe() -> u64 {
    match REQUEST.try_with(Cell::get) {
        Ok(r) if r != NO_REQUEST => r,
        _ => thread_universe(),
    }
}

/// This thread's own universe (what safepoints move).
#[inline(always)]
fn thread_universe() -> u64 {
    // During thread exit (a thread-local destructor calling a patchable
    // function) the cell may be gone: the thread is then unregistered.
    UNIVERSE.try_with(Cell::get).unwrap_or(UNREGISTERED)
}

/// The universe of the request scope being polled on this thread, if any.
#[inline]
pub(crate) fn current_request() -> Option<u64> {
    REQUEST
        .try_with(Cell::get)
        .ok()
        .filter(|&r| r != NO_REQUEST)
}

/// Makes `universe` this thread's request view until the returned value
/// is passed to [`leave`]; returns the previous view.
#[inline(always)]
pub(crate) fn enter(universe: u64) -> u64 {
    REQUEST.with(|r| r.replace(universe))
}

/// Restores the request view [`enter`] returned.
#[inline(always)]
pub(crate) fn leave(previous: u64) {
    // `try_with`: a scope dropped by a thread-local destructor at thread
    // exit may outlive the cell.
    let _ = REQUEST.try_with(|r| r.set(previous));
}

fn shard() -> usize {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    SHARD
        .try_with(|s| {
            if s.get() == 0 {
                // Relaxed: only spreading threads over shards matters.
                s.set(NEXT.fetch_add(1, Ordering::Relaxed) as usize + 1);
            }
            s.get() - 1
        })
        .unwrap_or(0)
}

/// Registers a request starting now on this thread: in the version of the
/// request scope being polled here if there is one (nested, carried),
/// else in the newest. Returns where it is, and its universe.
pub(crate) fn start_request(location: &'static std::panic::Location<'static>) -> (Ticket, u64) {
    match current_request() {
        // The enclosing scope's entry stays registered while it is being
        // polled here (see `requests`).
        Some(u) => (REQUESTS.start_in(shard(), u, location), u),
        None => REQUESTS.start(shard(), &EPOCH, location),
    }
}

/// Registers another request in `universe`, whose entry (the caller's)
/// is registered now.
pub(crate) fn start_request_in(
    universe: u64,
    location: &'static std::panic::Location<'static>,
) -> Ticket {
    REQUESTS.start_in(shard(), universe, location)
}

pub(crate) fn finish_request(ticket: Ticket) {
    REQUESTS.finish(ticket);
}

/// Registers the calling thread with the runtime until the guard drops
/// (or the thread exits).
///
/// A registered thread runs every function of a patch in its old version
/// or every one in its new version between two calls to [`quiescent`]
/// (its *safepoints*): place one between requests. Around blocking work
/// (I/O, waiting on a channel) use [`offline`], so a patch need not wait
/// for the thread to wake up.
///
/// Calling it on a thread that is already registered returns a guard
/// that does nothing more.
///
/// # Examples
///
/// ```
/// # fn handle(_: u32) {}
/// let worker = std::thread::spawn(|| {
///     let _registered = hotpatch::register_thread();
///     for request in 0..100 {
///         handle(request); // patchable calls: all old or all new
///         hotpatch::quiescent();
///     }
/// });
/// worker.join().unwrap();
/// ```
pub fn register_thread() -> ThreadGuard {
    REGISTRATION.with(|slot| {
        let mut slot = slot.borrow_mut();
        if let Some(reg) = slot.as_mut() {
            reg.depth += 1;
            return;
        }
        let thread = std::thread::current();
        // Registering under the list's lock orders this with a patcher's
        // scan of the list (`switch`): a thread missing from a scan
        // registered after it and adopts the target published before it.
        let mut threads = THREADS.lock();
        let target = EPOCH.target();
        let record = Arc::new(RegisteredThread {
            // Relaxed: only uniqueness matters.
            id: THREAD_IDS.fetch_add(1, Ordering::Relaxed) + 1,
            name: thread.name().map(str::to_owned),
            // SAFETY: gettid has no preconditions.
            os_tid: i64::from(unsafe { libc::gettid() }),
            record: ThreadState::new(target),
        });
        threads.push(record.clone());
        drop(threads);
        UNIVERSE.with(|u| u.set(target));
        *slot = Some(Registration {
            record,
            depth: 1,
            offline: 0,
        });
    });
    ThreadGuard {
        _not_send: PhantomData,
    }
}

/// Keeps the thread registered; see [`register_thread`].
#[derive(Debug)]
#[must_use = "the thread is unregistered when the guard drops"]
pub struct ThreadGuard {
    _not_send: PhantomData<*const ()>,
}

impl Drop for ThreadGuard {
    fn drop(&mut self) {
        let _ = REGISTRATION.try_with(|slot| {
            let mut slot = slot.borrow_mut();
            if let Some(reg) = slot.as_mut() {
                reg.depth -= 1;
                if reg.depth == 0 {
                    *slot = None; // Registration::drop unregisters.
                }
            }
        });
    }
}

/// Marks a safepoint of the calling thread: if a patch is being applied
/// or reverted, the thread switches to the new implementations here, all
/// at once.
///
/// With no transition in progress this is one load of a shared word and
/// one of a thread-local, and writes nothing. On an unregistered thread it
/// does nothing.
///
/// # Examples
///
/// ```
/// let _registered = hotpatch::register_thread();
/// loop {
///     // ... serve one request ...
///     hotpatch::quiescent();
/// #   break;
/// }
/// ```
#[inline]
pub fn quiescent() {
    let target = EPOCH.target();
    let local = thread_universe();
    if local != target && local != UNREGISTERED {
        adopt(target);
    }
}

#[cold]
fn adopt(target: u64) {
    REGISTRATION.with(|slot| {
        if let Some(reg) = slot.borrow().as_ref() {
            if reg.offline > 0 {
                return; // Offline threads adopt when they come back.
            }
            let adopted = reg.record.record.adopt_latest(&EPOCH, target);
            UNIVERSE.with(|u| u.set(adopted));
        }
    });
}

/// Marks the calling thread as being at a safepoint until the guard
/// drops: use around blocking work. Patchable calls made while offline
/// may see any version. On an unregistered thread it does nothing.
///
/// # Examples
///
/// ```
/// let (tx, rx) = std::sync::mpsc::channel::<u32>();
/// tx.send(1).unwrap();
/// let _registered = hotpatch::register_thread();
/// let job = {
///     let _offline = hotpatch::offline();
///     rx.recv().unwrap() // a patch need not wait while we block here
/// };
/// # assert_eq!(job, 1);
/// ```
pub fn offline() -> OfflineGuard {
    REGISTRATION.with(|slot| {
        if let Some(reg) = slot.borrow_mut().as_mut() {
            reg.offline += 1;
            if reg.offline == 1 {
                reg.record.record.go_offline();
            }
        }
    });
    OfflineGuard {
        _not_send: PhantomData,
    }
}

/// Runs `f` with the calling thread offline (see [`offline`]).
///
/// # Examples
///
/// ```
/// let _registered = hotpatch::register_thread();
/// let line = hotpatch::while_offline(|| std::thread::sleep(std::time::Duration::from_millis(1)));
/// ```
pub fn while_offline<R>(f: impl FnOnce() -> R) -> R {
    let _offline = offline();
    f()
}

/// The thread is offline until this drops; see [`offline`].
#[derive(Debug)]
#[must_use = "the thread comes back online when the guard drops"]
pub struct OfflineGuard {
    _not_send: PhantomData<*const ()>,
}

impl Drop for OfflineGuard {
    fn drop(&mut self) {
        let _ = REGISTRATION.try_with(|slot| {
            if let Some(reg) = slot.borrow_mut().as_mut() {
                reg.offline -= 1;
                if reg.offline == 0 {
                    let target = reg.record.record.go_online(&EPOCH);
                    UNIVERSE.with(|u| u.set(target));
                }
            }
        });
    }
}

/// If the calling thread is registered, it is at a safepoint: adopt.
pub(super) fn adopt_self(target: u64) {
    let _ = REGISTRATION.try_with(|slot| {
        if let Some(reg) = slot.borrow().as_ref() {
            UNIVERSE.with(|u| u.set(target));
            reg.record.record.adopt(target);
        }
    });
}
