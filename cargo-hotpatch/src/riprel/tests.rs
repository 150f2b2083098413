//! Each access is proved by execution: a harness function fills every
//! general register, %xmm0, the flags and three red-zone words with
//! known values, runs the access, and dumps them all. It runs twice:
//! as assembled, with its displacement relocated to a copy of the data
//! on the next page, and rewritten, with its thunks and cells
//! relocated as the caller would and the cell pointing at a `static`
//! of the test. Both runs must leave the same registers, flags, red
//! zone, return value and data, and the data what the instruction
//! computes.

use super::*;
use iced_x86::{Code, IcedError, MemoryOperand, Register as R};
use std::cell::UnsafeCell;

/// The registers the harness fills, in dump order (%rbp holds the
/// dump's address, %rsp is the stack).
const GPRS: [R; 14] = [
    R::RAX,
    R::RBX,
    R::RCX,
    R::RDX,
    R::RSI,
    R::RDI,
    R::R8,
    R::R9,
    R::R10,
    R::R11,
    R::R12,
    R::R13,
    R::R14,
    R::R15,
];
/// Red-zone words the harness fills, as offsets from %rsp.
const RED: [i64; 3] = [-8, -64, -128];
const RED_AT: usize = GPRS.len();
const FLAGS_AT: usize = RED_AT + RED.len();
const XMM_AT: usize = FLAGS_AT + 1;
const DUMP: usize = XMM_AT + 2;
/// CF PF AF ZF SF OF.
const ALL_STATUS: u32 = 0x8d5;
/// The status flags and DF: the bits compared.
const FLAGS_MASK: u64 = 0x8d5 | 0x400;
const PAGE: usize = 4096;

fn initial(r: R) -> u64 {
    let i = GPRS.iter().position(|&g| g == r).unwrap() as u64;
    0x8000_0000_0000_0000 | ((i + 1) * 0x0101_0101_0101)
}

fn red_value(j: usize) -> i32 {
    0x1234_5670 + j as i32
}

#[repr(C, align(16))]
struct Data(UnsafeCell<[u64; 4]>);

// SAFETY: each test has its own `Data`, touched only by the test's
// thread (and the code it calls).
unsafe impl Sync for Data {}

impl Data {
    const fn new(words: [u64; 4]) -> Self {
        Self(UnsafeCell::new(words))
    }
    fn addr(&self) -> u64 {
        self.0.get() as u64
    }
    fn get(&self) -> [u64; 4] {
        // SAFETY: the pointer is to the live static; the code that
        // wrote it has returned on this thread.
        unsafe { self.0.get().read_volatile() }
    }
}

struct Case {
    /// Registers whose initial value is not `initial(r)`.
    regs: Vec<(R, u64)>,
    flags: u32,
    xmm0: u64,
    data: [u64; 4],
    /// The instructions under test; `Some(off)` marks a rip-relative
    /// access of the data's byte `off`.
    body: Vec<(Instruction, Option<i64>)>,
}

impl Case {
    fn new(data: [u64; 4], body: Vec<(Instruction, Option<i64>)>) -> Self {
        Self {
            regs: Vec::new(),
            flags: ALL_STATUS,
            xmm0: 0x0bad_cafe_f00d_d00d,
            data,
            body,
        }
    }
    fn reg(mut self, r: R, v: u64) -> Self {
        self.regs.push((r, v));
        self
    }
    fn start(&self, r: R) -> u64 {
        self.regs
            .iter()
            .rev()
            .find(|(g, _)| *g == r)
            .map_or(initial(r), |&(_, v)| v)
    }
}

fn rip() -> MemoryOperand {
    MemoryOperand::with_base_displ(R::RIP, 0)
}

fn ok(i: Result<Instruction, IcedError>) -> (Instruction, Option<i64>) {
    (i.unwrap(), None)
}

fn access(i: Result<Instruction, IcedError>, off: i64) -> (Instruction, Option<i64>) {
    (i.unwrap(), Some(off))
}

fn locked(i: Result<Instruction, IcedError>, off: i64) -> (Instruction, Option<i64>) {
    let mut i = i.unwrap();
    i.set_has_lock_prefix(true);
    (i, Some(off))
}

/// A site as the assembler leaves it: the displacement at `at`, the
/// instruction ending at `end`, accessing the data's byte `off`
/// (relocation `S + off - (end - at) - P`).
#[derive(Debug, Clone, Copy)]
struct Site {
    at: usize,
    end: usize,
    off: i64,
}

impl Site {
    fn addend(&self) -> i64 {
        self.off - (self.end - self.at) as i64
    }
}

struct Function {
    code: Vec<u8>,
    sites: Vec<Site>,
    /// The instruction at each site, as encoded.
    originals: Vec<Instruction>,
}

fn mem(base: R, displ: i64) -> MemoryOperand {
    MemoryOperand::with_base_displ(base, displ)
}

/// `extern "C" fn(dump: *mut [u64; DUMP]) -> u64` around the case's body.
fn assemble(case: &Case) -> Function {
    let saved = [R::RBX, R::RBP, R::R12, R::R13, R::R14, R::R15];
    let mut all = Vec::new();
    for r in saved {
        all.push(ok(Instruction::with1(Code::Push_r64, r)));
    }
    all.push(ok(Instruction::with2(Code::Mov_r64_rm64, R::RBP, R::RDI)));
    all.push(ok(Instruction::with1(Code::Pushq_imm32, case.flags)));
    all.push((Instruction::with(Code::Popfq), None));
    all.push(ok(Instruction::with2(
        Code::Mov_r64_imm64,
        R::RAX,
        case.xmm0,
    )));
    all.push(ok(Instruction::with2(Code::Movq_xmm_rm64, R::XMM0, R::RAX)));
    for r in GPRS {
        all.push(ok(Instruction::with2(
            Code::Mov_r64_imm64,
            r,
            case.start(r),
        )));
    }
    for (j, d) in RED.into_iter().enumerate() {
        all.push(ok(Instruction::with2(
            Code::Mov_rm64_imm32,
            mem(R::RSP, d),
            red_value(j),
        )));
    }
    all.extend(case.body.iter().copied());
    for (i, r) in GPRS.into_iter().enumerate() {
        all.push(ok(Instruction::with2(
            Code::Mov_rm64_r64,
            mem(R::RBP, 8 * i as i64),
            r,
        )));
    }
    for (j, d) in RED.into_iter().enumerate() {
        all.push(ok(Instruction::with2(
            Code::Mov_r64_rm64,
            R::RAX,
            mem(R::RSP, d),
        )));
        all.push(ok(Instruction::with2(
            Code::Mov_rm64_r64,
            mem(R::RBP, 8 * (RED_AT + j) as i64),
            R::RAX,
        )));
    }
    all.push((Instruction::with(Code::Pushfq), None));
    all.push(ok(Instruction::with1(Code::Pop_r64, R::RAX)));
    all.push(ok(Instruction::with2(
        Code::Mov_rm64_r64,
        mem(R::RBP, 8 * FLAGS_AT as i64),
        R::RAX,
    )));
    all.push(ok(Instruction::with2(
        Code::Movups_xmmm128_xmm,
        mem(R::RBP, 8 * XMM_AT as i64),
        R::XMM0,
    )));
    all.push(ok(Instruction::with2(
        Code::Mov_r64_rm64,
        R::RAX,
        mem(R::RBP, 0),
    )));
    for r in saved.into_iter().rev() {
        all.push(ok(Instruction::with1(Code::Pop_r64, r)));
    }
    all.push((Instruction::with(Code::Retnq), None));

    let mut encoder = Encoder::new(64);
    let mut f = Function {
        code: Vec::new(),
        sites: Vec::new(),
        originals: Vec::new(),
    };
    for (instr, off) in all {
        let ip = f.code.len();
        let n = encoder.encode(&instr, ip as u64).unwrap();
        let offsets = encoder.get_constant_offsets();
        f.code.extend(encoder.take_buffer());
        if let Some(off) = off {
            assert!(instr.is_ip_rel_memory_operand());
            assert_eq!(offsets.displacement_size(), 4);
            f.sites.push(Site {
                at: ip + offsets.displacement_offset(),
                end: ip + n,
                off,
            });
            f.originals.push(instr);
        }
    }
    f
}

/// `S + A - P` into a rel32 field.
fn pc32(buf: &mut [u8], at: usize, s: u64, a: i64, p: u64) {
    let v = (s as i64).wrapping_add(a).wrapping_sub(p as i64);
    let v = i32::try_from(v).expect("PC32 out of reach");
    buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// Two pages: code (made read+execute before the call), then data.
struct Pages(*mut u8);

impl Pages {
    fn new() -> Self {
        // SAFETY: an anonymous private mapping of fresh pages; no
        // existing memory is touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                2 * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap");
        Self(p.cast())
    }
    fn code(&self) -> u64 {
        self.0 as u64
    }
    fn data(&self) -> u64 {
        self.0 as u64 + PAGE as u64
    }
    /// Copies `code` and `data` in, makes the code page read+execute,
    /// calls its start and returns (return value, dump, data after).
    fn run(&self, code: &[u8], data: [u64; 4]) -> (u64, [u64; DUMP], [u64; 4]) {
        assert!(code.len() <= PAGE);
        let mut dump = [0u64; DUMP];
        // SAFETY: both copies stay inside the two mapped pages, still
        // writable; the data page is 16-aligned.
        unsafe {
            std::ptr::copy_nonoverlapping(code.as_ptr(), self.0, code.len());
            (self.data() as *mut [u64; 4]).write(data);
        }
        // SAFETY: the first page is ours; it becomes read+execute,
        // never writable and executable at once.
        let rc = unsafe { libc::mprotect(self.0.cast(), PAGE, libc::PROT_READ | libc::PROT_EXEC) };
        assert_eq!(rc, 0, "mprotect");
        // SAFETY: the page holds a complete SysV function (the
        // harness saves and restores the callee-saved registers, its
        // pushes and pops balance, DF is clear at return) that writes
        // only `dump` (through its argument), the data page and the
        // case's `static`.
        let ret = unsafe {
            let f: extern "C" fn(*mut u64) -> u64 = std::mem::transmute(self.0);
            f(dump.as_mut_ptr())
        };
        // SAFETY: the data page is mapped and the code returned.
        let after = unsafe { (self.data() as *const [u64; 4]).read_volatile() };
        (ret, dump, after)
    }
}

impl Drop for Pages {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, no longer used.
        unsafe { libc::munmap(self.0.cast(), 2 * PAGE) };
    }
}

/// What a run leaves.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    ret: u64,
    regs: [u64; GPRS.len()],
    red: [u64; 3],
    flags: u64,
    xmm0: [u64; 2],
    data: [u64; 4],
}

impl Outcome {
    fn new(ret: u64, dump: [u64; DUMP], data: [u64; 4]) -> Self {
        Self {
            ret,
            regs: dump[..RED_AT].try_into().unwrap(),
            red: dump[RED_AT..FLAGS_AT].try_into().unwrap(),
            flags: dump[FLAGS_AT] & FLAGS_MASK,
            xmm0: [dump[XMM_AT], dump[XMM_AT + 1]],
            data,
        }
    }
    fn reg(&self, r: R) -> u64 {
        self.regs[GPRS.iter().position(|&g| g == r).unwrap()]
    }
}

/// The function as assembled, its sites relocated to a copy of the
/// data on the next page.
fn run_original(f: &Function, data: [u64; 4]) -> Outcome {
    let pages = Pages::new();
    let mut code = f.code.clone();
    for s in &f.sites {
        pc32(
            &mut code,
            s.at,
            pages.data(),
            s.addend(),
            pages.code() + s.at as u64,
        );
    }
    let (ret, dump, after) = pages.run(&code, data);
    Outcome::new(ret, dump, after)
}

/// The thunk is exactly the documented sequence around the original
/// instruction re-encoded with `(%scratch)`.
fn check_shape(original: &Instruction, thunk: &Thunk) {
    let mut decoder = Decoder::new(64, &thunk.bytes, DecoderOptions::NONE);
    let got: Vec<Instruction> = decoder.iter().collect();
    assert_eq!(got.len(), 7, "{got:?}");
    let s = thunk.scratch;
    assert_eq!(got[0].code(), Code::Lea_r64_m);
    assert_eq!(
        (got[0].memory_base(), got[0].memory_displacement64() as i64),
        (R::RSP, -128)
    );
    assert_eq!((got[1].code(), got[1].op0_register()), (Code::Push_r64, s));
    assert_eq!(
        (got[2].code(), got[2].op0_register()),
        (Code::Mov_r64_rm64, s)
    );
    assert!(got[2].is_ip_rel_memory_operand());
    let mut expect = *original;
    expect.set_memory_base(s);
    expect.set_memory_displacement64(0);
    expect.set_memory_displ_size(0);
    let mine = got[3];
    assert_eq!(mine.code(), original.code(), "{mine}");
    assert_eq!(mine.has_lock_prefix(), original.has_lock_prefix(), "{mine}");
    assert_eq!(mine.memory_base(), s, "{mine}");
    assert_eq!(mine.memory_displacement64(), 0, "{mine}");
    assert_eq!(mine.memory_size(), original.memory_size(), "{mine}");
    assert_eq!(mine.op_count(), original.op_count(), "{mine}");
    for op in 0..original.op_count() {
        assert_eq!(mine.op_kind(op), original.op_kind(op), "{mine}");
        match original.op_kind(op) {
            iced_x86::OpKind::Register => {
                assert_eq!(mine.op_register(op), original.op_register(op), "{mine}")
            }
            iced_x86::OpKind::Memory => {}
            _ => assert_eq!(
                mine.try_immediate(op).unwrap(),
                original.try_immediate(op).unwrap(),
                "{mine}"
            ),
        }
    }
    assert_eq!((got[4].code(), got[4].op0_register()), (Code::Pop_r64, s));
    assert_eq!(
        (got[5].memory_base(), got[5].memory_displacement64() as i64),
        (R::RSP, 128)
    );
    assert_eq!(got[5].code(), Code::Lea_r64_m);
    assert_eq!(got[6].code(), Code::Jmp_rel32_64);
    assert_eq!(thunk.back_at, thunk.bytes.len() - 4);
    assert_eq!(got[2].len(), 7);
    assert_eq!(
        thunk.cell_at + 4,
        (got[0].len() + got[1].len() + got[2].len())
    );
}

/// The function rewritten, its thunks and cells placed after it and
/// relocated as the caller would, each cell pointing into `data`.
fn run_rewritten(f: &Function, data: &'static Data) -> (Outcome, Rewritten) {
    let at: Vec<usize> = f.sites.iter().map(|s| s.at).collect();
    let rw = rewrite(&f.code, &at).unwrap();
    assert_eq!(rw.code.len(), f.code.len());
    assert_eq!(rw.thunks.len(), f.sites.len());
    let pages = Pages::new();
    let base = pages.code();
    let mut page = rw.code.clone();
    let mut cells = Vec::new();
    for (((t, s), original), n) in rw.thunks.iter().zip(&f.sites).zip(&f.originals).zip(0..) {
        check_shape(original, t);
        assert_eq!(t.resume, s.end, "thunk {n}");
        assert_eq!(t.tail, s.end - s.at, "thunk {n}");
        assert_eq!(t.start + 1, t.jump_in_at, "thunk {n}");
        assert_eq!(rw.code[t.start], JMP_REL32);
        assert!(
            rw.code[t.start + JMP_LEN..t.resume]
                .iter()
                .all(|&b| b == INT3)
        );
        page.resize(page.len().next_multiple_of(16), INT3);
        let thunk = page.len();
        page.extend(&t.bytes);
        cells.push((thunk, t, s));
    }
    page.resize(page.len().next_multiple_of(8), 0);
    for (thunk, t, s) in cells {
        let cell = page.len();
        let value = (data.addr() as i64 + s.addend() + t.tail as i64) as u64;
        page.extend(value.to_le_bytes());
        let thunk_addr = base + thunk as u64;
        pc32(
            &mut page,
            t.jump_in_at,
            thunk_addr,
            -4,
            base + t.jump_in_at as u64,
        );
        pc32(
            &mut page,
            thunk + t.cell_at,
            base + cell as u64,
            -4,
            thunk_addr + t.cell_at as u64,
        );
        pc32(
            &mut page,
            thunk + t.back_at,
            base,
            t.resume as i64 - 4,
            thunk_addr + t.back_at as u64,
        );
    }
    // Whatever touches the data page instead of the static shows.
    let sentinel = [0x5e17_1e15_5e17_1e15; 4];
    let (ret, dump, after) = pages.run(&page, sentinel);
    assert_eq!(after, sentinel, "the rewritten code touched the data page");
    (Outcome::new(ret, dump, data.get()), rw)
}

/// Runs both and checks they agree; returns the rewritten run.
fn prove(case: &Case, data: &'static Data) -> (Outcome, Rewritten) {
    assert_eq!(
        data.get(),
        case.data,
        "the static starts as the case's data"
    );
    let f = assemble(case);
    let original = run_original(&f, case.data);
    let (rewritten, rw) = run_rewritten(&f, data);
    for (r, (got, want)) in GPRS.iter().zip(rewritten.regs.iter().zip(original.regs)) {
        assert_eq!(*got, want, "{r:?}: rewritten vs original");
    }
    assert_eq!(
        rewritten.red, original.red,
        "red zone: rewritten vs original"
    );
    assert_eq!(
        rewritten.flags, original.flags,
        "flags: rewritten vs original"
    );
    assert_eq!(rewritten.xmm0, original.xmm0, "xmm0: rewritten vs original");
    assert_eq!(rewritten.data, original.data, "data: rewritten vs original");
    assert_eq!(rewritten, original, "rewritten vs original");
    assert_eq!(rewritten.ret, rewritten.reg(R::RAX));
    for (j, red) in rewritten.red.iter().enumerate() {
        assert_eq!(*red, red_value(j) as u64, "red zone word {j}");
    }
    (rewritten, rw)
}

/// The registers the body does not write hold their initial values.
fn untouched_except(case: &Case, out: &Outcome, written: &[R]) {
    for r in GPRS {
        if !written.contains(&r) {
            assert_eq!(out.reg(r), case.start(r), "{r:?}");
        }
    }
}

#[test]
fn lock_incq() {
    static D: Data = Data::new([5, 0, 0, 0]);
    let case = Case::new(
        [5, 0, 0, 0],
        vec![locked(Instruction::with1(Code::Inc_rm64, rip()), 0)],
    );
    let (out, rw) = prove(&case, &D);
    assert_eq!(out.data, [6, 0, 0, 0]);
    // inc leaves CF alone: set before, still set.
    assert_eq!(out.flags & 1, 1);
    assert_eq!(out.flags & 0x40, 0, "ZF of 6");
    assert_eq!(rw.thunks[0].scratch, R::RBX);
    untouched_except(&case, &out, &[]);
    assert_eq!(out.xmm0, [case.xmm0, 0]);
}

#[test]
fn lock_xadd() {
    static D: Data = Data::new([100, 0, 0, 0]);
    let case = Case::new(
        [100, 0, 0, 0],
        vec![locked(
            Instruction::with2(Code::Xadd_rm64_r64, rip(), R::RCX),
            0,
        )],
    )
    .reg(R::RCX, 10);
    let (out, _) = prove(&case, &D);
    assert_eq!(out.data[0], 110);
    assert_eq!(out.reg(R::RCX), 100);
    untouched_except(&case, &out, &[R::RCX]);
}

#[test]
fn mov_load_into_rax() {
    static D: Data = Data::new([1, 0x1122_3344_5566_7788, 3, 4]);
    let case = Case::new(
        [1, 0x1122_3344_5566_7788, 3, 4],
        vec![access(
            Instruction::with2(Code::Mov_r64_rm64, R::RAX, rip()),
            8,
        )],
    );
    let (out, _) = prove(&case, &D);
    assert_eq!(out.ret, 0x1122_3344_5566_7788);
    assert_eq!(out.data, [1, 0x1122_3344_5566_7788, 3, 4]);
    untouched_except(&case, &out, &[R::RAX]);
}

#[test]
fn mov_load_into_r11() {
    static D: Data = Data::new([0x0102_0304_0506_0708, 0, 0, 0]);
    let case = Case::new(
        [0x0102_0304_0506_0708, 0, 0, 0],
        vec![access(
            Instruction::with2(Code::Mov_r64_rm64, R::R11, rip()),
            0,
        )],
    );
    let (out, rw) = prove(&case, &D);
    assert_eq!(out.reg(R::R11), 0x0102_0304_0506_0708);
    assert_eq!(rw.thunks[0].scratch, R::RBX);
    untouched_except(&case, &out, &[R::R11]);
}

#[test]
fn mov_store_from_register() {
    static D: Data = Data::new([0; 4]);
    let case = Case::new(
        [0; 4],
        vec![access(
            Instruction::with2(Code::Mov_rm64_r64, rip(), R::RDX),
            16,
        )],
    );
    let (out, _) = prove(&case, &D);
    assert_eq!(out.data, [0, 0, initial(R::RDX), 0]);
    untouched_except(&case, &out, &[]);
}

#[test]
fn mov_store_of_imm32_has_tail_8() {
    static D: Data = Data::new([7; 4]);
    let case = Case::new(
        [7; 4],
        vec![access(
            Instruction::with2(Code::Mov_rm64_imm32, rip(), -2i32),
            8,
        )],
    );
    let f = assemble(&case);
    // `movq $-2, S+8(%rip)`: the immediate follows the displacement,
    // so the assembler's addend is 8 - 8.
    assert_eq!(f.sites[0].addend(), 8 - 8);
    let (out, rw) = prove(&case, &D);
    assert_eq!(rw.thunks[0].tail, 8);
    assert_eq!(out.data, [7, (-2i64) as u64, 7, 7]);
    untouched_except(&case, &out, &[]);
}

#[test]
fn cmp_imm8_then_sete() {
    static D: Data = Data::new([7, 0, 0, 0]);
    let mut case = Case::new(
        [7, 0, 0, 0],
        vec![
            access(Instruction::with2(Code::Cmp_rm64_imm8, rip(), 7), 0),
            ok(Instruction::with1(Code::Sete_rm8, R::AL)),
        ],
    )
    .reg(R::RAX, 0x7700);
    // ZF clear before: only the cmp can set it.
    case.flags = 0;
    let (out, _) = prove(&case, &D);
    assert_eq!(out.ret, 0x7701);
    assert_eq!(out.flags & 0x40, 0x40, "ZF");
    untouched_except(&case, &out, &[R::RAX]);
}

#[test]
fn add_register_to_memory_avoids_the_register_as_scratch() {
    static D: Data = Data::new([1, 0, 0, 0]);
    let case = Case::new(
        [1, 0, 0, 0],
        vec![access(
            Instruction::with2(Code::Add_rm64_r64, rip(), R::RBX),
            0,
        )],
    );
    let (out, rw) = prove(&case, &D);
    assert_eq!(out.data[0], initial(R::RBX) + 1);
    assert_eq!(rw.thunks[0].scratch, R::RSI);
    untouched_except(&case, &out, &[]);
}

#[test]
fn lock_cmpxchg_with_implicit_rax() {
    static D: Data = Data::new([42, 0, 0, 0]);
    let case = Case::new(
        [42, 0, 0, 0],
        vec![locked(
            Instruction::with2(Code::Cmpxchg_rm64_r64, rip(), R::RSI),
            0,
        )],
    )
    .reg(R::RAX, 42);
    let (out, rw) = prove(&case, &D);
    assert_eq!(out.data[0], initial(R::RSI));
    assert_eq!(out.flags & 0x40, 0x40, "ZF: exchanged");
    assert_eq!(rw.thunks[0].scratch, R::RBX);
    untouched_except(&case, &out, &[]);
}

#[test]
fn lock_cmpxchg16b_avoids_implicit_rbx() {
    static D: Data = Data::new([1, 2, 0, 0]);
    let case = Case::new(
        [1, 2, 0, 0],
        vec![locked(Instruction::with1(Code::Cmpxchg16b_m128, rip()), 0)],
    )
    .reg(R::RAX, 1)
    .reg(R::RDX, 2);
    let (out, rw) = prove(&case, &D);
    assert_eq!(out.data, [initial(R::RBX), initial(R::RCX), 0, 0]);
    assert_eq!(rw.thunks[0].scratch, R::RSI);
    untouched_except(&case, &out, &[]);
}

#[test]
fn xchg_register_with_memory() {
    static D: Data = Data::new([9, 0, 0, 0]);
    let case = Case::new(
        [9, 0, 0, 0],
        vec![access(
            Instruction::with2(Code::Xchg_rm64_r64, rip(), R::R8),
            0,
        )],
    );
    let (out, _) = prove(&case, &D);
    assert_eq!(out.data[0], initial(R::R8));
    assert_eq!(out.reg(R::R8), 9);
    untouched_except(&case, &out, &[R::R8]);
}

#[test]
fn sse_load_movsd() {
    let x = 2.5f64.to_bits();
    static D: Data = Data::new([0, 0x4004_0000_0000_0000, 0, 0]);
    let case = Case::new(
        [0, x, 0, 0],
        vec![access(
            Instruction::with2(Code::Movsd_xmm_xmmm64, R::XMM0, rip()),
            8,
        )],
    );
    let (out, _) = prove(&case, &D);
    assert_eq!(out.xmm0, [x, 0]);
    untouched_except(&case, &out, &[]);
}

#[test]
fn byte_store_of_imm8() {
    static D: Data = Data::new([0x1111_1111_1111_1111, 0, 0, 0]);
    let case = Case::new(
        [0x1111_1111_1111_1111, 0, 0, 0],
        vec![access(
            Instruction::with2(Code::Mov_rm8_imm8, rip(), 1u32),
            3,
        )],
    );
    let (out, rw) = prove(&case, &D);
    assert_eq!(out.data[0], 0x1111_1111_0111_1111);
    assert_eq!(rw.thunks[0].tail, 5);
    untouched_except(&case, &out, &[]);
}

#[test]
fn two_sites_in_one_function() {
    static D: Data = Data::new([5, 6, 0, 0]);
    let case = Case::new(
        [5, 6, 0, 0],
        vec![
            locked(Instruction::with1(Code::Inc_rm64, rip()), 8),
            ok(Instruction::with2(Code::Add_r64_rm64, R::RCX, R::RDX)),
            access(Instruction::with2(Code::Mov_r64_rm64, R::RAX, rip()), 8),
        ],
    );
    let (out, rw) = prove(&case, &D);
    assert_eq!(rw.thunks.len(), 2);
    assert_eq!(out.data, [5, 7, 0, 0]);
    assert_eq!(out.ret, 7);
    assert_eq!(
        out.reg(R::RCX),
        initial(R::RCX).wrapping_add(initial(R::RDX))
    );
    untouched_except(&case, &out, &[R::RAX, R::RCX]);
}

// --- refusals ---

fn encode(instrs: &[Instruction]) -> (Vec<u8>, Vec<(usize, Option<usize>)>) {
    let mut encoder = Encoder::new(64);
    let mut code = Vec::new();
    let mut at = Vec::new();
    for i in instrs {
        let ip = code.len();
        encoder.encode(i, ip as u64).unwrap();
        let o = encoder.get_constant_offsets();
        at.push((
            ip,
            o.has_displacement().then(|| ip + o.displacement_offset()),
        ));
        code.extend(encoder.take_buffer());
    }
    (code, at)
}

/// A function of `nop; <instr>; ret`, and the instruction's offset
/// and displacement field.
fn one(i: Result<Instruction, IcedError>) -> (Vec<u8>, usize, Option<usize>) {
    let (code, at) = encode(&[
        Instruction::with(Code::Nopd),
        i.unwrap(),
        Instruction::with(Code::Retnq),
    ]);
    (code, at[1].0, at[1].1)
}

#[test]
fn refuses_code_that_does_not_decode() {
    // 0x06 (push %es) is invalid in 64-bit mode.
    let (mut code, _, site) = one(Instruction::with1(Code::Inc_rm64, rip()));
    code.insert(0, 0x06);
    let err = rewrite(&code, &[site.unwrap() + 1]).unwrap_err();
    assert!(
        matches!(&err, RipRelError::Undecodable { offset: 0, bytes } if bytes.starts_with("0690")),
        "{err:?}"
    );
}

#[test]
fn refuses_a_site_outside_the_function() {
    let (code, _, _) = one(Instruction::with1(Code::Inc_rm64, rip()));
    let err = rewrite(&code, &[code.len() - 3]).unwrap_err();
    assert_eq!(
        err,
        RipRelError::OutOfRange {
            site: code.len() - 3,
            len: code.len()
        }
    );
}

#[test]
fn refuses_a_site_given_twice() {
    let (code, _, site) = one(Instruction::with1(Code::Inc_rm64, rip()));
    let site = site.unwrap();
    let err = rewrite(&code, &[site, site]).unwrap_err();
    assert_eq!(err, RipRelError::DuplicateSite { site });
}

#[test]
fn refuses_a_site_without_a_rip_relative_operand() {
    let (code, at, _) = one(Instruction::with2(Code::Mov_r32_imm32, R::EAX, 0x1234u32));
    let err = rewrite(&code, &[at + 1]).unwrap_err();
    assert!(
        matches!(&err, RipRelError::NotRipRelative { site, offset, text }
            if *site == at + 1 && *offset == at && text == "mov $0x1234,%eax"),
        "{err:?}"
    );
}

#[test]
fn refuses_a_site_that_is_not_the_displacement() {
    // The site on the immediate of `movq $imm32, S(%rip)`.
    let (code, at, disp) = one(Instruction::with2(Code::Mov_rm64_imm32, rip(), 0x7777));
    let disp = disp.unwrap();
    let err = rewrite(&code, &[disp + 4]).unwrap_err();
    assert!(
        matches!(&err, RipRelError::NotDisplacement { site, offset, displacement, text }
            if *site == disp + 4 && *offset == at && *displacement == disp && text.starts_with("movq $0x7777,")),
        "{err:?}"
    );
}

#[test]
fn refuses_lea() {
    let (code, at, disp) = one(Instruction::with2(Code::Lea_r64_m, R::RAX, rip()));
    let err = rewrite(&code, &[disp.unwrap()]).unwrap_err();
    assert!(
        matches!(&err, RipRelError::Lea { offset, text } if *offset == at && text.starts_with("lea ")),
        "{err:?}"
    );
    assert!(
        err.to_string().contains(&format!("at offset {at:#x}")),
        "{err}"
    );
}

#[test]
fn refuses_what_uses_the_stack() {
    for i in [
        Instruction::with1(Code::Push_rm64, rip()),
        Instruction::with1(Code::Pop_rm64, rip()),
        Instruction::with1(Code::Call_rm64, rip()),
        Instruction::with2(Code::Mov_rm64_r64, rip(), R::RSP),
        Instruction::with2(Code::Add_rm32_r32, rip(), R::ESP),
    ] {
        let (code, at, disp) = one(i);
        let err = rewrite(&code, &[disp.unwrap()]).unwrap_err();
        assert!(
            matches!(&err, RipRelError::UsesStack { offset, .. } if *offset == at),
            "{err:?}"
        );
    }
}

#[test]
fn refuses_what_transfers_control() {
    let (code, at, disp) = one(Instruction::with1(Code::Jmp_rm64, rip()));
    let err = rewrite(&code, &[disp.unwrap()]).unwrap_err();
    assert!(
        matches!(&err, RipRelError::ControlFlow { offset, text } if *offset == at && text.starts_with("jmp")),
        "{err:?}"
    );
}

#[test]
fn refuses_enter_and_leave() {
    // They hold no memory operand, so a site in them is no displacement.
    for i in [
        Instruction::with2(Code::Enterq_imm16_imm8, 0x1234u32, 0u32).unwrap(),
        Instruction::with(Code::Leaveq),
    ] {
        let nop = Instruction::with(Code::Nopd);
        let (code, at) = encode(&[i, nop, nop, nop, nop, Instruction::with(Code::Retnq)]);
        let err = rewrite(&code, &[0]).unwrap_err();
        assert!(
            matches!(&err, RipRelError::NotRipRelative { offset: 0, text, .. } if text.starts_with("enter") || text.starts_with("leave")),
            "{err:?} {at:?}"
        );
    }
}

#[test]
fn refuses_an_instruction_shorter_than_a_jmp() {
    // No rip-relative instruction is shorter than 6 bytes (opcode,
    // ModRM, disp32), so the check is fed a decoded one told it is 4.
    let (code, _, disp) = one(Instruction::with1(Code::Inc_rm64, rip()));
    let mut decoded = decode(&code).unwrap();
    decoded[1].instr.set_len(4);
    let err = check(
        &decoded[1],
        disp.unwrap(),
        &mut InstructionInfoFactory::new(),
    )
    .unwrap_err();
    assert!(
        matches!(err, RipRelError::TooShort { len: 4, .. }),
        "{err:?}"
    );
}

#[test]
fn refuses_when_no_scratch_is_free() {
    // Every candidate but rbx ruled out, and rbx used by the instruction.
    let (code, _, disp) = one(Instruction::with2(Code::Add_rm64_r64, rip(), R::RBX));
    let decoded = decode(&code).unwrap();
    let err = thunk_with(&decoded[1], disp.unwrap(), &[R::RBX]).unwrap_err();
    assert!(
        matches!(err, RipRelError::NoScratch { offset: 1, .. }),
        "{err:?}"
    );
    assert!(thunk_with(&decoded[1], disp.unwrap(), &[R::RBX, R::RDI]).is_ok());
}

#[test]
fn leaves_other_rip_relative_operands_alone() {
    // A GOT load stays as it is; only the site is rewritten.
    let (code, at) = encode(&[
        Instruction::with2(Code::Mov_r64_rm64, R::RAX, rip()).unwrap(),
        Instruction::with1(Code::Inc_rm64, rip()).unwrap(),
        Instruction::with(Code::Retnq),
    ]);
    let rw = rewrite(&code, &[at[1].1.unwrap()]).unwrap();
    assert_eq!(rw.code[..at[1].0], code[..at[1].0]);
    assert_eq!(rw.code[at[2].0..], code[at[2].0..]);
    assert_eq!(rw.code[at[1].0], JMP_REL32);
}

#[test]
fn access_names_what_the_instruction_does_with_its_field() {
    // call rel32; jz rel32; mov 0(%rip),%rax; lea 0(%rip),%rcx;
    // lock incq 0(%rip); ret
    let mut code = vec![0xe8, 0, 0, 0, 0];
    code.extend([0x0f, 0x84, 0, 0, 0, 0]);
    code.extend([0x48, 0x8b, 0x05, 0, 0, 0, 0]);
    code.extend([0x48, 0x8d, 0x0d, 0, 0, 0, 0]);
    code.extend([0xf0, 0x48, 0xff, 0x05, 0, 0, 0, 0]);
    code.push(0xc3);
    let f = Instructions::decode(&code).unwrap();
    assert_eq!(f.access(1), Access::Branch);
    assert_eq!(f.access(7), Access::Branch);
    assert_eq!(f.access(14), Access::Load);
    assert_eq!(f.access(21), Access::Lea);
    assert_eq!(f.access(29), Access::Other);
    // Not the field of its instruction, or past the end.
    assert_eq!(f.access(13), Access::Other);
    assert_eq!(f.access(31), Access::Other);
    lea_to_load(&mut code, 21);
    assert_eq!(code[18..21], [0x48, 0x8b, 0x0d]);
    assert_eq!(
        Instructions::decode(&code).unwrap().access(21),
        Access::Load
    );
}
