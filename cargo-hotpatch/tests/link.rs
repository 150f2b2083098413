//! `link`, `check_against`, `build_id` and `identity` on patches and
//! hosts built from the fixture workspace (tests/fixture).

mod fixture;

use std::path::Path;

use cargo_hotpatch::{Error, build_id, check_against, identity, link};
use object::{Object, ObjectSection, ObjectSymbol};

fn dynamic(path: &Path) -> (Vec<String>, Vec<String>) {
    let data = std::fs::read(path).unwrap();
    let file = object::File::parse(&*data).unwrap();
    let mut defined = Vec::new();
    let mut undefined = Vec::new();
    for s in file.dynamic_symbols() {
        let name = s.name().unwrap().to_owned();
        if s.is_undefined() {
            if !s.is_weak() {
                undefined.push(name);
            }
        } else {
            defined.push(name);
        }
    }
    (defined, undefined)
}

fn demangled(names: &[String]) -> Vec<String> {
    names
        .iter()
        .map(|n| format!("{:#}", rustc_demangle::demangle(n)))
        .collect()
}

#[test]
fn thin_patch_links_binds_to_the_rdynamic_host_and_names_its_build_id() {
    let out = fixture::scratch("thin_patch").join("patch.so");
    let host = fixture::debug("svc");
    let report = link(&fixture::rlib("patch"), &host, &out).unwrap();

    assert_eq!(report.output, out);
    assert_eq!(report.size, std::fs::metadata(&out).unwrap().len());
    check_against(&out, &host).unwrap();

    let id = build_id(&host).unwrap();
    assert_eq!(report.host_build_id, cargo_hotpatch::hex(&id));
    assert_eq!(identity(&std::fs::read(&out).unwrap()), Some(id));

    // Only the manifest is exported; the service, std and the dependency
    // stay undefined, bound to the host.
    let (defined, undefined) = dynamic(&out);
    assert_eq!(defined, ["hotpatch_manifest_v1"]);
    let names = demangled(&undefined);
    for wanted in [
        "svc::price",
        "std::io::stdio::_print",
        "alloc::fmt::format::format_inner",
    ] {
        assert!(
            names.iter().any(|n| n == wanted),
            "{wanted} not imported: {names:?}"
        );
    }
    let (exported, _) = dynamic(&host);
    let in_host = undefined.iter().filter(|n| exported.contains(n)).count();
    assert_eq!(report.bound_to_host, in_host);
    assert_eq!(
        report.bound_to_host + report.bound_to_system,
        undefined.len()
    );
    assert!(
        report.bound_to_system >= 1,
        "memcpy or _Unwind_Resume: {report:?}"
    );

    // The crate's own objects, and none of std's code.
    let rlib = std::fs::read(fixture::rlib("patch")).unwrap();
    let members = object::read::archive::ArchiveFile::parse(&*rlib)
        .unwrap()
        .members()
        .filter(|m| m.as_ref().unwrap().name().ends_with(b".rcgu.o"))
        .count();
    assert_eq!(report.objects, members);
    let data = std::fs::read(&out).unwrap();
    let file = object::File::parse(&*data).unwrap();
    let own: Vec<String> = file
        .symbols()
        .filter(|s| !s.is_undefined())
        .filter_map(|s| rustc_demangle::try_demangle(s.name().ok()?).ok())
        .map(|d| format!("{d:#}"))
        .collect();
    assert!(
        !own.iter()
            .any(|n| n.starts_with("std::") || n.starts_with("svc::")),
        "{own:?}"
    );
    // This hand-made patch has no `#[patch]` records: it replaces nothing
    // the tool can name (tests/thin_service.rs checks a real one's list).
    assert!(report.functions.is_empty(), "{:?}", report.functions);
}

#[test]
fn linkme_sections_and_the_manifest_survive_gc_sections() {
    let out = fixture::scratch("linkme").join("patch.so");
    link(&fixture::rlib("patch"), &fixture::debug("svc"), &out).unwrap();
    let data = std::fs::read(&out).unwrap();
    let file = object::File::parse(&*data).unwrap();
    let section = file
        .section_by_name("linkme_PATCH_FNS")
        .expect("linkme section kept");
    assert_eq!(section.size(), 8, "one fn pointer");
    // The function only that section reaches is in, with its call to the
    // host.
    let (_, undefined) = dynamic(&out);
    assert!(
        demangled(&undefined).iter().any(|n| n == "extra::used"),
        "{undefined:?}"
    );
    assert!(
        file.symbols()
            .any(|s| s.name() == Ok("hotpatch_manifest_v1") && !s.is_undefined())
    );
}

#[test]
fn patch_stack_is_not_executable() {
    let out = fixture::scratch("stack").join("patch.so");
    link(&fixture::rlib("patch"), &fixture::debug("svc"), &out).unwrap();
    let data = std::fs::read(&out).unwrap();
    use object::read::elf::ProgramHeader;
    let file = object::read::elf::ElfFile64::<object::Endianness>::parse(&*data).unwrap();
    let endian = file.endian();
    let stack = file
        .elf_program_headers()
        .iter()
        .find(|p| p.p_type(endian) == object::elf::PT_GNU_STACK)
        .expect("a PT_GNU_STACK header");
    assert_eq!(
        stack.p_flags(endian) & object::elf::PF_X,
        0,
        "executable stack"
    );
}

/// A host without `-rdynamic` keeps its symbol table (`.symtab`), which
/// the runtime binds a patch to (issue 22): the tool does not refuse it
/// for want of exports. Stripped too, it has nothing to bind to: refused,
/// saying both ways out, and nothing is left behind.
#[test]
fn stripped_host_without_rdynamic_is_refused_naming_the_settings() {
    let dir = fixture::scratch("plain");
    let out = dir.join("patch.so");
    match link(&fixture::rlib("patch"), &fixture::debug("svc-plain"), &out) {
        Err(Error::HostNotExported { .. }) => {
            panic!("a host with its symbol table is not refused for want of exports")
        }
        // Bound through its symbol table, or refused naming what the
        // binary lacks (a debug build shares generic instantiations that
        // only an exporting binary keeps).
        Ok(_) | Err(Error::MissingSymbols { .. }) => {}
        Err(e) => panic!("{e:?}"),
    }
    let _ = std::fs::remove_file(&out);

    let stripped = dir.join("svc-stripped");
    let status = std::process::Command::new("strip")
        .arg("-o")
        .arg(&stripped)
        .arg(fixture::debug("svc-plain"))
        .status()
        .expect("run strip");
    assert!(status.success());
    let err = link(&fixture::rlib("patch"), &stripped, &out).unwrap_err();
    assert!(matches!(err, Error::HostNotExported { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("svc-stripped"), "{msg}");
    assert!(msg.contains("symbol table"), "{msg}");
    assert!(
        msg.contains(r#"println!("cargo::rustc-link-arg-bins=-rdynamic");"#),
        "{msg}"
    );
    assert!(msg.contains("build.rs"), "{msg}");
    assert_eq!(
        fixture::listing(&dir),
        vec!["svc-stripped".to_owned()],
        "nothing left behind"
    );

    // The same patch linked for the right host is refused by the other.
    let good = dir.join("good.so");
    link(&fixture::rlib("patch"), &fixture::debug("svc"), &good).unwrap();
    let err = check_against(&good, &stripped).unwrap_err();
    assert!(matches!(err, Error::HostNotExported { .. }), "{err:?}");
}

#[test]
fn symbol_the_host_lacks_is_refused_demangled_and_an_older_file_is_kept() {
    let dir = fixture::scratch("lonely");
    let out = dir.join("lonely.so");
    std::fs::write(&out, b"the previous patch").unwrap();
    let err = link(&fixture::rlib("lonely_patch"), &fixture::debug("svc"), &out).unwrap_err();
    let Error::MissingSymbols { symbols, patch, .. } = &err else {
        panic!("{err:?}");
    };
    assert_eq!(patch, &out, "named as the file asked for");
    let names: Vec<&str> = symbols.iter().map(|s| s.demangled.as_str()).collect();
    assert_eq!(names, ["lonely::lonely"]);
    assert!(!symbols[0].other_build_in_host);
    let msg = err.to_string();
    assert!(msg.contains("`lonely::lonely`"), "{msg}");
    assert!(msg.contains("never uses them"), "{msg}");
    assert!(msg.contains("other features or another profile"), "{msg}");
    assert_eq!(std::fs::read(&out).unwrap(), b"the previous patch");
    assert_eq!(
        fixture::listing(&dir),
        ["lonely.so"],
        "no temporary file left"
    );
}

#[test]
fn a_host_built_with_other_features_has_another_build_of_the_symbols() {
    let out = fixture::scratch("features").join("patch.so");
    link(&fixture::rlib("patch"), &fixture::debug("svc"), &out).unwrap();
    let err = check_against(&out, &fixture::alt_host()).unwrap_err();
    let Error::MissingSymbols { symbols, .. } = &err else {
        panic!("{err:?}");
    };
    let price = symbols
        .iter()
        .find(|s| s.demangled == "svc::price")
        .unwrap_or_else(|| panic!("{symbols:?}"));
    assert!(price.other_build_in_host, "{price:?}");
    assert!(
        err.to_string()
            .contains("`svc::price` (the host has another build of it)"),
        "{err}"
    );
    // std is the same build in both: only the service's crates differ.
    assert!(
        !symbols.iter().any(|s| s.demangled.starts_with("std::")),
        "{symbols:?}"
    );
}

#[test]
fn crate_without_manifest_is_refused() {
    let dir = fixture::scratch("nomani");
    let err = link(
        &fixture::rlib("nomani"),
        &fixture::debug("svc"),
        &dir.join("n.so"),
    )
    .unwrap_err();
    assert!(matches!(err, Error::NoManifest { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("libnomani.rlib") && msg.contains("hotpatch::manifest!()"),
        "{msg}"
    );
    assert_eq!(fixture::listing(&dir), Vec::<String>::new());
}

#[test]
fn global_allocator_is_refused() {
    let dir = fixture::scratch("palloc");
    let err = link(
        &fixture::rlib("palloc"),
        &fixture::debug("svc"),
        &dir.join("p.so"),
    )
    .unwrap_err();
    let Error::GlobalAllocator { symbol, .. } = &err else {
        panic!("{err:?}");
    };
    assert!(symbol.starts_with("__rustc::__rust_"), "{symbol}");
    assert!(err.to_string().contains("#[global_allocator]"), "{err}");
    assert_eq!(fixture::listing(&dir), Vec::<String>::new());
}

#[test]
fn lto_bitcode_is_refused_saying_what_to_do() {
    fixture::cargo(&["build", "--lib", "-p", "patch", "--profile", "lto"]);
    let dir = fixture::scratch("lto");
    let rlib = fixture::root().join("target/lto/libpatch.rlib");
    let err = link(&rlib, &fixture::debug("svc"), &dir.join("p.so")).unwrap_err();
    assert!(matches!(err, Error::Bitcode { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("LLVM bitcode") && msg.contains("lto = false"),
        "{msg}"
    );
    assert_eq!(fixture::listing(&dir), Vec::<String>::new());
}

#[test]
fn build_id_is_the_gnu_note_and_a_binary_without_one_is_refused() {
    let host = fixture::debug("svc");
    // The note read by hand: namesz, descsz, type, "GNU\0", desc.
    let data = std::fs::read(&host).unwrap();
    let file = object::File::parse(&*data).unwrap();
    let note = file
        .section_by_name(".note.gnu.build-id")
        .unwrap()
        .data()
        .unwrap();
    let descsz = u32::from_le_bytes(note[4..8].try_into().unwrap()) as usize;
    assert_eq!(
        u32::from_le_bytes(note[8..12].try_into().unwrap()),
        object::elf::NT_GNU_BUILD_ID
    );
    assert_eq!(&note[12..16], b"GNU\0");
    assert_eq!(build_id(&host).unwrap(), &note[16..16 + descsz]);

    let noid = fixture::debug("svc-noid");
    let err = build_id(&noid).unwrap_err();
    assert!(matches!(err, Error::NoBuildId { .. }), "{err:?}");
    assert!(err.to_string().contains("svc-noid"), "{err}");
    let dir = fixture::scratch("noid");
    let err = link(&fixture::rlib("patch"), &noid, &dir.join("p.so")).unwrap_err();
    assert!(matches!(err, Error::NoBuildId { .. }), "{err:?}");
    assert_eq!(fixture::listing(&dir), Vec::<String>::new());
}

#[test]
fn missing_files_are_io_errors_naming_them() {
    let dir = fixture::scratch("missing");
    let nope = dir.join("no-such-binary");
    for err in [
        build_id(&nope).unwrap_err(),
        link(&fixture::rlib("patch"), &nope, &dir.join("p.so")).unwrap_err(),
        check_against(&nope, &fixture::debug("svc")).unwrap_err(),
        link(
            &dir.join("libnope.rlib"),
            &fixture::debug("svc"),
            &dir.join("p.so"),
        )
        .unwrap_err(),
    ] {
        assert!(matches!(err, Error::Io { .. }), "{err:?}");
        assert!(!err.is_refusal());
        assert!(
            err.to_string().contains("no-such-binary") || err.to_string().contains("libnope.rlib"),
            "{err}"
        );
    }
    assert_eq!(fixture::listing(&dir), Vec::<String>::new());
}
