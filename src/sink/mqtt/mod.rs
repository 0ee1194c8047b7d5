//! The `mqtt` sink: publishes each output record to an MQTT broker (3.1.1 or 5) and reports it
//! applied only once the broker has confirmed it (PROTOCOL.md §3: at least once, with the event id
//! as the key to de-duplicate).
//!
//! # What is published
//!
//! The output is split into records (an array gives one message per element, anything else one
//! message; an empty array publishes nothing). Each record's topic is rendered from the `topic`
//! template and checked before anything is published: a rendered topic with a wildcard (`+`,
//! `#`), an empty level (unless `allow_empty_levels`), a leading `$`, a control character or more
//! than 65,535 bytes refuses the whole event permanently. The payload is a JSON string output
//! as its text, anything else as compact JSON; with `envelope = true` it is a JSON object
//! `{"ess_event_id", "ess_event_type", "ess_route", ["ess_record",] "output"}` so that MQTT 3.1.1
//! subscribers can de-duplicate. MQTT 5 messages carry the user properties `ess-event-id`,
//! `ess-event-type`, `ess-route` (and `ess-record` for array elements), a content type, the
//! UTF-8 payload format indicator and, when configured, a message expiry interval.
//!
//! # When a message counts as applied
//!
//! - QoS 1: when the broker's PUBACK for its packet id arrives; QoS 2: when the PUBCOMP does.
//!   With MQTT 5 the reason code must be a success (0x00, or 0x10 "no matching subscribers").
//! - QoS 0: when it has been written to the connection. The broker confirms nothing, so a
//!   message written just before the connection drops can be lost: use QoS 1 or 2 where that
//!   matters.
//!
//! Confirmations are matched to publishes by packet id. All applies share one connection: the
//! connection task ([`drive`]) follows the client's event stream, learns which packet id each
//! publish got (publishes leave in the order they were handed over) and completes the apply's
//! waiter when the broker confirms that id ([`Book`]). No confirmation within `timeout_ms` makes
//! the apply retryable; the publish itself stays in flight, and when the retry comes for the same
//! record with the same content it waits for that publish instead of sending a second copy, or
//! succeeds at once if the broker confirmed it in the meantime.
//!
//! # Outages
//!
//! The sink keeps a persistent session (MQTT 3.1.1: clean session off; MQTT 5: clean start off
//! with `session_expiry_secs`), so after a reconnect the client resends every unconfirmed publish
//! with its packet id, and the broker's confirmation completes the waiting apply. When the broker
//! lost the session (restarted without persistence, or the session expired) the unsent and
//! unconfirmed publishes are failed as retryable and the dispatcher publishes them again.
//! Before its first connection a new sink connects once with a clean session, so that what an
//! earlier process left in the broker's session (a half-finished QoS 2 exchange whose packet id
//! the new process would reuse) cannot swallow a new message. Reconnects back off exponentially
//! between `reconnect_initial_ms` and `reconnect_max_ms`; at most `max_inflight` publishes are
//! unconfirmed at any time.
//!
//! # Error classification
//!
//! By type and reason code, never by message text.
//!
//! - **Permanent**: the broker refused the connection for a reason that needs an operator (CONNACK
//!   3.1.1 return codes 1, 2, 4, 5; MQTT 5 reason codes such as 0x86 bad user name or password,
//!   0x87 not authorized, 0x8A banned), or refused the message (MQTT 5 PUBACK/PUBREC 0x87 not
//!   authorized, 0x90 topic name invalid, 0x99 payload format invalid); a topic or payload that
//!   cannot be published. The message names the reason code. While the last connection attempt
//!   was refused like this, applies fail at once without publishing.
//! - **Retryable**: connection refused or reset, DNS and TLS failures (an untrusted certificate
//!   is usually fixed on the broker's side), timeouts, the broker being unavailable or busy
//!   (3.1.1 return code 3; MQTT 5 0x88, 0x89, 0x97, 0x9F), other MQTT 5 failure reason codes.
//!
//! MQTT 3.1.1 has no way to refuse a single message: a broker that denies a publish by its access
//! rules still acknowledges it and drops it.

mod book;
mod config;
mod connection;
mod error;
mod publish;
#[cfg(test)]
mod tests;
mod v311;
mod v5;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{Notify, Semaphore};
use tokio::time::{Instant, timeout_at};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::template::Template;
use super::{EventMeta, Sink, SinkError, SinkSpec};
use crate::http_client::{ClientTls, client_config};
use crate::settings::read_secret;
pub use config::MqttConfig;
use config::*;

use book::{Attach, Book};
use connection::{Client, Connection, Driver, Link, Shared, drive};
use publish::{Message, Publishing};

/// How long a healthcheck waits for the outcome of a connection attempt under way.
const HEALTH_WAIT: Duration = Duration::from_secs(5);

/// The `mqtt` sink.
pub struct MqttSink {
    name: String,
    broker: Broker,
    publishing: Publishing,
    timeout: Duration,
    max_inflight: u16,
    client: Client,
    shared: Arc<Shared>,
    /// The connection task's ingredients until the first apply starts it (building the sink
    /// opens no connection, so `ess-agent validate` stays offline).
    idle: Mutex<Option<(Driver, Connection)>>,
    stop: CancellationToken,
    /// Stops the connection task when the sink is dropped (after a reconfiguration).
    _stop_on_drop: DropGuard,
}

impl std::fmt::Debug for MqttSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttSink")
            .field("name", &self.name)
            .field("broker", &self.broker.to_string())
            .field("topic", &self.publishing.topic.text())
            .field("qos", &self.publishing.qos)
            .finish_non_exhaustive()
    }
}

impl MqttSink {
    /// Builds the sink: reads the credentials and TLS files. Opens no connection. `name` is the
    /// sink's name, for logs.
    pub fn new(config: &MqttConfig, name: &str) -> Result<MqttSink, String> {
        let broker = parse_url(&config.url).map_err(|e| format!("url: {e}"))?;
        let topic = Template::parse(&config.topic).map_err(|e| format!("topic: {e}"))?;
        if let Some(problem) = config.validate("").into_iter().next() {
            return Err(format!(
                "{}: {}",
                problem.key.trim_start_matches('.'),
                problem.message
            ));
        }
        let credentials = match (&config.username, &config.password) {
            (None, _) => None,
            (Some(user), password) => {
                let user = read_secret(user).map_err(|e| format!("username: {e}"))?;
                let password = match password {
                    Some(p) => read_secret(p).map_err(|e| format!("password: {e}"))?,
                    None => String::new(),
                };
                Some((user, password))
            }
        };
        let tls = if broker.tls {
            let client_cert = config
                .client_cert
                .as_deref()
                .zip(config.client_key.as_deref());
            let tls = client_config(&ClientTls {
                ca_file: config.ca_file.as_deref(),
                client_cert,
            })
            .map_err(|e| format!("TLS: {e}"))?;
            Some(Arc::new(tls))
        } else {
            None
        };
        let window = config.max_inflight.max(1);
        let (client, driver, reset) = connection::client(config, &broker, window, credentials, tls);
        let stop = CancellationToken::new();
        Ok(MqttSink {
            name: name.to_string(),
            publishing: Publishing {
                topic,
                allow_empty_levels: config.allow_empty_levels,
                qos: config.qos.min(2),
                retain: config.retain,
                envelope: config.envelope,
                v5: config.protocol == MqttVersion::V5,
                content_type: config.content_type.clone(),
                message_expiry: config.message_expiry_secs,
            },
            timeout: Duration::from_millis(config.timeout_ms.max(1)),
            max_inflight: window,
            client,
            shared: Arc::new(Shared {
                book: Mutex::new(Book::default()),
                link: Mutex::new(Link::default()),
                link_changed: Notify::new(),
                window: Arc::new(Semaphore::new(usize::from(window))),
            }),
            idle: Mutex::new(Some((
                driver,
                Connection {
                    name: name.to_string(),
                    broker: broker.clone(),
                    reset,
                    reconnect_initial: Duration::from_millis(config.reconnect_initial_ms.max(1)),
                    reconnect_max: Duration::from_millis(
                        config
                            .reconnect_max_ms
                            .max(config.reconnect_initial_ms.max(1)),
                    ),
                },
            ))),
            broker,
            _stop_on_drop: stop.clone().drop_guard(),
            stop,
        })
    }

    /// Starts the connection task on first use.
    fn start(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((driver, conn)) = idle.take() {
            tokio::spawn(drive(self.shared.clone(), driver, conn, self.stop.clone()));
        }
    }

    /// Refuses at once what the broker is known to refuse.
    fn precheck(&self, messages: &[Message]) -> Result<(), SinkError> {
        let link = self.shared.link();
        if let Some(refused) = &link.refused {
            return Err(SinkError::Permanent(refused.clone()));
        }
        let limits = link.limits;
        drop(link);
        if self.publishing.retain && !limits.retain_available {
            return Err(SinkError::Permanent(
                "the broker does not support retained messages: set retain = false".into(),
            ));
        }
        if self.publishing.qos > limits.max_qos {
            return Err(SinkError::Permanent(format!(
                "the broker supports QoS {} at most: set qos = {}",
                limits.max_qos, limits.max_qos
            )));
        }
        if let Some(max) = limits.max_packet
            && let Some(m) = messages.iter().find(|m| m.size + 5 > max as usize)
        {
            return Err(SinkError::Permanent(format!(
                "the message for topic {} would be {} bytes, more than the broker's maximum \
                 packet size of {max}: make the adapter produce less, or raise the broker's limit",
                shown(&m.topic),
                m.size + 5
            )));
        }
        Ok(())
    }

    fn timed_out(&self, what: &str) -> SinkError {
        let link = self.shared.link();
        let state = match (&link.connected, &link.last_error) {
            (true, _) => String::new(),
            (false, Some(error)) => format!(" (not connected: {error})"),
            (false, None) => " (not connected yet)".to_string(),
        };
        SinkError::Retryable(format!(
            "{what} within timeout_ms ({} ms){state}",
            self.timeout.as_millis()
        ))
    }
}

#[async_trait::async_trait]
impl Sink for MqttSink {
    async fn apply(&self, event: &EventMeta, output: &Value) -> Result<(), SinkError> {
        let messages = self.publishing.messages(event, output)?;
        if messages.is_empty() {
            return Ok(());
        }
        self.precheck(&messages)?;
        self.start();
        let deadline = Instant::now() + self.timeout;
        let mut waiting = Vec::with_capacity(messages.len());
        for message in &messages {
            match self
                .shared
                .book()
                .attach(&message.key, &message.fingerprint)
            {
                Attach::Confirmed => continue,
                Attach::Waiting(rx) => {
                    waiting.push(rx);
                    continue;
                }
                Attach::Publish => {}
            }
            let permit =
                match timeout_at(deadline, self.shared.window.clone().acquire_owned()).await {
                    Ok(Ok(permit)) => permit,
                    Ok(Err(_)) => {
                        return Err(SinkError::Retryable(
                            "the mqtt sink is shutting down".into(),
                        ));
                    }
                    Err(_) => {
                        return Err(self.timed_out(&format!(
                            "no place in the in-flight window ({} publishes waiting for their \
                         confirmation)",
                            self.max_inflight
                        )));
                    }
                };
            let mut book = self.shared.book();
            let (id, rx) = book.enqueue(message.key.clone(), message.fingerprint, Some(permit));
            // Handed over under the book's lock, so the book's queue has the client's order.
            if self
                .client
                .try_publish(self.publishing.qos, self.publishing.retain, message)
                .is_err()
            {
                book.unqueue(id);
                return Err(SinkError::Retryable(
                    "the mqtt connection task is not taking publishes: the agent may be \
                     shutting down"
                        .into(),
                ));
            }
            drop(book);
            waiting.push(rx);
        }
        let what = match self.publishing.qos {
            0 => "the message was not written to the broker",
            1 => "no PUBACK from the broker",
            _ => "no PUBCOMP from the broker",
        };
        for rx in waiting {
            match timeout_at(deadline, rx).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => return Err(e),
                Ok(Err(_)) => {
                    return Err(SinkError::Retryable(
                        "the mqtt sink was stopped before the broker confirmed the message".into(),
                    ));
                }
                Err(_) => return Err(self.timed_out(what)),
            }
        }
        Ok(())
    }

    /// Healthy while connected. The first check starts the connection (so a broker that is
    /// down or refuses the agent shows before the first event) and waits a little for its
    /// outcome.
    async fn healthcheck(&self) -> Result<(), SinkError> {
        self.start();
        let deadline = Instant::now() + HEALTH_WAIT;
        loop {
            let changed = self.shared.link_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let link = self.shared.link();
                if let Some(refused) = &link.refused {
                    return Err(SinkError::Permanent(refused.clone()));
                }
                match (link.connected, &link.last_error) {
                    (true, _) => return Ok(()),
                    (false, Some(error)) => return Err(SinkError::Retryable(error.clone())),
                    (false, None) => {}
                }
            }
            if timeout_at(deadline, changed).await.is_err() {
                return Err(SinkError::Retryable(format!(
                    "still connecting to the MQTT broker at {}",
                    self.broker
                )));
            }
        }
    }
}
