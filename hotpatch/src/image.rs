//! The memory image of one loaded object, for checking that the pointers
//! a manifest hands over point into the library that exported it, before
//! anything reads through them.

use std::ffi::c_void;

/// Segment permission bits (`p_flags`).
const PF_X: u32 = 1;
const PF_W: u32 = 2;
const PF_R: u32 = 4;

/// The loadable segments of one object, as mapped: `(start, end, flags)`.
#[derive(Debug, Clone)]
pub(crate) struct Image {
    segments: Vec<(usize, usize, u32)>,
}

impl Image {
    /// The object whose segments contain `addr`, if any.
    pub(crate) fn containing(addr: *const ()) -> Option<Image> {
        struct Search {
            addr: usize,
            found: Option<Image>,
        }
        unsafe extern "C" fn visit(
            info: *mut libc::dl_phdr_info,
            _size: usize,
            data: *mut c_void,
        ) -> libc::c_int {
            // SAFETY: `data` is the `Search` passed below, and `info` a
            // valid entry for the duration of the callback (dl_iterate_phdr's
            // contract).
            let (search, info) = unsafe { (&mut *data.cast::<Search>(), &*info) };
            let mut segments = Vec::new();
            for i in 0..usize::from(info.dlpi_phnum) {
                // SAFETY: `dlpi_phdr` has `dlpi_phnum` entries.
                let ph = unsafe { &*info.dlpi_phdr.add(i) };
                if ph.p_type == libc::PT_LOAD {
                    let start = (info.dlpi_addr as usize).wrapping_add(ph.p_vaddr as usize);
                    let end = start.saturating_add(ph.p_memsz as usize);
                    segments.push((start, end, ph.p_flags));
                }
            }
            if segments
                .iter()
                .any(|&(s, e, _)| (s..e).contains(&search.addr))
            {
                search.found = Some(Image { segments });
                return 1; // stop
            }
            0
        }
        let mut search = Search {
            addr: addr as usize,
            found: None,
        };
        // SAFETY: the callback only reads the entries it is given and
        // writes to `search`, which outlives the call.
        unsafe { libc::dl_iterate_phdr(Some(visit), (&mut search as *mut Search).cast()) };
        search.found
    }

    fn within(&self, ptr: usize, len: usize, need: u32) -> bool {
        let Some(end) = ptr.checked_add(len) else {
            return false;
        };
        self.segments
            .iter()
            .any(|&(s, e, flags)| flags & need == need && s <= ptr && end <= e)
    }

    /// `[ptr, ptr + len)` is readable memory of this object.
    pub(crate) fn readable(&self, ptr: *const u8, len: usize) -> bool {
        !ptr.is_null() && self.within(ptr as usize, len, PF_R)
    }

    /// `[ptr, ptr + len)` is writable memory of this object.
    pub(crate) fn writable(&self, ptr: *const u8, len: usize) -> bool {
        !ptr.is_null() && self.within(ptr as usize, len, PF_R | PF_W)
    }

    /// `addr` is in executable memory of this object.
    pub(crate) fn executable(&self, addr: *const ()) -> bool {
        !addr.is_null() && self.within(addr as usize, 1, PF_X)
    }

    /// `s` points into readable memory of this object.
    pub(crate) fn str(&self, s: &str) -> bool {
        self.readable(s.as_ptr(), s.len())
    }
}

#[cfg(test)]
mod tests {
    use super::Image;

    static DATA: [u8; 16] = [7; 16];
    static mut WRITABLE: [u8; 16] = [0; 16];

    fn function() {}

    #[test]
    fn finds_this_binary_and_classifies_its_memory() {
        let image = Image::containing(DATA.as_ptr().cast()).expect("own image");
        assert!(image.readable(DATA.as_ptr(), DATA.len()));
        assert!(!image.writable(DATA.as_ptr(), DATA.len()), "rodata");
        let w = &raw const WRITABLE;
        assert!(image.writable(w.cast(), 16));
        assert!(image.executable(function as fn() as *const ()));
        assert!(!image.executable(DATA.as_ptr().cast()));
        assert!(!image.readable(std::ptr::null(), 1));
        assert!(!image.readable(usize::MAX as *const u8, 2), "overflow");
        let heap = Box::new(5u8);
        assert!(!image.readable(&*heap, 1), "heap is no part of the image");
        assert!(Image::containing(&*heap as *const u8 as *const ()).is_none());
    }
}
