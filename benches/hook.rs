//! Entry redirection (`hotpatch::hook`, issue 18): what writing a hooked
//! entry costs the other threads, with both protocols, and what a call
//! through a hooked entry costs.
//!
//! Groups, each with its baseline:
//! - `hook_pause/{breakpoint,stop}/{idle,busy}/{2,16,64}`: one install of
//!   a hook on `bench_svc::direct` (then an unhook, not timed), with N
//!   other threads idle (blocked in a channel receive) or busy (calling it
//!   in a loop), by the breakpoint protocol (the default) or the
//!   stop-the-world (forced). Timed: the report's `pause`, the longest
//!   any thread was kept from its own code: the longest run of the
//!   sampling handler (breakpoint), or from the first signal of the last
//!   round to the release (stop-the-world: every thread is held until the
//!   last arrives). Outside criterion, 101 installs per case give the
//!   median and the maximum of the pause and of the breakpoint window
//!   (the first `int3` to the last byte; calls take the trap meanwhile)
//!   (stderr).
//! - `hook_trap`: the CPU time of one call of `bench_svc::direct` on a
//!   thread that calls it in a loop, `plain` (baseline) and `trapped` (its
//!   entry held at the `int3`: each call takes the `SIGTRAP` to the stub
//!   and the trampoline). The thread's own CPU time (`CLOCK_THREAD_CPUTIME_ID`,
//!   user and system), divided by the calls.
//! - `hook_call`: a loop of calls of `bench_svc::direct` through a
//!   function pointer: `original` (baseline), `hooked_trampoline` (the
//!   entry jump, the stub, the trampoline, the jump back),
//!   `hooked_redirected` (the entry jump and the stub to another function
//!   with the same body), and `patchable_patched`, `bench_svc::patched`
//!   with `bench-patch` (the same body) applied.
//! - `hook_apply`: apply and revert of a one-function hooked patch.
//!
//! Run: `cargo bench --bench hook`.

mod support;

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use hotpatch::hook::{self, Options, Target};

fn target() -> Target {
    Target::of(bench_svc::direct as *const ()).expect("bench_svc::direct in the symbol table")
}

/// N threads, idle or busy, until dropped.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
    senders: Vec<std::sync::mpsc::Sender<()>>,
}

impl Load {
    fn new(n: usize, busy: bool) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let mut senders = Vec::new();
        for _ in 0..n {
            let stop = stop.clone();
            let (tx, rx) = std::sync::mpsc::channel::<()>();
            senders.push(tx);
            threads.push(thread::spawn(move || {
                if busy {
                    let f: fn(u64) -> u64 = black_box(bench_svc::direct);
                    let mut x = 0u64;
                    // Relaxed: a stop flag.
                    while !stop.load(Ordering::Relaxed) {
                        x = black_box(f(x));
                    }
                } else {
                    let _ = rx.recv();
                }
            }));
        }
        Load {
            stop,
            threads,
            senders,
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        // Relaxed: a stop flag.
        self.stop.store(true, Ordering::Relaxed);
        self.senders.clear();
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
    }
}

fn one_install(t: &Target, options: &Options) -> hook::Report {
    let h = hook::install_with(t, options).expect("install");
    let report = h.report();
    h.unhook().expect("unhook");
    report
}

fn median_max(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (v[v.len() / 2], v[v.len() - 1])
}

fn hook_pause(c: &mut Criterion) {
    let t = target();
    let mut g = c.benchmark_group("hook_pause");
    g.sample_size(20);
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(3));
    for (protocol, stop_the_world) in [("breakpoint", false), ("stop", true)] {
        let options = Options::default()
            .deadline(Duration::from_secs(10))
            .stop_the_world(stop_the_world);
        for busy in [false, true] {
            for n in [2usize, 16, 64] {
                let kind = if busy { "busy" } else { "idle" };
                let _load = Load::new(n, busy);
                thread::sleep(Duration::from_millis(50));
                let reports: Vec<hook::Report> =
                    (0..101).map(|_| one_install(&t, &options)).collect();
                let (pause, pause_max) = median_max(reports.iter().map(|r| r.pause).collect());
                let (window, window_max) = median_max(reports.iter().map(|r| r.window).collect());
                let rounds = reports.iter().map(|r| r.rounds).max().unwrap_or(0);
                eprintln!(
                    "hook_pause/{protocol}/{kind}/{n}: pause median {pause:?}, max {pause_max:?}; \
                     window median {window:?}, max {window_max:?}; most rounds {rounds}; {} \
                     (101 installs)",
                    reports[0].protocol
                );
                g.bench_function(format!("{protocol}/{kind}/{n}"), |b| {
                    b.iter_custom(|iters| (0..iters).map(|_| one_install(&t, &options).pause).sum())
                });
            }
        }
    }
    g.finish();
}

/// This thread's CPU time (user and system).
fn thread_cpu() -> Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes into `t`, which we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

#[inline(never)]
fn cpu_of_calls(f: fn(u64) -> u64, iters: u64) -> Duration {
    let start = thread_cpu();
    for i in 0..iters {
        black_box(f(black_box(i)));
    }
    thread_cpu() - start
}

/// `iters` calls of `bench_svc::direct` while its entry is held at the
/// `int3`: an install waits for a thread that blocks the stop signal
/// (the bytes after the `int3` are not written until it is sampled), the
/// calls run, then the thread takes the signal and the install finishes
/// (and is undone).
fn trapped_calls(t: &Target, iters: u64) -> Duration {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let blocker = thread::spawn(move || {
        // SAFETY: this thread's own signal mask.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, hook::signal());
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        }
        ready_tx.send(()).unwrap();
        go_rx.recv().unwrap();
        // SAFETY: as above; the pending sample is taken now.
        unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
    });
    ready_rx.recv().unwrap();
    let installer = {
        let t = t.clone();
        thread::spawn(move || {
            let options = Options::default()
                .deadline(Duration::from_secs(60))
                .stop_the_world(false);
            let h = hook::install_with(&t, &options).expect("install");
            h.unhook().expect("unhook");
        })
    };
    let entry = t.addr().cast::<u8>();
    // SAFETY: reads the first byte of the function's code (mapped).
    while unsafe { std::ptr::read_volatile(entry) } != 0xcc {
        thread::yield_now();
    }
    let direct: fn(u64) -> u64 = black_box(bench_svc::direct);
    let cpu = cpu_of_calls(direct, iters);
    go_tx.send(()).unwrap();
    blocker.join().unwrap();
    installer.join().unwrap();
    cpu
}

fn hook_trap(c: &mut Criterion) {
    let t = target();
    let direct: fn(u64) -> u64 = black_box(bench_svc::direct);
    let mut g = c.benchmark_group("hook_trap");
    g.sample_size(20);
    g.bench_function("plain", |b| b.iter_custom(|n| cpu_of_calls(direct, n)));
    g.bench_function("trapped", |b| b.iter_custom(|n| trapped_calls(&t, n)));
    g.finish();
}

#[inline(never)]
fn replacement(x: u64) -> u64 {
    bench_svc::body(x)
}

#[inline(never)]
fn calls(f: fn(u64) -> u64, iters: u64) -> Duration {
    let start = Instant::now();
    for i in 0..iters {
        black_box(f(black_box(i)));
    }
    start.elapsed()
}

fn hook_call(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("hotpatch-bench-hook-{}", std::process::id()));
    let patch = hotpatch::load(support::patch(&dir, "bench-patch")).expect("load bench-patch");
    let _ = std::fs::remove_dir_all(&dir);
    let direct: fn(u64) -> u64 = black_box(bench_svc::direct);
    let patched: fn(u64) -> u64 = black_box(bench_svc::patched);
    let mut g = c.benchmark_group("hook_call");
    g.bench_function("original", |b| b.iter_custom(|n| calls(direct, n)));
    g.bench_function("patchable_patched", |b| {
        b.iter_custom(|n| calls(patched, n))
    });
    let h = hook::install(&target()).expect("install");
    g.bench_function("hooked_trampoline", |b| b.iter_custom(|n| calls(direct, n)));
    // SAFETY: the same signature.
    unsafe { h.redirect(replacement as *const ()) }.expect("redirect");
    g.bench_function("hooked_redirected", |b| b.iter_custom(|n| calls(direct, n)));
    h.unhook().expect("unhook");
    g.finish();
    patch.revert().expect("revert");
}

/// Apply and revert of a one-function hooked patch (`bench-hook-patch`:
/// `bench_svc::unmarked`, not patchable, hooked with the same body) through
/// the loader: the apply checks the record, writes the entry jump under a
/// stop of every thread and switches the slot; the revert switches back
/// and writes the original bytes back under another stop. The same bytes
/// each time (the library is reused after the first load), one thread
/// calling `unmarked` in a loop meanwhile. Each sample's median is what
/// criterion reports; the pauses are in the events (not timed here).
fn hook_apply(c: &mut Criterion) {
    let dir =
        std::env::temp_dir().join(format!("hotpatch-bench-hook-apply-{}", std::process::id()));
    let so = support::patch(&dir, "bench-hook-patch");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let caller = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let unmarked: fn(u64) -> u64 = black_box(bench_svc::unmarked);
            let mut i = 0u64;
            // Relaxed: a stop flag; nothing is published through it.
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                black_box(unmarked(black_box(i)));
                i += 1;
            }
        })
    };
    let loader = hotpatch::Loader::new().allow_insecure_permissions();
    let mut g = c.benchmark_group("hook_apply");
    g.sample_size(20);
    g.bench_function("apply", |b| {
        b.iter_custom(|n| {
            let mut total = Duration::ZERO;
            for _ in 0..n {
                let start = Instant::now();
                let p = loader.load(&so).expect("load bench-hook-patch");
                total += start.elapsed();
                loader.revert(p).expect("revert");
            }
            total
        })
    });
    g.bench_function("revert", |b| {
        b.iter_custom(|n| {
            let mut total = Duration::ZERO;
            for _ in 0..n {
                let p = loader.load(&so).expect("load bench-hook-patch");
                let start = Instant::now();
                loader.revert(p).expect("revert");
                total += start.elapsed();
            }
            total
        })
    });
    g.finish();
    // Relaxed: see the loop.
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    caller.join().expect("caller");
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, hook_pause, hook_trap, hook_call, hook_apply);
criterion_main!(benches);
