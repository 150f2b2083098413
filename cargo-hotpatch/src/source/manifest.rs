//! Step 11: the patch's manifest (`hotpatch::manifest!()`), compiled
//! against the head's own hotpatch crate: the name, version and
//! description the runtime lists, and the patch's panic counter.

use std::ffi::OsString;
use std::path::Path;
use std::process::Command;

use super::classify::Plan;
use super::entries::EntryInfo;
use super::sides::Artifacts;
use super::workspace::Workspace;
use crate::BuildError;
use crate::error::io;

/// The manifest's object, for the head build `head` of the plan.
pub(super) fn compile(
    ws: &Workspace,
    head: &Artifacts,
    base: &str,
    head_name: &str,
    plan: &Plan,
) -> Result<Vec<u8>, BuildError> {
    let hotpatch_rlib = head.hotpatch_rlib.as_deref().ok_or_else(|| {
        BuildError::Tool(format!(
            "the head build of {} did not build the hotpatch crate",
            ws.package
        ))
    })?;
    manifest_object(
        &ws.target_dir.join("hotpatch"),
        hotpatch_rlib,
        ws,
        base,
        head_name,
        &plan.replaced,
    )
}

/// Compiles the patch's manifest (`hotpatch::manifest!()`) against the
/// head's own hotpatch crate, and returns its object.
fn manifest_object(
    hot: &Path,
    hotpatch_rlib: &Path,
    ws: &Workspace,
    base: &str,
    head: &str,
    replaced: &[(String, EntryInfo)],
) -> Result<Vec<u8>, BuildError> {
    let dir = hot.join("manifest");
    std::fs::create_dir_all(&dir).map_err(io(dir.display()))?;
    let names: Vec<&str> = replaced.iter().map(|(_, e)| e.path.as_str()).collect();
    let description = format!(
        "{} from source: {base} -> {head}: {}",
        ws.package,
        names.join(", ")
    );
    // The version names the base and the head: `v1.4.2+3f2a1c09e6b1`,
    // `v1.4.2+working-tree`.
    let head_tag = head
        .split_once('(')
        .and_then(|(_, c)| c.strip_suffix(')'))
        .map(str::to_owned)
        .unwrap_or_else(|| "working-tree".to_owned());
    let src = format!(
        "hotpatch::manifest!(name = {:?}, version = {:?}, description = {:?});\n\
         /// What the copied `__hotpatch_counted_*` bodies count on (their\n\
         /// references to `hotpatch::__private::SOURCE_PANICS` read it).\n\
         #[unsafe(no_mangle)]\n\
         pub static {}: &::core::sync::atomic::AtomicU64 = &__HOTPATCH_PANICS;\n",
        format!("{}-source-patch", ws.package),
        format!("{base}+{head_tag}"),
        description,
        super::extract::PANICS_CELL
    );
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
