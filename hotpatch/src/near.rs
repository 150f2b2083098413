//! Near placement: the runtime maps a thin patch itself, within ±2 GiB of
//! the executable's code, instead of asking `dlopen` (issue 22).
//!
//! `dlopen` takes no address hint, and glibc maps a library of a PIE
//! executable wherever the kernel puts it: at `0x7f...`, tens of terabytes
//! from the executable's code at `0x55...`. An indirect call to such a far
//! target costs measurably more than the same call to a near one
//! (`BENCHMARKS.md`), so a patched call would cost more than the original.
//!
//! A thin patch is our own format (`cargo-hotpatch/src/link.rs`: the patch
//! crate's objects linked by `cc -shared -z now -z relro`, exporting only
//! the manifest), so the loader can do what the dynamic loader does for
//! it, and no more:
//!
//! 1. read its program headers, dynamic section, dynamic symbols and
//!    dynamic relocations from the bytes (the same bytes the trust policy
//!    and the signature checked, and the bytes then mapped);
//! 2. resolve every undefined symbol: against the executable (its exported
//!    symbols by `dlsym`, or its own `.symtab`, see [`symtab`]) and the
//!    shared libraries it was linked with (`dlsym(RTLD_DEFAULT)`);
//! 3. reserve a free range within ±2 GiB of the executable's code
//!    (`/proc/self/maps`, `mmap` with `MAP_FIXED_NOREPLACE`);
//! 4. map each `PT_LOAD` segment there from the private copy (the memfd);
//! 5. apply its relocations (`R_X86_64_RELATIVE`, `R_X86_64_64`,
//!    `R_X86_64_GLOB_DAT`, `R_X86_64_JUMP_SLOT`: what such a link contains)
//!    and protect each segment, `PT_GNU_RELRO` read-only;
//! 6. register its `.eh_frame` with the unwinder (`__register_frame`), so a
//!    panic in patch code unwinds through it into the host's
//!    `catch_unwind`;
//! 7. unless turned off ([`Loader::debugger`](crate::Loader::debugger)),
//!    register it with debuggers through the GDB JIT interface ([`jit`]):
//!    a small in-memory ELF file of its functions at their runtime
//!    addresses and its `.eh_frame`, so gdb names patch frames and
//!    unwinds through them (taken out of the list by [`NearImage::close`]
//!    before the unmap); a file that cannot be built is logged, and the
//!    load goes on;
//! 8. run its initialisers (`DT_INIT`, `DT_INIT_ARRAY`);
//! 9. if asked ([`Loader::perf_map`](crate::Loader::perf_map)), write its
//!    functions to `/tmp/perf-<pid>.map`, so `perf` can name patch code.
//!
//! std's backtraces (`std::backtrace`, the panic hook's) still cannot name
//! patch frames: std reads symbols from the files `dl_iterate_phdr`
//! lists, and this mapping is not one, so they show `<unknown>` (the
//! unwinder walks through them to the host's frames). gdb and the perf
//! map name them.
//!
//! Anything else (thread-locals, another relocation type, text
//! relocations, a missing symbol, no free range near the executable) is
//! a [`NearRefusal`], and the loader falls back to `dlopen`, saying why
//! ([`Placement::Dlopen`](crate::Placement)). Everything up to step 6 can
//! fail and be undone (unmapped) without any code of the patch having run;
//! step 7 never fails the load.

use std::ffi::{CString, c_void};
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::OnceLock;

use object::LittleEndian;
use object::elf;
use object::read::elf::{Dyn, ElfFile64, FileHeader, ProgramHeader, Rela, SectionHeader, Sym};
use parking_lot::Mutex;

use crate::image::Image;

mod jit;

/// Two GiB: the reach of a `rel32` call or `rip`-relative operand.
pub(crate) const REACH: u64 = 1 << 31;

/// Why a patch was not placed near the executable. The loader then opens
/// it with `dlopen`, as before issue 22, and reports this reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NearRefusal {
    /// No free range of the patch's size within ±2 GiB of the executable's
    /// code.
    #[error("no free range of {size} bytes within 2 GiB of the executable's code")]
    NoRange { size: u64 },
    /// The patch has thread-locals of its own (`PT_TLS`) or uses the host's
    /// (TLS relocations): the dynamic loader allocates and binds those.
    #[error("the patch uses thread-locals ({what}), which only the dynamic loader sets up")]
    ThreadLocals { what: String },
    /// A relocation type a thin patch does not contain.
    #[error("relocation type {name} ({r_type}) at offset {offset:#x} is not supported")]
    Relocation {
        r_type: u32,
        name: &'static str,
        offset: u64,
    },
    /// Symbols that nothing in this process defines (the dynamic loader
    /// names them when it refuses the patch).
    #[error("{} undefined symbols not found in this process (first: {})", symbols.len(), symbols.first().map_or("", String::as_str))]
    Missing { symbols: Vec<String> },
    /// The file is not what `cargo hotpatch build` links: the reason.
    #[error("{0}")]
    Unsupported(String),
    /// A system call failed while mapping it.
    #[error("{what}: {error}")]
    System { what: &'static str, error: String },
    /// Near placement was turned off ([`Loader::near`](crate::Loader::near)).
    #[error("near placement is off for this loader")]
    Off,
}

impl NearRefusal {
    fn unsupported(reason: impl std::fmt::Display) -> Self {
        NearRefusal::Unsupported(reason.to_string())
    }

    fn last_os(what: &'static str) -> Self {
        NearRefusal::System {
            what,
            error: std::io::Error::last_os_error().to_string(),
        }
    }
}

/// One `PT_LOAD` segment, as the file describes it.
#[derive(Debug, Clone, Copy)]
struct Segment {
    vaddr: u64,
    memsz: u64,
    offset: u64,
    filesz: u64,
    flags: u32,
}

/// A relocation to apply: where, what, against which dynamic symbol.
#[derive(Debug, Clone, Copy)]
struct Reloc {
    offset: u64,
    r_type: u32,
    symbol: u32,
    addend: i64,
}

/// Everything read from the file before anything is mapped.
#[derive(Debug)]
struct Plan {
    segments: Vec<Segment>,
    /// `PT_GNU_RELRO`: `(vaddr, memsz)`.
    relro: Option<(u64, u64)>,
    /// Bytes from vaddr 0 to the end of the last segment, page-rounded.
    span: u64,
    relocs: Vec<Reloc>,
    /// Per dynamic symbol index: its address relative to the load base if
    /// the patch defines it, else its name and whether it is weak.
    symbols: Vec<SymbolRef>,
    init: Option<u64>,
    init_array: Option<(u64, u64)>,
    fini: Option<u64>,
    fini_array: Option<(u64, u64)>,
    /// `.eh_frame`: `(vaddr, size)`.
    eh_frame: Option<(u64, u64)>,
    /// The manifest symbol's vaddr.
    manifest: Option<u64>,
    /// Functions of the patch, for the perf map and the debugger:
    /// `(vaddr, size, mangled name)`.
    functions: Vec<(u64, u64, String)>,
}

#[derive(Debug, Clone)]
enum SymbolRef {
    Null,
    Defined(u64),
    Undefined { name: String, weak: bool },
}

fn page_size() -> u64 {
    // SAFETY: no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size)
        .ok()
        .filter(|s| s.is_power_of_two())
        .unwrap_or(4096)
}

fn round_down(x: u64, page: u64) -> u64 {
    x & !(page - 1)
}

fn round_up(x: u64, page: u64) -> Option<u64> {
    Some(x.checked_add(page - 1)? & !(page - 1))
}

/// Reads what mapping the patch needs from its bytes (an ELF shared
/// object that `elf::check` accepted: 64-bit, this machine, every
/// `PT_LOAD` inside the file).
fn plan(bytes: &[u8]) -> Result<Plan, NearRefusal> {
    let file = ElfFile64::<LittleEndian>::parse(bytes).map_err(NearRefusal::unsupported)?;
    let endian = file.endian();
    let header = file.elf_header();
    if header.e_type(endian) != elf::ET_DYN || header.e_machine(endian) != elf::EM_X86_64 {
        return Err(NearRefusal::unsupported("not an x86-64 shared object"));
    }
    let page = page_size();
    let mut segments = Vec::new();
    let mut relro = None;
    for ph in file.elf_program_headers() {
        match ph.p_type(endian) {
            elf::PT_LOAD => {
                let s = Segment {
                    vaddr: ph.p_vaddr(endian),
                    memsz: ph.p_memsz(endian),
                    offset: ph.p_offset(endian),
                    filesz: ph.p_filesz(endian),
                    flags: ph.p_flags(endian),
                };
                if s.filesz > s.memsz
                    || s.vaddr % page != s.offset % page
                    || s.vaddr.checked_add(s.memsz).is_none_or(|e| e > 1 << 40)
                {
                    return Err(NearRefusal::unsupported(
                        "a PT_LOAD segment this loader cannot map",
                    ));
                }
                segments.push(s);
            }
            elf::PT_TLS => {
                return Err(NearRefusal::ThreadLocals {
                    what: "a PT_TLS segment".into(),
                });
            }
            elf::PT_GNU_RELRO => relro = Some((ph.p_vaddr(endian), ph.p_memsz(endian))),
            elf::PT_INTERP => return Err(NearRefusal::unsupported("a PT_INTERP segment")),
            _ => {}
        }
    }
    let span = segments
        .iter()
        .map(|s| s.vaddr + s.memsz)
        .max()
        .and_then(|end| round_up(end, page))
        .filter(|&s| s > 0)
        .ok_or_else(|| NearRefusal::unsupported("no PT_LOAD segment"))?;
    let sections = file.elf_section_table();
    let dynsym = sections
        .symbols(endian, bytes, elf::SHT_DYNSYM)
        .map_err(NearRefusal::unsupported)?;
    let strings = dynsym.strings();
    let mut symbols = Vec::with_capacity(dynsym.len());
    let mut manifest = None;
    for (i, sym) in dynsym.symbols().iter().enumerate() {
        if i == 0 {
            symbols.push(SymbolRef::Null);
            continue;
        }
        let name = sym
            .name(endian, strings)
            .map_err(NearRefusal::unsupported)?;
        if sym.st_type() == elf::STT_TLS {
            return Err(NearRefusal::ThreadLocals {
                what: format!(
                    "symbol {}",
                    crate::host::demangle(&String::from_utf8_lossy(name))
                ),
            });
        }
        if sym.st_type() == elf::STT_GNU_IFUNC && sym.st_shndx(endian) != elf::SHN_UNDEF {
            return Err(NearRefusal::unsupported("an IFUNC symbol of its own"));
        }
        if sym.st_shndx(endian) == elf::SHN_UNDEF {
            symbols.push(SymbolRef::Undefined {
                name: String::from_utf8_lossy(name).into_owned(),
                weak: sym.st_bind() == elf::STB_WEAK,
            });
        } else if sym.st_shndx(endian) == elf::SHN_ABS {
            return Err(NearRefusal::unsupported("an absolute symbol"));
        } else {
            if name == crate::abi::MANIFEST_SYMBOL.as_bytes() {
                manifest = Some(sym.st_value(endian));
            }
            symbols.push(SymbolRef::Defined(sym.st_value(endian)));
        }
    }
    let mut relocs = Vec::new();
    let mut eh_frame = None;
    for section in sections.iter() {
        let name = sections.section_name(endian, section).unwrap_or_default();
        if name == b".eh_frame" && section.sh_flags(endian) & u64::from(elf::SHF_ALLOC) != 0 {
            eh_frame = Some((section.sh_addr(endian), section.sh_size(endian)));
        }
        if section.sh_type(endian) == elf::SHT_REL {
            return Err(NearRefusal::unsupported("REL (not RELA) relocations"));
        }
        let Some((rela, link)) = section
            .rela(endian, bytes)
            .map_err(NearRefusal::unsupported)?
        else {
            continue;
        };
        if section.sh_flags(endian) & u64::from(elf::SHF_ALLOC) == 0 {
            continue; // not dynamic relocations
        }
        if link != dynsym.section() {
            return Err(NearRefusal::unsupported(
                "a relocation section not against the dynamic symbols",
            ));
        }
        for r in rela {
            relocs.push(Reloc {
                offset: r.r_offset(endian),
                r_type: r.r_type(endian, false),
                symbol: r.r_sym(endian, false),
                addend: r.r_addend(endian),
            });
        }
    }
    let mut plan = Plan {
        segments,
        relro,
        span,
        relocs,
        symbols,
        init: None,
        init_array: None,
        fini: None,
        fini_array: None,
        eh_frame,
        manifest,
        functions: Vec::new(),
    };
    if let Some((dynamic, _)) = sections
        .dynamic(endian, bytes)
        .map_err(NearRefusal::unsupported)?
    {
        let mut init_array = (None, None);
        let mut fini_array = (None, None);
        for d in dynamic {
            let value = d.d_val(endian);
            match d.d_tag(endian) as u32 {
                elf::DT_NULL => break,
                elf::DT_INIT => plan.init = Some(value),
                elf::DT_FINI => plan.fini = Some(value),
                elf::DT_INIT_ARRAY => init_array.0 = Some(value),
                elf::DT_INIT_ARRAYSZ => init_array.1 = Some(value),
                elf::DT_FINI_ARRAY => fini_array.0 = Some(value),
                elf::DT_FINI_ARRAYSZ => fini_array.1 = Some(value),
                elf::DT_TEXTREL => return Err(NearRefusal::unsupported("text relocations")),
                elf::DT_PREINIT_ARRAY => {
                    return Err(NearRefusal::unsupported("a DT_PREINIT_ARRAY"));
                }
                _ => {}
            }
        }
        plan.init_array = init_array.0.zip(init_array.1);
        plan.fini_array = fini_array.0.zip(fini_array.1);
    }
    for r in &plan.relocs {
        check_reloc(&plan, r)?;
    }
    // Named functions for the perf map and the debugger (the static
    // symbol table, which a thin patch keeps; none if it was stripped).
    if let Ok(symtab) = sections.symbols(endian, bytes, elf::SHT_SYMTAB) {
        for sym in symtab.symbols() {
            if sym.st_type() == elf::STT_FUNC
                && sym.st_shndx(endian) != elf::SHN_UNDEF
                && sym.st_size(endian) > 0
                && let Ok(name) = sym.name(endian, symtab.strings())
            {
                plan.functions.push((
                    sym.st_value(endian),
                    sym.st_size(endian),
                    String::from_utf8_lossy(name).into_owned(),
                ));
            }
        }
    }
    Ok(plan)
}

/// The relocation types a thin patch contains; any other is refused, by
/// name. Each writes 8 bytes, which must lie in a writable segment.
fn check_reloc(plan: &Plan, r: &Reloc) -> Result<(), NearRefusal> {
    let name = match r.r_type {
        elf::R_X86_64_NONE => return Ok(()),
        elf::R_X86_64_RELATIVE
        | elf::R_X86_64_64
        | elf::R_X86_64_GLOB_DAT
        | elf::R_X86_64_JUMP_SLOT => "",
        elf::R_X86_64_DTPMOD64 | elf::R_X86_64_DTPOFF64 | elf::R_X86_64_TPOFF64 => {
            return Err(NearRefusal::ThreadLocals {
                what: format!("a {} relocation", reloc_name(r.r_type)),
            });
        }
        other => {
            return Err(NearRefusal::Relocation {
                r_type: other,
                name: reloc_name(other),
                offset: r.offset,
            });
        }
    };
    let _ = name;
    let writable = plan.segments.iter().any(|s| {
        s.flags & elf::PF_W != 0
            && s.vaddr <= r.offset
            && r.offset
                .checked_add(8)
                .is_some_and(|e| e <= s.vaddr + s.memsz)
    });
    if !writable {
        return Err(NearRefusal::unsupported(format!(
            "a relocation at {:#x}, outside its writable segments",
            r.offset
        )));
    }
    if r.r_type != elf::R_X86_64_RELATIVE && plan.symbols.get(r.symbol as usize).is_none() {
        return Err(NearRefusal::unsupported(format!(
            "a relocation at {:#x} names symbol {}, which does not exist",
            r.offset, r.symbol
        )));
    }
    Ok(())
}

fn reloc_name(r_type: u32) -> &'static str {
    match r_type {
        elf::R_X86_64_PC32 => "R_X86_64_PC32",
        elf::R_X86_64_COPY => "R_X86_64_COPY",
        elf::R_X86_64_32 => "R_X86_64_32",
        elf::R_X86_64_32S => "R_X86_64_32S",
        elf::R_X86_64_PC64 => "R_X86_64_PC64",
        elf::R_X86_64_IRELATIVE => "R_X86_64_IRELATIVE",
        elf::R_X86_64_DTPMOD64 => "R_X86_64_DTPMOD64",
        elf::R_X86_64_DTPOFF64 => "R_X86_64_DTPOFF64",
        elf::R_X86_64_TPOFF64 => "R_X86_64_TPOFF64",
        elf::R_X86_64_TLSDESC => "R_X86_64_TLSDESC",
        elf::R_X86_64_SIZE64 => "R_X86_64_SIZE64",
        _ => "an unknown type",
    }
}

/// Resolves each undefined symbol of `plan` in this process: in the
/// global scope first (`dlsym(RTLD_DEFAULT)`: the executable's exported
/// symbols and its shared libraries, as the dynamic loader would), then,
/// for what is not there, in the executable's own symbol table
/// ([`symtab`]), which reaches a binary linked without `-rdynamic`. A weak
/// symbol found nowhere is 0.
fn resolve(plan: &Plan) -> Result<Vec<u64>, NearRefusal> {
    let mut values = vec![0u64; plan.symbols.len()];
    let mut rest: Vec<(usize, &str, bool)> = Vec::new();
    for (i, s) in plan.symbols.iter().enumerate() {
        if let SymbolRef::Undefined { name, weak } = s {
            match lookup_global(name) {
                Some(v) => values[i] = v,
                None => rest.push((i, name, *weak)),
            }
        }
    }
    if rest.is_empty() {
        return Ok(values);
    }
    let names: Vec<&str> = rest.iter().map(|r| r.1).collect();
    let table = symtab::resolve(&names).unwrap_or_default();
    let mut missing = Vec::new();
    for (i, name, weak) in rest {
        match table.get(name) {
            Some(&v) => values[i] = v,
            None if weak => {}
            None => missing.push(name),
        }
    }
    if !missing.is_empty() {
        return Err(NearRefusal::Missing {
            symbols: missing.iter().map(|n| crate::host::demangle(n)).collect(),
        });
    }
    Ok(values)
}

fn lookup_global(name: &str) -> Option<u64> {
    let c = CString::new(name).ok()?;
    // SAFETY: dlsym with RTLD_DEFAULT only looks the name up in the global
    // scope; for an IFUNC it returns the resolved function. The result is
    // used as a number.
    let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c.as_ptr()) };
    (!p.is_null()).then_some(p as u64)
}

/// The executable's code: `[start, end)` of its executable `PT_LOAD`
/// segments, as mapped (from `dl_iterate_phdr`'s first entry).
pub(crate) fn executable_text() -> Option<(u64, u64)> {
    static TEXT: OnceLock<Option<(u64, u64)>> = OnceLock::new();
    *TEXT.get_or_init(|| {
        unsafe extern "C" fn visit(
            info: *mut libc::dl_phdr_info,
            _size: usize,
            data: *mut c_void,
        ) -> libc::c_int {
            // SAFETY: `data` is the `Option` passed below and `info` a valid
            // entry during the callback (dl_iterate_phdr's contract); the
            // first entry is the main program.
            let (out, info) = unsafe { (&mut *data.cast::<Option<(u64, u64)>>(), &*info) };
            for i in 0..usize::from(info.dlpi_phnum) {
                // SAFETY: `dlpi_phdr` has `dlpi_phnum` entries.
                let ph = unsafe { &*info.dlpi_phdr.add(i) };
                if ph.p_type == libc::PT_LOAD && ph.p_flags & libc::PF_X != 0 {
                    let start = info.dlpi_addr + ph.p_vaddr;
                    let end = start + ph.p_memsz;
                    *out = Some(match *out {
                        Some((s, e)) => (s.min(start), e.max(end)),
                        None => (start, end),
                    });
                }
            }
            1
        }
        let mut out: Option<(u64, u64)> = None;
        // SAFETY: `visit` matches the callback type and only writes `out`,
        // which outlives the call.
        unsafe { libc::dl_iterate_phdr(Some(visit), (&raw mut out).cast()) };
        out
    })
}

/// The mapped ranges of this process, sorted (`/proc/self/maps`).
fn mappings() -> Result<Vec<(u64, u64)>, NearRefusal> {
    let maps = std::fs::read_to_string("/proc/self/maps").map_err(|e| NearRefusal::System {
        what: "reading /proc/self/maps",
        error: e.to_string(),
    })?;
    let mut out: Vec<(u64, u64)> = maps
        .lines()
        .filter_map(|line| {
            let range = line.split_whitespace().next()?;
            let (a, b) = range.split_once('-')?;
            Some((
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
            ))
        })
        .collect();
    out.sort_unstable();
    Ok(out)
}

/// Candidate start addresses for `size` bytes such that the whole range
/// lies within [`REACH`] of every byte of `text`, nearest first: free
/// gaps of `maps` inside that window, each tried at its end nearest the
/// executable, one page of gap kept on each side.
fn candidates(text: (u64, u64), size: u64, maps: &[(u64, u64)], page: u64) -> Vec<u64> {
    // Every byte p of the patch must satisfy |p - e| < REACH for every
    // executable byte e: p >= text.end - REACH and p + size <= text.start + REACH.
    let lo = text.1.saturating_sub(REACH - page).max(page * 16);
    let hi = text.0.saturating_add(REACH - page);
    let mut out = Vec::new();
    let mut prev_end = 0u64;
    let mut gaps = Vec::new();
    for &(s, e) in maps {
        if s > prev_end {
            gaps.push((prev_end, s));
        }
        prev_end = prev_end.max(e);
    }
    gaps.push((prev_end, !(page - 1)));
    for (gs, ge) in gaps {
        let gs = gs.saturating_add(page).max(lo);
        let ge = ge.saturating_sub(page).min(hi);
        if ge <= gs || ge - gs < size {
            continue;
        }
        if ge <= text.0 {
            // Below the executable: as high as it goes.
            out.push(round_down(ge - size, page));
        } else {
            out.push(round_up(gs, page).unwrap_or(gs));
        }
    }
    let mid = text.0 / 2 + text.1 / 2;
    out.sort_by_key(|&a| a.abs_diff(mid));
    out
}

/// Reserves `size` bytes (inaccessible) within [`REACH`] of the
/// executable's code.
fn reserve(size: u64) -> Result<u64, NearRefusal> {
    #[cfg(feature = "failpoints")]
    fail::fail_point!("load::near_range", |_| Err(NearRefusal::NoRange { size }));
    let text = executable_text().ok_or(NearRefusal::NoRange { size })?;
    let page = page_size();
    for hint in candidates(text, size, &mappings()?, page) {
        // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping
        // (it fails with EEXIST instead); a fresh anonymous PROT_NONE
        // reservation touches no memory of the process.
        let p = unsafe {
            libc::mmap(
                hint as *mut c_void,
                size as usize,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            continue; // taken since /proc/self/maps was read, or too old a kernel
        }
        if p as u64 != hint {
            // A kernel older than 4.17 treats the flag as a hint only.
            // SAFETY: unmapping the mapping just made, which nothing uses.
            unsafe { libc::munmap(p, size as usize) };
            continue;
        }
        return Ok(hint);
    }
    Err(NearRefusal::NoRange { size })
}

/// A patch mapped by this module. Unmapped only by [`NearImage::close`].
#[derive(Debug)]
pub(crate) struct NearImage {
    /// Load bias: the address of vaddr 0.
    pub base: u64,
    span: u64,
    eh_frame: Option<u64>,
    fini: Vec<u64>,
    /// The manifest's address, if the patch exports one.
    pub manifest: Option<u64>,
    /// Its entry in the debugger's list ([`jit`]), if registered.
    debugger: Option<jit::Registration>,
}

/// Maps the patch `bytes` (held by the sealed private copy `copy`) near
/// the executable, relocates it, registers its unwind tables (and, if
/// `debugger`, the patch itself with a debugger: [`jit`]) and runs its
/// initialisers.
///
/// # Safety
///
/// Runs the patch's initialisers: `bytes` must be a patch the operator
/// chose to load (see the crate docs, "Safety model"), and `copy` must
/// hold exactly `bytes` and not change (a sealed memfd, or a private
/// file nobody else can write).
pub(crate) unsafe fn open(
    copy: &File,
    bytes: &[u8],
    perf_map: bool,
    debugger: bool,
) -> Result<NearImage, NearRefusal> {
    let plan = plan(bytes)?;
    let values = resolve(&plan)?;
    let base = reserve(plan.span)?;
    let mapped = Reservation {
        base,
        span: plan.span,
    };
    map_segments(&plan, copy, base)?;
    // SAFETY: every relocation's 8 bytes lie in a writable segment mapped
    // above (checked by `check_reloc`), still writable until `protect`.
    unsafe { relocate(&plan, &values, base) };
    protect(&plan, base)?;
    let image = Image::of_segments(
        plan.segments
            .iter()
            .map(|s| (base + s.vaddr, base + s.vaddr + s.memsz, s.flags))
            .collect(),
        plan.relro
            .map(|(v, m)| {
                let page = page_size();
                (round_down(base + v, page), base + v + m)
            })
            .into_iter()
            .collect(),
    );
    let eh_frame = match plan.eh_frame {
        Some((addr, size)) if size >= 4 => {
            let at = base + addr;
            // libgcc walks the section to a zero-length terminator, which
            // the linker's crtend.o provides.
            // SAFETY: `.eh_frame` is in a readable mapped segment (its
            // section lies in a PT_LOAD; checked by `image`).
            let last = image
                .readable((at + size - 4) as *const u8, 4)
                .then(|| unsafe { ((at + size - 4) as *const u32).read_unaligned() });
            if last != Some(0) {
                return Err(NearRefusal::unsupported("its .eh_frame has no terminator"));
            }
            Some(at)
        }
        _ => None,
    };
    let register = frame_functions().ok_or_else(|| {
        NearRefusal::unsupported("the unwinder (__register_frame) is not in this process")
    })?;
    if let Some(at) = eh_frame {
        // SAFETY: `at` is the patch's complete, terminated `.eh_frame`,
        // mapped read-only until `close` deregisters it.
        unsafe { (register.0)(at as *const c_void) };
    }
    let fini = fini_functions(&plan, base);
    let manifest = plan.manifest.map(|m| base + m);
    let debugger = debugger
        .then(|| register_with_debugger(&plan, base, eh_frame))
        .flatten();
    images().lock().push((base, image));
    std::mem::forget(mapped);
    // SAFETY: the caller's contract: the operator chose to run this code.
    // Everything it binds to is bound; its unwind tables are registered.
    unsafe { run_initialisers(&plan, base) };
    if perf_map {
        write_perf_map(&plan, base);
    }
    Ok(NearImage {
        base,
        span: plan.span,
        eh_frame,
        fini,
        manifest,
        debugger,
    })
}

/// Tells a debugger about the patch mapped at `base` ([`jit`]): its
/// executable segments, its functions and its `.eh_frame` (at `eh_frame`,
/// registered with the unwinder, so whole and terminated). Never fails a
/// load: a file that cannot be built is logged, and the patch loads
/// without it.
fn register_with_debugger(
    plan: &Plan,
    base: u64,
    eh_frame: Option<u64>,
) -> Option<jit::Registration> {
    let eh_frame = eh_frame.zip(plan.eh_frame).map(|(at, (_, size))| {
        // SAFETY: the patch's `.eh_frame`, `size` bytes in a readable
        // mapped segment (checked by `open`), mapped until `close`, which
        // drops the registration first; read-only, so unchanged.
        (at, unsafe {
            std::slice::from_raw_parts(at as *const u8, size as usize)
        })
    });
    let described = jit::Described {
        code: plan
            .segments
            .iter()
            .filter(|s| s.flags & elf::PF_X != 0)
            .map(|s| (base + s.vaddr, s.memsz))
            .collect(),
        eh_frame,
        functions: plan
            .functions
            .iter()
            .map(|(vaddr, size, name)| (base + vaddr, *size, name.as_bytes()))
            .collect(),
    };
    let built = || -> Result<Vec<u8>, String> {
        #[cfg(feature = "failpoints")]
        fail::fail_point!("load::debugger", |_| Err(
            "injected by the load::debugger failpoint".into()
        ));
        jit::symfile(&described).map_err(|e| e.to_string())
    };
    match built() {
        Ok(file) => Some(jit::Registration::new(file)),
        Err(_e) => {
            #[cfg(feature = "control")]
            tracing::warn!(
                address = base,
                error = %_e,
                "hotpatch: debuggers will not see this patch's functions"
            );
            None
        }
    }
}

/// Unmaps the reservation unless forgotten (on every error path of `open`).
struct Reservation {
    base: u64,
    span: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // SAFETY: the range reserved by `reserve`, which holds only the
        // patch's segments; no code of the patch has run yet.
        unsafe { libc::munmap(self.base as *mut c_void, self.span as usize) };
    }
}

fn prot(flags: u32) -> libc::c_int {
    let mut p = libc::PROT_NONE;
    if flags & elf::PF_R != 0 {
        p |= libc::PROT_READ;
    }
    if flags & elf::PF_W != 0 {
        p |= libc::PROT_WRITE;
    }
    if flags & elf::PF_X != 0 {
        p |= libc::PROT_EXEC;
    }
    p
}

/// Maps each segment into the reservation from the private copy: writable
/// ones read-write (relocated next), others with their final protection;
/// the part of a segment past its file bytes (`.bss`) zeroed.
fn map_segments(plan: &Plan, copy: &File, base: u64) -> Result<(), NearRefusal> {
    let page = page_size();
    for s in &plan.segments {
        let start = round_down(s.vaddr, page);
        let file_end = s.vaddr + s.filesz;
        let mem_end = round_up(s.vaddr + s.memsz, page).unwrap_or(plan.span);
        let writable = s.flags & elf::PF_W != 0;
        let p = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            prot(s.flags)
        };
        let map_end = round_up(file_end, page).unwrap_or(mem_end);
        if s.filesz > 0 {
            // SAFETY: MAP_FIXED into our own reservation (`reserve`), which
            // holds nothing else; a private mapping of the sealed copy.
            let m = unsafe {
                libc::mmap(
                    (base + start) as *mut c_void,
                    (map_end - start) as usize,
                    p,
                    libc::MAP_PRIVATE | libc::MAP_FIXED,
                    copy.as_raw_fd(),
                    round_down(s.offset, page) as libc::off_t,
                )
            };
            if m == libc::MAP_FAILED {
                return Err(NearRefusal::last_os("mapping a segment"));
            }
        }
        if s.memsz > s.filesz {
            if !writable {
                return Err(NearRefusal::unsupported(
                    "a read-only segment larger in memory than in the file",
                ));
            }
            // Zero the rest of the last file page (it holds whatever
            // follows in the file), then map zero pages for the rest.
            let zero_from = base + file_end;
            let zero_to = (base + map_end).min(base + s.vaddr + s.memsz);
            if s.filesz > 0 && zero_to > zero_from {
                // SAFETY: inside the segment just mapped read-write.
                unsafe {
                    std::ptr::write_bytes(zero_from as *mut u8, 0, (zero_to - zero_from) as usize)
                };
            }
            let anon_start = if s.filesz > 0 { map_end } else { start };
            if mem_end > anon_start {
                // SAFETY: MAP_FIXED into our own reservation.
                let m = unsafe {
                    libc::mmap(
                        (base + anon_start) as *mut c_void,
                        (mem_end - anon_start) as usize,
                        p,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                        -1,
                        0,
                    )
                };
                if m == libc::MAP_FAILED {
                    return Err(NearRefusal::last_os("mapping a segment's zero pages"));
                }
            }
        }
    }
    Ok(())
}

/// Applies the relocations.
///
/// # Safety
///
/// Each relocation's 8 bytes at `base + offset` are mapped and writable
/// (`check_reloc` and `map_segments`).
unsafe fn relocate(plan: &Plan, values: &[u64], base: u64) {
    for r in &plan.relocs {
        let symbol = || match plan.symbols.get(r.symbol as usize) {
            Some(SymbolRef::Defined(v)) => base + v,
            _ => values.get(r.symbol as usize).copied().unwrap_or(0),
        };
        let value = match r.r_type {
            elf::R_X86_64_RELATIVE => base.wrapping_add_signed(r.addend),
            elf::R_X86_64_64 => symbol().wrapping_add_signed(r.addend),
            elf::R_X86_64_GLOB_DAT | elf::R_X86_64_JUMP_SLOT => symbol(),
            _ => continue,
        };
        // SAFETY: the caller's guarantee; unaligned is allowed by the ABI.
        unsafe { ((base + r.offset) as *mut u64).write_unaligned(value) };
    }
}

/// Gives each writable segment its final protection and makes
/// `PT_GNU_RELRO` read-only (from the start of its first page to the start
/// of the page holding its end, as glibc does).
fn protect(plan: &Plan, base: u64) -> Result<(), NearRefusal> {
    let page = page_size();
    if let Some((vaddr, memsz)) = plan.relro {
        let start = round_down(base + vaddr, page);
        let end = round_down(base + vaddr + memsz, page);
        if end > start {
            // SAFETY: pages of our own mapping, relocated; nothing writes
            // them after this.
            if unsafe {
                libc::mprotect(
                    start as *mut c_void,
                    (end - start) as usize,
                    libc::PROT_READ,
                )
            } != 0
            {
                return Err(NearRefusal::last_os("protecting its RELRO"));
            }
        }
    }
    for s in plan.segments.iter().filter(|s| s.flags & elf::PF_W != 0) {
        if prot(s.flags) != libc::PROT_READ | libc::PROT_WRITE {
            return Err(NearRefusal::unsupported(
                "a writable segment that is not plain read-write data",
            ));
        }
    }
    Ok(())
}

type FrameFn = unsafe extern "C" fn(*const c_void);

/// libgcc's `__register_frame` and `__deregister_frame`, the unwinder
/// Rust's std uses on Linux (looked up once: the unwinder is linked with
/// std).
fn frame_functions() -> Option<(FrameFn, FrameFn)> {
    static FNS: OnceLock<Option<(usize, usize)>> = OnceLock::new();
    let (r, d) = (*FNS.get_or_init(|| {
        Some((
            lookup_global("__register_frame")? as usize,
            lookup_global("__deregister_frame")? as usize,
        ))
    }))?;
    // SAFETY: both are libgcc's functions of this type (`void f(void *)`).
    unsafe {
        Some((
            std::mem::transmute::<usize, FrameFn>(r),
            std::mem::transmute::<usize, FrameFn>(d),
        ))
    }
}

/// Reads an array of function addresses (`DT_INIT_ARRAY`, ...) from the
/// mapped, relocated image. Entries 0 and -1 are skipped, as glibc does.
fn function_array(plan: &Plan, base: u64, array: Option<(u64, u64)>) -> Vec<u64> {
    let Some((addr, size)) = array else {
        return Vec::new();
    };
    let inside = plan.segments.iter().any(|s| {
        s.vaddr <= addr
            && addr
                .checked_add(size)
                .is_some_and(|e| e <= s.vaddr + s.memsz)
    });
    if !inside || addr % 8 != 0 {
        return Vec::new();
    }
    (0..size / 8)
        // SAFETY: inside a mapped, readable segment (checked above).
        .map(|i| unsafe { ((base + addr + i * 8) as *const u64).read() })
        .filter(|&f| f != 0 && f != u64::MAX)
        .collect()
}

fn executable_in(plan: &Plan, base: u64, f: u64) -> bool {
    plan.segments
        .iter()
        .any(|s| s.flags & elf::PF_X != 0 && base + s.vaddr <= f && f < base + s.vaddr + s.memsz)
}

/// Runs `DT_INIT`, then `DT_INIT_ARRAY` in order, as the dynamic loader
/// does. A function outside the patch's code is not called.
///
/// # Safety
///
/// Runs code of the patch (see [`open`]).
unsafe fn run_initialisers(plan: &Plan, base: u64) {
    type Init = unsafe extern "C" fn(libc::c_int, *const *const i8, *const *const i8);
    let mut all: Vec<u64> = plan.init.map(|i| base + i).into_iter().collect();
    all.extend(function_array(plan, base, plan.init_array));
    for f in all.into_iter().filter(|&f| executable_in(plan, base, f)) {
        // SAFETY: an initialiser of the patch, in its code; glibc passes
        // (argc, argv, envp), which these functions may ignore.
        unsafe {
            let init = std::mem::transmute::<usize, Init>(f as usize);
            init(0, std::ptr::null(), std::ptr::null());
        }
    }
}

/// `DT_FINI_ARRAY` in reverse, then `DT_FINI`: what `close` runs.
fn fini_functions(plan: &Plan, base: u64) -> Vec<u64> {
    let mut all = function_array(plan, base, plan.fini_array);
    all.reverse();
    all.extend(plan.fini.map(|f| base + f));
    all.retain(|&f| executable_in(plan, base, f));
    all
}

/// The images mapped here, for [`Image::containing`]: `(base, image)`.
pub(crate) fn images() -> &'static Mutex<Vec<(u64, Image)>> {
    static IMAGES: Mutex<Vec<(u64, Image)>> = Mutex::new(Vec::new());
    &IMAGES
}

impl NearImage {
    /// Where its code is: the start of its mapping.
    pub(crate) fn address(&self) -> u64 {
        self.base
    }

    /// The length of its mapping.
    pub(crate) fn size(&self) -> u64 {
        self.span
    }

    /// Runs its finalisers, deregisters its unwind tables and unmaps it.
    ///
    /// # Safety
    ///
    /// No thread may run its code or use its data, now or later (the
    /// contract of [`Loader::reclaim`](crate::Loader::reclaim)).
    pub(crate) unsafe fn close(self) {
        type Fini = unsafe extern "C" fn();
        for f in &self.fini {
            // SAFETY: a finaliser of the patch, as dlclose runs them.
            unsafe { std::mem::transmute::<usize, Fini>(*f as usize)() };
        }
        if let (Some(at), Some((_, deregister))) = (self.eh_frame, frame_functions()) {
            // SAFETY: registered by `open` with this address.
            unsafe { deregister(at as *const c_void) };
        }
        images().lock().retain(|(b, _)| *b != self.base);
        // Out of the debugger's list before the code goes.
        drop(self.debugger);
        // SAFETY: the caller's contract: nothing uses the mapping any more.
        unsafe { libc::munmap(self.base as *mut c_void, self.span as usize) };
    }
}

/// Appends the patch's functions to `/tmp/perf-<pid>.map` (the format
/// `perf` reads for code it finds no file for: `START SIZE name`, hex), so
/// profiles name patch code. Best effort: a file that is not this user's
/// regular file is left alone, and a failure is logged, not an error.
fn write_perf_map(plan: &Plan, base: u64) {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    if plan.functions.is_empty() {
        return;
    }
    let path = format!("/tmp/perf-{}.map", std::process::id());
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)?;
        let m = file.metadata()?;
        // SAFETY: geteuid has no preconditions.
        if !m.is_file() || m.uid() != unsafe { libc::geteuid() } {
            return Err(std::io::Error::other("not a regular file of this user"));
        }
        let mut text = String::new();
        for (vaddr, size, name) in &plan.functions {
            text.push_str(&format!(
                "{:x} {:x} {}\n",
                base + vaddr,
                size,
                crate::host::demangle(name)
            ));
        }
        file.write_all(text.as_bytes())
    };
    if let Err(_e) = write() {
        #[cfg(feature = "control")]
        tracing::warn!(path, error = %_e, "hotpatch: could not write the perf map");
    }
}

pub(crate) mod symtab {
    //! The executable's own symbol table (`.symtab`), read from
    //! `/proc/self/exe` and used only if its build-id is the running
    //! binary's: what lets a patch bind to a service built without
    //! `-rdynamic`, its private functions and statics included (as Dioxus
    //! subsecond binds to the base binary's symbols). Read per load, for
    //! the names the patch needs only: nothing is kept in memory.

    use std::collections::HashMap;
    use std::ffi::c_void;
    use std::os::fd::AsRawFd;
    use std::sync::OnceLock;

    use object::{Object, ObjectSymbol};

    /// The addresses in this process of those of `names` that the
    /// executable's symbol table defines once (a name defined twice at
    /// different addresses, as two private statics of one name can be, is
    /// left out). `None` if the executable has no symbol table, or the
    /// file at `/proc/self/exe` is not the running build.
    pub(crate) fn resolve(names: &[&str]) -> Option<HashMap<String, u64>> {
        let bias = load_bias()?;
        let file = std::fs::File::open("/proc/self/exe").ok()?;
        let len = usize::try_from(file.metadata().ok()?.len()).ok()?;
        if len == 0 {
            return None;
        }
        // SAFETY: a private read-only mapping of the executable, unmapped
        // below; an executable being run cannot be written (ETXTBSY).
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return None;
        }
        // SAFETY: `len` readable bytes, mapped above.
        let bytes = unsafe { std::slice::from_raw_parts(map.cast::<u8>(), len) };
        let found = lookup(bytes, bias, names);
        // SAFETY: the mapping made above, no longer borrowed.
        unsafe { libc::munmap(map, len) };
        found
    }

    fn lookup(bytes: &[u8], bias: u64, names: &[&str]) -> Option<HashMap<String, u64>> {
        let file = object::File::parse(bytes).ok()?;
        if file.build_id().ok()?? != crate::host::build_id()? {
            return None;
        }
        let wanted: std::collections::HashSet<&[u8]> = names.iter().map(|n| n.as_bytes()).collect();
        let mut found: HashMap<String, Option<u64>> = HashMap::new();
        for s in file.symbols() {
            if s.is_undefined() || s.address() == 0 {
                continue;
            }
            if !matches!(
                s.kind(),
                object::SymbolKind::Text | object::SymbolKind::Data | object::SymbolKind::Unknown
            ) {
                continue;
            }
            let Ok(name) = s.name_bytes() else { continue };
            if !wanted.contains(name) {
                continue;
            }
            let at = bias.wrapping_add(s.address());
            found
                .entry(String::from_utf8_lossy(name).into_owned())
                .and_modify(|v| {
                    if *v != Some(at) {
                        *v = None;
                    }
                })
                .or_insert(Some(at));
        }
        Some(
            found
                .into_iter()
                .filter_map(|(k, v)| Some((k, v?)))
                .collect(),
        )
    }

    /// The executable's symbol table is there, is this build's, and puts
    /// the runtime's marker where it is: patches can bind to it without
    /// `-rdynamic`. Checked once.
    pub(crate) fn serves() -> bool {
        static SERVES: OnceLock<bool> = OnceLock::new();
        *SERVES.get_or_init(|| {
            let marker = "hotpatch_host_exports_v1";
            let ours = (&raw const crate::host::hotpatch_host_exports_v1) as u64;
            resolve(&[marker]).and_then(|m| m.get(marker).copied()) == Some(ours)
        })
    }

    /// The executable's load bias (`dlpi_addr` of the main program).
    fn load_bias() -> Option<u64> {
        unsafe extern "C" fn visit(
            info: *mut libc::dl_phdr_info,
            _size: usize,
            data: *mut c_void,
        ) -> libc::c_int {
            // SAFETY: as in `executable_text`.
            let (out, info) = unsafe { (&mut *data.cast::<Option<u64>>(), &*info) };
            *out = Some(info.dlpi_addr);
            1
        }
        let mut out: Option<u64> = None;
        // SAFETY: `visit` matches the callback type and only writes `out`.
        unsafe { libc::dl_iterate_phdr(Some(visit), (&raw mut out).cast()) };
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_stay_within_reach_of_the_text() {
        let page = 4096;
        let text = (0x5555_0000_0000u64, 0x5555_0100_0000u64);
        let maps = vec![
            (0x5554_ff00_0000, 0x5555_0200_0000),
            (0x5555_0300_0000, 0x5555_0400_0000),
            (0x7fff_0000_0000, 0x7fff_0001_0000),
        ];
        let size = 0x10_0000;
        let all = candidates(text, size, &maps, page);
        assert!(!all.is_empty());
        for a in all {
            assert!(a + size <= text.0 + REACH, "{a:#x}");
            assert!(a >= text.1 - REACH, "{a:#x}");
            assert!(
                maps.iter().all(|&(s, e)| a + size <= s || e <= a),
                "{a:#x} overlaps"
            );
        }
    }

    #[test]
    fn no_candidate_when_everything_near_is_taken() {
        let text = (0x5555_0000_0000u64, 0x5555_0100_0000u64);
        let maps = vec![(0x5554_0000_0000, 0x5556_0000_0000)];
        assert!(candidates(text, 0x1000, &maps, 4096).is_empty());
    }
}
