//! Statics of the service named in patch code: a thin patch is bound to
//! the host, so every one is the host's own instance. A patch built against a service whose
//! static has another type names symbols this binary does not have, and
//! is refused.
//!
//! `fixture-patch-state` replaces `bump_shared`, `bump_plain`, `record`
//! and `drain_journal` with versions that touch the same statics from
//! patch code and say so.

mod support;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Barrier};
use std::thread;

use hotpatch::Error;
use svc::{JOURNAL, LIMIT, PLAIN_HITS, SHARED_HITS};

const STATE: &str = "fixture-patch-state";

#[test]
fn host_and_patch_count_on_one_shared_value() {
    let _serial = support::serial();
    let so = support::patch(STATE);
    let n = SHARED_HITS.load(Ordering::SeqCst);

    SHARED_HITS.fetch_add(1, Ordering::SeqCst);
    assert_eq!(svc::bump_shared(1), (n + 2, "host"));

    let patch = hotpatch::load(&so).unwrap();
    // Patch code reads the host's value (what the host wrote before the
    // patch was loaded) and increments it.
    assert_eq!(svc::bump_shared(1), (n + 3, "patch"));
    SHARED_HITS.fetch_add(1, Ordering::SeqCst);
    assert_eq!(
        svc::bump_shared(10),
        (n + 14, "patch"),
        "sees the host's write"
    );
    assert_eq!(
        SHARED_HITS.load(Ordering::SeqCst),
        n + 14,
        "the host sees the patch's writes"
    );

    patch.revert().unwrap();
    assert_eq!(svc::bump_shared(1), (n + 15, "host"));

    // Loaded again (the same library, reused): still the host's value.
    let patch = hotpatch::load(&so).unwrap();
    assert_eq!(svc::bump_shared(5), (n + 20, "patch"));
    patch.revert().unwrap();
    assert_eq!(SHARED_HITS.load(Ordering::SeqCst), n + 20);
}

/// Patch code on a static counts on the host's instance: the value the
/// host sees moves with the patch's updates.
#[test]
fn a_plain_static_is_the_hosts_instance() {
    let _serial = support::serial();
    let so = support::patch(STATE);
    PLAIN_HITS.fetch_add(40, Ordering::SeqCst);
    let host = PLAIN_HITS.fetch_add(1, Ordering::SeqCst) + 1;
    assert_eq!(svc::bump_plain(1), (host + 1, "host"));
    let host = host + 1;

    let patch = hotpatch::load(&so).unwrap();
    // Patch code counts on the host's static: it goes on from the host's
    // value, and the host sees its writes.
    assert_eq!(svc::bump_plain(1), (host + 1, "patch"));
    assert_eq!(svc::bump_plain(1), (host + 2, "patch"));
    assert_eq!(
        PLAIN_HITS.load(Ordering::SeqCst),
        host + 2,
        "the host's plain static moved"
    );
    PLAIN_HITS.fetch_add(100, Ordering::SeqCst);
    assert_eq!(
        svc::bump_plain(1),
        (host + 103, "patch"),
        "and the patch sees the host's writes"
    );

    // The same patch, on a shared static: one value.
    let shared = SHARED_HITS.load(Ordering::SeqCst);
    assert_eq!(svc::bump_shared(1), (shared + 1, "patch"));

    patch.revert().unwrap();
    assert_eq!(svc::bump_plain(1), (host + 104, "host"));
}

/// A `Mutex<Vec<String>>` locked and mutated from host and patch code,
/// from several threads: one lock, one `Vec`. The `String`s the patch
/// pushes are freed by the host and the other way round.
#[test]
fn a_shared_mutex_vec_is_mutated_from_both_sides() {
    let _serial = support::serial();
    let so = support::patch(STATE);
    JOURNAL.lock().unwrap().clear();

    assert_eq!(svc::record("a"), 1);
    let patch = hotpatch::load(&so).unwrap();
    assert_eq!(svc::record("b"), 2);
    JOURNAL.lock().unwrap().push("direct:c".to_owned());
    assert_eq!(svc::record("d"), 4);
    assert_eq!(
        *JOURNAL.lock().unwrap(),
        ["host:a", "patch:b", "direct:c", "patch:d"]
    );

    // Patch code takes the host's Vec out; the host now owns it.
    let drained = svc::drain_journal();
    assert_eq!(drained, ["host:a", "patch:b", "direct:c", "patch:d"]);
    assert!(JOURNAL.lock().unwrap().is_empty());
    drop(drained);

    // Two threads write through the patch, two directly, at once.
    const PER_THREAD: usize = 500;
    let barrier = Arc::new(Barrier::new(4));
    let handles: Vec<_> = (0..4)
        .map(|i: usize| {
            let barrier = barrier.clone();
            thread::spawn(move || {
                barrier.wait();
                for j in 0..PER_THREAD {
                    if i.is_multiple_of(2) {
                        let len = svc::record(&format!("{i}.{j}"));
                        assert!((1..=4 * PER_THREAD).contains(&len), "{len}");
                    } else {
                        JOURNAL.lock().unwrap().push(format!("direct:{i}.{j}"));
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let journal = std::mem::take(&mut *JOURNAL.lock().unwrap());
    assert_eq!(journal.len(), 4 * PER_THREAD);
    for i in 0..4usize {
        let prefix = if i.is_multiple_of(2) {
            "patch"
        } else {
            "direct"
        };
        let mine: Vec<_> = journal
            .iter()
            .filter(|e| e.starts_with(&format!("{prefix}:{i}.")))
            .cloned()
            .collect();
        let expected: Vec<_> = (0..PER_THREAD)
            .map(|j| format!("{prefix}:{i}.{j}"))
            .collect();
        assert_eq!(mine, expected, "thread {i}'s entries, in order, none lost");
    }

    patch.revert().unwrap();
    assert_eq!(svc::record("e"), 1);
    assert_eq!(svc::drain_journal(), ["host:e"]);
}

/// `fixture-patch-state-v2` was built against a service whose `LIMIT` is
/// an `AtomicU64` (an `AtomicU32` here): another build of the service
/// crate, whose symbols this binary does not have. The load is refused
/// naming them, and nothing changes, with a good patch applied underneath.
#[test]
fn a_patch_built_against_a_static_of_another_type_is_refused() {
    let _serial = support::serial();
    let so = support::patch_with("fixture-patch-state-v2", &["v2"]);
    let good = hotpatch::load(support::patch("fixture-patch-stack-a")).unwrap();
    let before = support::snapshot();
    let limit = LIMIT.load(Ordering::SeqCst);

    let err = hotpatch::load(&so).expect_err("built against another svc");
    match &err {
        Error::MissingSymbols { path, symbols } => {
            assert_eq!(path, &so);
            assert!(
                symbols.iter().any(|s| s.starts_with("svc::")),
                "names the service's symbols: {symbols:?}"
            );
        }
        other => panic!("expected MissingSymbols, got {other:?}"),
    }
    let message = err.to_string();
    assert!(
        message.contains("svc::") && message.contains(&so.display().to_string()),
        "{message}"
    );
    assert_eq!(support::snapshot(), before, "nothing changed");
    assert_eq!(
        before.calls.answer, 10,
        "stack-a's answer, not the refused one"
    );
    assert_eq!(LIMIT.load(Ordering::SeqCst), limit);

    good.revert().unwrap();
}
