//! Signature analysis shared by `#[patchable]` and `#[patch]`.
//!
//! Everything here works on syntax only: which forms are supported, the
//! exact function-pointer type of a signature (with elided lifetimes made
//! explicit where Rust's fn-pointer elision would differ from the
//! method's), the types whose layout the runtime compares, and the text
//! the fingerprint is computed from.

use proc_macro2::{Span, TokenStream};
use quote::{ToTokens, format_ident, quote};
use syn::visit::Visit;
use syn::visit_mut::VisitMut;
use syn::{
    FnArg, GenericParam, Ident, Lifetime, Pat, Path, ReturnType, Signature, Type, TypeReference,
    parse_quote,
};

/// Name given to the receiver's elided lifetime when a method's output
/// borrows from `&self`.
pub const SELF_LIFETIME: &str = "'__hotpatch_self";

/// Where a signature lives: a free function, or a method of
/// `impl [Trait for] SelfTy`.
#[derive(Clone)]
pub struct Context {
    pub self_ty: Option<Type>,
    pub trait_: Option<Path>,
    /// Associated types and consts declared in the trait impl: `Self::X`
    /// for these means `<Self as Trait>::X`.
    pub assoc: Vec<Ident>,
}

impl Context {
    pub fn free() -> Self {
        Context {
            self_ty: None,
            trait_: None,
            assoc: Vec::new(),
        }
    }
}

/// The tuple of a trait's generic arguments, `(String,)` for `From<String>`
/// (a lifetime argument `'a` as `&'a ()`), or `None` for a trait written
/// without arguments: what picks one impl among several of one generic
/// trait on one type (`hotpatch::__private::TraitTarget`).
pub fn trait_arguments(trait_: &Path) -> syn::Result<Option<Type>> {
    let Some(last) = trait_.segments.last() else {
        return Ok(None);
    };
    match &last.arguments {
        syn::PathArguments::None => Ok(None),
        syn::PathArguments::Parenthesized(p) => Err(unsupported_trait_argument(p)),
        syn::PathArguments::AngleBracketed(a) => {
            let mut tys: Vec<Type> = Vec::new();
            for arg in &a.args {
                match arg {
                    syn::GenericArgument::Type(t) => tys.push(t.clone()),
                    syn::GenericArgument::Lifetime(l) => tys.push(parse_quote!(&#l ())),
                    other => return Err(unsupported_trait_argument(other)),
                }
            }
            Ok(Some(parse_quote!((#(#tys,)*))))
        }
    }
}

fn unsupported_trait_argument(arg: &dyn ToTokens) -> syn::Error {
    syn::Error::new_spanned(
        arg,
        "only type and lifetime arguments of a trait are supported on a #[patchable] impl \
         (each impl is told apart by them); patch a non-generic function the methods call",
    )
}

/// The hash naming `Trait::method` in `hotpatch::__private::Method`: the
/// trait's last path segment and the method's name, so both macros compute
/// it from what the user wrote.
pub fn method_key(trait_ident: &Ident, method: &Ident) -> u64 {
    fingerprint(&format!("{trait_ident}::{method}"))
}

/// Collects every reason `sig` cannot be made patchable into `errors`.
pub fn check_supported(sig: &Signature, what: &str, errors: &mut Vec<syn::Error>) {
    let mut push = |tokens: &dyn ToTokens, msg: String| {
        errors.push(syn::Error::new_spanned(tokens.to_token_stream(), msg));
    };
    if let Some(t) = &sig.constness {
        push(
            t,
            format!(
                "{what} cannot be a `const fn`: a const call is evaluated at compile time and \
                 cannot be redirected; remove `const` or keep the function unpatchable"
            ),
        );
    }
    if let Some(t) = &sig.asyncness {
        push(
            t,
            format!(
                "{what} cannot be an `async fn`: its body runs later as a future the slot cannot \
                 swap; make a synchronous patchable function and call it from the async one"
            ),
        );
    }
    if let Some(v) = &sig.variadic {
        push(
            v,
            format!(
                "{what} cannot be C-variadic: a variadic call cannot be forwarded through a slot"
            ),
        );
    }
    for param in &sig.generics.params {
        match param {
            GenericParam::Type(t) => push(
                t,
                format!(
                    "{what} cannot have type parameters: each instantiation is a separate \
                     function with no single slot; patch a non-generic function that the generic \
                     one calls"
                ),
            ),
            GenericParam::Const(c) => push(
                c,
                format!(
                    "{what} cannot have const parameters: each instantiation is a separate \
                     function with no single slot"
                ),
            ),
            GenericParam::Lifetime(l) => {
                if !l.bounds.is_empty() {
                    push(
                        l,
                        format!(
                            "{what} cannot have lifetime bounds: they make the lifetime early-bound \
                             and the function cannot be stored as a `for<..> fn` pointer"
                        ),
                    );
                }
            }
        }
    }
    if let Some(w) = &sig.generics.where_clause {
        push(
            w,
            format!("{what} cannot have a `where` clause: generic functions have no single slot"),
        );
    }
    let mut finder = ImplTraitFinder(Vec::new());
    for input in &sig.inputs {
        if let FnArg::Typed(pt) = input {
            finder.visit_type(&pt.ty);
        }
    }
    if let ReturnType::Type(_, ty) = &sig.output {
        finder.visit_type(ty);
    }
    for span_tokens in finder.0 {
        errors.push(syn::Error::new_spanned(
            span_tokens,
            format!(
                "{what} cannot use `impl Trait`: it makes the function generic (argument position) \
                 or its return type unnameable (return position); use a concrete type or `Box<dyn \
                 Trait>`"
            ),
        ));
    }
}

struct ImplTraitFinder(Vec<TokenStream>);

impl<'ast> Visit<'ast> for ImplTraitFinder {
    fn visit_type_impl_trait(&mut self, i: &'ast syn::TypeImplTrait) {
        self.0.push(i.to_token_stream());
    }
}

/// Replaces `Self` by the concrete self type, and `Self::X` by
/// `<SelfTy as Trait>::X` in a trait impl, so a type can be written outside
/// the impl block.
pub struct SubstSelf<'a> {
    pub self_ty: &'a Type,
    pub trait_: Option<&'a Path>,
}

impl VisitMut for SubstSelf<'_> {
    fn visit_type_mut(&mut self, ty: &mut Type) {
        if let Type::Path(tp) = ty
            && tp.qself.is_none()
            && tp.path.leading_colon.is_none()
        {
            let segs = &tp.path.segments;
            if segs.len() == 1 && segs[0].ident == "Self" && segs[0].arguments.is_none() {
                *ty = self.self_ty.clone();
                return;
            }
            if segs.len() >= 2 && segs[0].ident == "Self" {
                let rest: Vec<_> = segs.iter().skip(1).cloned().collect();
                let self_ty = self.self_ty;
                let new: Type = match self.trait_ {
                    Some(tr) => parse_quote!(<#self_ty as #tr>::#(#rest)::*),
                    None => parse_quote!(<#self_ty>::#(#rest)::*),
                };
                *ty = new;
                syn::visit_mut::visit_type_mut(self, ty);
                return;
            }
        }
        syn::visit_mut::visit_type_mut(self, ty);
    }
}

/// Inside a trait impl's method body moved into an inherent impl,
/// `Self::X` for an associated item `X` of the trait impl must become
/// `<Self as Trait>::X`.
pub struct QualifyAssoc<'a> {
    pub trait_: &'a Path,
    pub assoc: &'a [Ident],
}

impl QualifyAssoc<'_> {
    fn rewrite(&self, qself: &mut Option<syn::QSelf>, path: &mut Path) {
        if qself.is_some() || path.segments.len() < 2 || path.segments[0].ident != "Self" {
            return;
        }
        if !self.assoc.iter().any(|a| *a == path.segments[1].ident) {
            return;
        }
        let tr = self.trait_;
        let rest: Vec<_> = path.segments.iter().skip(1).cloned().collect();
        let qualified: syn::ExprPath = parse_quote!(<Self as #tr>::#(#rest)::*);
        *qself = qualified.qself;
        *path = qualified.path;
    }
}

impl VisitMut for QualifyAssoc<'_> {
    fn visit_type_path_mut(&mut self, tp: &mut syn::TypePath) {
        self.rewrite(&mut tp.qself, &mut tp.path);
        syn::visit_mut::visit_type_path_mut(self, tp);
    }
    fn visit_expr_path_mut(&mut self, ep: &mut syn::ExprPath) {
        self.rewrite(&mut ep.qself, &mut ep.path);
        syn::visit_mut::visit_expr_path_mut(self, ep);
    }
    fn visit_pat_mut(&mut self, p: &mut Pat) {
        if let Pat::Path(pp) = p {
            self.rewrite(&mut pp.qself, &mut pp.path);
        }
        syn::visit_mut::visit_pat_mut(self, p);
    }
}

/// Turns every lifetime except `'static` into `'_`: layouts do not depend
/// on lifetimes, and the layout expression sits where no named lifetime is
/// in scope.
struct EraseLifetimes;

impl VisitMut for EraseLifetimes {
    fn visit_lifetime_mut(&mut self, l: &mut Lifetime) {
        if l.ident != "static" {
            *l = Lifetime::new("'_", l.span());
        }
    }
}

/// The names of the lifetimes a type mentions.
#[derive(Default)]
struct Used(Vec<String>);

impl<'ast> syn::visit::Visit<'ast> for Used {
    fn visit_lifetime(&mut self, l: &'ast Lifetime) {
        self.0.push(l.ident.to_string());
    }
}

/// Replaces the given lifetimes with `'static`.
struct ToStatic<'a>(&'a [Lifetime]);

impl VisitMut for ToStatic<'_> {
    fn visit_lifetime_mut(&mut self, l: &mut Lifetime) {
        if self.0.iter().any(|u| u.ident == l.ident) {
            *l = Lifetime::new("'static", l.span());
        }
    }
}

/// Names the elided lifetimes of an output type: `&T` and `'_`.
struct NameElided<'a>(&'a Lifetime);

impl VisitMut for NameElided<'_> {
    fn visit_type_reference_mut(&mut self, r: &mut TypeReference) {
        if r.lifetime.is_none() {
            r.lifetime = Some(self.0.clone());
        }
        syn::visit_mut::visit_type_reference_mut(self, r);
    }
    fn visit_lifetime_mut(&mut self, l: &mut Lifetime) {
        if l.ident == "_" {
            *l = self.0.clone();
        }
    }
    // A nested fn pointer or `dyn Fn(&T)` has its own elision scope.
    fn visit_type_bare_fn_mut(&mut self, _: &mut syn::TypeBareFn) {}
    fn visit_parenthesized_generic_arguments_mut(
        &mut self,
        _: &mut syn::ParenthesizedGenericArguments,
    ) {
    }
}

/// What the receiver of a method is.
pub enum Receiver {
    None,
    /// `self`, `mut self`, or `self: Ty`.
    Value,
    /// `&self`, `&'a self`, `&mut self`, `self: &Self`, `self: &mut Self`.
    Ref {
        lifetime: Option<Lifetime>,
    },
}

pub fn receiver(sig: &Signature) -> Receiver {
    let Some(FnArg::Receiver(r)) = sig.inputs.first() else {
        return Receiver::None;
    };
    if r.colon_token.is_none() {
        return match &r.reference {
            Some((_, lt)) => Receiver::Ref {
                lifetime: lt.clone(),
            },
            None => Receiver::Value,
        };
    }
    // `self: Ty`.
    if let Type::Reference(tr) = &*r.ty
        && let Type::Path(p) = &*tr.elem
        && p.qself.is_none()
        && p.path.is_ident("Self")
    {
        return Receiver::Ref {
            lifetime: tr.lifetime.clone(),
        };
    }
    Receiver::Value
}

/// The types of the parameters, the receiver first (as `Self`-based types).
pub fn param_types(sig: &Signature) -> Vec<Type> {
    sig.inputs
        .iter()
        .map(|arg| match arg {
            FnArg::Receiver(r) => {
                if r.colon_token.is_some() {
                    (*r.ty).clone()
                } else {
                    match &r.reference {
                        Some((_, lt)) => {
                            let m = r.mutability;
                            parse_quote!(& #lt #m Self)
                        }
                        None => parse_quote!(Self),
                    }
                }
            }
            FnArg::Typed(pt) => (*pt.ty).clone(),
        })
        .collect()
}

pub fn return_type(sig: &Signature) -> Type {
    match &sig.output {
        ReturnType::Default => parse_quote!(()),
        ReturnType::Type(_, ty) => (**ty).clone(),
    }
}

/// The exact `for<..> [unsafe] [extern ".."] fn(..) -> ..` type of `sig`,
/// written so that it means the same as the function's own signature:
/// when a method's output borrows from an elided `&self`, that lifetime is
/// named (fn-pointer elision has no `self` rule). `Self` is kept.
pub fn fn_ptr_type(sig: &Signature) -> Type {
    let mut params = param_types(sig);
    let mut output = return_type(sig);
    let mut lifetimes: Vec<Lifetime> = sig
        .generics
        .params
        .iter()
        .filter_map(|p| match p {
            GenericParam::Lifetime(l) => Some(l.lifetime.clone()),
            _ => None,
        })
        .collect();
    if let Receiver::Ref { lifetime, .. } = receiver(sig) {
        let named = match lifetime {
            Some(l) => l,
            None => {
                let l = Lifetime::new(SELF_LIFETIME, Span::call_site());
                if let Type::Reference(r) = &mut params[0] {
                    r.lifetime = Some(l.clone());
                }
                lifetimes.push(l.clone());
                l
            }
        };
        NameElided(&named).visit_type_mut(&mut output);
    }
    // A lifetime parameter that no parameter type names (`fn
    // variants<'a>() -> &'a [Self]`, as clap's `ValueEnum` has) is not
    // constrained by the inputs: a `for<'a> fn() -> &'a T` is refused
    // (E0581). The function is then generic over it only in name: the
    // pointer type is the one for `'static`, which the function item
    // coerces to and which the caller's `'a` accepts.
    let mut used = Used::default();
    for p in &params {
        used.visit_type(p);
    }
    let unconstrained: Vec<Lifetime> = lifetimes
        .iter()
        .filter(|l| !used.0.contains(&l.ident.to_string()))
        .cloned()
        .collect();
    if !unconstrained.is_empty() {
        let mut to_static = ToStatic(&unconstrained);
        to_static.visit_type_mut(&mut output);
        lifetimes.retain(|l| !unconstrained.contains(l));
    }
    let unsafety = &sig.unsafety;
    let abi = &sig.abi;
    let never = matches!(&output, Type::Never(_));
    let ret = if never {
        quote!(-> !)
    } else if matches!(sig.output, ReturnType::Default) {
        quote!()
    } else {
        quote!(-> #output)
    };
    let bound = if lifetimes.is_empty() {
        quote!()
    } else {
        quote!(for<#(#lifetimes),*>)
    };
    parse_quote!(#bound #unsafety #abi fn(#(#params),*) #ret)
}

/// The types whose size and alignment the runtime compares: each parameter
/// then the return type, with `Self` substituted and lifetimes erased.
/// `!` has no layout to compare and is left out.
pub fn layout_types(sig: &Signature, ctx: &Context) -> Vec<Type> {
    let mut tys = param_types(sig);
    let ret = return_type(sig);
    if !matches!(ret, Type::Never(_)) {
        tys.push(ret);
    }
    for ty in &mut tys {
        if let Some(self_ty) = &ctx.self_ty {
            SubstSelf {
                self_ty,
                trait_: ctx.trait_.as_ref(),
            }
            .visit_type_mut(ty);
        }
        EraseLifetimes.visit_type_mut(ty);
    }
    tys
}

/// Compact text for tokens: `fn(&str, u32) -> Vec<u8>`, not
/// `fn (& str , u32) -> Vec < u8 >`.
pub fn to_text(tokens: &TokenStream) -> String {
    let mut s = tokens.to_string();
    for (from, to) in [
        (" :: ", "::"),
        (":: ", "::"),
        (" ::", "::"),
        (" ,", ","),
        ("( ", "("),
        (" )", ")"),
        ("[ ", "["),
        (" ]", "]"),
        ("< ", "<"),
        (" >", ">"),
        (" <", "<"),
        ("& ", "&"),
        (" :", ":"),
        (" ;", ";"),
        ("fn (", "fn("),
        ("! (", "!("),
        ("> (", ">("),
        ("* const ", "*const "),
        ("* mut ", "*mut "),
    ] {
        while s.contains(from) {
            s = s.replace(from, to);
        }
    }
    // `- >` never occurs (proc-macro2 prints `->` joined), but `x<-y` could
    // lose a space above; signatures contain no such expressions.
    s.replace("->", " -> ").replace("  ", " ")
}

/// FNV-1a, 64 bits: a fingerprint, not a defence against forgery.
pub fn fingerprint(text: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The names the wrapper forwards to the implementation: the parameter's
/// own identifier when it is a plain binding, a generated one otherwise.
pub fn forward_names(sig: &Signature) -> Vec<TokenStream> {
    sig.inputs
        .iter()
        .enumerate()
        .map(|(i, arg)| match arg {
            FnArg::Receiver(_) => quote!(self),
            FnArg::Typed(pt) => match &*pt.pat {
                Pat::Ident(pi) if pi.subpat.is_none() => pi.ident.to_token_stream(),
                _ => format_ident!("__hotpatch_arg{}", i).to_token_stream(),
            },
        })
        .collect()
}

/// `sig` with plain parameter bindings (no `mut`, `ref` or patterns), as
/// the forwarding functions declare it.
pub fn forwarding_signature(sig: &Signature) -> Signature {
    let mut sig = sig.clone();
    let names = forward_names(&sig);
    for (arg, name) in sig.inputs.iter_mut().zip(names) {
        match arg {
            FnArg::Receiver(r) => {
                if r.reference.is_none() {
                    r.mutability = None;
                }
            }
            FnArg::Typed(pt) => {
                let ident: Ident = syn::parse2(name).expect("forward name is an identifier");
                *pt.pat = parse_quote!(#ident);
            }
        }
    }
    sig
}

/// The `as fn(_, _) -> _` type that turns the implementation's fn item into
/// a pointer whose exact type the compiler infers at the call.
pub fn witness_type(sig: &Signature) -> TokenStream {
    let holes = sig.inputs.iter().map(|_| quote!(_));
    let unsafety = &sig.unsafety;
    let abi = &sig.abi;
    let ret = match &sig.output {
        ReturnType::Default => quote!(),
        ReturnType::Type(_, ty) if matches!(**ty, Type::Never(_)) => quote!(-> !),
        ReturnType::Type(..) => quote!(-> _),
    };
    quote!(#unsafety #abi fn(#(#holes),*) #ret)
}

/// Attributes that must follow the function onto the items generated
/// beside it: configuration and lint levels.
pub fn carried_attrs(attrs: &[syn::Attribute]) -> Vec<syn::Attribute> {
    attrs
        .iter()
        .filter(|a| {
            let p = a.path();
            p.is_ident("cfg")
                || p.is_ident("cfg_attr")
                || p.is_ident("allow")
                || p.is_ident("expect")
                || p.is_ident("warn")
                || p.is_ident("deny")
        })
        .cloned()
        .collect()
}

/// Only `cfg` attributes: for the statics, where lint attributes on the
/// function say nothing.
pub fn cfg_attrs(attrs: &[syn::Attribute]) -> Vec<syn::Attribute> {
    attrs
        .iter()
        .filter(|a| a.path().is_ident("cfg"))
        .cloned()
        .collect()
}

/// Rejects attributes whose meaning the indirection would break.
pub fn check_attrs(attrs: &[syn::Attribute], what: &str, errors: &mut Vec<syn::Error>) {
    for a in attrs {
        let p = a.path();
        if p.is_ident("track_caller") {
            errors.push(syn::Error::new_spanned(
                a,
                format!(
                    "{what} cannot be `#[track_caller]`: the call goes through a function pointer, \
                     which loses the caller's location"
                ),
            ));
        }
        if p.is_ident("no_mangle")
            || p.is_ident("export_name")
            || is_unsafe_attr(a, "no_mangle")
            || is_unsafe_attr(a, "export_name")
        {
            errors.push(syn::Error::new_spanned(
                a,
                format!(
                    "{what} cannot export a symbol: foreign callers would bypass the slot; export a \
                     separate function that calls the patchable one"
                ),
            ));
        }
    }
}

fn is_unsafe_attr(a: &syn::Attribute, name: &str) -> bool {
    if !a.path().is_ident("unsafe") {
        return false;
    }
    match &a.meta {
        syn::Meta::List(l) => l.tokens.to_string().trim_start().starts_with(name),
        _ => false,
    }
}

/// Is this one of the inline attributes the wrapper should not repeat?
pub fn is_inline_attr(a: &syn::Attribute) -> bool {
    a.path().is_ident("inline")
}
