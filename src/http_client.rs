//! The outgoing HTTP(S) client: hyper-util's pooled client over rustls (ring provider), HTTP/1.1
//! and HTTP/2 by ALPN. Used by `ess-agent send` and the load generator.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;

use crate::settings::tls::{TlsError, provider, read_certs, read_roots};

/// A pooled HTTP(S) client.
pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// TLS settings of an outgoing connection.
#[derive(Debug, Default, Clone)]
pub struct ClientTls<'a> {
    /// Trust only these CA certificates (PEM) instead of the system's roots.
    pub ca_file: Option<&'a Path>,
    /// A client certificate chain and key (PEM), for mutual TLS.
    pub client_cert: Option<(&'a Path, &'a Path)>,
}

/// Builds the TLS client configuration.
pub fn client_config(tls: &ClientTls<'_>) -> Result<rustls::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let roots = match tls.ca_file {
        Some(ca) => read_roots(ca)?,
        None => {
            let mut roots = rustls::RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            roots
        }
    };
    let builder = builder.with_root_certificates(Arc::new(roots));
    let config = match tls.client_cert {
        Some((cert, key)) => {
            let chain = read_certs(cert, "client certificates")?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Pem {
                what: "a private key",
                path: key.to_owned(),
                reason: e.to_string(),
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| TlsError::Rustls(e.to_string()))?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(config)
}

/// Builds a client that speaks HTTP/1.1 and HTTP/2 (negotiated by ALPN over TLS).
pub fn client(tls: &ClientTls<'_>) -> Result<HttpClient, TlsError> {
    // The connector sets ALPN (h2, http/1.1) itself from the enabled versions.
    let config = client_config(tls)?;
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_or_http()
        .enable_all_versions()
        .build();
    Ok(Client::builder(TokioExecutor::new()).build(connector))
}
