//! One delivery, from request to acknowledgement.
//!
//! The order of checks is deliberate: cheap refusals first (path, shutdown, backpressure, bearer
//! token, declared size), then the body is read under its size and time limits, then the
//! signature over the exact bytes, then the envelope. Only an event that passed everything
//! reaches the journal, and only a committed append is answered with 2xx.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::json;

use super::{Client, InFlight};
use crate::config::AckMode;
use crate::journal::{Appended, EventState, Journal, JournalError, NewEvent, Outcome, WireFormat};
use crate::protocol::auth::{BearerToken, Verified, WebhookVerifier};
use crate::protocol::envelope::{self, Envelope, Format};
use crate::protocol::problem::{Body, Problem, json_response};

/// What the handler asks of the part that applies events (the dispatcher, which `agent.rs`
/// hands in): how an event ended, for ack mode `applied`, and dry runs. Ingress knows nothing
/// else of it.
#[async_trait::async_trait]
pub trait Applier: Send + Sync {
    /// A receiver of the outcome of event `id`, registered before the event is appended so that
    /// the outcome cannot slip past.
    fn wait_for(&self, id: &str) -> tokio::sync::oneshot::Receiver<Outcome>;
    /// Drops the waiters for `id` that nobody listens to any more.
    fn forget(&self, id: &str);
    /// Routes an event and runs its adapters without applying anything: one JSON object per
    /// matching route (`route`, `sink`, and `output`, `filtered` or `error`).
    async fn dry_run(
        &self,
        document: serde_json::Value,
        event_type: &str,
        version: u64,
    ) -> Vec<serde_json::Value>;
}

/// Hub authentication: every configured check must pass.
#[derive(Default)]
pub struct HubAuth {
    pub webhook: Option<WebhookVerifier>,
    pub bearer: Option<BearerToken>,
}

/// The hub authentication in force. A reload swaps it whole; a request keeps the one it
/// started with.
#[derive(Default)]
pub struct SharedAuth(RwLock<Arc<HubAuth>>);

impl SharedAuth {
    pub fn new(auth: HubAuth) -> Self {
        Self(RwLock::new(Arc::new(auth)))
    }

    /// The authentication in force now.
    pub fn current(&self) -> Arc<HubAuth> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Puts `auth` in force for the requests that start from now on.
    pub fn replace(&self, auth: HubAuth) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(auth);
    }
}

/// The limits the handler enforces.
#[derive(Debug, Clone)]
pub struct HandlerLimits {
    pub max_body_bytes: u64,
    pub body_read_timeout: Duration,
    pub backlog_high_water: u64,
    pub retry_after_secs: u64,
    pub max_json_depth: usize,
}

/// Everything a request needs, shared by all connections.
pub struct Handler {
    pub journal: Arc<Journal>,
    pub dispatcher: Arc<dyn Applier>,
    /// When the hub gets its answer.
    pub ack_mode: AckMode,
    /// With [`AckMode::Applied`]: how long to wait for the sinks.
    pub ack_timeout: Duration,
    pub auth: Arc<SharedAuth>,
    pub limits: HandlerLimits,
    /// Set when shutdown begins: new deliveries are refused with 503.
    pub shutting_down: Arc<AtomicBool>,
    pub in_flight: InFlight,
}

/// What the access log line says about the event, filled in as the request is understood.
#[derive(Default)]
struct Seen {
    id: Option<String>,
    event_type: Option<String>,
}

impl Handler {
    /// Handles one request and writes its access log line.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        client: &Client,
    ) -> Response<Body> {
        let peer = client.peer;
        let start = Instant::now();
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let version = req.version();
        let _guard = self.in_flight.enter(peer, &path);
        let mut seen = Seen::default();
        let response = match self.deliver(req, client, &mut seen).await {
            Ok(response) => response,
            Err(problem) => problem.into_response(),
        };
        let latency = start.elapsed();
        metrics::counter!("ess_agent_requests_total", "status" => response.status().as_u16().to_string())
            .increment(1);
        metrics::histogram!("ess_agent_request_seconds").record(latency.as_secs_f64());
        // An accepted delivery's line is at debug level: the event's one info line is the
        // dispatcher's `event final`. A refused request is logged at info, since nothing else
        // records it.
        macro_rules! access_line {
            ($level:expr) => {
                tracing::event!(
                    target: "ess_agent::access",
                    $level,
                    peer = %peer,
                    method = %method,
                    path = %path,
                    http = ?version,
                    status = response.status().as_u16(),
                    latency_us = latency.as_micros() as u64,
                    event_id = seen.id.as_deref(),
                    event_type = seen.event_type.as_deref(),
                    "request"
                )
            };
        }
        if response.status().is_success() {
            access_line!(tracing::Level::DEBUG);
        } else {
            access_line!(tracing::Level::INFO);
        }
        response
    }

    async fn deliver(
        &self,
        req: Request<Incoming>,
        client: &Client,
        seen: &mut Seen,
    ) -> Result<Response<Body>, Problem> {
        if req.uri().path() != "/v1/events" {
            return Err(Problem::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!(
                    "no such endpoint {}: deliver events with POST /v1/events",
                    req.uri().path()
                ),
            ));
        }
        if req.method() != Method::POST {
            return Err(Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!(
                    "{} is not allowed here: deliver events with POST /v1/events",
                    req.method()
                ),
            )
            .with_allow("POST"));
        }
        let dry_run = is_dry_run(req.headers());
        if !dry_run {
            self.check_backpressure()?;
        }
        let auth = self.auth.current();
        if let Some(bearer) = &auth.bearer {
            bearer
                .verify(req.headers())
                .map_err(|e| Problem::new(StatusCode::UNAUTHORIZED, e.code(), e.to_string()))?;
        }
        let (parts, body) = req.into_parts();
        let body = self.read_body(&parts.headers, body).await?;
        let verified = match &auth.webhook {
            Some(webhook) => Some(
                webhook
                    .verify_delivery(&parts.headers, &body, SystemTime::now())
                    .map_err(|e| Problem::new(StatusCode::UNAUTHORIZED, e.code(), e.to_string()))?,
            ),
            None => None,
        };
        let max_depth = self.limits.max_json_depth;
        let envelope = envelope::parse_limited(&parts.headers, &body, max_depth)
            .map_err(|e| Problem::new(e.status(), e.code(), e.to_string()).with_field(e.field()))?;
        seen.id = Some(envelope.id.clone());
        seen.event_type = Some(envelope.event_type.clone());
        if dry_run {
            let outputs = self
                .dispatcher
                .dry_run(
                    serde_json::Value::Object(envelope.document.clone()),
                    &envelope.event_type,
                    envelope.version,
                )
                .await;
            let mut body = json!({"ack": envelope.id, "status": "dry_run", "outputs": outputs});
            if outputs_empty(&body) {
                body["note"] = json!(format!(
                    "no route matches type {:?} version {}: the event would be parked",
                    envelope.event_type, envelope.version
                ));
            }
            return Ok(json_response(StatusCode::OK, &body));
        }
        let content_type = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let id = envelope.id.clone();
        // Register before the append, so the outcome cannot slip past between the two.
        let waiter = (self.ack_mode == AckMode::Applied).then(|| self.dispatcher.wait_for(&id));
        let mut event = new_event(envelope, content_type, body);
        event.receipt = Some(receipt(verified.as_ref(), auth.bearer.is_some(), client));
        let appended = self.journal.append(event).await;
        match &appended {
            Ok(Appended::Accepted) => {
                metrics::counter!("ess_agent_events_received_total", "result" => "accepted")
                    .increment(1)
            }
            Ok(Appended::Duplicate(_)) => {
                metrics::counter!("ess_agent_events_received_total", "result" => "duplicate")
                    .increment(1)
            }
            Err(_) => {}
        }
        let response = match (appended, waiter) {
            (Ok(Appended::Accepted), Some(waiter)) => {
                match tokio::time::timeout(self.ack_timeout, self.outcome(&id, waiter)).await {
                    Ok(Some(outcome)) => Ok(applied_response(&id, outcome.state, outcome.error)),
                    _ => Ok(json_response(
                        StatusCode::ACCEPTED,
                        &json!({"ack": id, "status": "accepted"}),
                    )),
                }
            }
            (Ok(Appended::Accepted), None) => Ok(json_response(
                StatusCode::ACCEPTED,
                &json!({"ack": id, "status": "accepted"}),
            )),
            (Ok(Appended::Duplicate(record)), _) => Ok(json_response(
                StatusCode::OK,
                &json!({
                    "ack": id,
                    "status": "duplicate",
                    "state": record.state,
                    "received_at": record.received_at,
                }),
            )),
            (Err(e), _) => Err(journal_problem(&e, self.limits.retry_after_secs)),
        };
        if self.ack_mode == AckMode::Applied {
            self.dispatcher.forget(&id);
        }
        response
    }

    /// How the event ends, for ack mode `applied`: told by this agent's dispatcher, or, on the
    /// shared PostgreSQL journal, where another agent may apply it, read back from the journal
    /// every [`SHARED_OUTCOME_POLL`] as well. `None` if the dispatcher stopped first.
    async fn outcome(
        &self,
        id: &str,
        waiter: tokio::sync::oneshot::Receiver<Outcome>,
    ) -> Option<Outcome> {
        if self.journal.postgres().is_none() {
            return waiter.await.ok();
        }
        tokio::pin!(waiter);
        let mut poll = tokio::time::interval(SHARED_OUTCOME_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                outcome = &mut waiter => return outcome.ok(),
                _ = poll.tick() => {
                    let journal = self.journal.clone();
                    let lookup = id.to_owned();
                    let record = tokio::task::spawn_blocking(move || journal.get(&lookup)).await;
                    if let Ok(Ok(Some(record))) = record
                        && record.state.is_final()
                    {
                        return Some(Outcome {
                            state: record.state,
                            error: record.error,
                        });
                    }
                }
            }
        }
    }

    fn check_backpressure(&self) -> Result<(), Problem> {
        let retry = self.limits.retry_after_secs;
        if self.shutting_down.load(Ordering::Relaxed) {
            return Err(Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "the agent is shutting down: deliver again after it restarts",
            )
            .with_retry_after(retry));
        }
        let backlog = self.journal.backlog();
        if backlog >= self.limits.backlog_high_water {
            return Err(Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "backlog_full",
                format!(
                    "{backlog} events are waiting to be applied (high-water mark {}): deliver again later",
                    self.limits.backlog_high_water
                ),
            )
            .with_retry_after(retry));
        }
        if self.journal.low_disk() {
            return Err(Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "disk_low",
                "the agent's disk is nearly full: deliver again once the operator has freed space",
            )
            .with_retry_after(retry));
        }
        Ok(())
    }

    /// Reads the body, refusing it as soon as it exceeds the limit or the time runs out.
    async fn read_body(&self, headers: &HeaderMap, body: Incoming) -> Result<Bytes, Problem> {
        let max = self.limits.max_body_bytes;
        let too_large = || {
            Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!(
                    "the body exceeds the limit of {max} bytes: send a smaller event or ask the operator to raise limits.max_body_bytes"
                ),
            )
        };
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > max) {
            return Err(too_large());
        }
        let limited = Limited::new(body, usize::try_from(max).unwrap_or(usize::MAX));
        match tokio::time::timeout(self.limits.body_read_timeout, limited.collect()).await {
            Ok(Ok(collected)) => Ok(collected.to_bytes()),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
            Ok(Err(e)) => Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "body_read_error",
                format!("the request body could not be read: {e}"),
            )),
            Err(_) => Err(Problem::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                "the request body did not arrive within the time limit: send it faster",
            )),
        }
    }
}

fn outputs_empty(body: &serde_json::Value) -> bool {
    body["outputs"].as_array().is_some_and(Vec::is_empty)
}

/// The answer in ack mode `applied` once the event is final.
fn applied_response(id: &str, final_state: EventState, error: Option<String>) -> Response<Body> {
    let status = final_state.status_word().unwrap_or("failed");
    let mut body = json!({"ack": id, "status": status});
    if status == "failed" {
        body["error"] = json!(error);
    }
    json_response(StatusCode::OK, &body)
}

fn is_dry_run(headers: &HeaderMap) -> bool {
    headers
        .get("x-hms-test")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

/// The journal's record of a parsed delivery: the envelope serialised, beside the exact body.
pub fn new_event(envelope: Envelope, content_type: Option<String>, raw_body: Bytes) -> NewEvent {
    let document = serde_json::Value::Object(envelope.document);
    NewEvent {
        envelope: document.to_string(),
        id: envelope.id,
        event_type: envelope.event_type,
        version: envelope.version,
        subject: envelope.subject,
        revision: envelope.revision,
        source: envelope.source,
        time: envelope.time,
        format: match envelope.format {
            Format::ChangeEvent => WireFormat::ChangeEvent,
            Format::CloudEventStructured => WireFormat::CloudeventsStructured,
            Format::CloudEventBinary => WireFormat::CloudeventsBinary,
        },
        content_type,
        raw_body,
        receipt: None,
    }
}

/// The journal's record of how a delivery was authenticated (JSON): the methods that passed
/// (`standard_webhooks`, `bearer`, `mtls`; none on a loopback listener with no check), the
/// Standard Webhooks id and timestamp with the signature versions listed and the one that
/// verified, and the client certificate's subject. Never a token, a key or a signature.
fn receipt(verified: Option<&Verified>, bearer: bool, client: &Client) -> String {
    let mut methods = Vec::new();
    let mut receipt = serde_json::Map::new();
    if let Some(v) = verified {
        methods.push("standard_webhooks");
        let time = time::OffsetDateTime::from_unix_timestamp(v.timestamp)
            .map(crate::timestamp::format)
            .ok();
        receipt.insert(
            "webhook".into(),
            json!({
                "id": v.id.chars().take(256).collect::<String>(),
                "timestamp": v.timestamp,
                "time": time,
                "signature_versions": v.versions,
                "verified_by": v.verified_by,
                "header_names": if v.svix_names { "svix" } else { "webhook" },
            }),
        );
    }
    if bearer {
        methods.push("bearer");
    }
    if let Some(subject) = &client.subject {
        methods.push("mtls");
        receipt.insert(
            "client_certificate".into(),
            json!({ "subject": &**subject }),
        );
    }
    receipt.insert("methods".into(), json!(methods));
    serde_json::Value::Object(receipt).to_string()
}

/// How often a delivery waiting in ack mode `applied` on the shared journal reads the event's
/// state back.
const SHARED_OUTCOME_POLL: std::time::Duration = std::time::Duration::from_millis(100);

fn journal_problem(e: &JournalError, retry_after: u64) -> Problem {
    let (code, detail) = match e {
        JournalError::Full => (
            "journal_full",
            "the agent's disk is full and the event was not stored: deliver again later".to_string(),
        ),
        JournalError::Closed => (
            "shutting_down",
            "the agent is shutting down and the event was not stored: deliver again after it restarts".to_string(),
        ),
        other => (
            "journal_unavailable",
            format!("the event could not be stored ({other}): deliver again later"),
        ),
    };
    Problem::new(StatusCode::SERVICE_UNAVAILABLE, code, detail).with_retry_after(retry_after)
}
