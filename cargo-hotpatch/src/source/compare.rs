//! Step 8: the service library's compiled objects of base and head,
//! compared function by function (bytes and relocations by symbol name,
//! constants by content), and their data: a changed static or registry
//! entry is refused here.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use super::describe;
use super::entries::{EntryInfo, entries, is_generated};
use super::lines::Lines;
use super::objects::{self, Build};
use crate::error::io;
use crate::syntax::LineRanges;
use crate::{BuildError, Refusal};

/// One side's rlib, read: the objects borrow its bytes.
pub(super) struct Rlib {
    path: PathBuf,
    bytes: Vec<u8>,
}

impl Rlib {
    pub fn read(path: &Path) -> Result<Rlib, BuildError> {
        let bytes = std::fs::read(path).map_err(io(path.display()))?;
        Ok(Rlib {
            path: path.to_owned(),
            bytes,
        })
    }

    /// The library's own objects, borrowed from the rlib's bytes.
    pub fn objects(&self) -> Result<Build<'_>, BuildError> {
        let members = self.members()?;
        Build::read(&members).map_err(|e| BuildError::Io(format!("{}: {e}", self.path.display())))
    }

    /// The library's own objects, `(name, bytes)`.
    pub fn members(&self) -> Result<Vec<(String, &[u8])>, BuildError> {
        Ok(crate::link::own_objects(&self.path, &self.bytes)?)
    }
}

/// What the comparisons of code compiled outside the service library
/// (the executable's own crate, the workspace's other libraries) need:
/// where a function is in the head's sources (`FILE:LINE`), where the
/// change is, and the workspace root the line tables name files from.
pub(super) struct Outside<'a> {
    pub locate: &'a dyn Fn(&str) -> Option<String>,
    pub ranges: Option<(&'a LineRanges, &'a LineRanges)>,
    pub added_or_removed: &'a dyn Fn(&str) -> bool,
    pub root: &'a Path,
}

impl Outside<'_> {
    /// Each function whose code changed between `b` and `h` (not only how
    /// it was compiled, by `lines`, the line tables of `b` and `h`: that
    /// goes to `noise`), with the refusal `refusal` makes of it (given the
    /// function as the user knows it and ` (FILE:LINE)` or nothing) if it
    /// cannot be hooked.
    fn changes(
        &self,
        b: &Build<'_>,
        h: &Build<'_>,
        (base_lines, head_lines): (Lines, Lines),
        noise: &mut BTreeSet<String>,
        refusal: impl Fn(String, String) -> Refusal,
    ) -> Vec<OutsideChange> {
        let site = ChangeSite {
            ranges: self.ranges,
            base_lines: &base_lines,
            head_lines: &head_lines,
            added_or_removed: self.added_or_removed,
        };
        let mut changes = Vec::new();
        for fname in changed_functions(b, h) {
            if site.is_noise(b, h, fname) {
                noise.insert(fname.clone());
                continue;
            }
            let at = (self.locate)(&super::demangle(fname))
                .map(|l| format!(" ({l})"))
                .unwrap_or_default();
            changes.push(OutsideChange {
                symbol: fname.clone(),
                refusal: refusal(describe(fname), at),
            });
        }
        changes
    }
}

/// A function compiled outside the service library whose code changed:
/// hooked if it can be, else refused with `refusal`.
pub(super) struct OutsideChange {
    /// Its symbol.
    pub symbol: String,
    /// What refuses it if it cannot be hooked.
    pub refusal: Refusal,
}

/// The objects of code compiled outside the service library (the
/// executable's own crate, or another package's library), base and head:
/// where a hooked function's new body is copied from.
pub(super) struct OutsideObjects {
    /// What they are, for messages (`the executable svc`, `package util`).
    pub what: String,
    /// The executable's or the package's name.
    pub name: String,
    /// The package, for another package's library; `None` for the
    /// executable's crate.
    pub package: Option<String>,
    /// The executable's crate name, as symbols spell it (`None` for a
    /// library).
    pub crate_name: Option<String>,
    /// `(name, bytes)` of each object, base.
    pub base: Objects,
    /// The same, head.
    pub head: Objects,
    /// The objects of their type-information builds, base and head
    /// (`coroutine`), once made (`sides::type_builds`).
    pub types: Option<(Objects, Objects)>,
}

/// Objects read into memory: `(name, bytes)` each.
pub(super) type Objects = Vec<(String, Vec<u8>)>;

impl OutsideObjects {
    /// Borrowed as `Build::read` takes them.
    pub fn members(side: &[(String, Vec<u8>)]) -> Vec<(String, &[u8])> {
        side.iter().map(|(n, b)| (n.clone(), &b[..])).collect()
    }
}

/// The named functions whose normalised code differs between `b` and `h`
/// in any of their copies (a copy one codegen unit compiled differently,
/// with a changed callee inlined into it, runs other code too): the set
/// of distinct bodies differs. One more or one less copy of a body both
/// builds have (a unit that gained or lost a caller of it), or bodies
/// that moved between units, is no new code.
pub(super) fn changed_functions<'h>(
    b: &Build<'_>,
    h: &'h Build<'_>,
) -> impl Iterator<Item = &'h String> {
    h.functions().filter_map(move |(name, _)| {
        let &bu = b.by_name.get(name)?;
        (b.is_code(bu) && b.copy_hashes(name) != h.copy_hashes(name)).then_some(name)
    })
}

/// The objects of the executable's own crate (kept by the wrapper) of
/// the base and the head compared: a function whose code changed there
/// (the executable's own code, or the library's generic or inline code
/// compiled into it) is hooked if it can be, else refused by name and
/// place.
pub(super) fn binary_crate(
    base_exe: &Path,
    head_bins: &[PathBuf],
    outside: &Outside<'_>,
    noise: &mut BTreeSet<String>,
) -> Result<(Vec<OutsideChange>, OutsideObjects), BuildError> {
    let name = base_exe
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let missing = |what: &'static str| {
        BuildError::Refused(vec![Refusal::Inconsistent {
            item: name.clone(),
            what,
        }])
    };
    let head_exe = head_bins
        .iter()
        .find(|b| b.file_name() == base_exe.file_name())
        .ok_or_else(|| missing("the head built no executable of this name"))?;
    let read = |exe: &Path| -> Result<Vec<(String, Vec<u8>)>, BuildError> {
        let objects = super::wrapper::bin_objects(exe);
        if objects.is_empty() {
            return Err(missing(
                "the build kept no object of the executable's own crate to compare",
            ));
        }
        objects
            .iter()
            .map(|p| {
                let bytes = std::fs::read(p).map_err(io(p.display()))?;
                Ok((p.display().to_string(), bytes))
            })
            .collect()
    };
    let (bo, ho) = (read(base_exe)?, read(head_exe)?);

    let (bm, hm) = (OutsideObjects::members(&bo), OutsideObjects::members(&ho));
    let b = Build::read(&bm).map_err(BuildError::Io)?;
    let h = Build::read(&hm).map_err(BuildError::Io)?;
    let lines = (
        binary_lines(&b, base_exe, outside.root)?,
        binary_lines(&h, head_exe, outside.root)?,
    );
    let changes = outside.changes(&b, &h, lines, noise, |function, at| {
        Refusal::BinaryCrateCode {
            function,
            at,
            executable: name.clone(),
            why: String::new(),
        }
    });
    drop((b, h));
    Ok((
        changes,
        OutsideObjects {
            what: format!("the executable {name}'s own crate"),
            crate_name: Some(name.replace('-', "_")),
            package: None,
            name,
            base: bo,
            head: ho,
            types: None,
        },
    ))
}

/// The line tables of the executable `exe`'s own crate, whose kept
/// objects are `kept`: their own, if the profile compiles them with debug
/// info; else those of the wrapper's line tables build
/// (`wrapper::bin_lines_objects`), for each unit whose code is the same
/// there ([`Lines::mapped`]). Without either, no unit is described (every
/// function whose code differs counts as changed).
fn binary_lines(kept: &Build<'_>, exe: &Path, root: &Path) -> Result<Lines, BuildError> {
    let files = super::wrapper::bin_lines_objects(exe);
    if files.is_empty() {
        return Ok(Lines::read(kept, root));
    }
    let objects = files
        .iter()
        .map(|p| {
            let bytes = std::fs::read(p).map_err(io(p.display()))?;
            Ok((p.display().to_string(), bytes))
        })
        .collect::<Result<Vec<_>, BuildError>>()?;
    let members = OutsideObjects::members(&objects);
    let compiled = Build::read(&members).map_err(BuildError::Io)?;
    let lines = Lines::read(&compiled, root);
    Ok(Lines::mapped(kept, &compiled, &lines))
}

/// The libraries of the workspace's other packages, base and head (`(package,
/// rlib)` each), compared: a function whose code changed there (not only
/// how it was compiled: the package's own code, or the service's generic
/// or inline code compiled into it) is hooked if it can be, else refused
/// by name, place and package.
pub(super) fn other_libraries(
    base: &[(String, PathBuf)],
    head: &[(String, PathBuf)],
    outside: &Outside<'_>,
    noise: &mut BTreeSet<String>,
) -> Result<Vec<(Vec<OutsideChange>, OutsideObjects)>, BuildError> {
    let mut out = Vec::new();
    for (package, base_rlib) in base {
        let Some((_, head_rlib)) = head.iter().find(|(p, _)| p == package) else {
            return Err(BuildError::Refused(vec![Refusal::Inconsistent {
                item: package.clone(),
                what: "the head built no library of this package",
            }]));
        };
        let (br, hr) = (Rlib::read(base_rlib)?, Rlib::read(head_rlib)?);
        let (b, h) = (br.objects()?, hr.objects()?);
        let lines = (Lines::read(&b, outside.root), Lines::read(&h, outside.root));
        let changes = outside.changes(&b, &h, lines, noise, |function, at| {
            Refusal::OtherLibraryCode {
                function,
                at,
                package: package.clone(),
                why: String::new(),
            }
        });
        if changes.is_empty() {
            continue;
        }
        let own = |r: &Rlib| -> Result<Vec<(String, Vec<u8>)>, BuildError> {
            Ok(crate::link::own_objects(&r.path, &r.bytes)?
                .into_iter()
                .map(|(n, b)| (n, b.to_vec()))
                .collect())
        };
        let objects = OutsideObjects {
            what: format!("package {package}'s library"),
            name: package.clone(),
            package: Some(package.clone()),
            crate_name: None,
            base: own(&br)?,
            head: own(&hr)?,
            types: None,
        };
        drop((b, h));
        out.push((changes, objects));
    }
    Ok(out)
}

/// Where the user's change is, for [`ChangeSite::is_noise`]: the lines of the
/// functions whose source differs, per side (`None`: something outside
/// function bodies changed, and every changed function counts), and each
/// side's line tables.
pub(super) struct ChangeSite<'a> {
    pub ranges: Option<(&'a LineRanges, &'a LineRanges)>,
    pub base_lines: &'a Lines,
    pub head_lines: &'a Lines,
    /// Whether a symbol is a function of the service that this change
    /// added or removed (its source is on one side only).
    pub added_or_removed: &'a dyn Fn(&str) -> bool,
}

impl ChangeSite<'_> {
    /// Whether the function `name`, whose code differs between `b` and
    /// `h`, differs only in how it was compiled: no instruction of either
    /// side's code (inlined code included, every copy of it) comes from a
    /// line of a function whose source changed (the source outside
    /// function bodies being the same), and both sides have line tables
    /// for it. `CARGO_HOTPATCH_EXPLAIN=1` prints the answer for each. Such a
    /// function does the same thing on both sides: its source, and the
    /// source of everything inlined into it, is the same; what moved is
    /// register allocation, block order or an inlining decision made with a
    /// neighbour (the codegen unit it landed in, ThinLTO's imports).
    pub fn is_noise(&self, b: &Build<'_>, h: &Build<'_>, name: &str) -> bool {
        let why = self.why_not_noise(b, h, name);
        if std::env::var_os("CARGO_HOTPATCH_EXPLAIN").is_some() {
            eprintln!(
                "cargo-hotpatch: explain: {}: {}",
                super::describe(name),
                why.unwrap_or("compiled differently, same source")
            );
        }
        why.is_none()
    }

    /// Why the function `name` is a change the user made, if it is.
    fn why_not_noise(&self, b: &Build<'_>, h: &Build<'_>, name: &str) -> Option<&'static str> {
        let Some((base_ranges, head_ranges)) = self.ranges else {
            return Some("something besides function bodies changed");
        };
        let (bu, hu) = (b.copies(name), h.copies(name));
        if bu.is_empty() || hu.is_empty() {
            return Some("only one side has it");
        }
        let described = bu.iter().all(|u| self.base_lines.described.contains(u))
            && hu.iter().all(|u| self.head_lines.described.contains(u));
        if !described {
            return Some("no line table for it");
        }
        if bu.iter().any(|u| self.base_lines.touches(*u, base_ranges))
            || hu.iter().any(|u| self.head_lines.touches(*u, head_ranges))
        {
            return Some("its code comes from lines of a changed function");
        }
        // What it calls may differ too: a callee inlined on one side and
        // called on the other, whose standalone copy then exists on one
        // side only. That is no change of its own when the callee's source
        // is on both sides (a callee whose source changed puts its lines in
        // the code that inlines it). A call to a function the change added
        // or removed is: its source did not change, but what its call
        // resolves to did (an inherent method added beside a trait's).
        let (bt, ht) = (b.named_targets(&bu), h.named_targets(&hu));
        let only_head = ht.iter().filter(|n| !b.by_name.contains_key(*n));
        let only_base = bt.iter().filter(|n| !h.by_name.contains_key(*n));
        if only_head
            .chain(only_base)
            .any(|n| (self.added_or_removed)(n))
        {
            return Some("it calls a function this change added or removed");
        }
        None
    }
}

/// What changed between the builds.
pub(super) struct Comparison {
    /// The functions whose code changed (symbol names).
    pub changed: BTreeSet<String>,
    /// The head's registry entries, by original body.
    pub head_entries: HashMap<String, EntryInfo>,
    /// Changed data: signatures, statics, removed patchable functions.
    pub refusals: Vec<Refusal>,
}

/// Compares the base's objects with the head's. A function whose code
/// differs only in how it was compiled ([`ChangeSite::is_noise`]) goes to
/// `noise`, not `changed`.
pub(super) fn compare(
    b: &Build<'_>,
    h: &Build<'_>,
    site: &ChangeSite<'_>,
    noise: &mut BTreeSet<String>,
) -> Comparison {
    let base_entries: HashMap<String, EntryInfo> = entries(b)
        .into_iter()
        .map(|e| (e.entry.clone(), e))
        .collect();
    // The record binds to the host's getter: the base's, when the head
    // compiled none of its own (nothing in the head's crate calls it).
    let head_entries: HashMap<String, EntryInfo> = entries(h)
        .into_iter()
        .map(|mut e| {
            if e.getter.is_none() {
                e.getter = base_entries.get(&e.entry).and_then(|b| b.getter.clone());
            }
            (e.original.clone(), e)
        })
        .collect();
    // A registry entry's function, as the service registers its path.
    let entry_path = |entry: &str| {
        base_entries
            .get(entry)
            .map(|e| e.path.clone())
            .unwrap_or_else(|| describe(entry))
    };
    let mut changed: BTreeSet<String> = BTreeSet::new();
    for name in changed_functions(b, h) {
        if site.is_noise(b, h, name) {
            noise.insert(name.clone());
        } else {
            changed.insert(name.clone());
        }
    }
    let mut refusals = Vec::new();
    // Changed data: statics, and the registry's entries (a signature).
    for (name, &hu) in &h.by_name {
        if h.is_code(hu) {
            continue;
        }
        let Some(&bu) = b.by_name.get(name) else {
            continue;
        };
        if b.hash(bu) == h.hash(hu) {
            continue;
        }
        if name.contains("__HOTPATCH_ENTRY_") {
            refusals.push(Refusal::SignatureChanged {
                path: entry_path(name),
            });
        } else if (name.starts_with("_ZN") || name.starts_with("_R"))
            && !objects::is_callsite_static(name)
            && !is_generated(name)
        {
            refusals.push(Refusal::StaticChanged {
                path: describe(name),
            });
        }
    }
    for (name, &bu) in &b.by_name {
        if !b.is_code(bu) && name.contains("__HOTPATCH_ENTRY_") && !h.by_name.contains_key(name) {
            refusals.push(Refusal::PatchableRemoved {
                path: entry_path(name),
            });
        }
    }
    Comparison {
        changed,
        head_entries,
        refusals,
    }
}
