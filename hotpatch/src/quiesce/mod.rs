//! Quiescence: threads switch from the old to the new implementations of
//! a patch as a whole, each at its own safepoint. No thread waits for
//! another; the patcher polls.
//!
//! The shared-state protocol is in [`protocol`] (model-checked with loom);
//! this module holds the per-thread side (registration, safepoints,
//! offline) and the patcher's side ([`switch`]).

pub(crate) mod protocol;
pub(crate) mod requests;

use std::cell::{Cell, RefCell};
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::abi::Entry;
use crate::request::StalledRequest;
use crate::slot::{self, FnAddr};
use protocol::{Choice, Epoch, Record, UNREGISTERED};
use requests::{Requests, Ticket};

/// The in-flight request scopes (`hotpatch::request`).
pub(crate) static REQUESTS: Requests = Requests::new();

/// The request cell of a thread polling no request scope: never a
/// universe (those count up from 0 and `UNREGISTERED` is `u64::MAX`).
pub(crate) const NO_REQUEST: u64 = u64::MAX - 1;

/// The universe registered threads move to.
pub(crate) static EPOCH: Epoch = Epoch::new(0);

/// Universes handed out so far (only the patcher, under the transition
/// lock, takes new ones).
static UNIVERSES: AtomicU64 = AtomicU64::new(0);

fn next_universe() -> u64 {
    // Relaxed: only uniqueness matters; publication is by `EPOCH`.
    UNIVERSES.fetch_add(1, Ordering::Relaxed) + 1
}

/// The registered threads.
static THREADS: Mutex<Vec<Arc<ThreadRecord>>> = Mutex::new(Vec::new());

/// Ids of registered threads, for reports.
static THREAD_IDS: AtomicU64 = AtomicU64::new(0);

pub(crate) struct ThreadRecord {
    pub(crate) id: u64,
    pub(crate) name: Option<String>,
    pub(crate) os_tid: i64,
    pub(crate) record: Record,
}

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

/// What a completed transition waited for: the registered threads not
/// yet at a safepoint when it was published, by name and kernel tid.
/// [`switch`] returns it; the control endpoint's events say it.
#[derive(Clone, Debug, Default)]
// Read by the control endpoint only (feature `control`).
#[cfg_attr(not(feature = "control"), allow(dead_code))]
pub(crate) struct TransitionReport {
    /// Registered threads when it was published (0: a direct swap).
    pub registered: usize,
    pub threads: Vec<(Option<String>, i64)>,
    /// In-flight request scopes not yet in the new universe when it was
    /// published.
    pub requests: usize,
    /// From the start of the transition until every thread had switched.
    pub took: Duration,
}

impl TransitionReport {
    /// Counts the transition in the metrics and returns it.
    fn recorded(self) -> Self {
        crate::metrics::transition(self.took, self.threads.len(), self.requests);
        self
    }
}

struct Registration {
    record: Arc<ThreadRecord>,
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

fn unregister(record: &Arc<ThreadRecord>) {
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
        let record = Arc::new(ThreadRecord {
            // Relaxed: only uniqueness matters.
            id: THREAD_IDS.fetch_add(1, Ordering::Relaxed) + 1,
            name: thread.name().map(str::to_owned),
            // SAFETY: gettid has no preconditions.
            os_tid: i64::from(unsafe { libc::gettid() }),
            record: Record::new(target),
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

/// A registered thread that did not reach a safepoint in time.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StalledThread {
    /// The runtime's id for the registered thread.
    pub id: u64,
    /// The thread's name, if it has one.
    pub name: Option<String>,
    /// The kernel's thread id (as in `top -H`, `gdb`).
    pub os_tid: i64,
    /// How long it has gone without a safepoint, at least: it passed none
    /// since the transition began.
    pub without_safepoint: Duration,
}

impl std::fmt::Display for StalledThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "thread {} '{}' (tid {}) without a safepoint for {:?}",
            self.id,
            self.name.as_deref().unwrap_or("<unnamed>"),
            self.os_tid,
            self.without_safepoint
        )
    }
}

/// One function's switch.
pub(crate) struct Change {
    pub entry: &'static Entry,
    pub old: FnAddr,
    pub new: FnAddr,
}

/// The transition in progress, for reports.
pub(crate) struct Progress {
    pub what: String,
    pub functions: Vec<&'static str>,
    pub started: Instant,
    /// The universe threads are moving to, and whether this is a reversal.
    pub target: u64,
    pub reversing: bool,
    /// The transition's own universe (while reversing, `target` is the
    /// reversal's): requests in it run the new code.
    pub universe: u64,
}

pub(crate) static PROGRESS: Mutex<Option<Progress>> = Mutex::new(None);

/// What is being applied or reverted right now, and who it waits for.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct TransitionInfo {
    /// `apply patch #3 (name)`, `revert patch #3 (name)`.
    pub what: String,
    pub functions: Vec<&'static str>,
    pub elapsed: Duration,
    /// True once the deadline passed and threads are moving back.
    pub reversing: bool,
    /// Registered threads that have not switched yet.
    pub waiting_for: Vec<StalledThread>,
    /// In-flight request scopes ([`request`](crate::request)) it waits
    /// for, by where they were created: those that started on the old
    /// version, or, once reversing, those that started on the new one.
    pub waiting_for_requests: Vec<StalledRequest>,
}

/// The transition in progress, if any.
pub(crate) fn transition() -> Option<TransitionInfo> {
    let progress = PROGRESS.lock();
    let p = progress.as_ref()?;
    let elapsed = p.started.elapsed();
    let waiting_for = not_arrived(p.target, elapsed);
    let (universe, reversing) = (p.universe, p.reversing);
    let waiting_for_requests = waiting_requests(universe, reversing);
    Some(TransitionInfo {
        what: p.what.clone(),
        functions: p.functions.clone(),
        elapsed,
        reversing,
        waiting_for,
        waiting_for_requests,
    })
}

/// The requests a transition to `universe` waits for: those outside it,
/// or, reversing, those in it.
fn waiting_requests(universe: u64, reversing: bool) -> Vec<StalledRequest> {
    REQUESTS
        .report(Instant::now(), |u| (u == universe) == reversing)
        .into_iter()
        .map(StalledRequest::from)
        .collect()
}

/// What a transition that timed out waited for.
#[derive(Debug, Default)]
pub(crate) struct Stalled {
    pub threads: Vec<StalledThread>,
    pub requests: Vec<StalledRequest>,
}

impl Stalled {
    pub(crate) fn into_error(self, what: String, deadline: Duration) -> crate::Error {
        crate::Error::Timeout {
            what,
            deadline,
            stalled: self.threads,
            requests: self.requests,
        }
    }
}

fn stalled(t: &ThreadRecord, elapsed: Duration) -> StalledThread {
    StalledThread {
        id: t.id,
        name: t.name.clone(),
        os_tid: t.os_tid,
        without_safepoint: elapsed,
    }
}

/// Serialises transitions: one at a time. A `bool` and a condvar rather
/// than a guard, because a reversal that outlives its deadline is
/// finished by a background thread, which releases it.
static BUSY: Mutex<bool> = Mutex::new(false);
static IDLE: Condvar = Condvar::new();

/// Ownership of the transition lock.
pub(crate) struct Turn(());

impl Drop for Turn {
    fn drop(&mut self) {
        *BUSY.lock() = false;
        IDLE.notify_all();
    }
}

/// Waits up to `wait` for the transition lock.
pub(crate) fn take_turn(wait: Duration) -> Option<Turn> {
    let deadline = Instant::now() + wait;
    let mut busy = BUSY.lock();
    while *busy {
        if IDLE.wait_until(&mut busy, deadline).timed_out() && *busy {
            return None;
        }
    }
    *busy = true;
    Some(Turn(()))
}

/// Polls `done` until it holds or `deadline` passes. The patcher is the
/// only thread that waits.
fn poll_until(deadline: Instant, mut done: impl FnMut() -> bool) -> bool {
    let mut pause = Duration::from_micros(5);
    loop {
        if done() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        if pause < Duration::from_micros(20) {
            std::thread::yield_now();
        } else {
            std::thread::sleep(pause.min(deadline - now));
        }
        pause = (pause * 2).min(Duration::from_millis(1));
    }
}

/// If the calling thread is registered, it is at a safepoint: adopt.
fn adopt_self(target: u64) {
    let _ = REGISTRATION.try_with(|slot| {
        if let Some(reg) = slot.borrow().as_ref() {
            UNIVERSE.with(|u| u.set(target));
            reg.record.record.adopt(target);
        }
    });
}

/// Waits until every online registered thread has passed a safepoint
/// (a grace period), for reclaiming libraries. `_turn` proves no transition
/// runs meanwhile.
///
/// Request scopes are not waited for: a request that started before a
/// patch was reverted finished before the revert returned (the revert
/// waited for it), so none runs a reverted patch's code.
pub(crate) fn grace(_turn: &Turn, deadline: Duration) -> Result<(), Stalled> {
    if THREADS.lock().is_empty() {
        return Ok(());
    }
    publish_and_wait(next_universe(), Instant::now(), deadline, false).map(|_| ())
}

/// Publishes universe `t` (the calling thread, at a safepoint, adopts it)
/// and waits until every online registered thread is in it, and with
/// `requests` every in-flight request scope too; past `started +
/// deadline`, returns those that are not. What it waited for is counted in
/// the metrics and returned.
fn publish_and_wait(
    t: u64,
    started: Instant,
    deadline: Duration,
    requests: bool,
) -> Result<TransitionReport, Stalled> {
    EPOCH.publish(t);
    adopt_self(t);
    // Off the call path: one scan of the registered threads per transition.
    let (registered, waiting): (usize, Vec<_>) = {
        let threads = THREADS.lock();
        let waiting = threads
            .iter()
            .filter(|r| !r.record.arrived(t))
            .map(|r| (r.name.clone(), r.os_tid))
            .collect();
        (threads.len(), waiting)
    };
    // Counted for the metrics; one scan of the shards per transition.
    let requests_waited: usize = if requests {
        REQUESTS
            .report(Instant::now(), |u| u != t)
            .iter()
            .map(|w| w.count)
            .sum()
    } else {
        0
    };
    // Threads first: a request scan takes every shard's lock.
    let done = || all_arrived(t) && (!requests || REQUESTS.all_in(t));
    if poll_until(started + deadline, done) {
        Ok(TransitionReport {
            registered,
            threads: waiting,
            requests: requests_waited,
            took: started.elapsed(),
        }
        .recorded())
    } else {
        Err(Stalled {
            threads: not_arrived(t, started.elapsed()),
            requests: if requests {
                waiting_requests(t, false)
            } else {
                Vec::new()
            },
        })
    }
}

fn all_arrived(universe: u64) -> bool {
    THREADS.lock().iter().all(|r| r.record.arrived(universe))
}

/// The online registered threads not yet in `universe`.
fn not_arrived(universe: u64, elapsed: Duration) -> Vec<StalledThread> {
    THREADS
        .lock()
        .iter()
        .filter(|r| !r.record.arrived(universe))
        .map(|r| stalled(r, elapsed))
        .collect()
}

fn all_left(universe: u64) -> bool {
    THREADS.lock().iter().all(|r| r.record.left(universe))
}

fn restore(changes: &[Change]) {
    {
        let _window = reopen(changes);
        for c in changes {
            c.entry.slot.set(c.old);
        }
    }
    *PROGRESS.lock() = None;
}

/// The write window on the slots of `changes`.
fn window(changes: &[Change]) -> std::io::Result<crate::window::Window<'static, slot::Mprotect>> {
    slot::write_window(changes.iter().map(|c| c.entry.slot))
}

/// A write window for a later step of a transition whose dispatchers are
/// installed: it must not fail half-way, so it retries. Making pages
/// writable again that were writable a moment ago fails only when the
/// kernel cannot split the mapping (the process is at its limit of
/// mappings); the dispatchers stay correct meanwhile.
fn reopen(changes: &[Change]) -> crate::window::Window<'static, slot::Mprotect> {
    let mut reported = false;
    loop {
        match window(changes) {
            Ok(w) => return w,
            Err(e) => {
                if !reported {
                    reported = true;
                    #[cfg(feature = "control")]
                    tracing::error!(
                        "hotpatch: cannot make the slot table writable to finish a transition \
                         ({e}); retrying (calls stay correct through the dispatchers)"
                    );
                    #[cfg(not(feature = "control"))]
                    let _ = e;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

/// Why a switch failed.
pub(crate) enum Failed {
    /// The deadline passed: reversed (see [`switch`]).
    Stalled(Stalled),
    /// The slot table could not be made writable: nothing changed.
    SlotTable(std::io::Error),
}

impl Failed {
    pub(crate) fn into_error(self, what: String, deadline: Duration) -> crate::Error {
        match self {
            Failed::Stalled(s) => s.into_error(what, deadline),
            Failed::SlotTable(source) => crate::Error::SlotTable { what, source },
        }
    }
}

/// Moves every function of `changes` from `old` to `new`: all at once for
/// each registered thread, at its safepoint.
///
/// On success the slots point straight at `new` and the turn is handed
/// back, for the caller to record the change before the next transition,
/// with what the transition waited for (`None`: `changes` was empty).
/// On timeout the transition is reversed and the threads that did not
/// arrive are returned; the slots end as they were once every thread that
/// switched has come back, which a background thread finishes (holding
/// the turn) if it takes longer than another `deadline`.
pub(crate) fn switch(
    turn: Turn,
    what: String,
    changes: Vec<Change>,
    deadline: Duration,
) -> Result<(Turn, Option<TransitionReport>), Failed> {
    if changes.is_empty() {
        return Ok((turn, None));
    }
    // The slots' pages are writable from here to the end of the first
    // step (the direct swap, or installing the dispatchers), and again
    // for each later step: never while waiting for threads.
    #[cfg(feature = "failpoints")]
    fail::fail_point!("switch::slot_table", |_| Err(Failed::SlotTable(
        std::io::Error::from_raw_os_error(libc::ENOMEM)
    )));
    let window = window(&changes).map_err(Failed::SlotTable)?;
    {
        // With no registered thread and no request scope in flight, swap
        // directly: each call is still old or new. Holding the list's lock
        // and every request shard's keeps a thread from registering, and
        // a request scope from starting, half-way through.
        let threads = THREADS.lock();
        if threads.is_empty()
            && let Some(requests) = REQUESTS.lock_empty()
        {
            for c in &changes {
                c.entry.slot.set(c.new);
            }
            drop(requests);
            // Before the metrics, which run the service's recorder.
            drop(threads);
            drop(window);
            return Ok((turn, Some(TransitionReport::default().recorded())));
        }
    }
    let started = Instant::now();
    let t = next_universe();
    for c in &changes {
        // Stored in the slot, nothing allocated (`protocol::Dispatch`); we
        // hold the turn, so we are its only writer.
        let choice = Choice {
            universe: t,
            old: c.old,
            new: c.new,
        };
        c.entry.slot.begin_transition(choice, c.entry.dispatcher);
    }
    drop(window);
    *PROGRESS.lock() = Some(Progress {
        what,
        functions: changes.iter().map(|c| c.entry.path).collect(),
        started,
        target: t,
        reversing: false,
        universe: t,
    });
    let stalled = match publish_and_wait(t, started, deadline, true) {
        Ok(report) => {
            {
                let _window = reopen(&changes);
                for c in &changes {
                    c.entry.slot.set(c.new);
                }
            }
            *PROGRESS.lock() = None;
            return Ok((turn, Some(report)));
        }
        Err(stalled) => stalled,
    };
    // Reverse: a fresh target; threads in `t` leave it at their next
    // safepoint, and dispatchers send every other thread to `old`.
    let r = next_universe();
    EPOCH.publish(r);
    adopt_self(r);
    if let Some(p) = PROGRESS.lock().as_mut() {
        p.target = r;
        p.reversing = true;
    }
    // Requests that started in `t` run the new code until they finish.
    let left = move || all_left(t) && REQUESTS.none_in(t);
    if poll_until(Instant::now() + deadline, left) {
        restore(&changes);
        drop(turn);
        return Err(Failed::Stalled(stalled));
    }
    // A thread that switched has stopped reaching safepoints too. The
    // dispatchers stay correct meanwhile; finish in the background.
    let finish = move || {
        while !left() {
            std::thread::sleep(Duration::from_millis(1));
        }
        restore(&changes);
        drop(turn);
    };
    let (tx, rx) = std::sync::mpsc::channel::<Box<dyn FnOnce() + Send>>();
    let spawned = std::thread::Builder::new()
        .name("hotpatch-reversal".into())
        .spawn(move || {
            if let Ok(job) = rx.recv() {
                job();
            }
        });
    match spawned {
        Ok(_) => {
            let _ = tx.send(Box::new(finish));
        }
        // No thread to spare: finish here rather than leave it undone.
        Err(_) => finish(),
    }
    Err(Failed::Stalled(stalled))
}
