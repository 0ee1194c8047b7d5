//! SQLite: one connection on the blocking pool, the ledger claimed event by event.

use super::batch::{Attempt, Failure};
use super::plan::Op;
use super::{Connector, Shared, cache_capacity, statement, value};
use crate::sink::SinkError;

impl Shared {
    /// Opens the database file on first use (never creating it: a missing file is usually a
    /// volume that is not mounted yet) and makes sure the ledger exists.
    pub(super) fn sqlite_open<'a>(
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

    pub(super) fn attempt_sqlite(
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
}
