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

mod config;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5 as v5b;
use serde_json::{Value, json};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, oneshot};
use tokio::time::{Instant, timeout_at};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::template::Template;
use super::{EventMeta, Sink, SinkError, SinkSpec};
use crate::http_client::{ClientTls, client_config};
use crate::settings::read_secret;
pub use config::MqttConfig;
use config::*;

const JSON: &str = "application/json";
const TEXT: &str = "text/plain; charset=utf-8";

/// Which broker-side quirks an apply must respect, learned from the CONNACK (MQTT 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BrokerLimits {
    max_packet: Option<u32>,
    retain_available: bool,
    max_qos: u8,
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

/// Identifies one record of one event on one route: a retry of the same record may wait for
/// the publish already in flight instead of sending a second copy.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct RecordKey {
    event_id: String,
    route: String,
    index: usize,
}

/// A digest of everything that goes on the wire for a record (topic, flags, payload,
/// properties): a publish is reused for a retry only when it is the same message.
type Fingerprint = [u8; 32];

/// One message, ready to publish.
#[derive(Debug, Clone)]
struct Message {
    key: RecordKey,
    fingerprint: Fingerprint,
    topic: String,
    payload: Bytes,
    /// MQTT 5 properties; `None` for MQTT 3.1.1.
    properties: Option<v5b::PublishProperties>,
    /// Bytes on the wire, without the fixed header.
    size: usize,
}

/// What an apply is told about its message.
type Outcome = Result<(), SinkError>;

/// One publish handed to the client and not yet confirmed (or failed).
struct Entry {
    key: RecordKey,
    fingerprint: Fingerprint,
    waiters: Vec<oneshot::Sender<Outcome>>,
    /// The place in the in-flight window; freed with the entry, not with the apply, so a publish
    /// whose apply gave up still counts until the broker confirms it.
    _permit: Option<OwnedSemaphorePermit>,
}

/// One item of the client's resend queue (the publishes and releases it holds while
/// disconnected).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    /// A publish; packet id 0 means it never left (it was drained from the request channel).
    Publish(u16),
    /// A QoS 2 release (PUBREL) waiting for its PUBCOMP.
    Release(u16),
}

/// Answer to an apply that asks whether a record is already taken care of.
enum Attach {
    /// The broker confirmed this very message after its apply had given up.
    Confirmed,
    /// The message is in flight; the receiver completes with its outcome.
    Waiting(oneshot::Receiver<Outcome>),
    /// Nothing known: publish it.
    Publish,
}

/// How long a healthcheck waits for the outcome of a connection attempt under way.
const HEALTH_WAIT: Duration = Duration::from_secs(5);

/// How many confirmations that nobody waited for are remembered.
const ORPHANS: usize = 65_536;

/// The bookkeeping that matches the broker's confirmations to the applies waiting for them.
///
/// A publish goes through: `queued` (handed to the client, no packet id yet; the client takes
/// them in order, so the next new packet id the client reports belongs to the front) →
/// `awaiting_ack` by packet id (QoS 1: PUBACK; QoS 2: PUBREC) → for QoS 2 `awaiting_comp`
/// (PUBCOMP). QoS 0 publishes are done when written. A packet id can be in both maps at once:
/// the client reuses the id of a QoS 2 message once its PUBREC is in, before the PUBCOMP.
#[derive(Default)]
struct Book {
    next_id: u64,
    entries: HashMap<u64, Entry>,
    by_key: HashMap<RecordKey, u64>,
    queued: VecDeque<u64>,
    awaiting_ack: HashMap<u16, u64>,
    awaiting_comp: HashMap<u16, u64>,
    /// A publish the client holds back because its packet id is still in use (it reports
    /// "await ack" for it, and "publish" with the same id once the id is free).
    collided: Option<(u16, u64)>,
    /// Confirmed records whose applies had stopped waiting, oldest first.
    orphans: HashMap<RecordKey, Fingerprint>,
    orphan_order: VecDeque<RecordKey>,
}

impl Book {
    /// Looks for an earlier publish of the same record with the same content.
    fn attach(&mut self, key: &RecordKey, fingerprint: &Fingerprint) -> Attach {
        if let Some(done) = self.orphans.get(key) {
            if done == fingerprint {
                // Used once: a later replay of the event publishes again, as it should.
                self.orphans.remove(key);
                return Attach::Confirmed;
            }
            self.orphans.remove(key);
        }
        if let Some(id) = self.by_key.get(key)
            && let Some(entry) = self.entries.get_mut(id)
            && entry.fingerprint == *fingerprint
        {
            let (tx, rx) = oneshot::channel();
            entry.waiters.push(tx);
            return Attach::Waiting(rx);
        }
        Attach::Publish
    }

    /// Records a publish about to be handed to the client. Call under the same lock as the
    /// hand-over, so that `queued` has the client's order.
    fn enqueue(
        &mut self,
        key: RecordKey,
        fingerprint: Fingerprint,
        permit: Option<OwnedSemaphorePermit>,
    ) -> (u64, oneshot::Receiver<Outcome>) {
        let id = self.next_id;
        self.next_id += 1;
        let (tx, rx) = oneshot::channel();
        self.by_key.insert(key.clone(), id);
        self.entries.insert(
            id,
            Entry {
                key,
                fingerprint,
                waiters: vec![tx],
                _permit: permit,
            },
        );
        self.queued.push_back(id);
        (id, rx)
    }

    /// Forgets a publish the client refused to take (it is the last one queued).
    fn unqueue(&mut self, id: u64) {
        if self.queued.back() == Some(&id) {
            self.queued.pop_back();
        }
        if let Some(entry) = self.entries.remove(&id)
            && self.by_key.get(&entry.key) == Some(&id)
        {
            self.by_key.remove(&entry.key);
        }
    }

    /// The client wrote a publish with this packet id (0 for QoS 0).
    fn written(&mut self, pkid: u16) {
        if pkid == 0 {
            match self.queued.pop_front() {
                Some(id) => self.resolve(id, Ok(())),
                None => {
                    tracing::warn!("mqtt: a QoS 0 publish was written that no apply handed over")
                }
            }
            return;
        }
        if let Some((held, id)) = self.collided
            && held == pkid
            && !self.awaiting_ack.contains_key(&pkid)
        {
            self.collided = None;
            self.awaiting_ack.insert(pkid, id);
            return;
        }
        if self.awaiting_ack.contains_key(&pkid) {
            // A resend after a reconnect.
            return;
        }
        match self.queued.pop_front() {
            Some(id) => {
                self.awaiting_ack.insert(pkid, id);
            }
            None => tracing::warn!(
                pkid,
                "mqtt: a publish was written that no apply handed over"
            ),
        }
    }

    /// The client holds the next publish back until `pkid` is free.
    fn collision(&mut self, pkid: u16) {
        if let Some(id) = self.queued.pop_front() {
            self.collided = Some((pkid, id));
        }
    }

    /// PUBACK (QoS 1).
    fn acked(&mut self, pkid: u16, outcome: Outcome) {
        if let Some(id) = self.awaiting_ack.remove(&pkid) {
            self.resolve(id, outcome);
        }
    }

    /// PUBREC (QoS 2): on success the message is the broker's; the exchange ends with PUBCOMP.
    fn received(&mut self, pkid: u16, outcome: Outcome) {
        if let Some(id) = self.awaiting_ack.remove(&pkid) {
            match outcome {
                Ok(()) => {
                    self.awaiting_comp.insert(pkid, id);
                }
                Err(e) => self.resolve(id, Err(e)),
            }
        }
    }

    /// PUBCOMP (QoS 2).
    fn completed(&mut self, pkid: u16, outcome: Outcome) {
        if let Some(id) = self.awaiting_comp.remove(&pkid) {
            self.resolve(id, outcome);
        }
    }

    /// The broker started a new session: what the client held for resending (`pending`, as it
    /// was before the connection) is gone, and so are those publishes.
    fn session_lost(&mut self, pending: &[Pending]) {
        let lost = || {
            SinkError::Retryable(
                "the broker did not keep the session (it restarted without persistence, or the \
                 session expired), so the message was not confirmed: publishing it again"
                    .into(),
            )
        };
        let mut never_sent = 0;
        for item in pending {
            match *item {
                Pending::Publish(0) => never_sent += 1,
                Pending::Publish(pkid) => {
                    if let Some(id) = self.awaiting_ack.remove(&pkid) {
                        self.resolve(id, Err(lost()));
                    }
                }
                Pending::Release(pkid) => {
                    if let Some(id) = self.awaiting_comp.remove(&pkid) {
                        self.resolve(id, Err(lost()));
                    }
                }
            }
        }
        // Publishes drained from the request channel are the oldest of those not yet written.
        for _ in 0..never_sent {
            if let Some(id) = self.queued.pop_front() {
                self.resolve(id, Err(lost()));
            }
        }
    }

    /// Tells every waiting apply `error`; the publishes stay in flight.
    fn fail_waiters(&mut self, error: &SinkError) {
        for entry in self.entries.values_mut() {
            for tx in entry.waiters.drain(..) {
                let _ = tx.send(Err(error.clone()));
            }
        }
    }

    fn resolve(&mut self, id: u64, outcome: Outcome) {
        let Some(entry) = self.entries.remove(&id) else {
            return;
        };
        if self.by_key.get(&entry.key) == Some(&id) {
            self.by_key.remove(&entry.key);
        }
        let mut heard = false;
        for tx in entry.waiters {
            heard |= tx.send(outcome.clone()).is_ok();
        }
        if !heard && outcome.is_ok() {
            self.remember(entry.key, entry.fingerprint);
        }
    }

    fn remember(&mut self, key: RecordKey, fingerprint: Fingerprint) {
        if self.orphans.insert(key.clone(), fingerprint).is_none() {
            self.orphan_order.push_back(key);
        }
        while self.orphans.len() > ORPHANS {
            match self.orphan_order.pop_front() {
                Some(old) => {
                    self.orphans.remove(&old);
                }
                None => break,
            }
        }
        // Keys used up by `attach` leave stale places in the order; drop them now and then.
        if self.orphan_order.len() > 2 * ORPHANS {
            let orphans = &self.orphans;
            self.orphan_order.retain(|k| orphans.contains_key(k));
        }
    }

    /// Publishes handed over and not yet confirmed.
    fn in_flight(&self) -> usize {
        self.entries.len()
    }
}

/// The state of the connection, as applies need it.
#[derive(Default)]
struct Link {
    connected: bool,
    /// Set when the last connection attempt was refused for a reason that needs an operator;
    /// cleared by a successful connection.
    refused: Option<String>,
    /// The last connection failure, for timeout messages.
    last_error: Option<String>,
    limits: BrokerLimits,
}

/// What the connection task and the applies share.
struct Shared {
    book: Mutex<Book>,
    link: Mutex<Link>,
    /// Woken whenever `link` changes.
    link_changed: Notify,
    window: Arc<Semaphore>,
}

impl Shared {
    fn book(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn link(&self) -> MutexGuard<'_, Link> {
        self.link.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes the link and wakes whoever waits for a change.
    fn update_link(&self, change: impl FnOnce(&mut Link)) {
        change(&mut self.link());
        self.link_changed.notify_waiters();
    }
}

/// The client side of the request channel.
#[derive(Clone)]
enum Client {
    V311(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

impl Client {
    fn try_publish(&self, qos: u8, retain: bool, message: &Message) -> Result<(), ()> {
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

fn qos_v4(qos: u8) -> rumqttc::QoS {
    match qos {
        0 => rumqttc::QoS::AtMostOnce,
        2 => rumqttc::QoS::ExactlyOnce,
        _ => rumqttc::QoS::AtLeastOnce,
    }
}

fn qos_v5(qos: u8) -> rumqttc::v5::mqttbytes::QoS {
    match qos {
        0 => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        2 => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
        _ => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
    }
}

/// What the connection task learns from one poll of the client's event loop.
#[derive(Debug, PartialEq)]
enum Happening {
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
enum Failure {
    /// The sink is gone.
    Closed,
    /// A connection problem, classified.
    Error(SinkError),
}

/// The event loop of either protocol version.
enum Driver {
    V311(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
}

impl Driver {
    async fn poll(&mut self, broker: &Broker) -> Result<Happening, Failure> {
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
    fn pending(&self) -> Vec<Pending> {
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

/// Finds a rustls error in an error's chain (tokio-rustls wraps it in an `io::Error`).
fn rustls_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<rustls::Error>() {
            return Some(found);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
            && let Some(found) = inner.downcast_ref::<rustls::Error>()
        {
            return Some(found);
        }
        current = e.source();
    }
    None
}

// The connection failures both protocol versions word alike (their error types differ).

/// No CONNACK within the connect timeout: retryable.
fn no_connack(broker: &Broker) -> Failure {
    Failure::Error(SinkError::Retryable(format!(
        "no CONNACK from the MQTT broker at {broker} within connect_timeout_secs"
    )))
}

/// The broker closed the connection: retryable.
fn closed(broker: &Broker) -> Failure {
    Failure::Error(SinkError::Retryable(format!(
        "the MQTT broker at {broker} closed the connection"
    )))
}

/// The broker stopped answering pings: retryable.
fn no_pong(broker: &Broker) -> Failure {
    Failure::Error(SinkError::Retryable(format!(
        "the MQTT broker at {broker} stopped answering pings"
    )))
}

/// Describes a connection error; every one of these is retryable.
fn describe_connection_error(error: &(dyn std::error::Error + 'static), broker: &Broker) -> String {
    use rustls::{AlertDescription, CertificateError};
    if let Some(tls) = rustls_error(error) {
        let advice = match tls {
            // A bad signature is what a different CA with the same name gives.
            rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer | CertificateError::BadSignature,
            ) => {
                "the broker's certificate is not signed by a CA the agent trusts: set ca_file to \
                 the CA that signed it"
            }
            rustls::Error::InvalidCertificate(CertificateError::NotValidForName)
            | rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
                ..
            }) => {
                "the broker's certificate is not valid for the host in url: use a host name it names"
            }
            rustls::Error::InvalidCertificate(CertificateError::Expired)
            | rustls::Error::InvalidCertificate(CertificateError::ExpiredContext { .. }) => {
                "the broker's certificate has expired: renew it on the broker"
            }
            rustls::Error::InvalidCertificate(_) => {
                "the broker's certificate was refused: check ca_file and the broker's certificate"
            }
            rustls::Error::AlertReceived(
                AlertDescription::CertificateRequired
                | AlertDescription::HandshakeFailure
                | AlertDescription::BadCertificate
                | AlertDescription::UnknownCA,
            ) => {
                "the broker refused the handshake, probably the agent's client certificate: \
                 check client_cert and client_key"
            }
            _ => "check that the broker speaks TLS on this port",
        };
        return format!("TLS handshake with {broker} failed ({tls}): {advice}");
    }
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            let advice = match io.kind() {
                std::io::ErrorKind::ConnectionRefused => {
                    ": is the broker running and listening on this port?"
                }
                _ => "",
            };
            return format!("cannot reach the MQTT broker at {broker}: {io}{advice}");
        }
        current = e.source();
    }
    format!("connection to the MQTT broker at {broker} failed: {error}")
}

/// MQTT 3.1.1 event mapping and error classification.
mod v311 {
    use rumqttc::{ConnectReturnCode, ConnectionError, Event, Outgoing, Packet, StateError};

    use super::{
        Broker, BrokerLimits, Failure, Happening, SinkError, closed, describe_connection_error,
        no_connack, no_pong,
    };

    pub(super) fn happening(event: Event) -> Happening {
        match event {
            Event::Incoming(Packet::ConnAck(ack)) => Happening::Connected {
                session_present: ack.session_present,
                limits: BrokerLimits::default(),
            },
            Event::Incoming(Packet::PubAck(ack)) => Happening::Acked(ack.pkid, Ok(())),
            Event::Incoming(Packet::PubRec(rec)) => Happening::Received(rec.pkid, Ok(())),
            Event::Incoming(Packet::PubComp(comp)) => Happening::Completed(comp.pkid, Ok(())),
            Event::Incoming(Packet::PingResp) => Happening::Alive,
            Event::Outgoing(Outgoing::Publish(pkid)) => Happening::Written(pkid),
            Event::Outgoing(Outgoing::AwaitAck(pkid)) => Happening::Collided(pkid),
            _ => Happening::Other,
        }
    }

    /// The CONNACK return code's number and meaning, and whether it needs an operator.
    pub(super) fn refusal(code: ConnectReturnCode) -> (u8, &'static str, bool, &'static str) {
        match code {
            ConnectReturnCode::Success => (0, "accepted", false, ""),
            ConnectReturnCode::RefusedProtocolVersion => (
                1,
                "unacceptable protocol version",
                true,
                "the broker does not speak MQTT 3.1.1",
            ),
            ConnectReturnCode::BadClientId => (
                2,
                "identifier rejected",
                true,
                "choose another client_id (1 to 23 letters and digits work everywhere)",
            ),
            ConnectReturnCode::ServiceUnavailable => (3, "server unavailable", false, ""),
            ConnectReturnCode::BadUserNamePassword => (
                4,
                "bad user name or password",
                true,
                "check username and password",
            ),
            ConnectReturnCode::NotAuthorized => (
                5,
                "not authorized",
                true,
                "check username and password and the broker's access rules",
            ),
        }
    }

    pub(super) fn failure(error: ConnectionError, broker: &Broker) -> Failure {
        match error {
            ConnectionError::RequestsDone => Failure::Closed,
            ConnectionError::ConnectionRefused(code) => {
                let (number, meaning, permanent, advice) = refusal(code);
                let message = format!(
                    "the MQTT broker at {broker} refused the connection: CONNACK return code \
                     {number} ({meaning}){}{advice}",
                    if advice.is_empty() { "" } else { ": " }
                );
                Failure::Error(if permanent {
                    SinkError::Permanent(message)
                } else {
                    SinkError::Retryable(message)
                })
            }
            ConnectionError::NetworkTimeout => no_connack(broker),
            ConnectionError::FlushTimeout => Failure::Error(SinkError::Retryable(format!(
                "writing to the MQTT broker at {broker} timed out"
            ))),
            ConnectionError::MqttState(StateError::ConnectionAborted) => closed(broker),
            ConnectionError::MqttState(StateError::AwaitPingResp) => no_pong(broker),
            other => Failure::Error(SinkError::Retryable(describe_connection_error(
                &other, broker,
            ))),
        }
    }
}

/// MQTT 5 event mapping and error classification.
mod v5 {
    use rumqttc::Outgoing;
    use rumqttc::v5::mqttbytes::v5::{
        ConnectReturnCode, DisconnectReasonCode, Packet, PubAckReason, PubCompReason, PubRecReason,
    };
    use rumqttc::v5::{ConnectionError, Event, StateError};

    use super::{
        Broker, BrokerLimits, Failure, Happening, SinkError, closed, describe_connection_error,
        no_connack, no_pong,
    };

    pub(super) fn happening(event: Event) -> Happening {
        match event {
            Event::Incoming(Packet::ConnAck(ack)) => {
                let props = ack.properties.as_ref();
                Happening::Connected {
                    session_present: ack.session_present,
                    limits: BrokerLimits {
                        max_packet: props.and_then(|p| p.max_packet_size),
                        retain_available: props.and_then(|p| p.retain_available) != Some(0),
                        max_qos: props.and_then(|p| p.max_qos).unwrap_or(2),
                    },
                }
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                let reason = ack.properties.and_then(|p| p.reason_string);
                Happening::Acked(ack.pkid, puback(ack.reason, reason, "PUBACK"))
            }
            Event::Incoming(Packet::PubRec(rec)) => {
                let reason = rec.properties.and_then(|p| p.reason_string);
                Happening::Received(rec.pkid, pubrec(rec.reason, reason))
            }
            Event::Incoming(Packet::PubComp(comp)) => {
                let outcome = match comp.reason {
                    PubCompReason::Success => Ok(()),
                    PubCompReason::PacketIdentifierNotFound => Err(SinkError::Retryable(
                        "the broker answered PUBREL with PUBCOMP reason code 0x92 (packet \
                         identifier not found): publishing again"
                            .into(),
                    )),
                };
                Happening::Completed(comp.pkid, outcome)
            }
            Event::Incoming(Packet::PingResp(_)) => Happening::Alive,
            Event::Outgoing(Outgoing::Publish(pkid)) => Happening::Written(pkid),
            Event::Outgoing(Outgoing::AwaitAck(pkid)) => Happening::Collided(pkid),
            _ => Happening::Other,
        }
    }

    /// A publish reason code's number and meaning, and whether it needs an operator (None:
    /// success).
    fn publish_reason(reason: PubAckReason) -> Option<(u8, &'static str, bool)> {
        Some(match reason {
            PubAckReason::Success | PubAckReason::NoMatchingSubscribers => return None,
            PubAckReason::UnspecifiedError => (0x80, "unspecified error", false),
            PubAckReason::ImplementationSpecificError => {
                (0x83, "implementation specific error", false)
            }
            PubAckReason::NotAuthorized => (0x87, "not authorized", true),
            PubAckReason::TopicNameInvalid => (0x90, "topic name invalid", true),
            PubAckReason::PacketIdentifierInUse => (0x91, "packet identifier in use", false),
            PubAckReason::QuotaExceeded => (0x97, "quota exceeded", false),
            PubAckReason::PayloadFormatInvalid => (0x99, "payload format invalid", true),
        })
    }

    fn refused_message(
        packet: &str,
        (number, meaning, permanent): (u8, &'static str, bool),
        reason: Option<String>,
    ) -> SinkError {
        let said = reason
            .map(|r| format!(" (the broker said: {r})"))
            .unwrap_or_default();
        let message = format!(
            "the broker refused the message: {packet} reason code {number:#04x} ({meaning}){said}{}",
            if number == 0x87 {
                ": check the broker's access rules for this user and topic"
            } else {
                ""
            }
        );
        if permanent {
            SinkError::Permanent(message)
        } else {
            SinkError::Retryable(message)
        }
    }

    pub(super) fn puback(
        reason: PubAckReason,
        said: Option<String>,
        packet: &str,
    ) -> Result<(), SinkError> {
        match publish_reason(reason) {
            None => Ok(()),
            Some(code) => Err(refused_message(packet, code, said)),
        }
    }

    fn pubrec(reason: PubRecReason, said: Option<String>) -> Result<(), SinkError> {
        let same = match reason {
            PubRecReason::Success => PubAckReason::Success,
            PubRecReason::NoMatchingSubscribers => PubAckReason::NoMatchingSubscribers,
            PubRecReason::UnspecifiedError => PubAckReason::UnspecifiedError,
            PubRecReason::ImplementationSpecificError => PubAckReason::ImplementationSpecificError,
            PubRecReason::NotAuthorized => PubAckReason::NotAuthorized,
            PubRecReason::TopicNameInvalid => PubAckReason::TopicNameInvalid,
            PubRecReason::PacketIdentifierInUse => PubAckReason::PacketIdentifierInUse,
            PubRecReason::QuotaExceeded => PubAckReason::QuotaExceeded,
            PubRecReason::PayloadFormatInvalid => PubAckReason::PayloadFormatInvalid,
        };
        puback(same, said, "PUBREC")
    }

    /// The CONNACK reason code's number and meaning, whether it needs an operator, and advice.
    pub(super) fn refusal(code: ConnectReturnCode) -> (u8, &'static str, bool, &'static str) {
        use ConnectReturnCode as C;
        let credentials = "check username and password";
        match code {
            C::Success => (0x00, "success", false, ""),
            C::RefusedProtocolVersion => (0x01, "unacceptable protocol version", true, ""),
            C::BadClientId => (
                0x02,
                "identifier rejected",
                true,
                "choose another client_id",
            ),
            C::ServiceUnavailable => (0x03, "server unavailable", false, ""),
            C::UnspecifiedError => (0x80, "unspecified error", false, ""),
            C::MalformedPacket => (0x81, "malformed packet", true, ""),
            C::ProtocolError => (0x82, "protocol error", true, ""),
            C::ImplementationSpecificError => (0x83, "implementation specific error", false, ""),
            C::UnsupportedProtocolVersion => (
                0x84,
                "unsupported protocol version",
                true,
                "the broker does not speak MQTT 5: set protocol = \"3.1.1\"",
            ),
            C::ClientIdentifierNotValid => (
                0x85,
                "client identifier not valid",
                true,
                "choose another client_id (1 to 23 letters and digits work everywhere)",
            ),
            C::BadUserNamePassword => (0x86, "bad user name or password", true, credentials),
            C::NotAuthorized => (
                0x87,
                "not authorized",
                true,
                "check username and password and the broker's access rules",
            ),
            C::ServerUnavailable => (0x88, "server unavailable", false, ""),
            C::ServerBusy => (0x89, "server busy", false, ""),
            C::Banned => (0x8a, "banned", true, "ask the broker's operator why"),
            C::BadAuthenticationMethod => (0x8c, "bad authentication method", true, credentials),
            C::TopicNameInvalid => (0x90, "topic name invalid", true, ""),
            C::PacketTooLarge => (0x95, "packet too large", true, ""),
            C::QuotaExceeded => (0x97, "quota exceeded", false, ""),
            C::PayloadFormatInvalid => (0x99, "payload format invalid", true, ""),
            C::RetainNotSupported => (0x9a, "retain not supported", true, "set retain = false"),
            C::QoSNotSupported => (0x9b, "QoS not supported", true, "choose a lower qos"),
            C::UseAnotherServer => (0x9c, "use another server", false, ""),
            C::ServerMoved => (0x9d, "server moved", false, "update url"),
            C::ConnectionRateExceeded => (0x9f, "connection rate exceeded", false, ""),
        }
    }

    fn disconnect_reason(code: DisconnectReasonCode) -> String {
        let number = code as u8;
        let meaning = match code {
            DisconnectReasonCode::SessionTakenOver => {
                "session taken over: another client connected with this client_id; give every \
                 agent its own client_id"
            }
            DisconnectReasonCode::NotAuthorized => "not authorized",
            DisconnectReasonCode::ServerShuttingDown => "server shutting down",
            DisconnectReasonCode::KeepAliveTimeout => "keep alive timeout",
            DisconnectReasonCode::PacketTooLarge => "packet too large",
            DisconnectReasonCode::QuotaExceeded => "quota exceeded",
            DisconnectReasonCode::AdministrativeAction => "administrative action",
            _ => "see the broker's log",
        };
        format!("reason code {number:#04x} ({meaning})")
    }

    pub(super) fn failure(error: ConnectionError, broker: &Broker) -> Failure {
        match error {
            ConnectionError::RequestsDone => Failure::Closed,
            ConnectionError::ConnectionRefused(code)
            | ConnectionError::MqttState(StateError::ConnFail { reason: code }) => {
                let (number, meaning, permanent, advice) = refusal(code);
                let message = format!(
                    "the MQTT broker at {broker} refused the connection: CONNACK reason code \
                     {number:#04x} ({meaning}){}{advice}",
                    if advice.is_empty() { "" } else { ": " }
                );
                Failure::Error(if permanent {
                    SinkError::Permanent(message)
                } else {
                    SinkError::Retryable(message)
                })
            }
            ConnectionError::MqttState(StateError::ServerDisconnect {
                reason_code,
                reason_string,
            }) => Failure::Error(SinkError::Retryable(format!(
                "the MQTT broker at {broker} disconnected: {}{}",
                disconnect_reason(reason_code),
                reason_string
                    .map(|r| format!(" (the broker said: {r})"))
                    .unwrap_or_default()
            ))),
            ConnectionError::Timeout(_) => no_connack(broker),
            ConnectionError::MqttState(StateError::ConnectionAborted) => closed(broker),
            ConnectionError::MqttState(StateError::AwaitPingResp) => no_pong(broker),
            other => Failure::Error(SinkError::Retryable(describe_connection_error(
                &other, broker,
            ))),
        }
    }
}

/// Exponential backoff between reconnection attempts.
struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max,
            next: initial,
        }
    }

    fn next(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    fn reset(&mut self) {
        self.next = self.initial;
    }
}

/// How to connect: everything the connection task needs besides the event loop.
struct Connection {
    name: String,
    broker: Broker,
    /// Options for the one-off clean-session connection made before the first real one.
    reset: ResetOptions,
    reconnect_initial: Duration,
    reconnect_max: Duration,
}

#[derive(Clone)]
enum ResetOptions {
    V311(Box<rumqttc::MqttOptions>, u64),
    V5(Box<rumqttc::v5::MqttOptions>),
}

impl ResetOptions {
    /// Connects once with a clean session and disconnects, so that the broker forgets what an
    /// earlier process with this client id left in its session.
    async fn run(&self, broker: &Broker) -> Result<(), Failure> {
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
async fn pause(delay: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

/// The connection task: keeps the connection up and turns the client's events into outcomes
/// for the waiting applies.
async fn drive(shared: Arc<Shared>, mut driver: Driver, conn: Connection, stop: CancellationToken) {
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
                if !pause(backoff.next(), &stop).await {
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
                if !pause(backoff.next(), &stop).await {
                    return;
                }
            }
        }
    }
}

/// A connection attempt failed: every waiting apply hears why (their publishes stay queued).
fn connect_failed(shared: &Shared, conn: &Connection, error: &SinkError) {
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

/// What the sink needs to render and publish messages.
struct Publishing {
    topic: Template,
    allow_empty_levels: bool,
    qos: u8,
    retain: bool,
    envelope: bool,
    v5: bool,
    content_type: Option<String>,
    message_expiry: Option<u32>,
}

impl Publishing {
    /// Renders, checks and encodes every record. Pure: nothing is published.
    fn messages(&self, event: &EventMeta, output: &Value) -> Result<Vec<Message>, SinkError> {
        let (records, array): (Vec<&Value>, bool) = match output {
            Value::Array(items) => (items.iter().collect(), true),
            other => (vec![other], false),
        };
        let mut messages = Vec::with_capacity(records.len());
        for (index, record) in records.into_iter().enumerate() {
            let which = if array {
                format!("record {index}: ")
            } else {
                String::new()
            };
            let topic = self.topic.render(event, record, index).map_err(|e| {
                SinkError::Permanent(format!(
                    "{which}cannot render the topic {:?}: {e}",
                    self.topic.text()
                ))
            })?;
            check_topic(&topic, self.allow_empty_levels)
                .map_err(|e| SinkError::Permanent(format!("{which}{e}")))?;
            let (payload, default_type) = if self.envelope {
                let mut wrapped = json!({
                    "ess_event_id": event.id,
                    "ess_event_type": event.event_type,
                    "ess_route": event.route,
                });
                if array {
                    wrapped["ess_record"] = json!(index);
                }
                wrapped["output"] = record.clone();
                (serde_json::to_vec(&wrapped), JSON)
            } else {
                match record {
                    Value::String(text) => (Ok(text.clone().into_bytes()), TEXT),
                    other => (serde_json::to_vec(other), JSON),
                }
            };
            let payload = Bytes::from(payload.map_err(|e| {
                SinkError::Permanent(format!("{which}cannot encode the output as JSON: {e}"))
            })?);
            let properties = self.v5.then(|| {
                let mut user_properties = vec![
                    ("ess-event-id".to_string(), event.id.clone()),
                    ("ess-event-type".to_string(), event.event_type.clone()),
                    ("ess-route".to_string(), event.route.clone()),
                ];
                if array {
                    user_properties.push(("ess-record".to_string(), index.to_string()));
                }
                v5b::PublishProperties {
                    payload_format_indicator: Some(1),
                    message_expiry_interval: self.message_expiry,
                    content_type: Some(
                        self.content_type
                            .clone()
                            .unwrap_or_else(|| default_type.to_string()),
                    ),
                    user_properties,
                    ..Default::default()
                }
            });
            let properties_size = properties.as_ref().map_or(0, |p| {
                // Property length (up to 4) + payload format (2) + expiry (5) + content type
                // (3 + len) + each user property (5 + key + value).
                4 + 2
                    + 5
                    + 3
                    + p.content_type.as_ref().map_or(0, String::len)
                    + p.user_properties
                        .iter()
                        .map(|(k, v)| 5 + k.len() + v.len())
                        .sum::<usize>()
            });
            let size = 2 + topic.len() + 2 + properties_size + payload.len();
            if size > MAX_PACKET {
                return Err(SinkError::Permanent(format!(
                    "{which}the message would be {size} bytes, more than MQTT's limit of \
                     {MAX_PACKET}: make the adapter produce less"
                )));
            }
            let fingerprint = {
                let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
                digest.update(&(topic.len() as u64).to_be_bytes());
                digest.update(topic.as_bytes());
                digest.update(&[self.qos, u8::from(self.retain)]);
                if let Some(p) = &properties {
                    for (k, v) in &p.user_properties {
                        digest.update(&(k.len() as u64).to_be_bytes());
                        digest.update(k.as_bytes());
                        digest.update(&(v.len() as u64).to_be_bytes());
                        digest.update(v.as_bytes());
                    }
                    if let Some(ct) = &p.content_type {
                        digest.update(ct.as_bytes());
                    }
                    digest.update(&p.message_expiry_interval.unwrap_or(0).to_be_bytes());
                }
                digest.update(&payload);
                let mut out = [0u8; 32];
                out.copy_from_slice(digest.finish().as_ref());
                out
            };
            messages.push(Message {
                key: RecordKey {
                    event_id: event.id.clone(),
                    route: event.route.clone(),
                    index,
                },
                fingerprint,
                topic,
                payload,
                properties,
                size,
            });
        }
        Ok(messages)
    }
}

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
        // The client's own packet-id space is twice the window, so that an id is rarely still
        // in use when the client comes round to it again.
        let client_inflight = window.saturating_mul(2);
        let keep_alive = Duration::from_secs(u64::from(config.keep_alive_secs.max(5)));
        let channel = usize::from(window) + 1;
        let (client, driver, reset) = match config.protocol {
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
                if let Some(tls) = &tls {
                    options.set_transport(rumqttc::Transport::tls_with_config(
                        rumqttc::TlsConfiguration::Rustls(tls.clone()),
                    ));
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
                if let Some(tls) = &tls {
                    options.set_transport(rumqttc::Transport::tls_with_config(
                        rumqttc::TlsConfiguration::Rustls(tls.clone()),
                    ));
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
        };
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

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> EventMeta {
        EventMeta {
            id: "evt-1".into(),
            event_type: "rule.updated".into(),
            version: 1,
            subject: "RULE-7".into(),
            revision: Some(3),
            source: None,
            route: "kiosks".into(),
            partner: "county".into(),
            received_at_ms: 1_796_601_600_000,
        }
    }

    fn config(text: &str) -> MqttConfig {
        toml::from_str(text).unwrap()
    }

    const MINIMAL: &str = "url = \"mqtt://127.0.0.1\"\nclient_id = \"ess-1\"\ntopic = \
                           \"partners/{partner}/rules/{subject}\"\n";

    fn publishing(c: &MqttConfig) -> Publishing {
        MqttSink::new(c, "s").unwrap().publishing
    }

    #[test]
    fn config_parses_with_defaults_and_refuses_unknown_keys() {
        let c = config(MINIMAL);
        assert_eq!(c.protocol, MqttVersion::V5);
        assert_eq!(c.qos, 1);
        assert!(!c.retain && !c.envelope && !c.allow_empty_levels);
        assert_eq!(c.timeout_ms, 10_000);
        assert_eq!(c.max_inflight, 64);
        assert_eq!(c.session_expiry_secs, 86_400);
        assert_eq!(c.keep_alive_secs, 30);
        assert_eq!((c.reconnect_initial_ms, c.reconnect_max_ms), (100, 10_000));
        assert!(
            c.validate("sinks.m").is_empty(),
            "{:?}",
            c.validate("sinks.m")
        );
        let v3 = config(&format!("{MINIMAL}protocol = \"3.1.1\"\nqos = 2\n"));
        assert_eq!(v3.protocol, MqttVersion::V311);
        assert!(v3.validate("sinks.m").is_empty());
        let e = toml::from_str::<MqttConfig>(&format!("{MINIMAL}qos_level = 1\n")).unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
        let e = toml::from_str::<MqttConfig>(&format!("{MINIMAL}protocol = \"4\"\n")).unwrap_err();
        assert!(e.to_string().contains("unknown variant"), "{e}");
    }

    #[test]
    fn urls_are_checked() {
        assert_eq!(
            parse_url("mqtt://broker.example").unwrap(),
            Broker {
                host: "broker.example".into(),
                port: 1883,
                tls: false
            }
        );
        assert_eq!(parse_url("mqtts://b:9999/").unwrap().port, 9999);
        assert_eq!(parse_url("mqtts://b").unwrap().port, 8883);
        for bad in [
            "tcp://b:1883",
            "b:1883",
            "mqtt://",
            "mqtt://u:pw@b",
            "mqtt://b/topic",
            "mqtt://b?x=1",
            "",
        ] {
            let e = parse_url(bad).unwrap_err();
            assert!(!e.contains("pw"), "{e}");
        }
    }

    #[test]
    fn validate_names_every_problem() {
        let text = r#"
url = "mqtt://b"
protocol = "3.1.1"
client_id = ""
topic = "a/+/{subject}"
qos = 3
content_type = "text/csv"
message_expiry_secs = 0
session_expiry_secs = 0
password = { file = "p", env = "P" }
ca_file = "ca.pem"
client_cert = "c.pem"
timeout_ms = 0
max_inflight = 0
connect_timeout_secs = 0
keep_alive_secs = 4
reconnect_initial_ms = 0
"#;
        let mut keys: Vec<String> = config(text)
            .validate("sinks.m")
            .into_iter()
            .map(|p| p.key)
            .collect();
        keys.sort();
        keys.dedup();
        assert_eq!(
            keys,
            [
                "sinks.m.ca_file",
                "sinks.m.client_cert",
                "sinks.m.client_id",
                "sinks.m.client_key",
                "sinks.m.connect_timeout_secs",
                "sinks.m.content_type",
                "sinks.m.keep_alive_secs",
                "sinks.m.max_inflight",
                "sinks.m.message_expiry_secs",
                "sinks.m.password",
                "sinks.m.qos",
                "sinks.m.reconnect_initial_ms",
                "sinks.m.session_expiry_secs",
                "sinks.m.timeout_ms",
                "sinks.m.topic",
            ]
        );
    }

    #[test]
    fn topic_templates_that_can_never_be_valid_are_configuration_problems() {
        for (topic, expect) in [
            ("a/#", "wildcard '#'"),
            ("a/+/b", "wildcard '+'"),
            ("a//{id}", "empty level"),
            ("/{id}", "empty level"),
            ("{id}/", "empty level"),
            ("$SYS/{id}", "starts with $"),
            ("{nope}", "unknown placeholder"),
        ] {
            let c = config(&format!(
                "url = \"mqtt://b\"\nclient_id = \"c\"\ntopic = {topic:?}\n"
            ));
            let problems = c.validate("sinks.m");
            assert_eq!(problems.len(), 1, "{topic}: {problems:?}");
            assert_eq!(problems[0].key, "sinks.m.topic");
            assert!(
                problems[0].message.contains(expect),
                "{topic}: {problems:?}"
            );
            assert!(MqttSink::new(&c, "m").is_err());
        }
        let c = config(
            "url = \"mqtt://b\"\nclient_id = \"c\"\ntopic = \"a//{id}\"\nallow_empty_levels = true\n",
        );
        assert!(c.validate("sinks.m").is_empty());
    }

    #[test]
    fn rendered_topics_are_checked() {
        assert!(check_topic("partners/p1/rules/R-1", false).is_ok());
        assert!(check_topic("a//b", true).is_ok());
        assert!(check_topic("é/ü", false).is_ok());
        for (topic, expect) in [
            ("", "empty"),
            ("a/+", "wildcard"),
            ("a/#", "wildcard"),
            ("a//b", "empty level"),
            ("a/", "empty level"),
            ("a\0b", "control character"),
            ("a\nb", "control character"),
            ("$share/x", "starts with $"),
        ] {
            let e = check_topic(topic, false).unwrap_err();
            assert!(e.contains(expect), "{topic:?}: {e}");
        }
        let long = "a".repeat(MAX_TOPIC + 1);
        let e = check_topic(&long, false).unwrap_err();
        assert!(e.contains("65535") && e.len() < 400, "{e}");
        assert!(check_topic(&"a".repeat(MAX_TOPIC), false).is_ok());
    }

    #[test]
    fn messages_carry_payload_topic_and_v5_properties() {
        let p = publishing(&config(MINIMAL));
        let m = p.messages(&event(), &json!({"b": 1, "a": [2]})).unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].topic, "partners/county/rules/RULE-7");
        assert_eq!(&m[0].payload[..], br#"{"b":1,"a":[2]}"#);
        let props = m[0].properties.as_ref().unwrap();
        assert_eq!(props.content_type.as_deref(), Some(JSON));
        assert_eq!(props.payload_format_indicator, Some(1));
        assert_eq!(props.message_expiry_interval, None);
        assert_eq!(
            props.user_properties,
            [
                ("ess-event-id".to_string(), "evt-1".to_string()),
                ("ess-event-type".to_string(), "rule.updated".to_string()),
                ("ess-route".to_string(), "kiosks".to_string()),
            ]
        );
        // A string output goes out as its text.
        let m = p.messages(&event(), &json!("a;b\r\n1;Ő")).unwrap();
        assert_eq!(&m[0].payload[..], "a;b\r\n1;Ő".as_bytes());
        assert_eq!(
            m[0].properties.as_ref().unwrap().content_type.as_deref(),
            Some(TEXT)
        );
        // Overrides.
        let p = publishing(&config(&format!(
            "{MINIMAL}content_type = \"application/xml\"\nmessage_expiry_secs = 60\n"
        )));
        let m = p.messages(&event(), &json!("<a/>")).unwrap();
        let props = m[0].properties.as_ref().unwrap();
        assert_eq!(props.content_type.as_deref(), Some("application/xml"));
        assert_eq!(props.message_expiry_interval, Some(60));
    }

    #[test]
    fn arrays_give_one_message_per_element_and_are_checked_before_anything_is_sent() {
        let p = publishing(&config(
            "url = \"mqtt://b\"\nclient_id = \"c\"\ntopic = \"zones/{output.zone}/{index}\"\n",
        ));
        let m = p
            .messages(&event(), &json!([{"zone": "n"}, {"zone": "s"}]))
            .unwrap();
        assert_eq!(
            m.iter().map(|m| m.topic.as_str()).collect::<Vec<_>>(),
            ["zones/n/0", "zones/s/1"]
        );
        assert_eq!(m[1].key.index, 1);
        assert!(
            m[1].properties
                .as_ref()
                .unwrap()
                .user_properties
                .contains(&("ess-record".to_string(), "1".to_string()))
        );
        assert_ne!(m[0].fingerprint, m[1].fingerprint);
        assert!(p.messages(&event(), &json!([])).unwrap().is_empty());
        // One bad record refuses the whole event.
        for (output, expect) in [
            (
                json!([{"zone": "n"}, {"zone": "a+b"}]),
                "record 1: the rendered topic",
            ),
            (json!([{"zone": "n"}, {"zone": ""}]), "empty level"),
            (json!([{"zone": "#"}]), "wildcard '#'"),
            (json!([{"zone": null}]), "is null"),
            (json!([{"other": 1}]), "no field {output.zone}"),
        ] {
            let e = p.messages(&event(), &output).unwrap_err();
            assert!(!e.is_retryable(), "{e}");
            assert!(e.to_string().contains(expect), "{output}: {e}");
        }
    }

    #[test]
    fn envelope_wraps_the_output_with_the_event_id() {
        let p = publishing(&config(&format!(
            "{MINIMAL}protocol = \"3.1.1\"\nenvelope = true\n"
        )));
        let m = p.messages(&event(), &json!("plain")).unwrap();
        assert!(m[0].properties.is_none());
        let v: Value = serde_json::from_slice(&m[0].payload).unwrap();
        assert_eq!(
            v,
            json!({"ess_event_id": "evt-1", "ess_event_type": "rule.updated", "ess_route": "kiosks", "output": "plain"})
        );
        let m = p.messages(&event(), &json!([{"a": 1}])).unwrap();
        let v: Value = serde_json::from_slice(&m[0].payload).unwrap();
        assert_eq!(v["ess_record"], 0);
        assert_eq!(v["output"], json!({"a": 1}));
    }

    #[test]
    fn the_fingerprint_changes_with_anything_on_the_wire() {
        let base = config(MINIMAL);
        let fp = |c: &MqttConfig, output: Value| {
            publishing(c).messages(&event(), &output).unwrap()[0].fingerprint
        };
        let a = fp(&base, json!({"a": 1}));
        assert_eq!(a, fp(&base, json!({"a": 1})));
        assert_ne!(a, fp(&base, json!({"a": 2})));
        assert_ne!(
            a,
            fp(
                &config(&format!("{MINIMAL}retain = true\n")),
                json!({"a": 1})
            )
        );
        assert_ne!(
            a,
            fp(&config(&format!("{MINIMAL}qos = 2\n")), json!({"a": 1}))
        );
    }

    fn key(n: usize) -> RecordKey {
        RecordKey {
            event_id: format!("e{n}"),
            route: "r".into(),
            index: 0,
        }
    }

    fn outcome(rx: &mut oneshot::Receiver<Outcome>) -> Option<Outcome> {
        rx.try_recv().ok()
    }

    #[test]
    fn confirmations_complete_their_own_publish_by_packet_id() {
        let mut book = Book::default();
        let (_, mut a) = book.enqueue(key(1), [1; 32], None);
        let (_, mut b) = book.enqueue(key(2), [2; 32], None);
        let (_, mut c) = book.enqueue(key(3), [3; 32], None);
        book.written(7);
        book.written(8);
        book.written(9);
        // Out of order, and a duplicate ack that matches nothing.
        book.acked(8, Ok(()));
        assert_eq!(outcome(&mut b), Some(Ok(())));
        assert_eq!(outcome(&mut a), None);
        book.acked(8, Ok(()));
        book.acked(9, Err(SinkError::Permanent("0x87".into())));
        assert_eq!(
            outcome(&mut c),
            Some(Err(SinkError::Permanent("0x87".into())))
        );
        assert_eq!(outcome(&mut a), None);
        book.acked(7, Ok(()));
        assert_eq!(outcome(&mut a), Some(Ok(())));
        assert_eq!(book.in_flight(), 0);
    }

    #[test]
    fn a_resend_after_reconnect_is_not_mistaken_for_a_new_publish() {
        let mut book = Book::default();
        let (_, mut a) = book.enqueue(key(1), [1; 32], None);
        book.written(1);
        let (_, mut b) = book.enqueue(key(2), [2; 32], None);
        // Reconnected with the session: 1 is resent, then 2 goes out for the first time.
        book.written(1);
        book.written(2);
        book.acked(2, Ok(()));
        assert_eq!(outcome(&mut b), Some(Ok(())));
        assert_eq!(outcome(&mut a), None);
        book.acked(1, Ok(()));
        assert_eq!(outcome(&mut a), Some(Ok(())));
    }

    #[test]
    fn qos0_is_done_when_written_and_qos2_when_completed() {
        let mut book = Book::default();
        let (_, mut zero) = book.enqueue(key(1), [1; 32], None);
        let (_, mut two) = book.enqueue(key(2), [2; 32], None);
        book.written(0);
        assert_eq!(outcome(&mut zero), Some(Ok(())));
        book.written(5);
        book.received(5, Ok(()));
        assert_eq!(outcome(&mut two), None);
        // The client reuses id 5 for a new QoS 2 message before the PUBCOMP of the first.
        let (_, mut next) = book.enqueue(key(3), [3; 32], None);
        book.written(5);
        book.completed(5, Ok(()));
        assert_eq!(outcome(&mut two), Some(Ok(())));
        assert_eq!(outcome(&mut next), None);
        book.received(5, Ok(()));
        book.completed(5, Ok(()));
        assert_eq!(outcome(&mut next), Some(Ok(())));
        // A PUBREC with a failure reason ends the exchange.
        let (_, mut refused) = book.enqueue(key(4), [4; 32], None);
        book.written(6);
        book.received(6, Err(SinkError::Permanent("0x87".into())));
        assert!(matches!(outcome(&mut refused), Some(Err(_))));
        assert_eq!(book.in_flight(), 0);
    }

    #[test]
    fn a_collided_publish_takes_its_id_once_the_id_is_free() {
        let mut book = Book::default();
        let (_, mut a) = book.enqueue(key(1), [1; 32], None);
        book.written(1);
        let (_, mut b) = book.enqueue(key(2), [2; 32], None);
        book.collision(1);
        let (_, mut c) = book.enqueue(key(3), [3; 32], None);
        // The ack for 1 frees the id; the held publish goes out with it.
        book.acked(1, Ok(()));
        book.written(1);
        book.written(2);
        assert_eq!(outcome(&mut a), Some(Ok(())));
        book.acked(1, Ok(()));
        assert_eq!(outcome(&mut b), Some(Ok(())));
        book.acked(2, Ok(()));
        assert_eq!(outcome(&mut c), Some(Ok(())));
    }

    #[test]
    fn a_lost_session_fails_exactly_the_publishes_it_held() {
        let mut book = Book::default();
        let (_, mut sent) = book.enqueue(key(1), [1; 32], None);
        book.written(1);
        let (_, mut releasing) = book.enqueue(key(2), [2; 32], None);
        book.written(2);
        book.received(2, Ok(()));
        let (_, mut drained) = book.enqueue(key(3), [3; 32], None);
        // Handed over after the client drained its channel: still in the channel.
        let (_, mut later) = book.enqueue(key(4), [4; 32], None);
        book.session_lost(&[
            Pending::Publish(1),
            Pending::Release(2),
            Pending::Publish(0),
        ]);
        for rx in [&mut sent, &mut releasing, &mut drained] {
            let got = outcome(rx).unwrap().unwrap_err();
            assert!(
                got.is_retryable() && got.to_string().contains("session"),
                "{got}"
            );
        }
        assert_eq!(outcome(&mut later), None);
        // The publish still in the channel goes out and is matched correctly.
        book.written(1);
        book.acked(1, Ok(()));
        assert_eq!(outcome(&mut later), Some(Ok(())));
        assert_eq!(book.in_flight(), 0);
    }

    #[test]
    fn a_retry_waits_for_the_publish_in_flight_or_takes_its_late_confirmation() {
        let mut book = Book::default();
        let (_, first) = book.enqueue(key(1), [1; 32], None);
        book.written(1);
        // The apply gave up (timed out); its retry comes with the same message.
        drop(first);
        let Attach::Waiting(mut retry) = book.attach(&key(1), &[1; 32]) else {
            panic!("expected to wait for the publish in flight")
        };
        // A different content is a different message.
        assert!(matches!(book.attach(&key(1), &[9; 32]), Attach::Publish));
        book.acked(1, Ok(()));
        assert_eq!(outcome(&mut retry), Some(Ok(())));

        // Confirmed after every apply stopped waiting: the retry succeeds at once, once.
        let (_, gone) = book.enqueue(key(2), [2; 32], None);
        book.written(2);
        book.fail_waiters(&SinkError::Retryable("connection refused".into()));
        drop(gone);
        book.acked(2, Ok(()));
        assert!(matches!(book.attach(&key(2), &[2; 32]), Attach::Confirmed));
        assert!(matches!(book.attach(&key(2), &[2; 32]), Attach::Publish));
        // A late confirmation of other content does not count.
        let (_, gone) = book.enqueue(key(3), [3; 32], None);
        drop(gone);
        book.written(3);
        book.acked(3, Ok(()));
        assert!(matches!(book.attach(&key(3), &[4; 32]), Attach::Publish));
    }

    #[test]
    fn failing_waiters_keeps_the_publishes_and_their_window_places() {
        let window = Arc::new(Semaphore::new(2));
        let mut book = Book::default();
        let permit = window.clone().try_acquire_owned().unwrap();
        let (_, mut a) = book.enqueue(key(1), [1; 32], Some(permit));
        book.fail_waiters(&SinkError::Permanent("CONNACK return code 4".into()));
        assert_eq!(
            outcome(&mut a),
            Some(Err(SinkError::Permanent("CONNACK return code 4".into())))
        );
        assert_eq!(window.available_permits(), 1);
        assert_eq!(book.in_flight(), 1);
        book.written(1);
        book.acked(1, Ok(()));
        assert_eq!(window.available_permits(), 2);
    }

    #[test]
    fn remembered_confirmations_are_bounded() {
        let mut book = Book::default();
        for n in 0..ORPHANS + 10 {
            book.remember(key(n), [0; 32]);
        }
        assert_eq!(book.orphans.len(), ORPHANS);
        assert!(!book.orphans.contains_key(&key(0)));
        assert!(book.orphans.contains_key(&key(ORPHANS + 9)));
    }

    #[test]
    fn reason_codes_are_classified() {
        use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode as C5, PubAckReason as P};
        assert!(v5::puback(P::Success, None, "PUBACK").is_ok());
        assert!(v5::puback(P::NoMatchingSubscribers, None, "PUBACK").is_ok());
        let e = v5::puback(P::NotAuthorized, Some("acl".into()), "PUBACK").unwrap_err();
        assert!(!e.is_retryable());
        assert!(
            e.to_string()
                .contains("PUBACK reason code 0x87 (not authorized)"),
            "{e}"
        );
        assert!(e.to_string().contains("acl"), "{e}");
        assert!(
            v5::puback(P::QuotaExceeded, None, "PUBACK")
                .unwrap_err()
                .is_retryable()
        );
        assert!(
            !v5::puback(P::TopicNameInvalid, None, "PUBACK")
                .unwrap_err()
                .is_retryable()
        );
        assert_eq!(v5::refusal(C5::BadUserNamePassword).0, 0x86);
        assert!(v5::refusal(C5::BadUserNamePassword).2);
        assert!(v5::refusal(C5::NotAuthorized).2);
        assert!(!v5::refusal(C5::ServerUnavailable).2);
        assert!(!v5::refusal(C5::ServerBusy).2);
        use rumqttc::ConnectReturnCode as C4;
        assert_eq!(v311::refusal(C4::BadUserNamePassword).0, 4);
        assert!(v311::refusal(C4::BadUserNamePassword).2);
        assert!(v311::refusal(C4::NotAuthorized).2);
        assert!(!v311::refusal(C4::ServiceUnavailable).2);
    }

    #[test]
    fn backoff_doubles_up_to_the_limit_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let got: Vec<u128> = (0..4).map(|_| b.next().as_millis()).collect();
        assert_eq!(got, [100, 200, 350, 350]);
        b.reset();
        assert_eq!(b.next(), Duration::from_millis(100));
    }

    #[test]
    fn building_reads_credentials_and_tls_files_but_connects_nowhere() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("user"), "kiosk\n").unwrap();
        std::fs::write(dir.path().join("pass"), "s3cret\n").unwrap();
        let mut c = config(&format!(
            "{MINIMAL}username = {{ file = \"user\" }}\npassword = {{ file = \"pass\" }}\n"
        ));
        c.resolve_paths(dir.path());
        assert!(c.validate("sinks.m").is_empty());
        let sink = MqttSink::new(&c, "m").unwrap();
        assert!(!format!("{sink:?}").contains("s3cret"));
        c.password.as_mut().unwrap().file = Some(dir.path().join("missing"));
        let e = MqttSink::new(&c, "m").unwrap_err();
        assert!(e.starts_with("password: cannot read secret file"), "{e}");

        let mut c = config(
            "url = \"mqtts://b\"\nclient_id = \"c\"\ntopic = \"t\"\nca_file = \"nope.pem\"\n",
        );
        c.resolve_paths(dir.path());
        let e = MqttSink::new(&c, "m").unwrap_err();
        assert!(e.starts_with("TLS: cannot read"), "{e}");
    }

    #[tokio::test]
    async fn nothing_listening_is_retryable_with_the_reason() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        for protocol in ["3.1.1", "5"] {
            let c = config(&format!(
                "url = \"mqtt://127.0.0.1:{port}\"\nclient_id = \"c\"\ntopic = \"t/{{id}}\"\n\
                 protocol = \"{protocol}\"\ntimeout_ms = 5000\n"
            ));
            let sink = MqttSink::new(&c, "m").unwrap();
            let started = std::time::Instant::now();
            let e = sink.apply(&event(), &json!({})).await.unwrap_err();
            assert!(e.is_retryable(), "{e}");
            assert!(
                e.to_string().contains("cannot reach the MQTT broker"),
                "{e}"
            );
            assert!(e.to_string().contains("is the broker running"), "{e}");
            assert!(started.elapsed() < Duration::from_secs(4), "failed fast");
            assert!(sink.healthcheck().await.is_err());
            // A bad topic is refused before anything is tried.
            let mut bad = event();
            bad.subject = "a/#".into();
            let c = config(&format!(
                "url = \"mqtt://127.0.0.1:{port}\"\nclient_id = \"c\"\ntopic = \"t/{{subject}}\"\n"
            ));
            let e = MqttSink::new(&c, "m")
                .unwrap()
                .apply(&bad, &json!({}))
                .await
                .unwrap_err();
            assert!(
                !e.is_retryable() && e.to_string().contains("wildcard"),
                "{e}"
            );
        }
    }
}
