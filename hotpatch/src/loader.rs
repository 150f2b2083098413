//! Loading a patch file: read, private copy, open, check, apply.

use std::fs;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use libc::RTLD_NOLOAD;
use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};
use parking_lot::Mutex;

use crate::abi::{MANIFEST_SYMBOL, Manifest};
use crate::error::Refusal;
use crate::near::{self, NearImage, NearRefusal};
use crate::quiesce::TransitionReport;
use crate::registry::REGISTRY;
use crate::trust::{self, TrustedKey};
use crate::{Error, Patch, PatchId, Placement, elf, host, manifest, metrics, quiesce, sys};

/// Options for loading patches.
///
/// [`load`](crate::load) is `Loader::new().load(path)`; later versions add
/// options here (deadlines, trust policy) without changing that call.
///
/// # Examples
///
/// ```no_run
/// let patch = hotpatch::Loader::new().load("fix.so")?;
/// # Ok::<(), hotpatch::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Loader {
    deadline: Duration,
    policy: trust::Policy,
    near: Near,
}

/// The near loader's options (see [`Loader::near`],
/// [`Loader::perf_map`] and [`Loader::debugger`]).
#[derive(Clone, Copy, Debug)]
struct Near {
    on: bool,
    perf_map: bool,
    debugger: bool,
}

impl Default for Loader {
    fn default() -> Self {
        Loader {
            deadline: DEFAULT_DEADLINE,
            policy: trust::Policy::default(),
            near: Near {
                on: true,
                perf_map: std::env::var_os("HOTPATCH_PERF_MAP").is_some_and(|v| v == "1"),
                debugger: true,
            },
        }
    }
}

/// The largest patch file a [`Loader`] reads by default
/// ([`Loader::max_file_size`]).
pub const DEFAULT_MAX_FILE_SIZE: u64 = 64 << 20;

/// How long a transition waits for registered threads by default.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(5);

/// Libraries opened so far. Never closed: code from a library may be
/// running, or be pointed to by a `&'static str`, a vtable or a
/// thread-local destructor, for as long as the process lives (see the
/// crate docs, "Unloading").
static LIBRARIES: LazyLock<Mutex<Vec<Loaded>>> = LazyLock::new(|| Mutex::new(Vec::new()));

struct Loaded {
    /// Stable identity (indexes shift when a library is reclaimed).
    id: u64,
    digest: u64,
    /// The private copy, kept open: its bytes identify the library, and
    /// while it is open its `/proc/self/fd` path is not reused.
    copy: fs::File,
    handle: Handle,
    manifest: *const Manifest,
    /// Where its code is, and why there.
    placement: Placement,
    /// What it was opened as (`/proc/self/fd/N`).
    path: std::path::PathBuf,
    /// Its code registers thread-local destructors: never closed (see
    /// `host::Needs::tls_destructors`).
    keep: bool,
}

/// Private copies of reclaimed libraries that the dynamic loader still
/// keeps mapped (glibc defers unmapping while thread-local destructors
/// registered by the library are pending). Their descriptors stay open so
/// that a later copy cannot get the same `/proc/self/fd` path, which
/// `dlopen` would answer with the old, still-mapped library.
static ZOMBIES: Mutex<Vec<(fs::File, std::path::PathBuf)>> = Mutex::new(Vec::new());

/// How a library was opened: mapped near the executable by `near.rs`, or
/// by the dynamic loader.
enum Handle {
    Near(NearImage),
    Dlopen(Library),
}

static NEXT_LIBRARY: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

// SAFETY: `manifest` points to immutable data of a library that is never
// unmapped; the other fields are Send.
unsafe impl Send for Loaded {}

impl Loader {
    /// Default options.
    pub fn new() -> Self {
        Loader::default()
    }

    /// How long a load or revert waits, first for another transition to
    /// finish, then for every online registered thread to reach a
    /// safepoint ([`quiescent`](crate::quiescent)). Default: 5 s.
    ///
    /// When registered threads do not all arrive in time, the transition
    /// is reversed and [`Error::Timeout`] names them; threads that had
    /// already switched go back at their next safepoint.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// let patch = hotpatch::Loader::new()
    ///     .deadline(Duration::from_millis(500))
    ///     .load("fix.so")?;
    /// # Ok::<(), hotpatch::Error>(())
    /// ```
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// The largest patch file this loader reads, in bytes (default
    /// [`DEFAULT_MAX_FILE_SIZE`], 64 MiB; a thin patch is usually well
    /// under 1 MiB). A larger file is refused with [`Error::Read`] before
    /// any of it is read; so is a file that does not start with the ELF
    /// magic. At most this much memory is used per load or check.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// // Fat patches with debug info.
    /// let patch = hotpatch::Loader::new().max_file_size(256 << 20).load("fix.so")?;
    /// # Ok::<(), hotpatch::Error>(())
    /// ```
    pub fn max_file_size(mut self, bytes: u64) -> Self {
        self.policy.max_file = bytes;
        self
    }

    /// Accepts patch files whatever their owner and permissions, and those
    /// of the directories above them. By default a file that someone other
    /// than this process's user (or root) could have written is refused
    /// with [`Error::Untrusted`], as ssh and sudo refuse such files.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// // A development box where patches come from a shared build directory.
    /// let patch = hotpatch::Loader::new().allow_insecure_permissions().load("fix.so")?;
    /// # Ok::<(), hotpatch::Error>(())
    /// ```
    pub fn allow_insecure_permissions(mut self) -> Self {
        self.policy.allow_insecure_permissions = true;
        self
    }

    /// Requires every patch to carry a valid minisign signature
    /// (`<file>.minisig`) by `key` or another trusted key. Checked on the
    /// bytes that are then loaded, before the library is opened.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// let key = hotpatch::TrustedKey::from_file("/etc/my-service/patches.pub")?;
    /// let patch = hotpatch::Loader::new().trusted_key(key).load("fix.so")?;
    /// # Ok::<(), hotpatch::Error>(())
    /// ```
    pub fn trusted_key(mut self, key: TrustedKey) -> Self {
        self.policy.keys.push(key);
        self
    }

    /// Whether patches are mapped near the executable's code (default:
    /// yes). With `false`, every patch is opened by the dynamic loader
    /// (`dlopen`), wherever it maps it, as before near placement
    /// (issue 22); [`Patch::placement`](crate::Patch::placement) says
    /// which it was.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// let patch = hotpatch::Loader::new().near(false).load("fix.so")?;
    /// assert!(!patch.placement().is_near());
    /// # Ok::<(), hotpatch::Error>(())
    /// ```
    pub fn near(mut self, near: bool) -> Self {
        self.near.on = near;
        self
    }

    /// Whether a patch mapped near the executable has its functions
    /// appended to `/tmp/perf-<pid>.map`, the file `perf` reads to name
    /// code it finds no object file for (default: only if the environment
    /// variable `HOTPATCH_PERF_MAP` is `1`). The file is opened without
    /// following a symbolic link and written only if it is this user's
    /// regular file; it stays after the process exits, as `perf` expects.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// let patch = hotpatch::Loader::new().perf_map(true).load("fix.so")?;
    /// # Ok::<(), hotpatch::Error>(())
    /// ```
    pub fn perf_map(mut self, write: bool) -> Self {
        self.near.perf_map = write;
        self
    }

    /// Whether a patch mapped near the executable is registered with
    /// debuggers through the GDB JIT interface (default: yes), so that
    /// gdb (or lldb) attached to the service names its functions and
    /// unwinds through their frames; it is taken out of the list when
    /// [`reclaim`](Self::reclaim) unmaps it. It costs one small in-memory
    /// ELF file per load (the patch's function names and unwind table).
    /// If it cannot be registered, the load goes on and a `tracing`
    /// warning says debuggers will not see it. A patch opened by `dlopen`
    /// (see [`near`](Self::near)) is not registered here (the dynamic
    /// loader lists it).
    ///
    /// Turn it off in a process where another JIT (LLVM's, wasmtime's)
    /// registers code in the same list: each runtime guards the list with
    /// its own lock, so two changes at the same instant can corrupt it
    /// (see [`internals`](crate::internals), "Near placement"). std's own backtraces cannot name patch frames either
    /// way (std reads symbols from the files the dynamic loader lists);
    /// gdb and the perf map ([`perf_map`](Self::perf_map)) can.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// // This service also runs an LLVM JIT registered with gdb.
    /// let patch = hotpatch::Loader::new().debugger(false).load("fix.so")?;
    /// # Ok::<(), hotpatch::Error>(())
    /// ```
    pub fn debugger(mut self, register: bool) -> Self {
        self.near.debugger = register;
        self
    }

    /// Reverts `patch`, waiting for registered threads as [`load`](Self::load)
    /// does.
    ///
    /// # Errors
    ///
    /// [`Error::NotApplied`], [`Error::Busy`], [`Error::Timeout`] (the
    /// patch stays applied).
    pub fn revert(&self, patch: Patch) -> Result<(), Error> {
        self.revert_id(patch.id())
    }

    /// Reverts the applied patch `id`; see [`revert`](Self::revert).
    pub fn revert_id(&self, id: PatchId) -> Result<(), Error> {
        self.revert_reported(id).map(|_| ())
    }

    /// [`revert_id`](Self::revert_id), returning what its transition
    /// waited for (the control endpoint's events say it).
    pub(crate) fn revert_reported(&self, id: PatchId) -> Result<Option<TransitionReport>, Error> {
        let started = Instant::now();
        let result = self.revert_switch(id);
        metrics::reverted(result.as_ref().err(), started.elapsed());
        result
    }

    fn revert_switch(&self, id: PatchId) -> Result<Option<TransitionReport>, Error> {
        let what = format!("revert {id}");
        let turn = self.take_turn(&what)?;
        let (info, changes) = REGISTRY.lock().revert_changes(id)?;
        failpoint!("revert::apply", &info.file);
        let what = format!("revert {id} ({})", info.name);
        let (turn, report) = self.switch(turn, what, changes)?;
        let released = {
            let mut registry = REGISTRY.lock();
            let targets = registry.record_revert(id);
            // Hooked functions no patch replaces any more: their entry
            // written back, still under the turn.
            registry.release_hooks(&targets, &info.file)
        };
        drop(turn);
        Ok(with_hooks(report, released))
    }

    /// Loads the patch at `path`, checks it against this process, and
    /// applies every function it replaces, or none.
    ///
    /// The file is read once; the library is opened from a private copy of
    /// those bytes, so a patch rebuilt at the same path is new code, and a
    /// file changed after the read cannot change what runs. Loading bytes
    /// identical to a library already opened reuses it.
    ///
    /// # Errors
    ///
    /// Every way the file can be unfit has its own [`Error`] variant; on
    /// error no slot has changed. A library that opened but failed the
    /// checks stays mapped (its initialisers ran; see the crate docs), and
    /// is reused if the same bytes are loaded again.
    pub fn load(&self, path: impl AsRef<Path>) -> Result<Patch, Error> {
        self.load_reported(path.as_ref()).map(|(patch, _)| patch)
    }

    /// [`load`](Self::load), returning what its transition waited for.
    pub(crate) fn load_reported(
        &self,
        path: &Path,
    ) -> Result<(Patch, Option<TransitionReport>), Error> {
        self.apply_counted("apply", path, None)
    }

    /// Replaces the applied patch `old` by the patch at `path` (typically a
    /// cumulative patch: everything `old` fixed, and more) in one
    /// transition: every function either patch replaces switches from what
    /// implements it now to what implements it with `old` taken out and the
    /// new patch applied. Registered threads never see a state with
    /// neither, or both half-way.
    ///
    /// # Errors
    ///
    /// As [`load`](Self::load), and [`Error::NotApplied`] if `old` is not
    /// applied. On error `old` stays applied and nothing changed.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// let v1 = hotpatch::load("fix-v1.so")?;
    /// let v2 = hotpatch::Loader::new().replace(v1.id(), "fix-v2.so")?;
    /// # Ok::<(), hotpatch::Error>(())
    /// ```
    pub fn replace(&self, old: PatchId, path: impl AsRef<Path>) -> Result<Patch, Error> {
        self.replace_reported(old, path.as_ref())
            .map(|(patch, _)| patch)
    }

    /// [`replace`](Self::replace), returning what its transition waited
    /// for.
    pub(crate) fn replace_reported(
        &self,
        old: PatchId,
        path: &Path,
    ) -> Result<(Patch, Option<TransitionReport>), Error> {
        self.apply_counted("replace", path, Some(old))
    }

    fn apply_counted(
        &self,
        op: &'static str,
        path: &Path,
        replacing: Option<PatchId>,
    ) -> Result<(Patch, Option<TransitionReport>), Error> {
        let started = Instant::now();
        let result = self.apply(path, replacing);
        metrics::loaded(op, result.as_ref().err(), started.elapsed());
        result
    }

    /// Waits (within the deadline) for the transition lock.
    fn take_turn(&self, what: &str) -> Result<quiesce::Turn, Error> {
        quiesce::take_turn(self.deadline).ok_or_else(|| Error::Busy {
            what: what.to_owned(),
            waited: self.deadline,
        })
    }

    /// Runs a transition; on timeout (reversed) names the stalled threads.
    fn switch(
        &self,
        turn: quiesce::Turn,
        what: String,
        changes: Vec<quiesce::Change>,
    ) -> Result<(quiesce::Turn, Option<TransitionReport>), Error> {
        quiesce::switch(turn, what.clone(), changes, self.deadline)
            .map_err(|failed| failed.into_error(what, self.deadline))
    }

    fn apply(
        &self,
        path: &Path,
        replacing: Option<PatchId>,
    ) -> Result<(Patch, Option<TransitionReport>), Error> {
        let bytes = trust::read(path, &self.policy)?;
        failpoint!("load::read", path);
        // One transition at a time (loads, reverts, replaces, reclaims).
        let turn = self.take_turn(&format!("load {}", path.display()))?;
        if let Some(id) = replacing {
            // Before opening anything: a replace of nothing runs no code.
            REGISTRY.lock().info(id)?;
        }
        let mut libraries = LIBRARIES.lock();
        let (library, checked) = open_checked(&mut libraries, &turn, path, &bytes, self.near)?;
        let placement = libraries
            .iter()
            .find(|l| l.id == library)
            .map(|l| l.placement.clone())
            .unwrap_or(Placement::Dlopen {
                reason: NearRefusal::Off,
            });
        let (mut plan, old) = {
            let registry = REGISTRY.lock();
            let old = replacing.map(|id| registry.info(id)).transpose()?;
            let plan = registry.plan(library, &checked).map_err(|r| r.at(path))?;
            registry.prepare(&plan);
            (plan, old)
        };
        drop(libraries);
        run_init(&checked).map_err(|r| r.at(path))?;
        failpoint!("load::apply", path);
        // The entry jumps of hooked functions not redirected yet (their
        // slots at the original code), all under one stop, then the
        // changes, hooks included.
        let ((installed, hooked), changes) = {
            let mut registry = REGISTRY.lock();
            let installed = registry.install_hooks(&mut plan, path, self.hook_deadline())?;
            let changes = registry.changes(replacing, plan.replacements());
            (installed, changes)
        };
        let what = match &old {
            Some(old) => format!(
                "replace {} ({}) by {} from {}",
                old.id,
                old.name,
                checked.name,
                path.display()
            ),
            None => format!("apply {} from {}", checked.name, path.display()),
        };
        let (turn, report) = match quiesce::switch(turn, what.clone(), changes, self.deadline) {
            Ok(done) => done,
            Err(mut failed) => {
                let turn = failed.take_turn();
                let error = failed.into_error(what, self.deadline);
                return Err(match turn {
                    // Every slot is back: write the entries back too.
                    Some(turn) => {
                        let error = REGISTRY.lock().undo_hooks(&installed, path, error);
                        drop(turn);
                        error
                    }
                    // A background thread finishes the reversal: the
                    // slots end at the original code, the entries stay
                    // redirected (a later apply reuses them).
                    None if !installed.is_empty() => Error::HooksLeftInstalled {
                        cause: Box::new(error),
                        functions: hooked.map(|w| w.functions).unwrap_or_default(),
                        reasons: vec![
                            "the transition is still being reversed in the background".into(),
                        ],
                    },
                    None => error,
                });
            }
        };
        let (info, released) = {
            let mut registry = REGISTRY.lock();
            let replaced = match replacing {
                Some(old) => registry.record_revert(old),
                None => Vec::new(),
            };
            let info = registry.record_apply(plan, &checked, path, library, placement);
            // Functions the replaced patch hooked and the new one does not.
            let released = registry.release_hooks(&replaced, path);
            (info, released)
        };
        drop(turn);
        let writes = hooked.into_iter().chain(released);
        Ok((Patch { info }, with_hooks(report, writes.collect())))
    }

    /// How long a hook's entry write may wait for the threads: the
    /// hook's default (1 s), or less if this loader's deadline is shorter.
    fn hook_deadline(&self) -> Duration {
        self.deadline.min(Duration::from_secs(1))
    }
}

/// `report` with the entry writes of hooked functions made around its
/// transition (a report of its own if the switch changed nothing).
fn with_hooks(
    report: Option<TransitionReport>,
    writes: Vec<quiesce::HookWrite>,
) -> Option<TransitionReport> {
    if writes.is_empty() {
        return report;
    }
    let mut report = report.unwrap_or_default();
    report.hooks.extend(writes);
    Some(report)
}

/// Loads and applies the patch at `path` with default options.
///
/// See [`Loader::load`].
///
/// # Examples
///
/// ```no_run
/// let patch = hotpatch::load("target/release/libpricing_fix.so")?;
/// println!("{} {} applied as {}", patch.name(), patch.version(), patch.id());
/// # Ok::<(), hotpatch::Error>(())
/// ```
pub fn load(path: impl AsRef<Path>) -> Result<Patch, Error> {
    Loader::new().load(path)
}

/// A cheap identity for a file's bytes: its size and its first and last
/// 64 KiB (ELF headers, section tables, build ids). Two files with the
/// same digest are compared byte for byte before one is taken for the
/// other, so this only decides how often that happens.
fn digest(bytes: &[u8]) -> u64 {
    const EDGE: usize = 64 * 1024;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.len().hash(&mut h);
    bytes[..bytes.len().min(EDGE)].hash(&mut h);
    bytes[bytes.len().saturating_sub(EDGE)..].hash(&mut h);
    h.finish()
}

/// What `apply` and `check` share: the library holding exactly `bytes`
/// (opened if need be) and its checked manifest. `_turn` is the transition
/// turn, which keeps the library mapped while its manifest is read (only
/// `reclaim` unmaps, and it needs the turn).
fn open_checked(
    libraries: &mut Vec<Loaded>,
    _turn: &quiesce::Turn,
    path: &Path,
    bytes: &[u8],
    near: Near,
) -> Result<(u64, manifest::Checked), Error> {
    let (library, m) = open(libraries, path, bytes, near)?;
    if m.is_null() {
        return Err(Error::NoManifest {
            path: path.to_owned(),
            symbol: MANIFEST_SYMBOL,
        });
    }
    failpoint!("load::manifest", path);
    // SAFETY: `m` is the manifest symbol's address in a library that is
    // not unmapped while the caller holds the transition turn (`_turn`).
    let checked = unsafe { manifest::check(m) }.map_err(|r| r.at(path))?;
    Ok((library, checked))
}

/// The id and manifest of the library holding exactly `bytes`, opening it
/// if no library does yet: mapped near the executable if `near` and the
/// patch allows it (`near.rs`), else by the dynamic loader.
fn open(
    libraries: &mut Vec<Loaded>,
    path: &Path,
    bytes: &[u8],
    near: Near,
) -> Result<(u64, *const Manifest), Error> {
    let digest = digest(bytes);
    for l in libraries.iter() {
        if l.digest == digest {
            let same = sys::same_bytes(&l.copy, bytes).map_err(|source| Error::Copy {
                path: path.to_owned(),
                source,
            })?;
            if same {
                return Ok((l.id, l.manifest));
            }
        }
    }
    elf::check(bytes).map_err(|reason| Error::NotLoadable {
        path: path.to_owned(),
        reason,
    })?;
    let keep = bound_to_this_binary(path, bytes)?;
    failpoint!("load::copy", path);
    let label = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "patch".into());
    let copy = sys::private_copy(&label, bytes).map_err(|source| Error::Copy {
        path: path.to_owned(),
        source,
    })?;
    failpoint!("load::dlopen", path);
    let placed = if near.on {
        // SAFETY: mapping the patch runs its initialisers. The patch is
        // code the operator chose to load (see the crate docs, "Safety
        // model"); `copy` is the sealed private copy of exactly `bytes`.
        unsafe { near::open(&copy.file, bytes, near.perf_map, near.debugger) }
    } else {
        Err(NearRefusal::Off)
    };
    let (handle, manifest, placement) = match placed {
        Ok(image) => {
            let manifest = image
                .manifest
                .map_or(std::ptr::null(), |m| m as *const Manifest);
            let placement = Placement::Near {
                address: image.address(),
                size: image.size(),
            };
            (Handle::Near(image), manifest, placement)
        }
        Err(reason) if !host::exports_symbols() => {
            // Only the near loader can bind to a binary that exports
            // nothing (it reads the binary's symbol table).
            if copy.unlink_after_open {
                let _ = fs::remove_file(&copy.path);
            }
            if let NearRefusal::Missing { symbols } = reason {
                return Err(Error::MissingSymbols {
                    path: path.to_owned(),
                    symbols,
                });
            }
            return Err(Error::NotLoadable {
                path: path.to_owned(),
                reason: format!(
                    "this binary does not export its symbols (it was linked without -rdynamic), \
                     so only hotpatch's own loader can bind the patch to it, and it could not \
                     place it near the executable: {reason}"
                ),
            });
        }
        Err(reason) => {
            let (library, manifest) = dlopen(&copy, path, bytes)?;
            (
                Handle::Dlopen(library),
                manifest,
                Placement::Dlopen { reason },
            )
        }
    };
    if copy.unlink_after_open {
        let _ = fs::remove_file(&copy.path);
    }
    // Relaxed: only uniqueness matters.
    let id = NEXT_LIBRARY.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    libraries.push(Loaded {
        id,
        digest,
        copy: copy.file,
        handle,
        manifest,
        placement,
        path: copy.path,
        keep,
    });
    Ok((id, manifest))
}

/// Opens the private copy with the dynamic loader (where the patch could
/// not be placed near the executable); returns the library and its
/// manifest symbol's address (null if it has none).
fn dlopen(
    copy: &sys::PrivateCopy,
    path: &Path,
    bytes: &[u8],
) -> Result<(Library, *const Manifest), Error> {
    // SAFETY: opening a library runs its initialisers. The patch is code
    // the operator chose to load (see the crate docs, "Safety model");
    // RTLD_LOCAL keeps its symbols from interposing on later loads.
    let opened = unsafe { Library::open(Some(&copy.path), RTLD_NOW | RTLD_LOCAL) };
    let library = opened.map_err(|e| {
        if copy.unlink_after_open {
            let _ = fs::remove_file(&copy.path);
        }
        // A symbol this binary lacks: RTLD_NOW binds every symbol before
        // any of the library's code runs, so the dynamic loader refused it
        // before its initialisers; name every missing one (the loader's
        // message names the first).
        let missing = host::missing(&host::undefined(bytes));
        if !missing.is_empty() {
            return Error::MissingSymbols {
                path: path.to_owned(),
                symbols: missing,
            };
        }
        Error::NotLoadable {
            path: path.to_owned(),
            // libloading's message is "dlopen failed"; the loader's own
            // words (dlerror) are in its source.
            reason: match std::error::Error::source(&e) {
                Some(detail) => format!("{e}: {detail}"),
                None => e.to_string(),
            },
        }
    })?;
    let symbol = format!("{MANIFEST_SYMBOL}\0");
    // SAFETY: we read the symbol's address only, as a pointer to data; its
    // contents are checked by `manifest::check` before use.
    let manifest = unsafe { library.get::<*const Manifest>(symbol.as_bytes()) }
        .map(|s| *s)
        .unwrap_or(std::ptr::null());
    Ok((library, manifest))
}

/// The checks of a thin patch against this binary, on the file's bytes,
/// before the dynamic loader sees them (see `host.rs`): the build it was
/// made for, symbols to bind to (exported with `-rdynamic`, or the
/// binary's own symbol table, which the near loader reads), no allocator
/// of its own. That every symbol
/// it needs is here is the dynamic loader's own binding (`RTLD_NOW`, before
/// any of the library's code runs): a second pass over the symbols here
/// would double the cost of binding a large patch; if one is missing,
/// `open` names them all. Returns whether its code registers thread-local
/// destructors.
fn bound_to_this_binary(path: &Path, bytes: &[u8]) -> Result<bool, Error> {
    let path = path.to_owned();
    let needs = host::needs(bytes).map_err(|reason| Error::NotLoadable {
        path: path.clone(),
        reason,
    })?;
    let Some(identity) = needs.identity else {
        return Err(Error::NotThin { path });
    };
    let Some(ours) = host::build_id() else {
        return Err(Error::HostUnidentified { path });
    };
    if identity != ours {
        return Err(Error::WrongBuild {
            path,
            patch: host::hex(&identity),
            host: host::hex(ours),
        });
    }
    if !host::exports_symbols() && !near::symtab::serves() {
        return Err(Error::HostNotExported { path });
    }
    if needs.allocator {
        return Err(Error::ForeignAllocator {
            path,
            reason: "its crate declares a `#[global_allocator]`; a patch uses the host's \
                     allocator (remove it)"
                .into(),
        });
    }
    Ok(needs.tls_destructors)
}

/// Runs the patch's `init`, if it has one: an `Err` or a panic refuses
/// the patch. One std: the panic is the host's own, caught here.
fn run_init(checked: &manifest::Checked) -> Result<(), Refusal> {
    let Some(init) = checked.init else {
        return Ok(());
    };
    match std::panic::catch_unwind(init) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(reason)) => Err(Refusal::InitFailed { reason }),
        Err(payload) => Err(Refusal::InitFailed {
            reason: panic_message(payload.as_ref()),
        }),
    }
}

/// A panic payload's message (`&str` or `String`), as std's hook shows it.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        format!("panicked: {s}")
    } else if let Some(s) = payload.downcast_ref::<String>() {
        format!("panicked: {s}")
    } else {
        "panicked with a payload that is not a string".to_owned()
    }
}

/// What [`Loader::reclaim`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Reclaimed {
    /// Libraries closed.
    pub closed: usize,
    /// Of those, how many the dynamic loader still keeps mapped for now
    /// (pending thread-local destructors; unmapped when they have run).
    pub deferred: usize,
    /// Unused libraries left open because their code registers
    /// thread-local destructors, which may run at any later thread exit:
    /// the C library counts them against the host's std, not the patch,
    /// so it would unmap the code they run.
    pub kept: usize,
}

impl Loader {
    /// Closes the libraries of patches that are no longer applied (and of
    /// loads that failed their checks), once every registered thread has
    /// passed a safepoint. Loading the same bytes later opens them afresh.
    ///
    /// By default hotpatch never unloads a library (see the crate docs,
    /// "Unloading"); this is the opt-in. A library whose code registers
    /// thread-local destructors (a `thread_local!` holding a value with
    /// `Drop`) is never closed (`Reclaimed::kept`): its destructors may run
    /// at any later thread exit, and since a thin patch registers them
    /// through the host's std, the C library would not keep it mapped for
    /// them. The loader sees this in the patch's symbols.
    ///
    /// # Safety
    ///
    /// After this returns, nothing may use code or data of a closed
    /// library:
    /// - every thread that calls patchable functions must be registered
    ///   (an unregistered thread may still be running a reverted
    ///   replacement), and must call [`offline`](crate::offline) only
    ///   where it could call [`quiescent`](crate::quiescent);
    /// - no pointer obtained from patch code may be used afterwards:
    ///   `&'static str`s and other references into its data, trait objects
    ///   (their vtables), function pointers and closures it returned,
    ///   panic payloads it raised as `&'static str`.
    ///
    /// # Errors
    ///
    /// [`Error::Busy`] if a transition does not finish within the deadline;
    /// [`Error::Timeout`] if a registered thread does not reach a
    /// safepoint within it (nothing is closed then).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// let patch = hotpatch::load("fix-v1.so")?;
    /// patch.revert()?;
    /// // SAFETY: every worker is registered, and nothing keeps references
    /// // returned by the patch.
    /// let done = unsafe { hotpatch::Loader::new().reclaim() }?;
    /// println!("closed {} libraries", done.closed);
    /// # Ok::<(), hotpatch::Error>(())
    /// ```
    pub unsafe fn reclaim(&self) -> Result<Reclaimed, Error> {
        let what = "reclaim unused patch libraries".to_owned();
        let turn = self.take_turn(&what)?;
        let in_use = REGISTRY.lock().library_ids();
        let kept = LIBRARIES
            .lock()
            .iter()
            .filter(|l| l.keep && !in_use.contains(&l.id))
            .count();
        let any = LIBRARIES
            .lock()
            .iter()
            .any(|l| !l.keep && !in_use.contains(&l.id));
        if !any {
            return Ok(Reclaimed {
                closed: 0,
                deferred: 0,
                kept,
            });
        }
        quiesce::grace(&turn, self.deadline).map_err(|s| s.into_error(what, self.deadline))?;
        let unused: Vec<Loaded> = {
            let mut libraries = LIBRARIES.lock();
            let (unused, keep) = std::mem::take(&mut *libraries)
                .into_iter()
                .partition(|l| !l.keep && !in_use.contains(&l.id));
            *libraries = keep;
            unused
        };
        let mut done = Reclaimed {
            closed: 0,
            deferred: 0,
            kept,
        };
        let mut zombies = ZOMBIES.lock();
        for l in unused {
            done.closed += 1;
            match l.handle {
                Handle::Near(image) => {
                    // SAFETY: the caller's contract (no code or data of an
                    // unused library is used any more), and the grace
                    // period above: no registered thread is inside it.
                    unsafe { image.close() };
                }
                Handle::Dlopen(library) => {
                    drop(library);
                    // SAFETY: RTLD_NOLOAD only looks the name up; if it is
                    // still loaded we get (and at once drop) one more
                    // reference.
                    let still = unsafe { Library::open(Some(&l.path), RTLD_NOW | RTLD_NOLOAD) };
                    if still.is_ok() {
                        done.deferred += 1;
                        zombies.push((l.copy, l.path));
                    }
                }
            }
        }
        // Zombies whose destructors have run since can go.
        zombies.retain(|(_, path)| {
            // SAFETY: as above.
            unsafe { Library::open(Some(path), RTLD_NOW | RTLD_NOLOAD) }.is_ok()
        });
        drop(turn);
        Ok(done)
    }
}

/// What [`Loader::check`] found: the patch passes every check of
/// [`Loader::load`], and this is what applying it would change.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct CheckReport {
    /// The patch crate's name, version and description (its manifest).
    pub name: String,
    pub version: String,
    pub description: String,
    /// The file checked.
    pub file: std::path::PathBuf,
    /// Each function the patch would replace, in the patch's order, and
    /// what implements it now.
    pub changes: Vec<WouldReplace>,
    /// The patch has an initialisation function
    /// (`hotpatch::manifest!(init = ...)`), which a load runs after the
    /// checks and a check does not.
    pub has_init: bool,
}

/// One function a checked patch would replace.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct WouldReplace {
    /// The function's path, as in [`FunctionInfo::path`](crate::FunctionInfo::path).
    pub function: String,
    /// What implements it now (the patch would go on top).
    pub now: crate::Implementation,
}

impl Loader {
    /// The deadline this loader waits for (see [`deadline`](Self::deadline)).
    pub fn deadline_value(&self) -> Duration {
        self.deadline
    }

    /// A dry run of [`load`](Self::load): every check `load` makes, in the
    /// same order and by the same code (trust policy, ELF, manifest,
    /// allocator, targets, signatures, layouts, already applied), and
    /// nothing applied. Reports what applying the patch would change.
    ///
    /// No slot, record or patch changes. What a check cannot avoid, as a
    /// refused load cannot: the library is opened to read its manifest, so
    /// its initialisers run, and it stays mapped (a later load of the same
    /// bytes reuses it). The patch's own `init` function is not run.
    ///
    /// Like `load`, it waits (within the deadline) for a transition in
    /// progress to finish.
    ///
    /// # Errors
    ///
    /// The error `load` would return, but for a refusal by `init` or a
    /// transition that times out: `load` can still fail those.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// let report = hotpatch::Loader::new().check("fix.so")?;
    /// for f in &report.changes {
    ///     println!("{} would replace {} (now {:?})", report.name, f.function, f.now);
    /// }
    /// # Ok::<(), hotpatch::Error>(())
    /// ```
    pub fn check(&self, path: impl AsRef<Path>) -> Result<CheckReport, Error> {
        let result = self.dry_run(path.as_ref());
        metrics::checked(result.as_ref().err());
        result
    }

    fn dry_run(&self, path: &Path) -> Result<CheckReport, Error> {
        let bytes = trust::read(path, &self.policy)?;
        // The turn keeps the library mapped while its manifest is read (only
        // `reclaim` unmaps, and it needs the turn), as in `apply`.
        let turn = self.take_turn(&format!("check {}", path.display()))?;
        let mut libraries = LIBRARIES.lock();
        let (library, checked) = open_checked(&mut libraries, &turn, path, &bytes, self.near)?;
        let registry = REGISTRY.lock();
        let plan = registry.plan(library, &checked).map_err(|r| r.at(path))?;
        let now = registry.functions(&[]);
        drop(registry);
        drop(libraries);
        drop(turn);
        let changes = plan
            .functions()
            .iter()
            .map(|function| WouldReplace {
                function: function.clone(),
                now: now
                    .iter()
                    .find(|f| f.path == function)
                    .map(|f| f.implementation.clone())
                    .unwrap_or(crate::Implementation::Original),
            })
            .collect();
        Ok(CheckReport {
            name: checked.name.clone(),
            version: checked.version.clone(),
            description: checked.description.clone(),
            file: path.to_owned(),
            changes,
            has_init: checked.init.is_some(),
        })
    }
}
