//! Broken and hostile patch files, beyond tests/errors.rs: ELF files the
//! structural check must turn away before the dynamic loader sees them,
//! and manifests (or the records behind them) with one field corrupted
//! the way a hostile or badly broken patch could.
//!
//! Every refusal is checked as in tests/errors.rs: the exact `Error`
//! variant, a message naming the file, and a full snapshot (functions,
//! applied patches, what callers of the service get) unchanged, with a
//! good patch applied underneath that must still revert.
//!
//! The manifest cases all come from one fixture,
//! `fixture-patch-hostile-manifest`: the test writes a case name into a
//! copy of the library and its initialiser corrupts that one field (see
//! the fixture's docs). Its case `valid` applies, so each refusal is due
//! to the field named in the test.
//!
//! # Where each field is validated
//!
//! The order of `manifest::check` (hotpatch/src/manifest.rs) is the order
//! below; every pointer is checked against the segments of the library
//! that exported the manifest (hotpatch/src/image.rs, `Image`) before
//! anything reads through it. Every row is also fuzzed, with arbitrary
//! raw values, by hotpatch/src/manifest/fuzz.rs.
//!
//! | field | checked in | what | case here |
//! |---|---|---|---|
//! | the symbol's address | `manifest.rs: check` | non-null, aligned, inside a loaded object, 16 header bytes readable | fuzz only (`dlsym` answers an address in the library, or none: errors.rs `a_shared_object_without_a_manifest`) |
//! | `magic`, `abi_version` | `check` | equal to the host's | (errors.rs) |
//! | `manifest_size` | `check` | `size_of::<Manifest>()`; then the whole struct readable | `manifest_size` |
//! | the seven getters (`functions`, `slots`, `shared`, `host_raise`, `host_allocator`, `early_overflow`, `init`) | `check` (`code`) | if set, in the library's executable segments (before any is called) | `*_wild`, `*_in_data`, `*_in_another_object` |
//! | `rustc`, `target`, `panic_strategy` | `check` (`read_str`) | non-null, at most 64 KiB, readable, UTF-8; equal to the host's | `rustc_null`, `target_wild`, `panic_strategy_on_heap` |
//! | `entry_size`, `patch_fn_size`, `shared_entry_size` | `check` | this runtime's sizes | `entry_size` |
//! | `name`, `version`, `description` | `check` (`read_str`) | as the strings above | `name_too_long`, `version_in_another_object`, `description_not_utf8` |
//! | `hotpatch_version` | nowhere | never read | - |
//! | `functions` (what it returns) | `check` (`table`) | set; count at most 2^20, non-null, aligned, whole table readable; at least one | `functions_none`, `functions_*` |
//! | `slots` (what it returns) | `check` (`table`) | set; as `functions` (may be empty) | `slots_none`, `slots_wild_table` |
//! | `shared` (what it returns) | `check` (`table`) | optional; as `functions` | `shared_misaligned` |
//! | `host_allocator` (the cell) | `check` | aligned, writable (not RELRO) | `host_allocator_cell_*` |
//! | `early_overflow` | `check` | called if set; `true` refuses (loader.rs: `apply`) | - |
//! | `host_raise` (the cell) | `check` | set; aligned, writable (not RELRO) | `host_raise_none`, `host_raise_cell_*` |
//! | `init` | `check` (with the getters); called by `Checked::run_init` | in the library's code | `init_wild` |
//! | each `PatchFn`: `target`, `replacement`, `name` | `check` (`records`: `patch_fn`) | target getter and replacement in the library's code, name readable UTF-8; then the target getter is called | `record_*` |
//! | each target's `Entry` | `check` (`entry`, from `patch_fn`) | aligned, readable; `path`, `signature` readable UTF-8; `layouts` aligned, readable, no overflow; `slot` aligned, writable; the five functions in code; then registry.rs: `resolve`, `compatible` | `entry_*` |
//! | each entry of `slots` | `check` (`records`: `entry`) | as above, before `prepare` writes its slot | `entry_slot_*` |
//! | each `SharedEntry` | `check` (`records`: `shared_entry`) | `path`, `ty` readable UTF-8; `local` readable; `target` aligned, writable | `shared_target_*` |
//!
//! What no check can stop is code: the library's initialisers run inside
//! `dlopen`, and the getters, once they are known to be the library's
//! code, are called. The trust policy decides which files get that far.

mod support;

use std::path::{Path, PathBuf};

use hotpatch::Error;

use support::refused;
const HOSTILE: &str = "fixture-patch-hostile-manifest";

// ---- ELF files that are not a shared object of this machine

/// `fixture-patch-basic`, edited by `edit`, written to a file of its own.
fn edited(name: &str, edit: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut bytes = std::fs::read(support::patch("fixture-patch-basic")).unwrap();
    assert_eq!(&bytes[..6], b"\x7fELF\x02\x01", "ELF64, little-endian");
    edit(&mut bytes);
    support::write_temp(name, &bytes)
}

fn put_u16(bytes: &mut [u8], at: usize, v: u16) {
    bytes[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(bytes: &mut [u8], at: usize, v: u64) {
    bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// File offsets of the program headers of type `p_type`.
fn program_headers(bytes: &[u8], p_type: u32) -> Vec<usize> {
    let u16_at = |o: usize| u16::from_le_bytes(bytes[o..o + 2].try_into().unwrap()) as usize;
    let phoff = u64::from_le_bytes(bytes[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum)
        .map(|i| phoff + i * phentsize)
        .filter(|&ph| u32::from_le_bytes(bytes[ph..ph + 4].try_into().unwrap()) == p_type)
        .collect()
}

const PT_LOAD: u32 = 1;

/// Refused by the structural check (elf.rs) with a reason containing
/// `why`, before the dynamic loader sees the file.
fn not_loadable(so: &Path, why: &str) {
    let err = refused(so);
    assert!(
        matches!(&err, Error::NotLoadable { path, reason } if path == so && reason.contains(why)),
        "expected NotLoadable (\"{why}\"): {err:?}"
    );
}

/// `e_machine` = 183 (AArch64): a good patch, built for another machine.
#[test]
fn elf_of_another_architecture() {
    let _serial = support::serial();
    let so = edited("aarch64.so", |b| put_u16(b, 18, 183));
    not_loadable(&so, "ELF machine 183 is not this machine's");
}

/// `EI_CLASS` = 1: a 32-bit ELF.
#[test]
fn elf_of_32_bits() {
    let _serial = support::serial();
    let so = edited("elf32.so", |b| b[4] = 1);
    not_loadable(&so, "not a 64-bit ELF file");
}

/// `EI_DATA` = 2 (big-endian), and values that are no byte order.
#[test]
fn elf_of_another_byte_order() {
    let _serial = support::serial();
    let so = edited("big-endian.so", |b| b[5] = 2);
    not_loadable(&so, "byte order differs");
    for order in [0, 3, 0xff] {
        let so = edited(&format!("byte-order-{order}.so"), |b| b[5] = order);
        not_loadable(&so, "unknown ELF byte order");
    }
}

/// `e_type`: an executable (`ET_EXEC`), a relocatable object, a core
/// file, each with otherwise sound headers.
#[test]
fn elf_that_is_not_a_shared_object() {
    let _serial = support::serial();
    for (e_type, what) in [(2, "exec"), (1, "rel"), (4, "core"), (0xfe00, "os")] {
        let so = edited(&format!("type-{what}.so"), |b| put_u16(b, 16, e_type));
        not_loadable(&so, &format!("ELF type {e_type} is not a shared object"));
    }
}

/// A position-independent executable is `ET_DYN` like a shared object, so
/// the structural check lets it through; the dynamic loader refuses it
/// (glibc >= 2.30: "cannot dynamically load position-independent
/// executable") before running any of its code. The test binary itself,
/// and `/bin/true`.
///
/// The reason is only libloading's "dlopen failed" today: loader.rs keeps
/// the error's `Display`, and libloading puts `dlerror()`'s text in its
/// `source`.
#[test]
#[cfg_attr(
    not(target_env = "gnu"),
    ignore = "glibc's dlopen refuses executables; another libc's may not"
)]
fn a_position_independent_executable() {
    let _serial = support::serial();
    // A copy: the binary itself takes the umask (0775 under umask 002),
    // and would be refused as untrusted before dlopen sees it.
    let exe = std::env::current_exe().unwrap();
    let mut executables = vec![support::copy_to_temp(&exe, "this-test-binary")];
    if Path::new("/bin/true").exists() {
        executables.push("/bin/true".into());
    }
    for exe in executables {
        let bytes = std::fs::read(&exe).unwrap();
        assert_eq!(u16::from_le_bytes([bytes[16], bytes[17]]), 3, "ET_DYN");
        let err = refused(&exe);
        assert!(
            matches!(&err, Error::NotLoadable { path, reason } if path == &exe
                && reason.starts_with("dlopen failed")),
            "{err:?}"
        );
    }
}

/// `e_phoff`, `e_phnum`: a program header table that runs past the end of
/// the file, including offsets whose sum overflows.
#[test]
fn program_headers_past_the_end() {
    let _serial = support::serial();
    type Edit = fn(&mut Vec<u8>);
    let cases: [(&str, Edit); 4] = [
        ("phoff-near-end", |b| {
            let at = b.len() as u64 - 8;
            put_u64(b, 0x20, at)
        }),
        ("phoff-max", |b| put_u64(b, 0x20, u64::MAX)),
        ("phoff-overflow", |b| put_u64(b, 0x20, u64::MAX - 100)),
        ("phnum-max", |b| put_u16(b, 0x38, u16::MAX)),
    ];
    for (name, edit) in cases {
        let so = edited(&format!("{name}.so"), edit);
        not_loadable(&so, "program header table lies past the end");
    }
}

/// `e_phentsize` smaller than a program header.
#[test]
fn program_header_entries_too_small() {
    let _serial = support::serial();
    let so = edited("phentsize.so", |b| put_u16(b, 0x36, 32));
    not_loadable(&so, "program header entries of 32 bytes");
}

/// `p_filesz` and `p_offset` of a loadable segment: past the end of the
/// file, and overflowing when added.
#[test]
fn loadable_segment_past_the_end() {
    let _serial = support::serial();
    let so = edited("filesz-max.so", |b| {
        let ph = program_headers(b, PT_LOAD)[0];
        put_u64(b, ph + 0x20, u64::MAX);
    });
    not_loadable(&so, "past the end of the");
    let so = edited("offset-past-end.so", |b| {
        let ph = *program_headers(b, PT_LOAD).last().unwrap();
        let len = b.len() as u64;
        put_u64(b, ph + 0x08, len);
    });
    not_loadable(&so, "past the end of the");
}

/// Every `PT_LOAD` turned into `PT_NULL`: nothing to map.
#[test]
fn no_loadable_segment() {
    let _serial = support::serial();
    let so = edited("no-load.so", |b| {
        for ph in program_headers(b, PT_LOAD) {
            b[ph..ph + 4].copy_from_slice(&0u32.to_le_bytes());
        }
    });
    not_loadable(&so, "no loadable segment");
}

// ---- Files that are no file

/// A FIFO at the patch's path: `load` must refuse it, not wait for a
/// writer (`trust::read` opens with `O_NONBLOCK`, then checks the type).
#[test]
fn a_fifo() {
    let _serial = support::serial();
    let fifo = support::temp_dir().join("fifo.so");
    let _ = std::fs::remove_file(&fifo);
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    assert!(made.is_ok_and(|s| s.success()), "mkfifo");
    let (tx, rx) = std::sync::mpsc::channel();
    let path = fifo.clone();
    let loader = std::thread::spawn(move || tx.send(hotpatch::load(&path).map(drop)));
    // A guard against a hang, not a speed check: a FIFO open that waits
    // for a writer never returns.
    let result = rx.recv_timeout(std::time::Duration::from_secs(30));
    if result.is_err() {
        // Let the blocked open through (it returns once a writer opens),
        // so that the thread ends.
        drop(std::fs::OpenOptions::new().write(true).open(&fifo));
        loader.join().unwrap().unwrap();
        panic!("load blocked for 30 s opening a FIFO");
    }
    let err = result.unwrap().unwrap_err();
    assert!(
        matches!(&err, Error::Read { path, .. } if path == &fifo),
        "{err:?}"
    );
}

// ---- Manifests: one field corrupted by the hostile fixture

const MARKER: &[u8] = b"hotpatch-hostile-case:";

/// A copy of the hostile fixture that plays `case`.
fn hostile(case: &str) -> PathBuf {
    let mut bytes = std::fs::read(support::patch(HOSTILE)).unwrap();
    let at: Vec<usize> = bytes
        .windows(MARKER.len())
        .enumerate()
        .filter(|(_, w)| *w == MARKER)
        .map(|(i, _)| i + MARKER.len())
        .collect();
    assert_eq!(at.len(), 1, "one case placeholder in the fixture");
    let name = &mut bytes[at[0]..at[0] + 64 - MARKER.len()];
    assert!(case.len() <= name.len());
    name.fill(b' ');
    name[..case.len()].copy_from_slice(case.as_bytes());
    support::write_temp(&format!("hostile-{case}.so"), &bytes)
}

/// Refused with `InvalidManifest` whose reason contains `why`.
fn invalid(case: &str, why: &str) {
    let so = hostile(case);
    let err = refused(&so);
    assert!(
        matches!(&err, Error::InvalidManifest { path, reason } if path == &so && reason.contains(why)),
        "{case}: expected InvalidManifest (\"{why}\"): {err:?}"
    );
}

/// The fixture with nothing corrupted applies: every refusal below is due
/// to the one field its case changes.
#[test]
fn hostile_fixture_uncorrupted_applies() {
    let _serial = support::serial();
    let patch = hotpatch::load(hostile("valid")).unwrap();
    assert_eq!(svc::answer(), 4242);
    assert_eq!(patch.functions(), ["svc::answer"]);
    patch.revert().unwrap();
    assert_eq!(svc::answer(), 1);
}

/// A typo in a case name must not pass for `valid`.
#[test]
fn hostile_fixture_unknown_case_is_refused() {
    let _serial = support::serial();
    let so = hostile("no_such_case");
    let err = refused(&so);
    assert!(
        matches!(&err, Error::BadMagic { found, .. } if found == b"NOSUCHCS"),
        "{err:?}"
    );
}

/// One test per case: `name => "case", "what the reason says"`.
macro_rules! invalid_manifest {
    ($($(#[$doc:meta])* $test:ident => $case:literal, $why:literal;)*) => {$(
        $(#[$doc])*
        #[test]
        fn $test() {
            let _serial = support::serial();
            invalid($case, $why);
        }
    )*};
}

invalid_manifest! {
    /// `manifest_size`: another layout of the manifest.
    manifest_size => "manifest_size", "expected";
    /// `entry_size`: another layout of `Entry`.
    entry_size => "entry_size", "table entry sizes differ";

    /// `rustc.ptr` null.
    string_rustc_null => "rustc_null", "`rustc` is a null string";
    /// `target.ptr` at an address nothing is mapped at.
    string_target_wild => "target_wild", "`target` points outside the library's readable memory";
    /// `panic_strategy.ptr` on the heap: readable, right bytes, but not
    /// the library's.
    string_panic_strategy_on_heap => "panic_strategy_on_heap", "`panic_strategy` points outside";
    /// `name.len` one byte over 64 KiB.
    string_name_too_long => "name_too_long", "`name` is 65537 bytes long (at most 65536)";
    /// `version.ptr` into another object's code (the C library's).
    string_version_in_another_object => "version_in_another_object", "`version` points outside";
    /// `description` not UTF-8.
    string_description_not_utf8 => "description_not_utf8", "`description` is not UTF-8";

    /// `functions` getter unset.
    getter_functions_none => "functions_none", "the function table getter is null";
    /// `slots` getter unset.
    getter_slots_none => "slots_none", "the slot table getter is null";
    /// `host_raise` getter unset.
    getter_host_raise_none => "host_raise_none", "the host-raise getter is null";
    /// `functions` getter at an unmapped address: refused, not called.
    getter_functions_wild => "functions_wild", "`functions` points outside the library's code";
    /// `slots` getter at the library's read-only data.
    getter_slots_in_data => "slots_in_data", "`slots` points outside the library's code";
    /// `shared` getter near the top of the address space.
    getter_shared_wild => "shared_wild", "`shared` points outside the library's code";
    /// `host_raise` getter at a function of another object (`getpid`).
    getter_host_raise_in_another_object => "host_raise_in_another_object", "`host_raise` points outside the library's code";
    /// `host_allocator` getter at the library's relocated data.
    getter_host_allocator_in_data => "host_allocator_in_data", "`host_allocator` points outside the library's code";
    /// `early_overflow` getter at an unmapped address.
    getter_early_overflow_wild => "early_overflow_wild", "`early_overflow` points outside the library's code";
    /// `init` at an unmapped address.
    getter_init_wild => "init_wild", "`init` points outside the library's code";

    /// `functions` returns null with a count of 3.
    functions_table_null => "functions_null_table", "the function table is null";
    /// `functions` returns a table one byte off its alignment.
    functions_table_misaligned => "functions_misaligned", "the function table is misaligned";
    /// `functions` returns a good copy of the table, on the heap.
    functions_table_on_heap => "functions_on_heap", "the function table lies outside the library's memory";
    /// `functions` returns a count of `usize::MAX`.
    functions_table_huge_count => "functions_huge_count", "the function table has 18446744073709551615 entries";
    /// `functions` returns a count that runs past the library's memory.
    functions_table_past_the_end => "functions_past_the_end", "the function table lies outside the library's memory";
    /// `slots` returns a table at an unmapped address.
    slots_table_wild => "slots_wild_table", "the slot table lies outside the library's memory";
    /// `shared` returns a misaligned table.
    shared_table_misaligned => "shared_misaligned", "the shared static table is misaligned";

    /// `host_raise` returns null.
    host_raise_cell_null => "host_raise_cell_null", "the host-raise cell is misaligned or outside the library's writable memory";
    /// `host_raise` returns a cell on the heap.
    host_raise_cell_on_heap => "host_raise_cell_on_heap", "the host-raise cell is misaligned or outside the library's writable memory";
    /// `host_raise` returns a cell in read-only data.
    host_raise_cell_read_only => "host_raise_cell_read_only", "the host-raise cell is misaligned or outside the library's writable memory";
    /// `host_raise` returns a misaligned cell.
    host_raise_cell_misaligned => "host_raise_cell_misaligned", "the host-raise cell is misaligned or outside the library's writable memory";
    /// `host_allocator` returns a cell in code.
    host_allocator_cell_in_code => "host_allocator_cell_in_code", "the allocator cell is misaligned or outside the library's writable memory";

    /// `PatchFn::replacement` null.
    record_replacement_null => "record_replacement_null", "a replacement record points outside the library's code";
    /// `PatchFn::target` (a getter) at data: refused, not called.
    record_target_in_data => "record_target_in_data", "a replacement record points outside the library's code";
    /// `PatchFn::name` at an unmapped address.
    record_name_wild => "record_name_wild", "a replacement record points outside the library's code";

    /// The target getter returns a good copy of the entry, on the heap.
    entry_on_heap => "entry_on_heap", "an entry lies outside the library's memory";
    /// The target getter returns a misaligned entry.
    entry_misaligned => "entry_misaligned", "an entry lies outside the library's memory";
    /// `Entry::path` at an unmapped address.
    entry_path_wild => "entry_path_wild", "an entry points outside the library's memory or code";
    /// `Entry::original` at an unmapped address.
    entry_original_wild => "entry_original_wild", "an entry points outside the library's memory or code";
}

/// `Entry::path` not UTF-8: a `&str` the registry would hash, print and
/// copy into the error.
#[test]
fn entry_path_not_utf8() {
    let _serial = support::serial();
    invalid("entry_path_not_utf8", "not UTF-8");
}

/// `Entry::layouts` with a length whose size in bytes overflows.
#[test]
fn entry_layouts_overflow() {
    let _serial = support::serial();
    invalid(
        "entry_layouts_overflow",
        "an entry points outside the library's memory or code",
    );
}

/// `Entry::slot` of the slot table misaligned: the runtime would store
/// to it (redirecting the patch's copy of `answer` to the host).
#[test]
fn entry_slot_misaligned() {
    let _serial = support::serial();
    invalid(
        "entry_slot_misaligned",
        "an entry points outside the library's memory",
    );
}

/// `SharedEntry::target` misaligned: the runtime would store to it.
#[test]
fn shared_target_misaligned() {
    let _serial = support::serial();
    invalid("shared_target_misaligned", "a shared static's record");
}

// ---- Cells the runtime writes to, in memory that is read-only

/// The premise of the `*_relro` cases: the fixture's `RELRO` static lies
/// in a segment marked writable (`PF_W`) that the dynamic loader made
/// read-only after relocation (`PT_GNU_RELRO`), and `READ_ONLY` in
/// read-only data. Checked on a separate mapping of the fixture, against
/// the kernel's view.
#[test]
fn relro_premise() {
    let _serial = support::serial();
    let so = support::copy_to_temp(&support::patch(HOSTILE), "hostile-premise.so");
    // SAFETY: the fixture's initialiser, with the placeholder case
    // `valid`, only writes the library's own statics.
    let lib = unsafe { libloading::Library::new(&so) }.unwrap();
    for (symbol, perms) in [
        (&b"hotpatch_hostile_relro\0"[..], "r--p"),
        (b"hotpatch_hostile_read_only\0", "r--p"),
    ] {
        // SAFETY: the address of a static, not read.
        let addr = unsafe { lib.get::<*const u8>(symbol) }.map(|s| *s).unwrap() as usize;
        assert_eq!(
            permissions(addr),
            perms,
            "{}",
            String::from_utf8_lossy(symbol)
        );
    }
    std::mem::forget(lib);
}

/// The permissions `/proc/self/maps` gives the mapping containing `addr`.
fn permissions(addr: usize) -> String {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .find_map(|line| {
            let (range, rest) = line.split_once(' ')?;
            let (start, end) = range.split_once('-')?;
            let start = usize::from_str_radix(start, 16).ok()?;
            let end = usize::from_str_radix(end, 16).ok()?;
            (start..end)
                .contains(&addr)
                .then(|| rest.split_whitespace().next().unwrap().to_owned())
        })
        .unwrap_or_else(|| format!("unmapped {addr:#x}"))
}

/// Cases where a check that passed too much would make the runtime write
/// to read-only memory: run in a child process, so that a regression is a
/// failed test rather than the end of this binary.
macro_rules! invalid_manifest_isolated {
    ($($(#[$doc:meta])* $test:ident => $case:literal, $why:literal;)*) => {$(
        $(#[$doc])*
        #[test]
        fn $test() {
            support::isolated(stringify!($test), || {
                let _serial = support::serial();
                invalid($case, $why);
            });
        }
    )*};
}

invalid_manifest_isolated! {
    /// `host_raise` returns a cell in RELRO, which `prepare` writes.
    host_raise_cell_relro => "host_raise_cell_relro", "the host-raise cell is misaligned or outside the library's writable memory";
    /// `host_allocator` returns a cell in RELRO, which `prepare` writes.
    host_allocator_cell_relro => "host_allocator_cell_relro", "the allocator cell is misaligned or outside the library's writable memory";
    /// `Entry::slot` of the slot table in RELRO, which `prepare` redirects.
    entry_slot_relro => "entry_slot_relro", "an entry points outside the library's memory";
    /// `SharedEntry::target` in RELRO, which `prepare` writes (for a
    /// static the host shares).
    shared_target_relro => "shared_target_relro", "a shared static's record";
}
