//! hotpatch on tokio: a settlement service on a multi-threaded runtime,
//! patched and reverted while it serves.
//!
//! `cargo run --release -p tokio-service` builds the fix
//! (`examples/tokio-fix`) as a thin patch for this binary (with `cargo
//! hotpatch build`, see [`build_fix`]), starts a runtime of
//! [`WORKERS`] worker threads serving [`CONNECTIONS`] connection tasks,
//! then applies and reverts the fix [`CYCLES`] times mid-traffic, half of
//! them under full load and half with mostly idle (parked) workers.
//!
//! How the runtime is wired, and what is guaranteed and what is not, is in
//! [`tokio_service::serve`], which runs the traffic and checks it (the
//! crate's tests run a short form of the same run).
//!
//! It exits non-zero on anything unexpected: a refused patch, a failed
//! request, a request without an await that mixed versions, a request
//! that started after a transition ended and still ran the previous
//! version, or a result from neither version.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use tokio_service::serve::{self, Config};

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

/// Builds `examples/tokio-fix` as a thin patch for this very binary, as
/// `cargo hotpatch build` does: runs the tool (`cargo run -p
/// cargo-hotpatch -- hotpatch build -p tokio-fix --binary <this binary>`)
/// in this binary's target directory, so cargo reuses the service's own
/// artifacts (same features, so the symbol names this binary exports).
/// The patch is `tokio_fix.so`, mode 0644, in a new 0700 directory of
/// the temporary directory (the default trust policy refuses cargo's
/// group-writable output under umask 002); the caller removes it.
fn build_fix() -> Result<PathBuf, String> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    // target/<profile>/tokio-service: the target directory is two up.
    let target_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| format!("{} is not in a target directory", exe.display()))?
        .to_owned();
    let release = !cfg!(debug_assertions);
    let dir = std::env::temp_dir().join(format!("hotpatch-tokio-fix-{}", std::process::id()));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let out = dir.join("tokio_fix.so");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
        // Both cargo runs (the tool's and the one it makes) use this
        // binary's target directory.
        .env("CARGO_TARGET_DIR", &target_dir)
        .args(["run", "--release", "-q", "-p", "cargo-hotpatch", "--"])
        .args(["hotpatch", "build", "-p", "tokio-fix", "--binary"])
        .arg(&exe);
    if release {
        cmd.arg("--release");
    }
    cmd.arg("-o").arg(&out);
    println!(
        "[build] cargo run --release -q -p cargo-hotpatch -- hotpatch build -p tokio-fix --binary {}{} -o {}",
        exe.display(),
        if release { " --release" } else { "" },
        out.display()
    );
    let status = cmd.status().map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err(format!("building tokio-fix failed: {status}"));
    }
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o644))
        .map_err(|e| format!("cannot set the mode of {}: {e}", out.display()))?;
    Ok(out)
}

fn main() -> ExitCode {
    println!("hotpatch on tokio: #[patchable] handlers on a multi-threaded runtime\n");
    let started = Instant::now();
    let fix = match build_fix() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "        built {} in {:.1} s\n",
        fix.display(),
        started.elapsed().as_secs_f64()
    );

    println!(
        "[serve] {WORKERS} registered worker threads, {CONNECTIONS} connection tasks; each request \
         settles an order\n        with fee_cents() then payout_cents(), which must add up to the \
         amount;\n        1 request in {AWAIT_EVERY} awaits (yield_now or a 1 ms sleep) between \
         the two calls;\n        {CYCLES} apply/revert cycles, from the {}th with connections \
         pausing 5 ms between requests\n        (workers park: go offline)",
        CYCLES / 2 + 1
    );
    let config = Config {
        workers: WORKERS,
        connections: CONNECTIONS,
        cycles: CYCLES,
        dwell: DWELL,
        dwell_requests: 0,
        await_every: AWAIT_EVERY,
    };
    let report = serve::run(&config, &fix);
    // The loader mapped its own copy of the fix.
    if let Some(dir) = fix.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
    let mut report = match report {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };

    if let Some(first) = &report.first {
        println!(
            "[apply] hotpatch::load: {} {} {} (\"{}\") applied in {}",
            first.id,
            first.name,
            first.version,
            first.description,
            micros(first.load)
        );
        println!("        (load returns once every online worker passed a safepoint)");
        if let Some(revert) = first.revert {
            println!("[revert] patch.revert() in {}", micros(revert));
        }
    }

    let stats = &report.stats;
    println!(
        "\n[results] {} requests in {:.1} s on {} runtime threads ({} parks)",
        report.served,
        report.elapsed.as_secs_f64(),
        report.threads_started,
        report.parks
    );
    println!(
        "  load   (busy workers | mostly parked): {} | {}   (min / median / max;\n          \
         read, map and check the file, then the transition)",
        spread(&mut report.busy.load),
        spread(&mut report.quiet.load)
    );
    println!(
        "  revert (busy workers | mostly parked): {} | {}   (the transition alone)",
        spread(&mut report.busy.revert),
        spread(&mut report.quiet.revert)
    );
    println!(
        "  requests with no await between the calls: {:>9}, mixed versions: {}   <- guaranteed 0",
        stats.plain, stats.plain_mixed
    );
    println!(
        "  awaiting between the calls, request scope: {:>9}, mixed versions: {}   <- guaranteed 0 \
         (resumed on another worker: {})",
        stats.scoped, stats.scoped_mixed, stats.scoped_moved
    );
    println!(
        "  awaiting between the calls, unscoped:      {:>9}, mixed versions: {}   <- NOT guaranteed",
        stats.awaiting - stats.scoped,
        stats.awaiting_mixed - stats.scoped_mixed
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

    if report.problems.is_empty() {
        println!(
            "\nOK: no request without an await and no scoped request mixed versions; {} unscoped \
             awaiting requests did (the control: counted, not a failure; see tokio_service::serve)",
            stats.awaiting_mixed - stats.scoped_mixed
        );
        ExitCode::SUCCESS
    } else {
        for p in &report.problems {
            eprintln!("UNEXPECTED: {p}");
        }
        ExitCode::FAILURE
    }
}
