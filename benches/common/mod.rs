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

/// A change to the agent, compared with its defaults in the same run.
#[derive(Debug, Default)]
pub struct Variant {
    /// TOML added to the agent's configuration (start it with a table header, `[journal]`).
    pub toml: String,
    /// Environment variables set for the agent.
    pub env: Vec<(String, String)>,
}

impl Variant {
    /// From `ESS_BENCH_AGENT_VARIANT` (TOML) and `ESS_BENCH_AGENT_VARIANT_ENV` (`NAME=value`
    /// pairs separated by spaces); `None` when neither is set.
    pub fn from_env() -> Option<Variant> {
        let toml = std::env::var("ESS_BENCH_AGENT_VARIANT").ok();
        let env = std::env::var("ESS_BENCH_AGENT_VARIANT_ENV").ok();
        if toml.is_none() && env.is_none() {
            return None;
        }
        let env = env
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|pair| pair.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Some(Variant {
            toml: toml.unwrap_or_default(),
            env,
        })
    }
}
