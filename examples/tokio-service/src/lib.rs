//! The service of the hotpatch tokio example: a marketplace that settles
//! orders, splitting each amount into the platform's fee and the seller's
//! payout.
//!
//! The two parts must add up to the amount, whichever version computes
//! them. Version 1 charges 3 %, rounded down; the contract says 2.5 %,
//! rounded up, and `examples/tokio-fix` changes both functions to that.
//! A settlement that took its fee from one version and its payout from the
//! other would create or lose money: that is what a request must never
//! mix, and what the example checks on every request.
//!
//! The handlers are plain functions: `#[patchable]` does not take
//! `async fn`. The async request handler ([`serve`]) calls them.

pub mod serve;

pub mod settle {
    /// The platform's fee on an order of `amount_cents`.
    #[hotpatch::patchable]
    pub fn fee_cents(amount_cents: u64) -> u64 {
        amount_cents * 3 / 100
    }

    /// What the seller receives for an order of `amount_cents`.
    #[hotpatch::patchable]
    pub fn payout_cents(amount_cents: u64) -> u64 {
        // The rate is repeated here, so a fix has to change both functions.
        amount_cents - amount_cents * 3 / 100
    }

    /// The fee of each version, to tell which one ran.
    pub fn fee_v1(amount_cents: u64) -> u64 {
        amount_cents * 3 / 100
    }

    /// The fee of the fixed version (`tokio-fix`).
    pub fn fee_v2(amount_cents: u64) -> u64 {
        (amount_cents * 25).div_ceil(1_000)
    }

    /// Which version computed `fee` for `amount_cents`: 1, 2, or 0 for
    /// neither. Amounts from 100.00 up tell the two apart.
    pub fn fee_version(amount_cents: u64, fee: u64) -> u8 {
        if fee == fee_v1(amount_cents) {
            1
        } else if fee == fee_v2(amount_cents) {
            2
        } else {
            0
        }
    }

    /// Which version computed `payout` for `amount_cents`: 1, 2 or 0.
    pub fn payout_version(amount_cents: u64, payout: u64) -> u8 {
        if payout == amount_cents - fee_v1(amount_cents) {
            1
        } else if payout == amount_cents - fee_v2(amount_cents) {
            2
        } else {
            0
        }
    }
}
