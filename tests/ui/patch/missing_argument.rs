hotpatch::manifest!();

#[hotpatch::patch]
fn answer() -> u64 {
    2
}

fn main() {}
