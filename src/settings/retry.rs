//! The retry policy of a sink: exponential backoff with full jitter.

use std::time::Duration;

use serde::Deserialize;

/// Retry policy of a sink: exponential backoff with full jitter.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Upper bound of the first delay, in milliseconds. Default: 1000.
    #[serde(default = "default_initial_ms")]
    pub initial_ms: u64,
    /// Upper bound of any delay, in milliseconds. Default: 300000 (5 minutes).
    #[serde(default = "default_max_ms")]
    pub max_ms: u64,
    /// Attempts after which the event is dead-lettered. 0 means no limit. Default: 25.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Age (since the event was received) after which no further attempt is made and the event
    /// is dead-lettered, in seconds. 0 means no limit. Default: 86400 (one day).
    #[serde(default = "default_max_age_secs")]
    pub max_age_secs: u64,
}

fn default_initial_ms() -> u64 {
    1000
}
fn default_max_ms() -> u64 {
    300_000
}
fn default_max_attempts() -> u32 {
    25
}
fn default_max_age_secs() -> u64 {
    86_400
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            initial_ms: default_initial_ms(),
            max_ms: default_max_ms(),
            max_attempts: default_max_attempts(),
            max_age_secs: default_max_age_secs(),
        }
    }
}

impl RetryConfig {
    /// The delay before attempt `attempt + 1`, after `attempt` failed attempts (1-based):
    /// uniformly random between 0 and `min(max, initial * 2^(attempt - 1))` ("full jitter").
    pub fn delay(&self, attempt: u32, random: f64) -> Duration {
        let exp = attempt.saturating_sub(1).min(40);
        let cap = self
            .initial_ms
            .saturating_mul(1u64 << exp)
            .min(self.max_ms)
            .max(1);
        Duration::from_millis((cap as f64 * random.clamp(0.0, 1.0)) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped_exponential_with_full_jitter() {
        let r = RetryConfig {
            initial_ms: 100,
            max_ms: 1000,
            ..RetryConfig::default()
        };
        assert_eq!(r.delay(1, 1.0), Duration::from_millis(100));
        assert_eq!(r.delay(2, 1.0), Duration::from_millis(200));
        assert_eq!(r.delay(4, 1.0), Duration::from_millis(800));
        assert_eq!(r.delay(5, 1.0), Duration::from_millis(1000));
        assert_eq!(r.delay(60, 1.0), Duration::from_millis(1000));
        assert_eq!(r.delay(3, 0.5), Duration::from_millis(200));
        assert_eq!(r.delay(3, 0.0), Duration::ZERO);
    }
}
