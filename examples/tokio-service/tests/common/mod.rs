//! Shared by the example's tests: the fix as a thin patch for the running
//! test binary.

use std::path::PathBuf;

/// The fix as a thin patch for this test binary: `tokio-fix`'s rlib from
/// this binary's own build (a dev-dependency: the one, of those cargo
/// left, whose symbols this binary exports), linked by
/// `cargo_hotpatch::link`, as `cargo hotpatch build` does. It is mode 0644 in a new 0700 directory of the temporary
/// directory, which the default trust policy accepts whatever the umask.
pub fn thin_fix() -> PathBuf {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let exe = std::env::current_exe().unwrap();
    let dir = std::env::temp_dir().join(format!("hotpatch-tokio-fix-{}", std::process::id()));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .unwrap();
    let so = dir.join("tokio_fix.so");
    let rlibs = cargo_hotpatch::dev_dependency_rlibs("tokio_fix").unwrap();
    assert!(
        !rlibs.is_empty(),
        "no libtokio_fix-*.rlib next to this binary"
    );
    let mut refused = Vec::new();
    for rlib in &rlibs {
        match cargo_hotpatch::link(rlib, &exe, &so) {
            Ok(_) => {
                refused.clear();
                break;
            }
            Err(e) => refused.push(e.to_string()),
        }
    }
    assert!(
        refused.is_empty(),
        "no build of tokio-fix binds to this binary: {refused:?}"
    );
    std::fs::set_permissions(&so, std::fs::Permissions::from_mode(0o644)).unwrap();
    so
}
