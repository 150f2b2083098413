//! Writes the patch's code: the changed functions of the head build, in
//! one new relocatable object, every reference to unchanged code or to
//! the service's data bound to the running binary.
//!
//! A unit of the head build is *copied* when it is a root (a replaced or
//! included function), anonymous data a copied unit uses (constants,
//! vtables, panic locations, exception tables), or a function the base
//! binary does not have (a new helper, a generic instance the fix is the
//! first to use, a function the base inlined everywhere). Everything else
//! is the host's:
//! - a symbol the binary exports (`-rdynamic`) is left undefined, for the
//!   dynamic loader to bind by name, as in any thin patch;
//! - a symbol it does not export (a private function or static of the
//!   service) is reached through an 8-byte *cell* holding its address,
//!   written by the dynamic loader as `hotpatch_host_exports_v1 + delta`
//!   (an `R_X86_64_64` against the one symbol every host exports; the
//!   delta comes from the base binary's symbol table, and the patch is
//!   bound to that build by its build-id). A call goes through a stub
//!   (`jmp *cell(%rip)`), a GOT load loads the cell, `lea sym(%rip)`
//!   becomes `mov cell(%rip)` (same length), and any other instruction
//!   that reads or writes the data (`lock incq CALLS(%rip)`) jumps to a
//!   thunk that does the same through the cell (see `riprel`; which one an
//!   instruction needs, `riprel::Instructions::access` says).
//! - a load of a `#[patchable]` slot by an inlined wrapper reads a cell of
//!   the patch's `SlotRef` table instead, which the loader fills with the
//!   host's out-of-line wrapper (as `slotrefs.rs` does for patch crates).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};

use object::elf;
use object::read::ObjectSection;
use object::write::{
    self, Relocation, SectionId, StandardSection, Symbol, SymbolId, SymbolSection,
};
use object::{
    Architecture, BinaryFormat, Endianness, RelocationFlags, SectionFlags, SectionKind,
    SymbolFlags, SymbolKind, SymbolScope,
};

mod eh_frame;

use super::classify::Plan;
use super::describe;
use super::identity::Host;
use std::mem::{offset_of, size_of};

use hotpatch_abi::{HookFn, RawPatchFn};

use super::objects::{Build, Referent, UnitId, is_callsite_static};
use crate::riprel::{self, Access};
use crate::{BuildError, Refusal};

/// A `PatchFn` record as written (`repr(C)`: target getter, replacement,
/// name as `&str`, layouts as `&[TypeLayout]`): its size and the offsets
/// of its fields, from the contract's layout.
const PATCH_FN_SIZE: usize = size_of::<RawPatchFn>();
const PATCH_FN_TARGET: u64 = offset_of!(RawPatchFn, target) as u64;
const PATCH_FN_REPLACEMENT: u64 = offset_of!(RawPatchFn, replacement) as u64;
const PATCH_FN_NAME: u64 = offset_of!(RawPatchFn, name) as u64;
const PATCH_FN_LAYOUTS: u64 = offset_of!(RawPatchFn, layouts) as u64;
/// A `HookFn` record as written: its size and the offsets of its fields.
const HOOK_FN_SIZE: usize = size_of::<HookFn>();
const HOOK_FN_TARGET: u64 = offset_of!(HookFn, target) as u64;
const HOOK_FN_REPLACEMENT: u64 = offset_of!(HookFn, replacement) as u64;
const HOOK_FN_ENTRY: u64 = offset_of!(HookFn, entry) as u64;
const HOOK_FN_PATH: u64 = offset_of!(HookFn, path) as u64;
const HOOK_FN_NAME: u64 = offset_of!(HookFn, name) as u64;
/// A `&str` or slice: its pointer, then its length.
const LEN_AT: u64 = hotpatch_abi::LEN_OFFSET as u64;

/// A replacement record to write.
pub(crate) struct Record {
    /// The head's new body (`__hotpatch_original_*`).
    pub replacement: UnitId,
    /// The host's entry getter (`__hotpatch_entry_of_*`).
    pub getter: String,
    /// The function's path, for messages.
    pub path: String,
    /// The head entry's layouts: the anonymous data and the offset in it.
    pub layouts: (UnitId, u64),
    pub layouts_len: u64,
}

/// A hook record to write.
pub(crate) struct HookRecord {
    /// The head's new body.
    pub replacement: UnitId,
    /// The host function's address (`.symtab` of the deployed build).
    pub address: u64,
    /// The bytes expected at its entry.
    pub entry: Vec<u8>,
    /// The function's path, for messages.
    pub path: String,
}

/// The object, and the functions it copied beyond the roots.
pub(crate) struct Extracted {
    pub object: Vec<u8>,
    /// Named functions copied because the base binary lacks them.
    pub new_functions: Vec<String>,
    /// Host symbols reached through cells (not exported by the binary).
    pub private_refs: usize,
    /// Functions copied although their code is the host's in all but how
    /// it was compiled (`compare::ChangeSite::is_noise`): the copied code
    /// was compiled against the head's copies, whose registers and
    /// arguments may differ from the host's.
    pub carried: Vec<String>,
}

const ANCHOR: &str = hotpatch_abi::HOST_EXPORTS_SYMBOL;
/// The patch's cell holding the address of its own panic counter (defined
/// by the manifest object): what the copied counted bodies' references to
/// the service's `SOURCE_PANICS` become.
pub(crate) const PANICS_CELL: &str = hotpatch_abi::SOURCE_PANICS_CELL;
/// The patch's cell holding the address of its counting personality
/// routine (defined by the manifest object): the personality of each
/// hooked function's new body, which counts a panic that leaves it on the
/// patch's counter (`eh_frame.rs`).
pub(crate) const HOOK_PERSONALITY_CELL: &str = hotpatch_abi::HOOK_PERSONALITY_CELL;
const REFS_SECTION: &str = hotpatch_abi::SLOT_REFS_SECTION;
const FNS_SECTION: &str = hotpatch_abi::PATCH_FNS_SECTION;
const HOOKS_SECTION: &str = hotpatch_abi::HOOK_FNS_SECTION;

#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum HostRef {
    Named(String),
    Anchor(u64),
}

struct Writer<'a, 'd> {
    head: &'a Build<'d>,
    host: &'a Host,
    roots: &'a HashSet<UnitId>,
    /// The hooked functions' new bodies: their panics are counted.
    hook_bodies: HashSet<UnitId>,
    obj: write::Object<'static>,
    copies: HashMap<UnitId, SectionId>,
    queue: VecDeque<UnitId>,
    unit_syms: HashMap<(UnitId, u64), SymbolId>,
    undefined: HashMap<String, SymbolId>,
    cells: BTreeMap<(HostRef, i64), SymbolId>,
    slot_cells: BTreeMap<(HostRef, i64), SymbolId>,
    stubs: BTreeMap<(HostRef, i64), SymbolId>,
    cell_section: Option<SectionId>,
    refs_section: Option<SectionId>,
    stub_section: Option<SectionId>,
    thunk_section: Option<SectionId>,
    /// Per copied text unit: its FDE (object, offset in `.eh_frame`).
    fdes: HashMap<UnitId, (usize, usize)>,
    new_functions: Vec<String>,
    /// Functions that differ from the host's only in how they were
    /// compiled: copied when copied code uses them, never bound to the
    /// host's (an internal function's calling convention is the
    /// optimiser's to change).
    noise: &'a BTreeSet<String>,
    carried: Vec<String>,
    refusals: Vec<Refusal>,
    private_refs: HashSet<(HostRef, i64)>,
}

/// Writes the patch object.
pub(crate) fn extract(
    head: &Build<'_>,
    host: &Host,
    roots: &HashSet<UnitId>,
    records: &[Record],
    hooks: &[HookRecord],
    noise: &BTreeSet<String>,
) -> Result<Extracted, Vec<Refusal>> {
    let mut w = Writer {
        head,
        host,
        roots,
        hook_bodies: hooks.iter().map(|h| h.replacement).collect(),
        noise,
        carried: Vec::new(),
        obj: write::Object::new(BinaryFormat::Elf, Architecture::X86_64, Endianness::Little),
        copies: HashMap::new(),
        queue: VecDeque::new(),
        unit_syms: HashMap::new(),
        undefined: HashMap::new(),
        cells: BTreeMap::new(),
        slot_cells: BTreeMap::new(),
        stubs: BTreeMap::new(),
        cell_section: None,
        refs_section: None,
        stub_section: None,
        thunk_section: None,
        fdes: HashMap::new(),
        new_functions: Vec::new(),
        refusals: Vec::new(),
        private_refs: HashSet::new(),
    };
    w.index_fdes();
    // The patch's code needs no executable stack.
    w.obj
        .add_section(Vec::new(), b".note.GNU-stack".to_vec(), SectionKind::Note);
    let mut sorted: Vec<UnitId> = roots.iter().copied().collect();
    sorted.sort_by_key(|u| (u.0, u.1.0));
    for r in sorted {
        w.copy(r);
    }
    for rec in records {
        w.copy(rec.replacement);
        w.copy(rec.layouts.0);
    }
    while let Some(u) = w.queue.pop_front() {
        w.relocate(u);
    }
    w.write_records(records);
    w.write_hook_records(hooks);
    w.write_eh_frame();
    // What the unwind information reaches (the personality's cell).
    while let Some(u) = w.queue.pop_front() {
        w.relocate(u);
    }
    if !w.refusals.is_empty() {
        crate::refusal::sort_and_dedup(&mut w.refusals);
        return Err(w.refusals);
    }
    let private_refs = w.private_refs.len();
    let mut new_functions = w.new_functions.clone();
    new_functions.sort();
    let mut carried = w.carried.clone();
    carried.sort();
    carried.dedup();
    let object = w.obj.write().map_err(|e| {
        vec![Refusal::WriteObject {
            reason: e.to_string(),
        }]
    })?;
    Ok(Extracted {
        object,
        new_functions,
        private_refs,
        carried,
    })
}

impl Writer<'_, '_> {
    /// Queues a unit for copying and returns its new section.
    fn copy(&mut self, u: UnitId) -> SectionId {
        if let Some(s) = self.copies.get(&u) {
            return *s;
        }
        let section = self.head.section(u);
        let name = section.name().unwrap_or(".data").as_bytes().to_vec();
        let kind = section.kind();
        let id = self.obj.add_section(Vec::new(), name, kind);
        let align = section.align().max(1);
        if kind == SectionKind::UninitializedData || kind == SectionKind::UninitializedTls {
            self.obj.section_mut(id).append_bss(section.size(), align);
        } else {
            let bytes = self.head.bytes(u);
            self.obj.section_mut(id).set_data(bytes, align);
        }
        if let SectionFlags::Elf { sh_flags } = section.flags() {
            let drop = u64::from(elf::SHF_GROUP | elf::SHF_MERGE | elf::SHF_STRINGS)
                | u64::from(elf::SHF_GNU_RETAIN);
            self.obj.section_mut(id).flags = SectionFlags::Elf {
                sh_flags: sh_flags & !drop,
            };
        }
        self.copies.insert(u, id);
        self.queue.push_back(u);
        if let Some(name) = self.head.name_of.get(&u) {
            let kind = if self.head.is_code(u) {
                SymbolKind::Text
            } else {
                SymbolKind::Data
            };
            let sym = self.obj.add_symbol(Symbol {
                name: name.as_bytes().to_vec(),
                value: 0,
                size: section.size(),
                kind,
                scope: SymbolScope::Compilation,
                weak: false,
                section: SymbolSection::Section(id),
                flags: SymbolFlags::None,
            });
            self.unit_syms.insert((u, 0), sym);
        }
        id
    }

    /// A local symbol of the patch object.
    fn local(
        &mut self,
        name: String,
        value: u64,
        size: u64,
        kind: SymbolKind,
        section: SectionId,
    ) -> SymbolId {
        self.obj.add_symbol(Symbol {
            name: name.into_bytes(),
            value,
            size,
            kind,
            scope: SymbolScope::Compilation,
            weak: false,
            section: SymbolSection::Section(section),
            flags: SymbolFlags::None,
        })
    }

    /// A symbol at `off` in a copied unit.
    fn unit_symbol(&mut self, u: UnitId, off: u64) -> SymbolId {
        let section = self.copy(u);
        if let Some(s) = self.unit_syms.get(&(u, off)) {
            return *s;
        }
        let n = self.unit_syms.len();
        let sym = self.local(
            format!(".Lhotpatch.copy.{n}"),
            off,
            0,
            SymbolKind::Data,
            section,
        );
        self.unit_syms.insert((u, off), sym);
        sym
    }

    fn undefined(&mut self, name: &str, tls: bool) -> SymbolId {
        if let Some(s) = self.undefined.get(name) {
            return *s;
        }
        let sym = self.obj.add_symbol(Symbol {
            name: name.as_bytes().to_vec(),
            value: 0,
            size: 0,
            kind: if tls {
                SymbolKind::Tls
            } else {
                SymbolKind::Unknown
            },
            // Default visibility: bound by the dynamic loader.
            scope: SymbolScope::Dynamic,
            weak: false,
            section: SymbolSection::Undefined,
            flags: SymbolFlags::None,
        });
        self.undefined.insert(name.to_owned(), sym);
        sym
    }

    /// How a named unit of the head is reached: copied, or the host's.
    fn host_ref(&self, name: &str) -> Option<HostRef> {
        if self.host.exported.contains(name) {
            Some(HostRef::Named(name.to_owned()))
        } else {
            self.host.address.get(name).map(|a| HostRef::Anchor(*a))
        }
    }

    /// A data cell holding `target + addend` (an R_X86_64_64).
    fn cell_in(&mut self, slot_table: bool, target: &HostRef, addend: i64) -> SymbolId {
        let key = (target.clone(), addend);
        let existing = if slot_table {
            self.slot_cells.get(&key)
        } else {
            self.cells.get(&key)
        };
        if let Some(s) = existing {
            return *s;
        }
        let section = if slot_table {
            *self.refs_section.get_or_insert_with(|| {
                self.obj.add_section(
                    Vec::new(),
                    REFS_SECTION.as_bytes().to_vec(),
                    SectionKind::Data,
                )
            })
        } else {
            *self.cell_section.get_or_insert_with(|| {
                self.obj.add_section(
                    Vec::new(),
                    b".data.rel.ro.hotpatch_cells".to_vec(),
                    SectionKind::ReadOnlyDataWithRel,
                )
            })
        };
        let offset = self.obj.append_section_data(section, &[0; 8], 8);
        let n = self.cells.len() + self.slot_cells.len();
        let sym = self.local(
            format!(".Lhotpatch.cell.{n}"),
            offset,
            8,
            SymbolKind::Data,
            section,
        );
        let (symbol, value) = match target {
            HostRef::Named(name) => (self.undefined(name, false), addend),
            HostRef::Anchor(a) => {
                self.private_refs.insert(key.clone());
                (
                    self.undefined(ANCHOR, false),
                    (*a as i64).wrapping_add(addend) - self.host.anchor as i64,
                )
            }
        };
        self.add_reloc(section, offset, elf::R_X86_64_64, symbol, value);
        if slot_table {
            self.slot_cells.insert(key, sym);
        } else {
            self.cells.insert(key, sym);
        }
        sym
    }

    /// A stub `jmp *cell(%rip)` to a host function.
    fn stub(&mut self, target: &HostRef, addend: i64) -> SymbolId {
        let key = (target.clone(), addend);
        if let Some(s) = self.stubs.get(&key) {
            return *s;
        }
        let cell = self.cell_in(false, target, addend);
        let section = *self.stub_section.get_or_insert_with(|| {
            self.obj.add_section(
                Vec::new(),
                b".text.hotpatch_stubs".to_vec(),
                SectionKind::Text,
            )
        });
        let offset =
            self.obj
                .append_section_data(section, &[0xff, 0x25, 0, 0, 0, 0, 0xcc, 0xcc], 8);
        self.add_reloc(section, offset + 2, elf::R_X86_64_PC32, cell, -4);
        let n = self.stubs.len();
        let sym = self.local(
            format!(".Lhotpatch.stub.{n}"),
            offset,
            6,
            SymbolKind::Text,
            section,
        );
        self.stubs.insert(key, sym);
        sym
    }

    fn add_reloc(
        &mut self,
        section: SectionId,
        offset: u64,
        r_type: u32,
        symbol: SymbolId,
        addend: i64,
    ) {
        self.obj
            .add_relocation(
                section,
                Relocation {
                    offset,
                    symbol,
                    addend,
                    flags: RelocationFlags::Elf { r_type },
                },
            )
            .expect("ELF relocations with explicit types are always accepted");
    }

    /// Whether a named head unit is copied rather than the host's.
    fn copies_named(&self, u: UnitId, name: &str) -> bool {
        self.roots.contains(&u) || self.noise.contains(name) || self.host_ref(name).is_none()
    }

    /// Writes a copied unit's relocations.
    fn relocate(&mut self, u: UnitId) {
        let section = self.copies[&u];
        let relocs = self.head.relocs.get(&u).cloned().unwrap_or_default();
        let code = self.head.is_code(u);
        let owner = self
            .head
            .name_of
            .get(&u)
            .map(|n| describe(n))
            .unwrap_or_else(|| "a constant".to_owned());
        let mut bytes = self.head.bytes(u);
        // What each relocated field of the code is, by its instruction
        // (code that does not decode gets no branch, load or lea: its
        // fields are refused).
        let function = if code {
            riprel::Instructions::decode(&bytes).ok()
        } else {
            None
        };
        let mut thunk_sites: Vec<(usize, HostRef, i64)> = Vec::new();
        let mut edited = false;
        for r in &relocs {
            // Resolve: copied (local) or the host's.
            let (local, host, tls) = match &r.target {
                Referent::External(name) => {
                    let tls = self.host.tls.contains(name);
                    let host = self
                        .host_ref(name)
                        .unwrap_or_else(|| HostRef::Named(name.clone()));
                    (None, Some((host, name.clone(), 0u64)), tls)
                }
                Referent::Unit(t, off) => {
                    let tls = self.head.tls.contains(t);
                    match self.head.name_of.get(t).cloned() {
                        None => (Some((*t, *off)), None, tls),
                        Some(name) => {
                            let is_data = !self.head.is_code(*t);
                            let rust_static = is_data
                                && !name.starts_with("DW.ref.")
                                && (name.starts_with("_ZN") || name.starts_with("_R"))
                                && !is_callsite_static(&name);
                            if rust_static || tls {
                                match self.host_ref(&name) {
                                    Some(h) => (None, Some((h, name, *off)), tls),
                                    None => {
                                        self.refusals.push(Refusal::NewState {
                                            owner: owner.clone(),
                                            state: describe(&name),
                                        });
                                        continue;
                                    }
                                }
                            } else if is_callsite_static(&name) || self.copies_named(*t, &name) {
                                if !self.roots.contains(t)
                                    && self.head.is_code(*t)
                                    && !self.copies.contains_key(t)
                                {
                                    if self.noise.contains(&name) {
                                        self.carried.push(name.clone());
                                    } else {
                                        self.new_functions.push(name.clone());
                                    }
                                }
                                (Some((*t, *off)), None, tls)
                            } else {
                                let h = self.host_ref(&name).expect("checked by copies_named");
                                (None, Some((h, name, *off)), tls)
                            }
                        }
                    }
                }
            };
            let at = r.offset as usize;
            if let Some((t, off)) = local {
                if tls {
                    self.refusals.push(Refusal::NewThreadLocal {
                        owner: owner.clone(),
                    });
                    continue;
                }
                let sym = self.unit_symbol(t, off);
                self.add_reloc(section, r.offset, r.r_type, sym, r.addend);
                continue;
            }
            let (h, name, off) = host.expect("local or host");
            if is_source_panics(&name) {
                // `&SOURCE_PANICS` (a GOT load) becomes a load of the
                // patch's cell: the address of the patch's counter.
                match r.r_type {
                    elf::R_X86_64_GOTPCREL
                    | elf::R_X86_64_GOTPCRELX
                    | elf::R_X86_64_REX_GOTPCRELX => {
                        let cell = self.undefined(PANICS_CELL, false);
                        self.add_reloc(section, r.offset, elf::R_X86_64_PC32, cell, r.addend);
                    }
                    other => self.refusals.push(Refusal::PanicCounterRelocation {
                        owner: owner.clone(),
                        r_type: other,
                    }),
                }
                continue;
            }
            let addend = r.addend + off as i64;
            let is_slot = name.contains("__HOTPATCH_SLOT_");
            match r.r_type {
                elf::R_X86_64_64 => match &h {
                    HostRef::Named(n) => {
                        let s = self.undefined(n, tls);
                        self.add_reloc(section, r.offset, r.r_type, s, addend);
                    }
                    HostRef::Anchor(a) => {
                        self.private_refs.insert((h.clone(), addend));
                        let s = self.undefined(ANCHOR, false);
                        let v = (*a as i64).wrapping_add(addend) - self.host.anchor as i64;
                        self.add_reloc(section, r.offset, r.r_type, s, v);
                    }
                },
                elf::R_X86_64_TLSGD
                | elf::R_X86_64_TLSLD
                | elf::R_X86_64_DTPOFF32
                | elf::R_X86_64_DTPOFF64
                | elf::R_X86_64_GOTTPOFF
                | elf::R_X86_64_TPOFF32 => match &h {
                    HostRef::Named(n) if tls => {
                        let s = self.undefined(n, true);
                        self.add_reloc(section, r.offset, r.r_type, s, addend);
                    }
                    _ => self.refusals.push(Refusal::PrivateThreadLocal {
                        owner: owner.clone(),
                        thread_local: describe(&name),
                    }),
                },
                elf::R_X86_64_PLT32 | elf::R_X86_64_PC32
                    if function
                        .as_ref()
                        .is_some_and(|f| f.access(at) == Access::Branch) =>
                {
                    match &h {
                        HostRef::Named(n) => {
                            let s = self.undefined(n, false);
                            self.add_reloc(section, r.offset, elf::R_X86_64_PLT32, s, addend);
                        }
                        HostRef::Anchor(_) => {
                            let stub = self.stub(&h, 0);
                            self.add_reloc(section, r.offset, r.r_type, stub, addend);
                        }
                    }
                }
                elf::R_X86_64_GOTPCREL | elf::R_X86_64_GOTPCRELX | elf::R_X86_64_REX_GOTPCRELX => {
                    match &h {
                        HostRef::Named(n) if off == 0 => {
                            let s = self.undefined(n, false);
                            self.add_reloc(section, r.offset, r.r_type, s, r.addend);
                        }
                        _ => {
                            let cell = self.cell_in(false, &h, off as i64);
                            self.add_reloc(section, r.offset, elf::R_X86_64_PC32, cell, r.addend);
                        }
                    }
                }
                elf::R_X86_64_PC32 if let Some(function) = &function => {
                    // The instruction's effective address is S + A + 4
                    // when the displacement ends it.
                    match function.access(at) {
                        Access::Load if is_slot => {
                            let cell = self.cell_in(true, &h, addend + 4);
                            self.add_reloc(section, r.offset, elf::R_X86_64_PC32, cell, -4);
                        }
                        Access::Lea => {
                            riprel::lea_to_load(&mut bytes, at);
                            edited = true;
                            let cell = self.cell_in(false, &h, addend + 4);
                            self.add_reloc(section, r.offset, elf::R_X86_64_PC32, cell, -4);
                        }
                        _ => thunk_sites.push((at, h, addend)),
                    }
                }
                other => self.refusals.push(Refusal::Relocation {
                    owner: owner.clone(),
                    r_type: other,
                    target: describe(&name),
                }),
            }
        }
        if !thunk_sites.is_empty() {
            let sites: Vec<usize> = thunk_sites.iter().map(|s| s.0).collect();
            match riprel::rewrite(&bytes, &sites) {
                Ok(rewritten) => {
                    bytes = rewritten.code;
                    edited = true;
                    let self_sym = self.unit_symbol(u, 0);
                    for (thunk, (_, h, addend)) in rewritten.thunks.iter().zip(&thunk_sites) {
                        let ts = *self.thunk_section.get_or_insert_with(|| {
                            self.obj.add_section(
                                Vec::new(),
                                b".text.hotpatch_thunks".to_vec(),
                                SectionKind::Text,
                            )
                        });
                        let start = self.obj.append_section_data(ts, &thunk.bytes, 16);
                        let n = self.unit_syms.len() + self.stubs.len();
                        let tsym = self.local(
                            format!(".Lhotpatch.thunk.{n}"),
                            start,
                            thunk.bytes.len() as u64,
                            SymbolKind::Text,
                            ts,
                        );
                        self.add_reloc(
                            section,
                            thunk.jump_in_at as u64,
                            elf::R_X86_64_PC32,
                            tsym,
                            -4,
                        );
                        let cell = self.cell_in(false, h, addend + thunk.tail as i64);
                        self.add_reloc(
                            ts,
                            start + thunk.cell_at as u64,
                            elf::R_X86_64_PC32,
                            cell,
                            -4,
                        );
                        self.add_reloc(
                            ts,
                            start + thunk.back_at as u64,
                            elf::R_X86_64_PC32,
                            self_sym,
                            thunk.resume as i64 - 4,
                        );
                    }
                }
                Err(reason) => self.refusals.push(Refusal::Unredirectable {
                    owner: owner.clone(),
                    reason,
                }),
            }
        }
        if edited {
            self.obj
                .section_mut(section)
                .data_mut()
                .copy_from_slice(&bytes);
        }
        // The unwind information of a copied function, and what it uses.
        if code {
            self.copy_unwind_targets(u);
        }
    }

    /// The `PatchFn` records.
    fn write_records(&mut self, records: &[Record]) {
        if records.is_empty() {
            return;
        }
        let fns = self.obj.add_section(
            Vec::new(),
            FNS_SECTION.as_bytes().to_vec(),
            SectionKind::Data,
        );
        let names = self.obj.section_id(StandardSection::ReadOnlyData);
        for rec in records {
            let at = self.obj.append_section_data(fns, &[0; PATCH_FN_SIZE], 8);
            let name_at = self.obj.append_section_data(names, rec.path.as_bytes(), 1);
            let names_sym = self.obj.section_symbol(names);
            let getter = match self.host_ref(&rec.getter) {
                Some(h) => h,
                None => {
                    self.refusals.push(Refusal::NoEntryGetter {
                        getter: rec.getter.clone(),
                        path: rec.path.clone(),
                    });
                    continue;
                }
            };
            match getter {
                HostRef::Named(n) => {
                    let s = self.undefined(&n, false);
                    self.add_reloc(fns, at + PATCH_FN_TARGET, elf::R_X86_64_64, s, 0);
                }
                HostRef::Anchor(a) => {
                    let s = self.undefined(ANCHOR, false);
                    let v = a as i64 - self.host.anchor as i64;
                    self.add_reloc(fns, at + PATCH_FN_TARGET, elf::R_X86_64_64, s, v);
                }
            }
            let repl = self.unit_symbol(rec.replacement, 0);
            self.add_reloc(fns, at + PATCH_FN_REPLACEMENT, elf::R_X86_64_64, repl, 0);
            let name = at + PATCH_FN_NAME;
            self.add_reloc(fns, name, elf::R_X86_64_64, names_sym, name_at as i64);
            let layouts = self.unit_symbol(rec.layouts.0, 0);
            self.add_reloc(
                fns,
                at + PATCH_FN_LAYOUTS,
                elf::R_X86_64_64,
                layouts,
                rec.layouts.1 as i64,
            );
            let name_len = (rec.path.len() as u64).to_le_bytes();
            set(&mut self.obj, fns, name + LEN_AT, &name_len);
            let layouts_len = at + PATCH_FN_LAYOUTS + LEN_AT;
            set(
                &mut self.obj,
                fns,
                layouts_len,
                &rec.layouts_len.to_le_bytes(),
            );
        }
    }
}

impl Writer<'_, '_> {
    /// The `HookFn` records: each target bound to the host's function by
    /// its address in the deployed build (the anchor and a delta, as any
    /// private host symbol), the replacement to the copied body.
    fn write_hook_records(&mut self, hooks: &[HookRecord]) {
        if hooks.is_empty() {
            return;
        }
        let table = self.obj.add_section(
            Vec::new(),
            HOOKS_SECTION.as_bytes().to_vec(),
            SectionKind::Data,
        );
        let strings = self.obj.section_id(StandardSection::ReadOnlyData);
        let strings_sym = self.obj.section_symbol(strings);
        let anchor = self.undefined(ANCHOR, false);
        for hook in hooks {
            let at = self.obj.append_section_data(table, &[0; HOOK_FN_SIZE], 8);
            let delta = hook.address as i64 - self.host.anchor as i64;
            self.add_reloc(table, at + HOOK_FN_TARGET, elf::R_X86_64_64, anchor, delta);
            let repl = self.unit_symbol(hook.replacement, 0);
            self.add_reloc(table, at + HOOK_FN_REPLACEMENT, elf::R_X86_64_64, repl, 0);
            let name = format!("{} (new body)", hook.path);
            for (field, bytes) in [
                (HOOK_FN_ENTRY, &hook.entry[..]),
                (HOOK_FN_PATH, hook.path.as_bytes()),
                (HOOK_FN_NAME, name.as_bytes()),
            ] {
                let data_at = self.obj.append_section_data(strings, bytes, 1);
                self.add_reloc(
                    table,
                    at + field,
                    elf::R_X86_64_64,
                    strings_sym,
                    data_at as i64,
                );
                let len = (bytes.len() as u64).to_le_bytes();
                set(&mut self.obj, table, at + field + LEN_AT, &len);
            }
        }
    }
}

/// Writes bytes into a section's data at `at`.
fn set(obj: &mut write::Object<'static>, section: SectionId, at: u64, bytes: &[u8]) {
    let data = obj.section_mut(section).data_mut();
    data[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
}

/// `hotpatch::__private::SOURCE_PANICS`, by its mangled name.
fn is_source_panics(name: &str) -> bool {
    super::demangle(name) == "hotpatch::__private::SOURCE_PANICS"
}

/// Writes the patch object of `plan`: its replaced functions' counted
/// bodies with a `PatchFn` record each, and its included functions.
pub(super) fn write(
    head: &Build<'_>,
    host: &Host,
    plan: &Plan,
    noise: &BTreeSet<String>,
) -> Result<Extracted, BuildError> {
    let mut roots: HashSet<UnitId> = HashSet::new();
    let mut records = Vec::new();
    let mut refusals = Vec::new();
    for (name, e) in &plan.replaced {
        let Some(&u) = head.by_name.get(name) else {
            refusals.push(Refusal::Inconsistent {
                item: e.path.clone(),
                what: "replaced, but the head compiled no body of it",
            });
            continue;
        };
        roots.insert(u);
        let Some(getter) = &e.getter else {
            refusals.push(Refusal::EntryGetterNotCompiled {
                path: e.path.clone(),
            });
            continue;
        };
        let Some(layouts) = e.layouts else {
            refusals.push(Refusal::Inconsistent {
                item: e.path.clone(),
                what: "the head's registry entry has no argument layouts",
            });
            continue;
        };
        // The body under the patch's panic counter (the patch's copy of
        // `__hotpatch_counted_*` counts on the patch's own counter).
        let Some(counted) = e.counted.as_ref().and_then(|c| head.by_name.get(c)) else {
            return Err(BuildError::Io(format!(
                "the head build has no counted body of {} (a hotpatch older than this tool?)",
                e.path
            )));
        };
        roots.insert(*counted);
        records.push(Record {
            replacement: *counted,
            getter: getter.clone(),
            path: e.path.clone(),
            layouts,
            layouts_len: e.layouts_len,
        });
    }
    for name in &plan.included {
        match head.by_name.get(name) {
            Some(&u) => {
                roots.insert(u);
            }
            // The classifier includes only what the head compiled.
            None => refusals.push(Refusal::Inconsistent {
                item: describe(name),
                what: "included, but the head compiled no code of it",
            }),
        }
    }
    let mut hooks = Vec::new();
    for hook in &plan.hooked {
        // One of several copies: the body of its own codegen unit.
        let body = match &hook.body {
            Some((member, section)) => head
                .members
                .iter()
                .position(|m| m == member)
                .map(|oi| (oi, *section)),
            None => head.by_name.get(&hook.symbol).copied(),
        };
        match body {
            Some(u) => {
                roots.insert(u);
                hooks.push(HookRecord {
                    replacement: u,
                    address: hook.address,
                    entry: hook.entry.clone(),
                    path: describe(&hook.symbol),
                });
            }
            None => refusals.push(Refusal::Inconsistent {
                item: describe(&hook.symbol),
                what: "hooked, but the head compiled no code of it",
            }),
        }
    }
    if !refusals.is_empty() {
        return Err(BuildError::Refused(refusals));
    }
    extract(head, host, &roots, &records, &hooks, noise).map_err(BuildError::Refused)
}
