//! The call path in machine code (issue 11, item 3): a patchable call
//! reads its slot straight from the slot's link-time address
//! (`mov slot(%rip), %reg`), not through a GOT cell holding that address,
//! and it does so at the call site itself, in the calling crate, whatever
//! the profile (the wrapper is `#[inline(always)]`).
//!
//! The test reads the instructions of the running binary, so it is
//! x86-64 only, as is the direct load it checks.

#![cfg(target_arch = "x86_64")]

use std::hint::black_box;

use hotpatch::__private::{Entry, SLOTS};
use svc::Priced;

/// The readable mapping of this process that contains `addr`, as a range.
fn mapping_of(addr: usize) -> std::ops::Range<usize> {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("read /proc/self/maps");
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (range, perms) = (fields.next().unwrap(), fields.next().unwrap());
        let (start, end) = range.split_once('-').unwrap();
        let start = usize::from_str_radix(start, 16).unwrap();
        let end = usize::from_str_radix(end, 16).unwrap();
        if (start..end).contains(&addr) && perms.starts_with('r') {
            return start..end;
        }
    }
    panic!("{addr:#x} is in no readable mapping");
}

/// The effective address of every `mov r64, qword ptr [rip + disp32]`
/// (REX.W, `8b`, ModRM mod 00 rm 101) among the first `len` bytes of code
/// at `start`, found at any byte offset. Only addresses are computed;
/// nothing at them is read.
fn rip_relative_loads(start: usize, len: usize) -> Vec<usize> {
    let end = (start + len).min(mapping_of(start).end);
    // SAFETY: `start..end` lies inside one readable mapping (checked
    // above), the code of this process, which is never written.
    let code = unsafe { std::slice::from_raw_parts(start as *const u8, end - start) };
    code.windows(7)
        .enumerate()
        .filter(|(_, w)| w[0] & 0xf8 == 0x48 && w[1] == 0x8b && w[2] & 0xc7 == 0x05)
        .map(|(i, w)| {
            let disp = i32::from_le_bytes([w[3], w[4], w[5], w[6]]);
            (start + i + 7).wrapping_add_signed(disp as isize)
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
        .filter(|e| !rip_relative_loads(e.wrapper.as_ptr() as usize, 256).contains(&slot_addr(e)))
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

/// A call site in another crate than the function's does the slot load
/// itself: the wrapper is inlined into it (in unoptimised builds too) and
/// the load is from the slot's address, not from a GOT cell.
#[test]
fn call_site_in_another_crate_loads_the_slot_itself() {
    let x = 7u64;
    let cart = svc::Cart::new(vec![1, 2, 3]);
    assert_eq!(black_box(site_free)(2, 3), 5);
    assert_eq!(black_box(site_extern_c)(1), 2);
    assert_eq!(black_box(site_unsafe)(&x), 7);
    assert_eq!(black_box(site_method)(&cart), 6);
    assert_eq!(black_box(site_trait_method)(&cart), 12);
    let sites: [(&str, usize); 5] = [
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
    ];
    for (path, site) in sites {
        let slot = slot_addr(entry(path));
        let loads = rip_relative_loads(site, 128);
        assert!(
            loads.contains(&slot),
            "the call site of {path} does not load its slot ({slot:#x}) itself; \
             rip-relative loads found: {loads:x?}"
        );
    }
}
