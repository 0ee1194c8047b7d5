//! The connection failures both protocol versions word alike (their error types differ); each
//! version's own mapping is in `v311` and `v5`.

use super::config::Broker;
use super::connection::Failure;
use crate::sink::SinkError;

/// Finds a rustls error in an error's chain (tokio-rustls wraps it in an `io::Error`).
pub(super) fn rustls_error<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a rustls::Error> {
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

/// Describes a connection error; every one of these is retryable.
pub(super) fn describe_connection_error(
    error: &(dyn std::error::Error + 'static),
    broker: &Broker,
) -> String {
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
