//! The host side of thin patches.
//!
//! A thin patch (`cargo hotpatch build`) holds only the patch crate's own
//! code: every other symbol it uses (std, hotpatch, the service crate and
//! its dependencies) is undefined in the file and bound to this binary:
//! to the symbols it exports (the host setting: linked with `-rdynamic`),
//! or to its own symbol table (`near.rs`). Before the library is mapped,
//! the loader reads the file ([`needs`]) and refuses it unless:
//!
//! - it carries the identity of the build it was made against (the
//!   `.hotpatch.host` section `cargo hotpatch build` writes: the GNU
//!   build-id of the service binary) and that is this binary's
//!   ([`build_id`]);
//! - this binary exports its symbols ([`exports_symbols`]) or keeps its
//!   symbol table (`near::symtab::serves`);
//! - every symbol it needs is there: the loader binds them all before any
//!   of the patch's code runs, and if one is missing (a dependency
//!   function the service never called is not in the binary: the linker
//!   dropped it), [`missing`] names every one;
//! - it does not bring an allocator of its own (one process, one
//!   allocator).

use std::ffi::{CString, c_void};
use std::sync::OnceLock;

use object::{Object, ObjectSection, ObjectSymbol};

/// The section of a patch file that names the host build it was made for.
pub(crate) const IDENTITY_SECTION: &str = hotpatch_abi::HOST_SECTION;
/// Its first eight bytes; a little-endian `u32` length and the build-id
/// bytes follow.
pub(crate) const IDENTITY_MAGIC: &[u8; 8] = &hotpatch_abi::HOST_MAGIC;

/// Exported by every host that links hotpatch; found by `dlsym` only if
/// the binary exports its symbols to the dynamic loader. Its name is
/// `hotpatch_abi::HOST_EXPORTS_SYMBOL`.
#[unsafe(no_mangle)]
#[used]
#[allow(non_upper_case_globals)]
pub static hotpatch_host_exports_v1: u8 = 1;

/// What a patch file needs from the host, read from its bytes.
#[derive(Debug)]
pub(crate) struct Needs {
    /// The build-id in its `.hotpatch.host` section, if it has one.
    pub identity: Option<Vec<u8>>,
    /// It defines a global allocator's symbols itself.
    pub allocator: bool,
    /// Its code registers thread-local destructors (a `thread_local!`
    /// with a `Drop` value): they run at thread exit, in its code, and the
    /// C library counts them against the host (std, which registers them,
    /// is the host's), so it would not keep the library mapped for them.
    pub tls_destructors: bool,
}

/// Reads the identity section and the symbol tables of the patch file
/// `bytes` (an ELF shared object that `elf::check` accepted).
pub(crate) fn needs(bytes: &[u8]) -> Result<Needs, String> {
    let file = object::File::parse(bytes).map_err(|e| format!("cannot read it as ELF: {e}"))?;
    let identity = match file.section_by_name(IDENTITY_SECTION) {
        None => None,
        Some(section) => {
            let data = section
                .data()
                .map_err(|e| format!("cannot read its {IDENTITY_SECTION} section: {e}"))?;
            Some(parse_identity(data).ok_or_else(|| {
                format!(
                    "its {IDENTITY_SECTION} section is malformed ({} bytes)",
                    data.len()
                )
            })?)
        }
    };
    // `#[global_allocator]` makes rustc emit these in the crate that
    // declares it; a thin patch must use the host's. Names are compared as
    // bytes, by their end first: a large patch has thousands of symbols,
    // and decoding or demangling each cost more than the rest of the load.
    let allocator = file
        .symbols()
        .chain(file.dynamic_symbols())
        .filter(|s| s.is_definition())
        .filter_map(|s| s.name_bytes().ok())
        .filter(|n| n.ends_with(b"rust_alloc") || n.ends_with(b"rg_alloc"))
        .any(|n| {
            // rustc 1.95: `__rustc::__rust_alloc` (v0-mangled); older:
            // `__rust_alloc` or `__rg_alloc`, unmangled. (`cargo hotpatch
            // build`'s allocator shims are named `Q...`, not these.)
            let n = String::from_utf8_lossy(n);
            matches!(&*n, "__rust_alloc" | "__rg_alloc")
                || matches!(
                    demangle(&n).as_str(),
                    "__rustc::__rust_alloc" | "__rustc::__rg_alloc"
                )
        });
    let tls_destructors = undefined_names(&file).any(|n| {
        n == "__cxa_thread_atexit_impl"
            || n == "__cxa_thread_atexit"
            || (n.contains("destructors") || n.contains("register_dtor")) && {
                let d = demangle(n);
                d.contains("thread_local")
                    && (d.contains("destructors") || d.contains("register_dtor"))
            }
    });
    Ok(Needs {
        identity,
        allocator,
        tls_destructors,
    })
}

/// The undefined, non-weak dynamic symbols of a parsed patch file.
fn undefined_names<'a>(file: &'a object::File<'a>) -> impl Iterator<Item = &'a str> + 'a {
    file.dynamic_symbols()
        .filter(|s| s.is_undefined() && !s.is_weak())
        .filter_map(|s| s.name().ok())
        .filter(|n| !n.is_empty())
}

/// The undefined, non-weak dynamic symbols of the patch file `bytes`:
/// what the dynamic loader must find in this process. Read only when it
/// did not (to name them all), so a load that binds does not pay for it.
pub(crate) fn undefined(bytes: &[u8]) -> Vec<String> {
    match object::File::parse(bytes) {
        Ok(file) => undefined_names(&file).map(str::to_owned).collect(),
        Err(_) => Vec::new(),
    }
}

fn parse_identity(data: &[u8]) -> Option<Vec<u8>> {
    let rest = data.strip_prefix(IDENTITY_MAGIC.as_slice())?;
    let (len, rest) = rest.split_first_chunk::<4>()?;
    let len = u32::from_le_bytes(*len) as usize;
    (len > 0 && len <= 64 && rest.len() >= len).then(|| rest[..len].to_vec())
}

/// The GNU build-id of this process's main program, read from its mapped
/// `PT_NOTE` segments (the file on disk may have been replaced since).
pub(crate) fn build_id() -> Option<&'static [u8]> {
    static ID: OnceLock<Option<Vec<u8>>> = OnceLock::new();
    ID.get_or_init(read_build_id).as_deref()
}

fn read_build_id() -> Option<Vec<u8>> {
    unsafe extern "C" fn visit(
        info: *mut libc::dl_phdr_info,
        _size: usize,
        data: *mut c_void,
    ) -> libc::c_int {
        // SAFETY: `data` is the `Option<Vec<u8>>` passed below and `info` a
        // valid entry during the callback (dl_iterate_phdr's contract). The
        // first entry is the main program.
        let (out, info) = unsafe { (&mut *data.cast::<Option<Vec<u8>>>(), &*info) };
        for i in 0..info.dlpi_phnum as usize {
            // SAFETY: `dlpi_phdr` has `dlpi_phnum` entries.
            let ph = unsafe { &*info.dlpi_phdr.add(i) };
            if ph.p_type != libc::PT_NOTE {
                continue;
            }
            let start = (info.dlpi_addr as usize).wrapping_add(ph.p_vaddr as usize);
            // SAFETY: a PT_NOTE segment of a loaded object is mapped and
            // readable for `p_memsz` bytes (it lies in a PT_LOAD segment).
            let notes =
                unsafe { std::slice::from_raw_parts(start as *const u8, ph.p_memsz as usize) };
            if let Some(id) = gnu_build_id(notes) {
                *out = Some(id.to_vec());
                break;
            }
        }
        1 // stop after the main program
    }
    let mut out: Option<Vec<u8>> = None;
    // SAFETY: `visit` matches the callback type and only uses `data` as
    // the `Option` above, which outlives the call.
    unsafe { libc::dl_iterate_phdr(Some(visit), (&raw mut out).cast()) };
    out
}

/// The `NT_GNU_BUILD_ID` descriptor in a run of ELF notes.
fn gnu_build_id(mut notes: &[u8]) -> Option<&[u8]> {
    const NT_GNU_BUILD_ID: u32 = 3;
    let align4 = |n: usize| n.checked_add(3).map(|n| n & !3);
    while notes.len() >= 12 {
        let word = |i: usize| u32::from_ne_bytes(notes[i..i + 4].try_into().unwrap()) as usize;
        let (namesz, descsz, kind) = (word(0), word(4), word(8) as u32);
        let name_end = 12usize.checked_add(align4(namesz)?)?;
        let desc_end = name_end.checked_add(align4(descsz)?)?;
        if desc_end > notes.len() {
            return None;
        }
        if kind == NT_GNU_BUILD_ID && notes.get(12..12 + namesz) == Some(b"GNU\0".as_slice()) {
            return notes.get(name_end..name_end + descsz);
        }
        notes = &notes[desc_end..];
    }
    None
}

/// Whether this binary exports its symbols to the dynamic loader (linked
/// with `-rdynamic`): without that, nothing a thin patch needs is there.
pub(crate) fn exports_symbols() -> bool {
    // The binary's exports do not change: looked up once.
    static EXPORTS: OnceLock<bool> = OnceLock::new();
    *EXPORTS.get_or_init(look_up_exports)
}

fn look_up_exports() -> bool {
    use crate::__private::{
        hotpatch_rust_alloc, hotpatch_rust_alloc_zeroed, hotpatch_rust_dealloc,
        hotpatch_rust_realloc,
    };
    // The marker, and what thin patches' allocations jump to (naming them
    // here also keeps them linked into every host that loads patches).
    let exports: [(&std::ffi::CStr, *const c_void); 5] = [
        (
            c"hotpatch_host_exports_v1",
            (&raw const hotpatch_host_exports_v1).cast(),
        ),
        (c"hotpatch_rust_alloc", hotpatch_rust_alloc as *const c_void),
        (
            c"hotpatch_rust_dealloc",
            hotpatch_rust_dealloc as *const c_void,
        ),
        (
            c"hotpatch_rust_realloc",
            hotpatch_rust_realloc as *const c_void,
        ),
        (
            c"hotpatch_rust_alloc_zeroed",
            hotpatch_rust_alloc_zeroed as *const c_void,
        ),
    ];
    exports.iter().all(|(name, ours)| lookup(name) == *ours)
}

fn lookup(name: &std::ffi::CStr) -> *const c_void {
    // SAFETY: `dlsym` with RTLD_DEFAULT only looks the name up in the
    // global scope (this binary and the libraries it was linked with);
    // the result is compared or tested for null, never dereferenced.
    unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) }.cast_const()
}

/// The symbols of `undefined` that nothing in the global scope defines,
/// demangled for people.
pub(crate) fn missing(undefined: &[String]) -> Vec<String> {
    undefined
        .iter()
        .filter(|name| match CString::new(name.as_str()) {
            Ok(c) => lookup(&c).is_null(),
            Err(_) => true,
        })
        .map(|name| demangle(name))
        .collect()
}

/// `name` as a Rust path if it is a mangled Rust symbol (without the
/// hash), else as it is.
pub(crate) fn demangle(name: &str) -> String {
    match rustc_demangle::try_demangle(name) {
        Ok(d) => format!("{d:#}"),
        Err(_) => name.to_owned(),
    }
}

/// A build-id as people read it (lowercase hex).
pub(crate) fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_test_binary_has_a_build_id() {
        let id = build_id().expect("the test binary has a GNU build-id");
        assert!((8..=64).contains(&id.len()), "{}", hex(id));
    }

    #[test]
    fn identity_section_round_trips_and_rejects_junk() {
        let mut data = IDENTITY_MAGIC.to_vec();
        data.extend_from_slice(&3u32.to_le_bytes());
        data.extend_from_slice(&[1, 2, 3]);
        assert_eq!(parse_identity(&data), Some(vec![1, 2, 3]));
        assert_eq!(parse_identity(&data[..data.len() - 1]), None);
        assert_eq!(parse_identity(b"HPHOST00\x01\0\0\0\x01"), None);
        let mut zero = IDENTITY_MAGIC.to_vec();
        zero.extend_from_slice(&0u32.to_le_bytes());
        assert_eq!(parse_identity(&zero), None);
    }

    #[test]
    fn libc_symbols_are_found_and_made_up_ones_are_missing() {
        let names = vec![
            "memcpy".to_owned(),
            "_ZN7no_such5thing17h0123456789abcdefE".to_owned(),
        ];
        assert_eq!(missing(&names), vec!["no_such::thing".to_owned()]);
    }
}
