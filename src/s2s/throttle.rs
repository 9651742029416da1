//! Per-stream rate limits after authentication, sans-IO: token buckets of
//! bytes and of stanzas, each refilled at its rate up to a burst.
//!
//! A stream that spends beyond its tokens is not refused anything: the reader
//! stops reading it until [`Throttle::spend`]'s instant (TCP backpressure, as
//! with a full inbox lane), then goes on. A stanza larger than the burst still
//! passes, and the debt it leaves is waited out.

use tokio::time::{Duration, Instant};

/// One bucket: `tokens` of at most `burst`, refilled at `rate` a second.
#[derive(Debug, Clone)]
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
}

impl Bucket {
    fn new(rate: u64, burst_secs: u64) -> Bucket {
        let burst = rate as f64 * burst_secs.max(1) as f64;
        Bucket {
            rate: rate as f64,
            burst,
            tokens: burst,
        }
    }

    fn refill(&mut self, elapsed: Duration) {
        self.tokens = (self.tokens + elapsed.as_secs_f64() * self.rate).min(self.burst);
    }

    /// Spend `n`; how long until the bucket is out of debt again.
    fn spend(&mut self, n: f64) -> Duration {
        self.tokens -= n;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// The limits of one stream.
#[derive(Debug, Clone)]
pub struct Throttle {
    bytes: Bucket,
    stanzas: Bucket,
    last: Instant,
}

impl Throttle {
    /// `bytes_per_sec` and `stanzas_per_sec`, each with a burst of `burst_secs`
    /// seconds' worth; full at `now`.
    pub fn new(bytes_per_sec: u64, stanzas_per_sec: u64, burst_secs: u64, now: Instant) -> Self {
        Throttle {
            bytes: Bucket::new(bytes_per_sec.max(1), burst_secs),
            stanzas: Bucket::new(stanzas_per_sec.max(1), burst_secs),
            last: now,
        }
    }

    /// One stanza of `bytes` was read at `now`: `None` while within the
    /// limits, else when reading may resume.
    pub fn spend(&mut self, bytes: usize, now: Instant) -> Option<Instant> {
        let elapsed = now.saturating_duration_since(self.last);
        self.last = now;
        self.bytes.refill(elapsed);
        self.stanzas.refill(elapsed);
        let wait = self.bytes.spend(bytes as f64).max(self.stanzas.spend(1.0));
        (!wait.is_zero()).then(|| now + wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_rate_holds() {
        let t0 = Instant::now();
        let mut t = Throttle::new(1_000_000, 10, 1, t0);
        // Ten stanzas at once (the burst), the eleventh waits a tenth of a second.
        for _ in 0..10 {
            assert_eq!(t.spend(100, t0), None);
        }
        let resume = t.spend(100, t0).unwrap();
        assert_eq!(resume - t0, Duration::from_millis(100));
        // Once that time has passed, one more may go, at the rate.
        assert!(t.spend(100, resume).is_some());
        let later = resume + Duration::from_secs(1);
        assert_eq!(t.spend(100, later), None);
    }

    #[test]
    fn bytes_are_limited_too_and_a_big_stanza_leaves_a_debt() {
        let t0 = Instant::now();
        let mut t = Throttle::new(1000, 1_000_000, 2, t0);
        assert_eq!(t.spend(1500, t0), None);
        // 2000 of burst: 500 left; 1500 more is 1000 of debt, a second.
        assert_eq!(t.spend(1500, t0).unwrap() - t0, Duration::from_secs(1));
    }
}
