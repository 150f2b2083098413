hotpatch::manifest!();

#[hotpatch::patch(svc::no_such_function)]
fn no_such_function() -> u64 {
    2
}

fn main() {}
