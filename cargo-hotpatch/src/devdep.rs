//! Patch crates compiled with a test or bench binary.

use std::path::PathBuf;

/// The rlibs cargo built for crate `krate` (its name with `_`) next to the
/// running binary, in its `deps` directory, newest first.
///
/// In a test or bench binary, a patch crate that is a dev-dependency was
/// compiled by the same cargo invocation, so with the binary's features
/// and symbol names: [`link`](crate::link) one of these against
/// [`std::env::current_exe`] to get a thin patch for the running test.
/// cargo keeps one rlib per feature set the crate was ever built with;
/// the right one is the one whose symbols the binary exports, so try them
/// in this order.
///
/// # Errors
///
/// The running binary's path or its directory cannot be read.
///
/// # Examples
///
/// ```no_run
/// let exe = std::env::current_exe().unwrap();
/// let out = std::env::temp_dir().join("fix.so");
/// let linked = cargo_hotpatch::dev_dependency_rlibs("pricing_fix")
///     .unwrap()
///     .iter()
///     .any(|rlib| cargo_hotpatch::link(rlib, &exe, &out).is_ok());
/// assert!(linked);
/// ```
pub fn dev_dependency_rlibs(krate: &str) -> std::io::Result<Vec<PathBuf>> {
    let exe = std::env::current_exe()?;
    let deps = exe
        .parent()
        .ok_or_else(|| std::io::Error::other("the running binary has no directory"))?;
    let prefix = format!("lib{krate}-");
    let mut rlibs = Vec::new();
    for entry in std::fs::read_dir(deps)? {
        let path = entry?.path();
        let named = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".rlib"));
        if named && let Ok(modified) = path.metadata().and_then(|m| m.modified()) {
            rlibs.push((modified, path));
        }
    }
    rlibs.sort_by_key(|(modified, _)| std::cmp::Reverse(*modified));
    Ok(rlibs.into_iter().map(|(_, path)| path).collect())
}
