//! The trust policy (issue 5): where a patch file may live, who may own
//! it, who must have signed it, and that what was checked is what runs.
//!
//! Every refusal asserts the exact `Error` variant, that the message
//! names the file and the reason, that nothing changed (a full
//! `support::snapshot()`, taken with a good patch applied underneath so
//! that "unchanged" covers a non-trivial table) and that the service
//! still answers.
//!
//! The tests run as root (the CI machine's user); the few that need root
//! (to change a file's owner, to run a child as another user, to pause a
//! load with fanotify) fail when they cannot, unless `HOTPATCH_ALLOW_SKIP=1`
//! is set (`support::skip`). That the file cannot change between the
//! checks and the load is also proven without root, by a failpoint
//! (`file_overwritten_right_after_the_read_loads_the_bytes_read`).

mod support;

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use hotpatch::{Error, Loader, TrustedKey};

use support::chain;

/// `loader` refuses `so` (see `support::refused_by`: a good patch
/// underneath, nothing changes, the service keeps serving) and the
/// message chain says `reason`.
fn refused(loader: &Loader, so: &Path, reason: &str) -> Error {
    let err = support::refused_by(loader, so);
    let message = chain(&err);
    assert!(
        message.contains(reason),
        "the message says why ({reason:?}): {message}"
    );
    err
}

/// A good patch: replaces `answer` (1 -> 2), `Cart::total`, ...
const GOOD: &str = "fixture-patch-basic";
/// A patch whose library initialiser leaves a marker file.
const INIT_MARKER: &str = "fixture-patch-init-marker";
/// A uid that owns nothing here (`nobody`).
const NOBODY: u32 = 65534;

// ---- Helpers

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Whether this process is root; if not, `test` is skipped or fails (see
/// `support::skip`).
fn is_root(test: &str) -> bool {
    if euid() == 0 {
        return true;
    }
    support::skip(test, "needs to run as root");
    false
}

fn chmod(path: &Path, mode: u32) {
    support::set_mode(path, mode);
}

/// A fresh directory `name` with `mode` under this process's test
/// directory, which is made 0755 (whatever the umask) so that only the
/// directories a test makes unsafe are.
fn dir(name: &str, mode: u32) -> PathBuf {
    let base = support::temp_dir();
    chmod(&base, 0o755);
    let dir = base.join(name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    chmod(&dir, mode);
    dir
}

/// `bytes` written to `dir/name` with `mode`.
fn put(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> PathBuf {
    let path = dir.join(name);
    let _ = fs::remove_file(&path);
    fs::write(&path, bytes).unwrap();
    chmod(&path, mode);
    path
}

fn bytes(package: &str) -> Vec<u8> {
    fs::read(support::patch(package)).unwrap()
}

/// `package`'s library with `case` appended (after everything the loader
/// reads): bytes no other test loads. The loader reuses a library already
/// opened from identical bytes, so a test that must see its file opened
/// (not an earlier test's) uses these.
fn unique_bytes(package: &str, case: &str) -> Vec<u8> {
    let mut elf = bytes(package);
    elf.extend_from_slice(format!("\0trust-test:{case}\0").as_bytes());
    elf
}

/// `loader` loads `so`, after which `svc::answer()` returns `answer` and
/// the patch is listed as applied from `so`; then reverts it, leaving
/// everything as it was.
fn loads(loader: &Loader, so: &Path, answer: u64) {
    let before = support::snapshot();
    let patch = loader
        .load(so)
        .unwrap_or_else(|e| panic!("{} must load: {}", so.display(), chain(&e)));
    assert_eq!(svc::answer(), answer);
    assert_eq!(hotpatch::applied().len(), 1);
    assert_eq!(hotpatch::applied()[0].file, so);
    patch.revert().unwrap();
    assert_eq!(support::snapshot(), before);
}

// ---- Keys and signatures

/// A fresh unencrypted key pair, made as `hotpatch keygen` makes it.
struct Keys {
    pair: hotpatch_sign::KeyPair,
    secret: minisign::SecretKey,
}

impl Keys {
    fn new() -> Keys {
        let pair = hotpatch_sign::generate(None).unwrap();
        let secret = hotpatch_sign::secret_key(&pair.secret, None).unwrap();
        Keys { pair, secret }
    }

    fn trusted(&self) -> TrustedKey {
        TrustedKey::from_minisign(&self.pair.public).unwrap()
    }

    fn loader(&self) -> Loader {
        Loader::new().trusted_key(self.trusted())
    }

    /// Signs `file` as `hotpatch sign` does: `<file>.minisig`.
    fn sign(&self, file: &Path) -> PathBuf {
        hotpatch_sign::sign_file(&self.secret, file, None).unwrap()
    }

    /// The 64-byte Ed25519 secret key inside the minisign secret key
    /// (after algorithm, KDF and checksum ids, salt, limits and key id).
    fn ed25519(&self) -> ed25519_compact::SecretKey {
        let raw = self.secret.to_bytes();
        ed25519_compact::SecretKey::from_slice(&raw[62..126]).unwrap()
    }

    fn key_id(&self) -> Vec<u8> {
        self.secret.to_bytes()[54..62].to_vec()
    }
}

fn sig_path(file: &Path) -> PathBuf {
    hotpatch_sign::signature_path(file)
}

/// The file range of ELF section `name` (ELF64, little-endian).
fn section(elf: &[u8], name: &str) -> std::ops::Range<usize> {
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap()) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap()) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap()) as usize;
    let (shoff, shentsize, shnum, shstrndx) =
        (u64_at(0x28), u16_at(0x3a), u16_at(0x3c), u16_at(0x3e));
    let header = |i: usize| shoff + i * shentsize;
    let names = u64_at(header(shstrndx) + 0x18);
    (0..shnum)
        .map(header)
        .find(|&h| {
            let start = names + u32_at(h);
            let end = start + elf[start..].iter().position(|&b| b == 0).unwrap();
            &elf[start..end] == name.as_bytes()
        })
        .map(|h| u64_at(h + 0x18)..u64_at(h + 0x18) + u64_at(h + 0x20))
        .unwrap_or_else(|| panic!("no section {name}"))
}

// ---- Where the file lives: owner and permissions

#[test]
fn good_patch_in_a_private_directory_loads() {
    let _serial = support::serial();
    let d = dir("private", 0o755);
    let so = put(&d, "fix.so", &bytes(GOOD), 0o644);
    loads(&Loader::new(), &so, 2);
}

#[test]
fn group_writable_file_is_untrusted() {
    let _serial = support::serial();
    let d = dir("group-writable-file", 0o755);
    let so = put(&d, "fix.so", &bytes(GOOD), 0o664);
    let err = refused(
        &Loader::new(),
        &so,
        "the file is writable by group or others (mode 664)",
    );
    assert!(
        matches!(&err, Error::Untrusted { path, .. } if path == &so),
        "{err:?}"
    );
}

#[test]
fn world_writable_file_is_untrusted() {
    let _serial = support::serial();
    let d = dir("world-writable-file", 0o755);
    let so = put(&d, "fix.so", &bytes(GOOD), 0o646);
    let err = refused(
        &Loader::new(),
        &so,
        "the file is writable by group or others (mode 646)",
    );
    assert!(
        matches!(&err, Error::Untrusted { path, .. } if path == &so),
        "{err:?}"
    );
}

#[test]
fn group_writable_directory_is_untrusted() {
    let _serial = support::serial();
    let d = dir("group-writable-dir", 0o775);
    let so = put(&d, "fix.so", &bytes(GOOD), 0o644);
    let err = refused(
        &Loader::new(),
        &so,
        &format!(
            "directory {} is writable by group or others (mode 775)",
            d.display()
        ),
    );
    assert!(
        matches!(&err, Error::Untrusted { path, .. } if path == &so),
        "{err:?}"
    );
}

#[test]
fn world_writable_directory_without_sticky_bit_is_untrusted() {
    let _serial = support::serial();
    let d = dir("world-writable-dir", 0o777);
    let so = put(&d, "fix.so", &bytes(GOOD), 0o644);
    let err = refused(
        &Loader::new(),
        &so,
        &format!(
            "directory {} is writable by group or others (mode 777)",
            d.display()
        ),
    );
    assert!(
        matches!(&err, Error::Untrusted { path, .. } if path == &so),
        "{err:?}"
    );
}

/// Every ancestor is checked, not only the parent.
#[test]
fn unsafe_ancestor_directory_is_untrusted() {
    let _serial = support::serial();
    let top = dir("unsafe-ancestor", 0o777);
    let inner = top.join("patches");
    fs::create_dir(&inner).unwrap();
    chmod(&inner, 0o755);
    let so = put(&inner, "fix.so", &bytes(GOOD), 0o644);
    let err = refused(
        &Loader::new(),
        &so,
        &format!("directory {} is writable by group or others", top.display()),
    );
    assert!(
        matches!(&err, Error::Untrusted { path, .. } if path == &so),
        "{err:?}"
    );
}

/// Like /tmp: others may create files there but not replace or rename
/// ours, so it is accepted.
#[test]
fn sticky_world_writable_directory_is_accepted() {
    let _serial = support::serial();
    let d = dir("sticky", 0o1777);
    let so = put(&d, "fix.so", &bytes(GOOD), 0o644);
    loads(&Loader::new(), &so, 2);
}

#[test]
fn allow_insecure_permissions_loads_the_same_file() {
    let _serial = support::serial();
    let d = dir("insecure-allowed", 0o777);
    let so = put(&d, "fix.so", &bytes(GOOD), 0o666);
    let err = refused(&Loader::new(), &so, "writable by group or others");
    assert!(matches!(&err, Error::Untrusted { .. }), "{err:?}");
    loads(&Loader::new().allow_insecure_permissions(), &so, 2);
}

/// The policy resolves symlinks: what is checked is where the file is.
#[test]
fn symlink_to_a_file_in_a_safe_directory_loads() {
    let _serial = support::serial();
    let target_dir = dir("symlink-safe-target", 0o755);
    let target = put(&target_dir, "fix-v1.so", &bytes(GOOD), 0o644);
    let links = dir("symlink-safe-links", 0o755);
    let link = links.join("current.so");
    symlink(&target, &link).unwrap();
    loads(&Loader::new(), &link, 2);
}

#[test]
fn symlink_into_an_unsafe_directory_is_untrusted() {
    let _serial = support::serial();
    let target_dir = dir("symlink-unsafe-target", 0o777);
    let target = put(&target_dir, "fix-v1.so", &bytes(GOOD), 0o644);
    let links = dir("symlink-unsafe-links", 0o755);
    let link = links.join("current.so");
    symlink(&target, &link).unwrap();
    // The link's own directory is safe; the target's is not, and is named.
    let err = refused(
        &Loader::new(),
        &link,
        &format!(
            "directory {} is writable by group or others (mode 777)",
            target_dir.display()
        ),
    );
    assert!(
        matches!(&err, Error::Untrusted { path, .. } if path == &link),
        "{err:?}"
    );
}

/// A symlink in a directory others can write could be re-pointed at any
/// other file this user or root owns (an older signed patch, say): the
/// link's own directory is checked too.
#[test]
fn symlink_in_an_unsafe_directory_is_untrusted() {
    let _serial = support::serial();
    let target_dir = dir("symlink-safe-target", 0o755);
    let target = put(&target_dir, "fix-v1.so", &bytes(GOOD), 0o644);
    let links = dir("symlink-unsafe-links", 0o777);
    let link = links.join("current.so");
    let _ = std::fs::remove_file(&link);
    symlink(&target, &link).unwrap();
    let err = refused(
        &Loader::new(),
        &link,
        &format!(
            "directory {} is writable by group or others (mode 777)",
            links.display()
        ),
    );
    assert!(
        matches!(&err, Error::Untrusted { path, .. } if path == &link),
        "{err:?}"
    );
}

#[test]
fn file_owned_by_another_user_is_untrusted() {
    let _serial = support::serial();
    if !is_root("file_owned_by_another_user_is_untrusted") {
        return;
    }
    let d = dir("owned-by-nobody", 0o755);
    let so = put(&d, "fix.so", &bytes(GOOD), 0o644);
    std::os::unix::fs::chown(&so, Some(NOBODY), Some(NOBODY)).unwrap();
    let err = refused(
        &Loader::new(),
        &so,
        &format!("the file is owned by uid {NOBODY}, not by this process's user (0) or root"),
    );
    assert!(
        matches!(&err, Error::Untrusted { path, .. } if path == &so),
        "{err:?}"
    );
}

#[test]
fn directory_owned_by_another_user_is_untrusted() {
    let _serial = support::serial();
    if !is_root("directory_owned_by_another_user_is_untrusted") {
        return;
    }
    let d = dir("dir-owned-by-nobody", 0o755);
    let so = put(&d, "fix.so", &bytes(GOOD), 0o644);
    std::os::unix::fs::chown(&d, Some(NOBODY), Some(NOBODY)).unwrap();
    let err = refused(
        &Loader::new(),
        &so,
        &format!("directory {} is owned by uid {NOBODY}", d.display()),
    );
    assert!(
        matches!(&err, Error::Untrusted { path, .. } if path == &so),
        "{err:?}"
    );
}

/// Whether `dir` and every directory above it let user `uid` in and
/// pass the trust policy for it: owned by root or `uid`, and not writable
/// by group or others unless sticky.
fn reachable_and_trusted_by(dir: &Path, uid: u32) -> bool {
    use std::os::unix::fs::MetadataExt;
    dir.ancestors().all(|d| {
        fs::metadata(d).is_ok_and(|m| {
            let mode = m.mode();
            (m.uid() == 0 || m.uid() == uid)
                && mode & 0o001 != 0
                && (mode & 0o022 == 0 || mode & 0o1000 != 0)
        })
    })
}

/// A directory of this process's own that user `uid` can reach, wherever
/// the checkout is and whatever `TMPDIR` is (a 0700 home or `mktemp -d`
/// directory lets nobody else in): in the first of the temporary
/// directory, `/tmp`, `/var/tmp` and `/dev/shm` that `uid` can reach.
/// Removed when dropped.
struct DirFor {
    path: PathBuf,
}

impl DirFor {
    fn new(uid: u32, name: &str) -> DirFor {
        let candidates = [
            std::env::temp_dir(),
            "/tmp".into(),
            "/var/tmp".into(),
            "/dev/shm".into(),
        ];
        let base = candidates
            .iter()
            .find(|c| reachable_and_trusted_by(c, uid))
            .unwrap_or_else(|| panic!("none of {candidates:?} is reachable by uid {uid}"));
        let path = base.join(format!("hotpatch-trust-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir(&path).unwrap();
        chmod(&path, 0o755);
        DirFor { path }
    }
}

impl Drop for DirFor {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Runs the calling test `name` again in a child process as user `uid`
/// (the parent runs as root; if not, see `is_root`). The parent makes a
/// directory that user can reach (`DirFor`), copies the test binary into
/// it, and calls `setup` to put the file the child needs there; the
/// child, run with `HOTPATCH_TRUST_CHILD_FILE` set to that file, runs
/// `child(file)`. The parent fails unless the child passed.
fn in_child_as(
    name: &str,
    uid: u32,
    setup: impl FnOnce(&Path) -> PathBuf,
    child: impl FnOnce(&Path),
) {
    const VAR: &str = "HOTPATCH_TRUST_CHILD_FILE";
    if let Some(file) = std::env::var_os(VAR) {
        child(Path::new(&file));
        return;
    }
    if !is_root(name) {
        return;
    }
    let dir = DirFor::new(uid, name);
    let file = setup(&dir.path);
    let exe = dir.path.join("trust-test");
    fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    chmod(&exe, 0o755);
    use std::os::unix::process::CommandExt;
    let out = Command::new(&exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .current_dir(&dir.path)
        .env(VAR, &file)
        .uid(uid)
        .gid(uid)
        .output()
        .unwrap_or_else(|e| panic!("run {} as uid {uid}: {e}", exe.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "test {name} as uid {uid}: {}\n--- stdout\n{stdout}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Root-owned files are trusted by every user (as for ssh): a service
/// running as `nobody` loads a patch installed by root.
#[test]
fn root_owned_file_is_trusted_by_a_non_root_process() {
    in_child_as(
        "root_owned_file_is_trusted_by_a_non_root_process",
        NOBODY,
        |d| put(d, "fix.so", &bytes(GOOD), 0o644),
        |so| {
            let _serial = support::serial();
            assert_eq!(euid(), NOBODY);
            assert_eq!(
                std::os::unix::fs::MetadataExt::uid(&fs::metadata(so).unwrap()),
                0
            );
            loads(&Loader::new(), so, 2);
        },
    );
}

/// A non-root service trusts its own user's files, in root's directories.
#[test]
fn file_owned_by_the_process_user_is_trusted() {
    in_child_as(
        "file_owned_by_the_process_user_is_trusted",
        NOBODY,
        |d| {
            let so = put(d, "fix.so", &bytes(GOOD), 0o644);
            std::os::unix::fs::chown(&so, Some(NOBODY), Some(NOBODY)).unwrap();
            so
        },
        |so| {
            let _serial = support::serial();
            assert_eq!(euid(), NOBODY);
            assert_eq!(
                std::os::unix::fs::MetadataExt::uid(&fs::metadata(so).unwrap()),
                NOBODY
            );
            loads(&Loader::new(), so, 2);
        },
    );
}

// ---- Who signed it

#[test]
fn signed_patch_loads_with_its_key() {
    let _serial = support::serial();
    let keys = Keys::new();
    let d = dir("signed", 0o755);
    let so = put(&d, "fix.so", &bytes(GOOD), 0o644);
    let sig = keys.sign(&so);
    assert_eq!(sig, d.join("fix.so.minisig"));
    let text = fs::read_to_string(&sig).unwrap();
    assert!(text.contains("\tfile:fix.so\thashed"), "{text}");
    loads(&keys.loader(), &so, 2);
}

#[test]
fn signature_by_another_key_is_bad_signature() {
    let _serial = support::serial();
    let (trusted, other) = (Keys::new(), Keys::new());
    let d = dir("wrong-key", 0o755);
    let so = put(&d, "fix.so", &bytes(GOOD), 0o644);
    other.sign(&so);
    let err = refused(
        &trusted.loader(),
        &so,
        "created with a different key than the one provided",
    );
    assert!(
        matches!(&err, Error::BadSignature { path, .. } if path == &so),
        "{err:?}"
    );
}

/// A byte of the `.comment` section, which the dynamic loader never maps:
/// the changed file still loads without keys, so only the signature can
/// tell.
#[test]
fn flipped_byte_after_signing_is_bad_signature() {
    let _serial = support::serial();
    let keys = Keys::new();
    let d = dir("flipped", 0o755);
    let mut elf = bytes(GOOD);
    let so = put(&d, "fix.so", &elf, 0o644);
    keys.sign(&so);
    let comment = section(&elf, ".comment");
    assert!(!comment.is_empty(), "the patch has a .comment section");
    let at = comment.start;
    elf[at] ^= 0x20; // e.g. "GCC: ..." becomes "gCC: ..."
    fs::write(&so, &elf).unwrap();

    let err = refused(&keys.loader(), &so, "signature verification failed");
    assert!(
        matches!(&err, Error::BadSignature { path, .. } if path == &so),
        "{err:?}"
    );
    loads(&Loader::new(), &so, 2);
}

#[test]
fn missing_signature_is_unsigned() {
    let _serial = support::serial();
    let keys = Keys::new();
    let d = dir("unsigned", 0o755);
    let so = put(&d, "fix.so", &bytes(GOOD), 0o644);
    let expected = d.join("fix.so.minisig");
    let err = refused(
        &keys.loader(),
        &so,
        &format!("no signature at {}", expected.display()),
    );
    assert!(
        matches!(&err, Error::Unsigned { path, signature } if path == &so && signature == &expected),
        "{err:?}"
    );
}

#[test]
fn garbage_signature_is_bad_signature() {
    let _serial = support::serial();
    let keys = Keys::new();
    let d = dir("garbage-signature", 0o755);
    let so = put(&d, "fix.so", &bytes(GOOD), 0o644);
    put(
        &d,
        "fix.so.minisig",
        b"untrusted comment: not really\nSGVsbG8sIHdvcmxkIQ==\n",
        0o644,
    );
    let err = refused(
        &keys.loader(),
        &so,
        &format!("{} is not a minisign signature", sig_path(&so).display()),
    );
    assert!(
        matches!(&err, Error::BadSignature { path, .. } if path == &so),
        "{err:?}"
    );
}

#[test]
fn binary_garbage_signature_is_bad_signature() {
    let _serial = support::serial();
    let keys = Keys::new();
    let d = dir("binary-signature", 0o755);
    let so = put(&d, "fix.so", &bytes(GOOD), 0o644);
    put(&d, "fix.so.minisig", &[0xff, 0xfe, 0, 1, 2, 0x80], 0o644);
    let err = refused(
        &keys.loader(),
        &so,
        &format!("cannot read {}", sig_path(&so).display()),
    );
    assert!(
        matches!(&err, Error::BadSignature { path, .. } if path == &so),
        "{err:?}"
    );
}

/// A valid signature in minisign's legacy mode (algorithm "Ed": Ed25519
/// over the raw file instead of its BLAKE2b hash) is refused, though it
/// verifies when legacy signatures are allowed. The runtime takes
/// prehashed signatures only: minisign's default since 0.10, one hash to
/// check whatever the file's size, and one format to reason about; there
/// is no reason for a patch signed today to use the old mode.
#[test]
fn legacy_signature_is_bad_signature() {
    use ct_codecs::{Base64, Encoder};
    let _serial = support::serial();
    let keys = Keys::new();
    let d = dir("legacy", 0o755);
    let elf = bytes(GOOD);
    let so = put(&d, "fix.so", &elf, 0o644);

    let sk = keys.ed25519();
    let signature = sk.sign(&elf, None);
    let trusted_comment = "timestamp:0\tfile:fix.so";
    let mut global = signature.as_ref().to_vec();
    global.extend_from_slice(trusted_comment.as_bytes());
    let global = sk.sign(&global, None);
    let mut line = b"Ed".to_vec();
    line.extend_from_slice(&keys.key_id());
    line.extend_from_slice(signature.as_ref());
    let text = format!(
        "untrusted comment: legacy signature\n{}\ntrusted comment: {trusted_comment}\n{}\n",
        Base64::encode_to_string(&line).unwrap(),
        Base64::encode_to_string(global.as_ref()).unwrap()
    );
    fs::write(sig_path(&so), &text).unwrap();

    // It is a good legacy signature, for both minisign libraries.
    let public = minisign_verify::PublicKey::decode(&keys.pair.public).unwrap();
    let decoded = minisign_verify::Signature::decode(&text).unwrap();
    public.verify(&elf, &decoded, true).unwrap();
    let boxed = minisign::SignatureBox::from_string(&text).unwrap();
    assert!(!boxed.is_prehashed());
    let pk = minisign::PublicKey::from_base64(keys.pair.public.lines().nth(1).unwrap()).unwrap();
    minisign::verify(&pk, &boxed, std::io::Cursor::new(&elf), true, false, true).unwrap();

    let err = refused(
        &keys.loader(),
        &so,
        "is a legacy (not prehashed) minisign signature, which is not accepted",
    );
    assert!(
        matches!(&err, Error::BadSignature { path, .. } if path == &so),
        "{err:?}"
    );
}

#[test]
fn second_of_two_trusted_keys_verifies() {
    let _serial = support::serial();
    let (first, second) = (Keys::new(), Keys::new());
    let d = dir("two-keys", 0o755);
    let so = put(&d, "fix.so", &bytes(GOOD), 0o644);
    second.sign(&so);
    let loader = Loader::new()
        .trusted_key(first.trusted())
        .trusted_key(second.trusted());
    loads(&loader, &so, 2);
}

/// With several keys, the reason is the signing key's ("verification
/// failed"), not another trusted key's "made by a different key".
#[test]
fn with_two_keys_the_reason_is_the_signing_keys() {
    let _serial = support::serial();
    let (first, second) = (Keys::new(), Keys::new());
    let d = dir("two-keys-tampered", 0o755);
    let mut elf = bytes(GOOD);
    let so = put(&d, "fix.so", &elf, 0o644);
    first.sign(&so);
    let at = section(&elf, ".comment").start;
    elf[at] ^= 0x20;
    fs::write(&so, &elf).unwrap();
    let loader = Loader::new()
        .trusted_key(first.trusted())
        .trusted_key(second.trusted());
    let err = refused(&loader, &so, "signature verification failed");
    assert!(
        matches!(&err, Error::BadSignature { path, .. } if path == &so),
        "{err:?}"
    );
}

/// Signatures come on top of the ownership and permission checks.
#[test]
fn a_signature_does_not_waive_the_permission_checks() {
    let _serial = support::serial();
    let keys = Keys::new();
    let d = dir("signed-but-unsafe", 0o777);
    let so = put(&d, "fix.so", &bytes(GOOD), 0o644);
    keys.sign(&so);
    let err = refused(&keys.loader(), &so, "writable by group or others");
    assert!(
        matches!(&err, Error::Untrusted { path, .. } if path == &so),
        "{err:?}"
    );
    loads(&keys.loader().allow_insecure_permissions(), &so, 2);
}

#[test]
fn from_minisign_refuses_what_is_not_a_public_key() {
    let _serial = support::serial();
    let before = support::snapshot();
    let keys = Keys::new();
    let d = dir("not-keys", 0o755);
    let so = put(&d, "fix.so", &bytes(GOOD), 0o644);
    let signature = fs::read_to_string(keys.sign(&so)).unwrap();
    // "Xx" instead of "Ed" as the algorithm of an otherwise good key.
    let mut other_alg = keys.pair.public.lines().nth(1).unwrap().to_owned();
    other_alg.replace_range(0..2, "WH");
    let cases = [
        ("empty", String::new()),
        ("text", "not a key at all".to_owned()),
        (
            "comment only",
            "untrusted comment: minisign public key\n".into(),
        ),
        ("a secret key", keys.pair.secret.clone()),
        ("a signature", signature),
        (
            "truncated",
            keys.pair.public[..keys.pair.public.len() - 5].into(),
        ),
        ("another algorithm", other_alg),
    ];
    for (what, text) in cases {
        let err = TrustedKey::from_minisign(&text).expect_err(what);
        assert!(
            matches!(&err, Error::BadKey { reason } if !reason.is_empty()),
            "{what}: {err:?}"
        );
        assert!(
            err.to_string().starts_with("not a minisign public key: "),
            "{what}: {err}"
        );
    }
    assert_eq!(support::snapshot(), before);
    assert_eq!(svc::answer(), 1);
}

#[test]
fn from_file_reads_a_public_key_made_by_the_tool() {
    let _serial = support::serial();
    let keys = Keys::new();
    let d = dir("key-files", 0o755);
    let (public, secret) = (d.join("patches.pub"), d.join("patches.key"));
    hotpatch_sign::write_key_pair(&keys.pair, &public, &secret, false).unwrap();
    let so = put(&d, "fix.so", &bytes(GOOD), 0o644);
    keys.sign(&so);

    let key = TrustedKey::from_file(&public).unwrap();
    loads(&Loader::new().trusted_key(key), &so, 2);

    // The operator's likely mistakes: the secret key, a missing file.
    let err = TrustedKey::from_file(&secret).unwrap_err();
    assert!(matches!(&err, Error::BadKey { .. }), "{err:?}");
    let missing = d.join("missing.pub");
    let err = TrustedKey::from_file(&missing).unwrap_err();
    assert!(
        matches!(&err, Error::Read { path, source } if path == &missing
            && source.kind() == std::io::ErrorKind::NotFound),
        "{err:?}"
    );
}

// ---- What was checked is what runs

/// After a signed patch loaded, the file is overwritten with another
/// (unsigned) patch; the old signature stays. Loading again is refused:
/// the signature binds the bytes, not the name.
#[test]
fn replacing_a_signed_file_after_it_loaded_is_refused() {
    let _serial = support::serial();
    let keys = Keys::new();
    let d = dir("replaced-after-load", 0o755);
    let so = put(&d, "fix.so", &bytes(GOOD), 0o644);
    keys.sign(&so);
    loads(&keys.loader(), &so, 2);

    fs::write(&so, bytes(support::UNDERNEATH)).unwrap();
    let err = refused(&keys.loader(), &so, "signature verification failed");
    assert!(
        matches!(&err, Error::BadSignature { path, .. } if path == &so),
        "{err:?}"
    );
    // And by rename, as a deploy script would.
    let staged = put(&d, "staged.so", &bytes("fixture-patch-stack-b"), 0o644);
    fs::rename(&staged, &so).unwrap();
    let err = refused(&keys.loader(), &so, "signature verification failed");
    assert!(matches!(&err, Error::BadSignature { .. }), "{err:?}");
}

/// The running code is the bytes read, not the file: overwriting the file
/// in place (same inode) after the load changes nothing that runs. Had
/// the loader mapped the file itself, the new bytes would show through
/// its pages, or truncating it would kill the process with SIGBUS; so
/// this runs in a child process.
#[test]
fn overwriting_the_file_in_place_after_loading_changes_nothing() {
    support::isolated(
        "overwriting_the_file_in_place_after_loading_changes_nothing",
        || {
            let _serial = support::serial();
            let keys = Keys::new();
            let d = dir("overwritten-in-place", 0o755);
            let so = put(&d, "fix.so", &unique_bytes(GOOD, "in-place"), 0o644);
            keys.sign(&so);
            let patch = keys.loader().load(&so).unwrap();
            assert_eq!(svc::answer(), 2);
            let applied = support::snapshot();

            let other = bytes(support::UNDERNEATH);
            fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(&so)
                .and_then(|mut f| std::io::Write::write_all(&mut f, &other))
                .unwrap();
            assert_eq!(fs::read(&so).unwrap(), other);

            assert_eq!(support::snapshot(), applied);
            assert_eq!(svc::answer(), 2);
            assert!(
                support::mapped_files(&d.display().to_string()).is_empty(),
                "nothing is mapped from the patch's directory"
            );
            patch.revert().unwrap();
        },
    );
}

/// Calls `on_open` whenever the file `watched` is opened, while the
/// opener waits (a fanotify permission event), then lets it open it.
/// `None` where fanotify permission events are not available (they need
/// CAP_SYS_ADMIN).
struct OpenHook {
    fd: i32,
    stop: Arc<AtomicBool>,
    opens: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl OpenHook {
    /// `None` (after `support::skip`) where fanotify permission events are
    /// not available to `test`.
    fn new(
        test: &str,
        watched: &Path,
        mut on_open: impl FnMut() + Send + 'static,
    ) -> Option<OpenHook> {
        use std::os::unix::ffi::OsStrExt;
        // SAFETY: plain syscall with valid flags.
        let fd = unsafe {
            libc::fanotify_init(
                libc::FAN_CLASS_CONTENT | libc::FAN_CLOEXEC,
                libc::O_RDONLY as u32,
            )
        };
        if fd < 0 {
            let error = std::io::Error::last_os_error();
            support::skip(test, &format!("fanotify unavailable: {error}"));
            return None;
        }
        let path = std::ffi::CString::new(watched.as_os_str().as_bytes()).unwrap();
        // SAFETY: `fd` is our fanotify descriptor, `path` a valid C string.
        let marked = unsafe {
            libc::fanotify_mark(
                fd,
                libc::FAN_MARK_ADD,
                libc::FAN_OPEN_PERM,
                libc::AT_FDCWD,
                path.as_ptr(),
            )
        };
        if marked < 0 {
            let error = std::io::Error::last_os_error();
            // SAFETY: we own `fd`.
            unsafe { libc::close(fd) };
            support::skip(
                test,
                &format!("fanotify permission events unavailable: {error}"),
            );
            return None;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let opens = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (stop, opens) = (stop.clone(), opens.clone());
            std::thread::spawn(move || {
                const META: usize = std::mem::size_of::<libc::fanotify_event_metadata>();
                let mut buf = [0u8; 4096];
                // Acquire: pairs with the Release store in `finish`.
                while !stop.load(Ordering::Acquire) {
                    let mut pfd = libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd.
                    if unsafe { libc::poll(&mut pfd, 1, 20) } <= 0 {
                        continue;
                    }
                    // SAFETY: reading into a buffer of the given length.
                    let len = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
                    let mut at = 0;
                    while len > 0 && at + META <= len as usize {
                        // SAFETY: the kernel wrote a whole event here.
                        let event: libc::fanotify_event_metadata =
                            unsafe { std::ptr::read_unaligned(buf[at..].as_ptr().cast()) };
                        if event.mask & libc::FAN_OPEN_PERM != 0 {
                            // The opener waits for our answer: give it even
                            // if `on_open` panics (counted as no open).
                            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(
                                &mut on_open,
                            ));
                            if ran.is_ok() {
                                // Relaxed: read after the thread is joined.
                                opens.fetch_add(1, Ordering::Relaxed);
                            }
                            let allow = libc::fanotify_response {
                                fd: event.fd,
                                response: libc::FAN_ALLOW,
                            };
                            // SAFETY: writing one response struct to our fd.
                            unsafe {
                                libc::write(
                                    fd,
                                    (&allow as *const libc::fanotify_response).cast(),
                                    std::mem::size_of_val(&allow),
                                )
                            };
                        }
                        if event.fd >= 0 {
                            // SAFETY: the event's descriptor is ours to close.
                            unsafe { libc::close(event.fd) };
                        }
                        at += event.event_len as usize;
                    }
                }
            })
        };
        Some(OpenHook {
            fd,
            stop,
            opens,
            thread: Some(thread),
        })
    }

    /// Stops watching; how many opens were seen.
    fn finish(mut self) -> usize {
        self.stop();
        self.opens.load(Ordering::Relaxed)
    }

    fn stop(&mut self) {
        if let Some(thread) = self.thread.take() {
            // Release: pairs with the Acquire load in the watching thread.
            self.stop.store(true, Ordering::Release);
            let _ = thread.join();
            // SAFETY: the watching thread is gone; we own `fd`.
            unsafe { libc::close(self.fd) };
        }
    }
}

impl Drop for OpenHook {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `load` opens the patch file once and its signature once, and keeps
/// neither open: everything after is done on the bytes read.
#[test]
fn load_opens_the_file_and_its_signature_once() {
    let _serial = support::serial();
    let keys = Keys::new();
    let d = dir("opened-once", 0o755);
    let so = put(&d, "fix.so", &unique_bytes(GOOD, "opened-once"), 0o644);
    let sig = keys.sign(&so);
    const TEST: &str = "load_opens_the_file_and_its_signature_once";
    let Some(file_hook) = OpenHook::new(TEST, &so, || {}) else {
        return;
    };
    let Some(sig_hook) = OpenHook::new(TEST, &sig, || {}) else {
        return;
    };
    loads(&keys.loader(), &so, 2);
    assert_eq!(file_hook.finish(), 1, "the patch file is opened once");
    assert_eq!(sig_hook.finish(), 1, "the signature is opened once");
}

/// The race the policy must win, forced: `load` is paused as it opens the
/// signature (after it read the patch, before it checks the signature and
/// opens the library) and, meanwhile, the patch file is overwritten with
/// another patch. The signature verifies the bytes read, and those bytes
/// are what runs: `answer` is the signed patch's 2, not the other's 10.
#[test]
fn file_replaced_between_check_and_open_loads_the_checked_bytes() {
    let _serial = support::serial();
    let keys = Keys::new();
    let d = dir("replaced-during-load", 0o755);
    let signed = unique_bytes(GOOD, "replaced-during-load");
    let other = unique_bytes(support::UNDERNEATH, "replaced-during-load");
    let so = put(&d, "fix.so", &signed, 0o644);
    let sig = keys.sign(&so);
    let hook = {
        let (so, other) = (so.clone(), other.clone());
        OpenHook::new(
            "file_replaced_between_check_and_open_loads_the_checked_bytes",
            &sig,
            move || fs::write(&so, &other).unwrap(),
        )
    };
    let Some(hook) = hook else {
        return;
    };
    let before = support::snapshot();
    let patch = keys.loader().load(&so).unwrap();
    assert_eq!(hook.finish(), 1, "the load was paused once");
    assert_eq!(fs::read(&so).unwrap(), other, "the file was replaced");
    assert_eq!(svc::answer(), 2, "what runs is what was signed");
    assert_eq!(svc::add(2, 3), 5, "nothing of the other patch runs");
    assert_eq!(patch.name(), "fixture-patch-basic");
    patch.revert().unwrap();
    assert_eq!(support::snapshot(), before);
}

/// Runs `action` each time `load` passes the failpoint `point`, until
/// dropped (`fail` crate; hotpatch's `failpoints` feature).
struct Callback(&'static str);

impl Callback {
    fn new(point: &'static str, action: impl Fn() + Send + Sync + 'static) -> Callback {
        fail::cfg_callback(point, action).unwrap();
        Callback(point)
    }
}

impl Drop for Callback {
    fn drop(&mut self) {
        fail::remove(self.0);
    }
}

/// The same race as above, on every machine (no root, no fanotify): the
/// failpoint `load::read`, right after `load` has read the file and
/// checked its signature, overwrites the file with another valid patch.
/// What opens and runs is the signed bytes read, not the file's content.
#[test]
fn file_overwritten_right_after_the_read_loads_the_bytes_read() {
    let _serial = support::serial();
    let keys = Keys::new();
    let d = dir("overwritten-after-read", 0o755);
    let signed = unique_bytes(GOOD, "overwritten-after-read");
    let other = unique_bytes(support::UNDERNEATH, "overwritten-after-read");
    let so = put(&d, "fix.so", &signed, 0o644);
    keys.sign(&so);
    let swaps = Arc::new(AtomicUsize::new(0));
    let swap = {
        let (so, other, swaps) = (so.clone(), other.clone(), swaps.clone());
        Callback::new("load::read", move || {
            fs::write(&so, &other).unwrap();
            // Relaxed: read after `load` returned, on the thread that ran it.
            swaps.fetch_add(1, Ordering::Relaxed);
        })
    };
    let before = support::snapshot();
    let patch = keys.loader().load(&so).unwrap();
    drop(swap);
    assert_eq!(
        swaps.load(Ordering::Relaxed),
        1,
        "the file was swapped once"
    );
    assert_eq!(fs::read(&so).unwrap(), other, "the file was replaced");
    assert_eq!(svc::answer(), 2, "what runs is what was signed");
    assert_eq!(svc::add(2, 3), 5, "nothing of the other patch runs");
    assert_eq!(patch.name(), "fixture-patch-basic");
    let patched = support::patched();
    assert_eq!(patched.len(), 5, "{patched:?}");
    assert!(patched.iter().all(|(_, by)| by == GOOD), "{patched:?}");
    patch.revert().unwrap();
    assert_eq!(support::snapshot(), before);
}

// ---- The policy runs before the library is opened

fn init_marker() -> PathBuf {
    std::env::temp_dir().join(format!("hotpatch-init-marker-{}", std::process::id()))
}

/// The init-marker fixture with `case` appended: bytes no other test
/// loads, so if this test's refused file had been opened, its initialiser
/// would have run now (an identical library opened earlier is reused
/// without running it again).
fn init_marker_bytes(case: &str) -> Vec<u8> {
    unique_bytes(INIT_MARKER, case)
}

/// `refuse` makes `loader` refuse the file; its initialiser must not have
/// run. Then `fix` makes it acceptable, and loading it runs the
/// initialiser: the marker would have shown a premature open.
fn initialiser_never_runs(
    case: &str,
    refuse: impl FnOnce(&Path) -> (Loader, String),
    fix: impl FnOnce(&Path) -> Loader,
) -> Error {
    let marker = init_marker();
    let _ = fs::remove_file(&marker);
    let d = dir(case, 0o755);
    let so = put(&d, "fix.so", &init_marker_bytes(case), 0o644);
    let (loader, reason) = refuse(&so);
    let err = refused(&loader, &so, &reason);
    assert!(
        !marker.exists(),
        "the initialiser of a refused patch ran: {}",
        marker.display()
    );

    let loader = fix(&so);
    loads(&loader, &so, 31);
    assert!(
        marker.exists(),
        "the initialiser runs when the patch is accepted"
    );
    fs::remove_file(&marker).unwrap();
    err
}

#[test]
fn initialiser_of_a_patch_with_unsafe_permissions_never_runs() {
    let _serial = support::serial();
    let err = initialiser_never_runs(
        "init-unsafe-permissions",
        |so| {
            chmod(so, 0o666);
            (Loader::new(), "writable by group or others".into())
        },
        |so| {
            chmod(so, 0o644);
            Loader::new()
        },
    );
    assert!(matches!(err, Error::Untrusted { .. }), "{err:?}");
}

#[test]
fn initialiser_of_an_unsigned_patch_never_runs() {
    let _serial = support::serial();
    let keys = Keys::new();
    let err = initialiser_never_runs(
        "init-unsigned",
        |_| (keys.loader(), "no signature at".into()),
        |so| {
            keys.sign(so);
            keys.loader()
        },
    );
    assert!(matches!(err, Error::Unsigned { .. }), "{err:?}");
}

#[test]
fn initialiser_of_a_patch_signed_by_another_key_never_runs() {
    let _serial = support::serial();
    let (keys, other) = (Keys::new(), Keys::new());
    let err = initialiser_never_runs(
        "init-other-key",
        |so| {
            other.sign(so);
            (keys.loader(), "different key".into())
        },
        |so| {
            keys.sign(so);
            keys.loader()
        },
    );
    assert!(matches!(err, Error::BadSignature { .. }), "{err:?}");
}
