//! Backoff between attempts of a failing handler.

use std::time::Duration;

/// Exponential backoff with jitter, driven by the message's receive count so that the retry
/// budget survives restarts: attempt `n` waits a random time between half and all of
/// `base * 2^(n-1)`, capped at `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Delay before the second attempt (before jitter).
    pub base: Duration,
    /// Longest delay.
    pub max: Duration,
}

impl Default for RetryPolicy {
    /// 1 s, doubling, capped at 5 minutes.
    fn default() -> Self {
        RetryPolicy {
            base: Duration::from_secs(1),
            max: Duration::from_secs(300),
        }
    }
}

impl RetryPolicy {
    /// The default backoff after infrastructure faults: 500 ms, doubling, capped at 30 s.
    pub fn infrastructure() -> Self {
        RetryPolicy {
            base: Duration::from_millis(500),
            max: Duration::from_secs(30),
        }
    }

    /// A policy with the given base and cap.
    pub fn exponential(base: Duration, max: Duration) -> Self {
        RetryPolicy { base, max }
    }

    /// The delay after failed attempt number `attempt` (1 for the first).
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(30);
        let full = self
            .base
            .checked_mul(1u32 << exp)
            .unwrap_or(self.max)
            .min(self.max);
        let half = full / 2;
        half + full.mul_f64(0.5 * fastrand::f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_caps() {
        let p = RetryPolicy::exponential(Duration::from_millis(100), Duration::from_secs(1));
        for _ in 0..100 {
            let d1 = p.delay(1);
            assert!(d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100));
            let d3 = p.delay(3);
            assert!(d3 >= Duration::from_millis(200) && d3 <= Duration::from_millis(400));
            assert!(p.delay(40) <= Duration::from_secs(1));
        }
    }
}
