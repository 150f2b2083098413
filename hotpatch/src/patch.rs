//! Handles and descriptions of applied patches and patchable functions.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::Error;

/// Identifies one application of a patch, unique for the life of the
/// process.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct PatchId(pub(crate) u64);

impl PatchId {
    /// The number behind the id (ids count up from 1).
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for PatchId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "patch #{}", self.0)
    }
}

/// What an applied patch is: its identity and the functions it replaced.
///
/// # Examples
///
/// ```
/// for p in hotpatch::applied() {
///     println!("{} {} {} replaces {:?}", p.id, p.name, p.version, p.functions);
/// }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PatchInfo {
    pub id: PatchId,
    /// The patch crate's name (from `hotpatch::manifest!`).
    pub name: String,
    pub version: String,
    pub description: String,
    /// The file it was loaded from.
    pub file: PathBuf,
    /// Paths of the functions it replaces, in the patch's order.
    pub functions: Vec<String>,
    /// Of `functions`, those it replaces by redirecting their entry
    /// (functions that are not `#[patchable]`, see [`crate::hook`]).
    pub hooked: Vec<String>,
    /// When it was applied (the end of its transition).
    pub applied_at: std::time::SystemTime,
    /// Where its code was mapped: near the executable's code, or by the
    /// dynamic loader, and why.
    pub placement: Placement,
}

/// Where a patch's code was mapped (issue 22).
///
/// A patched call costs what the original call costs only if the patch's
/// code is near the executable's: hotpatch maps a thin patch itself,
/// within ±2 GiB of the executable's code, and applies its relocations.
/// Where it cannot (no free range there, or the patch needs what only the
/// dynamic loader provides, such as thread-locals), the patch is opened
/// by `dlopen` as before, wherever the dynamic loader maps it, and works
/// the same, a little slower per call.
///
/// # Examples
///
/// ```no_run
/// let patch = hotpatch::load("fix.so")?;
/// match patch.placement() {
///     hotpatch::Placement::Near { address, size } => {
///         println!("mapped at {address:#x}, {size} bytes")
///     }
///     hotpatch::Placement::Dlopen { reason } => println!("opened by dlopen: {reason}"),
///     _ => {}
/// }
/// # Ok::<(), hotpatch::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Placement {
    /// Mapped by hotpatch within ±2 GiB of the executable's code: its
    /// segments lie in `[address, address + size)`.
    Near { address: u64, size: u64 },
    /// Opened by the dynamic loader; `reason` says why not near.
    Dlopen { reason: crate::NearRefusal },
}

impl Placement {
    /// The patch's code is within ±2 GiB of the executable's.
    pub fn is_near(&self) -> bool {
        matches!(self, Placement::Near { .. })
    }
}

impl std::fmt::Display for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Placement::Near { .. } => f.write_str("near the executable's code"),
            Placement::Dlopen { reason } => write!(f, "opened by dlopen, not near: {reason}"),
        }
    }
}

/// A handle to an applied patch, returned by [`load`](crate::load).
///
/// Dropping the handle leaves the patch applied; [`revert`](Patch::revert)
/// takes it out.
///
/// # Examples
///
/// ```no_run
/// let patch = hotpatch::load("target/release/libfix.so")?;
/// println!("applied {}: {:?}", patch.id(), patch.functions());
/// patch.revert()?;
/// # Ok::<(), hotpatch::Error>(())
/// ```
#[derive(Debug)]
#[must_use = "dropping the handle keeps the patch applied; keep it to revert later"]
pub struct Patch {
    pub(crate) info: Arc<PatchInfo>,
}

impl Patch {
    pub fn id(&self) -> PatchId {
        self.info.id
    }
    pub fn name(&self) -> &str {
        &self.info.name
    }
    pub fn version(&self) -> &str {
        &self.info.version
    }
    pub fn description(&self) -> &str {
        &self.info.description
    }
    /// The file the patch was loaded from.
    pub fn file(&self) -> &Path {
        &self.info.file
    }
    /// Paths of the functions it replaces.
    pub fn functions(&self) -> &[String] {
        &self.info.functions
    }
    /// Of [`functions`](Self::functions), those it replaces by
    /// redirecting their entry ([`crate::hook`]).
    pub fn hooked(&self) -> &[String] {
        &self.info.hooked
    }
    /// Where its code was mapped (see [`Placement`]).
    pub fn placement(&self) -> &Placement {
        &self.info.placement
    }
    /// Everything above, as a value.
    pub fn info(&self) -> &PatchInfo {
        &self.info
    }

    /// How many calls of its replacements have ended in a panic so far
    /// (what a watch window, `apply --watch`, counts); `None` once the
    /// patch is reverted.
    ///
    /// ```no_run
    /// let patch = hotpatch::load("fix.so")?;
    /// // ... serve for a while ...
    /// if patch.panics().unwrap_or(0) > 0 {
    ///     patch.revert()?;
    /// }
    /// # Ok::<(), hotpatch::Error>(())
    /// ```
    pub fn panics(&self) -> Option<u64> {
        panics_of(self.info.id)
    }

    /// Takes the patch out: each function it replaced goes back to what
    /// implements it without this patch (the original, or another patch
    /// applied before or after this one). The library stays mapped (see
    /// the crate docs, "Unloading").
    ///
    /// # Errors
    ///
    /// [`Error::NotApplied`] if the patch was already reverted through
    /// [`revert`](crate::revert).
    pub fn revert(self) -> Result<(), Error> {
        crate::revert(self.info.id)
    }
}

/// What currently implements a patchable function.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Implementation {
    /// The function's own body.
    Original,
    /// A replacement from an applied patch.
    Patch { id: PatchId, name: String },
}

/// A patchable function of this process.
///
/// # Examples
///
/// ```
/// for f in hotpatch::functions() {
///     println!("{}  {}  {:?}", f.path, f.signature, f.implementation);
/// }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct FunctionInfo {
    /// `crate::module::f`, `crate::module::Type::m` or
    /// `<crate::module::Type as Trait>::m` (the module is the one the
    /// function or impl block is written in).
    pub path: &'static str,
    /// The signature as written.
    pub signature: &'static str,
    /// What implements it outside a transition: while a patch that
    /// replaces it is being applied, still the previous implementation;
    /// see `in_transition`.
    pub implementation: Implementation,
    /// A transition involving this function is in progress
    /// ([`transition`](crate::transition) tells which and who it waits
    /// for).
    pub in_transition: bool,
    /// Not `#[patchable]`: a function whose entry a patch redirected
    /// ([`crate::hook`]), listed while the redirection is in place (with
    /// an empty `signature`: the patch's builder checked it from source).
    pub hooked: bool,
}

/// Panics raised by the applied patch `id` so far (see [`Patch::panics`]);
/// `None` once it is not applied.
pub(crate) fn panics_of(id: PatchId) -> Option<u64> {
    crate::registry::REGISTRY.lock().panics(id)
}
