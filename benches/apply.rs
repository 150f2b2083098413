//! Apply latency: `hotpatch::load` (read, private copy, `dlopen`, manifest
//! and signature checks, publish) and `Patch::revert`, for thin patches of
//! 1, 100 and 1000 functions of hosts with 1000 and 10,000 patchable
//! functions.
//!
//! The host is a separate process (`benches/gen`, `gen-host-N serve`)
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

const HOSTS: [usize; 2] = [1000, 10_000];

/// A host's size, its binary, and its patches (size, thin patch).
type HostPatches = (usize, PathBuf, Vec<(usize, PathBuf)>);

struct Built {
    hosts: Vec<HostPatches>,
}

fn built() -> Built {
    let mut packages = Vec::new();
    for n in HOSTS {
        packages.push(format!("gen-host-{n}"));
        packages.extend(SIZES.iter().map(|m| format!("gen-patch-{n}-{m}")));
    }
    let refs: Vec<&str> = packages.iter().map(String::as_str).collect();
    // One cargo invocation: hosts and patches share their dependencies'
    // builds, so the patches' symbol names are the hosts'.
    let dir = support::build_gen(&refs);
    Built {
        hosts: HOSTS
            .iter()
            .map(|&n| {
                let patches = SIZES
                    .iter()
                    .map(|&m| (m, support::patch(&dir, &format!("gen-patch-{n}-{m}"))))
                    .collect();
                (n, dir.join(format!("gen-host-{n}")), patches)
            })
            .collect(),
    }
}

fn apply(c: &mut Criterion) {
    if !support::benching() {
        return;
    }
    let b = built();
    for (n, host_bin, patches) in &b.hosts {
        let host_len = std::fs::metadata(host_bin).unwrap().len();
        eprintln!("gen-host-{n}: {} ({host_len} bytes)", host_bin.display());
        for (m, so) in patches {
            let len = std::fs::metadata(so).unwrap().len();
            eprintln!("gen-patch-{n}-{m}: {} ({len} bytes)", so.display());
        }
    }

    let mut g = c.benchmark_group("apply_new_library");
    g.sampling_mode(SamplingMode::Flat).sample_size(10);
    for (n, host_bin, patches) in &b.hosts {
        for (m, so) in patches {
            let so = so.display();
            g.bench_function(format!("dlopen_only/host_{n}/{m}_fns"), |bench| {
                bench.iter_custom(|iters| {
                    Host::spawn(host_bin).time(&format!("dlopen-new {so} {iters}"), 0)
                })
            });
            g.bench_function(format!("load_validate_apply/host_{n}/{m}_fns"), |bench| {
                bench.iter_custom(|iters| {
                    Host::spawn(host_bin).time(&format!("apply-new {so} {iters}"), 0)
                })
            });
        }
    }
    g.finish();

    for (n, host_bin, patches) in &b.hosts {
        let mut host = Host::spawn(host_bin);
        let mut g = c.benchmark_group(format!("apply_same_library/host_{n}"));
        for (m, so) in patches {
            let so = so.display();
            g.bench_function(format!("load_validate_apply/{m}_fns"), |bench| {
                bench.iter_custom(|iters| host.time(&format!("apply {so} {iters}"), 0))
            });
        }
        g.finish();

        let mut g = c.benchmark_group(format!("revert/host_{n}"));
        for (m, so) in patches {
            let so = so.display();
            g.bench_function(format!("{m}_fns"), |bench| {
                bench.iter_custom(|iters| host.time(&format!("apply {so} {iters}"), 1))
            });
        }
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = apply
}
criterion_main!(benches);
