//! The admin listener: liveness, readiness and the event status API.
//!
//! Plain HTTP, loopback by default. `/healthz`, `/readyz` and `/metrics` are open (for probes
//! and Prometheus); everything under `/v1/` needs the admin token when one is configured.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use hyper::body::{Body as _, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::dispatch::Dispatcher;
use crate::ingress::conn::Connections;
use crate::journal::{DropOutcome, Journal, JournalError, Requeue};
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
}

impl Admin {
    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_owned();
        let mut response = match self.route(&req, &path).await {
            Ok(response) => response,
            Err(problem) => problem.into_response(),
        };
        if req.method() == Method::HEAD {
            // The GET answer's head, with the length of the body it would have had.
            let length = response.body().size_hint().exact().unwrap_or(0);
            *response.body_mut() = Body::default();
            response.headers_mut().insert(
                http::header::CONTENT_LENGTH,
                http::HeaderValue::from(length),
            );
        }
        tracing::debug!(target: "ess_agent::admin", method = %req.method(), path = %path, status = response.status().as_u16(), "admin request");
        response
    }

    async fn route(&self, req: &Request<Incoming>, path: &str) -> Result<Response<Body>, Problem> {
        // HEAD is answered as GET; `handle` leaves the body out.
        let method = if req.method() == Method::HEAD {
            &Method::GET
        } else {
            req.method()
        };
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
        let query = req.uri().query().unwrap_or("");
        match Endpoint::of(method, path)
            .ok_or_else(|| wrong_method_or_not_found(req.method(), path))?
        {
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
            Endpoint::Event(id) => self.get_event(id).await,
            Endpoint::Replay(id) => self.replay(id, query_flag(query, "force")).await,
            Endpoint::DeadLetters => self.dead_letters(query).await,
            Endpoint::Adapters => Ok(json_response(
                StatusCode::OK,
                &json!({"adapters": self.reloader.as_ref().map(|r| r.adapters()).unwrap_or_default()}),
            )),
            Endpoint::RetryDeadLetter(id) => self.replay(id, false).await,
            Endpoint::DropDeadLetter(id) => self.drop_dead_letter(id).await,
        }
    }

    async fn get_event(&self, raw_id: &str) -> Result<Response<Body>, Problem> {
        let id = decode_id(raw_id)?;
        let journal = self.journal.clone();
        let lookup = id.clone();
        let detail = blocking(move || journal.get_detail(&lookup)).await?;
        match detail {
            Some((record, deliveries)) => {
                let mut body = serde_json::to_value(record).unwrap_or_default();
                body["deliveries"] = serde_json::to_value(deliveries).unwrap_or_default();
                Ok(json_response(StatusCode::OK, &body))
            }
            None => Err(unknown_event(&id)),
        }
    }

    async fn replay(&self, raw_id: &str, force: bool) -> Result<Response<Body>, Problem> {
        let id = decode_id(raw_id)?;
        match self
            .journal
            .requeue(&id, force)
            .await
            .map_err(journal_problem)?
        {
            Requeue::Queued { seq, subject } => {
                self.dispatcher.submit(seq, subject);
                tracing::info!(event_id = %id, force, "event requeued by the operator");
                Ok(json_response(
                    StatusCode::ACCEPTED,
                    &json!({"id": id, "status": "requeued", "force": force}),
                ))
            }
            Requeue::NotFound => Err(unknown_event(&id)),
            Requeue::Pending => Err(Problem::new(
                StatusCode::CONFLICT,
                "not_final",
                format!("event {id:?} is still being applied: wait until it is final"),
            )),
            Requeue::NeedsForce { state } => Err(Problem::new(
                StatusCode::CONFLICT,
                "already_applied",
                format!(
                    "event {id:?} is {state}: replaying it applies it again; to do that, replay with force (POST /v1/events/{{id}}/replay?force=true, or ess-agent replay --force)"
                ),
            )),
        }
    }

    async fn dead_letters(&self, query: &str) -> Result<Response<Body>, Problem> {
        let after = query_number(query, "after", 0i64, "a sequence number from next_after")?;
        let limit = query_number(query, "limit", 100u32, "a count from 1 to 1000")?.clamp(1, 1000);
        let journal = self.journal.clone();
        let (items, total) = blocking(move || {
            Ok((
                journal.dead_letters(after, limit)?,
                journal.dead_letter_count()?,
            ))
        })
        .await?;
        let next = (items.len() as u32 == limit)
            .then(|| items.last().map(|d| d.seq))
            .flatten();
        Ok(json_response(
            StatusCode::OK,
            &json!({"items": items, "total": total, "next_after": next}),
        ))
    }

    async fn drop_dead_letter(&self, raw_id: &str) -> Result<Response<Body>, Problem> {
        let id = decode_id(raw_id)?;
        match self
            .journal
            .drop_dead_letter(&id)
            .await
            .map_err(journal_problem)?
        {
            DropOutcome::Dropped => {
                tracing::info!(event_id = %id, "dead letter dropped by the operator");
                Ok(json_response(
                    StatusCode::OK,
                    &json!({"id": id, "status": "dropped"}),
                ))
            }
            DropOutcome::NotFound => Err(unknown_event(&id)),
            DropOutcome::NotDeadLetter(state) => Err(Problem::new(
                StatusCode::CONFLICT,
                "not_a_dead_letter",
                format!(
                    "event {id:?} is {state}, not a dead letter: only failed or parked events can be dropped"
                ),
            )),
        }
    }
}

/// The methods an admin path answers, as an `Allow` header value; `None` for an unknown path.
fn allowed_methods(path: &str) -> Option<&'static str> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match segments.as_slice() {
        ["healthz"] | ["readyz"] | ["metrics"] => Some("GET, HEAD"),
        ["v1", "events", _] | ["v1", "dead-letters"] | ["v1", "adapters"] => Some("GET, HEAD"),
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
    "GET /v1/events/{id}",
    "POST /v1/events/{id}/replay",
    "GET /v1/dead-letters",
    "POST /v1/dead-letters/{id}/retry",
    "DELETE /v1/dead-letters/{id}",
    "GET /v1/adapters",
];

/// An admin endpoint a request is for, with the raw (still percent-encoded) event id it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint<'a> {
    Healthz,
    Readyz,
    Metrics,
    Event(&'a str),
    Replay(&'a str),
    DeadLetters,
    RetryDeadLetter(&'a str),
    DropDeadLetter(&'a str),
    Adapters,
}

impl<'a> Endpoint<'a> {
    /// The endpoint of a method and path; `None` for anything else (404).
    fn of(method: &Method, path: &'a str) -> Option<Self> {
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        Some(match (method, segments.as_slice()) {
            (&Method::GET, ["healthz"]) => Endpoint::Healthz,
            (&Method::GET, ["readyz"]) => Endpoint::Readyz,
            (&Method::GET, ["metrics"]) => Endpoint::Metrics,
            (&Method::GET, ["v1", "events", id]) => Endpoint::Event(id),
            (&Method::POST, ["v1", "events", id, "replay"]) => Endpoint::Replay(id),
            (&Method::GET, ["v1", "dead-letters"]) => Endpoint::DeadLetters,
            (&Method::POST, ["v1", "dead-letters", id, "retry"]) => Endpoint::RetryDeadLetter(id),
            (&Method::DELETE, ["v1", "dead-letters", id]) => Endpoint::DropDeadLetter(id),
            (&Method::GET, ["v1", "adapters"]) => Endpoint::Adapters,
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
                    let response = admin.handle(req).await;
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

    use super::{ENDPOINTS, Endpoint, not_found, percent_decode};

    /// The 404 answer lists exactly the endpoints that are served: every listed one is matched,
    /// and no other method or path of the same shapes is.
    #[test]
    fn the_not_found_answer_lists_every_endpoint() {
        let detail = not_found("/nope").detail;
        let methods = [Method::GET, Method::POST, Method::PUT, Method::DELETE];
        let paths: Vec<String> = ENDPOINTS
            .iter()
            .map(|e| e.split_once(' ').unwrap().1.replace("{id}", "evt-1"))
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
                    "/v1/metrics",
                    "/v1/healthz",
                    "/v1/readyz",
                ]
                .map(String::from),
            )
            .collect();
        for method in &methods {
            for path in &paths {
                let listed = ENDPOINTS
                    .iter()
                    .any(|e| *e == format!("{method} {}", path.replace("evt-1", "{id}")));
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
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b%2Fc").as_deref(), Some("a b/c"));
        assert_eq!(percent_decode("plain").as_deref(), Some("plain"));
        assert_eq!(percent_decode("bad%2"), None);
        assert_eq!(percent_decode("bad%zz"), None);
        assert_eq!(percent_decode("%ff"), None);
    }
}
