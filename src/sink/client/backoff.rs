//! The wait between a client's connection attempts.

use std::time::Duration;

/// Exponential backoff between connection attempts: from `initial`, doubling, up to `max`.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max,
            next: initial,
        }
    }

    /// The delay before the next attempt; each call doubles the one after.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        delay
    }

    /// Starts again from `initial` (after a success).
    pub fn reset(&mut self) {
        self.next = self.initial;
    }

    /// The delay before attempt `attempt` (1 for the first retry), for a client that counts
    /// its attempts itself.
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(31));
        self.initial.saturating_mul(factor).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_limit_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let got: Vec<u128> = (0..4).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(got, [100, 200, 350, 350]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }

    #[test]
    fn backoff_by_attempt_doubles_up_to_the_limit() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let got: Vec<u128> = (0..7).map(|n| b.delay(n).as_millis()).collect();
        assert_eq!(got, [100, 100, 200, 400, 800, 1000, 1000]);
        assert_eq!(b.delay(u32::MAX), Duration::from_millis(1000));
    }
}
