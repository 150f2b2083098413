//! Reading a patch's manifest without trusting it.
//!
//! The manifest is `repr(C)`. [`check`] reads its fields in this order,
//! each checked before the next is read, one function per step:
//!
//! 1. [`locate`]: the symbol's address: non-null, aligned, inside a
//!    loaded object whose readable memory holds the 16-byte header;
//! 2. [`header`]: `magic`, then `abi_version` (fixed offsets in every ABI
//!    version);
//! 3. [`whole`]: `manifest_size` equal to this runtime's, and the whole
//!    struct inside the library's readable memory;
//! 4. [`code_fields`]: the seven function fields (`functions`, `slots`,
//!    `shared`, `host_raise`, `host_allocator`, `early_overflow`, `init`):
//!    each absent or inside the library's executable segments, before any
//!    is called;
//! 5. [`strings`]: the strings, each non-null, at most [`MAX_STR`] bytes,
//!    inside the library's readable memory and UTF-8: `rustc`, `target`
//!    and `panic_strategy` must equal the host's; `entry_size`,
//!    `patch_fn_size` and `shared_entry_size` this runtime's; then
//!    `hotpatch_version`, `name`, `version`, `description` (read for
//!    reports only: `abi_version` decides compatibility; each may be
//!    empty);
//! 6. [`getters`]: only then, with the same compiler established, the
//!    getters are called (patch code): `functions` (required; its table
//!    non-null, aligned, bounded, inside the library, not empty), `slots`
//!    (required) and `shared` (optional) likewise, but either may be
//!    empty; `host_allocator` (optional) must return an aligned cell in
//!    writable, non-RELRO memory of the library, and so must `host_raise`
//!    (required); `early_overflow` (optional) is called for its answer;
//!    `init` (optional) is only recorded here and called by
//!    [`Checked::run_init`] after the plan;
//! 7. [`records`]: the records behind the tables: [`patch_fn`] (getter
//!    and replacement in code, name UTF-8 in readable memory, then the
//!    getter called and its entry checked), [`entry`] (strings UTF-8 and
//!    readable, layouts aligned and readable, slot aligned in writable
//!    non-RELRO memory, the five function addresses in code),
//!    [`shared_entry`] (likewise for a shared static's record).
//!
//! Every pointer is checked to lie inside the library that exported the
//! manifest before anything reads through it: strings and tables in its
//! readable segments, cells in its writable ones, functions in its
//! executable ones ([`Image`]). Empty strings, tables and layout lists
//! read nothing, and their pointers dangle (the compiler gives `""` and
//! `&[]` an address that no object contains): they need only be non-null
//! and aligned ([`Image::readable_slice`]).
//!
//! The registry then resolves what the records name against this process
//! (`registry.rs`: `plan`). The checks return a [`Refusal`]; the loader,
//! which knows the file, turns it into an [`Error`](crate::Error).
//!
//! What no check can stop is code: a library's initialisers run inside
//! `dlopen`, and the getters above are patch code. The trust policy (which
//! files may be loaded at all, and who signed them) is the defence against
//! hostile files; these checks turn mistakes and corruption into errors.

use std::sync::atomic::AtomicPtr;

use crate::__private::{
    ABI_VERSION, Entry, FnAddr, HostAllocFns, MAGIC, Manifest, PANIC_STRATEGY, PatchFn,
    RUSTC_VERSION, RawStr, SharedEntry, TARGET, Transport, TypeLayout,
};
use crate::error::Refusal;
use crate::image::Image;

/// Longest string a manifest may carry.
pub(crate) const MAX_STR: usize = 64 * 1024;
/// Most functions one patch may replace, and most slots its copy may hold.
pub(crate) const MAX_FUNCTIONS: usize = 1 << 20;

/// A manifest whose every field, and every record behind its tables, was
/// checked.
pub(crate) struct Checked {
    pub name: String,
    pub version: String,
    pub description: String,
    /// What the patch replaces, in its table's order (at least one).
    pub functions: Vec<Replacement>,
    /// The patch's private copies of patchable functions.
    pub slots: Vec<&'static Entry>,
    pub shared: &'static [SharedEntry],
    pub host_raise: &'static AtomicPtr<()>,
    /// The patch's `HostAllocator` cell, if it declares one.
    pub host_allocator: Option<&'static AtomicPtr<HostAllocFns>>,
    /// More allocations during `dlopen` than could be tracked.
    pub early_overflow: bool,
    pub init: Option<fn() -> Result<(), Transport>>,
}

/// One checked replacement record.
#[derive(Clone, Copy)]
pub(crate) struct Replacement {
    /// The patch's copy of the target's entry, as compiled into it.
    pub target: &'static Entry,
    /// The entry shim, in the library's code.
    pub code: FnAddr,
}

impl Checked {
    /// Runs the patch's initialisation, if it has one.
    pub(crate) fn run_init(&self) -> Result<(), Refusal> {
        match self.init.map(|init| init()) {
            Some(Err(t)) => Err(Refusal::InitFailed {
                reason: t.into_message(),
            }),
            _ => Ok(()),
        }
    }
}

/// Checks the manifest at `m` and every record behind it (the seven steps
/// of the module docs) and returns its contents.
///
/// # Safety
/// `m` must be the address `dlsym` returned for the manifest symbol of a
/// library that stays mapped for the rest of the process.
pub(crate) unsafe fn check(m: *const Manifest) -> Result<Checked, Refusal> {
    // SAFETY: the caller's guarantee.
    let fields = unsafe { fields(m) }?;
    let (functions, slots) = records(&fields.image, &fields.tables)?;
    Ok(Checked {
        name: fields.about.name,
        version: fields.about.version,
        description: fields.about.description,
        functions,
        slots,
        shared: fields.tables.shared,
        host_raise: fields.tables.host_raise,
        host_allocator: fields.tables.host_allocator,
        early_overflow: fields.tables.early_overflow,
        init: fields.init,
    })
}

/// The manifest's own fields, checked (steps 1 to 6).
struct Fields {
    about: About,
    tables: Tables,
    init: Option<fn() -> Result<(), Transport>>,
    /// The library's memory, for checking what the tables point to.
    image: Image,
}

/// Steps 1 to 6: everything but the records behind the tables.
///
/// # Safety
/// As [`check`].
unsafe fn fields(m: *const Manifest) -> Result<Fields, Refusal> {
    let image = locate(m)?;
    // SAFETY: step 1 found `m` non-null, aligned, with 16 readable bytes.
    unsafe { header(m) }?;
    // SAFETY: step 2 found this ABI version; the library stays mapped
    // (caller's guarantee).
    let m = unsafe { whole(&image, m) }?;
    code_fields(&image, m)?;
    let about = strings(&image, m)?;
    // SAFETY: steps 1 to 5 passed for `m`.
    let tables = unsafe { getters(&image, m) }?;
    Ok(Fields {
        about,
        tables,
        init: m.init,
        image,
    })
}

/// Step 1: the symbol's address, and the object it is in.
fn locate(m: *const Manifest) -> Result<Image, Refusal> {
    if m.is_null() {
        return Err(invalid("the manifest symbol is null"));
    }
    if !m.is_aligned() {
        return Err(invalid("the manifest is misaligned"));
    }
    let image = Image::containing(m.cast())
        .ok_or_else(|| invalid("the manifest is not inside a loaded object"))?;
    if !image.readable(m.cast(), 16) {
        return Err(invalid("the manifest header is not readable memory"));
    }
    Ok(image)
}

/// Step 2: `magic` and `abi_version`.
///
/// # Safety
/// `m` must be non-null and aligned, its first 16 bytes readable.
unsafe fn header(m: *const Manifest) -> Result<(), Refusal> {
    // SAFETY: guaranteed by the caller; the first 16 bytes (magic, ABI
    // version, size) have the same layout in every ABI version.
    let (magic, abi) = unsafe {
        (
            std::ptr::addr_of!((*m).magic).read(),
            std::ptr::addr_of!((*m).abi_version).read(),
        )
    };
    if magic != MAGIC {
        return Err(Refusal::BadMagic { found: magic });
    }
    if abi != ABI_VERSION {
        return Err(Refusal::AbiMismatch {
            host: ABI_VERSION,
            patch: abi,
        });
    }
    Ok(())
}

/// Step 3: `manifest_size`, and the whole struct in readable memory.
///
/// # Safety
/// `m` must have passed [`locate`] and [`header`], and its library stay
/// mapped for the rest of the process.
unsafe fn whole(image: &Image, m: *const Manifest) -> Result<&'static Manifest, Refusal> {
    // SAFETY: in the 16 readable header bytes (caller's guarantee).
    let size = unsafe { std::ptr::addr_of!((*m).manifest_size).read() };
    if size as usize != std::mem::size_of::<Manifest>() {
        return Err(invalid(format!(
            "manifest is {size} bytes, expected {} for ABI {ABI_VERSION}",
            std::mem::size_of::<Manifest>()
        )));
    }
    if !image.readable(m.cast(), std::mem::size_of::<Manifest>()) {
        return Err(invalid("the manifest extends past the library's memory"));
    }
    // SAFETY: same ABI version and size, and inside the library's readable
    // memory, which stays mapped: the whole struct is there, with this
    // layout.
    Ok(unsafe { &*m })
}

/// Step 4: every function field absent or in the library's code, before
/// any is called.
fn code_fields(image: &Image, m: &Manifest) -> Result<(), Refusal> {
    let fields = [
        ("functions", m.functions.map(|f| f as *const ())),
        ("slots", m.slots.map(|f| f as *const ())),
        ("shared", m.shared.map(|f| f as *const ())),
        ("host_raise", m.host_raise.map(|f| f as *const ())),
        ("host_allocator", m.host_allocator.map(|f| f as *const ())),
        ("early_overflow", m.early_overflow.map(|f| f as *const ())),
        ("init", m.init.map(|f| f as *const ())),
    ];
    for (name, f) in fields {
        if let Some(f) = f
            && !image.executable(f)
        {
            return Err(invalid(format!(
                "`{name}` points outside the library's code"
            )));
        }
    }
    Ok(())
}

/// What the manifest says of the patch, for reports.
struct About {
    name: String,
    version: String,
    description: String,
}

/// Step 5: the strings, and the sizes of the table entries.
fn strings(image: &Image, m: &Manifest) -> Result<About, Refusal> {
    let rustc = read_str(image, "rustc", m.rustc)?;
    if rustc != RUSTC_VERSION {
        return Err(Refusal::RustcMismatch {
            host: RUSTC_VERSION.to_owned(),
            patch: rustc,
        });
    }
    let target = read_str(image, "target", m.target)?;
    if target != TARGET {
        return Err(Refusal::TargetMismatch {
            host: TARGET.to_owned(),
            patch: target,
        });
    }
    let panic = read_str(image, "panic_strategy", m.panic_strategy)?;
    if panic != PANIC_STRATEGY {
        return Err(Refusal::PanicStrategyMismatch {
            host: PANIC_STRATEGY.to_owned(),
            patch: panic,
        });
    }
    if m.entry_size as usize != std::mem::size_of::<Entry>()
        || m.patch_fn_size as usize != std::mem::size_of::<PatchFn>()
        || m.shared_entry_size as usize != std::mem::size_of::<SharedEntry>()
    {
        return Err(invalid("table entry sizes differ from this runtime's"));
    }
    // Validated, not compared: `abi_version` decides.
    read_str(image, "hotpatch_version", m.hotpatch_version)?;
    Ok(About {
        name: read_str(image, "name", m.name)?,
        version: read_str(image, "version", m.version)?,
        description: read_str(image, "description", m.description)?,
    })
}

/// What the getters returned, checked.
struct Tables {
    functions: &'static [PatchFn],
    slots: &'static [Entry],
    shared: &'static [SharedEntry],
    host_raise: &'static AtomicPtr<()>,
    host_allocator: Option<&'static AtomicPtr<HostAllocFns>>,
    early_overflow: bool,
}

/// Step 6: the getters, called (patch code), and what they return.
///
/// # Safety
/// `m` must have passed steps 1 to 5 (its getters are the library's code,
/// built by this compiler for this target), and its library stay mapped
/// for the rest of the process.
unsafe fn getters(image: &Image, m: &Manifest) -> Result<Tables, Refusal> {
    let functions_fn = m
        .functions
        .ok_or_else(|| invalid("the function table getter is null"))?;
    let mut n = 0usize;
    // SAFETY: same compiler, target and ABI: the getter is the patch's
    // `patch_fns_raw`, which writes one `usize` through a valid pointer.
    let first = unsafe { functions_fn(&mut n) };
    // SAFETY: the getter returned `first`/`n` for a table in the library,
    // which stays mapped (caller's guarantee).
    let functions = unsafe { table(image, "function", first, n) }?;
    if functions.is_empty() {
        return Err(invalid("the patch replaces no function"));
    }
    let slots_fn = m
        .slots
        .ok_or_else(|| invalid("the slot table getter is null"))?;
    let mut n = 0usize;
    // SAFETY: as for the function table.
    let first = unsafe { slots_fn(&mut n) };
    // SAFETY: as for the function table.
    let slots = unsafe { table(image, "slot", first, n) }?;
    let shared = match m.shared {
        Some(shared_fn) => {
            let mut n = 0usize;
            // SAFETY: as for the function table.
            let first = unsafe { shared_fn(&mut n) };
            // SAFETY: as for the function table.
            unsafe { table(image, "shared static", first, n) }?
        }
        None => &[],
    };
    let host_allocator = match m.host_allocator {
        Some(cell_fn) => {
            // SAFETY: as for the function table: the patch's `host_alloc_raw`.
            let cell = unsafe { cell_fn() };
            if !image.writable_value(cell) {
                return Err(invalid(
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
        .ok_or_else(|| invalid("the host-raise getter is null"))?;
    // SAFETY: as for the function table: the patch's `host_raise_raw`.
    let cell = unsafe { host_raise_fn() };
    if !image.writable_value(cell) {
        return Err(invalid(
            "the host-raise cell is misaligned or outside the library's writable memory",
        ));
    }
    // SAFETY: non-null, aligned, and a static of the mapped library.
    let host_raise = unsafe { &*cell };
    Ok(Tables {
        functions,
        slots,
        shared,
        host_raise,
        host_allocator,
        early_overflow,
    })
}

/// Step 7: the records behind the tables, before the registry reads
/// their strings and layouts or writes their slots.
fn records(
    image: &Image,
    tables: &Tables,
) -> Result<(Vec<Replacement>, Vec<&'static Entry>), Refusal> {
    let functions = tables
        .functions
        .iter()
        .map(|f| patch_fn(image, f))
        .collect::<Result<_, _>>()?;
    let slots = tables
        .slots
        .iter()
        .map(|e| entry(image, e))
        .collect::<Result<_, _>>()?;
    for e in tables.shared {
        shared_entry(image, e)?;
    }
    Ok((functions, slots))
}

/// Checks a replacement record, then calls its target getter and checks
/// the entry it returns.
pub(crate) fn patch_fn(image: &Image, f: &PatchFn) -> Result<Replacement, Refusal> {
    // SAFETY: `f` is in a table found readable and aligned; the field is
    // plain words.
    let name = str_bytes(image, unsafe { raw(&raw const f.name) });
    if !image.executable(f.target as *const ())
        || !image.executable(f.replacement.as_ptr())
        || name.is_none()
    {
        return Err(invalid(
            "a replacement record points outside the library's code",
        ));
    }
    if !name.is_some_and(utf8) {
        return Err(invalid("a replacement record's name is not UTF-8"));
    }
    // Called as returning a raw pointer, so that nothing is assumed of
    // what it returns before `entry` has checked it.
    // SAFETY: `&T` and `*const T` are ABI-compatible (`fn` pointer docs).
    let target =
        unsafe { std::mem::transmute::<fn() -> &'static Entry, fn() -> *const Entry>(f.target) };
    // The patch's getter: code of the library, checked above.
    Ok(Replacement {
        target: entry(image, target())?,
        code: f.replacement,
    })
}

/// Checks that an entry of the patch's (its copy of a patchable function)
/// points only into the library.
pub(crate) fn entry(image: &Image, e: *const Entry) -> Result<&'static Entry, Refusal> {
    if !e.is_aligned() || !image.readable(e.cast(), std::mem::size_of::<Entry>()) {
        return Err(invalid("an entry lies outside the library's memory"));
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
    // `layouts` is empty for `fn() -> !`.
    let ok = strings.iter().all(Option::is_some)
        && image.readable_slice(layouts.cast::<TypeLayout>(), layouts.len())
        && image.writable_value(slot)
        && code.iter().all(|f| image.executable(f.as_ptr()));
    if !ok {
        return Err(invalid(
            "an entry points outside the library's memory or code",
        ));
    }
    if !strings.into_iter().flatten().all(utf8) {
        return Err(invalid("an entry's path or signature is not UTF-8"));
    }
    // SAFETY: every field checked above; produced by `#[patchable]` in
    // code of the same compiler (checked).
    Ok(unsafe { &*e })
}

/// Checks a shared static's record.
pub(crate) fn shared_entry(image: &Image, e: &SharedEntry) -> Result<(), Refusal> {
    // SAFETY: `e` is in a table found readable and aligned; the fields
    // are plain words.
    let strings = unsafe {
        [
            str_bytes(image, raw(&raw const e.path)),
            str_bytes(image, raw(&raw const e.ty)),
        ]
    };
    let target = e.target.0.cast::<AtomicPtr<()>>();
    // `local` of a zero-sized type holds nothing to read.
    let ok = strings.iter().all(Option::is_some)
        && image.readable_slice(e.local.0.cast::<u8>(), e.layout.size)
        && image.writable_value(target);
    if !ok {
        return Err(invalid(
            "a shared static's record points outside the library's memory",
        ));
    }
    if !strings.into_iter().flatten().all(utf8) {
        return Err(invalid("a shared static's path or type is not UTF-8"));
    }
    Ok(())
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

/// The bytes of a `&str` field, if they make a valid `&[u8]` in the
/// library's readable memory (which stays mapped): `""` has a dangling
/// pointer, and is `Some(&[])`.
fn str_bytes(image: &Image, s: *const str) -> Option<&'static [u8]> {
    bytes(image, s.cast(), (s as *const [u8]).len())
}

fn bytes(image: &Image, ptr: *const u8, len: usize) -> Option<&'static [u8]> {
    image.readable_slice(ptr, len).then(|| {
        // SAFETY: non-null, and `len` bytes inside the library's readable
        // memory (or none), which is never unmapped while the registry
        // may use it.
        unsafe { std::slice::from_raw_parts(ptr, len) }
    })
}

fn utf8(bytes: &[u8]) -> bool {
    std::str::from_utf8(bytes).is_ok()
}

fn invalid(reason: impl Into<String>) -> Refusal {
    Refusal::InvalidManifest(reason.into())
}

/// A string field of the manifest: non-null, at most [`MAX_STR`] bytes,
/// readable (nothing to read if empty), UTF-8.
fn read_str(image: &Image, field: &str, s: RawStr) -> Result<String, Refusal> {
    if s.ptr.is_null() {
        return Err(invalid(format!("`{field}` is a null string")));
    }
    if s.len > MAX_STR {
        return Err(invalid(format!(
            "`{field}` is {} bytes long (at most {MAX_STR})",
            s.len
        )));
    }
    let bytes = bytes(image, s.ptr, s.len).ok_or_else(|| {
        invalid(format!(
            "`{field}` points outside the library's readable memory"
        ))
    })?;
    std::str::from_utf8(bytes)
        .map(str::to_owned)
        .map_err(|e| invalid(format!("`{field}` is not UTF-8: {e}")))
}

/// A table a getter returned. Empty tables are not read, whatever their
/// pointer (an empty slice's dangles).
///
/// # Safety
/// If `first` is non-null and aligned, it must point to `n` valid `T`s
/// that live as long as the process.
unsafe fn table<T>(
    image: &Image,
    what: &str,
    first: *const T,
    n: usize,
) -> Result<&'static [T], Refusal> {
    if n == 0 {
        return Ok(&[]);
    }
    if n > MAX_FUNCTIONS {
        return Err(invalid(format!("the {what} table has {n} entries")));
    }
    if first.is_null() {
        return Err(invalid(format!("the {what} table is null")));
    }
    if !first.is_aligned() {
        return Err(invalid(format!("the {what} table is misaligned")));
    }
    if !image.readable(first.cast(), n * std::mem::size_of::<T>()) {
        return Err(invalid(format!(
            "the {what} table lies outside the library's memory"
        )));
    }
    // SAFETY: guaranteed by the caller, with the checks above.
    Ok(unsafe { std::slice::from_raw_parts(first, n) })
}

#[cfg(test)]
mod fuzz;
