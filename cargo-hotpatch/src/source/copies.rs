//! Hooks of a function the deployed binary has several local copies of.
//!
//! With several codegen units the compiler gives each unit that needs an
//! `#[inline]` function, or drop glue, its own local copy, under the same
//! name or the name with a `.llvm.<number>` suffix of its own (ThinLTO
//! promotes a local function another unit imported). A hook of one copy
//! would leave the others running the old code, so either every copy is
//! hooked or the change is refused.
//!
//! Each copy in the deployed binary is paired with the copy of the base
//! build it is (the same full name; for a name several units share, the
//! same codegen unit, which the executable's symbol table names with the
//! `STT_FILE` symbol before that unit's local symbols), and that one with
//! the head's copy in the same codegen unit. The pairing is sound when
//! every caller of the base copy that stays in the running binary compiled
//! to the same code in the same unit of the head, where it calls the
//! paired head copy: it then calls the new body exactly as the new build
//! does (`classify::callers_agree`'s argument, copy by copy). Any copy that
//! cannot be paired so refuses the change, naming why.

use object::read::{Object, ObjectSection, ObjectSymbol, RelocationTarget, SectionIndex};

use super::describe;
use super::identity::Host;
use super::objects::{Build, UnitId, stem};

/// One copy to hook: where it is, the bytes its entry holds, and the
/// head's body for it (object member name and section).
#[derive(Debug, Clone)]
pub(super) struct CopyHook {
    pub address: u64,
    pub entry: Vec<u8>,
    pub body: (String, SectionIndex),
    /// Its codegen unit, for the report.
    pub unit: String,
}

/// Every copy of `symbol` in the deployed binary, paired with its base
/// and head copies and its callers checked (see the module's
/// documentation); `Err` says which copy cannot be hooked and why.
pub(super) fn hook_copies(
    b: &Build<'_>,
    h: &Build<'_>,
    host: &Host,
    symbol: &str,
    in_patch: &dyn Fn(&str) -> bool,
) -> Result<Vec<CopyHook>, String> {
    let name = stem(symbol);
    let deployed = host.copies_of(name);
    let (base, head) = (b.copies(name), h.copies(name));
    let mut hooks = Vec::new();
    for d in deployed {
        let same_name: Vec<UnitId> = base
            .iter()
            .copied()
            .filter(|u| b.full_name_of.get(u) == Some(&d.name))
            .collect();
        let paired: Vec<UnitId> = match same_name.as_slice() {
            [_] => same_name,
            _ => same_name
                .into_iter()
                .filter(|u| d.unit.as_deref() == Some(b.unit_name(u.0)))
                .collect(),
        };
        let [ub] = paired[..] else {
            return Err(format!(
                "its copy at {:#x} in the deployed binary cannot be paired with one copy of the base build ({} of {} copies of the name there match it)",
                d.address,
                paired.len(),
                base.len()
            ));
        };
        let unit = b.unit_name(ub.0).to_owned();
        let in_unit: Vec<UnitId> = head
            .iter()
            .copied()
            .filter(|u| h.unit_name(u.0) == unit)
            .collect();
        let [uh] = in_unit[..] else {
            return Err(format!(
                "its copy of codegen unit {unit} has {} counterparts in that unit of the new build, so its new body cannot be told",
                in_unit.len()
            ));
        };
        callers_agree(b, h, name, ub, &unit, in_patch)?;
        let (address, entry) = host.hook_entry_at(symbol, d.address, d.size)?;
        hooks.push(CopyHook {
            address,
            entry,
            body: (h.members[uh.0].clone(), uh.1),
            unit,
        });
    }
    Ok(hooks)
}

/// Whether every caller of the base copy `ub` of `name` (in codegen unit
/// `unit`) calls the head's copy of that unit as the head does: it is in
/// the patch, holds the address as data, or compiled to the same code in
/// the same unit of the head, where it references the head's copy of
/// `unit`.
fn callers_agree(
    b: &Build<'_>,
    h: &Build<'_>,
    name: &str,
    ub: UnitId,
    unit: &str,
    in_patch: &dyn Fn(&str) -> bool,
) -> Result<(), String> {
    for caller in callers(b, name, ub) {
        let Some(caller_name) = b.name_of.get(&caller) else {
            // Anonymous data (a vtable): the standard convention.
            continue;
        };
        if caller_name == name || in_patch(caller_name) || !b.is_code(caller) {
            continue;
        }
        let caller_unit = b.unit_name(caller.0);
        let counterpart = h
            .copies(caller_name)
            .into_iter()
            .find(|u| h.unit_name(u.0) == caller_unit);
        let Some(hc) = counterpart else {
            return Err(format!(
                "its caller {} (codegen unit {caller_unit}) is not in that unit of the new build, so how the new build calls its copy cannot be compared",
                describe(caller_name)
            ));
        };
        if b.hash(caller) != h.hash(hc) {
            return Err(format!(
                "its caller {} (codegen unit {caller_unit}) compiled to other code in the new build, so the two may call it differently",
                describe(caller_name)
            ));
        }
        let reaches_pair = referenced_copies(h, hc, name)
            .iter()
            .any(|u| h.unit_name(u.0) == unit);
        if !reaches_pair {
            return Err(format!(
                "its caller {} (codegen unit {caller_unit}) calls another copy in the new build than the one of unit {unit}",
                describe(caller_name)
            ));
        }
    }
    Ok(())
}

/// The units of `b` that reference the copy `target` of `name`.
fn callers(b: &Build<'_>, name: &str, target: UnitId) -> Vec<UnitId> {
    let mut out = Vec::new();
    for (oi, file) in b.objects.iter().enumerate() {
        for section in file.sections() {
            let unit = (oi, section.index());
            if unit != target && referenced_copies(b, unit, name).contains(&target) {
                out.push(unit);
            }
        }
    }
    out
}

/// The copies of `name` the unit `from` references, each resolved as the
/// linker resolves it: a symbol (or section symbol) its own object
/// defines is that object's unit; an undefined one is the copy whose full
/// name it is.
fn referenced_copies(b: &Build<'_>, from: UnitId, name: &str) -> Vec<UnitId> {
    let file = &b.objects[from.0];
    let Ok(section) = file.section_by_index(from.1) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (_, r) in section.relocations() {
        let RelocationTarget::Symbol(si) = r.target() else {
            continue;
        };
        let Ok(sym) = file.symbol_by_index(si) else {
            continue;
        };
        let copy = match sym.section_index() {
            Some(s) => Some((from.0, s)),
            None => {
                let Ok(full) = sym.name() else { continue };
                if stem(full) != name {
                    continue;
                }
                b.copies(name)
                    .into_iter()
                    .find(|u| b.full_name_of.get(u).is_some_and(|n| n == full))
            }
        };
        if let Some(u) = copy
            && b.name_of.get(&u).is_some_and(|n| n == name)
            && !out.contains(&u)
        {
            out.push(u);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::process::Command;

    use super::hook_copies;
    use crate::source::identity::Host;
    use crate::source::objects::Build;

    /// A library whose `#[inline]` recursive `fib` no caller can inline
    /// whole, and an executable whose two modules call it: at `-O` with
    /// 16 codegen units each module's unit compiles its own local copy,
    /// both named alike.
    const LIB: &str = "#[inline]
pub fn fib(n: u64) -> u64 {
    if n < 2 { n } else { fib(n - 1).wrapping_add(fib(n - 2)) }
}
";
    const MAIN: &str = "#[unsafe(no_mangle)]
#[used]
static hotpatch_host_exports_v1: u8 = 0;

mod a {
    #[inline(never)]
    pub fn rate(n: u64) -> u64 { lib::fib(n) + 7 }
}
mod b {
    #[inline(never)]
    pub fn zero(n: u64) -> u64 { lib::fib(n).wrapping_sub(1) }
}
fn main() {
    let n = std::hint::black_box(std::env::args().count() as u64 + 6);
    println!(\"{} {}\", a::rate(n), b::zero(n - 6));
}
";

    /// The executable built from `lib` and `main` in its own directory,
    /// with its objects kept (`-C save-temps`, as the wrapper does).
    struct Exe {
        dir: PathBuf,
    }

    impl Exe {
        fn build(tag: &str, lib: &str, main: &str) -> Exe {
            let dir = std::env::temp_dir().join(format!(
                "cargo-hotpatch-copies-{}-{tag}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("lib.rs"), lib).unwrap();
            std::fs::write(dir.join("main.rs"), main).unwrap();
            let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
            let common = [
                "--edition=2021",
                "-C",
                "opt-level=3",
                "-C",
                "codegen-units=16",
            ];
            let run = |args: &[&str]| {
                let out = Command::new(&rustc)
                    .current_dir(&dir)
                    .args(common)
                    .args(args)
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "rustc: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            };
            run(&[
                "--crate-type=rlib",
                "--crate-name=lib",
                "-o",
                "liblib.rlib",
                "lib.rs",
            ]);
            run(&[
                "--crate-name=svc",
                "--extern",
                "lib=liblib.rlib",
                "-C",
                "save-temps",
                "-o",
                "svc",
                "main.rs",
            ]);
            Exe { dir }
        }

        /// The executable's own objects, `(name, bytes)`.
        fn objects(&self) -> Vec<(String, Vec<u8>)> {
            let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&self.dir)
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("svc.svc.") && n.ends_with(".rcgu.o"))
                .map(|n| {
                    let bytes = std::fs::read(self.dir.join(&n)).unwrap();
                    (n, bytes)
                })
                .collect();
            out.sort();
            out
        }

        fn host(&self) -> Host {
            let path = self.dir.join("svc");
            let data = std::fs::read(&path).unwrap();
            Host::read(&path, &data).unwrap()
        }
    }

    impl Drop for Exe {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn members(objects: &[(String, Vec<u8>)]) -> Vec<(String, &[u8])> {
        objects.iter().map(|(n, b)| (n.clone(), &b[..])).collect()
    }

    fn fib_symbol(b: &Build<'_>) -> String {
        b.by_name
            .keys()
            .find(|n| format!("{:#}", rustc_demangle::demangle(n)) == "lib::fib")
            .expect("the executable's objects define lib::fib")
            .clone()
    }

    /// The demangled path of a symbol, without its hash.
    fn path(n: &str) -> String {
        format!("{:#}", rustc_demangle::demangle(n))
    }

    /// Base and head executables (the head's `fib` changed), their
    /// objects, and the base's host.
    fn builds(tag: &str) -> (Exe, Exe) {
        let base = Exe::build(&format!("{tag}-base"), LIB, MAIN);
        let head = Exe::build(
            &format!("{tag}-head"),
            &LIB.replace("{ n } else", "{ n + 1 } else"),
            MAIN,
        );
        (base, head)
    }

    #[test]
    fn every_local_copy_is_paired_with_its_own_unit_s_new_body() {
        let (base, head) = builds("paired");
        let (bo, ho) = (base.objects(), head.objects());
        let (bm, hm) = (members(&bo), members(&ho));
        let (b, h) = (Build::read(&bm).unwrap(), Build::read(&hm).unwrap());
        let host = base.host();
        let fib = fib_symbol(&b);
        let copies = host.copies_of(&fib);
        assert_eq!(copies.len(), 2, "the premise: two local copies: {copies:?}");
        assert_eq!(copies[0].name, copies[1].name, "under one name");
        assert_ne!(copies[0].unit, copies[1].unit, "of two codegen units");
        // One address is not the function's: a single hook is refused.
        assert!(host.hook_entry(&fib).is_err());
        // The optimiser inlined one level of `fib` into both callers, which
        // changed with it: the comparison puts them in the patch too.
        let callers = ["svc::a::rate", "svc::b::zero"];
        for c in callers {
            let n = b.by_name.keys().find(|n| path(n) == c).unwrap();
            assert_ne!(b.hash(b.by_name[n]), h.hash(h.by_name[n]), "{c} changed");
        }
        let in_patch = |n: &str| callers.contains(&path(n).as_str());
        let hooks = hook_copies(&b, &h, &host, &fib, &in_patch).expect("both copies paired");
        assert_eq!(hooks.len(), 2);
        let mut at: Vec<u64> = hooks.iter().map(|c| c.address).collect();
        at.sort_unstable();
        let mut want: Vec<u64> = copies.iter().map(|c| c.address).collect();
        want.sort_unstable();
        assert_eq!(at, want, "every copy is hooked");
        for c in &hooks {
            // Its new body is the head's copy of its own codegen unit.
            let oi = h.members.iter().position(|m| *m == c.body.0).unwrap();
            assert_eq!(h.unit_name(oi), c.unit);
            assert_eq!(
                h.name_of.get(&(oi, c.body.1)).map(String::as_str),
                Some(crate::source::objects::stem(&fib))
            );
            let deployed = copies.iter().find(|d| d.address == c.address).unwrap();
            assert_eq!(deployed.unit.as_deref(), Some(c.unit.as_str()));
        }
    }

    #[test]
    fn a_copy_whose_caller_compiled_differently_and_stays_refuses_them_all() {
        let (base, head) = builds("refused");
        let (bo, ho) = (base.objects(), head.objects());
        let (bm, hm) = (members(&bo), members(&ho));
        let (b, h) = (Build::read(&bm).unwrap(), Build::read(&hm).unwrap());
        let host = base.host();
        let fib = fib_symbol(&b);
        // `b::zero` compiled differently and is not in the patch: its copy
        // cannot be told to take the new body as it calls it.
        let in_patch = |n: &str| path(n) == "svc::a::rate";
        let why = hook_copies(&b, &h, &host, &fib, &in_patch).expect_err("refused");
        assert!(
            why.contains("svc::b::zero") && why.contains("compiled to other code"),
            "{why}"
        );
    }

    #[test]
    fn a_new_copy_of_the_same_code_in_another_unit_is_no_change() {
        // The head adds a module that calls `fib`: its unit compiles one
        // more copy of `fib`, the same code as the others. No copy's code
        // is new, so `fib` did not change (it was taken for changed when
        // the copies were compared as a list, counts included: the corpus
        // saw drop glue of unchanged types refused that way).
        let base = Exe::build("more-copies-base", LIB, MAIN);
        let main = MAIN.replace(
            "fn main() {",
            "mod c {\n    #[inline(never)]\n    pub fn twice(n: u64) -> u64 { lib::fib(n) * 2 }\n}\nfn main() {\n    println!(\"{}\", c::twice(std::hint::black_box(3)));",
        );
        let head = Exe::build("more-copies-head", LIB, &main);
        let (bo, ho) = (base.objects(), head.objects());
        let (bm, hm) = (members(&bo), members(&ho));
        let (b, h) = (Build::read(&bm).unwrap(), Build::read(&hm).unwrap());
        let fib = fib_symbol(&b);
        let (bc, hc) = (b.copies(&fib).len(), h.copies(&fib).len());
        assert!(hc > bc, "the head has more copies of fib: {bc} -> {hc}");
        let changed: Vec<String> = crate::source::compare::changed_functions(&b, &h)
            .map(|n| path(n))
            .collect();
        assert!(!changed.contains(&"lib::fib".to_owned()), "{changed:?}");
        assert!(changed.contains(&"svc::main".to_owned()), "{changed:?}");
    }
}
