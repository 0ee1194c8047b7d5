//! What a failed TLS handshake with a broker means.

/// Finds a rustls error in an error's chain (a TLS stream wraps it in an `io::Error`, which a
/// client may keep behind an `Arc<dyn Error>`, as redis does).
pub fn rustls_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    type Shared = std::sync::Arc<dyn std::error::Error + Send + Sync>;
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
        // An `Arc`'s own `source()` is its content's, which would skip the content itself.
        current = match e.downcast_ref::<Shared>() {
            Some(shared) => Some(&**shared as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    None
}

/// The names a sink gives its TLS settings, for advice that names the key to change.
pub struct TlsKeys {
    /// The noun for the other end in messages: "broker" or "server".
    pub peer: &'static str,
    pub ca_file: &'static str,
    pub client_cert: &'static str,
    pub client_key: &'static str,
}

/// The keys of mqtt, amqp and redis, whose other end is a broker.
pub const BROKER_KEYS: TlsKeys = TlsKeys {
    peer: "broker",
    ca_file: "ca_file",
    client_cert: "client_cert",
    client_key: "client_key",
};

/// What to do about a failed TLS handshake, naming the sink's own keys.
pub fn tls_advice(tls: &rustls::Error, keys: &TlsKeys) -> String {
    use rustls::{AlertDescription, CertificateError};
    let TlsKeys {
        peer,
        ca_file,
        client_cert,
        client_key,
    } = keys;
    match tls {
        // A bad signature is what a different CA with the same name gives.
        rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        ) => format!(
            "the {peer}'s certificate is not signed by a CA the agent trusts: set {ca_file} to \
             the CA that signed it"
        ),
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => format!(
            "the {peer}'s certificate is not valid for the host in url: use a host name it names"
        ),
        rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => format!("the {peer}'s certificate has expired: renew it on the {peer}"),
        rustls::Error::InvalidCertificate(_) => format!(
            "the {peer}'s certificate was refused: check {ca_file} and the {peer}'s certificate"
        ),
        rustls::Error::AlertReceived(
            AlertDescription::CertificateRequired
            | AlertDescription::HandshakeFailure
            | AlertDescription::BadCertificate
            | AlertDescription::UnknownCA,
        ) => format!(
            "the {peer} refused the handshake, probably the agent's client certificate: check \
             {client_cert} and {client_key}"
        ),
        _ => format!("check that the {peer} speaks TLS on this port"),
    }
}
