//! The patch of the hotpatch tokio example: the marketplace fee is 2.5 %,
//! rounded up. `fee_cents` and `payout_cents` change together, so the two
//! still add up to the amount; a request that ran one old and one new
//! would not.
//!
//! An ordinary library crate: `tokio-service` builds it into a thin patch
//! for its own binary (`cargo hotpatch build`) and applies it to the
//! running service with `hotpatch::load`.

hotpatch::manifest!();

#[hotpatch::patch(tokio_service::settle::fee_cents)]
fn fee_cents(amount_cents: u64) -> u64 {
    (amount_cents * 25).div_ceil(1_000)
}

#[hotpatch::patch(tokio_service::settle::payout_cents)]
fn payout_cents(amount_cents: u64) -> u64 {
    amount_cents - (amount_cents * 25).div_ceil(1_000)
}
