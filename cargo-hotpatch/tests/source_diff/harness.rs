//! The machinery of tests/source_diff.rs: the fixture repository (a git
//! repository written from tests/fixtures/source-svc, with its case
//! branches), builds of the service, the running service, and runs of
//! `cargo hotpatch build --base`, each with a deadline so a hang fails.
//!
//! Everything lives in `$CARGO_TARGET_TMPDIR/source-diff/`: `repo/` (the
//! repository), `target/` (the one `CARGO_TARGET_DIR` of every build, the
//! tool's included, so the dependencies are compiled once and kept across
//! runs), `bin/` (copies of the service binaries that run), `out/` (the
//! patches). Commits have fixed authors and dates, so a run makes the same
//! commits as the run before, and the tool's worktrees stay valid.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use hotpatch_test_support::write_if_changed;

/// A run of the tool (or a build) that takes longer has hung.
pub const BUILD_DEADLINE: Duration = Duration::from_secs(600);
/// An answer of the service that takes longer will not come.
const ANSWER_DEADLINE: Duration = Duration::from_secs(60);

const TEMPLATE_CARGO_TOML: &str = include_str!("../fixtures/source-svc/Cargo.toml.in");
const TEMPLATE_BUILD_RS: &str = include_str!("../fixtures/source-svc/build.rs");
pub const V1_LIB: &str = include_str!("../fixtures/source-svc/src/lib.rs");
pub const V1_MAIN: &str = include_str!("../fixtures/source-svc/src/main.rs");
/// A file the library compiles in (`include_str!`): not Rust source.
pub const V1_GREETING: &str = include_str!("../fixtures/source-svc/src/greeting.txt");

/// One textual edit of a file of the fixture: `old`, which occurs exactly
/// once, becomes `new`.
#[derive(Debug, Clone, Copy)]
pub struct Edit {
    pub file: &'static str,
    pub old: &'static str,
    pub new: &'static str,
}

/// The text of `file` (`src/lib.rs` or `src/main.rs`) at v1 with `edits`
/// applied.
pub fn edited(file: &str, edits: &[Edit]) -> String {
    let text = match file {
        "src/lib.rs" => V1_LIB.to_owned(),
        "src/main.rs" => V1_MAIN.to_owned(),
        "src/greeting.txt" => V1_GREETING.to_owned(),
        "Cargo.toml" => v1_manifest(),
        "build.rs" => TEMPLATE_BUILD_RS.to_owned(),
        _ => panic!("no fixture file {file}"),
    };
    apply_edits(file, text, edits)
}

/// `text` (of `file`) with the `edits` of `file` applied.
fn apply_edits(file: &str, mut text: String, edits: &[Edit]) -> String {
    for e in edits.iter().filter(|e| e.file == file) {
        assert_eq!(
            text.matches(e.old).count(),
            1,
            "edit of {file}: {:?} must occur exactly once",
            e.old
        );
        text = text.replacen(e.old, e.new, 1);
    }
    text
}

/// The 1-based number of the one line of `text` that contains `needle`.
pub fn line_of(text: &str, needle: &str) -> usize {
    let lines: Vec<usize> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains(needle))
        .map(|(i, _)| i + 1)
        .collect();
    assert_eq!(lines.len(), 1, "{needle:?} must be on exactly one line");
    lines[0]
}

pub fn scratch() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("source-diff")
}

pub fn target_dir() -> PathBuf {
    scratch().join("target")
}

pub fn repo_dir() -> PathBuf {
    scratch().join("repo")
}

fn hotpatch_crate() -> PathBuf {
    let p = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../hotpatch"));
    p.canonicalize()
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

// ---- git ----

/// `git ARGS` in the fixture repository, with a fixed identity and date
/// and no user or system configuration; panics with git's stderr if it
/// fails. Returns stdout.
pub fn git(args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(repo_dir())
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_AUTHOR_NAME", "source-diff test")
        .env("GIT_AUTHOR_EMAIL", "test@example.invalid")
        .env("GIT_COMMITTER_NAME", "source-diff test")
        .env("GIT_COMMITTER_EMAIL", "test@example.invalid")
        .env("GIT_AUTHOR_DATE", "2025-01-01T00:00:00Z")
        .env("GIT_COMMITTER_DATE", "2025-01-01T00:00:00Z")
        .output()
        .unwrap_or_else(|e| panic!("git {args:?}: {e}"));
    assert!(
        out.status.success(),
        "git {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The service's Cargo.toml at v1.
fn v1_manifest() -> String {
    TEMPLATE_CARGO_TOML.replace("@HOTPATCH@", hotpatch_crate().to_str().unwrap())
}

/// Writes the working tree of the repository as v1 with `edits` applied.
pub fn write_tree(edits: &[Edit]) {
    let repo = repo_dir();
    write_if_changed(&repo.join("src/lib.rs"), &edited("src/lib.rs", edits));
    write_if_changed(&repo.join("src/main.rs"), &edited("src/main.rs", edits));
    write_if_changed(
        &repo.join("src/greeting.txt"),
        &edited("src/greeting.txt", edits),
    );
    write_if_changed(&repo.join("Cargo.toml"), &edited("Cargo.toml", edits));
    write_if_changed(&repo.join("build.rs"), &edited("build.rs", edits));
    // Cargo.lock: v1's as committed (cargo trimmed the workspace's), with
    // the edits; before v1 is made, `make_repo` writes it.
    if let Some(lock) = v1_lock() {
        write_if_changed(
            &repo.join("Cargo.lock"),
            &apply_edits("Cargo.lock", lock, edits),
        );
    } else {
        assert!(
            !edits.iter().any(|e| e.file == "Cargo.lock"),
            "Cargo.lock edits need v1"
        );
    }
}

/// Makes the repository (again): `main` and tag `v1` at the fixture as
/// written, and one branch from v1 per case with its edits committed.
/// Leaves `main` checked out, clean.
pub fn make_repo(branches: &[(&str, &[Edit])]) {
    let repo = repo_dir();
    if !repo.join(".git").exists() {
        std::fs::create_dir_all(&repo).unwrap();
        git(&["init", "--quiet", "-b", "main"]);
    }
    if has_commits() {
        git(&["checkout", "--quiet", "--force", "--detach"]);
    }
    git(&["clean", "--quiet", "-fdx"]);
    write_if_changed(&repo.join("build.rs"), TEMPLATE_BUILD_RS);
    write_if_changed(&repo.join(".gitignore"), "/target\n");
    write_tree(&[]);
    // The lock file: this workspace's versions (all compiled and cached
    // here already), trimmed by cargo to what the service uses.
    let lock =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock")).unwrap();
    write_if_changed(&repo.join("Cargo.lock"), &lock);
    let meta = cargo()
        .args(["metadata", "--format-version", "1", "--quiet"])
        .current_dir(&repo)
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert!(
        meta.status.success(),
        "cargo metadata in {}:\n{}",
        repo.display(),
        String::from_utf8_lossy(&meta.stderr)
    );
    // Commits made from trees alone (a root commit, then one child of it
    // per case), and refs moved with update-ref, which works whatever a
    // worktree of the tool has checked out: the same hashes on every run.
    git(&["worktree", "prune"]);
    git(&["add", "--all"]);
    let tree = git(&["write-tree"]);
    let v1 = git(&["commit-tree", tree.trim(), "-m", "v1"]);
    let v1 = v1.trim();
    git(&["tag", "--force", "v1", v1]);
    for (branch, edits) in branches {
        write_tree(edits);
        git(&["add", "--all"]);
        let tree = git(&["write-tree"]);
        let commit = git(&["commit-tree", tree.trim(), "-p", v1, "-m", branch]);
        git(&["update-ref", &format!("refs/heads/{branch}"), commit.trim()]);
    }
    git(&["update-ref", "refs/heads/main", v1]);
    git(&["checkout", "--quiet", "--force", "main"]);
    assert_clean();
}

/// v1's Cargo.lock, once v1 is committed.
fn v1_lock() -> Option<String> {
    let v1 = Command::new("git")
        .args(["rev-parse", "--quiet", "--verify", "v1^{commit}"])
        .current_dir(repo_dir())
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    v1.then(|| git(&["show", "v1:Cargo.lock"]))
}

fn has_commits() -> bool {
    Command::new("git")
        .args(["rev-parse", "--quiet", "--verify", "HEAD"])
        .current_dir(repo_dir())
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The working tree is v1 exactly.
pub fn assert_clean() {
    let status = git(&["status", "--porcelain"]);
    assert!(
        status.is_empty(),
        "the fixture repository is dirty:\n{status}"
    );
}

// ---- cargo and the tool ----

pub fn cargo() -> Command {
    let mut cmd = hotpatch_test_support::outside_cargo();
    env(&mut cmd);
    cmd
}

/// The environment of every build: one target directory, none of the
/// outer build's flags.
fn env(cmd: &mut Command) {
    hotpatch_test_support::isolate(cmd).env("CARGO_TARGET_DIR", target_dir());
}

/// Builds the service as the working tree stands (debug, as deployed in
/// most cases of this test) and copies its binary to `bin/NAME`, where it
/// runs from (later builds overwrite `target/debug/svc`).
pub fn build_service(name: &str) -> PathBuf {
    build_service_with(name, false)
}

/// [`build_service`], in the release profile when `release`.
pub fn build_service_with(name: &str, release: bool) -> PathBuf {
    build_service_features(name, release, &[])
}

/// [`build_service_with`], with the service's cargo `features`.
pub fn build_service_features(name: &str, release: bool, features: &[&str]) -> PathBuf {
    let mut cmd = cargo();
    cmd.args(["build", "--quiet", "-p", "svc"])
        .current_dir(repo_dir());
    if release {
        cmd.arg("--release");
    }
    if !features.is_empty() {
        cmd.args(["--features", &features.join(",")]);
    }
    let out = run(cmd, &format!("cargo build -p svc ({name})"));
    assert!(
        out.status.success(),
        "building the service ({name}) failed:\n{}",
        out.stderr
    );
    let bin = scratch().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let to = bin.join(name);
    let profile = if release { "release" } else { "debug" };
    std::fs::copy(target_dir().join(profile).join("svc"), &to).unwrap();
    to
}

/// What a process printed and how it ended.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` to its end, or kills it at [`BUILD_DEADLINE`] and panics.
/// Prints what ran and what it printed (shown when a test fails).
pub fn run(mut cmd: Command, what: &str) -> Output {
    println!("$ {what}");
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = r.read_to_end(&mut s);
            String::from_utf8_lossy(&s).into_owned()
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > BUILD_DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running after {BUILD_DEADLINE:?}: killed");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    };
    println!(
        "  {status} after {:.1} s\n  stdout:\n{}  stderr:\n{}",
        start.elapsed().as_secs_f64(),
        indent(&out.stdout),
        indent(&out.stderr)
    );
    out
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("    {l}\n")).collect()
}

/// `cargo hotpatch ARGS` in the fixture repository, not started.
pub fn tool_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cargo-hotpatch"));
    // As cargo runs a subcommand: argv[1] is "hotpatch".
    cmd.arg("hotpatch").args(args).current_dir(repo_dir());
    env(&mut cmd);
    cmd
}

/// `cargo hotpatch ARGS` in the fixture repository.
pub fn tool(args: &[&str]) -> Output {
    run(
        tool_command(args),
        &format!("cargo hotpatch {}", args.join(" ")),
    )
}

/// A `replaced` or `included` line of the tool's stdout.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Listed {
    pub kind: String,
    pub path: String,
    /// `FILE:LINE`, as printed between the parentheses.
    pub at: String,
}

/// A listed line's text without its trailing `(why)` (what the tool says
/// made a function the user did not touch change), and the why.
fn without_why(rest: &str) -> (&str, Option<&str>) {
    let is_location = |group: &str| {
        group.rsplit_once(':').is_some_and(|(file, line)| {
            !file.contains(' ') && !line.is_empty() && line.bytes().all(|b| b.is_ascii_digit())
        })
    };
    match rest.rsplit_once('(') {
        Some((before, group)) => match group.strip_suffix(')') {
            Some(group) if !is_location(group) && before.trim_end().ends_with(')') => {
                (before.trim_end(), Some(group))
            }
            _ => (rest, None),
        },
        None => (rest, None),
    }
}

/// Why the tool says the `kind` line of `path` is in the patch: the
/// trailing `(why)` of that line, if it has one.
pub fn why_listed(stdout: &str, kind: &str, path: &str) -> Option<String> {
    stdout.lines().find_map(|line| {
        let rest = line.trim().strip_prefix(kind)?.trim();
        let (text, why) = without_why(rest);
        let (listed_path, _) = text.rsplit_once('(')?;
        (listed_path.trim() == path).then(|| why.map(str::to_owned))?
    })
}

/// The `replaced` and `included` lines of `stdout`, sorted. Spacing does
/// not matter; the path may hold spaces (`<svc::Cart as svc::Describe>`).
pub fn listed(stdout: &str) -> Vec<Listed> {
    let mut all = Vec::new();
    for line in stdout.lines() {
        let line = line.trim();
        let Some(kind) = ["replaced", "included", "hooked"]
            .into_iter()
            .find(|k| line.strip_prefix(k).is_some_and(|r| r.starts_with(' ')))
        else {
            continue;
        };
        let (rest, _) = without_why(line[kind.len()..].trim());
        let (path, at) = rest
            .rsplit_once('(')
            .unwrap_or_else(|| panic!("no (FILE:LINE) in {line:?}"));
        let at = at
            .strip_suffix(')')
            .unwrap_or_else(|| panic!("no closing ) in {line:?}"));
        all.push(Listed {
            kind: kind.to_owned(),
            path: path.trim().to_owned(),
            at: at.trim().to_owned(),
        });
    }
    all.sort();
    all
}

/// `at` (`FILE:LINE`) names `src/lib.rs` (relative, or a path ending in
/// it) at `line`.
pub fn at_lib_line(at: &str, line: usize) -> bool {
    let want = format!("src/lib.rs:{line}");
    at == want || at.ends_with(&format!("/{want}"))
}

// ---- the running service ----

/// A running service process: commands on its stdin, one answer line
/// each on its stdout. Killed when dropped.
pub struct Service {
    pub name: String,
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    /// Its `ready ...` line.
    pub banner: String,
}

impl Service {
    pub fn start(bin: &Path, name: &str) -> Service {
        Service::start_args(bin, name, &[])
    }

    /// [`Service::start`] with command-line arguments.
    pub fn start_args(bin: &Path, name: &str, args: &[&str]) -> Service {
        let mut child = Command::new(bin)
            .args(args)
            // Case 20's patch panics on purpose: its message is enough in
            // the test's output.
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut service = Service {
            name: name.to_owned(),
            child,
            stdin,
            lines,
            banner: String::new(),
        };
        service.banner = service.next_line("start");
        assert!(
            service.banner.starts_with("ready "),
            "{name}: {:?}",
            service.banner
        );
        service
    }

    fn next_line(&mut self, what: &str) -> String {
        match self.lines.recv_timeout(ANSWER_DEADLINE) {
            Ok(line) => line,
            Err(RecvTimeoutError::Timeout) => {
                panic!(
                    "{}: no answer to {what:?} in {ANSWER_DEADLINE:?}",
                    self.name
                )
            }
            Err(RecvTimeoutError::Disconnected) => panic!(
                "{}: ended before it answered {what:?}: {:?}",
                self.name,
                self.child.try_wait()
            ),
        }
    }

    /// Sends one command; returns its answer.
    pub fn ask(&mut self, command: &str) -> String {
        writeln!(self.stdin, "{command}")
            .and_then(|()| self.stdin.flush())
            .unwrap_or_else(|e| panic!("{}: sending {command:?}: {e}", self.name));
        let answer = self.next_line(command);
        println!("  [{}] {command} -> {answer}", self.name);
        answer
    }

    /// `call`, parsed.
    pub fn call(&mut self) -> Call {
        parse_call(&self.ask("call"))
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The answer to `call`: each function's result by key.
pub type Call = BTreeMap<String, String>;

/// Parses `key=value key="quoted value" ...` (strings are written with
/// `{:?}`, so a quote inside one is escaped).
pub fn parse_call(line: &str) -> Call {
    let mut map = Call::new();
    let mut rest = line.trim();
    while !rest.is_empty() {
        let (key, after) = rest
            .split_once('=')
            .unwrap_or_else(|| panic!("not key=value at {rest:?} in {line:?}"));
        let (value, after) = if let Some(quoted) = after.strip_prefix('"') {
            let mut end = None;
            let mut escaped = false;
            for (i, c) in quoted.char_indices() {
                match c {
                    _ if escaped => escaped = false,
                    '\\' => escaped = true,
                    '"' => {
                        end = Some(i);
                        break;
                    }
                    _ => {}
                }
            }
            let end = end.unwrap_or_else(|| panic!("unterminated string in {line:?}"));
            (&quoted[..end], &quoted[end + 1..])
        } else {
            after.split_once(' ').unwrap_or((after, ""))
        };
        assert!(
            map.insert(key.to_owned(), value.to_owned()).is_none(),
            "{key} twice in {line:?}"
        );
        rest = after.trim_start();
    }
    map
}

#[test]
fn parse_call_reads_quoted_values_with_spaces() {
    let call = parse_call(r#"a=1 s="x y \"z\"" b=2"#);
    let want: Call = [("a", "1"), ("s", r#"x y \"z\""#), ("b", "2")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    assert_eq!(call, want);
}

#[test]
fn a_listed_line_may_say_why_after_its_location() {
    let out = "replaced  svc::bonus_of  (src/lib.rs:121)  (inlined svc::bonus changed)\nreplaced  svc::price  (src/lib.rs:3)\n";
    assert_eq!(
        listed(out),
        [
            Listed {
                kind: "replaced".into(),
                path: "svc::bonus_of".into(),
                at: "src/lib.rs:121".into()
            },
            Listed {
                kind: "replaced".into(),
                path: "svc::price".into(),
                at: "src/lib.rs:3".into()
            },
        ]
    );
    assert_eq!(
        why_listed(out, "replaced", "svc::bonus_of").as_deref(),
        Some("inlined svc::bonus changed")
    );
    assert_eq!(why_listed(out, "replaced", "svc::price"), None);
}

#[test]
fn listed_reads_paths_with_spaces_whatever_the_spacing() {
    let got = listed(
        "note: x\n  replaced  svc::price  (src/lib.rs:3)\nincluded <svc::Cart as svc::Describe>::describe (src/lib.rs:40)\nreplacedx y (z:1)\npatch: out.so (1 bytes) for build-id ab\n",
    );
    assert_eq!(
        got,
        [
            Listed {
                kind: "included".into(),
                path: "<svc::Cart as svc::Describe>::describe".into(),
                at: "src/lib.rs:40".into()
            },
            Listed {
                kind: "replaced".into(),
                path: "svc::price".into(),
                at: "src/lib.rs:3".into()
            },
        ]
    );
}
