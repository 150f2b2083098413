hotpatch::manifest!();

// The target is `fn first_word(s: &str) -> &str`. This replacement would
// coerce to it one way (`fn(&str) -> &str` is a subtype of
// `fn(&'static str) -> &'static str`), but it is not the same signature:
// it would let the patch return a borrow of a shorter-lived argument as
// `'static`. It must be rejected.
#[hotpatch::patch(svc::first_word)]
fn first_word(s: &'static str) -> &'static str {
    s
}

fn main() {}
