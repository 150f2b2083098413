hotpatch::manifest!();

// The target is the `From<&str>` impl; the replacement's signature is the
// `From<String>` one's.
#[hotpatch::patch(<svc::Error as From<&str>>::from)]
fn from(src: String) -> svc::Error {
    svc::Error::Other(src)
}

fn main() {}
