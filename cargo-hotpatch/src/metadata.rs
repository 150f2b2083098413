//! The workspace, as `cargo metadata` describes it: the one parser of its
//! JSON, for the patch-crate build and the builds from source.

use std::path::{Path, PathBuf};

use crate::BuildError;
use crate::cargo::CargoError;

/// The workspace: its root, target directory and packages.
#[derive(Debug)]
pub(crate) struct Metadata {
    pub root: PathBuf,
    pub target_dir: PathBuf,
    pub packages: Vec<Package>,
}

/// A package of the workspace.
#[derive(Debug)]
pub(crate) struct Package {
    /// Its id, as cargo's build messages name it.
    pub id: String,
    pub name: String,
    pub version: String,
    /// Its `Cargo.toml`.
    pub manifest: PathBuf,
    pub targets: Vec<Target>,
}

/// A target of a package.
#[derive(Debug)]
pub(crate) struct Target {
    pub name: String,
    /// `lib`, `rlib`, `cdylib`, `bin`, ...
    pub kinds: Vec<String>,
    /// `lib`, `rlib`, `cdylib`, `bin`, ...
    pub crate_types: Vec<String>,
    /// Its root file.
    pub src_path: PathBuf,
}

impl Target {
    pub fn is(&self, kind: &str) -> bool {
        self.kinds.iter().any(|k| k == kind)
    }

    /// The crate name (`-` as `_`).
    pub fn crate_name(&self) -> String {
        self.name.replace('-', "_")
    }
}

/// A failed run of cargo: `what` (`` `cargo build` of DIR ``) and how it
/// ended, or the I/O error.
pub(crate) fn cargo_failed(what: String) -> impl FnOnce(CargoError) -> BuildError {
    move |e| match e {
        CargoError::Io(m) => BuildError::Io(m),
        CargoError::Failed(status) => {
            BuildError::Tool(format!("{what} {status} (its diagnostics are above)"))
        }
    }
}

impl Metadata {
    /// Runs `cargo metadata` in the workspace `manifest_path` (or the
    /// current directory) is in.
    pub fn read(manifest_path: Option<&Path>) -> Result<Metadata, BuildError> {
        let json = crate::cargo::metadata(manifest_path)
            .map_err(cargo_failed("`cargo metadata`".into()))?;
        Metadata::parse(&json)
    }

    fn parse(json: &serde_json::Value) -> Result<Metadata, BuildError> {
        let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
        let texts = |v: &serde_json::Value| -> Vec<String> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default()
        };
        let root = PathBuf::from(json["workspace_root"].as_str().unwrap_or("."));
        let target_dir = json["target_directory"]
            .as_str()
            .map(PathBuf::from)
            .ok_or_else(|| BuildError::Io("cargo metadata names no target_directory".into()))?;
        let packages = json["packages"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|p| Package {
                id: text(&p["id"]),
                name: text(&p["name"]),
                version: text(&p["version"]),
                manifest: PathBuf::from(text(&p["manifest_path"])),
                targets: p["targets"]
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                    .iter()
                    .map(|t| Target {
                        name: text(&t["name"]),
                        kinds: texts(&t["kind"]),
                        crate_types: texts(&t["crate_types"]),
                        src_path: PathBuf::from(text(&t["src_path"])),
                    })
                    .collect(),
            })
            .collect();
        Ok(Metadata {
            root,
            target_dir,
            packages,
        })
    }

    /// The package `spec` names (`NAME` or `NAME@VERSION`).
    pub fn package(&self, spec: &str) -> Result<&Package, BuildError> {
        let (name, version) = match spec.split_once('@') {
            Some((n, v)) => (n, Some(v)),
            None => (spec, None),
        };
        self.packages
            .iter()
            .find(|p| p.name == name && version.is_none_or(|v| p.version == v))
            .ok_or_else(|| BuildError::Usage(format!("package {spec} is not in the workspace")))
    }

    /// A path relative to the workspace root (unchanged if outside it).
    pub fn relative(&self, path: &Path) -> PathBuf {
        path.strip_prefix(&self.root)
            .map(Path::to_owned)
            .unwrap_or_else(|_| path.to_owned())
    }
}

impl Package {
    /// The package's directory.
    pub fn dir(&self) -> &Path {
        self.manifest.parent().unwrap_or(Path::new(""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata() -> Metadata {
        let json = serde_json::json!({
            "workspace_root": "/ws",
            "target_directory": "/ws/target",
            "packages": [
                {"id": "path+file:///ws/a#0.1.0", "name": "a", "version": "0.1.0",
                 "manifest_path": "/ws/a/Cargo.toml",
                 "targets": [{"name": "a-lib", "kind": ["lib"], "crate_types": ["lib"],
                              "src_path": "/ws/a/src/lib.rs"}]},
                {"id": "path+file:///ws/a2#a@0.2.0", "name": "a", "version": "0.2.0",
                 "manifest_path": "/ws/a2/Cargo.toml", "targets": []},
            ]
        });
        Metadata::parse(&json).unwrap()
    }

    #[test]
    fn a_package_is_found_by_name_or_name_at_version() {
        let m = metadata();
        assert_eq!(m.package("a").unwrap().version, "0.1.0");
        assert_eq!(m.package("a@0.2.0").unwrap().version, "0.2.0");
        assert!(matches!(m.package("a@9.9.9"), Err(BuildError::Usage(_))));
        assert!(matches!(m.package("b"), Err(BuildError::Usage(_))));
        let lib = &m.package("a").unwrap().targets[0];
        assert!(lib.is("lib") && !lib.is("bin"));
        assert_eq!(lib.crate_name(), "a_lib");
        assert_eq!(m.relative(&lib.src_path), Path::new("a/src/lib.rs"));
    }
}
