//! Writing machine code: through `/proc/self/mem` first, which leaves
//! every mapping's protection alone (the kernel writes through its own
//! mapping of the page, as a debugger's breakpoint does), else by making
//! the pages read-write-execute with `mprotect` for the write and
//! restoring their protection. Which one works is probed before the
//! entry write (by writing the bytes already there), so the write under a
//! stop does not allocate, and a process where neither works is refused
//! with nothing changed.
//!
//! Both are safe while other threads execute the same page: the first
//! write makes the process's own copy of the page (it is a private
//! mapping of the executable: copy-on-write) with the same bytes, and
//! the `mprotect` path adds write permission to read and execute, never
//! removes execute. Which bytes a thread may execute while they change is
//! the protocols' business (`hook/mod.rs`, "The write").

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// How code is written in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WritePath {
    /// `pwrite` to `/proc/self/mem`: no protection changes.
    ProcMem,
    /// `mprotect` to read-write-execute around the write, then back.
    Mprotect,
}

/// Neither way of writing code works here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteDenied {
    /// Why `/proc/self/mem` refused.
    pub proc_mem: String,
    /// Why `mprotect` refused.
    pub mprotect: String,
    /// The setting that forbids it, where this process can tell.
    pub setting: String,
}

impl std::fmt::Display for WriteDenied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "this process may not write code: {}; writing through /proc/self/mem failed ({}) and \
             making the page writable with mprotect failed ({})",
            self.setting, self.proc_mem, self.mprotect
        )
    }
}

/// `PR_GET_MDWE` (Linux 6.3).
const PR_GET_MDWE: libc::c_int = 66;

/// What forbids writing code, as far as this process can tell.
fn setting() -> String {
    // SAFETY: prctl with an option that only reads a flag.
    let mdwe = unsafe { libc::prctl(PR_GET_MDWE, 0, 0, 0, 0) };
    if mdwe > 0 {
        return "memory-deny-write-execute is on (PR_SET_MDWE, as systemd's \
                MemoryDenyWriteExecute=yes sets it)"
            .into();
    }
    "an operating-system policy forbids it (systemd's MemoryDenyWriteExecute=yes, SELinux \
     without execmod, a sandbox denying /proc/self/mem, or the kernel's \
     proc_mem.force_override=never)"
        .into()
}

/// A way of writing code, probed.
#[derive(Debug)]
pub(crate) struct CodeWriter {
    path: WritePath,
    mem: Option<File>,
}

fn page_size() -> usize {
    region::page::size()
}

/// The pages of `[addr, addr + len)` with their protections now, for the
/// `mprotect` path (read before the stop: `region::query` reads
/// `/proc/self/maps`).
pub(crate) type Pages = Vec<(usize, libc::c_int)>;

fn pages_of(addr: usize, len: usize) -> io::Result<Pages> {
    let page = page_size();
    let mut out = Vec::new();
    let mut p = addr & !(page - 1);
    while p < addr + len {
        let r = region::query(p as *const u8).map_err(|e| io::Error::other(e.to_string()))?;
        let prot = r.protection();
        let mut bits = 0;
        if prot.contains(region::Protection::READ) {
            bits |= libc::PROT_READ;
        }
        if prot.contains(region::Protection::WRITE) {
            bits |= libc::PROT_WRITE;
        }
        if prot.contains(region::Protection::EXECUTE) {
            bits |= libc::PROT_EXEC;
        }
        out.push((p, bits));
        p += page;
    }
    Ok(out)
}

impl CodeWriter {
    /// Finds a way to write `[addr, addr + len)` by writing back the bytes
    /// there now (nothing changes). `force` restricts the choice (tests,
    /// and services that forbid one path).
    pub fn probe(
        addr: usize,
        len: usize,
        force: Option<WritePath>,
    ) -> Result<(CodeWriter, Pages), WriteDenied> {
        // SAFETY: the caller passes mapped, readable code.
        let now = unsafe { std::slice::from_raw_parts(addr as *const u8, len) }.to_vec();
        let mut proc_mem = String::from("not tried");
        if force != Some(WritePath::Mprotect) {
            match File::options()
                .read(true)
                .write(true)
                .open("/proc/self/mem")
            {
                Ok(mem) => match mem.write_all_at(&now, addr as u64) {
                    Ok(()) => {
                        return Ok((
                            CodeWriter {
                                path: WritePath::ProcMem,
                                mem: Some(mem),
                            },
                            Vec::new(),
                        ));
                    }
                    Err(e) => proc_mem = format!("pwrite: {e}"),
                },
                Err(e) => proc_mem = format!("open: {e}"),
            }
        }
        let mut mprotect = String::from("not tried");
        if force != Some(WritePath::ProcMem) {
            match pages_of(addr, len) {
                Ok(pages) => {
                    let writer = CodeWriter {
                        path: WritePath::Mprotect,
                        mem: None,
                    };
                    match writer.with_writable(&pages, || Ok(())) {
                        Ok(()) => return Ok((writer, pages)),
                        Err(e) => mprotect = e.to_string(),
                    }
                }
                Err(e) => mprotect = format!("reading the protection: {e}"),
            }
        }
        Err(WriteDenied {
            proc_mem,
            mprotect,
            setting: setting(),
        })
    }

    pub fn path(&self) -> WritePath {
        self.path
    }

    /// Runs `f` with `pages` read-write-execute, then restores them.
    fn with_writable(&self, pages: &Pages, f: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        let page = page_size();
        let mut changed = 0;
        let mut result = Ok(());
        for &(p, _) in pages {
            // SAFETY: `p` is a mapped page of code (queried above); adding
            // write permission keeps read and execute, so a thread running
            // on it (this one included) is unaffected.
            if unsafe {
                libc::mprotect(
                    p as *mut libc::c_void,
                    page,
                    libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
                )
            } != 0
            {
                result = Err(io::Error::last_os_error());
                break;
            }
            changed += 1;
        }
        if result.is_ok() {
            result = f();
        }
        for &(p, prot) in &pages[..changed] {
            // SAFETY: restoring the protection the page had.
            if unsafe { libc::mprotect(p as *mut libc::c_void, page, prot) } != 0 && result.is_ok()
            {
                result = Err(io::Error::last_os_error());
            }
        }
        result
    }

    /// Writes `bytes` at `addr` (in `pages` for the `mprotect` path).
    /// Allocates nothing: it may run while other threads are stopped.
    pub fn write(&self, addr: usize, bytes: &[u8], pages: &Pages) -> io::Result<()> {
        match (&self.path, &self.mem) {
            (WritePath::ProcMem, Some(mem)) => mem.write_all_at(bytes, addr as u64),
            _ => self.with_writable(pages, || {
                // SAFETY: the pages are writable for the duration; the
                // caller guarantees that no thread executes these bytes
                // now, or that a thread fetches either the old or the new
                // byte of a one-byte write (the breakpoint protocol).
                unsafe {
                    std::ptr::copy_nonoverlapping(bytes.as_ptr(), addr as *mut u8, bytes.len())
                };
                Ok(())
            }),
        }
    }
}
