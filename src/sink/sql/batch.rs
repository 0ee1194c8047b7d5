//! The workers: batches taken off the queue and applied in one transaction each, and how an
//! attempt at a batch ends.

use std::sync::Arc;
use std::time::Duration;

use sqlx::pool::PoolConnection;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, timeout};

use super::plan::{Op, record_name};
use super::{Backend, Shared};
use crate::sink::SinkError;

/// An event waiting for a worker.
pub(super) struct Job {
    pub(super) id: String,
    pub(super) route: String,
    pub(super) ops: Vec<Op>,
    pub(super) reply: oneshot::Sender<Result<(), SinkError>>,
}

/// Closes the connection of an attempt that left it unusable (see `Failure::poisoned`) instead
/// of giving it back to the pool; the same for every database.
pub(super) fn close_if_poisoned<DB: sqlx::Database>(
    conn: &mut PoolConnection<DB>,
    attempt: &Attempt,
) {
    let poisoned = match attempt {
        Attempt::Committed(_) => false,
        Attempt::EventFailed(_, f) | Attempt::Failed(f) => f.poisoned,
    };
    if poisoned {
        conn.close_on_drop();
    }
}

/// Takes batches off the queue and applies them, until the sink is dropped.
pub(super) async fn worker(
    shared: Arc<Shared>,
    rx: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Job>>>,
) {
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
pub(super) struct Failure {
    pub(super) error: SinkError,
    /// The failure belongs to the whole transaction (connection, deadlock, commit), not to the
    /// statement that saw it.
    pub(super) whole: bool,
    /// The connection cannot be trusted any more (a client-side timeout cut a statement off).
    pub(super) poisoned: bool,
    /// The ledger refused a pair as a duplicate: another transaction recorded it meanwhile.
    pub(super) ledger_conflict: bool,
    /// The SQLSTATE (PostgreSQL) of a database error.
    pub(super) sqlstate: Option<String>,
    /// The error number (MariaDB/MySQL) of a database error.
    pub(super) number: Option<u16>,
}

impl Failure {
    pub(super) fn whole(error: SinkError) -> Failure {
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
    pub(super) fn event(error: SinkError) -> Failure {
        Failure {
            whole: false,
            ..Failure::whole(error)
        }
    }
}

/// How one attempt at a batch ended.
pub(super) enum Attempt {
    /// Committed. `true` for events found in the ledger (applied before).
    Committed(Vec<bool>),
    /// The event at this index failed; the transaction was rolled back.
    EventFailed(usize, Failure),
    /// The transaction as a whole failed and was rolled back.
    Failed(Failure),
}

impl Shared {
    /// `SELECT 1`, for the healthcheck. Runs on the sink's thread.
    pub(super) async fn select_one(self: Arc<Self>) -> Result<(), SinkError> {
        match self.backend() {
            Backend::Postgres(pool) => self.select_one_on(pool).await.map_err(|f| f.error)?,
            Backend::MySql(pool) => self.select_one_on(pool).await.map_err(|f| f.error)?,
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
    pub(super) async fn run(self: &Arc<Self>, jobs: Vec<Job>) {
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

    pub(super) async fn attempt(self: &Arc<Self>, jobs: &[Job]) -> Attempt {
        match self.backend() {
            Backend::Postgres(pool) => self.attempt_on(pool, jobs).await,
            Backend::MySql(pool) => self.attempt_on(pool, jobs).await,
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
    pub(super) async fn timed<T>(
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

    pub(super) fn missing_ledger(&self) -> Failure {
        Failure::whole(SinkError::Permanent(format!(
            "the ledger table {} does not exist in {} at {}: create it (see docs/sinks/sql.md) or \
             set create_ledger = true",
            self.ledger.shown(),
            self.dialect.name(),
            self.shown
        )))
    }

    /// Adds which record a statement failure is about.
    pub(super) fn in_op(&self, f: Failure, op: &Op) -> Failure {
        let error = match f.error {
            SinkError::Permanent(m) if op.record.is_some() => {
                SinkError::Permanent(format!("{}: {m}", record_name(op.record)))
            }
            other => other,
        };
        Failure { error, ..f }
    }
}
