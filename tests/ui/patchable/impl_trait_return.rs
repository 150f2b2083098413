#[hotpatch::patchable]
pub fn evens(limit: u64) -> impl Iterator<Item = u64> {
    (0..limit).filter(|x| x % 2 == 0)
}

fn main() {}
