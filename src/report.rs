//! Status reports to the hub (PROTOCOL.md §2).
//!
//! When an event reaches its final state, the dispatcher queues a report in the journal's
//! outbox in the same transaction as the state change, so a report is never lost and never
//! sent for a state that was not recorded. This task sends them, oldest first, signed with the
//! agent's own Standard Webhooks secret, and retries each with exponential backoff and full
//! jitter until the hub answers 2xx. Reports left in the outbox are sent after a restart.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, header};
use http_body_util::{BodyExt, Full};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::ReportConfig;
use crate::http_client::{ClientTls, HttpClient, client};
use crate::journal::{Journal, OutboxRow};
use crate::protocol::auth::WebhookSigner;
use crate::settings::RetryConfig;

/// Why the reporter could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("report.secret: {0}")]
    Secret(String),
    #[error("report.ca_file: {0}")]
    Tls(#[from] crate::settings::tls::TlsError),
}

/// Sends the outbox to the hub.
pub struct Reporter {
    journal: Arc<Journal>,
    client: HttpClient,
    url: String,
    signer: WebhookSigner,
    timeout: Duration,
    backoff: RetryConfig,
    wake: Arc<Notify>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Reporter {
    /// Builds the reporter; `secret` is the agent's own `whsec_` secret.
    pub fn new(
        config: &ReportConfig,
        secret: &str,
        journal: Arc<Journal>,
    ) -> Result<Reporter, ReportError> {
        let signer = WebhookSigner::new(secret).map_err(|e| ReportError::Secret(e.to_string()))?;
        let client = client(&ClientTls {
            ca_file: config.ca_file.as_deref(),
            client_cert: None,
        })?;
        Ok(Reporter {
            journal,
            client,
            url: config.url.clone(),
            signer,
            timeout: Duration::from_millis(config.timeout_ms),
            backoff: RetryConfig {
                initial_ms: config.retry_initial_ms,
                max_ms: config.retry_max_ms,
                max_attempts: 0,
                max_age_secs: 0,
            },
            wake: Arc::new(Notify::new()),
        })
    }

    /// Notified when a report is queued.
    pub fn wake(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Sends reports until `stop` is cancelled.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let journal = self.journal.clone();
            let due = tokio::task::spawn_blocking(move || journal.outbox_due(now_ms(), 64))
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            if due.is_empty() {
                let journal = self.journal.clone();
                let next = tokio::task::spawn_blocking(move || journal.outbox_next_due())
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .flatten();
                // Wake for the next due report, a new one, or at the latest after a minute.
                let wait = next
                    .map(|at| Duration::from_millis((at - now_ms()).clamp(0, 60_000) as u64))
                    .unwrap_or(Duration::from_secs(60));
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(wait) => {}
                }
                continue;
            }
            for row in due {
                if stop.is_cancelled() {
                    return;
                }
                self.send_one(row).await;
            }
        }
    }

    async fn send_one(&self, row: OutboxRow) {
        match self.post(&row).await {
            Ok(()) => {
                tracing::info!(event_id = %row.event_id, attempts = row.attempts + 1, "status report delivered to the hub");
                if let Err(e) = self.journal.outbox_done(row.seq).await {
                    tracing::warn!(event_id = %row.event_id, error = %e, "could not remove a delivered report; it may be sent again");
                }
            }
            Err(error) => {
                let attempts = row.attempts.saturating_add(1);
                let delay = self.backoff.delay(attempts, rand::random::<f64>());
                tracing::warn!(event_id = %row.event_id, attempts, retry_in_ms = delay.as_millis() as u64, error = %error, "status report not accepted by the hub; will retry");
                let next = now_ms() + delay.as_millis() as i64;
                if let Err(e) = self
                    .journal
                    .outbox_retry(row.seq, attempts, next, error)
                    .await
                {
                    tracing::warn!(event_id = %row.event_id, error = %e, "could not record a report retry");
                }
            }
        }
    }

    async fn post(&self, row: &OutboxRow) -> Result<(), String> {
        let timestamp = (now_ms() / 1000).max(0);
        let body = row.body.as_bytes();
        let mut request = Request::post(&self.url).header(header::CONTENT_TYPE, "application/json");
        for (name, value) in self.signer.headers(&row.message_id, timestamp, body) {
            request = request.header(name, value);
        }
        let request = request
            .body(Full::new(Bytes::copy_from_slice(body)))
            .map_err(|e| format!("cannot build the report request: {e}"))?;
        let response = tokio::time::timeout(self.timeout, self.client.request(request))
            .await
            .map_err(|_| {
                format!(
                    "the hub did not answer within {} ms",
                    self.timeout.as_millis()
                )
            })?
            .map_err(|e| format!("cannot reach the hub at {}: {e}", self.url))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let body = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let excerpt = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
        Err(format!("the hub answered {status}: {excerpt}"))
    }
}
