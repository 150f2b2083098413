//! Fuzzing the manifest checks with proptest: manifests and replacement
//! records with arbitrary raw field values, checked by [`fields`] (steps
//! 1 to 6 of [`check`]) and by step 7's [`patch_fn`] and [`hook_fn`].
//!
//! The checks only accept a manifest inside a loaded object, so the inputs
//! are written into [`ARENA`], writable memory of this test binary. Their
//! pointers point into the arena, read-only data, relocated read-only data
//! (RELRO), code, the heap, past the end of the arena's mapping, into
//! another object, or anywhere at all. Lengths and counts run from 0 to
//! `usize::MAX`, with the limits and their neighbours. Empty strings, empty
//! tables and empty layouts get dangling pointers (as the compiler gives
//! `""` and `&[]`), which must be accepted where the field may be empty.
//!
//! Calling a getter runs code, which the runtime trusts once it knows it is
//! the library's code. So the getters that get called are functions of
//! this module (returning fuzzed tables); the getter *fields* also get
//! addresses that are no such function, and those must be refused before
//! any getter is called.
//!
//! A record's target getter must be the *host's* code, not the library's
//! (a thin patch binds it to the service's own). Both are this binary
//! here, so the records are checked against two images cut from it
//! ([`Image::split_code`]): the host's is [`fuzz_target`] alone, the
//! library's everything else. The target getter gets the host's getter,
//! code of the library (a private copy), or an address in neither; only
//! the first may be called.
//!
//! What must hold, besides not crashing:
//! - an `Err` is one of the manifest errors and names the file;
//! - an `Ok` hands over only memory of this binary (`dladdr`) that the
//!   kernel maps as the runtime will use it (`/proc/self/maps`): tables and
//!   strings readable, slot references and the panic counter writable (not
//!   RELRO, which the kernel maps read-only), functions executable;
//!   aligned;
//! - a getter field that is not this binary's code means `Err`, with no
//!   getter called;
//! - a manifest whose every field is right is accepted.
//!
//! `PROPTEST_CASES` sets the number of cases of each test (default 2,000,
//! a few seconds); the long run is `PROPTEST_CASES=200000 cargo test -p
//! hotpatch --release --lib fuzz -- --nocapture`.

use std::path::Path;
use std::ptr::{null, slice_from_raw_parts};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize};
use std::sync::{LazyLock, Mutex};
use std::time::Instant;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRunner};

use super::{Fields, MAX_ENTRY, MAX_FUNCTIONS, MAX_STR, fields, hook_fn, patch_fn};
use crate::Error;
use crate::abi::{
    ABI_VERSION, Entry, HookFn, MAGIC, Manifest, PANIC_STRATEGY, PatchFn, RUSTC_VERSION, RawStr,
    SlotRef, TARGET, TypeLayout,
};
use crate::image::Image;
use crate::slot::FnAddr;

const PATH: &str = "/fuzz/patch.so";

// ---- Memory the inputs live in

/// Where manifests are written: `[0, RECORDS)`.
const RECORDS: usize = 1024;
/// Where replacement records are written: `[RECORDS, DATA)`.
const DATA: usize = 2048;
/// Strings and tables: `[DATA, ARENA_LEN)`, refilled each case.
const ARENA_LEN: usize = 8192;
/// Room for a table of up to 4 entries of any kind.
const TABLE: usize = 512;

#[repr(C, align(64))]
struct Arena([u8; ARENA_LEN]);

/// Writable memory of this binary (`.bss`).
static mut ARENA: Arena = Arena([0; ARENA_LEN]);

/// Read-only data of this binary (`.rodata`).
static READ_ONLY: [u8; 256] = {
    let mut b = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        b[i] = i as u8;
        i += 1;
    }
    b
};

/// Relocated data, read-only after start-up (`.data.rel.ro`, RELRO).
static RELRO: [&u8; 8] = [&0; 8];

/// One test at a time uses the arena and the getters' statics.
static LOCK: Mutex<()> = Mutex::new(());

fn arena() -> usize {
    (&raw const ARENA) as usize
}

/// A heap block, never freed: readable, writable, no object's memory.
static HEAP: LazyLock<usize> = LazyLock::new(|| Box::leak(Box::new([0u64; 128])).as_ptr() as usize);

unsafe extern "C" {
    /// A function of another object (the C library).
    safe fn getpid() -> i32;
}

/// Where a pointer points.
#[derive(Clone, Copy, Debug)]
enum Addr {
    Null,
    /// The arena, at this offset (possibly past its end).
    Arena(usize),
    ReadOnly(usize),
    Relro(usize),
    /// Code of this binary, at this offset from a function.
    Text(usize),
    Heap(usize),
    /// The end of this binary's memory after the arena (where its last
    /// writable segment's pages end), plus this.
    ImageEnd(isize),
    /// A function of the C library.
    OtherObject,
    Wild(usize),
}

impl Addr {
    fn get(self) -> usize {
        match self {
            Addr::Null => 0,
            Addr::Arena(off) => arena() + off,
            Addr::ReadOnly(off) => READ_ONLY.as_ptr() as usize + off,
            Addr::Relro(off) => (&raw const RELRO) as usize + off,
            Addr::Text(off) => fuzz_init as fn() -> Result<(), String> as usize + off,
            Addr::Heap(off) => *HEAP + off,
            Addr::ImageEnd(delta) => MAPS.image_end.wrapping_add_signed(delta),
            Addr::OtherObject => getpid as *const () as usize,
            Addr::Wild(a) => a,
        }
    }
}

fn wild() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(1usize),
        Just(8),
        Just(0x1000),
        Just(0x7fff_ffff_f000),
        Just(1 << 47),
        Just(usize::MAX),
        Just(usize::MAX - 7),
        Just(usize::MAX / 2 + 1),
        any::<usize>(),
    ]
}

/// An offset below `end`, mostly a multiple of 8.
fn offset(end: usize) -> impl Strategy<Value = usize> {
    prop_oneof![3 => (0..end / 8).prop_map(|i| i * 8), 1 => 0..end]
}

/// Any data address.
fn addr() -> impl Strategy<Value = Addr> {
    prop_oneof![
        1 => Just(Addr::Null),
        1 => (0..64usize).prop_map(Addr::Text),
        15 => not_a_getter(),
    ]
}

/// An address put in a getter field that is not one of this module's
/// getters: never null (that is `None`) and never code of this binary,
/// which the runtime would call.
fn not_a_getter() -> impl Strategy<Value = Addr> {
    prop_oneof![
        6 => offset(ARENA_LEN + 256).prop_map(Addr::Arena),
        1 => offset(READ_ONLY.len() + 64).prop_map(Addr::ReadOnly),
        2 => offset(96).prop_map(Addr::Relro),
        1 => offset(1100).prop_map(Addr::Heap),
        1 => (-256..256isize).prop_map(|d| Addr::ImageEnd(d & !7)),
        1 => (-256..256isize).prop_map(Addr::ImageEnd),
        1 => Just(Addr::OtherObject),
        2 => wild().prop_map(Addr::Wild),
    ]
}

/// A non-null address, anywhere: where an empty string's or slice's
/// pointer may dangle (`""` is at 1, an empty `&[u64]` at 8).
fn dangling() -> impl Strategy<Value = Addr> {
    prop_oneof![
        2 => Just(Addr::Wild(1)),
        2 => Just(Addr::Wild(8)),
        1 => Just(Addr::Wild(usize::MAX)),
        3 => not_a_getter(),
    ]
    .prop_filter("not null", |a| a.get() != 0)
}

/// An aligned place in the data part of the arena.
fn data_slot(size: usize) -> impl Strategy<Value = Addr> {
    (0..(ARENA_LEN - DATA - size) / 8).prop_map(|i| Addr::Arena(DATA + 8 * i))
}

fn str_len() -> impl Strategy<Value = usize> {
    prop_oneof![
        6 => 0..80usize,
        1 => MAX_STR - 1..=MAX_STR + 1,
        1 => Just(usize::MAX),
        1 => Just(isize::MAX as usize),
        1 => any::<usize>(),
    ]
}

fn count() -> impl Strategy<Value = usize> {
    prop_oneof![
        2 => Just(0usize),
        6 => 1..5usize,
        1 => Just(MAX_FUNCTIONS),
        1 => Just(MAX_FUNCTIONS + 1),
        1 => Just(usize::MAX),
        1 => Just(usize::MAX / std::mem::size_of::<PatchFn>() + 1),
        1 => any::<usize>(),
    ]
}

/// A string field.
#[derive(Clone, Debug)]
enum Str {
    /// The value a good manifest has.
    Good,
    /// `""` at `at`, which is not null and may be anywhere (an empty
    /// string's pointer dangles).
    Empty { at: Addr },
    /// `len` bytes at `at`; if `at` is in the data part of the arena,
    /// `bytes` are written there first.
    Raw {
        at: Addr,
        len: usize,
        bytes: Vec<u8>,
    },
}

fn string() -> impl Strategy<Value = Str> {
    let bytes = prop_oneof![
        Just(Vec::new()),
        Just(RUSTC_VERSION.as_bytes().to_vec()),
        Just(TARGET.as_bytes().to_vec()),
        Just(b"unwind".to_vec()),
        Just(vec![b's', 0xff, 0xfe, b'x']),
        proptest::collection::vec(any::<u8>(), 0..64),
    ];
    prop_oneof![
        3 => Just(Str::Good),
        1 => dangling().prop_map(|at| Str::Empty { at }),
        2 => (addr(), str_len(), bytes.clone()).prop_map(|(at, len, bytes)| Str::Raw { at, len, bytes }),
        // Right bytes and length, in the arena: readable, so read.
        1 => (data_slot(64), bytes).prop_map(|(at, bytes)| Str::Raw { at, len: bytes.len(), bytes }),
    ]
}

impl Str {
    /// Writes what it needs and returns the field.
    fn place(&self, good: &'static str) -> RawStr {
        match self {
            Str::Good => RawStr::new(good),
            Str::Empty { at } => RawStr {
                ptr: at.get() as *const u8,
                len: 0,
            },
            Str::Raw { at, len, bytes } => {
                write_data(*at, bytes);
                RawStr {
                    ptr: at.get() as *const u8,
                    len: *len,
                }
            }
        }
    }

    /// A right value for a field that may be empty.
    fn right_or_empty(&self) -> bool {
        matches!(self, Str::Good | Str::Empty { .. })
    }

    /// What a right value reads as.
    fn value(&self, good: &'static str) -> Option<&'static str> {
        match self {
            Str::Good => Some(good),
            Str::Empty { .. } => Some(""),
            Str::Raw { .. } => None,
        }
    }

    /// The bytes of a `&str` field of a record.
    fn place_str(&self, good: &'static str) -> *const str {
        let s = self.place(good);
        slice_from_raw_parts(s.ptr, s.len) as *const str
    }
}

/// Writes `bytes` at `at` if that is in the data part of the arena.
fn write_data(at: Addr, bytes: &[u8]) {
    if let Addr::Arena(off) = at
        && off >= DATA
    {
        let n = bytes.len().min(ARENA_LEN - off.min(ARENA_LEN));
        // SAFETY: inside the arena, which only the test holding `LOCK`
        // touches.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), (arena() + off) as *mut u8, n);
        }
    }
}

/// Writes `value` at offset `off` of the record at `base`.
///
/// # Safety
/// `base + off` must be in the arena, with room for a `T`.
unsafe fn put<T>(base: usize, off: usize, value: T) {
    // SAFETY: guaranteed by the caller; unaligned writes are allowed.
    unsafe { ((base + off) as *mut T).write_unaligned(value) }
}

// ---- The getters: real functions returning fuzzed values

/// How many times any getter below ran (in this case).
static CALLS: AtomicUsize = AtomicUsize::new(0);

struct Ret {
    ptr: AtomicUsize,
    len: AtomicUsize,
    /// Whether the getter writes the count at all.
    writes: AtomicBool,
}

impl Ret {
    const fn new() -> Self {
        Ret {
            ptr: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
            writes: AtomicBool::new(true),
        }
    }

    fn set(&self, ptr: usize, len: usize, writes: bool) {
        self.ptr.store(ptr, Relaxed);
        self.len.store(len, Relaxed);
        self.writes.store(writes, Relaxed);
    }

    /// # Safety
    /// `n` must be valid for a write.
    unsafe fn get<T>(&self, n: *mut usize) -> *const T {
        CALLS.fetch_add(1, Relaxed);
        if self.writes.load(Relaxed) {
            // SAFETY: guaranteed by the caller.
            unsafe { n.write(self.len.load(Relaxed)) };
        }
        self.ptr.load(Relaxed) as *const T
    }
}

// Relaxed throughout: set and read on the test's thread.
static FUNCTIONS: Ret = Ret::new();
static SLOT_REFS: Ret = Ret::new();
static HOOKS: Ret = Ret::new();
/// What [`fuzz_target`] returns.
static TARGET_ENTRY: AtomicPtr<Entry> = AtomicPtr::new(std::ptr::null_mut());

unsafe extern "C" fn fuzz_functions(n: *mut usize) -> *const PatchFn {
    // SAFETY: the runtime passes a valid pointer.
    unsafe { FUNCTIONS.get(n) }
}

unsafe extern "C" fn fuzz_slot_refs(n: *mut usize) -> *const SlotRef {
    // SAFETY: as above.
    unsafe { SLOT_REFS.get(n) }
}

unsafe extern "C" fn fuzz_hooks(n: *mut usize) -> *const HookFn {
    // SAFETY: as above.
    unsafe { HOOKS.get(n) }
}

/// Never called by the checks (the loader calls `init`, after the plan).
fn fuzz_init() -> Result<(), String> {
    panic!("the checks called `init`")
}

/// A replacement record's target getter: the host's code (the image
/// [`host_image`] is this function alone). Deliberately hands over any
/// bits as a reference (a transmute: `&*` would check the alignment in
/// debug builds): the runtime calls it as returning a raw pointer, and
/// only the registry decides whether that is one of its entries.
#[allow(clippy::transmute_ptr_to_ref)]
#[inline(never)]
fn fuzz_target() -> &'static Entry {
    CALLS.fetch_add(1, Relaxed);
    // SAFETY: none, on purpose; see above.
    unsafe { std::mem::transmute::<*mut Entry, &'static Entry>(TARGET_ENTRY.load(Relaxed)) }
}

fn target_addr() -> usize {
    fuzz_target as fn() -> &'static Entry as usize
}

/// A getter field holding `addr` (not a function), or `None` for 0.
fn not_code<F: Copy>(addr: usize) -> Option<F> {
    assert_eq!(std::mem::size_of::<F>(), std::mem::size_of::<usize>());
    // SAFETY: same size, non-zero; a function pointer is never called
    // unless the runtime finds it in the image's code, which these
    // addresses are not.
    (addr != 0).then(|| unsafe { std::mem::transmute_copy::<usize, F>(&addr) })
}

// ---- Manifests

#[derive(Clone, Debug)]
enum TableGetter {
    None,
    NotCode(Addr),
    Real { at: Addr, n: usize, writes: bool },
}

fn table_getter(min: usize) -> impl Strategy<Value = TableGetter> {
    prop_oneof![
        1 => Just(TableGetter::None),
        1 => not_a_getter().prop_map(TableGetter::NotCode),
        4 => (data_slot(TABLE), min..5usize).prop_map(|(at, n)| TableGetter::Real { at, n, writes: true }),
        3 => (addr(), count(), prop::bool::weighted(0.9)).prop_map(|(at, n, writes)| TableGetter::Real { at, n, writes }),
    ]
}

#[derive(Clone, Debug)]
enum InitField {
    None,
    NotCode(Addr),
    Real,
}

#[derive(Clone, Debug)]
struct ManifestInput {
    /// Where the manifest is: `None` for its place in the arena.
    elsewhere: Option<Addr>,
    /// Its offset in the arena.
    offset: usize,
    magic: Option<[u8; 8]>,
    abi: Option<u32>,
    size: Option<u32>,
    /// `entry_size`, `patch_fn_size`, `hook_fn_size`.
    sizes: [Option<u32>; 3],
    rustc: Str,
    target: Str,
    panic_strategy: Str,
    hotpatch_version: Str,
    name: Str,
    version: Str,
    description: Str,
    functions: TableGetter,
    slot_refs: TableGetter,
    hooks: TableGetter,
    /// Where the panic counter is (null is `None`).
    panics: Addr,
    init: InitField,
    /// Random bytes for the data part of the arena.
    seed: u64,
}

/// `None` nine times in ten: the right value.
fn mostly_right<T: std::fmt::Debug + Clone + 'static>(
    wrong: impl Strategy<Value = T> + 'static,
) -> impl Strategy<Value = Option<T>> {
    prop_oneof![9 => Just(None), 1 => wrong.prop_map(Some)]
}

/// Where a panic counter may be: anywhere, misaligned, RELRO, read-only,
/// code, the heap, another object, null.
fn counter() -> impl Strategy<Value = Addr> {
    prop_oneof![
        2 => data_slot(8),
        1 => (DATA..ARENA_LEN).prop_map(Addr::Arena),
        3 => addr(),
    ]
}

fn manifest_input() -> impl Strategy<Value = ManifestInput> {
    let size = std::mem::size_of::<Manifest>();
    let place = (
        prop_oneof![
            12 => Just(None),
            1 => addr().prop_map(Some),
        ],
        prop_oneof![
            9 => (0..(RECORDS - size) / 8).prop_map(|i| i * 8),
            1 => 0..RECORDS - size,
        ],
    );
    let header = (
        mostly_right(any::<[u8; 8]>()),
        mostly_right(any::<u32>()),
        mostly_right(any::<u32>()),
        [
            mostly_right(any::<u32>()),
            mostly_right(any::<u32>()),
            mostly_right(any::<u32>()),
        ],
    );
    let strings = (
        string(),
        string(),
        string(),
        string(),
        string(),
        string(),
        string(),
    );
    let getters = (
        table_getter(1),
        table_getter(0),
        table_getter(0),
        counter(),
        prop_oneof![
            2 => Just(InitField::None),
            1 => not_a_getter().prop_map(InitField::NotCode),
            2 => Just(InitField::Real),
        ],
    );
    (place, header, strings, getters, any::<u64>()).prop_map(
        |((elsewhere, offset), (magic, abi, size, sizes), s, g, seed)| ManifestInput {
            elsewhere,
            offset,
            magic,
            abi,
            size,
            sizes,
            rustc: s.0,
            target: s.1,
            panic_strategy: s.2,
            hotpatch_version: s.3,
            name: s.4,
            version: s.5,
            description: s.6,
            functions: g.0,
            slot_refs: g.1,
            hooks: g.2,
            panics: g.3,
            init: g.4,
            seed,
        },
    )
}

/// A manifest as a good patch has it, in its place in the arena.
fn good_manifest() -> impl Strategy<Value = ManifestInput> {
    let size = std::mem::size_of::<Manifest>();
    (
        (0..(RECORDS - size) / 8).prop_map(|i| i * 8),
        (data_slot(TABLE), 0..5usize),
        prop::option::of((data_slot(TABLE), 0..5usize)),
        (
            prop::option::of((data_slot(TABLE), 0..5usize)),
            data_slot(8),
        ),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(
            |(offset, mut functions, slot_refs, (hooks, panics), init, seed)| {
                // A patch replaces at least one function, through either table.
                if hooks.is_none_or(|(_, n)| n == 0) {
                    functions.1 = functions.1.max(1);
                }
                let real = |(at, n)| TableGetter::Real {
                    at,
                    n,
                    writes: true,
                };
                ManifestInput {
                    elsewhere: None,
                    offset,
                    magic: None,
                    abi: None,
                    size: None,
                    sizes: [None; 3],
                    rustc: Str::Good,
                    target: Str::Good,
                    panic_strategy: Str::Good,
                    hotpatch_version: Str::Good,
                    name: Str::Good,
                    version: Str::Good,
                    description: Str::Good,
                    functions: real(functions),
                    slot_refs: slot_refs.map_or(TableGetter::None, real),
                    hooks: hooks.map_or(TableGetter::None, real),
                    panics,
                    init: if init {
                        InitField::Real
                    } else {
                        InitField::None
                    },
                    seed,
                }
            },
        )
}

/// How many fields [`ManifestInput::take`] knows.
const MANIFEST_FIELDS: usize = 20;

/// Mostly a good manifest with up to three fields taken from a random
/// one (so that each check is reached with the fields before it right),
/// sometimes a random one.
fn manifest_case() -> impl Strategy<Value = ManifestInput> {
    prop_oneof![
        1 => manifest_input(),
        4 => (
            good_manifest(),
            manifest_input(),
            proptest::collection::vec(0..MANIFEST_FIELDS, 0..=3),
        )
            .prop_map(|(mut good, random, fields)| {
                for field in fields {
                    good.take(&random, field);
                }
                good
            }),
    ]
}

/// Zeroes the manifests' and records' parts of the arena (so that no
/// case sees what an earlier one left) and fills the data part with bytes
/// from `seed`.
fn fill(seed: u64) {
    for off in (0..DATA).step_by(8) {
        // SAFETY: inside the arena (see `write_data`).
        unsafe { put(arena(), off, 0u64) };
    }
    let mut x = seed | 1;
    for off in (DATA..ARENA_LEN).step_by(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // SAFETY: inside the arena (see `write_data`).
        unsafe { put(arena(), off, x) };
    }
}

/// `at` is an aligned place in the data part of the arena with room for
/// `size` bytes.
fn in_data(at: Addr, size: usize) -> bool {
    matches!(at, Addr::Arena(off) if off >= DATA && off.is_multiple_of(8) && off + size <= ARENA_LEN)
}

impl ManifestInput {
    /// Takes field number `field` from `other`.
    fn take(&mut self, other: &ManifestInput, field: usize) {
        match field {
            0 => self.elsewhere = other.elsewhere,
            1 => self.offset = other.offset,
            2 => self.magic = other.magic,
            3 => self.abi = other.abi,
            4 => self.size = other.size,
            5..=6 => self.sizes[field - 5] = other.sizes[field - 5],
            7 => self.rustc = other.rustc.clone(),
            8 => self.target = other.target.clone(),
            9 => self.panic_strategy = other.panic_strategy.clone(),
            10 => self.hotpatch_version = other.hotpatch_version.clone(),
            11 => self.name = other.name.clone(),
            12 => self.version = other.version.clone(),
            13 => self.description = other.description.clone(),
            14 => self.functions = other.functions.clone(),
            15 => self.slot_refs = other.slot_refs.clone(),
            16 => self.panics = other.panics,
            17 => self.init = other.init.clone(),
            18 => self.hooks = other.hooks.clone(),
            19 => self.sizes[2] = other.sizes[2],
            _ => unreachable!("{MANIFEST_FIELDS} fields"),
        }
    }

    /// Whether every field is as a good patch has it (up to where the
    /// manifest is).
    fn all_right(&self) -> bool {
        let table_ok = |t: &TableGetter, min: usize| match t {
            TableGetter::Real { at, n, writes } => {
                // A getter that writes no count leaves it at 0.
                let n = if *writes { *n } else { 0 };
                // An empty table is not read: its pointer may dangle.
                (n == 0 && min == 0) || (in_data(*at, TABLE) && (min.max(1)..5).contains(&n))
            }
            _ => false,
        };
        let count = |t: &TableGetter| match t {
            TableGetter::Real {
                n, writes: true, ..
            } => *n,
            _ => 0,
        };
        self.elsewhere.is_none()
            && self.offset.is_multiple_of(8)
            && self.magic.is_none()
            && self.abi.is_none()
            && self.size.is_none()
            && self.sizes.iter().all(Option::is_none)
            && [&self.rustc, &self.target, &self.panic_strategy]
                .iter()
                .all(|s| matches!(s, Str::Good))
            && [
                &self.hotpatch_version,
                &self.name,
                &self.version,
                &self.description,
            ]
            .iter()
            .all(|s| s.right_or_empty())
            && table_ok(&self.functions, 0)
            && (matches!(self.slot_refs, TableGetter::None) || table_ok(&self.slot_refs, 0))
            && (matches!(self.hooks, TableGetter::None) || table_ok(&self.hooks, 0))
            && count(&self.functions) + count(&self.hooks) > 0
            && in_data(self.panics, 8)
            && !matches!(self.init, InitField::NotCode(_))
    }

    /// Whether a getter field holds something that is no code of this
    /// binary.
    fn has_foreign_getter(&self) -> bool {
        [&self.functions, &self.slot_refs, &self.hooks]
            .iter()
            .any(|t| matches!(t, TableGetter::NotCode(_)))
            || matches!(self.init, InitField::NotCode(_))
    }

    /// Writes the manifest and what it points to; returns its address.
    fn place(&self) -> *const Manifest {
        fill(self.seed);
        fn table<F: Copy>(t: &TableGetter, ret: &Ret, real: F) -> Option<F> {
            match t {
                TableGetter::None => None,
                TableGetter::NotCode(a) => not_code(a.get()),
                TableGetter::Real { at, n, writes } => {
                    ret.set(at.get(), *n, *writes);
                    Some(real)
                }
            }
        }
        let mut m = Manifest {
            magic: self.magic.unwrap_or(MAGIC),
            abi_version: self.abi.unwrap_or(ABI_VERSION),
            manifest_size: self.size.unwrap_or(std::mem::size_of::<Manifest>() as u32),
            rustc: self.rustc.place(RUSTC_VERSION),
            target: self.target.place(TARGET),
            panic_strategy: self.panic_strategy.place(PANIC_STRATEGY),
            hotpatch_version: self.hotpatch_version.place("0.1.0"),
            name: self.name.place("fuzz"),
            version: self.version.place("1.0.0"),
            description: self.description.place("a fuzzed manifest"),
            functions: table(&self.functions, &FUNCTIONS, fuzz_functions as _),
            slot_refs: table(&self.slot_refs, &SLOT_REFS, fuzz_slot_refs as _),
            hooks: table(&self.hooks, &HOOKS, fuzz_hooks as _),
            entry_size: self.sizes[0].unwrap_or(std::mem::size_of::<Entry>() as u32),
            patch_fn_size: self.sizes[1].unwrap_or(std::mem::size_of::<PatchFn>() as u32),
            hook_fn_size: self.sizes[2].unwrap_or(std::mem::size_of::<HookFn>() as u32),
            panics: None,
            init: match &self.init {
                InitField::None => None,
                InitField::NotCode(a) => not_code(a.get()),
                InitField::Real => Some(fuzz_init as _),
            },
        };
        // SAFETY: the manifest part of the arena has room for it; the
        // counter field gets any bits, written as a raw word.
        unsafe {
            (&raw mut m.panics)
                .cast::<*const AtomicU64>()
                .write(self.panics.get() as *const AtomicU64);
            put(arena(), self.offset, m);
        }
        match self.elsewhere {
            None => (arena() + self.offset) as *const Manifest,
            Some(a) => a.get() as *const Manifest,
        }
    }
}

fn check_manifest(input: &ManifestInput) -> Result<(), TestCaseError> {
    let m = input.place();
    CALLS.store(0, Relaxed);
    // SAFETY: `m` is anywhere at all: what is under test. The arena stays
    // as written for the rest of the process.
    let result = unsafe { fields(m) }.map_err(|r| r.at(Path::new(PATH)));
    match result {
        Err(e) => {
            prop_assert!(e.to_string().contains(PATH), "names the file: {e}");
            prop_assert!(
                matches!(
                    e,
                    Error::InvalidManifest { .. }
                        | Error::BadMagic { .. }
                        | Error::AbiMismatch { .. }
                        | Error::RustcMismatch { .. }
                        | Error::TargetMismatch { .. }
                        | Error::PanicStrategyMismatch { .. }
                ),
                "{e:?}"
            );
            prop_assert!(!input.all_right(), "a right manifest refused: {e}");
        }
        Ok(Fields {
            about,
            tables: c,
            panics,
            init,
            ..
        }) => {
            prop_assert!(
                input.elsewhere.is_some() || !input.has_foreign_getter(),
                "a foreign getter accepted"
            );
            let own = |p: usize, len: usize, perms: &str| MAPS.own(p, len, perms);
            prop_assert!(own(m as usize, std::mem::size_of::<Manifest>(), "r"));
            prop_assert!(
                !c.functions.is_empty() || !c.hooks.is_empty(),
                "a patch that replaces nothing accepted"
            );
            for (first, size) in [
                (c.functions.as_ptr() as usize, size_of_val(c.functions)),
                (c.hooks.as_ptr() as usize, size_of_val(c.hooks)),
            ] {
                prop_assert!(size == 0 || own(first, size, "r"));
                prop_assert!(first.is_multiple_of(8), "a misaligned table accepted");
            }
            // The loader writes the slot references: writable, so not
            // RELRO (read-only once relocated, as the kernel maps it).
            prop_assert!(c.slot_refs.as_ptr().is_aligned());
            prop_assert!(
                c.slot_refs.is_empty()
                    || own(
                        c.slot_refs.as_ptr() as usize,
                        size_of_val(c.slot_refs),
                        "rw"
                    ),
                "slot references outside writable memory accepted"
            );
            let counter = std::ptr::from_ref(panics);
            prop_assert!(
                counter.is_aligned() && own(counter as usize, 8, "rw"),
                "a panic counter outside writable memory accepted: {counter:?}"
            );
            if let Some(init) = init {
                prop_assert!(own(init as usize, 1, "x"));
            }
            prop_assert!(about.name.len() <= MAX_STR && about.description.len() <= MAX_STR);
            if input.elsewhere.is_none() {
                // Each right value reads as itself; an empty one as "".
                for (s, good, got) in [
                    (&input.name, "fuzz", &about.name),
                    (&input.version, "1.0.0", &about.version),
                    (&input.description, "a fuzzed manifest", &about.description),
                ] {
                    if let Some(want) = s.value(good) {
                        prop_assert_eq!(got.as_str(), want);
                    }
                }
            }
        }
    }
    // (Only for the manifest described: one `elsewhere` may be anything.)
    if input.elsewhere.is_none() && input.has_foreign_getter() {
        prop_assert_eq!(
            CALLS.load(Relaxed),
            0,
            "a getter ran before all were checked"
        );
    }
    Ok(())
}

// ---- Replacement records

#[derive(Clone, Debug)]
enum TargetGetter {
    /// [`fuzz_target`]: the host's code.
    Host,
    /// Code of the library: a private copy of the service's getter.
    PatchCode(usize),
    /// Neither image's code.
    NotCode(Addr),
}

#[derive(Clone, Debug)]
struct RecordInput {
    target: TargetGetter,
    /// What the target getter returns (any bits: only the registry
    /// decides whether it is one of its entries).
    returns: Addr,
    replacement: Addr,
    name: Str,
    layouts: (Addr, usize),
    seed: u64,
}

fn layouts() -> impl Strategy<Value = (Addr, usize)> {
    prop_oneof![
        3 => (data_slot(64), 0..5usize),
        1 => (addr(), prop_oneof![
            Just(usize::MAX),
            Just(usize::MAX / 16 + 1),
            Just((1usize << 60) + 1),
            any::<usize>()
        ]),
        1 => (addr(), 0..5usize),
        // `fn() -> !` has no layouts: `&[]`, whose pointer dangles.
        1 => dangling().prop_map(|a| (a, 0)),
    ]
}

fn record_input() -> impl Strategy<Value = RecordInput> {
    (
        prop_oneof![
            2 => Just(TargetGetter::Host),
            1 => (0..64usize).prop_map(TargetGetter::PatchCode),
            2 => not_a_getter().prop_map(TargetGetter::NotCode),
        ],
        addr(),
        prop_oneof![3 => (0..64usize).prop_map(Addr::Text), 1 => addr()],
        string(),
        layouts(),
        any::<u64>(),
    )
        .prop_map(
            |(target, returns, replacement, name, layouts, seed)| RecordInput {
                target,
                returns,
                replacement,
                name,
                layouts,
                seed,
            },
        )
}

/// A record as a good patch has it.
fn good_record() -> impl Strategy<Value = RecordInput> {
    (
        addr(),
        (0..64usize).prop_map(Addr::Text),
        prop_oneof![
            4 => (data_slot(64), 0..5usize),
            1 => dangling().prop_map(|a| (a, 0)),
        ],
        any::<u64>(),
    )
        .prop_map(|(returns, replacement, layouts, seed)| RecordInput {
            target: TargetGetter::Host,
            returns,
            replacement,
            name: Str::Good,
            layouts,
            seed,
        })
}

/// How many fields [`RecordInput::take`] knows.
const RECORD_FIELDS: usize = 5;

/// As [`manifest_case`], for records.
fn record_case() -> impl Strategy<Value = RecordInput> {
    prop_oneof![
        1 => record_input(),
        4 => (
            good_record(),
            record_input(),
            proptest::collection::vec(0..RECORD_FIELDS, 0..=2),
        )
            .prop_map(|(mut good, random, fields)| {
                for field in fields {
                    good.take(&random, field);
                }
                good
            }),
    ]
}

impl RecordInput {
    /// Takes field number `field` from `other`.
    fn take(&mut self, other: &RecordInput, field: usize) {
        match field {
            0 => self.target = other.target.clone(),
            1 => self.returns = other.returns,
            2 => self.replacement = other.replacement,
            3 => self.name = other.name.clone(),
            4 => self.layouts = other.layouts,
            _ => unreachable!("{RECORD_FIELDS} fields"),
        }
    }

    fn target_getter(&self) -> fn() -> &'static Entry {
        match self.target {
            TargetGetter::Host => fuzz_target,
            TargetGetter::PatchCode(off) => {
                not_code(Addr::Text(off).get()).expect("code is not at 0")
            }
            TargetGetter::NotCode(a) => not_code(a.get()).expect("not null"),
        }
    }

    /// The target getter is the host's (a `PatchCode` offset may land on
    /// it too).
    fn host_getter(&self) -> bool {
        self.target_getter() as usize == target_addr()
    }

    fn right(&self) -> bool {
        self.host_getter()
            && matches!(self.replacement, Addr::Text(_))
            && self.replacement.get() != target_addr()
            && self.name.right_or_empty()
            && ((in_data(self.layouts.0, 64) && self.layouts.1 < 5)
                || (self.layouts.1 == 0 && empty_slice::<TypeLayout>(self.layouts.0.get())))
    }
}

/// `p` is a valid pointer for an empty `&[T]`: non-null and aligned.
fn empty_slice<T>(p: usize) -> bool {
    p != 0 && p.is_multiple_of(std::mem::align_of::<T>())
}

/// The library's image and the host's, as step 7 sees them: this binary
/// without [`fuzz_target`]'s first byte, and that byte alone.
fn images() -> (Image, Image) {
    let whole = Image::containing(arena() as *const ()).expect("the arena is in this binary");
    whole.split_code(target_addr(), target_addr() + 1)
}

fn check_records(input: &RecordInput) -> Result<(), TestCaseError> {
    fill(input.seed);
    let path = Path::new(PATH);
    let (image, host) = images();
    TARGET_ENTRY.store(input.returns.get() as *mut Entry, Relaxed);
    let record = (arena() + RECORDS) as *mut PatchFn;
    let layouts = slice_from_raw_parts(input.layouts.0.get() as *const TypeLayout, input.layouts.1);
    // SAFETY: in the records part of the arena, aligned; each field gets
    // any bits, written as raw words.
    unsafe {
        record.write(PatchFn {
            target: input.target_getter(),
            replacement: FnAddr::new(input.replacement.get() as *const ()),
            name: "",
            layouts: &[],
        });
        (&raw mut (*record).name)
            .cast::<*const str>()
            .write(input.name.place_str("fix::answer"));
        (&raw mut (*record).layouts)
            .cast::<*const [TypeLayout]>()
            .write(layouts);
    }
    CALLS.store(0, Relaxed);
    // SAFETY: the record was just written; its fields are the input.
    let result = patch_fn(&image, &host, unsafe { &*record }).map_err(|r| r.at(path));
    let calls = CALLS.load(Relaxed);
    match &result {
        Err(e) => {
            prop_assert!(
                matches!(e, Error::InvalidManifest { path, .. } if path == Path::new(PATH)),
                "{e:?}"
            );
            prop_assert!(!input.right(), "a right record refused: {e}");
        }
        Ok(r) => {
            prop_assert!(
                input.host_getter(),
                "a target getter not the host's accepted"
            );
            prop_assert!(matches!(input.replacement, Addr::Text(_)));
            let name = r.name.as_ptr() as usize;
            prop_assert!(
                if r.name.is_empty() {
                    name != 0
                } else {
                    MAPS.own(name, r.name.len(), "r")
                },
                "a name outside the library accepted"
            );
            prop_assert!(MAPS.own(r.code.as_ptr() as usize, 1, "x"));
            prop_assert!(r.code.as_ptr() as usize != target_addr());
            prop_assert!(empty_slice::<TypeLayout>(r.layouts.as_ptr() as usize));
            prop_assert!(
                r.layouts.is_empty()
                    || MAPS.own(r.layouts.as_ptr() as usize, size_of_val(r.layouts), "r")
            );
            prop_assert!(std::str::from_utf8(r.name.as_bytes()).is_ok());
            prop_assert_eq!(calls, 1, "the host's target getter called once");
            prop_assert_eq!(
                r.target as usize,
                input.returns.get(),
                "what the target getter returned, unread"
            );
        }
    }
    if !input.host_getter() {
        prop_assert!(result.is_err(), "a target getter outside the host's code");
        prop_assert_eq!(
            calls,
            0,
            "a target getter that is not the host's was called"
        );
    }
    Ok(())
}

// ---- Hook records

#[derive(Clone, Debug)]
struct HookInput {
    /// `None`: the host's function ([`fuzz_target`], carved out of the
    /// library's image as the executable's code).
    target: Option<Addr>,
    replacement: Addr,
    /// The expected entry bytes: where, how many.
    entry: (Addr, usize),
    path: Str,
    name: Str,
    seed: u64,
}

fn entry_bytes() -> impl Strategy<Value = (Addr, usize)> {
    prop_oneof![
        3 => (data_slot(64), 0..=MAX_ENTRY),
        1 => (data_slot(64), MAX_ENTRY + 1..64),
        1 => (addr(), prop_oneof![Just(usize::MAX), Just(isize::MAX as usize), 0..64usize]),
        // No expectation: `&[]`, whose pointer dangles.
        1 => dangling().prop_map(|a| (a, 0)),
    ]
}

fn hook_input() -> impl Strategy<Value = HookInput> {
    (
        prop_oneof![2 => Just(None), 2 => addr().prop_map(Some)],
        prop_oneof![3 => (0..64usize).prop_map(Addr::Text), 1 => addr()],
        entry_bytes(),
        string(),
        string(),
        any::<u64>(),
    )
        .prop_map(|(target, replacement, entry, path, name, seed)| HookInput {
            target,
            replacement,
            entry,
            path,
            name,
            seed,
        })
}

/// A hook record as a good patch has it.
fn good_hook() -> impl Strategy<Value = HookInput> {
    (
        (0..64usize).prop_map(Addr::Text),
        prop_oneof![
            3 => (data_slot(64), 0..=MAX_ENTRY),
            1 => dangling().prop_map(|a| (a, 0)),
        ],
        any::<u64>(),
    )
        .prop_map(|(replacement, entry, seed)| HookInput {
            target: None,
            replacement,
            entry,
            path: Str::Good,
            name: Str::Good,
            seed,
        })
}

/// How many fields [`HookInput::take`] knows.
const HOOK_FIELDS: usize = 5;

fn hook_case() -> impl Strategy<Value = HookInput> {
    prop_oneof![
        1 => hook_input(),
        4 => (
            good_hook(),
            hook_input(),
            proptest::collection::vec(0..HOOK_FIELDS, 0..=2),
        )
            .prop_map(|(mut good, random, fields)| {
                for field in fields {
                    good.take(&random, field);
                }
                good
            }),
    ]
}

impl HookInput {
    fn take(&mut self, other: &HookInput, field: usize) {
        match field {
            0 => self.target = other.target,
            1 => self.replacement = other.replacement,
            2 => self.entry = other.entry,
            3 => self.path = other.path.clone(),
            4 => self.name = other.name.clone(),
            _ => unreachable!("{HOOK_FIELDS} fields"),
        }
    }

    fn target_addr(&self) -> usize {
        self.target.map_or(target_addr(), Addr::get)
    }

    fn right(&self) -> bool {
        self.target_addr() == target_addr()
            && matches!(self.replacement, Addr::Text(_))
            && self.replacement.get() != target_addr()
            && self.path.right_or_empty()
            && self.name.right_or_empty()
            && ((in_data(self.entry.0, 64) && self.entry.1 <= MAX_ENTRY)
                || (self.entry.1 == 0 && self.entry.0.get() != 0))
    }

    /// Writes the record; returns it.
    fn place(&self) -> *const HookFn {
        fill(self.seed);
        let record = (arena() + RECORDS) as *mut HookFn;
        if let (Addr::Arena(_), n) = self.entry {
            write_data(self.entry.0, &vec![0x90; n.min(64)]);
        }
        // SAFETY: in the records part of the arena, aligned; each field
        // gets any bits, written as raw words.
        unsafe {
            record.write(HookFn {
                target: self.target_addr() as *const (),
                replacement: self.replacement.get() as *const (),
                entry: &[],
                path: "",
                name: "",
            });
            (&raw mut (*record).entry)
                .cast::<*const [u8]>()
                .write(slice_from_raw_parts(
                    self.entry.0.get() as *const u8,
                    self.entry.1,
                ));
            (&raw mut (*record).path)
                .cast::<*const str>()
                .write(self.path.place_str("svc::helper"));
            (&raw mut (*record).name)
                .cast::<*const str>()
                .write(self.name.place_str("fix::helper"));
        }
        record
    }
}

/// The executable's code as [`hook_fn`] sees it here: [`fuzz_target`]'s
/// first byte (carved out of the library's image by [`images`]).
fn host_text() -> (usize, usize) {
    (target_addr(), target_addr() + 1)
}

fn check_hooks(input: &HookInput) -> Result<(), TestCaseError> {
    let record = input.place();
    let (image, _) = images();
    // SAFETY: the record was just written; its fields are the input.
    let result =
        hook_fn(&image, host_text(), unsafe { &*record }).map_err(|r| r.at(Path::new(PATH)));
    match &result {
        Err(e) => {
            prop_assert!(
                matches!(e, Error::InvalidManifest { path, .. } if path == Path::new(PATH)),
                "{e:?}"
            );
            prop_assert!(!input.right(), "a right hook record refused: {e}");
        }
        Ok(r) => {
            prop_assert_eq!(r.target, target_addr(), "a target outside the host's code");
            prop_assert!(MAPS.own(r.code.as_ptr() as usize, 1, "x"));
            prop_assert!(r.code.as_ptr() as usize != target_addr());
            prop_assert!(r.entry.len() <= MAX_ENTRY);
            for s in [r.entry, r.path.as_bytes()] {
                // An empty slice is not read: its pointer may dangle.
                prop_assert!(
                    s.is_empty() || MAPS.own(s.as_ptr() as usize, s.len(), "r"),
                    "bytes outside the library accepted"
                );
            }
            prop_assert!(r.path.len() <= MAX_STR);
        }
    }
    Ok(())
}

// ---- The oracle: the kernel's view of this process's memory

struct Maps {
    /// `(start, end, perms)`, sorted.
    maps: Vec<(usize, usize, String)>,
    /// Where this binary is loaded.
    base: usize,
    /// The end of the run of mappings from the arena's on, up to the
    /// first gap or named mapping that is not this binary (the heap).
    image_end: usize,
}

/// Read once: the binary's mappings do not change.
static MAPS: LazyLock<Maps> = LazyLock::new(|| {
    let text = std::fs::read_to_string("/proc/self/maps").unwrap();
    let exe = std::fs::read_link("/proc/self/exe").unwrap();
    let mut maps = Vec::new();
    let mut names = Vec::new();
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let (start, end) = fields.next().unwrap().split_once('-').unwrap();
        maps.push((
            usize::from_str_radix(start, 16).unwrap(),
            usize::from_str_radix(end, 16).unwrap(),
            fields.next().unwrap().to_owned(),
        ));
        names.push(fields.nth(3).unwrap_or("").to_owned());
    }
    let mut i = maps
        .iter()
        .position(|(s, e, _)| (*s..*e).contains(&arena()))
        .expect("the arena is mapped");
    while i + 1 < maps.len()
        && maps[i + 1].0 == maps[i].1
        && (names[i + 1].is_empty() || Path::new(&names[i + 1]) == exe)
    {
        i += 1;
    }
    Maps {
        image_end: maps[i].1,
        maps,
        base: object_base(arena()).expect("the arena is in this binary"),
    }
});

/// The load address of the object `dladdr` finds `addr` in.
fn object_base(addr: usize) -> Option<usize> {
    // SAFETY: a plain struct of pointers, for `dladdr` to fill.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: `dladdr` only reads its own tables.
    let found = unsafe { libc::dladdr(addr as *const libc::c_void, &mut info) };
    (found != 0).then_some(info.dli_fbase as usize)
}

impl Maps {
    /// `[p, p + len)` is memory of this binary, mapped with every
    /// permission in `perms`.
    fn own(&self, p: usize, len: usize, perms: &str) -> bool {
        let Some(end) = p.checked_add(len.max(1)) else {
            return false;
        };
        if object_base(p) != Some(self.base) || object_base(end - 1) != Some(self.base) {
            return false;
        }
        let mut at = p;
        while at < end {
            let Some((_, e, have)) = self.maps.iter().find(|(s, e, _)| (*s..*e).contains(&at))
            else {
                return false;
            };
            if !perms.chars().all(|c| have.contains(c)) {
                return false;
            }
            at = *e;
        }
        true
    }
}

// ---- The tests

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2_000)
}

/// Runs `test` on `cases()` inputs, on a thread with a large stack: the
/// value trees of these nested strategies need more than the default
/// 2 MiB in debug builds.
fn run<T: std::fmt::Debug>(
    what: &str,
    strategy: impl Strategy<Value = T> + Send,
    test: impl Fn(&T) -> Result<(), TestCaseError> + Send,
) {
    let _lock = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    LazyLock::force(&MAPS);
    LazyLock::force(&HEAP);
    let config = Config {
        cases: cases(),
        failure_persistence: None,
        // ChaCha, the default, is most of the time in debug builds.
        rng_algorithm: RngAlgorithm::XorShift,
        ..Config::default()
    };
    let start = Instant::now();
    let result = std::thread::scope(|s| {
        std::thread::Builder::new()
            .stack_size(64 << 20)
            .spawn_scoped(s, move || {
                let mut runner = TestRunner::new(config);
                runner
                    .run(&strategy, |input| test(&input))
                    .map_err(|e| e.to_string())
            })
            .unwrap()
            .join()
            .unwrap()
    });
    eprintln!("fuzz {what}: {} cases in {:.1?}", cases(), start.elapsed());
    if let Err(e) = result {
        panic!("{what}: {e}");
    }
}

#[test]
fn manifests() {
    run("manifests", manifest_case(), check_manifest);
}

#[test]
fn records() {
    run("records", record_case(), check_records);
}

#[test]
fn hook_records() {
    run("hook records", hook_case(), check_hooks);
}

/// The hook record harness reaches acceptance, and each target is told
/// apart: the executable's code accepted, the library's own code (a copy
/// of a generic or inline function) and anything else refused.
#[test]
fn the_hook_harness_reaches_acceptance() {
    let _lock = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    LazyLock::force(&MAPS);
    let right = HookInput {
        target: None,
        replacement: Addr::Text(0),
        entry: (Addr::Arena(DATA), 5),
        path: Str::Good,
        name: Str::Good,
        seed: 1,
    };
    assert!(right.right());
    check_hooks(&right).unwrap();
    let check = |input: &HookInput| {
        let record = input.place();
        let (image, _) = images();
        // SAFETY: just written.
        hook_fn(&image, host_text(), unsafe { &*record })
            .map(|r| (r.target, r.entry.len(), r.path))
            .map_err(|r| r.at(Path::new(PATH)).to_string())
    };
    assert_eq!(check(&right), Ok((target_addr(), 5, "svc::helper")));
    let mut none = right.clone();
    none.entry = (Addr::Wild(1), 0);
    assert_eq!(check(&none), Ok((target_addr(), 0, "svc::helper")));
    for (field, bad, why) in [
        ("target", Addr::Text(8), "inside the patch"),
        ("target", Addr::OtherObject, "not in the executable's code"),
        ("target", Addr::Null, "not in the executable's code"),
        (
            "replacement",
            Addr::OtherObject,
            "outside the library's code",
        ),
        (
            "replacement",
            Addr::Arena(DATA),
            "outside the library's code",
        ),
        ("entry", Addr::Heap(0), "outside the library's memory"),
    ] {
        let mut input = right.clone();
        match field {
            "target" => input.target = Some(bad),
            "replacement" => input.replacement = bad,
            _ => input.entry = (bad, 5),
        }
        let err = check(&input).unwrap_err();
        assert!(err.contains(why), "{field} {bad:?}: {err}");
    }
    let mut long = right.clone();
    long.entry = (Addr::Arena(DATA), MAX_ENTRY + 1);
    assert!(
        check(&long)
            .unwrap_err()
            .contains("entry bytes (at most 32)")
    );
    let mut path = right;
    path.path = Str::Raw {
        at: Addr::Arena(DATA + 64),
        len: 4,
        bytes: vec![b's', 0xff, 0xfe, b'x'],
    };
    assert!(check(&path).unwrap_err().contains("not UTF-8"));
}

/// The fuzz inputs' ranges reach what they are meant to: a right manifest
/// is accepted, and a foreign getter refused without a call.
#[test]
fn the_harness_reaches_acceptance() {
    let _lock = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let refusal = |input: &ManifestInput| {
        let m = input.place();
        CALLS.store(0, Relaxed);
        // SAFETY: a manifest in the arena.
        let err = unsafe { fields(m) }
            .map_err(|r| r.at(Path::new(PATH)))
            .err()
            .expect("refused");
        (err.to_string(), CALLS.load(Relaxed))
    };
    let mut input = ManifestInput {
        elsewhere: None,
        offset: 64,
        magic: None,
        abi: None,
        size: None,
        sizes: [None; 3],
        rustc: Str::Good,
        target: Str::Good,
        panic_strategy: Str::Good,
        hotpatch_version: Str::Good,
        name: Str::Good,
        version: Str::Good,
        description: Str::Good,
        functions: TableGetter::Real {
            at: Addr::Arena(DATA),
            n: 2,
            writes: true,
        },
        slot_refs: TableGetter::Real {
            at: Addr::Arena(DATA + 512),
            n: 3,
            writes: true,
        },
        hooks: TableGetter::None,
        panics: Addr::Arena(DATA + 1024),
        init: InitField::Real,
        seed: 1,
    };
    assert!(input.all_right());
    let m = input.place();
    CALLS.store(0, Relaxed);
    // SAFETY: a manifest in the arena.
    let checked = unsafe { fields(m) }
        .map_err(|r| r.at(Path::new(PATH)))
        .unwrap();
    assert_eq!(checked.tables.functions.len(), 2);
    assert_eq!(checked.tables.slot_refs.len(), 3);
    assert_eq!(
        std::ptr::from_ref(checked.panics) as usize,
        arena() + DATA + 1024
    );
    assert_eq!(checked.about.name, "fuzz");
    assert_eq!(CALLS.load(Relaxed), 2, "both getters called once");

    // Empty strings and optional tables, their pointers dangling as the
    // compiler makes them: accepted, and read as empty.
    let right = input.clone();
    input.hotpatch_version = Str::Empty { at: Addr::Wild(1) };
    input.name = Str::Empty { at: Addr::Wild(1) };
    input.version = Str::Empty {
        at: Addr::Wild(usize::MAX),
    };
    input.description = Str::Empty { at: Addr::Heap(0) };
    input.slot_refs = TableGetter::Real {
        at: Addr::Wild(8),
        n: 0,
        writes: true,
    };
    assert!(input.all_right());
    let m = input.place();
    // SAFETY: as above.
    let checked = unsafe { fields(m) }
        .map_err(|r| r.at(Path::new(PATH)))
        .unwrap();
    let about = &checked.about;
    assert_eq!(
        (&*about.name, &*about.version, &*about.description),
        ("", "", "")
    );
    assert!(checked.tables.slot_refs.is_empty());
    // A null empty string is no `&str`.
    input.description = Str::Raw {
        at: Addr::Null,
        len: 0,
        bytes: Vec::new(),
    };
    let (err, _) = refusal(&input);
    assert!(err.contains("`description` is a null string"), "{err}");
    input = right;

    // The panic counter: null, misaligned, RELRO, read-only, in code.
    for at in [
        Addr::Null,
        Addr::Arena(DATA + 1025),
        Addr::Relro(0),
        Addr::ReadOnly(0),
        Addr::Text(0),
        Addr::Heap(0),
        Addr::OtherObject,
    ] {
        let mut bad = input.clone();
        bad.panics = at;
        assert!(!bad.all_right());
        let (err, calls) = refusal(&bad);
        assert!(err.contains("the panic counter"), "{at:?}: {err}");
        assert_eq!(calls, 0, "{at:?}: refused before any getter ran");
    }

    // The slot references: a table in RELRO or read-only data, misaligned.
    for (at, why) in [
        (Addr::Relro(0), "outside the library's writable memory"),
        (
            Addr::ReadOnly(READ_ONLY.as_ptr().align_offset(8)),
            "outside the library's writable memory",
        ),
        (Addr::Arena(DATA + 4), "misaligned"),
        (Addr::Heap(0), "lies outside the library's memory"),
    ] {
        let mut bad = input.clone();
        bad.slot_refs = TableGetter::Real {
            at,
            n: 1,
            writes: true,
        };
        let (err, _) = refusal(&bad);
        assert!(err.contains(why), "{at:?}: {err}");
    }

    // Getter fields that are no code of the library: refused, none called.
    for (field, a) in [
        ("slot_refs", Addr::OtherObject),
        ("slot_refs", Addr::ReadOnly(0)),
        ("functions", Addr::Wild(0x1000)),
        ("functions", Addr::Relro(0)),
        ("init", Addr::Arena(DATA)),
    ] {
        let mut bad = input.clone();
        match field {
            "slot_refs" => bad.slot_refs = TableGetter::NotCode(a),
            "functions" => bad.functions = TableGetter::NotCode(a),
            _ => bad.init = InitField::NotCode(a),
        }
        let (err, calls) = refusal(&bad);
        assert!(err.contains(&format!("`{field}` points outside")), "{err}");
        assert_eq!(calls, 0);
    }
    // Hooks: a patch that only hooks is accepted; one that replaces
    // nothing through either table is refused; the hook getter is checked
    // as the others are; the record size must be this runtime's.
    let mut hooks_only = input.clone();
    hooks_only.functions = TableGetter::Real {
        at: Addr::Wild(8),
        n: 0,
        writes: true,
    };
    hooks_only.hooks = TableGetter::Real {
        at: Addr::Arena(DATA + 2048),
        n: 2,
        writes: true,
    };
    assert!(hooks_only.all_right());
    let m = hooks_only.place();
    // SAFETY: as above.
    let checked = unsafe { fields(m) }
        .map_err(|r| r.at(Path::new(PATH)))
        .unwrap();
    assert_eq!(
        (checked.tables.functions.len(), checked.tables.hooks.len()),
        (0, 2)
    );
    let mut nothing = hooks_only.clone();
    nothing.hooks = TableGetter::None;
    assert!(!nothing.all_right());
    let (err, _) = refusal(&nothing);
    assert!(err.contains("replaces no function"), "{err}");
    let mut foreign = hooks_only.clone();
    foreign.hooks = TableGetter::NotCode(Addr::Arena(DATA));
    let (err, calls) = refusal(&foreign);
    assert!(err.contains("`hooks` points outside"), "{err}");
    assert_eq!(calls, 0);
    let mut size = hooks_only;
    size.sizes[2] = Some(56);
    let (err, calls) = refusal(&size);
    assert!(err.contains("table entry sizes"), "{err}");
    assert_eq!(calls, 0);

    assert!(!MAPS.own(null::<u8>() as usize, 1, "r"));
    assert!(MAPS.image_end >= arena() + ARENA_LEN);
    assert!(
        !MAPS.own(MAPS.image_end, 1, "r"),
        "nothing of this binary past its end"
    );
    assert!(
        !MAPS.own((&raw const RELRO) as usize, 8, "rw"),
        "the oracle sees RELRO as read-only"
    );
}

/// The records harness reaches acceptance, and each kind of target getter
/// is told apart: the host's called once, the library's own (a private
/// copy) and one in neither refused uncalled.
#[test]
fn the_record_harness_reaches_acceptance() {
    let _lock = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    LazyLock::force(&MAPS);
    let right = RecordInput {
        target: TargetGetter::Host,
        returns: Addr::Wild(0x1234),
        replacement: Addr::Text(0),
        name: Str::Good,
        layouts: (Addr::Arena(DATA), 2),
        seed: 1,
    };
    assert!(right.right());
    check_records(&right).unwrap();
    let check = |input: &RecordInput| {
        fill(input.seed);
        let (image, host) = images();
        let record = PatchFn {
            target: input.target_getter(),
            replacement: FnAddr::new(input.replacement.get() as *const ()),
            name: "fix::answer",
            layouts: &[],
        };
        CALLS.store(0, Relaxed);
        let result = patch_fn(&image, &host, &record).map(|r| r.target as usize);
        (
            result.map_err(|r| r.at(Path::new(PATH)).to_string()),
            CALLS.load(Relaxed),
        )
    };
    assert_eq!(check(&right), (Ok(0x1234), 1));
    // A private copy: the library's own code.
    let mut copy = right.clone();
    copy.target = TargetGetter::PatchCode(0);
    let (err, calls) = check(&copy);
    assert!(err.unwrap_err().contains("a copy inside the patch"));
    assert_eq!(calls, 0);
    // Neither image's code.
    for a in [
        Addr::OtherObject,
        Addr::Arena(DATA),
        Addr::Relro(0),
        Addr::Wild(0x1000),
    ] {
        let mut neither = right.clone();
        neither.target = TargetGetter::NotCode(a);
        let (err, calls) = check(&neither);
        assert!(
            err.as_ref()
                .unwrap_err()
                .contains("neither the library's code nor this process's"),
            "{a:?}: {err:?}"
        );
        assert_eq!(calls, 0);
    }
}
