//! Step 1: the service in its workspace (`cargo metadata`).

use std::path::{Path, PathBuf};

use super::SourceOptions;
use crate::metadata::Metadata;
use crate::{BuildError, Refusal};

/// The service package and the workspace it is in.
pub(super) struct Workspace {
    pub root: PathBuf,
    pub target_dir: PathBuf,
    pub package: String,
    /// The library's crate name and root file (relative to the root).
    pub lib_name: String,
    pub lib_src: PathBuf,
    /// Each bin target: name and root file.
    pub bins: Vec<(String, PathBuf)>,
    /// The package's directory, relative to the workspace root.
    pub package_dir: PathBuf,
    /// Every workspace package's directory (relative) and name.
    pub members: Vec<(PathBuf, String)>,
}

impl Workspace {
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
        let lib = package
            .targets
            .iter()
            .find(|t| t.is("lib") || t.is("rlib"))
            .ok_or_else(|| {
                BuildError::Refused(vec![Refusal::NoServiceLibrary {
                    package: package.name.clone(),
                }])
            })?;
        let bins = package
            .targets
            .iter()
            .filter(|t| t.is("bin"))
            .map(|t| (t.name.clone(), meta.relative(&t.src_path)))
            .collect();
        Ok(Workspace {
            package: package.name.clone(),
            lib_name: lib.crate_name(),
            lib_src: meta.relative(&lib.src_path),
            bins,
            package_dir,
            members,
            root: meta.root,
            target_dir: meta.target_dir,
        })
    }

    /// `services/api/` for a package in a subdirectory, else empty: what
    /// a file of the package is prefixed with in messages.
    pub fn package_prefix(&self) -> String {
        if self.package_dir.as_os_str().is_empty() {
            String::new()
        } else {
            format!("{}/", self.package_dir.display())
        }
    }

    /// Whether a demangled path is an item of the service's library.
    pub fn owns(&self, path: &str) -> bool {
        let p = path
            .trim_start_matches(['<', '&', '*'])
            .trim_start_matches("mut ");
        p.starts_with(&format!("{}::", self.lib_name))
    }
}
