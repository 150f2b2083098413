//! A debugger sees patch code mapped by hotpatch's own loader (issue 22):
//! the loader registers each near-mapped patch through the GDB JIT
//! interface, so gdb attached to a patched process names the patch's
//! functions and unwinds through their frames into the host's.
//!
//! The process is a child run of this test binary: it loads a real thin
//! patch near its executable and calls a replacement that parks in patch
//! code (`tests/fixtures/patch-debugger`); gdb (the Debian package `gdb`,
//! which `.ci/run` installs) attaches to it. Without gdb the test fails.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use object::{Object, ObjectSection, ObjectSymbol};

const PATCH: &str = "fixture-patch-debugger";
const CHILD: &str = "HOTPATCH_DEBUGGER_TEST_CHILD";
/// A guard against hangs only: nothing here asserts on time.
const GUARD: Duration = Duration::from_secs(120);

/// Kills the child when the test ends, however it ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The address of the patch's function `park` relative to its load bias,
/// from the patch file's own symbol table.
fn park_offset(so: &std::path::Path) -> u64 {
    let bytes = std::fs::read(so).unwrap();
    let file = object::File::parse(&*bytes).unwrap();
    let park: Vec<u64> = file
        .symbols()
        .filter(|s| {
            s.name()
                .is_ok_and(|n| n.contains("22fixture_patch_debugger4park"))
        })
        .map(|s| s.address())
        .collect();
    assert_eq!(park.len(), 1, "one `park` in the patch's symbol table");
    park[0]
}

/// Runs `gdb -batch` attached to `pid` with `commands`; returns what it
/// printed (stdout and stderr).
fn gdb(pid: u32, commands: &[String]) -> String {
    let mut cmd = Command::new("gdb");
    cmd.args(["-batch", "-nx", "-iex", "set debuginfod enabled off", "-p"])
        .arg(pid.to_string());
    for c in commands {
        cmd.arg("-ex").arg(c);
    }
    let mut gdb = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run gdb ({e}): this test needs the Debian package `gdb`")
        });
    let start = Instant::now();
    while gdb.try_wait().unwrap().is_none() {
        if start.elapsed() > GUARD {
            let _ = gdb.kill();
            panic!("gdb did not finish");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = gdb.wait_with_output().unwrap();
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// gdb attached to a process stopped in near-mapped patch code names the
/// patch function at its address (`info symbol`) and in the backtrace,
/// and unwinds through the patch's frames to the host's caller.
#[test]
fn gdb_names_patch_code_and_unwinds_through_it() {
    const NAME: &str = "gdb_names_patch_code_and_unwinds_through_it";
    if let Some(so) = std::env::var_os(CHILD) {
        let _serial = support::serial();
        // Under Yama's ptrace_scope 1 only an ancestor may attach, and gdb
        // is this process's sibling: allow any (EINVAL without Yama).
        // SAFETY: prctl with these arguments only changes that setting.
        unsafe { libc::prctl(libc::PR_SET_PTRACER, libc::PR_SET_PTRACER_ANY, 0, 0, 0) };
        // The parent's copy: this process is killed, so it makes no
        // temporary directory of its own, which nothing would remove.
        let patch = hotpatch::load(so).unwrap();
        let hotpatch::Placement::Near { address, .. } = *patch.placement() else {
            panic!("not placed near: {}", patch.placement());
        };
        println!("placed at {address:#x}");
        // Never returns: the parent kills this process.
        let sum = svc::add(1, 2);
        println!("NOT PARKED: {sum}");
        patch.revert().unwrap();
        return;
    }
    match Command::new("gdb").arg("--version").output() {
        Ok(out) if out.status.success() => {}
        other => panic!(
            "gdb does not run ({other:?}): this test needs the Debian package `gdb` \
             (`apt-get install gdb`; .ci/run installs it)"
        ),
    }
    let so = support::patch(PATCH);
    let offset = park_offset(&so);
    let mut child = Killed(
        Command::new(std::env::current_exe().unwrap())
            .args([NAME, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD, &so)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run the test binary"),
    );
    let (tx, rx) = channel();
    let stdout = child.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut base = None;
    loop {
        let line = rx
            .recv_timeout(GUARD)
            .expect("the child parks in patch code");
        // libtest's own "test NAME ... " may start the line.
        if let Some((_, at)) = line.split_once("placed at 0x") {
            base = Some(u64::from_str_radix(at.trim(), 16).unwrap());
        }
        if line == "parked in patch code" {
            break;
        }
        assert!(!line.starts_with("NOT PARKED"), "{line}");
    }
    let park = base.expect("the child said where the patch is") + offset;
    let out = gdb(
        child.0.id(),
        &[
            format!("info symbol {park:#x}"),
            "thread apply all bt".into(),
        ],
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("fixture_patch_debugger::park")
                && l.contains(" in section .text of <in-memory@")),
        "`info symbol` names the patch function at {park:#x}:\n{out}"
    );
    // The parked thread's backtrace: the patch's frames, then the host's
    // down to libtest's frame that called the test function (the test
    // function and `svc::add` itself are inlined into it in a release
    // build), then to the thread's start.
    let thread = out
        .split("\nThread ")
        .find(|t| {
            t.lines()
                .any(|l| l.starts_with('#') && l.contains("fixture_patch_debugger::park"))
        })
        .unwrap_or_else(|| panic!("no backtrace shows the patch function:\n{out}"));
    let frames: Vec<&str> = thread.lines().filter(|l| l.starts_with('#')).collect();
    let position = |what: &str| frames.iter().position(|f| f.contains(what));
    let at = position("fixture_patch_debugger::park").unwrap();
    let entry = position("fixture_patch_debugger::__hotpatch_entry_add")
        .unwrap_or_else(|| panic!("the patch's entry is named:\n{thread}"));
    let caller = position("__rust_begin_short_backtrace")
        .unwrap_or_else(|| panic!("the backtrace does not reach the host's caller:\n{thread}"));
    let start = position("start_thread")
        .unwrap_or_else(|| panic!("the backtrace does not reach the thread's start:\n{thread}"));
    assert!(at < entry && entry < caller && caller < start, "{thread}");
    assert!(
        frames[at..=start].iter().all(|f| !f.contains("?? ()")),
        "every frame from the patch to the thread's start is named:\n{thread}"
    );
}

/// `struct jit_code_entry` and `struct jit_descriptor` of the GDB manual.
#[repr(C)]
struct CodeEntry {
    next_entry: *const CodeEntry,
    prev_entry: *const CodeEntry,
    symfile_addr: *const u8,
    symfile_size: u64,
}

#[repr(C)]
struct Descriptor {
    version: u32,
    action_flag: u32,
    relevant_entry: *const CodeEntry,
    first_entry: *const CodeEntry,
}

unsafe extern "C" {
    /// The runtime's descriptor, which this binary exports.
    static __jit_debug_descriptor: Descriptor;
}

/// The in-memory files of the debugger's list, walked from
/// `first_entry` as a debugger does.
fn listed() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    // SAFETY: read while no load or reclaim runs (the test holds the
    // serial lock and runs none meanwhile): every linked entry and its
    // file are live.
    unsafe {
        let d = &raw const __jit_debug_descriptor;
        assert_eq!((*d).version, 1);
        let mut e = (*d).first_entry;
        while !e.is_null() {
            out.push(
                std::slice::from_raw_parts((*e).symfile_addr, (*e).symfile_size as usize).to_vec(),
            );
            e = (*e).next_entry;
        }
    }
    out
}

/// A near-mapped patch is in the debugger's list while it is mapped: an
/// ELF file whose functions are at the addresses the patch runs at (its
/// load bias plus each symbol's value in the patch file), with its
/// `.eh_frame` as mapped; `reclaim` takes it out. `Loader::debugger(false)`
/// registers nothing.
#[test]
fn a_near_patch_is_listed_for_debuggers_until_reclaimed() {
    let _serial = support::serial();
    let so = support::copy_to_temp(&support::patch("fixture-patch-basic"), "listed-basic.so");
    let before = listed().len();
    let patch = hotpatch::load(&so).unwrap();
    let hotpatch::Placement::Near { address, size } = *patch.placement() else {
        panic!("not placed near: {}", patch.placement());
    };
    let files = listed();
    assert_eq!(files.len(), before + 1, "one file more");
    let file = object::File::parse(&*files[0]).expect("an ELF file, newest first");

    // Every function of the patch file, at its runtime address and size.
    let bytes = std::fs::read(&so).unwrap();
    let patch_file = object::File::parse(&*bytes).unwrap();
    let expected: std::collections::BTreeSet<(String, u64, u64)> = patch_file
        .symbols()
        .filter(|s| s.kind() == object::SymbolKind::Text && s.size() > 0 && !s.is_undefined())
        .map(|s| {
            (
                s.name().unwrap().to_owned(),
                address + s.address(),
                s.size(),
            )
        })
        .collect();
    let described: std::collections::BTreeSet<(String, u64, u64)> = file
        .symbols()
        .map(|s| (s.name().unwrap().to_owned(), s.address(), s.size()))
        .collect();
    assert!(
        expected
            .iter()
            .any(|(n, ..)| n.contains("__hotpatch_entry_answer")),
        "{expected:?}"
    );
    assert_eq!(described, expected);
    for (name, at, len) in &described {
        assert!(
            *at >= address && at + len <= address + size,
            "{name} at {at:#x} is in the patch's mapping"
        );
    }
    let eh_frame = file.section_by_name(".eh_frame").expect("its unwind table");
    let mapped = patch_file.section_by_name(".eh_frame").unwrap();
    assert_eq!(eh_frame.address(), address + mapped.address());
    assert_eq!(eh_frame.data().unwrap(), mapped.data().unwrap());

    patch.revert().unwrap();
    assert_eq!(listed().len(), before + 1, "reverted, still mapped: listed");
    // SAFETY: no thread of this test binary keeps anything from the patch.
    let done = unsafe { hotpatch::Loader::new().reclaim() }.unwrap();
    assert!(done.closed >= 1, "{done:?}");
    assert_eq!(listed().len(), before, "unmapped: out of the list");

    let off = support::copy_to_temp(&support::patch("fixture-patch-stack-a"), "unlisted-a.so");
    let patch = hotpatch::Loader::new().debugger(false).load(&off).unwrap();
    assert!(patch.placement().is_near(), "{}", patch.placement());
    assert_eq!(listed().len(), before, "not registered when turned off");
    patch.revert().unwrap();
    // SAFETY: as above.
    unsafe { hotpatch::Loader::new().reclaim() }.unwrap();
}

/// What registering with debuggers adds to a load and to a reclaim: fresh
/// copies of a patch (one byte appended, so each is a new library, mapped
/// and registered anew), loaded with registration on and off in turn, each
/// reverted and reclaimed. Prints the medians; asserts nothing about time.
/// `cargo test --release --test debugger -- --ignored --nocapture load_cost`
#[test]
#[ignore]
fn load_cost_of_the_debugger_registration() {
    let _serial = support::serial();
    // Keeps fixture-many's functions (fixture-patch-many's targets) in
    // this binary.
    std::hint::black_box(many::ALL);
    const ROUNDS: usize = 200;
    for package in ["fixture-patch-basic", "fixture-patch-many"] {
        let bytes = std::fs::read(support::patch(package)).unwrap();
        let mut times = [(Vec::new(), Vec::new()), (Vec::new(), Vec::new())];
        let before = listed().len();
        for i in 0..ROUNDS * 2 {
            let on = i % 2 == 0;
            let mut copy = bytes.clone();
            copy.extend_from_slice(&(i as u64).to_le_bytes());
            let so = support::write_temp("cost.so", &copy);
            let start = Instant::now();
            let patch = hotpatch::Loader::new().debugger(on).load(&so).unwrap();
            let load = start.elapsed();
            assert!(patch.placement().is_near(), "{}", patch.placement());
            assert_eq!(listed().len(), before + usize::from(on));
            patch.revert().unwrap();
            let start = Instant::now();
            // SAFETY: no thread of this test binary keeps anything from
            // the patch.
            let done = unsafe { hotpatch::Loader::new().reclaim() }.unwrap();
            let reclaim = start.elapsed();
            assert_eq!(done.closed, 1);
            assert_eq!(listed().len(), before);
            times[usize::from(on)].0.push(load);
            times[usize::from(on)].1.push(reclaim);
        }
        let median = |v: &mut Vec<Duration>| {
            v.sort();
            v[v.len() / 2]
        };
        let [
            (mut load_off, mut reclaim_off),
            (mut load_on, mut reclaim_on),
        ] = times;
        println!(
            "{package}: load median {:?} registered, {:?} not; reclaim median {:?} registered, \
             {:?} not ({ROUNDS} each, interleaved)",
            median(&mut load_on),
            median(&mut load_off),
            median(&mut reclaim_on),
            median(&mut reclaim_off),
        );
    }
}

/// A file that cannot be built for the debugger (simulated with the
/// `load::debugger` failpoint) does not fail the load: the patch is placed
/// near, applied and works, and only the debugger's list lacks it.
#[test]
fn a_failed_registration_does_not_fail_the_load() {
    let _serial = support::serial();
    let so = support::copy_to_temp(&support::patch("fixture-patch-stack-b"), "unbuilt-b.so");
    let before = listed().len();
    let patch = {
        let _fail = fail::FailGuard::new("load::debugger", "return").unwrap();
        hotpatch::load(&so).unwrap()
    };
    assert!(patch.placement().is_near(), "{}", patch.placement());
    assert_eq!(svc::add(1, 2), 2003, "applied");
    assert_eq!(listed().len(), before, "not in the debugger's list");
    patch.revert().unwrap();
    // SAFETY: no thread of this test binary keeps anything from the patch.
    unsafe { hotpatch::Loader::new().reclaim() }.unwrap();
}
