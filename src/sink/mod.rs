//! Sinks: where adapter output is applied.
//!
//! A sink is a folder `src/sink/NAME/`: its configuration type (`config.rs`) implements
//! [`SinkSpec`], its sink implements [`Sink`], and one line in [`sink_kinds!`] below makes it a
//! variant of the closed, tagged configuration enum [`SinkConfig`]. This file is the one place
//! that lists the sink kinds. A sink reports success only once the destination has durably taken the
//! output (files: fsync of file and directory; HTTP: a 2xx answer; MQTT: the broker's PUBACK or
//! PUBCOMP; exec: the program's exit 0). Errors say whether trying
//! again can help ([`SinkError::Retryable`]) or not ([`SinkError::Permanent`]); the dispatcher
//! retries the first kind with backoff and dead-letters the second.

pub mod amqp;
pub mod client;
pub mod exec;
pub mod file;
pub mod http;
pub mod mqtt;
pub mod nats;
pub mod redis;
pub mod sftp;
pub mod sql;
pub mod template;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::settings::{Problem, RetryConfig, SecretSource, read_secret};

/// A secret a sink reads when it is built: a secret source, or a file that is as secret (an
/// SFTP private key).
pub enum SecretOrFile<'a> {
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
    /// When the agent received the event (journaled it), in milliseconds since the epoch: the
    /// same on every attempt, so names built from it (`{date}`, `{hour}`) never change.
    pub received_at_ms: i64,
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

/// What the agent needs of a sink kind's configuration: every sink's config type implements it,
/// and [`SinkConfig`] dispatches to it.
pub trait SinkSpec {
    /// The retry policy.
    fn retry(&self) -> &RetryConfig;

    /// Resolves relative paths against the configuration file's directory.
    fn resolve_paths(&mut self, base: &Path);

    /// Pure checks; `key` is this sink's key path, e.g. `sinks.court-files`.
    fn validate(&self, key: &str) -> Vec<Problem>;

    /// The secrets the sink is built with, each with its key below the sink's (e.g.
    /// `secret_headers.X-Api-Key`), and files that are as secret (an SFTP private key). A reload
    /// rebuilds the sink when one of them changed. Default: none.
    fn secret_sources(&self) -> Vec<(String, SecretOrFile<'_>)> {
        Vec::new()
    }

    /// Builds the sink: reads the secrets and files it names, but opens no connection. The
    /// problem has the sink's key path ([`BuildContext::problem`]), or a key below it.
    fn build(&self, context: &BuildContext<'_>) -> Result<Arc<dyn Sink>, Problem>;

    /// Checks that an output of a route's adapter (e.g. a fixture's expected output) is one this
    /// sink can apply, as far as that can be told without the destination. Pure. Default: any
    /// output.
    fn check_output(&self, _output: &Value) -> Result<(), String> {
        Ok(())
    }
}

/// What a sink is built with besides its configuration.
#[derive(Debug, Clone, Copy)]
pub struct BuildContext<'a> {
    /// The sink's key path, e.g. `sinks.court-files`.
    pub key: &'a str,
    /// The sink's name, e.g. `court-files`.
    pub name: &'a str,
}

impl BuildContext<'_> {
    /// A problem with the sink as a whole.
    pub fn problem(&self, message: String) -> Problem {
        Problem {
            key: self.key.to_string(),
            message,
        }
    }
}

/// Pushes `source`, when set, as the secret `key`: for [`SinkSpec::secret_sources`].
pub fn push_secret<'a>(
    sources: &mut Vec<(String, SecretOrFile<'a>)>,
    key: &str,
    source: &'a Option<SecretSource>,
) {
    if let Some(source) = source {
        sources.push((key.to_string(), SecretOrFile::Secret(source)));
    }
}

/// The registry: one line per sink kind, `Variant(config type)`; the variant's snake_case name
/// is the `type` in the TOML (`type = "file"`).
macro_rules! sink_kinds {
    ($($variant:ident($config:ty),)*) => {
        /// The configuration of one sink, tagged by `type`.
        #[derive(Debug, Clone, PartialEq, Deserialize)]
        #[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
        pub enum SinkConfig {
            $($variant($config),)*
        }

        impl SinkConfig {
            /// The sink kind's own configuration.
            pub fn spec(&self) -> &dyn SinkSpec {
                match self {
                    $(SinkConfig::$variant(c) => c,)*
                }
            }

            fn spec_mut(&mut self) -> &mut dyn SinkSpec {
                match self {
                    $(SinkConfig::$variant(c) => c,)*
                }
            }

            /// This sink's kind, as its `type` is written in the TOML.
            pub fn kind(&self) -> String {
                match self {
                    $(SinkConfig::$variant(_) => stringify!($variant).to_ascii_lowercase(),)*
                }
            }

            /// Every sink kind, as its `type` is written in the TOML.
            pub fn kinds() -> Vec<String> {
                // Each variant is one word, so snake_case is its lower case.
                vec![$(stringify!($variant).to_ascii_lowercase(),)*]
            }
        }
    };
}

sink_kinds! {
    Amqp(amqp::AmqpConfig),
    Exec(exec::ExecConfig),
    File(file::FileConfig),
    Http(http::HttpConfig),
    Mqtt(mqtt::MqttConfig),
    Nats(nats::NatsConfig),
    Redis(redis::RedisConfig),
    Sftp(sftp::SftpConfig),
    Sql(sql::SqlConfig),
}

impl SinkConfig {
    /// The retry policy.
    pub fn retry(&self) -> &RetryConfig {
        self.spec().retry()
    }

    /// Resolves relative paths against the configuration file's directory.
    pub fn resolve_paths(&mut self, base: &Path) {
        self.spec_mut().resolve_paths(base)
    }

    /// Pure checks; `key` is this sink's key path, e.g. `sinks.court-files`.
    pub fn validate(&self, key: &str) -> Vec<Problem> {
        self.spec().validate(key)
    }

    /// Reads the sink's secrets again and returns a SHA-256 digest of them, so that a reload
    /// can tell whether a sink whose settings did not change must still be rebuilt because a
    /// secret file was rewritten. The digest stays in memory and is only compared. `key` is
    /// this sink's key path; each problem names the secret that cannot be read.
    pub fn secret_digest(&self, key: &str) -> Result<[u8; 32], Vec<Problem>> {
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        let mut problems = Vec::new();
        for (field, source) in self.spec().secret_sources() {
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

    /// Builds the sink (reads secrets and files it names, but opens no connection). `key` is
    /// this sink's key path, `sinks.NAME`.
    pub fn build(&self, key: &str) -> Result<Arc<dyn Sink>, Problem> {
        let context = BuildContext {
            key,
            name: key.strip_prefix("sinks.").unwrap_or(key),
        };
        self.spec().build(&context)
    }

    /// Checks that an output of a route's adapter (e.g. a fixture's expected output) is one this
    /// sink can apply, as far as that can be told without the destination. Pure.
    pub fn check_output(&self, output: &Value) -> Result<(), String> {
        self.spec().check_output(output)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The production example, with every secret file in `dir` (each holding `content` and
    /// its own name) instead of /etc/ess-agent/secrets.
    fn example_with_secrets_in(dir: &Path, content: &str) -> crate::config::Config {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(root.join("config/production.example.toml")).unwrap();
        let prefix = "/etc/ess-agent/secrets/";
        let mut rest = text.as_str();
        while let Some(at) = rest.find(prefix) {
            let name: String = rest[at + prefix.len()..]
                .chars()
                .take_while(|c| *c != '"')
                .collect();
            std::fs::write(dir.join(&name), format!("{content}-{name}")).unwrap();
            rest = &rest[at + prefix.len()..];
        }
        let text = text.replace(prefix, &format!("{}/", dir.display()));
        let path = dir.join("ess-agent.toml");
        std::fs::write(&path, text).unwrap();
        crate::config::Config::load(&path).unwrap()
    }

    /// The production example shows every sink kind, and a reload sees a rewritten secret of
    /// every sink that has one: each kind's `secret_sources` lists the secrets it is built with.
    #[test]
    fn every_sink_kind_is_shown_and_its_secrets_are_seen_by_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let config = example_with_secrets_in(dir.path(), "before");
        let mut shown: Vec<String> = config.sinks.values().map(SinkConfig::kind).collect();
        shown.sort();
        shown.dedup();
        let mut kinds = SinkConfig::kinds();
        kinds.sort();
        assert_eq!(
            shown, kinds,
            "config/production.example.toml shows every sink kind"
        );

        let before: Vec<(String, [u8; 32])> = config
            .sinks
            .iter()
            .filter(|(_, s)| !s.spec().secret_sources().is_empty())
            .map(|(name, s)| (name.clone(), s.secret_digest(name).unwrap()))
            .collect();
        let with_secrets: Vec<&str> = before.iter().map(|(n, _)| n.as_str()).collect();
        for kind in ["amqp", "http", "mqtt", "nats", "redis", "sftp", "sql"] {
            assert!(
                config
                    .sinks
                    .iter()
                    .any(|(name, s)| s.kind() == kind && with_secrets.contains(&name.as_str())),
                "the {kind} sink of the example has no secret a reload would re-read"
            );
        }
        let config = example_with_secrets_in(dir.path(), "after");
        for (name, digest) in before {
            assert_ne!(
                config.sinks[&name].secret_digest(&name).unwrap(),
                digest,
                "sink {name}: a rewritten secret file went unnoticed"
            );
        }
    }

    /// A client sink whose TLS client key file is rewritten (a certificate renewal) is rebuilt
    /// by a reload, like one whose password changed.
    #[test]
    fn a_rewritten_client_key_is_seen_by_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("client.key");
        let files = format!(
            "ca_file = \"{d}/ca.pem\"\nclient_cert = \"{d}/client.pem\"\nclient_key = \"{d}/client.key\"\n",
            d = dir.path().display()
        );
        let configs = [
            format!(
                "type = \"mqtt\"\nurl = \"mqtts://b.example:8883\"\nclient_id = \"c\"\n\
                 topic = \"t/{{id}}\"\n{files}"
            ),
            format!("type = \"redis\"\nurl = \"rediss://r.example:6380\"\nstream = \"s\"\n{files}"),
            format!(
                "type = \"amqp\"\nurl = \"amqps://q.example:5671\"\nexchange = \"x\"\n\
                 routing_key = \"k\"\n{files}"
            ),
            format!(
                "type = \"nats\"\nurl = \"tls://n.example:4222\"\nsubject = \"s\"\n\
                 tls = {{ ca_file = \"{d}/ca.pem\", cert = \"{d}/client.pem\", key = \"{d}/client.key\" }}\n",
                d = dir.path().display()
            ),
        ];
        for text in configs {
            let sink: SinkConfig = toml::from_str(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
            std::fs::write(&key, "old key").unwrap();
            let before = sink.secret_digest("sinks.s").unwrap();
            std::fs::write(&key, "renewed key").unwrap();
            let after = sink.secret_digest("sinks.s").unwrap();
            assert_ne!(
                before,
                after,
                "{}: a renewed client key went unnoticed",
                sink.kind()
            );
        }
    }
}
