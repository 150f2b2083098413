#[hotpatch::patchable]
#[track_caller]
pub fn checked(x: Option<u64>) -> u64 {
    x.expect("missing value")
}

fn main() {}
