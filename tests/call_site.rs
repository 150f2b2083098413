//! The call path in machine code (issue 11, item 3): a patchable call
//! reads its slot straight from the slot's link-time address
//! (`mov slot(%rip), %reg`), not through a GOT cell holding that address,
//! and it does so at the call site itself, in the calling crate, whatever
//! the profile (the wrapper is `#[inline(always)]`).
//!
//! The test reads the instructions of the running binary, so it is
//! x86-64 only, as is the direct load it checks.

#![cfg(all(
    target_arch = "x86_64",
    target_pointer_width = "64",
    target_os = "linux"
))]

use std::hint::black_box;
use std::sync::OnceLock;

use hotpatch::__private::{Entry, SLOTS};
use svc::Priced;

fn u16_at(b: &[u8], at: usize) -> usize {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap()) as usize
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], at: usize) -> usize {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap()) as usize
}

/// The functions of this executable, from its ELF symbol table, as
/// runtime address ranges (so a scan never runs into a neighbour).
fn functions() -> &'static [std::ops::Range<usize>] {
    static FNS: OnceLock<Vec<std::ops::Range<usize>>> = OnceLock::new();
    FNS.get_or_init(|| {
        let exe = std::fs::read("/proc/self/exe").expect("read /proc/self/exe");
        assert_eq!(&exe[..5], b"\x7fELF\x02", "not a 64-bit ELF file");
        // The load bias: where the image starts, minus the address its
        // first segment (file offset 0) was linked at.
        let (phoff, phentsize, phnum) =
            (u64_at(&exe, 0x20), u16_at(&exe, 0x36), u16_at(&exe, 0x38));
        let linked = (0..phnum)
            .map(|i| phoff + i * phentsize)
            .find(|&ph| u32_at(&exe, ph) == 1 && u64_at(&exe, ph + 8) == 0)
            .map(|ph| u64_at(&exe, ph + 0x10))
            .expect("no PT_LOAD at offset 0");
        // SAFETY: `dladdr` only writes `info`; the address is a function
        // of this executable.
        let base = unsafe {
            let mut info: libc::Dl_info = std::mem::zeroed();
            assert_ne!(libc::dladdr(functions as *const libc::c_void, &mut info), 0);
            info.dli_fbase as usize
        };
        let bias = base.wrapping_sub(linked);
        let (shoff, shentsize, shnum) =
            (u64_at(&exe, 0x28), u16_at(&exe, 0x3a), u16_at(&exe, 0x3c));
        let symtab = (0..shnum)
            .map(|i| shoff + i * shentsize)
            .find(|&sh| u32_at(&exe, sh + 4) == 2) // SHT_SYMTAB
            .expect("the test binary has no symbol table");
        let (off, size) = (u64_at(&exe, symtab + 0x18), u64_at(&exe, symtab + 0x20));
        exe[off..off + size]
            .chunks_exact(24)
            .filter(|sym| sym[4] & 0xf == 2 && u64_at(sym, 16) > 0) // STT_FUNC, sized
            .map(|sym| {
                let start = u64_at(sym, 8).wrapping_add(bias);
                start..start + u64_at(sym, 16)
            })
            .collect()
    })
}

/// The code of the function of this executable that starts at `addr`.
fn code_of(addr: usize) -> &'static [u8] {
    let f = functions()
        .iter()
        .filter(|f| f.start == addr)
        .max_by_key(|f| f.end)
        .unwrap_or_else(|| panic!("no function starts at {addr:#x}"));
    // SAFETY: the range is a function of this executable (its symbol
    // table says so): mapped, readable code, never written.
    unsafe { std::slice::from_raw_parts(f.start as *const u8, f.len()) }
}

/// The effective address of every `mov r64, qword ptr [rip + disp32]`
/// (REX.W, `8b`, ModRM mod 00 rm 101) in `code`, matched at any byte
/// offset. Only addresses are computed; nothing at them is read.
fn rip_relative_loads(code: &[u8]) -> Vec<usize> {
    let start = code.as_ptr() as usize;
    code.windows(7)
        .enumerate()
        .filter(|(_, w)| w[0] & 0xf8 == 0x48 && w[1] == 0x8b && w[2] & 0xc7 == 0x05)
        .map(|(i, w)| {
            let disp = i32::from_le_bytes([w[3], w[4], w[5], w[6]]);
            (start + i + 7).wrapping_add_signed(disp as isize)
        })
        .collect()
}

/// The target of every `call rel32` (`e8`) in `code`, matched at any
/// byte offset.
fn direct_calls(code: &[u8]) -> Vec<usize> {
    let start = code.as_ptr() as usize;
    code.windows(5)
        .enumerate()
        .filter(|(_, w)| w[0] == 0xe8)
        .map(|(i, w)| {
            let rel = i32::from_le_bytes([w[1], w[2], w[3], w[4]]);
            (start + i + 5).wrapping_add_signed(rel as isize)
        })
        .collect()
}

fn entry(path: &str) -> &'static Entry {
    SLOTS
        .iter()
        .find(|e| e.path == path)
        .unwrap_or_else(|| panic!("no patchable function {path}"))
}

fn slot_addr(e: &Entry) -> usize {
    e.slot as *const _ as usize
}

/// Every wrapper of the service (free functions, methods, trait methods,
/// `unsafe`, `extern "C"`, `!`) loads its slot from the slot's address.
/// (With the slot read through `Slot::get` in another crate's code, the
/// load is from a GOT cell instead, and this fails.)
#[test]
fn every_wrapper_loads_its_slot_from_the_slots_address() {
    let entries: Vec<&Entry> = SLOTS
        .iter()
        .filter(|e| e.path.starts_with("svc::") || e.path.starts_with("<svc::"))
        .collect();
    assert!(
        entries.len() > 20,
        "fixture-svc's entries are not linked in"
    );
    let wrong: Vec<String> = entries
        .iter()
        .filter(|e| {
            !rip_relative_loads(code_of(e.wrapper.as_ptr() as usize)).contains(&slot_addr(e))
        })
        .map(|e| e.path.to_owned())
        .collect();
    assert!(
        wrong.is_empty(),
        "these wrappers do not load their slot from its address: {wrong:?}"
    );
}

// Call sites in this crate, one per form, each making one call.
#[inline(never)]
fn site_free(a: u64, b: u64) -> u64 {
    svc::add(a, b)
}
#[inline(never)]
fn site_extern_c(x: u32) -> u32 {
    svc::c_abi(x)
}
#[inline(never)]
fn site_unsafe(p: *const u64) -> u64 {
    // SAFETY: the callers pass a pointer to a live `u64`.
    unsafe { svc::read(p) }
}
#[inline(never)]
fn site_method(c: &svc::Cart) -> u64 {
    c.total()
}
#[inline(never)]
fn site_trait_method(c: &svc::Cart) -> u64 {
    c.price()
}
/// The function's own `#[inline(never)]` is about its body, not the wrapper.
#[inline(never)]
fn site_inline_never(x: u64) -> u64 {
    bench_svc::unpatched_inline_never(x)
}

/// A call site in another crate than the function's does the slot load
/// itself: the wrapper is inlined into it and the load is from the slot's
/// address, not from a GOT cell. In an unoptimised build (no inlining at
/// all, `inline(always)` included) the site calls this crate's own copy of
/// the wrapper directly, and that copy loads the slot from its address.
#[test]
fn call_site_in_another_crate_loads_the_slot_itself() {
    let x = 7u64;
    let cart = svc::Cart::new(vec![1, 2, 3]);
    assert_eq!(black_box(site_free)(2, 3), 5);
    assert_eq!(black_box(site_extern_c)(1), 2);
    assert_eq!(black_box(site_unsafe)(&x), 7);
    assert_eq!(black_box(site_method)(&cart), 6);
    assert_eq!(black_box(site_trait_method)(&cart), 12);
    assert_eq!(black_box(site_inline_never)(3), bench_svc::body(3));
    let sites: [(&str, usize); 6] = [
        ("svc::add", site_free as fn(u64, u64) -> u64 as usize),
        ("svc::c_abi", site_extern_c as fn(u32) -> u32 as usize),
        ("svc::read", site_unsafe as fn(*const u64) -> u64 as usize),
        (
            "svc::Cart::total",
            site_method as fn(&svc::Cart) -> u64 as usize,
        ),
        (
            "<svc::Cart as Priced>::price",
            site_trait_method as fn(&svc::Cart) -> u64 as usize,
        ),
        (
            "bench_svc::unpatched_inline_never",
            site_inline_never as fn(u64) -> u64 as usize,
        ),
    ];
    for (path, site) in sites {
        let slot = slot_addr(entry(path));
        let code = code_of(site);
        let loads = rip_relative_loads(code);
        if cfg!(debug_assertions) {
            let copy = direct_calls(code)
                .into_iter()
                .filter(|&t| functions().iter().any(|f| f.start == t))
                .find(|&t| rip_relative_loads(code_of(t)).contains(&slot));
            assert!(
                loads.contains(&slot) || copy.is_some(),
                "the call site of {path} neither loads its slot ({slot:#x}) itself nor calls \
                 a copy of the wrapper that does; rip-relative loads: {loads:x?}"
            );
        } else {
            assert!(
                loads.contains(&slot),
                "the call site of {path} does not load its slot ({slot:#x}) itself; \
                 rip-relative loads: {loads:x?}"
            );
        }
    }
}
