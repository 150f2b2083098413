//! `cargo hotpatch build --base REV`: a patch from the service's own
//! source, for the build that is deployed. [`build_from_source`] is the
//! pipeline; each step is a file of this module:
//!
//! 1. `workspace`: the service package in its workspace (`cargo
//!    metadata`), and the package of the deployed executable (`--bin`,
//!    `--binary`'s file name): the service package or another one.
//! 2. `git`: the base and head commits and the files that changed between
//!    them; `identity` reads the deployed binary (`--binary`) before any
//!    build: an ELF executable with a build-id, a symbol table and
//!    hotpatch linked in.
//! 3. `files`: the changed files classified: `Cargo.toml`, a build script
//!    or the toolchain are refused; the source of the library, of the
//!    executable's crate and of the workspace's other packages is code,
//!    which the compiled objects judge; no change of code is no change.
//! 4. `checkout`: the base revision checked out (`git archive`, into the
//!    target directory: the user's tree and `.git` are untouched), and the
//!    head if it is a revision (else it is the working tree).
//! 5. `findings`: the source of both sides compared (module `syntax`):
//!    the library's, the deployed executable's crate's and each changed
//!    other package's library's. A type's layout, a static or a patchable
//!    signature is refused before any build, naming the file.
//! 6. `sides`: the base built as deployed (the same toolchain,
//!    `Cargo.lock` with `--locked`, profile, features and flags), and the
//!    head the same way, in one target directory (the base's outputs kept
//!    for later runs against the same base). Every build
//!    runs rustc through `wrapper`, which remaps the checkout's paths and
//!    its target directory's (where `OUT_DIR` is) to the workspace's own
//!    (`--remap-path-prefix`: cargo puts a workspace wrapper in the
//!    crates' metadata hash, and so in every symbol name), so the base
//!    builds bit for bit what the workspace builds, debug info included;
//!    the workspace's libraries get line tables (sections no process
//!    maps), and an executable a second compile with them (`lines`).
//!    When a change may need a hook, both sides are built once more in
//!    `target/hotpatch/types` (`sides::type_builds`), the
//!    workspace's crates compiled a second time with full debug
//!    information into `deps/hotpatch-types/`: the layouts of async state
//!    machines that `coroutine` compares (full debug information changes
//!    the code: it is not the deployed build).
//! 7. `identity`: with `--binary`, the deployed binary must be the rebuilt
//!    base: the same bytes in every section the process maps (debug info
//!    and the build-id note aside). Else the patch is refused with both
//!    build-ids.
//! 8. `compare`: the objects of the service's library crate (`objects`)
//!    compared function by function (a function whose code differs
//!    without an instruction from a changed function's lines, by the line
//!    tables `lines` reads, is noise: not a change), paired by name
//!    without the
//!    `.llvm.<number>` suffix of codegen units, constants by content
//!    wherever they are; changed data is refused (`entries` reads the
//!    `#[patchable]` registry entries). The executable's own objects
//!    (kept by `wrapper`) are compared too, and the libraries of the
//!    workspace's other packages: a function that changed there (their
//!    own code, or the library's generic or inline code compiled into
//!    them) is hooked as below, its async state machines compared with
//!    that crate's type information build, or refused by name. The
//!    executable's `main` and the start-up code that calls it
//!    (`startup`) are refused: the process has run them.
//! 9. `classify`: each changed function classified: a `#[patchable]` body
//!    is replaced; any other function is included if every function of
//!    the base that references it is replaced or included (or gone from
//!    the head, its own callers checked in turn), else hooked (its entry
//!    redirected: `classify::hookable`, which `coroutine` and, for a
//!    function the binary has several local copies of, `copies` decide),
//!    else refused with its unpatched callers and why no hook.
//! 10. `extract`: the changed functions written into one object, with a
//!     `PatchFn` record per replaced function, references to everything
//!     else bound to the binary (`riprel` redirects instructions that
//!     reach its private data), and their unwind information
//!     (`extract/eh_frame.rs`; a hooked function's new body, which no
//!     macro wrapped in a counter, unwinds under the patch's counting
//!     personality, so its panics count as a counted body's do).
//! 11. `manifest`: the patch's manifest (and the counting personality,
//!     when it hooks), compiled against the head's own hotpatch crate; linked with the object into a thin patch bound to
//!     the binary (`link.rs`).
//! 12. `report`: what the patch replaces and includes, and where.
//!
//! A refusal is a [`Refusal`](crate::Refusal); every step that can refuse
//! returns all its reasons at once.

mod checkout;
mod classify;
mod compare;
mod copies;
// Called from classification (issue 18: hooking a changed `async fn`).
mod coroutine;
mod entries;
mod extract;
mod files;
mod findings;
mod git;
mod identity;
mod lines;
mod manifest;
pub(crate) mod objects;
mod report;
mod sides;
mod startup;
mod workspace;
pub(crate) mod wrapper;

use std::path::{Path, PathBuf};

use crate::BuildError;

pub use self::report::{Item, SourceReport};

/// What [`build_from_source`] builds.
#[derive(Debug, Clone, Default)]
pub struct SourceOptions {
    /// The service package (`-p`); the workspace's only package if `None`.
    pub package: Option<String>,
    /// The deployed revision.
    pub base: String,
    /// The new revision; the working tree if `None`.
    pub head: Option<String>,
    /// The deployed binary, checked against the rebuilt base.
    pub binary: Option<PathBuf>,
    /// The deployed executable's bin target, in the service package or
    /// another package of the workspace; by default the one named like
    /// `binary`, else the only one.
    pub bin: Option<String>,
    /// Where to write the patch.
    pub output: Option<PathBuf>,
    /// The profile and features the service was deployed with.
    pub flags: crate::CargoFlags,
    /// `--manifest-path`.
    pub manifest_path: Option<PathBuf>,
    /// The patch's name, as the runtime lists it [default: the package
    /// and the head's short commit hash].
    pub name: Option<String>,
    /// The patch's version [default: the base and the head's short
    /// commit hash].
    pub version: Option<String>,
    /// What the patch fixes [default: the head commit's subject and the
    /// functions it replaces].
    pub description: Option<String>,
}

/// Builds a patch from the service's source: the changes from the
/// deployed revision `opts.base` to the head. `progress` gets one line
/// per step.
///
/// # Errors
///
/// [`BuildError`]: a usage error (a revision that does not exist), a
/// failed cargo or git, the refusals (each a [`Refusal`](crate::Refusal)),
/// no change, I/O, or the link's errors. Nothing is written on an error
/// but the checkouts and builds under `target/hotpatch/`.
///
/// # Examples
///
/// ```no_run
/// use cargo_hotpatch::{BuildError, Refusal, SourceOptions, build_from_source};
///
/// let opts = SourceOptions {
///     package: Some("my-service".into()),
///     base: "v1.4.2".into(),
///     binary: Some("/srv/my-service/bin/my-service".into()),
///     output: Some("fix.so".into()),
///     flags: cargo_hotpatch::CargoFlags {
///         release: true,
///         ..Default::default()
///     },
///     ..SourceOptions::default()
/// };
/// match build_from_source(&opts, &mut |step| eprintln!("{step}")) {
///     Ok(report) => {
///         for f in &report.replaced {
///             println!("replaced {}", f.path);
///         }
///     }
///     Err(BuildError::Refused(reasons)) => {
///         for r in &reasons {
///             if let Refusal::StaticChanged { path } = r {
///                 eprintln!("{path} is state: ship it in a release");
///             }
///             eprintln!("refused: {r}");
///         }
///     }
///     Err(e) => eprintln!("{e}"),
/// }
/// ```
pub fn build_from_source(
    opts: &SourceOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<SourceReport, BuildError> {
    manifest::check(opts)?;
    let ws = workspace::Workspace::read(opts)?;
    let revs = git::Revisions::resolve(&ws, opts)?;
    let deployed = identity::Deployed::read(opts.binary.as_deref())?;
    let files::Changed {
        files,
        mut notes,
        other_packages,
    } = files::check(&ws, &revs)?;
    let trees = checkout::check_out(&ws, &revs, progress, &mut notes)?;
    let (base_src, head_src, outside_src) = findings::check(
        &ws,
        &trees,
        ws.deployed_bin(opts),
        &other_packages,
        &mut notes,
    )?;
    // Held until the patch is linked: the head's rlib is read to the end.
    let (base, head, _lock) = sides::build_both(&ws, opts, &revs, &trees, progress, &mut notes)?;
    let base_bin = sides::pick_bin(&ws, opts, &base.bins)?;
    let (host, host_path) = identity::bind(&base_bin, deployed, &revs)?;

    let (base_rlib, head_rlib) = (
        compare::Rlib::read(&base.rlib)?,
        compare::Rlib::read(&head.rlib)?,
    );
    let (b, h) = (base_rlib.objects()?, head_rlib.objects()?);
    // Lines say where a change is only when every changed file is a
    // source file of the library or of a crate whose source was read
    // beside it (a file `include_str!` compiles in, or a module under
    // `#[cfg(test)]`, says nothing by its lines).
    let ranges = files
        .iter()
        .all(|f| {
            let f = Path::new(f);
            base_src.reads(f) || head_src.reads(f) || outside_src.reads(f)
        })
        .then(|| head_src.changed_fn_lines(&base_src))
        .flatten()
        .and_then(|r| outside_src.add_changed_fn_lines(r));
    let (base_lines, head_lines) = (
        lines::Lines::read(&b, &ws.root),
        lines::Lines::read(&h, &ws.root),
    );
    let added_or_removed = |symbol: &str| {
        let d = demangle(symbol);
        base_src.defines(&d) != head_src.defines(&d) || outside_src.added_or_removed(&d)
    };
    let site = compare::ChangeSite {
        ranges: ranges.as_ref().map(|(b, h)| (b, h)),
        base_lines: &base_lines,
        head_lines: &head_lines,
        added_or_removed: &added_or_removed,
    };
    let mut noise = std::collections::BTreeSet::new();
    let comparison = compare::compare(&b, &h, &site, &mut noise);
    let mut refusals = comparison.refusals.clone();
    let mut bin_noise = std::collections::BTreeSet::new();
    // A function outside the library: where the executable's crate or
    // another package defines exactly that path, else the library's
    // generic or inline code.
    let locate_outside = |d: &str| {
        outside_src
            .locate(d)
            .or_else(|| head_src.locate(d).map(|l| l.to_string()))
    };
    let outside = compare::Outside {
        locate: &locate_outside,
        ranges: site.ranges,
        added_or_removed: &added_or_removed,
        root: &ws.root,
    };
    let mut outsides = vec![compare::binary_crate(
        &base_bin,
        &head.bins,
        &outside,
        &mut bin_noise,
    )?];
    outsides.extend(compare::other_libraries(
        &base.others,
        &head.others,
        &outside,
        &mut bin_noise,
    )?);
    // Whether any changed function may be hooked: then the type
    // information of both sides is built (`sides::type_builds`), for the
    // async state machines a hook must keep; else no build pays for it.
    let wants_hooks =
        classify::classify(&b, &h, &host, &comparison, &head_src, None, &mut Vec::new())
            .considered_hooks
            || outsides.iter().any(|(changes, _)| !changes.is_empty());
    let type_builds = match wants_hooks {
        true => Some(sides::type_builds(
            &ws,
            opts,
            &revs,
            &trees,
            base_bin.file_name().unwrap_or_default(),
            progress,
        )?),
        false => None,
    };
    let types_rlibs = match &type_builds {
        Some(t) => Some((
            compare::Rlib::read(&t.lib.0)?,
            compare::Rlib::read(&t.lib.1)?,
        )),
        None => None,
    };
    let types_builds = match &types_rlibs {
        Some((b, h)) => Some((b.objects()?, h.objects()?)),
        None => None,
    };
    let types = types_builds.as_ref().map(|(b, h)| (b, h));
    let mut plan = classify::classify(&b, &h, &host, &comparison, &head_src, types, &mut refusals);
    // The executable's own crate's type information, and each other
    // library's, for their hooks.
    if let Some(t) = &type_builds {
        let read = |files: &[PathBuf]| -> Result<Vec<(String, Vec<u8>)>, BuildError> {
            files
                .iter()
                .map(|p| {
                    let bytes = std::fs::read(p).map_err(crate::error::io(p.display()))?;
                    Ok((p.display().to_string(), bytes))
                })
                .collect()
        };
        let own = |rlib: &Path| -> Result<compare::Objects, BuildError> {
            let r = compare::Rlib::read(rlib)?;
            Ok(r.members()?
                .into_iter()
                .map(|(n, b)| (n, b.to_vec()))
                .collect())
        };
        for (i, (_, objects)) in outsides.iter_mut().enumerate() {
            match &objects.package {
                None if i == 0 && !t.bin.0.is_empty() && !t.bin.1.is_empty() => {
                    objects.types = Some((read(&t.bin.0)?, read(&t.bin.1)?));
                }
                Some(package) => {
                    if let Some((b, h)) = t.other(package) {
                        objects.types = Some((own(b)?, own(h)?));
                    }
                }
                None => {}
            }
        }
    }
    // Code of the service compiled outside its library (its generic or
    // inline code instantiated in the executable's crate or another
    // package): each changed function there is hooked, or refused.
    let mut hook_sources = Vec::new();
    for (changes, objects) in outsides {
        if changes.is_empty() {
            continue;
        }
        let (bm, hm) = (
            compare::OutsideObjects::members(&objects.base),
            compare::OutsideObjects::members(&objects.head),
        );
        let ob = objects::Build::read(&bm).map_err(BuildError::Io)?;
        let oh = objects::Build::read(&hm).map_err(BuildError::Io)?;
        let type_members = objects.types.as_ref().map(|(b, h)| {
            (
                compare::OutsideObjects::members(b),
                compare::OutsideObjects::members(h),
            )
        });
        let type_builds = match &type_members {
            Some((b, h)) => Some((
                objects::Build::read(b).map_err(BuildError::Io)?,
                objects::Build::read(h).map_err(BuildError::Io)?,
            )),
            None => None,
        };
        let types = type_builds.as_ref().map(|(b, h)| (b, h));
        let referrers = ob.referrers();
        // Every changed function there is hooked or the patch refused: a
        // caller among them runs new code.
        let changed: std::collections::HashSet<&str> =
            changes.iter().map(|c| c.symbol.as_str()).collect();
        let in_patch = |n: &str| changed.contains(n);
        let mut hooked_here = false;
        for c in &changes {
            if host.lacks_function(&c.symbol) {
                plan.absent
                    .push((c.symbol.clone(), Some(objects.what.clone())));
                continue;
            }
            let d = demangle(&c.symbol);
            // `main`, and the start-up code that calls it (or a function
            // only that code calls), have run: a hook there changes
            // nothing the process runs again.
            let runs_once = referrers.get(&c.symbol).is_some_and(|callers| {
                !callers.is_empty() && callers.iter().all(|n| startup::runs_main(&demangle(n)))
            });
            if objects.package.is_none()
                && (runs_once || startup::is_startup(&d, objects.crate_name.as_deref()))
            {
                refusals.push(crate::Refusal::StartupCode {
                    function: describe(&c.symbol),
                    at: locate_outside(&d)
                        .map(|l| format!(" ({l})"))
                        .unwrap_or_default(),
                    executable: objects.name.clone(),
                });
                continue;
            }
            let hook = if h.by_name.contains_key(&c.symbol) {
                Err("the library defines a function of the same name".to_owned())
            } else if outside_src.is_patchable(&d) {
                // The loader refuses to hook a patchable function's code:
                // its slot is how it is replaced, and only the library's
                // patchable functions are replaced from source.
                Err("it is #[patchable] code outside the service's library: a patch built from source replaces only the library's patchable functions through their slots, and the loader does not hook one; unmarked, a function here is hooked".to_owned())
            } else {
                classify::hookable((&ob, &referrers), &oh, types, &host, &c.symbol, &in_patch)
            };
            match hook {
                Ok(at) => {
                    hooked_here = true;
                    let own = outside_src.locate(&d);
                    let mut because = vec![match &own {
                        Some(_) => format!("it is a function of {}", objects.what),
                        None => format!("it is compiled into {}", objects.what),
                    }];
                    if objects.package.is_none()
                        && let Some(callers) = referrers.get(&c.symbol)
                        && !callers.is_empty()
                        && callers.iter().all(|n| {
                            startup::is_startup(&demangle(n), objects.crate_name.as_deref())
                        })
                    {
                        because.push(format!(
                            "only {} calls it: its new code runs when main calls it again (main itself was entered before the patch, and is not redirected)",
                            callers.iter().map(|n| describe(n)).collect::<Vec<_>>().join(", ")
                        ));
                    }
                    plan.hooked
                        .extend(classify::Hooked::each(&c.symbol, at, because, own));
                }
                Err(why) => refusals.push(c.refusal.clone().because(why)),
            }
        }
        drop((ob, oh, type_builds));
        if hooked_here {
            hook_sources.push(objects);
        }
    }
    if !refusals.is_empty() {
        crate::refusal::sort_and_dedup(&mut refusals);
        return Err(BuildError::Refused(refusals));
    }
    // A change only in code the deployed binary does not have changes
    // nothing it runs.
    if plan.replaced.is_empty() && plan.included.is_empty() && plan.hooked.is_empty() {
        return Err(BuildError::NoChange(match plan.absent.is_empty() {
            true => format!(
                "{} and {} compile to the same code ({} changed, but not what the binary runs)",
                revs.base_name,
                revs.head_name,
                files.join(", ")
            ),
            false => format!(
                "{} changed only code the deployed binary does not have (the linker dropped it, or inlined every copy into callers that compiled the same): {}",
                revs.head_name,
                plan.absent
                    .iter()
                    .map(|(n, _)| describe(n))
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }));
    }

    notes.extend(report::noise_note(&noise, &bin_noise));
    notes.extend(report::absent_note(&plan.absent));
    // The new bodies of hooked functions compiled outside the library are
    // copied from those objects: one build of all of them.
    let mut members = head_rlib.members()?;
    for o in &hook_sources {
        members.extend(compare::OutsideObjects::members(&o.head));
    }
    let all;
    let code = if hook_sources.is_empty() {
        &h
    } else {
        all = objects::Build::read(&members).map_err(BuildError::Io)?;
        &all
    };
    let mut extracted = extract::write(code, &host, &plan, &noise)?;
    let label = manifest::label(&ws, opts, &revs, &files, &plan)?;
    let manifest = manifest::compile(&ws, &head, &label, &plan)?;
    let out = crate::cargo::output_path(
        opts.output.as_deref(),
        &ws.target_dir,
        &format!("{}-source-patch.so", ws.lib_name),
    )
    .map_err(BuildError::Io)?;
    let linked = crate::link::link_objects(
        vec![std::mem::take(&mut extracted.object), manifest],
        &head.rlib,
        &host_path,
        &out,
    )?;
    let written = report::Written {
        extracted,
        linked,
        label,
    };
    Ok(report::report(
        &ws, &revs, &base_src, &head_src, &plan, written, notes,
    ))
}

/// A symbol name demangled without its hash.
fn demangle(name: &str) -> String {
    format!("{:#}", rustc_demangle::demangle(name))
}

/// The path a user knows a function by: the `#[patchable]` body's by its
/// function's, a closure by its function's.
fn user_path(demangled: &str) -> String {
    demangled.replace("__hotpatch_original_", "")
}

/// A symbol as the user knows it: demangled, by its function's path.
fn describe(name: &str) -> String {
    user_path(&demangle(name))
}
