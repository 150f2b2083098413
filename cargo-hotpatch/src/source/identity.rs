//! Steps 2 and 7: the deployed binary, read before any build (an ELF
//! executable with a build-id, a symbol table and hotpatch linked in),
//! and, once the base is rebuilt, proved to be that build: the same bytes
//! in every section the process maps.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use object::{Object, ObjectSection, ObjectSymbol};

use super::git::Revisions;
use crate::error::io;
use crate::{BuildError, Refusal};

/// What the running binary has, from its symbol tables.
pub(super) struct Host {
    /// Names the binary exports (defined, in `.dynsym`).
    pub exported: HashSet<String>,
    /// Every defined symbol's address (`.symtab`).
    pub address: HashMap<String, u64>,
    /// Thread-local symbols.
    pub tls: HashSet<String>,
    /// The address of [`hotpatch_abi::HOST_EXPORTS_SYMBOL`].
    pub anchor: u64,
    /// Each function symbol's address and size (`.symtab`), by name and,
    /// for a `.llvm.<number>` name, by its stem if one symbol has it.
    pub functions: HashMap<String, (u64, u64)>,
    /// The executable sections as mapped: address and bytes.
    pub text: Vec<(u64, Vec<u8>)>,
    /// Stems of `.llvm.<number>` names several function symbols share.
    pub ambiguous: HashSet<String>,
    /// The function symbols at each address: more than one where the
    /// compiler merged identical functions (one body, several names).
    pub names_at: HashMap<u64, Vec<String>>,
    /// Every function symbol by its stem (the name without a
    /// `.llvm.<number>` suffix), one entry per address: several where
    /// codegen units compiled local copies of one function (an
    /// `#[inline]` function, drop glue), each under the same name or the
    /// stem with its own suffix.
    pub copies: HashMap<String, Vec<HostCopy>>,
}

/// One local copy of a function in the deployed binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct HostCopy {
    /// Its full symbol name.
    pub name: String,
    pub address: u64,
    pub size: u64,
    /// The codegen unit it came from (the `STT_FILE` symbol the linker
    /// writes before each object's local symbols), for a local symbol.
    pub unit: Option<String>,
}

/// The deployed binary (`--binary`), read once: its bytes, build-id and
/// symbols serve every check.
pub(super) struct Deployed {
    path: PathBuf,
    data: Vec<u8>,
    build_id: Vec<u8>,
    host: Host,
}

impl Deployed {
    /// Reads `--binary`, if given.
    pub fn read(binary: Option<&Path>) -> Result<Option<Deployed>, BuildError> {
        let Some(b) = binary else {
            return Ok(None);
        };
        if !b.is_file() {
            return Err(BuildError::Io(format!(
                "{}: no such file (--binary)",
                b.display()
            )));
        }
        let data = crate::elf::read(b)?;
        let build_id = crate::elf::parse(b, &data).and_then(|f| crate::elf::build_id_of(b, &f))?;
        let host = Host::read(b, &data)?;
        Ok(Some(Deployed {
            path: b.to_owned(),
            data,
            build_id,
            host,
        }))
    }
}

/// The host the patch is bound to, and its path: the deployed binary once
/// it is proved to be the rebuilt base `base_bin`, else the base's.
pub(super) fn bind(
    base_bin: &Path,
    deployed: Option<Deployed>,
    revs: &Revisions,
) -> Result<(Host, PathBuf), BuildError> {
    let base_data = std::fs::read(base_bin).map_err(io(base_bin.display()))?;
    let Some(deployed) = deployed else {
        return Ok((Host::read(base_bin, &base_data)?, base_bin.to_owned()));
    };
    let ours = code_identity(&base_data)
        .map_err(|e| BuildError::Io(format!("{}: {e}", base_bin.display())))?;
    let theirs = code_identity(&deployed.data)
        .map_err(|e| BuildError::Io(format!("{}: {e}", deployed.path.display())))?;
    if ours != theirs {
        let base_id = crate::elf::parse(base_bin, &base_data)
            .and_then(|f| crate::elf::build_id_of(base_bin, &f))
            .map(|b| crate::hex(&b))
            .unwrap_or_else(|_| "none".into());
        return Err(BuildError::Refused(vec![Refusal::NotTheBase {
            deployed_id: crate::hex(&deployed.build_id),
            deployed: deployed.path,
            base: revs.base_name.clone(),
            base_id,
        }]));
    }
    Ok((deployed.host, deployed.path))
}

/// The hash of every section a process maps, the build-id note aside:
/// two binaries with equal identities run the same code and data.
fn code_identity(data: &[u8]) -> Result<u64, String> {
    use std::hash::{Hash, Hasher};
    let file = object::File::parse(data).map_err(|e| e.to_string())?;
    let mut h = std::hash::DefaultHasher::new();
    for s in file.sections() {
        let object::SectionFlags::Elf { sh_flags } = s.flags() else {
            continue;
        };
        if sh_flags & u64::from(object::elf::SHF_ALLOC) == 0
            || s.kind() == object::SectionKind::Note
        {
            continue;
        }
        s.name().unwrap_or("").hash(&mut h);
        s.address().hash(&mut h);
        s.size().hash(&mut h);
        s.data().unwrap_or_default().hash(&mut h);
    }
    Ok(h.finish())
}

impl Host {
    /// Reads a binary's symbols.
    pub(super) fn read(path: &Path, data: &[u8]) -> Result<Host, BuildError> {
        let file = object::File::parse(data)
            .map_err(|e| BuildError::Io(format!("{}: not an ELF binary: {e}", path.display())))?;
        let mut exported = HashSet::new();
        for s in file.dynamic_symbols() {
            if !s.is_undefined()
                && let Ok(n) = s.name()
            {
                exported.insert(n.to_owned());
            }
        }
        let mut address = HashMap::new();
        let mut stems: HashMap<String, std::collections::BTreeSet<u64>> = HashMap::new();
        let mut tls = HashSet::new();
        let mut any = false;
        let mut functions = HashMap::new();
        let mut fn_stems: HashMap<String, Vec<(u64, u64)>> = HashMap::new();
        let mut names_at: HashMap<u64, Vec<String>> = HashMap::new();
        let mut copies: HashMap<String, Vec<HostCopy>> = HashMap::new();
        let mut full_names: HashMap<String, std::collections::BTreeSet<u64>> = HashMap::new();
        // The object the local symbols that follow come from.
        let mut unit: Option<String> = None;
        for s in file.symbols() {
            any = true;
            if s.kind() == object::SymbolKind::File {
                unit = s.name().ok().map(str::to_owned);
                continue;
            }
            if s.is_undefined() || s.kind() == object::SymbolKind::Section {
                continue;
            }
            if let Ok(n) = s.name() {
                if s.kind() == object::SymbolKind::Text && s.size() > 0 {
                    full_names
                        .entry(n.to_owned())
                        .or_default()
                        .insert(s.address());
                    let list = copies
                        .entry(super::objects::stem(n).to_owned())
                        .or_default();
                    if !list.iter().any(|c| c.address == s.address()) {
                        list.push(HostCopy {
                            name: n.to_owned(),
                            address: s.address(),
                            size: s.size(),
                            unit: (!s.is_global()).then(|| unit.clone()).flatten(),
                        });
                    }
                    let stem = super::objects::stem(n).to_owned();
                    let names = names_at.entry(s.address()).or_default();
                    if !names.contains(&stem) {
                        names.push(stem);
                    }
                    functions
                        .entry(n.to_owned())
                        .or_insert((s.address(), s.size()));
                    let stem = super::objects::stem(n);
                    if stem != n {
                        fn_stems
                            .entry(stem.to_owned())
                            .or_default()
                            .push((s.address(), s.size()));
                    }
                }
                if s.kind() == object::SymbolKind::Tls {
                    tls.insert(n.to_owned());
                }
                address.entry(n.to_owned()).or_insert(s.address());
                let stem = super::objects::stem(n);
                if stem != n {
                    stems
                        .entry(stem.to_owned())
                        .or_default()
                        .insert(s.address());
                }
            }
        }
        // A local function another codegen unit called is named with a
        // `.llvm.<number>` suffix, which the head's build numbers its own
        // way: the head's code names it by its stem, found here if one
        // symbol has it.
        for (stem, at) in stems {
            if let (1, Some(a)) = (at.len(), at.first()) {
                address.entry(stem).or_insert(*a);
            }
        }
        let mut ambiguous = HashSet::new();
        // A name several local functions have (each codegen unit's own
        // copy): no one address is the function's.
        for (name, at) in full_names {
            if at.len() > 1 {
                functions.remove(&name);
                ambiguous.insert(name);
            }
        }
        for (stem, mut at) in fn_stems {
            at.sort_unstable();
            at.dedup();
            if let [one] = at[..] {
                functions.entry(stem).or_insert(one);
            } else if !functions.contains_key(&stem) {
                ambiguous.insert(stem);
            }
        }
        let text = file
            .sections()
            .filter(|s| {
                matches!(s.flags(), object::SectionFlags::Elf { sh_flags }
                    if sh_flags & u64::from(object::elf::SHF_EXECINSTR) != 0)
            })
            .filter_map(|s| Some((s.address(), s.data().ok()?.to_vec())))
            .collect();
        if !any {
            return Err(BuildError::Refused(vec![Refusal::Stripped {
                binary: path.to_owned(),
            }]));
        }
        let anchor = *address
            .get(hotpatch_abi::HOST_EXPORTS_SYMBOL)
            .ok_or_else(|| {
                BuildError::Refused(vec![Refusal::NoHotpatch {
                    binary: path.to_owned(),
                }])
            })?;
        Ok(Host {
            exported,
            address,
            tls,
            anchor,
            functions,
            text,
            ambiguous,
            names_at,
            copies,
        })
    }

    /// The copies of the function `symbol` (by its stem) in the deployed
    /// binary: more than one where codegen units compiled their own.
    pub fn copies_of(&self, symbol: &str) -> &[HostCopy] {
        self.copies
            .get(super::objects::stem(symbol))
            .map_or(&[], Vec::as_slice)
    }

    /// Whether the binary has no function of this name at all: nothing it
    /// runs is a copy of it (the linker dropped it, or every copy was
    /// inlined, into callers that are compared on their own).
    pub fn lacks_function(&self, symbol: &str) -> bool {
        !self.functions.contains_key(symbol)
            && !self.ambiguous.contains(symbol)
            && !self.address.contains_key(symbol)
    }

    /// The function `symbol` of the binary (its address), and the bytes a
    /// hook replaces at its entry, by the rules the loader applies
    /// (`hotpatch-entry`); `Err` says why its entry cannot be redirected.
    pub fn hook_entry(&self, symbol: &str) -> Result<(u64, Vec<u8>), String> {
        if self.ambiguous.contains(symbol) {
            return Err("several functions of the deployed binary have this name".into());
        }
        let &(addr, size) = self
            .functions
            .get(symbol)
            .ok_or("the deployed binary's symbol table has no function of this name")?;
        self.hook_entry_at(symbol, addr, size)
    }

    /// [`Host::hook_entry`] of the function `symbol` at `addr` (`size`
    /// bytes): one copy of several.
    pub fn hook_entry_at(
        &self,
        symbol: &str,
        addr: u64,
        size: u64,
    ) -> Result<(u64, Vec<u8>), String> {
        let code = self
            .text
            .iter()
            .find_map(|(start, bytes)| {
                let off = addr.checked_sub(*start)? as usize;
                bytes.get(off..off.checked_add(size as usize)?)
            })
            .ok_or("its code is not in an executable section of the deployed binary")?;
        // One body under several names (the compiler merged identical
        // functions): a hook would redirect the others too.
        if let Some(others) = self.names_at.get(&addr)
            && let Some(other) = others
                .iter()
                .find(|n| n.as_str() != super::objects::stem(symbol))
        {
            return Err(format!(
                "the deployed binary's code at its address is also {} (the compiler merged identical functions): a hook would change that function too",
                super::describe(other)
            ));
        }
        let entry = hotpatch_entry::entry(code, addr).map_err(|e| e.to_string())?;
        Ok((addr, entry.bytes))
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::Host;

    /// An executable built by rustc at `-O` from `source`, read as a host.
    fn host(tag: &str, source: &str) -> Host {
        let dir = std::env::temp_dir().join(format!(
            "cargo-hotpatch-identity-{}-{tag}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("main.rs"), source).unwrap();
        let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
        let out = Command::new(rustc)
            .current_dir(&dir)
            .args([
                "--edition=2021",
                "--crate-name=svc",
                "-C",
                "opt-level=3",
                "-o",
                "svc",
                "main.rs",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "rustc: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bin = dir.join("svc");
        let data = std::fs::read(&bin).unwrap();
        let host = Host::read(&bin, &data).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        host
    }

    /// Two exported functions with the same body are one body under two
    /// names after the compiler merges them: a hook of one would redirect
    /// the other's callers too, so it is refused, naming the other. (An
    /// internal function merged away leaves no name; its callers then
    /// name the other function, and `classify::callers_agree` sees them
    /// compile differently once the bodies differ.) A function of its own
    /// is eligible.
    #[test]
    fn a_body_the_compiler_merged_with_another_function_is_not_hooked() {
        let h = host(
            "merged",
            r#"
#[no_mangle]
#[used]
static hotpatch_host_exports_v1: u8 = 0;

#[no_mangle]
#[inline(never)]
pub extern "C" fn twin_a(x: u64) -> u64 { x.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29) ^ x }
#[no_mangle]
#[inline(never)]
pub extern "C" fn twin_b(x: u64) -> u64 { x.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29) ^ x }
#[inline(never)]
pub fn alone(x: u64) -> u64 { x.wrapping_mul(0x1234_5678_9abc_def1).rotate_left(7) ^ (x >> 3) }

fn main() {
    let n = std::env::args().count() as u64;
    let f: [extern "C" fn(u64) -> u64; 2] = [twin_a, twin_b];
    for g in f { println!("{}", std::hint::black_box(g)(n)); }
    println!("{}", std::hint::black_box(alone as fn(u64) -> u64)(n));
}
"#,
        );
        let symbol = |part: &str| {
            h.functions
                .keys()
                .find(|n| n.contains(part))
                .unwrap_or_else(|| panic!("no symbol with {part}"))
                .clone()
        };
        let (a, b) = (symbol("twin_a"), symbol("twin_b"));
        assert_eq!(
            h.functions[&a].0, h.functions[&b].0,
            "the premise: rustc -O merges the two bodies"
        );
        let why = h.hook_entry(&a).expect_err("refused");
        assert!(
            why.contains("merged identical functions") && why.contains("twin_b"),
            "{why}"
        );
        let (_, entry) = h
            .hook_entry(&symbol("alone"))
            .expect("a function of its own");
        assert!(entry.len() >= 5);
    }
}
