mod support;

#[test]
fn smoke() {
    let so = support::patch("fixture-patch-basic");
    assert_eq!(svc::answer(), 1);
    let cart = svc::Cart::new(vec![1, 2, 3]);
    assert_eq!(cart.total(), 6);
    use svc::Priced;
    assert_eq!(cart.price(), 12);
    assert_eq!(cart.get(0, "x"), Some(&1));
    let p = hotpatch::load(&so).unwrap();
    println!("{:?}", p);
    assert_eq!(svc::answer(), 2);
    assert_eq!(cart.total(), 1006);
    assert_eq!(cart.price(), 100 + 1006);
    assert_eq!(cart.get(0, "x"), Some(&2));
    let r = std::panic::catch_unwind(|| svc::checked_div(1, 0));
    let e = r.unwrap_err();
    assert_eq!(e.downcast_ref::<String>().map(String::as_str), Some("patched: division by zero of 1"));
    assert_eq!(svc::checked_div(4, 2), 3);
    for f in hotpatch::functions() { println!("{f:?}"); }
    p.revert().unwrap();
    assert_eq!(svc::answer(), 1);
    assert_eq!(cart.total(), 6);
}
