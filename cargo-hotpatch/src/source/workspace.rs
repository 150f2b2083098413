//! Step 1: the service in its workspace (`cargo metadata`).

use std::path::{Path, PathBuf};

use super::SourceOptions;
use crate::metadata::{Metadata, Package};
use crate::{BuildError, Refusal};

/// The service package and the workspace it is in.
pub(super) struct Workspace {
    pub root: PathBuf,
    pub target_dir: PathBuf,
    pub package: String,
    /// The library's crate name (the package's name as a crate name
    /// when it has no library) and root file (relative to the root;
    /// `None`: the package has only executables, whose crate holds all
    /// its code).
    pub lib_name: String,
    pub lib_src: Option<PathBuf>,
    /// The package of the deployed executable: the service package, or
    /// another package of the workspace (the library in one package, the
    /// executable in another).
    pub host_package: String,
    /// Each bin target of the host package: name and root file.
    pub bins: Vec<(String, PathBuf)>,
    /// The package's directory, relative to the workspace root.
    pub package_dir: PathBuf,
    /// Every workspace package's directory (relative) and name.
    pub members: Vec<(PathBuf, String)>,
    /// The library of every other package of the workspace: its package,
    /// crate name and root file (relative to the root). Its code is
    /// compared where the executable links it (`compare::other_libraries`).
    pub other_libs: Vec<OtherLib>,
    /// The directories of path dependencies outside the workspace
    /// (`path = "../hp/hotpatch"`): what they hold at build time is no
    /// revision's, so a kept base build is valid only while they are as
    /// they were (`sides::base_key`). `None` when the resolved graph could
    /// not be read without writing or downloading: no kept base is reused.
    pub outside: Option<Vec<PathBuf>>,
}

/// The package whose executable is deployed, decided before any build:
/// the one with a bin target named `--bin` (or as `--binary`'s file),
/// the service package first; else the service package if it has a
/// binary, else the workspace's only package with one.
fn host_package<'m>(
    meta: &'m Metadata,
    service: &'m Package,
    opts: &SourceOptions,
) -> Result<&'m Package, BuildError> {
    let members: Vec<&Package> = meta
        .packages
        .iter()
        .filter(|p| p.dir().starts_with(&meta.root))
        .collect();
    let has_bin = |p: &Package, name: Option<&str>| {
        p.targets
            .iter()
            .any(|t| t.is("bin") && name.is_none_or(|n| t.name == n))
    };
    let wanted = opts.bin.clone().or_else(|| {
        opts.binary
            .as_ref()
            .and_then(|b| b.file_name())
            .map(|n| n.to_string_lossy().into_owned())
    });
    if let Some(w) = wanted.as_deref() {
        if has_bin(service, Some(w)) {
            return Ok(service);
        }
        if let Some(p) = members.iter().find(|p| has_bin(p, Some(w))) {
            return Ok(p);
        }
    }
    if has_bin(service, None) {
        return Ok(service);
    }
    match members
        .iter()
        .filter(|p| has_bin(p, None))
        .collect::<Vec<_>>()
        .as_slice()
    {
        [one] if wanted.is_none() => Ok(one),
        _ => Err(BuildError::Refused(vec![Refusal::NoServiceBinary {
            package: service.name.clone(),
        }])),
    }
}

/// The library of another package of the workspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct OtherLib {
    /// The package.
    pub package: String,
    /// The library's crate name, as symbols spell it.
    pub crate_name: String,
    /// Its root file, relative to the workspace root.
    pub src: PathBuf,
}

impl Workspace {
    /// The deployed executable's bin target (name and root file), as
    /// `--bin` or `--binary`'s file name say, else the host package's only
    /// one; `None` when that cannot be told before the build (which then
    /// asks for `--bin`).
    pub fn deployed_bin(&self, opts: &SourceOptions) -> Option<&(String, PathBuf)> {
        let wanted = opts.bin.clone().or_else(|| {
            opts.binary
                .as_ref()
                .and_then(|b| b.file_name())
                .map(|n| n.to_string_lossy().into_owned())
        });
        match (wanted, self.bins.as_slice()) {
            (Some(w), bins) if bins.iter().any(|(n, _)| *n == w) => {
                bins.iter().find(|(n, _)| *n == w)
            }
            (_, [one]) => Some(one),
            _ => None,
        }
    }

    /// The workspace of `--manifest-path` (or the current directory) and
    /// its package `-p` names (or its only package).
    pub fn read(opts: &SourceOptions) -> Result<Workspace, BuildError> {
        let meta = Metadata::read(opts.manifest_path.as_deref())?;
        let members = meta
            .packages
            .iter()
            .filter_map(|p| {
                let rel = p.dir().strip_prefix(&meta.root).ok()?.to_owned();
                Some((rel, p.name.clone()))
            })
            .collect();
        // `cargo metadata --no-deps` lists the workspace's own packages
        // only: the path dependencies come from the resolved graph.
        let outside = crate::cargo::metadata_resolved(opts.manifest_path.as_deref())
            .ok()
            .and_then(|json| {
                let packages = json["packages"].as_array()?;
                Some(
                    packages
                        .iter()
                        .filter(|p| p["id"].as_str().is_some_and(|id| id.starts_with("path+")))
                        .filter_map(|p| Path::new(p["manifest_path"].as_str()?).parent())
                        .filter(|dir| !dir.starts_with(&meta.root))
                        .map(Path::to_owned)
                        .collect(),
                )
            });
        let package = match &opts.package {
            Some(spec) => meta.package(spec)?,
            None if meta.packages.len() == 1 => &meta.packages[0],
            None => {
                return Err(BuildError::Usage(
                    "the workspace has several packages: name the service with -p".into(),
                ));
            }
        };
        let package_dir = package
            .dir()
            .strip_prefix(&meta.root)
            .map(Path::to_owned)
            .unwrap_or_default();
        // A package with only an executable (`cargo new`'s layout) has
        // no library: every function of it is the executable's crate's,
        // compared and hooked there; its name is the crate's.
        let lib = package.targets.iter().find(|t| t.is("lib") || t.is("rlib"));
        let host = host_package(&meta, package, opts)?;
        let other_libs = meta
            .packages
            .iter()
            .filter(|p| p.name != package.name && p.dir().starts_with(&meta.root))
            .filter_map(|p| {
                let lib = p.targets.iter().find(|t| t.is("lib") || t.is("rlib"))?;
                Some(OtherLib {
                    package: p.name.clone(),
                    crate_name: lib.crate_name(),
                    src: meta.relative(&lib.src_path),
                })
            })
            .collect();
        let bins = host
            .targets
            .iter()
            .filter(|t| t.is("bin"))
            .map(|t| (t.name.clone(), meta.relative(&t.src_path)))
            .collect();
        Ok(Workspace {
            host_package: host.name.clone(),
            package: package.name.clone(),
            lib_name: lib.map_or_else(|| package.name.replace('-', "_"), |l| l.crate_name()),
            lib_src: lib.map(|l| meta.relative(&l.src_path)),
            bins,
            package_dir,
            members,
            other_libs,
            outside,
            root: meta.root,
            target_dir: meta.target_dir,
        })
    }

    /// Whether a demangled path is an item of the service's library.
    pub fn owns(&self, path: &str) -> bool {
        let p = path
            .trim_start_matches(['<', '&', '*'])
            .trim_start_matches("mut ");
        p.starts_with(&format!("{}::", self.lib_name))
    }
}
