//! `cargo hotpatch build --base REV`: a patch from the service's own
//! source, for the build that is deployed.
//!
//! 1. The base revision is checked out (`git archive`, into the target
//!    directory: the user's tree and `.git` are untouched) and built as
//!    deployed: the same toolchain, `Cargo.lock` (`--locked`), profile,
//!    features and flags, in its own target directory. The checkout's
//!    paths, and that target directory's (where OUT_DIR is), are remapped
//!    to the workspace's own (`--remap-path-prefix`, through a
//!    `RUSTC_WRAPPER`: cargo puts a workspace wrapper in the crates'
//!    metadata hash, and so in every symbol name), so the base builds bit
//!    for bit what the workspace builds, debug info included.
//! 2. The head (the working tree, or `--head REV` checked out the same
//!    way) is built the same way, in another target directory.
//! 3. With `--binary`, the deployed binary must be the rebuilt base: the
//!    same bytes in every section the process maps (debug info and the
//!    build-id note aside). Else the patch is refused with both build-ids.
//! 4. The objects of the service's library crate are compared function by
//!    function (`objects.rs`), and each changed function classified: a
//!    `#[patchable]` body is replaced; any other function is included if
//!    every function of the base that references it is replaced or
//!    included, else refused with its unpatched callers.
//! 5. The changed functions are written into one object (`extract.rs`),
//!    with a `PatchFn` record per replaced function, and linked with a
//!    manifest into a thin patch bound to the binary (`link.rs`).

mod extract;
mod objects;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use object::{Object, ObjectSection, ObjectSymbol};

use self::extract::{Host, Record};
use self::objects::{Build, Target, UnitId};

/// The environment variable that makes `cargo-hotpatch` act as rustc's
/// wrapper: `FROM=TO` pairs for `--remap-path-prefix`, one a line.
pub const REMAP_ENV: &str = "__CARGO_HOTPATCH_REMAP";
/// The wrapper the user had, which the remapping wrapper runs in turn.
pub const INNER_WRAPPER_ENV: &str = "__CARGO_HOTPATCH_INNER_WRAPPER";

/// Offsets in `hotpatch::__private::Entry` (`repr(C)`): `path: &str` at 0,
/// `signature: &str` at 16, `fingerprint: u64` at 32, `layouts` at 40,
/// `slot` at 56, `original` at 64.
pub const ENTRY_LAYOUTS_OFFSET: usize = 40;
/// See [`ENTRY_LAYOUTS_OFFSET`].
pub const ENTRY_ORIGINAL_OFFSET: usize = 64;
/// `counted` (the body under the patch's panic counter) in
/// `hotpatch::__private::Entry`, after `wrapper` (72) and `dispatcher` (80).
pub const ENTRY_COUNTED_OFFSET: usize = 88;
/// Offsets in `hotpatch::__private::PatchFn` (`repr(C)`), as the records
/// of a patch made from source are written: target getter, replacement,
/// name (`&str`), layouts (`&[TypeLayout]`); and its size.
pub const PATCH_FN_OFFSETS: [usize; 4] = [0, 8, 16, 32];
/// See [`PATCH_FN_OFFSETS`].
pub const PATCH_FN_SIZE: usize = extract::PATCH_FN_SIZE;

/// What to build.
#[derive(Debug, Clone, Default)]
pub struct SourceOptions {
    /// The service package (`-p`); the workspace's only package if `None`.
    pub package: Option<String>,
    /// The deployed revision.
    pub base: String,
    /// The new revision; the working tree if `None`.
    pub head: Option<String>,
    /// The deployed binary, checked against the rebuilt base.
    pub binary: Option<PathBuf>,
    /// The binary target of the package, if it has several.
    pub bin: Option<String>,
    /// Where to write the patch.
    pub output: Option<PathBuf>,
    /// The profile and features the service was deployed with.
    pub flags: crate::CargoFlags,
    /// `--manifest-path`.
    pub manifest_path: Option<PathBuf>,
}

/// A function of the patch, for the summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// The path as the service writes it (`svc::Cart::total`).
    pub path: String,
    /// `file:line`, where the source says.
    pub location: Option<String>,
}

/// What [`build`] made.
#[derive(Debug, Clone)]
pub struct SourceReport {
    /// The `#[patchable]` functions replaced.
    pub replaced: Vec<Item>,
    /// Other functions in the patch: changed ones whose callers are all
    /// replaced, and new ones.
    pub included: Vec<Item>,
    /// Informational lines.
    pub notes: Vec<String>,
    /// The base: revision as given, commit, build-id.
    pub base: String,
    /// The head: revision or "working tree".
    pub head: String,
    /// The patch file.
    pub output: PathBuf,
    /// Its size.
    pub size: u64,
    /// The build-id it is bound to.
    pub build_id: String,
}

/// Why [`build`] made no patch.
#[derive(Debug)]
pub enum SourceError {
    /// Bad arguments: a revision that does not exist, an unknown package.
    Usage(String),
    /// cargo or git failed.
    Tool(String),
    /// The change cannot be patched: one line per reason.
    Refused(Vec<String>),
    /// Base and head compile to the same code.
    NoChange(String),
    /// A file could not be read or written.
    Io(String),
    /// Reading the deployed binary, or linking or checking the patch,
    /// failed.
    Link(crate::Error),
}

impl std::fmt::Display for SourceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SourceError::Usage(m) | SourceError::Tool(m) | SourceError::Io(m) => f.write_str(m),
            SourceError::NoChange(m) => write!(f, "no change: {m}"),
            SourceError::Refused(lines) => f.write_str(&lines.join("\n")),
            SourceError::Link(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for SourceError {}

fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> SourceError {
    move |e| SourceError::Io(format!("{what}: {e}"))
}

/// A failed run of cargo: `what` (`` `cargo build` of DIR ``) and how it
/// ended, or the I/O error.
fn cargo_failed(what: String) -> impl FnOnce(crate::cargo::BuildError) -> SourceError {
    move |e| match e {
        crate::cargo::BuildError::Io(m) => SourceError::Io(m),
        crate::cargo::BuildError::Failed(status) => {
            SourceError::Tool(format!("{what} {status} (its diagnostics are above)"))
        }
    }
}

/// The workspace, from `cargo metadata`.
struct Workspace {
    root: PathBuf,
    target_dir: PathBuf,
    package: String,
    /// The library's crate name and root file (relative to the root).
    lib_name: String,
    lib_src: PathBuf,
    /// Each bin target: name and root file.
    bins: Vec<(String, PathBuf)>,
    /// The package's directory, relative to the workspace root.
    package_dir: PathBuf,
    /// Every workspace package's directory (relative) and name.
    members: Vec<(PathBuf, String)>,
}

fn workspace(opts: &SourceOptions) -> Result<Workspace, SourceError> {
    let json = crate::cargo::metadata(opts.manifest_path.as_deref())
        .map_err(cargo_failed("`cargo metadata`".into()))?;
    let root = PathBuf::from(json["workspace_root"].as_str().unwrap_or("."));
    let target_dir = PathBuf::from(json["target_directory"].as_str().unwrap_or("target"));
    let packages = json["packages"].as_array().cloned().unwrap_or_default();
    let members: Vec<(PathBuf, String)> = packages
        .iter()
        .filter_map(|p| {
            let dir = Path::new(p["manifest_path"].as_str()?).parent()?;
            let rel = dir.strip_prefix(&root).ok()?.to_owned();
            Some((rel, p["name"].as_str()?.to_owned()))
        })
        .collect();
    let package = match &opts.package {
        Some(spec) => {
            let name = spec.split('@').next().unwrap_or(spec);
            packages.iter().find(|p| p["name"] == name).ok_or_else(|| {
                SourceError::Usage(format!("package {spec} is not in the workspace"))
            })?
        }
        None if packages.len() == 1 => &packages[0],
        None => {
            return Err(SourceError::Usage(
                "the workspace has several packages: name the service with -p".into(),
            ));
        }
    };
    let name = package["name"].as_str().unwrap_or_default().to_owned();
    let manifest = PathBuf::from(package["manifest_path"].as_str().unwrap_or_default());
    let package_dir = manifest
        .parent()
        .and_then(|d| d.strip_prefix(&root).ok())
        .map(Path::to_owned)
        .unwrap_or_default();
    let targets = package["targets"].as_array().cloned().unwrap_or_default();
    let kind = |t: &serde_json::Value, k: &str| {
        t["kind"]
            .as_array()
            .is_some_and(|ks| ks.iter().any(|x| x == k))
    };
    let rel = |t: &serde_json::Value| {
        let p = PathBuf::from(t["src_path"].as_str().unwrap_or_default());
        p.strip_prefix(&root).map(Path::to_owned).unwrap_or(p)
    };
    let lib = targets
        .iter()
        .find(|t| kind(t, "lib") || kind(t, "rlib"))
        .ok_or_else(|| {
            SourceError::Refused(vec![format!(
                "package {name} has no library target: a patch is made from the service's library crate (its #[patchable] code), so move that code into src/lib.rs and let main.rs call it"
            )])
        })?;
    let bins = targets
        .iter()
        .filter(|t| kind(t, "bin"))
        .map(|t| (t["name"].as_str().unwrap_or_default().to_owned(), rel(t)))
        .collect();
    Ok(Workspace {
        root: root.clone(),
        target_dir,
        package: name,
        lib_name: lib["name"].as_str().unwrap_or_default().replace('-', "_"),
        lib_src: rel(lib),
        bins,
        package_dir,
        members,
    })
}

fn git(repo: &Path, args: &[&str]) -> Result<String, SourceError> {
    let out = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(args)
        .stderr(Stdio::piped())
        .output()
        .map_err(io("running git"))?;
    if !out.status.success() {
        return Err(SourceError::Tool(format!(
            "`git {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The commit a revision names, or a usage error naming it.
fn commit_of(repo: &Path, rev: &str) -> Result<String, SourceError> {
    let spec = format!("{rev}^{{commit}}");
    let out = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["rev-parse", "--verify", "--quiet", &spec])
        .output()
        .map_err(io("running git"))?;
    if !out.status.success() {
        return Err(SourceError::Usage(format!(
            "revision `{rev}` does not exist in {} (a tag, branch or commit of the deployed build)",
            repo.display()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Checks out `commit` into `dir` (once: a finished checkout is kept, so
/// cargo's fingerprints stay valid between runs).
fn checkout(repo: &Path, commit: &str, dir: &Path) -> Result<(), SourceError> {
    let marker = dir.join(".cargo-hotpatch-commit");
    if std::fs::read_to_string(&marker).is_ok_and(|c| c.trim() == commit) {
        return Ok(());
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(io(dir.display()))?;
    }
    std::fs::create_dir_all(dir).map_err(io(dir.display()))?;
    let mut archive = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["archive", "--format=tar", commit])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(io("running git archive"))?;
    let tar = Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(dir)
        .stdin(archive.stdout.take().expect("piped"))
        .status()
        .map_err(io("running tar"))?;
    let git_ok = archive.wait().map_err(io("git archive"))?.success();
    if !git_ok || !tar.success() {
        return Err(SourceError::Tool(format!(
            "checking out {commit} into {} failed",
            dir.display()
        )));
    }
    std::fs::write(&marker, commit).map_err(io(marker.display()))?;
    Ok(())
}

/// What one build made.
struct Artifacts {
    rlib: PathBuf,
    bins: Vec<PathBuf>,
    /// The rlib of the `hotpatch` crate (for the manifest).
    hotpatch_rlib: Option<PathBuf>,
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
) -> Result<Artifacts, SourceError> {
    forget_other_checkout(ws, dir, target_dir)?;
    let mut cmd = Command::new(crate::cargo::program());
    cmd.current_dir(dir)
        .args(["build", "--locked", "-p"])
        .arg(&ws.package)
        .arg("--target-dir")
        .arg(target_dir)
        .arg("--manifest-path")
        .arg(dir.join(&ws.package_dir).join("Cargo.toml"));
    cmd.args(opts.flags.args());
    // Every build goes through the remapping wrapper. The checkout's
    // paths become the workspace's; and this build's target directory
    // becomes the workspace's, so code a build script generates into
    // OUT_DIR (`include!`, as prost and tonic do) names the file where the
    // deployed build had it, in panic locations and `file!()`.
    let me = std::env::current_exe().map_err(io("finding cargo-hotpatch's own path"))?;
    if let Some(inner) = std::env::var_os("RUSTC_WRAPPER") {
        cmd.env(INNER_WRAPPER_ENV, inner);
    }
    cmd.env("RUSTC_WRAPPER", me);
    let mut remap = OsString::new();
    if let Some(to) = remap_to {
        remap.push(dir);
        remap.push("=");
        remap.push(to);
        remap.push("\n");
    }
    remap.push(target_dir);
    remap.push("=");
    remap.push(&ws.target_dir);
    cmd.env(REMAP_ENV, remap);
    let artifacts = crate::cargo::build(cmd)
        .map_err(cargo_failed(format!("`cargo build` of {}", dir.display())))?;
    let mut rlib = None;
    let mut bins = Vec::new();
    let mut hotpatch_rlib = None;
    for a in &artifacts {
        let pkg = &a.package_id;
        let is_ours = pkg.contains(&format!("#{}@", ws.package))
            || pkg.contains(&format!("/{}#", ws.package))
            || pkg.starts_with(&format!("{} ", ws.package));
        if is_ours && a.is_lib {
            rlib = a.rlib().map(Path::to_owned);
        } else if is_ours {
            bins.extend(a.executable.clone());
        } else if a.target_name == "hotpatch" && a.is_lib {
            hotpatch_rlib = a.rlib().map(Path::to_owned);
        }
    }
    let rlib =
        rlib.ok_or_else(|| SourceError::Tool(format!("cargo built no rlib for {}", ws.package)))?;
    Ok(Artifacts {
        rlib,
        bins,
        hotpatch_rlib,
    })
}

/// Whether a relative path dependency of a workspace package leads out of
/// the repository (read from the manifests' `path = "..."` values).
fn paths_leave(repo: &Path, ws: &Workspace) -> bool {
    let repo = repo.canonicalize().unwrap_or_else(|_| repo.to_owned());
    for (dir, _) in &ws.members {
        let dir = ws.root.join(dir);
        let Ok(text) = std::fs::read_to_string(dir.join("Cargo.toml")) else {
            continue;
        };
        for line in text.lines() {
            let Some(at) = line.find("path") else {
                continue;
            };
            let rest = line[at + 4..].trim_start();
            let Some(rest) = rest.strip_prefix('=') else {
                continue;
            };
            let rest = rest.trim_start();
            let Some(rest) = rest.strip_prefix('"') else {
                continue;
            };
            let Some(end) = rest.find('"') else { continue };
            // An absolute path leads to the same crate from anywhere.
            if rest[..end].starts_with('/') {
                continue;
            }
            let target = dir.join(&rest[..end]);
            let target = target.canonicalize().unwrap_or(target);
            if !target.starts_with(&repo) {
                return true;
            }
        }
    }
    false
}

/// What the remapping wrapper gives rustc, as far as it decides the bytes
/// of a build: cargo's fingerprints do not see it, so a target directory
/// built under another scheme (an older cargo-hotpatch) is rebuilt whole.
/// Changed whenever the wrapper's flags change.
const WRAPPER_SCHEME: &str = "cargo-hotpatch wrapper 2: source and target directory remapped";

/// One target directory serves every checkout of a side (dependencies are
/// compiled once), but the workspace's own crates have the same names in
/// every checkout, so cargo would take the last checkout's build for this
/// one's. When `dir` is not the checkout built there last, their
/// fingerprints are removed and they are rebuilt. A target directory built
/// under another [`WRAPPER_SCHEME`] is removed.
fn forget_other_checkout(ws: &Workspace, dir: &Path, target_dir: &Path) -> Result<(), SourceError> {
    let marker = target_dir.join(".cargo-hotpatch-source");
    let this = format!("{WRAPPER_SCHEME}\n{}", dir.to_string_lossy());
    let last = std::fs::read_to_string(&marker).ok();
    if last.as_deref() == Some(this.as_str()) {
        return Ok(());
    }
    let same_scheme = last
        .as_deref()
        .is_some_and(|m| m.lines().next() == Some(WRAPPER_SCHEME));
    if !same_scheme && target_dir.exists() {
        std::fs::remove_dir_all(target_dir).map_err(io(target_dir.display()))?;
    }
    if let Ok(profiles) = std::fs::read_dir(target_dir) {
        for profile in profiles.flatten() {
            let Ok(prints) = std::fs::read_dir(profile.path().join(".fingerprint")) else {
                continue;
            };
            for print in prints.flatten() {
                let name = print.file_name().to_string_lossy().into_owned();
                let ours = ws.members.iter().any(|(_, pkg)| {
                    name.strip_prefix(pkg.as_str())
                        .is_some_and(|rest| rest.starts_with('-') && !rest[1..].contains('-'))
                });
                if ours {
                    std::fs::remove_dir_all(print.path()).map_err(io(print.path().display()))?;
                }
            }
        }
    }
    std::fs::create_dir_all(target_dir).map_err(io(target_dir.display()))?;
    std::fs::write(&marker, this).map_err(io(marker.display()))?;
    Ok(())
}

/// Runs as rustc's wrapper when cargo-hotpatch set [`REMAP_ENV`]:
/// `argv[1]` is rustc. Returns the exit code.
pub fn run_as_rustc_wrapper(args: &[OsString]) -> i32 {
    let remap = std::env::var_os(REMAP_ENV).unwrap_or_default();
    let (program, rest) = match std::env::var_os(INNER_WRAPPER_ENV) {
        Some(inner) if !inner.is_empty() => (inner, &args[1..]),
        _ => (args[1].clone(), &args[2..]),
    };
    let mut cmd = Command::new(program);
    cmd.args(rest);
    let remap = remap.to_string_lossy().into_owned();
    // rustc splits FROM=TO at the last `=`.
    let pairs: Vec<(&str, &str)> = remap.lines().filter_map(|l| l.rsplit_once('=')).collect();
    if args.iter().any(|a| a == "--crate-name") {
        for (from, to) in &pairs {
            cmd.arg(format!("--remap-path-prefix={from}={to}"));
        }
    }
    cmd.env_remove(REMAP_ENV);
    // `env!("CARGO_MANIFEST_DIR")` in the service's code puts the
    // checkout's path into the binary: it is the workspace's in the
    // deployed build, so it is here too.
    for var in ["CARGO_MANIFEST_DIR", "CARGO_MANIFEST_PATH"] {
        let Some(v) = std::env::var_os(var) else {
            continue;
        };
        let v = PathBuf::from(v);
        let mapped = pairs.iter().find_map(|(from, to)| {
            let rest = v.strip_prefix(from).ok()?;
            // `join("")` would add a `/` the deployed value does not have.
            Some(match rest.as_os_str().is_empty() {
                true => PathBuf::from(to),
                false => Path::new(to).join(rest),
            })
        });
        if let Some(to) = mapped {
            cmd.env(var, to);
        }
    }
    match cmd.status() {
        Ok(s) => s.code().unwrap_or(101),
        Err(e) => {
            eprintln!("cargo-hotpatch (as rustc wrapper): {e}");
            101
        }
    }
}

/// The hash of every section a process maps, the build-id note aside:
/// two binaries with equal identities run the same code and data.
pub fn code_identity(data: &[u8]) -> Result<u64, String> {
    use std::hash::{Hash, Hasher};
    let file = object::File::parse(data).map_err(|e| e.to_string())?;
    let mut h = std::hash::DefaultHasher::new();
    for s in file.sections() {
        let object::SectionFlags::Elf { sh_flags } = s.flags() else {
            continue;
        };
        if sh_flags & u64::from(object::elf::SHF_ALLOC) == 0
            || s.kind() == object::SectionKind::Note
        {
            continue;
        }
        s.name().unwrap_or("").hash(&mut h);
        s.address().hash(&mut h);
        s.size().hash(&mut h);
        s.data().unwrap_or_default().hash(&mut h);
    }
    Ok(h.finish())
}

/// A symbol name demangled without its hash.
fn demangle(name: &str) -> String {
    format!("{:#}", rustc_demangle::demangle(name))
}

/// The path a user knows a function by: the `#[patchable]` body's by its
/// function's, a closure by its function's.
fn user_path(demangled: &str) -> String {
    demangled.replace("__hotpatch_original_", "")
}

/// An entry of the registry in one build.
#[derive(Debug, Clone)]
struct EntryInfo {
    path: String,
    entry: String,
    original: String,
    getter: Option<String>,
    /// `__hotpatch_counted_*`: what a patch installs (the body under its
    /// panic counter).
    counted: Option<String>,
    layouts: Option<(UnitId, u64)>,
    layouts_len: u64,
}

fn entries(b: &Build<'_>) -> Vec<EntryInfo> {
    let mut out = Vec::new();
    for (name, &u) in &b.by_name {
        if !name.contains("__HOTPATCH_ENTRY_") || b.is_code(u) {
            continue;
        }
        let bytes = b.bytes(u);
        if bytes.len() < ENTRY_ORIGINAL_OFFSET + 8 {
            continue;
        }
        let relocs = b.relocs.get(&u).cloned().unwrap_or_default();
        let at = |off: usize| relocs.iter().find(|r| r.offset as usize == off);
        let word = |off: usize| u64::from_le_bytes(bytes[off..off + 8].try_into().unwrap());
        let path = match at(0) {
            Some(objects::Reloc {
                target: Target::Unit(t, toff),
                addend,
                ..
            }) => {
                let data = b.bytes(*t);
                let start = (*toff as i64 + addend) as usize;
                let len = word(8) as usize;
                data.get(start..start + len)
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .unwrap_or_default()
            }
            _ => String::new(),
        };
        let layouts = match at(ENTRY_LAYOUTS_OFFSET) {
            Some(objects::Reloc {
                target: Target::Unit(t, toff),
                addend,
                ..
            }) => Some((*t, (*toff as i64 + addend) as u64)),
            _ => None,
        };
        let original = match at(ENTRY_ORIGINAL_OFFSET) {
            Some(objects::Reloc {
                target: Target::Unit(t, _),
                ..
            }) => b.name_of.get(t).cloned().unwrap_or_default(),
            _ => String::new(),
        };
        let counted = match at(ENTRY_COUNTED_OFFSET) {
            Some(objects::Reloc {
                target: Target::Unit(t, _),
                ..
            }) => b.name_of.get(t).cloned(),
            _ => None,
        };
        // The getter: the function named `__hotpatch_entry_of_*` that
        // references this entry.
        let getter = b.functions().find_map(|(g, gu)| {
            (g.contains("__hotpatch_entry_of_")
                && b.relocs.get(gu).is_some_and(|rs| {
                    rs.iter()
                        .any(|r| matches!(r.target, Target::Unit(t, _) if t == u))
                }))
            .then(|| g.clone())
        });
        out.push(EntryInfo {
            path,
            entry: name.clone(),
            original,
            getter,
            counted,
            layouts,
            layouts_len: word(ENTRY_LAYOUTS_OFFSET + 8),
        });
    }
    out
}

/// Code and data `#[patchable]` generates beside the user's function (its
/// dispatcher, counted body, entry getter and entry): they change with the
/// signature, which is refused on its own, and are never replaced or
/// included.
fn is_generated(name: &str) -> bool {
    [
        "__hotpatch_dispatch_",
        "__hotpatch_counted_",
        "__hotpatch_entry_of_",
        "__HOTPATCH_ENTRY_",
    ]
    .iter()
    .any(|m| name.contains(m))
}

/// Reads the deployed (or base) binary's symbols.
fn host_symbols(path: &Path, data: &[u8]) -> Result<Host, SourceError> {
    let file = object::File::parse(data)
        .map_err(|e| SourceError::Io(format!("{}: not an ELF binary: {e}", path.display())))?;
    let mut exported = HashSet::new();
    for s in file.dynamic_symbols() {
        if !s.is_undefined()
            && let Ok(n) = s.name()
        {
            exported.insert(n.to_owned());
        }
    }
    let mut address = HashMap::new();
    let mut tls = HashSet::new();
    let mut any = false;
    for s in file.symbols() {
        any = true;
        if s.is_undefined() || s.kind() == object::SymbolKind::Section {
            continue;
        }
        if let Ok(n) = s.name() {
            if s.kind() == object::SymbolKind::Tls {
                tls.insert(n.to_owned());
            }
            address.entry(n.to_owned()).or_insert(s.address());
        }
    }
    if !any {
        return Err(SourceError::Refused(vec![format!(
            "{} has no symbol table (stripped): a patch made from source reaches the service's private functions and statics by the binary's symbols; build it with `strip = \"debuginfo\"` or `strip = false` (cargo's default for release)",
            path.display()
        )]));
    }
    let anchor = *address.get("hotpatch_host_exports_v1").ok_or_else(|| {
        SourceError::Refused(vec![format!(
            "{} does not link hotpatch (no hotpatch_host_exports_v1)",
            path.display()
        )])
    })?;
    Ok(Host {
        exported,
        address,
        tls,
        anchor,
    })
}

/// Files of the change, classified: the refusals they cause, and notes.
fn classify_files(
    ws: &Workspace,
    files: &[String],
    in_base: &dyn Fn(&str) -> bool,
) -> (Vec<String>, Vec<String>, bool) {
    let mut refusals = Vec::new();
    let mut notes = Vec::new();
    let mut ignored: Vec<&str> = Vec::new();
    let mut code = false;
    let lib_dir = ws.lib_src.parent().map(Path::to_owned).unwrap_or_default();
    for f in files {
        let p = Path::new(f);
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name == "Cargo.lock" && !in_base(f) {
            // Not committed: the base builds with this one too (see the
            // checkout), and --binary proves it is the deployed build's.
            // (The checkout's note says it.)
            continue;
        }
        if name == "Cargo.toml" || name == "Cargo.lock" {
            refusals.push(format!(
                "{f} changed: dependencies, features and versions are part of the running build; a patch changes code only, so revert {f} for the patch (ship the change in a release)"
            ));
            continue;
        }
        if name == "build.rs"
            || name.starts_with("rust-toolchain")
            || f.starts_with(".cargo/")
            || f.contains("/.cargo/")
        {
            refusals.push(format!(
                "{f} changed: the build script, toolchain and cargo configuration make the running build; a patch cannot change them, so revert {f} for the patch"
            ));
            continue;
        }
        if ws.bins.iter().any(|(_, src)| src == p) || p.starts_with(ws.package_dir.join("src/bin"))
        {
            refusals.push(format!(
                "{f} changed: it is the service's binary crate, whose code a patch does not replace; move the code into the library crate (src/lib.rs), where #[patchable] functions live"
            ));
            continue;
        }
        if p.starts_with(&lib_dir) && p.extension().is_some_and(|e| e == "rs") {
            code = true;
            continue;
        }
        // Another package of the workspace?
        let owner = ws
            .members
            .iter()
            .filter(|(dir, _)| !dir.as_os_str().is_empty() && p.starts_with(dir))
            .max_by_key(|(dir, _)| dir.components().count());
        match owner {
            Some((dir, pkg))
                if pkg != &ws.package
                    && p.extension().is_some_and(|e| e == "rs")
                    && p.starts_with(dir.join("src")) =>
            {
                refusals.push(format!(
                    "{f} changed: it is in package {pkg}, and a patch made from source replaces code of {}'s library only; keep the fix in {} or ship it in a release",
                    ws.package, ws.package
                ));
            }
            _ => ignored.push(f.as_str()),
        }
    }
    match ignored.as_slice() {
        [] => {}
        [one] => notes.push(format!(
            "{one} changed (not code of the running binary: ignored)"
        )),
        many => notes.push(format!(
            "{} other files changed (not code of the running binary: ignored): {}{}",
            many.len(),
            many.iter().take(5).copied().collect::<Vec<_>>().join(", "),
            if many.len() > 5 { ", ..." } else { "" }
        )),
    }
    (refusals, notes, code)
}

/// Builds the patch. `progress` gets one line per step.
///
/// # Errors
///
/// [`SourceError`]: a usage error (a revision that does not exist), a
/// failed cargo or git, the refusals (one line each), no change, I/O, or
/// the link's errors. Nothing is written on an error but the checkouts
/// and builds under `target/hotpatch/`.
///
/// # Examples
///
/// ```no_run
/// use cargo_hotpatch::source::{SourceError, SourceOptions, build};
///
/// let opts = SourceOptions {
///     package: Some("my-service".into()),
///     base: "v1.4.2".into(),
///     binary: Some("/srv/my-service/bin/my-service".into()),
///     output: Some("fix.so".into()),
///     flags: cargo_hotpatch::CargoFlags {
///         release: true,
///         ..Default::default()
///     },
///     ..SourceOptions::default()
/// };
/// match build(&opts, &mut |step| eprintln!("{step}")) {
///     Ok(report) => {
///         for f in &report.replaced {
///             println!("replaced {}", f.path);
///         }
///     }
///     Err(SourceError::Refused(reasons)) => reasons.iter().for_each(|r| eprintln!("refused: {r}")),
///     Err(e) => eprintln!("{e}"),
/// }
/// ```
pub fn build(
    opts: &SourceOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<SourceReport, SourceError> {
    let ws = workspace(opts)?;
    let repo = PathBuf::from(
        git(&ws.root, &["rev-parse", "--show-toplevel"]).map_err(|_| {
            SourceError::Usage(format!(
                "{} is not in a git repository: --base names a git revision of the deployed build",
                ws.root.display()
            ))
        })?,
    );
    let ws_in_repo = ws
        .root
        .strip_prefix(&repo)
        .map(Path::to_owned)
        .unwrap_or_default();
    let base_commit = commit_of(&repo, &opts.base)?;
    let head_commit = match &opts.head {
        Some(h) => Some(commit_of(&repo, h)?),
        None => None,
    };
    // Before builds that may take minutes: the deployed binary is an ELF
    // executable with a build-id, a symbol table and hotpatch linked in.
    // Read once: its bytes, build-id and symbols serve the checks below.
    let deployed = match &opts.binary {
        Some(b) => {
            if !b.is_file() {
                return Err(SourceError::Io(format!(
                    "{}: no such file (--binary)",
                    b.display()
                )));
            }
            let data = crate::elf::read(b).map_err(SourceError::Link)?;
            let id = crate::elf::parse(b, &data)
                .and_then(|f| crate::elf::build_id_of(b, &f))
                .map_err(SourceError::Link)?;
            let host = host_symbols(b, &data)?;
            Some((b, data, id, host))
        }
        None => None,
    };

    // What changed, by file.
    let mut files: BTreeSet<String> = BTreeSet::new();
    let rel = ws_in_repo.to_string_lossy().into_owned();
    let pathspec = if rel.is_empty() { "." } else { rel.as_str() };
    let diff = match &head_commit {
        Some(h) => git(
            &repo,
            &["diff", "--name-only", &base_commit, h, "--", pathspec],
        )?,
        None => {
            // The working tree: tracked changes, and new files.
            let tracked = git(
                &repo,
                &["diff", "--name-only", &base_commit, "--", pathspec],
            )?;
            let new = git(
                &repo,
                &["ls-files", "--others", "--exclude-standard", "--", pathspec],
            )?;
            format!("{tracked}\n{new}")
        }
    };
    let target_rel = ws
        .target_dir
        .strip_prefix(&ws.root)
        .ok()
        .map(Path::to_owned);
    for line in diff.lines().filter(|l| !l.trim().is_empty()) {
        let p = Path::new(line.trim());
        let p = p.strip_prefix(&ws_in_repo).unwrap_or(p);
        if target_rel
            .as_ref()
            .is_some_and(|t| !t.as_os_str().is_empty() && p.starts_with(t))
        {
            continue;
        }
        files.insert(p.to_string_lossy().into_owned());
    }
    let head_name = match &opts.head {
        Some(h) => format!(
            "{h} ({})",
            &head_commit.as_deref().unwrap_or("")
                [..12.min(head_commit.as_ref().map_or(0, String::len))]
        ),
        None => "the working tree".to_owned(),
    };
    let base_name = format!("{} ({})", opts.base, &base_commit[..12]);
    let files: Vec<String> = files.into_iter().collect();
    let in_commit = |commit: &str, f: &str| {
        let spec = format!("{commit}:{}", ws_in_repo.join(f).display());
        Command::new("git")
            .arg("-C")
            .arg(&repo)
            .args(["cat-file", "-e", &spec])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let in_base = |f: &str| in_commit(&base_commit, f);
    let (mut refusals, mut notes, code) = classify_files(&ws, &files, &in_base);
    if files.is_empty() {
        return Err(SourceError::NoChange(format!(
            "{head_name} is the same as the base {base_name}: nothing to patch"
        )));
    }
    if !code && refusals.is_empty() {
        return Err(SourceError::NoChange(format!(
            "no code of {}'s library changed between {base_name} and {head_name} ({})",
            ws.package,
            files.join(", ")
        )));
    }
    if !refusals.is_empty() {
        return Err(SourceError::Refused(refusals));
    }

    let hot = ws.target_dir.join("hotpatch");
    // Named by the workspace too: the paths are remapped to it, and cargo
    // does not see that in its fingerprints.
    let root_tag = {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        ws.root.hash(&mut h);
        format!("{:08x}", h.finish() as u32)
    };
    // A checkout lives in the target directory, unless a path dependency
    // leads out of the repository (`path = "../hp/hotpatch"`): then it is
    // a sibling of the repository, where the same relative paths lead to
    // the same crates.
    let checkouts = if paths_leave(&repo, &ws) {
        // Each checkout is a sibling itself: one level deeper, `../x`
        // would not lead where it leads from the repository.
        repo.parent()
            .map(Path::to_owned)
            .unwrap_or_else(|| repo.clone())
    } else {
        hot.join("checkouts")
    };
    let sibling = checkouts != hot.join("checkouts");
    let checkout_dir = |side: &str, commit: &str| {
        if sibling {
            let name = repo
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            checkouts.join(format!(
                ".{name}.hotpatch-{side}-{}-{root_tag}",
                &commit[..12]
            ))
        } else {
            checkouts.join(format!("{side}-{}-{root_tag}", &commit[..12]))
        }
    };
    if sibling {
        notes.push(format!(
            "a path dependency leads out of the repository: the checkouts are beside it in {} (.{}.hotpatch-*), where its relative paths lead to the same crates",
            checkouts.display(),
            repo.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
        ));
    }
    let base_dir = checkout_dir("base", &base_commit);
    progress(&format!(
        "checking out the base {base_name} into {}",
        base_dir.display()
    ));
    checkout(&repo, &base_commit, &base_dir)?;
    let inside = |d: &Path| {
        if ws_in_repo.as_os_str().is_empty() {
            d.to_owned()
        } else {
            d.join(&ws_in_repo)
        }
    };
    let base_ws = inside(&base_dir);
    let head_ws = match &head_commit {
        Some(h) => {
            let d = checkout_dir("head", h);
            progress(&format!(
                "checking out the head {head_name} into {}",
                d.display()
            ));
            checkout(&repo, h, &d)?;
            inside(&d)
        }
        None => ws.root.clone(),
    };

    // The source: what a patch cannot carry is refused before any build.
    let crate_dir = |root: &Path| root.join(&ws.package_dir);
    let parse = |root: &Path, what: &str| {
        crate::syntax::parse_crate(&crate_dir(root), &root.join(&ws.lib_src))
            .map(|c| c.with_crate_name(&ws.lib_name))
            .map_err(|e| {
                SourceError::Refused(vec![format!("the {what}'s source does not parse: {e}")])
            })
    };
    let base_src = parse(&base_ws, "base")?;
    let head_src = parse(&head_ws, "head")?;
    let pkg_prefix = if ws.package_dir.as_os_str().is_empty() {
        String::new()
    } else {
        format!("{}/", ws.package_dir.display())
    };
    for finding in crate::syntax::compare(&base_src, &head_src) {
        let line = format!("{pkg_prefix}{finding}");
        if finding.refuses() {
            refusals.push(line);
        } else {
            notes.push(line);
        }
    }
    if !refusals.is_empty() {
        return Err(SourceError::Refused(refusals));
    }

    // A revision without a committed Cargo.lock builds with the
    // workspace's (the deployed build's lock is checked by --binary).
    // Decided by the commit, not the checkout, which keeps the copy of an
    // earlier run: every run says so, and uses the workspace's lock as it
    // is now.
    let sides = [
        Some((&base_ws, base_commit.as_str(), &base_name)),
        head_commit.as_deref().map(|c| (&head_ws, c, &head_name)),
    ];
    for (dir, commit, name) in sides.into_iter().flatten() {
        let ours = ws.root.join("Cargo.lock");
        if !in_commit(commit, "Cargo.lock") && ours.exists() {
            let lock = dir.join("Cargo.lock");
            std::fs::copy(&ours, &lock).map_err(io(lock.display()))?;
            notes.push(format!(
                "{name} has no committed Cargo.lock: built with the workspace's (commit Cargo.lock so that the base is the deployed build)"
            ));
        }
    }
    progress(&format!("building the base {base_name} (1 of 2)"));
    let base = cargo_build(&ws, opts, &base_ws, &hot.join("base"), Some(&ws.root))?;
    progress(&format!("building the head, {head_name} (2 of 2)"));
    let remap_head = opts.head.is_some().then_some(ws.root.as_path());
    let head = cargo_build(&ws, opts, &head_ws, &hot.join("head"), remap_head)?;

    // The base binary, and the deployed one.
    let base_bin = pick_bin(&ws, opts, &base.bins)?;
    let base_bin_data = std::fs::read(&base_bin).map_err(io(base_bin.display()))?;
    let host_path = opts.binary.clone().unwrap_or_else(|| base_bin.clone());
    let host = match deployed {
        Some((deployed, data, deployed_id, host)) => {
            let ours = code_identity(&base_bin_data)
                .map_err(|e| SourceError::Io(format!("{}: {e}", base_bin.display())))?;
            let theirs = code_identity(&data)
                .map_err(|e| SourceError::Io(format!("{}: {e}", deployed.display())))?;
            if ours != theirs {
                let base_id = crate::elf::parse(&base_bin, &base_bin_data)
                    .and_then(|f| crate::elf::build_id_of(&base_bin, &f))
                    .map(|b| crate::hex(&b))
                    .unwrap_or_else(|_| "none".into());
                return Err(SourceError::Refused(vec![format!(
                    "{} (build-id {}) is not what {base_name} builds here (build-id {base_id}): another toolchain, Cargo.lock, profile, features or flags made it; build the patch where and as the deployed binary was built, or name the revision it was built from",
                    deployed.display(),
                    crate::hex(&deployed_id),
                )]));
            }
            host
        }
        None => host_symbols(&base_bin, &base_bin_data)?,
    };

    // Compare.
    let base_rlib = std::fs::read(&base.rlib).map_err(io(base.rlib.display()))?;
    let head_rlib = std::fs::read(&head.rlib).map_err(io(head.rlib.display()))?;
    // The library's own objects, borrowed from the rlibs' bytes.
    let base_refs = crate::link::own_objects(&base.rlib, &base_rlib).map_err(SourceError::Link)?;
    let head_refs = crate::link::own_objects(&head.rlib, &head_rlib).map_err(SourceError::Link)?;
    let b = Build::read(&base_refs)
        .map_err(|e| SourceError::Io(format!("{}: {e}", base.rlib.display())))?;
    let h = Build::read(&head_refs)
        .map_err(|e| SourceError::Io(format!("{}: {e}", head.rlib.display())))?;

    let head_entries: HashMap<String, EntryInfo> = entries(&h)
        .into_iter()
        .map(|e| (e.original.clone(), e))
        .collect();
    let base_entries: HashMap<String, EntryInfo> = entries(&b)
        .into_iter()
        .map(|e| (e.entry.clone(), e))
        .collect();

    let describe = |n: &str| user_path(&demangle(n));
    // A registry entry's function, as the service registers its path.
    let entry_path = |entry: &str| {
        base_entries
            .get(entry)
            .map(|e| e.path.clone())
            .unwrap_or_else(|| describe(entry))
    };
    let mut changed: BTreeSet<String> = BTreeSet::new();
    for (name, &hu) in h.functions() {
        if let Some(&bu) = b.by_name.get(name)
            && b.is_code(bu)
            && b.hash(bu) != h.hash(hu)
        {
            changed.insert(name.clone());
        }
    }
    // Changed data: statics, and the registry's entries (a signature).
    for (name, &hu) in &h.by_name {
        if h.is_code(hu) {
            continue;
        }
        let Some(&bu) = b.by_name.get(name) else {
            continue;
        };
        if b.hash(bu) == h.hash(hu) {
            continue;
        }
        if name.contains("__HOTPATCH_ENTRY_") {
            let path = entry_path(name);
            refusals.push(format!(
                "the signature of #[patchable] {path} changed: the running callers pass the old arguments; keep the signature (add a new function for the new one) or ship it in a release"
            ));
        } else if (name.starts_with("_ZN") || name.starts_with("_R"))
            && !objects::is_callsite_static(name)
        {
            refusals.push(format!(
                "static {} changed its initial value or type: the running process keeps the old one; a patch cannot change data",
                describe(name)
            ));
        }
    }
    for (name, &bu) in &b.by_name {
        if !b.is_code(bu) && name.contains("__HOTPATCH_ENTRY_") && !h.by_name.contains_key(name) {
            let path = entry_path(name);
            refusals.push(format!(
                "#[patchable] {path} was removed or is no longer patchable: the running code calls it; keep it for the patch"
            ));
        }
    }

    // Classify the changed functions.
    let mut replaced: Vec<(String, EntryInfo)> = Vec::new();
    let mut others: BTreeSet<String> = BTreeSet::new();
    for name in &changed {
        if let Some(e) = head_entries.get(name) {
            replaced.push((name.clone(), e.clone()));
        } else if is_generated(name) {
            // Generated code changes with the signature, refused above.
        } else {
            others.insert(name.clone());
        }
    }
    let replaced_names: HashSet<String> = replaced.iter().map(|(n, _)| n.clone()).collect();
    let referrers = b.referrers();
    let exported_from_crate = |n: &str| -> bool {
        b.by_name.get(n).is_some_and(|u| {
            let file = &b.objects[u.0];
            file.symbols().any(|s| {
                s.section_index() == Some(u.1)
                    && s.address() == 0
                    && s.name() == Ok(n)
                    && s.is_global()
                    && matches!(s.flags(), object::SymbolFlags::Elf { st_other, .. } if st_other & 3 == 0)
            })
        })
    };
    // Every function of the base that reaches a changed non-patchable one
    // must run the new code: a #[patchable] caller is replaced (even if its
    // own code did not change: the head's calls the new helper), any other
    // caller is included in turn, up to patchable functions. What cannot be
    // (a public function, a function pointer or vtable) refuses the change.
    let local_only = |name: &str| {
        let d = demangle(name);
        d.contains("{{closure}}") || d.contains("__hotpatch_original_")
    };
    // A `pub` function that is generic or `#[inline]` has copies in the
    // crates that use it (the binary's among them), which a release build
    // compiles without an exported symbol to see: the source says so.
    let copied_elsewhere = |name: &str| head_src.is_copied_into_users(&demangle(name));
    let mut included: BTreeSet<String> = others.clone();
    let mut forced: BTreeSet<String> = BTreeSet::new();
    let mut blocked: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut pulled_by: HashMap<String, String> = HashMap::new();
    let mut queue: Vec<String> = others.iter().cloned().collect();
    while let Some(name) = queue.pop() {
        if !local_only(&name) {
            let why = if copied_elsewhere(&name) {
                Some(
                    "is public and generic or #[inline]: the crates that use it (the binary's too) compile their own copies",
                )
            } else if exported_from_crate(&name) {
                Some("is public: the binary crate or other crates may call or inline it")
            } else {
                None
            };
            if let Some(why) = why {
                blocked
                    .entry(name.clone())
                    .or_default()
                    .insert(format!("{} {why}", describe(&name)));
            }
        }
        for c in referrers.get(&name).cloned().unwrap_or_default() {
            if replaced_names.contains(&c)
                || forced.contains(&c)
                || included.contains(&c)
                || is_generated(&c)
            {
                continue;
            }
            if head_entries.contains_key(&c) {
                forced.insert(c);
            } else if b.by_name.get(&c).is_some_and(|u| !b.is_code(*u)) {
                blocked
                    .entry(name.clone())
                    .or_default()
                    .insert(format!("a function pointer or vtable ({})", describe(&c)));
            } else {
                included.insert(c.clone());
                pulled_by.insert(c.clone(), name.clone());
                queue.push(c);
            }
        }
    }
    if !blocked.is_empty() {
        // Each changed function whose callers, transitively, cannot all be
        // patched, with what blocks it.
        for name in &others {
            let mut reasons: BTreeSet<String> = BTreeSet::new();
            let mut callers: BTreeSet<String> = BTreeSet::new();
            for (b_name, why) in &blocked {
                // Does `b_name` reach `name` (through pulled-in callers)?
                let mut n = b_name.clone();
                let mut reaches = n == *name;
                while !reaches {
                    match pulled_by.get(&n) {
                        Some(next) => {
                            n = next.clone();
                            reaches = n == *name;
                        }
                        None => break,
                    }
                }
                if reaches {
                    reasons.extend(why.iter().cloned());
                    if b_name != name {
                        callers.insert(describe(b_name));
                    }
                }
            }
            if reasons.is_empty() {
                continue;
            }
            let at = head_src
                .locate(&demangle(name))
                .map(|l| format!(" ({pkg_prefix}{l})"))
                .unwrap_or_default();
            let via = if callers.is_empty() {
                String::new()
            } else {
                format!(
                    " through its unpatched caller{} {}",
                    if callers.len() == 1 { "" } else { "s" },
                    callers.iter().cloned().collect::<Vec<_>>().join(", ")
                )
            };
            refusals.push(format!(
                "{}{at} changed, but it is not #[patchable] and code the patch cannot replace reaches it{via}: {}; the old version would keep running there. Make it (or its callers) #[patchable] in the next release, or leave it unchanged for the patch",
                describe(name),
                reasons.into_iter().collect::<Vec<_>>().join("; ")
            ));
        }
    }
    for name in &forced {
        if let Some(e) = head_entries.get(name) {
            replaced.push((name.clone(), e.clone()));
        }
    }
    if !refusals.is_empty() {
        refusals.sort();
        refusals.dedup();
        return Err(SourceError::Refused(refusals));
    }
    if replaced.is_empty() && included.is_empty() {
        return Err(SourceError::NoChange(format!(
            "{base_name} and {head_name} compile to the same code ({} changed, but not what the binary runs)",
            files.join(", ")
        )));
    }

    // Extract.
    let mut roots: HashSet<UnitId> = HashSet::new();
    let mut records = Vec::new();
    for (name, e) in &replaced {
        let u = h.by_name[name];
        roots.insert(u);
        let (Some(getter), Some(layouts)) = (&e.getter, e.layouts) else {
            return Err(SourceError::Io(format!(
                "the head's registry entry of {} is incomplete",
                e.path
            )));
        };
        // The body under the patch's panic counter (the patch's copy of
        // `__hotpatch_counted_*` counts on the patch's own counter).
        let Some(counted) = e.counted.as_ref().and_then(|c| h.by_name.get(c)) else {
            return Err(SourceError::Io(format!(
                "the head build has no counted body of {} (a hotpatch older than this tool?)",
                e.path
            )));
        };
        roots.insert(*counted);
        records.push(Record {
            replacement: *counted,
            getter: getter.clone(),
            path: e.path.clone(),
            layouts,
            layouts_len: e.layouts_len,
        });
    }
    for name in &included {
        roots.insert(h.by_name[name]);
    }
    let extracted =
        extract::extract(&h, &host, &roots, &records, &describe).map_err(SourceError::Refused)?;

    // The manifest, from the head's own hotpatch crate.
    let hotpatch_rlib = head.hotpatch_rlib.clone().ok_or_else(|| {
        SourceError::Tool(format!(
            "the head build of {} did not build the hotpatch crate",
            ws.package
        ))
    })?;
    let out = crate::cargo::output_path(
        opts.output.as_deref(),
        &ws.target_dir,
        &format!("{}-source-patch.so", ws.lib_name),
    )
    .map_err(SourceError::Io)?;
    let shell = manifest_object(&hot, &hotpatch_rlib, &ws, &opts.base, &head_name, &replaced)?;
    let report =
        crate::link::link_objects(vec![extracted.object, shell], &head.rlib, &host_path, &out)
            .map_err(SourceError::Link)?;

    if extracted.private_refs > 0 {
        notes.push(format!(
            "{} private functions and statics of the service are reached through cells the loader fills",
            extracted.private_refs
        ));
    }
    let _ = &ws.lib_name;
    let locate = |path: &str| head_src.locate(path).map(|l| format!("{pkg_prefix}{l}"));
    let mut replaced_items: Vec<Item> = replaced
        .iter()
        .map(|(_, e)| Item {
            path: e.path.clone(),
            location: locate(&e.path),
        })
        .collect();
    replaced_items.sort_by(|a, b| a.path.cmp(&b.path));
    let own = |path: &str| {
        let p = path
            .trim_start_matches(['<', '&', '*'])
            .trim_start_matches("mut ");
        p.starts_with(&format!("{}::", ws.lib_name))
    };
    let mut foreign: BTreeSet<String> = BTreeSet::new();
    let mut included_items: Vec<Item> = Vec::new();
    // A closure goes with the function it is written in, when that one is
    // in the patch too (a `tracing` event's closure, an iterator's).
    let listed: HashSet<String> = replaced_items
        .iter()
        .map(|i| i.path.clone())
        .chain(included.iter().map(|n| describe(n)))
        .collect();
    let part_of_listed = |path: &str| {
        path.split_once("::{{closure}}")
            .is_some_and(|(parent, _)| listed.contains(parent))
    };
    for n in included.iter().chain(extracted.new_functions.iter()) {
        let path = describe(n);
        if part_of_listed(&path) {
            continue;
        }
        if own(&path) {
            included_items.push(Item {
                location: locate(&demangle(n)),
                path,
            });
        } else {
            foreign.insert(path);
        }
    }
    if !foreign.is_empty() {
        notes.push(format!(
            "{} function{} of other crates compiled into the patch (inline or generic code the new code is the first to use): {}",
            foreign.len(),
            if foreign.len() == 1 { "" } else { "s" },
            foreign.into_iter().collect::<Vec<_>>().join(", ")
        ));
    }
    included_items.sort_by(|a, b| a.path.cmp(&b.path));
    included_items.dedup();
    Ok(SourceReport {
        replaced: replaced_items,
        included: included_items,
        notes,
        base: base_name,
        head: head_name,
        output: report.output,
        size: report.size,
        build_id: report.host_build_id,
    })
}

fn pick_bin(
    ws: &Workspace,
    opts: &SourceOptions,
    bins: &[PathBuf],
) -> Result<PathBuf, SourceError> {
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
        [] => Err(SourceError::Refused(vec![format!(
            "package {} has no binary: a patch is bound to the service's executable",
            ws.package
        )])),
        _ => Err(SourceError::Usage(format!(
            "package {} has several binaries ({}): name the deployed one with --bin",
            ws.package,
            bins.iter()
                .filter_map(|b| b.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Compiles the patch's manifest (`hotpatch::manifest!()`) against the
/// head's own hotpatch crate, and returns its object.
fn manifest_object(
    hot: &Path,
    hotpatch_rlib: &Path,
    ws: &Workspace,
    base: &str,
    head: &str,
    replaced: &[(String, EntryInfo)],
) -> Result<Vec<u8>, SourceError> {
    let dir = hot.join("manifest");
    std::fs::create_dir_all(&dir).map_err(io(dir.display()))?;
    let names: Vec<&str> = replaced.iter().map(|(_, e)| e.path.as_str()).collect();
    let description = format!(
        "{} from source: {base} -> {head}: {}",
        ws.package,
        names.join(", ")
    );
    // The version names the base and the head: `v1.4.2+3f2a1c09e6b1`,
    // `v1.4.2+working-tree`.
    let head_tag = head
        .split_once('(')
        .and_then(|(_, c)| c.strip_suffix(')'))
        .map(str::to_owned)
        .unwrap_or_else(|| "working-tree".to_owned());
    let src = format!(
        "hotpatch::manifest!(name = {:?}, version = {:?}, description = {:?});\n\
         /// What the copied `__hotpatch_counted_*` bodies count on (their\n\
         /// references to `hotpatch::__private::SOURCE_PANICS` read it).\n\
         #[unsafe(no_mangle)]\n\
         pub static {}: &::core::sync::atomic::AtomicU64 = &__HOTPATCH_PANICS;\n",
        format!("{}-source-patch", ws.package),
        format!("{base}+{head_tag}"),
        description,
        extract::PANICS_CELL
    );
    let src_path = dir.join("manifest.rs");
    std::fs::write(&src_path, src).map_err(io(src_path.display()))?;
    let obj = dir.join("manifest.o");
    let deps = hotpatch_rlib.parent().unwrap_or(Path::new("."));
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let mut extern_arg = OsString::from("hotpatch=");
    extern_arg.push(hotpatch_rlib);
    let mut dep_arg = OsString::from("dependency=");
    dep_arg.push(deps);
    let out = Command::new(rustc)
        .current_dir(&ws.root)
        .args([
            "--edition",
            "2021",
            "--crate-type",
            "rlib",
            "--crate-name",
            "hotpatch_source_manifest",
            "--emit=obj",
            "-C",
            "codegen-units=1",
            "-C",
            "metadata=hotpatch-source-manifest",
        ])
        .arg("--extern")
        .arg(extern_arg)
        .arg("-L")
        .arg(dep_arg)
        .arg("-o")
        .arg(&obj)
        .arg(&src_path)
        .output()
        .map_err(io("running rustc"))?;
    if !out.status.success() {
        return Err(SourceError::Tool(format!(
            "compiling the patch's manifest failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    std::fs::read(&obj).map_err(io(obj.display()))
}
