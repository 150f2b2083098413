//! What the `hotpatch` tool's tests share: the real service processes
//! (`tests/fixtures/control-svc`), each with a private socket directory,
//! running the tool against them, and reading what they say.
//!
//! The service and the patch crates are built by ONE nested cargo into
//! `target/fixtures` (`hotpatch_test_support::nested_build`: so with the
//! same features, hence the same symbol names), and each patch crate's
//! rlib is linked into a thin patch bound to the control-svc binary with
//! `cargo_hotpatch::link`, as `cargo hotpatch build` does.

#![allow(dead_code)]

use serde_json::{Value, json};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub const SERVICE: &str = "fixture-control-svc";
pub const BASIC: &str = "fixture-patch-basic";
pub const V1: &str = "fixture-patch-replace-v1";
pub const V2: &str = "fixture-patch-replace-v2";
pub const BAD_RUSTC: &str = "fixture-patch-bad-rustc";
pub const WATCH_PANIC: &str = "fixture-patch-watch-panic";
pub const HOOK: &str = "fixture-patch-hook-a";
pub const HOOK_PANIC: &str = "fixture-patch-hook-panic";

/// A guard against hangs only: nothing here asserts on time.
pub const GUARD: Duration = Duration::from_secs(30);

pub fn root() -> PathBuf {
    hotpatch_test_support::workspace_root()
}

pub fn profile() -> &'static str {
    hotpatch_test_support::profile()
}

/// Builds the service and the patches once per test process (as
/// tests/support builds patches: in `target/fixtures`, no debug info).
pub fn built() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        hotpatch_test_support::nested_build(
            &[
                SERVICE,
                BASIC,
                V1,
                V2,
                BAD_RUSTC,
                WATCH_PANIC,
                HOOK,
                HOOK_PANIC,
            ],
            &[],
        )
    })
}

/// The fixture patch `package`, as a copy with modes the service's trust
/// policy accepts whatever the umask (under umask 002 cargo's output is
/// group-writable, and so is its directory), made once per process.
pub fn patch(package: &str) -> PathBuf {
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
pub fn searchable_by_all(dir: &Path) -> bool {
    dir.ancestors()
        .all(|d| std::fs::metadata(d).is_ok_and(|m| m.is_dir() && m.mode() & 0o001 != 0))
}

pub extern "C" fn remove_scratch() {
    if let Some(base) = SCRATCH.get() {
        let _ = std::fs::remove_dir_all(base);
    }
}

pub static SCRATCH: OnceLock<PathBuf> = OnceLock::new();

/// This test process's scratch directory, searchable by everyone (the
/// uid 65534 test reaches a socket and a binary in it), wherever the
/// checkout is and whatever `TMPDIR` is: under the first of the temporary
/// directory, `/tmp`, `/var/tmp` and `/dev/shm` that everyone can search.
/// Each call makes a new subdirectory, mode 0755. Removed when the test
/// process exits.
pub fn scratch() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    // Relaxed: only uniqueness matters.
    let dir = scratch_base().join(format!("d{}", N.fetch_add(1, Ordering::Relaxed)));
    // Its mode, not the umask's: the service's trust policy checks the
    // directories of the files it stores there.
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

pub fn scratch_base() -> &'static Path {
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
pub struct Seen {
    pub served: u64,
    pub wrong: u64,
    pub panicked: u64,
    pub lines: Vec<String>,
    /// Its stderr: the endpoint's `tracing` events.
    pub log: Vec<String>,
}

/// A running `control-svc`.
pub struct Service {
    pub child: Child,
    pub stdin: Option<ChildStdin>,
    pub seen: Arc<Mutex<Seen>>,
    pub socket: PathBuf,
    pub dir: PathBuf,
}

impl Service {
    pub fn start(name: &str, args: &[&str]) -> Service {
        Service::start_env(name, args, &[])
    }

    /// With these environment variables set in the service.
    pub fn start_env(name: &str, args: &[&str], env: &[(&str, &str)]) -> Service {
        let dir = scratch();
        std::fs::create_dir_all(&dir).unwrap();
        Service::start_in(&dir.join("sock"), name, args, env)
    }

    /// With its sockets in `sockets`.
    pub fn start_in(sockets: &Path, name: &str, args: &[&str], env: &[(&str, &str)]) -> Service {
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
    pub fn wait_log(&self, pred: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            if let Some(l) = self.seen.lock().unwrap().log.iter().find(|l| pred(l)) {
                return l.clone();
            }
            assert!(start.elapsed() < GUARD, "the service did not log the line");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn wait_line(&self, pred: impl Fn(&str) -> bool) -> String {
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

    pub fn served(&self) -> u64 {
        let s = self.seen.lock().unwrap();
        assert_eq!(s.wrong, 0, "the service saw wrong answers");
        s.served
    }

    /// Waits until the service has served more than `than`.
    pub fn serves_beyond(&self, than: u64) -> u64 {
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

    pub fn say(&mut self, line: &str) {
        writeln!(self.stdin.as_mut().unwrap(), "{line}").unwrap();
    }

    /// Quits; checks the service exits 0 (no wrong answer) and removed
    /// its socket.
    pub fn quit(mut self) {
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

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub pid: u32,
}

impl Run {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }
}

pub fn hotpatch_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_hotpatch"))
}

pub fn finish(child: Child) -> Run {
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

pub fn spawn_in(dir: &Path, args: &[&str]) -> Child {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(hotpatch_bin());
    // The CLI runs as from a terminal: SIGINT and SIGQUIT at their default
    // action. A test run started in the background by a shell without job
    // control inherits them ignored, and a test's Ctrl-C (SIGINT) would
    // then do nothing.
    // SAFETY: between fork and exec the closure only calls `signal`, which
    // is async-signal-safe, and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            libc::signal(libc::SIGQUIT, libc::SIG_DFL);
            Ok(())
        });
    }
    cmd.current_dir(scratch_base())
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
pub fn run_in(dir: &Path, args: &[&str]) -> Run {
    finish(spawn_in(dir, args))
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The path relative to the scratch directory (the CLI's cwd), where the
/// patch copies are.
pub fn relative(p: &Path) -> String {
    p.strip_prefix(scratch_base())
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned()
}

pub fn one_line_error(r: &Run, kind: &str) {
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

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

pub fn implementation_of(status: &Value, path: &str) -> Value {
    status["functions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == json!(path))
        .unwrap_or_else(|| panic!("no function {path}"))["implementation"]
        .clone()
}

/// Kills the child when dropped.
pub struct Guarded(pub Child);
pub fn scopeguard(c: Child) -> Guarded {
    Guarded(c)
}
impl Drop for Guarded {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One raw request on a fresh connection; the reply.
pub fn raw(socket: &Path, line: &[u8]) -> Value {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(GUARD)).unwrap();
    s.write_all(line).unwrap();
    let mut reply = String::new();
    BufReader::new(&s).read_line(&mut reply).unwrap();
    serde_json::from_str(&reply).unwrap_or_else(|e| panic!("{e}: {reply:?}"))
}

pub fn kind(v: &Value) -> &str {
    assert_eq!(v["v"], json!(1), "{v}");
    assert_eq!(v["ok"], json!(false), "{v}");
    assert!(v["error"]["message"].is_string(), "{v}");
    v["error"]["kind"].as_str().unwrap()
}

pub fn fds_and_threads(pid: u32) -> (usize, usize) {
    let count = |what: &str| {
        std::fs::read_dir(format!("/proc/{pid}/{what}"))
            .unwrap()
            .count()
    };
    (count("fd"), count("task"))
}

/// Waits until the connection is closed by the service; the bytes it sent.
pub fn until_closed(mut s: &UnixStream) -> Vec<u8> {
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

/// The `hotpatch` binary where uid 65534 can run it (the checkout may be
/// in a directory only root can enter).
pub fn hotpatch_for_others() -> PathBuf {
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

pub fn run_as(uid: u32, gid: u32, socket: &Path) -> Run {
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

/// (CPU ticks, voluntary + involuntary context switches) of each thread.
pub fn thread_counters(pid: u32) -> HashMap<String, (u64, u64)> {
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

/// `status --json` of the only service in `d`.
pub fn status_of(d: &Path) -> Value {
    let r = run_in(d, &["status", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    r.json()
}

/// (name, state) of each applied patch, oldest first.
pub fn patches_of(status: &Value) -> Vec<(String, String)> {
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

pub fn owned(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect()
}

/// A state directory for several lives of a service.
pub fn state_dir() -> PathBuf {
    let d = scratch();
    std::fs::create_dir_all(&d).unwrap();
    d.join("state")
}

/// Starts a service on `state`, applies BASIC then V1 and accepts both.
pub fn apply_and_accept_two(state: &Path) -> Service {
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
pub fn kill(mut svc: Service) {
    svc.child.kill().unwrap();
    svc.child.wait().unwrap();
}

/// No wrong answer while serving beyond `than`.
pub fn serves_wrongly_never(svc: &Service, than: u64) -> bool {
    svc.serves_beyond(than) > than
}

pub fn record(state: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(state.join("accepted.json")).unwrap()).unwrap()
}

pub fn write_record(state: &Path, v: &Value) {
    std::fs::write(state.join("accepted.json"), v.to_string()).unwrap();
}

pub fn stored(state: &Path, entry: &Value) -> PathBuf {
    state.join("patches").join(entry["file"].as_str().unwrap())
}

/// The (kind, name) of each rejected item.
pub fn rejected_of(st: &Value) -> Vec<(String, String)> {
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

pub fn rejected_files(state: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(state.join("rejected"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// A small tmpfs mounted by the test (it runs as root), unmounted on drop.
pub struct Tmpfs(pub PathBuf);

impl Tmpfs {
    pub fn mount(size: &str) -> Tmpfs {
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

    pub fn remount(&self, option: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,{option}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(status.success(), "remount {option}");
    }

    /// Fills the file system; the filler file.
    pub fn fill(&self) -> PathBuf {
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
pub fn unrecordable_operations_change_nothing(d: &Path, state: &Path, why: &str) {
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

/// `n` connections to `socket` from a thread running as uid and gid
/// 65534; the reply line of each.
pub fn connect_as_nobody(socket: &Path, n: usize) -> Vec<Value> {
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

/// Peak resident memory of `pid`, in KiB.
pub fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// `check` of `file` by `n` clients at once, while the service's traffic
/// is measured; the replies and the requests served per second meanwhile.
pub fn checks_at_once(svc: &Service, file: &Path, n: usize) -> (Vec<Value>, f64) {
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

/// `n` connections that each send `status` before any reply is read;
/// every one gets a reply: the status, or `overloaded`.
pub fn burst(n: usize) {
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

/// `hotpatch ARGS` as `uid`:`gid`, from `/`.
pub fn run_as_args(uid: u32, gid: u32, args: &[&str]) -> Run {
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
