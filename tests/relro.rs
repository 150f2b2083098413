//! The slot table is read-only between operations (issue 20, item 9):
//! every slot is in the binary's RELRO, so a stray write faults, and the
//! runtime makes the slots' pages writable only while it stores into them
//! (`hotpatch/src/window.rs`), for apply, stacking, replace, revert and
//! the transitions that go through the dispatchers.
//!
//! A binary linked without RELRO is tests/thin_service.rs
//! (`a_service_linked_without_relro_warns_and_still_applies`).

mod support;

use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Barrier, mpsc};
use std::time::Duration;

use hotpatch::__private::{SLOTS, Slot};

/// The mappings of this process: `(start, end, permissions)`.
fn maps() -> Vec<(usize, usize, String)> {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .map(|line| {
            let mut fields = line.split_whitespace();
            let range = fields.next().unwrap();
            let perms = fields.next().unwrap().to_owned();
            let (start, end) = range.split_once('-').unwrap();
            (
                usize::from_str_radix(start, 16).unwrap(),
                usize::from_str_radix(end, 16).unwrap(),
                perms,
            )
        })
        .collect()
}

/// Checks that the page of every byte of every slot of this process reads
/// `r--` in /proc/self/maps; `when` says at which point of the test.
fn assert_slots_read_only(when: &str) {
    let maps = maps();
    assert!(!SLOTS.is_empty());
    let mut wrong = Vec::new();
    for entry in SLOTS.iter() {
        let start = std::ptr::from_ref(entry.slot) as usize;
        // Its first and last byte: a slot may straddle two pages.
        let pages: Vec<&str> = [start, start + size_of::<Slot>() - 1]
            .iter()
            .map(|addr| {
                maps.iter()
                    .find(|(s, e, _)| (*s..*e).contains(addr))
                    .map_or("unmapped", |(_, _, p)| p.as_str())
            })
            .collect();
        if !pages.iter().all(|p| p.starts_with("r--")) {
            wrong.push(format!("{} at {start:#x}: {pages:?}", entry.path));
        }
    }
    assert!(
        wrong.is_empty(),
        "{when}: {} of {} slots are not on read-only pages: {}",
        wrong.len(),
        SLOTS.len(),
        wrong.join(", ")
    );
}

#[test]
fn the_runtime_sees_a_read_only_slot_table() {
    let table = hotpatch::slot_table();
    assert_eq!(table.slots, SLOTS.len());
    assert!(table.is_read_only(), "{table:?}");
}

#[test]
fn every_slot_page_reads_read_only_between_operations() {
    let _serial = support::serial();
    assert_eq!(svc::answer(), 1);
    assert_slots_read_only("at start");

    // Direct swaps (no registered thread): apply, stack, replace, revert.
    let basic = hotpatch::load(support::patch("fixture-patch-basic")).unwrap();
    assert_eq!(svc::answer(), 2);
    assert_slots_read_only("after an apply");
    let a = hotpatch::load(support::patch("fixture-patch-stack-a")).unwrap();
    assert_eq!(svc::answer(), 10);
    assert_slots_read_only("after a second patch stacked");
    let b = hotpatch::Loader::new()
        .replace(a.id(), support::patch("fixture-patch-stack-b"))
        .unwrap();
    assert_slots_read_only("after a replace");
    basic.revert().unwrap();
    b.revert().unwrap();
    assert_eq!(svc::answer(), 1);
    assert_slots_read_only("after the reverts");

    // Transitions: a registered thread, so the slots go through the
    // dispatchers (stored in the slots) and back.
    let stop = Arc::new(AtomicBool::new(false));
    let barrier = Arc::new(Barrier::new(2));
    let worker = {
        let (stop, barrier) = (stop.clone(), barrier.clone());
        std::thread::spawn(move || {
            let _registered = hotpatch::register_thread();
            barrier.wait();
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                seen.push(svc::answer());
                hotpatch::quiescent();
                seen.dedup();
            }
            seen
        })
    };
    barrier.wait();
    for round in 0..5 {
        let p = hotpatch::Loader::new()
            .deadline(Duration::from_secs(30))
            .load(support::patch("fixture-patch-basic"))
            .unwrap();
        assert_eq!(svc::answer(), 2);
        assert_slots_read_only(&format!("after a transition to a patch (round {round})"));
        hotpatch::Loader::new()
            .deadline(Duration::from_secs(30))
            .revert(p)
            .unwrap();
        assert_slots_read_only(&format!("after a transition back (round {round})"));
    }
    stop.store(true, Ordering::Relaxed);
    let seen = worker.join().unwrap();
    assert!(
        seen.iter().all(|v| [1, 2].contains(v)),
        "the worker saw {seen:?}"
    );
}

/// Set in the child of `a_stray_write_to_a_slot_dies_with_sigsegv`.
const CHILD: &str = "HOTPATCH_TEST_STRAY_WRITE";

#[test]
fn a_stray_write_to_a_slot_dies_with_sigsegv() {
    let entry = SLOTS
        .iter()
        .find(|e| e.path == "svc::answer")
        .expect("svc::answer is patchable");
    if std::env::var_os(CHILD).is_some() {
        assert_eq!(svc::answer(), 1);
        // A stray write of the word the call path loads (`current`, at
        // the slot's address), of the value it already holds: if it does
        // not fault, nothing changes and the process exits normally.
        let current = std::ptr::from_ref(entry.slot).cast::<AtomicU64>();
        // SAFETY: `current` is the slot's first field, an `AtomicPtr`
        // (pointer-sized, aligned): an atomic store of its own value is
        // harmless if the memory is writable, which is what this test
        // checks it is not.
        unsafe {
            let value = (*current).load(Ordering::Relaxed);
            (*current).store(value, Ordering::Relaxed);
        }
        println!("the write went through");
        std::process::exit(0);
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "a_stray_write_to_a_slot_dies_with_sigsegv",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .output()
        .unwrap();
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGSEGV),
        "the child wrote into a slot and ended with {}; stdout: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
}

/// The slots stay read-only after many operations racing calls on other
/// threads; every call returns one version's answer. `_long` is the
/// same for longer.
fn racing_cycles(cycles: usize) {
    let _serial = support::serial();
    let stop = Arc::new(AtomicBool::new(false));
    let threads = 3;
    let barrier = Arc::new(Barrier::new(threads + 1));
    let (tx, rx) = mpsc::channel();
    for t in 0..threads {
        let (stop, barrier, tx) = (stop.clone(), barrier.clone(), tx.clone());
        std::thread::spawn(move || {
            // Two registered workers (transitions), one unregistered.
            let registered = t < 2;
            let _registered = registered.then(hotpatch::register_thread);
            barrier.wait();
            let mut calls = 0u64;
            let mut wrong = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let (a, s) = (svc::answer(), svc::add(1, 2));
                // Between two safepoints a registered thread runs one
                // version; an unregistered one, each call old or new.
                let ok = if registered {
                    matches!((a, s), (1, 3) | (2, 3) | (10, 1003))
                } else {
                    [1, 2, 10].contains(&a) && [3, 1003].contains(&s)
                };
                if !ok {
                    wrong.push((a, s));
                }
                calls += 1;
                hotpatch::quiescent();
            }
            tx.send((calls, wrong)).unwrap();
        });
    }
    drop(tx);
    barrier.wait();
    let loader = hotpatch::Loader::new().deadline(Duration::from_secs(30));
    for i in 0..cycles {
        let first = if i % 2 == 0 {
            "fixture-patch-basic"
        } else {
            "fixture-patch-stack-a"
        };
        let p = loader.load(support::patch(first)).unwrap();
        loader.revert(p).unwrap();
        assert_slots_read_only(&format!("after cycle {i}"));
    }
    stop.store(true, Ordering::Relaxed);
    for (calls, wrong) in rx {
        assert!(calls > 0);
        assert!(wrong.is_empty(), "calls saw mixed versions: {wrong:?}");
    }
}

#[test]
fn slots_stay_read_only_after_operations_racing_calls() {
    racing_cycles(20);
}

#[test]
#[ignore = "long form of slots_stay_read_only_after_operations_racing_calls"]
fn slots_stay_read_only_after_operations_racing_calls_long() {
    racing_cycles(2000);
}
