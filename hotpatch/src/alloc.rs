//! One allocator for host and patches.
//!
//! A patch is a separate image with its own `#[global_allocator]` (the
//! system allocator unless it says otherwise). A `String` built by patch
//! code and dropped by the host would then be freed by an allocator that
//! did not allocate it: with a host allocator that adds a header
//! (jemalloc, mimalloc, a counting wrapper) that is heap corruption.
//!
//! So `hotpatch::manifest!()` makes [`HostAllocator`] the patch's global
//! allocator. It forwards every call to the host's global allocator
//! through a table the runtime installs before any patch code runs
//! ([`HostAllocFns`], written into the patch's [`HOST_ALLOC`] cell).
//! Allocations made before that (by the library's own initialisers, which
//! run inside `dlopen`) come from the system allocator and are remembered,
//! so that their `dealloc`/`realloc` go back to it; if there are more than
//! [`EARLY_SLOTS`] of them, the runtime refuses the patch.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};

/// The host's allocation functions, as the patch calls them.
#[derive(Debug)]
#[repr(C)]
pub struct HostAllocFns {
    pub alloc: unsafe fn(Layout) -> *mut u8,
    pub alloc_zeroed: unsafe fn(Layout) -> *mut u8,
    pub dealloc: unsafe fn(*mut u8, Layout),
    pub realloc: unsafe fn(*mut u8, Layout, usize) -> *mut u8,
}

/// The host's global allocator, as a table for its patches.
pub(crate) static HOST_FNS: HostAllocFns = HostAllocFns {
    alloc: std::alloc::alloc,
    alloc_zeroed: std::alloc::alloc_zeroed,
    dealloc: std::alloc::dealloc,
    realloc: std::alloc::realloc,
};

/// In a patch: the host's table, once installed.
pub static HOST_ALLOC: AtomicPtr<HostAllocFns> = AtomicPtr::new(std::ptr::null_mut());

/// How many early (pre-installation) allocations can be tracked.
pub const EARLY_SLOTS: usize = 64;
static EARLY: [AtomicUsize; EARLY_SLOTS] = [const { AtomicUsize::new(0) }; EARLY_SLOTS];
static EARLY_LIVE: AtomicUsize = AtomicUsize::new(0);
static EARLY_OVERFLOW: AtomicBool = AtomicBool::new(false);

/// Whether more early allocations were made than could be tracked (the
/// runtime then refuses the patch).
pub fn early_overflow() -> bool {
    // Relaxed: read by the runtime after `dlopen` returned, on the thread
    // that called it; initialisers ran on that thread.
    EARLY_OVERFLOW.load(Ordering::Relaxed)
}

fn remember(p: *mut u8) {
    if p.is_null() {
        return;
    }
    for slot in &EARLY {
        // AcqRel/Acquire: pairs with `forget`, so a slot is reused only
        // after it was cleared.
        if slot
            .compare_exchange(0, p as usize, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            EARLY_LIVE.fetch_add(1, Ordering::AcqRel);
            return;
        }
    }
    EARLY_OVERFLOW.store(true, Ordering::Relaxed);
}

/// Whether `p` was an early allocation (and forgets it).
fn forget(p: *mut u8) -> bool {
    // Acquire: pairs with the AcqRel increment in `remember`.
    if EARLY_LIVE.load(Ordering::Acquire) == 0 {
        return false;
    }
    for slot in &EARLY {
        if slot
            .compare_exchange(p as usize, 0, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            EARLY_LIVE.fetch_sub(1, Ordering::AcqRel);
            return true;
        }
    }
    false
}

fn host() -> Option<&'static HostAllocFns> {
    // Acquire: pairs with the runtime's Release store; the table is a
    // static of the host, immutable.
    let p = HOST_ALLOC.load(Ordering::Acquire);
    // SAFETY: only the runtime stores here, and only `&HOST_FNS`, a static
    // of the host that lives as long as the process.
    unsafe { p.as_ref() }
}

/// A patch's global allocator: the host's. See the module docs.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostAllocator;

// SAFETY: every block is freed or resized by the allocator that allocated
// it: the host's (through its table), or, for early blocks, the system
// allocator (tracked in `EARLY`, or the patch is refused).
unsafe impl GlobalAlloc for HostAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match host() {
            // SAFETY: forwarded with the caller's guarantees.
            Some(h) => unsafe { (h.alloc)(layout) },
            None => {
                // SAFETY: forwarded with the caller's guarantees.
                let p = unsafe { System.alloc(layout) };
                remember(p);
                p
            }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match host() {
            // SAFETY: forwarded with the caller's guarantees.
            Some(h) => unsafe { (h.alloc_zeroed)(layout) },
            None => {
                // SAFETY: forwarded with the caller's guarantees.
                let p = unsafe { System.alloc_zeroed(layout) };
                remember(p);
                p
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        match host() {
            // SAFETY: `ptr` came from the host's allocator (not early).
            Some(h) if !forget(ptr) => unsafe { (h.dealloc)(ptr, layout) },
            // SAFETY: an early block, from the system allocator.
            _ => unsafe { System.dealloc(ptr, layout) },
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        match host() {
            Some(h) if !forget(ptr) => {
                // SAFETY: `ptr` came from the host's allocator.
                unsafe { (h.realloc)(ptr, layout, new_size) }
            }
            Some(h) => {
                // An early block moves to the host's allocator.
                // SAFETY: `new_size` with `layout`'s alignment is a valid
                // layout (the caller's guarantee for `realloc`).
                let new_layout =
                    unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
                // SAFETY: non-zero size (caller's guarantee).
                let new = unsafe { (h.alloc)(new_layout) };
                if !new.is_null() {
                    // SAFETY: both blocks are valid for the smaller size and
                    // do not overlap; the early block is then freed by the
                    // allocator that made it.
                    unsafe {
                        std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                        System.dealloc(ptr, layout);
                    }
                } else {
                    // On failure the old block is still live, and still
                    // the system allocator's: keep it tracked, or its
                    // later `dealloc` would go to the host's allocator.
                    remember(ptr);
                }
                new
            }
            None => {
                let early = forget(ptr);
                // SAFETY: forwarded with the caller's guarantees; before
                // installation every block is the system allocator's.
                let p = unsafe { System.realloc(ptr, layout, new_size) };
                if early {
                    // On failure the old block is still live (and early).
                    remember(if p.is_null() { ptr } else { p });
                }
                p
            }
        }
    }
}
