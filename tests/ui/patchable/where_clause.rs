#[hotpatch::patchable]
pub fn pick<'a, 'b>(a: &'a str, b: &'b str) -> &'a str
where
    'b: 'a,
{
    if a.len() >= b.len() { a } else { b }
}

fn main() {}
