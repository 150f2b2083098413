pub struct Wrapper<T>(pub T);

#[hotpatch::patchable]
impl<T: Clone> Wrapper<T> {
    pub fn get(&self) -> T {
        self.0.clone()
    }
}

fn main() {}
