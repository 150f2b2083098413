//! The runtime's metrics, through the [`metrics`](https://docs.rs/metrics)
//! facade (cargo feature `metrics`): a service that installed a recorder
//! (Prometheus, OpenTelemetry, statsd exporters) exports them with its
//! own, with no endpoint of ours. Without the feature, or without a
//! recorder, each call here does nothing.
//!
//! Every name and label is listed in the crate docs ("Metrics"); the
//! calls sit where an operation's outcome is known: `Loader::{load, replace, check, revert_id}`, the end of a
//! transition (`quiesce`), a watch window's rollback, the state
//! directory's record.

use std::time::Duration;

use crate::Error;

/// `apply` or `replace` ended: `error` is `None` if it applied.
pub(crate) fn loaded(op: &'static str, error: Option<&Error>, took: Duration) {
    #[cfg(feature = "metrics")]
    {
        let outcome = error.map_or("ok", Error::kind);
        metrics::counter!("hotpatch_applies_total", "op" => op, "outcome" => outcome).increment(1);
        match error {
            None => {
                metrics::histogram!("hotpatch_apply_duration_seconds", "op" => op)
                    .record(took.as_secs_f64());
            }
            Some(e) => refused(op, e),
        }
        applied_now();
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (op, error, took);
}

/// A revert ended: `error` is `None` if it reverted.
pub(crate) fn reverted(error: Option<&Error>, took: Duration) {
    #[cfg(feature = "metrics")]
    {
        let outcome = error.map_or("ok", Error::kind);
        metrics::counter!("hotpatch_reverts_total", "outcome" => outcome).increment(1);
        if error.is_none() {
            metrics::histogram!("hotpatch_revert_duration_seconds").record(took.as_secs_f64());
        }
        applied_now();
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (error, took);
}

/// A dry run (`check`) ended with `error`: counted if a check refused.
pub(crate) fn checked(error: Option<&Error>) {
    #[cfg(feature = "metrics")]
    if let Some(e) = error {
        refused("check", e);
    }
    #[cfg(not(feature = "metrics"))]
    let _ = error;
}

/// A watch window rolled its patch back; `reverted` is false if the
/// revert failed (the patch is still applied).
#[cfg_attr(not(feature = "control"), allow(dead_code))]
pub(crate) fn rolled_back(cause: &'static str, reverted: bool) {
    #[cfg(feature = "metrics")]
    {
        let outcome = if reverted { "ok" } else { "revert_failed" };
        metrics::counter!("hotpatch_rollbacks_total", "cause" => cause, "outcome" => outcome)
            .increment(1);
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (cause, reverted);
}

/// The record of the state directory holds `n` accepted patches.
#[cfg_attr(not(feature = "control"), allow(dead_code))]
pub(crate) fn accepted(n: usize) {
    #[cfg(feature = "metrics")]
    metrics::gauge!("hotpatch_patches_accepted").set(n as f64);
    #[cfg(not(feature = "metrics"))]
    let _ = n;
}

/// A transition completed: how long it took from its publication until
/// every registered thread (and request scope) had switched, and how many
/// it had to wait for. A direct swap (no registered thread) waited for
/// none and took no time.
pub(crate) fn transition(took: Duration, threads: usize, requests: usize) {
    #[cfg(feature = "metrics")]
    {
        metrics::histogram!("hotpatch_transition_duration_seconds").record(took.as_secs_f64());
        metrics::histogram!("hotpatch_transition_threads_waited").record(threads as f64);
        metrics::histogram!("hotpatch_transition_requests_waited").record(requests as f64);
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (took, threads, requests);
}

#[cfg(feature = "metrics")]
fn refused(op: &'static str, e: &Error) {
    if e.is_refusal() {
        metrics::counter!("hotpatch_refusals_total", "op" => op, "kind" => e.kind()).increment(1);
    }
}

#[cfg(feature = "metrics")]
fn applied_now() {
    // Off the call path: once per operation.
    let n = crate::registry::REGISTRY.lock().applied().len();
    metrics::gauge!("hotpatch_patches_applied").set(n as f64);
}
