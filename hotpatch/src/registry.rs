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
//!
//! A *hooked* function (a patch's `HookFn`: a function of the executable
//! that has no slot of its own) is a function of the registry like a
//! `#[patchable]` one, with an entry the runtime makes when it first
//! redirects the function's entry ([`crate::hook`]): its slot is the
//! hook's, its original the trampoline (the original code), its wrapper
//! the function's address, its dispatcher the one every hook shares. Its
//! layers, transitions and listing are those of any function. The entry
//! jump is written when a patch first needs it (before the switch, the
//! slot at the trampoline, so calls still run the original) and removed
//! when no applied patch uses it any more (after the switch back). One
//! entry per distinct address, made once (`by_hook`): a function hooked
//! again reuses it, its slot and its trampoline.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use parking_lot::Mutex;

use crate::abi::{Entry, SLOTS};
use crate::error::Refusal;
use crate::manifest::{Checked, HookRecord};
use crate::quiesce::{Change, HookWrite};
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
    /// Index of each hooked function by its address.
    by_hook: HashMap<usize, usize>,
    applied: Vec<Applied>,
    next_id: u64,
}

struct FnState {
    entry: &'static Entry,
    layers: Vec<Layer>,
    /// A hooked function: its entry was made by the runtime.
    hooked: bool,
    /// A hooked function's redirection, while its entry jump is written.
    hook: Option<Installed>,
}

impl FnState {
    /// Listed by `functions()`: every `#[patchable]` function; a hooked
    /// one while its entry is redirected.
    fn listed(&self) -> bool {
        !self.hooked || self.hook.is_some() || !self.layers.is_empty()
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
type Installed = crate::hook::Hook;
/// No hooks on other platforms (`plan` refuses them).
#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
enum Installed {}

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

/// A checked patch, ready to commit: nothing can fail after this but the
/// entry writes of its hooks ([`Registry::install_hooks`]) and the switch.
pub(crate) struct Plan {
    /// (host function index, replacement); the hooks' once installed.
    replace: Vec<(usize, FnAddr)>,
    /// The functions it hooks, resolved.
    hooks: Vec<PlannedHook>,
    /// (a slot reference cell of the patch, the host wrapper it must hold)
    slot_refs: Vec<(&'static crate::abi::SlotRef, FnAddr)>,
    functions: Vec<String>,
    /// Of those, the hooked ones.
    hooked: Vec<String>,
}

/// A hook record resolved against this process.
struct PlannedHook {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    target: crate::hook::Target,
    record: HookRecord,
    /// Its function in the registry, if it was hooked before (always,
    /// once installed).
    idx: Option<usize>,
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
                    hooked: false,
                    hook: None,
                })
                .collect(),
            by_entry,
            by_slot,
            by_hook: HashMap::new(),
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
        let mut hooks = Vec::with_capacity(m.hooks.len());
        let mut hooked = Vec::with_capacity(m.hooks.len());
        let mut seen_hooks = HashSet::with_capacity(m.hooks.len());
        for h in &m.hooks {
            failpoint!("load::resolve");
            hooks.push(self.plan_hook(h, &mut seen_hooks)?);
            functions.push(h.path.to_owned());
            hooked.push(h.path.to_owned());
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
            hooks,
            slot_refs,
            functions,
            hooked,
        })
    }

    /// Resolves a hook record: a function of the executable starts at its
    /// target, it is not a `#[patchable]` function's (those are replaced
    /// through their slot), not hooked twice by the patch, and its code is
    /// what the patch expects: the running bytes, or under a redirection
    /// of ours the original bytes recorded when it was written; a function
    /// not redirected yet must allow it ([`crate::hook::Target::check`]).
    /// Changes nothing.
    fn plan_hook(&self, h: &HookRecord, seen: &mut HashSet<usize>) -> Result<PlannedHook, Refusal> {
        if let Some(f) = self.fns.iter().find(|f| {
            !f.hooked
                && [f.entry.original, f.entry.wrapper, f.entry.counted]
                    .iter()
                    .any(|a| a.as_ptr() as usize == h.target)
        }) {
            return Err(Refusal::HookOfPatchable {
                function: h.path.to_owned(),
                patchable: f.entry.path.to_owned(),
            });
        }
        if !seen.insert(h.target) {
            return Err(Refusal::DuplicateTarget {
                function: h.path.to_owned(),
            });
        }
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            use crate::hook::{Reason, Target};
            let refuse = |reason| Refusal::Hook {
                function: h.path.to_owned(),
                reason,
            };
            let target = Target::of(h.target as *const ()).map_err(|e| match e {
                Error::Hook { reason, .. } => refuse(reason),
                other => refuse(Reason::NotFound {
                    detail: other.to_string(),
                }),
            })?;
            // One body under several names: the hook would redirect the
            // callers of every one of them.
            let others = crate::hook::merged_with(h.target);
            if !others.is_empty() {
                return Err(refuse(Reason::Merged { others }));
            }
            let idx = self.by_hook.get(&h.target).copied();
            let ours = idx.is_some_and(|i| self.fns[i].hook.is_some());
            let recorded = crate::hook::recorded(h.target);
            let code = target.code();
            let mut original = code[..code.len().min(crate::manifest::MAX_ENTRY)].to_vec();
            match &recorded {
                Some((saved, true)) if ours => {
                    let n = saved.len().min(original.len());
                    original[..n].copy_from_slice(&saved[..n]);
                }
                // Redirected through `hotpatch::hook` by the program itself.
                Some((_, true)) => return Err(refuse(Reason::AlreadyHooked)),
                _ => {
                    target.check().map_err(|e| match e {
                        Error::Hook { reason, .. } => refuse(reason),
                        other => refuse(Reason::NotFound {
                            detail: other.to_string(),
                        }),
                    })?;
                }
            }
            if !h.entry.is_empty() && original.get(..h.entry.len()) != Some(h.entry) {
                return Err(refuse(Reason::EntryChanged {
                    expected: h.entry.to_vec(),
                    found: original[..h.entry.len().min(original.len())].to_vec(),
                }));
            }
            Ok(PlannedHook {
                target,
                record: *h,
                idx,
            })
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        Err(Refusal::InvalidManifest(format!(
            "`{}` is hooked: redirecting a function's entry needs x86-64 Linux",
            h.path
        )))
    }

    /// Writes the entry jump of each planned hook whose function is not
    /// redirected yet (its slot at the trampoline: calls still run the
    /// original code), all under one stop of the process, and makes each a
    /// function of the registry; adds every hook's replacement to the
    /// plan. Returns the functions it hooked (by index) and what the
    /// write did.
    ///
    /// On error nothing was written: every entry is as it was.
    pub(crate) fn install_hooks(
        &mut self,
        plan: &mut Plan,
        file: &Path,
        deadline: Duration,
    ) -> Result<(Vec<usize>, Option<HookWrite>), Error> {
        let mut installed = Vec::new();
        let mut write = None;
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            let new: Vec<usize> = (0..plan.hooks.len())
                .filter(
                    |&i| !matches!(plan.hooks[i].idx, Some(idx) if self.fns[idx].hook.is_some()),
                )
                .collect();
            if !new.is_empty() {
                let options = crate::hook::Options::default().deadline(deadline);
                let hooks = install(&plan.hooks, &new, &options, file)?;
                let report = hooks[0].report();
                let mut functions = Vec::new();
                for (&i, hook) in new.iter().zip(hooks) {
                    let idx = self.attach(&plan.hooks[i], hook);
                    plan.hooks[i].idx = Some(idx);
                    functions.push(self.fns[idx].entry.path.to_owned());
                    installed.push(idx);
                }
                write = Some(HookWrite {
                    op: "hook",
                    functions,
                    threads: report.threads,
                    pause: report.pause,
                    window: window_of(&report),
                    failed: None,
                });
            }
            for p in &plan.hooks {
                let idx = p.idx.expect("hooked above or before");
                plan.replace.push((idx, p.record.code));
            }
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        let _ = (plan, file, deadline);
        Ok((installed, write))
    }

    /// Makes `hook` the redirection of `p`'s function, adding the function
    /// to the registry the first time. Its slot and trampoline are the
    /// same at every install (the hook's memory is never reused for
    /// another function), so the entry made the first time stays right.
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    fn attach(&mut self, p: &PlannedHook, hook: Installed) -> usize {
        if let Some(idx) = p.idx {
            debug_assert!(std::ptr::eq(self.fns[idx].entry.slot, hook.slot()));
            self.fns[idx].hook = Some(hook);
            return idx;
        }
        let original = FnAddr::new(hook.original());
        // Leaked once per distinct function address (`by_hook`): bounded
        // by the functions of the executable. The path is copied: the
        // patch's library may be reclaimed.
        let entry: &'static Entry = Box::leak(Box::new(Entry {
            path: Box::leak(p.record.path.to_owned().into_boxed_str()),
            signature: "",
            fingerprint: 0,
            layouts: &[],
            slot: hook.slot(),
            original,
            wrapper: FnAddr::new(p.record.target as *const ()),
            dispatcher: crate::hook::dispatcher(),
            counted: original,
        }));
        self.fns.push(FnState {
            entry,
            layers: Vec::new(),
            hooked: true,
            hook: Some(hook),
        });
        let idx = self.fns.len() - 1;
        self.by_hook.insert(p.record.target, idx);
        idx
    }

    /// Removes the redirections of `installed` (what a failed apply wrote,
    /// under one stop) and returns `cause`, or [`Error::HooksLeftInstalled`]
    /// naming them if they could not be removed (they stay, their slots at
    /// the original code, and a later apply reuses them).
    pub(crate) fn undo_hooks(&mut self, installed: &[usize], file: &Path, cause: Error) -> Error {
        let (functions, result) = self.remove_hooks(installed, file);
        match result {
            Err(e) if !functions.is_empty() => Error::HooksLeftInstalled {
                cause: Box::new(cause),
                reasons: vec![e.to_string()],
                functions,
            },
            _ => cause,
        }
    }

    /// Removes the redirection of each hooked function of `candidates`
    /// that no applied patch replaces any more (after the switch that took
    /// the last layer out: its slot is at the trampoline), all under one
    /// stop. A removal that fails leaves the redirections in place and in
    /// the registry (calls run the original code through them; a later
    /// apply reuses them) and is reported, not an error: what the revert
    /// promised holds.
    pub(crate) fn release_hooks(&mut self, candidates: &[usize], file: &Path) -> Vec<HookWrite> {
        let unused: Vec<usize> = candidates
            .iter()
            .copied()
            .filter(|&idx| {
                let f = &self.fns[idx];
                f.hooked && f.layers.is_empty() && f.hook.is_some()
            })
            .collect();
        let (functions, result) = self.remove_hooks(&unused, file);
        if functions.is_empty() {
            return Vec::new();
        }
        vec![match result {
            Ok((threads, pause, window)) => HookWrite {
                op: "unhook",
                functions,
                threads,
                pause,
                window,
                failed: None,
            },
            Err(e) => {
                #[cfg(feature = "control")]
                for function in &functions {
                    tracing::warn!(
                        target: "hotpatch::control",
                        function = function.as_str(),
                        "hotpatch: the entry of `{function}` stays redirected to its original code \
                         (calls run the original): {e}"
                    );
                }
                HookWrite {
                    op: "unhook",
                    functions,
                    threads: 0,
                    pause: Duration::ZERO,
                    window: None,
                    failed: Some(e.to_string()),
                }
            }
        }]
    }

    /// Writes the original entries of the hooked functions `indexes` back
    /// under one stop. Returns their paths and what the stop did; on
    /// error every one keeps its redirection.
    fn remove_hooks(
        &mut self,
        indexes: &[usize],
        file: &Path,
    ) -> (Vec<String>, Result<Unhooked, Error>) {
        let mut taken = Vec::new();
        for &idx in indexes {
            if let Some(hook) = self.fns[idx].hook.take() {
                taken.push((idx, hook));
            }
        }
        let functions = taken
            .iter()
            .map(|(idx, _)| self.fns[*idx].entry.path.to_owned())
            .collect();
        if taken.is_empty() {
            return (functions, Ok((0, Duration::ZERO, None)));
        }
        let hooks: Vec<&Installed> = taken.iter().map(|(_, h)| h).collect();
        let result = unhook(&hooks, file);
        if result.is_err() {
            for (idx, hook) in taken {
                self.fns[idx].hook = Some(hook);
            }
        }
        (functions, result)
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
            hooked: plan.hooked,
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

    /// Records that patch `id` was reverted (its slots already switched);
    /// returns the functions it replaced.
    pub(crate) fn record_revert(&mut self, id: PatchId) -> Vec<usize> {
        let Some(pos) = self.applied.iter().position(|a| a.info.id == id) else {
            return Vec::new();
        };
        let applied = self.applied.remove(pos);
        for &idx in &applied.targets {
            self.fns[idx].layers.retain(|l| l.patch != id);
        }
        applied.targets
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
            .filter(|f| f.listed())
            .map(|f| FunctionInfo {
                in_transition: switching.contains(&f.entry.path),
                hooked: f.hooked,
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

/// Redirects the entries of `planned[i]` for each `i` of `which`, for a
/// patch loaded from `file`, under one stop.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn install(
    planned: &[PlannedHook],
    which: &[usize],
    options: &crate::hook::Options,
    file: &Path,
) -> Result<Vec<Installed>, Error> {
    // Once per function, before anything is written.
    for _ in which {
        failpoint!("load::hook", file);
    }
    let targets: Vec<crate::hook::Target> =
        which.iter().map(|&i| planned[i].target.clone()).collect();
    crate::hook::install_all(&targets, options).map_err(|e| match e {
        Error::Hook {
            reason, function, ..
        } => Error::HookRefused {
            path: file.to_owned(),
            function: which
                .iter()
                .map(|&i| &planned[i])
                .find(|p| p.target.name() == function)
                .map_or(function, |p| p.record.path.to_owned()),
            reason,
        },
        other => other,
    })
}

/// What an entry write-back did: threads interrupted, the longest any was
/// kept from running, the breakpoint window (`HookWrite`).
type Unhooked = (usize, Duration, Option<Duration>);

/// The breakpoint protocol's window, `None` under the stop-the-world.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn window_of(report: &crate::hook::Report) -> Option<Duration> {
    match report.protocol {
        crate::hook::Protocol::Breakpoint => Some(report.window),
        _ => None,
    }
}

/// Writes the entries of `hooks` back in one operation; returns what it
/// did to the threads.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn unhook(hooks: &[&Installed], file: &Path) -> Result<Unhooked, Error> {
    failpoint!("hook::unhook", file);
    let _ = file;
    crate::hook::unhook_all(hooks).map(|r| (r.threads, r.pause, window_of(&r)))
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn unhook(hooks: &[&Installed], _file: &Path) -> Result<Unhooked, Error> {
    match *hooks[0] {}
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use super::*;
    use crate::manifest::HookRecord;
    use crate::slot::Slot;

    #[inline(never)]
    fn marked(x: u64) -> u64 {
        std::hint::black_box(x) ^ 0x55
    }

    #[inline(never)]
    fn unmarked(x: u64) -> u64 {
        std::hint::black_box(x).wrapping_mul(7)
    }

    fn replacement(x: u64) -> u64 {
        x
    }

    static SLOT: Slot = Slot::new(marked as *const ());
    static PANICS: AtomicU64 = AtomicU64::new(0);

    /// A registry whose one patchable function is `marked` (its original).
    fn registry() -> Registry {
        let entry = Entry {
            path: "t::marked",
            signature: "fn marked(x: u64) -> u64",
            fingerprint: 1,
            layouts: &[],
            slot: &SLOT,
            original: FnAddr::new(marked as *const ()),
            wrapper: FnAddr::new(marked as *const ()),
            dispatcher: FnAddr::new(marked as *const ()),
            counted: FnAddr::new(marked as *const ()),
        };
        Registry::new(Box::leak(Box::new([entry])))
    }

    fn hooking(targets: &[(usize, &'static str)]) -> Checked {
        Checked {
            name: "t".into(),
            version: "1".into(),
            description: String::new(),
            functions: Vec::new(),
            hooks: targets
                .iter()
                .map(|&(target, path)| HookRecord {
                    target,
                    code: FnAddr::new(replacement as *const ()),
                    entry: &[],
                    path,
                })
                .collect(),
            slot_refs: &[],
            panics: &PANICS,
            init: None,
        }
    }

    /// A patch may not hook a `#[patchable]` function: it is replaced
    /// through its slot, and the refusal names it.
    #[test]
    fn hooking_a_patchable_function_is_refused_naming_it() {
        let plan = registry().plan(1, &hooking(&[(marked as *const () as usize, "t::alias")]));
        match plan {
            Err(Refusal::HookOfPatchable {
                function,
                patchable,
            }) => assert_eq!(
                (function.as_str(), patchable.as_str()),
                ("t::alias", "t::marked")
            ),
            Err(other) => panic!("{other:?}"),
            Ok(_) => panic!("planned"),
        }
    }

    // One body under two names, as the compiler leaves identical functions
    // it merged (at -O; this test builds unoptimised, so the merge is
    // written out).
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    std::arch::global_asm!(
        ".pushsection .text.__hotpatch_test_merged,\"ax\",@progbits",
        ".p2align 4",
        ".globl __hotpatch_test_merged_a",
        ".type __hotpatch_test_merged_a,@function",
        ".globl __hotpatch_test_merged_b",
        ".type __hotpatch_test_merged_b,@function",
        "__hotpatch_test_merged_a:",
        "__hotpatch_test_merged_b:",
        "    push rbp",
        "    mov rbp, rsp",
        "    lea rax, [rdi + 1]",
        "    pop rbp",
        "    ret",
        ".size __hotpatch_test_merged_a, . - __hotpatch_test_merged_a",
        ".size __hotpatch_test_merged_b, . - __hotpatch_test_merged_b",
        ".popsection",
    );

    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    unsafe extern "C" {
        fn __hotpatch_test_merged_a(x: u64) -> u64;
    }

    /// A function whose body is another's too (one address, two names in
    /// the symbol table) is not hooked: the hook would redirect the other
    /// function's callers as well. The refusal names the other.
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    #[test]
    fn a_body_merged_with_another_function_is_refused_naming_it() {
        let f = __hotpatch_test_merged_a as *const () as usize;
        let plan = registry().plan(1, &hooking(&[(f, "t::merged_a")]));
        match plan {
            Err(Refusal::Hook {
                function,
                reason: crate::hook::Reason::Merged { others },
            }) => {
                assert_eq!(function, "t::merged_a");
                assert_eq!(others.len(), 1, "{others:?}");
                assert!(others[0].contains("__hotpatch_test_merged_"), "{others:?}");
            }
            Err(other) => panic!("{other:?}"),
            Ok(_) => panic!("planned"),
        }
    }

    /// One function hooked twice by one patch is refused.
    #[test]
    fn a_function_hooked_twice_is_refused() {
        let f = unmarked as *const () as usize;
        let plan = registry().plan(1, &hooking(&[(f, "t::unmarked"), (f, "t::unmarked")]));
        assert!(
            matches!(&plan, Err(Refusal::DuplicateTarget { function }) if function == "t::unmarked"),
            "{:?}",
            plan.err()
        );
    }

    /// A target that is not the start of a function of the executable is
    /// refused, naming the function; an unmarked function's start plans
    /// (nothing written: not listed).
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    #[test]
    fn a_target_must_start_a_function() {
        let registry = registry();
        let plan = registry.plan(
            1,
            &hooking(&[(unmarked as *const () as usize + 1, "t::unmarked")]),
        );
        assert!(
            matches!(&plan, Err(Refusal::Hook { function, reason: crate::hook::Reason::NotFound { .. } })
                if function == "t::unmarked"),
            "{:?}",
            plan.err()
        );
        let plan = registry
            .plan(
                1,
                &hooking(&[(unmarked as *const () as usize, "t::unmarked")]),
            )
            .map_err(|e| format!("{e:?}"))
            .unwrap();
        assert_eq!(plan.functions(), ["t::unmarked"]);
        assert!(plan.replacements().is_empty(), "nothing installed yet");
        assert!(registry.functions(&[]).iter().all(|f| !f.hooked));
    }
}
