//! Retargets the slot loads of inlined `#[patchable]` wrappers.
//!
//! A `#[patchable]` wrapper is `#[inline(always)]` and reads its slot with
//! one `rip`-relative load (`mov slot(%rip), %reg`: an `R_X86_64_PC32`
//! relocation against the slot's symbol), the cheapest call site there is.
//! Patch code that calls a patchable function of the service inlines that
//! wrapper, so the patch's objects hold such loads of the *host's* slots.
//! A shared object cannot reach the host that way: the host is mapped too
//! far away for a 32-bit displacement, and the linker refuses a PC32
//! relocation against a symbol it must leave undefined.
//!
//! So before the link, each such load is pointed at a cell of the patch
//! instead. In each object the undefined slot symbol is renamed in place
//! (its first byte, `_` of `_ZN`/`_R`, becomes `Q`: same length, so the
//! object's string table keeps its size), and an extra object defines each
//! renamed name as a hidden 8-byte cell in the patch crate's
//! `linkme___HOTPATCH_REFS` section (the `SlotRef` table declared by
//! `hotpatch::manifest!()`), relocated (`R_X86_64_64`) to the real slot
//! symbol: the dynamic loader fills it with the host slot's address. The
//! instruction is unchanged and now loads the cell. Before the patch runs,
//! the loader replaces each cell's slot address by the host's out-of-line
//! wrapper of that function, which reads the host's slot and calls what
//! implements it now: calls from patch code into patchable functions stay
//! right through every later patch, for one indirect jump more.

use std::collections::BTreeSet;

use object::Endianness;
use object::elf;
use object::read::elf::{ElfFile64, FileHeader, SectionHeader, Sym};

/// The section of the patch crate's `SlotRef` table (linkme's name for
/// `__HOTPATCH_REFS`).
pub const SECTION: &str = hotpatch_abi::SLOT_REFS_SECTION;

/// What a slot symbol's name contains (`#[patchable]` names every slot
/// `__HOTPATCH_SLOT_<function>`).
const SLOT_MARK: &[u8] = b"__HOTPATCH_SLOT_";

/// Rewrites, in place, every object of `objects` whose code loads a host
/// slot, and returns the extra object holding the cells (with the
/// number of slots), or `None` if no object loads one.
pub fn retarget(objects: &mut [Vec<u8>]) -> Result<Option<(Vec<u8>, usize)>, String> {
    let mut slots = BTreeSet::new();
    for data in objects.iter_mut() {
        for (offset, name) in undefined_names(data, is_slot, true)? {
            data[offset] = b'Q';
            slots.insert(name);
        }
    }
    if slots.is_empty() {
        return Ok(None);
    }
    Ok(Some((cells(&slots)?, slots.len())))
}

/// A slot's mangled name (`__HOTPATCH_SLOT_<function>`).
fn is_slot(name: &[u8]) -> bool {
    name.windows(SLOT_MARK.len()).any(|w| w == SLOT_MARK)
}

/// The undefined symbols of one relocatable object whose mangled name
/// (`_ZN..`/`_R..`) `matches`, and that are used (with `pc32_only`: only by
/// PC32 loads, else refused): `(file offset of the name's first byte,
/// name)`, for renaming in place.
pub(crate) fn undefined_names(
    data: &[u8],
    matches: fn(&[u8]) -> bool,
    pc32_only: bool,
) -> Result<Vec<(usize, Vec<u8>)>, String> {
    let file = ElfFile64::<Endianness>::parse(data).map_err(|e| e.to_string())?;
    let endian = file.endian();
    let header = file.elf_header();
    if header.e_machine(endian) != elf::EM_X86_64 || header.e_type(endian) != elf::ET_REL {
        return Ok(Vec::new());
    }
    let sections = header.sections(endian, data).map_err(|e| e.to_string())?;
    let Some((symtab_index, _)) = sections
        .iter()
        .enumerate()
        .find(|(_, s)| s.sh_type(endian) == elf::SHT_SYMTAB)
    else {
        return Ok(Vec::new());
    };
    let symbols = sections
        .symbols(endian, data, elf::SHT_SYMTAB)
        .map_err(|e| e.to_string())?;
    let strtab_header = sections
        .section(symbols.string_section())
        .map_err(|e| e.to_string())?;
    let strtab_offset = strtab_header.sh_offset(endian) as usize;
    let strtab_size = strtab_header.sh_size(endian) as usize;
    // Candidates: undefined symbols named like a slot.
    let mut candidates = Vec::new();
    for (index, sym) in symbols.iter().enumerate() {
        if !sym.is_undefined(endian) {
            continue;
        }
        let name = sym
            .name(endian, symbols.strings())
            .map_err(|e| e.to_string())?;
        if matches(name) && (name.starts_with(b"_ZN") || name.starts_with(b"_R")) {
            candidates.push((index, sym.st_name(endian) as usize, name.to_vec()));
        }
    }
    if candidates.is_empty() {
        return Ok(Vec::new());
    }
    // How each candidate is used.
    let mut pc32 = vec![false; candidates.len()];
    for section in sections.iter() {
        if section.sh_type(endian) != elf::SHT_RELA
            || section.sh_link(endian) as usize != symtab_index
        {
            continue;
        }
        let relas: &[elf::Rela64<Endianness>] = section
            .data_as_array(endian, data)
            .map_err(|e| e.to_string())?;
        for r in relas {
            let sym = r.r_sym(endian, false) as usize;
            let Some(c) = candidates.iter().position(|(i, _, _)| *i == sym) else {
                continue;
            };
            let kind = r.r_type(endian, false);
            if pc32_only && kind != elf::R_X86_64_PC32 {
                return Err(format!(
                    "the symbol {} is used by a relocation of type {kind}, not only by the \
                     `#[patchable]` wrapper's load (R_X86_64_PC32)",
                    String::from_utf8_lossy(&candidates[c].2)
                ));
            }
            pc32[c] = true;
        }
    }
    let strings = &data[strtab_offset..strtab_offset + strtab_size];
    let mut out = Vec::new();
    for ((_, st_name, name), used) in candidates.into_iter().zip(pc32) {
        if !used {
            continue;
        }
        // The first byte must belong to this name alone: no other name of
        // the table may run through it (string tables share tails).
        if st_name > 0 && strings.get(st_name - 1).is_some_and(|&b| b != 0) {
            return Err(format!(
                "the name of the symbol {} shares its string with another",
                String::from_utf8_lossy(&name)
            ));
        }
        out.push((strtab_offset + st_name, name));
    }
    Ok(out)
}

/// The object defining one hidden cell per slot name (renamed), each
/// relocated to the real slot symbol.
fn cells(slots: &BTreeSet<Vec<u8>>) -> Result<Vec<u8>, String> {
    use object::write::{Object, Relocation, Symbol, SymbolSection};
    use object::{
        Architecture, BinaryFormat, RelocationFlags, SectionKind, SymbolFlags, SymbolKind,
        SymbolScope,
    };
    let mut obj = Object::new(BinaryFormat::Elf, Architecture::X86_64, Endianness::Little);
    let section = obj.add_section(Vec::new(), SECTION.as_bytes().to_vec(), SectionKind::Data);
    for name in slots {
        let offset = obj.append_section_data(section, &[0u8; 8], 8);
        let mut renamed = name.clone();
        renamed[0] = b'Q';
        obj.add_symbol(Symbol {
            name: renamed,
            value: offset,
            size: 8,
            kind: SymbolKind::Data,
            scope: SymbolScope::Linkage,
            weak: false,
            section: SymbolSection::Section(section),
            flags: SymbolFlags::None,
        });
        let slot = obj.add_symbol(Symbol {
            name: name.clone(),
            value: 0,
            size: 0,
            kind: SymbolKind::Data,
            scope: SymbolScope::Dynamic,
            weak: false,
            section: SymbolSection::Undefined,
            flags: SymbolFlags::None,
        });
        obj.add_relocation(
            section,
            Relocation {
                offset,
                symbol: slot,
                addend: 0,
                flags: RelocationFlags::Elf {
                    r_type: elf::R_X86_64_64,
                },
            },
        )
        .map_err(|e| e.to_string())?;
    }
    obj.add_section(Vec::new(), b".note.GNU-stack".to_vec(), SectionKind::Other);
    obj.write().map_err(|e| e.to_string())
}
