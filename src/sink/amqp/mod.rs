//! The `amqp` sink: publishes adapter output to an AMQP 0-9-1 broker (RabbitMQ) with publisher
//! confirms.
//!
//! An apply renders each record's exchange and routing key, checks once per connection that
//! each exchange exists (a passive declare on a channel of its own, so that a missing exchange is
//! a clear permanent error for the event that names it and closes no channel other events
//! publish on), publishes every record as a persistent message with the mandatory flag, and
//! returns Ok only once the broker has acknowledged every one of them. A message the broker
//! returns as unroutable is a permanent failure (no queue is bound for it); a negative
//! acknowledgement is retryable.
//!
//! One connection and one confirm-mode channel serve every apply of the sink; publishes of
//! concurrent applies share the channel and are confirmed independently. When the connection or
//! the channel is gone, the next apply or healthcheck opens a new one; failed connection attempts
//! back off exponentially, and until the next attempt is due, applies fail at once with the last
//! attempt's error.

mod config;
mod error;
mod message;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::types::FieldTable;
use lapin::uri::{AMQPAuthority, AMQPQueryString, AMQPScheme, AMQPUri, AMQPUserInfo};
use lapin::{Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind};
use serde_json::Value;
use tokio::time::{Instant, timeout, timeout_at};

pub use config::AmqpConfig;
use config::{Broker, parse_url, shown};
use error::{Stage, classify};
use message::{Message, Publishing};

use super::SinkSpec as _;
use super::client::Backoff;
use super::template::Template;
use super::{EventMeta, Sink, SinkError};
use crate::http_client::{ClientTls, client_config};
use crate::settings::read_secret;

/// The connection, its publishing channel, and what is known about the broker through it.
#[derive(Default)]
struct Link {
    connection: Option<Arc<Connection>>,
    channel: Option<Channel>,
    /// Exchanges found to exist through this connection.
    exchanges: HashSet<String>,
    /// No new connection attempt before this instant; `last_error` until then.
    retry_at: Option<Instant>,
    last_error: Option<SinkError>,
}

/// Publishes to an AMQP 0-9-1 broker.
pub struct AmqpSink {
    name: String,
    broker: Broker,
    vhost: String,
    uri: AMQPUri,
    tls: OwnedTLSConfig,
    publishing: Publishing,
    timeout: Duration,
    connect_timeout: Duration,
    backoff: Mutex<Backoff>,
    link: tokio::sync::Mutex<Link>,
}

impl std::fmt::Debug for AmqpSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpSink")
            .field("name", &self.name)
            .field("broker", &self.broker.to_string())
            .field("vhost", &self.vhost)
            .finish_non_exhaustive()
    }
}

impl AmqpSink {
    /// Builds the sink: reads the credentials and TLS files. Opens no connection. `name` is the
    /// sink's name, for logs and the connection name the broker shows.
    pub fn new(config: &AmqpConfig, name: &str) -> Result<AmqpSink, String> {
        if let Some(problem) = config.validate("").into_iter().next() {
            return Err(format!(
                "{}: {}",
                problem.key.trim_start_matches('.'),
                problem.message
            ));
        }
        let broker = parse_url(&config.url).map_err(|e| format!("url: {e}"))?;
        let exchange = Template::parse(&config.exchange).map_err(|e| format!("exchange: {e}"))?;
        let routing_key =
            Template::parse(&config.routing_key).map_err(|e| format!("routing_key: {e}"))?;
        let username = match &config.username {
            Some(source) => read_secret(source).map_err(|e| format!("username: {e}"))?,
            None => "guest".to_string(),
        };
        let password = match (&config.username, &config.password) {
            (_, Some(source)) => read_secret(source).map_err(|e| format!("password: {e}"))?,
            (None, None) => "guest".to_string(),
            (Some(_), None) => String::new(),
        };
        let tls = if broker.tls {
            tls_config(config).map_err(|e| format!("TLS: {e}"))?
        } else {
            OwnedTLSConfig::default()
        };
        let uri = AMQPUri {
            scheme: if broker.tls {
                AMQPScheme::AMQPS
            } else {
                AMQPScheme::AMQP
            },
            authority: AMQPAuthority {
                userinfo: AMQPUserInfo { username, password },
                host: broker.host.clone(),
                port: broker.port,
            },
            vhost: config.vhost.clone(),
            query: AMQPQueryString {
                heartbeat: Some(config.heartbeat_secs.max(5)),
                connection_timeout: Some(config.connect_timeout_secs.max(1) * 1000),
                ..AMQPQueryString::default()
            },
        };
        let initial = Duration::from_millis(config.reconnect_initial_ms.max(1));
        Ok(AmqpSink {
            name: name.to_string(),
            broker,
            vhost: config.vhost.clone(),
            uri,
            tls,
            publishing: Publishing {
                exchange,
                routing_key,
                mandatory: config.mandatory,
                content_type: config.content_type.clone(),
            },
            timeout: Duration::from_millis(config.timeout_ms.max(1)),
            connect_timeout: Duration::from_secs(config.connect_timeout_secs.max(1)),
            backoff: Mutex::new(Backoff::new(
                initial,
                Duration::from_millis(config.reconnect_max_ms).max(initial),
            )),
            link: tokio::sync::Mutex::new(Link::default()),
        })
    }

    /// The publishing channel, opening the connection and the channel when there is none.
    async fn channel(&self) -> Result<Channel, SinkError> {
        let mut link = self.link.lock().await;
        if let Some(channel) = &link.channel
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        link.channel = None;
        if !link
            .connection
            .as_ref()
            .is_some_and(|c| c.status().connected())
        {
            link.connection = None;
            link.exchanges.clear();
            if let Some(at) = link.retry_at
                && Instant::now() < at
            {
                let error = link.last_error.clone().unwrap_or_else(|| {
                    SinkError::Retryable(format!("not connected to {}", self.broker))
                });
                return Err(error);
            }
            match self.connect().await {
                Ok(connection) => {
                    self.backoff().reset();
                    link.retry_at = None;
                    link.last_error = None;
                    tracing::info!(sink = %self.name, broker = %self.broker, "connected to the AMQP broker");
                    link.connection = Some(Arc::new(connection));
                }
                Err(error) => {
                    let delay = self.backoff().next_delay();
                    tracing::warn!(sink = %self.name, retry_in_ms = delay.as_millis() as u64, "{error}");
                    link.retry_at = Some(Instant::now() + delay);
                    link.last_error = Some(error.clone());
                    return Err(error);
                }
            }
        }
        let connection = link.connection.as_ref().expect("connected above");
        let channel = match timeout(self.connect_timeout, open_confirm_channel(connection)).await {
            Ok(Ok(channel)) => channel,
            Ok(Err(e)) => return Err(self.failure(&e, Stage::Connect, None)),
            Err(_) => {
                link.connection = None;
                return Err(SinkError::Retryable(format!(
                    "the AMQP broker at {} did not open a channel within connect_timeout_secs",
                    self.broker
                )));
            }
        };
        link.channel = Some(channel.clone());
        Ok(channel)
    }

    fn backoff(&self) -> std::sync::MutexGuard<'_, Backoff> {
        self.backoff.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn connect(&self) -> Result<Connection, SinkError> {
        let runtime = lapin::runtime::default_runtime().map_err(|e| {
            SinkError::Retryable(format!("cannot start the AMQP client's runtime: {e}"))
        })?;
        let properties = ConnectionProperties::default()
            .with_connection_name(format!("ess-agent {}", self.name).into());
        let attempt = Connection::connect_uri_with_config(
            self.uri.clone(),
            properties,
            self.tls.clone(),
            runtime,
        );
        match timeout(self.connect_timeout, attempt).await {
            Ok(Ok(connection)) => Ok(connection),
            Ok(Err(e)) => Err(self.failure(&e, Stage::Connect, None)),
            Err(_) => Err(SinkError::Retryable(format!(
                "cannot reach the AMQP broker at {}: no answer within connect_timeout_secs ({} \
                 s): is the broker running and reachable?",
                self.broker,
                self.connect_timeout.as_secs()
            ))),
        }
    }

    /// Checks that every exchange exists, once per connection, each with a passive declare on a
    /// channel of its own: the broker closes the channel that asked for a missing exchange.
    async fn check_exchanges(&self, messages: &[Message]) -> Result<(), SinkError> {
        for message in messages {
            if message.exchange.is_empty() {
                continue;
            }
            let connection = {
                let link = self.link.lock().await;
                if link.exchanges.contains(&message.exchange) {
                    continue;
                }
                match &link.connection {
                    Some(c) => Arc::clone(c),
                    None => {
                        return Err(SinkError::Retryable(format!(
                            "not connected to {}",
                            self.broker
                        )));
                    }
                }
            };
            let check = async {
                let channel = connection.create_channel().await?;
                let declared = channel
                    .exchange_declare(
                        message.exchange.as_str().into(),
                        ExchangeKind::Direct,
                        ExchangeDeclareOptions {
                            passive: true,
                            ..ExchangeDeclareOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await;
                if declared.is_ok() {
                    let _ = channel.close(200, "OK".into()).await;
                }
                declared
            };
            match timeout(self.timeout, check).await {
                Ok(Ok(())) => {
                    self.link
                        .lock()
                        .await
                        .exchanges
                        .insert(message.exchange.clone());
                }
                Ok(Err(e)) => {
                    return Err(self.failure(&e, Stage::CheckExchange, Some(message)));
                }
                Err(_) => {
                    return Err(SinkError::Retryable(format!(
                        "the broker did not answer whether exchange {} exists within timeout_ms",
                        shown(&message.exchange)
                    )));
                }
            }
        }
        Ok(())
    }

    fn failure(&self, error: &lapin::Error, stage: Stage, message: Option<&Message>) -> SinkError {
        classify(
            error,
            stage,
            &self.broker,
            &self.vhost,
            message.map(|m| m.exchange.as_str()),
        )
    }

    /// A failure while publishing: the channel is gone, so the exchanges are checked again on
    /// the next one (one of them may have been deleted).
    async fn publish_failed(&self, error: &lapin::Error, message: &Message) -> SinkError {
        self.link.lock().await.exchanges.clear();
        self.failure(error, Stage::Publish, Some(message))
    }

    fn timed_out(&self) -> SinkError {
        SinkError::Retryable(format!(
            "no confirmation from the AMQP broker at {} within timeout_ms ({} ms)",
            self.broker,
            self.timeout.as_millis()
        ))
    }
}

/// The TLS settings for the client library: the trusted roots (`ca_file`, or the system's) and
/// the client certificate as PEM. Every file is read and checked here with the agent's own TLS
/// helpers, so that a bad file is a build error naming it rather than a failed handshake per
/// event.
fn tls_config(config: &AmqpConfig) -> Result<OwnedTLSConfig, String> {
    let client_cert = config
        .client_cert
        .as_deref()
        .zip(config.client_key.as_deref());
    client_config(&ClientTls {
        ca_file: config.ca_file.as_deref(),
        client_cert,
    })
    .map_err(|e| e.to_string())?;
    let cert_chain = match &config.ca_file {
        Some(ca) => std::fs::read_to_string(ca)
            .map_err(|e| format!("cannot read ca_file {}: {e}", ca.display()))?,
        None => {
            use base64::Engine as _;
            let mut pem = String::new();
            for cert in rustls_native_certs::load_native_certs().certs {
                let text = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
                pem.push_str("-----BEGIN CERTIFICATE-----\n");
                for line in text.as_bytes().chunks(64) {
                    pem.push_str(std::str::from_utf8(line).unwrap_or_default());
                    pem.push('\n');
                }
                pem.push_str("-----END CERTIFICATE-----\n");
            }
            pem
        }
    };
    let identity = match client_cert {
        Some((cert, key)) => Some(OwnedIdentity::PKCS8 {
            pem: std::fs::read(cert)
                .map_err(|e| format!("cannot read client_cert {}: {e}", cert.display()))?,
            key: std::fs::read(key)
                .map_err(|e| format!("cannot read client_key {}: {e}", key.display()))?,
        }),
        None => None,
    };
    Ok(OwnedTLSConfig {
        identity,
        cert_chain: Some(cert_chain),
    })
}

async fn open_confirm_channel(connection: &Connection) -> lapin::Result<Channel> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

#[async_trait::async_trait]
impl Sink for AmqpSink {
    async fn apply(&self, event: &EventMeta, output: &Value) -> Result<(), SinkError> {
        let messages = self.publishing.messages(event, output)?;
        if messages.is_empty() {
            return Ok(());
        }
        let deadline = Instant::now() + self.timeout;
        let channel = self.channel().await?;
        self.check_exchanges(&messages).await?;
        let mut confirms = Vec::with_capacity(messages.len());
        for message in &messages {
            let publish = channel.basic_publish(
                message.exchange.as_str().into(),
                message.routing_key.as_str().into(),
                BasicPublishOptions {
                    mandatory: self.publishing.mandatory,
                    ..BasicPublishOptions::default()
                },
                &message.payload,
                message.properties.clone(),
            );
            match timeout_at(deadline, publish).await {
                Ok(Ok(confirm)) => confirms.push((message, confirm)),
                Ok(Err(e)) => return Err(self.publish_failed(&e, message).await),
                Err(_) => return Err(self.timed_out()),
            }
        }
        for (message, confirm) in confirms {
            match timeout_at(deadline, confirm).await {
                Ok(Ok(Confirmation::Ack(None))) => {}
                Ok(Ok(Confirmation::Ack(Some(returned)))) => {
                    return Err(SinkError::Permanent(format!(
                        "the broker returned the message as unroutable ({} {}): no queue is bound \
                         to exchange {} for routing key {}: bind a queue that matches (or fix \
                         routing_key), then replay the dead letter",
                        returned.reply_code,
                        returned.reply_text,
                        exchange_shown(&message.exchange),
                        shown(&message.routing_key)
                    )));
                }
                Ok(Ok(Confirmation::Nack(_))) => {
                    return Err(SinkError::Retryable(format!(
                        "the broker did not take the message for exchange {} (basic.nack, e.g. \
                         a full queue with overflow reject-publish or an internal error): it \
                         is retried",
                        exchange_shown(&message.exchange)
                    )));
                }
                Ok(Ok(Confirmation::NotRequested)) => {
                    return Err(SinkError::Retryable(
                        "the channel is not in confirm mode: it is reopened".into(),
                    ));
                }
                Ok(Err(e)) => return Err(self.publish_failed(&e, message).await),
                Err(_) => return Err(self.timed_out()),
            }
        }
        Ok(())
    }

    /// Healthy while connected with an open channel; a check opens them when there are none,
    /// so a broker that is down or refuses the agent shows before the first event.
    async fn healthcheck(&self) -> Result<(), SinkError> {
        self.channel().await.map(|_| ())
    }
}

/// An exchange name for a message: the default exchange has no name.
fn exchange_shown(name: &str) -> String {
    if name.is_empty() {
        "\"\" (the default exchange)".into()
    } else {
        shown(name)
    }
}

#[cfg(test)]
mod tests;
