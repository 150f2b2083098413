//! The audit trail: each operation's outcome as a `tracing` event and an
//! entry of the events ring (`events.rs`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::endpoint::Endpoint;
use super::events::Event;
use super::peer::Peer;
use super::protocol::Failure;
use crate::PatchInfo;
use crate::quiesce::TransitionReport;

/// Records an operation's outcome: a `tracing` event and the ring.
pub(crate) fn record(
    shared: &Endpoint,
    op: &'static str,
    peer: &Peer,
    started: Instant,
    file: Option<&PathBuf>,
    outcome: Result<(&PatchInfo, Option<&TransitionReport>), &Failure>,
) {
    let duration = started.elapsed();
    let file_text = file.map(|f| f.to_string_lossy().into_owned());
    // The threads a timed-out transition waited for, by name and tid.
    let stalled = outcome
        .err()
        .and_then(|f| f.extra.get("stalled"))
        .map(Value::to_string);
    // The registered threads the transition of this operation waited for.
    let waited = outcome.ok().and_then(|(_, report)| report);
    let waited_for = waited.as_ref().map(|w| {
        w.threads
            .iter()
            .map(|(name, tid)| format!("'{}' (tid {tid})", name.as_deref().unwrap_or("<unnamed>")))
            .collect::<Vec<_>>()
            .join(", ")
    });
    let (patch, outcome, mut message) = match outcome {
        Ok((p, _)) if matches!(op, "apply" | "replace") => (
            Some((p.id.get(), p.name.clone())),
            "ok".to_owned(),
            format!("{op} {} {} {}, {}", p.id, p.name, p.version, p.placement),
        ),
        Ok((p, _)) => (
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
        message.push_str(&hook_writes(&w.hooks));
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

/// What the entry writes of hooked functions did, for a message: each
/// write (the functions, how long threads were kept from running, and
/// for the breakpoint protocol how long calls took the trap), and the
/// entries left redirected.
pub(crate) fn hook_writes(writes: &[crate::quiesce::HookWrite]) -> String {
    let mut out = String::new();
    for w in writes {
        let functions = w
            .functions
            .iter()
            .map(|f| format!("`{f}`"))
            .collect::<Vec<_>>()
            .join(", ");
        let done = if w.op == "hook" { "hooked" } else { "unhooked" };
        let s = if w.threads == 1 { "" } else { "s" };
        out.push_str(&match (&w.failed, w.window) {
            (None, None) => format!(
                " ({done} {functions}: {} thread{s} stopped once for {:?})",
                w.threads, w.pause
            ),
            (None, Some(window)) if w.threads == 0 => format!(
                " ({done} {functions}: no thread interrupted; calls took the breakpoint for \
                 {window:?})"
            ),
            (None, Some(window)) => format!(
                " ({done} {functions}: {} thread{s} sampled, none held, each interrupted for \
                 at most {:?}; calls took the breakpoint for {window:?})",
                w.threads, w.pause
            ),
            (Some(reason), _) => format!(
                " (the {} of {functions} stay{} redirected to the original code, which calls \
                 run: {reason})",
                if w.functions.len() == 1 {
                    "entry"
                } else {
                    "entries"
                },
                if w.functions.len() == 1 { "s" } else { "" },
            ),
        });
    }
    out
}

/// An event of the state directory or a watch window: the ring and a
/// `tracing` event (info if `outcome` is `ok`, a warning otherwise).
#[allow(clippy::too_many_arguments)]
pub(crate) fn note(
    shared: &Endpoint,
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::hook_writes;
    use crate::quiesce::HookWrite;

    fn write(op: &'static str, threads: usize, window: Option<Duration>) -> HookWrite {
        HookWrite {
            op,
            functions: vec!["svc::price".into()],
            threads,
            pause: Duration::from_micros(2),
            window,
            failed: None,
        }
    }

    /// The event says threads were stopped only when they were.
    #[test]
    fn each_protocol_is_described_as_it_ran() {
        let stopped = hook_writes(&[write("hook", 3, None)]);
        assert!(
            stopped.contains("3 threads stopped once for 2µs"),
            "{stopped}"
        );
        let sampled = hook_writes(&[write("hook", 3, Some(Duration::from_micros(90)))]);
        assert!(
            sampled.contains("3 threads sampled, none held")
                && sampled.contains("at most 2µs")
                && sampled.contains("breakpoint for 90µs")
                && !sampled.contains("stopped"),
            "{sampled}"
        );
        let unhooked = hook_writes(&[write("unhook", 0, Some(Duration::from_micros(9)))]);
        assert!(
            unhooked.contains("unhooked `svc::price`: no thread interrupted"),
            "{unhooked}"
        );
    }
}
