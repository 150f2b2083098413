//! The example's traffic and its checks: a runtime of registered worker
//! threads serving connection tasks, an operator applying and reverting
//! the fix mid-traffic, and the count of requests that mixed versions.
//! The binary runs it at full length and prints it; the crate's tests run
//! a short form (`tests/guarantees.rs`).
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
//!   thread, with no safepoint of that thread in between. [`run`] reports
//!   a problem if such a request ever mixes versions.
//! - **A request that `.await`s between two patchable calls is not
//!   covered.** While it is suspended its worker runs other tasks and
//!   passes their safepoints, and when it resumes it may be on another
//!   worker thread; either way the second call may run the other version.
//!   [`Stats`] counts these requests (it does not hide them) and keeps one.
//!   To make such a request consistent, do the patchable work of one
//!   request between two awaits (compute first, then await I/O), or pass
//!   the result of the first call to the second rather than calling both
//!   across an await.
//!
//! - **A request in a request scope ([`hotpatch::request`]) runs one
//!   version across its `.await`s**, on whichever worker resumes it: the
//!   version current when it started. [`Stats`] counts scoped awaiting
//!   requests apart, and [`run`] reports a problem if one mixes. Half of
//!   the awaiting requests are scoped; the other half are the control.
//!
//! Either way every single call runs the old or the new implementation,
//! and a request that starts after `load` returned runs only the new code.
//!
//! [`run`] uses process-wide state: one run at a time per process.

use std::cell::RefCell;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::settle::{fee_cents, fee_version, payout_cents, payout_version};

/// How a run is shaped.
#[derive(Clone, Debug)]
pub struct Config {
    /// Worker threads of the runtime.
    pub workers: usize,
    /// Concurrent connection tasks, each serving requests one after another.
    pub connections: usize,
    /// Apply/revert cycles; the second half with mostly idle workers.
    pub cycles: usize,
    /// How long the fix stays applied, and reverted, in each cycle (and
    /// the traffic runs before the first cycle)...
    pub dwell: Duration,
    /// ... and at least this many requests complete in each of those
    /// phases, however long that takes.
    pub dwell_requests: u64,
    /// One request in `await_every` awaits between its two calls.
    pub await_every: u64,
}

/// A phase that serves fewer than [`Config::dwell_requests`] requests in
/// this long is reported as a hang.
const HANG: Duration = Duration::from_secs(60);

/// Even: no transition in progress; odd: a load or a revert is running.
/// Bumped by the operator before and after each one.
static SEQ: AtomicU64 = AtomicU64::new(0);
/// Connections pause between requests (the workers mostly park).
static QUIET: AtomicBool = AtomicBool::new(false);
static STOP: AtomicBool = AtomicBool::new(false);
static THREADS_STARTED: AtomicUsize = AtomicUsize::new(0);
static PARKS: AtomicU64 = AtomicU64::new(0);
/// Requests that completed, counted by [`settle`] apart from [`Stats`].
static SERVED: AtomicU64 = AtomicU64::new(0);

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

fn runtime(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let next = AtomicUsize::new(0);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_time()
        // Named threads make a stalled-thread report readable.
        // Relaxed: only uniqueness of the names matters.
        .thread_name_fn(move || format!("tokio-worker-{}", next.fetch_add(1, Ordering::Relaxed)))
        // This also runs on blocking-pool threads (`spawn_blocking`,
        // `block_in_place`), which tokio never parks through
        // `on_thread_park`: a registered blocking thread idling in the pool
        // holds every load until its deadline. This service does no
        // blocking work; one that does should give it a runtime (or pool)
        // without these hooks.
        .on_thread_start(|| {
            // Relaxed: a statistic.
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
            // Relaxed: a statistic.
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
pub enum Pause {
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
    // Relaxed: a count of completed requests (progress, and the total
    // that [`Stats`] must match), read after the tasks were joined.
    SERVED.fetch_add(1, Ordering::Relaxed);
    Settled {
        fee,
        payout,
        threads: (first, second),
        seq: (seq_before, seq_after),
    }
}

/// A request that mixed versions, to show.
#[derive(Debug)]
pub struct MixedSample {
    pub amount_cents: u64,
    /// The fee, and the version that computed it.
    pub fee: (u64, u8),
    /// The payout, and the version that computed it.
    pub payout: (u64, u8),
    pub pause: Pause,
    /// The worker of the first call, and of the second.
    pub threads: (String, String),
}

/// What the requests of a run saw.
#[derive(Debug, Default)]
pub struct Stats {
    /// Requests without an await between their calls: total, mixed.
    pub plain: u64,
    pub plain_mixed: u64,
    /// Requests with an await between their calls: total, resumed on
    /// another worker, mixed, and of those mixed, resumed elsewhere.
    pub awaiting: u64,
    pub awaiting_moved: u64,
    pub awaiting_mixed: u64,
    pub awaiting_mixed_moved: u64,
    /// Awaiting requests in a request scope: total, resumed on another
    /// worker, mixed (must be 0). Counted in `awaiting` too.
    pub scoped: u64,
    pub scoped_moved: u64,
    pub scoped_mixed: u64,
    /// Requests wholly inside a phase with no transition, by version.
    pub stable: [u64; 3],
    /// Of those, requests that ran a version other than the one in force.
    pub stale: u64,
    /// Calls whose result is from neither version.
    pub bad: u64,
    pub sample: Option<MixedSample>,
    pub stale_sample: Option<String>,
}

impl Stats {
    fn record(&mut self, amount: u64, pause: Pause, scoped: bool, s: &Settled) {
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
            if scoped {
                self.scoped += 1;
                self.scoped_moved += u64::from(moved);
                self.scoped_mixed += u64::from(mixed);
            }
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
        self.scoped += o.scoped;
        self.scoped_moved += o.scoped_moved;
        self.scoped_mixed += o.scoped_mixed;
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

    /// Every request whose result was recorded.
    pub fn total(&self) -> u64 {
        self.plain + self.awaiting + self.bad
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
async fn connection(index: usize, await_every: u64) -> Stats {
    let mut rng =
        Rng(0x9e37_79b9_7f4a_7c15 ^ (index as u64 + 1).wrapping_mul(0xff51_afd7_ed55_8ccd));
    let mut stats = Stats::default();
    let mut n: u64 = 0;
    // Relaxed: a stop flag; the operator joins the tasks afterwards.
    while !STOP.load(Ordering::Relaxed) {
        n += 1;
        // 100.00 to 10,000.00: the two versions' fees differ by 0.50 or more.
        let amount = 10_000 + rng.below(990_000);
        let pause = match (n % await_every, rng.below(2)) {
            (0, 0) => Pause::Yield,
            (0, _) => Pause::Sleep,
            _ => Pause::None,
        };
        // Every other awaiting request is a request scope; the rest are
        // the control.
        let scoped = pause != Pause::None && (n / await_every).is_multiple_of(2);
        let settled = if scoped {
            hotpatch::request(settle(amount, pause)).await
        } else {
            settle(amount, pause).await
        };
        stats.record(amount, pause, scoped, &settled);
        // Between requests. No request of *this* task is half done, and
        // one without an await never is at a poll boundary; a suspended
        // awaiting request of another task may be (see the module docs).
        hotpatch::quiescent();
        // Waiting for the next request on the socket.
        // Relaxed: a pacing hint, no data depends on it.
        if QUIET.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        } else {
            tokio::task::yield_now().await;
        }
    }
    stats
}

/// An error and its sources, on one line.
pub fn chain(e: &dyn std::error::Error) -> String {
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

/// How long each load and revert took.
#[derive(Debug, Default)]
pub struct Timings {
    pub load: Vec<Duration>,
    pub revert: Vec<Duration>,
}

/// The first load of a run, to show.
#[derive(Debug)]
pub struct FirstLoad {
    pub id: String,
    pub name: String,
    pub version: String,
    pub description: String,
    pub load: Duration,
    pub revert: Option<Duration>,
}

/// What a run saw. `problems` is empty if every guarantee held.
#[derive(Debug, Default)]
pub struct Report {
    pub stats: Stats,
    /// Requests that completed (counted apart from [`Stats`]).
    pub served: u64,
    /// Loads and reverts with busy workers, and with mostly parked ones.
    pub busy: Timings,
    pub quiet: Timings,
    pub first: Option<FirstLoad>,
    pub elapsed: Duration,
    pub threads_started: usize,
    pub parks: u64,
    pub problems: Vec<String>,
}

/// Waits `config.dwell` and for `config.dwell_requests` more requests.
fn dwell(config: &Config) -> Result<(), String> {
    // Relaxed: a progress count; nothing is read through it.
    let from = SERVED.load(Ordering::Relaxed);
    let started = Instant::now();
    thread::sleep(config.dwell);
    while SERVED.load(Ordering::Relaxed) - from < config.dwell_requests {
        if started.elapsed() > HANG {
            return Err(format!(
                "hang: fewer than {} requests in {HANG:?}",
                config.dwell_requests
            ));
        }
        thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// The operator: applies and reverts the fix `config.cycles` times. Runs
/// on the calling thread, which is not a runtime thread and is not
/// registered, so it never counts as anyone's safepoint.
fn operate(config: &Config, fix: &Path, report: &mut Report) {
    for cycle in 0..config.cycles {
        let quiet_phase = cycle >= config.cycles / 2;
        if cycle == config.cycles / 2 {
            // Relaxed: see `connection`.
            QUIET.store(true, Ordering::Relaxed);
        }
        if let Err(e) = dwell(config) {
            report.problems.push(e);
            return;
        }

        // Release: a request that sees the bump sees what preceded it.
        SEQ.fetch_add(1, Ordering::Release);
        let t0 = Instant::now();
        let loaded = hotpatch::load(fix);
        let load_time = t0.elapsed();
        // Release: as above.
        SEQ.fetch_add(1, Ordering::Release);
        let patch = match loaded {
            Ok(p) => p,
            Err(e) => {
                report.problems.push(format!("load failed: {}", chain(&e)));
                // Release: as above (skips the revert's two bumps).
                SEQ.fetch_add(2, Ordering::Release);
                continue;
            }
        };
        if report.first.is_none() {
            report.first = Some(FirstLoad {
                id: patch.id().to_string(),
                name: patch.name().to_owned(),
                version: patch.version().to_owned(),
                description: patch.description().to_owned(),
                load: load_time,
                revert: None,
            });
        }
        let times = if quiet_phase {
            &mut report.quiet
        } else {
            &mut report.busy
        };
        times.load.push(load_time);
        let dwelt = dwell(config);

        // Release: as above.
        SEQ.fetch_add(1, Ordering::Release);
        let t0 = Instant::now();
        let reverted = patch.revert();
        let revert_time = t0.elapsed();
        // Release: as above.
        SEQ.fetch_add(1, Ordering::Release);
        if let Err(e) = reverted {
            report
                .problems
                .push(format!("revert failed: {}", chain(&e)));
            // The fix may still be applied: stop cycling.
            return;
        }
        if let Some(first) = report.first.as_mut() {
            first.revert.get_or_insert(revert_time);
        }
        let times = if quiet_phase {
            &mut report.quiet
        } else {
            &mut report.busy
        };
        times.revert.push(revert_time);
        if let Err(e) = dwelt {
            report.problems.push(e);
            return;
        }
    }
}

/// Serves traffic on a new runtime while applying and reverting `fix`
/// (`tokio-fix`) `config.cycles` times, then stops, collects every
/// connection's [`Stats`] and checks the guarantees.
///
/// # Errors
///
/// The runtime could not be started.
pub fn run(config: &Config, fix: &Path) -> std::io::Result<Report> {
    // Relaxed: no task runs yet.
    STOP.store(false, Ordering::Relaxed);
    QUIET.store(false, Ordering::Relaxed);
    SERVED.store(0, Ordering::Relaxed);
    SEQ.store(0, Ordering::Relaxed);
    let rt = runtime(config.workers)?;
    let mut report = Report::default();
    let started = Instant::now();
    let await_every = config.await_every.max(1);
    let connections: Vec<_> = (0..config.connections)
        .map(|i| rt.spawn(connection(i, await_every)))
        .collect();
    if let Err(e) = dwell(config) {
        report.problems.push(e);
    } else {
        operate(config, fix, &mut report);
    }
    if let Err(e) = dwell(config) {
        report.problems.push(e);
    }
    // Relaxed: the tasks are joined below.
    STOP.store(true, Ordering::Relaxed);

    let mut panicked = 0;
    for c in connections {
        match rt.block_on(c) {
            Ok(s) => report.stats.merge(s),
            Err(_) => panicked += 1,
        }
    }
    report.elapsed = started.elapsed();
    drop(rt);
    // Relaxed: every task was joined, and the runtime's threads with it.
    report.served = SERVED.load(Ordering::Relaxed);
    report.threads_started = THREADS_STARTED.load(Ordering::Relaxed);
    report.parks = PARKS.load(Ordering::Relaxed);

    let stats = &report.stats;
    let mut problems = Vec::new();
    if stats.plain_mixed > 0 {
        problems.push(format!(
            "{} requests with no await between their calls mixed versions",
            stats.plain_mixed
        ));
    }
    if stats.scoped_mixed > 0 {
        problems.push(format!(
            "{} scoped requests mixed versions across an await",
            stats.scoped_mixed
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
    if report.served != stats.total() {
        problems.push(format!(
            "{} requests completed but {} results were checked",
            report.served,
            stats.total()
        ));
    }
    if panicked > 0 {
        problems.push(format!("{panicked} connection tasks panicked"));
    }
    if stats.plain == 0
        || stats.awaiting == stats.scoped
        || stats.scoped == 0
        || stats.stable[1] == 0
        || stats.stable[2] == 0
    {
        problems.push("some kind of request was never served".to_owned());
    }
    if !hotpatch::applied().is_empty() {
        problems.push("the fix is still applied at the end".to_owned());
    }
    report.problems.extend(problems);
    Ok(report)
}
