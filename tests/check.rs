//! `Loader::check`: every check of `load`, nothing applied, and a report
//! of what applying would change.

mod support;

use std::sync::atomic::Ordering;

use hotpatch::{Implementation, Loader};

/// Checking a good patch reports it and changes nothing; applying it
/// afterwards does what the report said.
#[test]
fn a_good_patch_passes_and_nothing_changes() {
    let _serial = support::serial();
    let so = support::patch("fixture-patch-basic");
    let before = support::snapshot();

    let report = Loader::new().check(&so).unwrap();
    assert_eq!(report.name, "fixture-patch-basic");
    assert_eq!(report.version, "1.2.3");
    assert_eq!(report.description, "answer() returns 2");
    assert_eq!(report.file, so);
    assert!(!report.has_init);
    let mut functions: Vec<&str> = report.changes.iter().map(|c| c.function.as_str()).collect();
    functions.sort_unstable();
    assert_eq!(
        functions,
        [
            "<svc::Cart as Priced>::price",
            "svc::Cart::get",
            "svc::Cart::total",
            "svc::answer",
            "svc::checked_div",
        ]
    );
    assert!(
        report
            .changes
            .iter()
            .all(|c| c.now == Implementation::Original)
    );
    assert_eq!(support::snapshot(), before, "a check changes nothing");
    // Twice: the library opened by the first check is reused, still nothing.
    assert_eq!(Loader::new().check(&so).unwrap(), report);
    assert_eq!(support::snapshot(), before);

    let patch = hotpatch::load(&so).unwrap();
    assert_eq!(
        patch.functions(),
        report
            .changes
            .iter()
            .map(|c| c.function.clone())
            .collect::<Vec<_>>()
    );
    assert_eq!(svc::answer(), 2);

    // Over an applied patch: the report names what implements it now.
    let over = Loader::new()
        .check(support::patch("fixture-patch-stack-a"))
        .unwrap();
    let answer = over
        .changes
        .iter()
        .find(|c| c.function == "svc::answer")
        .unwrap();
    assert_eq!(
        answer.now,
        Implementation::Patch {
            id: patch.id(),
            name: "fixture-patch-basic".into()
        }
    );
    // The same bytes again: already applied, as `load` says.
    let err = Loader::new().check(&so).unwrap_err();
    assert!(
        matches!(err, hotpatch::Error::AlreadyApplied { id, .. } if id == patch.id()),
        "{err}"
    );
    patch.revert().unwrap();
    assert_eq!(support::snapshot(), before);
}

/// A check does not run the patch's `init` (a load would).
#[test]
fn init_is_reported_not_run() {
    let _serial = support::serial();
    let so = support::patch("fixture-patch-init");
    let runs = svc::INIT_RUNS.load(Ordering::SeqCst);
    let report = Loader::new().check(&so).unwrap();
    assert!(report.has_init);
    assert_eq!(
        svc::INIT_RUNS.load(Ordering::SeqCst),
        runs,
        "init did not run"
    );
    assert_eq!(svc::init_probe(), 0);
}

/// Every refusal of `load` is a refusal of `check`, with the same error,
/// and neither changes anything.
#[test]
fn check_refuses_what_load_refuses() {
    let _serial = support::serial();
    let cases = [
        support::patch("fixture-patch-bad-rustc"),
        support::patch("fixture-patch-bad-abi"),
        support::patch("fixture-patch-bad-magic"),
        support::patch("fixture-patch-bad-target"),
        support::patch("fixture-patch-bad-panic"),
        support::patch("fixture-patch-no-manifest"),
        support::patch("fixture-patch-empty"),
        support::patch("fixture-patch-duplicate"),
        support::patch("fixture-patch-foreign-alloc"),
        support::patch_with("fixture-patch-v2-signature", &["v2"]),
        support::patch_with("fixture-patch-v2-layout", &["v2"]),
        support::patch_with("fixture-patch-v2-unknown", &["v2"]),
        support::write_temp("check-not-elf.so", b"not a shared object"),
        support::temp_dir().join("check-missing.so"),
    ];
    for so in &cases {
        let before = support::snapshot();
        let checked = Loader::new()
            .check(so)
            .expect_err(&format!("{} passes check", so.display()));
        assert_eq!(support::snapshot(), before, "{}", so.display());
        let loaded = support::refused(so);
        assert_eq!(
            support::chain(&checked),
            support::chain(&loaded),
            "check and load refuse {} alike",
            so.display()
        );
    }
}
