//! Signing hotpatch patch files with minisign keys.
//!
//! A process that loads patches with
//! `hotpatch::Loader::new().trusted_key(key)` accepts a patch file only
//! with a valid detached signature next to it, `<file>.minisig`, by one
//! of its trusted keys. This crate makes those keys and signatures; the
//! `hotpatch-sign` command line tool is a thin layer over it.
//!
//! # Format
//!
//! Everything is in [minisign](https://jedisct1.github.io/minisign/)'s
//! format, so the `minisign` command line tool can verify what this one
//! signs (`minisign -Vm patch.so -p patches.pub`), sign with its keys, and
//! make keys this one signs with:
//!
//! - a public key file (`.pub`): an untrusted comment line, then the
//!   base64 of `"Ed"`, an 8-byte key id and the 32-byte Ed25519 key;
//! - a secret key file (`.key`): minisign's secret key box, encrypted with
//!   a password (scrypt) or, for automation, unencrypted;
//! - a signature (`.minisig`): always *prehashed* (algorithm `"ED"`, an
//!   Ed25519 signature of the file's BLAKE2b-512 hash, minisign's default
//!   since 0.10), and a trusted comment, signed too, that names the file
//!   (`timestamp:<unix seconds>\tfile:<name>\thashed`, minisign's own
//!   default form). The hotpatch runtime accepts prehashed signatures
//!   only, so this crate never makes legacy ones.
//!
//! # Examples
//!
//! ```
//! let keys = hotpatch_sign::generate(None)?; // unencrypted, for automation
//! let secret = hotpatch_sign::secret_key(&keys.secret, None)?;
//! let patch = b"\x7fELF...the bytes of a patch";
//! let comment = hotpatch_sign::trusted_comment_for(std::path::Path::new("fix.so"));
//! let signature = hotpatch_sign::sign(&secret, patch, &comment)?;
//! assert_eq!(hotpatch_sign::verify(&keys.public, &signature, patch)?, comment);
//! # Ok::<(), hotpatch_sign::Error>(())
//! ```

use std::fmt;
use std::fs;
use std::io::{self, Cursor, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use ct_codecs::{Base64, Decoder};

/// The environment variable the tool reads a secret key's password from
/// (instead of asking on the terminal).
pub const PASSWORD_ENV: &str = "HOTPATCH_SIGN_PASSWORD";

/// What a patch's signature file is named after: `<file>.minisig`, where
/// the hotpatch runtime looks for it.
pub const SIGNATURE_SUFFIX: &str = ".minisig";

const SIGNATURE_COMMENT: &str = "signature from hotpatch-sign secret key";

/// Why a key could not be made or read, or a file not signed or verified.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A key file exists and overwriting was not asked for.
    #[error("{path} already exists; remove it or pass --force")]
    Exists { path: PathBuf },
    /// The secret key is encrypted and no password was given.
    #[error(
        "the secret key is encrypted and no password was given (set {PASSWORD_ENV}, or run on a terminal)"
    )]
    PasswordNeeded,
    /// The password was typed differently the second time.
    #[error("the passwords do not match")]
    PasswordMismatch,
    /// A trusted comment minisign's tools would not all read back the same.
    #[error("invalid trusted comment {comment:?}: {reason}")]
    BadComment {
        comment: String,
        reason: &'static str,
    },
    /// What minisign said: a malformed key or signature, a wrong password,
    /// a signature that does not verify.
    #[error("{what}: {source}")]
    Minisign {
        what: &'static str,
        #[source]
        source: minisign::PError,
    },
}

fn minisign_err(what: &'static str) -> impl FnOnce(minisign::PError) -> Error {
    move |source| Error::Minisign { what, source }
}

/// A new key pair, as the contents of minisign's `.pub` and `.key` files.
#[derive(Clone)]
pub struct KeyPair {
    /// The public key file: give it to the processes that load patches
    /// (`hotpatch::TrustedKey::from_file`).
    pub public: String,
    /// The secret key file: keep it where patches are signed.
    pub secret: String,
    /// The key id, as minisign prints it (16 hex digits).
    pub key_id: String,
}

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPair")
            .field("public", &self.public)
            .field("secret", &"<redacted>")
            .field("key_id", &self.key_id)
            .finish()
    }
}

/// Makes a key pair. With a `password` the secret key is encrypted with it
/// (scrypt, minisign's parameters); without, it is stored unencrypted,
/// which suits automation that keeps the key in a secret store anyway.
///
/// # Errors
///
/// [`Error::Minisign`] if no randomness or key derivation is available.
pub fn generate(password: Option<&str>) -> Result<KeyPair, Error> {
    let pair = match password {
        None => minisign::KeyPair::generate_unencrypted_keypair(),
        Some(password) => minisign::KeyPair::generate_encrypted_keypair(Some(password.to_owned())),
    }
    .map_err(minisign_err("cannot generate a key pair"))?;
    let key_id = key_id(pair.pk.keynum());
    // The same lines `minisign -G` writes.
    let public = format!(
        "untrusted comment: minisign public key {key_id}\n{}\n",
        pair.pk.to_base64()
    );
    let comment = if password.is_some() {
        "minisign encrypted secret key"
    } else {
        "minisign secret key (unencrypted)"
    };
    let secret = pair
        .sk
        .to_box(Some(comment))
        .map_err(minisign_err("cannot encode the secret key"))?
        .into_string();
    Ok(KeyPair {
        public,
        secret,
        key_id,
    })
}

/// minisign prints key ids as the little-endian u64 of their 8 bytes.
fn key_id(keynum: &[u8]) -> String {
    let mut le = [0u8; 8];
    le.copy_from_slice(&keynum[..8]);
    format!("{:016X}", u64::from_le_bytes(le))
}

/// The first line of `text` that is neither empty nor a comment.
fn key_line(text: &str) -> &str {
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with("untrusted comment:"))
        .unwrap_or("")
}

/// Whether the secret key file `text` is encrypted with a password.
///
/// # Errors
///
/// [`Error::Minisign`] if it is not a minisign secret key.
pub fn is_encrypted(text: &str) -> Result<bool, Error> {
    let not_a_key = |reason: &str| Error::Minisign {
        what: "not a minisign secret key",
        source: minisign::PError::new(minisign::ErrorKind::Encoding, reason.to_owned()),
    };
    let bytes =
        Base64::decode_to_vec(key_line(text), None).map_err(|e| not_a_key(&e.to_string()))?;
    // Signature algorithm (2 bytes), then the key derivation algorithm:
    // "Sc" (scrypt) or zeros (none).
    match bytes.get(2..4) {
        Some([0, 0]) => Ok(false),
        Some(b"Sc") => Ok(true),
        Some(_) => Err(not_a_key("unknown key derivation algorithm")),
        None => Err(not_a_key("too short")),
    }
}

/// Reads the secret key file `text`, decrypting it with `password` if it
/// is encrypted. Never prompts.
///
/// # Errors
///
/// [`Error::PasswordNeeded`] for an encrypted key without a password;
/// [`Error::Minisign`] for a malformed key or a wrong password.
pub fn secret_key(text: &str, password: Option<&str>) -> Result<minisign::SecretKey, Error> {
    let boxed = minisign::SecretKeyBox::from_string(text)
        .map_err(minisign_err("not a minisign secret key"))?;
    if is_encrypted(text)? {
        let password = password.ok_or(Error::PasswordNeeded)?;
        minisign::SecretKey::from_box(boxed, Some(password.to_owned()))
            .map_err(minisign_err("cannot decrypt the secret key"))
    } else {
        let bytes = Base64::decode_to_vec(key_line(text), None).unwrap_or_default();
        // `minisign -G -W` (0.11) writes unencrypted keys with an all-zero
        // checksum, which the minisign crate takes for corruption. Such a
        // key is read as it is: `sign` checks every signature against the
        // key's public half, so a damaged key cannot sign anything.
        if bytes.len() == 158 && bytes[126..].iter().all(|&b| b == 0) {
            return minisign::SecretKey::from_bytes(&bytes)
                .map_err(minisign_err("not a minisign secret key"));
        }
        minisign::SecretKey::from_unencrypted_box(boxed)
            .map_err(minisign_err("not a minisign secret key"))
    }
}

/// Reads a public key: a `.pub` file's contents, or just its base64 line.
///
/// # Errors
///
/// [`Error::Minisign`] if it is not a minisign public key.
pub fn public_key(text: &str) -> Result<minisign::PublicKey, Error> {
    minisign::PublicKey::from_base64(key_line(text))
        .map_err(minisign_err("not a minisign public key"))
}

/// The trusted comment [`sign_file`] gives a signature by default:
/// minisign's own default form, naming the file (its last component).
pub fn trusted_comment_for(file: &Path) -> String {
    let name: String = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("timestamp:{now}\tfile:{name}\thashed")
}

/// A trusted comment is one line; minisign's tools disagree on surrounding
/// whitespace (the `minisign` crate trims it before verifying, the C tool
/// and `minisign-verify` do not), so there must be none.
fn check_comment(comment: &str) -> Result<(), Error> {
    let bad = |reason| {
        Err(Error::BadComment {
            comment: comment.to_owned(),
            reason,
        })
    };
    if comment.contains(['\n', '\r']) {
        return bad("it must be one line");
    }
    if comment.trim() != comment {
        return bad("it must not start or end with whitespace");
    }
    Ok(())
}

/// Signs `data` (prehashed) with `secret`, with `trusted_comment`, and
/// returns the contents of its `.minisig` file. The signature is checked
/// against the key's public half before it is returned.
///
/// # Errors
///
/// [`Error::BadComment`] if the comment is not one line without
/// surrounding whitespace; [`Error::Minisign`] if signing fails.
pub fn sign(
    secret: &minisign::SecretKey,
    data: &[u8],
    trusted_comment: &str,
) -> Result<String, Error> {
    check_comment(trusted_comment)?;
    let public = minisign::PublicKey::from_secret_key(secret)
        .map_err(minisign_err("not a complete secret key"))?;
    let signature = minisign::sign(
        Some(&public),
        secret,
        Cursor::new(data),
        Some(trusted_comment),
        Some(SIGNATURE_COMMENT),
    )
    .map_err(minisign_err("cannot sign"))?;
    Ok(signature.into_string())
}

/// Verifies the signature file contents `signature` of `data` by the
/// public key `public` (a `.pub` file's contents), as the hotpatch runtime
/// does: prehashed signatures only. Returns the trusted comment.
///
/// # Errors
///
/// [`Error::Minisign`] if the key or signature is malformed, the signature
/// is legacy (not prehashed), made by another key, or not of these bytes.
pub fn verify(public: &str, signature: &str, data: &[u8]) -> Result<String, Error> {
    let public = public_key(public)?;
    let signature = minisign::SignatureBox::from_string(signature)
        .map_err(minisign_err("not a minisign signature"))?;
    minisign::verify(&public, &signature, Cursor::new(data), true, false, false)
        .map_err(minisign_err("signature does not verify"))?;
    signature
        .trusted_comment()
        .map_err(minisign_err("signature has no trusted comment"))
}

/// Where the signature of `file` goes: `<file>.minisig`.
pub fn signature_path(file: &Path) -> PathBuf {
    let mut path = file.as_os_str().to_owned();
    path.push(SIGNATURE_SUFFIX);
    PathBuf::from(path)
}

/// Writes a key pair to `public` (mode 0644) and `secret` (mode 0600),
/// refusing to overwrite either unless `force`.
///
/// # Errors
///
/// [`Error::Exists`], or [`Error::Write`].
pub fn write_key_pair(
    keys: &KeyPair,
    public: &Path,
    secret: &Path,
    force: bool,
) -> Result<(), Error> {
    if !force {
        for path in [public, secret] {
            if path.symlink_metadata().is_ok() {
                return Err(Error::Exists {
                    path: path.to_owned(),
                });
            }
        }
    }
    write_file(secret, keys.secret.as_bytes(), 0o600, force)?;
    write_file(public, keys.public.as_bytes(), 0o644, force)
}

fn write_file(path: &Path, bytes: &[u8], mode: u32, overwrite: bool) -> Result<(), Error> {
    let write_err = |source| Error::Write {
        path: path.to_owned(),
        source,
    };
    if overwrite {
        // A new file, so the mode applies even where one existed.
        match fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(write_err(e)),
        }
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(write_err)?;
    file.write_all(bytes).map_err(write_err)?;
    file.sync_all().map_err(write_err)
}

/// Signs the file at `file` and writes `<file>.minisig` next to it
/// (replacing any). `trusted_comment` defaults to
/// [`trusted_comment_for`]. Returns the signature's path.
///
/// # Errors
///
/// As [`sign`], and [`Error::Read`] / [`Error::Write`].
pub fn sign_file(
    secret: &minisign::SecretKey,
    file: &Path,
    trusted_comment: Option<&str>,
) -> Result<PathBuf, Error> {
    let data = fs::read(file).map_err(|source| Error::Read {
        path: file.to_owned(),
        source,
    })?;
    let comment = match trusted_comment {
        Some(c) => c.to_owned(),
        None => trusted_comment_for(file),
    };
    let signature = sign(secret, &data, &comment)?;
    let path = signature_path(file);
    // Write beside, then rename: a loader never reads half a signature.
    let partial = {
        let mut p = path.as_os_str().to_owned();
        p.push(".partial");
        PathBuf::from(p)
    };
    write_file(&partial, signature.as_bytes(), 0o644, true)?;
    fs::rename(&partial, &path).map_err(|source| Error::Write {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// Verifies `file` against `signature` (default `<file>.minisig`) with the
/// public key file `public`; see [`verify`]. Returns the trusted comment.
///
/// # Errors
///
/// As [`verify`], and [`Error::Read`].
pub fn verify_file(public: &Path, file: &Path, signature: Option<&Path>) -> Result<String, Error> {
    let read = |path: &Path| {
        fs::read(path).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })
    };
    let public = String::from_utf8_lossy(&read(public)?).into_owned();
    let sig_path = signature.map_or_else(|| signature_path(file), Path::to_owned);
    let signature = String::from_utf8_lossy(&read(&sig_path)?).into_owned();
    verify(&public, &signature, &read(file)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DATA: &[u8] = b"\x7fELF pretend this is a patch";

    fn verify_with_minisign_verify(public: &str, signature: &str, data: &[u8]) {
        let key =
            minisign_verify::PublicKey::decode(public).expect("minisign-verify reads the key");
        let sig =
            minisign_verify::Signature::decode(signature).expect("minisign-verify reads the sig");
        // `false`: no legacy signatures, as the hotpatch runtime.
        key.verify(data, &sig, false)
            .expect("minisign-verify accepts the signature");
    }

    #[test]
    fn unencrypted_keys_sign_what_both_verifiers_accept() {
        let keys = generate(None).unwrap();
        assert!(!is_encrypted(&keys.secret).unwrap());
        let secret = secret_key(&keys.secret, None).unwrap();
        let comment = trusted_comment_for(Path::new("/some/dir/fix.so"));
        assert!(comment.starts_with("timestamp:"), "{comment}");
        assert!(comment.ends_with("\tfile:fix.so\thashed"), "{comment}");
        let signature = sign(&secret, DATA, &comment).unwrap();

        assert_eq!(verify(&keys.public, &signature, DATA).unwrap(), comment);
        verify_with_minisign_verify(&keys.public, &signature, DATA);
        let lines: Vec<&str> = signature.lines().collect();
        assert_eq!(lines.len(), 4, "{signature}");
        assert_eq!(lines[2], format!("trusted comment: {comment}"));
    }

    #[test]
    fn the_public_key_file_is_minisigns() {
        let keys = generate(None).unwrap();
        let lines: Vec<&str> = keys.public.lines().collect();
        assert_eq!(
            lines[0],
            format!("untrusted comment: minisign public key {}", keys.key_id)
        );
        assert_eq!(lines[1].len(), 56, "base64 of 42 bytes");
        assert!(
            lines[1].starts_with("RW"),
            "base64 of \"Ed\"...: {}",
            lines[1]
        );
        let key = minisign_verify::PublicKey::from_base64(lines[1]).unwrap();
        let sig = sign(&secret_key(&keys.secret, None).unwrap(), DATA, "c").unwrap();
        key.verify(
            DATA,
            &minisign_verify::Signature::decode(&sig).unwrap(),
            false,
        )
        .unwrap();
    }

    #[test]
    fn signatures_are_prehashed() {
        let keys = generate(None).unwrap();
        let sig = sign(&secret_key(&keys.secret, None).unwrap(), DATA, "c").unwrap();
        let boxed = minisign::SignatureBox::from_string(&sig).unwrap();
        assert!(boxed.is_prehashed());
        let raw = Base64::decode_to_vec(sig.lines().nth(1).unwrap(), None).unwrap();
        assert_eq!(&raw[..2], b"ED");
    }

    #[test]
    fn encrypted_keys_need_their_password() {
        let keys = generate(Some("correct horse")).unwrap();
        assert!(is_encrypted(&keys.secret).unwrap());
        assert!(matches!(
            secret_key(&keys.secret, None),
            Err(Error::PasswordNeeded)
        ));
        // (A wrong password is tried by hotpatch-cli/tests/sign.rs: each scrypt run takes
        // seconds in an unoptimised build.)
        let secret = secret_key(&keys.secret, Some("correct horse")).unwrap();
        let sig = sign(&secret, DATA, "c").unwrap();
        verify(&keys.public, &sig, DATA).unwrap();
        verify_with_minisign_verify(&keys.public, &sig, DATA);
    }

    #[test]
    fn other_bytes_or_another_key_do_not_verify() {
        let keys = generate(None).unwrap();
        let other = generate(None).unwrap();
        let sig = sign(&secret_key(&keys.secret, None).unwrap(), DATA, "c").unwrap();
        minisign_error(
            verify(&other.public, &sig, DATA),
            "signature does not verify",
            "is different from public key",
        );
        minisign_error(
            verify(&keys.public, &sig, b"\x7fELF pretend this is a patcH"),
            "signature does not verify",
            "Signature verification failed",
        );
        minisign_error(
            verify(&keys.public, "garbage", DATA),
            "not a minisign signature",
            "Missing signature",
        );
    }

    #[test]
    fn trusted_comments_are_one_line_without_surrounding_space() {
        let secret = secret_key(&generate(None).unwrap().secret, None).unwrap();
        for bad in ["two\nlines", "cr\r", " leading", "trailing "] {
            assert!(
                matches!(sign(&secret, DATA, bad), Err(Error::BadComment { .. })),
                "{bad:?}"
            );
        }
        let odd = trusted_comment_for(Path::new("/tmp/new\nline.so"));
        assert!(odd.ends_with("\tfile:new?line.so\thashed"), "{odd}");
        sign(&secret, DATA, &odd).unwrap();
    }

    /// An unencrypted key as `minisign -G -W` 0.11 writes it: no checksum.
    #[test]
    fn unencrypted_keys_without_a_checksum_sign() {
        use ct_codecs::Encoder;
        let keys = generate(None).unwrap();
        let mut raw = Base64::decode_to_vec(key_line(&keys.secret), None).unwrap();
        assert_eq!(raw.len(), 158);
        raw[126..].fill(0);
        let text = format!(
            "untrusted comment: minisign encrypted secret key\n{}\n",
            Base64::encode_to_string(&raw).unwrap()
        );
        let secret = secret_key(&text, None).unwrap();
        let sig = sign(&secret, DATA, "c").unwrap();
        verify_with_minisign_verify(&keys.public, &sig, DATA);

        // A damaged one does not sign.
        raw[70] ^= 1;
        let text = format!(
            "untrusted comment: x\n{}\n",
            Base64::encode_to_string(&raw).unwrap()
        );
        minisign_error(
            sign(&secret_key(&text, None).unwrap(), DATA, "c"),
            "cannot sign",
            "Could not verify signature with the provided public key",
        );
    }

    /// `result` is `Error::Minisign` for `what`, and minisign's own words
    /// say `reason`.
    fn minisign_error<T: std::fmt::Debug>(result: Result<T, Error>, what: &str, reason: &str) {
        match result {
            Err(Error::Minisign { what: w, source }) => {
                assert_eq!(w, what, "({source})");
                let said = source.to_string();
                assert!(
                    said.contains(reason),
                    "{what}: {said:?} does not say {reason:?}"
                );
            }
            other => panic!("expected Error::Minisign ({what}: {reason}), got {other:?}"),
        }
    }

    #[test]
    fn garbage_keys_are_refused() {
        for text in ["", "untrusted comment: x\nnot base64!\n"] {
            minisign_error(
                public_key(text),
                "not a minisign public key",
                "base64 conversion failed",
            );
        }
        minisign_error(
            is_encrypted("untrusted comment: x\nAAAA\n"),
            "not a minisign secret key",
            "too short",
        );
        minisign_error(
            secret_key("nonsense", None),
            "not a minisign secret key",
            "unknown key derivation algorithm",
        );
    }
}
