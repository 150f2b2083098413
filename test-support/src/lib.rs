//! What the workspace's test harnesses that build fixtures share.
//!
//! Several test binaries (the integration tests' `tests/support`, the
//! `hotpatch` tool's tests, `cargo hotpatch`'s) build fixture crates
//! with a nested `cargo build` and load what they link: each did it its
//! own way. This crate is the one way: [`nested_build`] builds packages into `target/fixtures`
//! in the test binary's profile, without debug info (so every harness
//! that builds the same selection shares its artifacts), and [`set_mode`],
//! [`make_dir`] and [`temp_dir`] give files and directories the modes the
//! loader's trust policy accepts whatever the umask. Harnesses that write
//! a workspace of their own build it with [`outside_cargo`] (or
//! [`isolate`] any command from the outer build) and write its files with
//! [`write_if_changed`].
//!
//! Test code only: every function panics, saying what failed, rather
//! than return an error.
//!
//! ```no_run
//! let dir = hotpatch_test_support::nested_build(&["fixture-patch-basic"], &[]);
//! let rlib = dir.join("libfixture_patch_basic.rlib");
//! # let _ = rlib;
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The workspace's root directory (where its `Cargo.toml` is).
///
/// ```
/// assert!(hotpatch_test_support::workspace_root().join("Cargo.lock").exists());
/// ```
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("test-support lives in the workspace")
        .to_owned()
}

/// The cargo profile directory this test binary was built in: `debug` or
/// `release`.
///
/// ```
/// let p = hotpatch_test_support::profile();
/// assert!(p == "debug" || p == "release");
/// ```
pub fn profile() -> &'static str {
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }
}

/// The cargo that runs these tests (`$CARGO`), or `cargo`, in the
/// workspace root.
///
/// ```no_run
/// let status = hotpatch_test_support::cargo().arg("--version").status().unwrap();
/// assert!(status.success());
/// ```
pub fn cargo() -> Command {
    let mut cmd = cargo_program();
    cmd.current_dir(workspace_root());
    cmd
}

fn cargo_program() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// The cargo that runs these tests (`$CARGO`), or `cargo`, for a
/// workspace of the test's own making (not this one): [`isolate`]d from
/// the outer build. Its directory is the caller's to set.
///
/// ```no_run
/// let dir = hotpatch_test_support::temp_dir().join("ws");
/// let status = hotpatch_test_support::outside_cargo()
///     .args(["build", "--quiet"])
///     .current_dir(&dir)
///     .status()
///     .unwrap();
/// # let _ = status;
/// ```
pub fn outside_cargo() -> Command {
    let mut cmd = cargo_program();
    isolate(&mut cmd);
    cmd
}

/// Removes from `cmd`'s environment what the outer `cargo test` set that
/// a build of another workspace must not inherit: its flags
/// (`RUSTFLAGS`, `CARGO_ENCODED_RUSTFLAGS`) and its target directory
/// (`CARGO_TARGET_DIR`, `CARGO_BUILD_TARGET_DIR`). Set either again after
/// this call to choose one.
///
/// ```
/// let mut cmd = std::process::Command::new("true");
/// hotpatch_test_support::isolate(&mut cmd);
/// assert!(cmd.get_envs().any(|(k, v)| k == "RUSTFLAGS" && v.is_none()));
/// ```
pub fn isolate(cmd: &mut Command) -> &mut Command {
    cmd.env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET_DIR")
}

/// Writes `text` to `path` (creating its parent directories) unless the
/// file already holds exactly that: an unchanged file keeps its mtime, so
/// a cargo build of a fixture written again rebuilds nothing.
///
/// # Panics
///
/// If a directory cannot be created or the file written.
///
/// ```
/// let path = hotpatch_test_support::temp_dir().join("w/src/lib.rs");
/// hotpatch_test_support::write_if_changed(&path, "pub fn f() {}\n");
/// assert_eq!(std::fs::read_to_string(&path).unwrap(), "pub fn f() {}\n");
/// let mtime = || std::fs::metadata(&path).unwrap().modified().unwrap();
/// let before = mtime();
/// hotpatch_test_support::write_if_changed(&path, "pub fn f() {}\n");
/// assert_eq!(mtime(), before, "an unchanged file is not written again");
/// ```
pub fn write_if_changed(path: &Path, text: &str) {
    let parent = path.parent().expect("a file has a parent directory");
    std::fs::create_dir_all(parent).unwrap_or_else(|e| panic!("mkdir {}: {e}", parent.display()));
    if std::fs::read_to_string(path).ok().as_deref() != Some(text) {
        std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
}

/// Where [`nested_build`] builds: `target/fixtures`.
pub fn fixtures_target_dir() -> PathBuf {
    workspace_root().join("target").join("fixtures")
}

/// Builds `packages` (with the cargo arguments `extra`) by one nested
/// `cargo build` into [`fixtures_target_dir`], in this test binary's
/// profile and without debug info; returns the profile's output
/// directory.
///
/// # Panics
///
/// If cargo cannot be run or the build fails (cargo's output says why).
///
/// ```no_run
/// let dir = hotpatch_test_support::nested_build(&["fixture-control-svc"], &[]);
/// assert!(dir.join("control-svc").exists());
/// ```
pub fn nested_build(packages: &[&str], extra: &[&str]) -> PathBuf {
    let dir = fixtures_target_dir();
    let mut cmd = cargo();
    cmd.args(["build", "--quiet", "--target-dir"])
        .arg(&dir)
        .args(extra);
    for p in packages {
        cmd.args(["-p", p]);
    }
    let env = if cfg!(debug_assertions) {
        "DEV"
    } else {
        cmd.arg("--release");
        "RELEASE"
    };
    cmd.env(format!("CARGO_PROFILE_{env}_DEBUG"), "0");
    let status = cmd.status().expect("run cargo");
    assert!(status.success(), "building {packages:?} failed");
    dir.join(profile())
}

/// Sets `path`'s permission bits to `mode`, whatever the umask made them.
///
/// # Panics
///
/// If `chmod` fails.
///
/// ```no_run
/// hotpatch_test_support::set_mode(std::path::Path::new("/tmp/fix.so"), 0o644);
/// ```
pub fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

/// Creates directory `dir` (and its parents) if needed, with `mode`.
///
/// # Panics
///
/// If it cannot be created or its mode set.
///
/// ```
/// let dir = hotpatch_test_support::temp_dir().join("example");
/// hotpatch_test_support::make_dir(&dir, 0o755);
/// assert!(dir.is_dir());
/// ```
pub fn make_dir(dir: &Path, mode: u32) {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    set_mode(dir, mode);
}

static TEMP_DIR: OnceLock<PathBuf> = OnceLock::new();

/// A directory of this process's own for files the tests make, under
/// `std::env::temp_dir()` (`TMPDIR`): mode 0755 whatever the umask, and
/// removed when the process exits.
///
/// ```
/// let dir = hotpatch_test_support::temp_dir();
/// assert!(dir.is_dir());
/// ```
pub fn temp_dir() -> PathBuf {
    TEMP_DIR
        .get_or_init(|| {
            let dir = std::env::temp_dir().join(format!("hotpatch-tests-{}", std::process::id()));
            make_dir(&dir, 0o755);
            extern "C" fn remove_temp_dir() {
                if let Some(dir) = TEMP_DIR.get() {
                    let _ = std::fs::remove_dir_all(dir);
                }
            }
            // SAFETY: `remove_temp_dir` is a plain function that does not
            // unwind (it ignores the only error it can meet); it runs at
            // exit, after the tests, when nothing else uses the directory.
            let registered = unsafe { libc::atexit(remove_temp_dir) };
            assert_eq!(registered, 0, "atexit");
            dir
        })
        .clone()
}

/// Links into `out` the thin patch of dev-dependency `krate` (its
/// underscored crate name) for this test binary: of the rlibs cargo left
/// next to the binary for it (one per feature set it was built with), the
/// newest whose every symbol this binary exports, linked by
/// `cargo_hotpatch::link` as `cargo hotpatch build` does. Mode 0644.
///
/// # Errors
///
/// What linking each build said, newest first, if none binds (or none
/// was found: an empty list).
///
/// ```no_run
/// let so = hotpatch_test_support::temp_dir().join("tokio_fix.so");
/// hotpatch_test_support::link_dev_dependency("tokio_fix", &so).unwrap();
/// ```
#[cfg(feature = "link")]
pub fn link_dev_dependency(krate: &str, out: &Path) -> Result<(), Vec<cargo_hotpatch::Error>> {
    let exe = std::env::current_exe().expect("current_exe");
    let rlibs = cargo_hotpatch::dev_dependency_rlibs(krate)
        .unwrap_or_else(|e| panic!("looking for {krate}'s rlibs: {e}"));
    let mut refused = Vec::new();
    for rlib in &rlibs {
        match cargo_hotpatch::link(rlib, &exe, out) {
            Ok(_) => {
                set_mode(out, 0o644);
                return Ok(());
            }
            Err(e) => refused.push(e),
        }
    }
    Err(refused)
}
