//! Sinks: where adapter output is applied.
//!
//! A sink is one small trait ([`Sink`]) and one variant of the closed, tagged configuration enum
//! ([`SinkConfig`]). A sink reports success only once the destination has durably taken the
//! output (files: fsync of file and directory; HTTP: a 2xx answer; MQTT: the broker's PUBACK or
//! PUBCOMP; exec: the program's exit 0). Errors say whether trying
//! again can help ([`SinkError::Retryable`]) or not ([`SinkError::Permanent`]); the dispatcher
//! retries the first kind with backoff and dead-letters the second.

pub mod exec;
pub mod file;
pub mod http;
pub mod mqtt;
pub mod redis;
pub mod sftp;
pub mod sql;
pub mod template;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::config::{Problem, SecretSource, read_secret};

/// A secret a sink reads when it is built.
enum SecretOrFile<'a> {
    Secret(&'a SecretSource),
    File(&'a Path),
}

/// What a sink knows about the event whose output it applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventMeta {
    pub id: String,
    pub event_type: String,
    pub version: u64,
    pub subject: String,
    pub revision: Option<u64>,
    pub source: Option<String>,
    /// The route that produced the output.
    pub route: String,
    /// The agent id (`agent_id` in the configuration).
    pub partner: String,
}

/// A failure to apply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SinkError {
    /// Temporary: the destination is unreachable, busy, or timed out. Trying again may succeed.
    #[error("{0}")]
    Retryable(String),
    /// Temporary, and the destination said how long to wait before trying again (an HTTP
    /// `Retry-After`). The next attempt waits at least that long, at most
    /// [`MAX_RETRY_AFTER`].
    #[error("{0}")]
    RetryAfter(String, Duration),
    /// The destination refused the output, or the output cannot be applied as configured.
    /// Trying again cannot succeed until someone changes something.
    #[error("{0}")]
    Permanent(String),
}

/// The longest wait a destination's [`SinkError::RetryAfter`] is granted.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

impl SinkError {
    /// True for [`SinkError::Retryable`] and [`SinkError::RetryAfter`].
    pub fn is_retryable(&self) -> bool {
        matches!(self, SinkError::Retryable(_) | SinkError::RetryAfter(..))
    }

    /// The message, and how long the destination asked to wait (zero when it did not; at
    /// most [`MAX_RETRY_AFTER`]).
    pub fn into_message_and_wait(self) -> (String, Duration) {
        match self {
            SinkError::RetryAfter(message, wait) => (message, wait.min(MAX_RETRY_AFTER)),
            SinkError::Retryable(message) | SinkError::Permanent(message) => {
                (message, Duration::ZERO)
            }
        }
    }
}

/// A destination for adapter output.
#[async_trait::async_trait]
pub trait Sink: Send + Sync {
    /// Applies the adapter's output for one event. `output` is the adapter's result as is: a
    /// sink that writes records writes one per element when it is an array. Returns Ok only once
    /// the destination has durably taken all of it. Applying the same event again must not
    /// duplicate it where the sink can prevent that (same file name, same key).
    async fn apply(&self, event: &EventMeta, output: &Value) -> Result<(), SinkError>;

    /// Called once when the running agent takes the sink into use, before its first apply:
    /// a sink cleans up here what an interrupted earlier run left at the destination.
    async fn start(&self) {}

    /// Checks that the destination is reachable and usable, for readiness.
    async fn healthcheck(&self) -> Result<(), SinkError> {
        Ok(())
    }
}

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

/// The configuration of one sink, tagged by `type`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum SinkConfig {
    Exec(exec::ExecConfig),
    File(file::FileConfig),
    Http(http::HttpConfig),
    Mqtt(mqtt::MqttConfig),
    Redis(redis::RedisConfig),
    Sftp(sftp::SftpConfig),
    Sql(sql::SqlConfig),
}

impl SinkConfig {
    /// The retry policy.
    pub fn retry(&self) -> &RetryConfig {
        match self {
            SinkConfig::Exec(c) => &c.retry,
            SinkConfig::File(c) => &c.retry,
            SinkConfig::Http(c) => &c.retry,
            SinkConfig::Mqtt(c) => &c.retry,
            SinkConfig::Redis(c) => &c.retry,
            SinkConfig::Sftp(c) => &c.retry,
            SinkConfig::Sql(c) => &c.retry,
        }
    }

    /// Resolves relative paths against the configuration file's directory.
    pub fn resolve_paths(&mut self, base: &Path) {
        match self {
            SinkConfig::Exec(c) => c.resolve_paths(base),
            SinkConfig::File(c) => c.resolve_paths(base),
            SinkConfig::Http(c) => c.resolve_paths(base),
            SinkConfig::Mqtt(c) => c.resolve_paths(base),
            SinkConfig::Redis(c) => c.resolve_paths(base),
            SinkConfig::Sftp(c) => c.resolve_paths(base),
            SinkConfig::Sql(c) => c.resolve_paths(base),
        }
    }

    /// Pure checks; `key` is this sink's key path, e.g. `sinks.court-files`.
    pub fn validate(&self, key: &str) -> Vec<Problem> {
        match self {
            SinkConfig::Exec(c) => c.validate(key),
            SinkConfig::File(c) => c.validate(key),
            SinkConfig::Http(c) => c.validate(key),
            SinkConfig::Mqtt(c) => c.validate(key),
            SinkConfig::Redis(c) => c.validate(key),
            SinkConfig::Sftp(c) => c.validate(key),
            SinkConfig::Sql(c) => c.validate(key),
        }
    }

    /// The secrets the sink is built with, each with its key below the sink's (e.g.
    /// `secret_headers.X-Api-Key`), and for SFTP the private key file, which is as secret.
    fn secret_sources(&self) -> Vec<(String, SecretOrFile<'_>)> {
        fn secret<'a>(
            sources: &mut Vec<(String, SecretOrFile<'a>)>,
            key: &str,
            source: &'a Option<SecretSource>,
        ) {
            if let Some(source) = source {
                sources.push((key.to_string(), SecretOrFile::Secret(source)));
            }
        }
        let mut sources = Vec::new();
        match self {
            SinkConfig::Exec(_) | SinkConfig::File(_) => {}
            SinkConfig::Http(c) => {
                for (name, source) in &c.secret_headers {
                    sources.push((
                        format!("secret_headers.{name}"),
                        SecretOrFile::Secret(source),
                    ));
                }
            }
            SinkConfig::Mqtt(c) => {
                secret(&mut sources, "username", &c.username);
                secret(&mut sources, "password", &c.password);
            }
            SinkConfig::Redis(c) => {
                secret(&mut sources, "username", &c.username);
                secret(&mut sources, "password", &c.password);
            }
            SinkConfig::Sftp(c) => {
                secret(
                    &mut sources,
                    "private_key_passphrase",
                    &c.private_key_passphrase,
                );
                secret(&mut sources, "password", &c.password);
                if let Some(path) = &c.private_key {
                    sources.push(("private_key".to_string(), SecretOrFile::File(path)));
                }
            }
            SinkConfig::Sql(c) => {
                secret(&mut sources, "url_secret", &c.url_secret);
                secret(&mut sources, "password", &c.password);
            }
        }
        sources
    }

    /// Reads the sink's secrets again and returns a SHA-256 digest of them, so that a reload
    /// can tell whether a sink whose settings did not change must still be rebuilt because a
    /// secret file was rewritten. The digest stays in memory and is only compared. `key` is
    /// this sink's key path; each problem names the secret that cannot be read.
    pub fn secret_digest(&self, key: &str) -> Result<[u8; 32], Vec<Problem>> {
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        let mut problems = Vec::new();
        for (field, source) in self.secret_sources() {
            let value = match source {
                SecretOrFile::Secret(source) => read_secret(source).map(String::into_bytes),
                SecretOrFile::File(path) => std::fs::read(path)
                    .map_err(|e| format!("cannot read private key file {}: {e}", path.display())),
            };
            match value {
                Ok(value) => {
                    for part in [field.as_bytes(), &value] {
                        context.update(&(part.len() as u64).to_be_bytes());
                        context.update(part);
                    }
                }
                Err(message) => problems.push(Problem {
                    key: format!("{key}.{field}"),
                    message,
                }),
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let mut digest = [0u8; 32];
        digest.copy_from_slice(context.finish().as_ref());
        Ok(digest)
    }

    /// Builds the sink (reads secrets and files it names, but opens no connection).
    pub fn build(&self, key: &str) -> Result<Arc<dyn Sink>, Problem> {
        match self {
            SinkConfig::Exec(c) => Ok(Arc::new(exec::ExecSink::new(c, key)?)),
            SinkConfig::File(c) => Ok(Arc::new(file::FileSink::new(c).map_err(|message| {
                Problem {
                    key: key.to_string(),
                    message,
                }
            })?)),
            SinkConfig::Http(c) => Ok(Arc::new(http::HttpSink::new(c).map_err(|message| {
                Problem {
                    key: key.to_string(),
                    message,
                }
            })?)),
            SinkConfig::Mqtt(c) => {
                let name = key.strip_prefix("sinks.").unwrap_or(key);
                Ok(Arc::new(mqtt::MqttSink::new(c, name).map_err(
                    |message| Problem {
                        key: key.to_string(),
                        message,
                    },
                )?))
            }
            SinkConfig::Redis(c) => {
                let name = key.strip_prefix("sinks.").unwrap_or(key);
                Ok(Arc::new(redis::RedisSink::new(c, name).map_err(
                    |message| Problem {
                        key: key.to_string(),
                        message,
                    },
                )?))
            }
            SinkConfig::Sftp(c) => Ok(Arc::new(sftp::SftpSink::new(c, key).map_err(
                |message| Problem {
                    key: key.to_string(),
                    message,
                },
            )?)),
            SinkConfig::Sql(c) => Ok(Arc::new(sql::SqlSink::new(c).map_err(|message| {
                Problem {
                    key: key.to_string(),
                    message,
                }
            })?)),
        }
    }

    /// Checks that an output of a route's adapter (e.g. a fixture's expected output) is one this
    /// sink can apply, as far as that can be told without the destination. Pure.
    pub fn check_output(&self, output: &serde_json::Value) -> Result<(), String> {
        match self {
            SinkConfig::Sql(c) => c.check_output(output),
            SinkConfig::Exec(_)
            | SinkConfig::File(_)
            | SinkConfig::Http(_)
            | SinkConfig::Mqtt(_)
            | SinkConfig::Redis(_)
            | SinkConfig::Sftp(_) => Ok(()),
        }
    }
}

/// For every route whose sink can check outputs (see [`SinkConfig::check_output`]), checks each
/// expected output among the fixtures of the route's adapter, e.g. that a SQL statement's
/// parameters are fields the adapter returns. For `ess-agent validate`; reads only the fixture
/// files. A fixture that cannot be read is left to the adapter tests.
pub fn check_fixture_outputs(config: &crate::config::Config) -> Vec<Problem> {
    use crate::adapter::fixtures::{Expectation, FIXTURE_EXTENSION, Fixture, tests_dir};
    let mut problems = Vec::new();
    for (i, route) in config.routes.iter().enumerate() {
        let Some(sink) = config.sinks.get(&route.sink) else {
            continue;
        };
        if !matches!(sink, SinkConfig::Sql(_)) {
            continue;
        }
        let Ok(entries) = std::fs::read_dir(tests_dir(&route.adapter)) else {
            continue;
        };
        let mut cases: Vec<_> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == FIXTURE_EXTENSION))
            .collect();
        cases.sort();
        for case in cases {
            let Ok(fixture) = Fixture::load(&case) else {
                continue;
            };
            if let Expectation::Value(output) = &fixture.expectation
                && let Err(message) = sink.check_output(output)
            {
                problems.push(Problem {
                    key: format!("routes[{i}]"),
                    message: format!(
                        "sink {} cannot apply the output fixture {} expects of adapter {}: \
                         {message}",
                        route.sink,
                        case.display(),
                        route.adapter.display()
                    ),
                });
            }
        }
    }
    problems
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
