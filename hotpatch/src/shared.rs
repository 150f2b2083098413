//! `#[hotpatch::shared]`, kept for services written before thin patches.
//!
//! A patch used to link its own copy of the service crate, so a `static`
//! named in patch code was a second, fresh instance unless it was declared
//! `#[shared]`. A thin patch (`cargo hotpatch build`) is bound to the
//! running binary: every static of the service, shared or not, is the
//! host's own instance. `Shared<T>` is now only a transparent wrapper, and
//! the attribute warns that it can go.

use std::fmt;
use std::ops::Deref;

/// A `static` declared with [`#[hotpatch::shared]`](crate::shared): a
/// transparent wrapper that dereferences to its value.
///
/// Deprecated: patch code sees every static of the service as the host's
/// own instance; declare the static as a plain `static`.
///
/// # Examples
///
/// ```
/// #![allow(deprecated)]
/// use std::sync::atomic::{AtomicU64, Ordering};
///
/// #[hotpatch::shared]
/// pub static HITS: AtomicU64 = AtomicU64::new(0);
///
/// # fn main() {
/// HITS.fetch_add(1, Ordering::Relaxed); // through `Deref`
/// assert_eq!(HITS.load(Ordering::Relaxed), 1);
/// # }
/// ```
#[deprecated(
    since = "0.1.0",
    note = "thin patches (`cargo hotpatch build`) see every static of the service as the host's \
            own instance: declare it as a plain `static` and drop `#[hotpatch::shared]`"
)]
#[repr(transparent)]
pub struct Shared<T> {
    value: T,
}

#[allow(deprecated)]
impl<T> Shared<T> {
    #[doc(hidden)]
    pub const fn new(value: T) -> Self {
        Shared { value }
    }
}

#[allow(deprecated)]
impl<T> Deref for Shared<T> {
    type Target = T;

    #[inline(always)]
    fn deref(&self) -> &T {
        &self.value
    }
}

#[allow(deprecated)]
impl<T: fmt::Debug> fmt::Debug for Shared<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.value.fmt(f)
    }
}
