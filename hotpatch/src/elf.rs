//! A structural check of a shared object before the dynamic loader sees
//! it.
//!
//! `dlopen` maps each loadable segment from the file; a segment that
//! reaches past the end of a truncated file maps pages with nothing
//! behind them, and touching them kills the process with SIGBUS, or reads
//! zeros where the manifest's tables should be. So before opening, check
//! that the file is an ELF shared object for this machine and that the
//! program headers and every `PT_LOAD` segment lie inside it.

/// Why `bytes` is not a shared object this process can load.
pub(crate) fn check(bytes: &[u8]) -> Result<(), String> {
    const EHDR: usize = 64;
    if bytes.len() < EHDR {
        return Err(format!(
            "{} bytes is too short for an ELF header",
            bytes.len()
        ));
    }
    if bytes[..4] != *b"\x7fELF" {
        return Err("not an ELF file (bad magic)".into());
    }
    if bytes[4] != 2 {
        return Err("not a 64-bit ELF file".into());
    }
    let little = match bytes[5] {
        1 => true,
        2 => false,
        _ => return Err("unknown ELF byte order".into()),
    };
    if little != cfg!(target_endian = "little") {
        return Err("ELF byte order differs from this machine's".into());
    }
    let u16_at = |o: usize| {
        let b = [bytes[o], bytes[o + 1]];
        if little {
            u16::from_le_bytes(b)
        } else {
            u16::from_be_bytes(b)
        }
    };
    let u32_at = |o: usize| {
        let b: [u8; 4] = bytes[o..o + 4].try_into().expect("4 bytes");
        if little {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        }
    };
    let u64_at = |o: usize| {
        let b: [u8; 8] = bytes[o..o + 8].try_into().expect("8 bytes");
        if little {
            u64::from_le_bytes(b)
        } else {
            u64::from_be_bytes(b)
        }
    };
    const ET_DYN: u16 = 3;
    if u16_at(16) != ET_DYN {
        return Err(format!("ELF type {} is not a shared object", u16_at(16)));
    }
    let machine = u16_at(18);
    if let Some(expected) = this_machine()
        && machine != expected
    {
        return Err(format!(
            "ELF machine {machine} is not this machine's ({expected})"
        ));
    }
    let phoff = u64_at(32);
    let phentsize = u64::from(u16_at(54));
    let phnum = u64::from(u16_at(56));
    if phentsize < 56 {
        return Err(format!("program header entries of {phentsize} bytes"));
    }
    let len = bytes.len() as u64;
    phentsize
        .checked_mul(phnum)
        .and_then(|size| size.checked_add(phoff))
        .filter(|&end| end <= len)
        .ok_or("the program header table lies past the end of the file (truncated?)")?;
    const PT_LOAD: u32 = 1;
    let mut loads = 0;
    for i in 0..phnum {
        let at = (phoff + i * phentsize) as usize;
        if u32_at(at) != PT_LOAD {
            continue;
        }
        loads += 1;
        let offset = u64_at(at + 8);
        let filesz = u64_at(at + 32);
        if offset.checked_add(filesz).is_none_or(|end| end > len) {
            return Err(format!(
                "loadable segment {i} ends at byte {}, past the end of the {len}-byte file (truncated?)",
                offset.saturating_add(filesz)
            ));
        }
    }
    if loads == 0 {
        return Err("no loadable segment".into());
    }
    Ok(())
}

/// `e_machine` of the target this runtime was built for.
fn this_machine() -> Option<u16> {
    if cfg!(target_arch = "x86_64") {
        Some(62)
    } else if cfg!(target_arch = "aarch64") {
        Some(183)
    } else if cfg!(target_arch = "riscv64") {
        Some(243)
    } else if cfg!(target_arch = "powerpc64") {
        Some(21)
    } else if cfg!(target_arch = "s390x") {
        Some(22)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::check;

    /// glibc's `libc.so.6`, mapped into every dynamically linked test
    /// binary on glibc; a statically linked (musl) binary maps no shared
    /// object, so the tests that read it run on glibc only.
    fn own_library() -> Vec<u8> {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let path = maps
            .lines()
            .filter_map(|l| l.split_whitespace().nth(5))
            .find(|p| p.contains("libc.so") || p.contains("libc-"))
            .expect("libc mapped");
        std::fs::read(path).unwrap()
    }

    /// `check(bytes)`'s refusal, which must say `reason`.
    fn refusal(bytes: &[u8], reason: &str) {
        match check(bytes) {
            Err(why) => assert!(why.contains(reason), "{why:?} does not say {reason:?}"),
            Ok(()) => panic!("{} bytes accepted; expected {reason:?}", bytes.len()),
        }
    }

    #[test]
    #[cfg_attr(not(target_env = "gnu"), ignore = "reads glibc's libc.so")]
    fn accepts_a_real_shared_object() {
        assert_eq!(check(&own_library()), Ok(()));
    }

    #[test]
    #[cfg_attr(not(target_env = "gnu"), ignore = "reads glibc's libc.so")]
    fn rejects_truncations_and_garbage() {
        let lib = own_library();
        let half = lib.len() / 2;
        refusal(
            &lib[..half],
            &format!("past the end of the {half}-byte file (truncated?)"),
        );
        refusal(
            &lib[..100],
            "the program header table lies past the end of the file (truncated?)",
        );
        refusal(&lib[..10], "10 bytes is too short for an ELF header");
        refusal(
            b"#!/bin/sh\necho hi\n",
            "18 bytes is too short for an ELF header",
        );
        let script = format!("#!/bin/sh\n{}\n", "echo hi; ".repeat(10));
        refusal(script.as_bytes(), "not an ELF file (bad magic)");
        refusal(&[0u8; 4096], "not an ELF file (bad magic)");
        let mut other = lib.clone();
        other[18] = 40; // EM_ARM
        other[19] = 0;
        refusal(&other, "ELF machine 40 is not this machine's");
    }
}
