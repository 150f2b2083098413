//! The accept thread, the connection threads and their limits.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::MAX_LINE;
use super::endpoint::{Config, Endpoint};
use super::ops;
use super::peer::{self, Peer};
use super::protocol::{ErrorKind, protocol_failure};

/// How long a reply may take to be written before the client is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the accept thread, the connection threads and the handle share:
/// the endpoint the requests run on, and the connections.
pub(crate) struct Server {
    pub endpoint: Endpoint,
    /// Set when the handle is dropped.
    pub stop: AtomicBool,
    conns: Mutex<Conns>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Conns {
    next: u64,
    live: HashMap<u64, Conn>,
}

struct Conn {
    /// A second handle on the connection's socket, to close it from here.
    stream: UnixStream,
    /// Waiting for a request since then; `None` while running one.
    idle_since: Option<Instant>,
}

impl Server {
    pub(crate) fn new(config: Config) -> Self {
        Server {
            endpoint: Endpoint::new(config),
            stop: AtomicBool::new(false),
            conns: Mutex::new(Conns::default()),
        }
    }

    /// A slot for a new connection: a free one, or the one of the
    /// connection idle for longest, which is told `overloaded` and closed.
    /// A connection whose request line is waiting to be read is not idle.
    /// `None` if no slot is free or idle.
    fn admit(&self, stream: &UnixStream) -> Option<u64> {
        let handle = stream.try_clone().ok()?;
        let mut conns = self.conns.lock();
        if conns.live.len() >= self.endpoint.config.max_connections {
            let oldest = conns
                .live
                .iter()
                .filter(|(_, c)| !request_waiting(&c.stream))
                .filter_map(|(id, c)| c.idle_since.map(|t| (t, *id)))
                .min()?;
            if let Some(evicted) = conns.live.remove(&oldest.1) {
                // Idle: its thread writes nothing until it reads a request
                // and finds itself evicted, so this line is the only one.
                let message = format!(
                    "closed to admit a new connection: all {} connections were in use; \
                     reconnect to send another request",
                    self.endpoint.config.max_connections
                );
                send_now(
                    &evicted.stream,
                    &protocol_failure(ErrorKind::Overloaded, &message),
                );
                let _ = evicted.stream.shutdown(Shutdown::Both);
            }
        }
        let id = conns.next;
        conns.next += 1;
        conns.live.insert(
            id,
            Conn {
                stream: handle,
                idle_since: Some(Instant::now()),
            },
        );
        Some(id)
    }

    /// Marks connection `id` busy (`false`) or idle; false if it was
    /// closed meanwhile (evicted, or the endpoint stopped).
    fn set_idle(&self, id: u64, idle: bool) -> bool {
        match self.conns.lock().live.get_mut(&id) {
            Some(c) => {
                c.idle_since = idle.then(Instant::now);
                true
            }
            None => false,
        }
    }

    fn release(&self, id: u64) {
        self.conns.lock().live.remove(&id);
    }

    /// Closes every connection (their threads then end).
    pub(crate) fn close_all(&self) {
        for (_, c) in self.conns.lock().live.drain() {
            let _ = c.stream.shutdown(Shutdown::Both);
        }
    }
}

/// Serves `listener` until the handle sets `stop`. Blocks in `accept`.
pub(crate) fn accept_loop(listener: &UnixListener, shared: &Arc<Server>) {
    loop {
        let accepted = listener.accept();
        // Acquire: pairs with the Release store in `Control::drop`.
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // Out of descriptors or memory: let it pass rather than spin.
                tracing::warn!(target: "hotpatch::control", error = %e, "accept failed");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let peer = match peer::credentials(&stream) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(target: "hotpatch::control", error = %e, "no peer credentials: connection closed");
                continue;
            }
        };
        if !shared.endpoint.config.permits(&peer) {
            refuse(shared, stream, peer);
            continue;
        }
        let Some(id) = shared.admit(&stream) else {
            overloaded(shared, stream, peer);
            continue;
        };
        let conn_shared = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("hotpatch-conn".into())
            .spawn(move || {
                serve(&conn_shared, &stream, peer, id);
                conn_shared.release(id);
            });
        if let Err(e) = spawned {
            shared.release(id);
            tracing::warn!(target: "hotpatch::control", error = %e, "cannot start a connection thread");
        }
    }
}

/// Writes one line without blocking the accept thread: a fresh or idle
/// socket's send buffer takes it; if not, the client loses it.
fn send_now(stream: &UnixStream, line: &str) {
    // MSG_DONTWAIT rather than O_NONBLOCK: the descriptor's flags are
    // shared with the connection thread's handle.
    let bytes = format!("{line}\n");
    // SAFETY: the buffer is valid for reads of its length; the descriptor
    // is open while `stream` is borrowed.
    unsafe {
        libc::send(
            std::os::fd::AsRawFd::as_raw_fd(stream),
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
}

/// The client closed its end of the connection (both ways: a client that
/// only shut down writing still waits for its reply).
fn peer_gone(stream: &UnixStream) -> bool {
    let mut fd = libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(stream),
        events: 0,
        revents: 0,
    };
    // SAFETY: one valid pollfd; a zero timeout does not block.
    let rc = unsafe { libc::poll(&raw mut fd, 1, 0) };
    rc > 0 && fd.revents & (libc::POLLHUP | libc::POLLERR) != 0
}

/// The client sent a complete request line that was not read yet (seen
/// in the first 4 KiB waiting). Half a line does not count: a client
/// that trickles bytes is idle, and can be evicted.
fn request_waiting(stream: &UnixStream) -> bool {
    let mut buf = [0u8; 4096];
    // SAFETY: the buffer is valid for writes of its length; the
    // descriptor is open while `stream` is borrowed. MSG_PEEK leaves the
    // bytes for the connection's thread.
    let n = unsafe {
        libc::recv(
            std::os::fd::AsRawFd::as_raw_fd(stream),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n > 0 && buf[..n as usize].contains(&b'\n')
}

fn refuse(shared: &Server, stream: UnixStream, peer: Peer) {
    let message = format!(
        "uid {} (gid {}, pid {}) may not use the control endpoint of {} (allowed: uid {}, root{}{})",
        peer.uid,
        peer.gid,
        peer.pid,
        shared.endpoint.config.service,
        shared.endpoint.config.own_uid,
        list(" uids ", &shared.endpoint.config.allow_uids),
        list(" gids ", &shared.endpoint.config.allow_gids),
    );
    // One event and one warning per peer per interval, with a count: a
    // flood of refused clients neither fills the log nor pushes the
    // history of operations out of the ring.
    if let Some(before) = shared.endpoint.events.refused(peer, || message.clone()) {
        tracing::warn!(
            target: "hotpatch::control",
            peer_uid = peer.uid,
            peer_gid = peer.gid,
            peer_pid = peer.pid,
            refused_before = before,
            "control connection refused: not permitted (further refusals of this peer in the \
             next {} s are counted, not logged)",
            super::events::REFUSAL_INTERVAL.as_secs()
        );
    }
    send_now(
        &stream,
        &protocol_failure(ErrorKind::NotPermitted, &message),
    );
}

fn list(label: &str, ids: &[u32]) -> String {
    if ids.is_empty() {
        return String::new();
    }
    let ids: Vec<String> = ids.iter().map(u32::to_string).collect();
    format!(",{label}{}", ids.join(", "))
}

fn overloaded(shared: &Server, stream: UnixStream, peer: Peer) {
    let message = format!(
        "all {} connections are running or about to run requests; try again",
        shared.endpoint.config.max_connections
    );
    tracing::warn!(
        target: "hotpatch::control",
        peer_uid = peer.uid,
        peer_pid = peer.pid,
        "control connection refused: overloaded"
    );
    send_now(&stream, &protocol_failure(ErrorKind::Overloaded, &message));
}

/// Answers the requests of one connection until it closes, times out,
/// sends an oversized line, or is closed from outside.
fn serve(shared: &Server, stream: &UnixStream, peer: Peer, id: u64) {
    if stream.set_write_timeout(Some(WRITE_TIMEOUT)).is_err() {
        return;
    }
    let mut lines = LineReader::new(MAX_LINE);
    loop {
        let deadline = Instant::now() + shared.endpoint.config.read_timeout;
        let line = match lines.next(stream, deadline) {
            Ok(Some(line)) => line,
            Ok(None) => return,
            Err(ReadError::TooLong) => {
                let message = format!("a request line is at most {MAX_LINE} bytes");
                let _ = write_line(stream, &protocol_failure(ErrorKind::LineTooLong, &message));
                return;
            }
            Err(ReadError::TimedOut) => {
                tracing::debug!(target: "hotpatch::control", peer_pid = peer.pid, "control connection timed out");
                return;
            }
            Err(ReadError::Io) => return,
        };
        if !shared.set_idle(id, false) {
            return;
        }
        let reply = ops::handle(&shared.endpoint, &peer, &line, &|| peer_gone(stream));
        if write_line(stream, &reply).is_err() || !shared.set_idle(id, true) {
            return;
        }
    }
}

fn write_line(mut stream: &UnixStream, line: &str) -> io::Result<()> {
    let mut bytes = Vec::with_capacity(line.len() + 1);
    bytes.extend_from_slice(line.as_bytes());
    bytes.push(b'\n');
    stream.write_all(&bytes)
}

#[derive(Debug)]
pub(crate) enum ReadError {
    TooLong,
    TimedOut,
    /// The connection failed (reset, closed under us): nothing to answer.
    Io,
}

/// Reads newline-terminated lines of at most `max` bytes, each within a
/// deadline (so a client trickling bytes cannot hold a connection).
pub(crate) struct LineReader {
    buf: Vec<u8>,
    max: usize,
}

impl LineReader {
    pub(crate) fn new(max: usize) -> Self {
        LineReader {
            buf: Vec::new(),
            max,
        }
    }

    /// The next line (without its newline); `None` at end of stream (a
    /// partial last line is dropped).
    pub(crate) fn next(
        &mut self,
        mut stream: &UnixStream,
        deadline: Instant,
    ) -> Result<Option<Vec<u8>>, ReadError> {
        let mut scanned = 0;
        loop {
            if let Some(pos) = self.buf[scanned..].iter().position(|&b| b == b'\n') {
                let end = scanned + pos;
                if end > self.max {
                    return Err(ReadError::TooLong);
                }
                let line = self.buf[..end].to_vec();
                self.buf.drain(..=end);
                return Ok(Some(line));
            }
            scanned = self.buf.len();
            if self.buf.len() > self.max {
                return Err(ReadError::TooLong);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ReadError::TimedOut);
            }
            stream
                .set_read_timeout(Some(left))
                .map_err(|_| ReadError::Io)?;
            let mut chunk = [0u8; 8192];
            match stream.read(&mut chunk) {
                Ok(0) => return Ok(None),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(ReadError::TimedOut);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Err(ReadError::Io),
            }
        }
    }
}
