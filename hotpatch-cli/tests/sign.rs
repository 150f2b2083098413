//! `hotpatch keygen`, `sign` and `verify`, with and without a
//! password, and never waiting for input it cannot get.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// A fresh directory for one test, removed when the test ends.
struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn dir(name: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!("hotpatch-sign-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

/// Runs the tool with no standard input and no password in the
/// environment unless `password` is given.
fn tool(args: &[&str], cwd: &Path, password: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hotpatch"));
    cmd.args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .env_remove(hotpatch_sign::PASSWORD_ENV);
    if let Some(p) = password {
        cmd.env(hotpatch_sign::PASSWORD_ENV, p);
    }
    cmd.output().unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn failed(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn keygen_sign_verify_unencrypted() {
    let d = dir("plain");
    std::fs::write(d.join("patch.so"), b"\x7fELF patch bytes").unwrap();
    let out = ok(&tool(
        &[
            "keygen",
            "--public",
            "patches.pub",
            "--secret",
            "patches.key",
            "--unencrypted",
        ],
        &d,
        None,
    ));
    assert!(out.contains("patches.pub"), "{out}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(d.join("patches.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the secret key is private");

    let out = ok(&tool(
        &["sign", "--secret", "patches.key", "patch.so"],
        &d,
        None,
    ));
    assert!(out.contains("patch.so.minisig"), "{out}");
    let sig = std::fs::read_to_string(d.join("patch.so.minisig")).unwrap();
    assert!(sig.contains("\tfile:patch.so\thashed"), "{sig}");

    let out = ok(&tool(
        &["verify", "--public", "patches.pub", "patch.so"],
        &d,
        None,
    ));
    assert!(out.contains("Trusted comment: timestamp:"), "{out}");
    assert!(out.contains("file:patch.so"), "{out}");

    // What the runtime uses accepts it too.
    let key = minisign_verify::PublicKey::from_file(d.join("patches.pub")).unwrap();
    let signature = minisign_verify::Signature::from_file(d.join("patch.so.minisig")).unwrap();
    key.verify(
        &std::fs::read(d.join("patch.so")).unwrap(),
        &signature,
        false,
    )
    .unwrap();

    // A changed file no longer verifies.
    std::fs::write(d.join("patch.so"), b"\x7fELF patch bytez").unwrap();
    let err = failed(&tool(
        &["verify", "--public", "patches.pub", "patch.so"],
        &d,
        None,
    ));
    assert!(err.contains("signature does not verify"), "{err}");
}

#[test]
fn keygen_refuses_to_overwrite() {
    let d = dir("overwrite");
    let args = [
        "keygen",
        "--public",
        "k.pub",
        "--secret",
        "k.key",
        "--unencrypted",
    ];
    ok(&tool(&args, &d, None));
    let first = std::fs::read_to_string(d.join("k.pub")).unwrap();
    let err = failed(&tool(&args, &d, None));
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read_to_string(d.join("k.pub")).unwrap(), first);
    let mut forced = args.to_vec();
    forced.push("--force");
    ok(&tool(&forced, &d, None));
    assert_ne!(std::fs::read_to_string(d.join("k.pub")).unwrap(), first);
}

#[test]
fn encrypted_key_without_a_terminal_needs_the_environment() {
    let d = dir("encrypted");
    std::fs::write(d.join("patch.so"), b"\x7fELF patch bytes").unwrap();
    let keygen = ["keygen", "--public", "k.pub", "--secret", "k.key"];
    // No terminal, no variable: fails at once instead of prompting.
    let err = failed(&tool(&keygen, &d, None));
    assert!(err.contains(hotpatch_sign::PASSWORD_ENV), "{err}");
    assert!(!d.join("k.key").exists());

    ok(&tool(&keygen, &d, Some("s3cret")));
    let sign = ["sign", "--secret", "k.key", "patch.so"];
    let err = failed(&tool(&sign, &d, None));
    assert!(err.contains("encrypted"), "{err}");
    let err = failed(&tool(&sign, &d, Some("wrong")));
    assert!(err.contains("cannot decrypt"), "{err}");
    ok(&tool(&sign, &d, Some("s3cret")));
    ok(&tool(
        &["verify", "--public", "k.pub", "patch.so"],
        &d,
        None,
    ));
}

#[test]
fn help_documents_the_commands() {
    let d = dir("help");
    let out = ok(&tool(&["--help"], &d, None));
    for word in [
        "keygen",
        "sign",
        "verify",
        "minisig",
        "HOTPATCH_SIGN_PASSWORD",
    ] {
        assert!(out.contains(word), "--help mentions {word}:\n{out}");
    }
}
