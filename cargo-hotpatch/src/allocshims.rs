//! Binds a patch's allocations to the host's global allocator, whatever
//! it is.
//!
//! Patch code allocates through rustc's allocator entry points,
//! `__rustc::__rust_alloc`, `__rust_dealloc`, `__rust_realloc` and
//! `__rust_alloc_zeroed`, which it leaves undefined. A host with the
//! default allocator exports them; a host with a `#[global_allocator]` of
//! its own (jemalloc, mimalloc, a counting wrapper) defines them *hidden*,
//! so no dynamic symbol has those names and the patch could not bind.
//!
//! So, as for slot loads (`slotrefs.rs`), each such undefined name is
//! renamed in place (first byte `Q`), and an extra object defines each
//! renamed name as a hidden one-instruction function, `jmp
//! hotpatch_rust_alloc@PLT` (and so on), to the functions the hotpatch
//! runtime exports from every host (`hotpatch::__private`): they call
//! `std::alloc::alloc` and its siblings there, so the host's global
//! allocator, whichever it is. Same signatures, same Rust ABI: the jump
//! passes the arguments as they are. The patch never defines
//! `__rust_alloc` itself, so a patch that brings an allocator of its own
//! is still told apart (and refused).

use std::collections::BTreeMap;

use object::elf;

/// rustc's entry point (demangled) and the runtime's export it jumps to.
const SHIMS: [(&str, &str); 4] = hotpatch_abi::ALLOCATOR_EXPORTS;

fn target_of(name: &[u8]) -> Option<&'static str> {
    let name = std::str::from_utf8(name).ok()?;
    let demangled = format!("{:#}", rustc_demangle::try_demangle(name).ok()?);
    SHIMS
        .iter()
        .find(|(entry, _)| *entry == demangled)
        .map(|(_, target)| *target)
}

fn is_entry(name: &[u8]) -> bool {
    target_of(name).is_some()
}

/// Renames, in place, the allocator entry points `objects` leave
/// undefined, and returns the object of the shims (with how many), or
/// `None` if no object allocates.
pub fn retarget(objects: &mut [Vec<u8>]) -> Result<Option<(Vec<u8>, usize)>, String> {
    // A crate that declares a `#[global_allocator]` defines the entry
    // points itself: leave it as it is, to be refused (by `link`, and by
    // the runtime for a file linked without the tool's checks).
    for data in objects.iter() {
        if defines_an_entry(data)? {
            return Ok(None);
        }
    }
    let mut used = BTreeMap::new();
    for data in objects.iter_mut() {
        for (offset, name) in crate::slotrefs::undefined_names(data, is_entry, false)? {
            data[offset] = b'Q';
            let target = target_of(&name).expect("matched");
            used.insert(name, target);
        }
    }
    if used.is_empty() {
        return Ok(None);
    }
    Ok(Some((shims(&used)?, used.len())))
}

fn defines_an_entry(data: &[u8]) -> Result<bool, String> {
    use object::{Object, ObjectSymbol};
    let file = object::File::parse(data).map_err(|e| e.to_string())?;
    Ok(file
        .symbols()
        .filter(|s| s.is_definition())
        .filter_map(|s| s.name_bytes().ok())
        .any(is_entry))
}

fn shims(used: &BTreeMap<Vec<u8>, &'static str>) -> Result<Vec<u8>, String> {
    use object::write::{Object, Relocation, Symbol, SymbolSection};
    use object::{
        Architecture, BinaryFormat, Endianness, RelocationFlags, SectionKind, SymbolFlags,
        SymbolKind, SymbolScope,
    };
    let mut obj = Object::new(BinaryFormat::Elf, Architecture::X86_64, Endianness::Little);
    let text = obj.add_section(
        Vec::new(),
        b".text.hotpatch_alloc_shims".to_vec(),
        SectionKind::Text,
    );
    for (name, target) in used {
        // jmp rel32 (to the PLT entry of the runtime's export).
        let offset = obj.append_section_data(text, &[0xe9, 0, 0, 0, 0], 16);
        let mut renamed = name.clone();
        renamed[0] = b'Q';
        obj.add_symbol(Symbol {
            name: renamed,
            value: offset,
            size: 5,
            kind: SymbolKind::Text,
            scope: SymbolScope::Linkage,
            weak: false,
            section: SymbolSection::Section(text),
            flags: SymbolFlags::None,
        });
        let export = obj.add_symbol(Symbol {
            name: target.as_bytes().to_vec(),
            value: 0,
            size: 0,
            kind: SymbolKind::Text,
            scope: SymbolScope::Dynamic,
            weak: false,
            section: SymbolSection::Undefined,
            flags: SymbolFlags::None,
        });
        obj.add_relocation(
            text,
            Relocation {
                offset: offset + 1,
                symbol: export,
                addend: -4,
                flags: RelocationFlags::Elf {
                    r_type: elf::R_X86_64_PLT32,
                },
            },
        )
        .map_err(|e| e.to_string())?;
    }
    obj.add_section(Vec::new(), b".note.GNU-stack".to_vec(), SectionKind::Other);
    obj.write().map_err(|e| e.to_string())
}
