hotpatch::manifest!();

// `svc::call_private` exists but is not #[patchable].
#[hotpatch::patch(svc::call_private)]
fn call_private(x: u64) -> u64 {
    x * 3
}

fn main() {}
