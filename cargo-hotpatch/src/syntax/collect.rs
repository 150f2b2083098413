//! Reading a crate: module resolution as rustc does it
//! (`rustc_expand::module`), and the items the comparison needs.

use super::normalize::{stream, text};
use super::{CrateSource, Item, Kind, Layout, Location, Owner, Signature, StaticKind, SyntaxError};
use proc_macro2::Span;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use syn::parse::{Parse, ParseStream};
use syn::spanned::Spanned;
use syn::visit::Visit;
use syn::visit_mut::VisitMut;
use syn::{Attribute, Expr, Ident, Meta, Token, Type, Visibility};

/// Parses one crate's library source: `lib_rs` (relative to `crate_dir`
/// or absolute) and every module it reaches, as rustc resolves them.
/// Modules under `#[cfg(test)]` are not read.
///
/// # Errors
///
/// [`SyntaxError`] naming the file (and line): a file that cannot be
/// read or parsed, a `mod x;` with no file (or two), circular modules,
/// a `#[path]` that is not a string.
pub fn parse_crate(crate_dir: &Path, lib_rs: &Path) -> Result<CrateSource, SyntaxError> {
    let root = relative_to(crate_dir, lib_rs);
    let mut c = Collector {
        crate_dir,
        files: Vec::new(),
        items: Vec::new(),
        skeletons: BTreeMap::new(),
        stack: Vec::new(),
        main_own: None,
    };
    let dir = ModDir {
        dir: root.parent().map(Path::to_path_buf).unwrap_or_default(),
        own: Own::Owned { relative: None },
    };
    c.load_file(&root, dir, Vec::new())?;
    Ok(CrateSource {
        crate_name: super::crate_name_of(crate_dir),
        files: c.files,
        items: c.items,
        skeletons: c.skeletons,
        main_own: c.main_own,
    })
}

/// The code of `main`'s body that is `main`'s own: the body with every
/// closure, `async` block and item written in it left out (each stands
/// as `_`), as normalized token text. `main` runs once per process, and
/// what it runs itself (an `async fn main`'s body included: the runtime's
/// `block_on`, entered once from `main`, polls it) runs in that one call;
/// a closure or `async` block it hands to a thread or a task, or a
/// function it defines, is code of its own that may be called again.
/// Macro arguments are opaque tokens, and count as `main`'s own.
fn main_own(block: &syn::Block) -> String {
    struct Own;
    impl VisitMut for Own {
        fn visit_expr_mut(&mut self, e: &mut Expr) {
            if matches!(e, Expr::Closure(_) | Expr::Async(_)) {
                *e = syn::parse_quote!(_);
            } else {
                syn::visit_mut::visit_expr_mut(self, e);
            }
        }
        fn visit_stmt_mut(&mut self, s: &mut syn::Stmt) {
            if let syn::Stmt::Item(_) = s {
                *s = syn::parse_quote!(_;);
            } else {
                syn::visit_mut::visit_stmt_mut(self, s);
            }
        }
    }
    let mut block = block.clone();
    Own.visit_block_mut(&mut block);
    text(&block)
}

/// `path` relative to `dir` when it is inside it, else as given.
fn relative_to(dir: &Path, path: &Path) -> PathBuf {
    if path.is_relative() {
        return path.to_path_buf();
    }
    if let Ok(rel) = path.strip_prefix(dir) {
        return rel.to_path_buf();
    }
    if let (Ok(d), Ok(p)) = (dir.canonicalize(), path.canonicalize())
        && let Ok(rel) = p.strip_prefix(&d)
    {
        return rel.to_path_buf();
    }
    path.to_path_buf()
}

/// Where a module's `mod x;` declarations look for files: rustc's
/// `dir_path` and `DirOwnership`.
#[derive(Clone)]
struct ModDir {
    /// Relative to the crate directory.
    dir: PathBuf,
    own: Own,
}

#[derive(Clone)]
enum Own {
    /// A file module: `relative` is `Some(a)` for `a.rs` (not `mod.rs`,
    /// not loaded by `#[path]`), whose submodules are in `a/`.
    Owned { relative: Option<String> },
    /// Inside a function body: `mod x;` needs `#[path]`.
    Block,
}

struct Collector<'a> {
    crate_dir: &'a Path,
    files: Vec<PathBuf>,
    items: Vec<Item>,
    skeletons: BTreeMap<PathBuf, String>,
    /// The files being read, outermost first (circular modules).
    stack: Vec<PathBuf>,
    /// The crate root's `fn main`: its own code (see [`main_own`]) and
    /// where it is.
    main_own: Option<(String, Location)>,
}

/// What one list of items is read in.
struct Ctx<'a> {
    file: &'a Path,
    scope: Vec<String>,
    dir: ModDir,
}

fn line_of(span: Span) -> usize {
    span.start().line
}

impl Collector<'_> {
    fn load_file(
        &mut self,
        rel: &Path,
        dir: ModDir,
        scope: Vec<String>,
    ) -> Result<(), SyntaxError> {
        let full = self.crate_dir.join(rel);
        let text = std::fs::read_to_string(&full).map_err(|source| SyntaxError::Read {
            path: full.clone(),
            source,
        })?;
        let file = syn::parse_file(&text).map_err(|e| parse_error(rel, &e))?;
        self.skeletons.insert(rel.to_path_buf(), skeleton(&file));
        let id = full.canonicalize().unwrap_or(full);
        self.stack.push(id);
        self.files.push(rel.to_path_buf());
        let ctx = Ctx {
            file: rel,
            scope,
            dir,
        };
        let result = self.items(file.items.iter(), &ctx);
        self.stack.pop();
        result
    }

    fn items<'i>(
        &mut self,
        items: impl Iterator<Item = &'i syn::Item>,
        ctx: &Ctx<'_>,
    ) -> Result<(), SyntaxError> {
        for item in items {
            self.item(item, ctx)?;
        }
        Ok(())
    }

    fn push(&mut self, ctx: &Ctx<'_>, owner: Option<Owner>, ident: &Ident, kind: Kind) {
        let line = line_of(ident.span());
        self.push_spanning(ctx, owner, ident, kind, (line, line));
    }

    /// Pushes an item that spans `lines` (first and last, inclusive).
    fn push_spanning(
        &mut self,
        ctx: &Ctx<'_>,
        owner: Option<Owner>,
        ident: &Ident,
        kind: Kind,
        lines: (usize, usize),
    ) {
        self.items.push(Item {
            scope: ctx.scope.clone(),
            owner,
            name: ident.to_string(),
            kind,
            loc: Location {
                file: ctx.file.to_path_buf(),
                line: line_of(ident.span()),
            },
            lines,
        });
    }

    fn item(&mut self, item: &syn::Item, ctx: &Ctx<'_>) -> Result<(), SyntaxError> {
        match item {
            syn::Item::Mod(m) if !is_cfg_test(&m.attrs) => self.module(m, ctx)?,
            syn::Item::Fn(f) if !is_cfg_test(&f.attrs) => {
                let patchable = patchable_attr(&f.attrs) == Some(false);
                let kind = Kind::Fn {
                    sig: signature(&f.sig),
                    patchable,
                    copied: copied_into_users(is_pub(&f.vis), &f.attrs, &f.sig, None),
                    body: text(&f.block),
                    names: names(&f.block),
                    attrs: attrs_text(&f.attrs),
                };
                let lines = fn_lines(f.span(), &f.block);
                if ctx.scope.is_empty() && f.sig.ident == "main" {
                    self.main_own = Some((
                        main_own(&f.block),
                        Location {
                            file: ctx.file.to_path_buf(),
                            line: line_of(f.sig.ident.span()),
                        },
                    ));
                }
                self.push_spanning(ctx, None, &f.sig.ident, kind, lines);
                self.body(&f.block, ctx, f.sig.ident.to_string())?;
            }
            syn::Item::Impl(imp) if !is_cfg_test(&imp.attrs) => {
                let owner = owner_of(imp);
                let all = patchable_attr(&imp.attrs) == Some(false);
                for it in &imp.items {
                    match it {
                        syn::ImplItem::Fn(m) if !is_cfg_test(&m.attrs) => {
                            let patchable = all && patchable_attr(&m.attrs) != Some(true);
                            let kind = Kind::Fn {
                                sig: signature(&m.sig),
                                patchable,
                                copied: copied_into_users(
                                    is_pub(&m.vis),
                                    &m.attrs,
                                    &m.sig,
                                    Some(&imp.generics),
                                ),
                                body: text(&m.block),
                                names: names(&m.block),
                                attrs: attrs_text(&m.attrs),
                            };
                            let lines = fn_lines(m.span(), &m.block);
                            self.push_spanning(ctx, Some(owner.clone()), &m.sig.ident, kind, lines);
                            self.body(
                                &m.block,
                                ctx,
                                format!("{}::{}", owner_segment(&owner), m.sig.ident),
                            )?;
                        }
                        syn::ImplItem::Const(c) if !is_cfg_test(&c.attrs) => {
                            let kind = Kind::Const {
                                ty: text(&c.ty),
                                value: text(&c.expr),
                            };
                            self.push(ctx, Some(owner.clone()), &c.ident, kind);
                        }
                        _ => {}
                    }
                }
            }
            syn::Item::Trait(t) if !is_cfg_test(&t.attrs) => {
                let owner = Owner::Trait {
                    ident: t.ident.to_string(),
                };
                for it in &t.items {
                    match it {
                        syn::TraitItem::Fn(m) if !is_cfg_test(&m.attrs) => {
                            // Only a default method has code (and a symbol).
                            let Some(block) = &m.default else { continue };
                            let kind = Kind::Fn {
                                sig: signature(&m.sig),
                                patchable: false,
                                // A default method is as public as its trait.
                                copied: copied_into_users(
                                    is_pub(&t.vis),
                                    &m.attrs,
                                    &m.sig,
                                    Some(&t.generics),
                                ),
                                body: text(block),
                                names: names(block),
                                attrs: attrs_text(&m.attrs),
                            };
                            let lines = fn_lines(m.span(), block);
                            self.push_spanning(ctx, Some(owner.clone()), &m.sig.ident, kind, lines);
                            self.body(block, ctx, format!("{}::{}", t.ident, m.sig.ident))?;
                        }
                        syn::TraitItem::Const(c) if !is_cfg_test(&c.attrs) => {
                            if let Some((_, expr)) = &c.default {
                                let kind = Kind::Const {
                                    ty: text(&c.ty),
                                    value: text(expr),
                                };
                                self.push(ctx, Some(owner.clone()), &c.ident, kind);
                            }
                        }
                        _ => {}
                    }
                }
            }
            syn::Item::Struct(s) if !is_cfg_test(&s.attrs) => {
                let body = fields(&s.fields);
                let kind = type_kind("struct", &s.attrs, &s.generics, body);
                self.push(ctx, None, &s.ident, kind);
            }
            syn::Item::Union(u) if !is_cfg_test(&u.attrs) => {
                let body = named_fields(&u.fields);
                let kind = type_kind("union", &u.attrs, &u.generics, body);
                self.push(ctx, None, &u.ident, kind);
            }
            syn::Item::Enum(e) if !is_cfg_test(&e.attrs) => {
                let body = e
                    .variants
                    .iter()
                    .map(|v| {
                        let disc = v
                            .discriminant
                            .as_ref()
                            .map(|(_, d)| format!(" = {}", text(d)))
                            .unwrap_or_default();
                        format!(
                            "{}{}{}{disc}",
                            layout_attrs(&v.attrs),
                            v.ident,
                            fields(&v.fields)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(" , ");
                let kind = type_kind("enum", &e.attrs, &e.generics, body);
                self.push(ctx, None, &e.ident, kind);
            }
            syn::Item::Type(t) if !is_cfg_test(&t.attrs) => {
                // A type alias: a field of that type changes layout with it.
                let kind = type_kind("type alias", &t.attrs, &t.generics, text(&t.ty));
                self.push(ctx, None, &t.ident, kind);
            }
            syn::Item::Static(s) if !is_cfg_test(&s.attrs) => {
                let kind = match s.mutability {
                    syn::StaticMutability::Mut(_) => StaticKind::StaticMut,
                    _ => StaticKind::Static,
                };
                let kind = Kind::Static {
                    kind,
                    ty: text(&s.ty),
                    init: text(&s.expr),
                };
                self.push(ctx, None, &s.ident, kind);
            }
            syn::Item::Const(c) if !is_cfg_test(&c.attrs) => {
                let kind = Kind::Const {
                    ty: text(&c.ty),
                    value: text(&c.expr),
                };
                self.push(ctx, None, &c.ident, kind);
            }
            syn::Item::Macro(m) if !is_cfg_test(&m.attrs) => match &m.ident {
                Some(ident) if m.mac.path.is_ident("macro_rules") => {
                    let kind = Kind::Macro {
                        rules: stream(m.mac.tokens.clone()),
                    };
                    self.push(ctx, None, ident, kind);
                }
                _ => self.thread_local(&m.mac, ctx)?,
            },
            _ => {}
        }
        Ok(())
    }

    /// Items in a function body: scoped under the function's name, and
    /// `mod x;` there needs `#[path]`.
    fn body(
        &mut self,
        block: &syn::Block,
        ctx: &Ctx<'_>,
        fn_name: String,
    ) -> Result<(), SyntaxError> {
        let mut found = BodyItems::default();
        found.visit_block(block);
        if found.items.is_empty() && found.macros.is_empty() {
            return Ok(());
        }
        let mut scope = ctx.scope.clone();
        scope.push(fn_name);
        let inner = Ctx {
            file: ctx.file,
            scope,
            dir: ModDir {
                dir: ctx.dir.dir.clone(),
                own: Own::Block,
            },
        };
        self.items(found.items.into_iter(), &inner)?;
        for mac in found.macros {
            self.thread_local(mac, &inner)?;
        }
        Ok(())
    }

    fn thread_local(&mut self, mac: &syn::Macro, ctx: &Ctx<'_>) -> Result<(), SyntaxError> {
        if mac
            .path
            .segments
            .last()
            .is_none_or(|s| s.ident != "thread_local")
        {
            return Ok(());
        }
        let keys: ThreadLocalKeys = mac.parse_body().map_err(|e| parse_error(ctx.file, &e))?;
        for key in keys.0 {
            if is_cfg_test(&key.attrs) {
                continue;
            }
            let kind = Kind::Static {
                kind: StaticKind::ThreadLocal,
                ty: text(&key.ty),
                init: text(&key.init),
            };
            self.push(ctx, None, &key.name, kind);
        }
        Ok(())
    }

    fn module(&mut self, m: &syn::ItemMod, ctx: &Ctx<'_>) -> Result<(), SyntaxError> {
        let name = m.ident.to_string();
        let line = line_of(m.ident.span());
        let bad = |reason| SyntaxError::BadModule {
            file: ctx.file.to_path_buf(),
            line,
            name: name.clone(),
            reason,
        };
        let path_attr = path_attr(&m.attrs).map_err(|()| bad("write `#[path = \"file.rs\"]`"))?;
        let mut scope = ctx.scope.clone();
        scope.push(name.clone());

        if let Some((_, items)) = &m.content {
            // Inline: `#[path]` names the directory of its submodules.
            let dir = match (path_attr, &ctx.dir.own) {
                (Some(p), _) => ModDir {
                    dir: ctx.dir.dir.join(p),
                    own: Own::Owned { relative: None },
                },
                (None, Own::Owned { relative }) => {
                    let mut dir = ctx.dir.dir.clone();
                    if let Some(r) = relative {
                        dir.push(r);
                    }
                    dir.push(&name);
                    ModDir {
                        dir,
                        own: Own::Owned { relative: None },
                    }
                }
                (None, Own::Block) => ModDir {
                    dir: ctx.dir.dir.join(&name),
                    own: Own::Block,
                },
            };
            let inner = Ctx {
                file: ctx.file,
                scope,
                dir,
            };
            return self.items(items.iter(), &inner);
        }

        let (file, dir) = if let Some(p) = path_attr {
            let file = ctx.dir.dir.join(p);
            let dir = ModDir {
                dir: file.parent().map(Path::to_path_buf).unwrap_or_default(),
                own: Own::Owned { relative: None },
            };
            (file, dir)
        } else {
            let relative = match &ctx.dir.own {
                Own::Owned { relative } => relative.as_deref(),
                Own::Block => {
                    return Err(bad(
                        "a `mod name;` in a function body needs `#[path = \"file.rs\"]` (rustc \
                         refuses it too)",
                    ));
                }
            };
            let base = match relative {
                Some(r) => ctx.dir.dir.join(r),
                None => ctx.dir.dir.clone(),
            };
            let default = base.join(format!("{name}.rs"));
            let secondary = base.join(&name).join("mod.rs");
            let exists = |p: &Path| self.crate_dir.join(p).is_file();
            match (exists(&default), exists(&secondary)) {
                (true, false) => {
                    let dir = ModDir {
                        dir: base,
                        own: Own::Owned {
                            relative: Some(name.clone()),
                        },
                    };
                    (default, dir)
                }
                (false, true) => {
                    let dir = ModDir {
                        dir: base.join(&name),
                        own: Own::Owned { relative: None },
                    };
                    (secondary, dir)
                }
                (found, _) => {
                    let candidates = vec![default, secondary];
                    return Err(if found {
                        SyntaxError::AmbiguousModule {
                            file: ctx.file.to_path_buf(),
                            line,
                            name,
                            candidates,
                        }
                    } else {
                        SyntaxError::ModuleNotFound {
                            file: ctx.file.to_path_buf(),
                            line,
                            name,
                            candidates,
                        }
                    });
                }
            }
        };
        let full = self.crate_dir.join(&file);
        let id = full.canonicalize().unwrap_or(full);
        if self.stack.contains(&id) {
            return Err(SyntaxError::CircularModule {
                file: ctx.file.to_path_buf(),
                line,
                name,
                target: file,
            });
        }
        self.load_file(&file, dir, scope)
    }
}

fn parse_error(file: &Path, e: &syn::Error) -> SyntaxError {
    let start = e.span().start();
    SyntaxError::Parse {
        file: file.to_path_buf(),
        line: start.line,
        column: start.column + 1,
        message: e.to_string(),
    }
}

/// The items and macro calls in a function body, not those nested in
/// items found there (each is read with its own scope).
#[derive(Default)]
struct BodyItems<'a> {
    items: Vec<&'a syn::Item>,
    macros: Vec<&'a syn::Macro>,
}

impl<'a> Visit<'a> for BodyItems<'a> {
    fn visit_item(&mut self, i: &'a syn::Item) {
        self.items.push(i);
    }
    fn visit_macro(&mut self, m: &'a syn::Macro) {
        self.macros.push(m);
    }
}

/// The keys of one `thread_local!`:
/// `$(#[attr])* $vis static NAME: T = $(const)? init;`.
struct ThreadLocalKeys(Vec<ThreadLocalKey>);

struct ThreadLocalKey {
    attrs: Vec<Attribute>,
    name: Ident,
    ty: Type,
    init: Expr,
}

impl Parse for ThreadLocalKeys {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let mut keys = Vec::new();
        while !input.is_empty() {
            let attrs = input.call(Attribute::parse_outer)?;
            let _: Visibility = input.parse()?;
            input.parse::<Token![static]>()?;
            let name: Ident = input.parse()?;
            input.parse::<Token![:]>()?;
            let ty: Type = input.parse()?;
            input.parse::<Token![=]>()?;
            // `const { .. }` parses as a const block expression.
            let init: Expr = input.parse()?;
            if !input.is_empty() {
                input.parse::<Token![;]>()?;
            }
            keys.push(ThreadLocalKey {
                attrs,
                name,
                ty,
                init,
            });
        }
        Ok(ThreadLocalKeys(keys))
    }
}

/// `#[cfg(test)]`.
/// The lines a function spans: from its first attribute or keyword to
/// its body's closing brace.
fn fn_lines(item: Span, block: &syn::Block) -> (usize, usize) {
    let start = item.start().line;
    let end = block.brace_token.span.close().end().line;
    (start.min(end), end.max(start))
}

/// A file's text without its functions (free functions, methods, a
/// trait's default methods: each is an item of its own, compared by its
/// signature, attributes and body) and `#[cfg(test)]` items: what the
/// file declares besides functions. Two revisions of a file with the same
/// skeleton differ only in functions.
fn skeleton(file: &syn::File) -> String {
    struct Empty;
    impl VisitMut for Empty {
        fn visit_file_mut(&mut self, f: &mut syn::File) {
            f.items
                .retain(|i| !item_is_cfg_test(i) && !matches!(i, syn::Item::Fn(_)));
            syn::visit_mut::visit_file_mut(self, f);
        }
        fn visit_item_mod_mut(&mut self, m: &mut syn::ItemMod) {
            if let Some((_, items)) = &mut m.content {
                items.retain(|i| !item_is_cfg_test(i) && !matches!(i, syn::Item::Fn(_)));
            }
            syn::visit_mut::visit_item_mod_mut(self, m);
        }
        fn visit_item_impl_mut(&mut self, i: &mut syn::ItemImpl) {
            i.items.retain(|it| !matches!(it, syn::ImplItem::Fn(_)));
            syn::visit_mut::visit_item_impl_mut(self, i);
        }
        fn visit_item_trait_mut(&mut self, t: &mut syn::ItemTrait) {
            // A method without a default is a declaration: it stays.
            t.items
                .retain(|it| !matches!(it, syn::TraitItem::Fn(m) if m.default.is_some()));
            syn::visit_mut::visit_item_trait_mut(self, t);
        }
    }
    let mut file = file.clone();
    Empty.visit_file_mut(&mut file);
    text(&file)
}

/// A function's attributes as normalized text (doc comments left out).
fn attrs_text(attrs: &[Attribute]) -> String {
    attrs.iter().map(text).collect::<Vec<_>>().join(" ")
}

fn item_is_cfg_test(item: &syn::Item) -> bool {
    match item {
        syn::Item::Mod(m) => is_cfg_test(&m.attrs),
        syn::Item::Fn(f) => is_cfg_test(&f.attrs),
        syn::Item::Impl(i) => is_cfg_test(&i.attrs),
        syn::Item::Use(u) => is_cfg_test(&u.attrs),
        syn::Item::Const(c) => is_cfg_test(&c.attrs),
        syn::Item::Static(s) => is_cfg_test(&s.attrs),
        syn::Item::Struct(s) => is_cfg_test(&s.attrs),
        syn::Item::Enum(e) => is_cfg_test(&e.attrs),
        _ => false,
    }
}

fn is_cfg_test(attrs: &[Attribute]) -> bool {
    attrs.iter().any(|a| match &a.meta {
        Meta::List(l) => l.path.is_ident("cfg") && stream(l.tokens.clone()) == "test",
        _ => false,
    })
}

/// `pub` (not `pub(crate)` or narrower): other crates may use it.
fn is_pub(vis: &syn::Visibility) -> bool {
    matches!(vis, syn::Visibility::Public(_))
}

/// Whether a function's code is copied into the crates that use it: it is
/// public, and `#[inline]` or `#[inline(always)]` (not `#[inline(never)]`)
/// or generic over types or consts (its
/// own parameters, `impl Trait` arguments, or its impl's or trait's).
/// Those copies are compiled in the binary crate and other crates, where a
/// patch of this crate's code does not reach.
fn copied_into_users(
    public: bool,
    attrs: &[Attribute],
    sig: &syn::Signature,
    outer: Option<&syn::Generics>,
) -> bool {
    let typed = |g: &syn::Generics| {
        g.params
            .iter()
            .any(|p| !matches!(p, syn::GenericParam::Lifetime(_)))
    };
    let impl_trait_arg = sig.inputs.iter().any(|a| match a {
        syn::FnArg::Typed(p) => text(&p.ty).contains("impl "),
        syn::FnArg::Receiver(_) => false,
    });
    let inline = attrs.iter().any(|a| {
        a.path().is_ident("inline")
            && !matches!(&a.meta, Meta::List(l) if stream(l.tokens.clone()) == "never")
    });
    public && (inline || typed(&sig.generics) || outer.is_some_and(typed) || impl_trait_arg)
}

/// `Some(false)` for `#[patchable]` / `#[hotpatch::patchable]` (any
/// path ending in `patchable`, as the macro itself matches it),
/// `Some(true)` for `#[patchable(skip)]`, `None` without one.
fn patchable_attr(attrs: &[Attribute]) -> Option<bool> {
    attrs.iter().find_map(|a| {
        if a.path().segments.last()?.ident != "patchable" {
            return None;
        }
        Some(match &a.meta {
            Meta::List(l) => stream(l.tokens.clone()) == "skip",
            _ => false,
        })
    })
}

/// `#[path = "x"]`: `Err` if `path` is there but not a string.
fn path_attr(attrs: &[Attribute]) -> Result<Option<String>, ()> {
    for a in attrs {
        if !a.path().is_ident("path") {
            continue;
        }
        if let Meta::NameValue(nv) = &a.meta
            && let Expr::Lit(syn::ExprLit {
                lit: syn::Lit::Str(s),
                ..
            }) = &nv.value
        {
            return Ok(Some(s.value()));
        }
        return Err(());
    }
    Ok(None)
}

fn owner_of(imp: &syn::ItemImpl) -> Owner {
    let self_ty = last_segment_text(&imp.self_ty);
    let self_ident = innermost_ident(&imp.self_ty).unwrap_or_else(|| self_ty.clone());
    let trait_ = imp.trait_.as_ref().and_then(|(_, path, _)| {
        let seg = path.segments.last()?;
        Some((pretty(&text(seg)), seg.ident.to_string()))
    });
    Owner::Impl {
        self_ty,
        self_ident,
        trait_,
    }
}

/// How items in a method's body are scoped: `Cart`, `<Cart as Describe>`.
fn owner_segment(owner: &Owner) -> String {
    match owner {
        Owner::Impl {
            self_ty,
            trait_: None,
            ..
        } => self_ty.clone(),
        Owner::Impl {
            self_ty,
            trait_: Some((tr, _)),
            ..
        } => format!("<{self_ty} as {tr}>"),
        Owner::Trait { ident } => ident.clone(),
    }
}

/// `Cart<T>` for `crate::shop::Cart<T>`; other types as written.
fn last_segment_text(ty: &Type) -> String {
    match ty {
        Type::Path(p) if p.qself.is_none() => match p.path.segments.last() {
            Some(seg) => pretty(&text(seg)),
            None => pretty(&text(ty)),
        },
        _ => pretty(&text(ty)),
    }
}

/// `Cart` for `Cart<T>`, `&Cart`, `&mut shop::Cart`, `[Cart]`.
fn innermost_ident(ty: &Type) -> Option<String> {
    match ty {
        Type::Path(p) => p.path.segments.last().map(|s| s.ident.to_string()),
        Type::Reference(r) => innermost_ident(&r.elem),
        Type::Ptr(p) => innermost_ident(&p.elem),
        Type::Slice(s) => innermost_ident(&s.elem),
        Type::Array(a) => innermost_ident(&a.elem),
        Type::Paren(p) => innermost_ident(&p.elem),
        Type::Group(g) => innermost_ident(&g.elem),
        _ => None,
    }
}

/// Normalized token text made readable for messages (`Vec<u8>`, not
/// `Vec < u8 >`).
pub(super) fn pretty(s: &str) -> String {
    s.replace(" < ", "<")
        .replace("< ", "<")
        .replace(" >", ">")
        .replace(" :: ", "::")
        .replace(" ,", ",")
        .replace("& ", "&")
        .replace("' ", "'")
}

fn signature(sig: &syn::Signature) -> Signature {
    let inputs = sig
        .inputs
        .iter()
        .map(|arg| match arg {
            // `ty` is `Self`, `&Self`, `&mut Self` or the written type; the
            // `mut` of `mut self` is the body's business.
            syn::FnArg::Receiver(r) => text(&r.ty),
            syn::FnArg::Typed(p) => text(&p.ty),
        })
        .collect();
    let output = match &sig.output {
        syn::ReturnType::Default => String::new(),
        syn::ReturnType::Type(_, ty) => match &**ty {
            Type::Tuple(t) if t.elems.is_empty() => String::new(),
            ty => text(ty),
        },
    };
    Signature {
        constness: sig.constness.is_some(),
        asyncness: sig.asyncness.is_some(),
        unsafety: sig.unsafety.is_some(),
        abi: text(&sig.abi),
        generics: generics_text(&sig.generics),
        inputs,
        variadic: sig.variadic.is_some(),
        output,
    }
}

fn generics_text(g: &syn::Generics) -> String {
    format!("{} {}", text(g), text(&g.where_clause))
}

fn type_kind(
    keyword: &'static str,
    attrs: &[Attribute],
    generics: &syn::Generics,
    body: String,
) -> Kind {
    let mut repr = Vec::new();
    let mut cfg = Vec::new();
    for a in attrs {
        if a.path().is_ident("repr") {
            repr.push(text(a));
        } else if a.path().is_ident("cfg") {
            cfg.push(text(a));
        } else if a.path().is_ident("cfg_attr") && text(a).split(' ').any(|t| t == "repr") {
            repr.push(text(a));
        }
    }
    Kind::Type {
        keyword,
        layout: Layout {
            generics: generics_text(generics),
            repr,
            cfg,
            body,
        },
    }
}

/// The attributes of a field or variant that change what is laid out:
/// `#[cfg]` and `#[cfg_attr]` (derive helpers, docs and lints do not).
fn layout_attrs(attrs: &[Attribute]) -> String {
    attrs
        .iter()
        .filter(|a| a.path().is_ident("cfg") || a.path().is_ident("cfg_attr"))
        .map(|a| text(a) + " ")
        .collect()
}

/// Field names and types in order, without visibility, docs or derive
/// helper attributes: `{ a : u32 , b : T }`, `( u32 , T )`, or nothing.
fn fields(f: &syn::Fields) -> String {
    match f {
        syn::Fields::Named(n) => named_fields(n),
        syn::Fields::Unnamed(u) => {
            let inner: Vec<String> = u
                .unnamed
                .iter()
                .map(|f| format!("{}{}", layout_attrs(&f.attrs), text(&f.ty)))
                .collect();
            format!("( {} )", inner.join(" , "))
        }
        syn::Fields::Unit => String::new(),
    }
}

fn named_fields(n: &syn::FieldsNamed) -> String {
    let inner: Vec<String> = n
        .named
        .iter()
        .map(|f| {
            let name = f.ident.as_ref().map(Ident::to_string).unwrap_or_default();
            format!("{}{name} : {}", layout_attrs(&f.attrs), text(&f.ty))
        })
        .collect();
    format!("{{ {} }}", inner.join(" , "))
}

/// Every identifier in a function body: what it may call or name (bare,
/// without paths; an over-approximation used to explain, not decide).
fn names(block: &syn::Block) -> BTreeSet<String> {
    fn walk(tokens: proc_macro2::TokenStream, out: &mut BTreeSet<String>) {
        for t in tokens {
            match t {
                proc_macro2::TokenTree::Ident(i) => {
                    out.insert(i.to_string());
                }
                proc_macro2::TokenTree::Group(g) => walk(g.stream(), out),
                _ => {}
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(quote::ToTokens::to_token_stream(block), &mut out);
    out
}
