//! Metrics (Prometheus text format at the admin listener's `/metrics`) and the systemd
//! notification protocol (`READY=1`, `STATUS=`, `WATCHDOG=1`, `RELOADING=1`, `STOPPING=1`).
//!
//! Metric names, all prefixed `ess_agent_`:
//!
//! | name | type | labels | meaning |
//! |---|---|---|---|
//! | `requests_total` | counter | `status` | ingress answers by HTTP status |
//! | `request_seconds` | histogram | | ingress request, from its headers to its answer (for a 2xx: the commit and its flush included) |
//! | `events_received_total` | counter | `result` (`accepted`, `duplicate`) | deliveries that reached the journal |
//! | `events_final_total` | counter | `state` (`applied`, `filtered`, `superseded`, `failed`, `parked`) | events reaching a final state |
//! | `deliveries_total` | counter | `route`, `sink`, `result` (`applied`, `filtered`, `failed`, `retry`) | route attempts |
//! | `backlog` | gauge | | events not yet final |
//! | `dispatch_queued`, `dispatch_queued_peak` | gauge | | events the dispatcher holds in its subjects' queues now, and the most since the start (bounded however long the backlog) |
//! | `dead_letters` | gauge | | failed and parked events |
//! | `outbox_size` | gauge | | status reports waiting for the hub |
//! | `journal_commit_seconds` | histogram | | one group commit: on SQLite its SQL and the log's write, without the flush; on PostgreSQL `COMMIT` included |
//! | `journal_flush_seconds` | histogram | | the SQLite journal's `fdatasync` of its write-ahead log, which every answer waits for (one flush covers the batches committed while the one before ran) |
//! | `journal_batch_size` | histogram | | operations per commit |
//! | `journal_wal_restart_seconds` | histogram | | the writer's catch-up checkpoint that lets the write-ahead log start over |
//! | `journal_wal_restart_frames_total` | counter | | log frames (pages) those checkpoints of the writer copied: its commits wait meanwhile |
//! | `journal_checkpoint_flush_seconds` | histogram | | the checkpoint thread's flush of the database file before it hands a log restart to the writer (off the commit path) |
//! | `journal_pruned_total` | counter | | final events deleted past `journal.retention_days` |
//! | `adapter_eval_seconds` | histogram | `route` | one adapter evaluation |
//! | `sink_apply_seconds` | histogram | `sink` | one sink apply |
//! | `reloads_total`, `reload_errors_total` | counter | | hot reloads, and those refused |

use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::dispatch::Dispatcher;
use crate::journal::Journal;

/// Installs the process-wide metrics recorder (once) and returns the handle that renders it.
/// The `agent` label every metric carries when several agents share a journal.
static AGENT_LABEL: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Labels every metric with `agent="<id>"` (the journal's agent id), so that the agents sharing
/// a PostgreSQL journal are told apart. Call before [`install`].
pub fn set_agent_label(agent: &str) {
    let _ = AGENT_LABEL.set(agent.to_owned());
}

pub fn install() -> Option<PrometheusHandle> {
    static HANDLE: std::sync::OnceLock<Option<PrometheusHandle>> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let buckets = [
                0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.007_5, 0.01, 0.015, 0.025,
                0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ];
            let batch = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];
            let mut builder = PrometheusBuilder::new();
            if let Some(agent) = AGENT_LABEL.get() {
                builder = builder.add_global_label("agent", agent);
            }
            builder
                .set_buckets(&buckets)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        metrics_exporter_prometheus::Matcher::Full(
                            "ess_agent_journal_batch_size".into(),
                        ),
                        &batch,
                    )
                })
                .and_then(|b| b.install_recorder())
                .map_err(|e| tracing::warn!(error = %e, "metrics are not available"))
                .ok()
        })
        .clone()
}

/// Refreshes the gauges that are read from the dispatcher (at scrape time).
pub fn refresh_dispatcher_gauges(dispatcher: &Dispatcher) {
    let (queued, peak) = dispatcher.queued();
    metrics::gauge!("ess_agent_dispatch_queued").set(queued as f64);
    metrics::gauge!("ess_agent_dispatch_queued_peak").set(peak as f64);
}

/// Refreshes the gauges that are read from the journal (at scrape time). Blocking.
pub fn refresh_gauges(journal: &Journal) {
    metrics::gauge!("ess_agent_backlog").set(journal.backlog() as f64);
    if let Ok(n) = journal.dead_letter_count() {
        metrics::gauge!("ess_agent_dead_letters").set(n as f64);
    }
    if let Ok(n) = journal.outbox_len() {
        metrics::gauge!("ess_agent_outbox_size").set(n as f64);
    }
}

fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::debug!(error = %e, "cannot notify systemd");
    }
}

/// `READY=1` with a status line.
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// While starting takes long: `EXTEND_TIMEOUT_USEC` of a minute from now, with a status line.
pub fn starting(status: &str) {
    notify(&[
        NotifyState::ExtendTimeoutUsec(60_000_000),
        NotifyState::Status(status),
    ]);
}

/// `RELOADING=1` with `MONOTONIC_USEC`, as systemd's `Type=notify-reload` expects.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now]),
        Err(_) => notify(&[NotifyState::Reloading]),
    }
}

/// `STOPPING=1`.
pub fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("shutting down")]);
}

/// The one-line status: backlog, dead letters, pending reports. Blocking.
pub fn status_line(journal: &Journal) -> String {
    format!(
        "backlog {}, dead letters {}, reports pending {}",
        journal.backlog(),
        journal.dead_letter_count().unwrap_or(0),
        journal.outbox_len().unwrap_or(0)
    )
}

/// The watchdog interval systemd asked for: `WATCHDOG_USEC`, when `WATCHDOG_PID` is unset or
/// names this process (as libsystemd's `sd_watchdog_enabled` reads them).
fn watchdog_usec() -> Option<u64> {
    let usec = std::env::var("WATCHDOG_USEC").ok()?.parse::<u64>().ok()?;
    match std::env::var("WATCHDOG_PID") {
        Ok(pid) if pid.parse::<u32>().ok() != Some(std::process::id()) => None,
        _ => (usec > 0).then_some(usec),
    }
}

/// Sends `WATCHDOG=1` at half the interval systemd asked for, but only while the journal
/// writer commits (a no-op transaction must go through) and the dispatcher takes events; a
/// stuck writer stops the pings, so systemd restarts the agent. Also refreshes `STATUS=`.
/// Once `draining` is cancelled (the shutdown began) the dispatcher stops taking events on
/// purpose: that is not a stuck dispatcher.
pub fn spawn_watchdog(
    journal: Arc<Journal>,
    dispatcher: Arc<Dispatcher>,
    draining: CancellationToken,
    stop: CancellationToken,
) {
    let usec = watchdog_usec();
    let enabled = usec.is_some();
    let usec = usec.unwrap_or(0);
    let interval = if enabled {
        Duration::from_micros(usec / 2).max(Duration::from_millis(10))
    } else {
        Duration::from_secs(5)
    };
    tokio::spawn(async move {
        let mut was_healthy = true;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
            let writer_ok = tokio::time::timeout(interval, journal.responds())
                .await
                .unwrap_or(false);
            let healthy = writer_ok && (dispatcher.is_running() || draining.is_cancelled());
            let status = {
                let journal = journal.clone();
                tokio::task::spawn_blocking(move || status_line(&journal))
                    .await
                    .unwrap_or_default()
            };
            if enabled && healthy {
                notify(&[NotifyState::Watchdog, NotifyState::Status(&status)]);
            } else {
                notify(&[NotifyState::Status(&status)]);
            }
            if healthy != was_healthy {
                if healthy {
                    tracing::info!("the journal writer and the dispatcher make progress again");
                } else {
                    tracing::error!(
                        writer_ok,
                        "the journal writer or the dispatcher is stuck: watchdog pings stopped"
                    );
                }
                was_healthy = healthy;
            }
        }
    });
}
