//! Accepted patches and the state directory: restored after a kill, set
//! aside when broken, refused without one, and operations that cannot be
//! recorded (issue 20).
//!
//! Against real service processes, started by `common`.

mod common;

use serde_json::{Value, json};
use std::os::unix::fs::DirBuilderExt;
use std::process::Command;

use common::*;

#[test]
fn accepted_patches_come_back_after_sigkill_in_order_and_not_with_the_kill_switch() {
    let state = state_dir();
    let svc = apply_and_accept_two(&state);
    let served = svc.served();
    assert!(
        serves_wrongly_never(&svc, served),
        "traffic with both patches"
    );
    kill(svc);

    let svc = Service::start("accept", &["--state-dir", path_str(&state)]);
    let d = svc.dir.clone();
    let st = status_of(&d);
    assert_eq!(
        patches_of(&st),
        owned(&[(BASIC, "accepted"), (V1, "accepted")]),
        "{st}"
    );
    assert_eq!(
        implementation_of(&st, "svc::answer")["name"],
        json!(BASIC),
        "restored before serving"
    );
    assert_eq!(st["state"]["rejected"], json!([]), "{st}");
    let seqs: Vec<u64> = st["state"]["accepted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![1, 2]);
    let events = run_in(&d, &["events", "--json"]).json();
    let restored: Vec<&str> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["op"] == json!("restore") && e["outcome"] == json!("ok"))
        .map(|e| e["patch"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(restored, vec![BASIC, V1], "{events}");
    svc.serves_beyond(0);
    kill(svc);

    // The kill switch: none applied, the record kept.
    let svc = Service::start_env(
        "accept",
        &["--state-dir", path_str(&state)],
        &[("HOTPATCH_DISABLE", "1")],
    );
    let st = status_of(&svc.dir);
    assert_eq!(st["patches"], json!([]), "{st}");
    assert_eq!(st["state"]["disabled"], json!(true));
    assert_eq!(st["state"]["accepted"].as_array().unwrap().len(), 2);
    assert!(st["state"]["accepted"][0]["applied_as"].is_null());
    let text = run_in(&svc.dir, &["status"]).stdout;
    assert!(text.contains("HOTPATCH_DISABLE set"), "{text}");
    svc.quit();

    // Revert of an accepted patch takes it out of the record; a replace
    // puts the new one in its place.
    let svc = Service::start("accept", &["--state-dir", path_str(&state)]);
    let d = svc.dir.clone();
    let r = run_in(&d, &["revert", BASIC, "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["unaccepted"]["name"], json!(BASIC));
    let r = run_in(&d, &["replace", V1, &relative(&patch(V2))]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(patches_of(&status_of(&d)), owned(&[(V2, "accepted")]));
    kill(svc);
    let svc = Service::start("accept", &["--state-dir", path_str(&state)]);
    assert_eq!(patches_of(&status_of(&svc.dir)), owned(&[(V2, "accepted")]));
    let stored: Vec<String> = std::fs::read_dir(state.join("patches"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        stored.len(),
        1,
        "the copies of reverted and replaced patches are gone: {stored:?}"
    );
    svc.quit();
}

#[test]
fn a_broken_state_directory_is_reported_set_aside_and_the_rest_applied() {
    // A tampered copy: BASIC is set aside, V1 applied.
    let state = state_dir();
    kill(apply_and_accept_two(&state));
    let rec = record(&state);
    let basic_copy = stored(&state, &rec["patches"][0]);
    let mut bytes = std::fs::read(&basic_copy).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&basic_copy, bytes).unwrap();
    let svc = Service::start("broken", &["--state-dir", path_str(&state)]);
    let st = status_of(&svc.dir);
    assert_eq!(patches_of(&st), owned(&[(V1, "accepted")]), "{st}");
    assert_eq!(rejected_of(&st), owned(&[("tampered", BASIC)]), "{st}");
    assert!(!basic_copy.exists(), "set aside");
    let files = rejected_files(&state);
    assert!(
        files
            .iter()
            .any(|f| f.ends_with("-1-fixture-patch-basic.so"))
            && files.iter().any(|f| f.ends_with(".so.reason")),
        "{files:?}"
    );
    assert_eq!(
        record(&state)["patches"].as_array().unwrap().len(),
        1,
        "dropped from the record"
    );
    svc.wait_log(|l| l.contains("accepted patch not restored") && l.contains("tampered"));
    let text = run_in(&svc.dir, &["status"]).stdout;
    assert!(
        text.contains("REJECTED AT START-UP") && text.contains("tampered"),
        "{text}"
    );
    // Accept BASIC again: the record is now [V1, BASIC].
    let r = run_in(&svc.dir, &["apply", &relative(&patch(BASIC)), "--accept"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    kill(svc);

    // A missing copy (V1) and a patch built for another build (another
    // rustc, stored with its right checksum): both set aside, BASIC applied.
    let mut rec = record(&state);
    std::fs::remove_file(stored(&state, &rec["patches"][0])).unwrap();
    let other = state.join("patches").join("9-other-build.so");
    std::fs::copy(patch(BAD_RUSTC), &other).unwrap();
    let sum = {
        let out = Command::new("sha256sum").arg(&other).output().unwrap();
        String::from_utf8(out.stdout)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .to_owned()
    };
    let mut entry = rec["patches"][1].clone();
    entry["seq"] = json!(9);
    entry["name"] = json!(BAD_RUSTC);
    entry["file"] = json!("9-other-build.so");
    entry["sha256"] = json!(sum);
    rec["patches"].as_array_mut().unwrap().push(entry);
    write_record(&state, &rec);
    let svc = Service::start("broken", &["--state-dir", path_str(&state)]);
    let st = status_of(&svc.dir);
    assert_eq!(patches_of(&st), owned(&[(BASIC, "accepted")]), "{st}");
    assert_eq!(
        rejected_of(&st),
        owned(&[("missing", V1), ("rustc_mismatch", BAD_RUSTC)]),
        "{st}"
    );
    kill(svc);

    // An entry that is not an entry: reported, the others applied.
    let mut rec = record(&state);
    rec["patches"]
        .as_array_mut()
        .unwrap()
        .insert(0, json!({"seq": "x", "name": "junk"}));
    write_record(&state, &rec);
    let svc = Service::start("broken", &["--state-dir", path_str(&state)]);
    let st = status_of(&svc.dir);
    assert_eq!(patches_of(&st), owned(&[(BASIC, "accepted")]), "{st}");
    assert_eq!(rejected_of(&st), owned(&[("bad_entry", "junk")]), "{st}");
    kill(svc);

    // A corrupt record, then one of another format version: the service
    // starts with none, says why, and keeps the record aside.
    for (bytes, kind) in [
        (
            b"{\"format\":1,\"next_seq\":3,\"patches\":[{\"seq\"".to_vec(),
            "corrupt_record",
        ),
        (
            json!({"format": 99, "next_seq": 1, "patches": []})
                .to_string()
                .into_bytes(),
            "unsupported_format",
        ),
    ] {
        std::fs::write(state.join("accepted.json"), &bytes).unwrap();
        let svc = Service::start("broken", &["--state-dir", path_str(&state)]);
        let st = status_of(&svc.dir);
        assert_eq!(st["patches"], json!([]), "{st}");
        assert_eq!(rejected_of(&st), owned(&[(kind, "-")]), "{st}");
        assert!(!state.join("accepted.json").exists(), "set aside");
        assert!(
            rejected_files(&state)
                .iter()
                .any(|f| f.ends_with("-accepted.json")),
            "{:?}",
            rejected_files(&state)
        );
        svc.serves_beyond(0);
        svc.quit();
    }
}

#[test]
fn accept_without_a_state_directory_is_refused_and_nothing_changes() {
    let svc = Service::start("nostate", &[]);
    let d = svc.dir.clone();
    let r = run_in(&d, &["apply", &relative(&patch(BASIC))]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = run_in(&d, &["accept", BASIC, "--json"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(r.json()["error"]["kind"], json!("no_state_dir"));
    assert_eq!(patches_of(&status_of(&d)), owned(&[(BASIC, "applied")]));
    // apply --accept is refused before anything is applied.
    let r = run_in(&d, &["apply", &relative(&patch(V1)), "--accept"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    one_line_error(&r, "no_state_dir");
    assert_eq!(patches_of(&status_of(&d)), owned(&[(BASIC, "applied")]));
    svc.quit();
}

#[test]
fn a_revert_or_replace_that_cannot_be_recorded_changes_nothing_and_says_so() {
    let fs = Tmpfs::mount("8m");
    let state = fs.0.join("state");
    let svc = Service::start("unrecorded", &["--state-dir", path_str(&state)]);
    let d = svc.dir.clone();
    for p in [BASIC, V1] {
        let r = run_in(&d, &["apply", &relative(&patch(p)), "--accept"]);
        assert_eq!(r.code, 0, "{}", r.stderr);
    }
    let served = svc.served();

    fs.remount("ro");
    unrecordable_operations_change_nothing(&d, &state, "read-only");
    fs.remount("rw");
    let filler = fs.fill();
    unrecordable_operations_change_nothing(&d, &state, "full");
    let served = svc.serves_beyond(served);

    // With room again both go through, and the record follows.
    std::fs::remove_file(filler).unwrap();
    let r = run_in(&d, &["revert", BASIC]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("no longer accepted"), "{}", r.stdout);
    let r = run_in(&d, &["replace", V1, &relative(&patch(V2))]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(patches_of(&status_of(&d)), owned(&[(V2, "accepted")]));
    let names: Vec<Value> = record(&state)["patches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].clone())
        .collect();
    assert_eq!(names, vec![json!(V2)]);
    svc.serves_beyond(served);
    svc.quit();
}

#[test]
fn an_unreadable_record_is_set_aside_and_the_kill_switch_starts_whatever_the_state_holds() {
    let state = state_dir();
    kill(apply_and_accept_two(&state));
    let rec = state.join("accepted.json");
    std::fs::remove_file(&rec).unwrap();
    // A record that cannot be read (EISDIR).
    std::fs::create_dir(&rec).unwrap();

    let svc = Service::start_env(
        "unreadable",
        &["--state-dir", path_str(&state)],
        &[("HOTPATCH_DISABLE", "1")],
    );
    let st = status_of(&svc.dir);
    assert_eq!(st["patches"], json!([]), "{st}");
    assert_eq!(st["state"]["disabled"], json!(true), "{st}");
    assert!(
        rec.is_dir(),
        "the kill switch leaves the state directory as it is"
    );
    svc.serves_beyond(0);
    svc.quit();

    let svc = Service::start("unreadable", &["--state-dir", path_str(&state)]);
    let st = status_of(&svc.dir);
    assert_eq!(st["patches"], json!([]), "{st}");
    assert_eq!(
        rejected_of(&st),
        owned(&[("unreadable_record", "-")]),
        "{st}"
    );
    assert!(!rec.exists(), "set aside");
    assert!(
        rejected_files(&state)
            .iter()
            .any(|f| f.ends_with("-accepted.json")),
        "{:?}",
        rejected_files(&state)
    );
    svc.wait_log(|l| l.contains("accepted patch not restored") && l.contains("unreadable_record"));
    let r = run_in(&svc.dir, &["apply", &relative(&patch(BASIC)), "--accept"]);
    assert_eq!(r.code, 0, "a new record is written: {}", r.stderr);
    assert_eq!(record(&state)["patches"][0]["name"], json!(BASIC));
    svc.serves_beyond(0);
    svc.quit();
}

#[test]
fn a_record_with_fields_of_a_later_release_keeps_its_patches_and_their_fields() {
    let state = state_dir();
    kill(apply_and_accept_two(&state));
    let mut rec = record(&state);
    rec["written_by"] = json!("hotpatch 9.9");
    for e in rec["patches"].as_array_mut().unwrap() {
        e["priority"] = json!(3);
    }
    write_record(&state, &rec);
    let svc = Service::start("later", &["--state-dir", path_str(&state)]);
    let st = status_of(&svc.dir);
    assert_eq!(
        patches_of(&st),
        owned(&[(BASIC, "accepted"), (V1, "accepted")]),
        "{st}"
    );
    assert_eq!(st["state"]["rejected"], json!([]), "{st}");
    // A record rewritten by this release keeps what it does not know.
    let r = run_in(&svc.dir, &["revert", V1]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let rec = record(&state);
    assert_eq!(rec["patches"].as_array().unwrap().len(), 1, "{rec}");
    assert_eq!(rec["patches"][0]["priority"], json!(3), "{rec}");
    assert_eq!(rec["written_by"], json!("hotpatch 9.9"), "{rec}");
    svc.quit();
}

#[test]
fn restore_keeps_a_copy_another_entry_uses_and_cleans_orphans_and_stale_sockets() {
    let state = state_dir();
    let svc = Service::start("shared-copy", &["--state-dir", path_str(&state)]);
    let r = run_in(&svc.dir, &["apply", &relative(&patch(BASIC)), "--accept"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    kill(svc);
    // Two entries naming one file.
    let mut rec = record(&state);
    let mut twin = rec["patches"][0].clone();
    twin["seq"] = json!(2);
    rec["patches"].as_array_mut().unwrap().push(twin);
    rec["next_seq"] = json!(3);
    write_record(&state, &rec);
    let copy = stored(&state, &rec["patches"][0]);
    // Leftovers: an orphaned copy, an interrupted write, and the socket
    // of a process that died (a pid above any pid_max).
    let patches = state.join("patches");
    std::fs::write(patches.join("7-orphan.so"), b"x").unwrap();
    std::fs::write(patches.join(".8-interrupted.so.tmp"), b"x").unwrap();
    let sockets = scratch().join("sock");
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&sockets)
        .unwrap();
    let stale = sockets.join("shared-copy.4194305.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());

    let svc = Service::start_in(
        &sockets,
        "shared-copy",
        &["--state-dir", path_str(&state)],
        &[],
    );
    let st = status_of(&svc.dir);
    assert_eq!(patches_of(&st), owned(&[(BASIC, "accepted")]), "{st}");
    assert_eq!(
        rejected_of(&st),
        owned(&[("already_applied", BASIC)]),
        "{st}"
    );
    assert!(copy.exists(), "the copy the first entry uses stays");
    assert!(!patches.join("7-orphan.so").exists(), "orphan removed");
    assert!(!patches.join(".8-interrupted.so.tmp").exists());
    assert!(!stale.exists(), "stale socket removed");
    let ev = run_in(&svc.dir, &["events", "--json"]).json();
    let cleaned: Vec<&str> = ev["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["op"] == json!("clean"))
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert!(
        cleaned
            .iter()
            .any(|m| m.contains("removed 2 orphaned file"))
            && cleaned.iter().any(|m| m.contains("removed 1 stale socket")),
        "{ev}"
    );
    kill(svc);
    let svc = Service::start("shared-copy", &["--state-dir", path_str(&state)]);
    let st = status_of(&svc.dir);
    assert_eq!(patches_of(&st), owned(&[(BASIC, "accepted")]), "{st}");
    assert_eq!(st["state"]["rejected"], json!([]), "{st}");
    svc.quit();
}
