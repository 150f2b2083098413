//! Instructions per loop iteration, counted by callgrind, for the loops of
//! `benches/quiescence.rs` (`benches/quiescence_cases`): `quiescent()`
//! with nothing in progress, and the patchable call before, during and
//! after a transition, and the `AtomicPtr` control (`loop_ptr`) to the
//! original and to the patch's entry.
//!
//! The method of `benches/icount.rs`: this binary re-runs itself under
//! `valgrind --tool=callgrind --callgrind-out-file=/dev/null` once per
//! case and per iteration count (`N1`, `N2`) and reports
//! `(Ir(N2) - Ir(N1)) / (N2 - N1)`. One difference: collection is on only
//! inside the measured loop function (`--toggle-collect`), because the
//! transition cases run two more threads (one blocked, one polling in
//! `load` on a timer) whose instruction counts depend on wall-clock time.
//! The per-thread toggle leaves exactly the measuring thread's loop and
//! what it calls. Results go to stderr and to
//! `target/hotpatch-bench/icount-quiescence-<profile>.json`.
//!
//! Run: `cargo bench --bench icount_quiescence`.

mod quiescence_cases;
mod support;

use std::process::Command;

use std::sync::atomic::Ordering;

use quiescence_cases::{
    HeldTransition, TARGET, current_impl, loop_call, loop_empty, loop_ptr, loop_quiescent,
};

const N1: u64 = 1_000_000;
const N2: u64 = 3_000_000;

/// Case, loop function (its symbol, for `--toggle-collect`), and the
/// case it is compared with.
const CASES: [(&str, &str, &str); 11] = [
    ("empty_loop", "loop_empty", "empty_loop"),
    ("quiescent_registered", "loop_quiescent", "empty_loop"),
    ("quiescent_unregistered", "loop_quiescent", "empty_loop"),
    ("call_before", "loop_call", "call_before"),
    ("call_during_not_switched", "loop_call", "call_before"),
    ("call_during_switched", "loop_call", "call_before"),
    ("call_during_unregistered", "loop_call", "call_before"),
    ("call_after", "loop_call", "call_before"),
    ("call_after_revert", "loop_call", "call_before"),
    ("ptr_to_original", "loop_ptr", "ptr_to_original"),
    ("ptr_to_patch_entry", "loop_ptr", "ptr_to_original"),
];

fn child(case: &str, n: u64) {
    let patch = std::env::var_os("HOTPATCH_BENCH_PATCH").expect("HOTPATCH_BENCH_PATCH");
    let patch = std::path::Path::new(&patch);
    match case {
        "empty_loop" => drop(loop_empty(n)),
        "quiescent_registered" => {
            let _r = hotpatch::register_thread();
            loop_quiescent(n);
        }
        "quiescent_unregistered" => drop(loop_quiescent(n)),
        "call_before" => drop(loop_call(n)),
        "call_during_not_switched" | "call_during_switched" | "call_during_unregistered" => {
            let registered = hotpatch::register_thread();
            let held = HeldTransition::begin(patch);
            match case {
                "call_during_not_switched" => {}
                "call_during_switched" => hotpatch::quiescent(),
                _ => drop(registered),
            }
            loop_call(n);
            // Let the load finish: this thread's safepoint (if registered).
            hotpatch::quiescent();
            held.finish().revert().unwrap();
        }
        "call_after" => {
            let _r = hotpatch::register_thread();
            let held = HeldTransition::begin(patch);
            hotpatch::quiescent();
            let applied = held.finish();
            loop_call(n);
            applied.revert().unwrap();
        }
        "call_after_revert" => {
            let _r = hotpatch::register_thread();
            let held = HeldTransition::begin(patch);
            hotpatch::quiescent();
            held.finish().revert().unwrap();
            loop_call(n);
        }
        "ptr_to_original" => {
            TARGET.store(current_impl(), Ordering::Release);
            loop_ptr(n);
        }
        "ptr_to_patch_entry" => {
            // No registered thread: a direct swap; the library stays mapped.
            let applied = hotpatch::load(patch).unwrap();
            let entry = current_impl();
            applied.revert().unwrap();
            // Release: pairs with the Acquire in `loop_ptr`.
            TARGET.store(entry, Ordering::Release);
            loop_ptr(n);
        }
        _ => panic!("unknown case {case}"),
    }
}

fn count(exe: &std::path::Path, so: &std::path::Path, case: &str, func: &str, n: u64) -> u64 {
    let out = Command::new("valgrind")
        .args(["--tool=callgrind", "--callgrind-out-file=/dev/null"])
        .arg(format!("--toggle-collect=*quiescence_cases::{func}"))
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
        return; // `cargo test --benches`: nothing to do.
    }
    if Command::new("valgrind").arg("--version").output().is_err() {
        eprintln!("icount_quiescence: valgrind not found, skipped");
        return;
    }
    let so = quiescence_cases::bench_patch();
    let exe = std::env::current_exe().unwrap();
    let per_iter: Vec<(&str, f64)> = CASES
        .iter()
        .map(|&(case, func, _)| {
            let a = count(&exe, &so, case, func, N1);
            let b = count(&exe, &so, case, func, N2);
            (case, (b as f64 - a as f64) / (N2 - N1) as f64)
        })
        .collect();
    let of = |name: &str| per_iter.iter().find(|(c, _)| *c == name).unwrap().1;
    let profile = if exe
        .parent()
        .and_then(|d| d.parent())
        .and_then(|d| d.file_name())
        == Some(std::ffi::OsStr::new("bench-lto"))
    {
        "bench-lto"
    } else {
        "bench"
    };
    let mut json = format!("{{\n  \"profile\": \"{profile}\",\n");
    eprintln!("instructions per loop iteration ({profile}; callgrind, ({N2} - {N1}) delta):");
    eprintln!(
        "  {:<26} {:>10} {:>14}",
        "case", "per iter", "minus baseline"
    );
    for (i, ((case, v), &(_, _, base))) in per_iter.iter().zip(CASES.iter()).enumerate() {
        let over = v - of(base);
        eprintln!("  {case:<26} {v:>10.2} {over:>+14.2}  (baseline {base})");
        let sep = if i + 1 == per_iter.len() { "" } else { "," };
        json.push_str(&format!(
            "  \"{case}\": {{\"per_iteration\": {v}, \"baseline\": \"{base}\", \"minus_baseline\": {over}}}{sep}\n"
        ));
    }
    json.push_str("}\n");
    let path = support::results_dir().join(format!("icount-quiescence-{profile}.json"));
    std::fs::write(&path, json).unwrap();
    eprintln!("  (written to {})", path.display());
}
