//! Step 5: the source of both sides, parsed and compared item by item
//! (module `syntax`): what a patch cannot carry (a type's layout, a
//! static, a patchable signature) is refused before any build. The
//! library's source, the deployed executable's crate's (`src/main.rs`,
//! `src/bin/NAME.rs` and their modules) and the library of every other
//! package of the workspace whose source changed: code of each of them
//! runs in the executable.

use std::path::Path;

use super::checkout::Trees;
use super::workspace::Workspace;
use crate::syntax::{CrateSource, LineRanges};
use crate::{BuildError, Refusal};

/// The parsed sources of one crate, base and head.
pub(super) struct Sides {
    pub base: CrateSource,
    pub head: CrateSource,
}

/// The sources besides the library's: the executable's crate, and the
/// other packages whose source changed.
pub(super) struct Outside {
    /// The deployed executable's crate, if its bin target is known
    /// before the build.
    pub bin: Option<Sides>,
    /// Each other package whose source changed: its name and sources.
    pub others: Vec<(String, Sides)>,
}

impl Outside {
    /// Where the function `demangled` of the executable's crate or of
    /// another package is, from the sources that define exactly that path
    /// (never by name alone: a crate of the same name may define another
    /// function so named).
    pub fn locate(&self, demangled: &str) -> Option<String> {
        self.bin
            .iter()
            .chain(self.others.iter().map(|(_, s)| s))
            .find(|s| s.head.defines(demangled))
            .and_then(|s| s.head.locate(demangled))
            .map(|l| l.to_string())
    }

    /// Where the functions whose source differs are in these crates (see
    /// `CrateSource::changed_fn_lines`), added to `ranges` (base, head);
    /// `None` when anything else differs in one of them.
    pub fn add_changed_fn_lines(
        &self,
        mut ranges: (LineRanges, LineRanges),
    ) -> Option<(LineRanges, LineRanges)> {
        for s in self.bin.iter().chain(self.others.iter().map(|(_, s)| s)) {
            let (b, h) = s.head.changed_fn_lines(&s.base)?;
            for (into, from) in [(&mut ranges.0, b), (&mut ranges.1, h)] {
                for (file, lines) in from {
                    into.entry(file).or_default().extend(lines);
                }
            }
        }
        Some(ranges)
    }

    /// Whether the function `demangled` is `#[patchable]` in the head of
    /// one of these crates, or is code the attribute made (its counted or
    /// original body, `__hotpatch_*`).
    pub fn is_patchable(&self, demangled: &str) -> bool {
        let made = demangled
            .rsplit("::")
            .next()
            .is_some_and(|last| last.starts_with("__hotpatch_"));
        made || self
            .bin
            .iter()
            .chain(self.others.iter().map(|(_, s)| s))
            .any(|s| s.head.is_patchable(demangled))
    }

    /// Whether one of these crates defines exactly the function
    /// `demangled` in one side's source and not in the other's.
    pub fn added_or_removed(&self, demangled: &str) -> bool {
        self.bin
            .iter()
            .chain(self.others.iter().map(|(_, s)| s))
            .any(|s| s.base.defines(demangled) != s.head.defines(demangled))
    }

    /// Whether `file` (relative to the workspace root) is a source file
    /// of one of these crates.
    pub fn reads(&self, file: &Path) -> bool {
        self.bin
            .iter()
            .chain(self.others.iter().map(|(_, s)| s))
            .any(|s| s.base.reads(file) || s.head.reads(file))
    }
}

/// The library's sources, base and head, and the others' (see
/// [`Outside`]). `notes` gets the findings that do not refuse (a changed
/// `const`).
pub(super) fn check(
    ws: &Workspace,
    trees: &Trees,
    bin: Option<&(String, std::path::PathBuf)>,
    other_packages: &[String],
    notes: &mut Vec<String>,
) -> Result<(CrateSource, CrateSource, Outside), BuildError> {
    // Parsed from the workspace root: every location names its file as
    // the workspace does (`services/api/src/lib.rs`).
    let parse = |root: &Path, src: &Path, name: &str, side: &'static str| {
        crate::syntax::parse_crate(root, &root.join(src))
            .map(|c| c.with_crate_name(name))
            .map_err(|e| {
                BuildError::Refused(vec![Refusal::SourceDoesNotParse {
                    side,
                    error: e.to_string(),
                }])
            })
    };
    let both = |src: &Path, name: &str| -> Result<Sides, BuildError> {
        Ok(Sides {
            base: parse(&trees.base, src, name, "base")?,
            head: parse(&trees.head, src, name, "head")?,
        })
    };
    // A package without a library: its code is all the executable's
    // crate's, read below; the library's sources are empty.
    let lib = match &ws.lib_src {
        Some(src) => both(src, &ws.lib_name)?,
        None => Sides {
            base: CrateSource::empty(&ws.lib_name),
            head: CrateSource::empty(&ws.lib_name),
        },
    };
    let mut refusals = Vec::new();
    let mut compare = |sides: &Sides| {
        for finding in crate::syntax::compare(&sides.base, &sides.head) {
            if finding.refuses() {
                refusals.push(Refusal::Source { finding });
            } else {
                notes.push(finding.to_string());
            }
        }
    };
    compare(&lib);
    let mut main_changed = None;
    let bin = match bin {
        Some((name, src)) => {
            let sides = both(src, name)?;
            compare(&sides);
            main_changed =
                sides
                    .head
                    .main_own_changed(&sides.base)
                    .map(|at| Refusal::MainChanged {
                        function: format!("{}::main", sides.head.crate_name()),
                        at: at.clone(),
                        executable: name.clone(),
                    });
            Some(sides)
        }
        None => None,
    };
    let mut others = Vec::new();
    for package in other_packages {
        // A package without a library (a tool's executable) is no code of
        // the deployed executable; its objects are not compared either.
        let Some(lib) = ws.other_libs.iter().find(|l| &l.package == package) else {
            continue;
        };
        let sides = both(&lib.src, &lib.crate_name)?;
        compare(&sides);
        others.push((package.clone(), sides));
    }
    refusals.extend(main_changed);
    if !refusals.is_empty() {
        return Err(BuildError::Refused(refusals));
    }
    Ok((lib.base, lib.head, Outside { bin, others }))
}
