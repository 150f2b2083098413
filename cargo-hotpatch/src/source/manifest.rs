//! Step 11: the patch's manifest (`hotpatch::manifest!()`), compiled
//! against the head's own hotpatch crate: the name, version and
//! description the runtime lists, the patch's panic counter, and, when
//! the patch hooks, the personality routine that counts the panics of
//! the hooked functions' new bodies on it.

use std::ffi::OsString;
use std::path::Path;
use std::process::Command;

use super::SourceOptions;
use super::classify::Plan;
use super::git::{Revisions, git};
use super::sides::Artifacts;
use super::workspace::Workspace;
use crate::BuildError;
use crate::error::io;

/// What the runtime lists a patch as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Label {
    pub name: String,
    pub version: String,
    pub description: String,
}

/// The patch's name, version and description: the options', else made
/// from the head, so two fixes of one service never share a name: the
/// name is the package and the head's short commit hash (the working
/// tree: `HEAD`'s, `-dirty` and a digest of the changed files), the
/// version the base and the same tag, the description the head commit's
/// subject and what the patch replaces.
pub(super) fn label(
    ws: &Workspace,
    opts: &SourceOptions,
    revs: &Revisions,
    files: &[String],
    plan: &Plan,
) -> Result<Label, BuildError> {
    check(opts)?;
    let (tag, subject) = match &revs.head_commit {
        Some(commit) => (commit[..12].to_owned(), revs.subject(commit)),
        None => {
            let head = git(&revs.repo, &["rev-parse", "HEAD"]).ok();
            let short = head
                .as_deref()
                .map_or("working-tree", |h| &h[..12.min(h.len())]);
            let subject = head.as_deref().map(|h| revs.subject(h)).unwrap_or_default();
            (
                format!("{short}-dirty.{:08x}", digest(&ws.root, files)),
                format!("uncommitted changes on {short} ({subject})"),
            )
        }
    };
    let mut hooked: Vec<String> = plan
        .hooked
        .iter()
        .map(|h| super::describe(&h.symbol))
        .collect();
    // A function hooked in several crates' copies is named once.
    hooked.sort();
    hooked.dedup();
    let names: Vec<&str> = plan
        .replaced
        .iter()
        .map(|(_, e)| e.path.as_str())
        .chain(hooked.iter().map(String::as_str))
        .collect();
    Ok(Label {
        name: opts
            .name
            .clone()
            .unwrap_or_else(|| format!("{}-{tag}", ws.package)),
        version: opts
            .version
            .clone()
            .unwrap_or_else(|| format!("{}+{tag}", opts.base)),
        description: opts.description.clone().unwrap_or_else(|| {
            format!(
                "{subject} ({} from source: {} -> {}: {})",
                ws.package,
                opts.base,
                revs.head_name,
                names.join(", ")
            )
        }),
    })
}

/// A digest of the changed files' contents in the working tree (a
/// deleted file counts as its name alone).
fn digest(root: &Path, files: &[String]) -> u32 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    for f in files {
        f.hash(&mut h);
        std::fs::read(root.join(f)).ok().hash(&mut h);
    }
    h.finish() as u32
}

/// Refuses an empty `--name` or `--patch-version` (the runtime refuses
/// a patch without a name or version).
pub(super) fn check(opts: &SourceOptions) -> Result<(), BuildError> {
    for (what, value) in [("--name", &opts.name), ("--patch-version", &opts.version)] {
        if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
            return Err(BuildError::Usage(format!("{what} must not be empty")));
        }
    }
    Ok(())
}

/// The manifest's object, for the head build `head`, labelled `label`.
pub(super) fn compile(
    ws: &Workspace,
    head: &Artifacts,
    label: &Label,
    plan: &Plan,
) -> Result<Vec<u8>, BuildError> {
    let hotpatch_rlib = head.hotpatch_rlib.as_deref().ok_or_else(|| {
        BuildError::Tool(format!(
            "the head build of {} did not build the hotpatch crate",
            ws.package
        ))
    })?;
    let hooks = !plan.hooked.is_empty();
    manifest_object(
        &ws.target_dir.join("hotpatch"),
        hotpatch_rlib,
        ws,
        label,
        hooks,
    )
}

/// The counting personality of hooked functions' new bodies (their
/// unwind information names it through `HOOK_PERSONALITY_CELL`): the
/// service's own `rust_eh_personality` decides, and a panic that leaves
/// the body (the cleanup phase goes on to its caller) counts once on the
/// patch's counter, as the drop guard of a counted body counts it. A
/// panic the body catches itself, and a forced unwind (`pthread_exit`),
/// are not counted. `{}` stands for the cell's name.
const HOOK_PERSONALITY: &str = r#"
/// The personality of the hooked functions' new bodies: counts a panic
/// that leaves one.
unsafe extern "C" fn __hotpatch_hook_personality(
    version: i32,
    actions: i32,
    class: u64,
    exception: *mut u8,
    context: *mut u8,
) -> i32 {
    unsafe extern "C" {
        fn rust_eh_personality(
            version: i32,
            actions: i32,
            class: u64,
            exception: *mut u8,
            context: *mut u8,
        ) -> i32;
    }
    // _UA_CLEANUP_PHASE, _UA_FORCE_UNWIND, _URC_CONTINUE_UNWIND.
    const CLEANUP: i32 = 2;
    const FORCE: i32 = 8;
    const CONTINUE: i32 = 8;
    // SAFETY: the unwinder's own arguments, passed on unchanged to the
    // personality the body was compiled for.
    let reason = unsafe { rust_eh_personality(version, actions, class, exception, context) };
    if actions & CLEANUP != 0 && actions & FORCE == 0 && reason == CONTINUE {
        // Relaxed: a statistic, read by `watch` after the fact.
        __HOTPATCH_PANICS.fetch_add(1, ::core::sync::atomic::Ordering::Relaxed);
    }
    reason
}

/// The cell the new bodies' unwind information reads the personality from.
#[unsafe(no_mangle)]
pub static {}: unsafe extern "C" fn(i32, i32, u64, *mut u8, *mut u8) -> i32 =
    __hotpatch_hook_personality;
"#;

/// Compiles the patch's manifest (`hotpatch::manifest!()`) against the
/// head's own hotpatch crate, and returns its object.
fn manifest_object(
    hot: &Path,
    hotpatch_rlib: &Path,
    ws: &Workspace,
    label: &Label,
    hooks: bool,
) -> Result<Vec<u8>, BuildError> {
    let dir = hot.join("manifest");
    std::fs::create_dir_all(&dir).map_err(io(dir.display()))?;
    let mut src = format!(
        "hotpatch::manifest!(name = {:?}, version = {:?}, description = {:?});\n\
         /// What the copied `__hotpatch_counted_*` bodies count on (their\n\
         /// references to `hotpatch::__private::SOURCE_PANICS` read it).\n\
         #[unsafe(no_mangle)]\n\
         pub static {}: &::core::sync::atomic::AtomicU64 = &__HOTPATCH_PANICS;\n",
        label.name,
        label.version,
        label.description,
        super::extract::PANICS_CELL
    );
    if hooks {
        src.push_str(&HOOK_PERSONALITY.replace("{}", super::extract::HOOK_PERSONALITY_CELL));
    }
    let src_path = dir.join("manifest.rs");
    std::fs::write(&src_path, src).map_err(io(src_path.display()))?;
    let obj = dir.join("manifest.o");
    let deps = hotpatch_rlib.parent().unwrap_or(Path::new("."));
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let mut extern_arg = OsString::from("hotpatch=");
    extern_arg.push(hotpatch_rlib);
    let mut dep_arg = OsString::from("dependency=");
    dep_arg.push(deps);
    let out = Command::new(rustc)
        .current_dir(&ws.root)
        .args([
            "--edition",
            "2021",
            "--crate-type",
            "rlib",
            "--crate-name",
            "hotpatch_source_manifest",
            "--emit=obj",
            "-C",
            "codegen-units=1",
            // Optimised, so the generic code it instantiates (linkme's
            // checks format their panics) is its own copy: unoptimised,
            // rustc would name an upstream crate's shared instance, which
            // a release build of the service does not have.
            "-C",
            "opt-level=3",
            "-C",
            "metadata=hotpatch-source-manifest",
        ])
        .arg("--extern")
        .arg(extern_arg)
        .arg("-L")
        .arg(dep_arg)
        .arg("-o")
        .arg(&obj)
        .arg(&src_path)
        .output()
        .map_err(io("running rustc"))?;
    if !out.status.success() {
        return Err(BuildError::Tool(format!(
            "compiling the patch's manifest failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    std::fs::read(&obj).map_err(io(obj.display()))
}
