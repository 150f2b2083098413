//! Step 4: the revisions checked out (`git archive`, never touching the
//! user's tree or `.git`), each once: a finished checkout is kept, so
//! cargo's fingerprints stay valid between runs.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::git::Revisions;
use super::workspace::Workspace;
use crate::BuildError;
use crate::error::io;

/// The workspace roots of the two sides.
pub(super) struct Trees {
    /// The base's checkout.
    pub base: PathBuf,
    /// The head's checkout, or the workspace itself (the working tree).
    pub head: PathBuf,
}

/// Checks out the base, and the head if it is a revision. `notes` gets
/// where the checkouts are when that is not the target directory.
pub(super) fn check_out(
    ws: &Workspace,
    revs: &Revisions,
    progress: &mut dyn FnMut(&str),
    notes: &mut Vec<String>,
) -> Result<Trees, BuildError> {
    let repo = &revs.repo;
    let hot = ws.target_dir.join("hotpatch");
    // Named by the workspace too: the paths are remapped to it, and cargo
    // does not see that in its fingerprints.
    let root_tag = {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        ws.root.hash(&mut h);
        format!("{:08x}", h.finish() as u32)
    };
    // A checkout lives in the target directory, unless a path dependency
    // leads out of the repository (`path = "../hp/hotpatch"`): then it is
    // a sibling of the repository, where the same relative paths lead to
    // the same crates.
    let checkouts = if paths_leave(repo, ws) {
        // Each checkout is a sibling itself: one level deeper, `../x`
        // would not lead where it leads from the repository.
        repo.parent()
            .map(Path::to_owned)
            .unwrap_or_else(|| repo.clone())
    } else {
        hot.join("checkouts")
    };
    let sibling = checkouts != hot.join("checkouts");
    let checkout_dir = |side: &str, commit: &str| {
        if sibling {
            let name = repo
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            checkouts.join(format!(
                ".{name}.hotpatch-{side}-{}-{root_tag}",
                &commit[..12]
            ))
        } else {
            checkouts.join(format!("{side}-{}-{root_tag}", &commit[..12]))
        }
    };
    if sibling {
        notes.push(format!(
            "a path dependency leads out of the repository: the checkouts are beside it in {} (.{}.hotpatch-*), where its relative paths lead to the same crates",
            checkouts.display(),
            repo.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
        ));
    }
    let base_dir = checkout_dir("base", &revs.base_commit);
    progress(&format!(
        "checking out the base {} into {}",
        revs.base_name,
        base_dir.display()
    ));
    checkout(repo, &revs.base_commit, &base_dir)?;
    let inside = |d: &Path| {
        if revs.ws_in_repo.as_os_str().is_empty() {
            d.to_owned()
        } else {
            d.join(&revs.ws_in_repo)
        }
    };
    let base = inside(&base_dir);
    let head = match &revs.head_commit {
        Some(h) => {
            let d = checkout_dir("head", h);
            progress(&format!(
                "checking out the head {} into {}",
                revs.head_name,
                d.display()
            ));
            checkout(repo, h, &d)?;
            inside(&d)
        }
        None => ws.root.clone(),
    };
    Ok(Trees { base, head })
}

/// Checks out `commit` into `dir` (once: a finished checkout is kept, so
/// cargo's fingerprints stay valid between runs).
fn checkout(repo: &Path, commit: &str, dir: &Path) -> Result<(), BuildError> {
    let marker = dir.join(".cargo-hotpatch-commit");
    if std::fs::read_to_string(&marker).is_ok_and(|c| c.trim() == commit) {
        return Ok(());
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(io(dir.display()))?;
    }
    std::fs::create_dir_all(dir).map_err(io(dir.display()))?;
    let mut archive = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["archive", "--format=tar", commit])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(io("running git archive"))?;
    let tar = Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(dir)
        .stdin(archive.stdout.take().expect("piped"))
        .status()
        .map_err(io("running tar"))?;
    let git_ok = archive.wait().map_err(io("git archive"))?.success();
    if !git_ok || !tar.success() {
        return Err(BuildError::Tool(format!(
            "checking out {commit} into {} failed",
            dir.display()
        )));
    }
    std::fs::write(&marker, commit).map_err(io(marker.display()))?;
    Ok(())
}

/// Whether a relative path dependency of a workspace package leads out of
/// the repository (read from the manifests' `path = "..."` values).
fn paths_leave(repo: &Path, ws: &Workspace) -> bool {
    let repo = repo.canonicalize().unwrap_or_else(|_| repo.to_owned());
    for (dir, _) in &ws.members {
        let dir = ws.root.join(dir);
        let Ok(text) = std::fs::read_to_string(dir.join("Cargo.toml")) else {
            continue;
        };
        for line in text.lines() {
            let Some(at) = line.find("path") else {
                continue;
            };
            let rest = line[at + 4..].trim_start();
            let Some(rest) = rest.strip_prefix('=') else {
                continue;
            };
            let rest = rest.trim_start();
            let Some(rest) = rest.strip_prefix('"') else {
                continue;
            };
            let Some(end) = rest.find('"') else { continue };
            // An absolute path leads to the same crate from anywhere.
            if rest[..end].starts_with('/') {
                continue;
            }
            let target = dir.join(&rest[..end]);
            let target = target.canonicalize().unwrap_or(target);
            if !target.starts_with(&repo) {
                return true;
            }
        }
    }
    false
}
