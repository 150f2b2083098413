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
//! a crash and not yet recorded is an unreferenced file, ignored.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::events::{Event, unix_ms};
use super::ops::{Failure, failure_of};
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
#[serde(deny_unknown_fields)]
pub(crate) struct Entry {
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
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    format: u64,
    next_seq: u64,
    patches: Vec<Value>,
}

/// Something restore set aside.
#[derive(Debug, Clone)]
pub(crate) struct Rejected {
    /// `corrupt_record`, `unsupported_format`, `bad_entry`, `missing`,
    /// `tampered`, or the error kind of the load that refused it.
    pub kind: String,
    pub name: Option<String>,
    /// Where it was moved to (`None` if there was no file to move).
    pub moved_to: Option<PathBuf>,
    pub message: String,
}

/// The state directory and what this process knows of it.
#[derive(Debug)]
pub(crate) struct Store {
    pub dir: PathBuf,
    pub entries: Vec<Entry>,
    next_seq: u64,
    pub rejected: Vec<Rejected>,
    /// The kill switch was set at start-up.
    pub disabled: bool,
}

fn io(what: &str, path: &Path, e: std::io::Error) -> Failure {
    Failure::new("state", format!("cannot {what} {}: {e}", path.display()))
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn ensure_dir(dir: &Path) -> Result<(), Failure> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io("create the directory", dir, e))
}

fn sync_dir(dir: &Path) -> Result<(), Failure> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("sync the directory", dir, e))
}

/// Writes `bytes` to `path` crash-safely, mode 0600.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Failure> {
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
    pub(crate) fn of(&self, id: u64) -> Option<&Entry> {
        self.entries.iter().find(|e| e.applied == Some(id))
    }

    fn save(&self) -> Result<(), Failure> {
        let record = json!({
            "format": RECORD_FORMAT,
            "next_seq": self.next_seq,
            "patches": self.entries,
        });
        let text = serde_json::to_vec_pretty(&record)
            .map_err(|e| Failure::new("state", format!("cannot encode the record: {e}")))?;
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
    /// cannot be applied is reported, set aside and dropped from the
    /// record; the rest is applied.
    pub(crate) fn open_and_restore(
        dir: PathBuf,
        loader: &Loader,
        events: &super::events::Ring,
    ) -> Result<Store, super::Error> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir.join(PATCHES))
            .map_err(|source| super::Error::Io {
                what: "create the state directory",
                path: dir.clone(),
                source,
            })?;
        let disabled = std::env::var_os(DISABLE_ENV).is_some_and(|v| !v.is_empty() && v != "0");
        let mut store = Store {
            dir,
            entries: Vec::new(),
            next_seq: 1,
            rejected: Vec::new(),
            disabled,
        };
        let started = Instant::now();
        let record_path = store.record_path();
        let values = match fs::read(&record_path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                return Err(super::Error::Io {
                    what: "read the record",
                    path: record_path,
                    source: e,
                });
            }
            Ok(bytes) => match serde_json::from_slice::<Record>(&bytes) {
                Ok(r) if r.format == RECORD_FORMAT => {
                    store.next_seq = r.next_seq.max(1);
                    r.patches
                }
                Ok(r) => {
                    let message = format!(
                        "the record is of format {}, this runtime reads {RECORD_FORMAT}",
                        r.format
                    );
                    store.reject(
                        events,
                        "unsupported_format",
                        None,
                        Some(&record_path),
                        message,
                    );
                    Vec::new()
                }
                Err(e) => {
                    let message = format!("the record is not a valid record: {e}");
                    store.reject(events, "corrupt_record", None, Some(&record_path), message);
                    Vec::new()
                }
            },
        };
        // Copies left by a record that was set aside keep their names: new
        // ones are numbered after them.
        store.next_seq = store.next_seq.max(store.highest_copy() + 1);
        let mut changed = false;
        let mut entries = Vec::new();
        for value in values {
            match serde_json::from_value::<Entry>(value.clone()) {
                Ok(e) if is_plain_name(&e.file) => entries.push(e),
                Ok(e) => {
                    let message = format!("entry names a file outside patches/: `{}`", e.file);
                    store.reject(events, "bad_entry", Some(e.name), None, message);
                    changed = true;
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
            events.push(Event {
                op: "restore",
                outcome: "disabled".into(),
                patch: None,
                file: None,
                peer: None,
                duration: None,
                message,
            });
            store.entries = entries;
            return Ok(store);
        }
        for mut entry in entries {
            let path = store.patches().join(&entry.file);
            let t = Instant::now();
            let bytes = match fs::read(&path) {
                Ok(b) => b,
                Err(e) => {
                    let kind = if e.kind() == std::io::ErrorKind::NotFound {
                        "missing"
                    } else {
                        "read"
                    };
                    let message = format!("cannot read {}: {e}", path.display());
                    store.reject(events, kind, Some(entry.name), Some(&path), message);
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
                store.reject(events, "tampered", Some(entry.name), Some(&path), message);
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
                        op: "restore",
                        outcome: "ok".into(),
                        patch: Some((info.id.get(), info.name.clone())),
                        file: Some(path.to_string_lossy().into_owned()),
                        peer: None,
                        duration: Some(t.elapsed()),
                        message: format!(
                            "restored {} {} {} (accepted #{})",
                            info.id, info.name, info.version, entry.seq
                        ),
                    });
                    store.entries.push(entry);
                }
                Err(e) => {
                    let f = failure_of(&e);
                    store.reject(events, f.kind, Some(entry.name), Some(&path), f.message);
                    changed = true;
                }
            }
        }
        if changed && let Err(f) = store.save() {
            tracing::warn!(target: "hotpatch::control", op = "restore", reason = %f.message, "cannot rewrite the record");
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

    /// Stores applied patch `info` as accepted: copies its file (and
    /// signature), checks that the copy is the applied patch's bytes, and
    /// appends it to the record. Nothing changes on failure.
    pub(crate) fn accept(&mut self, loader: &Loader, info: &PatchInfo) -> Result<Entry, Failure> {
        let seq = self.next_seq;
        let entry = self.store_copy(loader, info, seq)?;
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

    /// Patch `old` (accepted) was replaced by `new`: the record holds `new`
    /// in its place. On failure the old entry is dropped (it is no longer
    /// applied) and the failure returned.
    pub(crate) fn replaced(
        &mut self,
        loader: &Loader,
        old: u64,
        new: &PatchInfo,
    ) -> Result<Option<Entry>, Failure> {
        let Some(pos) = self.entries.iter().position(|e| e.applied == Some(old)) else {
            return Ok(None);
        };
        let seq = self.next_seq;
        let stored = self.store_copy(loader, new, seq);
        let previous = self.entries.remove(pos);
        let result = match stored {
            Ok(entry) => {
                self.entries.insert(pos, entry.clone());
                self.next_seq = seq + 1;
                Ok(Some(entry))
            }
            Err(f) => Err(f),
        };
        match (self.save(), result) {
            (Ok(()), r) => {
                self.remove_copy(&previous);
                r
            }
            (Err(f), _) => Err(f),
        }
    }

    /// Patch `id` was reverted: drops it from the record.
    pub(crate) fn reverted(&mut self, id: u64) -> Result<Option<Entry>, Failure> {
        let Some(pos) = self.entries.iter().position(|e| e.applied == Some(id)) else {
            return Ok(None);
        };
        let entry = self.entries.remove(pos);
        if let Err(f) = self.save() {
            self.entries.insert(pos, entry);
            return Err(f);
        }
        self.remove_copy(&entry);
        Ok(Some(entry))
    }

    fn remove_copy(&self, entry: &Entry) {
        let path = self.patches().join(&entry.file);
        let _ = fs::remove_file(signature_of(&path));
        let _ = fs::remove_file(&path);
        let _ = sync_dir(&self.patches());
    }

    fn store_copy(&self, loader: &Loader, info: &PatchInfo, seq: u64) -> Result<Entry, Failure> {
        let patches = self.patches();
        ensure_dir(&patches)?;
        let bytes = fs::read(&info.file).map_err(|e| io("read", &info.file, e))?;
        let safe_name: String = info
            .name
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
        let tmp = temp_path(&path);
        let tmp_sig = signature_of(&tmp);
        let cleanup = || {
            let _ = fs::remove_file(&tmp);
            let _ = fs::remove_file(&tmp_sig);
        };
        let write = |to: &Path, bytes: &[u8]| -> Result<(), Failure> {
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
        let signature = match fs::read(signature_of(&info.file)) {
            Ok(s) => Some(s),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io("read", &signature_of(&info.file), e)),
        };
        let staged = write(&tmp, &bytes).and_then(|()| match &signature {
            Some(s) => write(&tmp_sig, s),
            None => Ok(()),
        });
        if let Err(f) = staged {
            cleanup();
            return Err(f);
        }
        // The copy must be the applied patch itself (the file may have been
        // rebuilt since it was applied) and pass the service's trust
        // policy as stored: a dry run says "already applied" as that patch.
        match loader.check(&tmp) {
            Err(Error::AlreadyApplied { id, .. }) if id == info.id => {}
            Err(Error::AlreadyApplied { id, .. }) => {
                cleanup();
                return Err(Failure::new(
                    "file_changed",
                    format!(
                        "{} now holds patch {id}, not patch {}: it changed since it was applied",
                        info.file.display(),
                        info.id
                    ),
                ));
            }
            Ok(_) => {
                cleanup();
                return Err(Failure::new(
                    "file_changed",
                    format!(
                        "{} changed since patch {} was applied from it; apply it again, then accept",
                        info.file.display(),
                        info.id
                    ),
                ));
            }
            Err(e) => {
                cleanup();
                return Err(failure_of(&e));
            }
        }
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
        sync_dir(&patches)?;
        Ok(Entry {
            seq,
            name: info.name.clone(),
            version: info.version.clone(),
            file,
            source: info.file.to_string_lossy().into_owned(),
            sha256: sha256_hex(&bytes),
            signed: signature.is_some(),
            accepted_at_ms: unix_ms(SystemTime::now()),
            applied: Some(info.id.get()),
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
