//! The hotpatch demo: a pricing service fixed while it serves.
//!
//! `cargo run --release -p demo-service` builds the fix (`examples/demo-fix`)
//! as a thin patch for this binary into a private temporary directory
//! (`build_fix`), starts worker threads that quote random orders
//! and check every answer against a reference price, then loads the fix
//! mid-traffic, shows the answers becoming right, reverts it and shows the
//! bug come back. It exits non-zero if anything unexpected happens: a
//! failed request, a wrong answer while the fix is applied, a refused
//! patch, or a bug that never showed.
//!
//! `cargo run --release -p demo-service -- --serve` instead serves until
//! Ctrl-C with the control endpoint on (`hotpatch::control`, state
//! directory `target/demo-state`), printing its error rate each second,
//! for an operator to fix it from another terminal with the `hotpatch`
//! tool, applying the file its `[fix]` line names (see the README,
//! "Operating a running service").

use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use demo_service::pricing::{self, Line, Order};

const WORKERS: usize = 4;

/// What the process is doing while a request starts. Each request is
/// counted in the phase it saw when it started.
const BEFORE: usize = 0;
const APPLYING: usize = 1;
const FIXED: usize = 2;
const REVERTING: usize = 3;
const REVERTED: usize = 4;
const PHASES: usize = 5;
const PHASE_NAMES: [&str; PHASES] = ["bug", "applying", "fixed", "reverting", "bug again"];

static PHASE: AtomicUsize = AtomicUsize::new(BEFORE);
static STOP: AtomicBool = AtomicBool::new(false);
/// The first wrong answer of each phase, to show.
static SAMPLES: [OnceLock<Sample>; PHASES] = [const { OnceLock::new() }; PHASES];

#[derive(Debug)]
struct Sample {
    order: Order,
    quoted: u64,
    correct: u64,
}

#[derive(Default)]
struct Counts {
    requests: AtomicU64,
    wrong: AtomicU64,
    failed: AtomicU64,
}

/// One worker's counters, written by that worker only (Relaxed: they are
/// read for reporting; the final read happens after the join).
#[derive(Default)]
#[repr(align(128))]
struct WorkerCounts([Counts; PHASES]);

#[derive(Clone, Copy, Default)]
struct Totals {
    requests: u64,
    wrong: u64,
    failed: u64,
}

fn totals(workers: &[WorkerCounts], phase: usize) -> Totals {
    let mut t = Totals::default();
    for w in workers {
        let c = &w.0[phase];
        t.requests += c.requests.load(Ordering::Relaxed);
        t.wrong += c.wrong.load(Ordering::Relaxed);
        t.failed += c.failed.load(Ordering::Relaxed);
    }
    t
}

/// xorshift64*: a cheap, deterministic request generator per worker.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn order(&mut self, id: u64) -> Order {
        let lines = (0..1 + self.below(4))
            .map(|_| {
                // Mostly small quantities; one line in ten is a bulk line.
                let qty = match self.below(10) {
                    0..=5 => 1 + self.below(9),
                    6..=8 => 10 + self.below(90),
                    _ => 100 + self.below(400),
                } as u32;
                Line {
                    qty,
                    unit_cents: 50 + self.below(20_000),
                }
            })
            .collect();
        Order { id, lines }
    }
}

/// What the price list says an order costs, computed without the service.
fn reference_price(order: &Order) -> u64 {
    let goods: u64 = order
        .lines
        .iter()
        .map(|l| {
            let subtotal = u64::from(l.qty) * l.unit_cents;
            let percent = match l.qty {
                0..=9 => 0,
                10..=99 => 5,
                _ => 10,
            };
            subtotal - subtotal * percent / 100
        })
        .sum();
    let shipping = if goods >= 5_000 { 0 } else { 490 };
    goods + shipping
}

fn worker(index: usize, counts: &WorkerCounts) {
    let mut rng =
        Rng(0x9e37_79b9_7f4a_7c15 ^ (index as u64 + 1).wrapping_mul(0xff51_afd7_ed55_8ccd));
    let mut id = (index as u64) << 48;
    while !STOP.load(Ordering::Relaxed) {
        // Acquire: pairs with the Release store made after `load` (or
        // `revert`) returned, so a request that sees FIXED runs the fix.
        let started = PHASE.load(Ordering::Acquire);
        id += 1;
        let order = rng.order(id);
        let correct = reference_price(&order);
        let result = panic::catch_unwind(AssertUnwindSafe(|| pricing::quote(&order)));
        // A request still running when the phase changed was in flight
        // during the load or the revert: it may have run old or new code.
        let ended = PHASE.load(Ordering::Relaxed);
        let phase = match started {
            BEFORE if ended != BEFORE => APPLYING,
            FIXED if ended != FIXED => REVERTING,
            _ => started,
        };
        let c = &counts.0[phase];
        c.requests.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(quoted) if quoted == correct => {}
            Ok(quoted) => {
                c.wrong.fetch_add(1, Ordering::Relaxed);
                // Show a one-line bulk order: the plainest case.
                if order.lines.len() == 1 && order.lines[0].qty >= 100 {
                    let _ = SAMPLES[phase].set(Sample {
                        order,
                        quoted,
                        correct,
                    });
                }
            }
            Err(_) => {
                c.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// `1234567` as `1,234,567`.
fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, d) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(d);
    }
    out
}

fn money(cents: u64) -> String {
    format!("{}.{:02}", count(cents / 100), cents % 100)
}

/// An error and its sources, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        // Some messages already end with their source's.
        let text = inner.to_string();
        if !s.ends_with(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = inner.source();
    }
    s
}

fn duration(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 10_000.0 {
        format!("{us:.1} µs")
    } else {
        format!("{:.1} ms", us / 1e3)
    }
}

fn report(workers: &[WorkerCounts], phase: usize, elapsed: Duration) -> Totals {
    let t = totals(workers, phase);
    println!(
        "  {} requests in {:.1} s ({}/s), {} wrong ({:.1} %), {} failed",
        count(t.requests),
        elapsed.as_secs_f64(),
        count((t.requests as f64 / elapsed.as_secs_f64()) as u64),
        count(t.wrong),
        100.0 * t.wrong as f64 / t.requests.max(1) as f64,
        count(t.failed)
    );
    t
}

fn show_sample(phase: usize) {
    let Some(s) = SAMPLES[phase].get() else {
        return;
    };
    let lines: Vec<String> = s
        .order
        .lines
        .iter()
        .map(|l| format!("{} x {}", l.qty, money(l.unit_cents)))
        .collect();
    println!(
        "  e.g. order {:#x} ({}): quoted {}, should be {}",
        s.order.id,
        lines.join(", "),
        money(s.quoted),
        money(s.correct)
    );
}

fn show_functions() {
    println!("  hotpatch::functions():");
    for f in hotpatch::functions() {
        let now = match &f.implementation {
            hotpatch::Implementation::Original => "original".to_owned(),
            hotpatch::Implementation::Patch { id, name } => format!("{id} ({name})"),
            other => format!("{other:?}"),
        };
        println!("    {:<42} {}", f.path, now);
    }
    let applied = hotpatch::applied();
    println!(
        "  hotpatch::applied():{}",
        if applied.is_empty() { " none" } else { "" }
    );
    for p in applied {
        println!(
            "    {} {} {} \"{}\" replaces {}",
            p.id,
            p.name,
            p.version,
            p.description,
            p.functions.join(", ")
        );
    }
}

/// Builds `examples/demo-fix` as a thin patch for this very binary, as
/// `cargo hotpatch build` does: runs the tool (`cargo run -p
/// cargo-hotpatch -- hotpatch build -p demo-fix --binary <this binary>`)
/// in this binary's target directory, so cargo reuses the service's own
/// artifacts (same features, so the symbol names this binary exports),
/// and writes the patch as `demo_fix.so` in a new private directory.
///
/// The patch is mode 0644 in a 0700 directory of the temporary directory:
/// cargo's output and the checkout's directories are group-writable under
/// umask 002 (the default for users on many distributions), which the
/// default trust policy of `hotpatch::load` refuses.
fn build_fix() -> Result<PathBuf, String> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    // target/<profile>/demo-service: the target directory is two up.
    let target_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| format!("{} is not in a target directory", exe.display()))?
        .to_owned();
    let release = !cfg!(debug_assertions);
    let dir = std::env::temp_dir().join(format!("hotpatch-demo-{}", std::process::id()));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let out = dir.join("demo_fix.so");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
        // Both cargo runs (the tool's and the one it makes) use this
        // binary's target directory.
        .env("CARGO_TARGET_DIR", &target_dir)
        .args(["run", "--release", "-q", "-p", "cargo-hotpatch", "--"])
        .args(["hotpatch", "build", "-p", "demo-fix", "--binary"])
        .arg(&exe);
    if release {
        cmd.arg("--release");
    }
    cmd.arg("-o").arg(&out);
    println!(
        "[build] cargo run --release -q -p cargo-hotpatch -- hotpatch build -p demo-fix --binary {}{} -o {}",
        exe.display(),
        if release { " --release" } else { "" },
        out.display()
    );
    let started = Instant::now();
    let status = cmd.status().map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err(format!("building demo-fix failed: {status}"));
    }
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o644))
        .map_err(|e| format!("cannot set the mode of {}: {e}", out.display()))?;
    let size = std::fs::metadata(&out)
        .map_err(|e| format!("{} was not built: {e}", out.display()))?
        .len();
    println!(
        "        built {} ({:.1} KB, a thin patch) in {:.1} s\n",
        out.display(),
        size as f64 / 1024.0,
        started.elapsed().as_secs_f64()
    );
    Ok(out)
}

fn wait(d: Duration) -> Instant {
    let started = Instant::now();
    thread::sleep(d);
    started
}

/// The script the operator plays while the workers serve. Returns the
/// problems seen.
fn script(workers: &[WorkerCounts], fix: &Path) -> Vec<String> {
    let mut problems = Vec::new();

    println!(
        "[serve] {WORKERS} worker threads quote random orders through #[patchable] functions;"
    );
    println!("        every answer is checked against the price list (bulk discount 5 % / 10 %)");
    println!("\n[before] demo_service::pricing::apply_discount has the bug");
    let started = Instant::now();
    thread::sleep(Duration::from_secs(4));
    let before = report(workers, BEFORE, started.elapsed());
    show_sample(BEFORE);
    if before.wrong == 0 {
        problems.push("the bug never showed before the fix".to_owned());
    }

    // A file that is not a patch is refused and changes nothing.
    let not_a_patch = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    match hotpatch::load(&not_a_patch) {
        Ok(_) => problems.push("a file that is not a patch was applied".to_owned()),
        Err(e) => println!(
            "\n[check] a file that is not a patch is refused, and nothing changes:\n  \
             hotpatch::load(\"examples/demo-service/Cargo.toml\"): {}",
            chain(&e)
        ),
    }
    if hotpatch::functions()
        .iter()
        .any(|f| f.implementation != hotpatch::Implementation::Original)
    {
        problems.push("a refused load changed a function".to_owned());
    }

    println!(
        "\n[apply] hotpatch::load(\"{}\") while the workers serve",
        fix.display()
    );
    // Release: a worker that sees the new phase also sees what `load` did.
    PHASE.store(APPLYING, Ordering::Release);
    let t0 = Instant::now();
    let loaded = hotpatch::load(fix);
    let load_time = t0.elapsed();
    PHASE.store(FIXED, Ordering::Release);
    let patch = match loaded {
        Ok(p) => p,
        Err(e) => {
            problems.push(format!("the fix was refused: {e}"));
            return problems;
        }
    };
    println!(
        "  applied {} {} {} (\"{}\") in {}",
        patch.id(),
        patch.name(),
        patch.version(),
        patch.description(),
        duration(load_time)
    );
    println!("  (read the file, map a private copy, check the manifest, swap the slot)");

    println!("\n[after] the fix is live");
    let started = wait(Duration::from_secs(4));
    let applying = totals(workers, APPLYING);
    let fixed = report(workers, FIXED, started.elapsed());
    println!(
        "  {} requests were in flight during the load; each call ran the old or the new code",
        count(applying.requests)
    );
    show_sample(FIXED);
    if fixed.wrong > 0 {
        problems.push(format!(
            "{} wrong answers with the fix applied",
            fixed.wrong
        ));
    }
    if fixed.requests == 0 {
        problems.push("no request served with the fix applied".to_owned());
    }
    show_functions();

    println!("\n[revert] patch.revert()");
    PHASE.store(REVERTING, Ordering::Release);
    let t0 = Instant::now();
    let reverted = patch.revert();
    let revert_time = t0.elapsed();
    PHASE.store(REVERTED, Ordering::Release);
    if let Err(e) = reverted {
        problems.push(format!("revert failed: {e}"));
        return problems;
    }
    println!(
        "  reverted in {}: the original code is back, bug included",
        duration(revert_time)
    );
    let started = wait(Duration::from_secs(3));
    let again = report(workers, REVERTED, started.elapsed());
    println!(
        "  {} requests were in flight during the revert",
        count(totals(workers, REVERTING).requests)
    );
    show_sample(REVERTED);
    if again.wrong == 0 {
        problems.push("the bug did not come back after revert".to_owned());
    }
    if !hotpatch::applied().is_empty() {
        problems.push("a patch is still applied after revert".to_owned());
    }
    problems
}

/// Blocks SIGINT and SIGTERM in this thread (and the threads it starts
/// later) and returns a thread that sets `STOP` when one arrives, so the
/// endpoint is dropped (its socket removed) on Ctrl-C.
fn stop_on_signal() -> thread::JoinHandle<()> {
    // SAFETY: a sigset_t is plain data; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; SIGINT and SIGTERM are valid
    // signals; pthread_sigmask changes only this thread's mask.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    thread::spawn(move || {
        let mut signal = 0;
        // SAFETY: `set` is initialised and blocked in every thread of the
        // process started after the mask was set; `signal` is writable.
        unsafe { libc::sigwait(&set, &mut signal) };
        STOP.store(true, Ordering::Relaxed);
    })
}

/// `--serve`: the workers quote until Ctrl-C, with the control endpoint on.
fn serve() -> ExitCode {
    let signals = stop_on_signal();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let root = root.canonicalize().unwrap_or(root);
    match build_fix() {
        Ok(p) => println!(
            "[fix]   {} (not applied: apply it with `hotpatch`)",
            p.display()
        ),
        Err(e) => eprintln!("warning: the fix was not built: {e}"),
    }
    let state = root.join("target").join("demo-state");
    let control = match hotpatch::control::Control::builder()
        .service_name("demo-service")
        .state_dir(&state)
        .listen()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: cannot start the control endpoint: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("[control] {}", control.socket_path().display());
    println!("[state]   accepted patches in {}", state.display());
    for p in hotpatch::applied() {
        println!(
            "[restore] {} {} {} is back (accepted)",
            p.id, p.name, p.version
        );
    }
    println!(
        "[serve] {WORKERS} worker threads quote random orders, each answer checked; Ctrl-C stops\n"
    );
    let workers: Vec<WorkerCounts> = (0..WORKERS).map(|_| WorkerCounts::default()).collect();
    thread::scope(|s| {
        for (i, counts) in workers.iter().enumerate() {
            s.spawn(move || worker(i, counts));
        }
        let mut last = Totals::default();
        let started = Instant::now();
        while !STOP.load(Ordering::Relaxed) {
            // Short sleeps so Ctrl-C is answered at once.
            let tick = Instant::now();
            while tick.elapsed() < Duration::from_secs(1) && !STOP.load(Ordering::Relaxed) {
                thread::sleep(Duration::from_millis(50));
            }
            let now = totals(&workers, BEFORE);
            let requests = now.requests - last.requests;
            let bad = (now.wrong - last.wrong) + (now.failed - last.failed);
            last = now;
            let patches: Vec<String> = hotpatch::applied()
                .iter()
                .map(|p| format!("#{} {}", p.id.get(), p.name))
                .collect();
            println!(
                "[{:>5.0} s] {:>10} requests  error rate {:>6.2} %  patches: {}",
                started.elapsed().as_secs_f64(),
                count(requests),
                if requests == 0 {
                    0.0
                } else {
                    bad as f64 * 100.0 / requests as f64
                },
                if patches.is_empty() {
                    "none".to_owned()
                } else {
                    patches.join(", ")
                }
            );
        }
    });
    drop(control);
    let _ = signals.join();
    println!("\nstopped");
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    if std::env::args().any(|a| a == "--serve") {
        return serve();
    }
    println!("hotpatch demo: a pricing service with a discount bug, fixed while it serves\n");
    let fix = match build_fix() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };

    let workers: Vec<WorkerCounts> = (0..WORKERS).map(|_| WorkerCounts::default()).collect();
    let mut problems = thread::scope(|s| {
        for (i, counts) in workers.iter().enumerate() {
            s.spawn(move || worker(i, counts));
        }
        let problems = script(&workers, &fix);
        STOP.store(true, Ordering::Relaxed);
        problems
    });

    println!("\n[totals]");
    let mut all = Totals::default();
    for (phase, name) in PHASE_NAMES.iter().enumerate() {
        let t = totals(&workers, phase);
        println!(
            "  {name:<10} {:>12} requests {:>12} wrong {:>4} failed",
            count(t.requests),
            count(t.wrong),
            count(t.failed)
        );
        all.requests += t.requests;
        all.wrong += t.wrong;
        all.failed += t.failed;
    }
    println!(
        "  {:<10} {:>12} requests {:>12} wrong {:>4} failed",
        "all",
        count(all.requests),
        count(all.wrong),
        count(all.failed)
    );
    // Every request that started after `load` returned and ended before
    // `revert` began ran the fix.
    let fixed = totals(&workers, FIXED);
    if fixed.wrong > 0 {
        problems.push(format!(
            "{} wrong answers with the fix applied",
            fixed.wrong
        ));
    }
    if all.failed > 0 {
        problems.push(format!("{} requests failed", all.failed));
    }
    // The loader mapped its own copy; the demo's copy can go.
    if let Some(dir) = fix.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }

    if problems.is_empty() {
        println!(
            "\nOK: {} requests served, 0 failed; wrong answers only while the bug was live",
            count(all.requests)
        );
        ExitCode::SUCCESS
    } else {
        for p in &problems {
            eprintln!("UNEXPECTED: {p}");
        }
        ExitCode::FAILURE
    }
}
