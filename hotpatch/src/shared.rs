//! Statics shared between the service and its patches.
//!
//! A patch links its own copy of the service crate, statics included: a
//! patch that names `svc::HITS` gets a fresh, separate `HITS`. A static
//! declared with [`#[hotpatch::shared]`](crate::shared) becomes a
//! [`Shared`]: a value plus a pointer that is null in the host and, in a
//! patch's copy, set by the runtime (before any patch code runs) to the
//! host's value. Reading it is one load and a branch.

use std::fmt;
use std::ops::Deref;
use std::sync::atomic::{AtomicPtr, Ordering};

/// A `static` that patches share with the host; declared with
/// [`#[hotpatch::shared]`](crate::shared). Dereferences to the host's
/// value, in the host and in every patch.
///
/// # Examples
///
/// ```
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
pub struct Shared<T> {
    local: T,
    target: AtomicPtr<T>,
}

impl<T> Shared<T> {
    #[doc(hidden)]
    pub const fn new(value: T) -> Self {
        Shared {
            local: value,
            target: AtomicPtr::new(std::ptr::null_mut()),
        }
    }

    #[doc(hidden)]
    pub const fn __local(this: &'static Self) -> *const () {
        &this.local as *const T as *const ()
    }

    #[doc(hidden)]
    pub const fn __target(this: &'static Self) -> *const AtomicPtr<()> {
        &this.target as *const AtomicPtr<T> as *const AtomicPtr<()>
    }
}

impl<T> Deref for Shared<T> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        // Acquire: pairs with the runtime's Release store in the patch's
        // copy (`Registry::prepare`); null in the host.
        let p = self.target.load(Ordering::Acquire);
        if p.is_null() {
            &self.local
        } else {
            // SAFETY: the runtime only stores the address of the host's
            // value of this same static (same path, type text and layout,
            // checked), which lives as long as the process.
            unsafe { &*p }
        }
    }
}

impl<T: fmt::Debug> fmt::Debug for Shared<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        (**self).fmt(f)
    }
}
