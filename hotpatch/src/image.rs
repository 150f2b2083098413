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
    /// `PT_GNU_RELRO`: parts of writable segments that the dynamic loader
    /// makes read-only once it has relocated them (from the start of the
    /// page, as glibc's `_dl_protect_relro` does). Not writable, whatever
    /// the segment's flags say.
    relro: Vec<(usize, usize)>,
}

impl Image {
    /// An object mapped by the runtime itself (`near.rs`): its segments
    /// `(start, end, p_flags)` and its read-only-after-relocation ranges.
    pub(crate) fn of_segments(segments: Vec<(u64, u64, u32)>, relro: Vec<(u64, u64)>) -> Image {
        Image {
            segments: segments
                .into_iter()
                .map(|(s, e, f)| (s as usize, e as usize, f))
                .collect(),
            relro: relro
                .into_iter()
                .map(|(s, e)| (s as usize, e as usize))
                .collect(),
        }
    }

    /// The object whose segments contain `addr`, if any: a patch the
    /// runtime mapped near the executable, or an object the dynamic loader
    /// knows.
    pub(crate) fn containing(addr: *const ()) -> Option<Image> {
        if let Some(image) = crate::near::images()
            .lock()
            .iter()
            .map(|(_, image)| image)
            .find(|image| image.contains(addr as usize))
        {
            return Some(image.clone());
        }
        Self::containing_dl(addr)
    }

    fn containing_dl(addr: *const ()) -> Option<Image> {
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
            let mut relro = Vec::new();
            for i in 0..usize::from(info.dlpi_phnum) {
                // SAFETY: `dlpi_phdr` has `dlpi_phnum` entries.
                let ph = unsafe { &*info.dlpi_phdr.add(i) };
                let start = (info.dlpi_addr as usize).wrapping_add(ph.p_vaddr as usize);
                let end = start.saturating_add(ph.p_memsz as usize);
                if ph.p_type == libc::PT_LOAD {
                    segments.push((start, end, ph.p_flags));
                } else if ph.p_type == libc::PT_GNU_RELRO {
                    relro.push((start & !(page_size() - 1), end));
                }
            }
            if segments
                .iter()
                .any(|&(s, e, _)| (s..e).contains(&search.addr))
            {
                search.found = Some(Image { segments, relro });
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

    /// `addr` is in one of this object's loadable segments.
    pub(crate) fn contains(&self, addr: usize) -> bool {
        self.segments
            .iter()
            .any(|&(s, e, _)| (s..e).contains(&addr))
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

    /// `ptr` and `len` make a valid `&[T]` in this object: non-null and
    /// aligned, and its `len` elements in readable memory. An empty slice
    /// reads nothing, so its pointer may dangle (the compiler gives `""`
    /// and `&[]` an address such as 1 that no object contains).
    pub(crate) fn readable_slice<T>(&self, ptr: *const T, len: usize) -> bool {
        !ptr.is_null()
            && ptr.is_aligned()
            && (len == 0
                || len
                    .checked_mul(std::mem::size_of::<T>())
                    .is_some_and(|size| self.readable(ptr.cast(), size)))
    }

    /// `[ptr, ptr + len)` is writable memory of this object.
    pub(crate) fn writable(&self, ptr: *const u8, len: usize) -> bool {
        let start = ptr as usize;
        !ptr.is_null()
            && self.within(start, len, PF_R | PF_W)
            && !self
                .relro
                .iter()
                .any(|&(s, e)| start < e && s < start.saturating_add(len))
    }

    /// Every page that `[ptr, ptr + len)` touches is read-only once the
    /// object is relocated: whole pages inside its `PT_GNU_RELRO`. The
    /// dynamic loader protects RELRO from the start of its first page to
    /// the start of the page holding its end (glibc's
    /// `_dl_protect_relro`): a last, partial page shares the segment's
    /// writable data and stays writable.
    pub(crate) fn read_only_after_relocation(&self, ptr: usize, len: usize) -> bool {
        let page = page_size();
        let Some(end) = ptr.checked_add(len) else {
            return false;
        };
        let first = ptr & !(page - 1);
        let last_end = end.div_ceil(page).saturating_mul(page);
        self.relro
            .iter()
            .any(|&(s, e)| s <= first && last_end <= (e & !(page - 1)))
    }

    /// `p` is an aligned `T` in writable memory of this object: a cell the
    /// runtime may store into.
    pub(crate) fn writable_value<T>(&self, p: *const T) -> bool {
        p.is_aligned() && self.writable(p.cast(), std::mem::size_of::<T>())
    }

    /// `addr` is in executable memory of this object.
    pub(crate) fn executable(&self, addr: *const ()) -> bool {
        !addr.is_null() && self.within(addr as usize, 1, PF_X)
    }
}

#[cfg(test)]
impl Image {
    /// This image with `[start, end)` cut out of its executable segments,
    /// and an image of that range alone (executable): two objects' code
    /// from one binary, for the fuzz of the checks that tell a patch's
    /// code from the host's (manifest/fuzz.rs).
    pub(crate) fn split_code(&self, start: usize, end: usize) -> (Image, Image) {
        let mut rest = Vec::new();
        for &(s, e, flags) in &self.segments {
            if flags & PF_X == 0 || e <= start || end <= s {
                rest.push((s, e, flags));
                continue;
            }
            if s < start {
                rest.push((s, start, flags));
            }
            if end < e {
                rest.push((end, e, flags));
            }
        }
        let rest = Image {
            segments: rest,
            relro: self.relro.clone(),
        };
        let carved = Image {
            segments: vec![(start, end, PF_R | PF_X)],
            relro: Vec::new(),
        };
        (rest, carved)
    }
}

fn page_size() -> usize {
    // SAFETY: no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size)
        .ok()
        .filter(|s| s.is_power_of_two())
        .unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::Image;

    static DATA: [u8; 16] = [7; 16];
    static WORDS: [u64; 2] = [7; 2];
    static RELRO: &[u8; 16] = &DATA;
    static mut WRITABLE: [u8; 16] = [0; 16];

    fn function() {}

    #[test]
    fn finds_this_binary_and_classifies_its_memory() {
        let image = Image::containing(DATA.as_ptr().cast()).expect("own image");
        assert!(image.readable(DATA.as_ptr(), DATA.len()));
        assert!(!image.writable(DATA.as_ptr(), DATA.len()), "rodata");
        let w = &raw const WRITABLE;
        assert!(image.writable(w.cast(), 16));
        // Relocated data (a static holding a pointer, in a PIE): in a
        // segment marked writable, made read-only by the dynamic loader.
        let relro = &raw const RELRO;
        assert!(image.readable(relro.cast(), 8));
        assert!(!image.writable(relro.cast(), 8), "RELRO");
        assert!(image.executable(function as fn() as *const ()));
        assert!(!image.executable(DATA.as_ptr().cast()));
        assert!(!image.readable(std::ptr::null(), 1));
        assert!(!image.readable(usize::MAX as *const u8, 2), "overflow");
        let heap = Box::new(5u8);
        assert!(!image.readable(&*heap, 1), "heap is no part of the image");
        assert!(Image::containing(&*heap as *const u8 as *const ()).is_none());
    }

    #[test]
    fn an_empty_slice_may_dangle_but_not_be_null_or_misaligned() {
        let image = Image::containing(DATA.as_ptr().cast()).expect("own image");
        // What the compiler makes of `""` and `&[]`: no object's memory.
        let empty: &[u64] = &[];
        assert!(Image::containing(empty.as_ptr().cast()).is_none());
        assert!(image.readable_slice(empty.as_ptr(), 0));
        assert!(image.readable_slice(std::ptr::dangling::<u8>(), 0));
        assert!(!image.readable_slice(std::ptr::dangling::<u8>(), 1));
        assert!(!image.readable_slice(std::ptr::null::<u8>(), 0), "null");
        assert!(
            !image.readable_slice(std::ptr::without_provenance::<u64>(1), 0),
            "misaligned"
        );
        assert!(image.readable_slice(DATA.as_ptr(), DATA.len()));
        assert!(
            !image.readable_slice(DATA.as_ptr(), 1 << 40),
            "past the image"
        );
        assert!(image.readable_slice(WORDS.as_ptr(), 2));
        assert!(
            !image.readable_slice(WORDS.as_ptr(), usize::MAX),
            "overflow"
        );
    }
}
