#[hotpatch::patchable]
pub async fn fetch(id: u64) -> u64 {
    id
}

fn main() {}
