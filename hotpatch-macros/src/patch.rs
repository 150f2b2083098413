//! `#[patch(path::to::target)]`: the replacement side, in a patch cdylib.
//!
//! Emits the user's function unchanged, an entry shim with the same
//! signature that counts the calls that end in a panic (the panic itself
//! unwinds into the host as any panic: a thin patch shares the host's
//! std), and a `PatchFn` record in the patch crate's own table
//! (`crate::__HOTPATCH_PATCH_FNS`, declared by `manifest!()`). The record's
//! target comes from the target's companion constant through
//! `Target::<Sig>::entry_fn`, where `Sig` is written from the replacement's
//! signature: `Target` is invariant in `Sig`, so the two signatures must be
//! the same type, not merely coercible.
//!
//! `#[patch(path::to::f, hook)]` replaces a function that is not
//! `#[patchable]` by redirecting its entry: the same shim, and a `HookFn`
//! record in `crate::__HOTPATCH_HOOK_FNS` whose target is `f`'s address
//! (in a thin patch, bound to the host's symbol), with no expected entry
//! bytes. The signature check is the coercion of `f` to the fn-pointer
//! type written from the replacement's signature (one-way: a replacement
//! taking `&'static str` is accepted for a target taking `&str`).

use crate::sig;
use proc_macro2::TokenStream;
use quote::{format_ident, quote, quote_spanned};
use syn::{ExprPath, ItemFn, Type};

/// The attribute's arguments: the target, and whether it is hooked.
struct Args {
    target: ExprPath,
    hook: bool,
}

pub fn expand(args: TokenStream, input: TokenStream) -> TokenStream {
    let f = match syn::parse2::<ItemFn>(input.clone()) {
        Ok(f) => f,
        Err(_) => {
            let e = syn::Error::new_spanned(
                &input,
                "#[hotpatch::patch] applies to a free function: the replacement",
            )
            .to_compile_error();
            return quote!(#e #input);
        }
    };
    let Args { target, hook } = match parse_target(args) {
        Ok(t) => t,
        Err(e) => {
            let e = e.to_compile_error();
            return quote!(#e #f);
        }
    };
    let mut errors = Vec::new();
    let what = "a #[patch] function";
    if let Some(syn::FnArg::Receiver(r)) = f.sig.inputs.first() {
        errors.push(syn::Error::new_spanned(
            r,
            "write the replacement of a method as a free function whose first parameter is the \
             receiver, e.g. `fn total(cart: &svc::Cart) -> u64`",
        ));
    }
    sig::check_supported(&f.sig, what, &mut errors);
    sig::check_attrs(&f.attrs, what, &mut errors);
    if hook {
        if let Some(args) = target.path.segments.iter().find(|s| !s.arguments.is_none()) {
            errors.push(syn::Error::new_spanned(
                &args.arguments,
                "a generic function's instantiation is compiled into the patch itself, so its \
                 address is not the running service's: hook it from a source build \
                 (`cargo hotpatch build --base`)",
            ));
        }
        if !errors.is_empty() {
            let errors: TokenStream = errors.into_iter().map(|e| e.to_compile_error()).collect();
            return quote!(#errors #f);
        }
        return expand_hook(&f, &target);
    }
    let companion = match companion_path(&target) {
        Ok(c) => Some(c),
        Err(e) => {
            errors.push(e);
            None
        }
    };
    if !errors.is_empty() {
        let errors: TokenStream = errors.into_iter().map(|e| e.to_compile_error()).collect();
        return quote!(#errors #f);
    }
    let companion = companion.expect("no errors");

    let ident = &f.sig.ident;
    let record = format_ident!("__HOTPATCH_PATCH_{}", ident);
    let sig_ty: Type = sig::fn_ptr_type(&f.sig);
    let layouts = sig::layout_types(&f.sig, &sig::Context::free());
    let (shim, shim_item, tables) = shim(&f);
    let sig_span = f.sig.ident.span();
    // The companion fixes the target's signature first, so a mismatch
    // reads "expected <target's signature>, found <this one's>", and points
    // at this function's name.
    let typed_target = quote_spanned! {sig_span=>
        ::hotpatch::__private::Target::entry_of([
            #companion,
            ::hotpatch::__private::Target::<#sig_ty>::REPLACEMENT,
        ])
    };
    quote! {
        #f

        #shim_item

        #[::hotpatch::__private::linkme::distributed_slice(#tables::FNS)]
        #[linkme(crate = ::hotpatch::__private::linkme)]
        #[doc(hidden)]
        #[allow(non_upper_case_globals)]
        static #record: ::hotpatch::__private::PatchFn = ::hotpatch::__private::PatchFn {
            target: #typed_target,
            replacement: ::hotpatch::__private::FnAddr::new(#shim as #sig_ty as *const ()),
            name: ::core::concat!(::core::module_path!(), "::", ::core::stringify!(#ident)),
            layouts: &[#(::hotpatch::__private::TypeLayout::of::<#layouts>()),*],
        };
    }
}

/// The shim (the replacement's signature, counting panics) both forms
/// emit, and the tokens that name the crate's tables.
fn shim(f: &ItemFn) -> (syn::Ident, TokenStream, TokenStream) {
    let ident = &f.sig.ident;
    let shim = format_ident!("__hotpatch_entry_{}", ident);
    let mut shim_sig = sig::forwarding_signature(&f.sig);
    shim_sig.ident = shim.clone();
    let args = sig::forward_names(&f.sig);
    let call = if f.sig.unsafety.is_some() {
        // SAFETY (generated): the shim is an `unsafe fn` with the
        // replacement's contract; its caller upholds it.
        quote!(unsafe { #ident(#(#args),*) })
    } else {
        quote!(#ident(#(#args),*))
    };
    let sig_span = f.sig.ident.span();
    let tables = quote_spanned! {sig_span=>
        crate::__hotpatch_manifest_missing__call_hotpatch_manifest_at_the_crate_root
    };
    let item = quote! {
        #[doc(hidden)]
        #[allow(non_snake_case, improper_ctypes_definitions, unreachable_code, clippy::all)]
        #shim_sig {
            let __hotpatch_count = ::hotpatch::__private::PanicCount::new(&#tables::PANICS);
            let __hotpatch_value = #call;
            __hotpatch_count.returned();
            __hotpatch_value
        }
    };
    (shim, item, tables)
}

/// `#[patch(path, hook)]`: the shim and a `HookFn` record.
fn expand_hook(f: &ItemFn, target: &ExprPath) -> TokenStream {
    let ident = &f.sig.ident;
    let record = format_ident!("__HOTPATCH_HOOK_{}", ident);
    let sig_ty: Type = sig::fn_ptr_type(&f.sig);
    let (shim, shim_item, tables) = shim(f);
    // The coercion of the target to the replacement's fn-pointer type is
    // the signature check: a mismatch points at the target's path.
    let target_span = syn::spanned::Spanned::span(target);
    let typed_target = quote_spanned! {target_span=>
        {
            let __hotpatch_target: #sig_ty = #target;
            __hotpatch_target as *const ()
        }
    };
    let path = path_text(target);
    quote! {
        #f

        #shim_item

        #[::hotpatch::__private::linkme::distributed_slice(#tables::HOOKS)]
        #[linkme(crate = ::hotpatch::__private::linkme)]
        #[doc(hidden)]
        #[allow(non_upper_case_globals)]
        static #record: ::hotpatch::__private::HookFn = ::hotpatch::__private::HookFn {
            target: #typed_target,
            replacement: #shim as #sig_ty as *const (),
            entry: &[],
            path: #path,
            name: ::core::concat!(::core::module_path!(), "::", ::core::stringify!(#ident)),
        };
    }
}

/// The target's path as its author wrote it, without the token spacing.
fn path_text(target: &ExprPath) -> String {
    let text = quote!(#target).to_string();
    let mut out = String::with_capacity(text.len());
    let mut words = text.split(' ').peekable();
    while let Some(w) = words.next() {
        out.push_str(w);
        let next = words.peek().copied().unwrap_or("");
        let glue = matches!(w, "::" | "<" | "&") || matches!(next, "::" | ">" | "," | "<");
        if !glue && !next.is_empty() {
            out.push(' ');
        }
    }
    out
}

fn parse_target(args: TokenStream) -> syn::Result<Args> {
    if args.is_empty() {
        return Err(syn::Error::new(
            proc_macro2::Span::call_site(),
            "#[hotpatch::patch] needs the path of the #[patchable] function it replaces, e.g. \
             #[hotpatch::patch(my_service::pricing::price)]",
        ));
    }
    // `path` or `path, hook`: split at the first top-level comma.
    let mut path = TokenStream::new();
    let mut rest: Option<TokenStream> = None;
    for tt in args {
        match &mut rest {
            Some(r) => r.extend([tt]),
            None if matches!(&tt, proc_macro2::TokenTree::Punct(p) if p.as_char() == ',') => {
                rest = Some(TokenStream::new());
            }
            None => path.extend([tt]),
        }
    }
    let target = syn::parse2::<ExprPath>(path.clone()).map_err(|_| {
        syn::Error::new_spanned(
            &path,
            "expected the path of a #[patchable] function, e.g. `my_service::pricing::price`, \
             `my_service::Cart::total` or `<my_service::Cart as my_service::Priced>::total`",
        )
    })?;
    let Some(rest) = rest else {
        return Ok(Args {
            target,
            hook: false,
        });
    };
    let parser = syn::punctuated::Punctuated::<syn::Ident, syn::Token![,]>::parse_terminated;
    let options = syn::parse::Parser::parse2(parser, rest.clone()).ok();
    let hook = options.is_some_and(|o| o.len() == 1 && o[0] == "hook");
    if !hook {
        return Err(syn::Error::new_spanned(
            &rest,
            "the only option of #[hotpatch::patch] is `hook`: \
             #[hotpatch::patch(path::to::function, hook)] replaces a function that is not \
             #[patchable] by redirecting its entry",
        ));
    }
    Ok(Args { target, hook: true })
}

/// Where the target's companion constant is: `a::b::f` -> `a::b::__hotpatch_f`,
/// `a::Ty::m` -> `a::Ty::__hotpatch_m`, `<a::Ty as a::Tr>::m` ->
/// `<a::Ty>::__hotpatch_Tr_m`, `<a::Ty as Tr<A>>::m` -> `<a::Ty as
/// TraitTarget<Method<hash of "Tr::m">, (A,)>>::TARGET`. The new last segment keeps the span of the
/// user's, so resolution errors point at the attribute.
fn companion_path(target: &ExprPath) -> syn::Result<TokenStream> {
    let last = target
        .path
        .segments
        .last()
        .ok_or_else(|| syn::Error::new_spanned(target, "empty path"))?;
    if !last.arguments.is_none() {
        return Err(syn::Error::new_spanned(
            &last.arguments,
            "a patch target has no generic arguments: generic functions cannot be patchable",
        ));
    }
    match &target.qself {
        Some(q) if q.position > 0 => {
            let ty = &q.ty;
            let trait_seg = &target.path.segments[q.position - 1];
            let trait_last = &trait_seg.ident;
            let trait_path = syn::Path::from(trait_seg.clone());
            if let Some(args) = sig::trait_arguments(&trait_path)? {
                // `<T as From<&str>>::from`: the impl is picked by the
                // trait's arguments, as the service's impl wrote them.
                let key = sig::method_key(trait_last, &last.ident);
                return Ok(quote_spanned! {last.ident.span()=>
                    <#ty as ::hotpatch::__private::TraitTarget<
                        ::hotpatch::__private::Method<#key>,
                        #args,
                    >>::TARGET
                });
            }
            let name = format_ident!(
                "__hotpatch_{}_{}",
                trait_last,
                last.ident,
                span = last.ident.span()
            );
            Ok(quote!(<#ty>::#name))
        }
        Some(q) => {
            let ty = &q.ty;
            let name = format_ident!("__hotpatch_{}", last.ident, span = last.ident.span());
            Ok(quote!(<#ty>::#name))
        }
        None => {
            let mut path = target.path.clone();
            let seg = path.segments.last_mut().expect("checked non-empty");
            seg.ident = format_ident!("__hotpatch_{}", seg.ident, span = seg.ident.span());
            Ok(quote!(#path))
        }
    }
}
