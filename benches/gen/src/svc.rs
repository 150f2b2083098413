//! A service of N generated `#[patchable]` functions (N from the package
//! name, see `build_svc.rs`).

include!(concat!(env!("OUT_DIR"), "/fns.rs"));

/// A plain function, for comparing first calls.
#[inline(never)]
pub fn plain(x: u64) -> u64 {
    x.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1)
}
