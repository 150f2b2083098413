//! The patch's `.eh_frame`: the CIEs and FDEs of the copied functions,
//! taken from the head's objects with their relocations, so a panic
//! unwinds through patch code as through the service's.

use std::collections::{BTreeMap, HashMap};

use object::elf;
use object::read::{Object, ObjectSection, ObjectSymbol, RelocationTarget};
use object::{RelocationFlags, SectionFlags, SectionKind, SymbolKind};

use super::{HOOK_PERSONALITY_CELL, HostRef, Writer};
use crate::Refusal;
use crate::source::describe;
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
        // Offsets of the counting CIEs' personality pointers.
        let mut personalities: Vec<u64> = Vec::new();
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
            // Keyed by the CIE's offset and whether it is the counting copy.
            let mut cies: HashMap<(usize, bool), usize> = HashMap::new();
            // Every `at` was indexed by `index_fdes`, which checked that the
            // FDE and its CIE lie inside `data`.
            for (at, u) in fdes {
                let (Some(len), Some(id)) = (record_len(&data, at), word(&data, at + 4)) else {
                    continue;
                };
                let cie_at = at + 4 - id as usize;
                let Some(cie_len) = record_len(&data, cie_at) else {
                    continue;
                };
                // A hooked function's new body unwinds under the patch's
                // counting personality (`HOOK_PERSONALITY_CELL`).
                let counting = self.hook_bodies.contains(&u);
                let new_cie = match cies.get(&(cie_at, counting)) {
                    Some(n) => *n,
                    None => {
                        let n = out.len();
                        let cie = &data[cie_at..cie_at + 4 + cie_len];
                        let personality = if counting {
                            match counting_cie(cie) {
                                Ok((bytes, at)) => {
                                    out.extend_from_slice(&bytes);
                                    personalities.push((n + at) as u64);
                                    Some(at)
                                }
                                Err(reason) => {
                                    let owner = self.head.name_of.get(&u).map(|n| describe(n));
                                    self.refusals.push(Refusal::UncountedUnwind {
                                        owner: owner.unwrap_or_else(|| "a function".into()),
                                        reason,
                                    });
                                    continue;
                                }
                            }
                        } else {
                            out.extend_from_slice(cie);
                            None
                        };
                        for (o, t) in self.eh_relocs(oi, cie_at) {
                            // The personality pointer is the counting
                            // one's; a CIE without one has no relocation.
                            if personality == Some(o) {
                                continue;
                            }
                            if let Some(&(ty, a)) = addends.get(&((cie_at + o) as u64)) {
                                pending.push(((n + o) as u64, ty, t, a));
                            }
                        }
                        cies.insert((cie_at, counting), n);
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
        if !personalities.is_empty() {
            let cell = self.undefined(HOOK_PERSONALITY_CELL, false);
            for at in personalities {
                // `DW_EH_PE_indirect | pcrel | sdata4`: the field holds
                // the cell's distance; the cell holds the routine.
                self.add_reloc(eh, at, elf::R_X86_64_PC32, cell, 0);
            }
        }
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

/// `DW_EH_PE_indirect | DW_EH_PE_pcrel | DW_EH_PE_sdata4`: how rustc
/// (LLVM) encodes a CIE's personality pointer on x86-64.
const PERSONALITY_ENCODING: u8 = 0x9b;

/// The CIE `cie` (its whole record) with the patch's counting personality:
/// its own personality pointer (`zPLR`) or an added one (`zR` becomes
/// `zPR`), and the offset of that pointer's field in the new record. The
/// FDEs that use it are unchanged (an added `P` adds nothing to an FDE).
/// `Err` names a form this does not rewrite.
fn counting_cie(cie: &[u8]) -> Result<(Vec<u8>, usize), String> {
    let malformed = || "a CIE cut short".to_owned();
    let version = *cie.get(8).ok_or_else(malformed)?;
    let aug_start = 9;
    let nul = aug_start
        + cie[aug_start..]
            .iter()
            .position(|b| *b == 0)
            .ok_or_else(malformed)?;
    let augmentation = String::from_utf8_lossy(&cie[aug_start..nul]).into_owned();
    if !augmentation.starts_with('z') {
        return Err(format!("augmentation {augmentation:?} has no data length"));
    }
    let mut p = nul + 1;
    uleb(cie, &mut p).ok_or_else(malformed)?; // code alignment
    uleb(cie, &mut p).ok_or_else(malformed)?; // data alignment (its bytes)
    match version {
        1 => p += 1,
        _ => {
            uleb(cie, &mut p).ok_or_else(malformed)?;
        }
    }
    let len_at = p;
    let aug_len = uleb(cie, &mut p).ok_or_else(malformed)?;
    let data_at = p;
    // Where the personality pointer is, if the CIE has one.
    let mut q = data_at;
    let mut personality = None;
    for c in augmentation[1..].chars() {
        match c {
            'R' | 'L' => q += 1,
            'S' => {}
            'P' => {
                let encoding = *cie.get(q).ok_or_else(malformed)?;
                if encoding != PERSONALITY_ENCODING {
                    return Err(format!("personality encoding {encoding:#x}"));
                }
                personality = Some(q + 1);
                q += 5;
            }
            other => return Err(format!("augmentation {augmentation:?} ('{other}')")),
        }
    }
    if q != data_at + aug_len as usize || q > cie.len() {
        return Err(format!(
            "augmentation {augmentation:?} with {aug_len} bytes of data"
        ));
    }
    if let Some(at) = personality {
        return Ok((cie.to_vec(), at));
    }
    // No personality: `z` + `P` + the rest, and the pointer first in the
    // augmentation data (5 bytes more, one length byte as before).
    if aug_len + 5 >= 0x80 || len_at + 1 != data_at {
        return Err(format!(
            "augmentation {augmentation:?} with {aug_len} bytes of data"
        ));
    }
    let mut out = Vec::with_capacity(cie.len() + 12);
    out.extend_from_slice(&cie[..aug_start + 1]);
    out.push(b'P');
    out.extend_from_slice(&cie[aug_start + 1..len_at]);
    out.push((aug_len + 5) as u8);
    let pointer_at = out.len() + 1;
    out.extend_from_slice(&[PERSONALITY_ENCODING, 0, 0, 0, 0]);
    out.extend_from_slice(&cie[data_at..]);
    // Whole records of 4 bytes, padded with DW_CFA_nop.
    while out.len() % 4 != 0 {
        out.push(0);
    }
    let len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&len.to_le_bytes());
    Ok((out, pointer_at))
}

/// Reads an unsigned LEB128 at `*at`, moving past it.
fn uleb(data: &[u8], at: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *data.get(*at)?;
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A CIE as LLVM writes it for x86-64: `augmentation`, its data, and
    /// the initial instructions `def_cfa rsp+8; offset rip at cfa-8`.
    fn cie(augmentation: &str, data: &[u8]) -> Vec<u8> {
        let mut body = vec![0, 0, 0, 0, 1];
        body.extend_from_slice(augmentation.as_bytes());
        body.extend_from_slice(&[0, 1, 0x78, 0x10, data.len() as u8]);
        body.extend_from_slice(data);
        body.extend_from_slice(&[0x0c, 0x07, 0x08, 0x90, 0x01]);
        while (body.len() + 4) % 4 != 0 {
            body.push(0);
        }
        let mut out = (body.len() as u32).to_le_bytes().to_vec();
        out.extend(body);
        out
    }

    #[test]
    fn a_cie_without_personality_gains_the_counting_one() {
        let (out, at) = counting_cie(&cie("zR", &[0x1b])).unwrap();
        // "zPR": the pointer (to be relocated) first, then R's encoding;
        // the same instructions, then padding (DW_CFA_nop) to whole
        // 4-byte words, the length field saying so.
        let want = cie("zPR", &[0x9b, 0, 0, 0, 0, 0x1b]);
        let unpadded = 4 + 4 + 1 + 4 + 3 + 1 + 6 + 5;
        assert_eq!(out[4..unpadded], want[4..unpadded]);
        assert!(out[unpadded..].iter().all(|b| *b == 0));
        assert_eq!(out.len() % 4, 0);
        assert_eq!(out[at - 1], 0x9b);
        assert_eq!(&out[at..at + 4], &[0, 0, 0, 0]);
        assert_eq!(record_len(&out, 0), Some(out.len() - 4));
    }

    #[test]
    fn a_cie_with_a_personality_keeps_its_form_and_names_the_field() {
        let original = cie("zPLR", &[0x9b, 0xaa, 0xbb, 0xcc, 0xdd, 0x1b, 0x1b]);
        let (out, at) = counting_cie(&original).unwrap();
        assert_eq!(out, original);
        assert_eq!(&out[at..at + 4], &[0xaa, 0xbb, 0xcc, 0xdd]);
    }

    #[test]
    fn other_forms_are_refused_with_what_was_found() {
        let direct = cie("zPLR", &[0x1b, 0, 0, 0, 0, 0x1b, 0x1b]);
        assert!(counting_cie(&direct).unwrap_err().contains("0x1b"));
        let unknown = cie("zRX", &[0x1b]);
        assert!(counting_cie(&unknown).unwrap_err().contains("'X'"));
        let no_z = cie("eh", &[]);
        assert!(counting_cie(&no_z).is_err());
        assert!(counting_cie(&cie("zR", &[0x1b])[..9]).is_err());
    }
}
