//! Whether a function's entry can be redirected, decided from its machine
//! code (x86-64, iced-x86), and the replaced instructions re-encoded for
//! the trampoline.
//!
//! One set of rules for both sides of hotpatch: `cargo hotpatch build`
//! decides from the deployed binary's code whether a changed function can
//! be *hooked* and records the bytes it expects at its entry; the runtime
//! (`hotpatch::hook`) decides again from the running code before it writes.
//!
//! ```
//! // push %rbp; mov %rsp,%rbp; sub $0x10,%rsp; add $0x10,%rsp; pop %rbp; ret
//! let code = [0x55, 0x48, 0x89, 0xe5, 0x48, 0x83, 0xec, 0x10, 0x48, 0x83, 0xc4, 0x10, 0x5d, 0xc3];
//! let entry = hotpatch_entry::entry(&code, 0x1000).unwrap();
//! assert_eq!(entry.bytes, code[..8]); // push and mov are 4 bytes: the sub goes too
//!
//! // xor %eax,%eax; L: add %edi,%eax; dec %edi; jne L; ret: a loop head at f+2
//! let looping = [0x31, 0xc0, 0x01, 0xf8, 0xff, 0xcf, 0x75, 0xfa, 0xc3];
//! assert!(hotpatch_entry::entry(&looping, 0x1000).is_err());
//! ```
//!
//! The entry write replaces the first `len >= 5` bytes (whole
//! instructions) with a `jmp rel32`. That is only sound if:
//!
//! - the function is at least `len` bytes long;
//! - none of the replaced instructions changes control flow (a call would
//!   leave a return address inside the replaced bytes; a relative branch
//!   would need its target rewritten; `ret`, `int`, `syscall`, `xbegin`
//!   likewise), so each runs the same from the trampoline. A `rip`-relative
//!   memory operand is re-encoded with the displacement of the new address
//!   (refused if that is out of reach);
//! - no instruction of the function branches into `(f, f + len)`: after
//!   the write those bytes are the middle of the jump (a loop whose head
//!   is `f + 2` is a real case). A `rip`-relative address of such a byte
//!   (a computed jump) is refused too.
//!
//! Not seen from the code: an indirect branch through a jump table into
//! the replaced bytes (compilers put switch targets after the entry), and
//! branches from *other* functions into them. The entry write also
//! checks that no thread is inside the bytes when they are written.

use std::fmt;

use iced_x86::{
    Decoder, DecoderOptions, Encoder, FlowControl, Formatter, GasFormatter, Instruction,
};

/// Bytes of a `jmp rel32`: what the entry write replaces at least.
pub const JMP_LEN: usize = 5;

/// Why an entry cannot be redirected, from the code alone.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Ineligible {
    /// The function is shorter than the jump that would replace its entry.
    TooShort {
        /// The function's length in bytes.
        len: usize,
    },
    /// The bytes at `offset` are not an instruction this decoder knows.
    Undecodable {
        /// Offset from the function's start.
        offset: usize,
    },
    /// An instruction among the bytes the jump replaces cannot run
    /// elsewhere (a call, a branch, a return, an interrupt, ...), or
    /// ends past the function.
    EntryInstruction {
        /// Offset from the function's start.
        offset: usize,
        /// The instruction, in GNU syntax.
        instruction: String,
        /// Why it cannot be moved.
        why: &'static str,
    },
    /// An instruction of the function branches into the bytes the jump
    /// replaces (other than their first byte): a loop whose head is there.
    BranchIntoEntry {
        /// Offset of the branch from the function's start.
        offset: usize,
        /// Offset of its target.
        target: usize,
        /// The instruction, in GNU syntax.
        instruction: String,
    },
}

impl fmt::Display for Ineligible {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ineligible::TooShort { len } => write!(
                f,
                "the function is {len} bytes long, shorter than the {JMP_LEN}-byte jump that would \
                 replace its entry"
            ),
            Ineligible::Undecodable { offset } => {
                write!(
                    f,
                    "the bytes at +{offset:#x} are not a known x86-64 instruction"
                )
            }
            Ineligible::EntryInstruction {
                offset,
                instruction,
                why,
            } => write!(
                f,
                "the entry instruction `{instruction}` at +{offset:#x} cannot be relocated: {why}"
            ),
            Ineligible::BranchIntoEntry {
                offset,
                target,
                instruction,
            } => write!(
                f,
                "`{instruction}` at +{offset:#x} branches to +{target:#x}, inside the entry bytes \
                 the jump replaces (a loop whose head is at the entry)"
            ),
        }
    }
}

/// The entry of an eligible function: the instructions the jump replaces.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Entry {
    /// Bytes replaced (whole instructions), `>= JMP_LEN`.
    pub len: usize,
    /// The original bytes `[f, f + len)`.
    pub bytes: Vec<u8>,
    /// The replaced instructions, decoded at the function's address.
    instructions: Vec<Instruction>,
}

fn text(instruction: &Instruction) -> String {
    let mut out = String::new();
    GasFormatter::new().format(instruction, &mut out);
    out
}

/// Decides from `code` (the whole function, as mapped at `ip`) whether its
/// entry can be redirected.
pub fn entry(code: &[u8], ip: u64) -> Result<Entry, Ineligible> {
    if code.len() < JMP_LEN {
        return Err(Ineligible::TooShort { len: code.len() });
    }
    let mut decoder = Decoder::with_ip(64, code, ip, DecoderOptions::NONE);
    let mut all = Vec::new();
    while decoder.can_decode() {
        let instruction = decoder.decode();
        if instruction.is_invalid() {
            return Err(Ineligible::Undecodable {
                offset: (instruction.ip() - ip) as usize,
            });
        }
        all.push(instruction);
    }
    let mut len = 0;
    let mut replaced = Vec::new();
    for instruction in &all {
        if len >= JMP_LEN {
            break;
        }
        let offset = len;
        let why = match instruction.flow_control() {
            FlowControl::Next => None,
            FlowControl::Call | FlowControl::IndirectCall => {
                Some("a call would leave a return address inside the replaced bytes")
            }
            FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch => {
                Some("a relative branch")
            }
            FlowControl::IndirectBranch => Some("an indirect branch"),
            FlowControl::Return => Some("a return: the function ends inside the replaced bytes"),
            FlowControl::Interrupt => Some("an interrupt or system call"),
            FlowControl::XbeginXabortXend => Some("a transactional-memory instruction"),
            FlowControl::Exception => Some("an instruction that raises an exception"),
        };
        if let Some(why) = why {
            return Err(Ineligible::EntryInstruction {
                offset,
                instruction: text(instruction),
                why,
            });
        }
        len += instruction.len();
        replaced.push(*instruction);
    }
    if len < JMP_LEN {
        // Every instruction decoded, and they are shorter than the jump.
        return Err(Ineligible::TooShort { len: code.len() });
    }
    let end = ip + len as u64;
    for instruction in &all {
        let target = match instruction.flow_control() {
            FlowControl::UnconditionalBranch
            | FlowControl::ConditionalBranch
            | FlowControl::Call
            | FlowControl::XbeginXabortXend => instruction.near_branch_target(),
            _ if instruction.is_ip_rel_memory_operand() => instruction.ip_rel_memory_address(),
            _ => 0,
        };
        if target > ip && target < end {
            return Err(Ineligible::BranchIntoEntry {
                offset: (instruction.ip() - ip) as usize,
                target: (target - ip) as usize,
                instruction: text(instruction),
            });
        }
    }
    Ok(Entry {
        len,
        bytes: code[..len].to_vec(),
        instructions: replaced,
    })
}

impl Entry {
    /// The replaced instructions encoded to run at `at`, followed by a
    /// `jmp rel32` back to `resume` (the function's address plus `len`).
    /// `Err` names the instruction that cannot be encoded there (a
    /// `rip`-relative operand out of reach).
    pub fn trampoline(&self, at: u64, resume: u64) -> Result<Vec<u8>, String> {
        let mut encoder = Encoder::new(64);
        let mut out = Vec::new();
        for instruction in &self.instructions {
            let written = encoder
                .encode(instruction, at + out.len() as u64)
                .map_err(|e| format!("`{}` at {at:#x}: {e}", text(instruction)))?;
            let bytes = encoder.take_buffer();
            debug_assert_eq!(bytes.len(), written);
            out.extend_from_slice(&bytes);
        }
        let from = at + out.len() as u64;
        out.extend_from_slice(&jmp_rel32(from, resume)?);
        Ok(out)
    }
}

/// `jmp rel32` at `from` to `to`.
pub fn jmp_rel32(from: u64, to: u64) -> Result<[u8; JMP_LEN], String> {
    let rel = (to as i64).wrapping_sub(from as i64 + JMP_LEN as i64);
    let rel = i32::try_from(rel)
        .map_err(|_| format!("{to:#x} is out of reach of a jump at {from:#x}"))?;
    let r = rel.to_le_bytes();
    Ok([0xe9, r[0], r[1], r[2], r[3]])
}

/// Bytes of a hook's stub.
pub const STUB_LEN: usize = 13;

/// A hook's stub: `movabs r11, slot; jmp qword ptr [r11]`. `r11` carries
/// no argument and is not preserved across calls (System V), so it is free
/// at a function's entry; the hook dispatcher reads the slot from it.
pub fn stub(slot: u64) -> [u8; STUB_LEN] {
    let s = slot.to_le_bytes();
    [
        0x49, 0xbb, s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], 0x41, 0xff, 0x23,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    const F: u64 = 0x5555_0000_1000;

    fn refusal(code: &[u8]) -> Ineligible {
        entry(code, F).expect_err("refused")
    }

    #[test]
    fn a_usual_prologue_is_eligible() {
        // push %rbp; mov %rsp,%rbp; sub $0x10,%rsp; ...; pop %rbp; ret
        let code = [
            0x55, 0x48, 0x89, 0xe5, 0x48, 0x83, 0xec, 0x10, 0x48, 0x83, 0xc4, 0x10, 0x5d, 0xc3,
        ];
        let e = entry(&code, F).unwrap();
        // push (1) + mov (3) = 4 < 5, so the sub (4) is replaced too.
        assert_eq!(e.len, 8);
        assert_eq!(e.bytes, code[..8]);
        let t = e.trampoline(F + 0x10_0000, F + 8).unwrap();
        assert_eq!(&t[..8], &code[..8], "no rip-relative operand: same bytes");
        assert_eq!(t[8], 0xe9);
        let rel = i32::from_le_bytes(t[9..13].try_into().unwrap()) as i64;
        assert_eq!((F + 0x10_0000 + 13) as i64 + rel, (F + 8) as i64);
    }

    #[test]
    fn a_rip_relative_load_is_relocated() {
        // mov 0x100(%rip),%rax (7 bytes, reads F+7+0x100); ret
        let code = [0x48, 0x8b, 0x05, 0x00, 0x01, 0x00, 0x00, 0xc3];
        let e = entry(&code, F).unwrap();
        assert_eq!(e.len, 7);
        let at = F - 0x4000_0000; // 1 GiB below: still in reach
        let t = e.trampoline(at, F + 7).unwrap();
        assert_eq!(&t[..3], &code[..3]);
        let disp = i32::from_le_bytes(t[3..7].try_into().unwrap()) as i64;
        assert_eq!(
            (at + 7) as i64 + disp,
            (F + 7 + 0x100) as i64,
            "same memory"
        );
        // 3 GiB away the displacement does not fit: the encoder says so.
        assert!(e.trampoline(F - 0xc000_0000, F + 7).is_err());
    }

    #[test]
    fn too_short() {
        assert_eq!(refusal(&[0xc3]), Ineligible::TooShort { len: 1 });
        // Five bytes, but the function returns after one: the ret is replaced.
        assert!(matches!(
            refusal(&[0x90, 0xc3, 0xcc, 0xcc, 0xcc, 0xcc]),
            Ineligible::EntryInstruction { offset: 1, .. }
        ));
        // xor %eax,%eax; ret (3 bytes)
        assert_eq!(
            refusal(&[0x31, 0xc0, 0xc3]),
            Ineligible::TooShort { len: 3 }
        );
    }

    #[test]
    fn calls_and_branches_in_the_entry_are_refused() {
        // push %rbp; call rel32; ...
        let call = [0x55, 0xe8, 0, 0, 0, 0, 0x5d, 0xc3];
        match refusal(&call) {
            Ineligible::EntryInstruction { offset, why, .. } => {
                assert_eq!(offset, 1);
                assert!(why.contains("call"), "{why}");
            }
            other => panic!("{other:?}"),
        }
        // test %edi,%edi; je +2; ...
        let branch = [0x85, 0xff, 0x74, 0x02, 0x31, 0xc0, 0x31, 0xc0, 0xc3];
        assert!(matches!(
            refusal(&branch),
            Ineligible::EntryInstruction { offset: 2, .. }
        ));
        // jmp *%rax at the entry
        assert!(matches!(
            refusal(&[0xff, 0xe0, 0x90, 0x90, 0x90, 0x90]),
            Ineligible::EntryInstruction { offset: 0, .. }
        ));
        // syscall
        assert!(matches!(
            refusal(&[0x0f, 0x05, 0x90, 0x90, 0x90, 0xc3]),
            Ineligible::EntryInstruction { offset: 0, .. }
        ));
    }

    #[test]
    fn a_loop_head_inside_the_entry_is_refused() {
        // xor %eax,%eax; L: add %edi,%eax; dec %edi; jne L; ret
        // (the back-edge goes to f+2)
        let code = [0x31, 0xc0, 0x01, 0xf8, 0xff, 0xcf, 0x75, 0xfa, 0xc3];
        match refusal(&code) {
            Ineligible::BranchIntoEntry {
                offset,
                target,
                instruction,
            } => {
                assert_eq!((offset, target), (6, 2));
                assert!(instruction.starts_with("jne"), "{instruction}");
            }
            other => panic!("{other:?}"),
        }
        // The same loop with its head at f (a branch to the first byte
        // lands on the jump itself): eligible.
        let head_at_entry = [0x01, 0xf8, 0xff, 0xcf, 0x31, 0xc9, 0x75, 0xf8, 0xc3];
        assert_eq!(entry(&head_at_entry, F).unwrap().len, 6);
        // A back-edge to f+6, past the replaced bytes: eligible.
        let later = [
            0x31, 0xc0, 0x31, 0xc9, 0x31, 0xd2, 0x01, 0xf8, 0xff, 0xcf, 0x75, 0xfa, 0xc3,
        ];
        assert_eq!(entry(&later, F).unwrap().len, 6);
    }

    #[test]
    fn the_address_of_an_entry_byte_is_refused() {
        // lea -0x5(%rip),%rax at f+2 takes the address f+4 (inside); then ret.
        let code = [0x31, 0xc0, 0x48, 0x8d, 0x05, 0xfb, 0xff, 0xff, 0xff, 0xc3];
        assert!(matches!(
            refusal(&code),
            Ineligible::BranchIntoEntry {
                offset: 2,
                target: 4,
                ..
            }
        ));
    }

    #[test]
    fn undecodable_bytes_are_refused() {
        // 0x06 (push %es) is invalid in 64-bit mode.
        assert_eq!(
            refusal(&[0x55, 0x48, 0x89, 0xe5, 0x90, 0x06, 0xc3]),
            Ineligible::Undecodable { offset: 5 }
        );
    }

    #[test]
    fn jumps_encode_and_refuse_out_of_reach() {
        assert_eq!(jmp_rel32(0x1000, 0x1005).unwrap(), [0xe9, 0, 0, 0, 0]);
        assert_eq!(
            jmp_rel32(0x1000, 0x1000).unwrap(),
            [0xe9, 0xfb, 0xff, 0xff, 0xff]
        );
        assert!(jmp_rel32(0, 1 << 33).is_err());
    }
}
