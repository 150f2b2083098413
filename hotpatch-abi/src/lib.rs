//! The contract between the hotpatch runtime (`hotpatch`) and the tool
//! that builds patches (`cargo-hotpatch`): what one writes and the other
//! reads, in one place.
//!
//! - the layouts a patch exports and the runtime reads: [`Manifest`],
//!   [`PatchFn`] records and [`SlotRef`] cells, and the [`Entry`] of each
//!   `#[patchable]` function, which `cargo hotpatch build --base` reads
//!   from a build's objects and the runtime keeps in its registry;
//! - the [`ABI_VERSION`] and the magic numbers ([`MAGIC`], [`HOST_MAGIC`]);
//! - the names of symbols and sections both sides look for.
//!
//! Both crates compute offsets with [`core::mem::offset_of!`] on these
//! types, so a layout change changes both at once or fails to compile;
//! [`ABI_VERSION`] changes with any layout change, so a patch built by
//! another release is refused before any field past it is read.
//!
//! [`Entry`] and [`PatchFn`] are generic over the runtime's slot and
//! function-address types, which live with the runtime's code; the tool
//! reads them as [`RawEntry`] and [`RawPatchFn`], the same layouts with
//! raw pointers (the runtime checks at compile time that its own
//! instances have exactly their offsets).
//!
//! Not a public API of hotpatch: it changes with [`ABI_VERSION`].
//!
//! # Examples
//!
//! ```
//! use std::mem::offset_of;
//! use hotpatch_abi::RawEntry;
//!
//! // Where the tool finds an entry's original body in a build's data.
//! assert_eq!(offset_of!(RawEntry, original), 64);
//! ```

#![deny(unsafe_op_in_unsafe_fn)]

use std::fmt;
use std::sync::atomic::{AtomicPtr, AtomicU64};

/// Version of the layout of [`Manifest`], [`PatchFn`], [`HookFn`] and
/// [`Entry`] (4: a patch may redirect the entry of functions that are not
/// `#[patchable]`, [`HookFn`]; 3: thin patches, bound to the host's
/// symbols).
pub const ABI_VERSION: u32 = 4;

/// `rustc -vV` of the compiler that built this build (the runtime's and a
/// patch's must be equal).
pub const RUSTC_VERSION: &str = env!("HOTPATCH_RUSTC_VERSION");
/// The target triple of this build.
pub const TARGET: &str = env!("HOTPATCH_TARGET");
/// The panic strategy of this build.
pub const PANIC_STRATEGY: &str = if cfg!(panic = "unwind") {
    "unwind"
} else {
    "abort"
};
/// The version of hotpatch (released with this crate, at the same
/// version).
pub const HOTPATCH_VERSION: &str = env!("CARGO_PKG_VERSION");

/// A manifest's first eight bytes.
pub const MAGIC: [u8; 8] = *b"HOTPATCH";

/// The symbol a patch exports its [`Manifest`] under.
pub const MANIFEST_SYMBOL: &str = "hotpatch_manifest_v1";

/// The non-allocated section of a patch that names the host build it was
/// made for: [`HOST_MAGIC`], a little-endian `u32` length, and the host's
/// GNU build-id.
pub const HOST_SECTION: &str = ".hotpatch.host";

/// The first eight bytes of [`HOST_SECTION`]: its format and version.
pub const HOST_MAGIC: [u8; 8] = *b"HPHOST01";

/// Exported by every host that links hotpatch (a `u8` static): found by
/// `dlsym` only if the binary exports its symbols, and the anchor a
/// patch made from source reaches the host's private symbols from.
pub const HOST_EXPORTS_SYMBOL: &str = "hotpatch_host_exports_v1";

/// The linker section of a patch crate's [`PatchFn`] table (linkme's
/// name for the `__HOTPATCH_PATCH_FNS` slice `manifest!()` declares).
pub const PATCH_FNS_SECTION: &str = "linkme___HOTPATCH_PATCH_FNS";

/// The linker section of a patch's [`HookFn`] records (linkme's name for
/// the `__HOTPATCH_HOOK_FNS` slice `manifest!()` declares).
pub const HOOK_FNS_SECTION: &str = "linkme___HOTPATCH_HOOK_FNS";

/// The linker section of a patch's [`SlotRef`] cells (linkme's name for
/// the `__HOTPATCH_REFS` slice `manifest!()` declares).
pub const SLOT_REFS_SECTION: &str = "linkme___HOTPATCH_REFS";

/// The cell of a patch made from source that holds the address of its
/// own panic counter (the manifest object defines it): what the copied
/// counted bodies' references to the service's counter become.
pub const SOURCE_PANICS_CELL: &str = "hotpatch_source_panics_v1";

/// The cell of a patch made from source that holds the address of its
/// counting personality routine (the manifest object defines both): the
/// unwind information of each hooked function's new body names it, so a
/// panic that leaves the new body counts on the patch's own counter, as
/// a counted body's does.
pub const HOOK_PERSONALITY_CELL: &str = "hotpatch_hook_personality_v1";

/// rustc's allocator entry points (demangled) and the host's exports a
/// thin patch's allocations jump to instead: a host with its own
/// `#[global_allocator]` defines the entry points hidden.
pub const ALLOCATOR_EXPORTS: [(&str, &str); 4] = [
    ("__rustc::__rust_alloc", "hotpatch_rust_alloc"),
    ("__rustc::__rust_dealloc", "hotpatch_rust_dealloc"),
    ("__rustc::__rust_realloc", "hotpatch_rust_realloc"),
    ("__rustc::__rust_alloc_zeroed", "hotpatch_rust_alloc_zeroed"),
];

/// In a `&str` or `&[T]` field of these records: the offset of the length,
/// after the pointer (what the tool reads and writes; this crate's tests
/// check that rustc lays them out so).
pub const LEN_OFFSET: usize = std::mem::size_of::<usize>();

/// Size and alignment of one argument or return type.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(C)]
pub struct TypeLayout {
    /// `size_of`.
    pub size: usize,
    /// `align_of`.
    pub align: usize,
}

impl TypeLayout {
    /// The layout of `T`.
    ///
    /// ```
    /// let l = hotpatch_abi::TypeLayout::of::<u64>();
    /// assert_eq!((l.size, l.align), (8, 8));
    /// ```
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

/// The registry record of one patchable function, generic over the
/// runtime's slot type `S` and function address type `A` (pointer-sized).
#[repr(C)]
pub struct Entry<S: 'static, A> {
    /// `crate::module::f`, `crate::module::Type::m`,
    /// `<crate::module::Type as Trait>::m`.
    pub path: &'static str,
    /// The signature as written, for people.
    pub signature: &'static str,
    /// Hash of the exact fn-pointer type, `Self` written out.
    pub fingerprint: u64,
    /// Each parameter's layout, then the return type's (absent for `!`).
    pub layouts: &'static [TypeLayout],
    /// The function's slot.
    pub slot: &'static S,
    /// The function's own body.
    pub original: A,
    /// The out-of-line wrapper that reads the slot and calls it.
    pub wrapper: A,
    /// Runs the old or new implementation during a transition.
    pub dispatcher: A,
    /// `original` under the panic counter of the image it is in: a patch
    /// made from the service's own source (`cargo hotpatch build --base`)
    /// copies it with the counter redirected to the patch's own, and
    /// installs it.
    pub counted: A,
}

impl<S, A> fmt::Debug for Entry<S, A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("path", &self.path)
            .field("signature", &self.signature)
            .finish_non_exhaustive()
    }
}

/// One replacement in a patch: the record `#[patch]` (or `cargo hotpatch
/// build --base`) writes into the patch's own table, generic over the
/// entry type `E` and function address type `A`.
#[repr(C)]
pub struct PatchFn<E: 'static, A> {
    /// The target's entry getter: a function of the service crate, so in
    /// a thin patch bound to the host's own (it returns the host's
    /// [`Entry`]).
    pub target: fn() -> &'static E,
    /// The entry shim, of the target's exact signature.
    pub replacement: A,
    /// The replacement's own path in the patch crate, for messages.
    pub name: &'static str,
    /// Each parameter's layout, then the return type's (absent for `!`),
    /// as the patch crate was compiled: checked against the host's entry.
    pub layouts: &'static [TypeLayout],
}

impl<E, A> fmt::Debug for PatchFn<E, A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PatchFn")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// One hooked function in a patch: a function of the host that is not
/// `#[patchable]` (or is, but is reached another way), whose entry the
/// loader redirects to the replacement (`hotpatch::hook`: the first
/// instructions become a jump to a stub that jumps through a runtime
/// slot). Written by `cargo hotpatch build --base` for a changed function
/// that unpatched code calls, and by `#[patch(path, hook)]`.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct HookFn {
    /// The host function's first instruction: a reference to the host's
    /// own symbol (bound to the binary the patch was made for), checked at
    /// load to be a function of the executable's symbol table that starts
    /// there.
    pub target: *const (),
    /// The replacement, of the target's exact signature and ABI, in the
    /// patch's code.
    pub replacement: *const (),
    /// The bytes the builder read at the target's entry in the deployed
    /// build: the whole instructions the hook replaces. The loader refuses
    /// the patch if the running code differs. Empty: no expectation (a
    /// hand-written patch; the loader still decodes the entry).
    pub entry: &'static [u8],
    /// The target's path as its author knows it
    /// (`my_service::db::Db::get`), for messages and listings.
    pub path: &'static str,
    /// The replacement's own name in the patch, for messages.
    pub name: &'static str,
}

// SAFETY: the record is immutable data (two code addresses and three
// borrowed strings); sharing it shares no mutable state.
unsafe impl Sync for HookFn {}

impl fmt::Debug for HookFn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HookFn")
            .field("path", &self.path)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// [`Entry`] as the tool reads it from a build's data: the runtime's
/// layout, with raw pointers for the slot and the addresses.
pub type RawEntry = Entry<(), *const ()>;

/// [`PatchFn`] as the tool writes it into a patch made from source.
pub type RawPatchFn = PatchFn<RawEntry, *const ()>;

/// A `&'static str` as two words with a fixed layout.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct RawStr {
    /// The first byte.
    pub ptr: *const u8,
    /// The length in bytes.
    pub len: usize,
}

impl RawStr {
    /// The two words of `s`.
    pub const fn new(s: &'static str) -> Self {
        RawStr {
            ptr: s.as_ptr(),
            len: s.len(),
        }
    }
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
#[derive(Debug)]
#[repr(C, align(8))]
pub struct SlotRef(pub AtomicPtr<()>);

/// What a patch exports under [`MANIFEST_SYMBOL`], generic over its
/// record type `P`. `repr(C)`: the runtime reads the header fields before
/// it knows the patch came from the same compiler. Everything after
/// `abi_version` is read only once `abi_version` matches.
#[repr(C)]
pub struct Manifest<P: 'static> {
    /// [`MAGIC`].
    pub magic: [u8; 8],
    /// [`ABI_VERSION`].
    pub abi_version: u32,
    /// `size_of::<Manifest>()` in the patch.
    pub manifest_size: u32,
    /// `rustc -vV` of the compiler that built the patch's hotpatch.
    pub rustc: RawStr,
    /// Its target triple.
    pub target: RawStr,
    /// Its panic strategy.
    pub panic_strategy: RawStr,
    /// Its hotpatch version.
    pub hotpatch_version: RawStr,
    /// The patch's name.
    pub name: RawStr,
    /// The patch's version.
    pub version: RawStr,
    /// What it fixes.
    pub description: RawStr,
    /// The patch crate's `#[patch]` table: writes the count, returns the
    /// first. A function of the patch crate (`manifest!()` defines it):
    /// the table is in the patch's own linker section.
    pub functions: Option<unsafe extern "C" fn(*mut usize) -> *const P>,
    /// The patch's slot references: one cell per host slot that patch
    /// code reads (an inlined `#[patchable]` wrapper of the service).
    /// `cargo hotpatch build` makes them: each holds the address of the
    /// host's slot after relocation, and the loader rewrites it to the
    /// host's out-of-line wrapper of that function before any patch code
    /// runs (see [`SlotRef`]).
    pub slot_refs: Option<unsafe extern "C" fn(*mut usize) -> *const SlotRef>,
    /// The patch's hooked functions ([`HookFn`]): writes the count,
    /// returns the first. A patch replaces at least one function, through
    /// `functions` or here.
    pub hooks: Option<unsafe extern "C" fn(*mut usize) -> *const HookFn>,
    /// `size_of` of the patch's [`Entry`].
    pub entry_size: u32,
    /// `size_of` of the patch's [`PatchFn`].
    pub patch_fn_size: u32,
    /// `size_of` of the patch's [`HookFn`].
    pub hook_fn_size: u32,
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
unsafe impl<P> Sync for Manifest<P> {}

impl<P> fmt::Debug for Manifest<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Manifest")
            .field("abi_version", &self.abi_version)
            .finish_non_exhaustive()
    }
}

impl<P> Manifest<P> {
    /// The manifest of the patch being compiled, as `manifest!()` builds
    /// it: this build's identity, and the patch's name, version,
    /// description, record table and panic counter.
    pub const fn new(
        name: &'static str,
        version: &'static str,
        description: &'static str,
        functions: unsafe extern "C" fn(*mut usize) -> *const P,
        panics: &'static AtomicU64,
    ) -> Self {
        Manifest {
            magic: MAGIC,
            abi_version: ABI_VERSION,
            manifest_size: std::mem::size_of::<Self>() as u32,
            rustc: RawStr::new(RUSTC_VERSION),
            target: RawStr::new(TARGET),
            panic_strategy: RawStr::new(PANIC_STRATEGY),
            hotpatch_version: RawStr::new(HOTPATCH_VERSION),
            name: RawStr::new(name),
            version: RawStr::new(version),
            description: RawStr::new(description),
            functions: Some(functions),
            slot_refs: None,
            hooks: None,
            entry_size: std::mem::size_of::<RawEntry>() as u32,
            patch_fn_size: std::mem::size_of::<P>() as u32,
            hook_fn_size: std::mem::size_of::<HookFn>() as u32,
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

    /// The patch crate's hook table (`manifest!()`).
    pub const fn with_hooks(
        mut self,
        hooks: unsafe extern "C" fn(*mut usize) -> *const HookFn,
    ) -> Self {
        self.hooks = Some(hooks);
        self
    }

    /// Runs `init` before the patch is applied.
    pub const fn with_init(mut self, init: fn() -> Result<(), String>) -> Self {
        self.init = Some(init);
        self
    }
}

#[cfg(test)]
mod tests {
    use std::mem::{offset_of, size_of};

    use super::*;

    #[test]
    fn a_str_and_a_slice_are_pointer_then_length() {
        // The tool reads an entry's path as (pointer, length) and writes a
        // record's name and layouts the same way.
        let s: &'static str = "svc::price";
        // SAFETY: reading the two words of a `&str` as two `usize`s; the
        // assertion below is what this test checks.
        let words: [usize; 2] = unsafe { std::mem::transmute(s) };
        assert_eq!(words, [s.as_ptr() as usize, s.len()]);
        let l: &'static [u64] = &[1, 2, 3];
        // SAFETY: as above, for a slice.
        let words: [usize; 2] = unsafe { std::mem::transmute(l) };
        assert_eq!(words, [l.as_ptr() as usize, l.len()]);
        assert_eq!(LEN_OFFSET, size_of::<usize>());
    }

    #[test]
    fn the_raw_layouts_are_the_documented_ones() {
        // What the tool's readers of compiled data assume: a change here
        // is an ABI change.
        assert_eq!(offset_of!(RawEntry, path), 0);
        assert_eq!(offset_of!(RawEntry, layouts), 40);
        assert_eq!(offset_of!(RawEntry, original), 64);
        assert_eq!(offset_of!(RawEntry, counted), 88);
        assert_eq!(size_of::<RawPatchFn>(), 48);
        assert_eq!(
            [
                offset_of!(RawPatchFn, target),
                offset_of!(RawPatchFn, replacement),
                offset_of!(RawPatchFn, name),
                offset_of!(RawPatchFn, layouts),
            ],
            [0, 8, 16, 32]
        );
        assert_eq!(size_of::<HookFn>(), 64);
        assert_eq!(
            [
                offset_of!(HookFn, target),
                offset_of!(HookFn, replacement),
                offset_of!(HookFn, entry),
                offset_of!(HookFn, path),
                offset_of!(HookFn, name),
            ],
            [0, 8, 16, 32, 48]
        );
    }
}
