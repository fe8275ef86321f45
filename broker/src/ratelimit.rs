//! Token buckets for handshakes (design §5.8: floods of handshakes get a counter and a
//! drop, never unbounded memory).

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Duration;

/// A token bucket: `burst` tokens, refilled at `per_sec` tokens per second.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    tokens: f64,
    last: Duration,
}

#[derive(Debug, Clone, Copy)]
pub struct Rate {
    pub burst: f64,
    pub per_sec: f64,
}

impl Bucket {
    pub fn full(rate: Rate, now: Duration) -> Self {
        Self {
            tokens: rate.burst,
            last: now,
        }
    }

    /// Takes one token if there is one. `now` is monotonic; going back counts as no time.
    pub fn take(&mut self, rate: Rate, now: Duration) -> bool {
        let dt = now.saturating_sub(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + dt * rate.per_sec).min(rate.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn is_full(&self, rate: Rate, now: Duration) -> bool {
        self.tokens + now.saturating_sub(self.last).as_secs_f64() * rate.per_sec >= rate.burst
    }
}

/// One bucket per key (a source IP address), at most `max_keys` of them. When the
/// table is full, buckets that have refilled completely are forgotten (they carry no
/// information); if none has, the new key is refused (fails closed).
#[derive(Debug)]
pub struct KeyedLimiter<K> {
    rate: Rate,
    max_keys: usize,
    buckets: HashMap<K, Bucket>,
}

impl<K: Hash + Eq + Clone> KeyedLimiter<K> {
    pub fn new(rate: Rate, max_keys: usize) -> Self {
        Self {
            rate,
            max_keys,
            buckets: HashMap::new(),
        }
    }

    pub fn allow(&mut self, key: &K, now: Duration) -> bool {
        if let Some(b) = self.buckets.get_mut(key) {
            return b.take(self.rate, now);
        }
        if self.buckets.len() >= self.max_keys {
            let rate = self.rate;
            self.buckets.retain(|_, b| !b.is_full(rate, now));
            if self.buckets.len() >= self.max_keys {
                return false;
            }
        }
        let mut b = Bucket::full(self.rate, now);
        let ok = b.take(self.rate, now);
        self.buckets.insert(key.clone(), b);
        ok
    }

    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const R: Rate = Rate {
        burst: 3.0,
        per_sec: 1.0,
    };

    #[test]
    fn bucket_allows_burst_then_refills() {
        let s = Duration::from_secs;
        let mut b = Bucket::full(R, s(0));
        assert!(b.take(R, s(0)) && b.take(R, s(0)) && b.take(R, s(0)));
        assert!(!b.take(R, s(0)));
        assert!(b.take(R, s(1)));
        assert!(!b.take(R, s(1)));
        // Time going backwards gives nothing.
        assert!(!b.take(R, Duration::ZERO));
        assert!(b.take(R, s(100)) && b.take(R, s(100)) && b.take(R, s(100)));
        assert!(!b.take(R, s(100)));
    }

    #[test]
    fn keyed_limiter_is_per_key_and_bounded() {
        let s = Duration::from_secs;
        let mut l = KeyedLimiter::new(R, 2);
        for _ in 0..3 {
            assert!(l.allow(&1, s(0)));
        }
        assert!(!l.allow(&1, s(0)));
        assert!(l.allow(&2, s(0)));
        // Table full, no bucket refilled: a third key fails closed.
        assert!(!l.allow(&3, s(0)));
        // Later, refilled buckets are forgotten and the key gets in.
        assert!(l.allow(&3, s(10)));
        assert!(l.len() <= 2);
    }
}
