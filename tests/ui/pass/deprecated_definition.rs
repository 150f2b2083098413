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
