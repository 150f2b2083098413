//! Apply latency: `hotpatch::load` (read, private copy, `dlopen`, manifest
//! and signature checks, publish) and `Patch::revert`, for patches of 1,
//! 100 and 1000 functions of a host with 1000 patchable functions.
//!
//! The host is a separate process (`benches/gen`, `gen-host-1000 serve`)
//! that times each operation itself; generated crates are built by the
//! bench. Groups:
//! - `apply_new_library`: every load is of bytes never loaded before, so
//!   it copies and `dlopen`s a new library, as applying a new patch does.
//!   Baseline: `dlopen_only`, the same fresh copies opened with `dlopen`
//!   alone. Every library stays mapped (hotpatch does not unload by
//!   default), so each sample runs in a fresh host process.
//! - `apply_same_library`: load again bytes already loaded (the library is
//!   reused: read, hash, compare, check, publish), e.g. re-applying a
//!   reverted patch.
//! - `revert`.
//!
//! Run: `cargo bench --bench apply`.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use criterion::{Criterion, SamplingMode, criterion_group, criterion_main};
use support::Host;

const SIZES: [usize; 3] = [1, 100, 1000];

struct Built {
    host: PathBuf,
    patches: Vec<(usize, PathBuf)>,
}

fn built() -> Built {
    let mut packages = vec!["gen-host-1000".to_owned()];
    packages.extend(SIZES.iter().map(|m| format!("gen-patch-1000-{m}")));
    let refs: Vec<&str> = packages.iter().map(String::as_str).collect();
    let dir = support::build_gen(&refs);
    Built {
        host: dir.join("gen-host-1000"),
        patches: SIZES
            .iter()
            .map(|&m| (m, support::so(&dir, &format!("gen-patch-1000-{m}"))))
            .collect(),
    }
}

fn apply(c: &mut Criterion) {
    if !support::benching() {
        return;
    }
    let b = built();
    for (m, so) in &b.patches {
        let len = std::fs::metadata(so).unwrap().len();
        eprintln!("gen-patch-1000-{m}: {} ({len} bytes)", so.display());
    }

    let mut g = c.benchmark_group("apply_new_library");
    g.sampling_mode(SamplingMode::Flat).sample_size(10);
    for (m, so) in &b.patches {
        let so = so.display();
        g.bench_function(format!("dlopen_only/{m}_fns"), |bench| {
            bench.iter_custom(|iters| {
                Host::spawn(&b.host).time(&format!("dlopen-new {so} {iters}"), 0)
            })
        });
        g.bench_function(format!("load_validate_apply/{m}_fns"), |bench| {
            bench.iter_custom(|iters| {
                Host::spawn(&b.host).time(&format!("apply-new {so} {iters}"), 0)
            })
        });
    }
    g.finish();

    let mut host = Host::spawn(&b.host);
    let mut g = c.benchmark_group("apply_same_library");
    for (m, so) in &b.patches {
        let so = so.display();
        g.bench_function(format!("load_validate_apply/{m}_fns"), |bench| {
            bench.iter_custom(|iters| host.time(&format!("apply {so} {iters}"), 0))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("revert");
    for (m, so) in &b.patches {
        let so = so.display();
        g.bench_function(format!("{m}_fns"), |bench| {
            bench.iter_custom(|iters| host.time(&format!("apply {so} {iters}"), 1))
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = apply
}
criterion_main!(benches);
