//! Why a patch cannot be made: one variant per rule, each with the item
//! it names and a message that says what to do.
//!
//! `cargo hotpatch build` prints each one on its own `refused:` line (exit
//! code 3). The source-level rules are [`Finding`]s of the service's
//! parsed source; the others come from the compiled objects, the changed
//! files, the deployed binary or the patch crate's package.

use std::fmt;
use std::path::PathBuf;

use crate::riprel::RipRelError;
pub use crate::syntax::{
    Finding, LayoutChange, Location, SignatureChange, StaticKind, ValueChange,
};

/// One reason a patch is refused.
///
/// # Examples
///
/// ```
/// use cargo_hotpatch::Refusal;
///
/// let r = Refusal::StaticChanged { path: "svc::LIMIT".into() };
/// assert!(r.to_string().starts_with("static svc::LIMIT changed"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    // --- The packages.
    /// The service package has no binary target (`--base`).
    NoServiceBinary {
        /// The package.
        package: String,
    },
    /// The patch package has no library target (a patch crate).
    NoPatchLibrary {
        /// The package spec as given (`NAME` or `NAME@VERSION`).
        spec: String,
    },
    /// The patch package's library builds no rlib (a patch crate).
    NoRlib {
        /// The package spec as given.
        spec: String,
        /// Its `crate-type`s, as `cargo metadata` lists them (JSON).
        crate_types: String,
    },

    // --- The changed files.
    /// `Cargo.toml` or a committed `Cargo.lock` changed.
    Manifest {
        /// The file, relative to the workspace root.
        file: String,
    },
    /// A build script, a toolchain file or cargo configuration changed.
    BuildConfiguration {
        /// The file.
        file: String,
    },
    /// The executable's `main`, or start-up code it ran (`std::rt::lang_start`
    /// and what it inlines), changed: the running process has run it and
    /// does not run it again.
    StartupCode {
        /// The function, as the user knows it.
        function: String,
        /// ` (FILE:LINE)`, or empty.
        at: String,
        /// The executable.
        executable: String,
    },
    /// Code of the executable's `main` that is `main`'s own changed (its
    /// body, not a closure, `async` block or item written in it; an
    /// `async fn main`'s body too): it runs in the one call of `main` the
    /// process made, wherever the compiler put it (inlined into the
    /// runtime's `block_on`), so no patch reaches it. Found in the source,
    /// before any build.
    MainChanged {
        /// `main`'s path (`svc::main`).
        function: String,
        /// Where `main` is in the head.
        at: Location,
        /// The executable.
        executable: String,
    },
    /// Code of the executable's own crate changed (its own functions, or
    /// the library's generic or inline code instantiated there), and its
    /// entry cannot be redirected.
    BinaryCrateCode {
        /// The function, as the user knows it.
        function: String,
        /// ` (FILE:LINE)` of the library's source, or empty.
        at: String,
        /// The executable.
        executable: String,
        /// Why its entry cannot be redirected instead (empty: not tried).
        why: String,
    },
    /// Code of another library package of the workspace changed (its own
    /// functions, or the service's generic or inline code instantiated
    /// there), and its entry cannot be redirected.
    OtherLibraryCode {
        /// The function, as the user knows it.
        function: String,
        /// ` (FILE:LINE)` of the library's source, or empty.
        at: String,
        /// The package whose library compiled it.
        package: String,
        /// Why its entry cannot be redirected instead (empty: not tried).
        why: String,
    },

    // --- The source.
    /// The base's or head's library source does not parse.
    SourceDoesNotParse {
        /// `base` or `head`.
        side: &'static str,
        /// The parser's message.
        error: String,
    },
    /// What the source shows a patch cannot carry.
    Source {
        /// The finding (its files relative to the workspace root).
        finding: Finding,
    },

    // --- The binaries.
    /// The binary has no symbol table.
    Stripped {
        /// The binary.
        binary: PathBuf,
    },
    /// The binary does not link hotpatch.
    NoHotpatch {
        /// The binary.
        binary: PathBuf,
    },
    /// The deployed binary is not what the base builds.
    NotTheBase {
        /// The deployed binary.
        deployed: PathBuf,
        /// Its build-id, in hex.
        deployed_id: String,
        /// The base, as `REV (COMMIT)`.
        base: String,
        /// The rebuilt base's build-id, in hex (`none` if it has none).
        base_id: String,
    },

    // --- The compiled objects.
    /// A `#[patchable]` function's registry entry changed: its signature.
    SignatureChanged {
        /// The function's path.
        path: String,
    },
    /// A `#[patchable]` function of the base is gone from the head's
    /// registry.
    PatchableRemoved {
        /// The function's path.
        path: String,
    },
    /// A static's bytes changed.
    StaticChanged {
        /// The static's path.
        path: String,
    },
    /// A changed function that is not `#[patchable]` is reached from code
    /// the patch cannot replace.
    UnpatchedCallers {
        /// The function's path.
        function: String,
        /// ` (FILE:LINE)`, or empty.
        at: String,
        /// Its unpatched callers, through which the blockers reach it.
        callers: Vec<String>,
        /// What blocks it (a public function, a function pointer, ...).
        reasons: Vec<String>,
    },

    // --- Writing the patch's code.
    /// Patch code uses a static or thread-local the binary does not have.
    NewState {
        /// The function or constant that uses it.
        owner: String,
        /// The static's path.
        state: String,
    },
    /// Patch code uses a thread-local of its own.
    NewThreadLocal {
        /// The function that uses it.
        owner: String,
    },
    /// Patch code uses a thread-local the binary does not export.
    PrivateThreadLocal {
        /// The function that uses it.
        owner: String,
        /// The thread-local's path.
        thread_local: String,
    },
    /// The panic counter is reached by a relocation the patch cannot
    /// redirect.
    PanicCounterRelocation {
        /// The function.
        owner: String,
        /// The ELF relocation type.
        r_type: u32,
    },
    /// A relocation type the patch cannot carry to the binary.
    Relocation {
        /// The function or constant.
        owner: String,
        /// The ELF relocation type.
        r_type: u32,
        /// What it refers to.
        target: String,
    },
    /// An access to private data that cannot be redirected through a
    /// cell.
    Unredirectable {
        /// The function.
        owner: String,
        /// Why, from the instruction rewriter.
        reason: RipRelError,
    },
    /// Unwind information refers to a symbol the binary does not export.
    UnwindTarget {
        /// The symbol.
        symbol: String,
    },
    /// A hooked function's unwind information has a form the patch
    /// cannot give its panic counter (its new body would panic
    /// uncounted: a watch window would not see it).
    UncountedUnwind {
        /// The hooked function.
        owner: String,
        /// What the tool found.
        reason: String,
    },
    /// The binary has no entry getter for a replaced function.
    NoEntryGetter {
        /// The getter's symbol.
        getter: String,
        /// The function's path.
        path: String,
    },
    /// Neither build compiled the entry getter of a replaced function
    /// (`__hotpatch_entry_of_*`): a binary built with a hotpatch that
    /// compiled it only when the function's module was public.
    EntryGetterNotCompiled {
        /// The function's path.
        path: String,
    },
    /// What the steps found of an item does not agree (a defect of this
    /// tool, reported as such rather than a panic).
    Inconsistent {
        /// The item's path.
        item: String,
        /// What does not agree.
        what: &'static str,
    },
    /// The object writer failed.
    WriteObject {
        /// Its message.
        reason: String,
    },
}

impl Refusal {
    /// This refusal of code compiled outside the library, saying why its
    /// entry cannot be redirected instead.
    pub(crate) fn because(mut self, reason: String) -> Refusal {
        if let Refusal::BinaryCrateCode { why, .. } | Refusal::OtherLibraryCode { why, .. } =
            &mut self
        {
            *why = reason;
        }
        self
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NoServiceBinary { package } => write!(
                f,
                "package {package} has no binary, and no package of the workspace has one named as --bin or --binary says: a patch is bound to the service's executable; name the deployed executable with --binary PATH (its file name is its bin target's) or --bin NAME"
            ),
            Refusal::NoPatchLibrary { spec } => write!(
                f,
                "package {spec} has no library target: a patch crate is a library crate with `hotpatch::manifest!()`"
            ),
            Refusal::NoRlib { spec, crate_types } => write!(
                f,
                "package {spec} builds no rlib (crate-type {crate_types}): a thin patch is linked from the crate's rlib; remove `crate-type` from its [lib] (rlib is the default)"
            ),
            Refusal::Manifest { file } => write!(
                f,
                "{file} changed: dependencies, features and versions are part of the running build; a patch changes code only, so revert {file} for the patch (ship the change in a release)"
            ),
            Refusal::BuildConfiguration { file } => write!(
                f,
                "{file} changed: the build script, toolchain and cargo configuration make the running build; a patch cannot change them, so revert {file} for the patch"
            ),
            Refusal::StartupCode {
                function,
                at,
                executable,
            } => write!(
                f,
                "{function}{at} changed: it is the executable {executable}'s main or the start-up code that calls it, which the running process has already entered and never calls again, so no hook reaches it (its new code, and code inlined into it, would run only at a start, which runs the deployed build); ship the change in a release; if the change is in a function main calls for each request, the compiler inlined it into main: mark that function #[inline(never)] in the next release, and a patch can hook it"
            ),
            Refusal::MainChanged {
                function,
                at,
                executable,
            } => write!(
                f,
                "{function} ({at}) changed: its own lines (not a closure or async block it spawns) run in the one call of main the executable {executable} made at start, which the running process has already entered and never calls again (an async fn main's body is polled inside the runtime's block_on, entered once from main), so no patch can make them run; ship the change in a release, or leave main out of this fix; code main should run again belongs in a function it calls, which a patch can hook"
            ),
            Refusal::BinaryCrateCode {
                function,
                at,
                executable,
                why,
            } => write!(
                f,
                "{function}{at} changed in the code of the executable {executable}'s own crate, and its entry cannot be redirected: {why}; ship the change in a release, or move the work into a non-generic #[patchable] function of the library"
            ),
            Refusal::OtherLibraryCode {
                function,
                at,
                package,
                why,
            } => write!(
                f,
                "{function}{at} changed in the code of package {package}'s library, and its entry cannot be redirected: {why}; ship the change in a release, or move the work into a non-generic #[patchable] function of the service"
            ),
            Refusal::SourceDoesNotParse { side, error } => {
                write!(f, "the {side}'s source does not parse: {error}")
            }
            Refusal::Source { finding } => write!(f, "{finding}"),
            Refusal::Stripped { binary } => write!(
                f,
                "{} has no symbol table (stripped): a patch made from source reaches the service's private functions and statics by the binary's symbols; build it with `strip = \"debuginfo\"` or `strip = false` (cargo's default for release)",
                binary.display()
            ),
            Refusal::NoHotpatch { binary } => write!(
                f,
                "{} does not link hotpatch (no {})",
                binary.display(),
                hotpatch_abi::HOST_EXPORTS_SYMBOL
            ),
            Refusal::NotTheBase {
                deployed,
                deployed_id,
                base,
                base_id,
            } => write!(
                f,
                "{} (build-id {deployed_id}) is not what {base} builds here (build-id {base_id}): another toolchain, Cargo.lock, profile, features or flags made it; build the patch where and as the deployed binary was built, or name the revision it was built from",
                deployed.display()
            ),
            Refusal::SignatureChanged { path } => write!(
                f,
                "the signature of #[patchable] {path} changed: the running callers pass the old arguments; keep the signature (add a new function for the new one) or ship it in a release"
            ),
            Refusal::PatchableRemoved { path } => write!(
                f,
                "#[patchable] {path} was removed or is no longer patchable: the running code calls it; keep it for the patch"
            ),
            Refusal::StaticChanged { path } => write!(
                f,
                "static {path} changed its initial value or type: the running process keeps the old one; a patch cannot change data"
            ),
            Refusal::UnpatchedCallers {
                function,
                at,
                callers,
                reasons,
            } => {
                let via = if callers.is_empty() {
                    String::new()
                } else {
                    format!(
                        " through its unpatched caller{} {}",
                        if callers.len() == 1 { "" } else { "s" },
                        callers.join(", ")
                    )
                };
                write!(
                    f,
                    "{function}{at} changed, but it is not #[patchable] and code the patch cannot replace reaches it{via}: {}; the old version would keep running there. Make it (or its callers) #[patchable] in the next release, or leave it unchanged for the patch",
                    reasons.join("; ")
                )
            }
            Refusal::NewState { owner, state } => write!(
                f,
                "{owner} uses {state}, which the running binary does not have (a new or changed static or thread-local): a patch cannot add state; keep the fix to code, or ship it in a release"
            ),
            Refusal::NewThreadLocal { owner } => write!(
                f,
                "{owner} uses a thread-local of its own the running binary does not have: a patch cannot add thread-local state"
            ),
            Refusal::PrivateThreadLocal {
                owner,
                thread_local,
            } => write!(
                f,
                "{owner} uses the thread-local {thread_local} of the service, which the binary does not export: a patch reaches a thread-local only by its exported symbol; make it reachable from another crate (e.g. `pub`), or keep the change out of code that touches it"
            ),
            Refusal::PanicCounterRelocation { owner, r_type } => write!(
                f,
                "{owner} reaches the panic counter by a relocation of type {r_type}, which the patch cannot redirect to its own"
            ),
            Refusal::Relocation {
                owner,
                r_type,
                target,
            } => write!(
                f,
                "{owner} has a relocation of type {r_type} against {target}, which a patch cannot carry to the running binary"
            ),
            Refusal::Unredirectable { owner, reason } => write!(
                f,
                "{owner} reads or writes private data of the service in a way a patch cannot redirect ({reason}): make the data reachable from another crate (e.g. `pub`), or keep the change out of this function"
            ),
            Refusal::UnwindTarget { symbol } => write!(
                f,
                "unwind information refers to {symbol}, which the binary does not export"
            ),
            Refusal::UncountedUnwind { owner, reason } => write!(
                f,
                "the unwind information of {owner}'s new body cannot be made to count its panics ({reason}): a watch window would not see them"
            ),
            Refusal::NoEntryGetter { getter, path } => write!(
                f,
                "the running binary has no entry getter {getter} for {path}"
            ),
            Refusal::EntryGetterNotCompiled { path } => write!(
                f,
                "{path}: the deployed build has no entry getter (__hotpatch_entry_of_*) to bind its replacement to: the binary was built with a hotpatch that compiles it only for functions of public modules; rebuild and deploy the service with this hotpatch, then patch it"
            ),
            Refusal::Inconsistent { item, what } => write!(
                f,
                "{item}: {what} (an inconsistency of cargo-hotpatch's own steps: please report it with the service's source)"
            ),
            Refusal::WriteObject { reason } => write!(f, "writing the patch object: {reason}"),
        }
    }
}

/// Sorts refusals by their message and drops repeated ones, as they are
/// printed.
pub(crate) fn sort_and_dedup(refusals: &mut Vec<Refusal>) {
    refusals.sort_by_cached_key(Refusal::to_string);
    refusals.dedup_by(|a, b| a.to_string() == b.to_string());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpatched_callers_are_named_one_or_many() {
        let r = |callers: &[&str]| Refusal::UnpatchedCallers {
            function: "svc::tax".into(),
            at: " (src/lib.rs:9)".into(),
            callers: callers.iter().map(|c| c.to_string()).collect(),
            reasons: vec!["svc::gross is public".into(), "a vtable".into()],
        };
        let none = r(&[]).to_string();
        assert!(
            none.starts_with(
                "svc::tax (src/lib.rs:9) changed, but it is not #[patchable] and code the patch cannot replace reaches it: svc::gross is public; a vtable;"
            ),
            "{none}"
        );
        assert!(
            r(&["svc::gross"])
                .to_string()
                .contains(" through its unpatched caller svc::gross: ")
        );
        assert!(
            r(&["svc::a", "svc::b"])
                .to_string()
                .contains(" through its unpatched callers svc::a, svc::b: ")
        );
    }

    #[test]
    fn sorted_by_message_and_each_once() {
        let s = |p: &str| Refusal::StaticChanged { path: p.into() };
        let mut all = vec![s("svc::B"), s("svc::A"), s("svc::B")];
        sort_and_dedup(&mut all);
        assert_eq!(all, [s("svc::A"), s("svc::B")]);
    }
}
