//! Backoff, in one place, with the two policies the agent uses: the watch
//! and event streams (jittered, 0.8 s doubling to 30 s, like client-go) and
//! per-container start failures (10 s doubling to 5 min, like the kubelet).
//!
//! Owns: the arithmetic of delays. Must not sleep or retry anything itself:
//! the caller waits.

use std::time::Duration;

/// An exponential backoff.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    jitter: bool,
    next: Duration,
}

impl Backoff {
    /// A policy from `initial` doubling up to `max`.
    pub fn new(initial: Duration, max: Duration, jitter: bool) -> Self {
        Backoff {
            initial,
            max,
            jitter,
            next: initial,
        }
    }

    /// Streams to the API server and the runtime: 0.8 s → 30 s, jittered.
    pub fn watch() -> Self {
        Backoff::new(Duration::from_millis(800), Duration::from_secs(30), true)
    }

    /// Failed container starts: 10 s → 5 min, like the kubelet's.
    pub fn container() -> Self {
        Backoff::new(Duration::from_secs(10), Duration::from_secs(300), false)
    }

    /// The delay before the next attempt; each call doubles the following one.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        if self.jitter {
            // Up to +100 % like client-go's jitter factor 1.0, but never past max.
            let extra = base.mul_f64(rand::random::<f64>());
            (base + extra).min(self.max)
        } else {
            base
        }
    }

    /// Back to the initial delay after a success.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_policy_doubles_to_five_minutes() {
        let mut b = Backoff::container();
        let got: Vec<u64> = (0..7).map(|_| b.next_delay().as_secs()).collect();
        assert_eq!(got, [10, 20, 40, 80, 160, 300, 300]);
        b.reset();
        assert_eq!(b.next_delay().as_secs(), 10);
    }

    #[test]
    fn watch_policy_is_jittered_within_bounds() {
        let mut b = Backoff::watch();
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(800) && first <= Duration::from_millis(1600));
        for _ in 0..20 {
            assert!(b.next_delay() <= Duration::from_secs(30));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn delays_are_slept_on_the_tokio_clock() {
        let mut b = Backoff::new(Duration::from_secs(10), Duration::from_secs(300), false);
        let start = tokio::time::Instant::now();
        tokio::time::sleep(b.next_delay()).await;
        tokio::time::sleep(b.next_delay()).await;
        assert_eq!(start.elapsed(), Duration::from_secs(30));
    }
}
