//! What one call costs, by call path, side by side in one run.
//!
//! Every case ends in the same body (`bench_svc::body`); the cases differ
//! only in how they reach it. Each sample runs `iters` calls in a loop with
//! the input and output passed through `black_box`, on one thread, or on
//! two threads at once started on a barrier (per-call time averaged over
//! both threads). `direct`, an `#[inline(never)]` call, and
//! `atomic_ptr_calling_crate`, an `AtomicPtr` fn pointer in a static of
//! this crate, are the baselines of each group; `loop_only` is the loop
//! with no call.
//!
//! Run: `cargo bench --bench call`. Read medians from
//! `target/criterion/call_*/<case>/new/estimates.json` (`median`).

mod support;

use std::hint::black_box;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::{Barrier, LazyLock};
use std::thread;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, criterion_group, criterion_main};

type F = fn(u64) -> u64;

/// A fn pointer in a static of the calling crate (no GOT load for it): the
/// `AtomicPtr` a user would write in their own code, what a patchable call
/// should cost (issue 11, item 3).
static LOCAL_PTR: AtomicPtr<()> = AtomicPtr::new(bench_svc::direct as F as *mut ());
/// The same, pointing at what the patched slot points at (the patch's
/// entry): the baseline for `patchable_patched`, which calls that code.
static LOCAL_PTR_TO_PATCH: AtomicPtr<()> = AtomicPtr::new(bench_svc::direct as F as *mut ());

/// Writes both fn-pointer statics once, through `black_box`, as a hot swap
/// would: a static never written is folded into a direct call.
fn write_fn_ptrs() {
    let f: F = black_box(bench_svc::direct);
    bench_svc::set_fn_ptr(f);
    // Release: pairs with the Acquire loads of the calls.
    LOCAL_PTR.store(f as *mut (), Ordering::Release);
    *PL_LOCK.write() = f;
}

/// A read lock per call, held across the call (as a lock that guards
/// unloading must be).
static PL_LOCK: parking_lot::RwLock<F> = parking_lot::const_rwlock(bench_svc::direct as F);

/// A re-creation of the call path of crates.io `hotpatch` 0.3 (Shizcow),
/// which no longer builds: `Patchable<Args, Ret>` is a
/// `Lazy<RwLock<..>>` holding `Box<dyn Fn(Args) -> Ret>` of a fn taking
/// the arguments as a tuple; a call is `(self.lazy.read().unwrap().current_ptr)(args)`.
/// `std::sync::LazyLock` stands in for `once_cell::sync::Lazy`.
#[allow(clippy::type_complexity)]
static HOTPATCH_03: LazyLock<std::sync::RwLock<Box<dyn Fn((u64,)) -> u64 + Send + Sync>>> =
    LazyLock::new(|| std::sync::RwLock::new(Box::new(hotpatch_03_default as fn((u64,)) -> u64)));

/// hotpatch 0.3's default implementation: the original function, taking
/// its arguments as a tuple.
fn hotpatch_03_default((x,): (u64,)) -> u64 {
    bench_svc::body(x)
}

/// hot-lib-reloader 0.8's own generated wrapper, pointed at
/// `benches/fixtures/bench-hot-lib` (a Rust dylib). Per call it clones an
/// `Arc` of the loader, takes a `std` read lock, and looks the symbol up
/// with `dlsym`.
#[hot_lib_reloader::hot_module(dylib = "bench_hot_lib", lib_dir = crate::fixtures().dir.clone())]
mod hot_lib {
    #[hot_functions]
    extern "Rust" {
        pub fn hot_target(x: u64) -> u64;
    }
}

struct Fixtures {
    dir: std::path::PathBuf,
}

fn fixtures() -> &'static Fixtures {
    static F: LazyLock<Fixtures> = LazyLock::new(|| Fixtures {
        dir: support::build_fixtures(&["bench-patch", "bench-dylib", "bench-hot-lib"]),
    });
    &F
}

// The cases that need no state, one call each.
#[inline(always)]
fn case_loop_only(x: u64) -> u64 {
    bench_svc::body(x)
}
#[inline(always)]
fn case_direct(x: u64) -> u64 {
    bench_svc::direct(x)
}
#[inline(always)]
fn case_unpatched(x: u64) -> u64 {
    bench_svc::unpatched(x)
}
#[inline(always)]
fn case_patched(x: u64) -> u64 {
    bench_svc::patched(x)
}
#[inline(always)]
fn case_atomic_ptr(x: u64) -> u64 {
    // SAFETY: FN_PTR only ever holds a `fn(u64) -> u64`.
    // Acquire: what a hot swap publishing a new pointer needs; on x86-64
    // the same `mov` as Relaxed.
    let f: F = unsafe { std::mem::transmute(bench_svc::FN_PTR.load(Ordering::Acquire)) };
    f(x)
}
#[inline(always)]
fn case_atomic_ptr_calling_crate_to_patch(x: u64) -> u64 {
    // SAFETY: LOCAL_PTR_TO_PATCH only ever holds a `fn(u64) -> u64` (the
    // patch's entry for `bench_svc::patched`, checked by the loader).
    // Acquire: as above.
    let f: F = unsafe { std::mem::transmute(LOCAL_PTR_TO_PATCH.load(Ordering::Acquire)) };
    f(x)
}
#[inline(always)]
fn case_atomic_ptr_calling_crate(x: u64) -> u64 {
    // SAFETY: LOCAL_PTR only ever holds a `fn(u64) -> u64`.
    // Acquire: as above.
    let f: F = unsafe { std::mem::transmute(LOCAL_PTR.load(Ordering::Acquire)) };
    f(x)
}
#[inline(always)]
fn case_parking_lot_rwlock(x: u64) -> u64 {
    let f = PL_LOCK.read();
    (*f)(x)
}
#[inline(always)]
fn case_hot_lib_reloader(x: u64) -> u64 {
    hot_lib::hot_target(x)
}
#[inline(always)]
fn case_hotpatch_03(x: u64) -> u64 {
    (HOTPATCH_03.read().unwrap())((x,))
}

/// One call each, outside any loop: what a call site in a service looks
/// like in the disassembly (see `benches/disasm.sh`).
#[inline(never)]
fn site_direct(x: u64) -> u64 {
    case_direct(x)
}
#[inline(never)]
fn site_unpatched(x: u64) -> u64 {
    case_unpatched(x)
}
#[inline(never)]
fn site_patched(x: u64) -> u64 {
    case_patched(x)
}
#[inline(never)]
fn site_atomic_ptr(x: u64) -> u64 {
    case_atomic_ptr(x)
}
#[inline(never)]
fn site_atomic_ptr_calling_crate(x: u64) -> u64 {
    case_atomic_ptr_calling_crate(x)
}

/// `iters` calls of `f` on this thread.
#[inline(always)]
fn calls<C: Fn(u64) -> u64>(iters: u64, f: &C) -> Duration {
    let start = Instant::now();
    for i in 0..iters {
        black_box(f(black_box(i)));
    }
    start.elapsed()
}

/// A loop of its own, not generic, for each stateless case: a symbol
/// `call::loop_unpatched` etc. to read in the disassembly (see
/// `benches/disasm.sh`).
macro_rules! loops {
    ($($name:ident => $case:ident,)*) => {
        $(
            #[inline(never)]
            fn $name(iters: u64) -> Duration {
                calls(iters, &$case)
            }
        )*
    };
}

loops! {
    loop_loop_only => case_loop_only,
    loop_direct => case_direct,
    loop_unpatched => case_unpatched,
    loop_patched => case_patched,
    loop_atomic_ptr => case_atomic_ptr,
    loop_atomic_ptr_calling_crate => case_atomic_ptr_calling_crate,
    loop_atomic_ptr_calling_crate_to_patch => case_atomic_ptr_calling_crate_to_patch,
    loop_parking_lot_rwlock => case_parking_lot_rwlock,
    loop_hot_lib_reloader => case_hot_lib_reloader,
    loop_hotpatch_03 => case_hotpatch_03,
}

/// `iters` calls on each of `threads` threads at once (`run_loop` makes
/// them on one thread); the mean time.
fn run<L: Fn(u64) -> Duration + Sync>(threads: usize, iters: u64, run_loop: &L) -> Duration {
    if threads == 1 {
        return run_loop(iters);
    }
    let barrier = Barrier::new(threads);
    let total: Duration = thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    run_loop(iters)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    total / threads as u32
}

/// A case whose loop is `run_loop`; `f` is one call, to check the result.
fn named<C: Fn(u64) -> u64, L: Fn(u64) -> Duration + Sync>(
    g: &mut BenchmarkGroup<WallTime>,
    threads: usize,
    name: &str,
    f: C,
    run_loop: L,
) {
    // Every path must compute the same thing, patched or not.
    for x in [0, 1, 0xdead_beef, u64::MAX] {
        assert_eq!(f(x), bench_svc::body(x), "{name} computes the wrong value");
    }
    g.bench_function(name, |b| {
        b.iter_custom(|iters| run(threads, iters, &run_loop))
    });
}

/// A case with state: the loop is generic over the closure.
fn case<C: Fn(u64) -> u64 + Sync>(
    g: &mut BenchmarkGroup<WallTime>,
    threads: usize,
    name: &str,
    f: C,
) {
    #[inline(never)]
    fn generic_loop<C: Fn(u64) -> u64>(iters: u64, f: &C) -> Duration {
        calls(iters, f)
    }
    named(g, threads, name, &f, |iters| generic_loop(iters, &f));
}

fn group(c: &mut Criterion, threads: usize) {
    let fx = fixtures();
    let patch = hotpatch::load(support::patch(&fx.dir, "bench-patch")).expect("load bench-patch");
    assert_eq!(patch.functions(), ["bench_svc::patched"]);
    let entry = bench_svc::patched_implementation();
    // Release: pairs with the Acquire loads of the calls.
    LOCAL_PTR_TO_PATCH.store(black_box(entry) as *mut (), Ordering::Release);

    let boxed: Box<dyn Fn(u64) -> u64 + Send + Sync> = black_box(Box::new(bench_svc::body));
    let swap = ArcSwap::from_pointee(bench_svc::direct as F);
    let dylib = support::so(&fx.dir, "bench-dylib");
    // SAFETY: bench-dylib is our own plain cdylib; its initialisers are std's.
    let lib = std::sync::RwLock::new(
        unsafe { libloading::Library::new(&dylib) }.expect("open bench-dylib"),
    );
    // SAFETY: `bench_dylib_target` is a `fn(u64) -> u64` (bench-dylib).
    let cached: F = unsafe {
        *lib.read()
            .unwrap()
            .get::<F>(b"bench_dylib_target\0")
            .unwrap()
    };
    let cached = std::sync::RwLock::new(cached);

    let name = if threads == 1 {
        "call_1_thread".to_owned()
    } else {
        format!("call_{threads}_threads")
    };
    write_fn_ptrs();
    for site in [
        site_direct,
        site_unpatched,
        site_patched,
        site_atomic_ptr,
        site_atomic_ptr_calling_crate,
    ] {
        assert_eq!(black_box(site)(7), bench_svc::body(7));
    }
    let mut group = c.benchmark_group(name);
    let t = threads;
    let g = &mut group;
    named(g, t, "loop_only", case_loop_only, loop_loop_only);
    named(g, t, "direct", case_direct, loop_direct);
    named(g, t, "patchable_unpatched", case_unpatched, loop_unpatched);
    named(g, t, "patchable_patched", case_patched, loop_patched);
    named(g, t, "atomic_ptr", case_atomic_ptr, loop_atomic_ptr);
    let (f, l) = (case_atomic_ptr_calling_crate, loop_atomic_ptr_calling_crate);
    named(g, t, "atomic_ptr_calling_crate", f, l);
    let (f, l) = (
        case_atomic_ptr_calling_crate_to_patch,
        loop_atomic_ptr_calling_crate_to_patch,
    );
    named(g, t, "atomic_ptr_calling_crate_to_patch", f, l);
    case(g, t, "box_dyn_fn", &boxed);
    case(g, t, "arc_swap", |x| (**swap.load())(x));
    let (f, l) = (case_parking_lot_rwlock, loop_parking_lot_rwlock);
    named(g, t, "parking_lot_rwlock", f, l);
    case(g, t, "libloading_cached_symbol_rwlock", |x| {
        (*cached.read().unwrap())(x)
    });
    case(g, t, "libloading_dlsym_per_call_rwlock", |x| {
        let lib = lib.read().unwrap();
        // SAFETY: as above.
        let f = unsafe { lib.get::<F>(b"bench_dylib_target\0") }.unwrap();
        f(x)
    });
    let (f, l) = (case_hot_lib_reloader, loop_hot_lib_reloader);
    named(g, t, "hot_lib_reloader", f, l);
    named(
        g,
        t,
        "hotpatch_0_3_recreated",
        case_hotpatch_03,
        loop_hotpatch_03,
    );
    group.finish();
    patch.revert().expect("revert bench-patch");
}

/// What a user compares (issue 22): the same function, original then
/// patched, in one process, against an `AtomicPtr` call written in the
/// calling crate to the original function. In the order a user has them:
/// `atomic_ptr_calling_crate` and `original` (`bench_svc::patched`
/// unpatched), then `patched` (the patch mapped near the executable, as
/// `load` does), then `patched_dlopen` (the same patch opened by the
/// dynamic loader, far from the executable, as before near placement),
/// then `original_again` (reverted). Run pinned to one core:
/// `taskset -c 1 cargo bench --bench call -- patched_vs_original`.
fn patched_vs_original(c: &mut Criterion) {
    let fx = fixtures();
    let so = support::patch(&fx.dir, "bench-patch");
    write_fn_ptrs();
    let mut group = c.benchmark_group("patched_vs_original");
    let g = &mut group;
    let (f, l) = (case_atomic_ptr_calling_crate, loop_atomic_ptr_calling_crate);
    named(g, 1, "atomic_ptr_calling_crate", f, l);
    named(g, 1, "original", case_patched, loop_patched);

    let near = hotpatch::load(&so).expect("load bench-patch");
    assert!(near.placement().is_near(), "{}", near.placement());
    named(g, 1, "patched", case_patched, loop_patched);
    near.revert().expect("revert");
    // SAFETY: this process's only thread that calls patchable functions is
    // this one, and nothing keeps a pointer into the patch.
    unsafe { hotpatch::Loader::new().reclaim() }.expect("reclaim the near copy");

    let far = hotpatch::Loader::new()
        .near(false)
        .load(&so)
        .expect("load bench-patch with dlopen");
    assert!(!far.placement().is_near());
    named(g, 1, "patched_dlopen", case_patched, loop_patched);
    far.revert().expect("revert");
    named(g, 1, "original_again", case_patched, loop_patched);
    group.finish();
    // The other groups load the patch again: near, not this library.
    // SAFETY: as above.
    unsafe { hotpatch::Loader::new().reclaim() }.expect("reclaim the dlopen copy");
}

fn one_thread(c: &mut Criterion) {
    group(c, 1);
}

fn two_threads(c: &mut Criterion) {
    group(c, 2);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    targets = patched_vs_original, one_thread, two_threads
}
criterion_main!(benches);
