//! Step 9: each changed function classified. A `#[patchable]` body is
//! replaced; any other function is included if every function of the
//! base that references it is replaced or included (a `#[patchable]`
//! caller is then replaced even if its own code did not change), else
//! hooked (its entry redirected at load: `hotpatch::hook`) when its entry
//! can be and its calling convention is fixed, else refused with what
//! blocks it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use object::{Object, ObjectSymbol};

use super::compare::Comparison;
use super::coroutine::{StateMachine, state_machine};
use super::entries::{EntryInfo, is_generated};
use super::identity::Host;
use super::objects::Build;
use super::{demangle, describe};
use crate::Refusal;
use crate::syntax::CrateSource;

/// What goes into the patch.
pub(super) struct Plan {
    /// The `#[patchable]` functions replaced: symbol and head entry.
    pub replaced: Vec<(String, EntryInfo)>,
    /// The other functions copied into the patch (symbols).
    pub included: BTreeSet<String>,
    /// Each replaced function whose own code did not change, replaced
    /// because it calls a changed one: that one (symbols).
    pub calls_changed: BTreeMap<String, String>,
    /// For each included function, every function of the base that
    /// reaches it, and what the patch does with that one: `replaced`,
    /// `included`, or `gone from the head` (its own callers accounted for
    /// in turn). No caller is left running the old code: one that cannot
    /// be patched refuses the change.
    pub callers: BTreeMap<String, Vec<String>>,
    /// Changed functions whose callers cannot all be patched, redirected
    /// at their entry instead (each is also in `included`: its new body).
    pub hooked: Vec<Hooked>,
    /// Whether a changed function's callers could not all be patched, so
    /// a hook was (or would be, with type information) considered.
    pub considered_hooks: bool,
    /// Changed functions the deployed binary has no code of (symbol, and
    /// the crate that compiled them if not the library): nothing it runs
    /// needs them; copied only if patch code calls them.
    pub absent: Vec<(String, Option<String>)>,
}

/// Each symbol's referrers (`Build::referrers`).
type Referrers = HashMap<String, BTreeSet<String>>;

/// A function the patch redirects at its entry.
#[derive(Debug, Clone)]
pub(super) struct Hooked {
    /// Its symbol in the base (and head) build.
    pub symbol: String,
    /// The address of its entry in the deployed binary.
    pub address: u64,
    /// The bytes the hook replaces there, as the deployed build has them.
    pub entry: Vec<u8>,
    /// Why its callers could not all be replaced or included instead.
    pub because: Vec<String>,
    /// `FILE:LINE` of a function outside the library's source (the
    /// executable's crate, another package), where that source says.
    pub location: Option<String>,
    /// For one of several local copies: the head's body for it (object
    /// member and section); `None`: the head's body of the name.
    pub body: Option<(String, object::SectionIndex)>,
}

impl Hooked {
    /// One hook per entry of `at` (a function, or each of its copies),
    /// with `because` and, for copies, which copy each is.
    pub fn each(
        symbol: &str,
        at: Vec<HookAt>,
        because: Vec<String>,
        location: Option<String>,
    ) -> Vec<Hooked> {
        let n = at.len();
        at.into_iter()
            .map(|a| {
                let mut because = because.clone();
                let body = a.copy.map(|(body, unit)| {
                    because.push(format!(
                        "the deployed binary has {n} local copies of it: this one, at {:#x}, from codegen unit {unit}, gets that unit's new body; every copy is hooked",
                        a.address
                    ));
                    body
                });
                Hooked {
                    symbol: symbol.to_owned(),
                    address: a.address,
                    entry: a.entry,
                    because,
                    location: location.clone(),
                    body,
                }
            })
            .collect()
    }
}

/// One entry a hook redirects: the function's, or one of its copies'.
#[derive(Debug, Clone)]
pub(super) struct HookAt {
    /// The address of the entry in the deployed binary.
    pub address: u64,
    /// The bytes the hook replaces there.
    pub entry: Vec<u8>,
    /// For one of several copies: the head's body for it (object member
    /// and section) and its codegen unit; `None`: the head's only body
    /// of the name.
    pub copy: Option<((String, object::SectionIndex), String)>,
}

/// Whether `symbol`'s entry can be redirected to the head's body: the
/// head compiled one, every caller the deployed build has calls it as the
/// new body expects ([`callers_agree`]), and the deployed binary's code
/// at its entry is eligible. Where the binary has several local copies of
/// it, every copy, each paired with its own base and head copies
/// (`copies`). `Err` says why not.
pub(super) fn hookable(
    (b, b_refs): (&Build<'_>, &Referrers),
    h: &Build<'_>,
    types: Option<(&Build<'_>, &Build<'_>)>,
    host: &Host,
    symbol: &str,
    in_patch: &dyn Fn(&str) -> bool,
) -> Result<Vec<HookAt>, String> {
    // A future suspended at an `.await` resumes in the new code: it must
    // read the state the old code saved (`coroutine`).
    let machine = match types {
        Some((tb, th)) => state_machine(tb, th, symbol),
        None => StateMachine::Unknown(
            "this code has no build with type information to compare its async state machines"
                .into(),
        ),
    };
    match machine {
        StateMachine::NotACoroutine | StateMachine::Same => {}
        StateMachine::Differs(what) => {
            return Err(format!(
                "it runs an async state machine that differs in the new build ({what}): requests suspended at an .await would resume in a different state machine"
            ));
        }
        // No answer (no type information for this crate, or the function
        // not in it): a function that runs a state machine cannot be told
        // from one that does not by its name alone (an executor's poll
        // function with a future's poll inlined into it), so no hook.
        StateMachine::Unknown(why) => {
            return Err(format!(
                "whether it runs an async state machine that changed cannot be told: {why}"
            ));
        }
    }
    if !h.by_name.contains_key(symbol) {
        return Err("the head compiled no body of it".into());
    }
    if host.copies_of(symbol).len() > 1 {
        let copies = super::copies::hook_copies(b, h, host, symbol, in_patch)?;
        return Ok(copies
            .into_iter()
            .map(|c| HookAt {
                address: c.address,
                entry: c.entry,
                copy: Some((c.body, c.unit)),
            })
            .collect());
    }
    callers_agree((b, b_refs), h, symbol, in_patch)?;
    let (address, entry) = host.hook_entry(symbol)?;
    Ok(vec![HookAt {
        address,
        entry,
        copy: None,
    }])
}

/// Whether every caller of `symbol` that the deployed build keeps calls
/// it as the new body expects: each caller in `b` is in the patch
/// (`in_patch`: replaced, included or hooked, so it runs new code that
/// calls the new body), holds its address as data (a vtable or function
/// pointer: the standard convention), or compiled to the same code in the
/// head, where it calls the new body. The last is what makes a hook of an
/// internal function sound: the optimiser may change how such a function
/// is called (drop an argument, pass one by value, use a constant instead
/// of its result) and what its callers assume of it (that it does not
/// unwind, or write memory); a caller compiled to the same code against
/// the new body makes the same call with the same assumptions.
fn callers_agree(
    (b, b_refs): (&Build<'_>, &Referrers),
    h: &Build<'_>,
    symbol: &str,
    in_patch: &dyn Fn(&str) -> bool,
) -> Result<(), String> {
    for caller in b_refs.get(symbol).into_iter().flatten() {
        if caller == symbol || in_patch(caller) {
            continue;
        }
        let Some(&bu) = b.by_name.get(caller) else {
            continue;
        };
        if !b.is_code(bu) {
            continue;
        }
        match h.by_name.get(caller) {
            Some(&hu) if b.hash(bu) == h.hash(hu) => {}
            Some(_) => {
                return Err(format!(
                    "its caller {} compiled to other code in the new build, so the two may call it differently",
                    describe(caller)
                ));
            }
            None => {
                return Err(format!(
                    "its caller {} is not in the new build, so how the new build calls it cannot be compared",
                    describe(caller)
                ));
            }
        }
    }
    Ok(())
}

/// Classifies the changed functions of `comparison`; `refusals` gets each
/// changed function that cannot be patched.
pub(super) fn classify(
    b: &Build<'_>,
    h: &Build<'_>,
    host: &Host,
    comparison: &Comparison,
    head_src: &CrateSource,
    types: Option<(&Build<'_>, &Build<'_>)>,
    refusals: &mut Vec<Refusal>,
) -> Plan {
    let Comparison {
        changed,
        head_entries,
        ..
    } = comparison;
    let mut replaced: Vec<(String, EntryInfo)> = Vec::new();
    let mut others: BTreeSet<String> = BTreeSet::new();
    for name in changed {
        if let Some(e) = head_entries.get(name) {
            replaced.push((name.clone(), e.clone()));
        } else if is_generated(name) {
            // Generated code changes with the signature, refused above.
        } else {
            others.insert(name.clone());
        }
    }
    let replaced_names: HashSet<String> = replaced.iter().map(|(n, _)| n.clone()).collect();
    let referrers = b.referrers();
    let exported_from_crate = |n: &str| -> bool {
        b.by_name.get(n).is_some_and(|u| {
            let file = &b.objects[u.0];
            file.symbols().any(|s| {
                s.section_index() == Some(u.1)
                    && s.address() == 0
                    && s.name() == Ok(n)
                    && s.is_global()
                    && matches!(s.flags(), object::SymbolFlags::Elf { st_other, .. } if st_other & 3 == 0)
            })
        })
    };
    // Every function of the base that reaches a changed non-patchable one
    // must run the new code: a #[patchable] caller is replaced (even if its
    // own code did not change: the head's calls the new helper), any other
    // caller is included in turn, up to patchable functions. What cannot be
    // (a public function, a function pointer or vtable) refuses the change.
    // A `#[patchable]` body is reached through its slot. A closure is
    // not exempt: an async fn's body is one, and the crate that polls the
    // future (the binary's) calls it by its global symbol.
    let local_only = |name: &str| demangle(name).contains("__hotpatch_original_");
    // A `pub` function that is generic or `#[inline]` has copies in the
    // crates that use it (the binary's among them), which a release build
    // compiles without an exported symbol to see: the source says so.
    let copied_elsewhere = |name: &str| head_src.is_copied_into_users(&demangle(name));
    let mut included: BTreeSet<String> = others.clone();
    // A `#[patchable]` caller replaced because it calls a changed
    // function, and that function.
    let mut forced: BTreeMap<String, String> = BTreeMap::new();
    let mut blocked: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut pulled_by: HashMap<String, String> = HashMap::new();
    let mut gone: BTreeSet<String> = BTreeSet::new();
    let mut queue: Vec<String> = others.iter().cloned().collect();
    while let Some(name) = queue.pop() {
        if !local_only(&name) {
            let why = if copied_elsewhere(&name) {
                Some(
                    "is public and generic or #[inline]: the crates that use it (the binary's too) compile their own copies",
                )
            } else if exported_from_crate(&name) {
                Some("is public: the binary crate or other crates may call or inline it")
            } else {
                None
            };
            if let Some(why) = why {
                blocked
                    .entry(name.clone())
                    .or_default()
                    .insert(format!("{} {why}", describe(&name)));
            }
        }
        for c in referrers.get(&name).cloned().unwrap_or_default() {
            if replaced_names.contains(&c)
                || forced.contains_key(&c)
                || included.contains(&c)
                || gone.contains(&c)
                || is_generated(&c)
            {
                continue;
            }
            if head_entries.contains_key(&c) {
                forced.insert(c, name.clone());
            } else if b.by_name.get(&c).is_some_and(|u| !b.is_code(*u)) {
                blocked
                    .entry(name.clone())
                    .or_default()
                    .insert(format!("a function pointer or vtable ({})", describe(&c)));
            } else {
                // A caller the head no longer has (removed, or inlined
                // into its own callers) has no new code to copy: it stays
                // unreachable as long as its own callers run new code,
                // which the queue checks like any caller's.
                if h.by_name.contains_key(&c) {
                    included.insert(c.clone());
                } else if !gone.insert(c.clone()) {
                    continue;
                }
                pulled_by.insert(c.clone(), name.clone());
                queue.push(c);
            }
        }
    }
    let mut hooked = Vec::new();
    let mut absent = Vec::new();
    if !blocked.is_empty() {
        // The counted bodies of the replaced functions are what the patch
        // installs for them (`extract::write`); other generated code is
        // the host's.
        let counted: HashSet<&String> = replaced_names
            .iter()
            .chain(forced.keys())
            .filter_map(|n| head_entries.get(n)?.counted.as_ref())
            .collect();
        let in_patch = |n: &str| {
            replaced_names.contains(n)
                || forced.contains_key(n)
                || included.contains(n)
                || gone.contains(n)
                || counted.contains(&n.to_owned())
        };
        // Each changed function whose callers, transitively, cannot all be
        // patched, with what blocks it: hooked if it can be, else refused.
        for name in &others {
            let mut reasons: BTreeSet<String> = BTreeSet::new();
            let mut callers: BTreeSet<String> = BTreeSet::new();
            for (b_name, why) in &blocked {
                // Does `b_name` reach `name` (through pulled-in callers)?
                let mut n = b_name.clone();
                let mut reaches = n == *name;
                while !reaches {
                    match pulled_by.get(&n) {
                        Some(next) => {
                            n = next.clone();
                            reaches = n == *name;
                        }
                        None => break,
                    }
                }
                if reaches {
                    reasons.extend(why.iter().cloned());
                    if b_name != name {
                        callers.insert(describe(b_name));
                    }
                }
            }
            if reasons.is_empty() {
                continue;
            }
            if host.lacks_function(name) {
                absent.push((name.clone(), None));
                continue;
            }
            match hookable((b, &referrers), h, types, host, name, &in_patch) {
                Ok(at) => {
                    hooked.extend(Hooked::each(name, at, reasons.into_iter().collect(), None));
                    continue;
                }
                Err(why) => {
                    reasons.insert(format!(
                        "{} cannot be redirected at its entry either: {why}",
                        describe(name)
                    ));
                }
            }
            let at = head_src
                .locate(&demangle(name))
                .map(|l| format!(" ({l})"))
                .unwrap_or_default();
            refusals.push(Refusal::UnpatchedCallers {
                function: describe(name),
                at,
                callers: callers.into_iter().collect(),
                reasons: reasons.into_iter().collect(),
            });
        }
    }
    // Code the binary does not have is copied only where patch code calls
    // it (extract copies what the host lacks).
    for (name, _) in &absent {
        included.remove(name);
    }
    for name in forced.keys() {
        if let Some(e) = head_entries.get(name) {
            replaced.push((name.clone(), e.clone()));
        }
    }
    // A replaced function by the path its registry entry gives (`<svc::Cart
    // as Describe>::describe`, which its body's symbol does not spell).
    let replaced_paths: HashMap<&String, &String> =
        replaced.iter().map(|(n, e)| (n, &e.path)).collect();
    let callers = included
        .iter()
        .map(|name| {
            let list = referrers
                .get(name)
                .into_iter()
                .flatten()
                .filter(|c| !is_generated(c))
                .map(|c| {
                    if let Some(path) = replaced_paths.get(c) {
                        return format!("{path} (replaced)");
                    }
                    let how = if included.contains(c) {
                        "included"
                    } else if gone.contains(c) {
                        "gone from the head"
                    } else {
                        "unchanged"
                    };
                    format!("{} ({how})", describe(c))
                })
                .collect::<BTreeSet<String>>()
                .into_iter()
                .collect();
            (name.clone(), list)
        })
        .collect();
    Plan {
        replaced,
        included,
        calls_changed: forced,
        callers,
        hooked,
        absent,
        considered_hooks: !blocked.is_empty(),
    }
}
