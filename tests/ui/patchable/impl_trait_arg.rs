#[hotpatch::patchable]
pub fn total(items: impl Iterator<Item = u64>) -> u64 {
    items.sum()
}

fn main() {}
