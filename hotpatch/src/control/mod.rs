//! The control endpoint: operate a running service from outside.
//!
//! One line in the service serves every operation of the runtime (status,
//! apply, check, revert, replace, events) on a Unix socket, to the
//! operators it allows; the `hotpatch` command-line tool
//! (`hotpatch-cli/`) speaks to it.
//!
//! ```no_run
//! // At start-up, before serving: keep the handle for the life of the service.
//! let control = hotpatch::control::listen()?;
//! eprintln!("hotpatch control socket: {}", control.socket_path().display());
//! # Ok::<(), hotpatch::control::Error>(())
//! ```
//!
//! ```no_run
//! // With options.
//! let control = hotpatch::control::Control::builder()
//!     .service_name("pricing")
//!     .allow_gid(998) // the `deploy` group, besides this user and root
//!     .loader(hotpatch::Loader::new().deadline(std::time::Duration::from_secs(2)))
//!     .listen()?;
//! # Ok::<(), hotpatch::control::Error>(())
//! ```
//!
//! Available with the `control` cargo feature, which is on by default.
//!
//! # Where
//!
//! The socket is `<dir>/<service>.<pid>.sock`, where `<dir>` is, first
//! that applies: [`ControlBuilder::socket_dir`]; the environment variable
//! `HOTPATCH_SOCKET_DIR` ([`SOCKET_DIR_ENV`]); `/run/hotpatch` for root;
//! `$XDG_RUNTIME_DIR/hotpatch` for other users. `<service>` defaults to
//! the executable's file name. A socket left by a process that died is
//! replaced, and at start the sockets of other processes that are gone
//! are removed from the directory; the socket is removed when the
//! [`Control`] handle is dropped.
//!
//! # Who
//!
//! The directory is created `0700` (it must be owned by this user and
//! writable by no one else), the socket `0600`. Every connection is
//! checked by its peer credentials (`SO_PEERCRED`): this process's
//! effective uid and root may use it, and the uids and gids (the peer's
//! effective gid) given with [`ControlBuilder::allow_uid`] and
//! [`ControlBuilder::allow_gid`]. With any of those configured, the socket
//! is made `0666` and the directory searchable by others (`o+x`, not
//! readable or writable), so that they can connect: the peer credentials
//! are then what decides. A refused peer gets one JSON error line
//! (`not_permitted`) and is disconnected. Refusals are counted, not
//! logged one by one: one `connect` event (with a `count`) and one
//! `tracing` warning per peer (uid and gid) per minute, in a ring of
//! their own, so that refused clients cannot push the history of
//! operations out of `events`; `status` has their total.
//!
//! # How
//!
//! One thread (`hotpatch-control`) blocks in `accept`: an idle endpoint
//! costs nothing. Each admitted connection gets a thread of its own, up
//! to [`ControlBuilder::max_connections`] (default 32), so an operation
//! that takes time (an apply waiting for a transition) never holds up
//! another client. A connection must send each complete request line
//! within [`ControlBuilder::read_timeout`] (default 10 s) or it is closed,
//! and a line longer than [`MAX_LINE`] bytes is answered with an error and
//! the connection closed. When every slot is taken, the connection idle
//! for longest (waiting for a request, with no complete line unread) is told
//! `overloaded` and closed to admit the new one; if no slot is idle, the
//! new connection is told `overloaded` and closed: every client gets a
//! reply. At most [`ControlBuilder::max_concurrent_reads`] requests read
//! patch files at once (default 2), and the loader reads none larger than
//! its [size limit](Loader::max_file_size) (default 64 MiB) nor any that
//! does not start with the ELF magic: the memory clients can make the
//! service use is bounded. The trust policy and deadline of patches are
//! the service's ([`ControlBuilder::loader`]): a client may ask for a
//! shorter deadline, never a longer one, and cannot change the trust
//! policy.
//!
//! The protocol is documented in [`protocol`], with the types a client
//! writes requests and reads error kinds with ([`protocol::Operation`],
//! [`protocol::ErrorKind`]; the `hotpatch` tool uses them).
//!
//! The code, one file per concept: `protocol.rs` (the wire), `server.rs`
//! (the accept loop and the connections), `endpoint.rs` (what a request
//! runs on), `ops.rs` (the verbs), `audit.rs` (events and log lines),
//! `watch.rs` (watch windows), `state.rs` (the state directory).
//!
//! # Accepted patches
//!
//! A patch applied through the endpoint is *applied*: on trial. `accept`
//! makes it *accepted*: with a [state directory](ControlBuilder::state_dir)
//! the runtime keeps a copy of its file (and of its `.minisig`) and an
//! ordered record of accepted patches there, written crash-safely (a
//! temporary file, `fsync`, `rename`, `fsync` of the directory).
//! [`ControlBuilder::listen`] re-applies them, in their order and with
//! every check of [`Loader::load`] (the service's loader), before the
//! endpoint serves, so a service that calls `listen` before it serves
//! traffic starts with its fixes. Reverting an accepted patch removes it
//! from the record; a replace puts the new patch in its place. Both are
//! transactional: the record is written first, then the running code
//! changes; if the record cannot be written nothing changes (error
//! `state`, "nothing changed"), and if the transition fails the record is
//! put back (a failure to put it back is said in the error, with what
//! restart will then apply). A replace of an accepted patch copies the new
//! file into the state directory and applies that copy, so what runs is
//! what is recorded.
//!
//! A stored patch that no longer loads (the binary was upgraded, its copy
//! changed or is missing, the record cannot be read or parsed, or is of
//! another format version) is reported (a `tracing` warning, an event
//! `restore` with its reason, and `status`'s `state.rejected`), moved to
//! `rejected/` in the state directory with a `.reason` file (a copy
//! another entry still names stays), and dropped from the record; the
//! service starts with the others. Fields of a record this runtime does
//! not know (a later release's, same format version) are ignored and kept.
//! At start, copies no entry names and interrupted writes are removed
//! from the state directory, and sockets of dead processes from the
//! socket directory (event `clean`). These reports reach the service's
//! log only through a `tracing` subscriber; `status` and `events` have
//! them either way. With `HOTPATCH_DISABLE=1` ([`DISABLE_ENV`]) in its
//! environment the service starts with no accepted patch applied,
//! whatever the state directory holds: nothing in it is moved or removed,
//! and nothing in it is an error: the kill switch after a bad patch.
//!
//! # Watching
//!
//! `apply` with a watch window ([`watch`], `hotpatch apply --watch 60s`)
//! keeps the patch on trial for the window: panics out of its functions
//! are counted (on the panic path only) and the [health
//! checks](health_check) the service registered run every
//! [interval](ControlBuilder::health_check_interval). More panics than
//! [the threshold](ControlBuilder::watch_max_panics) (default: any), or a
//! failed check, revert it, with the reason recorded (event `rollback`,
//! reply `rolled_back`). A patch live at the end of its window stays
//! applied, and is accepted if asked. The window ends early if the client
//! that asked for it goes away (event `watch`, outcome `cancelled`): the
//! patch stays applied, on trial, not accepted and no longer watched.

mod audit;
mod endpoint;
mod events;
mod ops;
mod peer;
pub mod protocol;
mod server;
mod state;
mod watch;

pub use state::{DISABLE_ENV, RECORD_FORMAT};
pub use watch::{Watch, WatchOutcome, health_check, watch};

use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::Loader;

/// The protocol version this runtime speaks (`"v"` of every message).
pub const PROTOCOL_VERSION: u64 = 1;

/// The longest request line accepted, in bytes (newline excluded).
pub const MAX_LINE: usize = 64 * 1024;

/// The environment variable that overrides the default socket directory
/// (for the service and the `hotpatch` tool alike).
pub const SOCKET_DIR_ENV: &str = "HOTPATCH_SOCKET_DIR";

/// How many connections are served at once by default.
pub const DEFAULT_MAX_CONNECTIONS: usize = 32;

/// How many requests read a patch file at once, by default.
pub const DEFAULT_MAX_CONCURRENT_READS: usize = 2;

/// How long a connection may take to send a request line, by default.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the control endpoint could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No socket directory is configured and none can be derived
    /// (a user without `XDG_RUNTIME_DIR`).
    #[error("no control socket directory: {reason}")]
    NoSocketDir { reason: String },

    /// The socket directory is not private to this user.
    #[error("refusing control socket directory {dir}: {reason}")]
    InsecureDir { dir: PathBuf, reason: String },

    /// The service name cannot be part of a socket file name.
    #[error("invalid control service name `{name}`: {reason}")]
    InvalidName { name: String, reason: String },

    /// A file system or socket operation failed.
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// This process already serves a control endpoint at this path.
    #[error("a control endpoint of this process already listens on {path}")]
    AlreadyListening { path: PathBuf },
}

/// Starts the control endpoint with the defaults: see the module docs.
///
/// # Errors
///
/// As [`ControlBuilder::listen`].
pub fn listen() -> Result<Control, Error> {
    Control::builder().listen()
}

/// The directory sockets go in by default, for this user: see the module
/// docs ("Where").
///
/// # Errors
///
/// [`Error::NoSocketDir`] for a user other than root without
/// `XDG_RUNTIME_DIR` (and no `HOTPATCH_SOCKET_DIR`).
pub fn default_socket_dir() -> Result<PathBuf, Error> {
    if let Some(dir) = std::env::var_os(SOCKET_DIR_ENV).filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return Ok(PathBuf::from("/run/hotpatch"));
    }
    match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(dir) if dir.is_absolute() => Ok(dir.join("hotpatch")),
        _ => Err(Error::NoSocketDir {
            reason: format!(
                "XDG_RUNTIME_DIR is not set to an absolute path; set {SOCKET_DIR_ENV} or \
                 ControlBuilder::socket_dir"
            ),
        }),
    }
}

/// Every directory where control sockets of this host may be, for a
/// client to look in (`hotpatch ps`): `HOTPATCH_SOCKET_DIR` if set,
/// else `/run/hotpatch`, `$XDG_RUNTIME_DIR/hotpatch` and
/// `/run/user/*/hotpatch`. Only existing directories are listed.
pub fn socket_dirs() -> Vec<PathBuf> {
    if let Some(dir) = std::env::var_os(SOCKET_DIR_ENV).filter(|d| !d.is_empty()) {
        return vec![PathBuf::from(dir)];
    }
    let mut dirs = vec![PathBuf::from("/run/hotpatch")];
    if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from)
        && x.is_absolute()
    {
        dirs.push(x.join("hotpatch"));
    }
    if let Ok(users) = std::fs::read_dir("/run/user") {
        for u in users.flatten() {
            dirs.push(u.path().join("hotpatch"));
        }
    }
    let mut seen = std::collections::HashSet::new();
    dirs.retain(|d| d.is_dir() && seen.insert(d.canonicalize().unwrap_or_else(|_| d.clone())));
    dirs
}

/// The pid and service name in a socket file name `<service>.<pid>.sock`.
pub fn parse_socket_name(file_name: &str) -> Option<(String, u32)> {
    let stem = file_name.strip_suffix(".sock")?;
    let (service, pid) = stem.rsplit_once('.')?;
    let pid: u32 = pid.parse().ok()?;
    (!service.is_empty()).then(|| (service.to_owned(), pid))
}

/// Options of the control endpoint; [`listen`](Self::listen) starts it.
#[derive(Debug, Clone)]
pub struct ControlBuilder {
    service_name: Option<String>,
    socket_dir: Option<PathBuf>,
    allow_uids: Vec<u32>,
    allow_gids: Vec<u32>,
    loader: Loader,
    max_connections: usize,
    read_timeout: Duration,
    state_dir: Option<PathBuf>,
    max_panics: u64,
    check_interval: Duration,
    max_concurrent_reads: usize,
}

impl ControlBuilder {
    /// The service's name in the socket's file name and in `status`
    /// (letters, digits, `-`, `_`, `.`; at most 64). Default: the
    /// executable's file name.
    pub fn service_name(mut self, name: impl Into<String>) -> Self {
        self.service_name = Some(name.into());
        self
    }

    /// The directory the socket goes in (created `0700` if missing).
    pub fn socket_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.socket_dir = Some(dir.into());
        self
    }

    /// Also lets the user `uid` operate the service.
    pub fn allow_uid(mut self, uid: u32) -> Self {
        self.allow_uids.push(uid);
        self
    }

    /// Also lets peers whose effective gid is `gid` operate the service.
    pub fn allow_gid(mut self, gid: u32) -> Self {
        self.allow_gids.push(gid);
        self
    }

    /// The loader that applies, checks, reverts and replaces patches: its
    /// trust policy applies to every request, and its deadline bounds the
    /// deadline a client asks for. Default: [`Loader::new`].
    pub fn loader(mut self, loader: Loader) -> Self {
        self.loader = loader;
        self
    }

    /// How many connections are served at once (at least 1).
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// How long a connection may take to send one request line (and how
    /// long it may stay idle between requests).
    pub fn read_timeout(mut self, timeout: Duration) -> Self {
        self.read_timeout = timeout;
        self
    }

    /// Where accepted patches are kept across restarts (created `0700`
    /// if missing; see "Accepted patches" in the module docs). Without
    /// one, `accept` is refused. With one, [`listen`](Self::listen)
    /// re-applies the accepted patches before it serves.
    pub fn state_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.state_dir = Some(dir.into());
        self
    }

    /// In a watch window (`apply` with `watch_ms`), more panics than this
    /// out of the patch's functions roll it back. Default 0: any panic.
    pub fn watch_max_panics(mut self, n: u64) -> Self {
        self.max_panics = n;
        self
    }

    /// How often a watch window runs the health checks
    /// ([`health_check`]). Default 250 ms.
    pub fn health_check_interval(mut self, every: Duration) -> Self {
        self.check_interval = every.max(Duration::from_millis(1));
        self
    }

    /// How many requests may read a patch file at once (`apply`, `check`,
    /// `replace`, `accept`; at least 1); others wait for their turn. With
    /// the loader's [size limit](Loader::max_file_size), this bounds the
    /// memory clients can make the service use for patch files: at most
    /// this many times the limit. Default [`DEFAULT_MAX_CONCURRENT_READS`].
    pub fn max_concurrent_reads(mut self, n: usize) -> Self {
        self.max_concurrent_reads = n.max(1);
        self
    }

    /// Re-applies the accepted patches of the state directory (if one is
    /// set and [`DISABLE_ENV`] is not), then creates the socket and starts
    /// serving it in its own thread.
    ///
    /// # Errors
    ///
    /// [`Error::NoSocketDir`], [`Error::InsecureDir`] (the directory is
    /// not this user's, or others can write to it), [`Error::InvalidName`],
    /// [`Error::AlreadyListening`], [`Error::Io`] (the directory or the
    /// socket cannot be created, the thread cannot be started, the state
    /// directory cannot be created and the kill switch is not set). What
    /// the state directory holds is never an error: an accepted patch that
    /// does not load, or a record that cannot be read, is reported and set
    /// aside.
    pub fn listen(self) -> Result<Control, Error> {
        let service = match self.service_name {
            Some(name) => {
                check_name(&name)?;
                name
            }
            None => default_name(),
        };
        let dir = match self.socket_dir {
            Some(dir) => dir,
            None => default_socket_dir()?,
        };
        let others = !self.allow_uids.is_empty() || !self.allow_gids.is_empty();
        prepare_dir(&dir, others)?;
        let stale = remove_stale_sockets(&dir);
        let path = dir.join(format!("{service}.{}.sock", std::process::id()));
        let listener = bind(&path)?;
        let mode = if others { 0o666 } else { 0o600 };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).map_err(
            |source| {
                let _ = std::fs::remove_file(&path);
                Error::Io {
                    what: "set the permissions of",
                    path: path.clone(),
                    source,
                }
            },
        )?;
        let inode = std::fs::symlink_metadata(&path).map(|m| m.ino()).ok();
        let config = endpoint::Config {
            service,
            socket: path.clone(),
            // SAFETY: geteuid has no preconditions and cannot fail.
            own_uid: unsafe { libc::geteuid() },
            allow_uids: self.allow_uids,
            allow_gids: self.allow_gids,
            loader: self.loader,
            max_connections: self.max_connections,
            read_timeout: self.read_timeout,
            max_panics: self.max_panics,
            check_interval: self.check_interval,
            max_concurrent_reads: self.max_concurrent_reads,
        };
        let listener = Arc::new(listener);
        let server = Arc::new(server::Server::new(config));
        let endpoint = &server.endpoint;
        if !stale.is_empty() {
            let message = format!(
                "removed {} stale socket(s) of processes that are gone from {}: {}",
                stale.len(),
                dir.display(),
                stale.join(", ")
            );
            tracing::info!(target: "hotpatch::control", op = "clean", removed = stale.len(), "{message}");
            endpoint
                .events
                .push(events::Event::new("clean", "ok", message));
        }
        // Before the accept thread starts: a client that connects now waits
        // in the backlog until the accepted patches are back.
        if let Some(dir) = self.state_dir {
            let store =
                state::Store::open_and_restore(dir, &endpoint.config.loader, &endpoint.events)
                    .inspect_err(|_| {
                        let _ = std::fs::remove_file(&path);
                    })?;
            crate::metrics::accepted(store.entries.len());
            *endpoint.state.lock() = Some(store);
        }
        let thread = {
            let listener = listener.clone();
            let server = server.clone();
            std::thread::Builder::new()
                .name("hotpatch-control".into())
                .spawn(move || server::accept_loop(&listener, &server))
                .map_err(|source| {
                    let _ = std::fs::remove_file(&path);
                    Error::Io {
                        what: "start the control thread for",
                        path: path.clone(),
                        source,
                    }
                })?
        };
        endpoint.listening();
        Ok(Control {
            path,
            inode,
            listener,
            server,
            thread: Some(thread),
        })
    }
}

/// A running control endpoint. Dropping it (or [`shutdown`](Self::shutdown))
/// stops serving, closes the connections and removes the socket file.
#[derive(Debug)]
#[must_use = "dropping the handle stops the control endpoint"]
pub struct Control {
    path: PathBuf,
    inode: Option<u64>,
    listener: Arc<UnixListener>,
    server: Arc<server::Server>,
    thread: Option<JoinHandle<()>>,
}

impl Control {
    /// Options: see [`ControlBuilder`].
    pub fn builder() -> ControlBuilder {
        ControlBuilder {
            service_name: None,
            socket_dir: None,
            allow_uids: Vec::new(),
            allow_gids: Vec::new(),
            loader: Loader::new(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            read_timeout: DEFAULT_READ_TIMEOUT,
            state_dir: None,
            max_panics: 0,
            check_interval: Duration::from_millis(250),
            max_concurrent_reads: DEFAULT_MAX_CONCURRENT_READS,
        }
    }

    /// The socket this endpoint serves.
    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// Stops serving and removes the socket (what dropping does).
    pub fn shutdown(self) {}
}

impl Drop for Control {
    fn drop(&mut self) {
        // Release: pairs with the Acquire load in `accept_loop`, which runs
        // after `accept` returns.
        self.server.stop.store(true, Ordering::Release);
        // SAFETY: the descriptor is the listener's, open while `self.listener`
        // lives. On Linux, shutdown of a listening socket makes a blocked
        // `accept` return EINVAL.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.server.close_all();
        // Only our own socket: not one a later endpoint bound at this path.
        let ours = std::fs::symlink_metadata(&self.path).map(|m| m.ino()).ok();
        if ours.is_some() && ours == self.inode {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn check_name(name: &str) -> Result<(), Error> {
    let bad = |reason: &str| {
        Err(Error::InvalidName {
            name: name.to_owned(),
            reason: reason.to_owned(),
        })
    };
    if name.is_empty() || name.len() > 64 {
        return bad("it must have 1 to 64 characters");
    }
    if name.starts_with('.') {
        return bad("it must not start with `.`");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return bad("only ASCII letters, digits, `-`, `_` and `.` are allowed");
    }
    Ok(())
}

fn default_name() -> String {
    let exe = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let name: String = exe
        .chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let name = name.trim_start_matches('.').to_owned();
    if name.is_empty() {
        "service".to_owned()
    } else {
        name
    }
}

/// Creates `dir` private to this user if missing; refuses it if it is not
/// this user's or others can write to it. With `others`, lets others
/// search it (connect to a socket in it, nothing more).
fn prepare_dir(dir: &Path, others: bool) -> Result<(), Error> {
    let io = |what, source| Error::Io {
        what,
        path: dir.to_owned(),
        source,
    };
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| io("create the directory", e))?,
        Err(e) => return Err(io("inspect", e)),
        Ok(_) => {}
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|e| io("inspect", e))?;
    let insecure = |reason: String| {
        Err(Error::InsecureDir {
            dir: dir.to_owned(),
            reason,
        })
    };
    if !meta.is_dir() {
        return insecure("it is not a directory (or is a symbolic link)".into());
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if meta.uid() != uid {
        return insecure(format!("it is owned by uid {}, not by {uid}", meta.uid()));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return insecure(format!(
            "its mode {mode:04o} lets others create or replace files in it"
        ));
    }
    if others && mode & 0o011 != 0o011 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o011))
            .map_err(|e| io("set the permissions of", e))?;
    }
    Ok(())
}

/// Removes the sockets `<service>.<pid>.sock` in `dir` (this user's own
/// directory, checked by `prepare_dir`) whose process is gone and that
/// nothing listens on; their names.
fn remove_stale_sockets(dir: &Path) -> Vec<String> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return removed;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some((_, pid)) = parse_socket_name(&name) else {
            continue;
        };
        let is_socket = e
            .file_type()
            .is_ok_and(|t| std::os::unix::fs::FileTypeExt::is_socket(&t));
        // A live pid may be a process between bind and listen: left alone.
        if !is_socket || pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let refused = matches!(
            UnixStream::connect(e.path()),
            Err(err) if err.kind() == std::io::ErrorKind::ConnectionRefused
        );
        if refused && std::fs::remove_file(e.path()).is_ok() {
            removed.push(name);
        }
    }
    removed
}

/// Binds the socket at `path`, replacing a stale one (its listener is
/// gone: a process that died with our pid, or an endpoint not dropped).
fn bind(path: &Path) -> Result<UnixListener, Error> {
    let io = |what, source| Error::Io {
        what,
        path: path.to_owned(),
        source,
    };
    match UnixListener::bind(path) {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            if UnixStream::connect(path).is_ok() {
                return Err(Error::AlreadyListening {
                    path: path.to_owned(),
                });
            }
            let meta = std::fs::symlink_metadata(path).map_err(|e| io("inspect", e))?;
            if !std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) {
                return Err(io(
                    "replace (not a socket)",
                    std::io::Error::from(std::io::ErrorKind::AlreadyExists),
                ));
            }
            std::fs::remove_file(path).map_err(|e| io("remove the stale socket", e))?;
            UnixListener::bind(path).map_err(|e| io("bind", e))
        }
        Err(e) => Err(io("bind", e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "hotpatch-control-unit-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().mode() & 0o777
    }

    fn status(path: &Path) -> serde_json::Value {
        let mut s = UnixStream::connect(path).unwrap();
        s.write_all(b"{\"v\":1,\"op\":\"status\"}\n").unwrap();
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    }

    #[test]
    fn socket_is_private_named_by_service_and_pid_and_removed_on_drop() {
        let d = dir("private");
        let c = Control::builder()
            .socket_dir(&d)
            .service_name("unit")
            .listen()
            .unwrap();
        let path = d.join(format!("unit.{}.sock", std::process::id()));
        assert_eq!(c.socket_path(), path);
        assert_eq!(mode(&d), 0o700);
        assert_eq!(mode(&path), 0o600);
        assert_eq!(
            parse_socket_name(path.file_name().unwrap().to_str().unwrap()),
            Some(("unit".to_owned(), std::process::id()))
        );
        let reply = status(&path);
        assert_eq!(reply["ok"], serde_json::json!(true), "{reply}");
        assert_eq!(reply["service"], serde_json::json!("unit"));
        let again = Control::builder()
            .socket_dir(&d)
            .service_name("unit")
            .listen();
        assert!(
            matches!(again, Err(Error::AlreadyListening { .. })),
            "{again:?}"
        );
        drop(c);
        assert!(!path.exists(), "the socket is removed on drop");
    }

    #[test]
    fn a_stale_socket_is_replaced() {
        let d = dir("stale");
        std::fs::DirBuilder::new().mode(0o700).create(&d).unwrap();
        let path = d.join(format!("stale.{}.sock", std::process::id()));
        // A listener that is gone, its file left behind (a process that
        // died with this pid).
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        assert!(UnixStream::connect(&path).is_err());
        let c = Control::builder()
            .socket_dir(&d)
            .service_name("stale")
            .listen()
            .unwrap();
        assert_eq!(status(&path)["ok"], serde_json::json!(true));
        drop(c);
    }

    #[test]
    fn refuses_a_directory_others_can_write_and_bad_names() {
        let d = dir("open");
        std::fs::DirBuilder::new().mode(0o700).create(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
        let r = Control::builder().socket_dir(&d).service_name("x").listen();
        assert!(matches!(r, Err(Error::InsecureDir { .. })), "{r:?}");
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 0, "nothing created");
        for name in ["", "a/b", ".hidden", "sp ace"] {
            let r = Control::builder()
                .socket_dir(&d)
                .service_name(name)
                .listen();
            assert!(matches!(r, Err(Error::InvalidName { .. })), "{name}: {r:?}");
        }
    }

    #[test]
    fn extra_principals_make_the_socket_connectable_and_the_dir_searchable() {
        let d = dir("shared");
        let c = Control::builder()
            .socket_dir(&d)
            .service_name("shared")
            .allow_gid(4242)
            .listen()
            .unwrap();
        assert_eq!(mode(&d), 0o711);
        assert_eq!(mode(c.socket_path()), 0o666);
    }
}
