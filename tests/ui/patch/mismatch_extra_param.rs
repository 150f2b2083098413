hotpatch::manifest!();

// The target is `fn answer() -> u64`.
#[hotpatch::patch(svc::answer)]
fn answer(x: u64) -> u64 {
    x
}

fn main() {}
