//! Whether a changed function may run on state machines the base's code
//! suspended: an `async fn`'s (or `async` block's) body compiles to the
//! resume function of a coroutine, whose state (which `.await` it stopped
//! at, and the locals alive across it) lives in the future, not on a
//! stack. A future suspended before a patch resumes in the patched code,
//! which must read the state exactly as the base's code wrote it.
//!
//! [`state_machine`] reads the DWARF type information of the base's and
//! head's objects, finds the function's subprogram by its linkage name,
//! collects every coroutine type it handles, and compares each between
//! the builds. The objects are those of the *types build*
//! (`sides::type_builds`, made when a change may need a hook): the
//! wrapper compiles each library of the workspace and the executable's
//! own crate a second time with `-C debuginfo=2`, because full debug
//! information changes the code rustc emits (mini-redis 0.4.1's
//! executable differs in `.text` when its library has it), so the deployed
//! build has line tables only.
//!
//! - the coroutine types a function *handles*: those its parameters and
//!   return type lead to (through pointers, `Pin`, `Box` and the fields of
//!   structs and enums that hold them: a resume function's
//!   `Pin<&mut {async_fn_env#0}>`, a constructor's returned future, a
//!   task cell holding a future), and those named in its own name or in
//!   the name of a function inlined into it
//!   (`drop_in_place<svc::work::{async_fn_env#0}>`, the drop glue that
//!   reads the state to drop what a suspend point saved; a generic
//!   instance such as `spawn<...{async_fn_env#0}>`); the same for every
//!   function inlined into it, so a poll function inlined into an
//!   executor's is seen;
//! - a coroutine type is the same when both builds describe it with the
//!   same size and alignment, the same discriminant (the `__state` field's
//!   offset and size), the same variants in the same order (`Unresumed`,
//!   `Returned`, `Panicked`, `Suspend0`..`SuspendN`, each with its
//!   discriminant value and size) and in each variant the same fields
//!   (name, offset, type name and size). A future awaited inside another
//!   is a saved field (`__awaitee`) of the outer one: when an inner state
//!   machine grows, every future that awaits it differs too.
//!
//! What this proves: a state written by the base's code is read by the
//! head's code as a state of the same variant, with every saved local at
//! the same place with the same type. What it cannot prove (the limits):
//!
//! - that a suspend point *means* the same. Two `.await`s swapped, or
//!   moved to another place in the body, with locals of the same names and
//!   types, give the same layout: a future suspended at the base's first
//!   `.await` resumes after the head's first `.await`, in other code.
//! - that equal type names are equal types: a saved value of a type whose
//!   layout changed keeps its name (the source comparison refuses changed
//!   layouts of the library's own types before any build; a dependency's
//!   types are pinned by `Cargo.lock`).
//! - that the types build lays coroutines out as the deployed build does:
//!   the two compiles differ in debug information only, and rustc's
//!   layouts of coroutines did not change with it where measured (every
//!   coroutine of mini-redis 0.4.1 by `-Zprint-type-sizes`), but rustc
//!   does not promise it.
//!
//! A function this reader cannot tell about (no types build, no type
//! information, line tables only, a function absent from the types
//! build's code, a reference form it does not follow) is
//! [`StateMachine::Unknown`], never the same.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use gimli::{AttributeValue, DwTag, EndianSlice, LittleEndian, constants};
use object::read::{Object, ObjectSection, ObjectSymbol, RelocationTarget};
use object::{RelocationFlags, elf};

use super::objects::{Build, stem};

/// What [`state_machine`] tells of a changed function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StateMachine {
    /// The function handles no coroutine in either build (by its DWARF:
    /// it was found, with type information).
    NotACoroutine,
    /// Every coroutine it handles has the same state machine in both
    /// builds.
    Same,
    /// A coroutine it handles differs: the first difference, for the user.
    Differs(String),
    /// It cannot be told: why (no type information, the function not in
    /// the DWARF, a type this reader cannot follow).
    Unknown(String),
}

/// Compares the state machines `symbol` (a mangled name defined in both
/// builds, with or without its `.llvm.<number>` suffix) handles in the
/// base and in the head. `base` and `head` are the *types builds'*
/// objects (`sides::type_builds`), not the deployed build's: symbol
/// names are the same in both compiles of a crate. Each call reads the
/// DWARF of the objects that define `symbol` (about 20 ms a call for
/// mini-redis, release build of this tool).
///
/// # Examples
///
/// ```ignore
/// let t = sides::type_builds(&ws, opts, &revs, &trees, exe_name, progress)?;
/// let (b, h) = (compare::Rlib::read(&t.lib.0)?, compare::Rlib::read(&t.lib.1)?);
/// let (b, h) = (b.objects()?, h.objects()?);
/// match coroutine::state_machine(&b, &h, name) {
///     StateMachine::NotACoroutine | StateMachine::Same => { /* may be hooked */ }
///     StateMachine::Differs(what) => {
///         /* refused: suspended requests would resume in a different state machine: {what} */
///     }
///     StateMachine::Unknown(why) => { /* refused: {why} */ }
/// }
/// ```
pub(crate) fn state_machine(base: &Build<'_>, head: &Build<'_>, symbol: &str) -> StateMachine {
    let symbol = stem(symbol);
    let b = match handled(base, symbol) {
        Ok(b) => b,
        Err(why) => return StateMachine::Unknown(format!("the base: {why}")),
    };
    let h = match handled(head, symbol) {
        Ok(h) => h,
        Err(why) => return StateMachine::Unknown(format!("the head: {why}")),
    };
    if b.is_empty() && h.is_empty() {
        return StateMachine::NotACoroutine;
    }
    let names: BTreeSet<&String> = b.keys().chain(h.keys()).collect();
    for name in names {
        match (b.get(name), h.get(name)) {
            (Some(b), Some(h)) => {
                if let Some(d) = difference(b, h) {
                    return StateMachine::Differs(format!("{name}: {d}"));
                }
            }
            (Some(_), None) => {
                return StateMachine::Differs(format!(
                    "the base's code handles the state machine {name}, the head's does not"
                ));
            }
            (None, Some(_)) => {
                return StateMachine::Differs(format!(
                    "the head's code handles the state machine {name}, the base's does not"
                ));
            }
            (None, None) => {}
        }
    }
    StateMachine::Same
}

/// A coroutine's layout, as the DWARF describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Layout {
    size: u64,
    align: Option<u64>,
    /// The discriminant field: offset and size.
    discr: (u64, u64),
    variants: Vec<Variant>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Variant {
    /// `Unresumed`, `Returned`, `Panicked`, `Suspend0`, ...
    name: String,
    discr_value: u64,
    size: u64,
    /// Sorted by offset, then name.
    fields: Vec<Field>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Field {
    offset: u64,
    name: String,
    type_name: String,
    size: u64,
}

impl std::fmt::Display for Field {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}: {}` ({} bytes) at offset {}",
            self.name, self.type_name, self.size, self.offset
        )
    }
}

/// The first difference between two layouts of one coroutine, if any,
/// most telling first: a suspend point added or removed, a local saved
/// by one build only, a saved local's type or place, then sizes.
fn difference(b: &Layout, h: &Layout) -> Option<String> {
    for i in 0..b.variants.len().max(h.variants.len()) {
        match (b.variants.get(i), h.variants.get(i)) {
            (Some(bv), Some(hv)) if bv.name != hv.name || bv.discr_value != hv.discr_value => {
                return Some(format!(
                    "state {} is {} in the base, state {} is {} in the head",
                    bv.discr_value, bv.name, hv.discr_value, hv.name
                ));
            }
            (None, Some(hv)) => {
                return Some(format!(
                    "the head has {} (state {}), the base does not: a suspend point was added",
                    hv.name, hv.discr_value
                ));
            }
            (Some(bv), None) => {
                return Some(format!(
                    "the base has {} (state {}), the head does not: a suspend point was removed",
                    bv.name, bv.discr_value
                ));
            }
            _ => {}
        }
    }
    // The same variants, in the same order.
    let pairs = || b.variants.iter().zip(&h.variants);
    let named = |v: &Variant, name: &str| v.fields.iter().any(|f| f.name == name);
    for (bv, hv) in pairs() {
        if let Some(f) = hv.fields.iter().find(|f| !named(bv, &f.name)) {
            return Some(format!(
                "{} saves {f} in the head, not in the base",
                hv.name
            ));
        }
        if let Some(f) = bv.fields.iter().find(|f| !named(hv, &f.name)) {
            return Some(format!(
                "{} saves {f} in the base, not in the head",
                bv.name
            ));
        }
    }
    let was = |v: &Variant, f: &Field| -> String {
        let same: Vec<String> = v
            .fields
            .iter()
            .filter(|o| o.name == f.name)
            .map(ToString::to_string)
            .collect();
        same.join(" and ")
    };
    // A saved local whose type changed, then one that moved.
    let retyped = |bv: &Variant, f: &Field| {
        !bv.fields
            .iter()
            .any(|o| o.name == f.name && o.type_name == f.type_name && o.size == f.size)
    };
    for (bv, hv) in pairs() {
        if let Some(f) = hv.fields.iter().find(|f| retyped(bv, f)) {
            return Some(format!(
                "{} saves {f} in the head, {} in the base",
                hv.name,
                was(bv, f)
            ));
        }
    }
    for (bv, hv) in pairs() {
        if let Some(f) = hv.fields.iter().find(|f| !bv.fields.contains(f)) {
            return Some(format!(
                "{} saves {f} in the head, {} in the base",
                hv.name,
                was(bv, f)
            ));
        }
        if bv.fields.len() != hv.fields.len() {
            return Some(format!(
                "{} saves {} values in the base, {} in the head",
                bv.name,
                bv.fields.len(),
                hv.fields.len()
            ));
        }
        if bv.size != hv.size {
            return Some(format!(
                "{} is {} bytes in the base, {} in the head",
                bv.name, bv.size, hv.size
            ));
        }
    }
    if b.size != h.size {
        return Some(format!(
            "the future is {} bytes in the base, {} in the head",
            b.size, h.size
        ));
    }
    if b.align != h.align {
        return Some(format!(
            "its alignment is {:?} in the base, {:?} in the head",
            b.align, h.align
        ));
    }
    if b.discr != h.discr {
        return Some(format!(
            "the state's tag is at offset {} ({} bytes) in the base, at offset {} ({} bytes) in the head",
            b.discr.0, b.discr.1, h.discr.0, h.discr.1
        ));
    }
    None
}

/// The coroutine types the function `symbol` handles in `build`, by
/// qualified type name.
fn handled(build: &Build<'_>, symbol: &str) -> Result<BTreeMap<String, Layout>, String> {
    let copies = build.copies(symbol);
    if copies.is_empty() {
        return Err(format!("no function {symbol}"));
    }
    let mut why = String::from("no debug information");
    // The first object whose DWARF describes the function (a COMDAT copy
    // in another codegen unit is the same code).
    let mut seen = BTreeSet::new();
    for (oi, _) in copies {
        if !seen.insert(oi) {
            continue;
        }
        let dies = match Dies::read(&build.objects[oi]) {
            Ok(d) => d,
            Err(e) => {
                why = e;
                continue;
            }
        };
        match dies.handled(symbol) {
            Ok(Some(found)) => return Ok(found),
            Ok(None) => {
                why = format!("{symbol} is not in the debug information of its object");
            }
            Err(e) => return Err(e),
        }
    }
    Err(why)
}

/// A reference: the DIE's offset in `.debug_info`.
type Ref = usize;

/// What this reader keeps of a DIE.
#[derive(Debug)]
struct Die {
    tag: DwTag,
    name: Option<String>,
    linkage_name: Option<String>,
    byte_size: Option<u64>,
    alignment: Option<u64>,
    member_location: Option<u64>,
    /// `DW_AT_type`; `Err` for a form this reader does not follow.
    ty: Option<Result<Ref, String>>,
    abstract_origin: Option<Result<Ref, String>>,
    specification: Option<Result<Ref, String>>,
    /// `DW_AT_discr` of a variant part.
    discr: Option<Result<Ref, String>>,
    discr_value: Option<u64>,
    /// A subrange's `DW_AT_count`, or `DW_AT_upper_bound` + 1.
    count: Option<u64>,
    /// Whether it has code (`DW_AT_low_pc` or `DW_AT_ranges`).
    has_code: bool,
    parent: Option<Ref>,
    children: Vec<Ref>,
    address_size: u8,
}

/// Every DIE of one object's `.debug_info`.
struct Dies {
    dies: HashMap<Ref, Die>,
    /// In file order.
    order: Vec<Ref>,
}

/// How deep [`Dies::collect`] follows pointers and fields from a
/// parameter to find the coroutine it reaches (and how deep a type's
/// name or size is followed).
const DEPTH: usize = 16;

impl Dies {
    fn read(file: &object::File<'_>) -> Result<Dies, String> {
        if file.section_by_name(".debug_info").is_none() {
            return Err("no debug information (.debug_info) in the object".into());
        }
        let load = |id: gimli::SectionId| -> Result<Vec<u8>, String> { relocated(file, id.name()) };
        let sections = gimli::DwarfSections::load(load)?;
        let dwarf = sections.borrow(|s| EndianSlice::new(s, LittleEndian));
        let mut dies = HashMap::new();
        let mut order = Vec::new();
        let mut units = dwarf.units();
        let err = |e: gimli::Error| format!("reading the debug information: {e}");
        while let Some(header) = units.next().map_err(err)? {
            let unit = dwarf.unit(header).map_err(err)?;
            let mut stack: Vec<Ref> = Vec::new();
            let mut cursor = unit.entries();
            let mut depth: isize = 0;
            while let Some((delta, entry)) = cursor.next_dfs().map_err(err)? {
                depth += delta;
                let at = entry
                    .offset()
                    .to_debug_info_offset(&unit.header)
                    .map(|o| o.0)
                    .ok_or("a DIE outside .debug_info")?;
                stack.truncate(usize::try_from(depth).unwrap_or(0));
                let mut die = Die {
                    tag: entry.tag(),
                    name: None,
                    linkage_name: None,
                    byte_size: None,
                    alignment: None,
                    member_location: None,
                    ty: None,
                    abstract_origin: None,
                    specification: None,
                    discr: None,
                    discr_value: None,
                    count: None,
                    has_code: false,
                    parent: stack.last().copied(),
                    children: Vec::new(),
                    address_size: unit.header.address_size(),
                };
                let mut attrs = entry.attrs();
                while let Some(attr) = attrs.next().map_err(err)? {
                    let value = attr.value();
                    let reference = || reference(&unit, value);
                    match attr.name() {
                        constants::DW_AT_name => die.name = text(&dwarf, &unit, value),
                        constants::DW_AT_linkage_name => {
                            die.linkage_name = text(&dwarf, &unit, value);
                        }
                        constants::DW_AT_byte_size => die.byte_size = attr.udata_value(),
                        constants::DW_AT_alignment => die.alignment = attr.udata_value(),
                        constants::DW_AT_data_member_location => {
                            die.member_location = attr.udata_value();
                        }
                        constants::DW_AT_type => die.ty = Some(reference()),
                        constants::DW_AT_abstract_origin => die.abstract_origin = Some(reference()),
                        constants::DW_AT_specification => die.specification = Some(reference()),
                        constants::DW_AT_discr => die.discr = Some(reference()),
                        constants::DW_AT_discr_value => die.discr_value = attr.udata_value(),
                        constants::DW_AT_count => die.count = attr.udata_value(),
                        constants::DW_AT_upper_bound => {
                            die.count = attr.udata_value().map(|u| u + 1);
                        }
                        constants::DW_AT_low_pc | constants::DW_AT_ranges => die.has_code = true,
                        _ => {}
                    }
                }
                if let Some(p) = die.parent
                    && let Some(parent) = dies.get_mut(&p)
                {
                    let parent: &mut Die = parent;
                    parent.children.push(at);
                }
                dies.insert(at, die);
                order.push(at);
                stack.push(at);
            }
        }
        Ok(Dies { dies, order })
    }

    fn get(&self, at: Ref) -> Result<&Die, String> {
        self.dies
            .get(&at)
            .ok_or_else(|| format!("a reference to no DIE (offset {at:#x})"))
    }

    /// An attribute of a DIE or of the DIE it is a concrete instance or
    /// the definition of.
    fn inherited<T: Clone>(
        &self,
        at: Ref,
        get: impl Fn(&Die) -> Option<T>,
    ) -> Result<Option<T>, String> {
        let mut at = at;
        for _ in 0..8 {
            let die = self.get(at)?;
            if let Some(v) = get(die) {
                return Ok(Some(v));
            }
            match die.abstract_origin.as_ref().or(die.specification.as_ref()) {
                Some(r) => at = r.clone()?,
                None => return Ok(None),
            }
        }
        Ok(None)
    }

    /// The coroutines the function with the linkage name `symbol`
    /// handles, if its concrete subprogram is here.
    fn handled(&self, symbol: &str) -> Result<Option<BTreeMap<String, Layout>>, String> {
        let mut subprogram = None;
        for &at in &self.order {
            let die = &self.dies[&at];
            if die.tag != constants::DW_TAG_subprogram || !die.has_code {
                continue;
            }
            if self.inherited(at, |d| d.linkage_name.clone())?.as_deref() == Some(symbol) {
                subprogram = Some(at);
                break;
            }
        }
        let Some(subprogram) = subprogram else {
            return Ok(None);
        };
        // The coroutine types this unit describes, by qualified name:
        // what a function's name can name.
        let mut coroutines: Vec<(String, Ref)> = Vec::new();
        for &at in &self.order {
            let die = &self.dies[&at];
            if die.tag == constants::DW_TAG_structure_type
                && die.name.as_deref().is_some_and(is_coroutine_name)
            {
                coroutines.push((self.qualified(at)?, at));
            }
        }
        // The subprogram and every function inlined into it, by the DIE
        // that has their name and parameters.
        let mut functions = vec![subprogram];
        let mut stack = vec![subprogram];
        while let Some(at) = stack.pop() {
            for &c in &self.get(at)?.children {
                let child = self.get(c)?;
                if child.tag == constants::DW_TAG_inlined_subroutine {
                    functions.push(c);
                }
                if child.tag != constants::DW_TAG_subprogram {
                    stack.push(c);
                }
            }
        }
        let mut found: BTreeMap<String, Ref> = BTreeMap::new();
        let mut visited = HashMap::new();
        for f in functions {
            // Its name (a generic instance's names its arguments).
            let name = self.inherited(f, |d| d.name.clone())?.unwrap_or_default();
            for (q, at) in &coroutines {
                if name.contains(q.as_str()) {
                    found.insert(q.clone(), *at);
                }
            }
            // Its return type and its parameters' types.
            if let Some(ty) = self.inherited(f, |d| d.ty.clone())? {
                self.collect(ty?, DEPTH, &mut visited, &mut found)?;
            }
            for p in self.parameters(f)? {
                if let Some(ty) = self.inherited(p, |d| d.ty.clone())? {
                    self.collect(ty?, DEPTH, &mut visited, &mut found)?;
                }
            }
        }
        let mut out = BTreeMap::new();
        for (name, at) in found {
            out.insert(
                name.clone(),
                self.layout(at).map_err(|e| format!("{name}: {e}"))?,
            );
        }
        Ok(Some(out))
    }

    /// The formal parameters of a function: its own, or its abstract
    /// origin's (an inlined instance may list none of its own).
    fn parameters(&self, f: Ref) -> Result<Vec<Ref>, String> {
        let mut at = f;
        for _ in 0..8 {
            let die = self.get(at)?;
            let params: Vec<Ref> = die
                .children
                .iter()
                .copied()
                .filter(|c| {
                    self.dies
                        .get(c)
                        .is_some_and(|d| d.tag == constants::DW_TAG_formal_parameter)
                })
                .collect();
            if !params.is_empty() {
                return Ok(params);
            }
            match die.abstract_origin.as_ref().or(die.specification.as_ref()) {
                Some(r) => at = r.clone()?,
                None => break,
            }
        }
        Ok(Vec::new())
    }

    /// The coroutine types a value of type `ty` leads to: itself, through
    /// pointers and the fields of what holds it (a coroutine's own saved
    /// fields are its layout, not followed).
    fn collect(
        &self,
        ty: Ref,
        depth: usize,
        visited: &mut HashMap<Ref, usize>,
        found: &mut BTreeMap<String, Ref>,
    ) -> Result<(), String> {
        // A type seen with as much depth left or more was followed as far.
        if depth == 0 || visited.get(&ty).is_some_and(|d| *d >= depth) {
            return Ok(());
        }
        visited.insert(ty, depth);
        let die = self.get(ty)?;
        if die.tag == constants::DW_TAG_structure_type
            && die.name.as_deref().is_some_and(is_coroutine_name)
        {
            found.insert(self.qualified(ty)?, ty);
            return Ok(());
        }
        if let Some(next) = &die.ty {
            self.collect(next.clone()?, depth - 1, visited, found)?;
        }
        let mut stack = die.children.clone();
        while let Some(c) = stack.pop() {
            let child = self.get(c)?;
            match child.tag {
                constants::DW_TAG_member => {
                    if let Some(next) = &child.ty {
                        self.collect(next.clone()?, depth - 1, visited, found)?;
                    }
                }
                constants::DW_TAG_variant_part | constants::DW_TAG_variant => {
                    stack.extend(child.children.iter().copied());
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// A type's name with the namespaces and types it is nested in.
    fn qualified(&self, at: Ref) -> Result<String, String> {
        let die = self.get(at)?;
        let name = die
            .name
            .clone()
            .ok_or_else(|| format!("a type without a name (offset {at:#x})"))?;
        let mut parts = vec![name];
        let mut p = die.parent;
        while let Some(at) = p {
            let d = self.get(at)?;
            match d.tag {
                constants::DW_TAG_namespace
                | constants::DW_TAG_structure_type
                | constants::DW_TAG_union_type
                | constants::DW_TAG_enumeration_type => {
                    parts.push(d.name.clone().unwrap_or_default());
                }
                _ => break,
            }
            p = d.parent;
        }
        parts.reverse();
        Ok(parts.join("::"))
    }

    /// A type's name for comparison: qualified, arrays by element and
    /// length, qualifiers and typedefs by what they name.
    fn type_name(&self, at: Ref, depth: usize) -> Result<String, String> {
        if depth == 0 {
            return Err("a type nested too deep".into());
        }
        let die = self.get(at)?;
        match die.tag {
            constants::DW_TAG_array_type => {
                let elem = die.ty.clone().ok_or("an array without an element type")??;
                let count = self.array_count(die)?;
                Ok(format!("[{}; {count}]", self.type_name(elem, depth - 1)?))
            }
            constants::DW_TAG_pointer_type
            | constants::DW_TAG_reference_type
            | constants::DW_TAG_base_type => die
                .name
                .clone()
                .ok_or_else(|| format!("a type without a name (offset {at:#x})")),
            constants::DW_TAG_const_type | constants::DW_TAG_volatile_type => {
                let inner = die.ty.clone().ok_or("a qualifier without a type")??;
                self.type_name(inner, depth - 1)
            }
            _ => self.qualified(at),
        }
    }

    fn array_count(&self, die: &Die) -> Result<u64, String> {
        die.children
            .iter()
            .filter_map(|c| self.dies.get(c))
            .find(|c| c.tag == constants::DW_TAG_subrange_type)
            .and_then(|s| s.count)
            .ok_or_else(|| "an array without a length".into())
    }

    /// A type's size in bytes.
    fn type_size(&self, at: Ref, depth: usize) -> Result<u64, String> {
        if depth == 0 {
            return Err("a type nested too deep".into());
        }
        let die = self.get(at)?;
        if let Some(s) = die.byte_size {
            return Ok(s);
        }
        match die.tag {
            constants::DW_TAG_pointer_type | constants::DW_TAG_reference_type => {
                Ok(u64::from(die.address_size))
            }
            constants::DW_TAG_array_type => {
                let elem = die.ty.clone().ok_or("an array without an element type")??;
                Ok(self.type_size(elem, depth - 1)? * self.array_count(die)?)
            }
            constants::DW_TAG_const_type
            | constants::DW_TAG_volatile_type
            | constants::DW_TAG_typedef => {
                let inner = die.ty.clone().ok_or("a qualifier without a type")??;
                self.type_size(inner, depth - 1)
            }
            _ => Err(format!(
                "the size of {} is not in the debug information",
                self.type_name(at, depth).unwrap_or_else(|e| e)
            )),
        }
    }

    /// A coroutine type's layout.
    fn layout(&self, at: Ref) -> Result<Layout, String> {
        let die = self.get(at)?;
        let size = die.byte_size.ok_or("no size")?;
        let parts: Vec<&Die> = die
            .children
            .iter()
            .filter_map(|c| self.dies.get(c))
            .filter(|c| c.tag == constants::DW_TAG_variant_part)
            .collect();
        let [part] = parts[..] else {
            return Err(format!("{} variant parts, not one", parts.len()));
        };
        let discr_at = part.discr.clone().ok_or("no discriminant")??;
        let discr = self.get(discr_at)?;
        let discr_offset = discr
            .member_location
            .ok_or("the discriminant has no offset")?;
        let discr_ty = discr.ty.clone().ok_or("the discriminant has no type")??;
        let discr_size = self.type_size(discr_ty, DEPTH)?;
        let mut variants = Vec::new();
        for &v in &part.children {
            let variant = self.get(v)?;
            if variant.tag != constants::DW_TAG_variant {
                continue;
            }
            let discr_value = variant
                .discr_value
                .ok_or("a variant without a discriminant value")?;
            let members: Vec<&Die> = variant
                .children
                .iter()
                .filter_map(|c| self.dies.get(c))
                .filter(|c| c.tag == constants::DW_TAG_member)
                .collect();
            let [member] = members[..] else {
                return Err(format!("a variant of {} members, not one", members.len()));
            };
            if member.member_location.unwrap_or(0) != 0 {
                return Err("a variant not at offset 0".into());
            }
            let vty = member.ty.clone().ok_or("a variant without a type")??;
            let vdie = self.get(vty)?;
            let name = vdie.name.clone().ok_or("a variant type without a name")?;
            let vsize = vdie.byte_size.ok_or("a variant type without a size")?;
            let mut fields = Vec::new();
            for &f in &vdie.children {
                let fd = self.get(f)?;
                if fd.tag != constants::DW_TAG_member {
                    continue;
                }
                let fname = fd.name.clone().ok_or("a saved field without a name")?;
                let offset = fd
                    .member_location
                    .ok_or_else(|| format!("{name}.{fname} has no offset"))?;
                let fty = fd
                    .ty
                    .clone()
                    .ok_or_else(|| format!("{name}.{fname} has no type"))??;
                fields.push(Field {
                    offset,
                    name: fname,
                    type_name: self.type_name(fty, DEPTH)?,
                    size: self.type_size(fty, DEPTH)?,
                });
            }
            fields.sort();
            variants.push(Variant {
                name,
                discr_value,
                size: vsize,
                fields,
            });
        }
        if variants.is_empty() {
            return Err("no variants".into());
        }
        Ok(Layout {
            size,
            align: die.alignment,
            discr: (discr_offset, discr_size),
            variants,
        })
    }
}

/// Whether a structure type's name is a coroutine's: `{async_fn_env#0}`,
/// `{async_block_env#1}`, `{coroutine_env#0}`, ... (a closure's
/// `{closure_env#0}` is not).
fn is_coroutine_name(name: &str) -> bool {
    name.starts_with('{')
        && name.ends_with('}')
        && name.contains("_env#")
        && !name.starts_with("{closure_env#")
}

/// A reference attribute as an offset in `.debug_info`.
fn reference(
    unit: &gimli::Unit<EndianSlice<'_, LittleEndian>>,
    value: AttributeValue<EndianSlice<'_, LittleEndian>>,
) -> Result<Ref, String> {
    match value {
        AttributeValue::UnitRef(o) => o
            .to_debug_info_offset(&unit.header)
            .map(|o| o.0)
            .ok_or_else(|| "a reference outside .debug_info".into()),
        AttributeValue::DebugInfoRef(o) => Ok(o.0),
        other => Err(format!(
            "a reference of a form this reader does not follow ({other:?})"
        )),
    }
}

fn text(
    dwarf: &gimli::Dwarf<EndianSlice<'_, LittleEndian>>,
    unit: &gimli::Unit<EndianSlice<'_, LittleEndian>>,
    value: AttributeValue<EndianSlice<'_, LittleEndian>>,
) -> Option<String> {
    let s = dwarf.attr_string(unit, value).ok()?;
    Some(String::from_utf8_lossy(s.slice()).into_owned())
}

/// A debug section's bytes with the object's relocations applied (in an
/// object, a string's offset in `.debug_str`, an abbreviation table's,
/// are relocations); empty if absent.
fn relocated(file: &object::File<'_>, name: &str) -> Result<Vec<u8>, String> {
    let Some(section) = file.section_by_name(name) else {
        return Ok(Vec::new());
    };
    let mut data = section
        .uncompressed_data()
        .map_err(|e| format!("{name}: {e}"))?
        .into_owned();
    for (offset, r) in section.relocations() {
        let RelocationFlags::Elf { r_type } = r.flags() else {
            return Err(format!("{name}: not an ELF relocation"));
        };
        let base = match r.target() {
            RelocationTarget::Symbol(si) => file
                .symbol_by_index(si)
                .map_err(|e| format!("{name}: {e}"))?
                .address(),
            RelocationTarget::Section(_) => 0,
            _ => return Err(format!("{name}: a relocation to an absolute address")),
        };
        let value = (base as i64).wrapping_add(r.addend()) as u64;
        let at = offset as usize;
        match r_type {
            elf::R_X86_64_64 if at + 8 <= data.len() => {
                data[at..at + 8].copy_from_slice(&value.to_le_bytes());
            }
            elf::R_X86_64_32 if at + 4 <= data.len() => {
                data[at..at + 4].copy_from_slice(&(value as u32).to_le_bytes());
            }
            // A thread-local variable's location: not read here.
            elf::R_X86_64_DTPOFF32 | elf::R_X86_64_DTPOFF64 => {}
            _ => return Err(format!("{name}: relocation type {r_type} at {offset:#x}")),
        }
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::process::Command;

    use super::{StateMachine, state_machine};
    use crate::source::objects::Build;

    /// A library `svc` compiled by rustc into one object with full debug
    /// information, as the wrapper compiles the service library.
    struct Lib {
        dir: PathBuf,
        object: Vec<u8>,
    }

    impl Lib {
        fn compile(tag: &str, source: &str, flags: &[&str]) -> Lib {
            let dir = std::env::temp_dir().join(format!(
                "cargo-hotpatch-coroutine-{}-{tag}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("lib.rs"), source).unwrap();
            let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
            let out = Command::new(rustc)
                .current_dir(&dir)
                .args([
                    "--edition=2021",
                    "--crate-type=lib",
                    "--crate-name=svc",
                    "--emit=obj",
                    "-C",
                    "codegen-units=1",
                    "-o",
                    "svc.o",
                    "lib.rs",
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

    /// The symbol whose demangled name (without hash) is `path`.
    fn symbol(build: &Build<'_>, path: &str) -> String {
        let found: Vec<&String> = build
            .by_name
            .keys()
            .filter(|n| format!("{:#}", rustc_demangle::demangle(n)) == path)
            .collect();
        assert_eq!(found.len(), 1, "{path}: {found:?}");
        found[0].clone()
    }

    /// An async fn with two suspend points and locals saved across them,
    /// an async block, and a plain function. `run` polls each future
    /// through `dyn Future`, so each resume function is compiled out of
    /// line (a poll function is often too big to inline in a service).
    const SOURCE: &str = "\
use core::future::Future;
use core::pin::Pin;
use core::task::{Context, Poll, Waker};

pub async fn tick() {
    core::hint::black_box(());
}

pub async fn work(n: u32) -> u64 {
    let buf: Vec<u8> = vec![1; n as usize];
    let x: u64 = n as u64 * 5;
    let k: u32 = n + 1;
    tick().await;
    let y = buf.len() as u64 + x as u64;
    tick().await;
    y + x as u64 + k as u64
}

pub fn block(n: u32) -> impl Future<Output = u32> {
    async move {
        let m: u32 = n * 2;
        tick().await;
        m + n
    }
}

#[inline(never)]
pub fn plain(x: u32) -> u32 {
    x.wrapping_mul(7) + 1
}

#[inline(never)]
pub fn run<T>(mut f: Pin<Box<dyn Future<Output = T>>>) -> Poll<T> {
    let mut cx = Context::from_waker(Waker::noop());
    f.as_mut().poll(&mut cx)
}

/// `work`'s poll function inlined into a plain function.
#[inline(never)]
pub fn poll_once(n: u32) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    let mut f = core::pin::pin!(work(n));
    f.as_mut().poll(&mut cx).is_ready()
}

pub fn drive(n: u32) -> u32 {
    let _ = run(Box::pin(work(n)));
    let _ = run(Box::pin(block(n)));
    plain(n)
}
";

    const WORK: &str = "svc::work::{{closure}}";
    const BLOCK: &str = "svc::block::{{closure}}";

    /// Compiles `SOURCE` and `SOURCE` with `from` replaced by `to` (at
    /// `opt`), and returns what `state_machine` says of `path`, after
    /// checking that its code changed (so the case is one the lead's
    /// classification would ask about).
    fn compare(path: &str, from: &str, to: &str, opt: &str) -> StateMachine {
        assert!(SOURCE.contains(from), "{from}");
        let head_source = SOURCE.replace(from, to);
        let flags = ["-C", opt, "-C", "debuginfo=2"];
        let tag = format!(
            "{}-{}",
            std::thread::current()
                .name()
                .unwrap_or("t")
                .replace("::", "-"),
            opt
        );
        let base = Lib::compile(&format!("{tag}-base"), SOURCE, &flags);
        let head = Lib::compile(&format!("{tag}-head"), &head_source, &flags);
        let (b, h) = (base.build(), head.build());
        let (bs, hs) = (symbol(&b, path), symbol(&h, path));
        assert_eq!(bs, hs, "the symbol is the same in both builds");
        assert_ne!(
            b.hash(b.by_name[&bs]),
            h.hash(h.by_name[&hs]),
            "{path}'s code changed from {from} to {to}"
        );
        state_machine(&b, &h, &bs)
    }

    fn differs(answer: &StateMachine, words: &[&str]) {
        let StateMachine::Differs(what) = answer else {
            panic!("not Differs: {answer:?}");
        };
        println!("{what}");
        for w in words {
            assert!(what.contains(w), "{what:?} does not say {w:?}");
        }
    }

    #[test]
    fn code_changed_between_two_awaits_with_the_same_locals_is_the_same() {
        for opt in ["opt-level=3", "opt-level=0"] {
            let answer = compare(
                WORK,
                "let y = buf.len() as u64 + x as u64;",
                "let y = (buf.len() as u64).wrapping_mul(3) ^ x as u64;",
                opt,
            );
            assert_eq!(answer, StateMachine::Same, "{opt}");
        }
    }

    #[test]
    fn an_added_await_differs() {
        let answer = compare(
            WORK,
            "    y + x as u64 + k as u64",
            "    tick().await;\n    y + x as u64 + k as u64",
            "opt-level=3",
        );
        differs(&answer, &["svc::work::{async_fn_env#0}", "Suspend2"]);
    }

    #[test]
    fn a_new_local_kept_across_an_await_differs() {
        let answer = compare(
            WORK,
            "    tick().await;\n    y + x as u64",
            "    let z: u64 = y.rotate_left(3);\n    tick().await;\n    y + z + x as u64",
            "opt-level=3",
        );
        differs(
            &answer,
            &["Suspend1 saves `z: u64`", "in the head, not in the base"],
        );
    }

    #[test]
    fn a_saved_local_of_another_size_differs() {
        let answer = compare(
            WORK,
            "let k: u32 = n + 1;",
            "let k: u64 = n as u64 + 1;",
            "opt-level=3",
        );
        differs(
            &answer,
            &[
                "svc::work::{async_fn_env#0}: ",
                "`k: u64` (8 bytes)",
                "`k: u32` (4 bytes)",
            ],
        );
    }

    /// `u64` to `i64`: the same size and alignment, so the bytes a
    /// suspended future holds would be read the same; but the type name
    /// differs, and this check compares names, not what a type means (a
    /// `u64` and an `i64`, or two structs of the same size, are not
    /// interchangeable in general). Differs is the safe answer.
    #[test]
    fn a_saved_local_of_another_type_of_the_same_size_differs() {
        let answer = compare(
            WORK,
            "let x: u64 = n as u64 * 5;",
            "let x: i64 = n as i64 * -5;",
            "opt-level=3",
        );
        differs(
            &answer,
            &[
                "Suspend0 saves `x: i64` (8 bytes) at offset",
                "`x: u64` (8 bytes)",
            ],
        );
    }

    #[test]
    fn a_function_that_is_not_async_is_not_a_coroutine() {
        let answer = compare(
            "svc::plain",
            "x.wrapping_mul(7) + 1",
            "x.wrapping_mul(9) + 1",
            "opt-level=3",
        );
        assert_eq!(answer, StateMachine::NotACoroutine);
    }

    #[test]
    fn an_async_block_is_checked_like_an_async_fn() {
        let same = compare(BLOCK, "m + n", "m ^ n", "opt-level=3");
        assert_eq!(same, StateMachine::Same);
        let added = compare(
            BLOCK,
            "        m + n\n",
            "        let w: u64 = m as u64 * 3;\n        tick().await;\n        m + n + w as u32\n",
            "opt-level=3",
        );
        differs(&added, &["svc::block::{async_block_env#0}"]);
    }

    /// The drop glue of a future reads its state to drop what the suspend
    /// point saved: it handles the state machine too.
    #[test]
    fn the_drop_glue_of_a_changed_state_machine_differs() {
        let answer = compare(
            "core::ptr::drop_in_place<svc::work::{{closure}}>",
            "    tick().await;\n    y + x as u64",
            "    let z: Vec<u64> = vec![y];\n    tick().await;\n    y + z[0] + x as u64",
            "opt-level=3",
        );
        differs(&answer, &["svc::work::{async_fn_env#0}"]);
    }

    /// A function with a resume function inlined into it runs that state
    /// machine's code: it is checked as the resume function is.
    #[test]
    fn a_function_with_a_poll_function_inlined_into_it_is_checked() {
        let answer = compare(
            "svc::poll_once",
            "    tick().await;\n    y + x as u64",
            "    let z: u64 = y.rotate_left(3);\n    tick().await;\n    y + z + x as u64",
            "opt-level=3",
        );
        differs(&answer, &["Suspend1 saves `z: u64`"]);
    }

    /// Line tables only (the wrapper's setting before type information):
    /// the function is found, its types are not, so nothing is proved.
    #[test]
    fn without_type_information_nothing_is_proved() {
        let flags = ["-C", "opt-level=3", "-C", "debuginfo=line-tables-only"];
        let base = Lib::compile("lines-base", SOURCE, &flags);
        let b = base.build();
        for path in [WORK, "svc::plain"] {
            let s = symbol(&b, path);
            let answer = state_machine(&b, &b, &s);
            assert!(
                matches!(answer, StateMachine::Unknown(_)),
                "{path}: {answer:?}"
            );
        }
        let none = Lib::compile("none-base", SOURCE, &["-C", "opt-level=3"]);
        let n = none.build();
        let s = symbol(&n, WORK);
        assert!(matches!(
            state_machine(&n, &n, &s),
            StateMachine::Unknown(_)
        ));
    }
}
