//! Step 3: the changed files, classified before any build: what makes
//! the running build (refused), code (the `.rs` files of the library, of
//! the executable's package and of the workspace's other packages, whose
//! compiled objects then decide, and any file that is not Rust source,
//! which `include_str!` may compile in), and the rest (Rust files of no
//! running code: ignored, with a note).

use std::path::Path;

use super::git::Revisions;
use super::workspace::Workspace;
use crate::{BuildError, Refusal};

/// What changed, by file.
pub(super) struct Changed {
    /// Every changed file (for messages).
    pub files: Vec<String>,
    /// The notes.
    pub notes: Vec<String>,
    /// The other packages of the workspace whose source changed (their
    /// source is checked as the library's is: `findings`).
    pub other_packages: Vec<String>,
}

/// Checks the files that changed between the revisions: a change a patch
/// cannot carry is refused, no change of code is no change.
pub(super) fn check(ws: &Workspace, revs: &Revisions) -> Result<Changed, BuildError> {
    let files = revs.changed_files(ws)?;
    let in_base = |f: &str| revs.in_commit(&revs.base_commit, f);
    let classified = classify(ws, &files, &in_base);
    let (base_name, head_name) = (&revs.base_name, &revs.head_name);
    if files.is_empty() {
        return Err(BuildError::NoChange(format!(
            "{head_name} is the same as the base {base_name}: nothing to patch"
        )));
    }
    if !classified.code && classified.refusals.is_empty() {
        return Err(BuildError::NoChange(format!(
            "no code of {} or of its workspace changed between {base_name} and {head_name} ({})",
            ws.package,
            files.join(", ")
        )));
    }
    if !classified.refusals.is_empty() {
        return Err(BuildError::Refused(classified.refusals));
    }
    Ok(Changed {
        files,
        notes: classified.notes,
        other_packages: classified.other_packages,
    })
}

/// The changed files, classified.
struct Classified {
    refusals: Vec<Refusal>,
    notes: Vec<String>,
    /// Whether code changed: the library's, the executable's or another
    /// package's (the compiled objects decide what runs differently).
    code: bool,
    /// The other packages whose source changed.
    other_packages: Vec<String>,
}

fn classify(ws: &Workspace, files: &[String], in_base: &dyn Fn(&str) -> bool) -> Classified {
    let mut refusals = Vec::new();
    let mut notes = Vec::new();
    let mut ignored: Vec<&str> = Vec::new();
    let mut compiled_in: Vec<&str> = Vec::new();
    let mut code = false;
    let mut other_packages: Vec<String> = Vec::new();
    let lib_dir = match &ws.lib_src {
        Some(src) => src.parent().map(Path::to_owned).unwrap_or_default(),
        None => ws.package_dir.join("src"),
    };
    for f in files {
        let p = Path::new(f);
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let file = f.clone();
        if name == "Cargo.lock" && !in_base(f) {
            // Not committed: the base builds with this one too (see the
            // checkout), and --binary proves it is the deployed build's.
            // (The checkout's note says it.)
            continue;
        }
        if name == "Cargo.toml" || name == "Cargo.lock" {
            refusals.push(Refusal::Manifest { file });
            continue;
        }
        if name == "build.rs"
            || name.starts_with("rust-toolchain")
            || f.starts_with(".cargo/")
            || f.contains("/.cargo/")
        {
            refusals.push(Refusal::BuildConfiguration { file });
            continue;
        }
        let rust = p.extension().is_some_and(|e| e == "rs");
        // The executable's own crate: its objects are compared, its source
        // checked (`findings`).
        if rust
            && (ws.bins.iter().any(|(_, src)| src == p)
                || p.starts_with(ws.package_dir.join("src/bin")))
        {
            code = true;
            continue;
        }
        if p.starts_with(&lib_dir) && rust {
            code = true;
            continue;
        }
        // Another package of the workspace?
        let owner = ws
            .members
            .iter()
            .filter(|(dir, _)| !dir.as_os_str().is_empty() && p.starts_with(dir))
            .max_by_key(|(dir, _)| dir.components().count());
        match owner {
            // The executable's package, or another package's library:
            // their objects are compared (`compare`).
            Some((dir, pkg)) if pkg != &ws.package && rust && p.starts_with(dir.join("src")) => {
                code = true;
                if !other_packages.contains(pkg) {
                    other_packages.push(pkg.clone());
                }
            }
            _ if rust => ignored.push(f.as_str()),
            // Not Rust source, but the library may compile it in
            // (`include_str!`, `include_bytes!`): the compiled code
            // decides, never the file's name.
            _ => {
                code = true;
                compiled_in.push(f.as_str());
            }
        }
    }
    if !compiled_in.is_empty() {
        notes.push(format!(
            "{} changed: not Rust source, but the library may include it (include_str!, include_bytes!): the compiled code decides",
            compiled_in.join(", ")
        ));
    }
    match ignored.as_slice() {
        [] => {}
        [one] => notes.push(format!(
            "{one} changed (not code of the running binary: ignored)"
        )),
        many => notes.push(format!(
            "{} other files changed (not code of the running binary: ignored): {}{}",
            many.len(),
            many.iter().take(5).copied().collect::<Vec<_>>().join(", "),
            if many.len() > 5 { ", ..." } else { "" }
        )),
    }
    Classified {
        refusals,
        notes,
        code,
        other_packages,
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn each_changed_file_is_refused_by_its_rule_or_is_code_or_ignored() {
        let ws = Workspace {
            root: PathBuf::from("/ws"),
            target_dir: PathBuf::from("/ws/target"),
            package: "svc".into(),
            lib_name: "svc".into(),
            lib_src: Some(PathBuf::from("svc/src/lib.rs")),
            host_package: "svc".into(),
            bins: vec![("svc".into(), PathBuf::from("svc/src/main.rs"))],
            package_dir: PathBuf::from("svc"),
            members: vec![
                (PathBuf::from("svc"), "svc".into()),
                (PathBuf::from("util"), "util".into()),
            ],
            other_libs: Vec::new(),
            outside: Some(Vec::new()),
        };
        let files: Vec<String> = [
            "svc/Cargo.toml",
            "Cargo.lock",
            "svc/build.rs",
            ".cargo/config.toml",
            "svc/src/main.rs",
            "svc/src/bin/tool.rs",
            "util/src/lib.rs",
            "svc/src/pricing.rs",
            "svc/tests/api.rs",
            "README.md",
        ]
        .map(String::from)
        .to_vec();
        let c = classify(&ws, &files, &|_| true);
        assert!(c.code, "svc/src/pricing.rs is the library's code");
        let file = |f: &str| f.to_owned();
        assert_eq!(
            c.refusals,
            [
                Refusal::Manifest {
                    file: file("svc/Cargo.toml")
                },
                Refusal::Manifest {
                    file: file("Cargo.lock")
                },
                Refusal::BuildConfiguration {
                    file: file("svc/build.rs")
                },
                Refusal::BuildConfiguration {
                    file: file(".cargo/config.toml")
                },
            ]
        );
        // The executable's crate and another package's library are code:
        // their compiled objects decide.
        assert_eq!(c.other_packages, ["util"]);
        for f in ["svc/src/main.rs", "svc/src/bin/tool.rs", "util/src/lib.rs"] {
            let one = classify(&ws, &[file(f)], &|_| true);
            assert!(one.code && one.refusals.is_empty(), "{f}");
        }
        assert_eq!(
            c.notes,
            [
                "README.md changed: not Rust source, but the library may include it (include_str!, include_bytes!): the compiled code decides",
                "svc/tests/api.rs changed (not code of the running binary: ignored)"
            ]
        );
        // A file the library may include is code until the build says not.
        let c = classify(&ws, &[file("svc/src/page.html")], &|_| true);
        assert!(c.code && c.refusals.is_empty());
        // A lock file the base did not commit is the workspace's: no rule.
        let c = classify(&ws, &[file("Cargo.lock")], &|_| false);
        assert!(c.refusals.is_empty() && c.notes.is_empty() && !c.code);
    }
}
