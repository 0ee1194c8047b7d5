//! The `redis` sink: adds each output record to a Redis stream (`XADD`) and reports the event
//! applied only once Redis has answered that the entries are in (docs/sinks/redis.md).
//!
//! # At most one addition per event and route
//!
//! All entries of one event go in through one Lua script ([`SCRIPT`]), which Redis runs
//! atomically: it looks for the record that the event was added on this route (a string key
//! with the entries' ids and a time to live, `dedup_ttl_secs`); when the record is there it adds
//! nothing, otherwise it adds every entry and writes the record. A retry after an answer that
//! never arrived (a lost connection, a timeout) therefore finds the record and adds nothing
//! twice; the record and the entries replicate together, since a script's writes reach replicas
//! and the append-only file as one transaction. The script is sent by its SHA-1 (`EVALSHA`) and
//! in full (`EVAL`) only when the server does not know it yet (`NOSCRIPT`, after a restart).
//!
//! # Durability
//!
//! "Applied" means the primary's memory holds the entries. What survives a crash of the server
//! is Redis' own business (`appendonly yes` with `appendfsync always` puts each write on disk
//! before the answer); `wait_replicas` adds `WAIT` in the same pipeline, on the same connection,
//! so the event counts as applied only once that many replicas have the entries.
//!
//! # Connection
//!
//! One multiplexed connection per sink (the client's `ConnectionManager`), shared by all
//! applies, opened at the first apply or healthcheck, re-established with exponential backoff
//! (`reconnect_initial_ms` … `reconnect_max_ms`) when it breaks. Each apply is bounded by
//! `timeout_ms`.
//!
//! # Error classification
//!
//! By error kind and the server's error code, never by message text ([`classify`]):
//! permanent are refused credentials (`WRONGPASS`, `NOAUTH`), a user the ACL denies the script's
//! commands or keys (`NOPERM`), a key that holds something else than a stream (`WRONGTYPE`) and
//! an output the sink cannot write (a stream key that cannot be rendered, `output_as = "fields"`
//! with a nested value); everything else (connection refused or lost, timeouts, TLS failures,
//! `OOM`, `LOADING`, `BUSY`, `READONLY` during a failover, replicas that did not confirm) is
//! retried.

mod config;
mod entry;

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{ErrorKind, IntoConnectionInfo, RedisError, ServerErrorKind, TlsCertificates, Value};
use serde_json::Value as Json;

pub use config::{OutputAs, RedisConfig};

use super::client;
use super::template::Template;
use super::{EventMeta, Sink, SinkError};
use crate::http_client::{ClientTls, client_config};
use crate::settings::read_secret;
use crate::sink::SinkSpec;
use config::{Server, parse_url};
use entry::{Entry, dedup_key, entries};

/// The script that adds an event's entries at most once (see the module documentation).
pub const SCRIPT: &str = include_str!("add.lua");

/// The most fields one entry may have: the script passes them to `XADD` as arguments, and Lua
/// limits how many a call takes.
const MAX_FIELDS: usize = 1000;

/// The `redis` sink.
pub struct RedisSink {
    name: String,
    server: Server,
    stream: Template,
    output_as: OutputAs,
    maxlen: u64,
    maxlen_approximate: bool,
    dedup_ttl_ms: u64,
    dedup_prefix: String,
    wait: Option<(u32, u64)>,
    timeout: Duration,
    client: ::redis::Client,
    manager_config: ConnectionManagerConfig,
    /// Made at the first apply or healthcheck: building the sink opens no connection, so that
    /// `ess-agent validate` stays offline.
    manager: Mutex<Option<ConnectionManager>>,
    script: ::redis::Script,
    /// Whether the last exchange with the server went through, so that a lost connection and
    /// its return are logged once each rather than by every apply.
    reachable: AtomicBool,
}

impl std::fmt::Debug for RedisSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSink")
            .field("name", &self.name)
            .field("server", &self.server.to_string())
            .field("stream", &self.stream.text())
            .finish_non_exhaustive()
    }
}

impl RedisSink {
    /// Builds the sink: reads the credentials and TLS files. Opens no connection. `name` is the
    /// sink's name, for logs.
    pub fn new(config: &RedisConfig, name: &str) -> Result<RedisSink, String> {
        if let Some(problem) = config.validate("").into_iter().next() {
            return Err(format!(
                "{}: {}",
                problem.key.trim_start_matches('.'),
                problem.message
            ));
        }
        let server = parse_url(&config.url).map_err(|e| format!("url: {e}"))?;
        let stream = Template::parse(&config.stream).map_err(|e| format!("stream: {e}"))?;
        let info = config
            .url
            .as_str()
            .into_connection_info()
            .map_err(|e| format!("url: {e}"))?;
        // No CLIENT SETINFO at connect: one command less for the user's ACL to allow.
        let mut settings = info.redis_settings().clone().set_skip_set_lib_name();
        if let Some(user) = &config.username {
            settings =
                settings.set_username(read_secret(user).map_err(|e| format!("username: {e}"))?);
        }
        if let Some(password) = &config.password {
            settings =
                settings.set_password(read_secret(password).map_err(|e| format!("password: {e}"))?);
        }
        let info = info.set_redis_settings(settings);
        let client = if server.tls && (config.ca_file.is_some() || config.client_cert.is_some()) {
            // Parsed here for errors that name the file; the client reads the PEM itself.
            let client_cert = config
                .client_cert
                .as_deref()
                .zip(config.client_key.as_deref());
            client_config(&ClientTls {
                ca_file: config.ca_file.as_deref(),
                client_cert,
            })
            .map_err(|e| format!("TLS: {e}"))?;
            let read = |path: &std::path::Path| {
                std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
            };
            let root_cert = config.ca_file.as_deref().map(read).transpose()?;
            let client_tls = match client_cert {
                Some((cert, key)) => Some(::redis::ClientTlsConfig {
                    client_cert: read(cert)?,
                    client_key: read(key)?,
                }),
                None => None,
            };
            ::redis::Client::build_with_tls(
                info,
                TlsCertificates {
                    client_tls,
                    root_cert,
                },
            )
        } else {
            ::redis::Client::open(info)
        }
        .map_err(|e| format!("url: {e}"))?;
        let timeout = Duration::from_millis(config.timeout_ms);
        let manager_config = ConnectionManagerConfig::new()
            .set_min_delay(Duration::from_millis(config.reconnect_initial_ms))
            .set_max_delay(Duration::from_millis(config.reconnect_max_ms))
            .set_exponent_base(2.0)
            // A few attempts per reconnection; after them the waiting applies fail with the
            // reason (retried by the dispatcher) and the next apply starts a new round.
            .set_number_of_retries(3)
            .set_connection_timeout(Some(Duration::from_millis(config.connect_timeout_ms)))
            .set_response_timeout(Some(timeout));
        Ok(RedisSink {
            name: name.to_string(),
            server,
            stream,
            output_as: config.output_as,
            maxlen: config.maxlen.unwrap_or(0),
            maxlen_approximate: config.maxlen_approximate,
            dedup_ttl_ms: config.dedup_ttl_secs.saturating_mul(1000),
            dedup_prefix: config.dedup_prefix.clone(),
            wait: (config.wait_replicas > 0)
                .then_some((config.wait_replicas, config.wait_timeout_ms)),
            timeout,
            client,
            manager_config,
            manager: Mutex::new(None),
            script: ::redis::Script::new(SCRIPT),
            reachable: AtomicBool::new(true),
        })
    }

    /// The shared connection, made on first use.
    fn connection(&self) -> Result<ConnectionManager, SinkError> {
        let mut manager = self.manager.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(manager) = &*manager {
            return Ok(manager.clone());
        }
        let made = ConnectionManager::new_lazy_with_config(
            self.client.clone(),
            self.manager_config.clone(),
        )
        .map_err(|e| classify(&e, &self.server))?;
        *manager = Some(made.clone());
        Ok(made)
    }

    /// The keys and arguments of the script for one event.
    fn invocation(&self, event: &EventMeta, entries: &[Entry]) -> (Vec<String>, Vec<String>) {
        let mut keys = Vec::with_capacity(entries.len() + 1);
        keys.push(dedup_key(&self.dedup_prefix, event));
        let mut args = vec![
            self.dedup_ttl_ms.to_string(),
            self.maxlen.to_string(),
            if self.maxlen_approximate { "~" } else { "=" }.to_string(),
        ];
        for entry in entries {
            keys.push(entry.stream.clone());
            args.push(entry.fields.len().to_string());
            for (name, value) in &entry.fields {
                args.push(name.clone());
                args.push(value.clone());
            }
        }
        (keys, args)
    }

    /// Runs the script (and `WAIT`), without the overall timeout.
    async fn add(
        &self,
        event: &EventMeta,
        keys: &[String],
        args: &[String],
    ) -> Result<(), SinkError> {
        let mut connection = self.connection()?;
        let mut in_full = false;
        loop {
            let mut pipe = ::redis::pipe();
            pipe.ignore_errors();
            if in_full {
                pipe.cmd("EVAL").arg(SCRIPT);
            } else {
                pipe.cmd("EVALSHA").arg(self.script.get_hash());
            }
            pipe.arg(keys.len()).arg(keys).arg(args);
            if let Some((replicas, wait_ms)) = self.wait {
                pipe.cmd("WAIT").arg(replicas).arg(wait_ms);
            }
            let replies: Vec<Value> = pipe
                .query_async(&mut connection)
                .await
                .map_err(|e| classify(&e, &self.server))?;
            let mut replies = replies.into_iter();
            let (added, ids) = match replies.next() {
                Some(Value::ServerError(e)) => {
                    let e = RedisError::from(e);
                    if !in_full && e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) {
                        in_full = true;
                        continue;
                    }
                    return Err(classify(&e, &self.server));
                }
                Some(reply) => script_reply(reply)?,
                None => return Err(unexpected("no answer to the script")),
            };
            if added {
                tracing::debug!(sink = %self.name, event_id = %event.id, route = %event.route, ids = %ids, "redis entries added");
            } else {
                tracing::info!(sink = %self.name, event_id = %event.id, route = %event.route, ids = %ids, "already applied: redis holds the record that this event was added; nothing added again");
            }
            if let Some((wanted, wait_ms)) = self.wait {
                match replies.next() {
                    Some(Value::Int(confirmed)) if confirmed >= i64::from(wanted) => {}
                    Some(Value::Int(confirmed)) => {
                        return Err(SinkError::Retryable(format!(
                            "the entries are on the redis primary at {}, but only {confirmed} of \
                             {wanted} replicas confirmed them within wait_timeout_ms ({wait_ms} \
                             ms): check the replicas (INFO replication); the retry adds \
                             nothing again and waits anew",
                            self.server
                        )));
                    }
                    Some(Value::ServerError(e)) => {
                        return Err(classify(&RedisError::from(e), &self.server));
                    }
                    _ => return Err(unexpected("no number of replicas from WAIT")),
                }
            }
            return Ok(());
        }
    }

    /// Notes whether the server answered, logging a change.
    fn note(&self, result: &Result<(), SinkError>) {
        let ok = !matches!(result, Err(e) if e.is_retryable());
        if self.reachable.swap(ok, Ordering::Relaxed) == ok {
            return;
        }
        match result {
            Err(e) if !ok => {
                tracing::warn!(sink = %self.name, server = %self.server, error = %e, "redis connection failed")
            }
            _ => tracing::info!(sink = %self.name, server = %self.server, "redis connected"),
        }
    }
}

/// Reads the script's answer `{added, ids}`.
fn script_reply(reply: Value) -> Result<(bool, String), SinkError> {
    let Value::Array(items) = reply else {
        return Err(unexpected("the script answered something else than a list"));
    };
    match items.as_slice() {
        [Value::Int(added), ids] => {
            let ids = match ids {
                Value::BulkString(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                Value::SimpleString(text) => text.clone(),
                _ => String::new(),
            };
            Ok((*added == 1, ids))
        }
        _ => Err(unexpected("the script answered an unexpected list")),
    }
}

fn unexpected(what: &str) -> SinkError {
    SinkError::Retryable(format!(
        "redis answered unexpectedly ({what}): is url a Redis server (version 5 or later)?"
    ))
}

/// Classifies an error by its kind and the server's error code.
fn classify(error: &RedisError, server: &Server) -> SinkError {
    let detail = || error.detail().unwrap_or_default().to_string();
    match error.kind() {
        ErrorKind::AuthenticationFailed => SinkError::Permanent(format!(
            "redis at {server} refused the credentials: check username and password (ACL LIST \
             on the server shows its users)"
        )),
        ErrorKind::InvalidClientConfig => {
            SinkError::Permanent(format!("the redis client refused its settings: {error}"))
        }
        ErrorKind::Server(ServerErrorKind::NoPerm) => SinkError::Permanent(format!(
            "redis at {server} does not allow this user what the sink needs ({}): grant it \
             +evalsha +eval +get +set +type +xadd +wait +ping on the stream and record keys \
             (docs/sinks/redis.md)",
            detail()
        )),
        ErrorKind::Server(ServerErrorKind::ReadOnly) => SinkError::Retryable(format!(
            "redis at {server} is a read-only replica ({}): point url at the primary (retrying, \
             since a failover may be under way)",
            detail()
        )),
        ErrorKind::Server(
            ServerErrorKind::BusyLoading
            | ServerErrorKind::TryAgain
            | ServerErrorKind::MasterDown
            | ServerErrorKind::ClusterDown,
        ) => SinkError::Retryable(format!(
            "redis at {server} is not ready ({}): retrying",
            error
        )),
        ErrorKind::Extension => match error.code().unwrap_or_default() {
            "WRONGPASS" | "NOAUTH" => SinkError::Permanent(format!(
                "redis at {server} refused the credentials ({}): check username and password",
                error
            )),
            "WRONGTYPE" => SinkError::Permanent(format!(
                "{}: rename the stream (the stream template) or remove the key that is in the \
                 way, then retry the dead letter",
                detail()
            )),
            "OOM" => SinkError::Retryable(format!(
                "redis at {server} is out of memory ({}): raise maxmemory, or have the readers \
                 trim the streams (or set maxlen); retrying",
                detail()
            )),
            _ => SinkError::Retryable(format!("redis at {server} answered an error: {error}")),
        },
        ErrorKind::Io => {
            if let Some(tls) = client::rustls_error(error) {
                return SinkError::Retryable(format!(
                    "TLS handshake with redis at {server} failed ({tls}): {}",
                    client::tls_advice(tls, &client::BROKER_KEYS)
                ));
            }
            let advice = if error.is_connection_refusal() {
                ": is it running and listening on this port?"
            } else if error.is_timeout() {
                ": the entries may or may not be in; the retry adds them at most once"
            } else if server.tls {
                ": if this persists, check ca_file, client_cert and that the server speaks TLS \
                 on this port"
            } else {
                ""
            };
            SinkError::Retryable(format!("cannot reach redis at {server}: {error}{advice}"))
        }
        _ => SinkError::Retryable(format!("redis at {server}: {error}")),
    }
}

#[async_trait::async_trait]
impl Sink for RedisSink {
    async fn apply(&self, event: &EventMeta, output: &Json) -> Result<(), SinkError> {
        let entries =
            entries(&self.stream, self.output_as, event, output).map_err(SinkError::Permanent)?;
        if entries.is_empty() {
            return Ok(());
        }
        if let Some(entry) = entries.iter().find(|e| e.fields.len() > MAX_FIELDS) {
            return Err(SinkError::Permanent(format!(
                "an entry for {} would have {} fields, more than the sink's limit of \
                 {MAX_FIELDS}: return fewer fields, or use output_as = \"payload\"",
                entry.stream,
                entry.fields.len()
            )));
        }
        let (keys, args) = self.invocation(event, &entries);
        let result = match tokio::time::timeout(self.timeout, self.add(event, &keys, &args)).await {
            Ok(result) => result,
            Err(_) => Err(SinkError::Retryable(format!(
                "redis at {} did not answer within timeout_ms ({} ms): the entries may or may \
                 not be in; the retry adds them at most once",
                self.server,
                self.timeout.as_millis()
            ))),
        };
        self.note(&result);
        result
    }

    async fn healthcheck(&self) -> Result<(), SinkError> {
        let mut connection = self.connection()?;
        let ping = async {
            ::redis::cmd("PING")
                .query_async::<String>(&mut connection)
                .await
                .map(|_| ())
                .map_err(|e| classify(&e, &self.server))
        };
        let result = match tokio::time::timeout(self.timeout, ping).await {
            Ok(result) => result,
            Err(_) => Err(SinkError::Retryable(format!(
                "redis at {} did not answer PING within timeout_ms ({} ms)",
                self.server,
                self.timeout.as_millis()
            ))),
        };
        self.note(&result);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server() -> Server {
        parse_url("redis://127.0.0.1:6379").unwrap()
    }

    fn server_error(code: &str, detail: &str) -> RedisError {
        // The client's own parser, as the connection would produce it.
        let frame = format!("-{code} {detail}\r\n");
        match ::redis::parse_redis_value(frame.as_bytes()).unwrap() {
            Value::ServerError(e) => RedisError::from(e),
            other => panic!("not an error: {other:?}"),
        }
    }

    #[test]
    fn server_errors_are_classified_by_code() {
        let permanent = ["WRONGPASS", "NOAUTH", "WRONGTYPE", "NOPERM"];
        let retryable = [
            "OOM",
            "LOADING",
            "BUSY",
            "READONLY",
            "MASTERDOWN",
            "ERR",
            "TRYAGAIN",
        ];
        for code in permanent {
            let e = classify(&server_error(code, "something"), &server());
            assert!(matches!(e, SinkError::Permanent(_)), "{code}: {e:?}");
        }
        for code in retryable {
            let e = classify(&server_error(code, "something"), &server());
            assert!(e.is_retryable(), "{code}: {e:?}");
        }
        let e = classify(
            &server_error("WRONGTYPE", "the key s holds a string, not a stream"),
            &server(),
        );
        assert!(
            e.to_string().contains("the key s holds a string") && e.to_string().contains("rename"),
            "{e}"
        );
    }

    #[test]
    fn client_side_failures_are_classified_by_kind() {
        let refused = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        let e = classify(&refused, &server());
        assert!(
            e.is_retryable() && e.to_string().contains("is it running"),
            "{e}"
        );
        let timeout = RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut));
        assert!(
            classify(&timeout, &server())
                .to_string()
                .contains("at most once")
        );
        let auth = RedisError::from((
            ErrorKind::AuthenticationFailed,
            "Password authentication failed",
        ));
        assert!(matches!(
            classify(&auth, &server()),
            SinkError::Permanent(_)
        ));
    }

    #[test]
    fn script_replies_are_read_and_anything_else_is_retried() {
        let reply = Value::Array(vec![Value::Int(1), Value::BulkString(b"1-0 1-1".to_vec())]);
        assert_eq!(script_reply(reply).unwrap(), (true, "1-0 1-1".to_string()));
        let reply = Value::Array(vec![Value::Int(0), Value::BulkString(b"1-0".to_vec())]);
        assert_eq!(script_reply(reply).unwrap(), (false, "1-0".to_string()));
        assert!(script_reply(Value::Okay).unwrap_err().is_retryable());
    }

    #[test]
    fn the_invocation_lists_the_record_then_each_stream_and_its_fields() {
        let config: RedisConfig = toml::from_str(
            "url = \"redis://127.0.0.1\"\nstream = \"s:{output.k}\"\nmaxlen = 50\n\
             dedup_ttl_secs = 86400\n",
        )
        .unwrap();
        let sink = RedisSink::new(&config, "r").unwrap();
        let event = EventMeta {
            id: "e1".into(),
            event_type: "t".into(),
            version: 1,
            subject: "s".into(),
            revision: None,
            source: None,
            route: "route".into(),
            partner: "p".into(),
            received_at_ms: 1_796_601_600_000,
        };
        let out = entries(
            &sink.stream,
            sink.output_as,
            &event,
            &serde_json::json!([{"k": "a"}, {"k": "b"}]),
        )
        .unwrap();
        let (keys, args) = sink.invocation(&event, &out);
        assert_eq!(keys, ["ess:applied:p:route:e1", "s:a", "s:b"]);
        assert_eq!(&args[..4], ["86400000", "50", "~", "7"]);
        assert_eq!(args.len(), 3 + 2 * (1 + 2 * 7));
    }
}
