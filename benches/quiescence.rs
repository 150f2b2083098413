//! What quiescence costs (issue 3): a safepoint with nothing to do, a
//! patchable call during and after a transition, and how long `load`
//! takes when it has to wait for busy registered threads.
//!
//! Groups, each with its baseline:
//! - `quiescent_idle`: `hotpatch::quiescent()` with no transition in
//!   progress, per loop iteration, on a registered and on an unregistered
//!   thread. Baseline: `empty_loop`, the same loop without the call.
//! - `call_transition`: the loop of `benches/call.rs` calling
//!   `bench_svc::patched`, while `bench-patch` (same body) is applied.
//!   Baseline: `before`, before any transition. `during/*` is measured
//!   while a registered thread blocked without a safepoint holds the
//!   transition open (the slot points at the dispatcher), from this
//!   thread registered and not switched (runs the old code), registered
//!   and switched, and unregistered (both run the new code); `after`
//!   once `load` returned (the slot points at the patch again);
//!   `after_revert` once it was reverted (the original again);
//!   `after_direct_swap` with the same patch applied while no thread is
//!   registered, so that `load` swapped the slot with no transition at all
//!   (the control for `after`).
//! - `call_target`: the control for `after` vs `before`: a plain
//!   `AtomicPtr` call (`loop_ptr`) to the original implementation
//!   (baseline) and to the patch's entry (the same machine code, in the
//!   patch library), i.e. the same path to two places.
//! - `load_until_switched`: `load` from call to return, which is when
//!   every registered thread switched, in a host of 1000 generated
//!   functions (`benches/gen`, `gen-host-1000 serve`) with patches of 1,
//!   100 and 1000 functions, next to 2 worker threads in one of several
//!   regimes (see `benches/gen/src/host.rs`, `workers`). Baseline: `none`,
//!   no worker thread. Each iteration is a load then a revert (of the same
//!   bytes, so the library is reused); only the load is timed. Outside
//!   criterion, 101 load+revert cycles per case (`HOTPATCH_BENCH_LOAD_EACH`;
//!   0 skips them) give the median, p90 and maximum of single loads and
//!   reverts, and, from the workers' side, when the last worker ran its
//!   first request on the new version ("switched"), so that the time the
//!   workers took to switch and the time `load` took to notice ("lag")
//!   can be told apart. Written to stderr and
//!   `target/hotpatch-bench/quiescence-load.json`.
//!
//! Instruction counts of the first two groups: `benches/icount_quiescence.rs`.
//!
//! Run: `cargo bench --bench quiescence`. Read medians from
//! `target/criterion/<group>/<case>/new/estimates.json` (`median`), or
//! with `benches/medians.sh`.

mod quiescence_cases;
mod support;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use criterion::{Criterion, SamplingMode, criterion_group, criterion_main};
use quiescence_cases::{
    HOLDER, HeldTransition, TARGET, loop_call, loop_empty, loop_ptr, loop_quiescent,
};

fn quiescent_idle(c: &mut Criterion) {
    assert!(hotpatch::transition().is_none());
    let mut g = c.benchmark_group("quiescent_idle");
    g.bench_function("empty_loop", |b| b.iter_custom(loop_empty));
    {
        let _registered = hotpatch::register_thread();
        g.bench_function("registered", |b| b.iter_custom(loop_quiescent));
    }
    g.bench_function("unregistered", |b| b.iter_custom(loop_quiescent));
    g.finish();
}

fn call_transition(c: &mut Criterion) {
    let patch = quiescence_cases::bench_patch();
    let body = |x: u64| x.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29) ^ x;
    let check = || {
        for x in [0, 7, u64::MAX] {
            assert_eq!(bench_svc::patched(x), body(x));
        }
    };
    let me = std::thread::current().name().unwrap_or_default().to_owned();
    let mut g = c.benchmark_group("call_transition");

    let registered = hotpatch::register_thread();
    check();
    g.bench_function("before", |b| b.iter_custom(loop_call));

    let held = HeldTransition::begin(&patch);
    let mut waiting = quiescence_cases::waiting_for();
    waiting.sort();
    let mut expected = vec![HOLDER.to_owned(), me.clone()];
    expected.sort();
    assert_eq!(waiting, expected, "both registered threads not switched");
    check();
    g.bench_function("during/not_switched", |b| b.iter_custom(loop_call));
    assert!(quiescence_cases::waiting_for().contains(&me));

    hotpatch::quiescent();
    assert_eq!(quiescence_cases::waiting_for(), [HOLDER]);
    check();
    g.bench_function("during/switched", |b| b.iter_custom(loop_call));

    drop(registered);
    assert!(hotpatch::transition().is_some());
    check();
    g.bench_function("during/unregistered", |b| b.iter_custom(loop_call));

    let applied = held.finish();
    assert!(hotpatch::transition().is_none());
    check();
    g.bench_function("after", |b| b.iter_custom(loop_call));
    let patch_entry = quiescence_cases::current_impl();

    applied.revert().expect("revert bench-patch");
    check();
    g.bench_function("after_revert", |b| b.iter_custom(loop_call));
    let original = quiescence_cases::current_impl();
    assert_ne!(original, patch_entry);

    // No registered thread: `load` swaps the slot directly, with no
    // dispatcher and no transition. Same bytes, so the same library and
    // entry as `after`.
    let swapped = hotpatch::load(&patch).expect("load bench-patch");
    assert_eq!(quiescence_cases::current_impl(), patch_entry);
    check();
    g.bench_function("after_direct_swap", |b| b.iter_custom(loop_call));
    swapped.revert().expect("revert bench-patch");
    g.finish();

    // The control for `after` vs `before`: the same `AtomicPtr` call to
    // each of the two implementations (the patch stays mapped).
    let mut g = c.benchmark_group("call_target");
    for (name, target) in [("original", original), ("patch_entry", patch_entry)] {
        // Release: pairs with the Acquire in `loop_ptr`.
        TARGET.store(target, Ordering::Release);
        check_ptr();
        g.bench_function(name, |b| b.iter_custom(loop_ptr));
    }
    g.finish();
}

/// `loop_ptr`'s target computes the body.
fn check_ptr() {
    // SAFETY: `TARGET` holds a `fn(u64) -> u64`.
    let f: fn(u64) -> u64 = unsafe { std::mem::transmute(TARGET.load(Ordering::Acquire)) };
    for x in [0, 7, u64::MAX] {
        assert_eq!(
            f(x),
            x.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29) ^ x
        );
    }
}

/// Patch sizes of `load_until_switched`.
const SIZES: [usize; 3] = [1, 100, 1000];

/// Worker regimes of `load_until_switched`: the host's `workers` mode,
/// and the case name.
const REGIMES: [(&str, &str); 5] = [
    ("none", "none"),
    ("unregistered", "2_unregistered_busy"),
    ("busy", "2_registered_busy"),
    ("blocking", "2_registered_blocking"),
    ("offline", "2_registered_blocking_offline"),
];

/// Single loads per case measured outside criterion, for percentiles;
/// `HOTPATCH_BENCH_LOAD_EACH=0` skips them.
fn load_each() -> usize {
    std::env::var("HOTPATCH_BENCH_LOAD_EACH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(101)
}

/// Nearest-rank percentile of sorted `v`.
fn percentile(v: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn summary(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (
        percentile(&v, 50.0),
        percentile(&v, 90.0),
        *v.last().unwrap(),
    )
}

fn load_until_switched(c: &mut Criterion) {
    if !support::benching() {
        return;
    }
    let mut packages = vec!["gen-host-1000".to_owned()];
    packages.extend(SIZES.iter().map(|m| format!("gen-patch-1000-{m}")));
    let refs: Vec<&str> = packages.iter().map(String::as_str).collect();
    let dir = support::build_gen(&refs);
    let patches: Vec<(usize, PathBuf)> = SIZES
        .iter()
        .map(|&m| (m, support::patch(&dir, &format!("gen-patch-1000-{m}"))))
        .collect();
    let mut host = support::Host::spawn(&dir.join("gen-host-1000"));
    let each = load_each();

    let mut report = format!(
        "\nsingle loads and reverts over {each} load+revert cycles, ms: median p90 max of the call; \
         switched: median p90 of the time from the call to the last worker's first request on \
         the new version; lag: median p90 of load minus switched, per load\n",
    );
    let mut json = String::from("{\n");
    let mut g = c.benchmark_group("load_until_switched");
    g.sampling_mode(SamplingMode::Flat).sample_size(10);
    for (ri, (mode, regime)) in REGIMES.iter().enumerate() {
        let stopped = host.ask(&format!("workers {mode} 2"));
        assert_eq!(stopped[1], 0, "workers saw an invalid or mixed request");
        for (m, so) in &patches {
            let so = so.display();
            g.bench_function(format!("{regime}/{m}_fns"), |b| {
                b.iter_custom(|iters| host.time(&format!("apply {so} {iters}"), 0))
            });
        }
        for (mi, (m, so)) in patches.iter().enumerate() {
            if each == 0 {
                continue;
            }
            let answer = host.ask(&format!("apply-each {} {each}", so.display()));
            let col = |c: usize| -> Vec<f64> {
                answer[c * each..(c + 1) * each]
                    .iter()
                    .map(|&ns| ns as f64 / 1e6)
                    .collect()
            };
            // Per load: how long `load` returned after the last worker
            // switched (the patcher noticing), when there are workers.
            let missed = answer[4 * each];
            // Meaningful when every worker ran a request on every version
            // (registered online workers always do; unregistered and
            // offline ones can miss a version that lasts microseconds).
            let has_switches = *mode != "none" && missed == 0;
            let lag: Vec<f64> = col(0).iter().zip(col(2)).map(|(l, s)| l - s).collect();
            let (load, revert) = (summary(col(0)), summary(col(1)));
            let (load_switch, revert_switch) = (summary(col(2)), summary(col(3)));
            let lag = summary(lag);
            let two = |(p50, p90, _): (f64, f64, f64)| {
                if has_switches {
                    format!("{p50:7.3} {p90:7.3}")
                } else {
                    format!("{:>7} {:>7}", "-", "-")
                }
            };
            writeln!(
                report,
                "  {regime:<30} {m:>4} fns: load {:7.3} {:7.3} {:7.3} | switched {} | lag {} \
                 | revert {:7.3} {:7.3} {:7.3} | switched {} | no request on a version: {missed}",
                load.0,
                load.1,
                load.2,
                two(load_switch),
                two(lag),
                revert.0,
                revert.1,
                revert.2,
                two(revert_switch),
            )
            .unwrap();
            let sep = if ri + 1 == REGIMES.len() && mi + 1 == patches.len() {
                ""
            } else {
                ","
            };
            let stats = |(p50, p90, max): (f64, f64, f64)| {
                format!("{{\"median_ms\": {p50}, \"p90_ms\": {p90}, \"max_ms\": {max}}}")
            };
            let switch_stats = |v| {
                if has_switches {
                    stats(v)
                } else {
                    "null".to_owned()
                }
            };
            writeln!(
                json,
                "  \"{regime}/{m}_fns\": {{\"cycles\": {each}, \"load\": {}, \"load_switched\": {}, \
                 \"load_minus_switched\": {}, \"revert\": {}, \"revert_switched\": {}, \"no_request_on_a_version\": {missed}}}{sep}",
                stats(load),
                switch_stats(load_switch),
                switch_stats(lag),
                stats(revert),
                switch_stats(revert_switch),
            )
            .unwrap();
        }
    }
    g.finish();
    let stopped = host.ask("workers none 0");
    assert_eq!(stopped[1], 0, "workers saw an invalid or mixed request");
    json.push_str("}\n");
    let path = support::results_dir().join("quiescence-load.json");
    std::fs::write(&path, json).unwrap();
    eprintln!("{report}  (written to {})", path.display());
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    targets = quiescent_idle, call_transition, load_until_switched
}
criterion_main!(benches);
