//! Crate trees written to a temporary directory, parsed and compared.

use super::*;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A crate `svc` in its own temporary directory, removed on drop.
struct Tree {
    dir: PathBuf,
}

impl Tree {
    fn new(files: &[(&str, &str)]) -> Tree {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        // Relaxed: only uniqueness of the number matters.
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("cargo-hotpatch-syntax-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let tree = Tree { dir };
        tree.write(
            "Cargo.toml",
            "[package]\nname = \"svc\"\nversion = \"0.1.0\"\n",
        );
        for (path, text) in files {
            tree.write(path, text);
        }
        tree
    }

    fn write(&self, path: &str, text: &str) {
        let path = self.dir.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    fn parse(&self) -> CrateSource {
        parse_crate(&self.dir, Path::new("src/lib.rs"))
            .unwrap_or_else(|e| panic!("parse_crate failed: {e}"))
    }

    fn try_parse(&self) -> Result<CrateSource, SyntaxError> {
        parse_crate(&self.dir, Path::new("src/lib.rs"))
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Two one-file crates compared.
fn diff(base: &str, head: &str) -> Vec<Finding> {
    let b = Tree::new(&[("src/lib.rs", base)]);
    let h = Tree::new(&[("src/lib.rs", head)]);
    compare(&b.parse(), &h.parse())
}

/// Exactly one finding, which refuses.
fn one(findings: Vec<Finding>) -> Finding {
    assert_eq!(findings.len(), 1, "expected one finding, got {findings:#?}");
    findings.into_iter().next().unwrap()
}

/// The 1-based line of the first line of `src` containing `needle`.
fn line(src: &str, needle: &str) -> usize {
    src.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not in source"))
        + 1
}

fn at(src: &str, needle: &str) -> Location {
    Location {
        file: PathBuf::from("src/lib.rs"),
        line: line(src, needle),
    }
}

// ---------------------------------------------------------------------
// Type layout.

const CART: &str = "\
use std::collections::HashMap;

/// A cart.
pub struct Cart {
    pub items: Vec<u32>,
    pub owner: String,
}
";

fn layout(base: &str, head: &str) -> (LayoutChange, Finding) {
    let f = one(diff(base, head));
    let Finding::TypeLayout { change, .. } = &f else {
        panic!("not a type layout finding: {f:?}")
    };
    assert!(f.refuses(), "{f}");
    (change.clone(), f)
}

#[test]
fn type_with_a_new_field_is_refused_with_its_location() {
    let head = "\
use std::collections::HashMap;

/// A cart.
pub struct Cart {
    pub items: Vec<u32>,
    pub owner: String,
    pub coupon: Option<u32>,
}
";
    let (change, f) = layout(CART, head);
    assert_eq!(change, LayoutChange::Fields);
    assert_eq!(f.path(), "svc::Cart");
    assert_eq!(f.head(), Some(&at(head, "struct Cart")));
    assert_eq!(f.base(), Some(&at(CART, "struct Cart")));
    assert_eq!(
        f.to_string(),
        "type svc::Cart (src/lib.rs:4) changed its fields: the running code lays it out as \
         before; a patch cannot change a type's layout. Keep the old fields (add new state \
         elsewhere) or ship the change in a release"
    );
}

#[test]
fn type_with_fields_reordered_retyped_or_renamed_is_refused() {
    for head in [
        "pub struct Cart { pub owner: String, pub items: Vec<u32> }",
        "pub struct Cart { pub items: Vec<u64>, pub owner: String }",
        "pub struct Cart { pub things: Vec<u32>, pub owner: String }",
        "pub struct Cart(pub Vec<u32>, pub String);",
    ] {
        let (change, _) = layout(CART, head);
        assert_eq!(change, LayoutChange::Fields, "{head}");
    }
}

#[test]
fn enum_with_changed_variants_is_refused() {
    let base = "pub enum State { Idle, Busy(u32), Done { code: i32 } }";
    for head in [
        "pub enum State { Idle, Busy(u32), Done { code: i32 }, Failed }",
        "pub enum State { Busy(u32), Idle, Done { code: i32 } }",
        "pub enum State { Idle, Busy(u64), Done { code: i32 } }",
        "pub enum State { Idle = 3, Busy(u32), Done { code: i32 } }",
    ] {
        let (change, f) = layout(base, head);
        assert_eq!(change, LayoutChange::Variants, "{head}");
        assert!(f.to_string().contains("changed its variants"), "{f}");
    }
}

#[test]
fn union_with_changed_fields_is_refused() {
    let (change, _) = layout(
        "#[repr(C)] pub union Bits { i: u32, f: f32 }",
        "#[repr(C)] pub union Bits { i: u64, f: f32 }",
    );
    assert_eq!(change, LayoutChange::Fields);
}

#[test]
fn type_with_changed_generics_repr_or_kind_is_refused() {
    let base = "#[repr(C)]\npub struct P<T> { x: T }";
    assert_eq!(
        layout(base, "#[repr(C)]\npub struct P<T, U> { x: T }").0,
        LayoutChange::Generics
    );
    assert_eq!(
        layout(base, "#[repr(C)]\npub struct P<T: Copy> { x: T }").0,
        LayoutChange::Generics
    );
    assert_eq!(
        layout(base, "#[repr(C, packed)]\npub struct P<T> { x: T }").0,
        LayoutChange::Repr
    );
    assert_eq!(
        layout(base, "pub struct P<T> { x: T }").0,
        LayoutChange::Repr
    );
    assert_eq!(
        layout(base, "#[cfg(unix)]\n#[repr(C)]\npub struct P<T> { x: T }").0,
        LayoutChange::Cfg
    );
    let (change, f) = layout(base, "#[repr(C)]\npub enum P<T> { X(T) }");
    assert_eq!(
        change,
        LayoutChange::Kind {
            was: "struct",
            now: "enum"
        }
    );
    assert!(
        f.to_string().contains("was a struct and is now an enum"),
        "{f}"
    );
}

#[test]
fn removed_type_is_refused_at_its_base_location() {
    let base = "pub fn f() {}\n\npub struct Gone { a: u8 }\n";
    let (change, f) = layout(base, "pub fn f() {}\n");
    assert_eq!(change, LayoutChange::Removed);
    assert_eq!(f.base(), Some(&at(base, "struct Gone")));
    assert_eq!(f.head(), None);
    assert!(
        f.to_string()
            .starts_with("type svc::Gone (base src/lib.rs:3) was removed"),
        "{f}"
    );
}

#[test]
fn changed_type_alias_is_refused() {
    let (change, f) = layout("pub type Money = u32;", "pub type Money = u64;");
    assert_eq!(change, LayoutChange::Alias);
    assert_eq!(f.path(), "svc::Money");
}

#[test]
fn type_in_a_module_is_named_by_its_module_path() {
    let b = Tree::new(&[
        ("src/lib.rs", "pub mod shop;"),
        ("src/shop.rs", "pub struct Cart { a: u8 }"),
    ]);
    let h = Tree::new(&[
        ("src/lib.rs", "pub mod shop;"),
        ("src/shop.rs", "pub struct Cart { a: u16 }"),
    ]);
    let f = one(compare(&b.parse(), &h.parse()));
    assert_eq!(f.path(), "svc::shop::Cart");
    assert_eq!(
        f.head(),
        Some(&Location {
            file: PathBuf::from("src/shop.rs"),
            line: 1
        })
    );
}

// ---------------------------------------------------------------------
// Statics and thread-locals.

fn static_change(base: &str, head: &str) -> (StaticKind, ValueChange, Finding) {
    let f = one(diff(base, head));
    let Finding::Static { kind, change, .. } = &f else {
        panic!("not a static finding: {f:?}")
    };
    assert!(f.refuses(), "{f}");
    (*kind, *change, f)
}

#[test]
fn static_with_changed_initialiser_or_type_is_refused() {
    let base =
        "use std::sync::atomic::AtomicU64;\npub static HITS: AtomicU64 = AtomicU64::new(0);\n";
    let head =
        "use std::sync::atomic::AtomicU64;\npub static HITS: AtomicU64 = AtomicU64::new(1);\n";
    let (kind, change, f) = static_change(base, head);
    assert_eq!((kind, change), (StaticKind::Static, ValueChange::Value));
    assert_eq!(f.path(), "svc::HITS");
    assert_eq!(
        f.to_string(),
        "static svc::HITS (src/lib.rs:2) changed its initialiser: the running process keeps \
         the old value; a patch cannot change a static or a thread-local. Keep it as in the \
         base, or ship the change in a release"
    );
    let (_, change, _) = static_change("pub static N: u32 = 0;", "pub static N: u64 = 0;");
    assert_eq!(change, ValueChange::Type);
    let (kind, change, _) = static_change("pub static N: u32 = 0;", "pub static mut N: u32 = 0;");
    assert_eq!((kind, change), (StaticKind::StaticMut, ValueChange::Kind));
}

#[test]
fn added_or_removed_static_is_refused() {
    let head = "pub fn f() {}\npub static mut NEW: u32 = 0;\n";
    let (kind, change, f) = static_change("pub fn f() {}\n", head);
    assert_eq!((kind, change), (StaticKind::StaticMut, ValueChange::Added));
    assert_eq!(f.head(), Some(&at(head, "NEW")));
    assert!(
        f.to_string()
            .starts_with("added static mut svc::NEW (src/lib.rs:2)"),
        "{f}"
    );
    let (_, change, f) = static_change("pub static OLD: u8 = 1;\n", "\n");
    assert_eq!(change, ValueChange::Removed);
    assert!(f.to_string().contains("keeps the old value"), "{f}");
}

#[test]
fn static_in_a_function_body_is_compared() {
    let (_, change, f) = static_change(
        "pub fn f() -> u32 { static CALLS: u32 = 0; CALLS }",
        "pub fn f() -> u32 { static CALLS: u32 = 5; CALLS }",
    );
    assert_eq!(change, ValueChange::Value);
    assert_eq!(f.path(), "svc::f::CALLS");
}

#[test]
fn thread_local_keys_changed_added_or_removed_are_refused() {
    let base = "\
use std::cell::Cell;
thread_local! {
    static DEPTH: Cell<u32> = Cell::new(0);
    pub static NAME: Cell<u8> = const { Cell::new(1) }
}
";
    let head = "\
use std::cell::Cell;
thread_local! {
    static DEPTH: Cell<u32> = Cell::new(1);
    pub static NAME: Cell<u8> = const { Cell::new(1) };
}
";
    let (kind, change, f) = static_change(base, head);
    assert_eq!(
        (kind, change),
        (StaticKind::ThreadLocal, ValueChange::Value)
    );
    assert_eq!(f.path(), "svc::DEPTH");
    assert_eq!(f.head(), Some(&at(head, "DEPTH")));
    assert!(
        f.to_string()
            .contains("thread-local svc::DEPTH (src/lib.rs:3) changed its initialiser: every running thread keeps its old state"),
        "{f}"
    );

    let added = head.replace(
        "const { Cell::new(1) };",
        "const { Cell::new(1) };\n    static MORE: u8 = 0;",
    );
    let (_, change, f) = static_change(head, &added);
    assert_eq!(change, ValueChange::Added);
    assert_eq!(f.path(), "svc::MORE");

    let removed = "use std::cell::Cell;\nthread_local!(static DEPTH: Cell<u32> = Cell::new(1));\n";
    let (_, change, f) = static_change(head, removed);
    assert_eq!(change, ValueChange::Removed);
    assert_eq!(f.path(), "svc::NAME");

    let retyped = head.replace("Cell<u8>", "Cell<u16>");
    assert_eq!(static_change(head, &retyped).1, ValueChange::Type);
}

#[test]
fn thread_local_in_a_function_body_is_compared() {
    let (kind, change, _) = static_change(
        "pub fn f() { std::thread_local!(static K: u8 = 0); }",
        "pub fn f() { std::thread_local!(static K: u8 = 1); }",
    );
    assert_eq!(
        (kind, change),
        (StaticKind::ThreadLocal, ValueChange::Value)
    );
}

// ---------------------------------------------------------------------
// Patchable signatures.

fn sig_change(base: &str, head: &str) -> (SignatureChange, Finding) {
    let f = one(diff(base, head));
    let Finding::PatchableSignature { change, .. } = &f else {
        panic!("not a signature finding: {f:?}")
    };
    assert!(f.refuses(), "{f}");
    (*change, f)
}

const PRICE: &str = "\
#[hotpatch::patchable]
pub fn price(qty: u32, unit: u64) -> u64 {
    qty as u64 * unit
}
";

#[test]
fn patchable_fn_with_changed_signature_is_refused() {
    let cases = [
        (
            "pub fn price(qty: u64, unit: u64) -> u64",
            SignatureChange::Parameters,
        ),
        ("pub fn price(qty: u32) -> u64", SignatureChange::Parameters),
        (
            "pub fn price(unit: u64, qty: u32) -> u64",
            SignatureChange::Parameters,
        ),
        (
            "pub fn price(qty: u32, unit: u64) -> u32",
            SignatureChange::Return,
        ),
        ("pub fn price(qty: u32, unit: u64)", SignatureChange::Return),
        (
            "pub fn price<T>(qty: u32, unit: u64) -> u64",
            SignatureChange::Generics,
        ),
        (
            "pub unsafe fn price(qty: u32, unit: u64) -> u64",
            SignatureChange::Unsafe,
        ),
        (
            "pub async fn price(qty: u32, unit: u64) -> u64",
            SignatureChange::Async,
        ),
        (
            "pub const fn price(qty: u32, unit: u64) -> u64",
            SignatureChange::Const,
        ),
        (
            "pub extern \"C\" fn price(qty: u32, unit: u64) -> u64",
            SignatureChange::Abi,
        ),
    ];
    for (sig, want) in cases {
        let head = PRICE.replace("pub fn price(qty: u32, unit: u64) -> u64", sig);
        let (change, f) = sig_change(PRICE, &head);
        assert_eq!(change, want, "{sig}");
        assert_eq!(f.path(), "svc::price");
        assert_eq!(f.head(), Some(&at(&head, "fn price")));
    }
    // C-variadic definitions are unstable, but syn reads them.
    let base = "#[patchable]\npub unsafe extern \"C\" fn v(a: u32, ...) -> u32 { a }\n";
    let (change, _) = sig_change(base, &base.replace(", ...", ""));
    assert_eq!(change, SignatureChange::Variadic);

    let head = PRICE.replace("qty: u32", "qty: u16");
    let (_, f) = sig_change(PRICE, &head);
    assert_eq!(
        f.to_string(),
        "#[patchable] fn svc::price (src/lib.rs:2) changed its parameters: the running \
         binary's slot and callers have the old signature; a patch cannot change it. Keep the \
         signature (a new function may have the new one) or ship the change in a release"
    );
}

const SHOP: &str = "\
pub struct Cart { n: u32 }
pub trait Describe { fn describe(&self) -> String; }

#[hotpatch::patchable]
impl Cart {
    pub fn total(&self) -> u32 { self.n }
    #[patchable(skip)]
    pub fn helper(&self, x: u8) -> u8 { x }
}

#[patchable]
impl Describe for Cart {
    fn describe(&self) -> String { String::new() }
}

impl Cart {
    pub fn plain(&self) -> u32 { 0 }
}
";

#[test]
fn patchable_method_with_changed_signature_is_refused() {
    let head = SHOP.replace(
        "pub fn total(&self) -> u32",
        "pub fn total(&mut self) -> u32",
    );
    let (change, f) = sig_change(SHOP, &head);
    assert_eq!(change, SignatureChange::Parameters);
    assert_eq!(f.path(), "svc::Cart::total");
    assert_eq!(f.head(), Some(&at(&head, "fn total")));

    let head = SHOP.replace(
        "fn describe(&self) -> String {",
        "fn describe(&self) -> &'static str {",
    );
    let head = head.replace(
        "fn describe(&self) -> String;",
        "fn describe(&self) -> &'static str;",
    );
    let (change, f) = sig_change(SHOP, &head);
    assert_eq!(change, SignatureChange::Return);
    assert_eq!(f.path(), "<svc::Cart as Describe>::describe");
}

#[test]
fn methods_outside_patchable_impls_and_skipped_ones_may_change_signature() {
    let head = SHOP
        .replace(
            "pub fn helper(&self, x: u8) -> u8",
            "pub fn helper(&self, x: u16) -> u16",
        )
        .replace(
            "pub fn plain(&self) -> u32",
            "pub fn plain(&self, y: u32) -> u64",
        );
    assert_eq!(diff(SHOP, &head), vec![]);
}

#[test]
fn patchable_fn_that_stopped_being_patchable_or_was_removed_is_refused() {
    let head = PRICE.replace("#[hotpatch::patchable]\n", "");
    let (change, f) = sig_change(PRICE, &head);
    assert_eq!(change, SignatureChange::NoLongerPatchable);
    assert!(f.to_string().contains("is no longer #[patchable]"), "{f}");

    let head = SHOP.replace(
        "    #[patchable(skip)]\n    pub fn helper",
        "    pub fn helper",
    );
    let with_skip_on_total = SHOP.replace(
        "    pub fn total(&self)",
        "    #[patchable(skip)]\n    pub fn total(&self)",
    );
    let (change, f) = sig_change(SHOP, &with_skip_on_total);
    assert_eq!(change, SignatureChange::NoLongerPatchable);
    assert_eq!(f.path(), "svc::Cart::total");

    let (change, f) = sig_change(PRICE, "pub fn other() {}\n");
    assert_eq!(change, SignatureChange::Removed);
    assert_eq!(f.base(), Some(&at(PRICE, "fn price")));
    assert!(
        f.to_string()
            .starts_with("#[patchable] fn svc::price (base src/lib.rs:2) was removed"),
        "{f}"
    );

    // `helper` lost its skip: it became patchable.
    let (change, f) = sig_change(SHOP, &head);
    assert_eq!(change, SignatureChange::BecamePatchable);
    assert_eq!(f.path(), "svc::Cart::helper");
}

#[test]
fn new_patchable_fn_is_refused_and_becoming_patchable_too() {
    let head = format!("{PRICE}\n#[patchable]\npub fn discount(p: u64) -> u64 {{ p }}\n");
    let (change, f) = sig_change(PRICE, &head);
    assert_eq!(change, SignatureChange::Added);
    assert_eq!(f.head(), Some(&at(&head, "fn discount")));
    assert!(
        f.to_string().starts_with(
            "added #[patchable] fn svc::discount (src/lib.rs:7); a new function can be called \
             from replaced code, but it is not patchable until the next release"
        ),
        "{f}"
    );

    let base = PRICE.replace("#[hotpatch::patchable]\n", "");
    let (change, _) = sig_change(&base, PRICE);
    assert_eq!(change, SignatureChange::BecamePatchable);
}

// ---------------------------------------------------------------------
// Consts.

#[test]
fn changed_const_is_informational() {
    let base = "pub fn f() {}\n\npub const LIMIT: u32 = 10;\n";
    let head = "pub fn f() {}\n\npub const LIMIT: u32 = 20;\n";
    let f = one(diff(base, head));
    assert!(!f.refuses(), "{f}");
    assert!(matches!(
        f,
        Finding::Const {
            change: ValueChange::Value,
            ..
        }
    ));
    assert_eq!(
        f.to_string(),
        "const svc::LIMIT (src/lib.rs:3) changed: every function whose code uses it is \
         compared and replaced, or refused, by the object diff"
    );
    let f = one(diff(base, &head.replace("u32 = 20", "u64 = 10")));
    assert!(matches!(
        f,
        Finding::Const {
            change: ValueChange::Type,
            ..
        }
    ));
    let f = one(diff("", base));
    assert!(
        matches!(
            f,
            Finding::Const {
                change: ValueChange::Added,
                ..
            }
        ) && !f.refuses()
    );
    let f = one(diff(base, ""));
    assert!(
        matches!(
            f,
            Finding::Const {
                change: ValueChange::Removed,
                ..
            }
        ) && !f.refuses()
    );
    let f = one(diff(
        "pub struct S;\nimpl S { pub const MAX: u8 = 1; }",
        "pub struct S;\nimpl S { pub const MAX: u8 = 2; }",
    ));
    assert_eq!(f.path(), "svc::S::MAX");
}

// ---------------------------------------------------------------------
// What is not a finding.

const SERVICE: &str = "\
use std::sync::atomic::{AtomicU64, Ordering};

/// Requests served.
pub static SERVED: AtomicU64 = AtomicU64::new(0);
pub const LIMIT: u32 = 10;
pub static TABLE: [u32; 2] = {
    /// The first entry.
    const FIRST: u32 = 1;
    [FIRST, 2]
};

#[derive(Debug, Clone)]
pub struct Cart {
    /// Items.
    pub items: Vec<u32>,
}

thread_local!(static DEPTH: std::cell::Cell<u32> = std::cell::Cell::new(0));

/// Prices things.
#[hotpatch::patchable]
pub fn price(qty: u32, unit: u64) -> u64 {
    // One unit each.
    SERVED.fetch_add(1, Ordering::Relaxed);
    qty as u64 * unit
}

#[hotpatch::patchable]
impl Cart {
    pub fn total(&self) -> u32 { self.items.iter().sum() }
}
";

#[test]
fn comment_and_doc_comment_changes_are_not_findings() {
    let head = SERVICE
        .replace(
            "// One unit each.",
            "// Each unit is priced alone; see issue 10.",
        )
        .replace(
            "/// Requests served.",
            "/// Requests served since start.\n/// More text.",
        )
        .replace("/// Items.", "")
        .replace("/// The first entry.", "/// The first entry, documented.")
        .replace(
            "/// Prices things.",
            "/** Prices things. */ // and a comment",
        )
        .replace("pub struct Cart {", "pub struct Cart { /* block comment */");
    assert_ne!(head, SERVICE);
    assert_eq!(diff(SERVICE, &head), vec![]);
}

#[test]
fn formatting_changes_are_not_findings() {
    let head = "use std::sync::atomic::{AtomicU64,Ordering};\
        pub static SERVED:AtomicU64=AtomicU64::new( 0 );pub const LIMIT:u32=10;\
        pub static TABLE:[u32;2]={/** The first entry.*/const FIRST:u32=1;[FIRST,2]};\
        #[derive(Debug,Clone)]pub struct Cart{pub items:Vec<u32>,}\
        thread_local!{static DEPTH:std::cell::Cell<u32>=std::cell::Cell::new(0);}\
        #[hotpatch::patchable] pub fn price(qty:u32,unit:u64)->u64{SERVED.fetch_add(1,Ordering::Relaxed);qty as u64*unit}\
        #[hotpatch::patchable] impl Cart{pub fn total(&self)->u32{self.items.iter().sum()}}";
    assert_eq!(diff(SERVICE, head), vec![]);
}

#[test]
fn derive_changes_are_not_layout_changes() {
    let head = SERVICE.replace(
        "#[derive(Debug, Clone)]",
        "#[derive(Debug, Clone, PartialEq, Default)]",
    );
    assert_eq!(diff(SERVICE, &head), vec![]);
    let head = SERVICE.replace("#[derive(Debug, Clone)]\n", "");
    assert_eq!(diff(SERVICE, &head), vec![]);
}

#[test]
fn new_private_fn_new_type_and_changed_bodies_are_not_findings() {
    let head = SERVICE
        .replace("qty as u64 * unit", "helper(qty) * unit")
        .replace("self.items.iter().sum()", "self.items.len() as u32")
        .replace(
            "pub fn price(qty: u32, unit: u64)",
            "pub fn price(mut count: u32, unit: u64)",
        )
        .replace("helper(qty)", "{ count += 0; helper(count) }")
        + "\nfn helper(q: u32) -> u64 { q as u64 + 1 }\npub struct NewType { a: u8 }\n";
    assert_eq!(diff(SERVICE, &head), vec![]);
}

#[test]
fn items_under_cfg_test_are_ignored() {
    let base = "pub fn f() {}\n#[cfg(test)]\nmod tests { static S: u8 = 0; struct T { a: u8 } }\n#[cfg(test)]\nmod missing;\n";
    let head = "pub fn f() {}\n#[cfg(test)]\nmod tests { static S: u8 = 1; struct T { a: u16 } #[hotpatch::patchable] fn g() {} }\n";
    assert_eq!(diff(base, head), vec![]);
    // The premise: the same items outside cfg(test) are findings.
    assert_eq!(
        diff(
            &base
                .replace("#[cfg(test)]\nmod missing;\n", "")
                .replace("#[cfg(test)]", ""),
            &head.replace("#[cfg(test)]", "")
        )
        .len(),
        3
    );
}

// ---------------------------------------------------------------------
// Module resolution.

fn module_tree() -> Tree {
    Tree::new(&[
        (
            "src/lib.rs",
            "pub mod a;\npub mod b;\n#[path = \"other/renamed.rs\"]\npub mod p;\npub mod inline {\n    pub mod deep;\n    #[path = \"x.rs\"]\n    pub mod px;\n    pub fn in_inline() {}\n}\n",
        ),
        ("src/a.rs", "pub mod c;\npub fn in_a() {}\n"),
        ("src/a/c.rs", "\n\npub fn in_c() {}\n"),
        ("src/b/mod.rs", "pub mod d;\npub fn in_b() {}\n"),
        ("src/b/d.rs", "pub fn in_d() {}\n"),
        ("src/other/renamed.rs", "pub mod q;\npub fn in_p() {}\n"),
        ("src/other/q.rs", "pub fn in_q() {}\n"),
        ("src/inline/deep.rs", "pub fn in_deep() {}\n"),
        ("src/inline/x.rs", "pub fn in_px() {}\n"),
    ])
}

fn loc(file: &str, line: usize) -> Option<Location> {
    Some(Location {
        file: PathBuf::from(file),
        line,
    })
}

#[test]
fn modules_resolve_as_rustc_resolves_them() {
    let tree = module_tree();
    let src = tree.parse();
    assert_eq!(src.crate_name(), "svc");
    assert_eq!(src.locate("svc::a::in_a"), loc("src/a.rs", 2));
    assert_eq!(src.locate("svc::a::c::in_c"), loc("src/a/c.rs", 3));
    assert_eq!(src.locate("svc::b::in_b"), loc("src/b/mod.rs", 2));
    assert_eq!(src.locate("svc::b::d::in_d"), loc("src/b/d.rs", 1));
    assert_eq!(src.locate("svc::p::in_p"), loc("src/other/renamed.rs", 2));
    // A file loaded by #[path] owns its directory, as a mod.rs does.
    assert_eq!(src.locate("svc::p::q::in_q"), loc("src/other/q.rs", 1));
    assert_eq!(src.locate("svc::inline::in_inline"), loc("src/lib.rs", 9));
    assert_eq!(
        src.locate("svc::inline::deep::in_deep"),
        loc("src/inline/deep.rs", 1)
    );
    assert_eq!(
        src.locate("svc::inline::px::in_px"),
        loc("src/inline/x.rs", 1)
    );
    assert_eq!(src.files().len(), 9);
}

#[test]
fn inline_module_in_a_non_mod_rs_file_looks_in_its_directory() {
    let tree = Tree::new(&[
        ("src/lib.rs", "mod a;"),
        (
            "src/a.rs",
            "mod inner {\n    mod leaf;\n    #[path = \"p.rs\"]\n    mod pp;\n}\n#[path = \"sib.rs\"]\nmod sib;\n",
        ),
        ("src/a/inner/leaf.rs", "fn leaf() {}"),
        ("src/a/inner/p.rs", "fn pp() {}"),
        // #[path] outside inline blocks: relative to the file's directory.
        ("src/sib.rs", "fn sib() {}"),
    ]);
    let src = tree.parse();
    assert_eq!(
        src.locate("svc::a::inner::leaf::leaf"),
        loc("src/a/inner/leaf.rs", 1)
    );
    assert_eq!(
        src.locate("svc::a::inner::pp::pp"),
        loc("src/a/inner/p.rs", 1)
    );
    assert_eq!(src.locate("svc::a::sib::sib"), loc("src/sib.rs", 1));
}

#[test]
fn module_errors_name_the_file_and_line() {
    let tree = Tree::new(&[("src/lib.rs", "pub fn f() {}\n\nmod nowhere;\n")]);
    let err = tree.try_parse().unwrap_err();
    assert!(
        matches!(err, SyntaxError::ModuleNotFound { line: 3, .. }),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "src/lib.rs:3: file not found for module `nowhere`: none of src/nowhere.rs and \
         src/nowhere/mod.rs exists"
    );

    let tree = Tree::new(&[
        ("src/lib.rs", "mod both;"),
        ("src/both.rs", ""),
        ("src/both/mod.rs", ""),
    ]);
    let err = tree.try_parse().unwrap_err();
    assert!(
        matches!(err, SyntaxError::AmbiguousModule { line: 1, .. }),
        "{err:?}"
    );

    let tree = Tree::new(&[
        ("src/lib.rs", "mod a;"),
        ("src/a.rs", "\n\nfn broken( {}\n"),
    ]);
    let err = tree.try_parse().unwrap_err();
    let SyntaxError::Parse { file, line, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!((file.as_path(), *line), (Path::new("src/a.rs"), 3), "{err}");
    assert!(err.to_string().starts_with("src/a.rs:3:"), "{err}");

    let tree = Tree::new(&[("src/lib.rs", "#[path = \"lib.rs\"]\nmod again;\n")]);
    let err = tree.try_parse().unwrap_err();
    assert!(
        matches!(err, SyntaxError::CircularModule { line: 2, .. }),
        "{err:?}"
    );

    let tree = Tree::new(&[("src/lib.rs", "fn f() { mod inner; }")]);
    let err = tree.try_parse().unwrap_err();
    assert!(matches!(err, SyntaxError::BadModule { .. }), "{err:?}");

    let tree = Tree::new(&[]);
    let err = tree.try_parse().unwrap_err();
    assert!(matches!(err, SyntaxError::Read { .. }), "{err:?}");
}

#[test]
fn absolute_lib_rs_gives_paths_relative_to_the_crate() {
    let tree = Tree::new(&[("src/lib.rs", "mod a;"), ("src/a.rs", "pub fn g() {}")]);
    let src = parse_crate(&tree.dir, &tree.dir.join("src/lib.rs")).unwrap();
    assert_eq!(src.locate("svc::a::g"), loc("src/a.rs", 1));
}

// ---------------------------------------------------------------------
// locate and is_patchable.

const LOCATE: &str = "\
pub mod pricing {
    #[hotpatch::patchable]
    pub fn price(q: u32) -> u32 {
        let f = |x: u32| x + 1;
        f(q)
    }
    pub fn total() -> u32 { 0 }
    pub fn tag() {}
    pub fn moved() {}
    fn inner() {}
}

pub struct Cart { n: u32 }

pub trait Describe {
    fn describe(&self) -> String;
    fn tag(&self) -> u8 { 7 }
}

#[hotpatch::patchable]
impl Cart {
    pub fn total(&self) -> u32 { self.n }
    #[patchable(skip)]
    pub fn skipped(&self) -> u32 { 0 }
}

#[hotpatch::patchable]
impl Describe for Cart {
    fn describe(&self) -> String { String::new() }
}

impl Describe for u32 {
    fn describe(&self) -> String { String::new() }
}

pub fn price() -> u32 { 1 }

mod elsewhere {
    impl super::Cart {
        pub fn moved(&self) {}
    }
}

pub fn outer() {
    fn inner() {}
}
";

#[test]
fn locate_finds_every_demangled_form() {
    let tree = Tree::new(&[("src/lib.rs", LOCATE)]);
    let src = tree.parse();
    let l = |needle| Some(at(LOCATE, needle));
    assert_eq!(src.locate("svc::price"), l("pub fn price() -> u32"));
    assert_eq!(src.locate("svc::pricing::price"), l("pub fn price(q: u32)"));
    assert_eq!(src.locate("svc::Cart::total"), l("fn total(&self)"));
    assert_eq!(src.locate("<svc::Cart>::total"), l("fn total(&self)"));
    assert_eq!(
        src.locate("svc::pricing::total"),
        l("pub fn total() -> u32 { 0 }")
    );
    assert_eq!(
        src.locate("<svc::Cart as svc::Describe>::describe"),
        l("fn describe(&self) -> String { String::new() }")
    );
    assert_eq!(
        src.locate("<u32 as svc::Describe>::describe"),
        Some(at(LOCATE, "impl Describe for u32").line_plus(1))
    );
    assert_eq!(
        src.locate("svc::Cart::__hotpatch_original_total"),
        l("fn total(&self)")
    );
    assert_eq!(
        src.locate("<svc::Cart>::__hotpatch_dispatch_total"),
        l("fn total(&self)")
    );
    assert_eq!(
        src.locate("svc::Cart::__hotpatch_original_Describe_describe"),
        l("fn describe(&self) -> String { String::new() }")
    );
    assert_eq!(
        src.locate("svc::pricing::__hotpatch_original_price"),
        l("pub fn price(q: u32)")
    );
    assert_eq!(
        src.locate("svc::pricing::price::{{closure}}"),
        l("pub fn price(q: u32)")
    );
    assert_eq!(
        src.locate("svc::pricing::price::{closure#0}"),
        l("pub fn price(q: u32)")
    );
    assert_eq!(
        src.locate("svc::pricing::price::{{closure}}::h0123456789abcdef"),
        l("pub fn price(q: u32)")
    );
    assert_eq!(
        src.locate("svc[5f3a9c]::pricing::price"),
        l("pub fn price(q: u32)")
    );
    // By Type::name: the impl block is in another module.
    assert_eq!(src.locate("svc::Cart::moved"), l("fn moved(&self)"));
    // A trait's default method, legacy and v0.
    assert_eq!(src.locate("svc::Describe::tag"), l("fn tag(&self)"));
    assert_eq!(
        src.locate("<svc::Cart as svc::Describe>::tag"),
        l("fn tag(&self)")
    );
    assert_eq!(
        src.locate("svc::outer::inner"),
        Some(at(LOCATE, "pub fn outer").line_plus(1))
    );
    // By name alone, when unique (`skipped` is; `describe`, `total` and
    // `price` are not).
    assert_eq!(src.locate("svc::somewhere::skipped"), l("fn skipped"));
    assert_eq!(src.locate("svc::somewhere::total"), None);
    assert_eq!(src.locate("svc::somewhere::describe"), None);
    // Not found, or not this crate.
    assert_eq!(src.locate("svc::nothing"), None);
    assert_eq!(src.locate("core::ptr::drop_in_place"), None);
    assert_eq!(src.locate("other::pricing::price"), None);
    assert_eq!(
        src.locate("<alloc::vec::Vec<u8> as core::ops::Drop>::drop"),
        None
    );
}

impl Location {
    fn line_plus(mut self, n: usize) -> Location {
        self.line += n;
        self
    }
}

#[test]
fn is_patchable_follows_fn_impl_and_skip() {
    let tree = Tree::new(&[("src/lib.rs", LOCATE)]);
    let src = tree.parse();
    assert!(src.is_patchable("svc::pricing::price"));
    assert!(src.is_patchable("svc::pricing::__hotpatch_original_price"));
    assert!(!src.is_patchable("svc::price"));
    assert!(src.is_patchable("svc::Cart::total"));
    assert!(src.is_patchable("svc::Cart::__hotpatch_original_total"));
    assert!(!src.is_patchable("svc::Cart::skipped"));
    assert!(src.is_patchable("<svc::Cart as svc::Describe>::describe"));
    assert!(src.is_patchable("svc::Cart::__hotpatch_original_Describe_describe"));
    assert!(!src.is_patchable("<u32 as svc::Describe>::describe"));
    assert!(!src.is_patchable("svc::Cart::moved"));
    assert!(!src.is_patchable("svc::nothing"));
}

#[test]
fn crate_name_comes_from_the_manifest_and_can_be_set() {
    let tree = Tree::new(&[("src/lib.rs", "pub fn f() {}")]);
    tree.write(
        "Cargo.toml",
        "[package]\nname = \"my-service\"\n\n[lib]\nname = \"my_svc_lib\"\n",
    );
    let src = tree.parse();
    assert_eq!(src.crate_name(), "my_svc_lib");
    assert_eq!(src.locate("my_svc_lib::f"), loc("src/lib.rs", 1));
    let src = src.with_crate_name("renamed-crate");
    assert_eq!(src.locate("renamed_crate::f"), loc("src/lib.rs", 1));
    assert_eq!(src.locate("my_svc_lib::f"), None);
}

#[test]
fn is_copied_into_users_is_public_and_inline_or_generic_over_types() {
    let tree = Tree::new(&[(
        "src/lib.rs",
        "\
/// Half.
///
/// Rounded down.
#[inline]
#[must_use]
#[allow(clippy::all)]
#[doc(alias = \"halve\")]
pub fn half(x: u64) -> u64 { x / 2 }
#[inline(always)]
pub fn quarter(x: u64) -> u64 { x / 4 }
pub fn sum<T: Into<u64>>(x: T) -> u64 { x.into() }
pub fn len(x: impl AsRef<str>) -> usize { x.as_ref().len() }
pub fn first<'a>(x: &'a [u8]) -> &'a [u8] { x }
pub fn plain() {}
#[inline(never)]
pub fn outlined(x: u64) -> u64 { x }
#[inline]
pub(crate) fn near() {}
#[inline]
fn private() {}
pub struct Wrap<T>(T);
impl<T> Wrap<T> {
    pub fn get(&self) -> &T { &self.0 }
    fn hidden(&self) {}
}
pub struct Cart;
impl Cart {
    #[inline]
    pub fn total(&self) -> u64 { 0 }
    pub fn count(&self) -> u64 { 0 }
}
pub trait Tag {
    #[inline]
    fn tag(&self) -> u8 { 7 }
    fn other(&self) -> u8 { 8 }
}
",
    )]);
    let src = tree.parse();
    for copied in [
        "svc::half",
        "svc::quarter",
        "svc::sum",
        "svc::len",
        "svc::Wrap<T>::get",
        "svc::Cart::total",
        "svc::Tag::tag",
    ] {
        assert!(src.is_copied_into_users(copied), "{copied}");
    }
    for not in [
        "svc::first",
        "svc::plain",
        "svc::outlined",
        "svc::near",
        "svc::private",
        "svc::Wrap<T>::hidden",
        "svc::Cart::count",
        "svc::Tag::other",
        "svc::nothing",
    ] {
        assert!(!src.is_copied_into_users(not), "{not}");
    }
}

#[test]
fn why_changed_names_what_an_unchanged_function_inlines_or_expands() {
    let base = "const LIMIT: u64 = 1;\n\
                macro_rules! twice { ($e:expr) => { $e * 2 }; }\n\
                fn words(s: &str) -> usize { s.len() }\n\
                fn middle(s: &str) -> usize { words(s) }\n\
                pub fn title(s: &str) -> usize { middle(s) }\n\
                pub fn capped(x: u64) -> u64 { x.min(LIMIT) }\n\
                pub fn doubled(x: u64) -> u64 { twice!(x) }\n\
                pub fn edited(x: u64) -> u64 { x }\n\
                pub fn alone(x: u64) -> u64 { x }\n";
    let head = base
        .replace("s.len()", "s.len() + 1")
        .replace("LIMIT: u64 = 1", "LIMIT: u64 = 2")
        .replace("$e * 2", "$e * 2 + 1")
        .replace(
            "edited(x: u64) -> u64 { x }",
            "edited(x: u64) -> u64 { x + 1 }",
        );
    let b = Tree::new(&[("src/lib.rs", base)]).parse();
    let h = Tree::new(&[("src/lib.rs", &head)]).parse();
    let why = |path: &str| h.why_changed(&b, path);
    // Through `middle`, whose source is the same too.
    assert_eq!(
        why("svc::title").as_deref(),
        Some("inlined svc::words changed")
    );
    assert_eq!(
        why("svc::capped").as_deref(),
        Some("const svc::LIMIT changed")
    );
    assert_eq!(why("svc::doubled").as_deref(), Some("macro twice! changed"));
    // Its own source changed: nothing to explain.
    assert_eq!(why("svc::edited"), None);
    assert_eq!(why("svc::words"), None);
    // Nothing it names changed: said so.
    assert_eq!(
        why("svc::alone").as_deref(),
        Some("its source is the same: code it inlines or expands changed")
    );
    assert_eq!(why("svc::missing"), None);
}

/// The lines of the functions whose source differs, per side; `None`
/// for a change outside function bodies and signatures.
type Spans = Vec<(u64, u64)>;

fn changed_lines(base: &str, head: &str) -> Option<(Spans, Spans)> {
    let b = Tree::new(&[("src/lib.rs", base)]).parse();
    let h = Tree::new(&[("src/lib.rs", head)]).parse();
    let (mut x, mut y) = h.changed_fn_lines(&b)?;
    let file = Path::new("src/lib.rs");
    let take = |m: &mut LineRanges| {
        let mut v = m.remove(file).unwrap_or_default();
        assert!(m.is_empty(), "ranges of another file: {m:?}");
        v.sort();
        v
    };
    Some((take(&mut x), take(&mut y)))
}

#[test]
fn changed_fn_lines_are_the_changed_functions_from_attribute_to_closing_brace() {
    let base = "use std::fmt;\n\
                \n\
                pub fn same(x: u64) -> u64 {\n\
                    x + 1\n\
                }\n\
                \n\
                #[inline]\n\
                pub fn edited(x: u64) -> u64 {\n\
                    let y = x * 2;\n\
                    y\n\
                }\n\
                \n\
                pub struct S;\n\
                impl S {\n\
                    pub fn method(&self) -> u64 { 1 }\n\
                }\n";
    // A line added above `edited` moves it down one line in the head.
    let head = base
        .replace("use std::fmt;\n", "use std::fmt;\n// a comment\n")
        .replace("x * 2", "x * 3")
        .replace("{ 1 }", "{ 2 }");
    let (b, h) = changed_lines(base, &head).expect("only bodies changed");
    assert_eq!(b, vec![(7, 11), (15, 15)]);
    assert_eq!(h, vec![(8, 12), (16, 16)]);
}

#[test]
fn changed_fn_lines_of_a_comment_only_change_are_none_changed() {
    let base = "/// Adds one.\npub fn f(x: u64) -> u64 {\n    x + 1\n}\n";
    let head = "/// Adds one to x.\npub fn f(x: u64) -> u64 {\n    // one\n    x + 1\n}\n";
    let (b, h) = changed_lines(base, head).expect("nothing outside bodies changed");
    assert!(b.is_empty() && h.is_empty(), "{b:?} {h:?}");
}

#[test]
fn changed_fn_lines_of_an_added_or_removed_function_name_its_side_only() {
    let base = "pub fn f() -> u64 { 1 }\n";
    let head = "pub fn f() -> u64 { 1 }\nfn g() -> u64 { 2 }\n";
    let (b, h) = changed_lines(base, head).expect("only functions");
    assert!(b.is_empty());
    assert_eq!(h, vec![(2, 2)]);
    let (b, h) = changed_lines(head, base).expect("only functions");
    assert_eq!(b, vec![(2, 2)]);
    assert!(h.is_empty());
}

#[test]
fn a_change_outside_function_bodies_gives_no_changed_fn_lines() {
    let base = "use std::cmp::max;\nconst LIMIT: u64 = 1;\nmacro_rules! m { () => { 1 } }\n\
                pub fn f(x: u64) -> u64 { max(x, LIMIT) + m!() }\n";
    for head in [
        base.replace("LIMIT: u64 = 1", "LIMIT: u64 = 2"),
        base.replace("use std::cmp::max", "use std::cmp::min as max"),
        base.replace("{ 1 } }", "{ 2 } }"),
        base.replace("pub fn f(x: u64)", "#[inline(never)]\npub fn f(x: u64)"),
        base.replace("pub fn f(x: u64) -> u64", "pub fn f(x: u32) -> u64"),
        format!("{base}pub struct New;\n"),
    ] {
        assert!(
            changed_lines(base, &head).is_none(),
            "a change outside bodies:\n{head}"
        );
    }
}

#[test]
fn locate_tells_impls_of_one_trait_with_other_arguments_apart() {
    let src = "pub enum E { A(String) }\n\
               impl From<String> for E {\n\
                   fn from(s: String) -> E { E::A(s) }\n\
               }\n\
               #[hotpatch::patchable]\n\
               impl From<&str> for E {\n\
                   fn from(s: &str) -> E { s.to_string().into() }\n\
               }\n";
    let c = Tree::new(&[("src/lib.rs", src)]).parse();
    let line = |p: &str| c.locate(p).map(|l| l.line);
    assert_eq!(line("<svc::E as core::convert::From<&str>>::from"), Some(7));
    assert_eq!(line("<svc::E as From<&str>>::from"), Some(7));
    assert_eq!(
        line("<svc::E as core::convert::From<alloc::string::String>>::from"),
        Some(3)
    );
    // Without arguments the two are one name: no location rather than a
    // wrong one.
    assert_eq!(line("<svc::E as core::convert::From>::from"), None);
}

/// Whether `main`'s own code differs between two one-file crates, and
/// the line `main_own_changed` names.
fn main_own(base: &str, head: &str) -> Option<usize> {
    let b = Tree::new(&[("src/lib.rs", base)]);
    let h = Tree::new(&[("src/lib.rs", head)]);
    let (b, h) = (b.parse(), h.parse());
    h.main_own_changed(&b).map(|at| at.line)
}

#[test]
fn main_own_code_is_its_body_without_the_closures_async_blocks_and_items_in_it() {
    let sync_main = |banner: &str, per_conn: &str, helper: &str| {
        format!(
            "fn handle(n: u64) -> u64 {{ n + 1 }}\n\
             fn main() {{\n\
                 println!(\"{banner}\");\n\
                 let t = std::thread::spawn(move || {{ println!(\"{per_conn}\"); handle(1) }});\n\
                 fn helper() -> u64 {{ {helper} }}\n\
                 let _ = t.join();\n\
                 helper();\n\
             }}\n"
        )
    };
    let base = sync_main("v1", "conn", "1");
    // The banner is main's own: it ran at start and never runs again.
    assert_eq!(main_own(&base, &sync_main("v2", "conn", "1")), Some(2));
    // A thread's body or a function defined in main is code of its own.
    assert_eq!(main_own(&base, &sync_main("v1", "conn 2", "1")), None);
    assert_eq!(main_own(&base, &sync_main("v1", "conn", "2")), None);
    // A comment or a layout change of main is no change of its code.
    let spaced = base.replace("let _ = t.join();", "// joined\n    let _   =   t.join();");
    assert_eq!(main_own(&base, &spaced), None);
    // A change outside main says nothing of main.
    assert_eq!(main_own(&base, &base.replace("n + 1", "n + 2")), None);

    // `#[tokio::main] async fn main`: its body is polled inside the
    // runtime's block_on, which main entered once; a task it spawns is
    // code of its own.
    let async_main = |log: &str, task: &str| {
        format!(
            "#[tokio::main]\n\
             async fn main() {{\n\
                 tracing::info!(\"{log}\");\n\
                 let listener = bind().await;\n\
                 loop {{\n\
                     let s = listener.accept().await;\n\
                     tokio::spawn(async move {{ serve(s, \"{task}\").await }});\n\
                 }}\n\
             }}\n"
        )
    };
    let base = async_main("starting", "t");
    assert_eq!(main_own(&base, &async_main("starting up", "t")), Some(2));
    assert_eq!(main_own(&base, &async_main("starting", "u")), None);
    // A loop in main's own body keeps running the old code: main's own.
    let looped = base.replace(
        "let s = listener.accept().await;",
        "let s = listener.accept().await?;",
    );
    assert_eq!(main_own(&base, &looped), Some(2));
    // A `main` in a module is no executable's main.
    let nested = |v: &str| format!("mod m {{ fn main() {{ println!(\"{v}\"); }} }}\n");
    assert_eq!(main_own(&nested("a"), &nested("b")), None);
}
