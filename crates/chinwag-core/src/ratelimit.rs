//! Token buckets fed by the caller's clock, so they behave the same in a test, a
//! simulation and a server: one per connection, and [`UserBuckets`] shared by all of a
//! user's connections on a node.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::ids::UserId;

/// Allows `rate_per_sec` events per second on average and bursts of up to `burst`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// Tokens are counted in thousandths so that refill needs no floating point.
    milli_tokens: u64,
    capacity_milli: u64,
    rate_per_sec: u64,
    last_ms: u64,
}

impl TokenBucket {
    /// A full bucket. `rate_per_sec` and `burst` must be at least 1 (the config validates
    /// this).
    pub fn new(rate_per_sec: u32, burst: u32, now_ms: u64) -> Self {
        assert!(rate_per_sec >= 1 && burst >= 1, "rate and burst must be positive");
        Self {
            milli_tokens: u64::from(burst) * 1000,
            capacity_milli: u64::from(burst) * 1000,
            rate_per_sec: u64::from(rate_per_sec),
            last_ms: now_ms,
        }
    }

    /// Takes one token, or says how many milliseconds until one is available.
    pub fn take(&mut self, now_ms: u64) -> Result<(), u64> {
        // A clock that steps backwards refills nothing rather than underflowing.
        let elapsed_ms = now_ms.saturating_sub(self.last_ms);
        self.last_ms = self.last_ms.max(now_ms);
        // rate/s * ms = rate * ms thousandths of a token.
        let refill = elapsed_ms.saturating_mul(self.rate_per_sec);
        self.milli_tokens = (self.milli_tokens.saturating_add(refill)).min(self.capacity_milli);
        if self.milli_tokens >= 1000 {
            self.milli_tokens -= 1000;
            Ok(())
        } else {
            let missing = 1000 - self.milli_tokens;
            Err(missing.div_ceil(self.rate_per_sec))
        }
    }

    /// Whether the bucket has refilled completely by `now_ms`.
    pub fn is_full(&self, now_ms: u64) -> bool {
        let refill = now_ms.saturating_sub(self.last_ms).saturating_mul(self.rate_per_sec);
        self.milli_tokens.saturating_add(refill) >= self.capacity_milli
    }
}

/// One token bucket per user, shared by that user's connections: opening more
/// connections does not buy a user more sending.
pub struct UserBuckets {
    rate_per_sec: u32,
    burst: u32,
    /// Users tracked before idle buckets are forgotten.
    max_users: usize,
    buckets: Mutex<HashMap<UserId, TokenBucket>>,
}

impl UserBuckets {
    pub fn new(rate_per_sec: u32, burst: u32, max_users: usize) -> Self {
        Self {
            rate_per_sec,
            burst,
            max_users: max_users.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token from `user`'s bucket, or says how many milliseconds until one is
    /// available.
    pub fn take(&self, user: &UserId, now_ms: u64) -> Result<(), u64> {
        let mut buckets = self.buckets.lock().expect("user buckets lock");
        if buckets.len() >= self.max_users && !buckets.contains_key(user) {
            // A full bucket is the same as no bucket, so forgetting those loses nothing.
            buckets.retain(|_, b| !b.is_full(now_ms));
        }
        buckets
            .entry(user.clone())
            .or_insert_with(|| TokenBucket::new(self.rate_per_sec, self.burst, now_ms))
            .take(now_ms)
    }

    /// Users with a bucket that is not full.
    pub fn tracked(&self) -> usize {
        self.buckets.lock().expect("user buckets lock").len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn burst_then_rate() {
        let mut b = TokenBucket::new(10, 3, 0);
        assert!(b.take(0).is_ok());
        assert!(b.take(0).is_ok());
        assert!(b.take(0).is_ok());
        assert_eq!(b.take(0), Err(100));
        assert_eq!(b.take(50), Err(50));
        assert!(b.take(100).is_ok());
        assert!(b.take(100).is_err());
    }

    #[test]
    fn a_users_connections_share_one_bucket() {
        let users = UserBuckets::new(10, 2, 100);
        let bob = UserId::parse("bob").unwrap();
        let alice = UserId::parse("alice").unwrap();
        assert!(users.take(&bob, 0).is_ok());
        assert!(users.take(&bob, 0).is_ok());
        assert_eq!(users.take(&bob, 0), Err(100));
        assert!(
            users.take(&alice, 0).is_ok(),
            "one user's sending does not limit another"
        );
    }

    #[test]
    fn idle_users_are_forgotten_at_the_cap_busy_ones_are_not() {
        let users = UserBuckets::new(10, 2, 2);
        let (a, b, c) = (
            UserId::parse("a").unwrap(),
            UserId::parse("b").unwrap(),
            UserId::parse("c").unwrap(),
        );
        users.take(&a, 0).unwrap();
        users.take(&a, 0).unwrap();
        users.take(&b, 0).unwrap();
        // At 150 ms, b has refilled (a full bucket), a has not: adding c forgets only b.
        users.take(&c, 150).unwrap();
        assert_eq!(users.tracked(), 2);
        assert_eq!(users.take(&a, 150), Ok(()));
        assert_eq!(users.take(&a, 150), Err(50), "a's bucket was kept, not reset to full");
    }

    #[test]
    fn clock_going_backwards_is_harmless() {
        let mut b = TokenBucket::new(1, 1, 1_000);
        assert!(b.take(1_000).is_ok());
        assert!(b.take(10).is_err());
        assert!(b.take(2_000).is_ok());
    }

    proptest! {
        /// Over any window, no more than burst + rate * seconds events pass.
        #[test]
        fn never_exceeds_rate(rate in 1u32..1000, burst in 1u32..100, steps in proptest::collection::vec(0u64..50, 1..500)) {
            let mut now = 0;
            let mut b = TokenBucket::new(rate, burst, now);
            let mut passed = 0u64;
            for step in steps {
                now += step;
                if b.take(now).is_ok() { passed += 1; }
            }
            let bound = u64::from(burst) + u64::from(rate) * now / 1000 + 1;
            prop_assert!(passed <= bound, "{passed} > {bound}");
        }
    }
}
