//! The `#[patchable]` registry entries of one build, read from its
//! objects: each function's path, its entry, original body, counted body,
//! entry getter and argument layouts. The offsets are the contract's
//! (crate `hotpatch-abi`), so a layout change is a compile error here.

use std::mem::offset_of;

use hotpatch_abi::RawEntry;

use super::objects::{self, Build, Referent, UnitId};

/// Where the fields read are in an entry (`repr(C)`, the contract's
/// layout): the path (`&str`), the layouts (`&[TypeLayout]`), the
/// original body and the counted body (the body under the patch's panic
/// counter).
const ENTRY_PATH_OFFSET: usize = offset_of!(RawEntry, path);
const ENTRY_LAYOUTS_OFFSET: usize = offset_of!(RawEntry, layouts);
const ENTRY_ORIGINAL_OFFSET: usize = offset_of!(RawEntry, original);
const ENTRY_COUNTED_OFFSET: usize = offset_of!(RawEntry, counted);
/// A `&str` or slice: its pointer, then its length.
const LEN_AT: usize = hotpatch_abi::LEN_OFFSET;

/// An entry of the registry in one build.
#[derive(Debug, Clone)]
pub(super) struct EntryInfo {
    pub path: String,
    pub entry: String,
    pub original: String,
    pub getter: Option<String>,
    /// `__hotpatch_counted_*`: what a patch installs (the body under its
    /// panic counter).
    pub counted: Option<String>,
    pub layouts: Option<(UnitId, u64)>,
    pub layouts_len: u64,
}

/// Every registry entry of the build.
pub(super) fn entries(b: &Build<'_>) -> Vec<EntryInfo> {
    let mut out = Vec::new();
    for (name, &u) in &b.by_name {
        if !name.contains("__HOTPATCH_ENTRY_") || b.is_code(u) {
            continue;
        }
        let bytes = b.bytes(u);
        if bytes.len() < ENTRY_ORIGINAL_OFFSET + 8 {
            continue;
        }
        let relocs = b.relocs.get(&u).cloned().unwrap_or_default();
        let at = |off: usize| relocs.iter().find(|r| r.offset as usize == off);
        let word = |off: usize| u64::from_le_bytes(bytes[off..off + 8].try_into().unwrap());
        let path = match at(ENTRY_PATH_OFFSET) {
            Some(objects::Reloc {
                target: Referent::Unit(t, toff),
                addend,
                ..
            }) => {
                let data = b.bytes(*t);
                let start = (*toff as i64 + addend) as usize;
                let len = word(ENTRY_PATH_OFFSET + LEN_AT) as usize;
                data.get(start..start + len)
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .unwrap_or_default()
            }
            _ => String::new(),
        };
        let layouts = match at(ENTRY_LAYOUTS_OFFSET) {
            Some(objects::Reloc {
                target: Referent::Unit(t, toff),
                addend,
                ..
            }) => Some((*t, (*toff as i64 + addend) as u64)),
            _ => None,
        };
        let original = match at(ENTRY_ORIGINAL_OFFSET) {
            Some(objects::Reloc {
                target: Referent::Unit(t, _),
                ..
            }) => b.name_of.get(t).cloned().unwrap_or_default(),
            _ => String::new(),
        };
        let counted = match at(ENTRY_COUNTED_OFFSET) {
            Some(objects::Reloc {
                target: Referent::Unit(t, _),
                ..
            }) => b.name_of.get(t).cloned(),
            _ => None,
        };
        // The getter: the function named `__hotpatch_entry_of_*` that
        // references this entry.
        let getter = b.functions().find_map(|(g, gu)| {
            (g.contains("__hotpatch_entry_of_")
                && b.relocs.get(gu).is_some_and(|rs| {
                    rs.iter()
                        .any(|r| matches!(r.target, Referent::Unit(t, _) if t == u))
                }))
            .then(|| g.clone())
        });
        out.push(EntryInfo {
            path,
            entry: name.clone(),
            original,
            getter,
            counted,
            layouts,
            layouts_len: word(ENTRY_LAYOUTS_OFFSET + LEN_AT),
        });
    }
    out
}

/// Code and data `#[patchable]` generates beside the user's function (its
/// dispatcher, counted body, entry getter and entry): they change with the
/// signature, which is refused on its own, and are never replaced or
/// included.
pub(super) fn is_generated(name: &str) -> bool {
    [
        "__hotpatch_dispatch_",
        "__hotpatch_counted_",
        "__hotpatch_entry_of_",
        "__HOTPATCH_ENTRY_",
        "__HOTPATCH_GETTER_",
    ]
    .iter()
    .any(|m| name.contains(m))
}
