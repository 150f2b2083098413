//! A patch that replaces several functions switches them together and
//! reverts them together.
//!
//! `fixture-patch-basic` replaces `answer`, `Cart::total`,
//! `<Cart as Priced>::price`, `Cart::get` and `checked_div`. (That a patch
//! failing a check on one function changes none is in errors.rs.)

mod support;

use hotpatch::Implementation;
use svc::Priced;

const BASIC: &str = "fixture-patch-basic";

const REPLACED: [&str; 5] = [
    "<svc::Cart as Priced>::price",
    "svc::Cart::get",
    "svc::Cart::total",
    "svc::answer",
    "svc::checked_div",
];

/// What callers of the five functions see.
#[derive(Debug, PartialEq)]
struct Seen {
    answer: u64,
    total: u64,
    price: u64,
    get: Option<u64>,
    checked_div: u64,
}

fn seen() -> Seen {
    let cart = svc::Cart::new(vec![1, 2, 3]);
    Seen {
        answer: svc::answer(),
        total: cart.total(),
        price: cart.price(),
        get: cart.get(0, "first").copied(),
        checked_div: svc::checked_div(4, 2),
    }
}

const ORIGINAL: Seen = Seen {
    answer: 1,
    total: 6,
    price: 12,
    get: Some(1),
    checked_div: 2,
};

const PATCHED: Seen = Seen {
    answer: 2,
    total: 1006,
    // The patch's `price` is `base() + total()`, and `total()` is the
    // host's live one: this patch's.
    price: 100 + 1006,
    get: Some(2),
    checked_div: 3,
};

#[test]
fn all_switch_together_and_revert_together() {
    let _serial = support::serial();
    let so = support::patch(BASIC);
    let before = hotpatch::functions();
    assert_eq!(seen(), ORIGINAL);
    assert_eq!(support::patched(), vec![]);

    let patch = hotpatch::load(&so).unwrap();
    assert_eq!(seen(), PATCHED);
    let mut functions = patch.functions().to_vec();
    functions.sort();
    assert_eq!(functions, REPLACED);
    let expected: Vec<(String, String)> = REPLACED
        .iter()
        .map(|p| (p.to_string(), BASIC.to_owned()))
        .collect();
    assert_eq!(support::patched(), expected, "those five and nothing else");

    patch.revert().unwrap();
    assert_eq!(seen(), ORIGINAL);
    assert_eq!(hotpatch::functions(), before);
}

#[test]
fn revert_takes_out_every_function_even_one_patched_over() {
    let _serial = support::serial();
    let so = support::patch(BASIC);
    // Replaces `answer` (10), `add` and `hammer`.
    let over = support::patch("fixture-patch-stack-a");

    let patch = hotpatch::load(&so).unwrap();
    let top = hotpatch::load(&over).unwrap();
    assert_eq!(
        seen(),
        Seen {
            answer: 10,
            ..PATCHED
        }
    );

    patch.revert().unwrap();
    assert_eq!(
        seen(),
        Seen {
            answer: 10,
            ..ORIGINAL
        }
    );
    for path in REPLACED {
        let expected = if path == "svc::answer" {
            Implementation::Patch {
                id: top.id(),
                name: top.name().to_owned(),
            }
        } else {
            Implementation::Original
        };
        assert_eq!(support::implementation(path), expected, "{path}");
    }

    top.revert().unwrap();
    assert_eq!(seen(), ORIGINAL);
}

#[test]
fn applying_again_after_revert_switches_all_again() {
    let _serial = support::serial();
    let so = support::patch(BASIC);
    for _ in 0..3 {
        let patch = hotpatch::load(&so).unwrap();
        assert_eq!(seen(), PATCHED);
        patch.revert().unwrap();
        assert_eq!(seen(), ORIGINAL);
    }
}
