//! Watch windows: a patch on trial, rolled back on panics or a failed
//! health check.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use serde_json::{Value, json};

use super::audit::note;
use super::endpoint::Endpoint;
use super::peer::Peer;
use super::protocol::{ErrorKind, Failure, failure_of};
use crate::patch::panics_of;
use crate::{Error, Loader, PatchId, PatchInfo};

type Check = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

static CHECKS: Mutex<Vec<(String, Check)>> = Mutex::new(Vec::new());

/// Registers a health check that watch windows run (see [`watch`]): `Ok`
/// when the service is healthy, `Err(reason)` when not. A check that
/// panics counts as failed. Registering a name again replaces its check.
///
/// Checks run on the thread that watches (for the endpoint, the
/// connection's thread), every [`Watch::check_interval`] during a window;
/// they should be quick.
///
/// # Examples
///
/// ```
/// hotpatch::control::health_check("queue", || {
///     let depth = 3; // the service's own measure
///     if depth < 1000 { Ok(()) } else { Err(format!("queue depth {depth}")) }
/// });
/// ```
pub fn health_check(
    name: impl Into<String>,
    check: impl Fn() -> Result<(), String> + Send + Sync + 'static,
) {
    let name = name.into();
    let mut checks = CHECKS.lock();
    checks.retain(|(n, _)| *n != name);
    checks.push((name, Arc::new(check)));
}

/// The options of a watch window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watch {
    /// How long the patch is on trial.
    pub window: Duration,
    /// More panics than this out of the patch's functions roll it back
    /// (default 0: any panic).
    pub max_panics: u64,
    /// How often the health checks run (default 250 ms; they also run at
    /// the end of the window).
    pub check_interval: Duration,
}

impl Watch {
    /// A window of `window` with the defaults.
    pub fn new(window: Duration) -> Self {
        Watch {
            window,
            max_panics: 0,
            check_interval: Duration::from_millis(250),
        }
    }
}

/// How a watch window ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum WatchOutcome {
    /// The patch was live at the end of its window and stays applied.
    Kept {
        /// Panics out of its functions during the window (at most the
        /// threshold).
        panics: u64,
        /// Rounds of health checks run (0 if none is registered).
        check_rounds: u64,
    },
    /// The patch was reverted because of `reason`.
    RolledBack {
        /// Why, for people.
        reason: String,
        /// Panics out of its functions during the window.
        panics: u64,
        /// The health check that failed, if one did.
        check: Option<String>,
        /// Set if the revert itself failed (the patch is still applied).
        revert_error: Option<String>,
    },
    /// The patch was reverted by something else during the window.
    Gone,
    /// The window was given up before its end (the client that asked for
    /// it went away): the patch stays applied and is no longer watched.
    Cancelled {
        /// Panics out of its functions until then.
        panics: u64,
    },
}

/// Runs the registered health checks: how many there are, or the first
/// failing one and its reason.
fn run_checks() -> Result<usize, (String, String)> {
    let checks: Vec<(String, Check)> = CHECKS.lock().clone();
    for (name, check) in &checks {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check()));
        match result {
            Ok(Ok(())) => {}
            Ok(Err(reason)) => return Err((name.clone(), reason)),
            Err(_) => return Err((name.clone(), "the health check panicked".to_owned())),
        }
    }
    Ok(checks.len())
}

/// Watches the applied patch `id` for `options.window`: counts the panics
/// that come out of its functions and runs the registered health checks
/// ([`health_check`]). Above `options.max_panics` panics, or on a failed
/// check, reverts it with `loader` and says why. Blocks the calling thread
/// for the window (less if it rolls back).
///
/// # Errors
///
/// [`Error::NotApplied`] if `id` is not applied when the window opens.
///
/// # Examples
///
/// ```no_run
/// use hotpatch::control::{Watch, WatchOutcome, watch};
/// let loader = hotpatch::Loader::new();
/// let patch = loader.load("fix.so")?;
/// match watch(&loader, patch.id(), &Watch::new(std::time::Duration::from_secs(60)))? {
///     WatchOutcome::Kept { .. } => eprintln!("fix kept"),
///     other => eprintln!("fix not kept: {other:?}"),
/// }
/// # Ok::<(), hotpatch::Error>(())
/// ```
pub fn watch(loader: &Loader, id: PatchId, options: &Watch) -> Result<WatchOutcome, Error> {
    watch_until(loader, id, options, &|| false)
}

/// [`watch`], given up ([`WatchOutcome::Cancelled`]) as soon as `cancelled`
/// says so (it is asked every tick).
pub(crate) fn watch_until(
    loader: &Loader,
    id: PatchId,
    options: &Watch,
    cancelled: &dyn Fn() -> bool,
) -> Result<WatchOutcome, Error> {
    let base = panics_of(id).ok_or(Error::NotApplied { id })?;
    let start = Instant::now();
    let end = start + options.window;
    // Panics are looked at every tick (a counter read); checks at their
    // interval. Nothing runs outside a window.
    let tick = options.check_interval.min(Duration::from_millis(20));
    let mut next_check = start + options.check_interval;
    let mut rounds = 0;
    loop {
        let Some(now_panics) = panics_of(id) else {
            return Ok(WatchOutcome::Gone);
        };
        let panics = now_panics - base;
        let now = Instant::now();
        let mut failed = None;
        if panics > options.max_panics {
            failed = Some((
                format!(
                    "{panics} panic(s) out of the patch's functions (threshold {})",
                    options.max_panics
                ),
                None,
            ));
        } else if cancelled() {
            return Ok(WatchOutcome::Cancelled { panics });
        } else if now >= next_check || now >= end {
            next_check = now + options.check_interval;
            match run_checks() {
                Ok(0) => {}
                Ok(_) => rounds += 1,
                Err((name, reason)) => {
                    failed = Some((
                        format!("health check `{name}` failed: {reason}"),
                        Some(name),
                    ));
                }
            }
        }
        if let Some((reason, check)) = failed {
            let revert_error = match loader.revert_id(id) {
                Ok(()) => None,
                Err(Error::NotApplied { .. }) => return Ok(WatchOutcome::Gone),
                Err(e) => Some(e.to_string()),
            };
            let cause = if check.is_some() {
                "health_check"
            } else {
                "panics"
            };
            crate::metrics::rolled_back(cause, revert_error.is_none());
            return Ok(WatchOutcome::RolledBack {
                reason,
                panics,
                check,
                revert_error,
            });
        }
        if now >= end {
            return Ok(WatchOutcome::Kept {
                panics,
                check_rounds: rounds,
            });
        }
        std::thread::sleep(tick.min(end - now));
    }
}

// The control endpoint's side: an `apply` with a watch window.

/// Patch `old` was rolled back in its watch window (reverted without the
/// record): if it was accepted meanwhile, the record follows.
fn unrecord(shared: &Endpoint, peer: &Peer, old: &PatchInfo) {
    let started = Instant::now();
    let _serial = shared.state_ops.lock();
    let result = shared.state.lock().as_mut().map(|s| s.forget(old.id.get()));
    match result {
        None | Some(Ok(None)) => {}
        Some(Ok(Some(_))) => {
            let message = format!(
                "{} {} is no longer accepted (rolled back)",
                old.id, old.name
            );
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
        }
        Some(Err(f)) => {
            let message = format!(
                "{} {} was rolled back but stays in the record, which could not be written ({}): \
                 it will be re-applied at restart unless reverted then",
                old.id, old.name, f
            );
            let f = Failure::from(f);
            note(
                shared,
                "unaccept",
                Some(peer),
                old,
                None,
                f.kind,
                started.elapsed(),
                message,
            );
        }
    }
}

/// Runs the watch window of a patch just applied; its `watch` object, or
/// the `rolled_back` failure.
pub(crate) fn watched(
    shared: &Endpoint,
    peer: &Peer,
    loader: &crate::Loader,
    info: &PatchInfo,
    window: Duration,
    gone: &dyn Fn() -> bool,
) -> Result<Value, Failure> {
    let started = Instant::now();
    let options = Watch {
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
    let outcome = watch_until(loader, info.id, &options, gone).map_err(|e| failure_of(&e))?;
    let elapsed = started.elapsed();
    // The event of this window's end: `op` is "watch" or "rollback".
    let note_end = |op: &'static str, outcome: &str, message: String| {
        note(
            shared,
            op,
            Some(peer),
            info,
            Some(&info.file),
            outcome,
            elapsed,
            message,
        );
    };
    match outcome {
        WatchOutcome::Cancelled { panics } => {
            let message = format!(
                "{} {}: its client went away {} ms into its {} ms watch window ({panics} \
                 panic(s) by then): it stays applied, on trial and not accepted, and is no \
                 longer watched",
                info.id,
                info.name,
                elapsed.as_millis(),
                window.as_millis()
            );
            note_end("watch", "cancelled", message.clone());
            Err(Failure::new(ErrorKind::Cancelled, message)
                .with("patch", json!({ "id": info.id.get(), "name": info.name })))
        }
        WatchOutcome::Kept {
            panics,
            check_rounds,
        } => {
            let checks = match check_rounds {
                0 => "no health check registered".to_owned(),
                n => format!("{n} round(s) of health checks"),
            };
            let message = format!(
                "{} {} kept after its {} ms window ({panics} panic(s), {checks})",
                info.id,
                info.name,
                window.as_millis()
            );
            note_end("watch", "ok", message);
            Ok(json!({
                "outcome": "kept",
                "window_ms": window.as_millis() as u64,
                "panics": panics,
                "check_rounds": check_rounds,
            }))
        }
        WatchOutcome::Gone => {
            let message = format!(
                "{} {} was reverted during its watch window",
                info.id, info.name
            );
            note_end("watch", "not_applied", message.clone());
            Err(Failure::new(ErrorKind::NotApplied, message)
                .with("patch", json!({ "id": info.id.get(), "name": info.name })))
        }
        WatchOutcome::RolledBack {
            reason,
            panics,
            check,
            revert_error,
        } => {
            if revert_error.is_none() {
                shared.applied_by.lock().remove(&info.id.get());
                unrecord(shared, peer, info);
            }
            let message = match &revert_error {
                None => format!("{} {} rolled back: {reason}", info.id, info.name),
                Some(e) => format!(
                    "{} {} should be rolled back ({reason}) but the revert failed: {e}",
                    info.id, info.name
                ),
            };
            let outcome = if revert_error.is_none() {
                ErrorKind::RolledBack
            } else {
                ErrorKind::RollbackFailed
            };
            note_end("rollback", outcome.name(), message.clone());
            Err(Failure::new(outcome, message)
                .with("patch", json!({ "id": info.id.get(), "name": info.name }))
                .with("reason", json!(reason))
                .with("panics", json!(panics))
                .with("check", json!(check))
                .with("after_ms", json!(elapsed.as_millis() as u64)))
        }
    }
}
