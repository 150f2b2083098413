//! The source lines each function's code came from, read from the DWARF
//! line tables of one build's objects.
//!
//! The wrapper compiles the workspace's libraries with line tables
//! (`-C debuginfo=line-tables-only`, when the profile has no debug info of
//! its own): it adds sections no process maps, and leaves the code as it
//! is (`identity` proves it against the deployed binary). An executable's
//! own crate cannot have them in the deployed build (rustc adds a mapped
//! `.debug_gdb_scripts` section and a load of it in `main`): the wrapper
//! compiles it a second time with them, and [`Lines::mapped`] gives each
//! of its units the lines of that compile's unit whose code is its own. A
//! line table
//! maps each instruction to the file and line it was compiled from,
//! inlined code included: the instructions of a callee inlined into a
//! function carry the callee's lines. So the lines of a function's code say
//! which source it contains, wherever it came from.
//!
//! Objects are relocatable: the address of each sequence of the line
//! program is a relocation against the function's section. The
//! relocations are applied here with the section's index in the high bits
//! of the address, so that each row names its unit.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};

use object::read::{Object, ObjectSection, ObjectSymbol, RelocationTarget, SectionIndex};
use object::{RelocationFlags, elf};

use super::objects::{Build, UnitId};

/// Where the section index goes in a relocated address.
const SECTION_SHIFT: u32 = 40;

/// One build's line tables, by unit: the lines of the workspace's own
/// source files (paths relative to the workspace root), and which units
/// had any row at all (a unit without rows says nothing about its source).
#[derive(Default)]
pub(crate) struct Lines {
    pub by_unit: HashMap<UnitId, BTreeSet<(PathBuf, u64)>>,
    pub described: HashSet<UnitId>,
}

impl Lines {
    /// Reads the line tables of every object of `build`; files under
    /// `root` (or relative, as cargo names a workspace member's files)
    /// are kept, relative to `root`.
    pub fn read(build: &Build<'_>, root: &Path) -> Lines {
        let mut lines = Lines::default();
        for (oi, file) in build.objects.iter().enumerate() {
            // A table that does not read is as if absent: its units are
            // not described, which keeps them strict.
            let _ = read_object(oi, file, root, &mut lines);
        }
        lines
    }

    /// The lines of `kept`'s units, which have none of their own (the
    /// executable's own crate, compiled as deployed: without debug info),
    /// from `lines`, the line tables of `compiled`: the same crate
    /// compiled a second time with line tables (`wrapper::LINES_DIR`). A
    /// unit of `kept` gets the rows of the unit of the same name in the
    /// codegen unit of the same name, and is described, only when the two
    /// units' normalised code is the same ([`Build::hash`]: the bytes with
    /// relocated fields aside, and every relocation): then the rows
    /// describe its very instructions. Any other unit (a name found twice,
    /// code compiled otherwise, as `main`'s, which loads the section rustc
    /// adds to an executable with debug info) is not described, which
    /// keeps it strict.
    pub fn mapped(kept: &Build<'_>, compiled: &Build<'_>, lines: &Lines) -> Lines {
        // Each unit of `compiled` by its codegen unit's and its own name;
        // `None` where a pair of names is not one unit.
        let mut by_names: HashMap<(&str, &str), Option<UnitId>> = HashMap::new();
        for (&unit, name) in &compiled.name_of {
            by_names
                .entry((compiled.unit_name(unit.0), name.as_str()))
                .and_modify(|u| *u = None)
                .or_insert(Some(unit));
        }
        let mut out = Lines::default();
        for (&unit, name) in &kept.name_of {
            if !kept.is_code(unit) {
                continue;
            }
            let Some(&Some(twin)) = by_names.get(&(kept.unit_name(unit.0), name.as_str())) else {
                continue;
            };
            if !lines.described.contains(&twin) || kept.hash(unit) != compiled.hash(twin) {
                continue;
            }
            out.described.insert(unit);
            if let Some(rows) = lines.by_unit.get(&twin) {
                out.by_unit.insert(unit, rows.clone());
            }
        }
        out
    }

    /// Whether the unit's rows name any line of `ranges` (per file,
    /// inclusive line ranges).
    pub fn touches(&self, unit: UnitId, ranges: &HashMap<PathBuf, Vec<(u64, u64)>>) -> bool {
        self.by_unit.get(&unit).is_some_and(|rows| {
            rows.iter().any(|(file, line)| {
                ranges
                    .get(file)
                    .is_some_and(|rs| rs.iter().any(|(a, b)| a <= line && line <= b))
            })
        })
    }
}

/// The bytes of section `name` of `file` with its relocations applied; an
/// address in a code section carries that section's index (plus one) in
/// its bits from [`SECTION_SHIFT`] up, so that it names its unit. `None`
/// if there is no such section.
fn relocated(file: &object::File<'_>, name: &str) -> Option<Vec<u8>> {
    let section = file.section_by_name(name)?;
    let mut data = section.data().ok()?.to_vec();
    for (offset, r) in section.relocations() {
        let RelocationFlags::Elf { r_type } = r.flags() else {
            continue;
        };
        let RelocationTarget::Symbol(si) = r.target() else {
            continue;
        };
        let Ok(sym) = file.symbol_by_index(si) else {
            continue;
        };
        let base = sym.address() as i64 + r.addend();
        let value = match sym.section_index() {
            Some(SectionIndex(s)) if is_code(file, SectionIndex(s)) => {
                ((s as u64 + 1) << SECTION_SHIFT) | (base as u64 & ((1 << SECTION_SHIFT) - 1))
            }
            _ => base as u64,
        };
        let at = offset as usize;
        match r_type {
            elf::R_X86_64_64 if at + 8 <= data.len() => {
                data[at..at + 8].copy_from_slice(&value.to_le_bytes());
            }
            elf::R_X86_64_32 if at + 4 <= data.len() => {
                data[at..at + 4].copy_from_slice(&(value as u32).to_le_bytes());
            }
            _ => {}
        }
    }
    Some(data)
}

fn read_object(
    oi: usize,
    file: &object::File<'_>,
    root: &Path,
    lines: &mut Lines,
) -> Result<(), gimli::Error> {
    let Some(data) = relocated(file, ".debug_line") else {
        return Ok(());
    };
    let strings = |name: &str| {
        file.section_by_name(name)
            .and_then(|s| s.data().ok())
            .unwrap_or(&[])
    };
    let endian = gimli::LittleEndian;
    let debug_str = gimli::DebugStr::new(strings(".debug_str"), endian);
    let debug_line_str = gimli::DebugLineStr::new(strings(".debug_line_str"), endian);
    let debug_line = gimli::DebugLine::new(&data, endian);
    let text =
        |v: gimli::AttributeValue<gimli::EndianSlice<'_, gimli::LittleEndian>>| -> Option<String> {
            let s = match v {
                gimli::AttributeValue::String(s) => s,
                gimli::AttributeValue::DebugStrRef(o) => debug_str.get_str(o).ok()?,
                gimli::AttributeValue::DebugLineStrRef(o) => debug_line_str.get_str(o).ok()?,
                _ => return None,
            };
            Some(String::from_utf8_lossy(s.slice()).into_owned())
        };
    let mut offset = 0usize;
    while offset < data.len() {
        let program = debug_line.program(gimli::DebugLineOffset(offset), 8, None, None)?;
        let header = program.header();
        let next =
            offset + usize::from(header.format().initial_length_size()) + header.unit_length();
        // Each file of the header, as the workspace names it (`None`: not
        // one of the workspace's files).
        let mut names: HashMap<u64, Option<PathBuf>> = HashMap::new();
        let mut rows = program.rows();
        while let Some((header, row)) = rows.next_row()? {
            if row.end_sequence() {
                continue;
            }
            let address = row.address();
            let section = address >> SECTION_SHIFT;
            if section == 0 {
                continue;
            }
            let unit = (oi, SectionIndex((section - 1) as usize));
            lines.described.insert(unit);
            let Some(line) = row.line() else { continue };
            let index = row.file_index();
            let name = names.entry(index).or_insert_with(|| {
                let entry = header.file(index)?;
                let name = text(entry.path_name())?;
                let dir = entry.directory(header).and_then(&text);
                let path = match dir {
                    Some(d) if !Path::new(&name).is_absolute() => Path::new(&d).join(&name),
                    _ => PathBuf::from(&name),
                };
                ours(&path, root)
            });
            if let Some(name) = name {
                lines
                    .by_unit
                    .entry(unit)
                    .or_default()
                    .insert((name.clone(), line.get()));
            }
        }
        if next <= offset {
            break;
        }
        offset = next;
    }
    read_call_sites(oi, file, root, lines)
}

/// Adds to each unit the places its inlined code was called from
/// (`DW_AT_call_file` and `DW_AT_call_line` of every
/// `DW_TAG_inlined_subroutine` under the unit's `DW_TAG_subprogram`, which
/// line tables only keep too). A row names the innermost source of an
/// instruction only: a changed function inlined into a caller whose every
/// instruction comes from a callee of its own (`key.to_string()`, then
/// `String::truncate`, both std's) leaves no row at its own lines, but
/// the calls it makes are call sites at them.
fn read_call_sites(
    oi: usize,
    file: &object::File<'_>,
    root: &Path,
    lines: &mut Lines,
) -> Result<(), gimli::Error> {
    if file.section_by_name(".debug_info").is_none() {
        return Ok(());
    }
    let load = |id: gimli::SectionId| -> Result<Vec<u8>, gimli::Error> {
        Ok(relocated(file, id.name()).unwrap_or_default())
    };
    let sections = gimli::DwarfSections::load(load)?;
    let dwarf = sections.borrow(|s| gimli::EndianSlice::new(s, gimli::LittleEndian));
    let mut units = dwarf.units();
    while let Some(header) = units.next()? {
        let unit = dwarf.unit(header)?;
        let Some(program) = &unit.line_program else {
            continue;
        };
        let header = program.header();
        let text = |v| {
            dwarf
                .attr_string(&unit, v)
                .ok()
                .map(|s| String::from_utf8_lossy(s.slice()).into_owned())
        };
        let mut names: HashMap<u64, Option<PathBuf>> = HashMap::new();
        // The unit of the subprogram each open DIE is in, by depth.
        let mut open: Vec<(isize, UnitId)> = Vec::new();
        let mut depth: isize = 0;
        let mut cursor = unit.entries();
        while let Some((delta, entry)) = cursor.next_dfs()? {
            depth += delta;
            while open.last().is_some_and(|(d, _)| *d >= depth) {
                open.pop();
            }
            match entry.tag() {
                gimli::DW_TAG_subprogram => {
                    if let Some(gimli::AttributeValue::Addr(a)) =
                        entry.attr_value(gimli::DW_AT_low_pc)?
                    {
                        let section = a >> SECTION_SHIFT;
                        if section != 0 {
                            open.push((depth, (oi, SectionIndex((section - 1) as usize))));
                        }
                    }
                }
                gimli::DW_TAG_inlined_subroutine => {
                    let Some(&(_, at)) = open.last() else {
                        continue;
                    };
                    let index = match entry.attr_value(gimli::DW_AT_call_file)? {
                        Some(gimli::AttributeValue::FileIndex(i)) => i,
                        Some(v) => match v.udata_value() {
                            Some(i) => i,
                            None => continue,
                        },
                        None => continue,
                    };
                    let Some(line) = entry
                        .attr_value(gimli::DW_AT_call_line)?
                        .and_then(|v| v.udata_value())
                    else {
                        continue;
                    };
                    let name = names.entry(index).or_insert_with(|| {
                        let entry = header.file(index)?;
                        let name = text(entry.path_name())?;
                        let dir = entry.directory(header).and_then(text);
                        let path = match dir {
                            Some(d) if !Path::new(&name).is_absolute() => Path::new(&d).join(&name),
                            _ => PathBuf::from(&name),
                        };
                        ours(&path, root)
                    });
                    if let Some(name) = name {
                        lines
                            .by_unit
                            .entry(at)
                            .or_default()
                            .insert((name.clone(), line));
                    }
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// `path` relative to the workspace root, if it is a file of the
/// workspace (a relative path: cargo names members' files from the root).
fn ours(path: &Path, root: &Path) -> Option<PathBuf> {
    if path.is_relative() {
        return Some(path.to_owned());
    }
    let rel = path.strip_prefix(root).ok()?;
    // The target directory (code a build script generated) is the
    // workspace's too, but no source diff names it.
    Some(rel.to_owned())
}

fn is_code(file: &object::File<'_>, index: SectionIndex) -> bool {
    file.section_by_index(index).is_ok_and(|s| {
        matches!(s.flags(), object::SectionFlags::Elf { sh_flags } if sh_flags & u64::from(elf::SHF_EXECINSTR) != 0)
    })
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashMap};
    use std::path::{Path, PathBuf};
    use std::process::Command;

    use super::Lines;
    use crate::source::compare::ChangeSite;
    use crate::source::objects::Build;
    use crate::syntax::parse_crate;

    /// A library `svc` with its source in `src/lib.rs`, compiled by rustc
    /// as the wrapper has a workspace library compiled (line tables, one
    /// object), with `flags` on top.
    struct Lib {
        dir: PathBuf,
        object: Vec<u8>,
    }

    impl Lib {
        fn compile(tag: &str, source: &str, flags: &[&str]) -> Lib {
            let dir = std::env::temp_dir()
                .join(format!("cargo-hotpatch-lines-{}-{tag}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.join("src")).unwrap();
            std::fs::write(
                dir.join("Cargo.toml"),
                "[package]\nname = \"svc\"\nversion = \"0.1.0\"\n",
            )
            .unwrap();
            std::fs::write(dir.join("src/lib.rs"), source).unwrap();
            let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
            let out = Command::new(rustc)
                .current_dir(&dir)
                .args([
                    "--edition=2021",
                    "--crate-type=lib",
                    "--crate-name=svc",
                    "--emit=obj",
                    "-C",
                    "opt-level=3",
                    "-C",
                    "codegen-units=1",
                    "-C",
                    "debuginfo=line-tables-only",
                    "-o",
                    "svc.o",
                    "src/lib.rs",
                ])
                .args(flags)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "rustc: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let object = std::fs::read(dir.join("svc.o")).unwrap();
            Lib { dir, object }
        }

        fn build(&self) -> Build<'_> {
            Build::read(&[("svc.o".to_owned(), &self.object[..])]).unwrap()
        }
    }

    impl Drop for Lib {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    const SOURCE: &str = "\
#[inline(always)]
fn weigh(x: u64) -> u64 {
    x.wrapping_mul(31) ^ 7
}

#[no_mangle]
pub fn total(xs: &[u64]) -> u64 {
    xs.iter().map(|x| weigh(*x)).sum()
}

#[no_mangle]
pub fn other(x: u64) -> u64 {
    x.rotate_left(3)
}
";

    fn lines_of(lines: &Lines, build: &Build<'_>, name: &str) -> BTreeSet<u64> {
        let unit = build.by_name[name];
        lines.by_unit[&unit].iter().map(|(_, l)| *l).collect()
    }

    #[test]
    fn a_function_s_lines_include_the_code_inlined_into_it() {
        let lib = Lib::compile("inlined", SOURCE, &[]);
        let build = lib.build();
        let lines = Lines::read(&build, &lib.dir);
        let total = lines_of(&lines, &build, "total");
        // Its own body's line (where the closure is), and `weigh`'s body,
        // inlined.
        assert!(total.contains(&9), "{total:?}");
        assert!(total.contains(&3), "weigh's body is inlined: {total:?}");
        assert!(
            lines.by_unit[&build.by_name["total"]]
                .iter()
                .all(|(f, _)| f == Path::new("src/lib.rs"))
        );
        let other = lines_of(&lines, &build, "other");
        assert!(other.contains(&14) && !other.contains(&3), "{other:?}");
        let ranges = HashMap::from([(PathBuf::from("src/lib.rs"), vec![(2, 4)])]);
        assert!(lines.touches(build.by_name["total"], &ranges));
        assert!(!lines.touches(build.by_name["other"], &ranges));
    }

    /// A function whose inlined code is all its callees' (`to_string`,
    /// std's, inlined in turn) leaves no row at its own lines: the places
    /// it calls them from are its caller's lines all the same.
    #[test]
    fn a_function_s_lines_include_where_its_inlined_code_calls_from() {
        let source = "\
#[inline(always)]
fn named(key: &str) -> String {
    key.to_string()
}

#[no_mangle]
pub fn make(k: &str) -> String {
    named(k)
}
";
        let lib = Lib::compile("call-sites", source, &[]);
        let build = lib.build();
        let lines = Lines::read(&build, &lib.dir);
        let make = lines_of(&lines, &build, "make");
        assert!(make.contains(&3), "named's call of to_string: {make:?}");
        assert!(make.contains(&8), "make's call of named: {make:?}");
        let ranges = HashMap::from([(PathBuf::from("src/lib.rs"), vec![(1, 4)])]);
        assert!(lines.touches(build.by_name["make"], &ranges));
    }

    /// The executable's own crate is compiled as deployed, without line
    /// tables, and a second time with them: a unit gets the second
    /// compile's lines only where its code is the same there. A unit
    /// whose code differs between the two compiles is not described.
    #[test]
    fn a_unit_gets_the_lines_of_its_twin_only_when_their_code_is_the_same() {
        let kept = Lib::compile("kept", SOURCE, &["-C", "debuginfo=0"]);
        let (k, kept_lines) = (kept.build(), Lines::read(&kept.build(), &kept.dir));
        assert!(
            kept_lines.described.is_empty(),
            "the deployed compile has no line tables of its own"
        );
        let same = Lib::compile("twin", SOURCE, &[]);
        let s = same.build();
        let lines = Lines::read(&s, &same.dir);
        let mapped = Lines::mapped(&k, &s, &lines);
        for name in ["total", "other"] {
            let (ku, su) = (k.by_name[name], s.by_name[name]);
            assert_eq!(k.hash(ku), s.hash(su), "{name}: line tables change no code");
            assert!(mapped.described.contains(&ku), "{name} is described");
            assert_eq!(mapped.by_unit[&ku], lines.by_unit[&su], "{name}'s rows");
        }
        let total = lines_of(&mapped, &k, "total");
        assert!(total.contains(&3) && total.contains(&9), "{total:?}");

        // The twin compiled for another CPU: `total`'s code differs there,
        // so its rows describe other instructions: not described (strict).
        let other_cpu = Lib::compile("twin-v3", SOURCE, &["-C", "target-cpu=x86-64-v3"]);
        let o = other_cpu.build();
        let lines = Lines::read(&o, &other_cpu.dir);
        let mapped = Lines::mapped(&k, &o, &lines);
        let total = k.by_name["total"];
        assert_ne!(k.hash(total), o.hash(o.by_name["total"]));
        assert!(!mapped.described.contains(&total));
        assert!(!mapped.by_unit.contains_key(&total));
        for (&unit, name) in &k.name_of {
            if let Some(&twin) = o.by_name.get(name) {
                assert_eq!(
                    mapped.described.contains(&unit),
                    k.is_code(unit) && k.hash(unit) == o.hash(twin),
                    "{name}: described exactly when its code is its twin's"
                );
            }
        }
        // Noise is then never found in it: without lines it is a change.
        let ranges = HashMap::from([(PathBuf::from("src/lib.rs"), vec![(13, 15)])]);
        assert!(!mapped.touches(total, &ranges));
    }

    /// Base and head compiled for different CPUs: every function's code
    /// differs, as a function's code differs when only where it was
    /// compiled changed. A function is noise unless its code (inlined code
    /// included) comes from a changed function's lines.
    #[test]
    fn noise_is_code_that_differs_without_a_changed_line_in_it() {
        let cases = [
            // `other` changed: `total` only compiled differently.
            ("rotate_left(3)", "rotate_left(5)", false, true),
            // `weigh` changed: inlined into `total`, which really changed.
            ("wrapping_mul(31)", "wrapping_mul(37)", true, false),
            // A comment only: neither changed.
            (
                "    x.rotate_left(3)",
                "    // rotate\n    x.rotate_left(3)",
                false,
                false,
            ),
        ];
        for (from, to, total_changed, other_changed) in cases {
            let head_source = SOURCE.replace(from, to);
            let base = Lib::compile("base", SOURCE, &["-C", "target-cpu=x86-64"]);
            let head = Lib::compile("head", &head_source, &["-C", "target-cpu=x86-64-v3"]);
            let (b, h) = (base.build(), head.build());
            assert_ne!(
                b.hash(b.by_name["total"]),
                h.hash(h.by_name["total"]),
                "the CPUs give different code"
            );
            let src = |lib: &Lib| {
                parse_crate(&lib.dir, Path::new("src/lib.rs"))
                    .unwrap()
                    .with_crate_name("svc")
            };
            let ranges = src(&head)
                .changed_fn_lines(&src(&base))
                .expect("bodies only");
            let (bl, hl) = (Lines::read(&b, &base.dir), Lines::read(&h, &head.dir));
            let site = ChangeSite {
                ranges: Some((&ranges.0, &ranges.1)),
                base_lines: &bl,
                head_lines: &hl,
                added_or_removed: &|_| false,
            };
            assert_eq!(
                !site.is_noise(&b, &h, "total"),
                total_changed,
                "total, for {to}"
            );
            if b.hash(b.by_name["other"]) != h.hash(h.by_name["other"]) {
                assert_eq!(
                    !site.is_noise(&b, &h, "other"),
                    other_changed,
                    "other, for {to}"
                );
            }
            // Without line ranges (a change outside functions), nothing is
            // noise.
            let strict = ChangeSite {
                ranges: None,
                base_lines: &bl,
                head_lines: &hl,
                added_or_removed: &|_| false,
            };
            assert!(!strict.is_noise(&b, &h, "total"));
        }
    }

    /// An inherent method added beside a trait's: `measure`'s source is the
    /// same, but its call now resolves to the new method. Its code has no
    /// line of a changed function (the new method is not inlined), yet it
    /// changed: it calls a function the change added.
    #[test]
    fn a_call_that_resolves_to_an_added_function_is_a_change() {
        let base_source = "\
pub trait Size {
    fn size(&self) -> u64;
}

pub struct W(pub u64);

impl Size for W {
    fn size(&self) -> u64 {
        self.0 + 1
    }
}

impl W {}

#[no_mangle]
pub fn measure(w: &W) -> u64 {
    w.size()
}
";
        let head_source = base_source.replace(
            "impl W {}",
            "impl W {\n    #[inline(never)]\n    pub fn size(&self) -> u64 {\n        self.0 + 2\n    }\n}",
        );
        let base = Lib::compile("resolve-base", base_source, &[]);
        let head = Lib::compile("resolve-head", &head_source, &[]);
        let (b, h) = (base.build(), head.build());
        assert_ne!(b.hash(b.by_name["measure"]), h.hash(h.by_name["measure"]));
        let src = |lib: &Lib| {
            parse_crate(&lib.dir, Path::new("src/lib.rs"))
                .unwrap()
                .with_crate_name("svc")
        };
        let (base_src, head_src) = (src(&base), src(&head));
        let ranges = head_src
            .changed_fn_lines(&base_src)
            .expect("functions only");
        let (bl, hl) = (Lines::read(&b, &base.dir), Lines::read(&h, &head.dir));
        let added_or_removed = |symbol: &str| {
            let d = format!("{:#}", rustc_demangle::demangle(symbol));
            base_src.defines(&d) != head_src.defines(&d)
        };
        let site = ChangeSite {
            ranges: Some((&ranges.0, &ranges.1)),
            base_lines: &bl,
            head_lines: &hl,
            added_or_removed: &added_or_removed,
        };
        assert!(
            !site.is_noise(&b, &h, "measure"),
            "measure calls the new W::size"
        );
        // Without knowing what was added, the lines alone would call it
        // noise: the case this rule is for.
        let blind = ChangeSite {
            added_or_removed: &|_| false,
            ..site
        };
        assert!(blind.is_noise(&b, &h, "measure"));
    }
}
