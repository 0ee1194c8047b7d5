//! The journal in PostgreSQL, shared by any number of agents (`journal.backend = "postgres"`).
//!
//! Every agent accepts events: an append is answered only after the COMMIT holding it returned
//! ([`append`], group commit across concurrent requests), and an event id is unique across
//! agents (a redelivery to another agent is a duplicate). The events are applied by partition:
//! a subject belongs to one of a fixed number of partitions ([`partition_of`]), and an agent
//! applies the events of the partitions it holds under a lease it renews ([`lease`]), so the
//! events of one subject are applied by one agent at a time, in order. [`claim`] reads the work
//! of the partitions held, writes final states fenced by the lease, hands out status reports and
//! takes turns at pruning. [`wake`] tells an agent of events committed by any agent. [`query`]
//! holds what the admin API, the CLI and the console read and change (listings, an event's
//! detail, dead letters, replays). [`schema`] creates and migrates the tables, once when
//! several agents start together.
//!
//! Errors are classified by SQLSTATE and error kind, never by message text: everything that
//! means "PostgreSQL cannot be reached or cannot take the write now" is
//! [`PgError::Unavailable`], which ingress answers with 503 and `Retry-After`.

pub mod append;
pub mod claim;
pub mod import;
pub mod journal;
pub mod lease;
pub mod query;
pub mod schema;
pub mod wake;

pub use journal::{PgJournal, PgJournalOptions};

#[cfg(test)]
pub(crate) mod testdb;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgDatabaseError, PgPoolOptions};

/// How long a caller refused with [`PgError::Unavailable`] should wait before trying again (the
/// `Retry-After` of the 503).
pub const RETRY_AFTER: Duration = Duration::from_secs(5);

/// Settings of the PostgreSQL journal.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// The database, `postgres://user@host:5432/db`.
    pub url: String,
    /// The schema holding the journal's tables (it must exist); `None` uses the user's
    /// `search_path` (normally `public`).
    pub schema: Option<String>,
    /// Connections the agent keeps at most (appends use one at a time, the rest serve reads,
    /// leases and final states). Default 8.
    pub max_connections: u32,
    /// How long a request waits for a connection (or a new connection for its handshake)
    /// before it is refused as unavailable. Default 5 s.
    pub connect_timeout: Duration,
    /// Longest a statement may run before PostgreSQL cancels it. Default 30 s.
    pub statement_timeout: Duration,
    /// The number of partitions subjects are spread over, used only when the schema is
    /// created: afterwards the count stored in the schema holds. Default 64.
    pub partitions: u32,
    /// The takeover bound: a dead agent's partitions are applied by another agent within this
    /// long (see [`lease`]). Default 30 s.
    pub lease: Duration,
    /// Most appends one transaction carries. Default 512.
    pub max_batch: usize,
    /// The password, when the URL's user needs one.
    pub password: Option<String>,
    /// TLS to PostgreSQL; `None` does what the URL says (`sslmode`), else `verify_full` when
    /// `ca_pem` is set, else `prefer`.
    pub tls: Option<crate::settings::database::TlsMode>,
    /// PEM CA certificate(s) the server's certificate must chain to.
    pub ca_pem: Option<Vec<u8>>,
}

impl Default for PgOptions {
    fn default() -> Self {
        Self {
            url: "postgres://ess@localhost:5432/ess".into(),
            schema: None,
            max_connections: 8,
            connect_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(30),
            partitions: 64,
            lease: Duration::from_secs(30),
            max_batch: 512,
            password: None,
            tls: None,
            ca_pem: None,
        }
    }
}

/// Why the PostgreSQL journal could not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PgError {
    /// PostgreSQL cannot be reached or cannot take the write now (connection refused or lost,
    /// no connection within the timeout, the server shutting down or starting, out of
    /// resources, a read-only standby, a conflict that persisted after a retry). Nothing was
    /// stored, or it is unknown whether the last COMMIT was: the hub delivers again and gets a
    /// duplicate in that case. Ingress answers 503 with `Retry-After`.
    #[error(
        "cannot reach the journal's PostgreSQL at {at} while {doing}: {detail}; is it running and reachable?"
    )]
    Unavailable {
        at: String,
        doing: &'static str,
        detail: String,
    },
    /// The lease of the partition moved to another agent (or was given back): the state change
    /// was not written, and this agent must stop applying the partition's events.
    #[error(
        "journal partition {part} is no longer held by this agent under epoch {epoch}: the \
         change was not written; the agent that holds it now applies its events"
    )]
    LeaseLost { part: i32, epoch: i64 },
    /// PostgreSQL refused the statement for a reason that waiting does not cure (a missing
    /// table or permission, a constraint): a misconfiguration or a defect.
    #[error(
        "the journal's PostgreSQL at {at} refused {doing}: {message} (SQLSTATE {code}); check \
         that the journal's user owns the schema and that every agent runs the same version"
    )]
    Refused {
        at: String,
        doing: &'static str,
        code: String,
        message: String,
    },
    /// The configured schema does not exist.
    #[error(
        "the journal's schema {schema:?} does not exist in the PostgreSQL database at {at}: \
         create it (CREATE SCHEMA {schema}) or set journal.schema to an existing one"
    )]
    NoSchema { at: String, schema: String },
    /// The schema was migrated by a newer agent.
    #[error(
        "the journal's PostgreSQL schema has version {found} but this agent supports up to \
         {supported}: run the version of the agent that the other agents run"
    )]
    SchemaTooNew { found: i64, supported: i64 },
    /// The settings are not usable (the URL, the schema's name).
    #[error("the journal's PostgreSQL settings are invalid: {0}")]
    Config(String),
    /// A stored row does not read back as the agent wrote it.
    #[error(
        "a journal row cannot be read ({0}): the database was changed by hand, or by a newer agent"
    )]
    Decode(String),
    /// The appender has stopped (the agent is shutting down).
    #[error("the journal is closed")]
    Closed,
}

impl PgError {
    /// True for the errors that go away by waiting (503 + `Retry-After`).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, PgError::Unavailable { .. })
    }
}

/// True for the SQLSTATEs that mean "not now" rather than "never": connection exceptions (08),
/// transaction rollbacks (40: serialization failure, deadlock), insufficient resources (53),
/// object not in prerequisite state (55: lock not available), operator intervention (57: admin
/// shutdown, crash shutdown, cannot connect now, query canceled by the statement timeout),
/// system errors (58), internal errors (XX), and a write on a read-only standby (25006: a
/// failover in progress).
pub(crate) fn transient_sqlstate(code: &str) -> bool {
    code == "25006"
        || matches!(
            code.get(..2).unwrap_or(""),
            "08" | "40" | "53" | "55" | "57" | "58" | "XX"
        )
}

/// True for a serialization failure or a deadlock: the transaction may succeed when run again.
pub(crate) fn retry_sqlstate(code: &str) -> bool {
    code == "40001" || code == "40P01"
}

/// The SQLSTATE of a database error.
pub(crate) fn sqlstate(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(d) => d
            .try_downcast_ref::<PgDatabaseError>()
            .map(|pg| pg.code().to_owned()),
        _ => None,
    }
}

/// The PostgreSQL journal's connection pool and what every part of it needs to know.
#[derive(Debug, Clone)]
pub struct PgDb {
    pool: PgPool,
    /// `host:port/database`, for messages.
    at: Arc<str>,
    schema: Option<String>,
}

impl PgDb {
    /// A bounded pool that connects when first used (so an agent starts while PostgreSQL is
    /// down, and answers 503 until it is up). Every connection uses `options.schema`.
    /// Call it within the async runtime (the pool's maintenance task is spawned on it).
    pub fn new(options: &PgOptions) -> Result<PgDb, PgError> {
        if !(options.url.starts_with("postgres://") || options.url.starts_with("postgresql://")) {
            return Err(PgError::Config(
                "journal.url must start with postgres:// (postgres://ess@db.example:5432/ess)"
                    .into(),
            ));
        }
        let mut connect = PgConnectOptions::from_str(&options.url).map_err(|e| {
            PgError::Config(format!(
                "journal.url is not a PostgreSQL URL ({}): write it like \
                 postgres://ess@db.example:5432/ess",
                redact_url_error(&e)
            ))
        })?;
        let mut startup = vec![(
            "statement_timeout",
            options.statement_timeout.as_millis().to_string(),
        )];
        if let Some(schema) = &options.schema {
            if !valid_schema_name(schema) {
                return Err(PgError::Config(format!(
                    "journal.schema {schema:?} is not a plain name: use lower-case letters, \
                     digits and _, starting with a letter or _"
                )));
            }
            startup.push(("search_path", schema.clone()));
        }
        connect = connect.application_name("ess-agent").options(startup);
        if let Some(password) = &options.password {
            connect = connect.password(password);
        }
        let tls = options.tls.or(options
            .ca_pem
            .as_ref()
            .map(|_| crate::settings::database::TlsMode::VerifyFull));
        if let Some(mode) = tls {
            use crate::settings::database::TlsMode;
            use sqlx::postgres::PgSslMode;
            connect = connect.ssl_mode(match mode {
                TlsMode::Disable => PgSslMode::Disable,
                TlsMode::Prefer => PgSslMode::Prefer,
                TlsMode::Require => PgSslMode::Require,
                TlsMode::VerifyCa => PgSslMode::VerifyCa,
                TlsMode::VerifyFull => PgSslMode::VerifyFull,
            });
        }
        if let Some(pem) = &options.ca_pem {
            connect = connect.ssl_root_cert_from_pem(pem.clone());
        }
        let at = format!(
            "{}:{}/{}",
            connect.get_host(),
            connect.get_port(),
            connect.get_database().unwrap_or("")
        );
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections.max(2))
            .min_connections(0)
            .acquire_timeout(options.connect_timeout)
            .idle_timeout(Duration::from_secs(300))
            .max_lifetime(Duration::from_secs(1800))
            .test_before_acquire(true)
            .connect_lazy_with(connect);
        Ok(PgDb {
            pool,
            at: at.into(),
            schema: options.schema.clone(),
        })
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// `host:port/database`.
    pub fn at(&self) -> &str {
        &self.at
    }

    /// Classifies an error of `doing` (a fragment such as "appending events"): by error kind
    /// and SQLSTATE, never by message text.
    pub fn error(&self, e: sqlx::Error, doing: &'static str) -> PgError {
        let at = self.at.to_string();
        let unavailable = |detail: String| PgError::Unavailable {
            at: at.clone(),
            doing,
            detail,
        };
        match e {
            sqlx::Error::Database(d) => {
                let Some(pg) = d.try_downcast_ref::<PgDatabaseError>() else {
                    return unavailable(d.to_string());
                };
                let code = pg.code().to_owned();
                if transient_sqlstate(&code) {
                    unavailable(format!("{} (SQLSTATE {code})", pg.message()))
                } else {
                    PgError::Refused {
                        at,
                        doing,
                        message: pg.message().to_owned(),
                        code,
                    }
                }
            }
            sqlx::Error::Io(io) => unavailable(io.to_string()),
            sqlx::Error::Tls(t) => unavailable(format!("TLS failed: {t}")),
            sqlx::Error::PoolTimedOut => unavailable(format!(
                "no connection within the connect timeout ({} max connections in use or none \
                 could be opened)",
                self.pool.options().get_max_connections()
            )),
            sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => PgError::Closed,
            sqlx::Error::Protocol(p) => unavailable(format!("the connection broke: {p}")),
            sqlx::Error::BeginFailed => unavailable("the transaction did not begin".into()),
            sqlx::Error::Configuration(c) => PgError::Config(c.to_string()),
            sqlx::Error::Decode(_)
            | sqlx::Error::ColumnDecode { .. }
            | sqlx::Error::ColumnNotFound(_)
            | sqlx::Error::ColumnIndexOutOfBounds { .. }
            | sqlx::Error::TypeNotFound { .. } => PgError::Decode(e.to_string()),
            other => unavailable(other.to_string()),
        }
    }

    /// Closes the pool: waits for the connections in use to come back.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// What is wrong with a URL, without the URL (it may hold a password): URL parse errors name
/// what is wrong, never the input.
fn redact_url_error(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Configuration(inner) => inner.to_string(),
        _ => "invalid".into(),
    }
}

/// A schema name the journal accepts: an unquoted PostgreSQL identifier in lower case.
fn valid_schema_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 63
}

/// The partition of `subject` among `partitions`: the 64-bit FNV-1a hash of its UTF-8 bytes,
/// modulo the count. Every agent must compute the same partition for a subject, so this
/// function never changes (a test pins its values).
pub fn partition_of(subject: &str, partitions: u32) -> i32 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = subject
        .bytes()
        .fold(OFFSET, |h, b| (h ^ u64::from(b)).wrapping_mul(PRIME));
    (hash % u64::from(partitions.max(1))) as i32
}

/// What a state change carries to prove that its writer still holds the event's partition:
/// the partition, the agent and the epoch it took the partition under. A change whose fence is
/// not the partition's current one is refused with [`PgError::LeaseLost`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub part: i32,
    pub owner: String,
    pub epoch: i64,
}

/// A fresh id for an agent: its host name, process id and a random part, so that a restarted
/// agent never inherits the leases of its previous life.
pub fn agent_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    format!(
        "{}-{}-{:08x}",
        if host.is_empty() { "agent" } else { &host },
        std::process::id(),
        rand::random::<u32>()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_partition_of_a_subject_never_changes() {
        // Pinned: every agent, of every version, must agree on these.
        assert_eq!(partition_of("", 64), (0xcbf2_9ce4_8422_2325u64 % 64) as i32);
        assert_eq!(
            partition_of("a", u32::MAX),
            (0xaf63_dc4c_8601_ec8cu64 % u64::from(u32::MAX)) as i32
        );
        assert_eq!(
            partition_of("RULE-COURT-DEADLINE", 64),
            partition_of("RULE-COURT-DEADLINE", 64)
        );
        let spread: std::collections::HashSet<i32> = (0..1000)
            .map(|i| partition_of(&format!("S{i}"), 16))
            .collect();
        assert_eq!(spread.len(), 16, "1,000 subjects reach every partition");
        assert_eq!(partition_of("anything", 0), 0);
    }

    #[test]
    fn errors_are_classified_by_sqlstate() {
        for code in [
            "08006", "57P01", "57P03", "53300", "40001", "40P01", "55P03", "25006", "57014",
        ] {
            assert!(transient_sqlstate(code), "{code}");
        }
        for code in ["42P01", "23505", "42501", "22P02"] {
            assert!(!transient_sqlstate(code), "{code}");
        }
        assert!(valid_schema_name("ess_journal_2"));
        assert!(!valid_schema_name("Ess"));
        assert!(!valid_schema_name("a b"));
        assert!(!valid_schema_name("1a"));
        assert!(!valid_schema_name(""));
    }

    #[tokio::test]
    async fn a_bad_url_or_schema_is_refused_before_connecting() {
        let e = PgDb::new(&PgOptions {
            url: "mysql://x".into(),
            ..PgOptions::default()
        })
        .unwrap_err();
        assert!(matches!(e, PgError::Config(_)), "{e}");
        assert!(e.to_string().contains("journal.url"), "{e}");
        let e = PgDb::new(&PgOptions {
            schema: Some("x; drop".into()),
            ..PgOptions::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("journal.schema"), "{e}");
    }
}
