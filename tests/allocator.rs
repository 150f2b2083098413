//! Memory moving between a host with its own `#[global_allocator]` and
//! its patches.
//!
//! This test binary's global allocator puts a 16-byte header (a magic
//! word and the block's size) before every block and checks it on
//! `dealloc` and `realloc`. A block it did not make, or one freed with
//! another size, is reported (and leaked, never handed to the system
//! allocator); every test asserts there were no such reports. A patch
//! that used the system allocator would show up here: its blocks have no
//! header. The allocator also counts the live blocks and bytes allocated
//! by threads that opted in ([`Tracking`]), so the counts are exact
//! whatever the test harness's own threads do.
//!
//! `fixture-patch-alloc` (through `hotpatch::manifest!()`) allocates with
//! the host's allocator: it returns `String`s, `Vec`s and boxed trait
//! objects the host frees, and frees and grows `String`s the host made.

// This host has a `#[global_allocator]` of its own (the counting one
// below), so rustc defines `__rustc::__rust_alloc` and its siblings
// hidden here and `-rdynamic` does not export them: the patches reach it
// through `cargo hotpatch build`'s allocator shims (one jump to the
// runtime's exported `hotpatch_rust_alloc` and siblings, which call the
// host's global allocator; cargo-hotpatch/src/allocshims.rs).

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;

use hotpatch::Error;

// ---- The host's allocator

struct HeaderAlloc;

#[global_allocator]
static HOST: HeaderAlloc = HeaderAlloc;

const HEADER: usize = 16;
const MAGIC: u64 = 0x4b4f_5f52_4544_4145; // "EADER_OK"
/// Set in the header's size word of blocks allocated by a tracked thread.
const TRACKED: u64 = 1 << 63;

// Relaxed throughout: plain counters, read by the test after the threads
// that move them were joined (or on the same thread).
static LIVE_BLOCKS: AtomicI64 = AtomicI64::new(0);
static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);
static ALLOCS: AtomicU64 = AtomicU64::new(0);
static ZEROED: AtomicU64 = AtomicU64::new(0);
static REALLOCS: AtomicU64 = AtomicU64::new(0);
static FREES: AtomicU64 = AtomicU64::new(0);
/// Blocks handed to `dealloc`/`realloc` without this allocator's header.
static BAD: AtomicU64 = AtomicU64::new(0);
static LAST_BAD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    // Const-initialised, no destructor: safe to read inside the allocator.
    static TRACK: Cell<bool> = const { Cell::new(false) };
}

fn tracked_thread() -> bool {
    TRACK.try_with(Cell::get).unwrap_or(false)
}

/// Where the caller's block starts in ours: room for the header, and a
/// multiple of the caller's alignment.
fn offset(layout: Layout) -> usize {
    layout.align().max(HEADER)
}

fn outer(layout: Layout, size: usize) -> Layout {
    Layout::from_size_align(size + offset(layout), layout.align().max(HEADER)).unwrap()
}

/// # Safety
/// `ptr` must be at least `HEADER` bytes into a block readable there.
unsafe fn header(ptr: *mut u8) -> *mut [u64; 2] {
    // SAFETY: guaranteed by the caller.
    unsafe { ptr.sub(HEADER).cast() }
}

/// Whether `ptr` carries this allocator's header for a block of `size`
/// bytes, and whether a tracked thread allocated it.
///
/// # Safety
/// The 16 bytes before `ptr` must be readable.
unsafe fn check(ptr: *mut u8, size: usize) -> Option<bool> {
    // SAFETY: guaranteed by the caller.
    let [magic, word] = unsafe { header(ptr).read() };
    (magic == MAGIC && word & !TRACKED == size as u64).then_some(word & TRACKED != 0)
}

fn report(ptr: *mut u8) {
    BAD.fetch_add(1, Ordering::Relaxed);
    LAST_BAD.store(ptr as usize, Ordering::Relaxed);
}

impl HeaderAlloc {
    /// # Safety
    /// `base` is a fresh block of `outer(layout, layout.size())`.
    unsafe fn finish(&self, base: *mut u8, layout: Layout) -> *mut u8 {
        if base.is_null() {
            return base;
        }
        let tracked = tracked_thread();
        // SAFETY: `offset` is inside the block and leaves `HEADER` bytes
        // before it.
        let ptr = unsafe { base.add(offset(layout)) };
        // SAFETY: as above; aligned to 16.
        unsafe { header(ptr).write([MAGIC, layout.size() as u64 | (tracked as u64 * TRACKED)]) };
        if tracked {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
            LIVE_BLOCKS.fetch_add(1, Ordering::Relaxed);
            LIVE_BYTES.fetch_add(layout.size() as i64, Ordering::Relaxed);
        }
        ptr
    }
}

// SAFETY: every block is a system block with the caller's block at an
// offset that keeps its alignment; blocks without our header are never
// passed to the system allocator.
unsafe impl GlobalAlloc for HeaderAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: non-zero size (caller's guarantee, plus the header).
        let base = unsafe { System.alloc(outer(layout, layout.size())) };
        // SAFETY: a fresh block of that layout.
        unsafe { self.finish(base, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        let base = unsafe { System.alloc_zeroed(outer(layout, layout.size())) };
        if tracked_thread() && !base.is_null() {
            ZEROED.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: as in `alloc`.
        unsafe { self.finish(base, layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: a block of ours has its header before it; a foreign one
        // (the bug this test is after) is read but never freed.
        let Some(tracked) = (unsafe { check(ptr, layout.size()) }) else {
            return report(ptr);
        };
        // SAFETY: our block: poison the header so a double free reports.
        unsafe { header(ptr).write([!MAGIC, 0]) };
        if tracked {
            FREES.fetch_add(1, Ordering::Relaxed);
            LIVE_BLOCKS.fetch_sub(1, Ordering::Relaxed);
            LIVE_BYTES.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        }
        // SAFETY: the block `alloc` made for this layout.
        unsafe { System.dealloc(ptr.sub(offset(layout)), outer(layout, layout.size())) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as in `dealloc`.
        let Some(tracked) = (unsafe { check(ptr, layout.size()) }) else {
            report(ptr);
            // Not ours: a new block with a copy, the old one left alone.
            let new_layout = Layout::from_size_align(new_size, layout.align()).unwrap();
            // SAFETY: non-zero size (caller's guarantee).
            let new = unsafe { self.alloc(new_layout) };
            if !new.is_null() {
                // SAFETY: both valid for the smaller size (caller's
                // guarantee for `ptr`), distinct blocks.
                unsafe { std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size)) };
            }
            return new;
        };
        let off = offset(layout);
        // SAFETY: the block `alloc` made for this layout; the new size
        // keeps the header and offset.
        let base =
            unsafe { System.realloc(ptr.sub(off), outer(layout, layout.size()), new_size + off) };
        if base.is_null() {
            return base;
        }
        // SAFETY: the header moved with the block; update its size.
        let ptr = unsafe { base.add(off) };
        // SAFETY: as above.
        unsafe { header(ptr).write([MAGIC, new_size as u64 | (tracked as u64 * TRACKED)]) };
        if tracked {
            REALLOCS.fetch_add(1, Ordering::Relaxed);
            LIVE_BYTES.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        }
        ptr
    }
}

// ---- Observing it

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counts {
    live_blocks: i64,
    live_bytes: i64,
    allocs: u64,
    zeroed: u64,
    reallocs: u64,
    frees: u64,
    bad: u64,
}

fn counts() -> Counts {
    Counts {
        live_blocks: LIVE_BLOCKS.load(Ordering::Relaxed),
        live_bytes: LIVE_BYTES.load(Ordering::Relaxed),
        allocs: ALLOCS.load(Ordering::Relaxed),
        zeroed: ZEROED.load(Ordering::Relaxed),
        reallocs: REALLOCS.load(Ordering::Relaxed),
        frees: FREES.load(Ordering::Relaxed),
        bad: BAD.load(Ordering::Relaxed),
    }
}

/// The bad-block count when a test starts: each test checks it added
/// none, so one failure does not spill into the next test.
struct BadBlocks(u64);

impl BadBlocks {
    fn baseline() -> Self {
        BadBlocks(BAD.load(Ordering::Relaxed))
    }

    fn assert_none(&self) {
        let bad = BAD.load(Ordering::Relaxed) - self.0;
        assert_eq!(
            bad,
            0,
            "{bad} block(s) without this allocator's header freed or resized (last at {:#x})",
            LAST_BAD.load(Ordering::Relaxed)
        );
    }
}

/// Counts the allocations of the current thread while alive.
struct Tracking;

impl Tracking {
    fn start() -> Self {
        TRACK.with(|t| t.set(true));
        Tracking
    }
}

impl Drop for Tracking {
    fn drop(&mut self) {
        TRACK.with(|t| t.set(false));
    }
}

/// Whether `ptr` is a live block of this allocator of `size` bytes.
fn intact(ptr: *const u8, size: usize) -> bool {
    // SAFETY: used on blocks of `String`s and `Vec`s of this process;
    // ours have a header before them (the claim under test).
    unsafe { check(ptr.cast_mut(), size) }.is_some()
}

const ALLOC: &str = "fixture-patch-alloc";

// ---- The tests

/// The control: the allocator reports a block that is not its own and
/// does not free it, so the other tests' "no bad blocks" means something.
#[test]
fn the_allocator_detects_a_foreign_block() {
    let _serial = support::serial();
    let bad = BAD.load(Ordering::Relaxed);
    let layout = Layout::from_size_align(32, 16).unwrap();
    // A system block with 16 bytes of room before the "foreign" pointer,
    // so the header check reads memory of this block.
    let raw_layout = Layout::from_size_align(64, 16).unwrap();
    // SAFETY: non-zero size.
    let raw = unsafe { System.alloc_zeroed(raw_layout) };
    assert!(!raw.is_null());
    // SAFETY: 16 bytes into a 64-byte block.
    let foreign = unsafe { raw.add(HEADER) };
    // SAFETY: `foreign` has 16 readable bytes before it. Deallocating a
    // block this allocator did not make is what it must detect.
    unsafe { HOST.dealloc(foreign, layout) };
    assert_eq!(BAD.load(Ordering::Relaxed), bad + 1, "reported");
    assert_eq!(LAST_BAD.load(Ordering::Relaxed), foreign as usize);
    // SAFETY: not freed by `HOST`, so still ours to free.
    unsafe { System.dealloc(raw, raw_layout) };
    BAD.fetch_sub(1, Ordering::Relaxed);
}

/// A `String` and a `Vec` built by patch code, dropped by the host: the
/// host's allocator made them (header present, counted) and frees them.
#[test]

fn patch_allocations_are_the_hosts() {
    let _serial = support::serial();
    let bad = BadBlocks::baseline();
    let patch = hotpatch::load(support::patch(ALLOC)).unwrap();

    let tracking = Tracking::start();
    let before = counts();
    let s = svc::make_text(100);
    let after = counts();
    assert_eq!(s, format!("patched:{}", "p".repeat(100)));
    assert_eq!(after.live_blocks, before.live_blocks + 1, "{after:?}");
    assert_eq!(after.live_bytes, before.live_bytes + s.capacity() as i64);
    assert!(after.allocs > before.allocs);
    assert!(intact(s.as_ptr(), s.capacity()), "the host's header");
    drop(s);
    assert_eq!(
        (counts().live_blocks, counts().live_bytes),
        (before.live_blocks, before.live_bytes)
    );

    let v = svc::make_numbers(1000);
    assert_eq!(v.len(), 1000);
    assert!(v.iter().enumerate().all(|(i, x)| *x == i as u64 * 10));
    assert!(intact(v.as_ptr().cast(), v.capacity() * 8));
    assert_eq!(counts().live_blocks, before.live_blocks + 1);
    // The host grows the patch's block (a host `realloc`), then frees it.
    let mut v = v;
    let reallocs = counts().reallocs;
    v.extend(0..10_000);
    assert!(counts().reallocs > reallocs);
    assert!(intact(v.as_ptr().cast(), v.capacity() * 8));
    drop(v);

    let zeroed = counts().zeroed;
    let z = svc::make_zeroed(4096);
    assert!(counts().zeroed > zeroed, "patch code used alloc_zeroed");
    assert!(z.len() == 4096 && z.iter().all(|&b| b == 0));
    assert!(intact(z.as_ptr(), z.capacity()));
    drop(z);

    let end = counts();
    drop(tracking);
    assert_eq!(
        (end.live_blocks, end.live_bytes),
        (before.live_blocks, before.live_bytes),
        "every block freed: {end:?}"
    );
    assert_eq!(end.allocs - before.allocs, end.frees - before.frees);
    bad.assert_none();
    patch.revert().unwrap();
}

/// `String`s the host made, freed and resized by patch code.
#[test]

fn host_allocations_freed_and_grown_by_the_patch() {
    let _serial = support::serial();
    let bad = BadBlocks::baseline();
    let patch = hotpatch::load(support::patch(ALLOC)).unwrap();
    let tracking = Tracking::start();
    let before = counts();

    // Freed in the patch, after one `realloc` there.
    let s = String::from("host text");
    assert_eq!(counts().live_blocks, before.live_blocks + 1);
    assert_eq!(svc::consume_text(s), 1010);
    let after = counts();
    assert_eq!(after.live_blocks, before.live_blocks, "freed: {after:?}");
    assert_eq!(after.live_bytes, before.live_bytes);
    assert!(after.reallocs > before.reallocs, "grown in the patch");

    // Grown (repeated `realloc`s) and shrunk in the patch, freed by the host.
    let s = String::with_capacity(1);
    let reallocs = counts().reallocs;
    let s = svc::grow_text(s, 5000);
    assert!(counts().reallocs > reallocs);
    assert_eq!(s.len(), 5000);
    assert!(s.bytes().all(|b| b == b'p'));
    assert!(intact(s.as_ptr(), s.capacity()));
    assert_eq!(counts().live_bytes, before.live_bytes + s.capacity() as i64);
    drop(s);

    let end = counts();
    drop(tracking);
    assert_eq!(
        (end.live_blocks, end.live_bytes),
        (before.live_blocks, before.live_bytes),
        "{end:?}"
    );
    bad.assert_none();
    patch.revert().unwrap();
}

/// A `Box<dyn Shape>` of a patch type (with a `String` inside): its drop
/// glue runs in the patch, its box is freed by the host.
#[test]

fn a_boxed_trait_object_from_the_patch() {
    let _serial = support::serial();
    let bad = BadBlocks::baseline();
    let patch = hotpatch::load(support::patch(ALLOC)).unwrap();
    let tracking = Tracking::start();
    let before = counts();

    let shape = svc::make_shape(4);
    assert_eq!(shape.area(), 48);
    let label = shape.label();
    assert_eq!(label, "circle 4");
    // The box, its name, and the label.
    assert_eq!(counts().live_blocks, before.live_blocks + 3);
    drop(label);
    drop(shape);

    let end = counts();
    drop(tracking);
    assert_eq!(
        (end.live_blocks, end.live_bytes),
        (before.live_blocks, before.live_bytes),
        "{end:?}"
    );
    bad.assert_none();
    patch.revert().unwrap();
    // The host's own shape again.
    assert_eq!(svc::make_shape(4).label(), "square 4");
}

/// Four threads move memory both ways, while the patch is applied and
/// reverted under them: every call is old or new, every block is freed by
/// the allocator that made it (the host's), and the counts return to
/// where they were. The workers run until the patcher is done, and each
/// cycle keeps the patch applied until every worker has had a patched
/// result in it, so every thread provably moved patch-made memory.
#[test]

fn threads_move_memory_both_ways_while_patching() {
    let _serial = support::serial();
    let bad = BadBlocks::baseline();
    let so = support::patch(ALLOC);
    const THREADS: usize = 4;
    const ROUNDS: usize = 300;
    const CYCLES: usize = 20;
    let before = counts();
    let barrier = Arc::new(Barrier::new(THREADS + 1));
    let patcher_done = Arc::new(AtomicBool::new(false));
    // Patched results per thread, so far.
    let patched: Arc<Vec<AtomicU64>> = Arc::new((0..THREADS).map(|_| AtomicU64::new(0)).collect());
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (barrier, patcher_done, patched) =
                (barrier.clone(), patcher_done.clone(), patched.clone());
            thread::spawn(move || {
                barrier.wait();
                let _tracking = Tracking::start();
                let mut i = 0;
                // Acquire: pairs with the patcher's Release store.
                while i < ROUNDS || !patcher_done.load(Ordering::Acquire) {
                    let n = (t * 31 + i) % 200;
                    let s = svc::make_text(n);
                    if s == format!("patched:{}", "p".repeat(n)) {
                        // Release: read by the patcher (Acquire).
                        patched[t].fetch_add(1, Ordering::Release);
                    } else {
                        assert_eq!(s, "h".repeat(n));
                    }
                    let v = svc::make_numbers(n);
                    assert_eq!(v.len(), n);
                    let made = s.len();
                    let len = svc::consume_text(s);
                    assert!(len == made || len == made + 1 + 1000, "{len}");
                    let grown = svc::grow_text(format!("{t}:{i}:"), n);
                    assert!(grown.starts_with(&format!("{t}:{i}:")));
                    assert!(grown.len() == format!("{t}:{i}:").len() + n);
                    let shape = svc::make_shape(n as u64);
                    let label = shape.label();
                    assert!(
                        label == format!("square {n}") || label == format!("circle {n}"),
                        "{label}"
                    );
                    drop((v, grown, shape, label));
                    i += 1;
                }
                i
            })
        })
        .collect();
    barrier.wait();
    let started = std::time::Instant::now();
    for _ in 0..CYCLES {
        // Acquire: pairs with the workers' Release.
        let at: Vec<u64> = patched.iter().map(|p| p.load(Ordering::Acquire)).collect();
        let patch = hotpatch::load(&so).unwrap();
        while patched
            .iter()
            .zip(&at)
            .any(|(p, &at)| p.load(Ordering::Acquire) == at)
        {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(120),
                "hang: a worker got no patched result ({patched:?})"
            );
            thread::yield_now();
        }
        patch.revert().unwrap();
        thread::yield_now();
    }
    // Release: the workers' last rounds run after every cycle.
    patcher_done.store(true, Ordering::Release);
    let rounds: Vec<usize> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(rounds.iter().all(|&r| r >= ROUNDS), "{rounds:?}");
    let patched: Vec<u64> = patched.iter().map(|p| p.load(Ordering::Relaxed)).collect();
    assert!(
        patched.iter().all(|&p| p >= CYCLES as u64),
        "every thread had patched results in every cycle: {patched:?}"
    );
    let end = counts();
    assert_eq!(
        (end.live_blocks, end.live_bytes),
        (before.live_blocks, before.live_bytes),
        "every block the threads made was freed: {end:?}"
    );
    assert!(end.allocs > before.allocs && end.reallocs > before.reallocs);
    assert_eq!(end.allocs - before.allocs, end.frees - before.frees);
    bad.assert_none();
}

/// Blocks a patch allocates in its ELF initialiser (inside `dlopen`,
/// before the runtime has looked at the manifest) come from the host's
/// allocator too: there is one allocator. Counted as the loading thread's,
/// then grown and freed by patch code with no bad block reported (a block
/// of another allocator has no header: its `realloc` or `dealloc` here
/// would be one).
#[test]

fn early_blocks_of_a_patch_are_the_hosts() {
    let _serial = support::serial();
    let bad = BadBlocks::baseline();
    let so = support::patch("fixture-patch-alloc-early");
    let tracking = Tracking::start();
    let before = counts();
    let patch = hotpatch::load(&so).unwrap();
    let loaded = counts();
    assert!(
        loaded.live_blocks >= before.live_blocks + 2,
        "the early Vec and String are live blocks of the host's: {before:?} then {loaded:?}"
    );

    // The early `Vec`, grown in the patch, handed to the host.
    let v = svc::make_numbers(100);
    assert_eq!(&v[..3], [7, 8, 9], "the block made inside dlopen");
    assert_eq!(v.len(), 103);
    assert!(
        intact(v.as_ptr().cast(), v.capacity() * 8),
        "the host's block"
    );
    drop(v);

    // The early `String`, freed in the patch.
    assert_eq!(svc::make_text(3), "early 50, asked 3");
    let end = counts();
    drop(tracking);
    assert!(
        end.live_blocks <= loaded.live_blocks - 2,
        "both early blocks freed through the host's allocator: {loaded:?} then {end:?}"
    );
    bad.assert_none();
    patch.revert().unwrap();
}

/// Many blocks made inside `dlopen` (there is no bridge with a fixed
/// table of early blocks any more): all the host's, all freed by patch
/// code through the host's allocator.
#[test]

fn many_early_blocks_are_the_hosts() {
    let _serial = support::serial();
    let bad = BadBlocks::baseline();
    let so = support::patch("fixture-patch-alloc-overflow");
    let tracking = Tracking::start();
    let before = counts();
    let patch = hotpatch::load(&so).unwrap();
    let loaded = counts();
    assert!(
        loaded.live_blocks >= before.live_blocks + 100,
        "{before:?} then {loaded:?}"
    );
    assert_eq!(svc::answer(), 100, "freed the early blocks in the patch");
    let end = counts();
    drop(tracking);
    assert!(
        end.live_blocks <= loaded.live_blocks - 100,
        "{loaded:?} then {end:?}"
    );
    bad.assert_none();
    patch.revert().unwrap();
    assert_eq!(svc::answer(), 1);
}

/// A patch crate with its own `#[global_allocator]` (linked unchecked,
/// since `cargo hotpatch build` refuses it): its code would allocate with
/// its own allocator while the host frees with the host's. Refused before
/// it is mapped, nothing changed.
#[test]
fn a_foreign_allocator_is_refused() {
    let _serial = support::serial();
    let bad = BadBlocks::baseline();
    let so = support::patch("fixture-patch-foreign-alloc");
    let good = hotpatch::load(support::patch("fixture-patch-stack-a")).unwrap();
    let before = support::snapshot();
    let answer = svc::answer();

    let err = hotpatch::load(&so).expect_err("a foreign allocator");
    assert!(
        matches!(&err, Error::ForeignAllocator { path, .. } if path == &so),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains(&so.display().to_string()) && message.contains("allocator"),
        "{message}"
    );
    assert_eq!(support::snapshot(), before, "nothing changed");
    assert_eq!(svc::answer(), answer, "stack-a's replacement still runs");
    good.revert().unwrap();
    bad.assert_none();
}
