hotpatch::manifest!();

#[hotpatch::patch(svc::private_helper)]
fn private_helper(x: u64) -> u64 {
    x * 3
}

fn main() {}
