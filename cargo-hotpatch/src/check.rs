//! Whether a patch's undefined symbols bind to the host binary.

use std::collections::HashSet;
use std::ffi::CString;
use std::path::Path;

use crate::error::MissingSymbol;
use crate::{Error, elf};

/// How the undefined symbols of a patch were found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Binding {
    /// Exported by the host binary's `.dynsym`.
    pub(crate) host: usize,
    /// C symbols found in the system libraries (`dlsym(RTLD_DEFAULT)`).
    pub(crate) system: usize,
}

/// Checks that the patch at `patch` binds to `host_binary`: every
/// undefined, non-weak dynamic symbol of the patch is exported by the
/// host's `.dynsym` or defined once in its symbol table (`.symtab`, which
/// the runtime reads where the binary exports nothing), or is a C symbol of a system library that this
/// process finds with `dlsym(RTLD_DEFAULT, ..)` (`memcpy`,
/// `__tls_get_addr`, `_Unwind_Resume`, ...). A Rust symbol (legacy `_ZN`
/// or v0 `_R` mangling) counts only if the host exports it: the patch
/// must run against the host's copy of every Rust item.
///
/// # Errors
///
/// [`Error::Io`] or [`Error::Malformed`] if either file cannot be read as
/// ELF; [`Error::HostNotExported`] if the host has no Rust symbol at all,
/// exported or in its symbol table (linked without `-rdynamic` and
/// stripped); [`Error::MissingSymbols`]
/// with every symbol that is found nowhere, demangled.
///
/// # Examples
///
/// ```no_run
/// cargo_hotpatch::check_against(
///     "target/hotpatch/fix.so".as_ref(),
///     "target/release/my-service".as_ref(),
/// )?;
/// # Ok::<(), cargo_hotpatch::Error>(())
/// ```
pub fn check_against(patch: &Path, host_binary: &Path) -> Result<(), Error> {
    let host_data = elf::read(host_binary)?;
    let host = elf::parse(host_binary, &host_data)?;
    check(patch, patch, host_binary, &host).map(drop)
}

/// Checks the file at `read`, named `patch` in errors.
pub(crate) fn check(
    read: &Path,
    patch: &Path,
    host_path: &Path,
    host: &object::File<'_>,
) -> Result<Binding, Error> {
    // Exported (`-rdynamic`), or in the binary's own symbol table, which
    // the runtime's loader reads when the binary exports nothing.
    let mut exported = elf::exported(host);
    exported.extend(elf::symbol_table(host));
    if !exported.iter().any(|s| is_rust(s)) {
        return Err(Error::HostNotExported {
            host: host_path.to_owned(),
        });
    }
    let patch_data = elf::read(read)?;
    let imported = elf::imported(&elf::parse(read, &patch_data)?);
    let exported: HashSet<&str> = exported.iter().map(String::as_str).collect();

    let mut binding = Binding { host: 0, system: 0 };
    let mut missing = Vec::new();
    for name in &imported {
        if exported.contains(name.as_str()) {
            binding.host += 1;
        } else if !is_rust(name) && in_system_libraries(name) {
            binding.system += 1;
        } else {
            missing.push(name.as_str());
        }
    }
    if missing.is_empty() {
        return Ok(binding);
    }

    let host_paths: HashSet<String> = exported
        .iter()
        .filter_map(|s| rustc_demangle::try_demangle(s).ok())
        .map(|d| format!("{d:#}"))
        .collect();
    let symbols = missing
        .into_iter()
        .map(|mangled| {
            let demangled = match rustc_demangle::try_demangle(mangled) {
                Ok(d) => format!("{d:#}"),
                Err(_) => mangled.to_owned(),
            };
            MissingSymbol {
                mangled: mangled.to_owned(),
                other_build_in_host: is_rust(mangled) && host_paths.contains(&demangled),
                demangled,
            }
        })
        .collect();
    Err(Error::MissingSymbols {
        patch: patch.to_owned(),
        host: host_path.to_owned(),
        symbols,
    })
}

/// A Rust-mangled name (legacy or v0).
pub(crate) fn is_rust(name: &str) -> bool {
    rustc_demangle::try_demangle(name).is_ok()
}

fn in_system_libraries(name: &str) -> bool {
    let Ok(name) = CString::new(name) else {
        return false;
    };
    // SAFETY: `name` is NUL-terminated and outlives the call; RTLD_DEFAULT
    // is the pseudo-handle for the global scope of this process. dlsym
    // only looks the name up; the address it returns is never used.
    let address = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
    !address.is_null()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_names_are_told_from_c_names() {
        assert!(is_rust("_ZN3svc5price17h0123456789abcdefE"));
        assert!(is_rust("_RNvCsfLfy6EI15iL_7___rustc12___rust_alloc"));
        assert!(!is_rust("memcpy"));
        assert!(!is_rust("_Unwind_Resume"));
        assert!(!is_rust("__tls_get_addr"));
    }

    #[test]
    fn system_symbols_are_found_and_made_up_ones_are_not() {
        assert!(in_system_libraries("memcpy"));
        assert!(in_system_libraries("_Unwind_Resume"));
        assert!(in_system_libraries("__tls_get_addr"));
        assert!(!in_system_libraries("hotpatch_no_such_symbol_anywhere"));
    }
}
