#[hotpatch::patchable]
pub struct Price(u64);

fn main() {}
