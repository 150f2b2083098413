//! Why a load or revert failed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{PatchId, StalledRequest, StalledThread};

/// Everything that can go wrong loading, applying or reverting a patch.
///
/// Each variant names the patch file and, where one is involved, the
/// function. Whenever `load` returns an error, every slot is as it was
/// before the call.
///
/// # Examples
///
/// ```no_run
/// match hotpatch::load("fix.so") {
///     Ok(patch) => println!("applied {} {}", patch.name(), patch.version()),
///     Err(hotpatch::Error::UnknownTarget { function, .. }) => {
///         eprintln!("this build has no patchable `{function}`")
///     }
///     Err(e) => eprintln!("patch refused: {e}"),
/// }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The file could not be read: missing, a directory, no permission.
    #[error("cannot read patch {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The trust policy refuses the file: its owner or permissions, or those
    /// of a directory above it, let someone else change it (see
    /// [`Loader::allow_insecure_permissions`](crate::Loader::allow_insecure_permissions)).
    #[error("refusing patch {path}: {reason}")]
    Untrusted { path: PathBuf, reason: String },

    /// Trusted keys are configured but the patch has no signature file.
    #[error("refusing patch {path}: no signature at {signature}")]
    Unsigned { path: PathBuf, signature: PathBuf },

    /// The signature is malformed, or no trusted key verifies it for these
    /// bytes.
    #[error("refusing patch {path}: bad signature: {reason}")]
    BadSignature { path: PathBuf, reason: String },

    /// A trusted key could not be parsed.
    #[error("not a minisign public key: {reason}")]
    BadKey { reason: String },

    /// The private copy of the file could not be made.
    #[error("cannot make a private copy of patch {path}: {source}")]
    Copy {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Not a shared object this process can load: not ELF, another
    /// architecture, truncated (checked before the dynamic loader sees
    /// it), or refused by the dynamic loader (missing dependencies, ...).
    #[error("patch {path} is not a loadable shared object: {reason}")]
    NotLoadable { path: PathBuf, reason: String },

    /// The library does not export a hotpatch manifest: not a patch crate,
    /// or it lacks `hotpatch::manifest!()`.
    #[error(
        "{path} has no hotpatch manifest (symbol `{symbol}`): is it a patch crate with `hotpatch::manifest!()`?"
    )]
    NoManifest { path: PathBuf, symbol: &'static str },

    /// The manifest does not start with the hotpatch magic bytes.
    #[error("{path}: manifest has bad magic {found:02x?}")]
    BadMagic { path: PathBuf, found: [u8; 8] },

    /// The patch was built with another version of hotpatch's ABI.
    #[error("{path}: patch uses hotpatch ABI version {patch}, this process uses {host}")]
    AbiMismatch {
        path: PathBuf,
        host: u32,
        patch: u32,
    },

    /// The patch was built by another compiler.
    #[error("{path}: patch was built by `{patch}`, this process by `{host}`")]
    RustcMismatch {
        path: PathBuf,
        host: String,
        patch: String,
    },

    /// The patch was built for another target.
    #[error("{path}: patch was built for target `{patch}`, this process for `{host}`")]
    TargetMismatch {
        path: PathBuf,
        host: String,
        patch: String,
    },

    /// The patch uses another panic strategy.
    #[error("{path}: patch uses panic strategy `{patch}`, this process `{host}`")]
    PanicStrategyMismatch {
        path: PathBuf,
        host: String,
        patch: String,
    },

    /// The manifest is malformed: a null or misaligned table, an oversized
    /// or non-UTF-8 string, zero functions.
    #[error("{path}: invalid manifest: {reason}")]
    InvalidManifest { path: PathBuf, reason: String },

    /// The patch replaces a function this process does not have as
    /// `#[patchable]`.
    #[error("{path}: `{function}` is not a patchable function of this process")]
    UnknownTarget { path: PathBuf, function: String },

    /// The patch replaces the same function twice.
    #[error("{path}: `{function}` is replaced twice in one patch")]
    DuplicateTarget { path: PathBuf, function: String },

    /// An argument or return type of the function has another size or
    /// alignment in the patch than in this process.
    #[error("{path}: `{function}`: {detail}")]
    LayoutMismatch {
        path: PathBuf,
        function: String,
        detail: String,
    },

    /// The same patch (identical bytes) is already applied.
    #[error("{path}: patch `{name}` is already applied as {id}")]
    AlreadyApplied {
        path: PathBuf,
        name: String,
        id: PatchId,
    },

    /// Registered threads did not all reach a safepoint, or request
    /// scopes that started on the old version did not all finish, before
    /// the deadline, so the transition was reversed: every slot ends as it
    /// was (see [`Loader::deadline`](crate::Loader::deadline)).
    #[error(
        "{what}: {} registered thread(s) did not reach a safepoint and {} request(s) started on the old version did not finish within {deadline:?}, so nothing changed: {}",
        .stalled.len(),
        .requests.iter().map(|r| r.count).sum::<usize>(),
        .stalled.iter().map(ToString::to_string).chain(.requests.iter().map(ToString::to_string)).collect::<Vec<_>>().join("; ")
    )]
    Timeout {
        what: String,
        deadline: Duration,
        stalled: Vec<StalledThread>,
        /// The request scopes it waited for, grouped by where each was
        /// created (empty for a reclaim's grace period).
        requests: Vec<StalledRequest>,
    },

    /// The pages of the slot table could not be made writable to switch
    /// the functions (`mprotect` failed, e.g. the process is at its limit
    /// of memory mappings): nothing changed.
    #[error("{what}: cannot make the slot table writable, so nothing changed: {source}")]
    SlotTable {
        what: String,
        #[source]
        source: std::io::Error,
    },

    /// Another patch was being applied or reverted for longer than the
    /// deadline.
    #[error("{what}: another patch transition is still in progress after {waited:?}")]
    Busy { what: String, waited: Duration },

    /// The patch brings an allocator of its own (its crate declares a
    /// `#[global_allocator]`): memory passed between it and the host would
    /// be freed by the wrong allocator. A thin patch uses the host's.
    #[error("{path}: refusing a patch with a foreign allocator: {reason}")]
    ForeignAllocator { path: PathBuf, reason: String },

    /// The file is not a thin patch: it names no service build (no
    /// `.hotpatch.host` section). A plain `cargo build` of a patch crate
    /// makes a library with its own copy of std and of the service.
    #[error(
        "{path}: not a thin patch: it does not name the service build it was made for (no \
         `.hotpatch.host` section); build it with `cargo hotpatch build -p <patch crate> \
         --binary <service binary>`"
    )]
    NotThin { path: PathBuf },

    /// The patch was made against another build of the service (GNU
    /// build-ids, lowercase hex).
    #[error(
        "{path}: the patch was made for service build {patch}, but this process is build {host}: \
         rebuild the patch against this binary (`cargo hotpatch build --binary <this binary>`)"
    )]
    WrongBuild {
        path: PathBuf,
        patch: String,
        host: String,
    },

    /// This binary has no GNU build-id, so no patch can name it.
    #[error(
        "{path}: this process's binary has no GNU build-id, so no patch can be checked against it \
         (link it with `-Wl,--build-id`)"
    )]
    HostUnidentified { path: PathBuf },

    /// This binary neither exports its symbols to the dynamic loader nor
    /// keeps its symbol table (`.symtab`, which the runtime reads from
    /// `/proc/self/exe`), so a thin patch has nothing to bind to.
    #[error(
        "{path}: this process's binary has no symbols for patches to bind to: it was stripped \
         (keep its symbol table: no `strip` in the profile, no `-s`), or link it with \
         `println!(\"cargo::rustc-link-arg-bins=-rdynamic\");` in its build.rs"
    )]
    HostNotExported { path: PathBuf },

    /// The patch needs symbols this binary does not have (demangled).
    #[error(
        "{path}: the patch needs {} symbol(s) this process's binary does not have: {}; a \
         dependency function the service never calls is not linked into it (call it from the \
         service), or the patch was built with other features or another profile than the \
         service (build both in one cargo selection and profile)",
        .symbols.len(),
        .symbols.join(", ")
    )]
    MissingSymbols { path: PathBuf, symbols: Vec<String> },

    /// The patch's initialisation (`hotpatch::manifest!(init = ...)`)
    /// returned an error or panicked; nothing was applied.
    #[error("{path}: patch initialisation failed: {reason}")]
    InitFailed { path: PathBuf, reason: String },

    /// A fault injected by a test (`failpoints` feature only).
    #[cfg(feature = "failpoints")]
    #[error("{path}: fault injected at `{point}`")]
    Injected { point: &'static str, path: PathBuf },

    /// No applied patch has this id (already reverted).
    /// A function's entry could not be redirected, or its redirection
    /// removed ([`crate::hook`]); its code and slot are as they were,
    /// unless the reason is [`crate::hook::Reason::NotRestored`] (the
    /// message says which).
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    #[error("cannot {op} `{function}`, {}: {reason}", reason.outcome())]
    Hook {
        /// `hook`, `unhook` or `redirect`.
        op: &'static str,
        /// The function.
        function: String,
        /// Why.
        reason: crate::hook::Reason,
    },

    /// A function the patch hooks (redirects at its entry, [`crate::hook`])
    /// cannot be hooked in this process: no function of the executable
    /// starts at its target, its entry cannot be redirected, its entry
    /// bytes are not those the patch was made for, or the entry write
    /// failed. Every function's code, slot and record are as they were,
    /// unless the reason is [`crate::hook::Reason::NotRestored`] (the
    /// message says which).
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    #[error("{path}: cannot hook `{function}`, {}: {reason}", reason.outcome())]
    HookRefused {
        path: PathBuf,
        function: String,
        reason: crate::hook::Reason,
    },

    /// The patch hooks a function that is `#[patchable]` (its wrapper or
    /// its original body): a patch replaces it through its slot.
    #[error(
        "{path}: `{function}` is the patchable function `{patchable}`: replace it through its \
         slot (`#[hotpatch::patch({patchable})]`), not by hooking its entry"
    )]
    HookOfPatchable {
        path: PathBuf,
        function: String,
        patchable: String,
    },

    /// A load or replace failed after it had redirected function entries
    /// (`cause`), and writing the original bytes back failed for
    /// `functions` (a thread blocks the stop signal, for example): those
    /// entries stay redirected, their slots at the original code (the
    /// trampoline), so their calls run the original code; slots and
    /// records are otherwise as they were, and a later patch of them
    /// reuses the redirection.
    #[error(
        "{cause}; the entry of {} stays redirected to the original code, which its calls run \
         (writing the original bytes back failed: {})",
        .functions.join(", "),
        .reasons.join("; ")
    )]
    HooksLeftInstalled {
        cause: Box<Error>,
        functions: Vec<String>,
        reasons: Vec<String>,
    },

    #[error("{id} is not applied")]
    NotApplied { id: PatchId },
}

impl Error {
    /// The stable name of this error's kind: the `kind` of the control
    /// protocol's errors and the `outcome`/`kind` label of the metrics.
    /// It never changes meaning.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// if let Err(e) = hotpatch::load("fix.so") {
    ///     eprintln!("{}: {e}", e.kind()); // e.g. "rustc_mismatch: ..."
    /// }
    /// ```
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Read { .. } => "read",
            Error::Untrusted { .. } => "untrusted",
            Error::Unsigned { .. } => "unsigned",
            Error::BadSignature { .. } => "bad_signature",
            Error::BadKey { .. } => "bad_key",
            Error::Copy { .. } => "copy",
            Error::NotLoadable { .. } => "not_loadable",
            Error::NoManifest { .. } => "no_manifest",
            Error::BadMagic { .. } => "bad_magic",
            Error::AbiMismatch { .. } => "abi_mismatch",
            Error::RustcMismatch { .. } => "rustc_mismatch",
            Error::TargetMismatch { .. } => "target_mismatch",
            Error::PanicStrategyMismatch { .. } => "panic_strategy_mismatch",
            Error::InvalidManifest { .. } => "invalid_manifest",
            Error::UnknownTarget { .. } => "unknown_target",
            Error::DuplicateTarget { .. } => "duplicate_target",
            Error::LayoutMismatch { .. } => "layout_mismatch",
            Error::AlreadyApplied { .. } => "already_applied",
            Error::Timeout { .. } => "timeout",
            Error::Busy { .. } => "busy",
            Error::SlotTable { .. } => "slot_table",
            Error::ForeignAllocator { .. } => "foreign_allocator",
            Error::NotThin { .. } => "not_thin",
            Error::WrongBuild { .. } => "wrong_build",
            Error::HostUnidentified { .. } => "host_unidentified",
            Error::HostNotExported { .. } => "host_not_exported",
            Error::MissingSymbols { .. } => "missing_symbols",
            Error::InitFailed { .. } => "init_failed",
            #[cfg(feature = "failpoints")]
            Error::Injected { .. } => "injected",
            Error::NotApplied { .. } => "not_applied",
            #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
            Error::Hook { .. } => "hook",
            #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
            Error::HookRefused { .. } => "hook_refused",
            Error::HookOfPatchable { .. } => "hook_of_patchable",
            Error::HooksLeftInstalled { cause, .. } => cause.kind(),
        }
    }

    /// A refusal by a check: the patch is unfit for this process (nothing
    /// changed). Not a refusal: a transition that timed out or found
    /// another in progress, a patch already applied, a revert of what is
    /// not applied.
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) fn is_refusal(&self) -> bool {
        if let Error::HooksLeftInstalled { cause, .. } = self {
            return cause.is_refusal();
        }
        !matches!(
            self,
            Error::Timeout { .. }
                | Error::Busy { .. }
                | Error::AlreadyApplied { .. }
                | Error::NotApplied { .. }
                | Error::SlotTable { .. }
        )
    }
}

/// Why a check refuses a patch, before the file is named: what the
/// manifest checks (`manifest.rs`), the plan (`registry.rs`) and the
/// patch's initialisation return. The loader, which knows the file,
/// makes it an [`Error`] with [`Refusal::at`].
#[derive(Debug)]
pub(crate) enum Refusal {
    BadMagic {
        found: [u8; 8],
    },
    AbiMismatch {
        host: u32,
        patch: u32,
    },
    RustcMismatch {
        host: String,
        patch: String,
    },
    TargetMismatch {
        host: String,
        patch: String,
    },
    PanicStrategyMismatch {
        host: String,
        patch: String,
    },
    /// [`Error::InvalidManifest`]'s reason.
    InvalidManifest(String),
    UnknownTarget {
        function: String,
    },
    DuplicateTarget {
        function: String,
    },
    LayoutMismatch {
        function: String,
        detail: String,
    },
    AlreadyApplied {
        name: String,
        id: PatchId,
    },
    InitFailed {
        reason: String,
    },
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    Hook {
        function: String,
        reason: crate::hook::Reason,
    },
    HookOfPatchable {
        function: String,
        patchable: String,
    },
    #[cfg(feature = "failpoints")]
    Injected {
        point: &'static str,
    },
}

impl Refusal {
    /// The error for the patch file at `path`.
    pub(crate) fn at(self, path: &Path) -> Error {
        let path = path.to_owned();
        match self {
            Refusal::BadMagic { found } => Error::BadMagic { path, found },
            Refusal::AbiMismatch { host, patch } => Error::AbiMismatch { path, host, patch },
            Refusal::RustcMismatch { host, patch } => Error::RustcMismatch { path, host, patch },
            Refusal::TargetMismatch { host, patch } => Error::TargetMismatch { path, host, patch },
            Refusal::PanicStrategyMismatch { host, patch } => {
                Error::PanicStrategyMismatch { path, host, patch }
            }
            Refusal::InvalidManifest(reason) => Error::InvalidManifest { path, reason },
            Refusal::UnknownTarget { function } => Error::UnknownTarget { path, function },
            Refusal::DuplicateTarget { function } => Error::DuplicateTarget { path, function },
            Refusal::LayoutMismatch { function, detail } => Error::LayoutMismatch {
                path,
                function,
                detail,
            },
            Refusal::AlreadyApplied { name, id } => Error::AlreadyApplied { path, name, id },
            Refusal::InitFailed { reason } => Error::InitFailed { path, reason },
            #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
            Refusal::Hook { function, reason } => Error::HookRefused {
                path,
                function,
                reason,
            },
            Refusal::HookOfPatchable {
                function,
                patchable,
            } => Error::HookOfPatchable {
                path,
                function,
                patchable,
            },
            #[cfg(feature = "failpoints")]
            Refusal::Injected { point } => Error::Injected { point, path },
        }
    }
}

#[cfg(test)]
mod messages {
    use super::Error;
    use std::path::PathBuf;

    /// The thin-patch refusals read as one line of prose: no runs of
    /// spaces left by a broken string continuation.
    #[test]
    fn thin_patch_refusals_have_no_runs_of_spaces() {
        let path = PathBuf::from("fix.so");
        let errors = [
            Error::NotThin { path: path.clone() },
            Error::WrongBuild {
                path: path.clone(),
                patch: "aa".into(),
                host: "bb".into(),
            },
            Error::HostUnidentified { path: path.clone() },
            Error::HostNotExported { path: path.clone() },
            Error::MissingSymbols {
                path,
                symbols: vec!["svc::f".into()],
            },
        ];
        for e in errors {
            let text = e.to_string();
            assert!(!text.contains("  "), "{text}");
        }
    }
}
