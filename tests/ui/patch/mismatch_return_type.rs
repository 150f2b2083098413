hotpatch::manifest!();

// The target is `fn add(a: u64, b: u64) -> u64`.
#[hotpatch::patch(svc::add)]
fn add(a: u64, b: u64) -> u32 {
    (a + b) as u32
}

fn main() {}
