//! The endpoint a request runs on: its configuration, its events, the
//! state store, and the bound on concurrent patch file reads. The
//! connections are the server's (`server.rs`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use parking_lot::Mutex;

use super::events::{Event, Ring};
use super::peer::Peer;
use super::state::Store;
use crate::Loader;

#[derive(Debug)]
pub(crate) struct Config {
    pub service: String,
    pub socket: PathBuf,
    pub own_uid: u32,
    pub allow_uids: Vec<u32>,
    pub allow_gids: Vec<u32>,
    pub loader: Loader,
    pub max_connections: usize,
    pub read_timeout: Duration,
    pub max_panics: u64,
    pub check_interval: Duration,
    pub max_concurrent_reads: usize,
}

impl Config {
    pub(crate) fn permits(&self, p: &Peer) -> bool {
        p.uid == 0
            || p.uid == self.own_uid
            || self.allow_uids.contains(&p.uid)
            || self.allow_gids.contains(&p.gid)
    }
}

/// What a request runs on: the configuration, the events, the state
/// store and the bound on patch file reads.
pub(crate) struct Endpoint {
    pub config: Config,
    pub events: Ring,
    /// Who applied each patch applied through the endpoint, by patch id.
    pub applied_by: Mutex<HashMap<u64, Peer>>,
    /// The state directory, if the service configured one.
    pub state: Mutex<Option<Store>>,
    /// Held for the whole of an operation that changes the record
    /// (accept, a revert or replace of an accepted patch), across its
    /// transition; `state` itself is only held briefly, so `status`
    /// answers meanwhile.
    pub state_ops: Mutex<()>,
    /// Patch files being read by requests (apply, check, replace), bounded
    /// by `max_concurrent_reads`: with the loader's size limit, a bound on
    /// the memory requests can make the service use.
    reads: Mutex<usize>,
    reads_done: parking_lot::Condvar,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    pub(crate) fn new(config: Config) -> Self {
        Endpoint {
            config,
            events: Ring::new(),
            applied_by: Mutex::new(HashMap::new()),
            state: Mutex::new(None),
            state_ops: Mutex::new(()),
            reads: Mutex::new(0),
            reads_done: parking_lot::Condvar::new(),
        }
    }

    /// Runs `f` (which reads a patch file) when fewer than
    /// `max_concurrent_reads` others are: waits for its turn.
    pub(crate) fn reading<T>(&self, f: impl FnOnce() -> T) -> T {
        {
            let mut reads = self.reads.lock();
            while *reads >= self.config.max_concurrent_reads {
                self.reads_done.wait(&mut reads);
            }
            *reads += 1;
        }
        struct Done<'a>(&'a Endpoint);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                *self.0.reads.lock() -= 1;
                self.0.reads_done.notify_one();
            }
        }
        let _done = Done(self);
        f()
    }

    pub(crate) fn listening(&self) {
        let socket = self.config.socket.display().to_string();
        tracing::info!(
            target: "hotpatch::control",
            service = %self.config.service,
            socket = %socket,
            "control endpoint listening"
        );
        self.events.push(Event {
            op: "listen",
            outcome: "ok".into(),
            patch: None,
            file: None,
            peer: None,
            duration: None,
            message: format!("listening on {socket}"),
        });
    }
}
