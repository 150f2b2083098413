//! Fault injection: a failure at any step of load, replace and revert
//! leaves everything exactly as it was, and the same call succeeds once
//! the fault is gone.
//!
//! hotpatch's `failpoints` feature (enabled for these tests) puts a `fail`
//! crate failpoint at each step; configured to `return`, it makes the
//! step fail with `Error::Injected`. Failpoints are process-wide, so the
//! tests of this file take turns (`support::serial`).
//!
//! Each case runs with a good patch applied underneath (`stack-a`, plus
//! `replace-v1` for replace and revert), and compares full snapshots: the
//! registry's functions and applied patches, what every patched function
//! returns, and that no transition is left in progress.

mod support;

use std::path::{Path, PathBuf};

use fail::FailGuard;
use hotpatch::{Error, Loader};

/// Every step of a load (and of a replace, which loads), in order.
const LOAD_POINTS: [&str; 9] = [
    "load::open",
    "load::trust",
    "load::read",
    "load::copy",
    "load::dlopen",
    "load::manifest",
    "load::validate",
    "load::resolve",
    "load::apply",
];

const STACK_A: &str = "fixture-patch-stack-a";
const V1: &str = "fixture-patch-replace-v1";
const V2: &str = "fixture-patch-replace-v2";

#[derive(Debug, PartialEq)]
struct Full {
    registry_and_calls: support::Snapshot,
    steps: (u64, u64, u64, u64),
    in_transition: bool,
}

fn full() -> Full {
    Full {
        registry_and_calls: support::snapshot(),
        steps: (svc::step_a(5), svc::step_b(5), svc::step_c(), svc::step_d()),
        in_transition: hotpatch::transition().is_some(),
    }
}

/// A copy of `package`'s library with `tag` appended (past the loadable
/// segments, so it loads the same): bytes no library of this process has
/// yet. A load of bytes already opened reuses that library and skips the
/// copy and `dlopen` steps; with fresh bytes every step runs.
fn fresh(package: &str, tag: &str) -> PathBuf {
    let mut bytes = std::fs::read(support::patch(package)).unwrap();
    bytes.extend_from_slice(format!("\0hotpatch faults: {tag}\0").as_bytes());
    let name = format!("{package}-{}.so", tag.replace("::", "-"));
    support::write_temp(&name, &bytes)
}

fn inject(point: &str) -> FailGuard {
    FailGuard::new(point, "return").unwrap()
}

fn assert_injected(result: Result<impl std::fmt::Debug, Error>, point: &str, file: &Path) {
    match result {
        Err(Error::Injected { point: p, path }) => {
            assert_eq!(p, point);
            assert_eq!(path, file, "at {point}");
        }
        other => panic!("expected a fault injected at {point}, got {other:?}"),
    }
}

#[test]
fn a_fault_at_any_step_of_load_changes_nothing() {
    let _serial = support::serial();
    let stack_a = hotpatch::load(support::patch(STACK_A)).unwrap();
    let before = full();

    for point in LOAD_POINTS {
        let so = fresh(V1, &format!("load {point}"));
        let fault = inject(point);
        assert_injected(hotpatch::load(&so), point, &so);
        assert_eq!(full(), before, "a fault at {point} changed something");

        drop(fault);
        let patch = hotpatch::load(&so).unwrap_or_else(|e| panic!("after {point}: {e}"));
        assert_eq!(full().steps, (12, 988, 11, 1), "after {point}");
        patch.revert().unwrap();
        assert_eq!(full(), before, "after {point}");
    }
    stack_a.revert().unwrap();
}

#[test]
fn a_fault_at_any_step_of_replace_changes_nothing() {
    let _serial = support::serial();
    let stack_a = hotpatch::load(support::patch(STACK_A)).unwrap();

    for point in LOAD_POINTS {
        let v1 = hotpatch::load(support::patch(V1)).unwrap();
        let before = full();
        assert_eq!(before.steps, (12, 988, 11, 1));
        let so = fresh(V2, &format!("replace {point}"));
        let fault = inject(point);
        assert_injected(Loader::new().replace(v1.id(), &so), point, &so);
        assert_eq!(full(), before, "a fault at {point} changed something");

        drop(fault);
        let v2 = Loader::new()
            .replace(v1.id(), &so)
            .unwrap_or_else(|e| panic!("after {point}: {e}"));
        assert_eq!(full().steps, (18, 982, 1, 22), "after {point}");
        assert_eq!(
            hotpatch::applied(),
            [stack_a.info().clone(), v2.info().clone()]
        );
        v2.revert().unwrap();
    }
    stack_a.revert().unwrap();
}

#[test]
fn a_fault_in_revert_changes_nothing() {
    let _serial = support::serial();
    let stack_a = hotpatch::load(support::patch(STACK_A)).unwrap();
    let v1_so = support::patch(V1);
    let v1 = hotpatch::load(&v1_so).unwrap();
    let before = full();

    let fault = inject("revert::apply");
    assert_injected(hotpatch::revert(v1.id()), "revert::apply", &v1_so);
    assert_eq!(full(), before);
    // The same through a `Loader`.
    assert_injected(Loader::new().revert_id(v1.id()), "revert::apply", &v1_so);
    assert_eq!(full(), before);

    drop(fault);
    v1.revert().unwrap();
    assert_eq!(full().steps, (5, 995, 1, 1));
    stack_a.revert().unwrap();
}

/// The slot table's pages cannot be made writable (`mprotect` fails, as
/// at the process's limit of mappings; injected as `ENOMEM`): apply,
/// replace and revert fail with `Error::SlotTable`, which says nothing
/// changed, and nothing did.
#[test]
fn a_slot_table_that_cannot_be_made_writable_changes_nothing() {
    let _serial = support::serial();
    let stack_a = hotpatch::load(support::patch(STACK_A)).unwrap();
    let v1 = hotpatch::load(support::patch(V1)).unwrap();
    let before = full();
    let fault = inject("switch::slot_table");
    let expect = |result: Result<(), Error>, what: &str| match result {
        Err(e @ Error::SlotTable { .. }) => {
            assert!(
                e.to_string()
                    .contains("cannot make the slot table writable, so nothing changed"),
                "{what}: {e}"
            );
            let Error::SlotTable { source, .. } = e else {
                unreachable!()
            };
            assert_eq!(source.raw_os_error(), Some(libc::ENOMEM), "{what}");
        }
        other => panic!("{what}: expected Error::SlotTable, got {other:?}"),
    };
    expect(
        hotpatch::load(support::patch(V2)).map(drop),
        "apply of another patch",
    );
    assert_eq!(full(), before, "a failed apply changed something");
    expect(
        Loader::new().replace(v1.id(), support::patch(V2)).map(drop),
        "replace",
    );
    assert_eq!(full(), before, "a failed replace changed something");
    expect(hotpatch::revert(v1.id()), "revert");
    assert_eq!(full(), before, "a failed revert changed something");

    drop(fault);
    v1.revert().unwrap();
    assert_eq!(full().steps, (5, 995, 1, 1));
    stack_a.revert().unwrap();
}

/// A load that fails after its library was opened (here: at validation)
/// leaves that library mapped and reusable: the same bytes load later
/// without opening them again, so the copy and `dlopen` steps do not run.
#[test]
fn a_library_opened_by_a_failed_load_is_reused() {
    let _serial = support::serial();
    let so = fresh(V1, "reuse");
    {
        let _fault = inject("load::validate");
        assert_injected(hotpatch::load(&so), "load::validate", &so);
    }
    let before = full();
    let _copy = inject("load::copy");
    let _dlopen = inject("load::dlopen");
    let patch = hotpatch::load(&so).unwrap();
    assert_eq!(full().steps, (12, 988, 11, 1));
    patch.revert().unwrap();
    assert_eq!(full(), before);
}

/// A failure after some functions of a patch were already resolved and
/// checked (the heart of all-or-nothing): `load::resolve` fires once per
/// function, so on its second and third hit in a three-function patch
/// the first function, or the first two, have passed. Nothing changes.
#[test]
fn a_fault_after_some_functions_resolved_changes_nothing() {
    let _serial = support::serial();
    let stack_a = hotpatch::load(support::patch(STACK_A)).unwrap();
    let before = full();

    // The premise: one hit per function, so three in all. With the fault
    // armed from the fourth hit on, the load succeeds.
    {
        let so = fresh(V1, "resolve hits");
        let _fault = FailGuard::new("load::resolve", "3*off->return").unwrap();
        let patch = hotpatch::load(&so).expect("three functions, three hits");
        assert_eq!(patch.functions().len(), 3, "{:?}", patch.functions());
        patch.revert().unwrap();
    }
    assert_eq!(full(), before);

    for (passed, actions) in [(1, "1*off->1*return->off"), (2, "2*off->1*return->off")] {
        let so = fresh(V1, &format!("resolve after {passed}"));
        let fault = FailGuard::new("load::resolve", actions).unwrap();
        assert_injected(hotpatch::load(&so), "load::resolve", &so);
        assert_eq!(
            full(),
            before,
            "a fault after {passed} resolved functions changed something"
        );
        drop(fault);
        let patch = hotpatch::load(&so).unwrap_or_else(|e| panic!("after {passed}: {e}"));
        assert_eq!(full().steps, (12, 988, 11, 1), "after {passed}");
        patch.revert().unwrap();
        assert_eq!(full(), before, "after {passed}");
    }
    stack_a.revert().unwrap();
}
