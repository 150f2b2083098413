// Attributes and doc comments on patchable functions are kept.
#![deny(missing_docs)]
//! Crate docs.

/// Documented.
#[hotpatch::patchable]
#[must_use]
#[inline(never)]
pub fn documented() -> u64 {
    1
}

/// Lint levels apply to the body.
#[hotpatch::patchable]
#[allow(clippy::needless_return, unused_variables)]
pub fn with_lints(unused: u64) -> u64 {
    return 2;
}

/// Only one of these exists.
#[cfg(unix)]
#[hotpatch::patchable]
pub fn platform() -> &'static str {
    "unix"
}

/// Only one of these exists.
#[cfg(not(unix))]
#[hotpatch::patchable]
pub fn platform() -> &'static str {
    "other"
}

/// Never compiled.
#[cfg(any())]
#[hotpatch::patchable]
pub fn absent() -> u64 {
    0
}

/// A type.
pub struct Thing;

#[hotpatch::patchable]
impl Thing {
    /// Documented method.
    #[must_use]
    #[cfg_attr(unix, inline)]
    pub fn method(&self) -> u64 {
        3
    }

    /// Deprecated but callable.
    #[deprecated(note = "use `method`")]
    pub fn old(&self) -> u64 {
        4
    }
}

#[allow(deprecated)]
fn main() {
    assert_eq!(documented(), 1);
    assert_eq!(with_lints(0), 2);
    assert!(!platform().is_empty());
    assert_eq!(Thing.method(), 3);
    assert_eq!(Thing.old(), 4);
    assert!(
        !hotpatch::functions()
            .iter()
            .any(|f| f.path.ends_with("::absent"))
    );
}
