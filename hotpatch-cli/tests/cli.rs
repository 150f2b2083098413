//! The `hotpatch` binary against real service processes
//! (`tests/fixtures/control-svc`), each with a private socket directory:
//! every verb in text and JSON with its exit code, wrong arguments, a
//! stalled transition, bad input on the socket while the service serves,
//! peers of another uid, and the idle cost of the endpoint.
//!
//! The service and the patch crates are built by ONE nested cargo into
//! `target/fixtures` (so with the same features, hence the same symbol
//! names), and each patch crate's rlib is linked into a thin patch bound
//! to the control-svc binary with `cargo_hotpatch::link`, as `cargo
//! hotpatch build` does.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const SERVICE: &str = "fixture-control-svc";
const BASIC: &str = "fixture-patch-basic";
const V1: &str = "fixture-patch-replace-v1";
const V2: &str = "fixture-patch-replace-v2";
const BAD_RUSTC: &str = "fixture-patch-bad-rustc";
const WATCH_PANIC: &str = "fixture-patch-watch-panic";

/// A guard against hangs only: nothing here asserts on time.
const GUARD: Duration = Duration::from_secs(30);

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn profile() -> &'static str {
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }
}

/// Builds the service and the patches once per test process.
fn built() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = root().join("target").join("fixtures");
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.current_dir(root())
            .args(["build", "--quiet", "--target-dir"])
            .arg(&dir);
        for p in [SERVICE, BASIC, V1, V2, BAD_RUSTC, WATCH_PANIC] {
            cmd.args(["-p", p]);
        }
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        // As tests/support/mod.rs builds patches: no debug info.
        let env = if cfg!(debug_assertions) {
            "DEV"
        } else {
            "RELEASE"
        };
        cmd.env(format!("CARGO_PROFILE_{env}_DEBUG"), "0");
        assert!(
            cmd.status().unwrap().success(),
            "building the fixtures failed"
        );
        dir.join(profile())
    })
}

/// The fixture patch `package`, as a copy with modes the service's trust
/// policy accepts whatever the umask (under umask 002 cargo's output is
/// group-writable, and so is its directory), made once per process.
fn patch(package: &str) -> PathBuf {
    static COPIES: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let mut copies = COPIES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    copies
        .entry(package.to_owned())
        .or_insert_with(|| {
            let krate = package.replace('-', "_");
            let dir = scratch();
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
            let copy = dir.join(format!("lib{krate}.so"));
            let rlib = built().join(format!("lib{krate}.rlib"));
            let host = built().join("control-svc");
            cargo_hotpatch::link(&rlib, &host, &copy)
                .unwrap_or_else(|e| panic!("linking {package} against {}: {e}", host.display()));
            std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o644)).unwrap();
            copy
        })
        .clone()
}

/// Can everyone search every directory from `dir` up to `/`?
fn searchable_by_all(dir: &Path) -> bool {
    dir.ancestors()
        .all(|d| std::fs::metadata(d).is_ok_and(|m| m.is_dir() && m.mode() & 0o001 != 0))
}

extern "C" fn remove_scratch() {
    if let Some(base) = SCRATCH.get() {
        let _ = std::fs::remove_dir_all(base);
    }
}

static SCRATCH: OnceLock<PathBuf> = OnceLock::new();

/// This test process's scratch directory, searchable by everyone (the
/// uid 65534 test reaches a socket and a binary in it), wherever the
/// checkout is and whatever `TMPDIR` is: under the first of the temporary
/// directory, `/tmp`, `/var/tmp` and `/dev/shm` that everyone can search.
/// Each call makes a new subdirectory, mode 0755. Removed when the test
/// process exits.
fn scratch() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    // Relaxed: only uniqueness matters.
    let dir = scratch_base().join(format!("d{}", N.fetch_add(1, Ordering::Relaxed)));
    // Its mode, not the umask's: the service's trust policy checks the
    // directories of the files it stores there.
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn scratch_base() -> &'static Path {
    SCRATCH.get_or_init(|| {
        let candidates = [
            std::env::temp_dir(),
            "/tmp".into(),
            "/var/tmp".into(),
            "/dev/shm".into(),
        ];
        let parent = candidates
            .iter()
            .find(|c| searchable_by_all(c))
            .unwrap_or_else(|| panic!("none of {candidates:?} can be searched by other users"));
        let base = parent.join(format!("hotpatch-cli-tests-{}", std::process::id()));
        std::fs::create_dir_all(&base).unwrap();
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
        // SAFETY: registers a plain function with no captured state; it
        // runs once, at exit.
        unsafe { libc::atexit(remove_scratch) };
        base
    })
}

#[derive(Default)]
struct Seen {
    served: u64,
    wrong: u64,
    panicked: u64,
    lines: Vec<String>,
    /// Its stderr: the endpoint's `tracing` events.
    log: Vec<String>,
}

/// A running `control-svc`.
struct Service {
    child: Child,
    stdin: Option<ChildStdin>,
    seen: Arc<Mutex<Seen>>,
    socket: PathBuf,
    dir: PathBuf,
}

impl Service {
    fn start(name: &str, args: &[&str]) -> Service {
        Service::start_env(name, args, &[])
    }

    /// With these environment variables set in the service.
    fn start_env(name: &str, args: &[&str], env: &[(&str, &str)]) -> Service {
        let dir = scratch();
        std::fs::create_dir_all(&dir).unwrap();
        Service::start_in(&dir.join("sock"), name, args, env)
    }

    /// With its sockets in `sockets`.
    fn start_in(sockets: &Path, name: &str, args: &[&str], env: &[(&str, &str)]) -> Service {
        let sockets = sockets.to_owned();
        let mut child = Command::new(built().join("control-svc"))
            .arg("--socket-dir")
            .arg(&sockets)
            .args(["--name", name])
            .args(args)
            .env_remove("HOTPATCH_DISABLE")
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let err = child.stderr.take().unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let out = child.stdout.take().unwrap();
        {
            let seen = seen.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { return };
                    let mut s = seen.lock().unwrap();
                    let words: Vec<&str> = line.split(' ').collect();
                    if let ["served", n, "wrong", w, "panicked", p] = words[..] {
                        s.served = n.parse().unwrap();
                        s.wrong = w.parse().unwrap();
                        s.panicked = p.parse().unwrap();
                    } else {
                        s.lines.push(line);
                    }
                }
            });
        }
        {
            let seen = seen.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines() {
                    let Ok(line) = line else { return };
                    eprintln!("[service] {line}");
                    seen.lock().unwrap().log.push(line);
                }
            });
        }
        let mut service = Service {
            child,
            stdin,
            seen,
            socket: PathBuf::new(),
            dir: sockets,
        };
        let ready = service.wait_line(|l| l.starts_with("ready "));
        service.socket = PathBuf::from(ready.trim_start_matches("ready "));
        service
    }

    /// Waits for a line of its log matching `pred`.
    fn wait_log(&self, pred: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            if let Some(l) = self.seen.lock().unwrap().log.iter().find(|l| pred(l)) {
                return l.clone();
            }
            assert!(start.elapsed() < GUARD, "the service did not log the line");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait_line(&self, pred: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            if let Some(l) = self.seen.lock().unwrap().lines.iter().find(|l| pred(l)) {
                return l.clone();
            }
            assert!(
                start.elapsed() < GUARD,
                "the service did not print the line"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn served(&self) -> u64 {
        let s = self.seen.lock().unwrap();
        assert_eq!(s.wrong, 0, "the service saw wrong answers");
        s.served
    }

    /// Waits until the service has served more than `than`.
    fn serves_beyond(&self, than: u64) -> u64 {
        let start = Instant::now();
        loop {
            let now = self.served();
            if now > than {
                return now;
            }
            assert!(start.elapsed() < GUARD, "traffic stopped at {now}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn say(&mut self, line: &str) {
        writeln!(self.stdin.as_mut().unwrap(), "{line}").unwrap();
    }

    /// Quits; checks the service exits 0 (no wrong answer) and removed
    /// its socket.
    fn quit(mut self) {
        self.say("quit");
        drop(self.stdin.take());
        let status = self.child.wait().unwrap();
        assert!(status.success(), "the service failed: {status}");
        assert!(
            !self.socket.exists(),
            "the socket is removed when the endpoint is dropped"
        );
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
    pid: u32,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }
}

fn hotpatch_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_hotpatch"))
}

fn finish(child: Child) -> Run {
    let pid = child.id();
    let Output {
        status,
        stdout,
        stderr,
    } = child.wait_with_output().unwrap();
    Run {
        code: status.code().expect("exited"),
        stdout: String::from_utf8(stdout).unwrap(),
        stderr: String::from_utf8(stderr).unwrap(),
        pid,
    }
}

fn spawn_in(dir: &Path, args: &[&str]) -> Child {
    Command::new(hotpatch_bin())
        .current_dir(scratch_base())
        .arg("--socket-dir")
        .arg(dir)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// `hotpatch --socket-dir DIR ARGS` from the scratch directory.
fn run_in(dir: &Path, args: &[&str]) -> Run {
    finish(spawn_in(dir, args))
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The path relative to the scratch directory (the CLI's cwd), where the
/// patch copies are.
fn relative(p: &Path) -> String {
    p.strip_prefix(scratch_base())
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned()
}

fn one_line_error(r: &Run, kind: &str) {
    assert_eq!(
        r.stderr.lines().count(),
        1,
        "one line on stderr: {}",
        r.stderr
    );
    assert!(
        r.stderr.starts_with("hotpatch: ") && r.stderr.contains(kind),
        "{}",
        r.stderr
    );
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn implementation_of(status: &Value, path: &str) -> Value {
    status["functions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == json!(path))
        .unwrap_or_else(|| panic!("no function {path}"))["implementation"]
        .clone()
}

#[test]
fn every_verb_in_text_and_json_with_its_exit_code() {
    let svc = Service::start("verbs", &[]);
    let d = svc.dir.clone();
    let pid = svc.pid().to_string();
    let basic = patch(BASIC);

    // ps
    let r = run_in(&d, &["ps"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let header = r.stdout.lines().next().unwrap();
    assert!(header.starts_with("PID") && header.contains("SERVICE") && header.contains("PATCHES"));
    let row: Vec<&str> = r
        .stdout
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(row[..3], [pid.as_str(), "verbs", "0"], "{}", r.stdout);
    let r = run_in(&d, &["ps", "--json"]);
    assert_eq!(
        r.json()["processes"],
        json!([{"pid": svc.pid(), "service": "verbs", "patches": 0, "socket": path_str(&svc.socket)}])
    );

    // status (one process: no --pid needed)
    let r = run_in(&d, &["status"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.starts_with(&format!("verbs  pid {pid}")),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("PATCHES  none applied"), "{}", r.stdout);
    assert!(r.stdout.contains("TRANSITION  none"), "{}", r.stdout);
    let line = r
        .stdout
        .lines()
        .find(|l| l.starts_with("svc::answer "))
        .unwrap();
    assert!(line.ends_with("original"), "{line}");
    let before = run_in(&d, &["status", "--json", "--pid", &pid]).json();
    assert_eq!(before["ok"], json!(true));
    assert_eq!(before["v"], json!(1));
    assert_eq!(before["pid"], json!(svc.pid()));
    assert_eq!(before["patches"], json!([]));
    assert_eq!(before["transition"], Value::Null);
    assert_eq!(
        implementation_of(&before, "svc::answer"),
        json!({"kind": "original"})
    );

    // check: a dry run, nothing changes
    let r = run_in(&d, &["check", &relative(&basic)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout
            .contains("fixture-patch-basic 1.2.3 (answer() returns 2) passes every check"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout
            .lines()
            .any(|l| l.starts_with("svc::answer ") && l.ends_with("original")),
        "{}",
        r.stdout
    );
    let c = run_in(&d, &["check", "--json", path_str(&basic)]).json();
    assert_eq!(c["check"]["name"], json!(BASIC));
    assert_eq!(c["check"]["file"], json!(path_str(&basic)));
    assert!(
        c["check"]["functions"]
            .as_array()
            .unwrap()
            .contains(&json!({"path": "svc::answer", "now": {"kind": "original"}}))
    );
    assert_eq!(
        run_in(&d, &["status", "--json"]).json(),
        before,
        "check changed nothing"
    );

    // apply, by a relative path (resolved by the client)
    let t0 = unix_ms();
    let r = run_in(&d, &["apply", &relative(&basic), "--deadline", "10s"]);
    let t1 = unix_ms();
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout
            .starts_with("applied patch #1 fixture-patch-basic 1.2.3 (answer() returns 2) in "),
        "{}",
        r.stdout
    );
    let applier = r.pid;
    let logged = svc.wait_log(|l| l.contains("apply patch #1 fixture-patch-basic 1.2.3"));
    assert!(
        logged.contains("INFO") && logged.contains(&format!("peer_pid={applier}")),
        "{logged}"
    );
    // The service's registered worker: waited for, or already switched.
    assert!(
        logged.contains("transition_us=")
            && (logged.contains("for 1 thread: 'worker' (tid ")
                || logged.contains("every registered thread was already at a safepoint")),
        "the threads the transition waited for: {logged}"
    );
    let s = run_in(&d, &["status", "--json"]).json();
    let p = &s["patches"][0];
    assert_eq!(s["patches"].as_array().unwrap().len(), 1);
    assert_eq!(p["id"], json!(1));
    assert_eq!(p["name"], json!(BASIC));
    assert_eq!(p["version"], json!("1.2.3"));
    assert_eq!(p["description"], json!("answer() returns 2"));
    assert_eq!(p["file"], json!(path_str(&basic)));
    assert_eq!(p["state"], json!("applied"));
    assert_eq!(p["applied_by"], json!({"uid": 0, "gid": 0, "pid": applier}));
    let at = p["applied_at_ms"].as_u64().unwrap();
    assert!((t0..=t1).contains(&at), "{t0} <= {at} <= {t1}");
    assert_eq!(
        implementation_of(&s, "svc::answer"),
        json!({"kind": "patch", "id": 1, "name": BASIC})
    );
    let text = run_in(&d, &["status"]).stdout;
    assert!(
        text.lines().any(|l| l.starts_with("1 ")
            && l.contains("applied")
            && l.contains(&format!("uid 0 pid {applier}"))),
        "{text}"
    );
    assert!(text.lines().any(|l| l.starts_with("svc::answer ") && l.ends_with("patch #1 (fixture-patch-basic)")), "{text}");
    let r = run_in(&d, &["ps", "--json"]);
    assert_eq!(r.json()["processes"][0]["patches"], json!(1));

    // already applied: not a failure, its own exit code
    let r = run_in(&d, &["apply", path_str(&basic)]);
    assert_eq!(r.code, 5, "{} {}", r.stdout, r.stderr);
    assert!(
        r.stdout.starts_with("nothing to do: ") && r.stdout.contains("already applied as patch #1"),
        "{}",
        r.stdout
    );
    assert_eq!(r.stderr, "");
    let r = run_in(&d, &["apply", "--json", path_str(&basic)]);
    assert_eq!(r.code, 5);
    assert_eq!(r.json()["error"]["kind"], json!("already_applied"));
    assert_eq!(r.json()["error"]["patch"], json!({"id": 1, "name": BASIC}));

    // a refused patch: exit 3, one line, nothing changed
    let s1 = run_in(&d, &["status", "--json"]).json();
    let r = run_in(&d, &["apply", path_str(&patch(BAD_RUSTC))]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    one_line_error(&r, "rustc_mismatch: ");
    assert!(
        r.stderr.contains(path_str(&patch(BAD_RUSTC))),
        "{}",
        r.stderr
    );
    let r = run_in(&d, &["check", "--json", path_str(&patch(BAD_RUSTC))]);
    assert_eq!(r.code, 3);
    assert_eq!(r.json()["error"]["kind"], json!("rustc_mismatch"));
    assert_eq!(
        run_in(&d, &["status", "--json"]).json(),
        s1,
        "nothing changed"
    );

    // revert by name, then again by id: nothing to do
    let r = run_in(&d, &["revert", BASIC]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout
            .starts_with("reverted patch #1 fixture-patch-basic 1.2.3 in "),
        "{}",
        r.stdout
    );
    let r = run_in(&d, &["revert", "#1"]);
    assert_eq!(r.code, 5, "{}", r.stderr);
    let r = run_in(&d, &["revert", "--json", "1"]);
    assert_eq!(
        r.json()["error"],
        json!({"kind": "not_applied", "message": "patch #1 is not applied", "patch": {"id": 1}})
    );

    // replace: v1, then v2 over it in one transition
    let r = run_in(&d, &["apply", "--json", path_str(&patch(V1))]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v1_id = r.json()["patch"]["id"].as_u64().unwrap();
    assert_eq!(v1_id, 2);
    let r = run_in(&d, &["replace", "2", &relative(&patch(V2))]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.starts_with("replaced patch #2 fixture-patch-replace-v1 0.1.0 by patch #3 fixture-patch-replace-v2 0.1.0 in "), "{}", r.stdout);
    let s = run_in(&d, &["status", "--json"]).json();
    assert_eq!(s["patches"].as_array().unwrap().len(), 1);
    assert_eq!(s["patches"][0]["name"], json!(V2));
    assert_eq!(
        implementation_of(&s, "svc::step_a"),
        json!({"kind": "patch", "id": 3, "name": V2})
    );
    assert_eq!(
        implementation_of(&s, "svc::step_c"),
        json!({"kind": "original"})
    );
    let r = run_in(&d, &["replace", "--json", "2", path_str(&patch(V1))]);
    assert_eq!(r.code, 5, "replacing what is not applied: {}", r.stdout);
    let r = run_in(&d, &["revert", "--json", V2]);
    assert_eq!(r.code, 0);
    assert_eq!(r.json()["reverted"]["id"], json!(3));

    // events: everything above, in order
    let r = run_in(&d, &["events", "--json"]);
    assert_eq!(r.code, 0);
    let ev = r.json();
    let ops: Vec<(String, String)> = ev["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["op"].as_str().unwrap().to_owned(),
                e["outcome"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expect: Vec<(String, String)> = [
        ("listen", "ok"),
        ("check", "ok"),
        ("check", "ok"),
        ("apply", "ok"),
        ("apply", "already_applied"),
        ("apply", "already_applied"),
        ("apply", "rustc_mismatch"),
        ("check", "rustc_mismatch"),
        ("revert", "ok"),
        ("apply", "ok"),
        ("replace", "ok"),
        ("revert", "ok"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(ops, expect);
    let apply = &ev["events"][3];
    assert_eq!(apply["patch"], json!({"id": 1, "name": BASIC}));
    assert_eq!(apply["peer"]["pid"], json!(applier));
    let last = ev["last_seq"].as_u64().unwrap();
    let r = run_in(
        &d,
        &["events", "--json", "--since", &(last - 1).to_string()],
    );
    assert_eq!(r.json()["events"].as_array().unwrap().len(), 1);
    let r = run_in(&d, &["events"]);
    assert!(r.stdout.starts_with("SEQ  TIME (UTC)"), "{}", r.stdout);
    assert!(
        r.stdout
            .lines()
            .any(|l| l.contains(" replace ") && l.contains("#3 fixture-patch-replace-v2")),
        "{}",
        r.stdout
    );

    let served = svc.served();
    assert!(served > 0);
    svc.quit();
}

#[test]
fn wrong_arguments_and_missing_processes() {
    let svc = Service::start("args", &[]);
    let d = svc.dir.clone();
    for args in [
        &["apply"][..],
        &["frobnicate"],
        &["apply", "x.so", "--deadline", "10parsecs"],
        &["status", "--pid", "1", "--socket", "/x"],
        &["ps", "--pid", "1"],
        &["status", "--pid", "notanumber"],
        &["replace", "1"],
    ] {
        let r = run_in(&d, args);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains("error:"), "{args:?}: {}", r.stderr);
        assert_eq!(r.stdout, "");
    }
    // A pid that is no process, a process with no socket, a socket that is not there.
    let dead = {
        let mut c = Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        pid
    };
    let r = run_in(&d, &["status", "--pid", &dead.to_string()]);
    assert_eq!(r.code, 7, "{}", r.stderr);
    one_line_error(&r, &format!("no process {dead}"));
    let r = run_in(&d, &["status", "--pid", &std::process::id().to_string()]);
    assert_eq!(r.code, 7, "{}", r.stderr);
    one_line_error(&r, "has no control socket");
    let r = run_in(&d, &["status", "--socket", "/nonexistent/x.1.sock"]);
    assert_eq!(r.code, 7, "{}", r.stderr);
    let r = run_in(&scratch(), &["status"]);
    assert_eq!(r.code, 7, "{}", r.stderr);
    one_line_error(&r, "no patchable process");
    let r = run_in(&d, &["apply", "/nonexistent/fix.so"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    one_line_error(&r, "read: cannot read patch /nonexistent/fix.so");

    // Two services in one directory: --pid chooses.
    let other = Command::new(built().join("control-svc"))
        .arg("--socket-dir")
        .arg(&d)
        .args(["--name", "second", "--idle"])
        .stderr(Stdio::null())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut other = scopeguard(other);
    let mut first = String::new();
    BufReader::new(other.0.stdout.as_mut().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with("ready "), "{first}");
    let r = run_in(&d, &["status"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    one_line_error(&r, "2 patchable processes");
    assert!(
        r.stderr.contains(&format!("{} (args)", svc.pid())),
        "{}",
        r.stderr
    );
    let r = run_in(
        &d,
        &["status", "--json", "--pid", &other.0.id().to_string()],
    );
    assert_eq!(r.json()["service"], json!("second"));
    // A socket whose process lives but which nobody serves (this test
    // process's pid): skipped.
    drop(
        std::os::unix::net::UnixListener::bind(d.join(format!("fake.{}.sock", std::process::id())))
            .unwrap(),
    );
    // Killed: its socket stays, and is skipped.
    other.0.kill().unwrap();
    other.0.wait().unwrap();
    let r = run_in(&d, &["ps", "--json"]);
    let pids: Vec<u64> = r.json()["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["pid"].as_u64().unwrap())
        .collect();
    assert_eq!(pids, vec![u64::from(svc.pid())]);
    assert_eq!(run_in(&d, &["status"]).code, 0);
    svc.quit();
}

/// Kills the child when dropped.
struct Guarded(Child);
fn scopeguard(c: Child) -> Guarded {
    Guarded(c)
}
impl Drop for Guarded {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_stalled_transition_is_reported_while_it_waits_and_times_out() {
    let mut svc = Service::start("stall", &["--deadline-ms", "3000"]);
    let d = svc.dir.clone();
    let basic = patch(BASIC);
    svc.say("stall");
    svc.wait_line(|l| l == "stalled");
    // The client asks for more than the service allows: the service's 3 s win.
    let apply = spawn_in(
        &d,
        &["apply", "--json", path_str(&basic), "--deadline", "60s"],
    );
    let start = Instant::now();
    // The busy worker switches at its next safepoint; the staller never does.
    let transition = loop {
        let s = run_in(&d, &["status", "--json"]);
        assert_eq!(
            s.code, 0,
            "status is answered during the transition: {}",
            s.stderr
        );
        let t = s.json()["transition"].clone();
        if !t.is_null() && t["waiting_for"].as_array().unwrap().len() == 1 {
            break t;
        }
        assert!(
            start.elapsed() < GUARD,
            "no transition waiting for one thread seen: {t}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        transition["what"]
            .as_str()
            .unwrap()
            .starts_with("apply fixture-patch-basic"),
        "{transition}"
    );
    let waiting = &transition["waiting_for"][0];
    assert_eq!(waiting["name"], json!("stall-worker"), "{transition}");
    assert!(waiting["tid"].as_i64().unwrap() > 0);
    let text = run_in(&d, &["status"]).stdout;
    assert!(
        text.contains("\nTRANSITION  apply fixture-patch-basic"),
        "{text}"
    );
    let header = text
        .lines()
        .position(|l| l.starts_with("TID "))
        .expect(&text);
    let row = text.lines().nth(header + 1).unwrap();
    assert!(row.contains(" stall-worker "), "{text}");
    let r = finish(apply);
    assert_eq!(r.code, 4, "{} {}", r.stdout, r.stderr);
    let e = r.json()["error"].clone();
    assert_eq!(e["kind"], json!("timeout"));
    assert_eq!(
        e["deadline_ms"],
        json!(3000),
        "bounded by the service's deadline"
    );
    assert_eq!(e["stalled"][0]["name"], json!("stall-worker"));
    one_line_error(&r, "timeout: ");
    assert!(r.stderr.contains("'stall-worker'"), "{}", r.stderr);
    let s = run_in(&d, &["status", "--json"]).json();
    assert_eq!(s["patches"], json!([]), "reversed: nothing applied");
    assert_eq!(s["transition"], Value::Null);

    svc.say("unstall");
    let r = run_in(&d, &["apply", path_str(&basic)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(run_in(&d, &["revert", "1"]).code, 0);
    svc.quit();
}

/// One raw request on a fresh connection; the reply.
fn raw(socket: &Path, line: &[u8]) -> Value {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(GUARD)).unwrap();
    s.write_all(line).unwrap();
    let mut reply = String::new();
    BufReader::new(&s).read_line(&mut reply).unwrap();
    serde_json::from_str(&reply).unwrap_or_else(|e| panic!("{e}: {reply:?}"))
}

fn kind(v: &Value) -> &str {
    assert_eq!(v["v"], json!(1), "{v}");
    assert_eq!(v["ok"], json!(false), "{v}");
    assert!(v["error"]["message"].is_string(), "{v}");
    v["error"]["kind"].as_str().unwrap()
}

fn fds_and_threads(pid: u32) -> (usize, usize) {
    let count = |what: &str| {
        std::fs::read_dir(format!("/proc/{pid}/{what}"))
            .unwrap()
            .count()
    };
    (count("fd"), count("task"))
}

/// Waits until the connection is closed by the service; the bytes it sent.
fn until_closed(mut s: &UnixStream) -> Vec<u8> {
    s.set_read_timeout(Some(GUARD)).unwrap();
    let mut all = Vec::new();
    let mut buf = [0; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return all,
            Ok(n) => all.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return all,
            Err(e) => panic!("the service did not close the connection: {e}"),
        }
    }
}

#[test]
fn bad_input_and_floods_do_not_stop_traffic_or_other_clients() {
    let svc = Service::start(
        "hostile",
        &["--read-timeout-ms", "1500", "--max-connections", "16"],
    );
    let sock = svc.socket.clone();
    let d = svc.dir.clone();
    let mut served = svc.serves_beyond(0);
    let (fds0, threads0) = fds_and_threads(svc.pid());

    // Malformed requests get an error line; the connection stays usable.
    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(GUARD)).unwrap();
    let mut lines = BufReader::new(s.try_clone().unwrap()).lines();
    let cases: [(&[u8], &str); 7] = [
        (b"not json\n", "bad_request"),
        (b"\xff\xfe\x00garbage\n", "bad_request"),
        (b"{\"v\":1,\"op\":\"explode\"}\n", "unknown_op"),
        (b"{\"v\":1,\"op\":\"apply\",\"file\":42}\n", "bad_request"),
        (
            b"{\"v\":1,\"op\":\"revert\",\"patch\":{\"id\":1}}\n",
            "bad_request",
        ),
        (b"{\"v\":99,\"op\":\"status\"}\n", "unsupported_version"),
        (
            b"{\"v\":1,\"op\":\"apply\",\"file\":\"relative.so\"}\n",
            "bad_request",
        ),
    ];
    for (line, want) in cases {
        s.write_all(line).unwrap();
        let reply: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        assert_eq!(kind(&reply), want, "{}", String::from_utf8_lossy(line));
    }
    s.write_all(b"{\"v\":1,\"op\":\"status\"}\n").unwrap();
    let reply: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(reply["ok"], json!(true), "the same connection still works");
    drop((s, lines));
    served = svc.serves_beyond(served);

    // An oversized line: an error, then the connection is closed.
    let big = UnixStream::connect(&sock).unwrap();
    let mut w = big.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&vec![b'x'; 200 * 1024]);
    });
    let got = until_closed(&big);
    writer.join().unwrap();
    let reply: Value = serde_json::from_slice(got.split(|&b| b == b'\n').next().unwrap()).unwrap();
    assert_eq!(kind(&reply), "line_too_long");

    // Half a line, then silence: dropped at the read timeout; meanwhile
    // another client is answered and traffic flows.
    let mut half = UnixStream::connect(&sock).unwrap();
    half.write_all(b"{\"v\":1,\"op\":").unwrap();
    let r = run_in(&d, &["status", "--json"]);
    assert_eq!(r.code, 0, "another client is answered: {}", r.stderr);
    served = svc.serves_beyond(served);
    assert_eq!(until_closed(&half), b"", "dropped without a reply");

    // 200 connections at once, all silent or half-written.
    let flood: Vec<UnixStream> = (0..200)
        .map(|i| {
            let mut c = UnixStream::connect(&sock).unwrap();
            if i % 2 == 0 {
                c.write_all(b"{\"v\":").unwrap();
            }
            c
        })
        .collect();
    for _ in 0..3 {
        let reply = raw(&sock, b"{\"v\":1,\"op\":\"status\"}\n");
        assert_eq!(
            reply["ok"],
            json!(true),
            "answered during the flood: {reply}"
        );
        let r = run_in(&d, &["status"]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        served = svc.serves_beyond(served);
    }
    // Every flood connection was closed by the service: evicted to admit
    // newer ones, or at its read timeout. None was answered.
    for c in &flood {
        let got = until_closed(c);
        assert!(
            got.is_empty()
                || kind(
                    &serde_json::from_slice(got.split(|&b| b == b'\n').next().unwrap()).unwrap()
                ) == "overloaded"
        );
    }
    drop(flood);

    // Nothing leaked: descriptors and threads back to where they were.
    let start = Instant::now();
    loop {
        let now = fds_and_threads(svc.pid());
        if now.0 <= fds0 && now.1 <= threads0 {
            break;
        }
        assert!(
            start.elapsed() < GUARD,
            "leaked: {now:?}, was {:?}",
            (fds0, threads0)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = run_in(&d, &["events", "--json"]);
    assert_eq!(r.code, 0);
    svc.serves_beyond(served);
    svc.quit();
}

/// The `hotpatch` binary where uid 65534 can run it (the checkout may be
/// in a directory only root can enter).
fn hotpatch_for_others() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let dir = scratch();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let bin = dir.join("hotpatch");
        std::fs::copy(hotpatch_bin(), &bin).unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        bin
    })
    .clone()
}

fn run_as(uid: u32, gid: u32, socket: &Path) -> Run {
    let bin = hotpatch_for_others();
    // A binary just copied may still be open for writing in a child that
    // another test thread forked meanwhile (until it execs): ETXTBSY.
    for _ in 0..100 {
        let spawned = Command::new(&bin)
            .args(["status", "--socket"])
            .arg(socket)
            .current_dir("/")
            .uid(uid)
            .gid(gid)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        match spawned {
            Ok(child) => return finish(child),
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("run {} as uid {uid}: {e}", bin.display()),
        }
    }
    panic!("{} stayed busy (ETXTBSY)", bin.display())
}

#[test]
fn peers_of_another_uid_are_refused() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        panic!("this test runs as root (it starts a client as uid 65534)");
    }
    // Default: only this uid and root; the file system keeps others out.
    let private = Service::start("private", &["--idle"]);
    let meta = std::fs::metadata(&private.socket).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o600, "socket mode");
    assert_eq!(
        std::fs::metadata(&private.dir).unwrap().mode() & 0o777,
        0o700,
        "dir mode"
    );
    let r = run_as(65534, 65534, &private.socket);
    assert_eq!(r.code, 6, "{}", r.stderr);
    one_line_error(&r, "Permission denied");

    // With a gid allowed, others can connect, and peer credentials decide.
    let shared = Service::start("shared", &["--idle", "--allow-gid", "4242"]);
    assert_eq!(
        std::fs::metadata(&shared.socket).unwrap().mode() & 0o777,
        0o666
    );
    let r = run_as(65534, 65534, &shared.socket);
    assert_eq!(r.code, 6, "{} {}", r.stdout, r.stderr);
    one_line_error(&r, "not_permitted: uid 65534");
    let r = run_as(65534, 4242, &shared.socket);
    assert_eq!(r.code, 0, "gid 4242 is allowed: {}", r.stderr);
    assert!(r.stdout.starts_with("shared  pid"), "{}", r.stdout);
    let ev = run_in(&shared.dir, &["events", "--json"]).json();
    let refused: Vec<&Value> = ev["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["op"] == json!("connect"))
        .collect();
    assert_eq!(refused.len(), 1, "{ev}");
    assert_eq!(refused[0]["outcome"], json!("not_permitted"));
    assert_eq!(refused[0]["peer"]["uid"], json!(65534));
    assert_eq!(refused[0]["peer"]["gid"], json!(65534));
    // And a tracing warning with the peer's credentials.
    let warn = shared.wait_log(|l| l.contains("control connection refused: not permitted"));
    assert!(
        warn.contains("WARN") && warn.contains("peer_uid=65534") && warn.contains("peer_gid=65534"),
        "{warn}"
    );
    private.quit();
    shared.quit();
}

/// (CPU ticks, voluntary + involuntary context switches) of each thread.
fn thread_counters(pid: u32) -> HashMap<String, (u64, u64)> {
    let mut out = HashMap::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        // A thread that ended since the listing (a connection's) is skipped.
        let (Ok(stat), Ok(status)) = (
            std::fs::read_to_string(t.path().join("stat")),
            std::fs::read_to_string(t.path().join("status")),
        ) else {
            continue;
        };
        let name = stat[stat.find('(').unwrap() + 1..stat.rfind(')').unwrap()].to_owned();
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        // utime and stime: fields 14 and 15 of stat, 12 and 13 after the name.
        let ticks = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        let switches: u64 = status
            .lines()
            .filter(|l| l.contains("ctxt_switches:"))
            .map(|l| l.split_whitespace().last().unwrap().parse::<u64>().unwrap())
            .sum();
        out.insert(name, (ticks, switches));
    }
    out
}

#[test]
fn the_idle_endpoint_does_no_work() {
    let svc = Service::start("idle", &["--idle"]);
    let d = svc.dir.clone();
    // Let start-up settle, then watch the endpoint thread for 3 s.
    assert_eq!(run_in(&d, &["status"]).code, 0);
    std::thread::sleep(Duration::from_millis(300));
    let before = thread_counters(svc.pid());
    std::thread::sleep(Duration::from_secs(3));
    let after = thread_counters(svc.pid());
    let endpoint = "hotpatch-contro"; // the kernel keeps 15 bytes of a name
    let (b, a) = (before[endpoint], after[endpoint]);
    assert_eq!(
        a.1, b.1,
        "the endpoint thread woke up while idle: {b:?} -> {a:?}"
    );
    assert_eq!(a.0, b.0, "the endpoint thread used CPU while idle");
    let total = |m: &HashMap<String, (u64, u64)>| m.values().map(|v| v.0).sum::<u64>();
    eprintln!(
        "idle service with the endpoint on: {} CPU ticks in 3 s over {} threads",
        total(&after) - total(&before),
        after.len()
    );
    // The measure sees a request: one connection wakes the thread.
    assert_eq!(run_in(&d, &["status"]).code, 0);
    let woken = thread_counters(svc.pid())[endpoint];
    assert!(
        woken.1 > a.1,
        "a request wakes the endpoint thread: {a:?} -> {woken:?}"
    );
    svc.quit();
}

// --- accept, restore, kill switch (the state directory) ---

/// `status --json` of the only service in `d`.
fn status_of(d: &Path) -> Value {
    let r = run_in(d, &["status", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    r.json()
}

/// (name, state) of each applied patch, oldest first.
fn patches_of(status: &Value) -> Vec<(String, String)> {
    status["patches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_owned(),
                p["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn owned(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect()
}

/// A state directory for several lives of a service.
fn state_dir() -> PathBuf {
    let d = scratch();
    std::fs::create_dir_all(&d).unwrap();
    d.join("state")
}

/// Starts a service on `state`, applies BASIC then V1 and accepts both.
fn apply_and_accept_two(state: &Path) -> Service {
    let svc = Service::start("accept", &["--state-dir", path_str(state)]);
    let d = svc.dir.clone();
    for p in [BASIC, V1] {
        let r = run_in(&d, &["apply", &relative(&patch(p))]);
        assert_eq!(r.code, 0, "{}", r.stderr);
    }
    // By name, in text.
    let r = run_in(&d, &["accept", BASIC]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("accepted as #") && r.stdout.contains("re-applied at restart"),
        "{}",
        r.stdout
    );
    // By id, in JSON.
    let id = status_of(&d)["patches"][1]["id"].as_u64().unwrap();
    let r = run_in(&d, &["accept", &format!("#{id}"), "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let reply = r.json();
    assert_eq!(reply["accepted"]["name"], json!(V1), "{reply}");
    assert_eq!(reply["patch"]["state"], json!("accepted"), "{reply}");
    // Accepting it again is not a failure: nothing to do.
    let r = run_in(&d, &["accept", V1]);
    assert_eq!(r.code, 5, "{} {}", r.stdout, r.stderr);
    assert!(r.stdout.contains("nothing to do"), "{}", r.stdout);
    assert_eq!(
        patches_of(&status_of(&d)),
        owned(&[(BASIC, "accepted"), (V1, "accepted")])
    );
    svc
}

/// SIGKILL: no destructor, no flush.
fn kill(mut svc: Service) {
    svc.child.kill().unwrap();
    svc.child.wait().unwrap();
}

#[test]
fn accepted_patches_come_back_after_sigkill_in_order_and_not_with_the_kill_switch() {
    let state = state_dir();
    let svc = apply_and_accept_two(&state);
    let served = svc.served();
    assert!(
        serves_wrongly_never(&svc, served),
        "traffic with both patches"
    );
    kill(svc);

    let svc = Service::start("accept", &["--state-dir", path_str(&state)]);
    let d = svc.dir.clone();
    let st = status_of(&d);
    assert_eq!(
        patches_of(&st),
        owned(&[(BASIC, "accepted"), (V1, "accepted")]),
        "{st}"
    );
    assert_eq!(
        implementation_of(&st, "svc::answer")["name"],
        json!(BASIC),
        "restored before serving"
    );
    assert_eq!(st["state"]["rejected"], json!([]), "{st}");
    let seqs: Vec<u64> = st["state"]["accepted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![1, 2]);
    let events = run_in(&d, &["events", "--json"]).json();
    let restored: Vec<&str> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["op"] == json!("restore") && e["outcome"] == json!("ok"))
        .map(|e| e["patch"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(restored, vec![BASIC, V1], "{events}");
    svc.serves_beyond(0);
    kill(svc);

    // The kill switch: none applied, the record kept.
    let svc = Service::start_env(
        "accept",
        &["--state-dir", path_str(&state)],
        &[("HOTPATCH_DISABLE", "1")],
    );
    let st = status_of(&svc.dir);
    assert_eq!(st["patches"], json!([]), "{st}");
    assert_eq!(st["state"]["disabled"], json!(true));
    assert_eq!(st["state"]["accepted"].as_array().unwrap().len(), 2);
    assert!(st["state"]["accepted"][0]["applied_as"].is_null());
    let text = run_in(&svc.dir, &["status"]).stdout;
    assert!(text.contains("HOTPATCH_DISABLE set"), "{text}");
    svc.quit();

    // Revert of an accepted patch takes it out of the record; a replace
    // puts the new one in its place.
    let svc = Service::start("accept", &["--state-dir", path_str(&state)]);
    let d = svc.dir.clone();
    let r = run_in(&d, &["revert", BASIC, "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["unaccepted"]["name"], json!(BASIC));
    let r = run_in(&d, &["replace", V1, &relative(&patch(V2))]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(patches_of(&status_of(&d)), owned(&[(V2, "accepted")]));
    kill(svc);
    let svc = Service::start("accept", &["--state-dir", path_str(&state)]);
    assert_eq!(patches_of(&status_of(&svc.dir)), owned(&[(V2, "accepted")]));
    let stored: Vec<String> = std::fs::read_dir(state.join("patches"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        stored.len(),
        1,
        "the copies of reverted and replaced patches are gone: {stored:?}"
    );
    svc.quit();
}

/// No wrong answer while serving beyond `than`.
fn serves_wrongly_never(svc: &Service, than: u64) -> bool {
    svc.serves_beyond(than) > than
}

fn record(state: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(state.join("accepted.json")).unwrap()).unwrap()
}

fn write_record(state: &Path, v: &Value) {
    std::fs::write(state.join("accepted.json"), v.to_string()).unwrap();
}

fn stored(state: &Path, entry: &Value) -> PathBuf {
    state.join("patches").join(entry["file"].as_str().unwrap())
}

/// The (kind, name) of each rejected item.
fn rejected_of(st: &Value) -> Vec<(String, String)> {
    st["state"]["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["kind"].as_str().unwrap().to_owned(),
                r["name"].as_str().unwrap_or("-").to_owned(),
            )
        })
        .collect()
}

fn rejected_files(state: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(state.join("rejected"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn a_broken_state_directory_is_reported_set_aside_and_the_rest_applied() {
    // A tampered copy: BASIC is set aside, V1 applied.
    let state = state_dir();
    kill(apply_and_accept_two(&state));
    let rec = record(&state);
    let basic_copy = stored(&state, &rec["patches"][0]);
    let mut bytes = std::fs::read(&basic_copy).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&basic_copy, bytes).unwrap();
    let svc = Service::start("broken", &["--state-dir", path_str(&state)]);
    let st = status_of(&svc.dir);
    assert_eq!(patches_of(&st), owned(&[(V1, "accepted")]), "{st}");
    assert_eq!(rejected_of(&st), owned(&[("tampered", BASIC)]), "{st}");
    assert!(!basic_copy.exists(), "set aside");
    let files = rejected_files(&state);
    assert!(
        files
            .iter()
            .any(|f| f.ends_with("-1-fixture-patch-basic.so"))
            && files.iter().any(|f| f.ends_with(".so.reason")),
        "{files:?}"
    );
    assert_eq!(
        record(&state)["patches"].as_array().unwrap().len(),
        1,
        "dropped from the record"
    );
    svc.wait_log(|l| l.contains("accepted patch not restored") && l.contains("tampered"));
    let text = run_in(&svc.dir, &["status"]).stdout;
    assert!(
        text.contains("REJECTED AT START-UP") && text.contains("tampered"),
        "{text}"
    );
    // Accept BASIC again: the record is now [V1, BASIC].
    let r = run_in(&svc.dir, &["apply", &relative(&patch(BASIC)), "--accept"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    kill(svc);

    // A missing copy (V1) and a patch built for another build (another
    // rustc, stored with its right checksum): both set aside, BASIC applied.
    let mut rec = record(&state);
    std::fs::remove_file(stored(&state, &rec["patches"][0])).unwrap();
    let other = state.join("patches").join("9-other-build.so");
    std::fs::copy(patch(BAD_RUSTC), &other).unwrap();
    let sum = {
        let out = Command::new("sha256sum").arg(&other).output().unwrap();
        String::from_utf8(out.stdout)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .to_owned()
    };
    let mut entry = rec["patches"][1].clone();
    entry["seq"] = json!(9);
    entry["name"] = json!(BAD_RUSTC);
    entry["file"] = json!("9-other-build.so");
    entry["sha256"] = json!(sum);
    rec["patches"].as_array_mut().unwrap().push(entry);
    write_record(&state, &rec);
    let svc = Service::start("broken", &["--state-dir", path_str(&state)]);
    let st = status_of(&svc.dir);
    assert_eq!(patches_of(&st), owned(&[(BASIC, "accepted")]), "{st}");
    assert_eq!(
        rejected_of(&st),
        owned(&[("missing", V1), ("rustc_mismatch", BAD_RUSTC)]),
        "{st}"
    );
    kill(svc);

    // An entry that is not an entry: reported, the others applied.
    let mut rec = record(&state);
    rec["patches"]
        .as_array_mut()
        .unwrap()
        .insert(0, json!({"seq": "x", "name": "junk"}));
    write_record(&state, &rec);
    let svc = Service::start("broken", &["--state-dir", path_str(&state)]);
    let st = status_of(&svc.dir);
    assert_eq!(patches_of(&st), owned(&[(BASIC, "accepted")]), "{st}");
    assert_eq!(rejected_of(&st), owned(&[("bad_entry", "junk")]), "{st}");
    kill(svc);

    // A corrupt record, then one of another format version: the service
    // starts with none, says why, and keeps the record aside.
    for (bytes, kind) in [
        (
            b"{\"format\":1,\"next_seq\":3,\"patches\":[{\"seq\"".to_vec(),
            "corrupt_record",
        ),
        (
            json!({"format": 99, "next_seq": 1, "patches": []})
                .to_string()
                .into_bytes(),
            "unsupported_format",
        ),
    ] {
        std::fs::write(state.join("accepted.json"), &bytes).unwrap();
        let svc = Service::start("broken", &["--state-dir", path_str(&state)]);
        let st = status_of(&svc.dir);
        assert_eq!(st["patches"], json!([]), "{st}");
        assert_eq!(rejected_of(&st), owned(&[(kind, "-")]), "{st}");
        assert!(!state.join("accepted.json").exists(), "set aside");
        assert!(
            rejected_files(&state)
                .iter()
                .any(|f| f.ends_with("-accepted.json")),
            "{:?}",
            rejected_files(&state)
        );
        svc.serves_beyond(0);
        svc.quit();
    }
}

#[test]
fn accept_without_a_state_directory_is_refused_and_nothing_changes() {
    let svc = Service::start("nostate", &[]);
    let d = svc.dir.clone();
    let r = run_in(&d, &["apply", &relative(&patch(BASIC))]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = run_in(&d, &["accept", BASIC, "--json"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(r.json()["error"]["kind"], json!("no_state_dir"));
    assert_eq!(patches_of(&status_of(&d)), owned(&[(BASIC, "applied")]));
    // apply --accept is refused before anything is applied.
    let r = run_in(&d, &["apply", &relative(&patch(V1)), "--accept"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    one_line_error(&r, "no_state_dir");
    assert_eq!(patches_of(&status_of(&d)), owned(&[(BASIC, "applied")]));
    svc.quit();
}

// --- watch windows and rollback ---

#[test]
fn a_patch_that_panics_under_traffic_is_rolled_back_within_its_window() {
    let svc = Service::start("watch-panic", &[]);
    let d = svc.dir.clone();
    let before = svc.served();
    let r = run_in(
        &d,
        &[
            "apply",
            &relative(&patch(WATCH_PANIC)),
            "--watch",
            "20s",
            "--json",
        ],
    );
    assert_eq!(r.code, 8, "rolled back: {} {}", r.stdout, r.stderr);
    let reply = r.json();
    assert_eq!(reply["error"]["kind"], json!("rolled_back"), "{reply}");
    assert!(reply["error"]["panics"].as_u64().unwrap() >= 1, "{reply}");
    assert!(
        reply["error"]["reason"].as_str().unwrap().contains("panic"),
        "{reply}"
    );
    // The service reports its counts every 20 ms: the report of the panics
    // may come after the rollback.
    let start = Instant::now();
    while svc.seen.lock().unwrap().panicked < 1 {
        assert!(
            start.elapsed() < GUARD,
            "the patch did not panic under traffic"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let st = status_of(&d);
    assert_eq!(st["patches"], json!([]), "{st}");
    assert_eq!(
        implementation_of(&st, "svc::answer"),
        json!({"kind": "original"})
    );
    let events = run_in(&d, &["events"]).stdout;
    assert!(
        events
            .lines()
            .any(|l| l.contains("rollback") && l.contains("rolled_back") && l.contains("panic")),
        "{events}"
    );
    svc.wait_log(|l| l.contains("op=\"rollback\"") || l.contains("op=rollback"));
    // Traffic flows again, unpatched and right.
    // Two reports after the rollback returned, every panic before it is
    // counted; none may follow.
    let now = svc.serves_beyond(svc.served().max(before));
    let now = svc.serves_beyond(now);
    let panicked = svc.seen.lock().unwrap().panicked;
    svc.serves_beyond(now + 100);
    assert_eq!(
        svc.seen.lock().unwrap().panicked,
        panicked,
        "no panic after the rollback"
    );
    // Text output: one line on stderr, exit 8.
    svc.quit();
}

#[test]
fn a_failing_health_check_rolls_back() {
    let svc = Service::start("watch-health", &["--unhealthy-if-answer", "2"]);
    let d = svc.dir.clone();
    let r = run_in(&d, &["apply", &relative(&patch(BASIC)), "--watch", "20s"]);
    assert_eq!(r.code, 8, "{} {}", r.stdout, r.stderr);
    one_line_error(&r, "rolled_back");
    assert!(
        r.stderr
            .contains("health check `answer` failed: answer() is 2"),
        "{}",
        r.stderr
    );
    let st = status_of(&d);
    assert_eq!(st["patches"], json!([]), "{st}");
    let ev = run_in(&d, &["events", "--json"]).json();
    let rollback = ev["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["op"] == json!("rollback"))
        .cloned()
        .unwrap_or_else(|| panic!("no rollback event: {ev}"));
    assert_eq!(rollback["outcome"], json!("rolled_back"));
    assert_eq!(rollback["patch"]["name"], json!(BASIC));
    svc.quit();
}

#[test]
fn a_healthy_patch_stays_after_its_window_and_is_accepted_with_accept() {
    let state = state_dir();
    // The health check fails only for an answer no patch gives.
    let svc = Service::start(
        "watch-ok",
        &[
            "--state-dir",
            path_str(&state),
            "--unhealthy-if-answer",
            "7",
        ],
    );
    let d = svc.dir.clone();
    let r = run_in(
        &d,
        &[
            "apply",
            &relative(&patch(BASIC)),
            "--watch",
            "1s",
            "--accept",
            "--json",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let reply = r.json();
    assert_eq!(reply["watch"]["outcome"], json!("kept"), "{reply}");
    assert_eq!(reply["watch"]["panics"], json!(0), "{reply}");
    assert!(
        reply["watch"]["check_rounds"].as_u64().unwrap() >= 1,
        "{reply}"
    );
    assert_eq!(reply["patch"]["state"], json!("accepted"), "{reply}");
    assert_eq!(reply["accepted"]["name"], json!(BASIC), "{reply}");
    // Without --accept: kept, on trial.
    let r = run_in(&d, &["apply", &relative(&patch(V1)), "--watch", "500ms"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("kept after a 500 ms watch window"),
        "{}",
        r.stdout
    );
    assert_eq!(
        patches_of(&status_of(&d)),
        owned(&[(BASIC, "accepted"), (V1, "applied")])
    );
    svc.quit();
}

#[test]
fn events_follow_prints_new_events_as_they_happen_and_ends_with_the_service() {
    let svc = Service::start("follow", &[]);
    let d = svc.dir.clone();
    let mut child = spawn_in(&d, &["events", "--follow", "--json"]);
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let next = |what: &str| -> Value {
        let line = rx
            .recv_timeout(GUARD)
            .unwrap_or_else(|_| panic!("no event line for {what}"));
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    };
    assert_eq!(next("listen")["op"], json!("listen"));
    // Only after it printed the past: an apply made now is a new event.
    let r = run_in(&d, &["apply", &relative(&patch(BASIC))]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let e = next("apply");
    assert_eq!(e["op"], json!("apply"), "{e}");
    assert_eq!(e["patch"]["name"], json!(BASIC), "{e}");
    let r = run_in(&d, &["revert", BASIC]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(next("revert")["op"], json!("revert"));
    svc.quit();
    let run = finish(child);
    assert_eq!(run.code, 7, "the service is gone: {}", run.stderr);
}

// --- operations under faults and attack (issue 20) ---

/// A small tmpfs mounted by the test (it runs as root), unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            panic!("this test runs as root (it mounts a tmpfs)");
        }
        let dir = scratch().join("mnt");
        std::fs::create_dir_all(&dir).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0755")])
            .arg("tmpfs")
            .arg(&dir)
            .status()
            .unwrap();
        assert!(status.success(), "mount a tmpfs at {}", dir.display());
        Tmpfs(dir)
    }

    fn remount(&self, option: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,{option}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(status.success(), "remount {option}");
    }

    /// Fills the file system; the filler file.
    fn fill(&self) -> PathBuf {
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0x5a; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// `revert` and `replace` of an accepted patch on a state directory that
/// cannot be written change nothing, exit 1 and say so.
fn unrecordable_operations_change_nothing(d: &Path, state: &Path, why: &str) {
    let before = record(state);
    let r = run_in(d, &["revert", BASIC]);
    assert_eq!(r.code, 1, "{why}: {} {}", r.stdout, r.stderr);
    one_line_error(&r, "state");
    assert!(
        r.stderr.contains("nothing changed") && !r.stdout.contains("no longer accepted"),
        "{why}: {} {}",
        r.stdout,
        r.stderr
    );
    let r = run_in(d, &["replace", V1, &relative(&patch(V2)), "--json"]);
    assert_eq!(r.code, 1, "{why}: {} {}", r.stdout, r.stderr);
    let reply = r.json();
    assert_eq!(reply["error"]["kind"], json!("state"), "{why}: {reply}");
    assert!(
        reply["error"]["message"]
            .as_str()
            .unwrap()
            .contains("nothing changed"),
        "{why}: {reply}"
    );
    let st = status_of(d);
    assert_eq!(
        patches_of(&st),
        owned(&[(BASIC, "accepted"), (V1, "accepted")]),
        "{why}: {st}"
    );
    assert_eq!(implementation_of(&st, "svc::answer")["name"], json!(BASIC));
    assert_eq!(record(state), before, "{why}: the record is as it was");
}

#[test]
fn a_revert_or_replace_that_cannot_be_recorded_changes_nothing_and_says_so() {
    let fs = Tmpfs::mount("8m");
    let state = fs.0.join("state");
    let svc = Service::start("unrecorded", &["--state-dir", path_str(&state)]);
    let d = svc.dir.clone();
    for p in [BASIC, V1] {
        let r = run_in(&d, &["apply", &relative(&patch(p)), "--accept"]);
        assert_eq!(r.code, 0, "{}", r.stderr);
    }
    let served = svc.served();

    fs.remount("ro");
    unrecordable_operations_change_nothing(&d, &state, "read-only");
    fs.remount("rw");
    let filler = fs.fill();
    unrecordable_operations_change_nothing(&d, &state, "full");
    let served = svc.serves_beyond(served);

    // With room again both go through, and the record follows.
    std::fs::remove_file(filler).unwrap();
    let r = run_in(&d, &["revert", BASIC]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("no longer accepted"), "{}", r.stdout);
    let r = run_in(&d, &["replace", V1, &relative(&patch(V2))]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(patches_of(&status_of(&d)), owned(&[(V2, "accepted")]));
    let names: Vec<Value> = record(&state)["patches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].clone())
        .collect();
    assert_eq!(names, vec![json!(V2)]);
    svc.serves_beyond(served);
    svc.quit();
}

#[test]
fn an_unreadable_record_is_set_aside_and_the_kill_switch_starts_whatever_the_state_holds() {
    let state = state_dir();
    kill(apply_and_accept_two(&state));
    let rec = state.join("accepted.json");
    std::fs::remove_file(&rec).unwrap();
    // A record that cannot be read (EISDIR).
    std::fs::create_dir(&rec).unwrap();

    let svc = Service::start_env(
        "unreadable",
        &["--state-dir", path_str(&state)],
        &[("HOTPATCH_DISABLE", "1")],
    );
    let st = status_of(&svc.dir);
    assert_eq!(st["patches"], json!([]), "{st}");
    assert_eq!(st["state"]["disabled"], json!(true), "{st}");
    assert!(
        rec.is_dir(),
        "the kill switch leaves the state directory as it is"
    );
    svc.serves_beyond(0);
    svc.quit();

    let svc = Service::start("unreadable", &["--state-dir", path_str(&state)]);
    let st = status_of(&svc.dir);
    assert_eq!(st["patches"], json!([]), "{st}");
    assert_eq!(
        rejected_of(&st),
        owned(&[("unreadable_record", "-")]),
        "{st}"
    );
    assert!(!rec.exists(), "set aside");
    assert!(
        rejected_files(&state)
            .iter()
            .any(|f| f.ends_with("-accepted.json")),
        "{:?}",
        rejected_files(&state)
    );
    svc.wait_log(|l| l.contains("accepted patch not restored") && l.contains("unreadable_record"));
    let r = run_in(&svc.dir, &["apply", &relative(&patch(BASIC)), "--accept"]);
    assert_eq!(r.code, 0, "a new record is written: {}", r.stderr);
    assert_eq!(record(&state)["patches"][0]["name"], json!(BASIC));
    svc.serves_beyond(0);
    svc.quit();
}

#[test]
fn a_record_with_fields_of_a_later_release_keeps_its_patches_and_their_fields() {
    let state = state_dir();
    kill(apply_and_accept_two(&state));
    let mut rec = record(&state);
    rec["written_by"] = json!("hotpatch 9.9");
    for e in rec["patches"].as_array_mut().unwrap() {
        e["priority"] = json!(3);
    }
    write_record(&state, &rec);
    let svc = Service::start("later", &["--state-dir", path_str(&state)]);
    let st = status_of(&svc.dir);
    assert_eq!(
        patches_of(&st),
        owned(&[(BASIC, "accepted"), (V1, "accepted")]),
        "{st}"
    );
    assert_eq!(st["state"]["rejected"], json!([]), "{st}");
    // A record rewritten by this release keeps what it does not know.
    let r = run_in(&svc.dir, &["revert", V1]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let rec = record(&state);
    assert_eq!(rec["patches"].as_array().unwrap().len(), 1, "{rec}");
    assert_eq!(rec["patches"][0]["priority"], json!(3), "{rec}");
    assert_eq!(rec["written_by"], json!("hotpatch 9.9"), "{rec}");
    svc.quit();
}

#[test]
fn restore_keeps_a_copy_another_entry_uses_and_cleans_orphans_and_stale_sockets() {
    let state = state_dir();
    let svc = Service::start("shared-copy", &["--state-dir", path_str(&state)]);
    let r = run_in(&svc.dir, &["apply", &relative(&patch(BASIC)), "--accept"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    kill(svc);
    // Two entries naming one file.
    let mut rec = record(&state);
    let mut twin = rec["patches"][0].clone();
    twin["seq"] = json!(2);
    rec["patches"].as_array_mut().unwrap().push(twin);
    rec["next_seq"] = json!(3);
    write_record(&state, &rec);
    let copy = stored(&state, &rec["patches"][0]);
    // Leftovers: an orphaned copy, an interrupted write, and the socket
    // of a process that died (a pid above any pid_max).
    let patches = state.join("patches");
    std::fs::write(patches.join("7-orphan.so"), b"x").unwrap();
    std::fs::write(patches.join(".8-interrupted.so.tmp"), b"x").unwrap();
    let sockets = scratch().join("sock");
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&sockets)
        .unwrap();
    let stale = sockets.join("shared-copy.4194305.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());

    let svc = Service::start_in(
        &sockets,
        "shared-copy",
        &["--state-dir", path_str(&state)],
        &[],
    );
    let st = status_of(&svc.dir);
    assert_eq!(patches_of(&st), owned(&[(BASIC, "accepted")]), "{st}");
    assert_eq!(
        rejected_of(&st),
        owned(&[("already_applied", BASIC)]),
        "{st}"
    );
    assert!(copy.exists(), "the copy the first entry uses stays");
    assert!(!patches.join("7-orphan.so").exists(), "orphan removed");
    assert!(!patches.join(".8-interrupted.so.tmp").exists());
    assert!(!stale.exists(), "stale socket removed");
    let ev = run_in(&svc.dir, &["events", "--json"]).json();
    let cleaned: Vec<&str> = ev["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["op"] == json!("clean"))
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert!(
        cleaned
            .iter()
            .any(|m| m.contains("removed 2 orphaned file"))
            && cleaned.iter().any(|m| m.contains("removed 1 stale socket")),
        "{ev}"
    );
    kill(svc);
    let svc = Service::start("shared-copy", &["--state-dir", path_str(&state)]);
    let st = status_of(&svc.dir);
    assert_eq!(patches_of(&st), owned(&[(BASIC, "accepted")]), "{st}");
    assert_eq!(st["state"]["rejected"], json!([]), "{st}");
    svc.quit();
}

#[test]
fn a_watch_cancelled_by_its_client_leaves_the_patch_on_trial_and_not_accepted() {
    let state = state_dir();
    let svc = Service::start("cancel", &["--state-dir", path_str(&state)]);
    let d = svc.dir.clone();
    let mut child = spawn_in(
        &d,
        &[
            "apply",
            &relative(&patch(BASIC)),
            "--watch",
            "5s",
            "--accept",
        ],
    );
    svc.wait_log(|l| l.contains("watch window opened"));
    // Ctrl-C: SIGINT to the CLI process.
    // SAFETY: kill has no memory preconditions; the pid is our child's,
    // not yet waited for.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let status = child.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGINT)
    );
    // The service's word on the window.
    let start = Instant::now();
    let watch = loop {
        let ev = run_in(&d, &["events", "--json"]).json();
        if let Some(e) = ev["events"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["op"] == json!("watch"))
        {
            break e.clone();
        }
        assert!(start.elapsed() < GUARD, "no watch event: {ev}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(watch["outcome"], json!("cancelled"), "{watch}");
    let st = status_of(&d);
    assert_eq!(patches_of(&st), owned(&[(BASIC, "applied")]), "{st}");
    assert_eq!(st["state"]["accepted"], json!([]), "{st}");
    svc.serves_beyond(0);
    svc.quit();
}

/// `n` connections to `socket` from a thread running as uid and gid
/// 65534; the reply line of each.
fn connect_as_nobody(socket: &Path, n: usize) -> Vec<Value> {
    let socket = socket.to_owned();
    std::thread::spawn(move || {
        // SAFETY: the raw system calls change the credentials of this
        // thread only (libc's wrappers would change every thread's); the
        // thread does nothing else and ends here.
        unsafe {
            assert_eq!(libc::syscall(libc::SYS_setresgid, 65534, 65534, 65534), 0);
            assert_eq!(libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534), 0);
        }
        (0..n)
            .map(|_| {
                let s = UnixStream::connect(&socket).unwrap();
                s.set_read_timeout(Some(GUARD)).unwrap();
                let mut line = String::new();
                BufReader::new(&s).read_line(&mut line).unwrap();
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
            })
            .collect()
    })
    .join()
    .unwrap()
}

#[test]
fn refused_clients_are_counted_once_per_peer_and_keep_the_history_of_operations() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        panic!("this test runs as root (it connects as uid 65534)");
    }
    let svc = Service::start("refusals", &["--allow-gid", "4242"]);
    let d = svc.dir.clone();
    let r = run_in(&d, &["apply", &relative(&patch(BASIC))]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let replies = connect_as_nobody(&svc.socket, 300);
    assert!(replies.iter().all(|r| kind(r) == "not_permitted"));
    let ev = run_in(&d, &["events", "--json", "--limit", "256"]).json();
    let events = ev["events"].as_array().unwrap();
    for op in ["listen", "apply"] {
        assert!(
            events
                .iter()
                .any(|e| e["op"] == json!(op) && e["outcome"] == json!("ok")),
            "the {op} event is kept: {ev}"
        );
    }
    let refusals: Vec<&Value> = events
        .iter()
        .filter(|e| e["op"] == json!("connect"))
        .collect();
    assert!(!refusals.is_empty() && refusals.len() <= 4, "{ev}");
    let counted: u64 = refusals.iter().map(|e| e["count"].as_u64().unwrap()).sum();
    assert_eq!(counted, 300, "{ev}");
    assert!(refusals.iter().all(|e| e["peer"]["uid"] == json!(65534)));
    svc.wait_log(|l| l.contains("control connection refused"));
    let warnings = svc
        .seen
        .lock()
        .unwrap()
        .log
        .iter()
        .filter(|l| l.contains("control connection refused"))
        .count();
    assert!(
        warnings <= 4,
        "the log is rate-limited: {warnings} warnings"
    );
    svc.serves_beyond(0);
    svc.quit();
}

/// Peak resident memory of `pid`, in KiB.
fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// `check` of `file` by `n` clients at once, while the service's traffic
/// is measured; the replies and the requests served per second meanwhile.
fn checks_at_once(svc: &Service, file: &Path, n: usize) -> (Vec<Value>, f64) {
    let line = format!(
        "{}\n",
        json!({"v": 1, "op": "check", "file": path_str(file)})
    );
    let served = svc.served();
    let start = Instant::now();
    let clients: Vec<_> = (0..n)
        .map(|_| {
            let socket = svc.socket.clone();
            let line = line.clone();
            std::thread::spawn(move || raw(&socket, line.as_bytes()))
        })
        .collect();
    // Traffic flows while the checks run.
    let mut now = served;
    while !clients.iter().all(|c| c.is_finished()) {
        now = svc.serves_beyond(now);
    }
    let rate = (svc.served() - served) as f64 / start.elapsed().as_secs_f64();
    (
        clients.into_iter().map(|c| c.join().unwrap()).collect(),
        rate,
    )
}

#[test]
fn a_large_file_is_refused_unread_with_memory_bounded_and_traffic_flowing() {
    let svc = Service::start("large", &[]);
    let before = svc.serves_beyond(0);
    let start = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    let rate = (svc.served() - before) as f64 / start.elapsed().as_secs_f64();
    eprintln!("traffic before: {rate:.0} requests/s");
    let hwm0 = vm_hwm_kib(svc.pid());
    let dir = scratch();
    // 900 MiB, sparse: over the size limit.
    let big = dir.join("big.so");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(900 << 20)
        .unwrap();
    std::fs::set_permissions(&big, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (replies, rate) = checks_at_once(&svc, &big, 4);
    let grew = vm_hwm_kib(svc.pid()) - hwm0;
    eprintln!(
        "4 checks of a 900 MiB file: traffic {rate:.0} requests/s meanwhile, peak memory +{grew} KiB"
    );
    assert!(grew < 32 * 1024, "peak memory grew by {grew} KiB");
    for r in &replies {
        assert_eq!(kind(r), "read", "{r}");
        assert!(
            r["error"]["message"].as_str().unwrap().contains("limit"),
            "{r}"
        );
    }
    // 48 MiB, sparse, under the limit but not an ELF file: refused on its
    // header.
    let junk = dir.join("junk.so");
    std::fs::File::create(&junk)
        .unwrap()
        .set_len(48 << 20)
        .unwrap();
    std::fs::set_permissions(&junk, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (replies, rate) = checks_at_once(&svc, &junk, 4);
    for r in &replies {
        assert_eq!(kind(r), "not_loadable", "{r}");
        assert!(
            r["error"]["message"].as_str().unwrap().contains("ELF"),
            "{r}"
        );
    }
    eprintln!("4 checks of a 48 MiB non-ELF file: traffic {rate:.0} requests/s meanwhile");
    let grew = vm_hwm_kib(svc.pid()) - hwm0;
    eprintln!("peak resident memory grew by {grew} KiB");
    assert!(grew < 32 * 1024, "peak memory grew by {grew} KiB");
    // 48 MiB with an ELF header, read whole by each check: the endpoint
    // reads at most two patch files at once.
    let elf = dir.join("elf.so");
    let mut f = std::fs::File::create(&elf).unwrap();
    f.write_all(b"\x7fELF").unwrap();
    f.set_len(48 << 20).unwrap();
    drop(f);
    std::fs::set_permissions(&elf, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (replies, rate) = checks_at_once(&svc, &elf, 8);
    for r in &replies {
        assert_eq!(kind(r), "not_loadable", "{r}");
    }
    let grew = vm_hwm_kib(svc.pid()) - hwm0;
    eprintln!(
        "8 checks of a 48 MiB ELF-headed file: traffic {rate:.0} requests/s meanwhile, peak memory +{grew} KiB"
    );
    assert!(grew < 4 * 48 * 1024, "peak memory grew by {grew} KiB");
    svc.quit();
}

/// `n` connections that each send `status` before any reply is read;
/// every one gets a reply: the status, or `overloaded`.
fn burst(n: usize) {
    let svc = Service::start("burst", &[]);
    let served = svc.served();
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        let mut c = UnixStream::connect(&svc.socket).unwrap();
        // A client refused at once may find the connection closed.
        let _ = c.write_all(b"{\"v\":1,\"op\":\"status\"}\n");
        conns.push(c);
    }
    let (mut ok, mut overloaded, mut none) = (0, 0, 0);
    for c in &conns {
        c.set_read_timeout(Some(GUARD)).unwrap();
        let mut line = String::new();
        match BufReader::new(c).read_line(&mut line) {
            Ok(n) if n > 0 => {
                let v: Value = serde_json::from_str(&line).unwrap();
                if v["ok"] == json!(true) {
                    ok += 1;
                } else {
                    assert_eq!(kind(&v), "overloaded", "{v}");
                    overloaded += 1;
                }
            }
            _ => none += 1,
        }
    }
    eprintln!("{n} connections: {ok} answered, {overloaded} overloaded, {none} without a reply");
    assert_eq!(none, 0, "every client gets a reply");
    assert!(ok > 0);
    drop(conns);
    svc.serves_beyond(served);
    svc.quit();
}

#[test]
fn a_burst_of_1000_connections_gets_a_reply_each() {
    burst(1000);
}

#[test]
#[ignore = "long form of a_burst_of_1000_connections_gets_a_reply_each"]
fn a_burst_of_10000_connections_gets_a_reply_each() {
    burst(10_000);
}

/// `hotpatch ARGS` as `uid`:`gid`, from `/`.
fn run_as_args(uid: u32, gid: u32, args: &[&str]) -> Run {
    let bin = hotpatch_for_others();
    for _ in 0..100 {
        let spawned = Command::new(&bin)
            .args(args)
            .current_dir("/")
            .uid(uid)
            .gid(gid)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        match spawned {
            Ok(child) => return finish(child),
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("run {} as uid {uid}: {e}", bin.display()),
        }
    }
    panic!("{} stayed busy (ETXTBSY)", bin.display())
}

#[test]
fn messages_say_what_is_so() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        panic!("this test runs as root (it runs the tool as uid 65534)");
    }
    let state = state_dir();
    let svc = Service::start("messages", &["--state-dir", path_str(&state)]);
    let d = svc.dir.clone();
    let pid = svc.pid().to_string();

    // A user who cannot enter the socket directory is not permitted (6),
    // not told the process has no socket (7).
    let r = run_as_args(
        65534,
        65534,
        &["status", "--pid", &pid, "--socket-dir", path_str(&d)],
    );
    assert_eq!(r.code, 6, "{}", r.stderr);
    one_line_error(&r, "not permitted");

    // A watch window with no health check registered says so.
    let r = run_in(&d, &["apply", &relative(&patch(V1)), "--watch", "300ms"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("no health check registered") && !r.stdout.contains("round(s)"),
        "{}",
        r.stdout
    );

    // "patch #N", never "patch patch #N": a file that changed after it
    // was applied, to the bytes of another applied patch, then of one
    // that is not applied.
    let dir = scratch();
    let file = dir.join("fix.so");
    std::fs::copy(patch(BASIC), &file).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let r = run_in(&d, &["apply", path_str(&file)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    for other in [V1, V2] {
        std::fs::copy(patch(other), &file).unwrap();
        let r = run_in(&d, &["accept", BASIC]);
        assert_eq!(r.code, 3, "{}", r.stderr);
        one_line_error(&r, "file_changed");
        assert!(!r.stderr.contains("patch patch"), "{}", r.stderr);
    }
    std::fs::copy(patch(BASIC), &file).unwrap();
    let r = run_in(&d, &["accept", BASIC]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = run_in(&d, &["accept", V1]);
    assert_eq!(r.code, 0, "{}", r.stderr);

    // The reverted and the replaced patch are not shown as accepted.
    let r = run_in(&d, &["replace", V1, &relative(&patch(V2)), "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        r.json()["replaced"]["state"],
        json!("replaced"),
        "{}",
        r.stdout
    );
    kill(svc);

    // After a restart BASIC runs from its stored copy; its revert event
    // names the file it was accepted from, not the copy it deletes.
    let svc = Service::start("messages", &["--state-dir", path_str(&state)]);
    let d = svc.dir.clone();
    let copy = state
        .join("patches")
        .join(record(&state)["patches"][0]["file"].as_str().unwrap());
    let r = run_in(&d, &["revert", BASIC, "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        r.json()["reverted"]["state"],
        json!("reverted"),
        "{}",
        r.stdout
    );
    assert!(!copy.exists(), "its copy is removed");
    let ev = run_in(&d, &["events", "--json"]).json();
    let revert = ev["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["op"] == json!("revert"))
        .cloned()
        .unwrap_or_else(|| panic!("no revert event: {ev}"));
    assert_eq!(revert["file"], json!(path_str(&file)), "{revert}");
    svc.quit();
}
