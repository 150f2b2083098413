//! The GDB JIT compilation interface, so that a debugger sees the patches
//! the near loader maps (GDB manual, "JIT Compilation Interface"; LLDB
//! reads the same interface).
//!
//! A debugger knows the code of a process from the files the dynamic
//! loader lists; a patch mapped by [`near`](super) is not one of them, so
//! gdb showed `?? ()` for its frames and stopped the backtrace there. The
//! interface is two symbols of the process: `__jit_debug_descriptor`, the
//! head of a list of in-memory object files, and
//! `__jit_debug_register_code`, an empty function the debugger puts a
//! breakpoint on. For each near-mapped patch, [`Registration::new`] builds
//! a small ELF file describing it where it runs ([`symfile`]): a `NOBITS`
//! `.text` per executable segment at its mapped address, the patch's
//! `.eh_frame` (copied, at its mapped address: its `pcrel` pointers hold,
//! so the debugger unwinds through patch frames into the host's), and one
//! `FUNC` symbol per function of the patch at its runtime address, with
//! its mangled name (gdb demangles Rust names). It links the file into the
//! list and calls the breakpoint function; dropping the registration
//! (when the near module unmaps the patch) unlinks it the same way. A
//! debugger that attaches later reads the whole list.
//!
//! # Protocol
//!
//! Every change to the list is made under [`LOCK`], in the order the
//! protocol needs: the entry is complete before it is linked, the
//! descriptor's `relevant_entry` and `action_flag` are set, then
//! `__jit_debug_register_code` is called, where the debugger, stopped at
//! its breakpoint, reads them. The debugger reads this memory only while
//! the process is stopped (at the breakpoint, or when it attaches), so
//! plain stores suffice; they are volatile so that they stay in program
//! order, and a debugger attaching between two of them walks a list that
//! is whole from `first_entry` on (a new entry is linked last, a removed
//! one unlinked first). An entry and its file are freed only after the
//! breakpoint function has returned.
//!
//! # Another definition of the two symbols
//!
//! Other JITs define the same two symbols (LLVM's `JITLoaderGDB` and
//! `GDBRegistrationListener`, wasmtime, V8 and LuaJIT when built with
//! their GDB support). What happens depends on how they are linked:
//! - a static library or object with its own strong definitions, linked
//!   into the same executable: the link fails with a duplicate symbol;
//! - a weak definition (wasmtime's): ours is the one linked, and both
//!   register into this one list;
//! - a shared library (`libLLVM.so`): if the executable exports its
//!   symbols (`-rdynamic`), the dynamic loader binds the library's uses of
//!   the names to the executable's definitions, so again one list;
//!   otherwise each object has its own pair: gdb (10 and later) reads the
//!   pair of every object file, lldb only the first pair it finds.
//!
//! One list written by two runtimes is guarded by two locks: a load or
//! reclaim of a patch at the same instant as the other JIT changes the
//! list can corrupt it (an entry lost, and a later removal then writing
//! through a pointer to an entry the other runtime has freed). A service
//! that JITs code this way turns registration off
//! ([`Loader::debugger`](crate::Loader::debugger)).

use std::cell::UnsafeCell;
use std::ptr;

use object::elf;
use object::write::elf::{FileHeader, SectionHeader, Sym, Writer};
use parking_lot::Mutex;

/// `jit_actions_t`.
const JIT_NOACTION: u32 = 0;
const JIT_REGISTER_FN: u32 = 1;
const JIT_UNREGISTER_FN: u32 = 2;

/// `struct jit_code_entry`.
#[repr(C)]
struct CodeEntry {
    next_entry: *mut CodeEntry,
    prev_entry: *mut CodeEntry,
    symfile_addr: *const u8,
    symfile_size: u64,
}

/// `struct jit_descriptor`.
#[repr(C)]
struct Descriptor {
    version: u32,
    action_flag: u32,
    relevant_entry: *mut CodeEntry,
    first_entry: *mut CodeEntry,
}

/// The descriptor, in writable memory (`UnsafeCell`), laid out as the
/// C struct (`UnsafeCell<T>` has `T`'s layout).
#[repr(transparent)]
struct Shared(UnsafeCell<Descriptor>);

// SAFETY: written only under `LOCK`; read by the debugger while the
// process is stopped.
unsafe impl Sync for Shared {}

/// The list the debugger reads. The version is set statically: gdb checks
/// it when it attaches, before any registration.
#[unsafe(no_mangle)]
static __jit_debug_descriptor: Shared = Shared(UnsafeCell::new(Descriptor {
    version: 1,
    action_flag: JIT_NOACTION,
    relevant_entry: ptr::null_mut(),
    first_entry: ptr::null_mut(),
}));

/// The debugger's breakpoint: called after each change to the list.
/// Never inlined, and its body is an opaque statement that may read and
/// write memory, so neither the function nor its calls (nor the stores
/// before them) are optimised away.
#[unsafe(no_mangle)]
#[inline(never)]
extern "C" fn __jit_debug_register_code() {
    // SAFETY: an empty assembly statement: no instruction, no operand.
    unsafe { std::arch::asm!("", options(nostack, preserves_flags)) };
}

/// Guards the list (see the module docs, "Protocol").
static LOCK: Mutex<()> = Mutex::new(());

/// What the debugger is told of one mapped patch, at its runtime
/// addresses.
#[derive(Debug)]
pub(crate) struct Described<'a> {
    /// Each executable segment: `(start, size)`.
    pub code: Vec<(u64, u64)>,
    /// Its `.eh_frame`: where it is mapped, and its bytes.
    pub eh_frame: Option<(u64, &'a [u8])>,
    /// Its functions: `(address, size, mangled name)`.
    pub functions: Vec<(u64, u64, &'a [u8])>,
}

/// An ELF file describing the patch where it runs (see the module docs):
/// `ET_EXEC`, so every address in it is absolute, with no program
/// headers. Functions outside the executable segments are left out.
pub(crate) fn symfile(d: &Described<'_>) -> Result<Vec<u8>, object::write::Error> {
    let mut out = Vec::new();
    let mut w = Writer::new(object::Endianness::Little, true, &mut out);
    w.reserve_file_header();
    w.reserve_null_section_index();
    let text_name = w.add_section_name(b".text");
    let text: Vec<_> = d.code.iter().map(|_| w.reserve_section_index()).collect();
    let eh = d
        .eh_frame
        .map(|(_, _)| (w.add_section_name(b".eh_frame"), w.reserve_section_index()));
    w.reserve_null_symbol_index();
    let mut symbols = Vec::with_capacity(d.functions.len());
    for &(address, size, name) in &d.functions {
        let Some(i) = d
            .code
            .iter()
            .position(|&(s, len)| s <= address && address - s < len)
        else {
            continue;
        };
        let name = w.add_string(name);
        w.reserve_symbol_index(Some(text[i]));
        symbols.push(Sym {
            name: Some(name),
            section: Some(text[i]),
            st_info: (elf::STB_GLOBAL << 4) | elf::STT_FUNC,
            st_other: elf::STV_DEFAULT,
            st_shndx: 0,
            st_value: address,
            st_size: size,
        });
    }
    w.reserve_symtab_section_index();
    w.reserve_strtab_section_index();
    w.reserve_shstrtab_section_index();
    let eh_offset = d.eh_frame.map(|(_, bytes)| w.reserve(bytes.len(), 8));
    w.reserve_symtab();
    w.reserve_strtab();
    w.reserve_shstrtab();
    w.reserve_section_headers();

    w.write_file_header(&FileHeader {
        os_abi: elf::ELFOSABI_NONE,
        abi_version: 0,
        e_type: elf::ET_EXEC,
        e_machine: elf::EM_X86_64,
        e_entry: 0,
        e_flags: 0,
    })?;
    if let Some((_, bytes)) = d.eh_frame {
        w.write_align(8);
        w.write(bytes);
    }
    w.write_null_symbol();
    for s in &symbols {
        w.write_symbol(s);
    }
    w.write_strtab();
    w.write_shstrtab();
    w.write_null_section_header();
    for &(start, size) in &d.code {
        w.write_section_header(&SectionHeader {
            name: Some(text_name),
            sh_type: elf::SHT_NOBITS,
            sh_flags: u64::from(elf::SHF_ALLOC | elf::SHF_EXECINSTR),
            sh_addr: start,
            sh_offset: 0,
            sh_size: size,
            sh_link: 0,
            sh_info: 0,
            sh_addralign: 16,
            sh_entsize: 0,
        });
    }
    if let (Some((name, _)), Some((at, bytes)), Some(offset)) = (eh, d.eh_frame, eh_offset) {
        w.write_section_header(&SectionHeader {
            name: Some(name),
            sh_type: elf::SHT_PROGBITS,
            sh_flags: u64::from(elf::SHF_ALLOC),
            sh_addr: at,
            sh_offset: offset as u64,
            sh_size: bytes.len() as u64,
            sh_link: 0,
            sh_info: 0,
            sh_addralign: 8,
            sh_entsize: 0,
        });
    }
    // Every symbol is global: one past the null symbol.
    w.write_symtab_section_header(1);
    w.write_strtab_section_header();
    w.write_shstrtab_section_header();
    Ok(out)
}

/// A file in the debugger's list, until dropped.
#[derive(Debug)]
pub(crate) struct Registration {
    /// From `Box::into_raw`; freed by `drop`, after it is unlinked.
    entry: *mut CodeEntry,
    /// The file `entry` points to (kept alive here, never moved or
    /// changed while linked).
    _symfile: Box<[u8]>,
}

// SAFETY: `entry` is only touched under `LOCK` (registering, dropping).
unsafe impl Send for Registration {}
// SAFETY: no method reads or writes through `&Registration`.
unsafe impl Sync for Registration {}

impl Registration {
    /// Links `symfile` into the debugger's list and tells the debugger.
    pub(crate) fn new(symfile: Vec<u8>) -> Registration {
        let symfile = symfile.into_boxed_slice();
        let entry = Box::into_raw(Box::new(CodeEntry {
            next_entry: ptr::null_mut(),
            prev_entry: ptr::null_mut(),
            symfile_addr: symfile.as_ptr(),
            symfile_size: symfile.len() as u64,
        }));
        let _guard = LOCK.lock();
        let d = __jit_debug_descriptor.0.get();
        // SAFETY: under LOCK, the only writer; `d` is the static
        // descriptor, `first` null or a live entry of the list (entries
        // are freed only after being unlinked under LOCK), `entry` ours.
        unsafe {
            let first = (&raw const (*d).first_entry).read_volatile();
            (&raw mut (*entry).next_entry).write_volatile(first);
            if !first.is_null() {
                (&raw mut (*first).prev_entry).write_volatile(entry);
            }
            (&raw mut (*d).first_entry).write_volatile(entry);
            (&raw mut (*d).relevant_entry).write_volatile(entry);
            (&raw mut (*d).action_flag).write_volatile(JIT_REGISTER_FN);
        }
        __jit_debug_register_code();
        // SAFETY: as above.
        unsafe { (&raw mut (*d).action_flag).write_volatile(JIT_NOACTION) };
        Registration {
            entry,
            _symfile: symfile,
        }
    }

    /// The file registered (for the tests).
    #[cfg(test)]
    fn symfile(&self) -> &[u8] {
        &self._symfile
    }
}

impl Drop for Registration {
    /// Unlinks the file and tells the debugger, then frees both.
    fn drop(&mut self) {
        let guard = LOCK.lock();
        let d = __jit_debug_descriptor.0.get();
        let entry = self.entry;
        // SAFETY: under LOCK; `entry` is linked (by `new`), and its
        // neighbours are live entries or null.
        unsafe {
            let next = (&raw const (*entry).next_entry).read_volatile();
            let prev = (&raw const (*entry).prev_entry).read_volatile();
            if prev.is_null() {
                (&raw mut (*d).first_entry).write_volatile(next);
            } else {
                (&raw mut (*prev).next_entry).write_volatile(next);
            }
            if !next.is_null() {
                (&raw mut (*next).prev_entry).write_volatile(prev);
            }
            (&raw mut (*d).relevant_entry).write_volatile(entry);
            (&raw mut (*d).action_flag).write_volatile(JIT_UNREGISTER_FN);
        }
        __jit_debug_register_code();
        // SAFETY: as above; nothing points to `entry` any more.
        unsafe {
            (&raw mut (*d).action_flag).write_volatile(JIT_NOACTION);
            (&raw mut (*d).relevant_entry).write_volatile(ptr::null_mut());
            drop(Box::from_raw(entry));
        }
        drop(guard);
        // The file is freed with `self`, after the debugger has read it.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object::{Object, ObjectSection, ObjectSymbol};

    /// The entries of the list, from `first_entry`.
    fn listed() -> Vec<*const u8> {
        let _guard = LOCK.lock();
        let mut out = Vec::new();
        // SAFETY: under LOCK; every linked entry is live.
        unsafe {
            let mut e = (*__jit_debug_descriptor.0.get()).first_entry;
            while !e.is_null() {
                out.push((*e).symfile_addr);
                e = (*e).next_entry;
            }
        }
        out
    }

    #[test]
    fn the_file_puts_each_function_and_the_unwind_table_where_they_run() {
        let eh = [1u8, 2, 3, 4, 0, 0, 0, 0];
        let d = Described {
            code: vec![(0x5555_0000_1000, 0x2000)],
            eh_frame: Some((0x5555_0000_3000, &eh)),
            functions: vec![
                (
                    0x5555_0000_1000,
                    0x40,
                    b"_ZN3fix6answer17h0123456789abcdefE",
                ),
                (0x5555_0000_1040, 0x10, b"__hotpatch_entry_answer"),
                // Outside the code: left out.
                (0x5555_0000_4000, 0x10, b"data"),
            ],
        };
        let bytes = symfile(&d).unwrap();
        let file = object::File::parse(&*bytes).unwrap();
        assert_eq!(file.kind(), object::ObjectKind::Executable);
        assert_eq!(file.architecture(), object::Architecture::X86_64);
        let text = file.section_by_name(".text").unwrap();
        assert_eq!((text.address(), text.size()), (0x5555_0000_1000, 0x2000));
        let eh_frame = file.section_by_name(".eh_frame").unwrap();
        assert_eq!(eh_frame.address(), 0x5555_0000_3000);
        assert_eq!(eh_frame.data().unwrap(), &eh);
        let symbols: Vec<(String, u64, u64, bool)> = file
            .symbols()
            .map(|s| {
                (
                    s.name().unwrap().to_owned(),
                    s.address(),
                    s.size(),
                    s.section_index() == Some(text.index()),
                )
            })
            .collect();
        assert_eq!(
            symbols,
            [
                (
                    "_ZN3fix6answer17h0123456789abcdefE".to_owned(),
                    0x5555_0000_1000,
                    0x40,
                    true
                ),
                (
                    "__hotpatch_entry_answer".to_owned(),
                    0x5555_0000_1040,
                    0x10,
                    true
                ),
            ]
        );
        assert!(file.symbols().all(|s| s.kind() == object::SymbolKind::Text));
    }

    #[test]
    fn registrations_are_listed_until_dropped_in_any_order() {
        let file = |n: u8| vec![n; 16];
        let a = Registration::new(file(1));
        let b = Registration::new(file(2));
        let c = Registration::new(file(3));
        let ours = |r: &Registration| r.symfile().as_ptr();
        let (pa, pb, pc) = (ours(&a), ours(&b), ours(&c));
        let mine = |l: Vec<*const u8>| -> Vec<*const u8> {
            l.into_iter().filter(|p| [pa, pb, pc].contains(p)).collect()
        };
        assert_eq!(mine(listed()), [pc, pb, pa], "newest first");
        drop(b);
        assert_eq!(mine(listed()), [pc, pa]);
        drop(c);
        assert_eq!(mine(listed()), [pa]);
        drop(a);
        assert_eq!(mine(listed()), []);
        let _guard = LOCK.lock();
        // SAFETY: under LOCK.
        let flag = unsafe { (*__jit_debug_descriptor.0.get()).action_flag };
        assert_eq!(flag, JIT_NOACTION, "between changes");
    }
}
