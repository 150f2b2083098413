//! Rewrites rip-relative data accesses of one function into thunks that
//! reach the data through a *cell*.
//!
//! A function extracted from the service's own objects for a patch may
//! access a private static of the service directly, `lock incq
//! CALLS(%rip)`, with an `R_X86_64_PC32` relocation at the 4-byte
//! displacement. In the patch (a shared object mapped far from the
//! executable) 32 bits do not reach the host's static, and the static is
//! not exported. The caller gives each such access a cell, an 8-byte slot
//! in the patch that the dynamic loader fills with the static's absolute
//! address, and [`rewrite`] replaces the instruction by a `jmp` to a thunk
//! that performs it through the cell:
//!
//! ```text
//! lea   -128(%rsp), %rsp     # step over the SysV red zone (live data below %rsp)
//! push  %scratch
//! mov   cell(%rip), %scratch # PC32 to the cell
//! <the instruction>          # same opcode, prefixes (lock included), operand size
//!                            # and immediate, memory operand (%scratch)
//! pop   %scratch
//! lea   128(%rsp), %rsp
//! jmp   resume               # PC32 back to the end of the original instruction
//! ```
//!
//! `lea`, `push`, `pop` and `mov` leave the flags alone, and the scratch
//! register is one the instruction neither reads nor writes, explicitly or
//! implicitly, so the thunk has exactly the instruction's effect.
//!
//! `lea S(%rip), %reg` is not thunked (the caller turns it into a load of
//! the cell); instructions that move or use the stack pointer, or transfer
//! control, cannot be thunked this way and are refused. Rip-relative
//! operands that are not among the sites (a `call *f@GOTPCREL(%rip)`, a
//! constant of the patch itself) are left as they are: their relocations
//! stay the caller's.
//!
//! What the caller does with a [`Rewritten`]: drop the relocation at each
//! site (the instruction's bytes from [`Thunk::start`] to
//! [`Thunk::resume`] are replaced, and no other relocation may fall in
//! that range), place each thunk's bytes in the patch, and add three
//! `R_X86_64_PC32` relocations per thunk, as [`Thunk`]'s fields say.

use std::fmt::Write as _;

use iced_x86::{
    Code, ConstantOffsets, Decoder, DecoderOptions, Encoder, FlowControl, Formatter as _,
    GasFormatter, Instruction, InstructionInfoFactory, Mnemonic, OpKind, Register,
};

/// Scratch registers, in order of preference. None of them is the stack
/// pointer or needs a displacement or SIB byte as a base.
const SCRATCH: [Register; 7] = [
    Register::RBX,
    Register::RSI,
    Register::RDI,
    Register::R8,
    Register::R9,
    Register::R10,
    Register::R11,
];

/// `lea -128(%rsp), %rsp`.
const LEA_DOWN: [u8; 5] = [0x48, 0x8d, 0x64, 0x24, 0x80];
/// `lea 128(%rsp), %rsp` (128 needs a 32-bit displacement).
const LEA_UP: [u8; 8] = [0x48, 0x8d, 0xa4, 0x24, 0x80, 0x00, 0x00, 0x00];
/// The SysV red zone below %rsp that the thunk must not write.
const RED_ZONE: u8 = 128;
const _: () = assert!(LEA_DOWN[4] as i8 as i32 == -(RED_ZONE as i32));
const JMP_REL32: u8 = 0xe9;
const INT3: u8 = 0xcc;
/// The length of `jmp rel32`, which replaces the instruction.
const JMP_LEN: usize = 5;

/// One function's code with its rip-relative accesses replaced by jumps
/// to thunks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewritten {
    /// The code, same length: each rewritten instruction replaced by
    /// `jmp rel32` to its thunk, padded with `int3` up to the original
    /// instruction's end.
    pub code: Vec<u8>,
    /// One per site, in the order of the sites given.
    pub thunks: Vec<Thunk>,
}

/// The thunk that performs one rewritten instruction through its cell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Thunk {
    /// Position-independent bytes of the thunk.
    pub bytes: Vec<u8>,
    /// Offset in the code of the jmp's rel32 (the caller relocates it
    /// PC32 to this thunk's start, addend -4).
    pub jump_in_at: usize,
    /// Offset in `bytes` of the rel32 that loads the cell (PC32 to the
    /// cell, addend -4).
    pub cell_at: usize,
    /// Offset in `bytes` of the rel32 of the jump back (PC32 to the
    /// function's section + `resume`, addend -4).
    pub back_at: usize,
    /// Where execution continues in the code: the end of the original
    /// instruction.
    pub resume: usize,
    /// The original instruction's end minus the site: the cell must hold
    /// `S + A + tail` for a relocation `S + A - P` at the site (the CPU
    /// adds the displacement to the next instruction's address).
    pub tail: usize,
    /// Where the original instruction starts in the code: `start..resume`
    /// is replaced, so the site's relocation must go and no other
    /// relocation may fall in that range.
    pub start: usize,
    /// The register the thunk borrows (saved and restored on the stack).
    pub scratch: Register,
}

/// Why a function's rip-relative access cannot be rewritten. Offsets are
/// from the function's first byte; `text` is the instruction in AT&T
/// syntax.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RipRelError {
    /// Linear decoding from offset 0 met bytes that are no instruction,
    /// so no instruction start after them can be trusted.
    #[error(
        "bytes {bytes} at offset {offset:#x} do not decode as an instruction (decoding linearly from offset 0)"
    )]
    Undecodable { offset: usize, bytes: String },
    /// A site's 4 bytes are not all inside the function.
    #[error("site {site:#x} is outside the function's {len} bytes")]
    OutOfRange { site: usize, len: usize },
    /// The same site was given twice.
    #[error("site {site:#x} is given twice")]
    DuplicateSite { site: usize },
    /// The instruction holding the site has no rip-relative memory operand.
    #[error(
        "site {site:#x} is in `{text}` at offset {offset:#x}, which has no rip-relative memory operand"
    )]
    NotRipRelative {
        site: usize,
        offset: usize,
        text: String,
    },
    /// The site is in an instruction with a rip-relative operand, but is
    /// not that operand's displacement.
    #[error(
        "site {site:#x} is not the displacement of the rip-relative operand of `{text}` at offset {offset:#x}, which is at {displacement:#x}"
    )]
    NotDisplacement {
        site: usize,
        offset: usize,
        displacement: usize,
        text: String,
    },
    /// `lea` computes the address: the caller loads the cell instead.
    #[error(
        "`{text}` at offset {offset:#x} is a lea: it takes the address, so the caller must load the cell instead of thunking it"
    )]
    Lea { offset: usize, text: String },
    /// The instruction uses %rsp or the stack, which the thunk moves.
    #[error(
        "`{text}` at offset {offset:#x} uses the stack pointer or the stack, which the thunk moves"
    )]
    UsesStack { offset: usize, text: String },
    /// The instruction transfers control, so the thunk would not get it
    /// back.
    #[error(
        "`{text}` at offset {offset:#x} transfers control, so its thunk would never restore the scratch register"
    )]
    ControlFlow { offset: usize, text: String },
    /// The instruction is shorter than the `jmp rel32` that replaces it.
    #[error(
        "`{text}` at offset {offset:#x} is {len} bytes, shorter than the 5-byte jmp that must replace it"
    )]
    TooShort {
        offset: usize,
        len: usize,
        text: String,
    },
    /// Every scratch register is used by the instruction, or none can be
    /// its base.
    #[error(
        "`{text}` at offset {offset:#x} uses every scratch register (rbx, rsi, rdi, r8-r11) or cannot be encoded with one as its base"
    )]
    NoScratch { offset: usize, text: String },
}

/// What the instruction holding a relocated 4-byte field does with it:
/// how the caller carries the field's relocation into a patch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// `call`, `jmp` or `jcc` with a 32-bit displacement: the field is
    /// the branch target.
    Branch,
    /// `mov disp32(%rip), %reg`: loads the word at the address.
    Load,
    /// `lea disp32(%rip), %reg`: takes the address (see [`lea_to_load`]).
    Lea,
    /// Anything else: another use of the address, for [`rewrite`], or a
    /// field that is no displacement of the instruction holding it.
    Other,
}

/// One function's instructions, decoded once, to ask what each
/// relocated field is.
pub(crate) struct Instructions {
    decoded: Vec<Decoded>,
    len: usize,
}

impl Instructions {
    /// Decodes `code` linearly from offset 0.
    pub fn decode(code: &[u8]) -> Result<Instructions, RipRelError> {
        Ok(Instructions {
            decoded: decode(code)?,
            len: code.len(),
        })
    }

    /// What the instruction holding the 4-byte field at `site` does with
    /// it.
    pub fn access(&self, site: usize) -> Access {
        let Ok(d) = containing(&self.decoded, self.len, site) else {
            return Access::Other;
        };
        let (instr, offsets) = (&d.instr, &d.offsets);
        let branch = matches!(
            instr.op0_kind(),
            OpKind::NearBranch32 | OpKind::NearBranch64
        );
        if branch {
            let field = d.start + offsets.immediate_offset();
            let rel32 = offsets.has_immediate() && offsets.immediate_size() == 4;
            return if rel32 && field == site {
                Access::Branch
            } else {
                Access::Other
            };
        }
        let displacement = d.start + offsets.displacement_offset();
        let rip_operand = instr.memory_base() == Register::RIP
            && offsets.has_displacement()
            && offsets.displacement_size() == 4
            && displacement == site;
        if !rip_operand || instr.op0_kind() != OpKind::Register {
            return Access::Other;
        }
        match instr.code() {
            Code::Mov_r16_rm16 | Code::Mov_r32_rm32 | Code::Mov_r64_rm64 => Access::Load,
            Code::Lea_r16_m | Code::Lea_r32_m | Code::Lea_r64_m => Access::Lea,
            _ => Access::Other,
        }
    }
}

/// Turns the `lea disp32(%rip), %reg` whose displacement is at `site`
/// ([`Access::Lea`]) into `mov disp32(%rip), %reg`, the same length: the
/// register gets the word stored at the address (a cell holding the
/// target's address) instead of the address.
pub(crate) fn lea_to_load(code: &mut [u8], site: usize) {
    // A rip-relative operand has no SIB byte: the ModRM byte is just
    // before the displacement and the one-byte opcode (0x8d) before it.
    debug_assert_eq!(code[site - 2], 0x8d);
    code[site - 2] = 0x8b;
}

/// An instruction of the function and where it is.
struct Decoded {
    start: usize,
    instr: Instruction,
    offsets: ConstantOffsets,
}

/// Rewrites the rip-relative memory operands whose 4-byte displacements
/// are at `sites` into jumps to thunks.
///
/// `code` is one function (a relocatable object's `.text.<sym>` section,
/// so offset 0 is its first byte); it is decoded linearly from offset 0.
///
/// # Errors
///
/// A [`RipRelError`] naming the site or instruction when the code does not
/// decode, a site is not the displacement of a rip-relative operand, or
/// the instruction is a `lea`, uses the stack, transfers control, is
/// shorter than 5 bytes, or leaves no scratch register. Nothing is
/// rewritten then.
pub fn rewrite(code: &[u8], sites: &[usize]) -> Result<Rewritten, RipRelError> {
    let decoded = decode(code)?;
    let mut out = code.to_vec();
    let mut thunks = Vec::with_capacity(sites.len());
    for (i, &site) in sites.iter().enumerate() {
        if sites[..i].contains(&site) {
            return Err(RipRelError::DuplicateSite { site });
        }
        let d = containing(&decoded, code.len(), site)?;
        let thunk = thunk_for(d, site)?;
        out[d.start] = JMP_REL32;
        out[d.start + 1..d.start + JMP_LEN].fill(0);
        out[d.start + JMP_LEN..thunk.resume].fill(INT3);
        thunks.push(thunk);
    }
    Ok(Rewritten { code: out, thunks })
}

fn decode(code: &[u8]) -> Result<Vec<Decoded>, RipRelError> {
    let mut decoder = Decoder::with_ip(64, code, 0, DecoderOptions::NONE);
    let mut decoded = Vec::new();
    let mut instr = Instruction::default();
    while decoder.can_decode() {
        let start = decoder.position();
        decoder.decode_out(&mut instr);
        if instr.is_invalid() {
            let end = code.len().min(start + 15);
            let mut bytes = String::new();
            for b in &code[start..end] {
                let _ = write!(bytes, "{b:02x}");
            }
            return Err(RipRelError::Undecodable {
                offset: start,
                bytes,
            });
        }
        let offsets = decoder.get_constant_offsets(&instr);
        decoded.push(Decoded {
            start,
            instr,
            offsets,
        });
    }
    Ok(decoded)
}

/// The instruction whose bytes hold `site`.
fn containing(decoded: &[Decoded], len: usize, site: usize) -> Result<&Decoded, RipRelError> {
    if site.checked_add(4).is_none_or(|end| end > len) {
        return Err(RipRelError::OutOfRange { site, len });
    }
    // Decoding covered every byte, so some instruction holds the site.
    let i = decoded.partition_point(|d| d.start <= site) - 1;
    Ok(&decoded[i])
}

fn text(instr: &Instruction) -> String {
    let mut formatter = GasFormatter::new();
    formatter.options_mut().set_rip_relative_addresses(true);
    let mut s = String::new();
    formatter.format(instr, &mut s);
    s
}

/// Refuses what the thunk cannot do with exactly the instruction's effect.
fn check(d: &Decoded, site: usize, info: &mut InstructionInfoFactory) -> Result<(), RipRelError> {
    let instr = &d.instr;
    let offset = d.start;
    if instr.memory_base() != Register::RIP {
        return Err(RipRelError::NotRipRelative {
            site,
            offset,
            text: text(instr),
        });
    }
    let displacement = offset + d.offsets.displacement_offset();
    if !d.offsets.has_displacement() || displacement != site || d.offsets.displacement_size() != 4 {
        return Err(RipRelError::NotDisplacement {
            site,
            offset,
            displacement,
            text: text(instr),
        });
    }
    if instr.mnemonic() == Mnemonic::Lea {
        return Err(RipRelError::Lea {
            offset,
            text: text(instr),
        });
    }
    let info = info.info(instr);
    let stack = instr.stack_pointer_increment() != 0
        || info
            .used_registers()
            .iter()
            .any(|r| r.register().full_register() == Register::RSP)
        || info
            .used_memory()
            .iter()
            .any(|m| m.base().full_register() == Register::RSP);
    if stack {
        return Err(RipRelError::UsesStack {
            offset,
            text: text(instr),
        });
    }
    if instr.flow_control() != FlowControl::Next {
        return Err(RipRelError::ControlFlow {
            offset,
            text: text(instr),
        });
    }
    if instr.len() < JMP_LEN {
        return Err(RipRelError::TooShort {
            offset,
            len: instr.len(),
            text: text(instr),
        });
    }
    Ok(())
}

fn thunk_for(d: &Decoded, site: usize) -> Result<Thunk, RipRelError> {
    thunk_with(d, site, &SCRATCH)
}

fn thunk_with(d: &Decoded, site: usize, candidates: &[Register]) -> Result<Thunk, RipRelError> {
    let mut info = InstructionInfoFactory::new();
    check(d, site, &mut info)?;
    let used: Vec<Register> = info
        .info(&d.instr)
        .used_registers()
        .iter()
        .map(|r| r.register().full_register())
        .collect();
    let resume = d.start + d.instr.len();
    let mut encoder = Encoder::new(64);
    for &scratch in candidates.iter().filter(|s| !used.contains(s)) {
        let mut through = d.instr;
        through.set_memory_base(scratch);
        through.set_memory_displacement64(0);
        through.set_memory_displ_size(0);
        // A high-byte register (%ah..%bh) cannot be encoded with a REX
        // prefix, which r8-r11 as base need: try the next scratch.
        if encoder.encode(&through, 0).is_err() {
            continue;
        }
        let reencoded = encoder.take_buffer();
        let n = scratch.number() as u8 & 7;
        let rex_b = scratch.number() >= 8;
        let mut bytes = LEA_DOWN.to_vec();
        if rex_b {
            bytes.push(0x41);
        }
        bytes.push(0x50 + n); // push %scratch
        bytes.extend([if rex_b { 0x4c } else { 0x48 }, 0x8b, 0x05 | (n << 3)]); // mov disp32(%rip), %scratch
        let cell_at = bytes.len();
        bytes.extend([0; 4]);
        bytes.extend(&reencoded);
        if rex_b {
            bytes.push(0x41);
        }
        bytes.push(0x58 + n); // pop %scratch
        bytes.extend(LEA_UP);
        bytes.push(JMP_REL32);
        let back_at = bytes.len();
        bytes.extend([0; 4]);
        return Ok(Thunk {
            bytes,
            jump_in_at: d.start + 1,
            cell_at,
            back_at,
            resume,
            tail: resume - site,
            start: d.start,
            scratch,
        });
    }
    Err(RipRelError::NoScratch {
        offset: d.start,
        text: text(&d.instr),
    })
}

#[cfg(test)]
mod tests;
