//! Token-bucket throttles in bytes per second, per relationship and per node.
//!
//! Invariant: over any window, the bytes admitted by a bucket are at most
//! `rate * window + burst`; a caller that takes more than the bucket holds
//! sleeps until it is paid for (debt is allowed, so one large extent never
//! blocks forever).

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One token bucket.
#[derive(Debug)]
pub struct Bucket {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    rate_bps: Option<u64>,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A bucket with `rate_bps` (None = unlimited).
    pub fn new(rate_bps: Option<u64>) -> Self {
        Bucket {
            state: Mutex::new(State {
                rate_bps,
                tokens: 0.0,
                last: Instant::now(),
            }),
        }
    }

    /// Change the rate.
    pub fn set_rate(&self, rate_bps: Option<u64>) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.rate_bps = rate_bps;
    }

    /// How long the caller must wait to send `bytes` now (and account them).
    pub fn take(&self, bytes: u64) -> Duration {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let Some(rate) = s.rate_bps.filter(|r| *r > 0) else {
            return Duration::ZERO;
        };
        let now = Instant::now();
        let burst = (rate as f64 / 4.0).max(64.0 * 1024.0);
        let elapsed = now.duration_since(s.last).as_secs_f64();
        s.last = now;
        s.tokens = (s.tokens + elapsed * rate as f64).min(burst);
        s.tokens -= bytes as f64;
        if s.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-s.tokens / rate as f64)
        }
    }
}

/// Take `bytes` from every bucket and sleep as long as the slowest requires.
pub fn pace(buckets: &[&Bucket], bytes: u64) {
    let wait = buckets
        .iter()
        .map(|b| b.take(bytes))
        .max()
        .unwrap_or(Duration::ZERO);
    if !wait.is_zero() {
        std::thread::sleep(wait);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_never_waits_and_limited_accrues_debt() {
        let b = Bucket::new(None);
        assert!(b.take(u64::MAX / 2).is_zero());
        let b = Bucket::new(Some(1 << 20));
        // A 4 MiB take on a 1 MiB/s bucket owes about 4 s (rate-based, not timed).
        let w = b.take(4 << 20);
        assert!(
            w > Duration::from_secs(3) && w <= Duration::from_secs(5),
            "{w:?}"
        );
        b.set_rate(None);
        assert!(b.take(1).is_zero());
    }
}
