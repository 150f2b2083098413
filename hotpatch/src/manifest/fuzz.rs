//! Fuzzing the manifest checks with proptest: manifests, replacement
//! records, entries and shared records with arbitrary raw field values,
//! checked by [`fields`] (steps 1 to 6 of [`check`]) and by step 7's
//! [`patch_fn`], [`entry`] and [`shared_entry`].
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
//! this module (returning fuzzed tables, cells and entries); the getter
//! *fields* also get addresses that are no such function, and those must
//! be refused before any getter is called.
//!
//! What must hold, besides not crashing:
//! - an `Err` is one of the manifest errors and names the file;
//! - an `Ok` hands over only memory of this binary (`dladdr`) that the
//!   kernel maps as the runtime will use it (`/proc/self/maps`): tables and
//!   strings readable, cells writable, functions executable; aligned;
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
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize};
use std::sync::{LazyLock, Mutex};
use std::time::Instant;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRunner};

use super::{Fields, MAX_FUNCTIONS, MAX_STR, entry, fields, patch_fn, shared_entry};
use crate::__private::{
    ABI_VERSION, DataAddr, Entry, FnAddr, HostAllocFns, MAGIC, Manifest, PANIC_STRATEGY, PatchFn,
    RUSTC_VERSION, RawStr, SharedEntry, Slot, TARGET, Transport, TypeLayout,
};
use crate::Error;
use crate::image::Image;

const PATH: &str = "/fuzz/patch.so";

// ---- Memory the inputs live in

/// Where manifests are written: `[0, RECORDS)`.
const RECORDS: usize = 1024;
/// Where records (entries, replacement records, shared records) are
/// written: `[RECORDS, DATA)`.
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
            Addr::Text(off) => fuzz_init as fn() -> Result<(), Transport> as usize + off,
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
static SLOTS: Ret = Ret::new();
static SHARED: Ret = Ret::new();
static RAISE_CELL: AtomicUsize = AtomicUsize::new(0);
static ALLOC_CELL: AtomicUsize = AtomicUsize::new(0);
static OVERFLOW: AtomicBool = AtomicBool::new(false);
/// What [`fuzz_target`] returns.
static TARGET_ENTRY: AtomicPtr<Entry> = AtomicPtr::new(std::ptr::null_mut());

unsafe extern "C" fn fuzz_functions(n: *mut usize) -> *const PatchFn {
    // SAFETY: the runtime passes a valid pointer.
    unsafe { FUNCTIONS.get(n) }
}

unsafe extern "C" fn fuzz_slots(n: *mut usize) -> *const Entry {
    // SAFETY: as above.
    unsafe { SLOTS.get(n) }
}

unsafe extern "C" fn fuzz_shared(n: *mut usize) -> *const SharedEntry {
    // SAFETY: as above.
    unsafe { SHARED.get(n) }
}

unsafe extern "C" fn fuzz_host_raise() -> *const AtomicPtr<()> {
    CALLS.fetch_add(1, Relaxed);
    RAISE_CELL.load(Relaxed) as *const _
}

unsafe extern "C" fn fuzz_host_allocator() -> *const AtomicPtr<HostAllocFns> {
    CALLS.fetch_add(1, Relaxed);
    ALLOC_CELL.load(Relaxed) as *const _
}

unsafe extern "C" fn fuzz_early_overflow() -> bool {
    CALLS.fetch_add(1, Relaxed);
    OVERFLOW.load(Relaxed)
}

/// Never called by the checks (only `run_init` calls `init`).
fn fuzz_init() -> Result<(), Transport> {
    panic!("the checks called `init`")
}

/// A replacement record's target getter. Deliberately hands over any
/// bits as a reference (a transmute: `&*` would check the alignment in
/// debug builds): the runtime calls it as returning a raw pointer.
#[allow(clippy::transmute_ptr_to_ref)]
fn fuzz_target() -> &'static Entry {
    CALLS.fetch_add(1, Relaxed);
    // SAFETY: none, on purpose; see above.
    unsafe { std::mem::transmute::<*mut Entry, &'static Entry>(TARGET_ENTRY.load(Relaxed)) }
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
enum CellGetter {
    None,
    NotCode(Addr),
    Real(Addr),
}

fn cell_getter() -> impl Strategy<Value = CellGetter> {
    prop_oneof![
        1 => Just(CellGetter::None),
        1 => not_a_getter().prop_map(CellGetter::NotCode),
        2 => data_slot(8).prop_map(CellGetter::Real),
        4 => addr().prop_map(CellGetter::Real),
    ]
}

#[derive(Clone, Debug)]
enum FlagGetter {
    None,
    NotCode(Addr),
    Real(bool),
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
    sizes: [Option<u32>; 3],
    rustc: Str,
    target: Str,
    panic_strategy: Str,
    hotpatch_version: Str,
    name: Str,
    version: Str,
    description: Str,
    functions: TableGetter,
    slots: TableGetter,
    shared: TableGetter,
    host_raise: CellGetter,
    host_allocator: CellGetter,
    early_overflow: FlagGetter,
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
        prop_oneof![1 => Just(TableGetter::None), 3 => table_getter(0)],
        cell_getter(),
        prop_oneof![1 => Just(CellGetter::None), 3 => cell_getter()],
        prop_oneof![
            2 => Just(FlagGetter::None),
            1 => not_a_getter().prop_map(FlagGetter::NotCode),
            2 => any::<bool>().prop_map(FlagGetter::Real),
        ],
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
            slots: g.1,
            shared: g.2,
            host_raise: g.3,
            host_allocator: g.4,
            early_overflow: g.5,
            init: g.6,
            seed,
        },
    )
}

/// A manifest as a good patch has it, in its place in the arena.
fn good_manifest() -> impl Strategy<Value = ManifestInput> {
    let size = std::mem::size_of::<Manifest>();
    (
        (0..(RECORDS - size) / 8).prop_map(|i| i * 8),
        (data_slot(TABLE), 1..5usize),
        (data_slot(TABLE), 0..5usize),
        prop::option::of((data_slot(TABLE), 0..5usize)),
        (data_slot(8), prop::option::of(data_slot(8))),
        (prop::option::of(any::<bool>()), any::<bool>()),
        any::<u64>(),
    )
        .prop_map(
            |(offset, functions, slots, shared, (raise, alloc), (overflow, init), seed)| {
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
                    slots: real(slots),
                    shared: shared.map_or(TableGetter::None, real),
                    host_raise: CellGetter::Real(raise),
                    host_allocator: alloc.map_or(CellGetter::None, CellGetter::Real),
                    early_overflow: overflow.map_or(FlagGetter::None, FlagGetter::Real),
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
const MANIFEST_FIELDS: usize = 22;

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

impl ManifestInput {
    /// Takes field number `field` from `other`.
    fn take(&mut self, other: &ManifestInput, field: usize) {
        match field {
            0 => self.elsewhere = other.elsewhere,
            1 => self.offset = other.offset,
            2 => self.magic = other.magic,
            3 => self.abi = other.abi,
            4 => self.size = other.size,
            5..=7 => self.sizes[field - 5] = other.sizes[field - 5],
            8 => self.rustc = other.rustc.clone(),
            9 => self.target = other.target.clone(),
            10 => self.panic_strategy = other.panic_strategy.clone(),
            11 => self.hotpatch_version = other.hotpatch_version.clone(),
            12 => self.name = other.name.clone(),
            13 => self.version = other.version.clone(),
            14 => self.description = other.description.clone(),
            15 => self.functions = other.functions.clone(),
            16 => self.slots = other.slots.clone(),
            17 => self.shared = other.shared.clone(),
            18 => self.host_raise = other.host_raise.clone(),
            19 => self.host_allocator = other.host_allocator.clone(),
            20 => self.early_overflow = other.early_overflow.clone(),
            21 => self.init = other.init.clone(),
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
                (n == 0 && min == 0)
                    || (matches!(at, Addr::Arena(off) if *off >= DATA && off.is_multiple_of(8) && off + TABLE <= ARENA_LEN)
                        && (min.max(1)..5).contains(&n))
            }
            _ => false,
        };
        let cell_ok = |c: &CellGetter| matches!(c, CellGetter::Real(Addr::Arena(off)) if *off >= DATA && off.is_multiple_of(8) && off + 8 <= ARENA_LEN);
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
            && table_ok(&self.functions, 1)
            && table_ok(&self.slots, 0)
            && (matches!(self.shared, TableGetter::None) || table_ok(&self.shared, 0))
            && cell_ok(&self.host_raise)
            && (matches!(self.host_allocator, CellGetter::None) || cell_ok(&self.host_allocator))
            && !matches!(self.early_overflow, FlagGetter::NotCode(_))
            && !matches!(self.init, InitField::NotCode(_))
    }

    /// Whether a getter field holds something that is no code of this
    /// binary.
    fn has_foreign_getter(&self) -> bool {
        [&self.functions, &self.slots, &self.shared]
            .iter()
            .any(|t| matches!(t, TableGetter::NotCode(_)))
            || [&self.host_raise, &self.host_allocator]
                .iter()
                .any(|c| matches!(c, CellGetter::NotCode(_)))
            || matches!(self.early_overflow, FlagGetter::NotCode(_))
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
        fn cell<F: Copy>(c: &CellGetter, ret: &AtomicUsize, real: F) -> Option<F> {
            match c {
                CellGetter::None => None,
                CellGetter::NotCode(a) => not_code(a.get()),
                CellGetter::Real(a) => {
                    ret.store(a.get(), Relaxed);
                    Some(real)
                }
            }
        }
        let m = Manifest {
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
            slots: table(&self.slots, &SLOTS, fuzz_slots as _),
            host_raise: cell(&self.host_raise, &RAISE_CELL, fuzz_host_raise as _),
            entry_size: self.sizes[0].unwrap_or(std::mem::size_of::<Entry>() as u32),
            patch_fn_size: self.sizes[1].unwrap_or(std::mem::size_of::<PatchFn>() as u32),
            shared: table(&self.shared, &SHARED, fuzz_shared as _),
            shared_entry_size: self.sizes[2].unwrap_or(std::mem::size_of::<SharedEntry>() as u32),
            host_allocator: cell(&self.host_allocator, &ALLOC_CELL, fuzz_host_allocator as _),
            early_overflow: match &self.early_overflow {
                FlagGetter::None => None,
                FlagGetter::NotCode(a) => not_code(a.get()),
                FlagGetter::Real(b) => {
                    OVERFLOW.store(*b, Relaxed);
                    Some(fuzz_early_overflow as _)
                }
            },
            init: match &self.init {
                InitField::None => None,
                InitField::NotCode(a) => not_code(a.get()),
                InitField::Real => Some(fuzz_init as _),
            },
        };
        // SAFETY: the manifest part of the arena has room for it.
        unsafe { put(arena(), self.offset, m) };
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
            init,
            ..
        }) => {
            prop_assert!(
                input.elsewhere.is_some() || !input.has_foreign_getter(),
                "a foreign getter accepted"
            );
            let own = |p: usize, len: usize, perms: &str| MAPS.own(p, len, perms);
            prop_assert!(own(m as usize, std::mem::size_of::<Manifest>(), "r"));
            prop_assert!(!c.functions.is_empty());
            prop_assert!(own(
                c.functions.as_ptr() as usize,
                size_of_val(c.functions),
                "r"
            ));
            prop_assert!(c.functions.as_ptr().is_aligned());
            for (p, len) in [
                (c.slots.as_ptr() as usize, size_of_val(c.slots)),
                (c.shared.as_ptr() as usize, size_of_val(c.shared)),
            ] {
                prop_assert!(len == 0 || own(p, len, "r"));
            }
            prop_assert!(c.slots.as_ptr().is_aligned() && c.shared.as_ptr().is_aligned());
            let cell = c.host_raise as *const AtomicPtr<()>;
            prop_assert!(cell.is_aligned() && own(cell as usize, 8, "rw"));
            if let Some(cell) = c.host_allocator {
                let cell = cell as *const AtomicPtr<HostAllocFns>;
                prop_assert!(cell.is_aligned() && own(cell as usize, 8, "rw"));
            }
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

// ---- Records: replacement records, entries, shared records

#[derive(Clone, Debug)]
struct EntryInput {
    /// Where it is: `None` for the records part of the arena.
    elsewhere: Option<Addr>,
    offset: usize,
    path: Str,
    signature: Str,
    layouts: (Addr, usize),
    slot: Addr,
    code: [Addr; 5],
}

fn entry_input() -> impl Strategy<Value = EntryInput> {
    let size = std::mem::size_of::<Entry>();
    let layouts = prop_oneof![
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
    ];
    let slot = prop_oneof![3 => data_slot(std::mem::size_of::<Slot>()), 2 => addr()];
    let code = prop_oneof![2 => (0..64usize).prop_map(Addr::Text), 1 => addr()];
    (
        prop_oneof![8 => Just(None), 1 => addr().prop_map(Some)],
        prop_oneof![
            9 => (0..(DATA - RECORDS - 2 * size) / 8).prop_map(|i| RECORDS + i * 8),
            1 => RECORDS..DATA - 2 * size,
        ],
        (string(), string()),
        layouts,
        slot,
        [code.clone(), code.clone(), code.clone(), code.clone(), code],
    )
        .prop_map(
            |(elsewhere, offset, (path, signature), layouts, slot, code)| EntryInput {
                elsewhere,
                offset,
                path,
                signature,
                layouts,
                slot,
                code,
            },
        )
}

impl EntryInput {
    fn place(&self) -> *const Entry {
        let base = arena() + self.offset;
        let layouts =
            slice_from_raw_parts(self.layouts.0.get() as *const TypeLayout, self.layouts.1);
        // SAFETY: the records part of the arena has room for an entry at
        // `offset`; each field gets any bits, written as raw words.
        unsafe {
            put(
                base,
                std::mem::offset_of!(Entry, path),
                self.path.place_str("svc::answer"),
            );
            put(
                base,
                std::mem::offset_of!(Entry, signature),
                self.signature.place_str("fn answer() -> u64"),
            );
            put(
                base,
                std::mem::offset_of!(Entry, fingerprint),
                self.offset as u64,
            );
            put(base, std::mem::offset_of!(Entry, layouts), layouts);
            put(
                base,
                std::mem::offset_of!(Entry, slot),
                self.slot.get() as *const Slot,
            );
            let fns = [
                std::mem::offset_of!(Entry, original),
                std::mem::offset_of!(Entry, wrapper),
                std::mem::offset_of!(Entry, guarded),
                std::mem::offset_of!(Entry, cross),
                std::mem::offset_of!(Entry, dispatcher),
            ];
            for (off, a) in fns.into_iter().zip(self.code) {
                put(base, off, FnAddr::new(a.get() as *const ()));
            }
        }
        match self.elsewhere {
            None => base as *const Entry,
            Some(a) => a.get() as *const Entry,
        }
    }
}

#[derive(Clone, Debug)]
enum TargetGetter {
    Real,
    NotCode(Addr),
}

#[derive(Clone, Debug)]
struct RecordInput {
    entry: EntryInput,
    target: TargetGetter,
    replacement: Addr,
    name: Str,
    shared_path: Str,
    shared_ty: Str,
    shared_size: usize,
    shared_local: Addr,
    shared_target: Addr,
    seed: u64,
}

fn record_input() -> impl Strategy<Value = RecordInput> {
    (
        entry_input(),
        prop_oneof![
            4 => Just(TargetGetter::Real),
            1 => not_a_getter().prop_map(TargetGetter::NotCode),
        ],
        prop_oneof![3 => (0..64usize).prop_map(Addr::Text), 1 => addr()],
        string(),
        (string(), string()),
        prop_oneof![3 => 0..64usize, 1 => any::<usize>(), 1 => Just(usize::MAX)],
        (addr(), prop_oneof![2 => data_slot(8), 3 => addr()]),
        any::<u64>(),
    )
        .prop_map(
            |(
                entry,
                target,
                replacement,
                name,
                (shared_path, shared_ty),
                shared_size,
                (shared_local, shared_target),
                seed,
            )| {
                RecordInput {
                    entry,
                    target,
                    replacement,
                    name,
                    shared_path,
                    shared_ty,
                    shared_size,
                    shared_local,
                    shared_target,
                    seed,
                }
            },
        )
}

/// Records as a good patch has them.
fn good_record() -> impl Strategy<Value = RecordInput> {
    let size = std::mem::size_of::<Entry>();
    let text = || (0..64usize).prop_map(Addr::Text);
    (
        (0..(DATA - RECORDS - 2 * size) / 8).prop_map(|i| RECORDS + i * 8),
        (data_slot(64), 0..5usize),
        data_slot(std::mem::size_of::<Slot>()),
        [text(), text(), text(), text(), text()],
        text(),
        (
            prop_oneof![
                4 => (data_slot(64), 0..=64usize),
                // A zero-sized static: nothing to read at `local`.
                1 => (dangling(), Just(0usize)),
            ],
            data_slot(8),
        ),
        any::<u64>(),
    )
        .prop_map(
            |(offset, layouts, slot, code, replacement, ((local, size), target), seed)| {
                RecordInput {
                    entry: EntryInput {
                        elsewhere: None,
                        offset,
                        path: Str::Good,
                        signature: Str::Good,
                        layouts,
                        slot,
                        code,
                    },
                    target: TargetGetter::Real,
                    replacement,
                    name: Str::Good,
                    shared_path: Str::Good,
                    shared_ty: Str::Good,
                    shared_size: size,
                    shared_local: local,
                    shared_target: target,
                    seed,
                }
            },
        )
}

/// How many fields [`RecordInput::take`] knows.
const RECORD_FIELDS: usize = 19;

/// As [`manifest_case`], for records.
fn record_case() -> impl Strategy<Value = RecordInput> {
    prop_oneof![
        1 => record_input(),
        4 => (
            good_record(),
            record_input(),
            proptest::collection::vec(0..RECORD_FIELDS, 0..=3),
        )
            .prop_map(|(mut good, random, fields)| {
                for field in fields {
                    good.take(&random, field);
                }
                good
            }),
    ]
}

/// `at` is an aligned place in the data part of the arena with room for
/// `size` bytes.
fn in_data(at: Addr, size: usize) -> bool {
    matches!(at, Addr::Arena(off) if off >= DATA && off.is_multiple_of(8) && off + size <= ARENA_LEN)
}

impl RecordInput {
    /// Takes field number `field` from `other`.
    fn take(&mut self, other: &RecordInput, field: usize) {
        let (e, o) = (&mut self.entry, &other.entry);
        match field {
            0 => e.elsewhere = o.elsewhere,
            1 => e.offset = o.offset,
            2 => e.path = o.path.clone(),
            3 => e.signature = o.signature.clone(),
            4 => e.layouts = o.layouts,
            5 => e.slot = o.slot,
            6..=10 => e.code[field - 6] = o.code[field - 6],
            11 => self.target = other.target.clone(),
            12 => self.replacement = other.replacement,
            13 => self.name = other.name.clone(),
            14 => self.shared_path = other.shared_path.clone(),
            15 => self.shared_ty = other.shared_ty.clone(),
            16 => self.shared_size = other.shared_size,
            17 => self.shared_local = other.shared_local,
            18 => self.shared_target = other.shared_target,
            _ => unreachable!("{RECORD_FIELDS} fields"),
        }
    }

    fn entry_right(&self) -> bool {
        let e = &self.entry;
        e.elsewhere.is_none()
            && e.offset.is_multiple_of(8)
            && e.path.right_or_empty()
            && e.signature.right_or_empty()
            && ((in_data(e.layouts.0, 64) && e.layouts.1 < 5)
                || (e.layouts.1 == 0 && empty_slice::<TypeLayout>(e.layouts.0.get())))
            && in_data(e.slot, std::mem::size_of::<Slot>())
            && e.code.iter().all(|a| matches!(a, Addr::Text(_)))
    }

    fn record_right(&self) -> bool {
        self.entry_right()
            && matches!(self.target, TargetGetter::Real)
            && matches!(self.replacement, Addr::Text(_))
            && self.name.right_or_empty()
    }

    fn shared_right(&self) -> bool {
        self.shared_path.right_or_empty()
            && self.shared_ty.right_or_empty()
            && self.shared_size <= 64
            && (in_data(self.shared_local, 64)
                || (self.shared_size == 0 && self.shared_local.get() != 0))
            && in_data(self.shared_target, 8)
    }
}

/// `p` is a valid pointer for an empty `&[T]`: non-null and aligned.
fn empty_slice<T>(p: usize) -> bool {
    p != 0 && p.is_multiple_of(std::mem::align_of::<T>())
}

/// This binary's image, as `check` finds it for a manifest in the arena.
fn image() -> Image {
    Image::containing(arena() as *const ()).expect("the arena is in this binary")
}

/// What an accepted entry must be: this binary's memory, as used.
fn entry_ok(e: *const Entry) -> Result<(), TestCaseError> {
    let own = |p: usize, len: usize, perms: &str| MAPS.own(p, len, perms);
    prop_assert!(e.is_aligned() && own(e as usize, std::mem::size_of::<Entry>(), "r"));
    // SAFETY: checked readable and aligned just above; fields read as
    // raw words.
    let (path, signature, layouts, slot) = unsafe {
        (
            (&raw const (*e).path).cast::<*const str>().read(),
            (&raw const (*e).signature).cast::<*const str>().read(),
            (&raw const (*e).layouts)
                .cast::<*const [TypeLayout]>()
                .read(),
            (&raw const (*e).slot).cast::<*const Slot>().read(),
        )
    };
    for s in [path, signature] {
        let len = (s as *const [u8]).len();
        let p = s.cast::<u8>() as usize;
        let readable = if len == 0 { p != 0 } else { own(p, len, "r") };
        prop_assert!(readable);
        // SAFETY: readable (checked just above).
        let bytes = unsafe { std::slice::from_raw_parts(s.cast::<u8>(), len) };
        prop_assert!(std::str::from_utf8(bytes).is_ok());
    }
    prop_assert!(empty_slice::<TypeLayout>(layouts.cast::<u8>() as usize));
    prop_assert!(layouts.is_empty() || own(layouts.cast::<u8>() as usize, layouts.len() * 16, "r"));
    prop_assert!(slot.is_aligned() && own(slot as usize, std::mem::size_of::<Slot>(), "rw"));
    // SAFETY: as above.
    let code = unsafe {
        [
            (*e).original,
            (*e).wrapper,
            (*e).guarded,
            (*e).cross,
            (*e).dispatcher,
        ]
    };
    for f in code {
        prop_assert!(own(f.as_ptr() as usize, 1, "x"));
    }
    Ok(())
}

fn check_records(input: &RecordInput) -> Result<(), TestCaseError> {
    fill(input.seed);
    let path = Path::new(PATH);
    let image = image();
    fn names<T>(r: &Result<T, Error>) -> bool {
        match r {
            Err(e) => matches!(e, Error::InvalidManifest { path, .. } if path == Path::new(PATH)),
            Ok(_) => true,
        }
    }

    // The entry, as the registry checks each of the slot table's.
    let e = input.entry.place();
    let result = entry(&image, e).map_err(|r| r.at(path));
    prop_assert!(names(&result), "{:?}", result.as_ref().err());
    prop_assert!(
        result.is_ok() || !input.entry_right(),
        "a right entry refused"
    );
    if result.is_ok() {
        entry_ok(e)?;
    }

    // A replacement record leading to that entry.
    TARGET_ENTRY.store(e.cast_mut(), Relaxed);
    let record = (arena() + DATA - std::mem::size_of::<PatchFn>() - 8) as *mut PatchFn;
    let target = match input.target {
        TargetGetter::Real => fuzz_target as fn() -> &'static Entry,
        TargetGetter::NotCode(a) => not_code(a.get()).expect("not null"),
    };
    // SAFETY: in the records part of the arena, aligned, after the
    // entry's room.
    unsafe {
        record.write(PatchFn {
            target,
            replacement: FnAddr::new(input.replacement.get() as *const ()),
            name: "",
        });
        (&raw mut (*record).name)
            .cast::<*const str>()
            .write(input.name.place_str("fix::answer"));
    }
    CALLS.store(0, Relaxed);
    // SAFETY: the record was just written; its fields are the input.
    let result = patch_fn(&image, unsafe { &*record }).map_err(|r| r.at(path));
    prop_assert!(names(&result), "{:?}", result.as_ref().err());
    prop_assert!(
        result.is_ok() || !input.record_right(),
        "a right record refused"
    );
    if let TargetGetter::NotCode(_) = input.target {
        prop_assert!(result.is_err());
        prop_assert_eq!(CALLS.load(Relaxed), 0, "a foreign target getter was called");
    }
    if result.is_ok() {
        prop_assert!(MAPS.own(input.replacement.get(), 1, "x"));
        entry_ok(e)?;
    }

    // A shared static's record.
    let shared = (arena() + RECORDS - std::mem::size_of::<SharedEntry>() - 8) as *mut SharedEntry;
    // SAFETY: at the end of the manifests' part of the arena, aligned, and
    // not used by this test otherwise.
    unsafe {
        shared.write(SharedEntry {
            path: "",
            ty: "",
            fingerprint: 0,
            layout: TypeLayout {
                size: input.shared_size,
                align: 8,
            },
            local: DataAddr(input.shared_local.get() as *const ()),
            target: DataAddr(input.shared_target.get() as *const ()),
        });
        (&raw mut (*shared).path)
            .cast::<*const str>()
            .write(input.shared_path.place_str("svc::COUNTER"));
        (&raw mut (*shared).ty)
            .cast::<*const str>()
            .write(input.shared_ty.place_str("u64"));
    }
    // SAFETY: as above.
    let result = shared_entry(&image, unsafe { &*shared }).map_err(|r| r.at(path));
    prop_assert!(names(&result), "{:?}", result.as_ref().err());
    prop_assert!(
        result.is_ok() || !input.shared_right(),
        "a right shared record refused"
    );
    if result.is_ok() {
        let target = input.shared_target.get();
        prop_assert!(target.is_multiple_of(8) && MAPS.own(target, 8, "rw"));
        let local = input.shared_local.get();
        let readable = if input.shared_size == 0 {
            local != 0
        } else {
            MAPS.own(local, input.shared_size, "r")
        };
        prop_assert!(readable);
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

/// The fuzz inputs' ranges reach what they are meant to: a right manifest
/// is accepted, and a foreign getter refused without a call.
#[test]
fn the_harness_reaches_acceptance() {
    let _lock = LOCK.lock().unwrap_or_else(|e| e.into_inner());
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
        slots: TableGetter::Real {
            at: Addr::Arena(DATA + 512),
            n: 0,
            writes: true,
        },
        shared: TableGetter::None,
        host_raise: CellGetter::Real(Addr::Arena(DATA + 1024)),
        host_allocator: CellGetter::None,
        early_overflow: FlagGetter::Real(false),
        init: InitField::Real,
        seed: 1,
    };
    assert!(input.all_right());
    let m = input.place();
    // SAFETY: a manifest in the arena.
    let checked = unsafe { fields(m) }
        .map_err(|r| r.at(Path::new(PATH)))
        .unwrap();
    assert_eq!(checked.tables.functions.len(), 2);
    assert_eq!(checked.about.name, "fuzz");

    // Empty strings and optional tables, their pointers dangling as the
    // compiler makes them: accepted, and read as empty.
    let right = input.clone();
    input.hotpatch_version = Str::Empty { at: Addr::Wild(1) };
    input.name = Str::Empty { at: Addr::Wild(1) };
    input.version = Str::Empty {
        at: Addr::Wild(usize::MAX),
    };
    input.description = Str::Empty { at: Addr::Heap(0) };
    input.slots = TableGetter::Real {
        at: Addr::Wild(8),
        n: 0,
        writes: true,
    };
    input.shared = TableGetter::Real {
        at: Addr::Wild(usize::MAX),
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
    assert!(checked.tables.slots.is_empty() && checked.tables.shared.is_empty());
    // A null empty string is no `&str`.
    input.description = Str::Raw {
        at: Addr::Null,
        len: 0,
        bytes: Vec::new(),
    };
    let m = input.place();
    // SAFETY: as above.
    let err = unsafe { fields(m) }
        .map_err(|r| r.at(Path::new(PATH)))
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("`description` is a null string"),
        "{err}"
    );
    input = right;

    input.host_raise = CellGetter::Real(Addr::Relro(0));
    let m = input.place();
    // SAFETY: as above.
    let err = unsafe { fields(m) }
        .map_err(|r| r.at(Path::new(PATH)))
        .err()
        .unwrap();
    assert!(err.to_string().contains("host-raise cell"), "{err}");

    input.slots = TableGetter::NotCode(Addr::OtherObject);
    let m = input.place();
    CALLS.store(0, Relaxed);
    // SAFETY: as above.
    let err = unsafe { fields(m) }
        .map_err(|r| r.at(Path::new(PATH)))
        .err()
        .unwrap();
    assert!(err.to_string().contains("`slots` points outside"), "{err}");
    assert_eq!(CALLS.load(Relaxed), 0);
    assert!(!MAPS.own(null::<u8>() as usize, 1, "r"));
    assert!(MAPS.image_end >= arena() + ARENA_LEN);
    assert!(
        !MAPS.own(MAPS.image_end, 1, "r"),
        "nothing of this binary past its end"
    );
}
