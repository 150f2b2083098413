//! A panic in patch code reaches the caller as an ordinary panic of the
//! host, with the same payload type and text, never an abort; and the
//! patched function keeps working after it. (A patch's cdylib has its own
//! std: unwinding its panic straight into the host would abort.)
//!
//! The patch's own std reports its panics on stderr, so this file's
//! output shows some panic messages that are expected.

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

#[test]
fn other_payloads_become_a_string_saying_so() {
    let _serial = support::serial();
    let so = support::patch(PANICS);
    let patch = hotpatch::load(&so).unwrap();
    let (kind, text) = payload(catch_unwind(|| svc::scale(0)).unwrap_err());
    assert_eq!(kind, "String");
    assert!(text.contains("not a string"), "{text}");
    assert_eq!(svc::scale(2), 200);
    patch.revert().unwrap();
    assert_eq!(svc::scale(2), 20);
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
