//! The `amqp` sink's configuration: its serde type and pure checks (broker URL, exchange and
//! routing key templates, TLS files, credentials).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::settings::{Problem, RetryConfig, SecretSource};
use crate::sink::template::Template;
use crate::sink::{BuildContext, SecretOrFile, Sink, SinkSpec, client, push_secret};

/// Configuration of an `amqp` sink (AMQP 0-9-1, e.g. RabbitMQ).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpConfig {
    /// The broker, `amqp://host[:port]` (default port 5672) or `amqps://host[:port]` for TLS
    /// (default port 5671). Credentials and the virtual host do not belong here: use
    /// `username`, `password` and `vhost`. Required.
    pub url: String,
    /// The virtual host. Default: `"/"`.
    #[serde(default = "default_vhost")]
    pub vhost: String,
    /// Template of the exchange each message is published to, e.g. `partner.rules`; `""` is
    /// the broker's default exchange, which routes by queue name. The exchange must exist:
    /// the sink declares nothing. Placeholders as in `routing_key`. Required.
    pub exchange: String,
    /// Template of each message's routing key, e.g. `rules.{type}.{subject}`. Placeholders:
    /// `{id}` `{type}` `{version}` `{subject}` `{revision}` `{source}` `{partner}` `{route}`
    /// `{index}` `{output.<field>}`; `{{` and `}}` are literal braces. Required.
    pub routing_key: String,
    /// Publish with the mandatory flag, so that a message no queue is bound for comes back and
    /// fails the apply instead of being dropped by the broker. Default: true.
    #[serde(default = "default_true")]
    pub mandatory: bool,
    /// The content type of every message, overriding `application/json` for JSON payloads and
    /// `text/plain; charset=utf-8` for string outputs. Default: none.
    #[serde(default)]
    pub content_type: Option<String>,
    /// The user name, `{ file = "…" }` or `{ env = "…" }`. Default: none, which logs in as
    /// RabbitMQ's `guest` (accepted from localhost only).
    #[serde(default)]
    pub username: Option<SecretSource>,
    /// The password, `{ file = "…" }` or `{ env = "…" }`; needs `username`. Read at start and at
    /// every reload; never logged. Default: none.
    #[serde(default)]
    pub password: Option<SecretSource>,
    /// `amqps` only: a PEM file with the CA certificate(s) to trust for the broker instead of the
    /// system's roots. Relative paths are resolved against the configuration file's directory.
    /// Default: the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// `amqps` only: a PEM client certificate chain to present to the broker (for RabbitMQ's
    /// `verify_peer` and the EXTERNAL mechanism's peers); needs `client_key`. Default: none.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// `amqps` only: the PEM private key of `client_cert`. Default: none.
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    /// How long an apply waits for the broker's confirmation of all its messages, in
    /// milliseconds; no confirmation in time is retried. Default: 10000.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// How long a connection attempt (TCP, TLS, the AMQP handshake and opening the channel)
    /// may take, in seconds. Default: 10.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
    /// The heartbeat interval asked of the broker, in seconds (at least 5); a connection that
    /// stays silent for two intervals is found dead and re-established. Default: 30.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_secs: u16,
    /// The first delay before reconnecting after a failure, in milliseconds; it doubles with
    /// every further failure. Default: 100.
    #[serde(default = "default_reconnect_initial")]
    pub reconnect_initial_ms: u64,
    /// The longest delay between reconnection attempts, in milliseconds. Default: 10000.
    #[serde(default = "default_reconnect_max")]
    pub reconnect_max_ms: u64,
    /// Retry policy for retryable failures. Default: see [`RetryConfig`].
    #[serde(default)]
    pub retry: RetryConfig,
}

fn default_vhost() -> String {
    "/".into()
}

fn default_true() -> bool {
    true
}

fn default_timeout_ms() -> u64 {
    10_000
}

fn default_connect_timeout() -> u64 {
    10
}

fn default_heartbeat() -> u16 {
    30
}

fn default_reconnect_initial() -> u64 {
    100
}

fn default_reconnect_max() -> u64 {
    10_000
}

/// The longest exchange name or routing key (AMQP short strings carry an 8-bit length).
pub(super) const MAX_NAME: usize = 255;

/// The broker address parsed from `url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Broker {
    pub(super) host: String,
    pub(super) port: u16,
    pub(super) tls: bool,
}

impl std::fmt::Display for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "amqps" } else { "amqp" };
        write!(f, "{scheme}://{}:{}", self.host, self.port)
    }
}

/// How `url` is written.
const URL: client::UrlForm = client::UrlForm {
    plain: "amqp",
    tls: "amqps",
    ports: (5672, 5671),
    example: "write it like amqp://broker.example:5672 or amqps://broker.example:5671",
    credentials: "username and password",
    path: Some(
        "set the virtual host with vhost, and write the URL like amqp://broker.example:5672",
    ),
    protocol: "AMQP",
};

pub(super) fn parse_url(url: &str) -> Result<Broker, String> {
    let client::Address { host, port, tls } = client::parse_url(url, &URL)?;
    // The client takes an IPv6 address without its brackets.
    let host = host.trim_matches(['[', ']']).to_string();
    Ok(Broker { host, port, tls })
}

pub(super) use crate::sink::client::shown;

/// Checks a rendered exchange name: at most 255 bytes of the characters RabbitMQ accepts in a
/// name (letters, digits, `-`, `_`, `.`, `:`); empty is the default exchange.
pub(super) fn check_exchange(name: &str) -> Result<(), String> {
    if name.len() > MAX_NAME {
        return Err(format!(
            "the rendered exchange {} is longer than AMQP's limit of {MAX_NAME} bytes: check the \
             values the template uses",
            shown(name)
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')))
    {
        return Err(format!(
            "the rendered exchange {} contains {c:?}; exchange names are letters, digits, -, _, \
             . and : only: check the values the template uses",
            shown(name)
        ));
    }
    Ok(())
}

/// Checks a rendered routing key: at most 255 bytes.
pub(super) fn check_routing_key(key: &str) -> Result<(), String> {
    if key.len() > MAX_NAME {
        return Err(format!(
            "the rendered routing key {} is longer than AMQP's limit of {MAX_NAME} bytes: check \
             the values the template uses",
            shown(key)
        ));
    }
    Ok(())
}

impl SinkSpec for AmqpConfig {
    fn retry(&self) -> &RetryConfig {
        &self.retry
    }

    /// Resolves relative file paths (TLS files, secret files) against `base`.
    fn resolve_paths(&mut self, base: &Path) {
        client::resolve_files(
            base,
            [
                &mut self.ca_file,
                &mut self.client_cert,
                &mut self.client_key,
            ],
        );
        client::resolve_secrets(base, [&mut self.username, &mut self.password]);
    }

    /// Pure checks; `key` is this sink's key path.
    fn validate(&self, key: &str) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut bad = |field: &str, message: String| {
            problems.push(Problem {
                key: format!("{key}.{field}"),
                message,
            })
        };
        let broker = parse_url(&self.url);
        if let Err(message) = &broker {
            bad("url", message.clone());
        }
        if self.vhost.is_empty() || self.vhost.len() > MAX_NAME {
            bad(
                "vhost",
                "must be 1 to 255 bytes: the broker's default virtual host is \"/\"".into(),
            );
        }
        match Template::parse(&self.exchange) {
            Err(message) => bad("exchange", message),
            Ok(template) => {
                // Every placeholder as a plain word: only the literal parts are checked, so a
                // name that can never be valid is refused here rather than per event.
                let sample = template.render_with(|_| Ok("x".into())).unwrap_or_default();
                if let Err(e) = check_exchange(&sample) {
                    bad(
                        "exchange",
                        format!(
                            "{:?} can never render a valid exchange name ({e}); write it like \
                             \"partner.rules\"",
                            self.exchange
                        ),
                    );
                }
            }
        }
        match Template::parse(&self.routing_key) {
            Err(message) => bad("routing_key", message),
            Ok(template) => {
                let sample = template.render_with(|_| Ok("x".into())).unwrap_or_default();
                if let Err(e) = check_routing_key(&sample) {
                    bad(
                        "routing_key",
                        format!(
                            "{:?} can never render a valid routing key ({e})",
                            self.routing_key
                        ),
                    );
                }
            }
        }
        if let Some(ct) = &self.content_type
            && (ct.trim().is_empty() || ct.len() > MAX_NAME || ct.chars().any(char::is_control))
        {
            bad(
                "content_type",
                format!("{ct:?} is not a content type: write it like \"application/xml\""),
            );
        }
        client::check_secrets(
            &mut bad,
            [("username", &self.username), ("password", &self.password)],
        );
        if self.password.is_some() && self.username.is_none() {
            bad("password", "needs a username: set username too".into());
        }
        client::check_tls_files(
            &mut bad,
            matches!(&broker, Ok(broker) if !broker.tls).then_some("an amqps://"),
            &self.ca_file,
            &self.client_cert,
            &self.client_key,
        );
        client::check_at_least_one(
            &mut bad,
            [
                ("timeout_ms", self.timeout_ms, default_timeout_ms()),
                (
                    "connect_timeout_secs",
                    self.connect_timeout_secs,
                    default_connect_timeout(),
                ),
            ],
        );
        if self.heartbeat_secs < 5 {
            bad(
                "heartbeat_secs",
                "must be at least 5 (the default is 30)".into(),
            );
        }
        client::check_reconnect(
            &mut bad,
            self.reconnect_initial_ms,
            self.reconnect_max_ms,
            default_reconnect_initial(),
        );
        problems
    }

    fn secret_sources(&self) -> Vec<(String, SecretOrFile<'_>)> {
        let mut sources = Vec::new();
        push_secret(&mut sources, "username", &self.username);
        push_secret(&mut sources, "password", &self.password);
        if let Some(key) = &self.client_key {
            sources.push(("client_key".into(), SecretOrFile::File(key)));
        }
        sources
    }

    fn build(&self, context: &BuildContext<'_>) -> Result<Arc<dyn Sink>, Problem> {
        Ok(Arc::new(
            super::AmqpSink::new(self, context.name).map_err(|m| context.problem(m))?,
        ))
    }
}
