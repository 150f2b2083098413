hotpatch::manifest!();

#[hotpatch::patch(svc::Cart::no_such_method)]
fn no_such_method(cart: &svc::Cart) -> u64 {
    cart.discount
}

fn main() {}
