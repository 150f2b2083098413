//! Writes `$OUT_DIR/fns.rs` for package `gen-svc-N`: N `#[patchable]`
//! functions `f0..f{N-1}`, each with its own constant, and `first`, `mid`
//! and `last` aliases so hosts need not know N.

use std::fmt::Write;

fn main() {
    let pkg = std::env::var("CARGO_PKG_NAME").unwrap();
    let n: usize = pkg.rsplit('-').next().unwrap().parse().unwrap();
    let mut s = String::new();
    writeln!(s, "/// How many patchable functions this service has.").unwrap();
    writeln!(s, "pub const N: usize = {n};").unwrap();
    for i in 0..n {
        writeln!(
            s,
            "#[hotpatch::patchable]\npub fn f{i}(x: u64) -> u64 {{ x.wrapping_mul({}).wrapping_add({i}) }}",
            mul(i)
        )
        .unwrap();
    }
    writeln!(s, "pub use f0 as first;").unwrap();
    writeln!(s, "pub use f{} as mid;", n / 2).unwrap();
    writeln!(s, "pub use f{} as last;", n - 1).unwrap();
    let out = std::path::Path::new(&std::env::var("OUT_DIR").unwrap()).join("fns.rs");
    std::fs::write(out, s).unwrap();
    println!("cargo:rerun-if-changed=../build_svc.rs");
}

fn mul(i: usize) -> u64 {
    0x9E37_79B9_7F4A_7C15u64.wrapping_add(2 * i as u64)
}
