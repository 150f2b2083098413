//! The service of the hotpatch demo: it quotes the price of orders.
//!
//! Every step of a quote goes through a `#[hotpatch::patchable]`
//! function, so each can be replaced while the service runs. One of them
//! has a bug: [`pricing::apply_discount`] reads a discount given in basis
//! points (1/10,000) as if it were in 1/1,000, so the 5 % bulk discount
//! takes 50 % off and the 10 % one takes everything: orders of 100 units
//! or more are free. `examples/demo-fix` is the patch that fixes it.

pub mod pricing {
    /// One line of an order: a quantity of one article.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Line {
        pub qty: u32,
        pub unit_cents: u64,
    }

    /// A customer's order: what a request asks to price.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct Order {
        pub id: u64,
        pub lines: Vec<Line>,
    }

    #[hotpatch::patchable]
    impl Line {
        /// Quantity times unit price, in cents.
        pub fn subtotal(&self) -> u64 {
            u64::from(self.qty) * self.unit_cents
        }
    }

    /// The bulk discount for a line of `qty` units, in basis points
    /// (hundredths of a percent): 5 % from 10 units, 10 % from 100.
    #[hotpatch::patchable]
    pub fn discount_bps(qty: u32) -> u64 {
        match qty {
            0..=9 => 0,
            10..=99 => 500,
            _ => 1_000,
        }
    }

    /// `subtotal_cents` less a discount of `bps` basis points.
    #[hotpatch::patchable]
    pub fn apply_discount(subtotal_cents: u64, bps: u64) -> u64 {
        // The bug: a basis point is 1/10,000, not 1/1,000.
        subtotal_cents - subtotal_cents * bps / 1_000
    }

    /// Shipping: 4.90 below 50.00 of goods, free from there.
    #[hotpatch::patchable]
    pub fn shipping(goods_cents: u64) -> u64 {
        if goods_cents >= 5_000 { 0 } else { 490 }
    }

    /// The request handler: the price of `order`, in cents.
    #[hotpatch::patchable]
    pub fn quote(order: &Order) -> u64 {
        let goods: u64 = order
            .lines
            .iter()
            .map(|line| apply_discount(line.subtotal(), discount_bps(line.qty)))
            .sum();
        goods + shipping(goods)
    }
}
