//! No torn calls: while patches are applied and reverted as fast as the
//! runtime allows, every call returns what exactly one implementation
//! returns, the old or the new, and nothing else.
//!
//! Every cycle loads fresh bytes (a copy of the fixture with a tag
//! appended, as tests/faults.rs does): loading bytes already opened reuses
//! that library, so with one file the moment a newly opened library's
//! slots go live would be hit once per run. Patch C's replacements call
//! back into the host and allocate, so that moment also covers code that
//! crosses back into the host.
//!
//! The fast versions always run; the long ones are `#[ignore]`d
//! (`cargo test --test stress -- --ignored`).

mod support;

use std::path::PathBuf;
use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread;

const THREADS: usize = 4;

const STACK_A: &str = "fixture-patch-stack-a";
const STACK_B: &str = "fixture-patch-stack-b";
const STACK_C: &str = "fixture-patch-stack-c";

/// A copy of `package`'s library with `tag` appended (past the loadable
/// segments, so it loads the same): bytes no library of this process has
/// yet, so loading it opens a new library.
fn fresh(package: &str, tag: usize) -> PathBuf {
    let mut bytes = std::fs::read(support::patch(package)).unwrap();
    bytes.extend_from_slice(format!("\0hotpatch stress: {tag}\0").as_bytes());
    support::write_temp(&format!("{package}-stress-{tag}.so"), &bytes)
}

/// The library of cycle `i` for `package`: fresh bytes every `reuse`
/// cycles (1: every cycle). Fresh libraries are never unmapped, so the
/// long versions reuse each one for a while to bound memory.
fn cycle_file(package: &str, i: usize, reuse: usize) -> PathBuf {
    fresh(package, i / reuse)
}

/// How many distinct libraries opened from `cycle_file(package, ..)` are
/// mapped: the premise that the cycles really opened fresh libraries.
fn fresh_libraries(package: &str) -> usize {
    support::mapped_files(&format!("/memfd:hotpatch:{package}-stress-"))
        .iter()
        .map(|(dev, inode, _)| (dev.clone(), inode.clone()))
        .collect::<std::collections::BTreeSet<_>>()
        .len()
}

/// Calls `call(x)` in a tight loop on `THREADS` threads, which start
/// together on a barrier, while the main thread runs `patcher`. `check`
/// says which of `kinds` implementations produced a result, or `None`
/// for a torn one, which fails the test. Returns, per kind, how many calls
/// it answered while `patcher` ran. `patcher` gets `answered(k)`, which
/// waits until implementation `k` has answered a call made after it was
/// called: a state that lasts only microseconds (a patch loaded and at
/// once reverted) is then seen even when the workers are descheduled.
///
/// Then, for each `(step, want)` of `settle`: runs `step` (which may
/// apply patches) and waits until every thread has seen implementation
/// `want` in a call that started after `step` (so every thread provably
/// ran throughout and sees what is current), then reverts the patches.
fn hammer(
    kinds: usize,
    call: impl Fn(u64) -> u64 + Sync,
    check: impl Fn(u64, u64) -> Option<usize> + Sync,
    patcher: impl FnOnce(&dyn Fn(usize)),
    settle: &[(&dyn Fn() -> Vec<hotpatch::Patch>, usize)],
) -> Vec<u64> {
    let stop = AtomicBool::new(false);
    let barrier = Barrier::new(THREADS + 1);
    // 0 while `patcher` runs; then one more per settle step.
    let epoch = AtomicUsize::new(0);
    // seen[t][k]: the latest epoch in which thread t started a call that
    // implementation k answered.
    let seen: Vec<Vec<AtomicUsize>> = (0..THREADS)
        .map(|_| (0..kinds).map(|_| AtomicUsize::new(0)).collect())
        .collect();
    // during[k]: calls answered by implementation k that started while
    // `patcher` ran (epoch 0).
    let during: Vec<AtomicU64> = (0..kinds).map(|_| AtomicU64::new(0)).collect();
    // live[t][k]: thread t's count of calls answered by k while `patcher`
    // runs, written only by thread t (no contended counter on the path).
    let live: Vec<Vec<AtomicU64>> = (0..THREADS)
        .map(|_| (0..kinds).map(|_| AtomicU64::new(0)).collect())
        .collect();
    let answered_so_far = |k: usize| -> u64 {
        // Relaxed: a count; waiting for it to grow needs no other data.
        live.iter().map(|l| l[k].load(Ordering::Relaxed)).sum()
    };
    let answered = |k: usize| {
        let before = answered_so_far(k);
        let guard = std::time::Instant::now();
        while answered_so_far(k) <= before {
            assert!(
                guard.elapsed() < std::time::Duration::from_secs(60),
                "hang: implementation {k} answered no call for 60 s"
            );
            thread::yield_now();
        }
    };
    thread::scope(|s| {
        let workers: Vec<_> = seen
            .iter()
            .enumerate()
            .map(|(t, seen)| {
                let (stop, barrier, epoch, during) = (&stop, &barrier, &epoch, &during);
                let live = &live[t];
                let (call, check) = (&call, &check);
                s.spawn(move || {
                    let mut calls = 0u64;
                    let mut mine = vec![0u64; kinds];
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
                        if e == 0 {
                            mine[kind] += 1;
                            // Relaxed: only thread t writes it; see `answered`.
                            live[kind].store(mine[kind], Ordering::Relaxed);
                        }
                        calls += 1;
                    }
                    let while_patching: u64 = mine.iter().sum();
                    for (total, n) in during.iter().zip(mine) {
                        // Relaxed: read after the workers are joined.
                        total.fetch_add(n, Ordering::Relaxed);
                    }
                    while_patching
                })
            })
            .collect();

        barrier.wait();
        patcher(&answered);
        for (step, want) in settle {
            let patches = step();
            // Release: publishes what `step` did to workers that read it.
            let e = epoch.fetch_add(1, Ordering::Release) + 1;
            // Acquire: pairs with the workers' Release.
            while seen.iter().any(|s| s[*want].load(Ordering::Acquire) < e) {
                thread::yield_now();
            }
            for p in patches.into_iter().rev() {
                p.revert().unwrap();
            }
        }
        stop.store(true, Ordering::Relaxed);
        let while_patching: Vec<u64> = workers.into_iter().map(|w| w.join().unwrap()).collect();
        // Every thread raced the patcher, not only some of them.
        assert!(
            while_patching.iter().all(|&n| n > 0),
            "a worker made no call while patching ran: {while_patching:?}"
        );
    });
    during.into_iter().map(AtomicU64::into_inner).collect()
}

/// `hammer(x)` is `x`, `x + 1000` under A, `x + 2000` under C. Cycles
/// alternate A and C, each from fresh bytes every `reuse` cycles.
fn apply_revert(cycles: usize, reuse: usize) {
    let _serial = support::serial();
    let load =
        |package: &'static str| move || vec![hotpatch::load(support::patch(package)).unwrap()];
    let (load_a, load_c) = (load(STACK_A), load(STACK_C));
    let none = Vec::new;
    let during = hammer(
        3,
        svc::hammer,
        |x, r| match r.checked_sub(x) {
            Some(0) => Some(0),
            Some(1000) => Some(1),
            Some(2000) => Some(2),
            _ => None,
        },
        |answered| {
            for i in 0..cycles {
                let (package, kind) = if i % 2 == 0 {
                    (STACK_A, 1)
                } else {
                    (STACK_C, 2)
                };
                let patch = hotpatch::load(cycle_file(package, i, reuse)).unwrap();
                if i < 2 {
                    answered(kind);
                }
                patch.revert().unwrap();
            }
        },
        // Every thread sees each patch, then the original again.
        &[(&load_a, 1), (&load_c, 2), (&none, 0)],
    );
    assert!(
        during.iter().all(|&n| n > 0),
        "some implementation never answered while patching ran \
         (original, A, C): {during:?}"
    );
    assert_eq!(svc::hammer(7), 7);
    let opened = fresh_libraries(STACK_A) + fresh_libraries(STACK_C);
    assert!(
        opened >= cycles / reuse,
        "only {opened} fresh libraries opened"
    );
}

/// `add(2, 3)` is 5; 1005 under A; 2005 under B, 3005 under C: whichever
/// is on top of the stack, whatever is under it. Each cycle stacks fresh
/// A, B and C and takes them out in one of three orders.
fn stacked(cycles: usize, reuse: usize) {
    let _serial = support::serial();
    let load = |packages: &'static [&'static str]| {
        move || {
            packages
                .iter()
                .map(|p| hotpatch::load(support::patch(p)).unwrap())
                .collect()
        }
    };
    let (a, ab, abc) = (
        load(&[STACK_A]),
        load(&[STACK_A, STACK_B]),
        load(&[STACK_A, STACK_B, STACK_C]),
    );
    let during = hammer(
        4,
        |_| svc::add(2, 3),
        |_, r| match r {
            5 => Some(0),
            1005 => Some(1),
            2005 => Some(2),
            3005 => Some(3),
            _ => None,
        },
        |answered| {
            for i in 0..cycles {
                // The first cycle waits for each stack to answer once; the
                // rest run as fast as the runtime allows.
                let wait = |k| {
                    if i == 0 {
                        answered(k)
                    }
                };
                let a = hotpatch::load(cycle_file(STACK_A, i, reuse)).unwrap();
                wait(1);
                let b = hotpatch::load(cycle_file(STACK_B, i, reuse)).unwrap();
                wait(2);
                let c = hotpatch::load(cycle_file(STACK_C, i, reuse)).unwrap();
                wait(3);
                // Take them out top first, bottom first, or middle first.
                let order = match i % 3 {
                    0 => [c, b, a],
                    1 => [a, b, c],
                    _ => [b, a, c],
                };
                for p in order {
                    p.revert().unwrap();
                }
            }
        },
        // Every thread sees each stack, then the original again.
        &[(&a, 1), (&ab, 2), (&abc, 3), (&Vec::new, 0)],
    );
    assert!(
        during.iter().all(|&n| n > 0),
        "some stacked result was never seen while patching ran \
         (none, A, B, C on top): {during:?}"
    );
    assert_eq!(svc::add(2, 3), 5);
    for package in [STACK_A, STACK_B, STACK_C] {
        let opened = fresh_libraries(package);
        assert!(
            opened >= cycles / reuse,
            "only {opened} fresh libraries of {package} opened"
        );
    }
}

// Each load reads and hashes the whole patch file, and a fresh one is
// opened with `dlopen`; in a debug build of the runtime, with four
// threads spinning on two cores, that is ~10 ms. Every fresh library
// stays mapped (~0.75 MB), so the fast versions open ~100 of them and the
// long ones reuse each for 100 cycles.

#[test]
fn no_torn_calls_during_apply_and_revert() {
    apply_revert(100, 1);
}

#[test]
fn no_torn_calls_while_patches_stack_and_unstack() {
    stacked(30, 1);
}

#[test]
#[ignore = "long: run with --ignored"]
fn no_torn_calls_during_apply_and_revert_long() {
    apply_revert(20_000, 100);
}

#[test]
#[ignore = "long: run with --ignored"]
fn no_torn_calls_while_patches_stack_and_unstack_long() {
    stacked(10_000, 100);
}
