//! Every way a patch file can be unfit gets its own `Error` variant, a
//! message naming the file (and the function, where one is involved), and
//! leaves everything as it was: the registry's tables and what callers
//! see.
//!
//! Each refusal is tried with a good patch already applied
//! (`fixture-patch-stack-a`, which replaces `answer`, `add` and `hammer`),
//! so "unchanged" covers a non-trivial table. Most bad patches also carry
//! a valid replacement of `answer`, which must not be applied either.

mod support;

use std::path::{Path, PathBuf};

use hotpatch::__private::{ABI_VERSION, MANIFEST_SYMBOL, PANIC_STRATEGY, RUSTC_VERSION, TARGET};
use hotpatch::Error;

use support::{chain, refused};

/// `refused`, for errors about one function: the message names it too.
fn refused_naming(so: &Path, function: &str) -> Error {
    let err = refused(so);
    let message = err.to_string();
    assert!(
        message.contains(function),
        "the message names `{function}`: {message}"
    );
    err
}

fn fixture_bytes(package: &str) -> Vec<u8> {
    std::fs::read(support::patch(package)).unwrap()
}

// ---- The file itself

#[test]
fn missing_file() {
    let _serial = support::serial();
    let so = support::temp_dir().join("no-such-patch.so");
    let err = refused(&so);
    assert!(
        matches!(&err, Error::Read { path, source } if path == &so
            && source.kind() == std::io::ErrorKind::NotFound),
        "{err:?}"
    );
}

#[test]
fn a_directory() {
    let _serial = support::serial();
    let dir = support::temp_dir().join("a-directory.so");
    std::fs::create_dir_all(&dir).unwrap();
    let err = refused(&dir);
    assert!(
        matches!(&err, Error::Read { path, source } if path == &dir
            && source.kind() == std::io::ErrorKind::IsADirectory),
        "{err:?}"
    );
}

#[test]
fn empty_file() {
    let _serial = support::serial();
    let so = support::write_temp("empty.so", b"");
    let err = refused(&so);
    assert!(
        matches!(&err, Error::NotLoadable { path, .. } if path == &so),
        "{err:?}"
    );
}

#[test]
fn random_bytes() {
    let _serial = support::serial();
    // xorshift64: the same "random" bytes every run.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let bytes: Vec<u8> = (0..64 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let so = support::write_temp("random.so", &bytes);
    let err = refused(&so);
    assert!(
        matches!(&err, Error::NotLoadable { path, .. } if path == &so),
        "{err:?}"
    );
}

#[test]
fn a_text_file() {
    let _serial = support::serial();
    let so = support::write_temp(
        "text.so",
        "hotpatch_manifest_v1 HOTPATCH\n".repeat(100).as_bytes(),
    );
    let err = refused(&so);
    assert!(
        matches!(&err, Error::NotLoadable { path, .. } if path == &so),
        "{err:?}"
    );
    assert!(chain(&err).contains("not an ELF file"), "{}", chain(&err));
}

/// Where the bytes the loader maps end: the end of the last `PT_LOAD`
/// segment's file contents (ELF64, little-endian). What lies after it
/// (debug info, section headers) is not needed to load the library.
fn loadable_end(elf: &[u8]) -> usize {
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap()) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap()) as usize;
    assert_eq!(&elf[..5], b"\x7fELF\x02", "ELF64");
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    (0..phnum)
        .map(|i| phoff + i * phentsize)
        .filter(|&ph| u32_at(ph) == 1) // PT_LOAD
        .map(|ph| u64_at(ph + 0x08) + u64_at(ph + 0x20)) // p_offset + p_filesz
        .max()
        .unwrap()
}

/// A good patch cut short inside what the loader maps. The documented
/// outcome is `Error::NotLoadable` ("truncated"), from the structural
/// check before `dlopen` (hotpatch/src/elf.rs). Each cut runs in a child
/// process: without that check `dlopen` maps pages past the end of the
/// file and the host dies of SIGBUS, which would take the other tests
/// with it.
fn truncated(name: &str, cut: impl Fn(usize) -> usize) {
    support::isolated(name, || {
        let _serial = support::serial();
        let bytes = fixture_bytes("fixture-patch-basic");
        let end = loadable_end(&bytes);
        let at = cut(end);
        assert!(at < end);
        let so = support::write_temp(&format!("{name}.so"), &bytes[..at]);
        let err = refused(&so);
        assert!(
            matches!(&err, Error::NotLoadable { path, reason } if path == &so
                && reason.ends_with("(truncated?)")),
            "cut at {at} of {end} loadable bytes: {err:?}"
        );
    });
}

#[test]
fn truncated_in_the_first_page() {
    truncated("truncated_in_the_first_page", |_| 4096);
}

#[test]
fn truncated_in_the_middle() {
    truncated("truncated_in_the_middle", |end| end / 2);
}

#[test]
fn truncated_in_the_last_segment() {
    truncated("truncated_in_the_last_segment", |end| end - 256);
}

#[test]
fn truncated_in_the_headers() {
    let _serial = support::serial();
    let bytes = fixture_bytes("fixture-patch-basic");
    for at in [1, 4, 16, 63, 64, 100] {
        let so = support::write_temp(&format!("headers-{at}.so"), &bytes[..at]);
        let err = refused(&so);
        assert!(
            matches!(&err, Error::NotLoadable { path, .. } if path == &so),
            "{at}: {err:?}"
        );
    }
}

/// What is cut off past the loaded segments includes the section headers,
/// which a thin patch needs: its `.hotpatch.host` identity and its symbol
/// tables are found through them, so such a file cannot be checked
/// against this binary and is refused before it is mapped.
#[test]
fn cut_after_the_loaded_segments_is_refused() {
    let _serial = support::serial();
    let bytes = fixture_bytes("fixture-patch-stack-b");
    let end = loadable_end(&bytes);
    assert!(end < bytes.len());
    let so = support::write_temp("no-section-headers.so", &bytes[..end]);
    let err = refused(&so);
    assert!(
        matches!(&err, Error::NotLoadable { path, .. } if path == &so),
        "{err:?}"
    );
}

// ---- A shared object, but not a patch of this process

#[test]
fn a_shared_object_without_a_manifest() {
    let _serial = support::serial();
    let so = support::patch("fixture-patch-no-manifest");
    let err = refused(&so);
    assert!(
        matches!(&err, Error::NoManifest { path, symbol } if path == &so && *symbol == MANIFEST_SYMBOL),
        "{err:?}"
    );
    // Opened once; refused the same way from the cached library.
    let again = refused(&so);
    assert!(matches!(again, Error::NoManifest { .. }), "{again:?}");
}

#[test]
fn bad_magic() {
    let _serial = support::serial();
    let so = support::patch("fixture-patch-bad-magic");
    let err = refused(&so);
    assert!(
        matches!(&err, Error::BadMagic { path, found } if path == &so && found == b"NOTPATCH"),
        "{err:?}"
    );
}

#[test]
fn other_abi_version() {
    let _serial = support::serial();
    let so = support::patch("fixture-patch-bad-abi");
    let err = refused(&so);
    assert!(
        matches!(&err, Error::AbiMismatch { path, host, patch }
            if path == &so && *host == ABI_VERSION && *patch == ABI_VERSION + 1),
        "{err:?}"
    );
}

#[test]
fn other_rustc() {
    let _serial = support::serial();
    let so = support::patch("fixture-patch-bad-rustc");
    let err = refused(&so);
    assert!(
        matches!(&err, Error::RustcMismatch { path, host, patch }
            if path == &so && host == RUSTC_VERSION && patch == "rustc 1.0.0 (a59807616 2015-05-15)"),
        "{err:?}"
    );
}

#[test]
fn other_target() {
    let _serial = support::serial();
    let so = support::patch("fixture-patch-bad-target");
    let err = refused(&so);
    assert!(
        matches!(&err, Error::TargetMismatch { path, host, patch }
            if path == &so && host == TARGET && patch == "riscv64gc-unknown-none-elf"),
        "{err:?}"
    );
}

#[test]
fn other_panic_strategy() {
    let _serial = support::serial();
    assert_eq!(PANIC_STRATEGY, "unwind", "the tests run with panic=unwind");
    let so = support::patch("fixture-patch-bad-panic");
    let err = refused(&so);
    assert!(
        matches!(&err, Error::PanicStrategyMismatch { path, host, patch }
            if path == &so && host == "unwind" && patch == "abort"),
        "{err:?}"
    );
}

#[test]
fn zero_functions() {
    let _serial = support::serial();
    let so = support::patch("fixture-patch-empty");
    let err = refused(&so);
    assert!(
        matches!(&err, Error::InvalidManifest { path, reason } if path == &so
            && reason.contains("no function")),
        "{err:?}"
    );
}

// ---- A patch of this service, but not of this build of it

#[test]
fn the_host_is_the_first_version() {
    // What the v2 fixtures are checked against.
    assert_eq!(svc::scale(3), 30);
    assert_eq!(std::mem::size_of::<svc::Qty>(), 4);
}

/// A function only version 2 of the service has: its entry getter is
/// no symbol of this binary (the registry's UnknownTarget is seen with a
/// hand-made record: tests/hostile.rs, `target_not_an_entry`).
#[test]
fn only_in_another_version_is_missing_symbols() {
    let _serial = support::serial();
    let so = support::patch_with("fixture-patch-v2-unknown", &["v2"]);
    assert_missing(&so, "only_in_v2");
}

#[test]
fn duplicate_target() {
    let _serial = support::serial();
    let so = support::patch("fixture-patch-duplicate");
    let err = refused_naming(&so, "svc::answer");
    assert!(
        matches!(&err, Error::DuplicateTarget { path, function } if path == &so && function == "svc::answer"),
        "{err:?}"
    );
}

/// `so` is refused, before it is mapped, as naming symbols this binary
/// does not have, one of them the entry getter of `svc::{function}` (the
/// symbol a `#[patch]` record binds its target by).
fn assert_missing(so: &Path, function: &str) {
    let symbol = format!("svc::__hotpatch_entry_of_{function}");
    let err = refused_naming(so, &symbol);
    let Error::MissingSymbols { path, symbols } = &err else {
        panic!("{err:?}");
    };
    assert_eq!(path, so);
    assert!(
        symbols.contains(&symbol),
        "a missing symbol is `{symbol}`: {symbols:?}"
    );
}

/// Built against version 2 of the service, where `scale` has another
/// signature: bound by symbol, it names a `scale` this binary lacks.
#[test]
fn another_signature_is_missing_symbols() {
    let _serial = support::serial();
    let so = support::patch_with("fixture-patch-v2-signature", &["v2"]);
    assert_missing(&so, "scale");
}

/// Built against version 2 of the service, whose `quantity` takes a
/// wider type: bound by symbol, refused as missing (LayoutMismatch is
/// seen with a hand-made record: tests/hostile.rs, `record_layout_mismatch`).
#[test]
fn another_layout_is_missing_symbols() {
    let _serial = support::serial();
    let so = support::patch_with("fixture-patch-v2-layout", &["v2"]);
    assert_missing(&so, "quantity");
}

/// Only the return type differs (`svc::Wide` is `u64` in `ret-v2`, `u32`
/// here): the feature makes another build of the service, whose symbols
/// this binary lacks.
#[test]
fn another_return_layout_is_missing_symbols() {
    let _serial = support::serial();
    assert_eq!(std::mem::size_of::<svc::Wide>(), 4, "the host's premise");
    let so = support::patch_with("fixture-patch-ret-layout", &["ret-v2"]);
    assert_missing(&so, "widen");
    assert_eq!(svc::widen(7), 7, "the original still runs");
}

/// Its code is fine for this version, but it was built against version 2
/// of the service: even its target `answer` is another build's symbol.
#[test]
fn built_against_another_version_of_the_service() {
    let _serial = support::serial();
    let so = support::patch_with("fixture-patch-v2-compatible", &["v2"]);
    let err = refused(&so);
    assert!(
        matches!(&err, Error::MissingSymbols { symbols, .. }
            if symbols.iter().any(|s| s == "svc::__hotpatch_entry_of_answer")),
        "{err:?}"
    );
}

// ---- The same patch twice

fn assert_already_applied(so: &Path, first: &hotpatch::Patch) {
    let before = support::snapshot();
    let err = hotpatch::load(so).expect_err("already applied");
    assert!(
        matches!(&err, Error::AlreadyApplied { path, name, id }
            if path == so && name == first.name() && *id == first.id()),
        "{err:?}"
    );
    assert!(err.to_string().contains(&so.display().to_string()), "{err}");
    assert_eq!(support::snapshot(), before);
}

#[test]
fn already_applied() {
    let _serial = support::serial();
    let so = support::patch("fixture-patch-stack-b");
    let first = hotpatch::load(&so).unwrap();
    assert_already_applied(&so, &first);
    // The same bytes at another path are the same patch.
    let copy: PathBuf = support::copy_to_temp(&so, "copy-of-stack-b.so");
    assert_already_applied(&copy, &first);
    first.revert().unwrap();

    // Once reverted, it applies again, from either path.
    let again = hotpatch::load(&copy).unwrap();
    assert_eq!(svc::add(2, 3), 2005);
    again.revert().unwrap();
    assert_eq!(svc::add(2, 3), 5);
}

#[test]
fn a_good_patch_loads_after_refusals() {
    let _serial = support::serial();
    for bad in [
        "fixture-patch-duplicate",
        "fixture-patch-empty",
        "fixture-patch-bad-magic",
    ] {
        assert!(hotpatch::load(support::patch(bad)).is_err());
    }
    let good = hotpatch::load(support::patch(support::UNDERNEATH)).unwrap();
    assert_eq!(svc::answer(), 10);
    good.revert().unwrap();
    assert_eq!(svc::answer(), 1);
}

/// Loads of one patch racing on several threads: it is applied once, the
/// others are told it already is.
#[test]
fn concurrent_loads_apply_once() {
    let _serial = support::serial();
    let so = support::patch("fixture-patch-stack-b");
    let barrier = std::sync::Barrier::new(4);
    let results: Vec<Result<hotpatch::Patch, Error>> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    hotpatch::load(&so)
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let (applied, refused): (Vec<_>, Vec<_>) = results.into_iter().partition(Result::is_ok);
    assert_eq!(applied.len(), 1);
    let patch = applied.into_iter().next().unwrap().unwrap();
    for err in refused.into_iter().map(Result::unwrap_err) {
        assert!(
            matches!(&err, Error::AlreadyApplied { id, .. } if *id == patch.id()),
            "{err:?}"
        );
    }
    assert_eq!(hotpatch::applied(), vec![patch.info().clone()]);
    assert_eq!(svc::add(2, 3), 2005);

    // Reverts racing: one succeeds, the others find it gone.
    let id = patch.id();
    let reverted: Vec<Result<(), Error>> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    hotpatch::revert(id)
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    assert_eq!(reverted.iter().filter(|r| r.is_ok()).count(), 1);
    assert!(
        reverted
            .iter()
            .filter_map(|r| r.as_ref().err())
            .all(|e| matches!(e, Error::NotApplied { id: i } if *i == id))
    );
    assert_eq!(svc::add(2, 3), 5);
}

// ---- A host with two versions of one crate

/// Two versions of the crate `twin` are linked in, each registering
/// `twin::reading`. A thin patch binds by symbol: one built against
/// version 1 replaces version 1's function, and version 2's stays.
#[test]
fn twin_patch_replaces_its_version_only() {
    let _serial = support::serial();
    assert_eq!((twin_v1::reading(), twin_v2::reading()), (1, 2));
    let so = support::patch("fixture-patch-twin");
    let patch = hotpatch::load(&so).unwrap();
    assert_eq!((twin_v1::reading(), twin_v2::reading()), (100, 2));
    patch.revert().unwrap();
    assert_eq!((twin_v1::reading(), twin_v2::reading()), (1, 2));
}
