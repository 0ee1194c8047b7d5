//! MQTT 3.1.1 event mapping and error classification.

use rumqttc::{ConnectReturnCode, ConnectionError, Event, Outgoing, Packet, StateError};

use super::config::Broker;
use super::connection::{BrokerLimits, Failure, Happening};
use super::error::{closed, describe_connection_error, no_connack, no_pong, refused};
use crate::sink::SinkError;

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
            refused(
                broker,
                &format!("return code {number}"),
                meaning,
                permanent,
                advice,
            )
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
