hotpatch::manifest!();

#[hotpatch::patch(core::convert::identity::<u64>, hook)]
fn identity(x: u64) -> u64 {
    x
}

fn main() {}
