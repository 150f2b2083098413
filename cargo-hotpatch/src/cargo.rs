//! What the tool runs cargo for, shared by the patch-crate build
//! (`patch_crate.rs`) and the builds of a service's checkouts (`source`).

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

/// The cargo that runs this tool (`$CARGO`, as cargo sets it for a
/// subcommand), else `cargo` from `PATH`.
pub fn program() -> std::ffi::OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// One `compiler-artifact` message of `cargo build`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifact {
    /// The package's id, as `cargo metadata` spells it.
    pub package_id: String,
    /// The target's name (`hotpatch`, `my-service`).
    pub target_name: String,
    /// Whether the target is a library (`lib` or `rlib`).
    pub is_lib: bool,
    /// The files cargo made.
    pub filenames: Vec<PathBuf>,
    /// A binary target's executable.
    pub executable: Option<PathBuf>,
}

impl Artifact {
    /// The `.rlib` among the files, if any.
    pub fn rlib(&self) -> Option<&Path> {
        self.filenames
            .iter()
            .map(PathBuf::as_path)
            .find(|f| f.extension().is_some_and(|e| e == "rlib"))
    }
}

/// Why [`build`] or [`metadata`] returned nothing.
#[derive(Debug)]
pub enum CargoError {
    /// cargo could not be run, or its output read: what, and why.
    Io(String),
    /// cargo ran and failed (its diagnostics went to stderr).
    Failed(ExitStatus),
}

/// `cargo metadata --format-version 1 --no-deps` of the workspace that
/// `manifest_path` (or the current directory) is in, as JSON.
///
/// # Errors
///
/// [`CargoError::Io`] if cargo cannot be run or prints no JSON;
/// [`CargoError::Failed`] if it fails.
pub fn metadata(manifest_path: Option<&Path>) -> Result<serde_json::Value, CargoError> {
    metadata_with(manifest_path, &["--no-deps"])
}

/// `cargo metadata` with every package of the resolved graph, as the
/// lock file has it (`--frozen`: nothing is written or downloaded; it
/// fails instead).
///
/// # Errors
///
/// As [`metadata`].
pub fn metadata_resolved(manifest_path: Option<&Path>) -> Result<serde_json::Value, CargoError> {
    metadata_with(manifest_path, &["--frozen"])
}

fn metadata_with(
    manifest_path: Option<&Path>,
    more: &[&str],
) -> Result<serde_json::Value, CargoError> {
    let mut cmd = Command::new(program());
    cmd.args(["metadata", "--format-version", "1"]).args(more);
    if let Some(path) = manifest_path {
        cmd.arg("--manifest-path").arg(path);
    }
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| CargoError::Io(format!("running cargo metadata: {e}")))?;
    if !out.status.success() {
        return Err(CargoError::Failed(out.status));
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| CargoError::Io(format!("cargo metadata printed no JSON: {e}")))
}

/// Runs `cmd`, a `cargo build` (this adds
/// `--message-format=json-render-diagnostics`: the diagnostics go to the
/// user's stderr as cargo renders them), and returns the artifacts it
/// reported, in order.
///
/// # Errors
///
/// [`CargoError::Io`] if cargo cannot be run or its output read;
/// [`CargoError::Failed`] if the build failed.
pub fn build(mut cmd: Command) -> Result<Vec<Artifact>, CargoError> {
    let mut child = cmd
        .arg("--message-format=json-render-diagnostics")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| CargoError::Io(format!("running cargo build: {e}")))?;
    let Some(stdout) = child.stdout.take() else {
        return Err(CargoError::Io("cargo build has no stdout".into()));
    };
    let mut artifacts = Vec::new();
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.map_err(|e| CargoError::Io(format!("reading cargo's output: {e}")))?;
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
        artifacts.push(Artifact {
            package_id: text(&msg["package_id"]),
            target_name: text(&msg["target"]["name"]),
            is_lib: msg["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "lib" || k == "rlib")),
            filenames: msg["filenames"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|f| f.as_str())
                        .map(PathBuf::from)
                        .collect()
                })
                .unwrap_or_default(),
            executable: msg["executable"].as_str().map(PathBuf::from),
        });
    }
    let status = child
        .wait()
        .map_err(|e| CargoError::Io(format!("waiting for cargo build: {e}")))?;
    if !status.success() {
        return Err(CargoError::Failed(status));
    }
    Ok(artifacts)
}

/// Where a patch is written: `output` if given, else
/// `TARGET_DIR/hotpatch/FILE_NAME`; its directory is made.
///
/// # Errors
///
/// The directory could not be made: `DIR: reason`.
pub fn output_path(
    output: Option<&Path>,
    target_dir: &Path,
    file_name: &str,
) -> Result<PathBuf, String> {
    let out = match output {
        Some(o) => o.to_owned(),
        None => target_dir.join("hotpatch").join(file_name),
    };
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    Ok(out)
}
