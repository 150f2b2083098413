#[hotpatch::patchable]
pub fn pick<'a, 'b: 'a>(a: &'a str, b: &'b str) -> &'a str {
    if a.len() >= b.len() { a } else { b }
}

fn main() {}
