//! The `http` sink's configuration: its serde type and pure checks.

use std::sync::Arc;

use super::redact;
use crate::settings::RetryConfig;
use crate::settings::{Problem, SecretSource};
use crate::sink::{BuildContext, SecretOrFile, Sink, SinkSpec};
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use http::{Method, Uri};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The request method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum HttpMethod {
    #[default]
    #[serde(rename = "POST", alias = "post")]
    Post,
    #[serde(rename = "PUT", alias = "put")]
    Put,
}

impl HttpMethod {
    pub(super) fn method(self) -> Method {
        match self {
            HttpMethod::Post => Method::POST,
            HttpMethod::Put => Method::PUT,
        }
    }
}

/// Configuration of an `http` sink.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// The endpoint, `http://` or `https://`, e.g. `https://partner.example/ess/changes`.
    /// Credentials do not belong here: send them with `secret_headers`. Required.
    pub url: String,
    /// `POST` or `PUT`. Default: `POST`.
    #[serde(default)]
    pub method: HttpMethod,
    /// Static headers sent with every request, name → value. The headers the sink sets itself
    /// (`Content-Type`, `ess-event-id`, `ess-event-type`, `ess-route`, `Idempotency-Key`) and
    /// hop-by-hop headers cannot be set here. Default: none.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Headers whose values are secrets (API keys, `Authorization`), name → `{ file = "…" }` or
    /// `{ env = "…" }`. Read at start and at every reload; never logged. Default: none.
    #[serde(default)]
    pub secret_headers: BTreeMap<String, SecretSource>,
    /// How long one attempt may take, from connecting until the response has arrived, in
    /// milliseconds; a timeout is retried. Default: 10000.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// A PEM file with the CA certificate(s) to trust for an `https` URL instead of the
    /// system's roots. Relative paths are resolved against the configuration file's directory.
    /// Default: the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The `Content-Type` of every request, overriding the default of `application/json` for
    /// JSON output and `text/plain; charset=utf-8` for string output. Default: none.
    #[serde(default)]
    pub content_type: Option<String>,
    /// Retry policy for retryable failures. Default: see [`RetryConfig`].
    #[serde(default)]
    pub retry: RetryConfig,
}

pub(super) fn default_timeout_ms() -> u64 {
    10_000
}

/// Headers the sink sets itself, or that would break the message framing.
pub(super) const RESERVED: &[&str] = &[
    "content-type",
    "content-length",
    "transfer-encoding",
    "connection",
    "host",
    "te",
    "upgrade",
    "ess-event-id",
    "ess-event-type",
    "ess-route",
    "idempotency-key",
];

pub(super) fn parse_url(url: &str) -> Result<Uri, String> {
    let uri: Uri = url.parse().map_err(|e| {
        format!("{url:?} is not a valid URL ({e}): write it like https://partner.example/ess")
    })?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => {
            return Err(format!(
                "{url:?} must start with http:// or https://, e.g. https://partner.example/ess"
            ));
        }
    }
    let Some(authority) = uri.authority() else {
        return Err(format!(
            "{url:?} has no host: write it like https://partner.example/ess"
        ));
    };
    if authority.as_str().contains('@') {
        return Err(format!(
            "{} carries credentials in the URL: remove them and send them with secret_headers",
            redact(&uri)
        ));
    }
    if authority.host().is_empty() {
        return Err(format!(
            "{url:?} has no host: write it like https://partner.example/ess"
        ));
    }
    Ok(uri)
}

pub(super) fn header_name(name: &str) -> Result<HeaderName, String> {
    let parsed = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("{name:?} is not a valid header name"))?;
    if parsed == CONTENT_TYPE {
        return Err("set the content type with content_type, not as a header".into());
    }
    if RESERVED.contains(&parsed.as_str()) {
        return Err(format!(
            "{name} is set by the sink itself and cannot be configured; remove it"
        ));
    }
    Ok(parsed)
}

impl SinkSpec for HttpConfig {
    fn retry(&self) -> &RetryConfig {
        &self.retry
    }

    /// Resolves relative file paths (`ca_file`, secret files) against `base`.
    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(ca) = &mut self.ca_file {
            fix(ca);
        }
        for source in self.secret_headers.values_mut() {
            source.resolve_path(base);
        }
    }

    /// Pure checks; `key` is this sink's key path.
    fn validate(&self, key: &str) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut bad = |field: String, message: String| {
            problems.push(Problem {
                key: format!("{key}.{field}"),
                message,
            })
        };
        if let Err(message) = parse_url(&self.url) {
            bad("url".into(), message);
        }
        let mut seen: std::collections::HashMap<HeaderName, &str> = Default::default();
        let names = self
            .headers
            .keys()
            .map(|n| ("headers", n))
            .chain(self.secret_headers.keys().map(|n| ("secret_headers", n)));
        for (table, name) in names {
            match header_name(name) {
                Err(message) => bad(format!("{table}.{name}"), message),
                Ok(parsed) => {
                    if let Some(first) = seen.insert(parsed, table) {
                        bad(
                            format!("{table}.{name}"),
                            format!("is also set in {first}: set each header once"),
                        );
                    }
                }
            }
        }
        for (name, value) in &self.headers {
            if HeaderValue::from_str(value).is_err() {
                bad(
                    format!("headers.{name}"),
                    "is not a valid header value: remove control characters".into(),
                );
            }
        }
        for (name, source) in &self.secret_headers {
            if let Err(message) = source.check() {
                bad(format!("secret_headers.{name}"), message);
            }
        }
        if self.timeout_ms == 0 {
            bad(
                "timeout_ms".into(),
                "must be at least 1 (the default is 10000)".into(),
            );
        }
        if let Some(ct) = &self.content_type
            && (ct.trim().is_empty() || HeaderValue::from_str(ct).is_err())
        {
            bad(
                "content_type".into(),
                format!("{ct:?} is not a valid content type: write it like \"application/xml\""),
            );
        }
        problems
    }

    fn secret_sources(&self) -> Vec<(String, SecretOrFile<'_>)> {
        self.secret_headers
            .iter()
            .map(|(name, source)| {
                (
                    format!("secret_headers.{name}"),
                    SecretOrFile::Secret(source),
                )
            })
            .collect()
    }

    fn build(&self, context: &BuildContext<'_>) -> Result<Arc<dyn Sink>, Problem> {
        Ok(Arc::new(
            super::HttpSink::new(self).map_err(|m| context.problem(m))?,
        ))
    }
}
