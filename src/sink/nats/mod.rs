//! The `nats` sink: publishes each output record to a NATS JetStream subject and reports it
//! applied only once the stream has stored it (its PubAck).
//!
//! # What is published
//!
//! The output is split into records (an array gives one message per element, anything else one
//! message; an empty array publishes nothing). Each record's subject is rendered from the
//! `subject` template and checked before anything is published. The payload is a string output
//! as its text, anything else as compact JSON. Every message carries the header `Nats-Msg-Id`
//! = `<event id>:<route>:<record index>`, the event's fields as `Ess-*` headers, a
//! `Content-Type`, and `Nats-Expected-Stream` when `stream` is set.
//!
//! # The guarantee
//!
//! JetStream drops a message whose `Nats-Msg-Id` it has stored within the stream's duplicate
//! window (`duplicate_window`, two minutes by default) and acknowledges it with `duplicate:
//! true`, which counts as applied. A retry of a record (after a timeout, a lost connection, an
//! agent crash) therefore stores it once if it comes within the window: exactly once within the
//! duplicate window, at least once beyond it.
//!
//! # Connections
//!
//! The first apply or healthcheck starts a connection task that connects with backoff
//! (`reconnect_initial_ms` doubling to `reconnect_max_ms`). Once connected, the client reconnects
//! by itself with the same backoff and resends what it had buffered. A refusal of the credentials
//! is permanent: while the last attempt was refused, applies fail at once with the reason.
//!
//! # Error classification
//!
//! By type and JetStream error code, never by message text.
//!
//! - **Permanent**: no stream captures the subject (the server's "no responders", confirmed by
//!   asking JetStream which stream holds the subject), the configured `stream` does not exist or
//!   another stream captures the subject (error 10060), the message exceeds the server's
//!   `max_payload` or the stream's maximum message size (10054), a subject that cannot be
//!   published, credentials the server refuses.
//! - **Retryable**: connection refused or lost, DNS and TLS failures, no PubAck within
//!   `timeout_ms`, JetStream not answering, a stream that is full (10077) and other JetStream
//!   errors.

mod config;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_nats::connection::State as ConnectionState;
use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::context::{
    GetStreamByNameErrorKind, GetStreamErrorKind, PublishError, PublishErrorKind,
};
use async_nats::jetstream::message::PublishMessage;
use async_nats::{ConnectErrorKind, ConnectOptions, HeaderMap};
use bytes::Bytes;
use serde_json::Value;
use tokio::sync::Notify;
use tokio::time::{Instant, timeout, timeout_at};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::client::{Backoff, TlsKeys, rustls_error, tls_advice};
use super::template::{Record, Template, records};
use super::{EventMeta, Sink, SinkError};
use crate::http_client::{ClientTls, client_config};
use crate::settings::read_secret;
pub use config::{NatsConfig, NatsTls};
use config::{Server, check_subject, parse_url, shown};

const JSON: &str = "application/json";
const TEXT: &str = "text/plain; charset=utf-8";

/// How long a healthcheck waits for a first connection attempt's outcome, and for JetStream's
/// answer.
const HEALTH_WAIT: Duration = Duration::from_secs(5);

/// How long the check that follows a "no responders" may take.
const LOOKUP_WAIT: Duration = Duration::from_secs(3);

/// One message, ready to publish.
#[derive(Debug)]
struct Message {
    subject: String,
    headers: HeaderMap,
    payload: Bytes,
}

/// The message id JetStream de-duplicates on: the same for every attempt at one record.
fn message_id(event: &EventMeta, index: usize) -> String {
    format!("{}:{}:{index}", event.id, event.route)
}

/// How messages are made from an event's output.
struct Publishing {
    subject: Template,
    stream: Option<String>,
}

impl Publishing {
    /// Renders, checks and encodes every record. Pure: nothing is published.
    fn messages(&self, event: &EventMeta, output: &Value) -> Result<Vec<Message>, SinkError> {
        let records = records(output);
        let mut messages = Vec::with_capacity(records.len());
        for Record {
            index,
            in_array: array,
            value: record,
            which,
        } in records
        {
            let subject = self.subject.render(event, record, index).map_err(|e| {
                SinkError::Permanent(format!(
                    "{which}cannot render the subject {:?}: {e}",
                    self.subject.text()
                ))
            })?;
            check_subject(&subject).map_err(|e| SinkError::Permanent(format!("{which}{e}")))?;
            let id = message_id(event, index);
            if id.chars().any(char::is_control) {
                return Err(SinkError::Permanent(format!(
                    "{which}the message id {} holds a control character, which a NATS header \
                     cannot carry: rename the route or have the hub send plain event ids",
                    shown(&id)
                )));
            }
            let (payload, content_type) = match record {
                Value::String(text) => (Bytes::from(text.clone().into_bytes()), TEXT),
                other => (
                    Bytes::from(serde_json::to_vec(other).map_err(|e| {
                        SinkError::Permanent(format!(
                            "{which}cannot encode the output as JSON: {e}"
                        ))
                    })?),
                    JSON,
                ),
            };
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", id);
            if let Some(stream) = &self.stream {
                headers.insert("Nats-Expected-Stream", stream.as_str());
            }
            headers.insert("Content-Type", content_type);
            headers.insert("Ess-Event-Id", event.id.as_str());
            headers.insert("Ess-Event-Type", event.event_type.as_str());
            headers.insert("Ess-Event-Version", event.version.to_string());
            headers.insert("Ess-Subject", event.subject.as_str());
            if let Some(revision) = event.revision {
                headers.insert("Ess-Revision", revision.to_string());
            }
            headers.insert("Ess-Route", event.route.as_str());
            headers.insert("Ess-Partner", event.partner.as_str());
            if array {
                headers.insert("Ess-Record", index.to_string());
            }
            messages.push(Message {
                subject,
                headers,
                payload,
            });
        }
        Ok(messages)
    }
}

/// How the sink authenticates, with the secrets read when it was built.
#[derive(Clone)]
enum Auth {
    None,
    Credentials(String),
    Nkey(String),
    Token(String),
    UserPassword(String, String),
}

/// What the connection task and the client's events tell the applies.
#[derive(Default)]
struct Link {
    /// The JetStream context, once the first connection succeeded. The client reconnects by
    /// itself from then on.
    context: Option<async_nats::jetstream::Context>,
    /// The client, for its connection state.
    client: Option<async_nats::Client>,
    /// The server's refusal of the last connection attempt (credentials): permanent.
    refused: Option<String>,
    /// Why the last connection attempt failed, or what the client last reported.
    last_error: Option<String>,
}

#[derive(Default)]
struct Shared {
    link: Mutex<Link>,
    changed: Notify,
}

impl Shared {
    fn link(&self) -> MutexGuard<'_, Link> {
        self.link.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, change: impl FnOnce(&mut Link)) {
        change(&mut self.link());
        self.changed.notify_waiters();
    }
}

/// Everything a connection attempt needs.
#[derive(Clone)]
struct Connector {
    name: String,
    server: Server,
    tls: Option<rustls::ClientConfig>,
    auth: Auth,
    connect_timeout: Duration,
    timeout: Duration,
    backoff: Backoff,
}

impl Connector {
    fn options(&self, shared: &Arc<Shared>) -> Result<ConnectOptions, String> {
        let mut options = match &self.auth {
            Auth::None => ConnectOptions::new(),
            Auth::Credentials(text) => ConnectOptions::with_credentials(text).map_err(|e| {
                format!(
                    "credentials: not a NATS credentials file ({e}): use the .creds file nsc \
                     or the account's operator issued"
                )
            })?,
            Auth::Nkey(seed) => ConnectOptions::with_nkey(seed.clone()),
            Auth::Token(token) => ConnectOptions::with_token(token.clone()),
            Auth::UserPassword(user, password) => {
                ConnectOptions::with_user_and_password(user.clone(), password.clone())
            }
        };
        if let Some(tls) = &self.tls {
            options = options.require_tls(true).tls_client_config(tls.clone());
        }
        let backoff = self.backoff;
        let events = Arc::downgrade(shared);
        let server = self.server.clone();
        Ok(options
            .name(format!("ess-agent {}", self.name))
            .connection_timeout(self.connect_timeout)
            .request_timeout(Some(self.timeout))
            .max_reconnects(None)
            .reconnect_delay_callback(move |attempts| backoff.delay(attempts as u32))
            .event_callback(move |event| {
                let events = events.clone();
                let server = server.clone();
                async move {
                    let Some(shared) = events.upgrade() else {
                        return;
                    };
                    client_event(&shared, &server, event);
                }
            }))
    }
}

/// Records what the client reports about its connection.
fn client_event(shared: &Shared, server: &Server, event: async_nats::Event) {
    use async_nats::Event;
    match event {
        Event::Connected => {
            tracing::info!(server = %server, "nats connected");
            shared.update(|l| l.last_error = None);
        }
        Event::Disconnected => {
            tracing::warn!(server = %server, "nats connection lost; reconnecting");
            shared.update(|l| {
                l.last_error = Some(format!(
                    "the connection to the NATS server at {server} was lost; reconnecting"
                ))
            });
        }
        Event::ClientError(e) => {
            tracing::warn!(server = %server, error = %e, "nats connection attempt failed");
            shared.update(|l| {
                l.last_error = Some(format!("cannot reach the NATS server at {server}: {e}"))
            });
        }
        Event::ServerError(e) => {
            tracing::warn!(server = %server, error = %e, "nats server reported an error");
            shared.update(|l| {
                l.last_error = Some(format!("the NATS server at {server} reported: {e}"))
            });
        }
        other => tracing::info!(server = %server, event = %other, "nats client event"),
    }
}

/// Connects with backoff until the first connection succeeds; the client reconnects by itself
/// after that.
async fn connect(shared: Arc<Shared>, connector: Connector, stop: CancellationToken) {
    let address = connector.server.to_string();
    let mut attempt = 0u32;
    loop {
        let outcome = match connector.options(&shared) {
            Err(message) => Err((message, true)),
            Ok(options) => {
                match timeout(connector.connect_timeout * 2, options.connect(&address)).await {
                    Ok(Ok(client)) => Ok(client),
                    Ok(Err(e)) => Err(describe_connect_error(&e, &connector.server)),
                    Err(_) => Err((
                        format!(
                            "cannot reach the NATS server at {address}: no answer within \
                             connect_timeout_secs ({} s)",
                            connector.connect_timeout.as_secs()
                        ),
                        false,
                    )),
                }
            }
        };
        match outcome {
            Ok(client) => {
                tracing::info!(server = %connector.server, "nats connected");
                let context = async_nats::jetstream::ContextBuilder::new()
                    .timeout(connector.timeout)
                    .build(client.clone());
                shared.update(|l| {
                    l.context = Some(context);
                    l.client = Some(client);
                    l.refused = None;
                    l.last_error = None;
                });
                return;
            }
            Err((message, permanent)) => {
                tracing::warn!(server = %connector.server, error = %message, "nats connection attempt failed");
                shared.update(|l| {
                    if permanent {
                        l.refused = Some(message.clone());
                    } else {
                        l.refused = None;
                    }
                    l.last_error = Some(message);
                });
            }
        }
        attempt = attempt.saturating_add(1);
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(connector.backoff.delay(attempt)) => {}
        }
    }
}

/// The message for a failed connection attempt, and whether it is permanent.
fn describe_connect_error(error: &async_nats::ConnectError, server: &Server) -> (String, bool) {
    // The TLS error is inside the chain whatever kind the client gave it (often `Io`).
    if let Some(tls) = rustls_error(error) {
        let keys = TlsKeys {
            peer: "server",
            ca_file: "tls.ca_file",
            client_cert: "tls.cert",
            client_key: "tls.key",
        };
        return (
            format!(
                "TLS handshake with the NATS server at {server} failed ({tls}): {}",
                tls_advice(tls, &keys)
            ),
            false,
        );
    }
    let detail = std::error::Error::source(error)
        .map(|s| format!(" ({s})"))
        .unwrap_or_default();
    match error.kind() {
        ConnectErrorKind::AuthorizationViolation => (
            format!(
                "the NATS server at {server} refused the credentials (authorization \
                 violation){detail}: check user and password, token, nkey or credentials and \
                 the server's authorization settings"
            ),
            true,
        ),
        ConnectErrorKind::Authentication => (
            format!(
                "cannot authenticate to the NATS server at {server}{detail}: check that nkey \
                 holds an NKey seed (SU…) and credentials a .creds file"
            ),
            true,
        ),
        ConnectErrorKind::Tls => (
            format!(
                "TLS with the NATS server at {server} failed{detail}: check tls.ca_file (the CA \
                 that signed the server's certificate), that the host name is in the \
                 certificate, and that the server has TLS enabled"
            ),
            false,
        ),
        ConnectErrorKind::Dns => (
            format!(
                "cannot resolve the NATS server's host {}{detail}: check url",
                server.host
            ),
            false,
        ),
        ConnectErrorKind::TimedOut => (
            format!(
                "cannot reach the NATS server at {server}: timed out{detail}: is it running and \
                 reachable?"
            ),
            false,
        ),
        _ => (
            format!(
                "cannot reach the NATS server at {server}: {error}{detail}: is the server \
                 running and listening on this port?"
            ),
            false,
        ),
    }
}

/// The `nats` sink.
pub struct NatsSink {
    name: String,
    server: Server,
    publishing: Publishing,
    timeout: Duration,
    shared: Arc<Shared>,
    /// The connection task's ingredients until the first apply or healthcheck starts it
    /// (building the sink opens no connection, so `ess-agent validate` stays offline).
    idle: Mutex<Option<Connector>>,
    stop: CancellationToken,
    /// Stops the connection task when the sink is dropped (after a reconfiguration).
    _stop_on_drop: DropGuard,
}

impl std::fmt::Debug for NatsSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSink")
            .field("name", &self.name)
            .field("server", &self.server.to_string())
            .field("subject", &self.publishing.subject.text())
            .field("stream", &self.publishing.stream)
            .finish_non_exhaustive()
    }
}

impl NatsSink {
    /// Builds the sink: reads the secrets and the TLS files, but connects nowhere.
    pub fn new(config: &NatsConfig, name: &str) -> Result<NatsSink, String> {
        let server = parse_url(&config.url)?;
        let subject = Template::parse(&config.subject)?;
        let secret = |field: &str, source: &crate::settings::SecretSource| {
            read_secret(source).map_err(|e| format!("{field}: {e}"))
        };
        let auth = match (
            &config.credentials,
            &config.nkey,
            &config.token,
            &config.user,
            &config.password,
        ) {
            (Some(c), ..) => Auth::Credentials(secret("credentials", c)?),
            (_, Some(n), ..) => Auth::Nkey(secret("nkey", n)?),
            (_, _, Some(t), ..) => Auth::Token(secret("token", t)?),
            (_, _, _, Some(u), Some(p)) => {
                Auth::UserPassword(secret("user", u)?, secret("password", p)?)
            }
            _ => Auth::None,
        };
        let tls = if server.tls || config.tls.is_some() {
            let settings = config.tls.clone().unwrap_or_default();
            let client_tls = ClientTls {
                ca_file: settings.ca_file.as_deref(),
                client_cert: settings.cert.as_deref().zip(settings.key.as_deref()),
            };
            Some(client_config(&client_tls).map_err(|e| format!("tls: {e}"))?)
        } else {
            None
        };
        let timeout = Duration::from_millis(config.timeout_ms);
        let connector = Connector {
            name: name.to_string(),
            server: server.clone(),
            tls,
            auth,
            connect_timeout: Duration::from_secs(config.connect_timeout_secs),
            timeout,
            backoff: Backoff::new(
                Duration::from_millis(config.reconnect_initial_ms),
                Duration::from_millis(config.reconnect_max_ms),
            ),
        };
        // Checks the credentials file's form now, so that a bad one is a build error.
        if let Auth::Credentials(text) = &connector.auth {
            ConnectOptions::with_credentials(text).map_err(|e| {
                format!(
                    "credentials: not a NATS credentials file ({e}): use the .creds file nsc wrote"
                )
            })?;
        }
        let stop = CancellationToken::new();
        Ok(NatsSink {
            name: name.to_string(),
            server,
            publishing: Publishing {
                subject,
                stream: config.stream.clone(),
            },
            timeout,
            shared: Arc::new(Shared::default()),
            idle: Mutex::new(Some(connector)),
            _stop_on_drop: stop.clone().drop_guard(),
            stop,
        })
    }

    /// Starts the connection task, once.
    fn start_connecting(&self) {
        let connector = self.idle.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(connector) = connector {
            tokio::spawn(connect(self.shared.clone(), connector, self.stop.clone()));
        }
    }

    /// The JetStream context once connected; waits until `deadline` for the outcome of the
    /// first connection attempt.
    async fn context(
        &self,
        deadline: Instant,
    ) -> Result<(async_nats::jetstream::Context, async_nats::Client), SinkError> {
        self.start_connecting();
        loop {
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let link = self.shared.link();
                if let (Some(context), Some(client)) = (&link.context, &link.client) {
                    return Ok((context.clone(), client.clone()));
                }
                if let Some(refused) = &link.refused {
                    return Err(SinkError::Permanent(refused.clone()));
                }
                // Until the first connection, a failed attempt fails the caller at once with
                // its reason; the connection task keeps trying.
                if let Some(error) = &link.last_error {
                    return Err(SinkError::Retryable(error.clone()));
                }
            }
            if timeout_at(deadline, changed).await.is_err() {
                let link = self.shared.link();
                return Err(SinkError::Retryable(
                    link.last_error.clone().unwrap_or_else(|| {
                        format!("still connecting to the NATS server at {}", self.server)
                    }),
                ));
            }
        }
    }

    fn timed_out(&self, subject: &str) -> SinkError {
        let why = self
            .shared
            .link()
            .last_error
            .clone()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default();
        SinkError::Retryable(format!(
            "no PubAck for subject {subject:?} from the NATS server at {} within timeout_ms \
             ({} ms){why}",
            self.server,
            self.timeout.as_millis()
        ))
    }

    /// Classifies a failed publish. A "no responders" is looked into: it is permanent only when
    /// JetStream answers that no stream captures the subject (or that the configured stream does
    /// not exist).
    async fn publish_error(
        &self,
        error: PublishError,
        subject: &str,
        context: &async_nats::jetstream::Context,
    ) -> SinkError {
        match self.classify(&error, subject) {
            Some(error) => error,
            None => self.no_stream(subject, context).await,
        }
    }

    /// Classifies a failed publish by its kind and JetStream error code; None for "no
    /// responders", which needs asking JetStream.
    fn classify(&self, error: &PublishError, subject: &str) -> Option<SinkError> {
        Some(match error.kind() {
            PublishErrorKind::StreamNotFound => return None,
            PublishErrorKind::MaxPayloadExceeded => SinkError::Permanent(format!(
                "the message for subject {subject:?} is larger than the NATS server's \
                 max_payload ({error}): make the adapter produce less, or raise max_payload on \
                 the server"
            )),
            PublishErrorKind::TimedOut => self.timed_out(subject),
            PublishErrorKind::Other => {
                let jetstream = std::error::Error::source(error)
                    .and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>());
                match jetstream.map(|e| (e, e.error_code())) {
                    Some((e, ErrorCode::STREAM_NOT_MATCH)) => SinkError::Permanent(format!(
                        "the subject {subject:?} is captured by a stream other than {} ({e}): \
                         change the subject template or the stream's subjects so that {} \
                         captures it",
                        self.publishing
                            .stream
                            .as_deref()
                            .unwrap_or("the configured one"),
                        self.publishing.stream.as_deref().unwrap_or("it"),
                    )),
                    Some((e, ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM)) => {
                        SinkError::Permanent(format!(
                            "the stream refused the message for subject {subject:?} as too \
                             large ({e}): make the adapter produce less, or raise the stream's \
                             max_msg_size"
                        ))
                    }
                    Some((e, _)) => SinkError::Retryable(format!(
                        "JetStream refused the message for subject {subject:?}: {e}"
                    )),
                    None => SinkError::Retryable(format!(
                        "publishing to subject {subject:?} failed: {error}{}",
                        std::error::Error::source(error)
                            .map(|s| format!(" ({s})"))
                            .unwrap_or_default()
                    )),
                }
            }
            PublishErrorKind::BrokenPipe
            | PublishErrorKind::MaxAckPending
            | PublishErrorKind::WrongLastMessageId
            | PublishErrorKind::WrongLastSequence => SinkError::Retryable(format!(
                "publishing to subject {subject:?} on the NATS server at {} failed: {error}",
                self.server
            )),
        })
    }

    /// After a "no responders": asks JetStream whether a stream captures `subject`.
    async fn no_stream(
        &self,
        subject: &str,
        context: &async_nats::jetstream::Context,
    ) -> SinkError {
        if let Some(stream) = &self.publishing.stream
            && let Some(missing) = self.missing_stream(stream, context).await
        {
            return missing;
        }
        match timeout(LOOKUP_WAIT, context.stream_by_subject(subject)).await {
            Ok(Err(e)) if matches!(e.kind(), GetStreamByNameErrorKind::NotFound) => {
                SinkError::Permanent(format!(
                    "no JetStream stream captures the subject {subject:?} (the server answered \
                     \"no responders\"): create a stream for it, e.g. nats stream add {} \
                     --subjects '{}', or change the sink's subject template",
                    self.publishing.stream.as_deref().unwrap_or("RULES"),
                    wildcard_of(subject)
                ))
            }
            Ok(Ok(stream)) => SinkError::Retryable(format!(
                "no stream answered for the subject {subject:?}, though the stream {stream} \
                 captures it now: trying again"
            )),
            Ok(Err(e)) => SinkError::Retryable(format!(
                "no stream answered for the subject {subject:?}, and JetStream did not say \
                 which stream holds it ({e}): is JetStream enabled and running on the NATS \
                 server at {}?",
                self.server
            )),
            Err(_) => SinkError::Retryable(format!(
                "no stream answered for the subject {subject:?}, and JetStream did not answer \
                 either: is JetStream enabled and running on the NATS server at {}?",
                self.server
            )),
        }
    }

    /// The error for a configured stream that does not exist; None when it exists or JetStream
    /// cannot tell.
    async fn missing_stream(
        &self,
        stream: &str,
        context: &async_nats::jetstream::Context,
    ) -> Option<SinkError> {
        match timeout(LOOKUP_WAIT, context.get_stream(stream)).await {
            Ok(Err(e)) => match e.kind() {
                GetStreamErrorKind::JetStream(js)
                    if js.error_code() == ErrorCode::STREAM_NOT_FOUND =>
                {
                    Some(SinkError::Permanent(format!(
                        "the stream {stream} does not exist on the NATS server at {}: create it \
                         (e.g. nats stream add {stream} --subjects '{}') or change the sink's \
                         stream",
                        self.server,
                        wildcard_of(self.publishing.subject.text())
                    )))
                }
                _ => None,
            },
            _ => None,
        }
    }
}

/// A stream filter to suggest for a subject: its first token and `>`.
fn wildcard_of(subject: &str) -> String {
    let first = subject.split('.').next().unwrap_or(subject);
    if first.contains('{') {
        ">".into()
    } else {
        format!("{first}.>")
    }
}

#[async_trait::async_trait]
impl Sink for NatsSink {
    async fn apply(&self, event: &EventMeta, output: &Value) -> Result<(), SinkError> {
        let messages = self.publishing.messages(event, output)?;
        if messages.is_empty() {
            return Ok(());
        }
        let deadline = Instant::now() + self.timeout;
        let (context, _client) = self.context(deadline).await?;
        // Every message is sent before the first PubAck is awaited, so that the records of one
        // event share the round trip.
        let mut pending = Vec::with_capacity(messages.len());
        for message in messages {
            let publish = PublishMessage::build()
                .payload(message.payload)
                .headers(message.headers);
            let ack = match timeout_at(
                deadline,
                context.send_publish(message.subject.clone(), publish),
            )
            .await
            {
                Err(_) => return Err(self.timed_out(&message.subject)),
                Ok(Err(e)) => return Err(self.publish_error(e, &message.subject, &context).await),
                Ok(Ok(ack)) => ack,
            };
            pending.push((message.subject, ack));
        }
        for (subject, ack) in pending {
            match timeout_at(deadline, ack.into_future()).await {
                Err(_) => return Err(self.timed_out(&subject)),
                Ok(Err(e)) => return Err(self.publish_error(e, &subject, &context).await),
                Ok(Ok(ack)) if ack.duplicate => tracing::debug!(
                    sink = %self.name, event_id = %event.id, stream = %ack.stream,
                    sequence = ack.sequence,
                    "nats: the stream already held this message (a retry within its duplicate \
                     window); counted as applied"
                ),
                Ok(Ok(_)) => {}
            }
        }
        Ok(())
    }

    async fn start(&self) {
        self.start_connecting();
    }

    /// Healthy while connected and JetStream answers: with `stream` set, that stream must
    /// exist. The first check starts the connection and waits a little for its outcome.
    async fn healthcheck(&self) -> Result<(), SinkError> {
        let (context, client) = self.context(Instant::now() + HEALTH_WAIT).await?;
        if client.connection_state() != ConnectionState::Connected {
            let link = self.shared.link();
            return Err(SinkError::Retryable(
                link.last_error.clone().unwrap_or_else(|| {
                    format!("not connected to the NATS server at {}", self.server)
                }),
            ));
        }
        match &self.publishing.stream {
            Some(stream) => {
                if let Some(missing) = self.missing_stream(stream, &context).await {
                    return Err(missing);
                }
                match timeout(HEALTH_WAIT, context.get_stream(stream)).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(SinkError::Retryable(format!(
                        "JetStream on the NATS server at {} cannot tell whether the stream \
                         {stream} exists ({e}): is JetStream enabled?",
                        self.server
                    ))),
                    Err(_) => Err(SinkError::Retryable(format!(
                        "JetStream on the NATS server at {} did not answer within {} s: is \
                         JetStream enabled?",
                        self.server,
                        HEALTH_WAIT.as_secs()
                    ))),
                }
            }
            None => match timeout(HEALTH_WAIT, context.query_account()).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(SinkError::Retryable(format!(
                    "JetStream on the NATS server at {} does not answer ({e}): enable JetStream \
                     on the server (nats-server -js, or a jetstream block in its configuration)",
                    self.server
                ))),
                Err(_) => Err(SinkError::Retryable(format!(
                    "JetStream on the NATS server at {} did not answer within {} s: is \
                     JetStream enabled?",
                    self.server,
                    HEALTH_WAIT.as_secs()
                ))),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::SinkSpec;
    use serde_json::json;

    fn event() -> EventMeta {
        EventMeta {
            id: "e1".into(),
            event_type: "rule.updated".into(),
            version: 3,
            subject: "RULE-1".into(),
            revision: Some(7),
            source: None,
            route: "kiosk".into(),
            partner: "county".into(),
            received_at_ms: 1_796_601_600_000,
        }
    }

    fn config(text: &str) -> NatsConfig {
        toml::from_str(text).unwrap_or_else(|e| panic!("{e}"))
    }

    const MINIMAL: &str = "url = \"nats://127.0.0.1:4222\"\nsubject = \"rules.{subject}\"\n";

    fn keys(c: &NatsConfig) -> Vec<String> {
        c.validate("sinks.n").into_iter().map(|p| p.key).collect()
    }

    #[test]
    fn config_parses_with_defaults_and_refuses_unknown_keys() {
        let c = config(MINIMAL);
        assert_eq!(c.timeout_ms, 10_000);
        assert_eq!(c.connect_timeout_secs, 10);
        assert_eq!((c.reconnect_initial_ms, c.reconnect_max_ms), (100, 10_000));
        assert!(c.stream.is_none() && c.tls.is_none());
        assert!(c.validate("sinks.n").is_empty());
        let e = toml::from_str::<NatsConfig>(&format!("{MINIMAL}subjcet = \"x\"\n")).unwrap_err();
        assert!(e.to_string().contains("subjcet"), "{e}");
        let e = toml::from_str::<NatsConfig>(&format!("{MINIMAL}tls = {{ ca = \"x\" }}\n"))
            .unwrap_err();
        assert!(e.to_string().contains("ca"), "{e}");
    }

    #[test]
    fn urls_are_checked() {
        for (url, port, tls) in [
            ("nats://n", 4222, false),
            ("nats://n:4333", 4333, false),
            ("tls://n", 4222, true),
        ] {
            let s = config::parse_url(url).unwrap();
            assert_eq!((s.host.as_str(), s.port, s.tls), ("n", port, tls), "{url}");
        }
        for (url, says) in [
            ("http://n", "must start with nats:// or tls://"),
            ("nats://u:p@n", "carries credentials"),
            ("nats://n/x", "path or query"),
            ("n:4222", "must start with"),
        ] {
            let e = config::parse_url(url).unwrap_err();
            assert!(e.contains(says), "{url}: {e}");
        }
    }

    #[test]
    fn validate_names_every_problem() {
        let c = config(
            "url = \"mqtt://n\"\nsubject = \"a.>\"\nstream = \"a.b\"\n\
             token = { env = \"T\" }\nnkey = { file = \"s\", env = \"S\" }\n\
             password = { file = \"p\" }\ntls = { cert = \"c.pem\" }\ntimeout_ms = 0\n\
             connect_timeout_secs = 0\nreconnect_initial_ms = 0\n",
        );
        let mut got = keys(&c);
        got.sort();
        assert_eq!(
            got,
            [
                "sinks.n.connect_timeout_secs",
                "sinks.n.nkey",
                "sinks.n.reconnect_initial_ms",
                "sinks.n.stream",
                "sinks.n.subject",
                "sinks.n.timeout_ms",
                "sinks.n.tls.key",
                "sinks.n.token",
                "sinks.n.url",
                "sinks.n.user",
            ]
        );
        let c = config(&format!(
            "{MINIMAL}reconnect_initial_ms = 500\nreconnect_max_ms = 100\n"
        ));
        assert_eq!(keys(&c), ["sinks.n.reconnect_max_ms"]);
    }

    #[test]
    fn subject_templates_that_can_never_be_valid_are_configuration_problems() {
        for bad in [
            "a.*",
            "a.>",
            "a..{id}",
            ".{id}",
            "{id}.",
            "$JS.API.{id}",
            "a b.{id}",
            "{nope}",
        ] {
            let c = config(&format!("url = \"nats://n\"\nsubject = \"{bad}\"\n"));
            assert_eq!(keys(&c), ["sinks.n.subject"], "{bad}");
        }
        for good in [
            "{subject}",
            "partners.{partner}.rules.{subject}",
            "a-b_c.{output.x}",
        ] {
            let c = config(&format!("url = \"nats://n\"\nsubject = \"{good}\"\n"));
            assert!(keys(&c).is_empty(), "{good}");
        }
    }

    fn publishing(subject: &str, stream: Option<&str>) -> Publishing {
        Publishing {
            subject: Template::parse(subject).unwrap(),
            stream: stream.map(str::to_string),
        }
    }

    fn header<'a>(m: &'a Message, name: &str) -> Option<&'a str> {
        m.headers.get(name).map(|v| v.as_str())
    }

    #[test]
    fn messages_carry_subject_payload_message_id_and_event_headers() {
        let p = publishing("partners.{partner}.{subject}", Some("RULES"));
        let m = p.messages(&event(), &json!({"a": 1})).unwrap();
        assert_eq!(m.len(), 1);
        let m = &m[0];
        assert_eq!(m.subject, "partners.county.RULE-1");
        assert_eq!(&m.payload[..], br#"{"a":1}"#);
        for (name, value) in [
            ("Nats-Msg-Id", "e1:kiosk:0"),
            ("Nats-Expected-Stream", "RULES"),
            ("Content-Type", "application/json"),
            ("Ess-Event-Id", "e1"),
            ("Ess-Event-Type", "rule.updated"),
            ("Ess-Event-Version", "3"),
            ("Ess-Subject", "RULE-1"),
            ("Ess-Revision", "7"),
            ("Ess-Route", "kiosk"),
            ("Ess-Partner", "county"),
        ] {
            assert_eq!(header(m, name), Some(value), "{name}");
        }
        assert_eq!(header(m, "Ess-Record"), None);
        let m = publishing("r.{subject}", None)
            .messages(&event(), &json!("plain text"))
            .unwrap();
        assert_eq!(&m[0].payload[..], b"plain text");
        assert_eq!(
            header(&m[0], "Content-Type"),
            Some("text/plain; charset=utf-8")
        );
        assert_eq!(header(&m[0], "Nats-Expected-Stream"), None);
    }

    #[test]
    fn arrays_give_one_message_per_record_and_are_checked_before_anything_is_sent() {
        let p = publishing("r.{output.k}.{index}", None);
        let m = p
            .messages(&event(), &json!([{"k": "a"}, {"k": "b"}]))
            .unwrap();
        assert_eq!(
            m.iter().map(|m| m.subject.as_str()).collect::<Vec<_>>(),
            ["r.a.0", "r.b.1"]
        );
        assert_eq!(header(&m[1], "Nats-Msg-Id"), Some("e1:kiosk:1"));
        assert_eq!(header(&m[1], "Ess-Record"), Some("1"));
        assert!(p.messages(&event(), &json!([])).unwrap().is_empty());
        // One bad record refuses the whole event, naming it.
        for (output, says) in [
            (
                json!([{"k": "a"}, {"k": "b.>"}]),
                "record 1: the rendered subject",
            ),
            (json!([{"k": "a"}, {"k": "x y"}]), "white space"),
            (
                json!([{"k": "a"}, {}]),
                "record 1: cannot render the subject",
            ),
            (json!([{"k": ""}]), "empty token"),
        ] {
            let e = p.messages(&event(), &output).unwrap_err();
            assert!(!e.is_retryable(), "{e}");
            assert!(e.to_string().contains(says), "{output}: {e}");
        }
        let mut odd = event();
        odd.id = "e\n1".into();
        let e = publishing("r.x", None)
            .messages(&odd, &json!({}))
            .unwrap_err();
        assert!(e.to_string().contains("control character"), "{e}");
    }

    fn sink(extra: &str) -> NatsSink {
        NatsSink::new(&config(&format!("{MINIMAL}{extra}")), "n").unwrap()
    }

    fn jetstream_error(code: u64) -> PublishError {
        let error: async_nats::jetstream::Error = serde_json::from_value(
            json!({"code": 400, "err_code": code, "description": "refused"}),
        )
        .unwrap();
        PublishError::with_source(PublishErrorKind::Other, error)
    }

    #[test]
    fn publish_errors_are_classified_by_kind_and_jetstream_code() {
        let s = sink("stream = \"RULES\"\n");
        let class = |e: PublishError| s.classify(&e, "rules.x");
        assert!(class(PublishError::new(PublishErrorKind::StreamNotFound)).is_none());
        let e = class(jetstream_error(10060)).unwrap();
        assert!(
            !e.is_retryable() && e.to_string().contains("other than RULES"),
            "{e}"
        );
        let e = class(jetstream_error(10054)).unwrap();
        assert!(
            !e.is_retryable() && e.to_string().contains("max_msg_size"),
            "{e}"
        );
        let e = class(PublishError::new(PublishErrorKind::MaxPayloadExceeded)).unwrap();
        assert!(
            !e.is_retryable() && e.to_string().contains("max_payload"),
            "{e}"
        );
        for retryable in [
            jetstream_error(10077),
            PublishError::new(PublishErrorKind::TimedOut),
            PublishError::new(PublishErrorKind::BrokenPipe),
            PublishError::new(PublishErrorKind::MaxAckPending),
            PublishError::new(PublishErrorKind::Other),
        ] {
            let e = class(retryable).unwrap();
            assert!(e.is_retryable(), "{e}");
        }
        let e = class(PublishError::new(PublishErrorKind::TimedOut)).unwrap();
        assert!(
            e.to_string().contains("no PubAck for subject \"rules.x\""),
            "{e}"
        );
    }

    #[test]
    fn building_reads_secrets_and_tls_files_but_connects_nowhere() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("user"), "kiosk\n").unwrap();
        std::fs::write(dir.path().join("pass"), "s3cret\n").unwrap();
        let mut c = config(&format!(
            "{MINIMAL}user = {{ file = \"user\" }}\npassword = {{ file = \"pass\" }}\n"
        ));
        c.resolve_paths(dir.path());
        assert!(c.validate("sinks.n").is_empty());
        let s = NatsSink::new(&c, "n").unwrap();
        assert!(!format!("{s:?}").contains("s3cret"));
        assert_eq!(c.secret_sources().len(), 2);
        c.password.as_mut().unwrap().file = Some(dir.path().join("missing"));
        let e = NatsSink::new(&c, "n").unwrap_err();
        assert!(e.starts_with("password: cannot read secret file"), "{e}");

        std::fs::write(dir.path().join("creds"), "not a creds file").unwrap();
        let mut c = config(&format!("{MINIMAL}credentials = {{ file = \"creds\" }}\n"));
        c.resolve_paths(dir.path());
        let e = NatsSink::new(&c, "n").unwrap_err();
        assert!(
            e.starts_with("credentials: not a NATS credentials file"),
            "{e}"
        );

        let mut c =
            config("url = \"tls://n\"\nsubject = \"s\"\ntls = { ca_file = \"nope.pem\" }\n");
        c.resolve_paths(dir.path());
        let e = NatsSink::new(&c, "n").unwrap_err();
        assert!(e.starts_with("tls: cannot read"), "{e}");
    }

    #[tokio::test]
    async fn nothing_listening_is_retryable_with_the_reason() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let c = config(&format!(
            "url = \"nats://127.0.0.1:{port}\"\nsubject = \"r.{{subject}}\"\ntimeout_ms = 1500\n"
        ));
        let s = NatsSink::new(&c, "n").unwrap();
        let started = std::time::Instant::now();
        let e = s.apply(&event(), &json!({})).await.unwrap_err();
        assert!(e.is_retryable(), "{e}");
        assert!(
            e.to_string().contains("cannot reach the NATS server"),
            "{e}"
        );
        assert!(started.elapsed() < Duration::from_secs(3), "failed in time");
        assert!(s.healthcheck().await.unwrap_err().is_retryable());
    }
}
