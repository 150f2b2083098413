//! The measured loops and the transition set-up shared by
//! `benches/quiescence.rs` (timings) and `benches/icount_quiescence.rs`
//! (instruction counts), so both measure the same code.

#![allow(dead_code)]

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// The baseline of `quiescent()`: an empty loop iteration.
#[inline(never)]
pub fn loop_empty(iters: u64) -> Duration {
    let start = Instant::now();
    for i in 0..iters {
        black_box(i);
    }
    start.elapsed()
}

/// The same loop with a safepoint per iteration.
#[inline(never)]
pub fn loop_quiescent(iters: u64) -> Duration {
    let start = Instant::now();
    for i in 0..iters {
        black_box(i);
        hotpatch::quiescent();
    }
    start.elapsed()
}

/// The loop of `benches/call.rs`, calling `bench_svc::patched` (which
/// `bench-patch` replaces with the same body).
#[inline(never)]
pub fn loop_call(iters: u64) -> Duration {
    let start = Instant::now();
    for i in 0..iters {
        black_box(bench_svc::patched(black_box(i)));
    }
    start.elapsed()
}

/// A `fn(u64) -> u64` for `loop_ptr`.
pub static TARGET: AtomicPtr<()> = AtomicPtr::new(std::ptr::null_mut());

/// The same loop calling through `TARGET`, a plain `AtomicPtr` in this
/// crate: the same path whatever it points at, so two targets compare
/// where the code called lies, not how it is reached.
#[inline(never)]
pub fn loop_ptr(iters: u64) -> Duration {
    let start = Instant::now();
    for i in 0..iters {
        // SAFETY: `TARGET` only ever holds a `fn(u64) -> u64`.
        // Acquire: as a hot swap needs; a plain `mov` on x86-64.
        let f: fn(u64) -> u64 = unsafe { std::mem::transmute(TARGET.load(Ordering::Acquire)) };
        black_box(f(black_box(i)));
    }
    start.elapsed()
}

/// The implementation `bench_svc::patched`'s slot points at now (read
/// through the runtime's hidden registry; for the benches only).
pub fn current_impl() -> *mut () {
    let entry = hotpatch::__private::SLOTS
        .iter()
        .find(|e| e.path == "bench_svc::patched")
        .expect("bench_svc::patched is registered");
    entry.slot.get() as *mut ()
}

/// The patch the transition cases apply: `bench_svc::patched`, same body.
pub fn bench_patch() -> PathBuf {
    let dir = crate::support::build_fixtures(&["bench-patch"]);
    crate::support::patch(&dir, "bench-patch")
}

/// A `load` held open: a registered thread (`holder`) that is online but
/// blocked on a channel, so it reaches no safepoint, while another thread
/// waits in `load` with a deadline far away. Meanwhile
/// `bench_svc::patched`'s slot points at its dispatcher.
pub struct HeldTransition {
    release: mpsc::Sender<()>,
    holder: JoinHandle<()>,
    loader: JoinHandle<hotpatch::Patch>,
}

/// Name of the thread that holds a transition open.
pub const HOLDER: &str = "holder";

impl HeldTransition {
    /// Starts loading `patch` and returns once the transition is in
    /// progress (the dispatcher installed, `HOLDER` not switched).
    pub fn begin(patch: &Path) -> HeldTransition {
        let (registered_tx, registered_rx) = mpsc::channel();
        let (release, release_rx) = mpsc::channel::<()>();
        let holder = thread::Builder::new()
            .name(HOLDER.into())
            .spawn(move || {
                let _registered = hotpatch::register_thread();
                registered_tx.send(()).unwrap();
                // Blocked but online: a request stuck waiting for
                // something, without `offline()`.
                release_rx.recv().unwrap();
                hotpatch::quiescent();
            })
            .unwrap();
        registered_rx.recv().unwrap();
        let patch = patch.to_owned();
        let loader = thread::Builder::new()
            .name("loader".into())
            .spawn(move || {
                hotpatch::Loader::new()
                    .deadline(Duration::from_secs(3600))
                    .load(&patch)
                    .expect("load bench-patch")
            })
            .unwrap();
        let started = Instant::now();
        while hotpatch::transition().is_none() {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the transition did not start"
            );
            thread::sleep(Duration::from_millis(1));
        }
        HeldTransition {
            release,
            holder,
            loader,
        }
    }

    /// Lets the holder reach its safepoint; returns the applied patch once
    /// `load` returned (every registered thread switched).
    pub fn finish(self) -> hotpatch::Patch {
        self.release.send(()).unwrap();
        self.holder.join().unwrap();
        self.loader.join().unwrap()
    }
}

/// Names of the registered threads the transition in progress waits for.
pub fn waiting_for() -> Vec<String> {
    let info = hotpatch::transition().expect("a transition in progress");
    info.waiting_for
        .iter()
        .map(|t| t.name.clone().unwrap_or_default())
        .collect()
}
