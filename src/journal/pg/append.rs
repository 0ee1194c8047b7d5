//! Appends with group commit: concurrent appends share one transaction.
//!
//! One task per agent takes the appends that are waiting (up to `max_batch`) and writes them in
//! one statement, `INSERT … ON CONFLICT (id) DO NOTHING RETURNING`, with their bodies and
//! receipts (how each request was authenticated) in the same statement, which PostgreSQL runs
//! as one transaction; appends that arrive meanwhile wait for the next one (two batches are in
//! flight at most). Nobody is answered before the COMMIT returned: each caller gets
//! [`AppendOutcome::Accepted`] with the event's `seq`,
//! [`AppendOutcome::Duplicate`] with the stored record when the id was in the journal already
//! (accepted by this agent or any other; read after the commit), or the batch's error. A
//! connection lost before the statement's answer leaves it unknown whether the rows were
//! stored; they are answered [`PgError::Unavailable`], never accepted, and the hub's redelivery
//! finds out (a duplicate if they were).
//!
//! The rows are inserted in id order, so two batches (of one agent or of two) that share ids
//! wait for each other in one order and cannot deadlock; a serialization failure or deadlock is
//! retried once.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sqlx::Row as _;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{PgDb, PgError, partition_of, retry_sqlstate, sqlstate};
use crate::journal::{EventRecord, EventState, NewEvent};

/// Batches being committed at once by one agent: while one waits for its commit, the next is
/// written, so the commit latency is not the whole cycle.
const IN_FLIGHT: usize = 2;

/// The outcome of an append that committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppendOutcome {
    /// The event is new and committed.
    Accepted { seq: i64, part: i32 },
    /// The id was stored before (by any agent); nothing was written. Carries the stored record.
    Duplicate(Box<EventRecord>),
}

/// One caller's append.
struct Request {
    event: NewEvent,
    reply: oneshot::Sender<Result<AppendOutcome, PgError>>,
}

/// The handle to the append task. Cheap to share behind an `Arc`.
pub struct Appender {
    requests: mpsc::Sender<Request>,
    commits: Arc<AtomicU64>,
    stop: CancellationToken,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for Appender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Appender")
            .field("commits", &self.commits)
            .finish()
    }
}

impl Appender {
    /// Starts the append task of this agent (`agent` is its id, recorded with each event).
    /// `partitions` is the count stored in the schema ([`super::schema::Migrated`]).
    pub fn start(db: PgDb, partitions: u32, agent: String, max_batch: usize) -> Appender {
        let max_batch = max_batch.max(1);
        let (requests, rx) = mpsc::channel(max_batch * 4);
        let commits = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let batcher = Batcher {
            db,
            partitions,
            agent,
            max_batch,
            commits: commits.clone(),
        };
        let task = tokio::spawn(Arc::new(batcher).run(rx, stop.clone()));
        Appender {
            requests,
            commits,
            stop,
            task: std::sync::Mutex::new(Some(task)),
        }
    }

    /// Appends an event; returns once the transaction holding it has committed.
    pub async fn append(&self, event: NewEvent) -> Result<AppendOutcome, PgError> {
        let (reply, rx) = oneshot::channel();
        self.requests
            .send(Request { event, reply })
            .await
            .map_err(|_| PgError::Closed)?;
        rx.await.map_err(|_| PgError::Closed)?
    }

    /// Transactions committed since start.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Commits what is queued, then stops; later appends fail with [`PgError::Closed`].
    pub async fn close(&self) {
        self.stop.cancel();
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

struct Batcher {
    db: PgDb,
    partitions: u32,
    agent: String,
    max_batch: usize,
    commits: Arc<AtomicU64>,
}

impl Batcher {
    async fn run(self: Arc<Self>, mut rx: mpsc::Receiver<Request>, stop: CancellationToken) {
        let in_flight = Arc::new(Semaphore::new(IN_FLIGHT));
        loop {
            // A free slot first: appends that arrive while the slots are taken gather in the
            // channel and make the next batch.
            let Ok(slot) = in_flight.clone().acquire_owned().await else {
                return;
            };
            let first = tokio::select! {
                first = rx.recv() => first,
                () = stop.cancelled(), if !rx.is_closed() => {
                    // No new appends; those queued are still committed.
                    rx.close();
                    continue;
                }
            };
            let Some(first) = first else { break };
            let mut batch = Vec::with_capacity(self.max_batch);
            batch.push(first);
            while batch.len() < self.max_batch {
                match rx.try_recv() {
                    Ok(request) => batch.push(request),
                    Err(_) => break,
                }
            }
            let this = self.clone();
            tokio::spawn(async move {
                this.commit(&mut batch).await;
                drop(slot);
            });
        }
        // Closing: the batches in flight are answered before the appender reports closed.
        let _ = in_flight.acquire_many(IN_FLIGHT as u32).await;
    }

    /// Writes `batch` in one transaction (retried once after a serialization failure or a
    /// deadlock) and answers every caller.
    async fn commit(&self, batch: &mut Vec<Request>) {
        let started = std::time::Instant::now();
        let mut result = self.write(batch).await;
        if let Err(e) = &result
            && sqlstate(e).is_some_and(|code| retry_sqlstate(&code))
        {
            result = self.write(batch).await;
        }
        match result {
            Ok(outcomes) => {
                self.commits.fetch_add(1, Ordering::Relaxed);
                metrics::histogram!("ess_agent_journal_commit_seconds")
                    .record(started.elapsed().as_secs_f64());
                metrics::histogram!("ess_agent_journal_batch_size").record(batch.len() as f64);
                for (request, outcome) in batch.drain(..).zip(outcomes) {
                    let _ = request.reply.send(Ok(outcome));
                }
            }
            Err(e) => {
                let e = self.db.error(e, "appending events");
                tracing::error!(error = %e, events = batch.len(), "journal commit failed; the events are refused with 503");
                for request in batch.drain(..) {
                    let _ = request.reply.send(Err(e.clone()));
                }
            }
        }
    }

    /// One transaction: the new events with their bodies, and the stored records of the ids
    /// that were there already. The outcomes are in the batch's order.
    async fn write(&self, batch: &[Request]) -> Result<Vec<AppendOutcome>, sqlx::Error> {
        // Each id once, in id order (see the module's text); a second append of an id in the
        // same batch is its duplicate.
        let mut order: Vec<usize> = (0..batch.len()).collect();
        order.sort_by(|&a, &b| batch[a].event.id.cmp(&batch[b].event.id));
        order.dedup_by(|a, b| batch[*a].event.id == batch[*b].event.id);
        let events: Vec<&NewEvent> = order.iter().map(|&i| &batch[i].event).collect();
        let now = crate::timestamp::now();

        // One statement, outside an explicit transaction: PostgreSQL runs it as a transaction
        // of its own and commits it before it reports the statement complete (ReadyForQuery),
        // which is what the query waits for. One round trip instead of BEGIN, INSERT, COMMIT.
        let mut conn = self.db.pool().acquire().await?;
        let rows = sqlx::query(
            "WITH input AS ( \
               SELECT * FROM unnest($1::text[], $2::int[], $3::text[], $4::bigint[], $5::text[], \
                 $6::bigint[], $7::text[], $8::text[], $9::text[], $10::text[], $11::bytea[], \
                 $12::text[], $13::text[]) \
               AS t(id, part, type, version, subject, revision, source, time, format, \
                 content_type, raw_body, envelope, receipt) \
             ), ins AS ( \
               INSERT INTO events (id, part, type, version, subject, revision, source, time, \
                 format, content_type, received_at, received_by, state, updated_at) \
               SELECT id, part, type, version, subject, revision, source, time, format, \
                 content_type, $14, $15, 'accepted', $14 FROM input ORDER BY id \
               ON CONFLICT (id) DO NOTHING \
               RETURNING seq, id, part \
             ), bodies AS ( \
               INSERT INTO event_bodies (seq, raw_body, envelope, receipt) \
               SELECT ins.seq, input.raw_body, input.envelope, input.receipt \
               FROM ins JOIN input USING (id) \
             ) \
             SELECT id, seq, part FROM ins",
        )
        .bind(events.iter().map(|e| e.id.as_str()).collect::<Vec<_>>())
        .bind(
            events
                .iter()
                .map(|e| partition_of(&e.subject, self.partitions))
                .collect::<Vec<_>>(),
        )
        .bind(
            events
                .iter()
                .map(|e| e.event_type.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(events.iter().map(|e| e.version as i64).collect::<Vec<_>>())
        .bind(
            events
                .iter()
                .map(|e| e.subject.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            events
                .iter()
                .map(|e| e.revision.map(|r| r as i64))
                .collect::<Vec<_>>(),
        )
        .bind(
            events
                .iter()
                .map(|e| e.source.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(events.iter().map(|e| e.time.as_deref()).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.format.as_str()).collect::<Vec<_>>())
        .bind(
            events
                .iter()
                .map(|e| e.content_type.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(events.iter().map(|e| &e.raw_body[..]).collect::<Vec<_>>())
        .bind(
            events
                .iter()
                .map(|e| e.envelope.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            events
                .iter()
                .map(|e| e.receipt.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(&now)
        .bind(&self.agent)
        .fetch_all(&mut *conn)
        .await?;
        let mut inserted: HashMap<String, (i64, i32)> = HashMap::with_capacity(rows.len());
        for row in rows {
            inserted.insert(row.try_get(0)?, (row.try_get(1)?, row.try_get(2)?));
        }
        let known: Vec<&str> = events
            .iter()
            .filter(|e| !inserted.contains_key(&e.id))
            .map(|e| e.id.as_str())
            .collect();
        let mut stored: HashMap<String, EventRecord> = HashMap::new();
        if !known.is_empty() {
            for record in read_records(&mut conn, &known).await? {
                stored.insert(record.id.clone(), record);
            }
        }

        // The first append of an id in the batch is the one inserted; any other is its
        // duplicate.
        let mut first_seen: HashMap<&str, bool> = HashMap::new();
        batch
            .iter()
            .map(|request| {
                let id = request.event.id.as_str();
                let first = first_seen.insert(id, true).is_none();
                match inserted.get(id) {
                    Some(&(seq, part)) if first => Ok(AppendOutcome::Accepted { seq, part }),
                    Some(_) => Ok(AppendOutcome::Duplicate(Box::new(accepted_record(
                        &request.event,
                        &now,
                    )))),
                    None => stored
                        .get(id)
                        .cloned()
                        .map(|r| AppendOutcome::Duplicate(Box::new(r)))
                        .ok_or_else(|| {
                            sqlx::Error::Protocol(format!(
                                "event {id} was neither inserted nor found"
                            ))
                        }),
                }
            })
            .collect()
    }
}

/// The record of an event this batch inserted, for a second append of its id in the batch.
fn accepted_record(e: &NewEvent, now: &str) -> EventRecord {
    EventRecord {
        id: e.id.clone(),
        event_type: e.event_type.clone(),
        version: e.version,
        subject: e.subject.clone(),
        revision: e.revision,
        source: e.source.clone(),
        time: e.time.clone(),
        format: e.format.as_str().to_owned(),
        received_at: now.to_owned(),
        state: EventState::Accepted,
        updated_at: now.to_owned(),
        error: None,
        finished_at: None,
    }
}

/// The stored records of `ids`.
pub(super) async fn read_records(
    conn: &mut sqlx::PgConnection,
    ids: &[&str],
) -> Result<Vec<EventRecord>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id, type, version, subject, revision, source, time, format, received_at, \
         state, updated_at, error, finished_at FROM events WHERE id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(conn)
    .await?;
    rows.iter().map(|r| record_from(r, 0)).collect()
}

/// The [`EventRecord`] in the columns of `row` from `first` on: `id, type, version, subject,
/// revision, source, time, format, received_at, state, updated_at, error, finished_at`.
pub(super) fn record_from(
    r: &sqlx::postgres::PgRow,
    first: usize,
) -> Result<EventRecord, sqlx::Error> {
    Ok(EventRecord {
        id: r.try_get(first)?,
        event_type: r.try_get(first + 1)?,
        version: r.try_get::<i64, _>(first + 2)? as u64,
        subject: r.try_get(first + 3)?,
        revision: r.try_get::<Option<i64>, _>(first + 4)?.map(|v| v as u64),
        source: r.try_get(first + 5)?,
        time: r.try_get(first + 6)?,
        format: r.try_get(first + 7)?,
        received_at: r.try_get(first + 8)?,
        state: state_column(r, first + 9)?,
        updated_at: r.try_get(first + 10)?,
        error: r.try_get(first + 11)?,
        finished_at: r.try_get(first + 12)?,
    })
}

/// A state column: the word the SQLite journal writes too.
pub(super) fn state_column<S>(row: &sqlx::postgres::PgRow, index: usize) -> Result<S, sqlx::Error>
where
    S: std::str::FromStr<Err = crate::journal::state::UnknownState>,
{
    let text: String = row.try_get(index)?;
    text.parse().map_err(|e| sqlx::Error::ColumnDecode {
        index: index.to_string(),
        source: Box::new(e),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::Arc;
    use std::time::Duration;

    use super::super::testdb::{OwnServer, TestSchema, eventually, new_event};
    use super::super::{PgOptions, partition_of};
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_share_commits() {
        let schema = TestSchema::create().await;
        let db = schema.db().await;
        let appender = Arc::new(Appender::start(db.clone(), 16, "a".into(), 512));
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let appender = appender.clone();
                tokio::spawn(async move {
                    appender
                        .append(new_event(&format!("e{i}"), &format!("S{}", i % 5)))
                        .await
                })
            })
            .collect();
        let mut seqs = BTreeSet::new();
        for task in tasks {
            match task.await.unwrap().unwrap() {
                AppendOutcome::Accepted { seq, .. } => assert!(seqs.insert(seq)),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(seqs.len(), 64);
        let commits = appender.commits();
        // The transactions that wrote the rows, as PostgreSQL counts them.
        let transactions: i64 = sqlx::query_scalar("SELECT count(DISTINCT xmin::text) FROM events")
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert_eq!(transactions as u64, commits);
        assert!(
            commits < 64 / 4,
            "64 concurrent appends took {commits} commits"
        );
        // Each row is in its subject's partition, with its body.
        let rows: Vec<(String, i32, i64)> = sqlx::query_as(
            "SELECT e.subject, e.part, length(b.raw_body)::bigint FROM events e \
             JOIN event_bodies b USING (seq)",
        )
        .fetch_all(db.pool())
        .await
        .unwrap();
        assert_eq!(rows.len(), 64);
        for (subject, part, body) in rows {
            assert_eq!(part, partition_of(&subject, 16));
            assert!(body > 0);
        }
        appender.close().await;
        assert_eq!(
            appender.append(new_event("late", "S")).await,
            Err(PgError::Closed)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_id_accepted_by_one_agent_is_a_duplicate_at_another() {
        let schema = TestSchema::create().await;
        let db = schema.db().await;
        let a = Arc::new(Appender::start(db.clone(), 16, "a".into(), 512));
        let b = Arc::new(Appender::start(schema.db().await, 16, "b".into(), 512));
        let AppendOutcome::Accepted { seq, .. } = a.append(new_event("one", "S")).await.unwrap()
        else {
            panic!("new at a")
        };
        match b.append(new_event("one", "S")).await.unwrap() {
            AppendOutcome::Duplicate(record) => {
                assert_eq!(
                    (record.id.as_str(), record.state),
                    ("one", EventState::Accepted)
                );
            }
            other => panic!("{other:?}"),
        }
        // The same ids sent to both at once: each accepted exactly once.
        let mut tasks = Vec::new();
        for i in 0..40 {
            for appender in [&a, &b, &a] {
                let appender = appender.clone();
                tasks.push(tokio::spawn(async move {
                    let id = format!("both{i}");
                    (id.clone(), appender.append(new_event(&id, "T")).await)
                }));
            }
        }
        let mut accepted: BTreeMap<String, usize> = BTreeMap::new();
        for task in tasks {
            let (id, outcome) = task.await.unwrap();
            let entry = accepted.entry(id).or_default();
            match outcome.unwrap() {
                AppendOutcome::Accepted { seq: other, .. } => {
                    assert_ne!(other, seq);
                    *entry += 1;
                }
                AppendOutcome::Duplicate(record) => assert_eq!(record.subject, "T"),
            }
        }
        assert_eq!(accepted.len(), 40);
        assert!(accepted.values().all(|&n| n == 1), "{accepted:?}");
        let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert_eq!(stored, 41);
    }

    /// What happened to each append while the server went down and came back.
    #[derive(Default)]
    struct Outcomes {
        accepted: Vec<String>,
        unavailable: usize,
        /// The text of the first refusal.
        refusal: Option<String>,
        other: Vec<String>,
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn appends_while_the_server_is_down_are_unavailable_and_resume_by_themselves() {
        let server = tokio::task::spawn_blocking(OwnServer::start).await.unwrap();
        let schema = TestSchema::create_at(&server.url()).await;
        let options = PgOptions {
            connect_timeout: Duration::from_secs(1),
            ..schema.options()
        };
        let db = schema.db_with(options).await;
        let appender = Arc::new(Appender::start(db.clone(), 16, "a".into(), 64));
        let outcomes = Arc::new(std::sync::Mutex::new(Outcomes::default()));
        let stop = CancellationToken::new();
        let writers: Vec<_> = (0..8)
            .map(|w| {
                let (appender, outcomes, stop) = (appender.clone(), outcomes.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut i = 0;
                    while !stop.is_cancelled() {
                        i += 1;
                        let id = format!("w{w}-{i}");
                        let outcome = appender.append(new_event(&id, &format!("S{w}"))).await;
                        let refused = matches!(&outcome, Err(e) if e.is_unavailable());
                        {
                            let mut o = outcomes.lock().unwrap();
                            match outcome {
                                Ok(AppendOutcome::Accepted { .. }) => o.accepted.push(id),
                                Err(e) if e.is_unavailable() => {
                                    o.unavailable += 1;
                                    o.refusal.get_or_insert(e.to_string());
                                }
                                other => o.other.push(format!("{id}: {other:?}")),
                            }
                        }
                        if refused {
                            // As the hub would after a 503: a little later.
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                })
            })
            .collect();
        let accepted = || outcomes.lock().unwrap().accepted.len();
        assert!(eventually(Duration::from_secs(10), || async { accepted() >= 100 }).await);

        tokio::task::block_in_place(|| server.stop_immediately());
        assert!(
            eventually(Duration::from_secs(15), || async {
                outcomes.lock().unwrap().unavailable >= 10
            })
            .await,
            "appends are refused as unavailable while the server is down"
        );
        let during = accepted();
        tokio::task::block_in_place(|| server.start_again());
        assert!(
            eventually(Duration::from_secs(20), || async {
                accepted() >= during + 100
            })
            .await,
            "appends resume by themselves once the server is back"
        );
        stop.cancel();
        for writer in writers {
            writer.await.unwrap();
        }
        appender.close().await;

        let o = std::mem::take(&mut *outcomes.lock().unwrap());
        assert!(
            o.other.is_empty(),
            "only accepted or unavailable: {:?}",
            o.other
        );
        // The refusal says where and what to check.
        let refusal = o.refusal.unwrap_or_default();
        let at = format!(
            "cannot reach the journal's PostgreSQL at 127.0.0.1:{}",
            server.port
        );
        assert!(refusal.starts_with(&at), "{refusal}");
        assert!(
            refusal.ends_with("is it running and reachable?"),
            "{refusal}"
        );
        eprintln!("refused while down: {refusal}");
        // Every append answered accepted is stored, the ones before the crash included.
        let stored: BTreeSet<String> = sqlx::query_scalar("SELECT id FROM events")
            .fetch_all(db.pool())
            .await
            .unwrap()
            .into_iter()
            .collect();
        let missing: Vec<&String> = o
            .accepted
            .iter()
            .filter(|id| !stored.contains(*id))
            .collect();
        assert!(missing.is_empty(), "accepted but not stored: {missing:?}");
        db.close().await;
    }
}

/// The append rate with 32 concurrent callers, through one agent's pool and through two (two
/// appenders, as two agents). Not run by default; BENCHMARKS.md gives the command.
#[cfg(test)]
mod bench {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    use super::super::testdb::{TestSchema, new_event};
    use super::*;

    const CALLERS: usize = 32;
    const PHASE: Duration = Duration::from_secs(5);

    /// Appends/s and appends per commit of one phase with `agents` appenders.
    async fn phase(agents: usize) -> (f64, f64) {
        let schema = TestSchema::create().await;
        let mut appenders = Vec::new();
        for a in 0..agents {
            let db = schema.db().await;
            appenders.push(Arc::new(Appender::start(db, 16, format!("a{a}"), 512)));
        }
        let body = bytes::Bytes::from(vec![b'x'; 1024]);
        let done = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let callers: Vec<_> = (0..CALLERS)
            .map(|c| {
                let appender = appenders[c % agents].clone();
                let (done, accepted, body) = (done.clone(), accepted.clone(), body.clone());
                tokio::spawn(async move {
                    let mut i = 0u64;
                    while !done.load(Ordering::Relaxed) {
                        i += 1;
                        let mut event = new_event(&format!("c{c}-{i}"), &format!("S{}", i % 100));
                        event.raw_body = body.clone();
                        if let Ok(AppendOutcome::Accepted { .. }) = appender.append(event).await {
                            accepted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        tokio::time::sleep(PHASE).await;
        done.store(true, Ordering::Relaxed);
        for caller in callers {
            caller.await.unwrap();
        }
        let accepted = accepted.load(Ordering::Relaxed) as f64;
        let rate = accepted / started.elapsed().as_secs_f64();
        let commits: u64 = appenders.iter().map(|a| a.commits()).sum();
        for appender in appenders {
            appender.close().await;
        }
        (rate, accepted / commits.max(1) as f64)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a benchmark: see BENCHMARKS.md"]
    async fn bench_appends_with_32_callers() {
        for run in 1..=3 {
            for agents in [1, 2] {
                let (rate, per_commit) = phase(agents).await;
                println!(
                    "run {run}, {agents} pool(s): {rate:.0} appends/s, {per_commit:.1} per commit"
                );
            }
        }
    }
}
