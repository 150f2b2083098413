hotpatch::manifest!();

// The service has `impl From<String>` and `impl From<&str>` for
// `svc::Error`, not `From<u32>`.
#[hotpatch::patch(<svc::Error as From<u32>>::from)]
fn from(code: u32) -> svc::Error {
    svc::Error::Other(code.to_string())
}

fn main() {}
