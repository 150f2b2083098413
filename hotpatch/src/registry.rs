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

use crate::abi::{Entry, SLOTS};
use crate::error::Refusal;
use crate::manifest::Checked;
use crate::quiesce::Change;
use crate::slot::FnAddr;
use crate::{Error, FunctionInfo, Implementation, PatchId, PatchInfo};

pub(crate) static REGISTRY: LazyLock<Mutex<Registry>> =
    LazyLock::new(|| Mutex::new(Registry::new(&SLOTS)));

pub(crate) struct Registry {
    fns: Vec<FnState>,
    /// Index of each entry by its address: what a thin patch's target
    /// getter returns, and how it names the slot its code reads.
    by_entry: HashMap<usize, usize>,
    /// Index of each entry by its slot's address.
    by_slot: HashMap<usize, usize>,
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
    /// Its count of replacement calls that ended in a panic.
    panics: &'static std::sync::atomic::AtomicU64,
    /// Indexes into `fns`.
    targets: Vec<usize>,
}

/// A checked patch, ready to commit: nothing can fail after this.
pub(crate) struct Plan {
    /// (host function index, replacement)
    replace: Vec<(usize, FnAddr)>,
    /// (a slot reference cell of the patch, the host wrapper it must hold)
    slot_refs: Vec<(&'static crate::abi::SlotRef, FnAddr)>,
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
    fn new(slots: &'static [Entry]) -> Self {
        // Classifies the slots now: a binary without RELRO is warned about
        // when the registry is first used, not at its first patch.
        let _ = crate::slot::slot_table();
        let by_entry = slots
            .iter()
            .enumerate()
            .map(|(i, e)| (std::ptr::from_ref(e) as usize, i))
            .collect();
        let by_slot = slots
            .iter()
            .enumerate()
            .map(|(i, e)| (std::ptr::from_ref(e.slot) as usize, i))
            .collect();
        Registry {
            fns: slots
                .iter()
                .map(|entry| FnState {
                    entry,
                    layers: Vec::new(),
                })
                .collect(),
            by_entry,
            by_slot,
            applied: Vec::new(),
            next_id: 1,
        }
    }

    /// Checks everything about applying `m` (from library `library`)
    /// against this process and returns what to do. Changes nothing.
    ///
    /// A thin patch names its targets by symbol: each target getter is the
    /// host's own, so what it returns must be one of this process's
    /// entries (found by address, never by path: two versions of one crate
    /// linked into the host are two different functions).
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
            failpoint!("load::resolve");
            let Some(&idx) = self.by_entry.get(&(f.target as usize)) else {
                return Err(Refusal::UnknownTarget {
                    function: f.name.to_owned(),
                });
            };
            let ours = self.fns[idx].entry;
            if !seen.insert(idx) {
                return Err(Refusal::DuplicateTarget {
                    function: ours.path.to_owned(),
                });
            }
            compatible(ours, f.layouts)?;
            replace.push((idx, f.code));
            functions.push(ours.path.to_owned());
        }
        let mut slot_refs = Vec::with_capacity(m.slot_refs.len());
        for cell in m.slot_refs {
            // Relaxed: written by the dynamic loader's relocation, before
            // `dlopen` returned on this thread.
            let slot = cell.0.load(std::sync::atomic::Ordering::Relaxed) as usize;
            let wrapper = match self.by_slot.get(&slot) {
                Some(&idx) => self.fns[idx].entry.wrapper,
                // Already rewritten: the same bytes loaded before (the
                // library is reused), pointing at a wrapper of ours.
                None => match self
                    .fns
                    .iter()
                    .find(|f| f.entry.wrapper.as_ptr() as usize == slot)
                {
                    Some(f) => f.entry.wrapper,
                    None => {
                        return Err(Refusal::InvalidManifest(format!(
                            "a slot reference of the patch ({slot:#x}) is not the slot of a \
                             patchable function of this process"
                        )));
                    }
                },
            };
            slot_refs.push((cell, wrapper));
        }
        Ok(Plan {
            replace,
            slot_refs,
            functions,
        })
    }

    /// Prepares the patch's image so that it may run: each of its slot
    /// references holds the host's wrapper of that function. These are
    /// writes to the patch's own data, which no thread runs yet (or, for a
    /// library applied before, the same values again).
    pub(crate) fn prepare(&self, plan: &Plan) {
        for (cell, wrapper) in &plan.slot_refs {
            // Release: published before the slots that make the patch's
            // code reachable (Release too, later in program order), so a
            // thread that runs the patch sees the cell.
            cell.0.store(
                wrapper.as_ptr() as *mut (),
                std::sync::atomic::Ordering::Release,
            );
        }
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
        // By index: a linear search per function made this quadratic in
        // the size of the patch (3.7 M instructions of a 1000-function
        // load).
        let added: HashMap<usize, FnAddr> = add.iter().copied().collect();
        affected
            .into_iter()
            .filter_map(|idx| {
                let f = &self.fns[idx];
                let old = f.current();
                let new = match added.get(&idx) {
                    Some(&new) => new,
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
        placement: crate::Placement,
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
            placement,
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
            panics: m.panics,
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

    /// How many calls of the applied patch `id`'s replacements ended in a
    /// panic so far.
    pub(crate) fn panics(&self, id: PatchId) -> Option<u64> {
        self.applied
            .iter()
            .find(|a| a.info.id == id)
            // Relaxed: a statistic (see `PanicCount`).
            .map(|a| a.panics.load(std::sync::atomic::Ordering::Relaxed))
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

/// Whether the patch's view of a function's argument and return types
/// (`theirs`, as the patch crate was compiled) is the host's: the same
/// sizes and alignments. The patch names the host's own function, so this
/// holds unless the two were compiled from different definitions of a type.
fn compatible(ours: &Entry, theirs: &[crate::abi::TypeLayout]) -> Result<(), Refusal> {
    if ours.layouts.len() != theirs.len() {
        return Err(Refusal::LayoutMismatch {
            function: ours.path.to_owned(),
            detail: format!(
                "{} parameter and return types in this process, {} in the patch",
                ours.layouts.len(),
                theirs.len()
            ),
        });
    }
    let last = ours.layouts.len().saturating_sub(1);
    for (i, (a, b)) in ours.layouts.iter().zip(theirs).enumerate() {
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
