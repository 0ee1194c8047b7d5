//! The `http` sink: sends the adapter's output to a partner's HTTP(S) endpoint in one request.
//!
//! The whole output goes in one request: a JSON string output as its text
//! (`text/plain; charset=utf-8`), anything else as JSON (`application/json`); `content_type`
//! overrides either. Every request carries `ess-event-id`, `ess-event-type`, `ess-route` and
//! `Idempotency-Key: <event id>:<route>`. The guarantee is at least once: a request whose answer
//! was lost is sent again, and the partner deduplicates by the idempotency key.
//!
//! # Error classification
//!
//! By status code and error type, never by message text:
//!
//! - 2xx: applied.
//! - **Retryable**: 408, 425, 429 and every 5xx (with the wait a `Retry-After` header asks
//!   for, which the dispatcher grants); connection errors (refused, reset, TLS
//!   handshake failures, DNS failures) and timeouts (`timeout_ms` covers connecting, sending and
//!   receiving the answer). A certificate the agent does not trust is retried
//!   too: it is usually fixed on the partner's side (a renewed certificate) without a change
//!   here, and the retry policy still dead-letters the event in the end.
//! - **Permanent**: every other status, including 3xx (redirects are not followed: point `url`
//!   at the final address) and the other 4xx. The message has the status and the first 500
//!   bytes of the response body, which is usually where the partner says what it disliked.
//!
//! Secret header values are read when the sink is built (at start, and by every reload, which
//! builds the sink again when one changed), are marked sensitive (HTTP/2 never indexes them)
//! and never appear in logs, errors or `Debug` output.

mod config;

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use tokio::time::{Instant, timeout_at};

use super::{EventMeta, Sink, SinkError};
use crate::http_client::{ClientTls, HttpClient, client};
use crate::settings::read_secret;
pub use config::HttpConfig;
use config::*;

const JSON: &str = "application/json";
const TEXT: &str = "text/plain; charset=utf-8";

/// How much of an error response's body goes into the message.
const EXCERPT_BYTES: usize = 500;
/// How much of a successful response's body is read so that the connection can be reused.
const DRAIN_BYTES: usize = 64 * 1024;

/// The URL without query (which might carry a token) and user info, for messages.
pub(super) fn redact(uri: &Uri) -> String {
    let host = uri.host().unwrap_or("");
    let port = uri.port().map(|p| format!(":{p}")).unwrap_or_default();
    format!(
        "{}://{host}{port}{}",
        uri.scheme_str().unwrap_or(""),
        uri.path()
    )
}

/// The `http` sink.
pub struct HttpSink {
    client: HttpClient,
    uri: Uri,
    /// The URL for messages (no query, no user info).
    shown: String,
    method: Method,
    /// Static and secret headers; secret values are marked sensitive.
    headers: HeaderMap,
    timeout: Duration,
    content_type: Option<HeaderValue>,
}

impl std::fmt::Debug for HttpSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Header names only: values may be secrets.
        f.debug_struct("HttpSink")
            .field("url", &self.shown)
            .field("method", &self.method)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl HttpSink {
    /// Builds the sink: reads the secret headers and the CA file. Opens no connection.
    pub fn new(config: &HttpConfig) -> Result<HttpSink, String> {
        let uri = parse_url(&config.url).map_err(|e| format!("url: {e}"))?;
        if config.timeout_ms == 0 {
            return Err("timeout_ms: must be at least 1".into());
        }
        let mut headers = HeaderMap::new();
        for (name, value) in &config.headers {
            let parsed = header_name(name).map_err(|e| format!("headers.{name}: {e}"))?;
            let value = HeaderValue::from_str(value).map_err(|_| {
                format!("headers.{name}: not a valid header value: remove control characters")
            })?;
            headers.insert(parsed, value);
        }
        for (name, source) in &config.secret_headers {
            let parsed = header_name(name).map_err(|e| format!("secret_headers.{name}: {e}"))?;
            let secret = read_secret(source).map_err(|e| format!("secret_headers.{name}: {e}"))?;
            // The error must not echo the secret.
            let mut value = HeaderValue::from_str(&secret).map_err(|_| {
                format!(
                    "secret_headers.{name}: the secret is not a valid header value: remove \
                     control characters from it"
                )
            })?;
            value.set_sensitive(true);
            headers.insert(parsed, value);
        }
        let content_type = config
            .content_type
            .as_deref()
            .map(HeaderValue::from_str)
            .transpose()
            .map_err(|_| "content_type: not a valid header value".to_string())?;
        let tls = ClientTls {
            ca_file: config.ca_file.as_deref(),
            client_cert: None,
        };
        let client = client(&tls).map_err(|e| format!("ca_file: {e}"))?;
        Ok(HttpSink {
            client,
            shown: redact(&uri),
            uri,
            method: config.method.method(),
            headers,
            timeout: Duration::from_millis(config.timeout_ms),
            content_type,
        })
    }

    fn request(
        &self,
        event: &EventMeta,
        output: &Value,
    ) -> Result<Request<Full<Bytes>>, SinkError> {
        let (body, default_type) = match output {
            Value::String(text) => (Bytes::from(text.clone().into_bytes()), TEXT),
            other => (
                Bytes::from(serde_json::to_vec(other).map_err(|e| {
                    SinkError::Permanent(format!("cannot encode the output as JSON: {e}"))
                })?),
                JSON,
            ),
        };
        let event_header = |what: &str, value: &str| {
            HeaderValue::from_str(value).map_err(|_| {
                SinkError::Permanent(format!(
                    "the {what} {value:?} cannot be sent as a header value (it holds control \
                     characters): this event cannot be sent to an http sink"
                ))
            })
        };
        let mut request = Request::builder()
            .method(self.method.clone())
            .uri(self.uri.clone())
            .body(Full::new(body))
            .map_err(|e| SinkError::Permanent(format!("cannot build the request: {e}")))?;
        let headers = request.headers_mut();
        headers.clone_from(&self.headers);
        headers.insert(
            CONTENT_TYPE,
            self.content_type
                .clone()
                .unwrap_or(HeaderValue::from_static(default_type)),
        );
        headers.insert("ess-event-id", event_header("event id", &event.id)?);
        headers.insert(
            "ess-event-type",
            event_header("event type", &event.event_type)?,
        );
        headers.insert("ess-route", event_header("route", &event.route)?);
        headers.insert(
            "idempotency-key",
            event_header("idempotency key", &format!("{}:{}", event.id, event.route))?,
        );
        Ok(request)
    }
}

#[async_trait::async_trait]
impl Sink for HttpSink {
    async fn apply(&self, event: &EventMeta, output: &Value) -> Result<(), SinkError> {
        let request = self.request(event, output)?;
        let deadline = Instant::now() + self.timeout;
        let response = match timeout_at(deadline, self.client.request(request)).await {
            Err(_) => {
                return Err(SinkError::Retryable(format!(
                    "{} did not answer within {} ms; the request will be retried (raise \
                     timeout_ms if the endpoint is just slow)",
                    self.shown,
                    self.timeout.as_millis()
                )));
            }
            Ok(Err(e)) => {
                return Err(SinkError::Retryable(format!(
                    "cannot reach {}: {}; the request will be retried",
                    self.shown,
                    error_chain(&e)
                )));
            }
            Ok(Ok(response)) => response,
        };
        let status = response.status();
        if status.is_success() {
            // Read a small body to the end so that the connection goes back to the pool; the
            // status already says the output was taken, so a failure here changes nothing.
            let _ = read_prefix(response.into_body(), deadline, DRAIN_BYTES).await;
            return Ok(());
        }
        let asked_wait = response
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|value| retry_after(value, SystemTime::now()));
        let body = read_prefix(response.into_body(), deadline, EXCERPT_BYTES).await;
        let excerpt = match excerpt(&body) {
            text if text.is_empty() => "(empty body)".to_string(),
            text => format!("{text:?}"),
        };
        let status_text = format!(
            "{} {}",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        );
        let status_text = status_text.trim_end();
        Err(if is_retryable(status) {
            match asked_wait {
                Some(wait) => SinkError::RetryAfter(
                    format!(
                        "{} answered {status_text}: {excerpt}; it asked for {} s before the \
                         retry (Retry-After), and is given that",
                        self.shown,
                        wait.as_secs()
                    ),
                    wait,
                ),
                None => SinkError::Retryable(format!(
                    "{} answered {status_text}: {excerpt}; the request will be retried",
                    self.shown
                )),
            }
        } else if status.is_redirection() {
            SinkError::Permanent(format!(
                "{} answered {status_text}: {excerpt}: redirects are not followed; set url to \
                 the final address, then replay the event",
                self.shown
            ))
        } else {
            SinkError::Permanent(format!(
                "{} answered {status_text}: {excerpt}: fix the adapter output or the endpoint, \
                 then replay the event",
                self.shown
            ))
        })
    }

    /// Opens (and closes) a TCP connection to the endpoint: reachability without sending the
    /// partner a request.
    async fn healthcheck(&self) -> Result<(), SinkError> {
        let host = self
            .uri
            .host()
            .unwrap_or("")
            .trim_matches(['[', ']'])
            .to_owned();
        let port = self.uri.port_u16().unwrap_or(match self.uri.scheme_str() {
            Some("https") => 443,
            _ => 80,
        });
        match tokio::time::timeout(
            self.timeout,
            tokio::net::TcpStream::connect((host.as_str(), port)),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(SinkError::Retryable(format!(
                "cannot connect to {}: {e}",
                self.shown
            ))),
            Err(_) => Err(SinkError::Retryable(format!(
                "cannot connect to {} within {} ms",
                self.shown,
                self.timeout.as_millis()
            ))),
        }
    }
}

/// The wait a `Retry-After` value asks for (RFC 9110 §10.2.3): delay-seconds or an HTTP-date
/// (a date in the past asks for none). `None` when it is neither.
fn retry_after(value: &http::HeaderValue, now: SystemTime) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(text).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Statuses that say "later" rather than "no".
fn is_retryable(status: StatusCode) -> bool {
    matches!(status.as_u16(), 408 | 425 | 429) || status.is_server_error()
}

/// Reads up to `limit` bytes of a body, stopping at the deadline or an error.
async fn read_prefix(mut body: hyper::body::Incoming, deadline: Instant, limit: usize) -> Vec<u8> {
    let mut buf = Vec::new();
    while buf.len() < limit {
        match timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    buf.extend_from_slice(&data);
                }
            }
            _ => break,
        }
    }
    buf.truncate(limit);
    buf
}

/// The body as text for a message, without a character cut in half at the end.
fn excerpt(body: &[u8]) -> String {
    let body = match std::str::from_utf8(body) {
        Err(e) if e.error_len().is_none() => &body[..e.valid_up_to()],
        _ => body,
    };
    String::from_utf8_lossy(body).into_owned()
}

/// An error and its causes, joined: hyper's own message ("client error (Connect)") says little.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use crate::settings::{RetryConfig, SecretSource};
    use crate::sink::SinkSpec;
    use std::collections::BTreeMap;
    use std::net::SocketAddr;
    use std::path::Path;
    use std::sync::{Arc, Mutex};

    use hyper::body::Incoming;
    use hyper::service::service_fn;
    use hyper::{Response, StatusCode};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto;
    use serde_json::json;
    use tokio::net::TcpListener;

    use super::*;

    /// A request as the test server saw it.
    #[derive(Debug, Clone)]
    struct Seen {
        method: Method,
        path: String,
        headers: HeaderMap,
        body: Bytes,
    }

    type Log = Arc<Mutex<Vec<Seen>>>;

    async fn handle(
        request: Request<Incoming>,
        log: Log,
        status: StatusCode,
        reply: String,
    ) -> Result<Response<Full<Bytes>>, hyper::Error> {
        let (parts, body) = request.into_parts();
        let body = body.collect().await?.to_bytes();
        log.lock().unwrap().push(Seen {
            method: parts.method,
            path: parts.uri.to_string(),
            headers: parts.headers,
            body,
        });
        Ok(Response::builder()
            .status(status)
            .body(Full::new(Bytes::from(reply)))
            .unwrap())
    }

    /// Starts a server on 127.0.0.1:0 that answers every request with `status` and `reply`,
    /// over TLS when `tls` is given.
    async fn serve(
        status: StatusCode,
        reply: &str,
        tls: Option<crate::ingress::tls::TlsAcceptor>,
    ) -> (SocketAddr, Log) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log: Log = Arc::default();
        let reply = reply.to_string();
        let server_log = log.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let log = server_log.clone();
                let reply = reply.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service =
                        service_fn(move |req| handle(req, log.clone(), status, reply.clone()));
                    let builder = auto::Builder::new(TokioExecutor::new());
                    match tls {
                        Some(tls) => {
                            let Ok(stream) = tls.accept(stream).await else {
                                return;
                            };
                            let _ = builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                        None => {
                            let _ = builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                    }
                });
            }
        });
        (addr, log)
    }

    fn event() -> EventMeta {
        EventMeta {
            id: "evt-1".into(),
            event_type: "case.updated".into(),
            version: 1,
            subject: "case-42".into(),
            revision: None,
            source: None,
            route: "courts".into(),
            partner: "p1".into(),
            received_at_ms: 1_796_601_600_000,
        }
    }

    fn config(url: &str) -> HttpConfig {
        HttpConfig {
            url: url.into(),
            method: HttpMethod::Post,
            headers: BTreeMap::new(),
            secret_headers: BTreeMap::new(),
            timeout_ms: 5000,
            ca_file: None,
            content_type: None,
            retry: RetryConfig::default(),
        }
    }

    #[tokio::test]
    async fn json_output_is_posted_with_event_headers() {
        let (addr, log) = serve(StatusCode::CREATED, "ok", None).await;
        let mut c = config(&format!("http://{addr}/ess/changes?tenant=7"));
        c.headers.insert("X-Partner".into(), "north".into());
        let sink = HttpSink::new(&c).unwrap();
        let output = json!({"case": 42, "items": [1, 2]});
        sink.apply(&event(), &output).await.unwrap();
        let seen = log.lock().unwrap().clone();
        assert_eq!(seen.len(), 1);
        let r = &seen[0];
        assert_eq!(r.method, Method::POST);
        assert_eq!(r.path, "/ess/changes?tenant=7");
        assert_eq!(r.headers["content-type"], "application/json");
        assert_eq!(r.headers["ess-event-id"], "evt-1");
        assert_eq!(r.headers["ess-event-type"], "case.updated");
        assert_eq!(r.headers["ess-route"], "courts");
        assert_eq!(r.headers["idempotency-key"], "evt-1:courts");
        assert_eq!(r.headers["x-partner"], "north");
        assert_eq!(serde_json::from_slice::<Value>(&r.body).unwrap(), output);
        assert_eq!(r.body, serde_json::to_vec(&output).unwrap());
    }

    #[tokio::test]
    async fn string_output_is_sent_as_text_and_put_works() {
        let (addr, log) = serve(StatusCode::NO_CONTENT, "", None).await;
        let mut c = config(&format!("http://{addr}/"));
        c.method = HttpMethod::Put;
        let sink = HttpSink::new(&c).unwrap();
        let text = "a;b\r\n1;Ő\r\n";
        sink.apply(&event(), &json!(text)).await.unwrap();
        let seen = log.lock().unwrap().clone();
        assert_eq!(seen[0].method, Method::PUT);
        assert_eq!(seen[0].headers["content-type"], "text/plain; charset=utf-8");
        assert_eq!(seen[0].body, text.as_bytes());
    }

    #[tokio::test]
    async fn content_type_override_applies_to_every_output() {
        let (addr, log) = serve(StatusCode::OK, "", None).await;
        let mut c = config(&format!("http://{addr}/"));
        c.content_type = Some("application/xml".into());
        let sink = HttpSink::new(&c).unwrap();
        sink.apply(&event(), &json!("<a/>")).await.unwrap();
        sink.apply(&event(), &json!({"a": 1})).await.unwrap();
        let seen = log.lock().unwrap().clone();
        assert_eq!(seen.len(), 2);
        for r in &seen {
            assert_eq!(r.headers["content-type"], "application/xml");
            assert_eq!(r.headers.get_all("content-type").iter().count(), 1);
        }
        assert_eq!(seen[0].body, "<a/>");
    }

    #[tokio::test]
    async fn server_errors_and_throttling_are_retryable() {
        for status in [500, 502, 503, 408, 425, 429] {
            let status = StatusCode::from_u16(status).unwrap();
            let (addr, _) = serve(status, "busy", None).await;
            let sink = HttpSink::new(&config(&format!("http://{addr}/"))).unwrap();
            let e = sink.apply(&event(), &json!({})).await.unwrap_err();
            assert!(e.is_retryable(), "{status}: {e}");
            assert!(e.to_string().contains(status.as_str()), "{e}");
            assert!(e.to_string().contains("busy"), "{e}");
        }
    }

    #[test]
    fn retry_after_is_seconds_or_an_http_date() {
        let now = httpdate::parse_http_date("Sun, 22 Nov 2026 08:00:00 GMT").unwrap();
        let wait = |v: &str| retry_after(&http::HeaderValue::from_str(v).unwrap(), now);
        assert_eq!(wait("120"), Some(Duration::from_secs(120)));
        assert_eq!(wait(" 0 "), Some(Duration::ZERO));
        assert_eq!(
            wait("Sun, 22 Nov 2026 08:01:30 GMT"),
            Some(Duration::from_secs(90))
        );
        assert_eq!(wait("Sun, 22 Nov 2026 07:00:00 GMT"), Some(Duration::ZERO));
        assert_eq!(wait("-5"), None);
        assert_eq!(wait("soon"), None);
    }

    #[tokio::test]
    async fn client_errors_are_permanent_with_a_body_excerpt() {
        let reply = format!("field case is invalid {}", "x".repeat(2000));
        let (addr, _) = serve(StatusCode::BAD_REQUEST, &reply, None).await;
        let sink = HttpSink::new(&config(&format!("http://{addr}/x?token=hidden"))).unwrap();
        let e = sink.apply(&event(), &json!({})).await.unwrap_err();
        assert!(!e.is_retryable(), "{e}");
        let message = e.to_string();
        assert!(message.contains("400 Bad Request"), "{message}");
        assert!(message.contains("field case is invalid"), "{message}");
        assert!(message.contains(&reply[..EXCERPT_BYTES]), "{message}");
        assert!(!message.contains(&reply[..EXCERPT_BYTES + 1]), "{message}");
        assert!(
            !message.contains("hidden"),
            "the query is not shown: {message}"
        );
        for status in [301, 302, 401, 403, 404, 409, 422] {
            let status = StatusCode::from_u16(status).unwrap();
            let (addr, _) = serve(status, "no", None).await;
            let sink = HttpSink::new(&config(&format!("http://{addr}/"))).unwrap();
            let e = sink.apply(&event(), &json!({})).await.unwrap_err();
            assert!(!e.is_retryable(), "{status}: {e}");
            assert!(e.to_string().contains(status.as_str()), "{e}");
        }
    }

    #[test]
    fn excerpt_does_not_split_a_character() {
        let text = "aé".as_bytes();
        assert_eq!(excerpt(&text[..2]), "a");
        assert_eq!(excerpt(text), "aé");
        assert_eq!(excerpt(b"\xff\xfe ok"), "\u{fffd}\u{fffd} ok");
    }

    #[tokio::test]
    async fn connection_refused_is_retryable() {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let sink = HttpSink::new(&config(&format!("http://{addr}/"))).unwrap();
        let e = sink.apply(&event(), &json!({})).await.unwrap_err();
        assert!(e.is_retryable(), "{e}");
        assert!(e.to_string().contains("cannot reach"), "{e}");
    }

    #[tokio::test]
    async fn a_server_that_never_answers_times_out_as_retryable() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            // Accept and hold connections without reading or answering.
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let mut c = config(&format!("http://{addr}/"));
        c.timeout_ms = 200;
        let sink = HttpSink::new(&c).unwrap();
        let started = std::time::Instant::now();
        let e = sink.apply(&event(), &json!({})).await.unwrap_err();
        assert!(e.is_retryable(), "{e}");
        assert!(e.to_string().contains("within 200 ms"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn secret_headers_are_read_from_files_and_env_and_never_shown() {
        let (addr, log) = serve(StatusCode::OK, "", None).await;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        std::fs::write(&file, "  s3cret-from-file\n").unwrap();
        let mut c = config(&format!("http://{addr}/"));
        c.secret_headers.insert(
            "X-Api-Key".into(),
            SecretSource {
                file: Some("key".into()),
                env: None,
                credential: None,
            },
        );
        c.resolve_paths(dir.path());
        assert!(c.validate("sinks.h").is_empty());
        let sink = HttpSink::new(&c).unwrap();
        assert!(!format!("{sink:?}").contains("s3cret"));
        sink.apply(&event(), &json!({})).await.unwrap();
        let seen = log.lock().unwrap().clone();
        assert_eq!(seen[0].headers["x-api-key"], "s3cret-from-file");

        // The PATH variable is always set; its value stands in for a secret from the
        // environment without the test modifying the process environment.
        let path = std::env::var("PATH").unwrap();
        let mut c = config(&format!("http://{addr}/"));
        c.secret_headers.insert(
            "Authorization".into(),
            SecretSource {
                file: None,
                env: Some("PATH".into()),
                credential: None,
            },
        );
        let sink = HttpSink::new(&c).unwrap();
        sink.apply(&event(), &json!({})).await.unwrap();
        let seen = log.lock().unwrap().clone();
        assert_eq!(seen[1].headers["authorization"], path.trim());
    }

    #[test]
    fn unreadable_secret_fails_the_build_without_echoing_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config("https://partner.example/");
        c.secret_headers.insert(
            "X-Api-Key".into(),
            SecretSource {
                file: Some(dir.path().join("missing")),
                env: None,
                credential: None,
            },
        );
        let e = HttpSink::new(&c).unwrap_err();
        assert!(
            e.starts_with("secret_headers.X-Api-Key: cannot read secret file"),
            "{e}"
        );
        let bad = dir.path().join("bad");
        std::fs::write(&bad, "line1\nline2-secret").unwrap();
        c.secret_headers.get_mut("X-Api-Key").unwrap().file = Some(bad);
        let e = HttpSink::new(&c).unwrap_err();
        assert!(e.contains("not a valid header value"), "{e}");
        assert!(!e.contains("line2-secret"), "{e}");
    }

    #[tokio::test]
    async fn https_with_a_configured_ca_file() {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

        let dir = tempfile::tempdir().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let tls = crate::settings::TlsConfig {
            cert: write("server.pem", &leaf.pem()),
            key: write("server.key", &key.serialize_pem()),
            client_ca: None,
            client_allowed_names: Vec::new(),
        };
        let ca_file = write("ca.pem", &ca.pem());
        let acceptor = crate::ingress::tls::TlsAcceptor::new(&tls).unwrap();
        let (addr, log) = serve(StatusCode::OK, "", Some(acceptor)).await;
        let url = format!("https://{addr}/");

        let mut c = config(&url);
        c.ca_file = Some(ca_file);
        HttpSink::new(&c)
            .unwrap()
            .apply(&event(), &json!({"a": 1}))
            .await
            .unwrap();
        assert_eq!(log.lock().unwrap().len(), 1);

        // Without the CA the certificate is not trusted: retryable, and nothing arrives.
        let e = HttpSink::new(&config(&url))
            .unwrap()
            .apply(&event(), &json!({"a": 1}))
            .await
            .unwrap_err();
        assert!(e.is_retryable(), "{e}");
        assert_eq!(log.lock().unwrap().len(), 1);
    }

    #[test]
    fn missing_ca_file_fails_the_build() {
        let mut c = config("https://partner.example/");
        c.ca_file = Some("/nonexistent/ca.pem".into());
        let e = HttpSink::new(&c).unwrap_err();
        assert!(e.starts_with("ca_file: "), "{e}");
    }

    #[test]
    fn validate_checks_url_headers_and_timeout() {
        assert!(
            config("https://partner.example/ess")
                .validate("sinks.h")
                .is_empty()
        );
        assert!(
            config("http://127.0.0.1:8080")
                .validate("sinks.h")
                .is_empty()
        );
        for url in [
            "partner.example/ess",
            "ftp://partner.example/",
            "https://",
            "https:///path",
            "https://user:pw@partner.example/",
            "not a url",
            "",
        ] {
            let p = config(url).validate("sinks.h");
            assert_eq!(p.len(), 1, "{url:?}: {p:?}");
            assert_eq!(p[0].key, "sinks.h.url");
            assert!(!p[0].message.contains("pw"), "{}", p[0].message);
        }

        let mut c = config("https://partner.example/");
        c.headers.insert("bad name".into(), "v".into());
        c.headers.insert("X-Ok".into(), "bad\nvalue".into());
        c.headers.insert("Content-Type".into(), "text/csv".into());
        c.headers.insert("Idempotency-Key".into(), "x".into());
        c.headers.insert("X-Twice".into(), "1".into());
        c.secret_headers.insert(
            "x-twice".into(),
            SecretSource {
                file: Some("f".into()),
                env: None,
                credential: None,
            },
        );
        c.secret_headers.insert(
            "X-Neither".into(),
            SecretSource {
                file: None,
                env: None,
                credential: None,
            },
        );
        c.secret_headers.insert(
            "X-Both".into(),
            SecretSource {
                file: Some("f".into()),
                env: Some("E".into()),
                credential: None,
            },
        );
        c.timeout_ms = 0;
        c.content_type = Some("".into());
        let mut keys: Vec<String> = c.validate("sinks.h").into_iter().map(|p| p.key).collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "sinks.h.content_type",
                "sinks.h.headers.Content-Type",
                "sinks.h.headers.Idempotency-Key",
                "sinks.h.headers.X-Ok",
                "sinks.h.headers.bad name",
                "sinks.h.secret_headers.X-Both",
                "sinks.h.secret_headers.X-Neither",
                "sinks.h.secret_headers.x-twice",
                "sinks.h.timeout_ms",
            ]
        );
    }

    #[test]
    fn config_parses_with_defaults_and_refuses_unknown_keys() {
        let c: HttpConfig = toml::from_str("url = \"https://p.example/\"\n").unwrap();
        assert_eq!(c.method, HttpMethod::Post);
        assert_eq!(c.timeout_ms, 10_000);
        assert!(c.headers.is_empty() && c.secret_headers.is_empty());
        assert_eq!(c.ca_file, None);
        assert_eq!(c.content_type, None);
        let text = r#"
url = "https://p.example/"
method = "PUT"
timeout_ms = 2500
ca_file = "ca.pem"
headers = { "X-A" = "1" }
secret_headers = { Authorization = { file = "token" } }
"#;
        let mut c: HttpConfig = toml::from_str(text).unwrap();
        assert_eq!(c.method, HttpMethod::Put);
        c.resolve_paths(Path::new("/etc/ess"));
        assert_eq!(c.ca_file.as_deref(), Some(Path::new("/etc/ess/ca.pem")));
        assert_eq!(
            c.secret_headers["Authorization"].file.as_deref(),
            Some(Path::new("/etc/ess/token"))
        );
        assert_eq!(c, c.clone());
        let e = toml::from_str::<HttpConfig>("url = \"https://p/\"\ntimeout = 1\n").unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
        let e =
            toml::from_str::<HttpConfig>("url = \"https://p/\"\nmethod = \"GET\"\n").unwrap_err();
        assert!(e.to_string().contains("unknown variant"), "{e}");
    }
}
