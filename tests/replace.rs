//! `Loader::replace(old, path)`: a cumulative patch takes the place of an
//! applied one in a single transition.
//!
//! `fixture-patch-replace-v1`: `step_a(x) = x + 7`, `step_b(x) = 993 - x`,
//! `step_c() = 11`. `fixture-patch-replace-v2`: `step_a(x) = x + 13`,
//! `step_b(x) = 987 - x`, `step_d() = 22`, and no longer `step_c`.
//! `step_a(x) + step_b(x) == 1000` in each version, and not in a request
//! that mixes two.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;

use hotpatch::{Error, Implementation, Loader, PatchId};
use svc::{step_a, step_b, step_c, step_d};

const V1: &str = "fixture-patch-replace-v1";
const V2: &str = "fixture-patch-replace-v2";
const STACK_A: &str = "fixture-patch-stack-a";

fn steps() -> (u64, u64, u64, u64) {
    (step_a(5), step_b(5), step_c(), step_d())
}

const ORIGINAL: (u64, u64, u64, u64) = (5, 995, 1, 1);
const WITH_V1: (u64, u64, u64, u64) = (12, 988, 11, 1);
const WITH_V2: (u64, u64, u64, u64) = (18, 982, 1, 22);

/// Everything the registry says and a caller sees.
fn snapshot() -> (support::Snapshot, (u64, u64, u64, u64)) {
    (support::snapshot(), steps())
}

fn patched_by(path: &str, id: PatchId, name: &str) {
    assert_eq!(
        support::implementation(path),
        Implementation::Patch {
            id,
            name: name.to_owned()
        },
        "{path}"
    );
}

#[test]
fn a_cumulative_patch_replaces_the_applied_one() {
    let _serial = support::serial();
    let (v1_so, v2_so) = (support::patch(V1), support::patch(V2));
    // An unrelated patch underneath, which the replace must not touch.
    let stack_a = hotpatch::load(support::patch(STACK_A)).unwrap();
    let calls = support::calls();

    let v1 = hotpatch::load(&v1_so).unwrap();
    let v1_id = v1.id();
    assert_eq!(steps(), WITH_V1);

    let v2 = Loader::new().replace(v1_id, &v2_so).unwrap();
    assert_eq!(steps(), WITH_V2, "step_c back to the original, step_d new");
    assert_eq!(
        hotpatch::applied(),
        [stack_a.info().clone(), v2.info().clone()],
        "v1 is gone, v2 is on top"
    );
    assert_eq!(
        v2.functions(),
        ["svc::step_a", "svc::step_b", "svc::step_d"]
    );
    patched_by("svc::step_a", v2.id(), V2);
    patched_by("svc::step_b", v2.id(), V2);
    patched_by("svc::step_d", v2.id(), V2);
    assert_eq!(
        support::implementation("svc::step_c"),
        Implementation::Original
    );
    assert_eq!(support::calls(), calls, "stack-a's functions untouched");

    // v1 is no longer applied, under its id or its handle.
    assert!(matches!(hotpatch::revert(v1_id), Err(Error::NotApplied { id }) if id == v1_id));
    assert!(matches!(v1.revert(), Err(Error::NotApplied { id }) if id == v1_id));

    v2.revert().unwrap();
    assert_eq!(steps(), ORIGINAL);
    for f in ["svc::step_a", "svc::step_b", "svc::step_c", "svc::step_d"] {
        assert_eq!(support::implementation(f), Implementation::Original, "{f}");
    }
    assert_eq!(hotpatch::applied(), [stack_a.info().clone()]);
    stack_a.revert().unwrap();
}

/// Replacing back and forth reuses each library.
#[test]
fn replace_back_and_forth() {
    let _serial = support::serial();
    let (v1_so, v2_so) = (support::patch(V1), support::patch(V2));
    let mut current = hotpatch::load(&v1_so).unwrap();
    for i in 0..10u32 {
        let (next, expected) = if i.is_multiple_of(2) {
            (&v2_so, WITH_V2)
        } else {
            (&v1_so, WITH_V1)
        };
        current = Loader::new().replace(current.id(), next).unwrap();
        assert_eq!(steps(), expected, "round {i}");
        assert_eq!(hotpatch::applied(), [current.info().clone()]);
    }
    current.revert().unwrap();
    assert_eq!(steps(), ORIGINAL);
}

#[test]
fn replacing_a_patch_that_is_not_applied() {
    let _serial = support::serial();
    let (v1_so, v2_so) = (support::patch(V1), support::patch(V2));
    let gone = hotpatch::load(&v1_so).unwrap();
    let gone_id = gone.id();
    gone.revert().unwrap();
    let stack_a = hotpatch::load(support::patch(STACK_A)).unwrap();
    let before = snapshot();

    let err = Loader::new()
        .replace(gone_id, &v2_so)
        .expect_err("nothing to replace");
    assert!(
        matches!(err, Error::NotApplied { id } if id == gone_id),
        "{err:?}"
    );
    assert_eq!(snapshot(), before, "nothing changed");
    stack_a.revert().unwrap();
}

/// Refusals of the new patch leave the old one applied and everything as
/// it was.
#[test]
fn a_replace_by_a_refused_patch_changes_nothing() {
    let _serial = support::serial();
    let v1_so = support::patch(V1);
    let stack_a = hotpatch::load(support::patch(STACK_A)).unwrap();
    let v1 = hotpatch::load(&v1_so).unwrap();
    let before = snapshot();
    assert_eq!(before.1, WITH_V1);

    // Fails validation: replaces `answer` twice.
    let dup = support::patch("fixture-patch-duplicate");
    let err = Loader::new().replace(v1.id(), &dup).expect_err("duplicate");
    assert!(
        matches!(&err, Error::DuplicateTarget { path, function } if path == &dup && function == "svc::answer"),
        "{err:?}"
    );
    assert_eq!(snapshot(), before);

    // Fails the manifest check.
    let magic = support::patch("fixture-patch-bad-magic");
    let err = Loader::new()
        .replace(v1.id(), &magic)
        .expect_err("bad magic");
    assert!(
        matches!(&err, Error::BadMagic { path, .. } if path == &magic),
        "{err:?}"
    );
    assert_eq!(snapshot(), before);

    // The same bytes as the patch being replaced.
    let err = Loader::new()
        .replace(v1.id(), &v1_so)
        .expect_err("already applied");
    assert!(
        matches!(&err, Error::AlreadyApplied { id, .. } if *id == v1.id()),
        "{err:?}"
    );
    assert_eq!(snapshot(), before);

    v1.revert().unwrap();
    stack_a.revert().unwrap();
}

/// A request's `(x, step_a(x), step_b(x))`.
type Request = (u64, u64, u64);

/// Runs `threads` workers doing `step_a`/`step_b` requests until
/// `stop`; each counts in `seen` and returns (requests, requests that
/// mixed versions or saw the original).
fn spawn_workers(
    threads: usize,
    registered: bool,
    stop: &Arc<AtomicBool>,
    seen: &Arc<AtomicU64>,
) -> Vec<thread::JoinHandle<(u64, Vec<Request>)>> {
    let barrier = Arc::new(Barrier::new(threads + 1));
    let handles = (0..threads)
        .map(|t| {
            let (stop, seen, barrier) = (stop.clone(), seen.clone(), barrier.clone());
            thread::Builder::new()
                .name(format!("replace-worker-{t}"))
                .spawn(move || {
                    let _registered = registered.then(hotpatch::register_thread);
                    barrier.wait();
                    let (mut done, mut wrong) = (0u64, Vec::new());
                    let mut x = t as u64;
                    while !stop.load(Ordering::Relaxed) {
                        x = (x + 1) % 500;
                        let a = step_a(x);
                        for _ in 0..50 {
                            std::hint::spin_loop();
                        }
                        let b = step_b(x);
                        // v1 shifts by 7, v2 by 13, both keep the sum.
                        let shift = a.wrapping_sub(x);
                        if a + b != 1000 || (shift != 7 && shift != 13) {
                            wrong.push((x, a, b));
                            seen.fetch_add(1, Ordering::Relaxed);
                        }
                        done += 1;
                        hotpatch::quiescent();
                    }
                    (done, wrong)
                })
                .unwrap()
        })
        .collect();
    barrier.wait();
    handles
}

/// Four registered threads run requests that call `step_a` and `step_b`
/// and check they add up: across many replaces v1 -> v2 -> v1 ..., no
/// request sees two versions, and none sees the original (a replace never
/// passes through "neither patch").
#[test]
fn registered_threads_never_see_a_mixed_request() {
    let _serial = support::serial();
    let (v1_so, v2_so) = (support::patch(V1), support::patch(V2));
    const THREADS: usize = 4;
    let cycles: u32 = std::env::var("HOTPATCH_STRESS_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);

    let mut current = hotpatch::load(&v1_so).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(AtomicU64::new(0));
    let handles = spawn_workers(THREADS, true, &stop, &seen);
    for i in 0..cycles {
        let next = if i.is_multiple_of(2) { &v2_so } else { &v1_so };
        current = Loader::new().replace(current.id(), next).unwrap();
        assert_eq!(hotpatch::applied(), [current.info().clone()]);
    }
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        let (done, wrong) = h.join().expect("worker panicked");
        // Each replace waited for every worker to pass a safepoint, so
        // each worker finished requests.
        assert!(done > 0);
        assert!(
            wrong.is_empty(),
            "{} of {done} requests mixed versions or saw the original: {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(5)]
        );
    }
    current.revert().unwrap();
    assert_eq!(steps(), ORIGINAL);
}

/// The control: unregistered threads doing the same requests do see
/// mixed ones (each call is still v1 or v2), so the invariant the previous
/// test checks is one a replace can break.
#[test]
fn unregistered_threads_can_see_a_mixed_request() {
    let _serial = support::serial();
    let (v1_so, v2_so) = (support::patch(V1), support::patch(V2));
    let mut current = hotpatch::load(&v1_so).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(AtomicU64::new(0));
    let handles = spawn_workers(2, false, &stop, &seen);
    let mut cycles = 0u64;
    // Bounded only so that a broken control fails instead of hanging.
    while seen.load(Ordering::Relaxed) == 0 && cycles < 20_000 {
        let next = if cycles.is_multiple_of(2) {
            &v2_so
        } else {
            &v1_so
        };
        current = Loader::new().replace(current.id(), next).unwrap();
        cycles += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let mut mixed = Vec::new();
    for h in handles {
        let (_, wrong) = h.join().expect("worker panicked");
        mixed.extend(wrong);
    }
    current.revert().unwrap();
    assert!(!mixed.is_empty(), "no mixed request in {cycles} replaces");
    for (x, a, b) in mixed {
        // Mixed, never torn: each call is v1's or v2's.
        assert!(a == x + 7 || a == x + 13, "{x} {a}");
        assert!(b == 993 - x || b == 987 - x, "{x} {b}");
    }
}
