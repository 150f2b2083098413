//! Builds what the benches load: thin patches and plain libraries of the
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

/// The shared object of plain cdylib `package` (not a patch) in `dir`.
pub fn so(dir: &Path, package: &str) -> PathBuf {
    let path = dir.join(format!("lib{}.so", package.replace('-', "_")));
    assert!(path.exists(), "{} not built", path.display());
    path
}

/// The thin patch of patch crate `package` (an rlib), linked
/// (`cargo_hotpatch::link`) against its host: a generated `gen-patch-N-M`
/// (built into `dir`) against `gen-host-N`, built in the same cargo
/// invocation; `bench-patch` against this bench binary, from the rlib
/// cargo compiled with it (a dev-dependency of the root package, so with
/// this binary's features and symbol names).
pub fn patch(dir: &Path, package: &str) -> PathBuf {
    let krate = package.replace('-', "_");
    let out_dir = dir.join("thin");
    std::fs::create_dir_all(&out_dir).unwrap();
    let out = out_dir.join(format!("lib{krate}.so"));
    if let Some(rest) = package.strip_prefix("gen-patch-") {
        let n = rest.split('-').next().unwrap();
        let host = dir.join(format!("gen-host-{n}"));
        let rlib = dir.join(format!("lib{krate}.rlib"));
        cargo_hotpatch::link(&rlib, &host, &out)
            .unwrap_or_else(|e| panic!("linking {package}: {e}"));
        return out;
    }
    let exe = std::env::current_exe().unwrap();
    for rlib in cargo_hotpatch::dev_dependency_rlibs(&krate).unwrap() {
        if cargo_hotpatch::link(&rlib, &exe, &out).is_ok() {
            return out;
        }
    }
    panic!("no build of {package} next to this binary binds to it")
}

/// A `gen-host-N serve` process (see `benches/gen/src/host.rs`).
pub struct Host {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl Host {
    pub fn spawn(bin: &Path) -> Host {
        use std::process::Stdio;
        let mut child = Command::new(bin)
            .arg("serve")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        let stdin = child.stdin.take();
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        Host {
            child,
            stdin,
            stdout,
        }
    }

    /// Sends one command; returns the numbers of the answer.
    pub fn ask(&mut self, command: &str) -> Vec<u64> {
        use std::io::{BufRead, Write};
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{command}").unwrap();
        stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert!(!line.is_empty(), "host died on {command:?}");
        line.split_whitespace()
            .map(|w| w.parse().unwrap())
            .collect()
    }

    /// The `i`th number of the answer to `command`, as a duration.
    pub fn time(&mut self, command: &str, i: usize) -> std::time::Duration {
        std::time::Duration::from_nanos(self.ask(command)[i])
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // Closing stdin ends the serve loop.
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

/// Where the benches that measure outside criterion write their results.
pub fn results_dir() -> PathBuf {
    let dir = root().join("target").join("hotpatch-bench");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The median of `v` (sorted in place).
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Whether this run is `cargo bench` (which passes `--bench`), not
/// `cargo test --benches`, where the heavy generated crates are not worth
/// building for one iteration.
pub fn benching() -> bool {
    let yes = std::env::args().any(|a| a == "--bench");
    if !yes {
        eprintln!("skipped: builds the generated crates; run with `cargo bench`");
    }
    yes
}
