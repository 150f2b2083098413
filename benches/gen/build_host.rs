//! The hotpatch host setting for the generated hosts: the binary exports
//! its symbols, so thin patches bind to it. `HOTPATCH_BENCH_NO_RDYNAMIC=1`
//! builds them without it, to measure what the setting costs (binary
//! size, start-up, first call: BENCHMARKS.md, "The host setting").
fn main() {
    println!("cargo::rerun-if-env-changed=HOTPATCH_BENCH_NO_RDYNAMIC");
    if std::env::var_os("HOTPATCH_BENCH_NO_RDYNAMIC").is_none() {
        println!("cargo::rustc-link-arg-bins=-rdynamic");
    }
}
