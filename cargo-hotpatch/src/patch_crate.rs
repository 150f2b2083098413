//! `cargo hotpatch build -p PATCH --binary BIN`: a patch crate (an rlib
//! with `hotpatch::manifest!()`) built with cargo and linked thin against
//! the service binary.

use std::path::PathBuf;
use std::process::Command;

use crate::metadata::{Metadata, Package, cargo_failed};
use crate::{BuildError, CargoFlags, LinkReport, Refusal};

/// What [`build_patch_crate`] builds.
#[derive(Debug, Clone, Default)]
pub struct CrateOptions {
    /// The patch package first (`NAME` or `NAME@VERSION`); any further
    /// packages are built with it, to get the feature resolution of the
    /// service's build.
    pub packages: Vec<String>,
    /// Build the whole workspace with the patch (`--workspace`).
    pub workspace: bool,
    /// The service binary the patch is for (linked with `-rdynamic`, or
    /// not stripped).
    pub binary: Option<PathBuf>,
    /// The profile and features the service was built with.
    pub flags: CargoFlags,
    /// Where to write the patch [default: `TARGET_DIR/hotpatch/CRATE.so`].
    pub output: Option<PathBuf>,
    /// `--manifest-path`.
    pub manifest_path: Option<PathBuf>,
}

/// Builds the patch crate and links its own code into a thin patch bound
/// to the binary.
///
/// # Errors
///
/// [`BuildError`]: no binary or package given, a package that is not in
/// the workspace, a patch package that is no rlib library
/// ([`Refusal::NoPatchLibrary`], [`Refusal::NoRlib`]), a failed `cargo
/// build`, or the link's errors ([`BuildError::Link`]).
///
/// # Examples
///
/// ```no_run
/// use cargo_hotpatch::{CrateOptions, build_patch_crate};
///
/// let report = build_patch_crate(&CrateOptions {
///     packages: vec!["pricing-fix".into()],
///     binary: Some("target/release/my-service".into()),
///     ..CrateOptions::default()
/// })?;
/// println!("built {} ({} bytes)", report.output.display(), report.size);
/// # Ok::<(), cargo_hotpatch::BuildError>(())
/// ```
pub fn build_patch_crate(opts: &CrateOptions) -> Result<LinkReport, BuildError> {
    let binary = opts.binary.clone().ok_or_else(|| {
        BuildError::Usage(
            "--binary PATH is required: the service binary the patch is for (or --base REV to make the patch from the service's source)".into(),
        )
    })?;
    let Some(patch) = opts.packages.first() else {
        return Err(BuildError::Usage(
            "-p PATCH_PACKAGE is required (or --base REV to make the patch from the service's source)".into(),
        ));
    };
    // Before a build that may take minutes: the binary must be there and
    // have a build-id.
    crate::build_id(&binary)?;

    let meta = Metadata::read(opts.manifest_path.as_deref())?;
    let package = meta.package(patch)?;
    let crate_name = rlib_library(package, patch)?;
    let rlib = cargo_build(opts, package)?;
    let out = crate::cargo::output_path(
        opts.output.as_deref(),
        &meta.target_dir,
        &format!("{crate_name}.so"),
    )
    .map_err(BuildError::Io)?;
    Ok(crate::link(&rlib, &binary, &out)?)
}

/// The name of the package's library crate, which must build an rlib.
fn rlib_library(package: &Package, spec: &str) -> Result<String, BuildError> {
    let lib = package
        .targets
        .iter()
        .find(|t| {
            ["lib", "rlib", "cdylib", "dylib", "staticlib"]
                .iter()
                .any(|k| t.is(k))
        })
        .ok_or_else(|| {
            BuildError::Refused(vec![Refusal::NoPatchLibrary {
                spec: spec.to_owned(),
            }])
        })?;
    if !lib.crate_types.iter().any(|c| c == "lib" || c == "rlib") {
        return Err(BuildError::Refused(vec![Refusal::NoRlib {
            spec: spec.to_owned(),
            crate_types: serde_json::to_string(&lib.crate_types).unwrap_or_default(),
        }]));
    }
    Ok(lib.crate_name())
}

/// Runs `cargo build` of the selection (its stderr is the user's) and
/// returns the rlib it made for the patch package.
fn cargo_build(opts: &CrateOptions, package: &Package) -> Result<PathBuf, BuildError> {
    let mut cmd = Command::new(crate::cargo::program());
    cmd.args(["build", "--lib"]);
    for p in &opts.packages {
        cmd.args(["-p", p]);
    }
    if opts.workspace {
        cmd.arg("--workspace");
    }
    cmd.args(opts.flags.args());
    if let Some(path) = &opts.manifest_path {
        cmd.arg("--manifest-path").arg(path);
    }
    let artifacts = crate::cargo::build(cmd).map_err(cargo_failed("`cargo build`".into()))?;
    artifacts
        .iter()
        .filter(|a| a.package_id == package.id)
        .filter_map(|a| a.rlib())
        .next_back()
        .map(PathBuf::from)
        .ok_or_else(|| {
            BuildError::Usage(format!(
                "cargo built no rlib for package {} ({})",
                opts.packages[0], package.id
            ))
        })
}
