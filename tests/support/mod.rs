//! Shared by the integration tests: builds the fixture patches once per
//! test process, serializes the tests of one binary, and snapshots what
//! the registry and the patched functions say.
//!
//! A patch is thin: the patch crate's own code, bound to the running
//! binary (see `cargo_hotpatch`). The fixture crates are dev-dependencies
//! of this package, so cargo compiled them in the same invocation as this
//! test binary, with the same features, so with the very symbol names this
//! binary exports (its build.rs links it with `-rdynamic`). [`patch`]
//! links one's objects from that rlib, stamped with this binary's
//! build-id, as `cargo hotpatch build` does. A fixture built with other
//! features ([`patch_with`]) is compiled by a nested `cargo build` into
//! `target/fixtures` (`hotpatch_test_support::nested_build`, the one all
//! harnesses use) and linked without the tool's check, so that the
//! loader's own refusal can be tested.
//!
//! Nothing here depends on the umask, on `TMPDIR` or on where the
//! checkout lives: what a test loads is a copy in [`temp_dir`], a 0755
//! directory of files made 0644 (the default loader refuses a patch that
//! group or others can write, in a directory they can write: a checkout
//! made under umask 002 is one), and that directory is removed when the
//! process exits.

#![allow(dead_code)]

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard, OnceLock};

use hotpatch_test_support::make_dir;
pub use hotpatch_test_support::{nested_build, set_mode, temp_dir};

pub fn root() -> PathBuf {
    hotpatch_test_support::workspace_root()
}

/// The thin patch of fixture patch crate `package` (e.g.
/// `fixture-patch-basic`) for this test binary, linked once per process.
pub fn patch(package: &str) -> PathBuf {
    patch_with(package, &[])
}

/// The thin patch of `package` built with its `features` (e.g. `v2`,
/// which builds it against `fixture-svc/v2`): compiled by a nested cargo,
/// so against other builds of its dependencies than this binary's, and
/// linked unchecked, stamped with this binary's identity. Loading it shows
/// what the runtime does with a patch whose symbols this binary lacks.
///
/// What cargo does not keep apart is the final `lib<package>.rlib` it
/// uplifts, which has no hash: so a package must always be built with the
/// same features (the `patch-v2-*` crates are only ever built with `v2`).
pub fn patch_with(package: &str, features: &[&str]) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<String, (String, PathBuf)>>> = OnceLock::new();
    let features = features.join(",");
    let built = BUILT.get_or_init(Default::default);
    let mut built = built.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((with, path)) = built.get(package) {
        assert_eq!(
            *with, features,
            "fixture {package} is built with one feature set only (see support::patch_with)"
        );
        return path.clone();
    }
    let exe = std::env::current_exe().expect("current_exe");
    let krate = package.replace('-', "_");
    let fixtures = temp_dir().join("fixtures");
    make_dir(&fixtures, 0o755);
    let path = fixtures.join(format!("lib{krate}.so"));
    if features.is_empty() {
        link_outer(package, &krate, &exe, &path);
    } else {
        let rlib = build_nested(package, &krate, &features);
        cargo_hotpatch::link_unchecked(&rlib, &exe, &path)
            .unwrap_or_else(|e| panic!("linking fixture {package}: {e}"));
    }
    set_mode(&path, 0o644);
    built.insert(package.to_owned(), (features, path.clone()));
    path
}

/// Links `package`'s rlib from this binary's own build (its deps
/// directory): of the rlibs cargo left there for it (one per feature set
/// it was ever built with), the newest whose every symbol this binary
/// exports.
fn link_outer(package: &str, krate: &str, exe: &Path, out: &Path) {
    let rlibs = cargo_hotpatch::dev_dependency_rlibs(krate)
        .unwrap_or_else(|e| panic!("looking for {package}'s rlibs: {e}"));
    assert!(
        !rlibs.is_empty(),
        "no lib{krate}-*.rlib next to this binary: is {package} a dev-dependency of \
         hotpatch-suite?"
    );
    let mut last = None;
    for rlib in &rlibs {
        match cargo_hotpatch::link(rlib, exe, out) {
            Ok(_) => return,
            Err(e @ cargo_hotpatch::Error::MissingSymbols { .. }) => last = Some(e),
            Err(e) => match cargo_hotpatch::link_unchecked(rlib, exe, out) {
                // A fixture made to be refused by the loader (its own
                // allocator, no manifest): the runtime's refusal is the
                // test. Only for the newest rlib.
                Ok(_) => return,
                Err(_) => panic!("linking fixture {package} from {}: {e}", rlib.display()),
            },
        }
    }
    panic!(
        "no build of {package} binds to this test binary: {}",
        last.unwrap()
    );
}

/// Builds `package` with `features` by a nested cargo into
/// `target/fixtures`; returns its rlib.
fn build_nested(package: &str, krate: &str, features: &str) -> PathBuf {
    let rlib = nested_build(&[package], &["--lib", "--features", features])
        .join(format!("lib{krate}.rlib"));
    assert!(rlib.exists(), "{} not built", rlib.display());
    rlib
}

/// A copy of `src` named `name` in [`temp_dir`], mode 0644.
pub fn copy_to_temp(src: &Path, name: &str) -> PathBuf {
    let dst = temp_dir().join(name);
    std::fs::copy(src, &dst).unwrap();
    set_mode(&dst, 0o644);
    dst
}

/// Writes `bytes` to `name` in [`temp_dir`], mode 0644.
pub fn write_temp(name: &str, bytes: &[u8]) -> PathBuf {
    let dst = temp_dir().join(name);
    std::fs::write(&dst, bytes).unwrap();
    set_mode(&dst, 0o644);
    dst
}

/// What a test does when this machine cannot run it (`reason`: not root,
/// no fanotify): it fails, unless `HOTPATCH_ALLOW_SKIP=1` is set, in which
/// case it says `SKIPPED` on the harness's own output (not captured) and
/// the caller returns.
pub fn skip(test: &str, reason: &str) {
    if std::env::var("HOTPATCH_ALLOW_SKIP").as_deref() == Ok("1") {
        use std::io::Write;
        // Straight to the process's stderr: `eprintln!` would be captured
        // by the harness and shown only if the test failed.
        let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {reason}");
        return;
    }
    panic!("{test} cannot run here: {reason} (set HOTPATCH_ALLOW_SKIP=1 to skip it)");
}

/// Holds this binary's test lock: every test of a binary patches the same
/// process-wide registry, so they run one at a time.
///
/// Dropping it checks that the test left no patch applied (every test
/// must leave the registry as it found it). If the test is failing
/// anyway, it reverts what is left instead, so one failure does not
/// cascade into the next test.
#[must_use]
pub struct Serial {
    _guard: MutexGuard<'static, ()>,
}

pub fn serial() -> Serial {
    static LOCK: Mutex<()> = Mutex::new(());
    let guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    assert_eq!(
        hotpatch::applied(),
        vec![],
        "a previous test left patches applied"
    );
    Serial { _guard: guard }
}

impl Drop for Serial {
    fn drop(&mut self) {
        let left = hotpatch::applied();
        if std::thread::panicking() {
            for p in left {
                let _ = hotpatch::revert(p.id);
            }
        } else {
            assert_eq!(left, vec![], "the test left patches applied");
        }
    }
}

/// The path of every patchable function whose implementation is not the
/// original, with the patch's name.
pub fn patched() -> Vec<(String, String)> {
    hotpatch::functions()
        .into_iter()
        .filter_map(|f| match f.implementation {
            hotpatch::Implementation::Original => None,
            hotpatch::Implementation::Patch { name, .. } => Some((f.path.to_owned(), name)),
            other => panic!("unexpected implementation {other:?}"),
        })
        .collect()
}

/// What implements `path` now.
pub fn implementation(path: &str) -> hotpatch::Implementation {
    hotpatch::functions()
        .into_iter()
        .find(|f| f.path == path)
        .unwrap_or_else(|| panic!("no patchable function {path}"))
        .implementation
}

/// What a caller of the service observes: the result of calling each
/// patchable function of `svc` that the fixture patches replace.
#[derive(Debug, PartialEq)]
pub struct Calls {
    pub answer: u64,
    pub add: u64,
    pub scale: u32,
    pub quantity: u64,
    pub base: u64,
    pub above_base: u64,
    pub hammer: u64,
    pub checked_div: u64,
    pub total: u64,
    pub first_word: String,
    pub private: u64,
}

pub fn calls() -> Calls {
    let cart = svc::Cart::new(vec![1, 2, 3]);
    Calls {
        answer: svc::answer(),
        add: svc::add(2, 3),
        scale: svc::scale(3),
        quantity: svc::quantity(7),
        base: svc::base(),
        above_base: svc::above_base(),
        hammer: svc::hammer(5),
        checked_div: svc::checked_div(9, 3),
        total: cart.total(),
        first_word: svc::first_word("alpha beta").to_owned(),
        private: svc::call_private(4),
    }
}

/// Everything the registry reports, and what callers see.
#[derive(Debug, PartialEq)]
pub struct Snapshot {
    pub functions: Vec<hotpatch::FunctionInfo>,
    pub applied: Vec<hotpatch::PatchInfo>,
    pub calls: Calls,
}

pub fn snapshot() -> Snapshot {
    Snapshot {
        functions: hotpatch::functions(),
        applied: hotpatch::applied(),
        calls: calls(),
    }
}

/// Distinct files mapped into this process whose `/proc/self/maps` name
/// starts with `prefix`, as (device, inode, name).
pub fn mapped_files(prefix: &str) -> BTreeSet<(String, String, String)> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .filter_map(|line| {
            // address perms offset dev inode name
            let mut fields = line.split_whitespace();
            let (_, _, _, dev, inode) = (
                fields.next()?,
                fields.next()?,
                fields.next()?,
                fields.next()?,
                fields.next()?,
            );
            let name = fields.collect::<Vec<_>>().join(" ");
            name.starts_with(prefix)
                .then(|| (dev.to_owned(), inode.to_owned(), name))
        })
        .collect()
}

/// How many file descriptors this process has open.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Runs `body` in a child process: the current test binary, re-run with
/// only the test `name` (which must be the calling test's name). For
/// tests whose failure mode is killing the process (a signal), so the
/// other tests of the binary still run and report.
///
/// In the child, runs `body`; in the parent, waits for the child and
/// fails with its output unless it passed.
pub fn isolated(name: &str, body: impl FnOnce()) {
    const VAR: &str = "HOTPATCH_TEST_ISOLATED";
    if std::env::var(VAR).as_deref() == Ok(name) {
        body();
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = Command::new(exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(VAR, name)
        .output()
        .expect("run the test binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "test {name} in a child process: {}\n--- stdout\n{stdout}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The good patch the refusal tests keep applied underneath
/// (`answer()` = 10, `add(a, b)` = a + b + 1000 with it).
pub const UNDERNEATH: &str = "fixture-patch-stack-a";

/// `loader` loads `so`, expecting a refusal, with [`UNDERNEATH`] applied.
/// Checks that the message names the file, that nothing changed (full
/// snapshot), and that the service keeps serving before and after the
/// good patch is reverted; returns the error for the caller to match.
pub fn refused_by(loader: &hotpatch::Loader, so: &Path) -> hotpatch::Error {
    let under = hotpatch::load(patch(UNDERNEATH)).unwrap();
    let before = snapshot();
    assert_eq!(before.calls.answer, 10);

    let err = loader.load(so).expect_err("the patch must be refused");
    let message = err.to_string();
    assert!(
        message.contains(&so.display().to_string()),
        "the message names the file: {message}"
    );
    assert_eq!(snapshot(), before, "a refused patch changes nothing");
    assert_eq!(svc::answer(), 10, "the service keeps serving");
    assert_eq!(svc::add(2, 3), 1005);

    under.revert().unwrap();
    assert_eq!(calls().answer, 1, "the service still serves");
    err
}

/// [`refused_by`] with the default loader.
pub fn refused(so: &Path) -> hotpatch::Error {
    refused_by(&hotpatch::Loader::new(), so)
}

/// The error and its sources, as text.
pub fn chain(err: &hotpatch::Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
