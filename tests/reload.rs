//! Each load is independent of the file on disk: a patch rebuilt at the
//! same path is the new code. And loading the same bytes again reuses the
//! mapping: apply/revert cycles do not grow memory or descriptors.

mod support;

use std::path::Path;

const A: &str = "fixture-patch-stack-a";
const B: &str = "fixture-patch-stack-b";

/// `(add(2, 3), answer())`: A makes it (1005, 10), B (2005, 1).
fn observed() -> (u64, u64) {
    (svc::add(2, 3), svc::answer())
}

/// Overwrites `dst` in place (same inode), as a rebuild would.
fn overwrite(src: &Path, dst: &Path) {
    std::fs::write(dst, std::fs::read(src).unwrap()).unwrap();
    support::set_mode(dst, 0o644); // not the umask's: the loader refuses 0664
}

#[test]
fn rebuilt_at_the_same_path_is_new_code() {
    let _serial = support::serial();
    let (a_so, b_so) = (support::patch(A), support::patch(B));
    let path = support::temp_dir().join("librebuilt.so");

    overwrite(&a_so, &path);
    let a = hotpatch::load(&path).unwrap();
    assert_eq!(a.name(), A);
    assert_eq!(observed(), (1005, 10));
    a.revert().unwrap();
    assert_eq!(observed(), (5, 1));

    overwrite(&b_so, &path);
    let b = hotpatch::load(&path).unwrap();
    assert_eq!(b.name(), B);
    assert_eq!(observed(), (2005, 1), "B's code, not a cached A");
    b.revert().unwrap();

    overwrite(&a_so, &path);
    let a = hotpatch::load(&path).unwrap();
    assert_eq!(observed(), (1005, 10), "A again");
    a.revert().unwrap();
    assert_eq!(observed(), (5, 1));
}

#[test]
fn applied_code_does_not_depend_on_the_file() {
    let _serial = support::serial();
    let (a_so, b_so) = (support::patch(A), support::patch(B));
    let path = support::temp_dir().join("libchanging.so");

    overwrite(&a_so, &path);
    let a = hotpatch::load(&path).unwrap();
    // Rebuilt while A is applied: A keeps running its own code...
    overwrite(&b_so, &path);
    assert_eq!(observed(), (1005, 10));
    // ...and the new file is another patch, stacked over A.
    let b = hotpatch::load(&path).unwrap();
    assert_eq!(observed(), (2005, 10));
    // Gone from disk: both keep running.
    std::fs::remove_file(&path).unwrap();
    assert_eq!(observed(), (2005, 10));
    b.revert().unwrap();
    assert_eq!(observed(), (1005, 10));
    a.revert().unwrap();
    assert_eq!(observed(), (5, 1));
}

#[test]
fn a_thousand_cycles_map_one_copy() {
    let _serial = support::serial();
    // Only this test loads this fixture, so its private copy carries this
    // file name: `/memfd:hotpatch:<file name> (deleted)`.
    let so = support::patch("fixture-patch-basic");
    let name = so.file_name().unwrap().to_str().unwrap();
    let copies = || support::mapped_files(&format!("/memfd:hotpatch:{name}"));
    let all_copies = || support::mapped_files("/memfd:hotpatch:");

    let cycle = |path: &Path| {
        let patch = hotpatch::load(path).unwrap();
        assert_eq!(svc::answer(), 2);
        patch.revert().unwrap();
        assert_eq!(svc::answer(), 1);
    };

    cycle(&so);
    let first = copies();
    assert_eq!(first.len(), 1, "one private copy: {first:?}");
    let all = all_copies();
    let fds = support::open_fds();

    for _ in 1..1000 {
        cycle(&so);
    }
    // The same bytes from other paths are the same patch too.
    for i in 0..20 {
        cycle(&support::copy_to_temp(&so, &format!("copy-{i}.so")));
    }

    assert_eq!(copies(), first, "still the one private copy");
    assert_eq!(all_copies(), all, "no other copy either");
    assert_eq!(support::open_fds(), fds, "no descriptor leaked");
}
