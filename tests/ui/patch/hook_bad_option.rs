hotpatch::manifest!();

#[hotpatch::patch(svc::hooked::price, hooked)]
fn price(qty: u64) -> u64 {
    qty * 3
}

fn main() {}
