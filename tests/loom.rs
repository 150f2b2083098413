//! Model check of the transition protocol with loom.
//!
//! Run it with `.ci/loom`, which compiles this file (and only this file)
//! with `--cfg hotpatch_loom`; without that cfg it compiles to nothing.
//!
//! The shared state is the real code: `hotpatch/src/quiesce/protocol.rs`
//! (`Epoch`, `ThreadState`, `Choice`) is included below and uses loom's atomics
//! under the cfg. Around it the model mirrors, step by step:
//!
//! - a slot (`slot.rs`): `current` holds the implementation (`V1`, `V2`,
//!   or `DISPATCH`), `dispatch` the transition's `Choice`, stored in place
//!   by the real `protocol::Dispatch` (two buffers and a sequence number,
//!   reused by every transition); the choice is stored, then `current`
//!   Release; a call loads `current` Acquire and, for `DISPATCH`, loads the
//!   choice with `Dispatch::load`;
//! - a registered thread (`quiesce/mod.rs`): its universe, `quiescent()`
//!   (load the target, adopt it if different and online), `offline()` and
//!   coming back online, and one request = call `f`, call `g`;
//! - the patcher (`quiesce::switch`): install the choices and dispatchers,
//!   publish the target, poll until every record has `arrived` (loom:
//!   spinning with `yield_now`, bounded when a deadline is modelled), then
//!   point the slots at the new version; on the deadline, publish a fresh
//!   target, poll until every record has `left`, point the slots back.
//!
//! Checked on every explored execution:
//!
//! - a request of an online registered thread runs `f` and `g` of the same
//!   version, and exactly the version its universe stands for;
//! - every call runs `V1` or `V2`, and a call that starts after the
//!   patcher finished (seen through a Release/Acquire flag) runs the final
//!   version (progress: nobody runs the old code after the transition);
//! - a dispatcher never reads a choice before one was stored (it would
//!   run neither version), and no deadlock.
//!
//! Loom treats an atomic's initial value as a plain (non-`SeqCst`) store,
//! so a `SeqCst` load may read it even after a later `SeqCst` store: a
//! false alarm for the `go_online`/`publish` pair. Each model therefore
//! stores the initial target and `online` flags with the protocol's own
//! `SeqCst` operations before it starts its threads, as a registered
//! thread's life begins.
//!
//! Bounds: each test states its preemption bound (how many times the
//! scheduler may switch away from a thread that could go on); loom
//! explores every execution within it, including loads that return older
//! stores where the orderings allow. Each test prints the number of
//! executions explored and the time taken (`--nocapture`; `.ci/loom`
//! prints the total). Bound 3 with one worker, 2 with two workers or
//! more than one transition. Not covered: more than two workers or
//! functions, or three transitions; load buffering (loom never lets a
//! load return a store that another thread makes only after seeing a
//! later store of the loading thread: what the Release of
//! `ThreadState::adopt` and the Acquire of `ThreadState::universe` rule out).
//!
//! The models find real mistakes: each of the four `SeqCst` operations of
//! the `go_online`/`publish` pair weakened to Release or Acquire makes
//! `offline_worker_comes_back_during_apply` fail with a mixed request
//! (the worker misses the target and the patcher misses the worker);
//! `Epoch::target` weakened to Relaxed, or a registration that reads the
//! target before taking the list's lock, fail too. `ThreadState::adopt_latest`
//! without its fence and re-read (a plain `adopt`) makes
//! `deadline_reversal` fail with a mixed request (the race it documents).
//! `Dispatch::load` without its re-check of the sequence number makes
//! `a_slow_dispatcher_reads_a_reused_buffer` fail with a mixed request:
//! a torn choice, the universe of one transition with the
//! implementations of a later one written into the same buffer.
//!
//! Write windows on the slot table (issue 20): `hotpatch/src/window.rs`
//! is included too, and `window_two_writers_share_a_page` runs two
//! windows that share a page against each other. Closing a window without
//! its count (the first writer to finish makes the shared page read-only)
//! makes it fail with a store into a read-only page.
//!
//! Request scopes (issue 12): `hotpatch/src/quiesce/in_flight.rs` is
//! included too, and `request_scope_races_a_transition_and_its_reversal`
//! runs a request started on one thread and finished on another against
//! an apply that completes, is reversed at its deadline, or swaps
//! directly. Reading the target before taking the shard's lock, a
//! reversal that does not wait for the requests in `t`, or a direct swap
//! that releases the shards' locks before storing make it fail with a
//! mixed request.

#![cfg(hotpatch_loom)]

#[allow(dead_code)]
#[path = "../hotpatch/src/quiesce/protocol.rs"]
mod protocol;

use std::time::Instant;

use loom::sync::Mutex;
use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::thread;

use protocol::{Choice, Dispatch, Epoch, ThreadState};

/// The original implementation of `f` and `g`.
const V1: usize = 1;
/// The patch's implementation of `f` and `g`.
const V2: usize = 2;
/// The slot points at the dispatcher.
const DISPATCH: usize = 3;

// ---------------------------------------------------------------------
// A trace of one execution, printed when a check fails.

/// What happened in the current execution, in the order loom ran it.
/// Plain `std` state: loom does not model it, it only records.
#[derive(Clone, Default)]
struct Trace(std::sync::Arc<std::sync::Mutex<Vec<Event>>>);

/// Who, what, and the value read or written.
type Event = (&'static str, &'static str, u64);

impl Trace {
    fn log(&self, who: &'static str, what: &'static str, value: u64) {
        self.0.lock().unwrap().push((who, what, value));
    }

    fn clear(&self) {
        self.0.lock().unwrap().clear();
    }

    fn fail(&self, message: String) -> ! {
        let mut text = String::from("execution trace (value read or written):\n");
        for (who, what, value) in self.0.lock().unwrap().iter() {
            text.push_str(&format!("  {who:<8} {what:<34} {value}\n"));
        }
        eprintln!("{text}");
        panic!("{message}");
    }
}

// ---------------------------------------------------------------------
// The model.

/// One patchable function's slot, as in `slot.rs`.
struct Slot {
    name: &'static str,
    current: AtomicUsize,
    /// The real code; versions are stored as (never dereferenced)
    /// pointers `V1 as *mut ()`, `V2 as *mut ()`.
    dispatch: Dispatch,
}

impl Slot {
    fn new(name: &'static str) -> Self {
        Slot {
            name,
            current: AtomicUsize::new(V1),
            dispatch: Dispatch::new(),
        }
    }

    /// A call by a thread in universe `local`: the version it runs.
    fn call(&self, local: u64, trace: &Trace, who: &'static str) -> usize {
        // Acquire: as `Slot::get`.
        let current = self.current.load(Ordering::Acquire);
        trace.log(who, self.name, current as u64);
        if current != DISPATCH {
            return current;
        }
        // As `Slot::choose`.
        let choice = self.dispatch.load();
        let picked = choice.pick(local) as usize;
        trace.log(who, "  dispatcher: universe", choice.universe);
        trace.log(who, "  dispatcher picks", picked as u64);
        if picked == 0 {
            trace.fail(format!(
                "{}: dispatcher read no choice (installed before it)",
                self.name
            ));
        }
        picked
    }

    /// `Slot::begin_transition`.
    fn begin_transition(&self, choice: Choice<usize>) {
        self.dispatch.store(Choice {
            universe: choice.universe,
            old: choice.old as *mut (),
            new: choice.new as *mut (),
        });
        self.set(DISPATCH);
    }

    /// `Slot::set`.
    fn set(&self, implementation: usize) {
        // Release: pairs with the Acquire in `call`.
        self.current.store(implementation, Ordering::Release);
    }
}

/// Everything the threads of one execution share.
struct World {
    epoch: Epoch,
    /// The registered threads' records (`THREADS`); the registration
    /// model has its own, under a lock.
    records: Vec<ThreadState>,
    f: Slot,
    g: Slot,
    /// Set (Release) by the patcher once its last transition returned:
    /// the version every call that starts after it must run. 0 before.
    done: AtomicUsize,
    /// The version each universe stands for, when the model knows it.
    expect: Option<&'static [usize]>,
    trace: Trace,
}

impl World {
    fn new(workers: usize, expect: Option<&'static [usize]>, trace: &Trace) -> Self {
        trace.clear();
        let w = World {
            epoch: Epoch::new(0),
            records: (0..workers).map(|_| ThreadState::new(0)).collect(),
            f: Slot::new("call f"),
            g: Slot::new("call g"),
            done: AtomicUsize::new(0),
            expect,
            trace: trace.clone(),
        };
        // SeqCst stores of the initial values (see the module docs).
        w.epoch.publish(0);
        for r in &w.records {
            r.go_online(&w.epoch);
        }
        w
    }

    fn slots(&self) -> [&Slot; 2] {
        [&self.f, &self.g]
    }
}

/// What a worker does, in order.
#[derive(Clone, Copy, Debug)]
enum Step {
    /// One request: call `f`, then `g`.
    Request,
    /// `hotpatch::quiescent()`.
    Safepoint,
    /// `hotpatch::offline()`: the guard is created.
    Offline,
    /// The offline guard drops.
    Online,
}

/// A registered thread: its thread-local state and its record.
struct Worker<'w> {
    w: &'w World,
    record: &'w ThreadState,
    name: &'static str,
    /// The thread-local `UNIVERSE`.
    local: u64,
    offline: bool,
}

impl<'w> Worker<'w> {
    fn new(w: &'w World, index: usize) -> Self {
        Worker {
            w,
            record: &w.records[index],
            name: ["worker0", "worker1"][index],
            local: 0,
            offline: false,
        }
    }

    fn log(&self, what: &'static str, value: u64) {
        self.w.trace.log(self.name, what, value);
    }

    fn run(&mut self, steps: &[Step]) {
        for step in steps {
            match step {
                Step::Request => self.request(),
                Step::Safepoint => self.safepoint(),
                Step::Offline => self.go_offline(),
                Step::Online => self.go_online(),
            }
        }
        // Thread exit unregisters it: the patcher no longer waits for it.
        self.record.go_offline();
        self.log("exits (unregistered)", 0);
    }

    /// `quiescent()` and `adopt()`.
    fn safepoint(&mut self) {
        let target = self.w.epoch.target();
        self.log("safepoint: target", target);
        if self.local != target && !self.offline {
            self.adopt(target);
        }
    }

    fn adopt(&mut self, target: u64) {
        // The real protocol: adopt, SeqCst fence, re-read the target,
        // adopt again until it stays the same.
        let adopted = self.record.adopt_latest(&self.w.epoch, target);
        self.local = adopted;
        self.log("adopts", adopted);
    }

    fn go_offline(&mut self) {
        self.offline = true;
        self.record.go_offline();
        self.log("goes offline", 0);
    }

    fn go_online(&mut self) {
        self.offline = false;
        let target = self.record.go_online(&self.w.epoch);
        self.log("goes online: adopted", target);
        self.local = target;
    }

    fn request(&mut self) {
        let w = self.w;
        // Acquire: pairs with the patcher's Release store of `done`.
        let must = w.done.load(Ordering::Acquire);
        self.log("request, universe", self.local);
        let a = w.f.call(self.local, &w.trace, self.name);
        let b = w.g.call(self.local, &w.trace, self.name);
        if !(a == V1 || a == V2) || !(b == V1 || b == V2) {
            w.trace
                .fail(format!("{}: a call ran neither version", self.name));
        }
        if must != 0 && (a != must || b != must) {
            w.trace.fail(format!(
                "{}: ran f v{a}, g v{b} after the patcher finished at v{must}",
                self.name
            ));
        }
        if self.offline {
            return; // Calls made offline may see any version.
        }
        if a != b {
            w.trace.fail(format!(
                "{}: a request mixed versions: f v{a}, g v{b} (universe {})",
                self.name, self.local
            ));
        }
        if let Some(expect) = w.expect
            && a != expect[self.local as usize]
        {
            w.trace.fail(format!(
                "{}: universe {} runs v{}, but this request ran v{a}",
                self.name, self.local, expect[self.local as usize]
            ));
        }
    }
}

/// Polls `done` like `poll_until`: with a deadline of `budget` failed
/// polls, or none.
fn wait_until(budget: Option<usize>, mut done: impl FnMut() -> bool) -> bool {
    let mut polls = 0;
    loop {
        if done() {
            return true;
        }
        if budget.is_some_and(|b| polls >= b) {
            return false;
        }
        polls += 1;
        thread::yield_now();
    }
}

/// One transition of the patcher.
#[derive(Clone, Copy)]
struct Transition {
    /// Its universe, and the one a reversal publishes.
    universe: u64,
    reversal: u64,
    old: usize,
    new: usize,
    /// Failed polls before the deadline; `None`: no deadline.
    budget: Option<usize>,
}

/// Whether a check holds for every registered thread's record (the scan
/// of `THREADS`).
type AllRecords<'a> = dyn Fn(&dyn Fn(&ThreadState) -> bool) -> bool + 'a;

/// `quiesce::switch`, over `records`. Returns whether it completed
/// (true) or was reversed.
fn switch(w: &World, t: Transition, records: &AllRecords<'_>) -> bool {
    for s in w.slots() {
        s.begin_transition(Choice {
            universe: t.universe,
            old: t.old,
            new: t.new,
        });
    }
    w.trace
        .log("patcher", "dispatchers in, publishes", t.universe);
    w.epoch.publish(t.universe);
    let arrived = || {
        let all = records(&|r| r.arrived(t.universe));
        w.trace
            .log("patcher", "polls: all arrived?", u64::from(all));
        all
    };
    if wait_until(t.budget, arrived) {
        w.trace
            .log("patcher", "all arrived: slots to", t.new as u64);
        for s in w.slots() {
            s.set(t.new);
        }
        return true;
    }
    w.trace.log("patcher", "deadline: publishes", t.reversal);
    // `publish` ends with the SeqCst fence that pairs with
    // `ThreadState::adopt_latest`'s.
    w.epoch.publish(t.reversal);
    // After the deadline the real code goes on in a background thread,
    // without a bound.
    wait_until(None, || {
        let all = records(&|r| r.left(t.universe));
        w.trace.log("patcher", "polls: all left?", u64::from(all));
        all
    });
    w.trace
        .log("patcher", "all left: slots back to", t.old as u64);
    for s in w.slots() {
        s.set(t.old);
    }
    false
}

/// The patcher over the fixed set of records: runs `plan`, then tells the
/// workers the final version.
fn patcher(w: &World, plan: &[Transition]) {
    let all = |check: &dyn Fn(&ThreadState) -> bool| w.records.iter().all(check);
    let mut last = V1;
    for t in plan {
        last = if switch(w, *t, &all) { t.new } else { t.old };
    }
    // Release: a call that sees this sees the slots' final stores.
    w.done.store(last, Ordering::Release);
    w.trace.log("patcher", "done", last as u64);
}

const APPLY: Transition = Transition {
    universe: 1,
    reversal: 3,
    old: V1,
    new: V2,
    budget: None,
};

const REVERT: Transition = Transition {
    universe: 2,
    reversal: 3,
    old: V2,
    new: V1,
    budget: None,
};

/// The version each universe stands for. 0: the original; 1: the patch;
/// 2: the revert of 1; 3: the reversal of 1 (or of 2, unused).
const EXPECT: &[usize] = &[V1, V2, V1, V1];

/// Runs `model` under loom with `preemption_bound`, and prints how many
/// executions it explored.
fn check(name: &str, preemption_bound: usize, model: impl Fn(&Trace) + Sync + Send + 'static) {
    let executions = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = executions.clone();
    let trace = Trace::default();
    let started = Instant::now();
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(preemption_bound);
    builder.check(move || {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        model(&trace);
    });
    println!(
        "{name}: {} executions, preemption bound {preemption_bound}, {:.1} s",
        executions.load(std::sync::atomic::Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
}

/// Runs `plan` against workers doing `steps` (one slice per worker).
fn run(w: World, plan: &'static [Transition], steps: &'static [&'static [Step]]) {
    let w = loom::sync::Arc::new(w);
    let workers: Vec<_> = steps
        .iter()
        .enumerate()
        .map(|(i, steps)| {
            let w = w.clone();
            thread::spawn(move || Worker::new(&w, i).run(steps))
        })
        .collect();
    patcher(&w, plan);
    for h in workers {
        h.join().unwrap();
    }
}

use Step::{Offline, Online, Request, Safepoint};

// ---------------------------------------------------------------------
// Models.

/// One worker, one apply with no deadline.
#[test]
fn apply_one_worker() {
    check("apply_one_worker", 3, |trace| {
        let w = World::new(1, Some(EXPECT), trace);
        run(
            w,
            &[APPLY],
            &[&[Request, Safepoint, Request, Safepoint, Request]],
        );
    });
}

/// Two workers, one apply.
#[test]
fn apply_two_workers() {
    check("apply_two_workers", 2, |trace| {
        let w = World::new(2, Some(EXPECT), trace);
        run(
            w,
            &[APPLY],
            &[
                &[Request, Safepoint, Request],
                &[Safepoint, Request, Safepoint, Request],
            ],
        );
    });
}

/// Apply then revert: two transitions back to back; a worker in the
/// first one's universe is "old" for the second.
#[test]
fn apply_then_revert() {
    check("apply_then_revert", 2, |trace| {
        let w = World::new(1, Some(EXPECT), trace);
        run(
            w,
            &[APPLY, REVERT],
            &[&[
                Request, Safepoint, Request, Safepoint, Request, Safepoint, Request,
            ]],
        );
    });
}

/// The `go_online`/`publish` pair: a worker that is offline while the
/// patcher publishes comes back online and calls at once. Either the
/// patcher sees it online and waits for it, or it sees the new target.
#[test]
fn offline_worker_comes_back_during_apply() {
    check("offline_worker_comes_back_during_apply", 3, |trace| {
        let w = World::new(1, Some(EXPECT), trace);
        w.records[0].go_offline();
        run(w, &[APPLY], &[&[Online, Request, Safepoint, Request]]);
    });
}

/// Offline around blocking work in the middle of the traffic, with two
/// workers.
#[test]
fn offline_and_back_two_workers() {
    check("offline_and_back_two_workers", 2, |trace| {
        let w = World::new(2, Some(EXPECT), trace);
        run(
            w,
            &[APPLY],
            &[
                &[Request, Offline, Online, Request],
                &[Request, Safepoint, Request],
            ],
        );
    });
}

/// A deadline: the patcher gives up after one failed poll and reverses,
/// while the worker keeps serving. Before `ThreadState::adopt_latest`
/// revalidated, this found a mixed request: a worker that had read target
/// `t` at a safepoint but not yet stored it was counted as having left `t`
/// by the reversal, which pointed the slots back at `V1` while the worker
/// entered `t` and called `f` through the dispatcher (`V2`), then `g`
/// (`V1`).
#[test]
fn deadline_reversal() {
    check("deadline_reversal", 3, |trace| {
        let w = World::new(1, Some(EXPECT), trace);
        run(
            w,
            &[Transition {
                budget: Some(1),
                ..APPLY
            }],
            &[&[Request, Safepoint, Request, Safepoint, Request]],
        );
    });
}

/// A deadline with two workers: one may switch while the other has not
/// reached its safepoint yet, then both must end on `V1`.
#[test]
fn deadline_reversal_two_workers() {
    check("deadline_reversal_two_workers", 2, |trace| {
        let w = World::new(2, Some(EXPECT), trace);
        run(
            w,
            &[Transition {
                budget: Some(1),
                ..APPLY
            }],
            &[&[Safepoint, Request], &[Request, Safepoint, Request]],
        );
    });
}

/// A thread registers while the patcher switches, as `register_thread`
/// and `switch` do it: the record list under a lock (the target read under
/// it), the direct swap when the list is empty. Another thread is
/// registered from the start, so both paths of `switch` are explored.
#[test]
fn registration_races_the_switch() {
    check("registration_races_the_switch", 2, |trace| {
        let w = loom::sync::Arc::new(World::new(1, None, trace));
        let threads = loom::sync::Arc::new(Mutex::new(vec![0usize]));
        let registered = loom::sync::Arc::new(ThreadState::new(u64::MAX));

        let early = {
            let (w, threads) = (w.clone(), threads.clone());
            thread::spawn(move || {
                Worker::new(&w, 0).run(&[Safepoint, Request, Safepoint]);
                // Unregisters: off the list.
                threads.lock().unwrap().retain(|&i| i != 0);
            })
        };
        let late = {
            let (w, threads, record) = (w.clone(), threads.clone(), registered.clone());
            thread::spawn(move || {
                let local = {
                    let mut list = threads.lock().unwrap();
                    let target = w.epoch.target();
                    record.adopt(target);
                    list.push(1);
                    target
                };
                let mut worker = Worker {
                    w: &w,
                    record: &record,
                    name: "worker1",
                    local,
                    offline: false,
                };
                worker.log("registered in universe", local);
                worker.run(&[Request, Safepoint, Request]);
            })
        };

        let record = |i: usize| if i == 0 { &w.records[0] } else { &*registered };
        let all = |check: &dyn Fn(&ThreadState) -> bool| {
            threads.lock().unwrap().iter().all(|&i| check(record(i)))
        };
        let direct = {
            let list = threads.lock().unwrap();
            if list.is_empty() {
                w.trace
                    .log("patcher", "nobody registered: slots to", V2 as u64);
                for s in w.slots() {
                    s.set(V2);
                }
            }
            list.is_empty()
        };
        if !direct {
            switch(&w, APPLY, &all);
        }
        // Release: as in `patcher`.
        w.done.store(V2, Ordering::Release);
        early.join().unwrap();
        late.join().unwrap();
    });
}

/// The storage of a choice is reused (issue 11, item 4): a worker that
/// adopted the apply's universe enters `f`'s dispatcher and is descheduled
/// in the middle of reading the choice, while the apply completes and two
/// more transitions (each reversed at its deadline, as the worker never
/// reaches a safepoint meanwhile) store their choices into the same two
/// buffers, the third into the buffer the worker is reading. Whatever
/// the worker reads must be one transition's choice, and one that gives
/// it the version of its universe: `f` and `g` of one request agree.
///
/// Each transition flips the slots from their state at its start, as the
/// real patcher's changes do (`old` is what the slots held).
#[test]
fn a_slow_dispatcher_reads_a_reused_buffer() {
    check("a_slow_dispatcher_reads_a_reused_buffer", 2, |trace| {
        let w = loom::sync::Arc::new(World::new(1, None, trace));
        let worker = {
            let w = w.clone();
            thread::spawn(move || Worker::new(&w, 0).run(&[Safepoint, Request, Safepoint, Request]))
        };
        let all = |check: &dyn Fn(&ThreadState) -> bool| w.records.iter().all(check);
        // (universe, reversal, failed polls before the deadline)
        let plan = [(1, 2, None), (3, 4, Some(0)), (5, 6, Some(0))];
        let mut state = V1;
        for (universe, reversal, budget) in plan {
            let new = if state == V1 { V2 } else { V1 };
            let t = Transition {
                universe,
                reversal,
                old: state,
                new,
                budget,
            };
            if switch(&w, t, &all) {
                state = new;
            }
        }
        // Release: as in `patcher`.
        w.done.store(state, Ordering::Release);
        w.trace.log("patcher", "done", state as u64);
        worker.join().unwrap();
    });
}

// ---------------------------------------------------------------------
// Request scopes (issue 12): `hotpatch/src/quiesce/in_flight.rs`, the real
// registry, included below.

#[allow(dead_code)]
#[path = "../hotpatch/src/quiesce/in_flight.rs"]
mod in_flight;

/// `quiesce::switch` with no registered thread and the request registry:
/// the direct swap when no request is in flight (under every shard's
/// lock), else publish, poll `all_in` up to the deadline, and on the
/// deadline publish the reversal and poll `none_in`. Returns the version
/// the slots end at, and whether it was the direct swap.
fn switch_requests(w: &World, reqs: &in_flight::Requests, t: Transition) -> (usize, bool) {
    if let Some(guards) = reqs.lock_empty() {
        w.trace
            .log("patcher", "no request in flight: slots to", t.new as u64);
        for s in w.slots() {
            s.set(t.new);
        }
        drop(guards);
        return (t.new, true);
    }
    for s in w.slots() {
        s.begin_transition(Choice {
            universe: t.universe,
            old: t.old,
            new: t.new,
        });
    }
    w.trace
        .log("patcher", "dispatchers in, publishes", t.universe);
    w.epoch.publish(t.universe);
    let arrived = || {
        let all = reqs.all_in(t.universe);
        w.trace
            .log("patcher", "polls: all requests in?", u64::from(all));
        all
    };
    if wait_until(t.budget, arrived) {
        for s in w.slots() {
            s.set(t.new);
        }
        w.trace.log("patcher", "complete: slots to", t.new as u64);
        return (t.new, false);
    }
    w.trace.log("patcher", "deadline: publishes", t.reversal);
    w.epoch.publish(t.reversal);
    wait_until(None, || {
        let none = reqs.none_in(t.universe);
        w.trace
            .log("patcher", "polls: none left in t?", u64::from(none));
        none
    });
    for s in w.slots() {
        s.set(t.old);
    }
    w.trace.log("patcher", "reversed: slots to", t.old as u64);
    (t.old, false)
}

/// A request scope starts on one thread (registers in its shard, reading
/// the target under the lock), after another request finished there, and
/// calls `f`; it is then polled on a second
/// thread (handed over through a lock, as an executor's queue would),
/// which calls `g` with the request's universe as its view and finishes
/// it. Meanwhile the patcher applies, with a deadline that loom lets pass
/// or not (both the completion and the reversal are explored), and the
/// direct swap when it finds no request in flight. Checked: `f` and `g`
/// run the same version, the one the request's universe stands for, and
/// a request that starts after the patcher finished runs the final
/// version.
///
/// Breaking the protocol makes it fail: reading the target before taking
/// the shard's lock (the patcher can then scan the shard before the entry
/// is in, and complete while the request runs old code), or a reversal
/// that does not wait for requests in `t` (`none_in`), or a direct swap
/// that does not hold the shards' locks.
#[test]
fn request_scope_races_a_transition_and_its_reversal() {
    for budget in [None, Some(0), Some(1)] {
        check(
            "request_scope_races_a_transition_and_its_reversal",
            2,
            move |trace| {
                let w = loom::sync::Arc::new(World::new(0, None, trace));
                let reqs = loom::sync::Arc::new(in_flight::Requests::new());
                // Another request, in flight from the start and finished by
                // thread A before its own starts: the patcher may find the
                // registry empty (direct swap) or not (a transition).
                let other = reqs.start(1, &w.epoch, std::panic::Location::caller()).0;
                let first = {
                    let (w, reqs) = (w.clone(), reqs.clone());
                    thread::spawn(move || {
                        reqs.finish(other);
                        let location = std::panic::Location::caller();
                        let (ticket, u) = reqs.start(0, &w.epoch, location);
                        w.trace.log("thread A", "request starts in", u);
                        let a = w.f.call(u, &w.trace, "thread A");
                        // Handed to another worker, as an executor's queue
                        // does (spawning synchronises like it).
                        let second = thread::spawn(move || {
                            let b = w.g.call(u, &w.trace, "thread B");
                            reqs.finish(ticket);
                            w.trace.log("thread B", "request finishes", u);
                            if a != b {
                                w.trace.fail(format!(
                                    "a request mixed versions: f v{a}, g v{b} (universe {u})"
                                ));
                            }
                            (u, a)
                        });
                        second.join().unwrap()
                    })
                };
                let t = Transition { budget, ..APPLY };
                let (last, direct) = switch_requests(&w, &reqs, t);
                // Release: a request that sees this sees the final slots.
                w.done.store(last, Ordering::Release);
                // A request that starts now runs the final version.
                let (ticket, u) = reqs.start(1, &w.epoch, std::panic::Location::caller());
                let (a, b) = (w.f.call(u, &w.trace, "late"), w.g.call(u, &w.trace, "late"));
                reqs.finish(ticket);
                if a != last || b != last {
                    w.trace.fail(format!(
                        "a request that started after the patcher finished at v{last} ran f v{a}, g v{b}"
                    ));
                }
                let (u, a) = first.join().unwrap();
                // Unless the patcher swapped directly (the request was
                // wholly before or wholly after it: one version either way,
                // checked above), the version of its universe: 0 before the
                // apply, 1 the apply's, 3 its reversal's.
                if !direct && a != EXPECT[u as usize] {
                    w.trace.fail(format!(
                        "the request in universe {u} ran v{a}, not v{}",
                        EXPECT[u as usize]
                    ));
                }
            },
        );
    }
}

// ---------------------------------------------------------------------
// Write windows on the slot table (issue 20): `hotpatch/src/window.rs`,
// the real code, over pages whose protection is a flag.

#[allow(dead_code)]
#[path = "../hotpatch/src/window.rs"]
mod window;

const PAGE: usize = 0x1000;

/// Two pages, `PAGE` and `2 * PAGE`: whether each is writable. `protect`
/// runs under the windows' lock and `mprotect` takes effect for every
/// thread before it returns: SeqCst stores and loads.
struct FlagPages(loom::sync::Arc<[loom::sync::atomic::AtomicBool; 2]>);

impl window::Pages for FlagPages {
    fn page_size(&self) -> usize {
        PAGE
    }

    fn protect(&self, start: usize, len: usize, writable: bool) -> std::io::Result<()> {
        for page in (start..start + len).step_by(PAGE) {
            self.0[page / PAGE - 1].store(writable, Ordering::SeqCst);
        }
        Ok(())
    }
}

/// Two writers whose windows share a page: slot A on page 1, slot B on
/// page 1 and a slot C on page 2 (B's window covers both). Each checks
/// that the page of each of its slots is writable when it stores; at the
/// end both pages are read-only and no window is open. Whichever finishes
/// first, the other's page stays writable until it is done.
///
/// Closing a window by making its pages read-only without the count (the
/// first writer to finish protects the shared page under the second)
/// makes it fail with a store into a read-only page.
#[test]
fn window_two_writers_share_a_page() {
    check("window_two_writers_share_a_page", 3, |_trace| {
        use loom::sync::Arc;
        use loom::sync::atomic::AtomicBool;
        let flags = Arc::new([AtomicBool::new(false), AtomicBool::new(false)]);
        let windows = Arc::new(window::Windows::new(FlagPages(flags.clone())));
        let writer = |slots: &'static [(usize, usize)]| {
            let (windows, flags) = (windows.clone(), flags.clone());
            thread::spawn(move || {
                let open = windows.open(slots.iter().copied()).unwrap();
                for &(addr, _) in slots {
                    assert!(
                        flags[addr / PAGE - 1].load(Ordering::SeqCst),
                        "a store into slot {addr:#x} found its page read-only"
                    );
                }
                drop(open);
            })
        };
        let a = writer(&[(PAGE + 0x40, 64)]);
        let b = writer(&[(PAGE + 0x80, 64), (2 * PAGE, 64)]);
        a.join().unwrap();
        b.join().unwrap();
        for (i, flag) in flags.iter().enumerate() {
            assert!(
                !flag.load(Ordering::SeqCst),
                "page {} left writable after both windows closed",
                i + 1
            );
        }
        assert!(!windows.is_open(PAGE) && !windows.is_open(2 * PAGE));
    });
}
