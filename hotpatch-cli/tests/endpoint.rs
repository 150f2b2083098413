//! The control endpoint under bad input, floods, refused peers, large
//! files and bursts of connections (issue 20), and what it costs idle.
//!
//! Against real service processes, started by `common`.

mod common;

use serde_json::{Value, json};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn bad_input_and_floods_do_not_stop_traffic_or_other_clients() {
    let svc = Service::start(
        "hostile",
        &["--read-timeout-ms", "1500", "--max-connections", "16"],
    );
    let sock = svc.socket.clone();
    let d = svc.dir.clone();
    let mut served = svc.serves_beyond(0);
    let (fds0, threads0) = fds_and_threads(svc.pid());

    // Malformed requests get an error line; the connection stays usable.
    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(GUARD)).unwrap();
    let mut lines = BufReader::new(s.try_clone().unwrap()).lines();
    let cases: [(&[u8], &str); 7] = [
        (b"not json\n", "bad_request"),
        (b"\xff\xfe\x00garbage\n", "bad_request"),
        (b"{\"v\":1,\"op\":\"explode\"}\n", "unknown_op"),
        (b"{\"v\":1,\"op\":\"apply\",\"file\":42}\n", "bad_request"),
        (
            b"{\"v\":1,\"op\":\"revert\",\"patch\":{\"id\":1}}\n",
            "bad_request",
        ),
        (b"{\"v\":99,\"op\":\"status\"}\n", "unsupported_version"),
        (
            b"{\"v\":1,\"op\":\"apply\",\"file\":\"relative.so\"}\n",
            "bad_request",
        ),
    ];
    for (line, want) in cases {
        s.write_all(line).unwrap();
        let reply: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        assert_eq!(kind(&reply), want, "{}", String::from_utf8_lossy(line));
    }
    s.write_all(b"{\"v\":1,\"op\":\"status\"}\n").unwrap();
    let reply: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(reply["ok"], json!(true), "the same connection still works");
    drop((s, lines));
    served = svc.serves_beyond(served);

    // An oversized line: an error, then the connection is closed.
    let big = UnixStream::connect(&sock).unwrap();
    let mut w = big.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&vec![b'x'; 200 * 1024]);
    });
    let got = until_closed(&big);
    writer.join().unwrap();
    let reply: Value = serde_json::from_slice(got.split(|&b| b == b'\n').next().unwrap()).unwrap();
    assert_eq!(kind(&reply), "line_too_long");

    // Half a line, then silence: dropped at the read timeout; meanwhile
    // another client is answered and traffic flows.
    let mut half = UnixStream::connect(&sock).unwrap();
    half.write_all(b"{\"v\":1,\"op\":").unwrap();
    let r = run_in(&d, &["status", "--json"]);
    assert_eq!(r.code, 0, "another client is answered: {}", r.stderr);
    served = svc.serves_beyond(served);
    assert_eq!(until_closed(&half), b"", "dropped without a reply");

    // 200 connections at once, all silent or half-written.
    let flood: Vec<UnixStream> = (0..200)
        .map(|i| {
            let mut c = UnixStream::connect(&sock).unwrap();
            if i % 2 == 0 {
                c.write_all(b"{\"v\":").unwrap();
            }
            c
        })
        .collect();
    for _ in 0..3 {
        let reply = raw(&sock, b"{\"v\":1,\"op\":\"status\"}\n");
        assert_eq!(
            reply["ok"],
            json!(true),
            "answered during the flood: {reply}"
        );
        let r = run_in(&d, &["status"]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        served = svc.serves_beyond(served);
    }
    // Every flood connection was closed by the service: evicted to admit
    // newer ones, or at its read timeout. None was answered.
    for c in &flood {
        let got = until_closed(c);
        assert!(
            got.is_empty()
                || kind(
                    &serde_json::from_slice(got.split(|&b| b == b'\n').next().unwrap()).unwrap()
                ) == "overloaded"
        );
    }
    drop(flood);

    // Nothing leaked: descriptors and threads back to where they were.
    let start = Instant::now();
    loop {
        let now = fds_and_threads(svc.pid());
        if now.0 <= fds0 && now.1 <= threads0 {
            break;
        }
        assert!(
            start.elapsed() < GUARD,
            "leaked: {now:?}, was {:?}",
            (fds0, threads0)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = run_in(&d, &["events", "--json"]);
    assert_eq!(r.code, 0);
    svc.serves_beyond(served);
    svc.quit();
}

#[test]
fn peers_of_another_uid_are_refused() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        panic!("this test runs as root (it starts a client as uid 65534)");
    }
    // Default: only this uid and root; the file system keeps others out.
    let private = Service::start("private", &["--idle"]);
    let meta = std::fs::metadata(&private.socket).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o600, "socket mode");
    assert_eq!(
        std::fs::metadata(&private.dir).unwrap().mode() & 0o777,
        0o700,
        "dir mode"
    );
    let r = run_as(65534, 65534, &private.socket);
    assert_eq!(r.code, 6, "{}", r.stderr);
    one_line_error(&r, "Permission denied");

    // With a gid allowed, others can connect, and peer credentials decide.
    let shared = Service::start("shared", &["--idle", "--allow-gid", "4242"]);
    assert_eq!(
        std::fs::metadata(&shared.socket).unwrap().mode() & 0o777,
        0o666
    );
    let r = run_as(65534, 65534, &shared.socket);
    assert_eq!(r.code, 6, "{} {}", r.stdout, r.stderr);
    one_line_error(&r, "not_permitted: uid 65534");
    let r = run_as(65534, 4242, &shared.socket);
    assert_eq!(r.code, 0, "gid 4242 is allowed: {}", r.stderr);
    assert!(r.stdout.starts_with("shared  pid"), "{}", r.stdout);
    let ev = run_in(&shared.dir, &["events", "--json"]).json();
    let refused: Vec<&Value> = ev["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["op"] == json!("connect"))
        .collect();
    assert_eq!(refused.len(), 1, "{ev}");
    assert_eq!(refused[0]["outcome"], json!("not_permitted"));
    assert_eq!(refused[0]["peer"]["uid"], json!(65534));
    assert_eq!(refused[0]["peer"]["gid"], json!(65534));
    // And a tracing warning with the peer's credentials.
    let warn = shared.wait_log(|l| l.contains("control connection refused: not permitted"));
    assert!(
        warn.contains("WARN") && warn.contains("peer_uid=65534") && warn.contains("peer_gid=65534"),
        "{warn}"
    );
    private.quit();
    shared.quit();
}

#[test]
fn the_idle_endpoint_does_no_work() {
    let svc = Service::start("idle", &["--idle"]);
    let d = svc.dir.clone();
    // Let start-up settle, then watch the endpoint thread for 3 s.
    assert_eq!(run_in(&d, &["status"]).code, 0);
    std::thread::sleep(Duration::from_millis(300));
    let before = thread_counters(svc.pid());
    std::thread::sleep(Duration::from_secs(3));
    let after = thread_counters(svc.pid());
    let endpoint = "hotpatch-contro"; // the kernel keeps 15 bytes of a name
    let (b, a) = (before[endpoint], after[endpoint]);
    assert_eq!(
        a.1, b.1,
        "the endpoint thread woke up while idle: {b:?} -> {a:?}"
    );
    assert_eq!(a.0, b.0, "the endpoint thread used CPU while idle");
    let total = |m: &HashMap<String, (u64, u64)>| m.values().map(|v| v.0).sum::<u64>();
    eprintln!(
        "idle service with the endpoint on: {} CPU ticks in 3 s over {} threads",
        total(&after) - total(&before),
        after.len()
    );
    // The measure sees a request: one connection wakes the thread.
    assert_eq!(run_in(&d, &["status"]).code, 0);
    let woken = thread_counters(svc.pid())[endpoint];
    assert!(
        woken.1 > a.1,
        "a request wakes the endpoint thread: {a:?} -> {woken:?}"
    );
    svc.quit();
}

#[test]
fn refused_clients_are_counted_once_per_peer_and_keep_the_history_of_operations() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        panic!("this test runs as root (it connects as uid 65534)");
    }
    let svc = Service::start("refusals", &["--allow-gid", "4242"]);
    let d = svc.dir.clone();
    let r = run_in(&d, &["apply", &relative(&patch(BASIC))]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let replies = connect_as_nobody(&svc.socket, 300);
    assert!(replies.iter().all(|r| kind(r) == "not_permitted"));
    let ev = run_in(&d, &["events", "--json", "--limit", "256"]).json();
    let events = ev["events"].as_array().unwrap();
    for op in ["listen", "apply"] {
        assert!(
            events
                .iter()
                .any(|e| e["op"] == json!(op) && e["outcome"] == json!("ok")),
            "the {op} event is kept: {ev}"
        );
    }
    let refusals: Vec<&Value> = events
        .iter()
        .filter(|e| e["op"] == json!("connect"))
        .collect();
    assert!(!refusals.is_empty() && refusals.len() <= 4, "{ev}");
    let counted: u64 = refusals.iter().map(|e| e["count"].as_u64().unwrap()).sum();
    assert_eq!(counted, 300, "{ev}");
    assert!(refusals.iter().all(|e| e["peer"]["uid"] == json!(65534)));
    svc.wait_log(|l| l.contains("control connection refused"));
    let warnings = svc
        .seen
        .lock()
        .unwrap()
        .log
        .iter()
        .filter(|l| l.contains("control connection refused"))
        .count();
    assert!(
        warnings <= 4,
        "the log is rate-limited: {warnings} warnings"
    );
    svc.serves_beyond(0);
    svc.quit();
}

#[test]
fn a_large_file_is_refused_unread_with_memory_bounded_and_traffic_flowing() {
    let svc = Service::start("large", &[]);
    let before = svc.serves_beyond(0);
    let start = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    let rate = (svc.served() - before) as f64 / start.elapsed().as_secs_f64();
    eprintln!("traffic before: {rate:.0} requests/s");
    let hwm0 = vm_hwm_kib(svc.pid());
    let dir = scratch();
    // 900 MiB, sparse: over the size limit.
    let big = dir.join("big.so");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(900 << 20)
        .unwrap();
    std::fs::set_permissions(&big, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (replies, rate) = checks_at_once(&svc, &big, 4);
    let grew = vm_hwm_kib(svc.pid()) - hwm0;
    eprintln!(
        "4 checks of a 900 MiB file: traffic {rate:.0} requests/s meanwhile, peak memory +{grew} KiB"
    );
    assert!(grew < 32 * 1024, "peak memory grew by {grew} KiB");
    for r in &replies {
        assert_eq!(kind(r), "read", "{r}");
        assert!(
            r["error"]["message"].as_str().unwrap().contains("limit"),
            "{r}"
        );
    }
    // 48 MiB, sparse, under the limit but not an ELF file: refused on its
    // header.
    let junk = dir.join("junk.so");
    std::fs::File::create(&junk)
        .unwrap()
        .set_len(48 << 20)
        .unwrap();
    std::fs::set_permissions(&junk, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (replies, rate) = checks_at_once(&svc, &junk, 4);
    for r in &replies {
        assert_eq!(kind(r), "not_loadable", "{r}");
        assert!(
            r["error"]["message"].as_str().unwrap().contains("ELF"),
            "{r}"
        );
    }
    eprintln!("4 checks of a 48 MiB non-ELF file: traffic {rate:.0} requests/s meanwhile");
    let grew = vm_hwm_kib(svc.pid()) - hwm0;
    eprintln!("peak resident memory grew by {grew} KiB");
    assert!(grew < 32 * 1024, "peak memory grew by {grew} KiB");
    // 48 MiB with an ELF header, read whole by each check: the endpoint
    // reads at most two patch files at once.
    let elf = dir.join("elf.so");
    let mut f = std::fs::File::create(&elf).unwrap();
    f.write_all(b"\x7fELF").unwrap();
    f.set_len(48 << 20).unwrap();
    drop(f);
    std::fs::set_permissions(&elf, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (replies, rate) = checks_at_once(&svc, &elf, 8);
    for r in &replies {
        assert_eq!(kind(r), "not_loadable", "{r}");
    }
    let grew = vm_hwm_kib(svc.pid()) - hwm0;
    eprintln!(
        "8 checks of a 48 MiB ELF-headed file: traffic {rate:.0} requests/s meanwhile, peak memory +{grew} KiB"
    );
    assert!(grew < 4 * 48 * 1024, "peak memory grew by {grew} KiB");
    svc.quit();
}

#[test]
fn a_burst_of_1000_connections_gets_a_reply_each() {
    burst(1000);
}

#[test]
#[ignore = "long form of a_burst_of_1000_connections_gets_a_reply_each"]
fn a_burst_of_10000_connections_gets_a_reply_each() {
    burst(10_000);
}
