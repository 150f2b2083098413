//! The example's guarantees, on a short run of the real thing: the
//! service's runtime, the real fix (`tokio-fix`, a dev-dependency, so
//! compiled with this test binary; linked by the test into a thin patch
//! bound to this binary, as `cargo hotpatch build` does),
//! applied and reverted mid-traffic, busy and with parked workers.
//! Phases are bounded by requests served, not by time (time only guards
//! against a hang, inside `serve::run`).

use std::time::Duration;

use tokio_service::serve::{self, Config};

mod common;
use common::thin_fix;

const CYCLES: usize = 6;

#[test]
fn no_request_without_an_await_mixes_versions() {
    let fix = thin_fix();
    let config = Config {
        workers: 4,
        connections: 16,
        cycles: CYCLES,
        dwell: Duration::ZERO,
        dwell_requests: 300,
        await_every: 4,
    };
    let report = serve::run(&config, &fix).unwrap();
    // The loader mapped its own copy of the fix.
    let _ = std::fs::remove_dir_all(fix.parent().unwrap());
    let stats = &report.stats;
    println!(
        "{stats:#?}\nserved {}, parks {}",
        report.served, report.parks
    );
    assert_eq!(report.problems, Vec::<String>::new());

    assert_eq!(
        stats.plain_mixed, 0,
        "requests without an await that mixed versions, e.g. {:?}",
        stats.sample
    );
    assert_eq!(
        stats.scoped_mixed, 0,
        "scoped requests that mixed versions across an await, e.g. {:?}",
        stats.sample
    );
    assert!(stats.scoped > 0, "no scoped request was served");
    assert_eq!(stats.bad, 0, "results of neither version");
    assert_eq!(
        stats.stale, 0,
        "requests wholly between transitions on the version not in force: {:?}",
        stats.stale_sample
    );
    // Every completed request's result went through the checks.
    assert_eq!(report.served, stats.total());
    // Both kinds of request, and both versions, were served.
    assert!(stats.plain > 0 && stats.awaiting > 0, "{stats:?}");
    assert!(stats.stable[1] > 0 && stats.stable[2] > 0, "{stats:?}");
    // Every cycle applied and reverted, half of them with parking workers.
    assert_eq!(
        (report.busy.load.len(), report.busy.revert.len()),
        (CYCLES / 2, CYCLES / 2)
    );
    assert_eq!(
        (report.quiet.load.len(), report.quiet.revert.len()),
        (CYCLES - CYCLES / 2, CYCLES - CYCLES / 2)
    );
    assert!(report.parks > 0, "workers parked (went offline)");
    assert!(hotpatch::applied().is_empty());
}
