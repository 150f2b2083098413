//! The `RUSTC_WRAPPER` every build of a checkout runs through: it remaps
//! the checkout's paths, and its target directory's (where `OUT_DIR` is),
//! to the workspace's own (`--remap-path-prefix`), so the base builds bit
//! for bit what the workspace builds, debug info included. cargo puts a
//! workspace wrapper in the crates' metadata hash, and so in every symbol
//! name: every build of a side goes through it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::workspace::Workspace;
use crate::BuildError;
use crate::error::io;

/// The environment variable that makes `cargo-hotpatch` act as rustc's
/// wrapper: `FROM=TO` pairs for `--remap-path-prefix`, one a line.
const REMAP_ENV: &str = "__CARGO_HOTPATCH_REMAP";
/// The wrapper the user had, which the remapping wrapper runs in turn.
const INNER_WRAPPER_ENV: &str = "__CARGO_HOTPATCH_INNER_WRAPPER";
/// Set when the executables' objects are kept (`-C save-temps`): the
/// library's generic and inline code compiled into the binary crate is
/// compared from them.
const KEEP_BIN_OBJECTS_ENV: &str = "__CARGO_HOTPATCH_KEEP_BIN_OBJECTS";
/// Set when each library of the workspace is compiled a second time with
/// full debug information, into [`TYPES_DIR`] beside its rlib: the type
/// information `coroutine` reads (the deployed build's code would not be
/// the same with it).
const TYPES_BUILD_ENV: &str = "__CARGO_HOTPATCH_TYPES_BUILD";
/// The directory, beside a library's rlib, of its type information build.
pub(super) const TYPES_DIR: &str = "hotpatch-types";
/// The directory, beside an executable compiled without debug info, of
/// its line tables build: the executable's own crate compiled a second
/// time with `-C debuginfo=line-tables-only`, its objects kept
/// ([`bin_lines_objects`]). The deployed build cannot have line tables
/// there: rustc would add a mapped `.debug_gdb_scripts` section, and a
/// load of it in `main`. `compare::binary_crate` takes a unit's lines from
/// it only where its code is the kept objects' own.
pub(super) const LINES_DIR: &str = "hotpatch-lines";

/// Makes `cmd` (a `cargo build` of the checkout `dir` into `target_dir`)
/// run rustc through this program, remapping `dir` to `remap_to` and
/// `target_dir` to the workspace's target directory.
pub(super) fn wrap(
    cmd: &mut Command,
    ws: &Workspace,
    dir: &Path,
    target_dir: &Path,
    remap_to: Option<&Path>,
    types: bool,
) -> Result<(), BuildError> {
    // The checkout's paths become the workspace's; and this build's
    // target directory becomes the workspace's, so code a build script
    // generates into OUT_DIR (`include!`, as prost and tonic do) names the
    // file where the deployed build had it, in panic locations and
    // `file!()`.
    let me = std::env::current_exe().map_err(io("finding cargo-hotpatch's own path"))?;
    if let Some(inner) = std::env::var_os("RUSTC_WRAPPER") {
        cmd.env(INNER_WRAPPER_ENV, inner);
    }
    cmd.env("RUSTC_WRAPPER", me);
    cmd.env(KEEP_BIN_OBJECTS_ENV, "1");
    if types {
        cmd.env(TYPES_BUILD_ENV, "1");
    }
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
    Ok(())
}

/// What the remapping wrapper gives rustc, as far as it decides the bytes
/// of a build: cargo's fingerprints do not see it, so a target directory
/// built under another scheme (an older cargo-hotpatch) is rebuilt whole.
/// Changed whenever the wrapper's flags change.
pub(super) const WRAPPER_SCHEME: &str = "cargo-hotpatch wrapper 7: source and target directory remapped, executables' objects kept, line tables, executables' line tables builds, libraries' and executables' type information builds";

/// One target directory serves every checkout of a side (dependencies are
/// compiled once), but the workspace's own crates have the same names in
/// every checkout, so cargo would take the last checkout's build for this
/// one's. When `dir` is not the checkout built there last, their
/// fingerprints are removed and they are rebuilt. A target directory built
/// under another [`WRAPPER_SCHEME`] is removed.
pub(super) fn forget_other_checkout(
    ws: &Workspace,
    dir: &Path,
    target_dir: &Path,
) -> Result<(), BuildError> {
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

/// When cargo-hotpatch runs as the remapping wrapper (cargo-hotpatch set
/// the environment for a build of a checkout), runs rustc as it was asked
/// to (`args[1]` is rustc) and returns its exit code; else `None`.
pub(crate) fn run_if_asked(args: &[OsString]) -> Option<i32> {
    (std::env::var_os(REMAP_ENV).is_some() && args.len() > 1).then(|| run(args))
}

fn run(args: &[OsString]) -> i32 {
    let remap = std::env::var_os(REMAP_ENV).unwrap_or_default();
    let (program, rest) = match std::env::var_os(INNER_WRAPPER_ENV) {
        Some(inner) if !inner.is_empty() => (inner, &args[1..]),
        _ => (args[1].clone(), &args[2..]),
    };
    let remap = remap.to_string_lossy().into_owned();
    // rustc splits FROM=TO at the last `=`.
    let pairs: Vec<(&str, &str)> = remap.lines().filter_map(|l| l.rsplit_once('=')).collect();
    let command = |rest: &[OsString]| {
        let mut cmd = Command::new(&program);
        cmd.args(rest);
        if args.iter().any(|a| a == "--crate-name") {
            for (from, to) in &pairs {
                cmd.arg(format!("--remap-path-prefix={from}={to}"));
            }
        }
        cmd.env_remove(REMAP_ENV);
        cmd.env_remove(KEEP_BIN_OBJECTS_ENV);
        cmd.env_remove(TYPES_BUILD_ENV);
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
        cmd
    };
    let mut cmd = command(rest);
    let kept_bin =
        std::env::var_os(KEEP_BIN_OBJECTS_ENV).is_some() && keep_bin_objects(args, &mut cmd);
    let library = is_workspace_library(rest);
    if library {
        add_line_tables(rest, &mut cmd);
    }
    let code = match cmd.status() {
        Ok(s) => s.code().unwrap_or(101),
        Err(e) => {
            eprintln!("cargo-hotpatch (as rustc wrapper): {e}");
            101
        }
    };
    let types_build = std::env::var_os(TYPES_BUILD_ENV).is_some();
    if kept_bin && !types_build {
        // An earlier compile's line tables build is not this one's: gone
        // before this one is made (or not made).
        if let (Some(name), Some(dir)) =
            (value_of(rest, "--crate-name"), value_of(rest, "--out-dir"))
        {
            remove_kept_objects(rest, &name, &Path::new(&dir).join(LINES_DIR));
        }
        if code == 0
            && !has_debuginfo(rest)
            && let Some(lines) = side_args(
                rest,
                LINES_DIR,
                &["-C", "debuginfo=line-tables-only", "-C", "save-temps"],
            )
        {
            // As the type information build: its messages and artifact
            // notices are the first compile's again, which cargo alone
            // reads. A failure leaves no objects there, and the
            // executable's crate is then not described (strict).
            let mut cmd = command(&lines);
            cmd.stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
            if let Some(dir) = value_of(&lines, "--out-dir") {
                let _ = std::fs::create_dir_all(dir);
            }
            let _ = cmd.status();
        }
    }
    if code == 0
        && (library || kept_bin)
        && types_build
        && let Some(mut types) = types_args(rest)
    {
        // Its messages and artifact notices are the first compile's
        // again: cargo reads only those. A failure leaves no rlib there,
        // which `coroutine` reports as no type information. An
        // executable's is linked there too, its objects kept, as the
        // first's ([`bin_types_objects`]).
        if kept_bin {
            if let (Some(name), Some(dir)) = (
                value_of(rest, "--crate-name"),
                value_of(&types, "--out-dir"),
            ) {
                remove_kept_objects(rest, &name, Path::new(&dir));
            }
            types.extend(["-C".into(), "save-temps".into()]);
        }
        let mut cmd = command(&types);
        cmd.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if let Some(dir) = value_of(&types, "--out-dir") {
            let _ = std::fs::create_dir_all(dir);
        }
        let _ = cmd.status();
    }
    code
}

/// The value of `flag` in rustc's arguments (`--flag VALUE` or
/// `--flag=VALUE`).
fn value_of(args: &[OsString], flag: &str) -> Option<String> {
    let eq = format!("{flag}=");
    args.iter().enumerate().find_map(|(i, a)| {
        let a = a.to_string_lossy();
        if a == flag {
            args.get(i + 1).map(|v| v.to_string_lossy().into_owned())
        } else {
            a.strip_prefix(&eq).map(str::to_owned)
        }
    })
}

/// The arguments of a library's type information build: the same compile
/// with full debug information (`-C debuginfo=2`, last, so it wins), its
/// outputs in [`TYPES_DIR`] under the first's `--out-dir`, and without
/// incremental compilation (the first's cache is the first's). `None`
/// without an `--out-dir` (not a compile cargo asked for).
fn types_args(args: &[OsString]) -> Option<Vec<OsString>> {
    side_args(args, TYPES_DIR, &["-C", "debuginfo=2"])
}

/// The arguments of a second compile of the same crate: its outputs in
/// `dir` under the first's `--out-dir`, without incremental compilation,
/// and `extra` last (so that it wins). `None` without an `--out-dir`.
fn side_args(args: &[OsString], dir: &str, extra: &[&str]) -> Option<Vec<OsString>> {
    let out_dir = value_of(args, "--out-dir")?;
    let types = Path::new(&out_dir).join(dir);
    let mut out: Vec<OsString> = Vec::with_capacity(args.len() + extra.len());
    let mut skip = false;
    for (i, a) in args.iter().enumerate() {
        if std::mem::take(&mut skip) {
            continue;
        }
        let text = a.to_string_lossy();
        if text == "--out-dir" {
            out.push(a.clone());
            out.push(types.clone().into_os_string());
            skip = true;
        } else if text.starts_with("--out-dir=") {
            out.push(format!("--out-dir={}", types.display()).into());
        } else if text.starts_with("-Cincremental=") {
        } else if text == "-C"
            && args
                .get(i + 1)
                .is_some_and(|v| v.to_string_lossy().starts_with("incremental="))
        {
            skip = true;
        } else {
            out.push(a.clone());
        }
    }
    out.extend(extra.iter().map(OsString::from));
    Some(out)
}

/// The type information build of the library whose rlib is `rlib`, if
/// the wrapper made one (see [`TYPES_DIR`]). `rlib` is where cargo put
/// it: in `deps/` (`libNAME-HASH.rlib`), or the copy cargo makes of a
/// workspace member's in the profile's directory (`libNAME.rlib`), whose
/// bytes are those of one `deps/libNAME-HASH.rlib`.
pub(super) fn types_rlib(rlib: &Path) -> Option<PathBuf> {
    let (dir, file) = (rlib.parent()?, rlib.file_name()?);
    let beside = dir.join(TYPES_DIR).join(file);
    if beside.is_file() {
        return Some(beside);
    }
    let stem = file.to_str()?.strip_suffix(".rlib")?;
    let deps = dir.join("deps");
    let bytes = std::fs::read(rlib).ok()?;
    std::fs::read_dir(&deps).ok()?.flatten().find_map(|e| {
        let name = e.file_name().to_str()?.to_owned();
        let hash = name
            .strip_prefix(stem)?
            .strip_prefix('-')?
            .strip_suffix(".rlib")?;
        let types = deps.join(TYPES_DIR).join(&name);
        (!hash.contains('-')
            && types.is_file()
            && std::fs::read(e.path()).is_ok_and(|b| b == bytes))
        .then_some(types)
    })
}

/// Whether rustc compiles a library of the workspace: cargo names its
/// root file by a relative path (dependencies' by absolute ones).
fn is_workspace_library(args: &[OsString]) -> bool {
    let is_ours = args.iter().any(|a| {
        let p = Path::new(a);
        p.extension().is_some_and(|e| e == "rs")
            && p.is_relative()
            && !a.to_string_lossy().starts_with('-')
    });
    // Libraries only: rustc gives an executable with debug info a
    // `.debug_gdb_scripts` section the process maps, and a load of it in
    // `main`, which the deployed build does not have.
    let types: Vec<String> = args
        .windows(2)
        .filter(|w| w[0] == "--crate-type")
        .map(|w| w[1].to_string_lossy().into_owned())
        .collect();
    let library = !types.is_empty() && types.iter().all(|t| t == "lib" || t == "rlib");
    is_ours && library && args.iter().any(|a| a == "--crate-name")
}

/// For a library of the workspace compiled without debug info, asks
/// for line tables (`-C debuginfo=line-tables-only`): sections no process
/// maps, which `lines` reads to tell which source each function's code
/// came from. The code is the same (`identity` compares the base with the
/// deployed binary, section by mapped section). Full debug information
/// would not leave it the same (rustc optimises differently with it: the
/// executable of mini-redis 0.4.1 differs in `.text` when its library has
/// `-C debuginfo=2`), so the types `coroutine` reads come from a second
/// compile ([`types_args`]). A profile with debug info of its own keeps it.
fn add_line_tables(args: &[OsString], cmd: &mut Command) {
    if !has_debuginfo(args) {
        cmd.args(["-C", "debuginfo=line-tables-only"]);
    }
}

/// Whether rustc's arguments ask for debug info (line tables at least):
/// the last `-C debuginfo=` or `-g` decides.
fn has_debuginfo(args: &[OsString]) -> bool {
    let mut has_debuginfo = false;
    for (i, a) in args.iter().enumerate() {
        let a = a.to_string_lossy();
        let value = match a.strip_prefix("-C") {
            Some("") => args
                .get(i + 1)
                .map(|v| v.to_string_lossy().into_owned())
                .unwrap_or_default(),
            Some(v) => v.to_owned(),
            None if a == "-g" => "debuginfo=2".to_owned(),
            None => continue,
        };
        if let Some(level) = value.strip_prefix("debuginfo=") {
            has_debuginfo = !matches!(level, "0" | "none" | "false" | "n" | "no" | "off");
        }
    }
    has_debuginfo
}

/// For an executable of the workspace (not a build script), keeps its
/// codegen units' objects beside it (`-C save-temps`, which leaves the
/// executable's bytes as they are: `--binary` proves it), after removing
/// those of an earlier build, so that what is there is this build's.
fn keep_bin_objects(args: &[OsString], cmd: &mut Command) -> bool {
    let is_bin = args
        .windows(2)
        .any(|w| w[0] == "--crate-type" && w[1] == "bin");
    let (Some(name), Some(out_dir)) = (value_of(args, "--crate-name"), value_of(args, "--out-dir"))
    else {
        return false;
    };
    if !is_bin || name.starts_with("build_script_") {
        return false;
    }
    remove_kept_objects(args, &name, Path::new(&out_dir));
    cmd.args(["-C", "save-temps"]);
    true
}

/// Removes the objects an earlier compile of crate `name` (with these
/// `args`) kept in `dir`: a compile with fewer codegen units would leave
/// some behind.
fn remove_kept_objects(args: &[OsString], name: &str, dir: &Path) {
    let extra = args
        .iter()
        .find_map(|a| a.to_str()?.strip_prefix("extra-filename="))
        .unwrap_or("");
    let stem = format!("{name}{extra}.");
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let file = e.file_name().to_string_lossy().into_owned();
            if file.starts_with(&stem) && (file.ends_with(".o") || file.ends_with(".bc")) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// The objects of the type information build of the executable `exe`
/// (see [`TYPES_DIR`]): `deps/hotpatch-types/NAME-HASH.*.rcgu.o` for the
/// `deps/NAME-HASH` that `exe` was copied or linked from. Empty if the
/// wrapper made none.
pub(super) fn bin_types_objects(exe: &Path) -> Vec<PathBuf> {
    side_objects(exe, TYPES_DIR)
}

/// The objects of the line tables build of the executable `exe` (see
/// [`LINES_DIR`]): `deps/hotpatch-lines/NAME-HASH.*.rcgu.o` for the
/// `deps/NAME-HASH` that `exe` was copied or linked from. Empty if the
/// wrapper made none (the profile has debug info of its own, or that
/// compile failed).
pub(super) fn bin_lines_objects(exe: &Path) -> Vec<PathBuf> {
    side_objects(exe, LINES_DIR)
}

/// The objects of a second compile of the executable `exe`'s crate,
/// kept in `deps/DIR/`.
fn side_objects(exe: &Path, dir: &str) -> Vec<PathBuf> {
    let files = bin_files(exe);
    let Some(hashed) = files.first() else {
        return Vec::new();
    };
    let (Some(deps), Some(name)) = (hashed.parent(), hashed.file_name()) else {
        return Vec::new();
    };
    let types = deps.join(dir);
    let prefix = format!("{}.", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(&types) else {
        return Vec::new();
    };
    let mut objects: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|f| f.starts_with(&prefix) && f.ends_with(".rcgu.o"))
        .map(|f| types.join(f))
        .collect();
    objects.sort();
    objects
}

/// The objects of the executable `exe` that a build through the wrapper
/// kept: `deps/NAME-HASH.*.rcgu.o` beside the `deps/NAME-HASH` that `exe`
/// was copied or linked from.
pub(super) fn bin_objects(exe: &Path) -> Vec<PathBuf> {
    bin_files(exe)
        .into_iter()
        .filter(|f| f.to_string_lossy().ends_with(".rcgu.o"))
        .collect()
}

/// The files [`bin_objects`] reads for `exe`: the hashed executable in
/// `deps/` whose bytes are `exe`'s, then its kept objects.
pub(super) fn bin_files(exe: &Path) -> Vec<PathBuf> {
    let (Some(dir), Some(name)) = (exe.parent(), exe.file_name()) else {
        return Vec::new();
    };
    let crate_name = name.to_string_lossy().replace('-', "_");
    let deps = dir.join("deps");
    let Ok(exe_bytes) = std::fs::read(exe) else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(&deps) else {
        return Vec::new();
    };
    let files: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    // The hashed executable whose bytes are `exe`'s.
    let Some(hashed) = files.iter().find(|f| {
        f.strip_prefix(&crate_name)
            .and_then(|r| r.strip_prefix('-'))
            .is_some_and(|h| !h.contains('.') && !h.is_empty())
            && std::fs::read(deps.join(f)).is_ok_and(|b| b == exe_bytes)
    }) else {
        return Vec::new();
    };
    let prefix = format!("{hashed}.");
    let mut objects: Vec<PathBuf> = files
        .iter()
        .filter(|f| f.starts_with(&prefix) && f.ends_with(".rcgu.o"))
        .map(|f| deps.join(f))
        .collect();
    objects.sort();
    objects.insert(0, deps.join(hashed));
    objects
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;

    use super::{
        LINES_DIR, TYPES_DIR, has_debuginfo, is_workspace_library, side_args, types_args,
        types_rlib,
    };

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    /// The type information build of a library is the same compile, with
    /// full debug information, outputs of its own and no incremental cache:
    /// cargo's files (the rlib `sides` reads, the cache) stay the first
    /// compile's.
    #[test]
    fn a_library_s_types_build_writes_elsewhere_with_full_debug_info() {
        let lib = args(&[
            "--crate-name",
            "svc",
            "--edition=2021",
            "src/lib.rs",
            "--crate-type",
            "lib",
            "--emit=dep-info,metadata,link",
            "-C",
            "opt-level=3",
            "-C",
            "incremental=/t/release/incremental",
            "-Cincremental=/t/other",
            "-C",
            "debuginfo=line-tables-only",
            "--out-dir",
            "/t/release/deps",
            "-C",
            "extra-filename=-abc",
        ]);
        assert!(is_workspace_library(&lib));
        let types = types_args(&lib).unwrap();
        let text: Vec<String> = types
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let dir = format!("/t/release/deps/{TYPES_DIR}");
        assert_eq!(
            text,
            [
                "--crate-name",
                "svc",
                "--edition=2021",
                "src/lib.rs",
                "--crate-type",
                "lib",
                "--emit=dep-info,metadata,link",
                "-C",
                "opt-level=3",
                "-C",
                "debuginfo=line-tables-only",
                "--out-dir",
                dir.as_str(),
                "-C",
                "extra-filename=-abc",
                "-C",
                "debuginfo=2",
            ]
        );
        let eq = args(&["--crate-name", "svc", "--out-dir=/t/deps", "src/lib.rs"]);
        let types = types_args(&eq).unwrap();
        assert!(types.contains(&OsString::from(format!("--out-dir=/t/deps/{TYPES_DIR}"))));
        // Not a compile cargo asked for: no output directory, no build.
        assert!(types_args(&args(&["--crate-name", "svc", "src/lib.rs"])).is_none());
        // A dependency (absolute root file) and an executable get none.
        let dep = args(&[
            "--crate-name",
            "dep",
            "/reg/dep/src/lib.rs",
            "--crate-type",
            "lib",
        ]);
        assert!(!is_workspace_library(&dep));
        let bin = args(&["--crate-name", "svc", "src/main.rs", "--crate-type", "bin"]);
        assert!(!is_workspace_library(&bin));
    }

    /// The line tables build of an executable is the same compile with
    /// line tables, its objects kept, outputs of its own and no
    /// incremental cache; a profile with debug info of its own needs none.
    #[test]
    fn an_executable_s_lines_build_writes_elsewhere_with_line_tables() {
        let bin = args(&[
            "--crate-name",
            "svc",
            "src/main.rs",
            "--crate-type",
            "bin",
            "-C",
            "opt-level=3",
            "-C",
            "incremental=/t/release/incremental",
            "--out-dir",
            "/t/release/deps",
        ]);
        assert!(!has_debuginfo(&bin));
        let lines = side_args(
            &bin,
            LINES_DIR,
            &["-C", "debuginfo=line-tables-only", "-C", "save-temps"],
        )
        .unwrap();
        let text: Vec<String> = lines
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let dir = format!("/t/release/deps/{LINES_DIR}");
        assert_eq!(
            text,
            [
                "--crate-name",
                "svc",
                "src/main.rs",
                "--crate-type",
                "bin",
                "-C",
                "opt-level=3",
                "--out-dir",
                dir.as_str(),
                "-C",
                "debuginfo=line-tables-only",
                "-C",
                "save-temps",
            ]
        );
        for (flags, has) in [
            (&["-C", "debuginfo=2"][..], true),
            (&["-Cdebuginfo=line-tables-only"][..], true),
            (&["-g"][..], true),
            (&["-C", "debuginfo=2", "-C", "debuginfo=0"][..], false),
            (&["-C", "strip=debuginfo"][..], false),
        ] {
            let mut with = bin.clone();
            with.extend(args(flags));
            assert_eq!(has_debuginfo(&with), has, "{flags:?}");
        }
    }

    /// cargo names a workspace member's rlib by its copy in the profile's
    /// directory: its types build is the one of the `deps/` rlib with the
    /// same bytes, not of another build's.
    #[test]
    fn the_types_build_of_a_copied_rlib_is_its_deps_original_s() {
        let dir = std::env::temp_dir().join(format!("cargo-hotpatch-types-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let types = dir.join("deps").join(TYPES_DIR);
        std::fs::create_dir_all(&types).unwrap();
        let write = |p: std::path::PathBuf, b: &[u8]| std::fs::write(p, b).unwrap();
        write(dir.join("libsvc.rlib"), b"this build");
        write(dir.join("deps/libsvc-aaa.rlib"), b"another build");
        write(dir.join("deps/libsvc-bbb.rlib"), b"this build");
        write(types.join("libsvc-aaa.rlib"), b"types a");
        write(types.join("libsvc-bbb.rlib"), b"types b");
        assert_eq!(
            types_rlib(&dir.join("libsvc.rlib")),
            Some(types.join("libsvc-bbb.rlib"))
        );
        assert_eq!(
            types_rlib(&dir.join("deps/libsvc-aaa.rlib")),
            Some(types.join("libsvc-aaa.rlib"))
        );
        std::fs::remove_file(types.join("libsvc-bbb.rlib")).unwrap();
        assert_eq!(types_rlib(&dir.join("libsvc.rlib")), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
