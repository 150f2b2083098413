//! Step 6: the base and the head built as deployed (the same toolchain,
//! `Cargo.lock` with `--locked`, profile, features and remapped paths).
//!
//! Both sides build in one target directory, `target/hotpatch/build`:
//! the dependencies are the same crates with the same flags, so they are
//! compiled once for both (a plain `cargo build` compiles them once too).
//! The workspace's own crates have the same file names on both sides, so
//! what the comparison needs of the base (its rlib and the rlib's type
//! information build, its executables and the objects the wrapper kept)
//! is copied out before the head builds,
//! into `target/hotpatch/bases/KEY/`. KEY covers everything that decides
//! those bytes (the base commit, the flags, the toolchain, the lock, the
//! environment cargo and rustc read): a later run with the same base
//! reuses them and builds only the head.

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
    /// The libraries of the workspace's other packages that the build
    /// made (package name, rlib): a package between the service library and
    /// the executable compiles its own copies of the service's generics.
    pub others: Vec<(String, PathBuf)>,
    /// The rlib of the `hotpatch` crate (for the manifest).
    pub hotpatch_rlib: Option<PathBuf>,
    /// The service library compiled again with full debug information
    /// (`wrapper::types_rlib`): the async state machines' layouts that
    /// `coroutine` compares; `None` if that compile failed.
    pub types_rlib: Option<PathBuf>,
}

/// The tool's hold on `target/hotpatch/`: one run at a time builds there
/// and reads what it built (another run would build its own head over
/// this one's, or forget its fingerprints). Released when dropped.
pub(super) struct BuildLock {
    _file: std::fs::File,
}

impl BuildLock {
    /// Waits for the lock of `hot` (saying so through `progress` when
    /// another run holds it).
    fn take(hot: &Path, progress: &mut dyn FnMut(&str)) -> Result<BuildLock, BuildError> {
        use std::os::fd::AsRawFd;
        std::fs::create_dir_all(hot).map_err(io(hot.display()))?;
        let path = hot.join(".lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io(path.display()))?;
        // SAFETY: `flock` on a descriptor this function owns; no memory
        // is passed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            progress(&format!(
                "waiting for another cargo hotpatch build to finish with {}",
                hot.display()
            ));
            // SAFETY: as above; blocks until the other run's descriptor
            // is closed.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
                return Err(BuildError::Io(format!(
                    "{}: cannot lock: {}",
                    path.display(),
                    std::io::Error::last_os_error()
                )));
            }
        }
        Ok(BuildLock { _file: file })
    }
}

/// Builds the base, then the head, under the target directory's lock,
/// which the caller holds until it has read what was built. `notes` gets
/// a line per side built with the workspace's `Cargo.lock`.
pub(super) fn build_both(
    ws: &Workspace,
    opts: &SourceOptions,
    revs: &Revisions,
    trees: &Trees,
    progress: &mut dyn FnMut(&str),
    notes: &mut Vec<String>,
) -> Result<(Artifacts, Artifacts, BuildLock), BuildError> {
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
    let lock = BuildLock::take(&hot, progress)?;
    forget_old_layout(&hot)?;
    let build_dir = hot.join("build");
    let key = base_key(ws, opts, revs, &trees.base);
    let kept = hot.join("bases").join(&key);
    let base = match Artifacts::kept(&kept) {
        Some(base) => {
            progress(&format!(
                "the base {} was built before: reusing {}",
                revs.base_name,
                kept.display()
            ));
            base
        }
        None => {
            progress(&format!("building the base {} (1 of 2)", revs.base_name));
            let built = cargo_build(ws, opts, &trees.base, &build_dir, Some(&ws.root), false)?;
            built.keep(&kept)?
        }
    };
    progress(&format!("building the head, {} (2 of 2)", revs.head_name));
    let remap_head = opts.head.is_some().then_some(ws.root.as_path());
    let head = cargo_build(ws, opts, &trees.head, &build_dir, remap_head, false)?;
    Ok((base, head, lock))
}

/// The name of the file that says a kept base is complete: written last.
const KEPT_MARKER: &str = "complete";

impl Artifacts {
    /// A base kept by an earlier run in `dir`, if it is complete.
    fn kept(dir: &Path) -> Option<Artifacts> {
        let listing = std::fs::read_to_string(dir.join(KEPT_MARKER)).ok()?;
        let mut rlib = None;
        let mut bins = Vec::new();
        let mut others = Vec::new();
        let mut types_rlib = None;
        for line in listing.lines() {
            match line.split_once(' ') {
                Some(("rlib", f)) => rlib = Some(dir.join(f)),
                Some(("types", f)) => types_rlib = Some(dir.join("types").join(f)),
                Some(("bin", f)) => bins.push(dir.join("bin").join(f)),
                Some(("other", rest)) => {
                    let (name, f) = rest.split_once(' ')?;
                    others.push((name.to_owned(), dir.join("others").join(f)));
                }
                _ => return None,
            }
        }
        let rlib = rlib?;
        let complete = rlib.is_file()
            && bins.iter().all(|b| b.is_file())
            && others.iter().all(|(_, r)| r.is_file())
            && types_rlib.as_ref().is_none_or(|t| t.is_file());
        complete.then_some(Artifacts {
            rlib,
            bins,
            others,
            hotpatch_rlib: None,
            types_rlib,
        })
    }

    /// Copies what the comparison needs of a base build into `dir` (the
    /// rlib; each executable with the objects the wrapper kept, and those
    /// of its line tables build, in the layout `wrapper::bin_objects` and
    /// `wrapper::bin_lines_objects` read) and returns it there.
    fn keep(&self, dir: &Path) -> Result<Artifacts, BuildError> {
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(io(dir.display()))?;
        }
        let deps = dir.join("bin").join("deps");
        std::fs::create_dir_all(&deps).map_err(io(deps.display()))?;
        let copy = |from: &Path, to: &Path| -> Result<(), BuildError> {
            std::fs::copy(from, to).map(drop).map_err(io(format!(
                "copying {} to {}",
                from.display(),
                to.display()
            )))
        };
        let name = |p: &Path| {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        let mut listing = String::new();
        let rlib = dir.join(name(&self.rlib));
        copy(&self.rlib, &rlib)?;
        listing.push_str(&format!("rlib {}\n", name(&self.rlib)));
        let mut types_rlib = None;
        if let Some(t) = &self.types_rlib {
            let types = dir.join("types");
            std::fs::create_dir_all(&types).map_err(io(types.display()))?;
            let to = types.join(name(t));
            copy(t, &to)?;
            listing.push_str(&format!("types {}\n", name(t)));
            types_rlib = Some(to);
        }
        let mut bins = Vec::new();
        for exe in &self.bins {
            let to = dir.join("bin").join(name(exe));
            copy(exe, &to)?;
            for file in wrapper::bin_files(exe) {
                copy(&file, &deps.join(name(&file)))?;
            }
            for (dir, objects) in [
                (wrapper::TYPES_DIR, wrapper::bin_types_objects(exe)),
                (wrapper::LINES_DIR, wrapper::bin_lines_objects(exe)),
            ] {
                if objects.is_empty() {
                    continue;
                }
                let to = deps.join(dir);
                std::fs::create_dir_all(&to).map_err(io(to.display()))?;
                for file in objects {
                    copy(&file, &to.join(name(&file)))?;
                }
            }
            listing.push_str(&format!("bin {}\n", name(exe)));
            bins.push(to);
        }
        let mut others = Vec::new();
        if !self.others.is_empty() {
            let dest = dir.join("others");
            std::fs::create_dir_all(&dest).map_err(io(dest.display()))?;
            for (package, r) in &self.others {
                let to = dest.join(name(r));
                copy(r, &to)?;
                listing.push_str(&format!("other {package} {}\n", name(r)));
                others.push((package.clone(), to));
            }
        }
        let marker = dir.join(KEPT_MARKER);
        std::fs::write(&marker, listing).map_err(io(marker.display()))?;
        Ok(Artifacts {
            rlib,
            bins,
            others,
            hotpatch_rlib: None,
            types_rlib,
        })
    }
}

/// What decides the bytes of the base's build, hashed: the wrapper's
/// scheme and this tool's version, the base commit and its checkout, the
/// packages and flags, the toolchain (`rustc -vV`, run where the base's
/// `rust-toolchain` file applies), the base's `Cargo.lock`, the files of
/// path dependencies outside the workspace (names, sizes, times), the
/// user's cargo configuration, and every variable of the environment that
/// cargo or rustc reads (`CARGO_*`, `RUST*`).
fn base_key(ws: &Workspace, opts: &SourceOptions, revs: &Revisions, base: &Path) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    wrapper::WRAPPER_SCHEME.hash(&mut h);
    "kept base 5: rlib, executables with their objects and their line tables builds' objects, the other libraries, the type information builds of the rlib, the executable and the other libraries".hash(&mut h);
    env!("CARGO_PKG_VERSION").hash(&mut h);
    revs.base_commit.hash(&mut h);
    base.hash(&mut h);
    ws.root.hash(&mut h);
    ws.package.hash(&mut h);
    ws.host_package.hash(&mut h);
    opts.flags.args().hash(&mut h);
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let version = Command::new(rustc)
        .arg("-vV")
        .current_dir(base)
        .output()
        .map(|o| o.stdout)
        .unwrap_or_default();
    version.hash(&mut h);
    std::fs::read(base.join("Cargo.lock"))
        .unwrap_or_default()
        .hash(&mut h);
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")));
    // Path dependencies outside the workspace: every file's name, size and
    // modification time (their content is no commit's).
    match &ws.outside {
        Some(dirs) => {
            for dir in dirs {
                dir.hash(&mut h);
                let mut files = Vec::new();
                list_files(dir, &mut files);
                files.sort();
                files.hash(&mut h);
            }
        }
        // Unknown: a key no later run has (the base is built each time).
        None => std::time::SystemTime::now().hash(&mut h),
    }
    if let Some(home) = home {
        for config in ["config.toml", "config"] {
            std::fs::read(home.join(config))
                .unwrap_or_default()
                .hash(&mut h);
        }
    }
    let mut vars: Vec<(String, String)> = std::env::vars_os()
        .map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.to_string_lossy().into_owned(),
            )
        })
        .filter(|(k, _)| {
            (k.starts_with("CARGO") || k.starts_with("RUST")) && !k.starts_with("CARGO_HOTPATCH_")
        })
        .collect();
    vars.sort();
    vars.hash(&mut h);
    format!(
        "{}-{:016x}",
        &revs.base_commit[..12.min(revs.base_commit.len())],
        h.finish()
    )
}

/// Every file under `dir` (not `target/` or `.git/`) with its size and
/// modification time, into `out`.
fn list_files(dir: &Path, out: &mut Vec<(PathBuf, u64, i128)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let Ok(meta) = e.metadata() else { continue };
        if meta.is_dir() {
            let name = e.file_name();
            if name != "target" && name != ".git" {
                list_files(&path, out);
            }
        } else {
            let mtime = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos() as i128);
            out.push((path, meta.len(), mtime));
        }
    }
}

/// Removes the target directories of the earlier layout (one per side,
/// `target/hotpatch/base` and `target/hotpatch/head`, each with every
/// dependency compiled again): only directories this tool made (they
/// carry the wrapper's marker file).
fn forget_old_layout(hot: &Path) -> Result<(), BuildError> {
    for side in ["base", "head"] {
        let dir = hot.join(side);
        if dir.join(".cargo-hotpatch-source").is_file() {
            std::fs::remove_dir_all(&dir).map_err(io(dir.display()))?;
        }
    }
    Ok(())
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
    types: bool,
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
    wrapper::wrap(&mut cmd, ws, dir, target_dir, remap_to, types)?;
    let artifacts = crate::cargo::build(cmd)
        .map_err(cargo_failed(format!("`cargo build` of {}", dir.display())))?;
    let mut rlib = None;
    let mut bins = Vec::new();
    let mut others = Vec::new();
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
        } else if a.is_lib
            && let Some((_, name)) = ws.members.iter().find(|(_, name)| of(pkg, name))
            && let Some(r) = a.rlib()
        {
            others.push((name.clone(), r.to_owned()));
        }
    }
    let (rlib, types_rlib) = match rlib {
        Some(rlib) => {
            let types = wrapper::types_rlib(&rlib);
            (rlib, types)
        }
        None if ws.lib_src.is_none() => {
            let empty = no_library(target_dir)?;
            (empty.clone(), Some(empty))
        }
        None => {
            return Err(BuildError::Tool(format!(
                "cargo built no rlib for {}",
                ws.package
            )));
        }
    };
    Ok(Artifacts {
        types_rlib,
        rlib,
        bins,
        others,
        hotpatch_rlib,
    })
}

/// The library of a package that has none (only an executable): an empty
/// archive, written once in `target_dir`, so that the library's side of
/// the comparison has no objects and every function is the executable's
/// crate's.
fn no_library(target_dir: &Path) -> Result<PathBuf, BuildError> {
    let path = target_dir.join("no-library.rlib");
    if !path.is_file() {
        std::fs::create_dir_all(target_dir).map_err(io(target_dir.display()))?;
        // The archive magic and no member: an archive with nothing in it.
        std::fs::write(&path, b"!<arch>\n").map_err(io(path.display()))?;
    }
    Ok(path)
}

/// The type-information builds (`coroutine`) of the base and the head:
/// each library of the workspace and the executable's own crate compiled
/// again with full debug information (`wrapper`'s types build), in a
/// target directory of their own (`target/hotpatch/types`), made only
/// when a hook needs them: the base's kept with the kept base.
pub(super) struct TypeBuilds {
    /// The service library's, base and head.
    pub lib: (PathBuf, PathBuf),
    /// The objects of the executable's own crate, base and head (empty if
    /// none were made).
    pub bin: (Vec<PathBuf>, Vec<PathBuf>),
    /// The libraries of the workspace's other packages, base and head
    /// (package, rlib): those whose types build was made.
    pub others: (PackageRlibs, PackageRlibs),
}

/// Libraries by package: `(package, rlib)` each.
pub(super) type PackageRlibs = Vec<(String, PathBuf)>;

impl TypeBuilds {
    /// The type information build of package `package`'s library, base
    /// and head, if both were made.
    pub fn other(&self, package: &str) -> Option<(&Path, &Path)> {
        fn find<'a>(side: &'a [(String, PathBuf)], package: &str) -> Option<&'a Path> {
            side.iter()
                .find(|(p, _)| p == package)
                .map(|(_, r)| r.as_path())
        }
        Some((
            find(&self.others.0, package)?,
            find(&self.others.1, package)?,
        ))
    }
}

/// The type information builds of the other libraries a build made
/// (`wrapper::types_rlib`), by package.
fn other_types(built: &Artifacts) -> Vec<(String, PathBuf)> {
    built
        .others
        .iter()
        .filter_map(|(p, r)| Some((p.clone(), wrapper::types_rlib(r)?)))
        .collect()
}

/// Builds (or finds kept) the type-information builds of both sides, for
/// the executable named `exe_name`. Run under the build lock.
pub(super) fn type_builds(
    ws: &Workspace,
    opts: &SourceOptions,
    revs: &Revisions,
    trees: &Trees,
    exe_name: &std::ffi::OsStr,
    progress: &mut dyn FnMut(&str),
) -> Result<TypeBuilds, BuildError> {
    let hot = ws.target_dir.join("hotpatch");
    let types_dir = hot.join("types");
    let kept = hot
        .join("bases")
        .join(base_key(ws, opts, revs, &trees.base))
        .join("type-information");
    let marker = kept.join(KEPT_MARKER);
    let exe_of = |a: &Artifacts| {
        a.bins
            .iter()
            .find(|b| b.file_name() == Some(exe_name))
            .cloned()
    };
    let listing = std::fs::read_to_string(&marker).ok();
    let (base_lib, base_bin, base_others) = match listing {
        Some(listing) => {
            let mut lib = None;
            let mut bin = Vec::new();
            let mut others = Vec::new();
            for line in listing.lines() {
                match line.split_once(' ') {
                    Some(("lib", f)) => lib = Some(kept.join(f)),
                    Some(("bin", f)) => bin.push(kept.join(f)),
                    Some(("other", rest)) => {
                        if let Some((package, f)) = rest.split_once(' ') {
                            others.push((package.to_owned(), kept.join("others").join(f)));
                        }
                    }
                    _ => {}
                }
            }
            let lib = lib.ok_or_else(|| {
                BuildError::Tool(format!("{}: no library listed", marker.display()))
            })?;
            progress(&format!(
                "the base {}'s type information was built before: reusing {}",
                revs.base_name,
                kept.display()
            ));
            (lib, bin, others)
        }
        None => {
            progress(&format!(
                "building the base {} with type information, for the async state machines a hook must keep",
                revs.base_name
            ));
            let built = cargo_build(ws, opts, &trees.base, &types_dir, Some(&ws.root), true)?;
            let lib = built.types_rlib.clone().ok_or_else(|| {
                BuildError::Tool(format!(
                    "the type-information build of {} made no library",
                    revs.base_name
                ))
            })?;
            let objects = exe_of(&built)
                .map(|e| wrapper::bin_types_objects(&e))
                .unwrap_or_default();
            if kept.exists() {
                std::fs::remove_dir_all(&kept).map_err(io(kept.display()))?;
            }
            std::fs::create_dir_all(&kept).map_err(io(kept.display()))?;
            let name = |p: &Path| {
                p.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            };
            let mut listing = String::new();
            let to = kept.join(name(&lib));
            std::fs::copy(&lib, &to).map_err(io(to.display()))?;
            listing.push_str(&format!("lib {}\n", name(&lib)));
            let mut bin = Vec::new();
            for o in objects {
                let to = kept.join(name(&o));
                std::fs::copy(&o, &to).map_err(io(to.display()))?;
                listing.push_str(&format!("bin {}\n", name(&o)));
                bin.push(to);
            }
            let mut others = Vec::new();
            for (package, r) in other_types(&built) {
                let dir = kept.join("others");
                std::fs::create_dir_all(&dir).map_err(io(dir.display()))?;
                let to = dir.join(name(&r));
                std::fs::copy(&r, &to).map_err(io(to.display()))?;
                listing.push_str(&format!("other {package} {}\n", name(&r)));
                others.push((package, to));
            }
            std::fs::write(&marker, listing).map_err(io(marker.display()))?;
            (kept.join(name(&lib)), bin, others)
        }
    };
    progress(&format!(
        "building the head, {}, with type information",
        revs.head_name
    ));
    let remap_head = opts.head.is_some().then_some(ws.root.as_path());
    let built = cargo_build(ws, opts, &trees.head, &types_dir, remap_head, true)?;
    let head_lib = built.types_rlib.clone().ok_or_else(|| {
        BuildError::Tool(format!(
            "the type-information build of {} made no library",
            revs.head_name
        ))
    })?;
    let head_bin = exe_of(&built)
        .map(|e| wrapper::bin_types_objects(&e))
        .unwrap_or_default();
    Ok(TypeBuilds {
        lib: (base_lib, head_lib),
        bin: (base_bin, head_bin),
        others: (base_others, other_types(&built)),
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
