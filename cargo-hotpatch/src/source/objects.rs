//! The compiled code of one build of the service's library, unit by unit.
//!
//! rustc puts every function and every data item in a section of its own
//! (`-ffunction-sections`/`-fdata-sections` are its defaults on Linux),
//! so a *unit* here is one section of one codegen unit's object. A unit
//! is named by the symbol it defines at its start: symbol names are the
//! same in two builds of one crate whatever their bodies (the hash in a
//! mangled name covers the item's path and the crate, not its code).
//! Anonymous constants (`.Lanon.*`, `alloc_*`: string literals, panic
//! locations, vtables) are named by nothing stable, so they are compared
//! by content, through the references that reach them.
//!
//! A function *changed* when its normalised code differs: the section's
//! bytes with every relocated field zeroed, and each relocation's type,
//! offset, addend and target, a named target by its name, an anonymous
//! one by its own normalised content (recursively). That sees what a
//! source diff cannot: an inlined callee, a changed `const`, a macro.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};

use object::elf;
use object::read::{Object, ObjectSection, ObjectSymbol, RelocationTarget, SectionIndex};
use object::{RelocationFlags, SectionFlags, SectionKind, SymbolKind};

/// A unit: (object index, section index).
pub(crate) type UnitId = (usize, SectionIndex);

/// Where a relocation points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Referent {
    /// A symbol no object of the crate defines (std, dependencies, libc).
    External(String),
    /// A unit of the crate, and the offset in it.
    Unit(UnitId, u64),
}

/// One relocation of a unit, resolved.
#[derive(Debug, Clone)]
pub(crate) struct Reloc {
    pub offset: u64,
    pub r_type: u32,
    pub addend: i64,
    pub target: Referent,
}

/// Whether a static is the per-call-site state of a logging macro
/// (`tracing`'s `__CALLSITE` and `META`): a patch's code gets its own,
/// which registers with the host's subscriber on first use like any new
/// call site, so it may change or be new.
pub(crate) fn is_callsite_static(name: &str) -> bool {
    let d = super::demangle(name);
    d.ends_with("::__CALLSITE") || d.ends_with("::META") || d.ends_with("::CALLSITE")
}

/// One build's units.
pub(crate) struct Build<'d> {
    pub objects: Vec<object::File<'d>>,
    /// Each object's member name (as given to [`Build::read`]).
    pub members: Vec<String>,
    /// Each object's first `STT_FILE` symbol: its codegen unit's name
    /// (`svc.1ef777fbbc7e6318-cgu.3`), which the linker keeps in the
    /// executable's symbol table before that unit's local symbols.
    pub unit_names: Vec<Option<String>>,
    /// The full name (`.llvm.<number>` suffix included) of the symbol
    /// that names each named unit.
    pub full_name_of: HashMap<UnitId, String>,
    /// Every named unit of each name: the copies several codegen units
    /// have (see [`Build::copies`]).
    copies_of: HashMap<String, Vec<UnitId>>,
    /// Unit named by each symbol defined at a unit's start.
    pub by_name: HashMap<String, UnitId>,
    /// The name of each named unit.
    pub name_of: HashMap<UnitId, String>,
    /// Every unit's resolved relocations.
    pub relocs: HashMap<UnitId, Vec<Reloc>>,
    /// Units holding thread-local data.
    pub tls: HashSet<UnitId>,
    hashes: std::cell::RefCell<HashMap<UnitId, u64>>,
}

/// A symbol's name without the `.llvm.<number>` suffix LLVM adds to a
/// local symbol that another codegen unit of the crate references: the
/// number hashes the unit's module, so it changes with any change of a
/// neighbour (or of the partitioning) while the function stays the same.
pub(crate) fn stem(name: &str) -> &str {
    match name.rsplit_once(".llvm.") {
        Some((stem, n)) if !stem.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => stem,
        _ => name,
    }
}

/// Whether a symbol name names nothing stable between two builds.
pub(crate) fn is_anonymous(name: &str) -> bool {
    name.is_empty()
        || name.starts_with(".L")
        || name.starts_with("anon.")
        || name.starts_with("alloc_")
        || name.starts_with("__unnamed_")
}

impl<'d> Build<'d> {
    /// Reads the objects (`(member name, bytes)` of the crate's rlib).
    pub fn read(members: &[(String, &'d [u8])]) -> Result<Build<'d>, String> {
        let mut objects = Vec::new();
        let mut unit_names = Vec::new();
        for (name, data) in members {
            let file = object::File::parse(*data).map_err(|e| format!("{name}: {e}"))?;
            unit_names.push(
                file.symbols()
                    .find(|s| s.kind() == SymbolKind::File)
                    .and_then(|s| s.name().ok().map(str::to_owned)),
            );
            objects.push(file);
        }
        let mut by_name = HashMap::new();
        let mut name_of = HashMap::new();
        let mut full_name_of = HashMap::new();
        let mut copies_of: HashMap<String, Vec<UnitId>> = HashMap::new();
        let mut tls = HashSet::new();
        // Every global symbol an object defines, where: another codegen
        // unit's reference to it (an anonymous constant shared across
        // units is global and named `anon.<unit>.<n>.llvm.<number>`, a
        // name no other build shares) is resolved to the unit itself.
        let mut defined: HashMap<String, (UnitId, u64)> = HashMap::new();
        for (oi, file) in objects.iter().enumerate() {
            // The best name of each section: a global symbol at offset 0
            // first, then a local one.
            let mut best: HashMap<SectionIndex, (bool, String, String)> = HashMap::new();
            for sym in file.symbols() {
                let Some(si) = sym.section_index() else {
                    continue;
                };
                if sym.kind() == SymbolKind::Section || sym.kind() == SymbolKind::File {
                    continue;
                }
                if sym.kind() == SymbolKind::Tls {
                    tls.insert((oi, si));
                }
                if sym.is_global()
                    && let Ok(name) = sym.name()
                {
                    defined
                        .entry(name.to_owned())
                        .or_insert(((oi, si), sym.address()));
                }
                if sym.address() != 0 {
                    continue;
                }
                let Ok(full) = sym.name() else { continue };
                let name = stem(full);
                if is_anonymous(name) {
                    continue;
                }
                let global = sym.is_global();
                match best.get(&si) {
                    Some((true, _, _)) => {}
                    Some((false, _, _)) if !global => {}
                    _ => {
                        best.insert(si, (global, name.to_owned(), full.to_owned()));
                    }
                }
            }
            let mut named: Vec<_> = best.into_iter().collect();
            named.sort_by_key(|(si, _)| si.0);
            for (si, (_, name, full)) in named {
                // A name defined in two objects (a COMDAT copy: generic
                // instances, inline functions) names the first.
                by_name.entry(name.clone()).or_insert((oi, si));
                copies_of.entry(name.clone()).or_default().push((oi, si));
                full_name_of.insert((oi, si), full);
                name_of.insert((oi, si), name);
            }
        }
        let mut build = Build {
            objects,
            members: members.iter().map(|(n, _)| n.clone()).collect(),
            unit_names,
            full_name_of,
            copies_of,
            by_name,
            name_of,
            relocs: HashMap::new(),
            tls,
            hashes: Default::default(),
        };
        let mut relocs = HashMap::new();
        for (oi, file) in build.objects.iter().enumerate() {
            for section in file.sections() {
                if !is_unit(&section) {
                    continue;
                }
                let mut list = Vec::new();
                for (offset, r) in section.relocations() {
                    let RelocationFlags::Elf { r_type } = r.flags() else {
                        return Err("not an ELF relocation".into());
                    };
                    let target = match r.target() {
                        RelocationTarget::Symbol(si) => {
                            let sym = file.symbol_by_index(si).map_err(|e| e.to_string())?;
                            if sym.kind() == SymbolKind::Section {
                                match sym.section_index() {
                                    Some(s) => Referent::Unit((oi, s), 0),
                                    None => return Err("section symbol without section".into()),
                                }
                            } else if let Some(s) = sym.section_index() {
                                let full = sym.name().unwrap_or("");
                                let name = stem(full);
                                // A defined global another object also
                                // defines under the same full name
                                // (COMDAT): the first copy. A copy of
                                // its own (a local function, or one
                                // promoted with its own `.llvm.<number>`)
                                // is this object's: the code that calls
                                // it was compiled against it.
                                match build.by_name.get(name) {
                                    Some(&u)
                                        if sym.address() == 0
                                            && !is_anonymous(name)
                                            && build.full_name_of.get(&u).map(String::as_str)
                                                == Some(full) =>
                                    {
                                        Referent::Unit(u, 0)
                                    }
                                    _ => Referent::Unit((oi, s), sym.address()),
                                }
                            } else {
                                // Undefined here, defined by another
                                // codegen unit of the crate, or external.
                                let full = sym.name().unwrap_or("");
                                let first = build.by_name.get(stem(full));
                                let exact = |u: &UnitId| {
                                    build.full_name_of.get(u).map(String::as_str) == Some(full)
                                };
                                match (first, defined.get(full)) {
                                    (Some(&u), _) if !is_anonymous(stem(full)) && exact(&u) => {
                                        Referent::Unit(u, 0)
                                    }
                                    // The copy of that full name (one
                                    // promoted with its own number).
                                    (_, Some(&(u, at))) => Referent::Unit(u, at),
                                    (Some(&u), _) if !is_anonymous(stem(full)) => {
                                        Referent::Unit(u, 0)
                                    }
                                    _ => Referent::External(full.to_owned()),
                                }
                            }
                        }
                        RelocationTarget::Section(s) => Referent::Unit((oi, s), 0),
                        _ => return Err("relocation to an absolute address".into()),
                    };
                    list.push(Reloc {
                        offset,
                        r_type,
                        addend: r.addend(),
                        target,
                    });
                }
                list.sort_by_key(|r| r.offset);
                relocs.insert((oi, section.index()), list);
            }
        }
        build.relocs = relocs;
        Ok(build)
    }

    pub fn section(&self, id: UnitId) -> object::Section<'d, '_> {
        self.objects[id.0]
            .section_by_index(id.1)
            .expect("unit ids come from the objects' own sections")
    }

    /// Whether the unit is code.
    pub fn is_code(&self, id: UnitId) -> bool {
        let s = self.section(id);
        matches!(s.flags(), SectionFlags::Elf { sh_flags } if sh_flags & u64::from(elf::SHF_EXECINSTR) != 0)
    }

    /// The unit's bytes (zeros for `.bss`).
    pub fn bytes(&self, id: UnitId) -> Vec<u8> {
        let s = self.section(id);
        if s.kind() == SectionKind::UninitializedData || s.kind() == SectionKind::UninitializedTls {
            return vec![0; s.size() as usize];
        }
        s.data().map(<[u8]>::to_vec).unwrap_or_default()
    }

    /// Every unit named `name`: the first, and the copies other codegen
    /// units have (an inline function's or generic instance's own copy).
    pub fn copies(&self, name: &str) -> Vec<UnitId> {
        self.copies_of.get(name).cloned().unwrap_or_default()
    }

    /// The distinct normalised contents of the copies of `name` (see
    /// [`Build::copies`]), sorted, without repeats: two builds whose sets
    /// differ compiled the function to code the other does not have in
    /// at least one codegen unit.
    pub fn copy_hashes(&self, name: &str) -> Vec<u64> {
        let mut hashes: Vec<u64> = self
            .copies_of
            .get(name)
            .into_iter()
            .flatten()
            .map(|u| self.hash(*u))
            .collect();
        hashes.sort_unstable();
        hashes.dedup();
        hashes
    }

    /// The codegen unit of object `oi`, for pairing it with the same unit
    /// of another build of the crate: its `STT_FILE` symbol, else its
    /// member's file name.
    pub fn unit_name(&self, oi: usize) -> &str {
        self.unit_names[oi].as_deref().unwrap_or_else(|| {
            let m = &self.members[oi];
            m.rsplit('/').next().unwrap_or(m)
        })
    }

    /// The names of what the units reference (functions, statics, external
    /// symbols; anonymous data by what it references in turn).
    pub fn named_targets(&self, units: &[UnitId]) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let mut seen: HashSet<UnitId> = units.iter().copied().collect();
        let mut stack: Vec<&Reloc> = units
            .iter()
            .filter_map(|u| self.relocs.get(u))
            .flatten()
            .collect();
        while let Some(r) = stack.pop() {
            match &r.target {
                Referent::External(name) => {
                    out.insert(stem(name).to_owned());
                }
                Referent::Unit(u, _) => match self.name_of.get(u) {
                    Some(name) => {
                        out.insert(name.clone());
                    }
                    None => {
                        if seen.insert(*u)
                            && let Some(more) = self.relocs.get(u)
                        {
                            stack.extend(more.iter());
                        }
                    }
                },
            }
        }
        out
    }

    /// The named units of code.
    pub fn functions(&self) -> impl Iterator<Item = (&String, &UnitId)> {
        self.by_name.iter().filter(|(_, u)| self.is_code(**u))
    }

    /// A target's stable description: the name and offset if the unit is
    /// named, else its content.
    fn target_key(&self, t: &Referent, h: &mut DefaultHasher, depth: usize) {
        match t {
            Referent::External(name) => {
                0u8.hash(h);
                stem(name).hash(h);
            }
            Referent::Unit(u, off) => match self.name_of.get(u) {
                Some(name) => {
                    1u8.hash(h);
                    name.hash(h);
                    off.hash(h);
                }
                None => {
                    2u8.hash(h);
                    off.hash(h);
                    self.hash_at(*u, depth + 1).hash(h);
                }
            },
        }
    }

    /// The normalised content of a unit.
    pub fn hash(&self, id: UnitId) -> u64 {
        self.hash_at(id, 0)
    }

    fn hash_at(&self, id: UnitId, depth: usize) -> u64 {
        if let Some(h) = self.hashes.borrow().get(&id) {
            return *h;
        }
        let mut h = DefaultHasher::new();
        if depth > 64 {
            // A cycle of anonymous data: stop at its size.
            self.section(id).size().hash(&mut h);
            return h.finish();
        }
        let mut bytes = self.bytes(id);
        let empty = Vec::new();
        let relocs = self.relocs.get(&id).unwrap_or(&empty);
        for r in relocs {
            let start = r.offset as usize;
            let end = (start + reloc_width(r.r_type)).min(bytes.len());
            bytes[start.min(end)..end].fill(0);
        }
        self.is_code(id).hash(&mut h);
        if self.is_location(id, relocs) {
            // A `core::panic::Location` (file, line, column): a comment or
            // a reformatting moves lines without changing any code, so
            // only its file counts.
            bytes[16..24].fill(0);
        }
        bytes.hash(&mut h);
        for r in relocs {
            r.offset.hash(&mut h);
            r.r_type.hash(&mut h);
            match self.merged_string(r) {
                // A string of a merged-strings section (file names of
                // panic locations): where it lands differs between builds.
                Some(s) => {
                    3u8.hash(&mut h);
                    s.hash(&mut h);
                }
                None => {
                    r.addend.hash(&mut h);
                    self.target_key(&r.target, &mut h, depth);
                }
            }
        }
        let v = h.finish();
        self.hashes.borrow_mut().insert(id, v);
        v
    }

    /// Whether an anonymous unit is a `core::panic::Location`: 24 bytes,
    /// a pointer to a file name ending in `.rs`, its length, line, column.
    fn is_location(&self, id: UnitId, relocs: &[Reloc]) -> bool {
        if self.name_of.contains_key(&id) || self.is_code(id) || self.section(id).size() != 24 {
            return false;
        }
        let [r] = relocs else { return false };
        if r.offset != 0 || r.r_type != elf::R_X86_64_64 {
            return false;
        }
        let bytes = self.bytes(id);
        let len = u64::from_le_bytes(bytes[8..16].try_into().unwrap_or_default()) as usize;
        let Referent::Unit(u, off) = &r.target else {
            return false;
        };
        let data = self.bytes(*u);
        let start = (*off as i64 + r.addend) as usize;
        data.get(start..start + len)
            .is_some_and(|f| f.ends_with(b".rs"))
    }

    /// The NUL-terminated string a relocation points at, if its target is
    /// a section of merged strings (`SHF_MERGE | SHF_STRINGS`), or the
    /// constant, in a section of merged constants of one size.
    fn merged_string(&self, r: &Reloc) -> Option<Vec<u8>> {
        let Referent::Unit(u, off) = &r.target else {
            return None;
        };
        let s = self.section(*u);
        let SectionFlags::Elf { sh_flags } = s.flags() else {
            return None;
        };
        if sh_flags & u64::from(elf::SHF_MERGE) == 0 {
            return None;
        }
        let strings = sh_flags & u64::from(elf::SHF_STRINGS) != 0;
        // Merged constants of one size (`.rodata.cst32`: a layout table,
        // a float): the one constant, wherever it landed.
        let entry_size = if strings {
            None
        } else {
            let name = s.name().ok()?;
            Some(name.rsplit_once(".cst")?.1.parse::<usize>().ok()?)
        };
        let pc_relative = matches!(
            r.r_type,
            elf::R_X86_64_PC32
                | elf::R_X86_64_PLT32
                | elf::R_X86_64_GOTPCREL
                | elf::R_X86_64_GOTPCRELX
                | elf::R_X86_64_REX_GOTPCRELX
        );
        let at = *off as i64 + r.addend + if pc_relative { 4 } else { 0 };
        let data = s.data().ok()?;
        let start = usize::try_from(at).ok().filter(|a| *a <= data.len())?;
        let end = match entry_size {
            Some(n) => (start + n).min(data.len()),
            None => data[start..]
                .iter()
                .position(|b| *b == 0)
                .map_or(data.len(), |p| start + p),
        };
        Some(data[start..end].to_vec())
    }

    /// For each named unit, the named units of code and data that
    /// reference it (through anonymous data too: a vtable's functions
    /// are referenced by whatever references the vtable).
    pub fn referrers(&self) -> HashMap<String, BTreeSet<String>> {
        let mut out: HashMap<String, BTreeSet<String>> = HashMap::new();
        for (id, relocs) in &self.relocs {
            let from = match self.name_of.get(id) {
                Some(n) => n.clone(),
                None => continue,
            };
            let mut seen = HashSet::new();
            let mut stack: Vec<&Reloc> = relocs.iter().collect();
            while let Some(r) = stack.pop() {
                if let Referent::Unit(u, _) = &r.target {
                    if let Some(to) = self.name_of.get(u) {
                        if to != &from {
                            out.entry(to.clone()).or_default().insert(from.clone());
                        }
                    } else if seen.insert(*u)
                        && let Some(more) = self.relocs.get(u)
                    {
                        stack.extend(more.iter());
                    }
                }
            }
        }
        out
    }
}

/// Sections that are units: code and data, not metadata.
fn is_unit(section: &object::Section<'_, '_>) -> bool {
    matches!(
        section.kind(),
        SectionKind::Text
            | SectionKind::Data
            | SectionKind::ReadOnlyData
            | SectionKind::ReadOnlyString
            | SectionKind::UninitializedData
            | SectionKind::Tls
            | SectionKind::UninitializedTls
            | SectionKind::ReadOnlyDataWithRel
    ) || section
        .name()
        .is_ok_and(|n| n.starts_with(".gcc_except_table") || n.starts_with("linkme"))
}

/// How many bytes a relocation of this type writes.
pub(crate) fn reloc_width(r_type: u32) -> usize {
    match r_type {
        elf::R_X86_64_64
        | elf::R_X86_64_DTPOFF64
        | elf::R_X86_64_TPOFF64
        | elf::R_X86_64_PC64
        | elf::R_X86_64_GOTOFF64
        | elf::R_X86_64_DTPMOD64 => 8,
        elf::R_X86_64_16 | elf::R_X86_64_PC16 => 2,
        elf::R_X86_64_8 | elf::R_X86_64_PC8 => 1,
        _ => 4,
    }
}

#[cfg(test)]
mod tests {
    use object::write::{Object as Writer, Relocation, Symbol, SymbolSection};
    use object::{Architecture, BinaryFormat, Endianness, SymbolFlags, SymbolScope};

    use super::*;

    const F: &str = "_ZN3svc1f17h0123456789abcdefE";
    const HELPER: &str = "_ZN3svc6helper17h0123456789abcdefE";

    fn symbol(name: &str, kind: SymbolKind, scope: SymbolScope, section: SymbolSection) -> Symbol {
        Symbol {
            name: name.as_bytes().to_vec(),
            value: 0,
            size: 0,
            kind,
            scope,
            weak: false,
            section,
            flags: SymbolFlags::None,
        }
    }

    /// Two codegen units as rustc splits a crate: the first's `svc::f`
    /// loads a constant and calls a helper that the second defines, under
    /// the names the build gave them (`.llvm.<number>` suffixes).
    fn units(constant: &str, helper: &str, text: &[u8]) -> [Vec<u8>; 2] {
        let new = || Writer::new(BinaryFormat::Elf, Architecture::X86_64, Endianness::Little);
        let mut a = new();
        let code = a.add_section(
            Vec::new(),
            format!(".text.{F}").into_bytes(),
            SectionKind::Text,
        );
        // lea rax, [rip + constant]; call helper; ret
        a.append_section_data(
            code,
            &[0x48, 0x8d, 0x05, 0, 0, 0, 0, 0xe8, 0, 0, 0, 0, 0xc3],
            16,
        );
        a.add_symbol(symbol(
            F,
            SymbolKind::Text,
            SymbolScope::Dynamic,
            SymbolSection::Section(code),
        ));
        for (at, name, r_type) in [
            (3, constant, elf::R_X86_64_PC32),
            (8, helper, elf::R_X86_64_PLT32),
        ] {
            let s = a.add_symbol(symbol(
                name,
                SymbolKind::Unknown,
                SymbolScope::Dynamic,
                SymbolSection::Undefined,
            ));
            a.add_relocation(
                code,
                Relocation {
                    offset: at,
                    symbol: s,
                    addend: -4,
                    flags: RelocationFlags::Elf { r_type },
                },
            )
            .unwrap();
        }
        let mut b = new();
        let data = b.add_section(
            Vec::new(),
            b".rodata..Lanon.1".to_vec(),
            SectionKind::ReadOnlyData,
        );
        b.append_section_data(data, text, 1);
        b.add_symbol(symbol(
            constant,
            SymbolKind::Data,
            SymbolScope::Linkage,
            SymbolSection::Section(data),
        ));
        let code = b.add_section(
            Vec::new(),
            format!(".text.{HELPER}").into_bytes(),
            SectionKind::Text,
        );
        b.append_section_data(code, &[0x31, 0xc0, 0xc3], 16);
        b.add_symbol(symbol(
            helper,
            SymbolKind::Text,
            SymbolScope::Linkage,
            SymbolSection::Section(code),
        ));
        [a.write().unwrap(), b.write().unwrap()]
    }

    fn read(objects: &[Vec<u8>; 2]) -> Build<'_> {
        Build::read(&[
            ("a.o".into(), &objects[0][..]),
            ("b.o".into(), &objects[1][..]),
        ])
        .unwrap()
    }

    #[test]
    fn names_a_neighbouring_unit_gives_are_no_change() {
        let base = units(
            "anon.1f2e.3.llvm.111",
            &format!("{HELPER}.llvm.111"),
            b"f: overflow",
        );
        let head = units(
            "anon.9a8b.3.llvm.222",
            &format!("{HELPER}.llvm.222"),
            b"f: overflow",
        );
        let (b, h) = (read(&base), read(&head));
        assert!(b.by_name.contains_key(HELPER) && h.by_name.contains_key(HELPER));
        assert_eq!(
            b.hash(b.by_name[F]),
            h.hash(h.by_name[F]),
            "same code, same constant"
        );
        assert_eq!(b.hash(b.by_name[HELPER]), h.hash(h.by_name[HELPER]));
    }

    #[test]
    fn a_changed_constant_of_a_neighbouring_unit_is_a_change() {
        let base = units(
            "anon.1f2e.3.llvm.111",
            &format!("{HELPER}.llvm.111"),
            b"f: overflow",
        );
        let head = units(
            "anon.1f2e.3.llvm.111",
            &format!("{HELPER}.llvm.111"),
            b"f: too big!",
        );
        let (b, h) = (read(&base), read(&head));
        assert_ne!(b.hash(b.by_name[F]), h.hash(h.by_name[F]));
    }

    #[test]
    fn stem_strips_only_a_numbered_llvm_suffix() {
        assert_eq!(stem("_ZN3svc1fE.llvm.123"), "_ZN3svc1fE");
        assert_eq!(stem("_ZN3svc1fE"), "_ZN3svc1fE");
        assert_eq!(stem("a.llvm.x1"), "a.llvm.x1");
        assert_eq!(stem(".llvm.1"), ".llvm.1");
    }
}
