//! The verbs: running a parsed request, writing its reply.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use super::PROTOCOL_VERSION;
use super::audit::{note, record};
use super::endpoint::Endpoint;
use super::events::{Event, peer_json, unix_ms};
use super::peer::Peer;
use super::protocol::{
    ErrorKind, Failure, Operation, PatchRef, failure_of, parse, request_json, thread_json,
};
use super::state::StoreError;
use super::watch::watched;
use crate::{Error, Implementation, PatchId, PatchInfo};

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Failure {
        match e {
            StoreError::Io(message) => Failure::new(ErrorKind::State, message),
            StoreError::FileChanged(message) => Failure::new(ErrorKind::FileChanged, message),
            StoreError::Patch(e) => failure_of(&e),
        }
    }
}

fn implementation_json(i: &Implementation) -> Value {
    match i {
        Implementation::Original => json!({ "kind": "original" }),
        Implementation::Patch { id, name } => {
            json!({ "kind": "patch", "id": id.get(), "name": name })
        }
    }
}

fn patch_json(shared: &Endpoint, p: &PatchInfo) -> Value {
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
        "hooked": p.hooked,
        "placement": placement_json(&p.placement),
    })
}

/// Where the patch's code is: `{"kind": "near", "address": ...}` or
/// `{"kind": "dlopen", "reason": ...}`.
fn placement_json(p: &crate::Placement) -> Value {
    match p {
        crate::Placement::Near { address, size } => {
            json!({ "kind": "near", "address": address, "size": size })
        }
        crate::Placement::Dlopen { reason } => {
            json!({ "kind": "dlopen", "reason": reason.to_string() })
        }
        #[allow(unreachable_patterns)]
        other => json!({ "kind": "other", "reason": other.to_string() }),
    }
}

/// `accepted` (kept across restarts) or `applied` (on trial).
fn state_of(shared: &Endpoint, id: u64) -> &'static str {
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
/// `gone` tells whether the client has gone away (a watch window ends
/// when it has).
pub(crate) fn handle(
    shared: &Endpoint,
    peer: &Peer,
    line: &[u8],
    gone: &dyn Fn() -> bool,
) -> String {
    match parse(line) {
        Ok(request) => match run(shared, peer, request, gone) {
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
fn deadline(shared: &Endpoint, asked: Option<Duration>) -> crate::Loader {
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
                    ErrorKind::NotApplied,
                    format!("no applied patch is named `{name}`"),
                )),
                _ => {
                    let ids: Vec<u64> = found.iter().map(|p| p.id.get()).collect();
                    Err(Failure::new(
                        ErrorKind::AmbiguousPatch,
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

fn run(
    shared: &Endpoint,
    peer: &Peer,
    request: Operation,
    gone: &dyn Fn() -> bool,
) -> Result<Map<String, Value>, Failure> {
    let started = Instant::now();
    match request {
        Operation::Status => Ok(status(shared)),
        Operation::Events { since, limit } => {
            let (events, last) = shared.events.since(since, limit as usize);
            Ok(fields(json!({ "events": events, "last_seq": last })))
        }
        Operation::Apply {
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
            let result = shared
                .reading(|| loader.load_reported(&file))
                .map_err(|e| failure_of(&e));
            let info = match result {
                Ok((patch, report)) => {
                    let info = patch.info().clone();
                    shared.applied_by.lock().insert(info.id.get(), *peer);
                    let done = (&info, report.as_ref());
                    record(shared, "apply", peer, started, Some(&file), Ok(done));
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
                reply["watch"] = watched(shared, peer, &loader, &info, window, gone)?;
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
        Operation::Accept { patch } => {
            let info = resolve(&patch)?;
            let entry = accept_patch(shared, peer, &info)?;
            Ok(fields(json!({
                "patch": patch_json(shared, &info),
                "accepted": entry,
                "duration_us": started.elapsed().as_micros() as u64,
            })))
        }
        Operation::Check { file } => match shared.reading(|| shared.config.loader.check(&file)) {
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
        Operation::Revert { patch, deadline: d } => {
            let info = resolve(&patch)?;
            revert(shared, peer, started, &info, d)
        }
        Operation::Replace {
            patch,
            file,
            deadline: d,
        } => {
            let old = resolve(&patch)?;
            replace(shared, peer, started, &old, &file, d)
        }
    }
}

/// The failure of an operation on an accepted patch whose record could
/// not be changed first: nothing changed.
fn unrecorded(f: Failure, info: &PatchInfo) -> Failure {
    Failure {
        message: format!(
            "{}; nothing changed: {} {} stays applied and accepted",
            f.message, info.id, info.name
        ),
        ..f
    }
}

/// Reverts `info`. An accepted patch leaves the record first, then its
/// slots change; if the revert fails it goes back in the record. Every
/// failure says what state the process and the record are in.
fn revert(
    shared: &Endpoint,
    peer: &Peer,
    started: Instant,
    info: &PatchInfo,
    d: Option<Duration>,
) -> Result<Map<String, Value>, Failure> {
    let _serial = shared.state_ops.lock();
    let taken = shared
        .state
        .lock()
        .as_mut()
        .map(|s| s.take_out(info.id.get()))
        .transpose()
        .map(Option::flatten)
        .map_err(Failure::from);
    let taken = match taken {
        Ok(t) => t,
        Err(f) => {
            let f = unrecorded(f, info);
            record(shared, "revert", peer, started, Some(&info.file), Err(&f));
            return Err(f);
        }
    };
    let report = deadline(shared, d).revert_reported(info.id);
    if let Err(e) = &report {
        let mut f = failure_of(e);
        if let Some((pos, entry)) = taken {
            let put = shared.state.lock().as_mut().map(|s| s.put_back(pos, entry));
            if let Some(Err(g)) = put {
                f.message = format!(
                    "{}; {} {} stays applied but is no longer accepted: the record could not \
                     be restored ({}), so it will not be re-applied at restart",
                    f.message, info.id, info.name, g
                );
            }
        }
        record(shared, "revert", peer, started, Some(&info.file), Err(&f));
        return Err(f);
    }
    let mut reply = patch_json(shared, info);
    reply["state"] = json!("reverted");
    shared.applied_by.lock().remove(&info.id.get());
    // An accepted patch ran from its stored copy, which goes now: the
    // event names the file it was accepted from.
    let event_file = taken
        .as_ref()
        .map_or_else(|| info.file.clone(), |(_, e)| PathBuf::from(&e.source));
    let report = report.ok().flatten();
    let done = (info, report.as_ref());
    record(shared, "revert", peer, started, Some(&event_file), Ok(done));
    let unaccepted = match taken {
        None => Value::Null,
        Some((_, entry)) => {
            if let Some(store) = shared.state.lock().as_ref() {
                store.discard(&entry);
            }
            let message = format!(
                "{} {} is no longer accepted (reverted; its stored copy is removed)",
                info.id, info.name
            );
            note(
                shared,
                "unaccept",
                Some(peer),
                info,
                None,
                "ok",
                started.elapsed(),
                message,
            );
            json!({ "seq": entry.seq, "name": entry.name })
        }
    };
    Ok(fields(json!({
        "reverted": reply,
        "unaccepted": unaccepted,
        "duration_us": started.elapsed().as_micros() as u64,
    })))
}

/// Replaces `old` by the patch in `file`. If `old` is accepted, `file` is
/// first copied into the state directory and recorded in its place, and
/// the replace is made from that copy; if the replace fails the record
/// gets `old` back. Every failure says what state the process and the
/// record are in.
fn replace(
    shared: &Endpoint,
    peer: &Peer,
    started: Instant,
    old: &PatchInfo,
    file: &PathBuf,
    d: Option<Duration>,
) -> Result<Map<String, Value>, Failure> {
    let _serial = shared.state_ops.lock();
    let staged = shared.reading(|| {
        shared
            .state
            .lock()
            .as_mut()
            .map(|s| s.stage_replacement(&shared.config.loader, old.id.get(), file))
            .transpose()
            .map(Option::flatten)
            .map_err(Failure::from)
    });
    let staged = match staged {
        Ok(s) => s,
        Err(f) if f.is(ErrorKind::State) => {
            let f = unrecorded(f, old);
            record(shared, "replace", peer, started, Some(file), Err(&f));
            return Err(f);
        }
        Err(f) => {
            record(shared, "replace", peer, started, Some(file), Err(&f));
            return Err(f);
        }
    };
    let from = staged
        .as_ref()
        .map_or_else(|| file.clone(), |s| s.copy.clone());
    let loader = deadline(shared, d);
    let (new, report) = match shared.reading(|| loader.replace_reported(old.id, &from)) {
        Ok((new, report)) => (new.info().clone(), report),
        Err(e) => {
            let mut f = failure_of(&e);
            if let Some(staged) = staged {
                let unstaged = shared.state.lock().as_mut().map(|s| s.unstage(staged));
                if let Some(Err(g)) = unstaged {
                    f.message = format!(
                        "{}; {} {} stays applied, but the record holds the new patch in its \
                         place and could not be restored ({}): at restart the new patch is \
                         applied instead",
                        f.message, old.id, old.name, g
                    );
                }
            }
            record(shared, "replace", peer, started, Some(file), Err(&f));
            return Err(f);
        }
    };
    let mut replaced = patch_json(shared, old);
    replaced["state"] = json!("replaced");
    {
        let mut by = shared.applied_by.lock();
        by.remove(&old.id.get());
        by.insert(new.id.get(), *peer);
    }
    let done = (&new, report.as_ref());
    record(shared, "replace", peer, started, Some(file), Ok(done));
    if let Some(staged) = staged {
        let entry = shared
            .state
            .lock()
            .as_mut()
            .map(|s| s.replaced(staged, new.id.get()));
        if let Some(entry) = entry {
            let message = format!(
                "accepted {} {} in place of {} {} (#{})",
                new.id, new.name, old.id, old.name, entry.seq
            );
            note(
                shared,
                "accept",
                Some(peer),
                &new,
                Some(file),
                "ok",
                started.elapsed(),
                message,
            );
        }
    }
    Ok(fields(json!({
        "unaccepted": Value::Null,
        "patch": patch_json(shared, &new),
        "replaced": replaced,
        "duration_us": started.elapsed().as_micros() as u64,
    })))
}

fn entry_json(shared: &Endpoint, id: u64) -> Value {
    shared
        .state
        .lock()
        .as_ref()
        .map_or(Value::Null, |s| s.to_json())["accepted"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["applied_as"] == json!(id)).cloned())
        .unwrap_or(Value::Null)
}

fn no_state_dir(shared: &Endpoint) -> Failure {
    Failure::new(
        ErrorKind::NoStateDir,
        format!(
            "{} has no state directory (ControlBuilder::state_dir): patches cannot be accepted",
            shared.config.service
        ),
    )
}

/// Accepts applied patch `info`: stored in the state directory.
fn accept_patch(shared: &Endpoint, peer: &Peer, info: &PatchInfo) -> Result<Value, Failure> {
    let started = Instant::now();
    let _serial = shared.state_ops.lock();
    let result = shared.reading(|| {
        let mut state = shared.state.lock();
        match state.as_mut() {
            None => Err(no_state_dir(shared)),
            Some(store) if store.of(info.id.get()).is_some() => Err(Failure::new(
                ErrorKind::AlreadyAccepted,
                format!("{} {} is accepted already", info.id, info.name),
            )
            .with("patch", json!({ "id": info.id.get(), "name": info.name }))),
            Some(store) => store
                .accept(&shared.config.loader, info)
                .map_err(Failure::from),
        }
    });
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

fn status(shared: &Endpoint) -> Map<String, Value> {
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
        "build_id": crate::host::build_id().map(crate::host::hex),
        "patches": applied.iter().map(|p| patch_json(shared, p)).collect::<Vec<_>>(),
        "functions": crate::functions().iter().map(|f| json!({
            "path": f.path,
            "signature": f.signature,
            "implementation": implementation_json(&f.implementation),
            "in_transition": f.in_transition,
            "hooked": f.hooked,
        })).collect::<Vec<_>>(),
        "transition": transition,
        "refused_connections": shared.events.refused_total(),
        "state": shared.state.lock().as_ref().map(|s| s.to_json()),
    }))
}
