//! hotpatch on tokio: a settlement service on a multi-threaded runtime,
//! patched and reverted while it serves.
//!
//! `cargo run --release -p tokio-service` builds the fix
//! (`examples/tokio-fix`) into `target/tokio-fix`, starts a runtime of
//! [`WORKERS`] worker threads serving [`CONNECTIONS`] connection tasks,
//! then applies and reverts the fix [`CYCLES`] times mid-traffic, half of
//! them under full load and half with mostly idle (parked) workers.
//!
//! # How the runtime is wired
//!
//! - `on_thread_start` registers each runtime thread
//!   ([`hotpatch::register_thread`]); the guard is `!Send`, so it lives in
//!   a thread-local and `on_thread_stop` drops it.
//! - `on_thread_park` takes the thread offline ([`hotpatch::offline`]) and
//!   `on_thread_unpark` brings it back: an idle worker never holds up a
//!   patch, and it adopts the new code before it polls another task.
//! - A connection task marks a safepoint ([`hotpatch::quiescent`]) after
//!   each request.
//!
//! # What is guaranteed, and what is not
//!
//! Quiescence is per *thread*; a request is a *task*. A task runs on one
//! worker thread from one `.await` to the next, and a worker thread passes
//! safepoints only between polls (at the end of some task's request, or
//! when it parks). So:
//!
//! - **A request that does not `.await` between its patchable calls runs
//!   them all old or all new.** Its calls happen within one poll, on one
//!   thread, with no safepoint of that thread in between. The example
//!   fails if such a request ever mixes versions.
//! - **A request that `.await`s between two patchable calls is not
//!   covered.** While it is suspended its worker runs other tasks and
//!   passes their safepoints, and when it resumes it may be on another
//!   worker thread; either way the second call may run the other version.
//!   The example counts these requests (it does not hide them) and shows
//!   one. To make such a request consistent, do the patchable work of one
//!   request between two awaits (compute first, then await I/O), or pass
//!   the result of the first call to the second rather than calling both
//!   across an await.
//!
//! Either way every single call runs the old or the new implementation,
//! and a request that starts after `load` returned runs only the new code.
//!
//! It exits non-zero on anything unexpected: a refused patch, a failed
//! request, a request without an await that mixed versions, a request
//! that started after a transition ended and still ran the previous
//! version, or a result from neither version.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use tokio_service::settle::{fee_cents, fee_version, payout_cents, payout_version};

/// Worker threads of the runtime (the machine this was written on has 2
/// cores: workers are preempted, as in production).
const WORKERS: usize = 4;
/// Concurrent connection tasks, each serving requests one after another.
const CONNECTIONS: usize = 64;
/// Apply/revert cycles; the second half with mostly idle workers.
const CYCLES: usize = 20;
/// How long the fix stays applied, and reverted, in each cycle.
const DWELL: Duration = Duration::from_millis(150);
/// One request in `AWAIT_EVERY` awaits between its two calls.
const AWAIT_EVERY: u64 = 4;

/// Even: no transition in progress; odd: a load or a revert is running.
/// Bumped by the operator (the main thread) before and after each one.
static SEQ: AtomicU64 = AtomicU64::new(0);
/// Connections pause between requests (the workers mostly park).
static QUIET: AtomicBool = AtomicBool::new(false);
static STOP: AtomicBool = AtomicBool::new(false);
static THREADS_STARTED: AtomicUsize = AtomicUsize::new(0);
static PARKS: AtomicU64 = AtomicU64::new(0);

/// The version every call must run if a request saw `seq` both before its
/// first call and after its last: `None` while a transition is running.
fn version_in_force(seq: u64) -> Option<u8> {
    // 0 original, 1 loading, 2 fixed, 3 reverting, 4 = 0 again.
    match seq % 4 {
        0 => Some(1),
        2 => Some(2),
        _ => None,
    }
}

thread_local! {
    /// This runtime thread's registration (the guard is `!Send`).
    static REGISTERED: RefCell<Option<hotpatch::ThreadGuard>> = const { RefCell::new(None) };
    /// Set while this worker is parked: it is at a safepoint meanwhile.
    static PARKED: RefCell<Option<hotpatch::OfflineGuard>> = const { RefCell::new(None) };
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let next = AtomicUsize::new(0);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKERS)
        .enable_time()
        // Named threads make a stalled-thread report readable.
        .thread_name_fn(move || format!("tokio-worker-{}", next.fetch_add(1, Ordering::Relaxed)))
        // This also runs on blocking-pool threads (`spawn_blocking`,
        // `block_in_place`), which tokio never parks through
        // `on_thread_park`: a registered blocking thread idling in the pool
        // holds every load until its deadline. This service does no
        // blocking work; one that does should give it a runtime (or pool)
        // without these hooks.
        .on_thread_start(|| {
            THREADS_STARTED.fetch_add(1, Ordering::Relaxed);
            REGISTERED.set(Some(hotpatch::register_thread()));
        })
        .on_thread_stop(|| {
            PARKED.take();
            REGISTERED.take();
        })
        // No task is polled between these two hooks, so a parked worker
        // needs no safepoint: a patch goes ahead without it, and it
        // adopts the new code when it unparks, before its next poll.
        .on_thread_park(|| {
            PARKS.fetch_add(1, Ordering::Relaxed);
            PARKED.set(Some(hotpatch::offline()));
        })
        .on_thread_unpark(|| {
            PARKED.take();
        })
        .build()
}

/// What a request does between its two patchable calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pause {
    /// Nothing: both calls in one poll.
    None,
    /// `tokio::task::yield_now().await`: back of the queue, maybe stolen.
    Yield,
    /// `tokio::time::sleep(1 ms).await`: woken by the timer, anywhere.
    Sleep,
}

struct Settled {
    fee: u64,
    payout: u64,
    /// The worker thread of the first call, and of the second.
    threads: (thread::Thread, thread::Thread),
    /// `SEQ` before the first call and after the second.
    seq: (u64, u64),
}

/// One request: settle an order of `amount_cents`.
async fn settle(amount_cents: u64, pause: Pause) -> Settled {
    // Acquire: pairs with the operator's Release bump after `load` (or
    // `revert`) returned; a request that sees it runs the code in force.
    let seq_before = SEQ.load(Ordering::Acquire);
    let first = thread::current();
    let fee = fee_cents(amount_cents);
    match pause {
        Pause::None => {}
        Pause::Yield => tokio::task::yield_now().await,
        Pause::Sleep => tokio::time::sleep(Duration::from_millis(1)).await,
    }
    let payout = payout_cents(amount_cents);
    let second = thread::current();
    // Acquire: if the second call saw a dispatcher or a new slot, this
    // sees the bump made before the transition started.
    let seq_after = SEQ.load(Ordering::Acquire);
    Settled {
        fee,
        payout,
        threads: (first, second),
        seq: (seq_before, seq_after),
    }
}

/// A request that mixed versions, to show.
#[derive(Debug)]
struct MixedSample {
    amount_cents: u64,
    fee: (u64, u8),
    payout: (u64, u8),
    pause: Pause,
    threads: (String, String),
}

#[derive(Debug, Default)]
struct Stats {
    /// Requests without an await between their calls: total, mixed.
    plain: u64,
    plain_mixed: u64,
    /// Requests with an await between their calls: total, resumed on
    /// another worker, mixed, and of those mixed, resumed elsewhere.
    awaiting: u64,
    awaiting_moved: u64,
    awaiting_mixed: u64,
    awaiting_mixed_moved: u64,
    /// Requests wholly inside a phase with no transition, by version.
    stable: [u64; 3],
    /// Of those, requests that ran a version other than the one in force.
    stale: u64,
    /// Calls whose result is from neither version.
    bad: u64,
    sample: Option<MixedSample>,
    stale_sample: Option<String>,
}

impl Stats {
    fn record(&mut self, amount: u64, pause: Pause, s: &Settled) {
        let fv = fee_version(amount, s.fee);
        let pv = payout_version(amount, s.payout);
        if fv == 0 || pv == 0 {
            self.bad += 1;
            return;
        }
        let mixed = fv != pv;
        let moved = s.threads.0.id() != s.threads.1.id();
        if pause == Pause::None {
            self.plain += 1;
            self.plain_mixed += u64::from(mixed);
        } else {
            self.awaiting += 1;
            self.awaiting_moved += u64::from(moved);
            self.awaiting_mixed += u64::from(mixed);
            self.awaiting_mixed_moved += u64::from(mixed && moved);
        }
        if mixed && self.sample.is_none() {
            let name = |t: &thread::Thread| t.name().unwrap_or("<unnamed>").to_owned();
            self.sample = Some(MixedSample {
                amount_cents: amount,
                fee: (s.fee, fv),
                payout: (s.payout, pv),
                pause,
                threads: (name(&s.threads.0), name(&s.threads.1)),
            });
        }
        if s.seq.0 == s.seq.1
            && let Some(v) = version_in_force(s.seq.0)
        {
            self.stable[usize::from(v)] += 1;
            if fv != v || pv != v {
                self.stale += 1;
                self.stale_sample.get_or_insert_with(|| {
                    format!("fee v{fv}, payout v{pv} while v{v} was in force ({pause:?})")
                });
            }
        }
    }

    fn merge(&mut self, o: Stats) {
        self.plain += o.plain;
        self.plain_mixed += o.plain_mixed;
        self.awaiting += o.awaiting;
        self.awaiting_moved += o.awaiting_moved;
        self.awaiting_mixed += o.awaiting_mixed;
        self.awaiting_mixed_moved += o.awaiting_mixed_moved;
        for (a, b) in self.stable.iter_mut().zip(o.stable) {
            *a += b;
        }
        self.stale += o.stale;
        self.bad += o.bad;
        if self.sample.is_none() {
            self.sample = o.sample;
        }
        if self.stale_sample.is_none() {
            self.stale_sample = o.stale_sample;
        }
    }
}

/// xorshift64*: a cheap, deterministic request generator per connection.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// A connection: requests one after another until told to stop.
async fn connection(index: usize) -> Stats {
    let mut rng =
        Rng(0x9e37_79b9_7f4a_7c15 ^ (index as u64 + 1).wrapping_mul(0xff51_afd7_ed55_8ccd));
    let mut stats = Stats::default();
    let mut n: u64 = 0;
    while !STOP.load(Ordering::Relaxed) {
        n += 1;
        // 100.00 to 10,000.00: the two versions' fees differ by 0.50 or more.
        let amount = 10_000 + rng.below(990_000);
        let pause = match (n % AWAIT_EVERY, rng.below(2)) {
            (0, 0) => Pause::Yield,
            (0, _) => Pause::Sleep,
            _ => Pause::None,
        };
        let settled = settle(amount, pause).await;
        stats.record(amount, pause, &settled);
        // Between requests. No request of *this* task is half done, and
        // one without an await never is at a poll boundary; a suspended
        // awaiting request of another task may be (see the module docs).
        hotpatch::quiescent();
        // Waiting for the next request on the socket.
        if QUIET.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        } else {
            tokio::task::yield_now().await;
        }
    }
    stats
}

/// Builds `examples/tokio-fix` with this binary's profile into its own
/// target directory, so the outer cargo's lock on `target/` is never in
/// the way.
fn build_fix() -> Result<PathBuf, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target_dir = root.join("target").join("tokio-fix");
    let release = !cfg!(debug_assertions);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
        .args(["build", "--quiet", "-p", "tokio-fix", "--target-dir"])
        .arg(&target_dir);
    if release {
        cmd.arg("--release");
    }
    println!(
        "[build] cargo build -p tokio-fix{} --target-dir target/tokio-fix",
        if release { " --release" } else { "" }
    );
    let started = Instant::now();
    let status = cmd.status().map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err(format!("building tokio-fix failed: {status}"));
    }
    let path = target_dir
        .join(if release { "release" } else { "debug" })
        .join("libtokio_fix.so");
    let path = path
        .canonicalize()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    println!(
        "        built {} in {:.1} s\n",
        path.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(path)
}

fn money(cents: u64) -> String {
    format!("{}.{:02}", cents / 100, cents % 100)
}

fn micros(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

/// min / median / max.
fn spread(times: &mut [Duration]) -> String {
    times.sort();
    match (times.first(), times.get(times.len() / 2), times.last()) {
        (Some(min), Some(median), Some(max)) => {
            format!("{} / {} / {}", micros(*min), micros(*median), micros(*max))
        }
        _ => "-".to_owned(),
    }
}

/// An error and its sources, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !s.ends_with(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = inner.source();
    }
    s
}

#[derive(Default)]
struct Timings {
    load: Vec<Duration>,
    revert: Vec<Duration>,
}

/// The operator: applies and reverts the fix `CYCLES` times. Runs on the
/// main thread, which is not a runtime thread and is not registered, so it
/// never counts as anyone's safepoint. Returns the problems seen.
fn operate(fix: &Path, busy: &mut Timings, quiet: &mut Timings) -> Vec<String> {
    let mut problems = Vec::new();
    for cycle in 0..CYCLES {
        let quiet_phase = cycle >= CYCLES / 2;
        if cycle == CYCLES / 2 {
            println!(
                "[quiet] connections now pause 5 ms between requests: workers park (go offline)"
            );
            QUIET.store(true, Ordering::Relaxed);
        }
        let times = if quiet_phase { &mut *quiet } else { &mut *busy };
        thread::sleep(DWELL);

        // Release: a request that sees the bump sees what preceded it.
        SEQ.fetch_add(1, Ordering::Release);
        let t0 = Instant::now();
        let loaded = hotpatch::load(fix);
        let load_time = t0.elapsed();
        SEQ.fetch_add(1, Ordering::Release);
        let patch = match loaded {
            Ok(p) => p,
            Err(e) => {
                problems.push(format!("load failed: {}", chain(&e)));
                SEQ.fetch_add(2, Ordering::Release);
                continue;
            }
        };
        if cycle == 0 {
            println!(
                "[apply] hotpatch::load: {} {} {} (\"{}\") applied in {}",
                patch.id(),
                patch.name(),
                patch.version(),
                patch.description(),
                micros(load_time)
            );
            println!("        (load returns once every online worker passed a safepoint)");
        }
        times.load.push(load_time);
        thread::sleep(DWELL);

        SEQ.fetch_add(1, Ordering::Release);
        let t0 = Instant::now();
        let reverted = patch.revert();
        let revert_time = t0.elapsed();
        SEQ.fetch_add(1, Ordering::Release);
        if let Err(e) = reverted {
            problems.push(format!("revert failed: {}", chain(&e)));
            // The fix may still be applied: stop cycling.
            return problems;
        }
        if cycle == 0 {
            println!("[revert] patch.revert() in {}", micros(revert_time));
        }
        times.revert.push(revert_time);
    }
    problems
}

fn main() -> ExitCode {
    println!("hotpatch on tokio: #[patchable] handlers on a multi-threaded runtime\n");
    let fix = match build_fix() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };

    println!(
        "[serve] {WORKERS} registered worker threads, {CONNECTIONS} connection tasks; each request \
         settles an order\n        with fee_cents() then payout_cents(), which must add up to the \
         amount;\n        1 request in {AWAIT_EVERY} awaits (yield_now or a 1 ms sleep) between \
         the two calls"
    );
    let started = Instant::now();
    let connections: Vec<_> = (0..CONNECTIONS).map(|i| rt.spawn(connection(i))).collect();
    thread::sleep(Duration::from_millis(500));

    let mut busy = Timings::default();
    let mut quiet = Timings::default();
    let mut problems = operate(&fix, &mut busy, &mut quiet);
    thread::sleep(Duration::from_millis(300));
    STOP.store(true, Ordering::Relaxed);

    let mut stats = Stats::default();
    let mut panicked = 0;
    for c in connections {
        match rt.block_on(c) {
            Ok(s) => stats.merge(s),
            Err(_) => panicked += 1,
        }
    }
    let elapsed = started.elapsed();
    drop(rt);

    let total = stats.plain + stats.awaiting;
    println!(
        "\n[results] {total} requests in {:.1} s on {} runtime threads ({} parks)",
        elapsed.as_secs_f64(),
        THREADS_STARTED.load(Ordering::Relaxed),
        PARKS.load(Ordering::Relaxed)
    );
    println!(
        "  load   (busy workers | mostly parked): {} | {}   (min / median / max;\n          \
         read, map and check the file, then the transition)",
        spread(&mut busy.load),
        spread(&mut quiet.load)
    );
    println!(
        "  revert (busy workers | mostly parked): {} | {}   (the transition alone)",
        spread(&mut busy.revert),
        spread(&mut quiet.revert)
    );
    println!(
        "  requests with no await between the calls: {:>9}, mixed versions: {}   <- guaranteed 0",
        stats.plain, stats.plain_mixed
    );
    println!(
        "  requests awaiting between the calls:       {:>9}, mixed versions: {}   <- NOT guaranteed",
        stats.awaiting, stats.awaiting_mixed
    );
    println!(
        "      of the mixed, resumed on another worker: {}; on the same worker, which passed a \
         safepoint\n      (another task's request ended, or it parked) while the request was \
         suspended: {}",
        stats.awaiting_mixed_moved,
        stats.awaiting_mixed - stats.awaiting_mixed_moved
    );
    println!(
        "      (awaiting requests that resumed on another worker, mixed or not: {})",
        stats.awaiting_moved
    );
    if let Some(m) = &stats.sample {
        println!(
            "      e.g. amount {}: fee {} (v{}) on {}, then {:?}, then payout {} (v{}) on {}: \
             fee + payout = {}",
            money(m.amount_cents),
            money(m.fee.0),
            m.fee.1,
            m.threads.0,
            m.pause,
            money(m.payout.0),
            m.payout.1,
            m.threads.1,
            money(m.fee.0 + m.payout.0)
        );
    }
    println!(
        "  requests wholly outside transitions: {} on v1, {} on v2, {} on the wrong version",
        stats.stable[1], stats.stable[2], stats.stale
    );

    if stats.plain_mixed > 0 {
        problems.push(format!(
            "{} requests with no await between their calls mixed versions",
            stats.plain_mixed
        ));
    }
    if stats.stale > 0 {
        problems.push(format!(
            "{} requests ran a version not in force: {}",
            stats.stale,
            stats.stale_sample.as_deref().unwrap_or("")
        ));
    }
    if stats.bad > 0 {
        problems.push(format!(
            "{} requests got a result of neither version",
            stats.bad
        ));
    }
    if panicked > 0 {
        problems.push(format!("{panicked} connection tasks panicked"));
    }
    if stats.plain == 0 || stats.awaiting == 0 || stats.stable[1] == 0 || stats.stable[2] == 0 {
        problems.push("some kind of request was never served".to_owned());
    }
    if !hotpatch::applied().is_empty() {
        problems.push("the fix is still applied at the end".to_owned());
    }

    if problems.is_empty() {
        println!(
            "\nOK: no request without an await mixed versions; {} awaiting requests did (counted, \
             not a failure: see the module docs)",
            stats.awaiting_mixed
        );
        ExitCode::SUCCESS
    } else {
        for p in &problems {
            eprintln!("UNEXPECTED: {p}");
        }
        ExitCode::FAILURE
    }
}
