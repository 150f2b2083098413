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
//! 4. [`code_fields`]: the function fields (`functions`, `slot_refs`,
//!    `hooks`, `init`): each absent or inside the library's executable segments,
//!    before any is called; the `panics` counter in the library's
//!    writable, non-RELRO memory;
//! 5. [`strings`]: the strings, each non-null, at most [`MAX_STR`] bytes,
//!    inside the library's readable memory and UTF-8: `rustc`, `target`
//!    and `panic_strategy` must equal the host's; `entry_size`,
//!    `patch_fn_size` and `hook_fn_size` this runtime's; then `hotpatch_version`, `name`,
//!    `version`, `description` (read for reports only: `abi_version`
//!    decides compatibility; each may be empty);
//! 6. [`getters`]: only then, with the same compiler established, the
//!    getters are called (patch code): `functions` (required; its table
//!    non-null, aligned, bounded, inside the library), `hooks` (optional;
//!    the same), at least one record in the two together, and
//!    `slot_refs` (optional; each cell aligned in the library's writable,
//!    non-RELRO memory); `init` (optional) is only recorded here and
//!    called by the loader after the plan;
//! 7. [`records`]: the records behind the function table ([`patch_fn`]):
//!    the replacement in the library's code, the name UTF-8 in its
//!    readable memory, and the target's entry getter in the *host's*
//!    code (a thin patch binds it to the service's own), which is then
//!    called; the registry takes the entry it returns only if it is one
//!    of this process's own (`registry.rs`: `plan`). Then the records
//!    behind the hook table ([`hook_fn`]): the replacement in the
//!    library's code, the expected entry bytes (at most [`MAX_ENTRY`])
//!    and the path and name (UTF-8, at most [`MAX_STR`]) in its readable
//!    memory, and the target *not* in the library but inside the
//!    executable's code; the registry then finds the function that
//!    starts there and decides whether its entry can be redirected.
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

use std::sync::atomic::AtomicU64;

use crate::abi::{
    ABI_VERSION, Entry, HookFn, MAGIC, Manifest, PANIC_STRATEGY, PatchFn, RUSTC_VERSION, RawStr,
    SlotRef, TARGET, TypeLayout,
};
use crate::error::Refusal;
use crate::image::Image;
use crate::slot::FnAddr;

/// Longest string a manifest may carry.
pub(crate) const MAX_STR: usize = 64 * 1024;
/// Most functions one patch may replace, and most slots its copy may hold.
pub(crate) const MAX_FUNCTIONS: usize = 1 << 20;
/// Most entry bytes a hook record may expect (the replaced instructions
/// cover 5 bytes; the longest x86-64 instruction is 15).
pub(crate) const MAX_ENTRY: usize = 32;

/// A manifest whose every field, and every record behind its tables, was
/// checked.
pub(crate) struct Checked {
    pub name: String,
    pub version: String,
    pub description: String,
    /// What the patch replaces through slots, in its table's order.
    pub functions: Vec<Replacement>,
    /// What the patch replaces by redirecting entries, in its table's
    /// order (with `functions`, at least one function in all).
    pub hooks: Vec<HookRecord>,
    /// The patch's cells for the host slots its code reads.
    pub slot_refs: &'static [SlotRef],
    /// Calls of its replacements that ended in a panic.
    pub panics: &'static AtomicU64,
    pub init: Option<fn() -> Result<(), String>>,
}

/// One checked replacement record.
#[derive(Clone, Copy)]
pub(crate) struct Replacement {
    /// What the target's entry getter returned: the host's entry if the
    /// patch is bound to this binary (the registry checks that it is).
    pub target: *const Entry,
    /// The replacement's own path, for messages.
    pub name: &'static str,
    /// Its parameter and return layouts, as the patch was compiled.
    pub layouts: &'static [TypeLayout],
    /// The entry shim, in the library's code.
    pub code: FnAddr,
}

/// One checked hook record: what the registry resolves against the
/// executable (`registry.rs`: `plan`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct HookRecord {
    /// The address the patch names: inside the executable's code, not in
    /// the library.
    pub target: usize,
    /// The replacement, in the library's code.
    pub code: FnAddr,
    /// The entry bytes the builder read (empty: no expectation).
    pub entry: &'static [u8],
    /// The target's path, for messages and listings.
    pub path: &'static str,
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
    let functions = records(&fields.image, &fields.tables)?;
    let hooks = hook_records(&fields.image, &fields.tables)?;
    Ok(Checked {
        name: fields.about.name,
        version: fields.about.version,
        description: fields.about.description,
        functions,
        hooks,
        slot_refs: fields.tables.slot_refs,
        panics: fields.panics,
        init: fields.init,
    })
}

/// The manifest's own fields, checked (steps 1 to 6).
struct Fields {
    about: About,
    tables: Tables,
    panics: &'static AtomicU64,
    init: Option<fn() -> Result<(), String>>,
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
    let panics = code_fields(&image, m)?;
    let about = strings(&image, m)?;
    // SAFETY: steps 1 to 5 passed for `m`.
    let tables = unsafe { getters(&image, m) }?;
    Ok(Fields {
        about,
        tables,
        panics,
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
/// any is called, and the panic counter in its writable memory.
fn code_fields(image: &Image, m: &Manifest) -> Result<&'static AtomicU64, Refusal> {
    let fields = [
        ("functions", m.functions.map(|f| f as *const ())),
        ("slot_refs", m.slot_refs.map(|f| f as *const ())),
        ("hooks", m.hooks.map(|f| f as *const ())),
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
    // SAFETY: the field is a plain word; read as a raw pointer, nothing is
    // assumed of it before the check below.
    let panics = unsafe {
        std::ptr::addr_of!(m.panics)
            .cast::<*const AtomicU64>()
            .read()
    };
    if panics.is_null() || !image.writable_value(panics) {
        return Err(invalid(
            "the panic counter is null, misaligned or outside the library's writable memory",
        ));
    }
    // SAFETY: non-null, aligned, a static of the mapped library.
    Ok(unsafe { &*panics })
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
        || m.hook_fn_size as usize != std::mem::size_of::<HookFn>()
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
    hooks: &'static [HookFn],
    slot_refs: &'static [SlotRef],
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
    // `__hotpatch_functions`, which writes one `usize` through a valid
    // pointer.
    let first = unsafe { functions_fn(&mut n) };
    // SAFETY: the getter returned `first`/`n` for a table in the library,
    // which stays mapped (caller's guarantee).
    let functions = unsafe { table(image, "function", first, n) }?;
    let hooks: &'static [HookFn] = match m.hooks {
        Some(hooks_fn) => {
            let mut n = 0usize;
            // SAFETY: as for the function table (`__hotpatch_hooks`).
            let first = unsafe { hooks_fn(&mut n) };
            // SAFETY: as for the function table.
            unsafe { table(image, "hook", first, n) }?
        }
        None => &[],
    };
    if functions.is_empty() && hooks.is_empty() {
        return Err(invalid("the patch replaces no function"));
    }
    let slot_refs: &'static [SlotRef] = match m.slot_refs {
        Some(refs_fn) => {
            let mut n = 0usize;
            // SAFETY: as for the function table.
            let first = unsafe { refs_fn(&mut n) };
            // SAFETY: as for the function table.
            unsafe { table(image, "slot reference", first, n) }?
        }
        None => &[],
    };
    // The loader writes these cells before the patch runs: they must be
    // the library's own writable data.
    if let Some(first) = slot_refs.first()
        && !image.writable(
            std::ptr::from_ref(first).cast(),
            std::mem::size_of_val(slot_refs),
        )
    {
        return Err(invalid(
            "the slot references are outside the library's writable memory",
        ));
    }
    Ok(Tables {
        functions,
        hooks,
        slot_refs,
    })
}

/// Step 7: the records behind the function table, before the registry
/// resolves them.
fn records(image: &Image, tables: &Tables) -> Result<Vec<Replacement>, Refusal> {
    let host = Image::containing(records as *const ())
        .ok_or_else(|| invalid("this process's own code is not in a loaded object"))?;
    tables
        .functions
        .iter()
        .map(|f| patch_fn(image, &host, f))
        .collect()
}

/// Checks a replacement record, then calls its target getter, which must
/// be code of the host (`host`): in a thin patch it is bound to the
/// service's own.
pub(crate) fn patch_fn(image: &Image, host: &Image, f: &PatchFn) -> Result<Replacement, Refusal> {
    // SAFETY: `f` is in a table found readable and aligned; the fields
    // are plain words.
    let (name, layouts) = unsafe { (raw(&raw const f.name), raw(&raw const f.layouts)) };
    let name = str_bytes(image, name);
    // `layouts` is empty for `fn() -> !`.
    if !image.executable(f.replacement.as_ptr())
        || name.is_none()
        || !image.readable_slice(layouts.cast::<TypeLayout>(), layouts.len())
    {
        return Err(invalid(
            "a replacement record points outside the library's code",
        ));
    }
    let Some(name) = name.filter(|n| utf8(n)) else {
        return Err(invalid("a replacement record's name is not UTF-8"));
    };
    // SAFETY: checked UTF-8, in the library's memory, which stays mapped.
    let name: &'static str = unsafe { std::str::from_utf8_unchecked(name) };
    if image.executable(f.target as *const ()) {
        return Err(invalid(format!(
            "the target of `{name}` is a copy inside the patch, not this process's function (a \
             patch that links its own copy of the service): build it with `cargo hotpatch build`"
        )));
    }
    if !host.executable(f.target as *const ()) {
        return Err(invalid(format!(
            "the target of `{name}` is neither the library's code nor this process's"
        )));
    }
    // Called as returning a raw pointer, so that nothing is assumed of
    // what it returns before the registry has found it among its own.
    // SAFETY: `&T` and `*const T` are ABI-compatible (`fn` pointer docs).
    let target =
        unsafe { std::mem::transmute::<fn() -> &'static Entry, fn() -> *const Entry>(f.target) };
    // The host's own entry getter (checked above to be this process's
    // code, bound by the dynamic loader to the symbol the patch names).
    Ok(Replacement {
        target: target(),
        name,
        // SAFETY: aligned and inside the library's readable memory
        // (checked above), which stays mapped.
        layouts: unsafe { &*layouts },
        code: f.replacement,
    })
}

/// Step 7, the hook table: each record checked ([`hook_fn`]) against the
/// executable's code, where its target must be.
fn hook_records(image: &Image, tables: &Tables) -> Result<Vec<HookRecord>, Refusal> {
    if tables.hooks.is_empty() {
        return Ok(Vec::new());
    }
    let text = crate::near::executable_text()
        .ok_or_else(|| invalid("the executable's code could not be found"))?;
    let text = (text.0 as usize, text.1 as usize);
    tables
        .hooks
        .iter()
        .map(|f| hook_fn(image, text, f))
        .collect()
}

/// Checks a hook record: its replacement in the library's code, its
/// strings and expected entry bytes in its readable memory, and its
/// target outside the library, inside `text` (`[start, end)` of the
/// executable's code). Reads nothing at the target: the registry
/// decodes the function there.
pub(crate) fn hook_fn(
    image: &Image,
    text: (usize, usize),
    f: &HookFn,
) -> Result<HookRecord, Refusal> {
    // SAFETY: `f` is in a table found readable and aligned; the fields
    // are plain words.
    let (entry, path, name) = unsafe {
        (
            raw(&raw const f.entry),
            raw(&raw const f.path),
            raw(&raw const f.name),
        )
    };
    let (path_len, name_len) = ((path as *const [u8]).len(), (name as *const [u8]).len());
    if path_len > MAX_STR || name_len > MAX_STR {
        return Err(invalid(format!(
            "a hook record's path or name is longer than {MAX_STR} bytes"
        )));
    }
    let (Some(path), Some(name)) = (str_bytes(image, path), str_bytes(image, name)) else {
        return Err(invalid(
            "a hook record's path or name points outside the library's memory",
        ));
    };
    // The name is checked as any string a patch hands over, and not kept:
    // messages name the target.
    let (Ok(path), Ok(_)) = (std::str::from_utf8(path), std::str::from_utf8(name)) else {
        return Err(invalid("a hook record's path or name is not UTF-8"));
    };
    if entry.len() > MAX_ENTRY {
        return Err(invalid(format!(
            "the hook of `{path}` expects {} entry bytes (at most {MAX_ENTRY})",
            entry.len()
        )));
    }
    let Some(entry) = bytes(image, entry.cast(), entry.len()) else {
        return Err(invalid(format!(
            "the expected entry bytes of the hook of `{path}` are outside the library's memory"
        )));
    };
    if !image.executable(f.replacement) {
        return Err(invalid(format!(
            "the replacement of the hooked `{path}` points outside the library's code"
        )));
    }
    let target = f.target as usize;
    if image.contains(target) {
        return Err(invalid(format!(
            "the hook target of `{path}` is inside the patch, not this process's function (a \
             generic or `#[inline]` function names the patch's own copy: hook it from a source \
             build, `cargo hotpatch build --base`)"
        )));
    }
    if target < text.0 || target >= text.1 {
        return Err(invalid(format!(
            "the hook target of `{path}` ({target:#x}) is not in the executable's code"
        )));
    }
    Ok(HookRecord {
        target,
        code: FnAddr::new(f.replacement),
        entry,
        path,
    })
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
