//! No torn calls: while patches are applied and reverted as fast as the
//! runtime allows, every call returns what exactly one implementation
//! returns, the old or the new, and nothing else.
//!
//! The fast versions always run; the long ones are `#[ignore]`d
//! (`cargo test --test stress -- --ignored`).

mod support;

use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;

const THREADS: usize = 4;

/// Calls `call(x)` in a tight loop on `THREADS` threads, which start
/// together on a barrier, while the main thread runs `patcher`. `check`
/// says which of `kinds` implementations produced a result, or `None`
/// for a torn one, which fails the test. Returns the number of calls.
///
/// Then, for each `(step, want)` of `settle`: runs `step` (which may
/// apply a patch) and waits until every thread has seen implementation
/// `want` in a call that started after `step` (so every thread provably
/// ran throughout and sees what is current), then reverts the patch.
fn hammer(
    kinds: usize,
    call: impl Fn(u64) -> u64 + Sync,
    check: impl Fn(u64, u64) -> Option<usize> + Sync,
    patcher: impl FnOnce(),
    settle: &[(&dyn Fn() -> Option<hotpatch::Patch>, usize)],
) -> u64 {
    let stop = AtomicBool::new(false);
    let barrier = Barrier::new(THREADS + 1);
    let epoch = AtomicUsize::new(0);
    // seen[t][k]: the latest epoch in which thread t started a call that
    // implementation k answered.
    let seen: Vec<Vec<AtomicUsize>> = (0..THREADS)
        .map(|_| (0..kinds).map(|_| AtomicUsize::new(0)).collect())
        .collect();
    thread::scope(|s| {
        let workers: Vec<_> = seen
            .iter()
            .enumerate()
            .map(|(t, seen)| {
                let (stop, barrier, epoch) = (&stop, &barrier, &epoch);
                let (call, check) = (&call, &check);
                s.spawn(move || {
                    let mut calls = 0u64;
                    barrier.wait();
                    // Relaxed: `stop` only ends the loop.
                    while !stop.load(Ordering::Relaxed) {
                        // Acquire: pairs with the Release below; a call
                        // that starts after reading epoch e sees every
                        // patch applied before e was published.
                        let e = epoch.load(Ordering::Acquire);
                        let x = ((t as u64) << 32) | (calls & 0xffff_ffff);
                        let r = call(x);
                        let Some(kind) = check(x, r) else {
                            panic!("torn call: f({x}) = {r}");
                        };
                        // Release: pairs with the main thread's Acquire.
                        seen[kind].fetch_max(e, Ordering::Release);
                        calls += 1;
                    }
                    calls
                })
            })
            .collect();

        barrier.wait();
        patcher();
        for (step, want) in settle {
            let patch = step();
            // Release: publishes what `step` did to workers that read it.
            let e = epoch.fetch_add(1, Ordering::Release) + 1;
            // Acquire: pairs with the workers' Release.
            while seen.iter().any(|s| s[*want].load(Ordering::Acquire) < e) {
                thread::yield_now();
            }
            if let Some(p) = patch {
                p.revert().unwrap();
            }
        }
        stop.store(true, Ordering::Relaxed);
        workers.into_iter().map(|w| w.join().unwrap()).sum()
    })
}

/// `hammer(x)` is `x`, or `x + 1000` under `fixture-patch-stack-a`.
fn apply_revert(cycles: usize) {
    let _serial = support::serial();
    let so = support::patch("fixture-patch-stack-a");
    let load = || Some(hotpatch::load(&so).unwrap());
    let none = || None;
    let calls = hammer(
        2,
        svc::hammer,
        |x, r| match r.checked_sub(x) {
            Some(0) => Some(0),
            Some(1000) => Some(1),
            _ => None,
        },
        || {
            for _ in 0..cycles {
                let patch = hotpatch::load(&so).unwrap();
                patch.revert().unwrap();
            }
        },
        // Every thread sees the patch, then the original again.
        &[(&load, 1), (&none, 0)],
    );
    assert!(calls > 0);
    assert_eq!(svc::hammer(7), 7);
}

/// `add(2, 3)` is 5; 1005 under A; 2005 under B (whether or not A is
/// applied under it).
fn stacked(cycles: usize) {
    let _serial = support::serial();
    let (a_so, b_so) = (
        support::patch("fixture-patch-stack-a"),
        support::patch("fixture-patch-stack-b"),
    );
    hammer(
        3,
        |_| svc::add(2, 3),
        |_, r| match r {
            5 => Some(0),
            1005 => Some(1),
            2005 => Some(2),
            _ => None,
        },
        || {
            for i in 0..cycles {
                let a = hotpatch::load(&a_so).unwrap();
                let b = hotpatch::load(&b_so).unwrap();
                // Alternate the revert order.
                if i % 2 == 0 {
                    a.revert().unwrap();
                    b.revert().unwrap();
                } else {
                    b.revert().unwrap();
                    a.revert().unwrap();
                }
            }
        },
        &[],
    );
    assert_eq!(svc::add(2, 3), 5);
}

// Each load reads and hashes the whole patch file; in a debug build of
// the runtime, with four threads spinning on two cores, that is ~10 ms.
// Hence a few hundred cycles here, and many more in the long versions.

#[test]
fn no_torn_calls_during_apply_and_revert() {
    apply_revert(200);
}

#[test]
fn no_torn_calls_while_patches_stack_and_unstack() {
    stacked(80);
}

#[test]
#[ignore = "long: run with --ignored"]
fn no_torn_calls_during_apply_and_revert_long() {
    apply_revert(20_000);
}

#[test]
#[ignore = "long: run with --ignored"]
fn no_torn_calls_while_patches_stack_and_unstack_long() {
    stacked(10_000);
}
