//! Platform specifics: the private, immutable copy a patch is loaded from.
//!
//! `dlopen` caches by path, so a patch rebuilt in place and loaded again
//! would silently be the old code; and a file on disk can change between
//! the checks and the load. So every load reads the file once and opens a
//! private copy of exactly those bytes: a sealed memfd where the kernel
//! has them (Linux >= 3.17), otherwise a file in a directory only this
//! user can write, unlinked once opened.

use std::ffi::CString;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A private copy of a patch's bytes.
#[derive(Debug)]
pub(crate) struct PrivateCopy {
    pub file: File,
    /// What to pass to `dlopen`.
    pub path: PathBuf,
    /// Remove `path` once the library is open (temp-file fallback).
    pub unlink_after_open: bool,
}

pub(crate) fn private_copy(label: &str, bytes: &[u8]) -> io::Result<PrivateCopy> {
    match memfd_copy(label, bytes) {
        Ok(copy) => Ok(copy),
        Err(_) => tempfile_copy(label, bytes),
    }
}

fn memfd_copy(label: &str, bytes: &[u8]) -> io::Result<PrivateCopy> {
    // A kernel without memfd, for the fallback's tests (tests/private_copy.rs).
    #[cfg(feature = "failpoints")]
    fail::fail_point!("load::memfd", |_| Err(io::Error::other(
        "memfd unavailable (injected)"
    )));
    if !Path::new("/proc/self/fd").is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "no /proc/self/fd",
        ));
    }
    let name = CString::new(format!("hotpatch:{label}"))
        .unwrap_or_else(|_| CString::new("hotpatch").expect("no NUL"));
    // SAFETY: `name` is a valid NUL-terminated string; the flags are valid.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
    let mut file = unsafe { File::from_raw_fd(fd) };
    file.write_all(bytes)?;
    let seals = libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
    // SAFETY: fcntl on a descriptor we own with a valid command and argument.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // The descriptor stays open for the life of the process: its number,
    // and so the path, is unique to this copy while it is open, which is
    // what keeps dlopen's by-name cache from confusing two copies.
    let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    Ok(PrivateCopy {
        file,
        path,
        unlink_after_open: false,
    })
}

fn tempfile_copy(label: &str, bytes: &[u8]) -> io::Result<PrivateCopy> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!("hotpatch-{}", std::process::id()));
    match fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            // Ours from an earlier load, or planted by someone else under a
            // predictable name: use it only if it is a real directory of
            // this user that no one else can write.
            use std::os::unix::fs::MetadataExt;
            let m = fs::symlink_metadata(&dir)?;
            // SAFETY: geteuid has no preconditions.
            let euid = unsafe { libc::geteuid() };
            if !m.is_dir() || m.uid() != euid || m.mode() & 0o077 != 0 {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "{} exists and is not a private directory of this user",
                        dir.display()
                    ),
                ));
            }
        }
        Err(e) => return Err(e),
    }
    // Relaxed: only uniqueness matters.
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let safe_label: String = label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let path = dir.join(format!("{n}-{safe_label}"));
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o500)
        .open(&path)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    Ok(PrivateCopy {
        file,
        path,
        unlink_after_open: true,
    })
}

/// Whether `file` holds exactly `bytes`.
pub(crate) fn same_bytes(file: &File, bytes: &[u8]) -> io::Result<bool> {
    let len = file.metadata()?.len();
    if len != bytes.len() as u64 {
        return Ok(false);
    }
    if len == 0 {
        return Ok(true);
    }
    // Compare against a read-only mapping of the copy: no second copy of a
    // file that can be tens of megabytes.
    // SAFETY: a fresh private read-only mapping of a file we own; checked
    // for failure below, unmapped before returning.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes.len(),
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            file.as_raw_fd(),
            0,
        )
    };
    if map == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the mapping is `bytes.len()` readable bytes (the file's
    // length, checked above; a sealed memfd cannot shrink).
    let mapped = unsafe { std::slice::from_raw_parts(map.cast::<u8>(), bytes.len()) };
    let same = mapped == bytes;
    // SAFETY: unmapping the mapping made above, no longer borrowed.
    unsafe { libc::munmap(map, bytes.len()) };
    Ok(same)
}
