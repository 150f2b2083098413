//! Entry redirection ("hooking"): any function of the executable, marked
//! `#[patchable]` or not, routed through a slot.
//!
//! A function that was not marked in advance has no slot on its call
//! path. [`install`] gives it one: its first instructions (at least five
//! bytes, whole instructions) are replaced by a `jmp rel32` to a *stub*,
//! `movabs $slot, %r11; jmp *(%r11)`, through a runtime-owned
//! [`Slot`].
//! The slot first points at the *trampoline*: the replaced instructions,
//! re-encoded at their new address (a `rip`-relative operand gets a new
//! displacement), then a jump back to the rest of the function. So right
//! after `install` every call runs the original code; [`Hook::redirect`]
//! points the slot at a replacement, and [`Hook::original`] keeps the
//! original callable. After the one-time entry write every change is a
//! store into the slot, like a `#[patchable]` function's. [`Hook::unhook`]
//! writes the original bytes back.
//!
//! ```
//! use std::hint::black_box;
//!
//! #[inline(never)]
//! fn price(qty: u64) -> u64 {
//!     qty ^ 0xff // the bug
//! }
//! fn fixed(qty: u64) -> u64 {
//!     qty ^ 0x0f
//! }
//!
//! # fn main() -> Result<(), hotpatch::Error> {
//! # if !cfg!(all(target_arch = "x86_64", target_os = "linux")) { return Ok(()) }
//! let price_fn: fn(u64) -> u64 = black_box(price);
//! let hook = hotpatch::hook::install(&hotpatch::hook::Target::of(price as *const ())?)?;
//! assert_eq!(price_fn(2), 0xfd, "installed: the original still runs");
//! // SAFETY: `fixed` has exactly `price`'s signature and ABI.
//! unsafe { hook.redirect(fixed as *const ())? };
//! assert_eq!(price_fn(2), 0x0d);
//! hook.unhook()?;
//! assert_eq!(price_fn(2), 0xfd);
//! # Ok(()) }
//! ```
//!
//! # Which functions
//!
//! Decided from the function's machine code (the executable's `.symtab`
//! gives its address and length; [`Target::check`] says it without
//! changing anything). Refused, with [`Reason::Ineligible`] naming the
//! instruction: a function shorter than five bytes; a call, branch,
//! return, interrupt or system call among the replaced instructions; any
//! branch of the function into the replaced bytes other than their first
//! byte (a loop whose head is at `f + 2`); bytes that do not decode. Not
//! visible in the code, and so not checked: an indirect jump through a
//! table into the replaced bytes (compilers place switch targets after
//! the entry) and a branch from *another* function into them; the write
//! below still refuses while a thread is seen there.
//!
//! # The write, and what it needs from the system
//!
//! The entry `f` has `len >= 5` bytes of whole instructions `O`; the jump
//! `J` (`jmp rel32` to the stub) replaces its first five. Everything that
//! does not touch the entry is done first: the decode, the stub and the
//! trampoline (written and seen by no thread yet), the jump, the write
//! path probed by writing back the bytes already there. Then, by default,
//! the *breakpoint protocol* (the order Linux's `text_poke_bp` uses for
//! the kernel's own code), for every entry of the operation at once:
//!
//! 1. `0xCC` (`int3`) is written at every `f`, then
//!    `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE)`: every
//!    thread of the process executes a serialising instruction before it
//!    runs user code again, as the Intel SDM (vol. 3, 8.1.3,
//!    cross-modifying code) requires of a processor executing code another
//!    one modified. From then on a thread that enters `f` executes the
//!    `int3`: the kernel raises `SIGTRAP`, and hotpatch's handler moves the
//!    thread to the hook's stub, which jumps through the slot (at the
//!    trampoline until a redirect: the original code), as the jump will.
//! 2. Install only: every thread, listed from `/proc/self/task` *after*
//!    the membarrier, is *sampled*: the stop signal ([`signal`],
//!    `SIGRTMAX-2`), whose
//!    handler records where the thread was interrupted, looks in the
//!    signal frames on its own stack (below) for a position saved by
//!    another handler, and returns at once. A thread found in
//!    `[f + 1, f + len)` is sampled again after [`Options::retry`], until
//!    none is or [`Options::deadline`]: then `O[0]` is written back at
//!    every `f` (membarrier), and the install refused with
//!    [`Reason::ThreadInside`] or [`Reason::NotStopped`], naming the
//!    thread, as before: nothing changed.
//! 3. `J[1..5)` at `f + 1`, membarrier.
//! 4. `J[0]` (`0xE9`) at `f`, membarrier. No thread was held: each was
//!    interrupted once, for its handler's run ([`Report::pause`]).
//!
//! Where the threads can be, and why it is safe. In step 1 a thread
//! fetching `f` executes either the original first instruction (the byte
//! is not written yet, or its core has not serialised) or the `int3`; no
//! other byte changed. After step 1 no thread can *enter*
//! `[f + 1, f + len)`: a call or a jump to `f` meets the `int3`; no branch
//! of the function targets those bytes (checked from the code, "Which
//! functions"), and no return address points into them (no call is among
//! them). A thread that was inside them before step 1 is still there or
//! has left, never to come back: step 2 waits until every thread listed
//! was seen outside once (a thread created later starts at `clone`'s
//! return, outside). So while step 3 writes the bytes after `f`, no thread
//! executes them, and every thread reaching `f` takes the `int3`, a single
//! byte that no step changes. Step 4 changes one byte, which a processor
//! fetches atomically: the `int3` (and the trap) or the complete jump
//! (written and serialised in step 3). A thread whose `SIGTRAP` handler
//! runs late (it trapped, was preempted, and the entry was written since)
//! is sent to the stub all the same: the table from entry to stub keeps
//! every function ever hooked for the life of the process (stubs are
//! never unmapped), and the stub goes where the slot says *now*.
//!
//! [`Hook::unhook`] writes `0xCC` at `f`, `O[1..5)` after it, `O[0]`,
//! each followed by a membarrier, and samples no thread: while the jump is
//! there no thread can be in `[f + 1, f + 5)` (a thread executing the jump
//! goes straight to the stub, and nothing else can reach those bytes, by
//! the same argument), so after the `int3` none can be there either. A
//! write that fails at any step is undone, steps in reverse order, each
//! with its membarrier: every entry is as it was (a write-back that fails
//! too is named in the error).
//!
//! The breakpoint protocol needs `membarrier` with
//! `MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE` (Linux 4.16;
//! registered once per process), and `SIGTRAP`: hotpatch installs its
//! handler at the first write (`SA_SIGINFO | SA_ONSTACK`) and passes any
//! trap that is not at a hooked entry on to the action it replaced (the
//! previous handler; under `SIG_DFL` the process ends by the signal, with
//! a core dump, as it would have). Where membarrier is refused (`ENOSYS`,
//! `EINVAL`, `EPERM` from a seccomp profile), where a debugger traces the
//! process (`TracerPid` in `/proc/self/status`: it would take the `int3`
//! as its own stop), where the program installed its own `SIGTRAP`
//! handler after hotpatch's, or when asked ([`Options::stop_the_world`],
//! or [`PROTOCOL_ENV`] set to `stop-the-world` for the whole process),
//! the *stop-the-world* runs instead, and [`Report::protocol`] says so
//! and why ([`Fallback`]):
//!
//! 1. each thread gets the stop signal; its handler, with every other
//!    signal blocked, records the interrupted instruction pointer and
//!    parks on a futex until every thread arrived;
//! 2. if a thread is inside `[f + 1, f + len)` the threads are released
//!    and the stop is tried again after [`Options::retry`], until
//!    [`Options::deadline`] (then [`Reason::ThreadInside`], naming it);
//! 3. the bytes are written, the threads released; each executes `cpuid`
//!    (serialising) before it resumes. Every thread was held from its
//!    arrival until the last one arrived and the write was done
//!    ([`Report::pause`]).
//!
//! The code is written through `/proc/self/mem` first, which leaves every
//! mapping's protection alone (it works under memory-deny-write-execute);
//! where that is refused, by making the page read-write-execute with
//! `mprotect` for the write and restoring it. Both work while other
//! threads execute the same page: the first write gives the process its
//! own copy of the page (copy-on-write) with the same bytes, the page
//! stays executable throughout, and the protocols above decide which
//! bytes a thread may execute while they change. Where neither works
//! (`PR_SET_MDWE` or systemd's `MemoryDenyWriteExecute=` *and* a sandbox
//! or `proc_mem.force_override=never` denying `/proc/self/mem`), install
//! is refused with [`Reason::WriteDenied`], which names the setting, and
//! nothing has changed. Threads that do not take the stop signal by the
//! deadline (sampled or stopped) are named, by tid and name, with whether
//! each blocks the signal ([`Reason::NotStopped`]). Stubs, trampolines
//! and slots live in memory mapped within +-2 GiB of the function, code
//! read-execute and slots read-only between operations; nothing is left
//! writable.
//!
//! # Limits
//!
//! - x86-64 Linux only.
//! - A thread that another signal's handler interrupted while it was
//!   inside the replaced bytes has its position in that handler's signal
//!   frame: the sampling handler (the stopping thread, under the
//!   stop-the-world) finds such frames on the thread's stack when the
//!   interrupted context had signals blocked, and then waits as for a
//!   thread inside the bytes. Not found: a handler installed with
//!   `SA_NODEFER` and an empty mask (nothing blocked while it runs), a
//!   handler with a restorer other than the C library's, a frame more
//!   than 256 KiB up the stack, and any frame where `process_vm_readv` is
//!   forbidden (some container seccomp profiles). Such a thread would
//!   resume in the middle of the jump.
//! - Each install interrupts every thread once (an unhook, under the
//!   breakpoint protocol, none): a system call the kernel does not restart
//!   after a handler (`epoll_wait`, `poll`, `nanosleep`, ...) returns
//!   `EINTR`, as with a profiler's signal. A call of the function during
//!   the breakpoint window ([`Report::window`]) takes the trap: a signal's
//!   delivery and return, microseconds instead of nanoseconds.
//! - A debugger attached to the process (`ptrace`) sees an `int3` of the
//!   breakpoint protocol as a `SIGTRAP` stop of the thread that hit it.
//!   Writes made while a tracer is attached use the stop-the-world; a
//!   debugger that attaches during a breakpoint window (microseconds to
//!   milliseconds) must pass the `SIGTRAP` on to the process (gdb:
//!   `handle SIGTRAP pass`, or `signal SIGTRAP` at that stop), or the
//!   thread resumes after the `int3`, in the middle of the entry.
//! - A process forked during a breakpoint window keeps the `int3` at the
//!   entry in the child (no write completes there): the child's calls of
//!   the function take the trap, to the slot's target at the fork, for
//!   the child's life.
//! - The program may install its own `SIGTRAP` handler before hotpatch's
//!   first write (it is chained), not after (the stop-the-world then
//!   runs, [`Fallback::TrapHandler`]); hotpatch's handler does not
//!   reproduce the previous action's mask or flags other than
//!   `SA_SIGINFO`.
//! - The signal `SIGRTMAX-2` must be free: if the program installed its
//!   own handler there, hooking is refused ([`Reason::Signal`]).
//! - A function inlined into its callers has no entry to redirect: hook
//!   the callers.
//! - Per-thread transitions ([`crate::quiescent`], request scopes): a
//!   hook's slot is a [`Slot`] and the runtime has one dispatcher for
//!   every hook (it saves the argument registers, asks the slot which
//!   implementation the calling thread runs, and jumps there). A patch's
//!   hooks ([`crate::load`]) switch with the patch's transition like any
//!   function; [`Hook::redirect`], used directly, switches every thread at
//!   once (each call old or new, never torn).

mod decode;
mod near;
mod stop;
mod symbols;
mod trap;
mod write;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

pub use decode::Ineligible;
pub use stop::ThreadName;
pub use trap::Fallback;
pub use write::{WriteDenied, WritePath};

use crate::Error;
use crate::slot::{FnAddr, Slot};
use near::Chunk;

/// Where a trampoline starts in a chunk (the stub is at 0).
const TRAMPOLINE: usize = 16;

// The dispatcher of every hook during a per-thread transition: entered
// from a stub with `r11` = the hook's slot, it saves every register that
// may carry an argument (rdi, rsi, rdx, rcx, r8, r9, rax for a variadic
// call's count, r10 for a static chain, xmm0-7), asks the slot which
// implementation this thread runs (`Slot::choose`: old or new by its
// universe or its request's), restores them and jumps there, so the
// implementation sees the call exactly as the stub received it (the
// stack pointer, the return address and any stack arguments unchanged).
// One dispatcher for every signature: it never reads the arguments.
std::arch::global_asm!(
    ".pushsection .text.__hotpatch_hook_dispatch,\"ax\",@progbits",
    ".p2align 4",
    // Global (another codegen unit names it), hidden (not exported).
    ".globl __hotpatch_hook_dispatch",
    ".hidden __hotpatch_hook_dispatch",
    ".type __hotpatch_hook_dispatch,@function",
    "__hotpatch_hook_dispatch:",
    // At entry rsp = 8 (mod 16); after rbp and 8 registers, 0; after 128, 0.
    "    push rbp",
    "    mov rbp, rsp",
    "    push rdi",
    "    push rsi",
    "    push rdx",
    "    push rcx",
    "    push r8",
    "    push r9",
    "    push rax",
    "    push r10",
    "    sub rsp, 128",
    "    movdqu [rsp], xmm0",
    "    movdqu [rsp + 16], xmm1",
    "    movdqu [rsp + 32], xmm2",
    "    movdqu [rsp + 48], xmm3",
    "    movdqu [rsp + 64], xmm4",
    "    movdqu [rsp + 80], xmm5",
    "    movdqu [rsp + 96], xmm6",
    "    movdqu [rsp + 112], xmm7",
    "    mov rdi, r11",
    "    call {choose}",
    "    mov r11, rax",
    "    movdqu xmm0, [rsp]",
    "    movdqu xmm1, [rsp + 16]",
    "    movdqu xmm2, [rsp + 32]",
    "    movdqu xmm3, [rsp + 48]",
    "    movdqu xmm4, [rsp + 64]",
    "    movdqu xmm5, [rsp + 80]",
    "    movdqu xmm6, [rsp + 96]",
    "    movdqu xmm7, [rsp + 112]",
    "    add rsp, 128",
    "    pop r10",
    "    pop rax",
    "    pop r9",
    "    pop r8",
    "    pop rcx",
    "    pop rdx",
    "    pop rsi",
    "    pop rdi",
    "    pop rbp",
    "    jmp r11",
    ".size __hotpatch_hook_dispatch, . - __hotpatch_hook_dispatch",
    ".popsection",
    choose = sym choose,
);

unsafe extern "C" {
    fn __hotpatch_hook_dispatch();
}

/// The dispatcher of every hook, for a registry entry of a hooked
/// function (`Entry::dispatcher`): `Slot::begin_transition` points a hook's
/// slot at it.
pub(crate) fn dispatcher() -> FnAddr {
    FnAddr::new(__hotpatch_hook_dispatch as *const ())
}

/// What this process recorded of the function at `addr` if it was ever
/// hooked: its original entry bytes, and whether it is hooked now.
pub(crate) fn recorded(addr: usize) -> Option<(Vec<u8>, bool)> {
    let hooks = HOOKS.lock().unwrap_or_else(PoisonError::into_inner);
    hooks
        .as_ref()?
        .get(&addr)
        .map(|s| (s.original.clone(), s.installed))
}

/// Whether `addr` is a hook slot (in an arena's slot pages), which only a
/// write window opens.
pub(crate) fn owns_slot(addr: usize) -> bool {
    near::owns_slot(addr)
}

/// What the dispatcher asks: the implementation the calling thread runs.
extern "C" fn choose(slot: &Slot) -> *const () {
    slot.choose()
}

/// Why a hook could not be installed or removed. Whatever it says, the
/// function's code and its slot are as they were.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reason {
    /// No function of this name or at this address in the executable's
    /// symbol table.
    NotFound {
        /// What was looked for and where.
        detail: String,
    },
    /// Several functions have this name: name the symbol instead.
    Ambiguous {
        /// Their symbols.
        symbols: Vec<String>,
    },
    /// The function's code does not allow redirecting its entry.
    Ineligible(Ineligible),
    /// No memory could be mapped within +-2 GiB of the function, or a
    /// trampoline instruction cannot be encoded there.
    NoNearMemory {
        /// What failed.
        detail: String,
    },
    /// Threads that did not take the stop signal by the deadline (to be
    /// sampled or stopped; `true`: it blocks the signal now).
    NotStopped(Vec<(ThreadName, bool)>),
    /// A thread was inside the bytes to be written at every try until the
    /// deadline.
    ThreadInside {
        /// The thread.
        thread: ThreadName,
        /// Its instruction pointer's offset from the function's start.
        offset: usize,
    },
    /// This process may not write code.
    WriteDenied(WriteDenied),
    /// The write itself failed (the probe had succeeded); what was
    /// written is put back.
    WriteFailed {
        /// The error.
        detail: String,
    },
    /// The write failed, and so did putting back what was there: an
    /// entry may hold bytes of neither version (the only reason after
    /// which something changed; see [`Reason::changed_nothing`]).
    NotRestored {
        /// The errors, the write's first.
        detail: String,
    },
    /// The entry bytes are not those expected ([`Options::expect_entry`]),
    /// or not those recorded when the function was first hooked
    /// (something else rewrote them).
    EntryChanged {
        /// Recorded.
        expected: Vec<u8>,
        /// Found.
        found: Vec<u8>,
    },
    /// The function is hooked already.
    AlreadyHooked,
    /// The hook was removed already.
    NotHooked,
    /// The stop signal cannot be used.
    Signal(String),
    /// Listing or signalling the threads failed, or there were too many.
    Threads(String),
    /// Storing into the hook's slot failed (its page could not be made
    /// writable).
    Slot(String),
    /// Other functions start at the same address: the compiler merged
    /// identical bodies, and redirecting one would redirect them too.
    Merged {
        /// The other functions, as their symbols name them.
        others: Vec<String>,
    },
}

impl Reason {
    /// Whether the operation refused for this reason left every entry,
    /// slot and record as it was: always, except [`Reason::NotRestored`].
    ///
    /// ```
    /// use hotpatch::hook::Reason;
    ///
    /// assert!(Reason::NotHooked.changed_nothing());
    /// ```
    pub fn changed_nothing(&self) -> bool {
        !matches!(self, Reason::NotRestored { .. })
    }

    /// How an error states the outcome: `nothing changed`, or what may
    /// have.
    pub(crate) fn outcome(&self) -> &'static str {
        match self.changed_nothing() {
            true => "nothing changed",
            false => {
                "AND ITS ENTRY MAY HOLD BYTES OF NEITHER VERSION (do not call it; restart the process)"
            }
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::NotFound { detail } => write!(f, "not found: {detail}"),
            Reason::Ambiguous { symbols } => {
                write!(
                    f,
                    "{} functions have this name: {}",
                    symbols.len(),
                    symbols.join(", ")
                )
            }
            Reason::Ineligible(why) => write!(f, "{why}"),
            Reason::NoNearMemory { detail } => write!(f, "{detail}"),
            Reason::NotStopped(threads) => {
                write!(
                    f,
                    "threads did not take the stop signal before the deadline:"
                )?;
                for (t, blocks) in threads {
                    write!(f, " {t}")?;
                    if *blocks {
                        write!(f, " (blocks signal {}, SIGRTMAX-2)", signal())?;
                    }
                }
                Ok(())
            }
            Reason::ThreadInside { thread, offset } => write!(
                f,
                "{thread} was executing the bytes to be replaced (at +{offset:#x}) at every try \
                 until the deadline"
            ),
            Reason::WriteDenied(d) => write!(f, "{d}"),
            Reason::WriteFailed { detail } => write!(f, "writing the entry failed: {detail}"),
            Reason::NotRestored { detail } => write!(
                f,
                "writing the entry failed, and putting back what was there failed too: {detail}"
            ),
            Reason::EntryChanged { expected, found } => write!(
                f,
                "its entry bytes are not the expected ones (expected {expected:02x?}, found \
                 {found:02x?}): this is not the code the hook was made for"
            ),
            Reason::AlreadyHooked => write!(f, "it is hooked already"),
            Reason::NotHooked => write!(f, "it is not hooked"),
            Reason::Signal(s) => write!(f, "{s}"),
            Reason::Threads(s) => write!(f, "{s}"),
            Reason::Slot(s) => write!(f, "cannot store into its slot: {s}"),
            Reason::Merged { others } => write!(
                f,
                "its code is also {} (the compiler merged identical functions): redirecting it \
                 would change them too",
                others.join(", ")
            ),
        }
    }
}

fn refused(op: &'static str, function: &str, reason: Reason) -> Error {
    Error::Hook {
        op,
        function: function.to_owned(),
        reason,
    }
}

/// A function of this executable: its name, address and length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    name: String,
    addr: usize,
    len: usize,
}

impl Target {
    /// The function at `function` (its first byte), from the executable's
    /// symbol table.
    ///
    /// # Errors
    ///
    /// [`Error::Hook`] with [`Reason::NotFound`]: no function starts
    /// there, or the executable has no symbol table.
    ///
    /// # Examples
    ///
    /// ```
    /// #[inline(never)]
    /// fn answer() -> u32 { std::hint::black_box(42) }
    /// # fn main() {
    /// # if !cfg!(all(target_arch = "x86_64", target_os = "linux")) { return }
    /// let target = hotpatch::hook::Target::of(answer as *const ()).unwrap();
    /// assert!(target.name().ends_with("answer"));
    /// # }
    /// ```
    pub fn of(function: *const ()) -> Result<Target, Error> {
        let addr = function as usize;
        let name = format!("{function:p}");
        let f = symbols::containing(addr)
            .map_err(|detail| refused("hook", &name, Reason::NotFound { detail }))?
            .filter(|f| f.addr == addr)
            .ok_or_else(|| {
                refused(
                    "hook",
                    &name,
                    Reason::NotFound {
                        detail: "no function of the executable's symbol table starts there".into(),
                    },
                )
            })?;
        Ok(Target {
            name: symbols::name_of(f),
            addr: f.addr,
            len: f.len,
        })
    }

    /// The function named `path` in the executable's symbol table: its
    /// symbol, or its demangled path without the hash
    /// (`my_service::db::Db::get`).
    ///
    /// # Errors
    ///
    /// [`Reason::NotFound`], or [`Reason::Ambiguous`] when several
    /// functions have that path (generic instantiations: name the symbol).
    ///
    /// # Examples
    ///
    /// ```
    /// # if cfg!(all(target_arch = "x86_64", target_os = "linux")) {
    /// let e = hotpatch::hook::Target::named("no::such::function").unwrap_err();
    /// assert!(e.to_string().contains("not found"), "{e}");
    /// # }
    /// ```
    pub fn named(path: &str) -> Result<Target, Error> {
        let found = symbols::named(path)
            .map_err(|detail| refused("hook", path, Reason::NotFound { detail }))?;
        match found.as_slice() {
            [f] => Ok(Target {
                name: symbols::name_of(f),
                addr: f.addr,
                len: f.len,
            }),
            [] => Err(refused(
                "hook",
                path,
                Reason::NotFound {
                    detail: "no function of that name in the executable's symbol table".into(),
                },
            )),
            many => Err(refused(
                "hook",
                path,
                Reason::Ambiguous {
                    symbols: many.iter().map(|f| f.symbol.clone()).collect(),
                },
            )),
        }
    }

    /// A function given by hand.
    ///
    /// # Safety
    ///
    /// `[addr, addr + len)` must be exactly one function's machine code,
    /// mapped and executable for the life of the process.
    pub unsafe fn from_raw_parts(name: impl Into<String>, addr: *const (), len: usize) -> Target {
        Target {
            name: name.into(),
            addr: addr as usize,
            len,
        }
    }

    /// Its name (demangled, without the hash).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its address.
    pub fn addr(&self) -> *const () {
        self.addr as *const ()
    }

    /// Its length in bytes.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn code(&self) -> &'static [u8] {
        // SAFETY: a Target is a function's code, mapped for the life of the
        // process (`of`/`named` read it from the executable's symbol table;
        // `from_raw_parts` is the caller's promise).
        unsafe { std::slice::from_raw_parts(self.addr as *const u8, self.len) }
    }

    /// The bytes the jump would replace, for [`Options::expect_entry`].
    ///
    /// # Errors
    ///
    /// As [`check`](Self::check).
    pub fn entry(&self) -> Result<Vec<u8>, Error> {
        decode::entry(self.code(), self.addr as u64)
            .map(|e| e.bytes)
            .map_err(|why| refused("hook", &self.name, Reason::Ineligible(why)))
    }

    /// Whether its entry can be redirected, from its code (nothing
    /// changes): the number of bytes the jump would replace.
    ///
    /// # Errors
    ///
    /// [`Reason::Ineligible`], naming the instruction.
    ///
    /// # Examples
    ///
    /// ```
    /// #[inline(never)]
    /// fn sum(n: u64) -> u64 { (0..std::hint::black_box(n)).map(|i| i * i).sum() }
    /// # fn main() {
    /// # if !cfg!(all(target_arch = "x86_64", target_os = "linux")) { return }
    /// match hotpatch::hook::Target::of(sum as *const ()).unwrap().check() {
    ///     Ok(bytes) => assert!(bytes >= 5),
    ///     Err(e) => println!("{e}"),
    /// }
    /// # }
    /// ```
    pub fn check(&self) -> Result<usize, Error> {
        decode::entry(self.code(), self.addr as u64)
            .map(|e| e.len)
            .map_err(|why| refused("hook", &self.name, Reason::Ineligible(why)))
    }
}

/// How the entry bytes were written (module docs, "The write").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Protocol {
    /// An `int3` at each entry first: no thread was held; each was
    /// interrupted once (install) or not at all (unhook).
    Breakpoint,
    /// Every other thread held in a signal handler during the write,
    /// because the breakpoint protocol could not run (why).
    StopTheWorld(Fallback),
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Protocol::Breakpoint => write!(f, "breakpoint"),
            Protocol::StopTheWorld(why) => write!(f, "stop-the-world ({why})"),
        }
    }
}

/// What one entry write took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Report {
    /// Which protocol wrote the bytes, and why not the breakpoint one
    /// when it did not.
    pub protocol: Protocol,
    /// Rounds of signals: stop rounds (stop-the-world: more than one when
    /// a thread was inside the bytes, or threads were created during the
    /// stop), or sampling rounds (breakpoint: more than one when a thread
    /// was inside the bytes; 0 for an unhook, which samples nothing).
    pub rounds: u32,
    /// Threads stopped in the last round (stop-the-world), or sampled in
    /// the first (breakpoint).
    pub threads: usize,
    /// The longest any thread was kept from running its own code.
    /// Stop-the-world: the last round, from its first signal to the
    /// release (every thread is held until the last one arrives).
    /// Breakpoint: the longest any thread ran the sampling handler, over
    /// every round (measured inside the handler: the kernel's delivery and
    /// return, about a microsecond each, are not counted); zero for an
    /// unhook.
    pub pause: Duration,
    /// Breakpoint: from the first `int3` written to the last byte written
    /// and seen by every core; a call of the function during it takes the
    /// trap (the `SIGTRAP` handler sends it to the stub). Zero for the
    /// stop-the-world.
    pub window: Duration,
    /// How the bytes were written.
    pub write_path: WritePath,
    /// Entries written by this one operation (several when one patch
    /// hooks several functions).
    pub entries: usize,
}

/// The environment variable that makes the stop-the-world the default
/// protocol of the process ([`Options::stop_the_world`]): set to
/// `stop-the-world`; any other value, or none, leaves the breakpoint
/// protocol first.
pub const PROTOCOL_ENV: &str = "HOTPATCH_HOOK_PROTOCOL";

fn stop_the_world_by_default() -> bool {
    static FORCED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FORCED.get_or_init(|| std::env::var_os(PROTOCOL_ENV).is_some_and(|v| v == "stop-the-world"))
}

/// How [`install`] and [`Hook::unhook`] write the entry and wait for the
/// threads.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Options {
    /// Give up (nothing changed) after this long. Default 1 s.
    pub deadline: Duration,
    /// Wait this long before another try when a thread is inside the
    /// bytes. Default 1 ms.
    pub retry: Duration,
    /// Only this way of writing code (default: `/proc/self/mem`, else
    /// `mprotect`).
    pub write_path: Option<WritePath>,
    /// The entry bytes the caller expects (what a patch recorded from the
    /// binary it was built for, [`Target::entry`]): other bytes are refused
    /// with [`Reason::EntryChanged`].
    pub expect_entry: Option<Vec<u8>>,
    /// Use the stop-the-world even where the breakpoint protocol can run
    /// (module docs, "The write"). Default false, or true when the
    /// environment variable [`PROTOCOL_ENV`] says `stop-the-world` (read
    /// once per process).
    pub stop_the_world: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            deadline: Duration::from_secs(1),
            retry: Duration::from_millis(1),
            write_path: None,
            expect_entry: None,
            stop_the_world: stop_the_world_by_default(),
        }
    }
}

impl Options {
    /// Sets the deadline.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// Sets the pause between tries.
    pub fn retry(mut self, retry: Duration) -> Self {
        self.retry = retry;
        self
    }

    /// Allows only `path` for writing code.
    pub fn write_path(mut self, path: WritePath) -> Self {
        self.write_path = Some(path);
        self
    }

    /// Refuses a function whose entry is not `bytes`.
    pub fn expect_entry(mut self, bytes: &[u8]) -> Self {
        self.expect_entry = Some(bytes.to_vec());
        self
    }

    /// Uses the stop-the-world (`true`) even where the breakpoint protocol
    /// can run, or not (`false`).
    ///
    /// # Examples
    ///
    /// ```
    /// use hotpatch::hook::{Fallback, Options, Protocol};
    ///
    /// #[inline(never)]
    /// fn fee(cents: u64) -> u64 { cents ^ 0x40 }
    /// # fn main() -> Result<(), hotpatch::Error> {
    /// # if !cfg!(all(target_arch = "x86_64", target_os = "linux")) { return Ok(()) }
    /// let target = hotpatch::hook::Target::of(fee as *const ())?;
    /// let hook = hotpatch::hook::install_with(&target, &Options::default().stop_the_world(true))?;
    /// assert_eq!(hook.report().protocol, Protocol::StopTheWorld(Fallback::Forced));
    /// hook.unhook()?;
    /// # Ok(()) }
    /// ```
    pub fn stop_the_world(mut self, on: bool) -> Self {
        self.stop_the_world = on;
        self
    }
}

/// Per hooked function, for the life of the process: its chunk (reused if
/// it is hooked again) and its original entry bytes.
struct State {
    chunk: Chunk,
    original: Vec<u8>,
    installed: bool,
    /// Counts installs: a [`Hook`] acts only on the install it was
    /// returned by (a stale handle cannot store into the slot of a later
    /// install, or remove it).
    generation: u64,
}

static HOOKS: Mutex<Option<HashMap<usize, State>>> = Mutex::new(None);

fn slot_at(chunk: &Chunk) -> &'static Slot {
    // SAFETY: the chunk's slot was initialised (`init_slot`) before any
    // State holding it was stored, and its memory is never unmapped.
    unsafe { &*(chunk.slot as *const Slot) }
}

fn store_slot(chunk: &Chunk, to: usize) -> Result<(), String> {
    let window = crate::slot::write_window_pages([(chunk.slot, size_of::<Slot>())])
        .map_err(|e| e.to_string())?;
    slot_at(chunk).set(FnAddr::new(to as *const ()));
    drop(window);
    Ok(())
}

fn init_slot(chunk: &Chunk, to: usize) -> Result<(), String> {
    let window = crate::slot::write_window_pages([(chunk.slot, size_of::<Slot>())])
        .map_err(|e| e.to_string())?;
    // SAFETY: the slot's memory is ours, aligned (chunks are 128 bytes
    // apart on a page boundary), writable while the window is open, and no
    // one reads it yet.
    unsafe { std::ptr::write(chunk.slot as *mut Slot, Slot::new(to as *const ())) };
    drop(window);
    Ok(())
}

/// Maps a chunk near `target` and writes its stub and trampoline.
fn new_chunk(
    target: &Target,
    entry: &decode::Entry,
    force: Option<WritePath>,
) -> Result<Chunk, Reason> {
    let chunk = near::chunk_near(target.addr).ok_or_else(|| Reason::NoNearMemory {
        detail: format!(
            "no memory could be mapped within 2 GiB of {:#x} for the trampoline",
            target.addr
        ),
    })?;
    let tramp_at = chunk.code + TRAMPOLINE;
    let trampoline = entry
        .trampoline(tramp_at as u64, (target.addr + entry.len) as u64)
        .map_err(|detail| Reason::NoNearMemory { detail })?;
    let stub = decode::stub(chunk.slot as u64);
    let mut code = vec![0xcc; near::CHUNK];
    code[..stub.len()].copy_from_slice(&stub);
    code[TRAMPOLINE..TRAMPOLINE + trampoline.len()].copy_from_slice(&trampoline);
    // No thread runs this chunk until the entry leads to it: the jump,
    // written later and followed by a core serialisation of every thread
    // (a membarrier, or the stop's release), or the breakpoint protocol's
    // int3, whose trap enters the SIGTRAP handler through the kernel's
    // exception return (IRET, serialising) before the stub runs.
    let (writer, pages) =
        write::CodeWriter::probe(chunk.code, near::CHUNK, force).map_err(Reason::WriteDenied)?;
    writer
        .write(chunk.code, &code, &pages)
        .map_err(|e| Reason::WriteFailed {
            detail: e.to_string(),
        })?;
    init_slot(&chunk, tramp_at).map_err(Reason::Slot)?;
    Ok(chunk)
}

/// Redirects `target`'s entry to a slot that first points at its
/// original code (so calls behave as before), with the default
/// [`Options`] (the breakpoint protocol where the process allows it, else
/// the stop-the-world: module docs, "The write").
///
/// # Errors
///
/// [`Error::Hook`] with the [`Reason`]; the function is unchanged.
///
/// # Examples
///
/// See the [module documentation](self).
pub fn install(target: &Target) -> Result<Hook, Error> {
    install_with(target, &Options::default())
}

/// [`install`] with `options`.
///
/// # Errors
///
/// As [`install`].
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use hotpatch::hook::{self, Options, Reason, Target};
///
/// #[inline(never)]
/// fn tax(cents: u64) -> u64 { cents ^ 0x20 }
/// # fn main() -> Result<(), hotpatch::Error> {
/// # if !cfg!(all(target_arch = "x86_64", target_os = "linux")) { return Ok(()) }
/// let target = Target::of(tax as *const ())?;
/// let options = Options::default()
///     .deadline(Duration::from_millis(200)) // give up sooner than 1 s
///     .expect_entry(&target.entry()?); // what a patch would have recorded
/// match hook::install_with(&target, &options) {
///     Ok(hook) => {
///         let r = hook.report();
///         println!("{}: {} threads, none kept more than {:?}", r.protocol, r.threads, r.pause);
///         hook.unhook()?;
///     }
///     Err(hotpatch::Error::Hook { reason: Reason::NotStopped(threads), .. }) => {
///         eprintln!("these threads did not take the stop signal: {threads:?}")
///     }
///     Err(e) => return Err(e),
/// }
/// # Ok(()) }
/// ```
pub fn install_with(target: &Target, options: &Options) -> Result<Hook, Error> {
    let mut hooks = install_all(std::slice::from_ref(target), options)?;
    Ok(hooks.pop().expect("one hook per target"))
}

/// [`install_with`] for several functions at once: every entry is written
/// by ONE operation (one sampling of the threads, or one stop: a patch
/// that hooks N functions interrupts each thread once, not N times), or
/// none is. `options.expect_entry`, if
/// set, is checked against each target.
///
/// # Errors
///
/// [`Error::Hook`] naming the first function refused, with the
/// [`Reason`]; no entry has changed.
pub(crate) fn install_all(targets: &[Target], options: &Options) -> Result<Vec<Hook>, Error> {
    let mut hooks = HOOKS.lock().unwrap_or_else(PoisonError::into_inner);
    let hooks = hooks.get_or_insert_with(HashMap::new);
    // Everything that does not touch the entry, before it is written:
    // the decode, the chunk (mapped and written), the jump, the write
    // path (probed by writing back the bytes there now).
    let mut writes = Vec::with_capacity(targets.len());
    for (i, target) in targets.iter().enumerate() {
        let fail = |reason| refused("hook", &target.name, reason);
        if targets[..i].iter().any(|t| t.addr == target.addr) {
            return Err(fail(Reason::AlreadyHooked));
        }
        let (chunk, entry) = prepare(hooks, target, options).map_err(fail)?;
        let jump = decode::jmp_rel32(target.addr as u64, chunk.code as u64)
            .map_err(|detail| fail(Reason::NoNearMemory { detail }))?;
        let original = entry.bytes[..jump.len()].to_vec();
        writes.push(
            EntryWrite::probe(target, &chunk, entry.len, jump.to_vec(), original, options)
                .map_err(fail)?,
        );
    }
    let report = write_entries(&writes, options, true)
        .map_err(|(i, reason)| refused("hook", &targets[i].name, reason))?;
    Ok(targets
        .iter()
        .map(|target| {
            let state = hooks.get_mut(&target.addr).expect("recorded by prepare");
            state.installed = true;
            state.generation += 1;
            Hook {
                target: target.clone(),
                chunk: state.chunk,
                report,
                options: options.clone(),
                generation: state.generation,
            }
        })
        .collect())
}

/// Checks `target` and gives it a chunk whose slot points at the original
/// code (a new one, recorded as not installed, or the one from an earlier
/// install). Nothing is written at the entry.
fn prepare(
    hooks: &mut HashMap<usize, State>,
    target: &Target,
    options: &Options,
) -> Result<(Chunk, decode::Entry), Reason> {
    if hooks.get(&target.addr).is_some_and(|s| s.installed) {
        return Err(Reason::AlreadyHooked);
    }
    let entry = decode::entry(target.code(), target.addr as u64).map_err(Reason::Ineligible)?;
    if let Some(expected) = &options.expect_entry
        && *expected != entry.bytes
    {
        return Err(Reason::EntryChanged {
            expected: expected.clone(),
            found: entry.bytes.clone(),
        });
    }
    let chunk = match hooks.get(&target.addr) {
        Some(state) => {
            if state.original != entry.bytes {
                return Err(Reason::EntryChanged {
                    expected: state.original.clone(),
                    found: entry.bytes.clone(),
                });
            }
            // Calls through a stub left from before run the original until
            // the entry is written again.
            store_slot(&state.chunk, state.chunk.code + TRAMPOLINE).map_err(Reason::Slot)?;
            state.chunk
        }
        None => {
            let chunk = new_chunk(target, &entry, options.write_path)?;
            hooks.insert(
                target.addr,
                State {
                    chunk,
                    original: entry.bytes.clone(),
                    installed: false,
                    generation: 0,
                },
            );
            chunk
        }
    };
    Ok((chunk, entry))
}

/// One entry to write: `bytes` at `addr` where `original` is now,
/// refused while a thread is in `(addr, addr + busy)`; its way of writing
/// probed; `stub` where a trap at `addr` is sent (the breakpoint
/// protocol).
struct EntryWrite {
    addr: usize,
    busy: usize,
    stub: usize,
    bytes: Vec<u8>,
    original: Vec<u8>,
    writer: write::CodeWriter,
    pages: write::Pages,
}

impl EntryWrite {
    fn probe(
        target: &Target,
        chunk: &Chunk,
        busy: usize,
        bytes: Vec<u8>,
        original: Vec<u8>,
        options: &Options,
    ) -> Result<EntryWrite, Reason> {
        let (writer, pages) =
            write::CodeWriter::probe(target.addr, bytes.len(), options.write_path)
                .map_err(Reason::WriteDenied)?;
        Ok(EntryWrite {
            addr: target.addr,
            busy,
            stub: chunk.code,
            bytes,
            original,
            writer,
            pages,
        })
    }
}

/// The byte that makes a thread entering a function trap (`int3`).
const INT3: [u8; 1] = [0xcc];

/// Writes every entry of `writes` (the bytes there now are `original`, the
/// new ones `bytes`) with one protocol: the breakpoint one where this
/// process allows it, else the stop-the-world. `install`: the bytes there
/// now are instructions a thread may be inside (the breakpoint protocol
/// samples the threads); false when they are a jump (`Hook::unhook`). On
/// error, the index of the entry the reason is about; every entry is as it
/// was.
fn write_entries(
    writes: &[EntryWrite],
    options: &Options,
    install: bool,
) -> Result<Report, (usize, Reason)> {
    // Relaxed: a counter.
    stop::STOPS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    match breakpoint_available(writes, options) {
        Ok(()) => write_with_breakpoints(writes, options, install),
        Err(fallback) => stop_and_write(writes, options, fallback),
    }
}

/// Whether the breakpoint protocol can write `writes` now; if so, every
/// entry is in the trap table (a trap there goes to its stub).
fn breakpoint_available(writes: &[EntryWrite], options: &Options) -> Result<(), Fallback> {
    if options.stop_the_world {
        return Err(Fallback::Forced);
    }
    trap::available()?;
    if writes.len() > stop::MAX_RANGES || !trap::room_for(writes.iter().map(|w| w.addr)) {
        return Err(Fallback::TooManyEntries);
    }
    for w in writes {
        // Checked above: there is room.
        let added = trap::add(w.addr, w.stub);
        debug_assert!(added);
    }
    Ok(())
}

/// Bytes and where they go.
type At<'a> = (usize, &'a [u8]);

/// The three writes of the breakpoint protocol, in order: the `int3` at
/// `f`, the new bytes after it, the new first byte. `(address, bytes)` of
/// step `step` for `w`, and of its undoing (what was there before it).
fn step_bytes(w: &EntryWrite, step: usize) -> (At<'_>, At<'_>) {
    match step {
        0 => ((w.addr, &INT3), (w.addr, &w.original[..1])),
        1 => ((w.addr + 1, &w.bytes[1..]), (w.addr + 1, &w.original[1..])),
        _ => ((w.addr, &w.bytes[..1]), (w.addr, &INT3)),
    }
}

/// The fault injection points of the three steps (tests/hook.rs).
#[cfg(feature = "failpoints")]
const STEP_NAMES: [&str; 3] = [
    "hook::write::int3",
    "hook::write::rest",
    "hook::write::first",
];

fn injected(step: usize) -> std::io::Result<()> {
    #[cfg(feature = "failpoints")]
    fail::fail_point!(STEP_NAMES[step], |_| Err(std::io::Error::other(format!(
        "injected at {}",
        STEP_NAMES[step]
    ))));
    let _ = step;
    Ok(())
}

fn injected_undo() -> std::io::Result<()> {
    #[cfg(feature = "failpoints")]
    fail::fail_point!("hook::write::undo", |_| Err(std::io::Error::other(
        "injected at hook::write::undo"
    )));
    Ok(())
}

/// Runs step `step` for every entry, then makes every core see it. On a
/// failed write of entry `i`, the step is undone for entries `..=i` (a
/// write may have got half-way) and the cores synchronised: the entries
/// are as before the step. Returns the entry and the error, with any
/// failure to undo.
fn run_step(writes: &[EntryWrite], step: usize) -> Result<(), (usize, String)> {
    for (i, w) in writes.iter().enumerate() {
        let ((at, bytes), _) = step_bytes(w, step);
        if let Err(e) = injected(step).and_then(|()| w.writer.write(at, bytes, &w.pages)) {
            let mut detail = e.to_string();
            detail.push_str(&undo_step(&writes[..=i], step));
            return Err((i, detail));
        }
    }
    trap::sync_cores().map_err(|e| {
        let mut detail = format!("membarrier: {e}");
        detail.push_str(&undo_step(writes, step));
        (0, detail)
    })
}

/// Writes back, for every entry, what was there before step `step`, then
/// synchronises the cores; "" if it went well, else what failed (for the
/// error's message).
fn undo_step(writes: &[EntryWrite], step: usize) -> String {
    let mut failed = String::new();
    for w in writes {
        let (_, (at, bytes)) = step_bytes(w, step);
        // The fault point fails a write-back that has been done: the
        // bytes are back, the error is what the test checks.
        if let Err(e) = w
            .writer
            .write(at, bytes, &w.pages)
            .and_then(|()| injected_undo())
        {
            failed.push_str(&format!("; putting back {at:#x} failed too: {e}"));
        }
    }
    if let Err(e) = trap::sync_cores() {
        failed.push_str(&format!("; membarrier after putting back failed: {e}"));
    }
    failed
}

/// The breakpoint protocol (module docs, "The write"): `int3` at every
/// entry; then, for an install, every thread sampled until none is inside
/// the bytes; the rest of the new bytes; the new first byte. No thread is
/// held. On error every entry is written back as it was.
fn write_with_breakpoints(
    writes: &[EntryWrite],
    options: &Options,
    install: bool,
) -> Result<Report, (usize, Reason)> {
    let start = std::time::Instant::now();
    let failed = |(i, detail)| (i, Reason::WriteFailed { detail });
    run_step(writes, 0).map_err(failed)?;
    let sampled = if install {
        let ranges: Vec<(usize, usize)> = writes
            .iter()
            .map(|w| (w.addr + 1, w.addr + w.busy))
            .collect();
        match stop::sample_threads(&ranges, options.deadline, options.retry, start) {
            Ok(stats) => stats,
            Err(e) => {
                // Every thread outside stays outside: the int3 can go.
                let undone = undo_step(writes, 0);
                let (i, mut reason) = stop_error(writes, e);
                if !undone.is_empty() {
                    reason = Reason::NotRestored {
                        detail: format!("{reason}{undone}"),
                    };
                }
                return Err((i, reason));
            }
        }
    } else {
        stop::SampleStats {
            rounds: 0,
            threads: 0,
            held: Duration::ZERO,
        }
    };
    for step in 1..3 {
        if let Err((i, mut detail)) = run_step(writes, step) {
            let mut restored = true;
            for before in (0..step).rev() {
                let undone = undo_step(writes, before);
                restored &= undone.is_empty();
                detail.push_str(&undone);
            }
            return Err(match restored {
                true => failed((i, detail)),
                false => (i, Reason::NotRestored { detail }),
            });
        }
    }
    Ok(Report {
        protocol: Protocol::Breakpoint,
        rounds: sampled.rounds,
        threads: sampled.threads,
        pause: sampled.held,
        window: start.elapsed(),
        write_path: writes
            .first()
            .map_or(WritePath::ProcMem, |w| w.writer.path()),
        entries: writes.len(),
    })
}

/// The reason for a stop or a sampling that did not happen, and the index
/// of the entry it is about.
fn stop_error(writes: &[EntryWrite], e: stop::StopError) -> (usize, Reason) {
    let within = |ip: usize| {
        writes
            .iter()
            .position(|w| ip > w.addr && ip < w.addr + w.busy)
    };
    match e {
        stop::StopError::NotStopped(t) => (0, Reason::NotStopped(t)),
        stop::StopError::Busy(thread, ip) => {
            let i = within(ip).unwrap_or(0);
            (
                i,
                Reason::ThreadInside {
                    thread,
                    offset: ip.wrapping_sub(writes[i].addr),
                },
            )
        }
        stop::StopError::TooManyThreads(n) => (
            0,
            Reason::Threads(format!(
                "{n} threads: a stop holds at most {}",
                stop::MAX_THREADS
            )),
        ),
        stop::StopError::Signal(s) => (0, Reason::Signal(s)),
        stop::StopError::Io(s) => (0, Reason::Threads(s)),
        stop::StopError::Write(detail) => (0, Reason::WriteFailed { detail }),
    }
}

/// Writes every entry of `writes` under one stop that refuses while a
/// thread is inside any of them (the stop-the-world protocol, `stop.rs`).
fn stop_and_write(
    writes: &[EntryWrite],
    options: &Options,
    fallback: Fallback,
) -> Result<Report, (usize, Reason)> {
    let within = |ip: usize| {
        writes
            .iter()
            .position(|w| ip > w.addr && ip < w.addr + w.busy)
    };
    let check = |ips: &[(usize, usize)]| match ips.iter().find(|&&(_, ip)| within(ip).is_some()) {
        Some(&found) => Err(found),
        None => Ok(()),
    };
    // Whether putting back what was there failed (a flag, not a message:
    // the write runs while the other threads are stopped, and allocates
    // nothing).
    let unrestored = std::cell::Cell::new(None);
    let write = || {
        for (i, w) in writes.iter().enumerate() {
            if let Err(e) = w.writer.write(w.addr, &w.bytes, &w.pages) {
                // Put back what was there: the entries written before, and
                // this one if the write got half-way.
                for w in &writes[..=i] {
                    if w.writer.write(w.addr, &w.original, &w.pages).is_err() {
                        unrestored.set(Some(w.addr));
                    }
                }
                return Err(e);
            }
        }
        Ok(())
    };
    let stats =
        stop::stop_the_world(options.deadline, options.retry, check, write).map_err(|e| {
            let (i, reason) = stop_error(writes, e);
            match (unrestored.get(), reason) {
                (Some(at), Reason::WriteFailed { detail }) => (
                    i,
                    Reason::NotRestored {
                        detail: format!("{detail}; putting back {at:#x} failed too"),
                    },
                ),
                (_, reason) => (i, reason),
            }
        })?;
    Ok(Report {
        protocol: Protocol::StopTheWorld(fallback),
        rounds: stats.rounds,
        threads: stats.threads,
        pause: stats.pause,
        window: Duration::ZERO,
        write_path: writes
            .first()
            .map_or(WritePath::ProcMem, |w| w.writer.path()),
        entries: writes.len(),
    })
}

/// Writes the original entries of `hooks` back under one stop (the
/// writes of one revert); see [`Hook::unhook`].
///
/// # Errors
///
/// [`Error::Hook`] naming the first function refused; every hook is still
/// installed.
pub(crate) fn unhook_all(hooks: &[&Hook]) -> Result<Report, Error> {
    let mut states = HOOKS.lock().unwrap_or_else(PoisonError::into_inner);
    let mut writes = Vec::with_capacity(hooks.len());
    for (i, hook) in hooks.iter().enumerate() {
        let fail = |reason| refused("unhook", &hook.target.name, reason);
        let state = states
            .as_ref()
            .and_then(|h| h.get(&hook.target.addr))
            .filter(|s| s.installed && s.generation == hook.generation)
            .filter(|_| !hooks[..i].iter().any(|h| h.target.addr == hook.target.addr))
            .ok_or_else(|| fail(Reason::NotHooked))?;
        let jump = decode::jmp_rel32(hook.target.addr as u64, hook.chunk.code as u64)
            .map_err(|detail| fail(Reason::NoNearMemory { detail }))?;
        let original = state.original[..jump.len()].to_vec();
        writes.push(
            EntryWrite::probe(
                &hook.target,
                &hook.chunk,
                jump.len(),
                original,
                jump.to_vec(),
                &hook.options,
            )
            .map_err(fail)?,
        );
    }
    // One stop for all (hooks of several patches may be released at
    // once): the shortest deadline and pause between tries any of them
    // was given. Each entry's write path is its own (probed above).
    let mut options = hooks.first().map(|h| h.options.clone()).unwrap_or_default();
    for h in hooks {
        options.deadline = options.deadline.min(h.options.deadline);
        options.retry = options.retry.min(h.options.retry);
        options.stop_the_world |= h.options.stop_the_world;
    }
    let report = write_entries(&writes, &options, false)
        .map_err(|(i, reason)| refused("unhook", &hooks[i].target.name, reason))?;
    let states = states.as_mut().expect("checked above");
    for hook in hooks {
        states
            .get_mut(&hook.target.addr)
            .expect("checked above")
            .installed = false;
    }
    Ok(report)
}

/// A redirected function entry.
///
/// Dropping the handle leaves the redirection in place.
#[derive(Debug)]
pub struct Hook {
    target: Target,
    chunk: Chunk,
    report: Report,
    options: Options,
    generation: u64,
}

impl Hook {
    /// Runs `f` on this hook's state if this install is still in place.
    fn with_state<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&mut State) -> Result<T, Reason>,
    ) -> Result<T, Error> {
        let mut hooks = HOOKS.lock().unwrap_or_else(PoisonError::into_inner);
        let state = hooks
            .as_mut()
            .and_then(|h| h.get_mut(&self.target.addr))
            .filter(|s| s.installed && s.generation == self.generation)
            .ok_or_else(|| refused(op, &self.target.name, Reason::NotHooked))?;
        f(state).map_err(|reason| refused(op, &self.target.name, reason))
    }

    /// The function.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The slot every call of the function jumps through.
    pub fn slot(&self) -> &'static Slot {
        slot_at(&self.chunk)
    }

    /// The original code, callable: the trampoline (the replaced
    /// instructions, then a jump back into the function).
    pub fn original(&self) -> *const () {
        (self.chunk.code + TRAMPOLINE) as *const ()
    }

    /// How the entry write went.
    pub fn report(&self) -> Report {
        self.report
    }

    /// Points every call of the function at `to` (one store into the slot).
    ///
    /// # Safety
    ///
    /// `to` must be a function with exactly the target's signature and
    /// ABI, valid for as long as it may be called.
    ///
    /// # Errors
    ///
    /// [`Reason::Slot`] if the slot's page cannot be made writable,
    /// [`Reason::NotHooked`] if this install was removed; the slot is
    /// unchanged.
    pub unsafe fn redirect(&self, to: *const ()) -> Result<(), Error> {
        self.with_state("redirect", |state| {
            store_slot(&state.chunk, to as usize).map_err(Reason::Slot)
        })
    }

    /// Starts a per-thread transition of this function: calls go through
    /// the hook dispatcher, which runs `choice.new` for threads (and
    /// request scopes) in `choice.universe` and unregistered threads, and
    /// `choice.old` for the others; [`redirect`](Self::redirect) ends it.
    /// What `Slot::begin_transition` does for a `#[patchable]` function,
    /// with one dispatcher for every signature.
    ///
    /// # Safety
    ///
    /// As [`redirect`](Self::redirect), for both implementations; only
    /// under the transition turn.
    // The registry drives a hooked function's transition through its
    // `Entry` (its dispatcher is the hook dispatcher, `quiesce::patcher`);
    // this is the same for a `Hook` on its own (the unit test below).
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) unsafe fn begin_transition(
        &self,
        choice: crate::quiesce::protocol::Choice<FnAddr>,
    ) -> Result<(), Error> {
        self.with_state("redirect", |state| {
            let window = crate::slot::write_window_pages([(state.chunk.slot, size_of::<Slot>())])
                .map_err(|e| Reason::Slot(e.to_string()))?;
            slot_at(&state.chunk)
                .begin_transition(choice, FnAddr::new(__hotpatch_hook_dispatch as *const ()));
            drop(window);
            Ok(())
        })
    }

    /// Points the slot back at the original code.
    ///
    /// # Errors
    ///
    /// As [`redirect`](Self::redirect).
    pub fn restore(&self) -> Result<(), Error> {
        // SAFETY: the trampoline is the original function.
        unsafe { self.redirect(self.original()) }
    }

    /// Writes the original entry bytes back, with the protocol
    /// [`install`] would use (the breakpoint one samples no thread for
    /// this: module docs, "The write").
    ///
    /// # Errors
    ///
    /// [`Error::Hook`] with the [`Reason`]; the hook is still installed.
    pub fn unhook(&self) -> Result<Report, Error> {
        unhook_all(&[self])
    }
}

/// The other functions of the executable's symbol table that start at
/// `addr` under another name (bodies the compiler merged), readable.
pub(crate) fn merged_with(addr: usize) -> Vec<String> {
    let Ok(all) = symbols::functions() else {
        return Vec::new();
    };
    let at: Vec<&symbols::Function> = all.iter().filter(|f| f.addr == addr).collect();
    let Some(first) = at.first() else {
        return Vec::new();
    };
    // By symbol (two instances of one generic demangle alike), without
    // the `.llvm.<number>` suffix a codegen unit may add.
    let stem = |f: &symbols::Function| f.symbol.split(".llvm.").next().unwrap_or("").to_owned();
    let first = stem(first);
    let mut others: Vec<String> = at
        .iter()
        .filter(|f| stem(f) != first)
        .map(|f| symbols::name_of(f))
        .collect();
    others.sort();
    others.dedup();
    others
}

/// The signal that samples (breakpoint protocol) or stops
/// (stop-the-world) threads for a code write (`SIGRTMAX-2`). While a
/// thread blocks it, no hook can be installed (nor removed, under the
/// stop-the-world).
///
/// # Examples
///
/// ```
/// # if cfg!(all(target_arch = "x86_64", target_os = "linux")) {
/// // A thread that blocks every signal but must not hold up hooking.
/// // SAFETY: a zeroed sigset_t is a valid value to fill.
/// let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
/// // SAFETY: building and installing this thread's own signal mask.
/// unsafe {
///     libc::sigfillset(&mut set);
///     libc::sigdelset(&mut set, hotpatch::hook::signal());
///     libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
/// }
/// # }
/// ```
pub fn signal() -> i32 {
    stop::signal()
}

/// Rounds of the stop signal sent by this process so far, retries
/// included: stop-the-world rounds, and the breakpoint protocol's
/// sampling rounds.
pub fn stop_rounds() -> u64 {
    // Relaxed: a counter.
    stop::ROUNDS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Entry writes run by this process so far, with either protocol (each
/// of zero or more [rounds](stop_rounds)): one per [`install`],
/// [`Hook::unhook`], and per load or revert of a patch that writes hooked
/// entries, however many functions it hooks (all its entries are written
/// by one operation: one stop, or one breakpoint sequence).
///
/// # Examples
///
/// ```
/// # if cfg!(all(target_arch = "x86_64", target_os = "linux")) {
/// let before = hotpatch::hook::stops();
/// // ... apply a patch that hooks three functions ...
/// assert!(hotpatch::hook::stops() >= before);
/// # }
/// ```
pub fn stops() -> u64 {
    // Relaxed: a counter.
    stop::STOPS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Calls of hooked functions that took the breakpoint so far: made
/// while an entry was being written by the breakpoint protocol, they
/// executed its `int3` and the `SIGTRAP` handler sent them to the stub.
///
/// # Examples
///
/// ```
/// # if cfg!(all(target_arch = "x86_64", target_os = "linux")) {
/// println!("{} calls took the breakpoint", hotpatch::hook::traps());
/// # }
/// ```
pub fn traps() -> u64 {
    // Relaxed: a counter.
    trap::TRAPPED.load(std::sync::atomic::Ordering::Relaxed)
}

/// The memory mapped for stubs, trampolines and slots, as `(start, end)`
/// ranges: read-execute or read-only between operations.
///
/// # Examples
///
/// ```
/// # if cfg!(all(target_arch = "x86_64", target_os = "linux")) {
/// for (start, end) in hotpatch::hook::mapped() {
///     println!("{start:#x}-{end:#x}");
/// }
/// # }
/// ```
pub fn mapped() -> Vec<(usize, usize)> {
    near::arenas()
}

#[cfg(test)]
mod tests {
    use std::hint::black_box;

    use super::*;
    use crate::quiesce::protocol::Choice;

    #[inline(never)]
    fn routed(x: u64, y: f64) -> u64 {
        x ^ (y as u64)
    }

    fn routed_new(x: u64, y: f64) -> u64 {
        x.wrapping_add(y as u64)
    }

    /// A per-thread transition of a hook: a registered thread outside the
    /// choice's universe runs the old code, an unregistered thread the
    /// new, both through the one dispatcher (integer and float arguments
    /// arrive intact); ending it is a slot store.
    #[test]
    fn a_transition_routes_each_thread_through_the_dispatcher() {
        let f: fn(u64, f64) -> u64 = black_box(routed);
        let hook = install(&Target::of(routed as *const ()).unwrap()).unwrap();
        let choice = Choice {
            // No thread is in this universe (and it is not UNREGISTERED).
            universe: u64::MAX - 1,
            old: FnAddr::new(hook.original()),
            new: FnAddr::new(routed_new as *const ()),
        };
        // SAFETY: both have `routed`'s signature; this test is the only
        // writer of the hook's slot.
        unsafe { hook.begin_transition(choice) }.unwrap();
        let registered = std::thread::spawn(move || {
            let _guard = crate::register_thread();
            f(6, 3.0)
        });
        let unregistered = std::thread::spawn(move || f(6, 3.0));
        assert_eq!(
            registered.join().unwrap(),
            6 ^ 3,
            "old, through the dispatcher"
        );
        assert_eq!(
            unregistered.join().unwrap(),
            6 + 3,
            "new, through the dispatcher"
        );
        hook.restore().unwrap();
        assert_eq!(f(6, 3.0), 6 ^ 3);
        hook.unhook().unwrap();
    }
}
