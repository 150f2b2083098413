//! Builds the fixture patch crates once per test process.
//!
//! Patches are built by a nested `cargo build` into their own target
//! directory (`target/fixtures`), so the outer cargo's lock on `target/`
//! is never contended. The profile matches the test binary's, so the
//! panic strategy and compiler match the host's.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn target_dir() -> PathBuf {
    root().join("target").join("fixtures")
}

/// The shared object of fixture patch crate `package` (e.g.
/// `fixture-patch-basic`), built with `features` (e.g. `fixture-svc/v2`).
pub fn patch(package: &str) -> PathBuf {
    patch_with(package, &[])
}

pub fn patch_with(package: &str, features: &[&str]) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let key = format!("{package}|{}", features.join(","));
    let built = BUILT.get_or_init(Default::default);
    let mut built = built.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = built.get(&key) {
        return p.clone();
    }
    // Each feature set gets its own target dir so a build with features
    // never overwrites the plain build's artifact.
    let dir = if features.is_empty() {
        target_dir()
    } else {
        target_dir().join(format!("features-{}", features.join("-").replace('/', "_")))
    };
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root())
        .args(["build", "--quiet", "-p", package, "--target-dir"])
        .arg(&dir);
    if !cfg!(debug_assertions) {
        cmd.arg("--release");
    }
    if !features.is_empty() {
        cmd.arg("--features").arg(features.join(","));
    }
    // The outer build's flags must not leak into this one differently
    // from the host's; RUSTFLAGS is shared by both.
    let status = cmd.status().expect("run cargo");
    assert!(status.success(), "building fixture {package} failed");
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let file = format!("lib{}.so", package.replace('-', "_"));
    let path = dir.join(profile).join(file);
    assert!(path.exists(), "{} not built", path.display());
    built.insert(key, path.clone());
    path
}

/// A private copy of `src` under a fresh temporary name.
pub fn copy_to_temp(src: &Path, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hotpatch-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let dst = dir.join(name);
    std::fs::copy(src, &dst).unwrap();
    dst
}
