//! The admin listener: liveness, readiness, metrics and the operator's API (events, replay, dead
//! letters, adapters), described by `docs/openapi.json`.
//!
//! Plain HTTP, loopback by default. `/healthz`, `/readyz` and `/metrics` are open (for probes
//! and Prometheus); everything under `/v1/` needs the admin token when one is configured. A
//! request that changes state is refused when a browser says it comes from another site
//! ([`cross_site`]).
//!
//! This file routes; each area has its own: [`events`] (listing, detail, replay),
//! [`dead_letters`], [`adapters`] (listing, evaluation) and [`openapi`].

mod adapters;
pub mod console;
mod dead_letters;
mod events;
mod openapi;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::dispatch::Dispatcher;
use crate::ingress::conn::Connections;
use crate::journal::{Journal, JournalError};
use crate::protocol::auth::BearerToken;
use crate::protocol::problem::{Body, Problem, json_response};

/// Why the agent is not ready, per component. Empty means ready.
#[derive(Debug, Default)]
pub struct Readiness {
    reasons: Mutex<BTreeMap<String, String>>,
}

impl Readiness {
    /// Marks a component not ready, with the reason.
    pub fn not_ready(&self, component: &str, reason: impl Into<String>) {
        self.lock().insert(component.to_owned(), reason.into());
    }

    /// Marks a component ready.
    pub fn ready(&self, component: &str) {
        self.lock().remove(component);
    }

    /// Keeps only the components for which `keep` is true.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.lock().retain(|k, _| keep(k));
    }

    /// The reasons the agent is not ready; empty when it is.
    pub fn reasons(&self) -> BTreeMap<String, String> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        self.reasons.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What the admin endpoints read.
pub struct Admin {
    pub journal: Arc<Journal>,
    pub dispatcher: Arc<Dispatcher>,
    pub reloader: Option<Arc<crate::reload::Reloader>>,
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    pub readiness: Arc<Readiness>,
    pub token: Option<BearerToken>,
    /// The agent id, bound as `$partner` when an adapter is evaluated.
    pub partner: String,
}

impl Admin {
    async fn handle(self: Arc<Self>, req: Request<Incoming>, local: SocketAddr) -> Response<Body> {
        let path = req.uri().path().to_owned();
        let method = req.method().clone();
        let mut response = match self.route(req, &path, local).await {
            Ok(response) => response,
            Err(problem) => problem.into_response(),
        };
        if method == Method::HEAD {
            // The GET answer's head, with the length of the body it would have had.
            let length = response.body().size_hint().exact().unwrap_or(0);
            *response.body_mut() = Body::default();
            response.headers_mut().insert(
                http::header::CONTENT_LENGTH,
                http::HeaderValue::from(length),
            );
        }
        tracing::debug!(target: "ess_agent::admin", method = %method, path = %path, status = response.status().as_u16(), "admin request");
        response
    }

    async fn route(
        &self,
        req: Request<Incoming>,
        path: &str,
        local: SocketAddr,
    ) -> Result<Response<Body>, Problem> {
        // HEAD is answered as GET; `handle` leaves the body out.
        let method = if req.method() == Method::HEAD {
            &Method::GET
        } else {
            req.method()
        };
        let host = req
            .headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()));
        if (path.starts_with("/v1/") || console::is_console(path))
            && local.ip().is_loopback()
            && let Some(host) = host
        {
            loopback_host(host, local)?;
        }
        // The operator console's pages (HTML), with its own cross-site check; see `console`.
        if console::is_console(path) {
            return Ok(self.console(req, path, local).await);
        }
        if !matches!(*method, Method::GET | Method::OPTIONS) {
            cross_site(req.headers(), local)?;
        }
        // Everything under /v1/ needs the token, known endpoint or not.
        if path.starts_with("/v1/")
            && let Some(token) = &self.token
        {
            token.verify(req.headers()).map_err(|e| {
                Problem::new(
                    StatusCode::UNAUTHORIZED,
                    e.code(),
                    format!("{e} (the admin token)"),
                )
            })?;
        }
        let query = req.uri().query().unwrap_or("").to_owned();
        let query = query.as_str();
        let endpoint = Endpoint::of(method, path)
            .ok_or_else(|| wrong_method_or_not_found(req.method(), path))?;
        match endpoint {
            Endpoint::Metrics => {
                crate::telemetry::refresh_dispatcher_gauges(&self.dispatcher);
                let journal = self.journal.clone();
                let _ =
                    tokio::task::spawn_blocking(move || crate::telemetry::refresh_gauges(&journal))
                        .await;
                let text = self
                    .metrics
                    .as_ref()
                    .map(|h| h.render())
                    .unwrap_or_default();
                let mut response =
                    Response::new(http_body_util::Full::new(bytes::Bytes::from(text)));
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                Ok(response)
            }
            Endpoint::Healthz => Ok(json_response(StatusCode::OK, &json!({"status": "ok"}))),
            Endpoint::Readyz => {
                let reasons = self.readiness.reasons();
                if reasons.is_empty() {
                    Ok(json_response(StatusCode::OK, &json!({"ready": true})))
                } else {
                    Ok(json_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &json!({"ready": false, "reasons": reasons}),
                    ))
                }
            }
            Endpoint::Events => self.list_events(query).await,
            Endpoint::Event(id) => self.get_event(id).await,
            Endpoint::Replay(id) => {
                let body = read_body(req.into_body(), MAX_BODY_BYTES).await?;
                self.replay(id, query_flag(query, "force"), &body).await
            }
            Endpoint::DeadLetters => self.dead_letters(query).await,
            Endpoint::RetryDeadLetters => {
                let body = read_body(req.into_body(), MAX_BODY_BYTES).await?;
                self.retry_dead_letters(&body).await
            }
            Endpoint::Adapters => Ok(json_response(
                StatusCode::OK,
                &json!({"adapters": self.reloader.as_ref().map(|r| r.adapters()).unwrap_or_default()}),
            )),
            Endpoint::EvalAdapter => {
                let body = read_body(req.into_body(), adapters::MAX_EVAL_BODY_BYTES).await?;
                self.eval_adapter(&body).await
            }
            Endpoint::RunFixtures(name) => {
                let body = read_body(req.into_body(), adapters::MAX_EVAL_BODY_BYTES).await?;
                self.run_fixtures(name, &body).await
            }
            Endpoint::RetryDeadLetter(id) => self.replay(id, false, &[]).await,
            Endpoint::DropDeadLetter(id) => self.drop_dead_letter(id).await,
            Endpoint::OpenApi => Ok(openapi::response()),
        }
    }
}

/// Largest request body the admin API reads, except an adapter evaluation's.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// Reads a request body of at most `max` bytes; a longer one is refused (413).
async fn read_body(body: Incoming, max: usize) -> Result<Bytes, Problem> {
    match http_body_util::Limited::new(body, max).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the request body is larger than {max} bytes: send less"),
        )),
        Err(e) => Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "unreadable_body",
            format!("the request body could not be read: {e}"),
        )),
    }
}

/// Parses a JSON request body; an empty body is `default`.
fn json_body<T: serde::de::DeserializeOwned>(
    body: &[u8],
    default: Option<T>,
) -> Result<T, Problem> {
    if body.iter().all(u8::is_ascii_whitespace)
        && let Some(default) = default
    {
        return Ok(default);
    }
    serde_json::from_slice(body).map_err(|e| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            format!("the request body is not what this endpoint takes: {e}"),
        )
    })
}

/// Refuses a state-changing request that a browser sent from another site: one whose `Origin`
/// is present and is not this listener's own (`http://` and the address the request reached, or
/// `localhost` with the same port), or whose `Sec-Fetch-Site` is present and not `same-origin`
/// or `none` (typed by the user). A request with neither header (the CLI, curl, scripts) passes:
/// browsers send `Origin` on every cross-origin POST, PUT and DELETE. Comparing with the
/// listener's own address rather than the `Host` header keeps a DNS name that an attacker points
/// at 127.0.0.1 from passing for the listener.
fn cross_site(headers: &HeaderMap, local: SocketAddr) -> Result<(), Problem> {
    let refuse = |why: String| {
        Problem::new(
            StatusCode::FORBIDDEN,
            "cross_site_request",
            format!(
                "{why}: the admin API takes state-changing requests only from its own origin \
                 (http://{local}) or from clients that send no Origin, such as the ess-agent CLI"
            ),
        )
    };
    if let Some(site) = headers.get("sec-fetch-site") {
        let site = site.to_str().unwrap_or("");
        if !matches!(site, "same-origin" | "none") {
            return Err(refuse(format!("the browser says the request is {site:?}")));
        }
    }
    if let Some(origin) = headers.get(http::header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        let own = [
            format!("http://{local}"),
            format!("http://localhost:{}", local.port()),
        ];
        if !own.iter().any(|o| o == origin) {
            return Err(refuse(format!(
                "origin {origin:?} is not the admin listener's"
            )));
        }
    }
    Ok(())
}

/// On a loopback listener, the API and the console answer only requests whose `Host` names a
/// loopback address or `localhost`. A web page whose DNS name an attacker points at 127.0.0.1
/// (DNS rebinding) is same-origin with the listener in the browser's eyes, but it names its own
/// host, and is refused before it can read an answer.
fn loopback_host(host: &str, local: SocketAddr) -> Result<(), Problem> {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        },
    };
    let loopback = name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if loopback {
        return Ok(());
    }
    Err(Problem::new(
        StatusCode::FORBIDDEN,
        "host_not_allowed",
        format!(
            "the admin listener on {local} answers /v1/ and /console only for a loopback address \
             or localhost, not for Host {host:?}, so that a web page whose DNS name is pointed at \
             127.0.0.1 cannot read it: use http://{local}"
        ),
    ))
}

impl Admin {}

/// The methods an admin path answers, as an `Allow` header value; `None` for an unknown path.
fn allowed_methods(path: &str) -> Option<&'static str> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match segments.as_slice() {
        ["healthz"] | ["readyz"] | ["metrics"] => Some("GET, HEAD"),
        ["v1", "events"] | ["v1", "openapi.json"] => Some("GET, HEAD"),
        ["v1", "events", _] | ["v1", "dead-letters"] | ["v1", "adapters"] => Some("GET, HEAD"),
        ["v1", "dead-letters", "retry"] => Some("POST, DELETE"),
        ["v1", "adapters", "eval"] | ["v1", "adapters", _, "fixtures", "run"] => Some("POST"),
        ["v1", "events", _, "replay"] | ["v1", "dead-letters", _, "retry"] => Some("POST"),
        ["v1", "dead-letters", _] => Some("DELETE"),
        _ => None,
    }
}

/// 405 with `Allow` for a known path asked with another method, else 404.
fn wrong_method_or_not_found(method: &Method, path: &str) -> Problem {
    match allowed_methods(path) {
        Some(allow) => Problem::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{method} is not allowed on {path}: use {allow}"),
        )
        .with_allow(allow),
        None => not_found(path),
    }
}

/// Every admin endpoint, as the 404 answer lists them; `{id}` is a percent-encoded event id.
const ENDPOINTS: &[&str] = &[
    "GET /healthz",
    "GET /readyz",
    "GET /metrics",
    "GET /v1/openapi.json",
    "GET /v1/events",
    "GET /v1/events/{id}",
    "POST /v1/events/{id}/replay",
    "GET /v1/dead-letters",
    "POST /v1/dead-letters/retry",
    "POST /v1/dead-letters/{id}/retry",
    "DELETE /v1/dead-letters/{id}",
    "GET /v1/adapters",
    "POST /v1/adapters/eval",
    "POST /v1/adapters/{name}/fixtures/run",
];

/// An admin endpoint a request is for, with the raw (still percent-encoded) event id it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint<'a> {
    Healthz,
    Readyz,
    Metrics,
    OpenApi,
    Events,
    Event(&'a str),
    Replay(&'a str),
    DeadLetters,
    RetryDeadLetters,
    RetryDeadLetter(&'a str),
    DropDeadLetter(&'a str),
    Adapters,
    EvalAdapter,
    /// An adapter's fixtures, by the adapter's name (its file name without `.jsonata`).
    RunFixtures(&'a str),
}

impl<'a> Endpoint<'a> {
    /// The endpoint of a method and path; `None` for anything else (404).
    fn of(method: &Method, path: &'a str) -> Option<Self> {
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        Some(match (method, segments.as_slice()) {
            (&Method::GET, ["healthz"]) => Endpoint::Healthz,
            (&Method::GET, ["readyz"]) => Endpoint::Readyz,
            (&Method::GET, ["metrics"]) => Endpoint::Metrics,
            (&Method::GET, ["v1", "openapi.json"]) => Endpoint::OpenApi,
            (&Method::GET, ["v1", "events"]) => Endpoint::Events,
            (&Method::GET, ["v1", "events", id]) => Endpoint::Event(id),
            (&Method::POST, ["v1", "events", id, "replay"]) => Endpoint::Replay(id),
            (&Method::GET, ["v1", "dead-letters"]) => Endpoint::DeadLetters,
            (&Method::POST, ["v1", "dead-letters", "retry"]) => Endpoint::RetryDeadLetters,
            (&Method::POST, ["v1", "dead-letters", id, "retry"]) => Endpoint::RetryDeadLetter(id),
            (&Method::DELETE, ["v1", "dead-letters", id]) => Endpoint::DropDeadLetter(id),
            (&Method::GET, ["v1", "adapters"]) => Endpoint::Adapters,
            (&Method::POST, ["v1", "adapters", "eval"]) => Endpoint::EvalAdapter,
            (&Method::POST, ["v1", "adapters", name, "fixtures", "run"]) => {
                Endpoint::RunFixtures(name)
            }
            _ => return None,
        })
    }
}

fn not_found(path: &str) -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!(
            "no such admin endpoint {path}: the endpoints are {}",
            ENDPOINTS.join(", ")
        ),
    )
}

fn unknown_event(id: &str) -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "unknown_event",
        format!("no event with id {id:?} was received"),
    )
}

fn journal_problem(e: JournalError) -> Problem {
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "journal_unavailable",
        e.to_string(),
    )
}

fn decode_id(raw: &str) -> Result<String, Problem> {
    percent_decode(raw).ok_or_else(|| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid_id",
            "the event id in the path is not valid percent-encoded UTF-8",
        )
    })
}

async fn blocking<R: Send + 'static>(
    f: impl FnOnce() -> Result<R, JournalError> + Send + 'static,
) -> Result<R, Problem> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
        .map_err(journal_problem)
}

/// The value of `name` in a query string (undecoded; the values used here are plain).
fn query_value<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The number `name` in a query string, `default` when it is absent; a value that is not such a
/// number is refused rather than ignored, so a caller never mistakes a default for an answer.
fn query_number<T: std::str::FromStr>(
    query: &str,
    name: &str,
    default: T,
    what: &str,
) -> Result<T, Problem> {
    match query_value(query, name) {
        None => Ok(default),
        Some(raw) => raw.parse().map_err(|_| {
            Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                format!(
                    "query parameter {name}={:?} is not {what}",
                    percent_decode(raw).unwrap_or_else(|| raw.to_owned())
                ),
            )
        }),
    }
}

/// True when `name` is present as `name`, `name=true` or `name=1`.
fn query_flag(query: &str, name: &str) -> bool {
    query_value(query, name).is_some_and(|v| matches!(v, "" | "true" | "1"))
}

/// Decodes `%XX` escapes; `None` for a malformed escape or invalid UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Serves the admin API until `stop` is cancelled.
/// How many admin connections may be open at once. Probes, scrapers and the CLI need a few;
/// at the limit the connection idle the longest makes room, as on the ingress listener.
pub const MAX_CONNECTIONS: usize = 64;

/// Serves the admin API until `stop` is cancelled. Like the ingress listener, a connection that
/// delivers no complete request head within `header_read_timeout` of its start or of its previous
/// request is closed, and at [`MAX_CONNECTIONS`] the connection idle the longest is closed to make
/// room: silent sockets cannot keep health probes and metrics scrapers out.
pub async fn serve(
    listener: TcpListener,
    admin: Arc<Admin>,
    header_read_timeout: Duration,
    stop: CancellationToken,
) {
    let builder = crate::ingress::http_builder(header_read_timeout);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let connections = Arc::new(Connections::default());
    loop {
        let (stream, peer): (_, SocketAddr) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let permit = match slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                if connections.evict_oldest_idle() {
                    tracing::debug!(peer = %peer, "admin connection limit reached: closing the connection idle the longest");
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    permit = slots.clone().acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => return,
                    },
                }
            }
        };
        let local = match stream.local_addr() {
            Ok(local) => local,
            Err(_) => continue,
        };
        let connection = Arc::new(connections.open());
        let admin = admin.clone();
        let builder = builder.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let busy_on = connection.clone();
            let service = service_fn(move |req| {
                let admin = admin.clone();
                // The head has arrived: the connection is busy until the answer is made.
                let busy = busy_on.request();
                async move {
                    let response = admin.handle(req, local).await;
                    drop(busy);
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                closed = connection.closing(header_read_timeout) => {
                    tracing::debug!(peer = %peer, reason = closed.as_str(), "admin connection closed by the agent");
                }
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use http::Method;

    use std::net::SocketAddr;

    use super::{ENDPOINTS, Endpoint, loopback_host, not_found, percent_decode};

    /// The 404 answer lists exactly the endpoints that are served: every listed one is matched,
    /// and no other method or path of the same shapes is.
    #[test]
    fn the_not_found_answer_lists_every_endpoint() {
        let detail = not_found("/nope").detail;
        let methods = [Method::GET, Method::POST, Method::PUT, Method::DELETE];
        let paths: Vec<String> = ENDPOINTS
            .iter()
            .map(|e| {
                e.split_once(' ')
                    .unwrap()
                    .1
                    .replace("{id}", "evt-1")
                    .replace("{name}", "evt-1")
            })
            .chain(
                [
                    "/",
                    "/healthz",
                    "/readyz",
                    "/metrics",
                    "/v1",
                    "/v1/events",
                    "/v1/events/evt-1",
                    "/v1/events/evt-1/replay",
                    "/v1/dead-letters",
                    "/v1/dead-letters/evt-1",
                    "/v1/dead-letters/evt-1/retry",
                    "/v1/adapters",
                    "/v1/adapters/evt-1",
                    "/v1/adapters/eval",
                    "/v1/adapters/evt-1/fixtures",
                    "/v1/adapters/evt-1/run",
                    "/v1/dead-letters/retry",
                    "/v1/openapi.json",
                    "/v1/events/evt-1/replay/x",
                    "/v1/metrics",
                    "/v1/healthz",
                    "/v1/readyz",
                ]
                .map(String::from),
            )
            .collect();
        for method in &methods {
            for path in &paths {
                // `{id}` and `{name}` stand for any one segment: DELETE /v1/dead-letters/retry drops the
                // dead letter whose id is "retry".
                let listed = ENDPOINTS.iter().any(|e| {
                    let (m, pattern) = e.split_once(' ').unwrap();
                    let segments: Vec<&str> = pattern.split('/').collect();
                    let asked: Vec<&str> = path.split('/').collect();
                    m == method.as_str()
                        && segments.len() == asked.len()
                        && segments
                            .iter()
                            .zip(&asked)
                            .all(|(p, a)| p == a || (p.starts_with('{') && !a.is_empty()))
                });
                assert_eq!(
                    Endpoint::of(method, path).is_some(),
                    listed,
                    "{method} {path}: served and listed in the 404 answer must agree"
                );
            }
        }
        for endpoint in ENDPOINTS {
            assert!(detail.contains(endpoint), "{detail} lacks {endpoint}");
        }
        assert_eq!(
            Endpoint::of(&Method::GET, "/v1/adapters"),
            Some(Endpoint::Adapters)
        );
        assert_eq!(
            Endpoint::of(&Method::GET, "/metrics"),
            Some(Endpoint::Metrics)
        );
    }

    #[test]
    fn only_loopback_hosts_reach_a_loopback_listener() {
        let local: SocketAddr = "127.0.0.1:8788".parse().unwrap();
        for host in [
            "127.0.0.1:8788",
            "127.0.0.1",
            "localhost:8788",
            "LOCALHOST",
            "[::1]:8788",
            "127.1.2.3:9",
        ] {
            assert!(loopback_host(host, local).is_ok(), "{host}");
        }
        for host in [
            "rebound.example:8788",
            "rebound.example",
            "10.0.0.5:8788",
            "localhost.evil.example",
            "[::ffff:10.0.0.5]:8788",
        ] {
            let problem = loopback_host(host, local).unwrap_err();
            assert_eq!(problem.code, "host_not_allowed", "{host}");
        }
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b%2Fc").as_deref(), Some("a b/c"));
        assert_eq!(percent_decode("plain").as_deref(), Some("plain"));
        assert_eq!(percent_decode("bad%2"), None);
        assert_eq!(percent_decode("bad%zz"), None);
        assert_eq!(percent_decode("%ff"), None);
    }
}
