hotpatch::manifest!();

// `svc::hooked::price` takes a u64.
#[hotpatch::patch(svc::hooked::price, hook)]
fn price(qty: u32) -> u64 {
    u64::from(qty) * 3
}

fn main() {}
