//! Scale: a host with 10,000 generated `#[patchable]` functions, next to
//! hosts with 1 and 1000 (`benches/gen`, built by the bench).
//!
//! Criterion groups (each host a `gen-host-N serve` process timing itself):
//! - `scale_call`: steady-state calls of one patchable function.
//! - `scale_functions`: `hotpatch::functions()`, the full sorted listing.
//! - `scale_apply_1000_fns`: load + validate + apply a 1000-function patch
//!   that is a new library (fresh host per sample), its revert, and
//!   `dlopen` alone of the same file as the baseline.
//!
//! Measured outside criterion (a fresh process per measurement, which
//! criterion's iteration scheme cannot drive): the first call of a
//! patchable function in a new process versus its second call and versus
//! the first call of a plain function of the same binary; the first
//! `functions()` (which builds the registry); the process's whole life.
//! Medians of `FRESH` processes go to `target/hotpatch-bench/scale.json`
//! and to stderr.
//!
//! Run: `cargo bench --bench scale`.

mod support;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, criterion_group, criterion_main};
use support::{Host, median};

const FRESH: usize = 201;

struct Built {
    dir: PathBuf,
}

impl Built {
    fn host(&self, n: usize) -> PathBuf {
        self.dir.join(format!("gen-host-{n}"))
    }
    fn patch(&self, n: usize) -> PathBuf {
        support::patch(&self.dir, &format!("gen-patch-{n}-1000"))
    }
}

fn built() -> Built {
    Built {
        dir: support::build_gen(&[
            "gen-host-1",
            "gen-host-1000",
            "gen-host-10000",
            "gen-patch-1000-1000",
            "gen-patch-10000-1000",
        ]),
    }
}

/// Runs `bin args` once; its numbers and its life from spawn to exit.
fn fresh(bin: &Path, arg: &str) -> (Vec<f64>, f64) {
    let t = Instant::now();
    let out = Command::new(bin).arg(arg).output().unwrap();
    let life = t.elapsed().as_nanos() as f64;
    assert!(out.status.success(), "{} {arg} failed", bin.display());
    let nums = String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .map(|w| w.parse().unwrap())
        .collect();
    (nums, life)
}

/// Medians over `FRESH` fresh processes of each number a mode prints,
/// and of the process's life.
fn fresh_medians(bin: &Path, arg: &str) -> (Vec<f64>, f64) {
    let mut cols: Vec<Vec<f64>> = Vec::new();
    let mut lives = Vec::new();
    for _ in 0..FRESH {
        let (nums, life) = fresh(bin, arg);
        cols.resize(nums.len(), Vec::new());
        for (c, v) in cols.iter_mut().zip(nums) {
            c.push(v);
        }
        lives.push(life);
    }
    (
        cols.iter_mut().map(|c| median(c)).collect(),
        median(&mut lives),
    )
}

fn first_calls(b: &Built) {
    let mut json = String::from("{\n");
    let mut report = String::from("\nfirst calls, medians of fresh processes (ns):\n");
    for (i, n) in [1usize, 1000, 10_000].into_iter().enumerate() {
        let bin = b.host(n);
        let (calls, life) = fresh_medians(&bin, "first-call");
        let (listing, _) = fresh_medians(&bin, "first-functions");
        let sep = if i == 2 { "" } else { "," };
        writeln!(
            json,
            "  \"host_{n}\": {{\"patchable_first_call_ns\": {}, \"patchable_second_call_ns\": {}, \
             \"plain_first_call_ns\": {}, \"plain_second_call_ns\": {}, \"process_life_ns\": {life}, \
             \"first_functions_ns\": {}, \"second_functions_ns\": {}}}{sep}",
            calls[0], calls[1], calls[2], calls[3], listing[0], listing[1]
        )
        .unwrap();
        writeln!(
            report,
            "  host with {n:>5} fns: patchable first {:>7.0}  second {:>4.0} | plain first {:>7.0}  \
             second {:>4.0} | process life {:>9.0} | first functions() {:>9.0}  second {:>9.0}",
            calls[0], calls[1], calls[2], calls[3], life, listing[0], listing[1]
        )
        .unwrap();
    }
    json.push_str("}\n");
    let path = support::results_dir().join("scale.json");
    std::fs::write(&path, json).unwrap();
    eprintln!("{report}  (written to {})", path.display());
}

fn scale(c: &mut Criterion) {
    if !support::benching() {
        return;
    }
    let b = built();
    first_calls(&b);

    let mut g = c.benchmark_group("scale_call");
    for n in [1usize, 10_000] {
        let mut host = Host::spawn(&b.host(n));
        g.bench_function(format!("host_{n}_fns/call_mid"), |bench| {
            bench.iter_custom(|iters| host.time(&format!("call {iters}"), 0))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("scale_functions");
    for n in [1usize, 1000, 10_000] {
        let mut host = Host::spawn(&b.host(n));
        g.bench_function(format!("host_{n}_fns/functions"), |bench| {
            bench.iter_custom(|iters| host.time(&format!("functions {iters}"), 0))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("scale_apply_1000_fns");
    g.sampling_mode(SamplingMode::Flat).sample_size(10);
    for n in [1000usize, 10_000] {
        let (host, patch) = (b.host(n), b.patch(n));
        let patch = patch.display();
        g.bench_function(format!("host_{n}_fns/dlopen_only"), |bench| {
            bench.iter_custom(|iters| {
                Host::spawn(&host).time(&format!("dlopen-new {patch} {iters}"), 0)
            })
        });
        g.bench_function(format!("host_{n}_fns/load_validate_apply"), |bench| {
            bench.iter_custom(|iters| {
                Host::spawn(&host).time(&format!("apply-new {patch} {iters}"), 0)
            })
        });
        let mut server = Host::spawn(&host);
        g.bench_function(format!("host_{n}_fns/revert"), |bench| {
            bench.iter_custom(|iters| server.time(&format!("apply {patch} {iters}"), 1))
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = scale
}
criterion_main!(benches);
