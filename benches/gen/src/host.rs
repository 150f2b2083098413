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

use std::hint::black_box;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
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
