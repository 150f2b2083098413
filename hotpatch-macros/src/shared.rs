//! `#[shared]`: a service `static` that patches share with the host.
//!
//! `static NAME: T = expr;` becomes `static NAME: Shared<T> =
//! Shared::new(expr);` and a `SharedEntry` in the `SHARED` slice, through
//! which the runtime points a patch's copy at the host's value.

use crate::sig;
use proc_macro2::TokenStream;
use quote::{format_ident, quote};
use syn::{ItemStatic, StaticMutability};

pub fn expand(args: TokenStream, input: TokenStream) -> TokenStream {
    let item = match syn::parse2::<ItemStatic>(input.clone()) {
        Ok(item) => item,
        Err(_) => {
            let e = syn::Error::new_spanned(
                &input,
                "#[hotpatch::shared] applies to a `static`: the host's instance is what patches \
                 see",
            )
            .to_compile_error();
            return quote!(#e #input);
        }
    };
    let mut errors = Vec::new();
    if !args.is_empty() {
        errors.push(syn::Error::new_spanned(
            &args,
            "#[hotpatch::shared] takes no arguments",
        ));
    }
    if let StaticMutability::Mut(m) = &item.mutability {
        errors.push(syn::Error::new_spanned(
            m,
            "a `static mut` cannot be shared: make it a `static` of an atomic, a `Mutex` or \
             another `Sync` type",
        ));
    }
    if !errors.is_empty() {
        let errors: TokenStream = errors.into_iter().map(|e| e.to_compile_error()).collect();
        return quote!(#errors #item);
    }
    let ItemStatic {
        attrs,
        vis,
        ident,
        ty,
        expr,
        ..
    } = &item;
    let ty_text = sig::to_text(&quote!(#ty));
    let fingerprint = sig::fingerprint(&ty_text);
    let entry = format_ident!("__HOTPATCH_SHARED_{}", ident);
    let cfgs = sig::cfg_attrs(attrs);
    quote! {
        #(#attrs)*
        #vis static #ident: ::hotpatch::Shared<#ty> = ::hotpatch::Shared::new(#expr);

        #(#cfgs)*
        #[::hotpatch::__private::linkme::distributed_slice(::hotpatch::__private::SHARED)]
        #[linkme(crate = ::hotpatch::__private::linkme)]
        #[doc(hidden)]
        #[allow(non_upper_case_globals)]
        static #entry: ::hotpatch::__private::SharedEntry = ::hotpatch::__private::SharedEntry {
            path: ::core::concat!(::core::module_path!(), "::", ::core::stringify!(#ident)),
            ty: #ty_text,
            fingerprint: #fingerprint,
            layout: ::hotpatch::__private::TypeLayout::of::<#ty>(),
            local: ::hotpatch::__private::DataAddr(::hotpatch::Shared::__local(&#ident)),
            target: ::hotpatch::__private::DataAddr(
                ::hotpatch::Shared::__target(&#ident) as *const (),
            ),
        };
    }
}
