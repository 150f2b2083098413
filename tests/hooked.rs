//! Patches of functions that are not `#[patchable]`: a hand-written patch
//! crate hooks an unmarked `#[inline(never)]` function of the service
//! (`svc::hooked`), called from unmarked code. Loading writes the entry
//! jump, reverting writes the original bytes back (read here), and in
//! between the function is a function of the registry like any other:
//! stacking, revert in any order, per-thread transitions, faults at each
//! new step.

mod support;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, mpsc};
use std::time::Duration;

use fail::FailGuard;
use hotpatch::{Error, Implementation};

const A: &str = "fixture-patch-hook-a";
const B: &str = "fixture-patch-hook-b";
const BAD_ENTRY: &str = "fixture-patch-hook-bad-entry";
const MIXED: &str = "fixture-patch-hook-mixed";
const INLINE: &str = "fixture-patch-hook-inline";

const PRICE: &str = "svc::hooked::price";
const TAX: &str = "svc::hooked::tax";

/// The first bytes of the code of `price` and `tax`, as they are now.
fn entries() -> [Vec<u8>; 2] {
    let read = |f: *const ()| {
        // SAFETY: both functions are at least 16 bytes of mapped code
        // (`Target::of` below finds them in the symbol table); code is
        // readable.
        unsafe { std::slice::from_raw_parts(f as *const u8, 16) }.to_vec()
    };
    [
        read(svc::hooked::price as *const ()),
        read(svc::hooked::tax as *const ()),
    ]
}

/// What unmarked callers observe: `(quote(2), quote_tax(50))`.
fn observed() -> (u64, u64) {
    (svc::hooked::quote(2), svc::hooked::quote_tax(50))
}

const ORIGINAL: (u64, u64) = (6, 5);

/// The registry's view of a hooked function, if it lists it.
fn listed(path: &str) -> Option<hotpatch::FunctionInfo> {
    hotpatch::functions().into_iter().find(|f| f.path == path)
}

fn by(patch: &hotpatch::Patch) -> Implementation {
    Implementation::Patch {
        id: patch.id(),
        name: patch.name().to_owned(),
    }
}

#[test]
fn load_revert_load_again_stack_and_revert_out_of_order() {
    let _serial = support::serial();
    let (a_so, b_so) = (support::patch(A), support::patch(B));
    let before = entries();
    let functions = hotpatch::functions();
    assert_eq!(observed(), ORIGINAL);
    assert!(
        listed(PRICE).is_none(),
        "not a function of the registry yet"
    );

    let a = hotpatch::load(&a_so).unwrap();
    assert_eq!(observed(), (106, 5), "the unmarked caller runs the fix");
    assert_eq!(a.functions(), [PRICE]);
    assert_eq!(a.hooked(), [PRICE]);
    let price = listed(PRICE).expect("listed while hooked");
    assert!(price.hooked);
    assert_eq!(price.implementation, by(&a));
    let hooked = entries();
    assert_ne!(hooked[0], before[0], "the entry jump is written");
    assert_eq!(hooked[1], before[1], "tax is not hooked by A");

    a.revert().unwrap();
    assert_eq!(observed(), ORIGINAL);
    assert_eq!(entries(), before, "the original entry bytes are back");
    assert_eq!(hotpatch::functions(), functions, "the registry as before");

    // Again, then B over A (B also hooks tax), reverted bottom first.
    let a = hotpatch::load(&a_so).unwrap();
    assert_eq!(entries()[0], hooked[0], "the same jump to the same stub");
    assert_eq!(observed(), (106, 5));
    let b = hotpatch::load(&b_so).unwrap();
    assert_eq!(observed(), (206, 1005));
    assert_eq!(listed(PRICE).unwrap().implementation, by(&b));
    assert_eq!(listed(TAX).unwrap().implementation, by(&b));
    a.revert().unwrap();
    assert_eq!(observed(), (206, 1005), "B stays on top");
    assert_ne!(entries()[0], before[0], "B still needs price hooked");
    b.revert().unwrap();
    assert_eq!(observed(), ORIGINAL);
    assert_eq!(entries(), before);
    assert_eq!(hotpatch::functions(), functions);

    // B over A, reverted top first.
    let a = hotpatch::load(&a_so).unwrap();
    let b = hotpatch::load(&b_so).unwrap();
    b.revert().unwrap();
    assert_eq!(observed(), (106, 5), "A is back on top; tax unhooked");
    assert_eq!(entries()[1], before[1]);
    assert_eq!(listed(PRICE).unwrap().implementation, by(&a));
    assert!(listed(TAX).is_none());
    a.revert().unwrap();
    assert_eq!(entries(), before);
    assert_eq!(observed(), ORIGINAL);
}

/// A patch that replaces a `#[patchable]` function and hooks another
/// applies both (until ABI 4 was read, only the first), and reverts both.
#[test]
fn a_patch_with_slots_and_hooks_applies_both() {
    let _serial = support::serial();
    let before = entries();
    let mixed = hotpatch::load(support::patch(MIXED)).unwrap();
    assert_eq!(
        (svc::answer(), svc::hooked::quote(2)),
        (42, 406),
        "both the slot and the hook"
    );
    assert_eq!(mixed.hooked(), [PRICE]);
    assert_eq!(mixed.functions().len(), 2);
    mixed.revert().unwrap();
    assert_eq!((svc::answer(), svc::hooked::quote(2)), (1, 6));
    assert_eq!(entries(), before);
}

/// A replace of a hooking patch by another in one transition: a function
/// both hook keeps its redirection (no entry write), one only the new
/// patch hooks is redirected first, one only the old hooked is written
/// back after.
#[test]
fn replace_keeps_shared_hooks_and_releases_the_others() {
    let _serial = support::serial();
    let (a_so, b_so) = (support::patch(A), support::patch(B));
    let before = entries();
    let a = hotpatch::load(&a_so).unwrap();
    let price_hooked = entries()[0].clone();
    let loader = hotpatch::Loader::new();
    let b = loader.replace(a.id(), &b_so).unwrap();
    assert_eq!(observed(), (206, 1005));
    assert_eq!(entries()[0], price_hooked, "price: the same redirection");
    assert_ne!(entries()[1], before[1], "tax: redirected");
    assert_eq!(hotpatch::applied().len(), 1);
    let a = loader.replace(b.id(), &a_so).unwrap();
    assert_eq!(observed(), (106, 5));
    assert_eq!(entries()[1], before[1], "tax: written back");
    assert!(listed(TAX).is_none());
    a.revert().unwrap();
    assert_eq!(entries(), before);
}

/// A patch that hooks two functions stops the process once to write both
/// entries, and its revert once to write both back (not once per
/// function: every stop holds every thread).
#[test]
fn the_entries_of_one_patch_are_written_under_one_stop() {
    let _serial = support::serial();
    let b_so = support::patch(B);
    let before = entries();
    let stops = hotpatch::hook::stops();
    let b = hotpatch::load(&b_so).unwrap();
    assert_eq!(
        hotpatch::hook::stops(),
        stops + 1,
        "one stop for two entries"
    );
    assert_ne!(entries()[0], before[0]);
    assert_ne!(entries()[1], before[1]);
    assert_eq!(observed(), (206, 1005));
    let stops = hotpatch::hook::stops();
    b.revert().unwrap();
    assert_eq!(
        hotpatch::hook::stops(),
        stops + 1,
        "one stop to write both back"
    );
    assert_eq!(entries(), before);
    assert_eq!(observed(), ORIGINAL);
}

/// A patch expecting other entry bytes than the running code's is
/// refused, naming the function; nothing changes.
#[test]
fn other_entry_bytes_are_refused_naming_the_function() {
    let _serial = support::serial();
    let so = support::patch(BAD_ENTRY);
    let before = (entries(), support::snapshot());
    let err = hotpatch::load(&so).unwrap_err();
    match &err {
        Error::HookRefused {
            function,
            reason: hotpatch::hook::Reason::EntryChanged { expected, found },
            ..
        } => {
            assert_eq!(function, PRICE);
            assert_eq!(expected, &[0xcc; 5]);
            assert_eq!(found[..], before.0[0][..5]);
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains(PRICE), "{err}");
    assert_eq!((entries(), support::snapshot()), before);
    assert_eq!(observed(), ORIGINAL);
}

/// A hand-written patch that hooks an `#[inline]` function names its own
/// copy of it: refused at load as not the service's code, nothing changed.
#[test]
fn an_inline_function_named_by_a_patch_is_its_own_copy_and_refused() {
    let _serial = support::serial();
    let so = support::patch(INLINE);
    let before = (entries(), support::snapshot());
    let err = hotpatch::load(&so).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidManifest { reason, .. }
            if reason.contains("svc::hooked::inline_price") && reason.contains("inside the patch")),
        "{err:?}"
    );
    assert_eq!((entries(), support::snapshot()), before);
}

/// A thread that blocks the stop signal: the load fails within its
/// deadline, naming the thread, and nothing changed.
#[test]
fn a_thread_blocking_the_stop_signal_fails_the_load_naming_it() {
    let _serial = support::serial();
    let a_so = support::patch(A);
    let before = state();
    let (release, released) = mpsc::channel::<()>();
    let (ready, is_ready) = mpsc::channel::<()>();
    let blocker = std::thread::Builder::new()
        .name("blocks-stop".into())
        .spawn(move || {
            // SAFETY: a zeroed sigset_t is a valid value to fill; this
            // thread changes only its own signal mask.
            unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, hotpatch::hook::signal());
                libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            }
            ready.send(()).unwrap();
            let _ = released.recv();
        })
        .unwrap();
    is_ready.recv().unwrap();
    let err = hotpatch::Loader::new()
        .deadline(Duration::from_millis(300))
        .load(&a_so)
        .unwrap_err();
    release.send(()).unwrap();
    blocker.join().unwrap();
    match &err {
        Error::HookRefused {
            function,
            reason: hotpatch::hook::Reason::NotStopped(threads),
            ..
        } => {
            assert_eq!(function, PRICE);
            assert!(
                threads
                    .iter()
                    .any(|(t, blocks)| *blocks && t.to_string().contains("blocks-stop")),
                "{err}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(state(), before, "nothing changed");
}

/// Everything that can be compared after a failed operation.
#[derive(Debug, PartialEq)]
struct State {
    entries: [Vec<u8>; 2],
    snapshot: support::Snapshot,
    observed: (u64, u64),
    in_transition: bool,
}

fn state() -> State {
    State {
        entries: entries(),
        snapshot: support::snapshot(),
        observed: observed(),
        in_transition: hotpatch::transition().is_some(),
    }
}

/// A fault at the first entry's preparation, at the second one's (the
/// first prepared: both are written under one stop, after every
/// preparation), and at the switch after both were written: the load
/// fails, and the code, the slots and the records are as they were (the
/// entries written are written back). The same load then succeeds.
#[test]
fn faults_at_each_step_of_a_hooking_load_change_nothing() {
    let _serial = support::serial();
    let b_so = support::patch(B);
    let before = state();
    for (point, action) in [
        ("load::hook", "return"),
        ("load::hook", "1*off->return"),
        ("switch::slot_table", "return"),
    ] {
        let guard = FailGuard::new(point, action).unwrap();
        let err = hotpatch::load(&b_so).expect_err(point);
        drop(guard);
        assert!(
            matches!(err, Error::Injected { .. } | Error::SlotTable { .. }),
            "{point} {action}: {err:?}"
        );
        assert_eq!(state(), before, "{point} {action}: nothing changed");
    }
    let b = hotpatch::load(&b_so).unwrap();
    assert_eq!(observed(), (206, 1005));
    b.revert().unwrap();
    assert_eq!(state(), before);
}

/// A load whose entry write fails at any step of the breakpoint protocol
/// (fault injection, at the first entry or at the second, the first
/// written) changes nothing: every byte written is put back. A revert
/// whose write-back fails there still holds, the redirections stay (as
/// below), and the next load and revert reuse and remove them.
#[test]
fn a_failed_entry_write_at_any_step_changes_nothing() {
    let _serial = support::serial();
    if std::env::var_os(hotpatch::hook::PROTOCOL_ENV).is_some_and(|v| v == "stop-the-world") {
        println!("not applicable: this run forces the stop-the-world, which has no steps");
        return;
    }
    let b_so = support::patch(B);
    let before = state();
    for point in [
        "hook::write::int3",
        "hook::write::rest",
        "hook::write::first",
    ] {
        for action in ["return", "1*off->return"] {
            let guard = FailGuard::new(point, action).unwrap();
            let err = hotpatch::load(&b_so).expect_err(point);
            drop(guard);
            assert!(
                matches!(
                    &err,
                    Error::HookRefused {
                        reason: hotpatch::hook::Reason::WriteFailed { detail },
                        ..
                    } if detail.contains(point)
                ),
                "{point} {action}: {err:?}"
            );
            assert_eq!(state(), before, "{point} {action}: nothing changed");
        }
        let b = hotpatch::load(&b_so).unwrap();
        let hooked = entries();
        {
            let _fault = FailGuard::new(point, "1*off->return").unwrap();
            b.revert().unwrap();
        }
        assert_eq!(observed(), ORIGINAL, "{point}: the revert holds");
        assert_eq!(entries(), hooked, "{point}: the entries stay redirected");
        let b = hotpatch::load(&b_so).unwrap();
        assert_eq!(observed(), (206, 1005));
        b.revert().unwrap();
        assert_eq!(state(), before, "{point}");
    }
}

/// A revert whose entry write-back fails still holds: calls run the
/// original code through the redirection, which stays in the registry,
/// listed as hooked and original; the next load reuses it (no stop), and
/// its revert writes the bytes back.
#[test]
fn a_failed_unhook_keeps_the_revert_and_the_redirection() {
    let _serial = support::serial();
    let a_so = support::patch(A);
    let before = entries();
    let a = hotpatch::load(&a_so).unwrap();
    let hooked = entries();
    {
        let _fault = FailGuard::new("hook::unhook", "return").unwrap();
        a.revert().unwrap();
    }
    assert_eq!(observed(), ORIGINAL, "the revert holds");
    assert_eq!(entries(), hooked, "the entry stays redirected");
    let price = listed(PRICE).expect("listed while redirected");
    assert!(price.hooked);
    assert_eq!(price.implementation, Implementation::Original);

    let stops = hotpatch::hook::stop_rounds();
    let a = hotpatch::load(&a_so).unwrap();
    assert_eq!(
        hotpatch::hook::stop_rounds(),
        stops,
        "reused: no entry write"
    );
    assert_eq!(observed(), (106, 5));
    a.revert().unwrap();
    assert_eq!(entries(), before);
    assert!(listed(PRICE).is_none());
}

/// A failed load whose write-back fails too says so, and leaves the
/// registry consistent: the redirections stay, at the original code, and
/// a later load and revert reuse and remove them.
#[test]
fn a_failed_load_that_cannot_unhook_says_so() {
    let _serial = support::serial();
    let b_so = support::patch(B);
    let before = entries();
    let err = {
        // Both of B's entries are written (one stop), the switch fails, and
        // writing them back fails too.
        let _switch = FailGuard::new("switch::slot_table", "return").unwrap();
        let _unhook = FailGuard::new("hook::unhook", "return").unwrap();
        hotpatch::load(&b_so).unwrap_err()
    };
    match &err {
        Error::HooksLeftInstalled {
            cause, functions, ..
        } => {
            assert!(
                matches!(**cause, Error::Injected { .. } | Error::SlotTable { .. }),
                "{cause:?}"
            );
            let mut functions = functions.clone();
            functions.sort();
            assert_eq!(functions, [PRICE, TAX]);
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("stays redirected"), "{err}");
    assert_eq!(hotpatch::applied(), vec![]);
    assert_eq!(observed(), ORIGINAL, "calls run the original code");
    assert_ne!(entries()[0], before[0]);
    assert_ne!(entries()[1], before[1]);
    let b = hotpatch::load(&b_so).unwrap();
    assert_eq!(observed(), (206, 1005));
    b.revert().unwrap();
    assert_eq!(entries(), before);
}

/// A registered thread keeps the old code of a hooked function until its
/// next safepoint, while unregistered threads run the new code: the hook's
/// slot goes through the one dispatcher of every hook during the
/// transition.
#[test]
fn a_registered_thread_switches_at_its_safepoint() {
    let _serial = support::serial();
    let a_so = support::patch(A);
    enum Ask {
        Call,
        Safepoint,
        Exit,
    }
    let (ask, asked) = mpsc::channel::<Ask>();
    let (tell, told) = mpsc::channel::<u64>();
    let worker = std::thread::spawn(move || {
        let _registered = hotpatch::register_thread();
        // Online, not at a safepoint, while it waits: a transition waits
        // for it.
        while let Ok(a) = asked.recv() {
            match a {
                Ask::Call => tell.send(svc::hooked::quote(2)).unwrap(),
                Ask::Safepoint => hotpatch::quiescent(),
                Ask::Exit => break,
            }
        }
    });
    ask.send(Ask::Call).unwrap();
    assert_eq!(told.recv().unwrap(), 6);
    let loading = std::thread::spawn(move || {
        hotpatch::Loader::new()
            .deadline(Duration::from_secs(60))
            .load(a_so)
    });
    while hotpatch::transition().is_none() {
        assert!(!loading.is_finished(), "the load must wait for the worker");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(listed(PRICE).unwrap().in_transition);
    assert_eq!(svc::hooked::quote(2), 106, "an unregistered thread: new");
    ask.send(Ask::Call).unwrap();
    assert_eq!(told.recv().unwrap(), 6, "the registered thread: old");
    ask.send(Ask::Safepoint).unwrap();
    let a = loading.join().unwrap().unwrap();
    ask.send(Ask::Call).unwrap();
    assert_eq!(told.recv().unwrap(), 106, "after its safepoint: new");
    ask.send(Ask::Exit).unwrap();
    worker.join().unwrap();
    a.revert().unwrap();
    assert_eq!(observed(), ORIGINAL);
}

/// 4 threads call the hooked functions through unmarked code, half of
/// them registered and passing safepoints, while `cycles` times A and B
/// are loaded (entry writes), stacked and reverted in both orders (entry
/// write-backs): every answer is one that some stack of the patches gives
/// (each call old or new, never torn), the process survives, and the
/// entry bytes end as they began.
fn stress(cycles: usize) {
    let _serial = support::serial();
    let (a_so, b_so) = (support::patch(A), support::patch(B));
    let before = entries();
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let start = Arc::new(Barrier::new(5));
    let workers: Vec<_> = (0..4u64)
        .map(|w| {
            let (stop, calls, start) = (stop.clone(), calls.clone(), start.clone());
            std::thread::spawn(move || {
                let _registered = (w % 2 == 0).then(hotpatch::register_thread);
                start.wait();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let qty = n % 1000 + w;
                    let price = svc::hooked::quote(qty);
                    assert!(
                        [0, 100, 200].iter().any(|d| price == qty * 3 + d),
                        "quote({qty}) = {price}"
                    );
                    let tax = svc::hooked::quote_tax(qty);
                    let seen = (price.wrapping_sub(qty * 3), tax.wrapping_sub(qty / 10));
                    // Registered: both from one state of the stack (none,
                    // A, A and B, B) between two safepoints.
                    let states: &[(u64, u64)] = if w % 2 == 0 {
                        &[(0, 0), (100, 0), (200, 1000)]
                    } else {
                        &[
                            (0, 0),
                            (100, 0),
                            (200, 1000),
                            (100, 1000),
                            (200, 0),
                            (0, 1000),
                        ]
                    };
                    assert!(states.contains(&seen), "worker {w}: {seen:?}");
                    n += 1;
                    hotpatch::quiescent();
                }
                calls.fetch_add(n, Ordering::Relaxed);
            })
        })
        .collect();
    start.wait();
    for i in 0..cycles {
        let a = hotpatch::load(&a_so).unwrap();
        let b = hotpatch::load(&b_so).unwrap();
        if i % 2 == 0 {
            a.revert().unwrap();
            b.revert().unwrap();
        } else {
            b.revert().unwrap();
            a.revert().unwrap();
        }
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    assert!(calls.load(Ordering::Relaxed) > 0);
    assert_eq!(entries(), before);
    assert_eq!(observed(), ORIGINAL);
}

#[test]
fn stress_hooking_patches_under_calls() {
    stress(20);
}

#[test]
#[ignore = "long form: 2,000 cycles (minutes on 2 cores)"]
fn stress_hooking_patches_under_calls_long() {
    stress(2_000);
}

/// The same stress with every entry written under the stop-the-world:
/// this test binary again, in a child process whose loader defaults to it
/// (`HOTPATCH_HOOK_PROTOCOL`, read once per process). The run above uses
/// the breakpoint protocol unless the whole run forces the other.
#[test]
fn stress_hooking_patches_under_calls_stop_the_world() {
    let _serial = support::serial();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "stress_hooking_patches_under_calls",
            "--test-threads=1",
        ])
        .env(hotpatch::hook::PROTOCOL_ENV, "stop-the-world")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("1 passed"), "{text}");
}

// ---- the loader where code may not be written ----

/// Set in the child process a write-path test runs in: which settings it
/// makes (`PR_SET_MDWE` cannot be undone, and Landlock only narrows).
const DENY: &str = "HOTPATCH_HOOKED_TEST_DENY";

/// Runs the test `name` again in a child with `DENY=mode`; its output.
fn in_denying_child(name: &str, mode: &str) -> String {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(DENY, mode)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("1 passed"),
        "child {mode}: {text}"
    );
    for line in text.lines().filter(|l| l.contains("CHILD-OK")) {
        println!("{line}");
    }
    text
}

/// `PR_SET_MDWE` with `PR_MDWE_REFUSE_EXEC_GAIN`, for this whole process.
fn deny_write_execute() -> bool {
    // SAFETY: a process-wide flag, set in a child process only.
    unsafe { libc::prctl(libc::PR_SET_MDWE, libc::PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) == 0 }
}

/// Whether the kernel has `PR_SET_MDWE` (Linux >= 6.3): `PR_GET_MDWE`
/// answers.
fn deny_write_execute_supported() -> bool {
    // SAFETY: reads a flag.
    unsafe { libc::prctl(libc::PR_GET_MDWE, 0, 0, 0, 0) >= 0 }
}

/// Landlock: no file may be opened for writing, `/proc/self/mem`
/// included, by this thread and the threads it creates from now on.
fn deny_proc_mem() -> bool {
    const LANDLOCK_ACCESS_FS_WRITE_FILE: u64 = 1 << 1;
    let attr = [LANDLOCK_ACCESS_FS_WRITE_FILE];
    // SAFETY: landlock system calls on memory we own.
    unsafe {
        let fd = libc::syscall(
            libc::SYS_landlock_create_ruleset,
            attr.as_ptr(),
            8usize,
            0u32,
        );
        if fd < 0 || libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return false;
        }
        libc::syscall(libc::SYS_landlock_restrict_self, fd as libc::c_int, 0u32) == 0
    }
}

/// Whether the kernel has Landlock (its ABI version is positive).
fn deny_proc_mem_supported() -> bool {
    // SAFETY: a query with no attributes (LANDLOCK_CREATE_RULESET_VERSION).
    unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32,
        ) > 0
    }
}

/// The patches the write-path tests load, linked before the child denies
/// anything (linking writes files).
fn write_path_patches() -> (PathBuf, PathBuf) {
    (support::patch(A), support::patch(support::UNDERNEATH))
}

/// The child's part of the write-path tests: loads the hooking patch `A`
/// through a `Loader` and checks the outcome `hooks` expects (`Ok`: hooked,
/// live, reverted; `Err(setting)`: refused naming it, nothing changed),
/// then loads a patch with no hook, which must load either way.
fn child_loads((a_so, plain_so): (PathBuf, PathBuf), hooks: Result<(), &str>) {
    let loader = hotpatch::Loader::new();
    let before = state();
    match (loader.load(&a_so), hooks) {
        (Ok(a), Ok(())) => {
            assert_eq!(observed(), (106, 5), "the fix runs");
            assert_eq!(a.hooked(), [PRICE]);
            println!("CHILD-OK hooked, placement {:?}", a.placement());
            loader.revert(a).unwrap();
            assert_eq!(state(), before, "reverted");
        }
        (Err(err), Err(setting)) => {
            let text = err.to_string();
            assert!(
                matches!(
                    &err,
                    Error::HookRefused {
                        reason: hotpatch::hook::Reason::WriteDenied(_),
                        ..
                    }
                ),
                "{err:?}"
            );
            assert!(
                text.contains(PRICE) && text.contains(setting),
                "names the function and the setting: {text}"
            );
            assert_eq!(state(), before, "nothing changed");
            assert!(hotpatch::applied().is_empty());
            println!("CHILD-OK refused: {text}");
        }
        (Ok(a), Err(_)) => panic!("loaded, expected a refusal: {:?}", a.placement()),
        (Err(e), Ok(())) => panic!("refused: {e}"),
    }
    // A patch with no hook writes no code: it loads all the same.
    let plain = loader.load(&plain_so).expect("a patch with no hook");
    assert_eq!(support::calls().answer, 10, "the slot patch runs");
    println!("CHILD-OK plain patch, placement {:?}", plain.placement());
    loader.revert(plain).unwrap();
    assert_eq!(state(), before);
}

/// Under `PR_SET_MDWE` alone the entry is written through
/// `/proc/self/mem` (which leaves the mapping's protection alone), so a
/// hooking patch loads through the loader, and reverts.
#[test]
fn under_memory_deny_write_execute_the_loader_hooks_through_proc_mem() {
    if std::env::var(DENY).as_deref() == Ok("mdwe") {
        let patches = write_path_patches();
        assert!(deny_write_execute());
        child_loads(patches, Ok(()));
        return;
    }
    let _serial = support::serial();
    if !deny_write_execute_supported() {
        support::skip(
            "under_memory_deny_write_execute_the_loader_hooks_through_proc_mem",
            "this kernel has no PR_SET_MDWE (Linux >= 6.3)",
        );
        return;
    }
    let out = in_denying_child(
        "under_memory_deny_write_execute_the_loader_hooks_through_proc_mem",
        "mdwe",
    );
    assert!(out.contains("CHILD-OK hooked"), "{out}");
    assert!(out.contains("CHILD-OK plain patch"), "{out}");
}

/// Under `PR_SET_MDWE` with `/proc/self/mem` denied (Landlock) neither
/// write path is left: the hooking patch is refused naming the setting,
/// nothing changed; a patch with no hook still loads.
#[test]
fn with_neither_write_path_the_loader_refuses_a_hooking_patch_and_changes_nothing() {
    if std::env::var(DENY).as_deref() == Ok("both") {
        let patches = write_path_patches();
        assert!(deny_write_execute() && deny_proc_mem());
        child_loads(patches, Err("PR_SET_MDWE"));
        return;
    }
    let _serial = support::serial();
    if !deny_write_execute_supported() || !deny_proc_mem_supported() {
        support::skip(
            "with_neither_write_path_the_loader_refuses_a_hooking_patch_and_changes_nothing",
            "this kernel lacks PR_SET_MDWE or Landlock",
        );
        return;
    }
    let out = in_denying_child(
        "with_neither_write_path_the_loader_refuses_a_hooking_patch_and_changes_nothing",
        "both",
    );
    assert!(out.contains("CHILD-OK refused"), "{out}");
    assert!(out.contains("CHILD-OK plain patch"), "{out}");
}

#[test]
fn the_tool_lists_a_patch_crate_s_hooked_function_with_what_it_replaces() {
    // `cargo hotpatch build -p CRATE` prints `replaces:` from the link
    // report: a `#[patch(path, hook)]` target is there too, marked, not
    // left out (a patch that changes more than its summary says).
    let exe = std::env::current_exe().unwrap();
    let so = hotpatch_test_support::temp_dir().join("hook-a-listed.so");
    let rlibs = cargo_hotpatch::dev_dependency_rlibs("fixture_patch_hook_a").unwrap();
    let reports: Vec<_> = rlibs
        .iter()
        .filter_map(|r| cargo_hotpatch::link(r, &exe, &so).ok())
        .collect();
    assert!(
        !reports.is_empty(),
        "no build of the fixture links: {rlibs:?}"
    );
    for report in reports {
        assert_eq!(report.functions, [format!("{PRICE} (hooked)")]);
    }
}
