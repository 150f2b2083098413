//! Procedural macros of [`hotpatch`](https://docs.rs/hotpatch).
//!
//! This crate is an implementation detail: depend on `hotpatch`, which
//! re-exports these macros and provides everything the generated code
//! names (`::hotpatch::__private`). Their documentation is on the
//! re-exports.

mod patch;
mod patchable;
mod sig;

use proc_macro::TokenStream;

/// Makes a function, or every method of an impl block, patchable. See
/// `hotpatch::patchable`.
#[proc_macro_attribute]
pub fn patchable(args: TokenStream, input: TokenStream) -> TokenStream {
    patchable::expand(args.into(), input.into()).into()
}

/// Marks a function of a patch crate as the replacement of a `#[patchable]`
/// function. See `hotpatch::patch`.
#[proc_macro_attribute]
pub fn patch(args: TokenStream, input: TokenStream) -> TokenStream {
    patch::expand(args.into(), input.into()).into()
}
