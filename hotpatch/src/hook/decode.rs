//! Whether a function's entry can be redirected, and the replaced
//! instructions re-encoded for the trampoline: crate `hotpatch-entry`,
//! shared with `cargo hotpatch build` so that the tool and the loader
//! decide by the same rules.

pub use hotpatch_entry::Ineligible;
pub(crate) use hotpatch_entry::{Entry, entry, jmp_rel32, stub};
