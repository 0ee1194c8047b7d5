//! The single writer thread and its group commit.
//!
//! The thread blocks for the first queued operation, then takes every operation already queued
//! (up to the batch limit) into the same transaction. One commit, and one flush of the log by
//! the flusher thread ([`run_flusher`]), answer them all. Nobody is answered before that flush
//! returns; when the commit fails, every operation in the batch gets the error and nothing of
//! the batch is stored. A job (a state change of the
//! dispatcher or the admin API) runs inside its own savepoint, so a job that fails rolls back
//! alone and the rest of the batch still commits.
//!
//! Final states, the most frequent change, are not jobs: the batch writes all of them together,
//! first, with no savepoint (see `write_finishes`).
//!
//! Final states often arrive in bursts: a sink batch completes many events at once, and their
//! tasks send their final states within microseconds of each other. A batch of nothing but final
//! states therefore takes more as long as they keep coming, less than the gap apart (20 µs) and
//! for at most the linger, so that a burst costs one commit instead of two or three. Final
//! states that trickle in (one event confirmed at a time) end the wait after one gap: the next
//! event of the same subject waits for its final state, so a longer wait would cost throughput
//! there. A new event or a job ends the wait at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};

use rusqlite::{Connection, TransactionBehavior, params};
use tokio::sync::{mpsc, oneshot};

use super::apply::{DeliveryUpdate, Finish, finish_event, rfc3339_ms, write_deliveries};
use super::{Appended, EventState, JournalError, NewEvent, Shared, StoredEvent, read_record};

/// Where the outcome of one append is sent.
pub(super) type Reply = oneshot::Sender<Result<Appended, JournalError>>;

/// A state change run inside the writer's transaction.
pub(super) type Job = Box<dyn FnOnce(&Connection) -> Result<(), rusqlite::Error> + Send>;

/// An operation for the writer thread.
pub(super) enum Op {
    Append(Box<NewEvent>, Reply),
    Job(Job, oneshot::Sender<Result<(), JournalError>>),
    /// An event's final state with its deliveries' last states; the reply says whether the
    /// event was in the backlog.
    Finish(Box<Finishing>, oneshot::Sender<Result<bool, JournalError>>),
    /// Finish what is queued before this, checkpoint, and stop.
    Close(Sender<()>),
}

/// What [`Op::Finish`] writes.
pub(super) struct Finishing {
    pub(super) updates: Vec<DeliveryUpdate>,
    pub(super) finish: Finish,
}

/// Announcements of committed events that may wait unread (see [`Announcements`]): about
/// 1.5 KiB each with its envelope.
pub const ANNOUNCED_MAX: usize = 1024;

/// The writer's end of the announcements: a bounded channel and the flag that says some were
/// dropped because it was full.
pub(super) struct Announcer {
    tx: mpsc::Sender<Committed>,
    missed: Arc<AtomicBool>,
}

impl Announcer {
    fn announce(&self, event: Committed) {
        match self.tx.try_send(event) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                // Set before anything later is sent: whoever receives that sees the flag.
                self.missed.store(true, Ordering::Release);
            }
        }
    }
}

/// What the dispatcher hears of committed events ([`super::SqliteJournal::listen`]).
///
/// The events come in commit order, with their envelopes, while the listener keeps up. When it
/// does not (its task starved, or it stopped taking announcements while far behind), at most
/// [`ANNOUNCED_MAX`] wait; the writer drops the ones that do not fit, so the memory they hold
/// stays bounded however far behind the listener falls, and the next receive reports
/// [`Announcement::Missed`]: the dropped events are in the journal only, to be read from it.
pub struct Announcements {
    rx: mpsc::Receiver<Committed>,
    missed: Arc<AtomicBool>,
}

/// One receive of [`Announcements`].
#[derive(Debug)]
pub enum Announcement {
    /// The next committed event.
    Event(Committed),
    /// Some committed events were not announced (this one included, possibly): read the
    /// journal for every event after the last one taken.
    Missed,
}

impl Announcements {
    /// The next announcement; `None` once the journal has closed.
    pub async fn recv(&mut self) -> Option<Announcement> {
        let event = self.rx.recv().await?;
        if self.missed.swap(false, Ordering::AcqRel) {
            return Some(Announcement::Missed);
        }
        Some(Announcement::Event(event))
    }
}

/// A bounded announcement channel of `capacity`: the writer's end and the listener's.
pub(super) fn announcements(capacity: usize) -> (Announcer, Announcements) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let missed = Arc::new(AtomicBool::new(false));
    (
        Announcer {
            tx,
            missed: missed.clone(),
        },
        Announcements { rx, missed },
    )
}

/// An event that was committed, for the dispatcher.
#[derive(Debug, Clone)]
pub struct Committed {
    pub seq: i64,
    pub id: String,
    pub subject: String,
    /// The event as stored, so that the dispatcher need not read back what was just written.
    pub event: Box<StoredEvent>,
}

pub(super) struct Writer {
    conn: Connection,
    rx: Receiver<Op>,
    max_batch: usize,
    finish_linger: std::time::Duration,
    finish_gap: std::time::Duration,
    shared: Arc<Shared>,
    listener: Listener,
    /// Where committed batches go to wait for the flush of the log, when the log is flushed
    /// by the flusher thread rather than inside the commit (see [`run_flusher`]).
    flusher: Option<std::sync::mpsc::SyncSender<Flush>>,
    /// The seq of the last event this writer inserted.
    last_seq: i64,
}

type Listener = Arc<std::sync::Mutex<Option<Announcer>>>;

/// A committed batch: its operations with what each produced, answered once it is durable.
pub(super) struct Done {
    replies: Vec<(Op, Outcome)>,
    /// The highest event seq the journal held when the batch committed.
    seq: i64,
}

/// What the writer hands to the flusher thread.
pub(super) enum Flush {
    Batch(Done),
    /// Everything handed over before this is answered; then the thread stops.
    Close(Sender<()>),
}

/// What one operation of a batch produced, before the commit.
enum Outcome {
    Appended(Appended, Option<Committed>),
    Job(Result<(), rusqlite::Error>),
    Finish(Result<bool, rusqlite::Error>),
}

impl Writer {
    pub(super) fn new(
        conn: Connection,
        rx: Receiver<Op>,
        options: &super::JournalOptions,
        shared: Arc<Shared>,
        listener: Listener,
        flusher: Option<std::sync::mpsc::SyncSender<Flush>>,
    ) -> Self {
        Self {
            conn,
            rx,
            max_batch: options.max_batch.max(1),
            finish_linger: options.finish_linger,
            finish_gap: options.finish_gap,
            shared,
            listener,
            flusher,
            last_seq: 0,
        }
    }

    pub(super) fn run(mut self) {
        let mut batch = Vec::with_capacity(self.max_batch);
        while let Ok(first) = self.rx.recv() {
            let mut close = None;
            match first {
                Op::Close(done) => close = Some(done),
                op => batch.push(op),
            }
            while close.is_none() && batch.len() < self.max_batch {
                match self.rx.try_recv() {
                    Ok(Op::Close(done)) => close = Some(done),
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            if close.is_none() {
                close = self.linger(&mut batch);
            }
            if !batch.is_empty() {
                self.commit_batch(&mut batch);
            }
            if self.shared.restart_wal.swap(false, Ordering::Acquire) {
                self.finish_checkpoint();
            }
            if let Some(done) = close {
                // Everything committed is answered (and so flushed) before the log is
                // checkpointed away.
                if let Some(flusher) = self.flusher.take() {
                    let (flushed, wait) = std::sync::mpsc::channel();
                    if flusher.send(Flush::Close(flushed)).is_ok() {
                        let _ = wait.recv();
                    }
                }
                if let Err(e) = self
                    .conn
                    .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                {
                    tracing::warn!(error = %e, "final journal checkpoint failed; the log is replayed at next start");
                }
                let _ = done.send(());
                return;
            }
        }
    }

    /// While the batch holds final states only, takes more as long as they keep coming (see
    /// the module's text). Returns a close request that arrived meanwhile.
    fn linger(&self, batch: &mut Vec<Op>) -> Option<Sender<()>> {
        let only_finishes =
            !batch.is_empty() && batch.iter().all(|op| matches!(op, Op::Finish(..)));
        if self.finish_linger.is_zero() || !only_finishes {
            return None;
        }
        let started = std::time::Instant::now();
        let mut last = started;
        while batch.len() < self.max_batch {
            match self.rx.try_recv() {
                Ok(Op::Close(done)) => return Some(done),
                Ok(op) => {
                    let finish = matches!(op, Op::Finish(..));
                    batch.push(op);
                    if !finish {
                        break;
                    }
                    last = std::time::Instant::now();
                }
                Err(std::sync::mpsc::TryRecvError::Disconnected) => break,
                Err(std::sync::mpsc::TryRecvError::Empty) => {
                    let now = std::time::Instant::now();
                    if now - last >= self.finish_gap || now - started >= self.finish_linger {
                        break;
                    }
                    // The senders are tasks on the other threads, woken together: let them run.
                    std::thread::yield_now();
                }
            }
        }
        // Whatever else is queued already goes with it.
        while batch.len() < self.max_batch {
            match self.rx.try_recv() {
                Ok(Op::Close(done)) => return Some(done),
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        None
    }

    /// Copies the frames the background checkpoint has not copied yet (those of the last few
    /// commits), so that the next transaction starts the write-ahead log over from its beginning
    /// instead of growing it. A reader still using the log can keep it from being restarted;
    /// the background thread asks again later then.
    fn finish_checkpoint(&self) {
        let started = std::time::Instant::now();
        match super::checkpoint(&self.conn) {
            Ok((frames, copied)) => {
                metrics::histogram!("ess_agent_journal_wal_restart_seconds")
                    .record(started.elapsed().as_secs_f64());
                let before = self.shared.copied_before_restart.load(Ordering::Relaxed);
                let share = copied.saturating_sub(before);
                metrics::counter!("ess_agent_journal_wal_restart_frames_total").increment(share);
                tracing::debug!(
                    frames,
                    copied,
                    share,
                    "journal log checkpointed by the writer"
                );
            }
            Err(e) => tracing::warn!(error = %e, "journal checkpoint failed; it is retried"),
        }
    }

    fn commit_batch(&mut self, batch: &mut Vec<Op>) {
        if self.shared.unflushed.load(Ordering::Acquire) {
            // A flush of the log failed: what the kernel held for it may never reach the disk,
            // and nothing more is acknowledged until a restart recovers from what is there.
            for op in batch.drain(..) {
                fail(op, &JournalError::Io(flush_failed()));
            }
            return;
        }
        let started = std::time::Instant::now();
        match self.write(batch) {
            Ok(outcomes) => {
                self.shared.commits.fetch_add(1, Ordering::Relaxed);
                metrics::histogram!("ess_agent_journal_commit_seconds")
                    .record(started.elapsed().as_secs_f64());
                metrics::histogram!("ess_agent_journal_batch_size").record(batch.len() as f64);
                let done = Done {
                    replies: batch.drain(..).zip(outcomes).collect(),
                    seq: self.last_seq,
                };
                match &self.flusher {
                    Some(flusher) => {
                        if let Err(std::sync::mpsc::SendError(Flush::Batch(done))) =
                            flusher.send(Flush::Batch(done))
                        {
                            // The flusher stopped (it stops only after the writer): nobody
                            // flushes the batch, so nobody is told it is stored.
                            answer_error(done, &JournalError::Closed);
                        }
                    }
                    None => answer(done, &self.shared, &self.listener),
                }
            }
            Err(e) => {
                tracing::error!(error = %e, operations = batch.len(), "journal commit failed; nothing of the batch was stored");
                for op in batch.drain(..) {
                    fail(op, &e);
                }
            }
        }
    }

    /// Writes the batch in one transaction. Nothing is visible or durable until it returns Ok.
    fn write(&mut self, batch: &mut [Op]) -> Result<Vec<Outcome>, JournalError> {
        let now = crate::timestamp::now();
        let now_ms = rfc3339_ms(&now);
        // Final states first: nothing else of the batch depends on them, and written first
        // they can be retried alone (see `write_finishes`).
        let (tx, mut finished) = write_finishes(&self.conn, batch, &now)?;
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut last_seq = self.last_seq;
        for op in batch.iter_mut() {
            match op {
                Op::Append(e, _) => {
                    if let Some(seq) = insert_event(&tx, e, &now)? {
                        last_seq = last_seq.max(seq);
                        // The envelope is not needed here any more: it moves on to the
                        // dispatcher rather than being copied.
                        let event = StoredEvent {
                            seq,
                            id: e.id.clone(),
                            event_type: e.event_type.clone(),
                            version: e.version,
                            subject: e.subject.clone(),
                            revision: e.revision,
                            source: e.source.clone(),
                            received_at_ms: now_ms,
                            state: EventState::Accepted.to_owned(),
                            envelope: std::mem::take(&mut e.envelope),
                        };
                        let committed = Committed {
                            seq,
                            id: e.id.clone(),
                            subject: e.subject.clone(),
                            event: Box::new(event),
                        };
                        outcomes.push(Outcome::Appended(Appended::Accepted, Some(committed)));
                    } else {
                        let record = read_record(&tx, &e.id)?
                            .ok_or(JournalError::Io(rusqlite::Error::QueryReturnedNoRows))?;
                        outcomes.push(Outcome::Appended(
                            Appended::Duplicate(Box::new(record)),
                            None,
                        ));
                    }
                }
                Op::Job(job, _) => {
                    // The job is taken out of the batch; its reply stays for after the commit.
                    let job = std::mem::replace(job, Box::new(|_| Ok(())));
                    // A savepoint of its own, with statements prepared once (one per job adds
                    // up at thousands of jobs a second).
                    tx.prepare_cached("SAVEPOINT job")?.execute([])?;
                    let result = job(&tx);
                    if result.is_err() {
                        tx.prepare_cached("ROLLBACK TO job")?.execute([])?;
                    }
                    tx.prepare_cached("RELEASE job")?.execute([])?;
                    outcomes.push(Outcome::Job(result));
                }
                Op::Finish(..) => {
                    outcomes.push(Outcome::Finish(finished.next().unwrap_or(Ok(false))))
                }
                Op::Close(_) => {}
            }
        }
        tx.commit()?;
        self.last_seq = last_seq;
        Ok(outcomes)
    }
}

/// Answers a durable batch's callers and announces its new events.
fn answer(done: Done, shared: &Shared, listener: &Listener) {
    // Count the backlog before anyone is answered, so a caller that got its answer sees it.
    let accepted = done
        .replies
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Appended(_, Some(_))))
        .count() as u64;
    shared.backlog.fetch_add(accepted, Ordering::Relaxed);
    shared.durable_seq.fetch_max(done.seq, Ordering::Release);
    let mut committed = Vec::new();
    for (op, outcome) in done.replies {
        match (op, outcome) {
            (Op::Append(_, reply), Outcome::Appended(appended, event)) => {
                if let Some(event) = event {
                    committed.push(event);
                }
                let _ = reply.send(Ok(appended));
            }
            (Op::Job(_, reply), Outcome::Job(result)) => {
                let _ = reply.send(result.map_err(JournalError::from));
            }
            (Op::Finish(_, reply), Outcome::Finish(result)) => {
                let _ = reply.send(result.map_err(JournalError::from));
            }
            _ => {}
        }
    }
    if let Some(listener) = &*listener.lock().unwrap_or_else(|p| p.into_inner()) {
        for event in committed {
            listener.announce(event);
        }
    }
}

/// Answers every caller of a batch with `e`.
fn answer_error(done: Done, e: &JournalError) {
    for (op, _) in done.replies {
        fail(op, e);
    }
}

/// Answers one operation's caller with `e`.
fn fail(op: Op, e: &JournalError) {
    match op {
        Op::Append(_, reply) => {
            let _ = reply.send(Err(clone_error(e)));
        }
        Op::Job(_, reply) => {
            let _ = reply.send(Err(clone_error(e)));
        }
        Op::Finish(_, reply) => {
            let _ = reply.send(Err(clone_error(e)));
        }
        Op::Close(_) => {}
    }
}

/// The error of every operation after a failed flush of the log.
fn flush_failed() -> rusqlite::Error {
    rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR_FSYNC),
        Some(
            "the journal's write-ahead log could not be flushed to disk: restart the agent \
             (it recovers the journal from what reached the disk); check the disk and the \
             kernel log"
                .into(),
        ),
    )
}

/// The flusher thread: flushes the write-ahead log for the batches the writer has committed
/// and answers their callers.
///
/// The writer commits without waiting for the disk (`synchronous = NORMAL`) and goes on with
/// the next batch while this thread's `fdatasync` of the log runs, so that the disk's flush
/// and the next batch's work overlap instead of taking turns. A batch is answered only after a
/// flush that started after its commit had written it, so nothing is acknowledged before it is
/// on the disk; the batches that arrive while one flush runs share the next. A failed flush
/// fails its batches and every later operation (see [`flush_failed`]): after a failed
/// `fdatasync` the kernel may have dropped the pages it could not write, and a later flush
/// would succeed without them.
pub(super) fn run_flusher(
    wal: std::fs::File,
    rx: Receiver<Flush>,
    shared: Arc<Shared>,
    listener: Listener,
) {
    let mut batches = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut close = None;
        let mut take = |flush: Flush, batches: &mut Vec<Done>| match flush {
            Flush::Batch(done) => batches.push(done),
            Flush::Close(done) => close = Some(done),
        };
        take(first, &mut batches);
        while let Ok(flush) = rx.try_recv() {
            take(flush, &mut batches);
        }
        if !batches.is_empty() {
            let started = std::time::Instant::now();
            #[cfg(test)]
            let _gate = shared.flush_gate.lock().unwrap_or_else(|p| p.into_inner());
            let flushed = if shared.unflushed.load(Ordering::Acquire) {
                Err(std::io::Error::other("an earlier flush failed"))
            } else {
                wal.sync_data()
            };
            #[cfg(test)]
            let flushed = if shared.fail_next_flush.swap(false, Ordering::AcqRel) {
                Err(std::io::Error::from_raw_os_error(nix::libc::EIO))
            } else {
                flushed
            };
            metrics::histogram!("ess_agent_journal_flush_seconds")
                .record(started.elapsed().as_secs_f64());
            match flushed {
                Ok(()) => {
                    for done in batches.drain(..) {
                        answer(done, &shared, &listener);
                    }
                }
                Err(e) => {
                    if !shared.unflushed.swap(true, Ordering::AcqRel) {
                        tracing::error!(error = %e, "the journal's write-ahead log could not be flushed to disk: no event is acknowledged any more; restart the agent");
                    }
                    for done in batches.drain(..) {
                        answer_error(done, &JournalError::Io(flush_failed()));
                    }
                }
            }
        }
        if let Some(done) = close {
            let _ = done.send(());
            return;
        }
    }
}

/// The result of each final state of the batch, in the batch's order.
type Finished = std::vec::IntoIter<Result<bool, rusqlite::Error>>;

/// Writes the batch's final states, all together and with no savepoint (a savepoint copies
/// every page it changes once more). When one fails, the transaction (which holds nothing else
/// yet) is rolled back, started again, and each final state is written in a savepoint of its
/// own, so that one that cannot be written does not keep the others out.
fn write_finishes<'c>(
    conn: &'c Connection,
    batch: &[Op],
    now: &str,
) -> Result<(rusqlite::Transaction<'c>, Finished), rusqlite::Error> {
    let finishing = || {
        batch.iter().filter_map(|op| match op {
            Op::Finish(f, _) => Some(&**f),
            _ => None,
        })
    };
    let write = |tx: &Connection, f: &Finishing| -> Result<bool, rusqlite::Error> {
        write_deliveries(tx, &f.updates, now)?;
        finish_event(tx, &f.finish, now)
    };
    let begin = || rusqlite::Transaction::new_unchecked(conn, TransactionBehavior::Immediate);
    let tx = begin()?;
    let together: Result<Vec<Result<bool, rusqlite::Error>>, rusqlite::Error> =
        finishing().map(|f| write(&tx, f).map(Ok)).collect();
    let e = match together {
        Ok(results) => return Ok((tx, results.into_iter())),
        Err(e) => e,
    };
    tx.rollback()?;
    tracing::warn!(error = %e, "writing final states together failed; writing each alone");
    let tx = begin()?;
    let mut results = Vec::new();
    for f in finishing() {
        tx.prepare_cached("SAVEPOINT finish")?.execute([])?;
        let result = write(&tx, f);
        if result.is_err() {
            tx.prepare_cached("ROLLBACK TO finish")?.execute([])?;
        }
        tx.prepare_cached("RELEASE finish")?.execute([])?;
        results.push(result);
    }
    Ok((tx, results.into_iter()))
}

/// Inserts a new event (its row and its body) in the writer's transaction: the new event's
/// sequence number, or `None` when its id is in the journal already.
pub fn insert_event(
    tx: &Connection,
    e: &NewEvent,
    now: &str,
) -> Result<Option<i64>, rusqlite::Error> {
    let inserted = tx
        .prepare_cached(
            "INSERT INTO events (id, type, version, subject, revision, source, time, format, \
             content_type, received_at, state, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?10) \
             ON CONFLICT (id) DO NOTHING",
        )?
        .execute(params![
            e.id,
            e.event_type,
            e.version as i64,
            e.subject,
            e.revision.map(|r| r as i64),
            e.source,
            e.time,
            e.format.as_str(),
            e.content_type,
            now,
            EventState::Accepted,
        ])?;
    if inserted == 0 {
        return Ok(None);
    }
    let seq = tx.last_insert_rowid();
    tx.prepare_cached(
        "INSERT INTO event_bodies (seq, raw_body, envelope, receipt) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![seq, &e.raw_body[..], e.envelope, e.receipt])?;
    Ok(Some(seq))
}

/// Errors are not `Clone` (they wrap rusqlite errors); every waiter in a failed batch gets an
/// equivalent one.
fn clone_error(e: &JournalError) -> JournalError {
    match e {
        JournalError::Full => JournalError::Full,
        JournalError::Closed => JournalError::Closed,
        JournalError::Postgres(inner) => JournalError::Postgres(inner.clone()),
        JournalError::Unsupported(what) => JournalError::Unsupported(what),
        JournalError::Corrupt(inner) => JournalError::Corrupt(copy_sqlite(inner)),
        JournalError::Io(inner) => JournalError::Io(copy_sqlite(inner)),
        JournalError::SchemaTooNew { found, supported } => JournalError::SchemaTooNew {
            found: *found,
            supported: *supported,
        },
        JournalError::Damaged { path, detail } => JournalError::Damaged {
            path: path.clone(),
            detail: detail.clone(),
        },
        JournalError::Locked { path, holder } => JournalError::Locked {
            path: path.clone(),
            holder: holder.clone(),
        },
        JournalError::StateDir { path, source } => JournalError::StateDir {
            path: path.clone(),
            source: std::io::Error::new(source.kind(), source.to_string()),
        },
    }
}

fn copy_sqlite(e: &rusqlite::Error) -> rusqlite::Error {
    match e {
        rusqlite::Error::SqliteFailure(code, message) => {
            rusqlite::Error::SqliteFailure(*code, message.clone())
        }
        other => rusqlite::Error::ToSqlConversionFailure(other.to_string().into()),
    }
}
