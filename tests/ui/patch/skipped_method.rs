hotpatch::manifest!();

// `svc::Cart::not_patchable` is in a patchable impl but marked
// #[patchable(skip)].
#[hotpatch::patch(svc::Cart::not_patchable)]
fn not_patchable(cart: &svc::Cart) -> usize {
    cart.items.len() + 1
}

fn main() {}
