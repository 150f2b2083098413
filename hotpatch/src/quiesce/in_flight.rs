//! The registry of in-flight request scopes (issue 12), on its own so that
//! `loom` can model-check exactly this code next to [`protocol`]
//! (`tests/loom.rs` includes both files with `--cfg hotpatch_loom`).
//!
//! # The protocol
//!
//! A request scope (`hotpatch::request`) *starts* at its first poll: it
//! takes the lock of one shard, reads the epoch target (its *universe*)
//! and inserts an entry `{universe, started, location}`, all under that
//! lock. It *finishes* (completes, or is dropped) by removing its entry
//! under the same lock. While it runs, the threads that poll it read
//! `new` from a dispatcher only if its universe is the transition's: a
//! request's universe never changes, so every dispatcher it meets answers
//! the same way, wherever and however often it is polled.
//!
//! The patcher publishes a target `t` ([`Epoch::publish`]) and then scans
//! the shards, each under its lock. For each shard, either the request's
//! critical section came first (the scan sees its entry, and its universe),
//! or the scan's did: then the request's lock acquisition synchronises
//! with the scan's release, which comes after the publication, so the
//! request reads `t` (or a later target). So a request the patcher never
//! sees is in `t`, and runs the new code: a transition is complete once
//! every entry is in `t` ([`Requests::all_in`]), and a reversal once none
//! is ([`Requests::none_in`]).
//!
//! A scope that starts inside another (nested, or carrying its parent's
//! version into a spawned task) takes the parent's universe instead of
//! the target ([`Requests::start_in`]). That is sound only while the
//! parent's entry is in the registry, which the callers guarantee: the
//! parent is being polled on this thread, or a handle registered in it is
//! alive. The patcher then sees the parent's entry until the child's is
//! in, so the two always hold the transition together.
//!
//! Shards: a thread starts its requests in its own shard (assigned once),
//! so workers do not contend on one lock; a request finishes in the shard
//! it started in, from whatever thread.
//!
//! [`protocol`]: super::protocol

use std::panic::Location;
use std::time::{Duration, Instant};

#[cfg(hotpatch_loom)]
use loom::sync::{Mutex, MutexGuard};
#[cfg(not(hotpatch_loom))]
use std::sync::{Mutex, MutexGuard};

use super::protocol::Epoch;

/// Shards of the registry: one lock each.
#[cfg(not(hotpatch_loom))]
pub const SHARDS: usize = 32;
#[cfg(hotpatch_loom)]
pub const SHARDS: usize = 2;

/// One in-flight request scope.
#[derive(Clone, Copy, Debug)]
pub struct InFlight {
    pub universe: u64,
    pub started: Instant,
    pub location: &'static Location<'static>,
}

/// Where a request's entry is, to remove it.
#[derive(Debug, PartialEq, Eq)]
pub struct Ticket {
    shard: u32,
    index: u32,
}

#[derive(Debug)]
struct Slab {
    entries: Vec<Option<InFlight>>,
    free: Vec<u32>,
    live: usize,
}

impl Slab {
    fn insert(&mut self, entry: InFlight) -> u32 {
        self.live += 1;
        match self.free.pop() {
            Some(i) => {
                self.entries[i as usize] = Some(entry);
                i
            }
            None => {
                self.entries.push(Some(entry));
                (self.entries.len() - 1) as u32
            }
        }
    }

    fn live(&self) -> impl Iterator<Item = &InFlight> {
        self.entries.iter().flatten()
    }
}

/// A cache line (two on some CPUs) per shard, so workers starting
/// requests in different shards do not share one.
#[derive(Debug)]
#[repr(align(128))]
struct Shard(Mutex<Slab>);

/// The in-flight request scopes.
#[derive(Debug)]
pub struct Requests {
    shards: [Shard; SHARDS],
}

fn lock(shard: &Shard) -> MutexGuard<'_, Slab> {
    // Nothing panics while a shard is locked; a poisoned lock still holds
    // a consistent slab.
    shard.0.lock().unwrap_or_else(|e| e.into_inner())
}

impl Default for Requests {
    fn default() -> Self {
        Requests::new()
    }
}

impl Requests {
    #[cfg(not(hotpatch_loom))]
    pub const fn new() -> Self {
        Requests {
            shards: [const {
                Shard(Mutex::new(Slab {
                    entries: Vec::new(),
                    free: Vec::new(),
                    live: 0,
                }))
            }; SHARDS],
        }
    }

    #[cfg(hotpatch_loom)]
    pub fn new() -> Self {
        Requests {
            shards: std::array::from_fn(|_| {
                Shard(Mutex::new(Slab {
                    entries: Vec::new(),
                    free: Vec::new(),
                    live: 0,
                }))
            }),
        }
    }

    /// Starts a request in shard `shard` (any number; reduced modulo the
    /// shard count) in the epoch's current target. Returns its universe.
    pub fn start(
        &self,
        shard: usize,
        epoch: &Epoch,
        location: &'static Location<'static>,
    ) -> (Ticket, u64) {
        let shard = shard % SHARDS;
        let started = Instant::now();
        let mut slab = lock(&self.shards[shard]);
        // Under the shard's lock (see the module docs): a scan that misses
        // this entry released the lock after publishing the target read
        // here. The Acquire of `target` pairs with `publish` as for threads.
        let universe = epoch.target();
        let index = slab.insert(InFlight {
            universe,
            started,
            location,
        });
        drop(slab);
        (
            Ticket {
                shard: shard as u32,
                index,
            },
            universe,
        )
    }

    /// Starts a request in `universe`, the universe of a request whose
    /// entry is in the registry now and stays until this call returns (a
    /// parent; see the module docs).
    pub fn start_in(
        &self,
        shard: usize,
        universe: u64,
        location: &'static Location<'static>,
    ) -> Ticket {
        let shard = shard % SHARDS;
        let started = Instant::now();
        let index = lock(&self.shards[shard]).insert(InFlight {
            universe,
            started,
            location,
        });
        Ticket {
            shard: shard as u32,
            index,
        }
    }

    /// The request `ticket` has finished (completed or dropped).
    pub fn finish(&self, ticket: Ticket) {
        let mut slab = lock(&self.shards[ticket.shard as usize]);
        if let Some(e) = slab.entries.get_mut(ticket.index as usize)
            && e.take().is_some()
        {
            slab.live -= 1;
            slab.free.push(ticket.index);
        }
    }

    /// Patcher: is every in-flight request in `universe`?
    pub fn all_in(&self, universe: u64) -> bool {
        self.shards
            .iter()
            .all(|s| lock(s).live().all(|e| e.universe == universe))
    }

    /// Patcher: has every request in `universe` finished?
    pub fn none_in(&self, universe: u64) -> bool {
        self.shards
            .iter()
            .all(|s| lock(s).live().all(|e| e.universe != universe))
    }

    /// Patcher: no request in flight, and none starts until the guards
    /// drop (a direct swap of the slots runs under them).
    pub fn lock_empty(&self) -> Option<Vec<impl Drop + '_>> {
        let mut guards = Vec::with_capacity(SHARDS);
        for s in &self.shards {
            let g = lock(s);
            if g.live > 0 {
                return None;
            }
            guards.push(g);
        }
        Some(guards)
    }

    /// The in-flight requests for which `wanted` holds, grouped by where
    /// they were created (most first), with the age of the oldest of each.
    pub fn report(&self, now: Instant, wanted: impl Fn(u64) -> bool) -> Vec<Waiting> {
        let mut out: Vec<Waiting> = Vec::new();
        for s in &self.shards {
            for e in lock(s).live().filter(|e| wanted(e.universe)) {
                let age = now.saturating_duration_since(e.started);
                match out.iter_mut().find(|w| w.location == e.location) {
                    Some(w) => {
                        w.count += 1;
                        w.oldest = w.oldest.max(age);
                    }
                    None => out.push(Waiting {
                        location: e.location,
                        count: 1,
                        oldest: age,
                    }),
                }
            }
        }
        out.sort_by(|a, b| b.count.cmp(&a.count).then(b.oldest.cmp(&a.oldest)));
        out
    }
}

/// In-flight requests created at one place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Waiting {
    pub location: &'static Location<'static>,
    pub count: usize,
    pub oldest: Duration,
}
