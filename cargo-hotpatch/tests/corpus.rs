//! The corpus: `cargo hotpatch build --base` on a real tokio network
//! service written by others, with realistic fixes, applied under a
//! client's load and observed from outside (issue 23).
//!
//! The service is mini-redis 0.4.1, downloaded from crates.io at test time
//! (through cargo, into `$CARGO_TARGET_TMPDIR/corpus/`): this repository
//! holds only what is ours, as diffs in `tests/corpus/mini-redis/`: the
//! marking (`mark.diff`: every function `#[patchable]` accepts marked, the
//! host setting in `build.rs`, the control endpoint in the server's
//! `main`), a `Cargo.lock` (the published one pins tokio 1.8 and tracing
//! 0.1.26, older than hotpatch needs), and one diff per fix (`fixes/`):
//! parsing, limits, state, error replies, async handlers, an error type,
//! fixes from the project's own history after 0.4.1 (the upstream commit
//! in the name) re-applied on 0.4.1, a comment-only change and a change of
//! the binary crate.
//!
//! The harness makes a git repository of the source, commits it, applies
//! the marking and tags `v1`, builds it with `cargo build --release` (the
//! default release profile: 16 codegen units, no LTO) and runs the
//! server. For each fix it commits a branch on v1, runs `cargo hotpatch
//! build --base v1 --head BRANCH -p mini-redis --release --binary <the
//! running server>`, and when a patch is built applies it with the
//! `hotpatch` tool while a client keeps sending SET/GET on its own
//! connection, probes the server over the Redis protocol (or reads its
//! log), reverts, and probes again. Each fix gets one outcome: built and
//! effective, built and not effective, refused (with the tool's reasons),
//! no change, tool error. A wrong answer (a false "no change", a patch
//! that changes nothing, a tool error, a patch for a change that needs
//! none) fails the run; the table is written to
//! `$CARGO_TARGET_TMPDIR/corpus/mini-redis/run/report.md` and printed.
//!
//! - `corpus_diffs_apply` (always runs, seconds once the crate is in
//!   cargo's cache): the marking and every fix apply to the pinned source.
//! - `corpus_mini_redis` (ignored: release builds, about 2 to 5 minutes per
//!   fix on two cores, 10 for the first): the whole run.
//!   `HOTPATCH_CORPUS_BUDGET=SECS` (default 3600) stops starting fixes
//!   once spent (they are listed as not run); `HOTPATCH_CORPUS_ONLY=a,b`
//!   runs only the fixes whose names contain one of the words.
//!   `cargo test -p cargo-hotpatch --test corpus -- --ignored --nocapture`

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const CRATE: &str = "mini-redis";
const VERSION: &str = "0.4.1";
const MARK: &str = include_str!("corpus/mini-redis/mark.diff");
const LOCK: &str = include_str!("corpus/mini-redis/Cargo.lock");

/// How long the server may take to say nothing more: a probe whose
/// answer is "no reply" waits this long for one.
const QUIET: Duration = Duration::from_secs(2);
/// A tool run or build that takes longer has hung.
const BUILD_DEADLINE: Duration = Duration::from_secs(1500);

/// What the server does with a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reply {
    /// Replies exactly these bytes.
    Bytes(&'static str),
    /// Replies bytes starting with these.
    Starts(&'static str),
    /// Closes the connection without a reply.
    Closed,
    /// Keeps the connection open and says nothing (waits for more).
    Silent,
    /// Writes this to its log (tracing's output on stderr).
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

struct Fix {
    name: &'static str,
    diff: &'static str,
    what: &'static str,
    expect: Expect,
    probe: Option<Probe>,
}

macro_rules! fix {
    ($name:literal, $what:literal, $expect:expr, $probe:expr) => {
        Fix {
            name: $name,
            diff: include_str!(concat!("corpus/mini-redis/fixes/", $name, ".diff")),
            what: $what,
            expect: $expect,
            probe: $probe,
        }
    };
}

const fn probe(request: &'static str, old: Reply, new: Reply) -> Option<Probe> {
    Some(Probe { request, old, new })
}

use Reply::*;

/// The fixes, in the order they run.
const FIXES: &[Fix] = &[
    fix!(
        "upstream-8ca8bbe-publish-name",
        "error reply: PUBLISH in subscribe mode is named 'publish' (Command::get_name)",
        Expect::Effective,
        probe(
            "*2\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n*3\r\n$7\r\npublish\r\n$2\r\nch\r\n$1\r\nm\r\n",
            Bytes("*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n-ERR unknown command 'pub'\r\n"),
            Bytes("*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n-ERR unknown command 'publish'\r\n"),
        )
    ),
    fix!(
        "comment-only",
        "a doc comment of Frame::check",
        Expect::NoChange,
        None
    ),
    fix!(
        "parse-integer-argument",
        "parsing: an integer frame is a string argument (Parse::next_string)",
        Expect::Effective,
        probe("*2\r\n$3\r\nGET\r\n:5\r\n", Closed, Bytes("$-1\r\n"))
    ),
    fix!(
        "limit-unknown-command-name",
        "limits: an unknown command's name is echoed up to 16 bytes (Unknown::new, generic)",
        Expect::Effective,
        probe(
            "*1\r\n$24\r\nabcdefghijklmnopqrstuvwx\r\n",
            Bytes("-ERR unknown command 'abcdefghijklmnopqrstuvwx'\r\n"),
            Bytes("-ERR unknown command 'abcdefghijklmnop'\r\n"),
        )
    ),
    fix!(
        "async-error-reply-unknown",
        "error reply, async handler: Redis's text for an unknown command (Unknown::apply)",
        Expect::Effective,
        probe(
            "*1\r\n$3\r\nfoo\r\n",
            Bytes("-ERR unknown command 'foo'\r\n"),
            Bytes("-ERR unknown command 'foo', with args beginning with: \r\n"),
        )
    ),
    fix!(
        "async-handler-reply-parse-error",
        "async handler: a command that does not parse gets an error reply, the connection stays (Handler::run)",
        Expect::Effective,
        probe(
            "*1\r\n:5\r\n",
            Closed,
            Starts("-ERR protocol error; expected simple frame or bulk frame"),
        )
    ),
    fix!(
        "upstream-3d93b42-null-bulk",
        "parsing: a null bulk string must be $-1 (Frame::check)",
        Expect::Effective,
        probe("*1\r\n$-\r\n", Silent, Closed)
    ),
    fix!(
        "limit-array-length",
        "limits: arrays of more than 1024 frames are refused (Frame::check)",
        Expect::Effective,
        probe("*5000\r\n", Silent, Closed)
    ),
    fix!(
        "limit-bulk-length",
        "limits: bulk strings over 512 MiB are refused (Frame::check)",
        Expect::Effective,
        probe("*1\r\n$999999999999\r\n", Silent, Closed)
    ),
    fix!(
        "limit-read-buffer",
        "limits: an incomplete frame may not grow the read buffer past 64 KiB (Connection::parse_frame)",
        Expect::Effective,
        Some(Probe {
            request: LARGE_INCOMPLETE,
            old: Silent,
            new: Closed,
        })
    ),
    fix!(
        "limit-set-zero-expiry",
        "state: SET with PX 0 is an error, not a key that expires at once (Set::parse_frames)",
        Expect::Effective,
        probe(
            "*5\r\n$3\r\nSET\r\n$1\r\nz\r\n$1\r\nv\r\n$2\r\nPX\r\n$1\r\n0\r\n",
            Bytes("+OK\r\n"),
            Closed,
        )
    ),
    fix!(
        "parse-integer-value",
        "parsing: an integer frame is a value (Parse::next_bytes)",
        Expect::Effective,
        probe(
            "*3\r\n$3\r\nSET\r\n$1\r\nn\r\n:7\r\n",
            Closed,
            Bytes("+OK\r\n")
        )
    ),
    fix!(
        "error-type-parse-error",
        "error type: ParseError from a message says where it came from (From<&str> for ParseError)",
        Expect::Effective,
        probe(
            "*5\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n$2\r\nEX\r\n$3\r\nabc\r\n",
            Logs("Other(\"protocol error; invalid number\")"),
            Logs("Other(\"parse: protocol error; invalid number\")"),
        )
    ),
    fix!(
        "upstream-ebe4e1f-shutdown-race",
        "state: the purge task stops when the listener's guard drops (new type, Listener's fields change)",
        Expect::Refused,
        None
    ),
    fix!(
        "binary-crate-log",
        "a log line in src/bin/server.rs (the binary crate)",
        Expect::Refused,
        None
    ),
];

/// Stands for `*1\r\n$100000\r\n` and 70,000 of its bytes: more than
/// 64 KiB buffered while the frame is still incomplete.
const LARGE_INCOMPLETE: &str = "@LARGE_INCOMPLETE@";

fn request_bytes(request: &str) -> Vec<u8> {
    if request == LARGE_INCOMPLETE {
        let mut r = b"*1\r\n$100000\r\n".to_vec();
        r.resize(r.len() + 70_000, b'x');
        r
    } else {
        request.as_bytes().to_vec()
    }
}

// ---- the short form ----

#[test]
fn corpus_diffs_apply() {
    let corpus = Corpus::new("check");
    corpus.make_repo(false);
    for fix in FIXES {
        corpus.git(&["checkout", "--quiet", "--force", "v1"]);
        corpus.apply(fix.diff, "--check", fix.name);
    }
    corpus.git(&["checkout", "--quiet", "--force", "v1"]);
}

// ---- the whole run ----

#[test]
#[ignore = "release builds of a real service: minutes per fix; run by hand with --ignored (not in .ci/run)"]
fn corpus_mini_redis() {
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
    let corpus = Corpus::new(if cgu1 { "run-cgu1" } else { "run" });
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
    for fix in FIXES {
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
    let report = report(&rows, v1_build, cgu1);
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

fn report(rows: &[Row], v1_build: Duration, cgu1: bool) -> String {
    let effective = rows
        .iter()
        .filter(|r| r.outcome.starts_with("applied, effective"))
        .count();
    let wrong = rows.iter().filter(|r| r.wrong).count();
    let mut s = format!(
        "mini-redis {VERSION}, {} release profile: {effective} of {} fixes built, applied \
         and effective; {wrong} wrong answer(s). v1's `cargo build --release` (this run's \
         target directory): {:.0} s.\n\n| fix | what | a right answer | outcome | cargo hotpatch build |\n| --- | --- | --- | --- | --- |\n",
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
        CRATE,
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
    let load = Load::start(server.port);
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

/// `$CARGO_TARGET_TMPDIR/corpus/mini-redis`.
fn corpus_root() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("corpus")
        .join(CRATE)
}

struct Corpus {
    /// `corpus_root()/run` or `/check`.
    dir: PathBuf,
    repo: PathBuf,
    target: PathBuf,
    sock: PathBuf,
}

impl Corpus {
    /// `run` for the whole run, `check` for the short form (each its
    /// own repository; one target directory).
    fn new(sub: &str) -> Corpus {
        let dir = corpus_root().join(sub);
        let corpus = Corpus {
            repo: dir.join("repo"),
            target: corpus_root().join("target"),
            sock: dir.join("sock"),
            dir,
        };
        for d in [&corpus.dir, &corpus.sock, &corpus.dir.join("out")] {
            std::fs::create_dir_all(d).unwrap();
        }
        // The control socket's directory: the service's own, 0700.
        hotpatch_test_support::set_mode(&corpus.sock, 0o700);
        corpus
    }

    /// The published source, unpacked by cargo: its directory in cargo's
    /// registry cache.
    fn source(&self) -> PathBuf {
        let fetch = self.dir.join("fetch");
        std::fs::create_dir_all(fetch.join("src")).unwrap();
        std::fs::write(
            fetch.join("Cargo.toml"),
            format!(
                "[package]\nname = \"corpus-fetch\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\
                 publish = false\n\n[dependencies]\n{CRATE} = \"={VERSION}\"\n\n[workspace]\n"
            ),
        )
        .unwrap();
        std::fs::write(fetch.join("src/lib.rs"), "").unwrap();
        let mut cmd = cargo();
        cmd.args(["metadata", "--format-version", "1"])
            .current_dir(&fetch);
        let out = run(cmd, &format!("cargo metadata ({CRATE} {VERSION})"));
        assert!(out.status.success(), "cargo metadata failed");
        let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let manifest = meta["packages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == CRATE && p["version"] == VERSION)
            .and_then(|p| p["manifest_path"].as_str())
            .unwrap_or_else(|| panic!("{CRATE} {VERSION} not in cargo metadata"));
        PathBuf::from(manifest).parent().unwrap().to_owned()
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
        self.apply(MARK, "", "mark.diff");
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
        std::fs::write(self.repo.join("Cargo.lock"), LOCK).unwrap();
        if lock {
            let mut cmd = cargo();
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
            "{what} does not apply to {CRATE} {VERSION}:\n{}",
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
        let mut cmd = cargo();
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
        let to = bin.join("mini-redis-server");
        std::fs::copy(self.target.join("release/mini-redis-server"), &to).unwrap();
        to
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

fn cargo() -> Command {
    let mut cmd = hotpatch_test_support::outside_cargo();
    cmd.env("CARGO_TARGET_DIR", corpus_root().join("target"));
    cmd
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
        let child = Command::new(bin)
            .args(["--port", &port.to_string()])
            .env("HOTPATCH_SOCKET_DIR", &corpus.sock)
            // tracing-subscriber 0.2 panics parsing any RUST_LOG with today's regex;
            // its default (errors) is what the probes read.
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            // tracing's fmt subscriber writes to stdout.
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .unwrap();
        let server = Server { child, port, log };
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
        s.write_all(&request_bytes(request)).unwrap();
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

/// A client on its own connection sending SET then GET of its own key in
/// a loop, checking every reply, until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    requests: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

impl Load {
    fn start(port: u16) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, requests, errors) = (stop.clone(), requests.clone(), errors.clone());
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let mut i = 0u64;
                // Relaxed: a stop flag; nothing else is published with it.
                while !stop.load(Ordering::Relaxed) {
                    let v = i.to_string();
                    let set = format!("*3\r\n$3\r\nSET\r\n$4\r\nload\r\n${}\r\n{v}\r\n", v.len());
                    let get = "*2\r\n$3\r\nGET\r\n$4\r\nload\r\n";
                    let ok = exchange(&mut s, &set, "+OK\r\n")
                        && exchange(&mut s, get, &format!("${}\r\n{v}\r\n", v.len()));
                    // Relaxed: counters read after the thread is joined.
                    requests.fetch_add(2, Ordering::Relaxed);
                    if !ok {
                        errors.fetch_add(1, Ordering::Relaxed);
                        match TcpStream::connect(("127.0.0.1", port)) {
                            Ok(n) => s = n,
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

/// Sends `request`, reads exactly `expected.len()` bytes, compares.
fn exchange(s: &mut TcpStream, request: &str, expected: &str) -> bool {
    if s.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut got = vec![0u8; expected.len()];
    s.read_exact(&mut got).is_ok() && got == expected.as_bytes()
}
