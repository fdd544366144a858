//! Rate-limited logging: a repeated problem is logged once per interval per reason,
//! with the count of occurrences that were not logged, so a flood of bad input cannot
//! flood the journal.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Remembers, per reason, when it was last logged.
#[derive(Debug)]
pub struct LogLimiter {
    interval: Duration,
    state: Mutex<HashMap<&'static str, (Instant, u64)>>,
}

impl LogLimiter {
    /// Logs each reason at most once per `interval`.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            state: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(suppressed)` if this occurrence should be logged, where `suppressed` is the
    /// number of occurrences skipped since the last logged one; `None` to stay quiet.
    pub fn check(&self, reason: &'static str) -> Option<u64> {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match state.get_mut(reason) {
            Some((last, suppressed)) if now.duration_since(*last) < self.interval => {
                *suppressed += 1;
                None
            }
            Some((last, suppressed)) => {
                let skipped = *suppressed;
                *last = now;
                *suppressed = 0;
                Some(skipped)
            }
            None => {
                state.insert(reason, (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_once_per_interval_and_counts_the_rest() {
        let limiter = LogLimiter::new(Duration::from_millis(50));
        assert_eq!(limiter.check("a"), Some(0));
        assert_eq!(limiter.check("a"), None);
        assert_eq!(limiter.check("a"), None);
        assert_eq!(limiter.check("b"), Some(0));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(limiter.check("a"), Some(2));
    }
}
