//! The one connection all applies share: the client's request side, its event loop, and the
//! task that keeps the connection up and turns the broker's answers into outcomes.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5 as v5b;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use super::book::{Book, Outcome, Pending};
use super::config::{Broker, MAX_PACKET, MqttConfig, MqttVersion};
use super::publish::Message;
use super::{v5, v311};
use crate::sink::SinkError;
use crate::sink::client::Backoff;

/// Which broker-side quirks an apply must respect, learned from the CONNACK (MQTT 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct BrokerLimits {
    pub(super) max_packet: Option<u32>,
    pub(super) retain_available: bool,
    pub(super) max_qos: u8,
}

impl Default for BrokerLimits {
    fn default() -> Self {
        BrokerLimits {
            max_packet: None,
            retain_available: true,
            max_qos: 2,
        }
    }
}

/// The state of the connection, as applies need it.
#[derive(Default)]
pub(super) struct Link {
    pub(super) connected: bool,
    /// Set when the last connection attempt was refused for a reason that needs an operator;
    /// cleared by a successful connection.
    pub(super) refused: Option<String>,
    /// The last connection failure, for timeout messages.
    pub(super) last_error: Option<String>,
    pub(super) limits: BrokerLimits,
}

/// What the connection task and the applies share.
pub(super) struct Shared {
    pub(super) book: Mutex<Book>,
    pub(super) link: Mutex<Link>,
    /// Woken whenever `link` changes.
    pub(super) link_changed: Notify,
    pub(super) window: Arc<Semaphore>,
}

impl Shared {
    pub(super) fn book(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn link(&self) -> MutexGuard<'_, Link> {
        self.link.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes the link and wakes whoever waits for a change.
    pub(super) fn update_link(&self, change: impl FnOnce(&mut Link)) {
        change(&mut self.link());
        self.link_changed.notify_waiters();
    }
}

/// The client side of the request channel.
#[derive(Clone)]
pub(super) enum Client {
    V311(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

impl Client {
    pub(super) fn try_publish(&self, qos: u8, retain: bool, message: &Message) -> Result<(), ()> {
        match self {
            Client::V311(client) => client
                .try_publish(
                    message.topic.clone(),
                    qos_v4(qos),
                    retain,
                    message.payload.to_vec(),
                )
                .map_err(|_| ()),
            Client::V5(client) => client
                .try_publish_with_properties(
                    message.topic.clone(),
                    qos_v5(qos),
                    retain,
                    message.payload.clone(),
                    message.properties.clone().unwrap_or_default(),
                )
                .map_err(|_| ()),
        }
    }
}

pub(super) fn qos_v4(qos: u8) -> rumqttc::QoS {
    match qos {
        0 => rumqttc::QoS::AtMostOnce,
        2 => rumqttc::QoS::ExactlyOnce,
        _ => rumqttc::QoS::AtLeastOnce,
    }
}

pub(super) fn qos_v5(qos: u8) -> rumqttc::v5::mqttbytes::QoS {
    match qos {
        0 => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        2 => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
        _ => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
    }
}

/// What the connection task learns from one poll of the client's event loop.
#[derive(Debug, PartialEq)]
pub(super) enum Happening {
    Connected {
        session_present: bool,
        limits: BrokerLimits,
    },
    Written(u16),
    Collided(u16),
    Acked(u16, Outcome),
    Received(u16, Outcome),
    Completed(u16, Outcome),
    /// Proof that the connection works (a ping answered).
    Alive,
    Other,
}

/// Why a poll failed.
pub(super) enum Failure {
    /// The sink is gone.
    Closed,
    /// A connection problem, classified.
    Error(SinkError),
}

/// The client, its event loop and the options of the clean-session reset for `config`'s
/// protocol version, with at most `window` publishes unconfirmed. Opens no connection.
pub(super) fn client(
    config: &MqttConfig,
    broker: &Broker,
    window: u16,
    credentials: Option<(String, String)>,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> (Client, Driver, ResetOptions) {
    // The client's own packet-id space is twice the window, so that an id is rarely still
    // in use when the client comes round to it again.
    let client_inflight = window.saturating_mul(2);
    let keep_alive = Duration::from_secs(u64::from(config.keep_alive_secs.max(5)));
    let channel = usize::from(window) + 1;
    let transport =
        tls.map(|tls| rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(tls)));
    match config.protocol {
        MqttVersion::V311 => {
            let mut options =
                rumqttc::MqttOptions::new(&config.client_id, &broker.host, broker.port);
            options
                .set_keep_alive(keep_alive)
                .set_clean_session(false)
                .set_inflight(client_inflight)
                .set_max_packet_size(64 * 1024, MAX_PACKET);
            if let Some((user, password)) = &credentials {
                options.set_credentials(user, password);
            }
            if let Some(transport) = &transport {
                options.set_transport(transport.clone());
            }
            let mut reset = options.clone();
            reset.set_clean_session(true);
            let (client, mut el) = rumqttc::AsyncClient::new(options, channel);
            let mut network = el.network_options();
            network.set_connection_timeout(config.connect_timeout_secs);
            el.set_network_options(network);
            (
                Client::V311(client),
                Driver::V311(Box::new(el)),
                ResetOptions::V311(Box::new(reset), config.connect_timeout_secs),
            )
        }
        MqttVersion::V5 => {
            let mut options =
                rumqttc::v5::MqttOptions::new(&config.client_id, &broker.host, broker.port);
            options
                .set_keep_alive(keep_alive)
                .set_clean_start(false)
                .set_session_expiry_interval(Some(config.session_expiry_secs))
                .set_outgoing_inflight_upper_limit(client_inflight)
                .set_connection_timeout(config.connect_timeout_secs);
            if let Some((user, password)) = &credentials {
                options.set_credentials(user, password);
            }
            if let Some(transport) = &transport {
                options.set_transport(transport.clone());
            }
            let mut reset = options.clone();
            reset
                .set_clean_start(true)
                .set_session_expiry_interval(None);
            let (client, el) = rumqttc::v5::AsyncClient::new(options, channel);
            (
                Client::V5(client),
                Driver::V5(Box::new(el)),
                ResetOptions::V5(Box::new(reset)),
            )
        }
    }
}

/// The event loop of either protocol version.
pub(super) enum Driver {
    V311(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
}

impl Driver {
    pub(super) async fn poll(&mut self, broker: &Broker) -> Result<Happening, Failure> {
        match self {
            Driver::V311(el) => match el.poll().await {
                Ok(event) => Ok(v311::happening(event)),
                Err(e) => Err(v311::failure(e, broker)),
            },
            Driver::V5(el) => match el.poll().await {
                Ok(event) => Ok(v5::happening(event)),
                Err(e) => Err(v5::failure(e, broker)),
            },
        }
    }

    /// What the client will resend after reconnecting (if the broker kept the session).
    pub(super) fn pending(&self) -> Vec<Pending> {
        match self {
            Driver::V311(el) => el
                .pending
                .iter()
                .filter_map(|r| match r {
                    rumqttc::Request::Publish(p) => Some(Pending::Publish(p.pkid)),
                    rumqttc::Request::PubRel(r) => Some(Pending::Release(r.pkid)),
                    _ => None,
                })
                .collect(),
            Driver::V5(el) => el
                .pending
                .iter()
                .filter_map(|r| match r {
                    rumqttc::v5::Request::Publish(p) => Some(Pending::Publish(p.pkid)),
                    rumqttc::v5::Request::PubRel(r) => Some(Pending::Release(r.pkid)),
                    _ => None,
                })
                .collect(),
        }
    }
}

/// How to connect: everything the connection task needs besides the event loop.
pub(super) struct Connection {
    pub(super) name: String,
    pub(super) broker: Broker,
    /// Options for the one-off clean-session connection made before the first real one.
    pub(super) reset: ResetOptions,
    pub(super) reconnect_initial: Duration,
    pub(super) reconnect_max: Duration,
}

#[derive(Clone)]
pub(super) enum ResetOptions {
    V311(Box<rumqttc::MqttOptions>, u64),
    V5(Box<rumqttc::v5::MqttOptions>),
}

impl ResetOptions {
    /// Connects once with a clean session and disconnects, so that the broker forgets what an
    /// earlier process with this client id left in its session.
    pub(super) async fn run(&self, broker: &Broker) -> Result<(), Failure> {
        match self {
            ResetOptions::V311(options, connect_timeout) => {
                let (client, mut el) = rumqttc::AsyncClient::new((**options).clone(), 1);
                let mut network = el.network_options();
                network.set_connection_timeout(*connect_timeout);
                el.set_network_options(network);
                loop {
                    match el.poll().await {
                        Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                            let _ = client.try_disconnect();
                        }
                        Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) => {
                            return Ok(());
                        }
                        Ok(_) => {}
                        Err(e) => return Err(v311::failure(e, broker)),
                    }
                }
            }
            ResetOptions::V5(options) => {
                let (client, mut el) = rumqttc::v5::AsyncClient::new((**options).clone(), 1);
                loop {
                    match el.poll().await {
                        Ok(rumqttc::v5::Event::Incoming(v5b::Packet::ConnAck(_))) => {
                            let _ = client.try_disconnect();
                        }
                        Ok(rumqttc::v5::Event::Outgoing(rumqttc::Outgoing::Disconnect)) => {
                            return Ok(());
                        }
                        Ok(_) => {}
                        Err(e) => return Err(v5::failure(e, broker)),
                    }
                }
            }
        }
    }
}

/// Sleeps unless stopped; false when stopped.
pub(super) async fn pause(delay: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

/// The connection task: keeps the connection up and turns the client's events into outcomes
/// for the waiting applies.
pub(super) async fn drive(
    shared: Arc<Shared>,
    mut driver: Driver,
    conn: Connection,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::new(conn.reconnect_initial, conn.reconnect_max);
    loop {
        let attempt = tokio::select! {
            _ = stop.cancelled() => return,
            attempt = conn.reset.run(&conn.broker) => attempt,
        };
        match attempt {
            Ok(()) => break,
            Err(Failure::Closed) => return,
            Err(Failure::Error(error)) => {
                connect_failed(&shared, &conn, &error);
                if !pause(backoff.next_delay(), &stop).await {
                    return;
                }
            }
        }
    }
    let mut connected = false;
    let mut resend = Vec::new();
    loop {
        if !connected {
            // What the client holds for resending now is what a new session would discard.
            resend = driver.pending();
        }
        let polled = tokio::select! {
            _ = stop.cancelled() => return,
            polled = driver.poll(&conn.broker) => polled,
        };
        match polled {
            Ok(Happening::Connected {
                session_present,
                limits,
            }) => {
                connected = true;
                shared.update_link(|link| {
                    link.connected = true;
                    link.refused = None;
                    link.last_error = None;
                    link.limits = limits;
                });
                if !session_present {
                    shared.book().session_lost(&resend);
                }
                let in_flight = shared.book().in_flight();
                tracing::info!(sink = %conn.name, broker = %conn.broker, session_present, in_flight, "mqtt connected");
            }
            Ok(Happening::Written(pkid)) => shared.book().written(pkid),
            Ok(Happening::Collided(pkid)) => shared.book().collision(pkid),
            Ok(Happening::Acked(pkid, outcome)) => {
                backoff.reset();
                shared.book().acked(pkid, outcome);
            }
            Ok(Happening::Received(pkid, outcome)) => shared.book().received(pkid, outcome),
            Ok(Happening::Completed(pkid, outcome)) => {
                backoff.reset();
                shared.book().completed(pkid, outcome);
            }
            Ok(Happening::Alive) => backoff.reset(),
            Ok(Happening::Other) => {}
            Err(Failure::Closed) => return,
            Err(Failure::Error(error)) => {
                if connected {
                    connected = false;
                    shared.update_link(|link| {
                        link.connected = false;
                        link.last_error = Some(error.to_string());
                    });
                    // Waiting applies keep waiting: their publishes are resent after the
                    // reconnect. Should that fail, they are told.
                    tracing::warn!(sink = %conn.name, broker = %conn.broker, error = %error, "mqtt connection lost; reconnecting");
                } else {
                    connect_failed(&shared, &conn, &error);
                }
                if !pause(backoff.next_delay(), &stop).await {
                    return;
                }
            }
        }
    }
}

/// A connection attempt failed: every waiting apply hears why (their publishes stay queued).
pub(super) fn connect_failed(shared: &Shared, conn: &Connection, error: &SinkError) {
    shared.update_link(|link| {
        link.connected = false;
        link.last_error = Some(error.to_string());
        link.refused = match error {
            SinkError::Permanent(message) => Some(message.clone()),
            SinkError::Retryable(_) | SinkError::RetryAfter(..) => None,
        };
    });
    shared.book().fail_waiters(error);
    tracing::warn!(sink = %conn.name, broker = %conn.broker, error = %error, "mqtt connection attempt failed");
}
