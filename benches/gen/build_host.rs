//! The hotpatch host setting for the generated hosts: the binary exports
//! its symbols, so thin patches bind to it.
fn main() {
    println!("cargo::rustc-link-arg-bins=-rdynamic");
}
