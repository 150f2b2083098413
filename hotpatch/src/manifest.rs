//! Reading a patch's manifest without trusting it.
//!
//! The manifest is `repr(C)`. Fields are read in this order, each checked
//! before the next is read (all in [`check`] unless said otherwise):
//!
//! 1. the symbol's address: non-null, aligned, inside a loaded object
//!    whose readable memory holds the 16-byte header;
//! 2. `magic`, then `abi_version` (fixed offsets in every ABI version);
//! 3. `manifest_size` equal to this runtime's, and the whole struct inside
//!    the library's readable memory;
//! 4. the seven function fields (`functions`, `slots`, `shared`,
//!    `host_raise`, `host_allocator`, `early_overflow`, `init`): each
//!    absent or inside the library's executable segments, before any is
//!    called;
//! 5. the strings, each non-null, at most [`MAX_STR`] bytes, inside the
//!    library's readable memory and UTF-8: `rustc`, `target` and
//!    `panic_strategy` must equal the host's; `entry_size`,
//!    `patch_fn_size` and `shared_entry_size` this runtime's; then
//!    `hotpatch_version`, `name`, `version`, `description` (read for
//!    reports only: `abi_version` decides compatibility);
//! 6. only then, with the same compiler established, the getters are
//!    called (patch code): `functions` (required; its table non-null,
//!    aligned, bounded, inside the library, not empty), `slots` (required)
//!    and `shared` (optional) likewise; `host_allocator` (optional) must
//!    return an aligned cell in writable, non-RELRO memory of the
//!    library, and so must `host_raise` (required); `early_overflow`
//!    (optional) is called for its answer; `init` (optional) is only
//!    recorded here and called by [`Checked::run_init`] after the plan;
//! 7. the records behind the tables, when the registry plans
//!    (`registry.rs`): [`Checked::patch_fn`] (getter and replacement in
//!    code, name UTF-8 in readable memory), [`Checked::entry`] (strings
//!    UTF-8 and readable, layouts aligned and readable, slot aligned in
//!    writable non-RELRO memory, the five function addresses in code),
//!    [`Checked::shared_entry`] (likewise for a shared static's record).
//!
//! Every pointer is checked to lie inside the library that exported the
//! manifest before anything reads through it: strings and tables in its
//! readable segments, cells in its writable ones, functions in its
//! executable ones ([`Image`]); the entries behind the tables likewise
//! ([`Checked::entry`], [`Checked::patch_fn`], [`Checked::shared_entry`]),
//! before the registry uses them. What no check can stop is code: a
//! library's initialisers run inside `dlopen`, and the getters above are
//! patch code. The trust policy (which files may be loaded at all, and
//! who signed them) is the defence against hostile files; these checks
//! turn mistakes and corruption into errors.

use std::path::Path;
use std::sync::atomic::AtomicPtr;

use crate::__private::{
    ABI_VERSION, Entry, HostAllocFns, MAGIC, Manifest, PANIC_STRATEGY, PatchFn, RUSTC_VERSION,
    RawStr, SharedEntry, TARGET, Transport, TypeLayout,
};
use crate::Error;
use crate::image::Image;

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
    /// The library's memory, for checking what the tables point to.
    pub image: Image,
}

impl Checked {
    /// Checks that an entry of the patch's (its copy of a patchable
    /// function) points only into the library: before the registry reads
    /// its strings and layouts or writes its slot.
    pub(crate) fn entry(&self, path: &Path, e: *const Entry) -> Result<&'static Entry, Error> {
        let image = &self.image;
        if !e.is_aligned() || !image.readable(e.cast(), std::mem::size_of::<Entry>()) {
            return Err(invalid(path, "an entry lies outside the library's memory"));
        }
        // The reference fields are read as raw pointers: read as
        // references, the compiler may take them to be aligned and
        // non-null, and drop the checks below.
        // SAFETY: aligned and inside the library's readable memory
        // (checked above); each field is plain words.
        let (function, signature, layouts, slot, code) = unsafe {
            (
                raw(&raw const (*e).path),
                raw(&raw const (*e).signature),
                raw(&raw const (*e).layouts),
                raw(&raw const (*e).slot),
                [
                    (*e).original,
                    (*e).wrapper,
                    (*e).guarded,
                    (*e).cross,
                    (*e).dispatcher,
                ],
            )
        };
        let strings = [str_bytes(image, function), str_bytes(image, signature)];
        let ok = strings.iter().all(Option::is_some)
            && layouts.cast::<TypeLayout>().is_aligned()
            && layouts
                .len()
                .checked_mul(std::mem::size_of::<TypeLayout>())
                .is_some_and(|size| image.readable(layouts.cast(), size))
            && image.writable_value(slot)
            && code.iter().all(|f| image.executable(f.as_ptr()));
        if !ok {
            return Err(invalid(
                path,
                "an entry points outside the library's memory or code",
            ));
        }
        if !strings.into_iter().flatten().all(utf8) {
            return Err(invalid(path, "an entry's path or signature is not UTF-8"));
        }
        // SAFETY: every field checked above; produced by `#[patchable]` in
        // code of the same compiler (checked).
        Ok(unsafe { &*e })
    }

    /// Checks a replacement record and returns its target's entry.
    pub(crate) fn patch_fn(&self, path: &Path, f: &PatchFn) -> Result<&'static Entry, Error> {
        let image = &self.image;
        // SAFETY: `f` is in the table `check` found readable; the field is
        // plain words.
        let name = str_bytes(image, unsafe { raw(&raw const f.name) });
        if !image.executable(f.target as *const ())
            || !image.executable(f.replacement.as_ptr())
            || name.is_none()
        {
            return Err(invalid(
                path,
                "a replacement record points outside the library's code",
            ));
        }
        if !name.is_some_and(utf8) {
            return Err(invalid(path, "a replacement record's name is not UTF-8"));
        }
        // Called as returning a raw pointer, so that nothing is assumed of
        // what it returns before `entry` has checked it.
        // SAFETY: `&T` and `*const T` are ABI-compatible (`fn` pointer docs).
        let target = unsafe {
            std::mem::transmute::<fn() -> &'static Entry, fn() -> *const Entry>(f.target)
        };
        // The patch's getter: code of the library, checked above.
        self.entry(path, target())
    }

    /// Checks a shared static's record.
    pub(crate) fn shared_entry(&self, path: &Path, e: &SharedEntry) -> Result<(), Error> {
        let image = &self.image;
        // SAFETY: `e` is in the table `check` found readable; the fields
        // are plain words.
        let strings = unsafe {
            [
                str_bytes(image, raw(&raw const e.path)),
                str_bytes(image, raw(&raw const e.ty)),
            ]
        };
        let target = e.target.0.cast::<AtomicPtr<()>>();
        let ok = strings.iter().all(Option::is_some)
            && image.readable(e.local.0.cast(), e.layout.size)
            && image.writable_value(target);
        if !ok {
            return Err(invalid(
                path,
                "a shared static's record points outside the library's memory",
            ));
        }
        if !strings.into_iter().flatten().all(utf8) {
            return Err(invalid(path, "a shared static's path or type is not UTF-8"));
        }
        Ok(())
    }

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

/// The bits of a reference field, as a raw pointer: nothing assumed.
///
/// # Safety
/// `field` must be valid for reads and aligned.
unsafe fn raw<T: ?Sized>(field: *const &'static T) -> *const T {
    // SAFETY: a reference and a raw pointer to the same type have the same
    // layout; the read is the caller's guarantee.
    unsafe { field.cast::<*const T>().read() }
}

/// The bytes of a `&str` field, if they lie in the library's readable
/// memory (which stays mapped).
fn str_bytes(image: &Image, s: *const str) -> Option<&'static [u8]> {
    let len = (s as *const [u8]).len();
    image.readable(s.cast(), len).then(|| {
        // SAFETY: inside the library's readable memory (checked), which is
        // never unmapped while the registry may use it.
        unsafe { std::slice::from_raw_parts(s.cast::<u8>(), len) }
    })
}

fn utf8(bytes: &[u8]) -> bool {
    std::str::from_utf8(bytes).is_ok()
}

fn invalid(path: &Path, reason: impl Into<String>) -> Error {
    Error::InvalidManifest {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// # Safety
/// `s` must come from a manifest whose ABI version matched.
unsafe fn read_str(path: &Path, image: &Image, field: &str, s: RawStr) -> Result<String, Error> {
    if s.ptr.is_null() {
        return Err(invalid(path, format!("`{field}` is a null string")));
    }
    if s.len > MAX_STR {
        return Err(invalid(
            path,
            format!("`{field}` is {} bytes long (at most {MAX_STR})", s.len),
        ));
    }
    if !image.readable(s.ptr, s.len) {
        return Err(invalid(
            path,
            format!("`{field}` points outside the library's readable memory"),
        ));
    }
    // SAFETY: the range is readable memory of the mapped library (checked
    // above), which is not unmapped while we hold the loader lock.
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
    let image = Image::containing(m.cast())
        .ok_or_else(|| invalid(path, "the manifest is not inside a loaded object"))?;
    if !image.readable(m.cast(), 16) {
        return Err(invalid(path, "the manifest header is not readable memory"));
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
    if !image.readable(m.cast(), std::mem::size_of::<Manifest>()) {
        return Err(invalid(
            path,
            "the manifest extends past the library's memory",
        ));
    }
    // SAFETY: same ABI version and size, and inside the library's readable
    // memory: the whole struct is there, with this layout.
    let m: &Manifest = unsafe { &*m };
    // Function pointers of the manifest: in the library's code, or refused.
    let code = |name: &str, f: Option<*const ()>| -> Result<(), Error> {
        match f {
            Some(f) if !image.executable(f) => Err(invalid(
                path,
                format!("`{name}` points outside the library's code"),
            )),
            _ => Ok(()),
        }
    };
    code("functions", m.functions.map(|f| f as *const ()))?;
    code("slots", m.slots.map(|f| f as *const ()))?;
    code("shared", m.shared.map(|f| f as *const ()))?;
    code("host_raise", m.host_raise.map(|f| f as *const ()))?;
    code("host_allocator", m.host_allocator.map(|f| f as *const ()))?;
    code("early_overflow", m.early_overflow.map(|f| f as *const ()))?;
    code("init", m.init.map(|f| f as *const ()))?;
    // SAFETY: the ABI version matched, so `rustc` is a `RawStr`.
    let rustc = unsafe { read_str(path, &image, "rustc", m.rustc) }?;
    if rustc != RUSTC_VERSION {
        return Err(Error::RustcMismatch {
            path: path.to_owned(),
            host: RUSTC_VERSION.to_owned(),
            patch: rustc,
        });
    }
    // SAFETY: as above.
    let target = unsafe { read_str(path, &image, "target", m.target) }?;
    if target != TARGET {
        return Err(Error::TargetMismatch {
            path: path.to_owned(),
            host: TARGET.to_owned(),
            patch: target,
        });
    }
    // SAFETY: as above.
    let panic = unsafe { read_str(path, &image, "panic_strategy", m.panic_strategy) }?;
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
    // SAFETY: as above. Validated, not compared: `abi_version` decides.
    unsafe { read_str(path, &image, "hotpatch_version", m.hotpatch_version) }?;
    // SAFETY: as above.
    let name = unsafe { read_str(path, &image, "name", m.name) }?;
    // SAFETY: as above.
    let version = unsafe { read_str(path, &image, "version", m.version) }?;
    // SAFETY: as above.
    let description = unsafe { read_str(path, &image, "description", m.description) }?;

    let functions_fn = m
        .functions
        .ok_or_else(|| invalid(path, "the function table getter is null"))?;
    let mut n = 0usize;
    // SAFETY: same compiler, target and ABI: the getter is the patch's
    // `patch_fns_raw`, which writes one `usize` through a valid pointer.
    let first = unsafe { functions_fn(&mut n) };
    // SAFETY: the getter returned `first`/`n` for a table in the library,
    // which stays mapped (caller's guarantee).
    let functions = unsafe { table(path, &image, "function", first, n) }?;
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
    let slots = unsafe { table(path, &image, "slot", first, n) }?;
    let shared = match m.shared {
        Some(shared_fn) => {
            let mut n = 0usize;
            // SAFETY: as for the function table.
            let first = unsafe { shared_fn(&mut n) };
            // SAFETY: as for the function table.
            unsafe { table(path, &image, "shared static", first, n) }?
        }
        None => &[],
    };
    let host_allocator = match m.host_allocator {
        Some(cell_fn) => {
            // SAFETY: as for the function table: the patch's `host_alloc_raw`.
            let cell = unsafe { cell_fn() };
            if !image.writable_value(cell) {
                return Err(invalid(
                    path,
                    "the allocator cell is misaligned or outside the library's writable memory",
                ));
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
    if !image.writable_value(cell) {
        return Err(invalid(
            path,
            "the host-raise cell is misaligned or outside the library's writable memory",
        ));
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
        image,
    })
}

/// # Safety
/// If `first` is non-null and aligned, it must point to `n` valid `T`s
/// that live as long as the process.
unsafe fn table<T>(
    path: &Path,
    image: &Image,
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
    if !image.readable(first.cast(), n * std::mem::size_of::<T>()) {
        return Err(invalid(
            path,
            format!("the {what} table lies outside the library's memory"),
        ));
    }
    // SAFETY: guaranteed by the caller, with the checks above.
    Ok(unsafe { std::slice::from_raw_parts(first, n) })
}

#[cfg(test)]
mod fuzz;
