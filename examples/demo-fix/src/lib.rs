//! The patch of the hotpatch demo: fixes the bulk discount of
//! `demo_service::pricing::apply_discount` (basis points are 1/10,000).
//!
//! Built by the demo itself, as a thin patch bound to the running
//! `demo-service` binary (`cargo hotpatch build -p demo-fix --binary ...`,
//! which links this crate's own code from its rlib), into a private
//! temporary directory, and applied with `hotpatch::load`; name, version
//! and description come from this crate's Cargo.toml.

hotpatch::manifest!();

#[hotpatch::patch(demo_service::pricing::apply_discount)]
fn apply_discount(subtotal_cents: u64, bps: u64) -> u64 {
    subtotal_cents - subtotal_cents * bps / 10_000
}
