//! Patches stack per function: B over A on the same function, reverted in
//! either order.
//!
//! A replaces `add` (+1000) and `answer` (10); B replaces only `add`
//! (+2000).

mod support;

use hotpatch::Implementation;

const A: &str = "fixture-patch-stack-a";
const B: &str = "fixture-patch-stack-b";

/// `(add(2, 3), answer())`.
fn observed() -> (u64, u64) {
    (svc::add(2, 3), svc::answer())
}

fn by(patch: &hotpatch::Patch) -> Implementation {
    Implementation::Patch {
        id: patch.id(),
        name: patch.name().to_owned(),
    }
}

fn ids() -> Vec<hotpatch::PatchId> {
    hotpatch::applied().iter().map(|p| p.id).collect()
}

#[test]
fn revert_the_lower_patch_first() {
    let _serial = support::serial();
    let (a_so, b_so) = (support::patch(A), support::patch(B));
    let original = hotpatch::functions();
    assert_eq!(observed(), (5, 1));

    let a = hotpatch::load(&a_so).unwrap();
    assert_eq!(observed(), (1005, 10));
    let b = hotpatch::load(&b_so).unwrap();
    assert_eq!(
        observed(),
        (2005, 10),
        "B is on top for add; A still has answer"
    );
    assert_eq!(support::implementation("svc::add"), by(&b));
    assert_eq!(support::implementation("svc::answer"), by(&a));
    assert_eq!(ids(), [a.id(), b.id()], "oldest first");

    let a_id = a.id();
    a.revert().unwrap();
    assert_eq!(
        observed(),
        (2005, 1),
        "B stays current; answer is the original"
    );
    assert_eq!(support::implementation("svc::add"), by(&b));
    assert_eq!(
        support::implementation("svc::answer"),
        Implementation::Original
    );
    assert_eq!(ids(), [b.id()]);
    assert!(matches!(
        hotpatch::revert(a_id),
        Err(hotpatch::Error::NotApplied { .. })
    ));
    assert_eq!(observed(), (2005, 1));

    b.revert().unwrap();
    assert_eq!(observed(), (5, 1));
    assert_eq!(hotpatch::functions(), original);
}

#[test]
fn revert_the_top_patch_first() {
    let _serial = support::serial();
    let (a_so, b_so) = (support::patch(A), support::patch(B));
    let original = hotpatch::functions();

    let a = hotpatch::load(&a_so).unwrap();
    let b = hotpatch::load(&b_so).unwrap();
    assert_eq!(observed(), (2005, 10));

    b.revert().unwrap();
    assert_eq!(observed(), (1005, 10), "A is current again");
    assert_eq!(support::implementation("svc::add"), by(&a));
    assert_eq!(support::implementation("svc::answer"), by(&a));
    assert_eq!(ids(), [a.id()]);

    a.revert().unwrap();
    assert_eq!(observed(), (5, 1));
    assert_eq!(hotpatch::functions(), original);
}

#[test]
fn the_lower_patch_can_go_and_come_back_on_top() {
    let _serial = support::serial();
    let (a_so, b_so) = (support::patch(A), support::patch(B));

    let a = hotpatch::load(&a_so).unwrap();
    let b = hotpatch::load(&b_so).unwrap();
    a.revert().unwrap();
    // A again, now above B: the newest patch of a function is current.
    let a = hotpatch::load(&a_so).unwrap();
    assert_eq!(observed(), (1005, 10));
    assert_eq!(support::implementation("svc::add"), by(&a));
    assert_eq!(ids(), [b.id(), a.id()]);

    a.revert().unwrap();
    assert_eq!(observed(), (2005, 1));
    b.revert().unwrap();
    assert_eq!(observed(), (5, 1));
}

#[test]
fn three_layers_revert_the_middle() {
    let _serial = support::serial();
    let (a_so, b_so) = (support::patch(A), support::patch(B));
    // Replaces `add` too (with `a + b + 1`), among others.
    let c_so = support::patch("fixture-patch-panics");

    let a = hotpatch::load(&a_so).unwrap();
    let b = hotpatch::load(&b_so).unwrap();
    let c = hotpatch::load(&c_so).unwrap();
    assert_eq!(observed(), (6, 10));

    b.revert().unwrap();
    assert_eq!(observed(), (6, 10), "the top layer stays current");
    assert_eq!(support::implementation("svc::add"), by(&c));
    c.revert().unwrap();
    assert_eq!(observed(), (1005, 10), "the bottom layer, not B");
    assert_eq!(support::implementation("svc::add"), by(&a));
    a.revert().unwrap();
    assert_eq!(observed(), (5, 1));
}
