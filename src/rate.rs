//! Token bucket: `rate` events per second with bursts of `burst`.
//!
//! The ingress uses one per device connection: over the rate, the session waits before
//! reading on (backpressure), so a chatty device slows down instead of crowding out the
//! others or losing data. The uplink uses one to pace a backlog drain.

use std::time::Duration;

use tokio::time::Instant;

/// A token bucket; `rate == 0` means unlimited.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Option<Instant>,
}

impl TokenBucket {
    /// A full bucket; `rate == 0` means unlimited.
    pub fn new(rate: u32, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate: f64::from(rate),
            burst,
            tokens: burst,
            last: None,
        }
    }

    fn refill(&mut self, now: Instant) {
        if let Some(last) = self.last {
            let refill = now.saturating_duration_since(last).as_secs_f64() * self.rate;
            self.tokens = (self.tokens + refill).min(self.burst);
        }
        self.last = Some(now);
    }

    /// Takes one token, going into debt if there is none; returns how long to wait
    /// before the event may proceed.
    pub fn take(&mut self, now: Instant) -> Duration {
        if self.rate <= 0.0 {
            return Duration::ZERO;
        }
        self.refill(now);
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }

    /// Takes one token if there is one; otherwise takes nothing and says how long until
    /// there will be.
    ///
    /// # Errors
    /// The wait until a token is available.
    pub fn try_take(&mut self, now: Instant) -> Result<(), Duration> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_paced() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(10, 3);
        for _ in 0..3 {
            assert_eq!(bucket.take(start), Duration::ZERO);
        }
        let wait = bucket.take(start);
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "{wait:?}");
        // After the wait has passed, the next one waits another 100 ms.
        let wait = bucket.take(start + Duration::from_millis(100));
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "{wait:?}");
        assert_eq!(TokenBucket::new(0, 1).take(start), Duration::ZERO);
    }

    #[test]
    fn try_take_never_goes_into_debt() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(10, 1);
        assert_eq!(bucket.try_take(start), Ok(()));
        let wait = bucket.try_take(start).expect_err("empty");
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "{wait:?}");
        assert_eq!(bucket.try_take(start + Duration::from_millis(100)), Ok(()));
    }
}
