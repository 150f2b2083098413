//! `#[shared]`: deprecated. `static NAME: T = expr;` becomes `static NAME:
//! Shared<T> = Shared::new(expr);`, and `Shared` is deprecated, so the
//! service gets the warning that says why (thin patches see every static
//! of the host as the host's own).

use proc_macro2::TokenStream;
use quote::quote;
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
    quote! {
        #(#attrs)*
        #vis static #ident: ::hotpatch::Shared<#ty> = ::hotpatch::Shared::new(#expr);
    }
}
