//! Rounds of the stop signal: the breakpoint protocol's *sampling*
//! (`sample_threads`), and the *stop-the-world* under which entry bytes
//! are written when the breakpoint protocol cannot run
//! (`stop_the_world`). `hook/mod.rs` ("The write") says when each runs and
//! why the writes are safe.
//!
//! # Sampling
//!
//! Used after an `int3` was written at each entry and every core
//! serialised: a thread outside the bytes being rewritten can no longer
//! enter them, so each thread need only be *seen* outside once, and no
//! thread is held. A round publishes the ranges `[f + 1, f + len)`
//! (`RANGES`, then `RANGE_COUNT` with Release) and records as below, and
//! `ROUND` with the bit `SAMPLE` set. The handler finds its record,
//! stores the interrupted instruction pointer and whether it, or a `rip`
//! saved in a signal frame on the thread's own stack (searched as below,
//! by the handler itself: once it returns, the thread's stack changes),
//! lies in a range, and how long it ran; marks the record arrived
//! (Release), wakes the caller if it is the last, and returns. It parks
//! nowhere and signals no other thread (the caller sends every signal, so
//! that each handler is as short as it can be). A frame of a `SIGTRAP`
//! raised by the `int3` at a hooked entry is not counted: that handler
//! sends the thread to the stub, not back to `f + 1` (and the `SIGTRAP`
//! handler blocks the stop signal, so such a frame is only seen when that
//! mask was changed). The caller waits for every record as below; a
//! thread found inside is sampled again (alone, with the others found
//! inside) after a pause, until the deadline. Threads created after the
//! listing start at `clone`'s return, outside every range, so no thread
//! count is checked.
//!
//! # Stop-the-world
//!
//! One stop or sampling at a time (`STOP`, a mutex). A *round*:
//!
//! 1. List the threads of the process (`/proc/self/task`), all but the
//!    calling one. (A thread may block every signal for a moment, as
//!    `pthread_create` does around `clone`: it is signalled anyway, and
//!    named at the deadline, with whether its `SigBlk` in
//!    `/proc/self/task/T/status` includes the stop signal then.)
//! 2. Write each tid into a record of the static table `RECORDS`, set
//!    `COUNT`, then publish the round number in `ROUND` (SeqCst).
//! 3. `tgkill` each thread with the stop signal. The caller and every
//!    thread that arrived share the sending: each claims the next record
//!    from `NEXT` (the round's tag and an index, one compare-and-swap) and
//!    signals its thread, so the signals go out from every core and do not
//!    wait for the caller when the threads it wakes take its core. (A
//!    record is claimed once; a signal sent after its round ended is a
//!    stale one, below.) The handler (all other signals blocked while it
//!    runs, so no other handler runs on a stopped thread) finds its record
//!    by tid, stores the interrupted instruction pointer (from the
//!    `ucontext`), marks the record arrived for this round (Release),
//!    signals unclaimed records, and parks on the futex `RELEASED` until it
//!    holds this round.
//! 4. The caller sleeps on the futex `ARRIVALS` (the last thread to
//!    arrive wakes it) until every record arrived (a thread that exited
//!    meanwhile, `tgkill` says `ESRCH`, counts as stopped), or the deadline.
//!    Then it reads the number of threads of the process (`/proc/self/stat`,
//!    through a descriptor opened before the stop: `pread`, no path
//!    lookup, no allocation): more than the parked ones and itself (a
//!    thread created by a thread before it stopped) means the round is
//!    released and run again.
//! 5. With every other thread parked in the handler, `check` sees their
//!    instruction pointers; if it refuses (a thread inside the bytes to be
//!    written), the round is released and run again after a pause, until
//!    the deadline. Otherwise `write` runs.
//! 6. Release: store the round into `RELEASED` (Release) and wake every
//!    waiter. Each handler executes `cpuid`, a serialising instruction
//!    (Intel SDM vol. 3, 8.1.3, cross-modifying code), before it returns to
//!    the code it interrupted; the caller executes it after the release
//!    (it runs no written code before). The caller does not wait for them
//!    to leave.
//!
//! Everything that does not need the threads held is done before the
//! first signal: the listing, the buffers, the descriptor of step 4, and
//! (by the callers, `hook/mod.rs`) the decode, the trampolines and the
//! write path, probed. The held window has the signals, the wait, the
//! relisting, the check and the writes: one stop for every entry a patch
//! writes.
//!
//! So while `write` runs, every other thread of the process is either
//! parked in the handler with its instruction pointer checked, or was
//! created after step 4's listing by no one (every thread that could
//! create one is parked), or has exited. A stopped thread resumes at its
//! recorded instruction pointer, which `check` accepted, and executes
//! `cpuid` first.
//!
//! A stop signal queued for a thread that did not take it in time (it was
//! slow to be scheduled) may arrive in a later round or after it: the
//! handler then joins the round in progress (its record is that round's),
//! or returns at once when none is (`ROUND` is 0) or its record already
//! arrived. A handler that read a round number just before that round was
//! released may meet the next round's records: it finds only its own
//! thread's record, marks it arrived with the *old* number, which the next
//! round does not count (the thread's own signal for the next round then
//! records it again, in program order after), and returns at once, since
//! released rounds only grow. So a new round need not wait for the
//! handlers of the last one to leave. A handler claims records to signal
//! only while `NEXT` carries its own round's tag: once the caller resets
//! `NEXT` for a new round, a claim for an old one fails its
//! compare-and-swap, and a claim made just before that sends one more
//! stale signal to a thread of this process. Every record of a round is
//! claimed by a thread that loaded that round (so sees its records) and
//! signals it before it parks; a `tgkill` error other than `ESRCH`
//! (counted as exited) is stored in `FAILED` and ends the stop with it.
//!
//! The atomics are `std`'s, not the `loom` shim's: the other party of this
//! protocol is a signal handler on a stopped thread, which loom cannot
//! model. `tests/hook.rs` runs it on real threads instead.
//!
//! # Limits
//!
//! - A thread interrupted by *another* signal's handler while it was inside
//!   the bytes has its position in that handler's signal frame, not in its
//!   instruction pointer. When the interrupted context had any signal
//!   blocked (a handler runs with at least its own signal blocked, unless
//!   `SA_NODEFER`), the 256 KiB above its stack pointer are searched for
//!   signal frames (the C library's `sa_restorer` followed by a
//!   `ucontext_t`), and each saved instruction pointer is checked as well:
//!   by the stopping thread under the stop-the-world (the stopped thread's
//!   stack does not change), by the sampled thread's own handler when
//!   sampling (reading 512 bytes at a time: the handler runs on the small
//!   signal stack). Not seen: a handler installed with
//!   `SA_NODEFER` and an empty mask by a thread with no signal blocked, a
//!   handler with its own restorer (not the C library's), a frame more
//!   than 256 KiB above, and any frame where `process_vm_readv` is
//!   forbidden (some container seccomp profiles deny it without
//!   `CAP_SYS_PTRACE`).
//! - Every thread takes the stop signal (at each install; at each unhook
//!   too under the stop-the-world): a system call that the kernel does
//!   not restart after a handler (`epoll_wait`, `poll`, `select`,
//!   `nanosleep`, `sigtimedwait`, ...) returns `EINTR` in threads that were
//!   in one, as with any signal (a profiler's `SIGPROF`).
//! - At most `MAX_THREADS` threads.

use std::collections::BTreeSet;
use std::fs;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// Threads a stop can hold (the static record table).
pub(crate) const MAX_THREADS: usize = 4096;

/// One thread's record for a round.
struct Record {
    tid: AtomicI32,
    ip: AtomicUsize,
    /// The interrupted stack pointer, when the interrupted context had
    /// signals blocked (it may be inside another signal's handler), else 0.
    sp: AtomicUsize,
    /// The round this thread arrived in (0: not yet).
    arrived: AtomicU64,
    /// The round in which `tgkill` found this thread gone (`ESRCH`).
    gone: AtomicU64,
    /// Sampling: the first position the handler found inside a published
    /// range (its own, or one saved in a signal frame), else 0.
    inside: AtomicUsize,
    /// Sampling: nanoseconds the handler ran before it marked the record.
    held: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Record = Record {
    tid: AtomicI32::new(0),
    ip: AtomicUsize::new(0),
    sp: AtomicUsize::new(0),
    arrived: AtomicU64::new(0),
    gone: AtomicU64::new(0),
    inside: AtomicUsize::new(0),
    held: AtomicU64::new(0),
};

static RECORDS: [Record; MAX_THREADS] = [EMPTY; MAX_THREADS];
/// Records valid in the current round.
static COUNT: AtomicUsize = AtomicUsize::new(0);
/// The round in progress, 0 when none; with [`SAMPLE`] set when it is a
/// sampling round (the handler records and returns, it does not park).
static ROUND: AtomicU64 = AtomicU64::new(0);
/// The bit of `ROUND` that makes a round a sampling one (round numbers
/// never reach it).
const SAMPLE: u64 = 1 << 63;

/// Ranges `[start, end)` a sampling round looks for threads in: the
/// bytes being rewritten (`f + 1` to `f + len` of each entry).
pub(crate) const MAX_RANGES: usize = 1024;

struct Range {
    start: AtomicUsize,
    end: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)]
const NO_RANGE: Range = Range {
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
};

static RANGES: [Range; MAX_RANGES] = [NO_RANGE; MAX_RANGES];
/// Ranges valid in the current sampling round.
static RANGE_COUNT: AtomicUsize = AtomicUsize::new(0);
/// The low 32 bits of the last released round (a futex word).
static RELEASED: AtomicU32 = AtomicU32::new(0);
/// Arrivals in the current round (a futex word the caller sleeps on
/// while it waits: a spinning caller would take the CPU the threads need
/// to arrive). Only a hint for waking the caller: what counts is each
/// record's `arrived`.
static ARRIVALS: AtomicU32 = AtomicU32::new(0);
/// The next record to signal: the round's low 32 bits, then the index.
/// The caller and every thread that arrived claim records from it (one
/// compare-and-swap each) and signal them, so the signals are sent from
/// every core, not one by one from the caller.
static NEXT: AtomicU64 = AtomicU64::new(0);
/// A `tgkill` that failed other than with `ESRCH`: the round's low 32
/// bits, then the error; `FAILED_TID` the thread.
static FAILED: AtomicU64 = AtomicU64::new(0);
static FAILED_TID: AtomicI32 = AtomicI32::new(0);
/// This process and the stop signal, for the handlers that signal others.
static PID: AtomicI32 = AtomicI32::new(0);
static SIG: AtomicI32 = AtomicI32::new(0);
/// Rounds run so far, stops and samplings (`hook::stop_rounds`).
pub(crate) static ROUNDS: AtomicU64 = AtomicU64::new(0);
/// Entry writes run so far, either protocol (`hook::stops`; counted by
/// `hook/mod.rs`).
pub(crate) static STOPS: AtomicU64 = AtomicU64::new(0);

/// One stop at a time.
static STOP: Mutex<()> = Mutex::new(());

/// The signal return trampoline the C library gives every handler
/// (`sa_restorer`, glibc's `__restore_rt`): the return address of a
/// handler's frame, just below the context it interrupted.
static RESTORER: AtomicUsize = AtomicUsize::new(0);

/// A thread, for messages: tid and name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadName {
    /// The thread's id (`gettid`).
    pub tid: i32,
    /// Its name (`/proc/self/task/TID/comm`), empty if unknown.
    pub name: String,
}

impl std::fmt::Display for ThreadName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "thread {} ({:?})", self.tid, self.name)
    }
}

fn thread_name(tid: i32) -> ThreadName {
    let name = fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
        .map(|s| s.trim_end().to_owned())
        .unwrap_or_default();
    ThreadName { tid, name }
}

/// Why a stop did not happen.
#[derive(Debug)]
pub(crate) enum StopError {
    /// Did not take the signal by the deadline; `blocks` if its `SigBlk`
    /// includes it now.
    NotStopped(Vec<(ThreadName, bool)>),
    /// `check` refused until the deadline (the last refusal).
    Busy(ThreadName, usize),
    /// More threads than the record table holds.
    TooManyThreads(usize),
    /// Installing the handler failed, or the signal has another handler.
    Signal(String),
    /// Listing or signalling threads failed.
    Io(String),
    /// `write` failed (everything was released).
    Write(String),
}

/// What one successful stop took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopStats {
    /// Rounds run (1 unless a thread was inside the bytes or a thread was
    /// created meanwhile).
    pub rounds: u32,
    /// Threads stopped in the last round.
    pub threads: usize,
    /// From the first signal of the last round to the release.
    pub pause: Duration,
}

/// The stop signal: the third-highest real-time signal, installed once.
pub(crate) fn signal() -> libc::c_int {
    libc::SIGRTMAX() - 2
}

fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

#[cfg(target_arch = "x86_64")]
fn serialise() {
    // Leaf 0 exists on every x86-64 CPU; the result is not needed.
    let _ = std::arch::x86_64::__cpuid(0);
}

extern "C" fn handler(_sig: libc::c_int, _info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: errno is thread-local; reading and restoring it is what a
    // handler that makes system calls must do.
    let errno = unsafe { *libc::__errno_location() };
    // SeqCst: pairs with the SeqCst store that publishes the round after its
    // records.
    let word = ROUND.load(Ordering::SeqCst);
    let round = word & !SAMPLE;
    if round != 0 && word & SAMPLE != 0 {
        sample(round, context);
    } else if round != 0 {
        let tid = gettid();
        // Acquire: pairs with the Release store of COUNT after the records.
        let count = COUNT.load(Ordering::Acquire).min(MAX_THREADS);
        if let Some(record) = RECORDS[..count]
            .iter()
            // Relaxed: written before ROUND was published (SeqCst above).
            .find(|r| r.tid.load(Ordering::Relaxed) == tid)
            // Relaxed: only this thread writes its arrival.
            .filter(|r| r.arrived.load(Ordering::Relaxed) != round)
        {
            // SAFETY: the kernel passes a `ucontext_t` as the third argument
            // of an SA_SIGINFO handler.
            let context = unsafe { &*context.cast::<libc::ucontext_t>() };
            let (ip, sp) = interrupted(context);
            // Relaxed: published by the Release store of `arrived`.
            record.ip.store(ip, Ordering::Relaxed);
            // Relaxed: as above.
            record.sp.store(sp, Ordering::Relaxed);
            // Release: the caller's Acquire load of `arrived` sees `ip`.
            record.arrived.store(round, Ordering::Release);
            // Release: with the store above, for the caller's futex wait.
            let arrivals = ARRIVALS.fetch_add(1, Ordering::Release) as usize + 1;
            // The last thread to arrive wakes the caller (a thread that
            // exited never arrives: the caller's wait has a 1 ms tick).
            if arrivals >= count {
                // SAFETY: a futex wake on a valid u32 that lives forever.
                unsafe {
                    libc::syscall(
                        libc::SYS_futex,
                        ARRIVALS.as_ptr(),
                        libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
                        1,
                    )
                };
            }
            signal_records(round, count);
            loop {
                // Acquire: pairs with the Release store in `release`: the
                // code written before it is what this thread runs next.
                let released = RELEASED.load(Ordering::Acquire);
                // Released rounds only grow: this round or a later one.
                if released.wrapping_sub(round as u32) as i32 >= 0 {
                    break;
                }
                // SAFETY: a futex wait on a valid, aligned u32 that lives
                // forever; it returns at once if the value changed.
                unsafe {
                    libc::syscall(
                        libc::SYS_futex,
                        RELEASED.as_ptr(),
                        libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                        released,
                        std::ptr::null::<libc::timespec>(),
                    )
                };
            }
            serialise();
        }
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

/// The sampling handler's part: finds this thread's record of `round`,
/// stores where the thread was interrupted and whether it, or a signal
/// frame on its stack, is inside a published range, marks the record
/// arrived and returns at once. Async-signal-safe: atomics,
/// `clock_gettime`, `process_vm_readv`, `futex`; no allocation (its
/// buffers are on the signal stack, small).
fn sample(round: u64, context: *mut libc::c_void) {
    let started = now_ns();
    let tid = gettid();
    // Acquire: pairs with the Release store of COUNT after the records.
    let count = COUNT.load(Ordering::Acquire).min(MAX_THREADS);
    let Some(record) = RECORDS[..count]
        .iter()
        // Relaxed: written before ROUND was published (SeqCst in the caller).
        .find(|r| r.tid.load(Ordering::Relaxed) == tid)
        // Relaxed: only this thread writes its arrival.
        .filter(|r| r.arrived.load(Ordering::Relaxed) != round)
    else {
        return;
    };
    // SAFETY: the kernel passes a `ucontext_t` as the third argument of an
    // SA_SIGINFO handler.
    let context = unsafe { &*context.cast::<libc::ucontext_t>() };
    let (ip, sp) = interrupted(context);
    let mut inside = if in_ranges(ip) { ip } else { 0 };
    // Relaxed: stored when the handler was installed, before any round.
    let restorer = RESTORER.load(Ordering::Relaxed);
    if inside == 0 && sp != 0 && restorer != 0 {
        let mut buf = [0u8; 512];
        saved_frames(sp, restorer, &mut buf, |rip, signo, code| {
            // A trap at a hooked entry whose SIGTRAP handler has not run
            // yet: that handler sends the thread to the stub, never to
            // `rip` (`f + 1`).
            if in_ranges(rip) && !super::trap::is_redirected(signo, code, rip) {
                inside = rip;
                return false;
            }
            true
        });
    }
    // Relaxed: published by the Release store of `arrived`.
    record.ip.store(ip, Ordering::Relaxed);
    // Relaxed: as above.
    record.inside.store(inside, Ordering::Relaxed);
    // Relaxed: as above.
    record
        .held
        .store(now_ns().saturating_sub(started), Ordering::Relaxed);
    // Release: the caller's Acquire load of `arrived` sees the stores above.
    record.arrived.store(round, Ordering::Release);
    // Release: with the store above, for the caller's futex wait.
    let arrivals = ARRIVALS.fetch_add(1, Ordering::Release) as usize + 1;
    if arrivals >= count {
        // SAFETY: a futex wake on a valid u32 that lives forever.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                ARRIVALS.as_ptr(),
                libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
                1,
            )
        };
    }
}

/// The monotonic clock in nanoseconds (`clock_gettime` is
/// async-signal-safe).
fn now_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes into `t`, which we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    (t.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(t.tv_nsec as u64)
}

/// The interrupted instruction pointer, and the stack pointer when the
/// interrupted context had any signal blocked (it may be running another
/// signal's handler, whose frame is on its stack), else 0.
fn interrupted(context: &libc::ucontext_t) -> (usize, usize) {
    let ip = context.uc_mcontext.gregs[libc::REG_RIP as usize] as usize;
    // The kernel's signal mask is the first 64 bits of the set.
    // SAFETY: a sigset_t is at least 8 bytes of plain data.
    let mask = unsafe {
        std::ptr::from_ref(&context.uc_sigmask)
            .cast::<u64>()
            .read_unaligned()
    };
    let sp = if mask != 0 {
        context.uc_mcontext.gregs[libc::REG_RSP as usize] as usize
    } else {
        0
    };
    (ip, sp)
}

/// Whether `ip` lies in a range published for the sampling round.
fn in_ranges(ip: usize) -> bool {
    // Acquire: pairs with the Release store of RANGE_COUNT after the ranges.
    let n = RANGE_COUNT.load(Ordering::Acquire).min(MAX_RANGES);
    RANGES[..n].iter().any(|r| {
        // Relaxed: written before RANGE_COUNT was published.
        ip >= r.start.load(Ordering::Relaxed) && ip < r.end.load(Ordering::Relaxed)
    })
}

/// Claims records of `round` from `NEXT` and sends each its stop signal,
/// until every one of the `count` records was claimed (or the round is
/// over). Async-signal-safe: atomics and `tgkill`. A record is claimed
/// once; a signal sent late (its round already over) is one more stale
/// signal, which the handler ignores.
fn signal_records(round: u64, count: usize) {
    let tag = round & 0xffff_ffff;
    // Relaxed: stored before the first round, under STOP.
    let (pid, sig) = (PID.load(Ordering::Relaxed), SIG.load(Ordering::Relaxed));
    loop {
        // Acquire: pairs with the caller's Release store that resets it.
        let next = NEXT.load(Ordering::Acquire);
        let i = (next & 0xffff_ffff) as usize;
        if next >> 32 != tag || i >= count {
            return;
        }
        if NEXT
            // AcqRel: one claimer per record; Relaxed on failure (retried).
            .compare_exchange_weak(next, next + 1, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            continue;
        }
        // Relaxed: written before ROUND was published (SeqCst), which
        // every claimer of this round loaded.
        let tid = RECORDS[i].tid.load(Ordering::Relaxed);
        // SAFETY: tgkill with a valid signal to a thread of this process.
        if unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, sig) } != 0 {
            // SAFETY: errno is thread-local.
            let e = unsafe { *libc::__errno_location() };
            if e == libc::ESRCH {
                // Release: the caller's Acquire load counts it as stopped.
                RECORDS[i].gone.store(round, Ordering::Release);
            } else {
                // Relaxed: published by the Release store of FAILED.
                FAILED_TID.store(tid, Ordering::Relaxed);
                // Release: pairs with the caller's Acquire load.
                FAILED.store(tag << 32 | e as u64, Ordering::Release);
            }
        }
    }
}

/// Installs the handler once. Refuses if the signal already has a handler
/// that is not ours.
fn install_handler() -> Result<(), StopError> {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            let sig = signal();
            let mut old = MaybeUninit::<libc::sigaction>::zeroed();
            // SAFETY: querying the current action into valid memory.
            if unsafe { libc::sigaction(sig, std::ptr::null(), old.as_mut_ptr()) } != 0 {
                return Err(format!(
                    "sigaction({sig}): {}",
                    std::io::Error::last_os_error()
                ));
            }
            // SAFETY: initialised by the successful call above.
            let old = unsafe { old.assume_init() };
            if old.sa_sigaction != libc::SIG_DFL {
                return Err(format!(
                    "signal {sig} (SIGRTMAX-2), which hotpatch stops threads with, already has a \
                     handler in this process"
                ));
            }
            // SAFETY: a zeroed sigaction is a valid starting point.
            let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
            action.sa_sigaction = handler as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART | libc::SA_ONSTACK;
            // SAFETY: filling the mask of the action we own: every signal is
            // blocked while the handler runs, so no other handler runs on a
            // stopped thread.
            unsafe { libc::sigfillset(&mut action.sa_mask) };
            // SAFETY: a valid action whose handler is async-signal-safe
            // (atomics, gettid, futex, cpuid).
            if unsafe { libc::sigaction(sig, &action, std::ptr::null_mut()) } != 0 {
                return Err(format!(
                    "sigaction({sig}): {}",
                    std::io::Error::last_os_error()
                ));
            }
            let mut ours = MaybeUninit::<libc::sigaction>::zeroed();
            // SAFETY: querying the action just installed into valid memory.
            if unsafe { libc::sigaction(sig, std::ptr::null(), ours.as_mut_ptr()) } == 0 {
                // SAFETY: initialised by the successful call.
                let ours = unsafe { ours.assume_init() };
                // Relaxed: read by stopping threads after STOP, which the
                // installing thread held.
                RESTORER.store(
                    ours.sa_restorer.map_or(0, |f| f as usize),
                    Ordering::Relaxed,
                );
            }
            Ok(())
        })
        .clone()
        .map_err(StopError::Signal)
}

fn threads(own: i32) -> Result<BTreeSet<i32>, StopError> {
    let dir = fs::read_dir("/proc/self/task")
        .map_err(|e| StopError::Io(format!("cannot list /proc/self/task: {e}")))?;
    Ok(dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&t| t != own)
        .collect())
}

/// Whether `tid`'s blocked-signal mask includes the stop signal.
fn blocks_signal(tid: i32) -> bool {
    let Ok(status) = fs::read_to_string(format!("/proc/self/task/{tid}/status")) else {
        return false;
    };
    let bit = (signal() - 1) as u32;
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigBlk:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|mask| mask >> bit & 1 == 1)
}

/// Whether `tid` is gone (exited) or a zombie.
fn gone(tid: i32) -> bool {
    // SAFETY: signal 0 only checks that the thread exists.
    let r = unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, 0) };
    if r != 0 {
        return std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
    }
    fs::read_to_string(format!("/proc/self/task/{tid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
        })
        .unwrap_or(true)
}

/// Ends the round in progress: every parked handler returns (after
/// `cpuid`).
fn release(round: u64) {
    // SeqCst: no handler joins this round after this point (it reads 0).
    ROUND.store(0, Ordering::SeqCst);
    // Release: pairs with the handlers' Acquire load: they see the code
    // written before.
    RELEASED.store(round as u32, Ordering::Release);
    // SAFETY: a futex wake on a valid u32 that lives forever.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            RELEASED.as_ptr(),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            i32::MAX,
        )
    };
}

/// Releases the round when dropped, on every path (panics included).
struct Round(u64);

impl Drop for Round {
    fn drop(&mut self) {
        release(self.0);
    }
}

/// Reads `buf.len()` bytes at `addr` of this process, or fewer where the
/// memory ends: `process_vm_readv` fails instead of faulting on unmapped
/// memory. No allocation.
fn read_own(addr: usize, buf: &mut [u8]) -> usize {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: reads into `buf`, which we own; the kernel checks the source.
    let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    usize::try_from(n).unwrap_or(0)
}

/// How far above a stopped thread's stack pointer the frames of signal
/// handlers it is running are looked for.
const SCAN: usize = 256 * 1024;

/// Where the `siginfo` of a signal frame lies from its return address
/// word: the kernel's x86-64 `struct rt_sigframe` is that word, then its
/// `struct ucontext` (flags 8, link 8, stack 24, `sigcontext` 256, mask 8:
/// 304 bytes), then the `siginfo` (`tests::siginfo_follows_the_ucontext`
/// checks it against a real frame).
const SIGINFO: usize = 8 + 304;

/// The frames of signal handlers that a thread is running (it was
/// interrupted while inside one): each frame is the C library's return
/// trampoline (`restorer`) followed by the `ucontext_t` it returns to and
/// the `siginfo`. Searched upward from `sp`, at most [`SCAN`] bytes, read
/// `buf.len()` bytes at a time; `out` gets each saved `rip` with the
/// frame's signal number and `si_code`, and stops the search by returning
/// false. A word that only looks like a frame gives an address that can
/// only make the check refuse, never accept. No allocation (it runs while
/// threads are stopped, or in a signal handler).
fn saved_frames(
    sp: usize,
    restorer: usize,
    buf: &mut [u8],
    mut out: impl FnMut(usize, i32, i32) -> bool,
) {
    const RIP: usize = std::mem::offset_of!(libc::ucontext_t, uc_mcontext)
        + libc::REG_RIP as usize * size_of::<libc::greg_t>();
    let mut at = sp & !7;
    let end = sp.saturating_add(SCAN);
    while at < end {
        let n = read_own(at, buf) & !7;
        if n == 0 {
            return;
        }
        for i in 0..n / 8 {
            let word = usize::from_ne_bytes(buf[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
            if word != restorer {
                continue;
            }
            let frame = at + i * 8;
            let mut rip = [0u8; 8];
            if read_own(frame + 8 + RIP, &mut rip) != 8 {
                continue;
            }
            let mut info = [0u8; 12];
            let (signo, code) = if read_own(frame + SIGINFO, &mut info) == 12 {
                (
                    i32::from_ne_bytes(info[0..4].try_into().expect("4 bytes")),
                    i32::from_ne_bytes(info[8..12].try_into().expect("4 bytes")),
                )
            } else {
                (0, 0)
            };
            if !out(usize::from_ne_bytes(rip), signo, code) {
                return;
            }
        }
        at += n;
    }
}

/// The number of threads of this process (`/proc/self/stat`, field 20,
/// `num_threads`), read through a descriptor opened before the stop:
/// `pread` at offset 0 generates the file again, with no path lookup and
/// no allocation in this process (other threads may be stopped holding
/// the allocator's lock). Measured here, about half the cost of opening
/// the file each time, and less than listing `/proc/self/task` again
/// from 16 threads up.
struct ThreadCount(fs::File);

impl ThreadCount {
    fn open() -> Result<ThreadCount, StopError> {
        fs::File::open("/proc/self/stat")
            .map(ThreadCount)
            .map_err(|e| StopError::Io(format!("cannot open /proc/self/stat: {e}")))
    }

    fn now(&self) -> Option<usize> {
        use std::os::unix::fs::FileExt;
        let mut buf = [0u8; 1024];
        let mut len = 0;
        while len < buf.len() {
            match self.0.read_at(&mut buf[len..], len as u64) {
                Ok(0) => break,
                Ok(n) => len += n,
                Err(_) => return None,
            }
        }
        let text = std::str::from_utf8(&buf[..len]).ok()?;
        // Fields after the command name (which may hold spaces): state is
        // field 3, num_threads field 20.
        let (_, rest) = text.rsplit_once(')')?;
        rest.split_ascii_whitespace().nth(17)?.parse().ok()
    }
}

/// Waits until every record of `round` (one per `tids`) arrived or its
/// thread is gone, marking each in `stopped`: true when all did, false at
/// the deadline. The caller sleeps on the futex `ARRIVALS` (the last
/// thread to arrive wakes it; a 1 ms tick for threads that exit).
fn wait_round(
    round: u64,
    tids: &[i32],
    stopped: &mut [bool],
    start: Instant,
    deadline: Duration,
) -> Result<bool, StopError> {
    let mut spins = 0u32;
    loop {
        // Acquire: read before the records, so an arrival after this
        // load changes the word and the wait below returns at once.
        let seen = ARRIVALS.load(Ordering::Acquire);
        // Acquire: pairs with the Release store in `signal_records`.
        let failed = FAILED.load(Ordering::Acquire);
        if failed >> 32 == round & 0xffff_ffff {
            // Relaxed: published by the Release store of FAILED.
            let tid = FAILED_TID.load(Ordering::Relaxed);
            let e = std::io::Error::from_raw_os_error(failed as u32 as i32);
            return Err(StopError::Io(format!("tgkill({tid}): {e}")));
        }
        let mut all = true;
        for (i, record) in RECORDS[..tids.len()].iter().enumerate() {
            // Acquire: pairs with the handler's Release: its `ip` is
            // visible; or with the Release store of `gone` (exited).
            if !stopped[i]
                && (record.arrived.load(Ordering::Acquire) == round
                    || record.gone.load(Ordering::Acquire) == round)
            {
                stopped[i] = true;
            }
            all &= stopped[i];
        }
        if all {
            return Ok(true);
        }
        spins += 1;
        if spins.is_multiple_of(16) {
            for (i, &tid) in tids.iter().enumerate() {
                if !stopped[i] && gone(tid) {
                    stopped[i] = true;
                }
            }
        }
        if start.elapsed() > deadline {
            return Ok(false);
        }
        let tick = libc::timespec {
            tv_sec: 0,
            tv_nsec: 1_000_000,
        };
        // SAFETY: a futex wait on a valid u32 that lives forever, with a
        // timeout (the deadline and exited threads are checked above).
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                ARRIVALS.as_ptr(),
                libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                seen,
                &tick,
            )
        };
    }
}

/// Publishes a round of `tids` (records reset, `COUNT`, `NEXT`) and
/// returns its number; the caller then stores it into `ROUND`.
fn new_round(tids: &[i32]) -> u64 {
    // Relaxed: a counter for reports.
    let round = ROUNDS.fetch_add(1, Ordering::Relaxed) + 1;
    // Release: a claimer of the last round fails its compare-and-swap
    // from now on; one of this round (after ROUND) sees index 0.
    NEXT.store((round & 0xffff_ffff) << 32, Ordering::Release);
    for (record, &tid) in RECORDS.iter().zip(tids) {
        // Relaxed: published by the SeqCst store of ROUND.
        record.tid.store(tid, Ordering::Relaxed);
        record.ip.store(0, Ordering::Relaxed);
        record.sp.store(0, Ordering::Relaxed);
        record.arrived.store(0, Ordering::Relaxed);
        record.gone.store(0, Ordering::Relaxed);
        record.inside.store(0, Ordering::Relaxed);
        record.held.store(0, Ordering::Relaxed);
    }
    // Relaxed: a wake-up hint, published with the records.
    ARRIVALS.store(0, Ordering::Relaxed);
    // Release: a handler that loads COUNT (Acquire) sees the records.
    COUNT.store(tids.len(), Ordering::Release);
    round
}

/// The signal's process and number, for the threads that send it.
fn prepare_signalling() {
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    // Relaxed: read by the handlers of rounds published later (SeqCst).
    PID.store(pid, Ordering::Relaxed);
    // Relaxed: as above.
    SIG.store(signal(), Ordering::Relaxed);
}

/// What a sampling took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleStats {
    /// Sampling rounds (1 unless a thread was inside a range).
    pub rounds: u32,
    /// Threads sampled in the first round.
    pub threads: usize,
    /// The longest any handler ran, over every round.
    pub held: Duration,
}

/// Samples every other thread's position (listed now) with the stop
/// signal, whose handler records it and returns at once: no thread is
/// held. A thread found inside one of `ranges` (its own position or one
/// saved in a signal frame on its stack) is sampled again after `retry`,
/// until none is, or `deadline` from `start`.
///
/// The caller guarantees that a thread outside every range cannot enter
/// one after it was sampled (an `int3` at each range's start guards it),
/// so a thread seen outside once need not be seen again, and a thread
/// created after the listing starts outside.
pub(crate) fn sample_threads(
    ranges: &[(usize, usize)],
    deadline: Duration,
    retry: Duration,
    start: Instant,
) -> Result<SampleStats, StopError> {
    let _one = STOP.lock().unwrap_or_else(PoisonError::into_inner);
    install_handler()?;
    if ranges.len() > MAX_RANGES {
        return Err(StopError::Io(format!(
            "{} entries: a sampling checks at most {MAX_RANGES}",
            ranges.len()
        )));
    }
    for (slot, &(s, e)) in RANGES.iter().zip(ranges) {
        // Relaxed: published by the Release store of RANGE_COUNT below.
        slot.start.store(s, Ordering::Relaxed);
        // Relaxed: as above.
        slot.end.store(e, Ordering::Relaxed);
    }
    // Release: a handler that loads it (Acquire) sees the ranges.
    RANGE_COUNT.store(ranges.len(), Ordering::Release);
    prepare_signalling();
    let mut tids: Vec<i32> = threads(gettid())?.into_iter().collect();
    let mut stats = SampleStats {
        rounds: 0,
        threads: tids.len(),
        held: Duration::ZERO,
    };
    // The threads the last round found inside, and where (every thread
    // of the rounds after the first).
    let mut was_inside: Vec<(i32, usize)> = Vec::new();
    loop {
        if tids.len() > MAX_THREADS {
            return Err(StopError::TooManyThreads(tids.len()));
        }
        let mut stopped = vec![false; tids.len()];
        let round = new_round(&tids);
        stats.rounds += 1;
        // SeqCst: after the records and ranges; pairs with the handlers'
        // SeqCst load.
        ROUND.store(round | SAMPLE, Ordering::SeqCst);
        let guard = Round(round);
        signal_records(round, tids.len());
        let all = wait_round(round, &tids, &mut stopped, start, deadline);
        drop(guard);
        let all = all?;
        let mut inside = Vec::new();
        for (record, &tid) in RECORDS[..tids.len()].iter().zip(&tids) {
            // Acquire: pairs with the handler's Release store of `arrived`.
            if record.arrived.load(Ordering::Acquire) != round {
                continue;
            }
            // Relaxed: after the Acquire load above.
            let held = Duration::from_nanos(record.held.load(Ordering::Relaxed));
            stats.held = stats.held.max(held);
            // Relaxed: as above.
            let at = record.inside.load(Ordering::Relaxed);
            if at != 0 {
                inside.push((tid, at));
            }
        }
        if !all {
            // A thread found inside (before, and not seen since; or now)
            // kept the write from happening, not this round's stragglers.
            let unseen = tids
                .iter()
                .zip(&stopped)
                .filter(|&(_, &s)| !s)
                .find_map(|(t, _)| was_inside.iter().find(|(w, _)| w == t));
            if let Some(&(tid, ip)) = unseen.or(inside.first()) {
                return Err(StopError::Busy(thread_name(tid), ip));
            }
            let late: Vec<(ThreadName, bool)> = tids
                .iter()
                .zip(&stopped)
                .filter(|&(&t, &s)| !s && !gone(t))
                .map(|(&t, _)| (thread_name(t), blocks_signal(t)))
                .collect();
            return Err(StopError::NotStopped(late));
        }
        let Some(&(tid, ip)) = inside.first() else {
            return Ok(stats);
        };
        if start.elapsed() + retry > deadline {
            return Err(StopError::Busy(thread_name(tid), ip));
        }
        std::thread::sleep(retry);
        tids = inside.iter().map(|&(t, _)| t).collect();
        was_inside = inside;
    }
}

/// Stops every other thread, calls `check` with their instruction pointers
/// (it returns the offending thread's index and an address, or `Ok`), and
/// runs `write` while they are stopped. Retries until `deadline`.
///
/// Between the stop and the release nothing here allocates or takes a
/// lock that a stopped thread may hold: `check` and `write` must not
/// either (no allocation, no `println!`, no `tracing`).
pub(crate) fn stop_the_world<C, W>(
    deadline: Duration,
    retry: Duration,
    mut check: C,
    write: W,
) -> Result<StopStats, StopError>
where
    C: FnMut(&[(usize, usize)]) -> Result<(), (usize, usize)>,
    W: FnOnce() -> std::io::Result<()>,
{
    let _one = STOP.lock().unwrap_or_else(PoisonError::into_inner);
    install_handler()?;
    let count = ThreadCount::open()?;
    let start = Instant::now();
    let own = gettid();
    prepare_signalling();
    let mut rounds = 0u32;
    let mut write = Some(write);
    // The thread the last round found inside the bytes, and where.
    let mut busy: Option<(i32, usize)> = None;
    loop {
        let listed = threads(own)?;
        if listed.len() > MAX_THREADS {
            return Err(StopError::TooManyThreads(listed.len()));
        }
        let tids: Vec<i32> = listed.iter().copied().collect();
        // Allocated before the stop: nothing is allocated during it.
        let mut stopped = vec![false; tids.len()];
        // (thread index, instruction pointer): each thread's own, and those
        // saved by signal handlers it was running (a few per thread).
        let mut ips: Vec<(usize, usize)> = Vec::with_capacity(tids.len() * 4);
        let round = new_round(&tids);
        rounds += 1;
        let paused = Instant::now();
        // SeqCst: after the records; pairs with the handlers' SeqCst load.
        ROUND.store(round, Ordering::SeqCst);
        let guard = Round(round);
        signal_records(round, tids.len());
        let timed_out = match wait_round(round, &tids, &mut stopped, start, deadline) {
            Ok(all) => !all,
            Err(e) => {
                drop(guard);
                return Err(e);
            }
        };
        if timed_out {
            drop(guard);
            // Every round that completed found a thread inside the bytes:
            // that, not this round's stragglers, kept the write from
            // happening (on a loaded machine a released thread may not
            // be scheduled again before the deadline).
            if let Some((tid, ip)) = busy {
                return Err(StopError::Busy(thread_name(tid), ip));
            }
            let late: Vec<(ThreadName, bool)> = tids
                .iter()
                .zip(&stopped)
                .filter(|&(&t, &s)| !s && !gone(t))
                .map(|(&t, _)| (thread_name(t), blocks_signal(t)))
                .collect();
            return Err(StopError::NotStopped(late));
        }
        // Every listed thread that still exists is parked: any other is one
        // created since the listing. Count them (this thread included).
        let parked = RECORDS[..tids.len()]
            .iter()
            // Relaxed: after the Acquire loads above.
            .filter(|r| r.arrived.load(Ordering::Relaxed) == round)
            .count();
        if count.now() != Some(parked + 1) {
            drop(guard);
            if start.elapsed() > deadline {
                return Err(StopError::Io(
                    "threads kept being created or exiting during the stop".into(),
                ));
            }
            continue;
        }
        // Relaxed: stored when the handler was installed, under STOP.
        let restorer = RESTORER.load(Ordering::Relaxed);
        let mut buf = [0u8; 4096];
        for (i, r) in RECORDS[..tids.len()].iter().enumerate() {
            // Relaxed: after the Acquire load of `arrived`; an exited thread
            // reads 0, which no check refuses.
            ips.push((i, r.ip.load(Ordering::Relaxed)));
            // Relaxed: as above.
            let sp = r.sp.load(Ordering::Relaxed);
            if sp != 0 && restorer != 0 {
                saved_frames(sp, restorer, &mut buf, |ip, _, _| {
                    if ips.len() < ips.capacity() {
                        ips.push((i, ip));
                    }
                    true
                });
            }
        }
        match check(&ips) {
            Ok(()) => {
                let result = (write.take().expect("written once"))();
                let pause = paused.elapsed();
                drop(guard);
                // This thread runs the written code only after it returns:
                // it serialises after the release, not while others wait.
                serialise();
                result.map_err(|e| StopError::Write(e.to_string()))?;
                return Ok(StopStats {
                    rounds,
                    threads: tids.len(),
                    pause,
                });
            }
            Err((i, ip)) => {
                drop(guard);
                busy = Some((tids[i], ip));
                if start.elapsed() + retry > deadline {
                    return Err(StopError::Busy(thread_name(tids[i]), ip));
                }
                std::thread::sleep(retry);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static DISTANCE: AtomicUsize = AtomicUsize::new(0);

    extern "C" fn measure(_: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
        // Relaxed: read by the same thread after the signal.
        DISTANCE.store(
            (info as usize).wrapping_sub(context as usize),
            Ordering::Relaxed,
        );
    }

    /// The kernel places a handler's `siginfo` `SIGINFO - 8` bytes after
    /// its `ucontext` (both in the frame, after the return address word),
    /// which the frame search reads in other threads' frames.
    #[test]
    fn siginfo_follows_the_ucontext() {
        let sig = libc::SIGRTMIN() + 3;
        // SAFETY: a handler for a signal nothing else in this test binary
        // uses, then that signal sent to this thread.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = measure as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO;
            assert_eq!(libc::sigaction(sig, &action, std::ptr::null_mut()), 0);
            assert_eq!(
                libc::syscall(libc::SYS_tgkill, libc::getpid(), gettid(), sig),
                0
            );
        }
        // Relaxed: stored by this thread's handler.
        assert_eq!(DISTANCE.load(Ordering::Relaxed), SIGINFO - 8);
    }
}
