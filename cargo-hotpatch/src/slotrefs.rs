//! Retargets the slot loads of inlined `#[patchable]` wrappers.
//!
//! A `#[patchable]` wrapper is `#[inline(always)]` and reads its slot with
//! one `rip`-relative load (`mov slot(%rip), %reg`, an `R_X86_64_PC32`
//! relocation against the slot's symbol), the cheapest call site there is.
//! Patch code that calls a patchable function of the service inlines that
//! wrapper, so the patch's objects hold such loads of the *host's* slots.
//! A shared object cannot reach the host that way: the host is mapped too
//! far away for a 32-bit displacement, and the linker refuses a PC32
//! relocation against a symbol it must leave undefined.
//!
//! So each object is rewritten before the link: for every host slot its
//! code loads, a cell is added to the object's `linkme___HOTPATCH_SLOT_REFS`
//! section (the patch crate's `SlotRef` table, declared by
//! `hotpatch::manifest!()`), holding the slot's address (an
//! `R_X86_64_64` relocation, resolved by the dynamic loader against the
//! host), and the load is pointed at the cell instead. Nothing else
//! changes: the instruction is the same, it now loads the cell. Before the
//! patch runs, the loader replaces each cell's slot address by the host's
//! out-of-line wrapper of that function, which reads the host's slot and
//! calls what implements it now: calls from patch code into patchable
//! functions stay right through every later patch, for one indirect jump
//! more.

use object::build::elf::{Builder, Relocation, SectionData};
use object::build::{ByteString, Bytes};
use object::elf;

/// The section of the patch crate's `SlotRef` table (linkme's name for
/// `__HOTPATCH_SLOT_REFS`).
pub const SECTION: &str = "linkme___HOTPATCH_SLOT_REFS";

/// What a slot symbol's name contains (`#[patchable]` names every slot
/// `__HOTPATCH_SLOT_<function>`).
const SLOT_MARK: &str = "__HOTPATCH_SLOT_";

/// Rewrites the relocatable ELF object `data` as the module docs say.
/// `Ok(None)`: it loads no host slot, use it as it is. `Ok(Some((bytes,
/// n)))`: the rewritten object and how many slots it reads.
pub fn retarget(data: &[u8]) -> Result<Option<(Vec<u8>, usize)>, String> {
    let mut b = Builder::read(data).map_err(|e| format!("cannot read the object: {e}"))?;
    if b.header.e_machine != elf::EM_X86_64 {
        return Ok(None);
    }
    // The host slots this object names (undefined here).
    let slots: Vec<_> = b
        .symbols
        .iter()
        .filter(|s| s.st_shndx == elf::SHN_UNDEF && s.section.is_none())
        .filter(|s| s.name.to_string().contains(SLOT_MARK))
        .map(|s| s.id())
        .collect();
    if slots.is_empty() {
        return Ok(None);
    }
    // Which of them are read by a PC32 load, in first-use order.
    let mut used = Vec::new();
    for section in b.sections.iter() {
        if let SectionData::Relocation(relocs) = &section.data {
            for r in relocs {
                if let Some(sym) = r.symbol
                    && slots.contains(&sym)
                    && r.r_type == elf::R_X86_64_PC32
                    && !used.contains(&sym)
                {
                    used.push(sym);
                }
            }
        }
    }
    if used.is_empty() {
        return Ok(None);
    }
    let symtab = b
        .sections
        .iter()
        .find(|s| matches!(s.data, SectionData::Symbol))
        .map(|s| s.id())
        .ok_or("the object has no symbol table")?;
    // The cells: zeroed words, each relocated to its slot's address.
    let cells = {
        let s = b.sections.add();
        s.name = ByteString::from(SECTION.as_bytes());
        s.sh_type = elf::SHT_PROGBITS;
        s.sh_flags = elf::SHF_ALLOC | elf::SHF_WRITE;
        s.sh_addralign = 8;
        s.data = SectionData::Data(Bytes::from(vec![0u8; 8 * used.len()]));
        s.id()
    };
    let rela: Vec<Relocation> = used
        .iter()
        .enumerate()
        .map(|(i, &slot)| Relocation {
            r_offset: 8 * i as u64,
            symbol: Some(slot),
            r_type: elf::R_X86_64_64,
            r_addend: 0,
        })
        .collect();
    {
        let s = b.sections.add();
        s.name = ByteString::from(format!(".rela{SECTION}").into_bytes());
        s.sh_type = elf::SHT_RELA;
        s.sh_flags = elf::SHF_INFO_LINK;
        s.sh_addralign = 8;
        s.sh_entsize = 24;
        s.sh_link_section = Some(symtab);
        s.sh_info_section = Some(cells);
        s.data = SectionData::Relocation(rela);
    }
    // A local symbol per cell, for the loads to name.
    let mut cell_syms = Vec::with_capacity(used.len());
    for i in 0..used.len() {
        let s = b.symbols.add();
        s.name = ByteString::from(format!("__hotpatch_slot_ref_{i}").into_bytes());
        s.section = Some(cells);
        s.set_st_info(elf::STB_LOCAL, elf::STT_OBJECT);
        s.st_value = 8 * i as u64;
        s.st_size = 8;
        cell_syms.push(s.id());
    }
    // Point every PC32 load of a slot at its cell: same instruction, same
    // addend, another target.
    for section in b.sections.iter_mut() {
        if let SectionData::Relocation(relocs) = &mut section.data {
            for r in relocs.iter_mut() {
                if r.r_type != elf::R_X86_64_PC32 {
                    continue;
                }
                if let Some(i) = r.symbol.and_then(|sym| used.iter().position(|&u| u == sym)) {
                    r.symbol = Some(cell_syms[i]);
                }
            }
        }
    }
    let mut out = Vec::with_capacity(data.len() + 256);
    b.write(&mut out)
        .map_err(|e| format!("cannot write the rewritten object: {e}"))?;
    Ok(Some((out, used.len())))
}
