//! Unloading: never by default; `Loader::reclaim` (unsafe, opt-in) closes
//! the libraries of reverted patches after a grace period.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use hotpatch::{Error, Loader};

fn copies(package: &str) -> usize {
    let file = format!("lib{}.so", package.replace('-', "_"));
    support::mapped_files(&format!("/memfd:hotpatch:{file}")).len()
}

/// Threads that ran a reverted patch's thread-local code exit after the
/// revert: their destructors are patch code, which must still be mapped.
/// By default it is, forever.
#[test]
fn thread_local_destructors_of_a_reverted_patch_run_safely() {
    let _serial = support::serial();
    let so = support::patch("fixture-patch-tls");
    let drops_before = svc::TLS_DROPS.load(Ordering::SeqCst);
    let patch = hotpatch::load(&so).unwrap();

    const THREADS: usize = 4;
    let used = Arc::new(Barrier::new(THREADS + 1));
    let reverted = Arc::new(Barrier::new(THREADS + 1));
    let handles: Vec<_> = (0..THREADS)
        .map(|_| {
            let (used, reverted) = (used.clone(), reverted.clone());
            thread::spawn(move || {
                assert_eq!(svc::touch_tls(), 101);
                assert_eq!(svc::touch_tls(), 102);
                used.wait();
                reverted.wait();
                assert_eq!(svc::touch_tls(), 0, "reverted");
                // Exits here: the patch's destructor runs.
            })
        })
        .collect();
    used.wait();
    patch.revert().unwrap();
    reverted.wait();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(
        svc::TLS_DROPS.load(Ordering::SeqCst) - drops_before,
        THREADS as u64,
        "every thread's destructor ran, in patch code, after the revert"
    );
    assert!(copies("fixture-patch-tls") >= 1, "still mapped");
}

/// Reclaim closes a reverted patch's library; loading it again opens a
/// fresh copy.
#[test]
fn reclaim_closes_reverted_libraries() {
    let _serial = support::serial();
    let so = support::patch("fixture-patch-reclaim");
    let patch = hotpatch::load(&so).unwrap();
    assert_eq!(svc::reclaim_target(), 2);

    // SAFETY: no thread of this test binary keeps anything from the patch.
    let kept = unsafe { Loader::new().reclaim() }.unwrap();
    assert_eq!(
        copies("fixture-patch-reclaim"),
        1,
        "applied: kept ({kept:?})"
    );

    patch.revert().unwrap();
    assert_eq!(svc::reclaim_target(), 1);
    assert_eq!(copies("fixture-patch-reclaim"), 1);
    // SAFETY: as above.
    let done = unsafe { Loader::new().reclaim() }.unwrap();
    assert!(done.closed >= 1, "{done:?}");
    assert_eq!(copies("fixture-patch-reclaim"), 0, "unmapped: {done:?}");

    let again = hotpatch::load(&so).unwrap();
    assert_eq!(svc::reclaim_target(), 2);
    assert_eq!(copies("fixture-patch-reclaim"), 1);
    again.revert().unwrap();
    // SAFETY: as above.
    unsafe { Loader::new().reclaim() }.unwrap();
    assert_eq!(copies("fixture-patch-reclaim"), 0);
}

/// A thin patch registers its thread-local destructors through the host's
/// std, so the C library counts them against the host and would unmap the
/// patch's code under them: `reclaim` keeps such a library (the loader
/// saw the registration in its symbols), the destructors run safely at
/// thread exit, and loading the same bytes again reuses it.
#[test]
fn reclaim_keeps_a_library_with_thread_local_destructors() {
    let _serial = support::serial();
    let so = support::patch("fixture-patch-tls");
    let drops_before = svc::TLS_DROPS.load(Ordering::SeqCst);
    let patch = hotpatch::load(&so).unwrap();
    let used = Arc::new(Barrier::new(2));
    let release = Arc::new(Barrier::new(2));
    let worker = {
        let (used, release) = (used.clone(), release.clone());
        thread::spawn(move || {
            assert!(svc::touch_tls() > 100);
            used.wait();
            release.wait();
        })
    };
    used.wait();
    patch.revert().unwrap();
    // SAFETY: the worker keeps nothing from the patch but its
    // thread-local, whose library `reclaim` keeps.
    let done = unsafe { Loader::new().reclaim() }.unwrap();
    assert!(done.kept >= 1, "kept for its destructors: {done:?}");
    assert_eq!(
        copies("fixture-patch-tls"),
        1,
        "still mapped for the destructor: {done:?}"
    );

    // The same bytes again: the same library, so the worker's thread-local
    // and a new thread's are both its own.
    let again = hotpatch::load(&so).unwrap();
    let fresh = thread::spawn(svc::touch_tls).join().unwrap();
    assert_eq!(fresh, 101, "a fresh thread's own thread-local");
    assert_eq!(copies("fixture-patch-tls"), 1, "reused, not mapped twice");
    again.revert().unwrap();

    release.wait();
    worker.join().unwrap();
    assert_eq!(svc::TLS_DROPS.load(Ordering::SeqCst) - drops_before, 2);
}

/// A registered thread held in one long request (no safepoint) until
/// `release` is set; released on drop too, so a failing test does not
/// leave it holding up the next.
struct LongRequest {
    release: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<()>>,
}

fn long_request() -> LongRequest {
    let release = Arc::new(AtomicBool::new(false));
    let in_request = Arc::new(Barrier::new(2));
    let handle = {
        let (in_request, release) = (in_request.clone(), release.clone());
        thread::Builder::new()
            .name("long-request".into())
            .spawn(move || {
                let _registered = hotpatch::register_thread();
                in_request.wait();
                // Acquire: pairs with the Release store in `finish`/`drop`.
                while !release.load(Ordering::Acquire) {
                    assert_eq!(svc::reclaim_target(), 1);
                    thread::yield_now();
                }
                hotpatch::quiescent();
            })
            .unwrap()
    };
    in_request.wait();
    LongRequest {
        release,
        handle: Some(handle),
    }
}

impl LongRequest {
    fn finish(mut self) {
        // Release: lets the thread reach its safepoint.
        self.release.store(true, Ordering::Release);
        self.handle.take().unwrap().join().unwrap();
    }
}

impl Drop for LongRequest {
    fn drop(&mut self) {
        // Release: as in `finish`.
        self.release.store(true, Ordering::Release);
    }
}

/// Reclaim closes nothing if a registered thread does not pass a
/// safepoint before the deadline.
#[test]
fn reclaim_refuses_at_the_deadline() {
    let _serial = support::serial();
    let so = support::patch("fixture-patch-reclaim");
    hotpatch::load(&so).unwrap().revert().unwrap();
    assert_eq!(copies("fixture-patch-reclaim"), 1);

    let worker = long_request();
    // SAFETY: nothing uses the patch (reverted before the worker started);
    // the call must refuse anyway.
    let err = unsafe { Loader::new().deadline(Duration::from_millis(200)).reclaim() }.unwrap_err();
    match &err {
        Error::Timeout { stalled, .. } => {
            assert_eq!(stalled.len(), 1, "{stalled:?}");
            assert_eq!(stalled[0].name.as_deref(), Some("long-request"))
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
    assert_eq!(copies("fixture-patch-reclaim"), 1, "nothing closed");
    worker.finish();
    // SAFETY: as above.
    let done = unsafe { Loader::new().reclaim() }.unwrap();
    assert!(done.closed >= 1, "{done:?}");
    assert_eq!(copies("fixture-patch-reclaim"), 0);
}

/// Reclaim waits for a registered thread in the middle of a request: it
/// has not returned, and nothing is unmapped, while the thread stalls;
/// once the thread reaches a safepoint the same call succeeds and unmaps.
#[test]
fn reclaim_waits_for_registered_threads() {
    let _serial = support::serial();
    let so = support::patch("fixture-patch-reclaim");
    let patch = hotpatch::load(&so).unwrap();
    let id = patch.id();
    patch.revert().unwrap();
    assert_eq!(copies("fixture-patch-reclaim"), 1);

    let worker = long_request();
    let reclaim = thread::spawn(|| {
        // SAFETY: every thread that calls patchable functions here is
        // registered (the worker) or calls none (this one, the test's);
        // nothing keeps pointers from the patch.
        unsafe { Loader::new().deadline(Duration::from_secs(60)).reclaim() }
    });
    // The reclaim holds the transition turn once it is waiting: a probe
    // that takes the turn is then `Busy` (and `NotApplied` before that).
    let probe = Loader::new().deadline(Duration::ZERO);
    let started = std::time::Instant::now();
    loop {
        match probe.revert_id(id) {
            Err(Error::Busy { .. }) => break,
            Err(Error::NotApplied { .. }) => {}
            other => panic!("probe: {other:?}"),
        }
        assert!(
            !reclaim.is_finished(),
            "reclaim returned without waiting: {:?}",
            reclaim.join()
        );
        assert!(started.elapsed() < Duration::from_secs(30), "hang");
        thread::yield_now();
    }
    // Give a wrong reclaim every chance to return or unmap early.
    for _ in 0..20 {
        thread::sleep(Duration::from_millis(10));
        assert!(
            !reclaim.is_finished(),
            "reclaim returned while the worker stalls"
        );
        assert_eq!(
            copies("fixture-patch-reclaim"),
            1,
            "unmapped while the worker stalls"
        );
    }

    worker.finish();
    let done = reclaim
        .join()
        .unwrap()
        .expect("reclaim once the worker passed a safepoint");
    assert!(done.closed >= 1, "{done:?}");
    assert_eq!(copies("fixture-patch-reclaim"), 0, "unmapped: {done:?}");
}
