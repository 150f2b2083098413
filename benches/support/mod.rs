//! Builds what the benches load: patch cdylibs and plain libraries of the
//! root workspace (`benches/fixtures/*`), and the generated crates of the
//! bench-only workspace `benches/gen` (thousands of functions, kept out of
//! `cargo test` and `cargo clippy`).
//!
//! Every build is a nested `cargo build --release` into its own target
//! directory under `target/`, so the outer cargo's lock on `target/` is
//! never contended and nothing is built by hand. Patches are built in
//! release whatever the bench's profile: a patch must come from the same
//! rustc, target and panic strategy as the host, not the same profile.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn cargo_build(manifest: &Path, target_dir: &Path, packages: &[&str]) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root())
        .args(["build", "--quiet", "--release", "--manifest-path"])
        .arg(manifest)
        .arg("--target-dir")
        .arg(target_dir);
    for p in packages {
        cmd.args(["-p", p]);
    }
    let status = cmd.status().expect("run cargo");
    assert!(status.success(), "building {packages:?} failed");
}

/// Builds `packages` of the root workspace; returns their release dir.
pub fn build_fixtures(packages: &[&str]) -> PathBuf {
    let dir = root().join("target").join("bench-fixtures");
    cargo_build(&root().join("Cargo.toml"), &dir, packages);
    dir.join("release")
}

/// The manifest of the generated workspace.
pub fn gen_manifest() -> PathBuf {
    root().join("benches").join("gen").join("Cargo.toml")
}

/// Builds `packages` of the generated workspace `benches/gen`; returns
/// their release dir.
pub fn build_gen(packages: &[&str]) -> PathBuf {
    let dir = root().join("target").join("bench-gen");
    cargo_build(&gen_manifest(), &dir, packages);
    dir.join("release")
}

/// The shared object of cdylib `package` in `dir`.
pub fn so(dir: &Path, package: &str) -> PathBuf {
    let path = dir.join(format!("lib{}.so", package.replace('-', "_")));
    assert!(path.exists(), "{} not built", path.display());
    path
}
