//! Records the compiler and target this build of the contract (and so of
//! hotpatch) was made with: a patch must come from the same rustc and
//! target as the host, because Rust-ABI function pointers and `repr(Rust)`
//! layouts are only stable within one compiler build.

use std::env;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=RUSTC");
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let version = Command::new(&rustc)
        .arg("-vV")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|text| {
            let field = |name: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(str::trim)
                    .unwrap_or("unknown")
                    .to_owned()
            };
            format!(
                "rustc {} ({} {})",
                field("release:"),
                field("commit-hash:"),
                field("commit-date:")
            )
        })
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=HOTPATCH_RUSTC_VERSION={version}");
    let target = env::var("TARGET").unwrap_or_else(|_| "unknown".into());
    println!("cargo:rustc-env=HOTPATCH_TARGET={target}");
}
