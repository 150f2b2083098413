//! The hotpatch host setting for this package's test and bench binaries:
//! they load thin patches, which bind to the symbols the binary exports.
fn main() {
    println!("cargo::rustc-link-arg-tests=-rdynamic");
    println!("cargo::rustc-link-arg-benches=-rdynamic");
}
