//! The one error type of the tool.

use std::fmt;
use std::path::PathBuf;

/// What went wrong, with the file and the reason.
///
/// [`Error::is_refusal`] tells a refusal (the input is not something a
/// thin patch can be made of, or the patch would not bind to the host)
/// from a failure to read, write or run something.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read, written, renamed or removed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A file that should be an ELF file (or an rlib archive) is not one
    /// this tool can read.
    #[error("{}: not a readable {what}: {reason}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What it should have been ("ELF file", "rlib archive", ...).
        what: &'static str,
        /// What the parser said.
        reason: String,
    },

    /// The binary has no GNU build-id note, so a patch cannot be bound to
    /// it.
    #[error(
        "{}: has no GNU build-id (no NT_GNU_BUILD_ID note): a patch is bound to the build-id of the binary it was made for; link the service with a build-id (the default of GCC and Clang on Linux; do not pass `-Wl,--build-id=none`)",
        path.display()
    )]
    NoBuildId {
        /// The binary.
        path: PathBuf,
    },

    /// The rlib holds LLVM bitcode instead of machine code: its profile
    /// uses LTO.
    #[error(
        "{}: member {member} is LLVM bitcode, not machine code: the profile builds with LTO (`lto = ...`), and a thin patch is linked from the crate's own machine code; build the patch and the service with a profile without `lto` (for example `[profile.release] lto = false`)",
        rlib.display()
    )]
    Bitcode {
        /// The rlib.
        rlib: PathBuf,
        /// The archive member that is bitcode.
        member: String,
    },

    /// The rlib holds no object file of the crate's own.
    #[error("{}: holds no object file (`*.rcgu.o`) of the crate's own code", rlib.display())]
    NoObjects {
        /// The rlib.
        rlib: PathBuf,
    },

    /// The patch crate declares a `#[global_allocator]`.
    #[error(
        "{}: member {member} defines the global allocator symbol `{symbol}`: the patch crate declares a `#[global_allocator]`; a thin patch allocates with the host's allocator, remove the `#[global_allocator]` from the patch crate",
        rlib.display()
    )]
    GlobalAllocator {
        /// The rlib.
        rlib: PathBuf,
        /// The archive member that defines it.
        member: String,
        /// The symbol as found (demangled).
        symbol: String,
    },

    /// No object of the crate defines the manifest symbol.
    #[error(
        "{}: no object defines `hotpatch_manifest_v1`: not a patch crate; invoke `hotpatch::manifest!()` once at the crate root",
        rlib.display()
    )]
    NoManifest {
        /// The rlib.
        rlib: PathBuf,
    },

    /// The linker (`cc`) could not be started or failed.
    #[error("linking {}: `{command}` {status}: {stderr}", out.display())]
    Linker {
        /// The shared object being made.
        out: PathBuf,
        /// The command line, for the user to rerun.
        command: String,
        /// How it ended ("exited with status 1", "could not be started: ...").
        status: String,
        /// What it printed on its standard error.
        stderr: String,
    },

    /// The host binary has no Rust symbol a thin patch could bind to:
    /// none exported to the dynamic loader and no symbol table (stripped).
    #[error(
        "{}: has no Rust symbols for a patch to bind to: the service binary was stripped and not linked with `-rdynamic`; keep its symbol table (remove `strip` from the profile, or `-s` from the link) or add `println!(\"cargo::rustc-link-arg-bins=-rdynamic\");` to the service's build.rs, and rebuild it",
        host.display()
    )]
    HostNotExported {
        /// The host binary.
        host: PathBuf,
    },

    /// Undefined symbols of the patch that neither the host binary nor
    /// the system libraries define.
    #[error(
        "{}: {} symbol(s) the patch needs are neither exported by {} nor in its symbol table: {}; either the service never uses them, so its linker dropped them (call them from the service, mark the function you patch so it is kept, or link the service with `-rdynamic`, which keeps every public function), or the patch was compiled with other features or another profile than the service (build the patch in the same package selection and profile the service was built with)",
        patch.display(), symbols.len(), host.display(), MissingList(symbols)
    )]
    MissingSymbols {
        /// The patch.
        patch: PathBuf,
        /// The host binary.
        host: PathBuf,
        /// The symbols, in the order of the patch's `.dynsym`.
        symbols: Vec<MissingSymbol>,
    },
}

impl Error {
    /// Whether this is a refusal of the input (bitcode, allocator, no
    /// manifest, no build-id, not ELF, a host that does not export what
    /// the patch needs) rather than a failure to read, write or link.
    pub fn is_refusal(&self) -> bool {
        !matches!(self, Error::Io { .. } | Error::Linker { .. })
    }

    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, source }
    }
}

/// A symbol of the patch that the host does not export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingSymbol {
    /// As in the patch's `.dynsym`.
    pub mangled: String,
    /// Demangled, without the hash.
    pub demangled: String,
    /// The host exports a symbol with the same demangled path but another
    /// hash: the same item of another build (features, profile,
    /// revision).
    pub other_build_in_host: bool,
}

/// How many missing symbols the message lists by name.
const LISTED: usize = 20;

struct MissingList<'a>(&'a [MissingSymbol]);

impl fmt::Display for MissingList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.0.iter().take(LISTED).enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "`{}`", s.demangled)?;
            if s.other_build_in_host {
                f.write_str(" (the host has another build of it)")?;
            }
        }
        if self.0.len() > LISTED {
            write!(f, " and {} more", self.0.len() - LISTED)?;
        }
        Ok(())
    }
}

/// Why `cargo hotpatch build` made no patch: [`build_patch_crate`] and
/// [`build_from_source`] return it, and its [`exit_code`] is the
/// command's.
///
/// [`build_patch_crate`]: crate::build_patch_crate
/// [`build_from_source`]: crate::build_from_source
/// [`exit_code`]: BuildError::exit_code
#[derive(Debug)]
#[non_exhaustive]
pub enum BuildError {
    /// Bad arguments: a revision that does not exist, an unknown package.
    Usage(String),
    /// cargo or git failed.
    Tool(String),
    /// The change (or the patch package) cannot be patched: each reason.
    Refused(Vec<crate::Refusal>),
    /// Base and head compile to the same code.
    NoChange(String),
    /// A file could not be read or written.
    Io(String),
    /// Reading the deployed binary, or linking or checking the patch,
    /// failed.
    Link(Error),
}

impl BuildError {
    /// The exit code of `cargo hotpatch` for this error: 1 cargo or git
    /// failed, 2 usage, 3 refused, 4 I/O, 5 no change (see the crate
    /// docs).
    ///
    /// ```
    /// use cargo_hotpatch::BuildError;
    ///
    /// assert_eq!(BuildError::NoChange("same code".into()).exit_code(), 5);
    /// ```
    pub fn exit_code(&self) -> u8 {
        match self {
            BuildError::Tool(_) => 1,
            BuildError::Usage(_) => 2,
            BuildError::Refused(_) => 3,
            BuildError::Io(_) => 4,
            BuildError::NoChange(_) => 5,
            BuildError::Link(e) if e.is_refusal() => 3,
            BuildError::Link(_) => 4,
        }
    }
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildError::Usage(m) | BuildError::Tool(m) | BuildError::Io(m) => f.write_str(m),
            BuildError::NoChange(m) => write!(f, "no change: {m}"),
            BuildError::Refused(reasons) => {
                for (i, r) in reasons.iter().enumerate() {
                    if i > 0 {
                        f.write_str("\n")?;
                    }
                    write!(f, "{r}")?;
                }
                Ok(())
            }
            BuildError::Link(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for BuildError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BuildError::Link(e) => Some(e),
            _ => None,
        }
    }
}

impl From<Error> for BuildError {
    fn from(e: Error) -> BuildError {
        BuildError::Link(e)
    }
}

/// A failed `std::io` operation on `what`, as [`BuildError::Io`].
pub(crate) fn io(what: impl fmt::Display) -> impl FnOnce(std::io::Error) -> BuildError {
    move |e| BuildError::Io(format!("{what}: {e}"))
}
