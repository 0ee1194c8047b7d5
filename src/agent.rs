//! Assembles the running agent from a validated configuration and runs it until shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, Admin, Readiness};
use crate::config::{Config, JournalBackend, Secrets};
use crate::dispatch::Dispatcher;
use crate::dispatch::routes::Routing;
use crate::ingress::handler::{Applier, HandlerLimits, HubAuth, SharedAuth};
use crate::ingress::tls::TlsAcceptor;
use crate::ingress::{self, Handler, InFlight, ServerSettings};
use crate::journal::pg::{PgJournalOptions, PgOptions};
use crate::journal::{Journal, JournalError, JournalOptions, Outcome};
use crate::protocol::auth::{BearerToken, KeyError, WebhookVerifier};
use crate::reload::Reloader;
use crate::report::{ReportError, Reporter};
use crate::settings::Problem;
use crate::settings::tls::TlsError;

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{key}: {source}")]
    Key {
        key: &'static str,
        #[source]
        source: KeyError,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("journal.ca_file: cannot read {}: {source}", .path.display())]
    JournalCa {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("{} problem(s) with routes, adapters or sinks:\n{}", .0.len(), .0.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
    Routing(Vec<Problem>),
    #[error(transparent)]
    Report(#[from] ReportError),
    #[error("cannot listen on {addr} ({what}): {source}: is another process using the port?")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Builds the hub authentication from the secrets.
pub fn hub_auth(config: &Config, secrets: &Secrets) -> Result<HubAuth, StartError> {
    let webhook = if secrets.hmac_secrets.is_empty() && secrets.ed25519_public_keys.is_empty() {
        None
    } else {
        Some(
            WebhookVerifier::new(
                &secrets.hmac_secrets,
                &secrets.ed25519_public_keys,
                Duration::from_secs(config.auth.timestamp_tolerance_secs),
            )
            .map_err(|source| StartError::Key {
                key: "auth.hmac_secrets / auth.ed25519_public_keys",
                source,
            })?,
        )
    };
    let bearer = secrets
        .bearer_token
        .as_deref()
        .map(BearerToken::new)
        .transpose()
        .map_err(|source| StartError::Key {
            key: "auth.bearer_token",
            source,
        })?;
    Ok(HubAuth { webhook, bearer })
}

/// The dispatcher as the ingress handler sees it.
#[async_trait::async_trait]
impl Applier for Dispatcher {
    fn wait_for(&self, id: &str) -> tokio::sync::oneshot::Receiver<Outcome> {
        Dispatcher::wait_for(self, id)
    }

    fn forget(&self, id: &str) {
        Dispatcher::forget(self, id)
    }

    async fn dry_run(
        &self,
        document: serde_json::Value,
        event_type: &str,
        version: u64,
    ) -> Vec<serde_json::Value> {
        Dispatcher::dry_run(self, document, event_type, version)
            .await
            .iter()
            .map(|output| serde_json::to_value(output).unwrap_or_default())
            .collect()
    }
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { what, addr, source })
}

/// The PostgreSQL journal's settings from the configuration.
pub(crate) fn postgres_options(
    config: &Config,
    secrets: &Secrets,
) -> Result<PgJournalOptions, StartError> {
    let journal = &config.journal;
    let ca_pem = journal
        .ca_file
        .as_ref()
        .map(|path| {
            std::fs::read(path).map_err(|source| StartError::JournalCa {
                path: path.clone(),
                source,
            })
        })
        .transpose()?;
    Ok(PgJournalOptions {
        pg: PgOptions {
            url: journal.url.clone().unwrap_or_default(),
            schema: journal.schema.clone(),
            max_connections: journal.pool_size,
            partitions: journal.partitions,
            lease: Duration::from_secs_f64(journal.lease_seconds),
            max_batch: journal.max_batch,
            password: secrets.journal_password.clone(),
            tls: journal.tls,
            ca_pem,
            ..PgOptions::default()
        },
        agent: crate::journal::pg::agent_id(),
        retention: journal.retention(),
    })
}

/// Runs the agent until `stop` is cancelled, then drains and closes the journal.
pub async fn run(
    config_path: &std::path::Path,
    config: Config,
    secrets: Secrets,
    stop: CancellationToken,
) -> Result<(), StartError> {
    let readiness = Arc::new(Readiness::default());
    readiness.not_ready("journal", "opening");
    readiness.not_ready("ingress", "not listening yet");

    let auth = Arc::new(SharedAuth::new(hub_auth(&config, &secrets)?));
    let admin_token = secrets
        .admin_token
        .as_deref()
        .map(BearerToken::new)
        .transpose()
        .map_err(|source| StartError::Key {
            key: "admin.token",
            source,
        })?;
    let tls = config
        .ingress
        .tls
        .as_ref()
        .map(TlsAcceptor::new)
        .transpose()?;
    let routing = Routing::build(&config, None).map_err(StartError::Routing)?;

    let options = JournalOptions {
        max_batch: config.journal.max_batch,
        finish_linger: Duration::from_millis(config.journal.finish_linger_ms),
        checkpoint_interval: Duration::from_millis(config.journal.checkpoint_interval_ms),
        wal_restart_bytes: config.journal.wal_restart_mib.saturating_mul(1 << 20),
        min_free_disk_bytes: config.limits.min_free_disk_bytes,
        retention: config.journal.retention(),
        ..JournalOptions::default()
    };
    let state_dir = config.state_dir.clone();
    // Opening reads the whole file once (the quick check), and a migration of the schema
    // rewrites the events table; on a large journal either takes a while. systemd is asked for
    // more time meanwhile, so that it does not kill a long migration (which would start over
    // from the old schema on every restart).
    let more_time = tokio::spawn(async {
        let mut every = tokio::time::interval(Duration::from_secs(20));
        every.tick().await;
        loop {
            every.tick().await;
            crate::telemetry::starting("opening the journal (checking it or migrating its schema)");
        }
    });
    let journal = match config.journal.backend {
        JournalBackend::Sqlite => {
            let journal =
                tokio::task::spawn_blocking(move || Journal::open(&state_dir, options)).await;
            journal.map_err(|e| {
                StartError::Journal(JournalError::StateDir {
                    path: config.state_dir.clone(),
                    source: std::io::Error::other(e.to_string()),
                })
            })?
        }
        JournalBackend::Postgres => {
            let options = postgres_options(&config, &secrets)?;
            crate::telemetry::set_agent_label(&options.agent);
            Journal::open_postgres(options, &stop).await
        }
    };
    more_time.abort();
    let journal = journal?;
    readiness.ready("journal");

    let reporter = match (&config.report, &secrets.report_secret) {
        (Some(report), Some(secret)) => {
            Some(Arc::new(Reporter::new(report, secret, journal.clone())?))
        }
        _ => None,
    };
    let routing_sinks: Vec<_> = routing.sinks.values().map(|b| b.sink.clone()).collect();
    let dispatcher = Dispatcher::new(
        journal.clone(),
        config.agent_id.clone(),
        routing,
        config.dispatch.max_parallel,
        reporter.as_ref().map(|r| r.wake()),
    );
    dispatcher.set_event_log(config.log.events);
    // Sinks clean up after an interrupted run in the background; their first apply waits for it.
    for built in routing_sinks {
        tokio::spawn(async move { built.start().await });
    }
    dispatcher.start().await?;
    let reloader = Reloader::new(
        config_path.to_owned(),
        config.clone(),
        dispatcher.clone(),
        Some((auth.clone(), &secrets)),
        tls.clone(),
    );
    let background = CancellationToken::new();
    if let Some(reporter) = &reporter {
        tokio::spawn(reporter.clone().run(background.clone()));
    }
    if let Err(e) = reloader.spawn_watcher(background.clone()) {
        tracing::warn!(error = %e, "cannot watch adapters for changes; reload with SIGHUP");
    }
    if let Err(e) = crate::reload::spawn_sighup(reloader.clone(), background.clone()) {
        tracing::warn!(error = %e, "cannot install the SIGHUP handler");
    }

    let ingress_listener = bind("ingress", config.ingress.listen).await?;
    let ingress_addr = ingress_listener.local_addr().ok();
    let admin_listener = if config.admin.enabled {
        Some(bind("admin", config.admin.listen).await?)
    } else {
        None
    };
    let admin_addr = admin_listener.as_ref().and_then(|l| l.local_addr().ok());

    if let Some(listener) = admin_listener {
        admin::console::init(config_path);
        let admin = Arc::new(Admin {
            journal: journal.clone(),
            dispatcher: dispatcher.clone(),
            reloader: Some(reloader.clone()),
            metrics: crate::telemetry::install(),
            readiness: readiness.clone(),
            token: admin_token,
            partner: config.agent_id.clone(),
        });
        // Up until the drain ends, so that probes see `/readyz` say "shutting down" and
        // `/metrics` stays readable while in-flight work finishes.
        tokio::spawn(admin::serve(
            listener,
            admin,
            config.header_read_timeout(),
            background.clone(),
        ));
    }

    let shutting_down = Arc::new(AtomicBool::new(false));
    let in_flight = InFlight::default();
    let handler = Arc::new(Handler {
        journal: journal.clone(),
        dispatcher: dispatcher.clone(),
        ack_mode: config.ingress.ack_mode,
        ack_timeout: Duration::from_millis(config.ingress.ack_timeout_ms),
        auth,
        limits: HandlerLimits {
            max_body_bytes: config.limits.max_body_bytes,
            body_read_timeout: config.body_read_timeout(),
            backlog_high_water: config.limits.backlog_high_water,
            retry_after_secs: config.limits.retry_after_secs,
            max_json_depth: config.limits.max_json_depth,
        },
        shutting_down: shutting_down.clone(),
        in_flight: in_flight.clone(),
    });
    let settings = ServerSettings {
        max_connections: config.limits.max_connections,
        header_read_timeout: config.header_read_timeout(),
    };
    readiness.ready("ingress");
    tracing::info!(
        agent_id = %config.agent_id,
        ingress = %fmt_addr(ingress_addr),
        tls = config.ingress.tls.is_some(),
        mutual_tls = config.ingress.tls.as_ref().is_some_and(|t| t.client_ca.is_some()),
        admin = %fmt_addr(admin_addr),
        journal = %journal.location(),
        backlog = journal.backlog(),
        "ready"
    );

    crate::telemetry::ready(&{
        let journal = journal.clone();
        tokio::task::spawn_blocking(move || crate::telemetry::status_line(&journal))
            .await
            .unwrap_or_default()
    });
    crate::telemetry::spawn_watchdog(
        journal.clone(),
        dispatcher.clone(),
        stop.clone(),
        background.clone(),
    );
    if journal.postgres().is_some() {
        spawn_journal_health(journal.clone(), readiness.clone(), background.clone());
    }
    spawn_sink_health(
        dispatcher.clone(),
        readiness.clone(),
        Duration::from_millis(config.dispatch.healthcheck_interval_ms),
        background.clone(),
    );
    let graceful = ingress::serve(ingress_listener, tls, handler, settings, stop.clone()).await;
    shutting_down.store(true, Ordering::Relaxed);
    crate::telemetry::stopping();
    readiness.not_ready("shutdown", "shutting down");

    let grace = Duration::from_secs(config.shutdown.grace_period_secs);
    let deadline = tokio::time::Instant::now() + grace;
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_period_secs = config.shutdown.grace_period_secs,
            still_running = ?in_flight.describe(),
            "grace period over: closing the connections that are still open; their events were not acknowledged"
        );
    }
    dispatcher
        .shutdown(deadline.saturating_duration_since(tokio::time::Instant::now()))
        .await;
    background.cancel();
    let closing = journal.clone();
    let _ = tokio::task::spawn_blocking(move || closing.close()).await;
    tracing::info!("stopped: the journal is closed");
    Ok(())
}

/// Reflects in readiness whether the shared journal's PostgreSQL can be reached (checked by the
/// journal once a second): while it cannot, every event is refused with 503, and a load
/// balancer following `/readyz` should know.
fn spawn_journal_health(journal: Arc<Journal>, readiness: Arc<Readiness>, stop: CancellationToken) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            match journal.unavailable() {
                Some(why) => readiness.not_ready("journal", why),
                None => readiness.ready("journal"),
            }
        }
    });
}

/// Runs every sink's healthcheck periodically and reflects the result in readiness.
fn spawn_sink_health(
    dispatcher: Arc<Dispatcher>,
    readiness: Arc<Readiness>,
    interval: Duration,
    stop: CancellationToken,
) {
    tokio::spawn(async move {
        loop {
            let routing = dispatcher.routing();
            for (name, built) in &routing.sinks {
                let key = format!("sink {name}");
                match tokio::time::timeout(
                    interval.max(Duration::from_secs(1)),
                    built.sink.healthcheck(),
                )
                .await
                {
                    Ok(Ok(())) => {
                        if readiness.reasons().contains_key(&key) {
                            tracing::info!(sink = %name, "sink is healthy again");
                        }
                        readiness.ready(&key);
                    }
                    Ok(Err(e)) => {
                        if !readiness.reasons().contains_key(&key) {
                            tracing::warn!(sink = %name, error = %e, "sink healthcheck failed: not ready");
                        }
                        readiness.not_ready(&key, e.to_string());
                    }
                    Err(_) => readiness.not_ready(&key, "the healthcheck timed out".to_string()),
                }
            }
            // Sinks removed by a reload no longer count.
            readiness.retain(|k| {
                k.strip_prefix("sink ")
                    .is_none_or(|name| routing.sinks.contains_key(name))
            });
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    });
}

fn fmt_addr(addr: Option<SocketAddr>) -> String {
    addr.map(|a| a.to_string()).unwrap_or_else(|| "off".into())
}
