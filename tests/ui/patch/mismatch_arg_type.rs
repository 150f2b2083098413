hotpatch::manifest!();

// The target is `fn add(a: u64, b: u64) -> u64`.
#[hotpatch::patch(svc::add)]
fn add(a: u64, b: u32) -> u64 {
    a + u64::from(b)
}

fn main() {}
