// `manifest!` with explicit metadata; a patch crate with one function.
// trybuild runs it as a bin: `main` reads the manifest the macro built
// (what the loader reads from a cdylib) and calls the replacement.

hotpatch::manifest!(
    name = "cart-fix",
    version = "1.0.1",
    description = "INC-1234: total saturates"
);

#[hotpatch::patch(svc::Cart::total)]
fn total(cart: &svc::Cart) -> u64 {
    cart.items.iter().fold(0u64, |a, b| a.saturating_add(*b))
}

fn text(s: hotpatch::__private::RawStr) -> &'static str {
    // SAFETY: `manifest!` built `s` from a `&'static str` (RawStr::new).
    let bytes = unsafe { std::slice::from_raw_parts(s.ptr, s.len) };
    std::str::from_utf8(bytes).unwrap()
}

fn main() {
    let m = &__HOTPATCH_MANIFEST;
    assert_eq!(
        (text(m.name), text(m.version), text(m.description)),
        ("cart-fix", "1.0.1", "INC-1234: total saturates")
    );
    // Not the package's own metadata, which is the default.
    assert_ne!(text(m.name), env!("CARGO_PKG_NAME"));
    assert_ne!(text(m.version), env!("CARGO_PKG_VERSION"));
    assert!(m.init.is_none(), "no init was given");
    assert_eq!(total(&svc::Cart::new(vec![u64::MAX, 1])), u64::MAX);
}
