// `manifest!` with explicit metadata; a patch crate with one function.

hotpatch::manifest!(
    name = "cart-fix",
    version = "1.0.1",
    description = "INC-1234: total saturates"
);

#[hotpatch::patch(svc::Cart::total)]
fn total(cart: &svc::Cart) -> u64 {
    cart.items.iter().fold(0u64, |a, b| a.saturating_add(*b))
}

fn main() {}
