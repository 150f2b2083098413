//! What the macros' generated code names: re-exports of the contract
//! (`crate::abi`, crate `hotpatch-abi`) and helpers. Not a public API:
//! anything here may change in any release; `ABI_VERSION` changes
//! whenever the layout of what a patch exports changes.

#![allow(missing_debug_implementations)]

use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};

pub use crate::__hotpatch_slot_current as slot_current;
pub use crate::abi::{
    ABI_VERSION, Entry, HOTPATCH_VERSION, HookFn, MAGIC, MANIFEST_SYMBOL, Manifest, PANIC_STRATEGY,
    PatchFn, RUSTC_VERSION, RawStr, SLOTS, SlotRef, TARGET, TypeLayout,
};
pub use crate::slot::{FnAddr, Slot};
pub use linkme;

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

/// The companion of a patchable method of a trait impl whose trait has
/// generic arguments (`impl From<&str> for Error`).
///
/// One type can implement such a trait several times (`From<String>` and
/// `From<&str>`), so an inherent constant named after the trait and the
/// method would be defined twice; the arguments pick the impl here, by
/// type, as they do for the trait itself. `M` is [`Method`] of the hash of
/// `Trait::method` (the trait's last path segment), `A` the tuple of the
/// trait's type arguments (a lifetime argument `'a` as `&'a ()`).
#[diagnostic::on_unimplemented(
    message = "no #[patchable] trait method of `{Self}` has this trait, method and type arguments",
    label = "not a method of a `#[hotpatch::patchable]` impl",
    note = "name the target as `<Type as Trait<Args>>::method`, with the trait's type arguments \
            as the service's impl writes them"
)]
pub trait TraitTarget<M, A: ?Sized> {
    /// The method's exact fn-pointer type, `Self` written out.
    type Signature;
    const TARGET: Target<Self::Signature>;
}

/// Names a trait method in [`TraitTarget`]: `H` is the FNV-1a hash of
/// `Trait::method` (the macros compute it, on both sides).
pub struct Method<const H: u64>;

fn never_called() -> &'static Entry {
    unreachable!("Target::REPLACEMENT is a type witness, never a target")
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

/// # Safety
/// `len` must be valid for a write; `table` is the patch crate's slice.
#[inline(always)]
pub unsafe fn hook_fns_raw(table: &'static [HookFn], len: *mut usize) -> *const HookFn {
    // SAFETY: guaranteed by the caller.
    unsafe { len.write(table.len()) };
    table.as_ptr()
}

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

/// Held by a `#[patch]` entry shim (and a `counted` body) around the
/// replacement: counts the calls that end in a panic, in the patch's
/// counter, at no cost to a call that returns.
///
/// The shim `mem::forget`s the guard once the replacement returns, so its
/// `Drop` runs only on the unwind path, inside the landing pad: the normal
/// path has no load, store or branch for it (the counter's address is a
/// link-time constant that the compiler sinks into the landing pad). A
/// call made from a destructor while another panic unwinds and returning
/// normally is not counted either: the guard is forgotten.
pub struct PanicCount {
    counter: &'static AtomicU64,
}

impl PanicCount {
    #[inline(always)]
    pub fn new(counter: &'static AtomicU64) -> Self {
        PanicCount { counter }
    }

    /// The call returned: nothing to count.
    #[inline(always)]
    pub fn returned(self) {
        let _ = std::mem::ManuallyDrop::new(self);
    }
}

impl Drop for PanicCount {
    /// Runs only while the replacement's panic unwinds through the shim.
    #[inline(always)]
    fn drop(&mut self) {
        // Relaxed: a statistic, read by `watch` after the fact.
        self.counter.fetch_add(1, Ordering::Relaxed);
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
