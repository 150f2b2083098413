//! Reading ELF files: build-id, the `.hotpatch.host` identity section,
//! dynamic symbols.

use std::path::Path;

use object::{Object, ObjectSection, ObjectSymbol};

use crate::Error;

/// Name of the non-allocated section of a patch that names its host.
pub(crate) const HOST_SECTION: &str = hotpatch_abi::HOST_SECTION;

/// The first 8 bytes of [`HOST_SECTION`]: format and version.
pub(crate) const HOST_MAGIC: &[u8; 8] = &hotpatch_abi::HOST_MAGIC;

pub(crate) fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(Error::io(path))
}

pub(crate) fn parse<'d>(path: &Path, data: &'d [u8]) -> Result<object::File<'d>, Error> {
    let file = object::File::parse(data).map_err(|e| Error::Malformed {
        path: path.to_owned(),
        what: "ELF file",
        reason: e.to_string(),
    })?;
    if file.format() != object::BinaryFormat::Elf {
        return Err(Error::Malformed {
            path: path.to_owned(),
            what: "ELF file",
            reason: format!("it is {:?}", file.format()),
        });
    }
    Ok(file)
}

/// The GNU build-id of `binary` (its `NT_GNU_BUILD_ID` note).
///
/// # Errors
///
/// [`Error::Io`] if it cannot be read, [`Error::Malformed`] if it is not
/// ELF, [`Error::NoBuildId`] if it has no build-id.
///
/// # Examples
///
/// ```no_run
/// let id = cargo_hotpatch::build_id("target/release/my-service".as_ref())?;
/// println!("{}", cargo_hotpatch::hex(&id));
/// # Ok::<(), cargo_hotpatch::Error>(())
/// ```
pub fn build_id(binary: &Path) -> Result<Vec<u8>, Error> {
    let data = read(binary)?;
    build_id_of(binary, &parse(binary, &data)?)
}

pub(crate) fn build_id_of(path: &Path, file: &object::File<'_>) -> Result<Vec<u8>, Error> {
    match file.build_id() {
        Ok(Some(id)) if !id.is_empty() => Ok(id.to_vec()),
        Ok(_) => Err(Error::NoBuildId {
            path: path.to_owned(),
        }),
        Err(e) => Err(Error::Malformed {
            path: path.to_owned(),
            what: "ELF file",
            reason: format!("its build-id note: {e}"),
        }),
    }
}

/// The contents of a [`HOST_SECTION`]: magic, u32 LE length, build-id.
pub(crate) fn host_section(build_id: &[u8]) -> Vec<u8> {
    let len = u32::try_from(build_id.len()).expect("a build-id is a few dozen bytes");
    let mut v = Vec::with_capacity(12 + build_id.len());
    v.extend_from_slice(HOST_MAGIC);
    v.extend_from_slice(&len.to_le_bytes());
    v.extend_from_slice(build_id);
    v
}

/// The host build-id a patch made by [`link`](crate::link) is bound to:
/// the contents of its `.hotpatch.host` section, or `None` if
/// `patch_bytes` is not ELF, has no such section, or the section is not
/// well formed (wrong magic, length past its end).
///
/// # Examples
///
/// ```no_run
/// let patch = std::fs::read("target/hotpatch/fix.so").unwrap();
/// let host = cargo_hotpatch::build_id("target/release/my-service".as_ref())?;
/// assert_eq!(cargo_hotpatch::identity(&patch), Some(host));
/// # Ok::<(), cargo_hotpatch::Error>(())
/// ```
pub fn identity(patch_bytes: &[u8]) -> Option<Vec<u8>> {
    let file = object::File::parse(patch_bytes).ok()?;
    let data = file.section_by_name(HOST_SECTION)?.data().ok()?;
    let rest = data.strip_prefix(HOST_MAGIC.as_slice())?;
    let (len, id) = rest.split_first_chunk::<4>()?;
    let len = usize::try_from(u32::from_le_bytes(*len)).ok()?;
    id.get(..len).map(<[u8]>::to_vec)
}

/// The names of the defined dynamic symbols of `file`.
pub(crate) fn exported(file: &object::File<'_>) -> Vec<String> {
    file.dynamic_symbols()
        .filter(|s| !s.is_undefined())
        .filter_map(|s| s.name().ok().map(str::to_owned))
        .filter(|n| !n.is_empty())
        .collect()
}

/// The names the static symbol table (`.symtab`) of `file` defines at one
/// address (a name defined twice at different addresses, as two private
/// statics of one name can be, binds to neither): what the runtime binds
/// a patch to in a binary linked without `-rdynamic`. Empty for a
/// stripped binary.
pub(crate) fn symbol_table(file: &object::File<'_>) -> Vec<String> {
    let mut at: std::collections::HashMap<&str, Option<u64>> = std::collections::HashMap::new();
    for s in file.symbols() {
        if s.is_undefined() || s.address() == 0 {
            continue;
        }
        let Ok(name) = s.name() else { continue };
        if name.is_empty() {
            continue;
        }
        at.entry(name)
            .and_modify(|a| {
                if *a != Some(s.address()) {
                    *a = None;
                }
            })
            .or_insert(Some(s.address()));
    }
    at.into_iter()
        .filter(|(_, a)| a.is_some())
        .map(|(n, _)| n.to_owned())
        .collect()
}

/// The names of the undefined, non-weak dynamic symbols of `file`.
pub(crate) fn imported(file: &object::File<'_>) -> Vec<String> {
    file.dynamic_symbols()
        .filter(|s| s.is_undefined() && !s.is_weak())
        .filter_map(|s| s.name().ok().map(str::to_owned))
        .filter(|n| !n.is_empty())
        .collect()
}

/// Lowercase hexadecimal, as `readelf -n` prints a build-id.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_lowercase_two_digits_per_byte() {
        assert_eq!(hex(&[0x0a, 0xff, 0x10]), "0aff10");
    }
}
