//! Token text for comparison: what the parser kept of the source (no
//! comments, no whitespace), with doc attributes removed, one space
//! between tokens whatever the source's spacing.

use proc_macro2::{Delimiter, TokenStream, TokenTree};
use quote::ToTokens;

/// The normalized text of anything syn can print.
pub(super) fn text<T: ToTokens + ?Sized>(node: &T) -> String {
    let mut out = String::new();
    write_stream(node.to_token_stream(), &mut out);
    out
}

/// The normalized text of a token stream.
pub(super) fn stream(tokens: TokenStream) -> String {
    let mut out = String::new();
    write_stream(tokens, &mut out);
    out
}

fn write_stream(tokens: TokenStream, out: &mut String) {
    let tokens: Vec<TokenTree> = tokens.into_iter().collect();
    let mut i = 0;
    while i < tokens.len() {
        // `#[doc ...]` and `#![doc ...]`: doc comments (and `#[doc(hidden)]`,
        // which changes no code either).
        if let TokenTree::Punct(p) = &tokens[i]
            && p.as_char() == '#'
        {
            let bang = matches!(tokens.get(i + 1), Some(TokenTree::Punct(p)) if p.as_char() == '!');
            let at = if bang { i + 2 } else { i + 1 };
            if let Some(TokenTree::Group(g)) = tokens.get(at)
                && g.delimiter() == Delimiter::Bracket
                && is_doc(g.stream())
            {
                i = at + 1;
                continue;
            }
        }
        match &tokens[i] {
            TokenTree::Group(g) => {
                let (open, close) = match g.delimiter() {
                    Delimiter::Parenthesis => ("(", ")"),
                    Delimiter::Brace => ("{", "}"),
                    Delimiter::Bracket => ("[", "]"),
                    Delimiter::None => ("", ""),
                };
                push(out, open);
                write_stream(g.stream(), out);
                push(out, close);
            }
            TokenTree::Ident(id) => push(out, &id.to_string()),
            TokenTree::Punct(p) => push(out, p.as_char().encode_utf8(&mut [0; 4])),
            TokenTree::Literal(l) => push(out, &l.to_string()),
        }
        i += 1;
    }
}

fn push(out: &mut String, token: &str) {
    if token.is_empty() {
        return;
    }
    if !out.is_empty() {
        out.push(' ');
    }
    out.push_str(token);
}

fn is_doc(attr: TokenStream) -> bool {
    matches!(attr.into_iter().next(), Some(TokenTree::Ident(id)) if id == "doc")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doc_attributes_and_spacing_do_not_count() {
        let parse = |s: &str| stream(s.parse().unwrap());
        let plain = parse("struct A{a:u32,b:Vec<u8>}");
        assert_eq!(
            parse("#[doc = \"x\"] struct A { a: u32, #[doc = \"y\"] b: Vec < u8 > }"),
            plain
        );
        assert_eq!(
            parse("#![doc = \"inner\"] struct A{a:u32,b:Vec<u8>}"),
            plain
        );
        assert_ne!(parse("struct A{a:u32,b:Vec<u16>}"), plain);
        assert_ne!(parse("#[repr(C)] struct A{a:u32,b:Vec<u8>}"), plain);
    }
}
