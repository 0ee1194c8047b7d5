//! MQTT 5 event mapping and error classification.

use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::v5::{
    ConnectReturnCode, DisconnectReasonCode, Packet, PubAckReason, PubCompReason, PubRecReason,
};
use rumqttc::v5::{ConnectionError, Event, StateError};

use super::config::Broker;
use super::connection::{BrokerLimits, Failure, Happening};
use super::error::{classified, closed, describe_connection_error, no_connack, no_pong, refused};
use crate::sink::SinkError;

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
        PubAckReason::ImplementationSpecificError => (0x83, "implementation specific error", false),
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
    classified(permanent, message)
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
            let code = format!("reason code {number:#04x}");
            refused(broker, &code, meaning, permanent, advice)
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
