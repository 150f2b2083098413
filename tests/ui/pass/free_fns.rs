// Free functions of every visibility, and in nested modules.

#[hotpatch::patchable]
pub fn public(x: u64) -> u64 {
    x + 1
}

#[hotpatch::patchable]
pub(crate) fn crate_visible(x: u64) -> u64 {
    x + 2
}

#[hotpatch::patchable]
fn private(x: u64) -> u64 {
    x + 3
}

#[hotpatch::patchable]
fn no_args_no_return() {}

#[hotpatch::patchable]
fn patterns((a, b): (u64, u64), mut c: u64, _: u8) -> u64 {
    c += 1;
    a + b + c
}

#[hotpatch::patchable]
fn diverges() -> ! {
    panic!("never returns")
}

pub mod outer {
    pub mod inner {
        #[hotpatch::patchable]
        pub(super) fn nested(x: u64) -> u64 {
            x * 10
        }

        #[hotpatch::patchable]
        pub(in crate::outer) fn scoped(x: u64) -> u64 {
            x * 100
        }
    }

    pub fn call() -> u64 {
        inner::nested(1) + inner::scoped(1)
    }
}

fn main() {
    assert_eq!(public(1), 2);
    assert_eq!(crate_visible(1), 3);
    assert_eq!(private(1), 4);
    no_args_no_return();
    assert_eq!(patterns((1, 2), 3, 0), 7);
    assert_eq!(outer::call(), 110);
    std::panic::set_hook(Box::new(|_| {}));
    assert!(std::panic::catch_unwind(|| diverges()).is_err());
    let _ = std::panic::take_hook();

    let paths: Vec<_> = hotpatch::functions().into_iter().map(|f| f.path).collect();
    for name in [
        "::public",
        "::crate_visible",
        "::private",
        "::no_args_no_return",
        "::patterns",
        "::diverges",
        "::outer::inner::nested",
        "::outer::inner::scoped",
    ] {
        assert!(
            paths.iter().any(|p| p.ends_with(name)),
            "{name} not in {paths:?}"
        );
    }
}
