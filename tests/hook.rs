//! Entry redirection (`hotpatch::hook`) on real threads: the stop-the-world
//! waits for a thread parked inside the bytes and refuses at its deadline,
//! names a thread that blocks the stop signal, refuses a loop head at the
//! entry, survives a stress of install/redirect/unhook cycles under calls,
//! and refuses cleanly where the process may not write code.
#![cfg(all(target_arch = "x86_64", target_os = "linux"))]

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use fail::FailGuard;
use hotpatch::hook::{self, Fallback, Options, Protocol, Reason, Target, WritePath};

/// Hook tests stop every thread of this test binary: one at a time, so a
/// thread one test parks on purpose does not refuse another test's stop.
fn serial() -> MutexGuard<'static, ()> {
    static ONE: Mutex<()> = Mutex::new(());
    ONE.lock().unwrap_or_else(|e| e.into_inner())
}

/// The protocol a default install runs here: the breakpoint one, unless
/// the run forces the stop-the-world (`HOTPATCH_HOOK_PROTOCOL`, which
/// runs every test of this file on the old protocol).
fn expected_protocol() -> Protocol {
    if std::env::var_os(hook::PROTOCOL_ENV).is_some_and(|v| v == "stop-the-world") {
        Protocol::StopTheWorld(Fallback::Forced)
    } else {
        Protocol::Breakpoint
    }
}

fn reason(e: hotpatch::Error) -> Reason {
    match e {
        hotpatch::Error::Hook { reason, .. } => reason,
        other => panic!("not a hook refusal: {other}"),
    }
}

fn code(target: &Target) -> Vec<u8> {
    // SAFETY: the target's code, mapped for the life of the process.
    unsafe { std::slice::from_raw_parts(target.addr().cast::<u8>(), target.len()) }.to_vec()
}

/// The mappings of this process that are writable and executable, or
/// writable and overlapping `ranges`.
fn writable_code(ranges: &[(usize, usize)]) -> Vec<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .filter(|l| {
            let mut f = l.split_whitespace();
            let (range, perms) = (f.next().unwrap(), f.next().unwrap());
            let (s, e) = range.split_once('-').unwrap();
            let (s, e) = (
                usize::from_str_radix(s, 16).unwrap(),
                usize::from_str_radix(e, 16).unwrap(),
            );
            let w = perms.as_bytes()[1] == b'w';
            let x = perms.as_bytes()[2] == b'x';
            w && (x || ranges.iter().any(|&(a, b)| a < e && s < b))
        })
        .map(str::to_owned)
        .collect()
}

#[inline(never)]
fn price(qty: u64) -> u64 {
    qty ^ 0xff
}

fn price_fixed(qty: u64) -> u64 {
    qty ^ 0x0f
}

#[test]
fn a_rust_function_is_hooked_redirected_and_unhooked() {
    let _one = serial();
    let f: fn(u64) -> u64 = black_box(price);
    let target = Target::of(price as *const ()).unwrap();
    assert!(target.name().ends_with("hook::price"), "{}", target.name());
    let before = code(&target);
    let hook = hook::install(&target).unwrap();
    assert_ne!(code(&target), before, "the entry is a jump now");
    assert_eq!(code(&target)[0], 0xe9);
    let report = hook.report();
    assert_eq!(report.protocol, expected_protocol(), "{report:?}");
    assert_eq!(
        report.window.is_zero(),
        report.protocol != Protocol::Breakpoint,
        "a window only for the breakpoint protocol: {report:?}"
    );
    assert_eq!(f(2), 0xfd, "installed: the trampoline runs the original");
    // SAFETY: the same signature.
    unsafe { hook.redirect(price_fixed as *const ()) }.unwrap();
    assert_eq!(f(2), 0x0d);
    // SAFETY: the trampoline is `price`'s original code.
    let original: fn(u64) -> u64 = unsafe { std::mem::transmute(hook.original()) };
    assert_eq!(original(2), 0xfd, "the original stays callable");
    let e = hook::install(&target).unwrap_err();
    assert_eq!(reason(e), Reason::AlreadyHooked);
    hook.unhook().unwrap();
    assert_eq!(code(&target), before, "the original bytes are back");
    assert_eq!(f(2), 0xfd);
    assert_eq!(reason(hook.unhook().unwrap_err()), Reason::NotHooked);
    // Hooked again: the same chunk, the slot back at the original.
    let again = hook::install(&target).unwrap();
    assert_eq!(again.original(), hook.original());
    assert_eq!(f(2), 0xfd);
    // The first handle is stale: it can neither redirect nor remove the
    // second install.
    // SAFETY: the same signature (and refused anyway).
    let stale = unsafe { hook.redirect(price_fixed as *const ()) }.unwrap_err();
    assert_eq!(reason(stale), Reason::NotHooked);
    assert_eq!(reason(hook.unhook().unwrap_err()), Reason::NotHooked);
    assert_eq!(f(2), 0xfd);
    again.unhook().unwrap();
    let mut ranges = hook::mapped();
    ranges.push((
        target.addr() as usize,
        target.addr() as usize + target.len(),
    ));
    assert_eq!(writable_code(&ranges), Vec::<String>::new());
}

#[test]
fn a_function_whose_entry_is_not_the_expected_one_is_refused() {
    let _one = serial();
    let target = Target::of(price as *const ()).unwrap();
    let before = code(&target);
    let entry = target.entry().unwrap();
    assert_eq!(entry[..], before[..entry.len()]);
    let mut other = entry.clone();
    other[0] ^= 0xff;
    let options = Options::default().expect_entry(&other);
    match reason(hook::install_with(&target, &options).unwrap_err()) {
        Reason::EntryChanged { expected, found } => {
            assert_eq!((expected, found), (other, entry.clone()))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(code(&target), before);
    let hook = hook::install_with(&target, &Options::default().expect_entry(&entry)).unwrap();
    hook.unhook().unwrap();
}

#[test]
fn a_function_is_found_by_its_path() {
    let _one = serial();
    let by_path = Target::named("hook::price").unwrap();
    assert_eq!(by_path, Target::of(price as *const ()).unwrap());
    assert!(matches!(
        reason(Target::named("hook::no_such_function").unwrap_err()),
        Reason::NotFound { .. }
    ));
}

// A loop whose head is f+2: `xor eax, eax; L: add eax, edi; dec edi; jnz L; ret`.
std::arch::global_asm!(
    ".pushsection .text.hook_loop_at_entry,\"ax\",@progbits",
    ".globl hook_loop_at_entry",
    ".type hook_loop_at_entry,@function",
    "hook_loop_at_entry:",
    "    xor eax, eax",
    "2:  add eax, edi",
    "    dec edi",
    "    jnz 2b",
    "    ret",
    ".size hook_loop_at_entry, . - hook_loop_at_entry",
    ".popsection",
);

unsafe extern "C" {
    fn hook_loop_at_entry(n: u32) -> u32;
    fn hook_parked_target(byte: *const u8) -> u32;
}

#[test]
fn a_loop_head_inside_the_entry_is_refused() {
    let _one = serial();
    let target = Target::of(hook_loop_at_entry as *const ()).unwrap();
    let before = code(&target);
    match reason(hook::install(&target).unwrap_err()) {
        Reason::Ineligible(hook::Ineligible::BranchIntoEntry { target: 2, .. }) => {}
        other => panic!("{other:?}"),
    }
    let e = target.check().unwrap_err().to_string();
    assert!(
        e.contains("hook_loop_at_entry") && e.contains("+0x2"),
        "{e}"
    );
    assert_eq!(code(&target), before);
    // SAFETY: a plain function of the asm above.
    assert_eq!(unsafe { hook_loop_at_entry(4) }, 10);
}

// `push rbp; mov al, [rdi]; movzx eax, al; pop rbp; ret`: a thread whose
// load at f+1 waits on a userfaultfd page is parked inside the six bytes
// the jump replaces, for as long as the test keeps the page missing.
std::arch::global_asm!(
    ".pushsection .text.hook_parked_target,\"ax\",@progbits",
    ".globl hook_parked_target",
    ".type hook_parked_target,@function",
    "hook_parked_target:",
    "    push rbp",
    "    mov al, byte ptr [rdi]",
    "    movzx eax, al",
    "    pop rbp",
    "    ret",
    ".size hook_parked_target, . - hook_parked_target",
    ".popsection",
);

/// A page whose first touch blocks until `release`.
struct MissingPage {
    uffd: libc::c_int,
    page: *mut u8,
}

// SAFETY: the page's address is only passed to the parked thread.
unsafe impl Send for MissingPage {}
// SAFETY: as above.
unsafe impl Sync for MissingPage {}

impl MissingPage {
    /// `None` where userfaultfd is unavailable.
    fn new() -> Option<MissingPage> {
        const UFFD_USER_MODE_ONLY: libc::c_int = 1;
        const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
        const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
        // SAFETY: plain system calls on memory we own.
        unsafe {
            let uffd = libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | UFFD_USER_MODE_ONLY)
                as libc::c_int;
            if uffd < 0 {
                return None;
            }
            let mut api = [0xaa_u64, 0, 0];
            if libc::ioctl(uffd, UFFDIO_API, api.as_mut_ptr()) != 0 {
                return None;
            }
            let page = libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(page, libc::MAP_FAILED);
            // range.start, range.len, mode = MISSING, ioctls (out)
            let mut reg = [page as u64, 4096, 1, 0];
            if libc::ioctl(uffd, UFFDIO_REGISTER, reg.as_mut_ptr()) != 0 {
                return None;
            }
            Some(MissingPage {
                uffd,
                page: page.cast(),
            })
        }
    }

    /// Maps the zero page: the parked load completes.
    fn release(&self) {
        const UFFDIO_ZEROPAGE: libc::c_ulong = 0xc020_aa04;
        let mut zero = [self.page as u64, 4096, 0, 0];
        // SAFETY: resolving the registered range.
        let r = unsafe { libc::ioctl(self.uffd, UFFDIO_ZEROPAGE, zero.as_mut_ptr()) };
        assert!(
            r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EEXIST),
            "{}",
            std::io::Error::last_os_error()
        );
    }
}

#[test]
fn a_thread_inside_the_entry_makes_the_write_wait_then_refuse_or_retry() {
    let _one = serial();
    let Some(page) = MissingPage::new().map(Arc::new) else {
        println!("skipped: userfaultfd is unavailable here (needed to park a thread at f+1)");
        return;
    };
    let target = Target::of(hook_parked_target as *const ()).unwrap();
    assert_eq!(target.check().unwrap(), 6);
    let before = code(&target);
    let parked = {
        let page = Arc::clone(&page);
        thread::Builder::new()
            .name("parked-at-f+1".into())
            // SAFETY: reads one byte of a mapped page.
            .spawn(move || unsafe { hook_parked_target(page.page) })
            .unwrap()
    };
    // Wait until the thread is in the load at f+1: the fault's message
    // (struct uffd_msg, 32 bytes; a blocking read) names the page.
    let mut msg = [0u64; 4];
    // SAFETY: reading into memory we own.
    let n = unsafe { libc::read(page.uffd, msg.as_mut_ptr().cast(), 32) };
    assert_eq!(n, 32, "{}", std::io::Error::last_os_error());
    assert_eq!(msg[0] & 0xff, 0x12, "UFFD_EVENT_PAGEFAULT");
    assert_eq!(
        msg[2] & !0xfff,
        page.page as u64,
        "the fault is at the page"
    );

    // Refused at the deadline, naming the thread; nothing changed. (Each
    // round it is inside; a round cut short by the deadline still names it.)
    let short = Options::default().deadline(Duration::from_secs(1));
    match reason(hook::install_with(&target, &short).unwrap_err()) {
        Reason::ThreadInside { thread, offset } => {
            assert_eq!(offset, 1);
            assert_eq!(thread.name, "parked-at-f+1");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(code(&target), before);

    // Waits, retries, and writes once the thread left the bytes.
    let rounds = hook::stop_rounds();
    let releaser = {
        let page = Arc::clone(&page);
        thread::spawn(move || {
            while hook::stop_rounds() < rounds + 3 {
                thread::sleep(Duration::from_millis(1));
            }
            page.release();
        })
    };
    let long = Options::default().deadline(Duration::from_secs(60));
    let hook = hook::install_with(&target, &long).unwrap();
    assert!(hook.report().rounds >= 2, "{:?}", hook.report());
    releaser.join().unwrap();
    assert_eq!(
        parked.join().unwrap(),
        0,
        "the parked thread finished normally"
    );
    let byte = 0x5a_u8;
    // SAFETY: through the hook, the original code: reads one byte.
    assert_eq!(unsafe { hook_parked_target(&byte) }, 0x5a);
    hook.unhook().unwrap();
    assert_eq!(code(&target), before);
}

// `push rbp`, k-1 `nop`s, `mov al, [rdi]` at f+k, `movzx eax, al; pop
// rbp; ret`: a thread parked in the load is at the instruction starting
// at f+k, for k = 1..=4, each inside the bytes the jump replaces.
macro_rules! parked_at {
    ($($name:literal: $nops:literal),*) => {
        std::arch::global_asm!(
            $(
                concat!(".pushsection .text.", $name, ",\"ax\",@progbits"),
                concat!(".globl ", $name),
                concat!(".type ", $name, ",@function"),
                concat!($name, ":"),
                "    push rbp",
                concat!("    .fill ", $nops, ", 1, 0x90"),
                "    mov al, byte ptr [rdi]",
                "    movzx eax, al",
                "    pop rbp",
                "    ret",
                concat!(".size ", $name, ", . - ", $name),
                ".popsection",
            )*
        );
    };
}
parked_at!("hook_parked_at_1": 0, "hook_parked_at_2": 1, "hook_parked_at_3": 2, "hook_parked_at_4": 3);

unsafe extern "C" {
    fn hook_parked_at_1(byte: *const u8) -> u32;
    fn hook_parked_at_2(byte: *const u8) -> u32;
    fn hook_parked_at_3(byte: *const u8) -> u32;
    fn hook_parked_at_4(byte: *const u8) -> u32;
}

/// A thread at each instruction of the replaced bytes (parked in a load
/// at f+1, f+2, f+3, f+4): the write waits for it and refuses at its
/// deadline, naming it and the offset, nothing changed; the thread then
/// finishes normally, and the write succeeds once it has left.
#[test]
fn a_thread_at_each_instruction_of_the_entry_is_waited_for() {
    let _one = serial();
    type Parked = unsafe extern "C" fn(*const u8) -> u32;
    let functions: [(usize, Parked); 4] = [
        (1, hook_parked_at_1),
        (2, hook_parked_at_2),
        (3, hook_parked_at_3),
        (4, hook_parked_at_4),
    ];
    for (k, f) in functions {
        let Some(page) = MissingPage::new().map(Arc::new) else {
            println!("skipped: userfaultfd is unavailable here (needed to park a thread)");
            return;
        };
        let target = Target::of(f as *const ()).unwrap();
        assert!(target.check().unwrap() > k, "f+{k} is inside the entry");
        let before = code(&target);
        let parked = {
            let page = Arc::clone(&page);
            thread::Builder::new()
                .name(format!("parked-at-f+{k}"))
                // SAFETY: reads one byte of a mapped page.
                .spawn(move || unsafe { f(page.page) })
                .unwrap()
        };
        let mut msg = [0u64; 4];
        // SAFETY: reading the fault's message into memory we own.
        let n = unsafe { libc::read(page.uffd, msg.as_mut_ptr().cast(), 32) };
        assert_eq!(n, 32, "{}", std::io::Error::last_os_error());
        let options = Options::default().deadline(Duration::from_millis(300));
        match reason(hook::install_with(&target, &options).unwrap_err()) {
            Reason::ThreadInside { thread, offset } => {
                assert_eq!(offset, k);
                assert_eq!(thread.name, format!("parked-at-f+{k}"));
            }
            other => panic!("f+{k}: {other:?}"),
        }
        assert_eq!(code(&target), before, "f+{k}: nothing changed");
        page.release();
        assert_eq!(parked.join().unwrap(), 0, "f+{k}: finished normally");
        let hook = hook::install_with(&target, &options).unwrap();
        let byte = 0x5a_u8;
        // SAFETY: through the hook, the original code: reads one byte.
        assert_eq!(unsafe { f(&byte) }, 0x5a);
        hook.unhook().unwrap();
        assert_eq!(code(&target), before);
    }
}

static IN_HANDLER: AtomicBool = AtomicBool::new(false);
static LEAVE_HANDLER: AtomicBool = AtomicBool::new(false);

/// A `SIGUSR2` handler that stays until told to leave.
extern "C" fn lingering_handler(_: libc::c_int) {
    // Relaxed: flags polled by the test and by this handler.
    IN_HANDLER.store(true, Ordering::Relaxed);
    // Relaxed: as above.
    while !LEAVE_HANDLER.load(Ordering::Relaxed) {
        let pause = libc::timespec {
            tv_sec: 0,
            tv_nsec: 1_000_000,
        };
        // SAFETY: nanosleep is async-signal-safe.
        unsafe { libc::nanosleep(&pause, std::ptr::null_mut()) };
    }
}

#[test]
fn a_thread_inside_the_entry_under_another_signal_handler_is_seen() {
    let _one = serial();
    let Some(page) = MissingPage::new().map(Arc::new) else {
        println!("skipped: userfaultfd is unavailable here (needed to park a thread at f+1)");
        return;
    };
    let target = Target::of(hook_parked_target as *const ()).unwrap();
    let before = code(&target);
    // SAFETY: installing a handler for SIGUSR2, which nothing else in this
    // test binary uses; an empty mask (the default: its own signal blocked).
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = lingering_handler as *const () as usize;
        action.sa_flags = libc::SA_RESTART;
        assert_eq!(
            libc::sigaction(libc::SIGUSR2, &action, std::ptr::null_mut()),
            0
        );
    }
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let parked = {
        let page = Arc::clone(&page);
        thread::Builder::new()
            .name("handler-at-f+1".into())
            .spawn(move || {
                // SAFETY: gettid has no preconditions.
                tid_tx.send(unsafe { libc::gettid() }).unwrap();
                // SAFETY: reads one byte of a mapped page.
                unsafe { hook_parked_target(page.page) }
            })
            .unwrap()
    };
    let tid = tid_rx.recv().unwrap();
    let mut msg = [0u64; 4];
    // SAFETY: reading the fault's message into memory we own.
    let n = unsafe { libc::read(page.uffd, msg.as_mut_ptr().cast(), 32) };
    assert_eq!(n, 32, "{}", std::io::Error::last_os_error());
    assert_eq!(
        msg[2] & !0xfff,
        page.page as u64,
        "the thread is in the load at f+1"
    );
    // Interrupt the load: the handler runs with f+1 in its signal frame.
    // SAFETY: a signal to a thread of this process, which has a handler.
    let sent = unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, libc::SIGUSR2) };
    assert_eq!(sent, 0);
    // Relaxed: a flag.
    while !IN_HANDLER.load(Ordering::Relaxed) {
        thread::sleep(Duration::from_millis(1));
    }

    let options = Options::default().deadline(Duration::from_secs(1));
    match reason(hook::install_with(&target, &options).unwrap_err()) {
        Reason::ThreadInside { thread, offset } => {
            assert_eq!(offset, 1, "the position saved by the other handler");
            assert_eq!(thread.name, "handler-at-f+1");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(code(&target), before);

    page.release();
    // Relaxed: a flag.
    LEAVE_HANDLER.store(true, Ordering::Relaxed);
    assert_eq!(
        parked.join().unwrap(),
        0,
        "the thread resumed the original load"
    );
}

#[test]
fn a_thread_that_blocks_the_stop_signal_is_named() {
    let _one = serial();
    let target = Target::of(price as *const ()).unwrap();
    let before = code(&target);
    let (blocked_tx, blocked_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let blocker = thread::Builder::new()
        .name("blocks-stop".into())
        .spawn(move || {
            // SAFETY: building and installing a signal mask for this thread.
            unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, hook::signal());
                libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            }
            blocked_tx.send(()).unwrap();
            done_rx.recv().unwrap();
        })
        .unwrap();
    blocked_rx.recv().unwrap();
    let options = Options::default().deadline(Duration::from_secs(2));
    let e = hook::install_with(&target, &options).unwrap_err();
    let text = e.to_string();
    match reason(e) {
        Reason::NotStopped(late) => {
            assert_eq!(late.len(), 1, "{late:?}");
            assert_eq!(late[0].0.name, "blocks-stop");
            assert!(late[0].1, "said to block the signal");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        text.contains("blocks-stop") && text.contains("nothing changed"),
        "{text}"
    );
    assert_eq!(code(&target), before);
    done_tx.send(()).unwrap();
    blocker.join().unwrap();
}

#[inline(never)]
fn stress_a(x: u64) -> u64 {
    x ^ 0xa5a5
}
#[inline(never)]
fn stress_b(x: u64) -> u64 {
    x ^ 0x5a5a
}
fn stress_a_new(x: u64) -> u64 {
    x ^ 0x1111
}
fn stress_b_new(x: u64) -> u64 {
    x ^ 0x2222
}

/// 8 threads call two hooked functions through function pointers while
/// `cycles` times both are hooked, redirected, pointed back and unhooked
/// (with `options`' protocol). Every answer is the old or the new one; no
/// signal kills the process; nothing is left writable.
fn stress(cycles: usize, options: Options) {
    let _one = serial();
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let start = Arc::new(Barrier::new(9));
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let (stop, calls, start) = (stop.clone(), calls.clone(), start.clone());
            thread::Builder::new()
                .name(format!("caller-{w}"))
                .spawn(move || {
                    let a: fn(u64) -> u64 = black_box(stress_a);
                    let b: fn(u64) -> u64 = black_box(stress_b);
                    start.wait();
                    let mut x = w as u64;
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let (ra, rb) = (a(x), b(x));
                        assert!(ra == x ^ 0xa5a5 || ra == x ^ 0x1111, "a({x}) = {ra}");
                        assert!(rb == x ^ 0x5a5a || rb == x ^ 0x2222, "b({x}) = {rb}");
                        x = x.wrapping_add(1);
                        n += 1;
                    }
                    calls.fetch_add(n, Ordering::Relaxed);
                })
                .unwrap()
        })
        .collect();
    let ta = Target::of(stress_a as *const ()).unwrap();
    let tb = Target::of(stress_b as *const ()).unwrap();
    let (before_a, before_b) = (code(&ta), code(&tb));
    let options = options.deadline(Duration::from_secs(30));
    start.wait();
    for _ in 0..cycles {
        let ha = hook::install_with(&ta, &options).unwrap();
        let hb = hook::install_with(&tb, &options).unwrap();
        // SAFETY: the same signatures.
        unsafe {
            ha.redirect(stress_a_new as *const ()).unwrap();
            hb.redirect(stress_b_new as *const ()).unwrap();
        }
        ha.restore().unwrap();
        // SAFETY: as above.
        unsafe { ha.redirect(stress_a_new as *const ()).unwrap() };
        ha.unhook().unwrap();
        hb.unhook().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    assert!(calls.load(Ordering::Relaxed) > 0);
    assert_eq!((code(&ta), code(&tb)), (before_a, before_b));
    let mut ranges = hook::mapped();
    for t in [&ta, &tb] {
        ranges.push((t.addr() as usize, t.addr() as usize + t.len()));
    }
    assert_eq!(writable_code(&ranges), Vec::<String>::new());
}

#[test]
fn stress_hook_cycles_under_calls() {
    stress(50, Options::default());
}

/// The `mprotect` write path while the other threads run the same page
/// (it stays executable throughout; nothing is left writable).
#[test]
fn stress_hook_cycles_under_calls_mprotect() {
    stress(50, Options::default().write_path(WritePath::Mprotect));
}

#[test]
fn stress_hook_cycles_under_calls_stop_the_world() {
    stress(50, Options::default().stop_the_world(true));
}

#[test]
#[ignore = "long form: 10,000 cycles (minutes on 2 cores)"]
fn stress_hook_cycles_under_calls_long() {
    stress(10_000, Options::default());
}

#[test]
#[ignore = "long form: 10,000 cycles (minutes on 2 cores)"]
fn stress_hook_cycles_under_calls_stop_the_world_long() {
    stress(10_000, Options::default().stop_the_world(true));
}

#[inline(never)]
fn trapped(x: u64) -> u64 {
    x.rotate_left(7) ^ 0x3c3c
}
fn trapped_new(x: u64) -> u64 {
    x.rotate_left(7) ^ 0x4242
}

/// Calls that meet the `int3` of an entry being written take the
/// breakpoint to the stub: 6 threads call `trapped` in a loop (through a
/// function pointer, so every call enters its entry) while `cycles` times
/// it is hooked, redirected and unhooked with the breakpoint protocol.
/// Every answer is the original's or the replacement's; no thread dies of
/// a SIGTRAP, SIGSEGV or SIGILL; the bytes are the original ones at the
/// end. Returns the calls that took the breakpoint.
fn trap_window(cycles: usize) -> u64 {
    let _one = serial();
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let start = Arc::new(Barrier::new(7));
    let workers: Vec<_> = (0..6)
        .map(|w| {
            let (stop, calls, start) = (stop.clone(), calls.clone(), start.clone());
            thread::Builder::new()
                .name(format!("trap-caller-{w}"))
                .spawn(move || {
                    let f: fn(u64) -> u64 = black_box(trapped);
                    start.wait();
                    let mut x = w as u64;
                    let mut n = 0u64;
                    // Relaxed: a stop flag.
                    while !stop.load(Ordering::Relaxed) {
                        let r = f(x);
                        let (old, new) = (x.rotate_left(7) ^ 0x3c3c, x.rotate_left(7) ^ 0x4242);
                        assert!(r == old || r == new, "trapped({x}) = {r}");
                        x = x.wrapping_add(1);
                        n += 1;
                    }
                    // Relaxed: read after the join.
                    calls.fetch_add(n, Ordering::Relaxed);
                })
                .unwrap()
        })
        .collect();
    let target = Target::of(trapped as *const ()).unwrap();
    let before = code(&target);
    let traps = hook::traps();
    let options = Options::default()
        .deadline(Duration::from_secs(30))
        .stop_the_world(false);
    start.wait();
    for _ in 0..cycles {
        let h = hook::install_with(&target, &options).unwrap();
        assert_eq!(h.report().protocol, Protocol::Breakpoint);
        // SAFETY: the same signature.
        unsafe { h.redirect(trapped_new as *const ()) }.unwrap();
        let r = h.unhook().unwrap();
        assert_eq!(r.protocol, Protocol::Breakpoint);
        assert_eq!(r.rounds, 0, "an unhook samples no thread");
    }
    // Relaxed: a stop flag.
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    // Relaxed: after the joins.
    assert!(calls.load(Ordering::Relaxed) > 0);
    assert_eq!(code(&target), before);
    hook::traps() - traps
}

#[test]
fn calls_during_the_write_take_the_breakpoint_to_the_stub() {
    let trapped = trap_window(50);
    println!("{trapped} calls took the breakpoint");
}

#[test]
#[ignore = "long form: 10,000 cycles (a minute or more on 2 cores)"]
fn calls_during_the_write_take_the_breakpoint_to_the_stub_long() {
    let trapped = trap_window(10_000);
    println!("{trapped} calls took the breakpoint");
    assert!(trapped > 0, "no call met an int3 in 10,000 cycles");
}

#[inline(never)]
fn busy_target(x: u64) -> u64 {
    x ^ 0x99
}

/// The state of thread `tid` (`R` running, `S` sleeping, ...).
fn thread_state(tid: i32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
    let (_, rest) = stat.rsplit_once(')').unwrap();
    rest.trim_start().chars().next().unwrap()
}

/// The breakpoint protocol holds no thread while it waits: a thread that
/// blocks the stop signal keeps the sampling waiting until the deadline,
/// and meanwhile a thread calling the target in a loop keeps running
/// (its calls go on; it is never seen asleep, which a thread parked in
/// the stop-the-world's handler is). Run with `stop_the_world`, it is
/// parked until the deadline: the test fails there, as it did before the
/// breakpoint protocol.
fn no_thread_is_held(options: Options) -> Result<(), String> {
    let _one = serial();
    let target = Target::of(busy_target as *const ()).unwrap();
    let before = code(&target);
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let caller = {
        let (stop, calls) = (stop.clone(), calls.clone());
        thread::Builder::new()
            .name("busy-caller".into())
            .spawn(move || {
                // SAFETY: gettid has no preconditions.
                tid_tx.send(unsafe { libc::gettid() }).unwrap();
                let f: fn(u64) -> u64 = black_box(busy_target);
                let mut x = 0u64;
                // Relaxed: a stop flag.
                while !stop.load(Ordering::Relaxed) {
                    x = f(x).wrapping_add(1);
                    // Relaxed: a counter read by the observer.
                    calls.fetch_add(1, Ordering::Relaxed);
                }
            })
            .unwrap()
    };
    let caller_tid = tid_rx.recv().unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    // The observer blocks the stop signal (so the write waits for it until
    // the deadline, and it is never stopped itself), sees its own signal
    // pending (the write's signals are out), then watches the caller until
    // the write gives up.
    let observer = {
        let (calls, done) = (calls.clone(), done.clone());
        thread::Builder::new()
            .name("blocks-watches".into())
            .spawn(move || {
                // SAFETY: this thread's own signal mask.
                unsafe {
                    let mut set: libc::sigset_t = std::mem::zeroed();
                    libc::sigemptyset(&mut set);
                    libc::sigaddset(&mut set, hook::signal());
                    libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
                }
                ready_tx.send(()).unwrap();
                let pending = || {
                    // SAFETY: a zeroed sigset_t filled by sigpending.
                    unsafe {
                        let mut set: libc::sigset_t = std::mem::zeroed();
                        libc::sigpending(&mut set);
                        libc::sigismember(&set, hook::signal()) == 1
                    }
                };
                // Relaxed: a flag.
                while !pending() && !done.load(Ordering::Relaxed) {
                    thread::yield_now();
                }
                // Relaxed: a counter.
                let first = calls.load(Ordering::Relaxed);
                let mut asleep = 0u32;
                let mut looks = 0u32;
                // Relaxed: set by the test once the write returned.
                while !done.load(Ordering::Relaxed) {
                    looks += 1;
                    if thread_state(caller_tid) == 'S' {
                        asleep += 1;
                    }
                    thread::sleep(Duration::from_millis(1));
                }
                // Relaxed: the caller still runs; any value since is fine.
                let progress = calls.load(Ordering::Relaxed) - first;
                // Take the pending signal: nothing is waiting for it now.
                // SAFETY: unblocking this thread's own mask.
                unsafe {
                    let mut set: libc::sigset_t = std::mem::zeroed();
                    libc::sigemptyset(&mut set);
                    libc::sigaddset(&mut set, hook::signal());
                    libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
                }
                (progress, asleep, looks)
            })
            .unwrap()
    };
    ready_rx.recv().unwrap();
    let e = hook::install_with(&target, &options.deadline(Duration::from_millis(300))).unwrap_err();
    // Relaxed: a flag.
    done.store(true, Ordering::Relaxed);
    let (progress, asleep, looks) = observer.join().unwrap();
    // Relaxed: a stop flag.
    stop.store(true, Ordering::Relaxed);
    caller.join().unwrap();
    match reason(e) {
        Reason::NotStopped(late) => {
            assert!(
                late.iter()
                    .any(|(t, blocks)| *blocks && t.name == "blocks-watches"),
                "{late:?}"
            )
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(code(&target), before, "nothing changed");
    if asleep > 0 || progress == 0 {
        return Err(format!(
            "the caller was held: seen asleep {asleep} times in {looks} looks, {progress} calls              while the write waited"
        ));
    }
    Ok(())
}

#[test]
fn the_breakpoint_protocol_holds_no_thread_while_it_waits() {
    no_thread_is_held(Options::default().stop_the_world(false)).unwrap();
}

#[test]
fn the_stop_the_world_holds_every_thread_while_it_waits() {
    let held = no_thread_is_held(Options::default().stop_the_world(true)).unwrap_err();
    println!("{held}");
    assert!(held.contains("held"), "{held}");
}

#[inline(never)]
fn faulted(x: u64) -> u64 {
    x ^ 0x5151
}
fn faulted_new(x: u64) -> u64 {
    x ^ 0x1515
}

/// A write that fails at any step of the breakpoint protocol (fault
/// injection) puts back the bytes that were there: an install leaves the
/// original code, an unhook leaves the hook; both then succeed.
#[test]
fn a_failed_write_at_any_step_puts_back_what_was_there() {
    let _one = serial();
    let f: fn(u64) -> u64 = black_box(faulted);
    let target = Target::of(faulted as *const ()).unwrap();
    let before = code(&target);
    let options = Options::default().stop_the_world(false);
    for point in [
        "hook::write::int3",
        "hook::write::rest",
        "hook::write::first",
    ] {
        {
            let _fault = FailGuard::new(point, "return").unwrap();
            let e = hook::install_with(&target, &options).unwrap_err();
            let text = e.to_string();
            match reason(e) {
                Reason::WriteFailed { detail } => {
                    assert!(detail.contains(point), "{detail}");
                    assert!(!detail.contains("failed too"), "{detail}");
                }
                other => panic!("{point}: {other:?}"),
            }
            assert!(text.contains("nothing changed"), "{text}");
        }
        assert_eq!(
            code(&target),
            before,
            "{point}: install: the original bytes"
        );
        assert_eq!(f(1), 1 ^ 0x5151);

        let h = hook::install_with(&target, &options).unwrap();
        // SAFETY: the same signature.
        unsafe { h.redirect(faulted_new as *const ()) }.unwrap();
        let hooked = code(&target);
        {
            let _fault = FailGuard::new(point, "return").unwrap();
            match reason(h.unhook().unwrap_err()) {
                Reason::WriteFailed { detail } => assert!(detail.contains(point), "{detail}"),
                other => panic!("{point}: {other:?}"),
            }
        }
        assert_eq!(code(&target), hooked, "{point}: unhook: still hooked");
        assert_eq!(f(1), 1 ^ 0x1515, "{point}: the redirection holds");
        h.unhook().unwrap();
        assert_eq!(code(&target), before);
        assert_eq!(f(1), 1 ^ 0x5151);
    }
}

#[test]
fn a_write_back_that_fails_too_is_not_called_nothing_changed() {
    // The write fails at its second step and putting back what was there
    // fails too (injected after the bytes went back, so the process stays
    // sound): the error must not say "nothing changed".
    let _serial = serial();
    let f: fn(u64) -> u64 = std::hint::black_box(faulted);
    let target = Target::of(faulted as *const ()).unwrap();
    let before = code(&target);
    let options = Options::default().stop_the_world(false);
    {
        let _fault = FailGuard::new("hook::write::rest", "return").unwrap();
        let _undo = FailGuard::new("hook::write::undo", "return").unwrap();
        let e = hook::install_with(&target, &options).unwrap_err();
        let text = e.to_string();
        assert!(!text.contains("nothing changed"), "{text}");
        assert!(text.contains("NEITHER VERSION"), "{text}");
        match reason(e) {
            Reason::NotRestored { detail } => {
                assert!(detail.contains("hook::write::undo"), "{detail}")
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(code(&target), before);
    assert_eq!(f(1), 1 ^ 0x5151);
}

// ---- Where code may not be written (child processes) ----

const CHILD: &str = "HOTPATCH_HOOK_TEST_CHILD";

/// Runs the test `name` again in a child process with `CHILD=mode`; returns
/// its output. The child makes its process-wide settings (`PR_SET_MDWE`
/// cannot be undone) there, not here.
fn in_child(name: &str, mode: &str) -> String {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(CHILD, mode)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "child {mode} failed: {text}");
    text
}

/// `PR_SET_MDWE` with `PR_MDWE_REFUSE_EXEC_GAIN`; false where the kernel
/// lacks it.
fn deny_write_execute() -> bool {
    // SAFETY: a process-wide flag, set in a child process only.
    unsafe { libc::prctl(65, 1, 0, 0, 0) == 0 }
}

/// Landlock: no file may be opened for writing, `/proc/self/mem`
/// included (this thread and the ones it creates). False where the
/// kernel lacks Landlock.
fn deny_proc_mem() -> bool {
    const LANDLOCK_ACCESS_FS_WRITE_FILE: u64 = 1 << 1;
    let attr = [LANDLOCK_ACCESS_FS_WRITE_FILE];
    // SAFETY: landlock system calls on memory we own.
    unsafe {
        let fd = libc::syscall(
            libc::SYS_landlock_create_ruleset,
            attr.as_ptr(),
            8usize,
            0u32,
        );
        if fd < 0 {
            return false;
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return false;
        }
        libc::syscall(libc::SYS_landlock_restrict_self, fd as libc::c_int, 0u32) == 0
    }
}

#[inline(never)]
fn guarded(x: u64) -> u64 {
    x ^ 0x77
}
fn guarded_new(x: u64) -> u64 {
    x ^ 0x33
}

/// The child's part: hook `guarded`, and say how it went.
fn child_hooks(expect: Result<WritePath, &str>) {
    let f: fn(u64) -> u64 = black_box(guarded);
    let target = Target::of(guarded as *const ()).unwrap();
    let before = code(&target);
    match (hook::install(&target), expect) {
        (Ok(hook), Ok(path)) => {
            assert_eq!(hook.report().write_path, path);
            // SAFETY: the same signature.
            unsafe { hook.redirect(guarded_new as *const ()) }.unwrap();
            assert_eq!(f(1), 1 ^ 0x33);
            hook.unhook().unwrap();
            let mut ranges = hook::mapped();
            ranges.push((
                target.addr() as usize,
                target.addr() as usize + target.len(),
            ));
            assert_eq!(writable_code(&ranges), Vec::<String>::new());
            println!("CHILD-OK hooked through {path:?}");
        }
        (Err(e), Err(setting)) => {
            let text = e.to_string();
            assert!(matches!(reason(e), Reason::WriteDenied(_)), "{text}");
            assert!(
                text.contains(setting) && text.contains("nothing changed"),
                "{text}"
            );
            assert_eq!(code(&target), before);
            assert_eq!(f(1), 1 ^ 0x77);
            println!("CHILD-OK refused: {text}");
        }
        (Ok(hook), Err(_)) => panic!(
            "hooked through {:?}, expected a refusal",
            hook.report().write_path
        ),
        (Err(e), Ok(_)) => panic!("refused: {e}"),
    }
}

#[test]
fn under_memory_deny_write_execute_code_is_written_through_proc_mem() {
    match std::env::var(CHILD).as_deref() {
        Ok("mdwe") => {
            assert!(deny_write_execute());
            child_hooks(Ok(WritePath::ProcMem));
        }
        _ => {
            let _one = serial();
            if !deny_write_execute_supported() {
                println!("skipped: this kernel has no PR_SET_MDWE (Linux >= 6.3)");
                return;
            }
            let out = in_child(
                "under_memory_deny_write_execute_code_is_written_through_proc_mem",
                "mdwe",
            );
            assert!(out.contains("CHILD-OK hooked through ProcMem"), "{out}");
        }
    }
}

#[test]
fn without_proc_mem_code_is_written_with_mprotect_and_protection_restored() {
    match std::env::var(CHILD).as_deref() {
        Ok("landlock") => {
            assert!(deny_proc_mem());
            child_hooks(Ok(WritePath::Mprotect));
        }
        _ => {
            let _one = serial();
            if !deny_proc_mem_supported() {
                println!("skipped: this kernel has no Landlock (needed to deny /proc/self/mem)");
                return;
            }
            let out = in_child(
                "without_proc_mem_code_is_written_with_mprotect_and_protection_restored",
                "landlock",
            );
            assert!(out.contains("CHILD-OK hooked through Mprotect"), "{out}");
        }
    }
}

#[test]
fn with_neither_write_path_the_hook_is_refused_naming_the_setting() {
    match std::env::var(CHILD).as_deref() {
        Ok("both") => {
            assert!(deny_write_execute() && deny_proc_mem());
            child_hooks(Err("PR_SET_MDWE"));
        }
        _ => {
            let _one = serial();
            if !deny_write_execute_supported() || !deny_proc_mem_supported() {
                println!("skipped: this kernel lacks PR_SET_MDWE or Landlock");
                return;
            }
            let out = in_child(
                "with_neither_write_path_the_hook_is_refused_naming_the_setting",
                "both",
            );
            assert!(out.contains("CHILD-OK refused"), "{out}");
        }
    }
}

fn deny_write_execute_supported() -> bool {
    // PR_GET_MDWE answers (0 here) where the kernel has it.
    // SAFETY: reads a flag.
    unsafe { libc::prctl(66, 0, 0, 0, 0) >= 0 }
}

fn deny_proc_mem_supported() -> bool {
    // LANDLOCK_CREATE_RULESET_VERSION: the ABI version, > 0 where supported.
    // SAFETY: a query with no attributes.
    unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32,
        ) > 0
    }
}

// ---- SIGTRAP that is not ours (child processes) ----

static FOREIGN_TRAPS: AtomicU64 = AtomicU64::new(0);

extern "C" fn foreign_trap(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let code = unsafe { (*info).si_code };
    assert_eq!(code, 0x80, "SI_KERNEL: an int3");
    // Relaxed: a counter read by the same thread after the trap.
    FOREIGN_TRAPS.fetch_add(1, Ordering::Relaxed);
}

/// Hooks and unhooks `guarded` with the breakpoint protocol (so hotpatch's
/// SIGTRAP handler is installed), then executes an `int3` of its own.
fn child_traps() {
    // No core file when the trap ends this child.
    let none = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a limit of this child process.
    unsafe { libc::setrlimit(libc::RLIMIT_CORE, &none) };
    let f: fn(u64) -> u64 = black_box(guarded);
    let target = Target::of(guarded as *const ()).unwrap();
    let hook = hook::install_with(&target, &Options::default().stop_the_world(false)).unwrap();
    assert_eq!(hook.report().protocol, Protocol::Breakpoint);
    // SAFETY: the same signature.
    unsafe { hook.redirect(guarded_new as *const ()) }.unwrap();
    assert_eq!(f(1), 1 ^ 0x33);
    println!("CHILD-TRAP");
    // SAFETY: a breakpoint instruction; the test installed (or not) what
    // takes it.
    unsafe { std::arch::asm!("int3") };
    assert_eq!(f(1), 1 ^ 0x33, "the hook still works after a foreign trap");
    hook.unhook().unwrap();
    println!("CHILD-RESUMED");
}

/// Under a debugger (gdb, which takes every `SIGTRAP` as its own stop)
/// the breakpoint protocol does not run: the write falls back to the
/// stop-the-world and the report says why.
#[test]
fn a_traced_process_writes_with_the_stop_the_world() {
    if std::env::var(CHILD).as_deref() == Ok("traced") {
        let target = Target::of(guarded as *const ()).unwrap();
        let hook = hook::install_with(&target, &Options::default().stop_the_world(false)).unwrap();
        match hook.report().protocol {
            Protocol::StopTheWorld(Fallback::Traced(pid)) => assert!(pid > 0),
            other => panic!("{other:?}"),
        }
        hook.unhook().unwrap();
        println!("CHILD-OK {}", hook.report().protocol);
        return;
    }
    let _one = serial();
    let out = std::process::Command::new("gdb")
        .args([
            "-nx",
            "-batch",
            "-ex",
            "handle all nostop noprint pass",
            "-ex",
            "run",
        ])
        .arg("--args")
        .arg(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_traced_process_writes_with_the_stop_the_world",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "traced")
        .output();
    let out = match out {
        Ok(out) => out,
        Err(e) => panic!("gdb (the Debian package, which .ci/run installs): {e}"),
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("CHILD-OK stop-the-world"), "{text}");
}

/// Runs the test `name` in a child with `CHILD=mode`; returns its output
/// and the signal that ended it, if one did.
fn in_child_status(name: &str, mode: &str) -> (String, Option<i32>) {
    use std::os::unix::process::ExitStatusExt;
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(CHILD, mode)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (text, out.status.signal())
}

/// A SIGTRAP that is not a hook's (an `int3` of the program) reaches the
/// handler the program installed before hotpatch's, which returns, and the
/// program goes on; with no handler of its own (the default action) the
/// process dies of the SIGTRAP as it would have without hotpatch, and so
/// when SIGTRAP was ignored (the kernel does not let a trap be ignored).
#[test]
fn a_foreign_int3_goes_where_it_went_before() {
    match std::env::var(CHILD).as_deref() {
        Ok("trap-handler") => {
            // SAFETY: installing a handler for SIGTRAP in this child process,
            // before hotpatch installs its own.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = foreign_trap as *const () as usize;
                action.sa_flags = libc::SA_SIGINFO;
                assert_eq!(
                    libc::sigaction(libc::SIGTRAP, &action, std::ptr::null_mut()),
                    0
                );
            }
            child_traps();
            // Relaxed: incremented by this thread's handler.
            assert_eq!(FOREIGN_TRAPS.load(Ordering::Relaxed), 1);
            println!("CHILD-OK");
        }
        Ok("trap-default") => child_traps(),
        Ok("trap-ignored") => {
            // SAFETY: ignoring SIGTRAP in this child process.
            unsafe { libc::signal(libc::SIGTRAP, libc::SIG_IGN) };
            // A SIGTRAP sent by a process stays ignored.
            // SAFETY: a signal to this process.
            assert_eq!(unsafe { libc::kill(libc::getpid(), libc::SIGTRAP) }, 0);
            child_traps();
        }
        _ => {
            let _one = serial();
            let name = "a_foreign_int3_goes_where_it_went_before";
            let (out, signal) = in_child_status(name, "trap-handler");
            assert_eq!(signal, None, "{out}");
            assert!(
                out.contains("CHILD-RESUMED") && out.contains("CHILD-OK"),
                "{out}"
            );
            for mode in ["trap-default", "trap-ignored"] {
                let (out, signal) = in_child_status(name, mode);
                assert_eq!(signal, Some(libc::SIGTRAP), "{mode}: {out}");
                assert!(out.contains("CHILD-TRAP"), "{mode}: {out}");
                assert!(!out.contains("CHILD-RESUMED"), "{mode}: {out}");
            }
        }
    }
}
