//! What PostgreSQL and MariaDB/MySQL share: a pool of connections, the ledger made sure of once,
//! and a batch applied in one transaction. The [`Server`] trait holds the few things each does
//! its own way: how the ledger records a batch, how a statement's values are bound, and how a
//! missing table is recognised.
//!
//! The driver is generic over the database, not over sqlx's `Executor`: every statement runs
//! inside the database's own impl, on its concrete connection type, and the trait declares those
//! futures `Send`. So the driver needs no higher-ranked bound on `Executor` for
//! `&mut DB::Connection`, and its own futures are `Send`, as the sink's multi-threaded runtime
//! needs.

use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use sqlx::pool::{PoolConnection, PoolOptions};
use sqlx::{AssertSqlSafe, Connection as _, Pool, SqlSafeStr as _, SqlStr};

use super::Shared;
use super::batch::{Attempt, Failure, Job, close_if_poisoned};
use super::config::{SqlConfig, TlsMode};
use super::error::redact_error;
use super::plan::Op;
use super::statement::Dialect;

/// A database the sink reaches through an sqlx pool.
pub(super) trait Server: sqlx::Database {
    /// True when the failure says that the table does not exist (the ledger probe).
    fn no_such_table(failure: &Failure) -> bool;

    /// Runs a statement that binds nothing and returns nothing.
    fn execute(
        conn: &mut Self::Connection,
        sql: SqlStr,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;

    /// Records the batch's events in the ledger, inside the batch's transaction. For each
    /// event, true when it was found there already (applied before) or earlier in the batch:
    /// such an event is not written again.
    fn claim(
        shared: &Shared,
        conn: &mut Self::Connection,
        jobs: &[Job],
    ) -> impl Future<Output = Result<Vec<bool>, Failure>> + Send;

    /// Runs one statement of an event's output.
    fn op(
        shared: &Shared,
        conn: &mut Self::Connection,
        op: &Op,
    ) -> impl Future<Output = Result<(), Failure>> + Send;
}

/// A server's connect options, as the sink sets them from its config.
pub(super) trait ServerOptions: FromStr<Err = sqlx::Error> {
    /// The server's dialect, for messages.
    const DIALECT: Dialect;
    /// How its URL is written, for the message about one that does not parse.
    const EXAMPLE: &'static str;

    fn with_password(self, password: &str) -> Self;
    fn with_tls(self, mode: TlsMode) -> Self;
    fn with_ca(self, pem: Vec<u8>) -> Self;
    /// What the sink always sets: the statement cache and the server's session settings.
    fn tuned(self, max_batch: usize, statement_timeout: Duration) -> Self;
    /// Host, port and database, for messages.
    fn at(&self) -> (&str, u16, Option<&str>);
}

/// What a server's connect options are made from.
pub(super) struct Reach<'a> {
    pub(super) url: &'a str,
    /// The key the URL came from (`url` or `url_secret`), for messages, which never repeat a
    /// secret URL.
    pub(super) field: &'a str,
    pub(super) password: Option<&'a str>,
    /// The CA certificate (PEM).
    pub(super) ca: Option<&'a [u8]>,
    pub(super) config: &'a SqlConfig,
    pub(super) statement_timeout: Duration,
}

/// The connect options, and where the database is, for messages.
pub(super) fn connect_options<O: ServerOptions>(reach: &Reach) -> Result<(O, String), String> {
    let Reach {
        url,
        field,
        password,
        ca,
        config,
        statement_timeout,
    } = *reach;
    let mut options = O::from_str(url).map_err(|e| {
        format!(
            "{field}: not a {} URL ({}): write it like {}",
            O::DIALECT.name(),
            redact_error(&e),
            O::EXAMPLE
        )
    })?;
    if let Some(password) = password {
        options = options.with_password(password);
    }
    // A CA file without a TLS mode means: verify the server's certificate and name.
    if let Some(mode) = config.tls.or(ca.map(|_| TlsMode::VerifyFull)) {
        options = options.with_tls(mode);
    }
    if let Some(ca) = ca {
        options = options.with_ca(ca.to_vec());
    }
    let options = options.tuned(config.max_batch, statement_timeout);
    let (host, port, database) = options.at();
    let shown = format!("{host}:{port}/{}", database.unwrap_or(""));
    Ok((options, shown))
}

impl Shared {
    /// The pool settings every server shares.
    pub(super) fn pool_options<DB: Server>(&self) -> PoolOptions<DB> {
        PoolOptions::new()
            .max_connections(self.workers as u32)
            .acquire_timeout(self.connect_timeout)
    }

    async fn acquire<DB: Server>(&self, pool: &Pool<DB>) -> Result<PoolConnection<DB>, Failure> {
        pool.acquire().await.map_err(|e| self.failure(&e))
    }

    /// `SELECT 1` on a pooled connection.
    pub(super) async fn select_one_on<DB: Server>(&self, pool: &Pool<DB>) -> Result<(), Failure> {
        let mut conn = self.acquire(pool).await?;
        self.timed(DB::execute(&mut conn, SqlStr::from_static("SELECT 1")))
            .await
    }

    /// One attempt at a batch on a pooled connection.
    pub(super) async fn attempt_on<DB: Server>(&self, pool: &Pool<DB>, jobs: &[Job]) -> Attempt {
        let mut conn = match self.acquire(pool).await {
            Ok(conn) => conn,
            Err(f) => return Attempt::Failed(f),
        };
        let attempt = self.transaction::<DB>(&mut conn, jobs).await;
        close_if_poisoned(&mut conn, &attempt);
        attempt
    }

    /// Makes sure, once, that the ledger table exists: creates it when `create_ledger` is set.
    async fn ledger<DB: Server>(&self, conn: &mut DB::Connection) -> Result<(), Failure> {
        self.ledger_ready
            .get_or_try_init(|| async {
                let probe = AssertSqlSafe(self.ledger_sql.probe.clone()).into_sql_str();
                match self.timed(DB::execute(conn, probe)).await {
                    Ok(()) => Ok(()),
                    Err(f) if DB::no_such_table(&f) => {
                        if !self.create_ledger {
                            return Err(self.missing_ledger());
                        }
                        let create = AssertSqlSafe(self.ledger_sql.create.clone()).into_sql_str();
                        self.timed(DB::execute(conn, create)).await
                    }
                    Err(f) => Err(f),
                }
            })
            .await
            .map(|_| ())
    }

    /// The batch in one transaction: the ledger first, then the statements of each event not
    /// found in it. Rolled back when anything fails.
    async fn transaction<DB: Server>(&self, conn: &mut DB::Connection, jobs: &[Job]) -> Attempt {
        if let Err(f) = self.ledger::<DB>(conn).await {
            return Attempt::Failed(f);
        }
        let mut tx = match self.timed(conn.begin()).await {
            Ok(tx) => tx,
            Err(f) => return Attempt::Failed(f),
        };
        let result = async {
            let found = DB::claim(self, &mut tx, jobs)
                .await
                .map_err(|f| (None, f))?;
            for (i, job) in jobs.iter().enumerate() {
                if found[i] {
                    continue;
                }
                for op in &job.ops {
                    DB::op(self, &mut tx, op).await.map_err(|f| (Some(i), f))?;
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
}
