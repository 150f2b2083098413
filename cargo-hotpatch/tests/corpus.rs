//! The corpus: `cargo hotpatch build --base` on real services written by
//! others, with realistic fixes, applied under a client's load and
//! observed from outside (issue 23).
//!
//! Each service is a published crate downloaded from crates.io at test
//! time (through cargo, into `$CARGO_TARGET_TMPDIR/corpus/NAME/`): this
//! repository holds only what is ours, as diffs in `tests/corpus/NAME/`:
//! the marking (`mark.diff`: every function `#[patchable]` accepts marked,
//! the host setting in `build.rs`, the control endpoint in the server's
//! `main`), a `Cargo.lock` (the published one completed with hotpatch's
//! dependencies, or replaced where it pins versions older than hotpatch
//! needs), and one diff per fix (`fixes/`). The service's description
//! (`tests/corpus/NAME/service.rs`, a [`Service`]) says how to start the
//! server, how its load client talks, and each fix's probe:
//!
//! - `mini-redis` 0.4.1, a tokio server speaking the Redis protocol;
//! - `dufs` 0.46.0, an HTTP file server on hyper, published as a binary
//!   only: the marking gives it a library crate (`src/lib.rs` declares the
//!   modules, `main.rs` uses them), as the README tells users to, and
//!   removes its own release profile (fat LTO, one codegen unit,
//!   `panic = "abort"`, `strip = "symbols"`) for the default one.
//!
//! Fixes cover parsing, paths, headers, limits, state, error replies,
//! async handlers, generic helpers and error types; fixes from each
//! project's own history after the pinned version (the upstream commit or
//! pull request in the name) re-applied on it; a comment-only change; and
//! changes the tool must refuse.
//!
//! The harness makes a git repository of the source, commits it, applies
//! the marking and tags `v1`, builds it with `cargo build --release` (the
//! default release profile: 16 codegen units, no LTO) and runs the
//! server. For each fix it commits a branch on v1, runs `cargo hotpatch
//! build --base v1 --head BRANCH -p NAME --release --binary <the running
//! server>`, and when a patch is built applies it with the `hotpatch`
//! tool while a load client keeps sending requests on its own connection
//! (counted, every reply checked), probes the server from outside on a
//! fresh connection (or reads its log), reverts, and probes again. Each
//! fix gets one outcome: built and effective, built and not effective,
//! refused (with the tool's reasons), no change, tool error. A wrong answer
//! (a false "no change", a patch that changes nothing, a tool error, a
//! patch for a change that needs none, a client error under load) fails
//! the run; the table is written to
//! `$CARGO_TARGET_TMPDIR/corpus/NAME/run/report.md` and printed, and the
//! tool's whole output for each fix to `run/out/FIX.log`.
//!
//! - `corpus_diffs_apply` (always runs, seconds once the crates are in
//!   cargo's cache): every service's marking and fixes apply to the pinned
//!   source.
//! - `corpus_mini_redis`, `corpus_dufs` (ignored: release builds, minutes
//!   per fix on two cores, more for the first): the whole run of one
//!   service; the test's name selects the service, and the runs never
//!   overlap. `HOTPATCH_CORPUS_BUDGET=SECS` (default 3600) stops starting
//!   fixes once spent (they are listed as not run);
//!   `HOTPATCH_CORPUS_ONLY=a,b` runs only the fixes whose names contain
//!   one of the words; `HOTPATCH_CORPUS_CGU1=1` builds with
//!   `codegen-units = 1` (a diagnostic).
//!   `cargo test -p cargo-hotpatch --test corpus corpus_dufs -- --ignored --nocapture`

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[path = "corpus/dufs/service.rs"]
mod dufs;
#[path = "corpus/mini-redis/service.rs"]
mod mini_redis;

/// Every service of the corpus.
const SERVICES: &[&Service] = &[
    &mini_redis::SERVICE,
    &dufs::SERVICE,
    &dufs::SERVICE_BIN_ONLY,
];

/// How long the server may take to say nothing more: a probe whose
/// answer is "no reply" waits this long for one.
const QUIET: Duration = Duration::from_secs(2);
/// A tool run or build that takes longer has hung.
const BUILD_DEADLINE: Duration = Duration::from_secs(1500);

/// A real service of the corpus: where it comes from, what is ours, how
/// it runs and how it is driven.
struct Service {
    /// Its crate on crates.io, and its package.
    name: &'static str,
    /// Its scratch directory, and its name in the report (one crate may
    /// be marked in two ways).
    scratch: &'static str,
    /// The pinned version.
    version: &'static str,
    /// The server executable (a bin target of the package).
    bin: &'static str,
    /// The marking, as a diff on the published source. `@HOTPATCH@` stands
    /// for this workspace's `hotpatch` directory.
    mark: &'static str,
    /// The `Cargo.lock` v1 builds with.
    lock: &'static str,
    /// The fixes, in the order they run.
    fixes: &'static [Fix],
    /// The server's arguments: the port to listen on, and a directory of
    /// its own (`prepare` filled it).
    args: fn(u16, &Path) -> Vec<String>,
    /// Fills the server's directory before it starts.
    prepare: fn(&Path),
    /// One round of the load client on its connection (the round's number
    /// given); false when a reply was not the expected one.
    load: fn(&mut Conn, u64) -> bool,
    /// The bytes a probe's request stands for.
    request_bytes: fn(&str) -> Vec<u8>,
    /// Environment variables the server must not inherit.
    env_remove: &'static [&'static str],
}

/// What the server does with a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reply {
    /// Replies exactly these bytes.
    Bytes(&'static str),
    /// Replies bytes starting with these.
    Starts(&'static str),
    /// Replies bytes containing these.
    Contains(&'static str),
    /// Replies, and the reply does not contain these bytes.
    Lacks(&'static str),
    /// Every one of these.
    All(&'static [Reply]),
    /// Closes the connection without a reply.
    Closed,
    /// Keeps the connection open and says nothing (waits for more).
    Silent,
    /// Writes this to its log (its output on stdout and stderr).
    Logs(&'static str),
}

/// A request sent over a fresh connection, and the server's answer
/// without the fix (`old`) and with it (`new`).
#[derive(Debug, Clone, Copy)]
struct Probe {
    request: &'static str,
    old: Reply,
    new: Reply,
}

/// What a correct tool does with the fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Builds a patch that, applied, changes the probe's answer.
    Effective,
    /// Refuses it (what changed cannot be patched, or is not code).
    Refused,
    /// Says "no change" (exit 5): nothing that runs differs.
    NoChange,
}

#[derive(Clone, Copy)]
struct Fix {
    name: &'static str,
    diff: &'static str,
    what: &'static str,
    expect: Expect,
    probe: Option<Probe>,
}

/// `fix!("SERVICE", "NAME", "what", Expect::..., probe)`: the diff is
/// `tests/corpus/SERVICE/fixes/NAME.diff`.
macro_rules! fix {
    ($service:literal, $name:literal, $what:literal, $expect:expr, $probe:expr) => {
        Fix {
            name: $name,
            diff: include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/corpus/",
                $service,
                "/fixes/",
                $name,
                ".diff"
            )),
            what: $what,
            expect: $expect,
            probe: $probe,
        }
    };
}
use fix;

const fn probe(request: &'static str, old: Reply, new: Reply) -> Option<Probe> {
    Some(Probe { request, old, new })
}

use Reply::*;

// ---- the short form ----

#[test]
fn corpus_diffs_apply() {
    for service in SERVICES {
        let corpus = Corpus::new(service, "check");
        corpus.make_repo(false);
        for fix in service.fixes {
            corpus.git(&["checkout", "--quiet", "--force", "v1"]);
            corpus.apply(fix.diff, "--check", fix.name);
        }
        corpus.git(&["checkout", "--quiet", "--force", "v1"]);
    }
}

#[test]
fn corpus_dufs_bin_only_runs_the_marked_run_s_fixes() {
    // The same fixes in the same order, each with its probe and expected
    // answer; only #753's diff is its own (made on the unmarked source).
    let (marked, bare) = (dufs::SERVICE.fixes, dufs::SERVICE_BIN_ONLY.fixes);
    assert_eq!(marked.len(), bare.len());
    for (m, b) in marked.iter().zip(bare) {
        assert_eq!((m.name, m.what, m.expect), (b.name, b.what, b.expect));
        assert_eq!(
            m.diff == b.diff,
            m.name != "upstream-753-range-count",
            "{}",
            m.name
        );
    }
}

// ---- the whole run ----

#[test]
#[ignore = "release builds of a real service: minutes per fix; .ci/corpus runs four fixes, the whole run is by hand with --ignored"]
fn corpus_mini_redis() {
    run_service(&mini_redis::SERVICE);
}

#[test]
#[ignore = "release builds of a real service: minutes per fix; .ci/corpus runs four fixes, the whole run is by hand with --ignored"]
fn corpus_dufs() {
    run_service(&dufs::SERVICE);
}

#[test]
#[ignore = "release builds of a real service: minutes per fix; the whole run is by hand with --ignored"]
fn corpus_dufs_bin_only() {
    run_service(&dufs::SERVICE_BIN_ONLY);
}

/// Held by a whole run: two at once would share two cores and the
/// builds' deadline.
static ONE_RUN: Mutex<()> = Mutex::new(());

fn run_service(service: &'static Service) {
    let _one = ONE_RUN.lock().unwrap_or_else(|e| e.into_inner());
    let budget = Duration::from_secs(
        std::env::var("HOTPATCH_CORPUS_BUDGET")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3600),
    );
    let only: Vec<String> = std::env::var("HOTPATCH_CORPUS_ONLY")
        .map(|s| s.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    let start = Instant::now();
    // `HOTPATCH_CORPUS_CGU1=1`: the same with `codegen-units = 1` in the
    // release profile (not what users deploy: a diagnostic of what the
    // default profile's refusals hide).
    let cgu1 = std::env::var_os("HOTPATCH_CORPUS_CGU1").is_some_and(|v| v == "1");
    let corpus = Corpus::new(service, if cgu1 { "run-cgu1" } else { "run" });
    corpus.make_repo(true);
    if cgu1 {
        let manifest = corpus.repo.join("Cargo.toml");
        let text = std::fs::read_to_string(&manifest).unwrap();
        std::fs::write(
            &manifest,
            format!("{text}\n[profile.release]\ncodegen-units = 1\n"),
        )
        .unwrap();
        corpus.commit("v1: codegen-units = 1");
        corpus.git(&["tag", "--force", "v1"]);
    }
    let hotpatch = corpus.hotpatch_cli();

    let t = Instant::now();
    let v1 = corpus.build_v1();
    let v1_build = t.elapsed();
    let mut server = Server::start(&corpus, &v1);

    let mut rows = Vec::new();
    for fix in service.fixes {
        if !only.is_empty() && !only.iter().any(|w| fix.name.contains(w.as_str())) {
            continue;
        }
        if start.elapsed() > budget {
            rows.push(Row::new(fix, "not run (budget spent)".into(), None, false));
            continue;
        }
        let row = run_fix(&corpus, &hotpatch, &mut server, &v1, fix);
        println!("{}", row.line());
        rows.push(row);
    }
    let report = report(service, &rows, v1_build, cgu1);
    std::fs::write(corpus.dir.join("report.md"), &report).unwrap();
    println!("\n{report}");
    let wrong: Vec<&Row> = rows.iter().filter(|r| r.wrong).collect();
    assert!(
        wrong.is_empty(),
        "{} wrong answer(s): {:?}",
        wrong.len(),
        wrong.iter().map(|r| r.name).collect::<Vec<_>>()
    );
}

struct Row {
    name: &'static str,
    what: &'static str,
    expect: Expect,
    outcome: String,
    tool_secs: Option<f64>,
    wrong: bool,
}

impl Row {
    fn new(fix: &Fix, outcome: String, tool_secs: Option<f64>, wrong: bool) -> Row {
        Row {
            name: fix.name,
            what: fix.what,
            expect: fix.expect,
            outcome,
            tool_secs,
            wrong,
        }
    }

    fn line(&self) -> String {
        format!(
            "| {} | {} | {:?} | {}{} | {} |",
            self.name,
            self.what,
            self.expect,
            if self.wrong { "**WRONG**: " } else { "" },
            self.outcome.replace('|', "\\|").replace('\n', "<br>"),
            self.tool_secs
                .map(|s| format!("{s:.0} s"))
                .unwrap_or_default()
        )
    }
}

fn report(service: &Service, rows: &[Row], v1_build: Duration, cgu1: bool) -> String {
    let effective = rows
        .iter()
        .filter(|r| r.outcome.starts_with("applied, effective"))
        .count();
    let wrong = rows.iter().filter(|r| r.wrong).count();
    let mut s = format!(
        "{} {}, {} release profile: {effective} of {} fixes built, applied \
         and effective; {wrong} wrong answer(s). v1's `cargo build --release` (this run's \
         target directory): {:.0} s.\n\n| fix | what | a right answer | outcome | cargo hotpatch build |\n| --- | --- | --- | --- | --- |\n",
        service.scratch,
        service.version,
        if cgu1 {
            "`codegen-units = 1`"
        } else {
            "default"
        },
        rows.len(),
        v1_build.as_secs_f64()
    );
    for r in rows {
        s.push_str(&r.line());
        s.push('\n');
    }
    s
}

fn run_fix(corpus: &Corpus, hotpatch: &Path, server: &mut Server, v1: &Path, fix: &Fix) -> Row {
    let branch = corpus.branch(fix);
    let out = corpus.dir.join("out").join(format!("{}.so", fix.name));
    let _ = std::fs::remove_file(&out);
    let t = Instant::now();
    let built = corpus.tool(&[
        "build",
        "--base",
        "v1",
        "--head",
        &branch,
        "-p",
        corpus.service.name,
        "--release",
        "--binary",
        v1.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    let secs = Some(t.elapsed().as_secs_f64());
    let stdout = String::from_utf8_lossy(&built.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&built.stderr).into_owned();
    let code = built.status.code();
    // The tool's whole answer (the log keeps the last lines only): every
    // refusal's reasons, verbatim.
    std::fs::write(
        corpus.dir.join("out").join(format!("{}.log", fix.name)),
        format!("exit {code:?}\n--- stdout\n{stdout}--- stderr\n{stderr}"),
    )
    .unwrap();
    // The `refused:` lines up to their first `:` after the item (the
    // item and what happened to it), else the last lines.
    let reasons = |text: &str| -> String {
        let lines: Vec<String> = text
            .lines()
            .filter_map(|l| l.strip_prefix("refused: "))
            .map(|l| match l.find(", but") {
                Some(at) => l[..at].to_owned(),
                None => l.chars().take(200).collect(),
            })
            .collect();
        if lines.is_empty() {
            text.lines()
                .rev()
                .filter(|l| !l.starts_with("cargo-hotpatch: checking out"))
                .take(2)
                .collect::<Vec<_>>()
                .join("\n")
        } else {
            lines.join("\n")
        }
    };
    match code {
        Some(0) => {}
        Some(3) => {
            // A change that needs no patch must not be refused either.
            let wrong = fix.expect == Expect::NoChange;
            return Row::new(
                fix,
                format!("refused (exit 3): {}", reasons(&stderr)),
                secs,
                wrong,
            );
        }
        Some(5) => {
            let wrong = fix.expect == Expect::Effective;
            return Row::new(
                fix,
                format!(
                    "no change (exit 5): {}",
                    reasons(&format!("{stdout}{stderr}"))
                ),
                secs,
                wrong,
            );
        }
        other => {
            return Row::new(
                fix,
                format!("tool error (exit {other:?}): {}", reasons(&stderr)),
                secs,
                true,
            );
        }
    }
    let listed: Vec<&str> = stdout
        .lines()
        .filter(|l| {
            let l = l.trim_start();
            l.starts_with("replaced") || l.starts_with("included") || l.starts_with("hooked")
        })
        .collect();
    let size = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
    let built_what = format!("{} bytes, {}", size, listed.join("; "));
    if fix.expect != Expect::Effective {
        return Row::new(
            fix,
            format!("built a patch for a change that needs none: {built_what}"),
            secs,
            true,
        );
    }
    let Some(probe) = fix.probe else {
        return Row::new(
            fix,
            format!("built ({built_what}), not probed"),
            secs,
            false,
        );
    };
    let before = server.probe(probe.request);
    if !probe.old.matches(&before) {
        return Row::new(
            fix,
            format!("the probe's premise failed: v1 answered {before:?}"),
            secs,
            true,
        );
    }
    let load = Load::start(server);
    let applied = hotpatch_cli(
        hotpatch,
        &corpus.sock,
        &["apply", out.to_str().unwrap(), "--pid", &server.pid()],
    );
    if !applied.status.success() {
        load.stop();
        return Row::new(
            fix,
            format!(
                "built ({built_what}), apply refused: {}",
                String::from_utf8_lossy(&applied.stderr).trim()
            ),
            secs,
            true,
        );
    }
    let during = server.probe(probe.request);
    let id = patch_id(&String::from_utf8_lossy(&applied.stdout));
    let reverted = hotpatch_cli(
        hotpatch,
        &corpus.sock,
        &["revert", &id, "--pid", &server.pid()],
    );
    let after = server.probe(probe.request);
    let (requests, errors) = load.stop();
    let effective = probe.new.matches(&during);
    let mut outcome = if effective {
        format!("applied, effective ({built_what})")
    } else {
        format!("applied, NOT effective: answered {during:?} ({built_what})")
    };
    outcome.push_str(&format!(
        "; load: {requests} requests, {errors} client errors"
    ));
    let back = reverted.status.success() && probe.old.matches(&after);
    if !back {
        outcome.push_str(&format!(
            "; revert: {} then {after:?}",
            String::from_utf8_lossy(&reverted.stderr).trim()
        ));
    }
    Row::new(fix, outcome, secs, !effective || !back || errors > 0)
}

/// `#N` in `applied patch #N ...`.
fn patch_id(stdout: &str) -> String {
    let at = stdout.find('#').expect("a patch id in apply's output");
    stdout[at + 1..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect()
}

fn hotpatch_cli(bin: &Path, sock: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(bin);
    cmd.args(args).env("HOTPATCH_SOCKET_DIR", sock);
    run(cmd, &format!("hotpatch {}", args.join(" ")))
}

impl Reply {
    fn matches(&self, seen: &Seen) -> bool {
        match (self, seen) {
            (Bytes(b), Seen::Reply(r, _)) => r == b,
            (Starts(b), Seen::Reply(r, _)) => r.starts_with(b),
            (Contains(b), Seen::Reply(r, _)) => r.contains(b),
            (Lacks(b), Seen::Reply(r, _)) => !r.contains(b),
            (All(all), seen) => all.iter().all(|r| r.matches(seen)),
            (Closed, Seen::Closed(r, _)) => r.is_empty(),
            (Silent, Seen::Silent(r, _)) => r.is_empty(),
            (Logs(l), Seen::Reply(_, log) | Seen::Closed(_, log) | Seen::Silent(_, log)) => {
                log.contains(l)
            }
            _ => false,
        }
    }
}

/// What a probe saw: the reply bytes, and whether the server then closed
/// the connection or went quiet; and what the server logged meanwhile.
#[derive(Debug)]
enum Seen {
    Reply(String, String),
    Closed(String, String),
    Silent(String, String),
}

// ---- the scratch directory, the repository, the builds ----

struct Corpus {
    service: &'static Service,
    /// `$CARGO_TARGET_TMPDIR/corpus/NAME/run` or `/check`.
    dir: PathBuf,
    repo: PathBuf,
    target: PathBuf,
    sock: PathBuf,
    /// The server's own directory (what a file server serves).
    data: PathBuf,
}

impl Corpus {
    /// `run` for the whole run, `check` for the short form (each its
    /// own repository; one target directory).
    fn new(service: &'static Service, sub: &str) -> Corpus {
        let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join("corpus")
            .join(service.scratch);
        let dir = root.join(sub);
        let corpus = Corpus {
            service,
            repo: dir.join("repo"),
            // One target directory per service, for both repositories.
            target: root.join("target"),
            sock: dir.join("sock"),
            data: dir.join("data"),
            dir,
        };
        for d in [&corpus.dir, &corpus.sock, &corpus.dir.join("out")] {
            std::fs::create_dir_all(d).unwrap();
        }
        // The control socket's directory: the service's own, 0700.
        hotpatch_test_support::set_mode(&corpus.sock, 0o700);
        corpus
    }

    /// The published source: downloaded by cargo (a `cargo metadata` of a
    /// package depending on it; a crate with no library is downloaded too,
    /// though not listed) and unpacked from cargo's registry cache into
    /// `source/`.
    fn source(&self) -> PathBuf {
        let (name, version) = (self.service.name, self.service.version);
        let fetch = self.dir.join("fetch");
        std::fs::create_dir_all(fetch.join("src")).unwrap();
        std::fs::write(
            fetch.join("Cargo.toml"),
            format!(
                "[package]\nname = \"corpus-fetch\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\
                 publish = false\n\n[dependencies]\n{name} = \"={version}\"\n\n[workspace]\n"
            ),
        )
        .unwrap();
        std::fs::write(fetch.join("src/lib.rs"), "").unwrap();
        let mut cmd = self.cargo();
        cmd.args(["metadata", "--format-version", "1"])
            .current_dir(&fetch)
            .stdout(Stdio::null());
        let out = run(cmd, &format!("cargo metadata ({name} {version})"));
        assert!(out.status.success(), "cargo metadata failed");
        let cargo_home = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
            .expect("CARGO_HOME or HOME");
        let file = format!("{name}-{version}.crate");
        let packed = std::fs::read_dir(cargo_home.join("registry/cache"))
            .unwrap()
            .map(|e| e.unwrap().path().join(&file))
            .find(|p| p.is_file())
            .unwrap_or_else(|| panic!("{file} not in cargo's registry cache"));
        let unpacked = self.dir.join("source");
        if unpacked.exists() {
            std::fs::remove_dir_all(&unpacked).unwrap();
        }
        std::fs::create_dir_all(&unpacked).unwrap();
        let status = Command::new("tar")
            .arg("-xzf")
            .arg(&packed)
            .arg("-C")
            .arg(&unpacked)
            .status()
            .unwrap();
        assert!(status.success(), "tar -xzf {}", packed.display());
        unpacked.join(format!("{name}-{version}"))
    }

    /// `repo/`: the published source committed as `upstream`, then the
    /// marking as `v1`. With `lock`, v1's Cargo.lock is completed by cargo
    /// (hotpatch's dependencies as this workspace has them) before it is
    /// committed.
    fn make_repo(&self, lock: bool) {
        let source = self.source();
        if self.repo.exists() {
            std::fs::remove_dir_all(&self.repo).unwrap();
        }
        copy_tree(&source, &self.repo);
        for generated in [".cargo_vcs_info.json", ".cargo-ok"] {
            let _ = std::fs::remove_file(self.repo.join(generated));
        }
        self.git(&["init", "--quiet", "-b", "main"]);
        self.commit("upstream");
        self.apply(self.service.mark, "", "mark.diff");
        let manifest = self.repo.join("Cargo.toml");
        let text = std::fs::read_to_string(&manifest).unwrap();
        let hotpatch = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../hotpatch")
            .canonicalize()
            .unwrap();
        std::fs::write(
            &manifest,
            text.replace("@HOTPATCH@", hotpatch.to_str().unwrap()),
        )
        .unwrap();
        std::fs::write(self.repo.join("Cargo.lock"), self.service.lock).unwrap();
        if lock {
            let mut cmd = self.cargo();
            cmd.args(["metadata", "--format-version", "1"])
                .current_dir(&self.repo)
                .stdout(Stdio::null());
            assert!(run(cmd, "cargo metadata (v1's lock)").status.success());
        }
        self.commit("v1: marked");
        self.git(&["tag", "--force", "v1"]);
    }

    fn apply(&self, diff: &str, flag: &str, what: &str) {
        let mut cmd = Command::new("git");
        cmd.arg("apply");
        if !flag.is_empty() {
            cmd.arg(flag);
        }
        let mut child = cmd
            .arg("-")
            .current_dir(&self.repo)
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(diff.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{what} does not apply to {} {}:\n{}",
            self.service.name,
            self.service.version,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn commit(&self, message: &str) {
        self.git(&["add", "--all"]);
        self.git(&["commit", "--quiet", "--allow-empty", "-m", message]);
    }

    /// Branch `fix/NAME`: v1 with the fix's diff, committed.
    fn branch(&self, fix: &Fix) -> String {
        let branch = format!("fix/{}", fix.name);
        self.git(&["checkout", "--quiet", "--force", "-B", &branch, "v1"]);
        self.apply(fix.diff, "", fix.name);
        self.commit(fix.name);
        self.git(&["checkout", "--quiet", "--force", "main"]);
        self.git(&["reset", "--quiet", "--hard", "v1"]);
        branch
    }

    fn git(&self, args: &[&str]) -> String {
        let out = Command::new("git")
            .args(args)
            .current_dir(&self.repo)
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_AUTHOR_NAME", "corpus")
            .env("GIT_AUTHOR_EMAIL", "corpus@example.invalid")
            .env("GIT_COMMITTER_NAME", "corpus")
            .env("GIT_COMMITTER_EMAIL", "corpus@example.invalid")
            .env("GIT_AUTHOR_DATE", "2025-01-01T00:00:00Z")
            .env("GIT_COMMITTER_DATE", "2025-01-01T00:00:00Z")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// v1 in release, as deployed: its server binary copied to `bin/`.
    fn build_v1(&self) -> PathBuf {
        let mut cmd = self.cargo();
        cmd.args(["build", "--release", "--locked"])
            .current_dir(&self.repo);
        let out = run(cmd, "cargo build --release (v1)");
        assert!(
            out.status.success(),
            "v1 does not build:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bin = self.dir.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let to = bin.join(self.service.bin);
        std::fs::copy(self.target.join("release").join(self.service.bin), &to).unwrap();
        to
    }

    /// cargo for the service's workspace, in its target directory.
    fn cargo(&self) -> Command {
        let mut cmd = hotpatch_test_support::outside_cargo();
        cmd.env("CARGO_TARGET_DIR", &self.target);
        cmd
    }

    /// `cargo hotpatch ARGS` in the repository.
    fn tool(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cargo-hotpatch"));
        cmd.arg("hotpatch")
            .args(args)
            .current_dir(&self.repo)
            .env("CARGO_TARGET_DIR", &self.target);
        run(cmd, &format!("cargo hotpatch {}", args.join(" ")))
    }

    /// The `hotpatch` tool of this workspace, built if needed.
    fn hotpatch_cli(&self) -> PathBuf {
        let mut cmd = hotpatch_test_support::cargo();
        cmd.args(["build", "-q", "-p", "hotpatch-cli", "--message-format=json"]);
        let out = run(cmd, "cargo build -p hotpatch-cli");
        assert!(out.status.success(), "building the hotpatch tool failed");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|m| m["executable"].as_str().map(PathBuf::from))
            .find(|p| p.file_name().is_some_and(|n| n == "hotpatch"))
            .expect("the hotpatch executable")
    }
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let path = entry.path();
        if entry.file_type().unwrap().is_dir() {
            if entry.file_name() != "target" {
                copy_tree(&path, &to.join(entry.file_name()));
            }
        } else {
            std::fs::copy(&path, to.join(entry.file_name())).unwrap();
        }
    }
}

/// Runs `cmd` to its end, or kills it at [`BUILD_DEADLINE`] and panics.
fn run(mut cmd: Command, what: &str) -> Output {
    println!("$ {what}");
    let t = Instant::now();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let pid = child.id();
    let done = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let done = done.clone();
        std::thread::spawn(move || {
            while t.elapsed() < BUILD_DEADLINE {
                // Relaxed: a flag polled by this thread alone.
                if done.load(Ordering::Relaxed) {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            // SAFETY: kill(2) of the child this process started and has not
            // reaped yet (`wait_with_output` below reaps it).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            true
        })
    };
    let out = child.wait_with_output().unwrap();
    // Relaxed: see above.
    done.store(true, Ordering::Relaxed);
    assert!(
        !watchdog.join().unwrap(),
        "{what}: still running after {BUILD_DEADLINE:?}: killed"
    );
    println!(
        "  {} after {:.1} s\n{}{}",
        out.status,
        t.elapsed().as_secs_f64(),
        tail(&out.stdout),
        tail(&out.stderr)
    );
    out
}

/// The last lines of a process's output, for the log (`cargo metadata`
/// prints megabytes on one line).
fn tail(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().rev().take(40).collect();
    let mut out = String::new();
    for l in lines.into_iter().rev() {
        let cut: String = l.chars().take(2000).collect();
        out.push_str("    ");
        out.push_str(&cut);
        out.push('\n');
    }
    out
}

// ---- the running server and its clients ----

struct Server {
    service: &'static Service,
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Server {
    fn start(corpus: &Corpus, bin: &Path) -> Server {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let log = corpus.dir.join("server.log");
        let log_file = std::fs::File::create(&log).unwrap();
        let service = corpus.service;
        if corpus.data.exists() {
            std::fs::remove_dir_all(&corpus.data).unwrap();
        }
        std::fs::create_dir_all(&corpus.data).unwrap();
        (service.prepare)(&corpus.data);
        let mut cmd = Command::new(bin);
        cmd.args((service.args)(port, &corpus.data))
            .env("HOTPATCH_SOCKET_DIR", &corpus.sock);
        for var in service.env_remove {
            cmd.env_remove(var);
        }
        let child = cmd
            .stdin(Stdio::null())
            // Both outputs are the log the probes read.
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .unwrap();
        let server = Server {
            service,
            child,
            port,
            log,
        };
        let t = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "the server does not listen"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    fn log_len(&self) -> usize {
        std::fs::metadata(&self.log).map_or(0, |m| m.len() as usize)
    }

    /// Sends `request` on a new connection; reads until the server closes
    /// it or says nothing for [`QUIET`].
    fn probe(&self, request: &str) -> Seen {
        let log_from = self.log_len();
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(QUIET)).unwrap();
        s.write_all(&(self.service.request_bytes)(request)).unwrap();
        let mut reply = Vec::new();
        let mut buf = [0u8; 4096];
        let closed = loop {
            match s.read(&mut buf) {
                Ok(0) => break true,
                Ok(n) => reply.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break false;
                }
                Err(_) => break true,
            }
        };
        let _ = s.shutdown(Shutdown::Both);
        // The server logs a connection's end after it closed it.
        std::thread::sleep(Duration::from_millis(300));
        let log = std::fs::read(&self.log).unwrap_or_default();
        let log = String::from_utf8_lossy(log.get(log_from..).unwrap_or_default()).into_owned();
        let reply = String::from_utf8_lossy(&reply).into_owned();
        let seen = match (closed, reply.is_empty()) {
            (true, _) => Seen::Closed(reply, log),
            (false, true) => Seen::Silent(reply, log),
            (false, false) => Seen::Reply(reply, log),
        };
        // A reply followed by close is a reply for the `Bytes` probes.
        match seen {
            Seen::Closed(r, l) if !r.is_empty() => Seen::Reply(r, l),
            other => other,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client on its own connection running the service's load rounds in
/// a loop, every reply checked, until stopped; after a wrong reply it
/// counts an error and connects again.
struct Load {
    stop: Arc<AtomicBool>,
    requests: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

impl Load {
    fn start(server: &Server) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let (port, round) = (server.port, server.service.load);
        let thread = {
            let (stop, requests, errors) = (stop.clone(), requests.clone(), errors.clone());
            std::thread::spawn(move || {
                let Ok(mut conn) = Conn::connect(port) else {
                    // Relaxed: counters read after the thread is joined.
                    errors.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                let mut i = 0u64;
                // Relaxed: a stop flag; nothing else is published with it.
                while !stop.load(Ordering::Relaxed) {
                    let ok = round(&mut conn, i);
                    // Relaxed: counters read after the thread is joined.
                    requests.fetch_add(conn.take_sent(), Ordering::Relaxed);
                    if !ok {
                        errors.fetch_add(1, Ordering::Relaxed);
                        match Conn::connect(port) {
                            Ok(n) => conn = n,
                            Err(_) => return,
                        }
                    }
                    i += 1;
                }
            })
        };
        Load {
            stop,
            requests,
            errors,
            thread,
        }
    }

    /// Stops the client; returns (requests, errors).
    fn stop(self) -> (u64, u64) {
        // Relaxed: see `start`.
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
        (
            self.requests.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
        )
    }
}

/// The load client's connection: buffered reads, and a count of the
/// requests sent.
struct Conn {
    reader: BufReader<TcpStream>,
    sent: u64,
}

impl Conn {
    fn connect(port: u16) -> std::io::Result<Conn> {
        let s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Conn {
            reader: BufReader::new(s),
            sent: 0,
        })
    }

    /// Sends one request.
    fn send(&mut self, request: &[u8]) -> bool {
        self.sent += 1;
        self.reader.get_mut().write_all(request).is_ok()
    }

    /// The requests sent since the last call.
    fn take_sent(&mut self) -> u64 {
        std::mem::take(&mut self.sent)
    }

    /// Sends `request`, reads exactly `expected.len()` bytes, compares.
    fn exchange(&mut self, request: &str, expected: &str) -> bool {
        if !self.send(request.as_bytes()) {
            return false;
        }
        let mut got = vec![0u8; expected.len()];
        self.reader.read_exact(&mut got).is_ok() && got == expected.as_bytes()
    }

    /// Reads one HTTP/1.1 response with a `content-length`: its status
    /// code and body.
    fn http_response(&mut self) -> Option<(u16, Vec<u8>)> {
        let mut status_line = String::new();
        self.reader.read_line(&mut status_line).ok()?;
        let status = status_line.split(' ').nth(1)?.parse().ok()?;
        let mut length = None;
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line).ok()? == 0 {
                return None;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':')?;
            if name.eq_ignore_ascii_case("content-length") {
                length = Some(value.trim().parse::<usize>().ok()?);
            }
        }
        let mut body = vec![0; length?];
        self.reader.read_exact(&mut body).ok()?;
        Some((status, body))
    }
}
