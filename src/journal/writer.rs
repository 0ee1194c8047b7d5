//! The single writer thread and its group commit.
//!
//! The thread blocks for the first queued operation, then takes every operation already queued
//! (up to the batch limit) into the same transaction. One commit, one fsync, answers them all.
//! Nobody is answered before the commit returns; when the commit fails, every operation in the
//! batch gets the error and nothing of the batch is stored.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, Sender};

use rusqlite::{Connection, TransactionBehavior, params};
use tokio::sync::oneshot;

use super::{Appended, JournalError, NewEvent, Shared, now_rfc3339, read_record, state};

/// Where the outcome of one append is sent.
pub(super) type Reply = oneshot::Sender<Result<Appended, JournalError>>;

/// An operation for the writer thread.
pub(super) enum Op {
    Append(Box<NewEvent>, Reply),
    /// Finish what is queued before this, checkpoint, and stop.
    Close(Sender<()>),
}

pub(super) struct Writer {
    conn: Connection,
    rx: Receiver<Op>,
    max_batch: usize,
    shared: Arc<Shared>,
}

impl Writer {
    pub(super) fn new(
        conn: Connection,
        rx: Receiver<Op>,
        max_batch: usize,
        shared: Arc<Shared>,
    ) -> Self {
        Self {
            conn,
            rx,
            max_batch: max_batch.max(1),
            shared,
        }
    }

    pub(super) fn run(mut self) {
        let mut batch = Vec::with_capacity(self.max_batch);
        while let Ok(first) = self.rx.recv() {
            let mut close = None;
            match first {
                Op::Append(event, reply) => batch.push((event, reply)),
                Op::Close(done) => close = Some(done),
            }
            while close.is_none() && batch.len() < self.max_batch {
                match self.rx.try_recv() {
                    Ok(Op::Append(event, reply)) => batch.push((event, reply)),
                    Ok(Op::Close(done)) => close = Some(done),
                    Err(_) => break,
                }
            }
            if !batch.is_empty() {
                self.commit_batch(&mut batch);
            }
            if let Some(done) = close {
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

    fn commit_batch(&mut self, batch: &mut Vec<(Box<NewEvent>, Reply)>) {
        match self.write(batch) {
            Ok(outcomes) => {
                let accepted = outcomes
                    .iter()
                    .filter(|o| matches!(o, Appended::Accepted))
                    .count() as u64;
                self.shared.backlog.fetch_add(accepted, Ordering::Relaxed);
                self.shared.commits.fetch_add(1, Ordering::Relaxed);
                for ((_, reply), outcome) in batch.drain(..).zip(outcomes) {
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, events = batch.len(), "journal commit failed; the events were refused with 503");
                for (_, reply) in batch.drain(..) {
                    let _ = reply.send(Err(clone_error(&e)));
                }
            }
        }
    }

    /// Writes the batch in one transaction. Nothing is visible or durable until it returns Ok.
    fn write(&mut self, batch: &[(Box<NewEvent>, Reply)]) -> Result<Vec<Appended>, JournalError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut outcomes = Vec::with_capacity(batch.len());
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO events (id, type, version, subject, revision, source, time, format, \
                 content_type, received_at, raw_body, envelope, state, updated_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?10) \
                 ON CONFLICT (id) DO NOTHING",
            )?;
            let now = now_rfc3339();
            for (e, _) in batch {
                let inserted = insert.execute(params![
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
                    &e.raw_body[..],
                    e.envelope,
                    state::ACCEPTED,
                ])?;
                if inserted == 1 {
                    outcomes.push(Appended::Accepted);
                } else {
                    let record = read_record(&tx, &e.id)?
                        .ok_or_else(|| JournalError::Io(rusqlite::Error::QueryReturnedNoRows))?;
                    outcomes.push(Appended::Duplicate(Box::new(record)));
                }
            }
        }
        tx.commit()?;
        Ok(outcomes)
    }
}

/// Errors are not `Clone` (they wrap rusqlite errors); every waiter in a failed batch gets an
/// equivalent one.
fn clone_error(e: &JournalError) -> JournalError {
    match e {
        JournalError::Full => JournalError::Full,
        JournalError::Closed => JournalError::Closed,
        JournalError::Corrupt(inner) => JournalError::Corrupt(copy_sqlite(inner)),
        JournalError::Io(inner) => JournalError::Io(copy_sqlite(inner)),
        JournalError::SchemaTooNew { found, supported } => JournalError::SchemaTooNew {
            found: *found,
            supported: *supported,
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
