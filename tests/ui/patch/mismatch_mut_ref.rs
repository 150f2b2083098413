hotpatch::manifest!();

// The target is `fn total(&self) -> u64`.
#[hotpatch::patch(svc::Cart::total)]
fn total(cart: &mut svc::Cart) -> u64 {
    cart.items.iter().sum()
}

fn main() {}
