//! The private copy a patch is loaded from: a sealed memfd, or, where
//! memfd is unavailable, a file in a private temporary directory; and
//! `Error::Copy` when neither can be made.
//!
//! Memfd failure is injected with the `load::memfd` failpoint (hotpatch's
//! `failpoints` feature); the fallback's failure is real: its directory
//! made non-private, which it must refuse.

mod support;

use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, PermissionsExt};
use std::path::PathBuf;

use fail::FailGuard;
use hotpatch::Error;

/// Bytes no library of this process has yet (a tag past the loadable
/// segments), so a load of them makes a private copy.
fn fresh(tag: &str) -> PathBuf {
    let mut bytes = std::fs::read(support::patch("fixture-patch-basic")).unwrap();
    bytes.extend_from_slice(format!("\0hotpatch private copy: {tag}\0").as_bytes());
    support::write_temp(&format!("private-copy-{tag}.so"), &bytes)
}

/// The fallback's directory, as the runtime names it.
fn fallback_dir() -> PathBuf {
    std::env::temp_dir().join(format!("hotpatch-{}", std::process::id()))
}

/// The memfd a load made is the object the library is mapped from, and it
/// is sealed against writes, growth, shrinking and further sealing: a
/// write to it fails.
#[test]
fn the_memfd_is_sealed() {
    let _serial = support::serial();
    let so = fresh("sealed");
    let patch = hotpatch::load(&so).unwrap();
    let name = format!(
        "/memfd:hotpatch:{}",
        so.file_name().unwrap().to_str().unwrap()
    );
    let mapped = support::mapped_files(&name);
    assert!(!mapped.is_empty(), "the library is mapped from {name}");
    // The runtime keeps the memfd open: find it among this process's
    // descriptors by what it links to, and check it is the mapped inode.
    let fds: Vec<_> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            target.to_str()?.starts_with(&name).then(|| e.path())
        })
        .collect();
    assert_eq!(fds.len(), 1, "one descriptor of {name}: {fds:?}");
    let file = std::fs::File::open(&fds[0]).unwrap();
    let inode = file.metadata().unwrap().ino().to_string();
    assert!(
        mapped.iter().all(|(_, i, _)| *i == inode),
        "mapped {mapped:?}, descriptor inode {inode}"
    );
    // SAFETY: fcntl on a descriptor we own, with a command that takes no
    // argument.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    let want = libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
    assert!(seals >= 0, "{}", std::io::Error::last_os_error());
    assert_eq!(seals & want, want, "seals {seals:#x}");
    // A write through another open file description is refused.
    let writable = std::fs::OpenOptions::new()
        .write(true)
        .open(&fds[0])
        .unwrap();
    let err = writable
        .write_at(b"x", 0)
        .expect_err("a write to a sealed memfd");
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
    patch.revert().unwrap();
}

/// Where memfd is unavailable, the copy is a file in a private directory
/// of this user, removed once opened; the patch loads and works.
#[test]
fn without_memfd_the_copy_is_a_private_file() {
    let _serial = support::serial();
    let so = fresh("fallback");
    let patch = {
        let _no_memfd = FailGuard::new("load::memfd", "return").unwrap();
        hotpatch::load(&so).expect("the fallback loads")
    };
    assert_eq!(svc::answer(), 2, "patched");
    let name = so.file_name().unwrap().to_str().unwrap();
    assert!(
        support::mapped_files(&format!("/memfd:hotpatch:{name}")).is_empty(),
        "no memfd was made"
    );
    let dir = fallback_dir();
    let mapped: Vec<_> = support::mapped_files(dir.to_str().unwrap())
        .into_iter()
        .filter(|(_, _, n)| n.contains(name))
        .collect();
    assert!(!mapped.is_empty(), "mapped from {}", dir.display());
    assert!(
        mapped.iter().all(|(_, _, n)| n.ends_with("(deleted)")),
        "removed once opened: {mapped:?}"
    );
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "{}", dir.display());
    patch.revert().unwrap();
}

/// With no memfd and a fallback directory someone else could write,
/// the load fails with `Error::Copy` naming the file, and nothing changes.
#[test]
fn without_memfd_or_a_private_directory_the_load_is_a_copy_error() {
    let _serial = support::serial();
    let so = fresh("copy-error");
    let before = support::snapshot();
    let dir = fallback_dir();
    // As the runtime makes it, if no earlier load has.
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => panic!("{}: {e}", dir.display()),
    }
    let private = std::fs::Permissions::from_mode(0o700);
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let result = {
        let _no_memfd = FailGuard::new("load::memfd", "return").unwrap();
        hotpatch::load(&so)
    };
    std::fs::set_permissions(&dir, private).unwrap();
    match result {
        Err(Error::Copy { path, source }) => {
            assert_eq!(path, so);
            assert_eq!(
                source.kind(),
                std::io::ErrorKind::PermissionDenied,
                "{source}"
            );
        }
        other => panic!("expected Error::Copy, got {other:?}"),
    }
    assert_eq!(
        support::snapshot(),
        before,
        "a failed copy changed something"
    );
    // The same file loads once a copy can be made.
    let patch = hotpatch::load(&so).unwrap();
    patch.revert().unwrap();
}
