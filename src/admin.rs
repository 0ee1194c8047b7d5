//! The admin listener: liveness, readiness and the event status API.
//!
//! Plain HTTP, loopback by default. `/healthz` and `/readyz` are open (for probes); everything
//! under `/v1/` needs the admin token when one is configured.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::ingress::auth::BearerToken;
use crate::ingress::problem::{Body, Problem, json_response};
use crate::journal::Journal;

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
    pub readiness: Arc<Readiness>,
    pub token: Option<BearerToken>,
}

impl Admin {
    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_owned();
        let response = match self.route(&req, &path).await {
            Ok(response) => response,
            Err(problem) => problem.into_response(),
        };
        tracing::debug!(target: "ess_agent::admin", method = %req.method(), path = %path, status = response.status().as_u16(), "admin request");
        response
    }

    async fn route(&self, req: &Request<Incoming>, path: &str) -> Result<Response<Body>, Problem> {
        match (req.method(), path) {
            (&Method::GET, "/healthz") => {
                Ok(json_response(StatusCode::OK, &json!({"status": "ok"})))
            }
            (&Method::GET, "/readyz") => {
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
            (method, path) if path.starts_with("/v1/") => {
                if let Some(token) = &self.token {
                    token.verify(req.headers()).map_err(|e| {
                        Problem::new(
                            StatusCode::UNAUTHORIZED,
                            e.code(),
                            format!("{e} (the admin token)"),
                        )
                    })?;
                }
                match (method, path.strip_prefix("/v1/events/")) {
                    (&Method::GET, Some(raw_id)) => self.get_event(raw_id).await,
                    _ => Err(not_found(path)),
                }
            }
            _ => Err(not_found(path)),
        }
    }

    async fn get_event(&self, raw_id: &str) -> Result<Response<Body>, Problem> {
        let id = percent_decode(raw_id).ok_or_else(|| {
            Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid_id",
                "the event id in the path is not valid percent-encoded UTF-8",
            )
        })?;
        let journal = self.journal.clone();
        let lookup = id.clone();
        let record = tokio::task::spawn_blocking(move || journal.get(&lookup))
            .await
            .map_err(|e| {
                Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            })?
            .map_err(|e| {
                Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "journal_unavailable",
                    e.to_string(),
                )
            })?;
        match record {
            Some(record) => Ok(json_response(
                StatusCode::OK,
                &serde_json::to_value(record).unwrap_or_default(),
            )),
            None => Err(Problem::new(
                StatusCode::NOT_FOUND,
                "unknown_event",
                format!("no event with id {id:?} was received"),
            )),
        }
    }
}

fn not_found(path: &str) -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no such admin endpoint {path}: see /healthz, /readyz, /v1/events/{{id}}"),
    )
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
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, stop: CancellationToken) {
    let builder = crate::ingress::http_builder(std::time::Duration::from_secs(30));
    loop {
        let (stream, _peer): (_, SocketAddr) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let admin = admin.clone();
        let builder = builder.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, std::convert::Infallible>(admin.handle(req).await) }
            });
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
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
    use super::percent_decode;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b%2Fc").as_deref(), Some("a b/c"));
        assert_eq!(percent_decode("plain").as_deref(), Some("plain"));
        assert_eq!(percent_decode("bad%2"), None);
        assert_eq!(percent_decode("bad%zz"), None);
        assert_eq!(percent_decode("%ff"), None);
    }
}
