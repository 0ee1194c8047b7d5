//! The `sql` sink: writes adapter output into PostgreSQL, MariaDB/MySQL or SQLite, exactly once
//! (PROTOCOL.md §3).
//!
//! # What is written
//!
//! Either a configured **statement** with named parameters (`:deadline`), bound from the fields of
//! the output object, or a **table** with key columns, for which the sink generates the dialect's
//! upsert from the output object's fields (and a delete when `delete_when` holds). An array output
//! writes once per element. Values are always bound, never spliced into SQL text, and the
//! identifiers the sink writes itself (table, key and column names) must be plain identifiers and
//! are quoted: see [`statement`] and [`value`].
//!
//! # Exactly once
//!
//! In the transaction that writes an event's output, the sink also inserts the pair (event id,
//! route) into the ledger table. When the pair is already there, the event was applied before (a
//! retry after a lost answer to COMMIT, or a crash before the journal recorded the apply): nothing
//! more is written and the apply reports success. Output and ledger row commit together or not at
//! all, so each event's output is in the database exactly once.
//!
//! # Batching
//!
//! The dispatcher calls `apply` once per event, with events of different subjects in flight at
//! the same time. `apply` checks the output and binds it (a missing field fails here, before any
//! database work), then hands it to the sink's workers, one per pooled connection. A worker takes
//! up to `max_batch` events, waiting at most `max_linger_ms` for more after the first, and applies
//! them in one transaction. Per-subject order holds because the dispatcher never has two events of
//! one subject in flight. When one event of a batch fails permanently (a constraint, a type), the
//! transaction is rolled back, that event alone gets the error, and the others are applied again
//! without it. A failure of the transaction as a whole (the connection, a deadlock) fails the
//! batch as retryable.
//!
//! # Error classification
//!
//! By SQLSTATE or error number, never by message text:
//!
//! - **Retryable**: connection and network errors, TLS failures, pool and client-side timeouts;
//!   PostgreSQL classes 08 (connection), 40 (serialization failure, deadlock), 53 (insufficient
//!   resources), 55 (lock not available), 57 (operator intervention, statement timeout), 58 (system
//!   error) and XX (internal); MariaDB/MySQL deadlock (1213), lock wait timeout (1205), statement
//!   time limits (1969, 3024), interrupted or killed queries and connections, shutdown, full disk
//!   or memory, read-only mode, and SQLSTATE classes 08 and 40; SQLite busy, locked, interrupted
//!   (the statement timeout), I/O, full disk, out of memory and cannot-open.
//! - **Permanent** (a dead letter with the database's message): everything else, notably
//!   constraint violations (23), data and type errors (22), syntax errors, unknown tables and
//!   columns and missing permissions (42), authentication failures (28), and values the sink
//!   cannot bind to the type the database needs.

mod batch;
mod config;
mod error;
mod mysql;
mod plan;
mod postgres;
mod server;
mod sqlite;
mod statement;
#[cfg(test)]
mod tests;
pub mod value;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde_json::Value;
use sqlx::Postgres;
use sqlx::mysql::MySqlConnectOptions;
use sqlx::postgres::PgConnectOptions;
use tokio::sync::{mpsc, oneshot};

use super::{EventMeta, Sink, SinkError};
use crate::settings::read_secret;
use batch::{Job, worker};
use config::*;
pub use config::{SqlConfig, TlsMode};
use plan::Mode;
use server::{Reach, connect_options};
pub use statement::Dialect;
use statement::{LedgerSql, TableName};
use value::MyColumn;

/// Where the database is and how to reach it.
#[derive(Clone)]
enum Connector {
    Postgres(PgConnectOptions),
    MySql(MySqlConnectOptions),
    Sqlite(PathBuf),
}

/// An open pool (or SQLite connection).
enum Backend {
    Postgres(sqlx::PgPool),
    MySql(sqlx::MySqlPool),
    Sqlite(Arc<Mutex<Option<rusqlite::Connection>>>),
}

/// What the sink's workers share.
struct Shared {
    dialect: Dialect,
    mode: Mode,
    ledger: TableName,
    ledger_sql: LedgerSql,
    create_ledger: bool,
    max_batch: usize,
    linger: Duration,
    workers: usize,
    connect_timeout: Duration,
    statement_timeout: Duration,
    healthcheck: bool,
    connector: Connector,
    /// Where the database is, for messages (never a password).
    shown: String,
    backend: OnceLock<Backend>,
    /// Set once the ledger table is known to exist.
    ledger_ready: tokio::sync::OnceCell<()>,
    /// MariaDB/MySQL table mode: column name → how it takes values, per table.
    my_columns: Mutex<HashMap<String, Arc<HashMap<String, MyColumn>>>>,
}

/// The `sql` sink.
pub struct SqlSink {
    shared: Arc<Shared>,
    engine: OnceLock<Result<Engine, String>>,
}

/// The sink's own threads: a runtime of its own that runs the workers and owns the pool.
///
/// Database round trips are latency-bound: a worker waiting for the server's answer should run
/// the moment it arrives, not after the dispatcher's hundreds of tasks queued on the agent's
/// runtime. Threads of their own get that from the kernel's scheduler. There is one per
/// connection up to one per CPU: on one thread, the client side of every connection's round
/// trips (encoding, TLS, the socket writes) waited for each other.
struct Engine {
    queue: mpsc::UnboundedSender<Job>,
    handle: tokio::runtime::Handle,
}

impl std::fmt::Debug for SqlSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlSink")
            .field("database", &self.shared.dialect.name())
            .field("at", &self.shared.shown)
            .finish_non_exhaustive()
    }
}

/// Extra statement-cache room for the ledger statements of every batch size.
fn cache_capacity(max_batch: usize) -> usize {
    100 + 2 * max_batch
}

impl SqlSink {
    /// Builds the sink: reads secrets and the CA file, parses the URL, the statement and
    /// `delete_when`. Opens no connection (the pool is created on the first apply).
    pub fn new(config: &SqlConfig) -> Result<SqlSink, String> {
        let url = match (&config.url, &config.url_secret) {
            (Some(url), None) => url.clone(),
            (None, Some(source)) => read_secret(source).map_err(|e| format!("url_secret: {e}"))?,
            _ => return Err("url: set exactly one of url and url_secret".into()),
        };
        // Messages about a secret URL must not repeat it.
        let field = if config.url.is_some() {
            "url"
        } else {
            "url_secret"
        };
        let dialect = dialect_of(&url).map_err(|e| format!("{field}: {e}"))?;
        if config.url.is_some() && dialect != Dialect::Sqlite {
            check_plain_url(&url).map_err(|e| format!("url: {e}"))?;
        }
        let password = config
            .password
            .as_ref()
            .map(read_secret)
            .transpose()
            .map_err(|e| format!("password: {e}"))?;
        let ca = config
            .ca_file
            .as_ref()
            .map(|path| {
                std::fs::read(path)
                    .map_err(|e| format!("ca_file: cannot read {}: {e}", path.display()))
            })
            .transpose()?;
        let statement_timeout = Duration::from_millis(config.statement_timeout_ms.max(1));
        let reach = Reach {
            url: &url,
            field,
            password: password.as_deref(),
            ca: ca.as_deref(),
            config,
            statement_timeout,
        };
        let workers = config.max_connections.max(1) as usize;
        let (connector, shown, workers) = match dialect {
            Dialect::Postgres => {
                let (options, shown) = connect_options(&reach)?;
                (Connector::Postgres(options), shown, workers)
            }
            Dialect::MySql => {
                let (options, shown) = connect_options(&reach)?;
                (Connector::MySql(options), shown, workers)
            }
            Dialect::Sqlite => {
                if password.is_some() {
                    return Err("password: SQLite has no passwords: remove it".into());
                }
                let path = sqlite_path(&url).map_err(|e| format!("{field}: {e}"))?;
                let shown = path.display().to_string();
                // SQLite has one writer: more connections would only wait for each other.
                (Connector::Sqlite(path), shown, 1)
            }
        };
        let mode = Mode::new(config, dialect)?;
        let ledger =
            TableName::parse(&config.ledger_table).map_err(|e| format!("ledger_table: {e}"))?;
        Ok(SqlSink {
            shared: Arc::new(Shared {
                dialect,
                mode,
                ledger_sql: LedgerSql::new(dialect, &ledger),
                ledger,
                create_ledger: config.create_ledger,
                max_batch: config.max_batch.max(1),
                linger: Duration::from_millis(config.max_linger_ms),
                workers,
                connect_timeout: Duration::from_millis(config.connect_timeout_ms.max(1)),
                statement_timeout,
                healthcheck: config.healthcheck,
                connector,
                shown,
                backend: OnceLock::new(),
                ledger_ready: tokio::sync::OnceCell::new(),
                my_columns: Mutex::new(HashMap::new()),
            }),
            engine: OnceLock::new(),
        })
    }

    /// The sink's threads, started on first use. They end when the sink is dropped (its queue
    /// closes).
    fn engine(&self) -> Result<&Engine, SinkError> {
        self.engine
            .get_or_init(|| {
                let (queue, rx) = mpsc::unbounded_channel::<Job>();
                let (handle_tx, handle_rx) = std::sync::mpsc::channel();
                let shared = self.shared.clone();
                std::thread::Builder::new()
                    .name("sql-sink".into())
                    .spawn(move || {
                        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
                        let runtime = match tokio::runtime::Builder::new_multi_thread()
                            .worker_threads(shared.workers.clamp(1, cpus))
                            .thread_name("sql-sink")
                            .enable_all()
                            .build()
                        {
                            Ok(runtime) => runtime,
                            Err(e) => {
                                let _ = handle_tx.send(Err(e.to_string()));
                                return;
                            }
                        };
                        let _ = handle_tx.send(Ok(runtime.handle().clone()));
                        // Unbounded is bounded in practice: the dispatcher has at most
                        // `dispatch.max_parallel` applies in flight.
                        let rx = Arc::new(tokio::sync::Mutex::new(rx));
                        runtime.block_on(async move {
                            let mut workers = tokio::task::JoinSet::new();
                            for _ in 0..shared.workers {
                                workers.spawn(worker(shared.clone(), rx.clone()));
                            }
                            while workers.join_next().await.is_some() {}
                        });
                    })
                    .map_err(|e| format!("cannot start the sink's thread: {e}"))?;
                let handle = handle_rx
                    .recv()
                    .map_err(|_| "the sink's thread did not start".to_string())??;
                Ok(Engine { queue, handle })
            })
            .as_ref()
            .map_err(|e| SinkError::Retryable(e.clone()))
    }
}

#[async_trait::async_trait]
impl Sink for SqlSink {
    async fn apply(&self, event: &EventMeta, output: &Value) -> Result<(), SinkError> {
        if event.route.chars().count() > statement::LEDGER_ID_CHARS {
            return Err(SinkError::Permanent(format!(
                "the route name is longer than {} characters, which the ledger cannot hold: \
                 shorten it",
                statement::LEDGER_ID_CHARS
            )));
        }
        let ops = if matches!(
            &self.shared.mode,
            Mode::Table {
                delete_when: Some(_),
                ..
            }
        ) {
            // JSONata runs off the async threads.
            let shared = self.shared.clone();
            let output = output.clone();
            tokio::task::spawn_blocking(move || shared.plan(&output))
                .await
                .map_err(|e| SinkError::Retryable(format!("the planning task failed: {e}")))??
        } else {
            self.shared.plan(output)?
        };
        if ops.is_empty() {
            return Ok(());
        }
        let (reply, answer) = oneshot::channel();
        let job = Job {
            id: event.id.clone(),
            route: event.route.clone(),
            ops,
            reply,
        };
        self.engine()?.queue.send(job).map_err(|_| {
            SinkError::Retryable("the sink's workers have stopped (shutting down)".into())
        })?;
        answer.await.unwrap_or_else(|_| {
            Err(SinkError::Retryable(
                "the sink's worker stopped before answering (shutting down)".into(),
            ))
        })
    }

    async fn healthcheck(&self) -> Result<(), SinkError> {
        if !self.shared.healthcheck {
            return Ok(());
        }
        let shared = self.shared.clone();
        self.engine()?
            .handle
            .spawn(async move { shared.select_one().await })
            .await
            .unwrap_or_else(|e| {
                Err(SinkError::Retryable(format!(
                    "the healthcheck task failed: {e}"
                )))
            })
    }
}

impl Shared {
    fn backend(&self) -> &Backend {
        self.backend.get_or_init(|| match &self.connector {
            Connector::Postgres(options) => Backend::Postgres(
                self.pool_options::<Postgres>()
                    .connect_lazy_with(options.clone()),
            ),
            Connector::MySql(options) => Backend::MySql(self.my_pool(options)),
            Connector::Sqlite(_) => Backend::Sqlite(Arc::new(Mutex::new(None))),
        })
    }
}
