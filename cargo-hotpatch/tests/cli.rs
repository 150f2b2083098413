//! `cargo hotpatch build`: exit codes, messages and the summary, run on
//! the fixture workspace (tests/fixture).

mod fixture;

use std::path::Path;
use std::process::{Command, Output};

fn tool(args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cargo-hotpatch"));
    // As cargo runs a subcommand: argv[1] is "hotpatch".
    cmd.arg("hotpatch").args(args);
    run(cmd)
}

fn run(mut cmd: Command) -> Output {
    hotpatch_test_support::isolate(&mut cmd)
        .current_dir(fixture::root())
        .output()
        .unwrap()
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The one line the tool printed to stderr (cargo's own lines, which
/// start with spaces or a capitalised verb, aside).
fn error_line(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("cargo-hotpatch"))
        .collect();
    assert_eq!(lines.len(), 1, "one line from the tool: {stderr}");
    lines[0].to_owned()
}

#[test]
fn build_writes_the_patch_to_the_target_dir_and_prints_a_summary() {
    let host = fixture::debug("svc");
    let default = fixture::root().join("target/hotpatch/patch.so");
    let _ = std::fs::remove_file(&default);
    let out = tool(&["build", "-p", "patch", "--binary", path(&host)]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let id = cargo_hotpatch::hex(&cargo_hotpatch::build_id(&host).unwrap());
    assert!(stdout.contains(path(&default)), "{stdout}");
    assert!(stdout.contains(&id), "{stdout}");
    // The hand-made fixture has no `#[patch]` records, so no "replaces:"
    // line (tests/thin_service.rs checks a real patch's list).
    assert!(!stdout.contains("replaces:"), "{stdout}");
    let patch = std::fs::read(&default).unwrap();
    assert_eq!(
        cargo_hotpatch::identity(&patch),
        Some(cargo_hotpatch::build_id(&host).unwrap())
    );
    cargo_hotpatch::check_against(&default, &host).unwrap();
}

#[test]
fn runs_without_the_cargo_argument_too_and_honours_output() {
    let dir = fixture::scratch("cli_output");
    let o = dir.join("fix.so");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cargo-hotpatch"));
    cmd.args(["build", "-p", "patch", "--binary"])
        .arg(fixture::debug("svc"))
        .arg("-o")
        .arg(&o)
        .arg("--manifest-path")
        .arg(fixture::root().join("Cargo.toml"));
    let out = run(cmd);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(fixture::listing(&dir), ["fix.so"]);
}

#[test]
fn refusals_exit_3_with_one_line() {
    let dir = fixture::scratch("cli_refusals");
    let o = dir.join("p.so");
    let svc = fixture::debug("svc");
    let cases: [(&str, &Path, &str); 5] = [
        // Without -rdynamic the patch binds to the symbol table, which
        // lacks what the service never calls (issue 22).
        ("patch", &fixture::debug("svc-plain"), "-rdynamic"),
        ("lonely-patch", &svc, "`lonely::lonely`"),
        ("nomani", &svc, "hotpatch::manifest!()"),
        ("palloc", &svc, "#[global_allocator]"),
        ("cdy", &svc, "builds no rlib"),
    ];
    for (package, host, says) in cases {
        let out = tool(&[
            "build",
            "-p",
            package,
            "--binary",
            path(host),
            "-o",
            path(&o),
        ]);
        assert_eq!(out.status.code(), Some(3), "{package}: {out:?}");
        let line = error_line(&out);
        assert!(line.starts_with("cargo-hotpatch: "), "{line}");
        assert!(line.contains(says), "{package}: {line}");
    }
    let out = tool(&[
        "build",
        "-p",
        "patch",
        "--binary",
        path(&fixture::debug("svc-noid")),
    ]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(error_line(&out).contains("has no GNU build-id"));
    assert_eq!(fixture::listing(&dir), Vec::<String>::new());
}

#[test]
fn missing_binary_exits_4_naming_it() {
    let out = tool(&[
        "build",
        "-p",
        "patch",
        "--binary",
        "target/debug/no-such-service",
    ]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let line = error_line(&out);
    assert!(line.contains("target/debug/no-such-service"), "{line}");
    assert!(line.contains("No such file"), "{line}");
}

#[test]
fn wrong_arguments_exit_2() {
    let svc = fixture::debug("svc");
    for args in [
        vec!["build", "--binary", path(&svc)],
        vec!["build", "-p", "patch"],
        vec![
            "build",
            "-p",
            "patch",
            "--binary",
            path(&svc),
            "--release",
            "--profile",
            "lto",
        ],
        vec![
            "build",
            "-p",
            "patch",
            "--binary",
            path(&svc),
            "--no-such-flag",
        ],
        vec!["frobnicate"],
        vec!["build", "-p", "no-such-package", "--binary", path(&svc)],
    ] {
        let out = tool(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert!(error_line(&out).starts_with("cargo-hotpatch: "), "{args:?}");
    }
}

#[test]
fn help_documents_exit_codes_and_the_selection() {
    let out = tool(&["build", "--help"]);
    assert!(out.status.success(), "{out:?}");
    let help = String::from_utf8_lossy(&out.stdout);
    for says in [
        "build the patch in the same selection you built the service with",
        "0  the patch was built",
        "1  `cargo build` (or git) failed",
        "2  usage",
        "3  refused",
        "4  I/O",
        "5  --base: no change",
        "--base <REV>",
        "--head <REV>",
    ] {
        assert!(help.contains(says), "{says}: {help}");
    }
}

#[test]
fn cargo_build_failure_exits_1_and_shows_cargo_diagnostics() {
    let out = tool(&[
        "build",
        "-p",
        "broken",
        "--binary",
        path(&fixture::debug("svc")),
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("mismatched types"),
        "cargo's diagnostics: {stderr}"
    );
    assert!(error_line(&out).contains("`cargo build`"));
}

#[test]
fn features_are_passed_to_cargo_so_the_patch_matches_the_service() {
    let host = fixture::alt_host();
    let dir = fixture::scratch("cli_features");
    let o = dir.join("p.so");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cargo-hotpatch"));
    cmd.args([
        "hotpatch",
        "build",
        "-p",
        "patch",
        "--binary",
        path(&host),
        "-o",
        path(&o),
    ]);
    cmd.env("CARGO_TARGET_DIR", fixture::root().join("target-alt"));
    let mismatched = cmd.current_dir(fixture::root()).output().unwrap();
    assert_eq!(mismatched.status.code(), Some(3), "{mismatched:?}");
    assert!(error_line(&mismatched).contains("`svc::price` (the host has another build of it)"));

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cargo-hotpatch"));
    cmd.args([
        "hotpatch",
        "build",
        "-p",
        "patch",
        "-F",
        "svc/alt",
        "--binary",
        path(&host),
        "-o",
        path(&o),
    ]);
    cmd.env("CARGO_TARGET_DIR", fixture::root().join("target-alt"));
    let matched = cmd.current_dir(fixture::root()).output().unwrap();
    assert!(matched.status.success(), "{matched:?}");
    cargo_hotpatch::check_against(&o, &host).unwrap();
}
