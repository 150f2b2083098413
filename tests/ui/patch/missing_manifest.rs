// No `hotpatch::manifest!();` at the crate root.

#[hotpatch::patch(svc::answer)]
fn answer() -> u64 {
    2
}

fn main() {}
