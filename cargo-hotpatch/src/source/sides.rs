//! Step 6: the base and the head built as deployed (the same toolchain,
//! `Cargo.lock` with `--locked`, profile, features and remapped paths),
//! each in its own target directory under `target/hotpatch/`.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::SourceOptions;
use super::checkout::Trees;
use super::git::Revisions;
use super::workspace::Workspace;
use super::wrapper;
use crate::error::io;
use crate::metadata::cargo_failed;
use crate::{BuildError, Refusal};

/// What one build made.
pub(super) struct Artifacts {
    pub rlib: PathBuf,
    pub bins: Vec<PathBuf>,
    /// The rlib of the `hotpatch` crate (for the manifest).
    pub hotpatch_rlib: Option<PathBuf>,
}

/// Builds the base, then the head. `notes` gets a line per side built
/// with the workspace's `Cargo.lock`.
pub(super) fn build_both(
    ws: &Workspace,
    opts: &SourceOptions,
    revs: &Revisions,
    trees: &Trees,
    progress: &mut dyn FnMut(&str),
    notes: &mut Vec<String>,
) -> Result<(Artifacts, Artifacts), BuildError> {
    // A revision without a committed Cargo.lock builds with the
    // workspace's (the deployed build's lock is checked by --binary).
    // Decided by the commit, not the checkout, which keeps the copy of an
    // earlier run: every run says so, and uses the workspace's lock as it
    // is now.
    let sides = [
        Some((&trees.base, revs.base_commit.as_str(), &revs.base_name)),
        revs.head_commit
            .as_deref()
            .map(|c| (&trees.head, c, &revs.head_name)),
    ];
    for (dir, commit, name) in sides.into_iter().flatten() {
        let ours = ws.root.join("Cargo.lock");
        if !revs.in_commit(commit, "Cargo.lock") && ours.exists() {
            let lock = dir.join("Cargo.lock");
            std::fs::copy(&ours, &lock).map_err(io(lock.display()))?;
            notes.push(format!(
                "{name} has no committed Cargo.lock: built with the workspace's (commit Cargo.lock so that the base is the deployed build)"
            ));
        }
    }
    let hot = ws.target_dir.join("hotpatch");
    progress(&format!("building the base {} (1 of 2)", revs.base_name));
    let base = cargo_build(ws, opts, &trees.base, &hot.join("base"), Some(&ws.root))?;
    progress(&format!("building the head, {} (2 of 2)", revs.head_name));
    let remap_head = opts.head.is_some().then_some(ws.root.as_path());
    let head = cargo_build(ws, opts, &trees.head, &hot.join("head"), remap_head)?;
    Ok((base, head))
}

/// Builds the package in `dir` (the workspace root of that checkout),
/// remapping its paths to `remap_to`, and `target_dir`'s to the
/// workspace's target directory.
fn cargo_build(
    ws: &Workspace,
    opts: &SourceOptions,
    dir: &Path,
    target_dir: &Path,
    remap_to: Option<&Path>,
) -> Result<Artifacts, BuildError> {
    wrapper::forget_other_checkout(ws, dir, target_dir)?;
    let mut cmd = Command::new(crate::cargo::program());
    cmd.current_dir(dir)
        .args(["build", "--locked", "-p"])
        .arg(&ws.package);
    if ws.host_package != ws.package {
        cmd.arg("-p").arg(&ws.host_package);
    }
    cmd.arg("--target-dir")
        .arg(target_dir)
        .arg("--manifest-path")
        .arg(dir.join(&ws.package_dir).join("Cargo.toml"));
    cmd.args(opts.flags.args());
    wrapper::wrap(&mut cmd, ws, dir, target_dir, remap_to)?;
    let artifacts = crate::cargo::build(cmd)
        .map_err(cargo_failed(format!("`cargo build` of {}", dir.display())))?;
    let mut rlib = None;
    let mut bins = Vec::new();
    let mut hotpatch_rlib = None;
    let of = |pkg: &str, name: &str| {
        pkg.contains(&format!("#{name}@"))
            || pkg.contains(&format!("/{name}#"))
            || pkg.starts_with(&format!("{name} "))
    };
    for a in &artifacts {
        let pkg = &a.package_id;
        let is_ours = of(pkg, &ws.package);
        if is_ours && a.is_lib {
            rlib = a.rlib().map(Path::to_owned);
        } else if of(pkg, &ws.host_package) && !a.is_lib {
            bins.extend(a.executable.clone());
        } else if a.target_name == "hotpatch" && a.is_lib {
            hotpatch_rlib = a.rlib().map(Path::to_owned);
        }
    }
    let rlib =
        rlib.ok_or_else(|| BuildError::Tool(format!("cargo built no rlib for {}", ws.package)))?;
    Ok(Artifacts {
        rlib,
        bins,
        hotpatch_rlib,
    })
}

pub(super) fn pick_bin(
    ws: &Workspace,
    opts: &SourceOptions,
    bins: &[PathBuf],
) -> Result<PathBuf, BuildError> {
    let wanted = opts.bin.clone().or_else(|| {
        opts.binary
            .as_ref()
            .and_then(|b| b.file_name())
            .map(|n| n.to_string_lossy().into_owned())
    });
    if let Some(w) = &wanted
        && let Some(b) = bins
            .iter()
            .find(|b| b.file_name().is_some_and(|n| n == w.as_str()))
    {
        return Ok(b.clone());
    }
    match bins {
        [one] => Ok(one.clone()),
        [] => Err(BuildError::Refused(vec![Refusal::NoServiceBinary {
            package: ws.host_package.clone(),
        }])),
        _ => Err(BuildError::Usage(format!(
            "package {} has several binaries ({}): name the deployed one with --bin",
            ws.host_package,
            bins.iter()
                .filter_map(|b| b.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}
