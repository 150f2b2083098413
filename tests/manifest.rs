//! `hotpatch::manifest!(name = ..., version = ...)` overrides the package
//! metadata a patch reports; a field it does not name keeps the package's.

mod support;

#[test]
fn name_and_version_overrides() {
    let _serial = support::serial();
    let so = support::patch("fixture-patch-manifest-overrides");
    let patch = hotpatch::load(&so).unwrap();
    assert_eq!(
        (patch.name(), patch.version(), patch.description()),
        (
            "pricing-fix",
            "7.4.1-hotfix.2",
            "the description comes from Cargo.toml"
        )
    );
    assert_eq!(svc::answer(), 24, "the replacement runs");
    let listed = hotpatch::applied();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (
            &*listed[0].name,
            &*listed[0].version,
            &*listed[0].description
        ),
        (
            "pricing-fix",
            "7.4.1-hotfix.2",
            "the description comes from Cargo.toml"
        )
    );
    patch.revert().unwrap();
    assert_eq!(svc::answer(), 1);
}
