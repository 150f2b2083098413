//! In-process live patching for Rust services.
//!
//! Mark the functions that may need fixing in production with
//! [`#[patchable]`](patchable). When one has a bug, write the fix in a
//! small patch crate with [`#[patch]`](patch), build it with `cargo hotpatch
//! build` (a thin patch: its own code only, bound to the running binary),
//! and apply it to the running process with [`load`]: no restart, no
//! dropped request.
//!
//! ```
//! // In the service's library crate.
//! #[hotpatch::patchable]
//! pub fn price(qty: u32, unit_cents: u64) -> u64 {
//!     qty as u64 * unit_cents // overflows
//! }
//! # fn main() { assert_eq!(price(2, 3), 6); }
//! ```
//!
//! ```
//! # mod my_service {
//! #     #[hotpatch::patchable]
//! #     pub fn price(qty: u32, unit_cents: u64) -> u64 { qty as u64 * unit_cents }
//! # }
//! // In the patch crate (an ordinary library crate), which depends on the
//! // service's library crate and on hotpatch.
//! hotpatch::manifest!();
//!
//! #[hotpatch::patch(my_service::price)]
//! fn price(qty: u32, unit_cents: u64) -> u64 {
//!     (qty as u64).saturating_mul(unit_cents)
//! }
//! # fn main() { assert_eq!(price(u32::MAX, u64::MAX), u64::MAX); }
//! ```
//!
//! ```no_run
//! // In the running service, when the operator says so.
//! let patch = hotpatch::load("target/release/libprice_fix.so")?;
//! // ... later, if the fix must go:
//! patch.revert()?;
//! # Ok::<(), hotpatch::Error>(())
//! ```
//!
//! # The model
//!
//! `#[patchable]` turns a function into a wrapper around a *slot*, a
//! static atomic function pointer that initially points at the
//! function's own body. A call is one atomic load of the slot and an
//! indirect call: no lock, no shared write, no allocation, no lookup, so
//! its cost does not grow with threads. The slot is registered in a
//! link-time table (`linkme`), so nothing runs at start-up.
//!
//! A patch is *thin*: a shared object holding only the patch crate's own
//! code, with a manifest (`hotpatch::manifest!()`) listing its
//! replacements. Everything else it names (std, hotpatch, the service
//! crate, every dependency) is left undefined in the file and bound to
//! the running service binary: to the symbols it exports (the host
//! setting: `println!("cargo::rustc-link-arg-bins=-rdynamic");` in the
//! service's `build.rs`), or, for a binary linked without it, to its own
//! symbol table (`.symtab`, read from `/proc/self/exe` and matched by
//! build-id). So patch code runs in the service's world: one std, one
//! allocator, one panic machinery, and the host's own statics,
//! thread-locals, `OnceLock`s, `tracing` dispatcher and tokio runtime.
//! `cargo hotpatch build` (the `cargo-hotpatch` crate) makes such a file
//! and stamps it with the GNU build-id of the service binary it was made
//! for. [`load`] reads the file once, checks it against this binary before
//! mapping it (its build-id, symbols to bind to, no allocator of its own),
//! maps a private copy of those bytes within ±2 GiB of the executable's
//! code and relocates it itself (so a patched call costs what the original
//! does; where it cannot, it opens the copy with `dlopen`, and
//! [`Patch::placement`] says why), checks the manifest, and then stores
//! every replacement in its slot.
//!
//! # Guarantees
//!
//! - **Checked before it runs.** The patch must be made for this build of
//!   the service ([`Error::WrongBuild`]), need no symbol this binary lacks
//!   ([`Error::MissingSymbols`]), and come from the same rustc, target,
//!   panic strategy and hotpatch ABI; each target must be a patchable
//!   function of this process (bound by symbol: the entry the patch names
//!   is this process's own), replaced once; the size and alignment of each
//!   argument and the return type must match. At compile time, `#[patch]` checks that the
//!   target is `#[patchable]` and that the replacement's signature is
//!   exactly the target's (not merely coercible to it).
//! - **All or nothing.** All checks of all functions run before any slot
//!   changes; if one fails, [`load`] returns an [`Error`] naming the file,
//!   the function and the reason, and nothing has changed.
//! - **No torn calls.** Every call reads its slot once and runs either the
//!   old or the new implementation, whatever apply or revert does
//!   meanwhile.
//! - **A read-only slot table.** Each slot is in the binary's RELRO
//!   segment, read-only once the dynamic loader relocated the binary, as
//!   the GOT is: a stray write into a slot faults. The runtime makes the
//!   pages of the slots it switches writable only while it stores (one
//!   `mprotect` pair per run of adjacent pages), and read-only again on
//!   every path, panics included. A binary linked without RELRO keeps them
//!   writable, with a warning: see [`slot_table`].
//! - **Consistency at safepoints.** A thread that registers
//!   ([`register_thread`]) and marks safepoints ([`quiescent`], typically
//!   between requests) runs every function of a patch in its old version
//!   or every one in its new version between two safepoints: it switches
//!   as a whole, at its own next safepoint. No thread waits for another and
//!   none is paused; the calls of a transition take a slightly slower
//!   route (a per-function dispatcher) until every registered thread has
//!   switched, then the slots point straight at the new code again. Around
//!   blocking work a thread goes [`offline`] and counts as being at a
//!   safepoint. Unregistered threads switch at once (each call still old
//!   or new). See "Transitions" below.
//! - **Panics.** A panic in patch code is an ordinary panic of the host
//!   (one std): the host's panic hook sees it and it unwinds into the
//!   caller with its payload, not an abort.
//! - **Shared functions.** Patch code calling another `#[patchable]`
//!   function of the service calls the host's live implementation
//!   (including patches applied later).
//! - **Stacking and revert.** Patches stack per function; [`Patch::revert`]
//!   takes one out wherever it is in the stack.
//! - **Code stays mapped.** A library is never unloaded, unless the
//!   program opts in with [`Loader::reclaim`] (see "Unloading").
//! - **Trusted before opened.** By default only a file that no one but
//!   this process's user (or root) can have written is opened, and with
//!   trusted keys configured only a file signed by one of them; the bytes
//!   checked are the bytes loaded (see "Safety model").
//!
//! # Transitions
//!
//! [`load`], [`revert`] and [`Patch::revert`] return once the change is
//! complete: every online registered thread has passed a safepoint and
//! runs the new code, and the slots point straight at it. With no
//! registered thread that is immediate. If some online registered thread
//! has not passed a safepoint by the deadline ([`Loader::deadline`],
//! default 5 s), the transition is reversed: threads that had switched go
//! back at their next safepoint, every slot ends as it was, and the call
//! returns [`Error::Timeout`] naming the threads that did not arrive. One
//! transition runs at a time; another `load`/`revert` waits for it within
//! its own deadline, then fails with [`Error::Busy`]. A registered thread
//! that calls `load` itself is at a safepoint. [`transition`] and
//! [`functions`] report a transition in progress.
//!
//! `quiescent()` with no transition in progress is a load of one shared
//! word and one thread-local, and writes nothing.
//!
//! # Async requests
//!
//! Per-thread safepoints do not cover a request that `.await`s between two
//! patchable calls: it may resume on another worker, or after its worker
//! passed a safepoint. Mark each request as one unit instead:
//! [`request(fut)`](request) (or `fut.hotpatch_scope()`, [`RequestExt`]),
//! or, for a tower service (axum, hyper, tonic), the layer
//! `hotpatch::tower::RequestLayer` (feature `tower`). Every patchable call
//! of a scoped request runs the version that was current when it was
//! first polled, however many `.await`s, on whichever thread polls it; a
//! new request starts on the newest version. A transition completes when
//! every request that started on the old version has finished or been
//! dropped (and every registered thread passed a safepoint); at the
//! deadline it is reversed, and [`Error::Timeout`] names the requests by
//! count, age of the oldest and where they were created. [`transition`]
//! and the control endpoint report them meanwhile.
//!
//! What each case gets:
//!
//! | inside a scoped request | runs |
//! |---|---|
//! | code of the request, across `.await`s, on any worker | the request's version |
//! | a nested scope (`request(inner)` awaited inside) | the outer request's version (one request) |
//! | `tokio::spawn(fut)` | `fut` is a task of its own, unscoped: per-thread rules on the worker that polls it |
//! | `tokio::spawn(hotpatch::request(fut))` | a new request, started on the newest version at its first poll |
//! | `tokio::spawn(hotpatch::inherit(fut))` | the parent's version; the transition waits for it too |
//! | `spawn_blocking(f)` | `f` unscoped on a blocking thread; with [`RequestVersion::current`]`()` and `version.run(f)`, the request's version |
//! | `block_on(fut)` (any executor polling on this thread) | the request's version: `fut` is polled inside the request's poll |
//!
//! Registered runtime threads (tokio: `on_thread_start`, offline in
//! `on_thread_park`) are still waited for at their safepoints, and
//! unscoped code on them keeps the per-thread guarantee; unscoped code on
//! unregistered threads switches at once. With no transition in progress
//! a scoped poll costs a thread-local load and two stores more than an
//! unscoped one, and the call path is unchanged. See
//! `examples/tokio-service` and `hotpatch::internals`.
//!
//! # Any function: entry redirection
//!
//! [`hook`] (x86-64 Linux) redirects a function that was *not* marked
//! `#[patchable]`: private helpers, the binary crate's functions, generic
//! instantiations, an async state machine's poll function. Its first
//! instructions (at least five bytes) are replaced once by a jump to a
//! stub that jumps through a runtime-owned slot; the slot first points at
//! a trampoline that runs the original code, and every later change is a
//! store into the slot. Whether a function's entry can be replaced is
//! decided from its machine code (no call or branch among the replaced
//! instructions, no branch of the function into them). The bytes are
//! written with an `int3` at the entry first (a call meanwhile takes the
//! trap to the new entry), once every other thread of the process was
//! seen outside them by a signal that samples it and returns (a thread
//! inside them makes the write wait, then refuse at the deadline, naming
//! it); where that cannot run, every thread is stopped by the signal for
//! the write. They are written through `/proc/self/mem` (which
//! changes no mapping's protection), or with `mprotect` where that is
//! refused; a process where neither is allowed (memory-deny-write-execute
//! and no `/proc/self/mem`) refuses with the setting's name, nothing
//! changed. The module documentation lists what it needs from the system
//! and its limits.
//!
//! A patch hooks a function with a hook record: `#[patch(path, hook)]` in
//! a hand-written patch crate, or one `cargo hotpatch build --base` writes
//! for a changed function it cannot replace through a slot (with the
//! replacement's expected entry bytes, read from the deployed binary). The loader checks each record before anything changes
//! (a function of the executable starts at the target, it is not a
//! `#[patchable]` function, its entry is eligible and its bytes are those
//! the patch expects), writes the entry jumps the patch needs (calls still
//! run the original code), then switches as for any patch: from there a
//! hooked function is a function of the registry, with stacking, revert in
//! any order, per-thread transitions and request scopes, watch windows,
//! accept and restore, and [`functions`] lists it with
//! [`FunctionInfo::hooked`]. A failed load writes back the entries it
//! wrote ([`Error::HooksLeftInstalled`] names any it could not). Reverting
//! the last patch of a hooked function writes its original bytes back,
//! under another stop; if that stop fails (a thread blocks the signal),
//! the revert still holds, calls run the original code through the
//! trampoline, and the event says so.
//!
//! # Limits
//!
//! - **Generics**: generic functions and methods of generic impls cannot
//!   be patchable (each instantiation is its own function); patch the
//!   non-generic function they call. Lifetime parameters are fine.
//! - **async**: `async fn` cannot be patchable; make the synchronous work
//!   a patchable function and call it from the async one.
//! - **`const fn`, C-variadics, `#[track_caller]`, `impl Trait`** in
//!   arguments or return type: rejected with a compile error.
//! - **Methods** are made patchable by putting `#[patchable]` on the
//!   `impl` block (every method becomes patchable; opt one out with
//!   `#[patchable(skip)]`): an attribute on a method alone cannot see its
//!   type. A trait impl needs a type defined in the service crate (the
//!   companion items live in an inherent impl). Several impls of one
//!   generic trait on one type (`From<String>` and `From<&str>`) are
//!   separate targets, named with the trait's arguments:
//!   `#[patch(<svc::Error as From<&str>>::from)]`. `Drop::drop` is
//!   patchable like any trait method. The target of a `#[patch]`
//!   must be nameable from the patch crate (public module path); the
//!   function itself may be private.
//! - **Statics and thread-locals** named in patch code are the host's own
//!   instances, of the service and of its dependencies. A private item of
//!   the service is reachable from patch code only through something
//!   public.
//! - **What a patch can call** is what the service binary contains: a
//!   dependency function the service never calls is not linked into it,
//!   and a patch that needs it is refused ([`Error::MissingSymbols`]). A
//!   service built with LTO internalises its symbols: patch one built
//!   without.
//! - **Allocators**: one: the host's. A patch crate that declares a
//!   `#[global_allocator]` is refused ([`Error::ForeignAllocator`]).
//! - **`extern "C"` functions** keep their semantics: a panic out of one
//!   aborts, patched or not.
//! - **Platform**: Linux (ELF); tested with glibc, not musl. The loader
//!   uses `memfd` and `/proc/self/fd`, falling back to a private temporary
//!   directory.
//!
//! # Unloading
//!
//! By default a patch library is never unmapped, even after revert. Code
//! from it may still be running on another thread, and pointers into it
//! may be held anywhere: `&'static str` literals, vtables of boxed trait
//! objects, function pointers. Thread-local destructors registered by its
//! code run at thread exit and would jump into unmapped memory
//! (rust-lang/rust#91979, #59629). Loading identical bytes again reuses the
//! mapping, so apply/revert cycles of one patch do not grow memory.
//!
//! A program that knows more can opt in: [`Loader::reclaim`] (an `unsafe`
//! fn) closes the libraries of reverted patches after every registered
//! thread has passed a safepoint; its `# Safety` section says what the
//! program must guarantee.
//!
//! # Safety model
//!
//! A patch is code injected into the process: once opened, its
//! initialisers run, and once applied its functions run with the full
//! privileges of the process. So:
//!
//! - **Trusted**: a patch that passes the trust policy. The policy runs
//!   before the library is opened: the file must be a regular file owned by
//!   this process's user or root and writable by no one else, in
//!   directories with the same property (sticky world-writable directories
//!   like `/tmp` excepted), and, when [`Loader::trusted_key`] is
//!   configured, signed (minisign, `<file>.minisig`) by a trusted key. The
//!   file is read once; the bytes checked are copied to a sealed memfd and
//!   that copy is what the dynamic loader maps.
//! - **Checked**: everything else about the file before anything changes:
//!   an ELF shared object of this machine whose segments lie inside it
//!   (a truncated file would otherwise crash the loader), a manifest whose
//!   every pointer lies inside the library, the same compiler, target,
//!   panic strategy and hotpatch ABI, and for each function its path,
//!   signature fingerprint and argument layouts.
//! - **Code writes** ([`hook`] only; loading a patch writes no code):
//!   the runtime writes a function's first bytes through
//!   `/proc/self/mem`, or makes its page read-write-execute for the
//!   microseconds of the write and restores it; stubs and trampolines are
//!   mapped read-execute, their slots read-only between operations. The
//!   bytes after the entry's first are written only once every other
//!   thread was seen outside them, behind an `int3` (or while every
//!   thread is stopped outside them); see [`hook`] for the protocol and
//!   what it cannot see.
//! - **Not defended against**: a trusted patch that is malicious or wrong
//!   in ways the checks cannot see (a replacement with the right signature
//!   and the wrong logic, an initialiser with side effects), a service
//!   built from other source than the patch was built against but with the
//!   same signatures and layouts, and anyone who can write the process's
//!   memory or the trusted key.
//!
//! # Metrics
//!
//! With the cargo feature `metrics`, the runtime reports through the
//! [`metrics`](https://docs.rs/metrics) facade, so a service that already
//! installed a recorder (`metrics-exporter-prometheus`, an OpenTelemetry
//! bridge, statsd) exports these with its own metrics, on its own
//! endpoint. Without a recorder they cost nothing but the call; none is on
//! the call path of a patchable function (only operations record).
//!
//! | metric | type | labels | when |
//! |---|---|---|---|
//! | `hotpatch_applies_total` | counter | `op` (`apply`, `replace`), `outcome` (`ok` or an [`Error::kind`]) | every load or replace |
//! | `hotpatch_reverts_total` | counter | `outcome` (`ok` or an [`Error::kind`]) | every revert (a watch window's rollback included) |
//! | `hotpatch_refusals_total` | counter | `op` (`apply`, `replace`, `check`), `kind` | a patch refused by a check (not a timeout, a busy turn or "already applied") |
//! | `hotpatch_rollbacks_total` | counter | `cause` (`panics`, `health_check`), `outcome` (`ok`, `revert_failed`) | a watch window rolled its patch back (`control::watch`) |
//! | `hotpatch_patches_applied` | gauge | | after every load, replace and revert |
//! | `hotpatch_patches_accepted` | gauge | | the state directory's record: at `listen` and whenever it changes |
//! | `hotpatch_apply_duration_seconds` | histogram | `op` | a successful load or replace, from the read of the file to the end of the transition |
//! | `hotpatch_revert_duration_seconds` | histogram | | a successful revert |
//! | `hotpatch_transition_duration_seconds` | histogram | | a completed transition, from its publication until every registered thread and request scope switched (0 for a direct swap) |
//! | `hotpatch_transition_threads_waited` | histogram | | registered threads not yet at a safepoint when a transition was published |
//! | `hotpatch_transition_requests_waited` | histogram | | request scopes in flight on the old version when it was published |
//!
//! `hotpatch status --prometheus` prints the patch state of a process
//! (`hotpatch_patches_applied`, `hotpatch_patches_accepted`, and one
//! `hotpatch_patch_info` per patch) in the Prometheus text format for
//! node_exporter's textfile collector, whether or not the service enabled
//! the feature.
//!
//! # Performance
//!
//! A call site, in any crate, with or without LTO, compiles to one load
//! of the slot from its link-time address and an indirect call
//! (`mov slot(%rip), %rax; call *%rax` on x86-64): the same instructions
//! as an `AtomicPtr` fn-pointer call written in the calling crate. The
//! wrapper is `#[inline(always)]` and reads the slot through an `asm!`
//! `sym` operand, so there is no GOT load of the slot's address and no
//! setting to make. Each call site is 9 bytes of code on x86-64, 3 more
//! than a plain call through the GOT. This needs the crate that defines
//! the function to be linked into the executable or the patch as an rlib
//! (cargo's default), not as a Rust `dylib`. On other architectures the
//! wrapper does an `Acquire` load of the slot. See `BENCHMARKS.md`.

#![deny(unsafe_op_in_unsafe_fn)]

/// A fault-injection point (`fail` crate) under the test-only
/// `failpoints` feature: `fail::cfg(NAME, "return")` makes the enclosing
/// function return `Error::Injected`. Nothing without the feature.
macro_rules! failpoint {
    // In a check that returns a `Refusal`: `Refusal::Injected`, to which
    // the loader attaches the file.
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        fail::fail_point!($name, |_| Err($crate::error::Refusal::Injected {
            point: $name
        }));
    };
    ($name:literal, $path:expr) => {
        #[cfg(feature = "failpoints")]
        fail::fail_point!($name, |_| Err($crate::Error::Injected {
            point: $name,
            path: ::std::path::Path::to_owned($path),
        }));
    };
}

mod abi;
#[cfg(feature = "control")]
pub mod control;
mod elf;
mod error;
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub mod hook;
mod host;
mod image;
mod loader;
mod manifest;
mod metrics;
mod near;
mod patch;
mod quiesce;
mod registry;
mod scope;
mod slot;
mod sys;
mod trust;
mod window;

#[doc(hidden)]
#[path = "private.rs"]
pub mod __private;

#[doc = include_str!("internals.md")]
pub mod internals {}

pub use error::Error;
pub use loader::{
    CheckReport, DEFAULT_DEADLINE, DEFAULT_MAX_FILE_SIZE, Loader, Reclaimed, WouldReplace, load,
};
pub use near::NearRefusal;
pub use patch::{FunctionInfo, Implementation, Patch, PatchId, PatchInfo, Placement};
pub use quiesce::{
    OfflineGuard, StalledRequest, StalledThread, ThreadGuard, TransitionInfo, offline, quiescent,
    register_thread, while_offline,
};
#[cfg(feature = "tower")]
pub use scope::tower;
pub use scope::{Request, RequestExt, RequestVersion, inherit, request};
pub use slot::SlotTable;
pub use trust::TrustedKey;

/// Makes a function, or every method of an `impl` block, patchable.
///
/// The function keeps its signature, attributes and docs; its body becomes
/// the default implementation behind a slot that [`load`] can repoint.
///
/// # Examples
///
/// ```
/// #[hotpatch::patchable]
/// pub fn discount(total_cents: u64) -> u64 {
///     total_cents / 10
/// }
///
/// pub struct Cart {
///     pub items: Vec<u64>,
/// }
///
/// #[hotpatch::patchable]
/// impl Cart {
///     pub fn total(&self) -> u64 {
///         self.items.iter().sum()
///     }
///
///     #[hotpatch::patchable(skip)]
///     pub fn len(&self) -> usize {
///         self.items.len()
///     }
/// }
/// # fn main() {
/// assert_eq!(discount(100), 10);
/// assert_eq!(Cart { items: vec![1, 2] }.total(), 3);
/// # }
/// ```
///
/// Unsupported forms are compile errors: generic parameters, `impl Trait`,
/// `async fn`, `const fn`, C-variadics, `#[track_caller]`, methods of
/// generic impls (see the crate docs, "Limits").
pub use hotpatch_macros::patchable;

/// Marks a function of a patch crate as the replacement of a
/// `#[patchable]` function.
///
/// The argument is the target's path as the patch crate sees it:
/// `svc::pricing::price`, `svc::Cart::total`,
/// `<svc::Cart as svc::Priced>::total`, or, for one of several impls of a
/// generic trait, with the trait's arguments as the service's impl writes
/// them: `<svc::Error as From<&str>>::from`. A method's replacement is a free
/// function whose first parameter is the receiver. The crate must invoke
/// [`manifest!`] once.
///
/// Compile errors: a target that does not exist or is not `#[patchable]`,
/// or a signature that is not exactly the target's.
///
/// `#[patch(path, hook)]` replaces a function that is *not* `#[patchable]`
/// by redirecting its entry ([`hook`], x86-64 Linux): `path` names the
/// function itself (it must be nameable from the patch crate), and its
/// signature is checked by coercing it to the replacement's fn-pointer
/// type (a mismatch is a compile error at the path; the check is one-way,
/// so a replacement taking `&'static str` is accepted for a target taking
/// `&str`). The function must be compiled into the service's executable,
/// not into the patch: a generic function is refused at compile time, and
/// an `#[inline]` one (whose address a patch crate takes from its own
/// copy) is refused at load as not in the host's code; hook those from a
/// source build instead. The loader decodes the function's entry and
/// refuses what cannot be redirected.
///
/// ```
/// # mod svc { #[inline(never)] pub fn helper(x: u64) -> u64 { x * 2 } }
/// hotpatch::manifest!();
///
/// #[hotpatch::patch(svc::helper, hook)]
/// fn helper(x: u64) -> u64 {
///     x.saturating_mul(2)
/// }
/// # fn main() { assert_eq!(helper(u64::MAX), u64::MAX); }
/// ```
///
/// # Examples
///
/// ```
/// # mod svc {
/// #     pub struct Cart { pub items: Vec<u64> }
/// #     #[hotpatch::patchable]
/// #     impl Cart { pub fn total(&self) -> u64 { self.items.iter().sum() } }
/// # }
/// hotpatch::manifest!();
///
/// #[hotpatch::patch(svc::Cart::total)]
/// fn total(cart: &svc::Cart) -> u64 {
///     cart.items.iter().fold(0u64, |a, b| a.saturating_add(*b))
/// }
/// # fn main() { assert_eq!(total(&svc::Cart { items: vec![u64::MAX, 1] }), u64::MAX); }
/// ```
pub use hotpatch_macros::patch;

/// Declares the patch crate's manifest: invoke once at the crate root of a
/// patch crate.
///
/// Name, version and description default to the crate's Cargo package
/// metadata (`name`, `version`, `description`); any of them can be given
/// instead, in any order, as can `init`: a `fn() -> Result<(), E>` (`E:
/// Display`) that runs each time the patch is loaded, after its checks
/// and before it is applied. An `Err` or a panic there refuses the patch
/// with [`Error::InitFailed`], nothing applied.
///
/// A thin patch uses the host's allocator, std and statics: the patch
/// crate must not declare a `#[global_allocator]` of its own.
///
/// # Examples
///
/// ```
/// hotpatch::manifest!();
/// # fn main() {}
/// ```
///
/// ```
/// hotpatch::manifest!(name = "pricing-fix", version = "1.0.1", description = "INC-1234");
/// # fn main() {}
/// ```
///
/// ```
/// fn check_config() -> Result<(), String> {
///     std::env::var("PRICING_FIX_ENABLED").map(drop).map_err(|_| "not enabled".to_owned())
/// }
/// hotpatch::manifest!(init = check_config);
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! manifest {
    ($($key:ident = $value:expr),* $(,)?) => {
        $crate::__manifest! {
            @ (::core::env!("CARGO_PKG_NAME"))
              (::core::env!("CARGO_PKG_VERSION"))
              (::core::env!("CARGO_PKG_DESCRIPTION"))
              ()
            ; $($key = $value,)*
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __manifest {
    (@ $name:tt $version:tt $description:tt $init:tt ; name = $v:expr, $($rest:tt)*) => {
        $crate::__manifest! { @ ($v) $version $description $init ; $($rest)* }
    };
    (@ $name:tt $version:tt $description:tt $init:tt ; version = $v:expr, $($rest:tt)*) => {
        $crate::__manifest! { @ $name ($v) $description $init ; $($rest)* }
    };
    (@ $name:tt $version:tt $description:tt $init:tt ; description = $v:expr, $($rest:tt)*) => {
        $crate::__manifest! { @ $name $version ($v) $init ; $($rest)* }
    };
    (@ $name:tt $version:tt $description:tt $init:tt ; init = $v:expr, $($rest:tt)*) => {
        $crate::__manifest! { @ $name $version $description ($v) ; $($rest)* }
    };
    (@ ($name:expr) ($version:expr) ($description:expr) ($($init:expr)?) ;) => {
        $crate::__manifest_tables!();

        #[doc(hidden)]
        #[unsafe(export_name = "hotpatch_manifest_v1")]
        pub static __HOTPATCH_MANIFEST: $crate::__private::Manifest = {
            let m = $crate::__private::Manifest::new(
                $name,
                $version,
                $description,
                __hotpatch_functions,
                &__HOTPATCH_PANICS,
            )
            .with_slot_refs(__hotpatch_slot_refs)
            .with_hooks(__hotpatch_hooks);
            $(
                fn __hotpatch_init() -> ::core::result::Result<(), ::std::string::String> {
                    $crate::__private::run_init($init)
                }
                let m = m.with_init(__hotpatch_init);
            )?
            m
        };
    };
}

/// What `manifest!()` puts at the patch crate's root besides the manifest
/// itself: the crate's `#[patch]` table and slot-reference table (its own
/// linker sections), their getters, the panic counter, and the marker
/// `#[patch]` checks for. For hand-written manifests (the test corpus).
#[doc(hidden)]
#[macro_export]
macro_rules! __manifest_tables {
    () => {
        /// The `#[patch]` records of this crate, in its own linker
        /// section (the patch's, not the host's).
        #[doc(hidden)]
        #[$crate::__private::linkme::distributed_slice]
        #[linkme(crate = $crate::__private::linkme)]
        pub static __HOTPATCH_PATCH_FNS: [$crate::__private::PatchFn];

        /// The hooked functions of this crate (`#[patch(path, hook)]`, or
        /// written by `cargo hotpatch build --base`), in its own linker
        /// section.
        #[doc(hidden)]
        #[$crate::__private::linkme::distributed_slice]
        #[linkme(crate = $crate::__private::linkme)]
        pub static __HOTPATCH_HOOK_FNS: [$crate::__private::HookFn];

        /// The cells through which this patch's code reaches the host's
        /// slots (filled in by `cargo hotpatch build`; see `SlotRef`).
        #[doc(hidden)]
        #[$crate::__private::linkme::distributed_slice]
        #[linkme(crate = $crate::__private::linkme)]
        pub static __HOTPATCH_REFS: [$crate::__private::SlotRef];

        /// Calls of this patch's replacements that ended in a panic.
        #[doc(hidden)]
        pub static __HOTPATCH_PANICS: ::core::sync::atomic::AtomicU64 =
            ::core::sync::atomic::AtomicU64::new(0);

        /// # Safety
        /// `len` must be valid for a write.
        unsafe extern "C" fn __hotpatch_functions(
            len: *mut usize,
        ) -> *const $crate::__private::PatchFn {
            // SAFETY: the caller's guarantee.
            unsafe { $crate::__private::patch_fns_raw(&__HOTPATCH_PATCH_FNS, len) }
        }
        /// # Safety
        /// `len` must be valid for a write.
        unsafe extern "C" fn __hotpatch_hooks(len: *mut usize) -> *const $crate::__private::HookFn {
            // SAFETY: the caller's guarantee.
            unsafe { $crate::__private::hook_fns_raw(&__HOTPATCH_HOOK_FNS, len) }
        }
        /// # Safety
        /// `len` must be valid for a write.
        unsafe extern "C" fn __hotpatch_slot_refs(
            len: *mut usize,
        ) -> *const $crate::__private::SlotRef {
            // SAFETY: the caller's guarantee.
            unsafe { $crate::__private::slot_refs_raw(&__HOTPATCH_REFS, len) }
        }
        // What `#[patch]` names the tables through: its name is the compile
        // error a patch crate without `hotpatch::manifest!()` gets.
        #[doc(hidden)]
        pub mod __hotpatch_manifest_missing__call_hotpatch_manifest_at_the_crate_root {
            pub use super::{
                __HOTPATCH_HOOK_FNS as HOOKS, __HOTPATCH_PANICS as PANICS,
                __HOTPATCH_PATCH_FNS as FNS,
            };
        }
    };
}

/// The patches applied now, oldest first.
///
/// # Examples
///
/// ```
/// assert!(hotpatch::applied().iter().all(|p| !p.functions.is_empty()));
/// ```
pub fn applied() -> Vec<PatchInfo> {
    registry::REGISTRY.lock().applied()
}

/// Every patchable function of this process and what implements it now.
///
/// # Examples
///
/// ```
/// #[hotpatch::patchable]
/// fn greet() -> &'static str { "hello" }
/// # fn main() {
/// let f = hotpatch::functions()
///     .into_iter()
///     .find(|f| f.path.ends_with("::greet"))
///     .unwrap();
/// assert_eq!(f.implementation, hotpatch::Implementation::Original);
/// # assert_eq!(greet(), "hello");
/// # }
/// ```
pub fn functions() -> Vec<FunctionInfo> {
    let switching = quiesce::transition()
        .map(|t| t.functions)
        .unwrap_or_default();
    registry::REGISTRY.lock().functions(&switching)
}

/// How the slot table is protected between operations: each
/// `#[patchable]` function's slot is read-only (in the binary's RELRO
/// segment, made writable only while the runtime stores into it), unless
/// the binary was linked without RELRO. Such a binary gets a `tracing`
/// warning when the table is first used, and patches still apply: its
/// GOT is just as writable, so refusing them would protect nothing.
///
/// # Examples
///
/// ```
/// #[hotpatch::patchable]
/// fn greet() -> &'static str { "hello" }
/// # fn main() {
/// let table = hotpatch::slot_table();
/// assert!(table.slots >= 1);
/// if !table.is_read_only() {
///     eprintln!("{} slot(s) writable between patches", table.slots - table.read_only);
/// }
/// # assert_eq!(greet(), "hello");
/// # }
/// ```
pub fn slot_table() -> SlotTable {
    slot::slot_table()
}

/// The patch being applied or reverted right now, if any, and the
/// registered threads and request scopes it is waiting for.
///
/// # Examples
///
/// ```
/// if let Some(t) = hotpatch::transition() {
///     eprintln!("{} for {:?}, waiting for {:?}", t.what, t.elapsed, t.waiting_for);
///     for r in &t.waiting_for_requests {
///         eprintln!("  {r}"); // "3 request(s) created at src/serve.rs:40:9, ..."
///     }
/// }
/// ```
pub fn transition() -> Option<TransitionInfo> {
    quiesce::transition()
}

/// Reverts the applied patch `id` (what [`Patch::revert`] does, for when
/// the handle is gone, e.g. from a control command).
///
/// # Errors
///
/// [`Error::NotApplied`] if no applied patch has this id.
///
/// # Examples
///
/// ```
/// # fn main() {
/// for p in hotpatch::applied() {
///     hotpatch::revert(p.id).unwrap();
/// }
/// # }
/// ```
pub fn revert(id: PatchId) -> Result<(), Error> {
    Loader::new().revert_id(id)
}
