// `unsafe fn`, `extern "C" fn` and both, free and as methods.

/// # Safety
/// `p` must be valid for reads.
#[hotpatch::patchable]
pub unsafe fn read(p: *const u64) -> u64 {
    // SAFETY: the caller guarantees `p` is valid.
    unsafe { *p }
}

#[hotpatch::patchable]
pub extern "C" fn add_one(x: u32) -> u32 {
    x + 1
}

/// # Safety
/// `p` must be valid for writes.
#[hotpatch::patchable]
pub unsafe extern "C" fn write(p: *mut u32, v: u32) {
    // SAFETY: the caller guarantees `p` is valid.
    unsafe { *p = v }
}

#[hotpatch::patchable]
pub extern "system" fn system_abi(x: i32) -> i32 {
    x - 1
}

pub struct Raw(pub *const u64);

#[hotpatch::patchable]
impl Raw {
    /// # Safety
    /// The pointer must be valid for reads.
    pub unsafe fn get(&self) -> u64 {
        // SAFETY: the caller guarantees the pointer is valid.
        unsafe { *self.0 }
    }

    pub extern "C" fn is_null(&self) -> bool {
        self.0.is_null()
    }
}

fn main() {
    let x = 7u64;
    // SAFETY: `x` is a live u64.
    assert_eq!(unsafe { read(&x) }, 7);
    assert_eq!(add_one(1), 2);
    let mut y = 0u32;
    // SAFETY: `y` is a live u32.
    unsafe { write(&mut y, 9) };
    assert_eq!(y, 9);
    assert_eq!(system_abi(1), 0);
    let r = Raw(&x);
    // SAFETY: `x` is alive.
    assert_eq!(unsafe { r.get() }, 7);
    assert!(!r.is_null());
    let f: unsafe fn(*const u64) -> u64 = read;
    // SAFETY: `x` is a live u64.
    assert_eq!(unsafe { f(&x) }, 7);
    let g: extern "C" fn(u32) -> u32 = add_one;
    assert_eq!(g(2), 3);
}
