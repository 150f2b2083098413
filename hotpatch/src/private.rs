//! What the macros' generated code names. Not a public API: anything here
//! may change in any release; `ABI_VERSION` changes whenever the layout of
//! what a patch exports changes.

#![allow(missing_debug_implementations)]

use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};

pub use crate::__hotpatch_slot_current as slot_current;
pub use crate::slot::{FnAddr, Slot};
pub use linkme;

/// Version of the layout of [`Manifest`], [`PatchFn`] and [`Entry`] (3:
/// thin patches, bound to the host's symbols: no private copies of slots
/// or shared statics, no allocator or panic bridge).
pub const ABI_VERSION: u32 = 3;
/// The manifest's first eight bytes.
pub const MAGIC: [u8; 8] = *b"HOTPATCH";
/// The symbol a patch exports its [`Manifest`] under.
pub const MANIFEST_SYMBOL: &str = "hotpatch_manifest_v1";
/// `rustc -vV` of the compiler that built this copy of hotpatch.
pub const RUSTC_VERSION: &str = env!("HOTPATCH_RUSTC_VERSION");
/// Target triple this copy of hotpatch was built for.
pub const TARGET: &str = env!("HOTPATCH_TARGET");
/// Panic strategy of the build this copy of hotpatch is part of.
pub const PANIC_STRATEGY: &str = if cfg!(panic = "unwind") {
    "unwind"
} else {
    "abort"
};
/// Version of the hotpatch crate.
pub const HOTPATCH_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Every patchable function linked into this image (the host binary).
#[linkme::distributed_slice]
pub static SLOTS: [Entry];

/// Size and alignment of one argument or return type.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(C)]
pub struct TypeLayout {
    pub size: usize,
    pub align: usize,
}

impl TypeLayout {
    pub const fn of<T>() -> Self {
        TypeLayout {
            size: std::mem::size_of::<T>(),
            align: std::mem::align_of::<T>(),
        }
    }
}

impl fmt::Display for TypeLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "size {} align {}", self.size, self.align)
    }
}

/// The registry record of one patchable function.
#[repr(C)]
pub struct Entry {
    /// `crate::module::f`, `crate::module::Type::m`,
    /// `<crate::module::Type as Trait>::m`.
    pub path: &'static str,
    /// The signature as written, for people.
    pub signature: &'static str,
    /// Hash of the exact fn-pointer type, `Self` written out.
    pub fingerprint: u64,
    /// Each parameter's layout, then the return type's (absent for `!`).
    pub layouts: &'static [TypeLayout],
    pub slot: &'static Slot,
    pub original: FnAddr,
    pub wrapper: FnAddr,
    /// Runs the old or new implementation during a transition.
    pub dispatcher: FnAddr,
    /// `original` under a [`PanicCount`] on [`SOURCE_PANICS`]: a patch made
    /// from the service's own source (`cargo hotpatch build --base`) copies
    /// it with the counter redirected to the patch's own, and installs it.
    pub counted: FnAddr,
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("path", &self.path)
            .field("signature", &self.signature)
            .finish_non_exhaustive()
    }
}

/// The companion constant of a patchable function: how `#[patch]` reaches
/// its [`Entry`] and checks the signature. `S` is the exact fn-pointer
/// type; `Target` is invariant in it.
pub struct Target<S> {
    entry: fn() -> &'static Entry,
    _signature: PhantomData<fn(S) -> S>,
}

impl<S> Clone for Target<S> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<S> Copy for Target<S> {}

impl<S> Target<S> {
    pub const fn new(entry: fn() -> &'static Entry) -> Self {
        Target {
            entry,
            _signature: PhantomData,
        }
    }

    /// The replacement's side of the signature check in
    /// [`Target::entry_of`]; never called.
    pub const REPLACEMENT: Self = Target {
        entry: never_called,
        _signature: PhantomData,
    };

    /// Compiles only if the two targets, the real one first and then the
    /// replacement's [`REPLACEMENT`](Self::REPLACEMENT), have exactly the same
    /// signature (`Target` is invariant in `S`). Returns the real one's
    /// entry getter.
    pub const fn entry_of(pair: [Self; 2]) -> fn() -> &'static Entry {
        pair[0].entry
    }
}

fn never_called() -> &'static Entry {
    unreachable!("Target::REPLACEMENT is a type witness, never a target")
}

/// One replacement in a patch: the record `#[patch]` emits into the patch
/// crate's own table (declared by `manifest!()`).
#[repr(C)]
pub struct PatchFn {
    /// The target's entry getter: a function of the service crate, so in
    /// a thin patch bound to the host's own (it returns the host's
    /// [`Entry`]).
    pub target: fn() -> &'static Entry,
    /// The entry shim, of the target's exact signature.
    pub replacement: FnAddr,
    /// The replacement's own path in the patch crate, for messages.
    pub name: &'static str,
    /// Each parameter's layout, then the return type's (absent for `!`),
    /// as the patch crate was compiled: checked against the host's entry.
    pub layouts: &'static [TypeLayout],
}

/// A `&'static str` as two words with a fixed layout.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct RawStr {
    pub ptr: *const u8,
    pub len: usize,
}

impl RawStr {
    pub const fn new(s: &'static str) -> Self {
        RawStr {
            ptr: s.as_ptr(),
            len: s.len(),
        }
    }
}

/// What a patch exports under [`MANIFEST_SYMBOL`]. `repr(C)`: the runtime
/// reads the header fields before it knows the patch came from the same
/// compiler. Everything after `abi_version` is read only once
/// `abi_version` matches.
#[repr(C)]
pub struct Manifest {
    pub magic: [u8; 8],
    pub abi_version: u32,
    /// `size_of::<Manifest>()` in the patch.
    pub manifest_size: u32,
    pub rustc: RawStr,
    pub target: RawStr,
    pub panic_strategy: RawStr,
    pub hotpatch_version: RawStr,
    pub name: RawStr,
    pub version: RawStr,
    pub description: RawStr,
    /// The patch crate's `#[patch]` table: writes the count, returns the
    /// first. A function of the patch crate (`manifest!()` defines it):
    /// the table is in the patch's own linker section.
    pub functions: Option<unsafe extern "C" fn(*mut usize) -> *const PatchFn>,
    /// The patch's slot references: one cell per host slot that patch
    /// code reads (an inlined `#[patchable]` wrapper of the service).
    /// `cargo hotpatch build` makes them: each holds the address of the
    /// host's slot after relocation, and the loader rewrites it to the
    /// host's out-of-line wrapper of that function before any patch code
    /// runs (see `SlotRef`).
    pub slot_refs: Option<unsafe extern "C" fn(*mut usize) -> *const SlotRef>,
    pub entry_size: u32,
    pub patch_fn_size: u32,
    /// How many calls into this patch's replacements ended in a panic
    /// (the entry shims of `#[patch]` count them): what `watch` reads.
    pub panics: Option<&'static AtomicU64>,
    /// `manifest!(init = f)`: runs before the patch is applied; `Err`
    /// refuses the patch with its message (a panic is caught by the
    /// loader).
    pub init: Option<fn() -> Result<(), String>>,
}

// SAFETY: the manifest is immutable data (addresses of statics and
// functions); sharing it shares no mutable state.
unsafe impl Sync for Manifest {}

impl Manifest {
    /// The manifest of the crate being compiled, as `manifest!` builds it.
    pub const fn new(
        name: &'static str,
        version: &'static str,
        description: &'static str,
        functions: unsafe extern "C" fn(*mut usize) -> *const PatchFn,
        panics: &'static AtomicU64,
    ) -> Self {
        Manifest {
            magic: MAGIC,
            abi_version: ABI_VERSION,
            manifest_size: std::mem::size_of::<Manifest>() as u32,
            rustc: RawStr::new(RUSTC_VERSION),
            target: RawStr::new(TARGET),
            panic_strategy: RawStr::new(PANIC_STRATEGY),
            hotpatch_version: RawStr::new(HOTPATCH_VERSION),
            name: RawStr::new(name),
            version: RawStr::new(version),
            description: RawStr::new(description),
            functions: Some(functions),
            slot_refs: None,
            entry_size: std::mem::size_of::<Entry>() as u32,
            patch_fn_size: std::mem::size_of::<PatchFn>() as u32,
            panics: Some(panics),
            init: None,
        }
    }

    /// The patch crate's slot-reference table (`manifest!()`).
    pub const fn with_slot_refs(
        mut self,
        refs: unsafe extern "C" fn(*mut usize) -> *const SlotRef,
    ) -> Self {
        self.slot_refs = Some(refs);
        self
    }

    /// Runs `init` before the patch is applied.
    pub const fn with_init(mut self, init: fn() -> Result<(), String>) -> Self {
        self.init = Some(init);
        self
    }
}

/// A patch's `init`, as `manifest!` stores it: an `Err` becomes its
/// message.
pub fn run_init<E: fmt::Display>(init: fn() -> Result<(), E>) -> Result<(), String> {
    init().map_err(|e| e.to_string())
}

/// # Safety
/// `len` must be valid for a write; `table` is the patch crate's slice.
#[inline(always)]
pub unsafe fn patch_fns_raw(table: &'static [PatchFn], len: *mut usize) -> *const PatchFn {
    // SAFETY: guaranteed by the caller.
    unsafe { len.write(table.len()) };
    table.as_ptr()
}

/// A cell of a thin patch through which its code reaches a host slot.
///
/// A `#[patchable]` wrapper reads its slot with a `rip`-relative load
/// (`mov slot(%rip), %reg`, the cheapest call site there is), and patch
/// code that calls that function inlines the wrapper. A shared object
/// cannot reach the host's slot that way (it is mapped too far away), so
/// `cargo hotpatch build` retargets each such load at one of these cells,
/// in the patch's own data, and the cell holds a function the load's
/// `call` can take: the loader stores there the host's out-of-line wrapper
/// of the same function, which reads the host's slot and calls what
/// implements it now (one indirect jump more per call from patch code
/// into a patchable function; later patches need no further writes).
#[repr(C, align(8))]
pub struct SlotRef(pub std::sync::atomic::AtomicPtr<()>);

/// # Safety
/// `len` must be valid for a write; `table` is the patch crate's slice.
#[inline(always)]
pub unsafe fn slot_refs_raw(table: &'static [SlotRef], len: *mut usize) -> *const SlotRef {
    // SAFETY: guaranteed by the caller.
    unsafe { len.write(table.len()) };
    table.as_ptr()
}

/// The counter `Entry::counted` counts on in the service itself, where it
/// is never installed (nothing reads it). A patch made from source has its
/// copy count on its own manifest's counter instead.
pub static SOURCE_PANICS: AtomicU64 = AtomicU64::new(0);

/// Held by a `#[patch]` entry shim around the replacement: counts the
/// calls that end in a panic, in the patch's counter.
pub struct PanicCount {
    counter: &'static AtomicU64,
    /// Already unwinding when the call started (a call from a destructor
    /// during a panic): not this call's panic.
    was: bool,
}

impl PanicCount {
    #[inline(always)]
    pub fn new(counter: &'static AtomicU64) -> Self {
        PanicCount {
            counter,
            was: std::thread::panicking(),
        }
    }
}

impl Drop for PanicCount {
    #[inline(always)]
    fn drop(&mut self) {
        if !self.was && std::thread::panicking() {
            // Relaxed: a statistic, read by `watch` after the fact.
            self.counter.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// For a dispatcher: the implementation the calling thread runs now.
#[inline(always)]
pub fn choose(slot: &Slot) -> *const () {
    slot.choose()
}

/// Reinterprets a slot's pointer as the function-pointer type of `like`.
///
/// # Safety
/// `ptr` must be a function of exactly `F`'s type (signature and ABI).
#[inline(always)]
pub unsafe fn cast_fn<F: Copy>(ptr: *const (), like: F) -> F {
    const {
        assert!(std::mem::size_of::<F>() == std::mem::size_of::<*const ()>());
    }
    let _ = like;
    // SAFETY: `F` is a function pointer type (the macros only pass a fn
    // item cast to a fn pointer), pointer-sized (checked above), and the
    // caller guarantees `ptr` has that type.
    unsafe { std::mem::transmute_copy::<*const (), F>(&ptr) }
}

/// What a thin patch's allocations jump to (`cargo hotpatch build`'s
/// allocator shims, `cargo-hotpatch/src/allocshims.rs`): rustc's
/// `__rust_alloc`, exported under a name every host has. A host with a
/// `#[global_allocator]` of its own defines `__rust_alloc` hidden, so a
/// patch could not bind to it; these call the host's global allocator,
/// whichever it is. Same signature and ABI as the entry point they stand
/// for.
///
/// # Safety
/// As `__rust_alloc`: `size` non-zero, `align` a power of two, and `size`
/// rounded up to `align` not overflowing `isize`.
#[unsafe(no_mangle)]
pub unsafe fn hotpatch_rust_alloc(size: usize, align: usize) -> *mut u8 {
    // SAFETY: the caller's guarantee is `Layout`'s and `alloc`'s.
    unsafe { std::alloc::alloc(std::alloc::Layout::from_size_align_unchecked(size, align)) }
}

/// `__rust_dealloc`, exported; see [`hotpatch_rust_alloc`].
///
/// # Safety
/// As `__rust_dealloc`: `ptr` allocated by the global allocator with this
/// `size` and `align`.
#[unsafe(no_mangle)]
pub unsafe fn hotpatch_rust_dealloc(ptr: *mut u8, size: usize, align: usize) {
    // SAFETY: the caller's guarantee.
    unsafe {
        std::alloc::dealloc(
            ptr,
            std::alloc::Layout::from_size_align_unchecked(size, align),
        )
    }
}

/// `__rust_realloc`, exported; see [`hotpatch_rust_alloc`].
///
/// # Safety
/// As `__rust_realloc`: `ptr` allocated by the global allocator with
/// `old_size` and `align`; `new_size` non-zero and valid with `align`.
#[unsafe(no_mangle)]
pub unsafe fn hotpatch_rust_realloc(
    ptr: *mut u8,
    old_size: usize,
    align: usize,
    new_size: usize,
) -> *mut u8 {
    // SAFETY: the caller's guarantee.
    unsafe {
        std::alloc::realloc(
            ptr,
            std::alloc::Layout::from_size_align_unchecked(old_size, align),
            new_size,
        )
    }
}

/// `__rust_alloc_zeroed`, exported; see [`hotpatch_rust_alloc`].
///
/// # Safety
/// As [`hotpatch_rust_alloc`].
#[unsafe(no_mangle)]
pub unsafe fn hotpatch_rust_alloc_zeroed(size: usize, align: usize) -> *mut u8 {
    // SAFETY: the caller's guarantee.
    unsafe { std::alloc::alloc_zeroed(std::alloc::Layout::from_size_align_unchecked(size, align)) }
}
