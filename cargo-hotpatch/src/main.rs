//! `cargo hotpatch`: builds a thin patch with cargo and links it against
//! the service binary it is for. See the crate docs of `cargo_hotpatch`.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{Command, ExitCode};

use cargo_hotpatch::Error;
use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "cargo-hotpatch",
    bin_name = "cargo hotpatch",
    version,
    about = "Builds thin hotpatch patches: the patch crate's own code, bound to the running service binary",
    after_help = cargo_hotpatch::EXIT_CODES
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Build a patch crate (an rlib with `hotpatch::manifest!()`) and link
    /// its own code into a shared object bound to the service binary.
    ///
    /// Build the patch in the same selection you built the service with
    /// (the same `-p`/`--workspace`, features and profile): symbol names
    /// hash each crate's resolved features, which cargo unifies over the
    /// packages selected in one build, so another selection can give the
    /// service's crates other names than the binary has.
    #[command(after_help = cargo_hotpatch::EXIT_CODES)]
    Build(BuildArgs),
}

#[derive(Debug, Args)]
struct BuildArgs {
    /// Make the patch from the service's own source: the git revision
    /// (tag, branch, commit) the deployed binary was built from. The new
    /// code is the working tree, or --head. `-p` then names the service.
    #[arg(long, value_name = "REV")]
    base: Option<String>,

    /// With --base: the revision holding the fix [default: the working
    /// tree, uncommitted changes included].
    #[arg(long, value_name = "REV", requires = "base")]
    head: Option<String>,

    /// With --base: the service's binary target, if the package has
    /// several [default: the one named like --binary, or the only one].
    #[arg(long, value_name = "NAME", requires = "base")]
    bin: Option<String>,

    /// The patch package first (with --base: the service package); any
    /// further `-p` are built with it, to get the same feature resolution
    /// as the service build: build the patch in the same selection you
    /// built the service with.
    #[arg(short = 'p', long = "package", value_name = "SPEC")]
    packages: Vec<String>,

    /// Build the whole workspace with the patch (if the service was built
    /// with `--workspace`): build the patch in the same selection you
    /// built the service with.
    #[arg(long)]
    workspace: bool,

    /// The service binary the patch is for (linked with `-rdynamic`).
    /// With --base it is optional: the deployed binary, which must be what
    /// the base revision builds; the patch is bound to it [default: the
    /// rebuilt base's binary].
    #[arg(long, value_name = "PATH")]
    binary: Option<PathBuf>,

    /// Build with the release profile (as the service was).
    #[arg(long, conflicts_with = "profile")]
    release: bool,

    /// Build with this profile (as the service was).
    #[arg(long, value_name = "NAME")]
    profile: Option<String>,

    /// Features to activate, as for `cargo build` (as the service was).
    #[arg(short = 'F', long, value_name = "FEATURES")]
    features: Vec<String>,

    /// Activate all features, as for `cargo build`.
    #[arg(long)]
    all_features: bool,

    /// Do not activate the default features, as for `cargo build`.
    #[arg(long)]
    no_default_features: bool,

    /// Where to write the patch [default: TARGET_DIR/hotpatch/CRATE.so].
    #[arg(short = 'o', long = "output", value_name = "PATH")]
    output: Option<PathBuf>,

    /// Path to Cargo.toml, as for `cargo build`.
    #[arg(long, value_name = "PATH")]
    manifest_path: Option<PathBuf>,
}

/// A failure of the command, with its exit code.
#[derive(Debug)]
enum Failure {
    CargoFailed(String),
    Usage(String),
    Refused(String),
    Io(String),
    /// Refused, one reason per line.
    RefusedAll(Vec<String>),
    NoChange(String),
}

impl BuildArgs {
    /// The profile and feature flags, as every `cargo build` is given them.
    fn flags(&self) -> cargo_hotpatch::CargoFlags {
        cargo_hotpatch::CargoFlags {
            release: self.release,
            profile: self.profile.clone(),
            features: self.features.clone(),
            all_features: self.all_features,
            no_default_features: self.no_default_features,
        }
    }
}

impl Failure {
    fn code(&self) -> u8 {
        match self {
            Failure::CargoFailed(_) => 1,
            Failure::Usage(_) => 2,
            Failure::Refused(_) | Failure::RefusedAll(_) => 3,
            Failure::Io(_) => 4,
            Failure::NoChange(_) => 5,
        }
    }

    fn message(&self) -> String {
        match self {
            Failure::CargoFailed(m) | Failure::Usage(m) | Failure::Refused(m) | Failure::Io(m) => {
                m.clone()
            }
            Failure::RefusedAll(lines) => lines.join("; "),
            Failure::NoChange(m) => format!("no change: {m}"),
        }
    }
}

impl From<cargo_hotpatch::source::SourceError> for Failure {
    fn from(e: cargo_hotpatch::source::SourceError) -> Failure {
        use cargo_hotpatch::source::SourceError as E;
        match e {
            E::Usage(m) => Failure::Usage(m),
            E::Tool(m) => Failure::CargoFailed(m),
            E::Refused(lines) => Failure::RefusedAll(lines),
            E::NoChange(m) => Failure::NoChange(m),
            E::Io(m) => Failure::Io(m),
            E::Link(e) => Failure::from(e),
        }
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        if e.is_refusal() {
            Failure::Refused(e.to_string())
        } else {
            Failure::Io(e.to_string())
        }
    }
}

fn main() -> ExitCode {
    let mut args: Vec<OsString> = std::env::args_os().collect();
    // `cargo hotpatch build --base` builds the base with this program as
    // rustc's wrapper (to remap the checkout's paths to the workspace's).
    if std::env::var_os(cargo_hotpatch::source::REMAP_ENV).is_some() && args.len() > 1 {
        let code = cargo_hotpatch::source::run_as_rustc_wrapper(&args);
        return ExitCode::from(u8::try_from(code).unwrap_or(101));
    }
    // Run as `cargo hotpatch ...`, cargo passes "hotpatch" as argv[1].
    if args.get(1).is_some_and(|a| a == "hotpatch") {
        args.remove(1);
    }
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help, --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // clap's message up to its usage lines, as one line.
            let text = e.render().to_string();
            let what: Vec<&str> = text
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            let what = what.join(" ");
            let what = what.strip_prefix("error: ").unwrap_or(&what);
            eprintln!("cargo-hotpatch: {what} (see `cargo hotpatch build --help`)");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Cmd::Build(args) => build(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::RefusedAll(lines)) => {
            for line in &lines {
                eprintln!("refused: {}", line.replace('\n', "; "));
            }
            eprintln!(
                "cargo-hotpatch: refused ({} reason{}); no patch was written",
                lines.len(),
                if lines.len() == 1 { "" } else { "s" }
            );
            ExitCode::from(3)
        }
        Err(failure) => {
            let one_line = failure.message().replace('\n', "; ");
            eprintln!("cargo-hotpatch: {one_line}");
            ExitCode::from(failure.code())
        }
    }
}

fn build(args: &BuildArgs) -> Result<(), Failure> {
    if let Some(base) = &args.base {
        return build_from_source(args, base);
    }
    let binary = args.binary.clone().ok_or_else(|| {
        Failure::Usage(
            "--binary PATH is required: the service binary the patch is for (or --base REV to make the patch from the service's source)".into(),
        )
    })?;
    if args.packages.is_empty() {
        return Err(Failure::Usage(
            "-p PATCH_PACKAGE is required (or --base REV to make the patch from the service's source)".into(),
        ));
    }
    // Before a build that may take minutes: the binary must be there and
    // have a build-id.
    cargo_hotpatch::build_id(&binary)?;

    let cargo = cargo_hotpatch::cargo::program();
    let patch = &args.packages[0];
    let meta = metadata(args)?;
    let package = find_package(&meta, patch)?;

    let mut cmd = Command::new(&cargo);
    cmd.args(["build", "--lib"]);
    for p in &args.packages {
        cmd.args(["-p", p]);
    }
    if args.workspace {
        cmd.arg("--workspace");
    }
    cmd.args(args.flags().args());
    if let Some(path) = &args.manifest_path {
        cmd.arg("--manifest-path").arg(path);
    }
    let rlib = run_build(cmd, &package.id)?.ok_or_else(|| {
        Failure::Refused(format!(
            "cargo built no rlib for package {patch} ({})",
            package.id
        ))
    })?;

    let out = cargo_hotpatch::cargo::output_path(
        args.output.as_deref(),
        &meta.target_directory,
        &format!("{}.so", package.crate_name),
    )
    .map_err(Failure::Io)?;
    let report = cargo_hotpatch::link(&rlib, &binary, &out)?;

    println!(
        "built {} ({} bytes, {} objects)",
        report.output.display(),
        report.size,
        report.objects
    );
    println!(
        "  bound to {} (build-id {})",
        binary.display(),
        report.host_build_id
    );
    println!(
        "  symbols: {} from the binary, {} from system libraries",
        report.bound_to_host, report.bound_to_system
    );
    if !report.functions.is_empty() {
        println!("  replaces: {}", report.functions.join(", "));
    }
    Ok(())
}

struct Metadata {
    target_directory: PathBuf,
    packages: Vec<serde_json::Value>,
}

struct Package {
    id: String,
    crate_name: String,
}

fn metadata(args: &BuildArgs) -> Result<Metadata, Failure> {
    let json = cargo_hotpatch::cargo::metadata(args.manifest_path.as_deref())
        .map_err(|e| cargo_failure(e, "cargo metadata"))?;
    let target_directory = json["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .ok_or_else(|| Failure::Io("cargo metadata names no target_directory".into()))?;
    let packages = json["packages"].as_array().cloned().unwrap_or_default();
    Ok(Metadata {
        target_directory,
        packages,
    })
}

/// The workspace package `spec` names (`NAME` or `NAME@VERSION`), and the
/// name of its library crate, which must build an rlib.
fn find_package(meta: &Metadata, spec: &str) -> Result<Package, Failure> {
    let (name, version) = match spec.split_once('@') {
        Some((n, v)) => (n, Some(v)),
        None => (spec, None),
    };
    let package = meta
        .packages
        .iter()
        .find(|p| p["name"] == name && version.is_none_or(|v| p["version"].as_str() == Some(v)))
        .ok_or_else(|| Failure::Usage(format!("package {spec} is not in the workspace")))?;
    let id = package["id"].as_str().unwrap_or_default().to_owned();
    let targets = package["targets"].as_array().cloned().unwrap_or_default();
    let lib = targets
        .iter()
        .find(|t| {
            t["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "lib" || k == "rlib" || k == "cdylib" || k == "dylib" || k == "staticlib"))
        })
        .ok_or_else(|| Failure::Refused(format!("package {spec} has no library target: a patch crate is a library crate with `hotpatch::manifest!()`")))?;
    let builds_rlib = lib["crate_types"]
        .as_array()
        .is_some_and(|c| c.iter().any(|c| c == "lib" || c == "rlib"));
    if !builds_rlib {
        return Err(Failure::Refused(format!(
            "package {spec} builds no rlib (crate-type {}): a thin patch is linked from the crate's rlib; remove `crate-type` from its [lib] (rlib is the default)",
            lib["crate_types"]
        )));
    }
    let crate_name = lib["name"].as_str().unwrap_or(name).replace('-', "_");
    Ok(Package { id, crate_name })
}

/// A failed run of cargo (`what`: `cargo build`, `cargo metadata`).
fn cargo_failure(e: cargo_hotpatch::cargo::BuildError, what: &str) -> Failure {
    match e {
        cargo_hotpatch::cargo::BuildError::Io(m) => Failure::Io(m),
        cargo_hotpatch::cargo::BuildError::Failed(status) => {
            Failure::CargoFailed(format!("`{what}` {status}"))
        }
    }
}

/// Runs `cargo build` (its stderr is the user's) and returns the rlib it
/// made for `package_id`.
fn run_build(cmd: Command, package_id: &str) -> Result<Option<PathBuf>, Failure> {
    let artifacts =
        cargo_hotpatch::cargo::build(cmd).map_err(|e| cargo_failure(e, "cargo build"))?;
    Ok(artifacts
        .iter()
        .filter(|a| a.package_id == package_id)
        .filter_map(|a| a.rlib())
        .next_back()
        .map(PathBuf::from))
}

fn build_from_source(args: &BuildArgs, base: &str) -> Result<(), Failure> {
    if args.packages.len() > 1 || args.workspace {
        return Err(Failure::Usage(
            "with --base, -p names the one service package (--workspace does not apply)".into(),
        ));
    }
    let opts = cargo_hotpatch::source::SourceOptions {
        package: args.packages.first().cloned(),
        base: base.to_owned(),
        head: args.head.clone(),
        binary: args.binary.clone(),
        bin: args.bin.clone(),
        output: args.output.clone(),
        flags: args.flags(),
        manifest_path: args.manifest_path.clone(),
    };
    let report = cargo_hotpatch::source::build(&opts, &mut |line| {
        eprintln!("cargo-hotpatch: {line}");
    })?;
    println!("base: {}", report.base);
    println!("head: {}", report.head);
    for item in &report.replaced {
        match &item.location {
            Some(l) => println!("replaced  {}  ({l})", item.path),
            None => println!("replaced  {}", item.path),
        }
    }
    for item in &report.included {
        match &item.location {
            Some(l) => println!("included  {}  ({l})", item.path),
            None => println!("included  {}", item.path),
        }
    }
    for note in &report.notes {
        println!("note: {note}");
    }
    println!(
        "patch: {} ({} bytes) for build-id {}",
        report.output.display(),
        report.size,
        report.build_id
    );
    Ok(())
}
