//! Request scopes (issue 12): a scoped request runs one version across
//! `.await`s and worker threads; transitions wait for the requests that
//! started on the old version, reverse at the deadline naming them, and a
//! dropped request releases them. Nested scopes, `tokio::spawn`,
//! `spawn_blocking` and `block_on` inside a scope get what the crate docs
//! say.
//!
//! `f(x) + g(x) == 1000` in either version and not when mixed; `f(x)` is
//! `x` in version 1 and `x + 7` in version 2 (`fixture-patch-quiesce`).
//! Transitions are process-wide, so the tests of this file take turns.
//! The runtimes' worker threads are not registered: whatever consistency
//! a scoped request shows here comes from its scope.

mod support;

use std::future::{Future, poll_fn};
use std::panic::Location;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};
use std::thread;
use std::time::{Duration, Instant};

use hotpatch::{Error, Loader, Patch, RequestExt, RequestVersion};
use svc::quiesce::{f, g, version};

/// Takes this file's turn; a test that failed before reverting leaves
/// its patch applied, so the next one starts by reverting it.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    let turn = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    for p in hotpatch::applied() {
        let _ = hotpatch::revert(p.id);
    }
    turn
}

fn patch_path() -> std::path::PathBuf {
    support::patch("fixture-patch-quiesce")
}

/// Only a guard against a hang, never a measurement.
const HANG: Duration = Duration::from_secs(120);

/// Which version computed `f(x)`: 1, 2, or 0 for neither.
fn f_version(x: u64, fx: u64) -> u8 {
    if fx == x {
        1
    } else if fx == x + 7 {
        2
    } else {
        0
    }
}

/// `hotpatch::request(fut)`, and the location it records (the caller's).
#[track_caller]
fn scoped<F: Future>(fut: F) -> (&'static Location<'static>, hotpatch::Request<F>) {
    (Location::caller(), hotpatch::request(fut))
}

/// Polls once with a waker that does nothing.
fn poll_once<F: Future>(fut: Pin<&mut F>) -> Poll<F::Output> {
    fut.poll(&mut Context::from_waker(Waker::noop()))
}

/// A future that is pending until `open` is set (it asks to be polled
/// again each time, so a runtime keeps polling it).
fn gate(open: &AtomicBool) -> impl Future<Output = ()> + '_ {
    poll_fn(move |cx| {
        // Acquire: pairs with the Release store that opens it.
        if open.load(Ordering::Acquire) {
            Poll::Ready(())
        } else {
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
}

/// A minimal `block_on` (what `futures::executor::block_on` does): polls
/// on the calling thread, parks until woken.
fn block_on<F: Future>(fut: F) -> F::Output {
    struct Unpark(thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = pin!(fut);
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        thread::park_timeout(Duration::from_millis(10));
    }
}

/// Loads the patch on another thread (which is not registered and polls
/// no request), with a deadline long enough that only a bug lets it
/// expire.
fn load_in_background() -> thread::JoinHandle<Result<Patch, Error>> {
    let so = patch_path();
    thread::spawn(move || Loader::new().deadline(HANG).load(so))
}

/// Waits until a transition is in progress (it waits for some request).
fn wait_for_transition() -> hotpatch::TransitionInfo {
    let started = Instant::now();
    loop {
        if let Some(t) = hotpatch::transition() {
            return t;
        }
        assert!(started.elapsed() < HANG, "no transition started");
        thread::sleep(Duration::from_millis(1));
    }
}

/// The request scope created at `here` as the transition reports it.
fn waiting_at(t: &hotpatch::TransitionInfo, here: &Location<'_>) -> usize {
    t.waiting_for_requests
        .iter()
        .filter(|r| r.location.file() == here.file() && r.location.line() == here.line())
        .map(|r| r.count)
        .sum()
}

fn multi_thread(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_time()
        .build()
        .unwrap()
}

/// A request of the stress test: `f`, one await, `g`. Returns the two
/// results, whether it resumed on another worker, and whether the
/// operator's sequence number was the same (and even) at both ends.
async fn settle(x: u64, pause: u64, seq: &AtomicU64) -> (u64, u64, bool, Option<u64>) {
    // Acquire: pairs with the operator's Release bumps around each load
    // and revert.
    let before = seq.load(Ordering::Acquire);
    let first = thread::current().id();
    let fx = f(x);
    match pause % 3 {
        0 => tokio::task::yield_now().await,
        1 => tokio::time::sleep(Duration::from_micros(200)).await,
        _ => {
            let (tx, rx) = tokio::sync::oneshot::channel();
            tokio::spawn(async move {
                tokio::task::yield_now().await;
                let _ = tx.send(());
            });
            let _ = rx.await;
        }
    }
    let gx = g(x);
    let moved = thread::current().id() != first;
    // Acquire: as above.
    let after = seq.load(Ordering::Acquire);
    (fx, gx, moved, (before == after).then_some(before))
}

#[derive(Debug, Default)]
struct Tally {
    requests: u64,
    mixed: u64,
    bad: u64,
    moved: u64,
    /// Wholly inside a phase with no transition, on the other version.
    stale: u64,
}

impl Tally {
    fn record(&mut self, x: u64, (fx, gx, moved, seq): (u64, u64, bool, Option<u64>)) {
        self.requests += 1;
        self.moved += u64::from(moved);
        let v = f_version(x, fx);
        match (v, fx + gx) {
            (0, _) => self.bad += 1,
            (_, 1000) => {}
            (_, 993 | 1007) => self.mixed += 1,
            _ => self.bad += 1,
        }
        // seq % 4: 0 original, 1 loading, 2 patched, 3 reverting.
        let in_force = match seq.map(|s| s % 4) {
            Some(0) => Some(1),
            Some(2) => Some(2),
            _ => None,
        };
        if in_force.is_some_and(|w| w != v) {
            self.stale += 1;
        }
    }
}

fn stress_cycles() -> usize {
    std::env::var("HOTPATCH_STRESS_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

/// Thousands of concurrent scoped requests on four workers with work
/// stealing, each awaiting (yield, timer, channel) between its two calls,
/// through 1,000 apply/revert cycles: none mixes, none runs a version not
/// in force, every result is checked. Unscoped requests on the same
/// runtime are the control: they do mix (the test can see mixing).
#[test]
fn scoped_requests_never_mix_across_awaits_and_workers() {
    let _serial = serial();
    let so = patch_path();
    let rt = multi_thread(4);
    let stop = Arc::new(AtomicBool::new(false));
    let seq = Arc::new(AtomicU64::new(0));
    let served = Arc::new(AtomicU64::new(0));
    const SCOPED: u64 = 2000;
    const UNSCOPED: u64 = 200;
    let tasks: Vec<_> = (0..SCOPED + UNSCOPED)
        .map(|i| {
            let (stop, seq, served) = (stop.clone(), seq.clone(), served.clone());
            rt.spawn(async move {
                let mut tally = Tally::default();
                let mut n = i;
                // Relaxed: a stop flag; the tasks are joined afterwards.
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let x = n % 500;
                    let result = if i < SCOPED {
                        settle(x, n, &seq).hotpatch_scope().await
                    } else {
                        settle(x, n, &seq).await
                    };
                    tally.record(x, result);
                    // Relaxed: progress only.
                    served.fetch_add(1, Ordering::Relaxed);
                }
                (i < SCOPED, tally)
            })
        })
        .collect();
    let wait_for = |n: u64| {
        let from = served.load(Ordering::Relaxed);
        let started = Instant::now();
        while served.load(Ordering::Relaxed) - from < n {
            assert!(started.elapsed() < HANG, "hang: fewer than {n} requests");
            thread::sleep(Duration::from_micros(200));
        }
    };
    wait_for(SCOPED);
    let cycles = stress_cycles();
    for _ in 0..cycles {
        // Release: a request that sees the bump sees what preceded it.
        seq.fetch_add(1, Ordering::Release);
        let p = Loader::new().deadline(HANG).load(&so).expect("load");
        seq.fetch_add(1, Ordering::Release);
        wait_for(50);
        seq.fetch_add(1, Ordering::Release);
        Loader::new().deadline(HANG).revert(p).expect("revert");
        seq.fetch_add(1, Ordering::Release);
        wait_for(50);
    }
    stop.store(true, Ordering::Relaxed);
    let (mut scoped, mut unscoped) = (Tally::default(), Tally::default());
    for t in tasks {
        let (is_scoped, tally) = rt.block_on(t).expect("task panicked");
        let into = if is_scoped {
            &mut scoped
        } else {
            &mut unscoped
        };
        into.requests += tally.requests;
        into.mixed += tally.mixed;
        into.bad += tally.bad;
        into.moved += tally.moved;
        into.stale += tally.stale;
    }
    println!("{cycles} cycles; scoped {scoped:?}; unscoped {unscoped:?}");
    assert_eq!(
        scoped.requests + unscoped.requests,
        served.load(Ordering::Relaxed),
        "every request's result was checked"
    );
    assert_eq!(scoped.bad + unscoped.bad, 0, "results of neither version");
    assert_eq!(scoped.mixed, 0, "scoped requests mixed versions");
    assert_eq!(
        scoped.stale, 0,
        "scoped requests ran a version not in force"
    );
    assert!(
        scoped.moved > 0,
        "no scoped request resumed on another worker"
    );
    assert!(
        unscoped.mixed > 0,
        "the control never mixed: the test cannot see mixing ({unscoped:?})"
    );
    assert_eq!(version(), 1);
}

/// A request that never completes makes the load fail after the deadline:
/// reversed (the old code runs, the request included), and the error
/// names it (how many, their age, where it was created).
#[test]
fn a_request_that_never_completes_times_out_the_load_and_is_named() {
    let _serial = serial();
    let open = AtomicBool::new(false);
    let (here, scope) = scoped(async {
        let a = f(10);
        gate(&open).await;
        (a, g(10))
    });
    let mut scope = pin!(scope);
    assert!(poll_once(scope.as_mut()).is_pending());
    let deadline = Duration::from_millis(300);
    let err = Loader::new()
        .deadline(deadline)
        .load(patch_path())
        .expect_err("a load while an old request is in flight must time out");
    let text = err.to_string();
    match &err {
        Error::Timeout {
            stalled, requests, ..
        } => {
            assert!(stalled.is_empty(), "{stalled:?}");
            assert_eq!(requests.len(), 1, "{requests:?}");
            let r = &requests[0];
            assert_eq!(r.count, 1);
            assert_eq!(
                (r.location.file(), r.location.line()),
                (here.file(), here.line())
            );
            assert!(r.oldest >= deadline, "{r:?}");
        }
        e => panic!("expected a timeout, got {e}"),
    }
    assert!(text.contains("1 request(s)"), "{text}");
    assert!(
        text.contains(&format!("requests.rs:{}", here.line())),
        "{text}"
    );
    // Reversed: the old code for everyone, the request included.
    assert!(hotpatch::applied().is_empty());
    assert!(hotpatch::transition().is_none());
    assert_eq!(version(), 1);
    open.store(true, Ordering::Release);
    assert_eq!(poll_once(scope.as_mut()), Poll::Ready((10, 990)));
    // Finished: nothing holds a load now.
    let p = hotpatch::load(patch_path()).expect("load");
    p.revert().expect("revert");
}

/// A load waits for an in-flight old request (reported by `transition()`),
/// which keeps running the old code wherever it is polled, while a request
/// that starts meanwhile runs the new code; dropping the old request,
/// never completed, releases the load.
#[test]
fn a_dropped_request_releases_the_transition() {
    let _serial = serial();
    let open = Arc::new(AtomicBool::new(false));
    let gate_open = open.clone();
    let (here, scope) = scoped(async move {
        let a = f(20);
        gate(&gate_open).await;
        (a, g(20))
    });
    let mut scope = Box::pin(scope);
    assert!(poll_once(scope.as_mut()).is_pending());
    let load = load_in_background();
    let t = wait_for_transition();
    assert_eq!(waiting_at(&t, here), 1, "{t:?}");
    // Polled again on another thread, still the old version: `g` is
    // version 1's (the request could not complete otherwise with 1000).
    let moved = thread::spawn(move || {
        let r = poll_once(scope.as_mut());
        (scope, r)
    });
    let (scope, r) = moved.join().unwrap();
    assert!(r.is_pending());
    // A request that starts now runs the new version, whole.
    let fresh = block_on(hotpatch::request(async { (f(30), g(30)) }));
    assert_eq!(fresh, (37, 963));
    assert!(
        !load.is_finished(),
        "the load returned with a request in flight"
    );
    // Dropped, never completed.
    drop(scope);
    let p = load
        .join()
        .unwrap()
        .expect("the load went ahead once the request was dropped");
    assert_eq!(version(), 2);
    p.revert().expect("revert");
}

/// An old request resumed on a second thread during the transition runs
/// the old version to its end, and the transition completes when it does.
#[test]
fn a_request_polled_on_two_threads_keeps_its_version() {
    let _serial = serial();
    let open = Arc::new(AtomicBool::new(false));
    let gate_open = open.clone();
    let mut scope = Box::pin(hotpatch::request(async move {
        let a = f(40);
        gate(&gate_open).await;
        (a, g(40))
    }));
    assert!(poll_once(scope.as_mut()).is_pending());
    let load = load_in_background();
    wait_for_transition();
    open.store(true, Ordering::Release);
    let done = thread::spawn(move || poll_once(scope.as_mut()))
        .join()
        .unwrap();
    assert_eq!(done, Poll::Ready((40, 960)), "old version, whole");
    let p = load.join().unwrap().expect("load");
    assert_eq!(version(), 2);
    p.revert().expect("revert");
}

/// A scope first polled inside another's poll is part of it: it runs the
/// outer request's version, even when it starts after the transition did
/// (as a top-level request it would run the new one).
#[test]
fn a_nested_scope_runs_the_outer_version() {
    let _serial = serial();
    let open = Arc::new(AtomicBool::new(false));
    let gate_open = open.clone();
    let mut scope = Box::pin(hotpatch::request(async move {
        let a = f(50);
        gate(&gate_open).await;
        let inner = hotpatch::request(async { (f(50), g(50)) }).await;
        (a, inner)
    }));
    assert!(poll_once(scope.as_mut()).is_pending());
    let load = load_in_background();
    wait_for_transition();
    open.store(true, Ordering::Release);
    assert_eq!(poll_once(scope.as_mut()), Poll::Ready((50, (50, 950))));
    drop(scope);
    let p = load.join().unwrap().expect("load");
    p.revert().expect("revert");
}

/// `block_on` inside a scoped poll polls its future on this thread, inside
/// the scope: the request's version, for a plain future and a scoped one.
#[test]
fn block_on_inside_a_scope_runs_the_request_version() {
    let _serial = serial();
    let open = Arc::new(AtomicBool::new(false));
    let gate_open = open.clone();
    let mut scope = Box::pin(hotpatch::request(async move {
        let a = f(60);
        gate(&gate_open).await;
        let plain = block_on(async { (f(60), g(60)) });
        let scoped = block_on(hotpatch::request(async { (f(60), g(60)) }));
        (a, plain, scoped)
    }));
    assert!(poll_once(scope.as_mut()).is_pending());
    let load = load_in_background();
    wait_for_transition();
    open.store(true, Ordering::Release);
    assert_eq!(
        poll_once(scope.as_mut()),
        Poll::Ready((60, (60, 940), (60, 940)))
    );
    drop(scope);
    let p = load.join().unwrap().expect("load");
    p.revert().expect("revert");
}

/// Inside an old request during a transition, on a runtime of
/// unregistered workers: a plain `tokio::spawn` is unscoped (an
/// unregistered thread switches at once: new), `spawn(request(..))` is a
/// new request (new), `spawn(inherit(..))` runs the parent's version (old)
/// and holds the transition after the parent finished; `spawn_blocking`
/// is unscoped (new) unless it runs through `RequestVersion::run` (old).
#[test]
fn spawn_and_spawn_blocking_inside_a_scope() {
    let _serial = serial();
    let rt = multi_thread(2);
    let in_transition = Arc::new(AtomicBool::new(false));
    let release_child = Arc::new(AtomicBool::new(false));
    let started = Arc::new(AtomicBool::new(false));
    let (gate1, gate2) = (in_transition.clone(), release_child.clone());
    let started_in = started.clone();
    let (here, parent) = scoped(async move {
        let before = f(70);
        // Release: pairs with the Acquire spin below; the scope is in
        // flight on version 1 before the load starts.
        started_in.store(true, Ordering::Release);
        gate(&gate1).await;
        let plain = tokio::spawn(async { f(70) }).await.unwrap();
        let fresh = tokio::spawn(hotpatch::request(async {
            tokio::task::yield_now().await;
            (f(70), g(70))
        }))
        .await
        .unwrap();
        let child = tokio::spawn(hotpatch::inherit(async move {
            let a = f(70);
            gate(&gate2).await;
            (a, g(70))
        }));
        let blocking = tokio::task::spawn_blocking(|| f(70)).await.unwrap();
        let version = RequestVersion::current().expect("inside a scope");
        let carried = tokio::task::spawn_blocking(move || version.run(|| (f(70), g(70))))
            .await
            .unwrap();
        (before, plain, fresh, blocking, carried, child)
    });
    let parent = rt.spawn(parent);
    // The load must find the request in flight: a load that reached its
    // switch before the runtime first polled the parent swapped directly
    // and no transition ever started (seen under load).
    while !started.load(Ordering::Acquire) {
        std::thread::yield_now();
    }
    let load = load_in_background();
    wait_for_transition();
    in_transition.store(true, Ordering::Release);
    let (before, plain, fresh, blocking, carried, child) = rt.block_on(parent).unwrap();
    assert_eq!(before, 70, "the parent started on version 1");
    assert_eq!(plain, 77, "a plain spawned task is unscoped: new at once");
    assert_eq!(fresh, (77, 923), "a spawned request starts on the newest");
    assert_eq!(blocking, 77, "spawn_blocking is unscoped");
    assert_eq!(
        carried,
        (70, 930),
        "RequestVersion::run carries the version"
    );
    // The parent finished; its inherited child still holds the transition.
    let t = hotpatch::transition().expect("still waiting for the child");
    assert!(waiting_at(&t, here) == 0, "the parent is done: {t:?}");
    assert_eq!(
        t.waiting_for_requests
            .iter()
            .map(|r| r.count)
            .sum::<usize>(),
        1,
        "{t:?}"
    );
    assert!(!load.is_finished());
    release_child.store(true, Ordering::Release);
    assert_eq!(
        rt.block_on(child).unwrap(),
        (70, 930),
        "inherited: old, whole"
    );
    let p = load.join().unwrap().expect("load");
    p.revert().expect("revert");
}

/// A panic inside a scoped poll leaves the thread's view as it was: an
/// unscoped call afterwards on this (unregistered) thread runs the newest
/// code during the transition; and the panicked scope, dropped, releases
/// the transition.
#[test]
fn a_panic_in_a_scoped_poll_restores_the_view() {
    let _serial = serial();
    let open = Arc::new(AtomicBool::new(false));
    let gate_open = open.clone();
    let mut scope = Box::pin(hotpatch::request(async move {
        let _ = f(80);
        gate(&gate_open).await;
        panic!("handler failed");
    }));
    assert!(poll_once(scope.as_mut()).is_pending());
    let load = load_in_background();
    wait_for_transition();
    open.store(true, Ordering::Release);
    let caught =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| poll_once(scope.as_mut())));
    assert!(caught.is_err());
    assert_eq!(f(80), 87, "unscoped on an unregistered thread: the newest");
    drop(scope);
    let p = load.join().unwrap().expect("load");
    p.revert().expect("revert");
}
