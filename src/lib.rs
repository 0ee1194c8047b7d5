//! ess-agent receives Change Events from a Sync Hub, records each one durably before it answers,
//! and applies them to the partner's systems.
//!
//! Code map:
//! - [`settings`]: small shared settings types (problems, secrets, retry, TLS, version ranges)
//!   that depend on nothing else in the crate.
//! - [`protocol`]: the hub's wire contract (envelope, signatures, problem+json), no runtime.
//! - [`config`]: the TOML configuration, its pure validation and the loading of secrets.
//! - [`ingress`]: the HTTPS listener, hub authentication, envelope parsing and the acknowledgement.
//! - [`journal`]: the durable store (SQLite, WAL, group commit) every accepted event is written to.
//! - [`dispatch`]: routes journaled events through adapters to sinks, in order per subject,
//!   with retries and dead letters.
//! - [`adapter`]: the JSONata engine seam and the compiled adapter scripts.
//! - [`sink`]: where adapter output is applied (files, HTTP, MQTT, ...).
//! - [`report`]: status reports to the hub from the journal's outbox.
//! - [`reload`]: hot reload of adapters, routes and sinks (file watch and SIGHUP).
//! - [`admin`]: health, readiness, event status, replay and dead letters on the admin listener.
//! - [`shutdown`]: signal handling and the graceful drain.
//! - [`telemetry`]: Prometheus metrics and systemd notifications (readiness, watchdog).
//! - [`timestamp`]: the one format of a point in time (RFC 3339, UTC, milliseconds).
//! - [`cli`]: the command line (`run`, `validate`, `send`, `adapter eval`).
//! - `fuzzing`: the parsers hostile input reaches, as the fuzz targets in `fuzz/` run them.

pub mod adapter;
pub mod admin;
pub mod agent;
pub mod cli;
pub mod config;
pub mod dispatch;
#[doc(hidden)]
pub mod fuzzing;
pub mod http_client;
pub mod ingress;
pub mod journal;
pub mod protocol;
pub mod reload;
pub mod report;
pub mod settings;
pub mod shutdown;
pub mod sink;
pub mod telemetry;
pub mod timestamp;
