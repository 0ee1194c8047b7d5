//! The PostgreSQL journal as one handle: the appender, this agent's leases, the wake-ups for
//! new events, and the background work (the backlog count, retention pruning).
//!
//! [`crate::journal::Journal`] wraps it so that the rest of the agent uses one journal API
//! whichever backend holds the events.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::append::{AppendOutcome, Appender};
use super::lease::Lessee;
use super::wake::{Wakeup, Wakeups};
use super::{Fence, PgDb, PgError, PgOptions, claim, partition_of, schema};
use crate::journal::EventState;

/// Settings of [`PgJournal::open`].
#[derive(Debug, Clone)]
pub struct PgJournalOptions {
    pub pg: PgOptions,
    /// This agent's id in the journal (leases, `received_by`, claims); unique per process.
    pub agent: String,
    /// How long final events are kept ([`crate::config::JournalConfig::retention_days`]).
    pub retention: Option<Duration>,
}

/// Most events one pruning transaction deletes.
const PRUNE_BATCH: u32 = 256;

/// How often the backlog count is taken again.
const BACKLOG_EVERY: Duration = Duration::from_secs(1);

/// The PostgreSQL journal of one agent.
pub struct PgJournal {
    db: PgDb,
    appender: Appender,
    lessee: Arc<Lessee>,
    partitions: u32,
    /// Events not yet final, across every agent, as last counted.
    backlog: Arc<AtomicU64>,
    /// Why the last count failed because PostgreSQL could not be reached; `None` when it
    /// succeeded.
    unreachable: Arc<std::sync::Mutex<Option<String>>>,
    /// Woken when there may be new work for this agent: events committed in a partition it
    /// holds, a change of the partitions it may apply, or wake-ups missed.
    work: Arc<Notify>,
    /// Set once the background tasks have started; they stop with `stop`.
    stop: CancellationToken,
    /// Stops the lease renewal last (it gives the partitions back as it stops).
    stop_leases: CancellationToken,
    tasks: TaskTracker,
    closed: AtomicBool,
}

impl std::fmt::Debug for PgJournal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgJournal")
            .field("at", &self.db.at())
            .field("agent", &self.lessee.agent())
            .finish()
    }
}

impl PgJournal {
    /// Connects, migrates the schema (several agents starting at once migrate it once), and
    /// starts the appender, the lease renewal and the listener for new events. PostgreSQL must
    /// be reachable for the migration: until it is, this waits, trying again with a growing
    /// pause and saying so in the log, and returns an error only for what waiting does not
    /// cure (a refused statement, a schema that does not exist, a newer schema).
    pub async fn open(
        options: PgJournalOptions,
        stop_waiting: &CancellationToken,
    ) -> Result<PgJournal, PgError> {
        let db = PgDb::new(&options.pg)?;
        let mut pause = Duration::from_millis(250);
        let migrated = loop {
            match schema::migrate(&db, options.pg.partitions).await {
                Ok(migrated) => break migrated,
                Err(e) if e.is_unavailable() => {
                    tracing::warn!(error = %e, retry_in_ms = pause.as_millis() as u64, "the journal's PostgreSQL is not reachable yet; trying again");
                    tokio::select! {
                        () = stop_waiting.cancelled() => return Err(PgError::Closed),
                        () = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e),
            }
        };
        if migrated.applied > 0 {
            tracing::info!(
                migrations = migrated.applied,
                version = schema::CURRENT_VERSION,
                "migrated the journal's PostgreSQL schema"
            );
        }
        let partitions = migrated.partitions;
        let appender = Appender::start(
            db.clone(),
            partitions,
            options.agent.clone(),
            options.pg.max_batch,
        );
        let lessee = Arc::new(Lessee::new(
            db.clone(),
            options.agent.clone(),
            options.pg.lease,
            partitions,
        ));
        let journal = PgJournal {
            db,
            appender,
            lessee,
            partitions,
            backlog: Arc::new(AtomicU64::new(0)),
            unreachable: Arc::new(std::sync::Mutex::new(None)),
            work: Arc::new(Notify::new()),
            stop: CancellationToken::new(),
            stop_leases: CancellationToken::new(),
            tasks: TaskTracker::new(),
            closed: AtomicBool::new(false),
        };
        // The first count before the first request, so that the backlog's high-water mark
        // holds from the start.
        if let Ok(n) = journal.count_backlog().await {
            journal.backlog.store(n, Ordering::Relaxed);
        }
        // A first round before the dispatcher starts, so that it finds partitions to apply.
        if let Err(e) = journal.lessee.round().await {
            tracing::warn!(error = %e, "could not take journal partitions yet; trying again at the next round");
        }
        journal.spawn_background(options.retention);
        Ok(journal)
    }

    fn spawn_background(&self, retention: Option<Duration>) {
        let lessee = self.lessee.clone();
        let stop_leases = self.stop_leases.clone();
        self.tasks
            .spawn(async move { lessee.run(stop_leases).await });

        // Lease changes are work too: a partition taken has a backlog to read.
        let mut changes = self.lessee.subscribe();
        let work = self.work.clone();
        let stop = self.stop.clone();
        self.tasks.spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    changed = changes.changed() => {
                        if changed.is_err() { return }
                        work.notify_one();
                    }
                }
            }
        });

        let db = self.db.clone();
        let lessee = self.lessee.clone();
        let work = self.work.clone();
        let stop = self.stop.clone();
        self.tasks
            .spawn(async move { listen(db, lessee, work, stop).await });

        let db = self.db.clone();
        let backlog = self.backlog.clone();
        let unreachable = self.unreachable.clone();
        let stop = self.stop.clone();
        self.tasks.spawn(async move {
            let mut tick = tokio::time::interval(BACKLOG_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let counted = count_backlog(&db).await;
                let why = match &counted {
                    Err(e) if e.is_unavailable() => Some(e.to_string()),
                    _ => None,
                };
                if let Ok(n) = counted {
                    backlog.store(n, Ordering::Relaxed);
                }
                let mut was = unreachable.lock().unwrap_or_else(|p| p.into_inner());
                match (&*was, &why) {
                    (None, Some(e)) => {
                        tracing::warn!(error = %e, "the journal's PostgreSQL cannot be reached: events are refused with 503 until it can");
                    }
                    (Some(_), None) => {
                        tracing::info!("the journal's PostgreSQL can be reached again");
                    }
                    _ => {}
                }
                *was = why;
            }
        });

        if let Some(keep) = retention {
            let db = self.db.clone();
            let stop = self.stop.clone();
            let every = (keep / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
            self.tasks
                .spawn(async move { prune_loop(db, keep, every, stop).await });
        }
    }

    /// The database, for the operations that take it directly.
    pub fn db(&self) -> &PgDb {
        &self.db
    }

    /// This agent's leases.
    pub fn lessee(&self) -> &Arc<Lessee> {
        &self.lessee
    }

    /// This agent's id.
    pub fn agent(&self) -> &str {
        self.lessee.agent()
    }

    /// The partition count stored in the schema.
    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// The partition of `subject`.
    pub fn partition_of(&self, subject: &str) -> i32 {
        partition_of(subject, self.partitions)
    }

    /// The fence to start applying an event of `subject` under, if this agent may now.
    pub fn fence(&self, subject: &str) -> Option<Fence> {
        self.lessee.fence(self.partition_of(subject))
    }

    /// Woken when there may be new work for this agent (see the field).
    pub fn work(&self) -> &Arc<Notify> {
        &self.work
    }

    /// Appends an event; returns once its transaction has committed.
    pub async fn append(&self, event: crate::journal::NewEvent) -> Result<AppendOutcome, PgError> {
        self.appender.append(event).await
    }

    /// Events not yet final, across every agent, as last counted (at most a second ago).
    pub fn backlog(&self) -> u64 {
        self.backlog.load(Ordering::Relaxed)
    }

    /// Why PostgreSQL could not be reached at the last check, if it could not.
    pub fn unavailable(&self) -> Option<String> {
        self.unreachable
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Transactions of appends committed by this agent.
    pub fn commits(&self) -> u64 {
        self.appender.commits()
    }

    async fn count_backlog(&self) -> Result<u64, PgError> {
        count_backlog(&self.db).await
    }

    /// A round trip to PostgreSQL (the watchdog's and `/readyz`'s test).
    pub async fn ping(&self) -> Result<(), PgError> {
        sqlx::query("SELECT 1")
            .execute(self.db.pool())
            .await
            .map(|_| ())
            .map_err(|e| self.db.error(e, "checking the connection"))
    }

    /// Commits the appends queued, gives this agent's partitions back (so that the other agents
    /// take them at their next round instead of after the leases expire), and closes the pool.
    /// Call once the events being applied are finished.
    pub async fn close(&self) {
        if self.closed.swap(true, Ordering::Relaxed) {
            return;
        }
        self.appender.close().await;
        self.stop.cancel();
        self.stop_leases.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        self.db.close().await;
    }
}

async fn count_backlog(db: &PgDb) -> Result<u64, PgError> {
    sqlx::query_scalar::<_, i64>("SELECT count(*) FROM events WHERE state = $1")
        .bind(EventState::Accepted.as_str())
        .fetch_one(db.pool())
        .await
        .map(|n| n as u64)
        .map_err(|e| db.error(e, "counting the backlog"))
}

/// Listens for new events and wakes the dispatcher for those of the partitions this agent
/// holds; when the listening connection is lost (and notifications with it), wakes it anyway.
async fn listen(db: PgDb, lessee: Arc<Lessee>, work: Arc<Notify>, stop: CancellationToken) {
    let mut failing = false;
    loop {
        let mut wakeups = tokio::select! {
            () = stop.cancelled() => return,
            listening = Wakeups::listen(&db) => match listening {
                Ok(w) => {
                    if std::mem::take(&mut failing) {
                        tracing::info!("listening for new journal events again");
                    }
                    // Notifications may have been missed while not listening.
                    work.notify_one();
                    w
                }
                Err(e) => {
                    if !std::mem::replace(&mut failing, true) {
                        tracing::warn!(error = %e, "cannot listen for new journal events; the backlog is read once a second meanwhile");
                    }
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    work.notify_one();
                    continue;
                }
            }
        };
        loop {
            let next = tokio::select! {
                () = stop.cancelled() => return,
                next = wakeups.next() => next,
            };
            match next {
                Ok(Wakeup::Parts(parts)) => {
                    let held = lessee.held();
                    if parts.iter().any(|p| held.contains(p)) {
                        work.notify_one();
                    }
                }
                Ok(Wakeup::Lost) => work.notify_one(),
                Err(e) => {
                    tracing::debug!(error = %e, "the listening connection failed");
                    break;
                }
            }
        }
    }
}

/// Deletes final events past the retention period, a batch per transaction, one agent at a
/// time ([`claim::prune`]).
async fn prune_loop(db: PgDb, keep: Duration, every: Duration, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let Some(cutoff) = time::Duration::try_from(keep)
            .ok()
            .and_then(|keep| time::OffsetDateTime::now_utc().checked_sub(keep))
            .map(crate::timestamp::format)
        else {
            continue;
        };
        let mut pruned = 0u64;
        loop {
            match claim::prune(&db, &cutoff, PRUNE_BATCH).await {
                Ok(Some(n)) => {
                    pruned += n;
                    if n < u64::from(PRUNE_BATCH) || stop.is_cancelled() {
                        break;
                    }
                }
                // Another agent prunes this round.
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "pruning old journal events failed; it is tried again");
                    break;
                }
            }
        }
        if pruned > 0 {
            tracing::info!(
                events = pruned,
                "pruned final events past the retention period"
            );
        }
    }
}
