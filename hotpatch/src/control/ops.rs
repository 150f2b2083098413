//! The protocol: parsing a request line, running it, writing the reply.
//! Documented in `protocol.md`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::{Map, Value, json};

use super::PROTOCOL_VERSION;
use super::events::{CAPACITY, Event, peer_json, unix_ms};
use super::peer::Peer;
use super::server::Shared;
use crate::{Error, Implementation, PatchId, PatchInfo, StalledRequest, StalledThread};

/// A request, parsed and checked.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Request {
    Status,
    Apply {
        file: PathBuf,
        deadline: Option<Duration>,
        /// A watch window (see `watch`).
        watch: Option<Duration>,
        /// Accept it once applied (after its window, if watched).
        accept: bool,
    },
    Accept {
        patch: PatchRef,
    },
    Check {
        file: PathBuf,
    },
    Revert {
        patch: PatchRef,
        deadline: Option<Duration>,
    },
    Replace {
        patch: PatchRef,
        file: PathBuf,
        deadline: Option<Duration>,
    },
    Events {
        since: u64,
        limit: usize,
    },
}

/// An applied patch, by id or by name.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub(crate) enum PatchRef {
    Id(u64),
    Name(String),
}

/// A failed request: an error kind of the protocol, a message, and fields
/// particular to the kind.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Failure {
    pub kind: &'static str,
    pub message: String,
    pub extra: Map<String, Value>,
}

impl Failure {
    pub(crate) fn new(kind: &'static str, message: impl Into<String>) -> Self {
        Failure {
            kind,
            message: message.into(),
            extra: Map::new(),
        }
    }

    fn with(mut self, key: &str, value: Value) -> Self {
        self.extra.insert(key.to_owned(), value);
        self
    }

    pub(crate) fn to_line(&self) -> String {
        let mut error = Map::new();
        error.insert("kind".into(), self.kind.into());
        error.insert("message".into(), self.message.clone().into());
        for (k, v) in &self.extra {
            error.insert(k.clone(), v.clone());
        }
        json!({ "v": PROTOCOL_VERSION, "ok": false, "error": error }).to_string()
    }
}

/// The reply line of a failure of kind `kind`.
pub(crate) fn protocol_failure(kind: &'static str, message: &str) -> String {
    Failure::new(kind, message).to_line()
}

fn bad_request(message: impl Into<String>) -> Failure {
    Failure::new("bad_request", message)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatusReq {
    #[serde(rename = "v")]
    _v: IgnoredAny,
    #[serde(rename = "op")]
    _op: IgnoredAny,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApplyReq {
    #[serde(rename = "v")]
    _v: IgnoredAny,
    #[serde(rename = "op")]
    _op: IgnoredAny,
    file: String,
    deadline_ms: Option<u64>,
    watch_ms: Option<u64>,
    accept: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AcceptReq {
    #[serde(rename = "v")]
    _v: IgnoredAny,
    #[serde(rename = "op")]
    _op: IgnoredAny,
    patch: PatchRef,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckReq {
    #[serde(rename = "v")]
    _v: IgnoredAny,
    #[serde(rename = "op")]
    _op: IgnoredAny,
    file: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevertReq {
    #[serde(rename = "v")]
    _v: IgnoredAny,
    #[serde(rename = "op")]
    _op: IgnoredAny,
    patch: PatchRef,
    deadline_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplaceReq {
    #[serde(rename = "v")]
    _v: IgnoredAny,
    #[serde(rename = "op")]
    _op: IgnoredAny,
    patch: PatchRef,
    file: String,
    deadline_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsReq {
    #[serde(rename = "v")]
    _v: IgnoredAny,
    #[serde(rename = "op")]
    _op: IgnoredAny,
    since: Option<u64>,
    limit: Option<u64>,
}

/// The verbs of protocol version 1.
pub(crate) const OPS: &[&str] = &[
    "status", "apply", "check", "revert", "replace", "accept", "events",
];

/// Parses one request line. Never panics: anything that is not a request
/// of this protocol version is a [`Failure`] saying why.
pub(crate) fn parse(line: &[u8]) -> Result<Request, Failure> {
    let value: Value =
        serde_json::from_slice(line).map_err(|e| bad_request(format!("not JSON: {e}")))?;
    let Some(obj) = value.as_object() else {
        return Err(bad_request("a request is a JSON object"));
    };
    match obj.get("v") {
        Some(v) if v.as_u64() == Some(PROTOCOL_VERSION) => {}
        Some(v) => {
            return Err(Failure::new(
                "unsupported_version",
                format!(
                    "protocol version {v} is not supported; this service speaks {PROTOCOL_VERSION}"
                ),
            )
            .with("supported", json!([PROTOCOL_VERSION])));
        }
        None => return Err(bad_request("missing \"v\" (the protocol version)")),
    }
    let op = match obj.get("op") {
        Some(Value::String(op)) => op.as_str(),
        Some(_) => return Err(bad_request("\"op\" must be a string")),
        None => return Err(bad_request("missing \"op\"")),
    };
    let fields = |e: serde_json::Error| bad_request(format!("{op}: {e}"));
    match op {
        "status" => {
            StatusReq::deserialize(&value).map_err(fields)?;
            Ok(Request::Status)
        }
        "apply" => {
            let r = ApplyReq::deserialize(&value).map_err(fields)?;
            Ok(Request::Apply {
                file: absolute(op, r.file)?,
                deadline: r.deadline_ms.map(Duration::from_millis),
                watch: r.watch_ms.map(Duration::from_millis),
                accept: r.accept.unwrap_or(false),
            })
        }
        "accept" => {
            let r = AcceptReq::deserialize(&value).map_err(fields)?;
            Ok(Request::Accept { patch: r.patch })
        }
        "check" => {
            let r = CheckReq::deserialize(&value).map_err(fields)?;
            Ok(Request::Check {
                file: absolute(op, r.file)?,
            })
        }
        "revert" => {
            let r = RevertReq::deserialize(&value).map_err(fields)?;
            Ok(Request::Revert {
                patch: r.patch,
                deadline: r.deadline_ms.map(Duration::from_millis),
            })
        }
        "replace" => {
            let r = ReplaceReq::deserialize(&value).map_err(fields)?;
            Ok(Request::Replace {
                patch: r.patch,
                file: absolute(op, r.file)?,
                deadline: r.deadline_ms.map(Duration::from_millis),
            })
        }
        "events" => {
            let r = EventsReq::deserialize(&value).map_err(fields)?;
            Ok(Request::Events {
                since: r.since.unwrap_or(0),
                limit: r.limit.map_or(100, |l| l.min(CAPACITY as u64) as usize),
            })
        }
        other => Err(Failure::new(
            "unknown_op",
            format!(
                "unknown op `{other}`; this service knows {}",
                OPS.join(", ")
            ),
        )
        .with("ops", json!(OPS))),
    }
}

/// The service's cwd is not the client's: a relative path would name
/// another file.
fn absolute(op: &str, file: String) -> Result<PathBuf, Failure> {
    let path = PathBuf::from(file);
    if path.is_absolute() {
        Ok(path)
    } else {
        Err(bad_request(format!(
            "{op}: \"file\" must be an absolute path, not `{}`",
            path.display()
        )))
    }
}

/// The protocol's kind for each runtime error.
pub(crate) fn kind(e: &Error) -> &'static str {
    match e {
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
    }
}

pub(crate) fn failure_of(e: &Error) -> Failure {
    let f = Failure::new(kind(e), e.to_string());
    match e {
        Error::AlreadyApplied { name, id, .. } => {
            f.with("patch", json!({ "id": id.get(), "name": name }))
        }
        Error::Timeout {
            stalled,
            deadline,
            requests,
            ..
        } => f
            .with("deadline_ms", json!(deadline.as_millis() as u64))
            .with("stalled", stalled.iter().map(thread_json).collect())
            .with("requests", requests.iter().map(request_json).collect()),
        Error::NotApplied { id } => f.with("patch", json!({ "id": id.get() })),
        _ => f,
    }
}

fn thread_json(t: &StalledThread) -> Value {
    json!({
        "id": t.id,
        "name": t.name,
        "tid": t.os_tid,
        "without_safepoint_ms": t.without_safepoint.as_millis() as u64,
    })
}

/// In-flight request scopes created at one place (issue 12).
fn request_json(r: &StalledRequest) -> Value {
    json!({
        "location": r.location.to_string(),
        "count": r.count,
        "oldest_ms": r.oldest.as_millis() as u64,
    })
}

fn implementation_json(i: &Implementation) -> Value {
    match i {
        Implementation::Original => json!({ "kind": "original" }),
        Implementation::Patch { id, name } => {
            json!({ "kind": "patch", "id": id.get(), "name": name })
        }
    }
}

fn patch_json(shared: &Shared, p: &PatchInfo) -> Value {
    let by = shared.applied_by.lock().get(&p.id.get()).copied();
    json!({
        "id": p.id.get(),
        "name": p.name,
        "version": p.version,
        "description": p.description,
        "file": p.file.to_string_lossy(),
        "state": state_of(shared, p.id.get()),
        "applied_at_ms": unix_ms(p.applied_at),
        "applied_by": by.as_ref().map(peer_json),
        "functions": p.functions,
    })
}

/// `accepted` (kept across restarts) or `applied` (on trial).
fn state_of(shared: &Shared, id: u64) -> &'static str {
    match shared.state.lock().as_ref().and_then(|s| s.of(id)) {
        Some(_) => "accepted",
        None => "applied",
    }
}

fn ok(mut fields: Map<String, Value>) -> String {
    let mut reply = Map::new();
    reply.insert("v".into(), PROTOCOL_VERSION.into());
    reply.insert("ok".into(), true.into());
    reply.append(&mut fields);
    Value::Object(reply).to_string()
}

fn fields(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// Runs one request line from `peer` and returns the reply line.
pub(crate) fn handle(shared: &Shared, peer: &Peer, line: &[u8]) -> String {
    match parse(line) {
        Ok(request) => match run(shared, peer, request) {
            Ok(reply) => ok(reply),
            Err(f) => f.to_line(),
        },
        Err(f) => {
            tracing::debug!(target: "hotpatch::control", kind = f.kind, reason = %f.message, peer_pid = peer.pid, "bad control request");
            f.to_line()
        }
    }
}

/// The client's deadline, bounded by the service's.
fn deadline(shared: &Shared, asked: Option<Duration>) -> crate::Loader {
    let limit = shared.config.loader.deadline_value();
    let d = asked.map_or(limit, |a| a.min(limit));
    shared.config.loader.clone().deadline(d)
}

fn resolve(patch: &PatchRef) -> Result<PatchInfo, Failure> {
    let applied = crate::applied();
    match patch {
        PatchRef::Id(id) => applied
            .into_iter()
            .find(|p| p.id.get() == *id)
            .ok_or_else(|| failure_of(&Error::NotApplied { id: PatchId(*id) })),
        PatchRef::Name(name) => {
            let mut found: Vec<PatchInfo> =
                applied.into_iter().filter(|p| p.name == *name).collect();
            match found.len() {
                1 => Ok(found.remove(0)),
                0 => Err(Failure::new(
                    "not_applied",
                    format!("no applied patch is named `{name}`"),
                )),
                _ => {
                    let ids: Vec<u64> = found.iter().map(|p| p.id.get()).collect();
                    Err(Failure::new(
                        "ambiguous_patch",
                        format!(
                            "{} applied patches are named `{name}`: give an id",
                            ids.len()
                        ),
                    )
                    .with("ids", json!(ids)))
                }
            }
        }
    }
}

/// Records an operation's outcome: a `tracing` event and the ring.
fn record(
    shared: &Shared,
    op: &'static str,
    peer: &Peer,
    started: Instant,
    file: Option<&PathBuf>,
    outcome: Result<&PatchInfo, &Failure>,
) {
    let duration = started.elapsed();
    let file_text = file.map(|f| f.to_string_lossy().into_owned());
    // The threads a timed-out transition waited for, by name and tid.
    let stalled = outcome
        .err()
        .and_then(|f| f.extra.get("stalled"))
        .map(Value::to_string);
    // The registered threads the transition of this operation (run on this
    // thread just before) waited for.
    let waited = outcome
        .ok()
        .and_then(|_| crate::quiesce::take_last_waited());
    let waited_for = waited.as_ref().map(|w| {
        w.threads
            .iter()
            .map(|(name, tid)| format!("'{}' (tid {tid})", name.as_deref().unwrap_or("<unnamed>")))
            .collect::<Vec<_>>()
            .join(", ")
    });
    let (patch, outcome, mut message) = match outcome {
        Ok(p) => (
            Some((p.id.get(), p.name.clone())),
            "ok".to_owned(),
            format!("{op} {} {} {}", p.id, p.name, p.version),
        ),
        Err(f) => (None, f.kind.to_owned(), f.message.clone()),
    };
    if let Some(w) = &waited {
        message.push_str(&match w.threads.len() {
            0 if w.registered == 0 => " (no registered thread: swapped at once)".to_owned(),
            0 => " (every registered thread was already at a safepoint)".to_owned(),
            n => format!(
                " (waited {:?} for {n} thread{}: {})",
                w.took,
                if n == 1 { "" } else { "s" },
                waited_for.as_deref().unwrap_or_default()
            ),
        });
    }
    if outcome == "ok" {
        tracing::info!(
            target: "hotpatch::control",
            op,
            outcome = %outcome,
            patch_id = patch.as_ref().map(|p| p.0),
            patch_name = patch.as_ref().map(|p| p.1.as_str()),
            file = file_text.as_deref(),
            duration_us = duration.as_micros() as u64,
            transition_us = waited.as_ref().map(|w| w.took.as_micros() as u64),
            waited_for = waited_for.as_deref(),
            peer_uid = peer.uid,
            peer_pid = peer.pid,
            "{message}"
        );
    } else {
        tracing::warn!(
            target: "hotpatch::control",
            op,
            outcome = %outcome,
            file = file_text.as_deref(),
            duration_us = duration.as_micros() as u64,
            peer_uid = peer.uid,
            peer_pid = peer.pid,
            stalled_threads = stalled.as_deref(),
            reason = %message,
            "control {op} failed"
        );
    }
    shared.events.push(Event {
        op,
        outcome,
        patch,
        file: file_text,
        peer: Some(*peer),
        duration: Some(duration),
        message,
    });
}

fn run(shared: &Shared, peer: &Peer, request: Request) -> Result<Map<String, Value>, Failure> {
    let started = Instant::now();
    // What an earlier operation on this thread waited for is not this one's.
    let _ = crate::quiesce::take_last_waited();
    match request {
        Request::Status => Ok(status(shared)),
        Request::Events { since, limit } => {
            let (events, last) = shared.events.since(since, limit);
            Ok(fields(json!({ "events": events, "last_seq": last })))
        }
        Request::Apply {
            file,
            deadline: d,
            watch,
            accept,
        } => {
            if accept && shared.state.lock().is_none() {
                // Refused before anything is applied.
                let f = no_state_dir(shared);
                record(shared, "apply", peer, started, Some(&file), Err(&f));
                return Err(f);
            }
            let loader = deadline(shared, d);
            let result = loader.load(&file).map_err(|e| failure_of(&e));
            let info = match result {
                Ok(patch) => {
                    let info = patch.info().clone();
                    shared.applied_by.lock().insert(info.id.get(), *peer);
                    record(shared, "apply", peer, started, Some(&file), Ok(&info));
                    info
                }
                Err(f) => {
                    record(shared, "apply", peer, started, Some(&file), Err(&f));
                    return Err(f);
                }
            };
            let duration_us = started.elapsed().as_micros() as u64;
            let mut reply = json!({ "duration_us": duration_us });
            if let Some(window) = watch {
                reply["watch"] = watched(shared, peer, &loader, &info, window)?;
            }
            if accept {
                let entry = accept_patch(shared, peer, &info).map_err(|mut f| {
                    f.message = format!(
                        "{} (patch {} {} stays applied, not accepted)",
                        f.message, info.id, info.name
                    );
                    f.with("patch", json!({ "id": info.id.get(), "name": info.name }))
                })?;
                reply["accepted"] = entry;
            }
            reply["patch"] = patch_json(shared, &info);
            Ok(fields(reply))
        }
        Request::Accept { patch } => {
            let info = resolve(&patch)?;
            let entry = accept_patch(shared, peer, &info)?;
            Ok(fields(json!({
                "patch": patch_json(shared, &info),
                "accepted": entry,
                "duration_us": started.elapsed().as_micros() as u64,
            })))
        }
        Request::Check { file } => match shared.config.loader.check(&file) {
            Ok(report) => {
                tracing::info!(
                    target: "hotpatch::control",
                    op = "check",
                    outcome = "ok",
                    patch_name = %report.name,
                    file = %file.display(),
                    duration_us = started.elapsed().as_micros() as u64,
                    peer_uid = peer.uid,
                    peer_pid = peer.pid,
                    "patch passes every check"
                );
                shared.events.push(Event {
                    op: "check",
                    outcome: "ok".into(),
                    patch: None,
                    file: Some(file.to_string_lossy().into_owned()),
                    peer: Some(*peer),
                    duration: Some(started.elapsed()),
                    message: format!("{} {} passes every check", report.name, report.version),
                });
                Ok(fields(json!({
                    "check": {
                        "name": report.name,
                        "version": report.version,
                        "description": report.description,
                        "file": report.file.to_string_lossy(),
                        "functions": report.changes.iter().map(|c| json!({
                            "path": c.function,
                            "now": implementation_json(&c.now),
                        })).collect::<Vec<_>>(),
                        "has_init": report.has_init,
                    }
                })))
            }
            Err(e) => {
                let f = failure_of(&e);
                record(shared, "check", peer, started, Some(&file), Err(&f));
                Err(f)
            }
        },
        Request::Revert { patch, deadline: d } => {
            let info = resolve(&patch)?;
            match deadline(shared, d).revert_id(info.id) {
                Ok(()) => {
                    let reply = patch_json(shared, &info);
                    shared.applied_by.lock().remove(&info.id.get());
                    record(shared, "revert", peer, started, Some(&info.file), Ok(&info));
                    let unaccepted = unrecord(shared, peer, &info, None);
                    Ok(fields(json!({
                        "reverted": reply,
                        "unaccepted": unaccepted,
                        "duration_us": started.elapsed().as_micros() as u64,
                    })))
                }
                Err(e) => {
                    let f = failure_of(&e);
                    record(shared, "revert", peer, started, Some(&info.file), Err(&f));
                    Err(f)
                }
            }
        }
        Request::Replace {
            patch,
            file,
            deadline: d,
        } => {
            let old = resolve(&patch)?;
            match deadline(shared, d).replace(old.id, &file) {
                Ok(new) => {
                    let info = new.info().clone();
                    let replaced = patch_json(shared, &old);
                    {
                        let mut by = shared.applied_by.lock();
                        by.remove(&old.id.get());
                        by.insert(info.id.get(), *peer);
                    }
                    record(shared, "replace", peer, started, Some(&file), Ok(&info));
                    let unaccepted = unrecord(shared, peer, &old, Some(&info));
                    Ok(fields(json!({
                        "unaccepted": unaccepted,
                        "patch": patch_json(shared, &info),
                        "replaced": replaced,
                        "duration_us": started.elapsed().as_micros() as u64,
                    })))
                }
                Err(e) => {
                    let f = failure_of(&e);
                    record(shared, "replace", peer, started, Some(&file), Err(&f));
                    Err(f)
                }
            }
        }
    }
}

/// An event of the state directory or a watch window: the ring and a
/// `tracing` event (info if `outcome` is `ok`, a warning otherwise).
#[allow(clippy::too_many_arguments)]
fn note(
    shared: &Shared,
    op: &'static str,
    peer: Option<&Peer>,
    info: &PatchInfo,
    file: Option<&std::path::Path>,
    outcome: &str,
    duration: Duration,
    message: String,
) {
    let file_text = file.map(|f| f.to_string_lossy().into_owned());
    if outcome == "ok" {
        tracing::info!(
            target: "hotpatch::control",
            op,
            outcome,
            patch_id = info.id.get(),
            patch_name = %info.name,
            file = file_text.as_deref(),
            duration_us = duration.as_micros() as u64,
            peer_uid = peer.map(|p| p.uid),
            peer_pid = peer.map(|p| p.pid),
            "{message}"
        );
    } else {
        tracing::warn!(
            target: "hotpatch::control",
            op,
            outcome,
            patch_id = info.id.get(),
            patch_name = %info.name,
            file = file_text.as_deref(),
            duration_us = duration.as_micros() as u64,
            peer_uid = peer.map(|p| p.uid),
            peer_pid = peer.map(|p| p.pid),
            reason = %message,
            "control {op}: {outcome}"
        );
    }
    shared.events.push(Event {
        op,
        outcome: outcome.to_owned(),
        patch: Some((info.id.get(), info.name.clone())),
        file: file_text,
        peer: peer.copied(),
        duration: Some(duration),
        message,
    });
}

fn entry_json(shared: &Shared, id: u64) -> Value {
    shared
        .state
        .lock()
        .as_ref()
        .map_or(Value::Null, |s| s.to_json())["accepted"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["applied_as"] == json!(id)).cloned())
        .unwrap_or(Value::Null)
}

fn no_state_dir(shared: &Shared) -> Failure {
    Failure::new(
        "no_state_dir",
        format!(
            "{} has no state directory (ControlBuilder::state_dir): patches cannot be accepted",
            shared.config.service
        ),
    )
}

/// Accepts applied patch `info`: stored in the state directory.
fn accept_patch(shared: &Shared, peer: &Peer, info: &PatchInfo) -> Result<Value, Failure> {
    let started = Instant::now();
    let result = {
        let mut state = shared.state.lock();
        match state.as_mut() {
            None => Err(no_state_dir(shared)),
            Some(store) if store.of(info.id.get()).is_some() => Err(Failure::new(
                "already_accepted",
                format!("patch {} {} is accepted already", info.id, info.name),
            )
            .with("patch", json!({ "id": info.id.get(), "name": info.name }))),
            Some(store) => store.accept(&shared.config.loader, info),
        }
    };
    match result {
        Ok(entry) => {
            let message = format!(
                "accepted {} {} {} as #{} ({})",
                info.id, info.name, info.version, entry.seq, entry.file
            );
            note(
                shared,
                "accept",
                Some(peer),
                info,
                Some(&info.file),
                "ok",
                started.elapsed(),
                message,
            );
            Ok(entry_json(shared, info.id.get()))
        }
        Err(f) => {
            note(
                shared,
                "accept",
                Some(peer),
                info,
                Some(&info.file),
                f.kind,
                started.elapsed(),
                f.message.clone(),
            );
            Err(f)
        }
    }
}

/// Patch `old` was reverted (`new`: or replaced by it): the record follows.
/// The entry dropped, if it was accepted.
fn unrecord(shared: &Shared, peer: &Peer, old: &PatchInfo, new: Option<&PatchInfo>) -> Value {
    let started = Instant::now();
    let mut state = shared.state.lock();
    let Some(store) = state.as_mut() else {
        return Value::Null;
    };
    let result = match new {
        None => store.reverted(old.id.get()),
        Some(new) => store.replaced(&shared.config.loader, old.id.get(), new),
    };
    drop(state);
    match (result, new) {
        (Ok(None), _) => Value::Null,
        (Ok(Some(entry)), None) => {
            let message = format!("{} {} is no longer accepted (reverted)", old.id, old.name);
            note(
                shared,
                "unaccept",
                Some(peer),
                old,
                None,
                "ok",
                started.elapsed(),
                message,
            );
            json!({ "seq": entry.seq, "name": entry.name })
        }
        (Ok(Some(entry)), Some(new)) => {
            let message = format!(
                "accepted {} {} in place of {} {} (#{})",
                new.id, new.name, old.id, old.name, entry.seq
            );
            note(
                shared,
                "accept",
                Some(peer),
                new,
                Some(&new.file),
                "ok",
                started.elapsed(),
                message,
            );
            Value::Null
        }
        (Err(f), _) => {
            let message = format!(
                "the state directory could not follow: {} (the record no longer holds {} {})",
                f.message, old.id, old.name
            );
            note(
                shared,
                "accept",
                Some(peer),
                old,
                None,
                f.kind,
                started.elapsed(),
                message.clone(),
            );
            json!({ "error": { "kind": f.kind, "message": message } })
        }
    }
}

/// Runs the watch window of a patch just applied; its `watch` object, or
/// the `rolled_back` failure.
fn watched(
    shared: &Shared,
    peer: &Peer,
    loader: &crate::Loader,
    info: &PatchInfo,
    window: Duration,
) -> Result<Value, Failure> {
    let started = Instant::now();
    let options = super::Watch {
        window,
        max_panics: shared.config.max_panics,
        check_interval: shared.config.check_interval,
    };
    tracing::info!(
        target: "hotpatch::control",
        op = "watch",
        patch_id = info.id.get(),
        patch_name = %info.name,
        window_ms = window.as_millis() as u64,
        max_panics = options.max_panics,
        "watch window opened"
    );
    let outcome = super::watch(loader, info.id, &options).map_err(|e| failure_of(&e))?;
    let elapsed = started.elapsed();
    match outcome {
        super::WatchOutcome::Kept {
            panics,
            check_rounds,
        } => {
            let message = format!(
                "{} {} kept after its {} ms window ({panics} panic(s), {check_rounds} round(s) of health checks)",
                info.id,
                info.name,
                window.as_millis()
            );
            note(
                shared,
                "watch",
                Some(peer),
                info,
                Some(&info.file),
                "ok",
                elapsed,
                message,
            );
            Ok(json!({
                "outcome": "kept",
                "window_ms": window.as_millis() as u64,
                "panics": panics,
                "check_rounds": check_rounds,
            }))
        }
        super::WatchOutcome::Gone => {
            let message = format!(
                "{} {} was reverted during its watch window",
                info.id, info.name
            );
            note(
                shared,
                "watch",
                Some(peer),
                info,
                Some(&info.file),
                "not_applied",
                elapsed,
                message.clone(),
            );
            Err(Failure::new("not_applied", message)
                .with("patch", json!({ "id": info.id.get(), "name": info.name })))
        }
        super::WatchOutcome::RolledBack {
            reason,
            panics,
            check,
            revert_error,
        } => {
            if revert_error.is_none() {
                shared.applied_by.lock().remove(&info.id.get());
                unrecord(shared, peer, info, None);
            }
            let message = match &revert_error {
                None => format!("{} {} rolled back: {reason}", info.id, info.name),
                Some(e) => format!(
                    "{} {} should be rolled back ({reason}) but the revert failed: {e}",
                    info.id, info.name
                ),
            };
            let outcome = if revert_error.is_none() {
                "rolled_back"
            } else {
                "rollback_failed"
            };
            note(
                shared,
                "rollback",
                Some(peer),
                info,
                Some(&info.file),
                outcome,
                elapsed,
                message.clone(),
            );
            Err(Failure::new(outcome, message)
                .with("patch", json!({ "id": info.id.get(), "name": info.name }))
                .with("reason", json!(reason))
                .with("panics", json!(panics))
                .with("check", json!(check))
                .with("after_ms", json!(elapsed.as_millis() as u64)))
        }
    }
}

fn status(shared: &Shared) -> Map<String, Value> {
    let applied = crate::applied();
    // Patches reverted from inside the service no longer need a record.
    shared
        .applied_by
        .lock()
        .retain(|id, _| applied.iter().any(|p| p.id.get() == *id));
    let transition = crate::transition().map(|t| {
        json!({
            "what": t.what,
            "functions": t.functions,
            "elapsed_ms": t.elapsed.as_millis() as u64,
            "reversing": t.reversing,
            "waiting_for": t.waiting_for.iter().map(thread_json).collect::<Vec<_>>(),
            "waiting_for_requests": t.waiting_for_requests.iter().map(request_json).collect::<Vec<_>>(),
        })
    });
    fields(json!({
        "service": shared.config.service,
        "pid": std::process::id(),
        "uid": shared.config.own_uid,
        "socket": shared.config.socket.to_string_lossy(),
        "hotpatch_version": env!("CARGO_PKG_VERSION"),
        "patches": applied.iter().map(|p| patch_json(shared, p)).collect::<Vec<_>>(),
        "functions": crate::functions().iter().map(|f| json!({
            "path": f.path,
            "signature": f.signature,
            "implementation": implementation_json(&f.implementation),
            "in_transition": f.in_transition,
        })).collect::<Vec<_>>(),
        "transition": transition,
        "state": shared.state.lock().as_ref().map(|s| s.to_json()),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn reply_is_well_formed(line: &str) -> Value {
        let v: Value = serde_json::from_str(line).expect("the reply is JSON");
        assert_eq!(v["v"], json!(1), "{line}");
        assert_eq!(v["ok"], json!(false), "{line}");
        assert!(v["error"]["kind"].is_string(), "{line}");
        assert!(v["error"]["message"].is_string(), "{line}");
        assert!(!line.contains('\n'), "one line: {line}");
        v
    }

    #[test]
    fn parses_each_verb() {
        let p = |s: &str| parse(s.as_bytes());
        assert_eq!(p(r#"{"v":1,"op":"status"}"#), Ok(Request::Status));
        assert_eq!(
            p(r#"{"v":1,"op":"apply","file":"/x/fix.so","deadline_ms":1500}"#),
            Ok(Request::Apply {
                file: "/x/fix.so".into(),
                deadline: Some(Duration::from_millis(1500)),
                watch: None,
                accept: false,
            })
        );
        assert_eq!(
            p(r#"{"v":1,"op":"apply","file":"/x/fix.so","watch_ms":2000,"accept":true}"#),
            Ok(Request::Apply {
                file: "/x/fix.so".into(),
                deadline: None,
                watch: Some(Duration::from_millis(2000)),
                accept: true,
            })
        );
        assert_eq!(
            p(r#"{"v":1,"op":"accept","patch":"fix"}"#),
            Ok(Request::Accept {
                patch: PatchRef::Name("fix".into())
            })
        );
        assert_eq!(
            p(r#"{"v":1,"op":"check","file":"/x/fix.so"}"#),
            Ok(Request::Check {
                file: "/x/fix.so".into()
            })
        );
        assert_eq!(
            p(r#"{"v":1,"op":"revert","patch":3}"#),
            Ok(Request::Revert {
                patch: PatchRef::Id(3),
                deadline: None
            })
        );
        assert_eq!(
            p(r#"{"v":1,"op":"revert","patch":"fix"}"#),
            Ok(Request::Revert {
                patch: PatchRef::Name("fix".into()),
                deadline: None
            })
        );
        assert_eq!(
            p(r#"{"v":1,"op":"replace","patch":1,"file":"/y.so"}"#),
            Ok(Request::Replace {
                patch: PatchRef::Id(1),
                file: "/y.so".into(),
                deadline: None
            })
        );
        assert_eq!(
            p(r#"{"v":1,"op":"events","since":4}"#),
            Ok(Request::Events {
                since: 4,
                limit: 100
            })
        );
    }

    #[test]
    fn refuses_what_is_not_a_request() {
        let kind = |s: &str| parse(s.as_bytes()).unwrap_err().kind;
        assert_eq!(kind("status"), "bad_request");
        assert_eq!(kind("[1]"), "bad_request");
        assert_eq!(kind(r#"{"op":"status"}"#), "bad_request");
        assert_eq!(kind(r#"{"v":2,"op":"status"}"#), "unsupported_version");
        assert_eq!(kind(r#"{"v":"1","op":"status"}"#), "unsupported_version");
        assert_eq!(kind(r#"{"v":1,"op":"explode"}"#), "unknown_op");
        assert_eq!(kind(r#"{"v":1,"op":7}"#), "bad_request");
        assert_eq!(kind(r#"{"v":1,"op":"apply"}"#), "bad_request");
        assert_eq!(kind(r#"{"v":1,"op":"apply","file":7}"#), "bad_request");
        assert_eq!(
            kind(r#"{"v":1,"op":"apply","file":"fix.so"}"#),
            "bad_request"
        );
        assert_eq!(
            kind(r#"{"v":1,"op":"apply","file":"/f.so","deadline_ms":-1}"#),
            "bad_request"
        );
        assert_eq!(kind(r#"{"v":1,"op":"status","force":true}"#), "bad_request");
        assert_eq!(kind(r#"{"v":1,"op":"revert","patch":[1]}"#), "bad_request");
        let deep = "[".repeat(10_000);
        assert_eq!(kind(&deep), "bad_request");
    }

    /// JSON values, nested, with the protocol's keys and verbs likely.
    fn json_value() -> impl Strategy<Value = Value> {
        let key = prop_oneof![
            Just("v".to_owned()),
            Just("op".to_owned()),
            Just("file".to_owned()),
            Just("patch".to_owned()),
            Just("deadline_ms".to_owned()),
            Just("since".to_owned()),
            Just("limit".to_owned()),
            Just("watch_ms".to_owned()),
            Just("accept".to_owned()),
            "[a-z_]{0,8}",
        ];
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            proptest::sample::select(OPS).prop_map(Value::from),
            "/?[a-z./]{0,12}".prop_map(Value::from),
            ".*".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 32, 8, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
                prop::collection::btree_map(key.clone(), inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn arbitrary_bytes_get_a_well_formed_error(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            if let Err(f) = parse(&bytes) {
                reply_is_well_formed(&f.to_line());
            }
        }

        #[test]
        fn arbitrary_json_parses_or_gets_a_well_formed_error(
            mut value in json_value(),
            v in prop_oneof![Just(json!(1)), any::<i64>().prop_map(Value::from), Just(Value::Null)],
            op in prop_oneof![proptest::sample::select(OPS).prop_map(Value::from), any::<u8>().prop_map(Value::from)],
        ) {
            if let Value::Object(m) = &mut value {
                m.insert("v".into(), v);
                m.insert("op".into(), op);
            }
            let line = value.to_string();
            match parse(line.as_bytes()) {
                Ok(Request::Apply { file, .. } | Request::Check { file } | Request::Replace { file, .. }) => {
                    prop_assert!(file.is_absolute());
                }
                Ok(Request::Events { limit, .. }) => prop_assert!(limit <= CAPACITY),
                Ok(_) => {}
                Err(f) => {
                    let reply = reply_is_well_formed(&f.to_line());
                    prop_assert_eq!(reply["error"]["kind"].as_str(), Some(f.kind));
                }
            }
        }
    }

    /// Requests of each verb with some of its fields (and sometimes one
    /// more), each of a random type: near misses of valid requests.
    fn near_request() -> impl Strategy<Value = Value> {
        let field_value = prop_oneof![
            any::<u64>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            "/[a-z]{1,8}(/[a-z.]{1,8}){0,2}".prop_map(Value::from),
            "[a-z./]{0,12}".prop_map(Value::from),
            Just(Value::Null),
            Just(json!([1])),
        ];
        let fields = prop::collection::btree_map(
            proptest::sample::select(vec![
                "file",
                "patch",
                "deadline_ms",
                "since",
                "limit",
                "watch_ms",
                "accept",
                "x",
            ]),
            field_value,
            0..4,
        );
        (proptest::sample::select(OPS), fields).prop_map(|(op, fields)| {
            let mut m: Map<String, Value> =
                fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
            m.insert("v".into(), json!(1));
            m.insert("op".into(), json!(op));
            Value::Object(m)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        #[test]
        fn near_requests_parse_to_valid_requests_or_well_formed_errors(value in near_request()) {
            let line = value.to_string();
            match parse(line.as_bytes()) {
                Ok(Request::Apply { file, .. } | Request::Check { file } | Request::Replace { file, .. }) => {
                    prop_assert!(file.is_absolute(), "{}", line);
                    prop_assert_eq!(Some(file.to_str().unwrap()), value["file"].as_str());
                }
                Ok(Request::Events { limit, .. }) => prop_assert!(limit <= CAPACITY),
                Ok(Request::Status) => prop_assert_eq!(value.as_object().unwrap().len(), 2, "{}", line),
                Ok(Request::Revert { .. } | Request::Accept { .. }) => {}
                Err(f) => {
                    let reply = reply_is_well_formed(&f.to_line());
                    prop_assert_eq!(reply["error"]["kind"].as_str(), Some("bad_request"), "{}", line);
                }
            }
        }
    }

    #[test]
    fn every_runtime_error_has_its_own_kind() {
        let path = PathBuf::from("/f.so");
        let kinds = [
            kind(&Error::NotApplied { id: PatchId(1) }),
            kind(&Error::AlreadyApplied {
                path: path.clone(),
                name: "x".into(),
                id: PatchId(1),
            }),
            kind(&Error::Timeout {
                what: "apply".into(),
                deadline: Duration::ZERO,
                stalled: vec![],
                requests: vec![],
            }),
            kind(&Error::Busy {
                what: "apply".into(),
                waited: Duration::ZERO,
            }),
            kind(&Error::UnknownTarget {
                path,
                function: "f".into(),
            }),
        ];
        let distinct: std::collections::HashSet<_> = kinds.iter().collect();
        assert_eq!(distinct.len(), kinds.len(), "{kinds:?}");
    }

    #[test]
    fn events_ring_is_bounded_and_ordered() {
        let ring = crate::control::events::Ring::new();
        for i in 0..CAPACITY + 10 {
            ring.push(Event {
                op: "apply",
                outcome: "ok".into(),
                patch: Some((i as u64, "p".into())),
                file: None,
                peer: None,
                duration: None,
                message: String::new(),
            });
        }
        let (all, last) = ring.since(0, usize::MAX);
        assert_eq!(all.len(), CAPACITY);
        assert_eq!(last, (CAPACITY + 10) as u64);
        assert_eq!(all[0]["seq"], json!(11));
        let (tail, _) = ring.since(last - 3, 100);
        let seqs: Vec<_> = tail.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, vec![last - 2, last - 1, last]);
    }
}
