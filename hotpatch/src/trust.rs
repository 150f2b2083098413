//! Which patch files may be loaded: the trust policy, checked before the
//! library is opened (opening runs its initialisers).
//!
//! 1. **Where it lives.** By default, like ssh and sudo with their
//!    configuration: the file must be a regular file owned by this
//!    process's effective user or root, writable by no one else, in
//!    directories (every ancestor, symlinks resolved) owned by this user or
//!    root and writable by no one else. A world-writable ancestor with the
//!    sticky bit (`/tmp`) is accepted: others can neither rename nor
//!    replace what they do not own in it.
//! 2. **Who signed it.** Optionally: with trusted keys configured, the
//!    patch loads only with a valid detached minisign signature by one of
//!    them, looked for at the path as given plus `.minisig` (for a symlink,
//!    next to the link, not its target).
//!
//! Both apply to the bytes read once from one open descriptor; those same
//! bytes are what gets mapped (see `sys`), so the file cannot change
//! between the check and the load.

use std::fmt;
use std::fs::{self, File};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::Error;

/// Largest signature file `load` reads.
const MAX_SIGNATURE: u64 = 64 * 1024;

/// A public key patches may be signed with, in minisign's format.
///
/// Create a key pair and sign with `minisign` (`minisign -G`, `minisign -Sm
/// patch.so`) or with this repository's `hotpatch sign` (`hotpatch-cli`); the
/// signature goes next to the patch as `<file>.minisig`.
///
/// # Examples
///
/// ```
/// let key = hotpatch::TrustedKey::from_minisign(
///     "untrusted comment: minisign public key 0123456789ABCDEF\n\
///      RWQf6LRCGA9i53mlYecO4IzT51TGPpvWucNSCh1CBM0QTaLn73Y7GFO3\n",
/// )?;
/// let loader = hotpatch::Loader::new().trusted_key(key);
/// # Ok::<(), hotpatch::Error>(())
/// ```
#[derive(Clone)]
pub struct TrustedKey {
    key: minisign_verify::PublicKey,
    text: String,
}

impl TrustedKey {
    /// Parses a minisign public key: the two-line `.pub` file, or just its
    /// base64 line.
    ///
    /// # Errors
    ///
    /// [`Error::BadKey`] if it is not a minisign Ed25519 public key.
    pub fn from_minisign(text: &str) -> Result<Self, Error> {
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with("untrusted comment:"))
            .unwrap_or("");
        let key = minisign_verify::PublicKey::from_base64(line).map_err(|e| Error::BadKey {
            reason: e.to_string(),
        })?;
        Ok(TrustedKey {
            key,
            text: line.to_owned(),
        })
    }

    /// Reads a minisign public key file.
    ///
    /// # Errors
    ///
    /// [`Error::Read`] if the file cannot be read, [`Error::BadKey`] if it
    /// does not hold a key.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref();
        let text = fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_minisign(&text)
    }
}

impl fmt::Debug for TrustedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("TrustedKey").field(&self.text).finish()
    }
}

/// The trust policy of a [`Loader`](crate::Loader).
#[derive(Clone, Debug)]
pub(crate) struct Policy {
    pub allow_insecure_permissions: bool,
    pub keys: Vec<TrustedKey>,
    /// The largest file read, in bytes.
    pub max_file: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            allow_insecure_permissions: false,
            keys: Vec::new(),
            max_file: crate::loader::DEFAULT_MAX_FILE_SIZE,
        }
    }
}

fn untrusted(path: &Path, reason: impl Into<String>) -> Error {
    Error::Untrusted {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// Reads `path` under `policy`: the bytes returned passed every check.
pub(crate) fn read(path: &Path, policy: &Policy) -> Result<Vec<u8>, Error> {
    let read_err = |source| Error::Read {
        path: path.to_owned(),
        source,
    };
    failpoint!("load::open", path);
    // O_NONBLOCK: opening a FIFO must not wait for a writer; a regular
    // file ignores the flag. O_NOCTTY: a terminal device is no patch.
    let file = {
        use std::os::unix::fs::OpenOptionsExt;
        fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)
            .map_err(read_err)?
    };
    let meta = file.metadata().map_err(read_err)?;
    if meta.is_dir() {
        return Err(read_err(std::io::Error::new(
            std::io::ErrorKind::IsADirectory,
            "is a directory",
        )));
    }
    if !meta.is_file() {
        return Err(read_err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    let max = policy.max_file;
    if meta.len() > max {
        return Err(read_err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "{} bytes is larger than the {max}-byte limit (Loader::max_file_size)",
                meta.len()
            ),
        )));
    }
    failpoint!("load::trust", path);
    if !policy.allow_insecure_permissions {
        check_owner_and_mode(path, "the file", &meta)?;
        // The directories of the file actually opened (resolved from the
        // descriptor, so a swap of the path after the open changes
        // nothing), and those of the path as given: a symlink in an
        // unsafe directory could be re-pointed at another file we own.
        let opened = fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .or_else(|_| fs::canonicalize(path))
            .map_err(read_err)?;
        let given = std::path::absolute(path).map_err(read_err)?;
        for dir in opened.ancestors().skip(1).chain(given.ancestors().skip(1)) {
            let m = fs::metadata(dir).map_err(read_err)?;
            check_directory(path, dir, &m)?;
        }
    }
    // The header before the rest: a file that is no ELF object is not
    // read whole.
    let mut magic = Vec::with_capacity(4);
    let mut file = file;
    (&mut file)
        .take(4)
        .read_to_end(&mut magic)
        .map_err(read_err)?;
    if magic != b"\x7fELF" {
        return Err(Error::NotLoadable {
            path: path.to_owned(),
            reason: format!("not an ELF file (it starts with {magic:02x?})"),
        });
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    bytes.extend_from_slice(&magic);
    (&mut file)
        .take(max + 1 - magic.len() as u64)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > max {
        return Err(read_err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the file grew past the size limit while being read",
        )));
    }
    if !policy.keys.is_empty() {
        check_signature(path, &bytes, &policy.keys)?;
    }
    Ok(bytes)
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

fn check_owner_and_mode(path: &Path, what: &str, meta: &fs::Metadata) -> Result<(), Error> {
    let uid = meta.uid();
    if uid != 0 && uid != euid() {
        return Err(untrusted(
            path,
            format!(
                "{what} is owned by uid {uid}, not by this process's user ({}) or root",
                euid()
            ),
        ));
    }
    let mode = meta.mode();
    if mode & 0o022 != 0 {
        return Err(untrusted(
            path,
            format!(
                "{what} is writable by group or others (mode {:o})",
                mode & 0o7777
            ),
        ));
    }
    Ok(())
}

fn check_directory(path: &Path, dir: &Path, meta: &fs::Metadata) -> Result<(), Error> {
    let uid = meta.uid();
    let mode = meta.mode();
    let sticky = mode & 0o1000 != 0;
    if uid != 0 && uid != euid() {
        return Err(untrusted(
            path,
            format!(
                "directory {} is owned by uid {uid}, not by this process's user or root",
                dir.display()
            ),
        ));
    }
    if mode & 0o022 != 0 && !sticky {
        return Err(untrusted(
            path,
            format!(
                "directory {} is writable by group or others (mode {:o})",
                dir.display(),
                mode & 0o7777
            ),
        ));
    }
    Ok(())
}

/// Where the signature of `path` is looked for.
pub(crate) fn signature_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".minisig");
    PathBuf::from(s)
}

fn check_signature(path: &Path, bytes: &[u8], keys: &[TrustedKey]) -> Result<(), Error> {
    let sig_path = signature_path(path);
    let text = match File::open(&sig_path) {
        Ok(f) => {
            let mut text = String::new();
            f.take(MAX_SIGNATURE)
                .read_to_string(&mut text)
                .map_err(|e| Error::BadSignature {
                    path: path.to_owned(),
                    reason: format!("cannot read {}: {e}", sig_path.display()),
                })?;
            text
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::Unsigned {
                path: path.to_owned(),
                signature: sig_path,
            });
        }
        Err(e) => {
            return Err(Error::BadSignature {
                path: path.to_owned(),
                reason: format!("cannot read {}: {e}", sig_path.display()),
            });
        }
    };
    let signature = minisign_verify::Signature::decode(&text).map_err(|e| Error::BadSignature {
        path: path.to_owned(),
        reason: format!("{} is not a minisign signature: {e}", sig_path.display()),
    })?;
    // The reason given is the one from the key that made the signature
    // (its key id matches) if any is trusted: "made by another key" from
    // the other keys would hide it.
    let mut reason = None;
    for key in keys {
        // Prehashed (BLAKE2b) signatures only: minisign's default since
        // 0.10 (`-H` from 0.6 on); the legacy mode signs the raw bytes.
        match key.key.verify(bytes, &signature, false) {
            Ok(()) => return Ok(()),
            Err(minisign_verify::Error::UnexpectedKeyId) if reason.is_some() => {}
            // Only raised once the key id matched.
            Err(minisign_verify::Error::UnexpectedAlgorithm) => {
                reason = Some(format!(
                    "{} is a legacy (not prehashed) minisign signature, which is not \
                     accepted: sign with minisign 0.10 or later (`-H` before), or `hotpatch sign`",
                    sig_path.display()
                ))
            }
            Err(e) => {
                reason = Some(format!(
                    "no trusted key verifies {}: {e}",
                    sig_path.display()
                ))
            }
        }
    }
    Err(Error::BadSignature {
        path: path.to_owned(),
        reason: reason.unwrap_or_else(|| "no trusted key".into()),
    })
}
