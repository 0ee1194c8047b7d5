//! The connection failures both protocol versions word alike (their error types differ); each
//! version's own mapping is in `v311` and `v5`.

use super::config::Broker;
use super::connection::Failure;
use crate::sink::SinkError;
use crate::sink::client::{BROKER_KEYS, rustls_error, tls_advice};

/// No CONNACK within the connect timeout: retryable.
pub(super) fn no_connack(broker: &Broker) -> Failure {
    Failure::Error(SinkError::Retryable(format!(
        "no CONNACK from the MQTT broker at {broker} within connect_timeout_secs"
    )))
}

/// The broker closed the connection: retryable.
pub(super) fn closed(broker: &Broker) -> Failure {
    Failure::Error(SinkError::Retryable(format!(
        "the MQTT broker at {broker} closed the connection"
    )))
}

/// The broker stopped answering pings: retryable.
pub(super) fn no_pong(broker: &Broker) -> Failure {
    Failure::Error(SinkError::Retryable(format!(
        "the MQTT broker at {broker} stopped answering pings"
    )))
}

/// The broker refused the connection in its CONNACK: `code` as the protocol version words it
/// (`return code 4`, `reason code 0x86`), what it means, whether it needs an operator, and what
/// to do.
pub(super) fn refused(
    broker: &Broker,
    code: &str,
    meaning: &str,
    permanent: bool,
    advice: &str,
) -> Failure {
    let message = format!(
        "the MQTT broker at {broker} refused the connection: CONNACK {code} ({meaning}){}{advice}",
        if advice.is_empty() { "" } else { ": " }
    );
    Failure::Error(classified(permanent, message))
}

/// A permanent or a retryable error with `message`.
pub(super) fn classified(permanent: bool, message: String) -> SinkError {
    if permanent {
        SinkError::Permanent(message)
    } else {
        SinkError::Retryable(message)
    }
}

/// Describes a connection error; every one of these is retryable.
pub(super) fn describe_connection_error(
    error: &(dyn std::error::Error + 'static),
    broker: &Broker,
) -> String {
    if let Some(tls) = rustls_error(error) {
        let advice = tls_advice(tls, &BROKER_KEYS);
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
