//! Shared by the example's tests: the fix as a thin patch for the running
//! test binary.

use std::path::PathBuf;

/// The fix as a thin patch for this test binary: `tokio-fix`'s rlib from
/// this binary's own build (a dev-dependency: the one, of those cargo
/// left, whose symbols this binary exports), linked by
/// `cargo_hotpatch::link`, as `cargo hotpatch build` does. It is mode 0644
/// in the process's own 0755 temporary directory, which the default trust
/// policy accepts whatever the umask.
pub fn thin_fix() -> PathBuf {
    let so = hotpatch_test_support::temp_dir().join("tokio_fix.so");
    if let Err(refused) = hotpatch_test_support::link_dev_dependency("tokio_fix", &so) {
        let refused: Vec<String> = refused.iter().map(ToString::to_string).collect();
        panic!("no build of tokio-fix binds to this binary: {refused:?}");
    }
    so
}
