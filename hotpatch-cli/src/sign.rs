//! `hotpatch keygen`, `sign` and `verify`: makes minisign keys, and signs
//! and verifies hotpatch patch files with them (the library is the
//! `hotpatch-sign` crate).
//!
//! ```text
//! hotpatch keygen --public patches.pub --secret patches.key
//! hotpatch sign --secret patches.key target/release/libfix.so
//! hotpatch verify --public patches.pub target/release/libfix.so
//! ```
//!
//! `sign` writes `libfix.so.minisig` beside the patch, where the runtime
//! looks for it; a process configured with
//! `Loader::new().trusted_key(TrustedKey::from_file("patches.pub")?)` then
//! loads the patch only if the signature verifies. Keys and signatures are
//! minisign's format (`minisign -Vm libfix.so -p patches.pub` accepts
//! them); see the library docs of this crate for the details.
//!
//! Passwords: `keygen` encrypts the secret key with a password unless
//! `--unencrypted`; the password comes from `$HOTPATCH_SIGN_PASSWORD`, or
//! is asked for when standard input is a terminal. Without a terminal and
//! without the variable the tool fails instead of waiting for input.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use hotpatch_sign::{Error, PASSWORD_ENV};

#[derive(Debug, Clone, Subcommand)]
pub(crate) enum Command {
    /// Make a key pair: a public key to give to the service, a secret key
    /// to sign with.
    Keygen {
        /// Where to write the public key (minisign `.pub` format).
        #[arg(long, value_name = "FILE")]
        public: PathBuf,
        /// Where to write the secret key (written with mode 0600).
        #[arg(long, value_name = "FILE")]
        secret: PathBuf,
        /// Store the secret key without a password (for automation that
        /// keeps it in a secret store). Otherwise it is encrypted with the
        /// password from $HOTPATCH_SIGN_PASSWORD or the terminal.
        #[arg(long)]
        unencrypted: bool,
        /// Overwrite existing key files.
        #[arg(long)]
        force: bool,
    },
    /// Sign patch files: writes `<file>.minisig` beside each.
    Sign {
        /// The secret key (from `keygen`, or `minisign -G`).
        #[arg(long, value_name = "FILE")]
        secret: PathBuf,
        /// The trusted comment to sign with the file (one line). Default:
        /// `timestamp:<unix seconds>\tfile:<name>\thashed`.
        #[arg(long, value_name = "TEXT")]
        trusted_comment: Option<String>,
        /// The patch files.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Check a patch file's signature as the hotpatch runtime does
    /// (prehashed signatures only) and print its trusted comment.
    Verify {
        /// The public key (minisign `.pub` format).
        #[arg(long, value_name = "FILE")]
        public: PathBuf,
        /// The signature file. Default: `<file>.minisig`.
        #[arg(long, value_name = "FILE")]
        signature: Option<PathBuf>,
        /// The patch file.
        file: PathBuf,
    },
}

/// Runs a signing verb.
pub(crate) fn run(command: &Command) -> Result<(), Error> {
    match command.clone() {
        Command::Keygen {
            public,
            secret,
            unencrypted,
            force,
        } => {
            if !force {
                for path in [&public, &secret] {
                    if path.symlink_metadata().is_ok() {
                        return Err(Error::Exists { path: path.clone() });
                    }
                }
            }
            let password = if unencrypted {
                None
            } else {
                Some(password(true)?.ok_or(Error::PasswordNeeded)?)
            };
            let keys = hotpatch_sign::generate(password.as_deref())?;
            hotpatch_sign::write_key_pair(&keys, &public, &secret, force)?;
            println!("public key {} written to {}", keys.key_id, public.display());
            println!(
                "secret key written to {} ({})",
                secret.display(),
                if unencrypted {
                    "unencrypted: keep it secret"
                } else {
                    "encrypted"
                }
            );
            Ok(())
        }
        Command::Sign {
            secret,
            trusted_comment,
            files,
        } => {
            let text = read_text(&secret)?;
            let password = if hotpatch_sign::is_encrypted(&text)? {
                password(false)?
            } else {
                None
            };
            let key = hotpatch_sign::secret_key(&text, password.as_deref())?;
            for file in &files {
                let sig = hotpatch_sign::sign_file(&key, file, trusted_comment.as_deref())?;
                println!("signed {} -> {}", file.display(), sig.display());
            }
            Ok(())
        }
        Command::Verify {
            public,
            signature,
            file,
        } => {
            let comment = hotpatch_sign::verify_file(&public, &file, signature.as_deref())?;
            println!("Signature and comment signature verified");
            println!("Trusted comment: {comment}");
            Ok(())
        }
    }
}

fn read_text(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })
}

/// The password from the environment, or from the terminal (twice when
/// making a key); `None` when there is neither: never waits on a pipe.
fn password(new: bool) -> Result<Option<String>, Error> {
    if let Ok(p) = std::env::var(PASSWORD_ENV) {
        return Ok(Some(p));
    }
    if !std::io::stdin().is_terminal() {
        return Ok(None);
    }
    let ask = |prompt: &str| {
        rpassword::prompt_password(prompt).map_err(|source| Error::Read {
            path: PathBuf::from("/dev/tty"),
            source,
        })
    };
    let first = ask("Password: ")?;
    if new && ask("Password (again): ")? != first {
        return Err(Error::PasswordMismatch);
    }
    Ok(Some(first))
}
