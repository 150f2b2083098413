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
//!   thunk that does the same through the cell (see `riprel.rs`).
//! - a load of a `#[patchable]` slot by an inlined wrapper reads a cell of
//!   the patch's `SlotRef` table instead, which the loader fills with the
//!   host's out-of-line wrapper (as `slotrefs.rs` does for patch crates).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use object::elf;
use object::read::{Object, ObjectSection, ObjectSymbol, RelocationTarget};
use object::write::{
    self, Relocation, SectionId, StandardSection, Symbol, SymbolId, SymbolSection,
};
use object::{
    Architecture, BinaryFormat, Endianness, RelocationFlags, SectionFlags, SectionKind,
    SymbolFlags, SymbolKind, SymbolScope,
};

use super::objects::{Build, Target, UnitId, is_callsite_static};

/// The size of `hotpatch::__private::PatchFn` (`repr(C)`: target getter,
/// replacement, name as `&str`, layouts as `&[TypeLayout]`).
pub const PATCH_FN_SIZE: usize = 48;

/// What the running binary has, from the base build's binary.
pub(crate) struct Host {
    /// Names the binary exports (defined, in `.dynsym`).
    pub exported: HashSet<String>,
    /// Every defined symbol's address (`.symtab`).
    pub address: HashMap<String, u64>,
    /// Thread-local symbols.
    pub tls: HashSet<String>,
    /// The address of `hotpatch_host_exports_v1`.
    pub anchor: u64,
}

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

/// The object, and the functions it copied beyond the roots.
pub(crate) struct Extracted {
    pub object: Vec<u8>,
    /// Named functions copied because the base binary lacks them.
    pub new_functions: Vec<String>,
    /// Host symbols reached through cells (not exported by the binary).
    pub private_refs: usize,
}

const ANCHOR: &str = "hotpatch_host_exports_v1";
/// The patch's cell holding the address of its own panic counter (defined
/// by the manifest object): what the copied counted bodies' references to
/// the service's `SOURCE_PANICS` become.
pub(crate) const PANICS_CELL: &str = "hotpatch_source_panics_v1";
const REFS_SECTION: &str = "linkme___HOTPATCH_REFS";
const FNS_SECTION: &str = "linkme___HOTPATCH_PATCH_FNS";

#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum HostRef {
    Named(String),
    Anchor(u64),
}

struct Writer<'a, 'd> {
    head: &'a Build<'d>,
    host: &'a Host,
    roots: &'a HashSet<UnitId>,
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
    refusals: Vec<String>,
    private_refs: HashSet<(HostRef, i64)>,
}

/// Writes the patch object.
pub(crate) fn extract(
    head: &Build<'_>,
    host: &Host,
    roots: &HashSet<UnitId>,
    records: &[Record],
    describe: &dyn Fn(&str) -> String,
) -> Result<Extracted, Vec<String>> {
    let mut w = Writer {
        head,
        host,
        roots,
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
        w.relocate(u, describe);
    }
    w.write_records(records);
    w.write_eh_frame();
    // What the unwind information reaches (the personality's cell).
    while let Some(u) = w.queue.pop_front() {
        w.relocate(u, describe);
    }
    if !w.refusals.is_empty() {
        w.refusals.sort();
        w.refusals.dedup();
        return Err(w.refusals);
    }
    let private_refs = w.private_refs.len();
    let mut new_functions = w.new_functions.clone();
    new_functions.sort();
    let object = w
        .obj
        .write()
        .map_err(|e| vec![format!("writing the patch object: {e}")])?;
    Ok(Extracted {
        object,
        new_functions,
        private_refs,
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
        self.roots.contains(&u) || self.host_ref(name).is_none()
    }

    /// Writes a copied unit's relocations.
    fn relocate(&mut self, u: UnitId, describe: &dyn Fn(&str) -> String) {
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
        let mut thunk_sites: Vec<(usize, HostRef, i64)> = Vec::new();
        let mut edited = false;
        for r in &relocs {
            // Resolve: copied (local) or the host's.
            let (local, host, tls) = match &r.target {
                Target::External(name) => {
                    let tls = self.host.tls.contains(name);
                    let host = self
                        .host_ref(name)
                        .unwrap_or_else(|| HostRef::Named(name.clone()));
                    (None, Some((host, name.clone(), 0u64)), tls)
                }
                Target::Unit(t, off) => {
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
                                        self.refusals.push(format!(
                                            "{owner} uses {}, which the running binary does not have (a new or changed static or thread-local): a patch cannot add state; keep the fix to code, or ship it in a release",
                                            describe(&name)
                                        ));
                                        continue;
                                    }
                                }
                            } else if is_callsite_static(&name) || self.copies_named(*t, &name) {
                                if !self.roots.contains(t)
                                    && self.head.is_code(*t)
                                    && !self.copies.contains_key(t)
                                {
                                    self.new_functions.push(name.clone());
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
                    self.refusals.push(format!(
                        "{owner} uses a thread-local of its own the running binary does not have: a patch cannot add thread-local state"
                    ));
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
                    elf::R_X86_64_GOTPCREL | elf::R_X86_64_GOTPCRELX | elf::R_X86_64_REX_GOTPCRELX => {
                        let cell = self.undefined(PANICS_CELL, false);
                        self.add_reloc(section, r.offset, elf::R_X86_64_PC32, cell, r.addend);
                    }
                    other => self.refusals.push(format!(
                        "{owner} reaches the panic counter by a relocation of type {other}, which the patch cannot redirect to its own"
                    )),
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
                    _ => self.refusals.push(format!(
                        "{owner} uses the thread-local {} of the service, which the binary does not export: a patch reaches a thread-local only by its exported symbol; make it reachable from another crate (e.g. `pub`), or keep the change out of code that touches it",
                        describe(&name)
                    )),
                },
                elf::R_X86_64_PLT32 | elf::R_X86_64_PC32 if code && is_branch(&bytes, at) => {
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
                elf::R_X86_64_PC32 if code && at >= 2 => {
                    // The instruction's effective address is S + A + 4
                    // when the displacement ends it.
                    if is_slot && bytes[at - 2] == 0x8b && bytes[at - 1] & 0xc7 == 0x05 {
                        let cell = self.cell_in(true, &h, addend + 4);
                        self.add_reloc(section, r.offset, elf::R_X86_64_PC32, cell, -4);
                    } else if bytes[at - 2] == 0x8d && bytes[at - 1] & 0xc7 == 0x05 {
                        bytes[at - 2] = 0x8b;
                        edited = true;
                        let cell = self.cell_in(false, &h, addend + 4);
                        self.add_reloc(section, r.offset, elf::R_X86_64_PC32, cell, -4);
                    } else {
                        thunk_sites.push((at, h, addend));
                    }
                }
                other => self.refusals.push(format!(
                    "{owner} has a relocation of type {other} against {}, which a patch cannot carry to the running binary",
                    describe(&name)
                )),
            }
        }
        if !thunk_sites.is_empty() {
            let sites: Vec<usize> = thunk_sites.iter().map(|s| s.0).collect();
            match crate::riprel::rewrite(&bytes, &sites) {
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
                        let tsym = self.local(format!(".Lhotpatch.thunk.{n}"), start, thunk.bytes.len() as u64, SymbolKind::Text, ts);
                        self.add_reloc(section, thunk.jump_in_at as u64, elf::R_X86_64_PC32, tsym, -4);
                        let cell = self.cell_in(false, h, addend + thunk.tail as i64);
                        self.add_reloc(ts, start + thunk.cell_at as u64, elf::R_X86_64_PC32, cell, -4);
                        self.add_reloc(
                            ts,
                            start + thunk.back_at as u64,
                            elf::R_X86_64_PC32,
                            self_sym,
                            thunk.resume as i64 - 4,
                        );
                    }
                }
                Err(e) => self.refusals.push(format!(
                    "{owner} reads or writes private data of the service in a way a patch cannot redirect ({e}): make the data reachable from another crate (e.g. `pub`), or keep the change out of this function"
                )),
            }
        }
        if edited {
            self.obj
                .section_mut(section)
                .data_mut()
                .copy_from_slice(&bytes);
        }
        // The unwind information of a copied function, and what it uses.
        if code && let Some(&(oi, at)) = self.fdes.get(&u) {
            // The FDE's targets (the function, its LSDA) and its CIE's
            // (the personality's `DW.ref` cell) are copied.
            let data = self.head.objects[oi]
                .section_by_name(".eh_frame")
                .and_then(|s| s.data().ok())
                .unwrap_or_default();
            let cie_at = at + 4 - word(data, at + 4).unwrap_or(0) as usize;
            let mut targets = self.eh_relocs(oi, at);
            targets.extend(self.eh_relocs(oi, cie_at));
            for (_, target) in targets {
                if let Target::Unit(t, _) = target {
                    let named = self.head.name_of.get(&t);
                    if t == u || named.is_none_or(|n| n.starts_with("DW.ref.")) {
                        self.copy(t);
                    }
                }
            }
        }
    }

    /// Finds each function's FDE in each object's `.eh_frame`.
    fn index_fdes(&mut self) {
        for (oi, file) in self.head.objects.iter().enumerate() {
            let Some(eh) = file.section_by_name(".eh_frame") else {
                continue;
            };
            let Ok(data) = eh.data() else { continue };
            let relocs: HashMap<u64, RelocationTarget> =
                eh.relocations().map(|(o, r)| (o, r.target())).collect();
            let mut pos = 0usize;
            // Only records that lie whole inside the section, and FDEs whose
            // CIE does, are indexed: the copying below then slices within
            // bounds (rustc's output always qualifies; a record that does
            // not ends the walk rather than the tool).
            while let Some(len) = record_len(data, pos) {
                let id = word(data, pos + 4).unwrap_or(0) as usize;
                if id != 0
                    && let Some(cie_at) = (pos + 4).checked_sub(id)
                    && record_len(data, cie_at).is_some()
                    && let Some(RelocationTarget::Symbol(si)) = relocs.get(&(pos as u64 + 8))
                    && let Ok(sym) = file.symbol_by_index(*si)
                    && let Some(s) = sym.section_index()
                {
                    self.fdes.insert((oi, s), (oi, pos));
                }
                pos += 4 + len;
            }
        }
    }

    /// The relocations of the `.eh_frame` record at `at` of object `oi`:
    /// (offset in the record, target).
    fn eh_relocs(&self, oi: usize, at: usize) -> Vec<(usize, Target)> {
        let file = &self.head.objects[oi];
        let Some(eh) = file.section_by_name(".eh_frame") else {
            return Vec::new();
        };
        let data = eh.data().unwrap_or_default();
        let Some(len) = record_len(data, at) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (o, r) in eh.relocations() {
            let o = o as usize;
            if o < at || o >= at + 4 + len {
                continue;
            }
            let target = match r.target() {
                RelocationTarget::Symbol(si) => match file.symbol_by_index(si) {
                    Ok(sym) if sym.kind() == SymbolKind::Section => match sym.section_index() {
                        Some(s) => Target::Unit((oi, s), r.addend() as u64),
                        None => continue,
                    },
                    Ok(sym) => match sym.section_index() {
                        Some(s) => Target::Unit((oi, s), sym.address()),
                        None => Target::External(sym.name().unwrap_or("").to_owned()),
                    },
                    Err(_) => continue,
                },
                _ => continue,
            };
            out.push((o - at, target));
        }
        out
    }

    /// Copies the CIEs and FDEs of the copied functions into `.eh_frame`.
    fn write_eh_frame(&mut self) {
        let mut by_object: BTreeMap<usize, Vec<(usize, UnitId)>> = BTreeMap::new();
        for (u, (oi, at)) in &self.fdes {
            if self.copies.contains_key(u) && self.head.is_code(*u) {
                by_object.entry(*oi).or_default().push((*at, *u));
            }
        }
        if by_object.is_empty() {
            return;
        }
        let eh = self
            .obj
            .add_section(Vec::new(), b".eh_frame".to_vec(), SectionKind::ReadOnlyData);
        self.obj.section_mut(eh).flags = SectionFlags::Elf {
            sh_flags: u64::from(elf::SHF_ALLOC),
        };
        let mut out: Vec<u8> = Vec::new();
        let mut pending: Vec<(u64, u32, Target, i64)> = Vec::new();
        for (oi, mut fdes) in by_object {
            fdes.sort_by_key(|f| f.0);
            let file = &self.head.objects[oi];
            let Some(eh_in) = file.section_by_name(".eh_frame") else {
                continue;
            };
            let data = eh_in.data().unwrap_or_default().to_vec();
            let addends: HashMap<u64, (u32, i64)> = eh_in
                .relocations()
                .filter_map(|(o, r)| match r.flags() {
                    RelocationFlags::Elf { r_type } => Some((o, (r_type, r.addend()))),
                    _ => None,
                })
                .collect();
            let mut cies: HashMap<usize, usize> = HashMap::new();
            // Every `at` was indexed by `index_fdes`, which checked that the
            // FDE and its CIE lie inside `data`.
            for (at, _) in fdes {
                let (Some(len), Some(id)) = (record_len(&data, at), word(&data, at + 4)) else {
                    continue;
                };
                let cie_at = at + 4 - id as usize;
                let Some(cie_len) = record_len(&data, cie_at) else {
                    continue;
                };
                let new_cie = match cies.get(&cie_at) {
                    Some(n) => *n,
                    None => {
                        let n = out.len();
                        out.extend_from_slice(&data[cie_at..cie_at + 4 + cie_len]);
                        for (o, t) in self.eh_relocs(oi, cie_at) {
                            if let Some(&(ty, a)) = addends.get(&((cie_at + o) as u64)) {
                                pending.push(((n + o) as u64, ty, t, a));
                            }
                        }
                        cies.insert(cie_at, n);
                        n
                    }
                };
                let n = out.len();
                out.extend_from_slice(&data[at..at + 4 + len]);
                let ptr = (n + 4 - new_cie) as u32;
                out[n + 4..n + 8].copy_from_slice(&ptr.to_le_bytes());
                for (o, t) in self.eh_relocs(oi, at) {
                    if let Some(&(ty, a)) = addends.get(&((at + o) as u64)) {
                        pending.push(((n + o) as u64, ty, t, a));
                    }
                }
            }
        }
        out.extend_from_slice(&[0; 4]);
        self.obj.section_mut(eh).set_data(out, 8);
        for (offset, ty, target, addend) in pending {
            let (sym, addend) = match target {
                // A section-symbol target carries its offset in the addend
                // already; a named one is at offset 0 of its unit.
                Target::Unit(u, _) => (self.unit_symbol(u, 0), addend),
                Target::External(name) => {
                    let h = self.host_ref(&name).unwrap_or(HostRef::Named(name.clone()));
                    match h {
                        HostRef::Named(n) => (self.undefined(&n, false), addend),
                        HostRef::Anchor(_) => {
                            self.refusals.push(format!(
                                "unwind information refers to {name}, which the binary does not export"
                            ));
                            continue;
                        }
                    }
                }
            };
            self.add_reloc(eh, offset, ty, sym, addend);
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
                    self.refusals.push(format!(
                        "the running binary has no entry getter {} for {}",
                        rec.getter, rec.path
                    ));
                    continue;
                }
            };
            match getter {
                HostRef::Named(n) => {
                    let s = self.undefined(&n, false);
                    self.add_reloc(fns, at, elf::R_X86_64_64, s, 0);
                }
                HostRef::Anchor(a) => {
                    let s = self.undefined(ANCHOR, false);
                    let v = a as i64 - self.host.anchor as i64;
                    self.add_reloc(fns, at, elf::R_X86_64_64, s, v);
                }
            }
            let repl = self.unit_symbol(rec.replacement, 0);
            self.add_reloc(fns, at + 8, elf::R_X86_64_64, repl, 0);
            self.add_reloc(fns, at + 16, elf::R_X86_64_64, names_sym, name_at as i64);
            let layouts = self.unit_symbol(rec.layouts.0, 0);
            self.add_reloc(
                fns,
                at + 32,
                elf::R_X86_64_64,
                layouts,
                rec.layouts.1 as i64,
            );
            let mut lens = [0u8; 8];
            lens.copy_from_slice(&(rec.path.len() as u64).to_le_bytes());
            set(&mut self.obj, fns, at + 24, &lens);
            set(&mut self.obj, fns, at + 40, &rec.layouts_len.to_le_bytes());
        }
    }
}

/// Writes bytes into a section's data at `at`.
fn set(obj: &mut write::Object<'static>, section: SectionId, at: u64, bytes: &[u8]) {
    let data = obj.section_mut(section).data_mut();
    data[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
}

/// Whether the 4 bytes at `at` are the displacement of a `call`/`jmp`
/// rel32 or a conditional jump.
fn is_branch(bytes: &[u8], at: usize) -> bool {
    (at >= 1 && matches!(bytes[at - 1], 0xe8 | 0xe9))
        || (at >= 2 && bytes[at - 2] == 0x0f && (0x80..=0x8f).contains(&bytes[at - 1]))
}

/// `hotpatch::__private::SOURCE_PANICS`, by its mangled name.
fn is_source_panics(name: &str) -> bool {
    super::demangle(name) == "hotpatch::__private::SOURCE_PANICS"
}

/// The little-endian `u32` at `at` of `data`, if it is inside.
fn word(data: &[u8], at: usize) -> Option<u32> {
    let bytes = data.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

/// The length field of the `.eh_frame` record (CIE or FDE) at `at`, when the
/// whole record, with its id word, lies inside `data` (a zero terminator or a
/// 64-bit length, which rustc never emits, is `None`).
fn record_len(data: &[u8], at: usize) -> Option<usize> {
    let len = word(data, at)? as usize;
    if len < 4 || len == 0xffff_ffff || at.checked_add(4 + len)? > data.len() {
        return None;
    }
    Some(len)
}
