//! The state directory: accepted patches, kept across restarts.
//!
//! ```text
//! <state_dir>/accepted.json         the record (format 1), ordered
//! <state_dir>/patches/<n>-<name>.so  a copy of each accepted patch
//!                    (and <...>.so.minisig, its signature, if it had one)
//! <state_dir>/rejected/              what restore could not apply, with
//!                                    a `.reason` file beside each
//! ```
//!
//! Every file is written crash-safely: a temporary file in the same
//! directory, `fsync`, `rename`, `fsync` of the directory. A crash leaves
//! the old record or the new one, never a torn one; a copy written before
//! a crash and not yet recorded is an unreferenced file, removed at the
//! next start (unless the record itself was set aside: its copies are
//! kept with it).
//!
//! The record is forward compatible within its format version: fields
//! this runtime does not know are ignored, and kept when it rewrites the
//! record. Only another format version is refused.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::events::{Event, unix_ms};
use crate::{Error, Loader, PatchInfo};

/// The record's format version; a record of another is set aside.
pub const RECORD_FORMAT: u64 = 1;

/// The kill switch: set to anything but empty or `0`, the service starts
/// with no accepted patch applied (the record is left as it is).
pub const DISABLE_ENV: &str = "HOTPATCH_DISABLE";

const RECORD: &str = "accepted.json";
const PATCHES: &str = "patches";
const REJECTED: &str = "rejected";

/// One accepted patch in the record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct AcceptedPatch {
    /// Order of acceptance (unique in a record).
    pub seq: u64,
    pub name: String,
    pub version: String,
    /// The copy's file name in `patches/`.
    pub file: String,
    /// Where it was applied from.
    pub source: String,
    /// SHA-256 of the copy, hex: a copy that changed is not applied.
    pub sha256: String,
    /// A `.minisig` was stored with it.
    pub signed: bool,
    pub accepted_at_ms: u64,
    /// The patch it is applied as in this process, if it is.
    #[serde(skip)]
    pub applied: Option<u64>,
    /// Fields of a later release, kept as they were.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A record of [`RECORD_FORMAT`]; fields of a later release are kept.
#[derive(Debug, Deserialize)]
struct RecordFile {
    next_seq: u64,
    patches: Vec<Value>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

/// Something restore set aside.
#[derive(Debug, Clone)]
pub(crate) struct Rejected {
    /// `unreadable_record`, `corrupt_record`, `unsupported_format`,
    /// `bad_entry`, `missing`, `tampered`, or the error kind of the load
    /// that refused it.
    pub kind: String,
    pub name: Option<String>,
    /// Where it was moved to (`None` if there was no file to move).
    pub moved_to: Option<PathBuf>,
    pub message: String,
}

/// A replacement recorded before it is applied
/// ([`Store::stage_replacement`]).
#[derive(Debug)]
pub(crate) struct Staged {
    pos: usize,
    previous: AcceptedPatch,
    /// The copy to apply.
    pub copy: PathBuf,
}

/// The state directory and what this process knows of it.
#[derive(Debug)]
pub(crate) struct Store {
    pub dir: PathBuf,
    pub entries: Vec<AcceptedPatch>,
    next_seq: u64,
    pub rejected: Vec<Rejected>,
    /// The kill switch was set at start-up.
    pub disabled: bool,
    /// The record's fields this runtime does not know.
    record_extra: Map<String, Value>,
    /// Copies restore could not set aside (they stay in `patches/`, and
    /// are not orphans to remove).
    unmoved: HashSet<PathBuf>,
    /// Why the record must not be written (it could not be read and is
    /// still in place, or the directory could not be made): every change
    /// is refused rather than overwrite what was not read.
    blocked: Option<String>,
}

/// Why the store could not do what was asked; what changed is said by
/// the caller (nothing, unless it says otherwise).
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    /// The state directory could not be read or written, or the record
    /// must not be (protocol kind `state`).
    #[error("{0}")]
    Io(String),
    /// The patch's file no longer holds the bytes that were applied
    /// (protocol kind `file_changed`).
    #[error("{0}")]
    FileChanged(String),
    /// The copy to store failed a check of the runtime (its kind).
    #[error(transparent)]
    Patch(#[from] Error),
}

fn io(what: &str, path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Io(format!("cannot {what} {}: {e}", path.display()))
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn ensure_dir(dir: &Path) -> Result<(), StoreError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io("create the directory", dir, e))
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("sync the directory", dir, e))
}

/// Writes `bytes` to `path` crash-safely, mode 0600.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = temp_path(path);
    let written = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(io("write", &tmp, e));
    }
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io("rename into place", path, e)
    })?;
    sync_dir(dir)
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map_or_else(Default::default, |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".{name}.tmp"))
}

fn signature_of(path: &Path) -> PathBuf {
    crate::trust::signature_path(path)
}

impl Store {
    fn record_path(&self) -> PathBuf {
        self.dir.join(RECORD)
    }

    fn patches(&self) -> PathBuf {
        self.dir.join(PATCHES)
    }

    /// The accepted entry of applied patch `id`.
    pub(crate) fn of(&self, id: u64) -> Option<&AcceptedPatch> {
        self.entries.iter().find(|e| e.applied == Some(id))
    }

    fn save(&self) -> Result<(), StoreError> {
        if let Some(why) = &self.blocked {
            return Err(StoreError::Io(why.clone()));
        }
        let mut record = Value::Object(self.record_extra.clone());
        record["format"] = json!(RECORD_FORMAT);
        record["next_seq"] = json!(self.next_seq);
        record["patches"] = json!(self.entries);
        let text = serde_json::to_vec_pretty(&record)
            .map_err(|e| StoreError::Io(format!("cannot encode the record: {e}")))?;
        write_atomic(&self.record_path(), &text)?;
        crate::metrics::accepted(self.entries.len());
        Ok(())
    }

    /// The highest `<n>` of the copies `patches/<n>-*.so`.
    fn highest_copy(&self) -> u64 {
        fs::read_dir(self.patches())
            .map(|d| {
                d.flatten()
                    .filter_map(|e| {
                        let name = e.file_name().to_string_lossy().into_owned();
                        name.split_once('-')?.0.parse::<u64>().ok()
                    })
                    .max()
                    .unwrap_or(0)
            })
            .unwrap_or(0)
    }

    /// Moves `path` (and its signature) into `rejected/` with a reason
    /// file beside it; the new path.
    fn set_aside(&self, path: &Path, reason: &str) -> Option<PathBuf> {
        let rejected = self.dir.join(REJECTED);
        ensure_dir(&rejected).ok()?;
        let name = path.file_name()?.to_string_lossy().into_owned();
        let to = rejected.join(format!("{}-{name}", unix_ms(SystemTime::now())));
        fs::rename(path, &to).ok()?;
        let sig = signature_of(path);
        if sig.exists() {
            let _ = fs::rename(&sig, signature_of(&to));
        }
        let mut reason_file = to.as_os_str().to_owned();
        reason_file.push(".reason");
        let _ = write_atomic(Path::new(&reason_file), format!("{reason}\n").as_bytes());
        let _ = sync_dir(&rejected);
        Some(to)
    }

    fn reject(
        &mut self,
        events: &super::events::Ring,
        kind: &str,
        name: Option<String>,
        file: Option<&Path>,
        message: String,
    ) {
        let moved_to = file
            .filter(|f| f.exists())
            .and_then(|f| self.set_aside(f, &format!("{kind}: {message}")));
        if let Some(f) = file.filter(|f| f.exists()) {
            self.unmoved.insert(f.to_owned());
        }
        tracing::warn!(
            target: "hotpatch::control",
            op = "restore",
            outcome = kind,
            patch_name = name.as_deref(),
            file = file.map(|f| f.display().to_string()),
            moved_to = moved_to.as_ref().map(|f| f.display().to_string()),
            reason = %message,
            "accepted patch not restored"
        );
        events.push(Event {
            op: "restore",
            outcome: kind.to_owned(),
            patch: None,
            file: file.map(|f| f.to_string_lossy().into_owned()),
            peer: None,
            duration: None,
            message: match &moved_to {
                Some(to) => format!("{message} (kept in {})", to.display()),
                None => message.clone(),
            },
        });
        self.rejected.push(Rejected {
            kind: kind.to_owned(),
            name,
            moved_to,
            message,
        });
    }

    /// Opens the state directory and re-applies its accepted patches in
    /// their order with `loader`, unless the kill switch is set. What
    /// cannot be applied (a record that cannot be read or parsed included)
    /// is reported, set aside and dropped from the record; the rest is
    /// applied. Then copies no entry names and interrupted writes are
    /// removed. With the kill switch nothing is applied, moved or removed,
    /// and nothing the directory holds is an error.
    pub(crate) fn open_and_restore(
        dir: PathBuf,
        loader: &Loader,
        events: &super::events::Ring,
    ) -> Result<Store, super::Error> {
        let disabled = std::env::var_os(DISABLE_ENV).is_some_and(|v| !v.is_empty() && v != "0");
        let mut store = Store {
            dir,
            entries: Vec::new(),
            next_seq: 1,
            rejected: Vec::new(),
            disabled,
            record_extra: Map::new(),
            unmoved: HashSet::new(),
            blocked: None,
        };
        if let Err(source) = fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(store.patches())
        {
            if !disabled {
                return Err(super::Error::Io {
                    what: "create the state directory",
                    path: store.dir.clone(),
                    source,
                });
            }
            store.blocked = Some(format!(
                "the state directory {} could not be created: {source}",
                store.dir.display()
            ));
        }
        let started = Instant::now();
        let record_path = store.record_path();
        let (values, record_ok) = store.read_record(events, &record_path);
        // Copies left by a record that was set aside keep their names: new
        // ones are numbered after them.
        store.next_seq = store.next_seq.max(store.highest_copy() + 1);
        let mut changed = false;
        let mut entries = Vec::new();
        for value in values {
            match serde_json::from_value::<AcceptedPatch>(value.clone()) {
                Ok(e) if is_plain_name(&e.file) => entries.push(e),
                Ok(e) if disabled => entries.push(e),
                Ok(e) => {
                    let message = format!("entry names a file outside patches/: `{}`", e.file);
                    store.reject(events, "bad_entry", Some(e.name), None, message);
                    changed = true;
                }
                Err(err) if disabled => {
                    let message = format!("a record entry is not valid ({err}): {value}");
                    store.report_only(events, "bad_entry", message);
                }
                Err(err) => {
                    let name = value["name"].as_str().map(str::to_owned);
                    let message = format!("a record entry is not valid ({err}): {value}");
                    store.reject(events, "bad_entry", name, None, message);
                    changed = true;
                }
            }
        }
        if disabled {
            let message = format!(
                "{DISABLE_ENV} is set: {} accepted patch(es) not applied",
                entries.len()
            );
            tracing::warn!(target: "hotpatch::control", op = "restore", outcome = "disabled", accepted = entries.len(), "{message}");
            events.push(Event::new("restore", "disabled", message));
            store.entries = entries;
            return Ok(store);
        }
        // How many entries not yet rejected name each copy: a copy is set
        // aside only with the last entry that names it.
        let mut users: HashMap<String, usize> = HashMap::new();
        for e in &entries {
            *users.entry(e.file.clone()).or_default() += 1;
        }
        for mut entry in entries {
            let path = store.patches().join(&entry.file);
            let t = Instant::now();
            let shared = users.get(&entry.file).copied().unwrap_or(0) > 1
                || store.entries.iter().any(|e| e.file == entry.file);
            if let Some(count) = users.get_mut(&entry.file) {
                *count -= 1;
            }
            // A copy another entry uses stays where it is.
            let own = (!shared).then_some(path.as_path());
            let bytes = match fs::read(&path) {
                Ok(b) => b,
                Err(e) => {
                    let kind = if e.kind() == std::io::ErrorKind::NotFound {
                        "missing"
                    } else {
                        "read"
                    };
                    let message = format!("cannot read {}: {e}", path.display());
                    store.reject(events, kind, Some(entry.name), own, message);
                    changed = true;
                    continue;
                }
            };
            let sum = sha256_hex(&bytes);
            if sum != entry.sha256 {
                let message = format!(
                    "{} changed since it was accepted (sha256 {sum}, recorded {})",
                    path.display(),
                    entry.sha256
                );
                store.reject(events, "tampered", Some(entry.name), own, message);
                changed = true;
                continue;
            }
            match loader.load(&path) {
                Ok(patch) => {
                    let info = patch.info();
                    entry.applied = Some(info.id.get());
                    tracing::info!(
                        target: "hotpatch::control",
                        op = "restore",
                        outcome = "ok",
                        patch_id = info.id.get(),
                        patch_name = %info.name,
                        file = %path.display(),
                        duration_us = t.elapsed().as_micros() as u64,
                        "accepted patch restored"
                    );
                    events.push(Event {
                        patch: Some((info.id.get(), info.name.clone())),
                        file: Some(path.to_string_lossy().into_owned()),
                        duration: Some(t.elapsed()),
                        ..Event::new(
                            "restore",
                            "ok",
                            format!(
                                "restored {} {} {} (accepted #{})",
                                info.id, info.name, info.version, entry.seq
                            ),
                        )
                    });
                    store.entries.push(entry);
                }
                Err(e) => {
                    store.reject(events, e.kind(), Some(entry.name), own, e.to_string());
                    changed = true;
                }
            }
        }
        let saved = if changed && let Err(f) = store.save() {
            tracing::warn!(target: "hotpatch::control", op = "restore", reason = %f, "cannot rewrite the record");
            false
        } else {
            true
        };
        // Only against a record on disk that is the one in memory: the
        // copies of entries it still names are not orphans.
        if record_ok && saved {
            store.remove_orphans(events);
        }
        tracing::info!(
            target: "hotpatch::control",
            op = "restore",
            restored = store.entries.len(),
            rejected = store.rejected.len(),
            duration_us = started.elapsed().as_micros() as u64,
            "restore done"
        );
        Ok(store)
    }

    /// The entries of the record (as JSON values), and whether the record
    /// was read (or is absent). A record that cannot be read or parsed, or
    /// is of another format, is reported and (without the kill switch)
    /// set aside; one that cannot be set aside blocks every later write.
    fn read_record(&mut self, events: &super::events::Ring, path: &Path) -> (Vec<Value>, bool) {
        let problem = match fs::read(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (Vec::new(), true),
            Err(e) => ("unreadable_record", format!("cannot read the record: {e}")),
            Ok(bytes) => match serde_json::from_slice::<Value>(&bytes) {
                Ok(v) => match v.get("format").and_then(Value::as_u64) {
                    Some(RECORD_FORMAT) => match serde_json::from_value::<RecordFile>(v) {
                        Ok(r) => {
                            self.next_seq = r.next_seq.max(1);
                            self.record_extra = r.extra;
                            return (r.patches, true);
                        }
                        Err(e) => (
                            "corrupt_record",
                            format!("the record is not a valid record: {e}"),
                        ),
                    },
                    Some(other) => (
                        "unsupported_format",
                        format!(
                            "the record is of format {other}, this runtime reads {RECORD_FORMAT}"
                        ),
                    ),
                    None => (
                        "corrupt_record",
                        "the record is not a valid record: no numeric \"format\"".to_owned(),
                    ),
                },
                Err(e) => (
                    "corrupt_record",
                    format!("the record is not a valid record: {e}"),
                ),
            },
        };
        let (kind, message) = problem;
        if self.disabled {
            self.report_only(events, kind, message.clone());
        } else {
            self.reject(events, kind, None, Some(path), message.clone());
        }
        if fs::symlink_metadata(path).is_ok() {
            self.blocked = Some(format!(
                "the record {} is in place but could not be used ({message}): nothing is \
                 recorded until it is repaired or removed",
                path.display()
            ));
        }
        (Vec::new(), false)
    }

    /// Reports a problem of the state directory without touching it (the
    /// kill switch is set).
    fn report_only(&self, events: &super::events::Ring, kind: &str, message: String) {
        tracing::warn!(
            target: "hotpatch::control",
            op = "restore",
            outcome = kind,
            reason = %message,
            "state directory problem left as it is ({DISABLE_ENV} is set)"
        );
        events.push(Event::new(
            "restore",
            kind,
            format!("{message} (left as it is: {DISABLE_ENV} is set)"),
        ));
    }

    /// Removes what no entry of the record names from `patches/`: copies
    /// of entries dropped or interrupted accepts, and temporary files of
    /// interrupted writes (here and in the state directory); an event
    /// counts them.
    fn remove_orphans(&self, events: &super::events::Ring) {
        let mut keep: HashSet<String> = HashSet::new();
        for e in &self.entries {
            let sig = signature_of(Path::new(&e.file));
            keep.insert(sig.to_string_lossy().into_owned());
            keep.insert(e.file.clone());
        }
        let mut removed = Vec::new();
        let patches = self.patches();
        let candidates = fs::read_dir(&patches)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                !keep.contains(&name)
            })
            .map(|e| e.path())
            .chain(
                fs::read_dir(&self.dir)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| {
                        p.file_name()
                            .is_some_and(|n| n.to_string_lossy().ends_with(".tmp"))
                    }),
            );
        for path in candidates.filter(|p| !self.unmoved.contains(p)) {
            let is_file = fs::symlink_metadata(&path).is_ok_and(|m| m.is_file());
            if is_file && fs::remove_file(&path).is_ok() {
                removed.push(
                    path.file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
        if removed.is_empty() {
            return;
        }
        let _ = sync_dir(&patches);
        let message = format!(
            "removed {} orphaned file(s) from {}: {}",
            removed.len(),
            self.dir.display(),
            removed.join(", ")
        );
        tracing::info!(target: "hotpatch::control", op = "clean", removed = removed.len(), "{message}");
        events.push(Event::new("clean", "ok", message));
    }

    /// Stores applied patch `info` as accepted: copies its file (and
    /// signature), checks that the copy is the applied patch's bytes, and
    /// appends it to the record. Nothing changes on failure.
    pub(crate) fn accept(
        &mut self,
        loader: &Loader,
        info: &PatchInfo,
    ) -> Result<AcceptedPatch, StoreError> {
        let seq = self.next_seq;
        let mut entry = self.store_copy(loader, &info.file, Some(info), seq)?;
        entry.applied = Some(info.id.get());
        self.entries.push(entry.clone());
        self.next_seq = seq + 1;
        if let Err(f) = self.save() {
            self.entries.pop();
            self.next_seq = seq;
            self.remove_copy(&entry);
            return Err(f);
        }
        Ok(entry)
    }

    /// Takes accepted patch `id` out of the record, before its revert:
    /// where it was and its entry, for [`put_back`](Self::put_back) if
    /// the revert fails; `None` if it is not accepted. Nothing changes on
    /// failure.
    pub(crate) fn take_out(
        &mut self,
        id: u64,
    ) -> Result<Option<(usize, AcceptedPatch)>, StoreError> {
        let Some(pos) = self.entries.iter().position(|e| e.applied == Some(id)) else {
            return Ok(None);
        };
        let entry = self.entries.remove(pos);
        if let Err(f) = self.save() {
            self.entries.insert(pos, entry);
            return Err(f);
        }
        Ok(Some((pos, entry)))
    }

    /// Puts an entry taken out back where it was (its revert failed). On
    /// failure the record stays without it.
    pub(crate) fn put_back(&mut self, pos: usize, entry: AcceptedPatch) -> Result<(), StoreError> {
        let pos = pos.min(self.entries.len());
        self.entries.insert(pos, entry);
        if let Err(f) = self.save() {
            self.entries.remove(pos);
            return Err(f);
        }
        Ok(())
    }

    /// An entry taken out whose patch is reverted: its copy goes (unless
    /// another entry names it).
    pub(crate) fn discard(&self, entry: &AcceptedPatch) {
        self.remove_copy(entry);
    }

    /// Records the replacement of accepted patch `old` by the patch file
    /// `file` before anything is applied: `file` is copied into
    /// `patches/`, checked as the service's loader would load it, and
    /// recorded in `old`'s place. The replace is then made from the copy,
    /// so what runs is what is recorded. `None` if `old` is not accepted.
    /// Nothing changes on failure.
    pub(crate) fn stage_replacement(
        &mut self,
        loader: &Loader,
        old: u64,
        file: &Path,
    ) -> Result<Option<Staged>, StoreError> {
        let Some(pos) = self.entries.iter().position(|e| e.applied == Some(old)) else {
            return Ok(None);
        };
        let seq = self.next_seq;
        let entry = self.store_copy(loader, file, None, seq)?;
        let copy = self.patches().join(&entry.file);
        let previous = std::mem::replace(&mut self.entries[pos], entry);
        self.next_seq = seq + 1;
        if let Err(f) = self.save() {
            let staged = std::mem::replace(&mut self.entries[pos], previous);
            self.next_seq = seq;
            self.remove_copy(&staged);
            return Err(f);
        }
        Ok(Some(Staged {
            pos,
            previous,
            copy,
        }))
    }

    /// The staged replacement is applied as patch `id`: the replaced
    /// patch's copy goes. The new entry.
    pub(crate) fn replaced(&mut self, staged: Staged, id: u64) -> AcceptedPatch {
        self.entries[staged.pos].applied = Some(id);
        self.remove_copy(&staged.previous);
        self.entries[staged.pos].clone()
    }

    /// The staged replacement could not be applied: the replaced patch's
    /// entry goes back in its place. On failure the record keeps the
    /// staged entry (and so does this process's view of it).
    pub(crate) fn unstage(&mut self, staged: Staged) -> Result<(), StoreError> {
        let new = std::mem::replace(&mut self.entries[staged.pos], staged.previous);
        if let Err(f) = self.save() {
            self.entries[staged.pos] = new;
            return Err(f);
        }
        self.remove_copy(&new);
        Ok(())
    }

    /// Patch `id` was reverted without the record (a watch window's
    /// rollback): drops it from the record.
    pub(crate) fn forget(&mut self, id: u64) -> Result<Option<AcceptedPatch>, StoreError> {
        let Some((_, entry)) = self.take_out(id)? else {
            return Ok(None);
        };
        self.remove_copy(&entry);
        Ok(Some(entry))
    }

    /// Removes `entry`'s copy (and signature), unless another entry of the
    /// record names the same file.
    fn remove_copy(&self, entry: &AcceptedPatch) {
        if self.entries.iter().any(|e| e.file == entry.file) {
            return;
        }
        let path = self.patches().join(&entry.file);
        let _ = fs::remove_file(signature_of(&path));
        let _ = fs::remove_file(&path);
        let _ = sync_dir(&self.patches());
    }

    /// Copies `src` (and its signature) into `patches/` as copy `seq`, and
    /// checks the copy as the service's loader would load it. With
    /// `applied`, the copy must be that applied patch's bytes (the file
    /// may have been rebuilt since it was applied); without, it must pass
    /// every check of a load. The entry, not yet in the record.
    fn store_copy(
        &self,
        loader: &Loader,
        src: &Path,
        applied: Option<&PatchInfo>,
        seq: u64,
    ) -> Result<AcceptedPatch, StoreError> {
        let patches = self.patches();
        ensure_dir(&patches)?;
        let bytes = fs::read(src).map_err(|e| io("read", src, e))?;
        let tmp = patches.join(format!(".{seq}.so.tmp"));
        let tmp_sig = signature_of(&tmp);
        let cleanup = || {
            let _ = fs::remove_file(&tmp);
            let _ = fs::remove_file(&tmp_sig);
        };
        let write = |to: &Path, bytes: &[u8]| -> Result<(), StoreError> {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(to)
                .map_err(|e| io("create", to, e))?;
            f.write_all(bytes)
                .and_then(|()| f.sync_all())
                .map_err(|e| io("write", to, e))
        };
        let signature = match fs::read(signature_of(src)) {
            Ok(s) => Some(s),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io("read", &signature_of(src), e)),
        };
        let staged = write(&tmp, &bytes).and_then(|()| match &signature {
            Some(s) => write(&tmp_sig, s),
            None => Ok(()),
        });
        if let Err(f) = staged {
            cleanup();
            return Err(f);
        }
        let checked = match (loader.check(&tmp), applied) {
            // A dry run of the applied patch's bytes says "already applied"
            // as that patch: the copy is what runs, and passes the trust
            // policy as stored.
            (Err(Error::AlreadyApplied { id, .. }), Some(info)) if id == info.id => {
                Ok((info.name.clone(), info.version.clone()))
            }
            (Err(Error::AlreadyApplied { id, .. }), Some(info)) => {
                Err(StoreError::FileChanged(format!(
                    "{} now holds {id}, not {}: it changed since it was applied",
                    src.display(),
                    info.id
                )))
            }
            (Ok(_), Some(info)) => Err(StoreError::FileChanged(format!(
                "{} changed since {} was applied from it; apply it again, then accept",
                src.display(),
                info.id
            ))),
            (Ok(report), None) => Ok((report.name, report.version)),
            (Err(e), _) => Err(StoreError::Patch(e)),
        };
        let (name, version) = match checked {
            Ok(nv) => nv,
            Err(f) => {
                cleanup();
                return Err(f);
            }
        };
        let safe_name: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let file = format!("{seq}-{safe_name}.so");
        let path = patches.join(&file);
        if signature.is_some()
            && let Err(e) = fs::rename(&tmp_sig, signature_of(&path))
        {
            cleanup();
            return Err(io("rename into place", &signature_of(&path), e));
        }
        if let Err(e) = fs::rename(&tmp, &path) {
            cleanup();
            let _ = fs::remove_file(signature_of(&path));
            return Err(io("rename into place", &path, e));
        }
        if let Err(f) = sync_dir(&patches) {
            let _ = fs::remove_file(signature_of(&path));
            let _ = fs::remove_file(&path);
            return Err(f);
        }
        Ok(AcceptedPatch {
            seq,
            name,
            version,
            file,
            source: src.to_string_lossy().into_owned(),
            sha256: sha256_hex(&bytes),
            signed: signature.is_some(),
            accepted_at_ms: unix_ms(SystemTime::now()),
            applied: None,
            extra: Map::new(),
        })
    }

    /// The `state` object of `status`.
    pub(crate) fn to_json(&self) -> Value {
        json!({
            "dir": self.dir.to_string_lossy(),
            "disabled": self.disabled,
            "accepted": self.entries.iter().map(|e| json!({
                "seq": e.seq,
                "name": e.name,
                "version": e.version,
                "file": self.patches().join(&e.file).to_string_lossy(),
                "source": e.source,
                "sha256": e.sha256,
                "signed": e.signed,
                "accepted_at_ms": e.accepted_at_ms,
                "applied_as": e.applied,
            })).collect::<Vec<_>>(),
            "rejected": self.rejected.iter().map(|r| json!({
                "kind": r.kind,
                "name": r.name,
                "moved_to": r.moved_to.as_ref().map(|p| p.to_string_lossy()),
                "message": r.message,
            })).collect::<Vec<_>>(),
        })
    }
}

/// A file name of `patches/`, not a path that leaves it.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && !name.starts_with('.') && !name.contains('/') && name != ".."
}
