// A patch crate hooking functions that are not #[patchable]: the
// signature is checked against the function itself. (trybuild builds it
// as a bin; a real patch crate is a cdylib, which type-checks the same.)

hotpatch::manifest!();

#[hotpatch::patch(svc::hooked::price, hook)]
fn price(qty: u64) -> u64 {
    qty.wrapping_mul(3) + 1
}

// A trailing comma is accepted.
#[hotpatch::patch(svc::call_private, hook,)]
fn call_private(x: u64) -> u64 {
    x * 3
}

fn main() {}
