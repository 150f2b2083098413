//! The runtime's metrics (cargo feature `metrics`) through the `metrics`
//! facade: with a recorder installed, as a service that exports
//! Prometheus or OpenTelemetry metrics has, each counter, gauge and
//! histogram moves on apply, revert, refusal, rollback (by a panic and by
//! a failed health check), accept and transition.
//!
//! The recorder is this file's own (a map from each metric's key, its
//! labels sorted, to what was recorded): the test reads exactly what the
//! runtime sent through the facade, nothing an exporter computed.

mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::Duration;

use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};

const BASIC: &str = "fixture-patch-basic";
const BAD_RUSTC: &str = "fixture-patch-bad-rustc";
const WATCH_PANIC: &str = "fixture-patch-watch-panic";

/// Everything recorded, by `name{label="value",...}` (labels sorted).
#[derive(Default)]
struct Recorded {
    counters: BTreeMap<String, u64>,
    gauges: BTreeMap<String, f64>,
    histograms: BTreeMap<String, Vec<f64>>,
}

fn recorded() -> &'static Mutex<Recorded> {
    static R: OnceLock<Mutex<Recorded>> = OnceLock::new();
    R.get_or_init(Default::default)
}

fn name_of(key: &Key) -> String {
    let mut labels: Vec<String> = key
        .labels()
        .map(|l| format!("{}=\"{}\"", l.key(), l.value()))
        .collect();
    labels.sort();
    if labels.is_empty() {
        key.name().to_owned()
    } else {
        format!("{}{{{}}}", key.name(), labels.join(","))
    }
}

struct Handle(String);

impl CounterFn for Handle {
    fn increment(&self, value: u64) {
        *recorded()
            .lock()
            .unwrap()
            .counters
            .entry(self.0.clone())
            .or_default() += value;
    }
    fn absolute(&self, value: u64) {
        recorded()
            .lock()
            .unwrap()
            .counters
            .insert(self.0.clone(), value);
    }
}

impl GaugeFn for Handle {
    fn increment(&self, value: f64) {
        *recorded()
            .lock()
            .unwrap()
            .gauges
            .entry(self.0.clone())
            .or_default() += value;
    }
    fn decrement(&self, value: f64) {
        GaugeFn::increment(self, -value);
    }
    fn set(&self, value: f64) {
        recorded()
            .lock()
            .unwrap()
            .gauges
            .insert(self.0.clone(), value);
    }
}

impl HistogramFn for Handle {
    fn record(&self, value: f64) {
        recorded()
            .lock()
            .unwrap()
            .histograms
            .entry(self.0.clone())
            .or_default()
            .push(value);
    }
}

struct TestRecorder;

impl Recorder for TestRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(Arc::new(Handle(name_of(key))))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(Arc::new(Handle(name_of(key))))
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(Arc::new(Handle(name_of(key))))
    }
}

fn install() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| metrics::set_global_recorder(TestRecorder).unwrap());
}

fn gauge(name: &str) -> Option<f64> {
    recorded().lock().unwrap().gauges.get(name).copied()
}

/// Runs `f` and returns how each counter moved and which histogram
/// samples were added meanwhile.
fn moved(f: impl FnOnce()) -> (BTreeMap<String, u64>, BTreeMap<String, Vec<f64>>) {
    let (c0, h0) = {
        let r = recorded().lock().unwrap();
        (r.counters.clone(), r.histograms.clone())
    };
    f();
    let r = recorded().lock().unwrap();
    let counters = r
        .counters
        .iter()
        .filter_map(|(k, v)| {
            let d = v - c0.get(k).copied().unwrap_or(0);
            (d > 0).then(|| (k.clone(), d))
        })
        .collect();
    let histograms = r
        .histograms
        .iter()
        .filter_map(|(k, v)| {
            let before = h0.get(k).map_or(0, Vec::len);
            (v.len() > before).then(|| (k.clone(), v[before..].to_vec()))
        })
        .collect();
    (counters, histograms)
}

fn counters(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

#[test]
fn apply_revert_and_refusal_move_their_counters_and_histograms() {
    let _serial = support::serial();
    install();
    let basic = support::patch(BASIC);
    let bad = support::patch(BAD_RUSTC);

    let mut patch = None;
    let (c, h) = moved(|| patch = Some(hotpatch::load(&basic).unwrap()));
    assert_eq!(
        c,
        counters(&[("hotpatch_applies_total{op=\"apply\",outcome=\"ok\"}", 1)])
    );
    let took = &h["hotpatch_apply_duration_seconds{op=\"apply\"}"];
    assert!(took.len() == 1 && took[0] > 0.0, "{took:?}");
    // No registered thread: a direct swap, which waited for nothing.
    assert_eq!(h["hotpatch_transition_threads_waited"], [0.0]);
    assert_eq!(h["hotpatch_transition_requests_waited"], [0.0]);
    assert_eq!(h["hotpatch_transition_duration_seconds"].len(), 1);
    assert_eq!(gauge("hotpatch_patches_applied"), Some(1.0));

    // Already applied: its own outcome, not a refusal.
    let (c, _) = moved(|| assert!(hotpatch::load(&basic).is_err()));
    assert_eq!(
        c,
        counters(&[(
            "hotpatch_applies_total{op=\"apply\",outcome=\"already_applied\"}",
            1
        )])
    );

    // Refused by a check: the apply's outcome and a refusal of its kind;
    // a dry run's refusal is counted as a check's.
    let (c, h) = moved(|| assert!(hotpatch::load(&bad).is_err()));
    assert_eq!(
        c,
        counters(&[
            (
                "hotpatch_applies_total{op=\"apply\",outcome=\"rustc_mismatch\"}",
                1
            ),
            (
                "hotpatch_refusals_total{kind=\"rustc_mismatch\",op=\"apply\"}",
                1
            ),
        ])
    );
    assert!(h.is_empty(), "a refused load records no duration: {h:?}");
    let (c, _) = moved(|| assert!(hotpatch::Loader::new().check(&bad).is_err()));
    assert_eq!(
        c,
        counters(&[(
            "hotpatch_refusals_total{kind=\"rustc_mismatch\",op=\"check\"}",
            1
        )])
    );
    let (c, _) = moved(|| {
        hotpatch::Loader::new().check(&basic).unwrap_err();
    });
    assert!(
        c.is_empty(),
        "a check that finds the patch applied is no refusal: {c:?}"
    );

    let patch = patch.unwrap();
    let id = patch.id();
    let (c, h) = moved(|| patch.revert().unwrap());
    assert_eq!(
        c,
        counters(&[("hotpatch_reverts_total{outcome=\"ok\"}", 1)])
    );
    assert_eq!(h["hotpatch_revert_duration_seconds"].len(), 1);
    assert_eq!(h["hotpatch_transition_duration_seconds"].len(), 1);
    assert_eq!(gauge("hotpatch_patches_applied"), Some(0.0));
    let (c, h) = moved(|| assert!(hotpatch::revert(id).is_err()));
    assert_eq!(
        c,
        counters(&[("hotpatch_reverts_total{outcome=\"not_applied\"}", 1)])
    );
    assert!(h.is_empty(), "{h:?}");
}

#[test]
fn a_transition_records_the_threads_it_waited_for() {
    let _serial = support::serial();
    install();
    let basic = support::patch(BASIC);
    // The patcher lists the threads it waits for right after it publishes
    // the transition, which `transition()` shows just before; the worker
    // is let go 100 ms after that. Only a patcher descheduled for longer
    // than that, between two statements, would see the worker arrived
    // (and record 0): that attempt is made again, at most twice more.
    let mut attempts = Vec::new();
    for _ in 0..3 {
        let (c, h) = moved(|| {
            // A registered worker, online and not at a safepoint until told.
            let (go, wait) = mpsc::channel::<()>();
            let (ready, is_ready) = mpsc::channel::<()>();
            let worker = std::thread::Builder::new()
                .name("metrics-worker".into())
                .spawn(move || {
                    let _registered = hotpatch::register_thread();
                    ready.send(()).unwrap();
                    wait.recv().unwrap();
                    hotpatch::quiescent();
                })
                .unwrap();
            is_ready.recv().unwrap();
            let basic = basic.clone();
            let loader = std::thread::spawn(move || hotpatch::load(&basic).unwrap());
            loop {
                if let Some(t) = hotpatch::transition()
                    && t.waiting_for
                        .iter()
                        .any(|w| w.name.as_deref() == Some("metrics-worker"))
                {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            std::thread::sleep(Duration::from_millis(100));
            go.send(()).unwrap();
            let patch = loader.join().unwrap();
            // Gone, so unregistered: the revert waits for no thread.
            worker.join().unwrap();
            patch.revert().unwrap();
        });
        assert_eq!(
            c,
            counters(&[
                ("hotpatch_applies_total{op=\"apply\",outcome=\"ok\"}", 1),
                ("hotpatch_reverts_total{outcome=\"ok\"}", 1),
            ])
        );
        let waited = h["hotpatch_transition_threads_waited"].clone();
        let took = h["hotpatch_transition_duration_seconds"].clone();
        assert_eq!(took.len(), 2, "{took:?}");
        assert_eq!(waited[1], 0.0, "the revert: {waited:?}");
        assert!(waited[0] == 1.0 || waited[0] == 0.0, "{waited:?}");
        attempts.push((waited[0], took[0]));
        if waited[0] == 1.0 {
            break;
        }
    }
    // The apply waited for the worker, for as long as it was held back.
    let (waited, took) = *attempts.last().unwrap();
    assert_eq!(waited, 1.0, "{attempts:?}");
    assert!(took > 0.0, "{attempts:?}");
}

#[test]
fn rollbacks_by_panic_and_by_health_check_and_accept() {
    let _serial = support::serial();
    install();
    let loader = hotpatch::Loader::new();
    let window = hotpatch::control::Watch::new(Duration::from_secs(30));

    // A patch whose function panics, called while it is watched.
    let panicking = loader.load(support::patch(WATCH_PANIC)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let caller = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            // Relaxed: a flag read on its own.
            while !stop.load(Ordering::Relaxed) {
                let _ = std::panic::catch_unwind(svc::answer);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let mut outcome = None;
    let (c, _) = moved(|| {
        outcome = Some(hotpatch::control::watch(&loader, panicking.id(), &window).unwrap())
    });
    // Relaxed: see above.
    stop.store(true, Ordering::Relaxed);
    caller.join().unwrap();
    assert!(
        matches!(
            outcome,
            Some(hotpatch::control::WatchOutcome::RolledBack { check: None, .. })
        ),
        "{outcome:?}"
    );
    assert_eq!(
        c,
        counters(&[
            (
                "hotpatch_rollbacks_total{cause=\"panics\",outcome=\"ok\"}",
                1
            ),
            ("hotpatch_reverts_total{outcome=\"ok\"}", 1),
        ])
    );

    // A health check that fails while answer() is 2 (the basic patch).
    hotpatch::control::health_check("metrics-answer", || match svc::answer() {
        2 => Err("answer() is 2".into()),
        _ => Ok(()),
    });
    let basic = loader.load(support::patch(BASIC)).unwrap();
    let (c, _) =
        moved(|| outcome = Some(hotpatch::control::watch(&loader, basic.id(), &window).unwrap()));
    hotpatch::control::health_check("metrics-answer", || Ok(()));
    assert!(
        matches!(
            &outcome,
            Some(hotpatch::control::WatchOutcome::RolledBack { check: Some(c), .. }) if c == "metrics-answer"
        ),
        "{outcome:?}"
    );
    assert_eq!(
        c,
        counters(&[
            (
                "hotpatch_rollbacks_total{cause=\"health_check\",outcome=\"ok\"}",
                1
            ),
            ("hotpatch_reverts_total{outcome=\"ok\"}", 1),
        ])
    );
    assert_eq!(gauge("hotpatch_patches_applied"), Some(0.0));

    // Accepted patches: the record's size, set when the endpoint opens
    // its state directory and whenever the record changes.
    let dir = support::temp_dir();
    let control = hotpatch::control::Control::builder()
        .socket_dir(dir.join("sock"))
        .service_name("metrics")
        .state_dir(dir.join("state"))
        .listen()
        .unwrap();
    assert_eq!(gauge("hotpatch_patches_accepted"), Some(0.0));
    let patch = loader.load(support::patch(BASIC)).unwrap();
    let reply = ask(
        control.socket_path(),
        &format!(r#"{{"v":1,"op":"accept","patch":{}}}"#, patch.id().get()),
    );
    assert!(reply.contains(r#""ok":true"#), "{reply}");
    assert_eq!(gauge("hotpatch_patches_accepted"), Some(1.0));
    let reply = ask(
        control.socket_path(),
        &format!(r#"{{"v":1,"op":"revert","patch":{}}}"#, patch.id().get()),
    );
    assert!(reply.contains(r#""ok":true"#), "{reply}");
    assert_eq!(gauge("hotpatch_patches_accepted"), Some(0.0));
    assert_eq!(gauge("hotpatch_patches_applied"), Some(0.0));
    drop(control);
}

/// One request line to the control socket; its reply line.
fn ask(socket: &std::path::Path, line: &str) -> String {
    let mut stream = UnixStream::connect(socket).unwrap();
    writeln!(stream, "{line}").unwrap();
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply).unwrap();
    reply
}
