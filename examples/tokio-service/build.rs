//! The hotpatch host setting: the service binary and the test binaries
//! (tests/guarantees.rs runs the service in-process) export their symbols
//! to the dynamic loader, so the thin patch (`cargo hotpatch build`) binds
//! to their std, tokio, hotpatch, statics and functions.
fn main() {
    println!("cargo::rustc-link-arg-bins=-rdynamic");
    println!("cargo::rustc-link-arg-tests=-rdynamic");
}
