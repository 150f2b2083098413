//! Every verb of the `hotpatch` tool in text and JSON with its exit code,
//! wrong arguments and missing processes, and what its messages say.
//!
//! Against real service processes, started by `common`.

mod common;

use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

use common::*;

#[test]
fn every_verb_in_text_and_json_with_its_exit_code() {
    let svc = Service::start("verbs", &[]);
    let d = svc.dir.clone();
    let pid = svc.pid().to_string();
    let basic = patch(BASIC);

    // ps
    let r = run_in(&d, &["ps"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let header = r.stdout.lines().next().unwrap();
    assert!(header.starts_with("PID") && header.contains("SERVICE") && header.contains("PATCHES"));
    let row: Vec<&str> = r
        .stdout
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(row[..3], [pid.as_str(), "verbs", "0"], "{}", r.stdout);
    let r = run_in(&d, &["ps", "--json"]);
    assert_eq!(
        r.json()["processes"],
        json!([{"pid": svc.pid(), "service": "verbs", "patches": 0, "socket": path_str(&svc.socket)}])
    );

    // status (one process: no --pid needed)
    let r = run_in(&d, &["status"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.starts_with(&format!("verbs  pid {pid}")),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("PATCHES  none applied"), "{}", r.stdout);
    assert!(r.stdout.contains("TRANSITION  none"), "{}", r.stdout);
    let line = r
        .stdout
        .lines()
        .find(|l| l.starts_with("svc::answer "))
        .unwrap();
    assert!(line.ends_with("original"), "{line}");
    let before = run_in(&d, &["status", "--json", "--pid", &pid]).json();
    assert_eq!(before["ok"], json!(true));
    assert_eq!(before["v"], json!(1));
    assert_eq!(before["pid"], json!(svc.pid()));
    assert_eq!(before["patches"], json!([]));
    assert_eq!(before["transition"], Value::Null);
    assert_eq!(
        implementation_of(&before, "svc::answer"),
        json!({"kind": "original"})
    );

    // check: a dry run, nothing changes
    let r = run_in(&d, &["check", &relative(&basic)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout
            .contains("fixture-patch-basic 1.2.3 (answer() returns 2) passes every check"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout
            .lines()
            .any(|l| l.starts_with("svc::answer ") && l.ends_with("original")),
        "{}",
        r.stdout
    );
    let c = run_in(&d, &["check", "--json", path_str(&basic)]).json();
    assert_eq!(c["check"]["name"], json!(BASIC));
    assert_eq!(c["check"]["file"], json!(path_str(&basic)));
    assert!(
        c["check"]["functions"]
            .as_array()
            .unwrap()
            .contains(&json!({"path": "svc::answer", "now": {"kind": "original"}}))
    );
    assert_eq!(
        run_in(&d, &["status", "--json"]).json(),
        before,
        "check changed nothing"
    );

    // apply, by a relative path (resolved by the client)
    let t0 = unix_ms();
    let r = run_in(&d, &["apply", &relative(&basic), "--deadline", "10s"]);
    let t1 = unix_ms();
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout
            .starts_with("applied patch #1 fixture-patch-basic 1.2.3 (answer() returns 2) in "),
        "{}",
        r.stdout
    );
    let applier = r.pid;
    let logged = svc.wait_log(|l| l.contains("apply patch #1 fixture-patch-basic 1.2.3"));
    assert!(
        logged.contains("INFO") && logged.contains(&format!("peer_pid={applier}")),
        "{logged}"
    );
    // The service's registered worker: waited for, or already switched.
    assert!(
        logged.contains("transition_us=")
            && (logged.contains("for 1 thread: 'worker' (tid ")
                || logged.contains("every registered thread was already at a safepoint")),
        "the threads the transition waited for: {logged}"
    );
    let s = run_in(&d, &["status", "--json"]).json();
    let p = &s["patches"][0];
    assert_eq!(s["patches"].as_array().unwrap().len(), 1);
    assert_eq!(p["id"], json!(1));
    assert_eq!(p["name"], json!(BASIC));
    assert_eq!(p["version"], json!("1.2.3"));
    assert_eq!(p["description"], json!("answer() returns 2"));
    assert_eq!(p["file"], json!(path_str(&basic)));
    assert_eq!(p["state"], json!("applied"));
    assert_eq!(p["applied_by"], json!({"uid": 0, "gid": 0, "pid": applier}));
    let at = p["applied_at_ms"].as_u64().unwrap();
    assert!((t0..=t1).contains(&at), "{t0} <= {at} <= {t1}");
    // Where its code is (issue 22): near the service's, and the apply
    // event says so.
    assert_eq!(p["placement"]["kind"], json!("near"), "{p}");
    assert!(p["placement"]["size"].as_u64().unwrap() > 0, "{p}");
    assert!(
        logged.contains("near the executable's code"),
        "the apply event says where the code is: {logged}"
    );
    assert_eq!(
        implementation_of(&s, "svc::answer"),
        json!({"kind": "patch", "id": 1, "name": BASIC})
    );
    let text = run_in(&d, &["status"]).stdout;
    assert!(
        text.lines().any(|l| l.starts_with("1 ")
            && l.contains("applied")
            && l.contains(" near ")
            && l.contains(&format!("uid 0 pid {applier}"))),
        "{text}"
    );
    assert!(text.lines().any(|l| l.starts_with("svc::answer ") && l.ends_with("patch #1 (fixture-patch-basic)")), "{text}");
    let r = run_in(&d, &["ps", "--json"]);
    assert_eq!(r.json()["processes"][0]["patches"], json!(1));

    // already applied: not a failure, its own exit code
    let r = run_in(&d, &["apply", path_str(&basic)]);
    assert_eq!(r.code, 5, "{} {}", r.stdout, r.stderr);
    assert!(
        r.stdout.starts_with("nothing to do: ") && r.stdout.contains("already applied as patch #1"),
        "{}",
        r.stdout
    );
    assert_eq!(r.stderr, "");
    let r = run_in(&d, &["apply", "--json", path_str(&basic)]);
    assert_eq!(r.code, 5);
    assert_eq!(r.json()["error"]["kind"], json!("already_applied"));
    assert_eq!(r.json()["error"]["patch"], json!({"id": 1, "name": BASIC}));

    // a refused patch: exit 3, one line, nothing changed
    let s1 = run_in(&d, &["status", "--json"]).json();
    let r = run_in(&d, &["apply", path_str(&patch(BAD_RUSTC))]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    one_line_error(&r, "rustc_mismatch: ");
    assert!(
        r.stderr.contains(path_str(&patch(BAD_RUSTC))),
        "{}",
        r.stderr
    );
    let r = run_in(&d, &["check", "--json", path_str(&patch(BAD_RUSTC))]);
    assert_eq!(r.code, 3);
    assert_eq!(r.json()["error"]["kind"], json!("rustc_mismatch"));
    assert_eq!(
        run_in(&d, &["status", "--json"]).json(),
        s1,
        "nothing changed"
    );

    // revert by name, then again by id: nothing to do
    let r = run_in(&d, &["revert", BASIC]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout
            .starts_with("reverted patch #1 fixture-patch-basic 1.2.3 in "),
        "{}",
        r.stdout
    );
    let r = run_in(&d, &["revert", "#1"]);
    assert_eq!(r.code, 5, "{}", r.stderr);
    let r = run_in(&d, &["revert", "--json", "1"]);
    assert_eq!(
        r.json()["error"],
        json!({"kind": "not_applied", "message": "patch #1 is not applied", "patch": {"id": 1}})
    );

    // replace: v1, then v2 over it in one transition
    let r = run_in(&d, &["apply", "--json", path_str(&patch(V1))]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v1_id = r.json()["patch"]["id"].as_u64().unwrap();
    assert_eq!(v1_id, 2);
    let r = run_in(&d, &["replace", "2", &relative(&patch(V2))]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.starts_with("replaced patch #2 fixture-patch-replace-v1 0.1.0 by patch #3 fixture-patch-replace-v2 0.1.0 in "), "{}", r.stdout);
    let s = run_in(&d, &["status", "--json"]).json();
    assert_eq!(s["patches"].as_array().unwrap().len(), 1);
    assert_eq!(s["patches"][0]["name"], json!(V2));
    assert_eq!(
        implementation_of(&s, "svc::step_a"),
        json!({"kind": "patch", "id": 3, "name": V2})
    );
    assert_eq!(
        implementation_of(&s, "svc::step_c"),
        json!({"kind": "original"})
    );
    let r = run_in(&d, &["replace", "--json", "2", path_str(&patch(V1))]);
    assert_eq!(r.code, 5, "replacing what is not applied: {}", r.stdout);
    let r = run_in(&d, &["revert", "--json", V2]);
    assert_eq!(r.code, 0);
    assert_eq!(r.json()["reverted"]["id"], json!(3));

    // events: everything above, in order
    let r = run_in(&d, &["events", "--json"]);
    assert_eq!(r.code, 0);
    let ev = r.json();
    let ops: Vec<(String, String)> = ev["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["op"].as_str().unwrap().to_owned(),
                e["outcome"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expect: Vec<(String, String)> = [
        ("listen", "ok"),
        ("check", "ok"),
        ("check", "ok"),
        ("apply", "ok"),
        ("apply", "already_applied"),
        ("apply", "already_applied"),
        ("apply", "rustc_mismatch"),
        ("check", "rustc_mismatch"),
        ("revert", "ok"),
        ("apply", "ok"),
        ("replace", "ok"),
        ("revert", "ok"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(ops, expect);
    let apply = &ev["events"][3];
    assert_eq!(apply["patch"], json!({"id": 1, "name": BASIC}));
    assert_eq!(apply["peer"]["pid"], json!(applier));
    let last = ev["last_seq"].as_u64().unwrap();
    let r = run_in(
        &d,
        &["events", "--json", "--since", &(last - 1).to_string()],
    );
    assert_eq!(r.json()["events"].as_array().unwrap().len(), 1);
    let r = run_in(&d, &["events"]);
    assert!(r.stdout.starts_with("SEQ  TIME (UTC)"), "{}", r.stdout);
    assert!(
        r.stdout
            .lines()
            .any(|l| l.contains(" replace ") && l.contains("#3 fixture-patch-replace-v2")),
        "{}",
        r.stdout
    );

    let served = svc.served();
    assert!(served > 0);
    svc.quit();
}

#[test]
fn wrong_arguments_and_missing_processes() {
    let svc = Service::start("args", &[]);
    let d = svc.dir.clone();
    for args in [
        &["apply"][..],
        &["frobnicate"],
        &["apply", "x.so", "--deadline", "10parsecs"],
        &["status", "--pid", "1", "--socket", "/x"],
        &["ps", "--pid", "1"],
        &["status", "--pid", "notanumber"],
        &["replace", "1"],
    ] {
        let r = run_in(&d, args);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains("error:"), "{args:?}: {}", r.stderr);
        assert_eq!(r.stdout, "");
    }
    // A pid that is no process, a process with no socket, a socket that is not there.
    let dead = {
        let mut c = Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        pid
    };
    let r = run_in(&d, &["status", "--pid", &dead.to_string()]);
    assert_eq!(r.code, 7, "{}", r.stderr);
    one_line_error(&r, &format!("no process {dead}"));
    let r = run_in(&d, &["status", "--pid", &std::process::id().to_string()]);
    assert_eq!(r.code, 7, "{}", r.stderr);
    one_line_error(&r, "has no control socket");
    let r = run_in(&d, &["status", "--socket", "/nonexistent/x.1.sock"]);
    assert_eq!(r.code, 7, "{}", r.stderr);
    let r = run_in(&scratch(), &["status"]);
    assert_eq!(r.code, 7, "{}", r.stderr);
    one_line_error(&r, "no patchable process");
    let r = run_in(&d, &["apply", "/nonexistent/fix.so"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    one_line_error(&r, "read: cannot read patch /nonexistent/fix.so");

    // Two services in one directory: --pid chooses.
    let other = Command::new(built().join("control-svc"))
        .arg("--socket-dir")
        .arg(&d)
        .args(["--name", "second", "--idle"])
        .stderr(Stdio::null())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut other = scopeguard(other);
    let mut first = String::new();
    BufReader::new(other.0.stdout.as_mut().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with("ready "), "{first}");
    let r = run_in(&d, &["status"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    one_line_error(&r, "2 patchable processes");
    assert!(
        r.stderr.contains(&format!("{} (args)", svc.pid())),
        "{}",
        r.stderr
    );
    let r = run_in(
        &d,
        &["status", "--json", "--pid", &other.0.id().to_string()],
    );
    assert_eq!(r.json()["service"], json!("second"));
    // A socket whose process lives but which nobody serves (this test
    // process's pid): skipped.
    drop(
        std::os::unix::net::UnixListener::bind(d.join(format!("fake.{}.sock", std::process::id())))
            .unwrap(),
    );
    // Killed: its socket stays, and is skipped.
    other.0.kill().unwrap();
    other.0.wait().unwrap();
    let r = run_in(&d, &["ps", "--json"]);
    let pids: Vec<u64> = r.json()["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["pid"].as_u64().unwrap())
        .collect();
    assert_eq!(pids, vec![u64::from(svc.pid())]);
    assert_eq!(run_in(&d, &["status"]).code, 0);
    svc.quit();
}

#[test]
fn messages_say_what_is_so() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        panic!("this test runs as root (it runs the tool as uid 65534)");
    }
    let state = state_dir();
    let svc = Service::start("messages", &["--state-dir", path_str(&state)]);
    let d = svc.dir.clone();
    let pid = svc.pid().to_string();

    // A user who cannot enter the socket directory is not permitted (6),
    // not told the process has no socket (7).
    let r = run_as_args(
        65534,
        65534,
        &["status", "--pid", &pid, "--socket-dir", path_str(&d)],
    );
    assert_eq!(r.code, 6, "{}", r.stderr);
    one_line_error(&r, "not permitted");

    // A watch window with no health check registered says so.
    let r = run_in(&d, &["apply", &relative(&patch(V1)), "--watch", "300ms"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("no health check registered") && !r.stdout.contains("round(s)"),
        "{}",
        r.stdout
    );

    // "patch #N", never "patch patch #N": a file that changed after it
    // was applied, to the bytes of another applied patch, then of one
    // that is not applied.
    let dir = scratch();
    let file = dir.join("fix.so");
    std::fs::copy(patch(BASIC), &file).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let r = run_in(&d, &["apply", path_str(&file)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    for other in [V1, V2] {
        std::fs::copy(patch(other), &file).unwrap();
        let r = run_in(&d, &["accept", BASIC]);
        assert_eq!(r.code, 3, "{}", r.stderr);
        one_line_error(&r, "file_changed");
        assert!(!r.stderr.contains("patch patch"), "{}", r.stderr);
    }
    std::fs::copy(patch(BASIC), &file).unwrap();
    let r = run_in(&d, &["accept", BASIC]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = run_in(&d, &["accept", V1]);
    assert_eq!(r.code, 0, "{}", r.stderr);

    // The reverted and the replaced patch are not shown as accepted.
    let r = run_in(&d, &["replace", V1, &relative(&patch(V2)), "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        r.json()["replaced"]["state"],
        json!("replaced"),
        "{}",
        r.stdout
    );
    kill(svc);

    // After a restart BASIC runs from its stored copy; its revert event
    // names the file it was accepted from, not the copy it deletes.
    let svc = Service::start("messages", &["--state-dir", path_str(&state)]);
    let d = svc.dir.clone();
    let copy = state
        .join("patches")
        .join(record(&state)["patches"][0]["file"].as_str().unwrap());
    let r = run_in(&d, &["revert", BASIC, "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        r.json()["reverted"]["state"],
        json!("reverted"),
        "{}",
        r.stdout
    );
    assert!(!copy.exists(), "its copy is removed");
    let ev = run_in(&d, &["events", "--json"]).json();
    let revert = ev["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["op"] == json!("revert"))
        .cloned()
        .unwrap_or_else(|| panic!("no revert event: {ev}"));
    assert_eq!(revert["file"], json!(path_str(&file)), "{revert}");
    svc.quit();
}
