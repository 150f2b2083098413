//! Patch code calling the service's other `#[patchable]` functions
//! reaches the host's live implementation, including patches applied
//! after it, and the host's state, not the private copy of the service
//! crate linked into the patch.
//!
//! `fixture-patch-shared`: `above_base() = base() + 2` and
//! `count_and_read()` with the host's body. `fixture-patch-base`:
//! `base() = 500`.

mod support;

use std::sync::atomic::Ordering;

use svc::Priced;

const SHARED: &str = "fixture-patch-shared";
const BASE: &str = "fixture-patch-base";

#[test]
fn reaches_the_hosts_live_implementation() {
    let _serial = support::serial();
    let (shared_so, base_so) = (support::patch(SHARED), support::patch(BASE));
    assert_eq!((svc::base(), svc::above_base()), (100, 101));

    let shared = hotpatch::load(&shared_so).unwrap();
    assert_eq!(svc::above_base(), 102, "the host's original base()");

    // Patched after the patch that calls it: the patch sees it at once.
    let base = hotpatch::load(&base_so).unwrap();
    assert_eq!(svc::base(), 500);
    assert_eq!(svc::above_base(), 502, "the host's patched base()");

    base.revert().unwrap();
    assert_eq!(svc::above_base(), 102, "the host's original base() again");

    shared.revert().unwrap();
    assert_eq!((svc::base(), svc::above_base()), (100, 101));
}

#[test]
fn reaches_a_patch_applied_before_it() {
    let _serial = support::serial();
    let (shared_so, base_so) = (support::patch(SHARED), support::patch(BASE));

    let base = hotpatch::load(&base_so).unwrap();
    assert_eq!(svc::above_base(), 501, "the host's own above_base");
    let shared = hotpatch::load(&shared_so).unwrap();
    assert_eq!(svc::above_base(), 502);

    shared.revert().unwrap();
    assert_eq!(svc::above_base(), 501);
    base.revert().unwrap();
    assert_eq!(svc::above_base(), 101);
}

/// A thin patch has no copy of the service: `svc::CALLS` named in patch
/// code is the host's own static, the one `count_call()` moves.
#[test]
fn patch_code_sees_the_hosts_static() {
    let _serial = support::serial();
    let so = support::patch(SHARED);
    let calls = || svc::CALLS.load(Ordering::SeqCst);

    // The host's own body: both values are the host's counter.
    let n = calls();
    assert_eq!(svc::count_and_read(), (n + 1, n + 1));

    let patch = hotpatch::load(&so).unwrap();
    // The same body, compiled into the patch: count_call() runs in the
    // host and counts there, and `svc::CALLS` read by patch code is that
    // same counter.
    let (counted, read) = svc::count_and_read();
    assert_eq!(counted, n + 2);
    assert_eq!(calls(), n + 2, "the host's counter moved");
    assert_eq!(read, n + 2, "patch code read the host's counter");

    // Interleaved with host calls: one counter.
    assert_eq!(svc::count_call(), n + 3);
    assert_eq!(svc::count_and_read(), (n + 4, n + 4));
    assert_eq!(calls(), n + 4);

    patch.revert().unwrap();
    assert_eq!(svc::count_and_read(), (n + 5, n + 5));
}

/// `fixture-patch-basic`'s `price` is `base() + total()` and it replaces
/// `total` too: its call to `total` goes through the host, to its own
/// replacement, and its call to `base` to whatever the host runs.
#[test]
fn calls_to_functions_the_same_patch_replaces_go_through_the_host() {
    let _serial = support::serial();
    let (basic_so, base_so) = (support::patch("fixture-patch-basic"), support::patch(BASE));
    let cart = svc::Cart::new(vec![1, 2, 3]);
    assert_eq!((cart.total(), cart.price()), (6, 12));

    let basic = hotpatch::load(&basic_so).unwrap();
    assert_eq!((cart.total(), cart.price()), (1006, 100 + 1006));
    let base = hotpatch::load(&base_so).unwrap();
    assert_eq!(cart.price(), 500 + 1006);

    basic.revert().unwrap();
    assert_eq!((cart.total(), cart.price()), (6, 12));
    base.revert().unwrap();
}
