//! Reading a patch's manifest without trusting it.
//!
//! The manifest is `repr(C)`. Fields are read in this order, each checked
//! before the next is read:
//!
//! 1. the symbol's address: non-null and aligned;
//! 2. `magic`, then `abi_version` (fixed offsets in every ABI version);
//! 3. `manifest_size`, `entry_size`, `patch_fn_size`: the layout this
//!    runtime expects;
//! 4. the strings: non-null, at most [`MAX_STR`] bytes, UTF-8; then
//!    `rustc`, `target` and `panic_strategy` must equal the host's;
//! 5. only then, with the same compiler established, the table getters
//!    are called (patch code) and their results checked: non-null,
//!    aligned, bounded counts, at least one function.
//!
//! What cannot be checked from inside the process is whether a pointer in
//! a hostile manifest points into the library: the trust policy (which
//! files may be loaded at all) is the defence against hostile files.

use std::path::Path;
use std::sync::atomic::AtomicPtr;

use crate::__private::{
    ABI_VERSION, Entry, HostAllocFns, MAGIC, Manifest, PANIC_STRATEGY, PatchFn, RUSTC_VERSION,
    RawStr, SharedEntry, TARGET, Transport,
};
use crate::Error;

/// Longest string a manifest may carry.
pub(crate) const MAX_STR: usize = 64 * 1024;
/// Most functions one patch may replace, and most slots its copy may hold.
pub(crate) const MAX_FUNCTIONS: usize = 1 << 20;

/// A manifest whose every field was checked.
pub(crate) struct Checked {
    pub name: String,
    pub version: String,
    pub description: String,
    pub functions: &'static [PatchFn],
    pub slots: &'static [Entry],
    pub shared: &'static [SharedEntry],
    pub host_raise: &'static AtomicPtr<()>,
    /// The patch's `HostAllocator` cell, if it declares one.
    pub host_allocator: Option<&'static AtomicPtr<HostAllocFns>>,
    /// More allocations during `dlopen` than could be tracked.
    pub early_overflow: bool,
    pub init: Option<fn() -> Result<(), Transport>>,
}

impl Checked {
    /// Runs the patch's initialisation, if it has one.
    pub(crate) fn run_init(&self, path: &Path) -> Result<(), Error> {
        match self.init.map(|init| init()) {
            Some(Err(t)) => Err(Error::InitFailed {
                path: path.to_owned(),
                reason: t.into_message(),
            }),
            _ => Ok(()),
        }
    }
}

fn invalid(path: &Path, reason: impl Into<String>) -> Error {
    Error::InvalidManifest {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// # Safety
/// `s` must come from a manifest whose ABI version matched.
unsafe fn read_str(path: &Path, field: &str, s: RawStr) -> Result<String, Error> {
    if s.ptr.is_null() {
        return Err(invalid(path, format!("`{field}` is a null string")));
    }
    if s.len > MAX_STR {
        return Err(invalid(
            path,
            format!("`{field}` is {} bytes long (at most {MAX_STR})", s.len),
        ));
    }
    // SAFETY: non-null and bounded (checked above); the caller guarantees
    // the manifest's layout, so `ptr` came from a `&'static str` of the
    // patch.
    let bytes = unsafe { std::slice::from_raw_parts(s.ptr, s.len) };
    std::str::from_utf8(bytes)
        .map(str::to_owned)
        .map_err(|e| invalid(path, format!("`{field}` is not UTF-8: {e}")))
}

/// Checks the manifest at `m` and returns its contents.
///
/// # Safety
/// `m` must be the address `dlsym` returned for the manifest symbol of a
/// library that stays mapped for the rest of the process.
pub(crate) unsafe fn check(path: &Path, m: *const Manifest) -> Result<Checked, Error> {
    if m.is_null() {
        return Err(invalid(path, "the manifest symbol is null"));
    }
    if !m.is_aligned() {
        return Err(invalid(path, "the manifest is misaligned"));
    }
    // SAFETY: `m` is non-null and aligned; the first 16 bytes (magic, ABI
    // version, size) have the same layout in every ABI version.
    let (magic, abi, size) = unsafe {
        (
            std::ptr::addr_of!((*m).magic).read(),
            std::ptr::addr_of!((*m).abi_version).read(),
            std::ptr::addr_of!((*m).manifest_size).read(),
        )
    };
    if magic != MAGIC {
        return Err(Error::BadMagic {
            path: path.to_owned(),
            found: magic,
        });
    }
    if abi != ABI_VERSION {
        return Err(Error::AbiMismatch {
            path: path.to_owned(),
            host: ABI_VERSION,
            patch: abi,
        });
    }
    if size as usize != std::mem::size_of::<Manifest>() {
        return Err(invalid(
            path,
            format!(
                "manifest is {size} bytes, expected {} for ABI {ABI_VERSION}",
                std::mem::size_of::<Manifest>()
            ),
        ));
    }
    // SAFETY: same ABI version and size: the whole struct has this layout.
    let m: &Manifest = unsafe { &*m };
    // SAFETY: the ABI version matched, so `rustc` is a `RawStr`.
    let rustc = unsafe { read_str(path, "rustc", m.rustc) }?;
    if rustc != RUSTC_VERSION {
        return Err(Error::RustcMismatch {
            path: path.to_owned(),
            host: RUSTC_VERSION.to_owned(),
            patch: rustc,
        });
    }
    // SAFETY: as above.
    let target = unsafe { read_str(path, "target", m.target) }?;
    if target != TARGET {
        return Err(Error::TargetMismatch {
            path: path.to_owned(),
            host: TARGET.to_owned(),
            patch: target,
        });
    }
    // SAFETY: as above.
    let panic = unsafe { read_str(path, "panic_strategy", m.panic_strategy) }?;
    if panic != PANIC_STRATEGY {
        return Err(Error::PanicStrategyMismatch {
            path: path.to_owned(),
            host: PANIC_STRATEGY.to_owned(),
            patch: panic,
        });
    }
    if m.entry_size as usize != std::mem::size_of::<Entry>()
        || m.patch_fn_size as usize != std::mem::size_of::<PatchFn>()
        || m.shared_entry_size as usize != std::mem::size_of::<SharedEntry>()
    {
        return Err(invalid(
            path,
            "table entry sizes differ from this runtime's",
        ));
    }
    // SAFETY: as above.
    let name = unsafe { read_str(path, "name", m.name) }?;
    // SAFETY: as above.
    let version = unsafe { read_str(path, "version", m.version) }?;
    // SAFETY: as above.
    let description = unsafe { read_str(path, "description", m.description) }?;

    let functions_fn = m
        .functions
        .ok_or_else(|| invalid(path, "the function table getter is null"))?;
    let mut n = 0usize;
    // SAFETY: same compiler, target and ABI: the getter is the patch's
    // `patch_fns_raw`, which writes one `usize` through a valid pointer.
    let first = unsafe { functions_fn(&mut n) };
    // SAFETY: the getter returned `first`/`n` for a table in the library,
    // which stays mapped (caller's guarantee).
    let functions = unsafe { table(path, "function", first, n) }?;
    if functions.is_empty() {
        return Err(invalid(path, "the patch replaces no function"));
    }
    let slots_fn = m
        .slots
        .ok_or_else(|| invalid(path, "the slot table getter is null"))?;
    let mut n = 0usize;
    // SAFETY: as for the function table.
    let first = unsafe { slots_fn(&mut n) };
    // SAFETY: as for the function table.
    let slots = unsafe { table(path, "slot", first, n) }?;
    let shared = match m.shared {
        Some(shared_fn) => {
            let mut n = 0usize;
            // SAFETY: as for the function table.
            let first = unsafe { shared_fn(&mut n) };
            // SAFETY: as for the function table.
            unsafe { table(path, "shared static", first, n) }?
        }
        None => &[],
    };
    let host_allocator = match m.host_allocator {
        Some(cell_fn) => {
            // SAFETY: as for the function table: the patch's `host_alloc_raw`.
            let cell = unsafe { cell_fn() };
            if cell.is_null() || !cell.is_aligned() {
                return Err(invalid(path, "the allocator cell is null or misaligned"));
            }
            // SAFETY: non-null, aligned, a static of the mapped library.
            Some(unsafe { &*cell })
        }
        None => None,
    };
    // SAFETY: as for the function table: the patch's `early_overflow_raw`.
    let early_overflow = m.early_overflow.is_some_and(|f| unsafe { f() });
    let host_raise_fn = m
        .host_raise
        .ok_or_else(|| invalid(path, "the host-raise getter is null"))?;
    // SAFETY: as for the function table: the patch's `host_raise_raw`.
    let cell = unsafe { host_raise_fn() };
    if cell.is_null() || !cell.is_aligned() {
        return Err(invalid(path, "the host-raise cell is null or misaligned"));
    }
    // SAFETY: non-null, aligned, and a static of the mapped library.
    let host_raise = unsafe { &*cell };
    Ok(Checked {
        name,
        version,
        description,
        functions,
        slots,
        shared,
        host_raise,
        host_allocator,
        early_overflow,
        init: m.init,
    })
}

/// # Safety
/// If `first` is non-null and aligned, it must point to `n` valid `T`s
/// that live as long as the process.
unsafe fn table<T>(
    path: &Path,
    what: &str,
    first: *const T,
    n: usize,
) -> Result<&'static [T], Error> {
    if n == 0 {
        return Ok(&[]);
    }
    if n > MAX_FUNCTIONS {
        return Err(invalid(path, format!("the {what} table has {n} entries")));
    }
    if first.is_null() {
        return Err(invalid(path, format!("the {what} table is null")));
    }
    if !first.is_aligned() {
        return Err(invalid(path, format!("the {what} table is misaligned")));
    }
    // SAFETY: guaranteed by the caller, with the checks above.
    Ok(unsafe { std::slice::from_raw_parts(first, n) })
}
