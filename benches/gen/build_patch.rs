//! Writes `$OUT_DIR/fns.rs` for package `gen-patch-N-M`: replacements of
//! `f0..f{M-1}` of `gen-svc-N`, each returning one more than the original.

use std::fmt::Write;

fn main() {
    let pkg = std::env::var("CARGO_PKG_NAME").unwrap();
    let m: usize = pkg.rsplit('-').next().unwrap().parse().unwrap();
    let mut s = String::new();
    for i in 0..m {
        writeln!(
            s,
            "#[hotpatch::patch(gen_svc::f{i})]\nfn f{i}(x: u64) -> u64 {{ x.wrapping_mul({}).wrapping_add({i}).wrapping_add(1) }}",
            0x9E37_79B9_7F4A_7C15u64.wrapping_add(2 * i as u64)
        )
        .unwrap();
    }
    let out = std::path::Path::new(&std::env::var("OUT_DIR").unwrap()).join("fns.rs");
    std::fs::write(out, s).unwrap();
    println!("cargo:rerun-if-changed=../build_patch.rs");
}
