//! TLS for the ingress listener: rustls with the ring provider, ALPN `h2` and `http/1.1`, and
//! mutual TLS when a client CA is configured.

use std::sync::{Arc, RwLock};

use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use crate::settings::TlsConfig;
use crate::settings::tls::{TlsError, provider, read_certs};

/// Accepts TLS connections and applies the client-name allow-list.
///
/// The server configuration (certificate chain, key, client CA) and the allow-list in force sit
/// behind a lock that each handshake reads once, so [`TlsAcceptor::reload`] swaps in renewed
/// files for every connection that starts after it; connections already open keep the
/// certificate they were set up with.
#[derive(Clone)]
pub struct TlsAcceptor {
    current: Arc<RwLock<Arc<TlsSettings>>>,
}

/// A built TLS configuration: the PEM files read and checked, ready to be put in force.
pub struct TlsSettings {
    server: Arc<rustls::ServerConfig>,
    allowed_names: Vec<ServerName<'static>>,
    /// A SHA-256 digest of the files and names it was built from, to tell whether a reload
    /// changed anything.
    digest: [u8; 32],
}

impl std::fmt::Debug for TlsAcceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsAcceptor").finish_non_exhaustive()
    }
}

impl TlsAcceptor {
    /// Builds the acceptor from the configuration, reading the PEM files.
    pub fn new(config: &TlsConfig) -> Result<TlsAcceptor, TlsError> {
        Ok(TlsAcceptor {
            current: Arc::new(RwLock::new(Arc::new(TlsSettings::build(config)?))),
        })
    }

    /// Puts `settings` in force for every handshake from now on; connections already open keep
    /// what they were set up with. Returns whether they differ from those in force before.
    pub fn replace(&self, settings: TlsSettings) -> bool {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        let changed = current.digest != settings.digest;
        *current = Arc::new(settings);
        changed
    }

    fn settings(&self) -> Arc<TlsSettings> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Completes the handshake and checks the client certificate against the allow-list.
    pub async fn accept(&self, stream: TcpStream) -> std::io::Result<TlsStream<TcpStream>> {
        let settings = self.settings();
        let stream = tokio_rustls::TlsAcceptor::from(settings.server.clone())
            .accept(stream)
            .await?;
        if !settings.allowed_names.is_empty() {
            let (_, conn) = stream.get_ref();
            let allowed = conn
                .peer_certificates()
                .and_then(|certs| certs.first())
                .is_some_and(|leaf| settings.name_allowed(leaf));
            if !allowed {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    "the client certificate names none of ingress.tls.client_allowed_names",
                ));
            }
        }
        Ok(stream)
    }
}

/// The subject of the client certificate a connection was set up with (mutual TLS), such as
/// `CN=hub.example, O=Agency`, at most 512 characters; `None` without one.
pub fn client_subject(stream: &TlsStream<TcpStream>) -> Option<Arc<str>> {
    let (_, conn) = stream.get_ref();
    let leaf = conn.peer_certificates()?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let subject: String = cert.subject().to_string().chars().take(512).collect();
    Some(subject.into())
}

impl TlsSettings {
    /// Reads the PEM files of `config` and builds the server configuration.
    pub fn build(config: &TlsConfig) -> Result<TlsSettings, TlsError> {
        let certs = read_certs(&config.cert, "certificates")?;
        let key = PrivateKeyDer::from_pem_file(&config.key).map_err(|e| TlsError::Pem {
            what: "a private key",
            path: config.key.clone(),
            reason: e.to_string(),
        })?;
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        let mut add = |part: &[u8]| {
            context.update(&(part.len() as u64).to_be_bytes());
            context.update(part);
        };
        for cert in &certs {
            add(cert.as_ref());
        }
        add(key.secret_der());
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Rustls(e.to_string()))?;
        let builder = match &config.client_ca {
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for root in read_certs(ca, "CA certificates")? {
                    add(root.as_ref());
                    roots.add(root).map_err(|e| {
                        TlsError::Rustls(format!("CA certificate in {}: {e}", ca.display()))
                    })?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                        .build()
                        .map_err(|e| TlsError::Rustls(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut server = builder
            .with_single_cert(certs, key)
            .map_err(|e| TlsError::Rustls(format!("certificate and key do not fit: {e}")))?;
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let allowed_names = config
            .client_allowed_names
            .iter()
            .map(|name| {
                add(name.as_bytes());
                ServerName::try_from(name.as_str())
                    .map(|n| n.to_owned())
                    .map_err(|_| TlsError::BadName(name.clone()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut digest = [0u8; 32];
        digest.copy_from_slice(context.finish().as_ref());
        Ok(TlsSettings {
            server: Arc::new(server),
            allowed_names,
            digest,
        })
    }

    fn name_allowed(&self, leaf: &CertificateDer<'_>) -> bool {
        let Ok(cert) = webpki::EndEntityCert::try_from(leaf) else {
            return false;
        };
        self.allowed_names
            .iter()
            .any(|name| cert.verify_is_valid_for_subject_name(name).is_ok())
    }
}
