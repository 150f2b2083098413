//! `hotpatch::manifest!(init = f)`: `f` runs on every load, after the
//! checks and before anything is applied; an `Err` or a panic there
//! refuses the load with `Error::InitFailed`, nothing applied.
//!
//! `fixture-patch-init`'s init counts its runs in the host's shared
//! `INIT_RUNS`, stores what the host's live `init_probe()` returns while
//! it runs in `INIT_SAW` (0 before the patch is applied, 1 after), then
//! does what the host's `INIT_MODE` says: 0 succeed, 1 `Err("database
//! unreachable")`, 2 panic with a `String`, 3 with a `&'static str`.

mod support;

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use hotpatch::{Error, Loader};
use svc::{INIT_MODE, INIT_RUNS, INIT_SAW, init_probe};

const INIT: &str = "fixture-patch-init";

fn runs() -> u64 {
    INIT_RUNS.load(Ordering::SeqCst)
}

/// Everything a caller sees, including the function the patch replaces.
fn snapshot() -> (support::Snapshot, u64) {
    (support::snapshot(), init_probe())
}

/// Sets `INIT_MODE` for the test's duration.
struct Mode;

impl Mode {
    fn set(mode: u64) -> Mode {
        INIT_MODE.store(mode, Ordering::SeqCst);
        Mode
    }
}

impl Drop for Mode {
    fn drop(&mut self) {
        INIT_MODE.store(0, Ordering::SeqCst);
    }
}

/// Loads the init patch expecting a refusal with stack-a applied
/// underneath; checks nothing changed and the init ran once; returns the
/// reason.
fn refused(so: &PathBuf) -> String {
    let good = hotpatch::load(support::patch("fixture-patch-stack-a")).unwrap();
    let before = snapshot();
    let n = runs();
    let err = hotpatch::load(so).expect_err("init must refuse the load");
    assert_eq!(runs(), n + 1, "the init ran");
    assert_eq!(snapshot(), before, "nothing applied");
    assert_eq!(init_probe(), 0);
    let message = err.to_string();
    let reason = match err {
        Error::InitFailed { path, reason } => {
            assert_eq!(&path, so);
            reason
        }
        other => panic!("expected InitFailed, got {other:?}"),
    };
    assert!(
        message.contains(&reason) && message.contains(&so.display().to_string()),
        "{message}"
    );
    good.revert().unwrap();
    reason
}

#[test]
fn init_runs_before_apply_and_on_every_load() {
    let _serial = support::serial();
    let so = support::patch(INIT);
    let _mode = Mode::set(0);
    let n = runs();
    INIT_SAW.store(u64::MAX, Ordering::SeqCst);

    let patch = hotpatch::load(&so).unwrap();
    assert_eq!(runs(), n + 1);
    assert_eq!(
        INIT_SAW.load(Ordering::SeqCst),
        0,
        "the init saw the original init_probe: it ran before the patch was applied"
    );
    assert_eq!(init_probe(), 1, "applied after");
    assert_eq!(patch.description(), "init hook");
    patch.revert().unwrap();
    assert_eq!(init_probe(), 0);
    assert_eq!(runs(), n + 1, "not on revert");

    // The same library again (already mapped, reused): the init runs again.
    INIT_SAW.store(u64::MAX, Ordering::SeqCst);
    let patch = hotpatch::load(&so).unwrap();
    assert_eq!(runs(), n + 2);
    assert_eq!(INIT_SAW.load(Ordering::SeqCst), 0);
    assert_eq!(init_probe(), 1);

    // A refused load of a library that is applied does not run it.
    let err = hotpatch::load(&so).expect_err("already applied");
    assert!(matches!(err, Error::AlreadyApplied { .. }), "{err:?}");
    assert_eq!(runs(), n + 2);
    patch.revert().unwrap();
}

#[test]
fn an_init_error_refuses_the_load() {
    let _serial = support::serial();
    let so = support::patch(INIT);
    let mode = Mode::set(1);
    let reason = refused(&so);
    assert!(reason.contains("database unreachable"), "{reason}");

    // Fixed: the same file loads.
    drop(mode);
    let patch = hotpatch::load(&so).unwrap();
    assert_eq!(init_probe(), 1);
    patch.revert().unwrap();
}

#[test]
fn an_init_panic_refuses_the_load() {
    let _serial = support::serial();
    let so = support::patch(INIT);
    {
        let _mode = Mode::set(2);
        let reason = refused(&so);
        let run = runs();
        assert!(
            reason.contains(&format!("init exploded on run {run}")),
            "the String payload: {reason}"
        );
    }
    {
        let _mode = Mode::set(3);
        let reason = refused(&so);
        assert!(
            reason.contains("init exploded"),
            "the &str payload: {reason}"
        );
    }

    // The process is fine, and the same file loads once the init succeeds.
    assert_eq!(svc::add(2, 3), 5);
    let patch = hotpatch::load(&so).unwrap();
    assert_eq!(init_probe(), 1);
    patch.revert().unwrap();
}

/// A replace whose new patch's init fails leaves the old patch applied.
#[test]
fn a_replace_whose_init_fails_keeps_the_old_patch() {
    let _serial = support::serial();
    let so = support::patch(INIT);
    let v1 = hotpatch::load(support::patch("fixture-patch-replace-v1")).unwrap();
    let before = (snapshot(), svc::step_c());
    assert_eq!(before.1, 11);

    let _mode = Mode::set(1);
    let err = Loader::new()
        .replace(v1.id(), &so)
        .expect_err("init must refuse the replace");
    assert!(
        matches!(&err, Error::InitFailed { reason, .. } if reason.contains("database unreachable")),
        "{err:?}"
    );
    assert_eq!((snapshot(), svc::step_c()), before);
    assert_eq!(hotpatch::applied(), [v1.info().clone()]);
    v1.revert().unwrap();
}
