//! The call path allocates nothing: patchable calls, patched or not,
//! calls through a transition's dispatcher, and `quiescent()` on a
//! registered thread. Counted by this binary's global allocator, per
//! thread, over many calls.

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

struct Counting;

#[global_allocator]
static COUNTING: Counting = Counting;

/// Allocations (alloc, alloc_zeroed, realloc) made by counting threads.
// Relaxed: a counter, read on the thread that counts.
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    // Const-initialised, no destructor: safe to read inside the allocator.
    static COUNT: Cell<bool> = const { Cell::new(false) };
}

fn note() {
    if COUNT.try_with(Cell::get).unwrap_or(false) {
        // Relaxed: see ALLOCATIONS.
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: every method forwards to `System` with the caller's arguments;
// counting touches only an atomic and a const thread-local.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note();
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// How many allocations this thread makes in `f`.
fn allocations_in<R>(f: impl FnOnce() -> R) -> (u64, R) {
    COUNT.with(|c| c.set(true));
    // Relaxed: this thread's own increments.
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    let r = std::hint::black_box(f());
    let n = ALLOCATIONS.load(Ordering::Relaxed) - before;
    COUNT.with(|c| c.set(false));
    (n, r)
}

const CALLS: u64 = 10_000;

/// `CALLS` rounds of two patchable calls and a safepoint; the sum of what
/// the calls returned.
fn rounds() -> u64 {
    let mut sum = 0;
    for i in 0..CALLS {
        sum += svc::add(2, 3) + svc::hammer(i) - i;
        hotpatch::quiescent();
    }
    sum
}

#[test]
fn calls_and_safepoints_allocate_nothing() {
    let _serial = support::serial();
    let _registered = hotpatch::register_thread();
    // The premise: the counter sees this thread's allocations.
    let (n, v) = allocations_in(|| vec![1u8; 10]);
    assert_eq!((n, v.len()), (1, 10));

    let (n, sum) = allocations_in(rounds);
    assert_eq!(sum, CALLS * 5, "original");
    assert_eq!(n, 0, "{n} allocations in {CALLS} unpatched rounds");

    let patch = hotpatch::load(support::patch("fixture-patch-stack-a")).unwrap();
    let (n, sum) = allocations_in(rounds);
    assert_eq!(sum, CALLS * (1005 + 1000), "patched");
    assert_eq!(n, 0, "{n} allocations in {CALLS} patched rounds");
    patch.revert().unwrap();

    let (n, sum) = allocations_in(rounds);
    assert_eq!(sum, CALLS * 5, "reverted");
    assert_eq!(n, 0, "{n} allocations in {CALLS} rounds after revert");
}

/// While a transition waits for another registered thread, this thread
/// has switched (at its safepoint) and calls through the dispatcher: no
/// allocation either.
#[test]
fn calls_during_a_transition_allocate_nothing() {
    let _serial = support::serial();
    let _registered = hotpatch::register_thread();
    let release = Arc::new(AtomicBool::new(false));
    let ready = Arc::new(Barrier::new(2));
    let staller = {
        let (release, ready) = (release.clone(), ready.clone());
        thread::spawn(move || {
            let _r = hotpatch::register_thread();
            ready.wait();
            // Acquire: pairs with the Release store below.
            while !release.load(Ordering::Acquire) {
                std::hint::spin_loop();
            }
            hotpatch::quiescent();
        })
    };
    ready.wait();
    let so = support::patch("fixture-patch-stack-a");
    let loader = thread::spawn(move || {
        hotpatch::Loader::new()
            .deadline(Duration::from_secs(60))
            .load(so)
    });
    let started = Instant::now();
    while hotpatch::transition().is_none() {
        hotpatch::quiescent();
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "hang: no transition"
        );
        thread::yield_now();
    }
    hotpatch::quiescent();
    let (n, sum) = allocations_in(rounds);
    let info = hotpatch::transition();
    assert!(info.is_some(), "the transition still waits for the staller");
    assert_eq!(sum, CALLS * (1005 + 1000), "switched at the safepoint");
    assert_eq!(
        n, 0,
        "{n} allocations in {CALLS} rounds during a transition"
    );

    // Release: lets the staller reach its safepoint.
    release.store(true, Ordering::Release);
    staller.join().unwrap();
    while !loader.is_finished() {
        hotpatch::quiescent();
        thread::yield_now();
    }
    let patch = loader.join().unwrap().expect("load once the staller moved");
    patch.revert().unwrap();
}
