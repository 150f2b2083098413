// A patch crate replacing one function of each supported form of the
// `svc` fixture. (trybuild builds it as a bin; a real patch crate is a
// cdylib, which type-checks the same.)

hotpatch::manifest!();

use svc::Priced;

#[hotpatch::patch(svc::answer)]
fn answer() -> u64 {
    2
}

#[hotpatch::patch(svc::add)]
pub fn add(a: u64, b: u64) -> u64 {
    a.saturating_add(b)
}

// Parameter names and patterns need not match the target's.
#[hotpatch::patch(svc::checked_div)]
fn checked_div(numerator: u64, mut d: u64) -> u64 {
    if d == 0 {
        d = 1;
    }
    numerator / d
}

// Elided lifetimes.
#[hotpatch::patch(svc::first_word)]
fn first_word(s: &str) -> &str {
    s.split_whitespace().next().unwrap_or("")
}

// Named lifetimes, under other names.
#[hotpatch::patch(svc::longest)]
fn longest<'x>(a: &'x str, b: &'x str) -> &'x str {
    if a.len() > b.len() { a } else { b }
}

/// # Safety
/// As the target's.
#[hotpatch::patch(svc::read)]
unsafe fn read(p: *const u64) -> u64 {
    // SAFETY: the caller guarantees `p` is valid, as for the target.
    unsafe { *p + 1 }
}

#[hotpatch::patch(svc::c_abi)]
extern "C" fn c_abi(x: u32) -> u32 {
    x + 2
}

// A type alias of the service names the same type.
#[hotpatch::patch(svc::quantity)]
fn quantity(q: svc::Qty) -> u64 {
    u64::from(q) + 1
}

// Calls other patchable functions of the service.
#[hotpatch::patch(svc::count_call)]
fn count_call() -> u64 {
    svc::base() + svc::answer()
}

// Methods: the receiver becomes the first parameter.
#[hotpatch::patch(svc::Cart::new)]
fn new(items: Vec<u64>) -> svc::Cart {
    svc::Cart { items, discount: 1 }
}

#[hotpatch::patch(svc::Cart::total)]
fn total(cart: &svc::Cart) -> u64 {
    cart.items.iter().sum::<u64>().saturating_sub(cart.discount)
}

#[hotpatch::patch(svc::Cart::push)]
fn push(cart: &mut svc::Cart, item: u64) {
    cart.items.push(item);
    cart.items.sort_unstable();
}

#[hotpatch::patch(svc::Cart::into_items)]
fn into_items(cart: svc::Cart) -> Vec<u64> {
    cart.items.into_iter().rev().collect()
}

#[hotpatch::patch(svc::Cart::boxed)]
fn boxed(cart: Box<svc::Cart>) -> usize {
    cart.items.len() + 1
}

// The output borrows from the receiver: elided on the target.
#[hotpatch::patch(svc::Cart::first)]
fn first(cart: &svc::Cart) -> &u64 {
    cart.items.last().unwrap_or(&0)
}

#[hotpatch::patch(svc::Cart::get)]
fn get<'c>(cart: &'c svc::Cart, i: usize, _label: &str) -> Option<&'c u64> {
    cart.items.get(i)
}

// Trait methods, by qualified path; `Self::Unit` of the target is `u64`.
#[hotpatch::patch(<svc::Cart as svc::Priced>::price)]
fn price(cart: &svc::Cart) -> u64 {
    cart.total() * 3
}

#[hotpatch::patch(<svc::Cart as svc::Priced>::unit)]
fn unit(cart: &svc::Cart) -> <svc::Cart as Priced>::Unit {
    cart.items.len() as u64
}

fn main() {}
