pub struct Counter(u64);

#[hotpatch::patchable]
impl Counter {
    #[hotpatch::patchable(skp)]
    pub fn get(&self) -> u64 {
        self.0
    }
}

fn main() {}
