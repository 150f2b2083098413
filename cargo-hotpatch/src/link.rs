//! Linking a patch crate's own objects into a thin shared object.

use std::fs;
use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use object::read::archive::ArchiveFile;
use object::{Object, ObjectSection, ObjectSymbol};

use crate::{Error, check, elf};

/// The symbol the runtime looks a patch's manifest up by: the one symbol
/// a thin patch exports.
pub(crate) const MANIFEST_SYMBOL: &str = hotpatch_abi::MANIFEST_SYMBOL;

/// What [`link`] made.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LinkReport {
    /// The shared object written.
    pub output: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// The build-id of the host binary it is bound to, in hexadecimal.
    pub host_build_id: String,
    /// Undefined symbols of the patch that the host binary exports.
    pub bound_to_host: usize,
    /// Undefined C symbols of the patch found in the system libraries.
    pub bound_to_system: usize,
    /// Object files of the crate linked in (its codegen units).
    pub objects: usize,
    /// Host slots the patch's code reads (calls into patchable functions
    /// of the service), each through a cell the loader fills in.
    pub slot_refs: usize,
    /// The functions the patch replaces (from its `#[patch]` records:
    /// `module::f`, or `module::Type_method` for a method; a function
    /// whose entry it redirects, `#[patch(path, hook)]`, as its path
    /// followed by ` (hooked)`), sorted.
    pub functions: Vec<String>,
}

/// Links the patch crate's own code from `rlib` into the shared object
/// `out`, bound to `host_binary`.
///
/// Only the crate's codegen units (the `*.rcgu.o` members of the rlib)
/// go in, with a small object holding the `.hotpatch.host` section
/// (`b"HPHOST01"`, the length of the host's build-id as a little-endian
/// `u32`, the build-id). Every other symbol (std, hotpatch, the service,
/// its dependencies) stays undefined for the runtime to bind to the
/// running service: to what it exports (linked with `-rdynamic`) or to
/// its symbol table (`.symtab`, kept unless the binary is stripped). Only
/// `hotpatch_manifest_v1` is exported. The linker is `cc`.
///
/// The result is then checked with [`check_against`](crate::check_against).
/// It is written to a temporary name in `out`'s directory and renamed to
/// `out` only once it passed, so a failure leaves no file and an older
/// `out` untouched.
///
/// # Errors
///
/// [`Error::Io`], [`Error::Malformed`] for unreadable inputs;
/// [`Error::NoBuildId`] for a host without build-id; [`Error::Bitcode`]
/// for an rlib built with LTO; [`Error::NoObjects`];
/// [`Error::GlobalAllocator`] if the crate declares a
/// `#[global_allocator]`; [`Error::NoManifest`] if no object defines
/// `hotpatch_manifest_v1`; [`Error::Linker`]; and those of
/// [`check_against`](crate::check_against).
///
/// # Examples
///
/// ```no_run
/// let report = cargo_hotpatch::link(
///     "target/release/libpricing_fix.rlib".as_ref(),
///     "target/release/my-service".as_ref(),
///     "target/hotpatch/pricing_fix.so".as_ref(),
/// )?;
/// println!("{} bytes, bound to {}", report.size, report.host_build_id);
/// # Ok::<(), cargo_hotpatch::Error>(())
/// ```
pub fn link(rlib: &Path, host_binary: &Path, out: &Path) -> Result<LinkReport, Error> {
    link_with(rlib, host_binary, out, true)
}

/// [`link`] without its refusals: no check of the crate (allocator,
/// manifest) and no [`check_against`](crate::check_against); the patch is
/// stamped with the host's identity whatever it holds or needs. For tests
/// of the runtime's own refusals, which must see such a file; a patch for
/// a service is made with [`link`].
///
/// # Errors
///
/// Those of [`link`] but the refusals.
pub fn link_unchecked(rlib: &Path, host_binary: &Path, out: &Path) -> Result<LinkReport, Error> {
    link_with(rlib, host_binary, out, false)
}

fn link_with(
    rlib: &Path,
    host_binary: &Path,
    out: &Path,
    checked: bool,
) -> Result<LinkReport, Error> {
    let host_data = elf::read(host_binary)?;
    let host = elf::parse(host_binary, &host_data)?;
    let host_id = elf::build_id_of(host_binary, &host)?;

    let rlib_data = elf::read(rlib)?;
    let members = own_objects(rlib, &rlib_data)?;
    let functions = match inspect(rlib, &crate_name(rlib), &members) {
        Ok(functions) => functions,
        Err(_) if !checked => Vec::new(),
        Err(e) => return Err(e),
    };

    let objects: Vec<Vec<u8>> = members.iter().map(|(_, data)| data.to_vec()).collect();
    let mut report = link_prepared(
        objects,
        rlib,
        host_binary,
        &host,
        &host_id,
        out,
        checked,
        true,
    )?;
    report.functions = functions;
    Ok(report)
}

/// Links ready objects (those `cargo hotpatch build --base` writes) into
/// a thin patch bound to `host_binary`, checked. `origin` names the
/// objects' source in errors.
pub(crate) fn link_objects(
    objects: Vec<Vec<u8>>,
    origin: &Path,
    host_binary: &Path,
    out: &Path,
) -> Result<LinkReport, Error> {
    let host_data = elf::read(host_binary)?;
    let host = elf::parse(host_binary, &host_data)?;
    let host_id = elf::build_id_of(host_binary, &host)?;
    // Their slot loads already read cells of their own.
    link_prepared(
        objects,
        origin,
        host_binary,
        &host,
        &host_id,
        out,
        true,
        false,
    )
}

#[allow(clippy::too_many_arguments)]
fn link_prepared(
    mut objects: Vec<Vec<u8>>,
    rlib: &Path,
    host_binary: &Path,
    host: &object::File<'_>,
    host_id: &[u8],
    out: &Path,
    checked: bool,
    retarget_slots: bool,
) -> Result<LinkReport, Error> {
    let dir = TempDir::new()?;
    let mut inputs = Vec::with_capacity(objects.len() + 1);
    let count = objects.len();
    // Loads of host slots by inlined `#[patchable]` wrappers are
    // retargeted at cells of the patch (see slotrefs.rs).
    let cells = if retarget_slots {
        crate::slotrefs::retarget(&mut objects).map_err(|reason| Error::Malformed {
            path: rlib.to_owned(),
            what: "ELF object",
            reason,
        })?
    } else {
        None
    };
    // Allocations bound to the host's global allocator, whichever it is
    // (see allocshims.rs).
    let shims = crate::allocshims::retarget(&mut objects).map_err(|reason| Error::Malformed {
        path: rlib.to_owned(),
        what: "ELF object",
        reason,
    })?;
    for (i, data) in objects.iter().enumerate() {
        // Member names can repeat in an archive; the index keeps them apart.
        let path = dir.path.join(format!("{i}.o"));
        fs::write(&path, data).map_err(Error::io(&path))?;
        inputs.push(path);
    }
    if let Some((shims, _)) = shims {
        let path = dir.path.join("hotpatch-alloc-shims.o");
        fs::write(&path, shims).map_err(Error::io(&path))?;
        inputs.push(path);
    }
    let mut slot_refs = 0;
    if let Some((cells, n)) = cells {
        let path = dir.path.join("hotpatch-slot-refs.o");
        fs::write(&path, cells).map_err(Error::io(&path))?;
        inputs.push(path);
        slot_refs = n;
    }
    let host_object = dir.path.join("hotpatch-host.o");
    fs::write(&host_object, host_object_bytes(host, host_id)?).map_err(Error::io(&host_object))?;
    inputs.push(host_object);
    let script = dir.path.join("exports.map");
    fs::write(
        &script,
        format!("{{ global: {MANIFEST_SYMBOL}; local: *; }};\n"),
    )
    .map_err(Error::io(&script))?;

    let partial = Partial::new(out)?;
    run_cc(&inputs, &script, &partial.path, out)?;
    let binding = if checked {
        check::check(&partial.path, out, host_binary, host)?
    } else {
        check::Binding::default()
    };
    let size = fs::metadata(&partial.path)
        .map_err(Error::io(&partial.path))?
        .len();
    partial.commit(out)?;

    Ok(LinkReport {
        output: out.to_owned(),
        size,
        host_build_id: elf::hex(host_id),
        bound_to_host: binding.host,
        bound_to_system: binding.system,
        objects: count,
        slot_refs,
        functions: Vec::new(),
    })
}

/// The crate name from an rlib's file name: `libNAME.rlib` or
/// `libNAME-HASH.rlib`.
fn crate_name(rlib: &Path) -> String {
    let stem = rlib.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    let stem = stem.strip_prefix("lib").unwrap_or(stem);
    stem.split('-').next().unwrap_or(stem).to_owned()
}

/// The crate's own codegen units: the `*.rcgu.o` members, refusing
/// bitcode. `lib.rmeta` and anything else is skipped.
pub(crate) fn own_objects<'d>(
    rlib: &Path,
    data: &'d [u8],
) -> Result<Vec<(String, &'d [u8])>, Error> {
    let malformed = |e: object::Error| Error::Malformed {
        path: rlib.to_owned(),
        what: "rlib archive",
        reason: e.to_string(),
    };
    let archive = ArchiveFile::parse(data).map_err(malformed)?;
    let mut objects = Vec::new();
    // An archive with no member at all is no rlib rustc wrote (each has
    // its metadata member): it stands for the library of a package that
    // has only an executable (`source::sides`), which has no code.
    if archive.members().next().is_none() {
        return Ok(objects);
    }
    for member in archive.members() {
        let member = member.map_err(malformed)?;
        let name = String::from_utf8_lossy(member.name()).into_owned();
        if !name.ends_with(".rcgu.o") {
            continue;
        }
        let bytes = member.data(data).map_err(malformed)?;
        if is_bitcode(bytes) {
            return Err(Error::Bitcode {
                rlib: rlib.to_owned(),
                member: name,
            });
        }
        objects.push((name, bytes));
    }
    if objects.is_empty() {
        return Err(Error::NoObjects {
            rlib: rlib.to_owned(),
        });
    }
    Ok(objects)
}

/// LLVM bitcode, raw (`BC 0xC0DE`) or in its wrapper (`0x0B17C0DE`).
fn is_bitcode(bytes: &[u8]) -> bool {
    bytes.starts_with(b"BC\xC0\xDE") || bytes.starts_with(&0x0B17_C0DEu32.to_le_bytes())
}

/// The section of the patch crate's `#[patch]` records (linkme's name for
/// `__HOTPATCH_PATCH_FNS`).
const PATCH_FNS_SECTION: &str = hotpatch_abi::PATCH_FNS_SECTION;

/// Refuses an allocator or a missing manifest; returns the functions the
/// patch replaces, as the service names them: each `#[patch]` record
/// points at the target's entry getter, `<module>::__hotpatch_entry_of_<f>`
/// (for a method, `<Type>_<method>`).
fn inspect(
    rlib: &Path,
    crate_name: &str,
    members: &[(String, &[u8])],
) -> Result<Vec<String>, Error> {
    let _ = crate_name;
    let mut manifest = false;
    let mut functions = Vec::new();
    for (name, bytes) in members {
        let file = object::File::parse(*bytes).map_err(|e| Error::Malformed {
            path: rlib.to_owned(),
            what: "ELF object",
            reason: format!("member {name}: {e}"),
        })?;
        for symbol in file.symbols() {
            if symbol.is_undefined() {
                continue;
            }
            let Ok(sym) = symbol.name() else { continue };
            if symbol.is_global() {
                if sym == MANIFEST_SYMBOL {
                    manifest = true;
                }
                if let Some(alloc) = allocator_symbol(sym) {
                    return Err(Error::GlobalAllocator {
                        rlib: rlib.to_owned(),
                        member: name.clone(),
                        symbol: alloc,
                    });
                }
            }
        }
        for section in file.sections() {
            // A `#[patch(path, hook)]` record's target is the service's
            // function itself: the one symbol of the record this object
            // does not define (the shim and the strings are its own).
            if section.name() == Ok(hotpatch_abi::HOOK_FNS_SECTION) {
                for (_, reloc) in section.relocations() {
                    let object::RelocationTarget::Symbol(index) = reloc.target() else {
                        continue;
                    };
                    let Ok(symbol) = file.symbol_by_index(index) else {
                        continue;
                    };
                    if !symbol.is_undefined() {
                        continue;
                    }
                    let Ok(sym) = symbol.name() else { continue };
                    let d = match rustc_demangle::try_demangle(sym) {
                        Ok(d) => format!("{d:#}"),
                        Err(_) => sym.to_owned(),
                    };
                    functions.push(format!("{d} (hooked)"));
                }
                continue;
            }
            if section.name() != Ok(PATCH_FNS_SECTION) {
                continue;
            }
            for (_, reloc) in section.relocations() {
                let object::RelocationTarget::Symbol(index) = reloc.target() else {
                    continue;
                };
                let Ok(symbol) = file.symbol_by_index(index) else {
                    continue;
                };
                let Ok(sym) = symbol.name() else { continue };
                let Ok(d) = rustc_demangle::try_demangle(sym) else {
                    continue;
                };
                let d = format!("{d:#}");
                if let Some((module, f)) = d.rsplit_once("::__hotpatch_entry_of_") {
                    functions.push(target_path(module, f));
                }
            }
        }
    }
    if !manifest {
        return Err(Error::NoManifest {
            rlib: rlib.to_owned(),
        });
    }
    functions.sort();
    functions.dedup();
    Ok(functions)
}

/// A target's path from its entry getter's name: `f` for a free
/// function, `Type__<hash>__method` or `Type__<hash>__Trait__method` for a
/// method (`#[patchable]` on an impl block names them so).
fn target_path(module: &str, getter: &str) -> String {
    let parts: Vec<&str> = getter.split("__").collect();
    let hash = |h: &str| h.len() == 8 && h.bytes().all(|b| b.is_ascii_hexdigit());
    match parts.as_slice() {
        [ty, h, method] if hash(h) => format!("{module}::{ty}::{method}"),
        [ty, h, tr, method] if hash(h) => format!("<{module}::{ty} as {tr}>::{method}"),
        _ => format!("{module}::{getter}"),
    }
}

/// The symbols a `#[global_allocator]` makes its crate define. rustc 1.95
/// emits `__rustc::__rust_alloc` (and `__rust_dealloc`, `__rust_realloc`,
/// `__rust_alloc_zeroed`) v0-mangled, e.g.
/// `_RNvCsfLfy6EI15iL_7___rustc12___rust_alloc`; older ones emitted
/// `__rg_alloc` or `__rust_alloc` unmangled.
fn allocator_symbol(name: &str) -> Option<String> {
    const SHIMS: [&str; 2] = ["__rust_alloc", "__rg_alloc"];
    if SHIMS.contains(&name) {
        return Some(name.to_owned());
    }
    let demangled = format!("{:#}", rustc_demangle::try_demangle(name).ok()?);
    let (krate, item) = demangled.split_once("::")?;
    (krate == "__rustc" && SHIMS.contains(&item)).then_some(demangled)
}

/// A relocatable object of the host's architecture holding the
/// non-allocated, retained `.hotpatch.host` section, and an empty
/// `.note.GNU-stack` so the patch's stack stays non-executable.
fn host_object_bytes(host: &object::File<'_>, build_id: &[u8]) -> Result<Vec<u8>, Error> {
    use object::write;
    let mut obj = write::Object::new(
        object::BinaryFormat::Elf,
        host.architecture(),
        host.endianness(),
    );
    // The GNU OS/ABI: ld honours SHF_GNU_RETAIN (below) only in such
    // objects. e_flags as the host's (float ABI and the like).
    let e_flags = match host.flags() {
        object::FileFlags::Elf { e_flags, .. } => e_flags,
        _ => 0,
    };
    obj.flags = object::FileFlags::Elf {
        os_abi: object::elf::ELFOSABI_GNU,
        abi_version: 0,
        e_flags,
    };
    let section = obj.add_section(
        Vec::new(),
        elf::HOST_SECTION.as_bytes().to_vec(),
        object::SectionKind::Other,
    );
    obj.append_section_data(section, &elf::host_section(build_id), 1);
    // Retained: --gc-sections drops a non-allocated section no code refers
    // to otherwise.
    obj.section_mut(section).flags = object::SectionFlags::Elf {
        sh_flags: u64::from(object::elf::SHF_GNU_RETAIN),
    };
    obj.add_section(
        Vec::new(),
        b".note.GNU-stack".to_vec(),
        object::SectionKind::Other,
    );
    obj.write().map_err(|e| Error::Malformed {
        path: PathBuf::from("hotpatch-host.o"),
        what: "relocatable object for this architecture",
        reason: e.to_string(),
    })
}

fn run_cc(inputs: &[PathBuf], script: &Path, partial: &Path, out: &Path) -> Result<(), Error> {
    let mut cmd = Command::new("cc");
    cmd.arg("-shared").arg("-o").arg(partial).args(inputs);
    cmd.arg(format!("-Wl,--version-script={}", script.display()));
    // --gc-sections keeps the linkme_* sections (rustc marks them retained)
    // and everything the exported manifest reaches.
    cmd.args([
        "-Wl,-z,relro,-z,now",
        "-Wl,--eh-frame-hdr",
        "-Wl,--gc-sections",
        "-nodefaultlibs",
        "-lgcc_s",
        "-lc",
    ]);
    let command = format!("{cmd:?}");
    let failed = |status: String, stderr: String| Error::Linker {
        out: out.to_owned(),
        command: command.clone(),
        status,
        stderr,
    };
    let output = cmd
        .output()
        .map_err(|e| failed(format!("could not be started: {e}"), String::new()))?;
    if !output.status.success() {
        return Err(failed(
            output.status.to_string(),
            String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        ));
    }
    Ok(())
}

/// The output under a temporary name in its directory, removed unless
/// committed.
struct Partial {
    path: PathBuf,
    committed: bool,
}

impl Partial {
    fn new(out: &Path) -> Result<Partial, Error> {
        let name = out.file_name().ok_or_else(|| Error::Io {
            path: out.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name"),
        })?;
        let mut tmp = std::ffi::OsString::from(".");
        tmp.push(name);
        tmp.push(format!(".{}.tmp", unique()));
        let path = out.with_file_name(tmp);
        // Fails early if the directory is missing or not writable, before
        // the linker runs.
        fs::File::create_new(&path)
            .and_then(|mut f| f.flush())
            .map_err(Error::io(&path))?;
        Ok(Partial {
            path,
            committed: false,
        })
    }

    fn commit(mut self, out: &Path) -> Result<(), Error> {
        fs::rename(&self.path, out).map_err(Error::io(out))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// A private (0700) directory under the system's temporary directory,
/// removed with its contents on drop.
struct TempDir {
    path: PathBuf,
}

impl TempDir {
    fn new() -> Result<TempDir, Error> {
        let base = std::env::temp_dir();
        let mut last = None;
        for _ in 0..16 {
            let path = base.join(format!("cargo-hotpatch.{}", unique()));
            match fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(TempDir { path }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
                Err(e) => return Err(Error::Io { path, source: e }),
            }
        }
        Err(Error::Io {
            path: base,
            source: last.expect("the loop ran"),
        })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Process id, time and a counter: distinct across processes and calls.
fn unique() -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    // Relaxed: only uniqueness of the value matters, no memory is published.
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{}.{nanos}.{n}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocator_symbols_of_rustc_1_95_and_older_are_recognised() {
        assert_eq!(
            allocator_symbol("_RNvCsfLfy6EI15iL_7___rustc12___rust_alloc").as_deref(),
            Some("__rustc::__rust_alloc")
        );
        assert_eq!(
            allocator_symbol("__rg_alloc").as_deref(),
            Some("__rg_alloc")
        );
        assert_eq!(
            allocator_symbol("__rust_alloc").as_deref(),
            Some("__rust_alloc")
        );
        // The default allocator's shim and std's own functions are not a
        // #[global_allocator] of the crate.
        assert_eq!(allocator_symbol("__rdl_alloc"), None);
        assert_eq!(
            allocator_symbol("_ZN3std3sys5alloc4unix5alloc17hd2fb3d572cf2e724E"),
            None
        );
    }

    #[test]
    fn crate_names_come_from_rlib_file_names() {
        assert_eq!(
            crate_name(Path::new("/t/libpricing_fix.rlib")),
            "pricing_fix"
        );
        assert_eq!(
            crate_name(Path::new("/t/deps/libpricing_fix-0a1b2c.rlib")),
            "pricing_fix"
        );
    }

    #[test]
    fn bitcode_is_told_from_elf() {
        assert!(is_bitcode(b"BC\xC0\xDE\x35\x14"));
        assert!(is_bitcode(&[0xDE, 0xC0, 0x17, 0x0B, 0, 0]));
        assert!(!is_bitcode(b"\x7fELF\x02\x01"));
    }

    #[test]
    fn host_object_carries_the_identity_section() {
        let exe = std::env::current_exe().unwrap();
        let data = fs::read(&exe).unwrap();
        let host = object::File::parse(&*data).unwrap();
        let id = [0xab, 0xcd, 0xef, 0x01, 0x23];
        let bytes = host_object_bytes(&host, &id).unwrap();
        assert_eq!(elf::identity(&bytes), Some(id.to_vec()));

        // A section whose length runs past its end, or with another magic,
        // is no identity.
        let mut long = bytes.clone();
        let at = find(&long, elf::HOST_MAGIC) + 8;
        long[at..at + 4].copy_from_slice(&6u32.to_le_bytes());
        assert_eq!(elf::identity(&long), None);
        let mut other = bytes;
        let at = find(&other, elf::HOST_MAGIC);
        other[at + 7] = b'2';
        assert_eq!(elf::identity(&other), None);
    }

    fn find(haystack: &[u8], needle: &[u8]) -> usize {
        haystack
            .windows(needle.len())
            .position(|w| w == needle)
            .unwrap()
    }
}

#[cfg(test)]
mod target_names {
    use super::target_path;

    #[test]
    fn entry_getters_name_their_targets() {
        assert_eq!(target_path("svc::pricing", "price"), "svc::pricing::price");
        assert_eq!(
            target_path("svc::pricing", "Cart__7bb95c49__total"),
            "svc::pricing::Cart::total"
        );
        assert_eq!(
            target_path("svc", "Cart__0badf00d__Priced__price"),
            "<svc::Cart as Priced>::price"
        );
        // Not a hash: left as it is.
        assert_eq!(target_path("svc", "a__b__c"), "svc::a__b__c");
    }
}
