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

mod config;

mod statement;
pub mod value;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde_json::{Map, Value};
use sqlx::mysql::{MySqlConnectOptions, MySqlDatabaseError, MySqlPoolOptions, MySqlSslMode};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgDatabaseError, PgPoolOptions, PgSslMode};
use sqlx::{
    Arguments as _, AssertSqlSafe, Connection as _, Either, Executor as _, MySql, Postgres,
    Row as _, SqlSafeStr as _, Statement as _,
};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, timeout};

use super::{EventMeta, Sink, SinkError};
use crate::adapter::engine::{Expression, Limits};
use crate::settings::read_secret;
pub use config::SqlConfig;
use config::*;
pub use statement::Dialect;
use statement::{LedgerSql, Statement, TableName, check_identifier, parse_statement};
use value::{MyColumn, MyParam};

/// What the sink writes.
#[derive(Debug)]
pub(super) enum Mode {
    Statement {
        statement: Statement,
        /// The statement's text and each bind's label (`:deadline`), made once and shared by
        /// every operation.
        sql: Arc<str>,
        labels: Vec<Arc<str>>,
    },
    Table {
        table: TableName,
        key: Vec<String>,
        delete_when: Option<Expression>,
    },
}

impl Mode {
    fn new(config: &SqlConfig, dialect: Dialect) -> Result<Mode, String> {
        match (&config.statement, &config.table) {
            (Some(text), None) => parse_statement(text, dialect)
                .map(|statement| Mode::Statement {
                    sql: Arc::from(statement.sql.as_str()),
                    labels: statement
                        .binds
                        .iter()
                        .map(|name| Arc::from(format!(":{name}")))
                        .collect(),
                    statement,
                })
                .map_err(|e| format!("statement: {e}")),
            (None, Some(table)) => {
                let table = TableName::parse(table).map_err(|e| format!("table: {e}"))?;
                if config.key.is_empty() {
                    return Err("key: is required with table".into());
                }
                for column in &config.key {
                    check_identifier(column).map_err(|e| format!("key: {e}"))?;
                }
                let delete_when = config
                    .delete_when
                    .as_deref()
                    .map(|p| {
                        Expression::compile(p).map_err(|e| {
                            format!(
                                "delete_when: does not compile: {}",
                                e.render("delete_when", p)
                            )
                        })
                    })
                    .transpose()?;
                Ok(Mode::Table {
                    table,
                    key: config.key.clone(),
                    delete_when,
                })
            }
            _ => Err("statement: set exactly one of statement and table".into()),
        }
    }
}

/// The records of an output: each element of an array (with its index), else the output.
pub(super) fn records(output: &Value) -> Vec<(Option<usize>, &Value)> {
    match output {
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, v)| (Some(i), v))
            .collect(),
        other => vec![(None, other)],
    }
}

fn record_name(index: Option<usize>) -> String {
    match index {
        Some(i) => format!("record {i} of the output"),
        None => "the output".into(),
    }
}

pub(super) fn not_an_object(index: Option<usize>, record: &Value) -> String {
    format!(
        "{} is {}: the sql sink binds fields of an object, so the adapter must return an object \
         or an array of objects",
        record_name(index),
        value::kind(record)
    )
}

pub(super) fn missing_field(index: Option<usize>, field: &str, used_as: &str) -> String {
    format!(
        "field {field:?} (bound to {used_as}) is missing from {}: make the adapter return it, \
         or null for NULL",
        record_name(index)
    )
}

/// The columns of a table-mode record, checked: plain names, key columns present and not null.
pub(super) fn table_columns<'a>(
    index: Option<usize>,
    object: &'a Map<String, Value>,
    key: &[String],
) -> Result<Vec<&'a str>, String> {
    for column in key {
        match object.get(column) {
            None => return Err(missing_field(index, column, "key column")),
            Some(Value::Null) => {
                return Err(format!(
                    "key column {column:?} is null in {}: every key column needs a value",
                    record_name(index)
                ));
            }
            Some(_) => {}
        }
    }
    let mut columns = Vec::with_capacity(object.len());
    for name in object.keys() {
        check_identifier(name).map_err(|e| {
            format!(
                "field {e} in {}; it cannot be a column name: rename it in the adapter",
                record_name(index)
            )
        })?;
        columns.push(name.as_str());
    }
    Ok(columns)
}

// ---------------------------------------------------------------------------------------------
// The sink

/// One statement to run for an event, with the values to bind in placeholder order.
#[derive(Debug, Clone)]
struct Op {
    sql: Arc<str>,
    binds: Vec<Bind>,
    /// Table mode: the table, so that MariaDB/MySQL values can follow the column types.
    table: Option<TableName>,
    /// Which record of the output this is, for messages.
    record: Option<usize>,
}

#[derive(Debug, Clone)]
struct Bind {
    /// `:deadline` (statement mode) or `column deadline` (table mode), for messages.
    label: Arc<str>,
    /// Table mode: the column.
    column: Option<String>,
    value: Value,
}

/// An event waiting for a worker.
struct Job {
    id: String,
    route: String,
    ops: Vec<Op>,
    reply: oneshot::Sender<Result<(), SinkError>>,
}

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
        let (connector, shown, workers) = match dialect {
            Dialect::Postgres => {
                let mut options = PgConnectOptions::from_str(&url).map_err(|e| {
                    format!("{field}: not a PostgreSQL URL ({}): write it like postgres://ess@db.example:5432/rules", redact_error(&e))
                })?;
                if let Some(password) = &password {
                    options = options.password(password);
                }
                if let Some(mode) = config.tls {
                    options = options.ssl_mode(match mode {
                        TlsMode::Disable => PgSslMode::Disable,
                        TlsMode::Prefer => PgSslMode::Prefer,
                        TlsMode::Require => PgSslMode::Require,
                        TlsMode::VerifyCa => PgSslMode::VerifyCa,
                        TlsMode::VerifyFull => PgSslMode::VerifyFull,
                    });
                } else if ca.is_some() {
                    options = options.ssl_mode(PgSslMode::VerifyFull);
                }
                if let Some(ca) = &ca {
                    options = options.ssl_root_cert_from_pem(ca.clone());
                }
                options = options
                    .application_name("ess-agent")
                    .statement_cache_capacity(cache_capacity(config.max_batch))
                    .options([(
                        "statement_timeout",
                        format!("{}", statement_timeout.as_millis()),
                    )]);
                let shown = format!(
                    "{}:{}/{}",
                    options.get_host(),
                    options.get_port(),
                    options.get_database().unwrap_or("")
                );
                (
                    Connector::Postgres(options),
                    shown,
                    config.max_connections.max(1) as usize,
                )
            }
            Dialect::MySql => {
                let mut options = MySqlConnectOptions::from_str(&url).map_err(|e| {
                    format!("{field}: not a MariaDB/MySQL URL ({}): write it like mysql://ess@db.example:3306/rules", redact_error(&e))
                })?;
                if let Some(password) = &password {
                    options = options.password(password);
                }
                if let Some(mode) = config.tls {
                    options = options.ssl_mode(match mode {
                        TlsMode::Disable => MySqlSslMode::Disabled,
                        TlsMode::Prefer => MySqlSslMode::Preferred,
                        TlsMode::Require => MySqlSslMode::Required,
                        TlsMode::VerifyCa => MySqlSslMode::VerifyCa,
                        TlsMode::VerifyFull => MySqlSslMode::VerifyIdentity,
                    });
                } else if ca.is_some() {
                    options = options.ssl_mode(MySqlSslMode::VerifyIdentity);
                }
                if let Some(ca) = &ca {
                    options = options.ssl_ca_from_pem(ca.clone());
                }
                // The server's own SQL mode: a partner's statements mean what they mean in
                // their other clients (`||` stays OR unless the server says otherwise).
                options = options
                    .pipes_as_concat(false)
                    .statement_cache_capacity(cache_capacity(config.max_batch));
                let shown = format!(
                    "{}:{}/{}",
                    options.get_host(),
                    options.get_port(),
                    options.get_database().unwrap_or("")
                );
                (
                    Connector::MySql(options),
                    shown,
                    config.max_connections.max(1) as usize,
                )
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

impl Shared {
    /// The statements for one event's output. Pure, apart from evaluating `delete_when`.
    fn plan(&self, output: &Value) -> Result<Vec<Op>, SinkError> {
        let shared = self;
        let mut ops = Vec::new();
        for (index, record) in records(output) {
            let Some(object) = record.as_object() else {
                return Err(SinkError::Permanent(not_an_object(index, record)));
            };
            match &shared.mode {
                Mode::Statement {
                    statement,
                    sql,
                    labels,
                } => {
                    let binds = statement
                        .binds
                        .iter()
                        .zip(labels)
                        .map(|(name, label)| match object.get(name) {
                            Some(value) => Ok(Bind {
                                label: label.clone(),
                                column: None,
                                value: value.clone(),
                            }),
                            None => Err(SinkError::Permanent(missing_field(index, name, label))),
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    ops.push(Op {
                        sql: sql.clone(),
                        binds,
                        table: None,
                        record: index,
                    });
                }
                Mode::Table {
                    table,
                    key,
                    delete_when,
                } => {
                    let columns =
                        table_columns(index, object, key).map_err(SinkError::Permanent)?;
                    let delete = match delete_when {
                        Some(predicate) => deletes(predicate, record, index)?,
                        None => false,
                    };
                    let bind = |column: &str| Bind {
                        label: Arc::from(format!("column {column}")),
                        column: Some(column.to_string()),
                        value: object.get(column).cloned().unwrap_or(Value::Null),
                    };
                    let (sql, binds) = if delete {
                        (
                            statement::delete(shared.dialect, table, key),
                            key.iter().map(|k| bind(k)).collect(),
                        )
                    } else {
                        (
                            statement::upsert(shared.dialect, table, &columns, key),
                            columns.iter().map(|c| bind(c)).collect(),
                        )
                    };
                    ops.push(Op {
                        sql: Arc::from(sql),
                        binds,
                        table: Some(table.clone()),
                        record: index,
                    });
                }
            }
        }
        Ok(ops)
    }
}

/// True when `delete_when` holds for the record.
fn deletes(
    predicate: &Expression,
    record: &Value,
    index: Option<usize>,
) -> Result<bool, SinkError> {
    match predicate.evaluate(record, &Map::new(), &Limits::default()) {
        Ok(Some(Value::Bool(b))) => Ok(b),
        Ok(None) | Ok(Some(Value::Null)) => Ok(false),
        Ok(Some(other)) => Err(SinkError::Permanent(format!(
            "delete_when returned {} for {}: it must return true or false",
            value::kind(&other),
            record_name(index)
        ))),
        Err(e) => Err(SinkError::Permanent(format!(
            "delete_when failed on {}: {}",
            record_name(index),
            e.render("delete_when", predicate.source())
        ))),
    }
}

/// An error's text without anything that could be a password.
fn redact_error(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Configuration(inner) => {
            // URL parse errors name what is wrong, never the input.
            inner.to_string()
        }
        _ => "invalid".into(),
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

// ---------------------------------------------------------------------------------------------
// Workers and batches

/// Takes batches off the queue and applies them, until the sink is dropped.
/// Closes the connection of an attempt that left it unusable (see `Failure::poisoned`) instead
/// of giving it back to the pool; the same for every database.
fn close_if_poisoned<DB: sqlx::Database>(conn: &mut PoolConnection<DB>, attempt: &Attempt) {
    let poisoned = match attempt {
        Attempt::Committed(_) => false,
        Attempt::EventFailed(_, f) | Attempt::Failed(f) => f.poisoned,
    };
    if poisoned {
        conn.close_on_drop();
    }
}

async fn worker(shared: Arc<Shared>, rx: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Job>>>) {
    loop {
        let batch = {
            let mut rx = rx.lock().await;
            let Some(first) = rx.recv().await else {
                return;
            };
            let mut batch = vec![first];
            let deadline = Instant::now() + shared.linger;
            while batch.len() < shared.max_batch {
                match rx.try_recv() {
                    Ok(job) => {
                        batch.push(job);
                        continue;
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => break,
                    Err(mpsc::error::TryRecvError::Empty) => {}
                }
                if shared.linger.is_zero() {
                    break;
                }
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(job)) => batch.push(job),
                    Ok(None) | Err(_) => break,
                }
            }
            batch
        };
        let (events, started) = (batch.len(), Instant::now());
        shared.run(batch).await;
        tracing::debug!(
            events,
            elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
            "sql batch done"
        );
    }
}

/// A failure while applying a batch.
#[derive(Debug)]
struct Failure {
    error: SinkError,
    /// The failure belongs to the whole transaction (connection, deadlock, commit), not to the
    /// statement that saw it.
    whole: bool,
    /// The connection cannot be trusted any more (a client-side timeout cut a statement off).
    poisoned: bool,
    /// The ledger refused a pair as a duplicate: another transaction recorded it meanwhile.
    ledger_conflict: bool,
    /// The SQLSTATE (PostgreSQL) of a database error.
    sqlstate: Option<String>,
    /// The error number (MariaDB/MySQL) of a database error.
    number: Option<u16>,
}

impl Failure {
    fn whole(error: SinkError) -> Failure {
        Failure {
            error,
            whole: true,
            poisoned: false,
            ledger_conflict: false,
            sqlstate: None,
            number: None,
        }
    }

    /// A failure of one event's statement.
    fn event(error: SinkError) -> Failure {
        Failure {
            whole: false,
            ..Failure::whole(error)
        }
    }
}

/// How one attempt at a batch ended.
enum Attempt {
    /// Committed. `true` for events found in the ledger (applied before).
    Committed(Vec<bool>),
    /// The event at this index failed; the transaction was rolled back.
    EventFailed(usize, Failure),
    /// The transaction as a whole failed and was rolled back.
    Failed(Failure),
}

impl Shared {
    fn backend(&self) -> &Backend {
        self.backend.get_or_init(|| match &self.connector {
            Connector::Postgres(options) => Backend::Postgres(
                PgPoolOptions::new()
                    .max_connections(self.workers as u32)
                    .acquire_timeout(self.connect_timeout)
                    .connect_lazy_with(options.clone()),
            ),
            Connector::MySql(options) => {
                let limit = self.statement_timeout.as_secs_f64();
                Backend::MySql(
                    MySqlPoolOptions::new()
                        .max_connections(self.workers as u32)
                        .acquire_timeout(self.connect_timeout)
                        .after_connect(move |conn, _| {
                            Box::pin(async move {
                                // MariaDB's server-side statement limit; MySQL has no such
                                // variable (1193) and relies on the sink's own timeout.
                                let set = format!("SET SESSION max_statement_time = {limit}");
                                match conn.execute(AssertSqlSafe(set)).await {
                                    Err(sqlx::Error::Database(e))
                                        if e.try_downcast_ref::<MySqlDatabaseError>()
                                            .is_some_and(|e| e.number() == 1193) =>
                                    {
                                        Ok(())
                                    }
                                    other => other.map(|_| ()),
                                }
                            })
                        })
                        .connect_lazy_with(options.clone()),
                )
            }
            Connector::Sqlite(_) => Backend::Sqlite(Arc::new(Mutex::new(None))),
        })
    }

    /// `SELECT 1`, for the healthcheck. Runs on the sink's thread.
    async fn select_one(self: Arc<Self>) -> Result<(), SinkError> {
        match self.backend() {
            Backend::Postgres(pool) => {
                let mut conn = self.acquire_pg(pool).await.map_err(|f| f.error)?;
                self.timed(conn.execute("SELECT 1"))
                    .await
                    .map_err(|f| f.error)?;
            }
            Backend::MySql(pool) => {
                let mut conn = self.acquire_my(pool).await.map_err(|f| f.error)?;
                self.timed(conn.execute("SELECT 1"))
                    .await
                    .map_err(|f| f.error)?;
            }
            Backend::Sqlite(cell) => {
                let cell = cell.clone();
                let shared = self.clone();
                tokio::task::spawn_blocking(move || {
                    let mut guard = cell.lock().unwrap_or_else(|p| p.into_inner());
                    let conn = shared.sqlite_open(&mut guard).map_err(|f| f.error)?;
                    conn.query_row("SELECT 1", [], |_| Ok(()))
                        .map_err(|e| shared.sqlite_failure(&e, "the healthcheck").error)
                })
                .await
                .map_err(|e| SinkError::Retryable(format!("the healthcheck task failed: {e}")))??;
            }
        }
        Ok(())
    }

    /// Applies a batch: replies to every job.
    async fn run(self: &Arc<Self>, jobs: Vec<Job>) {
        // An apply whose caller has gone (shutdown) is not started.
        let mut jobs: Vec<Job> = jobs.into_iter().filter(|j| !j.reply.is_closed()).collect();
        let mut conflicts = 0;
        while !jobs.is_empty() {
            match self.attempt(&jobs).await {
                Attempt::Committed(found) => {
                    for (job, found) in jobs.into_iter().zip(found) {
                        if found {
                            tracing::info!(event_id = %job.id, route = %job.route, "already applied: the ledger has this event; nothing written again");
                        }
                        let _ = job.reply.send(Ok(()));
                    }
                    return;
                }
                Attempt::EventFailed(index, failure) => {
                    let job = jobs.remove(index);
                    let _ = job.reply.send(Err(failure.error));
                    // The others are applied again without it.
                }
                Attempt::Failed(failure) if failure.ledger_conflict && conflicts < 3 => {
                    // Another transaction recorded one of these events meanwhile: the next
                    // attempt finds it in the ledger.
                    conflicts += 1;
                }
                Attempt::Failed(failure) if !failure.error.is_retryable() && jobs.len() > 1 => {
                    // A permanent failure that no single event can be blamed for (e.g. a
                    // deferred constraint at COMMIT): each event on its own finds out.
                    for job in jobs {
                        Box::pin(self.run(vec![job])).await;
                    }
                    return;
                }
                Attempt::Failed(failure) => {
                    for job in jobs {
                        let _ = job.reply.send(Err(failure.error.clone()));
                    }
                    return;
                }
            }
        }
    }

    async fn attempt(self: &Arc<Self>, jobs: &[Job]) -> Attempt {
        match self.backend() {
            Backend::Postgres(pool) => self.attempt_pg(pool, jobs).await,
            Backend::MySql(pool) => self.attempt_my(pool, jobs).await,
            Backend::Sqlite(cell) => {
                let cell = cell.clone();
                let this = self.clone();
                let work: Vec<(String, String, Vec<Op>)> = jobs
                    .iter()
                    .map(|j| (j.id.clone(), j.route.clone(), j.ops.clone()))
                    .collect();
                tokio::task::spawn_blocking(move || {
                    let mut guard = cell.lock().unwrap_or_else(|p| p.into_inner());
                    this.attempt_sqlite(&mut guard, &work)
                })
                .await
                .unwrap_or_else(|e| {
                    Attempt::Failed(Failure::whole(SinkError::Retryable(format!(
                        "the SQLite task failed: {e}"
                    ))))
                })
            }
        }
    }

    /// Runs `fut` within the statement timeout (plus a second, so that the server's own limit
    /// usually answers first, with a clean error).
    async fn timed<T>(
        &self,
        fut: impl Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, Failure> {
        match timeout(self.statement_timeout + Duration::from_secs(1), fut).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(self.failure(&e)),
            Err(_) => Err(Failure {
                error: SinkError::Retryable(format!(
                    "{} at {} did not answer within {} ms (statement_timeout_ms)",
                    self.dialect.name(),
                    self.shown,
                    self.statement_timeout.as_millis()
                )),
                poisoned: true,
                ..Failure::whole(SinkError::Retryable(String::new()))
            }),
        }
    }

    async fn acquire_pg(&self, pool: &sqlx::PgPool) -> Result<PoolConnection<Postgres>, Failure> {
        pool.acquire().await.map_err(|e| self.failure(&e))
    }

    async fn acquire_my(&self, pool: &sqlx::MySqlPool) -> Result<PoolConnection<MySql>, Failure> {
        pool.acquire().await.map_err(|e| self.failure(&e))
    }

    fn missing_ledger(&self) -> Failure {
        Failure::whole(SinkError::Permanent(format!(
            "the ledger table {} does not exist in {} at {}: create it (see docs/sinks/sql.md) or \
             set create_ledger = true",
            self.ledger.shown(),
            self.dialect.name(),
            self.shown
        )))
    }

    // --- PostgreSQL -------------------------------------------------------------------------

    async fn attempt_pg(&self, pool: &sqlx::PgPool, jobs: &[Job]) -> Attempt {
        let mut conn = match self.acquire_pg(pool).await {
            Ok(conn) => conn,
            Err(f) => return Attempt::Failed(f),
        };
        let attempt = self.pg_transaction(&mut conn, jobs).await;
        close_if_poisoned(&mut conn, &attempt);
        attempt
    }

    async fn pg_ledger(&self, conn: &mut sqlx::PgConnection) -> Result<(), Failure> {
        self.ledger_ready
            .get_or_try_init(|| async {
                match self
                    .timed(conn.execute(AssertSqlSafe(self.ledger_sql.probe.clone())))
                    .await
                {
                    Ok(_) => Ok(()),
                    Err(f) if f.sqlstate.as_deref() == Some("42P01") => {
                        if !self.create_ledger {
                            return Err(self.missing_ledger());
                        }
                        self.timed(conn.execute(AssertSqlSafe(self.ledger_sql.create.clone())))
                            .await
                            .map(|_| ())
                    }
                    Err(f) => Err(f),
                }
            })
            .await
            .map(|_| ())
    }

    async fn pg_transaction(&self, conn: &mut sqlx::PgConnection, jobs: &[Job]) -> Attempt {
        if let Err(f) = self.pg_ledger(conn).await {
            return Attempt::Failed(f);
        }
        let mut tx = match self.timed(conn.begin()).await {
            Ok(tx) => tx,
            Err(f) => return Attempt::Failed(f),
        };
        let result = async {
            let ids: Vec<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
            let routes: Vec<&str> = jobs.iter().map(|j| j.route.as_str()).collect();
            let claim = statement::pg_ledger_claim(&self.ledger);
            let rows = self
                .timed(
                    sqlx::query(AssertSqlSafe(claim))
                        .bind(ids)
                        .bind(routes)
                        .fetch_all(&mut *tx),
                )
                .await
                .map_err(|f| (None, f))?;
            let mut claimed: HashSet<(String, String)> = rows
                .iter()
                .filter_map(|r| Some((r.try_get(0).ok()?, r.try_get(1).ok()?)))
                .collect();
            let mut found = Vec::with_capacity(jobs.len());
            for (i, job) in jobs.iter().enumerate() {
                // `remove`: should a pair appear twice in one batch, only the first writes.
                let new = claimed.remove(&(job.id.clone(), job.route.clone()));
                found.push(!new);
                if !new {
                    continue;
                }
                for op in &job.ops {
                    self.pg_op(&mut tx, op).await.map_err(|f| (Some(i), f))?;
                }
            }
            Ok(found)
        }
        .await;
        match result {
            Ok(found) => match self.timed(tx.commit()).await {
                Ok(()) => Attempt::Committed(found),
                Err(f) => Attempt::Failed(Failure { whole: true, ..f }),
            },
            Err((index, f)) => {
                if !f.poisoned && self.timed(tx.rollback()).await.is_err() {
                    return Attempt::Failed(Failure {
                        poisoned: true,
                        ..f
                    });
                }
                match index {
                    Some(i) if !f.whole => Attempt::EventFailed(i, f),
                    _ => Attempt::Failed(f),
                }
            }
        }
    }

    async fn pg_op(&self, conn: &mut sqlx::PgConnection, op: &Op) -> Result<(), Failure> {
        // The server describes each parameter's type; values are encoded to match it.
        let described = self
            .timed(conn.prepare_with(AssertSqlSafe(op.sql.clone()).into_sql_str(), &[]))
            .await
            .map_err(|f| self.in_op(f, op))?;
        let types = match described.parameters() {
            Some(Either::Left(types)) => types.to_vec(),
            _ => Vec::new(),
        };
        if types.len() != op.binds.len() {
            return Err(Failure::event(SinkError::Permanent(format!(
                "the statement has {} parameters but {} values were bound",
                types.len(),
                op.binds.len()
            ))));
        }
        let mut args = PgArguments::default();
        for (bind, ty) in op.binds.iter().zip(&types) {
            let param = value::pg_param(&bind.value, ty).map_err(|e| {
                Failure::event(SinkError::Permanent(format!(
                    "{} of {}: {e}",
                    bind.label,
                    record_name(op.record)
                )))
            })?;
            args.add(param).map_err(|e| {
                Failure::event(SinkError::Permanent(format!(
                    "{}: cannot encode: {e}",
                    bind.label
                )))
            })?;
        }
        self.timed(sqlx::query_with(AssertSqlSafe(op.sql.clone()), args).execute(&mut *conn))
            .await
            .map(|_| ())
            .map_err(|f| self.in_op(f, op))
    }

    /// Adds which record a statement failure is about.
    fn in_op(&self, f: Failure, op: &Op) -> Failure {
        let error = match f.error {
            SinkError::Permanent(m) if op.record.is_some() => {
                SinkError::Permanent(format!("{}: {m}", record_name(op.record)))
            }
            other => other,
        };
        Failure { error, ..f }
    }

    // --- MariaDB/MySQL ----------------------------------------------------------------------

    async fn attempt_my(&self, pool: &sqlx::MySqlPool, jobs: &[Job]) -> Attempt {
        let mut conn = match self.acquire_my(pool).await {
            Ok(conn) => conn,
            Err(f) => return Attempt::Failed(f),
        };
        let attempt = self.my_transaction(&mut conn, jobs).await;
        close_if_poisoned(&mut conn, &attempt);
        attempt
    }

    async fn my_ledger(&self, conn: &mut sqlx::MySqlConnection) -> Result<(), Failure> {
        self.ledger_ready
            .get_or_try_init(|| async {
                match self
                    .timed(conn.execute(AssertSqlSafe(self.ledger_sql.probe.clone())))
                    .await
                {
                    Ok(_) => Ok(()),
                    Err(f) if f.number == Some(1146) => {
                        if !self.create_ledger {
                            return Err(self.missing_ledger());
                        }
                        self.timed(conn.execute(AssertSqlSafe(self.ledger_sql.create.clone())))
                            .await
                            .map(|_| ())
                    }
                    Err(f) => Err(f),
                }
            })
            .await
            .map(|_| ())
    }

    async fn my_transaction(&self, conn: &mut sqlx::MySqlConnection, jobs: &[Job]) -> Attempt {
        if let Err(f) = self.my_ledger(conn).await {
            return Attempt::Failed(f);
        }
        let mut tx = match self.timed(conn.begin()).await {
            Ok(tx) => tx,
            Err(f) => return Attempt::Failed(f),
        };
        let result = async {
            let select = statement::ledger_select(Dialect::MySql, &self.ledger, jobs.len());
            let mut query = sqlx::query(AssertSqlSafe(select));
            for job in jobs {
                query = query.bind(job.id.clone());
            }
            let rows = self
                .timed(query.fetch_all(&mut *tx))
                .await
                .map_err(|f| (None, f))?;
            let applied: HashSet<(String, String)> = rows
                .iter()
                .filter_map(|r| Some((r.try_get(0).ok()?, r.try_get(1).ok()?)))
                .collect();
            // A pair seen earlier in the batch counts as found, so that it is written once.
            let mut seen = HashSet::new();
            let found: Vec<bool> = jobs
                .iter()
                .map(|j| {
                    let pair = (j.id.clone(), j.route.clone());
                    applied.contains(&pair) || !seen.insert(pair)
                })
                .collect();
            let new: Vec<&Job> = jobs
                .iter()
                .zip(&found)
                .filter(|(_, f)| !**f)
                .map(|(j, _)| j)
                .collect();
            if !new.is_empty() {
                let insert = statement::ledger_insert(Dialect::MySql, &self.ledger, new.len());
                let mut query = sqlx::query(AssertSqlSafe(insert));
                for job in &new {
                    query = query.bind(job.id.clone()).bind(job.route.clone());
                }
                self.timed(query.execute(&mut *tx)).await.map_err(|mut f| {
                    if f.number == Some(1062) {
                        f.ledger_conflict = true;
                    }
                    (None, Failure { whole: true, ..f })
                })?;
            }
            for (i, job) in jobs.iter().enumerate() {
                if found[i] {
                    continue;
                }
                for op in &job.ops {
                    self.my_op(&mut tx, op).await.map_err(|f| (Some(i), f))?;
                }
            }
            Ok(found)
        }
        .await;
        match result {
            Ok(found) => match self.timed(tx.commit()).await {
                Ok(()) => Attempt::Committed(found),
                Err(f) => Attempt::Failed(Failure { whole: true, ..f }),
            },
            Err((index, f)) => {
                if !f.poisoned && self.timed(tx.rollback()).await.is_err() {
                    return Attempt::Failed(Failure {
                        poisoned: true,
                        ..f
                    });
                }
                match index {
                    Some(i) if !f.whole => Attempt::EventFailed(i, f),
                    _ => Attempt::Failed(f),
                }
            }
        }
    }

    /// The column types of a table (MariaDB/MySQL), cached; read again when a column is not
    /// known (the table may have changed).
    async fn my_column_types(
        &self,
        conn: &mut sqlx::MySqlConnection,
        table: &TableName,
        wanted: &[Bind],
    ) -> Result<Arc<HashMap<String, MyColumn>>, Failure> {
        let cache_key = table.shown();
        let cached = self
            .my_columns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&cache_key)
            .cloned();
        if let Some(columns) = cached
            && wanted
                .iter()
                .filter_map(|b| b.column.as_ref())
                .all(|c| columns.contains_key(&c.to_ascii_lowercase()))
        {
            return Ok(columns);
        }
        let rows = self
            .timed(
                sqlx::query(
                    "SELECT CAST(COLUMN_NAME AS CHAR), CAST(DATA_TYPE AS CHAR) FROM \
                     information_schema.COLUMNS WHERE TABLE_SCHEMA = COALESCE(?, DATABASE()) \
                     AND TABLE_NAME = ?",
                )
                .bind(table.schema.clone())
                .bind(table.name.clone())
                .fetch_all(&mut *conn),
            )
            .await?;
        let columns: HashMap<String, MyColumn> = rows
            .iter()
            .filter_map(|r| {
                let name: String = r.try_get(0).ok()?;
                let data_type: String = r.try_get(1).ok()?;
                Some((
                    name.to_ascii_lowercase(),
                    MyColumn::from_data_type(&data_type),
                ))
            })
            .collect();
        let columns = Arc::new(columns);
        self.my_columns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(cache_key, columns.clone());
        Ok(columns)
    }

    async fn my_op(&self, conn: &mut sqlx::MySqlConnection, op: &Op) -> Result<(), Failure> {
        let columns = match &op.table {
            Some(table) => Some(self.my_column_types(conn, table, &op.binds).await?),
            None => None,
        };
        let mut query = sqlx::query(AssertSqlSafe(op.sql.clone()));
        for bind in &op.binds {
            let column = match (&columns, &bind.column) {
                (Some(columns), Some(name)) => Some(
                    columns
                        .get(&name.to_ascii_lowercase())
                        .copied()
                        .unwrap_or(MyColumn::Other),
                ),
                _ => None,
            };
            query = match value::my_param(&bind.value, column) {
                MyParam::Null => query.bind(None::<String>),
                MyParam::Bool(b) => query.bind(b),
                MyParam::Int(i) => query.bind(i),
                MyParam::UInt(u) => query.bind(u),
                MyParam::Text(s) => query.bind(s),
            };
        }
        self.timed(query.execute(&mut *conn))
            .await
            .map(|_| ())
            .map_err(|f| self.in_op(f, op))
    }

    // --- SQLite -----------------------------------------------------------------------------

    /// Opens the database file on first use (never creating it: a missing file is usually a
    /// volume that is not mounted yet) and makes sure the ledger exists.
    fn sqlite_open<'a>(
        &self,
        slot: &'a mut Option<rusqlite::Connection>,
    ) -> Result<&'a mut rusqlite::Connection, Failure> {
        if slot.is_none() {
            let Connector::Sqlite(path) = &self.connector else {
                return Err(Failure::whole(SinkError::Permanent(
                    "not an SQLite sink".into(),
                )));
            };
            let conn = rusqlite::Connection::open_with_flags(
                path,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE
                    | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX
                    | rusqlite::OpenFlags::SQLITE_OPEN_URI,
            )
            .map_err(|e| self.sqlite_failure(&e, "opening the database"))?;
            conn.busy_timeout(self.statement_timeout)
                .map_err(|e| self.sqlite_failure(&e, "setting the busy timeout"))?;
            conn.set_prepared_statement_cache_capacity(cache_capacity(self.max_batch));
            let setup = if self.create_ledger {
                conn.execute_batch(&self.ledger_sql.create)
            } else {
                conn.execute_batch(&self.ledger_sql.probe)
            };
            if let Err(e) = setup {
                let failure = self.sqlite_failure(&e, "preparing the ledger");
                return Err(if self.create_ledger {
                    failure
                } else {
                    self.missing_ledger()
                });
            }
            *slot = Some(conn);
        }
        slot.as_mut()
            .ok_or_else(|| Failure::whole(SinkError::Retryable("the database is not open".into())))
    }

    fn attempt_sqlite(
        &self,
        slot: &mut Option<rusqlite::Connection>,
        work: &[(String, String, Vec<Op>)],
    ) -> Attempt {
        let conn = match self.sqlite_open(slot) {
            Ok(conn) => conn,
            Err(f) => return Attempt::Failed(f),
        };
        // Statements are interrupted at the statement timeout.
        let deadline = std::time::Instant::now() + self.statement_timeout;
        conn.progress_handler(10_000, Some(move || std::time::Instant::now() > deadline));
        let result = (|| {
            let tx = rusqlite::Transaction::new(conn, rusqlite::TransactionBehavior::Immediate)
                .map_err(|e| (None, self.sqlite_failure(&e, "starting a transaction")))?;
            let claim = statement::sqlite_ledger_claim(&self.ledger);
            let mut found = Vec::with_capacity(work.len());
            for (i, (id, route, ops)) in work.iter().enumerate() {
                let inserted = tx
                    .prepare_cached(&claim)
                    .and_then(|mut s| s.execute([id, route]))
                    .map_err(|e| {
                        (
                            None,
                            self.sqlite_failure(&e, "recording the event in the ledger"),
                        )
                    })?;
                found.push(inserted == 0);
                if inserted == 0 {
                    continue;
                }
                for op in ops {
                    let values: Vec<rusqlite::types::Value> = op
                        .binds
                        .iter()
                        .map(|b| value::sqlite_value(&b.value))
                        .collect();
                    tx.prepare_cached(&op.sql)
                        .and_then(|mut s| s.execute(rusqlite::params_from_iter(values)))
                        .map_err(|e| {
                            let f = self.sqlite_failure(&e, "");
                            (Some(i), self.in_op(f, op))
                        })?;
                }
            }
            tx.commit().map_err(|e| {
                (
                    None,
                    Failure {
                        whole: true,
                        ..self.sqlite_failure(&e, "committing")
                    },
                )
            })?;
            Ok(found)
        })();
        conn.progress_handler(0, None::<fn() -> bool>);
        match result {
            Ok(found) => Attempt::Committed(found),
            Err((Some(i), f)) if !f.whole => Attempt::EventFailed(i, f),
            Err((_, f)) => Attempt::Failed(f),
        }
    }

    // --- Error classification ---------------------------------------------------------------

    /// Classifies an sqlx error (by SQLSTATE / error number and error kind, never by text).
    fn failure(&self, e: &sqlx::Error) -> Failure {
        let db = self.dialect.name();
        let at = &self.shown;
        let retry_all = |message: String| Failure::whole(SinkError::Retryable(message));
        match e {
            sqlx::Error::Database(d) => {
                let mut sqlstate = None;
                let mut number = None;
                let (retryable, whole, code) =
                    if let Some(pg) = d.try_downcast_ref::<PgDatabaseError>() {
                        sqlstate = Some(pg.code().to_string());
                        let (r, w) = classify_pg(pg.code());
                        (r, w, format!("SQLSTATE {}", pg.code()))
                    } else if let Some(my) = d.try_downcast_ref::<MySqlDatabaseError>() {
                        number = Some(my.number());
                        let (r, w) = classify_my(my.number(), my.code());
                        (r, w, format!("error {}", my.number()))
                    } else {
                        (true, true, "unknown code".into())
                    };
                let mut message = format!("{db} refused the write: {} ({code})", d.message());
                if let Some(pg) = d.try_downcast_ref::<PgDatabaseError>()
                    && let Some(detail) = pg.detail()
                {
                    message.push_str(&format!(": {detail}"));
                }
                Failure {
                    error: if retryable {
                        SinkError::Retryable(message)
                    } else {
                        SinkError::Permanent(message)
                    },
                    whole,
                    sqlstate,
                    number,
                    ..Failure::whole(SinkError::Retryable(String::new()))
                }
            }
            // A handshake that rustls refused (an untrusted or mismatched certificate) arrives
            // as an I/O error carrying the rustls error.
            sqlx::Error::Io(io)
                if io
                    .get_ref()
                    .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some()) =>
            {
                Failure {
                    poisoned: true,
                    ..retry_all(format!(
                        "TLS with {db} at {at} failed: {io} (check tls and ca_file)"
                    ))
                }
            }
            sqlx::Error::Io(io) => Failure {
                poisoned: true,
                ..retry_all(format!("cannot reach {db} at {at}: {io}"))
            },
            sqlx::Error::Tls(t) => retry_all(format!(
                "TLS with {db} at {at} failed: {t} (check tls and ca_file)"
            )),
            sqlx::Error::PoolTimedOut => retry_all(format!(
                "no connection to {db} at {at} within {} ms (connect_timeout_ms): is the \
                 database up and reachable?",
                self.connect_timeout.as_millis()
            )),
            sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => {
                retry_all(format!("the connection pool for {db} at {at} is closed"))
            }
            sqlx::Error::Protocol(p) => Failure {
                poisoned: true,
                ..retry_all(format!("{db} at {at} broke the protocol: {p}"))
            },
            sqlx::Error::Configuration(c) => Failure::whole(SinkError::Permanent(format!(
                "the connection to {db} at {at} is misconfigured: {c}"
            ))),
            sqlx::Error::Encode(_)
            | sqlx::Error::Decode(_)
            | sqlx::Error::ColumnDecode { .. }
            | sqlx::Error::TypeNotFound { .. }
            | sqlx::Error::InvalidArgument(_) => Failure::event(SinkError::Permanent(format!(
                "{db} cannot take a value: {e}"
            ))),
            other => retry_all(format!("{db} at {at}: {other}")),
        }
    }

    /// Classifies a rusqlite error by its result code.
    fn sqlite_failure(&self, e: &rusqlite::Error, doing: &str) -> Failure {
        use rusqlite::ErrorCode as C;
        let doing = if doing.is_empty() {
            String::new()
        } else {
            format!(" while {doing}")
        };
        let at = &self.shown;
        match e {
            rusqlite::Error::SqliteFailure(err, message) => {
                let text = message.clone().unwrap_or_else(|| err.to_string());
                let (retryable, whole) = match err.code {
                    C::DatabaseBusy | C::DatabaseLocked => (true, true),
                    C::OperationInterrupted => (true, false),
                    C::SystemIoFailure
                    | C::DiskFull
                    | C::CannotOpen
                    | C::OutOfMemory
                    | C::FileLockingProtocolFailed
                    | C::OperationAborted
                    | C::SchemaChanged => (true, true),
                    C::ReadOnly
                    | C::PermissionDenied
                    | C::NotADatabase
                    | C::DatabaseCorrupt
                    | C::AuthorizationForStatementDenied => (false, true),
                    _ => (false, false),
                };
                let message = format!(
                    "SQLite {at} refused the write{doing}: {text} (code {})",
                    err.extended_code
                );
                let error = if retryable {
                    SinkError::Retryable(message)
                } else {
                    SinkError::Permanent(message)
                };
                Failure {
                    whole,
                    ..Failure::whole(error)
                }
            }
            other => Failure::event(SinkError::Permanent(format!(
                "SQLite {at} cannot run the statement{doing}: {other}"
            ))),
        }
    }
}

/// PostgreSQL: (retryable, whole transaction) for a SQLSTATE.
fn classify_pg(code: &str) -> (bool, bool) {
    match code {
        // Statement timeout and lock timeout: this statement ran into it.
        "57014" | "55P03" => (true, false),
        _ => match code.get(..2).unwrap_or("") {
            "08" | "40" | "53" | "55" | "57" | "58" | "XX" => (true, true),
            _ => (false, false),
        },
    }
}

/// MariaDB/MySQL: (retryable, whole transaction) for an error number and SQLSTATE.
fn classify_my(number: u16, sqlstate: Option<&str>) -> (bool, bool) {
    match number {
        // Lock wait timeout (the statement is rolled back), statement time limits, interrupted.
        1205 | 1969 | 3024 | 1317 => (true, false),
        // Deadlock (the whole transaction is rolled back), too many connections, shutdown,
        // connection errors, commit/rollback failures, full disk or memory, read-only.
        1213 | 1614 | 1040 | 1203 | 1053 | 1077 | 1152 | 1153 | 1154 | 1155 | 1156 | 1157
        | 1158 | 1159 | 1160 | 1161 | 1180 | 1181 | 1927 | 4031 | 1021 | 1037 | 1038 | 1041
        | 1114 | 1135 | 1206 | 1637 | 1290 | 1836 => (true, true),
        _ => match sqlstate.and_then(|s| s.get(..2)) {
            Some("08" | "40") => (true, true),
            _ => (false, false),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::SecretSource;
    use crate::sink::SinkSpec;
    use serde_json::json;
    use std::path::Path;

    fn config(text: &str) -> SqlConfig {
        toml::from_str(text).unwrap()
    }

    fn keys(c: &SqlConfig) -> Vec<String> {
        let mut keys: Vec<String> = c.validate("sinks.db").into_iter().map(|p| p.key).collect();
        keys.sort();
        keys
    }

    const STATEMENT: &str = r#"
url = "postgres://ess@db.example:5432/rules"
statement = "INSERT INTO rules (court_id, deadline) VALUES (:court_id, :deadline)"
"#;

    #[test]
    fn config_parses_with_defaults_and_refuses_unknown_keys() {
        let c = config(STATEMENT);
        assert_eq!(c.ledger_table, "ess_applied");
        assert!(c.create_ledger);
        assert_eq!(c.max_batch, 64);
        assert_eq!(c.max_linger_ms, 5);
        assert_eq!(c.max_connections, 4);
        assert_eq!(c.connect_timeout_ms, 10_000);
        assert_eq!(c.statement_timeout_ms, 30_000);
        assert!(!c.healthcheck);
        assert_eq!(c.tls, None);
        assert!(c.validate("sinks.db").is_empty());
        let e = toml::from_str::<SqlConfig>(&format!("{STATEMENT}\nbatch = 3\n")).unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
        let e =
            toml::from_str::<SqlConfig>(&format!("{STATEMENT}\ntls = \"always\"\n")).unwrap_err();
        assert!(e.to_string().contains("unknown variant"), "{e}");
    }

    #[test]
    fn validate_names_every_problem_by_key() {
        let c = config(
            r#"
url = "postgres://ess:hunter2@db.example/rules"
url_secret = { env = "DB_URL" }
password = {}
statement = "INSERT INTO t VALUES (:a, 'open"
table = "rules"
key = ["a b"]
delete_when = "deleted ="
ledger_table = "x;y"
max_batch = 0
max_connections = 0
connect_timeout_ms = 0
statement_timeout_ms = 0
"#,
        );
        assert_eq!(
            keys(&c),
            [
                "sinks.db.connect_timeout_ms",
                "sinks.db.ledger_table",
                "sinks.db.max_batch",
                "sinks.db.max_connections",
                "sinks.db.password",
                "sinks.db.statement",
                "sinks.db.statement_timeout_ms",
                "sinks.db.url",
            ]
        );
        // One at a time, the checks each field has.
        let with = |extra: &str, base: &str| config(&format!("{base}\n{extra}"));
        let base = "url = \"postgres://ess@db.example/rules\"";
        assert_eq!(keys(&with("", base)), ["sinks.db.statement"]);
        assert_eq!(
            keys(&with("table = \"rules\"", base)),
            ["sinks.db.key"],
            "table needs key"
        );
        assert_eq!(
            keys(&with("table = \"rules\"\nkey = [\"id\", \"id\"]", base)),
            ["sinks.db.key"]
        );
        assert_eq!(
            keys(&with(
                "table = \"rules\"\nkey = [\"id\"]\ndelete_when = \"deleted =\"",
                base
            )),
            ["sinks.db.delete_when"]
        );
        assert_eq!(
            keys(&with(
                "statement = \"DELETE FROM t WHERE id = :id\"\nkey = [\"id\"]\ndelete_when = \"true\"",
                base
            )),
            ["sinks.db.delete_when", "sinks.db.key"]
        );
        assert_eq!(
            keys(&with("statement = \"SELECT 1\"", "url = \"oracle://db/x\"")),
            ["sinks.db.url"]
        );
        assert_eq!(
            keys(&with(
                "statement = \"SELECT 1\"\npassword = { env = \"P\" }\ntls = \"require\"",
                "url = \"sqlite:///var/lib/x.db\""
            )),
            ["sinks.db.password", "sinks.db.tls"]
        );
        assert_eq!(
            keys(&with(
                "statement = \"INSERT INTO t VALUES (?)\"",
                "url = \"mysql://root@db/x\""
            )),
            ["sinks.db.statement"]
        );
        // A password in the URL is refused without being repeated.
        let p = with(
            "statement = \"SELECT 1\"",
            "url = \"mysql://root:hunter2@db/x\"",
        )
        .validate("sinks.db");
        assert_eq!(p.len(), 1);
        assert!(
            p[0].message.contains("carries a password"),
            "{}",
            p[0].message
        );
        assert!(!p[0].message.contains("hunter2"));
        let p = with(
            "statement = \"SELECT 1\"",
            "url = \"postgres://db/x?password=hunter2\"",
        )
        .validate("sinks.db");
        assert!(!p.is_empty() && !p[0].message.contains("hunter2"));
    }

    #[test]
    fn secrets_come_from_files_and_never_show() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("url"),
            "postgres://ess:s3cret@db.example/rules\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("password"), "s3cret-too\n").unwrap();
        let mut c = config(
            "url_secret = { file = \"url\" }\npassword = { file = \"password\" }\n\
             statement = \"SELECT :a\"\n",
        );
        c.resolve_paths(dir.path());
        assert!(c.validate("sinks.db").is_empty());
        // Built outside any runtime and without a connection, as `ess-agent validate` does.
        let sink = SqlSink::new(&c).unwrap();
        let shown = format!("{sink:?}");
        assert!(shown.contains("db.example:5432/rules"), "{shown}");
        assert!(!shown.contains("s3cret"), "{shown}");

        c.password = Some(SecretSource {
            file: Some(dir.path().join("missing")),
            env: None,
            credential: None,
        });
        let e = SqlSink::new(&c).unwrap_err();
        assert!(e.starts_with("password: cannot read secret file"), "{e}");
        std::fs::write(
            dir.path().join("url"),
            "postgres://ess:s3cret@db.example:99999/x",
        )
        .unwrap();
        c.password = None;
        let e = SqlSink::new(&c).unwrap_err();
        assert!(e.starts_with("url_secret: "), "{e}");
        assert!(!e.contains("s3cret"), "{e}");

        let mut c = config(
            "url = \"postgres://ess@db/x\"\nstatement = \"SELECT 1\"\nca_file = \"nope.pem\"",
        );
        c.resolve_paths(dir.path());
        let e = SqlSink::new(&c).unwrap_err();
        assert!(e.starts_with("ca_file: cannot read"), "{e}");
    }

    #[test]
    fn sqlite_paths_resolve_against_the_config_directory() {
        let mut c = config("url = \"sqlite:data/rules.db\"\nstatement = \"SELECT 1\"");
        c.resolve_paths(Path::new("/etc/ess"));
        assert_eq!(c.url.as_deref(), Some("sqlite:///etc/ess/data/rules.db"));
        assert_eq!(
            sqlite_path(c.url.as_deref().unwrap()).unwrap(),
            Path::new("/etc/ess/data/rules.db")
        );
        let mut c = config("url = \"sqlite:///var/lib/rules.db\"\nstatement = \"SELECT 1\"");
        c.resolve_paths(Path::new("/etc/ess"));
        assert_eq!(c.url.as_deref(), Some("sqlite:///var/lib/rules.db"));
        assert!(sqlite_path("sqlite:").is_err());
        assert!(sqlite_path("sqlite:x.db?mode=ro").is_err());
        assert_eq!(dialect_of("PostgreSQL://x").unwrap(), Dialect::Postgres);
        assert_eq!(dialect_of("mariadb://x").unwrap(), Dialect::MySql);
    }

    #[test]
    fn outputs_are_checked_against_what_can_be_bound() {
        let c = config(STATEMENT);
        c.check_output(&json!({"court_id": "IL", "deadline": "16:00", "extra": 1}))
            .unwrap();
        c.check_output(&json!([{"court_id": "IL", "deadline": null}]))
            .unwrap();
        let e = c.check_output(&json!({"court_id": "IL"})).unwrap_err();
        assert!(e.contains("\"deadline\"") && e.contains(":deadline"), "{e}");
        let e = c
            .check_output(&json!([{"court_id": "IL", "deadline": "1"}, {"deadline": "2"}]))
            .unwrap_err();
        assert!(e.contains("\"court_id\"") && e.contains("record 1"), "{e}");
        let e = c.check_output(&json!("a;b")).unwrap_err();
        assert!(e.contains("is a string"), "{e}");

        let t = config("url = \"postgres://db/x\"\ntable = \"rules\"\nkey = [\"id\"]");
        t.check_output(&json!({"id": 1, "deadline": "16:00"}))
            .unwrap();
        let e = t.check_output(&json!({"deadline": "16:00"})).unwrap_err();
        assert!(e.contains("\"id\"") && e.contains("key column"), "{e}");
        let e = t.check_output(&json!({"id": null})).unwrap_err();
        assert!(e.contains("is null"), "{e}");
        let e = t
            .check_output(&json!({"id": 1, "bad name": 2}))
            .unwrap_err();
        assert!(e.contains("not a plain identifier"), "{e}");
    }

    #[test]
    fn plans_bind_fields_and_delete_when_turns_a_change_into_a_delete() {
        let c = config(
            "url = \"postgres://db/x\"\ntable = \"rules\"\nkey = [\"id\"]\n\
             delete_when = \"status = 'withdrawn'\"",
        );
        let sink = SqlSink::new(&c).unwrap();
        let ops = sink
            .shared
            .plan(&json!([
                {"id": 1, "status": "active", "deadline": "16:00"},
                {"id": 2, "status": "withdrawn"}
            ]))
            .unwrap();
        assert_eq!(ops.len(), 2);
        assert!(
            ops[0].sql.starts_with("INSERT INTO \"rules\""),
            "{}",
            ops[0].sql
        );
        assert_eq!(
            ops[0]
                .binds
                .iter()
                .map(|b| b.value.clone())
                .collect::<Vec<_>>(),
            [json!(1), json!("active"), json!("16:00")]
        );
        assert_eq!(&*ops[1].sql, "DELETE FROM \"rules\" WHERE \"id\" = $1");
        assert_eq!(ops[1].binds.len(), 1);
        assert_eq!(ops[1].record, Some(1));

        let c = config(
            "url = \"postgres://db/x\"\ntable = \"rules\"\nkey = [\"id\"]\ndelete_when = \"status\"",
        );
        let e = SqlSink::new(&c)
            .unwrap()
            .shared
            .plan(&json!({"id": 1, "status": "x"}))
            .unwrap_err();
        assert!(!e.is_retryable());
        assert!(e.to_string().contains("must return true or false"), "{e}");

        let sink = SqlSink::new(&config(STATEMENT)).unwrap();
        let e = sink.shared.plan(&json!({"court_id": "IL"})).unwrap_err();
        assert!(!e.is_retryable());
        assert!(
            e.to_string()
                .contains("field \"deadline\" (bound to :deadline)"),
            "{e}"
        );
        let ops = sink.shared.plan(&json!([])).unwrap();
        assert!(ops.is_empty());
    }

    #[test]
    fn errors_are_classified_by_code() {
        // (retryable, whole transaction)
        assert_eq!(classify_pg("23505"), (false, false)); // unique violation
        assert_eq!(classify_pg("23514"), (false, false)); // check violation
        assert_eq!(classify_pg("22P02"), (false, false)); // invalid text representation
        assert_eq!(classify_pg("42601"), (false, false)); // syntax error
        assert_eq!(classify_pg("42501"), (false, false)); // insufficient privilege
        assert_eq!(classify_pg("28P01"), (false, false)); // invalid password
        assert_eq!(classify_pg("40001"), (true, true)); // serialization failure
        assert_eq!(classify_pg("40P01"), (true, true)); // deadlock
        assert_eq!(classify_pg("08006"), (true, true)); // connection failure
        assert_eq!(classify_pg("57P01"), (true, true)); // admin shutdown
        assert_eq!(classify_pg("53300"), (true, true)); // too many connections
        assert_eq!(classify_pg("57014"), (true, false)); // statement timeout
        assert_eq!(classify_pg("55P03"), (true, false)); // lock not available
        assert_eq!(classify_my(1062, Some("23000")), (false, false)); // duplicate key
        assert_eq!(classify_my(4025, Some("23000")), (false, false)); // check constraint
        assert_eq!(classify_my(1064, Some("42000")), (false, false)); // syntax
        assert_eq!(classify_my(1146, Some("42S02")), (false, false)); // no such table
        assert_eq!(classify_my(1142, Some("42000")), (false, false)); // command denied
        assert_eq!(classify_my(1292, Some("22007")), (false, false)); // bad datetime
        assert_eq!(classify_my(1364, Some("HY000")), (false, false)); // no default
        assert_eq!(classify_my(1213, Some("40001")), (true, true)); // deadlock
        assert_eq!(classify_my(1205, Some("HY000")), (true, false)); // lock wait timeout
        assert_eq!(classify_my(1969, Some("70100")), (true, false)); // statement time
        assert_eq!(classify_my(1040, Some("08004")), (true, true)); // too many connections
        assert_eq!(classify_my(9999, Some("08S01")), (true, true)); // communication
    }
}
