//! The journal the rest of the agent uses, whichever backend holds the events: SQLite in the
//! state directory (one agent, the default) or PostgreSQL shared by several agents
//! (`journal.backend = "postgres"`, see docs/high-availability.md).
//!
//! Callers speak in domain operations only (append, an event for its dispatch, delivery states,
//! final states, replays, dead letters, the outbox, listings); no caller sees a connection or
//! SQL. Operations documented as blocking run on the caller's thread (call them from a blocking
//! context, as the admin API does); on PostgreSQL they wait for the query there.
//!
//! The one difference callers see is [`Lease`]: on PostgreSQL an agent applies a subject's
//! events only while it holds the lease of the subject's partition, and every state change it
//! makes carries that lease, so that an agent that lost it cannot overwrite the work of the
//! agent that holds it now. On SQLite the journal belongs to one agent and a lease is always
//! held.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use super::pg::{Fence, PgError, PgJournal, PgJournalOptions};
use super::{
    Appended, DeadLetter, DeliveryRecord, DeliveryUpdate, Dispatchable, DropOutcome, EventDetail,
    EventFilter, EventRecord, EventState, EventSummary, Finish, JournalError, JournalOptions,
    NewEvent, OutboxRow, Requeue, Requeued, RouteReplay, SqliteJournal,
};

/// How long a status report claimed by this agent stays its own before another agent may send
/// it: longer than the reporter's request timeout.
const REPORT_CLAIM: std::time::Duration = std::time::Duration::from_secs(60);

/// The lease an event's state changes are made under ([`Journal::lease`]).
#[derive(Debug, Clone, Default)]
pub struct Lease(Option<Fence>);

enum Backend {
    Sqlite(Arc<SqliteJournal>),
    Postgres(Arc<PgJournal>),
}

/// The handle to the journal. Cheap to share behind an `Arc`.
///
/// The PostgreSQL arms of the calls on the apply path are boxed: a database call's future takes
/// kilobytes, and an arm awaited in place makes every caller's future that large whichever
/// backend is open, among them the dispatcher's task for each subject with a waiting event.
pub struct Journal {
    backend: Backend,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.backend {
            Backend::Sqlite(j) => j.fmt(f),
            Backend::Postgres(j) => j.fmt(f),
        }
    }
}

/// Runs a PostgreSQL query from a blocking caller: on a thread of the blocking pool, or on a
/// worker thread of the multi-threaded runtime, which hands its other tasks over meanwhile.
fn block<T>(future: impl Future<Output = T>) -> T {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(future))
}

impl Journal {
    /// Opens (creating if needed) the SQLite journal in `state_dir`, checks that its pages are
    /// sound and migrates its schema. Blocking.
    pub fn open(state_dir: &Path, options: JournalOptions) -> Result<Arc<Journal>, JournalError> {
        let journal = SqliteJournal::open(state_dir, options)?;
        Ok(Arc::new(Journal {
            backend: Backend::Sqlite(journal),
        }))
    }

    /// Opens the PostgreSQL journal (see [`PgJournal::open`]); waits while PostgreSQL cannot be
    /// reached, until `stop` is cancelled.
    pub async fn open_postgres(
        options: PgJournalOptions,
        stop: &tokio_util::sync::CancellationToken,
    ) -> Result<Arc<Journal>, JournalError> {
        let journal = PgJournal::open(options, stop).await?;
        Ok(Arc::new(Journal {
            backend: Backend::Postgres(Arc::new(journal)),
        }))
    }

    /// The SQLite journal, when that is the backend (its own tools: the benchmarks, the tests).
    pub fn sqlite(&self) -> Option<&Arc<SqliteJournal>> {
        match &self.backend {
            Backend::Sqlite(j) => Some(j),
            Backend::Postgres(_) => None,
        }
    }

    /// The PostgreSQL journal, when that is the backend (the dispatcher takes its work from the
    /// partitions this agent holds).
    pub fn postgres(&self) -> Option<&Arc<PgJournal>> {
        match &self.backend {
            Backend::Postgres(j) => Some(j),
            Backend::Sqlite(_) => None,
        }
    }

    /// Where the journal is, for the log and the status: the SQLite file, or PostgreSQL's
    /// `host:port/database` and this agent's id.
    pub fn location(&self) -> String {
        match &self.backend {
            Backend::Sqlite(j) => j.path().display().to_string(),
            Backend::Postgres(j) => format!("postgres {} (agent {})", j.db().at(), j.agent()),
        }
    }

    /// Appends an event. Returns once the transaction holding it is on the disk (its log
    /// flushed on SQLite; COMMIT returned on PostgreSQL), or reports the stored record when the id was seen
    /// before (by any agent).
    pub async fn append(&self, event: NewEvent) -> Result<Appended, JournalError> {
        match &self.backend {
            Backend::Sqlite(j) => j.append(event).await,
            Backend::Postgres(j) => {
                let part = j.partition_of(&event.subject);
                match Box::pin(j.append(event)).await? {
                    super::pg::append::AppendOutcome::Accepted { .. } => {
                        // Our own event of a partition we hold: no need to wait for the
                        // notification to come back.
                        if j.lessee().fence(part).is_some() {
                            j.work().notify_one();
                        }
                        Ok(Appended::Accepted)
                    }
                    super::pg::append::AppendOutcome::Duplicate(record) => {
                        Ok(Appended::Duplicate(record))
                    }
                }
            }
        }
    }

    /// True when the journal answers: on SQLite, the writer thread committed a transaction
    /// begun after this call; on PostgreSQL, a query came back, whatever its outcome (a
    /// database that cannot be reached is not this process being stuck, and restarting it would
    /// not help). The watchdog's test; the caller bounds how long it waits.
    pub async fn responds(&self) -> bool {
        match &self.backend {
            Backend::Sqlite(j) => j.writer_round_trip().await.is_ok(),
            Backend::Postgres(j) => {
                let _ = j.ping().await;
                true
            }
        }
    }

    /// Why the journal cannot take events now, when it cannot: PostgreSQL could not be
    /// reached at the last check (once a second). `None` on SQLite, whose refusals (a full
    /// disk) are answered per request.
    pub fn unavailable(&self) -> Option<String> {
        match &self.backend {
            Backend::Sqlite(_) => None,
            Backend::Postgres(j) => j.unavailable(),
        }
    }

    /// The stored record of one event. Blocking.
    pub fn get(&self, id: &str) -> Result<Option<EventRecord>, JournalError> {
        match &self.backend {
            Backend::Sqlite(j) => j.get(id),
            Backend::Postgres(j) => Ok(block(super::pg::query::get(j.db(), id))?),
        }
    }

    /// Events not yet in a final state (on PostgreSQL: across every agent, counted at most a
    /// second ago).
    pub fn backlog(&self) -> u64 {
        match &self.backend {
            Backend::Sqlite(j) => j.backlog(),
            Backend::Postgres(j) => j.backlog(),
        }
    }

    /// True while free space in the state directory is below the configured minimum (SQLite).
    pub fn low_disk(&self) -> bool {
        match &self.backend {
            Backend::Sqlite(j) => j.low_disk(),
            Backend::Postgres(_) => false,
        }
    }

    /// Number of transactions of this agent committed since open.
    pub fn commits(&self) -> u64 {
        match &self.backend {
            Backend::Sqlite(j) => j.commits(),
            Backend::Postgres(j) => j.commits(),
        }
    }

    /// Finishes every write queued so far and closes the journal; later appends fail with
    /// [`JournalError::Closed`]. On PostgreSQL this agent's partitions are given back. Blocking.
    pub fn close(&self) {
        match &self.backend {
            Backend::Sqlite(j) => j.close(),
            Backend::Postgres(j) => block(j.close()),
        }
    }

    /// The lease to apply an event of `subject` under, or `None` when this agent must not
    /// start one now (PostgreSQL: another agent holds the subject's partition, or this agent's
    /// last renewal is too old).
    pub fn lease(&self, subject: &str) -> Option<Lease> {
        match &self.backend {
            Backend::Sqlite(_) => Some(Lease(None)),
            Backend::Postgres(j) => j.fence(subject).map(|f| Lease(Some(f))),
        }
    }

    /// True while `lease` is still held by this agent's own clock: checked before each sink
    /// apply.
    pub fn holds(&self, lease: &Lease) -> bool {
        match (&self.backend, &lease.0) {
            (Backend::Postgres(j), Some(fence)) => j.lessee().holds(fence),
            (Backend::Postgres(_), None) => false,
            (Backend::Sqlite(_), _) => true,
        }
    }

    fn fence<'a>(&self, lease: &'a Lease) -> Result<&'a Fence, JournalError> {
        lease
            .0
            .as_ref()
            .ok_or(JournalError::Unsupported("a state change without a lease"))
    }

    /// An event, its deliveries and its subject's applied revision, for its dispatch; `None`
    /// when the event is gone.
    pub async fn dispatchable(&self, seq: i64) -> Result<Option<Dispatchable>, JournalError> {
        match &self.backend {
            Backend::Sqlite(j) => j.dispatchable(seq).await,
            Backend::Postgres(j) => {
                use super::pg::claim;
                Box::pin(async move {
                    let Some(event) = claim::load_event(j.db(), seq).await? else {
                        return Ok(None);
                    };
                    if event.state.is_final() {
                        return Ok(Some((event, Vec::new(), None)));
                    }
                    let deliveries = claim::deliveries(j.db(), seq).await?;
                    let revision = match event.revision {
                        Some(_) => claim::subject_revision(j.db(), &event.subject).await?,
                        None => None,
                    };
                    Ok(Some((event, deliveries, revision)))
                })
                .await
            }
        }
    }

    /// The highest revision applied for `subject`.
    pub async fn applied_revision(&self, subject: String) -> Result<Option<u64>, JournalError> {
        match &self.backend {
            Backend::Sqlite(j) => j.applied_revision(subject).await,
            Backend::Postgres(j) => {
                Ok(Box::pin(super::pg::claim::subject_revision(j.db(), &subject)).await?)
            }
        }
    }

    /// The deliveries of one event. Blocking.
    pub fn deliveries(&self, seq: i64) -> Result<Vec<DeliveryRecord>, JournalError> {
        match &self.backend {
            Backend::Sqlite(j) => j.deliveries(seq),
            Backend::Postgres(j) => Ok(block(super::pg::claim::deliveries(j.db(), seq))?),
        }
    }

    /// What the journal holds of an event: its record, deliveries, attempts, bodies, receipt
    /// and status reports. Blocking.
    pub fn get_detail(&self, id: &str) -> Result<Option<EventDetail>, JournalError> {
        match &self.backend {
            Backend::Sqlite(j) => j.get_detail(id),
            Backend::Postgres(j) => Ok(block(super::pg::query::get_detail(j.db(), id))?),
        }
    }

    /// Records the state of several deliveries in one transaction, under `lease`.
    pub async fn set_deliveries(
        &self,
        lease: &Lease,
        updates: Vec<DeliveryUpdate>,
    ) -> Result<(), JournalError> {
        match &self.backend {
            Backend::Sqlite(j) => j.set_deliveries(updates).await,
            Backend::Postgres(j) => {
                let fence = self.fence(lease)?;
                Ok(Box::pin(super::pg::claim::set_deliveries(j.db(), fence, &updates)).await?)
            }
        }
    }

    /// Puts an event in its final state with its deliveries' last states, raises the subject's
    /// revision and queues the status report, all in one transaction, under `lease`.
    pub async fn finish_with(
        &self,
        lease: &Lease,
        updates: Vec<DeliveryUpdate>,
        finish: Finish,
    ) -> Result<(), JournalError> {
        match &self.backend {
            Backend::Sqlite(j) => j.finish_with(updates, finish).await,
            Backend::Postgres(j) => {
                let fence = self.fence(lease)?;
                Box::pin(super::pg::claim::finish(j.db(), fence, &updates, &finish)).await?;
                Ok(())
            }
        }
    }

    /// Puts a final event back into the backlog (see [`SqliteJournal::requeue`]).
    pub async fn requeue(
        &self,
        id: &str,
        route: Option<RouteReplay>,
        force: bool,
    ) -> Result<Requeue, JournalError> {
        match &self.backend {
            Backend::Sqlite(j) => j.requeue(id, route, force).await,
            Backend::Postgres(j) => {
                Ok(super::pg::query::requeue(j.db(), id, route.as_ref(), force).await?)
            }
        }
    }

    /// Marks a dead letter dropped.
    pub async fn drop_dead_letter(&self, id: &str) -> Result<DropOutcome, JournalError> {
        match &self.backend {
            Backend::Sqlite(j) => j.drop_dead_letter(id).await,
            Backend::Postgres(j) => Ok(super::pg::query::drop_dead_letter(j.db(), id).await?),
        }
    }

    /// Dead letters (failed and parked events) after `after_seq`, oldest first. Blocking.
    pub fn dead_letters(
        &self,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<DeadLetter>, JournalError> {
        match &self.backend {
            Backend::Sqlite(j) => j.dead_letters(after_seq, limit),
            Backend::Postgres(j) => Ok(block(super::pg::query::dead_letters(
                j.db(),
                after_seq,
                limit,
            ))?),
        }
    }

    /// Number of dead letters. Blocking.
    pub fn dead_letter_count(&self) -> Result<u64, JournalError> {
        match &self.backend {
            Backend::Sqlite(j) => j.dead_letter_count(),
            Backend::Postgres(j) => Ok(block(super::pg::query::dead_letter_count(j.db()))?),
        }
    }

    /// Status reports due at `now_ms`, oldest first. On PostgreSQL they are claimed for this
    /// agent, so that each report is sent by one agent. Blocking.
    pub fn outbox_due(&self, now_ms: i64, limit: u32) -> Result<Vec<OutboxRow>, JournalError> {
        match &self.backend {
            Backend::Sqlite(j) => j.outbox_due(now_ms, limit),
            Backend::Postgres(j) => Ok(block(super::pg::claim::claim_reports(
                j.db(),
                j.agent(),
                now_ms,
                limit,
                REPORT_CLAIM,
            ))?),
        }
    }

    /// The earliest time a pending report is due, unix ms. Blocking.
    pub fn outbox_next_due(&self) -> Result<Option<i64>, JournalError> {
        match &self.backend {
            Backend::Sqlite(j) => j.outbox_next_due(),
            Backend::Postgres(j) => Ok(block(super::pg::query::outbox_next_due(j.db()))?),
        }
    }

    /// Pending status reports. Blocking.
    pub fn outbox_len(&self) -> Result<u64, JournalError> {
        match &self.backend {
            Backend::Sqlite(j) => j.outbox_len(),
            Backend::Postgres(j) => Ok(block(super::pg::query::outbox_len(j.db()))?),
        }
    }

    /// A report was delivered: it leaves the outbox for the event's sent reports.
    pub async fn outbox_done(&self, seq: i64) -> Result<(), JournalError> {
        match &self.backend {
            Backend::Sqlite(j) => j.outbox_done(seq).await,
            Backend::Postgres(j) => {
                super::pg::claim::report_sent(j.db(), j.agent(), seq).await?;
                Ok(())
            }
        }
    }

    /// A report failed; try again at `next_attempt_ms`.
    pub async fn outbox_retry(
        &self,
        seq: i64,
        attempts: u32,
        next_attempt_ms: i64,
        error: String,
    ) -> Result<(), JournalError> {
        match &self.backend {
            Backend::Sqlite(j) => j.outbox_retry(seq, attempts, next_attempt_ms, error).await,
            Backend::Postgres(j) => {
                super::pg::claim::report_retry(
                    j.db(),
                    j.agent(),
                    seq,
                    attempts,
                    next_attempt_ms,
                    &error,
                )
                .await?;
                Ok(())
            }
        }
    }

    /// Events matching `filter` below seq `before`, newest first, at most `limit`. Blocking.
    pub fn list_events(
        &self,
        filter: &EventFilter,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<EventSummary>, JournalError> {
        match &self.backend {
            Backend::Sqlite(j) => j.list_events(filter, before, limit),
            Backend::Postgres(j) => Ok(block(super::pg::query::list_events(
                j.db(),
                filter,
                before,
                limit,
            ))?),
        }
    }

    /// The events received at or after `since`, counted by minute and state (see
    /// [`SqliteJournal::received_per_minute`]). Blocking.
    pub fn received_per_minute(
        &self,
        since: &str,
    ) -> Result<Vec<(String, EventState, u64)>, JournalError> {
        match &self.backend {
            Backend::Sqlite(j) => j.received_per_minute(since),
            Backend::Postgres(j) => {
                Ok(block(super::pg::query::received_per_minute(j.db(), since))?)
            }
        }
    }

    /// Puts back in the backlog the dead letters that `filter` selects (see
    /// [`SqliteJournal::requeue_dead_letters`]).
    pub async fn requeue_dead_letters(
        &self,
        filter: EventFilter,
        max: u32,
    ) -> Result<Vec<Requeued>, JournalError> {
        match &self.backend {
            Backend::Sqlite(j) => j.requeue_dead_letters(filter, max).await,
            Backend::Postgres(j) => {
                Ok(super::pg::query::requeue_dead_letters(j.db(), &filter, max).await?)
            }
        }
    }
}

impl From<PgError> for JournalError {
    fn from(e: PgError) -> Self {
        match e {
            PgError::Closed => JournalError::Closed,
            other => JournalError::Postgres(other),
        }
    }
}
