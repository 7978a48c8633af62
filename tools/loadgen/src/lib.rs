//! What the load generator's traffic is made of, shared with the tools that must agree with it
//! (`sluice-profilegen` fills a store with histories of the same events, so that the load's
//! messages meet the rules the stored profiles were evaluated for; `benches/segments.rs` applies
//! the same mix in memory).

/// The tracks of the web mix (`--events web`), besides its page views.
pub const EVENTS: [&str; 8] = [
    "Product Viewed",
    "Product Added",
    "Cart Viewed",
    "Checkout Started",
    "Order Completed",
    "Signed Up",
    "Search Performed",
    "Video Played",
];

/// A small, fast generator (splitmix64) so that varied events cost the generators little.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Which of `user-0` … `user-{space - 1}` the load's `rank`-th user is: ranks are spread
/// over the stored users (so the active ones are scattered among them, not the first of them) by
/// multiplying by a prime that divides no `space` made of 2s and 5s (10^n, 50,000), a bijection
/// modulo `space`, so distinct ranks are distinct users. `rank < space`, so the product fits in
/// 64 bits.
pub fn scatter(rank: u64, space: u64) -> u64 {
    const SCATTER: u64 = 1_000_003;
    rank.wrapping_mul(SCATTER % space) % space
}
