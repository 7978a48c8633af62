//! Per-source rate limits: messages per second with a burst of one second's worth.
//!
//! One limiter per configured source, built from the config; a request with an unknown write key
//! never reaches a limiter, so the set cannot grow with traffic and needs no pruning.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::config::SourceConfig;

pub struct RateLimits {
    limiters: HashMap<String, DefaultDirectRateLimiter>,
    clock: DefaultClock,
}

/// Why messages were refused, and when to come back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverLimit {
    pub retry_after: Duration,
    /// The request alone is larger than the burst: it can never pass whole.
    pub larger_than_burst: bool,
}

impl RateLimits {
    pub fn new(sources: &[SourceConfig]) -> Self {
        let limiters = sources
            .iter()
            .filter_map(|s| {
                let rate = s.rate_limit?;
                let quota = Quota::per_second(rate).allow_burst(rate);
                Some((s.name.clone(), RateLimiter::direct(quota)))
            })
            .collect();
        RateLimits {
            limiters,
            clock: DefaultClock::default(),
        }
    }

    /// Takes `messages` from the source's allowance, or says when to retry.
    pub fn check(&self, source: &str, messages: usize) -> Result<(), OverLimit> {
        let Some(limiter) = self.limiters.get(source) else {
            return Ok(());
        };
        let Some(n) = u32::try_from(messages).ok().and_then(NonZeroU32::new) else {
            return Ok(());
        };
        match limiter.check_n(n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(OverLimit {
                retry_after: not_until.wait_time_from(self.clock.now()),
                larger_than_burst: false,
            }),
            Err(_) => Err(OverLimit {
                retry_after: Duration::from_secs(1),
                larger_than_burst: true,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(rate: Option<u32>) -> SourceConfig {
        SourceConfig {
            name: "web".into(),
            write_key: "k".into(),
            rate_limit: rate.and_then(NonZeroU32::new),
            unplanned: None,
            violations: None,
        }
    }

    #[test]
    fn allows_a_burst_of_one_second_then_refuses() {
        let limits = RateLimits::new(&[source(Some(100))]);
        assert!(limits.check("web", 60).is_ok());
        assert!(limits.check("web", 40).is_ok());
        let over = limits.check("web", 10).unwrap_err();
        assert!(over.retry_after > Duration::ZERO && over.retry_after <= Duration::from_secs(1));
        assert!(!over.larger_than_burst);
    }

    #[test]
    fn a_request_larger_than_the_burst_says_so() {
        let limits = RateLimits::new(&[source(Some(10))]);
        assert!(limits.check("web", 11).unwrap_err().larger_than_burst);
    }

    #[test]
    fn unlimited_sources_always_pass() {
        let limits = RateLimits::new(&[source(None)]);
        for _ in 0..100 {
            assert!(limits.check("web", 2500).is_ok());
        }
    }
}
