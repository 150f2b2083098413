//! A panic in patch code reaches the caller as an ordinary panic of the
//! host, with its own payload (any type), never an abort; the host's
//! panic hook sees it with the patch's message and location; and the
//! patched function keeps working after it. A thin patch has no std of
//! its own: its panics are the host's std's, unwinding through patch
//! frames like any other Rust code.
//!
//! The hook reports the panics on stderr, so this file's output shows
//! some panic messages that are expected.
//!
//! The manifest's panic counter (what `control::watch` reads) is checked
//! through `Patch::panics()`: it counts exactly the calls that ended in a
//! panic, and the entry shim that counts them asks nothing of std on a call
//! that returns (issue 22).

mod support;

use std::any::Any;
use std::panic::catch_unwind;

const PANICS: &str = "fixture-patch-panics";

/// The payload's text, and whether it was a `&'static str` or a `String`.
fn payload(p: Box<dyn Any + Send>) -> (&'static str, String) {
    match p.downcast::<&'static str>() {
        Ok(s) => ("&str", s.to_string()),
        Err(p) => match p.downcast::<String>() {
            Ok(s) => ("String", *s),
            Err(_) => ("other", String::new()),
        },
    }
}

#[test]
fn str_payload_reaches_the_caller() {
    let _serial = support::serial();
    let so = support::patch(PANICS);
    let original = catch_unwind(|| svc::checked_div(1, 0)).unwrap_err();
    assert_eq!(payload(original), ("&str", "division by zero".into()));

    let patch = hotpatch::load(&so).unwrap();
    let patched = catch_unwind(|| svc::checked_div(1, 0)).unwrap_err();
    assert_eq!(
        payload(patched),
        ("&str", "patched: division by zero".into())
    );
    assert_eq!(svc::checked_div(4, 2), 3, "still patched, still working");
    for _ in 0..3 {
        assert!(catch_unwind(|| svc::checked_div(1, 0)).is_err());
        assert_eq!(svc::checked_div(9, 3), 4);
    }
    patch.revert().unwrap();
    assert_eq!(svc::checked_div(4, 2), 2);
}

#[test]
fn string_payload_reaches_the_caller() {
    let _serial = support::serial();
    let so = support::patch(PANICS);
    let patch = hotpatch::load(&so).unwrap();
    let patched = catch_unwind(|| svc::add(u64::MAX, 1)).unwrap_err();
    assert_eq!(
        payload(patched),
        ("String", format!("patched: {} + 1 overflows", u64::MAX))
    );
    assert_eq!(svc::add(2, 3), 6, "still patched, still working");
    patch.revert().unwrap();
    assert_eq!(svc::add(2, 3), 5);
}

/// A payload that is neither `&str` nor `String` arrives as itself: one
/// std, no transport that turns it into text.
#[test]
fn other_payloads_arrive_as_they_are() {
    let _serial = support::serial();
    let so = support::patch(PANICS);
    let patch = hotpatch::load(&so).unwrap();
    let caught = catch_unwind(|| svc::scale(0)).unwrap_err();
    assert_eq!(
        caught.downcast_ref::<u32>(),
        Some(&0),
        "the patch's `panic_any(0u32)`"
    );
    assert_eq!(svc::scale(2), 200);
    patch.revert().unwrap();
    assert_eq!(svc::scale(2), 20);
}

/// The host's panic hook (set by the host, here the test) is the hook a
/// patch panic runs: it sees the patch's message and the location in the
/// patch's source.
#[test]
fn the_hosts_panic_hook_sees_a_patch_panic() {
    let _serial = support::serial();
    let so = support::patch(PANICS);
    let source = support::root().join("tests/fixtures/patch-panics/src/lib.rs");
    let line = std::fs::read_to_string(&source)
        .unwrap()
        .lines()
        .position(|l| l.contains(r#"panic!("patched: division by zero")"#))
        .expect("the fixture's panic") as u32
        + 1;
    let patch = hotpatch::load(&so).unwrap();

    type Seen = Vec<(Option<String>, Option<(String, u32)>)>;
    static SEEN: std::sync::Mutex<Seen> = std::sync::Mutex::new(Vec::new());
    SEEN.lock().unwrap().clear();
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|info| {
        let message = info.payload().downcast_ref::<&str>().map(|s| s.to_string());
        let at = info.location().map(|l| (l.file().to_owned(), l.line()));
        SEEN.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((message, at));
    }));
    let caught = catch_unwind(|| svc::checked_div(1, 0));
    std::panic::set_hook(previous);
    patch.revert().unwrap();

    assert!(caught.is_err());
    let seen = std::mem::take(&mut *SEEN.lock().unwrap());
    assert_eq!(seen.len(), 1, "the hook ran once: {seen:?}");
    let (message, at) = &seen[0];
    assert_eq!(message.as_deref(), Some("patched: division by zero"));
    let (file, at_line) = at.as_ref().expect("a location");
    assert!(
        file.ends_with("tests/fixtures/patch-panics/src/lib.rs"),
        "the patch's source: {file}"
    );
    assert_eq!(*at_line, line, "the line of the patch's `panic!`");
}

#[test]
fn a_panic_ends_the_callers_thread_like_any_panic() {
    let _serial = support::serial();
    let so = support::patch(PANICS);
    let patch = hotpatch::load(&so).unwrap();
    let joined = std::thread::spawn(|| svc::add(u64::MAX, 2)).join();
    assert_eq!(
        payload(joined.unwrap_err()),
        ("String", format!("patched: {} + 2 overflows", u64::MAX))
    );
    // Other threads, and this one, carry on.
    let ok = std::thread::spawn(|| svc::add(1, 1)).join().unwrap();
    assert_eq!(ok, 3);
    patch.revert().unwrap();
}

#[test]
fn panics_from_many_threads_at_once() {
    let _serial = support::serial();
    let so = support::patch(PANICS);
    let patch = hotpatch::load(&so).unwrap();
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            std::thread::spawn(move || {
                for i in 0..5u64 {
                    let caught = catch_unwind(move || svc::add(u64::MAX - t, 1 + t + i));
                    let (kind, text) = payload(caught.unwrap_err());
                    assert_eq!(kind, "String");
                    assert_eq!(
                        text,
                        format!("patched: {} + {} overflows", u64::MAX - t, 1 + t + i)
                    );
                    assert_eq!(svc::add(t, i), t + i + 1);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    patch.revert().unwrap();
}

/// host -> patch -> host: the patched `relay` calls the host's
/// `host_panic`, whose panic crosses the patch on its way to the caller.
#[test]
fn host_panic_through_patch_code_reaches_the_caller() {
    let _serial = support::serial();
    let so = support::patch(PANICS);
    assert_eq!(svc::relay(5), 5);
    let patch = hotpatch::load(&so).unwrap();

    let even = catch_unwind(|| svc::relay(2)).unwrap_err();
    assert_eq!(payload(even), ("&str", "host panic".into()));
    let odd = catch_unwind(|| svc::relay(3)).unwrap_err();
    assert_eq!(payload(odd), ("String", "host panic 3".into()));
    // Again, to see nothing was left half-unwound.
    let again = catch_unwind(|| svc::relay(4)).unwrap_err();
    assert_eq!(payload(again), ("&str", "host panic".into()));

    patch.revert().unwrap();
    assert_eq!(svc::relay(5), 5);
}

/// A host panic reaches patch code as a panic of the patch's std, which
/// the patch can catch like any other.
#[test]
fn patch_code_can_catch_a_host_panic() {
    let _serial = support::serial();
    let so = support::patch(PANICS);
    assert_eq!(svc::describe(2), "2");
    let patch = hotpatch::load(&so).unwrap();
    assert_eq!(svc::describe(2), "caught &str: host panic");
    assert_eq!(svc::describe(3), "caught String: host panic 3");
    patch.revert().unwrap();
    assert_eq!(svc::describe(3), "3");
}

#[test]
fn never_returning_function() {
    let _serial = support::serial();
    let so = support::patch(PANICS);
    let original = catch_unwind(|| svc::abort_request(7)).unwrap_err();
    assert_eq!(payload(original), ("String", "request 7 aborted".into()));
    let patch = hotpatch::load(&so).unwrap();
    let patched = catch_unwind(|| svc::abort_request(7)).unwrap_err();
    assert_eq!(
        payload(patched),
        ("String", "patched: request 7 aborted".into())
    );
    patch.revert().unwrap();
    let reverted = catch_unwind(|| svc::abort_request(8)).unwrap_err();
    assert_eq!(payload(reverted), ("String", "request 8 aborted".into()));
}

/// A panic in an `extern "C"` replacement does what it does in any
/// `extern "C"` function: it cannot unwind, so the process aborts (in a
/// child process here), after the hook has reported the patch's message.
/// Calls that do not panic return the replacement's value.
#[test]
fn a_panic_in_an_extern_c_replacement_aborts() {
    use std::os::unix::process::ExitStatusExt;
    const VAR: &str = "HOTPATCH_TEST_EXTERN_C_CHILD";
    const NAME: &str = "a_panic_in_an_extern_c_replacement_aborts";
    if std::env::var_os(VAR).is_some() {
        let _serial = support::serial();
        let patch = hotpatch::load(support::patch(PANICS)).unwrap();
        println!("c_abi(1) = {}", svc::c_abi(1));
        let unwound = catch_unwind(|| svc::c_abi(0));
        println!("NOT ABORTED: {}", unwound.is_err());
        patch.revert().unwrap();
        return;
    }
    assert_eq!(svc::c_abi(0), 1, "the host's own");
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([NAME, "--exact", "--nocapture", "--test-threads=1"])
        .env(VAR, "1")
        .output()
        .expect("run the test binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGABRT),
        "{}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    assert!(stdout.contains("c_abi(1) = 101"), "{stdout}");
    assert!(!stdout.contains("NOT ABORTED"), "{stdout}");
    assert!(stderr.contains("patched: c_abi(0)"), "{stderr}");
    assert!(
        stderr.contains("panic in a function that cannot unwind"),
        "{stderr}"
    );
}

/// `Patch::panics()` counts the calls of the patch's replacements that
/// ended in a panic, and only those: not the calls that returned, not a
/// call made from a destructor while another panic unwinds (and returns),
/// not a host panic that patch code caught.
#[test]
fn the_panic_counter_counts_exactly_the_calls_that_panicked() {
    let _serial = support::serial();
    let so = support::patch(PANICS);
    let patch = hotpatch::load(&so).unwrap();
    // The counter is the library's: a load of the same bytes reuses it.
    let base = patch.panics().expect("applied");
    let count = || patch.panics().expect("applied") - base;
    for i in 0..5 {
        assert_eq!(svc::checked_div(10, 5), 3);
        assert!(catch_unwind(|| svc::checked_div(i, 0)).is_err());
    }
    assert_eq!(count(), 5, "five panicked, five returned");

    /// Calls the patched function while the thread unwinds a panic.
    struct CallsOnDrop;
    impl Drop for CallsOnDrop {
        fn drop(&mut self) {
            assert!(std::thread::panicking());
            assert_eq!(svc::checked_div(9, 3), 4);
        }
    }
    let unwound = catch_unwind(|| {
        let _guard = CallsOnDrop;
        panic!("a host panic, not the patch's");
    });
    assert!(unwound.is_err());
    assert_eq!(
        count(),
        5,
        "a call that returned during another panic's unwinding is not a panic of the patch"
    );
    assert_eq!(svc::describe(0), "caught &str: host panic");
    assert_eq!(count(), 5, "a panic caught inside patch code");
    assert!(catch_unwind(|| svc::relay(0)).is_err());
    assert_eq!(count(), 6, "a host panic that left patch code");
    patch.revert().unwrap();
}

/// The entry shims of a patch do not ask std whether the thread is
/// panicking (issue 22): until then each one read std's panic count before
/// and after the call, on every call. A panic is counted on the unwind
/// path only, so the patch binds to no panic-count function of the host.
#[test]
fn entry_shims_do_not_read_the_panic_count() {
    use object::{Object, ObjectSymbol};
    let so = support::patch("fixture-patch-basic");
    let bytes = std::fs::read(&so).unwrap();
    let file = object::File::parse(&*bytes).unwrap();
    let asks: Vec<String> = file
        .dynamic_symbols()
        .filter(|s| s.is_undefined())
        .filter_map(|s| s.name().ok())
        // Mangled (legacy or v0): `std::thread::panicking` and
        // `std::panicking::panic_count::*` keep these identifiers.
        .filter(|n| n.contains("panic_count") || n.contains("6thread9panicking"))
        .map(str::to_owned)
        .collect();
    assert!(
        asks.is_empty(),
        "the patch's entry shims read the panic count: {asks:?}"
    );
    // The shims are there and bound to something: the test reads the
    // right file.
    assert!(
        file.symbols()
            .filter_map(|s| s.name().ok())
            .any(|n| n.contains("__hotpatch_entry_answer")),
        "no entry shim in {}",
        so.display()
    );
}
