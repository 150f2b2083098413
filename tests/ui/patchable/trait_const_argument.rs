pub trait Sized2<const N: usize> {
    fn size(&self) -> usize;
}

pub struct Buffer;

#[hotpatch::patchable]
impl Sized2<{ 4 + 4 }> for Buffer {
    fn size(&self) -> usize {
        8
    }
}

fn main() {}
