//! The `nats` sink's configuration: its serde type and pure checks (server URL, subject
//! template, stream name, credentials, TLS).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::settings::{Problem, RetryConfig, SecretSource};
use crate::sink::template::Template;
use crate::sink::{BuildContext, SecretOrFile, Sink, SinkSpec, client, push_secret};

/// Configuration of a `nats` sink.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// The server, `nats://host[:port]` or `tls://host[:port]` (TLS required); the port defaults
    /// to 4222. Credentials do not belong here. Required.
    pub url: String,
    /// Template of each message's subject, e.g. `partners.{partner}.rules.{subject}`.
    /// Placeholders: `{id}` `{type}` `{version}` `{subject}` `{revision}` `{source}` `{partner}`
    /// `{route}` `{index}` `{output.<field>}`; `{{` and `}}` are literal braces. A JetStream
    /// stream must capture every rendered subject. Required.
    pub subject: String,
    /// The stream the subjects must land in. When set, the healthcheck checks that it exists and
    /// every message carries `Nats-Expected-Stream`, so the server refuses a message that
    /// another stream would capture. Default: none (whichever stream captures the subject).
    #[serde(default)]
    pub stream: Option<String>,
    /// TLS settings; setting the table requires TLS even for a `nats://` URL. Default: none
    /// (TLS only for `tls://`, trusting the system's roots).
    #[serde(default)]
    pub tls: Option<NatsTls>,
    /// A NATS credentials file's contents (user JWT and NKey seed, as `nsc` writes them),
    /// `{ file = "…" }` or `{ env = "…" }`. Default: none.
    #[serde(default)]
    pub credentials: Option<SecretSource>,
    /// An NKey seed (`SU…`), `{ file = "…" }` or `{ env = "…" }`. Default: none.
    #[serde(default)]
    pub nkey: Option<SecretSource>,
    /// An authentication token, `{ file = "…" }` or `{ env = "…" }`. Default: none.
    #[serde(default)]
    pub token: Option<SecretSource>,
    /// A user name, `{ file = "…" }` or `{ env = "…" }`; needs `password`. Default: none.
    #[serde(default)]
    pub user: Option<SecretSource>,
    /// The password of `user`, `{ file = "…" }` or `{ env = "…" }`. Default: none.
    #[serde(default)]
    pub password: Option<SecretSource>,
    /// How long an apply waits for the stream's PubAck of all its messages, in milliseconds;
    /// no PubAck in time is retried (and a retry within the stream's duplicate window is
    /// dropped by the server if the first copy was stored after all). Default: 10000.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// How long one connection attempt (TCP, TLS, handshake) may take, in seconds. Default: 10.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
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

/// TLS settings of a `nats` sink.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsTls {
    /// A PEM file with the CA certificate(s) to trust for the server instead of the system's
    /// roots. Default: the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// A PEM client certificate chain to present to the server; needs `key`. Default: none.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// The PEM private key of `cert`. Default: none.
    #[serde(default)]
    pub key: Option<PathBuf>,
}

pub(super) fn default_timeout_ms() -> u64 {
    10_000
}

pub(super) fn default_connect_timeout() -> u64 {
    10
}

pub(super) fn default_reconnect_initial() -> u64 {
    100
}

pub(super) fn default_reconnect_max() -> u64 {
    10_000
}

/// The server address parsed from `url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Server {
    pub(super) host: String,
    pub(super) port: u16,
    /// `tls://`: TLS is required.
    pub(super) tls: bool,
}

impl std::fmt::Display for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "tls" } else { "nats" };
        write!(f, "{scheme}://{}:{}", self.host, self.port)
    }
}

/// How `url` is written.
const URL: client::UrlForm = client::UrlForm {
    plain: "nats",
    tls: "tls",
    ports: (4222, 4222),
    example: "write it like nats://nats.example:4222 or tls://nats.example:4222",
    credentials: "user and password, token, nkey or credentials",
    path: None,
    protocol: "NATS",
};

pub(super) fn parse_url(url: &str) -> Result<Server, String> {
    let client::Address { host, port, tls } = client::parse_url(url, &URL)?;
    Ok(Server { host, port, tls })
}

pub(super) use crate::sink::client::shown;

/// Checks a rendered subject: tokens separated by `.`, none empty, no white space or control
/// character, no wildcard (`*`, `>`, which only subscriptions and stream filters use), and not
/// in the `$` namespace the server keeps for itself (`$JS`, `$SYS`).
pub fn check_subject(subject: &str) -> Result<(), String> {
    if subject.is_empty() {
        return Err("the rendered subject is empty: check the values the template uses".into());
    }
    if subject.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "the rendered subject {} contains white space or a control character, which NATS \
             subjects cannot hold: check the values the template uses",
            shown(subject)
        ));
    }
    if let Some(wildcard) = subject.chars().find(|&c| c == '*' || c == '>') {
        return Err(format!(
            "the rendered subject {} contains the wildcard {wildcard:?}, which only \
             subscriptions and stream filters may use: check the values the template uses",
            shown(subject)
        ));
    }
    if subject.split('.').any(str::is_empty) {
        return Err(format!(
            "the rendered subject {} has an empty token (.. or a . at the start or end): check \
             the values the template uses",
            shown(subject)
        ));
    }
    if subject.starts_with('$') {
        return Err(format!(
            "the rendered subject {} starts with $, which the server keeps for its own APIs \
             ($JS, $SYS): start the template with a fixed token",
            shown(subject)
        ));
    }
    Ok(())
}

/// Checks a stream name as JetStream accepts it.
fn check_stream_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.chars().any(|c| {
            c.is_whitespace() || c.is_control() || matches!(c, '.' | '*' | '>' | '/' | '\\')
        })
    {
        return Err(format!(
            "{name:?} is not a stream name: use letters, digits, - and _ (no ., *, >, / or \
             white space), like \"RULES\""
        ));
    }
    Ok(())
}

impl NatsConfig {
    /// The authentication methods that are set, by key.
    fn auth_methods(&self) -> Vec<&'static str> {
        [
            ("credentials", self.credentials.is_some()),
            ("nkey", self.nkey.is_some()),
            ("token", self.token.is_some()),
            ("user", self.user.is_some()),
        ]
        .into_iter()
        .filter_map(|(k, set)| set.then_some(k))
        .collect()
    }
}

impl SinkSpec for NatsConfig {
    fn retry(&self) -> &RetryConfig {
        &self.retry
    }

    /// Resolves relative file paths (TLS files, secret files) against `base`.
    fn resolve_paths(&mut self, base: &Path) {
        if let Some(tls) = &mut self.tls {
            client::resolve_files(base, [&mut tls.ca_file, &mut tls.cert, &mut tls.key]);
        }
        client::resolve_secrets(
            base,
            [
                &mut self.credentials,
                &mut self.nkey,
                &mut self.token,
                &mut self.user,
                &mut self.password,
            ],
        );
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
        if let Err(message) = parse_url(&self.url) {
            bad("url", message);
        }
        match Template::parse(&self.subject) {
            Err(message) => bad("subject", message),
            Ok(template) => {
                // Every placeholder as a plain word: only the literal parts are checked, so
                // `a.>` or `a..{id}` is refused here rather than as a dead letter per event.
                let sample = template.render_with(|_| Ok("x".into())).unwrap_or_default();
                if let Err(e) = check_subject(&sample) {
                    bad(
                        "subject",
                        format!(
                            "{:?} can never render a valid subject ({e}); write it like \
                             \"partners.{{partner}}.rules.{{subject}}\"",
                            self.subject
                        ),
                    );
                }
            }
        }
        if let Some(stream) = &self.stream
            && let Err(message) = check_stream_name(stream)
        {
            bad("stream", message);
        }
        client::check_secrets(
            &mut bad,
            [
                ("credentials", &self.credentials),
                ("nkey", &self.nkey),
                ("token", &self.token),
                ("user", &self.user),
                ("password", &self.password),
            ],
        );
        let methods = self.auth_methods();
        if methods.len() > 1 {
            bad(
                methods[1],
                format!(
                    "only one way to authenticate can be set, and {} are: keep one of {}",
                    methods.len(),
                    methods.join(", ")
                ),
            );
        }
        client::check_together(
            &mut bad,
            ("user", self.user.is_some()),
            ("password", self.password.is_some()),
        );
        if let Some(tls) = &self.tls {
            client::check_together(
                &mut bad,
                ("tls.cert", tls.cert.is_some()),
                ("tls.key", tls.key.is_some()),
            );
        }
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
        push_secret(&mut sources, "credentials", &self.credentials);
        push_secret(&mut sources, "nkey", &self.nkey);
        push_secret(&mut sources, "token", &self.token);
        push_secret(&mut sources, "user", &self.user);
        push_secret(&mut sources, "password", &self.password);
        if let Some(key) = self.tls.as_ref().and_then(|t| t.key.as_deref()) {
            sources.push(("tls.key".into(), SecretOrFile::File(key)));
        }
        sources
    }

    fn build(&self, context: &BuildContext<'_>) -> Result<Arc<dyn Sink>, Problem> {
        Ok(Arc::new(
            super::NatsSink::new(self, context.name).map_err(|m| context.problem(m))?,
        ))
    }
}
