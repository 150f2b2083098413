//! A patch that hooks a function that is not `#[patchable]`
//! (`svc::hooked::price`, called by the service's worker through unmarked
//! code), operated with the tool: applied, listed as hooked, accepted,
//! restored after a restart from the state directory, reverted. The
//! service checks every answer meanwhile.
//!
//! Against real service processes, started by `common`.

mod common;

use serde_json::{Value, json};

use common::*;

const PRICE: &str = "svc::hooked::price";

/// The status entry of `path`, if listed.
fn function(status: &Value, path: &str) -> Option<Value> {
    status["functions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == json!(path))
        .cloned()
}

#[test]
fn a_hooked_function_is_applied_listed_restored_and_reverted() {
    let state = state_dir();
    let svc = Service::start("hooked", &["--state-dir", path_str(&state)]);
    let d = svc.dir.clone();
    assert_eq!(function(&status_of(&d), PRICE), None, "not hooked yet");

    let r = run_in(&d, &["apply", &relative(&patch(HOOK))]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let st = status_of(&d);
    let price = function(&st, PRICE).expect("listed once hooked");
    assert_eq!(price["hooked"], json!(true), "{st}");
    assert_eq!(price["implementation"]["name"], json!(HOOK), "{st}");
    assert_eq!(st["patches"][0]["hooked"], json!([PRICE]), "{st}");
    let text = run_in(&d, &["status"]);
    assert!(
        text.stdout
            .lines()
            .any(|l| l.contains(PRICE) && l.contains("(hooked)")),
        "{}",
        text.stdout
    );
    // The apply event says what the entry write paused.
    let events = run_in(&d, &["events", "--json"]).json();
    assert!(
        events["events"].as_array().unwrap().iter().any(|e| {
            e["op"] == json!("apply")
                && e["message"]
                    .as_str()
                    .is_some_and(|m| m.contains(&format!("hooked `{PRICE}`")))
        }),
        "{events}"
    );
    let served = svc.served();
    svc.serves_beyond(served);

    let r = run_in(&d, &["accept", HOOK]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    kill(svc);

    // Restored from the state directory before serving.
    let svc = Service::start("hooked", &["--state-dir", path_str(&state)]);
    let d = svc.dir.clone();
    let st = status_of(&d);
    assert_eq!(patches_of(&st), owned(&[(HOOK, "accepted")]), "{st}");
    let price = function(&st, PRICE).expect("hooked again at restart");
    assert_eq!(price["hooked"], json!(true));
    assert_eq!(price["implementation"]["name"], json!(HOOK));
    svc.serves_beyond(svc.served());

    let r = run_in(&d, &["revert", HOOK]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let st = status_of(&d);
    assert_eq!(function(&st, PRICE), None, "unhooked: {st}");
    assert_eq!(patches_of(&st), owned(&[]));
    svc.serves_beyond(svc.served());
    svc.quit();
}
