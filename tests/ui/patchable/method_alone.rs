pub struct Counter(u64);

impl Counter {
    #[hotpatch::patchable]
    pub fn get(&self) -> u64 {
        self.0
    }
}

fn main() {}
