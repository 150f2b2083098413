// KNOWN BUG (reported to the lead): a `#[deprecated]` patchable function
// or method warns "use of deprecated function" at its own definition,
// because the generated helpers (`__hotpatch_guarded_*`, the registry
// `Entry`'s `wrapper` field) name the deprecated wrapper. A crate that
// denies warnings cannot deprecate a patchable function. The generated
// items need `#[allow(deprecated)]`. Expected: compiles, since nothing
// below calls the deprecated items.
#![deny(deprecated)]

/// Old.
#[hotpatch::patchable]
#[deprecated(note = "use `new_answer`")]
pub fn old_answer() -> u64 {
    41
}

pub struct Counter(pub u64);

#[hotpatch::patchable]
impl Counter {
    #[deprecated(note = "use the field")]
    pub fn get(&self) -> u64 {
        self.0
    }
}

fn main() {}
