//! The records `cargo hotpatch build --base` writes by hand (it reads the
//! head build's registry entries and writes `PatchFn` records into the
//! patch) must have the layouts the runtime reads: this checks the tool's
//! offsets against the runtime's types.

use std::mem::{offset_of, size_of};

use cargo_hotpatch::source::{
    ENTRY_COUNTED_OFFSET, ENTRY_LAYOUTS_OFFSET, ENTRY_ORIGINAL_OFFSET, PATCH_FN_OFFSETS,
    PATCH_FN_SIZE,
};
use hotpatch::__private::{Entry, PatchFn};

#[test]
fn the_tools_entry_offsets_are_the_runtimes() {
    assert_eq!(offset_of!(Entry, path), 0);
    assert_eq!(offset_of!(Entry, layouts), ENTRY_LAYOUTS_OFFSET);
    assert_eq!(offset_of!(Entry, original), ENTRY_ORIGINAL_OFFSET);
    assert_eq!(offset_of!(Entry, counted), ENTRY_COUNTED_OFFSET);
}

#[test]
fn the_tools_patch_fn_records_are_the_runtimes() {
    assert_eq!(size_of::<PatchFn>(), PATCH_FN_SIZE);
    assert_eq!(
        [
            offset_of!(PatchFn, target),
            offset_of!(PatchFn, replacement),
            offset_of!(PatchFn, name),
            offset_of!(PatchFn, layouts),
        ],
        PATCH_FN_OFFSETS
    );
}

#[test]
fn a_str_and_a_slice_are_pointer_then_length() {
    // The tool reads an entry's path as (pointer, length) and writes a
    // record's name and layouts the same way.
    let s: &'static str = "svc::price";
    // SAFETY: reading the two words of a `&str` as two `usize`s; the
    // assertion below is what this test checks.
    let words: [usize; 2] = unsafe { std::mem::transmute(s) };
    assert_eq!(words, [s.as_ptr() as usize, s.len()]);
    let l: &'static [u64] = &[1, 2, 3];
    // SAFETY: as above, for a slice.
    let words: [usize; 2] = unsafe { std::mem::transmute(l) };
    assert_eq!(words, [l.as_ptr() as usize, l.len()]);
}
