// Attributes of a patchable function stay on the function callers see:
// `#[must_use]` still warns, here denied.
#![deny(unused_must_use)]

/// The answer.
#[hotpatch::patchable]
#[must_use]
pub fn answer() -> u64 {
    42
}

fn main() {
    answer();
}
