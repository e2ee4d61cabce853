//! A token bucket fed by the caller's clock, so it behaves the same in a test, a
//! simulation and a server.

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
