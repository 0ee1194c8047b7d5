//! The `redis` sink's configuration: the serde type, its pure checks and path resolution.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use std::sync::Arc;

use super::super::template::Template;
use super::super::{BuildContext, SecretOrFile, Sink, SinkSpec, client, push_secret};
use crate::settings::{Problem, RetryConfig, SecretSource};

/// How a record's output goes into its stream entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputAs {
    /// One field `payload` holding the record as compact JSON.
    #[default]
    Payload,
    /// One field per key of the record, which must be an object of scalars: strings as they
    /// are, numbers and booleans as their JSON text, null keys left out.
    Fields,
}

/// Configuration of a `redis` sink.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// The server, `redis://host[:port][/db]` (default port 6379, database 0) or
    /// `rediss://host[:port][/db]` for TLS. Credentials do not belong here: use `username` and
    /// `password`. Required.
    pub url: String,
    /// Template of each entry's stream key, e.g. `rules:{type}`. Placeholders: `{id}` `{type}`
    /// `{version}` `{subject}` `{revision}` `{source}` `{partner}` `{route}` `{index}`
    /// `{output.<field>}`; `{{` and `}}` are literal braces. Required.
    pub stream: String,
    /// `"payload"`: the record as JSON in the field `payload`; `"fields"`: an object of scalars
    /// as one field per key. Default: `"payload"`.
    #[serde(default)]
    pub output_as: OutputAs,
    /// Trim each stream to about this many entries as entries are added (`XADD … MAXLEN`).
    /// Default: none (streams grow until their readers trim them).
    #[serde(default)]
    pub maxlen: Option<u64>,
    /// Trim with `MAXLEN ~` (whole macro nodes, cheap, the stream may hold a little more than
    /// `maxlen`) rather than `MAXLEN =` (exact). Default: true.
    #[serde(default = "default_true")]
    pub maxlen_approximate: bool,
    /// How long the record that an event was added is kept, in seconds: within it a retry or
    /// a replay of the same event on the same route adds nothing. Default: 604800 (7 days).
    #[serde(default = "default_dedup_ttl")]
    pub dedup_ttl_secs: u64,
    /// The prefix of those records' keys; the key is
    /// `<prefix><agent id>:<route>:<event id>`. Default: `"ess:applied:"`.
    #[serde(default = "default_dedup_prefix")]
    pub dedup_prefix: String,
    /// After adding, wait until this many replicas have the entry (`WAIT`); fewer within
    /// `wait_timeout_ms` is retried. Default: 0 (the primary's answer is enough).
    #[serde(default)]
    pub wait_replicas: u32,
    /// How long `WAIT` waits for the replicas, in milliseconds; must be below `timeout_ms`.
    /// Default: 1000.
    #[serde(default = "default_wait_timeout")]
    pub wait_timeout_ms: u64,
    /// The ACL user name, `{ file = "…" }` or `{ env = "…" }`; needs `password`. Default: none
    /// (the `default` user).
    #[serde(default)]
    pub username: Option<SecretSource>,
    /// The password, `{ file = "…" }` or `{ env = "…" }` (with `username`, that user's; alone,
    /// the `default` user's, as `requirepass` sets it). Read at start and at every reload;
    /// never logged. Default: none.
    #[serde(default)]
    pub password: Option<SecretSource>,
    /// `rediss` only: a PEM file with the CA certificate(s) to trust for the server instead of
    /// the system's roots. Relative paths are resolved against the configuration file's
    /// directory. Default: the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// `rediss` only: a PEM client certificate chain to present; needs `client_key`. Default:
    /// none.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// `rediss` only: the PEM private key of `client_cert`. Default: none.
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    /// How long one apply may take in all (connecting, the script, `WAIT`), in milliseconds;
    /// longer is retried. Default: 10000.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// How long one connection attempt (TCP, TLS, authentication) may take, in milliseconds.
    /// Default: 5000.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
    /// The first delay before reconnecting after the connection was lost, in milliseconds; it
    /// doubles with every further failure. Default: 100.
    #[serde(default = "default_reconnect_initial")]
    pub reconnect_initial_ms: u64,
    /// The longest delay between reconnection attempts, in milliseconds. Default: 2000.
    #[serde(default = "default_reconnect_max")]
    pub reconnect_max_ms: u64,
    /// Retry policy for retryable failures. Default: see [`RetryConfig`].
    #[serde(default)]
    pub retry: RetryConfig,
}

fn default_true() -> bool {
    true
}
fn default_dedup_ttl() -> u64 {
    7 * 86_400
}
fn default_dedup_prefix() -> String {
    "ess:applied:".into()
}
fn default_wait_timeout() -> u64 {
    1000
}
fn default_timeout_ms() -> u64 {
    10_000
}
fn default_connect_timeout() -> u64 {
    5000
}
fn default_reconnect_initial() -> u64 {
    100
}
fn default_reconnect_max() -> u64 {
    2000
}

/// The server address parsed from `url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub host: String,
    pub port: u16,
    pub db: i64,
    pub tls: bool,
}

impl std::fmt::Display for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "rediss" } else { "redis" };
        write!(f, "{scheme}://{}:{}/{}", self.host, self.port, self.db)
    }
}

/// Parses `url`: scheme, host, port and database, nothing else.
pub fn parse_url(url: &str) -> Result<Server, String> {
    let example = "write it like redis://127.0.0.1:6379 or rediss://redis.example:6380/0";
    let parsed =
        url::Url::parse(url).map_err(|e| format!("{url:?} is not a valid URL ({e}): {example}"))?;
    let tls = match parsed.scheme() {
        "redis" => false,
        "rediss" => true,
        _ => {
            return Err(format!(
                "{url:?} must start with redis:// or rediss://: {example}"
            ));
        }
    };
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(
            "the URL carries credentials: remove them and set username and password instead".into(),
        );
    }
    let host = match parsed.host_str() {
        Some(host) if !host.is_empty() => host.trim_start_matches('[').trim_end_matches(']'),
        _ => return Err(format!("{url:?} has no host: {example}")),
    };
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(format!(
            "{url:?} has a query or fragment, which the sink does not read: {example}"
        ));
    }
    let db = match parsed.path().trim_start_matches('/') {
        "" => 0,
        db => db
            .parse::<i64>()
            .ok()
            .filter(|db| *db >= 0)
            .ok_or_else(|| {
                format!("{url:?}: the path must be a database number, like /0: {example}")
            })?,
    };
    Ok(Server {
        host: host.to_string(),
        port: parsed.port().unwrap_or(6379),
        db,
        tls,
    })
}

/// The longest stream key the sink writes, in bytes: Redis takes far longer keys, but a key
/// this long is a template gone wrong.
pub const MAX_KEY: usize = 1024;

/// Checks a rendered stream key.
pub fn check_stream(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("the rendered stream key is empty: check the values the template uses".into());
    }
    if key.len() > MAX_KEY {
        return Err(format!(
            "the rendered stream key is {} bytes, more than the sink's limit of {MAX_KEY}: check \
             the values the template uses",
            key.len()
        ));
    }
    if key.chars().any(char::is_control) {
        return Err(format!(
            "the rendered stream key {key:?} contains a control character: check the values the \
             template uses"
        ));
    }
    Ok(())
}

impl SinkSpec for RedisConfig {
    fn retry(&self) -> &RetryConfig {
        &self.retry
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
            super::RedisSink::new(self, context.name).map_err(|m| context.problem(m))?,
        ))
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
        let server = parse_url(&self.url);
        if let Err(message) = &server {
            bad("url", message.clone());
        }
        match Template::parse(&self.stream) {
            Err(message) => bad("stream", message),
            Ok(template) => {
                let sample = template.render_with(|_| Ok("x".into())).unwrap_or_default();
                if let Err(e) = check_stream(&sample) {
                    bad(
                        "stream",
                        format!(
                            "{:?} can never render a valid stream key ({e}); write it like \
                             \"rules:{{type}}\"",
                            self.stream
                        ),
                    );
                }
            }
        }
        if self.maxlen == Some(0) {
            bad(
                "maxlen",
                "must be at least 1; remove it to leave the streams untrimmed".into(),
            );
        }
        if self.maxlen.is_none() && !self.maxlen_approximate {
            bad(
                "maxlen_approximate",
                "applies only with maxlen: set maxlen, or remove it".into(),
            );
        }
        if self.dedup_ttl_secs == 0 {
            bad(
                "dedup_ttl_secs",
                "must be at least 1: without the record a retry after a lost answer adds a \
                 second entry (the default is 604800, 7 days)"
                    .into(),
            );
        } else if self.retry.max_age_secs == 0 || self.dedup_ttl_secs < self.retry.max_age_secs {
            bad(
                "dedup_ttl_secs",
                format!(
                    "must be at least retry.max_age_secs ({}), so that no retry comes after \
                     the record that an event was added has expired; set retry.max_age_secs \
                     to a limit (the default is 86400) or raise dedup_ttl_secs",
                    if self.retry.max_age_secs == 0 {
                        "0, no limit".to_string()
                    } else {
                        self.retry.max_age_secs.to_string()
                    }
                ),
            );
        }
        if self.dedup_prefix.chars().any(char::is_control) {
            bad(
                "dedup_prefix",
                "must not contain control characters (the default is \"ess:applied:\")".into(),
            );
        }
        if self.wait_replicas > 0 {
            if self.wait_timeout_ms == 0 {
                bad(
                    "wait_timeout_ms",
                    "must be at least 1: WAIT with 0 blocks until the replicas answer, however \
                     long (the default is 1000)"
                        .into(),
                );
            } else if self.wait_timeout_ms >= self.timeout_ms {
                bad(
                    "wait_timeout_ms",
                    format!(
                        "must be below timeout_ms ({}), which bounds the whole apply",
                        self.timeout_ms
                    ),
                );
            }
        }
        client::check_secrets(
            &mut bad,
            [("username", &self.username), ("password", &self.password)],
        );
        if self.username.is_some() && self.password.is_none() {
            bad(
                "username",
                "needs a password: set password too (Redis authenticates a user by its password)"
                    .into(),
            );
        }
        client::check_tls_files(
            &mut bad,
            matches!(&server, Ok(server) if !server.tls).then_some("a rediss://"),
            &self.ca_file,
            &self.client_cert,
            &self.client_key,
        );
        client::check_at_least_one(
            &mut bad,
            [
                ("timeout_ms", self.timeout_ms, default_timeout_ms()),
                (
                    "connect_timeout_ms",
                    self.connect_timeout_ms,
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> RedisConfig {
        toml::from_str(&format!(
            "url = \"redis://127.0.0.1\"\nstream = \"rules:{{type}}\"\n{extra}"
        ))
        .unwrap()
    }

    fn keys(config: &RedisConfig) -> Vec<String> {
        config
            .validate("sinks.r")
            .into_iter()
            .map(|p| p.key)
            .collect()
    }

    #[test]
    fn defaults_are_valid_and_documented_values() {
        let c = config("");
        assert!(keys(&c).is_empty(), "{:?}", c.validate("sinks.r"));
        assert_eq!(c.output_as, OutputAs::Payload);
        assert_eq!(c.dedup_ttl_secs, 604_800);
        assert_eq!(c.dedup_prefix, "ess:applied:");
        assert!(c.maxlen.is_none() && c.maxlen_approximate);
        assert_eq!((c.wait_replicas, c.wait_timeout_ms), (0, 1000));
        assert_eq!(c.timeout_ms, 10_000);
    }

    #[test]
    fn urls_give_host_port_database_and_tls() {
        assert_eq!(
            parse_url("redis://127.0.0.1").unwrap(),
            Server {
                host: "127.0.0.1".into(),
                port: 6379,
                db: 0,
                tls: false
            }
        );
        assert_eq!(
            parse_url("rediss://cache.example:6380/3").unwrap(),
            Server {
                host: "cache.example".into(),
                port: 6380,
                db: 3,
                tls: true
            }
        );
        assert_eq!(parse_url("redis://[::1]:7000").unwrap().host, "::1");
        for (url, needle) in [
            ("http://127.0.0.1", "must start with redis://"),
            ("redis://user:secret@127.0.0.1", "carries credentials"),
            ("redis://:secret@127.0.0.1", "carries credentials"),
            ("redis://127.0.0.1/x", "database number"),
            ("redis://127.0.0.1/-1", "database number"),
            ("redis://127.0.0.1/?db=1", "query"),
            ("redis:///0", "no host"),
            ("not a url", "not a valid URL"),
        ] {
            let e = parse_url(url).expect_err(url);
            assert!(e.contains(needle), "{url}: {e}");
        }
    }

    #[test]
    fn bad_keys_are_named_with_their_path() {
        let cases = [
            ("maxlen = 0", "sinks.r.maxlen"),
            ("maxlen_approximate = false", "sinks.r.maxlen_approximate"),
            ("dedup_ttl_secs = 0", "sinks.r.dedup_ttl_secs"),
            ("dedup_ttl_secs = 60", "sinks.r.dedup_ttl_secs"),
            ("retry = { max_age_secs = 0 }", "sinks.r.dedup_ttl_secs"),
            (
                "wait_replicas = 1\nwait_timeout_ms = 0",
                "sinks.r.wait_timeout_ms",
            ),
            (
                "wait_replicas = 1\nwait_timeout_ms = 10000",
                "sinks.r.wait_timeout_ms",
            ),
            ("username = { env = \"U\" }", "sinks.r.username"),
            (
                "password = { env = \"P\", file = \"p\" }",
                "sinks.r.password",
            ),
            ("password = {}", "sinks.r.password"),
            ("ca_file = \"ca.pem\"", "sinks.r.ca_file"),
            ("timeout_ms = 0", "sinks.r.timeout_ms"),
            ("connect_timeout_ms = 0", "sinks.r.connect_timeout_ms"),
            ("reconnect_max_ms = 10", "sinks.r.reconnect_max_ms"),
            ("dedup_prefix = \"a\\nb\"", "sinks.r.dedup_prefix"),
        ];
        for (extra, key) in cases {
            assert_eq!(keys(&config(extra)), vec![key.to_string()], "{extra}");
        }
        let c: RedisConfig =
            toml::from_str("url = \"rediss://h\"\nstream = \"s\"\nclient_cert = \"c.pem\"\n")
                .unwrap();
        assert_eq!(keys(&c), vec!["sinks.r.client_key".to_string()]);
        let c: RedisConfig = toml::from_str("url = \"ftp://h\"\nstream = \"s:{nope}\"\n").unwrap();
        assert_eq!(
            keys(&c),
            vec!["sinks.r.url".to_string(), "sinks.r.stream".to_string()]
        );
        let c: RedisConfig = toml::from_str("url = \"redis://h\"\nstream = \"\"\n").unwrap();
        assert_eq!(keys(&c), vec!["sinks.r.stream".to_string()]);
        // Valid combinations.
        for extra in [
            "password = { env = \"P\" }",
            "username = { env = \"U\" }\npassword = { file = \"p\" }",
            "maxlen = 1000\nmaxlen_approximate = false",
            "wait_replicas = 2\nwait_timeout_ms = 500",
            "output_as = \"fields\"",
            "retry = { max_age_secs = 3600 }\ndedup_ttl_secs = 3600",
        ] {
            assert!(keys(&config(extra)).is_empty(), "{extra}");
        }
    }

    #[test]
    fn unknown_keys_and_values_are_refused_by_name() {
        let e = toml::from_str::<RedisConfig>("url = \"redis://h\"\nstream = \"s\"\nmax_len = 5\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_len"), "{e}");
        let e = toml::from_str::<RedisConfig>(
            "url = \"redis://h\"\nstream = \"s\"\noutput_as = \"hash\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("hash"), "{e}");
    }

    #[test]
    fn relative_paths_resolve_against_the_configuration_directory() {
        let mut c: RedisConfig = toml::from_str(
            "url = \"rediss://h\"\nstream = \"s\"\nca_file = \"ca.pem\"\n\
             password = { file = \"pw\" }\nclient_cert = \"/abs/c.pem\"\nclient_key = \"k.pem\"\n",
        )
        .unwrap();
        c.resolve_paths(Path::new("/etc/ess"));
        assert_eq!(c.ca_file.unwrap(), Path::new("/etc/ess/ca.pem"));
        assert_eq!(c.client_cert.unwrap(), Path::new("/abs/c.pem"));
        assert_eq!(c.client_key.unwrap(), Path::new("/etc/ess/k.pem"));
        assert_eq!(c.password.unwrap().file.unwrap(), Path::new("/etc/ess/pw"));
    }
}
