hotpatch::manifest!();

// The target is `extern "C" fn c_abi(x: u32) -> u32`.
#[hotpatch::patch(svc::c_abi)]
fn c_abi(x: u32) -> u32 {
    x + 2
}

fn main() {}
