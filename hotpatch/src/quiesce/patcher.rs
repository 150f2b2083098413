//! The patcher's side of quiescence: one transition at a time (the
//! turn), publishing a universe, polling the registered threads and the
//! in-flight request scopes, reversing on the deadline, and what a
//! transition waited for.

use std::panic::Location;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::protocol::Choice;
use super::thread::adopt_self;
use super::{EPOCH, REQUESTS, RegisteredThread, THREADS, next_universe};
use crate::abi::Entry;
use crate::slot::{self, FnAddr};

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
    /// The entry writes of hooked functions around this transition (the
    /// loader adds them): installs before an apply, removals after a
    /// revert.
    pub hooks: Vec<HookWrite>,
}

/// One entry write of a hooked function (`hook`) or its removal
/// (`unhook`), for reports: how long threads were kept from running, or
/// why the write could not be made.
#[derive(Clone, Debug)]
#[cfg_attr(not(feature = "control"), allow(dead_code))]
pub(crate) struct HookWrite {
    pub op: &'static str,
    /// The functions whose entries this one stop wrote.
    pub functions: Vec<String>,
    /// Threads stopped (the last round) or sampled, and the longest any
    /// was kept from running (`hook::Report::pause`).
    pub threads: usize,
    pub pause: Duration,
    /// The breakpoint protocol's window (calls took the trap meanwhile;
    /// no thread was held); `None` for the stop-the-world.
    pub window: Option<Duration>,
    /// The removal failed: the entry stays redirected to the original
    /// code (what calls run).
    pub failed: Option<String>,
}

impl TransitionReport {
    /// Counts the transition in the metrics and returns it.
    fn recorded(self) -> Self {
        crate::metrics::transition(self.took, self.threads.len(), self.requests);
        self
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

/// In-flight requests a transition waited for, created at one place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StalledRequest {
    /// Where the scope was created ([`request`](crate::request), [`inherit`](crate::inherit), the layer).
    pub location: &'static Location<'static>,
    /// How many of them are in flight.
    pub count: usize,
    /// How long the oldest of them has been running.
    pub oldest: Duration,
}

impl From<super::in_flight::Waiting> for StalledRequest {
    fn from(w: super::in_flight::Waiting) -> Self {
        StalledRequest {
            location: w.location,
            count: w.count,
            oldest: w.oldest,
        }
    }
}

impl std::fmt::Display for StalledRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} request(s) created at {}, the oldest in flight for {:?}",
            self.count, self.location, self.oldest
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

fn stalled(t: &RegisteredThread, elapsed: Duration) -> StalledThread {
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
            hooks: Vec::new(),
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

/// Why a switch failed, and the turn back if every slot is as it was
/// (`None`: a background thread finishes the reversal, holding the turn).
pub(crate) enum Failed {
    /// The deadline passed: reversed (see [`switch`]).
    Stalled(Stalled, Option<Turn>),
    /// The slot table could not be made writable: nothing changed.
    SlotTable(std::io::Error, Option<Turn>),
}

impl Failed {
    /// The turn, if the slots are as they were and the caller holds it
    /// again (to undo what it did before the switch).
    pub(crate) fn take_turn(&mut self) -> Option<Turn> {
        match self {
            Failed::Stalled(_, turn) | Failed::SlotTable(_, turn) => turn.take(),
        }
    }

    pub(crate) fn into_error(self, what: String, deadline: Duration) -> crate::Error {
        match self {
            Failed::Stalled(s, _) => s.into_error(what, deadline),
            Failed::SlotTable(source, _) => crate::Error::SlotTable { what, source },
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
    if fail::eval("switch::slot_table", |_| ()).is_some() {
        return Err(Failed::SlotTable(
            std::io::Error::from_raw_os_error(libc::ENOMEM),
            Some(turn),
        ));
    }
    let window = match window(&changes) {
        Ok(w) => w,
        Err(e) => return Err(Failed::SlotTable(e, Some(turn))),
    };
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
        return Err(Failed::Stalled(stalled, Some(turn)));
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
    Err(Failed::Stalled(stalled, None))
}
