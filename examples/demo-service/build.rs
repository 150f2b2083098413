//! The hotpatch host setting: the service binary exports its symbols to
//! the dynamic loader, so a thin patch (`cargo hotpatch build`) binds to
//! this binary's std, hotpatch, statics and functions.
fn main() {
    println!("cargo::rustc-link-arg-bins=-rdynamic");
}
