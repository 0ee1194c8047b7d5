//! The `mqtt` sink's configuration: its serde type and pure checks (broker URL, topic).

use std::sync::Arc;

use crate::settings::RetryConfig;
use crate::settings::{Problem, SecretSource};
use crate::sink::template::Template;
use crate::sink::{BuildContext, SecretOrFile, Sink, SinkSpec, client, push_secret};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The MQTT protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum MqttVersion {
    /// MQTT 3.1.1.
    #[serde(rename = "3.1.1")]
    V311,
    /// MQTT 5.
    #[default]
    #[serde(rename = "5")]
    V5,
}

/// Configuration of an `mqtt` sink.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// The broker, `mqtt://host[:port]` (default port 1883) or `mqtts://host[:port]` for TLS
    /// (default port 8883). Credentials do not belong here: use `username` and `password`.
    /// Required.
    pub url: String,
    /// The protocol version, `"3.1.1"` or `"5"`. Default: `"5"`.
    #[serde(default)]
    pub protocol: MqttVersion,
    /// The client identifier. It names the broker-side session that holds unconfirmed
    /// publishes across reconnects, so it must be stable and unique on the broker: two clients
    /// with one id disconnect each other. MQTT 3.1.1 brokers need only accept 1 to 23 letters
    /// and digits. Required.
    pub client_id: String,
    /// Template of each message's topic, e.g. `partners/{partner}/rules/{subject}`.
    /// Placeholders: `{id}` `{type}` `{version}` `{subject}` `{revision}` `{source}` `{partner}`
    /// `{route}` `{index}` `{output.<field>}`; `{{` and `}}` are literal braces. A rendered topic
    /// must not contain `+` or `#`, start with `$`, or hold control characters. Required.
    pub topic: String,
    /// Accept topics with an empty level (`a//b`, a leading or trailing `/`). Default: false,
    /// since an empty level is almost always a missing value.
    #[serde(default)]
    pub allow_empty_levels: bool,
    /// Quality of service: 0 (at most once, applied when written to the connection), 1 (applied
    /// on PUBACK) or 2 (applied on PUBCOMP). Default: 1.
    #[serde(default = "default_qos")]
    pub qos: u8,
    /// Publish with the retain flag, so that a subscriber connecting later gets the last message
    /// of each topic. Default: false.
    #[serde(default)]
    pub retain: bool,
    /// Wrap each record in a JSON object with the event id, type and route
    /// (`{"ess_event_id": …, "ess_event_type": …, "ess_route": …, "output": …}`), for
    /// subscribers that must de-duplicate without MQTT 5 user properties. Default: false.
    #[serde(default)]
    pub envelope: bool,
    /// MQTT 5: the content type of every message, overriding `application/json` for JSON
    /// payloads and `text/plain; charset=utf-8` for string outputs. Default: none.
    #[serde(default)]
    pub content_type: Option<String>,
    /// MQTT 5: the message expiry interval in seconds; the broker drops a message not delivered
    /// within it. Default: none (messages do not expire).
    #[serde(default)]
    pub message_expiry_secs: Option<u32>,
    /// MQTT 5: how long the broker keeps the session (and with it the unconfirmed publishes)
    /// after a disconnect, in seconds. Default: 86400 (one day).
    #[serde(default = "default_session_expiry")]
    pub session_expiry_secs: u32,
    /// The user name, `{ file = "…" }` or `{ env = "…" }`. Default: none (anonymous).
    #[serde(default)]
    pub username: Option<SecretSource>,
    /// The password, `{ file = "…" }` or `{ env = "…" }`; needs `username`. Read at start and at
    /// every reload; never logged. Default: none.
    #[serde(default)]
    pub password: Option<SecretSource>,
    /// `mqtts` only: a PEM file with the CA certificate(s) to trust for the broker instead of the
    /// system's roots. Relative paths are resolved against the configuration file's directory.
    /// Default: the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// `mqtts` only: a PEM client certificate chain to present to the broker; needs
    /// `client_key`. Default: none.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// `mqtts` only: the PEM private key of `client_cert`. Default: none.
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    /// How long an apply waits for the broker's confirmation of all its messages, in
    /// milliseconds; no confirmation in time is retried. Default: 10000.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// The most publishes that may wait for their confirmation at once (the in-flight window,
    /// shared by all applies); further publishes wait for a free place. Default: 64.
    #[serde(default = "default_max_inflight")]
    pub max_inflight: u16,
    /// How long a connection attempt (TCP, TLS and CONNACK) may take, in seconds. Default: 10.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
    /// The keep-alive interval in seconds (at least 5); a connection that stays silent for
    /// longer is found dead and re-established. Default: 30.
    #[serde(default = "default_keep_alive")]
    pub keep_alive_secs: u16,
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

pub(super) fn default_qos() -> u8 {
    1
}

pub(super) fn default_session_expiry() -> u32 {
    86_400
}

pub(super) fn default_timeout_ms() -> u64 {
    10_000
}

pub(super) fn default_max_inflight() -> u16 {
    64
}

pub(super) fn default_connect_timeout() -> u64 {
    10
}

pub(super) fn default_keep_alive() -> u16 {
    30
}

pub(super) fn default_reconnect_initial() -> u64 {
    100
}

pub(super) fn default_reconnect_max() -> u64 {
    10_000
}

/// The largest MQTT packet (the remaining length is at most 268,435,455 bytes).
pub(super) const MAX_PACKET: usize = 268_435_455;

/// The longest topic name, in bytes (MQTT strings carry a 16-bit length).
pub(super) const MAX_TOPIC: usize = 65_535;

/// The broker address parsed from `url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Broker {
    pub(super) host: String,
    pub(super) port: u16,
    pub(super) tls: bool,
}

impl std::fmt::Display for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        write!(f, "{scheme}://{}:{}", self.host, self.port)
    }
}

/// How `url` is written.
const URL: client::UrlForm = client::UrlForm {
    plain: "mqtt",
    tls: "mqtts",
    ports: (1883, 8883),
    example: "write it like mqtt://broker.example:1883 or mqtts://broker.example:8883",
    credentials: "username and password",
    path: None,
    protocol: "MQTT",
};

pub(super) fn parse_url(url: &str) -> Result<Broker, String> {
    let client::Address { host, port, tls } = client::parse_url(url, &URL)?;
    Ok(Broker { host, port, tls })
}

pub(super) use crate::sink::client::shown;

/// Checks a rendered topic name (MQTT 3.1.1 and 5, §4.7): not empty, at most 65,535 bytes, no
/// wildcard, no NUL or other control character, not reserved (`$…`), and no empty level unless
/// `allow_empty_levels`.
pub fn check_topic(topic: &str, allow_empty_levels: bool) -> Result<(), String> {
    if topic.is_empty() {
        return Err("the rendered topic is empty: check the values the template uses".into());
    }
    if topic.len() > MAX_TOPIC {
        return Err(format!(
            "the rendered topic {} is longer than MQTT's limit of {MAX_TOPIC} bytes: check the \
             values the template uses",
            shown(topic)
        ));
    }
    if let Some(wildcard) = topic.chars().find(|&c| c == '+' || c == '#') {
        return Err(format!(
            "the rendered topic {} contains the wildcard {wildcard:?}, which only subscriptions \
             may use: check the values the template uses",
            shown(topic)
        ));
    }
    if topic.chars().any(char::is_control) {
        return Err(format!(
            "the rendered topic {} contains a control character: check the values the template \
             uses",
            shown(topic)
        ));
    }
    if topic.starts_with('$') {
        return Err(format!(
            "the rendered topic {} starts with $, which brokers reserve for themselves (like \
             $SYS): start the template with a fixed level",
            shown(topic)
        ));
    }
    if !allow_empty_levels && topic.split('/').any(str::is_empty) {
        return Err(format!(
            "the rendered topic {} has an empty level (// or a / at the start or end): check \
             the values the template uses, or set allow_empty_levels = true if it is meant",
            shown(topic)
        ));
    }
    Ok(())
}

impl SinkSpec for MqttConfig {
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
        if self.client_id.is_empty() {
            bad(
                "client_id",
                "must not be empty: choose an id that is unique on the broker, like \
                 \"ess-agent-north\""
                    .into(),
            );
        } else if self.client_id.len() > MAX_TOPIC || self.client_id.chars().any(char::is_control) {
            bad(
                "client_id",
                "must be at most 65535 bytes without control characters; 1 to 23 letters and \
                 digits work with every broker"
                    .into(),
            );
        }
        match Template::parse(&self.topic) {
            Err(message) => bad("topic", message),
            Ok(template) => {
                // Every placeholder as a plain word: only the literal parts are checked, so
                // `a/#` or `a//{id}` is refused here rather than as a dead letter per event.
                let sample = template.render_with(|_| Ok("x".into())).unwrap_or_default();
                if let Err(e) = check_topic(&sample, self.allow_empty_levels) {
                    bad(
                        "topic",
                        format!(
                            "{:?} can never render a valid topic ({e}); write it like \
                             \"partners/{{partner}}/rules/{{subject}}\"",
                            self.topic
                        ),
                    );
                }
            }
        }
        if self.qos > 2 {
            bad("qos", format!("{} is not a QoS: use 0, 1 or 2", self.qos));
        }
        let v5_only = |field: &str| {
            format!(
                "{field} is an MQTT 5 feature: remove it, or set protocol = \"5\" if the broker \
                 speaks MQTT 5"
            )
        };
        if self.protocol == MqttVersion::V311 {
            if self.content_type.is_some() {
                bad("content_type", v5_only("content_type"));
            }
            if self.message_expiry_secs.is_some() {
                bad("message_expiry_secs", v5_only("message_expiry_secs"));
            }
        }
        if let Some(ct) = &self.content_type
            && (ct.trim().is_empty() || ct.chars().any(char::is_control))
        {
            bad(
                "content_type",
                format!("{ct:?} is not a content type: write it like \"application/xml\""),
            );
        }
        if self.message_expiry_secs == Some(0) {
            bad(
                "message_expiry_secs",
                "must be at least 1; remove it for messages that do not expire".into(),
            );
        }
        if self.session_expiry_secs == 0 {
            bad(
                "session_expiry_secs",
                "must be at least 1: with 0 the broker forgets the session at every disconnect, \
                 so unconfirmed publishes cannot be resent (the default is 86400)"
                    .into(),
            );
        }
        client::check_secrets(
            &mut bad,
            [("username", &self.username), ("password", &self.password)],
        );
        if self.password.is_some() && self.username.is_none() {
            bad(
                "password",
                "needs a username: set username too (MQTT sends a password only with a user name)"
                    .into(),
            );
        }
        client::check_tls_files(
            &mut bad,
            matches!(&broker, Ok(broker) if !broker.tls).then_some("an mqtts://"),
            &self.ca_file,
            &self.client_cert,
            &self.client_key,
        );
        client::check_at_least_one(
            &mut bad,
            [
                ("timeout_ms", self.timeout_ms, default_timeout_ms()),
                (
                    "max_inflight",
                    self.max_inflight.into(),
                    default_max_inflight().into(),
                ),
                (
                    "connect_timeout_secs",
                    self.connect_timeout_secs,
                    default_connect_timeout(),
                ),
            ],
        );
        if self.keep_alive_secs < 5 {
            bad(
                "keep_alive_secs",
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
        // A renewed client key (and with it the certificate) is taken by a reload.
        if let Some(key) = &self.client_key {
            sources.push(("client_key".into(), SecretOrFile::File(key)));
        }
        sources
    }

    fn build(&self, context: &BuildContext<'_>) -> Result<Arc<dyn Sink>, Problem> {
        Ok(Arc::new(
            super::MqttSink::new(self, context.name).map_err(|m| context.problem(m))?,
        ))
    }
}
