//! Step 13: what the patch does, for the user: the functions replaced and
//! included, each with its file and line, and the notes.

use std::collections::{BTreeSet, HashSet};
use std::path::PathBuf;

use super::classify::Plan;
use super::extract::Extracted;
use super::git::Revisions;
use super::manifest::Label;
use super::workspace::Workspace;
use super::{demangle, describe};
use crate::LinkReport;
use crate::syntax::CrateSource;

/// A function of the patch, for the summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// The path as the service writes it (`svc::Cart::total`).
    pub path: String,
    /// `file:line`, where the source says.
    pub location: Option<String>,
    /// Why it is in the patch when the user did not change its source
    /// (`inlined svc::split_words changed`, `calls svc::tax, which
    /// changed`); `None` when its own source changed.
    pub why: Option<String>,
    /// For an included function: every function of the deployed build
    /// that calls or names it, and what the patch does with it
    /// (`svc::a (replaced)`, `svc::b (included)`, `svc::c (gone from the
    /// head)`). Empty for a replaced function (its slot redirects every
    /// caller) and for a function the deployed build does not have.
    pub callers: Vec<String>,
}

/// What [`build_from_source`](crate::build_from_source) made.
#[derive(Debug, Clone)]
pub struct SourceReport {
    /// The `#[patchable]` functions replaced.
    pub replaced: Vec<Item>,
    /// Other functions in the patch: changed ones whose callers are all
    /// replaced, and new ones.
    pub included: Vec<Item>,
    /// Changed functions that are not `#[patchable]` and whose callers
    /// cannot all be patched: the loader redirects their entry to the new
    /// body (`hotpatch::hook`). `callers` says why a hook was needed.
    pub hooked: Vec<Item>,
    /// Informational lines.
    pub notes: Vec<String>,
    /// The base: revision as given, commit, build-id.
    pub base: String,
    /// The head: revision or "working tree".
    pub head: String,
    /// The patch's name, as the runtime lists it.
    pub name: String,
    /// Its version.
    pub version: String,
    /// Its description.
    pub description: String,
    /// The patch file.
    pub output: PathBuf,
    /// Its size.
    pub size: u64,
    /// The build-id it is bound to.
    pub build_id: String,
}

/// The patch as written: its code, its file and its label.
pub(super) struct Written {
    pub extracted: Extracted,
    pub linked: LinkReport,
    pub label: Label,
}

/// The note on the functions whose code differs only in how it was
/// compiled (`compare::ChangeSite::is_noise`), in the library and in the
/// executable's own crate; `None` if there are none.
pub(super) fn noise_note(lib: &BTreeSet<String>, bin: &BTreeSet<String>) -> Option<String> {
    let all: BTreeSet<String> = lib.iter().chain(bin).map(|n| describe(n)).collect();
    if all.is_empty() {
        return None;
    }
    Some(format!(
        "{} function{} compiled to other code although no source line of theirs (inlined code included) changed: how the compiler placed them moved (registers, codegen units, inlining), not what they do; the running binary keeps its own: {}",
        all.len(),
        if all.len() == 1 { "" } else { "s" },
        list(all.into_iter())
    ))
}

/// The note on changed functions the deployed binary has no code of;
/// `None` if there are none.
pub(super) fn absent_note(absent: &[(String, Option<String>)]) -> Option<String> {
    let all: BTreeSet<String> = absent
        .iter()
        .map(|(n, at)| match at {
            Some(at) => format!("{} (in {at})", describe(n)),
            None => describe(n),
        })
        .collect();
    if all.is_empty() {
        return None;
    }
    Some(format!(
        "{} changed function{} not in the deployed binary (the linker dropped {}, or every copy was inlined into callers compared on their own): no hook; the patch copies {} only where its own code calls {}: {}",
        all.len(),
        if all.len() == 1 { " is" } else { "s are" },
        if all.len() == 1 { "it" } else { "them" },
        if all.len() == 1 { "it" } else { "them" },
        if all.len() == 1 { "it" } else { "them" },
        list(all.into_iter())
    ))
}

/// At most eight names, and how many more.
fn list(names: impl Iterator<Item = String>) -> String {
    let names: Vec<String> = names.collect();
    let mut out = names.iter().take(8).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > 8 {
        out.push_str(&format!(" and {} more", names.len() - 8));
    }
    out
}

/// The report of the patch `written`, made of `plan`.
pub(super) fn report(
    ws: &Workspace,
    revs: &Revisions,
    base_src: &CrateSource,
    head_src: &CrateSource,
    plan: &Plan,
    written: Written,
    mut notes: Vec<String>,
) -> SourceReport {
    let Written {
        extracted,
        linked,
        label,
    } = written;
    if !extracted.carried.is_empty() {
        notes.push(format!(
            "carried: {} of them, copied for the patch's own code, which was compiled against the new copies: {}",
            extracted.carried.len(),
            list(extracted.carried.iter().map(|n| describe(n)))
        ));
    }
    if extracted.private_refs > 0 {
        notes.push(format!(
            "{} private functions and statics of the service are reached through cells the loader fills",
            extracted.private_refs
        ));
    }
    let locate = |path: &str| head_src.locate(path).map(|l| l.to_string());
    // Why a function whose source is the same is in the patch.
    let why = |symbol: &str, path: &str| match plan.calls_changed.get(symbol) {
        Some(callee) => Some(format!("calls {}, which changed", describe(callee))),
        None => head_src.why_changed(base_src, path),
    };
    let mut replaced: Vec<Item> = plan
        .replaced
        .iter()
        .map(|(symbol, e)| Item {
            path: e.path.clone(),
            location: locate(&e.path),
            why: why(symbol, &e.path),
            callers: Vec::new(),
        })
        .collect();
    replaced.sort_by(|a, b| a.path.cmp(&b.path));
    let mut foreign: BTreeSet<String> = BTreeSet::new();
    let mut included: Vec<Item> = Vec::new();
    // A closure goes with the function it is written in, when that one is
    // in the patch too (a `tracing` event's closure, an iterator's).
    let hooked_symbols: HashSet<&String> = plan.hooked.iter().map(|h| &h.symbol).collect();
    let mut hooked: Vec<Item> = plan
        .hooked
        .iter()
        .map(|h| {
            let d = demangle(&h.symbol);
            Item {
                path: describe(&h.symbol),
                location: h.location.clone().or_else(|| locate(&d)),
                why: head_src.why_changed(base_src, &d),
                callers: h.because.clone(),
            }
        })
        .collect();
    hooked.sort_by(|a, b| a.path.cmp(&b.path));
    let listed: HashSet<String> = replaced
        .iter()
        .map(|i| i.path.clone())
        .chain(plan.included.iter().map(|n| describe(n)))
        .collect();
    let part_of_listed = |path: &str| {
        path.split_once("::{{closure}}")
            .is_some_and(|(parent, _)| listed.contains(parent))
    };
    for n in plan.included.iter().chain(extracted.new_functions.iter()) {
        if hooked_symbols.contains(n) {
            continue;
        }
        let path = describe(n);
        if part_of_listed(&path) {
            continue;
        }
        if ws.owns(&path) {
            included.push(Item {
                location: locate(&demangle(n)),
                why: head_src.why_changed(base_src, &demangle(n)),
                callers: plan.callers.get(n).cloned().unwrap_or_default(),
                path,
            });
        } else {
            foreign.insert(path);
        }
    }
    if !foreign.is_empty() {
        notes.push(format!(
            "{} function{} of other crates compiled into the patch (inline or generic code the new code is the first to use): {}",
            foreign.len(),
            if foreign.len() == 1 { "" } else { "s" },
            foreign.into_iter().collect::<Vec<_>>().join(", ")
        ));
    }
    included.sort_by(|a, b| a.path.cmp(&b.path));
    included.dedup();
    SourceReport {
        replaced,
        included,
        hooked,
        notes,
        base: revs.base_name.clone(),
        head: revs.head_name.clone(),
        name: label.name,
        version: label.version,
        description: label.description,
        output: linked.output,
        size: linked.size,
        build_id: linked.host_build_id,
    }
}
