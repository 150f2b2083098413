//! The endpoint's recent events: a bounded ring, read by `events`.

use std::collections::VecDeque;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde_json::{Value, json};

use super::peer::Peer;

/// How many events are kept; older ones are dropped.
pub(crate) const CAPACITY: usize = 256;

/// One operation or refusal, as reported by `events`.
#[derive(Clone, Debug)]
pub(crate) struct Event {
    /// The operation: `listen`, `apply`, `check`, `revert`, `replace`,
    /// `connect` (a refused or dropped connection).
    pub op: &'static str,
    /// `ok`, or the error kind (see the protocol).
    pub outcome: String,
    pub patch: Option<(u64, String)>,
    pub file: Option<String>,
    pub peer: Option<Peer>,
    pub duration: Option<Duration>,
    pub message: String,
}

pub(crate) struct Ring {
    inner: Mutex<Inner>,
}

struct Inner {
    next_seq: u64,
    events: VecDeque<(u64, u64, Event)>,
}

impl Ring {
    pub(crate) fn new() -> Self {
        Ring {
            inner: Mutex::new(Inner {
                next_seq: 1,
                events: VecDeque::with_capacity(CAPACITY),
            }),
        }
    }

    pub(crate) fn push(&self, event: Event) {
        let at_ms = unix_ms(SystemTime::now());
        let mut inner = self.inner.lock();
        let seq = inner.next_seq;
        inner.next_seq += 1;
        if inner.events.len() == CAPACITY {
            inner.events.pop_front();
        }
        inner.events.push_back((seq, at_ms, event));
    }

    /// Events with a sequence number above `since`, at most the last
    /// `limit`, oldest first; and the sequence number to ask from next.
    pub(crate) fn since(&self, since: u64, limit: usize) -> (Vec<Value>, u64) {
        let inner = self.inner.lock();
        let matching: Vec<_> = inner.events.iter().filter(|(s, _, _)| *s > since).collect();
        let skip = matching.len().saturating_sub(limit);
        let events = matching[skip..]
            .iter()
            .map(|(seq, at_ms, e)| to_json(*seq, *at_ms, e))
            .collect();
        (events, inner.next_seq - 1)
    }
}

pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub(crate) fn peer_json(p: &Peer) -> Value {
    json!({ "uid": p.uid, "gid": p.gid, "pid": p.pid })
}

fn to_json(seq: u64, at_ms: u64, e: &Event) -> Value {
    json!({
        "seq": seq,
        "at_ms": at_ms,
        "op": e.op,
        "outcome": e.outcome,
        "patch": e.patch.as_ref().map(|(id, name)| json!({ "id": id, "name": name })),
        "file": e.file,
        "peer": e.peer.as_ref().map(peer_json),
        "duration_us": e.duration.map(|d| d.as_micros() as u64),
        "message": e.message,
    })
}
