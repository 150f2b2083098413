//! Compile-time behaviour of `#[patchable]` and `#[patch]`: every rejected
//! form is a compile error with a message that says why and what to do
//! (one `.rs`/`.stderr` pair per diagnostic), and every supported form
//! compiles (and, for `#[patchable]`, runs and registers its functions).

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/patchable/*.rs");
    t.compile_fail("tests/ui/patch/*.rs");
    t.pass("tests/ui/pass/*.rs");
}
