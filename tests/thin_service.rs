//! Thin patches in a real service process (issue 9's hard cases):
//! `tests/fixtures/thin-svc`, a multi-threaded tokio + tracing service
//! driven on stdin, loads patches linked by `cargo_hotpatch::link` and
//! reports what its own code sees.
//!
//! The service and the patch crates are built by ONE nested cargo into
//! `target/fixtures` (so with the same features, hence the symbol names
//! the service exports), and each patch crate's rlib is linked against
//! the service binary it is for. `thin-svc-other` is the same service
//! with another build constant (another build-id, the same library
//! symbols); `thin-svc-plain` is the service without `-rdynamic` (bound
//! through its symbol table; stripped, refused);
//! `thin-svc-norelro` the service linked without RELRO.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// A guard against hangs only: nothing here asserts on time.
const GUARD: Duration = Duration::from_secs(60);

const FIX_A: &str = "thin-fix-a";
const FIX_PANIC: &str = "thin-fix-panic";
const FIX_MISSING: &str = "thin-fix-missing";
const FIX_PLAIN: &str = "thin-fix-plain";

/// The nested build's output directory (`target/fixtures/<profile>`),
/// built once per test process.
fn built() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        support::nested_build(&["thin-svc", FIX_A, FIX_PANIC, FIX_MISSING, FIX_PLAIN], &[])
    })
}

fn binary(name: &str) -> PathBuf {
    built().join(name)
}

/// The service without `-rdynamic` and the patch for it, built with
/// `--release` by a nested cargo (once per test process): a debug build
/// shares generic instantiations across crates, so a patch crate names
/// upstream copies (linkme's `static_slice` calls a
/// `core::fmt::Arguments::new` of `core`) that only a binary exporting its
/// symbols keeps; an optimised build instantiates them in the patch.
fn built_release() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let debug = support::nested_build(&["thin-svc", FIX_PLAIN], &["--release"]);
        debug.parent().unwrap().join("release")
    })
}

fn rlib(package: &str) -> PathBuf {
    built().join(format!("lib{}.rlib", package.replace('-', "_")))
}

/// Where patch `name` goes: the tests' private directory, mode 0644 (the
/// service's default trust policy checks it).
fn out(name: &str) -> PathBuf {
    support::temp_dir().join(name)
}

/// `package` linked by the tool against `host` (checked), once per
/// process (the tests run in parallel and share the files).
fn linked(package: &str, host: &str) -> PathBuf {
    link_once(package, host, true)
}

/// `package` linked against `host` without the tool's refusals.
fn linked_unchecked(package: &str, host: &str) -> PathBuf {
    link_once(package, host, false)
}

fn link_once(package: &str, host: &str, checked: bool) -> PathBuf {
    static DONE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    let kind = if checked { "checked" } else { "unchecked" };
    let so = out(&format!("{package}-for-{host}-{kind}.so"));
    if !done.contains(&so) {
        let link = if checked {
            cargo_hotpatch::link
        } else {
            cargo_hotpatch::link_unchecked
        };
        link(&rlib(package), &binary(host), &so)
            .unwrap_or_else(|e| panic!("linking {package} ({kind}) against {host}: {e}"));
        support::set_mode(&so, 0o644);
        done.push(so.clone());
    }
    so
}

/// The tag the service is started with: set in its `OnceLock` at run
/// time, so a patch can only know it by reading the host's.
fn tag() -> String {
    format!("prod-{}", std::process::id())
}

/// A running service, driven on stdin.
struct Service {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
}

impl Service {
    fn start(name: &str) -> Service {
        Service::start_at(&binary(name))
    }

    fn start_at(path: &Path) -> Service {
        let name = path.display();
        let mut child = Command::new(path)
            .args(["--tag", &tag()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
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
        let stdin = child.stdin.take();
        let mut svc = Service {
            child,
            stdin,
            lines,
        };
        let build = svc.ask("build");
        assert!(build.starts_with("ok "), "{name} answers: {build}");
        svc
    }

    /// Sends `command`; returns the service's one-line answer.
    fn ask(&mut self, command: &str) -> String {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{command}").unwrap();
        stdin.flush().unwrap();
        self.lines
            .recv_timeout(GUARD)
            .unwrap_or_else(|e| panic!("no answer to {command:?}: {e}"))
    }

    fn load(&mut self, so: &Path) -> String {
        self.ask(&format!("load {}", so.display()))
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        // End of input ends the service.
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

#[test]
fn a_patch_logs_through_the_hosts_subscriber_with_its_fields() {
    let fix = linked(FIX_A, "thin-svc");
    let mut svc = Service::start("thin-svc");
    assert_eq!(svc.ask("call audit"), "ok 42 events=[]");
    assert_eq!(svc.load(&fix), "ok loaded thin-fix-a");
    assert_eq!(
        svc.ask("call audit"),
        "ok 43 events=[WARN message=audit fixed order=42 reason=discount-bug]",
        "the host's subscriber records the patch's event with its fields"
    );
}

#[test]
fn patch_code_spawns_sleeps_and_awaits_on_the_hosts_runtime() {
    let fix = linked(FIX_A, "thin-svc");
    let mut svc = Service::start("thin-svc");
    assert_eq!(svc.ask("call job"), "ok original 21");
    assert_eq!(svc.load(&fix), "ok loaded thin-fix-a");
    // The host's runtime: multi-threaded, 3 workers, threads named
    // thin-svc-rt; both tasks ran on them.
    assert_eq!(
        svc.ask("call job"),
        "ok patched 42 flavor MultiThread workers 3 slept-on thin-svc-rt awaited-on thin-svc-rt"
    );
}

#[test]
fn patch_code_reads_and_writes_the_hosts_private_counter_config_and_thread_local() {
    let fix = linked(FIX_A, "thin-svc");
    let mut svc = Service::start("thin-svc");
    let tag = tag();
    assert_eq!(
        svc.ask("call state"),
        format!("ok patch[original 7] host[counter 0->0 visits 5 tag {tag}]")
    );
    assert_eq!(svc.load(&fix), "ok loaded thin-fix-a");
    // The patch bumped the counter the host reads, added 700 to the
    // host's thread-local (5 set by the host), and read the tag the host
    // set at start-up; twice, to see its own writes kept.
    assert_eq!(
        svc.ask("call state"),
        format!("ok patch[counter 1 visits 705 tag {tag}] host[counter 0->1 visits 705 tag {tag}]")
    );
    assert_eq!(
        svc.ask("call state"),
        format!("ok patch[counter 2 visits 705 tag {tag}] host[counter 1->2 visits 705 tag {tag}]")
    );
}

#[test]
fn a_patch_panic_reaches_the_hosts_hook_and_the_caller() {
    let fix = linked(FIX_PANIC, "thin-svc");
    let mut svc = Service::start("thin-svc");
    assert_eq!(svc.ask("call risky"), "ok returned 7 hook=[]");
    assert_eq!(svc.load(&fix), "ok loaded thin-fix-panic");
    assert_eq!(
        svc.ask("call risky"),
        "ok caught thin-fix-panic: 7 is too risky hook=[thin-fix-panic: 7 is too risky]",
        "the host's hook saw the panic and the caller caught it"
    );
    // The service still serves.
    assert_eq!(svc.ask("call audit"), "ok 42 events=[]");
}

#[test]
fn a_patch_needing_a_symbol_the_binary_lacks_is_refused_by_the_tool_and_the_loader() {
    let missing = "thin_extra::extra_weight";
    let so = out("thin-fix-missing-refused.so");
    match cargo_hotpatch::link(&rlib(FIX_MISSING), &binary("thin-svc"), &so) {
        Err(e @ cargo_hotpatch::Error::MissingSymbols { .. }) => {
            assert!(e.to_string().contains(missing), "the tool names it: {e}")
        }
        other => panic!("the tool must refuse with MissingSymbols: {other:?}"),
    }
    let unchecked = linked_unchecked(FIX_MISSING, "thin-svc");
    let good = linked(FIX_A, "thin-svc");
    let mut svc = Service::start("thin-svc");
    assert_eq!(svc.load(&good), "ok loaded thin-fix-a");
    let answer = svc.load(&unchecked);
    assert!(
        answer.starts_with("err MissingSymbols") && answer.contains(missing),
        "the loader names the symbol: {answer}"
    );
    // Nothing changed: the good patch alone, risky() still the host's.
    assert_eq!(svc.ask("applied"), "ok thin-fix-a");
    assert_eq!(svc.ask("call risky"), "ok returned 7 hook=[]");
    assert_eq!(
        svc.ask("call audit"),
        "ok 43 events=[WARN message=audit fixed order=42 reason=discount-bug]"
    );
}

#[test]
fn a_patch_for_another_build_is_refused_with_both_build_ids() {
    let ours = cargo_hotpatch::hex(&cargo_hotpatch::build_id(&binary("thin-svc")).unwrap());
    let other = cargo_hotpatch::hex(&cargo_hotpatch::build_id(&binary("thin-svc-other")).unwrap());
    assert_ne!(ours, other, "the two builds differ");
    // The tool accepts it for the other build, which loads it.
    let for_other = linked(FIX_A, "thin-svc-other");
    let mut other_svc = Service::start("thin-svc-other");
    assert_eq!(other_svc.ask("build"), "ok other");
    assert_eq!(other_svc.load(&for_other), "ok loaded thin-fix-a");
    drop(other_svc);

    let mut svc = Service::start("thin-svc");
    let answer = svc.load(&for_other);
    assert!(
        answer.starts_with("err WrongBuild") && answer.contains(&ours) && answer.contains(&other),
        "refused naming build {other} (the patch's) and {ours} (the host's): {answer}"
    );
    assert_eq!(svc.ask("applied"), "ok none");
    assert_eq!(svc.ask("call audit"), "ok 42 events=[]");
}

/// A service linked without `-rdynamic` (issue 22): the tool binds the
/// patch to the binary's own symbol table, and the runtime's loader
/// resolves it from the same table (read from `/proc/self/exe`, matched
/// by build-id), private statics included: the patch loads and writes
/// the host's private counter, which the host's own code then reads.
///
/// The limit: without `-rdynamic` the linker keeps only the code the
/// service itself uses, so a patch that calls a function the service
/// never calls is refused by the tool, naming it: `thin-fix-a` spawns a
/// `tokio::time::sleep`, which the service does not; and in this debug
/// build even `thin-fix-panic`'s `format!` needs an instantiation of
/// `core::fmt::Arguments::new` that only the exporting build keeps (so
/// this test uses a release build, see `built_release`).
#[test]
fn a_service_without_rdynamic_binds_patches_through_its_symbol_table() {
    let exports = |name: &str| {
        let data = std::fs::read(binary(name)).unwrap();
        let file = object::File::parse(&*data).unwrap();
        use object::{Object, ObjectSymbol};
        file.dynamic_symbols()
            .filter(|s| !s.is_undefined())
            .filter_map(|s| s.name().ok())
            .filter(|n| n.starts_with("_ZN") || n.starts_with("_R"))
            .count()
    };
    assert_eq!(exports("thin-svc-plain"), 0, "no -rdynamic: no Rust export");
    assert!(exports("thin-svc") > 0);
    let host = built_release().join("thin-svc-plain");
    let fix = out("thin-fix-plain-for-release-plain.so");
    cargo_hotpatch::link(&built_release().join("libthin_fix_plain.rlib"), &host, &fix)
        .unwrap_or_else(|e| panic!("linking thin-fix-plain against the release service: {e}"));
    support::set_mode(&fix, 0o644);
    let mut svc = Service::start_at(&host);
    assert_eq!(svc.ask("build"), "ok plain");
    assert_eq!(svc.ask("call risky"), "ok returned 7 hook=[]");
    assert_eq!(svc.load(&fix), "ok loaded thin-fix-plain");
    assert_eq!(svc.ask("call risky"), "ok returned 1007 hook=[]");
    assert_eq!(svc.ask("call risky"), "ok returned 2007 hook=[]");
    let tag = tag();
    assert_eq!(
        svc.ask("call state"),
        format!("ok patch[original 7] host[counter 2->2 visits 5 tag {tag}]"),
        "the host's own code reads the counter the patch wrote"
    );
    assert_eq!(svc.ask("applied"), "ok thin-fix-plain");

    let so = out("thin-fix-a-for-plain-refused.so");
    match cargo_hotpatch::link(&rlib(FIX_A), &binary("thin-svc-plain"), &so) {
        Err(e @ cargo_hotpatch::Error::MissingSymbols { .. }) => assert!(
            e.to_string().contains("tokio::time::sleep::sleep"),
            "the tool names what the service lacks: {e}"
        ),
        other => panic!("the tool must refuse with MissingSymbols: {other:?}"),
    }
}

/// The same service stripped (no symbol table) and without `-rdynamic`:
/// nothing to bind to; the tool and the runtime refuse, each saying what
/// to do.
#[test]
fn a_stripped_service_without_rdynamic_refuses_with_host_not_exported() {
    let stripped = out("thin-svc-stripped");
    let status = Command::new("strip")
        .arg("-o")
        .arg(&stripped)
        .arg(binary("thin-svc-plain"))
        .status()
        .expect("run strip");
    assert!(status.success());
    let so = out("thin-fix-a-for-stripped-refused.so");
    match cargo_hotpatch::link(&rlib(FIX_A), &stripped, &so) {
        Err(e @ cargo_hotpatch::Error::HostNotExported { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains("symbol table") && text.contains("-rdynamic"),
                "the tool says what to do: {text}"
            )
        }
        other => panic!("the tool must refuse with HostNotExported: {other:?}"),
    }
    let unchecked = out("thin-fix-a-for-stripped-unchecked.so");
    cargo_hotpatch::link_unchecked(&rlib(FIX_A), &stripped, &unchecked).unwrap();
    support::set_mode(&unchecked, 0o644);
    let mut child = Command::new(&stripped)
        .args(["--tag", &tag()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the stripped service");
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "build\nload {}\napplied", unchecked.display()).unwrap();
    drop(stdin);
    let output = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    let answers: Vec<&str> = text.lines().collect();
    assert_eq!(answers.first(), Some(&"ok plain"), "{text}");
    let answer = answers.get(1).copied().unwrap_or_default();
    assert!(
        answer.starts_with("err HostNotExported")
            && answer.contains("symbol table")
            && answer.contains("-rdynamic"),
        "the loader says what to do: {answer}"
    );
    assert_eq!(answers.get(2), Some(&"ok none"));
}

/// A service linked without RELRO (`-z norelro`) keeps its slot table
/// writable: the runtime says so once, as a `tracing` warning at its
/// first use, and patches still apply (refusing them would protect
/// nothing: such a binary's GOT is writable too). The same service linked
/// as usual has every slot read-only.
#[test]
fn a_service_linked_without_relro_warns_and_still_applies() {
    let mut usual = Service::start("thin-svc");
    let slots = usual.ask("slots");
    let n: usize = slots
        .strip_prefix("ok read_only ")
        .and_then(|rest| rest.split_once(" of "))
        .filter(|(r, n)| r == n)
        .and_then(|(_, n)| n.parse().ok())
        .unwrap_or_else(|| panic!("thin-svc: every slot read-only: {slots}"));
    assert!(n > 0);
    assert!(!usual.ask("events").contains("RELRO"));

    let fix = linked(FIX_A, "thin-svc-norelro");
    let mut svc = Service::start("thin-svc-norelro");
    assert_eq!(svc.ask("slots"), format!("ok read_only 0 of {n}"));
    let events = svc.ask("events");
    assert!(
        events.contains(&format!(
            "WARN message=hotpatch: {n} of the {n} slots of patchable functions are not in this \
             binary's RELRO segment (linked with `-z norelro`?)"
        )),
        "the warning: {events}"
    );
    assert_eq!(svc.load(&fix), "ok loaded thin-fix-a");
    assert_eq!(
        svc.ask("call audit"),
        "ok 43 events=[WARN message=audit fixed order=42 reason=discount-bug]"
    );
}

/// What `cargo hotpatch build` reports of a real patch: the functions it
/// replaces, named as the service names them (from its `#[patch]`
/// records), the host's build-id, and a file the size of the fix.
#[test]
fn the_tool_reports_what_a_patch_replaces_and_its_size() {
    let so = out("thin-fix-a-report.so");
    let report = cargo_hotpatch::link(&rlib(FIX_A), &binary("thin-svc"), &so).unwrap();
    assert_eq!(
        report.functions,
        ["thin_svc::audit", "thin_svc::job", "thin_svc::touch"]
    );
    let id = cargo_hotpatch::build_id(&binary("thin-svc")).unwrap();
    assert_eq!(report.host_build_id, cargo_hotpatch::hex(&id));
    assert!(report.bound_to_host > 0, "{report:?}");
    // Debug, with debug info and tokio's async code: 214 KiB measured (a
    // cdylib of the same crate carries std, tokio and tracing: megabytes).
    // Release figures are in BENCHMARKS.md.
    assert!(
        report.size < 512 * 1024,
        "a thin patch of three functions: {} bytes",
        report.size
    );
}
