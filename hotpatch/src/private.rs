//! What the macros' generated code names. Not a public API: anything here
//! may change in any release; `ABI_VERSION` changes whenever the layout of
//! what a patch exports changes.

#![allow(missing_debug_implementations)]

use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::AtomicPtr;

pub use crate::__hotpatch_slot_current as slot_current;
pub use crate::alloc::{HOST_ALLOC, HostAllocFns, HostAllocator};
pub use crate::panic::{HOST_RAISE, Transport, catch, enter, raise};
pub use crate::slot::{FnAddr, Slot};
pub use linkme;

/// Version of the layout of [`Manifest`], [`PatchFn`], [`Entry`] and
/// [`Transport`] (2: a transported panic names the library that raised it).
pub const ABI_VERSION: u32 = 2;
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

/// Every patchable function linked into this image (the host binary, or a
/// patch's private copy of the service crate).
#[linkme::distributed_slice]
pub static SLOTS: [Entry];

/// Every `#[hotpatch::shared]` static linked into this image.
#[linkme::distributed_slice]
pub static SHARED: [SharedEntry];

/// An address of data, type-erased.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(transparent)]
pub struct DataAddr(pub *const ());

// SAFETY: an address, shared read-only.
unsafe impl Send for DataAddr {}
// SAFETY: as above.
unsafe impl Sync for DataAddr {}

/// The registry record of one shared static.
#[repr(C)]
pub struct SharedEntry {
    pub path: &'static str,
    /// The type as written.
    pub ty: &'static str,
    pub fingerprint: u64,
    pub layout: TypeLayout,
    /// This image's value.
    pub local: DataAddr,
    /// This image's redirection cell (an `AtomicPtr<T>`).
    pub target: DataAddr,
}

/// Every `#[patch]` replacement linked into this image.
#[linkme::distributed_slice]
pub static PATCH_FNS: [PatchFn];

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
    pub guarded: FnAddr,
    pub cross: FnAddr,
    /// Runs the old or new implementation during a transition.
    pub dispatcher: FnAddr,
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

/// One replacement in a patch: the record `#[patch]` emits.
#[repr(C)]
pub struct PatchFn {
    /// The patch's private copy of the target's entry.
    pub target: fn() -> &'static Entry,
    /// The entry shim, of the target's exact signature.
    pub replacement: FnAddr,
    /// The replacement's own path in the patch crate, for messages.
    pub name: &'static str,
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
    /// The patch's `PATCH_FNS`: writes the count, returns the first.
    pub functions: Option<unsafe extern "C" fn(*mut usize) -> *const PatchFn>,
    /// The patch's `SLOTS` (its private copy of the service's slots).
    pub slots: Option<unsafe extern "C" fn(*mut usize) -> *const Entry>,
    /// The patch's `HOST_RAISE` cell.
    pub host_raise: Option<unsafe extern "C" fn() -> *const AtomicPtr<()>>,
    pub entry_size: u32,
    pub patch_fn_size: u32,
    /// The patch's `SHARED` (its copies of the service's shared statics).
    pub shared: Option<unsafe extern "C" fn(*mut usize) -> *const SharedEntry>,
    pub shared_entry_size: u32,
    /// Set by `manifest!()`: the patch's global allocator is
    /// [`HostAllocator`], whose cell this returns.
    pub host_allocator: Option<unsafe extern "C" fn() -> *const AtomicPtr<HostAllocFns>>,
    /// Whether more allocations were made during `dlopen` than
    /// [`HostAllocator`] could track.
    pub early_overflow: Option<unsafe extern "C" fn() -> bool>,
    /// `manifest!(init = f)`: runs before the patch is applied.
    pub init: Option<fn() -> Result<(), Transport>>,
}

// SAFETY: the manifest is immutable data (addresses of statics and
// functions); sharing it shares no mutable state.
unsafe impl Sync for Manifest {}

impl Manifest {
    /// The manifest of the crate being compiled, as `manifest!` builds it.
    pub const fn new(name: &'static str, version: &'static str, description: &'static str) -> Self {
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
            functions: Some(patch_fns_raw),
            slots: Some(slots_raw),
            host_raise: Some(host_raise_raw),
            entry_size: std::mem::size_of::<Entry>() as u32,
            patch_fn_size: std::mem::size_of::<PatchFn>() as u32,
            shared: Some(shared_raw),
            shared_entry_size: std::mem::size_of::<SharedEntry>() as u32,
            host_allocator: None,
            early_overflow: None,
            init: None,
        }
    }

    /// Declares that the patch's global allocator is [`HostAllocator`].
    pub const fn with_host_allocator(mut self) -> Self {
        self.host_allocator = Some(host_alloc_raw);
        self.early_overflow = Some(early_overflow_raw);
        self
    }

    /// Runs `init` before the patch is applied.
    pub const fn with_init(mut self, init: fn() -> Result<(), Transport>) -> Self {
        self.init = Some(init);
        self
    }
}

/// Runs a patch's initialisation in the patch's `catch_unwind`: a panic
/// or an `Err` becomes a `Transport` carrying the message.
pub fn run_init<E: fmt::Display>(init: fn() -> Result<(), E>) -> Result<(), Transport> {
    match catch(init) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Transport::message(e.to_string())),
        Err(panic) => Err(panic),
    }
}

unsafe extern "C" fn shared_raw(len: *mut usize) -> *const SharedEntry {
    let s: &[SharedEntry] = &SHARED;
    // SAFETY: the caller passes a valid pointer (see `patch_fns_raw`).
    unsafe { len.write(s.len()) };
    s.as_ptr()
}

unsafe extern "C" fn host_alloc_raw() -> *const AtomicPtr<HostAllocFns> {
    &HOST_ALLOC
}

unsafe extern "C" fn early_overflow_raw() -> bool {
    crate::alloc::early_overflow()
}

/// # Safety
/// `len` must be valid for a write.
unsafe extern "C" fn patch_fns_raw(len: *mut usize) -> *const PatchFn {
    let s: &[PatchFn] = &PATCH_FNS;
    // SAFETY: guaranteed by the caller.
    unsafe { len.write(s.len()) };
    s.as_ptr()
}

/// # Safety
/// `len` must be valid for a write.
unsafe extern "C" fn slots_raw(len: *mut usize) -> *const Entry {
    let s: &[Entry] = &SLOTS;
    // SAFETY: guaranteed by the caller.
    unsafe { len.write(s.len()) };
    s.as_ptr()
}

unsafe extern "C" fn host_raise_raw() -> *const AtomicPtr<()> {
    &HOST_RAISE
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
