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
//! | the symbol's address | `manifest.rs: locate` | non-null, aligned, inside a loaded object, 16 header bytes readable | fuzz only (`dlsym` answers an address in the library, or none: errors.rs `a_shared_object_without_a_manifest`) |
//! | `magic`, `abi_version` | `header` | equal to the host's | (errors.rs) |
//! | `manifest_size` | `whole` | `size_of::<Manifest>()`; then the whole struct readable | `manifest_size` |
//! | the function fields (`functions`, `slot_refs`, `init`) | `code_fields` | if set, in the library's executable segments (before any is called) | `getter_*` |
//! | `panics` | `code_fields` | non-null, aligned, in the library's writable memory, not RELRO | `panics_*` |
//! | `rustc`, `target`, `panic_strategy` | `strings` (`read_str`) | non-null, at most 64 KiB, readable, UTF-8; equal to the host's | `string_rustc_null`, `string_target_wild`, `string_panic_strategy_on_heap` |
//! | `entry_size`, `patch_fn_size` | `strings` | this runtime's sizes | `entry_size`, `patch_fn_size` |
//! | `name`, `version`, `description` | `strings` (`read_str`) | as the strings above | `string_name_too_long`, `string_version_in_another_object`, `string_description_not_utf8` |
//! | `hotpatch_version` | `strings` | validated, not compared | - |
//! | `functions` (what it returns) | `getters` (`table`) | set; count at most 2^20, non-null, aligned, whole table readable; at least one | `getter_functions_none`, `functions_table_*` |
//! | `slot_refs` (what it returns) | `getters` (`table`) | optional; as `functions` (may be empty), and the cells writable, not RELRO | `slot_refs_table_*` |
//! | each slot reference's value | registry.rs: `plan` | the slot of one of the host's patchable functions (or its wrapper, when the library is reused) | `slot_ref_not_a_host_slot` |
//! | `init` | `code_fields`; called by the loader after the plan | in the library's code | `getter_init_*` |
//! | each `PatchFn`: `replacement`, `name`, `layouts` | `records` (`patch_fn`) | replacement in the library's code, name readable UTF-8, layouts aligned and readable (no overflow) | `record_replacement_*`, `record_name_wild`, `record_layouts_*` |
//! | each `PatchFn::target` | `records` (`patch_fn`) | the host's code: not the library's (a private copy), not another object's; only then called | `record_target_*` |
//! | what the target getter returns | registry.rs: `plan` | one of the host's own entries, by address | `record_target_not_an_entry` |
//! | `PatchFn::layouts` against the host entry's | registry.rs: `compatible` | the same sizes and alignments | `record_layout_mismatch` |
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
/// the structural check lets it through; it names no service build (no
/// `.hotpatch.host` section), so it is refused as not a thin patch before
/// `dlopen` could run any of its code. The test binary itself, and
/// `/bin/true`.
#[test]
fn a_position_independent_executable() {
    let _serial = support::serial();
    // A copy: the binary itself takes the umask (0775 under umask 002),
    // and would be refused as untrusted before dlopen sees it.
    let exe = std::env::current_exe().unwrap();
    let mut executables = vec![support::copy_to_temp(&exe, "this-test-binary")];
    if Path::new("/bin/true").exists() {
        executables.push("/bin/true".into());
    }
    // The unoptimised test binary is about the default size limit (64 MiB)
    // and grows with the code: the size is not what is tested here.
    let loader = hotpatch::Loader::new().max_file_size(1 << 30);
    for exe in executables {
        let bytes = std::fs::read(&exe).unwrap();
        assert_eq!(u16::from_le_bytes([bytes[16], bytes[17]]), 3, "ET_DYN");
        let err = support::refused_by(&loader, &exe);
        assert!(
            matches!(&err, Error::NotThin { path } if path == &exe),
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
    /// `patch_fn_size`: another layout of `PatchFn`.
    patch_fn_size => "patch_fn_size", "table entry sizes differ";

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
    /// `functions` getter at an unmapped address: refused, not called.
    getter_functions_wild => "functions_wild", "`functions` points outside the library's code";
    /// `slot_refs` getter near the top of the address space.
    getter_slot_refs_wild => "slot_refs_wild", "`slot_refs` points outside the library's code";
    /// `slot_refs` getter at the library's read-only data.
    getter_slot_refs_in_data => "slot_refs_in_data", "`slot_refs` points outside the library's code";
    /// `init` at an unmapped address.
    getter_init_wild => "init_wild", "`init` points outside the library's code";
    /// `init` at a function of another object (`getpid`).
    getter_init_in_another_object => "init_in_another_object", "`init` points outside the library's code";

    /// The panic counter null.
    panics_null => "panics_null", "the panic counter is null, misaligned or outside the library's writable memory";
    /// The panic counter one byte off its alignment.
    panics_misaligned => "panics_misaligned", "the panic counter is null, misaligned or outside the library's writable memory";
    /// The panic counter in RELRO (a writable segment, read-only once
    /// relocated): the shims' `fetch_add` would fault.
    panics_relro => "panics_relro", "the panic counter is null, misaligned or outside the library's writable memory";
    /// The panic counter in read-only data.
    panics_read_only => "panics_read_only", "the panic counter is null, misaligned or outside the library's writable memory";
    /// The panic counter on the heap: writable, but not the library's.
    panics_on_heap => "panics_on_heap", "the panic counter is null, misaligned or outside the library's writable memory";

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
    /// `functions` returns an empty table.
    functions_table_empty => "functions_empty", "the patch replaces no function";

    /// `slot_refs` returns a table at an unmapped address.
    slot_refs_table_wild => "slot_refs_wild_table", "the slot reference table lies outside the library's memory";
    /// `slot_refs` returns a misaligned table.
    slot_refs_table_misaligned => "slot_refs_misaligned", "the slot reference table is misaligned";
    /// `slot_refs` returns a table in read-only data.
    slot_refs_table_read_only => "slot_refs_read_only", "the slot references are outside the library's writable memory";
    /// `slot_refs` returns a good cell, on the heap.
    slot_refs_table_on_heap => "slot_refs_on_heap", "the slot reference table lies outside the library's memory";
    /// A slot reference holding an address that is no slot of the host:
    /// the loader would store a wrapper there and patch code call it.
    slot_ref_not_a_host_slot => "slot_ref_not_a_slot", "is not the slot of a patchable function of this process";

    /// `PatchFn::replacement` null.
    record_replacement_null => "record_replacement_null", "a replacement record points outside the library's code";
    /// `PatchFn::replacement` in another object's code (`getpid`).
    record_replacement_in_another_object => "record_replacement_in_another_object", "a replacement record points outside the library's code";
    /// `PatchFn::name` at an unmapped address.
    record_name_wild => "record_name_wild", "a replacement record points outside the library's code";
    /// `PatchFn::layouts` at an unmapped address.
    record_layouts_wild => "record_layouts_wild", "a replacement record points outside the library's code";
    /// `PatchFn::layouts` with a length whose size in bytes overflows.
    record_layouts_overflow => "record_layouts_overflow", "a replacement record points outside the library's code";
    /// `PatchFn::layouts`, right values, on the heap.
    record_layouts_on_heap => "record_layouts_on_heap", "a replacement record points outside the library's code";

    /// The target getter in the library's read-only data: neither image's
    /// code, not called.
    record_target_in_data => "record_target_in_data", "is neither the library's code nor this process's";
    /// The target getter at an unmapped address.
    record_target_wild => "record_target_wild", "is neither the library's code nor this process's";
    /// The target getter in another object's code (`getpid`).
    record_target_in_another_object => "record_target_in_another_object", "is neither the library's code nor this process's";
    /// The target getter is the patch's own code: what a patch linking a
    /// private copy of the service would name. Refused, not called.
    record_target_own_copy => "record_target_own_copy", "is a copy inside the patch, not this process's function";
}

/// Something the hostile fixture's record can name as its target getter:
/// code of the host that returns an address that is no entry of the
/// registry's (`record_target_not_an_entry`).
#[unsafe(no_mangle)]
pub fn hotpatch_hostile_not_an_entry() -> *const u8 {
    static NOT_AN_ENTRY: [u64; 16] = [0; 16];
    NOT_AN_ENTRY.as_ptr().cast()
}

/// The target getter is the host's code, but what it returns is no entry
/// of the host's: the registry finds entries by address, never trusting
/// what a getter hands over.
#[test]
fn record_target_not_an_entry() {
    let _serial = support::serial();
    // Keeps the export, and checks the premise: it is not an entry.
    let not_an_entry = std::hint::black_box(hotpatch_hostile_not_an_entry as fn() -> *const u8)();
    assert!(!not_an_entry.is_null());
    let so = hostile("record_target_not_an_entry");
    let err = refused(&so);
    assert!(
        matches!(&err, Error::UnknownTarget { path, function } if path == &so
            && function == "fixture_patch_hostile_manifest::answer"),
        "{err:?}"
    );
}

/// A hand-made record whose layouts say `answer` returns a `u32`: the host
/// entry's say `u64`.
#[test]
fn record_layout_mismatch() {
    let _serial = support::serial();
    let so = hostile("record_layout_mismatch");
    let err = refused(&so);
    assert!(
        matches!(&err, Error::LayoutMismatch { path, function, detail } if path == &so
            && function == "svc::answer"
            && detail == "the return type has size 8 align 8 in this process but size 4 align 4 in the patch"),
        "{err:?}"
    );
}

// ---- Cells the runtime writes to, in memory that is read-only

/// The premise of the `*_relro` and `*_read_only` cases: the fixture's
/// `RELRO` static lies in a segment marked writable (`PF_W`) that the
/// dynamic loader made read-only after relocation (`PT_GNU_RELRO`), and
/// `READ_ONLY` in read-only data. Each is found as those cases point the
/// panic counter at it (a thin patch exports nothing but its manifest),
/// on a separate mapping of the fixture, and checked against the kernel's
/// view.
#[test]
fn relro_premise() {
    let _serial = support::serial();
    for case in ["panics_relro", "panics_read_only"] {
        let so = support::copy_to_temp(&hostile(case), &format!("premise-{case}.so"));
        // SAFETY: the fixture's initialiser only writes the library's own
        // statics; nothing of it is called here.
        let lib = unsafe { libloading::Library::new(&so) }.unwrap();
        // SAFETY: the address of the manifest static, read below as
        // `Manifest` (the fixture's, same compiler and crate).
        let m =
            unsafe { lib.get::<*const hotpatch::__private::Manifest>(b"hotpatch_manifest_v1\0") }
                .map(|s| *s)
                .unwrap();
        // SAFETY: the manifest is in the mapped library; the field is read
        // as a plain word, never dereferenced.
        let addr = unsafe { std::ptr::addr_of!((*m).panics).cast::<usize>().read() };
        assert_eq!(permissions(addr), "r--p", "{case}: {addr:#x}");
        std::mem::forget(lib);
    }
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
    /// `slot_refs` returns a table in RELRO, which `prepare` writes.
    slot_refs_table_relro => "slot_refs_relro", "the slot references are outside the library's writable memory";
}
