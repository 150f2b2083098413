//! Carrying a panic across the host/patch boundary.
//!
//! A patch cdylib has its own copy of std. A panic raised by one copy and
//! unwound into a `catch_unwind` of the other is a "foreign exception" and
//! aborts the process. So each side catches its own panics at the
//! boundary, turns the payload into a [`Transport`] (the message, as bytes
//! the receiver copies), and the other side raises it again with its own
//! std:
//!
//! - host -> patch: the patch's entry shim runs the replacement inside the
//!   patch's `catch_unwind` ([`enter`]) and hands a panic to the host's
//!   [`raise`], whose address the runtime wrote into the patch's
//!   [`HOST_RAISE`] cell before publishing the patch.
//! - patch -> host: the patch's copy of a patchable function calls the
//!   host's guarded function, which catches with the host's std
//!   ([`catch`]); the patch's cross function raises it with the patch's std.
//!
//! `&'static str` and `String` payloads keep their type; any other payload
//! becomes a `String` saying so (its `TypeId` would differ on the other
//! side anyway).

use std::any::Any;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicPtr, Ordering};

/// A caught panic, in a form both std copies can read.
#[repr(C)]
#[allow(missing_debug_implementations)]
pub struct Transport {
    kind: u8,
    ptr: *const u8,
    len: usize,
    /// Owner of the bytes (a `Box<String>` of the sending side), freed by
    /// the sending side's `free`.
    owner: *mut (),
    free: Option<unsafe fn(*mut ())>,
    /// Which patch library raised it in the host: the address of that
    /// library's [`HOST_RAISE`] cell (null for panics not sent by a patch).
    /// The host counts panics per library with it ([`panics_from`]).
    origin: *const (),
}

const KIND_STATIC: u8 = 0;
const KIND_STRING: u8 = 1;
const KIND_OTHER: u8 = 2;

/// Message for payloads that are neither `&str` nor `String`.
pub const OTHER_PAYLOAD: &str = "a hotpatch patch panicked with a payload that is not a string";

impl Transport {
    fn from_payload(payload: Box<dyn Any + Send>) -> Self {
        let payload = match payload.downcast::<&'static str>() {
            Ok(s) => {
                return Transport {
                    kind: KIND_STATIC,
                    ptr: s.as_ptr(),
                    len: s.len(),
                    owner: std::ptr::null_mut(),
                    free: None,
                    origin: std::ptr::null(),
                };
            }
            Err(p) => p,
        };
        match payload.downcast::<String>() {
            Ok(s) => {
                let (ptr, len) = (s.as_ptr(), s.len());
                Transport {
                    kind: KIND_STRING,
                    ptr,
                    len,
                    owner: Box::into_raw(s).cast(),
                    free: Some(free_string),
                    origin: std::ptr::null(),
                }
            }
            Err(_) => Transport {
                kind: KIND_OTHER,
                ptr: OTHER_PAYLOAD.as_ptr(),
                len: OTHER_PAYLOAD.len(),
                owner: std::ptr::null_mut(),
                free: None,
                origin: std::ptr::null(),
            },
        }
    }

    /// A transport of a plain message (an initialisation error).
    pub fn message(text: String) -> Self {
        let (ptr, len) = (text.as_ptr(), text.len());
        Transport {
            kind: KIND_STRING,
            ptr,
            len,
            owner: Box::into_raw(Box::new(text)).cast(),
            free: Some(free_string),
            origin: std::ptr::null(),
        }
    }

    /// The message, copied to this side; frees the sender's copy.
    pub(crate) fn into_message(self) -> String {
        // SAFETY: as in `into_payload`.
        let text = unsafe {
            std::str::from_utf8_unchecked(std::slice::from_raw_parts(self.ptr, self.len))
        };
        text.to_owned()
    }

    /// Rebuilds the payload with this side's std and allocator, and frees
    /// the sender's copy with the sender's allocator.
    fn into_payload(self) -> Box<dyn Any + Send> {
        // SAFETY: `ptr`/`len` describe a UTF-8 string the sender keeps alive
        // until `free` runs (below, in `drop`) or, for `KIND_STATIC`, for the
        // life of its library, which is never unmapped while it may run.
        let text: &'static str = unsafe {
            std::str::from_utf8_unchecked(std::slice::from_raw_parts(self.ptr, self.len))
        };
        match self.kind {
            KIND_STATIC => Box::new(text),
            _ => Box::new(text.to_owned()),
        }
    }
}

impl Drop for Transport {
    fn drop(&mut self) {
        if let Some(free) = self.free.take() {
            // SAFETY: `owner` came from `Box::into_raw` in `from_payload` of
            // the side that set `free`, and is freed once (`take`).
            unsafe { free(self.owner) }
        }
    }
}

/// # Safety
/// `owner` must come from `Box::<String>::into_raw` of this copy of std.
unsafe fn free_string(owner: *mut ()) {
    // SAFETY: guaranteed by the caller.
    drop(unsafe { Box::from_raw(owner.cast::<String>()) });
}

/// Runs `f`, returning its panic as a value instead of unwinding.
#[inline]
pub fn catch<R>(f: impl FnOnce() -> R) -> Result<R, Transport> {
    panic::catch_unwind(AssertUnwindSafe(f)).map_err(Transport::from_payload)
}

/// Panics raised in this process by each patch library, by the address of
/// its `HOST_RAISE` cell. Touched only on the panic path (a patch's panic
/// reaching the host), never by a call that does not panic.
static PANICS: parking_lot::Mutex<Vec<(usize, u64)>> = parking_lot::Mutex::new(Vec::new());

/// How many panics the patch library whose `HOST_RAISE` cell is at
/// `origin` has raised in the host so far (the control endpoint's watch
/// windows compare two readings).
pub(crate) fn panics_from(origin: usize) -> u64 {
    PANICS
        .lock()
        .iter()
        .find(|(o, _)| *o == origin)
        .map_or(0, |(_, n)| *n)
}

fn count(origin: usize) {
    let mut panics = PANICS.lock();
    match panics.iter_mut().find(|(o, _)| *o == origin) {
        Some((_, n)) => *n += 1,
        None => panics.push((origin, 1)),
    }
}

/// Raises a transported panic with this copy of std.
pub fn raise(t: Transport) -> ! {
    if !t.origin.is_null() {
        count(t.origin as usize);
    }
    let payload = t.into_payload();
    panic::resume_unwind(payload)
}

/// In a patch: where the host's [`raise`] is. Written by the host runtime
/// before the patch is published.
pub static HOST_RAISE: AtomicPtr<()> = AtomicPtr::new(std::ptr::null_mut());

/// The patch's entry shim: runs the replacement, and raises its panic in
/// the host.
#[inline]
pub fn enter<R>(f: impl FnOnce() -> R) -> R {
    match catch(f) {
        Ok(r) => r,
        Err(t) => raise_in_host(t),
    }
}

fn raise_in_host(mut t: Transport) -> ! {
    // This library's own cell: the host knows it (it wrote it) and counts
    // the panics of each patch by it.
    t.origin = std::ptr::addr_of!(HOST_RAISE).cast();
    // Acquire: pairs with the runtime's Release store of the slot that
    // published this patch, which happened after it wrote this cell.
    let host = HOST_RAISE.load(Ordering::Acquire);
    if host.is_null() {
        // Not loaded by a hotpatch runtime (a test calling the patch
        // directly): raise locally.
        raise(t)
    }
    // SAFETY: the runtime only stores the host's `raise`, a
    // `fn(Transport) -> !` of the same rustc (checked), in this cell.
    let host: fn(Transport) -> ! = unsafe { std::mem::transmute(host) };
    host(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_kinds_round_trip() {
        let t = catch(|| panic!("static")).unwrap_err();
        let p = t.into_payload();
        assert_eq!(*p.downcast::<&str>().unwrap(), "static");

        let n = 7;
        let t = catch(|| panic!("owned {n}")).unwrap_err();
        let p = t.into_payload();
        assert_eq!(*p.downcast::<String>().unwrap(), "owned 7");

        let t = catch(|| std::panic::panic_any(42u32)).unwrap_err();
        let p = t.into_payload();
        assert_eq!(*p.downcast::<String>().unwrap(), OTHER_PAYLOAD);
    }

    #[test]
    fn raise_unwinds_with_the_payload() {
        let t = catch(|| panic!("again")).unwrap_err();
        let caught = std::panic::catch_unwind(|| raise(t)).unwrap_err();
        assert_eq!(*caught.downcast::<&str>().unwrap(), "again");
    }

    #[test]
    fn panics_are_counted_by_origin_only_when_sent_by_a_patch() {
        // A cell standing for a patch library's HOST_RAISE.
        static CELL: u64 = 0;
        let origin = std::ptr::addr_of!(CELL) as usize;
        assert_eq!(panics_from(origin), 0);
        let mut t = catch(|| panic!("from a patch")).unwrap_err();
        t.origin = origin as *const ();
        let _ = std::panic::catch_unwind(|| raise(t));
        let local = catch(|| panic!("not from a patch")).unwrap_err();
        let _ = std::panic::catch_unwind(|| raise(local));
        assert_eq!(panics_from(origin), 1);
    }

    #[test]
    fn catch_passes_values_through() {
        assert_eq!(catch(|| 5).ok(), Some(5));
    }
}
