//! Reloading adapters, routes and sinks while the agent runs.
//!
//! A reload is triggered by a save in the adapters directory or of the configuration file (a
//! debounced file watch that also sees editors' rename-over saves), or by SIGHUP. It reads the
//! configuration, compiles every adapter the routes name and builds the sinks (a sink whose
//! settings and secrets did not change is kept as it is; the secret files are read again to
//! tell), and swaps the new routing in only if all of it is good. On any error the running set
//! stays, and the error is logged and shown per adapter at `GET /v1/adapters`. Events being
//! applied finish with the routing they started with.
//!
//! A reload also reads the hub authentication again (`[auth]`: the secret and key files, the
//! bearer token, the timestamp tolerance), so a rotated secret is in force for every request
//! that starts after it; a secret that cannot be read or decoded refuses the whole reload, and
//! the running authentication stays.
//!
//! A reload reads the ingress TLS certificate, key and client CA again too (and a replaced TLS
//! file triggers one); new connections get them, and files that do not build refuse the whole
//! reload, keeping the running certificate.
//!
//! Settings that only take effect at start (listeners, TLS switched on or off, state directory,
//! limits, the journal, the admin API, status reports, the agent id) are compared with what the
//! agent started with; a change is reported as needing a restart and is not half-applied.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::RecursiveMode;
use notify_debouncer_full::{DebounceEventResult, new_debouncer};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::adapter::{Adapter, AdapterError};
use crate::config::{Config, Secrets};
use crate::dispatch::Dispatcher;
use crate::dispatch::routes::Routing;
use crate::ingress::handler::{HubAuth, SharedAuth};
use crate::ingress::tls::{TlsAcceptor, TlsSettings};

/// What `GET /v1/adapters` shows for one adapter file.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AdapterStatus {
    pub file: PathBuf,
    /// The routes that use it.
    pub routes: Vec<String>,
    /// SHA-256 of the version in use.
    pub checksum: Option<String>,
    /// When the version in use was loaded.
    pub loaded_at: Option<String>,
    /// Why the latest version on disk is not in use (with line:col and a caret excerpt).
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
}

/// The result of one reload.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReloadOutcome {
    /// The new routing is in force.
    pub applied: bool,
    /// Why it was not applied.
    pub problems: Vec<String>,
    /// Changed settings that take effect only after a restart.
    pub restart_needed: Vec<String>,
}

/// Reloads on demand; shared behind an `Arc`.
pub struct Reloader {
    config_path: PathBuf,
    /// The configuration the agent started with: restart-only settings are compared with it.
    started: Config,
    /// The configuration whose routing is in force.
    current: Mutex<Config>,
    dispatcher: Arc<Dispatcher>,
    /// The hub authentication the ingress checks, and a digest of the secrets and settings it
    /// was built from (to tell the log whether a reload changed it).
    auth: Option<(Arc<SharedAuth>, Mutex<[u8; 32]>)>,
    /// The ingress TLS acceptor, when the agent serves TLS: a reload reads its certificate,
    /// key and client CA again.
    tls: Option<TlsAcceptor>,
    adapters: Mutex<BTreeMap<PathBuf, AdapterStatus>>,
    reloads: AtomicU64,
    failures: AtomicU64,
}

impl Reloader {
    /// A reloader for the agent started with `config` from `config_path`. `auth`, when given, is
    /// the hub authentication in force, with the secrets it was built from; `tls` the ingress
    /// TLS acceptor.
    pub fn new(
        config_path: PathBuf,
        config: Config,
        dispatcher: Arc<Dispatcher>,
        auth: Option<(Arc<SharedAuth>, &Secrets)>,
        tls: Option<TlsAcceptor>,
    ) -> Arc<Reloader> {
        let auth =
            auth.map(|(shared, secrets)| (shared, Mutex::new(auth_digest(&config, secrets))));
        let reloader = Arc::new(Reloader {
            config_path,
            started: config.clone(),
            current: Mutex::new(config.clone()),
            dispatcher,
            auth,
            tls,
            adapters: Mutex::new(BTreeMap::new()),
            reloads: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        });
        // The routing in force was built at start; record its adapters.
        let routing = reloader.dispatcher.routing();
        let mut statuses = reloader.lock_adapters();
        for route in &routing.routes {
            let status = statuses
                .entry(route.adapter.path.clone())
                .or_insert_with(|| fresh_status(&route.adapter));
            status.routes.push(route.name.clone());
        }
        drop(statuses);
        reloader
    }

    fn lock_adapters(&self) -> std::sync::MutexGuard<'_, BTreeMap<PathBuf, AdapterStatus>> {
        self.adapters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Each adapter's status.
    pub fn adapters(&self) -> Vec<AdapterStatus> {
        self.lock_adapters().values().cloned().collect()
    }

    /// Reloads completed (applied or not) and failed.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.reloads.load(Ordering::Relaxed),
            self.failures.load(Ordering::Relaxed),
        )
    }

    /// The directories to watch: the configuration file's, every adapter's, and those of the
    /// ingress TLS files.
    pub fn watched_dirs(&self) -> BTreeSet<PathBuf> {
        let current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let mut dirs = BTreeSet::new();
        if let Some(dir) = self.config_path.parent() {
            dirs.insert(absolute(dir));
        }
        dirs.insert(absolute(&current.adapters_dir));
        for route in &current.routes {
            if let Some(dir) = route.adapter.parent() {
                dirs.insert(absolute(dir));
            }
        }
        for file in self.tls_files(&current) {
            if let Some(dir) = file.parent() {
                dirs.insert(absolute(dir));
            }
        }
        dirs
    }

    /// The ingress TLS files a reload reads again (none when the agent serves plain HTTP).
    fn tls_files<'a>(&self, config: &'a Config) -> Vec<&'a Path> {
        match (&self.tls, &config.ingress.tls) {
            (Some(_), Some(tls)) => [Some(&tls.cert), Some(&tls.key), tls.client_ca.as_ref()]
                .into_iter()
                .flatten()
                .map(PathBuf::as_path)
                .collect(),
            _ => Vec::new(),
        }
    }

    /// True when a change of `path` can affect the routing or the ingress TLS.
    fn is_relevant(&self, path: &Path) -> bool {
        let current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let path = absolute(path);
        path == absolute(&self.config_path)
            || path.extension().is_some_and(|e| e == "jsonata")
            || current.routes.iter().any(|r| absolute(&r.adapter) == path)
            || self
                .tls_files(&current)
                .into_iter()
                .any(|f| absolute(f) == path)
    }

    /// Reads the configuration and adapters again and swaps them in if all of it is good.
    /// Blocking: reads files and compiles scripts.
    pub fn reload(&self, trigger: &str) -> ReloadOutcome {
        let mut outcome = ReloadOutcome::default();
        self.reloads.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("ess_agent_reloads_total").increment(1);
        let config = match Config::load(&self.config_path) {
            Ok(config) => config,
            Err(e) => {
                outcome.problems = e.problems().iter().map(ToString::to_string).collect();
                self.failures.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("ess_agent_reload_errors_total").increment(1);
                tracing::error!(trigger, problems = ?outcome.problems, "configuration not reloaded: the running configuration stays in force until the file is fixed");
                return outcome;
            }
        };
        outcome.restart_needed = restart_only_changes(&self.started, &config);
        if !outcome.restart_needed.is_empty() {
            tracing::warn!(trigger, settings = ?outcome.restart_needed, "these settings changed but take effect only after a restart: restart the agent to apply them");
        }
        let auth = match self.auth.as_ref().map(|_| build_auth(&config)).transpose() {
            Ok(auth) => auth,
            Err(problems) => {
                outcome.problems = problems;
                self.failures.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("ess_agent_reload_errors_total").increment(1);
                tracing::error!(trigger, problems = ?outcome.problems, "reload refused: the hub authentication cannot be built; the running authentication, adapters, routes and sinks stay in force until the secret is fixed");
                return outcome;
            }
        };
        // TLS switched on or off needs a restart (reported above); otherwise the certificate,
        // key and client CA are read again, and all of them must build.
        let tls = match (&self.tls, &config.ingress.tls) {
            (Some(_), Some(tls)) => match TlsSettings::build(tls) {
                Ok(settings) => Some(settings),
                Err(e) => {
                    outcome.problems = vec![format!("ingress.tls: {e}")];
                    self.failures.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("ess_agent_reload_errors_total").increment(1);
                    tracing::error!(trigger, problems = ?outcome.problems, "reload refused: the ingress TLS certificate, key or client CA cannot be used; the running certificate, authentication, adapters, routes and sinks stay in force until the files are fixed");
                    return outcome;
                }
            },
            _ => None,
        };
        let now = crate::timestamp::now();
        let mut loaded: BTreeMap<PathBuf, Result<Arc<Adapter>, AdapterError>> = BTreeMap::new();
        let previous = self.dispatcher.routing();
        let result = Routing::build_with(&config, Some(&previous), &mut |path| {
            let result = loaded
                .entry(path.to_owned())
                .or_insert_with(|| Adapter::load(path).map(Arc::new));
            result.clone()
        });
        // Record each adapter's result, whether or not the whole set is applied.
        {
            let mut statuses = self.lock_adapters();
            let in_force: BTreeMap<PathBuf, Arc<Adapter>> = previous
                .routes
                .iter()
                .map(|r| (r.adapter.path.clone(), r.adapter.clone()))
                .collect();
            let mut next = BTreeMap::new();
            for route in &config.routes {
                let path = &route.adapter;
                let status = next.entry(path.clone()).or_insert_with(|| {
                    statuses.get(path).cloned().unwrap_or(AdapterStatus {
                        file: path.clone(),
                        routes: Vec::new(),
                        checksum: None,
                        loaded_at: None,
                        last_error: None,
                        last_error_at: None,
                    })
                });
                status
                    .routes
                    .retain(|r| config.routes.iter().any(|c| &c.name == r));
                if !status.routes.contains(&route.name) {
                    status.routes.push(route.name.clone());
                }
                if let Some(Err(e)) = loaded.get(path) {
                    if status.last_error.as_deref() != Some(&e.to_string()) {
                        tracing::error!(adapter = %path.display(), trigger, "adapter not reloaded: the previous version stays in use\n{e}");
                    }
                    status.last_error = Some(e.to_string());
                    status.last_error_at = Some(now.clone());
                    // The version in use is whatever is in force now (if any).
                    if let Some(adapter) = in_force.get(path) {
                        status.checksum = Some(adapter.checksum.clone());
                    }
                }
            }
            if let Err(problems) = &result {
                outcome.problems = problems.iter().map(ToString::to_string).collect();
            } else {
                for (path, status) in next.iter_mut() {
                    if let Some(Ok(adapter)) = loaded.get(path) {
                        if status.checksum.as_deref() != Some(&adapter.checksum) {
                            status.loaded_at = Some(now.clone());
                            tracing::info!(adapter = %path.display(), checksum = %adapter.checksum, trigger, "adapter loaded");
                        }
                        status.checksum = Some(adapter.checksum.clone());
                        status.last_error = None;
                        status.last_error_at = None;
                    }
                }
            }
            *statuses = next;
        }
        match result {
            Ok(routing) => {
                if let (Some((shared, digest)), Some((auth, new_digest))) = (&self.auth, auth) {
                    shared.replace(auth);
                    let mut digest = digest.lock().unwrap_or_else(|p| p.into_inner());
                    if *digest != new_digest {
                        *digest = new_digest;
                        tracing::info!(
                            trigger,
                            "hub authentication reloaded: requests from now on are checked with the secrets, keys and tolerance now configured"
                        );
                    }
                }
                if let (Some(acceptor), Some(settings)) = (&self.tls, tls)
                    && acceptor.replace(settings)
                {
                    tracing::info!(
                        trigger,
                        "ingress TLS reloaded: connections from now on get the certificate, key and client CA now in the files"
                    );
                }
                self.dispatcher.replace_routing(routing);
                self.dispatcher.set_event_log(config.log.events);
                *self.current.lock().unwrap_or_else(|p| p.into_inner()) = config;
                outcome.applied = true;
                tracing::info!(trigger, restart_needed = ?outcome.restart_needed, "reloaded routes, adapters and sinks");
            }
            Err(_) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("ess_agent_reload_errors_total").increment(1);
                tracing::error!(trigger, problems = ?outcome.problems, "reload refused: the running adapters, routes and sinks stay in force");
            }
        }
        outcome
    }

    /// Watches the configuration and adapter directories and reloads after each save, until
    /// `stop` is cancelled.
    pub fn spawn_watcher(self: &Arc<Self>, stop: CancellationToken) -> notify::Result<()> {
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<PathBuf>>();
        let mut debouncer = new_debouncer(
            Duration::from_millis(150),
            None,
            move |result: DebounceEventResult| {
                if let Ok(events) = result {
                    let paths: Vec<PathBuf> = events
                        .into_iter()
                        .filter(|e| !e.kind.is_access())
                        .flat_map(|e| e.event.paths)
                        .collect();
                    if !paths.is_empty() {
                        let _ = tx.send(paths);
                    }
                }
            },
        )?;
        let mut watched = BTreeSet::new();
        for dir in self.watched_dirs() {
            match debouncer.watch(&dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    watched.insert(dir);
                }
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot watch for changes; use SIGHUP to reload")
                }
            }
        }
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let paths = tokio::select! {
                    _ = stop.cancelled() => return,
                    paths = rx.recv() => match paths { Some(p) => p, None => return },
                };
                if !paths.iter().any(|p| this.is_relevant(p)) {
                    continue;
                }
                let reloader = this.clone();
                let _ = tokio::task::spawn_blocking(move || reloader.reload("file change")).await;
                // The set of directories may have changed with the configuration.
                let wanted = this.watched_dirs();
                for dir in wanted.difference(&watched.clone()) {
                    if debouncer.watch(dir, RecursiveMode::NonRecursive).is_ok() {
                        watched.insert(dir.clone());
                    }
                }
            }
        });
        Ok(())
    }
}

/// Reads the hub authentication's secrets and builds it, with the digest of what it was built
/// from; the problems, each naming its key, when a secret cannot be read or decoded.
fn build_auth(config: &Config) -> Result<(HubAuth, [u8; 32]), Vec<String>> {
    let secrets = config
        .load_auth_secrets()
        .map_err(|problems| problems.iter().map(ToString::to_string).collect::<Vec<_>>())?;
    let auth = crate::agent::hub_auth(config, &secrets).map_err(|e| vec![e.to_string()])?;
    Ok((auth, auth_digest(config, &secrets)))
}

/// A SHA-256 digest of everything the hub authentication is built from. It stays in memory and
/// is only compared, so that the log can say when a reload changed the authentication.
fn auth_digest(config: &Config, secrets: &Secrets) -> [u8; 32] {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    let mut add = |part: &[u8]| {
        context.update(&(part.len() as u64).to_be_bytes());
        context.update(part);
    };
    for secret in &secrets.hmac_secrets {
        add(b"hmac");
        add(secret.as_bytes());
    }
    for key in &secrets.ed25519_public_keys {
        add(b"ed25519");
        add(key.as_bytes());
    }
    if let Some(token) = &secrets.bearer_token {
        add(b"bearer");
        add(token.as_bytes());
    }
    add(&config.auth.timestamp_tolerance_secs.to_be_bytes());
    let mut digest = [0u8; 32];
    digest.copy_from_slice(context.finish().as_ref());
    digest
}

fn fresh_status(adapter: &Adapter) -> AdapterStatus {
    AdapterStatus {
        file: adapter.path.clone(),
        routes: Vec::new(),
        checksum: Some(adapter.checksum.clone()),
        loaded_at: Some(crate::timestamp::format_system(adapter.loaded_at)),
        last_error: None,
        last_error_at: None,
    }
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

/// The settings that differ and take effect only at start.
pub fn restart_only_changes(started: &Config, new: &Config) -> Vec<String> {
    let mut changed = Vec::new();
    let mut check = |name: &str, same: bool| {
        if !same {
            changed.push(name.to_string());
        }
    };
    check("agent_id", started.agent_id == new.agent_id);
    check("state_dir", started.state_dir == new.state_dir);
    check(
        "ingress.listen",
        started.ingress.listen == new.ingress.listen,
    );
    // The certificate, key, client CA and allowed client names are reloaded; only switching
    // TLS on or off changes the listener.
    check(
        "ingress.tls (switched on or off)",
        started.ingress.tls.is_some() == new.ingress.tls.is_some(),
    );
    check(
        "ingress (ack mode, plain HTTP option)",
        started.ingress.ack_mode == new.ingress.ack_mode
            && started.ingress.ack_timeout_ms == new.ingress.ack_timeout_ms
            && started.ingress.insecure_allow_plain_http_on_public_address
                == new.ingress.insecure_allow_plain_http_on_public_address,
    );
    check("limits", started.limits == new.limits);
    check("admin", started.admin == new.admin);
    check("journal", started.journal == new.journal);
    check("shutdown", started.shutdown == new.shutdown);
    check("report", started.report == new.report);
    check("dispatch", started.dispatch == new.dispatch);
    changed
}

/// Reloads on every SIGHUP until `stop` is cancelled.
pub fn spawn_sighup(reloader: Arc<Reloader>, stop: CancellationToken) -> std::io::Result<()> {
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                received = hup.recv() => if received.is_none() { return },
            }
            crate::telemetry::reloading();
            let reloader = reloader.clone();
            let _ = tokio::task::spawn_blocking(move || reloader.reload("SIGHUP")).await;
            crate::telemetry::ready("reloaded");
        }
    });
    Ok(())
}
