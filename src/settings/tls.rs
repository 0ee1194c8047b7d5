//! TLS settings and the reading of their PEM files, with the one crypto provider (ring) every
//! TLS endpoint of the agent uses.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::Deserialize;

/// TLS for the ingress listener (rustls, TLS 1.2 and 1.3, ALPN `h2` and `http/1.1`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the server certificate chain, leaf first. Required.
    pub cert: PathBuf,
    /// PEM file with the server's private key (PKCS#8, PKCS#1 or SEC1). Required.
    pub key: PathBuf,
    /// PEM file with the CA certificate(s) hub client certificates must chain to. When set, mutual
    /// TLS is required: a client without a valid certificate is refused during the handshake.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: DNS names or IP addresses, one of which the client certificate's subject
    /// alternative names must match. Empty (the default) accepts any certificate the CA signed.
    #[serde(default)]
    pub client_allowed_names: Vec<String>,
}

/// Why the TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} from {path}: {reason}: check that the file exists and is PEM")]
    Pem {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{path} holds no {what}: it must contain at least one PEM block")]
    Empty { what: &'static str, path: PathBuf },
    #[error("TLS configuration rejected: {0}")]
    Rustls(String),
    #[error("ingress.tls.client_allowed_names: {0:?} is neither a DNS name nor an IP address")]
    BadName(String),
}

/// The crypto provider every TLS endpoint of the agent uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate in a PEM file.
pub fn read_certs(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_err = |reason: String| TlsError::Pem {
        what,
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// Reads a root store from a PEM file of CA certificates.
pub fn read_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path, "CA certificates")? {
        roots
            .add(cert)
            .map_err(|e| TlsError::Rustls(format!("CA certificate in {}: {e}", path.display())))?;
    }
    Ok(roots)
}
