//! A manifest's string fields may be empty: a patch crate without a
//! `description` (the common case: `cargo new --lib` has none), or one
//! whose `hotpatch::manifest!(...)` sets a name or version to `""`. An
//! empty `&str` has a dangling, non-null pointer; nothing is read through
//! it, so it must load like any other.
//!
//! Each fixture crate's Cargo.toml has only name, version, edition,
//! crate-type and dependencies.

mod support;

/// Loads `package`, checks what it reports and that its replacement of
/// `svc::answer` runs, reverts it.
fn loads(package: &str, answer: u64, name: &str, version: &str, description: &str) {
    let _serial = support::serial();
    assert_eq!(svc::answer(), 1);
    let so = support::patch(package);
    let patch = hotpatch::load(&so).unwrap_or_else(|e| panic!("{package} refused: {e}"));
    assert_eq!(
        (patch.name(), patch.version(), patch.description()),
        (name, version, description)
    );
    assert_eq!(patch.functions(), ["svc::answer"]);
    assert_eq!(svc::answer(), answer, "the replacement runs");
    let listed = hotpatch::applied();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (
            &*listed[0].name,
            &*listed[0].version,
            &*listed[0].description
        ),
        (name, version, description)
    );
    patch.revert().unwrap();
    assert_eq!(svc::answer(), 1);
}

#[test]
fn no_description_loads() {
    loads(
        "fixture-patch-no-metadata",
        21,
        "fixture-patch-no-metadata",
        "0.1.0",
        "",
    );
}

#[test]
fn empty_name_loads() {
    loads(
        "fixture-patch-empty-name",
        22,
        "",
        "0.1.0",
        "the name is empty",
    );
}

#[test]
fn empty_version_loads() {
    loads(
        "fixture-patch-empty-version",
        23,
        "fixture-patch-empty-version",
        "",
        "the version is empty",
    );
}
