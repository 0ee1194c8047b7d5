//! What a failed TLS handshake with a broker means.

/// Finds a rustls error in an error's chain (a TLS stream wraps it in an `io::Error`).
pub fn rustls_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
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

/// What to do about a failed TLS handshake with a broker.
pub fn tls_advice(tls: &rustls::Error) -> &'static str {
    use rustls::{AlertDescription, CertificateError};
    match tls {
        // A bad signature is what a different CA with the same name gives.
        rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        ) => {
            "the broker's certificate is not signed by a CA the agent trusts: set ca_file to the \
             CA that signed it"
        }
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => "the broker's certificate is not valid for the host in url: use a host name it names",
        rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => "the broker's certificate has expired: renew it on the broker",
        rustls::Error::InvalidCertificate(_) => {
            "the broker's certificate was refused: check ca_file and the broker's certificate"
        }
        rustls::Error::AlertReceived(
            AlertDescription::CertificateRequired
            | AlertDescription::HandshakeFailure
            | AlertDescription::BadCertificate
            | AlertDescription::UnknownCA,
        ) => {
            "the broker refused the handshake, probably the agent's client certificate: check \
             client_cert and client_key"
        }
        _ => "check that the broker speaks TLS on this port",
    }
}
