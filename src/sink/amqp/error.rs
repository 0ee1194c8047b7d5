//! Classification of the client library's errors into retryable and permanent failures, by
//! their kind and AMQP reply code, never by message text.

use lapin::ErrorKind;
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};

use super::config::Broker;
use crate::sink::SinkError;
use crate::sink::client::{BROKER_KEYS, rustls_error, tls_advice};

/// What the agent was doing when the error came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stage {
    /// Connecting and logging in, or opening the publishing channel.
    Connect,
    /// Asking whether an exchange exists, on a channel of its own.
    CheckExchange,
    /// Publishing on the shared channel or waiting for the confirmation.
    Publish,
}

/// Classifies an error of the client library. `exchange` names the exchange the operation was
/// about, if any.
pub(super) fn classify(
    error: &lapin::Error,
    stage: Stage,
    broker: &Broker,
    vhost: &str,
    exchange: Option<&str>,
) -> SinkError {
    let exchange = exchange.map_or_else(|| "?".to_string(), super::exchange_shown);
    match error.kind() {
        ErrorKind::ProtocolError(amqp) => {
            let said = format!("{} {}", amqp.get_id(), amqp.get_message());
            match (amqp.kind(), stage) {
                (AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND), Stage::CheckExchange) => {
                    SinkError::Permanent(format!(
                        "the exchange {exchange} does not exist in vhost {vhost:?} at {broker} \
                         ({said}): declare it on the broker (the sink declares nothing) or fix \
                         exchange, then replay the dead letter"
                    ))
                }
                (AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED), Stage::Connect) => {
                    SinkError::Permanent(format!(
                        "the AMQP broker at {broker} refused the login ({said}): check username \
                         and password, and that the user may connect from this host"
                    ))
                }
                (AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED), Stage::CheckExchange) => {
                    SinkError::Permanent(format!(
                        "the broker refused access to exchange {exchange} in vhost {vhost:?} \
                         ({said}): grant the user write permission on it"
                    ))
                }
                (AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED), _) => {
                    SinkError::Permanent(format!(
                        "the AMQP broker at {broker} refused access to vhost {vhost:?} ({said}): \
                         create the vhost, or grant the user access to it \
                         (rabbitmqctl set_permissions -p VHOST USER ...)"
                    ))
                }
                (AMQPErrorKind::Hard(AMQPHardError::INVALIDPATH), _) => {
                    SinkError::Permanent(format!(
                        "the AMQP broker at {broker} refused vhost {vhost:?} ({said}): fix vhost"
                    ))
                }
                // A channel error on the shared channel closes it for every publish in flight
                // on it, whichever publish caused it: each is retried on a new channel, where
                // the exchange check names a missing exchange for the event that uses it.
                (AMQPErrorKind::Soft(_), _) => SinkError::Retryable(format!(
                    "the broker closed the channel ({said}) while publishing to exchange \
                     {exchange}: it is retried on a new channel"
                )),
                (
                    AMQPErrorKind::Hard(
                        AMQPHardError::CONNECTIONFORCED
                        | AMQPHardError::RESOURCEERROR
                        | AMQPHardError::INTERNALERROR,
                    ),
                    _,
                ) => SinkError::Retryable(format!(
                    "the AMQP broker at {broker} closed the connection ({said}): it is \
                     re-established with backoff"
                )),
                (AMQPErrorKind::Hard(_), _) => SinkError::Retryable(format!(
                    "the AMQP broker at {broker} closed the connection for a protocol error \
                     ({said}): it is re-established; if this repeats, report it"
                )),
            }
        }
        ErrorKind::IOError(io) => {
            if let Some(tls) = rustls_error(io.as_ref()) {
                return SinkError::Retryable(format!(
                    "TLS handshake with {broker} failed ({tls}): {}",
                    tls_advice(tls, &BROKER_KEYS)
                ));
            }
            let advice = match io.kind() {
                std::io::ErrorKind::ConnectionRefused => {
                    ": is the broker running and listening on this port?"
                }
                _ => "",
            };
            match stage {
                Stage::Connect => SinkError::Retryable(format!(
                    "cannot reach the AMQP broker at {broker}: {io}{advice}"
                )),
                _ => SinkError::Retryable(format!(
                    "the connection to the AMQP broker at {broker} was lost ({io}): it is \
                     re-established with backoff"
                )),
            }
        }
        ErrorKind::MissingHeartbeatError => SinkError::Retryable(format!(
            "the AMQP broker at {broker} sent no heartbeat: the connection is re-established"
        )),
        _ => SinkError::Retryable(format!(
            "the connection to the AMQP broker at {broker} failed ({error}): it is \
             re-established with backoff"
        )),
    }
}
