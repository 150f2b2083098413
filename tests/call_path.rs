//! The call path allocates nothing: patchable calls, patched or not,
//! calls through a transition's dispatcher, and `quiescent()` on a
//! registered thread. Counted by this binary's global allocator, per
//! thread, over many calls.
//!
//! Nor does it write shared memory: with every writable page of the
//! executable and of the patch, and every heap block the runtime
//! allocated for this thread's registration and for the patch, made
//! read-only, patchable calls and safepoints on the registered thread
//! take no write fault (see `calls_and_safepoints_write_no_shared_memory`
//! for what that covers and what it does not).

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
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
    /// This thread allocates from [`arena`] (write watch).
    static IN_ARENA: Cell<bool> = const { Cell::new(false) };
}

fn note() {
    if COUNT.try_with(Cell::get).unwrap_or(false) {
        // Relaxed: see ALLOCATIONS.
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

/// The write watch's heap: a region of its own, so that what the runtime
/// allocates for the watched thread shares no page with anyone else's
/// allocations and can be made read-only whole. Bump-allocated, never
/// freed (a test's worth of memory).
const ARENA_SIZE: usize = 256 << 20;
// Relaxed (both): set once by the thread that maps it (the watched one),
// which is the only one allocating from it; others only compare addresses.
static ARENA_BASE: AtomicUsize = AtomicUsize::new(0);
static ARENA_USED: AtomicUsize = AtomicUsize::new(0);

fn arena() -> usize {
    let base = ARENA_BASE.load(Ordering::Relaxed);
    if base != 0 {
        return base;
    }
    // SAFETY: a fresh private anonymous mapping; no existing memory is
    // touched.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            ARENA_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "mmap of the arena");
    ARENA_BASE.store(p as usize, Ordering::Relaxed);
    p as usize
}

fn in_arena(ptr: *mut u8) -> bool {
    let base = ARENA_BASE.load(Ordering::Relaxed);
    base != 0 && (ptr as usize) >= base && (ptr as usize) < base + ARENA_SIZE
}

fn arena_on() -> bool {
    IN_ARENA.try_with(Cell::get).unwrap_or(false)
}

/// A block of `layout` from the arena (null when it is full).
fn arena_alloc(layout: Layout) -> *mut u8 {
    let base = arena();
    let used = ARENA_USED.load(Ordering::Relaxed);
    let start = (base + used).next_multiple_of(layout.align());
    let end = start + layout.size().max(1);
    if end > base + ARENA_SIZE {
        return std::ptr::null_mut();
    }
    ARENA_USED.store(end - base, Ordering::Relaxed);
    start as *mut u8
}

// SAFETY: every method forwards to `System` with the caller's arguments,
// or serves the block from the arena (fresh, aligned, `layout.size()`
// bytes, never reused); counting touches only an atomic and a const
// thread-local.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note();
        if arena_on() {
            return arena_alloc(layout);
        }
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note();
        if arena_on() {
            // Fresh anonymous memory, never reused: already zero.
            return arena_alloc(layout);
        }
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note();
        if arena_on() || in_arena(ptr) {
            // SAFETY: `new_size` with `layout`'s alignment is a valid
            // layout (the caller's contract).
            let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
            let new = if arena_on() {
                arena_alloc(new_layout)
            } else {
                // SAFETY: a valid, non-zero-size layout (see above).
                unsafe { System.alloc(new_layout) }
            };
            if !new.is_null() {
                // SAFETY: both blocks are valid for the smaller size and
                // distinct (the new one is fresh).
                unsafe { std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size)) };
                if !in_arena(ptr) {
                    // SAFETY: `ptr` came from `System` with `layout`.
                    unsafe { System.dealloc(ptr, layout) };
                }
            }
            return new;
        }
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if in_arena(ptr) {
            return; // Never reused.
        }
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

// ---- Write watch: no store to shared memory on the call path.

/// What the watch protects and what it caught; lives in a mapping of its
/// own, never protected, so the fault handler can write it.
struct Watch {
    /// Page-aligned `[start, end)` ranges made read-only.
    ranges: [(AtomicUsize, AtomicUsize); 64],
    n_ranges: AtomicUsize,
    /// Write faults taken in them: (thread id, address).
    faults: [(AtomicU64, AtomicUsize); 256],
    n_faults: AtomicUsize,
}

// Relaxed: set before the handler is installed, by the thread it watches.
static WATCH: std::sync::atomic::AtomicPtr<Watch> =
    std::sync::atomic::AtomicPtr::new(std::ptr::null_mut());

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

fn tid() -> u64 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() as u64 }
}

fn watch() -> &'static Watch {
    let mut w = WATCH.load(Ordering::Relaxed);
    if w.is_null() {
        // SAFETY: a fresh private anonymous mapping, zeroed: a valid
        // `Watch` (atomics of zero).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                std::mem::size_of::<Watch>(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap of the watch");
        w = p.cast();
        WATCH.store(w, Ordering::Relaxed);
    }
    // SAFETY: mapped above, never unmapped.
    unsafe { &*w }
}

/// SIGSEGV while watching: a write to a watched page is recorded and the
/// page made writable again (the write then proceeds); any other fault
/// gets the default action when the instruction runs again.
extern "C" fn on_segv(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Async-signal-safe: atomics in the watch's own mapping, gettid,
    // mprotect, signal.
    let w = WATCH.load(Ordering::Relaxed);
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO.
    let addr = unsafe { (*info).si_addr() } as usize;
    if !w.is_null() {
        // SAFETY: set before the handler was installed, never unmapped.
        let w = unsafe { &*w };
        // Relaxed (all): the handler runs on the faulting thread, after
        // the ranges were written (by the watched thread, before it
        // protected anything: mprotect orders them for other threads).
        for (start, end) in &w.ranges[..w.n_ranges.load(Ordering::Relaxed)] {
            let (start, end) = (start.load(Ordering::Relaxed), end.load(Ordering::Relaxed));
            if (start..end).contains(&addr) {
                let k = w.n_faults.fetch_add(1, Ordering::Relaxed);
                if let Some((t, a)) = w.faults.get(k) {
                    t.store(tid(), Ordering::Relaxed);
                    a.store(addr, Ordering::Relaxed);
                }
                let page = addr & !(page_size() - 1);
                // SAFETY: a page of a range this test protected, which
                // was read-write before.
                unsafe {
                    libc::mprotect(
                        page as *mut libc::c_void,
                        page_size(),
                        libc::PROT_READ | libc::PROT_WRITE,
                    )
                };
                return;
            }
        }
    }
    // SAFETY: restoring the default action is always sound.
    unsafe { libc::signal(libc::SIGSEGV, libc::SIG_DFL) };
}

/// A writable range to watch, and whose it is.
#[derive(Debug)]
struct Range {
    start: usize,
    end: usize,
    object: String,
}

/// The writable pages, now, of the executable and of every other object
/// not from the system's library directories (the loaded patches, those
/// the runtime mapped near the executable included): the
/// writable PT_LOAD segments (data, bss, the GOT's unprotected part)
/// intersected with the mappings that are writable now.
fn object_ranges() -> Vec<Range> {
    unsafe extern "C" fn each(
        info: *mut libc::dl_phdr_info,
        _: usize,
        data: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: dl_iterate_phdr passes valid info and our `data`.
        let (info, out) = unsafe { (&*info, &mut *data.cast::<Vec<(usize, usize, String)>>()) };
        let name = if info.dlpi_name.is_null() {
            String::new()
        } else {
            // SAFETY: a NUL-terminated name from the dynamic linker.
            unsafe { std::ffi::CStr::from_ptr(info.dlpi_name) }
                .to_string_lossy()
                .into_owned()
        };
        let system = ["/lib", "/usr/", "linux-vdso"]
            .iter()
            .any(|p| name.starts_with(p));
        if system {
            return 0;
        }
        let object = if name.is_empty() {
            "<executable>".to_owned()
        } else {
            name
        };
        for i in 0..usize::from(info.dlpi_phnum) {
            // SAFETY: `dlpi_phnum` headers at `dlpi_phdr`.
            let ph = unsafe { &*info.dlpi_phdr.add(i) };
            if ph.p_type == libc::PT_LOAD && ph.p_flags & libc::PF_W != 0 {
                let start = info.dlpi_addr as usize + ph.p_vaddr as usize;
                out.push((start, start + ph.p_memsz as usize, object.clone()));
            }
        }
        0
    }
    let mut segments: Vec<(usize, usize, String)> = Vec::new();
    // SAFETY: `each` matches the callback's contract; `segments` outlives
    // the call.
    unsafe { libc::dl_iterate_phdr(Some(each), (&raw mut segments).cast()) };
    // Patches the runtime mapped itself, near the executable: the dynamic
    // loader does not list them.
    for p in hotpatch::applied() {
        if let hotpatch::Placement::Near { address, size } = p.placement {
            let start = address as usize;
            segments.push((start, start + size as usize, format!("patch {}", p.name)));
        }
    }
    let page = page_size();
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let mut out = Vec::new();
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (range, perms) = (f.next().unwrap(), f.next().unwrap());
        if !perms.starts_with("rw") {
            continue;
        }
        let (a, b) = range.split_once('-').unwrap();
        let (a, b) = (
            usize::from_str_radix(a, 16).unwrap(),
            usize::from_str_radix(b, 16).unwrap(),
        );
        for (s, e, object) in &segments {
            let (s, e) = (s & !(page - 1), e.next_multiple_of(page));
            let (start, end) = (a.max(s), b.min(e));
            if start < end {
                out.push(Range {
                    start,
                    end,
                    object: object.clone(),
                });
            }
        }
    }
    out
}

/// Runs `f` with `ranges` read-only and this binary's SIGSEGV handler
/// catching writes; the writes caught, as (thread id, address).
fn watched<R>(ranges: &[Range], f: impl FnOnce() -> R) -> (Vec<(u64, usize)>, R) {
    let w = watch();
    assert!(ranges.len() <= w.ranges.len());
    // Relaxed (all): read by the handler; see `on_segv`.
    for (slot, r) in w.ranges.iter().zip(ranges) {
        slot.0.store(r.start, Ordering::Relaxed);
        slot.1.store(r.end, Ordering::Relaxed);
    }
    w.n_ranges.store(ranges.len(), Ordering::Relaxed);
    w.n_faults.store(0, Ordering::Relaxed);
    // SAFETY: zeroed is a valid sigaction; filled in below.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_segv as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: zeroed is a valid sigaction, overwritten by the call.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: valid actions; `on_segv` is async-signal-safe.
    let rc = unsafe { libc::sigaction(libc::SIGSEGV, &action, &mut old) };
    assert_eq!(rc, 0, "install the SIGSEGV handler");
    let protect = |prot| {
        for r in ranges {
            // SAFETY: whole pages of mappings that are read-write: making
            // them read-only (then read-write again) changes no contents;
            // a write meanwhile is caught and let through by `on_segv`.
            let rc = unsafe { libc::mprotect(r.start as *mut libc::c_void, r.end - r.start, prot) };
            assert_eq!(rc, 0, "mprotect {r:?}");
        }
    };
    protect(libc::PROT_READ);
    let result = std::hint::black_box(f());
    protect(libc::PROT_READ | libc::PROT_WRITE);
    // SAFETY: the previous action, as it was.
    let rc = unsafe { libc::sigaction(libc::SIGSEGV, &old, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "restore the SIGSEGV handler");
    let n = w.n_faults.load(Ordering::Relaxed).min(w.faults.len());
    let faults = w.faults[..n]
        .iter()
        .map(|(t, a)| (t.load(Ordering::Relaxed), a.load(Ordering::Relaxed)))
        .collect();
    (faults, result)
}

/// The objects' writable pages and the whole arena.
fn shared_ranges() -> Vec<Range> {
    let mut ranges = object_ranges();
    ranges.push(Range {
        start: arena(),
        end: arena() + ARENA_SIZE,
        object: "<arena>".to_owned(),
    });
    ranges
}

/// Names each fault's range.
fn explain(faults: &[(u64, usize)], ranges: &[Range]) -> Vec<String> {
    faults
        .iter()
        .map(|&(t, a)| {
            let r = ranges.iter().find(|r| (r.start..r.end).contains(&a));
            format!(
                "thread {t} wrote {a:#x} in {}",
                r.map_or("?", |r| r.object.as_str())
            )
        })
        .collect()
}

/// Written by the premise check.
static PROBE: AtomicU64 = AtomicU64::new(0);

/// A registered thread's patchable calls (unpatched, patched, reverted)
/// and safepoints store nothing to: any writable page of the executable
/// (every static: the slots, the registry, the quiescence epoch and thread
/// list, std's own) or of the loaded patch (its statics, its copies of
/// the slots), or any heap block the runtime allocated on this thread
/// (its thread record, the registry's tables and the patch's record,
/// made in an arena of their own). Each is read-only while the calls run;
/// a write would fault and be recorded.
///
/// It cannot see: this thread's own stack and thread-locals (private,
/// and not watched), the system libraries' data (libc, the dynamic
/// linker), heap blocks allocated before the test or by other threads,
/// and a transition's dispatcher path (no transition runs here). It
/// shows these runs' paths after one warm-up round; it is not a proof
/// over every path of the code.
#[test]
fn calls_and_safepoints_write_no_shared_memory() {
    support::isolated("calls_and_safepoints_write_no_shared_memory", || {
        // Everything the runtime allocates for this thread from here on
        // goes to the arena.
        IN_ARENA.with(|a| a.set(true));
        let _serial = support::serial();
        let _registered = hotpatch::register_thread();
        let so = support::patch("fixture-patch-stack-a");
        let me = tid();

        // The premise: a write by this thread to a static, to the arena,
        // or by a patchable call to the service's state, is caught.
        let heap = Box::new(AtomicU64::new(0));
        assert!(in_arena((&raw const *heap).cast_mut().cast()));
        // One write per watch: after a fault its page stays writable for
        // the rest of that watch, so zero faults is what proves no write.
        let ranges = shared_ranges();
        let writes: [(&str, usize, &dyn Fn()); 3] = [
            ("a static", (&raw const PROBE) as usize, &|| {
                // Relaxed: only the store matters.
                PROBE.fetch_add(1, Ordering::Relaxed);
            }),
            ("the arena", (&raw const *heap) as usize, &|| {
                // Relaxed: only the store matters.
                heap.fetch_add(1, Ordering::Relaxed);
            }),
            (
                "the service, in a patchable call",
                (&raw const svc::CALLS) as usize,
                &|| {
                    svc::count_call();
                },
            ),
        ];
        for (what, addr, write) in writes {
            let (faults, ()) = watched(&ranges, write);
            // Whether the call path wrote anything else is for the checks
            // below to say.
            assert!(
                faults.contains(&(me, addr)),
                "a write to {what} is caught: {:?}",
                explain(&faults, &ranges)
            );
        }

        let check = |state: &str, per_round: u64| {
            assert_eq!(rounds(), CALLS * per_round, "{state}: warm-up");
            let ranges = shared_ranges();
            let (faults, sum) = watched(&ranges, rounds);
            assert_eq!(sum, CALLS * per_round, "{state}");
            assert_eq!(
                explain(&faults, &ranges),
                Vec::<String>::new(),
                "{state}: writes to shared memory in {CALLS} rounds (this thread is {me})"
            );
            ranges
        };
        check("original", 5);
        let patch = hotpatch::load(&so).unwrap();
        let ranges = check("patched", 1005 + 1000);
        assert!(
            ranges
                .iter()
                .any(|r| r.object != "<executable>" && r.object != "<arena>"),
            "the patch's pages are watched too: {ranges:?}"
        );
        patch.revert().unwrap();
        check("reverted", 5);
    });
}
