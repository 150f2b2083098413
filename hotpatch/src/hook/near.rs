//! Memory for stubs, trampolines and hook slots within reach of a rel32
//! jump from the functions they serve.
//!
//! An *arena* is two mappings side by side: `CODE` bytes mapped
//! read-execute from the start (never writable: its bytes are written like
//! any code, `write.rs`, so memory-deny-write-execute does not refuse it)
//! and `DATA` bytes of slots, read-only between operations (stored into
//! through the slot table's write windows, `slot::write_window_pages`).
//! Each hook takes one `CHUNK` of each. Nothing is ever unmapped: a thread
//! may still run a stub or trampoline of a hook that was removed, and a
//! hook installed again on the same function reuses its chunk.

use std::sync::Mutex;

use crate::slot::Slot;

pub(crate) const CHUNK: usize = 128;
const CODE: usize = 64 * 1024;
const DATA: usize = 64 * 1024;
const CHUNKS: usize = CODE / CHUNK;
const _: () = assert!(size_of::<Slot>() <= CHUNK && CHUNKS * CHUNK <= DATA);

/// How far from a function its chunk may be: a rel32 jump reaches
/// +-2 GiB; keep a margin for the arena's own size.
const REACH: usize = (1 << 31) - 4 * (CODE + DATA);

struct Arena {
    code: usize,
    data: usize,
    used: usize,
}

static ARENAS: Mutex<Vec<Arena>> = Mutex::new(Vec::new());

/// One hook's memory: `CHUNK` bytes of code (read-execute) and a slot.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Chunk {
    pub code: usize,
    pub slot: usize,
}

fn within(a: usize, b: usize, len: usize) -> bool {
    a.abs_diff(b) + len < REACH
}

/// Maps `len` bytes with `prot` exactly at `at`, or nothing.
fn map_at(at: usize, len: usize, prot: libc::c_int) -> Option<usize> {
    // SAFETY: an anonymous private mapping at a hint; MAP_FIXED_NOREPLACE
    // never replaces an existing mapping, it fails instead.
    let p = unsafe {
        libc::mmap(
            at as *mut libc::c_void,
            len,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return None;
    }
    if p as usize != at {
        // A kernel older than 4.17 treats the flag as a hint.
        // SAFETY: unmapping the mapping just made, which nothing uses.
        unsafe { libc::munmap(p, len) };
        return None;
    }
    Some(at)
}

/// A new arena near `target`: tried 1 MiB apart, below the target first
/// (above a PIE executable lies its heap).
fn new_arena(target: usize) -> Option<Arena> {
    const STEP: usize = 1 << 20;
    let base = target & !(STEP - 1);
    let below = (1..1024).filter_map(|i| base.checked_sub(i * STEP));
    let above = (1..1024).filter_map(|i| base.checked_add(i * STEP));
    for at in below.chain(above) {
        if at < 0x10000 || !within(at, target, CODE + DATA) {
            continue;
        }
        let Some(code) = map_at(at, CODE, libc::PROT_READ | libc::PROT_EXEC) else {
            continue;
        };
        if let Some(data) = map_at(code + CODE, DATA, libc::PROT_READ) {
            return Some(Arena {
                code,
                data,
                used: 0,
            });
        }
        // SAFETY: unmapping the code mapping just made, which nothing uses.
        unsafe { libc::munmap(code as *mut libc::c_void, CODE) };
    }
    None
}

/// A fresh chunk within reach of `target`, or `None` if no memory could
/// be mapped there.
pub(crate) fn chunk_near(target: usize) -> Option<Chunk> {
    let mut arenas = ARENAS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let i = match arenas
        .iter()
        .position(|a| a.used < CHUNKS && within(a.code, target, CODE + DATA))
    {
        Some(i) => i,
        None => {
            arenas.push(new_arena(target)?);
            arenas.len() - 1
        }
    };
    let arena = &mut arenas[i];
    let chunk = Chunk {
        code: arena.code + arena.used * CHUNK,
        slot: arena.data + arena.used * CHUNK,
    };
    arena.used += 1;
    Some(chunk)
}

/// Whether `addr` lies in the slot memory of an arena.
pub(crate) fn owns_slot(addr: usize) -> bool {
    let arenas = ARENAS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    arenas
        .iter()
        .any(|a| (a.data..a.data + DATA).contains(&addr))
}

/// The arenas mapped so far, `(start, end)` of code and of data (tests
/// check that none is writable between operations).
pub(crate) fn arenas() -> Vec<(usize, usize)> {
    let arenas = ARENAS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    arenas
        .iter()
        .flat_map(|a| [(a.code, a.code + CODE), (a.data, a.data + DATA)])
        .collect()
}
