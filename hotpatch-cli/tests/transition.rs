//! A transition that stalls: reported while it waits, and when it times
//! out.
//!
//! Against real service processes, started by `common`.

mod common;

use serde_json::{Value, json};
use std::time::{Duration, Instant};

use common::*;

#[test]
fn a_stalled_transition_is_reported_while_it_waits_and_times_out() {
    let mut svc = Service::start("stall", &["--deadline-ms", "3000"]);
    let d = svc.dir.clone();
    let basic = patch(BASIC);
    svc.say("stall");
    svc.wait_line(|l| l == "stalled");
    // The client asks for more than the service allows: the service's 3 s win.
    let apply = spawn_in(
        &d,
        &["apply", "--json", path_str(&basic), "--deadline", "60s"],
    );
    let start = Instant::now();
    // The busy worker switches at its next safepoint; the staller never does.
    let transition = loop {
        let s = run_in(&d, &["status", "--json"]);
        assert_eq!(
            s.code, 0,
            "status is answered during the transition: {}",
            s.stderr
        );
        let t = s.json()["transition"].clone();
        if !t.is_null() && t["waiting_for"].as_array().unwrap().len() == 1 {
            break t;
        }
        assert!(
            start.elapsed() < GUARD,
            "no transition waiting for one thread seen: {t}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        transition["what"]
            .as_str()
            .unwrap()
            .starts_with("apply fixture-patch-basic"),
        "{transition}"
    );
    let waiting = &transition["waiting_for"][0];
    assert_eq!(waiting["name"], json!("stall-worker"), "{transition}");
    assert!(waiting["tid"].as_i64().unwrap() > 0);
    let text = run_in(&d, &["status"]).stdout;
    assert!(
        text.contains("\nTRANSITION  apply fixture-patch-basic"),
        "{text}"
    );
    let header = text
        .lines()
        .position(|l| l.starts_with("TID "))
        .expect(&text);
    let row = text.lines().nth(header + 1).unwrap();
    assert!(row.contains(" stall-worker "), "{text}");
    let r = finish(apply);
    assert_eq!(r.code, 4, "{} {}", r.stdout, r.stderr);
    let e = r.json()["error"].clone();
    assert_eq!(e["kind"], json!("timeout"));
    assert_eq!(
        e["deadline_ms"],
        json!(3000),
        "bounded by the service's deadline"
    );
    assert_eq!(e["stalled"][0]["name"], json!("stall-worker"));
    one_line_error(&r, "timeout: ");
    assert!(r.stderr.contains("'stall-worker'"), "{}", r.stderr);
    let s = run_in(&d, &["status", "--json"]).json();
    assert_eq!(s["patches"], json!([]), "reversed: nothing applied");
    assert_eq!(s["transition"], Value::Null);

    svc.say("unstall");
    let r = run_in(&d, &["apply", path_str(&basic)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(run_in(&d, &["revert", "1"]).code, 0);
    svc.quit();
}
