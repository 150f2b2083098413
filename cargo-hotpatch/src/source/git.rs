//! Step 2: the revisions (`git rev-parse`) and the files that changed
//! between them (`git diff`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use super::SourceOptions;
use super::workspace::Workspace;
use crate::BuildError;
use crate::error::io;

/// The repository and the two revisions.
pub(super) struct Revisions {
    /// The repository's top level.
    pub repo: PathBuf,
    /// The workspace root, relative to the repository.
    pub ws_in_repo: PathBuf,
    pub base_commit: String,
    /// `None`: the working tree.
    pub head_commit: Option<String>,
    /// `REV (COMMIT12)`, for messages.
    pub base_name: String,
    /// `REV (COMMIT12)` or `the working tree`.
    pub head_name: String,
}

/// Runs git in `repo`, its output captured, whether it succeeds or not.
fn run(repo: &Path, args: &[&str]) -> Result<Output, BuildError> {
    Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(io("running git"))
}

/// Runs git in `repo`; its trimmed standard output.
pub(super) fn git(repo: &Path, args: &[&str]) -> Result<String, BuildError> {
    let out = run(repo, args)?;
    if !out.status.success() {
        return Err(BuildError::Tool(format!(
            "`git {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The commit a revision names, or a usage error naming it.
fn commit_of(repo: &Path, rev: &str) -> Result<String, BuildError> {
    let spec = format!("{rev}^{{commit}}");
    let out = run(repo, &["rev-parse", "--verify", "--quiet", &spec])?;
    if !out.status.success() {
        return Err(BuildError::Usage(format!(
            "revision `{rev}` does not exist in {} (a tag, branch or commit of the deployed build)",
            repo.display()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

impl Revisions {
    /// The repository the workspace is in, and the commits `--base` and
    /// `--head` name.
    pub fn resolve(ws: &Workspace, opts: &SourceOptions) -> Result<Revisions, BuildError> {
        let repo = PathBuf::from(git(&ws.root, &["rev-parse", "--show-toplevel"]).map_err(
            |_| {
                BuildError::Usage(format!(
                    "{} is not in a git repository: --base names a git revision of the deployed build",
                    ws.root.display()
                ))
            },
        )?);
        let ws_in_repo = ws
            .root
            .strip_prefix(&repo)
            .map(Path::to_owned)
            .unwrap_or_default();
        let base_commit = commit_of(&repo, &opts.base)?;
        let head_commit = match &opts.head {
            Some(h) => Some(commit_of(&repo, h)?),
            None => None,
        };
        let head_name = match (&opts.head, &head_commit) {
            (Some(h), Some(c)) => format!("{h} ({})", &c[..12.min(c.len())]),
            _ => "the working tree".to_owned(),
        };
        let base_name = format!("{} ({})", opts.base, &base_commit[..12]);
        Ok(Revisions {
            repo,
            ws_in_repo,
            base_commit,
            head_commit,
            base_name,
            head_name,
        })
    }

    /// The subject line of `commit`'s message (empty if git cannot say).
    pub fn subject(&self, commit: &str) -> String {
        git(&self.repo, &["log", "-1", "--format=%s", commit]).unwrap_or_default()
    }

    /// Whether `file` (relative to the workspace root) is in `commit`.
    pub fn in_commit(&self, commit: &str, file: &str) -> bool {
        let spec = format!("{commit}:{}", self.ws_in_repo.join(file).display());
        run(&self.repo, &["cat-file", "-e", &spec]).is_ok_and(|o| o.status.success())
    }

    /// The files of the workspace that differ between base and head
    /// (the working tree: tracked changes and new files), relative to the
    /// workspace root, the target directory's aside; sorted.
    pub fn changed_files(&self, ws: &Workspace) -> Result<Vec<String>, BuildError> {
        let rel = self.ws_in_repo.to_string_lossy().into_owned();
        let pathspec = if rel.is_empty() { "." } else { rel.as_str() };
        let base = self.base_commit.as_str();
        let diff = match &self.head_commit {
            Some(h) => git(
                &self.repo,
                &["diff", "--name-only", base, h, "--", pathspec],
            )?,
            None => {
                let tracked = git(&self.repo, &["diff", "--name-only", base, "--", pathspec])?;
                let new = git(
                    &self.repo,
                    &["ls-files", "--others", "--exclude-standard", "--", pathspec],
                )?;
                format!("{tracked}\n{new}")
            }
        };
        let target_rel = ws
            .target_dir
            .strip_prefix(&ws.root)
            .ok()
            .map(Path::to_owned);
        let mut files: BTreeSet<String> = BTreeSet::new();
        for line in diff.lines().filter(|l| !l.trim().is_empty()) {
            let p = Path::new(line.trim());
            let p = p.strip_prefix(&self.ws_in_repo).unwrap_or(p);
            if target_rel
                .as_ref()
                .is_some_and(|t| !t.as_os_str().is_empty() && p.starts_with(t))
            {
                continue;
            }
            files.insert(p.to_string_lossy().into_owned());
        }
        Ok(files.into_iter().collect())
    }
}
