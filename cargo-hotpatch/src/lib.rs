//! Builds *thin* hotpatch patches and checks them against the service
//! binary they are for.
//!
//! A thin patch is a shared object holding only the patch crate's own
//! compiled code. Every other symbol it uses (std, `hotpatch`, the
//! service's library, its dependencies) stays undefined, and the dynamic
//! loader binds it to the running service binary, so the patch runs in
//! the service's world: one std, one allocator, the service's statics.
//! For that the service binary must export its symbols: its build.rs
//! says
//!
//! ```text
//! println!("cargo::rustc-link-arg-bins=-rdynamic");
//! ```
//!
//! # How a patch is made
//!
//! The patch crate is an ordinary library crate (`crate-type` rlib, the
//! default) depending on `hotpatch` and on the service's library, with
//! `hotpatch::manifest!()` at its root. cargo builds it *in the same
//! package selection and profile as the service* (symbol names hash each
//! crate's resolved features, which cargo unifies over the packages of
//! one invocation), then [`link`] takes the crate's own object files out
//! of the rlib and links them with `cc -shared`, exporting only
//! `hotpatch_manifest_v1`, with a `.hotpatch.host` section naming the
//! host's GNU build-id. [`check_against`] then proves that every symbol
//! the patch needs is exported by the host (or is a C symbol of a system
//! library).
//!
//! The `cargo hotpatch build` command does all of it:
//!
//! ```text
//! cargo hotpatch build -p pricing-fix --binary target/release/my-service --release
//! ```
//!
//! # A patch made from the service's own source
//!
//! `cargo hotpatch build --base REV` makes the patch from a fix in the
//! service's source (module [`source`]): it checks out the git revision
//! the running binary was built from, builds it exactly as deployed (the
//! same toolchain, `Cargo.lock`, profile, features and paths: the checkout's
//! paths are remapped to the workspace's) and builds the fix the same way,
//! each in its own target directory under `target/hotpatch/`. With
//! `--binary` it proves that the deployed binary is the rebuilt base.
//! [`syntax`] refuses, before any build, what the source shows a patch
//! cannot carry (a type's layout, a static, a patchable signature). The
//! service library's objects are then compared function by function, and
//! the changed functions written into a thin patch: each `#[patchable]` one
//! replaced, each other one included when everything that calls it is
//! replaced or included. The service's private functions and statics are
//! reached through cells the dynamic loader fills (the base binary's
//! symbol table gives their addresses; [`riprel`] redirects instructions
//! that read or write such data in place).
//!
//! ```text
//! cargo hotpatch build --base v1.4.2 -p my-service --release \
//!     --binary /srv/my-service/bin/my-service -o fix.so
//! ```
//!
//! # Exit codes of `cargo hotpatch`
//!
//! One table, [`EXIT_CODES`], which `cargo hotpatch build --help` prints.
//!
//! # Limits
//!
//! Linux and ELF only; the linker is `cc`. A patch crate can only call
//! what the service's binary exports (a private function of the service
//! cannot be bound by name); a patch made from source reaches private
//! functions and statics too, through the binary's symbol table (x86-64).
//!
//! # Examples
//!
//! ```no_run
//! use std::path::Path;
//!
//! let report = cargo_hotpatch::link(
//!     Path::new("target/release/libpricing_fix.rlib"),
//!     Path::new("target/release/my-service"),
//!     Path::new("target/hotpatch/pricing_fix.so"),
//! )?;
//! let patch = std::fs::read(&report.output).unwrap();
//! assert_eq!(
//!     cargo_hotpatch::identity(&patch),
//!     Some(cargo_hotpatch::build_id(Path::new("target/release/my-service"))?)
//! );
//! # Ok::<(), cargo_hotpatch::Error>(())
//! ```

#![deny(unsafe_op_in_unsafe_fn)]

/// The exit codes of `cargo hotpatch`, as `cargo hotpatch build --help`
/// prints them: the one table of them, which other documents link to.
#[doc = concat!("\n```text\n", include_str!("exit_codes.txt"), "```")]
pub const EXIT_CODES: &str = include_str!("exit_codes.txt");

mod allocshims;
pub mod cargo;
mod check;
mod devdep;
mod elf;
mod error;
mod flags;
mod link;
pub mod riprel;
mod slotrefs;
pub mod source;
pub mod syntax;

pub use check::check_against;
pub use devdep::dev_dependency_rlibs;
pub use elf::{HOST_MAGIC, HOST_SECTION, build_id, hex, identity};
pub use error::{Error, MissingSymbol};
pub use flags::CargoFlags;
pub use link::{LinkReport, MANIFEST_SYMBOL, link, link_unchecked};
