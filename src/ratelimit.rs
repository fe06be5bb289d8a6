//! A token bucket per rate-limited source.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Allows `rate` requests per second on average, bursts up to one second's worth.
pub struct TokenBucket {
    /// Tokens added per second (and the bucket's capacity).
    rate: f64,
    /// Tokens now and when they were counted.
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: f64) -> Self {
        TokenBucket {
            rate,
            state: Mutex::new((rate.max(1.0), Instant::now())),
        }
    }

    /// Takes a token, or says how long until one is there.
    pub fn take(&self) -> Result<(), Duration> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let capacity = self.rate.max(1.0);
        s.0 = (s.0 + now.duration_since(s.1).as_secs_f64() * self.rate).min(capacity);
        s.1 = now;
        if s.0 >= 1.0 {
            s.0 -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - s.0) / self.rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_past_capacity_is_refused_with_a_wait() {
        let b = TokenBucket::new(2.0);
        assert!(b.take().is_ok());
        assert!(b.take().is_ok());
        let wait = b.take().unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
    }
}
