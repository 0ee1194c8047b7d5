//! What the benchmarks share: settings from the environment and the machine's CPU clock.
// Each benchmark is a crate of its own and uses only part of this.
#![allow(dead_code)]

/// The number in the environment variable `name`, or `default`.
pub fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Busy CPU seconds of the whole machine so far (every CPU; idle and iowait left out).
pub fn machine_busy() -> f64 {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<f64> = text
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    if ticks.len() < 8 {
        return 0.0;
    }
    // user nice system idle iowait irq softirq steal, in units of 1/100 s.
    (ticks.iter().take(8).sum::<f64>() - ticks[3] - ticks[4]) / 100.0
}
