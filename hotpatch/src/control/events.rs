//! The endpoint's recent events, read by `events`: operations in one
//! bounded ring, refused connections in another, coalesced per peer, so
//! that no number of refused clients can push the history of operations
//! out.

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde_json::{Value, json};

use super::peer::Peer;

/// How many operation events are kept; older ones are dropped.
pub(crate) const CAPACITY: usize = 256;

/// How many refusal events are kept (apart from the operations).
pub(crate) const REFUSAL_CAPACITY: usize = 32;

/// Refusals of one peer (uid, gid) within this long of its last refusal
/// event are counted in that event rather than added as new ones (and
/// logged once).
pub(crate) const REFUSAL_INTERVAL: Duration = Duration::from_secs(60);

/// One operation or refusal, as reported by `events`.
#[derive(Clone, Debug)]
pub(crate) struct Event {
    /// The operation: `listen`, `apply`, `check`, `revert`, `replace`,
    /// `connect` (a refused or dropped connection), ...
    pub op: &'static str,
    /// `ok`, or the error kind (see the protocol).
    pub outcome: String,
    pub patch: Option<(u64, String)>,
    pub file: Option<String>,
    pub peer: Option<Peer>,
    pub duration: Option<Duration>,
    pub message: String,
}

impl Event {
    /// An event with no patch, file, peer or duration.
    pub(crate) fn new(op: &'static str, outcome: &str, message: String) -> Self {
        Event {
            op,
            outcome: outcome.to_owned(),
            patch: None,
            file: None,
            peer: None,
            duration: None,
            message,
        }
    }
}

pub(crate) struct Ring {
    inner: Mutex<Inner>,
}

struct Stored {
    seq: u64,
    at_ms: u64,
    event: Event,
    /// How many occurrences it stands for (refusals coalesced).
    count: u64,
}

struct Refusal {
    stored: Stored,
    /// When this event was started; later refusals of the same peer
    /// within [`REFUSAL_INTERVAL`] are counted in it.
    since: Instant,
}

struct Inner {
    next_seq: u64,
    events: VecDeque<Stored>,
    refusals: VecDeque<Refusal>,
    /// Refused connections since the endpoint started.
    refused_total: u64,
}

impl Ring {
    pub(crate) fn new() -> Self {
        Ring {
            inner: Mutex::new(Inner {
                next_seq: 1,
                events: VecDeque::with_capacity(CAPACITY),
                refusals: VecDeque::with_capacity(REFUSAL_CAPACITY),
                refused_total: 0,
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
        inner.events.push_back(Stored {
            seq,
            at_ms,
            event,
            count: 1,
        });
    }

    /// Counts a refused connection of `peer`: a new event if this peer
    /// has none younger than [`REFUSAL_INTERVAL`], else one more in it.
    /// `Some(n)` when a new event was started (`n`: refusals this peer
    /// had in the previous one, 0 if none), for the caller to log; `None`
    /// when counted in the current one.
    pub(crate) fn refused(&self, peer: Peer, message: impl FnOnce() -> String) -> Option<u64> {
        let now = Instant::now();
        let mut inner = self.inner.lock();
        inner.refused_total += 1;
        let same = |r: &&mut Refusal| {
            r.stored
                .event
                .peer
                .is_some_and(|p| p.uid == peer.uid && p.gid == peer.gid)
        };
        let mut previous = 0;
        if let Some(r) = inner.refusals.iter_mut().rev().find(same) {
            if now.duration_since(r.since) < REFUSAL_INTERVAL {
                r.stored.count += 1;
                // The latest refused pid is the one shown.
                r.stored.event.peer = Some(peer);
                return None;
            }
            previous = r.stored.count;
        }
        let seq = inner.next_seq;
        inner.next_seq += 1;
        if inner.refusals.len() == REFUSAL_CAPACITY {
            inner.refusals.pop_front();
        }
        inner.refusals.push_back(Refusal {
            stored: Stored {
                seq,
                at_ms: unix_ms(SystemTime::now()),
                event: Event {
                    peer: Some(peer),
                    ..Event::new("connect", "not_permitted", message())
                },
                count: 1,
            },
            since: now,
        });
        Some(previous)
    }

    /// Refused connections since the endpoint started.
    pub(crate) fn refused_total(&self) -> u64 {
        self.inner.lock().refused_total
    }

    /// Events with a sequence number above `since`, at most the last
    /// `limit`, oldest first; and the sequence number to ask from next.
    /// A refusal event still counting may have been seen with a smaller
    /// count by an earlier call.
    pub(crate) fn since(&self, since: u64, limit: usize) -> (Vec<Value>, u64) {
        let inner = self.inner.lock();
        let mut matching: Vec<&Stored> = inner
            .events
            .iter()
            .chain(inner.refusals.iter().map(|r| &r.stored))
            .filter(|s| s.seq > since)
            .collect();
        matching.sort_by_key(|s| s.seq);
        let skip = matching.len().saturating_sub(limit);
        let events = matching[skip..].iter().map(|s| to_json(s)).collect();
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

fn to_json(s: &Stored) -> Value {
    let e = &s.event;
    json!({
        "seq": s.seq,
        "at_ms": s.at_ms,
        "op": e.op,
        "outcome": e.outcome,
        "patch": e.patch.as_ref().map(|(id, name)| json!({ "id": id, "name": name })),
        "file": e.file,
        "peer": e.peer.as_ref().map(peer_json),
        "duration_us": e.duration.map(|d| d.as_micros() as u64),
        "count": s.count,
        "message": e.message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_coalesced_per_peer_and_never_evict_operations() {
        let ring = Ring::new();
        ring.push(Event::new("apply", "ok", "applied".into()));
        let nobody = Peer {
            pid: 7,
            uid: 65534,
            gid: 65534,
        };
        let other = Peer {
            uid: 1000,
            ..nobody
        };
        let mut started = 0;
        for i in 0..1000 {
            let peer = if i % 10 == 0 { other } else { nobody };
            if ring.refused(peer, || "refused".into()).is_some() {
                started += 1;
            }
        }
        assert_eq!(started, 2, "one event per peer in an interval");
        assert_eq!(ring.refused_total(), 1000);
        let (all, _) = ring.since(0, CAPACITY);
        assert_eq!(all.len(), 3);
        assert_eq!(all[0]["op"], json!("apply"));
        let counts: Vec<u64> = all[1..]
            .iter()
            .map(|e| e["count"].as_u64().unwrap())
            .collect();
        assert_eq!(counts, vec![100, 900]);
    }

    #[test]
    fn events_ring_is_bounded_and_ordered() {
        let ring = crate::control::events::Ring::new();
        for i in 0..CAPACITY + 10 {
            ring.push(Event {
                op: "apply",
                outcome: "ok".into(),
                patch: Some((i as u64, "p".into())),
                file: None,
                peer: None,
                duration: None,
                message: String::new(),
            });
        }
        let (all, last) = ring.since(0, usize::MAX);
        assert_eq!(all.len(), CAPACITY);
        assert_eq!(last, (CAPACITY + 10) as u64);
        assert_eq!(all[0]["seq"], json!(11));
        let (tail, _) = ring.since(last - 3, 100);
        let seqs: Vec<_> = tail.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, vec![last - 2, last - 1, last]);
    }
}
