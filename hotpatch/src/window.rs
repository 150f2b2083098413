//! Write windows on read-only pages: how the runtime stores into the slot
//! table, which is read-only between patches.
//!
//! Every slot is a static in a section named `.data.rel.ro.hotpatch_slots.*`
//! (the macro puts it there). The linker places such sections in
//! `PT_GNU_RELRO`, which the dynamic loader makes read-only once it has
//! relocated the binary, as it does for the GOT: between two operations
//! a stray or hostile write into a slot faults instead of redirecting a
//! function. To store into slots the runtime opens a [`Window`] on the
//! pages that hold them (made writable), stores, and drops the window
//! (the pages read-only again, also when the code in between unwinds).
//! One window covers every slot of one step of an operation: a patch of N
//! functions whose slots share k pages costs one `mprotect` pair per run
//! of adjacent pages, not N.
//!
//! # Concurrent windows
//!
//! Two windows may cover one page (two slots on one page, or one slot
//! written by two threads). The page must stay writable until the *last*
//! of them closes: a writer that finishes first must not make it
//! read-only under the other, and no page may stay writable once every
//! window on it has closed. So [`Windows`] counts the open windows of
//! each page, and changes a page's protection only under its lock,
//! together with the count: a page is made writable by the window that
//! takes its count from 0 to 1 and read-only by the one that takes it
//! from 1 to 0, each before it releases the lock. Invariant, whenever the
//! lock is free: a page is writable exactly when its count is not zero.
//! A writer stores only while it holds a count on the page (after
//! [`Windows::open`] returned, before its [`Window`] drops), so the page
//! is writable while it stores: `mprotect` has changed the mapping for
//! every thread of the process before it returns, and the lock orders
//! the other writer's protection change after our open (it sees our
//! count and leaves the page alone) or before it (then it made the page
//! writable, or read-only with a count of zero, before we took ours).
//! Model-checked with loom (`tests/loom.rs`, `window_*`).
//!
//! In the runtime all slot stores happen under the transition turn, so
//! two windows never actually overlap today; the count keeps the
//! protection right whatever serialises the writers.

#[cfg(hotpatch_loom)]
use loom::sync::Mutex;
#[cfg(not(hotpatch_loom))]
use std::sync::Mutex;

use std::collections::BTreeMap;
use std::io;
use std::sync::PoisonError;

/// How a [`Windows`] changes the protection of a run of pages.
pub trait Pages {
    /// The page size, a power of two.
    fn page_size(&self) -> usize;

    /// Makes `[start, start + len)` (whole pages) readable and writable
    /// (`writable`), or read-only.
    fn protect(&self, start: usize, len: usize, writable: bool) -> io::Result<()>;

    /// Making `[start, start + len)` read-only again failed (the kernel
    /// could not split or merge the mapping: `ENOMEM` at the limit of
    /// mappings): the pages stay writable, as a binary without RELRO has
    /// them all the time. A destructor can only report it.
    fn still_writable(&self, start: usize, len: usize, error: &io::Error) {
        let _ = (start, len, error);
    }
}

/// The open windows of each page, and the pages they make writable.
#[derive(Debug)]
pub struct Windows<P> {
    pages: P,
    /// Page address to the number of open windows on it (never 0: a page
    /// whose count drops to 0 is removed).
    open: Mutex<BTreeMap<usize, usize>>,
}

/// An open window: its pages are writable until it drops.
#[derive(Debug)]
#[must_use = "the pages are made read-only again when the window drops"]
pub struct Window<'a, P: Pages> {
    windows: &'a Windows<P>,
    /// The pages it holds a count on, sorted.
    pages: Vec<usize>,
}

/// Runs of adjacent pages in `pages` (sorted, distinct): `(start, len)`.
fn runs(pages: &[usize], page_size: usize) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for &p in pages {
        match out.last_mut() {
            Some((start, len)) if *start + *len == p => *len += page_size,
            _ => out.push((p, page_size)),
        }
    }
    out
}

impl<P: Pages> Windows<P> {
    #[cfg(not(hotpatch_loom))]
    pub const fn new(pages: P) -> Self {
        Windows {
            pages,
            open: Mutex::new(BTreeMap::new()),
        }
    }

    #[cfg(hotpatch_loom)]
    pub fn new(pages: P) -> Self {
        Windows {
            pages,
            open: Mutex::new(BTreeMap::new()),
        }
    }

    /// The pages `[addr, addr + len)` of each range touch, sorted and
    /// distinct.
    fn pages_of(&self, ranges: impl IntoIterator<Item = (usize, usize)>) -> Vec<usize> {
        let size = self.pages.page_size();
        let mut pages = Vec::new();
        for (addr, len) in ranges {
            if len == 0 {
                continue;
            }
            let first = addr & !(size - 1);
            let last = (addr + len - 1) & !(size - 1);
            pages.extend((first..=last).step_by(size));
        }
        pages.sort_unstable();
        pages.dedup();
        pages
    }

    /// Makes the pages of `ranges` (`(address, length)`) writable until the
    /// returned window drops.
    ///
    /// # Errors
    ///
    /// The error of the `mprotect` that failed; then no page's protection
    /// or count has changed (the runs made writable before it are made
    /// read-only again).
    pub fn open(
        &self,
        ranges: impl IntoIterator<Item = (usize, usize)>,
    ) -> io::Result<Window<'_, P>> {
        let pages = self.pages_of(ranges);
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let closed: Vec<usize> = pages
            .iter()
            .copied()
            .filter(|p| !open.contains_key(p))
            .collect();
        let size = self.pages.page_size();
        let closed = runs(&closed, size);
        for (i, &(start, len)) in closed.iter().enumerate() {
            if let Err(e) = self.pages.protect(start, len, true) {
                for &(start, len) in &closed[..i] {
                    // Best effort: they were read-only a moment ago.
                    let _ = self.pages.protect(start, len, false);
                }
                return Err(e);
            }
        }
        for &p in &pages {
            *open.entry(p).or_insert(0) += 1;
        }
        drop(open);
        Ok(Window {
            windows: self,
            pages,
        })
    }

    /// Whether any window is open on the page of `addr` (tests).
    #[cfg(any(test, hotpatch_loom))]
    pub fn is_open(&self, addr: usize) -> bool {
        let page = addr & !(self.pages.page_size() - 1);
        let open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        open.contains_key(&page)
    }
}

impl<P: Pages> Drop for Window<'_, P> {
    fn drop(&mut self) {
        let w = self.windows;
        let mut open = w.open.lock().unwrap_or_else(PoisonError::into_inner);
        let mut last = Vec::new();
        for p in &self.pages {
            if let Some(n) = open.get_mut(p) {
                *n -= 1;
                if *n == 0 {
                    open.remove(p);
                    last.push(*p);
                }
            }
        }
        for (start, len) in runs(&last, w.pages.page_size()) {
            // Under the lock, with the counts: see the module docs.
            if let Err(e) = w.pages.protect(start, len, false) {
                w.pages.still_writable(start, len, &e);
            }
        }
    }
}

#[cfg(all(test, not(hotpatch_loom)))]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// Records protection changes instead of making them; fails the
    /// `fail_at`th call.
    #[derive(Debug)]
    struct Fake {
        calls: RefCell<Vec<(usize, usize, bool)>>,
        /// Fails the call made when this many succeeded, once.
        fail_at: std::cell::Cell<Option<usize>>,
    }

    impl Pages for Fake {
        fn page_size(&self) -> usize {
            0x1000
        }
        fn protect(&self, start: usize, len: usize, writable: bool) -> io::Result<()> {
            let mut calls = self.calls.borrow_mut();
            if Some(calls.len()) == self.fail_at.get() {
                self.fail_at.set(None);
                return Err(io::Error::from_raw_os_error(libc::ENOMEM));
            }
            calls.push((start, len, writable));
            Ok(())
        }
    }

    fn fake(fail_at: Option<usize>) -> Windows<Fake> {
        Windows::new(Fake {
            calls: RefCell::new(Vec::new()),
            fail_at: std::cell::Cell::new(fail_at),
        })
    }

    #[test]
    fn one_protection_change_per_run_of_adjacent_pages() {
        let w = fake(None);
        // Three slots on page 0x10000, one straddling 0x11000/0x12000,
        // one on 0x20000.
        let slots = [
            (0x10000, 64),
            (0x10040, 64),
            (0x10f80, 64),
            (0x11fe0, 64),
            (0x20000, 64),
        ];
        let window = w.open(slots).unwrap();
        assert_eq!(
            *w.pages.calls.borrow(),
            [(0x10000, 0x3000, true), (0x20000, 0x1000, true)]
        );
        drop(window);
        assert_eq!(
            w.pages.calls.borrow()[2..],
            [(0x10000, 0x3000, false), (0x20000, 0x1000, false)]
        );
        assert!(!w.is_open(0x10000));
    }

    #[test]
    fn the_last_window_on_a_page_makes_it_read_only() {
        let w = fake(None);
        let a = w.open([(0x10000, 64)]).unwrap();
        let b = w.open([(0x10040, 64), (0x30000, 8)]).unwrap();
        // b found 0x10000 open: only 0x30000 changed.
        assert_eq!(
            *w.pages.calls.borrow(),
            [(0x10000, 0x1000, true), (0x30000, 0x1000, true)]
        );
        drop(a); // finishes first: 0x10000 stays writable for b
        assert_eq!(w.pages.calls.borrow().len(), 2);
        assert!(w.is_open(0x10000));
        drop(b);
        assert_eq!(
            w.pages.calls.borrow()[2..],
            [(0x10000, 0x1000, false), (0x30000, 0x1000, false)]
        );
        assert!(!w.is_open(0x10000) && !w.is_open(0x30000));
    }

    #[test]
    fn a_failed_open_changes_nothing() {
        // The second run fails: the first is made read-only again.
        let w = fake(Some(1));
        let err = w.open([(0x10000, 8), (0x20000, 8)]).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOMEM));
        assert_eq!(
            *w.pages.calls.borrow(),
            [(0x10000, 0x1000, true), (0x10000, 0x1000, false)]
        );
        assert!(!w.is_open(0x10000) && !w.is_open(0x20000));
    }

    #[test]
    fn a_panic_in_the_window_closes_it() {
        let w = fake(None);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _window = w.open([(0x10000, 8)]).unwrap();
            panic!("while storing");
        }));
        assert!(result.is_err());
        assert_eq!(
            *w.pages.calls.borrow(),
            [(0x10000, 0x1000, true), (0x10000, 0x1000, false)]
        );
        assert!(!w.is_open(0x10000));
    }
}
