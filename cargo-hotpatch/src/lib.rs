//! Builds *thin* hotpatch patches and checks them against the service
//! binary they are for.
//!
//! A thin patch is a shared object holding only the patch crate's own
//! compiled code. Every other symbol it uses (std, `hotpatch`, the
//! service's library, its dependencies) stays undefined, and the runtime
//! binds it to the running service binary, so the patch runs in the
//! service's world: one std, one allocator, the service's statics. For
//! that the service binary exports its symbols (the setting below), or
//! at least keeps its symbol table (not stripped), in which case a patch
//! can call only what the service itself uses. Its build.rs says
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
//! `cargo hotpatch build --base REV` ([`build_from_source`]) makes the
//! patch from a fix in the service's source: it checks out the git
//! revision the running binary was built from, builds it exactly as
//! deployed (the same toolchain, `Cargo.lock`, profile, features and
//! paths: the checkout's paths are remapped to the workspace's) and builds
//! the fix the same way, in one target directory under
//! `target/hotpatch/` (dependencies compiled once; the base's outputs kept
//! for the next fix against the same release). With `--binary` it proves
//! that the deployed binary is the rebuilt base. A comparison of the two
//! revisions' source refuses, before any build, what a patch cannot carry
//! (a type's layout, a static, a patchable signature). The service
//! library's objects are then compared function by function; a function
//! whose code differs only in how it was compiled (no instruction of it,
//! inlined code included, comes from a changed function's lines, as the
//! line tables the libraries are compiled with say, and for the
//! executable's own crate a second compile of it with line tables, where
//! its code is the deployed compile's) is not a change. The
//! changed functions are written into a thin patch: each `#[patchable]`
//! one replaced, each other one included when everything that calls it is
//! replaced or included, else hooked (its entry redirected, every local
//! copy of it) when that is sound. The executable's own crate and the
//! workspace's other libraries are checked and compared the same way
//! (their changed functions hooked; a change of `main`, which has run, is
//! refused). The service's
//! private functions and statics are reached through cells the dynamic
//! loader fills (the base binary's symbol table gives their addresses;
//! instructions that read or write such data in place are redirected
//! through the cell, x86-64). Each reason a patch is refused is a
//! [`Refusal`].
//!
//! ```text
//! cargo hotpatch build --base v1.4.2 -p my-service --release \
//!     --binary /srv/my-service/bin/my-service -o fix.so
//! ```
//!
//! # Layout
//!
//! `main.rs` parses arguments, calls [`build_patch_crate`] or
//! [`build_from_source`] and prints; [`BuildError::exit_code`] is its exit
//! code. The library's modules, by step: `patch_crate` (a patch crate:
//! `cargo build`, then `link` and `check`), `source` (one file per step of
//! [`build_from_source`], named in `source/mod.rs`), `metadata` (the one parser
//! of `cargo metadata`), `syntax` (the source comparison), `riprel` (the
//! one x86-64 decoder: what a relocated instruction does, and the thunks
//! that redirect it), `slotrefs` and `allocshims` (what a thin patch's
//! objects are rewritten with). The layouts and names shared with the
//! runtime come from the `hotpatch-abi` crate.
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
mod cargo;
mod check;
mod devdep;
mod elf;
mod error;
mod flags;
mod link;
mod metadata;
mod patch_crate;
mod refusal;
mod riprel;
mod slotrefs;
mod source;
mod syntax;

pub use check::check_against;
pub use elf::{build_id, hex, identity};
pub use error::{BuildError, Error, MissingSymbol};
pub use flags::CargoFlags;
pub use link::{LinkReport, link};
pub use patch_crate::{CrateOptions, build_patch_crate};
pub use refusal::{
    Finding, LayoutChange, Location, Refusal, SignatureChange, StaticKind, ValueChange,
};
pub use source::{Item, SourceOptions, SourceReport, build_from_source};

// For the project's own tests, benches and binary; not an API.
#[doc(hidden)]
pub use devdep::dev_dependency_rlibs;
#[doc(hidden)]
pub use link::link_unchecked;

/// When the `cargo-hotpatch` binary runs as rustc's wrapper for a build
/// of a checkout (`build_from_source` sets it up), runs rustc and returns
/// its exit code; else `None`. For `main.rs`; not an API.
#[doc(hidden)]
pub fn run_as_rustc_wrapper(args: &[std::ffi::OsString]) -> Option<i32> {
    source::wrapper::run_if_asked(args)
}
