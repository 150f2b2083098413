//! From a demangled symbol path to the function it names in the source.

use super::{Item, Kind, Owner};

/// A demangled path, read: the forms it may name, and the names the
/// function may have in the source.
#[derive(Debug)]
pub(super) struct Query {
    forms: Vec<Form>,
    names: Vec<Name>,
}

/// One reading of the path before the function's name.
#[derive(Debug)]
struct Form {
    /// The module path (below the crate root) the function, or its type,
    /// is in, as far as the symbol says.
    scope: Vec<String>,
    /// The type of a method (its bare name).
    ty: Option<String>,
    /// The trait of a trait method (its bare name), from `<T as Trait>`.
    trait_: Option<String>,
    /// The trait's generic arguments as the symbol gives them
    /// ([`generic_args`]: `From<&str>` -> `<&str>`), when it has some:
    /// `impl From<String>` and `impl From<&str>` of one type are told
    /// apart by them.
    trait_args: Option<String>,
}

/// One name the function may have in the source.
#[derive(Debug)]
struct Name {
    name: String,
    /// For `__hotpatch_original_Trait_method`: the trait.
    trait_: Option<String>,
}

/// The prefixes of the `#[patchable]` macro's functions that carry the
/// user's code or stand for it: `__hotpatch_original_f` (the body),
/// `__hotpatch_dispatch_f` (the transition shim).
const GENERATED: [&str; 2] = ["__hotpatch_original_", "__hotpatch_dispatch_"];

impl Query {
    /// `None` if the path is not of crate `crate_name`.
    pub(super) fn parse(demangled: &str, crate_name: &str) -> Option<Query> {
        let mut segs = split_top(demangled.trim(), "::");
        // `::h0123456789abcdef` (legacy hash), `{{closure}}`,
        // `{closure#0}`, `{shim:vtable#0}`: the enclosing function.
        if segs.last().is_some_and(|s| is_legacy_hash(s)) {
            segs.pop();
        }
        while segs.last().is_some_and(|s| s.starts_with('{')) {
            segs.pop();
        }
        let (last, before) = segs.split_last()?;
        let name = bare(last);
        let forms = if let Some(qualified) = before.first().filter(|s| s.starts_with('<')) {
            if before.len() != 1 {
                // `<A as B>::f::g`: a function nested in a method; found by
                // name below.
                Vec::new()
            } else {
                vec![qualified_form(qualified, crate_name)?]
            }
        } else {
            let (krate, path) = before.split_first()?;
            if bare(krate) != crate_name {
                return None;
            }
            let path: Vec<String> = path.iter().map(|s| bare(s)).collect();
            let mut forms = vec![Form {
                scope: path.clone(),
                ty: None,
                trait_: None,
                trait_args: None,
            }];
            if let Some((ty, scope)) = path.split_last() {
                forms.push(Form {
                    scope: scope.to_vec(),
                    ty: Some(ty.clone()),
                    trait_: None,
                    trait_args: None,
                });
            }
            forms
        };
        if forms.is_empty() && !demangled.contains(&format!("{crate_name}::")) {
            return None;
        }
        let mut names = Vec::new();
        match GENERATED.iter().find_map(|p| name.strip_prefix(p)) {
            Some(rest) => {
                names.push(Name {
                    name: rest.to_owned(),
                    trait_: None,
                });
                // `Trait_method`: every split at `_` is a candidate; the
                // trait must exist on the type for it to match.
                for (i, _) in rest.match_indices('_') {
                    if i > 0 && i + 1 < rest.len() {
                        names.push(Name {
                            name: rest[i + 1..].to_owned(),
                            trait_: Some(rest[..i].to_owned()),
                        });
                    }
                }
            }
            None => names.push(Name { name, trait_: None }),
        }
        Some(Query { forms, names })
    }
}

/// `<svc::Cart as svc::Describe>` or `<svc::Cart>` (v0).
fn qualified_form(qualified: &str, crate_name: &str) -> Option<Form> {
    let inner = qualified.strip_prefix('<')?.strip_suffix('>')?;
    let parts = split_top(inner, " as ");
    let (self_part, trait_part) = match parts.as_slice() {
        [s] => (s.as_str(), None),
        [s, t] => (s.as_str(), Some(t.as_str())),
        _ => return None,
    };
    let mut self_part = self_part.trim();
    for p in ["&mut ", "&", "*const ", "*mut ", "dyn ", "mut "] {
        self_part = self_part.strip_prefix(p).unwrap_or(self_part).trim_start();
    }
    let self_part = self_part
        .strip_prefix('[')
        .map(|s| s.split(';').next().unwrap_or(s).trim_end_matches(']'))
        .unwrap_or(self_part);
    let self_segs: Vec<String> = split_top(self_part, "::").iter().map(|s| bare(s)).collect();
    let trait_segs: Vec<String> = trait_part
        .map(|t| split_top(t, "::").iter().map(|s| bare(s)).collect())
        .unwrap_or_default();
    let trait_args = trait_part
        .and_then(|t| split_top(t, "::").last().cloned())
        .and_then(|last| generic_args(&last));
    let ours = |segs: &[String]| segs.len() > 1 && segs[0] == crate_name;
    let scope = if ours(&self_segs) {
        self_segs[1..self_segs.len() - 1].to_vec()
    } else if ours(&trait_segs) {
        trait_segs[1..trait_segs.len() - 1].to_vec()
    } else {
        return None;
    };
    Some(Form {
        scope,
        ty: self_segs.last().cloned(),
        trait_: trait_segs.last().cloned(),
        trait_args,
    })
}

/// The generic arguments of a path segment, comparable between a symbol
/// and the source: whitespace and every path before a name left out
/// (`From<alloc::string::String>` and `From<String>` both give
/// `<String>`). `None` without arguments.
fn generic_args(segment: &str) -> Option<String> {
    let start = segment.find('<')?;
    let compact: String = segment[start..]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    let mut out = String::new();
    let mut word = String::new();
    let mut chars = compact.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_alphanumeric() || c == '_' {
            word.push(c);
        } else if c == ':' && chars.peek() == Some(&':') {
            // `a::b::C`: only `C` stays.
            chars.next();
            word.clear();
        } else {
            out.push_str(&word);
            word.clear();
            out.push(c);
        }
    }
    out.push_str(&word);
    Some(out)
}

/// `Cart` for `Cart<u32>`, `svc` for `svc[1a2b3c]` (v0 disambiguator).
fn bare(seg: &str) -> String {
    let end = seg.find(['<', '[']).unwrap_or(seg.len());
    seg[..end].trim().to_owned()
}

fn is_legacy_hash(seg: &str) -> bool {
    seg.len() == 17 && seg.starts_with('h') && seg[1..].bytes().all(|b| b.is_ascii_hexdigit())
}

/// Splits at `sep` outside `<..>`, `(..)`, `[..]` and `{..}` (the `>` of
/// `->` does not close anything).
fn split_top(s: &str, sep: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'<' | b'(' | b'[' | b'{' => depth += 1,
            b'>' if i > 0 && bytes[i - 1] == b'-' => {}
            b'>' | b')' | b']' | b'}' => depth = depth.saturating_sub(1),
            _ if depth == 0 && s[i..].starts_with(sep) => {
                out.push(s[start..i].to_owned());
                i += sep.len();
                start = i;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    out.push(s[start..].to_owned());
    out
}

/// How well `item` answers `form` and `name`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fit {
    /// Module path, type and trait all as the symbol says.
    Exact,
    /// The type and trait as the symbol says, in another module (a method
    /// of a type defined elsewhere).
    Type,
    /// A trait's default method, for `<T as Trait>::f` with no `f` in
    /// the impl.
    TraitDefault,
}

fn fit(item: &Item, form: &Form, name: &Name) -> Option<Fit> {
    if item.name != name.name || !matches!(item.kind, Kind::Fn { .. }) {
        return None;
    }
    let trait_ = match (&form.trait_, &name.trait_) {
        (Some(a), Some(b)) if a != b => return None,
        (a, b) => a.as_ref().or(b.as_ref()),
    };
    let same_scope = item.scope == form.scope;
    match (&form.ty, &item.owner) {
        (None, None) if trait_.is_none() && same_scope => Some(Fit::Exact),
        (
            Some(ty),
            Some(Owner::Impl {
                self_ident,
                trait_: imp_trait,
                ..
            }),
        ) if self_ident == ty
            && imp_trait.as_ref().map(|t| &t.1) == trait_
            && form.trait_args.as_ref().is_none_or(|args| {
                imp_trait.as_ref().and_then(|t| generic_args(&t.0)).as_ref() == Some(args)
            }) =>
        {
            Some(if same_scope { Fit::Exact } else { Fit::Type })
        }
        // Legacy `svc::Describe::describe`: a trait's default method.
        (Some(ty), Some(Owner::Trait { ident })) if trait_.is_none() && ident == ty => {
            Some(if same_scope { Fit::Exact } else { Fit::Type })
        }
        (Some(_), Some(Owner::Trait { ident })) if trait_ == Some(ident) => Some(Fit::TraitDefault),
        _ => None,
    }
}

/// The best match: exact first, then by `Type::name`, then a trait's
/// default method, then by name alone; a level that names more than one
/// item answers nothing.
pub(super) fn find<'a>(items: &'a [Item], q: &Query) -> Option<&'a Item> {
    find_at(items, q, true)
}

/// [`find`] without its last resort (a function found by its name alone):
/// what the path itself says.
pub(super) fn find_by_path<'a>(items: &'a [Item], q: &Query) -> Option<&'a Item> {
    find_at(items, q, false)
}

fn find_at<'a>(items: &'a [Item], q: &Query, by_name: bool) -> Option<&'a Item> {
    let fns = || items.iter().filter(|i| matches!(i.kind, Kind::Fn { .. }));
    for level in [Fit::Exact, Fit::Type, Fit::TraitDefault] {
        let found: Vec<&Item> = fns()
            .filter(|i| {
                q.forms
                    .iter()
                    .any(|f| q.names.iter().any(|n| fit(i, f, n) == Some(level)))
            })
            .collect();
        if let Some(one) = unique(&found) {
            return Some(one);
        }
        if !found.is_empty() {
            // Two functions the symbol cannot tell apart (the same trait
            // with arguments the symbol does not spell): no answer rather
            // than a wrong one.
            return None;
        }
    }
    if !by_name {
        return None;
    }
    // By name alone.
    let found: Vec<&Item> = fns()
        .filter(|i| {
            q.names.iter().any(|n| {
                i.name == n.name
                    && n.trait_.as_ref().is_none_or(|t| {
                        matches!(&i.owner, Some(Owner::Impl { trait_: Some((_, it)), .. }) if it == t)
                    })
            })
        })
        .collect();
    unique(&found)
}

/// The one item of `found`, counting items of one key (a function under
/// two `cfg`s) as one.
fn unique<'a>(found: &[&'a Item]) -> Option<&'a Item> {
    let first = found.first()?;
    let key = first.key();
    found.iter().all(|i| i.key() == key).then_some(*first)
}
