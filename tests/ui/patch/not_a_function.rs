hotpatch::manifest!();

#[hotpatch::patch(svc::answer)]
static ANSWER: u64 = 2;

fn main() {}
