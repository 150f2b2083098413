//! The host's table of patchable functions, the stack of implementations
//! of each, and the applied patches.
//!
//! Built on first use from the host's `SLOTS` slice (nothing runs at
//! start-up). One lock guards it; it is taken by the runtime's own
//! operations (load, revert, listing), never by a patchable call.
//!
//! Each function has a stack of layers, one per applied patch that
//! replaces it, in apply order. Its slot always holds the top layer's
//! implementation, or the original when the stack is empty. Reverting a
//! patch removes its layers wherever they are, so patches need not be
//! reverted in order.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, LazyLock};

use parking_lot::Mutex;

use crate::__private::{Entry, FnAddr, SHARED, SLOTS, SharedEntry};
use crate::error::Refusal;
use crate::manifest::Checked;
use crate::quiesce::Change;
use crate::{Error, FunctionInfo, Implementation, PatchId, PatchInfo};

pub(crate) static REGISTRY: LazyLock<Mutex<Registry>> =
    LazyLock::new(|| Mutex::new(Registry::new(&SLOTS, &SHARED)));

pub(crate) struct Registry {
    fns: Vec<FnState>,
    by_path: HashMap<&'static str, usize>,
    ambiguous: HashSet<&'static str>,
    shared: HashMap<&'static str, &'static SharedEntry>,
    applied: Vec<Applied>,
    next_id: u64,
}

struct FnState {
    entry: &'static Entry,
    layers: Vec<Layer>,
}

impl FnState {
    /// What the slot holds outside transitions.
    fn current(&self) -> FnAddr {
        self.layers
            .last()
            .map_or(self.entry.original, |l| l.implementation)
    }
}

struct Layer {
    patch: PatchId,
    implementation: FnAddr,
}

struct Applied {
    info: Arc<PatchInfo>,
    /// Which loaded library it came from (see `loader`).
    library: u64,
    /// The address of its library's `HOST_RAISE` cell: how the host's
    /// panic counter names it (`panic::panics_from`).
    panic_origin: usize,
    /// Indexes into `fns`.
    targets: Vec<usize>,
}

/// A checked patch, ready to commit: nothing can fail after this.
pub(crate) struct Plan {
    /// (host function index, replacement)
    replace: Vec<(usize, FnAddr)>,
    /// (slot of the patch's private copy, its cross function, host index)
    redirect: Vec<(&'static Entry, usize)>,
    /// (the patch's copy of a shared static, the host's)
    shared: Vec<(&'static SharedEntry, &'static SharedEntry)>,
    functions: Vec<String>,
}

impl Plan {
    pub(crate) fn replacements(&self) -> &[(usize, FnAddr)] {
        &self.replace
    }

    /// Paths of the functions it replaces, in the patch's order.
    pub(crate) fn functions(&self) -> &[String] {
        &self.functions
    }
}

impl Registry {
    fn new(slots: &'static [Entry], shared: &'static [SharedEntry]) -> Self {
        let mut by_path = HashMap::with_capacity(slots.len());
        let mut ambiguous = HashSet::new();
        for (i, e) in slots.iter().enumerate() {
            if by_path.insert(e.path, i).is_some() {
                ambiguous.insert(e.path);
            }
        }
        Registry {
            fns: slots
                .iter()
                .map(|entry| FnState {
                    entry,
                    layers: Vec::new(),
                })
                .collect(),
            by_path,
            ambiguous,
            shared: shared.iter().map(|s| (s.path, s)).collect(),
            applied: Vec::new(),
            next_id: 1,
        }
    }

    /// Checks everything about applying `m` (from library `library`)
    /// against this process and returns what to do. Changes nothing.
    pub(crate) fn plan(&self, library: u64, m: &Checked) -> Result<Plan, Refusal> {
        if let Some(a) = self.applied.iter().find(|a| a.library == library) {
            return Err(Refusal::AlreadyApplied {
                name: a.info.name.clone(),
                id: a.info.id,
            });
        }
        failpoint!("load::validate");
        let mut replace = Vec::with_capacity(m.functions.len());
        let mut seen = HashSet::with_capacity(m.functions.len());
        let mut functions = Vec::with_capacity(m.functions.len());
        for f in &m.functions {
            let theirs = f.target;
            failpoint!("load::resolve");
            let idx = self.resolve(theirs.path)?;
            if !seen.insert(idx) {
                return Err(Refusal::DuplicateTarget {
                    function: theirs.path.to_owned(),
                });
            }
            compatible(self.fns[idx].entry, theirs)?;
            replace.push((idx, f.code));
            functions.push(theirs.path.to_owned());
        }
        // The patch's private copies of patchable functions: each one the
        // host also has must call the host's, so it must be the same
        // function as the host's.
        let mut redirect = Vec::new();
        for &theirs in &m.slots {
            let Some(&idx) = self.by_path.get(theirs.path) else {
                continue; // Only in the patch: stays private.
            };
            if self.ambiguous.contains(theirs.path) {
                continue;
            }
            compatible(self.fns[idx].entry, theirs)?;
            redirect.push((theirs, idx));
        }
        let mut shared = Vec::new();
        for theirs in m.shared {
            let Some(&ours) = self.shared.get(theirs.path) else {
                continue; // Only in the patch: stays private.
            };
            if ours.fingerprint != theirs.fingerprint || ours.layout != theirs.layout {
                return Err(Refusal::LayoutMismatch {
                    function: ours.path.to_owned(),
                    detail: format!(
                        "shared static of type `{}` ({}) in this process but `{}` ({}) in the patch",
                        ours.ty, ours.layout, theirs.ty, theirs.layout
                    ),
                });
            }
            shared.push((theirs, ours));
        }
        Ok(Plan {
            replace,
            redirect,
            shared,
            functions,
        })
    }

    fn resolve(&self, function: &str) -> Result<usize, Refusal> {
        if self.ambiguous.contains(function) {
            return Err(Refusal::AmbiguousTarget {
                function: function.to_owned(),
            });
        }
        self.by_path
            .get(function)
            .copied()
            .ok_or_else(|| Refusal::UnknownTarget {
                function: function.to_owned(),
            })
    }

    /// Prepares the patch's image so that it may run: its copies of the
    /// service's slots call the host, and its panics are raised by the
    /// host. These are writes to the patch's own statics, which no thread
    /// runs yet (or, for a library applied before, set to these same
    /// values).
    pub(crate) fn prepare(&self, plan: &Plan, m: &Checked) {
        for (theirs, idx) in &plan.redirect {
            theirs
                .slot
                .redirect(theirs.cross, self.fns[*idx].entry.guarded);
        }
        for (theirs, ours) in &plan.shared {
            // SAFETY: `target` is the address of the `AtomicPtr` of the
            // patch's `Shared`, a static of the mapped library.
            let cell = unsafe { &*(theirs.target.0 as *const std::sync::atomic::AtomicPtr<()>) };
            // Release: pairs with the Acquire in `Shared::deref`.
            cell.store(
                ours.local.0 as *mut (),
                std::sync::atomic::Ordering::Release,
            );
        }
        // Not after an early overflow (a load that allowed a foreign
        // allocator): some live blocks of the patch came from the system
        // allocator untracked, and once the table is installed the patch
        // would hand them to the host's allocator when it frees them. Left
        // uninstalled, the patch keeps to the system allocator throughout,
        // which is what allowing a foreign allocator accepted.
        if let Some(cell) = m.host_allocator.filter(|_| !m.early_overflow) {
            let fns: &'static crate::__private::HostAllocFns = &crate::alloc::HOST_FNS;
            // Release: pairs with the Acquire in `HostAllocator`.
            cell.store(
                fns as *const _ as *mut _,
                std::sync::atomic::Ordering::Release,
            );
        }
        let raise: fn(crate::__private::Transport) -> ! = crate::__private::raise;
        // Release: published together with the slots (Release too, later in
        // program order); a thread that calls into the patch sees this.
        m.host_raise.store(
            raise as *const () as *mut (),
            std::sync::atomic::Ordering::Release,
        );
    }

    /// The slot changes that take patch `remove` out (if any) and put
    /// `add`'s replacements on top: what apply, revert and replace do.
    pub(crate) fn changes(&self, remove: Option<PatchId>, add: &[(usize, FnAddr)]) -> Vec<Change> {
        let mut affected: Vec<usize> = add.iter().map(|&(idx, _)| idx).collect();
        if let Some(id) = remove
            && let Some(a) = self.applied.iter().find(|a| a.info.id == id)
        {
            affected.extend(&a.targets);
        }
        affected.sort_unstable();
        affected.dedup();
        affected
            .into_iter()
            .filter_map(|idx| {
                let f = &self.fns[idx];
                let old = f.current();
                let new = match add.iter().find(|&&(i, _)| i == idx) {
                    Some(&(_, new)) => new,
                    None => f
                        .layers
                        .iter()
                        .rev()
                        .find(|l| Some(l.patch) != remove)
                        .map_or(f.entry.original, |l| l.implementation),
                };
                (old != new).then_some(Change {
                    entry: f.entry,
                    old,
                    new,
                })
            })
            .collect()
    }

    /// The patch `id`, if applied.
    pub(crate) fn info(&self, id: PatchId) -> Result<Arc<PatchInfo>, Error> {
        self.applied
            .iter()
            .find(|a| a.info.id == id)
            .map(|a| a.info.clone())
            .ok_or(Error::NotApplied { id })
    }

    /// Records an applied patch whose slots `quiesce::switch` changed.
    pub(crate) fn record_apply(
        &mut self,
        plan: Plan,
        m: &Checked,
        file: &Path,
        library: u64,
    ) -> Arc<PatchInfo> {
        let id = PatchId(self.next_id);
        self.next_id += 1;
        let info = Arc::new(PatchInfo {
            id,
            name: m.name.clone(),
            version: m.version.clone(),
            description: m.description.clone(),
            file: file.to_owned(),
            functions: plan.functions,
            applied_at: std::time::SystemTime::now(),
        });
        let mut targets = Vec::with_capacity(plan.replace.len());
        for (idx, implementation) in plan.replace {
            self.fns[idx].layers.push(Layer {
                patch: id,
                implementation,
            });
            targets.push(idx);
        }
        self.applied.push(Applied {
            info: info.clone(),
            library,
            panic_origin: std::ptr::from_ref(m.host_raise) as usize,
            targets,
        });
        info
    }

    /// The patch `id` and the slot changes that revert it.
    pub(crate) fn revert_changes(
        &self,
        id: PatchId,
    ) -> Result<(Arc<PatchInfo>, Vec<Change>), Error> {
        let info = self.info(id)?;
        Ok((info, self.changes(Some(id), &[])))
    }

    /// Records that patch `id` was reverted (its slots already switched).
    pub(crate) fn record_revert(&mut self, id: PatchId) {
        if let Some(pos) = self.applied.iter().position(|a| a.info.id == id) {
            let applied = self.applied.remove(pos);
            for idx in applied.targets {
                self.fns[idx].layers.retain(|l| l.patch != id);
            }
        }
    }

    /// The `panic::panics_from` key of the applied patch `id`.
    pub(crate) fn panic_origin(&self, id: PatchId) -> Option<usize> {
        self.applied
            .iter()
            .find(|a| a.info.id == id)
            .map(|a| a.panic_origin)
    }

    /// Libraries that applied patches come from.
    pub(crate) fn library_ids(&self) -> HashSet<u64> {
        self.applied.iter().map(|a| a.library).collect()
    }

    pub(crate) fn applied(&self) -> Vec<PatchInfo> {
        self.applied.iter().map(|a| (*a.info).clone()).collect()
    }

    /// Sorted by path.
    pub(crate) fn functions(&self, switching: &[&'static str]) -> Vec<FunctionInfo> {
        let mut out: Vec<FunctionInfo> = self
            .fns
            .iter()
            .map(|f| FunctionInfo {
                in_transition: switching.contains(&f.entry.path),
                path: f.entry.path,
                signature: f.entry.signature,
                implementation: match f.layers.last() {
                    None => Implementation::Original,
                    Some(l) => Implementation::Patch {
                        id: l.patch,
                        name: self
                            .applied
                            .iter()
                            .find(|a| a.info.id == l.patch)
                            .map(|a| a.info.name.clone())
                            .unwrap_or_default(),
                    },
                },
            })
            .collect();
        out.sort_by(|a, b| a.path.cmp(b.path));
        out
    }
}

/// Whether the patch's view of a function (`theirs`) is the host's
/// (`ours`): same signature fingerprint, same argument and return layouts.
fn compatible(ours: &Entry, theirs: &Entry) -> Result<(), Refusal> {
    if ours.fingerprint != theirs.fingerprint {
        return Err(Refusal::SignatureMismatch {
            function: ours.path.to_owned(),
            host: ours.signature.to_owned(),
            patch: theirs.signature.to_owned(),
        });
    }
    if ours.layouts.len() != theirs.layouts.len() {
        return Err(Refusal::LayoutMismatch {
            function: ours.path.to_owned(),
            detail: format!(
                "{} parameter and return types in this process, {} in the patch",
                ours.layouts.len(),
                theirs.layouts.len()
            ),
        });
    }
    let last = ours.layouts.len().saturating_sub(1);
    for (i, (a, b)) in ours.layouts.iter().zip(theirs.layouts).enumerate() {
        if a != b {
            let which = if i == last && !ours.signature.ends_with('!') {
                "the return type".to_owned()
            } else {
                format!("parameter {}", i + 1)
            };
            return Err(Refusal::LayoutMismatch {
                function: ours.path.to_owned(),
                detail: format!("{which} has {a} in this process but {b} in the patch"),
            });
        }
    }
    Ok(())
}
