//! The TOML configuration.
//!
//! Loading happens in three steps; `ess-agent validate` (and `run`, before it starts) goes
//! through all three and reports what each finds:
//! 1. [`Config::parse_parts`] turns the text into typed structs (`deny_unknown_fields`
//!    everywhere, so a misspelt key is an error that names its key path), one part at a time so
//!    that a mistake in one part does not hide those in the others;
//! 2. [`Config::validate`] is pure and lists every semantic problem with its key path;
//! 3. [`Config::load_secrets`] reads the secret files and environment variables the config names.
//!
//! Relative paths are resolved against the directory of the configuration file, so a config works
//! the same whatever the working directory of the process is.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::settings::{Problem, SecretSource, TlsConfig, VersionRange, read_secret};
use crate::sink::SinkConfig;

/// Where the configuration is read from when `--config` is not given and `ESS_AGENT_CONFIG` is unset.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/ess-agent/ess-agent.toml";

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Identifies this agent (the partner) to the hub. Required.
    pub agent_id: String,
    /// Directory that holds the journal. Created if absent. Default: `/var/lib/ess-agent`.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// The listener the hub delivers events to.
    #[serde(default)]
    pub ingress: IngressConfig,
    /// How the hub is authenticated. At least one method is required unless the ingress listener
    /// is on a loopback address.
    #[serde(default)]
    pub auth: AuthConfig,
    /// Request, backlog and disk limits.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// The admin listener: health, readiness, event status.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Journal tuning.
    #[serde(default)]
    pub journal: JournalConfig,
    /// Graceful shutdown.
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    /// Directory holding the JSONata adapter scripts that routes name. Default:
    /// `/etc/ess-agent/adapters`.
    #[serde(default = "default_adapters_dir")]
    pub adapters_dir: PathBuf,
    /// Routes: which events go through which adapter to which sink. An event may match several
    /// routes; it is applied through each. An event that matches none is parked as a dead letter
    /// ("no route") and can be replayed once a route exists. Default: none.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Sinks by name, referenced by routes. Default: none.
    #[serde(default)]
    pub sinks: BTreeMap<String, SinkConfig>,
    /// Status reports to the hub (PROTOCOL.md §2). Default: off.
    #[serde(default)]
    pub report: Option<ReportConfig>,
    /// The dispatcher that applies journaled events.
    #[serde(default)]
    pub dispatch: DispatchConfig,
    /// What the log says about each event.
    #[serde(default)]
    pub log: LogConfig,
}

fn default_adapters_dir() -> PathBuf {
    PathBuf::from("/etc/ess-agent/adapters")
}

/// One route: events whose type and version match go through `adapter` to `sink`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// A unique name; delivery state is kept per event and route name. Required.
    pub name: String,
    /// Event types this route takes: exact names or globs (`*` any run of characters, `?` one
    /// character), e.g. `["rule.updated", "court.*"]`. Default: `["*"]` (every type).
    #[serde(default = "default_types")]
    pub types: Vec<String>,
    /// Schema versions this route takes: `"*"` (any), `"3"` (exactly 3), `"1-2"` (1 to 2),
    /// `"2-"` (2 or later), `"-2"` (up to 2). Default: `"*"`.
    #[serde(default = "default_versions")]
    pub versions: String,
    /// The JSONata script, relative to `adapters_dir` (or absolute). Required.
    pub adapter: PathBuf,
    /// The name of the sink (a key of `[sinks]`). Required.
    pub sink: String,
    /// Time limit of one adapter evaluation, in milliseconds. Default: 100.
    #[serde(default)]
    pub time_limit_ms: Option<u64>,
    /// Depth limit of one adapter evaluation. Default: 500.
    #[serde(default)]
    pub max_depth: Option<usize>,
    /// Largest adapter output, as compact JSON, in bytes. Default: 10485760 (10 MiB).
    #[serde(default)]
    pub max_output_bytes: Option<usize>,
}

fn default_types() -> Vec<String> {
    vec!["*".into()]
}
fn default_versions() -> String {
    "*".into()
}

/// Status reports to the hub's ack endpoint.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportConfig {
    /// The hub's ack endpoint, e.g. `https://hub.example.gov/v1/acks`. Required.
    pub url: String,
    /// This agent's own Standard Webhooks secret (`whsec_…`) that signs every report. Required.
    pub secret: SecretSource,
    /// Trust only this CA (PEM) for the hub's certificate instead of the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Time a report request may take, in milliseconds. Default: 10000.
    #[serde(default = "default_report_timeout")]
    pub timeout_ms: u64,
    /// Upper bound of the first retry delay, in milliseconds. Default: 1000.
    #[serde(default = "default_report_initial")]
    pub retry_initial_ms: u64,
    /// Upper bound of any retry delay, in milliseconds. Reports are retried until the hub
    /// answers 2xx. Default: 300000 (5 minutes).
    #[serde(default = "default_report_max")]
    pub retry_max_ms: u64,
}

fn default_report_timeout() -> u64 {
    10_000
}
fn default_report_initial() -> u64 {
    1000
}
fn default_report_max() -> u64 {
    300_000
}

/// The dispatcher.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DispatchConfig {
    /// Most events applied at the same time (each from a different subject; events of one
    /// subject are always applied one after another). Default: 32.
    #[serde(default = "default_parallel")]
    pub max_parallel: usize,
    /// How often every sink's healthcheck runs; a failing sink makes `/readyz` answer 503 with
    /// the reason. Milliseconds. Default: 10000.
    #[serde(default = "default_healthcheck_interval")]
    pub healthcheck_interval_ms: u64,
}

fn default_healthcheck_interval() -> u64 {
    10_000
}

fn default_parallel() -> usize {
    32
}

impl Default for DispatchConfig {
    fn default() -> Self {
        Self {
            max_parallel: default_parallel(),
            healthcheck_interval_ms: default_healthcheck_interval(),
        }
    }
}

/// The log's per-event lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Which events get their one info line (`event final`, with the event id and its final
    /// state): `"all"`, `"failures"` (only events that end as dead letters: `failed` or
    /// `parked`) or `"none"`. Warnings (an adapter error, a sink refusing an output, a retry)
    /// and refused requests are logged whatever this says; accepted requests are logged at
    /// debug level. Default: `"all"`.
    #[serde(default)]
    pub events: EventLog,
}

/// Which events [`LogConfig::events`] logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventLog {
    /// Every event's final state.
    #[default]
    All,
    /// Only events that end as dead letters (`failed`, `parked`).
    Failures,
    /// No per-event line.
    None,
}

/// When the hub gets its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AckMode {
    /// 202 `accepted` as soon as the event is journaled (fsync'd).
    #[default]
    Received,
    /// Wait (up to `ack_timeout_ms`) until the event is applied to every route's sink: 200
    /// `applied`, 200 `failed`, or 202 `accepted` when the wait times out.
    Applied,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/ess-agent")
}

/// The hub-facing listener.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngressConfig {
    /// Address and port to listen on. Default: `127.0.0.1:8787`.
    #[serde(default = "default_ingress_listen")]
    pub listen: SocketAddr,
    /// TLS settings. Without them the listener speaks plain HTTP, which is allowed only on a
    /// loopback address unless `insecure_allow_plain_http_on_public_address` is set.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Serve plain HTTP on a non-loopback address. Anyone on the path can read and replay events:
    /// only for a network the operator fully controls. Default: false.
    #[serde(default)]
    pub insecure_allow_plain_http_on_public_address: bool,
    /// When the hub gets its answer: `received` (default) or `applied`.
    #[serde(default)]
    pub ack_mode: AckMode,
    /// With `ack_mode = "applied"`: how long a delivery waits for the sinks before it is
    /// answered 202 `accepted`, in milliseconds. Default: 5000.
    #[serde(default = "default_ack_timeout")]
    pub ack_timeout_ms: u64,
}

fn default_ack_timeout() -> u64 {
    5000
}

fn default_ingress_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8787))
}

impl Default for IngressConfig {
    fn default() -> Self {
        Self {
            listen: default_ingress_listen(),
            tls: None,
            insecure_allow_plain_http_on_public_address: false,
            ack_mode: AckMode::default(),
            ack_timeout_ms: default_ack_timeout(),
        }
    }
}

/// Authentication of the hub (PROTOCOL.md §1.2). Every configured method must pass.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Standard Webhooks HMAC secrets (`whsec_…`). Several may be listed while a secret is
    /// rotated: a signature made with any of them is accepted. Default: none.
    #[serde(default)]
    pub hmac_secrets: Vec<SecretSource>,
    /// Standard Webhooks ed25519 public keys (`whpk_…`) for `v1a` signatures. Default: none.
    #[serde(default)]
    pub ed25519_public_keys: Vec<SecretSource>,
    /// How far `webhook-timestamp` may be from this machine's clock, in seconds. Default: 300.
    #[serde(default = "default_tolerance")]
    pub timestamp_tolerance_secs: u64,
    /// A token the hub must send as `Authorization: Bearer <token>`. Default: none.
    #[serde(default)]
    pub bearer_token: Option<SecretSource>,
}

fn default_tolerance() -> u64 {
    300
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            hmac_secrets: Vec::new(),
            ed25519_public_keys: Vec::new(),
            timestamp_tolerance_secs: default_tolerance(),
            bearer_token: None,
        }
    }
}

/// Limits that protect the agent and the disk.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest accepted request body in bytes; larger ones get 413. Default: 1048576 (1 MiB).
    #[serde(default = "default_max_body")]
    pub max_body_bytes: u64,
    /// Most simultaneous ingress connections. At the limit the connection idle the longest is
    /// closed to make room; only when every one is busy do further ones wait in the listen
    /// queue. Default: 1024.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Time a client has to send a complete request head (TLS handshake included), counted from
    /// the connection's start or the end of its previous response, so it also closes idle
    /// keep-alive connections. Milliseconds. Default: 10000.
    #[serde(default = "default_header_timeout")]
    pub header_read_timeout_ms: u64,
    /// Time a client has to send the whole request body. Milliseconds. Default: 30000.
    #[serde(default = "default_body_timeout")]
    pub body_read_timeout_ms: u64,
    /// Events received but not yet in a final state above which new deliveries get 503.
    /// Default: 100000.
    #[serde(default = "default_backlog_high_water")]
    pub backlog_high_water: u64,
    /// Free space the state directory's file system must keep; below it new deliveries get 503.
    /// Bytes. Default: 67108864 (64 MiB).
    #[serde(default = "default_min_free_disk")]
    pub min_free_disk_bytes: u64,
    /// The `Retry-After` value sent with 503 answers, in seconds. Default: 5.
    #[serde(default = "default_retry_after")]
    pub retry_after_secs: u64,
    /// How deeply arrays and objects may nest in an event, the envelope's object being the
    /// first level; deeper events get 400 `too_deep`. From 1 to 127. Default: 64.
    #[serde(default = "default_max_json_depth")]
    pub max_json_depth: usize,
}

fn default_max_body() -> u64 {
    1024 * 1024
}
fn default_max_connections() -> usize {
    1024
}
fn default_header_timeout() -> u64 {
    10_000
}
fn default_body_timeout() -> u64 {
    30_000
}
fn default_backlog_high_water() -> u64 {
    100_000
}
fn default_min_free_disk() -> u64 {
    64 * 1024 * 1024
}
fn default_retry_after() -> u64 {
    5
}
fn default_max_json_depth() -> usize {
    crate::protocol::envelope::DEFAULT_MAX_DEPTH
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: default_max_body(),
            max_connections: default_max_connections(),
            header_read_timeout_ms: default_header_timeout(),
            body_read_timeout_ms: default_body_timeout(),
            backlog_high_water: default_backlog_high_water(),
            min_free_disk_bytes: default_min_free_disk(),
            retry_after_secs: default_retry_after(),
            max_json_depth: default_max_json_depth(),
        }
    }
}

/// The admin listener (plain HTTP).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address and port. Default: `127.0.0.1:8788`. Set `enabled = false` to turn it off.
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
    /// Whether the admin listener runs. Default: true.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// A token callers must send as `Authorization: Bearer <token>`. Required when `listen` is
    /// not a loopback address; optional otherwise. `/healthz` and `/readyz` never need it.
    #[serde(default)]
    pub token: Option<SecretSource>,
}

fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8788))
}
fn default_true() -> bool {
    true
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
            enabled: true,
            token: None,
        }
    }
}

/// Where the journal keeps the events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JournalBackend {
    /// `journal.sqlite3` in the state directory: one agent.
    #[default]
    Sqlite,
    /// A PostgreSQL database that several agents share (docs/high-availability.md).
    Postgres,
}

/// The journal: where it lives and its tuning. The defaults suit almost every installation.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JournalConfig {
    /// `sqlite` (default): the journal is a file in `state_dir`, for one agent. `postgres`:
    /// the journal is in the PostgreSQL database `url`, shared by every agent configured with
    /// it; any of them accepts an event, and each subject is applied by one of them at a time.
    #[serde(default)]
    pub backend: JournalBackend,
    /// PostgreSQL: the database, `postgres://user@host:5432/database`, without a password.
    #[serde(default)]
    pub url: Option<String>,
    /// PostgreSQL: the password (`{ file = "…" }` or `{ env = "…" }`). Default: none (trust,
    /// peer or certificate authentication).
    #[serde(default)]
    pub password: Option<SecretSource>,
    /// PostgreSQL: the schema that holds the journal's tables; it must exist. Default: the
    /// user's `search_path` (normally `public`).
    #[serde(default)]
    pub schema: Option<String>,
    /// PostgreSQL: TLS to the database: `disable`, `prefer`, `require`, `verify_ca` or
    /// `verify_full`. Default: what the URL says (`sslmode`), else `verify_full` when
    /// `ca_file` is set, else `prefer`.
    #[serde(default)]
    pub tls: Option<crate::settings::database::TlsMode>,
    /// PostgreSQL: a PEM file with the CA certificate(s) the server's certificate must chain
    /// to. Default: the bundled web PKI roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PostgreSQL: connections this agent keeps at most. Default: 8.
    #[serde(default = "default_pool_size")]
    pub pool_size: u32,
    /// PostgreSQL: when an agent stops (or its machine dies), another agent goes on with its
    /// subjects within this many seconds. Shorter takes over sooner but renews more often (a
    /// third of it) and gives up applying sooner when the database is slow to answer. Default: 10.
    #[serde(default = "default_lease_seconds")]
    pub lease_seconds: f64,
    /// PostgreSQL: the number of partitions subjects are spread over (the unit of a lease),
    /// used when the journal's tables are created; afterwards the stored count holds. More
    /// partitions than agents spread the load evenly. Default: 64.
    #[serde(default = "default_partitions")]
    pub partitions: u32,
    /// Most events one commit (one fsync) may carry. Default: 512.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// The most, in milliseconds, a commit of nothing but final states waits for more. A sink
    /// batch completes many events at once; their final states, arriving microseconds apart,
    /// then share one commit (one fsync) instead of two or three. The wait ends as soon as none
    /// has come for 20 µs, and at once when a new event arrives. 0 turns it off. Default: 1.
    #[serde(default = "default_finish_linger")]
    pub finish_linger_ms: u64,
    /// How often the background checkpoint moves the write-ahead log into the database and the
    /// free-disk check runs. Milliseconds. Default: 10.
    #[serde(default = "default_checkpoint_interval")]
    pub checkpoint_interval_ms: u64,
    /// Size of the write-ahead log, in MiB, past which the writer finishes a checkpoint after
    /// its next commit so that the log starts over from its beginning. Under continuous writes
    /// a background checkpoint alone never catches up with the log's end, and the log would
    /// grow without bound. Default: 64.
    #[serde(default = "default_wal_restart_mib")]
    pub wal_restart_mib: u64,
    /// How long an event that reached a final state other than a dead letter (applied,
    /// filtered, superseded, dropped) is kept, in days after it was received and last changed;
    /// then it is deleted with its body and deliveries, and a redelivery of its id counts as a
    /// new event. Dead letters (failed, parked) and events not yet final are never deleted.
    /// Fractions are allowed; 0 keeps every event for ever. Default: 30.
    #[serde(default = "default_retention_days")]
    pub retention_days: f64,
}

impl JournalConfig {
    /// Checks the backend's keys: PostgreSQL needs a URL without a password, a lease of a
    /// second or more, partitions; SQLite takes none of them.
    fn validate_backend(&self, bad: &mut impl FnMut(&str, String)) {
        match self.backend {
            JournalBackend::Postgres => {
                match self.url.as_deref() {
                    None => bad(
                        "journal.url",
                        "is required with backend = \"postgres\": write it like \
                         postgres://ess@db.example:5432/ess"
                            .into(),
                    ),
                    Some(url)
                        if !(url.starts_with("postgres://")
                            || url.starts_with("postgresql://")) =>
                    {
                        bad(
                            "journal.url",
                            "must start with postgres://: write it like \
                             postgres://ess@db.example:5432/ess"
                                .into(),
                        )
                    }
                    Some(url) => {
                        if let Err(message) = crate::settings::database::check_plain_url(url) {
                            bad(
                                "journal.url",
                                message.replace(" (or give the whole URL with url_secret)", ""),
                            );
                        }
                    }
                }
                if let Some(password) = &self.password
                    && let Err(message) = password.check()
                {
                    bad("journal.password", message);
                }
                if !(1.0..=3600.0).contains(&self.lease_seconds) {
                    bad(
                        "journal.lease_seconds",
                        format!("{} is not between 1 and 3600 seconds", self.lease_seconds),
                    );
                }
                if !(1..=4096).contains(&self.partitions) {
                    bad("journal.partitions", "must be from 1 to 4096".into());
                }
                if self.pool_size < 2 {
                    bad("journal.pool_size", "must be at least 2".into());
                }
            }
            JournalBackend::Sqlite => {
                let postgres_only = [
                    ("journal.url", self.url.is_some()),
                    ("journal.password", self.password.is_some()),
                    ("journal.schema", self.schema.is_some()),
                    ("journal.tls", self.tls.is_some()),
                    ("journal.ca_file", self.ca_file.is_some()),
                ];
                for (key, set) in postgres_only {
                    if set {
                        bad(
                            key,
                            "is for backend = \"postgres\": set journal.backend = \"postgres\", or remove it"
                                .into(),
                        );
                    }
                }
            }
        }
    }

    /// How long final events are kept; `None` for ever.
    pub fn retention(&self) -> Option<Duration> {
        (self.retention_days > 0.0)
            .then(|| Duration::try_from_secs_f64(self.retention_days * 86_400.0).ok())
            .flatten()
    }
}

fn default_max_batch() -> usize {
    512
}
fn default_pool_size() -> u32 {
    8
}
fn default_lease_seconds() -> f64 {
    10.0
}
fn default_partitions() -> u32 {
    64
}
fn default_finish_linger() -> u64 {
    1
}
fn default_checkpoint_interval() -> u64 {
    10
}
fn default_wal_restart_mib() -> u64 {
    64
}
fn default_retention_days() -> f64 {
    30.0
}

impl Default for JournalConfig {
    fn default() -> Self {
        Self {
            backend: JournalBackend::default(),
            url: None,
            password: None,
            schema: None,
            tls: None,
            ca_file: None,
            pool_size: default_pool_size(),
            lease_seconds: default_lease_seconds(),
            partitions: default_partitions(),
            max_batch: default_max_batch(),
            finish_linger_ms: default_finish_linger(),
            checkpoint_interval_ms: default_checkpoint_interval(),
            wal_restart_mib: default_wal_restart_mib(),
            retention_days: default_retention_days(),
        }
    }
}

/// Graceful shutdown on SIGTERM / SIGINT.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// How long in-flight requests may take to finish before the agent exits anyway. Seconds.
    /// Default: 30 (keep it below systemd's `TimeoutStopSec`).
    #[serde(default = "default_grace")]
    pub grace_period_secs: u64,
}

fn default_grace() -> u64 {
    30
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            grace_period_secs: default_grace(),
        }
    }
}

/// A configuration that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("{path}: {problem}")]
    Parse { path: PathBuf, problem: Problem },
    /// The file parsed but breaks one or more rules.
    #[error("{path}: {} problem(s):\n{}", problems.len(), problems.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

impl ConfigError {
    /// Every problem, for `ess-agent validate`.
    pub fn problems(&self) -> Vec<Problem> {
        match self {
            ConfigError::Read { path, source } => vec![Problem {
                key: "(file)".into(),
                message: format!("cannot read {}: {source}", path.display()),
            }],
            ConfigError::Parse { problem, .. } => vec![problem.clone()],
            ConfigError::Invalid { problems, .. } => problems.clone(),
        }
    }
}

/// Secrets read from the sources the configuration names.
#[derive(Clone, Default)]
pub struct Secrets {
    pub hmac_secrets: Vec<String>,
    pub ed25519_public_keys: Vec<String>,
    pub bearer_token: Option<String>,
    pub admin_token: Option<String>,
    pub report_secret: Option<String>,
    /// The PostgreSQL journal's password (`journal.password`).
    pub journal_password: Option<String>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secret material, not even in debug output.
        f.debug_struct("Secrets")
            .field("hmac_secrets", &self.hmac_secrets.len())
            .field("ed25519_public_keys", &self.ed25519_public_keys.len())
            .field("bearer_token", &self.bearer_token.is_some())
            .field("admin_token", &self.admin_token.is_some())
            .field("report_secret", &self.report_secret.is_some())
            .field("journal_password", &self.journal_password.is_some())
            .finish()
    }
}

/// A configuration read part by part: what parsed, and what was wrong with the rest.
#[derive(Debug)]
pub struct Parsed {
    /// Every part that parsed; one that did not is replaced by a stand-in (its default, an empty
    /// route, or no sink at all).
    pub config: Config,
    /// Every problem found so far, each with its key path.
    pub problems: Vec<Problem>,
    /// Key paths that hold a stand-in. A problem later found at or below one of them is a
    /// consequence of the problem already reported there, not news, and is left out.
    stand_ins: Vec<String>,
}

impl Default for Parsed {
    fn default() -> Self {
        Parsed {
            config: Config {
                agent_id: String::new(),
                state_dir: default_state_dir(),
                ingress: IngressConfig::default(),
                auth: AuthConfig::default(),
                limits: LimitsConfig::default(),
                admin: AdminConfig::default(),
                journal: JournalConfig::default(),
                shutdown: ShutdownConfig::default(),
                adapters_dir: default_adapters_dir(),
                routes: Vec::new(),
                sinks: BTreeMap::new(),
                report: None,
                dispatch: DispatchConfig::default(),
                log: LogConfig::default(),
            },
            problems: Vec::new(),
            stand_ins: Vec::new(),
        }
    }
}

impl Parsed {
    /// Adds problems found by a later check, leaving out those that concern a stand-in.
    pub fn add(&mut self, problems: impl IntoIterator<Item = Problem>) {
        for problem in problems {
            let consequence = self.stand_ins.iter().any(|stand_in| {
                problem
                    .key
                    .strip_prefix(stand_in.as_str())
                    .is_some_and(|rest| {
                        rest.is_empty() || rest.starts_with('.') || rest.starts_with('[')
                    })
            });
            if !consequence {
                self.problems.push(problem);
            }
        }
    }

    /// Records that the part at `key` did not parse and a stand-in took its place.
    fn stand_in(&mut self, key: &str, message: String) {
        self.problems.push(Problem {
            key: key.to_string(),
            message,
        });
        self.stand_ins.push(key.to_string());
    }
}

/// One value of a TOML document, as the parser gives it.
type TomlValue<'i> = toml::Spanned<toml::de::DeValue<'i>>;

/// The parts of a TOML document not parsed yet, and what parsing found so far.
struct Parts<'i> {
    table: BTreeMap<String, TomlValue<'i>>,
    parsed: Parsed,
}

impl<'i> Parts<'i> {
    /// Takes the top-level `key` out of the document and parses it; `None` when it is absent
    /// or does not parse (then the problem is recorded).
    fn take<T: serde::de::DeserializeOwned>(&mut self, key: &str) -> Option<T> {
        let value = self.table.remove(key)?;
        self.parse(value, key)
    }

    fn parse<T: serde::de::DeserializeOwned>(
        &mut self,
        value: TomlValue<'i>,
        key: &str,
    ) -> Option<T> {
        match from_value(value, key) {
            Ok(value) => Some(value),
            Err(problem) => {
                self.parsed.problems.push(problem);
                self.parsed.stand_ins.push(key.to_string());
                None
            }
        }
    }

    /// `[sinks.NAME]`, each sink on its own. One that does not parse is left out.
    fn sinks(&mut self) -> BTreeMap<String, SinkConfig> {
        let mut sinks = BTreeMap::new();
        match self.table.remove("sinks").map(toml::Spanned::into_inner) {
            None => {}
            Some(toml::de::DeValue::Table(entries)) => {
                for (name, value) in entries {
                    let name = name.into_inner().into_owned();
                    if let Some(sink) = self.parse(value, &format!("sinks.{name}")) {
                        sinks.insert(name, sink);
                    }
                }
            }
            Some(_) => self.parsed.stand_in(
                "sinks",
                "must be a table: write each sink as [sinks.NAME] with its type and settings"
                    .into(),
            ),
        }
        sinks
    }

    /// `[[routes]]`, each route on its own. One that does not parse is replaced by an empty
    /// route, so that the others keep their index in key paths.
    fn routes(&mut self, sinks: &BTreeMap<String, SinkConfig>) -> Vec<RouteConfig> {
        let items = match self.table.remove("routes").map(toml::Spanned::into_inner) {
            None => return Vec::new(),
            Some(toml::de::DeValue::Array(items)) => items,
            Some(_) => {
                self.parsed.stand_in(
                    "routes",
                    "must be an array of tables: write each route as [[routes]] with name, \
                     adapter and sink"
                        .into(),
                );
                return Vec::new();
            }
        };
        let mut routes = Vec::new();
        for (i, value) in items.iter().enumerate() {
            let key = format!("routes[{i}]");
            let route = self
                .parse(value.clone(), &key)
                .unwrap_or_else(|| RouteConfig {
                    name: String::new(),
                    types: default_types(),
                    versions: default_versions(),
                    adapter: PathBuf::new(),
                    sink: String::new(),
                    time_limit_ms: None,
                    max_depth: None,
                    max_output_bytes: None,
                });
            // A route naming a sink that did not parse is not told the sink is undefined.
            if self
                .parsed
                .stand_ins
                .contains(&format!("sinks.{}", route.sink))
                && !sinks.contains_key(&route.sink)
            {
                self.parsed.stand_ins.push(format!("{key}.sink"));
            }
            routes.push(route);
        }
        routes
    }
}

/// Deserializes one part of the document; a problem's key path starts with `key`.
fn from_value<T: serde::de::DeserializeOwned>(
    value: TomlValue<'_>,
    key: &str,
) -> Result<T, Problem> {
    serde_path_to_error::deserialize(toml::de::ValueDeserializer::from(value)).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let key = match (key.is_empty(), path == ".") {
            (_, true) => key.to_string(),
            (true, false) => path,
            (false, false) => format!("{key}.{path}"),
        };
        Problem {
            key,
            message: inner.message().trim().to_string(),
        }
    })
}

impl Config {
    /// Reads, parses and validates the file at `path`, resolving relative paths against its
    /// directory. Secrets are not read yet. Every problem is reported, not only the first.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let checked = Config::check_file(path)?;
        if checked.problems.is_empty() {
            Ok(checked.config)
        } else {
            Err(ConfigError::Invalid {
                path: path.to_owned(),
                problems: checked.problems,
            })
        }
    }

    /// Reads, parses (part by part, see [`Config::parse_parts`]) and validates the file at
    /// `path`, resolving relative paths against its directory. Fails only when there is nothing
    /// to go on: the file cannot be read or is not TOML. Otherwise every problem found so far is
    /// in the result, beside the parts that did parse, so that later checks (secrets, adapters,
    /// certificates) can still run over them.
    pub fn check_file(path: &Path) -> Result<Parsed, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut parsed = Config::parse_parts(&text).map_err(|problem| ConfigError::Parse {
            path: path.to_owned(),
            problem,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        parsed.config.resolve_paths(base);
        let problems = parsed.config.validate();
        parsed.add(problems);
        Ok(parsed)
    }

    /// Parses TOML text. The error names the key path of the offending key; it is the first of
    /// the problems [`Config::parse_parts`] finds.
    pub fn parse(text: &str) -> Result<Config, Problem> {
        let parsed = Config::parse_parts(text)?;
        match parsed.problems.into_iter().next() {
            None => Ok(parsed.config),
            Some(problem) => Err(problem),
        }
    }

    /// Parses TOML text one part at a time: each top-level setting and section, each route and
    /// each sink on its own, so that a mistake in one (a wrong type, an unknown key) does not
    /// hide the mistakes in the others. A part that does not parse is replaced by a stand-in
    /// (its default; an empty route; no sink) and its problem recorded. Fails only on a TOML
    /// syntax error, after which nothing can be read.
    pub fn parse_parts(text: &str) -> Result<Parsed, Problem> {
        // The parser's own tree, not `toml::Table`: it keeps integers as written, so that a u64
        // setting above i64::MAX still reads.
        let table = toml::de::DeTable::parse(text)
            .map_err(|e| Problem {
                key: "(syntax)".into(),
                message: e.to_string().trim().to_string(),
            })?
            .into_inner()
            .into_iter()
            .map(|(key, value)| (key.into_inner().into_owned(), value))
            .collect();
        let mut parts = Parts {
            table,
            parsed: Parsed::default(),
        };
        let agent_id = parts.take::<String>("agent_id");
        let agent_id = match agent_id {
            Some(id) => id,
            None => {
                if !parts.parsed.stand_ins.iter().any(|k| k == "agent_id") {
                    parts.parsed.stand_in(
                        "agent_id",
                        "is missing: set agent_id = \"...\" to the partner id the hub knows \
                         you by"
                            .into(),
                    );
                }
                String::new()
            }
        };
        let state_dir = parts.take("state_dir").unwrap_or_else(default_state_dir);
        let ingress = parts.take("ingress").unwrap_or_default();
        let auth = parts.take("auth").unwrap_or_default();
        let limits = parts.take("limits").unwrap_or_default();
        let admin = parts.take("admin").unwrap_or_default();
        let journal = parts.take("journal").unwrap_or_default();
        let shutdown = parts.take("shutdown").unwrap_or_default();
        let adapters_dir = parts
            .take("adapters_dir")
            .unwrap_or_else(default_adapters_dir);
        let report = parts.take("report");
        let dispatch = parts.take("dispatch").unwrap_or_default();
        let log = parts.take("log").unwrap_or_default();
        let sinks = parts.sinks();
        let routes = parts.routes(&sinks);
        let Parts { table, mut parsed } = parts;
        // Whatever is left is no setting at all; serde words the refusal (with the list of
        // known keys), one key at a time so that each is named.
        for (key, value) in table {
            let mut alone = toml::de::DeTable::new();
            alone.insert(toml::Spanned::new(0..0, key.clone().into()), value);
            let alone = toml::Spanned::new(0..0, toml::de::DeValue::Table(alone));
            if let Err(problem) = from_value::<Config>(alone, "") {
                parsed.problems.push(Problem {
                    key,
                    message: problem.message,
                });
            }
        }
        parsed.config = Config {
            agent_id,
            state_dir,
            ingress,
            auth,
            limits,
            admin,
            journal,
            shutdown,
            adapters_dir,
            routes,
            sinks,
            report,
            dispatch,
            log,
        };
        Ok(parsed)
    }

    pub(crate) fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.state_dir);
        fix(&mut self.adapters_dir);
        for route in &mut self.routes {
            if route.adapter.is_relative() {
                route.adapter = self.adapters_dir.join(&route.adapter);
            }
        }
        for sink in self.sinks.values_mut() {
            sink.resolve_paths(base);
        }
        if let Some(report) = &mut self.report
            && let Some(ca) = &mut report.ca_file
        {
            fix(ca);
        }
        if let Some(ca) = &mut self.journal.ca_file {
            fix(ca);
        }
        if let Some(password) = &mut self.journal.password {
            password.resolve_path(base);
        }
        if let Some(tls) = &mut self.ingress.tls {
            fix(&mut tls.cert);
            fix(&mut tls.key);
            if let Some(ca) = &mut tls.client_ca {
                fix(ca);
            }
        }
        let sources = self
            .auth
            .hmac_secrets
            .iter_mut()
            .chain(self.auth.ed25519_public_keys.iter_mut())
            .chain(self.auth.bearer_token.iter_mut())
            .chain(self.admin.token.iter_mut())
            .chain(self.report.iter_mut().map(|r| &mut r.secret));
        for source in sources {
            source.resolve_path(base);
        }
    }

    /// Checks the rules that a schema cannot express. Pure: touches neither files nor network.
    pub fn validate(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut bad = |key: &str, message: String| {
            problems.push(Problem {
                key: key.to_string(),
                message,
            })
        };
        if self.agent_id.trim().is_empty() {
            bad(
                "agent_id",
                "must not be empty: set it to the partner id the hub knows you by".into(),
            );
        }
        let auth = &self.auth;
        let has_auth = !auth.hmac_secrets.is_empty()
            || !auth.ed25519_public_keys.is_empty()
            || auth.bearer_token.is_some()
            || self
                .ingress
                .tls
                .as_ref()
                .is_some_and(|t| t.client_ca.is_some());
        let public = !self.ingress.listen.ip().is_loopback();
        if public && !has_auth {
            bad(
                "auth",
                format!(
                    "the ingress listener {} is not a loopback address but no authentication is \
                     configured: add auth.hmac_secrets, auth.ed25519_public_keys, \
                     auth.bearer_token or ingress.tls.client_ca",
                    self.ingress.listen
                ),
            );
        }
        if public
            && self.ingress.tls.is_none()
            && !self.ingress.insecure_allow_plain_http_on_public_address
        {
            bad(
                "ingress.tls",
                format!(
                    "the ingress listener {} is not a loopback address and has no TLS: add \
                     [ingress.tls] with cert and key (or, only on a network you control, set \
                     ingress.insecure_allow_plain_http_on_public_address = true)",
                    self.ingress.listen
                ),
            );
        }
        if let Some(tls) = &self.ingress.tls
            && !tls.client_allowed_names.is_empty()
            && tls.client_ca.is_none()
        {
            bad(
                "ingress.tls.client_allowed_names",
                "needs ingress.tls.client_ca: names are checked on client certificates, which \
                 are only requested when a client CA is set"
                    .into(),
            );
        }
        let sources = auth
            .hmac_secrets
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("auth.hmac_secrets[{i}]"), s))
            .chain(
                auth.ed25519_public_keys
                    .iter()
                    .enumerate()
                    .map(|(i, s)| (format!("auth.ed25519_public_keys[{i}]"), s)),
            )
            .chain(
                auth.bearer_token
                    .iter()
                    .map(|s| ("auth.bearer_token".to_string(), s)),
            )
            .chain(
                self.admin
                    .token
                    .iter()
                    .map(|s| ("admin.token".to_string(), s)),
            )
            .chain(
                self.report
                    .iter()
                    .map(|r| ("report.secret".to_string(), &r.secret)),
            );
        for (key, source) in sources {
            if let Err(message) = source.check() {
                bad(&key, message);
            }
        }
        if auth.timestamp_tolerance_secs == 0 {
            bad(
                "auth.timestamp_tolerance_secs",
                "must be at least 1 (the standard is 300)".into(),
            );
        }
        if self.admin.enabled && !self.admin.listen.ip().is_loopback() && self.admin.token.is_none()
        {
            bad(
                "admin.token",
                format!(
                    "the admin listener {} is not a loopback address: set admin.token so that \
                     only operators can read and replay events",
                    self.admin.listen
                ),
            );
        }
        if self.admin.enabled
            && self.admin.listen.port() != 0
            && self.admin.listen == self.ingress.listen
        {
            bad("admin.listen", "must differ from ingress.listen".into());
        }
        let limits = &self.limits;
        if limits.max_body_bytes == 0 {
            bad("limits.max_body_bytes", "must be at least 1".into());
        }
        if limits.max_connections == 0 {
            bad("limits.max_connections", "must be at least 1".into());
        }
        if limits.header_read_timeout_ms == 0 {
            bad("limits.header_read_timeout_ms", "must be at least 1".into());
        }
        if limits.body_read_timeout_ms == 0 {
            bad("limits.body_read_timeout_ms", "must be at least 1".into());
        }
        if limits.backlog_high_water == 0 {
            bad("limits.backlog_high_water", "must be at least 1".into());
        }
        let deepest = crate::protocol::envelope::MAX_DEPTH_LIMIT;
        if !(1..=deepest).contains(&limits.max_json_depth) {
            bad(
                "limits.max_json_depth",
                format!("must be from 1 to {deepest} (the JSON parser's own limit)"),
            );
        }
        if self.journal.max_batch == 0 {
            bad("journal.max_batch", "must be at least 1".into());
        }
        self.journal.validate_backend(&mut bad);
        if self.journal.checkpoint_interval_ms == 0 {
            bad(
                "journal.checkpoint_interval_ms",
                "must be at least 1".into(),
            );
        }
        let retention = self.journal.retention_days;
        if !(0.0..=36_500.0).contains(&retention) {
            bad(
                "journal.retention_days",
                format!(
                    "{retention} is not between 0 (keep every event for ever) and 36500 (100 years)"
                ),
            );
        }
        if self.dispatch.max_parallel == 0 {
            bad("dispatch.max_parallel", "must be at least 1".into());
        }
        if self.dispatch.healthcheck_interval_ms == 0 {
            bad(
                "dispatch.healthcheck_interval_ms",
                "must be at least 1".into(),
            );
        }
        if self.ingress.ack_timeout_ms == 0 {
            bad("ingress.ack_timeout_ms", "must be at least 1".into());
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, route) in self.routes.iter().enumerate() {
            let key = format!("routes[{i}]");
            if route.name.trim().is_empty() {
                bad(&format!("{key}.name"), "must not be empty".into());
            } else if !names.insert(route.name.as_str()) {
                bad(
                    &format!("{key}.name"),
                    format!(
                        "{:?} is used by an earlier route: route names must be unique",
                        route.name
                    ),
                );
            }
            if route.types.is_empty() {
                bad(
                    &format!("{key}.types"),
                    "must list at least one type (\"*\" for all)".into(),
                );
            }
            if let Err(e) = VersionRange::parse(&route.versions) {
                bad(&format!("{key}.versions"), e);
            }
            if !self.sinks.contains_key(&route.sink) {
                let known: Vec<_> = self.sinks.keys().map(String::as_str).collect();
                bad(
                    &format!("{key}.sink"),
                    format!(
                        "no sink named {:?}: define [sinks.{}] (defined: {known:?})",
                        route.sink, route.sink
                    ),
                );
            }
            if route.time_limit_ms == Some(0) {
                bad(&format!("{key}.time_limit_ms"), "must be at least 1".into());
            }
            if route.max_depth == Some(0) {
                bad(&format!("{key}.max_depth"), "must be at least 1".into());
            }
            if route.max_output_bytes == Some(0) {
                bad(
                    &format!("{key}.max_output_bytes"),
                    "must be at least 1".into(),
                );
            }
        }
        if let Some(report) = &self.report {
            match report.url.parse::<http::Uri>() {
                Ok(uri)
                    if matches!(uri.scheme_str(), Some("http" | "https"))
                        && uri.host().is_some() => {}
                _ => bad(
                    "report.url",
                    format!("{:?} is not an http(s) URL with a host", report.url),
                ),
            }
            if report.timeout_ms == 0 || report.retry_initial_ms == 0 || report.retry_max_ms == 0 {
                bad(
                    "report",
                    "timeout_ms, retry_initial_ms and retry_max_ms must be at least 1".into(),
                );
            }
        }
        for (name, sink) in &self.sinks {
            problems.extend(sink.validate(&format!("sinks.{name}")));
        }
        problems
    }

    /// Reads every secret the configuration names. All unreadable secrets are reported at once.
    pub fn load_secrets(&self) -> Result<Secrets, Vec<Problem>> {
        self.read_secrets(true)
    }

    /// Reads only the hub authentication's secrets (`[auth]`), which a reload puts in force;
    /// the admin token and the report secret are left out.
    pub fn load_auth_secrets(&self) -> Result<Secrets, Vec<Problem>> {
        self.read_secrets(false)
    }

    fn read_secrets(&self, all: bool) -> Result<Secrets, Vec<Problem>> {
        let mut problems = Vec::new();
        let mut read = |key: String, source: &SecretSource| -> Option<String> {
            match read_secret(source) {
                Ok(secret) => Some(secret),
                Err(message) => {
                    problems.push(Problem { key, message });
                    None
                }
            }
        };
        let auth = &self.auth;
        let secrets = Secrets {
            hmac_secrets: auth
                .hmac_secrets
                .iter()
                .enumerate()
                .filter_map(|(i, s)| read(format!("auth.hmac_secrets[{i}]"), s))
                .collect(),
            ed25519_public_keys: auth
                .ed25519_public_keys
                .iter()
                .enumerate()
                .filter_map(|(i, s)| read(format!("auth.ed25519_public_keys[{i}]"), s))
                .collect(),
            bearer_token: auth
                .bearer_token
                .as_ref()
                .and_then(|s| read("auth.bearer_token".into(), s)),
            admin_token: self
                .admin
                .token
                .as_ref()
                .filter(|_| all)
                .and_then(|s| read("admin.token".into(), s)),
            report_secret: self
                .report
                .as_ref()
                .filter(|_| all)
                .and_then(|r| read("report.secret".into(), &r.secret)),
            journal_password: self
                .journal
                .password
                .as_ref()
                .filter(|_| all && self.journal.backend == JournalBackend::Postgres)
                .and_then(|s| read("journal.password".into(), s)),
        };
        if problems.is_empty() {
            Ok(secrets)
        } else {
            Err(problems)
        }
    }

    /// The header read timeout.
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.limits.header_read_timeout_ms)
    }

    /// The body read timeout.
    pub fn body_read_timeout(&self) -> Duration {
        Duration::from_millis(self.limits.body_read_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::secret::read_secret_from;

    const MINIMAL: &str = r#"
agent_id = "p1"
state_dir = "state"
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.ingress.listen, default_ingress_listen());
        assert_eq!(c.limits.max_body_bytes, 1024 * 1024);
        assert_eq!(c.auth.timestamp_tolerance_secs, 300);
        assert!(c.validate().is_empty());
    }

    #[test]
    fn unknown_key_names_its_path() {
        let text = format!("{MINIMAL}\n[ingress]\nlisten = \"127.0.0.1:1\"\nlisen = 1\n");
        let p = Config::parse(&text).unwrap_err();
        assert_eq!(p.key, "ingress.lisen");
        assert!(p.message.contains("unknown field `lisen`"), "{}", p.message);
        let text = format!("{MINIMAL}\n[[auth.hmac_secrets]]\nfile = \"x\"\nvalue = \"y\"\n");
        let p = Config::parse(&text).unwrap_err();
        assert!(p.key.starts_with("auth.hmac_secrets"), "{}", p.key);
        assert!(p.message.contains("unknown field `value`"), "{}", p.message);
    }

    #[test]
    fn public_listener_needs_auth_and_tls() {
        let text = format!("{MINIMAL}\n[ingress]\nlisten = \"0.0.0.0:8787\"\n");
        let c = Config::parse(&text).unwrap();
        let keys: Vec<_> = c.validate().into_iter().map(|p| p.key).collect();
        assert_eq!(keys, vec!["auth", "ingress.tls"]);
        let text = format!(
            "{MINIMAL}\n[ingress]\nlisten = \"0.0.0.0:8787\"\n\
             insecure_allow_plain_http_on_public_address = true\n\
             [auth]\nbearer_token = {{ env = \"T\" }}\n"
        );
        assert!(Config::parse(&text).unwrap().validate().is_empty());
    }

    #[test]
    fn json_depth_limit_is_checked() {
        assert_eq!(Config::parse(MINIMAL).unwrap().limits.max_json_depth, 64);
        for (depth, ok) in [(0, false), (1, true), (127, true), (128, false)] {
            let text = format!("{MINIMAL}\n[limits]\nmax_json_depth = {depth}\n");
            let problems = Config::parse(&text).unwrap().validate();
            let keys: Vec<_> = problems.iter().map(|p| p.key.as_str()).collect();
            if ok {
                assert!(keys.is_empty(), "{depth}: {keys:?}");
            } else {
                assert_eq!(keys, vec!["limits.max_json_depth"], "{depth}");
                assert!(problems[0].message.contains("from 1 to 127"));
            }
        }
    }

    #[test]
    fn secret_source_needs_exactly_one() {
        let text = format!("{MINIMAL}\n[auth]\nbearer_token = {{}}\n");
        let problems = Config::parse(&text).unwrap().validate();
        assert_eq!(problems[0].key, "auth.bearer_token");
    }

    #[test]
    fn routes_are_checked() {
        let text = format!(
            "{MINIMAL}\n[[routes]]\nname = \"a\"\nadapter = \"a.jsonata\"\nsink = \"nope\"\nversions = \"3-1\"\n\
             [[routes]]\nname = \"a\"\nadapter = \"b.jsonata\"\nsink = \"files\"\ntypes = []\n\
             [sinks.files]\ntype = \"file\"\ndir = \"out\"\nname = \"{{id}}.json\"\n\
             [report]\nurl = \"ftp://x\"\nsecret = {{ env = \"S\" }}\n"
        );
        let keys: Vec<_> = Config::parse(&text)
            .unwrap()
            .validate()
            .into_iter()
            .map(|p| p.key)
            .collect();
        assert_eq!(
            keys,
            vec![
                "routes[0].versions",
                "routes[0].sink",
                "routes[1].name",
                "routes[1].types",
                "report.url"
            ]
        );
    }

    #[test]
    fn retention_is_in_days_and_bounded() {
        let retention = |days: &str| {
            let text = format!("{MINIMAL}\n[journal]\nretention_days = {days}\n");
            let c = Config::parse(&text).unwrap();
            (c.journal.retention(), c.validate())
        };
        assert_eq!(
            Config::parse(MINIMAL).unwrap().journal.retention(),
            Some(Duration::from_secs(30 * 86_400))
        );
        assert_eq!(retention("7").0, Some(Duration::from_secs(7 * 86_400)));
        assert_eq!(retention("0.5").0, Some(Duration::from_secs(43_200)));
        assert_eq!(retention("0").0, None);
        for bad in ["-1", "1e9", "nan"] {
            let problems = retention(bad).1;
            assert_eq!(problems.len(), 1, "{bad}: {problems:?}");
            assert_eq!(problems[0].key, "journal.retention_days");
        }
    }

    #[test]
    fn every_part_is_parsed_on_its_own_and_every_problem_listed() {
        let text = format!(
            "{MINIMAL}shutdown_grace = 5\n\
             [journal]\nmax_batch = \"many\"\n\
             [limits]\nmax_body_bytes = 0\n\
             [[routes]]\nname = \"a\"\nadapter = \"a.jsonata\"\nsink = \"broken\"\n\
             [[routes]]\nname = \"b\"\nadapter = 7\nsink = \"files\"\n\
             [[routes]]\nname = \"c\"\nadapter = \"c.jsonata\"\nsink = \"nowhere\"\n\
             [sinks.broken]\ntype = \"file\"\ndir = 3\nname = \"{{id}}.json\"\n\
             [sinks.files]\ntype = \"file\"\ndir = \"out\"\nname = \"{{id}}.json\"\nmod = 1\n"
        );
        let parsed = Config::parse_parts(&text).unwrap();
        let mut keys: Vec<_> = parsed.problems.iter().map(|p| p.key.as_str()).collect();
        keys.sort();
        assert_eq!(
            keys,
            vec![
                "journal.max_batch",
                "routes[1].adapter",
                "shutdown_grace",
                "sinks.broken",
                // A sink is a tagged enum: serde names the field in the message, not the path.
                "sinks.files",
            ],
            "{:#?}",
            parsed.problems
        );
        for (key, words) in [
            ("shutdown_grace", "unknown field `shutdown_grace`"),
            ("sinks.files", "unknown field `mod`"),
            ("sinks.broken", "invalid type: integer `3`"),
        ] {
            assert!(
                parsed
                    .problems
                    .iter()
                    .any(|p| p.key == key && p.message.contains(words)),
                "{key}: {:#?}",
                parsed.problems
            );
        }
        // The parts that parsed are there: the checks after parsing still run over them, and
        // say nothing about stand-ins (the default journal, the sink that did not parse and the
        // route that names it, the route that did not parse).
        let mut parsed = parsed;
        let problems = parsed.config.validate();
        parsed.add(problems);
        let keys: Vec<_> = parsed.problems.iter().map(|p| p.key.as_str()).collect();
        assert!(keys.contains(&"limits.max_body_bytes"), "{keys:?}");
        assert!(keys.contains(&"routes[2].sink"), "{keys:?}");
        assert!(!keys.contains(&"routes[0].sink"), "{keys:?}");
        assert!(!keys.contains(&"routes[1].name"), "{keys:?}");
        assert_eq!(parsed.problems.len(), 7, "{:#?}", parsed.problems);
        // Integers are read as written: a u64 above i64::MAX is a valid setting.
        let text = format!("{MINIMAL}[limits]\nmin_free_disk_bytes = 18446744073709551615\n");
        assert_eq!(
            Config::parse(&text).unwrap().limits.min_free_disk_bytes,
            u64::MAX
        );
        // A syntax error leaves nothing to read on.
        let p = Config::parse_parts("agent_id = ").unwrap_err();
        assert_eq!(p.key, "(syntax)");
        let p = Config::parse("state_dir = \"s\"\n").unwrap_err();
        assert_eq!(p.key, "agent_id");
    }

    #[test]
    fn a_secret_comes_from_a_file_a_variable_or_a_systemd_credential() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("hub-hmac"), "  whsec_from_credential\n").unwrap();
        std::fs::write(dir.path().join("file-secret"), "whsec_from_file\n").unwrap();
        let creds = Some(dir.path().as_os_str());
        let source = |text: &str| -> SecretSource { toml::from_str(text).unwrap() };
        let file = format!(
            "file = {:?}",
            dir.path().join("file-secret").display().to_string()
        );
        assert_eq!(
            read_secret_from(&source(&file), None).unwrap(),
            "whsec_from_file"
        );
        // PATH is set wherever the tests run.
        let path = std::env::var("PATH").unwrap();
        assert_eq!(
            read_secret_from(&source("env = \"PATH\""), None).unwrap(),
            path.trim()
        );
        let credential = source("credential = \"hub-hmac\"");
        assert_eq!(
            read_secret_from(&credential, creds).unwrap(),
            "whsec_from_credential"
        );

        // Outside systemd there is no credentials directory.
        for unset in [None, Some(std::ffi::OsStr::new(""))] {
            let e = read_secret_from(&credential, unset).unwrap_err();
            assert!(
                e.contains("CREDENTIALS_DIRECTORY is not set")
                    && e.contains("LoadCredential=")
                    && e.contains("use file = ... outside systemd"),
                "{e}"
            );
        }
        // A credential the unit does not load.
        let e = read_secret_from(&source("credential = \"report\""), creds).unwrap_err();
        assert!(
            e.contains("cannot read credential report")
                && e.contains("LoadCredential=report:/path/to/secret"),
            "{e}"
        );

        // Exactly one source, and a credential is named, not a path.
        for (text, words) in [
            ("", "set one of file"),
            ("file = \"a\"\nenv = \"B\"", "only one of"),
            ("env = \"B\"\ncredential = \"c\"", "only one of"),
            ("credential = \"../etc/shadow\"", "not a credential name"),
            ("credential = \"\"", "not a credential name"),
        ] {
            let e = source(text).check().unwrap_err();
            assert!(e.contains(words), "{text}: {e}");
            assert_eq!(read_secret_from(&source(text), creds).unwrap_err(), e);
        }
        // The same rule holds for a sink's secrets as for the hub's.
        let text = format!(
            "{MINIMAL}\n[auth]\nbearer_token = {{ env = \"T\", credential = \"t\" }}\n\
             [sinks.h]\ntype = \"http\"\nurl = \"http://127.0.0.1:9/x\"\n\
             secret_headers = {{ X-Key = {{ file = \"k\", credential = \"k\" }} }}\n"
        );
        let problems = Config::parse(&text).unwrap().validate();
        let keys: Vec<_> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            vec!["auth.bearer_token", "sinks.h.secret_headers.X-Key"],
            "{problems:#?}"
        );
        assert!(problems.iter().all(|p| p.message.contains("only one of")));
    }

    #[test]
    fn missing_secret_file_is_named() {
        let text = format!("{MINIMAL}\n[[auth.hmac_secrets]]\nfile = \"/nonexistent/secret\"\n");
        let problems = Config::parse(&text).unwrap().load_secrets().unwrap_err();
        assert_eq!(problems[0].key, "auth.hmac_secrets[0]");
        assert!(problems[0].message.contains("/nonexistent/secret"));
    }
}
