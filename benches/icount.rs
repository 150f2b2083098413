//! Instructions per call, counted by callgrind: a measure that does not
//! drift with machine load, for the direct, patchable (unpatched and
//! patched) and `AtomicPtr` call paths.
//!
//! `cargo bench --bench icount` re-runs this binary under
//! `valgrind --tool=callgrind --callgrind-out-file=/dev/null` once per
//! case and per call count (`N1`, `N2`), reads callgrind's `Collected :`
//! total, and reports `(Ir(N2) - Ir(N1)) / (N2 - N1)`: the instructions
//! of one loop iteration, start-up and patch loading cancelled out. The
//! `loop_only` case (the loop and the body with no call) is then
//! subtracted to give each path's own cost, and `direct` to give the
//! overhead over a direct call. The `site_*` cases run the same loop
//! over an `#[inline(never)]` function making one call, as a call site
//! outside a loop does: nothing of the call is hoisted out of the loop.
//! Results go to stderr and to `target/hotpatch-bench/icount-<profile>.json`.
//!
//! The same command under `--profile bench-lto` counts the fat-LTO build.

mod support;

use std::hint::black_box;
use std::process::Command;
use std::sync::atomic::{AtomicPtr, Ordering};

const N1: u64 = 1_000_000;
const N2: u64 = 3_000_000;
const CASES: [&str; 11] = [
    "loop_only",
    "direct",
    "patchable_unpatched",
    "patchable_patched",
    "atomic_ptr",
    "atomic_ptr_calling_crate",
    "site_direct",
    "site_unpatched",
    "site_patched",
    "site_atomic_ptr",
    "site_atomic_ptr_calling_crate",
];

type F = fn(u64) -> u64;
static LOCAL_PTR: AtomicPtr<()> = AtomicPtr::new(bench_svc::direct as F as *mut ());

/// Writes both fn-pointer statics once, through `black_box`, as a hot swap
/// would: a static never written is folded into a direct call.
fn write_fn_ptrs() {
    let f: F = black_box(bench_svc::direct);
    bench_svc::set_fn_ptr(f);
    // Release: pairs with the Acquire loads of the calls.
    LOCAL_PTR.store(f as *mut (), Ordering::Release);
}

/// The same loop as `benches/call.rs`.
#[inline(never)]
fn calls<C: Fn(u64) -> u64>(iters: u64, f: C) {
    for i in 0..iters {
        black_box(f(black_box(i)));
    }
}

#[inline(always)]
fn atomic_ptr(x: u64) -> u64 {
    // SAFETY: FN_PTR only ever holds a `fn(u64) -> u64`.
    // Acquire: as a hot swap needs; a plain `mov` on x86-64.
    let f: F = unsafe { std::mem::transmute(bench_svc::FN_PTR.load(Ordering::Acquire)) };
    f(x)
}

#[inline(always)]
fn atomic_ptr_calling_crate(x: u64) -> u64 {
    // SAFETY: LOCAL_PTR only ever holds a `fn(u64) -> u64`.
    // Acquire: as above.
    let f: F = unsafe { std::mem::transmute(LOCAL_PTR.load(Ordering::Acquire)) };
    f(x)
}

// `site_*`: the loop calls a function that makes one call, so the count
// includes what a call site outside a loop executes (in a loop, the GOT
// load of a slot's address, if any, is hoisted out).
#[inline(never)]
fn site_direct(x: u64) -> u64 {
    bench_svc::direct(x)
}
#[inline(never)]
fn site_unpatched(x: u64) -> u64 {
    bench_svc::unpatched(x)
}
#[inline(never)]
fn site_patched(x: u64) -> u64 {
    bench_svc::patched(x)
}
#[inline(never)]
fn site_atomic_ptr(x: u64) -> u64 {
    atomic_ptr(x)
}
#[inline(never)]
fn site_atomic_ptr_calling_crate(x: u64) -> u64 {
    atomic_ptr_calling_crate(x)
}

fn load_patch() -> hotpatch::Patch {
    let so = std::env::var("HOTPATCH_BENCH_PATCH").expect("HOTPATCH_BENCH_PATCH");
    hotpatch::load(so).expect("load bench-patch")
}

fn child(case: &str, n: u64) {
    write_fn_ptrs();
    match case {
        "loop_only" => calls(n, bench_svc::body),
        "direct" => calls(n, bench_svc::direct),
        "patchable_unpatched" => calls(n, bench_svc::unpatched),
        "patchable_patched" => {
            let _patch = load_patch();
            calls(n, bench_svc::patched)
        }
        "atomic_ptr" => calls(n, atomic_ptr),
        "atomic_ptr_calling_crate" => calls(n, atomic_ptr_calling_crate),
        "site_direct" => calls(n, site_direct),
        "site_unpatched" => calls(n, site_unpatched),
        "site_patched" => {
            let _patch = load_patch();
            calls(n, site_patched)
        }
        "site_atomic_ptr" => calls(n, site_atomic_ptr),
        "site_atomic_ptr_calling_crate" => calls(n, site_atomic_ptr_calling_crate),
        _ => panic!("unknown case {case}"),
    }
}

fn count(exe: &std::path::Path, so: &std::path::Path, case: &str, n: u64) -> u64 {
    let out = Command::new("valgrind")
        .args(["--tool=callgrind", "--callgrind-out-file=/dev/null"])
        .arg(exe)
        .args(["--child", case, &n.to_string()])
        .env("HOTPATCH_BENCH_PATCH", so)
        .output()
        .expect("run valgrind");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "callgrind {case} {n} failed:\n{err}");
    err.lines()
        .find_map(|l| {
            l.split_once("Collected :")
                .map(|(_, v)| v.trim().parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no total in callgrind output:\n{err}"))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        child(&args[i + 1], args[i + 2].parse().unwrap());
        return;
    }
    if !args.iter().any(|a| a == "--bench") {
        return; // `cargo test --benches` runs benches in test mode: nothing to do.
    }
    if Command::new("valgrind").arg("--version").output().is_err() {
        eprintln!("icount: valgrind not found, skipped");
        return;
    }
    let so = support::patch(&support::build_fixtures(&["bench-patch"]), "bench-patch");
    let exe = std::env::current_exe().unwrap();
    let per_call: Vec<(&str, f64)> = CASES
        .iter()
        .map(|&case| {
            let (a, b) = (count(&exe, &so, case, N1), count(&exe, &so, case, N2));
            (case, (b as f64 - a as f64) / (N2 - N1) as f64)
        })
        .collect();
    let base = per_call[0].1;
    let direct = per_call[1].1;
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        exe_profile(&exe)
    };
    let mut json = format!("{{\n  \"profile\": \"{profile}\",\n");
    eprintln!("instructions per call ({profile}; callgrind, ({N2} - {N1} calls) delta):");
    eprintln!(
        "  {:<30} {:>10} {:>14} {:>14}",
        "case", "per iter", "minus loop", "minus direct"
    );
    for (i, (case, v)) in per_call.iter().enumerate() {
        eprintln!(
            "  {case:<30} {v:>10.2} {:>14.2} {:>14.2}",
            v - base,
            v - direct
        );
        let sep = if i + 1 == per_call.len() { "" } else { "," };
        json.push_str(&format!(
            "  \"{case}\": {{\"per_iteration\": {v}, \"minus_loop\": {}, \"minus_direct\": {}}}{sep}\n",
            v - base,
            v - direct
        ));
    }
    json.push_str("}\n");
    let path = support::results_dir().join(format!("icount-{profile}.json"));
    std::fs::write(&path, json).unwrap();
    eprintln!("  (written to {})", path.display());
}

/// `bench` or `bench-lto`: the profile directory the binary was built in.
fn exe_profile(exe: &std::path::Path) -> &'static str {
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .and_then(|d| d.file_name());
    match dir.and_then(|d| d.to_str()) {
        Some("bench-lto") => "bench-lto",
        _ => "bench",
    }
}
