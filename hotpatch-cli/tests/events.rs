//! `hotpatch events --follow`.
//!
//! Against real service processes, started by `common`.

mod common;

use serde_json::{Value, json};
use std::io::{BufRead, BufReader};

use common::*;

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
