//! `#[patchable]`: one expander for free functions, one for impl blocks.
//!
//! For each function `f` it emits:
//! - the wrapper, with `f`'s signature and attributes: one atomic load of
//!   the slot, then a call through the pointer;
//! - `__hotpatch_original_f`: the user's body, the slot's initial value;
//! - `__hotpatch_counted_f`: the body under a panic counter, for patches
//!   made from the crate's own source;
//! - `__hotpatch_dispatch_f`: what the slot points at during a transition:
//!   the old or the new implementation, by the calling thread's state;
//! - the slot, its `Entry` in the `SLOTS` distributed slice, and the
//!   companion constant `__hotpatch_f` that `#[patch]` type-checks against.

use crate::sig::{self, Context};
use proc_macro2::TokenStream;
use quote::{format_ident, quote};
use syn::visit_mut::VisitMut;
use syn::{
    Attribute, Block, Ident, ImplItem, ImplItemFn, Item, ItemFn, ItemImpl, Signature, Type,
    parse_quote,
};

pub fn expand(args: TokenStream, input: TokenStream) -> TokenStream {
    let skip = match parse_args(args) {
        Ok(skip) => skip,
        Err(e) => {
            let e = e.to_compile_error();
            return quote!(#e #input);
        }
    };
    match syn::parse2::<Item>(input.clone()) {
        Ok(Item::Fn(f)) if skip => quote!(#f),
        Ok(Item::Fn(f)) => expand_fn(f),
        Ok(Item::Impl(i)) => expand_impl(i),
        Ok(other) => {
            let e = syn::Error::new_spanned(
                &other,
                "#[hotpatch::patchable] applies to functions and to impl blocks (which makes \
                 every method in them patchable)",
            )
            .to_compile_error();
            quote!(#e #other)
        }
        Err(e) => {
            let e = e.to_compile_error();
            quote!(#e #input)
        }
    }
}

/// `#[patchable]` or `#[patchable(skip)]`.
fn parse_args(args: TokenStream) -> syn::Result<bool> {
    if args.is_empty() {
        return Ok(false);
    }
    let ident: Ident = syn::parse2(args.clone()).map_err(|_| {
        syn::Error::new_spanned(
            &args,
            "#[hotpatch::patchable] takes no arguments, or `skip` on a method of a patchable impl",
        )
    })?;
    if ident == "skip" {
        Ok(true)
    } else {
        Err(syn::Error::new_spanned(
            ident,
            "unknown argument: #[hotpatch::patchable] takes no arguments, or `skip` on a method of \
             a patchable impl",
        ))
    }
}

fn combine(errors: Vec<syn::Error>) -> TokenStream {
    errors.into_iter().map(|e| e.to_compile_error()).collect()
}

/// The names of everything generated for one function.
struct Names {
    slot: Ident,
    entry: Ident,
    entry_getter: Ident,
    original: Ident,
    dispatch: Ident,
    counted: Ident,
    companion: Ident,
}

impl Names {
    fn new(helper: &str, module_unique: &str) -> Self {
        Names {
            slot: format_ident!("__HOTPATCH_SLOT_{}", module_unique),
            entry: format_ident!("__HOTPATCH_ENTRY_{}", module_unique),
            entry_getter: format_ident!("__hotpatch_entry_of_{}", module_unique),
            original: format_ident!("__hotpatch_original_{}", helper),
            dispatch: format_ident!("__hotpatch_dispatch_{}", helper),
            counted: format_ident!("__hotpatch_counted_{}", helper),
            companion: format_ident!("__hotpatch_{}", helper),
        }
    }
}

/// One patchable function, wherever it lives.
struct Gen<'a> {
    sig: &'a Signature,
    ctx: &'a Context,
    names: Names,
    /// How generated code names the function's own helpers: `` (free) or
    /// `Self::` (inside the impls) / `<SelfTy>::` (at module level).
    in_impl: bool,
    /// The registered path: `module_path!()` goes between the two parts.
    path: (String, String),
    /// A method of an impl of a trait with generic arguments: the key of
    /// `Trait::method` and the tuple of the arguments, which name its
    /// companion through `TraitTarget` instead of an inherent constant.
    trait_target: Option<(u64, Type)>,
    /// An out-of-line wrapper to register as the entry's `wrapper`, for a
    /// method whose wrapper cannot be named (`Drop::drop`: E0040).
    forwarder: Option<Ident>,
}

impl Gen<'_> {
    fn self_ty(&self) -> Option<&Type> {
        self.ctx.self_ty.as_ref()
    }

    /// How module-level code names helper `name`.
    fn module_level(&self, name: &Ident) -> TokenStream {
        match self.self_ty() {
            Some(ty) => quote!(<#ty>::#name),
            None => quote!(#name),
        }
    }

    /// How code inside the impls names helper `name`.
    fn local(&self, name: &Ident) -> TokenStream {
        if self.in_impl {
            quote!(Self::#name)
        } else {
            quote!(#name)
        }
    }

    /// How to call the function itself (the wrapper).
    fn wrapper_path(&self, at_module_level: bool) -> TokenStream {
        let ident = &self.sig.ident;
        match (&self.ctx.self_ty, &self.ctx.trait_) {
            (None, _) => quote!(#ident),
            (Some(ty), Some(tr)) => quote!(<#ty as #tr>::#ident),
            (Some(ty), None) if at_module_level => quote!(<#ty>::#ident),
            (Some(_), None) => quote!(Self::#ident),
        }
    }

    fn unsafe_call(&self, call: TokenStream) -> TokenStream {
        if self.sig.unsafety.is_some() {
            // SAFETY (generated): the caller of this `unsafe fn` upholds the
            // contract of the function it forwards to, which is the same.
            quote!(unsafe { #call })
        } else {
            call
        }
    }

    /// The body of the wrapper: one load of the slot, one indirect call.
    fn wrapper_body(&self) -> Block {
        let slot = &self.names.slot;
        let original = self.local(&self.names.original);
        let witness = sig::witness_type(self.sig);
        let args = sig::forward_names(self.sig);
        let call = self.unsafe_call(quote!(__hotpatch_impl(#(#args),*)));
        parse_quote!({
            // SAFETY: the slot holds the original implementation or a
            // replacement whose path, signature fingerprint and argument
            // layouts the runtime checked against this function before
            // storing it; `#[patch]` checked the exact signature at compile
            // time. The pointer's type is inferred from the original's.
            let __hotpatch_impl = unsafe {
                ::hotpatch::__private::cast_fn(
                    ::hotpatch::__private::slot_current!(#slot),
                    #original as #witness,
                )
            };
            #call
        })
    }

    fn original_fn(&self, attrs: &[Attribute], block: &Block) -> TokenStream {
        let mut sig = self.sig.clone();
        sig.ident = self.names.original.clone();
        let mut block = block.clone();
        if let (Some(tr), true) = (&self.ctx.trait_, self.in_impl) {
            // The body moves from the trait impl to an inherent impl: keep
            // the trait's associated items and methods resolvable.
            let mut q = sig::QualifyAssoc {
                trait_: tr,
                assoc: &self.ctx.assoc,
            };
            q.visit_signature_mut(&mut sig);
            q.visit_block_mut(&mut block);
            let mut use_path = tr.clone();
            for seg in &mut use_path.segments {
                seg.arguments = syn::PathArguments::None;
            }
            block.stmts.insert(
                0,
                parse_quote!(#[allow(unused_imports)] use #use_path as _;),
            );
        }
        let carried = sig::carried_attrs(attrs);
        let inline: Vec<_> = attrs.iter().filter(|a| sig::is_inline_attr(a)).collect();
        quote! {
            #(#carried)*
            #(#inline)*
            #[doc(hidden)]
            #[allow(non_snake_case, deprecated, clippy::all)]
            #sig #block
        }
    }

    /// Installed in the slot during a transition: runs the old or the new
    /// implementation, depending on the calling thread.
    fn dispatch_fn(&self, attrs: &[Attribute]) -> TokenStream {
        let mut sig = sig::forwarding_signature(self.sig);
        sig.ident = self.names.dispatch.clone();
        let slot = &self.names.slot;
        let original = self.local(&self.names.original);
        let witness = sig::witness_type(self.sig);
        let args = sig::forward_names(self.sig);
        let call = self.unsafe_call(quote!(__hotpatch_impl(#(#args),*)));
        let mut item: ImplItemFn = parse_quote! {
            #[doc(hidden)]
            #[allow(non_snake_case, improper_ctypes_definitions, deprecated, clippy::all)]
            #sig {
                // SAFETY: the slot's choice holds two implementations of
                // this function, both checked like the slot's own value.
                let __hotpatch_impl = unsafe {
                    ::hotpatch::__private::cast_fn(
                        ::hotpatch::__private::choose(&#slot),
                        #original as #witness,
                    )
                };
                #call
            }
        };
        self.qualify(&mut item);
        let carried = sig::carried_attrs(attrs);
        quote!(#(#carried)* #item)
    }

    /// The body under a panic counter: what a patch made from this crate's
    /// source (`cargo hotpatch build --base`) installs, with the counter
    /// redirected to the patch's own. In the service it is never called.
    fn counted_fn(&self, attrs: &[Attribute]) -> TokenStream {
        let mut sig = sig::forwarding_signature(self.sig);
        sig.ident = self.names.counted.clone();
        let original = self.local(&self.names.original);
        let args = sig::forward_names(self.sig);
        let call = self.unsafe_call(quote!(#original(#(#args),*)));
        let mut item: ImplItemFn = parse_quote! {
            #[doc(hidden)]
            #[inline(never)]
            #[allow(non_snake_case, improper_ctypes_definitions, unreachable_code, deprecated, clippy::all)]
            #sig {
                let __hotpatch_count =
                    ::hotpatch::__private::PanicCount::new(&::hotpatch::__private::SOURCE_PANICS);
                let __hotpatch_value = #call;
                __hotpatch_count.returned();
                __hotpatch_value
            }
        };
        self.qualify(&mut item);
        let carried = sig::carried_attrs(attrs);
        quote!(#(#carried)* #item)
    }

    /// The out-of-line wrapper registered for a method whose own wrapper
    /// cannot be named (`Drop::drop`): the same slot load and call.
    fn forwarder_fn(&self, attrs: &[Attribute]) -> Option<TokenStream> {
        let name = self.forwarder.as_ref()?;
        let mut sig = sig::forwarding_signature(self.sig);
        sig.ident = name.clone();
        let body = self.wrapper_body();
        let mut item: ImplItemFn = parse_quote! {
            #[doc(hidden)]
            #[inline(never)]
            #[allow(non_snake_case, improper_ctypes_definitions, deprecated, clippy::all)]
            #sig #body
        };
        self.qualify(&mut item);
        let carried = sig::carried_attrs(attrs);
        Some(quote!(#(#carried)* #item))
    }

    fn qualify(&self, item: &mut ImplItemFn) {
        if let (Some(tr), true) = (&self.ctx.trait_, self.in_impl) {
            sig::QualifyAssoc {
                trait_: tr,
                assoc: &self.ctx.assoc,
            }
            .visit_impl_item_fn_mut(item);
        }
    }

    /// The exact fn-pointer type, with `Self` written out.
    fn sig_type(&self) -> Type {
        let mut ty = sig::fn_ptr_type(self.sig);
        if let Some(self_ty) = self.self_ty() {
            sig::SubstSelf {
                self_ty,
                trait_: self.ctx.trait_.as_ref(),
            }
            .visit_type_mut(&mut ty);
        }
        ty
    }

    /// The companion: an inherent constant, or for a method of a trait
    /// with generic arguments an impl of `TraitTarget` (at module level).
    fn companion(&self) -> TokenStream {
        let name = &self.names.companion;
        let ty = self.sig_type();
        let getter = &self.names.entry_getter;
        if let Some((key, args)) = &self.trait_target {
            let self_ty = self.self_ty();
            return quote! {
                #[doc(hidden)]
                #[allow(deprecated)]
                impl ::hotpatch::__private::TraitTarget<::hotpatch::__private::Method<#key>, #args>
                    for #self_ty
                {
                    type Signature = #ty;
                    const TARGET: ::hotpatch::__private::Target<#ty> =
                        ::hotpatch::__private::Target::new(#getter);
                }
            };
        }
        quote! {
            #[doc(hidden)]
            #[allow(non_upper_case_globals, private_interfaces, deprecated)]
            pub const #name: ::hotpatch::__private::Target<#ty> =
                ::hotpatch::__private::Target::new(#getter);
        }
    }

    /// The slot, its registry entry and the entry getter, at module level.
    fn statics(&self, attrs: &[Attribute]) -> TokenStream {
        let Names {
            slot,
            entry,
            entry_getter,
            original,
            dispatch,
            counted,
            ..
        } = &self.names;
        let original = self.module_level(original);
        let dispatch = self.module_level(dispatch);
        let counted = self.module_level(counted);
        let wrapper = match &self.forwarder {
            Some(f) => self.module_level(f),
            None => self.wrapper_path(true),
        };
        let cfgs = sig::cfg_attrs(attrs);
        let sig_ty = self.sig_type();
        let fp_text = sig::to_text(&quote!(#sig_ty));
        let fingerprint = sig::fingerprint(&fp_text);
        let display = {
            let fwd = sig::forwarding_signature(self.sig);
            sig::to_text(&quote!(#fwd))
        };
        let layouts = sig::layout_types(self.sig, self.ctx);
        let (before, after) = &self.path;
        // One section per slot, as rustc gives every static (the source
        // diff of `cargo hotpatch build` compares them one by one), in
        // `.data.rel.ro.*`: the linker puts it in `PT_GNU_RELRO`, which
        // the dynamic loader makes read-only once it has relocated it.
        // The runtime makes a slot's page writable only while it stores
        // (`hotpatch/src/window.rs`).
        let section = syn::LitStr::new(&format!(".data.rel.ro.hotpatch_slots.{slot}"), slot.span());
        let keep_getter = format_ident!(
            "__HOTPATCH_GETTER_{}",
            entry.to_string().trim_start_matches("__HOTPATCH_ENTRY_")
        );
        quote! {
            #(#cfgs)*
            #[doc(hidden)]
            #[allow(non_upper_case_globals, deprecated)]
            #[cfg_attr(target_os = "linux", unsafe(link_section = #section))]
            static #slot: ::hotpatch::__private::Slot =
                ::hotpatch::__private::Slot::new(#original as *const ());

            #(#cfgs)*
            #[::hotpatch::__private::linkme::distributed_slice(::hotpatch::__private::SLOTS)]
            #[linkme(crate = ::hotpatch::__private::linkme)]
            #[doc(hidden)]
            #[allow(non_upper_case_globals, deprecated)]
            static #entry: ::hotpatch::__private::Entry = ::hotpatch::__private::Entry {
                path: ::core::concat!(#before, ::core::module_path!(), #after),
                signature: #display,
                fingerprint: #fingerprint,
                layouts: &[#(::hotpatch::__private::TypeLayout::of::<#layouts>()),*],
                slot: &#slot,
                original: ::hotpatch::__private::FnAddr::new(#original as *const ()),
                wrapper: ::hotpatch::__private::FnAddr::new(#wrapper as *const ()),
                dispatcher: ::hotpatch::__private::FnAddr::new(#dispatch as *const ()),
                counted: ::hotpatch::__private::FnAddr::new(#counted as *const ()),
            };

            #(#cfgs)*
            #[doc(hidden)]
            #[allow(non_snake_case)]
            // Never inlined, not even across crates (rustc makes tiny
            // functions inlinable downstream in optimised builds): a patch
            // must name the host's getter, not compile its own copy.
            #[inline(never)]
            fn #entry_getter() -> &'static ::hotpatch::__private::Entry {
                &#entry
            }

            // Compiled whatever calls it: a patch's record binds to the
            // host's getter, and rustc compiles a function nothing in its
            // crate reaches (the companion constant of a function in a
            // private module) only when it is used.
            #(#cfgs)*
            #[used]
            #[doc(hidden)]
            #[allow(non_upper_case_globals)]
            static #keep_getter: fn() -> &'static ::hotpatch::__private::Entry = #entry_getter;
        }
    }
}

fn expand_fn(f: ItemFn) -> TokenStream {
    let mut errors = Vec::new();
    let what = "a #[patchable] function";
    if let Some(syn::FnArg::Receiver(r)) = f.sig.inputs.first() {
        errors.push(syn::Error::new_spanned(
            r,
            "to make a method patchable, put #[hotpatch::patchable] on its impl block: an \
             attribute on the method alone cannot see the type it belongs to",
        ));
    }
    sig::check_supported(&f.sig, what, &mut errors);
    sig::check_attrs(&f.attrs, what, &mut errors);
    if !errors.is_empty() {
        let errors = combine(errors);
        return quote!(#errors #f);
    }
    let ctx = Context::free();
    let name = f.sig.ident.to_string();
    let gen_ = Gen {
        sig: &f.sig,
        ctx: &ctx,
        names: Names::new(&name, &name),
        in_impl: false,
        path: (String::new(), format!("::{name}")),
        trait_target: None,
        forwarder: None,
    };
    let ItemFn {
        attrs, vis, block, ..
    } = &f;
    let wrapper_sig = sig::forwarding_signature(&f.sig);
    let wrapper_body = gen_.wrapper_body();
    let inline = wrapper_inline(attrs);
    // The user's `#[inline]` is about the body: it stays on the original.
    let wrapper_attrs: Vec<_> = attrs.iter().filter(|a| !sig::is_inline_attr(a)).collect();
    let original = gen_.original_fn(attrs, block);
    let dispatch = gen_.dispatch_fn(attrs);
    let counted = gen_.counted_fn(attrs);
    let companion = gen_.companion();
    let statics = gen_.statics(attrs);
    let cfgs = sig::cfg_attrs(attrs);
    quote! {
        #(#wrapper_attrs)*
        #inline
        #vis #wrapper_sig #wrapper_body

        #original
        #dispatch
        #counted
        #(#cfgs)*
        #companion
        #statics
    }
}

/// The wrapper's inline attribute: `#[inline(always)]`, so that every call
/// site, in any crate and any profile, is the slot load and the indirect
/// call itself rather than a call to the wrapper (issue 11, item 3). A
/// `#[target_feature]` function cannot be `inline(always)`: `#[inline]`.
fn wrapper_inline(attrs: &[Attribute]) -> Attribute {
    if attrs.iter().any(|a| a.path().is_ident("target_feature")) {
        parse_quote!(#[inline])
    } else {
        parse_quote!(#[inline(always)])
    }
}

/// `Cart` for `crate::pricing::Cart` or `super::Cart`: the registered path
/// is the impl's module followed by the type's own name, whatever path the
/// impl header spells it with.
fn last_segment_of_type(ty: &Type) -> TokenStream {
    match ty {
        Type::Path(tp) if tp.qself.is_none() => last_segment_of_path(&tp.path),
        other => quote!(#other),
    }
}

fn last_segment_of_path(path: &syn::Path) -> TokenStream {
    match path.segments.last() {
        Some(seg) => quote!(#seg),
        None => quote!(#path),
    }
}

fn is_patchable_attr(a: &Attribute) -> bool {
    a.path()
        .segments
        .last()
        .is_some_and(|s| s.ident == "patchable")
}

fn expand_impl(mut imp: ItemImpl) -> TokenStream {
    let mut errors = Vec::new();
    // Per-method markers: strip them, note `skip`.
    let mut skips = Vec::new();
    for item in &mut imp.items {
        let mut skip = false;
        if let ImplItem::Fn(m) = item {
            let mut keep = Vec::new();
            for a in std::mem::take(&mut m.attrs) {
                if is_patchable_attr(&a) {
                    match &a.meta {
                        syn::Meta::Path(_) => {}
                        syn::Meta::List(l) => match parse_args(l.tokens.clone()) {
                            Ok(s) => skip |= s,
                            Err(e) => errors.push(e),
                        },
                        syn::Meta::NameValue(nv) => errors.push(syn::Error::new_spanned(
                            nv,
                            "write #[patchable] or #[patchable(skip)]",
                        )),
                    }
                } else {
                    keep.push(a);
                }
            }
            m.attrs = keep;
        }
        skips.push(skip);
    }
    if !imp.generics.params.is_empty() || imp.generics.where_clause.is_some() {
        errors.push(syn::Error::new_spanned(
            &imp.generics,
            "methods of a generic impl cannot be patchable: each instantiation is a separate \
             function with no single slot; patch a non-generic function the methods call, or \
             implement for concrete types",
        ));
    }
    if let Some((Some(bang), _, _)) = &imp.trait_ {
        errors.push(syn::Error::new_spanned(
            bang,
            "a negative impl has no methods to patch",
        ));
    }
    if imp.defaultness.is_some() {
        errors.push(syn::Error::new_spanned(
            imp.defaultness,
            "a `default impl` cannot be patchable",
        ));
    }
    // `impl From<&str> for Error` beside `impl From<String> for Error`:
    // the helpers' names and the companion must tell the impls apart.
    let trait_args = match imp.trait_.as_ref().map(|(_, p, _)| sig::trait_arguments(p)) {
        Some(Ok(args)) => args,
        Some(Err(e)) => {
            errors.push(e);
            None
        }
        None => None,
    };
    if !errors.is_empty() {
        let errors = combine(errors);
        return quote!(#errors #imp);
    }

    let self_ty = (*imp.self_ty).clone();
    let trait_ = imp.trait_.as_ref().map(|(_, p, _)| p.clone());
    let assoc: Vec<Ident> = imp
        .items
        .iter()
        .filter_map(|i| match i {
            ImplItem::Type(t) => Some(t.ident.clone()),
            ImplItem::Const(c) => Some(c.ident.clone()),
            _ => None,
        })
        .collect();
    let ctx = Context {
        self_ty: Some(self_ty.clone()),
        trait_: trait_.clone(),
        assoc,
    };
    let self_text = sig::to_text(&last_segment_of_type(&self_ty));
    // The type's name alone (no generic arguments), for item names.
    let self_ident: String = self_text
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    let trait_ident = trait_
        .as_ref()
        .and_then(|p| p.segments.last())
        .map(|s| s.ident.clone());
    let trait_last = trait_ident.as_ref().map(|i| i.to_string());
    let unique = {
        let trait_text = trait_
            .as_ref()
            .map(|p| sig::to_text(&quote!(#p)))
            .unwrap_or_default();
        format!(
            "{:08x}",
            sig::fingerprint(&format!("{self_text}|{trait_text}")) as u32
        )
    };

    let mut helpers = Vec::new();
    let mut statics = Vec::new();
    for (item, skip) in imp.items.iter_mut().zip(skips) {
        let ImplItem::Fn(m) = item else { continue };
        if skip {
            continue;
        }
        let what = "a #[patchable] method";
        let mut method_errors = Vec::new();
        sig::check_supported(&m.sig, what, &mut method_errors);
        sig::check_attrs(&m.attrs, what, &mut method_errors);
        if m.defaultness.is_some() {
            method_errors.push(syn::Error::new_spanned(
                m.defaultness,
                "a `default fn` cannot be patchable",
            ));
        }
        if !method_errors.is_empty() {
            errors.extend(method_errors);
            continue;
        }
        let method = m.sig.ident.to_string();
        // With trait arguments, the impl's hash too: `From_from__1a2b3c4d`
        // (several impls of the trait share one inherent namespace).
        let helper = match (&trait_last, &trait_args) {
            (Some(t), None) => format!("{t}_{method}"),
            (Some(t), Some(_)) => format!("{t}_{method}__{unique}"),
            (None, _) => method.clone(),
        };
        let trait_target = match (&trait_ident, &trait_args) {
            (Some(t), Some(args)) => Some((sig::method_key(t, &m.sig.ident), args.clone())),
            _ => None,
        };
        // `<T as Drop>::drop` cannot be named, not even for its address
        // (E0040): the entry registers an out-of-line copy of the wrapper.
        let forwarder = (trait_last.as_deref() == Some("Drop") && method == "drop")
            .then(|| format_ident!("__hotpatch_wrapper_{}", helper));
        let path = match &trait_ {
            Some(tr) => {
                let tr = sig::to_text(&last_segment_of_path(tr));
                ("<".to_owned(), format!("::{self_text} as {tr}>::{method}"))
            }
            None => (String::new(), format!("::{self_text}::{method}")),
        };
        // `Type__hash__method` or `Type__hash__Trait__method`: unique per
        // impl (the hash), and readable where it shows (`cargo hotpatch
        // build` names a method's target from its entry getter's symbol).
        let module_unique = match &trait_last {
            Some(t) => format!("{self_ident}__{unique}__{t}__{method}"),
            None => format!("{self_ident}__{unique}__{method}"),
        };
        let gen_ = Gen {
            sig: &m.sig,
            ctx: &ctx,
            names: Names::new(&helper, &module_unique),
            in_impl: true,
            path,
            trait_target,
            forwarder,
        };
        let attrs = m.attrs.clone();
        helpers.push(gen_.original_fn(&attrs, &m.block));
        helpers.push(gen_.dispatch_fn(&attrs));
        helpers.push(gen_.counted_fn(&attrs));
        helpers.extend(gen_.forwarder_fn(&attrs));
        let cfgs = sig::cfg_attrs(&attrs);
        let companion = gen_.companion();
        if gen_.trait_target.is_some() {
            statics.push(quote!(#(#cfgs)* #companion));
        } else {
            helpers.push(quote!(#(#cfgs)* #companion));
        }
        statics.push(gen_.statics(&attrs));
        let body = gen_.wrapper_body();
        m.sig = sig::forwarding_signature(&m.sig);
        m.block = body;
        let inline = wrapper_inline(&m.attrs);
        m.attrs.retain(|a| !sig::is_inline_attr(a));
        m.attrs.push(parse_quote!(#inline));
    }
    let errors = combine(errors);
    quote! {
        #errors
        #imp
        #[doc(hidden)]
        impl #self_ty {
            #(#helpers)*
        }
        #(#statics)*
    }
}
