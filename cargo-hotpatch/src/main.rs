//! `cargo hotpatch`: builds a thin patch with cargo and links it against
//! the service binary it is for. See the crate docs of `cargo_hotpatch`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use cargo_hotpatch::{BuildError, CargoFlags, CrateOptions, SourceOptions};
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

    /// With --base: the patch's name, as the service lists it [default:
    /// the package and the head's short commit hash, `-dirty` and a digest
    /// of the changes for the working tree].
    #[arg(long, value_name = "NAME", requires = "base")]
    name: Option<String>,

    /// With --base: the patch's version [default: the base and the head's
    /// short commit hash].
    #[arg(long, value_name = "VERSION", requires = "base")]
    patch_version: Option<String>,

    /// With --base: what the patch fixes [default: the head commit's
    /// subject and the functions it replaces].
    #[arg(long, value_name = "TEXT", requires = "base")]
    description: Option<String>,

    /// With --base: the deployed executable's bin target, in the service
    /// package (-p) or another package of the workspace [default: the
    /// one named like --binary, else the service package's only one,
    /// else the workspace's only one].
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

    /// The service binary the patch is for (linked with `-rdynamic`, or
    /// not stripped).
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

impl BuildArgs {
    /// The profile and feature flags, as every `cargo build` is given them.
    fn flags(&self) -> CargoFlags {
        CargoFlags {
            release: self.release,
            profile: self.profile.clone(),
            features: self.features.clone(),
            all_features: self.all_features,
            no_default_features: self.no_default_features,
        }
    }
}

fn main() -> ExitCode {
    let mut args: Vec<OsString> = std::env::args_os().collect();
    // `cargo hotpatch build --base` builds the base with this program as
    // rustc's wrapper (to remap the checkout's paths to the workspace's).
    if let Some(code) = cargo_hotpatch::run_as_rustc_wrapper(&args) {
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
    let Cmd::Build(args) = cli.command;
    let result = match &args.base {
        Some(base) => build_from_source(&args, base),
        None => build_patch_crate(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // From source: each reason on its own line.
        Err(BuildError::Refused(reasons)) if args.base.is_some() => {
            for r in &reasons {
                eprintln!("refused: {}", r.to_string().replace('\n', "; "));
            }
            eprintln!(
                "cargo-hotpatch: refused ({} reason{}); no patch was written",
                reasons.len(),
                if reasons.len() == 1 { "" } else { "s" }
            );
            ExitCode::from(3)
        }
        Err(e) => {
            let one_line = e.to_string().replace('\n', "; ");
            eprintln!("cargo-hotpatch: {one_line}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// `cargo hotpatch build -p PATCH --binary BIN`.
fn build_patch_crate(args: &BuildArgs) -> Result<(), BuildError> {
    let report = cargo_hotpatch::build_patch_crate(&CrateOptions {
        packages: args.packages.clone(),
        workspace: args.workspace,
        binary: args.binary.clone(),
        flags: args.flags(),
        output: args.output.clone(),
        manifest_path: args.manifest_path.clone(),
    })?;
    println!(
        "built {} ({} bytes, {} objects)",
        report.output.display(),
        report.size,
        report.objects
    );
    println!(
        "  bound to {} (build-id {})",
        args.binary.as_deref().unwrap_or(Path::new("")).display(),
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

/// `cargo hotpatch build --base REV`.
fn build_from_source(args: &BuildArgs, base: &str) -> Result<(), BuildError> {
    if args.packages.len() > 1 || args.workspace {
        return Err(BuildError::Usage(
            "with --base, -p names the one service package (--workspace does not apply)".into(),
        ));
    }
    let opts = SourceOptions {
        package: args.packages.first().cloned(),
        base: base.to_owned(),
        head: args.head.clone(),
        binary: args.binary.clone(),
        bin: args.bin.clone(),
        output: args.output.clone(),
        flags: args.flags(),
        manifest_path: args.manifest_path.clone(),
        name: args.name.clone(),
        version: args.patch_version.clone(),
        description: args.description.clone(),
    };
    let report = cargo_hotpatch::build_from_source(&opts, &mut |line| {
        eprintln!("cargo-hotpatch: {line}");
    })?;
    println!("base: {}", report.base);
    println!("head: {}", report.head);
    println!(
        "name: {} {} ({})",
        report.name, report.version, report.description
    );
    let listed = report
        .replaced
        .iter()
        .map(|i| ("replaced", i))
        .chain(report.included.iter().map(|i| ("included", i)))
        .chain(report.hooked.iter().map(|i| ("hooked", i)));
    for (kind, item) in listed {
        let mut line = format!("{kind}  {}", item.path);
        if let Some(l) = &item.location {
            line.push_str(&format!("  ({l})"));
        }
        if let Some(why) = &item.why {
            line.push_str(&format!("  ({why})"));
        }
        println!("{line}");
        if kind == "hooked" {
            // Why its entry is redirected rather than its callers replaced.
            for because in &item.callers {
                println!("    because {because}");
            }
        } else if !item.callers.is_empty() {
            println!("    called from: {}", item.callers.join(", "));
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
