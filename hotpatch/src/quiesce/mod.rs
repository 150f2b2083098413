//! Quiescence: threads switch from the old to the new implementations of
//! a patch as a whole, each at its own safepoint. No thread waits for
//! another; the patcher polls.
//!
//! The shared-state protocol is in [`protocol`] and [`in_flight`]
//! (model-checked with loom); [`thread`] is the per-thread side
//! (registration, safepoints, offline, request scopes entered), and
//! [`patcher`] the patcher's side (the transition lock, [`switch`], what
//! a transition waits for). This file holds the state both sides share.

pub(crate) mod in_flight;
mod patcher;
pub(crate) mod protocol;
mod thread;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use in_flight::Requests;
use protocol::{Epoch, ThreadState};

pub(crate) use patcher::{
    Change, HookWrite, TransitionReport, Turn, grace, switch, take_turn, transition,
};
pub use patcher::{StalledRequest, StalledThread, TransitionInfo};
pub use thread::{OfflineGuard, ThreadGuard, offline, quiescent, register_thread, while_offline};
pub(crate) use thread::{
    current_request, enter, finish_request, leave, local_universe, start_request, start_request_in,
};

/// The in-flight request scopes (`hotpatch::request`).
pub(crate) static REQUESTS: Requests = Requests::new();

/// The request cell of a thread polling no request scope: never a
/// universe (those count up from 0 and `UNREGISTERED` is `u64::MAX`).
pub(crate) const NO_REQUEST: u64 = u64::MAX - 1;

/// The universe registered threads move to.
pub(crate) static EPOCH: Epoch = Epoch::new(0);

/// Universes handed out so far (only the patcher, under the transition
/// lock, takes new ones).
static UNIVERSES: AtomicU64 = AtomicU64::new(0);

fn next_universe() -> u64 {
    // Relaxed: only uniqueness matters; publication is by `EPOCH`.
    UNIVERSES.fetch_add(1, Ordering::Relaxed) + 1
}

/// The registered threads.
static THREADS: Mutex<Vec<Arc<RegisteredThread>>> = Mutex::new(Vec::new());

/// Ids of registered threads, for reports.
static THREAD_IDS: AtomicU64 = AtomicU64::new(0);

pub(crate) struct RegisteredThread {
    pub(crate) id: u64,
    pub(crate) name: Option<String>,
    pub(crate) os_tid: i64,
    pub(crate) record: ThreadState,
}
