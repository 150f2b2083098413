//! The `cargo build` flags that pick a profile and features.

use std::ffi::OsString;

/// The profile and feature flags a service was built with, given to every
/// `cargo build` the tool runs (a patch crate's, or a service's checkouts)
/// so that symbol names, which hash each crate's resolved features and
/// profile, match the deployed binary's.
///
/// ```
/// use cargo_hotpatch::CargoFlags;
///
/// let flags = CargoFlags {
///     release: true,
///     features: vec!["metrics".into()],
///     ..CargoFlags::default()
/// };
/// assert_eq!(flags.args(), ["--release", "--features", "metrics"]);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CargoFlags {
    /// `--release`.
    pub release: bool,
    /// `--profile NAME`.
    pub profile: Option<String>,
    /// `--features` (each given once).
    pub features: Vec<String>,
    /// `--all-features`.
    pub all_features: bool,
    /// `--no-default-features`.
    pub no_default_features: bool,
}

impl CargoFlags {
    /// The arguments for `cargo build`, in the order cargo documents them.
    pub fn args(&self) -> Vec<OsString> {
        let mut out: Vec<OsString> = Vec::new();
        if self.release {
            out.push("--release".into());
        }
        if let Some(p) = &self.profile {
            out.extend(["--profile".into(), p.into()]);
        }
        for f in &self.features {
            out.extend(["--features".into(), f.into()]);
        }
        if self.all_features {
            out.push("--all-features".into());
        }
        if self.no_default_features {
            out.push("--no-default-features".into());
        }
        out
    }
}
