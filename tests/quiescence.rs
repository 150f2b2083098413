//! Quiescence: registered threads switch a whole patch at their own
//! safepoints, never wait for each other, and a deadline reverses a
//! transition that some thread does not join.
//!
//! Transitions are process-wide, so the tests of this file take turns.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use svc::quiesce::{f, g, version};

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn patch_path() -> std::path::PathBuf {
    support::patch("fixture-patch-quiesce")
}

/// Calls `f` and `g` in one "request", with a pause between them that
/// gives a concurrent transition time to land in the middle.
fn request(x: u64) -> u64 {
    let a = f(x);
    for _ in 0..50 {
        std::hint::spin_loop();
    }
    a + g(x)
}

fn cycles() -> usize {
    std::env::var("HOTPATCH_STRESS_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

struct Workers {
    stop: Arc<AtomicBool>,
    /// Requests completed by all workers so far.
    done: Arc<AtomicU64>,
    /// Requests that saw `f` and `g` of different versions, so far.
    mixed: Arc<AtomicU64>,
    handles: Vec<thread::JoinHandle<WorkerReport>>,
}

#[derive(Debug, Default)]
struct WorkerReport {
    requests: u64,
    mixed: u64,
    bad: u64,
}

/// `n` threads doing requests until stopped; registered or not.
fn spawn_workers(n: usize, registered: bool) -> Workers {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mixed = Arc::new(AtomicU64::new(0));
    let barrier = Arc::new(Barrier::new(n + 1));
    let handles = (0..n)
        .map(|i| {
            let stop = stop.clone();
            let done = done.clone();
            let mixed = mixed.clone();
            let barrier = barrier.clone();
            thread::Builder::new()
                .name(format!("worker-{i}"))
                .spawn(move || {
                    let _guard = registered.then(hotpatch::register_thread);
                    barrier.wait();
                    let mut report = WorkerReport::default();
                    let mut x = i as u64;
                    while !stop.load(Ordering::Relaxed) {
                        x = (x + 1) % 500;
                        let sum = request(x);
                        match sum {
                            1000 => {}
                            993 | 1007 => {
                                report.mixed += 1;
                                mixed.fetch_add(1, Ordering::Relaxed);
                            }
                            _ => report.bad += 1,
                        }
                        let v = version();
                        if v != 1 && v != 2 {
                            report.bad += 1;
                        }
                        report.requests += 1;
                        done.fetch_add(1, Ordering::Relaxed);
                        hotpatch::quiescent();
                        if report.requests % 64 == 0 {
                            // Four busy threads on two cores: give the
                            // patcher (and each other) the CPU now and then,
                            // as a real server blocking on I/O would.
                            thread::yield_now();
                        }
                    }
                    report
                })
                .unwrap()
        })
        .collect();
    barrier.wait();
    Workers {
        stop,
        done,
        mixed,
        handles,
    }
}

impl Workers {
    fn finish(self) -> Vec<WorkerReport> {
        self.stop.store(true, Ordering::Relaxed);
        self.handles
            .into_iter()
            .map(|h| h.join().expect("worker panicked"))
            .collect()
    }
}

fn apply_revert_cycles(n: usize) {
    let so = patch_path();
    for _ in 0..n {
        let p = hotpatch::load(&so).expect("load");
        assert_eq!(version(), 2, "the loading thread is at a safepoint");
        p.revert().expect("revert");
        assert_eq!(version(), 1);
    }
}

/// Every request of a registered thread sees all-old or all-new, through
/// many apply/revert cycles, with four threads on two cores.
#[test]
fn registered_threads_never_mix_versions() {
    let _serial = serial();
    let so = patch_path();
    let workers = spawn_workers(4, true);
    apply_revert_cycles(cycles());
    let reports = workers.finish();
    let requests: u64 = reports.iter().map(|r| r.requests).sum();
    let mixed: u64 = reports.iter().map(|r| r.mixed).sum();
    let bad: u64 = reports.iter().map(|r| r.bad).sum();
    assert!(requests > 0);
    assert_eq!(bad, 0, "a call returned neither the old nor the new value");
    assert_eq!(
        mixed, 0,
        "{mixed} of {requests} requests mixed old and new code"
    );
    assert!(hotpatch::applied().is_empty(), "{so:?} left applied");
}

/// The control: the same requests on unregistered threads do mix, so the
/// invariant the previous test checks is one a transition can break.
#[test]
fn unregistered_threads_can_mix_versions() {
    let _serial = serial();
    let so = patch_path();
    let workers = spawn_workers(2, false);
    let mut seen = 0;
    // Relaxed: a counter; the loop only needs to see it move eventually.
    while workers.mixed.load(Ordering::Relaxed) == 0 && seen < 10 * cycles() {
        let p = hotpatch::load(&so).expect("load");
        p.revert().expect("revert");
        seen += 1;
    }
    let reports = workers.finish();
    let mixed: u64 = reports.iter().map(|r| r.mixed).sum();
    let bad: u64 = reports.iter().map(|r| r.bad).sum();
    assert_eq!(bad, 0);
    assert!(
        mixed > 0,
        "no mixed request seen in {seen} cycles: the control is not exercising the race"
    );
}

/// Once a load has returned, every registered thread runs the new code at
/// every call; after revert returns, the old code at every call.
///
/// Checked two ways. Each worker, before each call, reads what the patcher
/// says must hold and checks the call against it; it counts those checks
/// per required version, and both counts must be above zero for every
/// worker. And after each `load`/`revert` returns, the patcher waits until
/// every worker has completed a call that started after it returned, and
/// checks that call's result itself.
#[test]
fn after_a_transition_no_thread_runs_the_previous_version() {
    let _serial = serial();
    let so = patch_path();
    const WORKERS: usize = 2;
    let expected = Arc::new(AtomicU64::new(1));
    let stop = Arc::new(AtomicBool::new(false));
    let wrong = Arc::new(AtomicU64::new(0));
    // (calls completed << 8) | version the last one returned, per worker:
    // one word, so the patcher reads a call's number and result together.
    let last: Arc<Vec<AtomicU64>> = Arc::new((0..WORKERS).map(|_| AtomicU64::new(0)).collect());
    let barrier = Arc::new(Barrier::new(WORKERS + 1));
    let handles: Vec<_> = (0..WORKERS)
        .map(|w| {
            let (expected, stop, wrong, last, barrier) = (
                expected.clone(),
                stop.clone(),
                wrong.clone(),
                last.clone(),
                barrier.clone(),
            );
            thread::spawn(move || {
                let _r = hotpatch::register_thread();
                barrier.wait();
                // checked[v]: calls checked while version v was required.
                let mut checked = [0u64; 3];
                let mut calls = 0u64;
                // Relaxed: `stop` only ends the loop.
                while !stop.load(Ordering::Relaxed) {
                    // Read what must hold *before* the call: if the
                    // transition completed before this read, the call must
                    // be the new version.
                    // Acquire: pairs with the patcher's Release stores.
                    let must = expected.load(Ordering::Acquire);
                    let v = version();
                    if must != 0 {
                        checked[must as usize] += 1;
                        if v != must {
                            // Relaxed: a counter read after the join.
                            wrong.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    calls += 1;
                    // Release: the patcher's Acquire load of this word
                    // happens after this call completed.
                    last[w].store(calls << 8 | v, Ordering::Release);
                    hotpatch::quiescent();
                    thread::yield_now();
                }
                checked
            })
        })
        .collect();
    barrier.wait();
    // Waits until every worker has completed a call that started after
    // this point, and returns the versions those calls returned.
    let next_calls = || -> Vec<u64> {
        // Acquire: pairs with the workers' Release stores.
        let at: Vec<u64> = last
            .iter()
            .map(|l| l.load(Ordering::Acquire) >> 8)
            .collect();
        let started = Instant::now();
        last.iter()
            .zip(at)
            .map(|(l, n)| {
                loop {
                    // Call n + 1 may have started before `at` was read; call
                    // n + 2 started after call n + 1 completed.
                    let word = l.load(Ordering::Acquire);
                    if word >> 8 >= n + 2 {
                        break word & 0xff;
                    }
                    assert!(
                        started.elapsed() < Duration::from_secs(60),
                        "hang: a worker made no call in 60 s"
                    );
                    thread::yield_now();
                }
            })
            .collect()
    };
    for _ in 0..cycles() {
        // 0 = "either" while a transition is in progress.
        expected.store(0, Ordering::Release);
        let p = hotpatch::load(&so).unwrap();
        expected.store(2, Ordering::Release);
        assert_eq!(
            next_calls(),
            [2; WORKERS],
            "a call after load returned ran v1"
        );
        expected.store(0, Ordering::Release);
        p.revert().unwrap();
        expected.store(1, Ordering::Release);
        assert_eq!(
            next_calls(),
            [1; WORKERS],
            "a call after revert returned ran v2"
        );
    }
    stop.store(true, Ordering::Relaxed);
    let checked: Vec<[u64; 3]> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(
        wrong.load(Ordering::Relaxed),
        0,
        "a thread ran a previous version"
    );
    assert!(
        checked.iter().all(|c| c[1] > 0 && c[2] > 0),
        "a worker made no call while v1, or no call while v2, was required: {checked:?}"
    );
}

/// A registered thread that never reaches a safepoint makes the load fail
/// after about the deadline, naming it; nothing changes, and the other
/// registered threads keep completing requests throughout.
#[test]
fn deadline_reverses_and_names_the_stalled_thread() {
    let _serial = serial();
    let so = patch_path();
    let before = hotpatch::functions();
    let workers = spawn_workers(2, true);

    let release = Arc::new(AtomicBool::new(false));
    let stuck_saw_new = Arc::new(AtomicBool::new(false));
    let stuck_ready = Arc::new(Barrier::new(2));
    let stuck = {
        let (release, saw_new, ready) =
            (release.clone(), stuck_saw_new.clone(), stuck_ready.clone());
        thread::Builder::new()
            .name("stuck-in-request".into())
            .spawn(move || {
                let _r = hotpatch::register_thread();
                ready.wait();
                // One long request: never a safepoint until released.
                while !release.load(Ordering::Acquire) {
                    if version() != 1 || request(3) != 1000 {
                        saw_new.store(true, Ordering::Relaxed);
                    }
                }
                hotpatch::quiescent();
            })
            .unwrap()
    };
    stuck_ready.wait();

    let requests_before = workers.done.load(Ordering::Relaxed);
    let deadline = Duration::from_millis(300);
    let started = Instant::now();
    let err = hotpatch::Loader::new()
        .deadline(deadline)
        .load(&so)
        .expect_err("the stuck thread must make the load fail");
    let took = started.elapsed();
    let requests_after = workers.done.load(Ordering::Relaxed);

    match &err {
        hotpatch::Error::Timeout {
            stalled,
            deadline: d,
            ..
        } => {
            assert_eq!(*d, deadline);
            assert_eq!(stalled.len(), 1, "{stalled:?}");
            assert_eq!(stalled[0].name.as_deref(), Some("stuck-in-request"));
            assert!(stalled[0].without_safepoint >= deadline);
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("stuck-in-request"), "{msg}");
    assert!(
        took >= deadline,
        "failed after {took:?}, before the deadline"
    );
    assert_eq!(version(), 1);
    assert_eq!(
        hotpatch::functions(),
        before,
        "slots changed by a failed load"
    );
    assert!(hotpatch::applied().is_empty());
    assert!(
        hotpatch::transition().is_none(),
        "{:?}",
        hotpatch::transition()
    );
    assert!(
        requests_after > requests_before,
        "other threads were blocked"
    );

    release.store(true, Ordering::Release);
    stuck.join().unwrap();
    assert!(
        !stuck_saw_new.load(Ordering::Relaxed),
        "the stuck thread saw new code"
    );
    let reports = workers.finish();
    assert!(
        reports.iter().all(|r| r.mixed == 0 && r.bad == 0),
        "{reports:?}"
    );

    // And the same patch applies fine once the thread is gone.
    let p = hotpatch::load(&so).unwrap();
    assert_eq!(version(), 2);
    p.revert().unwrap();
}

/// A registered thread blocked in `offline()` longer than the deadline
/// does not hold up a load.
#[test]
fn offline_threads_do_not_block_a_load() {
    let _serial = serial();
    let so = patch_path();
    let ready = Arc::new(Barrier::new(2));
    let release = Arc::new(AtomicBool::new(false));
    let sleeper = {
        let (ready, release) = (ready.clone(), release.clone());
        thread::spawn(move || {
            let _r = hotpatch::register_thread();
            assert_eq!(version(), 1);
            hotpatch::while_offline(|| {
                ready.wait();
                while !release.load(Ordering::Acquire) {
                    thread::sleep(Duration::from_millis(5));
                }
            });
            // Back online: at a safepoint, so already on the new code.
            version()
        })
    };
    ready.wait();
    let p = hotpatch::Loader::new()
        .deadline(Duration::from_millis(200))
        .load(&so)
        .expect("an offline thread must not block the load");
    assert_eq!(version(), 2);
    release.store(true, Ordering::Release);
    assert_eq!(sleeper.join().unwrap(), 2);
    p.revert().unwrap();
}

/// While a transition waits, `transition()` says what and for whom, and
/// `functions()` flags the functions involved.
#[test]
fn transition_is_reported_while_in_progress() {
    let _serial = serial();
    let so = patch_path();
    let release = Arc::new(AtomicBool::new(false));
    let ready = Arc::new(Barrier::new(2));
    let holder = {
        let (release, ready) = (release.clone(), ready.clone());
        thread::Builder::new()
            .name("slow-request".into())
            .spawn(move || {
                let _r = hotpatch::register_thread();
                ready.wait();
                while !release.load(Ordering::Acquire) {
                    std::hint::spin_loop();
                }
                hotpatch::quiescent();
                // Keep reaching safepoints so the load can finish.
                for _ in 0..1_000_000 {
                    if version() == 2 {
                        break;
                    }
                    hotpatch::quiescent();
                    thread::yield_now();
                }
            })
            .unwrap()
    };
    ready.wait();
    let loader = thread::spawn(move || hotpatch::load(so));
    let started = Instant::now();
    let info = loop {
        if let Some(t) = hotpatch::transition() {
            break t;
        }
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "no transition seen"
        );
        thread::sleep(Duration::from_millis(1));
    };
    assert!(info.what.contains("fixture-patch-quiesce"), "{}", info.what);
    assert!(info.functions.contains(&"svc::quiesce::version"));
    assert!(!info.reversing);
    assert_eq!(info.waiting_for.len(), 1, "{:?}", info.waiting_for);
    assert_eq!(info.waiting_for[0].name.as_deref(), Some("slow-request"));
    let listed = hotpatch::functions();
    let v = listed
        .iter()
        .find(|f| f.path == "svc::quiesce::version")
        .unwrap();
    assert!(v.in_transition);
    assert_eq!(v.implementation, hotpatch::Implementation::Original);
    release.store(true, Ordering::Release);
    let p = loader.join().unwrap().expect("load after release");
    holder.join().unwrap();
    assert!(hotpatch::transition().is_none());
    p.revert().unwrap();
}

/// The payload of the churn threads' deliberate panics, carrying the
/// thread's count of bad requests: any other panic (a failed check, a
/// panic in the runtime) is told apart from it.
struct PlannedPanic(u64);

/// Threads that register, unregister, exit or panic during transitions
/// do not wedge the runtime, and every request they make is all-old or
/// all-new.
#[test]
fn threads_coming_and_going_and_panicking() {
    let _serial = serial();
    let so = patch_path();
    let stop = Arc::new(AtomicBool::new(false));
    let churn: Vec<_> = (0..2u64)
        .map(|i| {
            let stop = stop.clone();
            thread::spawn(move || {
                // (threads, planned panics, requests, bad requests,
                // other panics)
                let mut tally = (0u64, 0u64, 0u64, 0u64, Vec::<String>::new());
                // Relaxed: `stop` only ends the loop.
                while !stop.load(Ordering::Relaxed) {
                    tally.0 += 1;
                    let n = tally.0;
                    let t = thread::spawn(move || {
                        let _r = hotpatch::register_thread();
                        let mut bad = 0u64;
                        for _ in 0..20 {
                            if request(5) != 1000 {
                                bad += 1;
                            }
                            hotpatch::quiescent();
                        }
                        if (n + i).is_multiple_of(3) {
                            std::panic::panic_any(PlannedPanic(bad));
                        }
                        bad
                    });
                    match t.join() {
                        Ok(bad) => {
                            tally.2 += 20;
                            tally.3 += bad;
                        }
                        Err(payload) if payload.is::<PlannedPanic>() => {
                            let PlannedPanic(bad) = *payload.downcast().unwrap();
                            tally.1 += 1;
                            tally.2 += 20;
                            tally.3 += bad;
                        }
                        Err(payload) => tally.4.push(
                            payload
                                .downcast_ref::<String>()
                                .cloned()
                                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                                .unwrap_or_else(|| "a non-string payload".into()),
                        ),
                    }
                }
                tally
            })
        })
        .collect();
    // Silence only the planned panics; anything else is reported as usual.
    let prev_hook: Arc<dyn Fn(&std::panic::PanicHookInfo<'_>) + Send + Sync> =
        Arc::from(std::panic::take_hook());
    {
        let prev_hook = prev_hook.clone();
        std::panic::set_hook(Box::new(move |info| {
            if !info.payload().is::<PlannedPanic>() {
                prev_hook(info);
            }
        }));
    }
    for _ in 0..(cycles() / 3).max(50) {
        let p = hotpatch::Loader::new()
            .deadline(Duration::from_secs(10))
            .load(&so)
            .unwrap();
        p.revert().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let tallies: Vec<_> = churn.into_iter().map(|h| h.join().unwrap()).collect();
    let _ = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| prev_hook(info)));
    let spawned: u64 = tallies.iter().map(|t| t.0).sum();
    let planned: u64 = tallies.iter().map(|t| t.1).sum();
    let requests: u64 = tallies.iter().map(|t| t.2).sum();
    let bad: u64 = tallies.iter().map(|t| t.3).sum();
    let other: Vec<&String> = tallies.iter().flat_map(|t| &t.4).collect();
    assert!(other.is_empty(), "threads panicked unexpectedly: {other:?}");
    assert_eq!(bad, 0, "{bad} of {requests} requests mixed or wrong");
    assert!(
        spawned > 0 && planned > 0 && requests > 0,
        "{spawned} threads, {planned} planned panics, {requests} requests"
    );
    // Nothing left registered: an immediate load works with a tiny deadline.
    let p = hotpatch::Loader::new()
        .deadline(Duration::from_millis(50))
        .load(&so)
        .unwrap();
    p.revert().unwrap();
}

/// A registered thread that calls `load` itself is at a safepoint: it
/// switches at once, and the load does not wait for it.
#[test]
fn registered_thread_can_load() {
    let _serial = serial();
    let so = patch_path();
    let _r = hotpatch::register_thread();
    let p = hotpatch::Loader::new()
        .deadline(Duration::from_millis(100))
        .load(&so)
        .unwrap();
    assert_eq!(version(), 2);
    assert_eq!(request(9), 1000);
    p.revert().unwrap();
    assert_eq!(version(), 1);
}

/// Long version of the stress test, for `cargo test -- --ignored`.
#[test]
#[ignore = "long: minutes of apply/revert under load"]
fn registered_threads_never_mix_versions_long() {
    let _serial = serial();
    let workers = spawn_workers(4, true);
    apply_revert_cycles(cycles() * 50);
    let reports = workers.finish();
    assert!(
        reports.iter().all(|r| r.mixed == 0 && r.bad == 0),
        "{reports:?}"
    );
}

/// Reversals under load: with a zero deadline nearly every load gives up
/// and reverses at once, racing the workers' safepoints. No request may
/// mix versions. (The narrowest race here, a worker between reading the
/// target and storing its adoption while a reversal polls, is fixed by
/// `Record::adopt_latest`; this test did not hit it in 15 s with the fix
/// removed, the loom model `deadline_reversal` does every time.)
#[test]
fn reversals_never_mix_versions() {
    let _serial = serial();
    let so = patch_path();
    let workers = spawn_workers(4, true);
    let loader = hotpatch::Loader::new().deadline(Duration::ZERO);
    let (mut applied, mut reversed) = (0u32, 0u32);
    let started = Instant::now();
    // Each load reads and hashes the file (~10 ms in a debug build).
    while applied + reversed < (cycles() / 4) as u32 {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "hang: {applied} applied and {reversed} reversed in 300 s"
        );
        match loader.load(&so) {
            Ok(p) => {
                applied += 1;
                // Revert with a normal deadline: it must succeed.
                p.revert().expect("revert");
            }
            Err(hotpatch::Error::Timeout { .. }) => reversed += 1,
            // A reversal still finishing in the background holds the turn.
            Err(hotpatch::Error::Busy { .. }) => thread::yield_now(),
            Err(e) => panic!("{e}"),
        }
    }
    // Let a background reversal finish before the check below.
    let p = hotpatch::load(&so).expect("load after the reversals");
    p.revert().unwrap();
    let reports = workers.finish();
    let mixed: u64 = reports.iter().map(|r| r.mixed).sum();
    let bad: u64 = reports.iter().map(|r| r.bad).sum();
    assert!(reversed > 0, "no reversal happened ({applied} applied)");
    assert_eq!(bad, 0);
    assert_eq!(mixed, 0, "{mixed} mixed requests over {reversed} reversals");
    assert_eq!(version(), 1);
}

/// A registered thread held inside one long request (no safepoint) until
/// released; it records its kernel thread id.
struct Staller {
    release: Arc<AtomicBool>,
    os_tid: i64,
    handle: Option<thread::JoinHandle<()>>,
}

fn stall(name: &str) -> Staller {
    let release = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = {
        let release = release.clone();
        thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let _r = hotpatch::register_thread();
                // SAFETY: gettid has no preconditions.
                tx.send(i64::from(unsafe { libc::gettid() })).unwrap();
                // Acquire: pairs with the Release store in `Staller::release`.
                while !release.load(Ordering::Acquire) {
                    std::hint::black_box(version());
                    std::hint::spin_loop();
                }
                hotpatch::quiescent();
            })
            .unwrap()
    };
    let os_tid = rx.recv().unwrap();
    Staller {
        release,
        os_tid,
        handle: Some(handle),
    }
}

impl Staller {
    fn release(mut self) {
        // Release: lets the thread leave its request.
        self.release.store(true, Ordering::Release);
        self.handle.take().unwrap().join().unwrap();
    }
}

/// A failing test releases its stalled thread too, so the transitions of
/// the next tests are not held up by it.
impl Drop for Staller {
    fn drop(&mut self) {
        // Release: as in `release`.
        self.release.store(true, Ordering::Release);
    }
}

/// A copy of the quiesce patch with other bytes: another library with the
/// same functions (to replace the applied one by).
fn quiesce_copy(tag: &str) -> std::path::PathBuf {
    let mut bytes = std::fs::read(patch_path()).unwrap();
    bytes.extend_from_slice(format!("\0hotpatch quiescence: {tag}\0").as_bytes());
    support::write_temp(&format!("quiesce-{tag}.so"), &bytes)
}

/// The stalled threads a `Timeout` names are the ones that stalled: their
/// names, kernel thread ids and distinct runtime ids.
#[test]
fn timeout_names_each_stalled_thread_by_its_ids() {
    let _serial = serial();
    let so = patch_path();
    let (a, b) = (stall("stalled-a"), stall("stalled-b"));
    let deadline = Duration::from_millis(200);
    let err = hotpatch::Loader::new()
        .deadline(deadline)
        .load(&so)
        .expect_err("two stalled threads");
    let mut stalled = match err {
        hotpatch::Error::Timeout { stalled, .. } => stalled,
        other => panic!("expected Timeout, got {other:?}"),
    };
    stalled.sort_by(|x, y| x.name.cmp(&y.name));
    let named: Vec<_> = stalled
        .iter()
        .map(|t| (t.name.as_deref(), t.os_tid))
        .collect();
    assert_eq!(
        named,
        [(Some("stalled-a"), a.os_tid), (Some("stalled-b"), b.os_tid)]
    );
    assert_ne!(stalled[0].id, stalled[1].id, "{stalled:?}");
    assert!(stalled.iter().all(|t| t.without_safepoint >= deadline));
    assert_eq!(version(), 1);
    a.release();
    b.release();
}

/// A revert that times out leaves the patch applied, every slot as it
/// was, and returns `Timeout`; so does a replace, which keeps the old
/// patch. Both succeed once the thread reaches a safepoint.
#[test]
fn revert_and_replace_that_time_out_keep_the_patch() {
    let _serial = serial();
    let so = patch_path();
    let p = hotpatch::load(&so).unwrap();
    let applied = hotpatch::applied();
    let before = hotpatch::functions();
    let stuck = stall("stuck-in-revert");
    let loader = hotpatch::Loader::new().deadline(Duration::from_millis(200));

    match loader.revert_id(p.id()) {
        Err(hotpatch::Error::Timeout { stalled, .. }) => {
            assert_eq!(stalled.len(), 1, "{stalled:?}");
            assert_eq!(stalled[0].os_tid, stuck.os_tid);
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
    assert_eq!(hotpatch::applied(), applied, "the patch stays applied");
    assert_eq!(
        hotpatch::functions(),
        before,
        "slots changed by a failed revert"
    );
    assert_eq!(version(), 2);
    assert!(hotpatch::transition().is_none());

    let v2 = quiesce_copy("replace-timeout");
    match loader.replace(p.id(), &v2) {
        Err(hotpatch::Error::Timeout { stalled, .. }) => {
            assert_eq!(stalled.len(), 1, "{stalled:?}");
            assert_eq!(stalled[0].os_tid, stuck.os_tid);
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
    assert_eq!(hotpatch::applied(), applied, "the old patch stays applied");
    assert_eq!(
        hotpatch::functions(),
        before,
        "slots changed by a failed replace"
    );
    assert_eq!(version(), 2);

    stuck.release();
    let replaced = loader.replace(p.id(), &v2).expect("replace once released");
    assert_eq!(version(), 2);
    assert_eq!(hotpatch::applied(), [replaced.info().clone()]);
    replaced.revert().unwrap();
    assert_eq!(version(), 1);
}

/// While one transition waits for a stalled thread, a second load or
/// revert waits for its turn within its own deadline, then fails with
/// `Busy`, changing nothing; the first completes once the thread moves.
#[test]
fn a_second_transition_while_one_waits_is_busy() {
    let _serial = serial();
    let so = patch_path();
    let other = hotpatch::load(quiesce_copy("busy")).unwrap();
    let applied = hotpatch::applied();
    let stuck = stall("holds-the-turn");
    // The first transition: a revert that waits (up to 60 s) for `stuck`.
    let first = {
        let id = other.id();
        thread::spawn(move || {
            hotpatch::Loader::new()
                .deadline(Duration::from_secs(60))
                .revert_id(id)
        })
    };
    let started = Instant::now();
    while hotpatch::transition().is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "hang: no transition"
        );
        thread::sleep(Duration::from_millis(1));
    }
    let before = hotpatch::functions();
    let waited = Duration::from_millis(150);
    let loader = hotpatch::Loader::new().deadline(waited);
    match loader.load(&so) {
        Err(hotpatch::Error::Busy { what, waited: w }) => {
            assert_eq!(w, waited);
            assert!(what.starts_with("load "), "{what}");
        }
        other => panic!("expected Busy, got {other:?}"),
    }
    match loader.revert_id(other.id()) {
        Err(hotpatch::Error::Busy { what, .. }) => {
            assert!(what.starts_with("revert "), "{what}")
        }
        other => panic!("expected Busy, got {other:?}"),
    }
    assert_eq!(hotpatch::functions(), before, "a busy call changed a slot");
    assert_eq!(hotpatch::applied(), applied);
    assert!(!first.is_finished(), "the first transition did not wait");

    stuck.release();
    first.join().unwrap().expect("the waiting revert completes");
    assert!(hotpatch::applied().is_empty());
    assert_eq!(version(), 1);
}
