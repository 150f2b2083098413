//! What the breakpoint protocol needs from the process: a `SIGTRAP`
//! handler that sends a thread which executed the `int3` at a hooked
//! function's entry to that hook's stub, core serialisation of every
//! thread (`membarrier`), and the checks that decide whether the protocol
//! can run here (`mod.rs`, "The write", has the protocol).
//!
//! # The trap table
//!
//! `TRAPS` maps a function's entry `f` to its hook's stub. Entries are
//! appended under the hook table's lock (one writer) before the first
//! `int3` is written at `f`, and never removed or changed: a function's
//! chunk (its stub) is made once and reused by every later install, and
//! chunks are never unmapped (`near.rs`), so a thread whose `SIGTRAP`
//! handler runs long after its trap (it was preempted between the trap
//! and the handler, and the entry was rewritten since) is still sent to a
//! stub that exists, and the stub jumps through the slot: where the slot
//! points *now*. The handler reads the table without a lock (a count
//! published with Release after the entries).
//!
//! # Traps that are not ours
//!
//! A trap is ours when the kernel raised it for an `int3`
//! (`si_code == SI_KERNEL`) and the byte before the interrupted `rip` is
//! the entry of a function of the table. Any other `SIGTRAP` goes where it
//! went before hotpatch installed its handler (saved then): the previous
//! handler is called with the same arguments; under `SIG_DFL` the default
//! action is restored and the signal raised again, so the process ends
//! (with a core dump) as it would have; under `SIG_IGN` a signal another
//! process or thread sent is ignored, and one the kernel raised (an
//! `int3`, a single step) ends the process as the default action, as the
//! kernel does for a trap while `SIGTRAP` is ignored. The previous
//! action's mask and its flags other than `SA_SIGINFO` are not
//! reproduced.

use std::mem::MaybeUninit;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicUsize, Ordering};

/// Functions the trap table holds; more hooked functions than this and
/// the next operations use the stop-the-world.
pub(crate) const MAX_TRAPS: usize = 8192;

/// `si_code` of a signal the kernel raised itself (an `int3` on x86-64).
const SI_KERNEL: libc::c_int = 0x80;

const MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE: libc::c_int = 1 << 5;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE: libc::c_int = 1 << 6;

struct Trap {
    at: AtomicUsize,
    stub: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Trap = Trap {
    at: AtomicUsize::new(0),
    stub: AtomicUsize::new(0),
};

static TRAPS: [Trap; MAX_TRAPS] = [EMPTY; MAX_TRAPS];
/// Entries of `TRAPS` valid for the handler.
static COUNT: AtomicUsize = AtomicUsize::new(0);

/// The action `SIGTRAP` had before ours: its handler (or `SIG_DFL`,
/// `SIG_IGN`) and flags.
/// Calls sent to a stub by the handler (`hook::traps`).
pub(crate) static TRAPPED: AtomicU64 = AtomicU64::new(0);

static PREVIOUS: AtomicUsize = AtomicUsize::new(libc::SIG_DFL);
static PREVIOUS_FLAGS: AtomicI32 = AtomicI32::new(0);

/// The stub of the hook whose entry is `at`, if `at` is a hooked (or once
/// hooked) function's entry. Async-signal-safe: atomics only.
pub(crate) fn stub_of(at: usize) -> Option<usize> {
    // Acquire: pairs with the Release store in `add`: the entries below
    // the count are written.
    let n = COUNT.load(Ordering::Acquire).min(MAX_TRAPS);
    TRAPS[..n]
        .iter()
        // Relaxed: written before the count was published.
        .find(|t| t.at.load(Ordering::Relaxed) == at)
        // Relaxed: as above.
        .map(|t| t.stub.load(Ordering::Relaxed))
}

/// Records that a trap at `at` goes to `stub`. The caller holds the hook
/// table's lock (one writer) and writes no `int3` at `at` before this
/// returns true. False when the table is full.
pub(crate) fn add(at: usize, stub: usize) -> bool {
    if let Some(known) = stub_of(at) {
        debug_assert_eq!(known, stub, "a function's stub never changes");
        return true;
    }
    // Relaxed: only this writer (under the hook table's lock) stores it.
    let n = COUNT.load(Ordering::Relaxed);
    if n >= MAX_TRAPS {
        return false;
    }
    // Relaxed: published by the Release store of the count below.
    TRAPS[n].at.store(at, Ordering::Relaxed);
    // Relaxed: as above.
    TRAPS[n].stub.store(stub, Ordering::Relaxed);
    // Release: a handler that sees the new count sees the entry.
    COUNT.store(n + 1, Ordering::Release);
    true
}

/// Whether the trap table has room for `more` functions not in it yet.
pub(crate) fn room_for(new: impl IntoIterator<Item = usize>) -> bool {
    // Relaxed: read by the one writer.
    let n = COUNT.load(Ordering::Relaxed);
    n + new.into_iter().filter(|&at| stub_of(at).is_none()).count() <= MAX_TRAPS
}

/// Whether a signal frame with this `siginfo` and saved `rip` is a trap
/// at a hooked entry, which the `SIGTRAP` handler sends to the stub (so
/// the thread will not resume at `rip`).
pub(crate) fn is_redirected(signo: i32, code: i32, rip: usize) -> bool {
    signo == libc::SIGTRAP && code == SI_KERNEL && stub_of(rip.wrapping_sub(1)).is_some()
}

extern "C" fn on_trap(sig: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let code = unsafe { (*info).si_code };
    // SAFETY: and a `ucontext_t`, ours to change before we return.
    let context_ref = unsafe { &mut *context.cast::<libc::ucontext_t>() };
    let rip = context_ref.uc_mcontext.gregs[libc::REG_RIP as usize] as usize;
    if code == SI_KERNEL
        && let Some(stub) = stub_of(rip.wrapping_sub(1))
    {
        // The thread executed the `int3` at a hooked entry: it is at the
        // function's entry, as if the jump had run; the stub goes where the
        // slot says (r11, which the stub overwrites, is no argument).
        context_ref.uc_mcontext.gregs[libc::REG_RIP as usize] = stub as libc::greg_t;
        // Relaxed: a counter.
        TRAPPED.fetch_add(1, Ordering::Relaxed);
        return;
    }
    chain(sig, info, context, code);
}

/// Passes a `SIGTRAP` that is not ours on as the previous action would
/// have taken it.
fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void, code: i32) {
    // Acquire: pairs with the Release store before our handler was
    // installed.
    let previous = PREVIOUS.load(Ordering::Acquire);
    // Relaxed: published with PREVIOUS.
    let flags = PREVIOUS_FLAGS.load(Ordering::Relaxed);
    let kernel_raised = code > 0;
    match previous {
        libc::SIG_IGN if !kernel_raised => {}
        libc::SIG_DFL | libc::SIG_IGN => die_by_default(sig),
        handler if flags & libc::SA_SIGINFO != 0 => {
            // SAFETY: the previous action's handler, installed with
            // SA_SIGINFO, called as the kernel would have.
            let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                unsafe { std::mem::transmute(handler) };
            f(sig, info, context);
        }
        handler => {
            // SAFETY: the previous action's handler, called as the kernel
            // would have.
            let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(handler) };
            f(sig);
        }
    }
}

/// Restores the default action and raises the signal again: it is
/// delivered when the handler returns (the signal is blocked until then),
/// and ends the process as it would have ended without our handler.
fn die_by_default(sig: libc::c_int) {
    // SAFETY: errno is thread-local.
    let errno = unsafe { *libc::__errno_location() };
    // SAFETY: a zeroed sigaction is SIG_DFL with no flags and an empty mask.
    let default: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: sigaction and tgkill are async-signal-safe; the signal is
    // sent to this thread.
    unsafe {
        libc::sigaction(sig, &default, std::ptr::null_mut());
        libc::syscall(
            libc::SYS_tgkill,
            libc::getpid(),
            libc::syscall(libc::SYS_gettid),
            sig,
        );
        *libc::__errno_location() = errno;
    }
}

/// Why the breakpoint protocol cannot run in this process now (the
/// stop-the-world runs instead).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fallback {
    /// [`Options::stop_the_world`](super::Options::stop_the_world) was
    /// set, or `HOTPATCH_HOOK_PROTOCOL=stop-the-world`.
    Forced,
    /// `membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE)`
    /// failed with this `errno` (`ENOSYS`: a kernel without it; `EINVAL`:
    /// not supported; `EPERM`: a seccomp profile denies it).
    Membarrier(i32),
    /// A debugger (this process id) traces the process: it would take
    /// the `int3` as its own `SIGTRAP` stop.
    Traced(i32),
    /// `SIGTRAP`'s handler is not hotpatch's any more (the program
    /// installed another one after hotpatch's first breakpoint write).
    TrapHandler,
    /// Installing the `SIGTRAP` handler failed (`errno`).
    Sigaction(i32),
    /// More hooked functions than the trap table holds
    /// (8192), or more entries in one operation than the sampling checks.
    TooManyEntries,
}

impl std::fmt::Display for Fallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fallback::Forced => write!(f, "the stop-the-world was asked for"),
            Fallback::Membarrier(e) => write!(
                f,
                "membarrier(REGISTER_PRIVATE_EXPEDITED_SYNC_CORE) failed: {}",
                std::io::Error::from_raw_os_error(*e)
            ),
            Fallback::Traced(pid) => write!(
                f,
                "process {pid} traces this one (a debugger would take the int3 as its own stop)"
            ),
            Fallback::TrapHandler => {
                write!(f, "SIGTRAP has another handler, installed after hotpatch's")
            }
            Fallback::Sigaction(e) => write!(
                f,
                "installing the SIGTRAP handler failed: {}",
                std::io::Error::from_raw_os_error(*e)
            ),
            Fallback::TooManyEntries => {
                write!(f, "more hooked functions than the trap table holds")
            }
        }
    }
}

/// Registers this process for core-serialising membarriers, once.
fn registered() -> Result<(), Fallback> {
    static REGISTERED: OnceLock<Result<(), i32>> = OnceLock::new();
    (*REGISTERED.get_or_init(|| {
        // SAFETY: a membarrier registration: no memory is passed.
        let r = unsafe {
            libc::syscall(
                libc::SYS_membarrier,
                MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE,
                0,
                0,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::ENOSYS))
        }
    }))
    .map_err(Fallback::Membarrier)
}

/// Makes every thread of the process execute a core-serialising
/// instruction before it runs user code again (Intel SDM vol. 3, 8.1.3),
/// this one included. Async-signal-safe; allocates nothing.
pub(crate) fn sync_cores() -> std::io::Result<()> {
    // SAFETY: the process registered for this command (`registered`, before
    // any breakpoint write); no memory is passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_membarrier,
            MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE,
            0,
            0,
        )
    };
    // The caller's own return from the system call is not serialising.
    let _ = std::arch::x86_64::__cpuid(0);
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The tracer of this process (`TracerPid` of `/proc/self/status`), 0 if
/// none.
fn tracer() -> i32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("TracerPid:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

fn action_now() -> Result<libc::sigaction, i32> {
    let mut now = MaybeUninit::<libc::sigaction>::zeroed();
    // SAFETY: querying the current action into valid memory.
    if unsafe { libc::sigaction(libc::SIGTRAP, std::ptr::null(), now.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EINVAL));
    }
    // SAFETY: initialised by the successful call.
    Ok(unsafe { now.assume_init() })
}

/// Installs the `SIGTRAP` handler once, saving the action it replaces.
fn handler_installed() -> Result<(), Fallback> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    (*INSTALLED.get_or_init(|| {
        let previous = action_now()?;
        // Relaxed: published by the Release store of PREVIOUS.
        PREVIOUS_FLAGS.store(previous.sa_flags, Ordering::Relaxed);
        // Release: a handler that loads it (Acquire) sees the flags.
        PREVIOUS.store(previous.sa_sigaction, Ordering::Release);
        // SAFETY: a zeroed sigaction is a valid starting point.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_trap as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_RESTART;
        // The stop signal waits until this handler has returned (the
        // thread is then at the stub): its handler never runs on top of
        // this one, on the same small signal stack, and never finds a
        // thread between its trap and its redirection.
        // SAFETY: initialising the mask of the action we own.
        unsafe {
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaddset(&mut action.sa_mask, super::stop::signal());
        }
        // SAFETY: a valid action whose handler is async-signal-safe (atomics;
        // sigaction and tgkill on the default path).
        if unsafe { libc::sigaction(libc::SIGTRAP, &action, std::ptr::null_mut()) } != 0 {
            return Err(std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EINVAL));
        }
        Ok(())
    }))
    .map_err(Fallback::Sigaction)?;
    match action_now() {
        Ok(now) if now.sa_sigaction == on_trap as *const () as usize => Ok(()),
        Ok(_) => Err(Fallback::TrapHandler),
        Err(e) => Err(Fallback::Sigaction(e)),
    }
}

/// Whether the breakpoint protocol can run now: the process is registered
/// for core-serialising membarriers, not traced, and `SIGTRAP` is ours
/// (installed the first time).
pub(crate) fn available() -> Result<(), Fallback> {
    registered()?;
    let pid = tracer();
    if pid != 0 {
        return Err(Fallback::Traced(pid));
    }
    handler_installed()
}
