//! The per-function slot: the one word every patchable call loads.
//!
//! # Protocol
//!
//! `current` holds the implementation of the function: initially the
//! original body, later a patch's entry shim. Writers are the runtime only, under the registry lock; readers
//! are every call, with no lock.
//!
//! - `set` stores with `Release` and `get` loads with `Acquire`: whatever
//!   the runtime wrote before publishing a pointer (the patch's slot
//!   references, see `SlotRef`) is visible to a thread that calls through
//!   that pointer. On x86-64 an `Acquire` load is a plain `mov`.
//! - Each call reads `current` exactly once, so a call runs one
//!   implementation from start to end, never a mix: a pointer store is
//!   atomic, and nothing else is read to decide what to run.
//! - The slots are read-only between operations: each is a static in
//!   `.data.rel.ro.hotpatch_slots.*`, which the linker puts in
//!   `PT_GNU_RELRO`, and the runtime stores only inside a [`write_window`]
//!   (`window.rs`). A binary linked without RELRO keeps them writable,
//!   with a warning ([`slot_table`]).
//! - During a transition `current` points at the function's dispatcher,
//!   and `dispatch` holds the transition's [`Choice`] for it (old, new,
//!   and the universe that runs new), in place: see
//!   [`Dispatch`](crate::quiesce::protocol::Dispatch), which also says why
//!   a dispatcher may read a later transition's choice and still be
//!   right. `dispatch` is stored (its sequence number Release) before
//!   `current` (Release), and loaded (that number Acquire) by the
//!   dispatcher after the Acquire of `current`. Nothing is allocated per
//!   transition.

use std::collections::HashSet;
use std::fmt;
use std::io;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicPtr, Ordering};

use crate::__private::SLOTS;
use crate::image::Image;
use crate::quiesce::protocol::{Choice, Dispatch};
use crate::window::{Pages, Window, Windows};

/// The address of a function, type-erased.
///
/// The type is recovered only by code generated for that function, whose
/// signature the runtime checked.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
#[repr(transparent)]
pub struct FnAddr(*const ());

// SAFETY: a function address is immutable data; sharing it between threads
// shares no state.
unsafe impl Send for FnAddr {}
// SAFETY: as above.
unsafe impl Sync for FnAddr {}

impl FnAddr {
    /// Wraps a function address.
    pub const fn new(ptr: *const ()) -> Self {
        FnAddr(ptr)
    }

    /// The raw address.
    pub const fn as_ptr(self) -> *const () {
        self.0
    }
}

impl fmt::Debug for FnAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:p}", self.0)
    }
}

/// The atomically swapped function pointer behind one `#[patchable]`
/// function.
#[repr(C)]
pub struct Slot {
    current: AtomicPtr<()>,
    dispatch: Dispatch,
}

impl Slot {
    /// A slot whose implementation is `original`.
    pub const fn new(original: *const ()) -> Self {
        Slot {
            current: AtomicPtr::new(original as *mut ()),
            dispatch: Dispatch::new(),
        }
    }

    /// The current implementation: the only load on the call path.
    #[inline(always)]
    pub fn get(&self) -> *const () {
        // Acquire: pairs with the Release store in `set`, so the state a
        // patch was prepared with is visible to the thread calling it.
        self.current.load(Ordering::Acquire)
    }

    /// Publishes a new implementation. Only inside a [`write_window`] on
    /// this slot: between operations its page is read-only.
    pub(crate) fn set(&self, implementation: FnAddr) {
        // Release: pairs with the Acquire in `get`.
        self.current
            .store(implementation.as_ptr() as *mut (), Ordering::Release);
    }

    /// For a dispatcher: the implementation the calling thread runs.
    #[inline(always)]
    pub fn choose(&self) -> *const () {
        // A dispatcher is only installed (in `begin_transition`) after a
        // choice was stored, and the dispatcher loaded `current` (Acquire)
        // before this: `load` sees that choice or a later one.
        let choice = self.dispatch.load();
        choice.pick(crate::quiesce::local_universe()) as *const ()
    }

    /// Routes calls through `dispatcher`, which runs `choice`'s old or new
    /// implementation depending on the calling thread's universe.
    ///
    /// Only under the transition turn ([`Dispatch::store`] takes one
    /// writer at a time), inside a [`write_window`] on this slot.
    pub(crate) fn begin_transition(&self, choice: Choice<FnAddr>, dispatcher: FnAddr) {
        self.dispatch.store(Choice {
            universe: choice.universe,
            old: choice.old.as_ptr() as *mut (),
            new: choice.new.as_ptr() as *mut (),
        });
        // Release (in `set`), after the Release store of the choice's
        // sequence number: a thread that loads the dispatcher sees it.
        self.set(dispatcher);
    }
}

// `current_of!` reads `current` at the slot's own address.
const _: () = assert!(std::mem::offset_of!(Slot, current) == 0);

/// `Slot::get` of the static `$slot`, as the call path does it: on x86-64
/// one `mov` from the slot's link-time address, so a call site in any
/// crate is `mov slot(%rip), %reg; call *%reg`, as for an `AtomicPtr` of
/// the calling crate (issue 11, item 3).
///
/// `$slot.get()` would compile to the same `mov` only where rustc knows the
/// static is in the same image: in the crate that defines it, or with fat
/// LTO. A call site in another crate gets its address through a GOT entry
/// (`R_X86_64_GOTPCREL`, which no linker relaxes), one dependent load
/// more. The `sym` operand instead emits a direct PC-relative reference
/// (`R_X86_64_PC32`), resolved at link time. That needs the slot to be in
/// the same image as the call site and not preemptible, which holds where
/// a patchable function's crate is linked as an rlib into an executable.
/// (A Rust `dylib` exports its statics; a patchable crate must not be
/// one.) In a thin patch, whose code calls into the host's patchable
/// functions from another image, `cargo hotpatch build` retargets each
/// such load at a [`SlotRef`](crate::__private::SlotRef) cell of the
/// patch, which the loader points at the host's wrapper.
///
/// Elsewhere (other architectures, x32), `$slot.get()`.
#[doc(hidden)]
#[macro_export]
macro_rules! __hotpatch_slot_current {
    ($slot:path) => {{
        let _: &'static $crate::__private::Slot = &$slot;
        #[cfg(all(target_arch = "x86_64", target_pointer_width = "64"))]
        let current: *const () = {
            let current: *const ();
            // SAFETY: `$slot` is a `Slot` (checked above) whose first field
            // is `current` (asserted in `slot.rs`): an aligned
            // pointer-sized atomic, read here with one `mov`, which is
            // atomic. Acquire: a `mov` load is an acquire load on x86-64
            // (pairs with the Release store in `Slot::set`), and the asm,
            // which may read or write any memory as far as the compiler
            // knows, keeps later accesses after it.
            unsafe {
                ::core::arch::asm!(
                    "mov {current}, qword ptr [rip + {slot}]",
                    current = out(reg) current,
                    slot = sym $slot,
                    options(nostack, preserves_flags),
                )
            };
            current
        };
        #[cfg(not(all(target_arch = "x86_64", target_pointer_width = "64")))]
        let current: *const () = $slot.get();
        current
    }};
}

impl fmt::Debug for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slot")
            .field("current", &self.get())
            .finish_non_exhaustive()
    }
}

// ---- The slot table's protection (`window.rs`) ----

/// Changes page protection with `mprotect`, through `region`.
#[derive(Debug)]
pub(crate) struct Mprotect;

impl Pages for Mprotect {
    fn page_size(&self) -> usize {
        region::page::size()
    }

    fn protect(&self, start: usize, len: usize, writable: bool) -> io::Result<()> {
        let protection = if writable {
            region::Protection::READ_WRITE
        } else {
            region::Protection::READ
        };
        // SAFETY: `Windows` only passes pages that hold slots and lie
        // wholly inside this binary's RELRO (`TABLE`): data the dynamic
        // loader made read-only after relocating it, which nothing but
        // the runtime's stores into slots writes. Read access is kept in
        // both directions, so no reader of anything on these pages (a
        // call loading its slot, the GOT beside it) can fault.
        unsafe { region::protect(start as *const u8, len, protection) }.map_err(|e| match e {
            region::Error::SystemCall(e) => e,
            other => io::Error::other(other.to_string()),
        })
    }

    #[cold]
    fn still_writable(&self, start: usize, len: usize, error: &io::Error) {
        #[cfg(feature = "control")]
        tracing::error!(
            start = format_args!("{start:#x}"),
            len,
            "hotpatch: could not make the slot table read-only again ({error}): these pages stay \
             writable"
        );
        #[cfg(not(feature = "control"))]
        let _ = (start, len, error);
    }
}

/// The open write windows on the slot table.
static WINDOWS: Windows<Mprotect> = Windows::new(Mprotect);

/// Which slots the dynamic loader made read-only.
struct Table {
    slots: usize,
    /// Addresses of the slots whose pages are wholly in RELRO.
    read_only: HashSet<usize>,
}

static TABLE: LazyLock<Table> = LazyLock::new(|| {
    let mut images: Vec<Image> = Vec::new();
    let mut read_only = HashSet::new();
    for entry in SLOTS.iter() {
        let addr = std::ptr::from_ref(entry.slot) as usize;
        let image = match images.iter().position(|i| i.contains(addr)) {
            Some(i) => Some(&images[i]),
            None => Image::containing(addr as *const ()).map(|i| {
                images.push(i);
                &images[images.len() - 1]
            }),
        };
        if image.is_some_and(|i| i.read_only_after_relocation(addr, size_of::<Slot>())) {
            read_only.insert(addr);
        }
    }
    let table = Table {
        slots: SLOTS.len(),
        read_only,
    };
    if table.read_only.len() < table.slots {
        warn_writable(&table);
    }
    table
});

/// Said once, when the table is first used.
#[cold]
fn warn_writable(table: &Table) {
    #[cfg(feature = "control")]
    tracing::warn!(
        slots = table.slots,
        read_only = table.read_only.len(),
        "hotpatch: {} of the {} slots of patchable functions are not in this binary's RELRO \
         segment (linked with `-z norelro`?): they stay writable between patches, so a stray \
         or hostile write can redirect those functions; link with `-z relro` (the default)",
        table.slots - table.read_only.len(),
        table.slots
    );
    #[cfg(not(feature = "control"))]
    let _ = table;
}

/// Opens a write window on the pages of `slots` that are read-only (the
/// slot table's in RELRO and hooked functions' slots; the others are
/// writable anyway): stores into them are allowed until it
/// drops. See `window.rs` for what happens when two windows overlap.
pub(crate) fn write_window<'a>(
    slots: impl IntoIterator<Item = &'a Slot>,
) -> io::Result<Window<'static, Mprotect>> {
    let table = &*TABLE;
    WINDOWS.open(
        slots
            .into_iter()
            .map(|s| std::ptr::from_ref(s) as usize)
            .filter(|a| table.read_only.contains(a) || hook_slot(*a))
            .map(|a| (a, size_of::<Slot>())),
    )
}

/// A hooked function's slot (`hook/near.rs`): read-only between
/// operations like the table's protected slots.
fn hook_slot(addr: usize) -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    return crate::hook::owns_slot(addr);
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        let _ = addr;
        false
    }
}

/// Opens a write window on `[addr, addr + len)` ranges outside the slot
/// table: the pages of hook slots (`hook/near.rs`), read-only between
/// operations like the table, and counted with it.
pub(crate) fn write_window_pages(
    ranges: impl IntoIterator<Item = (usize, usize)>,
) -> io::Result<Window<'static, Mprotect>> {
    WINDOWS.open(ranges)
}

/// How the slot table of this process is protected between operations
/// (see [`slot_table`](crate::slot_table)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SlotTable {
    /// Patchable functions (slots) of this process.
    pub slots: usize,
    /// How many of their slots are read-only between operations: those in
    /// the binary's RELRO segment. All of them unless the binary was
    /// linked without RELRO (`-z norelro`).
    pub read_only: usize,
}

impl SlotTable {
    /// Every slot is read-only between operations.
    pub fn is_read_only(&self) -> bool {
        self.read_only == self.slots
    }
}

pub(crate) fn slot_table() -> SlotTable {
    let table = &*TABLE;
    SlotTable {
        slots: table.slots,
        read_only: table.read_only.len(),
    }
}
