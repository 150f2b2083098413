//! The contract with `cargo hotpatch` (crate `hotpatch-abi`), instantiated
//! with the runtime's slot and function-address types: what the loader,
//! the registry, manifest validation and quiescence work with.

use std::mem::{align_of, offset_of, size_of};

pub use hotpatch_abi::{
    ABI_VERSION, HOTPATCH_VERSION, HookFn, MAGIC, MANIFEST_SYMBOL, PANIC_STRATEGY, RUSTC_VERSION,
    RawStr, SlotRef, TARGET, TypeLayout,
};

use crate::slot::{FnAddr, Slot};

/// The registry record of one patchable function.
pub type Entry = hotpatch_abi::Entry<Slot, FnAddr>;

/// One replacement in a patch: the record `#[patch]` emits into the patch
/// crate's own table (declared by `manifest!()`).
pub type PatchFn = hotpatch_abi::PatchFn<Entry, FnAddr>;

/// What a patch exports under [`MANIFEST_SYMBOL`].
pub type Manifest = hotpatch_abi::Manifest<PatchFn>;

/// Every patchable function linked into this image (the host binary).
#[linkme::distributed_slice]
pub static SLOTS: [Entry];

// The tool reads entries and writes records with the contract's raw
// layouts: the runtime's are exactly those, or this does not compile.
const _: () = {
    use hotpatch_abi::{RawEntry, RawPatchFn};
    assert!(size_of::<FnAddr>() == size_of::<*const ()>());
    assert!(align_of::<FnAddr>() == align_of::<*const ()>());
    assert!(size_of::<Entry>() == size_of::<RawEntry>());
    assert!(offset_of!(Entry, layouts) == offset_of!(RawEntry, layouts));
    assert!(offset_of!(Entry, slot) == offset_of!(RawEntry, slot));
    assert!(offset_of!(Entry, original) == offset_of!(RawEntry, original));
    assert!(offset_of!(Entry, wrapper) == offset_of!(RawEntry, wrapper));
    assert!(offset_of!(Entry, dispatcher) == offset_of!(RawEntry, dispatcher));
    assert!(offset_of!(Entry, counted) == offset_of!(RawEntry, counted));
    assert!(size_of::<PatchFn>() == size_of::<RawPatchFn>());
    assert!(offset_of!(PatchFn, replacement) == offset_of!(RawPatchFn, replacement));
    assert!(offset_of!(PatchFn, name) == offset_of!(RawPatchFn, name));
    assert!(offset_of!(PatchFn, layouts) == offset_of!(RawPatchFn, layouts));
};
