//! Apply, call, revert: each patchable form, the registry's view of it,
//! and the `Patch` handle.
//!
//! `fixture-patch-forms` replaces one function of each form; each test
//! loads it, checks its own form before, during and after, and reverts.

mod support;

use std::path::PathBuf;

use hotpatch::{Error, Implementation};
use svc::Priced;

const NAME: &str = "fixture-patch-forms";

/// Every function `fixture-patch-forms` replaces, as the registry names
/// them. A trait method's path names the trait as the `impl` wrote it.
const REPLACED: [&str; 20] = [
    "<svc::Cart as Priced>::price",
    "<svc::Cart as Priced>::unit",
    "<svc::Error as From<&str>>::from",
    "<svc::Error as From<String>>::from",
    "<svc::Frame as PartialEq<&str>>::eq",
    "<svc::Handler as Drop>::drop",
    "svc::Cart::boxed",
    "svc::Cart::first",
    "svc::Cart::get",
    "svc::Cart::into_items",
    "svc::Cart::new",
    "svc::Cart::push",
    "svc::Cart::total",
    "svc::add",
    "svc::c_abi",
    "svc::first_word",
    "svc::longest",
    "svc::pricing::Coupon::apply",
    "svc::pricing::discount",
    "svc::read",
];

fn forms() -> PathBuf {
    support::patch(NAME)
}

/// Runs `check(patched)` before the patch, with it applied, and after it
/// is reverted, and checks what the registry says each of `paths` runs
/// each time.
fn cycle(paths: &[&str], check: impl Fn(bool)) {
    let _serial = support::serial();
    let so = forms();
    for path in paths {
        assert_eq!(support::implementation(path), Implementation::Original);
    }
    check(false);

    let patch = hotpatch::load(&so).unwrap();
    for path in paths {
        assert_eq!(
            support::implementation(path),
            Implementation::Patch {
                id: patch.id(),
                name: NAME.to_owned()
            }
        );
    }
    check(true);

    patch.revert().unwrap();
    for path in paths {
        assert_eq!(support::implementation(path), Implementation::Original);
    }
    check(false);
}

#[test]
fn free_fn() {
    cycle(&["svc::add"], |patched| {
        assert_eq!(svc::add(2, 3), if patched { 6 } else { 5 });
    });
}

#[test]
fn associated_fn_returning_self() {
    cycle(&["svc::Cart::new"], |patched| {
        let cart = svc::Cart::new(vec![4, 5]);
        assert_eq!(cart.items, vec![4, 5]);
        assert_eq!(cart.discount, if patched { 1 } else { 0 });
    });
}

#[test]
fn method_ref_self() {
    cycle(&["svc::Cart::total"], |patched| {
        let cart = svc::Cart {
            items: vec![1, 2, 3],
            discount: 1,
        };
        assert_eq!(cart.total(), if patched { 1005 } else { 5 });
    });
}

#[test]
fn method_mut_self() {
    cycle(&["svc::Cart::push"], |patched| {
        let mut cart = svc::Cart::default();
        cart.push(7);
        let expected = if patched { vec![7, 7] } else { vec![7] };
        assert_eq!(cart.items, expected);
    });
}

#[test]
fn method_self_by_value() {
    cycle(&["svc::Cart::into_items"], |patched| {
        let cart = svc::Cart {
            items: vec![1, 2, 3],
            discount: 0,
        };
        let expected = if patched {
            vec![3, 2, 1]
        } else {
            vec![1, 2, 3]
        };
        assert_eq!(cart.into_items(), expected);
    });
}

#[test]
fn method_box_self() {
    cycle(&["svc::Cart::boxed"], |patched| {
        let cart = Box::new(svc::Cart {
            items: vec![1, 2, 3],
            discount: 0,
        });
        assert_eq!(cart.boxed(), if patched { 30 } else { 3 });
    });
}

#[test]
fn method_returning_a_borrow_of_self() {
    cycle(&["svc::Cart::first"], |patched| {
        let cart = svc::Cart {
            items: vec![1, 2, 3],
            discount: 0,
        };
        let first = cart.first();
        let i = if patched { 2 } else { 0 };
        assert!(std::ptr::eq(first, &cart.items[i]), "borrows from the cart");
    });
}

#[test]
fn method_with_named_and_elided_lifetimes() {
    cycle(&["svc::Cart::get"], |patched| {
        let cart = svc::Cart {
            items: vec![1, 2, 3],
            discount: 0,
        };
        let label = String::from("temporary label");
        let got = cart.get(0, &label);
        drop(label);
        let i = if patched { 1 } else { 0 };
        assert!(std::ptr::eq(got.unwrap(), &cart.items[i]));
        assert_eq!(cart.get(2, "x").is_some(), !patched);
    });
}

#[test]
fn trait_impl_methods() {
    let paths = [
        "<svc::Cart as Priced>::price",
        "<svc::Cart as Priced>::unit",
    ];
    cycle(&paths, |patched| {
        let cart = svc::Cart {
            items: vec![1, 2, 3],
            discount: 0,
        };
        assert_eq!(cart.price(), if patched { 18 } else { 12 });
        assert_eq!(cart.unit(), if patched { 42 } else { 3 });
        assert_eq!(<svc::Cart as Priced>::CURRENCY, "EUR");
        // Through the trait, not the concrete type.
        let dynamic: &dyn Fn(&svc::Cart) -> u64 = &<svc::Cart as Priced>::price;
        assert_eq!(dynamic(&cart), if patched { 18 } else { 12 });
    });
}

/// Two impls of one generic trait on one type (`From<String>`,
/// `From<&str>`) are two targets: each is patched on its own, and a third
/// impl of the same trait with other arguments stays as it was.
#[test]
fn impls_of_one_generic_trait_with_different_arguments() {
    let paths = [
        "<svc::Error as From<String>>::from",
        "<svc::Error as From<&str>>::from",
        "<svc::Frame as PartialEq<&str>>::eq",
    ];
    cycle(&paths, |patched| {
        let from_string = svc::Error::from(String::from("bad frame"));
        let from_str = svc::Error::from("bad frame");
        let empty: svc::Error = "".into();
        let frame = svc::Frame("OK".to_owned());
        if patched {
            assert_eq!(from_string, svc::Error::Other("patched: bad frame".into()));
            assert_eq!(from_str, svc::Error::Other("BAD FRAME".into()));
            assert_eq!(empty, svc::Error::Incomplete);
            assert!(frame == "ok");
        } else {
            assert_eq!(from_string, svc::Error::Other("bad frame".into()));
            assert_eq!(from_str, svc::Error::Other("bad frame".into()));
            assert_eq!(empty, svc::Error::Other(String::new()));
            assert!(frame != "ok");
        }
        // `PartialEq<String>` is not in the patch.
        let (lower, upper) = (String::from("ok"), String::from("OK"));
        assert!(frame != lower);
        assert!(frame == upper);
    });
    assert_eq!(
        support::implementation("<svc::Frame as PartialEq<String>>::eq"),
        Implementation::Original
    );
}

/// `Drop::drop` is patchable: drop glue reaches the patched body wherever
/// a value is dropped (end of scope, `Box`, `Vec`, `mem::drop`), and the
/// fields are still dropped after it.
#[test]
fn drop_impl() {
    use std::sync::atomic::Ordering::Relaxed;
    cycle(&["<svc::Handler as Drop>::drop"], |patched| {
        let open = svc::OPEN.load(Relaxed);
        let scale = if patched { 10 } else { 1 };
        {
            let _h = svc::Handler::open(3);
            assert_eq!(svc::OPEN.load(Relaxed), open + 1);
        }
        assert_eq!(svc::LAST_CLOSED.load(Relaxed), 3 * scale);
        drop(Box::new(svc::Handler::open(4)));
        assert_eq!(svc::LAST_CLOSED.load(Relaxed), 4 * scale);
        let many: Vec<_> = (5..8).map(svc::Handler::open).collect();
        assert_eq!(svc::OPEN.load(Relaxed), open + 3);
        drop(many);
        assert_eq!(svc::LAST_CLOSED.load(Relaxed), 7 * scale);
        assert_eq!(svc::OPEN.load(Relaxed), open);
    });
}

#[test]
fn fn_with_elided_lifetimes() {
    cycle(&["svc::first_word"], |patched| {
        let text = String::from("alpha beta gamma");
        let word = svc::first_word(&text);
        let (expected, offset) = if patched { ("gamma", 11) } else { ("alpha", 0) };
        assert_eq!(word, expected);
        assert!(
            std::ptr::eq(word.as_ptr(), text[offset..].as_ptr()),
            "borrows from the argument"
        );
    });
}

#[test]
fn fn_with_named_lifetimes() {
    cycle(&["svc::longest"], |patched| {
        let (a, b) = (String::from("short"), String::from("much longer"));
        let got = svc::longest(&a, &b);
        let expected = if patched { &a } else { &b };
        assert!(std::ptr::eq(got.as_ptr(), expected.as_ptr()));
    });
}

#[test]
fn unsafe_fn() {
    cycle(&["svc::read"], |patched| {
        let x = 41u64;
        // SAFETY: `&x` is valid for reads.
        let got = unsafe { svc::read(&x) };
        assert_eq!(got, if patched { 42 } else { 41 });
    });
}

#[test]
fn extern_c_fn() {
    cycle(&["svc::c_abi"], |patched| {
        assert_eq!(svc::c_abi(1), if patched { 101 } else { 2 });
        // Still an `extern "C"` function, callable through a C fn pointer.
        let f: extern "C" fn(u32) -> u32 = svc::c_abi;
        assert_eq!(f(2), if patched { 102 } else { 3 });
    });
}

#[test]
fn fn_in_a_module() {
    cycle(&["svc::pricing::discount"], |patched| {
        assert_eq!(svc::pricing::discount(100), if patched { 20 } else { 10 });
    });
}

#[test]
fn method_of_a_type_in_a_module() {
    cycle(&["svc::pricing::Coupon::apply"], |patched| {
        let coupon = svc::pricing::Coupon { percent: 10 };
        assert_eq!(coupon.apply(200), if patched { 190 } else { 180 });
    });
}

/// The crate docs: "the target of a `#[patch]` must be nameable from the
/// patch crate (public module path); the function itself may be private."
/// `#[patch(svc::private_helper)]` compiles because the expansion names
/// only the target's public companion constant (`svc::__hotpatch_private_helper`,
/// hotpatch-macros/src/patch.rs), never the private function itself.
#[test]
fn private_fn_through_public_module_path() {
    let _serial = support::serial();
    let so = support::patch("fixture-patch-private");
    assert_eq!(svc::call_private(4), 8);
    let patch = hotpatch::load(&so).unwrap();
    assert_eq!(patch.functions(), ["svc::private_helper"]);
    assert_eq!(svc::call_private(4), 12);
    patch.revert().unwrap();
    assert_eq!(svc::call_private(4), 8);
}

#[test]
fn functions_report_the_patch_then_the_original() {
    let _serial = support::serial();
    let so = forms();
    let before = hotpatch::functions();
    let paths: Vec<&str> = before.iter().map(|f| f.path).collect();
    let mut sorted = paths.clone();
    sorted.sort();
    assert_eq!(paths, sorted, "sorted by path");
    for path in REPLACED
        .iter()
        .chain(&["svc::private_helper", "svc::answer"])
    {
        assert!(paths.contains(path), "{path} is listed");
    }
    assert!(
        !paths.contains(&"svc::Cart::not_patchable"),
        "skip is honoured"
    );
    assert!(
        before
            .iter()
            .all(|f| f.implementation == Implementation::Original)
    );
    let add = before.iter().find(|f| f.path == "svc::add").unwrap();
    assert!(
        add.signature.contains("fn add") && add.signature.contains("u64"),
        "{}",
        add.signature
    );

    let patch = hotpatch::load(&so).unwrap();
    let during = hotpatch::functions();
    assert_eq!(during.len(), before.len());
    for (b, d) in before.iter().zip(&during) {
        assert_eq!((b.path, b.signature), (d.path, d.signature));
        let expected = if REPLACED.contains(&d.path) {
            Implementation::Patch {
                id: patch.id(),
                name: NAME.to_owned(),
            }
        } else {
            Implementation::Original
        };
        assert_eq!(d.implementation, expected, "{}", d.path);
    }

    patch.revert().unwrap();
    assert_eq!(hotpatch::functions(), before);
}

#[test]
fn applied_lists_the_patch_then_not() {
    let _serial = support::serial();
    let so = forms();
    assert_eq!(hotpatch::applied(), vec![]);
    let patch = hotpatch::load(&so).unwrap();
    assert_eq!(hotpatch::applied(), vec![patch.info().clone()]);
    patch.revert().unwrap();
    assert_eq!(hotpatch::applied(), vec![]);
}

#[test]
fn patch_accessors() {
    let _serial = support::serial();
    let so = forms();
    let patch = hotpatch::load(&so).unwrap();
    // From the fixture's Cargo.toml.
    assert_eq!(patch.name(), NAME);
    assert_eq!(patch.version(), "2.0.0-rc.1");
    assert_eq!(
        patch.description(),
        "one replacement of each patchable form"
    );
    assert_eq!(patch.file(), so.as_path());
    let mut functions = patch.functions().to_vec();
    functions.sort();
    assert_eq!(functions, REPLACED);
    let info = patch.info();
    assert_eq!(info.id, patch.id());
    assert_eq!(
        (&*info.name, &*info.version, &*info.description),
        (patch.name(), patch.version(), patch.description())
    );
    assert_eq!(info.file, so);
    assert_eq!(info.functions, patch.functions());
    assert_eq!(
        patch.id().to_string(),
        format!("patch #{}", patch.id().get())
    );
    let id = patch.id().get();
    patch.revert().unwrap();
    // Ids count the patches applied by this process, from 1: the next
    // one is this one's successor, even for the same file.
    let next = hotpatch::load(&so).unwrap();
    assert_eq!(next.id().get(), id + 1, "ids are given in order");
    next.revert().unwrap();
}

#[test]
fn the_loader_builder_loads_the_same_way() {
    let _serial = support::serial();
    let patch = hotpatch::Loader::new().load(forms()).unwrap();
    assert_eq!(patch.name(), NAME);
    assert_eq!(svc::add(2, 3), 6);
    patch.revert().unwrap();
    assert_eq!(svc::add(2, 3), 5);
}

#[test]
fn ids_are_never_reused() {
    let _serial = support::serial();
    let so = forms();
    let first = hotpatch::load(&so).unwrap();
    let id = first.id();
    first.revert().unwrap();
    let second = hotpatch::load(&so).unwrap();
    assert!(second.id() > id, "{} after {}", second.id(), id);
    second.revert().unwrap();
}

#[test]
fn dropping_the_handle_leaves_the_patch_applied() {
    let _serial = support::serial();
    let so = forms();
    let patch = hotpatch::load(&so).unwrap();
    let id = patch.id();
    drop(patch);
    assert_eq!(svc::add(2, 3), 6);
    let applied = hotpatch::applied();
    assert_eq!(applied.len(), 1);
    assert_eq!(applied[0].id, id);
    hotpatch::revert(id).unwrap();
    assert_eq!(svc::add(2, 3), 5);
    assert_eq!(hotpatch::applied(), vec![]);
}

#[test]
fn revert_by_id_then_by_handle_is_not_applied() {
    let _serial = support::serial();
    let so = forms();
    let patch = hotpatch::load(&so).unwrap();
    let id = patch.id();
    hotpatch::revert(id).unwrap();
    assert_eq!(svc::add(2, 3), 5);

    let err = patch.revert().unwrap_err();
    assert!(
        matches!(err, Error::NotApplied { id: i } if i == id),
        "{err:?}"
    );
    assert_eq!(err.to_string(), format!("{id} is not applied"));
    let err = hotpatch::revert(id).unwrap_err();
    assert!(
        matches!(err, Error::NotApplied { id: i } if i == id),
        "{err:?}"
    );
    assert_eq!(hotpatch::applied(), vec![]);
    assert_eq!(svc::add(2, 3), 5);
}
