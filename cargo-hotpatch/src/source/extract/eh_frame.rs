//! The patch's `.eh_frame`: the CIEs and FDEs of the copied functions,
//! taken from the head's objects with their relocations, so a panic
//! unwinds through patch code as through the service's.

use std::collections::{BTreeMap, HashMap};

use object::elf;
use object::read::{Object, ObjectSection, ObjectSymbol, RelocationTarget};
use object::{RelocationFlags, SectionFlags, SectionKind, SymbolKind};

use super::{HostRef, Writer};
use crate::Refusal;
use crate::source::objects::{Referent, UnitId};

impl Writer<'_, '_> {
    /// Copies what a copied function's unwind information uses: the
    /// FDE's targets (the function, its LSDA) and its CIE's (the
    /// personality's `DW.ref` cell).
    pub(super) fn copy_unwind_targets(&mut self, u: UnitId) {
        let Some(&(oi, at)) = self.fdes.get(&u) else {
            return;
        };
        let data = self.head.objects[oi]
            .section_by_name(".eh_frame")
            .and_then(|s| s.data().ok())
            .unwrap_or_default();
        let cie_at = at + 4 - word(data, at + 4).unwrap_or(0) as usize;
        let mut targets = self.eh_relocs(oi, at);
        targets.extend(self.eh_relocs(oi, cie_at));
        for (_, target) in targets {
            if let Referent::Unit(t, _) = target {
                let named = self.head.name_of.get(&t);
                if t == u || named.is_none_or(|n| n.starts_with("DW.ref.")) {
                    self.copy(t);
                }
            }
        }
    }

    /// Finds each function's FDE in each object's `.eh_frame`.
    pub(super) fn index_fdes(&mut self) {
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
    fn eh_relocs(&self, oi: usize, at: usize) -> Vec<(usize, Referent)> {
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
                        Some(s) => Referent::Unit((oi, s), r.addend() as u64),
                        None => continue,
                    },
                    Ok(sym) => match sym.section_index() {
                        Some(s) => Referent::Unit((oi, s), sym.address()),
                        None => Referent::External(sym.name().unwrap_or("").to_owned()),
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
    pub(super) fn write_eh_frame(&mut self) {
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
        let mut pending: Vec<(u64, u32, Referent, i64)> = Vec::new();
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
                Referent::Unit(u, _) => (self.unit_symbol(u, 0), addend),
                Referent::External(name) => {
                    let h = self.host_ref(&name).unwrap_or(HostRef::Named(name.clone()));
                    match h {
                        HostRef::Named(n) => (self.undefined(&n, false), addend),
                        HostRef::Anchor(_) => {
                            self.refusals.push(Refusal::UnwindTarget { symbol: name });
                            continue;
                        }
                    }
                }
            };
            self.add_reloc(eh, offset, ty, sym, addend);
        }
    }
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
