//! A host process of `gen-svc-N`, driven by `benches/apply.rs` and
//! `benches/scale.rs`.
//!
//! `gen-host-N first-call`: a fresh process times its first and second
//! calls of a patchable function (`mid`) and of a plain one, one line of
//! nanoseconds: `patchable_first patchable_second plain_first plain_second`.
//!
//! `gen-host-N first-functions`: the first `functions()` (which builds the
//! runtime's registry) and the second: `first second`.
//!
//! `gen-host-N serve`: reads commands from stdin, one per line, and answers
//! each with one line of total nanoseconds:
//! - `apply PATH ITERS`: ITERS times load PATH and revert it (the same
//!   bytes each time: the library is opened once and then reused); answers
//!   `apply_ns revert_ns`.
//! - `apply-new PATH ITERS`: the same, but each load is of a fresh copy
//!   of PATH with a different trailing byte, so every load reads, copies
//!   and `dlopen`s a new library (as a new patch does); answers
//!   `apply_ns revert_ns`. Copying happens outside the timed part. Each
//!   library stays mapped (hotpatch never unloads).
//! - `dlopen-new PATH ITERS`: only `dlopen` (RTLD_NOW) of fresh copies:
//!   the loader's share of `apply-new`.
//! - `functions ITERS`: ITERS calls of `hotpatch::functions()`.
//! - `call ITERS`: ITERS calls of the patchable `mid`.
//! - `workers MODE K`: stops the worker threads started by the previous
//!   `workers` command and answers `requests bad` for them (requests
//!   completed, and requests that saw a function change version half-way
//!   or return neither version: must be 0); then starts K workers in MODE
//!   and returns once all of them run (`benches/quiescence.rs`). Each
//!   worker serves "requests" of 96 patchable calls (32 rounds of `first`,
//!   `mid`, `last`), then calls `hotpatch::quiescent()`. MODE:
//!   - `busy`: registered, never blocks;
//!   - `blocking`: registered, sleeps 10 µs (asked; the kernel's timer
//!     slack makes it ~60 µs) after each request, online, like a
//!     server waiting for I/O without telling hotpatch;
//!   - `offline`: the same sleep inside `hotpatch::while_offline`;
//!   - `unregistered`: not registered, never blocks (CPU contention only);
//!   - `none`: no workers.
//! - `apply-each PATH ITERS`: as `apply`, but answers 4 × ITERS + 1
//!   numbers: each load's nanoseconds, each revert's, then for each load
//!   and each revert the time from its call to the last worker's first
//!   request on the new version (when the workers switched, as opposed to
//!   when `load` noticed; 0 without workers), then how many times a worker
//!   ran no request at all on a version (an offline worker can sleep
//!   through a load and its revert); those are left out of the maximum.

use std::hint::black_box;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, LazyLock, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    match mode.as_str() {
        "first-call" => first_call(),
        "first-functions" => first_functions(),
        "serve" => serve(),
        _ => {
            eprintln!("usage: gen-host-N first-call | first-functions | serve");
            std::process::exit(2);
        }
    }
}

fn first_call() {
    // Fault in the clock's code and data before the timed calls.
    black_box(Instant::now().elapsed());
    let t = Instant::now();
    black_box(gen_svc::mid(black_box(3)));
    let first = t.elapsed();
    let t = Instant::now();
    black_box(gen_svc::mid(black_box(4)));
    let second = t.elapsed();
    let t = Instant::now();
    black_box(gen_svc::plain(black_box(3)));
    let plain_first = t.elapsed();
    let t = Instant::now();
    black_box(gen_svc::plain(black_box(4)));
    let plain_second = t.elapsed();
    println!(
        "{} {} {} {}",
        first.as_nanos(),
        second.as_nanos(),
        plain_first.as_nanos(),
        plain_second.as_nanos()
    );
}

fn first_functions() {
    black_box(Instant::now().elapsed());
    let t = Instant::now();
    let n = black_box(hotpatch::functions()).len();
    let first = t.elapsed();
    let t = Instant::now();
    black_box(hotpatch::functions());
    let second = t.elapsed();
    assert_eq!(n, gen_svc::N);
    println!("{} {}", first.as_nanos(), second.as_nanos());
}

/// A copy of `path` whose bytes differ from every other copy's: ELF
/// loaders ignore bytes past the last section, so it loads as the same
/// library but is a new one to hotpatch's by-content cache and to dlopen.
fn fresh_copy(path: &Path, bytes: &[u8], n: u64) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hotpatch-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join(format!(
        "{n}-{}",
        path.file_name().unwrap().to_string_lossy()
    ));
    let mut b = bytes.to_vec();
    b.extend_from_slice(&n.to_le_bytes());
    b.extend_from_slice(&std::process::id().to_le_bytes());
    std::fs::write(&copy, b).unwrap();
    copy
}

fn load_revert(path: &Path) -> (Duration, Duration) {
    let t = Instant::now();
    let patch = hotpatch::load(path).unwrap_or_else(|e| panic!("load {}: {e}", path.display()));
    let apply = t.elapsed();
    // The patch adds 1 to each function it replaces, f0 included.
    assert_eq!(
        gen_svc::first(7),
        7u64.wrapping_mul(0x9E37_79B9_7F4A_7C15) + 1
    );
    let t = Instant::now();
    patch.revert().unwrap();
    let revert = t.elapsed();
    (apply, revert)
}

fn serve() {
    // Build the runtime's registry now (it is built on first use), so the
    // first timed load does not pay for it; `first-functions` measures it.
    black_box(hotpatch::functions());
    let mut fresh = 0u64;
    let mut workers = Workers::start("none", 0);
    let stdin = std::io::stdin();
    let mut out = std::io::stdout().lock();
    for line in stdin.lock().lines() {
        let line = line.unwrap();
        let words: Vec<&str> = line.split_whitespace().collect();
        let iters = |i: usize| words[i].parse::<u64>().unwrap();
        let answer = match words.first().copied() {
            Some("apply") => {
                let path = Path::new(words[1]);
                let (mut a, mut r) = (Duration::ZERO, Duration::ZERO);
                for _ in 0..iters(2) {
                    let (da, dr) = load_revert(path);
                    a += da;
                    r += dr;
                }
                format!("{} {}", a.as_nanos(), r.as_nanos())
            }
            Some("apply-new") => {
                let path = Path::new(words[1]);
                let bytes = std::fs::read(path).unwrap();
                let (mut a, mut r) = (Duration::ZERO, Duration::ZERO);
                for _ in 0..iters(2) {
                    fresh += 1;
                    let copy = fresh_copy(path, &bytes, fresh);
                    let (da, dr) = load_revert(&copy);
                    std::fs::remove_file(&copy).unwrap();
                    a += da;
                    r += dr;
                }
                format!("{} {}", a.as_nanos(), r.as_nanos())
            }
            Some("dlopen-new") => {
                use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};
                let path = Path::new(words[1]);
                let bytes = std::fs::read(path).unwrap();
                let mut total = Duration::ZERO;
                for _ in 0..iters(2) {
                    fresh += 1;
                    let copy = fresh_copy(path, &bytes, fresh);
                    let t = Instant::now();
                    // SAFETY: a patch built by the bench; its initialisers
                    // are std's and linkme's (none run code of ours).
                    let lib = unsafe { Library::open(Some(&copy), RTLD_NOW | RTLD_LOCAL) }.unwrap();
                    total += t.elapsed();
                    // Never unloaded, like hotpatch's libraries.
                    std::mem::forget(lib);
                    std::fs::remove_file(&copy).unwrap();
                }
                format!("{}", total.as_nanos())
            }
            Some("functions") => {
                let t = Instant::now();
                for _ in 0..iters(1) {
                    black_box(hotpatch::functions());
                }
                format!("{}", t.elapsed().as_nanos())
            }
            Some("apply-each") => {
                let path = Path::new(words[1]);
                let cycles: Vec<Cycle> = (0..iters(2)).map(|_| cycle(path)).collect();
                // Let workers that switched record it.
                std::thread::sleep(Duration::from_millis(50));
                let (switches, missed) = workers.switches(&cycles);
                let ns = |d: Duration| d.as_nanos().to_string();
                let mut cols: Vec<String> = cycles.iter().map(|c| ns(c.load)).collect();
                cols.extend(cycles.iter().map(|c| ns(c.revert)));
                cols.extend(switches.iter().map(|s| ns(s[0])));
                cols.extend(switches.iter().map(|s| ns(s[1])));
                cols.push(missed.to_string());
                cols.join(" ")
            }
            Some("workers") => {
                let (requests, bad) = workers.stop();
                workers = Workers::start(words[1], iters(2) as usize);
                format!("{requests} {bad}")
            }
            Some("call") => {
                let t = Instant::now();
                for i in 0..iters(1) {
                    black_box(gen_svc::mid(black_box(i)));
                }
                format!("{}", t.elapsed().as_nanos())
            }
            _ => panic!("unknown command {line:?}"),
        };
        writeln!(out, "{answer}").unwrap();
        out.flush().unwrap();
    }
}

/// The origin of the workers' switch times.
static T0: LazyLock<Instant> = LazyLock::new(Instant::now);

/// One load and revert: when each began (since `T0`) and how long it took.
struct Cycle {
    load_start: Duration,
    load: Duration,
    revert_start: Duration,
    revert: Duration,
}

fn cycle(path: &Path) -> Cycle {
    let load_start = T0.elapsed();
    let patch = hotpatch::load(path).unwrap_or_else(|e| panic!("load {}: {e}", path.display()));
    let load = T0.elapsed() - load_start;
    let revert_start = T0.elapsed();
    patch.revert().unwrap();
    let revert = T0.elapsed() - revert_start;
    Cycle {
        load_start,
        load,
        revert_start,
        revert,
    }
}

/// The original value of generated function `f{i}` (see `build_svc.rs`);
/// a patch returns one more.
fn original(i: usize, x: u64) -> u64 {
    x.wrapping_mul(0x9E37_79B9_7F4A_7C15u64.wrapping_add(2 * i as u64))
        .wrapping_add(i as u64)
}

/// What one request saw.
struct Seen {
    /// Every call returned the old or the new value.
    valid: bool,
    /// Each function kept one version for the whole request.
    consistent: bool,
    /// The version of `first` (every generated patch replaces it).
    version: u64,
}

/// One request: 32 rounds of `first`, `mid` and `last`.
#[inline(never)]
fn request(x: u64) -> Seen {
    let idx = [0, gen_svc::N / 2, gen_svc::N - 1];
    let mut at_start = [0u64; 3];
    let (mut valid, mut consistent) = (true, true);
    for round in 0..32 {
        let x = x.wrapping_add(round);
        let got = [
            gen_svc::first(black_box(x)),
            gen_svc::mid(black_box(x)),
            gen_svc::last(black_box(x)),
        ];
        for (k, (&got, &i)) in got.iter().zip(&idx).enumerate() {
            let version = got.wrapping_sub(original(i, x));
            valid &= version <= 1;
            if round == 0 {
                at_start[k] = version;
            }
            consistent &= at_start[k] == version;
        }
    }
    Seen {
        valid,
        consistent,
        version: at_start[0],
    }
}

/// Worker threads serving requests until stopped.
struct Workers {
    stop: Arc<AtomicBool>,
    /// Per worker: each time it saw `first` change version, when (ns
    /// since `T0`) and to which version: `ns << 1 | version`.
    switched: Vec<Arc<Mutex<Vec<u64>>>>,
    handles: Vec<JoinHandle<(u64, u64)>>,
}

impl Workers {
    fn start(mode: &str, k: usize) -> Workers {
        let (register, pause, offline) = match mode {
            "none" | "unregistered" => (false, false, false),
            "busy" => (true, false, false),
            "blocking" => (true, true, false),
            "offline" => (true, true, true),
            _ => panic!("unknown worker mode {mode:?}"),
        };
        let k = if mode == "none" { 0 } else { k };
        LazyLock::force(&T0);
        let stop = Arc::new(AtomicBool::new(false));
        let ready = Arc::new(Barrier::new(k + 1));
        let switched: Vec<Arc<Mutex<Vec<u64>>>> = (0..k).map(|_| Arc::default()).collect();
        let handles = (0..k)
            .map(|w| {
                let (stop, ready, switched) = (stop.clone(), ready.clone(), switched[w].clone());
                std::thread::Builder::new()
                    .name(format!("worker-{w}"))
                    .spawn(move || {
                        let _registered = register.then(hotpatch::register_thread);
                        ready.wait();
                        let (mut requests, mut bad, mut version) = (0u64, 0u64, 0u64);
                        // Relaxed: a stop flag; the join orders the rest.
                        while !stop.load(Ordering::Relaxed) {
                            let seen = request(requests);
                            // Unregistered threads may switch mid-request.
                            if !seen.valid || (register && !seen.consistent) {
                                bad += 1;
                            }
                            if seen.version != version {
                                version = seen.version;
                                let ns = T0.elapsed().as_nanos() as u64;
                                // Uncontended: twice per load+revert cycle.
                                switched.lock().unwrap().push(ns << 1 | version);
                            }
                            requests += 1;
                            hotpatch::quiescent();
                            if pause {
                                let wait = || std::thread::sleep(Duration::from_micros(10));
                                if offline {
                                    hotpatch::while_offline(wait);
                                } else {
                                    wait();
                                }
                            }
                        }
                        (requests, bad)
                    })
                    .unwrap()
            })
            .collect();
        ready.wait();
        Workers {
            stop,
            switched,
            handles,
        }
    }

    /// For each cycle, how long after the load's and the revert's call the
    /// last worker first ran a request on the version it installed (zero
    /// without workers); and how many times a worker ran no request at all
    /// on a version. A worker's change to version 1 (0) belongs to the
    /// last load (revert) that began before it.
    fn switches(&self, cycles: &[Cycle]) -> (Vec<[Duration; 2]>, usize) {
        let mut out = vec![[Duration::ZERO; 2]; cycles.len()];
        let mut missed = 0;
        for log in &self.switched {
            let mut first: Vec<[Option<Duration>; 2]> = vec![[None; 2]; cycles.len()];
            for &e in log.lock().unwrap().iter() {
                let (at, version) = (Duration::from_nanos(e >> 1), e & 1);
                let start = |c: &Cycle| {
                    if version == 1 {
                        c.load_start
                    } else {
                        c.revert_start
                    }
                };
                // The op (load for 1, revert for 0) that installed it.
                let Some(i) = cycles.iter().rposition(|c| start(c) <= at) else {
                    continue;
                };
                let k = 1 - version as usize;
                first[i][k].get_or_insert(at - start(&cycles[i]));
            }
            for (o, f) in out.iter_mut().zip(&first) {
                for k in 0..2 {
                    match f[k] {
                        Some(d) => o[k] = o[k].max(d),
                        None => missed += 1,
                    }
                }
            }
        }
        (out, missed)
    }

    /// Stops and joins them; their requests and bad requests.
    fn stop(&mut self) -> (u64, u64) {
        // Relaxed: see the workers' loop.
        self.stop.store(true, Ordering::Relaxed);
        self.handles
            .drain(..)
            .map(|h| h.join().expect("worker panicked"))
            .fold((0, 0), |(r, b), (r2, b2)| (r + r2, b + b2))
    }
}
