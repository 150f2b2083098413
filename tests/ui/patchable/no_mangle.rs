#[hotpatch::patchable]
#[unsafe(no_mangle)]
pub extern "C" fn exported(x: u32) -> u32 {
    x + 1
}

fn main() {}
