// KNOWN BUG (reported to the lead): the crate docs say a `#[patch]` target
// "must be nameable from the patch crate (public module path); the
// function itself may be private", and `#[patchable]` emits the companion
// constant `pub`, but `#[patch]` also emits `let _ = svc::private_helper;`
// to check the target exists, which fails with E0603 "function
// `private_helper` is private". Either that existence check goes (the
// companion lookup already fails for a missing target) or the docs change.
// Expected: compiles.

hotpatch::manifest!();

#[hotpatch::patch(svc::private_helper)]
fn private_helper(x: u64) -> u64 {
    x * 3
}

fn main() {}
